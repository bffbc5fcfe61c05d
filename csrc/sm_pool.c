/* sm_pool.c - the MemoryPool (see sm_pool.h for the contract): size classes with idle lists
 * under one mutex per pool, block headers for validated returns, reference counting for safe
 * disposal, and the process-wide default pool. Leaves out per-thread caches: the lock is held
 * for a few pointer and counter updates only, which is far below the cost of the kernels that
 * rent, and a single lock keeps the statistics exact. A rent prefers, among the first few idle
 * blocks of its class, one the same thread returned: that block is still in this core's
 * caches, where another thread's would have to come over from the other core's (two Python
 * threads running small forwards lost a third of their speed to that). */
#include "sm_pool.h"

#include <stdlib.h>
#include <string.h>

#include "sm_sync.h"

#if !defined(_WIN32)
#include <pthread.h>
#include <time.h>
#else
#include <windows.h>
#endif

/* Every block starts with a header of exactly one cache line, so the pointer handed out (right
 * after it) keeps the allocation's 64-byte alignment. */
#define HDR_BYTES 64
/* State words: a block is outstanding, idle in its pool, or about to be freed. Random-looking
 * constants so that a pointer that never came from a pool is very unlikely to pass. */
#define MAGIC_OUT 0x7a3c51e9b4d26f08ULL
#define MAGIC_IDLE 0x2d94f0c6a17e83b5ULL
#define MAGIC_DEAD 0ULL

typedef struct sm_block {
    uint64_t magic;
    sm_pool *pool;         /* owner; fixed for the block's life */
    struct sm_block *next; /* idle-list link, meaningful only while idle */
    size_t capacity;       /* usable bytes after the header */
    int64_t bucket;        /* size class, or -1 for an oversize block */
    uintptr_t thread;      /* thread_tag() of the thread that returned it last */
} sm_block;
/* The header must fit in its cache line (a negative array size fails the build otherwise). */
typedef char sm_block_header_fits[(sizeof(sm_block) <= HDR_BYTES) ? 1 : -1];

typedef struct {
    sm_block *head;
    int64_t count;
} sm_bucket;

struct sm_pool {
    sm_mutex lock;
    struct sm_pool *reg_prev, *reg_next; /* the registry of live pools (fork safety, below) */
    size_t max_buffer_size;
    int64_t max_per_bucket;
    uint64_t max_pooled_bytes; /* UINT64_MAX when unlimited */
    int64_t refs;              /* creator's reference + sm_pool_retain's + in-flight misses */
    int disposed;
    int is_default;   /* set once before the pool is published, never changed */
    sm_pool_stats st; /* counters, under `lock` */
    int nbuckets;
    sm_bucket buckets[]; /* one per size class up to max_buffer_size's */
};

static volatile int64_t g_live_pools, g_live_blocks, g_live_bytes;

/* A number that tells threads apart. (Not a thread-local variable's address: in a shared
 * library that takes __tls_get_addr, a dependency on the dynamic loader the wheel check
 * refuses; pthread_self is libc's and costs a register read.) */
#if defined(_WIN32)
static uintptr_t thread_tag(void) { return (uintptr_t)GetCurrentThreadId() + 1; }
#else
static uintptr_t thread_tag(void) { return (uintptr_t)pthread_self(); }
#endif

/* Idle blocks a rent looks through for one its own thread returned. */
#define AFFINITY_SCAN 4
static void *volatile g_default_pool;

/* ---- size classes ---------------------------------------------------------------------- */

static int floor_log2(uint64_t x) { /* x >= 1 */
#if defined(__GNUC__) || defined(__clang__)
    return 63 - __builtin_clzll(x);
#else
    int r = 0;
    while (x >>= 1) r++;
    return r;
#endif
}

int sm_pool_size_class(size_t bytes) {
    if (bytes <= 512) return bytes == 0 ? 0 : (int)((bytes + 63) / 64) - 1;
    /* 2^e < bytes <= 2^(e+1), e >= 9: four classes of 2^(e-2) bytes each above 2^e. */
    int e = floor_log2((uint64_t)(bytes - 1));
    size_t step = (size_t)1 << (e - 2);
    size_t sub = (bytes - ((size_t)1 << e) + step - 1) / step; /* 1..4 */
    return 8 + (e - 9) * 4 + (int)sub - 1;
}

size_t sm_pool_class_size(int c) {
    if (c < 0) return 0;
    if (c < 8) return (size_t)(c + 1) * 64;
    int e = 9 + (c - 8) / 4;
    size_t sub = (size_t)((c - 8) % 4 + 1);
    return ((size_t)1 << e) + sub * ((size_t)1 << (e - 2));
}

/* ---- blocks ---------------------------------------------------------------------------- */

static sm_block *hdr_of(const void *block) { return (sm_block *)((char *)block - HDR_BYTES); }
static void *user_of(sm_block *b) { return (char *)b + HDR_BYTES; }

static sm_block *block_alloc(sm_pool *p, size_t capacity, int64_t bucket) {
    sm_block *b = (sm_block *)sm_aligned_alloc(HDR_BYTES + capacity);
    if (!b) return NULL;
    b->magic = MAGIC_OUT;
    b->pool = p;
    b->next = NULL;
    b->capacity = capacity;
    b->bucket = bucket;
    b->thread = 0;
    sm_atomic_add_i64(&g_live_blocks, 1);
    sm_atomic_add_i64(&g_live_bytes, (int64_t)capacity);
    return b;
}

static void block_free(sm_block *b) {
    int64_t cap = (int64_t)b->capacity;
    /* Clear the state word through a volatile store (a plain one before free() may be
     * optimized away), so a stale pointer returned later most likely reads "not a block". */
    *(volatile uint64_t *)&b->magic = MAGIC_DEAD;
    sm_aligned_free(b);
    sm_atomic_add_i64(&g_live_blocks, -1);
    sm_atomic_add_i64(&g_live_bytes, -cap);
}

static void free_chain(sm_block *b) {
    while (b) {
        sm_block *next = b->next;
        block_free(b);
        b = next;
    }
}

/* Unlink every idle block (caller holds the lock); they are freed after unlocking. */
static sm_block *detach_idle(sm_pool *p) {
    sm_block *chain = NULL;
    for (int i = 0; i < p->nbuckets; i++) {
        sm_block *b = p->buckets[i].head;
        while (b) {
            sm_block *next = b->next;
            b->magic = MAGIC_DEAD;
            b->next = chain;
            chain = b;
            b = next;
        }
        p->buckets[i].head = NULL;
        p->buckets[i].count = 0;
    }
    p->st.trimmed += p->st.pooled_buffers;
    p->st.pooled_buffers = 0;
    p->st.pooled_bytes = 0;
    return chain;
}

/* ---- pool lifetime ------------------------------------------------------------------------ */

/* Caller holds the lock. The default pool is never freed. */
static int should_destroy(const sm_pool *p) {
    return p->disposed && p->refs == 0 && p->st.outstanding_buffers == 0 && !p->is_default;
}

/* ---- fork safety ----------------------------------------------------------------------------
 * A fork() while another thread holds a pool's lock (mid-rent) would leave the child with a
 * lock nobody will release: its first rent from that pool would wait forever. So every live
 * pool is in a registry, and pthread_atfork takes all their locks around fork() - the forking
 * thread then holds them in parent and child alike, and releases them in both. Lock order:
 * the registry, then pools; no path takes the registry while holding a pool's lock. */
#if !defined(_WIN32)
static pthread_mutex_t g_registry = PTHREAD_MUTEX_INITIALIZER;
static sm_pool *g_pools; /* head of the registry */
static pthread_once_t g_pool_atfork_once = PTHREAD_ONCE_INIT;

static void pools_lock_all(void) {
    pthread_mutex_lock(&g_registry);
    for (sm_pool *p = g_pools; p; p = p->reg_next) sm_mutex_lock(&p->lock);
}
static void pools_unlock_all(void) {
    for (sm_pool *p = g_pools; p; p = p->reg_next) sm_mutex_unlock(&p->lock);
    pthread_mutex_unlock(&g_registry);
}
static void pools_register_atfork(void) {
    pthread_atfork(pools_lock_all, pools_unlock_all, pools_unlock_all);
}
static void registry_add(sm_pool *p) {
    pthread_once(&g_pool_atfork_once, pools_register_atfork);
    pthread_mutex_lock(&g_registry);
    p->reg_prev = NULL;
    p->reg_next = g_pools;
    if (g_pools) g_pools->reg_prev = p;
    g_pools = p;
    pthread_mutex_unlock(&g_registry);
}
static void registry_remove(sm_pool *p) {
    pthread_mutex_lock(&g_registry);
    if (p->reg_prev) p->reg_prev->reg_next = p->reg_next;
    else g_pools = p->reg_next;
    if (p->reg_next) p->reg_next->reg_prev = p->reg_prev;
    pthread_mutex_unlock(&g_registry);
}
#else
static void registry_add(sm_pool *p) { (void)p; }
static void registry_remove(sm_pool *p) { (void)p; }
#endif

static void pool_destroy(sm_pool *p) {
    registry_remove(p);
    sm_mutex_destroy(&p->lock);
    free(p);
    sm_atomic_add_i64(&g_live_pools, -1);
}

int sm_pool_create(sm_pool **out, size_t max_buffer_size, int64_t max_buffers_per_bucket,
                   size_t max_pooled_bytes) {
    if (!out) return SM_ERR_ARG;
    *out = NULL;
    if (max_buffer_size < 1 || max_buffer_size > SM_POOL_MAX_BUFFER_LIMIT) return SM_ERR_ARG;
    if (max_buffers_per_bucket < 0 || max_buffers_per_bucket > SM_POOL_MAX_PER_BUCKET_LIMIT)
        return SM_ERR_ARG;
    int nb = sm_pool_size_class(max_buffer_size) + 1;
    sm_pool *p = (sm_pool *)calloc(1, sizeof(sm_pool) + (size_t)nb * sizeof(sm_bucket));
    if (!p) return SM_ERR_NOMEM;
    if (sm_mutex_init(&p->lock) != 0) {
        free(p);
        return SM_ERR_NOMEM;
    }
    p->max_buffer_size = max_buffer_size;
    p->max_per_bucket = max_buffers_per_bucket;
    int unlimited = max_pooled_bytes == SM_POOL_UNLIMITED || (uint64_t)max_pooled_bytes > (uint64_t)INT64_MAX;
    p->max_pooled_bytes = unlimited ? UINT64_MAX : (uint64_t)max_pooled_bytes;
    p->refs = 1;
    p->nbuckets = nb;
    p->st.max_buffer_size = (int64_t)max_buffer_size;
    p->st.max_buffers_per_bucket = max_buffers_per_bucket;
    p->st.max_pooled_bytes = unlimited ? -1 : (int64_t)max_pooled_bytes;
    p->st.num_buckets = nb;
    registry_add(p);
    sm_atomic_add_i64(&g_live_pools, 1);
    *out = p;
    return SM_OK;
}

sm_pool *sm_pool_default(void) {
    sm_pool *p = (sm_pool *)sm_atomic_load_ptr(&g_default_pool);
    if (p) return p;
    /* First use: several threads may race here; each builds a candidate, one wins the
     * compare-and-swap, the others throw theirs away (it never held a block). */
    sm_pool *mine = NULL;
    if (sm_pool_create(&mine, SM_POOL_DEFAULT_MAX_BUFFER_SIZE, SM_POOL_DEFAULT_MAX_PER_BUCKET,
                       SM_POOL_DEFAULT_MAX_POOLED_BYTES) != SM_OK)
        return (sm_pool *)sm_atomic_load_ptr(&g_default_pool);
    mine->is_default = 1;
    mine->st.is_default = 1;
    if (sm_atomic_cas_ptr(&g_default_pool, NULL, mine)) return mine;
    pool_destroy(mine);
    return (sm_pool *)sm_atomic_load_ptr(&g_default_pool);
}

int sm_pool_dispose(sm_pool *p) {
    if (!p) return SM_ERR_ARG;
    if (p->is_default) return SM_ERR_STATE;
    sm_mutex_lock(&p->lock);
    if (p->disposed) { /* only reachable by a holder of a retained reference */
        sm_mutex_unlock(&p->lock);
        return SM_OK;
    }
    p->disposed = 1;
    p->st.disposed = 1;
    sm_block *chain = detach_idle(p);
    p->refs--; /* the creator's */
    int destroy = should_destroy(p);
    sm_mutex_unlock(&p->lock);
    free_chain(chain);
    if (destroy) pool_destroy(p);
    return SM_OK;
}

void sm_pool_retain(sm_pool *p) {
    if (!p) return;
    sm_mutex_lock(&p->lock);
    p->refs++;
    sm_mutex_unlock(&p->lock);
}

void sm_pool_release(sm_pool *p) {
    if (!p) return;
    sm_mutex_lock(&p->lock);
    p->refs--;
    int destroy = should_destroy(p);
    sm_mutex_unlock(&p->lock);
    if (destroy) pool_destroy(p);
}

/* ---- rent and return ------------------------------------------------------------------------ */

int sm_pool_rent_ex(void **out, sm_pool *p, size_t bytes) {
    if (!out) return SM_ERR_ARG;
    *out = NULL;
    if (!p || bytes > SM_POOL_MAX_RENT_BYTES) return SM_ERR_ARG;
    int64_t bucket = -1;
    size_t cap;
    if (bytes <= p->max_buffer_size) {
        bucket = sm_pool_size_class(bytes);
        cap = sm_pool_class_size((int)bucket);
    } else {
        cap = (bytes + (SM_ALIGN - 1)) & ~(size_t)(SM_ALIGN - 1);
    }

    sm_mutex_lock(&p->lock);
    if (p->disposed) {
        sm_mutex_unlock(&p->lock);
        return SM_ERR_DISPOSED;
    }
    sm_block *b = bucket >= 0 ? p->buckets[bucket].head : NULL;
    if (b) { /* hit: the whole rent is an unlink and a few counters */
        sm_block **link = &p->buckets[bucket].head;
        const uintptr_t me = thread_tag();
        sm_block **at = link;
        for (int i = 0; i < AFFINITY_SCAN && *at; i++, at = &(*at)->next)
            if ((*at)->thread == me) {
                link = at;
                break;
            }
        b = *link;
        *link = b->next;
        p->buckets[bucket].count--;
        b->magic = MAGIC_OUT;
        b->next = NULL;
        p->st.pooled_buffers--;
        p->st.pooled_bytes -= (int64_t)cap;
        p->st.hits++;
        p->st.rents++;
        p->st.outstanding_buffers++;
        p->st.outstanding_bytes += (int64_t)cap;
        if (p->st.outstanding_bytes > p->st.peak_outstanding_bytes)
            p->st.peak_outstanding_bytes = p->st.outstanding_bytes;
        sm_mutex_unlock(&p->lock);
        *out = user_of(b);
        return SM_OK;
    }
    /* Miss: allocate outside the lock. The reference keeps the pool object alive if another
     * thread disposes it meanwhile; the rent still succeeds (it began before the dispose) and
     * the block is freed when it comes back. */
    p->refs++;
    sm_mutex_unlock(&p->lock);

    b = block_alloc(p, cap, bucket);

    sm_mutex_lock(&p->lock);
    p->refs--;
    int destroy = 0;
    if (b) {
        p->st.misses++;
        p->st.rents++;
        p->st.outstanding_buffers++;
        p->st.outstanding_bytes += (int64_t)cap;
        if (p->st.outstanding_bytes > p->st.peak_outstanding_bytes)
            p->st.peak_outstanding_bytes = p->st.outstanding_bytes;
    } else {
        p->st.failed_rents++;
        destroy = should_destroy(p);
    }
    sm_mutex_unlock(&p->lock);
    if (destroy) pool_destroy(p);
    if (!b) return SM_ERR_NOMEM;
    *out = user_of(b);
    return SM_OK;
}

void *sm_pool_rent(sm_pool *p, size_t bytes) {
    void *out = NULL;
    sm_pool_rent_ex(&out, p, bytes);
    return out;
}

static int pool_return(sm_pool *expect, void *block) {
    if (!block) return SM_OK;
    sm_block *b = hdr_of(block);
    uint64_t magic = *(volatile uint64_t *)&b->magic;
    if (magic != MAGIC_OUT && magic != MAGIC_IDLE) return SM_ERR_ARG;
    sm_pool *p = b->pool;
    if (expect && p != expect) {
        sm_mutex_lock(&expect->lock);
        expect->st.bad_returns++;
        sm_mutex_unlock(&expect->lock);
        return SM_ERR_ARG;
    }
    sm_mutex_lock(&p->lock);
    if (b->magic != MAGIC_OUT) { /* idle in the pool already: a double return */
        p->st.bad_returns++;
        sm_mutex_unlock(&p->lock);
        return SM_ERR_STATE;
    }
    int64_t cap = (int64_t)b->capacity;
    p->st.returns++;
    p->st.outstanding_buffers--;
    p->st.outstanding_bytes -= cap;
    if (b->bucket >= 0 && !p->disposed) {
        sm_bucket *bk = &p->buckets[b->bucket];
        if (bk->count < p->max_per_bucket &&
            (uint64_t)(p->st.pooled_bytes + cap) <= p->max_pooled_bytes) {
            b->magic = MAGIC_IDLE;
            b->thread = thread_tag();
            b->next = bk->head;
            bk->head = b;
            bk->count++;
            p->st.pooled_buffers++;
            p->st.pooled_bytes += cap;
            sm_mutex_unlock(&p->lock);
            return SM_OK;
        }
    }
    b->magic = MAGIC_DEAD; /* under the lock, so a racing second return is refused */
    p->st.discarded++;
    int destroy = should_destroy(p);
    sm_mutex_unlock(&p->lock);
    block_free(b);
    if (destroy) pool_destroy(p);
    return SM_OK;
}

int sm_pool_return(void *block) { return pool_return(NULL, block); }

int sm_pool_return_to(sm_pool *p, void *block) {
    if (!p) return SM_ERR_ARG;
    return pool_return(p, block);
}

sm_pool *sm_pool_block_pool(const void *block) { return block ? hdr_of(block)->pool : NULL; }

size_t sm_pool_block_capacity(const void *block) { return block ? hdr_of(block)->capacity : 0; }

int sm_pool_block_size_class(const void *block) { return block ? (int)hdr_of(block)->bucket : -1; }

/* ---- maintenance and statistics ---------------------------------------------------------- */

int sm_pool_trim(sm_pool *p, int64_t *freed_bytes) {
    if (freed_bytes) *freed_bytes = 0;
    if (!p) return SM_ERR_ARG;
    sm_mutex_lock(&p->lock);
    int64_t bytes = p->st.pooled_bytes;
    sm_block *chain = detach_idle(p);
    sm_mutex_unlock(&p->lock);
    free_chain(chain);
    if (freed_bytes) *freed_bytes = bytes;
    return SM_OK;
}

int sm_pool_get_stats(sm_pool_stats *out, sm_pool *p) {
    if (!out || !p) return SM_ERR_ARG;
    sm_mutex_lock(&p->lock);
    *out = p->st;
    sm_mutex_unlock(&p->lock);
    return SM_OK;
}

void sm_pool_reset_peak(sm_pool *p) {
    if (!p) return;
    sm_mutex_lock(&p->lock);
    p->st.peak_outstanding_bytes = p->st.outstanding_bytes;
    sm_mutex_unlock(&p->lock);
}

void sm_pool_global_get_stats(sm_pool_global_stats *out) {
    if (!out) return;
    out->live_pools = sm_atomic_load_i64(&g_live_pools);
    out->live_blocks = sm_atomic_load_i64(&g_live_blocks);
    out->live_bytes = sm_atomic_load_i64(&g_live_bytes);
}

/* ---- self-test ------------------------------------------------------------------------------ */

static uint64_t xorshift64s(uint64_t *s) {
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545F4914F6CDD1DULL;
}

int64_t sm_pool_stress_test(sm_pool *p, int nthreads, int64_t iters, uint64_t seed) {
    volatile int64_t errors = 0, nomem = 0;
    if (!p || nthreads < 1 || iters < 0) return -SM_ERR_ARG;
    /* Sizes up to 1.5x the pooled limit (capped at 256 KiB to keep the fill cheap), so hits,
     * misses and oversize blocks all happen. */
    size_t span = p->max_buffer_size + p->max_buffer_size / 2 + 1;
    if (span > ((size_t)256 << 10)) span = (size_t)256 << 10;
    SM_PARALLEL(nthreads)
    {
        int tid = SM_THREAD_ID();
        uint64_t s = (seed ^ (0x9E3779B97F4A7C15ULL * (uint64_t)(tid + 1))) | 1;
        uint32_t *held[4] = {NULL, NULL, NULL, NULL};
        size_t words[4] = {0, 0, 0, 0};
        uint32_t tags[4] = {0, 0, 0, 0};
        int64_t bad = 0, oom = 0;
        for (int64_t it = 0; it < iters + 4; it++) {
            int slot = it < iters ? (int)(xorshift64s(&s) & 3) : (int)(it - iters);
            if (held[slot]) {
                /* A block shared with another thread, or handed out twice, shows up here as a
                 * word someone else overwrote. */
                for (size_t w = 0; w < words[slot]; w++)
                    if (held[slot][w] != (tags[slot] ^ (uint32_t)w)) {
                        bad++;
                        break;
                    }
                if (((uintptr_t)held[slot] & (SM_ALIGN - 1)) != 0) bad++;
                if (sm_pool_return_to(p, held[slot]) != SM_OK) bad++;
                held[slot] = NULL;
            } else if (it < iters) {
                size_t bytes = (size_t)(xorshift64s(&s) % span);
                uint32_t *blk = NULL;
                int rc = sm_pool_rent_ex((void **)&blk, p, bytes);
                if (rc == SM_ERR_DISPOSED) continue; /* disposed meanwhile: not a failure */
                if (rc != SM_OK) {
                    oom++;
                    continue;
                }
                if (sm_pool_block_capacity(blk) < bytes) bad++;
                words[slot] = bytes / 4;
                tags[slot] = (uint32_t)xorshift64s(&s);
                for (size_t w = 0; w < words[slot]; w++) blk[w] = tags[slot] ^ (uint32_t)w;
                held[slot] = blk;
            }
        }
        if (bad) sm_atomic_add_i64((volatile int64_t *)&errors, bad);
        if (oom) sm_atomic_add_i64((volatile int64_t *)&nomem, oom);
    }
    if (nomem) return -SM_ERR_NOMEM;
    return errors;
}

void sm_pool_hold_lock(sm_pool *p, int64_t micros) {
    if (!p || micros < 0) return;
    sm_mutex_lock(&p->lock);
#if defined(_WIN32)
    Sleep((DWORD)(micros / 1000));
#else
    struct timespec ts = {(time_t)(micros / 1000000), (long)(micros % 1000000) * 1000};
    while (nanosleep(&ts, &ts) != 0) {
    }
#endif
    sm_mutex_unlock(&p->lock);
}
