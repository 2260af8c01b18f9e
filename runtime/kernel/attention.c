/* Single-token decode attention over one layer's KV cache (fp16, fp32 or int8 with per-row fp16
 * scales), in place of numpy's widening of the whole cache every step.
 *
 * For query head h (kv head h / group): s[t] = q[h] . k[kv, t] / sqrt(hd) for t in [lo, hi),
 * p = softmax(s) (max subtracted), out[h] = sum_t p[t] v[kv, t]. Float32 throughout; the cached
 * fp16 rows are converted in registers (F16C on x86, vcvt_f32_f16 on ARM64, fp16_to_fp32 in the
 * portable path). Query heads are split over the thread pool (one chunk per head). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernel.h"

#if defined(POCKETLM_X86)
#include <immintrin.h>
#endif
#if defined(POCKETLM_ARM64)
#include <arm_neon.h>
#endif

/* One row of the cache: dot with q, and out += p * row; hd values each. */
typedef float (*row_dot_fn)(const float *q, const void *row, int hd);
typedef void (*row_axpy_fn)(float *out, float p, const void *row, int hd);

/* ---- portable ---------------------------------------------------------------------------- */

static float dot_f16_scalar(const float *q, const void *row, int hd) {
    const uint16_t *r = row;
    float s = 0.0f;
    for (int i = 0; i < hd; i++) s += q[i] * fp16_to_fp32(r[i]);
    return s;
}

static void axpy_f16_scalar(float *out, float p, const void *row, int hd) {
    const uint16_t *r = row;
    for (int i = 0; i < hd; i++) out[i] += p * fp16_to_fp32(r[i]);
}

static float dot_f32_scalar(const float *q, const void *row, int hd) {
    const float *r = row;
    float s = 0.0f;
    for (int i = 0; i < hd; i++) s += q[i] * r[i];
    return s;
}

static void axpy_f32_scalar(float *out, float p, const void *row, int hd) {
    const float *r = row;
    for (int i = 0; i < hd; i++) out[i] += p * r[i];
}

/* int8 rows: the caller folds the row's scale into the score (dot) or the probability (axpy) */
static float dot_i8_scalar(const float *q, const void *row, int hd) {
    const int8_t *r = row;
    float s = 0.0f;
    for (int i = 0; i < hd; i++) s += q[i] * (float)r[i];
    return s;
}

static void axpy_i8_scalar(float *out, float p, const void *row, int hd) {
    const int8_t *r = row;
    for (int i = 0; i < hd; i++) out[i] += p * (float)r[i];
}

/* ---- x86: AVX2 + F16C + FMA (every non-scalar x86 path requires all three, see dispatch.c) -- */

#if defined(POCKETLM_X86)
#define X86_TARGET __attribute__((target("avx2,f16c,fma")))

X86_TARGET static float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

X86_TARGET static float dot_f16_avx2(const float *q, const void *row, int hd) {
    const uint16_t *r = row;
    __m256 acc = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= hd; i += 8) {
        const __m256 k = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(r + i)));
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), k, acc);
    }
    float s = hsum256(acc);
    for (; i < hd; i++) s += q[i] * fp16_to_fp32(r[i]);
    return s;
}

X86_TARGET static void axpy_f16_avx2(float *out, float p, const void *row, int hd) {
    const uint16_t *r = row;
    const __m256 pv = _mm256_set1_ps(p);
    int i = 0;
    for (; i + 8 <= hd; i += 8) {
        const __m256 v = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(r + i)));
        _mm256_storeu_ps(out + i, _mm256_fmadd_ps(pv, v, _mm256_loadu_ps(out + i)));
    }
    for (; i < hd; i++) out[i] += p * fp16_to_fp32(r[i]);
}

X86_TARGET static float dot_f32_avx2(const float *q, const void *row, int hd) {
    const float *r = row;
    __m256 acc = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= hd; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(r + i), acc);
    float s = hsum256(acc);
    for (; i < hd; i++) s += q[i] * r[i];
    return s;
}

X86_TARGET static float dot_i8_avx2(const float *q, const void *row, int hd) {
    const int8_t *r = row;
    __m256 acc = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= hd; i += 8) {
        const __m256 k = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(r + i))));
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), k, acc);
    }
    float s = hsum256(acc);
    for (; i < hd; i++) s += q[i] * (float)r[i];
    return s;
}

X86_TARGET static void axpy_i8_avx2(float *out, float p, const void *row, int hd) {
    const int8_t *r = row;
    const __m256 pv = _mm256_set1_ps(p);
    int i = 0;
    for (; i + 8 <= hd; i += 8) {
        const __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(r + i))));
        _mm256_storeu_ps(out + i, _mm256_fmadd_ps(pv, v, _mm256_loadu_ps(out + i)));
    }
    for (; i < hd; i++) out[i] += p * (float)r[i];
}

X86_TARGET static void axpy_f32_avx2(float *out, float p, const void *row, int hd) {
    const float *r = row;
    const __m256 pv = _mm256_set1_ps(p);
    int i = 0;
    for (; i + 8 <= hd; i += 8)
        _mm256_storeu_ps(out + i, _mm256_fmadd_ps(pv, _mm256_loadu_ps(r + i), _mm256_loadu_ps(out + i)));
    for (; i < hd; i++) out[i] += p * r[i];
}
#endif

/* ---- ARM64: NEON (fp16 <-> fp32 conversion is part of base AArch64) ----------------------- */

#if defined(POCKETLM_ARM64)
static float dot_f16_neon(const float *q, const void *row, int hd) {
    const uint16_t *r = row;
    float32x4_t acc = vdupq_n_f32(0.0f);
    int i = 0;
    for (; i + 4 <= hd; i += 4) {
        const float32x4_t k = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(r + i)));
        acc = vfmaq_f32(acc, vld1q_f32(q + i), k);
    }
    float s = vaddvq_f32(acc);
    for (; i < hd; i++) s += q[i] * fp16_to_fp32(r[i]);
    return s;
}

static void axpy_f16_neon(float *out, float p, const void *row, int hd) {
    const uint16_t *r = row;
    int i = 0;
    for (; i + 4 <= hd; i += 4) {
        const float32x4_t v = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(r + i)));
        vst1q_f32(out + i, vfmaq_n_f32(vld1q_f32(out + i), v, p));
    }
    for (; i < hd; i++) out[i] += p * fp16_to_fp32(r[i]);
}

static float dot_f32_neon(const float *q, const void *row, int hd) {
    const float *r = row;
    float32x4_t acc = vdupq_n_f32(0.0f);
    int i = 0;
    for (; i + 4 <= hd; i += 4) acc = vfmaq_f32(acc, vld1q_f32(q + i), vld1q_f32(r + i));
    float s = vaddvq_f32(acc);
    for (; i < hd; i++) s += q[i] * r[i];
    return s;
}

static inline float32x4_t i8x4_to_f32(const int8_t *r) { /* 4 int8 -> float */
    int32_t w;
    memcpy(&w, r, 4);
    const int16x4_t h = vget_low_s16(vmovl_s8(vreinterpret_s8_s32(vdup_n_s32(w))));
    return vcvtq_f32_s32(vmovl_s16(h));
}

static float dot_i8_neon(const float *q, const void *row, int hd) {
    const int8_t *r = row;
    float32x4_t acc = vdupq_n_f32(0.0f);
    int i = 0;
    for (; i + 4 <= hd; i += 4) acc = vfmaq_f32(acc, vld1q_f32(q + i), i8x4_to_f32(r + i));
    float s = vaddvq_f32(acc);
    for (; i < hd; i++) s += q[i] * (float)r[i];
    return s;
}

static void axpy_i8_neon(float *out, float p, const void *row, int hd) {
    const int8_t *r = row;
    int i = 0;
    for (; i + 4 <= hd; i += 4) vst1q_f32(out + i, vfmaq_n_f32(vld1q_f32(out + i), i8x4_to_f32(r + i), p));
    for (; i < hd; i++) out[i] += p * (float)r[i];
}

static void axpy_f32_neon(float *out, float p, const void *row, int hd) {
    const float *r = row;
    int i = 0;
    for (; i + 4 <= hd; i += 4) vst1q_f32(out + i, vfmaq_n_f32(vld1q_f32(out + i), vld1q_f32(r + i), p));
    for (; i < hd; i++) out[i] += p * r[i];
}
#endif

/* ---- driver ------------------------------------------------------------------------------ */

typedef struct {
    const attention_args *a;
    row_dot_fn dot;
    row_axpy_fn axpy;
    size_t elem;   /* bytes per cached value: 1, 2 or 4 */
    float *scores; /* [H, hi - lo] scratch, one row per query head */
} attn_job;

static void attend_head(void *ctx, int h, int n_chunks) {
    (void)n_chunks;
    const attn_job *j = ctx;
    const attention_args *a = j->a;
    const int S = a->hi - a->lo, hd = a->hd, kv = h / (a->H / a->KV);
    const float *q = a->q + (size_t)h * hd;
    /* row t of head kv: [kv, t, :] in the [KV, n_ctx, hd] cache; its int8 scale at [kv, t] */
    const size_t first = (size_t)kv * a->n_ctx + a->lo, row_bytes = (size_t)hd * j->elem;
    const uint8_t *k = (const uint8_t *)a->k + first * row_bytes, *v = (const uint8_t *)a->v + first * row_bytes;
    const uint16_t *ks = a->kind == KV_I8 ? a->k_scale + first : NULL, *vs = a->kind == KV_I8 ? a->v_scale + first : NULL;
    float *s = j->scores + (size_t)h * S, *out = a->out + (size_t)h * hd;
    const float scale = 1.0f / sqrtf((float)hd);

    float mx = -INFINITY;
    for (int t = 0; t < S; t++) {
        s[t] = j->dot(q, k + t * row_bytes, hd) * (ks ? fp16_to_fp32(ks[t]) * scale : scale);
        if (s[t] > mx) mx = s[t];
    }
    float sum = 0.0f;
    for (int t = 0; t < S; t++) sum += (s[t] = expf(s[t] - mx));
    const float inv = 1.0f / sum; /* >= 1 term equals exp(0) = 1, so sum >= 1 */
    for (int i = 0; i < hd; i++) out[i] = 0.0f;
    for (int t = 0; t < S; t++)
        j->axpy(out, s[t] * inv * (vs ? fp16_to_fp32(vs[t]) : 1.0f), v + t * row_bytes, hd);
}

int run_attention(const attention_args *a, int simd) {
    static const row_dot_fn DOT[3] = {dot_f32_scalar, dot_f16_scalar, dot_i8_scalar};
    static const row_axpy_fn AXPY[3] = {axpy_f32_scalar, axpy_f16_scalar, axpy_i8_scalar};
    static const size_t ELEM[3] = {4, 2, 1};
    attn_job j = {a, DOT[a->kind], AXPY[a->kind], ELEM[a->kind], NULL};
    if (simd) {
#if defined(POCKETLM_X86)
        static const row_dot_fn DOT_X86[3] = {dot_f32_avx2, dot_f16_avx2, dot_i8_avx2};
        static const row_axpy_fn AXPY_X86[3] = {axpy_f32_avx2, axpy_f16_avx2, axpy_i8_avx2};
        j.dot = DOT_X86[a->kind];
        j.axpy = AXPY_X86[a->kind];
#elif defined(POCKETLM_ARM64)
        static const row_dot_fn DOT_ARM[3] = {dot_f32_neon, dot_f16_neon, dot_i8_neon};
        static const row_axpy_fn AXPY_ARM[3] = {axpy_f32_neon, axpy_f16_neon, axpy_i8_neon};
        j.dot = DOT_ARM[a->kind];
        j.axpy = AXPY_ARM[a->kind];
#endif
    }
    j.scores = malloc(sizeof(float) * (size_t)a->H * (size_t)(a->hi - a->lo));
    if (!j.scores) return -1;
    /* small jobs stay on the caller: waking the pool costs more than a few hundred dot products */
    const size_t work = (size_t)a->H * (size_t)(a->hi - a->lo) * (size_t)a->hd;
    if (work < 65536) {
        for (int h = 0; h < a->H; h++) attend_head(&j, h, a->H);
    } else {
        pool_run(attend_head, &j, a->H);
    }
    free(j.scores);
    return 0;
}
