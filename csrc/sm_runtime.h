/* sm_runtime.h - run-time facts about the machine and the build: SIMD level chosen from CPUID
 * (overridable downwards by SMALLMIND_SIMD), thread budget, compiler, OpenMP. */
#ifndef SM_RUNTIME_H
#define SM_RUNTIME_H

#include "sm_common.h"

/* SIMD levels, ordered: a higher level implies every lower one is usable. */
typedef enum { SM_SIMD_GENERIC = 0, SM_SIMD_AVX2 = 1, SM_SIMD_AVX512 = 2 } sm_simd_level;

/* Highest level this CPU and OS support (CPUID + XGETBV), ignoring any override. */
int sm_simd_detected(void);
/* Level kernels use now: detected level capped by SMALLMIND_SIMD (read once) or sm_simd_set. */
int sm_simd_active(void);
/* Cap the active level (-1 = back to the detected level, still capped by the environment).
 * Returns the level now active. Thread-safe (a single int store kernels read per call). */
int sm_simd_set(int level);
const char *sm_simd_name(int level);

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
