/* sm_common.h - shared macros for the smallmind C core: restrict/alignment, SIMD target
 * attributes, OpenMP guards, error codes, aligned allocation, small integer helpers. Plain C11,
 * no Python.h anywhere under csrc/. */
#ifndef SM_COMMON_H
#define SM_COMMON_H

#include <stddef.h>
#include <stdint.h>

#if defined(_MSC_VER)
#define SM_RESTRICT __restrict
#define SM_INLINE static __forceinline
#define SM_NOINLINE __declspec(noinline)
#else
#define SM_RESTRICT __restrict__
#define SM_INLINE static inline __attribute__((always_inline))
#define SM_NOINLINE __attribute__((noinline))
#endif

#if defined(_WIN32)
#define SM_EXPORT __declspec(dllexport)
#else
#define SM_EXPORT __attribute__((visibility("default")))
#endif

/* Every buffer the core allocates is aligned to a cache line, so SIMD loads never split lines. */
#define SM_ALIGN 64

/* Small integer helpers for sizes and tiles: the one copy every file uses. */
/* ceil(a / b), for a >= 0 and b > 0 */
SM_INLINE int64_t sm_ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
/* a rounded up to a multiple of b (a >= 0, b > 0): padded rows, cache-line-sized scratch */
SM_INLINE int64_t sm_round_up(int64_t a, int64_t b) { return sm_ceil_div(a, b) * b; }
SM_INLINE int64_t sm_min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* x86-64 builds carry AVX2 and AVX-512 micro-kernels compiled with target attributes (no
 * -march flags), chosen at run time from CPUID. Other architectures use the portable C path. */
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define SM_X86_KERNELS 1
#define SM_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define SM_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")))
#else
#define SM_X86_KERNELS 0
#endif

/* OpenMP is optional (SMALLMIND_OPENMP=0 builds without it). These keep call sites identical. */
#ifdef SM_HAVE_OPENMP
#include <omp.h>
#define SM_THREAD_ID() omp_get_thread_num()
#define SM_THREAD_COUNT() omp_get_num_threads()
#else
#define SM_THREAD_ID() 0
#define SM_THREAD_COUNT() 1
#endif
#define SM_PRAGMA(x) _Pragma(#x)
int sm_team_allowed(void);      /* sm_runtime.c: 0 in a forked child (see SM_PARALLEL) */
#ifdef SM_HAVE_OPENMP
/* Open a team of `nt` threads; a team of one runs inline with no OpenMP overhead, and so does
 * every team in a process forked from one that had run a team (sm_team_allowed: OpenMP's
 * threads do not survive fork(), and a team started in the child waits for them forever).
 * Call sites already take the team OpenMP grants (SM_THREAD_COUNT), which may be smaller. */
#define SM_PARALLEL(nt) SM_PRAGMA(omp parallel num_threads(nt) if ((nt) > 1 && sm_team_allowed()))
/* Every thread of the team waits here for the others (phases of one fused region). A team of
 * one skips it: libgomp's barrier ends in a futex wake-up system call even when nobody waits,
 * ~0.3 us each, which a small model's 1-thread decode step would pay a dozen times per token.
 * The test is the same for the whole team, so either every thread meets the barrier or none. */
#define SM_BARRIER()                                                                               \
    do {                                                                                           \
        if (omp_get_num_threads() > 1) {                                                           \
            SM_PRAGMA(omp barrier)                                                                 \
        }                                                                                          \
    } while (0)
#else
#define SM_BARRIER() ((void)0)
/* Without OpenMP the block after SM_PARALLEL runs once, inline; the budget is still "used". */
#define SM_PARALLEL(nt) (void)(nt);
#endif

/* Error codes returned by core functions (0 = success). */
enum {
    SM_OK = 0,
    SM_ERR_NOMEM = 1,    /* allocation failed */
    SM_ERR_ARG = 2,      /* invalid argument that the Python layer should have caught */
    SM_ERR_DISPOSED = 3, /* object was disposed */
    SM_ERR_STATE = 4     /* operation not allowed in the current state */
};

/* Aligned allocation that works on POSIX and Windows. Returns NULL on failure or size 0. */
void *sm_aligned_alloc(size_t bytes);
void sm_aligned_free(void *p);
/* The same for large, long-lived blocks that get streamed (a VectorIndex's rows): on Linux,
 * blocks of 4 MiB or more are 2 MiB aligned and advised to use transparent huge pages, as
 * numpy does for its arrays (a search then streams the rows with the TLB behaviour numpy's
 * brute force gets; no gain could be told from this machine's noise). Freed with
 * sm_aligned_free. */
void *sm_big_alloc(size_t bytes);

/* Split [0, n) into `parts` nearly equal contiguous ranges, each a multiple of `grain`
 * (except the last); part `i` gets [*begin, *end). Deterministic: depends only on its inputs. */
void sm_split_range(int64_t n, int64_t grain, int parts, int i, int64_t *begin, int64_t *end);

#endif /* SM_COMMON_H */
