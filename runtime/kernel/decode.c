/* One decode step (one token) through every layer in C: the C forward of the model description
 * (pocketlm/config.py; pocketlm/reference.py is its numpy twin), so that the ~12 small operations
 * per layer neither cost Python time nor leave the memory bus idle between the matvecs, and the
 * thread pool never falls asleep in a step. KV cache fp16, fp32 or int8.
 *
 * Per layer (h [D] is the residual stream, updated in place; "+ b" where the model has biases):
 *   x = norm(h);  qkv = W_qkv x + b;  rope(q), rope(k) (NEOX halves);  cache[pos] = k, v
 *   h += W_o attention_i(q, cache) + b      (dense, sliding window, or layer i's block-sparse pattern)
 *   x = norm(h);  [g | u] = W_gate_up x + b;  h += W_down act(g, u) + b     (act: SwiGLU or GeGELU)
 */
#include <math.h>

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

static void store_kv(const decode_plan *p, int layer, int pos, const float *k, const float *v) {
    const size_t per_head = (size_t)p->n_ctx * p->hd, per_layer = (size_t)p->KV * per_head;
    for (int g = 0; g < p->KV; g++) {
        const size_t at = (size_t)layer * per_layer + g * per_head + (size_t)pos * p->hd;
        const float *ks = k + (size_t)g * p->hd, *vs = v + (size_t)g * p->hd;
        if (p->kv_kind == KV_F16) {
            uint16_t *kd = (uint16_t *)p->k_cache + at, *vd = (uint16_t *)p->v_cache + at;
            for (int i = 0; i < p->hd; i++) {
                kd[i] = fp32_to_fp16(ks[i]);
                vd[i] = fp32_to_fp16(vs[i]);
            }
        } else if (p->kv_kind == KV_I8) {
            const size_t srow = ((size_t)layer * p->KV + g) * p->n_ctx + pos;
            quantize_row_i8(ks, p->hd, (int8_t *)p->k_cache + at, p->k_scale + srow);
            quantize_row_i8(vs, p->hd, (int8_t *)p->v_cache + at, p->v_scale + srow);
        } else {
            memcpy((float *)p->k_cache + at, ks, sizeof(float) * p->hd);
            memcpy((float *)p->v_cache + at, vs, sizeof(float) * p->hd);
        }
    }
}

static int matvec(const dot_fn *table, const dec_linear *l, const float *x, float *y) {
    if (run_matvec(table, l->t, l->w, l->rows, l->K, x, y)) return -1;
    if (l->bias)
        for (int j = 0; j < l->rows; j++) y[j] += l->bias[j];
    return 0;
}

int run_decode_step(const dot_fn *table, int simd, const decode_plan *p, float *h, const float *cos,
                    const float *sin, int pos) {
    const int D = p->D, H = p->H, KV = p->KV, hd = p->hd, F = p->F;
    float *x = p->scratch, *qkv = x + D, *attn = qkv + (size_t)(H + 2 * KV) * hd;
    float *proj = attn + (size_t)H * hd, *gu = proj + D, *act = gu + 2 * (size_t)F;
    static const size_t ELEM[3] = {4, 2, 1};
    const size_t layer_cache = (size_t)KV * p->n_ctx * hd * ELEM[p->kv_kind], layer_scales = (size_t)KV * p->n_ctx;
    for (int i = 0; i < p->n_layers; i++) {
        const dec_layer *L = &p->layers[i];
        norm_row(p->norm, h, L->attn_norm, L->attn_norm_b, D, p->eps, x);
        if (matvec(table, &L->qkv, x, qkv)) return -1;
        float *q = qkv, *k = qkv + (size_t)H * hd, *v = k + (size_t)KV * hd;
        rope_row(q, H, hd, p->rot, cos, sin);
        rope_row(k, KV, hd, p->rot, cos, sin);
        store_kv(p, i, pos, k, v);
        const int i8 = p->kv_kind == KV_I8;
        const attention_args a = {.q = q, .q_stride = H * hd,
                                  .k = (const char *)p->k_cache + i * layer_cache,
                                  .v = (const char *)p->v_cache + i * layer_cache,
                                  .k_scale = i8 ? p->k_scale + i * layer_scales : NULL,
                                  .v_scale = i8 ? p->v_scale + i * layer_scales : NULL,
                                  .out = attn, .H = H, .KV = KV, .hd = hd, .n_ctx = p->n_ctx,
                                  .kind = p->kv_kind, .T = 1, .pos = pos, .window = p->window,
                                  .scale = p->attn_scale, .sparse = L->sparse.block ? &L->sparse : NULL};
        if (run_attention(&a, simd)) return -1;
        if (matvec(table, &L->o, attn, proj)) return -1;
        for (int j = 0; j < D; j++) h[j] += proj[j];
        norm_row(p->norm, h, L->ffn_norm, L->ffn_norm_b, D, p->eps, x);
        if (matvec(table, &L->gate_up, x, gu)) return -1;
        gated_act_row(p->act, gu, F, p->act_limit, act);
        if (matvec(table, &L->down, act, proj)) return -1;
        for (int j = 0; j < D; j++) h[j] += proj[j];
    }
    return 0;
}

size_t decode_scratch_floats(const decode_plan *p) {
    return (size_t)p->D * 2 + (size_t)(p->H + 2 * p->KV) * p->hd + (size_t)p->H * p->hd + (size_t)p->F * 3;
}
