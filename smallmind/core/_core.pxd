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
    double sm_fma_peak(int nthreads, int64_t iters, double *seconds)
    int sm_simd_active()
    int sm_simd_set(int level)
    const char *sm_simd_name(int level)
    int sm_openmp_enabled()
    int sm_omp_max_threads()
    void sm_omp_set_num_threads(int n)
    int smallmind_get_num_threads()
    void smallmind_set_num_threads(int n)
    int sm_resolve_threads(int threads)
    int smallmind_forked_child()
    int smallmind_team_used()
    int sm_cpu_count()
    const char *sm_compiler()

cdef extern from "sm_ops.h" nogil:
    ctypedef struct sm_gemm_epilogue:
        const float *bias
        const float *resid
        int64_t ldr
        float *gelu
        int64_t ldg

cdef extern from "sm_gemm.h" nogil:
    int sm_sgemm(int trans_a, int trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                 const float *A, int64_t lda, const float *B, int64_t ldb, float beta, float *C,
                 int64_t ldc, int nthreads)
    int sm_gemm_bf16(int trans_a, int trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                     const float *A, int64_t lda, const float *B, int64_t ldb, float beta,
                     float *C, int64_t ldc, int nthreads)
    int sm_gemm_bf16_backend()
    int sm_sgemm_epi(int trans_a, int trans_b, int64_t M, int64_t N, int64_t K, const float *A,
                     int64_t lda, const float *B, int64_t ldb, float *C, int64_t ldc,
                     const sm_gemm_epilogue *epi, int nthreads)
    int sm_gemm_bf16_epi(int trans_a, int trans_b, int64_t M, int64_t N, int64_t K,
                         const float *A, int64_t lda, const float *B, int64_t ldb, float *C,
                         int64_t ldc, const sm_gemm_epilogue *epi, int nthreads)
    void sm_sgemm_naive(int trans_a, int trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                        const float *A, int64_t lda, const float *B, int64_t ldb, float beta,
                        float *C, int64_t ldc)


# ---- sm_pool.h (MemoryPool) ----------------------------------------------------------------
from libc.stdint cimport int32_t, uint8_t, uint32_t, uint64_t

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
    void sm_pool_hold_lock(sm_pool *p, int64_t micros)


# ---- sm_ops.h (elementwise and row kernels) --------------------------------------------------

cdef extern from "sm_ops.h" nogil:
    void sm_encoder_forward(float *out, const int *idx, const float *wte, const float *wpe,
                            int64_t B, int64_t T, int64_t C, int64_t V, int nthreads)
    void sm_encoder_forward_naive(float *out, const int *idx, const float *wte, const float *wpe,
                                  int64_t B, int64_t T, int64_t C, int64_t V)
    void sm_encoder_backward(float *dwte, float *dwpe, const float *dout, const int *idx,
                             int64_t B, int64_t T, int64_t C, int64_t V, int nthreads)
    void sm_encoder_backward_naive(float *dwte, float *dwpe, const float *dout, const int *idx,
                                   int64_t B, int64_t T, int64_t C, int64_t V)
    void sm_layernorm_forward(float *out, float *mean, float *rstd, const float *inp,
                              const float *weight, const float *bias, int64_t N, int64_t C,
                              float eps, int nthreads)
    void sm_layernorm_forward_naive(float *out, float *mean, float *rstd, const float *inp,
                                    const float *weight, const float *bias, int64_t N, int64_t C,
                                    float eps)
    int64_t sm_layernorm_backward_scratch(int64_t N, int64_t C)
    int64_t sm_bias_backward_scratch(int64_t N, int64_t C)
    int sm_layernorm_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                              const float *inp, const float *weight, const float *mean,
                              const float *rstd, int64_t N, int64_t C, float *scratch,
                              int nthreads)
    void sm_layernorm_backward_naive(float *dinp, float *dweight, float *dbias, const float *dout,
                                     const float *inp, const float *weight, const float *mean,
                                     const float *rstd, int64_t N, int64_t C)
    void sm_gelu_forward(float *out, const float *inp, int64_t n, int nthreads)
    void sm_gelu_forward_naive(float *out, const float *inp, int64_t n)
    void sm_gelu_backward(float *dinp, const float *inp, const float *dout, int64_t n, int nthreads)
    void sm_gelu_backward_naive(float *dinp, const float *inp, const float *dout, int64_t n)
    void sm_softmax_forward(float *probs, const float *logits, int64_t N, int64_t V,
                            float temperature, int nthreads)
    void sm_softmax_forward_naive(float *probs, const float *logits, int64_t N, int64_t V,
                                  float temperature)
    void sm_crossentropy_forward(float *losses, float *lse, const float *logits, const int *targets,
                                 int64_t N, int64_t V, int nthreads)
    void sm_crossentropy_forward_naive(float *losses, float *lse, const float *logits,
                                       const int *targets, int64_t N, int64_t V)
    void sm_crossentropy_backward(float *dlogits, const float *logits, const float *lse,
                                  const int *targets, const float *dloss, int64_t N, int64_t V,
                                  int nthreads)
    void sm_crossentropy_backward_naive(float *dlogits, const float *logits, const float *lse,
                                        const int *targets, const float *dloss, int64_t N,
                                        int64_t V)
    void sm_crossentropy_forward_backward(float *losses, float *dlogits, const float *logits,
                                          const int *targets, const float *dloss, int64_t N,
                                          int64_t V, int nthreads)
    void sm_residual_forward(float *out, const float *a, const float *b, int64_t n, int nthreads)
    void sm_residual_forward_naive(float *out, const float *a, const float *b, int64_t n)
    void sm_residual_backward(float *da, float *db, const float *dout, int64_t n, int nthreads)
    void sm_residual_backward_naive(float *da, float *db, const float *dout, int64_t n)
    void sm_bias_add(float *out, const float *bias, int64_t N, int64_t C, int nthreads)
    void sm_bias_add_naive(float *out, const float *bias, int64_t N, int64_t C)
    int sm_bias_backward(float *dbias, const float *dout, int64_t N, int64_t C, float *scratch,
                         int nthreads)
    void sm_bias_backward_naive(float *dbias, const float *dout, int64_t N, int64_t C)
    void sm_adamw_step(float *param, float *m, float *v, const float *grad, int64_t n, float lr,
                       float beta1, float beta2, float eps, float weight_decay, int64_t step,
                       int nthreads)
    void sm_adamw_step_naive(float *param, float *m, float *v, const float *grad, int64_t n,
                             float lr, float beta1, float beta2, float eps, float weight_decay,
                             int64_t step)
    enum:
        SM_NORM_BLOCK
    double sm_sumsq(const float *x, int64_t n, int nthreads)
    double sm_sumsq_naive(const float *x, int64_t n)
    double sm_clip_grad_norm(float *grad, int64_t n, float max_norm, int nthreads)
    double sm_clip_grad_norm_naive(float *grad, int64_t n, float max_norm)




# ---- sm_attention.h (causal attention, decode) -----------------------------------------------

cdef extern from "sm_hash.h" nogil:
    ctypedef struct sm_drop_mask:
        uint64_t key
        uint32_t threshold
        float scale
    sm_drop_mask sm_drop_mask_make(float p, uint64_t seed, uint64_t stream)
    float sm_drop_factor(const sm_drop_mask *m, uint64_t e)


cdef extern from "sm_attention.h" nogil:
    enum:
        SM_ATT_BLOCK
    ctypedef struct sm_att_dropout:
        float p
        uint64_t seed
        uint64_t stream
        int64_t batch_offset
    int sm_attention_forward_ex(float *out, float *lse, const float *qkv, int64_t B, int64_t T,
                                int64_t C, int64_t NH, const sm_att_dropout *drop, int nthreads)
    int sm_attention_backward_ex(float *dqkv, const float *dout, const float *qkv,
                                 const float *out, const float *lse, int64_t B, int64_t T,
                                 int64_t C, int64_t NH, const sm_att_dropout *drop, int nthreads)
    int sm_attention_forward_naive_ex(float *out, float *lse, const float *qkv, int64_t B,
                                      int64_t T, int64_t C, int64_t NH,
                                      const sm_att_dropout *drop)
    int sm_attention_backward_naive_ex(float *dqkv, const float *dout, const float *qkv,
                                       const float *out, const float *lse, int64_t B, int64_t T,
                                       int64_t C, int64_t NH, const sm_att_dropout *drop)
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


# ---- sm_quant.h (bf16 / int8 weight matrices and their matrix-vector products) ----------------

cdef extern from "sm_quant.h" nogil:
    enum:
        SM_QBF16
        SM_QI8
    ctypedef struct sm_qmat:
        int fmt
        int64_t K, N, group
        const void *codes
        const float *scales
    int sm_quantize(int fmt, int64_t K, int64_t N, int64_t group, const float *W, int64_t ldw,
                    void *codes, float *scales)
    int sm_quantize_t(int fmt, int64_t N, int64_t K, int64_t group, const float *Wt, int64_t ldw,
                      void *codes, float *scales)
    void sm_dequantize(const sm_qmat *q, int transposed, float *out)
    int sm_qgemv(const sm_qmat *q, int64_t M, const float *x, int64_t ldx, int64_t k0, int64_t k1,
                 int64_t n0, int64_t n1, float *y, int64_t ldy)
    int sm_qgemv_dots(const sm_qmat *q, int64_t M, const float *x, int64_t ldx, int64_t n0,
                      int64_t n1, float *y, int64_t ldy)

# ---- sm_model.h (whole GPT-2 forward / backward / AdamW) -------------------------------------

cdef extern from "sm_model.h" nogil:
    ctypedef struct sm_gpt_config:
        int64_t vocab_size
        int64_t block_size
        int64_t n_layer
        int64_t n_head
        int64_t n_embd
    enum:
        SM_GPT_NUM_KINDS
    enum:
        SM_INIT_NORMAL
        SM_INIT_RESIDUAL
        SM_INIT_ONES
        SM_INIT_ZEROS
    ctypedef struct sm_gpt_kind_info:
        const char *name
        int rows
        int cols
        int per_layer
        int hf_rank
        int init
    const sm_gpt_kind_info sm_gpt_kinds[]
    ctypedef struct sm_gpt_state:
        pass
    int sm_gpt_kind_per_layer(int kind)
    int64_t sm_gpt_dim(const sm_gpt_config *cfg, int dim)
    int64_t sm_gpt_tensor_size(const sm_gpt_config *cfg, int kind)
    int64_t sm_gpt_tensor_offset(const sm_gpt_config *cfg, int kind, int64_t layer)
    int64_t sm_gpt_num_params(const sm_gpt_config *cfg)
    int64_t sm_gpt_decay_size(const sm_gpt_config *cfg)
    int sm_gpt_config_check(const sm_gpt_config *cfg)
    int sm_gpt_state_create(sm_gpt_state **out, const sm_gpt_config *cfg, int64_t B, int64_t T)
    void sm_gpt_state_free(sm_gpt_state *s)
    int64_t sm_gpt_state_nbytes(const sm_gpt_state *s)
    int64_t sm_gpt_state_B(const sm_gpt_state *s)
    int64_t sm_gpt_state_T(const sm_gpt_state *s)
    int sm_gpt_state_ready(const sm_gpt_state *s)
    int sm_gpt_state_set_precision(sm_gpt_state *s, int precision)
    int sm_gpt_state_precision(const sm_gpt_state *s)
    enum:
        SM_PRECISION_FLOAT32
        SM_PRECISION_BF16
    int sm_gpt_forward(float *logits, float *loss, int64_t *n_valid, sm_gpt_state *state,
                       const float *params, const sm_gpt_config *cfg, const int *idx,
                       const int *targets, int64_t B, int64_t T, float dropout, uint64_t seed,
                       int nthreads)
    int sm_gpt_backward(float *grads, sm_gpt_state *state, const float *params, float loss_scale,
                        int nthreads)
    void sm_gpt_adamw(float *params, float *m, float *v, const float *grads,
                      const sm_gpt_config *cfg, float lr, float beta1, float beta2, float eps,
                      float weight_decay, int64_t step, int nthreads)
    void sm_dropout_forward(float *out, const float *inp, int64_t n, float p, uint64_t seed,
                            uint64_t stream, int nthreads)
    ctypedef struct sm_gpt_cache:
        pass
    int sm_gpt_cache_create(sm_gpt_cache **out, const sm_gpt_config *cfg, int64_t B,
                            int64_t capacity)
    ctypedef struct sm_gpt_qweights:
        const sm_qmat *layer
        const sm_qmat *wte
    int sm_gpt_cache_set_weights(sm_gpt_cache *c, const sm_gpt_qweights *qw)
    int sm_gpt_forward_q(float *logits, float *loss, int64_t *n_valid, const float *params,
                         const sm_gpt_qweights *qw, const sm_gpt_config *cfg, const int *idx,
                         const int *targets, int64_t B, int64_t T, int nthreads)
    void sm_gpt_cache_free(sm_gpt_cache *c)
    int64_t sm_gpt_cache_nbytes(const sm_gpt_cache *c)
    int64_t sm_gpt_cache_B(const sm_gpt_cache *c)
    int64_t sm_gpt_cache_capacity(const sm_gpt_cache *c)
    int64_t sm_gpt_cache_length(const sm_gpt_cache *c, int64_t b)
    int sm_gpt_embed(float *out, const float *params, const sm_gpt_config *cfg, const int *idx,
                     int64_t B, int64_t T, int nthreads)
    int sm_gpt_prefill(float *logits, sm_gpt_cache *c, const float *params,
                       const sm_gpt_config *cfg, const int *idx, int64_t T, int nthreads)
    int sm_gpt_prefill_seq(float *logits, sm_gpt_cache *c, const float *params,
                           const sm_gpt_config *cfg, int64_t b, int64_t nb, const int *idx,
                           int64_t T, int nthreads)
    int sm_gpt_decode(float *logits, sm_gpt_cache *c, const float *params,
                      const sm_gpt_config *cfg, const int *tokens, int nthreads)
    int sm_gpt_decode_seqs(float *logits, sm_gpt_cache *c, const float *params,
                           const sm_gpt_config *cfg, const int *seqs, int64_t n,
                           const int *tokens, int nthreads)
    int sm_gpt_cache_copy(sm_gpt_cache *dst, int64_t db, const sm_gpt_cache *src, int64_t sb,
                          int64_t n)
    int sm_gpt_prefill_extend(float *logits, sm_gpt_cache *c, const float *params,
                              const sm_gpt_config *cfg, int64_t b, const int *idx, int64_t pre,
                              int64_t T, int nthreads)


cdef extern from "sm_sample.h" nogil:
    double sm_sample_uniform(uint64_t key, uint64_t counter)
    int sm_sample_rows(int *out, const float *logits, int64_t ld, int64_t n, int64_t V,
                       const float *temperature, const int64_t *top_k, const float *top_p,
                       const uint64_t *key, const uint64_t *counter, int nthreads)


cdef extern from "sm_generate.h" nogil:
    int SM_GEN_MAX_TOP
    ctypedef struct sm_gen_row:
        int64_t seq
        float temperature
        int64_t top_k
        float top_p
        uint64_t key
        double presence_penalty
        double frequency_penalty
        const double *bias
        int logprobs
        int64_t stop_token
        int32_t *counts
        int *window
        int64_t held
        float *logits
        uint64_t generated
        int64_t remaining
        int failed
    ctypedef struct sm_gen_logprob:
        double logprob
        int n
        int top_id[20]
        double top_logprob[20]
    int sm_gpt_generate(sm_gpt_cache *c, const float *params, const sm_gpt_config *cfg,
                        sm_gen_row *rows, int64_t n_rows, int64_t nv, int64_t keep,
                        int64_t max_steps, double max_seconds, int64_t *interrupt, int *out,
                        sm_gen_logprob *lp_out, int64_t ld_out, int64_t *made,
                        double *first_step_s, int64_t *steps_out, int nthreads)


# ---- end of declarations ---------------------------------------------------------------------

# ---- sm_index.h (VectorIndex store and exact top-k search) --------------------------------------

cdef extern from "sm_index.h" nogil:
    ctypedef struct sm_index:
        pass
    int SM_METRIC_COSINE, SM_METRIC_DOT, SM_METRIC_L2
    enum:
        SM_STORE_F32
        SM_STORE_BF16
        SM_STORE_I8
    int sm_index_create(sm_index **out, int64_t dim, int metric, int storage, int exact)
    int sm_index_storage(const sm_index *ix)
    int sm_index_exact(const sm_index *ix)
    void sm_index_get_codes(const sm_index *ix, int64_t r, void *codes, float *scale)
    int sm_index_add_codes(sm_index *ix, const void *codes, const float *scales, int64_t n)
    void sm_index_free(sm_index *ix)
    int64_t sm_index_size(const sm_index *ix)
    int64_t sm_index_dim(const sm_index *ix)
    int sm_index_metric(const sm_index *ix)
    int64_t sm_index_nbytes(const sm_index *ix)
    int sm_index_add(sm_index *ix, const float *x, int64_t n, int64_t ldx)
    int64_t sm_index_remove(sm_index *ix, int64_t r)
    void sm_index_get(const sm_index *ix, int64_t r, float *out)
    int sm_index_search(const sm_index *ix, const float *q, int64_t nq, int64_t ldq, int64_t k,
                        int64_t *rows, float *scores, int nthreads)
    int sm_index_search_naive(const sm_index *ix, const float *q, int64_t nq, int64_t ldq,
                              int64_t k, int64_t *rows, float *scores)



# ---- sm_bpe.h (byte-level BPE) --------------------------------------------------------------
cdef extern from "sm_bpe.h" nogil:
    ctypedef struct sm_bpe:
        pass
    int SM_BPE_PAT_GPT2, SM_BPE_PAT_CL100K
    int sm_uc_class(uint32_t cp)
    const char *sm_unicode_version()
    int64_t sm_bpe_pretoken_end(int pattern, const uint8_t *text, int64_t n, int64_t at)
    sm_bpe *sm_bpe_new(int64_t n, const uint8_t *blob, const int64_t *offsets, int64_t n_merges,
                       const int32_t *merge_a, const int32_t *merge_b, int whole_words,
                       int pattern, int *err)
    void sm_bpe_free(sm_bpe *b)
    int sm_bpe_pattern(const sm_bpe *b)
    int64_t sm_bpe_encode(const sm_bpe *b, const uint8_t *text, int64_t n, int32_t *out,
                          int64_t cap)
    void sm_bpe_encode_batch(const sm_bpe *b, const uint8_t *text, const int64_t *starts,
                             int64_t n_docs, int32_t *out, int64_t *counts, int nthreads)
    const uint8_t *sm_bpe_token_bytes(const sm_bpe *b, int32_t id, int64_t *len)
    int64_t sm_bpe_train(const uint8_t *text, const int64_t *starts, int64_t n_docs, int pattern,
                         int64_t max_merges, int64_t min_count, int32_t *merge_a,
                         int32_t *merge_b)
