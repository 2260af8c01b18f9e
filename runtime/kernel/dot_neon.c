/* ARM64 NEON dot products: plain ARMv8.0 (every ARM64 phone) and ARMv8.2 dotprod (`sdot`,
 * Cortex-A55/A76 and later), selected at run time from getauxval/sysctl (dispatch.c). The dotprod
 * variant is compiled with a target attribute, so the default build targets baseline ARMv8.0.
 * Same integer sums and per-block float formula as dot_scalar.c. */
#include "kernel.h"

#if defined(POCKETLM_ARM64)
#include <arm_neon.h>


static inline float fp16_load(const uint8_t *p) {
    return fp16_to_fp32(read_u16(p)); /* portable; a hardware fcvt needs __fp16 support */
}

/* plain NEON: 16 s8 x s8 products via widening multiply-accumulate into int16 (|p| <= 2*128*127
 * fits), then pairwise-accumulate into int32 */
static inline int32x4_t dot16_widen(int32x4_t acc, int8x16_t a, int8x16_t b) {
    int16x8_t p = vmull_s8(vget_low_s8(a), vget_low_s8(b));
    p = vmlal_high_s8(p, a, b);
    return vpadalq_s16(acc, p);
}

/* plain NEON with sdot's lane split: lane k += a[4k..4k+3] . b[4k..4k+3] (int16 pairs, widened
 * before the second addition: a pair reaches 2 * 128 * 128) */
static inline int32x4_t dotl_widen(int32x4_t acc, int8x16_t a, int8x16_t b) {
    const int32x4_t lo = vpaddlq_s16(vmull_s8(vget_low_s8(a), vget_low_s8(b)));
    const int32x4_t hi = vpaddlq_s16(vmull_high_s8(a, b));
    return vaddq_s32(acc, vpaddq_s32(lo, hi));
}

#define NEON_ACTS 4 /* activations per block of the multi-activation kernels (dotacts_fn) */
#define NEON_TARGET
#define NEON_DOT16 dot16_widen
#define NEON_DOTL dotl_widen
#define NEON_SUFFIX plain
#include "dot_neon_body.h"
#undef NEON_TARGET
#undef NEON_DOT16
#undef NEON_DOTL
#undef NEON_SUFFIX
#undef NEON_INLINE

#if defined(__clang__)
#define NEON_TARGET __attribute__((target("dotprod")))
#else
#define NEON_TARGET __attribute__((target("arch=armv8.2-a+dotprod")))
#endif
#if defined(__ARM_FEATURE_DOTPROD) || !defined(__clang__) || __clang_major__ >= 16
#define NEON_DOT16 vdotq_s32
#else
/* older clang declares vdotq_s32 only under -march=...+dotprod: emit sdot directly */
NEON_TARGET static inline int32x4_t sdot_asm(int32x4_t acc, int8x16_t a, int8x16_t b) {
    __asm__("sdot %0.4s, %1.16b, %2.16b" : "+w"(acc) : "w"(a), "w"(b));
    return acc;
}
#define NEON_DOT16 sdot_asm
#endif
#define NEON_DOTL NEON_DOT16
#define NEON_SUFFIX dotprod
#include "dot_neon_body.h"

/* ---- i8mm (ARMv8.6 `smmla`, e.g. Cortex-A510/A710/X2 and later): 2 rows x 2 activations ------ */

#if defined(__clang__)
#define I8MM_TARGET __attribute__((target("i8mm")))
#else
#define I8MM_TARGET __attribute__((target("arch=armv8.2-a+i8mm")))
#endif

/* acc[2i + j] += sum_k a[8i + k] * b[8j + k]: rows of a = 8 values of two weight rows, rows of b =
 * the same 8 positions of two activations. */
I8MM_TARGET static inline int32x4_t mmla(int32x4_t acc, int8x16_t a, int8x16_t b) {
#if defined(__ARM_FEATURE_MATMUL_INT8) || !defined(__clang__) || __clang_major__ >= 16
    return vmmlaq_s32(acc, a, b);
#else /* older clang declares vmmlaq_s32 only under -march=...+i8mm */
    __asm__("smmla %0.4s, %1.16b, %2.16b" : "+w"(acc) : "w"(a), "w"(b));
    return acc;
#endif
}

/* 16 values of two sources -> two 2x8 operands (values 0..7 of both, then 8..15 of both) */
I8MM_TARGET static inline int32x4_t mmla16(int32x4_t acc, int8x16_t w0, int8x16_t w1, int8x16_t x0, int8x16_t x1) {
    const int64x2_t w0q = vreinterpretq_s64_s8(w0), w1q = vreinterpretq_s64_s8(w1);
    const int64x2_t x0q = vreinterpretq_s64_s8(x0), x1q = vreinterpretq_s64_s8(x1);
    acc = mmla(acc, vreinterpretq_s8_s64(vzip1q_s64(w0q, w1q)), vreinterpretq_s8_s64(vzip1q_s64(x0q, x1q)));
    return mmla(acc, vreinterpretq_s8_s64(vzip2q_s64(w0q, w1q)), vreinterpretq_s8_s64(vzip2q_s64(x0q, x1q)));
}

/* Per block: scale of each (row, activation) pair, in the order of the mmla result. */
static inline float32x4_t pair_scales(float w0, float w1, float a0, float a1) {
    const float v[4] = {w0 * a0, w0 * a1, w1 * a0, w1 * a1};
    return vld1q_f32(v);
}

I8MM_TARGET static void q4_2x2(const uint8_t *row0, const uint8_t *row1, const q8_act *a0, const q8_act *a1,
                               int nb, float out[4], int bsz, int has_m) {
    const uint8x16_t m4 = vdupq_n_u8(0x0F);
    const int qoff = has_m ? 4 : 2;
    float32x4_t acc = vdupq_n_f32(0.0f), corr = vdupq_n_f32(0.0f);
    for (int b = 0; b < nb; b++) {
        const uint8_t *k0 = row0 + (size_t)b * bsz, *k1 = row1 + (size_t)b * bsz;
        const uint8x16_t q0 = vld1q_u8(k0 + qoff), q1 = vld1q_u8(k1 + qoff);
        const int8_t *x0 = a0->qs + b * QK, *x1 = a1->qs + b * QK;
        int32x4_t s = mmla16(vdupq_n_s32(0), vreinterpretq_s8_u8(vandq_u8(q0, m4)), vreinterpretq_s8_u8(vandq_u8(q1, m4)),
                             vld1q_s8(x0), vld1q_s8(x1));
        s = mmla16(s, vreinterpretq_s8_u8(vshrq_n_u8(q0, 4)), vreinterpretq_s8_u8(vshrq_n_u8(q1, 4)), vld1q_s8(x0 + 16),
                   vld1q_s8(x1 + 16));
        const float d0 = fp16_load(k0), d1 = fp16_load(k1);
        acc = vfmaq_f32(acc, vcvtq_f32_s32(s), pair_scales(d0, d1, a0->d[b], a1->d[b]));
        const float c0 = has_m ? fp16_load(k0 + 2) : d0, c1 = has_m ? fp16_load(k1 + 2) : d1;
        corr = vaddq_f32(corr, pair_scales(c0, c1, a0->s[b], a1->s[b]));
    }
    vst1q_f32(out, has_m ? vaddq_f32(acc, corr) : vmlsq_n_f32(acc, corr, 8.0f));
}

I8MM_TARGET static void q4_0_2x2(const uint8_t *row0, const uint8_t *row1, const q8_act *a0, const q8_act *a1,
                                 int nb, float out[4]) {
    q4_2x2(row0, row1, a0, a1, nb, out, 18, 0);
}
I8MM_TARGET static void q4_1_2x2(const uint8_t *row0, const uint8_t *row1, const q8_act *a0, const q8_act *a1,
                                 int nb, float out[4]) {
    q4_2x2(row0, row1, a0, a1, nb, out, 20, 1);
}

I8MM_TARGET static void q8_0_2x2(const uint8_t *row0, const uint8_t *row1, const q8_act *a0, const q8_act *a1,
                                 int nb, float out[4]) {
    float32x4_t acc = vdupq_n_f32(0.0f);
    for (int b = 0; b < nb; b++) {
        const uint8_t *k0 = row0 + (size_t)b * 34, *k1 = row1 + (size_t)b * 34;
        const int8_t *w0 = (const int8_t *)k0 + 2, *w1 = (const int8_t *)k1 + 2;
        const int8_t *x0 = a0->qs + b * QK, *x1 = a1->qs + b * QK;
        int32x4_t s = mmla16(vdupq_n_s32(0), vld1q_s8(w0), vld1q_s8(w1), vld1q_s8(x0), vld1q_s8(x1));
        s = mmla16(s, vld1q_s8(w0 + 16), vld1q_s8(w1 + 16), vld1q_s8(x0 + 16), vld1q_s8(x1 + 16));
        acc = vfmaq_f32(acc, vcvtq_f32_s32(s), pair_scales(fp16_load(k0), fp16_load(k1), a0->d[b], a1->d[b]));
    }
    vst1q_f32(out, acc);
}

const kernel_path path_neon = {
    .name = "neon",
    .dot = {dot_q4_0_plain, dot_q4_1_plain, dot_q8_0_plain, dot_q4_k_plain, dot_q6_k_plain, dot_q4_0_packed_plain,
            dot_q8_0_packed_plain, dot_q4_k_packed_plain},
    .fallback = "scalar",
    .dotacts = {[SLOT_Q6_K] = dotacts_q6_k_plain, [SLOT_Q4_0_PACKED] = dotacts_q4_0_packed_plain,
                [SLOT_Q8_0_PACKED] = dotacts_q8_0_packed_plain, [SLOT_Q4_K_PACKED] = dotacts_q4_k_packed_plain},
};
const kernel_path path_neon_dotprod = {
    .name = "neon_dotprod",
    .dot = {dot_q4_0_dotprod, dot_q4_1_dotprod, dot_q8_0_dotprod, dot_q4_k_dotprod, dot_q6_k_dotprod,
            dot_q4_0_packed_dotprod, dot_q8_0_packed_dotprod, dot_q4_k_packed_dotprod},
    .fallback = "neon",
    .dotacts = {[SLOT_Q6_K] = dotacts_q6_k_dotprod, [SLOT_Q4_0_PACKED] = dotacts_q4_0_packed_dotprod,
                [SLOT_Q8_0_PACKED] = dotacts_q8_0_packed_dotprod, [SLOT_Q4_K_PACKED] = dotacts_q4_k_packed_dotprod},
    .gemm = &gemm_neon_dotprod,
};
/* single-row dots and multi-activation kernels come from neon_dotprod; i8mm adds the 2x2 kernels of
 * the batched product (raw Q4_0, Q4_1, Q8_0) */
const kernel_path path_neon_i8mm = {
    .name = "neon_i8mm",
    .dot = {NULL},
    .fallback = "neon_dotprod",
    .dot2x2 = {q4_0_2x2, q4_1_2x2, q8_0_2x2, NULL, NULL, NULL},
    .gemm = &gemm_neon_dotprod, /* from GEMM_MIN_M activations on; the 2x2 kernels below that */
};
#endif
