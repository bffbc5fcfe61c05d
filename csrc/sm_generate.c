/* sm_generate.c - the generation loop in C (see sm_generate.h): sample, feed back, repeat, with
 * no Python between tokens. Per step it costs one sm_sample_rows and one sm_gpt_decode_seqs for
 * all running rows, plus a prefill for each row whose window moves. */
#include "sm_generate.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "sm_pool.h"
#include "sm_runtime.h"
#include "sm_sample.h"
#include "sm_sync.h"

/* Whether the row's logits are adjusted before sampling: a bias, or penalties once a token has
 * been generated (before that every count is 0 and the adjustment is the identity). */
static int adjusted(const sm_gen_row *r) {
    return r->bias != NULL || (r->counts != NULL && r->generated > 0);
}

/* The adjusted logit of token i in double: logit + bias - (frequency * count + presence *
 * [count > 0]), the operations in this order (the serving engine's numpy code did the same, so
 * the float32 values sampled from are the ones it sampled from). */
static double adjusted_logit(const sm_gen_row *r, int64_t i) {
    double z = (double)r->logits[i];
    if (r->bias) z += r->bias[i];
    if (r->counts && r->generated > 0) {
        const double n = (double)r->counts[i];
        z -= r->frequency_penalty * n + r->presence_penalty * (r->counts[i] > 0 ? 1.0 : 0.0);
    }
    return z;
}

/* Log-probabilities of the adjusted logits: the chosen token's and the n best (most likely
 * first, ties by lower id). log softmax(z)_i = z_i - (max + log sum exp(z - max)). */
static void log_probs(sm_gen_logprob *lp, const sm_gen_row *r, int64_t nv, int chosen) {
    double m = -INFINITY;
    for (int64_t i = 0; i < nv; i++) {
        const double z = adjusted_logit(r, i);
        if (z > m) m = z;
    }
    double s = 0.0;
    for (int64_t i = 0; i < nv; i++) s += exp(adjusted_logit(r, i) - m);
    const double lse = m + log(s);
    lp->logprob = adjusted_logit(r, chosen) - lse;
    int n = r->logprobs < nv ? r->logprobs : (int)nv;
    if (n > SM_GEN_MAX_TOP) n = SM_GEN_MAX_TOP;
    int have = 0;
    for (int64_t i = 0; i < nv && n > 0; i++) {
        const double v = adjusted_logit(r, i) - lse;
        if (have == n && !(v > lp->top_logprob[n - 1])) continue;
        int j = have < n ? have++ : n - 1; /* insert after every entry >= v (lower ids first) */
        while (j > 0 && v > lp->top_logprob[j - 1]) {
            lp->top_logprob[j] = lp->top_logprob[j - 1];
            lp->top_id[j] = lp->top_id[j - 1];
            j--;
        }
        lp->top_logprob[j] = v;
        lp->top_id[j] = (int)i;
    }
    lp->n = have;
}

/* Rows name distinct sequences of the cache (a byte per sequence marks the ones seen: the
 * server's batch can be thousands of rows, called every few ms), and a running row's state
 * matches its cache sequence. */
static int check_rows(const sm_gpt_cache *c, const sm_gpt_config *cfg, const sm_gen_row *rows,
                      int64_t n_rows) {
    const int64_t B = sm_gpt_cache_B(c), T = cfg->block_size;
    if (n_rows > B) return SM_ERR_ARG;
    unsigned char *seen = (unsigned char *)calloc((size_t)B, 1);
    if (!seen) return SM_ERR_NOMEM;
    int rc = SM_OK;
    for (int64_t r = 0; r < n_rows && rc == SM_OK; r++) {
        const sm_gen_row *w = &rows[r];
        if (w->seq < 0 || w->seq >= B || seen[w->seq] || !w->window || !w->logits) {
            rc = SM_ERR_ARG;
            break;
        }
        seen[w->seq] = 1;
        if (w->remaining <= 0 || w->failed) continue;
        if (w->held < 1 || w->held > T || sm_gpt_cache_length(c, w->seq) != w->held ||
            w->logprobs > SM_GEN_MAX_TOP || w->top_k < 0 || !(w->temperature >= 0.0f) ||
            ((w->presence_penalty != 0.0 || w->frequency_penalty != 0.0) && !w->counts))
            rc = SM_ERR_ARG;
    }
    free(seen);
    return rc;
}

int sm_gpt_generate(sm_gpt_cache *c, const float *params, const sm_gpt_config *cfg,
                    sm_gen_row *rows, int64_t n_rows, int64_t nv, int64_t keep,
                    int64_t max_steps, double max_seconds, volatile int64_t *interrupt, int *out,
                    sm_gen_logprob *lp_out, int64_t ld_out, int64_t *made, double *first_step_s,
                    int64_t *steps_out, int nthreads) {
    if (steps_out) *steps_out = 0;
    if (first_step_s) *first_step_s = 0.0;
    const int64_t V = cfg->vocab_size, T = cfg->block_size;
    if (!c || !params || !rows || !out || !made || n_rows < 1 || nv < 1 || nv > V || keep < 1 ||
        keep > T || max_steps < 0 || ld_out < max_steps || sm_gpt_cache_capacity(c) < T)
        return SM_ERR_ARG;
    nthreads = sm_resolve_threads(nthreads); /* once: the decode scratch is sized for it */
    int rc = check_rows(c, cfg, rows, n_rows);
    if (rc != SM_OK) return rc;
    for (int64_t r = 0; r < n_rows; r++) made[r] = 0;
    if (max_steps == 0) return SM_OK;

    /* scratch: the sampled matrix (n, nv), decode logits (n, V), and the per-row vectors, each
     * starting on a cache line (64-bit ones need 8-byte alignment whatever n, nv and V are) */
    const size_t n = (size_t)n_rows;
    const size_t sizes[] = {n * (size_t)nv * sizeof(float), n * (size_t)V * sizeof(float),
                            n * sizeof(float), n * sizeof(float), n * sizeof(int64_t),
                            n * sizeof(uint64_t), n * sizeof(uint64_t), n * sizeof(int),
                            n * sizeof(int), n * sizeof(int), n * sizeof(int), n * sizeof(int),
                            /* the sampler's and the decode's own scratch, rented once per call
                             * instead of once per step (the pool's lock, shared by every thread,
                             * would be taken four times per token) */
                            sm_sample_scratch_bytes(n_rows, nv, 1),
                            (size_t)sm_gpt_decode_scratch_floats(cfg, n_rows, nthreads) * sizeof(float)};
    enum { NPARTS = sizeof(sizes) / sizeof(sizes[0]) };
    size_t offs[NPARTS], bytes = 0;
    for (int i = 0; i < NPARTS; i++) {
        offs[i] = bytes;
        bytes += (sizes[i] + SM_ALIGN - 1) / SM_ALIGN * SM_ALIGN;
    }
    char *scratch = (char *)sm_pool_rent(sm_pool_default(), bytes);
    if (!scratch) return SM_ERR_NOMEM;
    float *z = (float *)(scratch + offs[0]), *dec = (float *)(scratch + offs[1]);
    float *temp = (float *)(scratch + offs[2]), *topp = (float *)(scratch + offs[3]);
    int64_t *topk = (int64_t *)(scratch + offs[4]);
    uint64_t *key = (uint64_t *)(scratch + offs[5]), *counter = (uint64_t *)(scratch + offs[6]);
    int *pick = (int *)(scratch + offs[7]), *act = (int *)(scratch + offs[8]);
    int *dseq = (int *)(scratch + offs[9]), *dtok = (int *)(scratch + offs[10]);
    int *drow = (int *)(scratch + offs[11]);
    void *sample_scratch = scratch + offs[12];
    float *decode_scratch = (float *)(scratch + offs[13]);

    const double t0 = sm_now_seconds();
    int64_t step = 0;
    rc = SM_OK;
    while (step < max_steps) {
        /* 1. the running rows' logits, adjusted, into one matrix; their sampler settings */
        int na = 0;
        for (int64_t r = 0; r < n_rows; r++) {
            sm_gen_row *w = &rows[r];
            if (w->remaining <= 0 || w->failed) continue;
            float *zr = z + (size_t)na * (size_t)nv;
            if (adjusted(w))
                for (int64_t i = 0; i < nv; i++) zr[i] = (float)adjusted_logit(w, i);
            else
                memcpy(zr, w->logits, (size_t)nv * sizeof(float));
            temp[na] = w->temperature;
            topk[na] = w->top_k;
            topp[na] = w->top_p;
            key[na] = w->key;
            counter[na] = w->generated;
            act[na++] = (int)r;
        }
        if (na == 0) break;
        rc = sm_sample_rows_scratch(pick, z, nv, na, nv, temp, topk, topp, key, counter, 1,
                                    sample_scratch);
        if (rc != SM_OK) break;

        /* 2. record each row's token; collect the rows to decode, prefill the moving ones */
        int nd = 0;
        for (int a = 0; a < na && rc == SM_OK; a++) {
            sm_gen_row *w = &rows[act[a]];
            const int tok = pick[a];
            if (tok < 0) {
                w->failed = 1;
                continue;
            }
            const int64_t k = made[act[a]]++;
            out[act[a] * ld_out + k] = tok;
            if (lp_out && w->logprobs >= 0) log_probs(&lp_out[act[a] * ld_out + k], w, nv, tok);
            if (w->counts) w->counts[tok]++;
            w->generated++;
            if (tok == w->stop_token) w->remaining = 0; /* end of text: recorded, not fed */
            if (w->remaining == 0 || --w->remaining == 0) continue; /* done: nothing to feed */
            if (w->held < T) {
                w->window[w->held++] = tok;
                dseq[nd] = (int)w->seq;
                dtok[nd] = tok;
                drow[nd++] = act[a];
            } else { /* full: the last `keep` tokens again, positions from 0 */
                w->window[T] = tok;
                memmove(w->window, w->window + T + 1 - keep, (size_t)keep * sizeof(int));
                w->held = keep;
                rc = sm_gpt_prefill_seq(dec, c, params, cfg, w->seq, 1, w->window, keep,
                                        nthreads);
                if (rc == SM_OK) memcpy(w->logits, dec, (size_t)nv * sizeof(float));
            }
        }
        if (rc != SM_OK) break;

        /* 3. one decode call for the rows that continue */
        if (nd > 0) {
            rc = sm_gpt_decode_seqs_scratch(dec, c, params, cfg, dseq, nd, dtok, nthreads,
                                            decode_scratch);
            if (rc != SM_OK) break;
            for (int d = 0; d < nd; d++)
                memcpy(rows[drow[d]].logits, dec + (size_t)d * (size_t)V, (size_t)nv * sizeof(float));
        }
        step++;
        if (step == 1 && first_step_s) *first_step_s = sm_now_seconds() - t0;
        if (interrupt && sm_atomic_load_i64(interrupt)) break;
        if (max_seconds > 0.0 && sm_now_seconds() - t0 >= max_seconds) break;
    }
    if (steps_out) *steps_out = step;
    sm_pool_return(scratch);
    return rc;
}
