/* sm_quant.h - compact weight matrices for inference (issue 16's kernels): bf16 and int8 copies
 * of a float32 (K, N) matrix, and the matrix-vector products of decoding that read them - the
 * bytes a decode step must stream are what bounds it, so half or a quarter of them is the way
 * past the float32 wall.
 *
 * Formats (a matrix W of K rows and N columns, row-major, as the model stores its (in, out)
 * weights):
 *   SM_QBF16: each value rounded to bf16 (nearest even), 2 bytes;
 *   SM_QI8:   int8 codes with one float32 scale per (group of `group` rows, column): scale =
 *             max |W[k, n]| over the group / 127, code = round(W / scale), in [-127, 127].
 *             group = K: one scale per output column (per output channel); a smaller group
 *             (a divisor of K, like llama.cpp's blocks of 32) follows outliers more closely.
 * W~ below is the matrix the codes stand for (bf16 values; scale * code).
 *
 * Products: y[b, n] = sum_k x[b, k] W~[k, n] for the rows b < M of x and a range of columns, or
 * over a range of k (a thread's share of the rows of W, for a sum of partial products). For each
 * (b, n) the arithmetic is fixed: float32 FMAs over k in order (int8: within each group, then the
 * group's sum times its scale added to the total in group order), so the bits do not depend on
 * M (a row batched equals the row alone), on the column range (the thread split) or on the
 * SIMD width within one level. The generic and AVX-512 paths may differ in the last bits. */
#ifndef SM_QUANT_H
#define SM_QUANT_H

#include <string.h>

#include "sm_common.h"

enum { SM_QBF16 = 1, SM_QI8 = 2 };

/* Run CASE(BF, M) with BF = (bf16 != 0) and M = min(m, 4) as compile-time constants: the
 * kernels inline one body per (format, row count) so their accumulators stay in registers.
 * CASE must end with `return;`. */
#define SM_QDISPATCH_M(BF, m, CASE)                                                                \
    switch (m) {                                                                                   \
    case 1: CASE(BF, 1)                                                                            \
    case 2: CASE(BF, 2)                                                                            \
    case 3: CASE(BF, 3)                                                                            \
    default: CASE(BF, 4)                                                                           \
    }
#define SM_QDISPATCH(bf16, m, CASE)                                                                \
    do {                                                                                           \
        if (bf16) {                                                                                \
            SM_QDISPATCH_M(1, m, CASE)                                                             \
        }                                                                                          \
        SM_QDISPATCH_M(0, m, CASE)                                                                 \
    } while (0)

/* float32 -> bf16 bits, round to nearest even (finite inputs), and back (exact). */
static inline uint16_t sm_bf16_round(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float sm_bf16_widen(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

typedef struct sm_qmat {
    int fmt;              /* SM_QBF16 or SM_QI8 */
    int64_t K, N;         /* rows, columns */
    int64_t group;        /* SM_QI8: rows per scale (divides K); SM_QBF16: K */
    const void *codes;    /* K * N uint16 (bf16 bits) or int8, row-major */
    const float *scales;  /* SM_QI8: (K / group) * N, row-major; SM_QBF16: NULL */
} sm_qmat;

/* Quantize W (K, N), row stride ldw, into codes (K * N) and, for int8, scales ((K / group) * N).
 * SM_ERR_ARG for a group that does not divide K, a non-finite value, or a bad format. */
int sm_quantize(int fmt, int64_t K, int64_t N, int64_t group, const float *W, int64_t ldw,
                void *codes, float *scales);
/* The same for the dots form's layout: Wt (N, K), row stride ldw, groups of `group` values
 * along each row; scales (N, K / group). */
int sm_quantize_t(int fmt, int64_t N, int64_t K, int64_t group, const float *Wt, int64_t ldw,
                  void *codes, float *scales);

/* W~ as float32 (K, N) into out (row stride N); `transposed`: q is in the dots layout and out
 * receives Wt~ (N, K). */
void sm_dequantize(const sm_qmat *q, int transposed, float *out);

/* Row r of a dots-layout matrix, Wt~[r, :] (K floats), into out. */
void sm_qmat_row(const sm_qmat *q, int64_t r, float *out);

/* Rows [k0, k1) of a rows-layout matrix, W~ as float32, into out (row stride N), split over
 * nthreads threads (the prefill's products then run on it). */
void sm_dequantize_rows(const sm_qmat *q, int64_t k0, int64_t k1, float *out, int nthreads);

/* y[b, n] = sum_{k in [k0, k1)} x[b, k] W~[k, n] for b < M, n in [n0, n1); x row stride ldx, y
 * row stride ldy. For int8 each group's part of [k0, k1) is summed, times the group's scale,
 * and added in order (a range inside one group: one part). Serial: the caller splits columns or
 * k-ranges between threads. SM_ERR_ARG on bad ranges. */
int sm_qgemv(const sm_qmat *q, int64_t M, const float *x, int64_t ldx, int64_t k0, int64_t k1,
             int64_t n0, int64_t n1, float *y, int64_t ldy);

/* The "dots" form for a matrix stored transposed, as the LM head reads the token embedding:
 * q holds Wt (N rows of K values: the (N, K) matrix, group along K per row), and
 * y[b, n] = sum_k x[b, k] Wt~[n, k] for n in [n0, n1). Serial. */
int sm_qgemv_dots(const sm_qmat *q, int64_t M, const float *x, int64_t ldx, int64_t n0, int64_t n1,
                  float *y, int64_t ldy);

#endif /* SM_QUANT_H */
