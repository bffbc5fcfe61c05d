/* sm_quant.c - bf16 / int8 weight matrices and the matrix-vector products that read them (see
 * sm_quant.h). The rows form streams W front to back, a group of rows at a time, into
 * per-column accumulators kept in a small stack tile (64 columns: they stay in registers on the
 * AVX-512 path); the dots form reads one stored row per output, as the LM head does. */
#include "sm_quant.h"

#include <math.h>
#include <string.h>

#include "sm_runtime.h"

static int8_t to_i8(float w, float scale) {
    float v = scale > 0.0f ? nearbyintf(w / scale) : 0.0f;
    return (int8_t)(v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v);
}

int sm_quantize(int fmt, int64_t K, int64_t N, int64_t group, const float *W, int64_t ldw,
                void *codes, float *scales) {
    if ((fmt != SM_QBF16 && fmt != SM_QI8) || K < 1 || N < 1 || ldw < N || !W || !codes ||
        (fmt == SM_QI8 && (group < 1 || K % group != 0 || !scales)))
        return SM_ERR_ARG;
    for (int64_t k = 0; k < K; k++)
        for (int64_t n = 0; n < N; n++)
            if (!isfinite(W[k * ldw + n])) return SM_ERR_ARG;
    if (fmt == SM_QBF16) {
        uint16_t *c = (uint16_t *)codes;
        for (int64_t k = 0; k < K; k++)
            for (int64_t n = 0; n < N; n++) c[k * N + n] = sm_bf16_round(W[k * ldw + n]);
        return SM_OK;
    }
    int8_t *c = (int8_t *)codes;
    for (int64_t g = 0; g < K / group; g++) {
        float *sg = scales + g * N;
        for (int64_t n = 0; n < N; n++) sg[n] = 0.0f;
        for (int64_t k = g * group; k < (g + 1) * group; k++)
            for (int64_t n = 0; n < N; n++) {
                const float a = fabsf(W[k * ldw + n]);
                if (a > sg[n]) sg[n] = a;
            }
        for (int64_t n = 0; n < N; n++) sg[n] /= 127.0f;
        for (int64_t k = g * group; k < (g + 1) * group; k++)
            for (int64_t n = 0; n < N; n++) c[k * N + n] = to_i8(W[k * ldw + n], sg[n]);
    }
    return SM_OK;
}

int sm_quantize_t(int fmt, int64_t N, int64_t K, int64_t group, const float *Wt, int64_t ldw,
                  void *codes, float *scales) {
    if ((fmt != SM_QBF16 && fmt != SM_QI8) || K < 1 || N < 1 || ldw < K || !Wt || !codes ||
        (fmt == SM_QI8 && (group < 1 || K % group != 0 || !scales)))
        return SM_ERR_ARG;
    for (int64_t r = 0; r < N; r++)
        for (int64_t k = 0; k < K; k++)
            if (!isfinite(Wt[r * ldw + k])) return SM_ERR_ARG;
    for (int64_t r = 0; r < N; r++) {
        const float *w = Wt + r * ldw;
        if (fmt == SM_QBF16) {
            for (int64_t k = 0; k < K; k++) ((uint16_t *)codes)[r * K + k] = sm_bf16_round(w[k]);
            continue;
        }
        for (int64_t g = 0; g < K / group; g++) {
            float amax = 0.0f;
            for (int64_t k = g * group; k < (g + 1) * group; k++) amax = fabsf(w[k]) > amax ? fabsf(w[k]) : amax;
            const float s = amax / 127.0f;
            scales[r * (K / group) + g] = s;
            for (int64_t k = g * group; k < (g + 1) * group; k++)
                ((int8_t *)codes)[r * K + k] = to_i8(w[k], s);
        }
    }
    return SM_OK;
}

void sm_qmat_row(const sm_qmat *q, int64_t r, float *out) {
    const int64_t K = q->K;
    if (q->fmt == SM_QBF16) {
        const uint16_t *c = (const uint16_t *)q->codes + r * K;
        for (int64_t k = 0; k < K; k++) out[k] = sm_bf16_widen(c[k]);
        return;
    }
    const int8_t *c = (const int8_t *)q->codes + r * K;
    const float *s = q->scales + r * (K / q->group);
    for (int64_t k = 0; k < K; k++) out[k] = s[k / q->group] * (float)c[k];
}

void sm_dequantize_rows(const sm_qmat *q, int64_t k0, int64_t k1, float *out, int nthreads) {
    const int64_t N = q->N;
    int nt = sm_resolve_threads(nthreads);
    if (nt > (k1 - k0) / 16 + 1) nt = (int)((k1 - k0) / 16 + 1);
    SM_PARALLEL(nt) {
        int64_t a, b;
        sm_split_range(k1 - k0, 16, SM_THREAD_COUNT(), SM_THREAD_ID(), &a, &b);
        for (int64_t k = k0 + a; k < k0 + b; k++) {
            float *o = out + (k - k0) * N;
            if (q->fmt == SM_QBF16) {
                const uint16_t *c = (const uint16_t *)q->codes + k * N;
                for (int64_t n = 0; n < N; n++) o[n] = sm_bf16_widen(c[n]);
            } else {
                const int8_t *c = (const int8_t *)q->codes + k * N;
                const float *sc = q->scales + (k / q->group) * N;
                for (int64_t n = 0; n < N; n++) o[n] = sc[n] * (float)c[n];
            }
        }
    }
}

void sm_dequantize(const sm_qmat *q, int transposed, float *out) {
    const int64_t K = q->K, N = q->N, G = q->group;
    for (int64_t i = 0; i < K * N; i++) {
        if (q->fmt == SM_QBF16) {
            out[i] = sm_bf16_widen(((const uint16_t *)q->codes)[i]);
            continue;
        }
        /* rows form: i = k * N + n, scale (k / G, n); dots form: i = n * K + k, scale (n, k / G) */
        const float s = transposed ? q->scales[(i / K) * (K / G) + (i % K) / G]
                                   : q->scales[((i / N) / G) * N + i % N];
        out[i] = s * (float)((const int8_t *)q->codes)[i];
    }
}

/* ---- the rows form -------------------------------------------------------------------------- */

#define QTILE 64 /* columns per tile: 4 zmm accumulators per row of x */
/* QPF: the streaming kernels prefetch the codes they will read (the rows form four rows ahead,
 * the dots form DOTS_PF bytes ahead). Without it one core keeps too few cache misses in flight
 * to stream 1- and 2-byte codes as fast as memory gives them: widening and FMAs fill the
 * out-of-order window with fewer loads per byte than a float32 product has. On the
 * GPT-2-124M shape (1 thread) it took a decode step from 19.5 to 14.6 ms in bf16 and from 13.3
 * to 6.1 ms in int8. */
#define DOTS_PF 4096
#define QMAXM 4  /* rows of x per pass (more go in passes of up to 4) */

static float code_at(const sm_qmat *q, int64_t i) {
    return q->fmt == SM_QBF16 ? sm_bf16_widen(((const uint16_t *)q->codes)[i])
                              : (float)((const int8_t *)q->codes)[i];
}

/* y[b, n0:n0+w] for b < m (m <= QMAXM), w <= QTILE: per column, FMAs over k in order within a
 * group (int8), the group's sum times its scale added to the total, groups in order. */
static void rows_tile_generic(const sm_qmat *q, int m, const float *x, int64_t ldx, int64_t k0,
                              int64_t k1, int64_t n0, int64_t w, float *y, int64_t ldy) {
    const int64_t N = q->N, G = q->fmt == SM_QI8 ? q->group : q->K;
    float tot[QMAXM][QTILE], part[QMAXM][QTILE];
    for (int b = 0; b < m; b++)
        for (int64_t j = 0; j < w; j++) tot[b][j] = 0.0f;
    for (int64_t g0 = k0, g1; g0 < k1; g0 = g1) { /* each group's share of [k0, k1) */
        g1 = (g0 / G + 1) * G < k1 ? (g0 / G + 1) * G : k1;
        for (int b = 0; b < m; b++)
            for (int64_t j = 0; j < w; j++) part[b][j] = 0.0f;
        for (int64_t k = g0; k < g1; k++)
            for (int64_t j = 0; j < w; j++) {
                const float c = code_at(q, k * N + n0 + j);
                for (int b = 0; b < m; b++) part[b][j] = fmaf(x[b * ldx + k], c, part[b][j]);
            }
        for (int b = 0; b < m; b++)
            for (int64_t j = 0; j < w; j++)
                tot[b][j] = q->fmt == SM_QI8 ? fmaf(q->scales[(g0 / q->group) * N + n0 + j], part[b][j], tot[b][j])
                                             : part[b][j];
    }
    for (int b = 0; b < m; b++)
        for (int64_t j = 0; j < w; j++) y[b * ldy + n0 + j] = tot[b][j];
}

#if SM_X86_KERNELS
#include <immintrin.h>

#include "sm_vecmath.h"

SM_TARGET_AVX512
SM_INLINE __m512 codes16_avx512(const sm_qmat *q, const int bf16, int64_t i, __mmask16 mk) {
    if (bf16) {
        const __m256i h = _mm256_maskz_loadu_epi16(mk, (const uint16_t *)q->codes + i);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    const __m128i c = _mm_maskz_loadu_epi8(mk, (const int8_t *)q->codes + i);
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(c));
}

/* bf16 codes 32 at a time. One 64-byte load read as 16 32-bit lanes holds code 2i in the low
 * half of lane i and code 2i + 1 in the high half, so (v << 16) is the even codes as float32 and
 * (v & 0xFFFF0000) the odd ones: one integer op per 16 weights, where widening 16 codes takes a
 * shuffle and a shift. Whoever uses the pair keeps even and odd positions apart (see
 * bf16_stream_rows). */
SM_TARGET_AVX512 SM_INLINE __mmask32 mask32(int64_t n) {
    return n >= 32 ? (__mmask32)0xFFFFFFFFu : n <= 0 ? (__mmask32)0 : (__mmask32)((1u << n) - 1u);
}

SM_TARGET_AVX512
SM_INLINE void bf16_pair_avx512(const uint16_t *c, __mmask32 mk, __m512 *even, __m512 *odd) {
    const __m512i v = _mm512_maskz_loadu_epi16(mk, c);
    *even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    *odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xFFFF0000u)));
}

/* The same tile with the accumulators in registers; m and the format constant after inlining. */
SM_TARGET_AVX512
SM_INLINE void rows_tile_avx512(const sm_qmat *q, const int bf16, const int m, const float *x,
                                int64_t ldx, int64_t k0, int64_t k1, int64_t n0, int64_t w,
                                float *y, int64_t ldy) {
    const int64_t N = q->N, G = bf16 ? q->K : q->group;
    __mmask16 mk[4];
    for (int v = 0; v < 4; v++) mk[v] = sm_mask16(w - 16 * v);
    __m512 tot[QMAXM][4], part[QMAXM][4];
    for (int b = 0; b < m; b++)
        for (int v = 0; v < 4; v++) tot[b][v] = _mm512_setzero_ps();
    for (int64_t g0 = k0, g1; g0 < k1; g0 = g1) { /* each group's share of [k0, k1) */
        g1 = (g0 / G + 1) * G < k1 ? (g0 / G + 1) * G : k1;
        for (int b = 0; b < m; b++)
            for (int v = 0; v < 4; v++) part[b][v] = _mm512_setzero_ps();
        for (int64_t k = g0; k < g1; k++) {
            __m512 c[4];
            for (int v = 0; v < 4; v++) c[v] = codes16_avx512(q, bf16, k * N + n0 + 16 * v, mk[v]);
            for (int b = 0; b < m; b++) {
                const __m512 xb = _mm512_set1_ps(x[b * ldx + k]);
                for (int v = 0; v < 4; v++) part[b][v] = _mm512_fmadd_ps(xb, c[v], part[b][v]);
            }
        }
        if (bf16) {
            for (int b = 0; b < m; b++)
                for (int v = 0; v < 4; v++) tot[b][v] = part[b][v];
        } else {
            const float *sg = q->scales + (g0 / q->group) * N + n0;
            for (int v = 0; v < 4; v++) {
                const __m512 s = _mm512_maskz_loadu_ps(mk[v], sg + 16 * v);
                for (int b = 0; b < m; b++) tot[b][v] = _mm512_fmadd_ps(s, part[b][v], tot[b][v]);
            }
        }
    }
    for (int b = 0; b < m; b++)
        for (int v = 0; v < 4; v++) _mm512_mask_storeu_ps(y + b * ldy + n0 + 16 * v, mk[v], tot[b][v]);
}

#define QSTREAM_W 4096 /* floats per row of the sums: whole rows for widths up to 4096 */
_Static_assert(QSTREAM_W % 32 == 0, "bf16 streaming fills whole 32-column chunks of the sums");

/* x[b, k .. k + 3] for the m rows of x, each in all 16 lanes: one streaming step's four rows */
SM_TARGET_AVX512
SM_INLINE void bcast4(const float *x, int64_t ldx, int64_t k, int m, __m512 xv[][4]) {
    for (int b = 0; b < m; b++)
        for (int r = 0; r < 4; r++) xv[b][r] = _mm512_set1_ps(x[b * ldx + k + r]);
}

/* Rows [g0, g1) of a bf16 matrix into part (columns c0 .. c0 + w, 32 at a time, each chunk's
 * sums evens first, then odds: see bf16_pair_avx512): for every column, the FMAs over k in
 * order that rows_tile does, so the bits are the same. */
SM_TARGET_AVX512
SM_INLINE void bf16_stream_rows(const sm_qmat *q, const int m, const float *x, int64_t ldx,
                                int64_t g0, int64_t g1, int64_t c0, int64_t w,
                                float part[][QSTREAM_W]) {
    const int64_t N = q->N;
    const uint16_t *codes = (const uint16_t *)q->codes;
    int64_t k = g0;
    for (; k + 4 <= g1; k += 4) {
        __m512 xv[QMAXM][4];
        bcast4(x, ldx, k, m, xv);
        for (int64_t j = 0; j < w; j += 32) {
            const __mmask32 mk = mask32(w - j);
            __m512 e[4], o[4];
            for (int r = 0; r < 4; r++) { /* the same columns of the next four rows: see QPF */
                _mm_prefetch((const char *)(codes + (k + 4 + r) * N + c0 + j), _MM_HINT_T0);
                bf16_pair_avx512(codes + (k + r) * N + c0 + j, mk, &e[r], &o[r]);
            }
            for (int b = 0; b < m; b++) {
                __m512 pe = _mm512_load_ps(part[b] + j), po = _mm512_load_ps(part[b] + j + 16);
                for (int r = 0; r < 4; r++) {
                    pe = _mm512_fmadd_ps(xv[b][r], e[r], pe);
                    po = _mm512_fmadd_ps(xv[b][r], o[r], po);
                }
                _mm512_store_ps(part[b] + j, pe);
                _mm512_store_ps(part[b] + j + 16, po);
            }
        }
    }
    for (; k < g1; k++)
        for (int64_t j = 0; j < w; j += 32) {
            __m512 e, o;
            bf16_pair_avx512(codes + k * N + c0 + j, mask32(w - j), &e, &o);
            for (int b = 0; b < m; b++) {
                const __m512 xb = _mm512_set1_ps(x[b * ldx + k]);
                _mm512_store_ps(part[b] + j, _mm512_fmadd_ps(xb, e, _mm512_load_ps(part[b] + j)));
                _mm512_store_ps(part[b] + j + 16,
                                _mm512_fmadd_ps(xb, o, _mm512_load_ps(part[b] + j + 16)));
            }
        }
}

/* The streaming form of the same product, for matrices read from memory: the rows of W are
 * read front to back (QSTREAM_W columns at a time: whole rows up to that width), four at a time into per-column
 * sums kept in a small buffer, so the prefetchers see long sequential runs instead of one short
 * piece per row. Every element gets the same FMAs in the same order as rows_tile (k ascending
 * within a group, then the group's scale), so the bits are the same. */
SM_TARGET_AVX512
SM_INLINE void rows_stream_avx512(const sm_qmat *q, const int bf16, const int m, const float *x,
                                  int64_t ldx, int64_t k0, int64_t k1, int64_t n0, int64_t n1,
                                  float *y, int64_t ldy) {
    const int64_t N = q->N, G = bf16 ? q->K : q->group;
    float part[QMAXM][QSTREAM_W] __attribute__((aligned(64)));
    for (int64_t c0 = n0; c0 < n1; c0 += QSTREAM_W) {
        const int64_t w = n1 - c0 < QSTREAM_W ? n1 - c0 : QSTREAM_W;
        for (int b = 0; b < m; b++)
            for (int64_t j = 0; j < w; j++) y[b * ldy + c0 + j] = 0.0f;
        for (int64_t g0 = k0, g1; g0 < k1; g0 = g1) { /* each group's share of [k0, k1) */
            g1 = (g0 / G + 1) * G < k1 ? (g0 / G + 1) * G : k1;
            /* bf16 fills whole 32-column chunks (w <= QSTREAM_W, a multiple of 32) */
            const int64_t wz = bf16 ? (w + 31) / 32 * 32 : w;
            for (int b = 0; b < m; b++) memset(part[b], 0, (size_t)wz * sizeof(float));
            int64_t k = g0;
            if (bf16) {
                bf16_stream_rows(q, m, x, ldx, g0, g1, c0, w, part);
                k = g1;
            }
            for (; k + 4 <= g1; k += 4) {
                __m512 xv[QMAXM][4];
                bcast4(x, ldx, k, m, xv);
                for (int64_t j = 0; j < w; j += 16) {
                    const __mmask16 mk = sm_mask16(w - j);
                    if (!bf16 && (j & 63) == 0) /* one 64-byte line of int8 codes per 4 steps */
                        for (int r = 4; r < 8; r++)
                            _mm_prefetch((const char *)q->codes + (k + r) * N + c0 + j, _MM_HINT_T0);
                    const __m512 a0 = codes16_avx512(q, bf16, k * N + c0 + j, mk);
                    const __m512 a1 = codes16_avx512(q, bf16, (k + 1) * N + c0 + j, mk);
                    const __m512 a2 = codes16_avx512(q, bf16, (k + 2) * N + c0 + j, mk);
                    const __m512 a3 = codes16_avx512(q, bf16, (k + 3) * N + c0 + j, mk);
                    for (int b = 0; b < m; b++) {
                        __m512 p = _mm512_load_ps(part[b] + j);
                        p = _mm512_fmadd_ps(xv[b][0], a0, p);
                        p = _mm512_fmadd_ps(xv[b][1], a1, p);
                        p = _mm512_fmadd_ps(xv[b][2], a2, p);
                        p = _mm512_fmadd_ps(xv[b][3], a3, p);
                        _mm512_store_ps(part[b] + j, p);
                    }
                }
            }
            for (; k < g1; k++)
                for (int64_t j = 0; j < w; j += 16) {
                    const __mmask16 mk = sm_mask16(w - j);
                    const __m512 a0 = codes16_avx512(q, bf16, k * N + c0 + j, mk);
                    for (int b = 0; b < m; b++) {
                        const __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(x[b * ldx + k]), a0,
                                                         _mm512_load_ps(part[b] + j));
                        _mm512_store_ps(part[b] + j, p);
                    }
                }
            for (int b = 0; b < m; b++) {
                float *yb = y + b * ldy + c0;
                if (bf16) { /* each 32 columns' sums are stored evens first: interleave them */
                    const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21,
                                                         6, 22, 7, 23);
                    const __m512i hi = _mm512_add_epi32(lo, _mm512_set1_epi32(8));
                    for (int64_t j = 0; j < w; j += 32) {
                        const __m512 e = _mm512_load_ps(part[b] + j);
                        const __m512 o = _mm512_load_ps(part[b] + j + 16);
                        _mm512_mask_storeu_ps(yb + j, sm_mask16(w - j),
                                              _mm512_permutex2var_ps(e, lo, o));
                        _mm512_mask_storeu_ps(yb + j + 16, sm_mask16(w - j - 16),
                                              _mm512_permutex2var_ps(e, hi, o));
                    }
                    continue;
                }
                const float *sg = q->scales + (g0 / G) * N + c0;
                for (int64_t j = 0; j < w; j += 16) {
                    const __mmask16 mk = sm_mask16(w - j);
                    const __m512 t = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, sg + j),
                                                     _mm512_load_ps(part[b] + j),
                                                     _mm512_maskz_loadu_ps(mk, yb + j));
                    _mm512_mask_storeu_ps(yb + j, mk, t);
                }
            }
        }
    }
}

SM_TARGET_AVX512
static void stream_avx512(const sm_qmat *q, int m, const float *x, int64_t ldx, int64_t k0,
                          int64_t k1, int64_t n0, int64_t n1, float *y, int64_t ldy) {
#define STREAM_CASE(BF, M) rows_stream_avx512(q, BF, M, x, ldx, k0, k1, n0, n1, y, ldy); return;
    SM_QDISPATCH(q->fmt == SM_QBF16, m, STREAM_CASE);
#undef STREAM_CASE
}

SM_TARGET_AVX512
static void rows_avx512(const sm_qmat *q, int m, const float *x, int64_t ldx, int64_t k0,
                        int64_t k1, int64_t n0, int64_t w, float *y, int64_t ldy) {
#define ROWS_CASE(BF, M) rows_tile_avx512(q, BF, M, x, ldx, k0, k1, n0, w, y, ldy); return;
    SM_QDISPATCH(q->fmt == SM_QBF16, m, ROWS_CASE);
#undef ROWS_CASE
}
#endif

int sm_qgemv(const sm_qmat *q, int64_t M, const float *x, int64_t ldx, int64_t k0, int64_t k1,
             int64_t n0, int64_t n1, float *y, int64_t ldy) {
    if (!q || !x || !y || M < 1 || k0 < 0 || k1 > q->K || k0 >= k1 || n0 < 0 || n1 > q->N ||
        n0 >= n1 || ldx < k1 || ldy < n1 || (q->fmt != SM_QBF16 && q->fmt != SM_QI8) ||
        (q->fmt == SM_QI8 && (q->group < 1 || q->K % q->group)))
        return SM_ERR_ARG;
    const int avx512 = SM_X86_KERNELS && sm_simd_active() >= SM_SIMD_AVX512;
    /* wide ranges stream (the same bits as the tiles: see rows_stream_avx512) */
    const int stream = avx512 && (n1 - n0) > QTILE;
    for (int64_t b0 = 0; b0 < M; b0 += QMAXM) {
        const int m = (int)(M - b0 < QMAXM ? M - b0 : QMAXM);
#if SM_X86_KERNELS
        if (stream) {
            stream_avx512(q, m, x + b0 * ldx, ldx, k0, k1, n0, n1, y + b0 * ldy, ldy);
            continue;
        }
#endif
        (void)stream;
        for (int64_t c0 = n0; c0 < n1; c0 += QTILE) {
            const int64_t w = n1 - c0 < QTILE ? n1 - c0 : QTILE;
#if SM_X86_KERNELS
            if (avx512) {
                rows_avx512(q, m, x + b0 * ldx, ldx, k0, k1, c0, w, y + b0 * ldy, ldy);
                continue;
            }
#endif
            (void)avx512;
            rows_tile_generic(q, m, x + b0 * ldx, ldx, k0, k1, c0, w, y + b0 * ldy, ldy);
        }
    }
    return SM_OK;
}

/* ---- the dots form -------------------------------------------------------------------------- */

/* y[b, n] for one stored row n: per group along k, a float32 sum of x * code in a fixed order
 * (16 lanes, then the lanes added in order), times the group's scale, added in group order. */
static void dots_row_generic(const sm_qmat *q, int64_t M, const float *x, int64_t ldx, int64_t n,
                             float *y, int64_t ldy) {
    const int64_t K = q->K, G = q->fmt == SM_QI8 ? q->group : K;
    for (int64_t b = 0; b < M; b++) {
        float tot = 0.0f;
        for (int64_t g0 = 0; g0 < K; g0 += G) {
            float lane[16] = {0};
            for (int64_t k = g0; k < g0 + G; k++)
                lane[(k - g0) % 16] = fmaf(x[b * ldx + k], code_at(q, n * K + k), lane[(k - g0) % 16]);
            float t = 0.0f;
            for (int l = 0; l < 16; l++) t += lane[l];
            tot = q->fmt == SM_QI8 ? fmaf(q->scales[n * (K / G) + g0 / G], t, tot) : t;
        }
        y[b * ldy + n] = tot;
    }
}

#if SM_X86_KERNELS
/* The same with four zmm accumulators per row of x: accumulator j's lane l takes k = g0 + 16 j
 * + l, g0 + 64 + 16 j + l, ... (the last < 64 of a group go 16 at a time to accumulators 0, 1,
 * 2, 3 in turn), then per group ((a0 + a1) + (a2 + a3)), times the group's
 * scale, is added lane by lane to the row's total, which is summed by _mm512_reduce_add_ps at
 * the end. Four independent chains, because one chain of FMAs waits 4 cycles per 16 weights -
 * slower than memory delivers int8 or bf16 codes; and one horizontal sum per row, not per group
 * (per 32 weights with group=32). The same terms as the generic path, added in another order. */
SM_TARGET_AVX512
SM_INLINE void dots_row_avx512(const sm_qmat *q, const int bf16, const int m, const float *x,
                               int64_t ldx, int64_t n, float *y, int64_t ldy) {
    const int64_t K = q->K, G = bf16 ? K : q->group;
    /* this row's scales, one per group, walked in step (no division per group) */
    const float *sc = bf16 ? NULL : q->scales + n * (K / G);
    __m512 total[QMAXM];
    for (int b = 0; b < m; b++) total[b] = _mm512_setzero_ps();
    for (int64_t g0 = 0; g0 < K; g0 += G) {
        __m512 acc[QMAXM][4];
        for (int b = 0; b < m; b++)
            for (int j = 0; j < 4; j++) acc[b][j] = _mm512_setzero_ps();
        const int64_t end = g0 + G;
        int64_t k = g0;
        for (; k + 64 <= end; k += 64) {
            { /* QPF: the stored rows are contiguous, so one stream, DOTS_PF bytes ahead */
                const char *ahead = (const char *)q->codes + (n * K + k) * (bf16 ? 2 : 1) + DOTS_PF;
                _mm_prefetch(ahead, _MM_HINT_T0);
                if (bf16) _mm_prefetch(ahead + 64, _MM_HINT_T0);
            }
            __m512 c[4];
            for (int j = 0; j < 4; j++) c[j] = codes16_avx512(q, bf16, n * K + k + 16 * j, 0xFFFF);
            for (int b = 0; b < m; b++)
                for (int j = 0; j < 4; j++)
                    acc[b][j] = _mm512_fmadd_ps(_mm512_loadu_ps(x + b * ldx + k + 16 * j), c[j],
                                                acc[b][j]);
        }
        if (k < end && !bf16) /* short groups (group=32): prefetch their stretch too */
            _mm_prefetch((const char *)q->codes + n * K + k + DOTS_PF, _MM_HINT_T0);
        for (int j = 0; j < 4; j++) { /* fixed bounds: unrolled, acc stays in registers */
            const int64_t kj = k + 16 * j;
            if (kj >= end) break;
            const __mmask16 mk = sm_mask16(end - kj);
            const __m512 c = codes16_avx512(q, bf16, n * K + kj, mk);
            for (int b = 0; b < m; b++)
                acc[b][j] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, x + b * ldx + kj), c, acc[b][j]);
        }
        const __m512 s = _mm512_set1_ps(bf16 ? 1.0f : *sc++);
        for (int b = 0; b < m; b++)
            total[b] = _mm512_fmadd_ps(s, _mm512_add_ps(_mm512_add_ps(acc[b][0], acc[b][1]),
                                                        _mm512_add_ps(acc[b][2], acc[b][3])),
                                       total[b]);
    }
    for (int b = 0; b < m; b++) y[b * ldy + n] = _mm512_reduce_add_ps(total[b]);
}

SM_TARGET_AVX512
static void dots_avx512(const sm_qmat *q, int m, const float *x, int64_t ldx, int64_t n0,
                        int64_t n1, float *y, int64_t ldy) {
#define DOTS_CASE(BF, M)                                                                           \
    for (int64_t n = n0; n < n1; n++) dots_row_avx512(q, BF, M, x, ldx, n, y, ldy);              \
    return;
    SM_QDISPATCH(q->fmt == SM_QBF16, m, DOTS_CASE);
#undef DOTS_CASE
}
#endif

int sm_qgemv_dots(const sm_qmat *q, int64_t M, const float *x, int64_t ldx, int64_t n0, int64_t n1,
                  float *y, int64_t ldy) {
    if (!q || !x || !y || M < 1 || n0 < 0 || n1 > q->N || n0 >= n1 || ldx < q->K || ldy < n1 ||
        (q->fmt != SM_QBF16 && q->fmt != SM_QI8) ||
        (q->fmt == SM_QI8 && (q->group < 1 || q->K % q->group)))
        return SM_ERR_ARG;
#if SM_X86_KERNELS
    /* lanes restart at each group: the vector path needs groups of whole 16-lane vectors */
    if (sm_simd_active() >= SM_SIMD_AVX512 && (q->fmt == SM_QBF16 || q->group % 16 == 0)) {
        for (int64_t b0 = 0; b0 < M; b0 += QMAXM) {
            const int m = (int)(M - b0 < QMAXM ? M - b0 : QMAXM);
            dots_avx512(q, m, x + b0 * ldx, ldx, n0, n1, y + b0 * ldy, ldy);
        }
        return SM_OK;
    }
#endif
    for (int64_t n = n0; n < n1; n++) dots_row_generic(q, M, x, ldx, n, y, ldy);
    return SM_OK;
}
