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

/* The same C compiled for AVX2 when the CPU has it (the baseline build is SSE2): the same IEEE
 * operations (no FMA contraction: -std=c11 / separate statements), so bit-identical output. */
#if defined(POCKETLM_X86)
__attribute__((target("avx2"))) static void act32_avx2(const float *x, int K, q8_act *a) { act32_body(x, K, a); }
__attribute__((target("avx2"))) static void act256_avx2(const float *x, int K, q8_act *a) { act256_body(x, K, a); }
static int has_avx2(void) {
    static int cached = -1;
    if (cached < 0) cached = path_available("avx2"); /* cpuid + OS register-state check */
    return cached;
}
#endif

void quantize_act_32(const float *x, int K, q8_act *a) {
#if defined(POCKETLM_X86)
    if (has_avx2()) {
        act32_avx2(x, K, a);
        return;
    }
#endif
    act32_body(x, K, a);
}

void quantize_act_256(const float *x, int K, q8_act *a) {
#if defined(POCKETLM_X86)
    if (has_avx2()) {
        act256_avx2(x, K, a);
        return;
    }
#endif
    act256_body(x, K, a);
}
