/* sm_pool.h - the MemoryPool: 64-byte aligned scratch blocks in size classes, rented and
 * returned from any thread without the GIL, with limits, trim, statistics and safe disposal.
 *
 * Why a pool: a model step needs dozens of activation and scratch buffers; renting them from a
 * pool means steady state allocates nothing, and every concurrent call gets its own blocks.
 *
 * Size classes: 64, 128, ..., 512 bytes in steps of 64, then four classes per power of two
 * (640, 768, 896, 1024, 1280, ...), so a block wastes at most 25% of its request (64 bytes
 * for small ones). Requests up to max_buffer_size bytes are served from their class's idle
 * list; bigger ones are allocated exactly (rounded up to 64 bytes), counted as misses, and
 * freed when they come back. Each class keeps at most max_buffers_per_bucket idle blocks, and
 * the pool keeps at most max_pooled_bytes idle bytes in all; returns beyond either are freed.
 *
 * Each block carries a 64-byte header just before the pointer handed out: its pool, its size
 * class and its state. sm_pool_return reads it, so a block goes back to the pool it came from
 * without the caller naming it, and a second return of a block that is still pooled is refused
 * (SM_ERR_STATE). What C cannot detect: returning a pointer that never came from a pool, or a
 * block whose memory was already freed (returned once, then freed because its class was full,
 * or by trim/dispose) - like free(), that is undefined. The Python layer makes both impossible.
 *
 * Lifetime: sm_pool_create gives the caller one reference. sm_pool_dispose drops it: idle blocks
 * are freed at once, rent fails with SM_ERR_DISPOSED, and each outstanding block is freed when
 * it comes back. The pool object itself is freed when it is disposed, no block is outstanding
 * and no sm_pool_retain is unmatched - so returning blocks after dispose is always safe. The
 * owner must not call anything on the pool after its own sm_pool_dispose, unless it holds a
 * reference taken with sm_pool_retain before (then rent answers SM_ERR_DISPOSED, stats work).
 *
 * Threads: every function is thread-safe (one mutex per pool; the allocator is called outside
 * it). Error codes are those of sm_common.h: SM_ERR_ARG for an invalid argument, a block of a
 * different pool or not a pool block at all; SM_ERR_STATE for a double return or disposing the
 * default pool; SM_ERR_DISPOSED for renting from a disposed pool; SM_ERR_NOMEM. */
#ifndef SM_POOL_H
#define SM_POOL_H

#include "sm_common.h"

typedef struct sm_pool sm_pool;

/* "No limit" for max_pooled_bytes. */
#define SM_POOL_UNLIMITED ((size_t)-1)
/* Largest max_buffer_size a pool accepts (1 TiB), and largest single rent (64 TiB): far beyond
 * any machine, small enough that byte counts never overflow int64. */
#define SM_POOL_MAX_BUFFER_LIMIT ((size_t)1 << 40)
#define SM_POOL_MAX_RENT_BYTES ((size_t)1 << 46)
#define SM_POOL_MAX_PER_BUCKET_LIMIT ((int64_t)1 << 30)

/* Limits of the process-wide default pool (sm_pool_default): blocks up to 1 GiB are pooled,
 * at most 16 idle per class and 2 GiB idle in all; sm_pool_trim(sm_pool_default()) gives the
 * idle memory back to the system. */
#define SM_POOL_DEFAULT_MAX_BUFFER_SIZE ((size_t)1 << 30)
#define SM_POOL_DEFAULT_MAX_PER_BUCKET 16
#define SM_POOL_DEFAULT_MAX_POOLED_BYTES ((size_t)2 << 30)

/* Counters of one pool, read consistently under its lock. Bytes are block capacities (the size
 * class, or the exact rounded size of an oversize block), not the bytes asked for. */
typedef struct sm_pool_stats {
    int64_t rents;                  /* successful rents */
    int64_t returns;                /* accepted returns */
    int64_t hits;                   /* rents served from an idle block */
    int64_t misses;                 /* rents that allocated (including oversize requests) */
    int64_t outstanding_buffers;    /* rented and not yet returned */
    int64_t outstanding_bytes;
    int64_t pooled_buffers;         /* idle blocks kept for reuse */
    int64_t pooled_bytes;
    int64_t peak_outstanding_bytes; /* highest outstanding_bytes since creation / reset_peak */
    int64_t discarded;              /* returns freed at once: oversize, class full, cap, disposed */
    int64_t trimmed;                /* idle blocks freed by sm_pool_trim or sm_pool_dispose */
    int64_t bad_returns;            /* refused returns: double return, block of another pool */
    int64_t failed_rents;           /* rents the system allocator could not serve */
    int64_t max_buffer_size;        /* the limits the pool was created with (bytes) */
    int64_t max_buffers_per_bucket;
    int64_t max_pooled_bytes;       /* -1 when unlimited */
    int64_t num_buckets;            /* size classes */
    int32_t disposed;               /* 1 after sm_pool_dispose */
    int32_t is_default;             /* 1 for sm_pool_default() */
} sm_pool_stats;

/* Process-wide totals over every pool, for leak checks and memory tracking. */
typedef struct sm_pool_global_stats {
    int64_t live_pools;  /* pool objects not yet freed (disposed ones wait for their blocks) */
    int64_t live_blocks; /* blocks allocated from the system and not yet freed */
    int64_t live_bytes;  /* their capacities */
} sm_pool_global_stats;

/* Create a pool. max_buffer_size in bytes (1 .. SM_POOL_MAX_BUFFER_LIMIT), max_buffers_per_bucket
 * idle blocks per class (0 .. SM_POOL_MAX_PER_BUCKET_LIMIT; 0 pools nothing), max_pooled_bytes
 * idle bytes in all (SM_POOL_UNLIMITED for no cap). *out is NULL on error. */
int sm_pool_create(sm_pool **out, size_t max_buffer_size, int64_t max_buffers_per_bucket,
                   size_t max_pooled_bytes);

/* The shared process-wide pool the kernels rent scratch from. Created on first use (safe from
 * many threads at once), never disposed or freed. NULL only if that first allocation failed. */
sm_pool *sm_pool_default(void);

/* Rent a 64-byte aligned block of at least `bytes` bytes (0 gives the smallest class). The
 * contents are uninitialized. Returns SM_OK, SM_ERR_ARG (p NULL, bytes > SM_POOL_MAX_RENT_BYTES),
 * SM_ERR_DISPOSED or SM_ERR_NOMEM; *out is NULL on error. */
int sm_pool_rent_ex(void **out, sm_pool *p, size_t bytes);
/* Same, malloc style: the block, or NULL on any error. */
void *sm_pool_rent(sm_pool *p, size_t bytes);

/* Give a block back to the pool it came from. NULL is a no-op (SM_OK), like free(NULL).
 * SM_ERR_STATE for a block that is idle in its pool (double return), SM_ERR_ARG for a pointer
 * whose header is not a pool block's; the block is untouched on error. */
int sm_pool_return(void *block);
/* Same, but also checks that the block came from `p` (SM_ERR_ARG, counted in bad_returns). */
int sm_pool_return_to(sm_pool *p, void *block);

/* The pool a rented block belongs to, its usable capacity in bytes (>= the request), and its
 * size class (-1 for an oversize block, which its return always frees). */
sm_pool *sm_pool_block_pool(const void *block);
size_t sm_pool_block_capacity(const void *block);
int sm_pool_block_size_class(const void *block);

/* Free every idle block now; *freed_bytes (if not NULL) gets their capacity. Outstanding
 * blocks are not affected. SM_OK or SM_ERR_ARG. */
int sm_pool_trim(sm_pool *p, int64_t *freed_bytes);

/* Dispose: free idle blocks, refuse further rents, drop the creator's reference. SM_ERR_STATE
 * for the default pool (which is left as it was). */
int sm_pool_dispose(sm_pool *p);

/* Extra references keep the pool object (not its idle blocks) alive across a dispose that may
 * happen on another thread; every retain needs one release. */
void sm_pool_retain(sm_pool *p);
void sm_pool_release(sm_pool *p);

/* Copy the counters (SM_OK, or SM_ERR_ARG for NULL). */
int sm_pool_get_stats(sm_pool_stats *out, sm_pool *p);
/* Set peak_outstanding_bytes to the current outstanding_bytes. */
void sm_pool_reset_peak(sm_pool *p);
void sm_pool_global_get_stats(sm_pool_global_stats *out);

/* Size-class arithmetic, exposed for tests: class index of a request (bytes >= 1) and the
 * capacity of a class. */
int sm_pool_size_class(size_t bytes);
size_t sm_pool_class_size(int size_class);

/* Self-test for the test suite: `nthreads` OpenMP threads each rent and return `iters` blocks
 * of pseudo-random sizes (holding up to four at once), fill each with a per-thread pattern and
 * check it is intact before returning. Rents refused because the pool was disposed meanwhile
 * are skipped. Returns the number of corrupted or failed blocks (0 is correct), or
 * -SM_ERR_NOMEM. */
int64_t sm_pool_stress_test(sm_pool *p, int nthreads, int64_t iters, uint64_t seed);

/* Test hook for fork safety: hold the pool's lock for `micros` microseconds, as a rent in
 * progress does for a moment, so a test can fork exactly then. */
void sm_pool_hold_lock(sm_pool *p, int64_t micros);

#endif /* SM_POOL_H */
