/* Element-wise steps, one row (the decode step, decode.c) or T rows of a prompt chunk on the thread
 * pool: the model's norm (RMSNorm, or LayerNorm with bias), NEOX RoPE in place, the gated
 * activation (SwiGLU, or Phi-3-small's GeGELU). pocketlm/layers.py is the numpy reference of each. */
#include <math.h>

/* clang contracts a * b + c into an FMA where the target has one (AVX-512 does), gcc's -std=c11
 * does not: off before kernel.h, whose exp_approx is inlined here, so the SIMD builds below stay bit
 * for bit the baseline's */
#if defined(__clang__)
#pragma clang fp contract(off)
#endif

#include "kernel.h"

typedef struct {
    const float *in, *w, *b, *cos, *sin;
    float *out;
    int T, D, stride, n_heads, hd, kind;
    float eps; /* norm: epsilon; activation: GeGELU's limit */
} rows_job;

static void rows_of(int chunk, int n_chunks, int T, int *t0, int *t1) {
    *t0 = (int)((int64_t)T * chunk / n_chunks);
    *t1 = (int)((int64_t)T * (chunk + 1) / n_chunks);
}

void rms_norm_row(const float *h, const float *w, int D, float eps, float *out) {
    double ss = 0.0;
    for (int i = 0; i < D; i++) ss += (double)h[i] * h[i];
    const float scale = (float)(1.0 / sqrt(ss / D + eps));
    for (int i = 0; i < D; i++) out[i] = h[i] * w[i] * scale;
}

/* (h - mean) / sqrt(biased variance + eps) * w + b, the sums in double (D is up to 5120). */
void layer_norm_row(const float *h, const float *w, const float *b, int D, float eps, float *out) {
    double sum = 0.0, ss = 0.0;
    for (int i = 0; i < D; i++) sum += h[i];
    const double mean = sum / D;
    for (int i = 0; i < D; i++) ss += (h[i] - mean) * (h[i] - mean);
    const float scale = (float)(1.0 / sqrt(ss / D + eps)), m = (float)mean;
    for (int i = 0; i < D; i++) out[i] = (h[i] - m) * scale * w[i] + b[i];
}

void norm_row(int kind, const float *h, const float *w, const float *b, int D, float eps, float *out) {
    if (kind == NORM_LAYER) layer_norm_row(h, w, b, D, eps, out);
    else rms_norm_row(h, w, D, eps, out);
}

/* NEOX rotation of the first `rot` values of each of n_heads heads of hd values: (x[i], x[rot/2 + i])
 * rotate by cos[i], sin[i] (i < rot/2); the other hd - rot values pass (Phi-4-mini's partial RoPE). */
void rope_row(float *x, int n_heads, int hd, int rot, const float *cos, const float *sin) {
    const int half = rot / 2;
    for (int h = 0; h < n_heads; h++, x += hd)
        for (int i = 0; i < half; i++) {
            const float x1 = x[i], x2 = x[half + i];
            x[i] = x1 * cos[i] - x2 * sin[i];
            x[half + i] = x2 * cos[i] + x1 * sin[i];
        }
}

/* The up half through its own pointer: gu[F + i] with an int index does not vectorize under the
 * build's -fwrapv (the sum may wrap, so its address is not an affine step). */
static inline __attribute__((always_inline)) void swiglu_body(const float *gu, int F, float *out) {
    const float *up = gu + F;
    for (int i = 0; i < F; i++) out[i] = gu[i] / (1.0f + exp_approx(-gu[i])) * up[i];
}

/* GeGELU on [gelu input g | linear input l]: min(g, L) * sigmoid(1.702 min(g, L)) * (clip(l, -L, L) + 1). */
static inline __attribute__((always_inline)) void gegelu_body(const float *gu, int F, float limit, float *out) {
    const float *lin = gu + F;
    for (int i = 0; i < F; i++) {
        const float g = gu[i] < limit ? gu[i] : limit;
        const float l = lin[i] < -limit ? -limit : lin[i] > limit ? limit : lin[i];
        out[i] = g / (1.0f + exp_approx(-1.702f * g)) * (l + 1.0f);
    }
}

static inline __attribute__((always_inline)) void gated_body(int kind, const float *gu, int F, float limit,
                                                             float *out) {
    if (kind == ACT_GEGELU) gegelu_body(gu, F, limit, out);
    else swiglu_body(gu, F, out);
}

void swiglu_row(const float *gu, int F, float *out) { swiglu_body(gu, F, out); }
void gegelu_row(const float *gu, int F, float limit, float *out) { gegelu_body(gu, F, limit, out); }

#if defined(POCKETLM_X86)
/* The same C built 8-wide (AVX2) and 16-wide (AVX-512) besides the baseline's 4-wide SSE2: the same
 * IEEE operations on each value (nothing contracts into an FMA: gcc's -std=c11, the pragma above
 * for clang), so bit for bit the baseline's. One thread, 8192 values (a phi-3-mini decode step runs
 * 32 of them): 1.8, 0.9 and 0.6 ns per value. */
#define GATED_CLONES(suffix, target_isa)                                                           \
    __attribute__((target(target_isa))) static void gated_act_row_##suffix(int kind, const float *gu, int F, \
                                                                            float limit, float *out) { \
        gated_body(kind, gu, F, limit, out);                                                       \
    }
GATED_CLONES(avx2, "avx2")
GATED_CLONES(avx512, "avx2,avx512f")
#endif

void gated_act_row(int kind, const float *gu, int F, float limit, float *out) {
#if defined(POCKETLM_X86)
    if (cpu_has_avx512()) {
        gated_act_row_avx512(kind, gu, F, limit, out);
        return;
    }
    if (cpu_has_avx2()) {
        gated_act_row_avx2(kind, gu, F, limit, out);
        return;
    }
#endif
    gated_body(kind, gu, F, limit, out);
}

static void norm_task(void *ctx, int chunk, int n_chunks) {
    const rows_job *j = ctx;
    int t0, t1;
    rows_of(chunk, n_chunks, j->T, &t0, &t1);
    for (int t = t0; t < t1; t++)
        norm_row(j->kind, j->in + (size_t)t * j->D, j->w, j->b, j->D, j->eps, j->out + (size_t)t * j->D);
}

static void rope_task(void *ctx, int chunk, int n_chunks) {
    const rows_job *j = ctx;
    const int half = j->D / 2; /* D: the rotary dimension */
    int t0, t1;
    rows_of(chunk, n_chunks, j->T, &t0, &t1);
    for (int t = t0; t < t1; t++)
        rope_row(j->out + (size_t)t * j->stride, j->n_heads, j->hd, j->D, j->cos + (size_t)t * half,
                 j->sin + (size_t)t * half);
}

static void act_task(void *ctx, int chunk, int n_chunks) {
    const rows_job *j = ctx;
    int t0, t1;
    rows_of(chunk, n_chunks, j->T, &t0, &t1);
    for (int t = t0; t < t1; t++)
        gated_act_row(j->kind, j->in + (size_t)t * 2 * j->D, j->D, j->eps, j->out + (size_t)t * j->D);
}

static int chunks(int T, int D) { return (size_t)T * D < 16384 ? 1 : pool_chunks(T, 1); }

void run_norm_rows(int kind, const float *h, const float *w, const float *b, int T, int D, float eps, float *out) {
    rows_job j = {.in = h, .w = w, .b = b, .out = out, .T = T, .D = D, .kind = kind, .eps = eps};
    pool_run(norm_task, &j, chunks(T, D));
}

void run_rope_rows(float *x, int T, int stride, int n_heads, int hd, int rot, const float *cos, const float *sin) {
    rows_job j = {.cos = cos, .sin = sin, .out = x, .T = T, .D = rot, .stride = stride, .n_heads = n_heads, .hd = hd};
    pool_run(rope_task, &j, chunks(T, n_heads * hd));
}

void run_gated_act_rows(int kind, const float *gu, int T, int F, float limit, float *out) {
    rows_job j = {.in = gu, .out = out, .T = T, .D = F, .kind = kind, .eps = limit};
    pool_run(act_task, &j, chunks(T, F));
}
