/* Element-wise steps, one row (the decode step, decode.c) or T rows of a prompt chunk on the thread
 * pool: RMSNorm, NEOX RoPE in place, SwiGLU. */
#include <math.h>

#include "kernel.h"

typedef struct {
    const float *in, *w, *cos, *sin;
    float *out;
    int T, D, stride, n_heads, hd;
    float eps;
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

void rope_row(float *x, int n_heads, int hd, const float *cos, const float *sin) {
    const int half = hd / 2;
    for (int h = 0; h < n_heads; h++, x += hd)
        for (int i = 0; i < half; i++) {
            const float x1 = x[i], x2 = x[half + i];
            x[i] = x1 * cos[i] - x2 * sin[i];
            x[half + i] = x2 * cos[i] + x1 * sin[i];
        }
}

void swiglu_row(const float *gu, int F, float *out) {
    for (int i = 0; i < F; i++) out[i] = gu[i] / (1.0f + exp_approx(-gu[i])) * gu[F + i];
}

static void rms_task(void *ctx, int chunk, int n_chunks) {
    const rows_job *j = ctx;
    int t0, t1;
    rows_of(chunk, n_chunks, j->T, &t0, &t1);
    for (int t = t0; t < t1; t++) rms_norm_row(j->in + (size_t)t * j->D, j->w, j->D, j->eps, j->out + (size_t)t * j->D);
}

static void rope_task(void *ctx, int chunk, int n_chunks) {
    const rows_job *j = ctx;
    const int half = j->hd / 2;
    int t0, t1;
    rows_of(chunk, n_chunks, j->T, &t0, &t1);
    for (int t = t0; t < t1; t++)
        rope_row(j->out + (size_t)t * j->stride, j->n_heads, j->hd, j->cos + (size_t)t * half, j->sin + (size_t)t * half);
}

static void swiglu_task(void *ctx, int chunk, int n_chunks) {
    const rows_job *j = ctx;
    int t0, t1;
    rows_of(chunk, n_chunks, j->T, &t0, &t1);
    for (int t = t0; t < t1; t++) swiglu_row(j->in + (size_t)t * 2 * j->D, j->D, j->out + (size_t)t * j->D);
}

static int chunks(int T, int D) { return (size_t)T * D < 16384 ? 1 : pool_chunks(T, 1); }

void run_rms_norm_rows(const float *h, const float *w, int T, int D, float eps, float *out) {
    rows_job j = {h, w, NULL, NULL, out, T, D, 0, 0, 0, eps};
    pool_run(rms_task, &j, chunks(T, D));
}

void run_rope_rows(float *x, int T, int stride, int n_heads, int hd, const float *cos, const float *sin) {
    rows_job j = {NULL, NULL, cos, sin, x, T, 0, stride, n_heads, hd, 0.0f};
    pool_run(rope_task, &j, chunks(T, n_heads * hd));
}

void run_swiglu_rows(const float *gu, int T, int F, float *out) {
    rows_job j = {gu, NULL, NULL, NULL, out, T, F, 0, 0, 0, 0.0f};
    pool_run(swiglu_task, &j, chunks(T, F));
}
