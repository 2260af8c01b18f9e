/* Element-wise steps of a prompt chunk (T rows at once) on the thread pool: RMSNorm, NEOX RoPE in
 * place, SwiGLU. The same arithmetic as the decode step's (decode.c) and the numpy reference. */
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

static void rms_task(void *ctx, int chunk, int n_chunks) {
    const rows_job *j = ctx;
    int t0, t1;
    rows_of(chunk, n_chunks, j->T, &t0, &t1);
    for (int t = t0; t < t1; t++) {
        const float *h = j->in + (size_t)t * j->D;
        float *o = j->out + (size_t)t * j->D;
        double ss = 0.0;
        for (int i = 0; i < j->D; i++) ss += (double)h[i] * h[i];
        const float scale = (float)(1.0 / sqrt(ss / j->D + j->eps));
        for (int i = 0; i < j->D; i++) o[i] = h[i] * j->w[i] * scale;
    }
}

static void rope_task(void *ctx, int chunk, int n_chunks) {
    const rows_job *j = ctx;
    const int half = j->hd / 2;
    int t0, t1;
    rows_of(chunk, n_chunks, j->T, &t0, &t1);
    for (int t = t0; t < t1; t++) {
        const float *c = j->cos + (size_t)t * half, *s = j->sin + (size_t)t * half;
        float *x = j->out + (size_t)t * j->stride;
        for (int h = 0; h < j->n_heads; h++, x += j->hd)
            for (int i = 0; i < half; i++) {
                const float x1 = x[i], x2 = x[half + i];
                x[i] = x1 * c[i] - x2 * s[i];
                x[half + i] = x2 * c[i] + x1 * s[i];
            }
    }
}

static void swiglu_task(void *ctx, int chunk, int n_chunks) {
    const rows_job *j = ctx;
    int t0, t1;
    rows_of(chunk, n_chunks, j->T, &t0, &t1);
    for (int t = t0; t < t1; t++) {
        const float *g = j->in + (size_t)t * 2 * j->D, *u = g + j->D;
        float *o = j->out + (size_t)t * j->D;
        for (int i = 0; i < j->D; i++) o[i] = g[i] / (1.0f + exp_approx(-g[i])) * u[i];
    }
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
