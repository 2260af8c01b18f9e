/* Single-token decode attention over one layer's KV cache (fp16 or fp32), in place of numpy's
 * scalar fp16 -> fp32 widening of the whole cache every step.
 *
 * For query head h (kv head h / group): s[t] = q[h] . k[kv, t] / sqrt(hd) for t in [lo, hi),
 * p = softmax(s) (max subtracted), out[h] = sum_t p[t] v[kv, t]. Float32 throughout; the cached
 * fp16 rows are converted in registers (F16C on x86, vcvt_f32_f16 on ARM64, fp16_to_fp32 in the
 * portable path). Query heads are split over the thread pool (one chunk per head). */
#include <math.h>
#include <stdlib.h>

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
    size_t elem;   /* bytes per cached value: 2 or 4 */
    float *scores; /* [H, hi - lo] scratch, one row per query head */
} attn_job;

static void attend_head(void *ctx, int h, int n_chunks) {
    (void)n_chunks;
    const attn_job *j = ctx;
    const attention_args *a = j->a;
    const int S = a->hi - a->lo, hd = a->hd, kv = h / (a->H / a->KV);
    const float *q = a->q + (size_t)h * hd;
    /* row t of head kv: [kv, t, :] in the [KV, n_ctx, hd] cache */
    const size_t head_off = ((size_t)kv * a->n_ctx + a->lo) * hd * j->elem, row_bytes = (size_t)hd * j->elem;
    const uint8_t *k = (const uint8_t *)a->k + head_off, *v = (const uint8_t *)a->v + head_off;
    float *s = j->scores + (size_t)h * S, *out = a->out + (size_t)h * hd;
    const float scale = 1.0f / sqrtf((float)hd);

    float mx = -INFINITY;
    for (int t = 0; t < S; t++) {
        s[t] = j->dot(q, k + t * row_bytes, hd) * scale;
        if (s[t] > mx) mx = s[t];
    }
    float sum = 0.0f;
    for (int t = 0; t < S; t++) sum += (s[t] = expf(s[t] - mx));
    const float inv = 1.0f / sum; /* >= 1 term equals exp(0) = 1, so sum >= 1 */
    for (int i = 0; i < hd; i++) out[i] = 0.0f;
    for (int t = 0; t < S; t++) j->axpy(out, s[t] * inv, v + t * row_bytes, hd);
}

int run_attention(const attention_args *a, int simd) {
    attn_job j = {a, NULL, NULL, a->f16 ? 2 : 4, NULL};
    j.dot = a->f16 ? dot_f16_scalar : dot_f32_scalar;
    j.axpy = a->f16 ? axpy_f16_scalar : axpy_f32_scalar;
    if (simd) {
#if defined(POCKETLM_X86)
        j.dot = a->f16 ? dot_f16_avx2 : dot_f32_avx2;
        j.axpy = a->f16 ? axpy_f16_avx2 : axpy_f32_avx2;
#elif defined(POCKETLM_ARM64)
        j.dot = a->f16 ? dot_f16_neon : dot_f32_neon;
        j.axpy = a->f16 ? axpy_f16_neon : axpy_f32_neon;
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
