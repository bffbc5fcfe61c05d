/* sm_attention.c - causal multi-head attention: tiled forward with online softmax, tiled
 * backward that recomputes probabilities from the saved log-sum-exp, KV-cache prefill/append
 * and a decode step, each with a *_naive reference. Layouts are described in sm_attention.h.
 *
 * Tiling. A work item is one head's block of BLK = 64 queries (forward) or one whole head
 * (backward). Score tiles are held TRANSPOSED, S^T (keys x queries), so that queries run along
 * the SIMD lanes: the softmax of a query is then a column of the tile, and its running max,
 * sum and the probabilities are plain lane-wise vector ops, with no horizontal reductions.
 * Every product in both passes has the form
 *
 *     C (m x W)  (+)=  A (m x K)  @  B (K x W)         (mm: a small GEMM micro-kernel)
 *
 * where A is read by scalar broadcasts through any two strides (so it can be K rows straight
 * from qkv, or a tile read transposed) and B rows are W contiguous floats (W a multiple of
 * 16): the queries of the tile transposed (W = 64) or rows of hs values (W = hs rounded up to
 * 16, read in place from qkv when hs % 16 == 0, else from a zero-padded copy).
 *
 *   forward, per query block I:   QT = Q_I^T (hs x 64, packed once)
 *     for key blocks J <= I:      S^T = K_J @ QT;  online softmax over the rows of S^T
 *                                 O = diag(alpha) O + P @ V_J   (P read from S^T transposed)
 *     out = O / l;  lse = m + log(l)
 *   backward, per head:           QT, dOT (each query block transposed, packed once),
 *                                 D = rowsum(dO * O)
 *     for key blocks J:
 *       for query blocks I >= J:  S^T = K_J @ QT_I,  dP^T = V_J @ dOT_I
 *                                 P = exp(scale S - lse),  dS = P (dP - D) scale
 *                                 dV_J += P^T dO_I,  dK_J += dS^T Q_I,  dQ_I += dS K_J
 *   (the gradient products accumulate straight into dqkv when hs % 16 == 0)
 *
 * On a diagonal tile (I == J) the products skip, in whole register tiles, the masked triangle:
 * score entries no query uses and k ranges where P or dS is exactly zero (see TRI_*).
 *
 * Memory: forward saves only lse (B, NH, T); scratch is a few tiles per thread (forward) or
 * O(T hs) per thread (backward), never the (B, NH, T, T) attention matrix.
 *
 * Determinism: a work item's arithmetic depends only on its own data (fixed tile sizes, fixed
 * loop order), and each output element is written by exactly one item, so results do not
 * depend on the thread count. They do differ (by rounding) between SIMD levels.
 *
 * exp: a Cephes-style polynomial in every path (libm's expf would cost more than the matrix
 * products it sits between), within 1 ulp on [-87, 0]; it flushes to exactly 0 below ln(FLT_MIN)
 * (so -inf, the mask, gives 0) and keeps NaN.
 *
 * Known limit: a NaN or inf in the key or value of a FUTURE position that falls in the same
 * register tile of a diagonal tile can reach an earlier output (0 * NaN); finite values there
 * never change a result.
 */
#include "sm_attention.h"

#include <math.h>
#include <string.h>

#include "sm_hash.h"
#include "sm_pool.h"
#include "sm_vecmath.h"
#include "sm_runtime.h"

#if SM_X86_KERNELS
#include <immintrin.h>
#endif

#define BLK SM_ATT_BLOCK

/* Offset of position t, dimension d in one head's key cache (T_max / BLK, hs, BLK). */
static int64_t kc_index(int64_t t, int64_t d, int64_t hs) { return (t / BLK) * hs * BLK + d * BLK + t % BLK; }

/* Attention counts its work in multiply-adds; sm_team_size counts streaming element operations.
 * A multiply-add of the register-tiled products here costs about 1/16 of one (16 lanes per
 * FMA, operands in registers and L1), so a thread needs 16 * SM_TEAM_MIN_WORK = 512k of them:
 * no team below 1M multiply-adds in all. */
#define MACS_PER_OP 16.0

/* ============================================================================================
 * references (double accumulation, exact softmax)
 * ============================================================================================ */

/* The mask of an attention-dropout request, in *storage; NULL when there is no dropout. */
static const sm_drop_mask *att_mask_of(const sm_att_dropout *drop, sm_drop_mask *storage,
                                       int64_t *batch_offset) {
    *batch_offset = 0;
    if (!drop || !(drop->p > 0.0f)) return NULL;
    *storage = sm_drop_mask_make(drop->p, drop->seed, drop->stream);
    *batch_offset = drop->batch_offset;
    return storage;
}

/* The dropout factor of (sequence b, head h, query t, key j), or 1 without dropout. */
static double att_factor(const sm_drop_mask *m, const sm_att_dropout *drop, int64_t b,
                         int64_t h, int64_t t, int64_t j, int64_t NH, int64_t T) {
    if (!m) return 1.0;
    uint64_t e = ((uint64_t)((b + drop->batch_offset) * NH + h) * (uint64_t)T + (uint64_t)t) * (uint64_t)T + (uint64_t)j;
    return sm_drop_factor(m, e);
}

int sm_attention_forward_naive(float *out, float *lse, const float *qkv, int64_t B, int64_t T,
                               int64_t C, int64_t NH) {
    return sm_attention_forward_naive_ex(out, lse, qkv, B, T, C, NH, NULL);
}

int sm_attention_forward_naive_ex(float *out, float *lse, const float *qkv, int64_t B, int64_t T,
                                  int64_t C, int64_t NH, const sm_att_dropout *drop) {
    /* qkv (B, T, 3C), out (B, T, C), lse (B, NH, T) */
    if (B <= 0 || T <= 0 || C <= 0 || NH <= 0) return SM_OK;
    sm_drop_mask mask;
    int64_t boff;
    const sm_drop_mask *m = att_mask_of(drop, &mask, &boff);
    const int64_t hs = C / NH, C3 = 3 * C;
    const double scale = 1.0 / sqrt((double)hs);
    double *s = (double *)sm_aligned_alloc((size_t)T * sizeof(double));
    if (!s) return SM_ERR_NOMEM;
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < NH; h++)
            for (int64_t t = 0; t < T; t++) {
                const float *q = qkv + (b * T + t) * C3 + h * hs;
                double mx = -INFINITY;
                for (int64_t j = 0; j <= t; j++) {
                    const float *k = qkv + (b * T + j) * C3 + C + h * hs;
                    double acc = 0.0;
                    for (int64_t d = 0; d < hs; d++) acc += (double)q[d] * (double)k[d];
                    s[j] = acc * scale;
                    if (s[j] > mx) mx = s[j];
                }
                double sum = 0.0;
                for (int64_t j = 0; j <= t; j++) {
                    s[j] = exp(s[j] - mx);
                    sum += s[j];
                }
                float *o = out + (b * T + t) * C + h * hs;
                for (int64_t d = 0; d < hs; d++) {
                    double acc = 0.0;
                    for (int64_t j = 0; j <= t; j++)
                        acc += s[j] * att_factor(m, drop, b, h, t, j, NH, T) *
                               (double)qkv[(b * T + j) * C3 + 2 * C + h * hs + d];
                    o[d] = (float)(acc / sum);
                }
                lse[(b * NH + h) * T + t] = (float)(mx + log(sum));
            }
    sm_aligned_free(s);
    return SM_OK;
}

int sm_attention_backward_naive(float *dqkv, const float *dout, const float *qkv,
                                const float *out, const float *lse, int64_t B, int64_t T,
                                int64_t C, int64_t NH) {
    return sm_attention_backward_naive_ex(dqkv, dout, qkv, out, lse, B, T, C, NH, NULL);
}

int sm_attention_backward_naive_ex(float *dqkv, const float *dout, const float *qkv,
                                   const float *out, const float *lse, int64_t B, int64_t T,
                                   int64_t C, int64_t NH, const sm_att_dropout *drop) {
    /* dqkv (B, T, 3C) +=, dout (B, T, C), qkv (B, T, 3C); out and lse unused (recomputed).
     * With dropout factors f: out = (P f) V, so dV = (P f)^T dO and dP = f (dO V^T). */
    (void)out;
    (void)lse;
    if (B <= 0 || T <= 0 || C <= 0 || NH <= 0) return SM_OK;
    sm_drop_mask mask;
    int64_t boff;
    const sm_drop_mask *m = att_mask_of(drop, &mask, &boff);
    const int64_t hs = C / NH, C3 = 3 * C;
    const double scale = 1.0 / sqrt((double)hs);
    /* p, dp (T); dq, dk, dv (T, hs) in double for this head */
    double *buf = (double *)sm_aligned_alloc((size_t)(2 * T + 3 * T * hs) * sizeof(double));
    if (!buf) return SM_ERR_NOMEM;
    double *p = buf, *dp = p + T, *dq = dp + T, *dk = dq + T * hs, *dv = dk + T * hs;
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < NH; h++) {
            memset(dq, 0, (size_t)(3 * T * hs) * sizeof(double));
            for (int64_t t = 0; t < T; t++) {
                const float *q = qkv + (b * T + t) * C3 + h * hs;
                const float *go = dout + (b * T + t) * C + h * hs;
                double mx = -INFINITY, sum = 0.0;
                for (int64_t j = 0; j <= t; j++) {
                    const float *k = qkv + (b * T + j) * C3 + C + h * hs;
                    double acc = 0.0;
                    for (int64_t d = 0; d < hs; d++) acc += (double)q[d] * (double)k[d];
                    p[j] = acc * scale;
                    if (p[j] > mx) mx = p[j];
                }
                for (int64_t j = 0; j <= t; j++) {
                    p[j] = exp(p[j] - mx);
                    sum += p[j];
                }
                double pdp = 0.0;
                for (int64_t j = 0; j <= t; j++) {
                    const float *v = qkv + (b * T + j) * C3 + 2 * C + h * hs;
                    p[j] /= sum;
                    double acc = 0.0;
                    for (int64_t d = 0; d < hs; d++) acc += (double)go[d] * (double)v[d];
                    dp[j] = acc * att_factor(m, drop, b, h, t, j, NH, T);
                    pdp += p[j] * dp[j];
                }
                for (int64_t j = 0; j <= t; j++) {
                    const float *k = qkv + (b * T + j) * C3 + C + h * hs;
                    double ds = p[j] * (dp[j] - pdp) * scale;
                    double pf = p[j] * att_factor(m, drop, b, h, t, j, NH, T);
                    for (int64_t d = 0; d < hs; d++) {
                        dq[t * hs + d] += ds * (double)k[d];
                        dk[j * hs + d] += ds * (double)q[d];
                        dv[j * hs + d] += pf * (double)go[d];
                    }
                }
            }
            for (int64_t t = 0; t < T; t++) {
                float *g = dqkv + (b * T + t) * C3 + h * hs;
                for (int64_t d = 0; d < hs; d++) {
                    g[d] += (float)dq[t * hs + d];
                    g[C + d] += (float)dk[t * hs + d];
                    g[2 * C + d] += (float)dv[t * hs + d];
                }
            }
        }
    sm_aligned_free(buf);
    return SM_OK;
}

int sm_attention_decode_naive(float *out, const float *q, const float *k_cache,
                              const float *v_cache, const int *lengths, int64_t q_stride,
                              int64_t B, int64_t NH, int64_t T_max, int64_t hs) {
    /* out (B, NH*hs), q (B, q_stride), k_cache (B, NH, T_max / BLK, hs, BLK),
     * v_cache (B, NH, T_max, hs), lengths (B) */
    if (B <= 0 || NH <= 0 || hs <= 0 || T_max <= 0) return SM_OK;
    const double scale = 1.0 / sqrt((double)hs);
    double *s = (double *)sm_aligned_alloc((size_t)T_max * sizeof(double));
    if (!s) return SM_ERR_NOMEM;
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < NH; h++) {
            const int64_t L = lengths[b];
            const float *qh = q + b * q_stride + h * hs;
            const float *kt = k_cache + (b * NH + h) * hs * T_max;
            const float *v = v_cache + (b * NH + h) * T_max * hs;
            double mx = -INFINITY, sum = 0.0;
            for (int64_t j = 0; j < L; j++) {
                double acc = 0.0;
                for (int64_t d = 0; d < hs; d++) acc += (double)qh[d] * (double)kt[kc_index(j, d, hs)];
                s[j] = acc * scale;
                if (s[j] > mx) mx = s[j];
            }
            for (int64_t j = 0; j < L; j++) {
                s[j] = exp(s[j] - mx);
                sum += s[j];
            }
            for (int64_t d = 0; d < hs; d++) {
                double acc = 0.0;
                for (int64_t j = 0; j < L; j++) acc += s[j] * (double)v[j * hs + d];
                out[b * NH * hs + h * hs + d] = (float)(acc / sum);
            }
        }
    sm_aligned_free(s);
    return SM_OK;
}

/* ============================================================================================
 * mm: C (m x W) (+)= A (m x K) @ B (K x W)
 *   A(i, k) = a[i * ars + k * aks] (read by broadcasts), B row k = b + k * ldb (W floats,
 *   W % 16 == 0), C row i = c + i * ldc. acc = 0 overwrites C; acc = 1 adds to it, after
 *   scaling row i by rs[i] when rs is not NULL (the FMA chain starts from that value), which
 *   is how the online softmax rescales its running output for free. C must not overlap A, B.
 *   tri skips the parts of a diagonal tile (row, column and k indices are then positions that
 *   compare) whose results are never used or are sums of exact zeros; rows are handled in
 *   register tiles, so a little of the skippable work is still done (it is harmless):
 * ============================================================================================ */

enum {
    TRI_NONE = 0,
    TRI_COLS = 1,   /* row i of C is only needed in columns >= i (scores: key rows, query lanes) */
    TRI_K_UPTO = 2, /* A(i, k) == 0 for k > i (P or dS with query rows, keys along k) */
    TRI_K_FROM = 3  /* A(i, k) == 0 for k < i (P^T or dS^T with key rows, queries along k) */
};

typedef void (*mm_fn)(int64_t m, int64_t W, int64_t K, const float *a, int64_t ars, int64_t aks,
                      const float *b, int64_t ldb, float *c, int64_t ldc, int acc,
                      const float *rs, int tri);

/* The k range [*k0, *k1) a register tile of rows [i, i + mr) needs. */
SM_INLINE void tri_k_range(int tri, int64_t i, int64_t mr, int64_t K, int64_t *k0, int64_t *k1) {
    *k0 = 0;
    *k1 = K;
    if (tri == TRI_K_UPTO) *k1 = sm_min64(K, i + mr);
    if (tri == TRI_K_FROM) *k0 = sm_min64(K, i);
}

static void mm_generic(int64_t m, int64_t W, int64_t K, const float *SM_RESTRICT a, int64_t ars,
                       int64_t aks, const float *SM_RESTRICT b, int64_t ldb, float *SM_RESTRICT c,
                       int64_t ldc, int acc, const float *rs, int tri) {
    for (int64_t c0 = 0; c0 < W; c0 += 16)
        for (int64_t i0 = 0; i0 < m; i0 += 4) {
            if (tri == TRI_COLS && c0 + 16 <= i0) continue;
            const int mr = (int)sm_min64(4, m - i0);
            int64_t k0, k1;
            tri_k_range(tri, i0, mr, K, &k0, &k1);
            float t[4][16];
            for (int r = 0; r < mr; r++) {
                const float f = rs ? rs[i0 + r] : 1.0f;
                for (int v = 0; v < 16; v++) t[r][v] = acc ? c[(i0 + r) * ldc + c0 + v] * f : 0.0f;
            }
            for (int64_t k = k0; k < k1; k++) {
                const float *bk = b + k * ldb + c0;
                for (int r = 0; r < mr; r++) {
                    const float x = a[(i0 + r) * ars + k * aks];
                    for (int v = 0; v < 16; v++) t[r][v] += x * bk[v];
                }
            }
            for (int r = 0; r < mr; r++)
                for (int v = 0; v < 16; v++) c[(i0 + r) * ldc + c0 + v] = t[r][v];
        }
}

#if SM_X86_KERNELS

/* AVX-512: up to 6 rows x 4 vectors (64 columns): 24 accumulators + 4 B vectors + 1 broadcast.
 * Called with constant mr, nv so the tile lives in registers. */
SM_TARGET_AVX512 SM_INLINE void tile_512(const int mr, const int nv, int64_t K, const float *a,
                                         int64_t ars, int64_t aks, const float *b, int64_t ldb,
                                         float *c, int64_t ldc, int acc, const float *rs) {
    __m512 t[6][4];
    for (int r = 0; r < mr; r++) {
        const __m512 f = _mm512_set1_ps(rs ? rs[r] : 1.0f);
        for (int v = 0; v < nv; v++)
            t[r][v] = acc ? _mm512_mul_ps(f, _mm512_loadu_ps(c + r * ldc + 16 * v)) : _mm512_setzero_ps();
    }
    const float *ar[6];
    for (int r = 0; r < mr; r++) ar[r] = a + r * ars;
    for (int64_t k = 0; k < K; k++) {
        __m512 bv[4];
        for (int v = 0; v < nv; v++) bv[v] = _mm512_loadu_ps(b + 16 * v);
        for (int r = 0; r < mr; r++) {
            const __m512 x = _mm512_set1_ps(ar[r][k * aks]);
            for (int v = 0; v < nv; v++) t[r][v] = _mm512_fmadd_ps(x, bv[v], t[r][v]);
        }
        b += ldb;
    }
    for (int r = 0; r < mr; r++)
        for (int v = 0; v < nv; v++) _mm512_storeu_ps(c + r * ldc + 16 * v, t[r][v]);
}

#define T512(MR, NV) tile_512(MR, NV, kn, ai, ars, aks, bi, ldb, ci, ldc, acc, ri)
#define T512_NV(MR)                          \
    case MR * 8 + 4: T512(MR, 4); break;     \
    case MR * 8 + 3: T512(MR, 3); break;     \
    case MR * 8 + 2: T512(MR, 2); break;     \
    case MR * 8 + 1: T512(MR, 1); break;

SM_TARGET_AVX512
static void mm_avx512(int64_t m, int64_t W, int64_t K, const float *a, int64_t ars, int64_t aks,
                      const float *b, int64_t ldb, float *c, int64_t ldc, int acc,
                      const float *rs, int tri) {
    for (int64_t c0 = 0; c0 < W; c0 += 64) {
        const int64_t nvc = sm_min64(4, (W - c0) / 16);
        for (int64_t i = 0; i < m; i += 6) {
            const int64_t mr = sm_min64(6, m - i);
            int64_t v0 = 0, k0, k1;
            if (tri == TRI_COLS) v0 = i / 16 - c0 / 16 > 0 ? i / 16 - c0 / 16 : 0;
            if (v0 >= nvc) continue;
            tri_k_range(tri, i, mr, K, &k0, &k1);
            const int64_t kn = k1 - k0;
            const float *ai = a + i * ars + k0 * aks, *ri = rs ? rs + i : NULL;
            const float *bi = b + k0 * ldb + c0 + 16 * v0;
            float *ci = c + i * ldc + c0 + 16 * v0;
            switch (mr * 8 + (nvc - v0)) {
                T512_NV(6) T512_NV(5) T512_NV(4) T512_NV(3) T512_NV(2) T512_NV(1)
            default: break;
            }
        }
    }
}
#undef T512_NV
#undef T512

/* AVX2: up to 6 rows x 2 vectors (16 columns): 12 accumulators, 2 B vectors, 1 broadcast. */
SM_TARGET_AVX2 SM_INLINE void tile_256(const int mr, int64_t K, const float *a, int64_t ars,
                                       int64_t aks, const float *b, int64_t ldb, float *c,
                                       int64_t ldc, int acc, const float *rs) {
    __m256 t[6][2];
    for (int r = 0; r < mr; r++) {
        const __m256 f = _mm256_set1_ps(rs ? rs[r] : 1.0f);
        for (int v = 0; v < 2; v++)
            t[r][v] = acc ? _mm256_mul_ps(f, _mm256_loadu_ps(c + r * ldc + 8 * v)) : _mm256_setzero_ps();
    }
    const float *ar[6];
    for (int r = 0; r < mr; r++) ar[r] = a + r * ars;
    for (int64_t k = 0; k < K; k++) {
        const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
        for (int r = 0; r < mr; r++) {
            const __m256 x = _mm256_broadcast_ss(ar[r] + k * aks);
            t[r][0] = _mm256_fmadd_ps(x, b0, t[r][0]);
            t[r][1] = _mm256_fmadd_ps(x, b1, t[r][1]);
        }
        b += ldb;
    }
    for (int r = 0; r < mr; r++)
        for (int v = 0; v < 2; v++) _mm256_storeu_ps(c + r * ldc + 8 * v, t[r][v]);
}

SM_TARGET_AVX2
static void mm_avx2(int64_t m, int64_t W, int64_t K, const float *a, int64_t ars, int64_t aks,
                    const float *b, int64_t ldb, float *c, int64_t ldc, int acc, const float *rs,
                    int tri) {
    for (int64_t c0 = 0; c0 < W; c0 += 16)
        for (int64_t i = 0; i < m; i += 6) {
            if (tri == TRI_COLS && c0 + 16 <= i) break; /* later row tiles start further right */
            const int64_t mr = sm_min64(6, m - i);
            int64_t k0, k1;
            tri_k_range(tri, i, mr, K, &k0, &k1);
            const float *ai = a + i * ars + k0 * aks, *bi = b + k0 * ldb + c0, *ri = rs ? rs + i : NULL;
            float *ci = c + i * ldc + c0;
            switch (mr) {
            case 6: tile_256(6, k1 - k0, ai, ars, aks, bi, ldb, ci, ldc, acc, ri); break;
            case 5: tile_256(5, k1 - k0, ai, ars, aks, bi, ldb, ci, ldc, acc, ri); break;
            case 4: tile_256(4, k1 - k0, ai, ars, aks, bi, ldb, ci, ldc, acc, ri); break;
            case 3: tile_256(3, k1 - k0, ai, ars, aks, bi, ldb, ci, ldc, acc, ri); break;
            case 2: tile_256(2, k1 - k0, ai, ars, aks, bi, ldb, ci, ldc, acc, ri); break;
            default: tile_256(1, k1 - k0, ai, ars, aks, bi, ldb, ci, ldc, acc, ri); break;
            }
        }
}

#endif /* SM_X86_KERNELS */

static float dot_generic(const float *x, const float *y, int64_t n) {
    float acc = 0.0f;
    for (int64_t i = 0; i < n; i++) acc += x[i] * y[i];
    return acc;
}

#if SM_X86_KERNELS
SM_TARGET_AVX2 static float dot_avx2(const float *x, const float *y, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i), acc);
    float t[8];
    _mm256_storeu_ps(t, acc);
    float r = ((t[0] + t[4]) + (t[1] + t[5])) + ((t[2] + t[6]) + (t[3] + t[7]));
    for (; i < n; i++) r += x[i] * y[i];
    return r;
}
#endif

/* ============================================================================================
 * softmax pieces on a transposed score tile S^T (nk rows = keys, BLK lanes = queries)
 * ============================================================================================ */

/* Forward step of the online softmax. S (nk, BLK): raw scores in, unnormalised probabilities
 * exp(scale s - m_new) out. m, l (BLK): running max and sum, updated; alpha (BLK) out:
 * exp(m_old - m_new), the factor the running output must be scaled by. diag: the tile sits on
 * the diagonal (key j is masked for query lanes i < j). */
typedef void (*fwd_softmax_fn)(float *S, int64_t nk, int diag, float scale, float *m, float *l,
                               float *alpha);

/* Backward tile. S (nk, BLK): raw scores in, P = exp(scale s - lse) out; dP (nk, BLK): dP in,
 * dS = P (dP - D) scale out. Lanes i >= mq and masked keys give P = dS = 0. L, D (BLK). */
typedef void (*bwd_tile_fn)(float *S, float *dP, int64_t nk, int diag, int64_t mq, float scale,
                            const float *L, const float *D);

static void fwd_softmax_generic(float *S, int64_t nk, int diag, float scale, float *m, float *l,
                                float *alpha) {
    float mx[BLK], ls[BLK];
    for (int i = 0; i < BLK; i++) {
        mx[i] = m[i];
        ls[i] = 0.0f;
    }
    for (int64_t j = 0; j < nk; j++) {
        float *s = S + j * BLK;
        for (int i = 0; i < BLK; i++) {
            float x = (diag && i < j) ? -INFINITY : s[i] * scale;
            s[i] = x;
            mx[i] = x > mx[i] ? x : mx[i];
        }
    }
    for (int64_t j = 0; j < nk; j++) {
        float *s = S + j * BLK;
        for (int i = 0; i < BLK; i++) {
            float p = sm_exp_scalar(s[i] - mx[i]);
            s[i] = p;
            ls[i] += p;
        }
    }
    for (int i = 0; i < BLK; i++) {
        alpha[i] = sm_exp_scalar(m[i] - mx[i]);
        l[i] = l[i] * alpha[i] + ls[i];
        m[i] = mx[i];
    }
}

static void bwd_tile_generic(float *S, float *dP, int64_t nk, int diag, int64_t mq, float scale,
                             const float *L, const float *D) {
    for (int64_t j = 0; j < nk; j++) {
        float *s = S + j * BLK, *dp = dP + j * BLK;
        for (int i = 0; i < BLK; i++) {
            int valid = i < mq && !(diag && i < j);
            float p = valid ? sm_exp_scalar(s[i] * scale - L[i]) : 0.0f;
            s[i] = p;
            dp[i] = valid ? p * (dp[i] - D[i]) * scale : 0.0f;
        }
    }
}

#if SM_X86_KERNELS

SM_TARGET_AVX512
static void fwd_softmax_avx512(float *S, int64_t nk, int diag, float scale, float *m, float *l,
                               float *alpha) {
    const __m512 vs = _mm512_set1_ps(scale), ninf = _mm512_set1_ps(-INFINITY);
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int v = 0; v < BLK / 16; v++) {
        const __m512 lane = _mm512_add_ps(iota, _mm512_set1_ps((float)(16 * v)));
        const __m512 m_old = _mm512_loadu_ps(m + 16 * v);
        __m512 mx = m_old;
        /* on the diagonal, keys past this vector's last query are masked for all its lanes */
        const int64_t jend = diag ? sm_min64(nk, 16 * v + 16) : nk;
        for (int64_t j = jend; j < nk; j++) _mm512_storeu_ps(S + j * BLK + 16 * v, _mm512_setzero_ps());
        for (int64_t j = 0; j < jend; j++) {
            float *s = S + j * BLK + 16 * v;
            __m512 x = _mm512_mul_ps(_mm512_loadu_ps(s), vs);
            if (diag) x = _mm512_mask_mov_ps(x, _mm512_cmp_ps_mask(lane, _mm512_set1_ps((float)j), _CMP_LT_OQ), ninf);
            _mm512_storeu_ps(s, x);
            mx = _mm512_max_ps(mx, x);
        }
        __m512 ls = _mm512_setzero_ps();
        for (int64_t j = 0; j < jend; j++) {
            float *s = S + j * BLK + 16 * v;
            __m512 p = sm_exp_avx512(_mm512_sub_ps(_mm512_loadu_ps(s), mx));
            _mm512_storeu_ps(s, p);
            ls = _mm512_add_ps(ls, p);
        }
        const __m512 al = sm_exp_avx512(_mm512_sub_ps(m_old, mx));
        _mm512_storeu_ps(alpha + 16 * v, al);
        _mm512_storeu_ps(l + 16 * v, _mm512_fmadd_ps(_mm512_loadu_ps(l + 16 * v), al, ls));
        _mm512_storeu_ps(m + 16 * v, mx);
    }
}

SM_TARGET_AVX512
static void bwd_tile_avx512(float *S, float *dP, int64_t nk, int diag, int64_t mq, float scale,
                            const float *L, const float *D) {
    const __m512 vs = _mm512_set1_ps(scale);
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int v = 0; v < BLK / 16; v++) {
        const __m512 lane = _mm512_add_ps(iota, _mm512_set1_ps((float)(16 * v)));
        const __mmask16 live = _mm512_cmp_ps_mask(lane, _mm512_set1_ps((float)mq), _CMP_LT_OQ);
        const __m512 vl = _mm512_loadu_ps(L + 16 * v), vd = _mm512_loadu_ps(D + 16 * v);
        const int64_t jend = diag ? sm_min64(nk, 16 * v + 16) : nk;
        for (int64_t j = jend; j < nk; j++) {
            _mm512_storeu_ps(S + j * BLK + 16 * v, _mm512_setzero_ps());
            _mm512_storeu_ps(dP + j * BLK + 16 * v, _mm512_setzero_ps());
        }
        for (int64_t j = 0; j < jend; j++) {
            float *s = S + j * BLK + 16 * v, *dp = dP + j * BLK + 16 * v;
            __mmask16 ok = live;
            if (diag) ok &= _mm512_cmp_ps_mask(lane, _mm512_set1_ps((float)j), _CMP_GE_OQ);
            __m512 p = sm_exp_avx512(_mm512_fmsub_ps(_mm512_loadu_ps(s), vs, vl));
            p = _mm512_maskz_mov_ps(ok, p);
            __m512 ds = _mm512_mul_ps(_mm512_mul_ps(p, _mm512_sub_ps(_mm512_loadu_ps(dp), vd)), vs);
            _mm512_storeu_ps(s, p);
            _mm512_storeu_ps(dp, _mm512_maskz_mov_ps(ok, ds));
        }
    }
}

SM_TARGET_AVX2
static void fwd_softmax_avx2(float *S, int64_t nk, int diag, float scale, float *m, float *l,
                             float *alpha) {
    const __m256 vs = _mm256_set1_ps(scale), ninf = _mm256_set1_ps(-INFINITY);
    const __m256 iota = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
    for (int v = 0; v < BLK / 8; v++) {
        const __m256 lane = _mm256_add_ps(iota, _mm256_set1_ps((float)(8 * v)));
        const __m256 m_old = _mm256_loadu_ps(m + 8 * v);
        __m256 mx = m_old;
        const int64_t jend = diag ? sm_min64(nk, 8 * v + 8) : nk;
        for (int64_t j = jend; j < nk; j++) _mm256_storeu_ps(S + j * BLK + 8 * v, _mm256_setzero_ps());
        for (int64_t j = 0; j < jend; j++) {
            float *s = S + j * BLK + 8 * v;
            __m256 x = _mm256_mul_ps(_mm256_loadu_ps(s), vs);
            if (diag) x = _mm256_blendv_ps(x, ninf, _mm256_cmp_ps(lane, _mm256_set1_ps((float)j), _CMP_LT_OQ));
            _mm256_storeu_ps(s, x);
            mx = _mm256_max_ps(mx, x);
        }
        __m256 ls = _mm256_setzero_ps();
        for (int64_t j = 0; j < jend; j++) {
            float *s = S + j * BLK + 8 * v;
            __m256 p = sm_exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(s), mx));
            _mm256_storeu_ps(s, p);
            ls = _mm256_add_ps(ls, p);
        }
        const __m256 al = sm_exp_avx2(_mm256_sub_ps(m_old, mx));
        _mm256_storeu_ps(alpha + 8 * v, al);
        _mm256_storeu_ps(l + 8 * v, _mm256_fmadd_ps(_mm256_loadu_ps(l + 8 * v), al, ls));
        _mm256_storeu_ps(m + 8 * v, mx);
    }
}

SM_TARGET_AVX2
static void bwd_tile_avx2(float *S, float *dP, int64_t nk, int diag, int64_t mq, float scale,
                          const float *L, const float *D) {
    const __m256 vs = _mm256_set1_ps(scale);
    const __m256 iota = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
    for (int v = 0; v < BLK / 8; v++) {
        const __m256 lane = _mm256_add_ps(iota, _mm256_set1_ps((float)(8 * v)));
        const __m256 live = _mm256_cmp_ps(lane, _mm256_set1_ps((float)mq), _CMP_LT_OQ);
        const __m256 vl = _mm256_loadu_ps(L + 8 * v), vd = _mm256_loadu_ps(D + 8 * v);
        const int64_t jend = diag ? sm_min64(nk, 8 * v + 8) : nk;
        for (int64_t j = jend; j < nk; j++) {
            _mm256_storeu_ps(S + j * BLK + 8 * v, _mm256_setzero_ps());
            _mm256_storeu_ps(dP + j * BLK + 8 * v, _mm256_setzero_ps());
        }
        for (int64_t j = 0; j < jend; j++) {
            float *s = S + j * BLK + 8 * v, *dp = dP + j * BLK + 8 * v;
            __m256 ok = live;
            if (diag) ok = _mm256_and_ps(ok, _mm256_cmp_ps(lane, _mm256_set1_ps((float)j), _CMP_GE_OQ));
            __m256 p = sm_exp_avx2(_mm256_fmsub_ps(_mm256_loadu_ps(s), vs, vl));
            p = _mm256_and_ps(ok, p);
            __m256 ds = _mm256_mul_ps(_mm256_mul_ps(p, _mm256_sub_ps(_mm256_loadu_ps(dp), vd)), vs);
            _mm256_storeu_ps(s, p);
            _mm256_storeu_ps(dp, _mm256_and_ps(ok, ds));
        }
    }
}

#endif /* SM_X86_KERNELS */

/* ---- transposed query blocks and row dot products -------------------------------------------
 * pack_T: dst (hs, BLK) <- the first `rows` rows (hs floats, row stride ss) of src transposed,
 * zero in lanes rows .. BLK-1. row_dots: D[r] = x_r . y_r for r < rows (row stride ss). The
 * AVX-512 versions work on 16 x 16 blocks transposed in registers (D as 16 lanes of vertical
 * sums, no horizontal reductions); the others go row by row. */
typedef void (*pack_T_fn)(float *dst, const float *src, int64_t ss, int64_t rows, int64_t hs);
typedef void (*row_dots_fn)(float *D, const float *x, const float *y, int64_t ss, int64_t rows,
                            int64_t hs);

static void pack_T_generic(float *dst, const float *src, int64_t ss, int64_t rows, int64_t hs) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t d = 0; d < hs; d++) dst[d * BLK + r] = src[r * ss + d];
    for (int64_t d = 0; d < hs; d++)
        for (int64_t r = rows; r < BLK; r++) dst[d * BLK + r] = 0.0f;
}

static void row_dots_generic(float *D, const float *x, const float *y, int64_t ss, int64_t rows,
                             int64_t hs) {
    for (int64_t r = 0; r < rows; r++) D[r] = dot_generic(x + r * ss, y + r * ss, hs);
}

#if SM_X86_KERNELS
SM_TARGET_AVX512 SM_INLINE void load_rows16(__m512 r[16], const float *src, int64_t ss,
                                            int64_t rn, __mmask16 km) {
    for (int i = 0; i < 16; i++)
        r[i] = i < rn ? _mm512_maskz_loadu_ps(km, src + i * ss) : _mm512_setzero_ps();
}

SM_TARGET_AVX512
static void pack_T_avx512(float *dst, const float *src, int64_t ss, int64_t rows, int64_t hs) {
    for (int64_t r0 = 0; r0 < BLK; r0 += 16)
        for (int64_t d0 = 0; d0 < hs; d0 += 16) {
            const int dn = (int)sm_min64(16, hs - d0);
            __m512 r[16];
            load_rows16(r, src + r0 * ss + d0, ss, rows - r0, sm_mask16(dn));
            sm_transpose16x16(r);
            for (int e = 0; e < dn; e++) _mm512_storeu_ps(dst + (d0 + e) * BLK + r0, r[e]);
        }
}

SM_TARGET_AVX512
static void row_dots_avx512(float *D, const float *x, const float *y, int64_t ss, int64_t rows,
                            int64_t hs) {
    for (int64_t r0 = 0; r0 < rows; r0 += 16) {
        const int64_t rn = sm_min64(16, rows - r0);
        __m512 acc = _mm512_setzero_ps();
        for (int64_t d0 = 0; d0 < hs; d0 += 16) {
            const int dn = (int)sm_min64(16, hs - d0);
            const __mmask16 km = sm_mask16(dn);
            __m512 a[16], b[16];
            load_rows16(a, x + r0 * ss + d0, ss, rn, km);
            load_rows16(b, y + r0 * ss + d0, ss, rn, km);
            sm_transpose16x16(a);
            sm_transpose16x16(b);
            for (int e = 0; e < dn; e++) acc = _mm512_fmadd_ps(a[e], b[e], acc);
        }
        _mm512_mask_storeu_ps(D + r0, sm_mask16(rn), acc);
    }
}

SM_TARGET_AVX2
static void row_dots_avx2(float *D, const float *x, const float *y, int64_t ss, int64_t rows,
                          int64_t hs) {
    for (int64_t r = 0; r < rows; r++) D[r] = dot_avx2(x + r * ss, y + r * ss, hs);
}
#endif

typedef struct {
    mm_fn mm;
    fwd_softmax_fn fwd_softmax;
    bwd_tile_fn bwd_tile;
    pack_T_fn pack_T;
    row_dots_fn row_dots;
} att_kernels;

static att_kernels get_kernels(void) {
    int level = sm_simd_active();
#if SM_X86_KERNELS
    if (level >= SM_SIMD_AVX512)
        return (att_kernels){mm_avx512, fwd_softmax_avx512, bwd_tile_avx512, pack_T_avx512,
                             row_dots_avx512};
    if (level >= SM_SIMD_AVX2)
        return (att_kernels){mm_avx2, fwd_softmax_avx2, bwd_tile_avx2, pack_T_generic,
                             row_dots_avx2};
#endif
    (void)level;
    return (att_kernels){mm_generic, fwd_softmax_generic, bwd_tile_generic, pack_T_generic,
                         row_dots_generic};
}

/* ============================================================================================
 * forward
 * ============================================================================================ */

typedef struct {
    const float *qkv;
    float *out, *lse;
    int64_t T, C, NH, hs, hsp, nqb;
    float scale;
    const sm_drop_mask *mask; /* attention dropout, or NULL */
    int64_t batch_offset;
} fwd_args;

/* Multiply a transposed tile S (nk keys x BLK query lanes; entry (j, i) is query i0 + i, key
 * j0 + j of head h of sequence b) by its dropout factors. Lanes past mq are padding. */
static void att_mask_tile(float *S, int64_t nk, int64_t mq, const sm_drop_mask *m, int64_t bh,
                          int64_t T, int64_t i0, int64_t j0) {
    for (int64_t j = 0; j < nk; j++) { /* lane i of row j: element (bh, i0 + i, j0 + j) */
        uint64_t e = ((uint64_t)bh * (uint64_t)T + (uint64_t)i0) * (uint64_t)T + (uint64_t)(j0 + j);
        sm_drop_apply(S + j * BLK, S + j * BLK, mq, m, e, (uint64_t)T);
    }
}

/* One head's block I of queries. ws: per-thread scratch laid out as below. */
static void fwd_block(const att_kernels *K, const fwd_args *A, int64_t b, int64_t h, int64_t I,
                      float *ws) {
    const int64_t T = A->T, C = A->C, C3 = 3 * C, hs = A->hs, hsp = A->hsp;
    /* QT (hs, BLK), S (BLK, BLK), O (BLK, hsp), Vp (BLK, hsp), m, l, alpha (BLK) */
    float *QT = ws, *S = QT + sm_round_up(hs * BLK, 16), *O = S + BLK * BLK, *Vp = O + BLK * hsp;
    float *m = Vp + BLK * hsp, *l = m + BLK, *alpha = l + BLK;
    const float *base = A->qkv + b * T * C3 + h * hs;
    const int64_t i0 = I * BLK, mq = sm_min64(BLK, T - i0);
    const int pad = hs != hsp;

    K->pack_T(QT, base + i0 * C3, C3, mq, hs);
    for (int i = 0; i < BLK; i++) {
        m[i] = -INFINITY;
        l[i] = 0.0f;
    }
    for (int64_t J = 0; J <= I; J++) {
        const int64_t j0 = J * BLK, nk = J < I ? BLK : mq;
        const float *Kj = base + j0 * C3 + C;
        const float *Vj = base + j0 * C3 + 2 * C;
        int64_t ldv = C3;
        const int tri = J == I; /* the diagonal tile: key j only matters to queries i >= j */
        K->mm(nk, BLK, hs, Kj, C3, 1, QT, BLK, S, BLK, 0, NULL, tri ? TRI_COLS : TRI_NONE);
        K->fwd_softmax(S, nk, tri, A->scale, m, l, alpha);
        /* dropout: l summed the whole probabilities; only O sees the dropped ones */
        if (A->mask) att_mask_tile(S, nk, mq, A->mask, (b + A->batch_offset) * A->NH + h, T, i0, j0);
        if (pad) {
            for (int64_t j = 0; j < nk; j++) {
                memcpy(Vp + j * hsp, Vj + j * C3, (size_t)hs * sizeof(float));
                memset(Vp + j * hsp + hs, 0, (size_t)(hsp - hs) * sizeof(float));
            }
            Vj = Vp;
            ldv = hsp;
        }
        /* O (mq, hsp) = diag(alpha) O + P (mq, nk) @ V_J (nk, hsp); P(i, j) = S[j * BLK + i] */
        K->mm(mq, hsp, nk, S, 1, BLK, Vj, ldv, O, hsp, J > 0, alpha, tri ? TRI_K_UPTO : TRI_NONE);
    }
    for (int64_t i = 0; i < mq; i++) {
        float *o = A->out + (b * T + i0 + i) * C + h * hs;
        for (int64_t d = 0; d < hs; d++) o[d] = O[i * hsp + d] / l[i];
        A->lse[(b * A->NH + h) * T + i0 + i] = m[i] + logf(l[i]);
    }
}

/* The arguments of a forward pass over qkv (B, T, 3C) into out and lse, without dropout. */
static fwd_args fwd_args_of(float *out, float *lse, const float *qkv, int64_t T, int64_t C,
                            int64_t NH) {
    fwd_args A;
    memset(&A, 0, sizeof(A));
    A.qkv = qkv;
    A.out = out;
    A.lse = lse;
    A.T = T;
    A.C = C;
    A.NH = NH;
    A.hs = C / NH;
    A.hsp = sm_round_up(A.hs, 16);
    A.nqb = sm_ceil_div(T, BLK);
    A.scale = (float)(1.0 / sqrt((double)A.hs));
    return A;
}

/* Floats of one thread's fwd_block scratch. */
static int64_t fwd_scratch_floats(const fwd_args *A) {
    return sm_round_up(A->hs * BLK, 16) + BLK * BLK + 2 * BLK * A->hsp + 3 * BLK;
}

int sm_attention_forward(float *out, float *lse, const float *qkv, int64_t B, int64_t T,
                         int64_t C, int64_t NH, int nthreads) {
    return sm_attention_forward_ex(out, lse, qkv, B, T, C, NH, NULL, nthreads);
}

int sm_attention_forward_ex(float *out, float *lse, const float *qkv, int64_t B, int64_t T,
                            int64_t C, int64_t NH, const sm_att_dropout *drop, int nthreads) {
    /* qkv (B, T, 3C), out (B, T, C), lse (B, NH, T) */
    if (B <= 0 || T <= 0 || C <= 0 || NH <= 0) return SM_OK;
    fwd_args A = fwd_args_of(out, lse, qkv, T, C, NH);
    sm_drop_mask mask;
    A.mask = att_mask_of(drop, &mask, &A.batch_offset);
    const att_kernels K = get_kernels();
    const int64_t units = B * NH * A.nqb;
    const double work = (double)B * NH * (double)A.nqb * (A.nqb + 1) / 2 * BLK * BLK * 2.0 * A.hs;
    const int nt = sm_team_size(nthreads, units, work / MACS_PER_OP);
    const int64_t per = fwd_scratch_floats(&A);
    float *scratch = (float *)sm_pool_rent(sm_pool_default(), (size_t)(per * nt) * sizeof(float));
    if (!scratch) return SM_ERR_NOMEM;
    SM_PARALLEL(nt) {
        const int tid = SM_THREAD_ID(), nth = SM_THREAD_COUNT();
        float *ws = scratch + (int64_t)tid * per;
        /* A block's cost grows with its index I (it sees I + 1 key blocks). Units run over
         * layers of B * NH blocks of one I, the layers ordered costliest, cheapest, next
         * costliest, ... so that any contiguous share mixes dear and cheap blocks even when
         * B * NH is small. Which thread computes a block never changes its bits. */
        int64_t u0, u1;
        sm_split_range(units, 1, nth, tid, &u0, &u1);
        for (int64_t u = u0; u < u1; u++) {
            const int64_t p = u / (B * NH), bh = u % (B * NH);
            const int64_t I = p % 2 == 0 ? A.nqb - 1 - p / 2 : p / 2;
            fwd_block(&K, &A, bh / NH, bh % NH, I, ws);
        }
    }
    sm_pool_return(scratch);
    return SM_OK;
}

int sm_attention_forward_tail(float *out, float *lse, const float *qkv, int64_t T, int64_t C,
                              int64_t NH, int64_t first_block, int nthreads) {
    /* one sequence: qkv (T, 3C), out (T, C), lse (NH, T); query blocks first_block .. */
    if (T <= 0 || C <= 0 || NH <= 0) return SM_OK;
    const fwd_args A = fwd_args_of(out, lse, qkv, T, C, NH);
    if (first_block < 0 || first_block >= A.nqb) return SM_ERR_ARG;
    const att_kernels K = get_kernels();
    const int64_t nb = A.nqb - first_block, units = NH * nb;
    const double work = (double)NH * (double)nb * (double)A.nqb * BLK * BLK * 2.0 * A.hs;
    const int nt = sm_team_size(nthreads, units, work / MACS_PER_OP);
    const int64_t per = fwd_scratch_floats(&A);
    float *scratch = (float *)sm_pool_rent(sm_pool_default(), (size_t)(per * nt) * sizeof(float));
    if (!scratch) return SM_ERR_NOMEM;
    SM_PARALLEL(nt) {
        const int tid = SM_THREAD_ID(), nth = SM_THREAD_COUNT();
        float *ws = scratch + (int64_t)tid * per;
        int64_t u0, u1;
        sm_split_range(units, 1, nth, tid, &u0, &u1);
        for (int64_t u = u0; u < u1; u++) /* the same block computation as the whole pass */
            fwd_block(&K, &A, 0, u % NH, first_block + u / NH, ws);
    }
    sm_pool_return(scratch);
    return SM_OK;
}

void sm_kv_cache_read(float *qkv, const float *k_cache, const float *v_cache, int64_t T,
                      int64_t NH, int64_t T_max, int64_t hs) {
    const int64_t C = NH * hs, C3 = 3 * C;
    for (int64_t h = 0; h < NH; h++) {
        const float *kt = k_cache + h * hs * T_max, *v = v_cache + h * T_max * hs;
        for (int64_t t = 0; t < T; t++) {
            float *dst = qkv + t * C3 + h * hs;
            for (int64_t d = 0; d < hs; d++) dst[C + d] = kt[kc_index(t, d, hs)];
            memcpy(dst + 2 * C, v + t * hs, (size_t)hs * sizeof(float));
        }
    }
}

/* ============================================================================================
 * backward
 * ============================================================================================ */

typedef struct {
    float *dqkv;
    const float *dout, *qkv, *out, *lse;
    int64_t T, C, NH, hs, hsp, nqb, Tp;
    float scale;
    const sm_drop_mask *mask; /* attention dropout, or NULL */
    int64_t batch_offset;
} bwd_args;

static int64_t bwd_scratch_floats(int64_t hs, int64_t hsp, int64_t Tp) {
    /* padded Q, dO, K rows, dQ, dK and dV: only when hs % 16 != 0 */
    const int64_t pad = hs != hsp ? 4 * Tp * hsp + 2 * BLK * hsp : 0;
    return 2 * sm_round_up(hs * Tp, 16) + 2 * Tp + 2 * BLK * BLK + pad;
}

static void bwd_head(const att_kernels *K, const bwd_args *A, int64_t b, int64_t h, float *ws) {
    const int64_t T = A->T, C = A->C, C3 = 3 * C, hs = A->hs, hsp = A->hsp, Tp = A->Tp;
    const int pad = hs != hsp;
    /* QT, dOT (nqb, hs, BLK): each query block transposed (blocks contiguous, so the rows a
     * product reads are BLK apart, never a power-of-two multiple of 4 KiB as (hs, Tp) would
     * be); L, D (Tp); S, dP (BLK, BLK).
     * hs % 16 == 0: the products accumulate straight into dqkv (rows of hs are whole vectors).
     * Otherwise they work on zero-padded rows of hsp: Qr, dOr, Kr (Tp, hsp) copies and dQ
     * (Tp, hsp), dK, dV (BLK, hsp) accumulators, added into dqkv at the end. */
    float *QT = ws, *dOT = QT + sm_round_up(hs * Tp, 16);
    float *L = dOT + sm_round_up(hs * Tp, 16), *D = L + Tp, *S = D + Tp, *dP = S + BLK * BLK;
    const float *qb = A->qkv + b * T * C3 + h * hs; /* row t: query at 0, key at C, value at 2C */
    const float *ob = A->out + b * T * C + h * hs;
    const float *gb = A->dout + b * T * C + h * hs;
    float *db = A->dqkv + b * T * C3 + h * hs;
    const float *lb = A->lse + (b * A->NH + h) * T;

    const float *Qr = qb, *dOr = gb, *Kr = qb + C;
    int64_t ldq = C3, ldo = C, ldk = C3, ldg = C3;
    float *dQ = db, *dK = db + C, *dV = db + 2 * C; /* row t of each at t * ldg */
    if (pad) {
        float *qr = dP + BLK * BLK, *gr = qr + Tp * hsp, *kr = gr + Tp * hsp;
        dQ = kr + Tp * hsp;
        dK = dQ + Tp * hsp;
        dV = dK + BLK * hsp;
        ldg = hsp;
        memset(qr, 0, (size_t)(4 * Tp * hsp) * sizeof(float)); /* Qr, dOr, Kr, dQ */
        for (int64_t t = 0; t < T; t++) {
            memcpy(qr + t * hsp, qb + t * C3, (size_t)hs * sizeof(float));
            memcpy(gr + t * hsp, gb + t * C, (size_t)hs * sizeof(float));
            memcpy(kr + t * hsp, qb + t * C3 + C, (size_t)hs * sizeof(float));
        }
        Qr = qr;
        dOr = gr;
        Kr = kr;
        ldq = ldo = ldk = hsp;
    }
    for (int64_t J = 0; J < A->nqb; J++) { /* each query block transposed, zero past T */
        const int64_t t0 = J * BLK, rows = sm_min64(BLK, T - t0);
        K->pack_T(QT + J * hs * BLK, qb + t0 * C3, C3, rows, hs);
        K->pack_T(dOT + J * hs * BLK, gb + t0 * C, C, rows, hs);
    }
    K->row_dots(D, gb, ob, C, T, hs); /* D = rowsum(dO * O) */
    memcpy(L, lb, (size_t)T * sizeof(float));
    for (int64_t t = T; t < Tp; t++) D[t] = L[t] = 0.0f;

    for (int64_t J = 0; J < A->nqb; J++) {
        const int64_t j0 = J * BLK, nk = sm_min64(BLK, T - j0);
        const float *Kj = qb + j0 * C3 + C, *Vj = qb + j0 * C3 + 2 * C;
        /* this key block's gradient rows (padded: block-local accumulators from zero) */
        float *dKj = pad ? dK : dK + j0 * ldg, *dVj = pad ? dV : dV + j0 * ldg;
        if (pad) memset(dK, 0, (size_t)(2 * BLK * hsp) * sizeof(float)); /* dK and dV */
        for (int64_t I = J; I < A->nqb; I++) {
            const int64_t i0 = I * BLK, mq = sm_min64(BLK, T - i0);
            const float *qt = QT + I * hs * BLK, *gt = dOT + I * hs * BLK;
            const int diag = I == J;
            const int cols = diag ? TRI_COLS : TRI_NONE, kfrom = diag ? TRI_K_FROM : TRI_NONE;
            K->mm(nk, BLK, hs, Kj, C3, 1, qt, BLK, S, BLK, 0, NULL, cols);  /* S^T  = K_J Q_I^T  */
            K->mm(nk, BLK, hs, Vj, C3, 1, gt, BLK, dP, BLK, 0, NULL, cols); /* dP^T = V_J dO_I^T */
            if (A->mask) { /* dP = f (dO V^T): the gradient reaching the kept probabilities */
                const int64_t bh = (b + A->batch_offset) * A->NH + h;
                att_mask_tile(dP, nk, mq, A->mask, bh, T, i0, j0);
                K->bwd_tile(S, dP, nk, diag, mq, A->scale, L + i0, D + i0);
                att_mask_tile(S, nk, mq, A->mask, bh, T, i0, j0); /* dV needs P f */
            } else {
                K->bwd_tile(S, dP, nk, diag, mq, A->scale, L + i0, D + i0);
            }
            /* dV_J += P^T dO_I;  dK_J += dS^T Q_I;  dQ_I += dS K_J */
            K->mm(nk, hsp, mq, S, BLK, 1, dOr + i0 * ldo, ldo, dVj, ldg, 1, NULL, kfrom);
            K->mm(nk, hsp, mq, dP, BLK, 1, Qr + i0 * ldq, ldq, dKj, ldg, 1, NULL, kfrom);
            K->mm(mq, hsp, nk, dP, 1, BLK, Kr + j0 * ldk, ldk, dQ + i0 * ldg, ldg, 1, NULL,
                  diag ? TRI_K_UPTO : TRI_NONE);
        }
        if (pad)
            for (int64_t j = 0; j < nk; j++) {
                float *g = db + (j0 + j) * C3;
                for (int64_t d = 0; d < hs; d++) {
                    g[C + d] += dK[j * hsp + d];
                    g[2 * C + d] += dV[j * hsp + d];
                }
            }
    }
    if (pad)
        for (int64_t t = 0; t < T; t++)
            for (int64_t d = 0; d < hs; d++) db[t * C3 + d] += dQ[t * hsp + d];
}

int sm_attention_backward(float *dqkv, const float *dout, const float *qkv, const float *out,
                          const float *lse, int64_t B, int64_t T, int64_t C, int64_t NH,
                          int nthreads) {
    return sm_attention_backward_ex(dqkv, dout, qkv, out, lse, B, T, C, NH, NULL, nthreads);
}

int sm_attention_backward_ex(float *dqkv, const float *dout, const float *qkv, const float *out,
                             const float *lse, int64_t B, int64_t T, int64_t C, int64_t NH,
                             const sm_att_dropout *drop, int nthreads) {
    /* dqkv (B, T, 3C) +=, dout (B, T, C), qkv (B, T, 3C), out (B, T, C), lse (B, NH, T) */
    if (B <= 0 || T <= 0 || C <= 0 || NH <= 0) return SM_OK;
    bwd_args A;
    sm_drop_mask mask;
    A.mask = att_mask_of(drop, &mask, &A.batch_offset);
    A.dqkv = dqkv;
    A.dout = dout;
    A.qkv = qkv;
    A.out = out;
    A.lse = lse;
    A.T = T;
    A.C = C;
    A.NH = NH;
    A.hs = C / NH;
    A.hsp = sm_round_up(A.hs, 16);
    A.nqb = sm_ceil_div(T, BLK);
    A.Tp = A.nqb * BLK;
    A.scale = (float)(1.0 / sqrt((double)A.hs));
    const att_kernels K = get_kernels();
    const int64_t units = B * NH;
    const double work = (double)B * NH * (double)A.nqb * (A.nqb + 1) / 2 * BLK * BLK * 5.0 * A.hs;
    const int nt = sm_team_size(nthreads, units, work / MACS_PER_OP);
    const int64_t per = sm_round_up(bwd_scratch_floats(A.hs, A.hsp, A.Tp), 16);
    float *scratch = (float *)sm_pool_rent(sm_pool_default(), (size_t)(per * nt) * sizeof(float));
    if (!scratch) return SM_ERR_NOMEM;
    SM_PARALLEL(nt) {
        const int tid = SM_THREAD_ID(), nth = SM_THREAD_COUNT();
        int64_t u0, u1;
        sm_split_range(units, 1, nth, tid, &u0, &u1);
        float *ws = scratch + (int64_t)tid * per;
        for (int64_t u = u0; u < u1; u++) bwd_head(&K, &A, u / NH, u % NH, ws);
    }
    sm_pool_return(scratch);
    return SM_OK;
}

/* ============================================================================================
 * KV cache
 * ============================================================================================ */

void sm_kv_cache_prefill(float *k_cache, float *v_cache, const float *qkv, int64_t start,
                         int64_t B, int64_t T, int64_t NH, int64_t T_max, int64_t hs,
                         int nthreads) {
    /* k_cache (B, NH, T_max / BLK, hs, BLK), v_cache (B, NH, T_max, hs), qkv (B, T, 3C),
     * C = NH*hs; positions start .. start+T-1 are written */
    if (B <= 0 || T <= 0 || NH <= 0 || hs <= 0) return;
    const int64_t C = NH * hs, C3 = 3 * C, units = B * NH;
    const int nt = sm_team_size(nthreads, units, (double)units * T * hs * 8 / MACS_PER_OP);
    SM_PARALLEL(nt) {
        int64_t u0, u1;
        sm_split_range(units, 1, SM_THREAD_COUNT(), SM_THREAD_ID(), &u0, &u1);
        for (int64_t u = u0; u < u1; u++) {
            const int64_t b = u / NH, h = u % NH;
            const float *src = qkv + b * T * C3 + h * hs;
            float *kt = k_cache + u * hs * T_max;
            float *v = v_cache + (u * T_max + start) * hs;
            /* write along the cache's contiguous positions, read qkv with stride */
            for (int64_t d = 0; d < hs; d++)
                for (int64_t t = 0; t < T; t++) kt[kc_index(start + t, d, hs)] = src[t * C3 + C + d];
            for (int64_t t = 0; t < T; t++) memcpy(v + t * hs, src + t * C3 + 2 * C, (size_t)hs * sizeof(float));
        }
    }
}

/* The key and value of one (sequence, head) unit u at position pos: src points at the unit's
 * query in a qkv row (its key and value follow C and 2C floats later). */
static void append_unit(float *k_cache, float *v_cache, const float *src, int64_t u, int64_t pos,
                        int64_t C, int64_t T_max, int64_t hs) {
    float *kt = k_cache + u * hs * T_max;
    for (int64_t d = 0; d < hs; d++) kt[kc_index(pos, d, hs)] = src[C + d];
    memcpy(v_cache + (u * T_max + pos) * hs, src + 2 * C, (size_t)hs * sizeof(float));
}

void sm_kv_cache_append(float *k_cache, float *v_cache, const float *qkv_row,
                        const int *positions, int64_t B, int64_t NH, int64_t T_max, int64_t hs,
                        int nthreads) {
    /* k_cache (B, NH, T_max / BLK, hs, BLK), v_cache (B, NH, T_max, hs), qkv_row (B, 3C),
     * positions (B) */
    (void)nthreads; /* B * 2C floats: always less work than waking a team */
    const int64_t C = NH * hs;
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < NH; h++)
            append_unit(k_cache, v_cache, qkv_row + b * 3 * C + h * hs, b * NH + h, positions[b],
                        C, T_max, hs);
}

/* ============================================================================================
 * decode: one query against cached positions 0 .. L-1, keys in chunks of BLK with an online
 * softmax. A chunk's keys are one contiguous, transposed (hs, BLK) block of the key cache, so
 * its scores come out with lanes along keys and the block streams from memory in order.
 * ws: o (hsp) running output, p (BLK) probabilities of the chunk.
 * ============================================================================================ */

typedef void (*decode_fn)(float *out, const float *q, const float *kt, const float *v, int64_t L,
                          int64_t hs, float scale, float *ws);

SM_INLINE void decode_head_body(float *out, const float *q, const float *kt, const float *v,
                                int64_t L, int64_t hs, float scale, float *ws) {
    float *o = ws, *p = ws + sm_round_up(hs, 16);
    float m = -INFINITY, l = 0.0f;
    for (int64_t d = 0; d < hs; d++) o[d] = 0.0f;
    for (int64_t j0 = 0; j0 < L; j0 += BLK) {
        const int64_t nk = sm_min64(BLK, L - j0);
        for (int64_t j = 0; j < nk; j++) p[j] = 0.0f;
        for (int64_t d = 0; d < hs; d++) {
            const float qd = q[d];
            const float *kr = kt + j0 * hs + d * BLK;
            for (int64_t j = 0; j < nk; j++) p[j] += qd * kr[j];
        }
        float mx = m;
        for (int64_t j = 0; j < nk; j++) {
            p[j] *= scale;
            mx = p[j] > mx ? p[j] : mx;
        }
        float sum = 0.0f;
        for (int64_t j = 0; j < nk; j++) {
            p[j] = sm_exp_scalar(p[j] - mx);
            sum += p[j];
        }
        const float alpha = sm_exp_scalar(m - mx);
        l = l * alpha + sum;
        m = mx;
        for (int64_t d = 0; d < hs; d++) o[d] *= alpha;
        for (int64_t j = 0; j < nk; j++) {
            const float pj = p[j];
            const float *vr = v + (j0 + j) * hs;
            for (int64_t d = 0; d < hs; d++) o[d] += pj * vr[d];
        }
    }
    for (int64_t d = 0; d < hs; d++) out[d] = o[d] / l;
}

static void decode_head_generic(float *out, const float *q, const float *kt, const float *v,
                                int64_t L, int64_t hs, float scale, float *ws) {
    decode_head_body(out, q, kt, v, L, hs, scale, ws);
}

#if SM_X86_KERNELS
/* The x86 decoders keep two sets of accumulators (even and odd d, even and odd keys) so that
 * enough independent FMA chains are in flight; the sets are added at the end of each chunk. */

SM_TARGET_AVX2
static void decode_head_avx2(float *out, const float *q, const float *kt, const float *v,
                             int64_t L, int64_t hs, float scale, float *ws) {
    float *o = ws, *p = ws + sm_round_up(hs, 16);
    float m = -INFINITY, l = 0.0f;
    for (int64_t d = 0; d < hs; d++) o[d] = 0.0f;
    for (int64_t j0 = 0; j0 < L; j0 += BLK) {
        const int64_t nk = sm_min64(BLK, L - j0);
        {
            /* a block of the key cache is whole even past L; lanes >= nk are dropped below */
            __m256 s[8];
            for (int u = 0; u < 8; u++) s[u] = _mm256_setzero_ps();
            for (int64_t d = 0; d < hs; d++) {
                const __m256 x = _mm256_broadcast_ss(q + d);
                const float *kr = kt + j0 * hs + d * BLK;
                for (int u = 0; u < 8; u++) s[u] = _mm256_fmadd_ps(x, _mm256_loadu_ps(kr + 8 * u), s[u]);
            }
            for (int u = 0; u < 8; u++) _mm256_storeu_ps(p + 8 * u, s[u]);
        }
        const __m256 vs = _mm256_set1_ps(scale), iota = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
        const __m256 ninf = _mm256_set1_ps(-INFINITY);
        __m256 mx8 = ninf;
        for (int u = 0; u < 8; u++) {
            __m256 x = _mm256_mul_ps(_mm256_loadu_ps(p + 8 * u), vs);
            const __m256 dead = _mm256_cmp_ps(_mm256_add_ps(iota, _mm256_set1_ps((float)(8 * u))),
                                              _mm256_set1_ps((float)nk), _CMP_GE_OQ);
            x = _mm256_blendv_ps(x, ninf, dead);
            _mm256_storeu_ps(p + 8 * u, x);
            mx8 = _mm256_max_ps(mx8, x);
        }
        float t8[8];
        _mm256_storeu_ps(t8, mx8);
        float cmax = t8[0];
        for (int u = 1; u < 8; u++) cmax = t8[u] > cmax ? t8[u] : cmax;
        const float mx = cmax > m ? cmax : m;
        const __m256 vmx = _mm256_set1_ps(mx);
        __m256 sum8 = _mm256_setzero_ps();
        for (int u = 0; u < 8; u++) {
            const __m256 e = sm_exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(p + 8 * u), vmx));
            _mm256_storeu_ps(p + 8 * u, e);
            sum8 = _mm256_add_ps(sum8, e);
        }
        _mm256_storeu_ps(t8, sum8);
        const float sum = ((t8[0] + t8[4]) + (t8[1] + t8[5])) + ((t8[2] + t8[6]) + (t8[3] + t8[7]));
        const float alpha = sm_exp_scalar(m - mx);
        l = l * alpha + sum;
        m = mx;
        const __m256 va = _mm256_set1_ps(alpha);
        int64_t d0 = 0;
        for (; d0 + 32 <= hs; d0 += 32) {
            __m256 a[4], b[4];
            for (int u = 0; u < 4; u++) {
                a[u] = _mm256_mul_ps(va, _mm256_loadu_ps(o + d0 + 8 * u));
                b[u] = _mm256_setzero_ps();
            }
            int64_t j = 0;
            for (; j + 2 <= nk; j += 2) {
                const __m256 pa = _mm256_broadcast_ss(p + j), pb = _mm256_broadcast_ss(p + j + 1);
                const float *va_ = v + (j0 + j) * hs + d0, *vb_ = va_ + hs;
                for (int u = 0; u < 4; u++) {
                    a[u] = _mm256_fmadd_ps(pa, _mm256_loadu_ps(va_ + 8 * u), a[u]);
                    b[u] = _mm256_fmadd_ps(pb, _mm256_loadu_ps(vb_ + 8 * u), b[u]);
                }
            }
            if (j < nk) {
                const __m256 pa = _mm256_broadcast_ss(p + j);
                const float *va_ = v + (j0 + j) * hs + d0;
                for (int u = 0; u < 4; u++) a[u] = _mm256_fmadd_ps(pa, _mm256_loadu_ps(va_ + 8 * u), a[u]);
            }
            for (int u = 0; u < 4; u++) _mm256_storeu_ps(o + d0 + 8 * u, _mm256_add_ps(a[u], b[u]));
        }
        for (; d0 + 8 <= hs; d0 += 8) {
            __m256 a = _mm256_mul_ps(va, _mm256_loadu_ps(o + d0));
            for (int64_t j = 0; j < nk; j++)
                a = _mm256_fmadd_ps(_mm256_broadcast_ss(p + j), _mm256_loadu_ps(v + (j0 + j) * hs + d0), a);
            _mm256_storeu_ps(o + d0, a);
        }
        for (; d0 < hs; d0++) {
            float a = o[d0] * alpha;
            for (int64_t j = 0; j < nk; j++) a += p[j] * v[(j0 + j) * hs + d0];
            o[d0] = a;
        }
    }
    for (int64_t d = 0; d < hs; d++) out[d] = o[d] / l;
}

SM_TARGET_AVX512
static void decode_head_avx512(float *out, const float *q, const float *kt, const float *v,
                               int64_t L, int64_t hs, float scale, float *ws) {
    float *o = ws, *p = ws + sm_round_up(hs, 16);
    const __m512 ninf = _mm512_set1_ps(-INFINITY), vs = _mm512_set1_ps(scale);
    float m = -INFINITY, l = 0.0f;
    for (int64_t d = 0; d < hs; d += 16) _mm512_mask_storeu_ps(o + d, sm_mask16(hs - d), _mm512_setzero_ps());
    for (int64_t j0 = 0; j0 < L; j0 += BLK) {
        const int64_t nk = sm_min64(BLK, L - j0);
        __mmask16 km[4];
        __m512 s[4], t[4];
        for (int u = 0; u < 4; u++) {
            km[u] = sm_mask16(nk - 16 * u);
            s[u] = t[u] = _mm512_setzero_ps();
        }
        /* the chunk's keys are one contiguous (hs, BLK) block of the cache, whole even past L
         * (lanes >= nk are dropped by the masked scale below) */
        const float *kb = kt + j0 * hs;
        int64_t d = 0;
        for (; d + 2 <= hs; d += 2) {
            const __m512 x = _mm512_set1_ps(q[d]), y = _mm512_set1_ps(q[d + 1]);
            const float *kr = kb + d * BLK;
            for (int u = 0; u < 4; u++) {
                s[u] = _mm512_fmadd_ps(x, _mm512_loadu_ps(kr + 16 * u), s[u]);
                t[u] = _mm512_fmadd_ps(y, _mm512_loadu_ps(kr + BLK + 16 * u), t[u]);
            }
        }
        if (d < hs) {
            const __m512 x = _mm512_set1_ps(q[d]);
            const float *kr = kb + d * BLK;
            for (int u = 0; u < 4; u++) s[u] = _mm512_fmadd_ps(x, _mm512_loadu_ps(kr + 16 * u), s[u]);
        }
        for (int u = 0; u < 4; u++) s[u] = _mm512_mask_mul_ps(ninf, km[u], _mm512_add_ps(s[u], t[u]), vs);
        const float cmax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(s[0], s[1]), _mm512_max_ps(s[2], s[3])));
        /* reduce_max may drop a NaN score; the exp and the sum below keep it */
        const float mx = cmax > m ? cmax : m;
        const __m512 vmx = _mm512_set1_ps(mx);
        for (int u = 0; u < 4; u++) {
            s[u] = sm_exp_avx512(_mm512_sub_ps(s[u], vmx));
            _mm512_storeu_ps(p + 16 * u, s[u]);
        }
        const float sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s[0], s[1]), _mm512_add_ps(s[2], s[3])));
        const float alpha = sm_exp_scalar(m - mx);
        l = l * alpha + sum;
        m = mx;
        const __m512 va = _mm512_set1_ps(alpha);
        for (int64_t d0 = 0; d0 < hs; d0 += 64) {
            __mmask16 dm[4];
            __m512 a[4], b[4];
            for (int u = 0; u < 4; u++) {
                dm[u] = sm_mask16(hs - d0 - 16 * u);
                a[u] = _mm512_mul_ps(va, _mm512_maskz_loadu_ps(dm[u], o + d0 + 16 * u));
                b[u] = _mm512_setzero_ps();
            }
            int64_t j = 0;
            for (; j + 2 <= nk; j += 2) {
                const __m512 pa = _mm512_set1_ps(p[j]), pb = _mm512_set1_ps(p[j + 1]);
                const float *va_ = v + (j0 + j) * hs + d0, *vb_ = va_ + hs;
                for (int u = 0; u < 4; u++) {
                    a[u] = _mm512_fmadd_ps(pa, _mm512_maskz_loadu_ps(dm[u], va_ + 16 * u), a[u]);
                    b[u] = _mm512_fmadd_ps(pb, _mm512_maskz_loadu_ps(dm[u], vb_ + 16 * u), b[u]);
                }
            }
            if (j < nk) {
                const __m512 pa = _mm512_set1_ps(p[j]);
                const float *va_ = v + (j0 + j) * hs + d0;
                for (int u = 0; u < 4; u++) a[u] = _mm512_fmadd_ps(pa, _mm512_maskz_loadu_ps(dm[u], va_ + 16 * u), a[u]);
            }
            for (int u = 0; u < 4; u++) _mm512_mask_storeu_ps(o + d0 + 16 * u, dm[u], _mm512_add_ps(a[u], b[u]));
        }
    }
    for (int64_t d = 0; d < hs; d++) out[d] = o[d] / l;
}
#endif

/* Per-thread decode scratch up to this many floats lives on the stack. */
#define DECODE_STACK 1024

static decode_fn decode_kernel(void) {
#if SM_X86_KERNELS
    int level = sm_simd_active();
    if (level >= SM_SIMD_AVX512) return decode_head_avx512;
    if (level >= SM_SIMD_AVX2) return decode_head_avx2;
#endif
    return decode_head_generic;
}

int64_t sm_attention_decode_ws(int64_t hs) { return sm_round_up(hs, 16) + BLK; }

int sm_attention_decode(float *out, const float *q, const float *k_cache, const float *v_cache,
                        const int *lengths, int64_t q_stride, int64_t B, int64_t NH,
                        int64_t T_max, int64_t hs, int nthreads) {
    /* out (B, NH*hs), q (B, q_stride), k_cache (B, NH, T_max / BLK, hs, BLK),
     * v_cache (B, NH, T_max, hs), lengths (B) */
    if (B <= 0 || NH <= 0 || hs <= 0 || T_max <= 0) return SM_OK;
    const decode_fn fn = decode_kernel();
    const float scale = (float)(1.0 / sqrt((double)hs));
    double work = 0.0;
    for (int64_t b = 0; b < B; b++) work += (double)lengths[b] * NH * hs * 2.0;
    const int64_t units = B * NH;
    const int nt = sm_team_size(nthreads, units, work / MACS_PER_OP);
    const int64_t per = sm_attention_decode_ws(hs);
    float *heap = NULL;
    if (per > DECODE_STACK) {
        heap = (float *)sm_pool_rent(sm_pool_default(), (size_t)(per * nt) * sizeof(float));
        if (!heap) return SM_ERR_NOMEM;
    }
    SM_PARALLEL(nt) {
        float local[DECODE_STACK];
        const int tid = SM_THREAD_ID();
        float *ws = heap ? heap + (int64_t)tid * per : local;
        int64_t u0, u1;
        sm_split_range(units, 1, SM_THREAD_COUNT(), tid, &u0, &u1);
        for (int64_t u = u0; u < u1; u++) {
            const int64_t b = u / NH, h = u % NH;
            fn(out + b * NH * hs + h * hs, q + b * q_stride + h * hs, k_cache + u * hs * T_max,
               v_cache + u * T_max * hs, lengths[b], hs, scale, ws);
        }
    }
    sm_pool_return(heap);
    return SM_OK;
}

void sm_attention_decode_units(float *out, const float *qkv_row, float *k_cache, float *v_cache,
                               const int *positions, const int *seqs, int64_t NH, int64_t T_max,
                               int64_t hs, int64_t u0, int64_t u1, float *ws) {
    const decode_fn fn = decode_kernel();
    const float scale = (float)(1.0 / sqrt((double)hs));
    const int64_t C = NH * hs;
    for (int64_t u = u0; u < u1; u++) {
        const int64_t b = u / NH, h = u % NH, pos = positions[b];
        const int64_t cu = (seqs ? seqs[b] : b) * NH + h; /* the unit in the cache */
        const float *src = qkv_row + b * 3 * C + h * hs;
        append_unit(k_cache, v_cache, src, cu, pos, C, T_max, hs);
        fn(out + b * C + h * hs, src, k_cache + cu * hs * T_max, v_cache + cu * T_max * hs, pos + 1,
           hs, scale, ws);
    }
}
