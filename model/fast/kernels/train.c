/* Fused fp32 CPU kernels for the training path of the Mamba mixer (forward and backward), called from
 * the autograd Function ``_MambaMixer`` in model/fast/train_ops.py (which also holds their PyTorch twins
 * and is tested against the unfused PyTorch path, values and gradients).
 *
 * Each kernel is one pass (or two) over [rows, channels] data that PyTorch does in several: the
 * causal depthwise conv with its SiLU, and the gated group RMS norm.  The backwards recompute the
 * cheap forward quantities (conv pre-activation, sigmoid gates) instead of keeping them.
 *
 * Row strides are in floats; "rows" are the B*T tokens.  seg: long [B, T] document index of packed rows
 * (non-decreasing along T) or NULL.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec.h"

static inline v8f tsigmoid8(v8f v) { return 1.0f / (1.0f + exp8(-v)); }

static inline float tsigmoid(float v) { return 1.0f / (1.0f + expf(-v)); }


/* taps of row (b, t) that read an input of the same document before the start: valid[s] for shift s */
static void conv_valid(const int64_t *seg, int b, int t, int T, int K, int *valid) {
    for (int s = 0; s < K; s++) {
        valid[s] = t - s >= 0 && (seg == NULL || seg[(int64_t)b * T + t - s] == seg[(int64_t)b * T + t]);
    }
}

/* u[c] = bias[c] + sum_j w[j, c] x[t - (K-1-j), c] (valid taps, oldest first) for one row */
static void conv_row(const float *x, int64_t xs, const float *w, const float *bias, const int *valid,
                     int t, int C, int K, float *u) {
    const float *xt = x + (int64_t)t * xs;
    int c = 0;
    for (; c + 8 <= C; c += 8) {
        v8f acc = load8(bias + c);
        for (int j = 0; j < K; j++) {
            const int s = K - 1 - j;
            if (valid[s]) acc += load8(xt - (int64_t)s * xs + c) * load8(w + (int64_t)j * C + c);
        }
        store8(u + c, acc);
    }
    for (; c < C; c++) {
        float acc = bias[c];
        for (int j = 0; j < K; j++) {
            const int s = K - 1 - j;
            if (valid[s]) acc += xt[-(int64_t)s * xs + c] * w[(int64_t)j * C + c];
        }
        u[c] = acc;
    }
}

#define MAXK 64

/* out [B, T, C] = silu(causal depthwise conv of x), x: rows of stride xs (first C columns read). */
void conv_silu_fwd(const float *x, const float *w, const float *bias, const int64_t *seg, float *out,
                   int B, int T, int C, int K, int64_t xs) {
#pragma omp parallel for schedule(static)
    for (int64_t row = 0; row < (int64_t)B * T; row++) {
        const int b = (int)(row / T), t = (int)(row % T);
        int valid[MAXK];
        conv_valid(seg, b, t, T, K, valid);
        float *u = out + row * C;
        conv_row(x + (int64_t)b * T * xs, xs, w, bias, valid, t, C, K, u);
        int c = 0;
        for (; c + 8 <= C; c += 8) {
            const v8f v = load8(u + c);
            store8(u + c, v * tsigmoid8(v));
        }
        for (; c < C; c++) u[c] = u[c] * tsigmoid(u[c]);
    }
}

/* gradient of the conv output at row (b, t): g * silu'(u), u recomputed; into dst [C] */
static void conv_grad_row(const float *x, const float *w, const float *bias, const int64_t *seg, const float *g,
                          float *dst, int b, int t, int T, int C, int K, int64_t xs) {
    int valid[MAXK];
    conv_valid(seg, b, t, T, K, valid);
    conv_row(x + (int64_t)b * T * xs, xs, w, bias, valid, t, C, K, dst);
    const float *gr = g + ((int64_t)b * T + t) * C;
    int c = 0;
    for (; c + 8 <= C; c += 8) { /* d silu(u) = s (1 + u (1 - s)) */
        const v8f v = load8(dst + c), sv = tsigmoid8(v);
        store8(dst + c, load8(gr + c) * sv * (1.0f + v * (1.0f - sv)));
    }
    for (; c < C; c++) {
        const float v = dst[c], sv = tsigmoid(v);
        dst[c] = gr[c] * sv * (1.0f + v * (1.0f - sv));
    }
}

#define CONV_SPAN 64 /* rows of one batch row per task */

/* Backward of conv_silu_fwd.  g [B, T, C] contiguous: gradient of the output; gx: rows of stride gxs
 * (first C columns written); gw [K, C], gb [C] written.  Each task walks a span of rows keeping the
 * conv-output gradients of the next K rows in a small ring (recomputed, never written out).  gu: unused. */
void conv_silu_bwd(const float *x, const float *w, const float *bias, const int64_t *seg, const float *g,
                   float *gu, float *gx, float *gw, float *gb, int B, int T, int C, int K, int64_t xs,
                   int64_t gxs) {
    (void)gu;
    const int spans = (T + CONV_SPAN - 1) / CONV_SPAN;
    memset(gw, 0, sizeof(float) * (size_t)K * C);
    memset(gb, 0, sizeof(float) * (size_t)C);
#pragma omp parallel
    {
        float *part = calloc((size_t)(K + 1) * C, sizeof(float)); /* [K, C] weight, [C] bias partials */
        float *ring = malloc(sizeof(float) * (size_t)K * C);       /* gradient rows t .. t+K-1, slot t % K */
#pragma omp for schedule(static)
        for (int64_t task = 0; task < (int64_t)B * spans; task++) {
            const int b = (int)(task / spans), ta = (int)(task % spans) * CONV_SPAN;
            const int tb = ta + CONV_SPAN < T ? ta + CONV_SPAN : T;
            for (int t = ta; t < ta + K - 1 && t < T; t++)
                conv_grad_row(x, w, bias, seg, g, ring + (int64_t)(t % K) * C, b, t, T, C, K, xs);
            for (int t = ta; t < tb; t++) {
                const int tn = t + K - 1;
                if (tn < T) conv_grad_row(x, w, bias, seg, g, ring + (int64_t)(tn % K) * C, b, tn, T, C, K, xs);
                int valid[MAXK], ahead[MAXK];
                conv_valid(seg, b, t, T, K, valid);
                /* ahead[s]: output t + s reads this input through tap K-1-s */
                for (int s = 0; s < K; s++) {
                    ahead[s] = t + s < T && (seg == NULL || seg[(int64_t)b * T + t + s] == seg[(int64_t)b * T + t]);
                }
                const float *gur = ring + (int64_t)(t % K) * C;
                const float *xt = x + (int64_t)b * T * xs + (int64_t)t * xs;
                float *gxr = gx + (int64_t)b * T * gxs + (int64_t)t * gxs;
                int c = 0;
                for (; c + 8 <= C; c += 8) {
                    const v8f gv = load8(gur + c);
                    v8f acc = gv * load8(w + (int64_t)(K - 1) * C + c);
                    for (int s = 1; s < K; s++) {
                        if (ahead[s])
                            acc += load8(ring + (int64_t)((t + s) % K) * C + c) * load8(w + (int64_t)(K - 1 - s) * C + c);
                    }
                    store8(gxr + c, acc);
                    store8(part + (int64_t)K * C + c, load8(part + (int64_t)K * C + c) + gv);
                    for (int s = 0; s < K; s++) {
                        if (valid[s]) {
                            float *pj = part + (int64_t)(K - 1 - s) * C + c;
                            store8(pj, load8(pj) + gv * load8(xt - (int64_t)s * xs + c));
                        }
                    }
                }
                for (; c < C; c++) {
                    float acc = gur[c] * w[(int64_t)(K - 1) * C + c];
                    for (int s = 1; s < K; s++) {
                        if (ahead[s]) acc += ring[(int64_t)((t + s) % K) * C + c] * w[(int64_t)(K - 1 - s) * C + c];
                    }
                    gxr[c] = acc;
                    part[(int64_t)K * C + c] += gur[c];
                    for (int s = 0; s < K; s++) {
                        if (valid[s]) part[(int64_t)(K - 1 - s) * C + c] += gur[c] * xt[-(int64_t)s * xs + c];
                    }
                }
            }
        }
#pragma omp critical
        {
            for (int c = 0; c < K * C; c++) gw[c] += part[c];
            for (int c = 0; c < C; c++) gb[c] += part[(int64_t)K * C + c];
        }
        free(ring);
        free(part);
    }
}

/* Gated group RMS norm: a = y * silu(z); out = a * rsqrt(mean over each group of a^2 + eps) * w.
 * y, out: [rows, D] contiguous; z: rows of stride zs; rstd [rows, D / group] written (for the backward). */
void gated_norm_fwd(const float *y, const float *z, const float *w, float *out, float *rstd, int64_t rows,
                    int D, int group, int64_t zs, float eps) {
    const int ng = D / group;
#pragma omp parallel for schedule(static)
    for (int64_t row = 0; row < rows; row++) {
        const float *yr = y + row * D, *zr = z + row * zs;
        float *o = out + row * D;
        for (int gi = 0; gi < ng; gi++) {
            const int c0 = gi * group;
            v8f ss8 = {0};
            float ss = 0.0f;
            int c = c0;
            for (; c + 8 <= c0 + group; c += 8) {
                const v8f zv = load8(zr + c), a = load8(yr + c) * zv * tsigmoid8(zv);
                store8(o + c, a);
                ss8 += a * a;
            }
            for (; c < c0 + group; c++) {
                const float a = yr[c] * zr[c] * tsigmoid(zr[c]);
                o[c] = a;
                ss += a * a;
            }
            const float r = 1.0f / sqrtf((hsum8(ss8) + ss) / (float)group + eps);
            rstd[row * ng + gi] = r;
            for (c = c0; c < c0 + group; c++) o[c] = o[c] * r * w[c];
        }
    }
}

/* Backward of gated_norm_fwd.  go [rows, D] contiguous; gy [rows, D] contiguous and gz (rows of stride
 * gzs) written; gw [D] written.  The sigmoid of z is computed once per element (kept for the group). */
void gated_norm_bwd(const float *go, const float *y, const float *z, const float *w, const float *rstd,
                    float *gy, float *gz, float *gw, int64_t rows, int D, int group, int64_t zs, int64_t gzs) {
    const int ng = D / group;
    memset(gw, 0, sizeof(float) * (size_t)D);
#pragma omp parallel
    {
        float *part = calloc((size_t)D, sizeof(float));
        float *sg = malloc(sizeof(float) * (size_t)(group + 8)); /* sigmoid(z) of the group */
#pragma omp for schedule(static)
        for (int64_t row = 0; row < rows; row++) {
            const float *gor = go + row * D, *yr = y + row * D, *zr = z + row * zs;
            float *gyr = gy + row * D, *gzr = gz + row * gzs;
            for (int gi = 0; gi < ng; gi++) {
                const int c0 = gi * group, c1 = c0 + group;
                const float r = rstd[row * ng + gi];
                /* pass 1: dot = sum(go * w * normed) / group, and the weight gradient */
                v8f d8 = {0};
                float d = 0.0f;
                int c = c0;
                for (; c + 8 <= c1; c += 8) {
                    const v8f zv = load8(zr + c), sv = tsigmoid8(zv), nv = load8(yr + c) * zv * sv * r, gv = load8(gor + c);
                    store8(sg + (c - c0), sv);
                    d8 += gv * load8(w + c) * nv;
                    store8(part + c, load8(part + c) + gv * nv);
                }
                for (; c < c1; c++) {
                    const float sv = tsigmoid(zr[c]), nv = yr[c] * zr[c] * sv * r;
                    sg[c - c0] = sv;
                    d += gor[c] * w[c] * nv;
                    part[c] += gor[c] * nv;
                }
                const float dot = (hsum8(d8) + d) / (float)group;
                /* pass 2: ga = (go w - normed dot) r; gy = ga silu(z); gz = ga y s (1 + z (1 - s)) */
                for (c = c0; c + 8 <= c1; c += 8) {
                    const v8f zv = load8(zr + c), yv = load8(yr + c), sv = load8(sg + (c - c0)), gate = zv * sv;
                    const v8f ga = (load8(gor + c) * load8(w + c) - yv * gate * r * dot) * r;
                    store8(gyr + c, ga * gate);
                    store8(gzr + c, ga * yv * sv * (1.0f + zv * (1.0f - sv)));
                }
                for (; c < c1; c++) {
                    const float zv = zr[c], yv = yr[c], sv = sg[c - c0], gate = zv * sv;
                    const float ga = (gor[c] * w[c] - yv * gate * r * dot) * r;
                    gyr[c] = ga * gate;
                    gzr[c] = ga * yv * sv * (1.0f + zv * (1.0f - sv));
                }
            }
        }
#pragma omp critical
        for (int c = 0; c < D; c++) gw[c] += part[c];
        free(sg);
        free(part);
    }
}

/* ---------------------------------------------------------------- chunked SSD scan: the decay blocks
 * Per chunk (b, c), group g, head r of the group, positions l, s of the chunk (Q of them):
 *     L[l, s] = exp(cs[l] - cs[s]) for s <= l within the same document, else 0
 *     M = L * CB                                  (CB[l, s] = C_l . B_s, shared by the heads of a group)
 * cs [B, NC, G, R, Q] (in-chunk cumulative dt * A), CB [B, NC, G, Q, Q], M [B, NC, G, R, Q, Q]; seg as above
 * (documents restart inside a chunk: s must not lie before the first position of l's document). */
static void first_of_doc(const int64_t *seg, int64_t t0, int Q, int *lo) {
    lo[0] = 0;
    for (int l = 1; l < Q; l++) lo[l] = (seg != NULL && seg[t0 + l] != seg[t0 + l - 1]) ? l : lo[l - 1];
}

void ssd_decay_fwd(const float *cs, const float *CB, const int64_t *seg, float *M, int B, int NC, int G, int R,
                   int Q) {
    const int64_t blocks = (int64_t)B * NC * G * R;
#pragma omp parallel for schedule(static)
    for (int64_t blk = 0; blk < blocks; blk++) {
        const int64_t bcg = blk / R, bc = bcg / G;
        int lo[1024];
        first_of_doc(seg, bc * Q, Q, lo); /* chunk bc starts at token (b * NC + c) * Q of the [B, T] seg */
        const float *c0 = cs + blk * Q, *cb = CB + bcg * Q * Q;
        float *m = M + blk * Q * Q;
        for (int l = 0; l < Q; l++) {
            const float cl = c0[l];
            float *mr = m + (int64_t)l * Q;
            const float *cbr = cb + (int64_t)l * Q;
            int s = 0;
            for (; s + 8 <= Q; s += 8) {
                v8i idx = {s, s + 1, s + 2, s + 3, s + 4, s + 5, s + 6, s + 7};
                const v8i in = (idx >= lo[l]) & (idx <= l);
                const v8f v = exp8(cl - load8(c0 + s)) * load8(cbr + s);
                store8(mr + s, select8(in, v, (v8f){0}));
            }
            for (; s < Q; s++) mr[s] = (s >= lo[l] && s <= l) ? expf(cl - c0[s]) * cbr[s] : 0.0f;
        }
    }
}

/* Backward of ssd_decay_fwd.  gM [B, NC, G, R, Q, Q]: the gradient of M (read only); writes
 * gCB [B, NC, G, Q, Q] (= sum over r of gM * L) and adds to gcs [B, NC, G, R, Q] the gradient through L
 * (d/dcs[l] += sum_s gM L CB, d/dcs[s] -= sum_l gM L CB). */
void ssd_decay_bwd(const float *gM, const float *cs, const float *CB, const int64_t *seg, float *gCB, float *gcs,
                   int B, int NC, int G, int R, int Q) {
    const int64_t blocks = (int64_t)B * NC * G;
#pragma omp parallel for schedule(static)
    for (int64_t bcg = 0; bcg < blocks; bcg++) {
        const int64_t bc = bcg / G;
        int lo[1024];
        float col[1024];
        first_of_doc(seg, bc * Q, Q, lo);
        const float *cb = CB + bcg * Q * Q;
        float *gcb = gCB + bcg * Q * Q;
        memset(gcb, 0, sizeof(float) * (size_t)Q * Q);
        for (int r = 0; r < R; r++) {
            const int64_t blk = bcg * R + r;
            const float *c0 = cs + blk * Q, *gm = gM + blk * Q * Q;
            float *gc = gcs + blk * Q;
            memset(col, 0, sizeof(float) * (size_t)Q);
            for (int l = 0; l < Q; l++) {
                const float cl = c0[l];
                const float *gmr = gm + (int64_t)l * Q, *cbr = cb + (int64_t)l * Q;
                float *gcbr = gcb + (int64_t)l * Q;
                float row = 0.0f;
                int s = lo[l];
                v8f row8 = {0};
                for (; s + 8 <= l + 1; s += 8) {
                    const v8f v = load8(gmr + s) * exp8(cl - load8(c0 + s));
                    store8(gcbr + s, load8(gcbr + s) + v);
                    const v8f v2 = v * load8(cbr + s);
                    row8 += v2;
                    store8(col + s, load8(col + s) + v2);
                }
                for (; s <= l; s++) {
                    const float v = gmr[s] * expf(cl - c0[s]);
                    gcbr[s] += v;
                    const float v2 = v * cbr[s];
                    row += v2;
                    col[s] += v2;
                }
                gc[l] += hsum8(row8) + row;
            }
            for (int s = 0; s < Q; s++) gc[s] -= col[s];
        }
    }
}

/* ---------------------------------------------------------------- chunked SSD scan: layout passes
 * x [B, T, H, P] with row stride xs (per token; heads and head dims contiguous), dt [B, T, H] contiguous;
 * the head-major layout [B, NC, H, Q, P] (H = G * R) is the scan's.  One (b, c, h) block per task. */
void ssd_in(const float *x, const float *dt, float *X, int B, int NC, int H, int Q, int P, int64_t xs) {
    const int64_t blocks = (int64_t)B * NC * H, T = (int64_t)NC * Q;
#pragma omp parallel for schedule(static)
    for (int64_t blk = 0; blk < blocks; blk++) {
        const int64_t bc = blk / H, h = blk % H, b = bc / NC, t0 = (bc % NC) * Q;
        for (int q = 0; q < Q; q++) {
            const int64_t t = b * T + t0 + q;
            const float *xr = x + b * T * xs + (t0 + q) * xs + h * P;
            const float d = dt[t * H + h];
            float *o = X + (blk * Q + q) * P;
            for (int p = 0; p < P; p++) o[p] = xr[p] * d;
        }
    }
}

/* y [B, T, H, P] contiguous = Y (head-major) + D[h] x */
void ssd_out(const float *Y, const float *x, const float *D, float *y, int B, int NC, int H, int Q, int P, int64_t xs) {
    const int64_t blocks = (int64_t)B * NC * H, T = (int64_t)NC * Q;
#pragma omp parallel for schedule(static)
    for (int64_t blk = 0; blk < blocks; blk++) {
        const int64_t bc = blk / H, h = blk % H, b = bc / NC, t0 = (bc % NC) * Q;
        const float dh = D[h];
        for (int q = 0; q < Q; q++) {
            const float *xr = x + b * T * xs + (t0 + q) * xs + h * P, *yr = Y + (blk * Q + q) * P;
            float *o = y + ((b * T + t0 + q) * H + h) * P;
            for (int p = 0; p < P; p++) o[p] = yr[p] + dh * xr[p];
        }
    }
}

/* Backward, first pass: gY (head-major) = gy [B, T, H, P] contiguous; gDpart [B * NC, H] = sum of gy x */
void ssd_gy_in(const float *gy, const float *x, float *gY, float *gDpart, int B, int NC, int H, int Q, int P,
               int64_t xs) {
    const int64_t blocks = (int64_t)B * NC * H, T = (int64_t)NC * Q;
#pragma omp parallel for schedule(static)
    for (int64_t blk = 0; blk < blocks; blk++) {
        const int64_t bc = blk / H, h = blk % H, b = bc / NC, t0 = (bc % NC) * Q;
        float acc = 0.0f;
        for (int q = 0; q < Q; q++) {
            const float *xr = x + b * T * xs + (t0 + q) * xs + h * P, *g = gy + ((b * T + t0 + q) * H + h) * P;
            float *o = gY + (blk * Q + q) * P;
#pragma omp simd reduction(+ : acc)
            for (int p = 0; p < P; p++) {
                o[p] = g[p];
                acc += g[p] * xr[p];
            }
        }
        gDpart[blk] = acc;
    }
}

/* Backward, last pass: gx (rows of stride gxs) = gy D[h] + gX (head-major) dt; gdtx [B, T, H] = sum_p gX x */
void ssd_gx(const float *gy, const float *gX, const float *x, const float *dt, const float *D, float *gx,
            float *gdtx, int B, int NC, int H, int Q, int P, int64_t xs, int64_t gxs) {
    const int64_t blocks = (int64_t)B * NC * H, T = (int64_t)NC * Q;
#pragma omp parallel for schedule(static)
    for (int64_t blk = 0; blk < blocks; blk++) {
        const int64_t bc = blk / H, h = blk % H, b = bc / NC, t0 = (bc % NC) * Q;
        const float dh = D[h];
        for (int q = 0; q < Q; q++) {
            const int64_t t = b * T + t0 + q;
            const float *xr = x + b * T * xs + (t0 + q) * xs + h * P, *g = gy + (t * H + h) * P;
            const float *gr = gX + (blk * Q + q) * P;
            float *o = gx + b * T * gxs + (t0 + q) * gxs + h * P;
            const float d = dt[t * H + h];
            float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
            for (int p = 0; p < P; p++) {
                o[p] = g[p] * dh + gr[p] * d;
                acc += gr[p] * xr[p];
            }
            gdtx[t * H + h] = acc;
        }
    }
}

/* ---------------------------------------------------------------- routed experts (training)
 * Pairs (token n, slot j) are p = n k + j; inv[p]: the pair's row among the pairs sorted by expert. */

/* out [M, D] = rows idx[i] of src (row stride ss) */
void rows_gather(const float *src, const int64_t *idx, float *out, int64_t M, int D, int64_t ss) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < M; i++) memcpy(out + i * D, src + idx[i] * ss, sizeof(float) * (size_t)D);
}

/* out [N, D] = sum_j w[n, j] ys[inv[n k + j]]  (ys [N k, D] sorted by expert) */
void moe_combine(const float *ys, const int64_t *inv, const float *w, float *out, int64_t N, int k, int D) {
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        float *o = out + n * D;
        for (int j = 0; j < k; j++) {
            const float wj = w[n * k + j], *y = ys + inv[n * k + j] * D;
            if (j == 0) {
                for (int d = 0; d < D; d++) o[d] = wj * y[d];
            } else {
                for (int d = 0; d < D; d++) o[d] += wj * y[d];
            }
        }
    }
}

/* Backward of moe_combine: grad_w [N, k] = ys[inv[p]] . g[n];  gs [N k, D] (sorted) with gs[inv[p]] = w[p] g[n] */
void moe_combine_bwd(const float *g, const float *ys, const int64_t *inv, const float *w, float *grad_w, float *gs,
                     int64_t N, int k, int D) {
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const float *gn = g + n * D;
        for (int j = 0; j < k; j++) {
            const int64_t row = inv[n * k + j];
            const float wj = w[n * k + j], *y = ys + row * D;
            float *o = gs + row * D;
            float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
            for (int d = 0; d < D; d++) {
                acc += y[d] * gn[d];
                o[d] = wj * gn[d];
            }
            grad_w[n * k + j] = acc;
        }
    }
}

/* out [N, D] = sum_j gxs[inv[n k + j]] */
void moe_gather_sum(const float *gxs, const int64_t *inv, float *out, int64_t N, int k, int D) {
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        float *o = out + n * D;
        memcpy(o, gxs + inv[n * k] * D, sizeof(float) * (size_t)D);
        for (int j = 1; j < k; j++) {
            const float *x = gxs + inv[n * k + j] * D;
            for (int d = 0; d < D; d++) o[d] += x[d];
        }
    }
}

/* h [n] -> relu(h) in place, act = relu(h)^2 (explicit vectors: a scalar select compiles to a branch) */
void relu2_fwd(float *h, float *act, int64_t n) {
    const int64_t n8 = n / 8 * 8;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n8; i += 8) {
        const v8f v = load8(h + i), r = select8(v > 0.0f, v, (v8f){0});
        store8(h + i, r);
        store8(act + i, r * r);
    }
    for (int64_t i = n8; i < n; i++) {
        const float r = h[i] > 0.0f ? h[i] : 0.0f;
        h[i] = r;
        act[i] = r * r;
    }
}

/* ga [n] = 2 ga r in place (d relu(h)^2 / dh = 2 relu(h)) */
void relu2_bwd(float *ga, const float *r, int64_t n) {
    const int64_t n8 = n / 8 * 8;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n8; i += 8) store8(ga + i, load8(ga + i) * load8(r + i) * 2.0f);
    for (int64_t i = n8; i < n; i++) ga[i] = ga[i] * r[i] * 2.0f;
}

/* ---------------------------------------------------------------- block RMS norm and the dense relu^2
 * RMS norm over rows of D: out = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps); x, out [rows, D]
 * contiguous, rstd [rows] written (for the backward). */
void rms_norm_fwd(const float *x, const float *w, float *out, float *rstd, int64_t rows, int D, float eps) {
#pragma omp parallel for schedule(static)
    for (int64_t row = 0; row < rows; row++) {
        const float *xr = x + row * D;
        float *o = out + row * D;
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int c = 0; c < D; c++) ss += xr[c] * xr[c];
        const float r = 1.0f / sqrtf(ss / (float)D + eps);
        rstd[row] = r;
        for (int c = 0; c < D; c++) o[c] = xr[c] * r * w[c];
    }
}

/* Backward of rms_norm_fwd: gx [rows, D] = (go w - n dot) rstd with n = x rstd, dot = mean(go w n); gw [D]. */
void rms_norm_bwd(const float *go, const float *x, const float *w, const float *rstd, float *gx, float *gw,
                  int64_t rows, int D) {
    memset(gw, 0, sizeof(float) * (size_t)D);
#pragma omp parallel
    {
        float *part = calloc((size_t)D, sizeof(float));
#pragma omp for schedule(static)
        for (int64_t row = 0; row < rows; row++) {
            const float *g = go + row * D, *xr = x + row * D;
            float *o = gx + row * D;
            const float r = rstd[row];
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int c = 0; c < D; c++) {
                const float n = xr[c] * r;
                dot += g[c] * w[c] * n;
                part[c] += g[c] * n;
            }
            dot /= (float)D;
            for (int c = 0; c < D; c++) o[c] = (g[c] * w[c] - xr[c] * r * dot) * r;
        }
#pragma omp critical
        for (int c = 0; c < D; c++) gw[c] += part[c];
        free(part);
    }
}

/* act [n] = relu(h)^2 (h unchanged) */
void relu2_out(const float *h, float *act, int64_t n) {
    const int64_t n8 = n / 8 * 8;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n8; i += 8) {
        const v8f v = load8(h + i), r = select8(v > 0.0f, v, (v8f){0});
        store8(act + i, r * r);
    }
    for (int64_t i = n8; i < n; i++) act[i] = h[i] > 0.0f ? h[i] * h[i] : 0.0f;
}

/* gh [n] = 2 g relu(h) */
void relu2_grad(const float *g, const float *h, float *gh, int64_t n) {
    const int64_t n8 = n / 8 * 8;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n8; i += 8) {
        const v8f v = load8(h + i);
        store8(gh + i, load8(g + i) * select8(v > 0.0f, v, (v8f){0}) * 2.0f);
    }
    for (int64_t i = n8; i < n; i++) gh[i] = g[i] * (h[i] > 0.0f ? h[i] : 0.0f) * 2.0f;
}

/* ---------------------------------------------------------------- chunked SSD scan: B and C per head
 * V: B or C of the chunk, [B, T, G, N] with token stride vs (batch stride T vs); scale [B, NC, G, R, Q]
 * (decay to the chunk end for B, from its start for C).  Forward: Vd [B, NC, G, R, Q, N] = V * scale. */
void ssd_scale_fwd(const float *V, const float *scale, float *Vd, int B, int NC, int G, int R, int Q, int N,
                   int64_t vs) {
    const int64_t blocks = (int64_t)B * NC * G * R;
#pragma omp parallel for schedule(static)
    for (int64_t blk = 0; blk < blocks; blk++) {
        const int64_t bcg = blk / R, bc = bcg / G, g = bcg % G;
        for (int q = 0; q < Q; q++) {
            const float *v = V + (bc * Q + q) * vs + g * N;
            const float s = scale[blk * Q + q];
            float *o = Vd + (blk * Q + q) * N;
            for (int n = 0; n < N; n++) o[n] = v[n] * s;
        }
    }
}

/* Backward of ssd_scale_fwd given Z = d/dVd: gV [B, NC, G, Q, N] = sum_r Z scale (written);
 * gscale [B, NC, G, R, Q] = scale * (Z . V over N) (written). */
void ssd_scale_bwd(const float *Z, const float *V, const float *scale, float *gV, float *gscale, int B, int NC,
                   int G, int R, int Q, int N, int64_t vs) {
    const int64_t blocks = (int64_t)B * NC * G;
#pragma omp parallel for schedule(static)
    for (int64_t bcg = 0; bcg < blocks; bcg++) {
        const int64_t bc = bcg / G, g = bcg % G;
        for (int q = 0; q < Q; q++) {
            const float *v = V + (bc * Q + q) * vs + g * N;
            float *o = gV + (bcg * Q + q) * N;
            for (int n = 0; n < N; n++) o[n] = 0.0f;
            for (int r = 0; r < R; r++) {
                const int64_t row = (bcg * R + r) * Q + q;
                const float *z = Z + row * N;
                const float s = scale[row];
                float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
                for (int n = 0; n < N; n++) {
                    acc += z[n] * v[n];
                    o[n] += z[n] * s;
                }
                gscale[row] = s * acc;
            }
        }
    }
}
