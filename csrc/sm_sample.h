/* sm_sample.h - choosing next tokens from logits in C: greedy, temperature, top-k and top-p
 * (nucleus) sampling, one row per sequence, with a counter-based random draw so that a seeded
 * stream is the same whatever the batch it is decoded in or the thread count. */
#ifndef SM_SAMPLE_H
#define SM_SAMPLE_H

#include "sm_common.h"

/* The uniform draw in [0, 1) (53 random bits) number `counter` of the stream `key`: a pure
 * function of the two (sm_hash.h's mixer), so draw t of a stream needs no state. */
double sm_sample_uniform(uint64_t key, uint64_t counter);

/* For each row r < n of logits (row stride ld; the first V entries are the vocabulary):
 *   temperature[r] == 0: the argmax (the first of equal maxima);
 *   else a draw from softmax(logits / temperature) restricted to the top_k[r] most likely
 *   tokens (0: all; ties with the k-th are kept) and then to the smallest set of most likely
 *   tokens whose probability reaches top_p[r] (in (0, 1]; ties broken by lower id first),
 *   using the uniform draw sm_sample_uniform(key[r], counter[r]): the kept tokens in id order
 *   cover [0, 1) in proportion to their probabilities.
 * out[r] is the token id, or -1 when the row holds NaN or an infinity (no token can be
 * chosen). Returns SM_OK or SM_ERR_NOMEM (scratch). Rows run in parallel over nthreads; each
 * row's result depends on its own inputs only. */
int sm_sample_rows(int *out, const float *logits, int64_t ld, int64_t n, int64_t V,
                   const float *temperature, const int64_t *top_k, const float *top_p,
                   const uint64_t *key, const uint64_t *counter, int nthreads);

/* The same with the scratch given by the caller, sm_sample_scratch_bytes(n, V, nthreads)
 * bytes, 8-byte aligned (a generation loop rents it once for many steps). */
size_t sm_sample_scratch_bytes(int64_t n, int64_t V, int nthreads);
int sm_sample_rows_scratch(int *out, const float *logits, int64_t ld, int64_t n, int64_t V,
                           const float *temperature, const int64_t *top_k, const float *top_p,
                           const uint64_t *key, const uint64_t *counter, int nthreads,
                           void *scratch);

#endif /* SM_SAMPLE_H */
