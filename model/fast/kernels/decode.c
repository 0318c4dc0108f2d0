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
void mamba_scan(const float *proj, const int64_t *n_new, float *conv, const float *conv_w, const float *conv_b,
                const float *dt_bias, const float *A, const float *D, const float *norm_w,
                float *state, float *out, float *scratch,
                int B, int T, int K, int H, int P, int G, int N, int group, int stride,
                float dt_min, float eps) {
    const int Di = H * P, GN = G * N, Cc = Di + 2 * GN, R = H / G;
#pragma omp parallel for schedule(static)
    for (int b = 0; b < B; b++) {
        const int nb = n_new == NULL ? T : (int)n_new[b];
        const float *row = proj + (int64_t)b * T * stride;
        float *win = conv + (int64_t)b * (K - 1) * Cc;
        /* xp: the K-1 cached inputs, then the row's new conv inputs; u: conv output after SiLU */
        float *xp = scratch + (int64_t)b * (T + K - 1) * Cc;
        memcpy(xp, win, sizeof(float) * (size_t)(K - 1) * Cc);
        for (int t = 0; t < nb; t++) memcpy(xp + (int64_t)(K - 1 + t) * Cc, row + (int64_t)t * stride + Di, sizeof(float) * Cc);
        memcpy(win, xp + (int64_t)nb * Cc, sizeof(float) * (size_t)(K - 1) * Cc);
        float *y = out + (int64_t)b * T * Di;
        memset(y + (int64_t)nb * Di, 0, sizeof(float) * (size_t)(T - nb) * Di);
        /* conv over time, in place: output t only reads inputs t..t+K-1, so write it over input t */
        for (int t = 0; t < nb; t++) {
            float *u = xp + (int64_t)t * Cc;
            for (int c = 0; c < Cc; c++) {
                float acc = conv_b[c];
                for (int j = 0; j < K; j++) acc += u[(int64_t)j * Cc + c] * conv_w[j * Cc + c];
                u[c] = acc;
            }
            silu_inplace(u, Cc);
        }
        for (int h = 0; h < H; h++) {
            const float *Bh = xp + Di + (h / R) * N, *Ch = xp + Di + GN + (h / R) * N;
            float *s0 = state + (((int64_t)b * H + h) * P) * N;
            for (int t = 0; t < nb; t++) {
                const float *x = xp + (int64_t)t * Cc + h * P, *Bg = Bh + (int64_t)t * Cc, *Cg = Ch + (int64_t)t * Cc;
                float dt = softplus(row[(int64_t)t * stride + Di + Cc + h] + dt_bias[h]);
                if (dt_min > 0.0f && dt < dt_min) dt = dt_min;
                const float dA = expf(dt * A[h]);
                float *yt = y + (int64_t)t * Di + h * P, *s = s0;
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
                for (int c = g0; c < g0 + group; c++) ss += yt[c] * yt[c];
                const float inv = 1.0f / sqrtf(ss / (float)group + eps);
                for (int c = g0; c < g0 + group; c++) yt[c] = yt[c] * inv * norm_w[c];
            }
        }
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

/* C[m, n] = A[m, K] @ B[K, n], then relu^2 when act.  A rows have stride lda, C rows ldc.  B comes
 * packed in panels of 16 columns, each panel contiguous [K][16] (zero columns pad n up to a multiple of
 * 16), so that the weights stream sequentially.  Blocks of 6 rows x 16 columns: 12 accumulator
 * vectors, 2 loads of B and 6 broadcasts of A per k.  Serial (callers parallelise over experts);
 * `then` (or NULL): the panels used next, whose start is prefetched during the last panel. */
static void gemm_packed(const float *A, int m, int K, int lda, const float *Bp, int n, float *C, int ldc, int act,
                        const float *then) {
    const int panels = (n + 15) / 16;
    for (int j = 0; j < panels; j++) {
        const float *Bj = Bp + (int64_t)j * K * 16;
        const int c = 16 * j, nc = n - c < 16 ? n - c : 16;
        panel_rows(A, m, K, lda, Bj, j + 1 < panels ? Bj + (int64_t)K * 16 : then, C + c, ldc, nc, act);
    }
}

/* The same product with the panels shared out among the threads (a dense layer of a decode step). */
static void gemm_packed_par(const float *A, int m, int K, int lda, const float *Bp, int n, float *C, int ldc) {
    const int panels = (n + 15) / 16;
#pragma omp parallel for schedule(static)
    for (int j = 0; j < panels; j++) {
        const float *Bj = Bp + (int64_t)j * K * 16;
        const int c = 16 * j, nc = n - c < 16 ? n - c : 16;
        panel_rows(A, m, K, lda, Bj, j + 1 < panels ? Bj + (int64_t)K * 16 : NULL, C + c, ldc, nc, 0);
    }
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

/* One attention decode step for B rows, GQA without positions.
 * qkv [B, (Hq + 2*Hkv) * Dh] (row stride qkv_stride): q | k | v of the new token.
 * kbuf, vbuf [B, Hkv, cap, Dh]: the new k, v are written at position len[b]; the query then attends
 * to positions 0..len[b].  out [B, Hq * Dh].  scores [B, Hq, cap] is workspace. */
void attn_step(const float *qkv, float *kbuf, float *vbuf, const int64_t *len, float *out, float *scores,
               int B, int Hq, int Hkv, int Dh, int cap, int qkv_stride) {
    const int R = Hq / Hkv;
    const float scale = 1.0f / sqrtf((float)Dh);
#pragma omp parallel for schedule(static)
    for (int b = 0; b < B; b++) {
        const float *q = qkv + (int64_t)b * qkv_stride, *kn = q + Hq * Dh, *vn = kn + Hkv * Dh;
        const int64_t L = len[b] + 1;
        for (int g = 0; g < Hkv; g++) {
            float *kb = kbuf + (((int64_t)b * Hkv + g) * cap) * Dh, *vb = vbuf + (((int64_t)b * Hkv + g) * cap) * Dh;
            memcpy(kb + len[b] * Dh, kn + g * Dh, sizeof(float) * Dh);
            memcpy(vb + len[b] * Dh, vn + g * Dh, sizeof(float) * Dh);
            /* the R query heads of the group read each cached key and value once */
            const float *qg = q + (int64_t)g * R * Dh;
            float *sg = scores + ((int64_t)b * Hq + g * R) * cap, *og = out + (int64_t)b * Hq * Dh + g * R * Dh;
            for (int64_t t = 0; t < L; t++)
                for (int r = 0; r < R; r++) sg[r * cap + t] = dot(qg + r * Dh, kb + t * Dh, Dh) * scale;
            for (int r = 0; r < R; r++) {
                float *sc = sg + (int64_t)r * cap, mx = -INFINITY, tot = 0.0f;
                for (int64_t t = 0; t < L; t++) mx = sc[t] > mx ? sc[t] : mx;
                for (int64_t t = 0; t < L; t++) sc[t] -= mx;
                exp_inplace(sc, (int)L);
                for (int64_t t = 0; t < L; t++) tot += sc[t];
                for (int64_t t = 0; t < L; t++) sc[t] /= tot;
                for (int d = 0; d < Dh; d++) og[r * Dh + d] = 0.0f;
            }
            for (int64_t t = 0; t < L; t++) {
                const float *vt = vb + t * Dh;
                for (int r = 0; r < R; r++) {
                    const float pt = sg[r * cap + t];
                    float *o = og + r * Dh;
                    for (int d = 0; d < Dh; d++) o[d] += pt * vt[d];
                }
            }
        }
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

/* Workspace floats one layer needs for B rows (Python sizes the buffer with the same formula). */
static int64_t layer_work(int kind, const int *I, int B, int D) {
    switch (kind) {
    case KIND_MAMBA: {  /* K H P G N group in_dim */
        const int64_t Di = (int64_t)I[1] * I[2], Cc = Di + 2 * (int64_t)I[3] * I[4];
        return B * ((int64_t)I[6] + (int64_t)I[0] * Cc + Di + D);
    }
    case KIND_MOE: {  /* E k De I Is latent norm_topk: idx (2 floats each), weights, proj, buf, delta */
        return B * (3 * (int64_t)I[1] + I[0] + (I[5] ? I[2] : 0) + I[4] + I[2] + I[4] + D);
    }
    case KIND_ATTN: {  /* Hq Hkv Dh cap */
        return B * ((int64_t)(I[0] + 2 * I[1]) * I[2] + (int64_t)I[0] * I[2] + (int64_t)I[0] * I[3] + D);
    }
    default:  /* MLP: intermediate */
        return B * ((int64_t)I[0] + D);
    }
}

int64_t decode_work_size(int L, const int *kinds, const int *ints, int B, int D) {
    int64_t most = 0;
    for (int l = 0; l < L; l++) {
        const int64_t w = layer_work(kinds[l], ints + (int64_t)l * SLOT_I, B, D);
        most = w > most ? w : most;
    }
    return most;
}

/* h [B, D]: residual stream (updated); x [B, D]: the first layer's normed input, on return the final
 * normed hidden state; len long [B]: tokens in the cache before this one; routes long
 * [n_moe, B, k] or NULL (experts chosen per MoE layer); work: decode_work_size floats. */
void decode_layers(int L, const int *kinds, void *const *ptrs, const int *ints, const float *fls, float *h, float *x,
                   float *work, const int64_t *len, int64_t *routes, int B, int D) {
    int moe_slot = 0;
    for (int l = 0; l < L; l++) {
        void *const *P = ptrs + (int64_t)l * SLOT_P;
        const int *I = ints + (int64_t)l * SLOT_I;
        const float *F = fls + (int64_t)l * SLOT_F;
        float *delta = NULL;
        switch (kinds[l]) {
        case KIND_MAMBA: {
            const int K = I[0], H = I[1], Pd = I[2], G = I[3], N = I[4], group = I[5], in_dim = I[6];
            const int Di = H * Pd, Cc = Di + 2 * G * N;
            float *proj = work, *scratch = proj + (int64_t)B * in_dim, *y = scratch + (int64_t)B * K * Cc;
            delta = y + (int64_t)B * Di;
            linear_rm(x, B, D, D, P[0], in_dim, proj, in_dim);
            mamba_scan(proj, NULL, P[8], P[2], P[3], P[4], P[5], P[6], P[7], P[9], y, scratch,
                       B, 1, K, H, Pd, G, N, group, in_dim, F[0], F[1]);
            linear_rm(y, B, Di, Di, P[1], D, delta, D);
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
            delta = scores + (int64_t)B * Hq * cap;
            linear_rm(x, B, D, D, P[0], qkv_dim, qkv, qkv_dim);
            attn_step(qkv, P[2], P[3], len, out, scores, B, Hq, Hkv, Dh, cap, qkv_dim);
            linear_rm(out, B, Hq * Dh, Hq * Dh, P[1], D, delta, D);
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
        add_rms_norm(h, delta, P[SLOT_P - 1], x, B, D, F[SLOT_F - 1]);
    }
}
