/* sm_amx.c - bf16 GEMM pieces on Intel AMX: permission, packing float32 into bf16 tile panels,
 * and the 32 x 32 micro-kernel (four 16 x 16 accumulator tiles). The driver (loop nest, threads,
 * K slices) is sm_gemm.c's, shared with the float32 kernels.
 *
 * Tile registers: 0-3 hold C (2 x 2 tiles of 16 x 16 float32), 4-5 the two 16-row halves of
 * the A sliver's current k block, 6-7 the two 16-column halves of the B sliver's. Each k block
 * of 32 is four TDPBF16PS: 4 x 16 x 16 x 32 multiply-adds from four 1 KiB tile loads. */
#include "sm_amx.h"

#include <string.h>

#include "sm_runtime.h"
#include "sm_vecmath.h"

#if SM_X86_KERNELS
#include <immintrin.h>
#endif

/* Round in place: the float32 emulation packs as usual, then rounds the packed panel. */
void sm_bf16_round_inplace(float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] = sm_bf16_round(x[i]);
}

#if SM_AMX_BUILT

#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

static int g_amx = -1; /* -1 unknown, else the answer; asking twice is harmless */

int sm_amx_usable(void) {
    int v = __atomic_load_n(&g_amx, __ATOMIC_ACQUIRE);
    if (v < 0) {
        /* Linux hands out the 8 KiB of tile state per thread only on request; a process that
         * uses tiles without asking dies of SIGILL. */
        v = sm_cpu_amx_bf16() && syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
        __atomic_store_n(&g_amx, v, __ATOMIC_RELEASE);
    }
    return v;
}

#define SM_TARGET_AMX \
    __attribute__((target("amx-tile,amx-bf16,avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")))

/* The 64-byte tile configuration: palette 1, every tile 16 rows of 64 bytes. */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_config;

/* A static object, fully initialised: GCC's _tile_loadconfig tells the compiler it reads only
 * the first 8 bytes, so stores into a local configuration could be dropped as dead. */
static const amx_config g_tile_config __attribute__((aligned(64))) = {
    .palette = 1,
    .colsb = {64, 64, 64, 64, 64, 64, 64, 64},
    .rows = {16, 16, 16, 16, 16, 16, 16, 16},
};

SM_TARGET_AMX void sm_amx_begin(void) { _tile_loadconfig(&g_tile_config); }

SM_TARGET_AMX void sm_amx_end(void) { _tile_release(); }

/* 16 floats rounded to bf16 (round to nearest even, NaN kept quiet), each left in the high
 * half of its 32-bit lane: the same rounding as sm_bf16_bits, 16 at a time. */
SM_TARGET_AVX512 SM_INLINE __m512i round16(__m512 x) {
    __m512i u = _mm512_castps_si512(x);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                            _mm512_set1_epi32(0x7f800000));
    return _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x00400000)));
}

/* kn (<= 32) consecutive floats, zero past kn -> 32 bf16 in order, which read as 16 32-bit
 * words are the k pairs (src[2p], src[2p+1]) AMX multiplies together. */
SM_TARGET_AVX512 SM_INLINE __m512i pairs16(const float *src, int64_t kn) {
    /* the high halves of the 32 rounded lanes, in order: 16-bit element 2e+1 of (lo, hi) */
    static const uint16_t odd[32] = {1,  3,  5,  7,  9,  11, 13, 15, 17, 19, 21,
                                     23, 25, 27, 29, 31, 33, 35, 37, 39, 41, 43,
                                     45, 47, 49, 51, 53, 55, 57, 59, 61, 63};
    __m512 x0 = _mm512_maskz_loadu_ps(sm_mask16(kn), src);
    __m512 x1 = _mm512_maskz_loadu_ps(sm_mask16(kn - 16), src + 16);
    return _mm512_permutex2var_epi16(round16(x0), _mm512_loadu_si512(odd), round16(x1));
}

/* Pair words of 16 lanes from two rows (lane j: (lo[j], hi[j]) rounded); hi == NULL: zeros. */
SM_TARGET_AVX512 SM_INLINE __m512i pair_rows(const float *lo, const float *hi, __mmask16 m) {
    __m512i l = round16(_mm512_maskz_loadu_ps(m, lo));
    __m512i h = hi ? round16(_mm512_maskz_loadu_ps(m, hi)) : _mm512_setzero_si512();
    __m512i w = _mm512_or_si512(_mm512_and_si512(h, _mm512_set1_epi32((int)0xffff0000u)),
                                _mm512_srli_epi32(l, 16));
    return _mm512_maskz_mov_epi32(m, w);
}

/* 16 x 16 words transposed in registers (the float transpose, on the same bits). */
SM_TARGET_AVX512 SM_INLINE void transpose_words(__m512i v[16]) {
    __m512 r[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_castsi512_ps(v[i]);
    sm_transpose16x16(r);
    for (int i = 0; i < 16; i++) v[i] = _mm512_castps_si512(r[i]);
}

SM_TARGET_AVX512
void sm_amx_pack_a(uint16_t *dst, const float *p, int64_t sr, int64_t sc, int64_t m, int64_t kc) {
    const int64_t kb = sm_ceil_div(kc, SM_AMX_KB);
    for (int64_t i0 = 0; i0 < m; i0 += SM_AMX_MR) {
        for (int64_t q = 0; q < kb; q++) {
            uint16_t *blk = dst + q * SM_AMX_MR * SM_AMX_KB;
            int64_t k0 = q * SM_AMX_KB, kn = kc - k0 < SM_AMX_KB ? kc - k0 : SM_AMX_KB;
            for (int r = 0; r < SM_AMX_MR; r++) {
                uint16_t *row = blk + r * SM_AMX_KB;
                int64_t i = i0 + r;
                if (i >= m) {
                    memset(row, 0, SM_AMX_KB * sizeof(uint16_t));
                } else if (sc == 1) {
                    _mm512_storeu_si512(row, pairs16(p + i * sr + k0, kn));
                } else if (sr == 1 && r % 16 == 0) {
                    /* A stored transposed (k rows contiguous in i): pair words of 16 rows at a
                     * time, one vector per k pair, transposed to one vector per row */
                    __m512i v[16];
                    __mmask16 mi = sm_mask16(m - i);
                    for (int q2 = 0; q2 < SM_AMX_KB / 2; q2++) {
                        int64_t ka = k0 + 2 * q2;
                        v[q2] = ka < kc ? pair_rows(p + i + ka * sc, ka + 1 < kc ? p + i + (ka + 1) * sc : NULL, mi)
                                        : _mm512_setzero_si512();
                    }
                    transpose_words(v);
                    for (int e = 0; e < 16; e++) _mm512_storeu_si512(row + e * SM_AMX_KB, v[e]);
                    r += 15; /* the 16 rows are written */
                } else {
                    int64_t t = 0;
                    for (; t < kn; t++) row[t] = sm_bf16_bits(p[i * sr + (k0 + t) * sc]);
                    for (; t < SM_AMX_KB; t++) row[t] = 0;
                }
            }
        }
        dst += kb * SM_AMX_MR * SM_AMX_KB;
    }
}

SM_TARGET_AVX512
void sm_amx_pack_b(uint16_t *dst, const float *p, int64_t sr, int64_t sc, int64_t kc, int64_t n) {
    const int64_t kb = sm_ceil_div(kc, SM_AMX_KB);
    for (int64_t j0 = 0; j0 < n; j0 += SM_AMX_NR) {
        int64_t cols = n - j0 < SM_AMX_NR ? n - j0 : SM_AMX_NR;
        for (int64_t q = 0; q < kb; q++) {
            /* 32-bit words: [half h][pair row pr][column c] = (B[2pr, j], B[2pr+1, j]) */
            uint32_t *blk = (uint32_t *)(dst + q * SM_AMX_KB * SM_AMX_NR);
            int64_t k0 = q * SM_AMX_KB;
            if (sr == 1) {
                /* B stored transposed (columns contiguous in k): a column's 32 k are its 16
                 * pair words; 16 columns transposed give the tile's 16 pair rows */
                int64_t kn = kc - k0 < SM_AMX_KB ? kc - k0 : SM_AMX_KB;
                for (int h = 0; h < 2; h++) {
                    __m512i v[16];
                    for (int c = 0; c < 16; c++)
                        v[c] = 16 * h + c < cols ? pairs16(p + (j0 + 16 * h + c) * sc + k0, kn)
                                                 : _mm512_setzero_si512();
                    transpose_words(v);
                    for (int pr = 0; pr < 16; pr++) _mm512_storeu_si512(blk + (h * 16 + pr) * 16, v[pr]);
                }
                continue;
            }
            for (int pr = 0; pr < SM_AMX_KB / 2; pr++) {
                int64_t ka = k0 + 2 * pr, kb1 = ka + 1;
                for (int h = 0; h < 2; h++) {
                    uint32_t *w = blk + (h * (SM_AMX_KB / 2) + pr) * 16;
                    int64_t c0 = 16 * h, cn = cols - c0; /* columns of this half */
                    if (sc == 1 && cn > 0 && ka < kc) {
                        const float *ra = p + ka * sr + j0 + c0;
                        _mm512_storeu_si512(w, pair_rows(ra, kb1 < kc ? ra + sr : NULL, sm_mask16(cn)));
                        continue;
                    }
                    for (int c = 0; c < 16; c++) {
                        int64_t j = j0 + c0 + c;
                        uint32_t a = 0, b = 0;
                        if (c0 + c < cols) {
                            if (ka < kc) a = sm_bf16_bits(p[ka * sr + j * sc]);
                            if (kb1 < kc) b = sm_bf16_bits(p[kb1 * sr + j * sc]);
                        }
                        w[c] = a | (b << 16);
                    }
                }
            }
        }
        dst += kb * SM_AMX_KB * SM_AMX_NR;
    }
}

SM_TARGET_AMX
void sm_amx_kernel(int64_t kc, const uint16_t *a, const uint16_t *b, float *c, int64_t ldc, int mr,
                   int nr, float alpha, float beta) {
    const int64_t kb = sm_ceil_div(kc, SM_AMX_KB);
    const int64_t blk = SM_AMX_MR * SM_AMX_KB; /* bf16 per k block of a sliver */
    /* A whole tile of C with alpha 1 and beta 0 or 1 (the common case): the accumulators start
     * at C (or zero) and are stored straight back, with no round trip through the stack. Which
     * tiles are whole depends only on M and N, never on the thread partition, so the bits do
     * not depend on the thread count. */
    const int64_t ldb = ldc * (int64_t)sizeof(float);
    const int direct = mr == SM_AMX_MR && nr == SM_AMX_NR && alpha == 1.0f && (beta == 0.0f || beta == 1.0f);
    if (direct && beta == 1.0f) {
        _tile_loadd(0, c, ldb);
        _tile_loadd(1, c + 16, ldb);
        _tile_loadd(2, c + 16 * ldc, ldb);
        _tile_loadd(3, c + 16 * ldc + 16, ldb);
    } else {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
    }
    for (int64_t q = 0; q < kb; q++) {
        _tile_loadd(4, a + q * blk, 64);
        _tile_loadd(6, b + q * blk, 64);
        _tile_loadd(5, a + q * blk + 16 * SM_AMX_KB, 64);
        _tile_loadd(7, b + q * blk + 16 * SM_AMX_KB, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    if (direct) {
        _tile_stored(0, c, ldb);
        _tile_stored(1, c + 16, ldb);
        _tile_stored(2, c + 16 * ldc, ldb);
        _tile_stored(3, c + 16 * ldc + 16, ldb);
        return;
    }
    float t[SM_AMX_MR * SM_AMX_NR] __attribute__((aligned(64)));
    _tile_stored(0, t, SM_AMX_NR * sizeof(float));
    _tile_stored(1, t + 16, SM_AMX_NR * sizeof(float));
    _tile_stored(2, t + 16 * SM_AMX_NR, SM_AMX_NR * sizeof(float));
    _tile_stored(3, t + 16 * SM_AMX_NR + 16, SM_AMX_NR * sizeof(float));
    __mmask16 m0 = sm_mask16(nr), m1 = sm_mask16(nr - 16);
    __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
    for (int i = 0; i < mr; i++) {
        float *ci = c + i * ldc;
        __m512 v0 = _mm512_mul_ps(va, _mm512_load_ps(t + i * SM_AMX_NR));
        __m512 v1 = _mm512_mul_ps(va, _mm512_load_ps(t + i * SM_AMX_NR + 16));
        if (beta != 0.0f) {
            v0 = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(m0, ci), v0);
            v1 = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(m1, ci + 16), v1);
        }
        _mm512_mask_storeu_ps(ci, m0, v0);
        _mm512_mask_storeu_ps(ci + 16, m1, v1);
    }
}

#else

int sm_amx_usable(void) { return 0; }

#endif /* SM_AMX_BUILT */
