/* sm_bpe.h - byte-level BPE tokenization (GPT-2 / tiktoken scheme): the pre-tokenizers of GPT-2's
 * and cl100k's regular expressions as hand-written scanners over UTF-8, and the merge loop, for
 * vocabularies given as tiktoken ranks (merge priority = the merged token's rank) or as Hugging
 * Face merges (priority = the merge's line). Pure C, no allocation per call beyond what the caller
 * passes, so encoding runs without the GIL and documents can be encoded in parallel.
 *
 * Text is UTF-8 and must be valid (the Python layer encodes a str); special tokens are split off
 * by the caller. Ids are int32. */
#ifndef SM_BPE_H
#define SM_BPE_H

#include "sm_common.h"

/* The pre-tokenization patterns (the regular expressions they reproduce are in sm_bpe.c). */
#define SM_BPE_PAT_GPT2 0   /* GPT-2, r50k, p50k; Hugging Face's ByteLevel pre-tokenizer */
#define SM_BPE_PAT_CL100K 1 /* cl100k_base (GPT-3.5/4) */
#define SM_BPE_NUM_PATTERNS 2

/* Code-point classes of the patterns: \p{L}, \p{N} and \s (White_Space). */
#define SM_UC_LETTER 1
#define SM_UC_NUMBER 2
#define SM_UC_SPACE 4
int sm_uc_class(uint32_t cp);
const char *sm_unicode_version(void);

/* The end (byte offset) of the pre-token that starts at byte offset `at` < n of text. */
int64_t sm_bpe_pretoken_end(int pattern, const uint8_t *text, int64_t n, int64_t at);

typedef struct sm_bpe sm_bpe;

/* A vocabulary: n tokens, token i's bytes at blob[offsets[i] .. offsets[i+1]) (an empty token
 * - offsets[i] == offsets[i+1] - is a hole: no token has that id). Every single byte must be a
 * token. Merges:
 *   n_merges < 0 (tiktoken ranks): the merge of two adjacent pieces a, b is allowed when the
 *     bytes a+b are a token; its priority is that token's id (rank). Whole pre-tokens that are
 *     tokens are taken as they are (tiktoken does this before merging).
 *   n_merges >= 0 (Hugging Face): merge k joins merge_a[k] and merge_b[k] into the token of
 *     their concatenated bytes, priority k (earlier first); whole_words != 0 takes a pre-token
 *     that is a token as it is (tokenizer.json's "ignore_merges").
 * Returns NULL with *err set (SM_ERR_ARG: a missing byte token, a merge whose pieces or result
 * are not tokens, duplicate token bytes; SM_ERR_NOMEM). */
sm_bpe *sm_bpe_new(int64_t n, const uint8_t *blob, const int64_t *offsets, int64_t n_merges,
                   const int32_t *merge_a, const int32_t *merge_b, int whole_words, int pattern,
                   int *err);
void sm_bpe_free(sm_bpe *b);
int sm_bpe_pattern(const sm_bpe *b);

/* Appends the ids of text[0 .. n) (ordinary text: no special tokens) to out, which has room for
 * cap ids (n ids always suffice: every id covers at least one byte). Returns the number written.
 * Thread-safe: b is only read. */
int64_t sm_bpe_encode(const sm_bpe *b, const uint8_t *text, int64_t n, int32_t *out, int64_t cap);

/* Documents d = 0 .. n_docs-1 at text[starts[d] .. starts[d+1]) encoded into out at
 * out[starts[d] ..] (room for each document's byte count); counts[d] receives each one's id
 * count. Documents are shared among nthreads threads (OpenMP); results do not depend on it. */
void sm_bpe_encode_batch(const sm_bpe *b, const uint8_t *text, const int64_t *starts,
                         int64_t n_docs, int32_t *out, int64_t *counts, int nthreads);

/* The bytes of token `id` (NULL if it is not a token), its length in *len. */
const uint8_t *sm_bpe_token_bytes(const sm_bpe *b, int32_t id, int64_t *len);

#endif /* SM_BPE_H */

/* Learn a byte-level BPE vocabulary from documents d = 0 .. n_docs-1 at text[starts[d] ..
 * starts[d+1]): pre-tokenize with `pattern`, count the distinct pre-tokens, then repeatedly merge
 * the most frequent adjacent pair (ties: the smaller left id, then the smaller right id), counting
 * each pre-token as often as it occurs, until max_merges merges are made or no pair occurs
 * min_count times. Token ids: byte b is id b; merge k makes id 256 + k from merge_a[k] and
 * merge_b[k] (arrays of max_merges). Returns the number of merges, or -1 if out of memory.
 * Deterministic. */
int64_t sm_bpe_train(const uint8_t *text, const int64_t *starts, int64_t n_docs, int pattern,
                     int64_t max_merges, int64_t min_count, int32_t *merge_a, int32_t *merge_b);
