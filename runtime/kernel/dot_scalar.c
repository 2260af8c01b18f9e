/* Portable C dot products of one raw GGUF weight row with the int8 activation: the reference that
 * every SIMD path must reproduce (same integer sums, same float formula per block). */
#include "kernel.h"

#define INLINE static inline __attribute__((always_inline))
/* The table entry (dot_fn) of an always-inlined body. */
#define DEFINE_DOT(name, impl) \
    static float name(const uint8_t *row, const q8_act *a, int nb) { return impl(row, a, nb); }

/* Q4_0: x = d * (q - 8). Per block: d*da*sum(q*a) - 8*d*(da*sum(a)). */
INLINE float q4_0(const uint8_t *row, const q8_act *a, int n) {
    float acc = 0.0f, corr = 0.0f;
    for (int i = 0; i < n; i++) {
        const int b = i;
        const uint8_t *blk = row + (size_t)b * 18, *qs = blk + 2;
        const int8_t *aq = a->qs + b * QK;
        int sum = 0;
        for (int j = 0; j < 16; j++) sum += (qs[j] & 0xF) * aq[j] + (qs[j] >> 4) * aq[j + 16];
        const float d = fp16_to_fp32(read_u16(blk));
        acc += d * a->d[b] * (float)sum;
        corr += d * a->s[b];
    }
    return acc - 8.0f * corr;
}

/* Q4_1: x = d*q + m. Per block: d*da*sum(q*a) + m*(da*sum(a)). */
INLINE float q4_1(const uint8_t *row, const q8_act *a, int n) {
    float acc = 0.0f, corr = 0.0f;
    for (int i = 0; i < n; i++) {
        const int b = i;
        const uint8_t *blk = row + (size_t)b * 20, *qs = blk + 4;
        const int8_t *aq = a->qs + b * QK;
        int sum = 0;
        for (int j = 0; j < 16; j++) sum += (qs[j] & 0xF) * aq[j] + (qs[j] >> 4) * aq[j + 16];
        acc += fp16_to_fp32(read_u16(blk)) * a->d[b] * (float)sum;
        corr += fp16_to_fp32(read_u16(blk + 2)) * a->s[b];
    }
    return acc + corr;
}

/* Q8_0: x = d*q. */
INLINE float q8_0(const uint8_t *row, const q8_act *a, int n) {
    float acc = 0.0f;
    for (int i = 0; i < n; i++) {
        const int b = i;
        const uint8_t *blk = row + (size_t)b * 34;
        const int8_t *qs = (const int8_t *)(blk + 2), *aq = a->qs + b * QK;
        int sum = 0;
        for (int j = 0; j < QK; j++) sum += qs[j] * aq[j];
        acc += fp16_to_fp32(read_u16(blk)) * a->d[b] * (float)sum;
    }
    return acc;
}

/* Q4_K: x = d*sc_j*q - dmin*m_j over 8 sub-blocks of 32; 64-value chunk c holds values l (low
 * nibble of qs[32c+l]) and 32+l (high nibble). */
INLINE float q4_k(const uint8_t *row, const q8_act *a, int n) {
    float acc = 0.0f;
    for (int i = 0; i < n; i++) {
        const int b = i;
        const uint8_t *blk = row + (size_t)b * 144, *scales = blk + 4, *qs = blk + 16;
        const int8_t *aq = a->qs + b * QK_K;
        const int16_t *bs = a->bsums + b * 16;
        int sumq = 0, summ = 0; /* sum_j sc_j*dot_j, sum_j m_j*asum_j */
        for (int c = 0; c < 4; c++) {
            uint8_t sc0, m0, sc1, m1;
            q4k_scale_min(2 * c, scales, &sc0, &m0);
            q4k_scale_min(2 * c + 1, scales, &sc1, &m1);
            int d0 = 0, d1 = 0;
            for (int l = 0; l < 32; l++) {
                d0 += (qs[32 * c + l] & 0xF) * aq[64 * c + l];
                d1 += (qs[32 * c + l] >> 4) * aq[64 * c + 32 + l];
            }
            sumq += sc0 * d0 + sc1 * d1;
            summ += m0 * (bs[4 * c] + bs[4 * c + 1]) + m1 * (bs[4 * c + 2] + bs[4 * c + 3]);
        }
        const float da = a->d[b];
        acc += fp16_to_fp32(read_u16(blk)) * da * (float)sumq - fp16_to_fp32(read_u16(blk + 2)) * da * (float)summ;
    }
    return acc;
}

/* Q6_K: x = d*sc_j*(q - 32) over 16 sub-blocks of 16; q = 4 low bits from ql, 2 high bits from qh.
 * In each half h (128 values): value l (0..31) + 32*k takes ql[64h + l + 32*(k&1)] nibble k>>1
 * and qh[32h + l] bits 2k..2k+1. */
INLINE float q6_k(const uint8_t *row, const q8_act *a, int n) {
    float acc = 0.0f;
    for (int i = 0; i < n; i++) {
        const int b = i;
        const uint8_t *blk = row + (size_t)b * 210;
        const int8_t *sc = (const int8_t *)(blk + 192);
        const int8_t *aq = a->qs + b * QK_K;
        const int16_t *bs = a->bsums + b * 16;
        int sum = 0;
        for (int h = 0; h < 2; h++) {
            const uint8_t *ql = blk + 64 * h, *qh = blk + 128 + 32 * h;
            for (int k = 0; k < 4; k++) {
                for (int half = 0; half < 2; half++) { /* 16-value sub-block */
                    int dot = 0;
                    for (int l = 16 * half; l < 16 * half + 16; l++) {
                        int lo = (ql[l + 32 * (k & 1)] >> (4 * (k >> 1))) & 0xF;
                        int q = lo | (((qh[l] >> (2 * k)) & 3) << 4);
                        dot += q * aq[128 * h + 32 * k + l];
                    }
                    const int j = 8 * h + 2 * k + half; /* sub-block index */
                    sum += sc[j] * (dot - 32 * bs[j]);
                }
            }
        }
        acc += fp16_to_fp32(read_u16(blk + 208)) * a->d[b] * (float)sum;
    }
    return acc;
}

/* The packed layouts (kernel.h): n groups of 16 sub-blocks; code k (0..31) of sub-block b of a
 * group is byte 4b + k % 4 of code vector k / 4 (4-bit: chunk k / 8, nibble (k / 4) % 2; Q8_0:
 * chunk k / 4, stored + 128). Integer dot per sub-block against the natural-order activation, the
 * same sums as the raw types. */
INLINE int packed4_code(const uint8_t *chunks, int b, int k) {
    const int v = k / 4;
    return (chunks[64 * (v / 2) + 4 * b + k % 4] >> (4 * (v % 2))) & 0xF;
}

INLINE float q4_0_packed(const uint8_t *row, const q8_act *a, int n) {
    float acc = 0.0f, corr = 0.0f;
    for (int g = 0; g < n; g++) {
        const uint8_t *grp = row + (size_t)g * 288;
        for (int b = 0; b < 16; b++) {
            const int blk = 16 * g + b;
            const int8_t *aq = a->qs + blk * QK;
            int sum = 0;
            for (int k = 0; k < 32; k++) sum += packed4_code(grp + 32, b, k) * aq[k];
            const float d = fp16_to_fp32(read_u16(grp + 2 * b));
            acc += d * a->d[blk] * (float)sum;
            corr += d * a->s[blk];
        }
    }
    return acc - 8.0f * corr;
}

INLINE float q8_0_packed(const uint8_t *row, const q8_act *a, int n) {
    float acc = 0.0f;
    for (int g = 0; g < n; g++) {
        const uint8_t *grp = row + (size_t)g * 544;
        for (int b = 0; b < 16; b++) {
            const int blk = 16 * g + b;
            const int8_t *aq = a->qs + blk * QK;
            int sum = 0;
            for (int k = 0; k < 32; k++) sum += ((int)grp[32 + 64 * (k / 4) + 4 * b + k % 4] - 128) * aq[k];
            acc += fp16_to_fp32(read_u16(grp + 2 * b)) * a->d[blk] * (float)sum;
        }
    }
    return acc;
}

/* Packed Q4_K: per super-block as q4_k (integer sum of sc_j * dot_j and of m_j * sums_j). */
INLINE float q4_k_packed(const uint8_t *row, const q8_act *a, int n) {
    float acc = 0.0f;
    for (int g = 0; g < n; g++) {
        const uint8_t *grp = row + (size_t)g * 288;
        for (int s = 0; s < 2; s++) {
            const int sblk = 2 * g + s;
            uint8_t sc[8], m[8];
            q4k_scales_mins(grp + 8 + 12 * s, sc, m);
            int sumi = 0;
            for (int j = 0; j < 8; j++) {
                const int8_t *aq = a->qs + sblk * QK_K + 32 * j;
                int dot = 0;
                for (int k = 0; k < 32; k++) dot += packed4_code(grp + 32, 8 * s + j, k) * aq[k];
                sumi += sc[j] * dot;
            }
            const float d = fp16_to_fp32(read_u16(grp + 2 * s)), dmin = fp16_to_fp32(read_u16(grp + 4 + 2 * s));
            acc += a->d[sblk] * (d * (float)sumi - dmin * (float)q4k_min_sum(a->bsums + sblk * 16, m));
        }
    }
    return acc;
}

DEFINE_DOT(dot_q4_0, q4_0)
DEFINE_DOT(dot_q4_0_packed, q4_0_packed)
DEFINE_DOT(dot_q4_1, q4_1)
DEFINE_DOT(dot_q8_0, q8_0)
DEFINE_DOT(dot_q4_k, q4_k)
DEFINE_DOT(dot_q6_k, q6_k)
DEFINE_DOT(dot_q8_0_packed, q8_0_packed)
DEFINE_DOT(dot_q4_k_packed, q4_k_packed)

const kernel_path path_scalar = {
    .name = "scalar",
    .dot = {dot_q4_0, dot_q4_1, dot_q8_0, dot_q4_k, dot_q6_k, dot_q4_0_packed, dot_q8_0_packed, dot_q4_k_packed},
    .fallback = NULL,
    .gemm = &gemm_scalar,
};
