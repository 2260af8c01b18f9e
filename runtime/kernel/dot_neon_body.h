/* Body of the ARM NEON dot products, included twice by dot_neon.c: once for plain ARMv8.0 NEON
 * (widening multiplies) and once with the dotprod extension (`sdot`). Before including define:
 * NEON_TARGET (function attribute), NEON_DOT16 (int32x4 += 16 s8 x s8 products, any lane split),
 * NEON_DOTL (the same with lane k += bytes 4k..4k+3, as `sdot`), NEON_SUFFIX. */

#define NEON_CAT2(a, b) a##b
#define NEON_CAT(a, b) NEON_CAT2(a, b)
#define NEON_FN(name) NEON_CAT(name, NEON_SUFFIX)
#define NEON_INLINE static inline __attribute__((always_inline)) NEON_TARGET

/* Q4_0 / Q4_1: nibbles 0..15 are valid signed bytes, so s8 x s8 products apply unchanged. */
NEON_INLINE float NEON_FN(q4_generic_)(const uint8_t *row, const q8_act *a, int n,
                                       int bsz, int has_m) {
    const uint8x16_t m4 = vdupq_n_u8(0x0F);
    float32x4_t acc0 = vdupq_n_f32(0.0f), acc1 = vdupq_n_f32(0.0f);
    float corr = 0.0f;
    const int qoff = has_m ? 4 : 2;
    for (int i = 0; i < n; i++) {
        const int b = i;
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

NEON_INLINE float NEON_FN(q4_0_)(const uint8_t *row, const q8_act *a, int n) {
    return NEON_FN(q4_generic_)(row, a, n, 18, 0);
}
NEON_INLINE float NEON_FN(q4_1_)(const uint8_t *row, const q8_act *a, int n) {
    return NEON_FN(q4_generic_)(row, a, n, 20, 1);
}

NEON_INLINE float NEON_FN(q8_0_)(const uint8_t *row, const q8_act *a, int n) {
    float32x4_t acc0 = vdupq_n_f32(0.0f), acc1 = vdupq_n_f32(0.0f);
    for (int i = 0; i < n; i++) {
        const int b = i;
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
NEON_INLINE float NEON_FN(q4_k_)(const uint8_t *row, const q8_act *a, int n) {
    const uint8x16_t m4 = vdupq_n_u8(0x0F);
    float acc = 0.0f;
    for (int i = 0; i < n; i++) {
        const int b = i;
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
NEON_INLINE float NEON_FN(q6_k_)(const uint8_t *row, const q8_act *a, int n) {
    const uint8x16_t m4 = vdupq_n_u8(0x0F), m2 = vdupq_n_u8(3);
    float acc = 0.0f;
    for (int i = 0; i < n; i++) {
        const int b = i;
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

/* ---- the packed layouts (kernel.h): one int32 lane per 32-value sub-block; quarter q of a group
 * (bytes 16q..16q+15 of every 64-byte chunk) is sub-blocks 4q..4q+3, one int32x4 ------------- */

/* Lanes = integer dots of 4-bit sub-blocks 4q..4q+3 (codes 0..15 are valid s8) with their activations. */
NEON_INLINE int32x4_t NEON_FN(dot_quarter4_)(const uint8_t *chunks, const int8_t *aq, int q) {
    const uint8x16_t m4 = vdupq_n_u8(0x0F);
    int32x4_t s0 = vdupq_n_s32(0), s1 = vdupq_n_s32(0);
    for (int c = 0; c < 4; c++) {
        const uint8x16_t v = vld1q_u8(chunks + 64 * c + 16 * q);
        s0 = NEON_DOTL(s0, vreinterpretq_s8_u8(vandq_u8(v, m4)), vld1q_s8(aq + 128 * c + 16 * q));
        s1 = NEON_DOTL(s1, vreinterpretq_s8_u8(vshrq_n_u8(v, 4)), vld1q_s8(aq + 128 * c + 64 + 16 * q));
    }
    return vaddq_s32(s0, s1);
}

/* 4 fp16 scales -> float32x4 (one fcvtl). */
NEON_INLINE float32x4_t NEON_FN(half4_)(const uint8_t *p) {
    return vcvt_f32_f16(vreinterpret_f16_u8(vld1_u8(p)));
}

NEON_INLINE float NEON_FN(q4_0_packed_)(const uint8_t *row, const q8_act *a, int n) {
    float32x4_t acc = vdupq_n_f32(0.0f), corr = vdupq_n_f32(0.0f);
    for (int g = 0; g < n; g++) {
        const uint8_t *grp = row + (size_t)g * 288;
        const int8_t *aq = a->qs16 + (size_t)g * PACK_VALUES;
        for (int q = 0; q < 4; q++) {
            const float32x4_t dw = NEON_FN(half4_)(grp + 8 * q);
            const int32x4_t isum = NEON_FN(dot_quarter4_)(grp + 32, aq, q);
            acc = vfmaq_f32(acc, vcvtq_f32_s32(isum), vmulq_f32(dw, vld1q_f32(a->d32 + 16 * g + 4 * q)));
            corr = vfmaq_f32(corr, dw, vld1q_f32(a->s + 16 * g + 4 * q));
        }
    }
    return vaddvq_f32(acc) - 8.0f * vaddvq_f32(corr);
}

/* Codes stored + 128: flipped back to s8 (no offset term then). */
NEON_INLINE float NEON_FN(q8_0_packed_)(const uint8_t *row, const q8_act *a, int n) {
    const uint8x16_t flip = vdupq_n_u8(0x80);
    float32x4_t acc = vdupq_n_f32(0.0f);
    for (int g = 0; g < n; g++) {
        const uint8_t *grp = row + (size_t)g * 544;
        const int8_t *aq = a->qs16 + (size_t)g * PACK_VALUES;
        for (int q = 0; q < 4; q++) {
            int32x4_t s0 = vdupq_n_s32(0), s1 = vdupq_n_s32(0);
            for (int v = 0; v < 8; v += 2) {
                const int8x16_t w0 = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(grp + 32 + 64 * v + 16 * q), flip));
                const int8x16_t w1 = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(grp + 96 + 64 * v + 16 * q), flip));
                s0 = NEON_DOTL(s0, w0, vld1q_s8(aq + 64 * v + 16 * q));
                s1 = NEON_DOTL(s1, w1, vld1q_s8(aq + 64 * v + 64 + 16 * q));
            }
            const float32x4_t dw = NEON_FN(half4_)(grp + 8 * q);
            acc = vfmaq_f32(acc, vcvtq_f32_s32(vaddq_s32(s0, s1)), vmulq_f32(dw, vld1q_f32(a->d32 + 16 * g + 4 * q)));
        }
    }
    return vaddvq_f32(acc);
}

/* Packed Q4_K: quarters 0, 1 are super-block 0, quarters 2, 3 super-block 1. */
NEON_INLINE float NEON_FN(q4_k_packed_)(const uint8_t *row, const q8_act *a, int n) {
    float32x4_t acc = vdupq_n_f32(0.0f), accm = vdupq_n_f32(0.0f);
    for (int g = 0; g < n; g++) {
        const uint8_t *grp = row + (size_t)g * 288;
        const int8_t *aq = a->qs16 + (size_t)g * PACK_VALUES;
        uint8_t sc[16], m[16];
        q4k_scales_mins(grp + 8, sc, m);
        q4k_scales_mins(grp + 20, sc + 8, m + 8);
        const uint16x8_t sc_lo = vmovl_u8(vld1_u8(sc)), sc_hi = vmovl_u8(vld1_u8(sc + 8));
        const uint16x8_t m_lo = vmovl_u8(vld1_u8(m)), m_hi = vmovl_u8(vld1_u8(m + 8));
        for (int q = 0; q < 4; q++) {
            const uint16x8_t scq = q < 2 ? sc_lo : sc_hi, mq = q < 2 ? m_lo : m_hi;
            const float32x4_t scf = vcvtq_f32_u32(q % 2 ? vmovl_high_u16(scq) : vmovl_u16(vget_low_u16(scq)));
            const float32x4_t mf = vcvtq_f32_u32(q % 2 ? vmovl_high_u16(mq) : vmovl_u16(vget_low_u16(mq)));
            const float d = fp16_load(grp + 2 * (q / 2)), dmin = fp16_load(grp + 4 + 2 * (q / 2));
            const int32x4_t isum = NEON_FN(dot_quarter4_)(grp + 32, aq, q);
            const float32x4_t da = vld1q_f32(a->d32 + 16 * g + 4 * q);
            acc = vfmaq_f32(acc, vcvtq_f32_s32(isum), vmulq_n_f32(vmulq_f32(scf, da), d));
            accm = vfmaq_f32(accm, vmulq_n_f32(mf, dmin), vld1q_f32(a->s + 16 * g + 4 * q));
        }
    }
    return vaddvq_f32(acc) - vaddvq_f32(accm);
}

#define NEON_DEFINE_DOT(name)                                                                      \
    NEON_TARGET static float NEON_FN(dot_##name##_)(const uint8_t *row, const q8_act *a, int nb) {         \
        return NEON_FN(name##_)(row, a, nb);                                                       \
    }
NEON_DEFINE_DOT(q4_0)
NEON_DEFINE_DOT(q4_1)
NEON_DEFINE_DOT(q8_0)
NEON_DEFINE_DOT(q4_k)
NEON_DEFINE_DOT(q6_k)
NEON_DEFINE_DOT(q4_0_packed)
NEON_DEFINE_DOT(q8_0_packed)
NEON_DEFINE_DOT(q4_k_packed)
#undef NEON_DEFINE_DOT
