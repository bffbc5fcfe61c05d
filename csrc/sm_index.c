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
#include "sm_quant.h"
#include "sm_runtime.h"

struct sm_index {
    int64_t dim, ld;   /* floats per row, and per row slot (dim rounded up to 16) */
    int64_t n, cap;    /* rows stored, slots allocated */
    int metric, storage, exact;
    float *data;       /* (cap, ld) float32 rows; NULL for a compact store that is not exact */
    float *aux;        /* (cap): 1/|x| (cosine), |x|^2 (l2), unused (dot); of the compact row
                        * when there are no float32 rows */
    int64_t *seq;      /* (cap): insertion sequence numbers */
    int64_t next_seq;
    /* compact stores */
    void *codes;       /* (cap, ld) uint16 bf16 bits or int8 codes, zero past dim */
    float *scale;      /* (cap) int8 scale per row */
    float *rb;         /* (cap) exact stores: |x - x~| + gamma (|x| + |x~|), rounded up: the bound
                        * of the two computed dot products' difference is |q| * rb */
};

#define CHUNK_ROWS_BYTES (256 * 1024) /* stored rows scored per pass: stay in L2 for the groups */
#define QGROUP 4                      /* queries per pass over a chunk */
#define PF_BYTES 4096                 /* compact scan: software prefetch distance */

int sm_index_create(sm_index **out, int64_t dim, int metric, int storage, int exact) {
    *out = NULL;
    if (dim < 1 || dim > ((int64_t)1 << 24) || metric < SM_METRIC_COSINE || metric > SM_METRIC_L2 ||
        storage < SM_STORE_F32 || storage > SM_STORE_I8 || (storage == SM_STORE_F32 && !exact))
        return SM_ERR_ARG;
    sm_index *ix = (sm_index *)calloc(1, sizeof(sm_index));
    if (!ix) return SM_ERR_NOMEM;
    ix->dim = dim;
    ix->ld = (dim + 15) / 16 * 16;
    ix->metric = metric;
    ix->storage = storage;
    ix->exact = exact != 0;
    *out = ix;
    return SM_OK;
}

void sm_index_free(sm_index *ix) {
    if (!ix) return;
    sm_aligned_free(ix->data);
    sm_aligned_free(ix->codes);
    free(ix->aux);
    free(ix->seq);
    free(ix->scale);
    free(ix->rb);
    free(ix);
}

int sm_index_storage(const sm_index *ix) { return ix->storage; }
int sm_index_exact(const sm_index *ix) { return ix->exact; }

static int has_f32(const sm_index *ix) { return ix->storage == SM_STORE_F32 || ix->exact; }
/* bytes of one compact row slot */
static int64_t code_bytes(const sm_index *ix) {
    return ix->storage == SM_STORE_BF16 ? 2 * ix->ld : ix->storage == SM_STORE_I8 ? ix->ld : 0;
}

int64_t sm_index_size(const sm_index *ix) { return ix->n; }
int64_t sm_index_dim(const sm_index *ix) { return ix->dim; }
int sm_index_metric(const sm_index *ix) { return ix->metric; }
int64_t sm_index_nbytes(const sm_index *ix) {
    const int64_t per = (has_f32(ix) ? ix->ld * (int64_t)sizeof(float) : 0) + code_bytes(ix) +
                        (int64_t)sizeof(float) + (int64_t)sizeof(int64_t) +
                        (ix->storage == SM_STORE_I8 ? (int64_t)sizeof(float) : 0) +
                        (ix->storage != SM_STORE_F32 && ix->exact ? (int64_t)sizeof(float) : 0);
    return ix->cap * per;
}

static int grow(sm_index *ix, int64_t need) {
    if (need <= ix->cap) return SM_OK;
    int64_t cap = ix->cap ? ix->cap : 64;
    while (cap < need) cap *= 2;
    if (cap > ((int64_t)1 << 40) / ix->ld) return SM_ERR_NOMEM;
    const int f32 = has_f32(ix), i8 = ix->storage == SM_STORE_I8;
    const int bound = ix->storage != SM_STORE_F32 && ix->exact;
    const int64_t cb = code_bytes(ix);
    float *data = f32 ? (float *)sm_big_alloc((size_t)(cap * ix->ld) * sizeof(float)) : NULL;
    void *codes = cb ? sm_big_alloc((size_t)(cap * cb)) : NULL;
    float *aux = (float *)malloc((size_t)cap * sizeof(float));
    int64_t *seq = (int64_t *)malloc((size_t)cap * sizeof(int64_t));
    float *scale = i8 ? (float *)malloc((size_t)cap * sizeof(float)) : NULL;
    float *rb = bound ? (float *)malloc((size_t)cap * sizeof(float)) : NULL;
    if ((f32 && !data) || (cb && !codes) || !aux || !seq || (i8 && !scale) || (bound && !rb)) {
        sm_aligned_free(data);
        sm_aligned_free(codes);
        free(aux);
        free(seq);
        free(scale);
        free(rb);
        return SM_ERR_NOMEM;
    }
    if (ix->n) {
        if (f32) memcpy(data, ix->data, (size_t)(ix->n * ix->ld) * sizeof(float));
        if (cb) memcpy(codes, ix->codes, (size_t)(ix->n * cb));
        memcpy(aux, ix->aux, (size_t)ix->n * sizeof(float));
        memcpy(seq, ix->seq, (size_t)ix->n * sizeof(int64_t));
        if (i8) memcpy(scale, ix->scale, (size_t)ix->n * sizeof(float));
        if (bound) memcpy(rb, ix->rb, (size_t)ix->n * sizeof(float));
    }
    sm_aligned_free(ix->data);
    sm_aligned_free(ix->codes);
    free(ix->aux);
    free(ix->seq);
    free(ix->scale);
    free(ix->rb);
    ix->data = data;
    ix->codes = codes;
    ix->aux = aux;
    ix->seq = seq;
    ix->scale = scale;
    ix->rb = rb;
    ix->cap = cap;
    return SM_OK;
}

/* ---- compact rows ------------------------------------------------------------------------- */

/* Element d of row r's compact copy, as the search reads it (int8: code times scale). */
static double compact_at(const sm_index *ix, int64_t r, int64_t d) {
    if (ix->storage == SM_STORE_BF16) return sm_bf16_widen(((const uint16_t *)ix->codes)[r * ix->ld + d]);
    return (double)ix->scale[r] * ((const int8_t *)ix->codes)[r * ix->ld + d];
}

/* Row r's compact copy from x (dim floats); its slot's padding is zeroed. */
static void encode_row(sm_index *ix, int64_t r, const float *x) {
    const int64_t dim = ix->dim, ld = ix->ld;
    if (ix->storage == SM_STORE_BF16) {
        uint16_t *c = (uint16_t *)ix->codes + r * ld;
        for (int64_t d = 0; d < dim; d++) c[d] = sm_bf16_round(x[d]);
        memset(c + dim, 0, (size_t)(ld - dim) * 2);
        return;
    }
    int8_t *c = (int8_t *)ix->codes + r * ld;
    float amax = 0.0f;
    for (int64_t d = 0; d < dim; d++) amax = fabsf(x[d]) > amax ? fabsf(x[d]) : amax;
    const float s = amax / 127.0f;
    ix->scale[r] = s;
    for (int64_t d = 0; d < dim; d++) {
        float v = s > 0.0f ? nearbyintf(x[d] / s) : 0.0f;
        c[d] = (int8_t)(v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v);
    }
    memset(c + dim, 0, (size_t)(ld - dim));
}

/* Unit roundoff of float32 and gamma_m = m u / (1 - m u), the classic bound on the relative
 * error of a sum of m products in float32 whatever the order of the additions. */
#define F32_U (1.0 / 16777216.0)
static double gamma_m(int64_t m) { return (double)m * F32_U / (1.0 - (double)m * F32_U); }

/* rb for row r (float32 row x): |x - x~| + gamma_{dim+1} (|x| + |x~|), computed in double and
 * rounded up to a float. */
static void bound_row(sm_index *ix, int64_t r, const float *x) {
    double e2 = 0.0, xx = 0.0, cc = 0.0;
    for (int64_t d = 0; d < ix->dim; d++) {
        const double c = compact_at(ix, r, d), e = (double)x[d] - c;
        e2 += e * e;
        xx += (double)x[d] * x[d];
        cc += c * c;
    }
    const double b = (sqrt(e2) + gamma_m(ix->dim + 1) * (sqrt(xx) + sqrt(cc))) * (1.0 + 1e-6);
    ix->rb[r] = (float)b < b ? nextafterf((float)b, INFINITY) : (float)b;
}

static void set_aux(sm_index *ix, int64_t r, double ss) {
    ix->aux[r] = ix->metric == SM_METRIC_COSINE ? (ss > 0.0 ? (float)(1.0 / sqrt(ss)) : 0.0f)
                                                : (float)ss;
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
        const float *src = x + i * ldx;
        if (has_f32(ix)) {
            float *dst = ix->data + r * ix->ld;
            memcpy(dst, src, (size_t)ix->dim * sizeof(float));
            memset(dst + ix->dim, 0, (size_t)(ix->ld - ix->dim) * sizeof(float));
            set_aux(ix, r, sumsq(dst, ix->dim));
        }
        if (ix->storage != SM_STORE_F32) {
            encode_row(ix, r, src);
            if (ix->exact) {
                bound_row(ix, r, src);
            } else { /* scores come from the compact row: so do its norms */
                double ss = 0.0;
                for (int64_t d = 0; d < ix->dim; d++) ss += compact_at(ix, r, d) * compact_at(ix, r, d);
                set_aux(ix, r, ss);
            }
        }
        ix->seq[r] = ix->next_seq++;
    }
    ix->n += n;
    return SM_OK;
}

int sm_index_add_codes(sm_index *ix, const void *codes, const float *scales, int64_t n) {
    if (ix->storage == SM_STORE_F32 || ix->exact || n < 0 || (n > 0 && !codes) ||
        (ix->storage == SM_STORE_I8 && n > 0 && !scales))
        return SM_ERR_ARG;
    const int64_t dim = ix->dim;
    for (int64_t i = 0; i < n; i++) { /* validate everything before changing anything */
        int nonzero = 0;
        if (ix->storage == SM_STORE_BF16) {
            for (int64_t d = 0; d < dim; d++) {
                const float v = sm_bf16_widen(((const uint16_t *)codes)[i * dim + d]);
                if (!isfinite(v)) return SM_ERR_ARG;
                nonzero |= v != 0.0f;
            }
        } else {
            if (!isfinite(scales[i]) || scales[i] < 0.0f) return SM_ERR_ARG;
            for (int64_t d = 0; d < dim; d++) {
                const int8_t c = ((const int8_t *)codes)[i * dim + d];
                if (c == -128) return SM_ERR_ARG;
                nonzero |= c != 0;
            }
            nonzero &= scales[i] > 0.0f;
        }
        if (ix->metric == SM_METRIC_COSINE && !nonzero) return SM_ERR_ARG;
    }
    int rc = grow(ix, ix->n + n);
    if (rc != SM_OK) return rc;
    const int64_t es = ix->storage == SM_STORE_BF16 ? 2 : 1, ld = ix->ld;
    for (int64_t i = 0; i < n; i++) {
        const int64_t r = ix->n + i;
        char *dst = (char *)ix->codes + r * ld * es;
        memcpy(dst, (const char *)codes + i * dim * es, (size_t)(dim * es));
        memset(dst + dim * es, 0, (size_t)((ld - dim) * es));
        if (ix->storage == SM_STORE_I8) ix->scale[r] = scales[i];
        double ss = 0.0;
        for (int64_t d = 0; d < dim; d++) ss += compact_at(ix, r, d) * compact_at(ix, r, d);
        set_aux(ix, r, ss);
        ix->seq[r] = ix->next_seq++;
    }
    ix->n += n;
    return SM_OK;
}

void sm_index_get_codes(const sm_index *ix, int64_t r, void *codes, float *scale) {
    const int64_t es = ix->storage == SM_STORE_BF16 ? 2 : 1;
    memcpy(codes, (const char *)ix->codes + r * ix->ld * es, (size_t)(ix->dim * es));
    *scale = ix->storage == SM_STORE_I8 ? ix->scale[r] : 0.0f;
}

int64_t sm_index_remove(sm_index *ix, int64_t r) {
    if (r < 0 || r >= ix->n) return -1;
    const int64_t last = ix->n - 1;
    ix->n--;
    if (r == last) return -1;
    if (has_f32(ix))
        memcpy(ix->data + r * ix->ld, ix->data + last * ix->ld, (size_t)ix->ld * sizeof(float));
    const int64_t cb = code_bytes(ix);
    if (cb) memcpy((char *)ix->codes + r * cb, (char *)ix->codes + last * cb, (size_t)cb);
    if (ix->scale) ix->scale[r] = ix->scale[last];
    if (ix->rb) ix->rb[r] = ix->rb[last];
    ix->aux[r] = ix->aux[last];
    ix->seq[r] = ix->seq[last];
    return last;
}

void sm_index_get(const sm_index *ix, int64_t r, float *out) {
    if (has_f32(ix)) {
        memcpy(out, ix->data + r * ix->ld, (size_t)ix->dim * sizeof(float));
        return;
    }
    for (int64_t d = 0; d < ix->dim; d++) out[d] = (float)compact_at(ix, r, d);
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

/* ---- the compact first pass ---------------------------------------------------------------
 * s[i * lds + j] = q_i . x~_{r0 + j} for the m queries of qp (each zero-padded to ld floats) and
 * rows r0 .. r0+cn-1 of the compact store (int8: the sum times the row's scale). Each (query,
 * row) is the same arithmetic whatever m, r0 or the thread: two accumulators take alternate
 * 16-float blocks and are added at the end. */
static void cdots_generic(const sm_index *ix, const float *qp, int m, int64_t r0, int64_t cn,
                          float *s, int64_t lds) {
    const int64_t ld = ix->ld;
    for (int64_t j = 0; j < cn; j++) {
        const int64_t r = r0 + j;
        for (int i = 0; i < m; i++) {
            const float *qi = qp + i * ld;
            float acc[2][16] = {{0}};
            for (int64_t d = 0; d < ld; d += 16) {
                float *a = acc[(d / 16) & 1];
                if (ix->storage == SM_STORE_BF16) {
                    const uint16_t *c = (const uint16_t *)ix->codes + r * ld + d;
                    for (int l = 0; l < 16; l++) a[l] += qi[d + l] * sm_bf16_widen(c[l]);
                } else {
                    const int8_t *c = (const int8_t *)ix->codes + r * ld + d;
                    for (int l = 0; l < 16; l++) a[l] += qi[d + l] * (float)c[l];
                }
            }
            float t = 0.0f;
            for (int l = 0; l < 16; l++) t += acc[0][l] + acc[1][l];
            s[i * lds + j] = ix->storage == SM_STORE_I8 ? t * ix->scale[r] : t;
        }
    }
}

#if SM_X86_KERNELS
#include <immintrin.h>

SM_TARGET_AVX512
SM_INLINE __m512 load_codes_avx512(const void *codes, const int bf16, int64_t at) {
    if (bf16) {
        const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)codes + at));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    const __m128i b = _mm_loadu_si128((const __m128i *)((const int8_t *)codes + at));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
}

/* One row against m queries (m and the format constant after inlining: the accumulators stay
 * in registers). Even 16-float blocks go to a0, odd ones to a1, as in cdots_generic. */
SM_TARGET_AVX512
SM_INLINE void cdots_row_avx512(const sm_index *ix, const int bf16, const float *qp, const int m,
                                int64_t r, float *s, int64_t lds) {
    const int64_t ld = ix->ld, base = r * ld;
    __m512 a0[QGROUP], a1[QGROUP];
    for (int i = 0; i < m; i++) a0[i] = a1[i] = _mm512_setzero_ps();
    int64_t d = 0;
    for (; d + 32 <= ld; d += 32) {
        const __m512 x0 = load_codes_avx512(ix->codes, bf16, base + d);
        const __m512 x1 = load_codes_avx512(ix->codes, bf16, base + d + 16);
        for (int i = 0; i < m; i++) {
            a0[i] = _mm512_fmadd_ps(_mm512_load_ps(qp + i * ld + d), x0, a0[i]);
            a1[i] = _mm512_fmadd_ps(_mm512_load_ps(qp + i * ld + d + 16), x1, a1[i]);
        }
    }
    if (d < ld) { /* ld is a multiple of 16: one even block left */
        const __m512 x0 = load_codes_avx512(ix->codes, bf16, base + d);
        for (int i = 0; i < m; i++) a0[i] = _mm512_fmadd_ps(_mm512_load_ps(qp + i * ld + d), x0, a0[i]);
    }
    for (int i = 0; i < m; i++) {
        const float t = _mm512_reduce_add_ps(_mm512_add_ps(a0[i], a1[i]));
        s[i * lds] = bf16 ? t : t * ix->scale[r];
    }
}

SM_TARGET_AVX512
static void cdots_avx512(const sm_index *ix, const float *qp, int m, int64_t r0, int64_t cn,
                         float *s, int64_t lds) {
    const int bf16 = ix->storage == SM_STORE_BF16;
    /* a software prefetch PF_BYTES ahead of the row being read: the hardware prefetchers alone
     * left the one-core scan at ~8.5 GB/s where the machine reads ~14 */
    const int64_t rowb = code_bytes(ix);
    const char *base = (const char *)ix->codes;
#define CDOTS_CASE(BF, M)                                                                          \
    for (int64_t j = 0; j < cn; j++) {                                                             \
        const char *ahead = base + (r0 + j) * rowb + PF_BYTES;                                     \
        for (int64_t o = 0; o < rowb; o += 64) _mm_prefetch(ahead + o, _MM_HINT_T0);               \
        cdots_row_avx512(ix, BF, qp, M, r0 + j, s + j, lds);                                       \
    }                                                                                              \
    return;
    SM_QDISPATCH(bf16, m, CDOTS_CASE);
#undef CDOTS_CASE
}
#endif

static void cdots(const sm_index *ix, const float *qp, int m, int64_t r0, int64_t cn, float *s,
                  int64_t lds) {
#if SM_X86_KERNELS
    if (sm_simd_active() >= SM_SIMD_AVX512) {
        cdots_avx512(ix, qp, m, r0, cn, s, lds);
        return;
    }
#endif
    cdots_generic(ix, qp, m, r0, cn, s, lds);
}

/* Half-width of the interval around the first-pass key `kt` (from the compact row's dot dt)
 * that holds the float32 store's key of row r for a query of norm qn and aux qa: the dot
 * products differ by at most qn * rb[r]; the key's own roundings (a product or two for
 * cosine, two additions for l2, in both computations) are added, with margin. */
static double key_radius(const sm_index *ix, int64_t r, double dt, double qn, double qa) {
    const double u = F32_U, delta = qn * ix->rb[r] + (double)(ix->dim + 2) * 1e-44;
    const double ad = fabs(dt);
    double b;
    switch (ix->metric) {
    case SM_METRIC_COSINE:
        b = qa * ix->aux[r] * (delta + 3.0 * u * (2.0 * ad + delta)) * (1.0 + 4.0 * u);
        break;
    case SM_METRIC_DOT: b = delta; break;
    default: b = 2.0 * delta + 4.0 * u * (qa + ix->aux[r] + 2.0 * ad + 2.0 * delta); break;
    }
    return b * 1.001 + 1e-300;
}

/* hi[j]: a looser bound than key_radius gives, in float and branch-free (vectorized), on the
 * float32 key of row r0 + j: a row whose hi is below the running threshold is passed over
 * without the exact bookkeeping. Its margins (x1.002, |key| * 1e-6, 1e-30) cover key_radius's
 * and the float rounding of this sum. */
#define UPPER_BOUNDS_BODY                                                                          \
    for (int64_t j = 0; j < cn; j++) {                                                             \
        const float sj = s[j], ad = fabsf(sj), delta = qn * rb[j];                                 \
        float key, rad;                                                                            \
        if (metric == SM_METRIC_COSINE) {                                                          \
            key = sj * qa * aux[j];                                                                \
            rad = qa * aux[j] * (delta + 3.6e-7f * (2.0f * ad + delta));                           \
        } else if (metric == SM_METRIC_DOT) {                                                      \
            key = sj;                                                                              \
            rad = delta;                                                                           \
        } else {                                                                                   \
            const float d2 = qa - 2.0f * sj + aux[j];                                              \
            key = -(d2 > 0.0f ? d2 : 0.0f);                                                        \
            rad = 2.0f * delta + 2.4e-7f * (qa + aux[j] + 2.0f * ad + 2.0f * delta);               \
        }                                                                                          \
        const float h = key + (rad * 1.002f + fabsf(key) * 1e-6f + 1e-30f);                        \
        hi[j] = (h - h == 0.0f && sj - sj == 0.0f) ? h : INFINITY; /* not finite: keep it */      \
    }

static void upper_bounds_generic(int metric, const float *s, const float *aux, const float *rb,
                                 int64_t cn, float qn, float qa, float *hi) {
    UPPER_BOUNDS_BODY
}
#if SM_X86_KERNELS
SM_TARGET_AVX512
static void upper_bounds_avx512(int metric, const float *s, const float *aux, const float *rb,
                                int64_t cn, float qn, float qa, float *hi) {
    UPPER_BOUNDS_BODY
}
#endif

static void upper_bounds(int metric, const float *s, const float *aux, const float *rb, int64_t cn,
                         float qn, float qa, float *hi) {
#if SM_X86_KERNELS
    if (sm_simd_active() >= SM_SIMD_AVX512) {
        upper_bounds_avx512(metric, s, aux, rb, cn, qn, qa, hi);
        return;
    }
#endif
    upper_bounds_generic(metric, s, aux, rb, cn, qn, qa, hi);
}

typedef struct {
    int64_t row;
    double upper;
} maybe;

/* A min-heap of the k largest lower bounds seen (h[0]: the k-th largest once full). */
static void lb_offer(double *h, int64_t *len, int64_t k, double v) {
    int64_t i;
    if (*len < k) {
        i = (*len)++;
        while (i > 0 && h[(i - 1) / 2] > v) {
            h[i] = h[(i - 1) / 2];
            i = (i - 1) / 2;
        }
        h[i] = v;
        return;
    }
    if (v <= h[0]) return;
    i = 0;
    for (;;) {
        int64_t l = 2 * i + 1, w = i;
        double vw = v;
        if (l < k && h[l] < vw) w = l, vw = h[l];
        if (l + 1 < k && h[l + 1] < vw) w = l + 1;
        if (w == i) break;
        h[i] = h[w];
        i = w;
    }
    h[i] = v;
}

typedef struct {
    maybe *p;
    int64_t n, cap;
} maybe_list;

static int maybe_push(maybe_list *l, maybe m) {
    if (l->n == l->cap) {
        int64_t cap = l->cap ? 2 * l->cap : 256;
        maybe *p = (maybe *)realloc(l->p, (size_t)cap * sizeof(maybe));
        if (!p) return SM_ERR_NOMEM;
        l->p = p, l->cap = cap;
    }
    l->p[l->n++] = m;
    return SM_OK;
}

/* Drop the entries whose upper bound is below t. */
static void maybe_prune(maybe_list *l, double t) {
    int64_t w = 0;
    for (int64_t i = 0; i < l->n; i++)
        if (l->p[i].upper >= t) l->p[w++] = l->p[i];
    l->n = w;
}

/* The first pass and re-rank of an exact compact store; not exact: the compact scores' top-k. */
static int compact_search(const sm_index *ix, const float *q, int64_t nq, int64_t ldq, int64_t k,
                          int64_t kk, const float *qaux, int64_t *rows, float *scores, int nt) {
    const int64_t n = ix->n, ld = ix->ld;
    int64_t chunk = CHUNK_ROWS_BYTES / code_bytes(ix);
    chunk = chunk < 64 ? 64 : chunk / 64 * 64;
    const int exact = ix->exact;
    double *qn = (double *)malloc((size_t)nq * sizeof(double));
    float *qp = (float *)sm_pool_rent(sm_pool_default(), (size_t)(nq * ld) * sizeof(float));
    /* per thread: the scores of a query group over a chunk, then (exact) one query's bounds */
    float *sc = (float *)sm_pool_rent(sm_pool_default(),
                                      (size_t)(nt * (QGROUP + 1) * chunk) * sizeof(float));
    /* per thread and query: exact - a lower-bound heap and a list of rows that may be in the
     * top k; not exact - a heap of candidates, as the float32 search keeps */
    double *lbs = exact ? (double *)malloc((size_t)(nt * nq * kk) * sizeof(double)) : NULL;
    maybe_list *lists = exact ? (maybe_list *)calloc((size_t)(nt * nq), sizeof(maybe_list)) : NULL;
    cand *heaps = exact ? NULL : (cand *)malloc((size_t)(nt * nq * kk) * sizeof(cand));
    int64_t *lens = (int64_t *)calloc((size_t)(nt * nq), sizeof(int64_t));
    int rc = SM_OK;
    if (!qn || !qp || !sc || !lens || (exact && (!lbs || !lists)) || (!exact && !heaps)) {
        rc = SM_ERR_NOMEM;
        goto done;
    }
    for (int64_t i = 0; i < nq; i++) {
        memcpy(qp + i * ld, q + i * ldq, (size_t)ix->dim * sizeof(float));
        memset(qp + i * ld + ix->dim, 0, (size_t)(ld - ix->dim) * sizeof(float));
        qn[i] = sqrt(sumsq(q + i * ldq, ix->dim)) * (1.0 + 1e-9);
    }
    int failed = 0;
    SM_PARALLEL(nt) {
        const int tid = SM_THREAD_ID();
        int64_t r0, r1;
        sm_split_range(n, 64, SM_THREAD_COUNT(), tid, &r0, &r1);
        float *s = sc + tid * (QGROUP + 1) * chunk, *hi = s + QGROUP * chunk;
        for (int64_t c0 = r0; c0 < r1 && !failed; c0 += chunk) {
            const int64_t cn = r1 - c0 < chunk ? r1 - c0 : chunk;
            for (int64_t g = 0; g < nq; g += QGROUP) {
                const int64_t m = nq - g < QGROUP ? nq - g : QGROUP;
                cdots(ix, qp + g * ld, (int)m, c0, cn, s, chunk);
                for (int64_t i = 0; i < m; i++) {
                    const int64_t qi = g + i, slot = tid * nq + qi;
                    const float *si = s + i * chunk;
                    int64_t *lq = lens + slot;
                    if (!exact) {
                        cand *hq = heaps + slot * kk;
                        for (int64_t j = 0; j < cn; j++) {
                            const int64_t r = c0 + j;
                            float key = key_of(ix, si[j], qaux[qi], r);
                            if (key != key) key = -INFINITY;
                            if (*lq == kk && key < hq[0].key) continue;
                            cand cd = {key, ix->seq[r], r};
                            heap_offer(hq, lq, kk, cd);
                        }
                        continue;
                    }
                    double *hq = lbs + slot * kk;
                    maybe_list *ml = lists + slot;
                    upper_bounds(ix->metric, si, ix->aux + c0, ix->rb + c0, cn, (float)qn[qi],
                                 qaux[qi], hi);
                    for (int64_t j = 0; j < cn; j++) {
                        if (*lq == kk && (double)hi[j] < hq[0]) continue; /* the common case */
                        const int64_t r = c0 + j;
                        const float key = key_of(ix, si[j], qaux[qi], r);
                        double lo = -INFINITY, hi = INFINITY;
                        if (isfinite(key) && isfinite(si[j])) {
                            const double rad = key_radius(ix, r, si[j], qn[qi], qaux[qi]);
                            lo = (double)key - rad;
                            hi = (double)key + rad;
                        }
                        lb_offer(hq, lq, kk, lo);
                        if (*lq == kk && hi < hq[0]) continue; /* below k others for certain */
                        maybe mb = {r, hi};
                        if (maybe_push(ml, mb) != SM_OK) {
                            failed = 1;
                            break;
                        }
                        if (ml->n > 4 * kk + 4096 && *lq == kk) maybe_prune(ml, hq[0]);
                    }
                }
            }
        }
    }
    if (failed) {
        rc = SM_ERR_NOMEM;
        goto done;
    }
    if (!exact) { /* merge as the float32 search does */
        cand *all = (cand *)malloc((size_t)(nt * kk) * sizeof(cand));
        if (!all) {
            rc = SM_ERR_NOMEM;
            goto done;
        }
        for (int64_t i = 0; i < nq; i++) {
            int64_t m = 0;
            for (int t = 0; t < nt; t++) {
                memcpy(all + m, heaps + (t * nq + i) * kk, (size_t)lens[t * nq + i] * sizeof(cand));
                m += lens[t * nq + i];
            }
            write_results(ix, all, m, k, rows + i * k, scores + i * k);
        }
        free(all);
        goto done;
    }
    /* each query: the k-th largest lower bound over all threads, then the float32 score of
     * every row whose upper bound reaches it, as the float32 store computes it */
    for (int64_t i = 0; i < nq && rc == SM_OK; i++) {
        double *lb_all = (double *)malloc((size_t)(nt * kk) * sizeof(double));
        int64_t m = 0, cnt = 0;
        if (!lb_all) {
            rc = SM_ERR_NOMEM;
            break;
        }
        for (int t = 0; t < nt; t++)
            for (int64_t e = 0; e < lens[t * nq + i]; e++) lb_all[m++] = lbs[(t * nq + i) * kk + e];
        double thr = -INFINITY;
        if (m >= kk) { /* the kk-th largest: a heap over all of them */
            double *h = (double *)malloc((size_t)kk * sizeof(double));
            int64_t hl = 0;
            if (!h) {
                free(lb_all);
                rc = SM_ERR_NOMEM;
                break;
            }
            for (int64_t e = 0; e < m; e++) lb_offer(h, &hl, kk, lb_all[e]);
            thr = h[0];
            free(h);
        }
        free(lb_all);
        for (int t = 0; t < nt; t++) cnt += lists[t * nq + i].n;
        cand *cs = (cand *)malloc((size_t)(cnt > 0 ? cnt : 1) * sizeof(cand));
        if (!cs) {
            rc = SM_ERR_NOMEM;
            break;
        }
        int64_t nc = 0;
        const float *qi = q + i * ldq;
        for (int t = 0; t < nt; t++) {
            const maybe_list *ml = lists + t * nq + i;
            for (int64_t e = 0; e < ml->n; e++) {
                if (ml->p[e].upper < thr) continue;
                const int64_t r = ml->p[e].row;
                float dot;
                sm_gemv_cols(1, 1, 1, ix->dim, qi, ldq, ix->data + r * ld, ld, &dot, 1, 0, 1, NULL);
                float key = key_of(ix, dot, qaux[i], r);
                if (key != key) key = -INFINITY;
                cand cd = {key, ix->seq[r], r};
                cs[nc++] = cd;
            }
        }
        write_results(ix, cs, nc, k, rows + i * k, scores + i * k);
        free(cs);
    }
done:
    if (lists)
        for (int64_t i = 0; i < nt * nq; i++) free(lists[i].p);
    free(lists);
    free(lbs);
    free(heaps);
    free(lens);
    free(qn);
    sm_pool_return(qp);
    sm_pool_return(sc);
    return rc;
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
    if (ix->storage != SM_STORE_F32) {
        rc = compact_search(ix, q, nq, ldq, k, kk, qaux, rows, scores, nt);
        free(qaux);
        return rc;
    }
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
            double dot = 0.0, d2 = 0.0, xx = 0.0;
            for (int64_t d = 0; d < dim; d++) { /* the float32 row, or the compact one */
                const double x = has_f32(ix) ? (double)ix->data[r * ix->ld + d] : compact_at(ix, r, d);
                dot += (double)qi[d] * x;
                d2 += ((double)qi[d] - x) * ((double)qi[d] - x);
                xx += x * x;
            }
            double key = ix->metric == SM_METRIC_COSINE ? dot / sqrt(qq * xx)
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
