/* sm_model.h - a whole GPT-2 model as single C calls: the parameter block layout, the forward
 * pass (inference, or training with saved activations and the loss gradient), the backward pass
 * into one gradient block, and the AdamW update with weight decay on the weight matrices only.
 * Dropout sits where GPT-2 applies it: the embedding sum, the attention probabilities and each
 * block's two branch outputs. Inference also runs incrementally: a KV cache per model call
 * sequence, filled by a prefill pass over a prompt and extended one token at a time.
 *
 * The model (Hugging Face GPT2LMHeadModel): x = wte[idx] + wpe[t]; per layer
 * x = x + c_proj(attn(ln_1(x))); x = x + mlp_c_proj(gelu(c_fc(ln_2(x)))); logits = ln_f(x) wte^T.
 * Weights are stored (in, out) like GPT-2's Conv1D, so every projection is y = x W + b, one SGEMM.
 *
 * Parameter block: every tensor is a contiguous range of one float array, starting on a 64-byte
 * boundary (offsets are multiples of 16 floats; the padding between tensors is zero and stays
 * zero through training). The four weight-matrix kinds of every layer come first, so weight
 * decay is one flat AdamW pass over [0, sm_gpt_decay_size) and a second, undecayed one over the
 * rest. Gradients and optimizer moments use the same layout.
 *
 * Threads: nthreads is the budget of every kernel the call runs (<= 0: the library default).
 * All results are bitwise identical for any thread count. Parameters are only read by the
 * forward pass, so any number of inference forwards may run at once on one parameter block;
 * a training state belongs to one caller at a time. */
#ifndef SM_MODEL_H
#define SM_MODEL_H

#include "sm_common.h"
#include "sm_quant.h"

typedef struct sm_gpt_config {
    int64_t vocab_size; /* V */
    int64_t block_size; /* maxT: rows of wpe */
    int64_t n_layer;    /* L */
    int64_t n_head;     /* NH, divides n_embd */
    int64_t n_embd;     /* C */
} sm_gpt_config;

/* Tensor kinds, in block order. The first four repeat per layer and take weight decay; the
 * per-layer kinds after WPE repeat per layer too; the others exist once. Names, shapes, the
 * Hugging Face order and the initialisation of each kind are in sm_gpt_kinds below: that table
 * is the one description of the parameters, read by this file's offsets, by the Python model
 * (smallmind/model/layout.py) and by checkpoints. */
enum {
    SM_GPT_QKVW = 0,     /* attn.c_attn.weight (C, 3C) */
    SM_GPT_ATTPROJW,     /* attn.c_proj.weight (C, C) */
    SM_GPT_FCW,          /* mlp.c_fc.weight (C, 4C) */
    SM_GPT_FCPROJW,      /* mlp.c_proj.weight (4C, C) */
    SM_GPT_WTE,          /* wte.weight (V, C), also the LM head */
    SM_GPT_WPE,          /* wpe.weight (maxT, C) */
    SM_GPT_LN1W,         /* ln_1.weight (C) */
    SM_GPT_LN1B,         /* ln_1.bias (C) */
    SM_GPT_QKVB,         /* attn.c_attn.bias (3C) */
    SM_GPT_ATTPROJB,     /* attn.c_proj.bias (C) */
    SM_GPT_LN2W,         /* ln_2.weight (C) */
    SM_GPT_LN2B,         /* ln_2.bias (C) */
    SM_GPT_FCB,          /* mlp.c_fc.bias (4C) */
    SM_GPT_FCPROJB,      /* mlp.c_proj.bias (C) */
    SM_GPT_LNFW,         /* ln_f.weight (C) */
    SM_GPT_LNFB,         /* ln_f.bias (C) */
    SM_GPT_NUM_KINDS
};

/* The symbols a tensor's axes are sized by (SM_DIM_NONE: the axis does not exist). */
enum { SM_DIM_NONE = 0, SM_DIM_V, SM_DIM_T, SM_DIM_C, SM_DIM_3C, SM_DIM_4C };

/* How a fresh model fills a tensor (GPT-2's initialisation): N(0, 0.02); N(0, 0.02 /
 * sqrt(2 n_layer)) for the projections that write into the residual stream; ones; zeros. */
enum { SM_INIT_NORMAL = 0, SM_INIT_RESIDUAL, SM_INIT_ONES, SM_INIT_ZEROS };

typedef struct sm_gpt_kind_info {
    const char *name;  /* Hugging Face GPT-2 name after "transformer." or "transformer.h.<l>." */
    int rows, cols;    /* SM_DIM_* of the two axes; cols is SM_DIM_NONE for a vector */
    int per_layer;     /* 1: one tensor per layer; 0: one in all */
    int hf_rank;       /* position in Hugging Face's state_dict order: wte, wpe, the layers'
                        * tensors (each layer in turn, in this rank), ln_f */
    int init;          /* SM_INIT_* */
} sm_gpt_kind_info;

/* Indexed by kind. */
extern const sm_gpt_kind_info sm_gpt_kinds[SM_GPT_NUM_KINDS];

/* 1 when the kind has one tensor per layer, 0 when it exists once. */
int sm_gpt_kind_per_layer(int kind);
/* Length of one axis symbol (SM_DIM_*) for cfg: V, maxT, C, 3C, 4C, or 1 for SM_DIM_NONE. */
int64_t sm_gpt_dim(const sm_gpt_config *cfg, int dim);
/* Elements of one tensor of `kind` (no padding), 0 for an invalid kind. */
int64_t sm_gpt_tensor_size(const sm_gpt_config *cfg, int kind);
/* Offset in floats of tensor `kind` of `layer` (layer ignored for global kinds), or -1 for an
 * invalid kind or layer. */
int64_t sm_gpt_tensor_offset(const sm_gpt_config *cfg, int kind, int64_t layer);
/* Length in floats of the whole block (including the padding), and of its decayed prefix. */
int64_t sm_gpt_num_params(const sm_gpt_config *cfg);
int64_t sm_gpt_decay_size(const sm_gpt_config *cfg);
/* SM_OK when the configuration is usable (all sizes >= 1, n_head divides n_embd), else
 * SM_ERR_ARG. The Python layer validates first and names the field. */
int sm_gpt_config_check(const sm_gpt_config *cfg);

/* ---- training state ------------------------------------------------------------------------- */

/* Everything a training step keeps between its forward and backward calls, for one batch shape
 * (B, T): the saved activations of every layer, the loss gradient of the logits and the scratch
 * of both passes, in one block rented from the default MemoryPool. Reused step after step while
 * the shape stays the same; sm_gpt_state_free returns the block. */
typedef struct sm_gpt_state sm_gpt_state;

/* SM_OK, SM_ERR_ARG (bad config, B or T < 1, T > block_size) or SM_ERR_NOMEM. */
int sm_gpt_state_create(sm_gpt_state **out, const sm_gpt_config *cfg, int64_t B, int64_t T);
void sm_gpt_state_free(sm_gpt_state *s);
/* Bytes of the block a state holds, for memory accounting. */
int64_t sm_gpt_state_nbytes(const sm_gpt_state *s);
/* The state's batch shape, and 1 while it holds a forward pass that backward has not used. */
int64_t sm_gpt_state_B(const sm_gpt_state *s);
int64_t sm_gpt_state_T(const sm_gpt_state *s);
int sm_gpt_state_ready(const sm_gpt_state *s);
/* Precision of the state's passes: SM_PRECISION_FLOAT32 (the default) or SM_PRECISION_BF16:
 * every linear layer's matrix products (forward, and both gradients in backward) take bf16
 * inputs with float32 sums (sm_gemm_bf16); weights, activations, attention, LayerNorm, the loss
 * and the optimizer stay float32. Set it before a forward pass (SM_ERR_STATE while the state is
 * ready: a backward must use the precision its forward used). */
enum { SM_PRECISION_FLOAT32 = 0, SM_PRECISION_BF16 = 1 };
int sm_gpt_state_set_precision(sm_gpt_state *s, int precision);
int sm_gpt_state_precision(const sm_gpt_state *s);

/* ---- forward / backward / update ------------------------------------------------------------ */

/* One forward pass over idx (B, T), ids in [0, V), T <= block_size.
 *   logits (B, T, V): written when not NULL.
 *   targets (B, T) or NULL: ids in [0, V), or -1 to ignore a position; *loss (when loss is not
 *     NULL) receives the mean cross-entropy over the n_valid positions that are not ignored
 *     (NaN when there are none), and *n_valid (when not NULL) their count.
 *   state: NULL for inference (activations rented from the default pool and returned before the
 *     call ends). A training state of shape (B, T) makes the pass save what backward needs; with
 *     targets it also computes d(mean loss)/d(logits), so the state becomes ready for backward.
 *   dropout in [0, 1): probability of zeroing each value of the embedding sum, each attention
 *     probability and each value of every block's two branch outputs (the kept ones are scaled
 *     by 1/(1-dropout)). Masks are hashes of (seed, stream, position in the tensor) (sm_hash.h;
 *     streams: 0 embeddings, 1 + 2l and 2 + 2l the attention and MLP outputs of layer l, 2^32 + l
 *     its attention probabilities), the same for any thread count or chunking; backward
 *     recomputes them instead of storing them.
 * Returns SM_OK, SM_ERR_ARG (shape mismatch with the state, bad sizes) or SM_ERR_NOMEM. */
int sm_gpt_forward(float *logits, float *loss, int64_t *n_valid, sm_gpt_state *state,
                   const float *params, const sm_gpt_config *cfg, const int *idx,
                   const int *targets, int64_t B, int64_t T, float dropout, uint64_t seed,
                   int nthreads);

/* grads += loss_scale * d(mean loss)/d(params), from a ready state (the forward's dropout and
 * seed are reused). The state stops being ready. SM_ERR_STATE when it was not ready, else SM_OK
 * or SM_ERR_NOMEM (scratch for a kernel). */
int sm_gpt_backward(float *grads, sm_gpt_state *state, const float *params, float loss_scale,
                    int nthreads);

/* AdamW over the whole block: weight decay on [0, sm_gpt_decay_size), none on the rest. */
void sm_gpt_adamw(float *params, float *m, float *v, const float *grads, const sm_gpt_config *cfg,
                  float lr, float beta1, float beta2, float eps, float weight_decay, int64_t step,
                  int nthreads);

/* out (B, C) <- for each sequence of idx (B, T), the mean over its positions of the final layer
 * norm's output (the hidden states the LM head reads): a fixed-size embedding of a text. */
int sm_gpt_embed(float *out, const float *params, const sm_gpt_config *cfg, const int *idx,
                 int64_t B, int64_t T, int nthreads);

/* ---- incremental inference: KV cache, prefill, decode ---------------------------------------- */

/* The keys and values of every layer for B sequences of up to `capacity` positions (rounded up
 * to a multiple of 64), in sm_attention.h's cache layout, plus each sequence's length. One
 * block rented from the default MemoryPool; a cache belongs to one caller at a time. */
typedef struct sm_gpt_cache sm_gpt_cache;

/* SM_OK, SM_ERR_ARG (bad config, B < 1, capacity < 1 or above block_size) or SM_ERR_NOMEM. */
int sm_gpt_cache_create(sm_gpt_cache **out, const sm_gpt_config *cfg, int64_t B, int64_t capacity);

/* Compact weight matrices of an inference model (sm_quant.h): per layer l, layer[4l + 0..3] are
 * attn.c_attn, attn.c_proj, mlp.c_fc and mlp.c_proj in the rows layout (K, N), as the float32
 * block stores them; wte is the token embedding (V, C) in the dots layout (the LM head reads its
 * rows; the embedding of a token is its row widened). With them, the float32 block's matrices
 * are never read (they may be zeros, never touched): its LayerNorms, biases and wpe are. */
typedef struct sm_gpt_qweights {
    const sm_qmat *layer;
    const sm_qmat *wte;
} sm_gpt_qweights;

/* Every prefill, decode and generation on this cache uses qw's matrices (NULL: the float32
 * block's). The caller keeps qw and its matrices alive as long as the cache uses them.
 * SM_ERR_ARG when a matrix's shape does not fit the cache's configuration. */
int sm_gpt_cache_set_weights(sm_gpt_cache *c, const sm_gpt_qweights *qw);

/* sm_gpt_forward in eval mode (no state, no dropout) with compact matrices: logits (B, T, V)
 * and the loss as sm_gpt_forward gives them. */
int sm_gpt_forward_q(float *logits, float *loss, int64_t *n_valid, const float *params,
                     const sm_gpt_qweights *qw, const sm_gpt_config *cfg, const int *idx,
                     const int *targets, int64_t B, int64_t T, int nthreads);
void sm_gpt_cache_free(sm_gpt_cache *c);
int64_t sm_gpt_cache_nbytes(const sm_gpt_cache *c);
int64_t sm_gpt_cache_B(const sm_gpt_cache *c);
int64_t sm_gpt_cache_capacity(const sm_gpt_cache *c);
/* Length (tokens held) of sequence b. */
int64_t sm_gpt_cache_length(const sm_gpt_cache *c, int64_t b);

/* Run the prompts idx (B, T) (B = the cache's, positions 0 .. T-1; T <= capacity) through the
 * model, store every layer's keys and values in the (emptied) cache and write the logits of each
 * prompt's last position to logits (B, V). SM_ERR_ARG on a shape mismatch. */
int sm_gpt_prefill(float *logits, sm_gpt_cache *c, const float *params, const sm_gpt_config *cfg,
                   const int *idx, int64_t T, int nthreads);

/* The same for sequences b .. b+nb-1 alone (prompts idx (nb, T), T <= capacity): the other
 * sequences keep their contents; logits (nb, V) of each one's last position. Prompts of
 * different lengths share one cache this way (equal lengths in one pass), and a full sequence
 * moves its window by a new prefill. */
int sm_gpt_prefill_seq(float *logits, sm_gpt_cache *c, const float *params,
                       const sm_gpt_config *cfg, int64_t b, int64_t nb, const int *idx, int64_t T,
                       int nthreads);

/* Copy the first n cached positions of sequence sb of src into sequence db of dst (caches of
 * one configuration, n <= src's length, n <= dst's capacity; not a sequence onto itself);
 * dst's sequence then holds those n tokens. */
int sm_gpt_cache_copy(sm_gpt_cache *dst, int64_t db, const sm_gpt_cache *src, int64_t sb,
                      int64_t n);

/* Finish the prefill of sequence b whose cache already holds the keys and values of the
 * prompt's first `pre` tokens (a prefix cache): idx holds the whole prompt (T tokens), pre is
 * a multiple of 64, and more than 4 tokens follow it. Every value - the cached keys and values
 * of positions P .. T-1 and the logits (V) of position T-1 - has the bits a prefill of the
 * whole prompt gives (the rows after the prefix are computed exactly as in that pass, and the
 * first query blocks, whose keys and values are cached, are skipped). SM_ERR_ARG otherwise. */
int sm_gpt_prefill_extend(float *logits, sm_gpt_cache *c, const float *params,
                          const sm_gpt_config *cfg, int64_t b, const int *idx, int64_t pre,
                          int64_t T, int nthreads);

/* One more token per sequence, tokens (B), at position length(b): appends its keys and values
 * and writes the next-token logits (B, V). SM_ERR_STATE when a sequence is full (length ==
 * capacity) or empty (no prefill yet); SM_ERR_ARG on a config mismatch. */
int sm_gpt_decode(float *logits, sm_gpt_cache *c, const float *params, const sm_gpt_config *cfg,
                  const int *tokens, int nthreads);

/* The same for a subset of the sequences: tokens[i] goes to sequence seqs[i] (n distinct
 * sequences, 1 <= n <= B), logits (n, V) in that order; the others are untouched. A row's bits
 * do not depend on which other sequences are decoded with it (a server's batch changes every
 * step). SM_ERR_ARG for a sequence out of range or given twice. */
int sm_gpt_decode_seqs(float *logits, sm_gpt_cache *c, const float *params,
                       const sm_gpt_config *cfg, const int *seqs, int64_t n, const int *tokens,
                       int nthreads);

/* The same with the scratch given by the caller: sm_gpt_decode_scratch_floats(cfg, n,
 * nthreads) floats, 64-byte aligned (a loop decoding step after step rents it once). */
int64_t sm_gpt_decode_scratch_floats(const sm_gpt_config *cfg, int64_t n, int nthreads);
int sm_gpt_decode_seqs_scratch(float *logits, sm_gpt_cache *c, const float *params,
                               const sm_gpt_config *cfg, const int *seqs, int64_t n,
                               const int *tokens, int nthreads, float *scratch);

/* The dropout used above, exposed for tests: out = inp * keep(i) / (1 - p), where keep(i) is the
 * hash test for element i of stream `stream`. out may equal inp. */
void sm_dropout_forward(float *out, const float *inp, int64_t n, float p, uint64_t seed,
                        uint64_t stream, int nthreads);

#endif /* SM_MODEL_H */
