/* Drivers: quantize the activation once, split weight rows across the thread pool. */
#include <stdlib.h>

#include "kernel.h"

typedef struct {
    const dot_fn *table;
    const dot2x2_fn *table2; /* optional 2 rows x 2 activations kernels */
    dotacts_fn dotacts;      /* matmul: the slot's multi-activation kernel, or NULL */
    const gtype_info *t;
    const uint8_t *w;
    int rows, nb;
    size_t row_bytes;
    const q8_act *acts; /* [M] */
    int M;
    float *out; /* matvec: y[rows]; matmul: Y[M, rows] */
} job;

/* Rows of chunk c of n: contiguous, near-equal shares starting at even rows, so the row pairs of
 * a 2x2 kernel (and so every result bit) do not depend on the chunking, i.e. the thread count. */
static void row_range(int rows, int c, int n, int *r0, int *r1) {
    *r0 = (int)((int64_t)rows * c / n) & ~1;
    *r1 = c + 1 == n ? rows : (int)((int64_t)rows * (c + 1) / n) & ~1;
}

#define MIN_CHUNK_ROWS 16 /* below this, hand-over costs more than the rows */

static void matvec_task(void *ctx, int chunk, int n_chunks) {
    const job *j = (const job *)ctx;
    const dot_fn dot = j->table[j->t->slot];
    int r0, r1;
    row_range(j->rows, chunk, n_chunks, &r0, &r1);
    for (int r = r0; r < r1; r++) j->out[r] = dot(j->w + (size_t)r * j->row_bytes, j->acts, j->nb);
}

/* Each weight row (pair) is dotted with all M activation rows while it is hot in L1: by the
 * multi-activation kernel (which blocks rows and activations itself), else with a 2x2 kernel in
 * pairs of rows and activations, leftovers and the rest by the single dot. */
static void matmul_task(void *ctx, int chunk, int n_chunks) {
    const job *j = (const job *)ctx;
    const dot_fn dot = j->table[j->t->slot];
    const dot2x2_fn dot2 = j->table2 ? j->table2[j->t->slot] : NULL;
    int r0, r1;
    row_range(j->rows, chunk, n_chunks, &r0, &r1);
    if (j->dotacts) {
        if (r1 > r0) j->dotacts(j->w + (size_t)r0 * j->row_bytes, j->row_bytes, r1 - r0, j->acts, j->M, j->nb, j->out + r0, (size_t)j->rows);
        return;
    }
    int r = r0;
    if (dot2 && j->M >= 2)
        for (; r + 1 < r1; r += 2) {
            const uint8_t *row0 = j->w + (size_t)r * j->row_bytes, *row1 = row0 + j->row_bytes;
            int m = 0;
            for (; m + 1 < j->M; m += 2) {
                float o[4];
                dot2(row0, row1, &j->acts[m], &j->acts[m + 1], j->nb, o);
                j->out[(size_t)m * j->rows + r] = o[0];
                j->out[(size_t)(m + 1) * j->rows + r] = o[1];
                j->out[(size_t)m * j->rows + r + 1] = o[2];
                j->out[(size_t)(m + 1) * j->rows + r + 1] = o[3];
            }
            for (; m < j->M; m++) {
                j->out[(size_t)m * j->rows + r] = dot(row0, &j->acts[m], j->nb);
                j->out[(size_t)m * j->rows + r + 1] = dot(row1, &j->acts[m], j->nb);
            }
        }
    for (; r < r1; r++) {
        const uint8_t *row = j->w + (size_t)r * j->row_bytes;
        for (int m = 0; m < j->M; m++) j->out[(size_t)m * j->rows + r] = dot(row, &j->acts[m], j->nb);
    }
}

static void *alloc_aligned(size_t n) {
    void *p = NULL;
    return posix_memalign(&p, 64, n ? n : 64) == 0 ? p : NULL;
}

static void quantize_act(const gtype_info *t, const float *x, int K, q8_act *a) {
    if (t->act_block == QK_K)
        quantize_act_256(x, K, a);
    else
        quantize_act_32(x, K, a);
    if (is_packed_type(t->gtype)) act_prepare_packed(t, a);
}

/* The activation rows of chunk c of n, quantized on the pool (M of them: a batch's share of the
 * work that does not touch the weights). */
typedef struct {
    const gtype_info *t;
    const float *X;
    int K, M;
    q8_act *acts;
} quant_job;

static void quantize_task(void *ctx, int chunk, int n_chunks) {
    const quant_job *q = (const quant_job *)ctx;
    for (int m = q->M * chunk / n_chunks; m < q->M * (chunk + 1) / n_chunks; m++)
        quantize_act(q->t, q->X + (size_t)m * q->K, q->K, &q->acts[m]);
}

int run_matvec(const dot_fn *table, const gtype_info *t, const uint8_t *w, int rows, int K,
               const float *x, float *y) {
    void *mem = alloc_aligned(act_bytes(K));
    if (!mem) return -1;
    q8_act a;
    act_bind(&a, mem, K);
    quantize_act(t, x, K, &a);
    const acts_table *at = path_acts_table(table); /* its kernel where it streams faster (kernel.h) */
    const dotacts_fn acts = at && at->matvec[t->slot] ? at->fn[t->slot] : NULL;
    job j = {table, NULL, acts, t, w, rows, K / t->block_values,
             (size_t)(K / t->block_values) * t->block_bytes, &a, 1, y};
    pool_run(acts ? matmul_task : matvec_task, &j, pool_chunks(rows, MIN_CHUNK_ROWS));
    free(mem);
    return 0;
}

int run_matmul(const dot_fn *table, const dot2x2_fn *table2, const gemm_kernel *gemm, const gtype_info *t,
               const uint8_t *w, int rows, int K, const float *X, int M, float *Y) {
    const acts_table *at = path_acts_table(table);
    const dotacts_fn dotacts = at && M > 1 ? at->fn[t->slot] : NULL;
    if (gemm && M >= (dotacts ? at->gemm_from[t->slot] : GEMM_MIN_M) && gemm_supports(gemm, t))
        return run_gemm(gemm, t, w, rows, K, X, M, Y);
    const size_t per = act_bytes(K);
    uint8_t *mem = alloc_aligned(per * (size_t)M);
    q8_act *acts = malloc(sizeof(q8_act) * (size_t)(M ? M : 1));
    if (!mem || !acts) {
        free(mem);
        free(acts);
        return -1;
    }
    for (int m = 0; m < M; m++) act_bind(&acts[m], mem + per * (size_t)m, K);
    quant_job q = {t, X, K, M, acts};
    pool_run(quantize_task, &q, pool_chunks(M, 1));
    job j = {table, table2, dotacts, t, w, rows, K / t->block_values,
             (size_t)(K / t->block_values) * t->block_bytes, acts, M, Y};
    pool_run(matmul_task, &j, pool_chunks(rows, MIN_CHUNK_ROWS));
    free(mem);
    free(acts);
    return 0;
}
