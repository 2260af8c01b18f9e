/* Body of the ARM NEON dot products, included twice by dot_neon.c: once for plain ARMv8.0 NEON
 * (widening multiplies) and once with the dotprod extension (`sdot`). Before including define:
 * NEON_TARGET (function attribute), NEON_DOT16 (int32x4 += 16 s8 x s8 products), NEON_SUFFIX. */

#define NEON_CAT2(a, b) a##b
#define NEON_CAT(a, b) NEON_CAT2(a, b)
#define NEON_FN(name) NEON_CAT(name, NEON_SUFFIX)
#define NEON_INLINE static inline __attribute__((always_inline)) NEON_TARGET

/* Q4_0 / Q4_1: nibbles 0..15 are valid signed bytes, so s8 x s8 products apply unchanged. */
NEON_INLINE float NEON_FN(q4_generic_)(const uint8_t *row, const q8_act *a, const int32_t *idx, int n,
                                       int bsz, int has_m) {
    const uint8x16_t m4 = vdupq_n_u8(0x0F);
    float32x4_t acc0 = vdupq_n_f32(0.0f), acc1 = vdupq_n_f32(0.0f);
    float corr = 0.0f;
    const int qoff = has_m ? 4 : 2;
    for (int i = 0; i < n; i++) {
        const int b = BLOCK_ID(i);
        const uint8_t *k = row + (size_t)b * bsz;
        const uint8x16_t q = vld1q_u8(k + qoff);
        const int8x16_t lo = vreinterpretq_s8_u8(vandq_u8(q, m4)), hi = vreinterpretq_s8_u8(vshrq_n_u8(q, 4));
        const int8_t *aq = a->qs + b * QK;
        int32x4_t p = NEON_DOT16(vdupq_n_s32(0), lo, vld1q_s8(aq));
        p = NEON_DOT16(p, hi, vld1q_s8(aq + 16));
        const float d = fp16_load(k);
        if (i & 1)
            acc1 = vmlaq_n_f32(acc1, vcvtq_f32_s32(p), d * a->d[b]);
        else
            acc0 = vmlaq_n_f32(acc0, vcvtq_f32_s32(p), d * a->d[b]);
        corr += (has_m ? fp16_load(k + 2) : d) * a->s[b];
    }
    const float dot = vaddvq_f32(vaddq_f32(acc0, acc1));
    return has_m ? dot + corr : dot - 8.0f * corr;
}

NEON_INLINE float NEON_FN(q4_0_)(const uint8_t *row, const q8_act *a, const int32_t *idx, int n) {
    return NEON_FN(q4_generic_)(row, a, idx, n, 18, 0);
}
NEON_INLINE float NEON_FN(q4_1_)(const uint8_t *row, const q8_act *a, const int32_t *idx, int n) {
    return NEON_FN(q4_generic_)(row, a, idx, n, 20, 1);
}

NEON_INLINE float NEON_FN(q8_0_)(const uint8_t *row, const q8_act *a, const int32_t *idx, int n) {
    float32x4_t acc0 = vdupq_n_f32(0.0f), acc1 = vdupq_n_f32(0.0f);
    for (int i = 0; i < n; i++) {
        const int b = BLOCK_ID(i);
        const uint8_t *k = row + (size_t)b * 34;
        const int8_t *aq = a->qs + b * QK;
        int32x4_t p = NEON_DOT16(vdupq_n_s32(0), vld1q_s8((const int8_t *)k + 2), vld1q_s8(aq));
        p = NEON_DOT16(p, vld1q_s8((const int8_t *)k + 18), vld1q_s8(aq + 16));
        if (i & 1)
            acc1 = vmlaq_n_f32(acc1, vcvtq_f32_s32(p), fp16_load(k) * a->d[b]);
        else
            acc0 = vmlaq_n_f32(acc0, vcvtq_f32_s32(p), fp16_load(k) * a->d[b]);
    }
    return vaddvq_f32(vaddq_f32(acc0, acc1));
}

/* Q4_K: 16-value integer dots scaled by the 6-bit sub-block scales in int32. */
NEON_INLINE float NEON_FN(q4_k_)(const uint8_t *row, const q8_act *a, const int32_t *idx, int n) {
    const uint8x16_t m4 = vdupq_n_u8(0x0F);
    float acc = 0.0f;
    for (int i = 0; i < n; i++) {
        const int b = BLOCK_ID(i);
        const uint8_t *blk = row + (size_t)b * 144, *qs = blk + 16;
        const int8_t *aq = a->qs + (size_t)b * QK_K;
        int32x4_t sumi = vdupq_n_s32(0);
        uint8_t sc[8], mn[8];
        q4k_scales_mins(blk + 4, sc, mn);
        const int summ = q4k_min_sum(a->bsums + b * 16, mn);
        for (int c = 0; c < 4; c++) {
            const int sc0 = sc[2 * c], sc1 = sc[2 * c + 1];
            const uint8x16_t q0 = vld1q_u8(qs + 32 * c), q1 = vld1q_u8(qs + 32 * c + 16);
            int32x4_t plo = NEON_DOT16(vdupq_n_s32(0), vreinterpretq_s8_u8(vandq_u8(q0, m4)), vld1q_s8(aq + 64 * c));
            plo = NEON_DOT16(plo, vreinterpretq_s8_u8(vandq_u8(q1, m4)), vld1q_s8(aq + 64 * c + 16));
            int32x4_t phi = NEON_DOT16(vdupq_n_s32(0), vreinterpretq_s8_u8(vshrq_n_u8(q0, 4)), vld1q_s8(aq + 64 * c + 32));
            phi = NEON_DOT16(phi, vreinterpretq_s8_u8(vshrq_n_u8(q1, 4)), vld1q_s8(aq + 64 * c + 48));
            sumi = vmlaq_n_s32(sumi, plo, sc0);
            sumi = vmlaq_n_s32(sumi, phi, sc1);
        }
        const float da = a->d[b];
        acc += fp16_load(blk) * da * (float)vaddvq_s32(sumi) - fp16_load(blk + 2) * da * (float)summ;
    }
    return acc;
}

/* Q6_K: codes 0..63 from ql/qh, 16-value dots scaled per sub-block, minus 32 * sum sc_j*bsums_j. */
NEON_INLINE float NEON_FN(q6_k_)(const uint8_t *row, const q8_act *a, const int32_t *idx, int n) {
    const uint8x16_t m4 = vdupq_n_u8(0x0F), m2 = vdupq_n_u8(3);
    float acc = 0.0f;
    for (int i = 0; i < n; i++) {
        const int b = BLOCK_ID(i);
        const uint8_t *blk = row + (size_t)b * 210;
        const int8_t *sc = (const int8_t *)(blk + 192);
        const int8_t *aq = a->qs + (size_t)b * QK_K;
        const int16_t *bs = a->bsums + b * 16;
        int offset = 0;
        for (int j = 0; j < 16; j++) offset += sc[j] * bs[j];
        int32x4_t sumi = vdupq_n_s32(0);
        for (int h = 0; h < 2; h++)
            for (int half = 0; half < 2; half++) { /* values 16*half .. of each 32-value run */
                const uint8_t *ql = blk + 64 * h + 16 * half, *qh = blk + 128 + 32 * h + 16 * half;
                const uint8x16_t l0 = vld1q_u8(ql), l1 = vld1q_u8(ql + 32), hb = vld1q_u8(qh);
                uint8x16_t q[4];
                q[0] = vorrq_u8(vandq_u8(l0, m4), vshlq_n_u8(vandq_u8(hb, m2), 4));
                q[1] = vorrq_u8(vandq_u8(l1, m4), vshlq_n_u8(vandq_u8(vshrq_n_u8(hb, 2), m2), 4));
                q[2] = vorrq_u8(vshrq_n_u8(l0, 4), vshlq_n_u8(vandq_u8(vshrq_n_u8(hb, 4), m2), 4));
                q[3] = vorrq_u8(vshrq_n_u8(l1, 4), vshlq_n_u8(vshrq_n_u8(hb, 6), 4));
                for (int k = 0; k < 4; k++) {
                    const int j = 8 * h + 2 * k + half;
                    const int32x4_t p = NEON_DOT16(vdupq_n_s32(0), vreinterpretq_s8_u8(q[k]),
                                                   vld1q_s8(aq + 128 * h + 32 * k + 16 * half));
                    sumi = vmlaq_n_s32(sumi, p, sc[j]);
                }
            }
        acc += fp16_load(blk + 208) * a->d[b] * (float)(vaddvq_s32(sumi) - 32 * offset);
    }
    return acc;
}

/* Packed Q4_0 (kernel.h): 8 scales converted by two fcvtl, aligned 16-byte nibble loads; idx/n
 * count 8-block groups. In a 64-byte chunk, bytes 0..31 hold block 0 (low nibbles) and block 2
 * (high), bytes 32..63 blocks 1 and 3. */
NEON_INLINE float NEON_FN(q4_0_packed_)(const uint8_t *row, const q8_act *a, const int32_t *idx, int n) {
    const uint8x16_t m4 = vdupq_n_u8(0x0F);
    float32x4_t acc0 = vdupq_n_f32(0.0f), acc1 = vdupq_n_f32(0.0f), corr = vdupq_n_f32(0.0f);
    for (int i = 0; i < n; i++) {
        const int g = BLOCK_ID(i);
        const uint8_t *grp = row + (size_t)g * 144;
        const float32x4_t d_lo = vcvt_f32_f16(vreinterpret_f16_u8(vld1_u8(grp)));     /* blocks 0..3 */
        const float32x4_t d_hi = vcvt_f32_f16(vreinterpret_f16_u8(vld1_u8(grp + 8))); /* blocks 4..7 */
        corr = vfmaq_f32(corr, d_lo, vld1q_f32(a->s + 8 * g));
        corr = vfmaq_f32(corr, d_hi, vld1q_f32(a->s + 8 * g + 4));
        for (int c = 0; c < 2; c++) {
            const uint8_t *chunk = grp + 16 + 64 * c;
            const int8_t *aq = a->qs + (size_t)g * 256 + 128 * c;
            const float32x4_t s = vmulq_f32(c ? d_hi : d_lo, vld1q_f32(a->d + 8 * g + 4 * c));
            const uint8x16_t v0 = vld1q_u8(chunk), v1 = vld1q_u8(chunk + 16);
            const uint8x16_t v2 = vld1q_u8(chunk + 32), v3 = vld1q_u8(chunk + 48);
#define LO(v) vreinterpretq_s8_u8(vandq_u8(v, m4))
#define HI(v) vreinterpretq_s8_u8(vshrq_n_u8(v, 4))
            const int32x4_t p0 = NEON_DOT16(NEON_DOT16(vdupq_n_s32(0), LO(v0), vld1q_s8(aq)), LO(v1), vld1q_s8(aq + 16));
            const int32x4_t p1 = NEON_DOT16(NEON_DOT16(vdupq_n_s32(0), LO(v2), vld1q_s8(aq + 32)), LO(v3), vld1q_s8(aq + 48));
            const int32x4_t p2 = NEON_DOT16(NEON_DOT16(vdupq_n_s32(0), HI(v0), vld1q_s8(aq + 64)), HI(v1), vld1q_s8(aq + 80));
            const int32x4_t p3 = NEON_DOT16(NEON_DOT16(vdupq_n_s32(0), HI(v2), vld1q_s8(aq + 96)), HI(v3), vld1q_s8(aq + 112));
#undef LO
#undef HI
            acc0 = vfmaq_laneq_f32(acc0, vcvtq_f32_s32(p0), s, 0);
            acc1 = vfmaq_laneq_f32(acc1, vcvtq_f32_s32(p1), s, 1);
            acc0 = vfmaq_laneq_f32(acc0, vcvtq_f32_s32(p2), s, 2);
            acc1 = vfmaq_laneq_f32(acc1, vcvtq_f32_s32(p3), s, 3);
        }
    }
    return vaddvq_f32(vaddq_f32(acc0, acc1)) - 8.0f * vaddvq_f32(corr);
}

NEON_TARGET static float NEON_FN(dot_q4_0_packed_)(const uint8_t *row, const q8_act *a, int nb, const int32_t *idx,
                                                  int n) {
    return idx ? NEON_FN(q4_0_packed_)(row, a, idx, n) : NEON_FN(q4_0_packed_)(row, a, NULL, nb);
}

NEON_TARGET static float NEON_FN(dot_q4_k_)(const uint8_t *row, const q8_act *a, int nb, const int32_t *idx, int n) {
    return idx ? NEON_FN(q4_k_)(row, a, idx, n) : NEON_FN(q4_k_)(row, a, NULL, nb);
}
NEON_TARGET static float NEON_FN(dot_q6_k_)(const uint8_t *row, const q8_act *a, int nb, const int32_t *idx, int n) {
    return idx ? NEON_FN(q6_k_)(row, a, idx, n) : NEON_FN(q6_k_)(row, a, NULL, nb);
}

NEON_TARGET static float NEON_FN(dot_q4_0_)(const uint8_t *row, const q8_act *a, int nb, const int32_t *idx, int n) {
    return idx ? NEON_FN(q4_0_)(row, a, idx, n) : NEON_FN(q4_0_)(row, a, NULL, nb);
}
NEON_TARGET static float NEON_FN(dot_q4_1_)(const uint8_t *row, const q8_act *a, int nb, const int32_t *idx, int n) {
    return idx ? NEON_FN(q4_1_)(row, a, idx, n) : NEON_FN(q4_1_)(row, a, NULL, nb);
}
NEON_TARGET static float NEON_FN(dot_q8_0_)(const uint8_t *row, const q8_act *a, int nb, const int32_t *idx, int n) {
    return idx ? NEON_FN(q8_0_)(row, a, idx, n) : NEON_FN(q8_0_)(row, a, NULL, nb);
}
