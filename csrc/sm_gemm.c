/* sm_gemm.c - packed, cache-blocked SGEMM (Goto/BLIS scheme) with run-time chosen SIMD
 * micro-kernels, plus a streaming path for matrix-vector-like shapes and a naive reference.
 *
 * Row-major view: C (M, N) = op(A) (M, K) @ op(B) (K, N). The micro-kernel keeps an MR x NR tile
 * of C in registers; B supplies NR-wide vectors along a row of C, A supplies MR broadcast
 * scalars down a column. Loop nest, per thread, over the thread's block of C:
 *
 *   for each chunk of rows of A (packed, <= ~1 MiB)        "A chunk"
 *     for each KC-slice of K                                 (one pass accumulates into C)
 *       pack A chunk [rows, KC] into MR-row slivers
 *       for each block of columns of B (packed, ~L2 size)    "B block"
 *         pack B block [KC, cols] into NR-column slivers
 *         for each A sliver (MR x KC, stays in L1)
 *           for each B sliver (KC x NR, streams from L2)
 *             micro-kernel: C tile (+)= A sliver @ B sliver
 *
 * Determinism: every element of C is computed by exactly one thread, by the same sequence of
 * operations (an FMA chain over each KC slice, slices added in order), whatever tile, thread or
 * partition it falls in: so results do not depend on the thread count. Threads split C into
 * whole tiles; no reduction is ever split across threads.
 *
 * Shapes that are matrix-vector-like (M or N tiny) skip packing, which would only double the
 * memory traffic there, and stream the big operand once (see "small path" below).
 */
#include "sm_gemm.h"

#include <string.h>

#include "sm_amx.h"
#include "sm_ops.h"
#include "sm_pool.h"
#include "sm_runtime.h"
#include "sm_vecmath.h"

#if SM_X86_KERNELS
#include <immintrin.h>
#endif

/* ---- reference ------------------------------------------------------------------------------ */

void sm_sgemm_naive(int trans_a, int trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                    const float *A, int64_t lda, const float *B, int64_t ldb, float beta,
                    float *C, int64_t ldc) {
    /* A: (M, K) or stored (K, M); B: (K, N) or stored (N, K); C: (M, N) */
    for (int64_t i = 0; i < M; i++) {
        for (int64_t j = 0; j < N; j++) {
            if (alpha == 0.0f) { /* A and B are not read (as in sm_sgemm): C = beta * C */
                C[i * ldc + j] = beta == 0.0f ? 0.0f : beta * C[i * ldc + j];
                continue;
            }
            double acc = 0.0;
            for (int64_t k = 0; k < K; k++) {
                float a = trans_a ? A[k * lda + i] : A[i * lda + k];
                float b = trans_b ? B[j * ldb + k] : B[k * ldb + j];
                acc += (double)a * (double)b;
            }
            float r = (float)(alpha * acc);
            C[i * ldc + j] = beta == 0.0f ? r : r + beta * C[i * ldc + j];
        }
    }
}

/* ---- strided operand views ------------------------------------------------------------------ */

/* Element (r, c) of a logical matrix is p[r * sr + c * sc]: this absorbs the transposes. */
typedef struct {
    const float *p;
    int64_t sr, sc;
} mat_view;

/* ---- packing ------------------------------------------------------------------------------- */

/* Pack rows [0, m) x cols [0, kc) of A into slivers of MR rows: sliver s holds, for each k,
 * the MR values A[s*MR + i, k] contiguously (zero past row m), so the kernel reads it linearly. */
static void pack_a(float *SM_RESTRICT dst, mat_view a, int64_t m, int64_t kc, int MR) {
    for (int64_t i0 = 0; i0 < m; i0 += MR) {
        int64_t rows = m - i0 < MR ? m - i0 : MR;
        if (a.sc == 1) {
            /* rows of A are contiguous in k: read along them, write with stride MR */
            for (int64_t i = 0; i < rows; i++) {
                const float *src = a.p + (i0 + i) * a.sr;
                for (int64_t k = 0; k < kc; k++) dst[k * MR + i] = src[k];
            }
        } else {
            for (int64_t k = 0; k < kc; k++) {
                const float *src = a.p + k * a.sc + i0 * a.sr;
                for (int64_t i = 0; i < rows; i++) dst[k * MR + i] = src[i * a.sr];
            }
        }
        if (rows < MR)
            for (int64_t k = 0; k < kc; k++)
                for (int64_t i = rows; i < MR; i++) dst[k * MR + i] = 0.0f;
        dst += kc * MR;
    }
}

/* Pack rows [0, kc) x cols [0, n) of B into slivers of NR columns: sliver s holds, for each k,
 * the NR values B[k, s*NR + j] contiguously (zero past column n). */
static void pack_b(float *SM_RESTRICT dst, mat_view b, int64_t kc, int64_t n, int NR) {
    for (int64_t j0 = 0; j0 < n; j0 += NR) {
        int64_t cols = n - j0 < NR ? n - j0 : NR;
        if (b.sc == 1) {
            for (int64_t k = 0; k < kc; k++) {
                const float *src = b.p + k * b.sr + j0;
                float *d = dst + k * NR;
                memcpy(d, src, (size_t)cols * sizeof(float));
                for (int64_t j = cols; j < NR; j++) d[j] = 0.0f;
            }
        } else {
            /* columns of B are contiguous in k (B stored transposed): read along them */
            for (int64_t j = 0; j < cols; j++) {
                const float *src = b.p + (j0 + j) * b.sc;
                for (int64_t k = 0; k < kc; k++) dst[k * NR + j] = src[k * b.sr];
            }
            for (int64_t k = 0; k < kc; k++)
                for (int64_t j = cols; j < NR; j++) dst[k * NR + j] = 0.0f;
        }
        dst += kc * NR;
    }
}

#if SM_X86_KERNELS

/* pack_a for A rows contiguous in k (the common A @ B layout), MR = 14: 16 x 16 blocks are
 * transposed in registers instead of moving one float at a time (packing A is ~16/N of the
 * multiply's work, so it matters on skinny shapes). */
SM_TARGET_AVX512
static void pack_a_rows_avx512(float *SM_RESTRICT dst, mat_view a, int64_t m, int64_t kc) {
    const int MR = 14;
    for (int64_t i0 = 0; i0 < m; i0 += MR) {
        int64_t rows = m - i0 < MR ? m - i0 : MR;
        for (int64_t k0 = 0; k0 < kc; k0 += 16) {
            int kn = (int)(kc - k0 < 16 ? kc - k0 : 16);
            __mmask16 km = sm_mask16(kn);
            __m512 r[16];
            for (int i = 0; i < 16; i++)
                r[i] = i < rows ? _mm512_maskz_loadu_ps(km, a.p + (i0 + i) * a.sr + k0) : _mm512_setzero_ps();
            sm_transpose16x16(r);
            for (int e = 0; e < kn; e++) _mm512_mask_storeu_ps(dst + (k0 + e) * MR, 0x3FFF, r[e]);
        }
        dst += kc * MR;
    }
}

/* pack_b for B stored transposed (rows of B^T contiguous in k), NR = 32. */
SM_TARGET_AVX512
static void pack_b_cols_avx512(float *SM_RESTRICT dst, mat_view b, int64_t kc, int64_t n) {
    const int NR = 32;
    for (int64_t j0 = 0; j0 < n; j0 += NR) {
        for (int g = 0; g < 2; g++) {
            int64_t jg = j0 + 16 * g;
            int64_t cols = n - jg;
            cols = cols < 0 ? 0 : cols > 16 ? 16 : cols;
            for (int64_t k0 = 0; k0 < kc; k0 += 16) {
                int kn = (int)(kc - k0 < 16 ? kc - k0 : 16);
                __mmask16 km = sm_mask16(kn);
                __m512 r[16];
                for (int j = 0; j < 16; j++)
                    r[j] = j < cols ? _mm512_maskz_loadu_ps(km, b.p + (jg + j) * b.sc + k0) : _mm512_setzero_ps();
                sm_transpose16x16(r);
                for (int e = 0; e < kn; e++) _mm512_storeu_ps(dst + (k0 + e) * NR + 16 * g, r[e]);
            }
        }
        dst += kc * NR;
    }
}

/* pack_a for A stored transposed (op(A) rows strided, its k rows contiguous), MR = 14, and
 * pack_b for B rows contiguous in n, NR = 32: both are one masked vector move per k (the weight
 * gradients X^T dY of a training step take this path, with K = B*T in the thousands). */
SM_TARGET_AVX512
static void pack_a_cols_avx512(float *SM_RESTRICT dst, mat_view a, int64_t m, int64_t kc) {
    const int MR = 14;
    for (int64_t i0 = 0; i0 < m; i0 += MR) {
        int64_t rows = m - i0 < MR ? m - i0 : MR;
        __mmask16 rm = sm_mask16(rows);
        const float *src = a.p + i0 * a.sr;
        for (int64_t k = 0; k < kc; k++)
            _mm512_mask_storeu_ps(dst + k * MR, 0x3FFF, _mm512_maskz_loadu_ps(rm, src + k * a.sc));
        dst += kc * MR;
    }
}

SM_TARGET_AVX512
static void pack_b_rows_avx512(float *SM_RESTRICT dst, mat_view b, int64_t kc, int64_t n) {
    const int NR = 32;
    for (int64_t j0 = 0; j0 < n; j0 += NR) {
        int64_t cols = n - j0 < NR ? n - j0 : NR;
        __mmask16 m0 = sm_mask16(cols);
        __mmask16 m1 = sm_mask16(cols - 16);
        const float *src = b.p + j0;
        for (int64_t k = 0; k < kc; k++) {
            const float *r = src + k * b.sr;
            _mm512_storeu_ps(dst + k * NR, _mm512_maskz_loadu_ps(m0, r));
            _mm512_storeu_ps(dst + k * NR + 16, _mm512_maskz_loadu_ps(m1, r + 16));
        }
        dst += kc * NR;
    }
}

/* The AVX2 twins: 8 x 8 in-register transposes for MR = 6 (A) and NR = 16 (B). */
SM_TARGET_AVX2
static inline void transpose8x8(__m256 r[8]) {
    __m256 t[8], u[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    /* u[4h + e], 128-bit lane l: rows 4h..4h+3 of column 4l + e */
    for (int h = 0; h < 2; h++) {
        u[4 * h + 0] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0x44);
        u[4 * h + 1] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0xEE);
        u[4 * h + 2] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0x44);
        u[4 * h + 3] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0xEE);
    }
    for (int e = 0; e < 4; e++) {
        r[e] = _mm256_permute2f128_ps(u[e], u[4 + e], 0x20);
        r[4 + e] = _mm256_permute2f128_ps(u[e], u[4 + e], 0x31);
    }
}

SM_TARGET_AVX2
static void pack_a_rows_avx2(float *SM_RESTRICT dst, mat_view a, int64_t m, int64_t kc) {
    const int MR = 6;
    const __m256i six = sm_mask8(MR);
    for (int64_t i0 = 0; i0 < m; i0 += MR) {
        int64_t rows = m - i0 < MR ? m - i0 : MR;
        for (int64_t k0 = 0; k0 < kc; k0 += 8) {
            int kn = (int)(kc - k0 < 8 ? kc - k0 : 8);
            __m256i km = sm_mask8(kn);
            __m256 r[8];
            for (int i = 0; i < 8; i++)
                r[i] = i < rows ? _mm256_maskload_ps(a.p + (i0 + i) * a.sr + k0, km) : _mm256_setzero_ps();
            transpose8x8(r);
            /* Full 8-lane stores spill 2 floats into the next k row, which the next store
             * overwrites; only the sliver's last row is masked (vmaskmovps stores are
             * microcoded on some AMD cores). */
            int64_t last = k0 + kn == kc ? kn - 1 : kn;
            for (int e = 0; e < last; e++) _mm256_storeu_ps(dst + (k0 + e) * MR, r[e]);
            for (int e = (int)last; e < kn; e++) _mm256_maskstore_ps(dst + (k0 + e) * MR, six, r[e]);
        }
        dst += kc * MR;
    }
}

SM_TARGET_AVX2
static void pack_b_cols_avx2(float *SM_RESTRICT dst, mat_view b, int64_t kc, int64_t n) {
    const int NR = 16;
    for (int64_t j0 = 0; j0 < n; j0 += NR) {
        for (int g = 0; g < 2; g++) {
            int64_t jg = j0 + 8 * g;
            int64_t cols = n - jg;
            cols = cols < 0 ? 0 : cols > 8 ? 8 : cols;
            for (int64_t k0 = 0; k0 < kc; k0 += 8) {
                int kn = (int)(kc - k0 < 8 ? kc - k0 : 8);
                __m256i km = sm_mask8(kn);
                __m256 r[8];
                for (int j = 0; j < 8; j++)
                    r[j] = j < cols ? _mm256_maskload_ps(b.p + (jg + j) * b.sc + k0, km) : _mm256_setzero_ps();
                transpose8x8(r);
                for (int e = 0; e < kn; e++) _mm256_storeu_ps(dst + (k0 + e) * NR + 8 * g, r[e]);
            }
        }
        dst += kc * NR;
    }
}
#endif

/* ---- micro-kernels ------------------------------------------------------------------------- */

/* C[0:mr, 0:nr] = alpha * (A sliver @ B sliver) + beta * C   (beta == 0: C is not read).
 * a: kc x MR packed, b: kc x NR packed. mr <= MR, nr <= NR; padding lanes are computed and
 * dropped, so every element of C sees the same arithmetic wherever its tile lies. */
typedef void (*ukernel_fn)(int64_t kc, const float *SM_RESTRICT a, int64_t lda,
                           const float *SM_RESTRICT b, float *SM_RESTRICT c, int64_t ldc, int mr,
                           int nr, float alpha, float beta);

/* Write an MR x NR tile held in `t` (row stride NR) into C: the edge case of every kernel. */
static void store_tile(const float *t, int NR, float *c, int64_t ldc, int mr, int nr, float alpha,
                       float beta) {
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) {
            float v = alpha * t[i * NR + j];
            c[i * ldc + j] = beta == 0.0f ? v : v + beta * c[i * ldc + j];
        }
}

/* Portable kernel: 4 x 16 tile in plain C (compilers vectorize the j loops). */
#define GEN_MR 4
#define GEN_NR 16
static void ukernel_generic(int64_t kc, const float *SM_RESTRICT a, int64_t lda,
                            const float *SM_RESTRICT b, float *SM_RESTRICT c, int64_t ldc, int mr,
                            int nr, float alpha, float beta) {
    (void)lda; /* A is always packed here */
    float acc[GEN_MR * GEN_NR];
    for (int i = 0; i < GEN_MR * GEN_NR; i++) acc[i] = 0.0f;
    for (int64_t k = 0; k < kc; k++) {
        const float *bk = b + k * GEN_NR;
        for (int i = 0; i < GEN_MR; i++) {
            float ai = a[k * GEN_MR + i];
            for (int j = 0; j < GEN_NR; j++) acc[i * GEN_NR + j] += ai * bk[j];
        }
    }
    store_tile(acc, GEN_NR, c, ldc, mr, nr, alpha, beta);
}

#if SM_X86_KERNELS

/* AVX2 + FMA: 6 x 16 tile = 12 ymm accumulators, 2 for B, 1 broadcast (15 of 16 registers). */
#define AVX2_MR 6
#define AVX2_NR 16
SM_TARGET_AVX2
static void ukernel_avx2(int64_t kc, const float *SM_RESTRICT a, int64_t lda,
                         const float *SM_RESTRICT b, float *SM_RESTRICT c, int64_t ldc, int mr,
                         int nr, float alpha, float beta) {
    (void)lda; /* A is always packed here */
    __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps();
    __m256 c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps();
    __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps();
    __m256 c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps();
    __m256 c40 = _mm256_setzero_ps(), c41 = _mm256_setzero_ps();
    __m256 c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
    for (int64_t k = 0; k < kc; k++) {
        __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
        __m256 x;
        x = _mm256_broadcast_ss(a + 0); c00 = _mm256_fmadd_ps(x, b0, c00); c01 = _mm256_fmadd_ps(x, b1, c01);
        x = _mm256_broadcast_ss(a + 1); c10 = _mm256_fmadd_ps(x, b0, c10); c11 = _mm256_fmadd_ps(x, b1, c11);
        x = _mm256_broadcast_ss(a + 2); c20 = _mm256_fmadd_ps(x, b0, c20); c21 = _mm256_fmadd_ps(x, b1, c21);
        x = _mm256_broadcast_ss(a + 3); c30 = _mm256_fmadd_ps(x, b0, c30); c31 = _mm256_fmadd_ps(x, b1, c31);
        x = _mm256_broadcast_ss(a + 4); c40 = _mm256_fmadd_ps(x, b0, c40); c41 = _mm256_fmadd_ps(x, b1, c41);
        x = _mm256_broadcast_ss(a + 5); c50 = _mm256_fmadd_ps(x, b0, c50); c51 = _mm256_fmadd_ps(x, b1, c51);
        a += AVX2_MR;
        b += AVX2_NR;
    }
    __m256 acc[AVX2_MR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
    if (mr == AVX2_MR && nr == AVX2_NR) {
        __m256 va = _mm256_set1_ps(alpha), vb = _mm256_set1_ps(beta);
        for (int i = 0; i < AVX2_MR; i++) {
            float *ci = c + i * ldc;
            for (int h = 0; h < 2; h++) {
                __m256 v = _mm256_mul_ps(va, acc[i][h]);
                if (beta != 0.0f) v = _mm256_fmadd_ps(vb, _mm256_loadu_ps(ci + 8 * h), v);
                _mm256_storeu_ps(ci + 8 * h, v);
            }
        }
        return;
    }
    float t[AVX2_MR * AVX2_NR];
    for (int i = 0; i < AVX2_MR; i++) {
        _mm256_storeu_ps(t + i * AVX2_NR, acc[i][0]);
        _mm256_storeu_ps(t + i * AVX2_NR + 8, acc[i][1]);
    }
    store_tile(t, AVX2_NR, c, ldc, mr, nr, alpha, beta);
}

/* AVX-512: 14 x 32 tile = 28 zmm accumulators, 2 for B, broadcasts folded into the FMAs
 * (vfmadd231ps zmm, zmm, dword{1to16}): 30 of 32 registers. One always-inlined body is
 * instantiated for each width (NV = 2 or 1 zmm per row, or an 8-lane ymm for the narrowest
 * edge, which on cores that split 512-bit FMAs in two costs a quarter of a full sliver) and
 * for A packed (a[k * MR + i]) or read in place (a[i * lda + k]; for skinny N, where packing A
 * would cost ~16/N of the multiply). The compiler unrolls the constant loops and keeps every
 * accumulator in a register. */
#define AVX512_MR 14
#define AVX512_NR 32

SM_TARGET_AVX512
SM_INLINE void kernel512_body(int64_t kc, const float *SM_RESTRICT a, int64_t lda,
                              const float *SM_RESTRICT b, float *SM_RESTRICT c, int64_t ldc,
                              int mr, int nr, float alpha, float beta, const int NV,
                              const int PACKED) {
    __m512 acc[AVX512_MR][2];
#pragma GCC unroll 14
    for (int i = 0; i < AVX512_MR; i++) {
        acc[i][0] = _mm512_setzero_ps();
        acc[i][1] = _mm512_setzero_ps();
    }
    for (int64_t k = 0; k < kc; k++) {
        __m512 b0 = _mm512_loadu_ps(b);
        __m512 b1 = NV == 2 ? _mm512_loadu_ps(b + 16) : b0;
#pragma GCC unroll 14
        for (int i = 0; i < AVX512_MR; i++) {
            __m512 x = _mm512_set1_ps(PACKED ? a[k * AVX512_MR + i] : a[i * lda + k]);
            acc[i][0] = _mm512_fmadd_ps(x, b0, acc[i][0]);
            if (NV == 2) acc[i][1] = _mm512_fmadd_ps(x, b1, acc[i][1]);
        }
        b += AVX512_NR;
    }
    /* Columns past nr are masked off; rows past mr are skipped: one path for every tile. */
    __mmask16 m0 = sm_mask16(nr);
    __mmask16 m1 = sm_mask16(nr - 16);
    __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
    for (int i = 0; i < mr; i++) {
        float *ci = c + i * ldc;
        __m512 v0 = _mm512_mul_ps(va, acc[i][0]);
        if (beta != 0.0f) v0 = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(m0, ci), v0);
        _mm512_mask_storeu_ps(ci, m0, v0);
        if (NV == 2) {
            __m512 v1 = _mm512_mul_ps(va, acc[i][1]);
            if (beta != 0.0f) v1 = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(m1, ci + 16), v1);
            _mm512_mask_storeu_ps(ci + 16, m1, v1);
        }
    }
}

/* The ymm twin of kernel512_body for edge slivers with nr <= 8. */
SM_TARGET_AVX512
SM_INLINE void kernel512_body8(int64_t kc, const float *SM_RESTRICT a, int64_t lda,
                               const float *SM_RESTRICT b, float *SM_RESTRICT c, int64_t ldc,
                               int mr, int nr, float alpha, float beta, const int PACKED) {
    __m256 acc[AVX512_MR];
#pragma GCC unroll 14
    for (int i = 0; i < AVX512_MR; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t k = 0; k < kc; k++) {
        __m256 b0 = _mm256_loadu_ps(b);
#pragma GCC unroll 14
        for (int i = 0; i < AVX512_MR; i++)
            acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(PACKED ? a[k * AVX512_MR + i] : a[i * lda + k]), b0, acc[i]);
        b += AVX512_NR;
    }
    __mmask8 m0 = nr >= 8 ? (__mmask8)0xFF : (__mmask8)((1u << nr) - 1u);
    __m256 va = _mm256_set1_ps(alpha), vb = _mm256_set1_ps(beta);
    for (int i = 0; i < mr; i++) {
        float *ci = c + i * ldc;
        __m256 v0 = _mm256_mul_ps(va, acc[i]);
        if (beta != 0.0f) v0 = _mm256_fmadd_ps(vb, _mm256_maskz_loadu_ps(m0, ci), v0);
        _mm256_mask_storeu_ps(ci, m0, v0);
    }
}

#define SM_KERNEL512(name, NV, PACKED)                                                           \
    SM_TARGET_AVX512 static void name(int64_t kc, const float *SM_RESTRICT a, int64_t lda,      \
                                      const float *SM_RESTRICT b, float *SM_RESTRICT c,         \
                                      int64_t ldc, int mr, int nr, float alpha, float beta) {   \
        kernel512_body(kc, a, lda, b, c, ldc, mr, nr, alpha, beta, NV, PACKED);                  \
    }
SM_KERNEL512(ukernel_avx512, 2, 1)
SM_KERNEL512(ukernel_avx512_n16, 1, 1)
SM_KERNEL512(ukernel_avx512_ua, 2, 0)
SM_KERNEL512(ukernel_avx512_ua_n16, 1, 0)
#undef SM_KERNEL512

SM_TARGET_AVX512
static void ukernel_avx512_n8(int64_t kc, const float *SM_RESTRICT a, int64_t lda,
                              const float *SM_RESTRICT b, float *SM_RESTRICT c, int64_t ldc, int mr,
                              int nr, float alpha, float beta) {
    kernel512_body8(kc, a, lda, b, c, ldc, mr, nr, alpha, beta, 1);
}

SM_TARGET_AVX512
static void ukernel_avx512_ua_n8(int64_t kc, const float *SM_RESTRICT a, int64_t lda,
                                 const float *SM_RESTRICT b, float *SM_RESTRICT c, int64_t ldc,
                                 int mr, int nr, float alpha, float beta) {
    kernel512_body8(kc, a, lda, b, c, ldc, mr, nr, alpha, beta, 0);
}

#endif /* SM_X86_KERNELS */

/* Blocking parameters for one SIMD level. */
typedef struct {
    int MR, NR;
    int64_t KC;        /* longest K slice (A sliver MR x KC should sit in L1) */
    int64_t A_FLOATS;  /* packed A chunk budget per thread */
    int64_t B_FLOATS;  /* packed B block budget per thread (half of a 1 MiB L2) */
    ukernel_fn kernel;
    ukernel_fn kernel_narrow;  /* for edge slivers with nr <= NR / 2 (NULL: use kernel) */
    ukernel_fn kernel_narrow4; /* for edge slivers with nr <= NR / 4 (NULL: kernel_narrow) */
    ukernel_fn kernel_ua[3];   /* A read in place: full, nr <= NR / 2, nr <= NR / 4 (or NULL) */
    void (*pack_a_rows)(float *, mat_view, int64_t, int64_t); /* fast pack for a.sc == 1 */
    void (*pack_b_cols)(float *, mat_view, int64_t, int64_t); /* fast pack for b.sr == 1 */
    void (*pack_a_cols)(float *, mat_view, int64_t, int64_t); /* fast pack for a.sr == 1 */
    void (*pack_b_rows)(float *, mat_view, int64_t, int64_t); /* fast pack for b.sc == 1 */
    /* Packed slivers hold R * round_up(kc, kpad) / kdiv floats for R rows (A) or columns (B):
     * 1 and 1 for float32; 32 and 2 for AMX's bf16 panels (k in blocks of 32, two per float). */
    int kpad, kdiv;
    int round_bf16; /* bf16 emulated in float32: packed panels are rounded to bf16 precision */
    void (*thread_begin)(void), (*thread_end)(void); /* around each thread's work (AMX tiles) */
} gemm_params;

static int64_t sliver_floats(const gemm_params *P, int R, int64_t kc) {
    return R * sm_round_up(kc, P->kpad) / P->kdiv;
}

static void get_params(int level, gemm_params *p) {
#if SM_X86_KERNELS
    if (level >= SM_SIMD_AVX512) {
        *p = (gemm_params){AVX512_MR, AVX512_NR, 384, 256 * 1024, 128 * 1024, ukernel_avx512,
                           ukernel_avx512_n16, ukernel_avx512_n8,
                           {ukernel_avx512_ua, ukernel_avx512_ua_n16, ukernel_avx512_ua_n8},
                           pack_a_rows_avx512, pack_b_cols_avx512, pack_a_cols_avx512,
                           pack_b_rows_avx512, 1, 1, 0, NULL, NULL};
        return;
    }
    if (level >= SM_SIMD_AVX2) {
        *p = (gemm_params){AVX2_MR, AVX2_NR, 256, 256 * 1024, 128 * 1024, ukernel_avx2, NULL,
                           NULL, {NULL, NULL, NULL}, pack_a_rows_avx2, pack_b_cols_avx2, NULL, NULL,
                           1, 1, 0, NULL, NULL};
        return;
    }
#endif
    (void)level;
    *p = (gemm_params){GEN_MR, GEN_NR, 256, 128 * 1024, 64 * 1024, ukernel_generic, NULL, NULL,
                       {NULL, NULL, NULL}, NULL, NULL, NULL, NULL, 1, 1, 0, NULL, NULL};
}

#if SM_AMX_BUILT
/* AMX's pieces behind the float-typed driver interface (panels are bf16 pairs in float words). */
static void pack_a_amx(float *dst, mat_view a, int64_t m, int64_t kc) {
    sm_amx_pack_a((uint16_t *)dst, a.p, a.sr, a.sc, m, kc);
}
static void pack_b_amx(float *dst, mat_view b, int64_t kc, int64_t n) {
    sm_amx_pack_b((uint16_t *)dst, b.p, b.sr, b.sc, kc, n);
}
static void ukernel_amx(int64_t kc, const float *SM_RESTRICT a, int64_t lda, const float *SM_RESTRICT b,
                        float *SM_RESTRICT c, int64_t ldc, int mr, int nr, float alpha, float beta) {
    (void)lda;
    sm_amx_kernel(kc, (const uint16_t *)a, (const uint16_t *)b, c, ldc, mr, nr, alpha, beta);
}
#endif

/* bf16 products: AMX tiles where the CPU and OS allow them (and the SIMD cap is AVX-512), else
 * the float32 kernels on panels rounded to bf16 (the same arithmetic: exact products of bf16
 * values, float32 sums; only slower). AVX-512's own bf16 dot product (vdpbf16ps) is left out:
 * it measured 107 GFLOP/s here, half the float32 FMA rate. */
static void get_params_bf16(int level, gemm_params *p) {
#if SM_AMX_BUILT
    if (level >= SM_SIMD_AVX512 && sm_amx_usable()) {
        *p = (gemm_params){SM_AMX_MR, SM_AMX_NR, 512, 1024 * 1024, 128 * 1024, ukernel_amx, NULL,
                           NULL, {NULL, NULL, NULL}, pack_a_amx, pack_b_amx, pack_a_amx, pack_b_amx,
                           SM_AMX_KB, 2, 0, sm_amx_begin, sm_amx_end};
        return;
    }
#endif
    get_params(level, p);
    for (int w = 0; w < 3; w++) p->kernel_ua[w] = NULL; /* A is always packed (and rounded) */
    p->round_bf16 = 1;
}

int sm_gemm_bf16_backend(void) {
    gemm_params p;
    get_params_bf16(sm_simd_active(), &p);
    return p.round_bf16 ? 0 : 1;
}

/* ---- packed path, one thread's block of C ------------------------------------------------- */


/* Split n into the fewest pieces of at most `most` (a multiple of `grain`) with equal sizes
 * in whole grains; returns the piece size. Depends only on its arguments (never on threads). */
static int64_t balanced_block(int64_t n, int64_t most, int64_t grain) {
    int64_t pieces = sm_ceil_div(n, most);
    return sm_round_up(sm_ceil_div(n, pieces), grain);
}

/* K slice, rows of A packed at once, and the widest B block, for operands with K columns. K
 * slices are fixed by K alone (not by M, N or threads): element results never depend on how C
 * is partitioned. */
static void plan_blocks(const gemm_params *P, int64_t K, int64_t *kc_max, int64_t *m_chunk,
                        int64_t *n_block) {
    *kc_max = balanced_block(K, P->KC, P->kpad);
    int64_t a = P->A_FLOATS / sliver_floats(P, P->MR, *kc_max);
    int64_t b = P->B_FLOATS / sliver_floats(P, P->NR, *kc_max);
    *m_chunk = (a > 1 ? a : 1) * P->MR;
    *n_block = (b > 1 ? b : 1) * P->NR;
}

/* One thread's block of C at (er0, ec0) of the whole product; epi (or NULL) runs on each tile
 * right after its last K slice, while the tile is still in L1. */
static void gemm_block(const gemm_params *P, mat_view a, mat_view b, int64_t M, int64_t N,
                       int64_t K, float alpha, float beta, float *C, int64_t ldc, float *apack,
                       float *bpack, const sm_gemm_epilogue *epi, int64_t er0, int64_t ec0) {
    const int MR = P->MR, NR = P->NR;
    int64_t kc_max, m_chunk, n_block;
    plan_blocks(P, K, &kc_max, &m_chunk, &n_block);
    n_block = balanced_block(N, n_block, NR);

    /* Skinny N: read A in place rather than pack it (packing costs ~16/N of the multiply),
     * unless A's row stride would alias the MR rows into one or two L1 sets. */
    const int a_in_place = P->kernel_ua[0] && a.sc == 1 && N <= 3 * NR && (a.sr % 512) != 0;

    for (int64_t m0 = 0; m0 < M; m0 += m_chunk) {
        int64_t mc = M - m0 < m_chunk ? M - m0 : m_chunk;
        for (int64_t p0 = 0; p0 < K; p0 += kc_max) {
            int64_t kc = K - p0 < kc_max ? K - p0 : kc_max;
            float beta_eff = p0 == 0 ? beta : 1.0f;
            const sm_gemm_epilogue *tile_epi = p0 + kc == K ? epi : NULL;
            mat_view as = {a.p + m0 * a.sr + p0 * a.sc, a.sr, a.sc};
            int64_t full = a_in_place ? mc / MR * MR : 0; /* rows read in place */
            if (full < mc) {
                /* pack the rows not read in place (all of them, or the last partial sliver) */
                mat_view rest = {as.p + full * as.sr, as.sr, as.sc};
                if (a.sc == 1 && P->pack_a_rows) P->pack_a_rows(apack, rest, mc - full, kc);
                else if (a.sr == 1 && P->pack_a_cols) P->pack_a_cols(apack, rest, mc - full, kc);
                else pack_a(apack, rest, mc - full, kc, MR);
                if (P->round_bf16)
                    sm_bf16_round_inplace(apack, sm_ceil_div(mc - full, MR) * sliver_floats(P, MR, kc));
            }
            for (int64_t n0 = 0; n0 < N; n0 += n_block) {
                int64_t nc = N - n0 < n_block ? N - n0 : n_block;
                mat_view bs = {b.p + p0 * b.sr + n0 * b.sc, b.sr, b.sc};
                if (b.sr == 1 && P->pack_b_cols) P->pack_b_cols(bpack, bs, kc, nc);
                else if (b.sc == 1 && P->pack_b_rows) P->pack_b_rows(bpack, bs, kc, nc);
                else pack_b(bpack, bs, kc, nc, NR);
                if (P->round_bf16) sm_bf16_round_inplace(bpack, sm_ceil_div(nc, NR) * sliver_floats(P, NR, kc));
                for (int64_t i = 0; i < mc; i += MR) {
                    int mr = (int)(mc - i < MR ? mc - i : MR);
                    int in_place = i < full;
                    const float *ap = in_place ? as.p + i * as.sr : apack + ((i - full) / MR) * sliver_floats(P, MR, kc);
                    float *crow = C + (m0 + i) * ldc + n0;
                    for (int64_t j = 0; j < nc; j += NR) {
                        int nr = (int)(nc - j < NR ? nc - j : NR);
                        int w = nr <= NR / 4 ? 2 : nr <= NR / 2 ? 1 : 0; /* narrowest kernel that fits */
                        ukernel_fn kern = P->kernel;
                        if (in_place) kern = P->kernel_ua[w];
                        else if (w == 2 && P->kernel_narrow4) kern = P->kernel_narrow4;
                        else if (w >= 1 && P->kernel_narrow) kern = P->kernel_narrow;
                        kern(kc, ap, as.sr, bpack + (j / NR) * sliver_floats(P, NR, kc), crow + j, ldc, mr, nr,
                             alpha, beta_eff);
                        if (tile_epi)
                            sm_gemm_epilogue_apply(tile_epi, crow + j, ldc, er0 + m0 + i,
                                                   ec0 + n0 + j, mr, nr);
                    }
                }
            }
        }
    }
}

/* ---- small path: M tiny (matrix-vector-like) ---------------------------------------------
 * Computes C[r, n] for r < m (m <= SMALL_M) by streaming the big operand once, no packing.
 * Each element is one FMA chain over k = 0..K-1 (then alpha, beta), the same arithmetic for
 * every column and tile, so thread partitions never change the bits.
 *   "rows" form: B is contiguous along n (B[k, :] rows): C[:, chunk] += a[:, k] * B[k, chunk]
 *   "dots" form: B is contiguous along k (B^T rows): C[r, n] = dot(a[r, :], Bt[n, :])        */



#define SMALL_M 4     /* sm_sgemm takes the small path up to this many rows ... */
#define SMALL_MAX_M 8 /* ... and sm_gemv_cols (decode batches) up to this many */
#define SMALL_W 512 /* columns per chunk in the rows form: m x 512 accumulators stay in L1 */
#define SMALL_TILE_NV 8 /* vectors of a one-row register tile of the rows form */
#define SMALL_STREAM_W 16384 /* columns per chunk of the streaming rows form (AVX-512) */
#define SMALL_STREAM_K 8     /* B rows per sweep of that form: fewer passes over its accumulators */

typedef struct {
    mat_view a, b;      /* a: (m, K) logical, b: (K, N) logical */
    float *c;           /* C[r, n] at c[r * c_sr + n * c_sc] */
    int64_t c_sr, c_sc;
    int64_t m, K;
    float alpha, beta;
} small_problem;

static void small_store(const small_problem *sp, int64_t r, int64_t n, float v) {
    float *dst = sp->c + r * sp->c_sr + n * sp->c_sc;
    v = sp->alpha * v;
    *dst = sp->beta == 0.0f ? v : v + sp->beta * *dst;
}

static void small_rows_generic(const small_problem *sp, int64_t n0, int64_t n1, float *scratch) {
    (void)scratch;
    float acc[SMALL_MAX_M][SMALL_W];
    for (int64_t c0 = n0; c0 < n1; c0 += SMALL_W) {
        int64_t w = n1 - c0 < SMALL_W ? n1 - c0 : SMALL_W;
        for (int64_t r = 0; r < sp->m; r++)
            for (int64_t j = 0; j < w; j++) acc[r][j] = 0.0f;
        for (int64_t k = 0; k < sp->K; k++) {
            const float *bk = sp->b.p + k * sp->b.sr + c0;
            for (int64_t r = 0; r < sp->m; r++) {
                float ar = sp->a.p[r * sp->a.sr + k * sp->a.sc];
                for (int64_t j = 0; j < w; j++) acc[r][j] += ar * bk[j];
            }
        }
        for (int64_t r = 0; r < sp->m; r++)
            for (int64_t j = 0; j < w; j++) small_store(sp, r, c0 + j, acc[r][j]);
    }
}

static void small_dots_generic(const small_problem *sp, int64_t n0, int64_t n1, float *scratch) {
    (void)scratch;
    for (int64_t n = n0; n < n1; n++) {
        const float *bn = sp->b.p + n * sp->b.sc;
        for (int64_t r = 0; r < sp->m; r++) {
            float s = 0.0f;
            for (int64_t k = 0; k < sp->K; k++) s += sp->a.p[r * sp->a.sr + k * sp->a.sc] * bn[k];
            small_store(sp, r, n, s);
        }
    }
}

#if SM_X86_KERNELS
/* One register tile of the rows form: C[0:m, c0:c0+w] for w <= 16 * NV, m <= 4.
 * Accumulators (m x NV zmm) stay in registers for the whole K loop; B rows are streamed. */
SM_TARGET_AVX512
SM_INLINE void small_rows_tile_avx512(const small_problem *sp, int64_t c0, int64_t w,
                                      const int m, const int NV) {
    __m512 acc[SMALL_MAX_M][SMALL_TILE_NV];
    __mmask16 mk[SMALL_TILE_NV];
    for (int v = 0; v < NV; v++) {
        mk[v] = sm_mask16(w - 16 * v);
        for (int r = 0; r < m; r++) acc[r][v] = _mm512_setzero_ps();
    }
    const float *bp = sp->b.p + c0;
    const float *ap = sp->a.p;
    const int64_t bsr = sp->b.sr, asr = sp->a.sr, asc = sp->a.sc;
    if (w == 16 * NV) {
        for (int64_t k = 0; k < sp->K; k++) {
            const float *bk = bp + k * bsr;
            for (int v = 0; v < NV; v++) {
                __m512 bv = _mm512_loadu_ps(bk + 16 * v);
                for (int r = 0; r < m; r++)
                    acc[r][v] = _mm512_fmadd_ps(_mm512_set1_ps(ap[r * asr + k * asc]), bv, acc[r][v]);
            }
        }
    } else {
        for (int64_t k = 0; k < sp->K; k++) {
            const float *bk = bp + k * bsr;
            for (int v = 0; v < NV; v++) {
                __m512 bv = _mm512_maskz_loadu_ps(mk[v], bk + 16 * v);
                for (int r = 0; r < m; r++)
                    acc[r][v] = _mm512_fmadd_ps(_mm512_set1_ps(ap[r * asr + k * asc]), bv, acc[r][v]);
            }
        }
    }
    __m512 va = _mm512_set1_ps(sp->alpha), vb = _mm512_set1_ps(sp->beta);
    for (int r = 0; r < m; r++) {
        if (sp->c_sc != 1) { /* C written transposed: scalar stores */
            float t[16 * SMALL_TILE_NV];
            for (int v = 0; v < NV; v++) _mm512_storeu_ps(t + 16 * v, acc[r][v]);
            for (int64_t j = 0; j < w; j++) small_store(sp, r, c0 + j, t[j]);
            continue;
        }
        float *cr = sp->c + r * sp->c_sr + c0;
        for (int v = 0; v < NV; v++) {
            __m512 x = _mm512_mul_ps(va, acc[r][v]);
            if (sp->beta != 0.0f) x = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(mk[v], cr + 16 * v), x);
            _mm512_mask_storeu_ps(cr + 16 * v, mk[v], x);
        }
    }
}

/* Rows form for a B too big for the caches. A narrow register tile walked down K would jump to
 * a new page at every row and starve the prefetchers; instead each B row is swept contiguously
 * across a wide column chunk (64 KiB of it), four rows per sweep, accumulating into an
 * L2-resident buffer `acc` (m x SMALL_STREAM_W floats). Per element this is the same FMA chain
 * in k order as the register tile, so the bits are the same. */
SM_TARGET_AVX512
static void small_rows_stream_avx512(const small_problem *sp, int64_t n0, int64_t n1, float *acc) {
    const int64_t m = sp->m, K = sp->K;
    /* accumulators of more than 4 rows share the same scratch in narrower chunks */
    const int64_t W = m <= 4 ? SMALL_STREAM_W : SMALL_STREAM_W * 4 / m / 16 * 16;
    for (int64_t c0 = n0; c0 < n1; c0 += W) {
        int64_t w = n1 - c0 < W ? n1 - c0 : W;
        int64_t nv = sm_ceil_div(w, 16);
        int rem = (int)(w % 16);
        __mmask16 tail = rem ? (__mmask16)((1u << rem) - 1u) : (__mmask16)0xFFFF;
        for (int64_t r = 0; r < m; r++) memset(acc + r * W, 0, (size_t)w * sizeof(float));
        int64_t k = 0;
        for (; k + SMALL_STREAM_K <= K; k += SMALL_STREAM_K) {
            const float *bk[SMALL_STREAM_K];
            for (int u = 0; u < SMALL_STREAM_K; u++) bk[u] = sp->b.p + (k + u) * sp->b.sr + c0;
            for (int64_t r = 0; r < m; r++) {
                const float *ar = sp->a.p + r * sp->a.sr + k * sp->a.sc;
                __m512 x[SMALL_STREAM_K];
                for (int u = 0; u < SMALL_STREAM_K; u++) x[u] = _mm512_set1_ps(ar[u * sp->a.sc]);
                float *cr = acc + r * W;
                for (int64_t v = 0; v < nv; v++) {
                    __mmask16 mk = v + 1 < nv ? (__mmask16)0xFFFF : tail;
                    __m512 t = _mm512_load_ps(cr + 16 * v);
#pragma GCC unroll 8
                    for (int u = 0; u < SMALL_STREAM_K; u++)
                        t = _mm512_fmadd_ps(x[u], _mm512_maskz_loadu_ps(mk, bk[u] + 16 * v), t);
                    _mm512_store_ps(cr + 16 * v, t);
                }
            }
        }
        for (; k < K; k++) {
            const float *b0 = sp->b.p + k * sp->b.sr + c0;
            for (int64_t r = 0; r < m; r++) {
                __m512 x0 = _mm512_set1_ps(sp->a.p[r * sp->a.sr + k * sp->a.sc]);
                float *cr = acc + r * W;
                for (int64_t v = 0; v < nv; v++) {
                    __mmask16 mk = v + 1 < nv ? (__mmask16)0xFFFF : tail;
                    __m512 t = _mm512_load_ps(cr + 16 * v);
                    t = _mm512_fmadd_ps(x0, _mm512_maskz_loadu_ps(mk, b0 + 16 * v), t);
                    _mm512_store_ps(cr + 16 * v, t);
                }
            }
        }
        for (int64_t r = 0; r < m; r++) {
            if (sp->alpha == 1.0f && sp->beta == 0.0f && sp->c_sc == 1)
                memcpy(sp->c + r * sp->c_sr + c0, acc + r * W, (size_t)w * sizeof(float));
            else
                for (int64_t j = 0; j < w; j++) small_store(sp, r, c0 + j, acc[r * W + j]);
        }
    }
}

SM_TARGET_AVX512
static void small_rows_avx512(const small_problem *sp, int64_t n0, int64_t n1, float *scratch) {
    /* 8 vectors per tile for one row, 4 for more: enough independent FMA chains to hide
     * latency, few enough registers to never spill. */
    const int m = (int)sp->m;
    if (scratch) {
        small_rows_stream_avx512(sp, n0, n1, scratch);
        return;
    }
    const int64_t tw = m == 1 ? 16 * SMALL_TILE_NV : m <= 4 ? 64 : 32;
    for (int64_t c0 = n0; c0 < n1; c0 += tw) {
        int64_t w = n1 - c0 < tw ? n1 - c0 : tw;
        switch (m) {
        case 1: small_rows_tile_avx512(sp, c0, w, 1, SMALL_TILE_NV); break;
        case 2: small_rows_tile_avx512(sp, c0, w, 2, 4); break;
        case 3: small_rows_tile_avx512(sp, c0, w, 3, 4); break;
        case 4: small_rows_tile_avx512(sp, c0, w, 4, 4); break;
        case 5: small_rows_tile_avx512(sp, c0, w, 5, 2); break;
        case 6: small_rows_tile_avx512(sp, c0, w, 6, 2); break;
        case 7: small_rows_tile_avx512(sp, c0, w, 7, 2); break;
        default: small_rows_tile_avx512(sp, c0, w, 8, 2); break;
        }
    }
}

/* Dots form, AVX-512: C[r0:r0+m, n] = a[r0:r0+m, :] . Bt[n, :] for one column n, m <= 4.
 * Four accumulators per row take the 16-float vectors of each 64-float block in turn (the rest
 * of K goes to the first), summed as (s0 + s1) + (s2 + s3): the same arithmetic for every m,
 * row group and column, so a row's bits never depend on its batch or thread partition. */
SM_TARGET_AVX512
SM_INLINE void small_dots_col_avx512(const small_problem *sp, int64_t n, int64_t r0, const int m) {
    const int64_t K = sp->K, k4 = K / 64 * 64, kfull = K / 16 * 16;
    const __mmask16 tail = sm_mask16(K % 16);
    const float *bn = sp->b.p + n * sp->b.sc;
    const float *a = sp->a.p + r0 * sp->a.sr;
    const int64_t asr = sp->a.sr;
    __m512 s[4][4];
    for (int r = 0; r < m; r++)
        for (int j = 0; j < 4; j++) s[r][j] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k < k4; k += 64) {
        for (int j = 0; j < 4; j++) {
            const __m512 bv = _mm512_loadu_ps(bn + k + 16 * j);
            for (int r = 0; r < m; r++)
                s[r][j] = _mm512_fmadd_ps(_mm512_loadu_ps(a + r * asr + k + 16 * j), bv, s[r][j]);
        }
    }
    for (; k < kfull; k += 16) {
        const __m512 bv = _mm512_loadu_ps(bn + k);
        for (int r = 0; r < m; r++) s[r][0] = _mm512_fmadd_ps(_mm512_loadu_ps(a + r * asr + k), bv, s[r][0]);
    }
    if (tail) {
        const __m512 bv = _mm512_maskz_loadu_ps(tail, bn + k);
        for (int r = 0; r < m; r++)
            s[r][0] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, a + r * asr + k), bv, s[r][0]);
    }
    for (int r = 0; r < m; r++)
        small_store(sp, r0 + r, n,
                    _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s[r][0], s[r][1]),
                                                       _mm512_add_ps(s[r][2], s[r][3]))));
}

SM_TARGET_AVX512
static void small_dots_avx512(const small_problem *sp, int64_t n0, int64_t n1, float *scratch) {
    /* One B^T row at a time, read front to back: a single sequential stream per thread is what
     * the hardware prefetchers follow best (about 1.7x the bandwidth of four rows interleaved,
     * measured on the 154 MB GPT-2 LM head). More than 4 rows of a go in groups of up to 4
     * while the B^T row is still in L1. */
    (void)scratch;
    const int64_t m = sp->m;
    for (int64_t n = n0; n < n1; n++) {
        for (int64_t r0 = 0; r0 < m; r0 += 4) {
            switch (m - r0 < 4 ? m - r0 : 4) {
            case 1: small_dots_col_avx512(sp, n, r0, 1); break;
            case 2: small_dots_col_avx512(sp, n, r0, 2); break;
            case 3: small_dots_col_avx512(sp, n, r0, 3); break;
            default: small_dots_col_avx512(sp, n, r0, 4); break;
            }
        }
    }
}

SM_TARGET_AVX2
static void small_rows_avx2(const small_problem *sp, int64_t n0, int64_t n1, float *scratch) {
    (void)scratch;
    __m256 acc[SMALL_MAX_M][SMALL_W / 8];
    const int64_t m = sp->m;
    for (int64_t c0 = n0; c0 < n1; c0 += SMALL_W) {
        int64_t w = n1 - c0 < SMALL_W ? n1 - c0 : SMALL_W;
        int64_t nv = sm_ceil_div(w, 8);
        int rem = (int)(w % 8);
        __m256i tail = sm_mask8(rem ? rem : 8);
        for (int64_t r = 0; r < m; r++)
            for (int64_t v = 0; v < nv; v++) acc[r][v] = _mm256_setzero_ps();
        for (int64_t k = 0; k < sp->K; k++) {
            const float *bk = sp->b.p + k * sp->b.sr + c0;
            __m256 ar[SMALL_MAX_M];
            for (int64_t r = 0; r < m; r++) ar[r] = _mm256_set1_ps(sp->a.p[r * sp->a.sr + k * sp->a.sc]);
            int64_t v = 0;
            for (; v + 1 < nv; v++) {
                __m256 bv = _mm256_loadu_ps(bk + 8 * v);
                for (int64_t r = 0; r < m; r++) acc[r][v] = _mm256_fmadd_ps(ar[r], bv, acc[r][v]);
            }
            __m256 bv = _mm256_maskload_ps(bk + 8 * v, tail);
            for (int64_t r = 0; r < m; r++) acc[r][v] = _mm256_fmadd_ps(ar[r], bv, acc[r][v]);
        }
        for (int64_t r = 0; r < m; r++) {
            float t[SMALL_W];
            for (int64_t v = 0; v < nv; v++) _mm256_storeu_ps(t + 8 * v, acc[r][v]);
            for (int64_t j = 0; j < w; j++) small_store(sp, r, c0 + j, t[j]);
        }
    }
}

SM_TARGET_AVX2
static void small_dots_avx2(const small_problem *sp, int64_t n0, int64_t n1, float *scratch) {
    (void)scratch;
    const int64_t K = sp->K, m = sp->m;
    const int64_t kfull = K / 8 * 8;
    int rem = (int)(K % 8);
    __m256i tail = sm_mask8(rem);
    for (int64_t n = n0; n < n1; n++) {
        const float *bn = sp->b.p + n * sp->b.sc;
        __m256 acc[SMALL_MAX_M];
        for (int64_t r = 0; r < m; r++) acc[r] = _mm256_setzero_ps();
        for (int64_t k = 0; k < kfull; k += 8) {
            __m256 bv = _mm256_loadu_ps(bn + k);
            for (int64_t r = 0; r < m; r++)
                acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(sp->a.p + r * sp->a.sr + k), bv, acc[r]);
        }
        if (rem) {
            __m256 bv = _mm256_maskload_ps(bn + kfull, tail);
            for (int64_t r = 0; r < m; r++)
                acc[r] = _mm256_fmadd_ps(_mm256_maskload_ps(sp->a.p + r * sp->a.sr + kfull, tail), bv, acc[r]);
        }
        for (int64_t r = 0; r < m; r++) small_store(sp, r, n, sm_hsum8(acc[r]));
    }
}
#endif

/* Run one small problem over columns [0, N) with nt threads. `a` must be contiguous along k
 * for the dots form. Returns SM_ERR_NOMEM if scratch could not be had (C untouched). */
typedef void (*small_fn)(const small_problem *, int64_t, int64_t, float *);

/* The kernel for a small problem with N columns in all, and whether it streams (needs scratch
 * of SM_GEMV_SCRATCH floats per thread). */
static small_fn small_kernel(const small_problem *sp, int64_t N, int dots, int level, int *stream) {
    small_fn fn = dots ? small_dots_generic : small_rows_generic;
    *stream = 0;
#if SM_X86_KERNELS
    if (level >= SM_SIMD_AVX512) {
        fn = dots ? small_dots_avx512 : small_rows_avx512;
        /* Stream B rows when B is beyond the caches (> 8 MiB), or already beyond L2 (> 2 MiB)
         * for a single row, where a register tile has too little work per B load to hide the
         * strided walk down K (measured both ways on the shapes in bench/). */
        int64_t kn = sp->K * N;
        *stream = !dots && (kn > (int64_t)2 * 1024 * 1024 || (sp->m == 1 && kn > (int64_t)512 * 1024));
    } else if (level >= SM_SIMD_AVX2) {
        fn = dots ? small_dots_avx2 : small_rows_avx2;
    }
#else
    (void)sp;
    (void)level;
    (void)N;
#endif
    return fn;
}

static int small_run(const small_problem *sp, int64_t N, int dots, int level, int nt) {
    int stream;
    small_fn fn = small_kernel(sp, N, dots, level, &stream);
    /* Columns go to threads in multiples of 64, so a column's code path (full vector or masked
     * tail) never depends on the partition. Few threads for little work: waking a team costs
     * microseconds, more than a small product takes. */
    int64_t work = sp->m * sp->K * N;
    int64_t max_nt = work / (64 * 1024) + 1;
    if (nt > max_nt) nt = (int)max_nt;
    if (nt > 1 && N / 64 < nt) nt = (int)(N / 64 > 0 ? N / 64 : 1);
    float *scratch = NULL;
#if SM_X86_KERNELS
    if (stream) {
        scratch = (float *)sm_pool_rent(sm_pool_default(), (size_t)nt * SM_GEMV_SCRATCH * sizeof(float));
        if (!scratch) return SM_ERR_NOMEM;
    }
#endif
    SM_PARALLEL(nt)
    {
        int64_t n0, n1;
        int tid = SM_THREAD_ID();
        sm_split_range(N, 64, SM_THREAD_COUNT(), tid, &n0, &n1);
        if (n1 > n0) fn(sp, n0, n1, scratch ? scratch + (int64_t)tid * SM_GEMV_SCRATCH : NULL);
    }
    if (scratch) sm_pool_return(scratch);
    return SM_OK;
}

void sm_gemv_cols(int trans_b, int64_t M, int64_t N, int64_t K, const float *A, int64_t lda,
                  const float *B, int64_t ldb, float *C, int64_t ldc, int64_t n0, int64_t n1,
                  float *scratch) {
    if (M <= 0 || n1 <= n0) return;
    const mat_view a = {A, lda, 1};
    const mat_view b = trans_b ? (mat_view){B, 1, ldb} : (mat_view){B, ldb, 1};
    const int level = sm_simd_active();
    for (int64_t r0 = 0; r0 < M; r0 += SMALL_MAX_M) { /* rows in groups the kernels carry */
        const int64_t m = M - r0 < SMALL_MAX_M ? M - r0 : SMALL_MAX_M;
        const small_problem sp = {{A + r0 * lda, a.sr, a.sc}, b, C + r0 * ldc, ldc, 1, m, K, 1.0f, 0.0f};
        int stream;
        small_fn fn = small_kernel(&sp, N, trans_b, level, &stream);
        fn(&sp, n0, n1, stream ? scratch : NULL); /* no scratch: the register tile, same bits */
    }
}

#if SM_X86_KERNELS
/* One row of A: c (N) = a (K) @ B (K, N), B's rows read one after the other, front to back;
 * c is the accumulator (in L1 for the N of a decode step). */
SM_TARGET_AVX512
static void rows_seq_avx512(const float *a, const float *B, int64_t ldb, int64_t K, int64_t N,
                            float *c) {
    const int64_t nv = N / 16;
    const int rem = (int)(N % 16);
    const __mmask16 tail = sm_mask16(rem);
    memset(c, 0, (size_t)N * sizeof(float));
    for (int64_t k = 0; k < K; k++) {
        const __m512 x = _mm512_set1_ps(a[k]);
        const float *bk = B + k * ldb;
        int64_t v = 0;
        for (; v + 4 <= nv; v += 4) {
            _mm512_storeu_ps(c + 16 * v, _mm512_fmadd_ps(x, _mm512_loadu_ps(bk + 16 * v), _mm512_loadu_ps(c + 16 * v)));
            _mm512_storeu_ps(c + 16 * v + 16, _mm512_fmadd_ps(x, _mm512_loadu_ps(bk + 16 * v + 16), _mm512_loadu_ps(c + 16 * v + 16)));
            _mm512_storeu_ps(c + 16 * v + 32, _mm512_fmadd_ps(x, _mm512_loadu_ps(bk + 16 * v + 32), _mm512_loadu_ps(c + 16 * v + 32)));
            _mm512_storeu_ps(c + 16 * v + 48, _mm512_fmadd_ps(x, _mm512_loadu_ps(bk + 16 * v + 48), _mm512_loadu_ps(c + 16 * v + 48)));
        }
        for (; v < nv; v++)
            _mm512_storeu_ps(c + 16 * v, _mm512_fmadd_ps(x, _mm512_loadu_ps(bk + 16 * v), _mm512_loadu_ps(c + 16 * v)));
        if (rem)
            _mm512_mask_storeu_ps(c + 16 * nv, tail, _mm512_fmadd_ps(x, _mm512_maskz_loadu_ps(tail, bk + 16 * nv), _mm512_maskz_loadu_ps(tail, c + 16 * nv)));
    }
}
#endif

void sm_gemv_rows_stream(int64_t M, int64_t N, int64_t K, const float *A, int64_t lda,
                         const float *B, int64_t ldb, float *C, int64_t ldc, float *scratch) {
    if (M <= 0 || N <= 0) return;
    const int level = sm_simd_active();
    for (int64_t r0 = 0; r0 < M; r0 += SMALL_MAX_M) {
        const int64_t m = M - r0 < SMALL_MAX_M ? M - r0 : SMALL_MAX_M;
        const small_problem sp = {{A + r0 * lda, lda, 1}, {B, ldb, 1}, C + r0 * ldc, ldc, 1, m, K,
                                  1.0f, 0.0f};
#if SM_X86_KERNELS
        if (level >= SM_SIMD_AVX512) {
            if (m == 1) rows_seq_avx512(sp.a.p, B, ldb, K, N, sp.c);
            else small_rows_stream_avx512(&sp, 0, N, scratch);
            continue;
        }
        if (level >= SM_SIMD_AVX2) {
            small_rows_avx2(&sp, 0, N, NULL);
            continue;
        }
#endif
        (void)level;
        (void)scratch;
        small_rows_generic(&sp, 0, N, NULL);
    }
}

/* ---- driver ---------------------------------------------------------------------------------- */

/* Runs the epilogue over the whole of C, for the paths that do not fuse it: row blocks split
 * over threads (each element's operations are the same wherever they run). */
static void epilogue_pass(const sm_gemm_epilogue *epi, float *C, int64_t ldc, int64_t M, int64_t N,
                          int nthreads) {
    int nt = sm_team_size(nthreads, sm_ceil_div(M, 16), M * N * 4);
    (void)nt;
    SM_PARALLEL(nt)
    {
        int64_t r0, r1;
        sm_split_range(M, 16, SM_THREAD_COUNT(), SM_THREAD_ID(), &r0, &r1);
        if (r1 > r0) sm_gemm_epilogue_apply(epi, C + r0 * ldc, ldc, r0, 0, r1 - r0, N);
    }
}

static int gemm_run(int bf16, int trans_a, int trans_b, int64_t M, int64_t N, int64_t K,
                    float alpha, const float *A, int64_t lda, const float *B, int64_t ldb,
                    float beta, float *C, int64_t ldc, const sm_gemm_epilogue *epi, int nthreads) {
    /* op(A): (M, K), op(B): (K, N), C: (M, N) */
    if (M <= 0 || N <= 0) return SM_OK;
    if (K <= 0 || alpha == 0.0f) {
        /* Nothing to multiply: C = beta * C (beta == 0 writes zeros, ignoring NaN in C). */
        for (int64_t i = 0; i < M; i++)
            for (int64_t j = 0; j < N; j++) C[i * ldc + j] = beta == 0.0f ? 0.0f : beta * C[i * ldc + j];
        if (epi) epilogue_pass(epi, C, ldc, M, N, nthreads);
        return SM_OK;
    }
    int nt = sm_resolve_threads(nthreads);
    int level = sm_simd_active();
    mat_view a = trans_a ? (mat_view){A, 1, lda} : (mat_view){A, lda, 1};
    mat_view b = trans_b ? (mat_view){B, 1, ldb} : (mat_view){B, ldb, 1};

    /* Matrix-vector-like shapes: stream the big operand once instead of packing it (float32
     * only: bf16 rounds its operands while packing them). */
    if (!bf16 && (M <= SMALL_M || N <= SMALL_M)) {
        small_problem sp;
        int dots;
        if (M <= SMALL_M) {
            sp = (small_problem){a, b, C, ldc, 1, M, K, alpha, beta};
            dots = (b.sr == 1); /* B stored transposed: columns of op(B) contiguous in k */
            if (dots && a.sc != 1) dots = 0;
            if (dots || b.sc == 1) {
                int rc = small_run(&sp, N, dots, level, nt);
                if (rc == SM_OK && epi) epilogue_pass(epi, C, ldc, M, N, nt);
                return rc;
            }
        } else {
            /* C^T = op(B)^T op(A)^T: N (tiny) plays M; C^T written with strides (1, ldc). */
            mat_view at = {b.p, b.sc, b.sr}; /* op(B)^T: (N, K) */
            mat_view bt = {a.p, a.sc, a.sr}; /* op(A)^T: (K, M) */
            sp = (small_problem){at, bt, C, 1, ldc, N, K, alpha, beta};
            dots = (bt.sr == 1);
            if (dots && at.sc != 1) dots = 0;
            if (dots || bt.sc == 1) {
                int rc = small_run(&sp, M, dots, level, nt);
                if (rc == SM_OK && epi) epilogue_pass(epi, C, ldc, M, N, nt);
                return rc;
            }
        }
        /* Remaining layouts (a tiny operand strided along k against a big one contiguous in
         * k) are rare; the packed path below handles them. */
    }

    gemm_params P;
    if (bf16) get_params_bf16(level, &P);
    else get_params(level, &P);

    /* Thread grid tm x tn over C: split rows while every thread keeps several A slivers, else
     * split columns. The grid only moves whole tiles around, never changes arithmetic. */
    int tm = nt, tn = 1;
    while (tm > 1 && M / tm < 4 * P.MR) {
        /* move a factor from tm to tn */
        int f = 2;
        while (tm % f) f++;
        tm /= f;
        tn *= f;
    }
    if (tn > 1 && N / tn < P.NR) tn = (int)(N / P.NR > 0 ? N / P.NR : 1);
    /* Fewer threads for small products: waking a team costs more than it saves. */
    int64_t flops = 2 * M * N * K;
    if (flops < 4 * 1000 * 1000) tm = tn = 1;
    int team = tm * tn;

    /* Scratch sized to what the blocks below actually use (small products stay small). */
    int64_t kc_max, m_chunk, n_block;
    plan_blocks(&P, K, &kc_max, &m_chunk, &n_block);
    int64_t a_floats = sliver_floats(&P, P.MR, kc_max) * sm_min64(m_chunk, sm_ceil_div(M, tm)) / P.MR;
    int64_t b_floats = sliver_floats(&P, P.NR, kc_max) * sm_min64(n_block, sm_ceil_div(N, tn)) / P.NR;
    /* (whole slivers: the shares are rounded up to MR rows and NR columns) */
    a_floats += sliver_floats(&P, P.MR, kc_max);
    b_floats += sliver_floats(&P, P.NR, kc_max);
    /* Round each thread's share up to a cache line so threads never share a line. */
    int64_t per_thread = sm_round_up(a_floats, 16) + sm_round_up(b_floats, 16);
    /* Packing scratch comes from the process-wide pool: steady state allocates nothing. */
    float *scratch = (float *)sm_pool_rent(sm_pool_default(), (size_t)(per_thread * team) * sizeof(float));
    if (!scratch) return SM_ERR_NOMEM;

    SM_PARALLEL(team)
    {
        int tid = SM_THREAD_ID();
        /* OpenMP may grant fewer threads than asked (thread limit, nesting, dynamic teams).
         * The scratch above is sized for one cell of the tm x tn grid, so the threads we got
         * take whole cells in turn: a thread never works on a bigger block than planned. */
        int nth = SM_THREAD_COUNT();
        float *apack = scratch + (int64_t)tid * per_thread;
        float *bpack = apack + sm_round_up(a_floats, 16);
        if (P.thread_begin) P.thread_begin();
        for (int cell = tid; cell < team; cell += nth) {
            int im = cell / tn, in = cell % tn;
            int64_t m0, m1, n0, n1;
            sm_split_range(M, P.MR, tm, im, &m0, &m1);
            sm_split_range(N, P.NR, tn, in, &n0, &n1);
            if (m1 > m0 && n1 > n0) {
                mat_view as = {a.p + m0 * a.sr, a.sr, a.sc};
                mat_view bs = {b.p + n0 * b.sc, b.sr, b.sc};
                gemm_block(&P, as, bs, m1 - m0, n1 - n0, K, alpha, beta, C + m0 * ldc + n0,
                           ldc, apack, bpack, epi, m0, n0);
            }
        }
        if (P.thread_end) P.thread_end();
    }
    sm_pool_return(scratch);
    return SM_OK;
}

int sm_sgemm(int trans_a, int trans_b, int64_t M, int64_t N, int64_t K, float alpha,
             const float *A, int64_t lda, const float *B, int64_t ldb, float beta, float *C,
             int64_t ldc, int nthreads) {
    return gemm_run(0, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, NULL,
                    nthreads);
}

int sm_gemm_bf16(int trans_a, int trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                 const float *A, int64_t lda, const float *B, int64_t ldb, float beta, float *C,
                 int64_t ldc, int nthreads) {
    return gemm_run(1, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, NULL,
                    nthreads);
}

int sm_sgemm_epi(int trans_a, int trans_b, int64_t M, int64_t N, int64_t K, const float *A,
                 int64_t lda, const float *B, int64_t ldb, float *C, int64_t ldc,
                 const sm_gemm_epilogue *epi, int nthreads) {
    return gemm_run(0, trans_a, trans_b, M, N, K, 1.0f, A, lda, B, ldb, 0.0f, C, ldc, epi,
                    nthreads);
}

int sm_gemm_bf16_epi(int trans_a, int trans_b, int64_t M, int64_t N, int64_t K, const float *A,
                     int64_t lda, const float *B, int64_t ldb, float *C, int64_t ldc,
                     const sm_gemm_epilogue *epi, int nthreads) {
    return gemm_run(1, trans_a, trans_b, M, N, K, 1.0f, A, lda, B, ldb, 0.0f, C, ldc, epi,
                    nthreads);
}
