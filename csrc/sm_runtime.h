/* sm_runtime.h - run-time facts about the machine and the build: SIMD level chosen from CPUID
 * (overridable downwards by SMALLMIND_SIMD) and the per-level compilation of plain loops,
 * thread budget and the thread-team rule, compiler, OpenMP. */
#ifndef SM_RUNTIME_H
#define SM_RUNTIME_H

#include "sm_common.h"

/* SIMD levels, ordered: a higher level implies every lower one is usable. */
typedef enum { SM_SIMD_GENERIC = 0, SM_SIMD_AVX2 = 1, SM_SIMD_AVX512 = 2 } sm_simd_level;

/* One loop, compiled once per SIMD level. A loop whose every path gives the same bits (each
 * element rounded once, no reduction: an add, a multiply by one scalar) needs no intrinsics:
 * it is written once as an SM_INLINE function NAME_body, and
 *     SM_EACH_LEVEL(NAME, (parameters), (arguments))
 * defines static void NAME_generic, NAME_avx2 and NAME_avx512 around it, the last two compiled
 * with the AVX2 / AVX-512 target attributes so the compiler vectorizes the same loop for 256-
 * and 512-bit registers (NAME_generic gets the baseline: SSE2 on x86-64, NEON on arm64).
 * SM_PICK_LEVEL(NAME, level) picks one, so the level comes from sm_simd_active() as for every
 * other kernel and SMALLMIND_SIMD / sm_simd_set keep deciding which code runs: GCC's
 * target_clones would choose by CPUID at load time, ignore that cap, and the tests that compare
 * the levels would compare one path with itself. Without SM_X86_KERNELS (MSVC, arm64) only
 * NAME_generic exists and is always picked. */
#if SM_X86_KERNELS
#define SM_EACH_LEVEL(NAME, PARAMS, ARGS)                                         \
    static void NAME##_generic PARAMS { NAME##_body ARGS; }                       \
    SM_TARGET_AVX2 static void NAME##_avx2 PARAMS { NAME##_body ARGS; }           \
    SM_TARGET_AVX512 static void NAME##_avx512 PARAMS { NAME##_body ARGS; }
#define SM_PICK_LEVEL(NAME, level)                                                 \
    ((level) >= SM_SIMD_AVX512 ? NAME##_avx512 : (level) >= SM_SIMD_AVX2 ? NAME##_avx2 : NAME##_generic)
#else
#define SM_EACH_LEVEL(NAME, PARAMS, ARGS) static void NAME##_generic PARAMS { NAME##_body ARGS; }
#define SM_PICK_LEVEL(NAME, level) ((void)(level), NAME##_generic)
#endif

/* Highest level this CPU and OS support (CPUID + XGETBV), ignoring any override. */
int sm_simd_detected(void);
/* Level kernels use now: detected level capped by SMALLMIND_SIMD (read once) or sm_simd_set. */
int sm_simd_active(void);
/* Cap the active level (-1 = back to the detected level, still capped by the environment).
 * Returns the level now active. Thread-safe (a single int store kernels read per call). */
int sm_simd_set(int level);
const char *sm_simd_name(int level);
/* 1 if CPUID reports AMX-TILE and AMX-BF16 and the OS saves tile state (XCR0); whether this
 * process may use them is sm_amx_usable's question (sm_amx.h). */
int sm_cpu_amx_bf16(void);

/* A monotonic clock, in seconds. */
double sm_now_seconds(void);

/* FLOP/s of nthreads threads (<= 0: the default budget) each running `iters` rounds of 16
 * independent FMA chains at the active SIMD level: the core's arithmetic peak, for benchmarks
 * to quote kernels against. *seconds (if not NULL) gets the wall time taken. */
double sm_fma_peak(int nthreads, int64_t iters, double *seconds);

/* 1 if built with OpenMP. */
int sm_openmp_enabled(void);
/* OpenMP's default team size for the calling thread (OMP_NUM_THREADS, omp_set_num_threads). */
int sm_omp_max_threads(void);
void sm_omp_set_num_threads(int n);
/* The library-wide default thread budget used when a call passes threads <= 0: the value set
 * (0 initially: none), capped by omp_get_max_threads() of the calling thread, which honours
 * OMP_NUM_THREADS and threadpoolctl's OpenMP limits. These two are exported
 * from the extension module under stable names so threadpoolctl can find and drive them. */
SM_EXPORT int smallmind_get_num_threads(void);
SM_EXPORT void smallmind_set_num_threads(int n);
/* fork(): a child of a process that ran a thread team runs every call on one thread (see
 * SM_PARALLEL). smallmind_forked_child: 1 in such a child; smallmind_team_used: 1 once this
 * process (or the one it was forked from) opened a team of more than one thread. */
SM_EXPORT int smallmind_forked_child(void);
SM_EXPORT int smallmind_team_used(void);
/* threads > 0 -> threads; otherwise the library default above. */
int sm_resolve_threads(int threads);

/* The one rule for "is a thread team worth starting" that the kernels of sm_ops and
 * sm_attention (and activation dropout) follow. Waking a team and joining it costs a few
 * microseconds, about SM_TEAM_MIN_WORK streaming element operations (an add, a multiply, a
 * load-op-store of one float); so every thread must get at least that much work, or it costs
 * more than it saves. Returns the threads to use, between 1 and sm_resolve_threads(nthreads):
 * at most `units` (the pieces the work splits into) and at most work / SM_TEAM_MIN_WORK.
 * `work` is counted in streaming element operations; kernels whose operations are cheaper
 * (multiply-adds of a register-tiled product) scale their count down first (sm_attention.c).
 * Only the number of threads depends on this, never the results (each kernel's partition
 * keeps its arithmetic the same for any team size). */
#define SM_TEAM_MIN_WORK 32768
int sm_team_size(int nthreads, int64_t units, double work);
/* Processors available to this process. */
int sm_cpu_count(void);
/* Compiler name and version this core was built with. */
const char *sm_compiler(void);

#endif /* SM_RUNTIME_H */
