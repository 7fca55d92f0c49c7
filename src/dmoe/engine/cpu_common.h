/* Helpers shared by dmoe's CPU kernels (lora_cpu.c, decode_cpu.c): bf16 conversions in torch's
 * rounding, and dot products summed in one fixed order. */
#ifndef DMOE_CPU_COMMON_H
#define DMOE_CPU_COMMON_H

#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((u >> 16) | 0x40u);  /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static void load_row(float *restrict dst, const void *restrict src, int64_t n, int bf16) {
    if (bf16) {
        const uint16_t *s = (const uint16_t *)src;
        for (int64_t i = 0; i < n; i++)
            dst[i] = bf16_to_f32(s[i]);
    } else {
        memcpy(dst, src, (size_t)n * sizeof(float));
    }
}

/* Dot products in one fixed order, whatever the batch: LANES running sums (lane l takes elements
 * l, l + LANES, ...), then the lanes added in order. A row's sum never depends on how many rows
 * share its slot or where it sits (no reassociating reduction: the compiler vectorises across the
 * independent lanes only), so a reply never depends on its batch-mates. */
#define LANES 16

static inline float lanes_sum(const float *acc) {
    float s = 0.0f;
    for (int l = 0; l < LANES; l++)
        s += acc[l];
    return s;
}

/* acc[l] += the products of lane l (elements l, l + LANES, ...) */
static inline void dot_acc(float *restrict acc, const float *restrict a, const float *restrict b, int64_t n) {
    int64_t c = 0;
    for (; c + LANES <= n; c += LANES)
        for (int l = 0; l < LANES; l++)
            acc[l] += a[c + l] * b[c + l];
    for (int l = 0; c + l < n; l++)
        acc[l] += a[c + l] * b[c + l];
}

static float dot(const float *restrict a, const float *restrict b, int64_t n) {
    float acc[LANES] = {0};
    dot_acc(acc, a, b, n);
    return lanes_sum(acc);
}

/* LANES fp32 values as one vector (GCC/Clang vector extensions): kept in registers, where a
 * float[LANES] accumulator would go through the stack on every update. One zmm on AVX-512,
 * two ymm on AVX2; the same arithmetic, lane by lane, as the plain arrays it replaces. */
typedef float v16 __attribute__((vector_size(LANES * sizeof(float))));

static inline v16 ld16(const float *p) {  /* unaligned load */
    v16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void st16(float *p, v16 v) {
    memcpy(p, &v, sizeof v);
}

#endif
