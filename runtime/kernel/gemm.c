/* The tiled batched driver (see gemm.h): activation panel, thread split over row tiles, and the
 * portable C micro-kernel (the reference the SIMD ones must reproduce). */
#include <stdlib.h>

#include "gemm.h"

gemm_shape gemm_shape_of(const gtype_info *t) {
    gemm_shape s = {t->gtype == GT_Q6_K ? 16 : 32, t->act_block,
                    t->gtype == GT_Q4_1 || t->gtype == GT_Q4_K || t->gtype == GT_Q4_K_PACKED};
    return s;
}

static void *alloc_aligned(size_t n) {
    void *p = NULL;
    return posix_memalign(&p, 64, n ? n : 64) == 0 ? p : NULL;
}

/* ---- activation panel --------------------------------------------------------------------- */

typedef struct {
    const gtype_info *t;
    const float *X;
    int M, K, lanes;
    uint8_t *qs; /* [groups][K / 4][lanes][4] */
    float *d;    /* [groups][K / ab][lanes] */
    float *xs;   /* [groups][K / 32][lanes] */
    int ok;      /* cleared by a task that could not allocate its row buffer */
} act_job;

/* Quantize activation rows of chunk c (the matvec's rule) and scatter them into the panel. */
static void act_task(void *ctx, int chunk, int n_chunks) {
    act_job *j = (act_job *)ctx;
    const int K = j->K, L = j->lanes, ab = j->t->act_block;
    const int groups = (j->M + L - 1) / L, rows = groups * L;
    const int m0 = (int)((int64_t)rows * chunk / n_chunks), m1 = (int)((int64_t)rows * (chunk + 1) / n_chunks);
    void *mem = alloc_aligned(act_bytes(K));
    if (!mem) {
        j->ok = 0;
        return;
    }
    q8_act a;
    act_bind(&a, mem, K);
    for (int m = m0; m < m1; m++) {
        const int g = m / L, l = m % L;
        uint8_t *qs = j->qs + (size_t)g * K * L;
        float *d = j->d + (size_t)g * (K / ab) * L, *xs = j->xs + (size_t)g * (K / 32) * L;
        if (m >= j->M) { /* padding rows: x = 0 (stored +128), zero scale */
            for (int c = 0; c < K / 4; c++) memset(qs + ((size_t)c * L + l) * 4, 0x80, 4);
            for (int b = 0; b < K / ab; b++) d[(size_t)b * L + l] = 0.0f;
            for (int b = 0; b < K / 32; b++) xs[(size_t)b * L + l] = 0.0f;
            continue;
        }
        const float *x = j->X + (size_t)m * K;
        if (ab == QK_K)
            quantize_act_256(x, K, &a);
        else
            quantize_act_32(x, K, &a);
        for (int c = 0; c < K / 4; c++) {
            uint8_t *o = qs + ((size_t)c * L + l) * 4;
            for (int i = 0; i < 4; i++) o[i] = (uint8_t)(a.qs[4 * c + i] ^ 0x80); /* int8 + 128 */
        }
        for (int b = 0; b < K / ab; b++) d[(size_t)b * L + l] = a.d[b];
        for (int b = 0; b < K / 32; b++)
            xs[(size_t)b * L + l] = ab == QK_K ? (float)(a.bsums[2 * b] + a.bsums[2 * b + 1]) : a.s[b];
    }
    free(mem);
}

/* ---- weight tiles --------------------------------------------------------------------------- */

typedef struct {
    const gemm_kernel *gk;
    const gtype_info *t;
    const uint8_t *w;
    size_t row_bytes;
    int rows, K, M;
    const act_job *act;
    float *Y;
    int ok;
} tile_job;

static void tile_task(void *ctx, int chunk, int n_chunks) {
    tile_job *j = (tile_job *)ctx;
    const int K = j->K, L = j->gk->lanes, R = j->gk->rows, tiles = (j->rows + R - 1) / R;
    const gemm_shape s = gemm_shape_of(j->t);
    const int t0 = (int)((int64_t)tiles * chunk / n_chunks), t1 = (int)((int64_t)tiles * (chunk + 1) / n_chunks);
    /* codes, scales and corrections sized for 16-value sub-blocks (the smallest), mins per 32 */
    const size_t nq = (size_t)R * K, nsb = (size_t)R * (K / 16), nmin = (size_t)R * (K / 32);
    const size_t rq = (size_t)K, rsb = (size_t)K / 16, rmin = (size_t)K / 32;
    float *fmem = alloc_aligned(4 * (nsb * 2 + nmin + rsb * 2 + rmin + (size_t)R * L));
    int8_t *qmem = alloc_aligned(nq + rq);
    if (!fmem || !qmem) {
        free(fmem);
        free(qmem);
        j->ok = 0;
        return;
    }
    float *f = fmem;
    wtile w = {K, R, qmem, f, f + nsb, (int32_t *)(f + nsb + nmin), qmem + nq, f + 2 * nsb + nmin,
               f + 2 * nsb + nmin + rsb, (int32_t *)(f + 2 * nsb + nmin + rsb + rmin)};
    float *out = f + 2 * nsb + nmin + 2 * rsb + rmin;
    const int groups = (j->M + L - 1) / L;
    for (int tile = t0; tile < t1; tile++) {
        const int r0 = tile * R, nr = j->rows - r0 < R ? j->rows - r0 : R;
        if (nr < R) { /* rows past the last one: zeros whatever the layout (their outputs are dropped) */
            memset(w.q, 0, nq);
            memset(w.scale, 0, nsb * 4);
            memset(w.minv, 0, nmin * 4);
            memset(w.corr, 0, nsb * 4);
        }
        for (int r = 0; r < nr; r++) j->gk->decode(j->t, j->w + (size_t)(r0 + r) * j->row_bytes, K, r, &w);
        for (int g = 0; g < groups; g++) {
            const agroup a = {j->act->qs + (size_t)g * K * L, j->act->d + (size_t)g * (K / s.ab) * L,
                              j->act->xs + (size_t)g * (K / 32) * L};
            j->gk->tile(&w, &a, s, out);
            const int m0 = g * L, nm = j->M - m0 < L ? j->M - m0 : L;
            for (int r = 0; r < nr; r++)
                for (int l = 0; l < nm; l++) j->Y[(size_t)(m0 + l) * j->rows + r0 + r] = out[r * L + l];
        }
    }
    free(fmem);
    free(qmem);
}

int gemm_supports(const gemm_kernel *gk, const gtype_info *t) { return !gk->supports || gk->supports(t); }

int run_gemm(const gemm_kernel *gk, const gtype_info *t, const uint8_t *w, int rows, int K, const float *X, int M,
             float *Y) {
    const int L = gk->lanes, groups = (M + L - 1) / L, ab = t->act_block;
    act_job act = {t, X, M, K, L, NULL, NULL, NULL, 1};
    act.qs = alloc_aligned((size_t)groups * K * L);
    act.d = alloc_aligned((size_t)groups * (K / ab) * L * 4);
    act.xs = alloc_aligned((size_t)groups * (K / 32) * L * 4);
    int rc = -1;
    if (act.qs && act.d && act.xs) {
        pool_run(act_task, &act, pool_chunks(groups * L, 8));
        if (act.ok) {
            tile_job j = {gk, t, w, (size_t)(K / t->block_values) * t->block_bytes, rows, K, M, &act, Y, 1};
            const int tiles = (rows + gk->rows - 1) / gk->rows;
            pool_run(tile_task, &j, pool_chunks(tiles, 4));
            rc = j.ok ? 0 : -1;
        }
    }
    free(act.qs);
    free(act.d);
    free(act.xs);
    return rc;
}

/* ---- portable micro-kernel ------------------------------------------------------------------ */

#define SCALAR_ROWS 4
#define SCALAR_LANES 4

/* Row-major tile (also the AVX-512 kernel's layout). */
static void decode_scalar(const gtype_info *t, const uint8_t *row, int K, int r, wtile *w) {
    const int nsb = K / (t->gtype == GT_Q6_K ? 16 : 32);
    gemm_decode_row(t, row, K, w->q + (size_t)r * K, w->scale + (size_t)r * nsb, w->minv + (size_t)r * (K / 32),
                    w->corr + (size_t)r * nsb);
}

static void tile_scalar(const wtile *w, const agroup *a, gemm_shape s, float *out) {
    const int K = w->K, L = SCALAR_LANES, nsb = K / s.sb, per_ab = s.ab / s.sb;
    for (int r = 0; r < SCALAR_ROWS; r++)
        for (int l = 0; l < L; l++) {
            float acc = 0.0f, part = 0.0f;
            for (int j = 0; j < nsb; j++) {
                int32_t p = w->corr[r * nsb + j];
                for (int i = 0; i < s.sb; i++) {
                    const int k = s.sb * j + i;
                    p += (int32_t)a->qs[((size_t)(k / 4) * L + l) * 4 + k % 4] * w->q[(size_t)r * K + k];
                }
                if (s.ab == s.sb) {
                    acc += (float)p * (a->d[(size_t)j * L + l] * w->scale[r * nsb + j]);
                    if (s.has_min) acc += a->xs[(size_t)j * L + l] * w->minv[r * (K / 32) + j];
                } else {
                    part += (float)p * w->scale[r * nsb + j];
                    if (s.has_min) part += a->xs[(size_t)j * L + l] * w->minv[r * (K / 32) + j];
                    if ((j + 1) % per_ab == 0) {
                        acc += part * a->d[(size_t)(j / per_ab) * L + l];
                        part = 0.0f;
                    }
                }
            }
            out[r * L + l] = acc;
        }
}

const gemm_kernel gemm_scalar = {"scalar", SCALAR_ROWS, SCALAR_LANES, decode_scalar, tile_scalar, NULL};
