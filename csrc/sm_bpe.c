/* sm_bpe.c - byte-level BPE: code-point classes, the GPT-2 and cl100k pre-tokenizers, the merge
 * loop and batch encoding (see sm_bpe.h).
 *
 * Pre-tokenizers. Each reproduces one regular expression, match by match, as a scanner: at a
 * position, the alternatives are tried in the pattern's order with the regex's greedy,
 * possessive and backtracking rules worked out by hand (comments below). Every position starts a
 * match for both patterns, so the pre-tokens tile the text.
 *
 *   GPT-2:  's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 *   cl100k: '(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+
 *           |\s++$|\s*[\r\n]|\s+(?!\S)|\s
 *
 * Merges. Within a pre-token the pieces start as single bytes; the adjacent pair with the lowest
 * priority is merged, the leftmost among equals, until no pair merges (GPT-2's and tiktoken's
 * rule). Pairs are looked up in a hash map (left id, right id) -> (priority, merged id). Short
 * pre-tokens scan the pieces for the best pair each round (cheap at these sizes); long ones (a
 * run of text without spaces) keep the candidate pairs in a heap, so a megabyte of "aaaa..."
 * costs O(n log n), not O(n^2).
 */
#include "sm_bpe.h"

#include <stdlib.h>
#include <string.h>

#include "sm_runtime.h"
#include "sm_unicode_tables.h"

/* ---- code-point classes ----------------------------------------------------------------------- */

static int in_ranges(uint32_t cp, const uint32_t (*r)[2], int64_t n) {
    int64_t lo = 0, hi = n - 1;
    while (lo <= hi) {
        int64_t mid = (lo + hi) / 2;
        if (cp < r[mid][0]) hi = mid - 1;
        else if (cp > r[mid][1]) lo = mid + 1;
        else return 1;
    }
    return 0;
}

#define NRANGES(t) ((int64_t)(sizeof(t) / sizeof((t)[0])))

static int uc_class_slow(uint32_t cp) {
    if (in_ranges(cp, sm_uc_letter, NRANGES(sm_uc_letter))) return SM_UC_LETTER;
    if (in_ranges(cp, sm_uc_number, NRANGES(sm_uc_number))) return SM_UC_NUMBER;
    if (in_ranges(cp, sm_uc_space, NRANGES(sm_uc_space))) return SM_UC_SPACE;
    return 0;
}

/* Classes of U+0000..U+00FF, filled once (the common case: ASCII text). */
static unsigned char latin1_class[256];
static int latin1_ready = 0;

static void latin1_init(void) {
    for (uint32_t c = 0; c < 256; c++) latin1_class[c] = (unsigned char)uc_class_slow(c);
    __atomic_store_n(&latin1_ready, 1, __ATOMIC_RELEASE);
}

int sm_uc_class(uint32_t cp) {
    if (cp < 256) {
        if (!__atomic_load_n(&latin1_ready, __ATOMIC_ACQUIRE)) latin1_init(); /* idempotent */
        return latin1_class[cp];
    }
    return uc_class_slow(cp);
}

const char *sm_unicode_version(void) { return SM_UNICODE_VERSION; }

/* The code point at s[i] (valid UTF-8 expected; a stray byte reads as U+FFFD, length 1). */
SM_INLINE uint32_t utf8_at(const uint8_t *s, int64_t n, int64_t i, int *len) {
    uint32_t c = s[i];
    if (c < 0x80) {
        *len = 1;
        return c;
    }
    int k = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
    if (k == 1 || i + k > n) {
        *len = 1;
        return 0xFFFD;
    }
    uint32_t cp = c & (0x7F >> k);
    for (int j = 1; j < k; j++) cp = (cp << 6) | (s[i + j] & 0x3F);
    *len = k;
    return cp;
}

SM_INLINE int cls_at(const uint8_t *s, int64_t n, int64_t i, uint32_t *cp, int *len) {
    *cp = utf8_at(s, n, i, len);
    return *cp < 0x80 ? latin1_class[*cp] : sm_uc_class(*cp);
}

/* End of the run from i of code points whose class is `want` (0: "other", neither letter,
 * number nor space) - want is compared exactly. */
static int64_t run_of(const uint8_t *s, int64_t n, int64_t i, int want) {
    uint32_t cp;
    int len;
    while (i < n && cls_at(s, n, i, &cp, &len) == want) i += len;
    return i;
}

/* Scan the whitespace run from i: its end, the offset of its last code point, and the offset
 * just past its last \r or \n (or -1). */
static int64_t space_run(const uint8_t *s, int64_t n, int64_t i, int64_t *last, int64_t *after_nl) {
    uint32_t cp;
    int len;
    *last = i;
    *after_nl = -1;
    while (i < n && cls_at(s, n, i, &cp, &len) == SM_UC_SPACE) {
        *last = i;
        if (cp == '\r' || cp == '\n') *after_nl = i + len;
        i += len;
    }
    return i;
}

/* GPT-2's pattern (see the top of the file). */
static int64_t gpt2_end(const uint8_t *s, int64_t n, int64_t i) {
    uint32_t cp0, cp1;
    int l0, l1;
    int c0 = cls_at(s, n, i, &cp0, &l0);
    if (cp0 == '\'' && i + 1 < n) { /* 's 't 're 've 'm 'll 'd, lower case only */
        uint8_t b1 = s[i + 1], b2 = i + 2 < n ? s[i + 2] : 0;
        if (b1 == 's' || b1 == 't' || b1 == 'm' || b1 == 'd') return i + 2;
        if ((b1 == 'r' && b2 == 'e') || (b1 == 'v' && b2 == 'e') || (b1 == 'l' && b2 == 'l'))
            return i + 3;
    }
    if (cp0 == ' ' && i + 1 < n) { /* " ?X+" with the space: X is the class of what follows */
        int c1 = cls_at(s, n, i + 1, &cp1, &l1);
        if (c1 != SM_UC_SPACE) return run_of(s, n, i + 1, c1);
    }
    if (c0 != SM_UC_SPACE) return run_of(s, n, i, c0); /* \p{L}+, \p{N}+ or [^\s\p{L}\p{N}]+ */
    /* \s+(?!\S): the run, less its last code point when a non-space follows; else \s+ (one) */
    int64_t last, after_nl;
    int64_t j = space_run(s, n, i, &last, &after_nl);
    if (j == n) return n;
    return last > i ? last : j;
}

/* cl100k's case-insensitive contraction letters ((?i) folds U+017F LONG S to s). */
SM_INLINE uint32_t fold(uint32_t cp) {
    if (cp == 0x17F) return 's';
    return cp >= 'A' && cp <= 'Z' ? cp + 32 : cp;
}

/* cl100k's pattern (see the top of the file). */
static int64_t cl100k_end(const uint8_t *s, int64_t n, int64_t i) {
    uint32_t cp0, cp1, cp2;
    int l0, l1, l2;
    int c0 = cls_at(s, n, i, &cp0, &l0);
    /* '(?i:[sdmt]|ll|ve|re) */
    if (cp0 == '\'' && i + 1 < n) {
        uint32_t f1 = fold(utf8_at(s, n, i + 1, &l1));
        if (f1 == 's' || f1 == 'd' || f1 == 'm' || f1 == 't') return i + 1 + l1;
        if (i + 1 + l1 < n) {
            uint32_t f2 = fold(utf8_at(s, n, i + 1 + l1, &l2));
            if ((f1 == 'l' && f2 == 'l') || (f1 == 'v' && f2 == 'e') || (f1 == 'r' && f2 == 'e'))
                return i + 1 + l1 + l2;
        }
    }
    /* [^\r\n\p{L}\p{N}]?+\p{L}++ : the optional character is possessive - when present it must
     * be followed by a letter, or the alternative fails */
    if (c0 == SM_UC_LETTER) return run_of(s, n, i, SM_UC_LETTER);
    if (c0 != SM_UC_NUMBER && cp0 != '\r' && cp0 != '\n' && i + l0 < n &&
        cls_at(s, n, i + l0, &cp1, &l1) == SM_UC_LETTER)
        return run_of(s, n, i + l0, SM_UC_LETTER);
    /* \p{N}{1,3}+ */
    if (c0 == SM_UC_NUMBER) {
        int64_t j = i;
        for (int k = 0; k < 3 && j < n && cls_at(s, n, j, &cp1, &l1) == SM_UC_NUMBER; k++) j += l1;
        return j;
    }
    /* " ?[^\s\p{L}\p{N}]++[\r\n]*+" */
    int64_t start = -1;
    if (c0 == 0) start = i;
    else if (cp0 == ' ' && i + 1 < n && cls_at(s, n, i + 1, &cp2, &l2) == 0) start = i + 1;
    if (start >= 0) {
        int64_t j = run_of(s, n, start, 0);
        while (j < n && (s[j] == '\r' || s[j] == '\n')) j++;
        return j;
    }
    /* whitespace: \s++$ | \s*[\r\n] | \s+(?!\S) | \s */
    int64_t last, after_nl;
    int64_t j = space_run(s, n, i, &last, &after_nl);
    if (j == n) return n;
    if (after_nl > i) return after_nl;
    if (last > i) return last;
    return i + l0;
}

int64_t sm_bpe_pretoken_end(int pattern, const uint8_t *text, int64_t n, int64_t at) {
    if (at >= n) return n;
    if (!__atomic_load_n(&latin1_ready, __ATOMIC_ACQUIRE)) latin1_init();
    return pattern == SM_BPE_PAT_CL100K ? cl100k_end(text, n, at) : gpt2_end(text, n, at);
}

/* ---- the vocabulary -------------------------------------------------------------------------- */

struct sm_bpe {
    int pattern, whole_words;
    int64_t n;               /* ids 0 .. n-1 */
    uint8_t *blob;
    int64_t *off;            /* n + 1 */
    int32_t byte_tok[256];
    int32_t *tok_slot;       /* bytes -> id: open addressing over ids (-1 empty) */
    uint64_t tok_mask;
    uint64_t *pair_key;      /* (a << 32 | b) + 1, 0 empty */
    uint32_t *pair_prio;
    int32_t *pair_res;
    uint64_t pair_mask;
};

static uint64_t hash_bytes(const uint8_t *p, int64_t len) {
    uint64_t h = 0x9E3779B97F4A7C15ull ^ (uint64_t)len;
    int64_t i = 0;
    for (; i + 8 <= len; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        h = (h ^ w) * 0xBF58476D1CE4E5B9ull;
        h ^= h >> 31;
    }
    uint64_t w = 0;
    memcpy(&w, p + i, (size_t)(len - i));
    h = (h ^ w) * 0x94D049BB133111EBull;
    return h ^ (h >> 29);
}

SM_INLINE uint64_t hash_pair(uint64_t key) {
    key *= 0x9E3779B97F4A7C15ull;
    return key ^ (key >> 32);
}

static int32_t lookup_bytes(const sm_bpe *b, const uint8_t *p, int64_t len) {
    for (uint64_t h = hash_bytes(p, len) & b->tok_mask;; h = (h + 1) & b->tok_mask) {
        int32_t id = b->tok_slot[h];
        if (id < 0) return -1;
        if (b->off[id + 1] - b->off[id] == len && memcmp(b->blob + b->off[id], p, (size_t)len) == 0)
            return id;
    }
}

SM_INLINE int pair_find(const sm_bpe *b, int32_t a, int32_t c, uint32_t *prio, int32_t *res) {
    uint64_t key = (((uint64_t)(uint32_t)a << 32) | (uint32_t)c) + 1;
    for (uint64_t h = hash_pair(key) & b->pair_mask;; h = (h + 1) & b->pair_mask) {
        uint64_t k = b->pair_key[h];
        if (k == key) {
            *prio = b->pair_prio[h];
            *res = b->pair_res[h];
            return 1;
        }
        if (k == 0) return 0;
    }
}

/* Insert a pair; an existing one keeps the lower priority (never happens for valid files). */
static void pair_put(sm_bpe *b, int32_t a, int32_t c, uint32_t prio, int32_t res) {
    uint64_t key = (((uint64_t)(uint32_t)a << 32) | (uint32_t)c) + 1;
    for (uint64_t h = hash_pair(key) & b->pair_mask;; h = (h + 1) & b->pair_mask) {
        if (b->pair_key[h] == key) {
            if (prio < b->pair_prio[h]) {
                b->pair_prio[h] = prio;
                b->pair_res[h] = res;
            }
            return;
        }
        if (b->pair_key[h] == 0) {
            b->pair_key[h] = key;
            b->pair_prio[h] = prio;
            b->pair_res[h] = res;
            return;
        }
    }
}

static uint64_t table_size(int64_t n) { /* a power of two >= 2n */
    uint64_t s = 16;
    while (s < (uint64_t)n * 2) s <<= 1;
    return s;
}

void sm_bpe_free(sm_bpe *b) {
    if (!b) return;
    free(b->blob);
    free(b->off);
    free(b->tok_slot);
    free(b->pair_key);
    free(b->pair_prio);
    free(b->pair_res);
    free(b);
}

int sm_bpe_pattern(const sm_bpe *b) { return b->pattern; }

sm_bpe *sm_bpe_new(int64_t n, const uint8_t *blob, const int64_t *offsets, int64_t n_merges,
                   const int32_t *merge_a, const int32_t *merge_b, int whole_words, int pattern,
                   int *err) {
    *err = SM_ERR_NOMEM;
    if (n <= 0 || n > INT32_MAX || pattern < 0 || pattern >= SM_BPE_NUM_PATTERNS) {
        *err = SM_ERR_ARG;
        return NULL;
    }
    if (!__atomic_load_n(&latin1_ready, __ATOMIC_ACQUIRE)) latin1_init();
    sm_bpe *b = (sm_bpe *)calloc(1, sizeof(sm_bpe));
    if (!b) return NULL;
    b->pattern = pattern;
    b->n = n;
    b->whole_words = n_merges < 0 ? 1 : whole_words != 0;
    int64_t total = offsets[n] - offsets[0];
    b->blob = (uint8_t *)malloc((size_t)(total > 0 ? total : 1));
    b->off = (int64_t *)malloc((size_t)(n + 1) * sizeof(int64_t));
    b->tok_mask = table_size(n) - 1;
    b->tok_slot = (int32_t *)malloc((size_t)(b->tok_mask + 1) * sizeof(int32_t));
    if (!b->blob || !b->off || !b->tok_slot) goto fail;
    memcpy(b->blob, blob + offsets[0], (size_t)total);
    for (int64_t i = 0; i <= n; i++) b->off[i] = offsets[i] - offsets[0];
    memset(b->tok_slot, 0xFF, (size_t)(b->tok_mask + 1) * sizeof(int32_t));
    for (int i = 0; i < 256; i++) b->byte_tok[i] = -1;
    for (int64_t id = 0; id < n; id++) {
        int64_t len = b->off[id + 1] - b->off[id];
        if (len < 0) goto bad;
        if (len == 0) continue; /* a hole */
        const uint8_t *p = b->blob + b->off[id];
        if (lookup_bytes(b, p, len) >= 0) goto bad; /* two ids for the same bytes */
        uint64_t h = hash_bytes(p, len) & b->tok_mask;
        while (b->tok_slot[h] >= 0) h = (h + 1) & b->tok_mask;
        b->tok_slot[h] = (int32_t)id;
        if (len == 1) b->byte_tok[p[0]] = (int32_t)id;
    }
    for (int i = 0; i < 256; i++)
        if (b->byte_tok[i] < 0) goto bad;

    /* the pair map */
    int64_t pairs = n_merges >= 0 ? n_merges : 0;
    if (n_merges < 0) /* every split of every token into two tokens, counted first */
        for (int64_t id = 0; id < n; id++) {
            int64_t len = b->off[id + 1] - b->off[id];
            pairs += len > 1 ? len - 1 : 0;
        }
    b->pair_mask = table_size(pairs) - 1;
    b->pair_key = (uint64_t *)calloc((size_t)(b->pair_mask + 1), sizeof(uint64_t));
    b->pair_prio = (uint32_t *)malloc((size_t)(b->pair_mask + 1) * sizeof(uint32_t));
    b->pair_res = (int32_t *)malloc((size_t)(b->pair_mask + 1) * sizeof(int32_t));
    if (!b->pair_key || !b->pair_prio || !b->pair_res) goto fail;
    if (n_merges >= 0) {
        uint8_t *buf = NULL;
        int64_t cap = 0;
        for (int64_t k = 0; k < n_merges; k++) {
            int32_t a = merge_a[k], c = merge_b[k];
            if (a < 0 || c < 0 || a >= n || c >= n) goto bad_buf;
            int64_t la = b->off[a + 1] - b->off[a], lc = b->off[c + 1] - b->off[c];
            if (la == 0 || lc == 0) goto bad_buf;
            if (la + lc > cap) {
                cap = 2 * (la + lc);
                uint8_t *nb = (uint8_t *)realloc(buf, (size_t)cap);
                if (!nb) {
                    free(buf);
                    goto fail;
                }
                buf = nb;
            }
            memcpy(buf, b->blob + b->off[a], (size_t)la);
            memcpy(buf + la, b->blob + b->off[c], (size_t)lc);
            int32_t r = lookup_bytes(b, buf, la + lc);
            if (r < 0) goto bad_buf;
            pair_put(b, a, c, (uint32_t)k, r);
            continue;
        bad_buf:
            free(buf);
            goto bad;
        }
        free(buf);
    } else {
        for (int64_t id = 0; id < n; id++) {
            int64_t len = b->off[id + 1] - b->off[id];
            const uint8_t *p = b->blob + b->off[id];
            for (int64_t k = 1; k < len; k++) {
                int32_t a = lookup_bytes(b, p, k), c = lookup_bytes(b, p + k, len - k);
                if (a >= 0 && c >= 0) pair_put(b, a, c, (uint32_t)id, (int32_t)id);
            }
        }
    }
    *err = SM_OK;
    return b;
bad:
    *err = SM_ERR_ARG;
fail:
    sm_bpe_free(b);
    return NULL;
}

const uint8_t *sm_bpe_token_bytes(const sm_bpe *b, int32_t id, int64_t *len) {
    if (id < 0 || id >= b->n || b->off[id + 1] == b->off[id]) return NULL;
    *len = b->off[id + 1] - b->off[id];
    return b->blob + b->off[id];
}

/* ---- merging ------------------------------------------------------------------------------- */

#define SHORT_WORD 64 /* longest pre-token merged by scanning (above: the heap) */

/* Merge by scanning: ids[0..m) pieces, prio[k] the priority of pair (k, k+1) (UINT32_MAX: none).
 * Returns the final piece count. */
static int64_t merge_scan(const sm_bpe *b, int32_t *ids, int64_t m) {
    uint32_t prio[SHORT_WORD];
    int32_t res[SHORT_WORD];
    for (int64_t k = 0; k + 1 < m; k++)
        if (!pair_find(b, ids[k], ids[k + 1], &prio[k], &res[k])) prio[k] = UINT32_MAX;
    while (m > 1) {
        int64_t best = -1;
        uint32_t bp = UINT32_MAX;
        for (int64_t k = 0; k + 1 < m; k++)
            if (prio[k] < bp) { /* strict: the leftmost of equals */
                bp = prio[k];
                best = k;
            }
        if (best < 0) break;
        ids[best] = res[best];
        memmove(ids + best + 1, ids + best + 2, (size_t)(m - best - 2) * sizeof(int32_t));
        memmove(prio + best, prio + best + 1, (size_t)(m - best - 2) * sizeof(uint32_t));
        memmove(res + best, res + best + 1, (size_t)(m - best - 2) * sizeof(int32_t));
        m--;
        if (best > 0 && !pair_find(b, ids[best - 1], ids[best], &prio[best - 1], &res[best - 1]))
            prio[best - 1] = UINT32_MAX;
        if (best + 1 < m && !pair_find(b, ids[best], ids[best + 1], &prio[best], &res[best]))
            prio[best] = UINT32_MAX;
    }
    return m;
}

/* Heap of candidate merges, ordered by (priority, left position): the pair to merge next is the
 * minimum. Entries are checked when popped (their pieces may have merged meanwhile). */
typedef struct {
    uint64_t key; /* priority << 32 | left position */
    int32_t left_id, right_id;
} cand;

static void heap_push(cand *h, int64_t *n, cand c) {
    int64_t i = (*n)++;
    while (i > 0) {
        int64_t p = (i - 1) / 2;
        if (h[p].key <= c.key) break;
        h[i] = h[p];
        i = p;
    }
    h[i] = c;
}

static cand heap_pop(cand *h, int64_t *n) {
    cand top = h[0], last = h[--(*n)];
    int64_t i = 0;
    for (;;) {
        int64_t l = 2 * i + 1;
        if (l >= *n) break;
        int64_t c = l + 1 < *n && h[l + 1].key < h[l].key ? l + 1 : l;
        if (h[c].key >= last.key) break;
        h[i] = h[c];
        i = c;
    }
    h[i] = last;
    return top;
}

/* Merge a long pre-token w[0..L): pieces start at byte positions linked by next/prev. Writes
 * the ids to out; returns their count, or -1 if scratch could not be allocated. */
static int64_t merge_heap(const sm_bpe *b, const uint8_t *w, int64_t L, int32_t *out) {
    int32_t *id = (int32_t *)malloc((size_t)L * sizeof(int32_t));
    int64_t *next = (int64_t *)malloc((size_t)L * sizeof(int64_t));
    int64_t *prev = (int64_t *)malloc((size_t)L * sizeof(int64_t));
    cand *heap = (cand *)malloc((size_t)(3 * L) * sizeof(cand));
    int64_t count = -1, hn = 0;
    if (!id || !next || !prev || !heap) goto done;
    for (int64_t i = 0; i < L; i++) {
        id[i] = b->byte_tok[w[i]];
        next[i] = i + 1 < L ? i + 1 : -1;
        prev[i] = i - 1;
    }
    uint32_t pr;
    int32_t res;
    for (int64_t i = 0; i + 1 < L; i++)
        if (pair_find(b, id[i], id[i + 1], &pr, &res))
            heap_push(heap, &hn, (cand){((uint64_t)pr << 32) | (uint64_t)i, id[i], id[i + 1]});
    while (hn > 0) {
        cand c = heap_pop(heap, &hn);
        int64_t i = (int64_t)(c.key & 0xFFFFFFFFu), j = next[i];
        if (id[i] != c.left_id || j < 0 || id[j] != c.right_id) continue; /* stale */
        /* (a removed piece has id -1, so a stale entry at its position never matches) */
        pair_find(b, id[i], id[j], &pr, &res);
        id[i] = res;
        id[j] = -1;
        next[i] = next[j];
        if (next[j] >= 0) prev[next[j]] = i;
        if (prev[i] >= 0 && pair_find(b, id[prev[i]], id[i], &pr, &res))
            heap_push(heap, &hn, (cand){((uint64_t)pr << 32) | (uint64_t)prev[i], id[prev[i]], id[i]});
        if (next[i] >= 0 && pair_find(b, id[i], id[next[i]], &pr, &res))
            heap_push(heap, &hn, (cand){((uint64_t)pr << 32) | (uint64_t)i, id[i], id[next[i]]});
    }
    count = 0;
    for (int64_t i = 0; i >= 0; i = next[i]) out[count++] = id[i];
done:
    free(id);
    free(next);
    free(prev);
    free(heap);
    return count;
}

/* The ids of one pre-token w[0..L) into out; returns their count (-1: out of memory). */
static int64_t encode_word(const sm_bpe *b, const uint8_t *w, int64_t L, int32_t *out) {
    if (L == 1) {
        out[0] = b->byte_tok[w[0]];
        return 1;
    }
    if (b->whole_words) {
        int32_t id = lookup_bytes(b, w, L);
        if (id >= 0) {
            out[0] = id;
            return 1;
        }
    }
    if (L > SHORT_WORD || L >= (int64_t)1 << 31) return merge_heap(b, w, L, out);
    for (int64_t i = 0; i < L; i++) out[i] = b->byte_tok[w[i]];
    return merge_scan(b, out, L);
}

int64_t sm_bpe_encode(const sm_bpe *b, const uint8_t *text, int64_t n, int32_t *out, int64_t cap) {
    int64_t count = 0;
    (void)cap; /* n ids always suffice (each covers at least one byte); cap >= n is the contract */
    for (int64_t at = 0; at < n;) {
        int64_t end = b->pattern == SM_BPE_PAT_CL100K ? cl100k_end(text, n, at) : gpt2_end(text, n, at);
        int64_t got = encode_word(b, text + at, end - at, out + count);
        if (got < 0) return -1;
        count += got;
        at = end;
    }
    return count;
}

void sm_bpe_encode_batch(const sm_bpe *b, const uint8_t *text, const int64_t *starts,
                         int64_t n_docs, int32_t *out, int64_t *counts, int nthreads) {
    int64_t total = n_docs > 0 ? starts[n_docs] - starts[0] : 0;
    int nt = sm_team_size(nthreads, n_docs, (double)total * 16);
    int64_t next_doc = 0; /* documents are handed out one at a time: sizes vary */
    (void)nt;
    SM_PARALLEL(nt)
    {
        for (;;) {
            int64_t d = __atomic_fetch_add(&next_doc, 1, __ATOMIC_RELAXED);
            if (d >= n_docs) break;
            counts[d] = sm_bpe_encode(b, text + starts[d], starts[d + 1] - starts[d],
                                      out + (starts[d] - starts[0]), starts[d + 1] - starts[d]);
        }
    }
}

/* ---- training ----------------------------------------------------------------------------------
 * Words are the distinct pre-tokens, each with its count and its current symbols. Every pair of
 * adjacent symbols has a count (summed over words, weighted by their counts) and a list of the
 * words it occurs in. A max-heap orders the pairs by count (entries go stale as counts move:
 * an entry is checked against the current count when it comes to the top). Merging a pair
 * rewrites only the words on its list: each one's pairs are taken out of the counts, its
 * occurrences are joined left to right, and its pairs are put back - the pairs with the new
 * symbol join the heap and note the word. */

typedef struct {
    int64_t count;
    int32_t *words;   /* words it (may) occur in; duplicates allowed */
    int64_t n_words, cap;
    int32_t a, b;
    int64_t stamp;    /* the merge that last pushed it onto the heap */
} pair_info;

typedef struct {
    uint64_t *key;     /* (a << 32 | b) + 1, 0: empty */
    int64_t *pid;
    uint64_t mask;
    int64_t used;
    pair_info *info;
    int64_t n_info, cap_info;
} pair_table;

static int pt_grow(pair_table *t) {
    uint64_t size = t->key ? (t->mask + 1) * 2 : 1 << 16;
    uint64_t *nk = (uint64_t *)calloc((size_t)size, sizeof(uint64_t));
    int64_t *np = (int64_t *)malloc((size_t)size * sizeof(int64_t));
    if (!nk || !np) {
        free(nk);
        free(np);
        return -1;
    }
    for (uint64_t i = 0; t->key && i <= t->mask; i++)
        if (t->key[i]) {
            uint64_t h = hash_pair(t->key[i]) & (size - 1);
            while (nk[h]) h = (h + 1) & (size - 1);
            nk[h] = t->key[i];
            np[h] = t->pid[i];
        }
    free(t->key);
    free(t->pid);
    t->key = nk;
    t->pid = np;
    t->mask = size - 1;
    return 0;
}

/* The pair's id, created (count 0) if new; -1 if out of memory. */
static int64_t pt_get(pair_table *t, int32_t a, int32_t b) {
    if (!t->key || (uint64_t)(t->used + 1) * 2 > t->mask + 1)
        if (pt_grow(t)) return -1;
    uint64_t key = (((uint64_t)(uint32_t)a << 32) | (uint32_t)b) + 1;
    uint64_t h = hash_pair(key) & t->mask;
    for (; t->key[h]; h = (h + 1) & t->mask)
        if (t->key[h] == key) return t->pid[h];
    if (t->n_info == t->cap_info) {
        int64_t cap = t->cap_info ? 2 * t->cap_info : 1 << 15;
        pair_info *ni = (pair_info *)realloc(t->info, (size_t)cap * sizeof(pair_info));
        if (!ni) return -1;
        t->info = ni;
        t->cap_info = cap;
    }
    t->key[h] = key;
    t->pid[h] = t->n_info;
    t->used++;
    t->info[t->n_info] = (pair_info){0, NULL, 0, 0, a, b, -1};
    return t->n_info++;
}

static int note_word(pair_info *p, int32_t w) {
    if (p->n_words && p->words[p->n_words - 1] == w) return 0;
    if (p->n_words == p->cap) {
        int64_t cap = p->cap ? 2 * p->cap : 4;
        int32_t *nw = (int32_t *)realloc(p->words, (size_t)cap * sizeof(int32_t));
        if (!nw) return -1;
        p->words = nw;
        p->cap = cap;
    }
    p->words[p->n_words++] = w;
    return 0;
}

typedef struct {
    int64_t count;
    int32_t a, b;
} heap_item;

/* a before b in the heap: more frequent first, then the smaller ids */
SM_INLINE int item_before(heap_item x, heap_item y) {
    if (x.count != y.count) return x.count > y.count;
    if (x.a != y.a) return x.a < y.a;
    return x.b < y.b;
}

typedef struct {
    heap_item *h;
    int64_t n, cap;
} item_heap;

static int ih_push(item_heap *q, heap_item it) {
    if (q->n == q->cap) {
        int64_t cap = q->cap ? 2 * q->cap : 1 << 16;
        heap_item *nh = (heap_item *)realloc(q->h, (size_t)cap * sizeof(heap_item));
        if (!nh) return -1;
        q->h = nh;
        q->cap = cap;
    }
    int64_t i = q->n++;
    while (i > 0) {
        int64_t p = (i - 1) / 2;
        if (!item_before(it, q->h[p])) break;
        q->h[i] = q->h[p];
        i = p;
    }
    q->h[i] = it;
    return 0;
}

static heap_item ih_pop(item_heap *q) {
    heap_item top = q->h[0], last = q->h[--q->n];
    int64_t i = 0;
    for (;;) {
        int64_t l = 2 * i + 1;
        if (l >= q->n) break;
        int64_t c = l + 1 < q->n && item_before(q->h[l + 1], q->h[l]) ? l + 1 : l;
        if (!item_before(q->h[c], last)) break;
        q->h[i] = q->h[c];
        i = c;
    }
    q->h[i] = last;
    return top;
}

int64_t sm_bpe_train(const uint8_t *text, const int64_t *starts, int64_t n_docs, int pattern,
                     int64_t max_merges, int64_t min_count, int32_t *merge_a, int32_t *merge_b) {
    if (!__atomic_load_n(&latin1_ready, __ATOMIC_ACQUIRE)) latin1_init();
    int64_t result = -1, n_words = 0, cap_words = 1 << 14;
    int64_t *w_off = NULL, *w_len = NULL, *w_count = NULL, *w_sym_at = NULL;
    int32_t *w_nsym = NULL, *sym = NULL, *slot = NULL;
    pair_table pt = {0};
    item_heap q = {0};
    int64_t *touched = NULL, n_touched = 0, cap_touched = 0;
    if (min_count < 1) min_count = 1;

    /* 1. distinct pre-tokens and their counts */
    uint64_t smask = (1 << 16) - 1;
    slot = (int32_t *)malloc((smask + 1) * sizeof(int32_t));
    w_off = (int64_t *)malloc((size_t)cap_words * sizeof(int64_t));
    w_len = (int64_t *)malloc((size_t)cap_words * sizeof(int64_t));
    w_count = (int64_t *)malloc((size_t)cap_words * sizeof(int64_t));
    if (!slot || !w_off || !w_len || !w_count) goto done;
    memset(slot, 0xFF, (smask + 1) * sizeof(int32_t));
    for (int64_t d = 0; d < n_docs; d++) {
        const int64_t n = starts[d + 1];
        for (int64_t at = starts[d]; at < n;) {
            int64_t end = pattern == SM_BPE_PAT_CL100K ? cl100k_end(text, n, at) : gpt2_end(text, n, at);
            int64_t len = end - at;
            uint64_t h = hash_bytes(text + at, len) & smask;
            for (; slot[h] >= 0; h = (h + 1) & smask) {
                int32_t w = slot[h];
                if (w_len[w] == len && memcmp(text + w_off[w], text + at, (size_t)len) == 0) break;
            }
            if (slot[h] >= 0) {
                w_count[slot[h]]++;
            } else {
                if (n_words == cap_words) {
                    cap_words *= 2;
                    int64_t *a = (int64_t *)realloc(w_off, (size_t)cap_words * sizeof(int64_t));
                    if (!a) goto done;
                    w_off = a;
                    a = (int64_t *)realloc(w_len, (size_t)cap_words * sizeof(int64_t));
                    if (!a) goto done;
                    w_len = a;
                    a = (int64_t *)realloc(w_count, (size_t)cap_words * sizeof(int64_t));
                    if (!a) goto done;
                    w_count = a;
                }
                slot[h] = (int32_t)n_words;
                w_off[n_words] = at;
                w_len[n_words] = len;
                w_count[n_words] = 1;
                n_words++;
                if ((uint64_t)n_words * 2 > smask + 1) { /* rehash */
                    uint64_t nm = (smask + 1) * 2 - 1;
                    int32_t *ns = (int32_t *)malloc((nm + 1) * sizeof(int32_t));
                    if (!ns) goto done;
                    memset(ns, 0xFF, (nm + 1) * sizeof(int32_t));
                    for (int64_t w = 0; w < n_words; w++) {
                        uint64_t g = hash_bytes(text + w_off[w], w_len[w]) & nm;
                        while (ns[g] >= 0) g = (g + 1) & nm;
                        ns[g] = (int32_t)w;
                    }
                    free(slot);
                    slot = ns;
                    smask = nm;
                }
            }
            at = end;
        }
    }

    /* 2. symbols (bytes) and the pairs */
    int64_t total = 0;
    w_sym_at = (int64_t *)malloc((size_t)(n_words + 1) * sizeof(int64_t));
    w_nsym = (int32_t *)malloc((size_t)(n_words + 1) * sizeof(int32_t));
    if (!w_sym_at || !w_nsym) goto done;
    for (int64_t w = 0; w < n_words; w++) {
        w_sym_at[w] = total;
        w_nsym[w] = (int32_t)w_len[w];
        total += w_len[w];
    }
    sym = (int32_t *)malloc((size_t)(total > 0 ? total : 1) * sizeof(int32_t));
    if (!sym) goto done;
    for (int64_t w = 0; w < n_words; w++)
        for (int64_t k = 0; k < w_len[w]; k++) sym[w_sym_at[w] + k] = text[w_off[w] + k];
    for (int64_t w = 0; w < n_words; w++) {
        const int32_t *s = sym + w_sym_at[w];
        for (int32_t k = 0; k + 1 < w_nsym[w]; k++) {
            int64_t p = pt_get(&pt, s[k], s[k + 1]);
            if (p < 0 || note_word(&pt.info[p], (int32_t)w)) goto done;
            pt.info[p].count += w_count[w];
        }
    }
    for (uint64_t i = 0; i <= pt.mask; i++)
        if (pt.key[i]) {
            uint64_t key = pt.key[i] - 1;
            heap_item it = {pt.info[pt.pid[i]].count, (int32_t)(key >> 32), (int32_t)(uint32_t)key};
            if (it.count >= min_count && ih_push(&q, it)) goto done;
        }

    /* 3. merges */
    int64_t m = 0;
    while (m < max_merges && q.n > 0) {
        heap_item it = ih_pop(&q);
        int64_t p = pt_get(&pt, it.a, it.b);
        if (p < 0) goto done;
        int64_t now = pt.info[p].count;
        if (now != it.count) { /* stale: try again at its current count */
            if (now >= min_count && now < it.count && ih_push(&q, (heap_item){now, it.a, it.b})) goto done;
            continue;
        }
        const int32_t a = it.a, b = it.b, c = 256 + (int32_t)m;
        merge_a[m] = a;
        merge_b[m] = b;
        m++;
        /* the words on the pair's list (a copy: the list may grow while we go) */
        int64_t nw = pt.info[p].n_words;
        int32_t *list = (int32_t *)malloc((size_t)(nw > 0 ? nw : 1) * sizeof(int32_t));
        if (!list) goto done;
        memcpy(list, pt.info[p].words, (size_t)nw * sizeof(int32_t));
        for (int64_t li = 0; li < nw; li++) {
            const int32_t w = list[li];
            if (li > 0 && list[li - 1] == w) continue;
            int32_t *s = sym + w_sym_at[w];
            int32_t n = w_nsym[w];
            int found = 0;
            for (int32_t k = 0; k + 1 < n; k++)
                if (s[k] == a && s[k + 1] == b) {
                    found = 1;
                    break;
                }
            if (!found) continue; /* an old entry: the word no longer has the pair */
            const int64_t f = w_count[w];
            for (int32_t k = 0; k + 1 < n; k++) pt.info[pt_get(&pt, s[k], s[k + 1])].count -= f;
            int32_t o = 0;
            for (int32_t k = 0; k < n;) {
                if (k + 1 < n && s[k] == a && s[k + 1] == b) {
                    s[o++] = c;
                    k += 2;
                } else {
                    s[o++] = s[k++];
                }
            }
            w_nsym[w] = n = o;
            for (int32_t k = 0; k + 1 < n; k++) {
                int64_t q2 = pt_get(&pt, s[k], s[k + 1]);
                if (q2 < 0) {
                    free(list);
                    goto done;
                }
                pt.info[q2].count += f;
                if (s[k] == c || s[k + 1] == c) {
                    if (note_word(&pt.info[q2], w)) {
                        free(list);
                        goto done;
                    }
                    if (n_touched == cap_touched) {
                        cap_touched = cap_touched ? 2 * cap_touched : 1024;
                        int64_t *nt = (int64_t *)realloc(touched, (size_t)cap_touched * sizeof(int64_t));
                        if (!nt) {
                            free(list);
                            goto done;
                        }
                        touched = nt;
                    }
                    touched[n_touched++] = q2;
                }
            }
        }
        free(list);
        free(pt.info[p].words); /* the pair is gone from every word */
        pt.info[p].words = NULL;
        pt.info[p].n_words = pt.info[p].cap = 0;
        /* the pairs with the new symbol enter the heap at their final counts, once each */
        for (int64_t t = 0; t < n_touched; t++) {
            pair_info *pi = &pt.info[touched[t]];
            if (pi->stamp == m) continue;
            pi->stamp = m;
            if (pi->count >= min_count && ih_push(&q, (heap_item){pi->count, pi->a, pi->b})) goto done;
        }
        n_touched = 0;
    }
    result = m;
done:
    free(slot);
    free(w_off);
    free(w_len);
    free(w_count);
    free(w_sym_at);
    free(w_nsym);
    free(sym);
    for (int64_t i = 0; i < pt.n_info; i++) free(pt.info[i].words);
    free(pt.info);
    free(pt.key);
    free(pt.pid);
    free(q.h);
    free(touched);
    return result;
}
