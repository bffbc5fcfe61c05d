/* sm_runtime.c - CPU feature detection, SIMD level selection, thread and build facts, the
 * thread-team rule (sm_team_size), and the allocation helpers declared in sm_common.h. */
#if !defined(_WIN32) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L /* clock_gettime under a strict -std=c11 */
#endif
#include "sm_runtime.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(_WIN32)
#include <malloc.h>
#include <windows.h>
#else
#include <unistd.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#if defined(_MSC_VER)
#include <intrin.h>
#else
#include <cpuid.h>
#endif
#endif

void *sm_aligned_alloc(size_t bytes) {
    if (bytes == 0) return NULL;
#if defined(_WIN32)
    return _aligned_malloc(bytes, SM_ALIGN);
#else
    void *p = NULL;
    if (posix_memalign(&p, SM_ALIGN, bytes) != 0) return NULL;
    return p;
#endif
}

void *sm_big_alloc(size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (bytes >= ((size_t)4 << 20)) {
        void *p = NULL;
        if (posix_memalign(&p, (size_t)2 << 20, bytes) != 0) return NULL;
        (void)madvise(p, bytes, MADV_HUGEPAGE); /* a hint; without it 4 KiB pages, still correct */
        return p;
    }
#endif
    return sm_aligned_alloc(bytes);
}

void sm_aligned_free(void *p) {
#if defined(_WIN32)
    _aligned_free(p);
#else
    free(p);
#endif
}

void sm_split_range(int64_t n, int64_t grain, int parts, int i, int64_t *begin, int64_t *end) {
    /* Work is handed out in whole grains so that each part's share keeps kernel tiles intact. */
    if (grain < 1) grain = 1;
    if (parts < 1) parts = 1;
    int64_t units = (n + grain - 1) / grain;
    int64_t base = units / parts, extra = units % parts;
    int64_t u0 = i * base + (i < extra ? i : extra);
    int64_t u1 = u0 + base + (i < extra ? 1 : 0);
    int64_t b = u0 * grain, e = u1 * grain;
    if (b > n) b = n;
    if (e > n) e = n;
    *begin = b;
    *end = e;
}

/* ---- CPU features ------------------------------------------------------------------------ */

#if defined(__x86_64__) || defined(_M_X64)
static void cpuid(unsigned leaf, unsigned sub, unsigned r[4]) {
#if defined(_MSC_VER)
    int out[4];
    __cpuidex(out, (int)leaf, (int)sub);
    for (int i = 0; i < 4; i++) r[i] = (unsigned)out[i];
#else
    __cpuid_count(leaf, sub, r[0], r[1], r[2], r[3]);
#endif
}

static unsigned long long xgetbv0(void) {
#if defined(_MSC_VER)
    return _xgetbv(0);
#else
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((unsigned long long)hi << 32) | lo;
#endif
}

static int detect_x86(void) {
    unsigned r[4];
    cpuid(0, 0, r);
    unsigned max_leaf = r[0];
    if (max_leaf < 7) return SM_SIMD_GENERIC;
    cpuid(1, 0, r);
    int osxsave = (r[2] >> 27) & 1, avx = (r[2] >> 28) & 1, fma = (r[2] >> 12) & 1;
    if (!osxsave || !avx) return SM_SIMD_GENERIC;
    unsigned long long xcr0 = xgetbv0();
    /* The OS must save YMM state (bits 1,2) for AVX, and opmask/ZMM state (5,6,7) for AVX-512. */
    if ((xcr0 & 0x6) != 0x6) return SM_SIMD_GENERIC;
    cpuid(7, 0, r);
    int avx2 = (r[1] >> 5) & 1;
    int avx512f = (r[1] >> 16) & 1, avx512dq = (r[1] >> 17) & 1;
    int avx512bw = (r[1] >> 30) & 1, avx512vl = (r[1] >> 31) & 1;
    if (!(avx2 && fma)) return SM_SIMD_GENERIC;
    if (avx512f && avx512dq && avx512bw && avx512vl && (xcr0 & 0xe0) == 0xe0) return SM_SIMD_AVX512;
    return SM_SIMD_AVX2;
}
#endif

int sm_cpu_amx_bf16(void) {
#if defined(__x86_64__) || defined(_M_X64)
    unsigned r[4];
    cpuid(0, 0, r);
    if (r[0] < 7) return 0;
    cpuid(1, 0, r);
    if (!((r[2] >> 27) & 1)) return 0; /* no OSXSAVE: XGETBV would fault */
    cpuid(7, 0, r);
    int amx_bf16 = (r[3] >> 22) & 1, amx_tile = (r[3] >> 24) & 1;
    /* XCR0 bits 17 (XTILECFG) and 18 (XTILEDATA): the OS saves tile state. */
    return amx_bf16 && amx_tile && ((xgetbv0() >> 17) & 3) == 3;
#else
    return 0;
#endif
}

static int g_detected = -1;      /* cached CPUID result */
static int g_env_cap = -1;       /* cap from SMALLMIND_SIMD, read once */
static volatile int g_active = -1; /* level kernels use; written by sm_simd_set */

int sm_simd_detected(void) {
    if (g_detected < 0) {
#if SM_X86_KERNELS
        g_detected = detect_x86();
#else
        g_detected = SM_SIMD_GENERIC;
#endif
    }
    return g_detected;
}

static int parse_level(const char *s) {
    if (!s || !*s) return -1;
    if (!strcmp(s, "avx512")) return SM_SIMD_AVX512;
    if (!strcmp(s, "avx2")) return SM_SIMD_AVX2;
    if (!strcmp(s, "generic") || !strcmp(s, "scalar") || !strcmp(s, "none")) return SM_SIMD_GENERIC;
    return -1;
}

static int capped(int level) {
    int det = sm_simd_detected();
    if (level < 0 || level > det) level = det;
    if (g_env_cap >= 0 && level > g_env_cap) level = g_env_cap;
    return level;
}

int sm_simd_active(void) {
    int a = g_active;
    if (a < 0) {
        static int env_read = 0;
        if (!env_read) {
            g_env_cap = parse_level(getenv("SMALLMIND_SIMD"));
            env_read = 1;
        }
        a = capped(-1);
        g_active = a;
    }
    return a;
}

int sm_simd_set(int level) {
    (void)sm_simd_active(); /* make sure the environment cap is read first */
    g_active = capped(level);
    return g_active;
}

const char *sm_simd_name(int level) {
    switch (level) {
    case SM_SIMD_AVX512: return "avx512";
    case SM_SIMD_AVX2: return "avx2";
    default: return "generic";
    }
}

/* A monotonic clock in seconds (time budgets, benchmarks' timings). */
double sm_now_seconds(void) {
#if defined(_WIN32)
    LARGE_INTEGER f, t;
    QueryPerformanceFrequency(&f);
    QueryPerformanceCounter(&t);
    return (double)t.QuadPart / (double)f.QuadPart;
#else
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
#endif
}

/* ---- FMA peak ------------------------------------------------------------------------------
 * Benchmarks report a kernel's speed as a share of what the cores can do at most: 16
 * independent FMA chains per thread in registers (enough to cover the FMA latency on both FMA
 * ports), no memory traffic, run at the active SIMD level. */
#if SM_X86_KERNELS
#include <immintrin.h>
SM_TARGET_AVX512 static float fma_chains_avx512(int64_t iters) {
    __m512 acc[16], x = _mm512_set1_ps(0.999f), y = _mm512_set1_ps(1e-6f);
    for (int i = 0; i < 16; i++) acc[i] = _mm512_set1_ps((float)i);
    for (int64_t k = 0; k < iters; k++)
        for (int i = 0; i < 16; i++) acc[i] = _mm512_fmadd_ps(x, y, acc[i]);
    __m512 s = acc[0];
    for (int i = 1; i < 16; i++) s = _mm512_add_ps(s, acc[i]);
    return _mm512_reduce_add_ps(s);
}
SM_TARGET_AVX2 static float fma_chains_avx2(int64_t iters) {
    __m256 acc[16], x = _mm256_set1_ps(0.999f), y = _mm256_set1_ps(1e-6f);
    for (int i = 0; i < 16; i++) acc[i] = _mm256_set1_ps((float)i);
    for (int64_t k = 0; k < iters; k++)
        for (int i = 0; i < 16; i++) acc[i] = _mm256_fmadd_ps(x, y, acc[i]);
    __m256 s = acc[0];
    for (int i = 1; i < 16; i++) s = _mm256_add_ps(s, acc[i]);
    float t[8];
    _mm256_storeu_ps(t, s);
    return t[0] + t[1] + t[2] + t[3] + t[4] + t[5] + t[6] + t[7];
}
#endif

static float fma_chains_generic(int64_t iters) {
    float acc[16];
    for (int i = 0; i < 16; i++) acc[i] = (float)i;
    for (int64_t k = 0; k < iters; k++)
        for (int i = 0; i < 16; i++) acc[i] = acc[i] * 0.999f + 1e-6f;
    float s = 0.0f;
    for (int i = 0; i < 16; i++) s += acc[i];
    return s;
}

#define SM_MAX_PEAK_THREADS 1024

double sm_fma_peak(int nthreads, int64_t iters, double *seconds) {
    int nt = sm_resolve_threads(nthreads), level = sm_simd_active();
    int lanes = 1;
    float (*fn)(int64_t) = fma_chains_generic;
#if SM_X86_KERNELS
    if (level >= SM_SIMD_AVX512) fn = fma_chains_avx512, lanes = 16;
    else if (level >= SM_SIMD_AVX2) fn = fma_chains_avx2, lanes = 8;
#else
    (void)level;
#endif
    float sums[SM_MAX_PEAK_THREADS] = {0};
    int ran = 0;
    if (nt > SM_MAX_PEAK_THREADS) nt = SM_MAX_PEAK_THREADS;
    double t0 = sm_now_seconds();
    SM_PARALLEL(nt)
    {
        /* each thread keeps its result (so the chains are not dead code) in its own slot */
        sums[SM_THREAD_ID()] = fn(iters);
        if (SM_THREAD_ID() == 0) ran = SM_THREAD_COUNT();
    }
    double s = sm_now_seconds() - t0;
    volatile float sink = sums[0];
    (void)sink;
    nt = ran;
    if (seconds) *seconds = s;
    /* flops: 2 per lane per FMA, 16 chains, iters rounds, on each thread that ran */
    return 2.0 * lanes * 16.0 * (double)iters * nt / (s > 0 ? s : 1e-9);
}

/* ---- threads and build ----------------------------------------------------------------- */

int sm_openmp_enabled(void) {
#ifdef SM_HAVE_OPENMP
    return 1;
#else
    return 0;
#endif
}

int sm_omp_max_threads(void) {
#ifdef SM_HAVE_OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

void sm_omp_set_num_threads(int n) {
#ifdef SM_HAVE_OPENMP
    if (n >= 1) omp_set_num_threads(n);
#else
    (void)n;
#endif
}

static volatile int g_num_threads = 0;

/* fork() safety. The child of a process that ran an OpenMP team inherits the team's
 * bookkeeping but not its threads, so its first parallel region waits forever (libgomp and
 * others). The pthread_atfork child handler marks such a child; from then on every team is
 * one thread (sm_team_allowed, sm_resolve_threads) - correct results, never a hang. */
static volatile int g_team_used = 0, g_forked_child = 0;

#if !defined(_WIN32)
#include <pthread.h>
static void sm_after_fork_in_child(void) {
    if (g_team_used) g_forked_child = 1;
}
static pthread_once_t g_atfork_once = PTHREAD_ONCE_INIT;
static void sm_register_atfork(void) { pthread_atfork(NULL, NULL, sm_after_fork_in_child); }
#endif

int sm_team_allowed(void) {
    if (!g_team_used) {
#if !defined(_WIN32)
        pthread_once(&g_atfork_once, sm_register_atfork);   /* before the first team */
#endif
        g_team_used = 1;
    }
    return !g_forked_child;
}

int smallmind_forked_child(void) { return g_forked_child; }
int smallmind_team_used(void) { return g_team_used; }

int smallmind_get_num_threads(void) {
    /* OpenMP's per-thread limit always caps the budget, so OMP_NUM_THREADS and threadpoolctl's
     * "openmp" limits apply even after set_num_threads (which raises OpenMP's limit for the
     * calling thread to match). */
    if (g_forked_child) return 1;
    int n = g_num_threads, omp = sm_omp_max_threads();
    return n > 0 && n < omp ? n : omp;
}

void smallmind_set_num_threads(int n) { g_num_threads = n > 0 ? n : 0; }

int sm_resolve_threads(int threads) {
    if (g_forked_child) return 1;
    int n = threads > 0 ? threads : smallmind_get_num_threads();
    return sm_openmp_enabled() ? (n > 0 ? n : 1) : 1;
}

int sm_team_size(int nthreads, int64_t units, double work) {
    int nt = sm_resolve_threads(nthreads);
    const double cap = work / SM_TEAM_MIN_WORK; /* threads the work keeps busy long enough */
    if (cap < (double)nt) nt = cap < 1.0 ? 1 : (int)cap;
    if (units < (int64_t)nt) nt = units < 1 ? 1 : (int)units;
    return nt;
}

int sm_cpu_count(void) {
#if defined(_WIN32)
    SYSTEM_INFO si;
    GetSystemInfo(&si);
    return (int)si.dwNumberOfProcessors;
#else
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
#endif
}

const char *sm_compiler(void) {
#if defined(__clang__)
    return "clang " __clang_version__;
#elif defined(__GNUC__)
    return "gcc " __VERSION__;
#elif defined(_MSC_VER)
#define SM_STR2(x) #x
#define SM_STR(x) SM_STR2(x)
    return "msvc " SM_STR(_MSC_FULL_VER);
#else
    return "unknown";
#endif
}
