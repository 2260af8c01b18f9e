/* Drivers: quantize the activation once, split weight rows across the thread pool. */
#include <stdlib.h>

#include "kernel.h"

typedef struct {
    const dot_fn *table;
    const dotrows_fn *rows_table; /* optional multi-row kernels (matvec) */
    const dot2x2_fn *table2; /* optional 2 rows x 2 activations kernels */
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
    const dotrows_fn dr = j->rows_table ? j->rows_table[j->t->slot] : NULL;
    int r = r0;
    if (dr)
        for (; r + DOT_ROWS <= r1; r += DOT_ROWS) dr(j->w + (size_t)r * j->row_bytes, j->row_bytes, j->acts, j->nb, DOT_ROWS, j->out + r);
    for (; r < r1; r++) j->out[r] = dot(j->w + (size_t)r * j->row_bytes, j->acts, j->nb);
}

/* Each weight row (pair) is dotted with all M activation rows while it is hot in L1. With a 2x2
 * kernel, rows and activations go in pairs; leftovers use the single dot. */
static void matmul_task(void *ctx, int chunk, int n_chunks) {
    const job *j = (const job *)ctx;
    const dot_fn dot = j->table[j->t->slot];
    const dot2x2_fn dot2 = j->table2 ? j->table2[j->t->slot] : NULL;
    int r0, r1;
    row_range(j->rows, chunk, n_chunks, &r0, &r1);
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

int run_matvec(const dot_fn *table, const gtype_info *t, const uint8_t *w, int rows, int K,
               const float *x, float *y) {
    void *mem = alloc_aligned(act_bytes(K));
    if (!mem) return -1;
    q8_act a;
    act_bind(&a, mem, K);
    quantize_act(t, x, K, &a);
    job j = {table, path_rows_table(table), NULL, t, w, rows, K / t->block_values, (size_t)(K / t->block_values) * t->block_bytes,
             &a, 1, y};
    pool_run(matvec_task, &j, pool_chunks(rows, MIN_CHUNK_ROWS));
    free(mem);
    return 0;
}

int run_matmul(const dot_fn *table, const dot2x2_fn *table2, const gemm_kernel *gemm, const gtype_info *t,
               const uint8_t *w, int rows, int K, const float *X, int M, float *Y) {
    if (gemm && M >= GEMM_MIN_M && gemm_supports(gemm, t)) return run_gemm(gemm, t, w, rows, K, X, M, Y);
    const size_t per = act_bytes(K);
    uint8_t *mem = alloc_aligned(per * (size_t)M);
    q8_act *acts = malloc(sizeof(q8_act) * (size_t)(M ? M : 1));
    if (!mem || !acts) {
        free(mem);
        free(acts);
        return -1;
    }
    for (int m = 0; m < M; m++) {
        act_bind(&acts[m], mem + per * (size_t)m, K);
        quantize_act(t, X + (size_t)m * K, K, &acts[m]);
    }
    job j = {table, NULL, table2, t, w, rows, K / t->block_values, (size_t)(K / t->block_values) * t->block_bytes,
             acts, M, Y};
    pool_run(matmul_task, &j, pool_chunks(rows, MIN_CHUNK_ROWS));
    free(mem);
    free(acts);
    return 0;
}
