/* sm_sample.c - next-token sampling in C (see sm_sample.h). The work is O(V) per row for
 * greedy, plain temperature and top-k (a quickselect finds the k-th probability), and
 * O(m log m) for top-p, m being the tokens still in play after top-k (they are sorted by
 * probability to find the nucleus). */
#include "sm_sample.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "sm_hash.h"
#include "sm_pool.h"
#include "sm_runtime.h"

double sm_sample_uniform(uint64_t key, uint64_t counter) {
    uint64_t h = sm_mix64(sm_mix64(key ^ 0xD1B54A32D192ED03ull) + counter * 0x9E3779B97F4A7C15ull);
    return (double)(h >> 11) * (1.0 / 9007199254740992.0);
}

typedef struct {
    double p;
    int id;
} prob_id;

/* descending probability, then ascending id: a total order, so the sort's result is unique */
static int by_prob_desc(const void *a, const void *b) {
    const prob_id *x = (const prob_id *)a, *y = (const prob_id *)b;
    if (x->p != y->p) return x->p > y->p ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);
}

/* The k-th largest of v[0..n-1] (1 <= k <= n), reordering v (Hoare's selection). */
static double kth_largest(double *v, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1, want = k - 1;
    while (lo < hi) {
        const double pivot = v[lo + (hi - lo) / 2];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (v[i] > pivot) i++;
            while (v[j] < pivot) j--;
            if (i <= j) {
                double t = v[i];
                v[i] = v[j];
                v[j] = t;
                i++;
                j--;
            }
        }
        if (want <= j)
            hi = j;
        else if (want >= i)
            lo = i;
        else
            return v[want];
    }
    return v[want];
}

/* One row. p (V doubles) and sel (V prob_id) are scratch. */
static int sample_row(const float *l, int64_t V, float temperature, int64_t top_k, float top_p,
                      double u, double *p, prob_id *sel) {
    int64_t best = 0;
    for (int64_t i = 0; i < V; i++) {
        if (!isfinite(l[i])) return -1;
        if (l[i] > l[best]) best = i;
    }
    if (temperature == 0.0f) return (int)best;
    const double m = l[best], inv_t = 1.0 / (double)temperature;
    for (int64_t i = 0; i < V; i++) p[i] = exp(((double)l[i] - m) * inv_t); /* <= 1, max is 1 */
    if (top_k > 0 && top_k < V) {
        double *tmp = (double *)sel;
        memcpy(tmp, p, (size_t)V * sizeof(double));
        const double kth = kth_largest(tmp, V, top_k);
        for (int64_t i = 0; i < V; i++)
            if (p[i] < kth) p[i] = 0.0;
    }
    if (top_p < 1.0f) {
        int64_t m_kept = 0;
        double total = 0.0;
        for (int64_t i = 0; i < V; i++)
            if (p[i] > 0.0) {
                sel[m_kept].p = p[i];
                sel[m_kept].id = (int)i;
                m_kept++;
                total += p[i];
            }
        qsort(sel, (size_t)m_kept, sizeof(prob_id), by_prob_desc);
        const double need = (double)top_p * total;
        double cum = 0.0;
        int64_t keep = m_kept;
        for (int64_t j = 0; j < m_kept; j++) {
            cum += sel[j].p;
            if (cum >= need) {
                keep = j + 1;
                break;
            }
        }
        for (int64_t j = keep; j < m_kept; j++) p[sel[j].id] = 0.0;
    }
    double total = 0.0;
    for (int64_t i = 0; i < V; i++) total += p[i];
    const double target = u * total;
    double acc = 0.0;
    int64_t last = best;
    for (int64_t i = 0; i < V; i++) {
        if (p[i] <= 0.0) continue;
        acc += p[i];
        last = i;
        if (acc > target) return (int)i;
    }
    return (int)last; /* rounding: u * total at the very top */
}

/* Threads sampling n rows of V on a budget of nthreads (resolved): rows in parallel only when
 * there is enough work to wake a team for. */
static int sample_team(int64_t n, int64_t V, int nthreads) {
    int nt = sm_resolve_threads(nthreads);
    if (nt > n) nt = (int)n;
    if ((int64_t)nt * V < 4096) nt = 1; /* a small vocabulary: not worth waking a team */
    return nt < 1 ? 1 : nt;
}

/* per thread: V doubles of probabilities and V (probability, id) pairs */
static size_t per_thread_bytes(int64_t V) { return (size_t)V * (sizeof(double) + sizeof(prob_id)); }

size_t sm_sample_scratch_bytes(int64_t n, int64_t V, int nthreads) {
    return per_thread_bytes(V) * (size_t)sample_team(n, V, nthreads);
}

int sm_sample_rows_scratch(int *out, const float *logits, int64_t ld, int64_t n, int64_t V,
                           const float *temperature, const int64_t *top_k, const float *top_p,
                           const uint64_t *key, const uint64_t *counter, int nthreads,
                           void *scratch) {
    if (n <= 0) return SM_OK;
    const int nt = sample_team(n, V, nthreads);
    const size_t per = per_thread_bytes(V);
    SM_PARALLEL(nt) {
        const int tid = SM_THREAD_ID(), nth = SM_THREAD_COUNT();
        double *p = (double *)((char *)scratch + per * (size_t)tid);
        prob_id *sel = (prob_id *)(p + V);
        int64_t r0, r1;
        sm_split_range(n, 1, nth, tid, &r0, &r1);
        for (int64_t r = r0; r < r1; r++) {
            const double u = temperature[r] == 0.0f ? 0.0 : sm_sample_uniform(key[r], counter[r]);
            out[r] = sample_row(logits + r * ld, V, temperature[r], top_k[r], top_p[r], u, p, sel);
        }
    }
    return SM_OK;
}

int sm_sample_rows(int *out, const float *logits, int64_t ld, int64_t n, int64_t V,
                   const float *temperature, const int64_t *top_k, const float *top_p,
                   const uint64_t *key, const uint64_t *counter, int nthreads) {
    if (n <= 0) return SM_OK;
    void *scratch = sm_pool_rent(sm_pool_default(), sm_sample_scratch_bytes(n, V, nthreads));
    if (!scratch) return SM_ERR_NOMEM;
    int rc = sm_sample_rows_scratch(out, logits, ld, n, V, temperature, top_k, top_p, key,
                                    counter, nthreads, scratch);
    sm_pool_return(scratch);
    return rc;
}
