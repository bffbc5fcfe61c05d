/* sm_index.h - exact nearest-neighbour search over float32 rows kept contiguously in C memory:
 * the store behind smallmind.VectorIndex (cosine, dot product or squared L2 distance).
 *
 * Rows are dim floats each, padded to a multiple of 16 (64-byte aligned), in insertion order;
 * removing a row moves the last row into its place. Every row carries a sequence number (its
 * insertion count), which breaks ties between equal scores: results are a function of the
 * stored rows alone, the same for any thread count or batch of queries (each score is computed
 * by the same operations wherever its row and query fall).
 *
 * Not synchronised: the caller (the Python layer's readers-writer lock) lets many searches run
 * at once but never a search alongside an add, remove or free. */
#ifndef SM_INDEX_H
#define SM_INDEX_H

#include "sm_common.h"

enum { SM_METRIC_COSINE = 0, SM_METRIC_DOT = 1, SM_METRIC_L2 = 2 };

/* How rows are kept. SM_STORE_F32: float32 only. SM_STORE_BF16 / SM_STORE_I8: a compact copy of
 * every row as well - bf16 (round to nearest even) or int8 codes with one float32 scale per row
 * (scale = max|x| / 127, code = round(x / scale)) - that a search reads first (2x / 4x fewer
 * bytes). With `exact`, the float32 rows stay too, and the search is exact (see
 * sm_index_search); without, only the compact rows are kept and scores are theirs. */
enum { SM_STORE_F32 = 0, SM_STORE_BF16 = 1, SM_STORE_I8 = 2 };

typedef struct sm_index sm_index;

/* SM_ERR_ARG for a dim outside [1, 2^24], an unknown metric or storage, or storage F32 with
 * exact == 0. */
int sm_index_create(sm_index **out, int64_t dim, int metric, int storage, int exact);
int sm_index_storage(const sm_index *ix);
int sm_index_exact(const sm_index *ix);
void sm_index_free(sm_index *ix);
int64_t sm_index_size(const sm_index *ix);
int64_t sm_index_dim(const sm_index *ix);
int sm_index_metric(const sm_index *ix);
int64_t sm_index_nbytes(const sm_index *ix);

/* Append rows x (n, dim), row stride ldx. SM_ERR_ARG on a non-finite value, or on a zero row
 * with the cosine metric (nothing is added then); SM_ERR_NOMEM if the store cannot grow. */
int sm_index_add(sm_index *ix, const float *x, int64_t n, int64_t ldx);

/* Remove row r: the last row moves into its place. Returns the row that moved (its old
 * position, n-1), or -1 if r was the last. */
int64_t sm_index_remove(sm_index *ix, int64_t r);

/* Copy row r (dim floats) to out: the float32 row, or the compact row widened (not exact). */
void sm_index_get(const sm_index *ix, int64_t r, float *out);

/* A compact store without float32 rows: row r's codes (dim uint16 bf16 bits or int8 codes) and,
 * for int8, its scale (else 0). */
void sm_index_get_codes(const sm_index *ix, int64_t r, void *codes, float *scale);
/* Append n such rows as they are (a saved index read back: the same codes and scales, so the
 * same scores). SM_ERR_ARG unless the store is compact without float32 rows, or for a
 * non-finite or negative scale, a bf16 code that is not finite, an int8 code of -128. */
int sm_index_add_codes(sm_index *ix, const void *codes, const float *scales, int64_t n);

/* The k best rows for each query q (nq, dim), row stride ldq: rows (nq, k) and scores (nq, k),
 * best first (largest cosine / dot product, smallest squared L2 distance; ties to the earlier
 * inserted row). With fewer than k rows stored the tail of each result is -1 / NaN. Queries
 * must be finite (SM_ERR_ARG), and non-zero for cosine.
 *
 * A compact exact store gives the same rows and scores, bit for bit, as SM_STORE_F32: a first
 * pass scores the compact rows, and bounds each float32 score from them (the compact row's
 * error norm |x - x~| by Cauchy-Schwarz, plus both sums' rounding); every row whose upper bound
 * reaches the k-th best lower bound is scored again from its float32 row, exactly as the
 * float32 store scores it, and the k best of those are the result. Rows outside that set score
 * below k others for certain. */
int sm_index_search(const sm_index *ix, const float *q, int64_t nq, int64_t ldq, int64_t k,
                    int64_t *rows, float *scores, int nthreads);

/* Brute force in double precision with the same ordering rules: the tests' reference. */
int sm_index_search_naive(const sm_index *ix, const float *q, int64_t nq, int64_t ldq, int64_t k,
                          int64_t *rows, float *scores);

#endif /* SM_INDEX_H */
