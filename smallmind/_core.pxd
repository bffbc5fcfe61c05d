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
from libc.stdint cimport int32_t, uint64_t

cdef extern from "sm_pool.h" nogil:
    ctypedef struct sm_pool:
        pass
    ctypedef struct sm_pool_stats:
        int64_t rents
        int64_t returns
        int64_t hits
        int64_t misses
        int64_t outstanding_buffers
        int64_t outstanding_bytes
        int64_t pooled_buffers
        int64_t pooled_bytes
        int64_t peak_outstanding_bytes
        int64_t discarded
        int64_t trimmed
        int64_t bad_returns
        int64_t failed_rents
        int64_t max_buffer_size
        int64_t max_buffers_per_bucket
        int64_t max_pooled_bytes
        int64_t num_buckets
        int32_t disposed
        int32_t is_default
    ctypedef struct sm_pool_global_stats:
        int64_t live_pools
        int64_t live_blocks
        int64_t live_bytes
    size_t SM_POOL_UNLIMITED
    size_t SM_POOL_MAX_BUFFER_LIMIT
    size_t SM_POOL_MAX_RENT_BYTES
    int64_t SM_POOL_MAX_PER_BUCKET_LIMIT
    size_t SM_POOL_DEFAULT_MAX_BUFFER_SIZE
    int64_t SM_POOL_DEFAULT_MAX_PER_BUCKET
    size_t SM_POOL_DEFAULT_MAX_POOLED_BYTES
    int sm_pool_create(sm_pool **out, size_t max_buffer_size, int64_t max_buffers_per_bucket,
                       size_t max_pooled_bytes)
    sm_pool *sm_pool_default()
    int sm_pool_rent_ex(void **out, sm_pool *p, size_t nbytes)
    void *sm_pool_rent(sm_pool *p, size_t nbytes)
    int sm_pool_return(void *block)
    int sm_pool_return_to(sm_pool *p, void *block)
    sm_pool *sm_pool_block_pool(const void *block)
    size_t sm_pool_block_capacity(const void *block)
    int sm_pool_block_size_class(const void *block)
    int sm_pool_trim(sm_pool *p, int64_t *freed_bytes)
    int sm_pool_dispose(sm_pool *p)
    void sm_pool_retain(sm_pool *p)
    void sm_pool_release(sm_pool *p)
    int sm_pool_get_stats(sm_pool_stats *out, sm_pool *p)
    void sm_pool_reset_peak(sm_pool *p)
    void sm_pool_global_get_stats(sm_pool_global_stats *out)
    int sm_pool_size_class(size_t nbytes)
    size_t sm_pool_class_size(int size_class)
    int64_t sm_pool_stress_test(sm_pool *p, int nthreads, int64_t iters, uint64_t seed)


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
