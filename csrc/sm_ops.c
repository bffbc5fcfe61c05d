/* sm_ops.c - elementwise and row kernels of a GPT training step (see sm_ops.h): embedding,
 * layernorm, GELU, softmax, cross-entropy, residual, bias, AdamW, gradient-norm clipping.
 * AVX-512 and AVX2+FMA versions of the hot loops are chosen per call from sm_simd_active();
 * the portable C path is written so compilers can vectorize it (it is what arm64 runs). Loops
 * that round each element once (add, accumulate, scale) have no intrinsics: one plain loop is
 * compiled per level (SM_EACH_LEVEL, sm_runtime.h).
 * Not here: matrix products (sm_gemm), attention (sm_attention).
 *
 * Determinism. Threads always own disjoint outputs:
 *   - row kernels (layernorm, softmax, cross-entropy, encoder forward, bias add) split rows;
 *   - elementwise kernels split [0, n) in grains of ELEM_GRAIN values, and every value is
 *     computed by the same vector code whatever range it falls in (tails use masked loads;
 *     the single-rounding loops finish with scalar code, which gives the same bits);
 *   - reductions over rows (dweight, dbias of layernorm and bias) use blocks of ROW_BLOCK rows
 *     (a constant, never derived from the thread count): each block's partial sums are made by
 *     one thread, then combined in block order in double by threads that own channel ranges;
 *   - the embedding scatter-add (dwte) is split over channel ranges, each walking the rows in
 *     order, so repeated tokens accumulate in the same order for any thread count;
 *   - the gradient norm sums fixed blocks of SM_NORM_BLOCK values in double, added in order.
 * So results are bitwise identical for any thread count. The SIMD level may change last bits,
 * except in the single-rounding kernels (residual, bias add, embedding, bias backward), where
 * every level gives the same bits.
 */
#include "sm_ops.h"

#include <math.h>
#include <string.h>

#include "sm_pool.h"
#include "sm_vecmath.h"
#include "sm_runtime.h"

#if SM_X86_KERNELS
#include <immintrin.h>
#endif

/* ---- work splitting ------------------------------------------------------------------------ */

/* Elementwise ranges are split in multiples of this (a few cache lines; whole vectors). */
#define ELEM_GRAIN 64
/* Rows per block of the deterministic reductions over rows (independent of thread count). */
#define ROW_BLOCK 64
/* Channel ranges are split in multiples of one cache line of floats. */
#define CH_GRAIN 16

/* Run fn(ctx, begin, end) over [0, n) split in `grain`s across a team sized for `work`. */
typedef void (*range_fn)(const void *ctx, int64_t begin, int64_t end);

static void run_ranges(range_fn fn, const void *ctx, int64_t n, int64_t grain, int64_t work,
                       int nthreads) {
    if (n <= 0) return;
    int nt = sm_team_size(nthreads, sm_ceil_div(n, grain), work);
    if (nt <= 1) {
        fn(ctx, 0, n);
        return;
    }
    SM_PARALLEL(nt)
    {
        int64_t b, e;
        sm_split_range(n, grain, SM_THREAD_COUNT(), SM_THREAD_ID(), &b, &e);
        if (e > b) fn(ctx, b, e);
    }
}

/* GELU as x * sigmoid(2u): 0.5 (1 + tanh(u)) == 1 / (1 + exp(-2u)), u = k (x + c x^3). This
 * needs one exp and one division, and stays accurate in both tails (no 1 - tanh cancellation). */
#define GELU_K 0.7978845608028654f      /* sqrt(2 / pi) */
#define GELU_C 0.044715f
#define GELU_M2K (-1.5957691216057308f) /* -2 k */
#define GELU_3CK 0.10703222440890037f   /* 3 c k */

SM_INLINE float gelu_generic(float x) {
    float inner = x + (GELU_C * x * x) * x;
    float e = sm_exp_scalar(GELU_M2K * inner);
    return x / (1.0f + e);
}

/* d gelu / dx = s + x * 2 s (1 - s) * du/dx with s = sigmoid(2u), 1 - s = e s, e = exp(-2u). */
SM_INLINE float gelu_grad_generic(float x) {
    float inner = x + (GELU_C * x * x) * x;
    float e = sm_exp_scalar(GELU_M2K * inner);
    float s = 1.0f / (1.0f + e);
    float oms = e * s;
    float dudx = GELU_K + GELU_3CK * (x * x);
    return s + (2.0f * x * dudx) * (s * oms);
}

#if SM_X86_KERNELS
/* ---- AVX-512 building blocks ---- */

SM_TARGET_AVX512 SM_INLINE __m512 gelu16(__m512 x) {
    __m512 x2c = _mm512_mul_ps(_mm512_mul_ps(x, x), _mm512_set1_ps(GELU_C));
    __m512 inner = _mm512_fmadd_ps(x2c, x, x);
    __m512 e = sm_exp_avx512(_mm512_mul_ps(inner, _mm512_set1_ps(GELU_M2K)));
    return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}

SM_TARGET_AVX512 SM_INLINE __m512 gelu_grad16(__m512 x) {
    __m512 xx = _mm512_mul_ps(x, x);
    __m512 inner = _mm512_fmadd_ps(_mm512_mul_ps(xx, _mm512_set1_ps(GELU_C)), x, x);
    __m512 e = sm_exp_avx512(_mm512_mul_ps(inner, _mm512_set1_ps(GELU_M2K)));
    __m512 s = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
    __m512 sos = _mm512_mul_ps(s, _mm512_mul_ps(e, s));
    __m512 dudx = _mm512_fmadd_ps(xx, _mm512_set1_ps(GELU_3CK), _mm512_set1_ps(GELU_K));
    __m512 t = _mm512_mul_ps(_mm512_add_ps(x, x), dudx);
    return _mm512_fmadd_ps(t, sos, s);
}

/* ---- AVX2 building blocks ---- */

/* r >= 8: a full vector; else the r remaining floats (zeros after). maskload is cheap, but
 * maskstore is microcoded on AMD cores (tens of cycles), so partial stores go through a stack
 * buffer; full vectors use plain loads and stores. Lane arithmetic is identical either way. */
SM_TARGET_AVX2 SM_INLINE __m256 load8(const float *p, int64_t r) {
    return r >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, sm_mask8(r));
}

SM_TARGET_AVX2 SM_INLINE void store8(float *p, __m256 v, int64_t r) {
    if (r >= 8) {
        _mm256_storeu_ps(p, v);
    } else {
        float t[8];
        _mm256_storeu_ps(t, v);
        memcpy(p, t, (size_t)r * sizeof(float));
    }
}

SM_TARGET_AVX2 SM_INLINE float hmax8(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

SM_TARGET_AVX2 SM_INLINE __m256 gelu8(__m256 x) {
    __m256 x2c = _mm256_mul_ps(_mm256_mul_ps(x, x), _mm256_set1_ps(GELU_C));
    __m256 inner = _mm256_fmadd_ps(x2c, x, x);
    __m256 e = sm_exp_avx2(_mm256_mul_ps(inner, _mm256_set1_ps(GELU_M2K)));
    return _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

SM_TARGET_AVX2 SM_INLINE __m256 gelu_grad8(__m256 x) {
    __m256 xx = _mm256_mul_ps(x, x);
    __m256 inner = _mm256_fmadd_ps(_mm256_mul_ps(xx, _mm256_set1_ps(GELU_C)), x, x);
    __m256 e = sm_exp_avx2(_mm256_mul_ps(inner, _mm256_set1_ps(GELU_M2K)));
    __m256 s = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(_mm256_set1_ps(1.0f), e));
    __m256 sos = _mm256_mul_ps(s, _mm256_mul_ps(e, s));
    __m256 dudx = _mm256_fmadd_ps(xx, _mm256_set1_ps(GELU_3CK), _mm256_set1_ps(GELU_K));
    __m256 t = _mm256_mul_ps(_mm256_add_ps(x, x), dudx);
    return _mm256_fmadd_ps(t, sos, s);
}
#endif /* SM_X86_KERNELS */

/* ---- vector add / accumulate: plain loops compiled per SIMD level (SM_EACH_LEVEL) ---------
 * One rounding per element, so every level gives the same bits. The pointers never overlap
 * (distinct arrays, or distinct rows of one). */

typedef void (*add_fn)(float *SM_RESTRICT o, const float *SM_RESTRICT a,
                       const float *SM_RESTRICT b, int64_t n);
typedef void (*acc_fn)(float *SM_RESTRICT d, const float *SM_RESTRICT s, int64_t n);

SM_INLINE void add_body(float *SM_RESTRICT o, const float *SM_RESTRICT a,
                        const float *SM_RESTRICT b, int64_t n) {
    for (int64_t i = 0; i < n; i++) o[i] = a[i] + b[i];
}
SM_EACH_LEVEL(add, (float *SM_RESTRICT o, const float *SM_RESTRICT a, const float *SM_RESTRICT b,
                    int64_t n), (o, a, b, n))

SM_INLINE void acc_body(float *SM_RESTRICT d, const float *SM_RESTRICT s, int64_t n) {
    for (int64_t i = 0; i < n; i++) d[i] += s[i];
}
SM_EACH_LEVEL(acc, (float *SM_RESTRICT d, const float *SM_RESTRICT s, int64_t n), (d, s, n))

static add_fn pick_add(int level) { return SM_PICK_LEVEL(add, level); }
static acc_fn pick_acc(int level) { return SM_PICK_LEVEL(acc, level); }

/* ================================================================================================
 * Token + position embedding
 * ============================================================================================== */

typedef struct {
    float *out;
    const int *idx;
    const float *wte, *wpe;
    int64_t T, C, V;
    add_fn add;
} enc_fwd_ctx;

static void enc_fwd_rows(const void *vc, int64_t r0, int64_t r1) {
    const enc_fwd_ctx *c = (const enc_fwd_ctx *)vc;
    for (int64_t r = r0; r < r1; r++) {
        int64_t t = r % c->T, id = c->idx[r];
        float *o = c->out + r * c->C;
        const float *pos = c->wpe + t * c->C;
        if (id >= 0 && id < c->V) c->add(o, c->wte + id * c->C, pos, c->C);
        else memcpy(o, pos, (size_t)c->C * sizeof(float));
    }
}

void sm_encoder_forward(float *out, const int *idx, const float *wte, const float *wpe,
                        int64_t B, int64_t T, int64_t C, int64_t V, int nthreads) {
    /* out (B,T,C), idx (B,T), wte (V,C), wpe (>=T,C) */
    if (B <= 0 || T <= 0 || C <= 0) return;
    enc_fwd_ctx c = {out, idx, wte, wpe, T, C, V, pick_add(sm_simd_active())};
    run_ranges(enc_fwd_rows, &c, B * T, 1, B * T * C, nthreads);
}

void sm_encoder_forward_naive(float *out, const int *idx, const float *wte, const float *wpe,
                              int64_t B, int64_t T, int64_t C, int64_t V) {
    /* out (B,T,C), idx (B,T), wte (V,C), wpe (>=T,C) */
    for (int64_t b = 0; b < B; b++)
        for (int64_t t = 0; t < T; t++) {
            int64_t id = idx[b * T + t];
            for (int64_t i = 0; i < C; i++) {
                float w = (id >= 0 && id < V) ? wte[id * C + i] : 0.0f;
                out[(b * T + t) * C + i] = w + wpe[t * C + i];
            }
        }
}

typedef struct {
    float *dwte, *dwpe;
    const float *dout;
    const int *idx;
    int64_t N, T, C, V;
    acc_fn acc;
} enc_bwd_ctx;

/* One thread's channel range [c0, c1) of every row, rows in order. */
static void enc_bwd_channels(const void *vc, int64_t c0, int64_t c1) {
    const enc_bwd_ctx *c = (const enc_bwd_ctx *)vc;
    const int64_t C = c->C, w = c1 - c0;
    for (int64_t r = 0; r < c->N; r++) {
        int64_t t = r % c->T, id = c->idx[r];
        const float *g = c->dout + r * C + c0;
        if (id >= 0 && id < c->V) c->acc(c->dwte + id * C + c0, g, w);
        c->acc(c->dwpe + t * C + c0, g, w);
    }
}

void sm_encoder_backward(float *dwte, float *dwpe, const float *dout, const int *idx,
                         int64_t B, int64_t T, int64_t C, int64_t V, int nthreads) {
    /* dwte (V,C), dwpe (>=T,C), dout (B,T,C), idx (B,T) */
    if (B <= 0 || T <= 0 || C <= 0) return;
    enc_bwd_ctx c = {dwte, dwpe, dout, idx, B * T, T, C, V, pick_acc(sm_simd_active())};
    int nt = sm_team_size(nthreads, sm_ceil_div(C, CH_GRAIN), B * T * C * 2);
    if (nt <= 1) {
        enc_bwd_channels(&c, 0, C);
        return;
    }
    /* Every row updates a dwte and a dwpe row in all threads' channel ranges at once, so a
     * cache line straddling two ranges would bounce between cores on every row. Range
     * boundaries are therefore put on 64-byte lines of dwte (exact for every row when C is a
     * multiple of 16 and dwpe is aligned alike, as in the model's parameter block): the first
     * `lead` channels go with the first range. Which thread adds a channel never changes its
     * sum, so this choice cannot change results. */
    int64_t lead = (int64_t)(((SM_ALIGN - (uintptr_t)dwte % SM_ALIGN) % SM_ALIGN) / sizeof(float));
    if (lead >= C || (uintptr_t)dwte % sizeof(float)) lead = 0;
    SM_PARALLEL(nt)
    {
        int64_t c0, c1;
        sm_split_range(C - lead, CH_GRAIN, SM_THREAD_COUNT(), SM_THREAD_ID(), &c0, &c1);
        c0 = c0 == 0 ? 0 : c0 + lead;
        c1 += lead;
        if (c1 > c0) enc_bwd_channels(&c, c0, c1);
    }
}

void sm_encoder_backward_naive(float *dwte, float *dwpe, const float *dout, const int *idx,
                               int64_t B, int64_t T, int64_t C, int64_t V) {
    /* dwte (V,C), dwpe (>=T,C), dout (B,T,C), idx (B,T) */
    for (int64_t r = 0; r < B * T; r++) {
        int64_t t = r % T, id = idx[r];
        for (int64_t i = 0; i < C; i++) {
            if (id >= 0 && id < V) dwte[id * C + i] += dout[r * C + i];
            dwpe[t * C + i] += dout[r * C + i];
        }
    }
}

/* ================================================================================================
 * Layernorm
 * ============================================================================================== */

typedef void (*ln_fwd_row_fn)(float *SM_RESTRICT o, float *mo, float *ro,
                              const float *SM_RESTRICT x, const float *SM_RESTRICT w,
                              const float *SM_RESTRICT b, int64_t C, float eps);

/* Portable row: 8 independent partial sums so the compiler can vectorize the reductions
 * without reassociating (no -ffast-math). */
static void ln_fwd_row_generic(float *SM_RESTRICT o, float *mo, float *ro,
                               const float *SM_RESTRICT x, const float *SM_RESTRICT w,
                               const float *SM_RESTRICT b, int64_t C, float eps) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t full = C & ~(int64_t)7, i;
    for (i = 0; i < full; i += 8)
        for (int l = 0; l < 8; l++) acc[l] += x[i + l];
    for (; i < C; i++) acc[i - full] += x[i];
    float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    float mean = s / (float)C;
    for (int l = 0; l < 8; l++) acc[l] = 0.0f;
    for (i = 0; i < full; i += 8)
        for (int l = 0; l < 8; l++) {
            float d = x[i + l] - mean;
            acc[l] += d * d;
        }
    for (; i < C; i++) {
        float d = x[i] - mean;
        acc[i - full] += d * d;
    }
    float var = (((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))) / (float)C;
    float rs = 1.0f / sqrtf(var + eps);
    for (i = 0; i < C; i++) o[i] = ((x[i] - mean) * rs) * w[i] + b[i];
    if (mo) *mo = mean;
    if (ro) *ro = rs;
}

#if SM_X86_KERNELS
SM_TARGET_AVX512 static void ln_fwd_row_avx512(float *SM_RESTRICT o, float *mo, float *ro,
                                               const float *SM_RESTRICT x,
                                               const float *SM_RESTRICT w,
                                               const float *SM_RESTRICT b, int64_t C, float eps) {
    const int64_t full = C & ~(int64_t)15;
    const __mmask16 tm = sm_mask16(C - full);
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= full; i += 32) {
        s0 = _mm512_add_ps(s0, _mm512_loadu_ps(x + i));
        s1 = _mm512_add_ps(s1, _mm512_loadu_ps(x + i + 16));
    }
    if (i < full) s0 = _mm512_add_ps(s0, _mm512_loadu_ps(x + i));
    if (tm) s1 = _mm512_add_ps(s1, _mm512_maskz_loadu_ps(tm, x + full));
    const float mean = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1)) / (float)C;
    const __m512 vm = _mm512_set1_ps(mean);
    s0 = _mm512_setzero_ps();
    s1 = _mm512_setzero_ps();
    for (i = 0; i + 32 <= full; i += 32) {
        __m512 d0 = _mm512_sub_ps(_mm512_loadu_ps(x + i), vm);
        __m512 d1 = _mm512_sub_ps(_mm512_loadu_ps(x + i + 16), vm);
        s0 = _mm512_fmadd_ps(d0, d0, s0);
        s1 = _mm512_fmadd_ps(d1, d1, s1);
    }
    if (i < full) {
        __m512 d0 = _mm512_sub_ps(_mm512_loadu_ps(x + i), vm);
        s0 = _mm512_fmadd_ps(d0, d0, s0);
    }
    if (tm) {
        __m512 d1 = _mm512_maskz_sub_ps(tm, _mm512_maskz_loadu_ps(tm, x + full), vm);
        s1 = _mm512_fmadd_ps(d1, d1, s1);
    }
    const float var = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1)) / (float)C;
    const float rs = 1.0f / sqrtf(var + eps);
    const __m512 vr = _mm512_set1_ps(rs);
    for (i = 0; i < full; i += 16) {
        __m512 nrm = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), vm), vr);
        _mm512_storeu_ps(o + i, _mm512_fmadd_ps(nrm, _mm512_loadu_ps(w + i), _mm512_loadu_ps(b + i)));
    }
    if (tm) {
        __m512 nrm = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(tm, x + full), vm), vr);
        _mm512_mask_storeu_ps(o + full, tm, _mm512_fmadd_ps(nrm, _mm512_maskz_loadu_ps(tm, w + full),
                                                            _mm512_maskz_loadu_ps(tm, b + full)));
    }
    if (mo) *mo = mean;
    if (ro) *ro = rs;
}

SM_TARGET_AVX2 static void ln_fwd_row_avx2(float *SM_RESTRICT o, float *mo, float *ro,
                                           const float *SM_RESTRICT x, const float *SM_RESTRICT w,
                                           const float *SM_RESTRICT b, int64_t C, float eps) {
    const int64_t full = C & ~(int64_t)7;
    const int has_tail = C > full;
    const __m256i tm = sm_mask8(C - full);
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= full; i += 16) {
        s0 = _mm256_add_ps(s0, _mm256_loadu_ps(x + i));
        s1 = _mm256_add_ps(s1, _mm256_loadu_ps(x + i + 8));
    }
    if (i < full) s0 = _mm256_add_ps(s0, _mm256_loadu_ps(x + i));
    if (has_tail) s1 = _mm256_add_ps(s1, _mm256_maskload_ps(x + full, tm));
    const float mean = sm_hsum8(_mm256_add_ps(s0, s1)) / (float)C;
    const __m256 vm = _mm256_set1_ps(mean);
    s0 = _mm256_setzero_ps();
    s1 = _mm256_setzero_ps();
    for (i = 0; i + 16 <= full; i += 16) {
        __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(x + i), vm);
        __m256 d1 = _mm256_sub_ps(_mm256_loadu_ps(x + i + 8), vm);
        s0 = _mm256_fmadd_ps(d0, d0, s0);
        s1 = _mm256_fmadd_ps(d1, d1, s1);
    }
    if (i < full) {
        __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(x + i), vm);
        s0 = _mm256_fmadd_ps(d0, d0, s0);
    }
    if (has_tail) {
        __m256 d1 = _mm256_and_ps(_mm256_sub_ps(_mm256_maskload_ps(x + full, tm), vm),
                                  _mm256_castsi256_ps(tm));
        s1 = _mm256_fmadd_ps(d1, d1, s1);
    }
    const float var = sm_hsum8(_mm256_add_ps(s0, s1)) / (float)C;
    const float rs = 1.0f / sqrtf(var + eps);
    const __m256 vr = _mm256_set1_ps(rs);
    for (i = 0; i < full; i += 8) {
        __m256 nrm = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm), vr);
        _mm256_storeu_ps(o + i, _mm256_fmadd_ps(nrm, _mm256_loadu_ps(w + i), _mm256_loadu_ps(b + i)));
    }
    if (has_tail) {
        __m256 nrm = _mm256_mul_ps(_mm256_sub_ps(_mm256_maskload_ps(x + full, tm), vm), vr);
        store8(o + full, _mm256_fmadd_ps(nrm, _mm256_maskload_ps(w + full, tm),
                                         _mm256_maskload_ps(b + full, tm)), C - full);
    }
    if (mo) *mo = mean;
    if (ro) *ro = rs;
}
#endif

typedef struct {
    float *out, *mean, *rstd;
    const float *inp, *w, *b;
    int64_t C;
    float eps;
    ln_fwd_row_fn row;
} ln_fwd_ctx;

static void ln_fwd_rows(const void *vc, int64_t r0, int64_t r1) {
    const ln_fwd_ctx *c = (const ln_fwd_ctx *)vc;
    for (int64_t r = r0; r < r1; r++)
        c->row(c->out + r * c->C, c->mean ? c->mean + r : NULL, c->rstd ? c->rstd + r : NULL,
               c->inp + r * c->C, c->w, c->b, c->C, c->eps);
}

void sm_layernorm_forward(float *out, float *mean, float *rstd, const float *inp,
                          const float *weight, const float *bias, int64_t N, int64_t C, float eps,
                          int nthreads) {
    /* out, inp (N,C); weight, bias (C); mean, rstd (N) or NULL */
    if (N <= 0 || C <= 0) return;
    int level = sm_simd_active();
    ln_fwd_row_fn row = ln_fwd_row_generic;
#if SM_X86_KERNELS
    if (level >= SM_SIMD_AVX512) row = ln_fwd_row_avx512;
    else if (level >= SM_SIMD_AVX2) row = ln_fwd_row_avx2;
#endif
    (void)level;
    ln_fwd_ctx c = {out, mean, rstd, inp, weight, bias, C, eps, row};
    run_ranges(ln_fwd_rows, &c, N, 1, N * C * 3, nthreads);
}

void sm_layernorm_forward_naive(float *out, float *mean, float *rstd, const float *inp,
                                const float *weight, const float *bias, int64_t N, int64_t C,
                                float eps) {
    /* out, inp (N,C); weight, bias (C); mean, rstd (N) or NULL */
    for (int64_t r = 0; r < N; r++) {
        const float *x = inp + r * C;
        double m = 0.0, v = 0.0;
        for (int64_t i = 0; i < C; i++) m += x[i];
        m /= (double)C;
        for (int64_t i = 0; i < C; i++) v += (x[i] - m) * (x[i] - m);
        v /= (double)C;
        double rs = 1.0 / sqrt(v + (double)eps);
        for (int64_t i = 0; i < C; i++)
            out[r * C + i] = (float)((x[i] - m) * rs * weight[i] + bias[i]);
        if (mean) mean[r] = (float)m;
        if (rstd) rstd[r] = (float)rs;
    }
}

/* Layernorm backward, one row: dx += ((w dy) - mean(w dy) - xhat mean(w dy xhat)) * rstd,
 * and the row's contributions dy*xhat, dy added into the block partials pw, pb. */
typedef void (*ln_bwd_row_fn)(float *SM_RESTRICT dx, float *SM_RESTRICT pw,
                              float *SM_RESTRICT pb, const float *SM_RESTRICT dy,
                              const float *SM_RESTRICT x, const float *SM_RESTRICT w, float mean,
                              float rstd, int64_t C);

static void ln_bwd_row_generic(float *SM_RESTRICT dx, float *SM_RESTRICT pw,
                               float *SM_RESTRICT pb, const float *SM_RESTRICT dy,
                               const float *SM_RESTRICT x, const float *SM_RESTRICT w, float mean,
                               float rstd, int64_t C) {
    float a[8] = {0, 0, 0, 0, 0, 0, 0, 0}, s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t full = C & ~(int64_t)7, i;
    for (i = 0; i < full; i += 8)
        for (int l = 0; l < 8; l++) {
            float xh = (x[i + l] - mean) * rstd, dn = w[i + l] * dy[i + l];
            a[l] += dn;
            s[l] += dn * xh;
        }
    for (; i < C; i++) {
        float xh = (x[i] - mean) * rstd, dn = w[i] * dy[i];
        a[i - full] += dn;
        s[i - full] += dn * xh;
    }
    float dnm = (((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))) / (float)C;
    float dnnm = (((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]))) / (float)C;
    for (i = 0; i < C; i++) {
        float xh = (x[i] - mean) * rstd, dn = w[i] * dy[i];
        pw[i] += dy[i] * xh;
        pb[i] += dy[i];
        dx[i] += ((dn - dnm) - xh * dnnm) * rstd;
    }
}

#if SM_X86_KERNELS
SM_TARGET_AVX512 static void ln_bwd_row_avx512(float *SM_RESTRICT dx, float *SM_RESTRICT pw,
                                               float *SM_RESTRICT pb,
                                               const float *SM_RESTRICT dy,
                                               const float *SM_RESTRICT x,
                                               const float *SM_RESTRICT w, float mean, float rstd,
                                               int64_t C) {
    const int64_t full = C & ~(int64_t)15;
    const __mmask16 tm = sm_mask16(C - full);
    const __m512 vm = _mm512_set1_ps(mean), vr = _mm512_set1_ps(rstd);
    __m512 a = _mm512_setzero_ps(), s = _mm512_setzero_ps();
    int64_t i;
    for (i = 0; i < full; i += 16) {
        __m512 xh = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), vm), vr);
        __m512 dn = _mm512_mul_ps(_mm512_loadu_ps(w + i), _mm512_loadu_ps(dy + i));
        a = _mm512_add_ps(a, dn);
        s = _mm512_fmadd_ps(dn, xh, s);
    }
    if (tm) { /* masked lanes: dn = 0, so they add nothing */
        __m512 xh = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(tm, x + full), vm), vr);
        __m512 dn = _mm512_mul_ps(_mm512_maskz_loadu_ps(tm, w + full), _mm512_maskz_loadu_ps(tm, dy + full));
        a = _mm512_add_ps(a, dn);
        s = _mm512_fmadd_ps(dn, xh, s);
    }
    const __m512 dnm = _mm512_set1_ps(_mm512_reduce_add_ps(a) / (float)C);
    const __m512 dnnm = _mm512_set1_ps(_mm512_reduce_add_ps(s) / (float)C);
    for (i = 0; i < C; i += 16) {
        __mmask16 m = sm_mask16(C - i);
        __m512 xv = _mm512_maskz_loadu_ps(m, x + i), g = _mm512_maskz_loadu_ps(m, dy + i);
        __m512 xh = _mm512_mul_ps(_mm512_sub_ps(xv, vm), vr);
        __m512 dn = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, w + i), g);
        _mm512_mask_storeu_ps(pw + i, m, _mm512_fmadd_ps(g, xh, _mm512_maskz_loadu_ps(m, pw + i)));
        _mm512_mask_storeu_ps(pb + i, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, pb + i), g));
        __m512 t = _mm512_fnmadd_ps(xh, dnnm, _mm512_sub_ps(dn, dnm));
        _mm512_mask_storeu_ps(dx + i, m, _mm512_fmadd_ps(t, vr, _mm512_maskz_loadu_ps(m, dx + i)));
    }
}

SM_TARGET_AVX2 static void ln_bwd_row_avx2(float *SM_RESTRICT dx, float *SM_RESTRICT pw,
                                           float *SM_RESTRICT pb, const float *SM_RESTRICT dy,
                                           const float *SM_RESTRICT x, const float *SM_RESTRICT w,
                                           float mean, float rstd, int64_t C) {
    const __m256 vm = _mm256_set1_ps(mean), vr = _mm256_set1_ps(rstd);
    __m256 a = _mm256_setzero_ps(), s = _mm256_setzero_ps();
    int64_t i;
    for (i = 0; i < C; i += 8) { /* lanes past C load 0: dn = 0 adds nothing */
        int64_t r = C - i;
        __m256 xh = _mm256_mul_ps(_mm256_sub_ps(load8(x + i, r), vm), vr);
        __m256 dn = _mm256_mul_ps(load8(w + i, r), load8(dy + i, r));
        a = _mm256_add_ps(a, dn);
        s = _mm256_fmadd_ps(dn, xh, s);
    }
    const __m256 dnm = _mm256_set1_ps(sm_hsum8(a) / (float)C);
    const __m256 dnnm = _mm256_set1_ps(sm_hsum8(s) / (float)C);
    for (i = 0; i < C; i += 8) {
        int64_t r = C - i;
        __m256 g = load8(dy + i, r);
        __m256 xh = _mm256_mul_ps(_mm256_sub_ps(load8(x + i, r), vm), vr);
        __m256 dn = _mm256_mul_ps(load8(w + i, r), g);
        store8(pw + i, _mm256_fmadd_ps(g, xh, load8(pw + i, r)), r);
        store8(pb + i, _mm256_add_ps(load8(pb + i, r), g), r);
        __m256 t = _mm256_fnmadd_ps(xh, dnnm, _mm256_sub_ps(dn, dnm));
        store8(dx + i, _mm256_fmadd_ps(t, vr, load8(dx + i, r)), r);
    }
}
#endif

/* dst[k][c] += sum over blocks of part[blk][k][c], for channels [c0, c1), blocks in order,
 * in double. part is laid out (nblocks, nvec, Cp). */
static void combine_blocks(float *const *dst, int nvec, const float *part, int64_t nblocks,
                           int64_t Cp, int64_t c0, int64_t c1) {
    double acc[2][64];
    for (int64_t cb = c0; cb < c1; cb += 64) {
        int64_t w = c1 - cb < 64 ? c1 - cb : 64;
        for (int k = 0; k < nvec; k++)
            for (int64_t j = 0; j < w; j++) acc[k][j] = 0.0;
        for (int64_t blk = 0; blk < nblocks; blk++) {
            const float *pp = part + blk * nvec * Cp + cb;
            for (int k = 0; k < nvec; k++)
                for (int64_t j = 0; j < w; j++) acc[k][j] += pp[k * Cp + j];
        }
        for (int k = 0; k < nvec; k++)
            for (int64_t j = 0; j < w; j++)
                dst[k][cb + j] = (float)((double)dst[k][cb + j] + acc[k][j]);
    }
}

int64_t sm_layernorm_backward_scratch(int64_t N, int64_t C) {
    if (N <= 0 || C <= 0) return 0;
    return sm_ceil_div(N, ROW_BLOCK) * 2 * sm_round_up(C, 16);
}

int sm_layernorm_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                          const float *inp, const float *weight, const float *mean,
                          const float *rstd, int64_t N, int64_t C, float *scratch, int nthreads) {
    /* dinp, dout, inp (N,C); dweight, dbias, weight (C); mean, rstd (N);
     * scratch (nblocks, 2, Cp): per block of ROW_BLOCK rows, partial dweight and dbias */
    if (N <= 0 || C <= 0) return SM_OK;
    const int64_t Cp = sm_round_up(C, 16), nblocks = sm_ceil_div(N, ROW_BLOCK);
    float *owned = NULL, *part = scratch;
    if (!part) {
        owned = part = (float *)sm_pool_rent(sm_pool_default(), (size_t)sm_layernorm_backward_scratch(N, C) * sizeof(float));
        if (!part) return SM_ERR_NOMEM;
    }
    int level = sm_simd_active();
    ln_bwd_row_fn row = ln_bwd_row_generic;
#if SM_X86_KERNELS
    if (level >= SM_SIMD_AVX512) row = ln_bwd_row_avx512;
    else if (level >= SM_SIMD_AVX2) row = ln_bwd_row_avx2;
#endif
    (void)level;
    int nt = sm_team_size(nthreads, nblocks, N * C * 4);
    (void)nt; /* unused without OpenMP */
    SM_PARALLEL(nt)
    {
        int nth = SM_THREAD_COUNT(), tid = SM_THREAD_ID();
        int64_t b0, b1, c0, c1;
        sm_split_range(nblocks, 1, nth, tid, &b0, &b1);
        for (int64_t blk = b0; blk < b1; blk++) {
            float *pw = part + blk * 2 * Cp, *pb = pw + Cp;
            memset(pw, 0, (size_t)(2 * Cp) * sizeof(float));
            int64_t r1 = (blk + 1) * ROW_BLOCK < N ? (blk + 1) * ROW_BLOCK : N;
            for (int64_t r = blk * ROW_BLOCK; r < r1; r++)
                row(dinp + r * C, pw, pb, dout + r * C, inp + r * C, weight, mean[r], rstd[r], C);
        }
        SM_BARRIER();
        sm_split_range(C, CH_GRAIN, nth, tid, &c0, &c1);
        float *dst[2] = {dweight, dbias};
        if (c1 > c0) combine_blocks(dst, 2, part, nblocks, Cp, c0, c1);
    }
    sm_pool_return(owned);
    return SM_OK;
}

void sm_layernorm_backward_naive(float *dinp, float *dweight, float *dbias, const float *dout,
                                 const float *inp, const float *weight, const float *mean,
                                 const float *rstd, int64_t N, int64_t C) {
    /* dinp, dout, inp (N,C); dweight, dbias, weight (C); mean, rstd (N) */
    for (int64_t r = 0; r < N; r++) {
        const float *x = inp + r * C, *dy = dout + r * C;
        double m = mean[r], rs = rstd[r], a = 0.0, s = 0.0;
        for (int64_t i = 0; i < C; i++) {
            double xh = (x[i] - m) * rs, dn = (double)weight[i] * dy[i];
            a += dn;
            s += dn * xh;
        }
        a /= (double)C;
        s /= (double)C;
        for (int64_t i = 0; i < C; i++) {
            double xh = (x[i] - m) * rs, dn = (double)weight[i] * dy[i];
            dinp[r * C + i] = (float)(dinp[r * C + i] + (dn - a - xh * s) * rs);
        }
    }
    for (int64_t i = 0; i < C; i++) {
        double sw = 0.0, sb = 0.0;
        for (int64_t r = 0; r < N; r++) {
            double xh = (inp[r * C + i] - (double)mean[r]) * rstd[r];
            sw += dout[r * C + i] * xh;
            sb += dout[r * C + i];
        }
        dweight[i] = (float)(dweight[i] + sw);
        dbias[i] = (float)(dbias[i] + sb);
    }
}

/* ================================================================================================
 * GELU
 * ============================================================================================== */

typedef struct {
    float *out;
    const float *inp, *dout;
} ew_ctx;

/* (pointers are copied to restrict locals so the compiler sees no aliasing and vectorizes) */
static void gelu_fwd_generic(const void *vc, int64_t i0, int64_t i1) {
    const ew_ctx *c = (const ew_ctx *)vc;
    float *SM_RESTRICT o = c->out;
    const float *SM_RESTRICT x = c->inp;
    for (int64_t i = i0; i < i1; i++) o[i] = gelu_generic(x[i]);
}
static void gelu_bwd_generic(const void *vc, int64_t i0, int64_t i1) {
    const ew_ctx *c = (const ew_ctx *)vc;
    float *SM_RESTRICT d = c->out;
    const float *SM_RESTRICT x = c->inp, *SM_RESTRICT g = c->dout;
    for (int64_t i = i0; i < i1; i++) d[i] += gelu_grad_generic(x[i]) * g[i];
}

#if SM_X86_KERNELS
SM_TARGET_AVX512 static void gelu_fwd_avx512(const void *vc, int64_t i0, int64_t i1) {
    const ew_ctx *c = (const ew_ctx *)vc;
    float *o = c->out;
    const float *x = c->inp;
    int64_t i = i0;
    for (; i + 32 <= i1; i += 32) {
        __m512 a = gelu16(_mm512_loadu_ps(x + i)), b = gelu16(_mm512_loadu_ps(x + i + 16));
        _mm512_storeu_ps(o + i, a);
        _mm512_storeu_ps(o + i + 16, b);
    }
    for (; i < i1; i += 16) {
        __mmask16 m = sm_mask16(i1 - i);
        _mm512_mask_storeu_ps(o + i, m, gelu16(_mm512_maskz_loadu_ps(m, x + i)));
    }
}
SM_TARGET_AVX512 static void gelu_bwd_avx512(const void *vc, int64_t i0, int64_t i1) {
    const ew_ctx *c = (const ew_ctx *)vc;
    float *d = c->out;
    const float *x = c->inp, *g = c->dout;
    for (int64_t i = i0; i < i1; i += 16) {
        __mmask16 m = sm_mask16(i1 - i);
        __m512 gr = gelu_grad16(_mm512_maskz_loadu_ps(m, x + i));
        _mm512_mask_storeu_ps(d + i, m, _mm512_fmadd_ps(gr, _mm512_maskz_loadu_ps(m, g + i),
                                                        _mm512_maskz_loadu_ps(m, d + i)));
    }
}
SM_TARGET_AVX2 static void gelu_fwd_avx2(const void *vc, int64_t i0, int64_t i1) {
    const ew_ctx *c = (const ew_ctx *)vc;
    for (int64_t i = i0; i < i1; i += 8) store8(c->out + i, gelu8(load8(c->inp + i, i1 - i)), i1 - i);
}
SM_TARGET_AVX2 static void gelu_bwd_avx2(const void *vc, int64_t i0, int64_t i1) {
    const ew_ctx *c = (const ew_ctx *)vc;
    for (int64_t i = i0; i < i1; i += 8) {
        int64_t r = i1 - i;
        __m256 gr = gelu_grad8(load8(c->inp + i, r));
        store8(c->out + i, _mm256_fmadd_ps(gr, load8(c->dout + i, r), load8(c->out + i, r)), r);
    }
}
#endif

void sm_gelu_forward(float *out, const float *inp, int64_t n, int nthreads) {
    /* out, inp (n) */
    int level = sm_simd_active();
    range_fn fn = gelu_fwd_generic;
#if SM_X86_KERNELS
    if (level >= SM_SIMD_AVX512) fn = gelu_fwd_avx512;
    else if (level >= SM_SIMD_AVX2) fn = gelu_fwd_avx2;
#endif
    (void)level;
    ew_ctx c = {out, inp, NULL};
    run_ranges(fn, &c, n, ELEM_GRAIN, n * 8, nthreads);
}

void sm_gelu_backward(float *dinp, const float *inp, const float *dout, int64_t n, int nthreads) {
    /* dinp, inp, dout (n) */
    int level = sm_simd_active();
    range_fn fn = gelu_bwd_generic;
#if SM_X86_KERNELS
    if (level >= SM_SIMD_AVX512) fn = gelu_bwd_avx512;
    else if (level >= SM_SIMD_AVX2) fn = gelu_bwd_avx2;
#endif
    (void)level;
    ew_ctx c = {dinp, inp, dout};
    run_ranges(fn, &c, n, ELEM_GRAIN, n * 10, nthreads);
}

void sm_gelu_forward_naive(float *out, const float *inp, int64_t n) {
    /* out, inp (n) */
    const double k = 0.79788456080286535588; /* sqrt(2/pi) */
    for (int64_t i = 0; i < n; i++) {
        double x = inp[i];
        out[i] = (float)(0.5 * x * (1.0 + tanh(k * (x + 0.044715 * x * x * x))));
    }
}

void sm_gelu_backward_naive(float *dinp, const float *inp, const float *dout, int64_t n) {
    /* dinp, inp, dout (n) */
    const double k = 0.79788456080286535588;
    for (int64_t i = 0; i < n; i++) {
        double x = inp[i];
        double th = tanh(k * (x + 0.044715 * x * x * x));
        double g = 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * k * (1.0 + 3.0 * 0.044715 * x * x);
        dinp[i] = (float)(dinp[i] + g * dout[i]);
    }
}

/* ================================================================================================
 * Softmax and cross-entropy
 * ============================================================================================== */

/* Row primitives: max, sum of exp((x - max) * scale) (optionally stored), and the gradient
 * row dl += exp(x - lse) * d. */
typedef struct {
    float (*rowmax)(const float *x, int64_t V);
    float (*sumexp)(float *store, const float *x, int64_t V, float mx, float scale);
    void (*scale)(float *p, int64_t V, float s);
    void (*grad)(float *dl, const float *x, int64_t V, float lse, float d);
} row_ops;

static float rowmax_generic(const float *x, int64_t V) {
    float m[8];
    int64_t full = V & ~(int64_t)7, i;
    for (int l = 0; l < 8; l++) m[l] = -INFINITY;
    for (i = 0; i < full; i += 8)
        for (int l = 0; l < 8; l++) m[l] = x[i + l] > m[l] ? x[i + l] : m[l];
    for (; i < V; i++) m[i - full] = x[i] > m[i - full] ? x[i] : m[i - full];
    float r = m[0];
    for (int l = 1; l < 8; l++) r = m[l] > r ? m[l] : r;
    return r;
}
static float sumexp_generic(float *store, const float *x, int64_t V, float mx, float scale) {
    float s[8] = {0, 0, 0, 0, 0, 0, 0, 0}, e[8];
    int64_t i = 0;
    for (; i + 8 <= V; i += 8) {
        for (int l = 0; l < 8; l++) {
            e[l] = sm_exp_scalar((x[i + l] - mx) * scale);
            s[l] += e[l];
        }
        if (store) memcpy(store + i, e, sizeof e);
    }
    for (; i < V; i++) {
        float t = sm_exp_scalar((x[i] - mx) * scale);
        if (store) store[i] = t;
        s[i & 7] += t;
    }
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}
/* p *= s: one rounding per element, the same bits on every level (SM_EACH_LEVEL) */
SM_INLINE void scale_body(float *SM_RESTRICT p, int64_t V, float s) {
    for (int64_t i = 0; i < V; i++) p[i] *= s;
}
SM_EACH_LEVEL(scale, (float *SM_RESTRICT p, int64_t V, float s), (p, V, s))
static void grad_generic(float *dl, const float *x, int64_t V, float lse, float d) {
    for (int64_t i = 0; i < V; i++) dl[i] += sm_exp_scalar(x[i] - lse) * d;
}

#if SM_X86_KERNELS
SM_TARGET_AVX512 static float rowmax_avx512(const float *x, int64_t V) {
    __m512 m0 = _mm512_set1_ps(-INFINITY), m1 = m0;
    int64_t i = 0;
    for (; i + 32 <= V; i += 32) {
        m0 = _mm512_max_ps(m0, _mm512_loadu_ps(x + i));
        m1 = _mm512_max_ps(m1, _mm512_loadu_ps(x + i + 16));
    }
    for (; i < V; i += 16)
        m0 = _mm512_max_ps(m0, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), sm_mask16(V - i), x + i));
    return _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
}
SM_TARGET_AVX512 static float sumexp_avx512(float *store, const float *x, int64_t V, float mx,
                                            float scale) {
    const __m512 vm = _mm512_set1_ps(mx), vs = _mm512_set1_ps(scale);
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= V; i += 32) {
        __m512 e0 = sm_exp_avx512(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), vm), vs));
        __m512 e1 = sm_exp_avx512(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i + 16), vm), vs));
        if (store) {
            _mm512_storeu_ps(store + i, e0);
            _mm512_storeu_ps(store + i + 16, e1);
        }
        s0 = _mm512_add_ps(s0, e0);
        s1 = _mm512_add_ps(s1, e1);
    }
    for (; i < V; i += 16) {
        __mmask16 m = sm_mask16(V - i);
        __m512 e = sm_exp_avx512(_mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), vm), vs));
        e = _mm512_maskz_mov_ps(m, e);
        if (store) _mm512_mask_storeu_ps(store + i, m, e);
        s0 = _mm512_add_ps(s0, e);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}
SM_TARGET_AVX512 static void grad_avx512(float *dl, const float *x, int64_t V, float lse, float d) {
    const __m512 vl = _mm512_set1_ps(lse), vd = _mm512_set1_ps(d);
    int64_t i = 0;
    for (; i + 16 <= V; i += 16) {
        __m512 p = sm_exp_avx512(_mm512_sub_ps(_mm512_loadu_ps(x + i), vl));
        _mm512_storeu_ps(dl + i, _mm512_fmadd_ps(p, vd, _mm512_loadu_ps(dl + i)));
    }
    if (i < V) {
        __mmask16 m = sm_mask16(V - i);
        __m512 p = sm_exp_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), vl));
        _mm512_mask_storeu_ps(dl + i, m, _mm512_fmadd_ps(p, vd, _mm512_maskz_loadu_ps(m, dl + i)));
    }
}

SM_TARGET_AVX2 static float rowmax_avx2(const float *x, int64_t V) {
    __m256 m0 = _mm256_set1_ps(-INFINITY), m1 = m0;
    int64_t i = 0;
    for (; i + 16 <= V; i += 16) {
        m0 = _mm256_max_ps(m0, _mm256_loadu_ps(x + i));
        m1 = _mm256_max_ps(m1, _mm256_loadu_ps(x + i + 8));
    }
    for (; i + 8 <= V; i += 8) m0 = _mm256_max_ps(m0, _mm256_loadu_ps(x + i));
    float r = hmax8(_mm256_max_ps(m0, m1));
    for (; i < V; i++) r = x[i] > r ? x[i] : r;
    return r;
}
SM_TARGET_AVX2 static float sumexp_avx2(float *store, const float *x, int64_t V, float mx,
                                        float scale) {
    const __m256 vm = _mm256_set1_ps(mx), vs = _mm256_set1_ps(scale);
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= V; i += 16) {
        __m256 e0 = sm_exp_avx2(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm), vs));
        __m256 e1 = sm_exp_avx2(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i + 8), vm), vs));
        if (store) {
            _mm256_storeu_ps(store + i, e0);
            _mm256_storeu_ps(store + i + 8, e1);
        }
        s0 = _mm256_add_ps(s0, e0);
        s1 = _mm256_add_ps(s1, e1);
    }
    for (; i < V; i += 8) {
        __m256i m = sm_mask8(V - i);
        __m256 e = sm_exp_avx2(_mm256_mul_ps(_mm256_sub_ps(_mm256_maskload_ps(x + i, m), vm), vs));
        e = _mm256_and_ps(e, _mm256_castsi256_ps(m));
        if (store) store8(store + i, e, V - i);
        s0 = _mm256_add_ps(s0, e);
    }
    return sm_hsum8(_mm256_add_ps(s0, s1));
}
SM_TARGET_AVX2 static void grad_avx2(float *dl, const float *x, int64_t V, float lse, float d) {
    const __m256 vl = _mm256_set1_ps(lse), vd = _mm256_set1_ps(d);
    for (int64_t i = 0; i < V; i += 8) {
        int64_t r = V - i;
        __m256 p = sm_exp_avx2(_mm256_sub_ps(load8(x + i, r), vl));
        store8(dl + i, _mm256_fmadd_ps(p, vd, load8(dl + i, r)), r);
    }
}
#endif

static row_ops pick_row_ops(int level) {
#if SM_X86_KERNELS
    if (level >= SM_SIMD_AVX512) return (row_ops){rowmax_avx512, sumexp_avx512, scale_avx512, grad_avx512};
    if (level >= SM_SIMD_AVX2) return (row_ops){rowmax_avx2, sumexp_avx2, scale_avx2, grad_avx2};
#endif
    (void)level;
    return (row_ops){rowmax_generic, sumexp_generic, scale_generic, grad_generic};
}

typedef struct {
    float *probs, *losses, *lse_out, *dlogits;
    const float *logits, *lse_in, *dloss;
    const int *targets;
    int64_t V;
    float scale;
    row_ops ops;
} sm_row_ctx;

static void softmax_rows(const void *vc, int64_t r0, int64_t r1) {
    const sm_row_ctx *c = (const sm_row_ctx *)vc;
    for (int64_t r = r0; r < r1; r++) {
        const float *x = c->logits + r * c->V;
        float *p = c->probs + r * c->V;
        float mx = c->ops.rowmax(x, c->V);
        float s = c->ops.sumexp(p, x, c->V, mx, c->scale);
        c->ops.scale(p, c->V, 1.0f / s);
    }
}

void sm_softmax_forward(float *probs, const float *logits, int64_t N, int64_t V,
                        float temperature, int nthreads) {
    /* probs, logits (N,V) */
    if (N <= 0 || V <= 0) return;
    /* 1/T in double, capped so that 0 * scale stays 0 for the max element. */
    double inv = 1.0 / (double)temperature;
    if (!(inv <= 3.0e38)) inv = 3.0e38;
    sm_row_ctx c = {0};
    c.probs = probs;
    c.logits = logits;
    c.V = V;
    c.scale = (float)inv;
    c.ops = pick_row_ops(sm_simd_active());
    run_ranges(softmax_rows, &c, N, 1, N * V * 6, nthreads);
}

void sm_softmax_forward_naive(float *probs, const float *logits, int64_t N, int64_t V,
                              float temperature) {
    /* probs, logits (N,V) */
    for (int64_t r = 0; r < N; r++) {
        const float *x = logits + r * V;
        double mx = -INFINITY, s = 0.0;
        for (int64_t i = 0; i < V; i++) mx = x[i] > mx ? x[i] : mx;
        for (int64_t i = 0; i < V; i++) s += exp((x[i] - mx) / temperature);
        for (int64_t i = 0; i < V; i++) probs[r * V + i] = (float)(exp((x[i] - mx) / temperature) / s);
    }
}

/* logsumexp of one row, in float. The row is taken in chunks small enough for L1: each chunk's
 * max is found as it streams in from memory, then its exps are summed from L1, the running sum
 * (double) rescaled whenever the max grows. So a long row (V = 50257) is read from memory once,
 * not twice, and the exp work overlaps the streaming. */
#define LSE_CHUNK 2048

static float row_lse(const row_ops *ops, const float *x, int64_t V) {
    float mx = -INFINITY;
    double s = 0.0;
    for (int64_t c0 = 0; c0 < V; c0 += LSE_CHUNK) {
        int64_t n = V - c0 < LSE_CHUNK ? V - c0 : LSE_CHUNK;
        float mc = ops->rowmax(x + c0, n);
        if (mc > mx) {
            if (s != 0.0) s *= exp((double)mx - (double)mc); /* (short rows never get here) */
            mx = mc;
        }
        if (mx == -INFINITY) continue; /* all -inf so far (masked): they add exp(-inf) = 0 */
        s += ops->sumexp(NULL, x + c0, n, mx, 1.0f);
    }
    return (float)((double)mx + log(s));
}

static void ce_fwd_rows(const void *vc, int64_t r0, int64_t r1) {
    const sm_row_ctx *c = (const sm_row_ctx *)vc;
    for (int64_t r = r0; r < r1; r++) {
        const float *x = c->logits + r * c->V;
        float lse = row_lse(&c->ops, x, c->V);
        int64_t t = c->targets[r];
        if (c->losses) c->losses[r] = (t >= 0 && t < c->V) ? lse - x[t] : 0.0f;
        if (c->lse_out) c->lse_out[r] = lse;
    }
}

static void ce_bwd_rows(const void *vc, int64_t r0, int64_t r1) {
    const sm_row_ctx *c = (const sm_row_ctx *)vc;
    for (int64_t r = r0; r < r1; r++) {
        int64_t t = c->targets[r];
        if (t < 0 || t >= c->V) continue; /* ignored (padding) rows get no gradient */
        const float *x = c->logits + r * c->V;
        float *dl = c->dlogits + r * c->V;
        float lse = c->lse_in ? c->lse_in[r] : row_lse(&c->ops, x, c->V);
        if (c->losses) c->losses[r] = lse - x[t];
        float d = c->dloss[r];
        c->ops.grad(dl, x, c->V, lse, d);
        dl[t] -= d;
    }
}

void sm_crossentropy_forward(float *losses, float *lse, const float *logits, const int *targets,
                             int64_t N, int64_t V, int nthreads) {
    /* losses, lse (N); logits (N,V); targets (N) */
    if (N <= 0 || V <= 0) return;
    sm_row_ctx c = {0};
    c.losses = losses;
    c.lse_out = lse;
    c.logits = logits;
    c.targets = targets;
    c.V = V;
    c.ops = pick_row_ops(sm_simd_active());
    run_ranges(ce_fwd_rows, &c, N, 1, N * V * 4, nthreads);
}

void sm_crossentropy_backward(float *dlogits, const float *logits, const float *lse,
                              const int *targets, const float *dloss, int64_t N, int64_t V,
                              int nthreads) {
    /* dlogits, logits (N,V); lse (N) or NULL; targets, dloss (N) */
    if (N <= 0 || V <= 0) return;
    sm_row_ctx c = {0};
    c.dlogits = dlogits;
    c.logits = logits;
    c.lse_in = lse;
    c.targets = targets;
    c.dloss = dloss;
    c.V = V;
    c.ops = pick_row_ops(sm_simd_active());
    run_ranges(ce_bwd_rows, &c, N, 1, N * V * (lse ? 4 : 8), nthreads);
}

void sm_crossentropy_forward_backward(float *losses, float *dlogits, const float *logits,
                                      const int *targets, const float *dloss, int64_t N,
                                      int64_t V, int nthreads) {
    /* losses (N) or NULL; dlogits, logits (N,V); targets, dloss (N) */
    if (N <= 0 || V <= 0) return;
    if (losses) /* ignored rows are skipped below, so their loss is set here */
        for (int64_t r = 0; r < N; r++)
            if (targets[r] < 0 || targets[r] >= V) losses[r] = 0.0f;
    sm_row_ctx c = {0};
    c.losses = losses;
    c.dlogits = dlogits;
    c.logits = logits;
    c.targets = targets;
    c.dloss = dloss;
    c.V = V;
    c.ops = pick_row_ops(sm_simd_active());
    run_ranges(ce_bwd_rows, &c, N, 1, N * V * 8, nthreads);
}

static double row_lse_naive(const float *x, int64_t V) {
    double mx = -INFINITY, s = 0.0;
    for (int64_t i = 0; i < V; i++) mx = x[i] > mx ? x[i] : mx;
    for (int64_t i = 0; i < V; i++) s += exp(x[i] - mx);
    return mx + log(s);
}

void sm_crossentropy_forward_naive(float *losses, float *lse, const float *logits,
                                   const int *targets, int64_t N, int64_t V) {
    /* losses, lse (N); logits (N,V); targets (N) */
    for (int64_t r = 0; r < N; r++) {
        const float *x = logits + r * V;
        double l = row_lse_naive(x, V);
        int64_t t = targets[r];
        losses[r] = (t >= 0 && t < V) ? (float)(l - x[t]) : 0.0f;
        if (lse) lse[r] = (float)l;
    }
}

void sm_crossentropy_backward_naive(float *dlogits, const float *logits, const float *lse,
                                    const int *targets, const float *dloss, int64_t N, int64_t V) {
    /* dlogits, logits (N,V); lse (N) or NULL; targets, dloss (N) */
    for (int64_t r = 0; r < N; r++) {
        int64_t t = targets[r];
        if (t < 0 || t >= V) continue;
        const float *x = logits + r * V;
        double l = lse ? (double)lse[r] : row_lse_naive(x, V);
        for (int64_t i = 0; i < V; i++) {
            double g = (exp(x[i] - l) - (i == t ? 1.0 : 0.0)) * dloss[r];
            dlogits[r * V + i] = (float)(dlogits[r * V + i] + g);
        }
    }
}

/* ================================================================================================
 * Residual and bias
 * ============================================================================================== */

typedef struct {
    float *o0, *o1;
    const float *a, *b;
    add_fn add;
    acc_fn acc;
} res_ctx;

static void res_fwd_range(const void *vc, int64_t i0, int64_t i1) {
    const res_ctx *c = (const res_ctx *)vc;
    c->add(c->o0 + i0, c->a + i0, c->b + i0, i1 - i0);
}
static void res_bwd_range(const void *vc, int64_t i0, int64_t i1) {
    const res_ctx *c = (const res_ctx *)vc;
    c->acc(c->o0 + i0, c->a + i0, i1 - i0);
    c->acc(c->o1 + i0, c->a + i0, i1 - i0);
}

void sm_residual_forward(float *out, const float *a, const float *b, int64_t n, int nthreads) {
    /* out, a, b (n) */
    int level = sm_simd_active();
    res_ctx c = {out, NULL, a, b, pick_add(level), pick_acc(level)};
    run_ranges(res_fwd_range, &c, n, ELEM_GRAIN, n, nthreads);
}

void sm_residual_backward(float *da, float *db, const float *dout, int64_t n, int nthreads) {
    /* da, db, dout (n) */
    int level = sm_simd_active();
    res_ctx c = {da, db, dout, NULL, pick_add(level), pick_acc(level)};
    run_ranges(res_bwd_range, &c, n, ELEM_GRAIN, 2 * n, nthreads);
}

void sm_residual_forward_naive(float *out, const float *a, const float *b, int64_t n) {
    /* out, a, b (n) */
    for (int64_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}

void sm_residual_backward_naive(float *da, float *db, const float *dout, int64_t n) {
    /* da, db, dout (n) */
    for (int64_t i = 0; i < n; i++) {
        da[i] += dout[i];
        db[i] += dout[i];
    }
}

typedef struct {
    float *out;
    const float *bias;
    int64_t C;
    acc_fn acc;
} bias_ctx;

static void bias_rows(const void *vc, int64_t r0, int64_t r1) {
    const bias_ctx *c = (const bias_ctx *)vc;
    for (int64_t r = r0; r < r1; r++) c->acc(c->out + r * c->C, c->bias, c->C);
}

void sm_bias_add(float *out, const float *bias, int64_t N, int64_t C, int nthreads) {
    /* out (N,C) updated in place; bias (C) */
    if (N <= 0 || C <= 0) return;
    bias_ctx c = {out, bias, C, pick_acc(sm_simd_active())};
    run_ranges(bias_rows, &c, N, 1, N * C, nthreads);
}

void sm_gemm_epilogue_apply(const sm_gemm_epilogue *e, float *c, int64_t ldc, int64_t r0,
                            int64_t c0, int64_t rows, int64_t n) {
    if (rows <= 0 || n <= 0) return;
    int level = sm_simd_active();
    acc_fn acc = pick_acc(level);
    range_fn gelu = gelu_fwd_generic;
#if SM_X86_KERNELS
    if (level >= SM_SIMD_AVX512) gelu = gelu_fwd_avx512;
    else if (level >= SM_SIMD_AVX2) gelu = gelu_fwd_avx2;
#endif
    for (int64_t r = 0; r < rows; r++) {
        float *row = c + r * ldc;
        if (e->bias) acc(row, e->bias + c0, n);
        if (e->resid) acc(row, e->resid + (r0 + r) * e->ldr + c0, n); /* x + y == y + x */
        if (e->gelu) {
            ew_ctx g = {e->gelu + (r0 + r) * e->ldg + c0, row, NULL};
            gelu(&g, 0, n);
        }
    }
}

void sm_bias_add_naive(float *out, const float *bias, int64_t N, int64_t C) {
    /* out (N,C); bias (C) */
    for (int64_t r = 0; r < N; r++)
        for (int64_t i = 0; i < C; i++) out[r * C + i] += bias[i];
}

int64_t sm_bias_backward_scratch(int64_t N, int64_t C) {
    if (N <= 0 || C <= 0) return 0;
    return sm_ceil_div(N, ROW_BLOCK) * sm_round_up(C, 16);
}

int sm_bias_backward(float *dbias, const float *dout, int64_t N, int64_t C, float *scratch,
                     int nthreads) {
    /* dbias (C); dout (N,C); scratch (nblocks, Cp): per block of ROW_BLOCK rows, its column sums */
    if (N <= 0 || C <= 0) return SM_OK;
    const int64_t Cp = sm_round_up(C, 16), nblocks = sm_ceil_div(N, ROW_BLOCK);
    float *owned = NULL, *part = scratch;
    if (!part) {
        owned = part = (float *)sm_pool_rent(sm_pool_default(), (size_t)sm_bias_backward_scratch(N, C) * sizeof(float));
        if (!part) return SM_ERR_NOMEM;
    }
    acc_fn acc = pick_acc(sm_simd_active());
    int nt = sm_team_size(nthreads, nblocks, N * C);
    (void)nt; /* unused without OpenMP */
    SM_PARALLEL(nt)
    {
        int nth = SM_THREAD_COUNT(), tid = SM_THREAD_ID();
        int64_t b0, b1, c0, c1;
        sm_split_range(nblocks, 1, nth, tid, &b0, &b1);
        for (int64_t blk = b0; blk < b1; blk++) {
            float *pb = part + blk * Cp;
            int64_t r = blk * ROW_BLOCK, r1 = r + ROW_BLOCK < N ? r + ROW_BLOCK : N;
            memcpy(pb, dout + r * C, (size_t)C * sizeof(float));
            for (r++; r < r1; r++) acc(pb, dout + r * C, C);
        }
        SM_BARRIER();
        sm_split_range(C, CH_GRAIN, nth, tid, &c0, &c1);
        float *dst[1] = {dbias};
        if (c1 > c0) combine_blocks(dst, 1, part, nblocks, Cp, c0, c1);
    }
    sm_pool_return(owned);
    return SM_OK;
}

void sm_bias_backward_naive(float *dbias, const float *dout, int64_t N, int64_t C) {
    /* dbias (C); dout (N,C) */
    for (int64_t i = 0; i < C; i++) {
        double s = 0.0;
        for (int64_t r = 0; r < N; r++) s += dout[r * C + i];
        dbias[i] = (float)(dbias[i] + s);
    }
}

/* ================================================================================================
 * AdamW
 * ============================================================================================== */

typedef struct {
    float *p, *m, *v;
    const float *g;
    float b1, b2, omb1, omb2, ibc1, ibc2, lr, eps, wd;
} adamw_ctx;

/* sqrtf may set errno (for negative inputs, impossible here), which stops GCC from vectorizing
 * the loop; this function alone is compiled without errno semantics. */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("no-math-errno")))
#endif
static void adamw_generic(const void *vc, int64_t i0, int64_t i1) {
    const adamw_ctx *c = (const adamw_ctx *)vc;
    float *SM_RESTRICT pp = c->p, *SM_RESTRICT pm = c->m, *SM_RESTRICT pv = c->v;
    const float *SM_RESTRICT pg = c->g;
    const float b1 = c->b1, b2 = c->b2, omb1 = c->omb1, omb2 = c->omb2, ibc1 = c->ibc1;
    const float ibc2 = c->ibc2, lr = c->lr, eps = c->eps, wd = c->wd;
    for (int64_t i = i0; i < i1; i++) {
        float g = pg[i];
        float m = b1 * pm[i] + omb1 * g;
        float v = b2 * pv[i] + (omb2 * g) * g;
        float upd = (m * ibc1) / (sqrtf(v * ibc2) + eps);
        float p = pp[i];
        pp[i] = p - lr * (upd + wd * p);
        pm[i] = m;
        pv[i] = v;
    }
}

#if SM_X86_KERNELS
SM_TARGET_AVX512 static void adamw_avx512(const void *vc, int64_t i0, int64_t i1) {
    const adamw_ctx *c = (const adamw_ctx *)vc;
    const __m512 b1 = _mm512_set1_ps(c->b1), b2 = _mm512_set1_ps(c->b2);
    const __m512 omb1 = _mm512_set1_ps(c->omb1), omb2 = _mm512_set1_ps(c->omb2);
    const __m512 ibc1 = _mm512_set1_ps(c->ibc1), ibc2 = _mm512_set1_ps(c->ibc2);
    const __m512 lr = _mm512_set1_ps(c->lr), eps = _mm512_set1_ps(c->eps), wd = _mm512_set1_ps(c->wd);
    for (int64_t i = i0; i < i1; i += 16) {
        __mmask16 k = sm_mask16(i1 - i);
        __m512 g = _mm512_maskz_loadu_ps(k, c->g + i);
        __m512 m = _mm512_fmadd_ps(b1, _mm512_maskz_loadu_ps(k, c->m + i), _mm512_mul_ps(omb1, g));
        __m512 v = _mm512_fmadd_ps(b2, _mm512_maskz_loadu_ps(k, c->v + i),
                                   _mm512_mul_ps(_mm512_mul_ps(omb2, g), g));
        __m512 den = _mm512_add_ps(_mm512_sqrt_ps(_mm512_mul_ps(v, ibc2)), eps);
        __m512 upd = _mm512_div_ps(_mm512_mul_ps(m, ibc1), den);
        __m512 p = _mm512_maskz_loadu_ps(k, c->p + i);
        p = _mm512_fnmadd_ps(lr, _mm512_fmadd_ps(wd, p, upd), p);
        _mm512_mask_storeu_ps(c->p + i, k, p);
        _mm512_mask_storeu_ps(c->m + i, k, m);
        _mm512_mask_storeu_ps(c->v + i, k, v);
    }
}

SM_TARGET_AVX2 static void adamw_avx2(const void *vc, int64_t i0, int64_t i1) {
    const adamw_ctx *c = (const adamw_ctx *)vc;
    const __m256 b1 = _mm256_set1_ps(c->b1), b2 = _mm256_set1_ps(c->b2);
    const __m256 omb1 = _mm256_set1_ps(c->omb1), omb2 = _mm256_set1_ps(c->omb2);
    const __m256 ibc1 = _mm256_set1_ps(c->ibc1), ibc2 = _mm256_set1_ps(c->ibc2);
    const __m256 lr = _mm256_set1_ps(c->lr), eps = _mm256_set1_ps(c->eps), wd = _mm256_set1_ps(c->wd);
    for (int64_t i = i0; i < i1; i += 8) {
        int64_t k = i1 - i;
        __m256 g = load8(c->g + i, k);
        __m256 m = _mm256_fmadd_ps(b1, load8(c->m + i, k), _mm256_mul_ps(omb1, g));
        __m256 v = _mm256_fmadd_ps(b2, load8(c->v + i, k),
                                   _mm256_mul_ps(_mm256_mul_ps(omb2, g), g));
        __m256 den = _mm256_add_ps(_mm256_sqrt_ps(_mm256_mul_ps(v, ibc2)), eps);
        __m256 upd = _mm256_div_ps(_mm256_mul_ps(m, ibc1), den);
        __m256 p = load8(c->p + i, k);
        p = _mm256_fnmadd_ps(lr, _mm256_fmadd_ps(wd, p, upd), p);
        store8(c->p + i, p, k);
        store8(c->m + i, m, k);
        store8(c->v + i, v, k);
    }
}
#endif

void sm_adamw_step(float *param, float *m, float *v, const float *grad, int64_t n, float lr,
                   float beta1, float beta2, float eps, float weight_decay, int64_t step,
                   int nthreads) {
    /* param, m, v, grad (n) */
    if (n <= 0) return;
    if (step < 1) step = 1;
    /* Bias corrections in double: 1 - beta^t loses precision in float for beta near 1. */
    double bc1 = 1.0 - pow((double)beta1, (double)step), bc2 = 1.0 - pow((double)beta2, (double)step);
    adamw_ctx c = {param, m, v, grad, beta1, beta2, (float)(1.0 - (double)beta1),
                   (float)(1.0 - (double)beta2), (float)(1.0 / bc1), (float)(1.0 / bc2), lr, eps,
                   weight_decay};
    int level = sm_simd_active();
    range_fn fn = adamw_generic;
#if SM_X86_KERNELS
    if (level >= SM_SIMD_AVX512) fn = adamw_avx512;
    else if (level >= SM_SIMD_AVX2) fn = adamw_avx2;
#endif
    (void)level;
    run_ranges(fn, &c, n, ELEM_GRAIN, n * 4, nthreads);
}

void sm_adamw_step_naive(float *param, float *m, float *v, const float *grad, int64_t n,
                         float lr, float beta1, float beta2, float eps, float weight_decay,
                         int64_t step) {
    /* param, m, v, grad (n) */
    double bc1 = 1.0 - pow((double)beta1, (double)step), bc2 = 1.0 - pow((double)beta2, (double)step);
    for (int64_t i = 0; i < n; i++) {
        double g = grad[i];
        double mm = (double)beta1 * m[i] + (1.0 - (double)beta1) * g;
        double vv = (double)beta2 * v[i] + (1.0 - (double)beta2) * g * g;
        double upd = (mm / bc1) / (sqrt(vv / bc2) + (double)eps);
        param[i] = (float)(param[i] - (double)lr * (upd + (double)weight_decay * param[i]));
        m[i] = (float)mm;
        v[i] = (float)vv;
    }
}

/* ================================================================================================
 * Gradient norm and clipping
 * ============================================================================================== */

typedef double (*sumsq_fn)(const float *x, int64_t n);

static double sumsq_generic(const float *x, int64_t n) {
    double s[4] = {0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 4 <= n; i += 4)
        for (int l = 0; l < 4; l++) s[l] += (double)x[i + l] * x[i + l];
    for (; i < n; i++) s[0] += (double)x[i] * x[i];
    return (s[0] + s[1]) + (s[2] + s[3]);
}

#if SM_X86_KERNELS
SM_TARGET_AVX512 static double sumsq_avx512(const float *x, int64_t n) {
    __m512d a0 = _mm512_setzero_pd(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m512 f0 = _mm512_loadu_ps(x + i), f1 = _mm512_loadu_ps(x + i + 16);
        __m512d d0 = _mm512_cvtps_pd(_mm512_castps512_ps256(f0));
        __m512d d1 = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(f0), 1)));
        __m512d d2 = _mm512_cvtps_pd(_mm512_castps512_ps256(f1));
        __m512d d3 = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(f1), 1)));
        a0 = _mm512_fmadd_pd(d0, d0, a0);
        a1 = _mm512_fmadd_pd(d1, d1, a1);
        a2 = _mm512_fmadd_pd(d2, d2, a2);
        a3 = _mm512_fmadd_pd(d3, d3, a3);
    }
    for (; i < n; i += 8) {
        int64_t r = n - i < 8 ? n - i : 8;
        __m256 f = _mm256_maskz_loadu_ps((__mmask8)((1u << r) - 1u), x + i);
        __m512d d = _mm512_cvtps_pd(f);
        a0 = _mm512_fmadd_pd(d, d, a0);
    }
    return _mm512_reduce_add_pd(_mm512_add_pd(_mm512_add_pd(a0, a1), _mm512_add_pd(a2, a3)));
}

SM_TARGET_AVX2 static double sumsq_avx2(const float *x, int64_t n) {
    __m256d a0 = _mm256_setzero_pd(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256d d0 = _mm256_cvtps_pd(_mm_loadu_ps(x + i));
        __m256d d1 = _mm256_cvtps_pd(_mm_loadu_ps(x + i + 4));
        __m256d d2 = _mm256_cvtps_pd(_mm_loadu_ps(x + i + 8));
        __m256d d3 = _mm256_cvtps_pd(_mm_loadu_ps(x + i + 12));
        a0 = _mm256_fmadd_pd(d0, d0, a0);
        a1 = _mm256_fmadd_pd(d1, d1, a1);
        a2 = _mm256_fmadd_pd(d2, d2, a2);
        a3 = _mm256_fmadd_pd(d3, d3, a3);
    }
    __m256d s = _mm256_add_pd(_mm256_add_pd(a0, a1), _mm256_add_pd(a2, a3));
    __m128d h = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
    double r = _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
    for (; i < n; i++) r += (double)x[i] * x[i];
    return r;
}
#endif

/* Blocks per pass: their partial sums live on the stack, so any n needs no allocation. */
#define NORM_PASS_BLOCKS 2048

typedef struct {
    const float *x;
    int64_t n;
    double *part;
    sumsq_fn fn;
} norm_ctx;

static void norm_blocks(const void *vc, int64_t b0, int64_t b1) {
    const norm_ctx *c = (const norm_ctx *)vc;
    for (int64_t b = b0; b < b1; b++) {
        int64_t i0 = b * SM_NORM_BLOCK, i1 = i0 + SM_NORM_BLOCK < c->n ? i0 + SM_NORM_BLOCK : c->n;
        c->part[b] = c->fn(c->x + i0, i1 - i0);
    }
}

double sm_sumsq(const float *x, int64_t n, int nthreads) {
    /* x (n) */
    if (n <= 0) return 0.0;
    int level = sm_simd_active();
    sumsq_fn fn = sumsq_generic;
#if SM_X86_KERNELS
    if (level >= SM_SIMD_AVX512) fn = sumsq_avx512;
    else if (level >= SM_SIMD_AVX2) fn = sumsq_avx2;
#endif
    (void)level;
    double part[NORM_PASS_BLOCKS];
    double total = 0.0;
    /* Passes of up to NORM_PASS_BLOCKS fixed blocks; partials added in block order. */
    for (int64_t start = 0; start < n; start += (int64_t)NORM_PASS_BLOCKS * SM_NORM_BLOCK) {
        int64_t len = n - start;
        if (len > (int64_t)NORM_PASS_BLOCKS * SM_NORM_BLOCK) len = (int64_t)NORM_PASS_BLOCKS * SM_NORM_BLOCK;
        int64_t nb = sm_ceil_div(len, SM_NORM_BLOCK);
        norm_ctx c = {x + start, len, part, fn};
        run_ranges(norm_blocks, &c, nb, 1, len * 2, nthreads);
        for (int64_t b = 0; b < nb; b++) total += part[b];
    }
    return total;
}

double sm_sumsq_naive(const float *x, int64_t n) {
    /* x (n) */
    double s = 0.0;
    for (int64_t i = 0; i < n; i++) s += (double)x[i] * x[i];
    return s;
}

typedef struct {
    float *x;
    float s;
} scale_ctx;

static void scale_range(const void *vc, int64_t i0, int64_t i1) {
    const scale_ctx *c = (const scale_ctx *)vc;
    float *x = c->x;
    const float s = c->s;
    for (int64_t i = i0; i < i1; i++) x[i] *= s;
}

double sm_clip_grad_norm(float *grad, int64_t n, float max_norm, int nthreads) {
    /* grad (n) */
    double norm = sqrt(sm_sumsq(grad, n, nthreads));
    double f = (double)max_norm / (norm + 1e-6);
    if (norm == norm && norm <= 1.79e308 && f < 1.0) {
        scale_ctx c = {grad, (float)f};
        run_ranges(scale_range, &c, n, ELEM_GRAIN, n, nthreads);
    }
    return norm;
}

double sm_clip_grad_norm_naive(float *grad, int64_t n, float max_norm) {
    /* grad (n) */
    double norm = sqrt(sm_sumsq_naive(grad, n));
    double f = (double)max_norm / (norm + 1e-6);
    if (norm == norm && norm <= 1.79e308 && f < 1.0)
        for (int64_t i = 0; i < n; i++) grad[i] = (float)(grad[i] * f);
    return norm;
}
