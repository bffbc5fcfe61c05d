/* sm_model.c - GPT-2 forward, backward and AdamW update over one parameter block, each one C
 * call built from the kernels of sm_gemm / sm_ops / sm_attention (see sm_model.h for the model
 * and the block layout).
 *
 * Memory. A training forward saves, per layer, only what backward cannot cheaply recompute: the
 * layer input x, qkv, the attention output and its log-sum-exp, the mid-block residual, the MLP
 * pre-activation and the two layernorms' mean/rstd. Backward recomputes the layernorm outputs
 * and the GELU (elementwise work, small next to the matrix products it feeds), so a layer keeps
 * 10 (B,T,C)-sized arrays instead of the ~16 an autograd framework holds. Inference rents ten
 * per-call buffers shared by all layers and returns them before it ends. */
#include "sm_model.h"

#include <math.h>
#include <string.h>

#include "sm_attention.h"
#include "sm_gemm.h"
#include "sm_hash.h"
#include "sm_ops.h"
#include "sm_pool.h"
#include "sm_runtime.h"

#define LN_EPS 1e-5f

/* ---- parameter layout -------------------------------------------------------------------- */

/* Tensors and scratch slices start on 64-byte boundaries: lengths round up to 16 floats. */
static int64_t round16(int64_t n) { return sm_round_up(n, 16); }

/* The parameter table (see sm_model.h). Block order is the enum's; hf_rank gives the order
 * Hugging Face lists the tensors in. */
const sm_gpt_kind_info sm_gpt_kinds[SM_GPT_NUM_KINDS] = {
    [SM_GPT_QKVW]     = {"attn.c_attn.weight", SM_DIM_C,  SM_DIM_3C,   1,  4, SM_INIT_NORMAL},
    [SM_GPT_ATTPROJW] = {"attn.c_proj.weight", SM_DIM_C,  SM_DIM_C,    1,  6, SM_INIT_RESIDUAL},
    [SM_GPT_FCW]      = {"mlp.c_fc.weight",    SM_DIM_C,  SM_DIM_4C,   1, 10, SM_INIT_NORMAL},
    [SM_GPT_FCPROJW]  = {"mlp.c_proj.weight",  SM_DIM_4C, SM_DIM_C,    1, 12, SM_INIT_RESIDUAL},
    [SM_GPT_WTE]      = {"wte.weight",         SM_DIM_V,  SM_DIM_C,    0,  0, SM_INIT_NORMAL},
    [SM_GPT_WPE]      = {"wpe.weight",         SM_DIM_T,  SM_DIM_C,    0,  1, SM_INIT_NORMAL},
    [SM_GPT_LN1W]     = {"ln_1.weight",        SM_DIM_C,  SM_DIM_NONE, 1,  2, SM_INIT_ONES},
    [SM_GPT_LN1B]     = {"ln_1.bias",          SM_DIM_C,  SM_DIM_NONE, 1,  3, SM_INIT_ZEROS},
    [SM_GPT_QKVB]     = {"attn.c_attn.bias",   SM_DIM_3C, SM_DIM_NONE, 1,  5, SM_INIT_ZEROS},
    [SM_GPT_ATTPROJB] = {"attn.c_proj.bias",   SM_DIM_C,  SM_DIM_NONE, 1,  7, SM_INIT_ZEROS},
    [SM_GPT_LN2W]     = {"ln_2.weight",        SM_DIM_C,  SM_DIM_NONE, 1,  8, SM_INIT_ONES},
    [SM_GPT_LN2B]     = {"ln_2.bias",          SM_DIM_C,  SM_DIM_NONE, 1,  9, SM_INIT_ZEROS},
    [SM_GPT_FCB]      = {"mlp.c_fc.bias",      SM_DIM_4C, SM_DIM_NONE, 1, 11, SM_INIT_ZEROS},
    [SM_GPT_FCPROJB]  = {"mlp.c_proj.bias",    SM_DIM_C,  SM_DIM_NONE, 1, 13, SM_INIT_ZEROS},
    [SM_GPT_LNFW]     = {"ln_f.weight",        SM_DIM_C,  SM_DIM_NONE, 0, 14, SM_INIT_ONES},
    [SM_GPT_LNFB]     = {"ln_f.bias",          SM_DIM_C,  SM_DIM_NONE, 0, 15, SM_INIT_ZEROS},
};

int sm_gpt_kind_per_layer(int kind) {
    return kind >= 0 && kind < SM_GPT_NUM_KINDS && sm_gpt_kinds[kind].per_layer;
}

int64_t sm_gpt_dim(const sm_gpt_config *cfg, int dim) {
    switch (dim) {
    case SM_DIM_V: return cfg->vocab_size;
    case SM_DIM_T: return cfg->block_size;
    case SM_DIM_C: return cfg->n_embd;
    case SM_DIM_3C: return 3 * cfg->n_embd;
    case SM_DIM_4C: return 4 * cfg->n_embd;
    default: return 1;
    }
}

int64_t sm_gpt_tensor_size(const sm_gpt_config *cfg, int kind) {
    if (kind < 0 || kind >= SM_GPT_NUM_KINDS) return 0;
    return sm_gpt_dim(cfg, sm_gpt_kinds[kind].rows) * sm_gpt_dim(cfg, sm_gpt_kinds[kind].cols);
}

/* Floats a kind occupies in the block: its tensor (or one per layer), each padded to 16. */
static int64_t kind_span(const sm_gpt_config *cfg, int kind) {
    int64_t one = round16(sm_gpt_tensor_size(cfg, kind));
    return sm_gpt_kind_per_layer(kind) ? one * cfg->n_layer : one;
}

int64_t sm_gpt_tensor_offset(const sm_gpt_config *cfg, int kind, int64_t layer) {
    if (kind < 0 || kind >= SM_GPT_NUM_KINDS) return -1;
    int per_layer = sm_gpt_kind_per_layer(kind);
    if (per_layer && (layer < 0 || layer >= cfg->n_layer)) return -1;
    int64_t off = 0;
    for (int k = 0; k < kind; k++) off += kind_span(cfg, k);
    if (per_layer) off += layer * round16(sm_gpt_tensor_size(cfg, kind));
    return off;
}

int64_t sm_gpt_num_params(const sm_gpt_config *cfg) {
    int64_t n = 0;
    for (int k = 0; k < SM_GPT_NUM_KINDS; k++) n += kind_span(cfg, k);
    return n;
}

int64_t sm_gpt_decay_size(const sm_gpt_config *cfg) {
    return sm_gpt_tensor_offset(cfg, SM_GPT_WTE, 0);
}

int sm_gpt_config_check(const sm_gpt_config *cfg) {
    if (!cfg || cfg->vocab_size < 1 || cfg->block_size < 1 || cfg->n_layer < 1 ||
        cfg->n_head < 1 || cfg->n_embd < 1 || cfg->n_embd % cfg->n_head != 0)
        return SM_ERR_ARG;
    /* keep every tensor and activation offset far inside int64 */
    if (cfg->vocab_size > ((int64_t)1 << 31) || cfg->block_size > ((int64_t)1 << 24) ||
        cfg->n_layer > 4096 || cfg->n_embd > ((int64_t)1 << 20))
        return SM_ERR_ARG;
    return SM_OK;
}

/* Pointer to tensor `kind` of `layer` in a block laid out for cfg. */
#define P(base, kind, layer) ((base) + sm_gpt_tensor_offset(cfg, (kind), (layer)))

/* ---- dropout -------------------------------------------------------------------------------- */

/* Activation dropout with the counter-based hash mask of sm_hash.h. */
typedef struct {
    float *out;
    const float *inp;
    sm_drop_mask mask;
    uint64_t offset; /* element i of the call is element offset + i of the tensor */
} drop_ctx;

static void dropout_range(const drop_ctx *c, int64_t i0, int64_t i1) {
    sm_drop_apply(c->out + i0, c->inp + i0, i1 - i0, &c->mask, c->offset + (uint64_t)i0, 1);
}

/* Dropout of elements offset .. offset+n-1 of a tensor: a batch processed in chunks gets the
 * same mask as in one piece. */
static void dropout_at(float *out, const float *inp, int64_t n, float p, uint64_t seed,
                       uint64_t stream, int64_t offset, int nthreads) {
    /* out, inp (n) */
    if (n <= 0) return;
    drop_ctx c;
    c.out = out;
    c.inp = inp;
    c.offset = (uint64_t)offset;
    c.mask = sm_drop_mask_make(p, seed, stream);
    /* counted as one streaming operation per element (the hash is register arithmetic that
     * overlaps the loads): a team from 64k elements, ranges of 1024 */
    int nt = sm_team_size(nthreads, sm_ceil_div(n, 1024), (double)n);
    if (nt <= 1) {
        dropout_range(&c, 0, n);
        return;
    }
    SM_PARALLEL(nt)
    {
        int64_t b, e;
        sm_split_range(n, 1024, SM_THREAD_COUNT(), SM_THREAD_ID(), &b, &e);
        if (e > b) dropout_range(&c, b, e);
    }
}

void sm_dropout_forward(float *out, const float *inp, int64_t n, float p, uint64_t seed,
                        uint64_t stream, int nthreads) {
    dropout_at(out, inp, n, p, seed, stream, 0, nthreads);
}

/* Dropout streams: 0 for the embedding sum, then two per layer. */
#define STREAM_EMB 0
#define STREAM_ATT(l) (1 + 2 * (uint64_t)(l))
#define STREAM_MLP(l) (2 + 2 * (uint64_t)(l))
/* attention probabilities of layer l (sm_attention.h's mask, indexed by sequence, head,
 * query and key) */
#define STREAM_PROB(l) (((uint64_t)1 << 32) + (uint64_t)(l))

/* ---- batch chunks --------------------------------------------------------------------------- */

/* A pass runs the whole model on a chunk of sequences at a time (forward: all layers for chunk
 * 0, then chunk 1, ...; backward likewise), so the per-layer scratch and each product's output
 * are still in cache when the next kernel reads them; at one pass over a 4096-token batch the
 * layer's arrays stream through DRAM between every two kernels. A chunk holds about
 * CHUNK_TOKENS tokens, more for wide models, so the weight-gradient products (which re-read
 * their (C, 4C) outputs once per chunk) stay long in K. The chunk size depends only on the
 * shapes, never on the thread count, so results stay bitwise thread-independent. */
#define CHUNK_TOKENS 1024

static int64_t chunk_seqs(int64_t B, int64_t T, int64_t C) {
    int64_t tokens = CHUNK_TOKENS > 8 * C ? CHUNK_TOKENS : 8 * C;
    int64_t bc = tokens / T;
    if (bc < 1) bc = 1;
    return bc < B ? bc : B;
}

/* ---- buffers -------------------------------------------------------------------------------- */

/* A bump allocator over one rented block: a first pass with base == NULL only measures. Every
 * buffer starts on a 64-byte boundary. */
typedef struct {
    char *base;
    int64_t used;
} carver;

static void *carve(carver *cv, int64_t bytes) {
    void *p = cv->base ? cv->base + cv->used : NULL;
    cv->used += (bytes + 63) & ~(int64_t)63;
    return p;
}
#define CARVE_F(cv, n) ((float *)carve((cv), (int64_t)(n) * (int64_t)sizeof(float)))

struct sm_gpt_state {
    sm_gpt_config cfg;
    int64_t B, T, Bc; /* batch shape, sequences per chunk */
    int ready;
    int precision;    /* SM_PRECISION_*: which GEMM the linear layers use */
    float dropout;
    uint64_t seed;
    int64_t nbytes;
    void *block;
    /* saved by the forward pass for the whole batch: layer l's slice of each array (x has
     * L+1 of them), each slice laid out (B, T, ...) */
    int *idx;                           /* (B,T) */
    float *x;                           /* (L+1, B,T,C): input of layer l; x[L] feeds ln_f */
    float *qkv;                         /* (L, B,T,3C) */
    float *atty;                        /* (L, B,T,C) */
    float *lse;                         /* (L, B,NH,T) */
    float *res2;                        /* (L, B,T,C): x + attention branch */
    float *fch;                         /* (L, B,T,4C): MLP pre-activation */
    float *mean1, *rstd1, *mean2, *rstd2; /* (L, B,T) */
    float *meanf, *rstdf;               /* (B,T) */
    float *dlogits;                     /* (B,T,V): d(mean loss)/d(logits) */
    float *logits;                      /* (B,T,V) used when the caller wants no logits */
    float *losses, *dloss;              /* (B,T) */
    /* scratch of both passes, for one chunk of Bc sequences (Tc = Bc*T rows) */
    float *ln;                          /* (Tc,C) a layernorm output */
    float *br;                          /* (Tc,C) a branch output / its gradient */
    float *g;                           /* (Tc,4C) GELU output / d fch */
    float *dg;                          /* (Tc,4C) d GELU output */
    float *dres;                        /* (Tc,C) gradient of the residual stream */
    float *dln;                         /* (Tc,C) gradient of a layernorm output */
    float *datty;                       /* (Tc,C) */
    float *dqkv;                        /* (Tc,3C) */
    float *ln_scratch, *bias_scratch;
};

static void layout_state(sm_gpt_state *s, carver *cv) {
    const int64_t L = s->cfg.n_layer, C = s->cfg.n_embd, V = s->cfg.vocab_size;
    const int64_t NH = s->cfg.n_head, BT = s->B * s->T, Tc = s->Bc * s->T;
    s->idx = (int *)carve(cv, BT * (int64_t)sizeof(int));
    s->x = CARVE_F(cv, (L + 1) * BT * C);
    s->qkv = CARVE_F(cv, L * BT * 3 * C);
    s->atty = CARVE_F(cv, L * BT * C);
    s->lse = CARVE_F(cv, L * s->B * NH * s->T);
    s->res2 = CARVE_F(cv, L * BT * C);
    s->fch = CARVE_F(cv, L * BT * 4 * C);
    s->mean1 = CARVE_F(cv, L * BT);
    s->rstd1 = CARVE_F(cv, L * BT);
    s->mean2 = CARVE_F(cv, L * BT);
    s->rstd2 = CARVE_F(cv, L * BT);
    s->meanf = CARVE_F(cv, BT);
    s->rstdf = CARVE_F(cv, BT);
    s->dlogits = CARVE_F(cv, BT * V);
    s->logits = CARVE_F(cv, BT * V);
    s->losses = CARVE_F(cv, BT);
    s->dloss = CARVE_F(cv, BT);
    s->ln = CARVE_F(cv, Tc * C);
    s->br = CARVE_F(cv, Tc * C);
    s->g = CARVE_F(cv, Tc * 4 * C);
    s->dg = CARVE_F(cv, Tc * 4 * C);
    s->dres = CARVE_F(cv, Tc * C);
    s->dln = CARVE_F(cv, Tc * C);
    s->datty = CARVE_F(cv, Tc * C);
    s->dqkv = CARVE_F(cv, Tc * 3 * C);
    s->ln_scratch = CARVE_F(cv, sm_layernorm_backward_scratch(Tc, C));
    int64_t bs = sm_bias_backward_scratch(Tc, 4 * C);
    if (sm_bias_backward_scratch(Tc, 3 * C) > bs) bs = sm_bias_backward_scratch(Tc, 3 * C);
    s->bias_scratch = CARVE_F(cv, bs);
}

int sm_gpt_state_create(sm_gpt_state **out, const sm_gpt_config *cfg, int64_t B, int64_t T) {
    *out = NULL;
    if (sm_gpt_config_check(cfg) != SM_OK || B < 1 || T < 1 || T > cfg->block_size ||
        B > ((int64_t)1 << 30) / T)
        return SM_ERR_ARG;
    sm_gpt_state *s = (sm_gpt_state *)sm_pool_rent(sm_pool_default(), sizeof(sm_gpt_state));
    if (!s) return SM_ERR_NOMEM;
    memset(s, 0, sizeof(*s));
    s->cfg = *cfg;
    s->B = B;
    s->T = T;
    s->Bc = chunk_seqs(B, T, cfg->n_embd);
    carver cv = {NULL, 0};
    layout_state(s, &cv);
    s->block = sm_pool_rent(sm_pool_default(), (size_t)cv.used);
    if (!s->block) {
        sm_pool_return(s);
        return SM_ERR_NOMEM;
    }
    s->nbytes = cv.used;
    cv.base = (char *)s->block;
    cv.used = 0;
    layout_state(s, &cv);
    *out = s;
    return SM_OK;
}

void sm_gpt_state_free(sm_gpt_state *s) {
    if (!s) return;
    sm_pool_return(s->block);
    sm_pool_return(s);
}

int64_t sm_gpt_state_nbytes(const sm_gpt_state *s) { return s ? s->nbytes : 0; }
int64_t sm_gpt_state_B(const sm_gpt_state *s) { return s->B; }
int64_t sm_gpt_state_T(const sm_gpt_state *s) { return s->T; }
int sm_gpt_state_ready(const sm_gpt_state *s) { return s->ready; }
int sm_gpt_state_precision(const sm_gpt_state *s) { return s->precision; }

int sm_gpt_state_set_precision(sm_gpt_state *s, int precision) {
    if (!s || (precision != SM_PRECISION_FLOAT32 && precision != SM_PRECISION_BF16)) return SM_ERR_ARG;
    if (s->ready && precision != s->precision) return SM_ERR_STATE;
    s->precision = precision;
    return SM_OK;
}

/* The matrix product a linear layer uses at this precision. */
typedef int (*gemm_fn)(int, int, int64_t, int64_t, int64_t, float, const float *, int64_t,
                       const float *, int64_t, float, float *, int64_t, int);
static gemm_fn linear_gemm(int precision) {
    return precision == SM_PRECISION_BF16 ? sm_gemm_bf16 : sm_sgemm;
}
/* ... and the same product with the layer's epilogue fused into it (bias, residual, GELU). */
typedef int (*gemm_epi_fn)(int, int, int64_t, int64_t, int64_t, const float *, int64_t,
                           const float *, int64_t, float *, int64_t, const sm_gemm_epilogue *, int);
static gemm_epi_fn linear_gemm_epi(gemm_fn gemm) {
    return gemm == sm_gemm_bf16 ? sm_gemm_bf16_epi : sm_sgemm_epi;
}

/* ---- KV cache -------------------------------------------------------------------------------- */

struct sm_gpt_cache {
    sm_gpt_config cfg;
    int64_t B, capacity, Tmax; /* Tmax: capacity rounded up to the attention block */
    int64_t nbytes;
    void *block;
    int *len;                  /* (B) tokens held per sequence */
    int *pos;                  /* (B) decode scratch: the position written */
    float *k, *v;              /* (L, B, NH, Tmax/64, hs, 64) and (L, B, NH, Tmax, hs) */
    /* decode scratch, one row per sequence */
    float *x, *x2, *ln, *qkv, *att, *br, *fch, *g; /* (B, C) / (B, 3C) / (B, 4C) */
    const sm_gpt_qweights *qw; /* compact matrices, or NULL (sm_gpt_cache_set_weights) */
};

/* The compact matrix of a weight kind (QKVW, ATTPROJW, FCW, FCPROJW) of layer l. */
static const sm_qmat *qmat(const sm_gpt_qweights *qw, int kind, int64_t l) {
    return &qw->layer[4 * l + (kind - SM_GPT_QKVW)];
}

int sm_gpt_cache_set_weights(sm_gpt_cache *c, const sm_gpt_qweights *qw) {
    if (!c) return SM_ERR_ARG;
    if (qw) {
        const int64_t C = c->cfg.n_embd, V = c->cfg.vocab_size;
        const int kinds[4] = {SM_GPT_QKVW, SM_GPT_ATTPROJW, SM_GPT_FCW, SM_GPT_FCPROJW};
        const int64_t Ks[4] = {C, C, C, 4 * C}, Ns[4] = {3 * C, C, 4 * C, C};
        if (!qw->layer || !qw->wte || qw->wte->K != C || qw->wte->N != V) return SM_ERR_ARG;
        for (int64_t l = 0; l < c->cfg.n_layer; l++)
            for (int i = 0; i < 4; i++) {
                const sm_qmat *q = qmat(qw, kinds[i], l);
                if (q->K != Ks[i] || q->N != Ns[i] || !q->codes) return SM_ERR_ARG;
            }
    }
    c->qw = qw;
    return SM_OK;
}

static int64_t cache_layer_floats(const sm_gpt_cache *c) {
    return c->B * c->cfg.n_head * c->Tmax * (c->cfg.n_embd / c->cfg.n_head);
}

static void layout_cache(sm_gpt_cache *c, carver *cv) {
    const int64_t B = c->B, C = c->cfg.n_embd, L = c->cfg.n_layer;
    c->len = (int *)carve(cv, B * (int64_t)sizeof(int));
    c->pos = (int *)carve(cv, B * (int64_t)sizeof(int));
    c->k = CARVE_F(cv, L * cache_layer_floats(c));
    c->v = CARVE_F(cv, L * cache_layer_floats(c));
    c->x = CARVE_F(cv, B * C);
    c->x2 = CARVE_F(cv, B * C);
    c->ln = CARVE_F(cv, B * C);
    c->qkv = CARVE_F(cv, B * 3 * C);
    c->att = CARVE_F(cv, B * C);
    c->br = CARVE_F(cv, B * C);
    c->fch = CARVE_F(cv, B * 4 * C);
    c->g = CARVE_F(cv, B * 4 * C);
}

int sm_gpt_cache_create(sm_gpt_cache **out, const sm_gpt_config *cfg, int64_t B, int64_t capacity) {
    *out = NULL;
    if (sm_gpt_config_check(cfg) != SM_OK || B < 1 || B > ((int64_t)1 << 24) || capacity < 1 ||
        capacity > cfg->block_size)
        return SM_ERR_ARG;
    sm_gpt_cache *c = (sm_gpt_cache *)sm_pool_rent(sm_pool_default(), sizeof(sm_gpt_cache));
    if (!c) return SM_ERR_NOMEM;
    memset(c, 0, sizeof(*c));
    c->cfg = *cfg;
    c->B = B;
    c->capacity = capacity;
    c->Tmax = (capacity + SM_ATT_BLOCK - 1) / SM_ATT_BLOCK * SM_ATT_BLOCK;
    carver cv = {NULL, 0};
    layout_cache(c, &cv);
    c->block = sm_pool_rent(sm_pool_default(), (size_t)cv.used);
    if (!c->block) {
        sm_pool_return(c);
        return SM_ERR_NOMEM;
    }
    c->nbytes = cv.used;
    cv.base = (char *)c->block;
    cv.used = 0;
    layout_cache(c, &cv);
    memset(c->len, 0, (size_t)B * sizeof(int));
    *out = c;
    return SM_OK;
}

void sm_gpt_cache_free(sm_gpt_cache *c) {
    if (!c) return;
    sm_pool_return(c->block);
    sm_pool_return(c);
}

int64_t sm_gpt_cache_nbytes(const sm_gpt_cache *c) { return c ? c->nbytes : 0; }
int64_t sm_gpt_cache_B(const sm_gpt_cache *c) { return c->B; }
int64_t sm_gpt_cache_capacity(const sm_gpt_cache *c) { return c->capacity; }
int64_t sm_gpt_cache_length(const sm_gpt_cache *c, int64_t b) {
    return (b >= 0 && b < c->B) ? c->len[b] : -1;
}

/* ---- forward -------------------------------------------------------------------------------- */

/* Where one forward pass writes. Saved arrays are given for the whole batch with per-layer
 * strides (0: every layer reuses one buffer, as inference does) and indexed by the chunk's
 * first sequence; scratch (ln, br, g, and inference's ping-pong residual x0/x1) holds one
 * chunk. */
typedef struct {
    float *x0, *x1;            /* inference: the two residual buffers (one chunk) */
    float *x;                  /* training: (L+1) slices of the whole batch */
    float *qkv, *atty, *lse, *res2, *fch, *mean1, *rstd1, *mean2, *rstd2, *meanf, *rstdf;
    int64_t s_c, s_3c, s_4c, s_lse, s_row; /* per-layer strides in floats (0 = shared) */
    int chunked_saves;         /* 1: saved arrays span the batch (offset by chunk); 0: a chunk */
    float *ln, *br, *g, *logits;
    sm_gpt_cache *cache;       /* prefill: every layer's keys and values are stored here */
    int64_t cache_seq0;        /* ... from this sequence of the cache on */
    int last_only;             /* logits (B, V) of each sequence's last position only */
    float *pooled;             /* if set: (B, C) mean over positions of ln_f's output */
    gemm_fn gemm;              /* the linear layers' product (sm_sgemm unless bf16 training) */
    const sm_gpt_qweights *qw; /* compact matrices (inference), or NULL */
    float *wbuf;               /* with qw: one matrix widened to float32 (4 C x C floats) */
} fwd_bufs;

/* The float32 matrix of a weight kind for a product: the block's, or the compact one widened
 * into wbuf (used by the product right after, before the next call overwrites it). */
static const float *wmat(const sm_gpt_qweights *qw, float *wbuf, const float *params,
                         const sm_gpt_config *cfg, int kind, int64_t l, int nt) {
    if (!qw) return P(params, kind, l);
    const sm_qmat *q = qmat(qw, kind, l);
    sm_dequantize_rows(q, 0, q->K, wbuf, nt);
    return wbuf;
}

/* x[i] = wte[idx[i]] + wpe[pos0 + i % T] for n rows (T positions per sequence), the embedding
 * rows widened from the compact wte. */
static void embed_q(float *x, const int *idx, int64_t n, int64_t T, int64_t pos0,
                    const sm_gpt_qweights *qw, const float *wpe, int64_t C) {
    for (int64_t i = 0; i < n; i++) {
        sm_qmat_row(qw->wte, idx[i], x + i * C);
        sm_residual_forward(x + i * C, x + i * C, wpe + (pos0 + i % T) * C, C, 1);
    }
}

/* logits (m, V) of rows x (row stride ldx) against the compact wte, vocabulary split over nt
 * threads (each output computed whole by one thread: the bits do not depend on nt). */
static void head_q(float *logits, int64_t ldl, const float *x, int64_t ldx, int64_t m,
                   const sm_qmat *wte, int nt) {
    SM_PARALLEL(nt) {
        int64_t v0, v1;
        sm_split_range(wte->N, 64, SM_THREAD_COUNT(), SM_THREAD_ID(), &v0, &v1);
        if (v1 > v0) sm_qgemv_dots(wte, m, x, ldx, v0, v1, logits, ldl);
    }
}

#define RET_IF(rc)                                                                                \
    do {                                                                                          \
        int rc_ = (rc);                                                                           \
        if (rc_ != SM_OK) return rc_;                                                             \
    } while (0)

/* The forward pass of sequences b0 .. b0+bc-1 of the batch (idx points at the batch). */
static int gpt_forward_chunk(const fwd_bufs *f, const float *params, const sm_gpt_config *cfg,
                             const int *idx, int64_t b0, int64_t bc, int64_t T, float dropout,
                             uint64_t seed, int nt) {
    const int64_t L = cfg->n_layer, C = cfg->n_embd, NH = cfg->n_head, V = cfg->vocab_size;
    const int64_t N = bc * T;                    /* rows of this chunk */
    const int64_t r0 = f->chunked_saves ? b0 * T : 0; /* its first row in the saved arrays */
    const int drop = dropout > 0.0f;
    const int64_t e0 = b0 * T * C;               /* its first element in a (B,T,C) tensor */
    float *x = f->x ? f->x + r0 * C : f->x0;
    const gemm_fn gemm = f->gemm ? f->gemm : sm_sgemm;
    const gemm_epi_fn gemm_epi = linear_gemm_epi(gemm);

    if (f->qw)
        embed_q(x, idx + b0 * T, N, T, 0, f->qw, P(params, SM_GPT_WPE, 0), C);
    else
        sm_encoder_forward(x, idx + b0 * T, P(params, SM_GPT_WTE, 0), P(params, SM_GPT_WPE, 0), bc,
                           T, C, V, nt);
    if (drop) dropout_at(x, x, N * C, dropout, seed, STREAM_EMB, e0, nt);

    for (int64_t l = 0; l < L; l++) {
        float *xout = f->x ? f->x + (l + 1) * f->s_c + r0 * C : (l % 2 ? f->x0 : f->x1);
        float *qkv = f->qkv + l * f->s_3c + r0 * 3 * C, *atty = f->atty + l * f->s_c + r0 * C;
        float *lse = f->lse + l * f->s_lse + (f->chunked_saves ? b0 * NH * T : 0);
        float *res2 = f->res2 + l * f->s_c + r0 * C;
        float *fch = f->fch + l * f->s_4c + r0 * 4 * C;
        float *mean1 = f->mean1 ? f->mean1 + l * f->s_row + r0 : NULL;
        float *rstd1 = f->rstd1 ? f->rstd1 + l * f->s_row + r0 : NULL;
        float *mean2 = f->mean2 ? f->mean2 + l * f->s_row + r0 : NULL;
        float *rstd2 = f->rstd2 ? f->rstd2 + l * f->s_row + r0 : NULL;

        /* attention branch: res2 = x + drop(c_proj(attn(c_attn(ln_1(x))))) */
        sm_layernorm_forward(f->ln, mean1, rstd1, x, P(params, SM_GPT_LN1W, l),
                             P(params, SM_GPT_LN1B, l), N, C, LN_EPS, nt);
        /* Each product adds its bias (and, without dropout, the residual; after c_fc, GELU)
         * tile by tile while the tile is in cache: see sm_gemm_epilogue. */
        const sm_gemm_epilogue qkv_epi = {P(params, SM_GPT_QKVB, l), NULL, 0, NULL, 0};
        RET_IF(gemm_epi(0, 0, N, 3 * C, C, f->ln, C, wmat(f->qw, f->wbuf, params, cfg, SM_GPT_QKVW, l, nt), 3 * C, qkv, 3 * C,
                        &qkv_epi, nt));
        if (f->cache) { /* prefill: keep this chunk's keys and values */
            const sm_gpt_cache *kc = f->cache;
            const int64_t per_seq = NH * kc->Tmax * (C / NH), lay = cache_layer_floats(kc);
            const int64_t at = (f->cache_seq0 + b0) * per_seq;
            sm_kv_cache_prefill(kc->k + l * lay + at, kc->v + l * lay + at, qkv,
                                0, bc, T, NH, kc->Tmax, C / NH, nt);
        }
        sm_att_dropout ad = {dropout, seed, STREAM_PROB(l), b0};
        RET_IF(sm_attention_forward_ex(atty, lse, qkv, bc, T, C, NH, drop ? &ad : NULL, nt));
        if (drop) {
            const sm_gemm_epilogue e = {P(params, SM_GPT_ATTPROJB, l), NULL, 0, NULL, 0};
            RET_IF(gemm_epi(0, 0, N, C, C, atty, C, wmat(f->qw, f->wbuf, params, cfg, SM_GPT_ATTPROJW, l, nt), C, f->br, C,
                            &e, nt));
            dropout_at(f->br, f->br, N * C, dropout, seed, STREAM_ATT(l), e0, nt);
            sm_residual_forward(res2, x, f->br, N * C, nt);
        } else {
            const sm_gemm_epilogue e = {P(params, SM_GPT_ATTPROJB, l), x, C, NULL, 0};
            RET_IF(gemm_epi(0, 0, N, C, C, atty, C, wmat(f->qw, f->wbuf, params, cfg, SM_GPT_ATTPROJW, l, nt), C, res2, C,
                            &e, nt));
        }

        /* MLP branch: xout = res2 + drop(c_proj(gelu(c_fc(ln_2(res2))))) */
        sm_layernorm_forward(f->ln, mean2, rstd2, res2, P(params, SM_GPT_LN2W, l),
                             P(params, SM_GPT_LN2B, l), N, C, LN_EPS, nt);
        const sm_gemm_epilogue fc_epi = {P(params, SM_GPT_FCB, l), NULL, 0, f->g, 4 * C};
        RET_IF(gemm_epi(0, 0, N, 4 * C, C, f->ln, C, wmat(f->qw, f->wbuf, params, cfg, SM_GPT_FCW, l, nt), 4 * C, fch, 4 * C,
                        &fc_epi, nt));
        if (drop) {
            const sm_gemm_epilogue e = {P(params, SM_GPT_FCPROJB, l), NULL, 0, NULL, 0};
            RET_IF(gemm_epi(0, 0, N, C, 4 * C, f->g, 4 * C, wmat(f->qw, f->wbuf, params, cfg, SM_GPT_FCPROJW, l, nt), C, f->br,
                            C, &e, nt));
            dropout_at(f->br, f->br, N * C, dropout, seed, STREAM_MLP(l), e0, nt);
            sm_residual_forward(xout, res2, f->br, N * C, nt);
        } else {
            const sm_gemm_epilogue e = {P(params, SM_GPT_FCPROJB, l), res2, C, NULL, 0};
            RET_IF(gemm_epi(0, 0, N, C, 4 * C, f->g, 4 * C, wmat(f->qw, f->wbuf, params, cfg, SM_GPT_FCPROJW, l, nt), C, xout,
                            C, &e, nt));
        }
        x = xout;
    }

    sm_layernorm_forward(f->ln, f->meanf ? f->meanf + r0 : NULL, f->rstdf ? f->rstdf + r0 : NULL,
                         x, P(params, SM_GPT_LNFW, 0), P(params, SM_GPT_LNFB, 0), N, C, LN_EPS,
                         nt);
    if (f->pooled) /* mean-pooled final hidden states (the ModelEmbedder's vectors) */
        for (int64_t b = 0; b < bc; b++) {
            float *o = f->pooled + (b0 + b) * C;
            for (int64_t c = 0; c < C; c++) o[c] = 0.0f;
            for (int64_t t = 0; t < T; t++) sm_residual_forward(o, o, f->ln + (b * T + t) * C, C, 1);
            for (int64_t c = 0; c < C; c++) o[c] /= (float)T;
        }
    if (f->logits && f->qw && f->last_only) {
        head_q(f->logits + b0 * V, V, f->ln + (T - 1) * C, T * C, bc, f->qw->wte, nt);
    } else if (f->logits && f->qw) { /* every position: the token embedding widened once */
        float *w = (float *)sm_pool_rent(sm_pool_default(), (size_t)(V * C) * sizeof(float));
        if (!w) return SM_ERR_NOMEM;
        for (int64_t v = 0; v < V; v++) sm_qmat_row(f->qw->wte, v, w + v * C);
        int rc = gemm(0, 1, N, V, C, 1.0f, f->ln, C, w, C, 0.0f, f->logits + b0 * T * V, V, nt);
        sm_pool_return(w);
        RET_IF(rc);
    } else if (f->logits && f->last_only) /* each sequence's last row (rows T apart), in groups of 4:
                                    * the matrix-vector path, so a sequence's logits have the
                                    * same bits whatever else is in the batch */
        for (int64_t r = 0; r < bc; r += 4)
            RET_IF(sm_sgemm(0, 1, bc - r < 4 ? bc - r : 4, V, C, 1.0f, f->ln + (r * T + T - 1) * C,
                            T * C, P(params, SM_GPT_WTE, 0), C, 0.0f, f->logits + (b0 + r) * V, V,
                            nt));
    else if (f->logits) /* LM head tied to wte: logits = ln_f(x) wte^T (logits span the batch) */
        RET_IF(gemm(0, 1, N, V, C, 1.0f, f->ln, C, P(params, SM_GPT_WTE, 0), C, 0.0f,
                    f->logits + b0 * T * V, V, nt));
    return SM_OK;
}

static int64_t count_valid(const int *targets, int64_t n, int64_t V) {
    int64_t k = 0;
    for (int64_t i = 0; i < n; i++) k += targets[i] >= 0 && targets[i] < V;
    return k;
}

/* Mean of the per-position losses, summed in double in position order (thread-independent). */
static float mean_loss(const float *losses, int64_t n, int64_t n_valid) {
    double s = 0.0;
    for (int64_t i = 0; i < n; i++) s += losses[i];
    return n_valid > 0 ? (float)(s / (double)n_valid) : NAN;
}

static int forward_inference(float *logits, float *loss, int64_t *n_valid, const float *params,
                             const sm_gpt_config *cfg, const int *idx, const int *targets,
                             int64_t B, int64_t T, float dropout, uint64_t seed,
                             sm_gpt_cache *cache, int64_t cache_seq0, float *pooled,
                             const sm_gpt_qweights *qw, int nt) {
    const int64_t C = cfg->n_embd, V = cfg->vocab_size, BT = B * T;
    const int64_t Bc = chunk_seqs(B, T, C), N = Bc * T;
    const int want_logits = logits != NULL || targets != NULL;
    fwd_bufs f;
    memset(&f, 0, sizeof(f));
    float *losses = NULL;
    carver cv = {NULL, 0};
    for (int pass = 0; pass < 2; pass++) {
        f.x0 = CARVE_F(&cv, N * C);
        f.x1 = CARVE_F(&cv, N * C);
        f.qkv = CARVE_F(&cv, N * 3 * C);
        f.atty = CARVE_F(&cv, N * C);
        f.lse = CARVE_F(&cv, Bc * cfg->n_head * T);
        f.res2 = CARVE_F(&cv, N * C);
        f.fch = CARVE_F(&cv, N * 4 * C);
        f.ln = CARVE_F(&cv, N * C);
        f.br = CARVE_F(&cv, N * C);
        f.g = CARVE_F(&cv, N * 4 * C);
        f.logits = (want_logits && !logits) ? CARVE_F(&cv, BT * V) : NULL;
        losses = targets ? CARVE_F(&cv, BT) : NULL;
        f.wbuf = qw ? CARVE_F(&cv, 4 * C * C) : NULL;
        if (pass == 0) {
            cv.base = (char *)sm_pool_rent(sm_pool_default(), (size_t)cv.used);
            if (!cv.base) return SM_ERR_NOMEM;
            cv.used = 0;
        }
    }
    if (logits) f.logits = logits;
    f.cache = cache;
    f.cache_seq0 = cache_seq0;
    f.last_only = cache != NULL;
    f.pooled = pooled;
    f.qw = qw;
    int rc = SM_OK;
    for (int64_t b0 = 0; b0 < B && rc == SM_OK; b0 += Bc) {
        const int64_t bc = B - b0 < Bc ? B - b0 : Bc;
        rc = gpt_forward_chunk(&f, params, cfg, idx, b0, bc, T, dropout, seed, nt);
    }
    if (rc == SM_OK && targets) {
        sm_crossentropy_forward(losses, NULL, f.logits, targets, BT, V, nt);
        int64_t k = count_valid(targets, BT, V);
        if (loss) *loss = mean_loss(losses, BT, k);
        if (n_valid) *n_valid = k;
    }
    sm_pool_return(cv.base);
    return rc;
}

static int forward_training(float *logits, float *loss, int64_t *n_valid, sm_gpt_state *s,
                            const float *params, const int *idx, const int *targets,
                            float dropout, uint64_t seed, int nt) {
    const sm_gpt_config *cfg = &s->cfg;
    const int64_t C = cfg->n_embd, V = cfg->vocab_size, B = s->B, T = s->T, BT = B * T;
    s->ready = 0;
    memcpy(s->idx, idx, (size_t)BT * sizeof(int));
    fwd_bufs f;
    memset(&f, 0, sizeof(f));
    f.x = s->x;
    f.qkv = s->qkv;
    f.atty = s->atty;
    f.lse = s->lse;
    f.res2 = s->res2;
    f.fch = s->fch;
    f.mean1 = s->mean1;
    f.rstd1 = s->rstd1;
    f.mean2 = s->mean2;
    f.rstd2 = s->rstd2;
    f.meanf = s->meanf;
    f.rstdf = s->rstdf;
    f.s_c = BT * C;
    f.s_3c = BT * 3 * C;
    f.s_4c = BT * 4 * C;
    f.s_lse = B * cfg->n_head * T;
    f.s_row = BT;
    f.chunked_saves = 1;
    f.ln = s->ln;
    f.br = s->br;
    f.g = s->g;
    f.gemm = linear_gemm(s->precision);
    f.logits = logits ? logits : (targets ? s->logits : NULL);
    for (int64_t b0 = 0; b0 < B; b0 += s->Bc) {
        const int64_t bc = B - b0 < s->Bc ? B - b0 : s->Bc;
        RET_IF(gpt_forward_chunk(&f, params, cfg, s->idx, b0, bc, T, dropout, seed, nt));
    }
    if (!targets) return SM_OK; /* dropout-mode logits without a loss: nothing to differentiate */

    int64_t k = count_valid(targets, BT, V);
    float d = k > 0 ? 1.0f / (float)k : 0.0f;
    for (int64_t i = 0; i < BT; i++) s->dloss[i] = d;
    memset(s->dlogits, 0, (size_t)(BT * V) * sizeof(float));
    sm_crossentropy_forward_backward(s->losses, s->dlogits, f.logits, targets, s->dloss, BT, V, nt);
    if (loss) *loss = mean_loss(s->losses, BT, k);
    if (n_valid) *n_valid = k;
    s->dropout = dropout;
    s->seed = seed;
    s->ready = 1;
    return SM_OK;
}

int sm_gpt_forward(float *logits, float *loss, int64_t *n_valid, sm_gpt_state *state,
                   const float *params, const sm_gpt_config *cfg, const int *idx,
                   const int *targets, int64_t B, int64_t T, float dropout, uint64_t seed,
                   int nthreads) {
    if (sm_gpt_config_check(cfg) != SM_OK || !params || !idx || B < 1 || T < 1 ||
        T > cfg->block_size || !(dropout >= 0.0f && dropout < 1.0f))
        return SM_ERR_ARG;
    int nt = sm_resolve_threads(nthreads);
    if (state) {
        if (state->B != B || state->T != T || memcmp(&state->cfg, cfg, sizeof(*cfg)) != 0)
            return SM_ERR_ARG;
        return forward_training(logits, loss, n_valid, state, params, idx, targets, dropout,
                                seed, nt);
    }
    return forward_inference(logits, loss, n_valid, params, cfg, idx, targets, B, T, dropout,
                             seed, NULL, 0, NULL, NULL, nt);
}

int sm_gpt_forward_q(float *logits, float *loss, int64_t *n_valid, const float *params,
                     const sm_gpt_qweights *qw, const sm_gpt_config *cfg, const int *idx,
                     const int *targets, int64_t B, int64_t T, int nthreads) {
    if (sm_gpt_config_check(cfg) != SM_OK || !params || !qw || !idx || B < 1 || T < 1 ||
        T > cfg->block_size)
        return SM_ERR_ARG;
    for (int64_t i = 0; i < B * T; i++)
        if (idx[i] < 0 || idx[i] >= cfg->vocab_size) return SM_ERR_ARG;
    return forward_inference(logits, loss, n_valid, params, cfg, idx, targets, B, T, 0.0f, 0,
                             NULL, 0, NULL, qw, sm_resolve_threads(nthreads));
}

int sm_gpt_embed(float *out, const float *params, const sm_gpt_config *cfg, const int *idx,
                 int64_t B, int64_t T, int nthreads) {
    if (!out || !params || !idx || sm_gpt_config_check(cfg) != SM_OK || B < 1 || T < 1 ||
        T > cfg->block_size)
        return SM_ERR_ARG;
    return forward_inference(NULL, NULL, NULL, params, cfg, idx, NULL, B, T, 0.0f, 0, NULL, 0, out,
                             NULL, sm_resolve_threads(nthreads));
}

/* ---- prefill and decode --------------------------------------------------------------------- */

int sm_gpt_prefill(float *logits, sm_gpt_cache *c, const float *params, const sm_gpt_config *cfg,
                   const int *idx, int64_t T, int nthreads) {
    if (!c || !logits || !params || !idx || sm_gpt_config_check(cfg) != SM_OK ||
        memcmp(&c->cfg, cfg, sizeof(*cfg)) != 0 || T < 1 || T > c->capacity)
        return SM_ERR_ARG;
    const int nt = sm_resolve_threads(nthreads);
    memset(c->len, 0, (size_t)c->B * sizeof(int)); /* a failed prefill leaves an empty cache */
    int rc = forward_inference(logits, NULL, NULL, params, cfg, idx, NULL, c->B, T, 0.0f, 0, c, 0,
                               NULL, c->qw, nt);
    if (rc == SM_OK)
        for (int64_t b = 0; b < c->B; b++) c->len[b] = (int)T;
    return rc;
}

int sm_gpt_prefill_seq(float *logits, sm_gpt_cache *c, const float *params,
                       const sm_gpt_config *cfg, int64_t b, int64_t nb, const int *idx, int64_t T,
                       int nthreads) {
    if (!c || !logits || !params || !idx || sm_gpt_config_check(cfg) != SM_OK ||
        memcmp(&c->cfg, cfg, sizeof(*cfg)) != 0 || b < 0 || nb < 1 || b + nb > c->B || T < 1 ||
        T > c->capacity)
        return SM_ERR_ARG;
    const int nt = sm_resolve_threads(nthreads);
    for (int64_t i = b; i < b + nb; i++) c->len[i] = 0;
    int rc = forward_inference(logits, NULL, NULL, params, cfg, idx, NULL, nb, T, 0.0f, 0, c, b,
                               NULL, c->qw, nt);
    if (rc == SM_OK)
        for (int64_t i = b; i < b + nb; i++) c->len[i] = (int)T;
    return rc;
}

int sm_gpt_cache_copy(sm_gpt_cache *dst, int64_t db, const sm_gpt_cache *src, int64_t sb,
                      int64_t n) {
    if (!dst || !src || memcmp(&dst->cfg, &src->cfg, sizeof(dst->cfg)) != 0 || db < 0 ||
        db >= dst->B || sb < 0 || sb >= src->B || n < 1 || n > src->len[sb] ||
        n > dst->capacity || (dst == src && db == sb))
        return SM_ERR_ARG;
    const int64_t NH = dst->cfg.n_head, hs = dst->cfg.n_embd / NH, L = dst->cfg.n_layer;
    const int64_t nblk = (n + SM_ATT_BLOCK - 1) / SM_ATT_BLOCK; /* whole key blocks */
    for (int64_t l = 0; l < L; l++)
        for (int64_t h = 0; h < NH; h++) {
            const int64_t du = db * NH + h, su = sb * NH + h;
            const float *sk = src->k + l * cache_layer_floats(src) + su * hs * src->Tmax;
            const float *sv = src->v + l * cache_layer_floats(src) + su * src->Tmax * hs;
            float *dk = dst->k + l * cache_layer_floats(dst) + du * hs * dst->Tmax;
            float *dv = dst->v + l * cache_layer_floats(dst) + du * dst->Tmax * hs;
            memcpy(dk, sk, (size_t)(nblk * SM_ATT_BLOCK * hs) * sizeof(float));
            memcpy(dv, sv, (size_t)(n * hs) * sizeof(float));
        }
    dst->len[db] = (int)n;
    return SM_OK;
}

int sm_gpt_prefill_extend(float *logits, sm_gpt_cache *c, const float *params,
                          const sm_gpt_config *cfg, int64_t b, const int *idx, int64_t pre,
                          int64_t T, int nthreads) {
    if (!c || !logits || !params || !idx || sm_gpt_config_check(cfg) != SM_OK ||
        memcmp(&c->cfg, cfg, sizeof(*cfg)) != 0 || b < 0 || b >= c->B || pre < SM_ATT_BLOCK ||
        pre % SM_ATT_BLOCK != 0 || T - pre <= 4 || T > c->capacity || c->len[b] < pre)
        return SM_ERR_ARG;
    const int nt = sm_resolve_threads(nthreads);
    const int64_t C = cfg->n_embd, C3 = 3 * C, NH = cfg->n_head, hs = C / NH, L = cfg->n_layer;
    const int64_t V = cfg->vocab_size, N = T - pre, lay = cache_layer_floats(c);
    const int64_t per_seq = NH * c->Tmax * hs;
    /* the same steps as gpt_forward_chunk for one sequence, on its last N rows only: every
     * row-wise operation and every product row has the bits it has in the whole pass (the
     * products take their matrix path for N > 4, whose rows do not depend on the others) */
    carver cv = {NULL, 0};
    float *x = NULL, *res2 = NULL, *ln = NULL, *qkv = NULL, *att = NULL, *lse = NULL;
    float *fch = NULL, *g = NULL, *wbuf = NULL;
    const sm_gpt_qweights *qw = c->qw;
    for (int pass = 0; pass < 2; pass++) {
        x = CARVE_F(&cv, N * C);
        res2 = CARVE_F(&cv, N * C);
        ln = CARVE_F(&cv, N * C);
        qkv = CARVE_F(&cv, T * C3);
        att = CARVE_F(&cv, T * C);
        lse = CARVE_F(&cv, NH * T);
        fch = CARVE_F(&cv, N * 4 * C);
        g = CARVE_F(&cv, N * 4 * C);
        wbuf = qw ? CARVE_F(&cv, 4 * C * C) : NULL;
        if (pass == 0) {
            cv.base = (char *)sm_pool_rent(sm_pool_default(), (size_t)cv.used);
            if (!cv.base) return SM_ERR_NOMEM;
            cv.used = 0;
        }
    }
    int rc = SM_OK;
    c->len[b] = (int)pre; /* a failure leaves the cached prefix */
    const float *wte = P(params, SM_GPT_WTE, 0), *wpe = P(params, SM_GPT_WPE, 0);
    for (int64_t i = 0; i < N; i++) {
        const int id = idx[pre + i];
        if (id < 0 || id >= V) {
            rc = SM_ERR_ARG;
            goto done;
        }
        if (qw)
            embed_q(x + i * C, &id, 1, 1, pre + i, qw, wpe, C);
        else
            sm_residual_forward(x + i * C, wte + (int64_t)id * C, wpe + (pre + i) * C, C, 1);
    }
    for (int64_t l = 0; l < L; l++) {
        float *kc = c->k + l * lay + b * per_seq, *vc = c->v + l * lay + b * per_seq;
        sm_layernorm_forward(ln, NULL, NULL, x, P(params, SM_GPT_LN1W, l),
                             P(params, SM_GPT_LN1B, l), N, C, LN_EPS, nt);
        const sm_gemm_epilogue qkv_epi = {P(params, SM_GPT_QKVB, l), NULL, 0, NULL, 0};
        rc = sm_sgemm_epi(0, 0, N, C3, C, ln, C, wmat(qw, wbuf, params, cfg, SM_GPT_QKVW, l, nt), C3, qkv + pre * C3, C3,
                          &qkv_epi, nt);
        if (rc != SM_OK) goto done;
        sm_kv_cache_read(qkv, kc, vc, pre, NH, c->Tmax, hs);
        sm_kv_cache_prefill(kc, vc, qkv + pre * C3, pre, 1, N, NH, c->Tmax, hs, nt);
        rc = sm_attention_forward_tail(att, lse, qkv, T, C, NH, pre / SM_ATT_BLOCK, nt);
        if (rc != SM_OK) goto done;
        const sm_gemm_epilogue proj_epi = {P(params, SM_GPT_ATTPROJB, l), x, C, NULL, 0};
        rc = sm_sgemm_epi(0, 0, N, C, C, att + pre * C, C, wmat(qw, wbuf, params, cfg, SM_GPT_ATTPROJW, l, nt), C, res2,
                          C, &proj_epi, nt);
        if (rc != SM_OK) goto done;
        sm_layernorm_forward(ln, NULL, NULL, res2, P(params, SM_GPT_LN2W, l),
                             P(params, SM_GPT_LN2B, l), N, C, LN_EPS, nt);
        const sm_gemm_epilogue fc_epi = {P(params, SM_GPT_FCB, l), NULL, 0, g, 4 * C};
        rc = sm_sgemm_epi(0, 0, N, 4 * C, C, ln, C, wmat(qw, wbuf, params, cfg, SM_GPT_FCW, l, nt), 4 * C, fch, 4 * C,
                          &fc_epi, nt);
        if (rc != SM_OK) goto done;
        const sm_gemm_epilogue out_epi = {P(params, SM_GPT_FCPROJB, l), res2, C, NULL, 0};
        rc = sm_sgemm_epi(0, 0, N, C, 4 * C, g, 4 * C, wmat(qw, wbuf, params, cfg, SM_GPT_FCPROJW, l, nt), C, x, C,
                          &out_epi, nt);
        if (rc != SM_OK) goto done;
    }
    sm_layernorm_forward(ln, NULL, NULL, x, P(params, SM_GPT_LNFW, 0), P(params, SM_GPT_LNFB, 0),
                         N, C, LN_EPS, nt);
    if (qw)
        head_q(logits, V, ln + (N - 1) * C, N * C, 1, qw->wte, nt);
    else
        rc = sm_sgemm(0, 1, 1, V, C, 1.0f, ln + (N - 1) * C, N * C, wte, C, 0.0f, logits, V, nt);
    if (rc == SM_OK) c->len[b] = (int)T;
done:
    sm_pool_return(cv.base);
    return rc;
}

/* A decode step runs in one parallel region (tiny models at batch 1 spend more on waking
 * threads than on arithmetic: one team wake-up per token, not ~15 per layer). Threads meet at
 * barriers where the next step needs every column of the last; layer norms are computed by
 * every thread into its own buffer instead of paying another barrier. The products are split
 * between threads in one of two ways, chosen by the model's size alone (so the bits never
 * depend on the thread count):
 *   - by output columns (multiples of 64) when the weights stay in cache (<= 8 MB): five
 *     barriers per layer;
 *   - by fixed blocks of DEC_KB rows of each weight matrix when the weights stream from memory
 *     every token: each thread reads its own contiguous stretch front to back (one sequential
 *     stream per thread is what the prefetchers follow best; a column split has every thread
 *     hop between short pieces of every row, 1.1x slower on the GPT-2 shape, 1.7x at width
 *     384) and writes one partial product per block; the sums over blocks (in block order) are
 *     fused with what follows. Eight barriers per layer. */
#define DECODE_BY_ROWS_BYTES ((int64_t)8 << 20)
#define DEC_KB 64

/* Threads for a decode step: each should stream a fair share of the weights (~0.5 MB), or
 * waking it costs more than it saves. */
static int decode_team(int nt, const sm_gpt_config *cfg, int64_t B) {
    const int64_t useful = 1 + sm_gpt_num_params(cfg) * B / (128 * 1024);
    return nt < useful ? nt : (int)useful;
}

/* Per-thread scratch of a decode step: its layer-normed rows (B, C), streaming scratch for the
 * products, attention scratch. */
typedef struct {
    float *ln, *gs, *aws;
} dec_scratch;

static int64_t dec_scratch_floats(int64_t B, int64_t C, int64_t hs) {
    return round16(B * C) + SM_GEMV_SCRATCH + round16(sm_attention_decode_ws(hs));
}

static dec_scratch dec_scratch_at(float *base, int64_t B, int64_t C) {
    dec_scratch d = {base, base + round16(B * C), base + round16(B * C) + SM_GEMV_SCRATCH};
    return d;
}

/* y[:, n0:n1] += bias[n0:n1] for the B rows of y (row stride ld) */
static void bias_cols(float *y, const float *bias, int64_t B, int64_t ld, int64_t n0, int64_t n1) {
    for (int64_t b = 0; b < B; b++) sm_bias_add(y + b * ld + n0, bias + n0, 1, n1 - n0, 1);
}

/* y[:, n0:n1] = x W[:, n0:n1] for the weight `kind` of layer l (K rows, N columns): the float32
 * matrix-vector kernel, or the compact one when the cache has compact weights. */
static void lin_cols(const sm_gpt_cache *c, const float *params, const sm_gpt_config *cfg, int kind,
                     int64_t l, int64_t B, int64_t N, int64_t K, const float *x, int64_t ldx,
                     float *y, int64_t ldy, int64_t n0, int64_t n1, float *gs) {
    if (n1 <= n0) return;
    if (c->qw)
        sm_qgemv(qmat(c->qw, kind, l), B, x, ldx, 0, K, n0, n1, y, ldy);
    else
        sm_gemv_cols(0, B, N, K, x, ldx, P(params, kind, l), N, y, ldy, n0, n1, gs);
}

/* The layers of a decode step, products split by output columns. */
static void decode_by_columns(sm_gpt_cache *c, const float *params, const sm_gpt_config *cfg,
                              int64_t B, const int *seqs, float *scratch, int nt) {
    const int64_t C = cfg->n_embd, NH = cfg->n_head, L = cfg->n_layer;
    const int64_t hs = C / NH, lay = cache_layer_floats(c), per = dec_scratch_floats(B, C, hs);
    float *const x = c->x, *const xo = c->x2, *const qkv = c->qkv, *const br = c->br;
    SM_PARALLEL(nt) {
        const int tid = SM_THREAD_ID(), nth = SM_THREAD_COUNT();
        const dec_scratch d = dec_scratch_at(scratch + tid * per, B, C);
        int64_t c0, c1, q0, q1, f0, f1, u0, u1; /* this thread's columns / heads */
        sm_split_range(C, 64, nth, tid, &c0, &c1);
        sm_split_range(3 * C, 64, nth, tid, &q0, &q1);
        sm_split_range(4 * C, 64, nth, tid, &f0, &f1);
        sm_split_range(B * NH, 1, nth, tid, &u0, &u1);
        for (int64_t l = 0; l < L; l++) {
            /* qkv = ln_1(x) W_qkv + b */
            sm_layernorm_forward(d.ln, NULL, NULL, x, P(params, SM_GPT_LN1W, l),
                                 P(params, SM_GPT_LN1B, l), B, C, LN_EPS, 1);
            lin_cols(c, params, cfg, SM_GPT_QKVW, l, B, 3 * C, C, d.ln, C, qkv, 3 * C, q0, q1,
                     d.gs);
            bias_cols(qkv, P(params, SM_GPT_QKVB, l), B, 3 * C, q0, q1);
            SM_BARRIER();
            /* the new keys and values into the cache, attention per (sequence, head) */
            sm_attention_decode_units(c->att, qkv, c->k + l * lay, c->v + l * lay, c->pos, seqs, NH,
                                      c->Tmax, hs, u0, u1, d.aws);
            SM_BARRIER();
            /* xo = x + (att W_proj + b) */
            lin_cols(c, params, cfg, SM_GPT_ATTPROJW, l, B, C, C, c->att, C, br, C, c0, c1, d.gs);
            bias_cols(br, P(params, SM_GPT_ATTPROJB, l), B, C, c0, c1);
            for (int64_t b = 0; b < B; b++)
                sm_residual_forward(xo + b * C + c0, x + b * C + c0, br + b * C + c0, c1 - c0, 1);
            SM_BARRIER();
            /* g = gelu(ln_2(xo) W_fc + b) */
            sm_layernorm_forward(d.ln, NULL, NULL, xo, P(params, SM_GPT_LN2W, l),
                                 P(params, SM_GPT_LN2B, l), B, C, LN_EPS, 1);
            lin_cols(c, params, cfg, SM_GPT_FCW, l, B, 4 * C, C, d.ln, C, c->fch, 4 * C, f0, f1,
                     d.gs);
            bias_cols(c->fch, P(params, SM_GPT_FCB, l), B, 4 * C, f0, f1);
            for (int64_t b = 0; b < B; b++)
                sm_gelu_forward(c->g + b * 4 * C + f0, c->fch + b * 4 * C + f0, f1 - f0, 1);
            SM_BARRIER();
            /* x = xo + (g W_fcproj + b) */
            lin_cols(c, params, cfg, SM_GPT_FCPROJW, l, B, C, 4 * C, c->g, 4 * C, br, C, c0, c1,
                     d.gs);
            bias_cols(br, P(params, SM_GPT_FCPROJB, l), B, C, c0, c1);
            for (int64_t b = 0; b < B; b++)
                sm_residual_forward(x + b * C + c0, xo + b * C + c0, br + b * C + c0, c1 - c0, 1);
            SM_BARRIER();
        }
    }
}

static int64_t dec_blocks(int64_t K) { return (K + DEC_KB - 1) / DEC_KB; }

/* This thread's share of the partials part[j] (B, N) = x[:, rows of block j] W[that block], W
 * the weight `kind` of layer l (float32, or the cache's compact matrix). */
static void dec_partials(float *part, const float *x, int64_t ldx, const sm_gpt_cache *c,
                         const float *params, const sm_gpt_config *cfg, int kind, int64_t l,
                         int64_t B, int64_t K, int64_t N, int tid, int nth, float *gs) {
    int64_t j0, j1;
    sm_split_range(dec_blocks(K), 1, nth, tid, &j0, &j1);
    const float *W = c->qw ? NULL : P(params, kind, l);
    for (int64_t j = j0; j < j1; j++) {
        const int64_t k0 = j * DEC_KB, kb = K - k0 < DEC_KB ? K - k0 : DEC_KB;
        if (c->qw)
            sm_qgemv(qmat(c->qw, kind, l), B, x, ldx, k0, k0 + kb, 0, N, part + j * B * N, N);
        else
            sm_gemv_rows_stream(B, N, kb, x + k0, ldx, W + k0 * N, N, part + j * B * N, N, gs);
    }
}

/* y[b, n0:n1] = (sum of part[j][b, n0:n1] over blocks j, in order) + bias[n0:n1] */
static void dec_reduce(float *y, int64_t ldy, const float *part, const float *bias, int64_t B,
                       int64_t K, int64_t N, int64_t b, int64_t n0, int64_t n1) {
    float *yr = y + b * ldy + n0;
    memcpy(yr, part + b * N + n0, (size_t)(n1 - n0) * sizeof(float));
    for (int64_t j = 1; j < dec_blocks(K); j++)
        sm_residual_forward(yr, yr, part + (j * B + b) * N + n0, n1 - n0, 1);
    sm_bias_add(yr, bias + n0, 1, n1 - n0, 1);
}

/* Floats of the shared partials: those of the largest product (W_fc or W_fcproj). */
static int64_t dec_part_floats(int64_t B, int64_t C) {
    const int64_t fc = dec_blocks(C) * 4 * C, proj = dec_blocks(4 * C) * C;
    return round16(B * (fc > proj ? fc : proj));
}

/* The layers of a decode step, products split by blocks of rows. */
static void decode_by_rows(sm_gpt_cache *c, const float *params, const sm_gpt_config *cfg,
                           int64_t B, const int *seqs, float *scratch, int nt) {
    const int64_t C = cfg->n_embd, NH = cfg->n_head, L = cfg->n_layer;
    const int64_t hs = C / NH, lay = cache_layer_floats(c), per = dec_scratch_floats(B, C, hs);
    float *const part = scratch, *const x = c->x, *const xo = c->x2, *const qkv = c->qkv;
    scratch += dec_part_floats(B, C);
    SM_PARALLEL(nt) {
        const int tid = SM_THREAD_ID(), nth = SM_THREAD_COUNT();
        const dec_scratch d = dec_scratch_at(scratch + tid * per, B, C);
        int64_t c0, c1, f0, f1, u0, u1; /* this thread's columns of the sums / heads */
        sm_split_range(C, 16, nth, tid, &c0, &c1);
        sm_split_range(4 * C, 16, nth, tid, &f0, &f1);
        sm_split_range(B * NH, 1, nth, tid, &u0, &u1);
        for (int64_t l = 0; l < L; l++) {
            /* qkv = ln_1(x) W_qkv + b: each (sequence, head) sums its own q, k and v columns,
             * appends k and v to the cache and attends */
            sm_layernorm_forward(d.ln, NULL, NULL, x, P(params, SM_GPT_LN1W, l),
                                 P(params, SM_GPT_LN1B, l), B, C, LN_EPS, 1);
            dec_partials(part, d.ln, C, c, params, cfg, SM_GPT_QKVW, l, B, C, 3 * C, tid, nth,
                         d.gs);
            SM_BARRIER();
            for (int64_t u = u0; u < u1; u++) {
                const int64_t b = u / NH, h = u % NH;
                for (int64_t w = 0; w < 3; w++)
                    dec_reduce(qkv, 3 * C, part, P(params, SM_GPT_QKVB, l), B, C, 3 * C, b,
                               w * C + h * hs, w * C + (h + 1) * hs);
                sm_attention_decode_units(c->att, qkv, c->k + l * lay, c->v + l * lay, c->pos, seqs, NH,
                                          c->Tmax, hs, u, u + 1, d.aws);
            }
            SM_BARRIER();
            /* xo = x + (att W_proj + b) */
            dec_partials(part, c->att, C, c, params, cfg, SM_GPT_ATTPROJW, l, B, C, C, tid, nth,
                         d.gs);
            SM_BARRIER();
            for (int64_t b = 0; b < B; b++) {
                dec_reduce(xo, C, part, P(params, SM_GPT_ATTPROJB, l), B, C, C, b, c0, c1);
                sm_residual_forward(xo + b * C + c0, x + b * C + c0, xo + b * C + c0, c1 - c0, 1);
            }
            SM_BARRIER();
            /* g = gelu(ln_2(xo) W_fc + b) */
            sm_layernorm_forward(d.ln, NULL, NULL, xo, P(params, SM_GPT_LN2W, l),
                                 P(params, SM_GPT_LN2B, l), B, C, LN_EPS, 1);
            dec_partials(part, d.ln, C, c, params, cfg, SM_GPT_FCW, l, B, C, 4 * C, tid, nth,
                         d.gs);
            SM_BARRIER();
            for (int64_t b = 0; b < B; b++) {
                dec_reduce(c->fch, 4 * C, part, P(params, SM_GPT_FCB, l), B, C, 4 * C, b, f0, f1);
                sm_gelu_forward(c->g + b * 4 * C + f0, c->fch + b * 4 * C + f0, f1 - f0, 1);
            }
            SM_BARRIER();
            /* x = xo + (g W_fcproj + b) */
            dec_partials(part, c->g, 4 * C, c, params, cfg, SM_GPT_FCPROJW, l, B, 4 * C, C, tid,
                         nth, d.gs);
            SM_BARRIER();
            for (int64_t b = 0; b < B; b++) {
                dec_reduce(x, C, part, P(params, SM_GPT_FCPROJB, l), B, 4 * C, C, b, c0, c1);
                sm_residual_forward(x + b * C + c0, xo + b * C + c0, x + b * C + c0, c1 - c0, 1);
            }
            SM_BARRIER();
        }
    }
}

/* logits = ln_f(x) wte^T, the vocabulary split between threads (each reads its own stretch of
 * wte's rows). */
static void decode_head(float *logits, const sm_gpt_cache *c, const float *params,
                        const sm_gpt_config *cfg, int64_t B, float *scratch, int nt) {
    const int64_t C = cfg->n_embd, V = cfg->vocab_size;
    const int64_t per = dec_scratch_floats(B, C, C / cfg->n_head);
    SM_PARALLEL(nt) {
        const int tid = SM_THREAD_ID();
        const dec_scratch d = dec_scratch_at(scratch + tid * per, B, C);
        int64_t v0, v1;
        sm_split_range(V, 64, SM_THREAD_COUNT(), tid, &v0, &v1);
        sm_layernorm_forward(d.ln, NULL, NULL, c->x, P(params, SM_GPT_LNFW, 0),
                             P(params, SM_GPT_LNFB, 0), B, C, LN_EPS, 1);
        if (v1 <= v0) {
        } else if (c->qw) {
            sm_qgemv_dots(c->qw->wte, B, d.ln, C, v0, v1, logits, V);
        } else {
            sm_gemv_cols(1, B, V, C, d.ln, C, P(params, SM_GPT_WTE, 0), C, logits, V, v0, v1, d.gs);
        }
    }
}

/* Decode rows 0 .. B-1, row i being cache sequence seqs[i] (seqs NULL: sequence i). The
 * cache's per-row scratch (x, qkv, ...) is indexed by row, its keys and values by sequence. */
/* Floats of scratch a decode of B rows on `nt` threads (resolved) uses. */
static int64_t decode_floats(const sm_gpt_config *cfg, int64_t B, int nt) {
    const int64_t C = cfg->n_embd;
    const int by_rows = sm_gpt_num_params(cfg) * (int64_t)sizeof(float) > DECODE_BY_ROWS_BYTES;
    return (by_rows ? dec_part_floats(B, C) : 0) +
           decode_team(nt, cfg, B) * dec_scratch_floats(B, C, C / cfg->n_head);
}

int64_t sm_gpt_decode_scratch_floats(const sm_gpt_config *cfg, int64_t B, int nthreads) {
    return decode_floats(cfg, B, sm_resolve_threads(nthreads));
}

/* scratch: decode_floats(cfg, B, nthreads resolved) floats, or NULL to rent them. */
static int decode_rows(float *logits, sm_gpt_cache *c, const float *params,
                       const sm_gpt_config *cfg, const int *seqs, int64_t B, const int *tokens,
                       int nthreads, float *given) {
    if (!c || !logits || !params || !tokens || memcmp(&c->cfg, cfg, sizeof(*cfg)) != 0 || B < 1 ||
        B > c->B)
        return SM_ERR_ARG;
    const int64_t C = cfg->n_embd, V = cfg->vocab_size;
    for (int64_t b = 0; b < B; b++) {
        const int64_t s = seqs ? seqs[b] : b;
        if (s < 0 || s >= c->B || tokens[b] < 0 || tokens[b] >= V) return SM_ERR_ARG;
        for (int64_t e = 0; e < b; e++) /* a sequence twice would append to itself twice */
            if (seqs && seqs[e] == s) return SM_ERR_ARG;
        if (c->len[s] < 1 || c->len[s] >= c->capacity) return SM_ERR_STATE;
        c->pos[b] = c->len[s];
    }
    const int by_rows = sm_gpt_num_params(cfg) * (int64_t)sizeof(float) > DECODE_BY_ROWS_BYTES;
    const int nt = decode_team(sm_resolve_threads(nthreads), cfg, B);
    float *scratch = given;
    if (!scratch) {
        const int64_t floats = decode_floats(cfg, B, sm_resolve_threads(nthreads));
        scratch = (float *)sm_pool_rent(sm_pool_default(), (size_t)floats * sizeof(float));
        if (!scratch) return SM_ERR_NOMEM;
    }
    /* x (B, C): each sequence's new token at its own position */
    const float *wte = P(params, SM_GPT_WTE, 0), *wpe = P(params, SM_GPT_WPE, 0);
    for (int64_t b = 0; b < B; b++)
        if (c->qw)
            embed_q(c->x + b * C, &tokens[b], 1, 1, c->pos[b], c->qw, wpe, C);
        else
            sm_residual_forward(c->x + b * C, wte + (int64_t)tokens[b] * C,
                                wpe + (int64_t)c->pos[b] * C, C, 1);
    if (by_rows)
        decode_by_rows(c, params, cfg, B, seqs, scratch, nt);
    else
        decode_by_columns(c, params, cfg, B, seqs, scratch, nt);
    decode_head(logits, c, params, cfg, B, scratch + (by_rows ? dec_part_floats(B, C) : 0), nt);
    if (!given) sm_pool_return(scratch);
    for (int64_t b = 0; b < B; b++) c->len[seqs ? seqs[b] : b] = c->pos[b] + 1;
    return SM_OK;
}

int sm_gpt_decode(float *logits, sm_gpt_cache *c, const float *params, const sm_gpt_config *cfg,
                  const int *tokens, int nthreads) {
    if (!c) return SM_ERR_ARG;
    return decode_rows(logits, c, params, cfg, NULL, c->B, tokens, nthreads, NULL);
}

int sm_gpt_decode_seqs(float *logits, sm_gpt_cache *c, const float *params,
                       const sm_gpt_config *cfg, const int *seqs, int64_t n, const int *tokens,
                       int nthreads) {
    if (!seqs) return SM_ERR_ARG;
    return decode_rows(logits, c, params, cfg, seqs, n, tokens, nthreads, NULL);
}

int sm_gpt_decode_seqs_scratch(float *logits, sm_gpt_cache *c, const float *params,
                               const sm_gpt_config *cfg, const int *seqs, int64_t n,
                               const int *tokens, int nthreads, float *scratch) {
    if (!seqs || !scratch) return SM_ERR_ARG;
    return decode_rows(logits, c, params, cfg, seqs, n, tokens, nthreads, scratch);
}

/* ---- backward ------------------------------------------------------------------------------- */

/* The gradient reaching a dropped branch of the chunk whose first element is e0: dout * mask /
 * (1-p), or dout itself without dropout. */
static const float *branch_grad(sm_gpt_state *s, const float *dout, int64_t n, uint64_t stream,
                                int64_t e0, int nt) {
    if (s->dropout <= 0.0f) return dout;
    dropout_at(s->br, dout, n, s->dropout, s->seed, stream, e0, nt);
    return s->br;
}

/* grads += loss_scale * d(loss)/d(params) through sequences b0 .. b0+bc-1. */
static int gpt_backward_chunk(float *grads, sm_gpt_state *s, const float *params,
                              float loss_scale, int64_t b0, int64_t bc, int nt) {
    const sm_gpt_config *cfg = &s->cfg;
    const int64_t L = cfg->n_layer, C = cfg->n_embd, NH = cfg->n_head, V = cfg->vocab_size;
    const int64_t T = s->T, BT = s->B * T, N = bc * T, r0 = b0 * T, e0 = r0 * C;
    const gemm_fn gemm = linear_gemm(s->precision);

    /* LM head and ln_f: dln = scale * dlogits wte; dwte += scale * dlogits^T ln_f(x) */
    const float *dlogits = s->dlogits + r0 * V;
    float *xL = s->x + L * BT * C + r0 * C;
    sm_layernorm_forward(s->ln, NULL, NULL, xL, P(params, SM_GPT_LNFW, 0),
                         P(params, SM_GPT_LNFB, 0), N, C, LN_EPS, nt);
    RET_IF(gemm(0, 0, N, C, V, loss_scale, dlogits, V, P(params, SM_GPT_WTE, 0), C, 0.0f,
                s->dln, C, nt));
    RET_IF(gemm(1, 0, V, C, N, loss_scale, dlogits, V, s->ln, C, 1.0f,
                P(grads, SM_GPT_WTE, 0), C, nt));
    memset(s->dres, 0, (size_t)(N * C) * sizeof(float));
    RET_IF(sm_layernorm_backward(s->dres, P(grads, SM_GPT_LNFW, 0), P(grads, SM_GPT_LNFB, 0),
                                 s->dln, xL, P(params, SM_GPT_LNFW, 0), s->meanf + r0,
                                 s->rstdf + r0, N, C, s->ln_scratch, nt));

    for (int64_t l = L - 1; l >= 0; l--) {
        /* dres holds d(layer output) and accumulates into d(layer input) */
        float *x = s->x + l * BT * C + r0 * C, *qkv = s->qkv + (l * BT + r0) * 3 * C;
        float *atty = s->atty + (l * BT + r0) * C, *res2 = s->res2 + (l * BT + r0) * C;
        float *lse = s->lse + l * s->B * NH * T + b0 * NH * T;
        float *fch = s->fch + (l * BT + r0) * 4 * C;
        const float *mean1 = s->mean1 + l * BT + r0, *rstd1 = s->rstd1 + l * BT + r0;
        const float *mean2 = s->mean2 + l * BT + r0, *rstd2 = s->rstd2 + l * BT + r0;
        const float *dbr;

        /* MLP branch */
        dbr = branch_grad(s, s->dres, N * C, STREAM_MLP(l), e0, nt);
        sm_gelu_forward(s->g, fch, N * 4 * C, nt);
        RET_IF(gemm(1, 0, 4 * C, C, N, 1.0f, s->g, 4 * C, dbr, C, 1.0f,
                    P(grads, SM_GPT_FCPROJW, l), C, nt));
        RET_IF(sm_bias_backward(P(grads, SM_GPT_FCPROJB, l), dbr, N, C, s->bias_scratch, nt));
        RET_IF(gemm(0, 1, N, 4 * C, C, 1.0f, dbr, C, P(params, SM_GPT_FCPROJW, l), C, 0.0f,
                    s->dg, 4 * C, nt));
        memset(s->g, 0, (size_t)(N * 4 * C) * sizeof(float)); /* g becomes d fch */
        sm_gelu_backward(s->g, fch, s->dg, N * 4 * C, nt);
        sm_layernorm_forward(s->ln, NULL, NULL, res2, P(params, SM_GPT_LN2W, l),
                             P(params, SM_GPT_LN2B, l), N, C, LN_EPS, nt);
        RET_IF(gemm(1, 0, C, 4 * C, N, 1.0f, s->ln, C, s->g, 4 * C, 1.0f,
                    P(grads, SM_GPT_FCW, l), 4 * C, nt));
        RET_IF(sm_bias_backward(P(grads, SM_GPT_FCB, l), s->g, N, 4 * C, s->bias_scratch, nt));
        RET_IF(gemm(0, 1, N, C, 4 * C, 1.0f, s->g, 4 * C, P(params, SM_GPT_FCW, l), 4 * C,
                    0.0f, s->dln, C, nt));
        RET_IF(sm_layernorm_backward(s->dres, P(grads, SM_GPT_LN2W, l), P(grads, SM_GPT_LN2B, l),
                                     s->dln, res2, P(params, SM_GPT_LN2W, l), mean2, rstd2, N, C,
                                     s->ln_scratch, nt));

        /* attention branch */
        dbr = branch_grad(s, s->dres, N * C, STREAM_ATT(l), e0, nt);
        RET_IF(gemm(1, 0, C, C, N, 1.0f, atty, C, dbr, C, 1.0f,
                    P(grads, SM_GPT_ATTPROJW, l), C, nt));
        RET_IF(sm_bias_backward(P(grads, SM_GPT_ATTPROJB, l), dbr, N, C, s->bias_scratch, nt));
        RET_IF(gemm(0, 1, N, C, C, 1.0f, dbr, C, P(params, SM_GPT_ATTPROJW, l), C, 0.0f,
                    s->datty, C, nt));
        memset(s->dqkv, 0, (size_t)(N * 3 * C) * sizeof(float));
        sm_att_dropout ad = {s->dropout, s->seed, STREAM_PROB(l), b0};
        RET_IF(sm_attention_backward_ex(s->dqkv, s->datty, qkv, atty, lse, bc, T, C, NH,
                                        s->dropout > 0.0f ? &ad : NULL, nt));
        sm_layernorm_forward(s->ln, NULL, NULL, x, P(params, SM_GPT_LN1W, l),
                             P(params, SM_GPT_LN1B, l), N, C, LN_EPS, nt);
        RET_IF(gemm(1, 0, C, 3 * C, N, 1.0f, s->ln, C, s->dqkv, 3 * C, 1.0f,
                    P(grads, SM_GPT_QKVW, l), 3 * C, nt));
        RET_IF(sm_bias_backward(P(grads, SM_GPT_QKVB, l), s->dqkv, N, 3 * C, s->bias_scratch, nt));
        RET_IF(gemm(0, 1, N, C, 3 * C, 1.0f, s->dqkv, 3 * C, P(params, SM_GPT_QKVW, l), 3 * C,
                    0.0f, s->dln, C, nt));
        RET_IF(sm_layernorm_backward(s->dres, P(grads, SM_GPT_LN1W, l), P(grads, SM_GPT_LN1B, l),
                                     s->dln, x, P(params, SM_GPT_LN1W, l), mean1, rstd1, N, C,
                                     s->ln_scratch, nt));
    }

    /* embeddings */
    const float *demb = branch_grad(s, s->dres, N * C, STREAM_EMB, e0, nt);
    sm_encoder_backward(P(grads, SM_GPT_WTE, 0), P(grads, SM_GPT_WPE, 0), demb, s->idx + r0, bc,
                        T, C, V, nt);
    return SM_OK;
}

int sm_gpt_backward(float *grads, sm_gpt_state *s, const float *params, float loss_scale,
                    int nthreads) {
    if (!s || !grads || !params) return SM_ERR_ARG;
    if (!s->ready) return SM_ERR_STATE;
    const int nt = sm_resolve_threads(nthreads);
    s->ready = 0;
    /* chunks in batch order: the gradient sums always add their contributions in one order */
    for (int64_t b0 = 0; b0 < s->B; b0 += s->Bc) {
        const int64_t bc = s->B - b0 < s->Bc ? s->B - b0 : s->Bc;
        RET_IF(gpt_backward_chunk(grads, s, params, loss_scale, b0, bc, nt));
    }
    return SM_OK;
}

/* ---- optimizer ------------------------------------------------------------------------------ */

void sm_gpt_adamw(float *params, float *m, float *v, const float *grads, const sm_gpt_config *cfg,
                  float lr, float beta1, float beta2, float eps, float weight_decay, int64_t step,
                  int nthreads) {
    /* params, m, v, grads (sm_gpt_num_params) */
    const int64_t nd = sm_gpt_decay_size(cfg), n = sm_gpt_num_params(cfg);
    sm_adamw_step(params, m, v, grads, nd, lr, beta1, beta2, eps, weight_decay, step, nthreads);
    sm_adamw_step(params + nd, m + nd, v + nd, grads + nd, n - nd, lr, beta1, beta2, eps, 0.0f,
                  step, nthreads);
}
