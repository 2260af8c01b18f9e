/* AVX2 + FMA + F16C dot products (Haswell / Zen 1 and later). Compiled with a target attribute so
 * the default build runs on any x86-64; dispatch.c calls these only when cpuid reports the
 * features. Same integer sums and per-block float formula as dot_scalar.c. */
#include "kernel.h"

#if defined(POCKETLM_X86)
#include <immintrin.h>

#define TARGET __attribute__((target("avx2,fma,f16c")))
#define INLINE static inline __attribute__((always_inline)) TARGET
#define DEFINE_DOT(name, impl) \
    TARGET static float name(const uint8_t *row, const q8_act *a, int nb) { return impl(row, a, nb); }

INLINE float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

INLINE float half(const uint8_t *p) { return _cvtsh_ss(read_u16(p)); }

/* 16 bytes of nibbles -> 32 unsigned bytes in value order (low nibbles = values 0..15). */
INLINE __m256i unpack_nibbles(const uint8_t *qs) {
    const __m128i q = _mm_loadu_si128((const __m128i *)qs);
    const __m256i v = _mm256_inserti128_si256(_mm256_castsi128_si256(q), _mm_srli_epi16(q, 4), 1);
    return _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
}

/* 8 int32 partial sums of u8 * s8 over 32 bytes (products fit int16: |u| <= 128, |s| <= 127). */
INLINE __m256i dot_u8s8(__m256i u, __m256i s) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

/* Shared by Q4_0 (offset -8 * d) and Q4_1 (min m): two accumulators hide the FMA latency. */
INLINE float q4_generic(const uint8_t *row, const q8_act *a, int n, int bsz, int has_m) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    float corr = 0.0f;
    const int qoff = has_m ? 4 : 2;
    int i = 0;
    for (; i + 1 < n; i += 2) {
        const int b0 = i, b1 = i + 1;
        const uint8_t *k0 = row + (size_t)b0 * bsz, *k1 = row + (size_t)b1 * bsz;
        prefetch_ahead(row, i, bsz);
        const __m256i p0 = dot_u8s8(unpack_nibbles(k0 + qoff), _mm256_loadu_si256((const __m256i *)(a->qs + b0 * QK)));
        const __m256i p1 = dot_u8s8(unpack_nibbles(k1 + qoff), _mm256_loadu_si256((const __m256i *)(a->qs + b1 * QK)));
        const float d0 = half(k0), d1 = half(k1);
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(d0 * a->d[b0]), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_set1_ps(d1 * a->d[b1]), acc1);
        if (has_m)
            corr += half(k0 + 2) * a->s[b0] + half(k1 + 2) * a->s[b1];
        else
            corr += d0 * a->s[b0] + d1 * a->s[b1];
    }
    for (; i < n; i++) {
        const int b = i;
        const uint8_t *k = row + (size_t)b * bsz;
        const __m256i p = dot_u8s8(unpack_nibbles(k + qoff), _mm256_loadu_si256((const __m256i *)(a->qs + b * QK)));
        const float d = half(k);
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * a->d[b]), acc0);
        corr += (has_m ? half(k + 2) : d) * a->s[b];
    }
    const float dot = hsum8(_mm256_add_ps(acc0, acc1));
    return has_m ? dot + corr : dot - 8.0f * corr;
}

INLINE float q4_0(const uint8_t *row, const q8_act *a, int n) {
    return q4_generic(row, a, n, 18, 0);
}
INLINE float q4_1(const uint8_t *row, const q8_act *a, int n) {
    return q4_generic(row, a, n, 20, 1);
}

/* s8 * s8: |w| as unsigned times a with w's sign. */
INLINE __m256i q8_block(const uint8_t *blk, const int8_t *aq) {
    const __m256i w = _mm256_loadu_si256((const __m256i *)(blk + 2));
    const __m256i x = _mm256_loadu_si256((const __m256i *)aq);
    return dot_u8s8(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w));
}

INLINE float q8_0(const uint8_t *row, const q8_act *a, int n) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 1 < n; i += 2) {
        const int b0 = i, b1 = i + 1;
        const uint8_t *k0 = row + (size_t)b0 * 34, *k1 = row + (size_t)b1 * 34;
        prefetch_ahead(row, i, 34);
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q8_block(k0, a->qs + b0 * QK)), _mm256_set1_ps(half(k0) * a->d[b0]), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q8_block(k1, a->qs + b1 * QK)), _mm256_set1_ps(half(k1) * a->d[b1]), acc1);
    }
    for (; i < n; i++) {
        const int b = i;
        const uint8_t *k = row + (size_t)b * 34;
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q8_block(k, a->qs + b * QK)), _mm256_set1_ps(half(k) * a->d[b]), acc0);
    }
    return hsum8(_mm256_add_ps(acc0, acc1));
}

/* ---- the packed layouts (kernel.h): one int32 lane per 32-value sub-block, 8 lanes per half
 * group (bytes 32h..32h+31 of every 64-byte chunk are sub-blocks 8h..8h+7) ----------------------
 * Each body takes M activations (a constant after inlining, at most ACTS): the weight vectors are
 * loaded and unpacked once and applied to all of them; the single dot is the M = 1 instance. Per
 * activation the float accumulators are one per half (lanes = sub-blocks 0..7 and 8..15, i.e. one
 * 16-lane accumulator), added and reduced by hsum_halves at the end: the order the AVX-512
 * multi-activation kernels (dot_avx512.c) reproduce, since these dots are the decode step's there. */

#define ACTS 4 /* activations per block of the multi-activation kernels (dotacts_fn) */

/* The packed decode matvecs prefetch their row stream this far ahead, into L2 (the L1 miss buffers
 * are few). 1 KB ahead is ~40 ns of one core's stream, short of DRAM's latency: one thread of the
 * phi-3-mini decode step, alternated builds on Zen 4 (benchmarks/bench_kernel.py and whole decode
 * steps), Q4_0 21-22 -> 25-28 GB/s and Q8_0 18-19 -> 21-25 GB/s at 16 KB; 4 KB was slower than 1 KB,
 * 16-64 KB alike; two threads unchanged at ~35 GB/s of bandwidth, a little faster at ~60. */
#define GROUP_PREFETCH_BYTES 16384
INLINE void prefetch_group(const uint8_t *grp, int bytes) {
    for (int line = 0; line < bytes; line += 64) __builtin_prefetch(grp + GROUP_PREFETCH_BYTES + line, 0, 2);
}

INLINE float hsum_halves(const __m256 acc[2]) { return hsum8(_mm256_add_ps(acc[0], acc[1])); }

/* Lane b of isum[m] = integer dot of 4-bit sub-block 8h + b with activation m: the 8 `vpmaddubsw`
 * pair sums (each <= 2 * 15 * 127) are added in int16 (8 * 3810 < 32767), then widened once. */
INLINE void dot_half4(const uint8_t *chunks, const int8_t *const aq[ACTS], int M, int h, __m256i isum[ACTS]) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256i s16[ACTS];
    for (int m = 0; m < M; m++) s16[m] = _mm256_setzero_si256();
    for (int c = 0; c < 4; c++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(chunks + 64 * c + 32 * h));
        const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        for (int m = 0; m < M; m++) {
            s16[m] = _mm256_add_epi16(s16[m], _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)(aq[m] + 128 * c + 32 * h))));
            s16[m] = _mm256_add_epi16(s16[m], _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(aq[m] + 128 * c + 64 + 32 * h))));
        }
    }
    for (int m = 0; m < M; m++) isum[m] = _mm256_madd_epi16(s16[m], _mm256_set1_epi16(1));
}

/* The activations' code vectors of group g. */
INLINE void group_acts(const q8_act *acts, int M, int g, const int8_t *aq[ACTS]) {
    for (int m = 0; m < M; m++) aq[m] = acts[m].qs16 + (size_t)g * PACK_VALUES;
}

/* Q4_0: x = d * (q - 8): sum_b d_b * da_b * (isum_b - 8 * asum_b), the offset folded into the
 * integer sum (-8 * asum_b: the activation's off32). */
INLINE void q4_0_packed_acts(const uint8_t *row, const q8_act *acts, int M, int n, float *out, size_t os) {
    __m256 acc[ACTS][2];
    for (int m = 0; m < M; m++) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    for (int g = 0; g < n; g++) {
        const uint8_t *grp = row + (size_t)g * 288;
        const int8_t *aq[ACTS];
        prefetch_group(grp, 288);
        group_acts(acts, M, g, aq);
        for (int h = 0; h < 2; h++) {
            __m256i isum[ACTS];
            dot_half4(grp + 32, aq, M, h, isum);
            const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(grp + 16 * h)));
            for (int m = 0; m < M; m++) {
                const __m256i off = _mm256_loadu_si256((const __m256i *)(acts[m].off32 + 16 * g + 8 * h));
                const __m256 da = _mm256_loadu_ps(acts[m].d32 + 16 * g + 8 * h);
                acc[m][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(isum[m], off)), _mm256_mul_ps(dw, da), acc[m][h]);
            }
        }
    }
    for (int m = 0; m < M; m++) out[m * os] = hsum_halves(acc[m]);
}

/* Codes + 128 turned back to signed, then |w| x (a with w's sign) as the raw Q8_0 kernel (a pair
 * sum reaches 2 * 128 * 127: widened per vector). */
INLINE void q8_0_packed_acts(const uint8_t *row, const q8_act *acts, int M, int n, float *out, size_t os) {
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    __m256 acc[ACTS][2];
    for (int m = 0; m < M; m++) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    for (int g = 0; g < n; g++) {
        const uint8_t *grp = row + (size_t)g * 544;
        const int8_t *aq[ACTS];
        prefetch_group(grp, 544);
        group_acts(acts, M, g, aq);
        for (int h = 0; h < 2; h++) {
            __m256i isum[ACTS];
            for (int m = 0; m < M; m++) isum[m] = _mm256_setzero_si256();
            for (int v = 0; v < 8; v++) {
                const __m256i w = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(grp + 32 + 64 * v + 32 * h)), flip);
                const __m256i aw = _mm256_sign_epi8(w, w);
                for (int m = 0; m < M; m++) {
                    const __m256i x = _mm256_loadu_si256((const __m256i *)(aq[m] + 64 * v + 32 * h));
                    isum[m] = _mm256_add_epi32(isum[m], dot_u8s8(aw, _mm256_sign_epi8(x, w)));
                }
            }
            const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(grp + 16 * h)));
            for (int m = 0; m < M; m++) {
                const __m256 da = _mm256_loadu_ps(acts[m].d32 + 16 * g + 8 * h);
                acc[m][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[m]), _mm256_mul_ps(dw, da), acc[m][h]);
            }
        }
    }
    for (int m = 0; m < M; m++) out[m * os] = hsum_halves(acc[m]);
}

/* Packed Q4_K: half h of a group is super-block h (8 sub-blocks in 8 lanes): x = d_h * sc_b * q -
 * dmin_h * m_b, the weight factors d_h * sc_b and dmin_h * m_b exact (6-bit integer times fp16). */
INLINE void q4_k_packed_acts(const uint8_t *row, const q8_act *acts, int M, int n, float *out, size_t os) {
    __m256 acc[ACTS][2], accm[ACTS][2];
    for (int m = 0; m < M; m++) acc[m][0] = acc[m][1] = accm[m][0] = accm[m][1] = _mm256_setzero_ps();
    for (int g = 0; g < n; g++) {
        const uint8_t *grp = row + (size_t)g * 288;
        const int8_t *aq[ACTS];
        prefetch_group(grp, 288);
        group_acts(acts, M, g, aq);
        for (int h = 0; h < 2; h++) {
            const q4k_words w = q4k_scale_words(grp + 8 + 12 * h); /* in registers: no store forwarding */
            __m256i isum[ACTS];
            dot_half4(grp + 32, aq, M, h, isum);
            const __m256 scf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_set_epi32(0, 0, (int)w.sc_hi, (int)w.sc_lo)));
            const __m256 mf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_set_epi32(0, 0, (int)w.m_hi, (int)w.m_lo)));
            const __m256 scd = _mm256_mul_ps(scf, _mm256_set1_ps(half(grp + 2 * h)));
            const __m256 mdm = _mm256_mul_ps(mf, _mm256_set1_ps(half(grp + 4 + 2 * h)));
            for (int m = 0; m < M; m++) {
                const __m256 da = _mm256_loadu_ps(acts[m].d32 + 16 * g + 8 * h);
                acc[m][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[m]), _mm256_mul_ps(scd, da), acc[m][h]);
                accm[m][h] = _mm256_fmadd_ps(mdm, _mm256_loadu_ps(acts[m].s + 16 * g + 8 * h), accm[m][h]);
            }
        }
    }
    for (int m = 0; m < M; m++) out[m * os] = hsum_halves(acc[m]) - hsum_halves(accm[m]);
}

/* Q4_K: integer sums scaled by the 6-bit sub-block scales in int32, min term from the activation's
 * per-16 sums; one float FMA per super-block. */
INLINE float q4_k(const uint8_t *row, const q8_act *a, int n) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256 acc = _mm256_setzero_ps();
    float acc_min = 0.0f;
    for (int i = 0; i < n; i++) {
        const int b = i;
        const uint8_t *blk = row + (size_t)b * 144, *qs = blk + 16;
        const int8_t *aq = a->qs + (size_t)b * QK_K;
        prefetch_ahead(row, i, 144);
        prefetch_ahead(row + 64, i, 144);
        prefetch_ahead(row + 128, i, 144);
        uint8_t sc[8], mn[8];
        q4k_scales_mins(blk + 4, sc, mn);
        __m256i sumi = _mm256_setzero_si256();
        for (int c = 0; c < 4; c++) {
            const __m256i q = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
            const __m256i lo = _mm256_and_si256(q, m4), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
            const __m256i plo = _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)(aq + 64 * c)));
            const __m256i phi = _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(aq + 64 * c + 32)));
            sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(plo, _mm256_set1_epi16(sc[2 * c])));
            sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(phi, _mm256_set1_epi16(sc[2 * c + 1])));
        }
        const float da = a->d[b];
        acc = _mm256_fmadd_ps(_mm256_set1_ps(half(blk) * da), _mm256_cvtepi32_ps(sumi), acc);
        acc_min += half(blk + 2) * da * (float)q4k_min_sum(a->bsums + b * 16, mn);
    }
    return hsum8(acc) - acc_min;
}

/* Q6_K: 6-bit codes 0..63 assembled from ql/qh, u8 x s8 sums scaled per 16 values in int32,
 * minus 32 * sum_j sc_j * bsums_j (exact integers); the codes and scale vectors built once per
 * super-block for M activations (the single dot: M = 1). */
INLINE void q6_k_acts(const uint8_t *row, const q8_act *acts, int M, int n, float *out, size_t os) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(3);
    __m256 acc[ACTS];
    for (int m = 0; m < M; m++) acc[m] = _mm256_setzero_ps();
    for (int i = 0; i < n; i++) {
        const int b = i;
        const uint8_t *blk = row + (size_t)b * 210;
        const int8_t *sc = (const int8_t *)(blk + 192);
        for (int line = 0; line < 256; line += 64) prefetch_ahead(row + line, i, 210);
        const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)sc));
        __m256i sumi[ACTS];
        for (int m = 0; m < M; m++) {
            const __m256i offset = _mm256_madd_epi16(sc16, _mm256_loadu_si256((const __m256i *)(acts[m].bsums + b * 16)));
            sumi[m] = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(offset, 5));
        }
        for (int h = 0; h < 2; h++) {
            const uint8_t *ql = blk + 64 * h, *qh = blk + 128 + 32 * h;
            const __m256i l0 = _mm256_loadu_si256((const __m256i *)ql);
            const __m256i l1 = _mm256_loadu_si256((const __m256i *)(ql + 32));
            const __m256i hb = _mm256_loadu_si256((const __m256i *)qh);
            __m256i q[4];
            q[0] = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_slli_epi16(_mm256_and_si256(hb, m2), 4));
            q[1] = _mm256_or_si256(_mm256_and_si256(l1, m4),
                                   _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2), m2), 4));
            q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                                   _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 4), m2), 4));
            q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                                   _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 6), m2), 4));
            for (int k = 0; k < 4; k++) {
                const int j = 8 * h + 2 * k; /* sub-blocks j (values 0..15) and j+1 (16..31) */
                const __m256i s = _mm256_set_m128i(_mm_set1_epi16(sc[j + 1]), _mm_set1_epi16(sc[j]));
                for (int m = 0; m < M; m++) {
                    const int8_t *aq = acts[m].qs + (size_t)b * QK_K;
                    const __m256i p = _mm256_maddubs_epi16(q[k], _mm256_loadu_si256((const __m256i *)(aq + 128 * h + 32 * k)));
                    sumi[m] = _mm256_add_epi32(sumi[m], _mm256_madd_epi16(p, s));
                }
            }
        }
        const float d = half(blk + 208);
        for (int m = 0; m < M; m++)
            acc[m] = _mm256_fmadd_ps(_mm256_set1_ps(d * acts[m].d[b]), _mm256_cvtepi32_ps(sumi[m]), acc[m]);
    }
    for (int m = 0; m < M; m++) out[m * os] = hsum8(acc[m]);
}

/* The table entries of a multi-activation body: the single dot (M = 1) and a dotacts_fn over
 * blocks of one row times up to ACTS activations. */
#define DEFINE_ACTS(name, body)                                                                    \
    TARGET static float name(const uint8_t *row, const q8_act *a, int nb) {                        \
        float out;                                                                                 \
        body(row, a, 1, nb, &out, 1);                                                              \
        return out;                                                                                \
    }                                                                                              \
    TARGET static void name##_block(const uint8_t *row, size_t rb, int nrows, const q8_act *acts, int M, int nb, \
                                    float *out, size_t os) {                                       \
        (void)rb, (void)nrows; /* one row per block */                                             \
        switch (M) {                                                                               \
        case 4: body(row, acts, 4, nb, out, os); break;                                            \
        case 3: body(row, acts, 3, nb, out, os); break;                                            \
        case 2: body(row, acts, 2, nb, out, os); break;                                            \
        default: body(row, acts, 1, nb, out, os); break;                                           \
        }                                                                                          \
    }                                                                                              \
    TARGET static void name##_acts(const uint8_t *row, size_t rb, int nrows, const q8_act *acts, int nacts, int nb, \
                                   float *out, size_t os) {                                        \
        dotacts_blocks(name##_block, 1, ACTS, row, rb, nrows, acts, nacts, nb, out, os);           \
    }

DEFINE_DOT(dot_q4_k, q4_k)
DEFINE_DOT(dot_q4_0, q4_0)
DEFINE_DOT(dot_q4_1, q4_1)
DEFINE_DOT(dot_q8_0, q8_0)
DEFINE_ACTS(dot_q6_k, q6_k_acts)
DEFINE_ACTS(dot_q4_0_packed, q4_0_packed_acts)
DEFINE_ACTS(dot_q8_0_packed, q8_0_packed_acts)
DEFINE_ACTS(dot_q4_k_packed, q4_k_packed_acts)

const kernel_path path_avx2 = {
    .name = "avx2",
    .dot = {dot_q4_0, dot_q4_1, dot_q8_0, dot_q4_k, dot_q6_k, dot_q4_0_packed, dot_q8_0_packed, dot_q4_k_packed},
    .fallback = "scalar",
    .dotacts = {[SLOT_Q6_K] = dot_q6_k_acts, [SLOT_Q4_0_PACKED] = dot_q4_0_packed_acts,
                [SLOT_Q8_0_PACKED] = dot_q8_0_packed_acts, [SLOT_Q4_K_PACKED] = dot_q4_k_packed_acts},
    /* where gemm_avx2 overtakes them (measured on Zen 4 with this path, one thread, phi-3-mini
     * shapes: its per-call weight decoding costs about 6 matvecs' time; packed Q4_0 16384 x 3072:
     * 13 vs 92 ms at M = 16, 110 vs 169 at 128, 276 vs 264 at 256); Q8_0 it does not take */
    .acts_gemm_from = {[SLOT_Q6_K] = 96, [SLOT_Q4_0_PACKED] = 256, [SLOT_Q4_K_PACKED] = 192},
    .gemm = &gemm_avx2,
};

#endif
