/* The work between a CPU decode step's matmuls, in three calls a layer instead of about fifty torch ops.
 *
 * Built with lora_cpu.c into one library by dmoe/engine/native.py and called through ctypes by
 * model.Transformer's native decode path (Llama-family layers, one new token per row). The
 * matmuls stay torch's (the packed int4 or dense weights) and the LoRA stays lora_cpu.c's; what
 * is here is what used to be ~50 small torch ops a layer, each a few microseconds of dispatch:
 *
 *   dmoe_add_rmsnorm   x += d (the residual), then out = RMSNorm(x) * w      (Llama's order)
 *   dmoe_rope_attend   RoPE on q and k, k and v into each row's cache slot, then every query head
 *                      over its row's own positions (grouped-query, optional sliding window)
 *   dmoe_silu_mul      out = silu(gate) * up, from the fused gate|up output
 *
 * Numbers: fp32 arithmetic, rounded to the activations' dtype (bf16 or fp32: ``bf16``) at the
 * same op boundaries as the torch path in model.py (Block.forward, decode_attention), which stays
 * the reference these are tested against (tests/test_decode_native.py). Sums run in a fixed order
 * per row (cpu_common.h's dot), so a row's result never depends on its batch-mates.
 *
 * Layouts (row-major, contiguous): x, d, out (m, dim); w (dim,); qkv (m, (nh + 2 nkv) * hd) as
 * q | k | v; cos, sin (m, hd); slot, pos (m,) int64; this layer's k_cache, v_cache
 * (slots, max_seq, nkv, hd); attention out (m, nh * hd); gate|up (m, 2 * hidden).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_common.h"

static inline float rnd(float f, int bf16) {  /* round to the activations' dtype, as a torch op's output is */
    return bf16 ? bf16_to_f32(f32_to_bf16(f)) : f;
}

/* A dot product in a fixed order, as dot() but with its LANES sums added as a tree (lane l with
 * l + 8, then l + 4, ...): vector adds instead of a chain of scalar ones. */
static inline float tree16(const float *acc) {
    float h8[8], h4[4];
    for (int l = 0; l < 8; l++)
        h8[l] = acc[l] + acc[l + 8];
    for (int l = 0; l < 4; l++)
        h4[l] = h8[l] + h8[l + 4];
    return (h4[0] + h4[2]) + (h4[1] + h4[3]);
}

/* s[j] = round(q . k_j) * scale for n keys (rows of kf, hd apart), four at a time (independent
 * sums in flight); each sum in the same order whatever n is. */
static void scores(float *restrict s, const float *restrict q, const float *restrict kf, int64_t n, int64_t hd,
                   float scale, int bf16) {
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
        float a0[LANES] = {0}, a1[LANES] = {0}, a2[LANES] = {0}, a3[LANES] = {0};
        dot_acc(a0, q, kf + j * hd, hd);
        dot_acc(a1, q, kf + (j + 1) * hd, hd);
        dot_acc(a2, q, kf + (j + 2) * hd, hd);
        dot_acc(a3, q, kf + (j + 3) * hd, hd);
        s[j] = rnd(tree16(a0), bf16) * scale;
        s[j + 1] = rnd(tree16(a1), bf16) * scale;
        s[j + 2] = rnd(tree16(a2), bf16) * scale;
        s[j + 3] = rnd(tree16(a3), bf16) * scale;
    }
    for (; j < n; j++) {
        float a0[LANES] = {0};
        dot_acc(a0, q, kf + j * hd, hd);
        s[j] = rnd(tree16(a0), bf16) * scale;
    }
}

/* o[0:hd] = sum_j w[j] v_j over n values (rows of vf, hd apart): four running sums (j mod 4), then
 * added as (0 + 1) + (2 + 3); the order depends on n only. */
static void weighted_sum(float *restrict o, const float *restrict w, const float *restrict vf, int64_t n, int64_t hd) {
    int64_t c = 0;
    for (; c + LANES <= hd; c += LANES) {
        v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        int64_t j = 0;
        for (; j + 4 <= n; j += 4) {
            a0 += w[j] * ld16(vf + j * hd + c);
            a1 += w[j + 1] * ld16(vf + (j + 1) * hd + c);
            a2 += w[j + 2] * ld16(vf + (j + 2) * hd + c);
            a3 += w[j + 3] * ld16(vf + (j + 3) * hd + c);
        }
        for (; j < n; j++)
            a0 += w[j] * ld16(vf + j * hd + c);
        st16(o + c, (a0 + a1) + (a2 + a3));
    }
    for (; c < hd; c++) {  /* a head size that is not a multiple of LANES: the same sums, one column at a time */
        float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
        int64_t j = 0;
        for (; j + 4 <= n; j += 4) {
            a0 += w[j] * vf[j * hd + c];
            a1 += w[j + 1] * vf[(j + 1) * hd + c];
            a2 += w[j + 2] * vf[(j + 2) * hd + c];
            a3 += w[j + 3] * vf[(j + 3) * hd + c];
        }
        for (; j < n; j++)
            a0 += w[j] * vf[j * hd + c];
        o[c] = (a0 + a1) + (a2 + a3);
    }
}

static void store_row(void *restrict dst, const float *restrict src, int64_t n, int bf16) {
    if (bf16) {
        uint16_t *d = (uint16_t *)dst;
        for (int64_t i = 0; i < n; i++)
            d[i] = f32_to_bf16(src[i]);
    } else {
        memcpy(dst, src, (size_t)n * sizeof(float));
    }
}

/* e^x in fp32 to about one ulp, vectorisable (the loops below call it under omp simd):
 * x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor polynomial to r^7, 2^n from the exponent bits. */
static inline float exp_f32(float x) {
    x = x < -87.0f ? -87.0f : x > 88.0f ? 88.0f : x;
    const float n = rintf(x * 1.44269504088896341f);
    float r = fmaf(n, -0.693145751953125f, x);
    r = fmaf(n, -1.428606765330187e-06f, r);
    float p = 1.0f / 5040.0f;
    p = fmaf(p, r, 1.0f / 720.0f);
    p = fmaf(p, r, 1.0f / 120.0f);
    p = fmaf(p, r, 1.0f / 24.0f);
    p = fmaf(p, r, 1.0f / 6.0f);
    p = fmaf(p, r, 0.5f);
    p = fmaf(p, r, 1.0f);
    p = fmaf(p, r, 1.0f);
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* x += d (when d is not NULL, rounded: the residual add), then out = w * round(x / rms(x)):
 * RMSNorm in Llama's order (normalise in fp32, round, then scale by the weight, round). */
int dmoe_add_rmsnorm(void *x, const void *d, const void *w, void *out, int64_t m, int64_t dim, float eps, int bf16) {
    const size_t es = bf16 ? 2 : 4;
    float *xf = malloc((size_t)dim * sizeof(float)), *t = malloc((size_t)dim * sizeof(float));
    float *wf = malloc((size_t)dim * sizeof(float));
    if (!xf || !t || !wf) {
        free(xf);
        free(t);
        free(wf);
        return -1;
    }
    load_row(wf, w, dim, bf16);
    for (int64_t b = 0; b < m; b++) {
        char *xr = (char *)x + (size_t)(b * dim) * es;
        load_row(xf, xr, dim, bf16);
        if (d != NULL) {
            load_row(t, (const char *)d + (size_t)(b * dim) * es, dim, bf16);
            for (int64_t i = 0; i < dim; i++)
                xf[i] = rnd(xf[i] + t[i], bf16);
            store_row(xr, xf, dim, bf16);
        }
        const float inv = 1.0f / sqrtf(dot(xf, xf, dim) / (float)dim + eps);
        for (int64_t i = 0; i < dim; i++)
            t[i] = rnd(wf[i] * rnd(xf[i] * inv, bf16), bf16);
        store_row((char *)out + (size_t)(b * dim) * es, t, dim, bf16);
    }
    free(xf);
    free(t);
    free(wf);
    return 0;
}

/* out = round(round(silu(gate)) * up) for each row of the fused gate|up output (m, 2 * hidden) */
int dmoe_silu_mul(const void *gu, void *out, int64_t m, int64_t hidden, int bf16) {
    const size_t es = bf16 ? 2 : 4;
    float *g = malloc((size_t)hidden * sizeof(float)), *u = malloc((size_t)hidden * sizeof(float));
    if (!g || !u) {
        free(g);
        free(u);
        return -1;
    }
    for (int64_t b = 0; b < m; b++) {
        const char *row = (const char *)gu + (size_t)(b * 2 * hidden) * es;
        load_row(g, row, hidden, bf16);
        load_row(u, row + (size_t)hidden * es, hidden, bf16);
#pragma omp simd
        for (int64_t i = 0; i < hidden; i++)
            g[i] = g[i] / (1.0f + exp_f32(-g[i]));
        if (bf16)
            for (int64_t i = 0; i < hidden; i++)
                g[i] = rnd(g[i], 1);
        for (int64_t i = 0; i < hidden; i++)
            g[i] *= u[i];
        store_row((char *)out + (size_t)(b * hidden) * es, g, hidden, bf16);
    }
    free(g);
    free(u);
    return 0;
}

/* dst = round(round(src * cos) + round(rotate_half(src) * sin)): HF's rotate-half RoPE */
static void rope(float *restrict dst, const float *restrict src, const float *restrict cs, const float *restrict sn,
                 int64_t hd, int bf16) {
    const int64_t half = hd / 2;
    for (int64_t i = 0; i < hd; i++) {
        const float rot = i < half ? -src[i + half] : src[i - half];
        dst[i] = rnd(rnd(src[i] * cs[i], bf16) + rnd(rot * sn[i], bf16), bf16);
    }
}

/* One decode step's attention for every row (see the file's head for layouts). Row b's new key and
 * value go to its cache slot at pos[b]; its query heads then attend to positions
 * [max(0, pos[b] - window + 1), pos[b]] of that slot (window 0: from 0), head h reading kv head
 * h / (nh / nkv). As the torch path rounds: scores rounded to the dtype, then scaled in fp32, an
 * fp32 softmax rounded to the dtype, and the weighted sum of values rounded once.
 * Returns 0, or -1 when scratch memory cannot be allocated (the cache may hold the new keys then). */
int dmoe_rope_attend(const void *qkv, int64_t m, int64_t nh, int64_t nkv, int64_t hd, const void *cos, const void *sin,
                     const int64_t *slot, const int64_t *pos, void *k_cache, void *v_cache, int64_t max_seq,
                     int64_t window, float scale, void *out, int bf16, int n_threads) {
    const size_t es = bf16 ? 2 : 4;
    const int64_t row = (nh + 2 * nkv) * hd, g = nh / nkv, kv_row = nkv * hd;
    float *q = malloc((size_t)(m * nh * hd) * sizeof(float));  /* every row's roped queries */
    float *scratch = malloc((size_t)(4 * hd) * sizeof(float));
    int failed = 0;
    if (!q || !scratch) {
        free(q);
        free(scratch);
        return -1;
    }
    float *cs = scratch, *sn = scratch + hd, *t = scratch + 2 * hd, *kr = scratch + 3 * hd;
    for (int64_t b = 0; b < m; b++) {  /* RoPE, and the new key and value into the cache */
        const char *src = (const char *)qkv + (size_t)(b * row) * es;
        load_row(cs, (const char *)cos + (size_t)(b * hd) * es, hd, bf16);
        load_row(sn, (const char *)sin + (size_t)(b * hd) * es, hd, bf16);
        for (int64_t h = 0; h < nh; h++) {
            load_row(t, src + (size_t)(h * hd) * es, hd, bf16);
            rope(q + (b * nh + h) * hd, t, cs, sn, hd, bf16);
        }
        const size_t at = (size_t)((slot[b] * max_seq + pos[b]) * kv_row) * es;
        for (int64_t h = 0; h < nkv; h++) {
            load_row(t, src + (size_t)((nh + h) * hd) * es, hd, bf16);
            rope(kr, t, cs, sn, hd, bf16);
            store_row((char *)k_cache + at + (size_t)(h * hd) * es, kr, hd, bf16);
        }
        memcpy((char *)v_cache + at, src + (size_t)((nh + nkv) * hd) * es, (size_t)kv_row * es);
    }
    free(scratch);
    if (n_threads < 1)
        n_threads = 1;
#pragma omp parallel num_threads(n_threads)
    {
        float *s = malloc((size_t)(g * max_seq) * sizeof(float));  /* this thread's scores, head by head */
        float *kf = malloc((size_t)(max_seq * hd) * sizeof(float)), *vf = malloc((size_t)(max_seq * hd) * sizeof(float));
        float *acc = malloc((size_t)(g * hd) * sizeof(float));
        int ok = s != NULL && kf != NULL && vf != NULL && acc != NULL;
#pragma omp atomic
        failed += !ok;
#pragma omp barrier
        if (!failed) {
#pragma omp for schedule(static)
            for (int64_t task = 0; task < m * nkv; task++) {
                const int64_t b = task / nkv, kh = task % nkv, p = pos[b];
                const int64_t lo = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0, n = p - lo + 1;
                const char *K = (const char *)k_cache + (size_t)(((slot[b] * max_seq + lo) * nkv + kh) * hd) * es;
                const char *V = (const char *)v_cache + (size_t)(((slot[b] * max_seq + lo) * nkv + kh) * hd) * es;
                const float *qh = q + (b * nh + kh * g) * hd;
                for (int64_t j = 0; j < n; j++) {  /* this kv head's keys and values in fp32, read once for its g query heads */
                    load_row(kf + j * hd, K + (size_t)(j * kv_row) * es, hd, bf16);
                    load_row(vf + j * hd, V + (size_t)(j * kv_row) * es, hd, bf16);
                }
                for (int64_t h = 0; h < g; h++) {
                    float *sh = s + h * n, mx, sum = 0.0f;
                    scores(sh, qh + h * hd, kf, n, hd, scale, bf16);
                    mx = sh[0];
                    for (int64_t j = 1; j < n; j++)
                        mx = sh[j] > mx ? sh[j] : mx;
#pragma omp simd reduction(+ : sum)
                    for (int64_t j = 0; j < n; j++) {
                        sh[j] = exp_f32(sh[j] - mx);
                        sum += sh[j];
                    }
                    const float inv = 1.0f / sum;
                    for (int64_t j = 0; j < n; j++)
                        sh[j] = rnd(sh[j] * inv, bf16);
                    weighted_sum(acc + h * hd, sh, vf, n, hd);
                }
                store_row((char *)out + (size_t)((b * nh + kh * g) * hd) * es, acc, g * hd, bf16);
            }
        }
        free(s);
        free(kf);
        free(vf);
        free(acc);
    }
    free(q);
    return failed ? -1 : 0;
}
