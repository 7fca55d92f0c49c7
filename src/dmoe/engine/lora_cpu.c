/* Multi-LoRA for CPU decode steps: every row's adapter deltas added into its output, in one call.
 *
 * Built at first use by dmoe/engine/native.py (the system C compiler, -O3 -march=native,
 * cached under $DMOE_HOME/native) and called through ctypes. The torch path in lora_ops.py is
 * the reference it is tested against; this file only makes decode steps cheap. A decode step of
 * 8 rows runs 120 LoRA sites; there, each site's two oneDNN matmuls and a multiply cost about
 * 85 us, mostly call overhead and packing, for a few hundred thousand multiply-adds. Here a site
 * is one call with fp32 accumulation throughout, on an OpenMP team of torch's own libgomp (the
 * build links it, so the threads are torch's: no second pool spinning on the same cores).
 * Work is split by A's rows (the shrink) and by blocks of output columns (the expand).
 *
 * Layout (as AdapterSlots keeps it, for a slot range of S slots):
 *   A: (S, P, r, d_in)   B: (S, P, r, d_out), part j's B in columns [off[j], off[j] + len[j])
 *   w: (M / T, S) fp32, the weight each sequence gives each slot (0 = unused); rows m*T..m*T+T-1
 *      are sequence m's T tokens (t_per_w = T: 1 in a decode step)
 * For each slot s and each row m with w[m, s] != 0:
 *   xa = w[m, s] * (A[s] @ x[m])                     (P*r values, fp32)
 *   y[m, off[j]:off[j]+len[j]] += xa[j*r:(j+1)*r] @ B[s, j, :, off[j]:off[j]+len[j]]
 * The deltas are summed in fp32 and added into y once (one rounding for a bf16 y).
 * Only the columns a part owns are read: the zeros of the block-diagonal B are skipped.
 *
 * dtypes: x and y are bf16 or fp32 (x_bf16, y_bf16); the slots are bf16 or fp32 (slots_bf16).
 * Returns 0, or -1 when scratch memory cannot be allocated (nothing was written then).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_common.h"

#define CHUNK 128  /* output columns per block: CHUNK fp32 sums stay in registers (8 vectors: expand_chunk) */

/* xa[t, k] = w[row t] * (A row k . x[row t]) for every row t of one slot, from A row k in fp32 */
static void shrink_row(float *restrict xa, int64_t pr, int64_t k, const float *restrict a, const float *restrict xf,
                       int64_t d_in, const int64_t *rows, const float *wt, int64_t nr) {
    float tmp[LANES];
    int64_t t = 0;
    for (; t + 4 <= nr; t += 4) {  /* four rows at once (A's row read once), each summed as dot() does */
        const float *x0 = xf + rows[t] * d_in, *x1 = xf + rows[t + 1] * d_in;
        const float *x2 = xf + rows[t + 2] * d_in, *x3 = xf + rows[t + 3] * d_in;
        v16 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
        int64_t c = 0;
        for (; c + LANES <= d_in; c += LANES) {
            const v16 av = ld16(a + c);
            s0 += av * ld16(x0 + c);
            s1 += av * ld16(x1 + c);
            s2 += av * ld16(x2 + c);
            s3 += av * ld16(x3 + c);
        }
        const float *xs[4] = {x0, x1, x2, x3};
        v16 sv[4] = {s0, s1, s2, s3};
        for (int i = 0; i < 4; i++) {  /* the tail of d_in into the first lanes, as dot() does */
            st16(tmp, sv[i]);
            for (int l = 0; c + l < d_in; l++)
                tmp[l] += a[c + l] * xs[i][c + l];
            xa[(t + i) * pr + k] = wt[t + i] * lanes_sum(tmp);
        }
    }
    for (; t < nr; t++)
        xa[t * pr + k] = wt[t] * dot(a, xf + rows[t] * d_in, d_in);
}

/* acc[row t, c0:c0+n] += xa[t, k0:k0+r] @ b[:, 0:n] for every row t; b is (r, CHUNK) fp32, zero-padded.
 * Each column's sum runs over k in order; the CHUNK sums stay in registers. */
static void expand_chunk(float *restrict acc, int64_t d_out, int64_t c0, int64_t n, const float *restrict xa,
                         int64_t pr, int64_t k0, int64_t r, const float *restrict b, const int64_t *rows, int64_t nr) {
    float sum[CHUNK];
    for (int64_t t = 0; t < nr; t++) {
        v16 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0}, s4 = {0}, s5 = {0}, s6 = {0}, s7 = {0};
        const float *a = xa + t * pr + k0;
        for (int64_t k = 0; k < r; k++) {
            const float c = a[k];
            const float *bk = b + k * CHUNK;
            s0 += c * ld16(bk);
            s1 += c * ld16(bk + 16);
            s2 += c * ld16(bk + 32);
            s3 += c * ld16(bk + 48);
            s4 += c * ld16(bk + 64);
            s5 += c * ld16(bk + 80);
            s6 += c * ld16(bk + 96);
            s7 += c * ld16(bk + 112);
        }
        st16(sum, s0);
        st16(sum + 16, s1);
        st16(sum + 32, s2);
        st16(sum + 48, s3);
        st16(sum + 64, s4);
        st16(sum + 80, s5);
        st16(sum + 96, s6);
        st16(sum + 112, s7);
        float *o = acc + rows[t] * d_out + c0;
        for (int64_t q = 0; q < n; q++)
            o[q] += sum[q];
    }
}

/* A site: one layer's slot range, as NativeLoRA.site checked it (native.py's Site mirrors it).
 * Passed by address, so a call converts nine arguments instead of nineteen. */
struct lora_site {
    const void *A, *B;
    int64_t slots_bf16, n_slots, n_parts, r;
    const int64_t *off, *len;
    int64_t d_in, d_out;
};

int dmoe_lora_add(const struct lora_site *site, int64_t m, const void *x, int x_bf16, void *y, int y_bf16,
                  const float *w, int64_t t_per_w, int n_threads) {
    const void *A = site->A, *B = site->B;
    const int slots_bf16 = (int)site->slots_bf16;
    const int64_t n_slots = site->n_slots, n_parts = site->n_parts, r = site->r, d_in = site->d_in, d_out = site->d_out;
    const int64_t *off = site->off, *len = site->len;
    const int64_t x_stride = d_in, y_stride = d_out;  /* contiguous rows */
    const int64_t pr = n_parts * r;
    const size_t xs = x_bf16 ? 2 : 4, ys = y_bf16 ? 2 : 4, ss = slots_bf16 ? 2 : 4;
    int64_t n_chunks = 0;  /* B's work items: CHUNK columns of one part */
    for (int64_t j = 0; j < n_parts; j++)
        n_chunks += (len[j] + CHUNK - 1) / CHUNK;
    float *xf = malloc((size_t)(m * d_in) * sizeof(float));
    float *acc = malloc((size_t)(m * d_out) * sizeof(float));
    float *xa = malloc((size_t)(m * pr) * sizeof(float));
    float *slot_w = malloc((size_t)(n_slots * m) * sizeof(float));          /* each slot's rows' weights */
    int64_t *slot_rows = malloc((size_t)(n_slots * m) * sizeof(int64_t));  /* each slot's rows */
    int64_t *n_rows = calloc((size_t)n_slots, sizeof(int64_t));
    int64_t *used = malloc((size_t)m * sizeof(int64_t));
    int64_t *chunk_part = malloc((size_t)(n_chunks + 1) * sizeof(int64_t));
    int rc = -1, failed = 0;
    if (!xf || !acc || !xa || !slot_w || !slot_rows || !n_rows || !used || !chunk_part)
        goto done;
    int64_t n_used = 0;  /* rows with any adapter: the only rows read, summed and written */
    for (int64_t i = 0; i < m; i++) {
        int any = 0;
        const float *wi = w + (i / t_per_w) * n_slots;  /* a sequence's tokens share its weights */
        for (int64_t s = 0; s < n_slots; s++)
            if (wi[s] != 0.0f) {
                slot_rows[s * m + n_rows[s]] = i;
                slot_w[s * m + n_rows[s]++] = wi[s];
                any = 1;
            }
        if (any)
            used[n_used++] = i;
    }
    for (int64_t j = 0, c = 0; j < n_parts; j++)
        for (int64_t c0 = 0; c0 < len[j]; c0 += CHUNK)
            chunk_part[c++] = j;
    if (n_threads < 1)
        n_threads = 1;
#pragma omp parallel num_threads(n_threads)
    {
        float *a = malloc((size_t)d_in * sizeof(float));          /* this thread's A row in fp32 */
        float *b = malloc((size_t)(r * CHUNK) * sizeof(float));   /* this thread's B block in fp32 */
        int ok = a != NULL && b != NULL;
#pragma omp atomic
        failed += !ok;
#pragma omp barrier
        if (!failed) {
#pragma omp for schedule(static)
            for (int64_t u = 0; u < n_used; u++) {
                const int64_t i = used[u];
                load_row(xf + i * d_in, (const char *)x + (size_t)(i * x_stride) * xs, d_in, x_bf16);
                memset(acc + i * d_out, 0, (size_t)d_out * sizeof(float));
            }
            for (int64_t s = 0; s < n_slots; s++) {
                const int64_t nr = n_rows[s], *rows = slot_rows + s * m;
                const float *wt = slot_w + s * m;
                if (nr == 0)
                    continue;
                const char *As = (const char *)A + (size_t)(s * pr * d_in) * ss;
                const char *Bs = (const char *)B + (size_t)(s * pr * d_out) * ss;
#pragma omp for schedule(static)
                for (int64_t k = 0; k < pr; k++) {  /* shrink: each A row read once, for all rows */
                    load_row(a, As + (size_t)(k * d_in) * ss, d_in, slots_bf16);
                    shrink_row(xa, pr, k, a, xf, d_in, rows, wt, nr);
                }
#pragma omp for schedule(static)
                for (int64_t c = 0; c < n_chunks; c++) {  /* expand: each part's own columns of B only */
                    const int64_t j = chunk_part[c];
                    int64_t first = 0;
                    for (int64_t q = 0; q < j; q++)
                        first += (len[q] + CHUNK - 1) / CHUNK;
                    const int64_t c0 = (c - first) * CHUNK;
                    const int64_t n = len[j] - c0 < CHUNK ? len[j] - c0 : CHUNK;
                    for (int64_t k = 0; k < r; k++) {
                        load_row(b + k * CHUNK, Bs + (size_t)((j * r + k) * d_out + off[j] + c0) * ss, n, slots_bf16);
                        for (int64_t q = n; q < CHUNK; q++)
                            b[k * CHUNK + q] = 0.0f;
                    }
                    expand_chunk(acc, d_out, off[j] + c0, n, xa, pr, j * r, r, b, rows, nr);
                }
            }
#pragma omp for schedule(static)
            for (int64_t u = 0; u < n_used; u++) {  /* one rounding into y */
                const int64_t i = used[u];
                const float *ai = acc + i * d_out;
                if (y_bf16) {
                    uint16_t *yi = (uint16_t *)((char *)y + (size_t)(i * y_stride) * ys);
                    for (int64_t c = 0; c < d_out; c++)
                        yi[c] = f32_to_bf16(bf16_to_f32(yi[c]) + ai[c]);
                } else {
                    float *yi = (float *)((char *)y + (size_t)(i * y_stride) * ys);
                    for (int64_t c = 0; c < d_out; c++)
                        yi[c] += ai[c];
                }
            }
        }
        free(a);
        free(b);
    }
    rc = failed ? -1 : 0;
done:
    free(xf);
    free(acc);
    free(xa);
    free(slot_w);
    free(slot_rows);
    free(n_rows);
    free(used);
    free(chunk_part);
    return rc;
}
