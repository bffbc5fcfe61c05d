/* sm_vecmath.h - the one exp approximation every kernel uses (softmax, cross-entropy, GELU,
 * attention), scalar and SIMD, so all paths agree to ~1 ulp and fixes land in one place; and the
 * small SIMD building blocks several kernel files share (tail masks, horizontal sum, 16 x 16
 * transpose). Header-only (static inline): each kernel file compiles it with its own target
 * attributes. */
#ifndef SM_VECMATH_H
#define SM_VECMATH_H

#include <stdint.h>
#include <string.h>

#include "sm_common.h"

#if SM_X86_KERNELS
#include <immintrin.h>
#endif

/* ---- exp approximation ----------------------------------------------------------------------
 * exp(x) = 2^n * exp(r), n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2] (ln 2 split in
 * two parts so r is exact), exp(r) by a degree-7 polynomial (Cephes expf coefficients): about
 * 1 ulp. The input is clamped above at 88 (so 2^n stays a normal float) and results for
 * x < ln(FLT_MIN) are flushed to exactly 0 (softmax of -inf logits gives 0). NaN propagates. */
#define EXP_HI 88.0f
#define EXP_LO (-87.33654f)
#define LOG2E 1.44269504088896341f
#define LN2_HI 0.693359375f
#define LN2_LO (-2.12194440e-4f)
#define EP0 1.9875691500e-4f
#define EP1 1.3981999507e-3f
#define EP2 8.3334519073e-3f
#define EP3 4.1665795894e-2f
#define EP4 1.6666665459e-1f
#define EP5 5.0000001201e-1f
/* 1.5 * 2^23: (v + M) - M rounds v to the nearest integer for |v| < 2^22, without floorf. */
#define ROUND_MAGIC 12582912.0f

/* c ? a : b through integer masks. GCC will not if-convert a float `?:` whose arms it could
 * turn into trapping arithmetic (-ftrapping-math), which keeps loops from vectorizing; the
 * bitwise form always vectorizes (SSE2, NEON). */
SM_INLINE float sm_sel(int c, float a, float b) {
    uint32_t ab, bb, m = 0u - (uint32_t)(c != 0);
    memcpy(&ab, &a, sizeof ab);
    memcpy(&bb, &b, sizeof bb);
    ab = (ab & m) | (bb & ~m);
    memcpy(&a, &ab, sizeof a);
    return a;
}

/* Branch-free so that loops calling it vectorize. The clamped copy xc is always finite (NaN
 * fails both compares), so the float -> int conversion is always defined. */
SM_INLINE float sm_exp_scalar(float x) {
    float xc = sm_sel(x < EXP_HI, x, EXP_HI);
    xc = sm_sel(xc > EXP_LO, xc, EXP_LO);
    float n = (xc * LOG2E + ROUND_MAGIC) - ROUND_MAGIC;
    float r = xc - n * LN2_HI;
    r = r - n * LN2_LO;
    float p = EP0;
    p = p * r + EP1;
    p = p * r + EP2;
    p = p * r + EP3;
    p = p * r + EP4;
    p = p * r + EP5;
    float y = p * (r * r) + (r + 1.0f);
    int32_t bits = ((int32_t)n + 127) << 23; /* in [1, 254] << 23: no overflow */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    y = sm_sel(x >= EXP_LO, y * scale, 0.0f);
    return sm_sel(x == x, y, x);
}

#if SM_X86_KERNELS
SM_TARGET_AVX512 SM_INLINE __m512 sm_exp_avx512(__m512 x) {
    __mmask16 under = _mm512_cmp_ps_mask(x, _mm512_set1_ps(EXP_LO), _CMP_LT_OQ);
    x = _mm512_min_ps(_mm512_set1_ps(EXP_HI), x); /* min returns its 2nd operand on NaN */
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(LOG2E)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
    __m512 p = _mm512_set1_ps(EP0);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EP1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EP2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EP3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EP4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EP5));
    __m512 y = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    y = _mm512_scalef_ps(y, n);
    return _mm512_maskz_mov_ps((__mmask16)~under, y);
}

SM_TARGET_AVX2 SM_INLINE __m256 sm_exp_avx2(__m256 x) {
    __m256 under = _mm256_cmp_ps(x, _mm256_set1_ps(EXP_LO), _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_set1_ps(EXP_HI), x);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(LOG2E)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
    __m256 p = _mm256_set1_ps(EP0);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EP1));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EP2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EP3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EP4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EP5));
    __m256 y = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    /* n is in [-126, 127] here, so 2^n is built directly in the exponent field */
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
    return _mm256_andnot_ps(under, y);
}
#endif

#if SM_X86_KERNELS
/* ---- tail masks and horizontal sum ---------------------------------------------------------- */
/* Lanes [0, n) of a 16-float vector: n >= 16 gives all, n <= 0 none. */
SM_TARGET_AVX512 SM_INLINE __mmask16 sm_mask16(int64_t n) {
    return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1u);
}

/* The same for an 8-float vector, as the int lanes vmaskmov takes (all ones = lane used). */
SM_TARGET_AVX2 SM_INLINE __m256i sm_mask8(int64_t n) {
    const int k = n >= 8 ? 8 : n <= 0 ? 0 : (int)n;
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* Sum of 8 lanes in one fixed order: (upper + lower half), then pairs, then the last two. */
SM_TARGET_AVX2 SM_INLINE float sm_hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* ---- 16 x 16 transpose (packing in sm_gemm.c, attention's transposed query blocks) -------- */
/* In-register transpose of a 16 x 16 float block: r[i] holds row i on entry, column i on exit.
 * Three rounds: interleave pairs of rows (32-bit), pairs of pairs (64-bit), then 128-bit lanes. */
SM_TARGET_AVX512 SM_INLINE void sm_transpose16x16(__m512 r[16]) {
    __m512 t[16], u[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    /* u[4i + e], 128-bit lane l: rows 4i..4i+3 of column 4l + e */
    for (int i = 0; i < 4; i++) {
        __m512d a0 = _mm512_castps_pd(t[4 * i]), a1 = _mm512_castps_pd(t[4 * i + 1]);
        __m512d b0 = _mm512_castps_pd(t[4 * i + 2]), b1 = _mm512_castps_pd(t[4 * i + 3]);
        u[4 * i + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(a0, b0));
        u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a0, b0));
        u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(a1, b1));
        u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(a1, b1));
    }
    for (int e = 0; e < 4; e++) {
        __m512 v0 = _mm512_shuffle_f32x4(u[e], u[4 + e], 0x88);
        __m512 v1 = _mm512_shuffle_f32x4(u[e], u[4 + e], 0xDD);
        __m512 v2 = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0x88);
        __m512 v3 = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0xDD);
        r[e] = _mm512_shuffle_f32x4(v0, v2, 0x88);
        r[8 + e] = _mm512_shuffle_f32x4(v0, v2, 0xDD);
        r[4 + e] = _mm512_shuffle_f32x4(v1, v3, 0x88);
        r[12 + e] = _mm512_shuffle_f32x4(v1, v3, 0xDD);
    }
}
#endif

#endif /* SM_VECMATH_H */
