/* A decode step (one token) or a few tokens at once (a verify, a short prompt) through every layer
 * in C (run_forward_rows): the C forward of the model description (pocketlm/config.py;
 * pocketlm/reference.py is its numpy twin), so that the ~12 small operations per layer neither cost
 * Python time nor leave the memory bus idle between the matvecs, and the thread pool never falls
 * asleep in a step. KV cache fp16, fp32 or int8.
 *
 * Per layer (h [D] is the residual stream, updated in place; "+ b" where the model has biases):
 *   x = norm(h);  qkv = W_qkv x + b;  rope(q), rope(k) (NEOX halves);  cache[pos] = k, v
 *   h += W_o attention_i(q, cache) + b      (dense, sliding window, or layer i's block-sparse pattern)
 *   x = norm(h);  [g | u] = W_gate_up x + b;  h += W_down act(g, u) + b     (act: SwiGLU or GeGELU)
 */
#include <math.h>
#include <stdlib.h>

#include "kernel.h"

#if defined(POCKETLM_X86)
#include <immintrin.h>
#endif

/* fp32 -> fp16, round to nearest even (numpy's float16 cast), portable. */
static uint16_t fp32_to_fp16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000;
    const uint32_t ax = x & 0x7FFFFFFF;
    if (ax >= 0x7F800000) return (uint16_t)(sign | 0x7C00 | (ax > 0x7F800000 ? 0x200 : 0)); /* inf, nan */
    if (ax >= 0x477FF000) return (uint16_t)(sign | 0x7C00);                                   /* overflow */
    if (ax < 0x38800000) { /* subnormal or zero in fp16: value / 2^-24, rounded to nearest even */
        if (ax < 0x33000000) return (uint16_t)sign; /* < 2^-25: rounds to 0 */
        const uint32_t e = ax >> 23, m = (ax & 0x7FFFFF) | 0x800000;
        const int shift = 126 - (int)e; /* x = m * 2^(e - 150), in units of 2^-24: m >> (126 - e) */
        const uint32_t q = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        return (uint16_t)(sign | (q + (rem > half || (rem == half && (q & 1)))));
    }
    const uint32_t base = ((ax >> 13) - (112u << 10)); /* rebias exponent 127 -> 15 */
    const uint32_t rem = ax & 0x1FFF;
    return (uint16_t)(sign | (base + (rem > 0x1000 || (rem == 0x1000 && (base & 1)))));
}

/* int8 row as KVCache._quantize_into: fp16 scale amax/127, codes rint(x / scale) clipped to 127. */
static void quantize_row_i8(const float *x, int n, int8_t *q, uint16_t *scale) {
    float amax = 0.0f;
    for (int i = 0; i < n; i++) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
    *scale = fp32_to_fp16(amax / 127.0f);
    const float s = fp16_to_fp32(*scale), inv = s > 0.0f ? 1.0f / s : 0.0f;
    for (int i = 0; i < n; i++) {
        const float v = nearbyintf(x[i] * inv); /* round half to even, as numpy's rint */
        q[i] = (int8_t)(v > 127.0f ? 127 : v < -127.0f ? -127 : v);
    }
}

#if defined(POCKETLM_X86)
/* 8 values at a time with F16C (`vcvtps2ph`, round to nearest even: fp32_to_fp16's bits). */
__attribute__((target("avx,f16c"))) static void fp16_row_f16c(const float *x, int n, uint16_t *out) {
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(out + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) out[i] = fp32_to_fp16(x[i]);
}
#endif

static void fp16_row(int simd, const float *x, int n, uint16_t *out) {
#if defined(POCKETLM_X86)
    if (simd) {
        fp16_row_f16c(x, n, out);
        return;
    }
#else
    (void)simd;
#endif
    for (int i = 0; i < n; i++) out[i] = fp32_to_fp16(x[i]);
}

void kv_store_pos(int kind, int simd, void *k_cache, void *v_cache, uint16_t *k_scale, uint16_t *v_scale, int KV,
                  int n_ctx, int hd, int pos, const float *k, const float *v) {
    for (int g = 0; g < KV; g++) {
        const size_t at = ((size_t)g * n_ctx + pos) * hd, srow = (size_t)g * n_ctx + pos;
        const float *ks = k + (size_t)g * hd, *vs = v + (size_t)g * hd;
        if (kind == KV_F16) {
            fp16_row(simd, ks, hd, (uint16_t *)k_cache + at);
            fp16_row(simd, vs, hd, (uint16_t *)v_cache + at);
        } else if (kind == KV_I8) {
            quantize_row_i8(ks, hd, (int8_t *)k_cache + at, k_scale + srow);
            quantize_row_i8(vs, hd, (int8_t *)v_cache + at, v_scale + srow);
        } else {
            memcpy((float *)k_cache + at, ks, sizeof(float) * hd);
            memcpy((float *)v_cache + at, vs, sizeof(float) * hd);
        }
    }
}

/* Y [T, rows] = X W^T (+ b per row): one row by the matvec (the decode step's kernels), more by
 * the batched path without its tiled and 2 x 2 kernels: bit for bit the matvecs of its rows. */
static int linear(const dot_fn *table, const dec_linear *l, const float *X, int T, float *Y) {
    const int rc = T == 1 ? run_matvec(table, l->t, l->w, l->rows, l->K, X, Y)
                          : run_matmul(table, NULL, NULL, l->t, l->w, l->rows, l->K, X, T, Y);
    if (rc) return -1;
    if (l->bias)
        for (int t = 0; t < T; t++)
            for (int j = 0; j < l->rows; j++) Y[(size_t)t * l->rows + j] += l->bias[j];
    return 0;
}

static void add_rows(float *h, const float *y, size_t n) {
    for (size_t j = 0; j < n; j++) h[j] += y[j];
}

int run_forward_rows(const dot_fn *table, int simd, const decode_plan *p, float *h, int T, const float *cos,
                     const float *sin, int pos) {
    const int D = p->D, H = p->H, KV = p->KV, hd = p->hd, F = p->F, W = (H + 2 * KV) * hd;
    /* one row (a decode step) in the plan's scratch, more in their own */
    float *mem = T == 1 ? p->scratch : malloc(sizeof(float) * (size_t)T * decode_scratch_floats(p));
    if (!mem) return -1;
    float *x = mem, *qkv = x + (size_t)T * D, *attn = qkv + (size_t)T * W, *proj = attn + (size_t)T * H * hd;
    float *gu = proj + (size_t)T * D, *act = gu + (size_t)T * 2 * F;
    static const size_t ELEM[3] = {4, 2, 1};
    const size_t layer_cache = (size_t)KV * p->n_ctx * hd * ELEM[p->kv_kind], layer_scales = (size_t)KV * p->n_ctx;
    const int i8 = p->kv_kind == KV_I8;
    int rc = 0;
    for (int i = 0; i < p->n_layers && rc == 0; i++) {
        const dec_layer *L = &p->layers[i];
        char *kc = (char *)p->k_cache + i * layer_cache, *vc = (char *)p->v_cache + i * layer_cache;
        uint16_t *ks = i8 ? p->k_scale + i * layer_scales : NULL, *vs = i8 ? p->v_scale + i * layer_scales : NULL;
        run_norm_rows(p->norm, h, L->attn_norm, L->attn_norm_b, T, D, p->eps, x);
        if ((rc = linear(table, &L->qkv, x, T, qkv))) break;
        run_rope_rows(qkv, T, W, H + KV, hd, p->rot, cos, sin); /* q and k heads */
        for (int t = 0; t < T; t++) {
            const float *row = qkv + (size_t)t * W;
            kv_store_pos(p->kv_kind, simd, kc, vc, ks, vs, KV, p->n_ctx, hd, pos + t, row + (size_t)H * hd,
                         row + (size_t)(H + KV) * hd);
        }
        const attention_args a = {.q = qkv, .q_stride = W, .k = kc, .v = vc, .k_scale = ks, .v_scale = vs,
                                  .out = attn, .H = H, .KV = KV, .hd = hd, .n_ctx = p->n_ctx,
                                  .kind = p->kv_kind, .T = T, .pos = pos, .window = p->window,
                                  .scale = p->attn_scale, .sparse = L->sparse.block ? &L->sparse : NULL};
        if ((rc = run_attention(&a, simd))) break;
        if ((rc = linear(table, &L->o, attn, T, proj))) break;
        add_rows(h, proj, (size_t)T * D);
        run_norm_rows(p->norm, h, L->ffn_norm, L->ffn_norm_b, T, D, p->eps, x);
        if ((rc = linear(table, &L->gate_up, x, T, gu))) break;
        run_gated_act_rows(p->act, gu, T, F, p->act_limit, act);
        if ((rc = linear(table, &L->down, act, T, proj))) break;
        add_rows(h, proj, (size_t)T * D);
    }
    if (T != 1) free(mem);
    return rc;
}

size_t decode_scratch_floats(const decode_plan *p) {
    return (size_t)p->D * 2 + (size_t)(p->H + 2 * p->KV) * p->hd + (size_t)p->H * p->hd + (size_t)p->F * 3;
}
