# _core.pxd - Cython declarations of the C core: one `cdef extern` block per csrc header.
# Structs and functions are declared here only, never re-declared in the .pyx/.pxi files.
from libc.stdint cimport int64_t

cdef extern from "sm_common.h" nogil:
    enum:
        SM_OK
        SM_ERR_NOMEM
        SM_ERR_ARG
        SM_ERR_DISPOSED
        SM_ERR_STATE

cdef extern from "sm_runtime.h" nogil:
    int sm_simd_detected()
    int sm_simd_active()
    int sm_simd_set(int level)
    const char *sm_simd_name(int level)
    int sm_openmp_enabled()
    int sm_omp_max_threads()
    void sm_omp_set_num_threads(int n)
    int smallmind_get_num_threads()
    void smallmind_set_num_threads(int n)
    int sm_resolve_threads(int threads)
    int sm_cpu_count()
    const char *sm_compiler()

cdef extern from "sm_gemm.h" nogil:
    int sm_sgemm(int trans_a, int trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                 const float *A, int64_t lda, const float *B, int64_t ldb, float beta, float *C,
                 int64_t ldc, int nthreads)
    void sm_sgemm_naive(int trans_a, int trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                        const float *A, int64_t lda, const float *B, int64_t ldb, float beta,
                        float *C, int64_t ldc)


# ---- sm_pool.h (MemoryPool) ----------------------------------------------------------------



# ---- sm_ops.h (elementwise and row kernels) --------------------------------------------------



# ---- sm_attention.h (causal attention, decode) -----------------------------------------------

cdef extern from "sm_attention.h" nogil:
    enum:
        SM_ATT_BLOCK
    int sm_attention_forward(float *out, float *lse, const float *qkv, int64_t B, int64_t T,
                             int64_t C, int64_t NH, int nthreads)
    int sm_attention_forward_naive(float *out, float *lse, const float *qkv, int64_t B, int64_t T,
                                   int64_t C, int64_t NH)
    int sm_attention_backward(float *dqkv, const float *dout, const float *qkv, const float *out,
                              const float *lse, int64_t B, int64_t T, int64_t C, int64_t NH,
                              int nthreads)
    int sm_attention_backward_naive(float *dqkv, const float *dout, const float *qkv,
                                    const float *out, const float *lse, int64_t B, int64_t T,
                                    int64_t C, int64_t NH)
    void sm_kv_cache_prefill(float *k_cache, float *v_cache, const float *qkv, int64_t start,
                             int64_t B, int64_t T, int64_t NH, int64_t T_max, int64_t hs,
                             int nthreads)
    void sm_kv_cache_append(float *k_cache, float *v_cache, const float *qkv_row,
                            const int *positions, int64_t B, int64_t NH, int64_t T_max,
                            int64_t hs, int nthreads)
    int sm_attention_decode(float *out, const float *q, const float *k_cache,
                            const float *v_cache, const int *lengths, int64_t q_stride,
                            int64_t B, int64_t NH, int64_t T_max, int64_t hs, int nthreads)
    int sm_attention_decode_naive(float *out, const float *q, const float *k_cache,
                                  const float *v_cache, const int *lengths, int64_t q_stride,
                                  int64_t B, int64_t NH, int64_t T_max, int64_t hs)


# ---- end of declarations ---------------------------------------------------------------------
