/* Standalone self-test of the kernel's C paths, for cross-builds (ARM64 under qemu) where the
 * Python extension cannot be loaded. Links every kernel source except module.c.
 *
 *   selftest ["expected available paths"]
 *
 * For each type: random blocks (valid fp16 scales), a float64 reference = dequantized weights .
 * dequantized int8 activation (dequantization written from the GGUF layouts, independently of the
 * dot code); every available path, dense and block-sparse, must match it; the threaded drivers
 * must equal the single-thread ones. Attention (decode and prompt rows; dense, window, block-sparse;
 * fp32/fp16/int8 caches; portable and SIMD) against float64. Exit status 0 = all passed. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernel.h"

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint32_t rnd(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 16);
}
static float rnd_gauss(void) { /* sum of uniforms: good enough for test data */
    float s = 0;
    for (int i = 0; i < 4; i++) s += (float)(rnd() & 0xFFFF) / 65536.0f - 0.5f;
    return s * 1.7f;
}

/* fp32 -> fp16 bits for positive normal values in range (test scales only) */
static uint16_t to_half(float f) {
    uint32_t b;
    memcpy(&b, &f, 4);
    int e = (int)((b >> 23) & 0xFF) - 127 + 15;
    return (uint16_t)(((b >> 31) << 15) | ((uint32_t)e << 10) | ((b >> 13) & 0x3FF));
}
static void put_half(uint8_t *p, float f) {
    uint16_t h = to_half(f);
    p[0] = (uint8_t)h;
    p[1] = (uint8_t)(h >> 8);
}

static void fill_block(const gtype_info *t, uint8_t *b) {
    for (int i = 0; i < t->block_bytes; i++) b[i] = (uint8_t)rnd();
    const float s = 0.002f + (float)(rnd() % 1000) * 2e-5f;
    switch (t->gtype) {
    case GT_Q4_0:
    case GT_Q8_0: put_half(b, s); break;
    case GT_Q4_1: put_half(b, s); put_half(b + 2, -8 * s); break;
    case GT_Q4_K: put_half(b, s); put_half(b + 2, s * 0.5f); break;
    case GT_Q6_K: put_half(b + 208, s); break;
    }
}

/* Dequantize one block to float, straight from the layout tables (REFERENCE.md section 2). */
static void dequant_block(const gtype_info *t, const uint8_t *b, double *y) {
    switch (t->gtype) {
    case GT_Q4_0:
        for (int j = 0; j < 16; j++) {
            y[j] = fp16_to_fp32(read_u16(b)) * ((b[2 + j] & 0xF) - 8);
            y[j + 16] = fp16_to_fp32(read_u16(b)) * ((b[2 + j] >> 4) - 8);
        }
        break;
    case GT_Q4_1:
        for (int j = 0; j < 16; j++) {
            y[j] = fp16_to_fp32(read_u16(b)) * (b[4 + j] & 0xF) + fp16_to_fp32(read_u16(b + 2));
            y[j + 16] = fp16_to_fp32(read_u16(b)) * (b[4 + j] >> 4) + fp16_to_fp32(read_u16(b + 2));
        }
        break;
    case GT_Q8_0:
        for (int j = 0; j < 32; j++) y[j] = fp16_to_fp32(read_u16(b)) * (int8_t)b[2 + j];
        break;
    case GT_Q4_K: {
        const double d = fp16_to_fp32(read_u16(b)), dmin = fp16_to_fp32(read_u16(b + 2));
        for (int c = 0; c < 4; c++)
            for (int h = 0; h < 2; h++) {
                uint8_t sc, m;
                q4k_scale_min(2 * c + h, b + 4, &sc, &m);
                for (int l = 0; l < 32; l++) {
                    const int q = h ? b[16 + 32 * c + l] >> 4 : b[16 + 32 * c + l] & 0xF;
                    y[64 * c + 32 * h + l] = d * sc * q - dmin * m;
                }
            }
        break;
    }
    case GT_Q6_K: {
        const double d = fp16_to_fp32(read_u16(b + 208));
        const uint8_t *ql = b, *qh = b + 128;
        const int8_t *sc = (const int8_t *)(b + 192);
        for (int half = 0; half < 2; half++, ql += 64, qh += 32, sc += 8, y += 128)
            for (int l = 0; l < 32; l++) {
                const int is = l / 16;
                y[l] = d * sc[is] * (((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32);
                y[l + 32] = d * sc[is + 2] * (((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32);
                y[l + 64] = d * sc[is + 4] * (((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
                y[l + 96] = d * sc[is + 6] * (((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
            }
        break;
    }
    }
}

static int failures;
#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            printf("FAIL: " __VA_ARGS__);                                                          \
            printf("\n");                                                                          \
            failures++;                                                                            \
        }                                                                                          \
    } while (0)

static const char *PATH_NAMES[] = {"scalar", "avx2", "avx512", "neon", "neon_dotprod", "neon_i8mm"};

#define MAX_ACTS (GEMM_MIN_M - 1)

/* Activation row m of a small batch: x permuted and scaled (odd rows negated and halved, row 5
 * tiny), so every row has its own scales. */
static void batch_row(const float *x, int K, int m, float *out) {
    for (int i = 0; i < K; i++) out[i] = x[(i + 37 * m) % K] * (m % 2 ? -0.5f : 1.0f) * (m == 5 ? 1e-3f : 1.0f);
}

/* The path's multi-activation kernel for t (if any) against its single dot, bit for bit: every row
 * count 1..rows (starting at varied rows) times every activation count 1..MAX_ACTS, written with an
 * output stride wider than the rows (the untouched gaps checked). */
static void check_dotacts(const gtype_info *t, const dot_fn *table, const uint8_t *w, int rows, size_t row_bytes, int nb,
                          const float *x, const char *path) {
    const acts_table *at = path_acts_table(table);
    if (!at || !at->fn[t->slot]) return;
    const int K = nb * t->block_values, stride = rows + 3;
    const size_t per = act_bytes(K);
    uint8_t *mem;
    if (posix_memalign((void **)&mem, 64, per * MAX_ACTS) != 0) exit(2);
    q8_act acts[MAX_ACTS];
    float *xm = malloc(sizeof(float) * K), *out = malloc(sizeof(float) * MAX_ACTS * stride);
    float *one = malloc(sizeof(float) * MAX_ACTS * rows); /* [m][r]: the single dots */
    for (int m = 0; m < MAX_ACTS; m++) {
        act_bind(&acts[m], mem + per * m, K);
        batch_row(x, K, m, xm);
        if (t->act_block == QK_K)
            quantize_act_256(xm, K, &acts[m]);
        else
            quantize_act_32(xm, K, &acts[m]);
        if (is_packed_type(t->gtype)) act_prepare_packed(t, &acts[m]);
        for (int r = 0; r < rows; r++) one[m * rows + r] = table[t->slot](w + r * row_bytes, &acts[m], nb);
    }
    int bad = 0;
    for (int nr = 1; nr <= rows; nr++)
        for (int na = 1; na <= MAX_ACTS; na++) {
            const int r0 = (7 * nr + na) % (rows - nr + 1);
            for (int i = 0; i < MAX_ACTS * stride; i++) out[i] = -1.0f;
            at->fn[t->slot](w + r0 * row_bytes, row_bytes, nr, acts, na, nb, out, (size_t)stride);
            for (int m = 0; m < MAX_ACTS; m++)
                for (int i = 0; i < stride; i++) {
                    const float want = m < na && i < nr ? one[m * rows + r0 + i] : -1.0f;
                    if (memcmp(&want, &out[m * stride + i], 4) != 0 && bad++ < 5)
                        printf("FAIL: type %d path %s: dotacts (%d rows from %d x %d acts) [%d][%d] = %.9g, dot %.9g\n",
                               t->gtype, path, nr, r0, na, m, i, out[m * stride + i], want);
                }
        }
    failures += bad;
    free(mem);
    free(xm);
    free(out);
    free(one);
}

/* The batched driver for M = 2..MAX_ACTS and the largest M below the tiled path, 1 and 3
 * threads, against matvecs bit for bit: with the path's multi-activation kernel for t, or with
 * nothing but the single dot (a 2x2 kernel sums in its own order: the M = 3 test of test_type
 * bounds it). */
static void check_small_batches(const gtype_info *t, const dot_fn *table, const uint8_t *w, int rows, int K,
                                const float *x, const char *path) {
    const acts_table *at = path_acts_table(table);
    const dot2x2_fn *t2 = path_table2x2(path);
    if (!(at && at->fn[t->slot]) && t2 && t2[t->slot]) return;
    const int last = at && at->fn[t->slot] && at->gemm_from[t->slot] - 1 > MAX_ACTS ? at->gemm_from[t->slot] - 1 : MAX_ACTS;
    float *X = malloc(sizeof(float) * last * K), *Y = malloc(sizeof(float) * last * rows);
    float *y = malloc(sizeof(float) * rows);
    for (int m = 0; m < last; m++) batch_row(x, K, m, X + (size_t)m * K);
    for (int threads = 1; threads <= 3; threads += 2) {
        pool_set_threads(threads);
        for (int M = 2; M <= last; M = M < MAX_ACTS || M == last ? M + 1 : last) {
            CHECK(run_matmul(table, t2, path_gemm(path), t, w, rows, K, X, M, Y) == 0, "matmul OOM");
            for (int m = 0; m < M; m++) {
                run_matvec(table, t, w, rows, K, X + (size_t)m * K, y);
                for (int r = 0; r < rows; r++) {
                    const float got = Y[m * rows + r];
                    CHECK(memcmp(&got, &y[r], 4) == 0, "type %d path %s threads %d: matmul M=%d [%d][%d] = %.9g, matvec %.9g",
                          t->gtype, path, threads, M, m, r, got, y[r]);
                }
            }
        }
    }
    pool_set_threads(1);
    free(X);
    free(Y);
    free(y);
}

/* One GGUF type, or (packed) its load-time packed layout: the same random rows repacked; the
 * reference always dequantizes the raw blocks. */
static void test_type(int gtype, int packed) {
    const gtype_info *raw = kernel_type_info(gtype), *t = packed ? kernel_type_info(packed_type_of(gtype)) : raw;
    const int rows = 13, K = 1024, nb = K / t->block_values, raw_nb = K / raw->block_values, bs = raw->block_values;
    const size_t row_bytes = (size_t)nb * t->block_bytes, raw_row_bytes = (size_t)raw_nb * raw->block_bytes;
    uint8_t *w = malloc(rows * row_bytes), *wraw = malloc(rows * raw_row_bytes);
    float *x = malloc(sizeof(float) * K), *y1 = malloc(sizeof(float) * rows), *y2 = malloc(sizeof(float) * rows);
    double *wd = malloc(sizeof(double) * K), *xd = malloc(sizeof(double) * K);
    for (int i = 0; i < rows * raw_nb; i++) fill_block(raw, wraw + (size_t)i * raw->block_bytes);
    if (packed)
        CHECK(repack_groups(gtype, wraw, w, (size_t)rows * nb) == 0, "type %d: no packed layout", gtype);
    else
        memcpy(w, wraw, rows * row_bytes);
    for (int i = 0; i < K; i++) x[i] = rnd_gauss();

    void *mem;
    if (posix_memalign(&mem, 64, act_bytes(K)) != 0) exit(2);
    q8_act a;
    act_bind(&a, mem, K);
    if (bs == QK_K)
        quantize_act_256(x, K, &a);
    else
        quantize_act_32(x, K, &a);
    if (packed) act_prepare_packed(t, &a);
    for (int i = 0; i < K; i++) xd[i] = (double)a.qs[i] * a.d[i / bs];

    for (size_t p = 0; p < sizeof(PATH_NAMES) / sizeof(PATH_NAMES[0]); p++) {
        if (!path_available(PATH_NAMES[p])) continue;
        const dot_fn *table = path_table(PATH_NAMES[p]);
        for (int r = 0; r < rows; r++) {
            const uint8_t *row = w + r * row_bytes, *rawrow = wraw + r * raw_row_bytes;
            for (int b = 0; b < raw_nb; b++) dequant_block(raw, rawrow + (size_t)b * raw->block_bytes, wd + b * bs);
            double ref = 0, wn = 0, xn = 0;
            for (int i = 0; i < K; i++) {
                ref += wd[i] * xd[i];
                wn += wd[i] * wd[i];
                xn += xd[i] * xd[i];
            }
            const double tol = 2e-6 * sqrt(wn * xn);
            const float got = table[t->slot](row, &a, nb);
            CHECK(fabs(got - ref) <= tol, "type %d%s path %s row %d: %.7g vs reference %.7g", gtype,
                  packed ? " packed" : "", PATH_NAMES[p], r, got, ref);
        }
        check_dotacts(t, table, w, rows, row_bytes, nb, x, PATH_NAMES[p]);
        /* drivers: 1 thread == 3 threads; matmul row m == matvec */
        pool_set_threads(1);
        run_matvec(table, t, w, rows, K, x, y1);
        pool_set_threads(3);
        run_matvec(table, t, w, rows, K, x, y2);
        CHECK(memcmp(y1, y2, sizeof(float) * rows) == 0, "type %d%s path %s: threads 1 != 3", gtype, packed ? " packed" : "", PATH_NAMES[p]);
        check_small_batches(t, table, w, rows, K, x, PATH_NAMES[p]);
        /* M = 3 (row by row: a 2x2 pair + a leftover, or the multi-activation kernel) and 3 past
         * where the tiled path takes over (where the path has one, with a partial activation
         * group) against single matvecs */
        const acts_table *at = path_acts_table(table);
        const int Ms[2] = {3, (at && at->fn[t->slot] ? at->gemm_from[t->slot] : GEMM_MIN_M) + 3};
        for (int mi = 0; mi < 2; mi++) {
            const int M = Ms[mi];
            float *X = malloc(sizeof(float) * (size_t)M * K), *Y = malloc(sizeof(float) * (size_t)M * rows);
            float *ym = malloc(sizeof(float) * rows);
            for (int m = 0; m < M; m++)
                for (int i = 0; i < K; i++) X[m * K + i] = x[(i + 37 * m) % K] * (m % 2 ? -0.5f : 1.0f);
            run_matmul(table, path_table2x2(PATH_NAMES[p]), path_gemm(PATH_NAMES[p]), t, w, rows, K, X, M, Y);
            for (int m = 0; m < M; m++) {
                run_matvec(table, t, w, rows, K, X + m * K, ym);
                double xn = 0;
                for (int i = 0; i < K; i++) xn += (double)X[m * K + i] * X[m * K + i];
                for (int r = 0; r < rows; r++) { /* other kernels sum in another order: float rounding */
                    double wn = 0;
                    for (int b = 0; b < raw_nb; b++)
                        dequant_block(raw, wraw + r * raw_row_bytes + (size_t)b * raw->block_bytes, wd + b * bs);
                    for (int i = 0; i < K; i++) wn += wd[i] * wd[i];
                    CHECK(fabs((double)Y[m * rows + r] - ym[r]) <= 1e-6 * sqrt(wn * xn),
                          "type %d%s path %s row %d: matmul[%d of %d] %.7g != matvec %.7g", gtype, packed ? " packed" : "", PATH_NAMES[p], r,
                          m, M, Y[m * rows + r], ym[r]);
                }
            }
            free(ym);
            free(X);
            free(Y);
        }
        pool_set_threads(1);
    }
    free(mem);
    free(w);
    free(wraw);
    free(x);
    free(y1);
    free(y2);
    free(wd);
    free(xd);
}

/* fp16 bits of a normal number -> double (independent of the kernel's fp16_to_fp32) */
static double half_to_double(uint16_t h) {
    const double m = 1.0 + (double)(h & 0x3FF) / 1024.0;
    return ((h >> 15) ? -1.0 : 1.0) * ldexp(m, (int)((h >> 10) & 0x1F) - 15);
}

/* Attention (attention.c) against a float64 reference written from the definition, one (query,
 * key) pair at a time: key j visible from row t (position p = pos + t), head h iff j <= p,
 * j > p - window (window > 0), and with a block-sparse pattern jb <= ib and (ib - jb < local or
 * (jb + h * step + 1) % stride == 0) for ib = p / block, jb = j / block. kd, vd: the cache's values
 * as float ([KV, n_ctx, hd]); out [T, H * hd]. */
static void attention_reference(const float *q, int q_stride, const float *kd, const float *vd, int H, int KV, int hd,
                                int n_ctx, int T, int pos, int window, double scale, const block_sparse *sp,
                                double *out, double *p) {
    for (int t = 0; t < T; t++) {
        const int qp = pos + t;
        for (int h = 0; h < H; h++) {
            const size_t base = (size_t)(h / (H / KV)) * n_ctx * hd;
            double mx = -INFINITY, sum = 0;
            for (int j = 0; j <= qp; j++) {
                int seen = !(window > 0 && j <= qp - window);
                if (sp) {
                    const int ib = qp / sp->block, jb = j / sp->block;
                    seen = seen && (ib - jb < sp->local_blocks || (jb + h * sp->head_step + 1) % sp->vert_stride == 0);
                }
                p[j] = -INFINITY;
                if (!seen) continue;
                double s = 0;
                for (int i = 0; i < hd; i++) s += (double)q[(size_t)t * q_stride + h * hd + i] * kd[base + (size_t)j * hd + i];
                p[j] = s * scale;
                if (p[j] > mx) mx = p[j];
            }
            for (int j = 0; j <= qp; j++) sum += (p[j] = p[j] == -INFINITY ? 0.0 : exp(p[j] - mx));
            for (int i = 0; i < hd; i++) {
                double o = 0;
                for (int j = 0; j <= qp; j++) o += p[j] / sum * vd[base + (size_t)j * hd + i];
                out[(size_t)t * H * hd + h * hd + i] = o;
            }
        }
    }
}

/* Decode (T = 1) and prompt rows (T > 1), dense / window / block-sparse (hetero and homo heads),
 * float32, fp16 and int8 caches, portable and SIMD code (NEON under qemu), 1 and 2 threads, q rows
 * with a stride wider than H * hd (the fused qkv rows): GQA 8 query heads over 2 kv heads,
 * 300-slot cache, block 16, 2 local blocks, vertical stride 4. The SIMD result must also match
 * the portable one closely (same chunk order, different summation inside a dot). */
static void test_attention(void) {
    const int H = 8, KV = 2, n_ctx = 300, hds[] = {64, 20, 40}; /* 20, 40: the SIMD tails */
    const block_sparse hetero = {16, 2, 4, 1}, homo = {16, 2, 4, 0}, wide = {16, 3, 4, 2};
    const struct {
        int T, pos, window;
        const block_sparse *sp;
    } cases[] = {
        {1, 0, 0, NULL},      {1, 299, 0, NULL},     {1, 289, 253, NULL}, {1, 150, 1, NULL},
        {1, 299, 0, &hetero}, {1, 97, 0, &homo},     {1, 250, 40, &hetero},
        {77, 0, 0, NULL},     {45, 200, 0, NULL},    {33, 120, 50, NULL},
        {120, 0, 0, &hetero}, {53, 181, 0, &hetero}, {40, 140, 0, &homo}, {61, 239, 0, &wide},
    };
    const int n_cases = (int)(sizeof(cases) / sizeof(cases[0])), T_max = 120;
    for (int hi_d = 0; hi_d < 3; hi_d++) {
        const int hd = hds[hi_d], q_stride = (H + 2 * KV) * hd; /* q = first H*hd columns of qkv rows */
        const size_t n = (size_t)KV * n_ctx * hd, n_out = (size_t)T_max * H * hd;
        float *q = malloc(sizeof(float) * T_max * q_stride), *out = malloc(sizeof(float) * n_out);
        float *out0 = malloc(sizeof(float) * n_out);
        float *k32 = malloc(sizeof(float) * n), *v32 = malloc(sizeof(float) * n);
        uint16_t *k16 = malloc(2 * n), *v16 = malloc(2 * n);
        int8_t *k8 = malloc(n), *v8 = malloc(n);
        uint16_t *ks = malloc(2 * (size_t)KV * n_ctx), *vs = malloc(2 * (size_t)KV * n_ctx);
        float *kd = malloc(sizeof(float) * n), *vd = malloc(sizeof(float) * n); /* the kind's values */
        double *ref = malloc(sizeof(double) * n_out), *p = malloc(sizeof(double) * n_ctx);
        for (int i = 0; i < T_max * q_stride; i++) q[i] = rnd_gauss() * 0.5f;
        for (size_t i = 0; i < n; i++) { /* random normal fp16 in +-[2^-4, 2^1) */
            k16[i] = (uint16_t)((rnd() & 0x83FF) | (uint16_t)((11 + rnd() % 5) << 10));
            v16[i] = (uint16_t)((rnd() & 0x83FF) | (uint16_t)((11 + rnd() % 5) << 10));
            k32[i] = (float)half_to_double(k16[i]);
            v32[i] = (float)half_to_double(v16[i]);
            k8[i] = (int8_t)(rnd() % 255 - 127);
            v8[i] = (int8_t)(rnd() % 255 - 127);
        }
        for (int i = 0; i < KV * n_ctx; i++) { /* positive fp16 scales in [2^-7, 2^-5) */
            ks[i] = (uint16_t)((rnd() & 0x3FF) | (uint16_t)((8 + rnd() % 2) << 10));
            vs[i] = (uint16_t)((rnd() & 0x3FF) | (uint16_t)((8 + rnd() % 2) << 10));
        }
        for (int kind = KV_F32; kind <= KV_I8; kind++) {
            for (size_t i = 0; i < n; i++) {
                const size_t row = i / hd; /* [kv, t] */
                kd[i] = kind == KV_I8 ? (float)(k8[i] * half_to_double(ks[row])) : k32[i];
                vd[i] = kind == KV_I8 ? (float)(v8[i] * half_to_double(vs[row])) : v32[i];
            }
            const void *kc = kind == KV_I8 ? (const void *)k8 : kind == KV_F16 ? (const void *)k16 : k32;
            const void *vc = kind == KV_I8 ? (const void *)v8 : kind == KV_F16 ? (const void *)v16 : v32;
            for (int c = 0; c < n_cases; c++) {
                const int T = cases[c].T, pos = cases[c].pos, window = cases[c].window;
                const block_sparse *sp = cases[c].sp;
                const double scale = c % 2 ? 1.0 / hd : 1.0 / sqrt((double)hd); /* Phi-3-small's and Phi-3's */
                attention_reference(q, q_stride, kd, vd, H, KV, hd, n_ctx, T, pos, window, scale, sp, ref, p);
                double amax = 0;
                for (size_t i = 0; i < (size_t)T * H * hd; i++) amax = fmax(amax, fabs(ref[i]));
                for (int simd = 0; simd < 2; simd++)
                    for (int threads = 1; threads <= 2; threads++) {
                        pool_set_threads(threads);
                        const attention_args a = {.q = q, .q_stride = q_stride, .k = kc, .v = vc,
                                                  .k_scale = kind == KV_I8 ? ks : NULL,
                                                  .v_scale = kind == KV_I8 ? vs : NULL, .out = out, .H = H,
                                                  .KV = KV, .hd = hd, .n_ctx = n_ctx, .kind = kind, .T = T,
                                                  .pos = pos, .window = window, .scale = (float)scale, .sparse = sp};
                        CHECK(run_attention(&a, simd) == 0, "attention: out of memory");
                        double err = 0, err0 = 0;
                        for (size_t i = 0; i < (size_t)T * H * hd; i++) {
                            err = fmax(err, fabs(out[i] - ref[i]));
                            if (simd) err0 = fmax(err0, fabs(out[i] - out0[i]));
                        }
                        if (!simd && threads == 1) memcpy(out0, out, sizeof(float) * (size_t)T * H * hd);
                        CHECK(err <= 1e-5 * amax + 1e-7 && err0 <= 2e-6 * amax + 1e-7,
                              "attention hd=%d T=%d pos=%d window=%d sparse=%d kind=%d simd=%d threads=%d: "
                              "max error %g vs float64, %g vs portable (output scale %g)", hd, T, pos, window,
                              sp ? sp->head_step + 1 : 0, kind, simd, threads, err, err0, amax);
                    }
            }
        }
        /* prompt rows equal decode one row at a time (the same chunks in the same order; decode
         * reads the cache rows in place, a prompt tile converts them first: the same values) */
        const void *k_of[3] = {k32, k16, k8}, *v_of[3] = {v32, v16, v8};
        for (int kind = KV_F32; kind <= KV_I8; kind++) {
            const attention_args rows = {.q = q, .q_stride = q_stride, .k = k_of[kind], .v = v_of[kind],
                                         .k_scale = kind == KV_I8 ? ks : NULL, .v_scale = kind == KV_I8 ? vs : NULL,
                                         .out = out, .H = H, .KV = KV, .hd = hd, .n_ctx = n_ctx, .kind = kind,
                                         .T = 90, .pos = 100, .window = 0, .scale = 1.0f / hd, .sparse = &hetero};
            CHECK(run_attention(&rows, 1) == 0, "attention: out of memory");
            int same = 1;
            for (int t = 0; t < 90; t++) {
                attention_args one = rows;
                one.q = q + (size_t)t * q_stride, one.T = 1, one.pos = 100 + t, one.out = out0;
                CHECK(run_attention(&one, 1) == 0, "attention: out of memory");
                same &= memcmp(out0, out + (size_t)t * H * hd, sizeof(float) * H * hd) == 0;
            }
            CHECK(same, "attention hd=%d kind=%d: prompt rows differ from decoding them one by one", hd, kind);
        }
        const attention_args all = {.q = q, .q_stride = q_stride, .k = k16, .v = v16, .out = out, .H = H, .KV = KV,
                                    .hd = hd, .n_ctx = n_ctx, .kind = KV_F16, .T = 90, .pos = 100, .window = 0,
                                    .scale = 1.0f / hd, .sparse = &hetero};
        /* invalid arguments are refused, not run */
        attention_args bad = all;
        bad.pos = n_ctx - 89;
        CHECK(run_attention(&bad, 1) == -2 && attention_args_error(&bad), "attention: rows past the cache accepted");
        bad = all, bad.q_stride = H * hd - 1;
        CHECK(run_attention(&bad, 1) == -2, "attention: short q stride accepted");
        block_sparse zero_local = hetero;
        zero_local.local_blocks = 0;
        bad = all, bad.sparse = &zero_local;
        CHECK(run_attention(&bad, 1) == -2, "attention: local_blocks 0 accepted");
        pool_set_threads(1);
        free(q), free(out), free(out0), free(k32), free(v32), free(k16), free(v16), free(ref), free(p);
        free(k8), free(v8), free(ks), free(vs), free(kd), free(vd);
    }
}

/* Cache 1 (the path under test's) set to cache 0 (the reference's): rows and int8 scales. */
static void restore_cache(void *k[2], void *v[2], uint16_t *ks[2], uint16_t *vs[2], size_t n_cache, size_t elem,
                          int hd) {
    memcpy(k[1], k[0], n_cache * elem), memcpy(v[1], v[0], n_cache * elem);
    memcpy(ks[1], ks[0], n_cache / hd * 2), memcpy(vs[1], vs[0], n_cache / hd * 2);
}

/* A few rows in one call (a speculative verify, a short prompt: run_forward_rows with T > 1, its
 * multi-activation kernels) give the bits of as many decode steps on the same path, from the same
 * cache: hidden states and the cache rows written. Path `name`'s plan works on cache 1, restored
 * from cache 0 (the reference's, 40 positions written) before each of the two runs. */
static void check_rows_as_steps(const char *name, const decode_plan *plan, void *k[2], void *v[2], uint16_t *ks[2],
                                uint16_t *vs[2], size_t n_cache, size_t elem, int small, int kind) {
    enum { T = 5, POS = 40, MAXD = 256, MAXHALF = 64 };
    const int D = plan->D, half = plan->rot / 2;
    if (D > MAXD || half > MAXHALF || POS + T > plan->n_ctx) {
        CHECK(0, "check_rows_as_steps: the plan outgrew its buffers");
        return;
    }
    static float h_rows[T][MAXD], h_steps[T][MAXD], cos[T][MAXHALF], sin[T][MAXHALF];
    float cs[T * MAXHALF], sn[T * MAXHALF]; /* rows of rot / 2 values, as run_forward_rows reads them */
    for (int t = 0; t < T; t++) {
        for (int i = 0; i < D; i++) h_rows[t][i] = h_steps[t][i] = rnd_gauss();
        for (int i = 0; i < half; i++) {
            cos[t][i] = cs[t * half + i] = cosf(0.1f * (POS + t) * (i + 1));
            sin[t][i] = sn[t * half + i] = sinf(0.1f * (POS + t) * (i + 1));
        }
    }
    void *k_rows = malloc(n_cache * elem), *v_rows = malloc(n_cache * elem);
    if (!k_rows || !v_rows) {
        CHECK(0, "check_rows_as_steps: out of memory");
        free(k_rows), free(v_rows);
        return;
    }
    for (int run = 0; run < 2; run++) {
        restore_cache(k, v, ks, vs, n_cache, elem, plan->hd);
        if (run == 0) {
            CHECK(run_forward_rows(path_table(name), 1, plan, h_rows[0], T, cs, sn, POS) == 0, "rows: out of memory");
            memcpy(k_rows, k[1], n_cache * elem), memcpy(v_rows, v[1], n_cache * elem);
        } else {
            for (int t = 0; t < T; t++)
                CHECK(run_forward_rows(path_table(name), 1, plan, h_steps[t], 1, cos[t], sin[t], POS + t) == 0,
                      "step: out of memory");
        }
    }
    int same_h = 1;
    double worst = 0.0; /* for the message */
    for (int t = 0; t < T; t++) {
        same_h &= memcmp(h_rows[t], h_steps[t], sizeof(float) * D) == 0;
        for (int i = 0; i < D; i++) {
            const double e = fabs((double)h_rows[t][i] - h_steps[t][i]) / (fabs(h_steps[t][i]) + 1e-3);
            if (e > worst) worst = e;
        }
    }
    const int same_cache = memcmp(k_rows, k[1], n_cache * elem) == 0 && memcmp(v_rows, v[1], n_cache * elem) == 0;
    CHECK(same_h && same_cache,
          "%d rows in one call (%s, kv %d) on %s: relative difference %g from %d decode steps%s", T,
          small ? "phi3small" : "phi3", kind, name, worst, T, same_cache ? "" : ", cache rows differ");
    free(k_rows), free(v_rows);
}

/* The one-call decode step (decode.c) for both architectures of the model description: Phi-3
 * (RMSNorm, SwiGLU, no biases, dense) and Phi-3-small (LayerNorm with bias, GeGELU, biases, a
 * block-sparse and a dense layer), fp16 and int8 caches, 40 steps past the local window: every
 * SIMD path (NEON under qemu) against the portable C path, step by step from the same cache. */
static void test_decode_step(void) {
    enum { D = 256, H = 4, KV = 1, HD = 64, F = 256, CTX = 48, LAYERS = 2 };
    const gtype_info *t = kernel_type_info(GT_Q4_0);
    const int rows[4] = {(H + 2 * KV) * HD, D, 2 * F, D}, cols[4] = {D, H * HD, D, F};
    uint8_t *w[LAYERS][4];
    float *bias[LAYERS][4], *norm_w[LAYERS][2], *norm_b[LAYERS][2];
    for (int l = 0; l < LAYERS; l++) {
        for (int m = 0; m < 4; m++) {
            const int nb = rows[m] * (cols[m] / t->block_values);
            w[l][m] = malloc((size_t)nb * t->block_bytes);
            for (int i = 0; i < nb; i++) fill_block(t, w[l][m] + (size_t)i * t->block_bytes);
            bias[l][m] = malloc(sizeof(float) * rows[m]);
            for (int i = 0; i < rows[m]; i++) bias[l][m][i] = 0.3f * rnd_gauss();
        }
        for (int n = 0; n < 2; n++) {
            norm_w[l][n] = malloc(sizeof(float) * D), norm_b[l][n] = malloc(sizeof(float) * D);
            for (int i = 0; i < D; i++) norm_w[l][n][i] = 1.0f + 0.2f * rnd_gauss(), norm_b[l][n][i] = 0.2f * rnd_gauss();
        }
    }
    float cos[HD / 2], sin[HD / 2];
    for (int small = 0; small < 2; small++)
        for (int kind = KV_F16; kind <= KV_I8; kind++) {
            const size_t elem = kind == KV_I8 ? 1 : 2, n_cache = (size_t)LAYERS * KV * CTX * HD;
            void *k[2], *v[2];
            uint16_t *ks[2], *vs[2];
            dec_layer layers[LAYERS];
            for (int l = 0; l < LAYERS; l++) {
                dec_linear lin[4];
                for (int m = 0; m < 4; m++) lin[m] = (dec_linear){w[l][m], t, rows[m], cols[m], small ? bias[l][m] : NULL};
                layers[l] = (dec_layer){norm_w[l][0], small ? norm_b[l][0] : NULL, norm_w[l][1],
                                        small ? norm_b[l][1] : NULL, lin[0], lin[1], lin[2], lin[3],
                                        {small && l == 0 ? 8 : 0, 2, 2, 1}}; /* layer 0 sparse in Phi-3-small */
            }
            decode_plan plans[2];
            for (int c = 0; c < 2; c++) { /* c = 0: portable reference, 1: the SIMD path under test */
                k[c] = calloc(n_cache, elem), v[c] = calloc(n_cache, elem);
                ks[c] = calloc(n_cache / HD, 2), vs[c] = calloc(n_cache / HD, 2);
                plans[c] = (decode_plan){.n_layers = LAYERS, .D = D, .H = H, .KV = KV, .hd = HD, .F = F, .n_ctx = CTX,
                                         .rot = small ? HD : HD / 2, /* Phi-3-small whole heads; else partial */
                                         .kv_kind = kind, .norm = small ? NORM_LAYER : NORM_RMS,
                                         .act = small ? ACT_GEGELU : ACT_SWIGLU, .eps = 1e-5f, .act_limit = 2.0f,
                                         .attn_scale = small ? 1.0f / HD : 1.0f / sqrtf((float)HD), .layers = layers,
                                         .k_cache = k[c], .v_cache = v[c], .k_scale = kind == KV_I8 ? ks[c] : NULL,
                                         .v_scale = kind == KV_I8 ? vs[c] : NULL};
                plans[c].scratch = malloc(sizeof(float) * decode_scratch_floats(&plans[c]));
            }
            for (size_t p = 1; p < sizeof PATH_NAMES / sizeof *PATH_NAMES; p++) {
                if (!path_available(PATH_NAMES[p])) continue;
                double worst = 0.0;
                for (int pos = 0; pos < 40; pos++) {
                    float h[2][D];
                    for (int i = 0; i < D; i++) h[0][i] = h[1][i] = rnd_gauss();
                    for (int i = 0; i < HD / 2; i++) cos[i] = cosf(0.1f * pos * (i + 1)), sin[i] = sinf(0.1f * pos * (i + 1));
                    restore_cache(k, v, ks, vs, n_cache, elem, HD); /* same cache */
                    CHECK(run_forward_rows(path_table("scalar"), 0, &plans[0], h[0], 1, cos, sin, pos) == 0,
                          "decode OOM");
                    CHECK(run_forward_rows(path_table(PATH_NAMES[p]), 1, &plans[1], h[1], 1, cos, sin, pos) == 0,
                          "decode OOM");
                    double scale = 0.0, err = 0.0;
                    for (int i = 0; i < D; i++) { /* plain compares: aarch64 gcc 12 ICEs vectorizing fmax here */
                        const double a = fabs(h[0][i]), e = fabs((double)h[0][i] - h[1][i]);
                        if (a > scale) scale = a;
                        if (e > err) err = e;
                    }
                    if (err / scale > worst) worst = err / scale;
                }
                /* int8 activations and the int8 cache may round one code differently per path */
                CHECK(worst < 2e-2, "decode step (%s, kv %d) on %s: max relative error %g vs portable",
                      small ? "phi3small" : "phi3", kind, PATH_NAMES[p], worst);
                check_rows_as_steps(PATH_NAMES[p], &plans[1], k, v, ks, vs, n_cache, elem, small, kind);
            }
            for (int c = 0; c < 2; c++) free(k[c]), free(v[c]), free(ks[c]), free(vs[c]), free(plans[c].scratch);
        }
    for (int l = 0; l < LAYERS; l++) {
        for (int m = 0; m < 4; m++) free(w[l][m]), free(bias[l][m]);
        for (int n = 0; n < 2; n++) free(norm_w[l][n]), free(norm_b[l][n]);
    }
}

/* The int8 activation rule written out once more (kernel.h: d = amax / 127, a subnormal d quantizes
 * to zeros, q = x / d rounded half away from zero) against the kernel's quantizers, which take
 * their AVX2 build where the CPU has one: codes, scales and sums bit for bit. Blocks: random,
 * all zero, below FLT_MIN, exact halves (x = (k + 0.5) d), signed zeros, wide magnitudes. */
static float ref_span(const float *x, int n, int8_t *q) {
    float amax = 0.0f;
    for (int i = 0; i < n; i++) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
    const float d = amax / 127.0f, id = d >= 1.17549435e-38f ? 1.0f / d : 0.0f;
    for (int i = 0; i < n; i++) {
        const float v = x[i] * id;
        q[i] = (int8_t)(int)(v + (signbit(v) ? -0.5f : 0.5f));
    }
    return d;
}

static void test_activation_quantizers(void) {
    enum { K = 1024 };
    static float x[K];
    static int8_t q[K];
    void *mem = NULL;
    if (posix_memalign(&mem, 64, act_bytes(K)) != 0) {
        CHECK(0, "activation test: out of memory");
        return;
    }
    q8_act a;
    act_bind(&a, mem, K);
    int bad32 = 0, bad256 = 0;
    for (int trial = 0; trial < 60; trial++) {
        for (int i = 0; i < K; i++) x[i] = rnd_gauss() * (float)(1 << (trial % 12));
        for (int i = 0; i < 32; i++) x[i] = 0.0f;
        for (int i = 32; i < 64; i++) x[i] *= 1e-38f;
        for (int i = 64; i < 96; i++) x[i] = ((float)i - 79.5f) * (127.0f / 16.5f);
        for (int i = 96; i < 128; i++) x[i] = -0.0f;
        quantize_act_32(x, K, &a);
        for (int b = 0; b < K / 32; b++) {
            const float d = ref_span(x + 32 * b, 32, q + 32 * b);
            int sum = 0;
            for (int i = 0; i < 32; i++) sum += q[32 * b + i];
            bad32 += memcmp(q + 32 * b, a.qs + 32 * b, 32) != 0 || d != a.d[b] || d * (float)sum != a.s[b];
        }
        quantize_act_256(x, K, &a);
        for (int b = 0; b < K / 256; b++) {
            const float d = ref_span(x + 256 * b, 256, q + 256 * b);
            bad256 += memcmp(q + 256 * b, a.qs + 256 * b, 256) != 0 || d != a.d[b];
            for (int j = 0; j < 16; j++) {
                int sum = 0;
                for (int i = 0; i < 16; i++) sum += q[256 * b + 16 * j + i];
                bad256 += sum != a.bsums[16 * b + j];
            }
        }
    }
    free(mem);
    CHECK(bad32 == 0, "activation quantizer, blocks of 32: %d blocks differ from the rule", bad32);
    CHECK(bad256 == 0, "activation quantizer, blocks of 256: %d blocks differ from the rule", bad256);
}

/* The gated activations as the model calls them (gated_act_row: the AVX2 / AVX-512 builds where
 * the CPU has them) against the baseline C (swiglu_row, gegelu_row), bit for bit, beyond exp's
 * clamps too. */
static void test_gated_activations(void) {
    enum { F = 4096 };
    static float gu[2 * F], want[F], got[F];
    int bad = 0;
    for (int trial = 0; trial < 16; trial++) {
        for (int i = 0; i < 2 * F; i++) gu[i] = rnd_gauss() * (float)(1 << (trial % 8)) * (trial % 3 ? 1.0f : 40.0f);
        swiglu_row(gu, F, want);
        gated_act_row(ACT_SWIGLU, gu, F, 0.0f, got);
        bad += memcmp(want, got, sizeof want) != 0;
        gegelu_row(gu, F, 20.0f, want);
        gated_act_row(ACT_GEGELU, gu, F, 20.0f, got);
        bad += memcmp(want, got, sizeof want) != 0;
    }
    CHECK(bad == 0, "gated activation: %d of 32 rows differ from the baseline C", bad);
}

int main(int argc, char **argv) {
    printf("features: %s\npaths: %s\n", cpu_features_string(), available_paths_string());
    if (argc > 1)
        CHECK(strcmp(argv[1], available_paths_string()) == 0, "expected paths '%s', got '%s'", argv[1],
              available_paths_string());
    const int types[] = {GT_Q4_0, GT_Q4_1, GT_Q8_0, GT_Q4_K, GT_Q6_K};
    for (int i = 0; i < 5; i++) {
        test_type(types[i], 0);
        if (packed_type_of(types[i])) test_type(types[i], 1);
    }
    test_activation_quantizers();
    test_gated_activations();
    test_attention();
    test_decode_step();
    printf("%s (%d failures)\n", failures ? "FAILED" : "ALL PASSED", failures);
    return failures ? 1 : 0;
}
