/* Vector helpers shared by the kernel files: 8 float lanes (GCC/clang vector extensions; one AVX
 * register on x86, two NEON registers on ARM).  Loads and stores go through memcpy: no alignment is
 * assumed. */
#ifndef HYBRID_RL_VEC_H
#define HYBRID_RL_VEC_H

#include <math.h>
#include <stdint.h>
#include <string.h>

typedef float v8f __attribute__((vector_size(32)));

static inline float silu(float x) { return x / (1.0f + expf(-x)); }

static inline float softplus(float x) { return x > 20.0f ? x : log1pf(expf(x)); }

static inline v8f load8(const float *p) {
    v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store8(float *p, v8f v) { memcpy(p, &v, sizeof v); }

typedef int32_t v8i __attribute__((vector_size(32)));

/* lane-wise mask ? a : b (a vector comparison yields an all-ones / all-zeros mask per lane) */
static inline v8f select8(v8i mask, v8f a, v8f b) { return (v8f)(((v8i)a & mask) | ((v8i)b & ~mask)); }

/* exp(x) on 8 lanes: 2^n * e^r with |r| <= ln2/2 and Cephes' expf polynomial (about 1 ulp). */
static inline v8f exp8(v8f x) {
    const v8f hi = {88.3762626647949f, 88.3762626647949f, 88.3762626647949f, 88.3762626647949f,
                    88.3762626647949f, 88.3762626647949f, 88.3762626647949f, 88.3762626647949f};
    const v8f zero = {0};
    const v8f lo = -hi, magic = zero + 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    x = select8(x < lo, lo, x);
    x = select8(x > hi, hi, x);
    const v8f t = x * 1.44269504088896341f + magic;
    const v8f n = t - magic;
    const v8f r = x - n * 0.693359375f + n * 2.12194440e-4f;
    v8f p = r * 0.0f + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const v8i bits = ((v8i)t - (v8i)magic + 127) << 23;
    return p * (v8f)bits;
}

static inline float hsum8(v8f v) {
    return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

/* lanes of a and b (0-7: a, 8-15: b): __builtin_shufflevector in clang and GCC >= 12, __builtin_shuffle
 * in older GCC */
#if defined(__clang__) || __GNUC__ >= 12
#define SHUFFLE8(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE8(a, b, ...) __builtin_shuffle(a, b, (v8i){__VA_ARGS__})
#endif

/* lane i = hsum8(v[i]) for eight vectors at once: the same additions of the same operands in the same
 * order (pairs, then pairs of pairs, then the two halves), so each result equals hsum8's bit for bit,
 * from three rounds of vector adds instead of eight scalar reductions. */
static inline v8f pair_sums8(v8f a, v8f b) { /* [a0+a1, a2+a3, b0+b1, b2+b3 | a4+a5, a6+a7, b4+b5, b6+b7] */
    return SHUFFLE8(a, b, 0, 2, 8, 10, 4, 6, 12, 14) + SHUFFLE8(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
}

static inline v8f hsum8x8(const v8f v[8]) {
    /* q0123 = [lo(v0), lo(v1), lo(v2), lo(v3) | hi(v0), ..., hi(v3)], lo = (0+1)+(2+3), hi = (4+5)+(6+7) */
    const v8f q0123 = pair_sums8(pair_sums8(v[0], v[1]), pair_sums8(v[2], v[3]));
    const v8f q4567 = pair_sums8(pair_sums8(v[4], v[5]), pair_sums8(v[6], v[7]));
    return SHUFFLE8(q0123, q4567, 0, 1, 2, 3, 8, 9, 10, 11) + SHUFFLE8(q0123, q4567, 4, 5, 6, 7, 12, 13, 14, 15);
}

#ifdef __AVX512F__
/* 16 float lanes: one AVX-512 register */
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

static inline v16f load16(const float *p) {
    v16f v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store16(float *p, v16f v) { memcpy(p, &v, sizeof v); }

/* lanes 0-7 and 8-15 (through memcpy, as the loads: any compiler that has the vector extensions) */
static inline v8f lo8(v16f v) { return load8((const float *)&v); }

static inline v8f hi8(v16f v) { return load8((const float *)&v + 8); }

/* switch (mr) over 1..12 with a constant row count at each call site: each count gets its own unrolled loop */
#define BY_ROWS(mr, CALL) \
    switch (mr) { \
    case 12: CALL(12); break; case 11: CALL(11); break; case 10: CALL(10); break; case 9: CALL(9); break; \
    case 8: CALL(8); break; case 7: CALL(7); break; case 6: CALL(6); break; case 5: CALL(5); break; \
    case 4: CALL(4); break; case 3: CALL(3); break; case 2: CALL(2); break; default: CALL(1); \
    }

/* acc[0..MR) += the first MR rows of a block of A packed row-interleaved, ap[kk * 12 + r] (one stream per
 * block), times the panel pair B0 = [K][16], B0 + K*16: the micro-kernel of decode.c's extensions and gemm.c. */
static inline __attribute__((always_inline)) void block2_packed(const float *ap, int K, const float *B0,
                                                                v16f acc[12][2], const int MR) {
    const float *B1 = B0 + (int64_t)K * 16;
    for (int kk = 0; kk < K; kk++) {
        const v16f b0 = load16(B0 + (int64_t)kk * 16), b1 = load16(B1 + (int64_t)kk * 16);
        const float *a = ap + (int64_t)kk * 12;
        for (int r = 0; r < MR; r++) {
            acc[r][0] += a[r] * b0;
            acc[r][1] += a[r] * b1;
        }
    }
}
#endif

#endif
