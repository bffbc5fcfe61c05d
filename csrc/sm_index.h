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

typedef struct sm_index sm_index;

int sm_index_create(sm_index **out, int64_t dim, int metric);
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

/* Copy row r (dim floats) to out. */
void sm_index_get(const sm_index *ix, int64_t r, float *out);

/* The k best rows for each query q (nq, dim), row stride ldq: rows (nq, k) and scores (nq, k),
 * best first (largest cosine / dot product, smallest squared L2 distance; ties to the earlier
 * inserted row). With fewer than k rows stored the tail of each result is -1 / NaN. Queries
 * must be finite (SM_ERR_ARG), and non-zero for cosine. */
int sm_index_search(const sm_index *ix, const float *q, int64_t nq, int64_t ldq, int64_t k,
                    int64_t *rows, float *scores, int nthreads);

/* Brute force in double precision with the same ordering rules: the tests' reference. */
int sm_index_search_naive(const sm_index *ix, const float *q, int64_t nq, int64_t ldq, int64_t k,
                          int64_t *rows, float *scores);

#endif /* SM_INDEX_H */
