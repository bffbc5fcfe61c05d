/* sm_sync.h - the few synchronization primitives the C core needs, made portable: a mutex
 * (pthread on POSIX, SRWLOCK on Windows) and 64-bit / pointer atomics (GCC/Clang __atomic
 * builtins, Interlocked* on MSVC). Header-only; no condition variables, no threads: OpenMP
 * starts the threads, Python starts the others, and these only keep shared state consistent. */
#ifndef SM_SYNC_H
#define SM_SYNC_H

#include <stdint.h>

#if defined(_WIN32)
#ifndef WIN32_LEAN_AND_MEAN
#define WIN32_LEAN_AND_MEAN
#endif
#include <windows.h>
#else
#include <pthread.h>
#endif

/* ---- mutex --------------------------------------------------------------------------------
 * Not recursive. init returns 0 on success. A mutex must not be copied once initialized. */
#if defined(_WIN32)
/* SRWLOCK: no kernel object, nothing to destroy, fast uncontended path (one interlocked op). */
typedef struct {
    SRWLOCK lock;
} sm_mutex;
static inline int sm_mutex_init(sm_mutex *m) {
    InitializeSRWLock(&m->lock);
    return 0;
}
static inline void sm_mutex_destroy(sm_mutex *m) { (void)m; }
static inline void sm_mutex_lock(sm_mutex *m) { AcquireSRWLockExclusive(&m->lock); }
static inline void sm_mutex_unlock(sm_mutex *m) { ReleaseSRWLockExclusive(&m->lock); }
#else
typedef struct {
    pthread_mutex_t lock;
} sm_mutex;
static inline int sm_mutex_init(sm_mutex *m) { return pthread_mutex_init(&m->lock, NULL); }
static inline void sm_mutex_destroy(sm_mutex *m) { pthread_mutex_destroy(&m->lock); }
static inline void sm_mutex_lock(sm_mutex *m) { pthread_mutex_lock(&m->lock); }
static inline void sm_mutex_unlock(sm_mutex *m) { pthread_mutex_unlock(&m->lock); }
#endif

/* ---- atomics --------------------------------------------------------------------------------
 * Sequentially consistent unless the name says otherwise: these guard counters and one-time
 * initialization, never hot loops, so the strongest ordering costs nothing that matters. */
#if defined(_MSC_VER) && !defined(__clang__)
#include <intrin.h>
static inline int64_t sm_atomic_load_i64(volatile int64_t *p) {
    /* An interlocked no-op exchange is a full-barrier 64-bit read on every MSVC target. */
    return (int64_t)_InterlockedCompareExchange64((volatile long long *)p, 0, 0);
}
static inline void sm_atomic_store_i64(volatile int64_t *p, int64_t v) {
    (void)_InterlockedExchange64((volatile long long *)p, (long long)v);
}
/* Returns the value after the addition. */
static inline int64_t sm_atomic_add_i64(volatile int64_t *p, int64_t v) {
    return (int64_t)_InterlockedExchangeAdd64((volatile long long *)p, (long long)v) + v;
}
static inline void *sm_atomic_load_ptr(void *volatile *p) {
    return _InterlockedCompareExchangePointer(p, NULL, NULL);
}
/* Store `desired` if *p == expected; returns 1 when it did. */
static inline int sm_atomic_cas_ptr(void *volatile *p, void *expected, void *desired) {
    return _InterlockedCompareExchangePointer(p, desired, expected) == expected;
}
#else
static inline int64_t sm_atomic_load_i64(volatile int64_t *p) {
    return __atomic_load_n(p, __ATOMIC_SEQ_CST);
}
static inline void sm_atomic_store_i64(volatile int64_t *p, int64_t v) {
    __atomic_store_n(p, v, __ATOMIC_SEQ_CST);
}
static inline int64_t sm_atomic_add_i64(volatile int64_t *p, int64_t v) {
    return __atomic_add_fetch(p, v, __ATOMIC_SEQ_CST);
}
static inline void *sm_atomic_load_ptr(void *volatile *p) {
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}
static inline int sm_atomic_cas_ptr(void *volatile *p, void *expected, void *desired) {
    return __atomic_compare_exchange_n(p, &expected, desired, 0, __ATOMIC_ACQ_REL,
                                       __ATOMIC_ACQUIRE);
}
#endif

#endif /* SM_SYNC_H */
