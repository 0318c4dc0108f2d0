/* Fused fp32 CPU kernels for one cached decoding step (see __init__.py; PyTorch twins in model/).
 *
 * Layouts are row-major and contiguous; every pointer is a float32 tensor's data unless marked long.
 * Arithmetic follows the PyTorch path operation by operation (same association order where it
 * matters), so the two agree to fp32 round-off; the tests compare them.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec.h"

/* x * sigmoid(x) over n values, in place (vectorised; scalar tail). */
static void silu_inplace(float *x, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        const v8f v = load8(x + i);
        store8(x + i, v / (1.0f + exp8(-v)));
    }
    for (; i < n; i++) x[i] = silu(x[i]);
}

static void exp_inplace(float *x, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8) store8(x + i, exp8(load8(x + i)));
    for (; i < n; i++) x[i] = expf(x[i]);
}

static inline float dot(const float *a, const float *b, int n) {
    v8f acc = {0};
    int i = 0;
    for (; i + 8 <= n; i += 8) acc += load8(a + i) * load8(b + i);
    float s = hsum8(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* The Mamba-2 mixer between its projections for B rows of T new tokens (decode: T = 1; cache
 * extension: the new tokens of each row, right-padded to T), continuing from the cached conv window
 * and SSM state.  The recurrence runs token by token (on a CPU it is cheaper than the chunked scan:
 * each head's [P, N] state stays in L1 across the row's tokens).
 *
 * proj      [B, T, 2*Di + 2*G*N + H]  in_proj output: z | x B C (conv input) | dt_raw; token stride
 *                                    `stride`, row stride T * stride
 * n_new     long [B] or NULL        valid tokens per row (NULL: all T); padding leaves the state alone
 *                                    and gets zero output
 * conv      [B, K-1, Cc]            last K-1 conv inputs (updated in place), Cc = Di + 2*G*N
 * conv_w    [K, Cc], conv_b [Cc]
 * dt_bias, A (= -exp(A_log)), D: [H]
 * norm_w    [Di]                    gated RMS norm weight, groups of `group` channels
 * state     [B, H, P, N]            fp32 SSM state (updated in place)
 * out       [B, T, Di]              normed, gated output (input of out_proj)
 * scratch   [B, T + K - 1, Cc]      workspace
 */
#ifdef __AVX512F__
/* One head's SSM update and read-out for one token, with 16-lane registers: the state s [P, N] (N = 16 * NV,
 * NV a constant at each call site) decays by dA and takes dt * x[p] * B; y[p] = C . s[p] + Dh * x[p].  B and C
 * stay in registers across the P rows; a row's two 8-lane halves are added before eight rows' read-outs
 * are reduced together. */
static inline __attribute__((always_inline)) void scan_head16(float *s, const float *x, const float *Bg,
                                                               const float *Cg, float dt, float dA, float Dh,
                                                               float *yt, int P, const int NV) {
    v16f b[8], c[8];
    for (int i = 0; i < NV; i++) {
        b[i] = load16(Bg + 16 * i);
        c[i] = load16(Cg + 16 * i);
    }
    for (int p0 = 0; p0 < P; p0 += 8) {
        v8f accs[8];
        for (int q = 0; q < 8; q++, s += 16 * NV) {
            const float xdt = x[p0 + q] * dt;
            v16f acc = {0};
            for (int i = 0; i < NV; i++) {
                const v16f sv = load16(s + 16 * i) * dA + xdt * b[i];
                store16(s + 16 * i, sv);
                acc += sv * c[i];
            }
            accs[q] = lo8(acc) + hi8(acc);
        }
        const v8f yv = hsum8x8(accs);
        for (int q = 0; q < 8; q++) yt[p0 + q] = yv[q] + Dh * x[p0 + q];
    }
}
#endif

/* The depthwise causal conv of one token over Cc channels, in place: u[c] = bias[c] + sum_j u[j * Cc + c] *
 * w[j * Cc + c] over the K window rows starting at u (output t only reads inputs t..t+K-1).  Eight channels
 * at a time, per channel the same chain as the scalar tail; K is a constant at the usual call site. */
static inline __attribute__((always_inline)) void conv_taps(float *u, const float *w, const float *bias, int Cc,
                                                             const int K) {
    int c = 0;
    for (; c + 8 <= Cc; c += 8) {
        v8f acc = load8(bias + c);
        for (int j = 0; j < K; j++) acc += load8(u + (int64_t)j * Cc + c) * load8(w + j * Cc + c);
        store8(u + c, acc);
    }
    for (; c < Cc; c++) {
        float acc = bias[c];
        for (int j = 0; j < K; j++) acc += u[(int64_t)j * Cc + c] * w[j * Cc + c];
        u[c] = acc;
    }
}

/* One row of ``mamba_scan``: its `nb` new tokens (token stride `stride`) continue the conv window `win`
 * [K-1, Cc] and the SSM state `state_b` [H, P, N] (both updated in place); output y [nb, Di];
 * xp [nb + K - 1, Cc] is workspace. */
static void scan_row(const float *row, int nb, float *win, float *state_b, float *y, float *xp,
                     const float *conv_w, const float *conv_b, const float *dt_bias, const float *A, const float *D,
                     const float *norm_w, int K, int H, int P, int G, int N, int group, int stride,
                     float dt_min, float eps) {
    const int Di = H * P, GN = G * N, Cc = Di + 2 * GN, R = H / G;
    /* xp: the K-1 cached inputs, then the row's new conv inputs; u: conv output after SiLU */
    memcpy(xp, win, sizeof(float) * (size_t)(K - 1) * Cc);
    for (int t = 0; t < nb; t++) memcpy(xp + (int64_t)(K - 1 + t) * Cc, row + (int64_t)t * stride + Di, sizeof(float) * Cc);
    memcpy(win, xp + (int64_t)nb * Cc, sizeof(float) * (size_t)(K - 1) * Cc);
    /* conv over time, in place: output t only reads inputs t..t+K-1, so write it over input t */
    for (int t = 0; t < nb; t++) {
        float *u = xp + (int64_t)t * Cc;
        if (K == 4) conv_taps(u, conv_w, conv_b, Cc, 4);  /* the usual kernel size, unrolled */
        else conv_taps(u, conv_w, conv_b, Cc, K);
        silu_inplace(u, Cc);
    }
    for (int h = 0; h < H; h++) {
        const float *Bh = xp + Di + (h / R) * N, *Ch = xp + Di + GN + (h / R) * N;
        float *s0 = state_b + ((int64_t)h * P) * N;
        for (int t = 0; t < nb; t++) {
            const float *x = xp + (int64_t)t * Cc + h * P, *Bg = Bh + (int64_t)t * Cc, *Cg = Ch + (int64_t)t * Cc;
            float dt = softplus(row[(int64_t)t * stride + Di + Cc + h] + dt_bias[h]);
            if (dt_min > 0.0f && dt < dt_min) dt = dt_min;
            const float dA = expf(dt * A[h]);
            float *yt = y + (int64_t)t * Di + h * P, *s = s0;
#ifdef __AVX512F__
            if (P % 8 == 0 && (N == 32 || N == 64 || N == 128)) {
                if (N == 32) scan_head16(s, x, Bg, Cg, dt, dA, D[h], yt, P, 2);
                else if (N == 64) scan_head16(s, x, Bg, Cg, dt, dA, D[h], yt, P, 4);
                else scan_head16(s, x, Bg, Cg, dt, dA, D[h], yt, P, 8);
                continue;
            }
#endif
            if (N % 8 == 0 && P % 8 == 0) {
                /* eight rows of the state at a time, their read-outs reduced together (hsum8x8: the
                 * same sums as hsum8 below, bit for bit) */
                for (int p0 = 0; p0 < P; p0 += 8) {
                    v8f accs[8];
                    for (int q = 0; q < 8; q++, s += N) {
                        const float xv = x[p0 + q], xdt = xv * dt;
                        v8f acc = {0};
                        for (int n = 0; n < N; n += 8) {
                            v8f sv = load8(s + n) * dA + xdt * load8(Bg + n);
                            store8(s + n, sv);
                            acc += sv * load8(Cg + n);
                        }
                        accs[q] = acc;
                    }
                    const v8f yv = hsum8x8(accs);
                    for (int q = 0; q < 8; q++) yt[p0 + q] = yv[q] + D[h] * x[p0 + q];
                }
                continue;
            }
            for (int p = 0; p < P; p++, s += N) {
                const float xv = x[p], xdt = xv * dt;
                float yv;
                int n = 0;
                if (N % 8 == 0) {
                    v8f acc = {0};
                    for (; n < N; n += 8) {
                        v8f sv = load8(s + n) * dA + xdt * load8(Bg + n);
                        store8(s + n, sv);
                        acc += sv * load8(Cg + n);
                    }
                    yv = hsum8(acc);
                } else {
                    yv = 0.0f;
                    for (; n < N; n++) {
                        s[n] = s[n] * dA + xdt * Bg[n];
                        yv += s[n] * Cg[n];
                    }
                }
                yt[p] = yv + D[h] * xv;
            }
        }
    }
    for (int t = 0; t < nb; t++) {
        float *yt = y + (int64_t)t * Di, *gate = xp + (int64_t)t * Cc; /* x | B | C are consumed */
        memcpy(gate, row + (int64_t)t * stride, sizeof(float) * Di);
        silu_inplace(gate, Di);
        for (int c = 0; c < Di; c++) yt[c] *= gate[c];
        for (int g0 = 0; g0 < Di; g0 += group) {
            float ss = 0.0f;
            int c = g0;
            if (group % 8 == 0) {  /* eight lanes of partial sums, then their sum */
                v8f acc = {0};
                for (; c < g0 + group; c += 8) acc += load8(yt + c) * load8(yt + c);
                ss = hsum8(acc);
            }
            for (; c < g0 + group; c++) ss += yt[c] * yt[c];
            const float inv = 1.0f / sqrtf(ss / (float)group + eps);
            for (int c = g0; c < g0 + group; c++) yt[c] = yt[c] * inv * norm_w[c];
        }
    }
}

void mamba_scan(const float *proj, const int64_t *n_new, float *conv, const float *conv_w, const float *conv_b,
                const float *dt_bias, const float *A, const float *D, const float *norm_w,
                float *state, float *out, float *scratch,
                int B, int T, int K, int H, int P, int G, int N, int group, int stride,
                float dt_min, float eps) {
    const int Di = H * P, Cc = Di + 2 * G * N;
#pragma omp parallel for schedule(static)
    for (int b = 0; b < B; b++) {
        const int nb = n_new == NULL ? T : (int)n_new[b];
        float *y = out + (int64_t)b * T * Di;
        memset(y + (int64_t)nb * Di, 0, sizeof(float) * (size_t)(T - nb) * Di);
        scan_row(proj + (int64_t)b * T * stride, nb, conv + (int64_t)b * (K - 1) * Cc, state + (int64_t)b * H * P * N,
                 y, scratch + (int64_t)b * (T + K - 1) * Cc, conv_w, conv_b, dt_bias, A, D, norm_w,
                 K, H, P, G, N, group, stride, dt_min, eps);
    }
}

/* Router: sigmoid scores from logits [N, E] (row stride logits_stride); top-k of score + bias (largest first, lower id on ties);
 * weights = chosen scores, renormalised when norm_topk, times scaling.  idx: long [N, k].
 * load [E] (the MoE layer's balance counter), unless NULL, gets +1 per chosen expert. */
void moe_route(const float *logits, const float *bias, int64_t *idx, float *w, float *load,
               int N, int E, int k, int norm_topk, int logits_stride, float scaling) {
    float *score = malloc(sizeof(float) * (size_t)E * 2), *key = score + E;
    unsigned char *taken = malloc((size_t)E);
    for (int n = 0; n < N; n++) {
        const float *l = logits + (int64_t)n * logits_stride;
        for (int e = 0; e < E; e++) {
            score[e] = 1.0f / (1.0f + expf(-l[e]));
            key[e] = score[e] + bias[e];
        }
        memset(taken, 0, (size_t)E);
        float total = 0.0f;
        for (int j = 0; j < k; j++) {
            int best = -1;  /* the largest key not yet taken (-inf keys included; NaN only when nothing else is left) */
            for (int e = 0; e < E; e++)
                if (!taken[e] && (best < 0 || key[e] > key[best] || key[best] != key[best])) best = e;
            taken[best] = 1;
            idx[(int64_t)n * k + j] = best;
            if (load != NULL) load[best] += 1.0f;
            w[(int64_t)n * k + j] = score[best];
            total += score[best];
        }
        for (int j = 0; j < k; j++) {
            float v = w[(int64_t)n * k + j];
            if (norm_topk) v = v / (total + 1e-20f);
            w[(int64_t)n * k + j] = v * scaling;
        }
    }
    free(score);
    free(taken);
}

/* C[m, n] = A[m, K] @ B[K, n], then relu^2 when act.  A rows have stride lda, C rows ldc.  B comes
 * packed in panels of 16 columns, each panel contiguous [K][16] (zero columns pad n up to a multiple of
 * 16), so that the weights stream sequentially.  Blocks of 6 rows x 16 columns: 12 accumulator
 * vectors, 2 loads of B and 6 broadcasts of A per k. */
static inline v8f relu2_8(v8f v) {
    const v8i pos = v > 0.0f;
    return select8(pos, v * v, v * 0.0f);
}

/* One 16-column panel Bj [K][16] for all m rows of A: C[:, 0:nc] (= A @ Bj, relu^2 when act).
 * `next` (or NULL): the panel to be used after this one; its K cache lines are prefetched during the
 * first row block, so that streaming weights from memory overlaps the arithmetic. */
/* acc[0..MR) += rows a[0..MR) of A times the panel Bj, prefetching one line of `pre` per k when
 * given.  MR is a constant at every call site, so each row count gets its own unrolled loop. */
static inline __attribute__((always_inline)) void block_mr(const float *const *a, int K, const float *Bj,
                                                           const float *pre, v8f acc[6][2], const int MR) {
    if (pre != NULL) {
        for (int kk = 0; kk < K; kk++) {
            __builtin_prefetch(pre + (int64_t)kk * 16, 0, 2);
            const v8f b0 = load8(Bj + (int64_t)kk * 16), b1 = load8(Bj + (int64_t)kk * 16 + 8);
            for (int r = 0; r < MR; r++) {
                const float av = a[r][kk];
                acc[r][0] += av * b0;
                acc[r][1] += av * b1;
            }
        }
    } else {
        for (int kk = 0; kk < K; kk++) {
            const v8f b0 = load8(Bj + (int64_t)kk * 16), b1 = load8(Bj + (int64_t)kk * 16 + 8);
            for (int r = 0; r < MR; r++) {
                const float av = a[r][kk];
                acc[r][0] += av * b0;
                acc[r][1] += av * b1;
            }
        }
    }
}

static void panel_rows(const float *A, int m, int K, int lda, const float *Bj, const float *next, float *C, int ldc,
                       int nc, int act) {
    for (int r0 = 0; r0 < m; r0 += 6) {
        const int mr = m - r0 < 6 ? m - r0 : 6;
        const float *a[6];
        for (int r = 0; r < mr; r++) a[r] = A + (int64_t)(r0 + r) * lda;
        v8f acc[6][2] = {{{0}}};
        const float *pre = r0 == 0 ? next : NULL;
        switch (mr) {
        case 6: block_mr(a, K, Bj, pre, acc, 6); break;
        case 5: block_mr(a, K, Bj, pre, acc, 5); break;
        case 4: block_mr(a, K, Bj, pre, acc, 4); break;
        case 3: block_mr(a, K, Bj, pre, acc, 3); break;
        case 2: block_mr(a, K, Bj, pre, acc, 2); break;
        default: block_mr(a, K, Bj, pre, acc, 1);
        }
        for (int r = 0; r < mr; r++) {
            float *cr = C + (int64_t)(r0 + r) * ldc;
            const v8f o0 = act ? relu2_8(acc[r][0]) : acc[r][0], o1 = act ? relu2_8(acc[r][1]) : acc[r][1];
            if (nc == 16) {
                store8(cr, o0);
                store8(cr + 8, o1);
            } else {
                for (int l = 0; l < nc; l++) cr[l] = l < 8 ? o0[l] : o1[l - 8];
            }
        }
    }
}

#ifdef __AVX512F__
/* With 16-lane registers (AVX-512), two adjacent panels at a time: blocks of 6 rows x 32 columns, 12
 * accumulators of 16 lanes, 2 loads of B and 6 broadcasts of A per k.  Every output is the same chain
 * of fused multiply-adds over k as in the 8-lane blocks above, so the results are bit for bit theirs. */
static inline v16f relu2_16(v16f v) {
    const v16i pos = v > 0.0f;
    return (v16f)(((v16i)(v * v) & pos) | ((v16i)(v * 0.0f) & ~pos));
}

/* acc[0..MR) += rows a[0..MR) of A times the panel pair B0 = [K][16], B0 + K*16; prefetching the pair
 * `pre` (two contiguous panels, two lines per k) when given. */
static inline __attribute__((always_inline)) void block2_mr(const float *const *a, int K, const float *B0,
                                                            const float *pre, v16f acc[12][2], const int MR) {
    const float *B1 = B0 + (int64_t)K * 16;
    for (int kk = 0; kk < K; kk++) {
        if (pre != NULL) {
            __builtin_prefetch(pre + (int64_t)kk * 32, 0, 2);
            __builtin_prefetch(pre + (int64_t)kk * 32 + 16, 0, 2);
        }
        const v16f b0 = load16(B0 + (int64_t)kk * 16), b1 = load16(B1 + (int64_t)kk * 16);
        for (int r = 0; r < MR; r++) {
            const float av = a[r][kk];
            acc[r][0] += av * b0;
            acc[r][1] += av * b1;
        }
    }
}

/* The panel pair at B0 for all m rows of A: C[:, 0:nc] (16 < nc <= 32 columns), relu^2 when act.
 * Blocks of up to 12 rows (24 accumulators). */
static void panel2_rows(const float *A, int m, int K, int lda, const float *B0, const float *next, float *C, int ldc,
                        int nc, int act) {
    for (int r0 = 0; r0 < m; r0 += 12) {
        const int mr = m - r0 < 12 ? m - r0 : 12;
        const float *a[12];
        for (int r = 0; r < mr; r++) a[r] = A + (int64_t)(r0 + r) * lda;
        v16f acc[12][2] = {{{0}}};
        const float *pre = r0 == 0 ? next : NULL;
#define ROWS(n) block2_mr(a, K, B0, pre, acc, n)
        BY_ROWS(mr, ROWS)
#undef ROWS
        for (int r = 0; r < mr; r++) {
            float *cr = C + (int64_t)(r0 + r) * ldc;
            const v16f o0 = act ? relu2_16(acc[r][0]) : acc[r][0], o1 = act ? relu2_16(acc[r][1]) : acc[r][1];
            store16(cr, o0);
            if (nc == 32) {
                store16(cr + 16, o1);
            } else {
                for (int l = 0; l < nc - 16; l++) cr[16 + l] = o1[l];
            }
        }
    }
}
/* panel2_rows over A packed by pack_rows (blocks of 12 rows, each [K][12]). */
static void panel2_packed(const float *Ap, int m, int K, const float *B0, float *C, int ldc, int nc) {
    for (int r0 = 0; r0 < m; r0 += 12) {
        const int mr = m - r0 < 12 ? m - r0 : 12;
        const float *ap = Ap + (int64_t)r0 * K;
        v16f acc[12][2] = {{{0}}};
#define ROWS(n) block2_packed(ap, K, B0, acc, n)
        BY_ROWS(mr, ROWS)
#undef ROWS
        for (int r = 0; r < mr; r++) {
            float *cr = C + (int64_t)(r0 + r) * ldc;
            store16(cr, acc[r][0]);
            if (nc == 32) {
                store16(cr + 16, acc[r][1]);
            } else {
                for (int l = 0; l < nc - 16; l++) cr[16 + l] = acc[r][1][l];
            }
        }
    }
}

/* A [m, K] (row stride lda) in blocks of 12 rows, each block [K][12] row-interleaved (the last one's missing
 * rows left unset: never read). */
static float *pack_rows(const float *A, int m, int K, int lda) {
    const int blocks = (m + 11) / 12;
    float *Ap = malloc(sizeof(float) * (size_t)blocks * 12 * K);
    for (int b = 0; b < blocks; b++) {
        const int mr = m - 12 * b < 12 ? m - 12 * b : 12;
        float *dst = Ap + (int64_t)b * 12 * K;
        for (int r = 0; r < mr; r++) {
            const float *src = A + (int64_t)(12 * b + r) * lda;
            for (int kk = 0; kk < K; kk++) dst[(int64_t)kk * 12 + r] = src[kk];
        }
    }
    return Ap;
}
#define PANELS_PER_STEP 2
#define PACK_ROWS_FROM 48
#else
#define PANELS_PER_STEP 1
#endif

/* Panels j (and j + 1 when PANELS_PER_STEP is 2 and it exists) of the product: the step of the GEMM loops
 * below.  `then`: what to prefetch after the last panel (or NULL). */
static inline void panel_step(const float *A, int m, int K, int lda, const float *Bp, int n, int j, float *C,
                              int ldc, int act, const float *then) {
    const int panels = (n + 15) / 16, c = 16 * j;
    const float *Bj = Bp + (int64_t)j * K * 16;
#ifdef __AVX512F__
    if (j + 1 < panels) {
        const float *next = j + 2 < panels ? Bj + (int64_t)2 * K * 16 : then;
        panel2_rows(A, m, K, lda, Bj, next, C + c, ldc, n - c < 32 ? n - c : 32, act);
        return;
    }
#endif
    panel_rows(A, m, K, lda, Bj, j + 1 < panels ? Bj + (int64_t)K * 16 : then, C + c, ldc, n - c < 16 ? n - c : 16, act);
}

/* C[m, n] = A[m, K] @ B[K, n], then relu^2 when act.  A rows have stride lda, C rows ldc.  B comes
 * packed in panels of 16 columns, each panel contiguous [K][16] (zero columns pad n up to a multiple of
 * 16), so that the weights stream sequentially.  Serial (callers parallelise over experts); `then` (or
 * NULL): the panels used next, whose start is prefetched during the last panel. */
static void gemm_packed(const float *A, int m, int K, int lda, const float *Bp, int n, float *C, int ldc, int act,
                        const float *then) {
    const int panels = (n + 15) / 16;
    for (int j = 0; j < panels; j += PANELS_PER_STEP) panel_step(A, m, K, lda, Bp, n, j, C, ldc, act, then);
}

/* The same product with the panels shared out among the threads (a dense layer of a decode step). */
static void gemm_packed_par(const float *A, int m, int K, int lda, const float *Bp, int n, float *C, int ldc) {
    const int steps = ((n + 15) / 16 + PANELS_PER_STEP - 1) / PANELS_PER_STEP;
#ifdef __AVX512F__
    if (m >= PACK_ROWS_FROM) {
        /* many rows (a cache extension): A packed once, so that each block's rows are one stream */
        float *Ap = pack_rows(A, m, K, lda);
        const int panels = (n + 15) / 16;
#pragma omp parallel for schedule(static)
        for (int s = 0; s < steps; s++) {
            const int j = 2 * s, c = 16 * j;
            if (j + 1 < panels)
                panel2_packed(Ap, m, K, Bp + (int64_t)j * K * 16, C + c, ldc, n - c < 32 ? n - c : 32);
            else
                panel_rows(A, m, K, lda, Bp + (int64_t)j * K * 16, NULL, C + c, ldc, n - c < 16 ? n - c : 16, 0);
        }
        free(Ap);
        return;
    }
#endif
#pragma omp parallel for schedule(static)
    for (int s = 0; s < steps; s++) panel_step(A, m, K, lda, Bp, n, s * PANELS_PER_STEP, C, ldc, 0, NULL);
}

/* Python-callable: C[M, N] = A[M, K] (row stride lda) @ W^T for a weight W [N, K] given as its panels
 * (model/fast/kernels.pack_panels). */
void linear_packed(const float *A, const float *Wp, float *C, int M, int K, int lda, int N, int ldc) {
    gemm_packed_par(A, M, K, lda, Wp, N, C, ldc);
}

static int cmp_desc(const void *a, const void *b) {
    const int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x < y) - (x > y);
}

/* Routed experts for N tokens: out[t] = sum_j w[t, j] * down(relu^2(up(x[t]))) of expert idx[t, j].
 * With `shared` (row stride shared_stride, Is values), out[t, De:De+Is] = relu^2(shared[t]) as well, so
 * that one matmul can apply the latent and shared down-projections together.
 * x [N, De] (row stride x_stride); out rows of stride out_stride; idx long [N, k]; w [N, k];
 * up_p, down_p: each expert's up^T [De, I] and down^T [I, De] packed as gemm_packed takes them.
 * Each expert runs one GEMM pair over exactly its own tokens (counting sort; no padding); the
 * weighted sum over a token's k slots is taken in slot order. */
void moe_experts(const float *x, const int64_t *idx, const float *w, const float *up_p,
                 const float *down_p, float *out, const float *shared, int N, int k, int E, int De, int I,
                 int x_stride, int out_stride, int shared_stride, int Is) {
    const int NK = N * k, Ip = (I + 15) / 16 * 16, Dp = (De + 15) / 16 * 16;
    int *count = calloc((size_t)E + 1, sizeof(int));
    int *start = calloc((size_t)E + 1, sizeof(int));
    int *pairs = malloc(sizeof(int) * (size_t)NK);  /* pair ids sorted by expert */
    float *ypair = malloc(sizeof(float) * (size_t)NK * De);
    for (int p = 0; p < NK; p++) count[idx[p]]++;
    for (int e = 0; e < E; e++) start[e + 1] = start[e] + count[e];
    memset(count, 0, sizeof(int) * (size_t)E);
    for (int p = 0; p < NK; p++) {
        const int e = (int)idx[p];
        pairs[start[e] + count[e]++] = p;
    }
    int cap = 0;
    for (int e = 0; e < E; e++) cap = count[e] > cap ? count[e] : cap;
    /* largest experts first, so that the threads finish together */
    int64_t *order = malloc(sizeof(int64_t) * (size_t)E);  /* (count << 32 | expert), sorted descending */
    int n_used = 0;
    for (int e = 0; e < E; e++)
        if (count[e] > 0) order[n_used++] = ((int64_t)count[e] << 32) | (int64_t)(E - 1 - e);
    qsort(order, (size_t)n_used, sizeof(int64_t), cmp_desc);
#pragma omp parallel
    {
        float *xs = malloc(sizeof(float) * (size_t)(cap > 0 ? cap : 1) * De);
        float *hid = malloc(sizeof(float) * (size_t)(cap > 0 ? cap : 1) * I);
        float *ys = malloc(sizeof(float) * (size_t)(cap > 0 ? cap : 1) * De);
#pragma omp for schedule(dynamic, 1)
        for (int i = 0; i < n_used; i++) {
            const int e = E - 1 - (int)(order[i] & 0xffffffff), ne = count[e];
            for (int r = 0; r < ne; r++)
                memcpy(xs + (int64_t)r * De, x + (int64_t)(pairs[start[e] + r] / k) * x_stride, sizeof(float) * De);
            const float *down = down_p + (int64_t)e * I * Dp;
            gemm_packed(xs, ne, De, De, up_p + (int64_t)e * De * Ip, I, hid, I, 1, down);
            gemm_packed(hid, ne, I, I, down, De, ys, De, 0, NULL);
            for (int r = 0; r < ne; r++)
                memcpy(ypair + (int64_t)pairs[start[e] + r] * De, ys + (int64_t)r * De, sizeof(float) * De);
        }
        free(xs);
        free(hid);
        free(ys);
#pragma omp for schedule(static)
        for (int t = 0; t < N; t++) {
            float *o = out + (int64_t)t * out_stride;
            if (shared != NULL) { /* relu^2 of the shared expert's up-projection, beside the routed sum */
                const float *si = shared + (int64_t)t * shared_stride;
                for (int d = 0; d < Is; d++) o[De + d] = si[d] > 0.0f ? si[d] * si[d] : 0.0f;
            }
            for (int d = 0; d < De; d++) o[d] = 0.0f;
            for (int j = 0; j < k; j++) {
                const float wj = w[(int64_t)t * k + j];
                const float *yp = ypair + ((int64_t)t * k + j) * De;
                for (int d = 0; d < De; d++) o[d] += wj * yp[d];
            }
        }
    }
    free(order);
    free(count);
    free(start);
    free(pairs);
    free(ypair);
}

/* h += delta (when delta is not NULL), then out = rms_norm(h) * w, row by row.  h, delta, out [B, D]. */
void add_rms_norm(float *h, const float *delta, const float *w, float *out, int B, int D, float eps) {
#pragma omp parallel for schedule(static) if (B * D >= 16384)
    for (int b = 0; b < B; b++) {
        float *hb = h + (int64_t)b * D, *ob = out + (int64_t)b * D;
        if (delta != NULL) {
            const float *db = delta + (int64_t)b * D;
            for (int d = 0; d < D; d++) hb[d] += db[d];
        }
        float ss = 0.0f;
        for (int d = 0; d < D; d++) ss += hb[d] * hb[d];
        const float inv = 1.0f / sqrtf(ss / (float)D + eps);
        for (int d = 0; d < D; d++) ob[d] = hb[d] * inv * w[d];
    }
}

/* The largest of n finite floats (-inf for n = 0); eight lanes at a time: a maximum does not depend on
 * the order it is taken in. */
static inline float max_of(const float *x, int64_t n) {
    float mx = -INFINITY;
    int64_t i = 0;
    if (n >= 8) {
        v8f m8 = load8(x);
        for (i = 8; i + 8 <= n; i += 8) {
            const v8f v = load8(x + i);
            m8 = select8(v > m8, v, m8);
        }
        for (int l = 0; l < 8; l++) mx = m8[l] > mx ? m8[l] : mx;
    }
    for (; i < n; i++) mx = x[i] > mx ? x[i] : mx;
    return mx;
}

/* o[0:8*NV] = sum_t p[t] * v[t] over L value rows of 8*NV floats, the output row held in registers: per
 * element the same chain of fused multiply-adds over t as the scalar loop in attend_row.  NV is a
 * constant at each call site (one unrolled loop per head size). */
static inline __attribute__((always_inline)) void weigh_values(const float *p, const float *v, int64_t L, float *o,
                                                                const int NV) {
    v8f acc[16];
    for (int i = 0; i < NV; i++) acc[i] = (v8f){0};
    for (int64_t t = 0; t < L; t++) {
        const float pt = p[t];
        for (int i = 0; i < NV; i++) acc[i] += pt * load8(v + t * 8 * NV + 8 * i);
    }
    for (int i = 0; i < NV; i++) store8(o + 8 * i, acc[i]);
}

/* One query token of one row attends to its row's first L cached keys and values: q [Hq * Dh];
 * kb, vb [Hkv, cap, Dh]: the row's buffers; out [Hq * Dh]; scores [Hq, cap] is workspace. */
static void attend_row(const float *q, const float *kb0, const float *vb0, int64_t L, float *out, float *scores,
                       int Hq, int Hkv, int Dh, int cap) {
    const int R = Hq / Hkv;
    const float scale = 1.0f / sqrtf((float)Dh);
    for (int g = 0; g < Hkv; g++) {
        const float *kb = kb0 + ((int64_t)g * cap) * Dh, *vb = vb0 + ((int64_t)g * cap) * Dh;
        /* the R query heads of the group read each cached key and value once */
        const float *qg = q + (int64_t)g * R * Dh;
        float *sg = scores + ((int64_t)g * R) * cap, *og = out + g * R * Dh;
        int64_t t = 0;
        if (Dh % 8 == 0) {
            /* eight keys at a time: eight independent accumulators, reduced together (hsum8x8 equals
             * hsum8 bit for bit, so each score is dot()'s) */
            for (; t + 8 <= L; t += 8)
                for (int r = 0; r < R; r++) {
                    const float *qr = qg + r * Dh;
                    const float *kt = kb + t * Dh;
                    v8f acc[8] = {{0}};
                    for (int d = 0; d < Dh; d += 8) {
                        const v8f qv = load8(qr + d);
                        for (int j = 0; j < 8; j++) acc[j] += qv * load8(kt + (int64_t)j * Dh + d);
                    }
                    store8(sg + r * cap + t, hsum8x8(acc) * scale);
                }
        }
        for (; t < L; t++)
            for (int r = 0; r < R; r++) sg[r * cap + t] = dot(qg + r * Dh, kb + t * Dh, Dh) * scale;
        for (int r = 0; r < R; r++) {
            float *sc = sg + (int64_t)r * cap, tot = 0.0f;
            const float mx = max_of(sc, L);
            int64_t t = 0;
            for (; t + 8 <= L; t += 8) store8(sc + t, load8(sc + t) - mx);
            for (; t < L; t++) sc[t] -= mx;
            exp_inplace(sc, (int)L);
            for (t = 0; t < L; t++) tot += sc[t];  /* in order, as a scalar loop */
            for (t = 0; t + 8 <= L; t += 8) store8(sc + t, load8(sc + t) / tot);
            for (; t < L; t++) sc[t] /= tot;
        }
        for (int r = 0; r < R; r++) {
            const float *sc = sg + (int64_t)r * cap;
            float *o = og + r * Dh;
            if (Dh == 64) {
                weigh_values(sc, vb, L, o, 8);
                continue;
            }
            if (Dh == 128) {
                weigh_values(sc, vb, L, o, 16);
                continue;
            }
            for (int d = 0; d < Dh; d++) o[d] = 0.0f;
            for (int64_t t = 0; t < L; t++) {
                const float pt = sc[t], *vt = vb + t * Dh;
                for (int d = 0; d < Dh; d++) o[d] += pt * vt[d];
            }
        }
    }
}

/* The new token's k and v ([Hkv * Dh] each) into a row's buffers [Hkv, cap, Dh] at position pos. */
static void write_kv(const float *kn, const float *vn, float *kb0, float *vb0, int64_t pos, int Hkv, int Dh, int cap) {
    for (int g = 0; g < Hkv; g++) {
        memcpy(kb0 + ((int64_t)g * cap + pos) * Dh, kn + g * Dh, sizeof(float) * Dh);
        memcpy(vb0 + ((int64_t)g * cap + pos) * Dh, vn + g * Dh, sizeof(float) * Dh);
    }
}

/* One attention decode step for B rows, GQA without positions.
 * qkv [B, (Hq + 2*Hkv) * Dh] (row stride qkv_stride): q | k | v of the new token.
 * kbuf, vbuf [B, Hkv, cap, Dh]: the new k, v are written at position len[b]; the query then attends
 * to positions 0..len[b].  out [B, Hq * Dh].  scores [B, Hq, cap] is workspace. */
void attn_step(const float *qkv, float *kbuf, float *vbuf, const int64_t *len, float *out, float *scores,
               int B, int Hq, int Hkv, int Dh, int cap, int qkv_stride) {
#pragma omp parallel for schedule(static)
    for (int b = 0; b < B; b++) {
        const float *q = qkv + (int64_t)b * qkv_stride, *kn = q + Hq * Dh, *vn = kn + Hkv * Dh;
        float *kb = kbuf + (int64_t)b * Hkv * cap * Dh, *vb = vbuf + (int64_t)b * Hkv * cap * Dh;
        write_kv(kn, vn, kb, vb, len[b], Hkv, Dh, cap);
        attend_row(q, kb, vb, len[b] + 1, out + (int64_t)b * Hq * Dh, scores + (int64_t)b * Hq * cap, Hq, Hkv, Dh, cap);
    }
}

/* Attention for a cache extension of some rows: row i of the extension is cache row rows[i], holding
 * len[i] tokens, and gets n_new[i] new tokens, packed at token offsets off[i] of qkv [M, qkv_stride]
 * and out [M, Hq * Dh].  Every new token's k and v are written at len[i] + t, and token t attends to
 * positions 0..len[i] + t, exactly as t decode steps would.  last_only: only each row's last new token
 * attends, its output at out row i (out [R, Hq * Dh]). */
void attn_extend(const float *qkv, float *kbuf, float *vbuf, const int64_t *rows, const int64_t *len,
                 const int64_t *n_new, const int64_t *off, float *out, int R, int Hq, int Hkv, int Dh, int cap,
                 int qkv_stride, int last_only) {
#pragma omp parallel for schedule(dynamic, 1)
    for (int i = 0; i < R; i++) {
        float *scores = malloc(sizeof(float) * (size_t)Hq * cap);
        float *kb = kbuf + rows[i] * Hkv * cap * Dh, *vb = vbuf + rows[i] * Hkv * cap * Dh;
        for (int64_t t = 0; t < n_new[i]; t++) {
            const float *q = qkv + (off[i] + t) * qkv_stride, *kn = q + Hq * Dh;
            write_kv(kn, kn + Hkv * Dh, kb, vb, len[i] + t, Hkv, Dh, cap);
        }
        for (int64_t t = last_only ? n_new[i] - 1 : 0; t < n_new[i]; t++)
            attend_row(qkv + (off[i] + t) * qkv_stride, kb, vb, len[i] + t + 1,
                       out + (last_only ? i : off[i] + t) * Hq * Dh, scores, Hq, Hkv, Dh, cap);
        free(scores);
    }
}

/* ---------------------------------------------------------------------------------------------
 * The whole decode step's layer stack in one call.  Python builds the program once per model (and
 * again when a weight changes): per layer a kind and fixed-size slots of pointers, ints and floats
 * (layouts below, mirrored in model/fast/fused.py).  Dense projections take their weights as 16-column
 * panels (pack_panels in Python) and run gemm_packed_par: at decode sizes (a few dozen rows) the
 * weights stream from memory once per step, sequentially and prefetched a panel ahead.
 * --------------------------------------------------------------------------------------------- */
/* C[M, N] = A[M, K] (row stride lda) @ W^T, W given as its 16-column panels (pack_panels). */
static void linear_rm(const float *A, int M, int K, int lda, const float *Wp, int N, float *C, int ldc) {
    gemm_packed_par(A, M, K, lda, Wp, N, C, ldc);
}

enum { SLOT_P = 16, SLOT_I = 12, SLOT_F = 4 };
enum { KIND_MAMBA = 0, KIND_MOE = 1, KIND_ATTN = 2, KIND_MLP = 3 };

/* Which rows a cache extension feeds (NULL for a decode step): extension row i is cache row rows[i],
 * with len[i] cached tokens and n_new[i] new ones at token offsets off[i] of the packed activations;
 * R rows in all. */
typedef struct {
    const int64_t *rows, *len, *n_new, *off;
    int R;
} extension;

/* The packed index of row i's last new token */
static inline int64_t last_token(const extension *ext, int i) { return ext->off[i] + ext->n_new[i] - 1; }

/* Workspace floats one layer needs for B tokens (a decode step: one per row; an extension: R rows,
 * their B tokens packed).  Python sizes the buffer with the same formula. */
static int64_t layer_work(int kind, const int *I, int B, int R, int D) {
    switch (kind) {
    case KIND_MAMBA: {  /* K H P G N group in_dim; scratch: per row its tokens and K-1 window inputs */
        const int64_t Di = (int64_t)I[1] * I[2], Cc = Di + 2 * (int64_t)I[3] * I[4];
        const int64_t scratch = R > 0 ? ((int64_t)B + (int64_t)R * (I[0] - 1)) * Cc : (int64_t)B * I[0] * Cc;
        return B * ((int64_t)I[6] + Di + D) + scratch;
    }
    case KIND_MOE: {  /* E k De I Is latent norm_topk: idx (2 floats each), weights, proj, buf, delta */
        return B * (3 * (int64_t)I[1] + I[0] + (I[5] ? I[2] : 0) + I[4] + I[2] + I[4] + D);
    }
    case KIND_ATTN: {  /* Hq Hkv Dh cap; a decode step's scores [B, Hq, cap] (an extension's are per row) */
        return B * ((int64_t)(I[0] + 2 * I[1]) * I[2] + (int64_t)I[0] * I[2] + (R > 0 ? 0 : (int64_t)I[0] * I[3]) + D);
    }
    default:  /* MLP: intermediate */
        return B * ((int64_t)I[0] + D);
    }
}

static int64_t work_size(int L, const int *kinds, const int *ints, int B, int R, int D) {
    int64_t most = 0;
    for (int l = 0; l < L; l++) {
        const int64_t w = layer_work(kinds[l], ints + (int64_t)l * SLOT_I, B, R, D);
        most = w > most ? w : most;
    }
    return most;
}

int64_t decode_work_size(int L, const int *kinds, const int *ints, int B, int D) {
    return work_size(L, kinds, ints, B, 0, D);
}

int64_t extend_work_size(int L, const int *kinds, const int *ints, int M, int R, int D) {
    return work_size(L, kinds, ints, M, R, D);
}

/* Rows [B, w] (row stride w) of an extension's packed tokens down to each row's last token: row i =
 * 0..R-1 gets row off[i] + n_new[i] - 1 >= i, in place (those positions increase with i, so no row is
 * overwritten before it is read). */
static void keep_last_rows(float *a, int64_t w, const extension *ext) {
    for (int i = 0; i < ext->R; i++) {
        const int64_t src = last_token(ext, i);
        if (src != i) memcpy(a + i * w, a + src * w, sizeof(float) * (size_t)w);
    }
}

/* The [q | k | v] projection of an extension's tokens (x [B, D], weights Wp as 16-column panels) when only
 * each row's last token attends: k and v for every token, q for the last tokens only (into their rows of
 * qkv [B, qkv_dim]; the other rows' q stay unset).  x is consumed (its first R rows become the last tokens').
 * q_dim is a multiple of 16, so the k | v columns start at a panel; each output is the same chain of
 * multiply-adds as in the whole projection. */
static void last_queries(float *x, int B, int D, const float *Wp, float *qkv, int q_dim, int qkv_dim,
                         const extension *ext) {
    const int R = ext->R;
    linear_rm(x, B, D, D, Wp + (int64_t)q_dim * D, qkv_dim - q_dim, qkv + q_dim, qkv_dim);
    keep_last_rows(x, D, ext);
    float *ql = malloc(sizeof(float) * (size_t)R * q_dim);
    linear_rm(x, R, D, D, Wp, q_dim, ql, q_dim);
    for (int i = 0; i < R; i++)
        memcpy(qkv + last_token(ext, i) * qkv_dim, ql + (int64_t)i * q_dim, sizeof(float) * q_dim);
    free(ql);
}

/* The layer stack over B tokens: one per cache row (a decode step, ext NULL, len [B]) or the packed new
 * tokens of an extension's rows (ext).  h [B, D]: residual stream (updated); x [B, D]: the first layer's
 * normed input, on return the final normed hidden state; routes long [n_moe, B, k] or NULL.  Returns 1
 * when the last layers ran on the extension's last tokens only (then h, x [R, D] hold those). */
static int run_layers(int L, const int *kinds, void *const *ptrs, const int *ints, const float *fls, float *h,
                      float *x, float *work, const int64_t *len, int64_t *routes, int B, int D,
                      const extension *ext) {
    int moe_slot = 0;
    /* An extension's new tokens other than each row's last leave their mark in the cache (conv windows, SSM
     * states, keys and values) and nowhere else past the last layer that writes the cache: from that
     * layer's output on, only the last tokens are needed (the logits), so that layer writes the cache for
     * every token and computes its output for the last tokens alone, and the layers after it run on them
     * alone (not with routes: every token's routed experts are wanted then). */
    int writer = L;  /* the last layer that writes the cache (-1: none), when the rest runs on the last tokens */
    if (ext != NULL && routes == NULL && B > ext->R) {
        writer = -1;
        for (int l = 0; l < L; l++)
            if (kinds[l] == KIND_MAMBA || kinds[l] == KIND_ATTN) writer = l;
    }
    const int kept_last = writer < L;
    if (writer == -1) {
        keep_last_rows(h, D, ext);
        keep_last_rows(x, D, ext);
        B = ext->R;
        ext = NULL;
    }
    for (int l = 0; l < L; l++) {
        const int last_writer = l == writer;
        const int B_out = last_writer ? ext->R : B;  /* the rows of the layer's output projection */
        void *const *P = ptrs + (int64_t)l * SLOT_P;
        const int *I = ints + (int64_t)l * SLOT_I;
        const float *F = fls + (int64_t)l * SLOT_F;
        float *delta = NULL;
        switch (kinds[l]) {
        case KIND_MAMBA: {
            const int K = I[0], H = I[1], Pd = I[2], G = I[3], N = I[4], group = I[5], in_dim = I[6];
            const int Di = H * Pd, Cc = Di + 2 * G * N;
            float *proj = work, *y = proj + (int64_t)B * in_dim, *scratch = y + (int64_t)B * Di;
            linear_rm(x, B, D, D, P[0], in_dim, proj, in_dim);
            if (ext == NULL) {
                mamba_scan(proj, NULL, P[8], P[2], P[3], P[4], P[5], P[6], P[7], P[9], y, scratch,
                           B, 1, K, H, Pd, G, N, group, in_dim, F[0], F[1]);
                delta = scratch + (int64_t)B * K * Cc;
            } else {
                float *conv = P[8], *state = P[9];
#pragma omp parallel for schedule(dynamic, 1)
                for (int i = 0; i < ext->R; i++) {
                    const int64_t o = ext->off[i], b = ext->rows[i];
                    scan_row(proj + o * in_dim, (int)ext->n_new[i], conv + b * (K - 1) * Cc,
                             state + b * H * Pd * N, y + o * Di, scratch + (o + (int64_t)i * (K - 1)) * Cc,
                             P[2], P[3], P[4], P[5], P[6], P[7], K, H, Pd, G, N, group, in_dim, F[0], F[1]);
                }
                delta = scratch + ((int64_t)B + (int64_t)ext->R * (K - 1)) * Cc;
                if (last_writer) keep_last_rows(y, Di, ext);
            }
            linear_rm(y, B_out, Di, Di, P[1], D, delta, D);
            break;
        }
        case KIND_MOE: {
            const int E = I[0], k = I[1], De = I[2], Ie = I[3], Is = I[4], latent = I[5];
            const int in_dim = E + (latent ? De : 0) + Is;
            int64_t *idx = (int64_t *)work;  /* first: 8-byte aligned */
            float *wts = (float *)(idx + (int64_t)B * k), *proj = wts + (int64_t)B * k;
            float *buf = proj + (int64_t)B * in_dim;
            delta = buf + (int64_t)B * (De + Is);
            linear_rm(x, B, D, D, P[0], in_dim, proj, in_dim);
            moe_route(proj, P[3], idx, wts, P[4], B, E, k, I[6], in_dim, F[0]);
            if (routes != NULL) memcpy(routes + (int64_t)moe_slot * B * k, idx, sizeof(int64_t) * (size_t)B * k);
            moe_slot++;
            moe_experts(latent ? proj + E : x, idx, wts, P[5], P[6], buf, Is ? proj + in_dim - Is : NULL,
                        B, k, E, De, Ie, latent ? in_dim : D, De + Is, in_dim, Is);
            if (latent) {
                linear_rm(buf, B, De + Is, De + Is, P[1], D, delta, D);  /* [fc2_latent | shared down] */
            } else {
                /* routed sum in D space; + shared down-projection of relu^2(shared up) */
                if (Is) {
                    linear_rm(buf + De, B, Is, De + Is, P[2], D, delta, D);
                    for (int64_t i = 0; i < B; i++)
                        for (int d = 0; d < D; d++) delta[i * D + d] += buf[i * (De + Is) + d];
                } else {
                    for (int64_t i = 0; i < B; i++) memcpy(delta + i * D, buf + i * (De + Is), sizeof(float) * D);
                }
            }
            break;
        }
        case KIND_ATTN: {
            const int Hq = I[0], Hkv = I[1], Dh = I[2], cap = I[3], qkv_dim = (Hq + 2 * Hkv) * Dh;
            float *qkv = work, *out = qkv + (int64_t)B * qkv_dim, *scores = out + (int64_t)B * Hq * Dh;
            const int q_dim = Hq * Dh;
            if (last_writer && q_dim % 16 == 0)
                last_queries(x, B, D, P[0], qkv, q_dim, qkv_dim, ext);
            else
                linear_rm(x, B, D, D, P[0], qkv_dim, qkv, qkv_dim);
            if (ext == NULL) {
                attn_step(qkv, P[2], P[3], len, out, scores, B, Hq, Hkv, Dh, cap, qkv_dim);
                delta = scores + (int64_t)B * Hq * cap;
            } else {
                attn_extend(qkv, P[2], P[3], ext->rows, ext->len, ext->n_new, ext->off, out, ext->R, Hq, Hkv, Dh,
                            cap, qkv_dim, last_writer);
                delta = scores;
            }
            linear_rm(out, B_out, Hq * Dh, Hq * Dh, P[1], D, delta, D);
            break;
        }
        default: {  /* squared-ReLU MLP */
            const int Im = I[0];
            float *hid = work;
            delta = hid + (int64_t)B * Im;
            linear_rm(x, B, D, D, P[0], Im, hid, Im);
            for (int64_t i = 0; i < (int64_t)B * Im; i++) hid[i] = hid[i] > 0.0f ? hid[i] * hid[i] : 0.0f;
            linear_rm(hid, B, Im, Im, P[1], D, delta, D);
        }
        }
        if (last_writer) {  /* from here on: the last tokens only, and no layer touches the cache */
            keep_last_rows(h, D, ext);
            B = ext->R;
            ext = NULL;
        }
        add_rms_norm(h, delta, P[SLOT_P - 1], x, B, D, F[SLOT_F - 1]);
    }
    return kept_last;
}

/* A decode step: h [B, D] the embeddings (the residual stream), x [B, D] written with the first layer's
 * pre-norm of h (its weight the pointer slot after the layers', ptrs[L * SLOT_P]; eps0 its eps) and then
 * as in run_layers; len long [B]: tokens in the cache before this one; routes long [n_moe, B, k] or NULL;
 * work: decode_work_size floats. */
void decode_layers(int L, const int *kinds, void *const *ptrs, const int *ints, const float *fls, float *h, float *x,
                   float *work, const int64_t *len, int64_t *routes, int B, int D, float eps0) {
    add_rms_norm(h, NULL, ptrs[(int64_t)L * SLOT_P], x, B, D, eps0);
    run_layers(L, kinds, ptrs, ints, fls, h, x, work, len, routes, B, D, NULL);
}

/* A cache extension of R rows (cache rows `rows`, with len / n_new / off as in `extension`), their M new
 * tokens packed: h, x [M, D] (as in decode_layers: x gets the first pre-norm here); routes long [n_moe, M, k] or NULL; work:
 * extend_work_size floats.  Rows of the cache not listed are not touched.  On return x[0:R] holds each
 * row's final normed hidden state at its last new token (the rest of h and x is workspace).  Without
 * routes the layers past the last one that writes the cache run on those tokens alone, and the load
 * counters of their routed experts count those tokens only. */
void extend_layers(int L, const int *kinds, void *const *ptrs, const int *ints, const float *fls, float *h, float *x,
                   float *work, const int64_t *rows, const int64_t *len, const int64_t *n_new, const int64_t *off,
                   int64_t *routes, int R, int M, int D, float eps0) {
    const extension ext = {rows, len, n_new, off, R};
    add_rms_norm(h, NULL, ptrs[(int64_t)L * SLOT_P], x, M, D, eps0);
    if (!run_layers(L, kinds, ptrs, ints, fls, h, x, work, NULL, routes, M, D, &ext)) keep_last_rows(x, D, &ext);
}
