/* sm_index.c - the VectorIndex store and its exact top-k search (see sm_index.h).
 *
 * Search: threads split the stored rows into contiguous ranges; each walks its range in chunks
 * that stay in L2 and, for every group of up to 4 queries, computes the chunk's dot products
 * with the matrix-vector "dots" kernel of sm_gemm.c (one stored row read front to back against
 * all queries of the group), then offers each score to that query's top-k heap. The per-thread
 * heaps are merged at the end under a total order (score, then insertion sequence), so the
 * result does not depend on how rows were split between threads. A query's scores are the same
 * bits alone or in a batch: the dots kernel does the same operations for every group size. */
#include "sm_index.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "sm_gemm.h"
#include "sm_pool.h"
#include "sm_runtime.h"

struct sm_index {
    int64_t dim, ld;   /* floats per row, and per row slot (dim rounded up to 16) */
    int64_t n, cap;    /* rows stored, slots allocated */
    int metric;
    float *data;       /* (cap, ld) */
    float *aux;        /* (cap): 1/|x| (cosine), |x|^2 (l2), unused (dot) */
    int64_t *seq;      /* (cap): insertion sequence numbers */
    int64_t next_seq;
};

#define CHUNK_ROWS_BYTES (256 * 1024) /* stored rows scored per pass: stay in L2 for the groups */
#define QGROUP 4                      /* queries per pass over a chunk */

int sm_index_create(sm_index **out, int64_t dim, int metric) {
    *out = NULL;
    if (dim < 1 || dim > ((int64_t)1 << 24) || metric < SM_METRIC_COSINE || metric > SM_METRIC_L2)
        return SM_ERR_ARG;
    sm_index *ix = (sm_index *)calloc(1, sizeof(sm_index));
    if (!ix) return SM_ERR_NOMEM;
    ix->dim = dim;
    ix->ld = (dim + 15) / 16 * 16;
    ix->metric = metric;
    *out = ix;
    return SM_OK;
}

void sm_index_free(sm_index *ix) {
    if (!ix) return;
    sm_aligned_free(ix->data);
    free(ix->aux);
    free(ix->seq);
    free(ix);
}

int64_t sm_index_size(const sm_index *ix) { return ix->n; }
int64_t sm_index_dim(const sm_index *ix) { return ix->dim; }
int sm_index_metric(const sm_index *ix) { return ix->metric; }
int64_t sm_index_nbytes(const sm_index *ix) {
    return ix->cap * (ix->ld * (int64_t)sizeof(float) + (int64_t)sizeof(float) +
                      (int64_t)sizeof(int64_t));
}

static int grow(sm_index *ix, int64_t need) {
    if (need <= ix->cap) return SM_OK;
    int64_t cap = ix->cap ? ix->cap : 64;
    while (cap < need) cap *= 2;
    if (cap > ((int64_t)1 << 40) / ix->ld) return SM_ERR_NOMEM;
    float *data = (float *)sm_big_alloc((size_t)(cap * ix->ld) * sizeof(float));
    float *aux = (float *)malloc((size_t)cap * sizeof(float));
    int64_t *seq = (int64_t *)malloc((size_t)cap * sizeof(int64_t));
    if (!data || !aux || !seq) {
        sm_aligned_free(data);
        free(aux);
        free(seq);
        return SM_ERR_NOMEM;
    }
    if (ix->n) {
        memcpy(data, ix->data, (size_t)(ix->n * ix->ld) * sizeof(float));
        memcpy(aux, ix->aux, (size_t)ix->n * sizeof(float));
        memcpy(seq, ix->seq, (size_t)ix->n * sizeof(int64_t));
    }
    sm_aligned_free(ix->data);
    free(ix->aux);
    free(ix->seq);
    ix->data = data;
    ix->aux = aux;
    ix->seq = seq;
    ix->cap = cap;
    return SM_OK;
}

static double sumsq(const float *x, int64_t dim) {
    double s = 0.0;
    for (int64_t d = 0; d < dim; d++) s += (double)x[d] * x[d];
    return s;
}

int sm_index_add(sm_index *ix, const float *x, int64_t n, int64_t ldx) {
    if (n < 0 || (n > 0 && !x) || ldx < ix->dim) return SM_ERR_ARG;
    for (int64_t i = 0; i < n; i++) { /* validate everything before changing anything */
        const float *r = x + i * ldx;
        for (int64_t d = 0; d < ix->dim; d++)
            if (!isfinite(r[d])) return SM_ERR_ARG;
        if (ix->metric == SM_METRIC_COSINE && sumsq(r, ix->dim) == 0.0) return SM_ERR_ARG;
    }
    int rc = grow(ix, ix->n + n);
    if (rc != SM_OK) return rc;
    for (int64_t i = 0; i < n; i++) {
        const int64_t r = ix->n + i;
        float *dst = ix->data + r * ix->ld;
        memcpy(dst, x + i * ldx, (size_t)ix->dim * sizeof(float));
        memset(dst + ix->dim, 0, (size_t)(ix->ld - ix->dim) * sizeof(float));
        const double ss = sumsq(dst, ix->dim);
        ix->aux[r] = ix->metric == SM_METRIC_COSINE ? (float)(1.0 / sqrt(ss)) : (float)ss;
        ix->seq[r] = ix->next_seq++;
    }
    ix->n += n;
    return SM_OK;
}

int64_t sm_index_remove(sm_index *ix, int64_t r) {
    if (r < 0 || r >= ix->n) return -1;
    const int64_t last = ix->n - 1;
    ix->n--;
    if (r == last) return -1;
    memcpy(ix->data + r * ix->ld, ix->data + last * ix->ld, (size_t)ix->ld * sizeof(float));
    ix->aux[r] = ix->aux[last];
    ix->seq[r] = ix->seq[last];
    return last;
}

void sm_index_get(const sm_index *ix, int64_t r, float *out) {
    memcpy(out, ix->data + r * ix->ld, (size_t)ix->dim * sizeof(float));
}

/* ---- top-k -------------------------------------------------------------------------------- */

typedef struct {
    float key;   /* larger is better: the score, or minus the squared distance */
    int64_t seq; /* ties: the earlier inserted row is better */
    int64_t row;
} cand;

static int better(const cand *a, const cand *b) {
    return a->key > b->key || (a->key == b->key && a->seq < b->seq);
}

/* A heap of the k best candidates seen, the worst at h[0]; `len` grows to k. */
static void heap_offer(cand *h, int64_t *len, int64_t k, cand c) {
    int64_t i;
    if (*len < k) { /* sift up */
        i = (*len)++;
        while (i > 0) {
            int64_t p = (i - 1) / 2;
            if (!better(&h[p], &c)) break;
            h[i] = h[p];
            i = p;
        }
        h[i] = c;
        return;
    }
    if (!better(&c, &h[0])) return;
    i = 0; /* replace the worst, sift down */
    for (;;) {
        int64_t l = 2 * i + 1, w = i;
        const cand *cw = &c;
        if (l < k && better(cw, &h[l])) w = l, cw = &h[l];
        if (l + 1 < k && better(cw, &h[l + 1])) w = l + 1;
        if (w == i) break;
        h[i] = h[w];
        i = w;
    }
    h[i] = c;
}

static int cmp_better_first(const void *a, const void *b) {
    const cand *x = (const cand *)a, *y = (const cand *)b;
    if (better(x, y)) return -1;
    if (better(y, x)) return 1;
    return 0;
}

/* The score of a stored row for a query, as a "larger is better" key. */
static float key_of(const sm_index *ix, float dot, float qaux, int64_t r) {
    switch (ix->metric) {
    case SM_METRIC_COSINE: return dot * qaux * ix->aux[r];
    case SM_METRIC_DOT: return dot;
    default: {
        float d2 = qaux - 2.0f * dot + ix->aux[r];
        return -(d2 > 0.0f ? d2 : 0.0f);
    }
    }
}

static int check_queries(const sm_index *ix, const float *q, int64_t nq, int64_t ldq, float *qaux) {
    for (int64_t i = 0; i < nq; i++) {
        const float *r = q + i * ldq;
        for (int64_t d = 0; d < ix->dim; d++)
            if (!isfinite(r[d])) return SM_ERR_ARG;
        const double ss = sumsq(r, ix->dim);
        if (ix->metric == SM_METRIC_COSINE) {
            if (ss == 0.0) return SM_ERR_ARG;
            qaux[i] = (float)(1.0 / sqrt(ss));
        } else {
            qaux[i] = (float)ss;
        }
    }
    return SM_OK;
}

static void write_results(const sm_index *ix, cand *c, int64_t m, int64_t k, int64_t *rows,
                          float *scores) {
    qsort(c, (size_t)m, sizeof(cand), cmp_better_first);
    for (int64_t j = 0; j < k; j++) {
        if (j < m) {
            rows[j] = c[j].row;
            scores[j] = ix->metric == SM_METRIC_L2 ? -c[j].key : c[j].key;
        } else {
            rows[j] = -1;
            scores[j] = NAN;
        }
    }
}

int sm_index_search(const sm_index *ix, const float *q, int64_t nq, int64_t ldq, int64_t k,
                    int64_t *rows, float *scores, int nthreads) {
    if (nq < 0 || k < 1 || ldq < ix->dim || (nq > 0 && (!q || !rows || !scores)))
        return SM_ERR_ARG;
    if (nq == 0) return SM_OK;
    const int64_t n = ix->n, kk = k < n ? k : n, dim = ix->dim;
    float *qaux = (float *)malloc((size_t)nq * sizeof(float));
    if (!qaux) return SM_ERR_NOMEM;
    int rc = check_queries(ix, q, nq, ldq, qaux);
    if (rc != SM_OK || kk == 0) {
        if (rc == SM_OK)
            for (int64_t i = 0; i < nq * k; i++) rows[i] = -1, scores[i] = NAN;
        free(qaux);
        return rc;
    }
    /* threads: a share of at least ~64K multiply-adds each, and of whole 64-row blocks */
    int nt = sm_resolve_threads(nthreads);
    const int64_t work = n * dim * nq;
    if (nt > work / 65536 + 1) nt = (int)(work / 65536 + 1);
    if (nt > (n + 63) / 64) nt = (int)((n + 63) / 64);
    if (nt < 1) nt = 1;
    int64_t chunk = CHUNK_ROWS_BYTES / (ix->ld * (int64_t)sizeof(float));
    chunk = chunk < 64 ? 64 : chunk / 64 * 64;
    /* per thread: a heap per query, its length, and the scores of a query group over a chunk */
    const int64_t per = nq * kk;
    cand *heaps = (cand *)malloc((size_t)(nt * per) * sizeof(cand));
    int64_t *lens = (int64_t *)calloc((size_t)(nt * nq), sizeof(int64_t));
    float *sc = (float *)sm_pool_rent(sm_pool_default(), (size_t)(nt * QGROUP * chunk) * sizeof(float));
    if (!heaps || !lens || !sc) {
        free(heaps);
        free(lens);
        sm_pool_return(sc);
        free(qaux);
        return SM_ERR_NOMEM;
    }
    SM_PARALLEL(nt) {
        const int tid = SM_THREAD_ID();
        int64_t r0, r1;
        sm_split_range(n, 64, SM_THREAD_COUNT(), tid, &r0, &r1);
        cand *h = heaps + tid * per;
        int64_t *len = lens + tid * nq;
        float *s = sc + tid * QGROUP * chunk;
        for (int64_t c0 = r0; c0 < r1; c0 += chunk) {
            const int64_t cn = r1 - c0 < chunk ? r1 - c0 : chunk;
            for (int64_t g = 0; g < nq; g += QGROUP) {
                const int64_t m = nq - g < QGROUP ? nq - g : QGROUP;
                sm_gemv_cols(1, m, cn, dim, q + g * ldq, ldq, ix->data + c0 * ix->ld, ix->ld, s,
                             chunk, 0, cn, NULL);
                for (int64_t i = 0; i < m; i++) {
                    cand *hq = h + (g + i) * kk;
                    int64_t *lq = len + g + i;
                    const float *si = s + i * chunk;
                    for (int64_t j = 0; j < cn; j++) {
                        const int64_t r = c0 + j;
                        float key = key_of(ix, si[j], qaux[g + i], r);
                        if (key != key) key = -INFINITY; /* overflowed: never better than a number */
                        if (*lq == kk && key < hq[0].key) continue; /* the common case: rejected */
                        cand cd = {key, ix->seq[r], r};
                        heap_offer(hq, lq, kk, cd);
                    }
                }
            }
        }
    }
    /* merge: each query's candidates from every thread, best first under the total order */
    cand *all = (cand *)malloc((size_t)(nt * kk) * sizeof(cand));
    if (!all) rc = SM_ERR_NOMEM;
    for (int64_t i = 0; i < nq && rc == SM_OK; i++) {
        int64_t m = 0;
        for (int t = 0; t < nt; t++) {
            memcpy(all + m, heaps + t * per + i * kk, (size_t)lens[t * nq + i] * sizeof(cand));
            m += lens[t * nq + i];
        }
        write_results(ix, all, m, k, rows + i * k, scores + i * k);
    }
    free(all);
    free(heaps);
    free(lens);
    sm_pool_return(sc);
    free(qaux);
    return rc;
}

int sm_index_search_naive(const sm_index *ix, const float *q, int64_t nq, int64_t ldq, int64_t k,
                          int64_t *rows, float *scores) {
    if (nq < 0 || k < 1 || ldq < ix->dim) return SM_ERR_ARG;
    const int64_t n = ix->n, dim = ix->dim;
    cand *all = (cand *)malloc((size_t)(n > 0 ? n : 1) * sizeof(cand));
    if (!all) return SM_ERR_NOMEM;
    for (int64_t i = 0; i < nq; i++) {
        const float *qi = q + i * ldq;
        const double qq = sumsq(qi, dim);
        for (int64_t r = 0; r < n; r++) {
            const float *x = ix->data + r * ix->ld;
            double dot = 0.0, d2 = 0.0;
            for (int64_t d = 0; d < dim; d++) {
                dot += (double)qi[d] * x[d];
                d2 += ((double)qi[d] - x[d]) * ((double)qi[d] - x[d]);
            }
            double key = ix->metric == SM_METRIC_COSINE ? dot / sqrt(qq * sumsq(x, dim))
                         : ix->metric == SM_METRIC_DOT  ? dot
                                                        : -d2;
            all[r].key = (float)key;
            all[r].seq = ix->seq[r];
            all[r].row = r;
        }
        write_results(ix, all, n, k, rows + i * k, scores + i * k);
    }
    free(all);
    return SM_OK;
}
