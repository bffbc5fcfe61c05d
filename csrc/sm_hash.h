/* sm_hash.h - the counter-based hash behind every dropout mask: the keep decision of an
 * element is a pure function of (seed, stream, element index), so threads need no shared
 * generator, chunked and whole passes agree, and backward recomputes a mask instead of storing
 * it. Shared by sm_model.c (activation dropout) and sm_attention.c (attention dropout). */
#ifndef SM_HASH_H
#define SM_HASH_H

#include <stdint.h>

#include "sm_common.h"
#include "sm_runtime.h"

#if SM_X86_KERNELS
#include <immintrin.h>
#endif

/* The splitmix64 finaliser: a bijection of 64-bit words that mixes every input bit. */
static inline uint64_t sm_mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* A dropout mask: element e is kept when the top 32 bits of its hash reach `threshold`
 * (so p = threshold / 2^32), and a kept value is multiplied by `scale` = 1 / (1 - p). */
typedef struct {
    uint64_t key;
    uint32_t threshold;
    float scale;
} sm_drop_mask;

static inline sm_drop_mask sm_drop_mask_make(float p, uint64_t seed, uint64_t stream) {
    sm_drop_mask m;
    m.key = sm_mix64(seed ^ sm_mix64(stream + 0x632BE59BD9B4E019ull));
    double t = (double)p * 4294967296.0;
    m.threshold = t >= 4294967295.0 ? 0xFFFFFFFFu : (uint32_t)t;
    m.scale = p < 1.0f ? 1.0f / (1.0f - p) : 0.0f;
    return m;
}

/* The factor of element e: 0 (dropped) or scale (kept). */
static inline float sm_drop_factor(const sm_drop_mask *m, uint64_t e) {
    uint32_t h = (uint32_t)(sm_mix64(m->key + e * 0x9E3779B97F4A7C15ull) >> 32);
    return h < m->threshold ? 0.0f : m->scale;
}

/* out[i] = inp[i] * factor(e0 + i * stride) for i < n (out may equal inp). The AVX-512 path
 * hashes eight indices per step with 64-bit vector multiplies; integer arithmetic is exact, so
 * every path gives the same bits. */
static inline void sm_drop_apply_generic(float *out, const float *inp, int64_t n,
                                         const sm_drop_mask *m, uint64_t e0, uint64_t stride) {
    for (int64_t i = 0; i < n; i++) out[i] = inp[i] * sm_drop_factor(m, e0 + (uint64_t)i * stride);
}

#if SM_X86_KERNELS
SM_TARGET_AVX512 static inline __m512i sm_mix64_x8(__m512i z) {
    z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 30)),
                           _mm512_set1_epi64((long long)0xBF58476D1CE4E5B9ull));
    z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 27)),
                           _mm512_set1_epi64((long long)0x94D049BB133111EBull));
    return _mm512_xor_si512(z, _mm512_srli_epi64(z, 31));
}

SM_TARGET_AVX512 static inline void sm_drop_apply_avx512(float *out, const float *inp, int64_t n,
                                                         const sm_drop_mask *m, uint64_t e0,
                                                         uint64_t stride) {
    const __m512i golden = _mm512_set1_epi64((long long)0x9E3779B97F4A7C15ull);
    const __m512i key = _mm512_set1_epi64((long long)m->key);
    const __m512i thr = _mm512_set1_epi64((long long)m->threshold);
    const __m512i step = _mm512_set1_epi64((long long)(8 * stride));
    const __m256 scale = _mm256_set1_ps(m->scale);
    __m512i e = _mm512_add_epi64(_mm512_set1_epi64((long long)e0),
                                 _mm512_mullo_epi64(_mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7),
                                                    _mm512_set1_epi64((long long)stride)));
    int64_t i = 0;
    for (; i < n; i += 8) {
        __m512i h = _mm512_srli_epi64(sm_mix64_x8(_mm512_add_epi64(key, _mm512_mullo_epi64(e, golden))), 32);
        __mmask8 keep = _mm512_cmp_epu64_mask(h, thr, _MM_CMPINT_NLT);
        __mmask8 live = (__mmask8)(n - i >= 8 ? 0xFF : (1u << (n - i)) - 1u);
        __m256 x = _mm256_maskz_loadu_ps(live, inp + i);
        /* dropped lanes: x * 0 (so NaN and inf stay NaN, as in the scalar path) */
        __m256 f = _mm256_mask_mov_ps(_mm256_setzero_ps(), keep, scale);
        _mm256_mask_storeu_ps(out + i, live, _mm256_mul_ps(x, f));
        e = _mm512_add_epi64(e, step);
    }
}
#endif

static inline void sm_drop_apply(float *out, const float *inp, int64_t n, const sm_drop_mask *m,
                                 uint64_t e0, uint64_t stride) {
#if SM_X86_KERNELS
    if (sm_simd_active() >= SM_SIMD_AVX512) {
        sm_drop_apply_avx512(out, inp, n, m, e0, stride);
        return;
    }
#endif
    sm_drop_apply_generic(out, inp, n, m, e0, stride);
}

#endif /* SM_HASH_H */
