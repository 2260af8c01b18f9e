/* Quantization of the fp32 activation to int8, once per matmul (shared by every code path, so all
 * paths dot exactly the same integers). */
#include <float.h>
#include <math.h>
#include <string.h>

#include "kernel.h"

size_t act_bytes(int K) {
    /* qs[K] + d[K/32] + s[K/32] + bsums[K/16] + qs16[K] + d32[K/32] + off32[K/32], each array
     * 64-byte aligned */
    size_t n = 0;
    n += 2 * (((size_t)K + 63) & ~(size_t)63);
    n += 4 * (((size_t)(K / QK) * 4 + 63) & ~(size_t)63);
    n += ((size_t)(K / 16) * 2 + 63) & ~(size_t)63;
    return n;
}

void act_bind(q8_act *a, void *mem, int K) {
    uint8_t *p = (uint8_t *)mem;
    a->K = K;
    a->qs = (int8_t *)p;
    p += ((size_t)K + 63) & ~(size_t)63;
    a->d = (float *)p;
    p += ((size_t)(K / QK) * 4 + 63) & ~(size_t)63;
    a->s = (float *)p;
    p += ((size_t)(K / QK) * 4 + 63) & ~(size_t)63;
    a->bsums = (int16_t *)p;
    p += ((size_t)(K / 16) * 2 + 63) & ~(size_t)63;
    a->qs16 = (int8_t *)p;
    p += ((size_t)K + 63) & ~(size_t)63;
    a->d32 = (float *)p;
    p += ((size_t)(K / QK) * 4 + 63) & ~(size_t)63;
    a->off32 = (int32_t *)p;
}

void act_prepare_packed(const gtype_info *t, q8_act *a) {
    const int K = a->K;
    for (int g = 0; g < K / PACK_VALUES; g++) { /* 16 x 8 moves of 4 bytes: a transpose */
        const int8_t *src = a->qs + (size_t)g * PACK_VALUES;
        int8_t *dst = a->qs16 + (size_t)g * PACK_VALUES;
        for (int v = 0; v < 8; v++)
            for (int b = 0; b < 16; b++) memcpy(dst + 64 * v + 4 * b, src + 32 * b + 4 * v, 4);
    }
    if (t->gtype == GT_Q4_0_PACKED || t->gtype == GT_Q8_0_PACKED)
        for (int j = 0; j < K / QK; j++) {
            int sum = 0;
            for (int i = 0; i < QK; i++) sum += a->qs[QK * j + i];
            a->off32[j] = -(t->gtype == GT_Q4_0_PACKED ? 8 : 128) * sum;
        }
    if (t->act_block == QK) {
        memcpy(a->d32, a->d, sizeof(float) * (size_t)(K / QK));
    } else { /* per 256: each 32 values take their super-block's scale; s from the per-16 sums */
        for (int j = 0; j < K / QK; j++) {
            a->d32[j] = a->d[j / 8];
            a->s[j] = a->d32[j] * (float)(a->bsums[2 * j] + a->bsums[2 * j + 1]);
        }
    }
}

/* Quantize n values with one scale d = amax/127; returns d. q = round half away from zero of
 * x/d, written as truncation of v + copysign(0.5, v) so that it vectorizes (roundf is a library
 * call on baseline x86-64). */
static inline __attribute__((always_inline)) float quantize_span(const float *x, int n, int8_t *q) {
    float m[8] = {0}; /* 8 running maxima: an element-wise max the compiler vectorizes (n % 8 == 0) */
    for (int i = 0; i < n; i += 8)
        for (int j = 0; j < 8; j++) {
            const float v = fabsf(x[i + j]);
            m[j] = v > m[j] ? v : m[j];
        }
    float amax = 0.0f;
    for (int j = 0; j < 8; j++) amax = m[j] > amax ? m[j] : amax;
    /* a subnormal d would make 1/d infinite (and the int conversion undefined): such blocks
     * (|x| < 1.5e-36) quantize to zero */
    const float d = amax / 127.0f, id = d >= FLT_MIN ? 1.0f / d : 0.0f;
    for (int i = 0; i < n; i++) {
        const float v = x[i] * id;
        q[i] = (int8_t)(int)(v + copysignf(0.5f, v));
    }
    return d;
}

static inline __attribute__((always_inline)) void act32_body(const float *x, int K, q8_act *a) {
    for (int b = 0; b < K / QK; b++) {
        int8_t *q = a->qs + b * QK;
        a->d[b] = quantize_span(x + b * QK, QK, q);
        int sum = 0;
        for (int i = 0; i < QK; i++) sum += q[i];
        a->s[b] = a->d[b] * (float)sum;
    }
}

static inline __attribute__((always_inline)) void act256_body(const float *x, int K, q8_act *a) {
    for (int b = 0; b < K / QK_K; b++) {
        int8_t *q = a->qs + b * QK_K;
        a->d[b] = quantize_span(x + b * QK_K, QK_K, q);
        for (int j = 0; j < QK_K / 16; j++) {
            int sum = 0;
            for (int i = 0; i < 16; i++) sum += q[16 * j + i];
            a->bsums[b * (QK_K / 16) + j] = (int16_t)sum;
        }
    }
}

#if defined(POCKETLM_X86)
#include <immintrin.h>

/* The same rules in AVX2 intrinsics, bit for bit: the same IEEE operations on each value (x * id,
 * then + copysign(0.5), truncated), the maximum as `v > m ? v : m` (vmaxps returns its second
 * operand unless the first is greater) and exact integer sums. The compiler's vectorization of the
 * C above took ~2.6 us per 3072 values, most of a small batch's matmul time on small matrices. */
#define AVX2_INLINE static inline __attribute__((always_inline, target("avx2")))

AVX2_INLINE __m256 abs_max8(const float *x, int n) { /* lane-wise max of |x| over n % 8 == 0 values */
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 m = _mm256_setzero_ps();
    for (int i = 0; i < n; i += 8) m = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)), m);
    return m;
}

AVX2_INLINE float hmax8(__m256 m) {
    __m128 v = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    v = _mm_max_ps(v, _mm_movehl_ps(v, v));
    v = _mm_max_ss(v, _mm_movehdup_ps(v));
    return _mm_cvtss_f32(v);
}

AVX2_INLINE int hsum8_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(s);
}

/* 32 values x * id rounded half away from zero into q[0..31]; sums[h] = sum of q[16h..16h+15]. */
AVX2_INLINE void round32(const float *x, __m256 id, int8_t *q, int sums[2]) {
    const __m256 sign = _mm256_set1_ps(-0.0f), half = _mm256_set1_ps(0.5f);
    __m256i i[4];
    for (int k = 0; k < 4; k++) {
        const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + 8 * k), id);
        i[k] = _mm256_cvttps_epi32(_mm256_add_ps(v, _mm256_or_ps(_mm256_and_ps(v, sign), half)));
    }
    /* the packs interleave 128-bit lanes: dwords [i0 0-3, i1 0-3, i2 0-3, i3 0-3 | i0 4-7, ...] */
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
    _mm256_storeu_si256((__m256i *)q, _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    sums[0] = hsum8_epi32(_mm256_add_epi32(i[0], i[1]));
    sums[1] = hsum8_epi32(_mm256_add_epi32(i[2], i[3]));
}

AVX2_INLINE float scale_of(float amax, float *id) { /* quantize_span's d and 1/d */
    const float d = amax / 127.0f;
    *id = d >= FLT_MIN ? 1.0f / d : 0.0f;
    return d;
}

__attribute__((target("avx2"))) static void act32_avx2(const float *x, int K, q8_act *a) {
    for (int b = 0; b < K / QK; b++) {
        float id;
        const float d = scale_of(hmax8(abs_max8(x + b * QK, QK)), &id);
        int sums[2];
        round32(x + b * QK, _mm256_set1_ps(id), a->qs + b * QK, sums);
        a->d[b] = d;
        a->s[b] = d * (float)(sums[0] + sums[1]);
    }
}

__attribute__((target("avx2"))) static void act256_avx2(const float *x, int K, q8_act *a) {
    for (int b = 0; b < K / QK_K; b++) {
        float id;
        a->d[b] = scale_of(hmax8(abs_max8(x + b * QK_K, QK_K)), &id);
        for (int j = 0; j < QK_K / 32; j++) {
            int sums[2];
            round32(x + b * QK_K + 32 * j, _mm256_set1_ps(id), a->qs + b * QK_K + 32 * j, sums);
            a->bsums[b * (QK_K / 16) + 2 * j] = (int16_t)sums[0];
            a->bsums[b * (QK_K / 16) + 2 * j + 1] = (int16_t)sums[1];
        }
    }
}

#endif

void quantize_act_32(const float *x, int K, q8_act *a) {
#if defined(POCKETLM_X86)
    if (cpu_has_avx2()) {
        act32_avx2(x, K, a);
        return;
    }
#endif
    act32_body(x, K, a);
}

void quantize_act_256(const float *x, int K, q8_act *a) {
#if defined(POCKETLM_X86)
    if (cpu_has_avx2()) {
        act256_avx2(x, K, a);
        return;
    }
#endif
    act256_body(x, K, a);
}
