/* sm_gemm.h - single-precision GEMM: C = alpha * op(A) @ op(B) + beta * C, row-major,
 * op(X) = X or X^T. Packed, cache-blocked, with AVX-512 / AVX2+FMA micro-kernels chosen at run
 * time and a portable fallback. Results are bitwise identical for any thread count. */
#ifndef SM_GEMM_H
#define SM_GEMM_H

#include "sm_common.h"
#include "sm_ops.h" /* sm_gemm_epilogue */

/* Shapes: op(A) is (M, K), op(B) is (K, N), C is (M, N).
 * trans_a = 0: A is stored (M, K) with row stride lda;  trans_a = 1: A is stored (K, M).
 * trans_b = 0: B is stored (K, N) with row stride ldb;  trans_b = 1: B is stored (N, K).
 * beta == 0 means C is write-only (its old contents, even NaN, are ignored).
 * alpha == 0 or K == 0: A and B are not read (NaN or Inf in them do not reach C); C = beta * C.
 * C must not overlap A or B. nthreads <= 0 uses the library default.
 * Returns SM_OK, or SM_ERR_NOMEM if scratch memory could not be allocated (C untouched). */
int sm_sgemm(int trans_a, int trans_b, int64_t M, int64_t N, int64_t K, float alpha,
             const float *A, int64_t lda, const float *B, int64_t ldb, float beta, float *C,
             int64_t ldc, int nthreads);

/* The same product with bf16 inputs: A and B are rounded to bf16 (round to nearest even) as they
 * are packed, multiplied exactly and summed in float32 (alpha, beta and C stay float32). On
 * Intel AMX (Sapphire Rapids and later, Linux) this runs on the tile unit; elsewhere the float32
 * kernels compute the same rounded product. Same contract as sm_sgemm otherwise, including bits
 * independent of the thread count. */
int sm_gemm_bf16(int trans_a, int trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                 const float *A, int64_t lda, const float *B, int64_t ldb, float beta, float *C,
                 int64_t ldc, int nthreads);
/* C = op(A) @ op(B) (alpha 1, beta 0), then the linear layer's epilogue (bias, residual, GELU;
 * see sm_gemm_epilogue in sm_ops.h) applied to each tile of C as soon as it is final, while it is
 * still in cache: one pass over C instead of three. Bits equal sm_sgemm (or sm_gemm_bf16)
 * followed by the separate element-wise kernels. epi may be NULL. */
int sm_sgemm_epi(int trans_a, int trans_b, int64_t M, int64_t N, int64_t K, const float *A,
                 int64_t lda, const float *B, int64_t ldb, float *C, int64_t ldc,
                 const sm_gemm_epilogue *epi, int nthreads);
int sm_gemm_bf16_epi(int trans_a, int trans_b, int64_t M, int64_t N, int64_t K, const float *A,
                     int64_t lda, const float *B, int64_t ldb, float *C, int64_t ldc,
                     const sm_gemm_epilogue *epi, int nthreads);
/* 1 if sm_gemm_bf16 runs on AMX tiles now (CPU, OS and the SIMD cap allow it), 0 if emulated. */
int sm_gemm_bf16_backend(void);

/* One thread's share of a matrix-vector-like product, for fused loops that run their own
 * parallel region (the decode step): C[0:M, n0:n1] = A (M, K) @ op(B)[:, n0:n1], with A rows
 * contiguous (row stride lda), op(B) = B (K, N) for trans_b = 0 or B^T with B (N, K) for
 * trans_b = 1, C rows with stride ldc. Serial, no OpenMP, no allocation. Each element is the
 * same FMA chain whatever n0, n1 (multiples of 64, or N) and M: a split over threads never
 * changes the bits, and rows computed together equal rows computed alone. scratch:
 * SM_GEMV_SCRATCH floats (lets wide, cache-exceeding B stream row by row) or NULL. */
#define SM_GEMV_SCRATCH (4 * 16384)
void sm_gemv_cols(int trans_b, int64_t M, int64_t N, int64_t K, const float *A, int64_t lda,
                  const float *B, int64_t ldb, float *C, int64_t ldc, int64_t n0, int64_t n1,
                  float *scratch);

/* C (M, N) = A (M, K) @ B (K, N), all N columns, reading B's rows front to back (K rows, a
 * block of a bigger matrix: each thread of a decode step streams its own contiguous rows).
 * Serial; scratch: SM_GEMV_SCRATCH floats. Any M; each element is one FMA chain in k order. */
void sm_gemv_rows_stream(int64_t M, int64_t N, int64_t K, const float *A, int64_t lda,
                         const float *B, int64_t ldb, float *C, int64_t ldc, float *scratch);

/* The obvious triple loop (double accumulator), kept as the reference the tests compare with. */
void sm_sgemm_naive(int trans_a, int trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                    const float *A, int64_t lda, const float *B, int64_t ldb, float beta,
                    float *C, int64_t ldc);

#endif /* SM_GEMM_H */
