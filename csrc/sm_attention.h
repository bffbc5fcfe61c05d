/* sm_attention.h - causal multi-head self-attention on GPT-2-layout activations: a tiled
 * forward pass (online softmax over key tiles) that saves only each row's log-sum-exp, the
 * matching backward pass (recomputes the probabilities tile by tile), and the inference side:
 * a KV cache (prefill, append) and a decode step of one query per sequence against it.
 * Training may drop attention probabilities (the _ex variants). A prompt whose first blocks
 * are cached is finished by the forward pass of its remaining query blocks (_tail). Leaves
 * out: masks other than causal.
 *
 * Layout (as GPT-2's fused c_attn projection and llm.c):
 *   qkv  (B, T, 3C): for head h, the query is qkv[b, t, h*hs : (h+1)*hs], the key sits at
 *                    offset C and the value at offset 2C; hs = C / NH.
 *   out  (B, T, C):  heads concatenated, ready for c_proj.
 *   lse  (B, NH, T): log(sum_j exp(s_tj)) of row t's scaled scores s_tj = q_t.k_j / sqrt(hs)
 *                    over j <= t; the only activation the backward pass needs besides out.
 *
 * KV cache of one layer, capacity T_max tokens per sequence, T_max a multiple of SM_ATT_BLOCK:
 *   k_cache (B, NH, T_max / 64, hs, 64): keys in blocks of 64 positions, each block stored
 *                               TRANSPOSED (hs rows of 64 positions) and contiguous, so the
 *                               decode step gets the scores of 16 consecutive positions as one
 *                               vector and streams each block from memory in order. Key of
 *                               position t, dimension d: k_cache[b, h, t / 64, d, t % 64].
 *   v_cache (B, NH, T_max, hs): values by position, rows of hs floats.
 * Positions at or past a sequence's length never affect a result (the decode step may read
 * the rest of the last key block but drops it), so the cache may start uninitialised.
 *
 * All results are bitwise identical for any nthreads (each output row belongs to one work
 * item whose arithmetic does not depend on the team). nthreads <= 0 uses the library default.
 * Functions returning int give SM_OK or SM_ERR_NOMEM (scratch allocation failed; outputs are
 * then unspecified). */
#ifndef SM_ATTENTION_H
#define SM_ATTENTION_H

#include "sm_common.h"

/* Queries and keys are processed in tiles of this many rows. */
#define SM_ATT_BLOCK 64

/* ---- training ------------------------------------------------------------------------------ */

/* out (B, T, C), lse (B, NH, T) <- causal softmax(q k^T / sqrt(hs)) v for every head.
 * Overwrites out and lse. C % NH == 0. */
int sm_attention_forward(float *out, float *lse, const float *qkv, int64_t B, int64_t T,
                         int64_t C, int64_t NH, int nthreads);
int sm_attention_forward_naive(float *out, float *lse, const float *qkv, int64_t B, int64_t T,
                               int64_t C, int64_t NH);

/* dqkv (B, T, 3C) += d(loss)/d(qkv) given dout = d(loss)/d(out) (B, T, C) and the forward's
 * qkv, out and lse. Accumulates (the caller zeroes gradients once per step). The naive twin
 * recomputes the softmax in double and ignores out and lse. */
int sm_attention_backward(float *dqkv, const float *dout, const float *qkv, const float *out,
                          const float *lse, int64_t B, int64_t T, int64_t C, int64_t NH,
                          int nthreads);
int sm_attention_backward_naive(float *dqkv, const float *dout, const float *qkv,
                                const float *out, const float *lse, int64_t B, int64_t T,
                                int64_t C, int64_t NH);

/* Dropout on the attention probabilities (GPT-2's attn_dropout). Query t of head h of sequence
 * b attends to key j with probability P[t, j] * factor, where factor is 0 or 1 / (1 - p): the
 * factor of element ((b + batch_offset) * NH + h) * T + t) * T + j of the (p, seed, stream)
 * mask of sm_hash.h. batch_offset is the index of the call's first sequence in a larger batch,
 * so a batch processed in chunks gets the mask it would get whole. The log-sum-exp saved by the
 * forward pass is that of the undropped probabilities, as the backward pass expects. */
typedef struct sm_att_dropout {
    float p;              /* in [0, 1) */
    uint64_t seed, stream;
    int64_t batch_offset;
} sm_att_dropout;

/* sm_attention_forward / _backward (and the naive twins) with attention dropout; drop == NULL
 * or drop->p == 0 is exactly the plain call. The backward pass must get the forward's drop. */
int sm_attention_forward_ex(float *out, float *lse, const float *qkv, int64_t B, int64_t T,
                            int64_t C, int64_t NH, const sm_att_dropout *drop, int nthreads);
int sm_attention_backward_ex(float *dqkv, const float *dout, const float *qkv, const float *out,
                             const float *lse, int64_t B, int64_t T, int64_t C, int64_t NH,
                             const sm_att_dropout *drop, int nthreads);
int sm_attention_forward_naive_ex(float *out, float *lse, const float *qkv, int64_t B, int64_t T,
                                  int64_t C, int64_t NH, const sm_att_dropout *drop);
int sm_attention_backward_naive_ex(float *dqkv, const float *dout, const float *qkv,
                                   const float *out, const float *lse, int64_t B, int64_t T,
                                   int64_t C, int64_t NH, const sm_att_dropout *drop);

/* The forward pass of one sequence (qkv (T, 3C)) for query blocks first_block .. only (rows
 * first_block * SM_ATT_BLOCK .. T-1 of out (T, C) and lse (NH, T) are written): each block is
 * computed exactly as by sm_attention_forward, so a prompt whose first blocks are already in
 * a KV cache is finished with the same bits (the query rows of the skipped blocks are not
 * read). SM_ERR_ARG when first_block is not a block of T. No dropout. */
int sm_attention_forward_tail(float *out, float *lse, const float *qkv, int64_t T, int64_t C,
                              int64_t NH, int64_t first_block, int nthreads);

/* ---- inference: KV cache and decode --------------------------------------------------------- */

/* The keys and values of one sequence's cache positions 0 .. T-1 (k_cache (NH, T_max / 64, hs,
 * 64), v_cache (NH, T_max, hs) of that sequence) back into qkv rows (T, 3C), at the offsets
 * C and 2C of each row; the queries are not touched. */
void sm_kv_cache_read(float *qkv, const float *k_cache, const float *v_cache, int64_t T,
                      int64_t NH, int64_t T_max, int64_t hs);

/* Copy the keys and values of qkv (B, T, 3C) into cache positions start .. start+T-1 of every
 * sequence (start + T <= T_max). */
void sm_kv_cache_prefill(float *k_cache, float *v_cache, const float *qkv, int64_t start,
                         int64_t B, int64_t T, int64_t NH, int64_t T_max, int64_t hs,
                         int nthreads);

/* Write the key and value of one new token per sequence, qkv_row (B, 3C), at cache position
 * positions[b] (0 <= positions[b] < T_max). */
void sm_kv_cache_append(float *k_cache, float *v_cache, const float *qkv_row,
                        const int *positions, int64_t B, int64_t NH, int64_t T_max, int64_t hs,
                        int nthreads);

/* out (B, C) <- attention of one query per sequence over cached positions 0 .. lengths[b]-1
 * (the new token's key and value already appended; 1 <= lengths[b] <= T_max). The query of
 * sequence b, head h is q[b * q_stride + h*hs + d]: q_stride = C for a (B, C) array, 3C to
 * read the queries straight from qkv rows. */
int sm_attention_decode(float *out, const float *q, const float *k_cache, const float *v_cache,
                        const int *lengths, int64_t q_stride, int64_t B, int64_t NH,
                        int64_t T_max, int64_t hs, int nthreads);
/* One thread's share of a decode step, for a caller that runs its own parallel region: for
 * units u0 .. u1-1 (unit = b * NH + h) write the new key and value of qkv_row (B, 3C) at
 * positions[b], then out[b, head h] <- attention of the query over positions 0 .. positions[b].
 * Row b reads and writes cache sequence seqs[b] (seqs NULL: sequence b), so a step can decode
 * any subset of a cache's sequences. Serial; ws holds sm_attention_decode_ws(hs) floats. Same
 * bits as append + sm_attention_decode. */
void sm_attention_decode_units(float *out, const float *qkv_row, float *k_cache, float *v_cache,
                               const int *positions, const int *seqs, int64_t NH, int64_t T_max,
                               int64_t hs, int64_t u0, int64_t u1, float *ws);
int64_t sm_attention_decode_ws(int64_t hs);
int sm_attention_decode_naive(float *out, const float *q, const float *k_cache,
                              const float *v_cache, const int *lengths, int64_t q_stride,
                              int64_t B, int64_t NH, int64_t T_max, int64_t hs);

#endif /* SM_ATTENTION_H */
