/* sm_generate.h - the token loop of text generation in C: for every row still running, choose
 * the next token from its logits (logit bias and presence / frequency penalties applied, then
 * sm_sample_rows), feed it back through the model (one sm_gpt_decode_seqs call for all rows, or
 * a prefill of the kept window when a row's window is full), and repeat - up to max_steps tokens
 * per row, a time budget, or an interrupt flag - without returning to the caller in between.
 * Python takes the tokens after each call to build text, check stop strings and honour
 * cancellation; it sets the rows up and may change `remaining` between calls.
 *
 * Every token equals what the one-step-at-a-time loop gives (the same decode and prefill calls,
 * the same sampler, the same counter-based draws): the rows in a call, the number of calls and
 * the thread count never change a row's tokens. */
#ifndef SM_GENERATE_H
#define SM_GENERATE_H

#include "sm_common.h"
#include "sm_model.h"

/* The most alternatives a row can ask log-probabilities for (OpenAI's limit). */
#define SM_GEN_MAX_TOP 20

/* One sequence being generated. The caller owns every buffer; the loop updates the state. */
typedef struct sm_gen_row {
    /* fixed for the generation */
    int64_t seq;              /* its sequence in the KV cache */
    float temperature;        /* 0: greedy (argmax) */
    int64_t top_k;            /* 0: no limit */
    float top_p;              /* in (0, 1] */
    uint64_t key;             /* draw t is sm_sample_uniform(key, t) */
    double presence_penalty;  /* subtracted once from a token's logit after it appeared */
    double frequency_penalty; /* subtracted per appearance */
    const double *bias;       /* nv values added to the logits, or NULL */
    int logprobs;             /* -1: none; n >= 0: the chosen token's and the n best */
    int64_t stop_token;       /* drawing this id ends the row (an end-of-text token); -1: none */
    /* state, read and written by every call */
    int32_t *counts;          /* nv appearance counts (penalties), or NULL */
    int *window;              /* block_size + 1 entries: the tokens the cache holds, in order */
    int64_t held;             /* tokens in window (and in the cache's sequence), 1 .. block */
    float *logits;            /* nv: the next token's logits (ready before every call) */
    uint64_t generated;       /* tokens generated so far: the next draw's counter */
    int64_t remaining;        /* tokens the row may still generate; 0: it is done */
    int failed;               /* set when its logits held NaN or an infinity (it stops) */
} sm_gen_row;

/* Log-probabilities of one generated token (rows with logprobs >= 0). */
typedef struct sm_gen_logprob {
    double logprob;                 /* log softmax of the chosen token (biased logits) */
    int n;                          /* entries in top */
    int top_id[SM_GEN_MAX_TOP];     /* most likely first, then lower id */
    double top_logprob[SM_GEN_MAX_TOP];
} sm_gen_logprob;

/* Run the loop for rows[0 .. n_rows-1] (distinct sequences of c; rows with remaining == 0 or
 * failed set are skipped). Each step, every running row draws a token from its first nv
 * logits, appends it to out[r * ld_out + k] (k = made[r], the row's tokens so far in this
 * call) and, with lp_out, its log-probabilities to lp_out[r * ld_out + k]; a row that still has
 * tokens left is fed the token: decoded at position `held`, or, when its window holds
 * block_size tokens, its last `keep` tokens (ending with the new one) are prefilled again from
 * position 0.
 * Stops after max_steps steps, when no row runs, when max_seconds have passed since the call
 * began (checked after each step; <= 0: no limit) or when *interrupt is non-zero (checked after
 * each step; may be NULL). made (n_rows) receives each row's token count, *first_step_s (when
 * not NULL) the seconds from the call's start to the end of its first step (a time to first
 * token), *steps_out (when not NULL) the steps run. Returns SM_OK, SM_ERR_ARG (bad sizes, a row
 * out of range or inconsistent with its cache sequence) or SM_ERR_NOMEM. */
int sm_gpt_generate(sm_gpt_cache *c, const float *params, const sm_gpt_config *cfg,
                    sm_gen_row *rows, int64_t n_rows, int64_t nv, int64_t keep,
                    int64_t max_steps, double max_seconds, volatile int64_t *interrupt, int *out,
                    sm_gen_logprob *lp_out, int64_t ld_out, int64_t *made, double *first_step_s,
                    int64_t *steps_out, int nthreads);

#endif /* SM_GENERATE_H */
