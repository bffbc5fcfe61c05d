/* sm_amx.h - bf16 matrix products on Intel AMX tiles (internal to the GEMM driver): the packing
 * of float32 operands into rounded bf16 panels, and the 32 x 32 micro-kernel on them.
 *
 * AMX computes C (16 x 16 float32) += A (16 x 32 bf16) @ B (32 x 16 bf16) in one instruction,
 * about 14x the float32 FMA rate of an AVX-512 core on this machine (3.1 TFLOP/s measured
 * against 214 GFLOP/s). Products of two bf16 values are exact in float32 and the sums are
 * float32, so the only rounding beyond float32's is of the inputs to bf16 (round to nearest
 * even), done here while packing. */
#ifndef SM_AMX_H
#define SM_AMX_H

#include "sm_common.h"

/* Panel geometry: 32 rows of A or 32 columns of B per sliver, K in blocks of 32. */
#define SM_AMX_MR 32
#define SM_AMX_NR 32
#define SM_AMX_KB 32

/* 1 if this CPU has AMX-TILE and AMX-BF16, the OS saves tile state, and it granted this process
 * the right to use tile data (Linux: arch_prctl ARCH_REQ_XCOMP_PERM, asked once). */
int sm_amx_usable(void);

/* float32 -> bf16 bits, round to nearest even; NaN stays a (quiet) NaN. The one rounding every
 * bf16 path uses (AMX packing and the float32 emulation alike). */
SM_INLINE uint16_t sm_bf16_bits(float f) {
    union {
        float f;
        uint32_t u;
    } v = {f};
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40u);
    v.u += 0x7fffu + ((v.u >> 16) & 1u);
    return (uint16_t)(v.u >> 16);
}

/* f rounded to the nearest bf16 value, as a float32. */
SM_INLINE float sm_bf16_round(float f) {
    union {
        uint32_t u;
        float f;
    } v = {(uint32_t)sm_bf16_bits(f) << 16};
    return v.f;
}

/* Round n floats in place to bf16 precision (the float32 emulation of the bf16 product). */
void sm_bf16_round_inplace(float *x, int64_t n);

#if SM_X86_KERNELS && defined(__linux__) && (defined(__clang__) || __GNUC__ >= 11)
#define SM_AMX_BUILT 1
/* Pack A (m x kc; element (i, k) at p[i * sr + k * sc]) into slivers of 32 rows. A sliver is,
 * for each block of 32 k, its 32 rows x 32 bf16 (64 bytes a row: two tiles of 16 rows). Rows
 * past m and k past kc are zero. Uses SM_AMX_MR * round_up(kc, 32) bf16 per sliver. */
void sm_amx_pack_a(uint16_t *dst, const float *p, int64_t sr, int64_t sc, int64_t m, int64_t kc);
/* Pack B (kc x n; element (k, j) at p[k * sr + j * sc]) into slivers of 32 columns. A sliver
 * is, for each block of 32 k, two tiles (columns 0-15, 16-31), each 16 rows of k pairs x 16
 * columns x (B[2q, j], B[2q+1, j]): the pair layout AMX reads. Zero past n and kc. */
void sm_amx_pack_b(uint16_t *dst, const float *p, int64_t sr, int64_t sc, int64_t kc, int64_t n);
/* C[0:mr, 0:nr] = alpha * (A sliver @ B sliver over kc) + beta * C (beta == 0: C write-only). */
void sm_amx_kernel(int64_t kc, const uint16_t *a, const uint16_t *b, float *c, int64_t ldc, int mr,
                   int nr, float alpha, float beta);
/* Configure this thread's tiles before kernels run / release them after (each OpenMP thread). */
void sm_amx_begin(void);
void sm_amx_end(void);
#else
#define SM_AMX_BUILT 0
#endif

#endif /* SM_AMX_H */
