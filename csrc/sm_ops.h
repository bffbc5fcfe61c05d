/* sm_ops.h - the non-GEMM kernels of a GPT training step: token+position embedding, layernorm,
 * GELU, row softmax, fused softmax + cross-entropy, residual add, bias add, AdamW and global
 * gradient-norm clipping; forward and backward, each with a *_naive reference twin.
 *
 * Conventions (as llm.c): outputs first, then inputs/weights, then saved activations, then
 * dimensions (int64_t), then `nthreads` last (<= 0: the library default). Forward kernels
 * OVERWRITE their outputs; backward kernels ACCUMULATE (+=) into gradient buffers, which the
 * caller zeroes once per step. No output may overlap an input unless a comment says so.
 * Results are bitwise identical for any thread count: threads own disjoint outputs, and every
 * reduction over rows uses fixed-size row blocks whose partial sums are combined in block order.
 * The SIMD level (sm_simd_active) is read per call; different levels may differ in the last bits.
 * The *_naive twins are plain loops with double accumulation, single-threaded, for tests. */
#ifndef SM_OPS_H
#define SM_OPS_H

#include "sm_common.h"

/* ---- token + position embedding ------------------------------------------------------------ */

/* out[b,t,:] = wte[idx[b,t],:] + wpe[t,:].  out (B,T,C), idx (B,T), wte (V,C), wpe (>=T, C).
 * An id outside [0, V) (the Python layer rejects them) contributes a zero wte row. */
void sm_encoder_forward(float *out, const int *idx, const float *wte, const float *wpe,
                        int64_t B, int64_t T, int64_t C, int64_t V, int nthreads);
void sm_encoder_forward_naive(float *out, const int *idx, const float *wte, const float *wpe,
                              int64_t B, int64_t T, int64_t C, int64_t V);
/* dwte[idx[b,t],:] += dout[b,t,:];  dwpe[t,:] += dout[b,t,:].  Threads own channel ranges and
 * walk the rows in (b,t) order, so the scatter-add is deterministic. Out-of-range ids are
 * skipped. dwte and dwpe must not overlap. */
void sm_encoder_backward(float *dwte, float *dwpe, const float *dout, const int *idx,
                         int64_t B, int64_t T, int64_t C, int64_t V, int nthreads);
void sm_encoder_backward_naive(float *dwte, float *dwpe, const float *dout, const int *idx,
                               int64_t B, int64_t T, int64_t C, int64_t V);

/* ---- layernorm ----------------------------------------------------------------------------- */

/* out[i,:] = (x[i,:] - mean_i) * rstd_i * weight + bias, rstd_i = 1/sqrt(var_i + eps) with the
 * biased variance. out, inp (N,C); weight, bias (C); mean, rstd (N) are saved for backward
 * (either may be NULL when not needed). */
void sm_layernorm_forward(float *out, float *mean, float *rstd, const float *inp,
                          const float *weight, const float *bias, int64_t N, int64_t C, float eps,
                          int nthreads);
void sm_layernorm_forward_naive(float *out, float *mean, float *rstd, const float *inp,
                                const float *weight, const float *bias, int64_t N, int64_t C,
                                float eps);
/* Floats of scratch sm_layernorm_backward / sm_bias_backward need for (N, C). */
int64_t sm_layernorm_backward_scratch(int64_t N, int64_t C);
int64_t sm_bias_backward_scratch(int64_t N, int64_t C);
/* dinp += d(out)/d(inp)^T dout; dweight += sum_i dout*xhat; dbias += sum_i dout.
 * dinp, dout, inp (N,C); dweight, dbias, weight (C); mean, rstd (N) from the forward.
 * scratch: sm_layernorm_backward_scratch(N, C) floats (64-byte aligned), or NULL to allocate.
 * Returns SM_OK or SM_ERR_NOMEM (nothing written then). */
int sm_layernorm_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                          const float *inp, const float *weight, const float *mean,
                          const float *rstd, int64_t N, int64_t C, float *scratch, int nthreads);
void sm_layernorm_backward_naive(float *dinp, float *dweight, float *dbias, const float *dout,
                                 const float *inp, const float *weight, const float *mean,
                                 const float *rstd, int64_t N, int64_t C);

/* ---- GELU (tanh approximation) ------------------------------------------------------------- */

/* out = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), elementwise over n values. */
void sm_gelu_forward(float *out, const float *inp, int64_t n, int nthreads);
void sm_gelu_forward_naive(float *out, const float *inp, int64_t n);
/* dinp += gelu'(inp) * dout. */
void sm_gelu_backward(float *dinp, const float *inp, const float *dout, int64_t n, int nthreads);
void sm_gelu_backward_naive(float *dinp, const float *inp, const float *dout, int64_t n);

/* ---- softmax and cross-entropy ------------------------------------------------------------- */

/* probs[i,:] = softmax(logits[i,:] / temperature) (temperature > 0). probs, logits (N,V). */
void sm_softmax_forward(float *probs, const float *logits, int64_t N, int64_t V,
                        float temperature, int nthreads);
void sm_softmax_forward_naive(float *probs, const float *logits, int64_t N, int64_t V,
                              float temperature);
/* losses[i] = logsumexp(logits[i,:]) - logits[i, targets[i]]; a target of -1 (padding) or any
 * other id outside [0, V) gives loss 0 and, in backward, no gradient. lse (N), if not NULL,
 * receives logsumexp per row for the backward. losses, targets (N); logits (N,V). */
void sm_crossentropy_forward(float *losses, float *lse, const float *logits, const int *targets,
                             int64_t N, int64_t V, int nthreads);
void sm_crossentropy_forward_naive(float *losses, float *lse, const float *logits,
                                   const int *targets, int64_t N, int64_t V);
/* dlogits[i,:] += (softmax(logits[i,:]) - onehot(targets[i])) * dloss[i], straight from the
 * logits (probabilities are never stored). lse from the forward, or NULL to recompute it.
 * dlogits, logits (N,V); lse, targets, dloss (N). */
void sm_crossentropy_backward(float *dlogits, const float *logits, const float *lse,
                              const int *targets, const float *dloss, int64_t N, int64_t V,
                              int nthreads);
void sm_crossentropy_backward_naive(float *dlogits, const float *logits, const float *lse,
                                    const int *targets, const float *dloss, int64_t N, int64_t V);
/* Forward and backward in one pass over each row (losses may be NULL). Same results as
 * sm_crossentropy_forward followed by sm_crossentropy_backward. */
void sm_crossentropy_forward_backward(float *losses, float *dlogits, const float *logits,
                                      const int *targets, const float *dloss, int64_t N,
                                      int64_t V, int nthreads);

/* ---- residual and bias --------------------------------------------------------------------- */

/* out = a + b over n values. */
void sm_residual_forward(float *out, const float *a, const float *b, int64_t n, int nthreads);
void sm_residual_forward_naive(float *out, const float *a, const float *b, int64_t n);
/* da += dout; db += dout (da and db must not overlap). */
void sm_residual_backward(float *da, float *db, const float *dout, int64_t n, int nthreads);
void sm_residual_backward_naive(float *da, float *db, const float *dout, int64_t n);
/* out[i,:] += bias, in place. out (N,C), bias (C). */
void sm_bias_add(float *out, const float *bias, int64_t N, int64_t C, int nthreads);
/* ---- GEMM epilogue -------------------------------------------------------------------------
 * What a linear layer does to its product while each finished tile is still in cache (see
 * sm_sgemm_epi): per element of C, in this order, C += bias[col] (if bias), C += resid[row, col]
 * (if resid), then gelu[row, col] = GELU(C) (if gelu). These are the per-element operations of
 * sm_bias_add, sm_residual_forward and sm_gelu_forward, so fusing them changes no bit. */
typedef struct {
    const float *bias;  /* (N) or NULL */
    const float *resid; /* (M, N) with row stride ldr, or NULL; must not overlap C */
    int64_t ldr;
    float *gelu;        /* (M, N) with row stride ldg, or NULL; must not overlap C */
    int64_t ldg;
} sm_gemm_epilogue;
/* Applies e to the rows x n block of C at (r0, c0) of the whole matrix (c points at that block,
 * row stride ldc; e's pointers address the whole matrix). Serial. */
void sm_gemm_epilogue_apply(const sm_gemm_epilogue *e, float *c, int64_t ldc, int64_t r0,
                            int64_t c0, int64_t rows, int64_t n);

void sm_bias_add_naive(float *out, const float *bias, int64_t N, int64_t C);
/* dbias += column sums of dout (N,C), deterministic. scratch: sm_bias_backward_scratch(N, C)
 * floats, or NULL to allocate. Returns SM_OK or SM_ERR_NOMEM. */
int sm_bias_backward(float *dbias, const float *dout, int64_t N, int64_t C, float *scratch,
                     int nthreads);
void sm_bias_backward_naive(float *dbias, const float *dout, int64_t N, int64_t C);

/* ---- optimizer ----------------------------------------------------------------------------- */

/* One AdamW step (decoupled weight decay) over n values, step t >= 1:
 *   m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  mhat = m/(1-b1^t);  vhat = v/(1-b2^t)
 *   p -= lr * (mhat / (sqrt(vhat) + eps) + weight_decay * p)
 * param, m, v are updated in place; grad is read. */
void sm_adamw_step(float *param, float *m, float *v, const float *grad, int64_t n, float lr,
                   float beta1, float beta2, float eps, float weight_decay, int64_t step,
                   int nthreads);
void sm_adamw_step_naive(float *param, float *m, float *v, const float *grad, int64_t n,
                         float lr, float beta1, float beta2, float eps, float weight_decay,
                         int64_t step);

/* Sum of squares of n values, accumulated in double over fixed blocks of SM_NORM_BLOCK values
 * whose partial sums are added in block order: the same bits for any thread count. */
#define SM_NORM_BLOCK 16384
double sm_sumsq(const float *x, int64_t n, int nthreads);
double sm_sumsq_naive(const float *x, int64_t n);
/* Global gradient-norm clipping: norm = sqrt(sumsq(grad)); when max_norm / (norm + 1e-6) < 1,
 * grad *= that factor. Returns the norm before clipping. A non-finite norm leaves grad
 * untouched (the caller should skip the step). */
double sm_clip_grad_norm(float *grad, int64_t n, float max_norm, int nthreads);
double sm_clip_grad_norm_naive(float *grad, int64_t n, float max_norm);

#endif /* SM_OPS_H */
