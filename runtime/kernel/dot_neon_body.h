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

/* ---- several activations (dotacts_fn) ----------------------------------------------------------
 * The Q6_K and packed bodies take M activations (a constant after inlining, at most NEON_ACTS):
 * the weight vectors are loaded and unpacked once and applied to all of them, with per-activation
 * accumulators updated in the single dot's order; the single dot is the M = 1 instance. */

/* Q6_K: codes 0..63 from ql/qh, 16-value dots scaled per sub-block, minus 32 * sum sc_j*bsums_j. */
NEON_INLINE void NEON_FN(q6_k_acts_)(const uint8_t *row, const q8_act *acts, int M, int n, float *out, size_t os) {
    const uint8x16_t m4 = vdupq_n_u8(0x0F), m2 = vdupq_n_u8(3);
    float acc[NEON_ACTS];
    for (int m = 0; m < M; m++) acc[m] = 0.0f;
    for (int i = 0; i < n; i++) {
        const int b = i;
        const uint8_t *blk = row + (size_t)b * 210;
        const int8_t *sc = (const int8_t *)(blk + 192);
        int offset[NEON_ACTS];
        int32x4_t sumi[NEON_ACTS];
        for (int m = 0; m < M; m++) {
            const int16_t *bs = acts[m].bsums + b * 16;
            offset[m] = 0;
            for (int j = 0; j < 16; j++) offset[m] += sc[j] * bs[j];
            sumi[m] = vdupq_n_s32(0);
        }
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
                    for (int m = 0; m < M; m++) {
                        const int8_t *aq = acts[m].qs + (size_t)b * QK_K + 128 * h + 32 * k + 16 * half;
                        const int32x4_t p = NEON_DOT16(vdupq_n_s32(0), vreinterpretq_s8_u8(q[k]), vld1q_s8(aq));
                        sumi[m] = vmlaq_n_s32(sumi[m], p, sc[j]);
                    }
                }
            }
        const float d = fp16_load(blk + 208);
        for (int m = 0; m < M; m++) acc[m] += d * acts[m].d[b] * (float)(vaddvq_s32(sumi[m]) - 32 * offset[m]);
    }
    for (int m = 0; m < M; m++) out[m * os] = acc[m];
}

/* ---- the packed layouts (kernel.h): one int32 lane per 32-value sub-block; quarter q of a group
 * (bytes 16q..16q+15 of every 64-byte chunk) is sub-blocks 4q..4q+3, one int32x4 ------------- */

/* The activations' code vectors of group g. */
NEON_INLINE void NEON_FN(group_acts_)(const q8_act *acts, int M, int g, const int8_t *aq[NEON_ACTS]) {
    for (int m = 0; m < M; m++) aq[m] = acts[m].qs16 + (size_t)g * PACK_VALUES;
}

/* isum[m] lanes = integer dots of 4-bit sub-blocks 4q..4q+3 (codes 0..15 are valid s8) with
 * activation m. */
NEON_INLINE void NEON_FN(dot_quarter4_)(const uint8_t *chunks, const int8_t *const aq[NEON_ACTS], int M, int q,
                                        int32x4_t isum[NEON_ACTS]) {
    const uint8x16_t m4 = vdupq_n_u8(0x0F);
    int32x4_t s0[NEON_ACTS], s1[NEON_ACTS];
    for (int m = 0; m < M; m++) s0[m] = s1[m] = vdupq_n_s32(0);
    for (int c = 0; c < 4; c++) {
        const uint8x16_t v = vld1q_u8(chunks + 64 * c + 16 * q);
        const int8x16_t lo = vreinterpretq_s8_u8(vandq_u8(v, m4)), hi = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));
        for (int m = 0; m < M; m++) {
            s0[m] = NEON_DOTL(s0[m], lo, vld1q_s8(aq[m] + 128 * c + 16 * q));
            s1[m] = NEON_DOTL(s1[m], hi, vld1q_s8(aq[m] + 128 * c + 64 + 16 * q));
        }
    }
    for (int m = 0; m < M; m++) isum[m] = vaddq_s32(s0[m], s1[m]);
}

/* 4 fp16 scales -> float32x4 (one fcvtl). */
NEON_INLINE float32x4_t NEON_FN(half4_)(const uint8_t *p) {
    return vcvt_f32_f16(vreinterpret_f16_u8(vld1_u8(p)));
}

NEON_INLINE void NEON_FN(q4_0_packed_acts_)(const uint8_t *row, const q8_act *acts, int M, int n, float *out, size_t os) {
    float32x4_t acc[NEON_ACTS], corr[NEON_ACTS];
    for (int m = 0; m < M; m++) acc[m] = corr[m] = vdupq_n_f32(0.0f);
    for (int g = 0; g < n; g++) {
        const uint8_t *grp = row + (size_t)g * 288;
        const int8_t *aq[NEON_ACTS];
        NEON_FN(group_acts_)(acts, M, g, aq);
        for (int q = 0; q < 4; q++) {
            const float32x4_t dw = NEON_FN(half4_)(grp + 8 * q);
            int32x4_t isum[NEON_ACTS];
            NEON_FN(dot_quarter4_)(grp + 32, aq, M, q, isum);
            for (int m = 0; m < M; m++) {
                const float32x4_t da = vld1q_f32(acts[m].d32 + 16 * g + 4 * q);
                acc[m] = vfmaq_f32(acc[m], vcvtq_f32_s32(isum[m]), vmulq_f32(dw, da));
                corr[m] = vfmaq_f32(corr[m], dw, vld1q_f32(acts[m].s + 16 * g + 4 * q));
            }
        }
    }
    for (int m = 0; m < M; m++) out[m * os] = vaddvq_f32(acc[m]) - 8.0f * vaddvq_f32(corr[m]);
}

/* Codes stored + 128: flipped back to s8 (no offset term then). */
NEON_INLINE void NEON_FN(q8_0_packed_acts_)(const uint8_t *row, const q8_act *acts, int M, int n, float *out, size_t os) {
    const uint8x16_t flip = vdupq_n_u8(0x80);
    float32x4_t acc[NEON_ACTS];
    for (int m = 0; m < M; m++) acc[m] = vdupq_n_f32(0.0f);
    for (int g = 0; g < n; g++) {
        const uint8_t *grp = row + (size_t)g * 544;
        const int8_t *aq[NEON_ACTS];
        NEON_FN(group_acts_)(acts, M, g, aq);
        for (int q = 0; q < 4; q++) {
            int32x4_t s0[NEON_ACTS], s1[NEON_ACTS];
            for (int m = 0; m < M; m++) s0[m] = s1[m] = vdupq_n_s32(0);
            for (int v = 0; v < 8; v += 2) {
                const int8x16_t w0 = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(grp + 32 + 64 * v + 16 * q), flip));
                const int8x16_t w1 = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(grp + 96 + 64 * v + 16 * q), flip));
                for (int m = 0; m < M; m++) {
                    s0[m] = NEON_DOTL(s0[m], w0, vld1q_s8(aq[m] + 64 * v + 16 * q));
                    s1[m] = NEON_DOTL(s1[m], w1, vld1q_s8(aq[m] + 64 * v + 64 + 16 * q));
                }
            }
            const float32x4_t dw = NEON_FN(half4_)(grp + 8 * q);
            for (int m = 0; m < M; m++) {
                const float32x4_t da = vld1q_f32(acts[m].d32 + 16 * g + 4 * q);
                acc[m] = vfmaq_f32(acc[m], vcvtq_f32_s32(vaddq_s32(s0[m], s1[m])), vmulq_f32(dw, da));
            }
        }
    }
    for (int m = 0; m < M; m++) out[m * os] = vaddvq_f32(acc[m]);
}

/* Packed Q4_K: quarters 0, 1 are super-block 0, quarters 2, 3 super-block 1; the weight factors
 * d_s * sc_b and dmin_s * m_b are exact (6-bit integer times fp16). */
NEON_INLINE void NEON_FN(q4_k_packed_acts_)(const uint8_t *row, const q8_act *acts, int M, int n, float *out, size_t os) {
    float32x4_t acc[NEON_ACTS], accm[NEON_ACTS];
    for (int m = 0; m < M; m++) acc[m] = accm[m] = vdupq_n_f32(0.0f);
    for (int g = 0; g < n; g++) {
        const uint8_t *grp = row + (size_t)g * 288;
        const int8_t *aq[NEON_ACTS];
        NEON_FN(group_acts_)(acts, M, g, aq);
        uint8_t sc[16], mn[16];
        q4k_scales_mins(grp + 8, sc, mn);
        q4k_scales_mins(grp + 20, sc + 8, mn + 8);
        const uint16x8_t sc_lo = vmovl_u8(vld1_u8(sc)), sc_hi = vmovl_u8(vld1_u8(sc + 8));
        const uint16x8_t m_lo = vmovl_u8(vld1_u8(mn)), m_hi = vmovl_u8(vld1_u8(mn + 8));
        for (int q = 0; q < 4; q++) {
            const uint16x8_t scq = q < 2 ? sc_lo : sc_hi, mq = q < 2 ? m_lo : m_hi;
            const float32x4_t scf = vcvtq_f32_u32(q % 2 ? vmovl_high_u16(scq) : vmovl_u16(vget_low_u16(scq)));
            const float32x4_t mf = vcvtq_f32_u32(q % 2 ? vmovl_high_u16(mq) : vmovl_u16(vget_low_u16(mq)));
            const float32x4_t scd = vmulq_n_f32(scf, fp16_load(grp + 2 * (q / 2)));
            const float32x4_t mdm = vmulq_n_f32(mf, fp16_load(grp + 4 + 2 * (q / 2)));
            int32x4_t isum[NEON_ACTS];
            NEON_FN(dot_quarter4_)(grp + 32, aq, M, q, isum);
            for (int m = 0; m < M; m++) {
                const float32x4_t da = vld1q_f32(acts[m].d32 + 16 * g + 4 * q);
                acc[m] = vfmaq_f32(acc[m], vcvtq_f32_s32(isum[m]), vmulq_f32(scd, da));
                accm[m] = vfmaq_f32(accm[m], mdm, vld1q_f32(acts[m].s + 16 * g + 4 * q));
            }
        }
    }
    for (int m = 0; m < M; m++) out[m * os] = vaddvq_f32(acc[m]) - vaddvq_f32(accm[m]);
}

#define NEON_DEFINE_DOT(name)                                                                      \
    NEON_TARGET static float NEON_FN(dot_##name##_)(const uint8_t *row, const q8_act *a, int nb) {         \
        return NEON_FN(name##_)(row, a, nb);                                                       \
    }
/* A multi-activation body's single dot (M = 1), block (one row x up to NEON_ACTS activations) and
 * dotacts_fn. */
#define NEON_DEFINE_ACTS(name)                                                                     \
    NEON_TARGET static float NEON_FN(dot_##name##_)(const uint8_t *row, const q8_act *a, int nb) { \
        float out;                                                                                 \
        NEON_FN(name##_acts_)(row, a, 1, nb, &out, 1);                                             \
        return out;                                                                                \
    }                                                                                              \
    NEON_TARGET static void NEON_FN(name##_block_)(const uint8_t *row, size_t rb, int nrows, const q8_act *acts, \
                                                   int M, int nb, float *out, size_t os) {         \
        (void)rb, (void)nrows; /* one row per block */                                             \
        switch (M) {                                                                               \
        case 4: NEON_FN(name##_acts_)(row, acts, 4, nb, out, os); break;                           \
        case 3: NEON_FN(name##_acts_)(row, acts, 3, nb, out, os); break;                           \
        case 2: NEON_FN(name##_acts_)(row, acts, 2, nb, out, os); break;                           \
        default: NEON_FN(name##_acts_)(row, acts, 1, nb, out, os); break;                          \
        }                                                                                          \
    }                                                                                              \
    NEON_TARGET static void NEON_FN(dotacts_##name##_)(const uint8_t *row, size_t rb, int nrows, const q8_act *acts, \
                                                       int nacts, int nb, float *out, size_t os) { \
        dotacts_blocks(NEON_FN(name##_block_), 1, NEON_ACTS, row, rb, nrows, acts, nacts, nb, out, os); \
    }
NEON_DEFINE_DOT(q4_0)
NEON_DEFINE_DOT(q4_1)
NEON_DEFINE_DOT(q8_0)
NEON_DEFINE_DOT(q4_k)
NEON_DEFINE_ACTS(q6_k)
NEON_DEFINE_ACTS(q4_0_packed)
NEON_DEFINE_ACTS(q8_0_packed)
NEON_DEFINE_ACTS(q4_k_packed)
#undef NEON_DEFINE_DOT
#undef NEON_DEFINE_ACTS
