/* A strided fp32 GEMM for the training path (model/fast/train_ops.py: the dense layers' forward and backward
 * and the routed experts' products), with 16-lane registers only (AVX-512; elsewhere `mm_available` says 0 and
 * the callers use PyTorch's matmul).
 *
 * C[M, N] = A[M, K] @ B[K, N], A and B read through any strides (a transposed operand is a stride, not a
 * copy), C row-major with row stride ldc.  Both operands are packed first, in parallel: A in blocks of 12 rows,
 * each block [K][12] row-interleaved, and B in panels of 16 columns, each [K][16] (zero columns pad N), so the
 * micro-kernel reads two streams.  The micro-kernel is a block of 12 rows x 32 columns (24 accumulators of 16
 * lanes, 2 loads of B and 12 broadcasts of A per k), the one decode.c's extensions use.  Tasks are tiles of
 * CHUNK rows x 32 columns shared out among the threads, so that a tile's A block (CHUNK x K) stays in L2
 * while the panels stream.
 *
 * Why not PyTorch's matmul: at training sizes of `tiny` on a 2-core AMD EPYC (Zen 5) it runs at ~200 GFLOP/s,
 * where this kernel reaches ~400 (MKL takes its generic code path on a CPU that is not Intel's); see the
 * benchmark in docs/BENCHMARKS.md.  Each output is one chain of fused multiply-adds over k, in k order, so
 * the result does not depend on M, the tiling or the thread count.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec.h"

#ifdef __AVX512F__
#define MR 12 /* rows of a packed block of A (block2_packed's layout) */
#define CHUNK 192 /* rows of A per task: 16 blocks of 12 */

/* rows a0..a0+mr of A into one block [K][MR] (rows past mr left unset: never stored) */
static void pack_a_block(const float *A, int64_t sr, int64_t sk, int r0, int mr, int K, float *dst) {
    if (sk == 1) {
        for (int r = 0; r < mr; r++) {
            const float *src = A + (int64_t)(r0 + r) * sr;
            for (int kk = 0; kk < K; kk++) dst[(int64_t)kk * MR + r] = src[kk];
        }
    } else {
        for (int kk = 0; kk < K; kk++) {
            const float *src = A + (int64_t)kk * sk + (int64_t)r0 * sr;
            for (int r = 0; r < mr; r++) dst[(int64_t)kk * MR + r] = src[(int64_t)r * sr];
        }
    }
}

/* columns c0..c0+16 of B into one panel [K][16], zero past N */
static void pack_b_panel(const float *B, int64_t sk, int64_t sc, int c0, int N, int K, float *dst) {
    const int nc = N - c0 < 16 ? N - c0 : 16;
    if (nc < 16) memset(dst, 0, sizeof(float) * (size_t)K * 16);
    if (sc == 1) {
        for (int kk = 0; kk < K; kk++) {
            const float *src = B + (int64_t)kk * sk + c0;
            for (int l = 0; l < nc; l++) dst[(int64_t)kk * 16 + l] = src[l];
        }
    } else {
        for (int l = 0; l < nc; l++) {
            const float *src = B + (int64_t)(c0 + l) * sc;
            for (int kk = 0; kk < K; kk++) dst[(int64_t)kk * 16 + l] = src[(int64_t)kk * sk];
        }
    }
}

int mm_available(void) { return 1; }

/* Returns 0, or -1 when the packing buffers cannot be allocated (C untouched). */
int mm_strided(const float *A, int64_t a_r, int64_t a_k, const float *B, int64_t b_k, int64_t b_c, float *C,
               int64_t ldc, int M, int K, int N) {
    const int blocks = (M + MR - 1) / MR, panels = 2 * ((N + 31) / 32), pairs = panels / 2;
    const int chunks = (M + CHUNK - 1) / CHUNK;
    float *Ap = malloc(sizeof(float) * ((size_t)blocks * MR * K + 1));
    float *Bp = malloc(sizeof(float) * ((size_t)panels * 16 * K + 1));
    if (Ap == NULL || Bp == NULL) {
        free(Ap);
        free(Bp);
        return -1;
    }
#pragma omp parallel
    {
#pragma omp for schedule(static) nowait
        for (int b = 0; b < blocks; b++) {
            const int mr = M - MR * b < MR ? M - MR * b : MR;
            pack_a_block(A, a_r, a_k, MR * b, mr, K, Ap + (int64_t)b * MR * K);
        }
#pragma omp for schedule(static)
        for (int j = 0; j < panels; j++) pack_b_panel(B, b_k, b_c, 16 * j, N, K, Bp + (int64_t)j * K * 16);
#pragma omp for collapse(2) schedule(static)
        for (int ch = 0; ch < chunks; ch++) {
            for (int p = 0; p < pairs; p++) {
                const int c0 = 32 * p, nc = N - c0 < 32 ? N - c0 : 32;
                const float *b0 = Bp + (int64_t)2 * p * K * 16;
                const int r_end = (ch + 1) * CHUNK < M ? (ch + 1) * CHUNK : M;
                for (int r0 = ch * CHUNK; r0 < r_end; r0 += MR) {
                    const int mr = r_end - r0 < MR ? r_end - r0 : MR;
                    v16f acc[MR][2] = {{{0}}};
                    const float *ap = Ap + (int64_t)(r0 / MR) * MR * K;
#define ROWS(n) block2_packed(ap, K, b0, acc, n)
                    BY_ROWS(mr, ROWS)
#undef ROWS
                    for (int r = 0; r < mr; r++) {
                        float *cr = C + (int64_t)(r0 + r) * ldc + c0;
                        if (nc == 32) {
                            store16(cr, acc[r][0]);
                            store16(cr + 16, acc[r][1]);
                        } else {
                            for (int l = 0; l < nc; l++) cr[l] = l < 16 ? acc[r][0][l] : acc[r][1][l - 16];
                        }
                    }
                }
            }
        }
    }
    free(Ap);
    free(Bp);
    return 0;
}
#else
int mm_available(void) { return 0; }

int mm_strided(const float *A, int64_t a_r, int64_t a_k, const float *B, int64_t b_k, int64_t b_c, float *C,
               int64_t ldc, int M, int K, int N) {
    (void)A, (void)a_r, (void)a_k, (void)B, (void)b_k, (void)b_c, (void)C, (void)ldc, (void)M, (void)K, (void)N;
    return -1;
}
#endif
