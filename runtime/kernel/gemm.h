/* The register-tiled batched path (prefill): Y[M, rows] = X[M, K] . W[rows, K]^T.
 *
 * Both operands are brought once per call into a layout the micro-kernel reads with plain loads:
 *   - activations (gemm.c, any type): each row quantized as for the matvec (int8, per-32 or per-256
 *     scale), stored +128 as uint8 and interleaved by lane groups of `lanes` rows: for every 4
 *     consecutive values k..k+3 one 4-byte slot per activation row, so one vector load holds the
 *     same 4 values of `lanes` rows;
 *   - weights (per thread, `rows` of them at a time, kept in L1): every block type decoded to signed
 *     int8 codes + one float scale per sub-block (+ one float min per 32 values for Q4_1 / Q4_K)
 *     + the integer correction -128 * sum(codes) of each sub-block that undoes the +128 of the
 *     activations (kernels that multiply signed activations leave it unused). The tile's layout is
 *     the kernel's own, written by its `decode` and read by its `tile`: row-major (scalar, AVX-512:
 *     codes in value order per row, factors [row][sub-block]) or interleaved (NEON: see gemm_neon.c).
 * The micro-kernel then runs `vpdpbusd` / `sdot` style 4-value int8 dot products: a 4-code group of
 * weight rows times the 4-value slots of `lanes` activation rows, so each code loaded serves several
 * activations and each activation vector serves several rows. The integer sums are exactly the
 * matvec's; only the float summation order differs.
 *
 *   weight value = scale_j * q + min_j        (min only for Q4_1 / Q4_K)
 *   sub-block sb = 32 values (16 for Q6_K);   activation block ab = 32 (256 for the K-quants)
 */
#ifndef POCKETLM_GEMM_H
#define POCKETLM_GEMM_H

#include "kernel.h"

typedef struct {
    int K, rows;    /* rows: the kernel's rows per tile */
    int8_t *q;      /* [rows * K] codes */
    float *scale;   /* [rows * K / sb] */
    float *minv;    /* [rows * K / 32] (types with a min; else unused) */
    int32_t *corr;  /* [rows * K / sb]: -128 * sum of a sub-block's codes (u8-activation kernels) */
    /* one row decoded in value order, for kernels that interleave rows: */
    int8_t *row_q;
    float *row_scale, *row_minv;
    int32_t *row_corr;
} wtile;

/* One group of `lanes` activation rows (rows past M are zeros). */
typedef struct {
    const uint8_t *qs; /* [K / 4][lanes][4]: int8 value + 128 */
    const float *d;    /* [K / ab][lanes]: activation scale */
    const float *xs;   /* [K / 32][lanes]: sum of the 32 int8 values, times d when ab == 32 */
} agroup;

typedef struct {
    int sb, ab, has_min;
} gemm_shape;

struct gemm_kernel {
    const char *name;
    int rows;  /* weight rows per tile */
    int lanes; /* activation rows per group */
    /* Decode weight row `row` (raw bytes of type t, length K) into tile row r of w. */
    void (*decode)(const gtype_info *t, const uint8_t *row, int K, int r, wtile *w);
    /* out[r * lanes + l] = dot of tile row r with group row l, for r < rows, l < lanes. */
    void (*tile)(const wtile *w, const agroup *a, gemm_shape s, float *out);
    /* NULL: every type; else 0 for types that keep the row-by-row batched path */
    int (*supports)(const gtype_info *t);
};

gemm_shape gemm_shape_of(const gtype_info *t);

/* A kernel's `tile`: one instantiation of its tile_32(w, a, has_min, out) / tile_k(w, a, sb, has_min,
 * out) bodies per shape, so that every loop bound is a constant. */
#define GEMM_DEFINE_TILE(name, attrs)                                                              \
    attrs static void name(const wtile *w, const agroup *a, gemm_shape s, float *out) {           \
        if (s.ab == 32) {                                                                          \
            if (s.has_min)                                                                         \
                tile_32(w, a, 1, out);                                                             \
            else                                                                                   \
                tile_32(w, a, 0, out);                                                             \
        } else if (s.sb == 16) {                                                                   \
            tile_k(w, a, 16, 0, out);                                                              \
        } else {                                                                                   \
            tile_k(w, a, 32, 1, out);                                                              \
        }                                                                                          \
    }

/* The decoding of one weight row into codes q[K] in value order, scale[K/sb], minv[K/32] and
 * corr[K/sb]; written once (static inline) so that each path compiles it with its own target
 * flags. Semantics as in dot_scalar.c. */
static inline __attribute__((always_inline)) void gemm_decode_row(const gtype_info *t, const uint8_t *row, int K,
                                                                  int8_t *q, float *scale, float *minv,
                                                                  int32_t *corr) {
    const int sb = t->gtype == GT_Q6_K ? 16 : 32, nsb = K / sb;
    switch (t->gtype) {
    case GT_Q4_0:
        for (int b = 0; b < K / 32; b++) {
            const uint8_t *blk = row + (size_t)b * 18;
            for (int l = 0; l < 16; l++) {
                q[32 * b + l] = (int8_t)((blk[2 + l] & 0xF) - 8);
                q[32 * b + 16 + l] = (int8_t)((blk[2 + l] >> 4) - 8);
            }
            scale[b] = fp16_to_fp32(read_u16(blk));
        }
        break;
    case GT_Q4_0_PACKED:
    case GT_Q8_0_PACKED:
    case GT_Q4_K_PACKED: /* kernel.h: code k of sub-block b is byte 4b + k % 4 of code vector k / 4 */
        for (int g = 0; g < K / PACK_VALUES; g++) {
            const int q8 = t->gtype == GT_Q8_0_PACKED, gbytes = q8 ? 544 : 288;
            const uint8_t *grp = row + (size_t)g * gbytes;
            uint8_t sc[16], m[16];
            if (t->gtype == GT_Q4_K_PACKED) {
                q4k_scales_mins(grp + 8, sc, m);
                q4k_scales_mins(grp + 20, sc + 8, m + 8);
            }
            for (int b = 0; b < 16; b++) {
                int8_t *o = q + PACK_VALUES * g + 32 * b;
                for (int k = 0; k < 32; k++) {
                    const int v = k / 4, at = 4 * b + k % 4;
                    o[k] = q8 ? (int8_t)(grp[32 + 64 * v + at] - 128)
                              : (int8_t)(((grp[32 + 64 * (v / 2) + at] >> (4 * (v % 2))) & 0xF) -
                                         (t->gtype == GT_Q4_0_PACKED ? 8 : 0));
                }
                const int j = 16 * g + b;
                if (t->gtype == GT_Q4_K_PACKED) {
                    scale[j] = fp16_to_fp32(read_u16(grp + 2 * (b / 8))) * (float)sc[b];
                    minv[j] = -fp16_to_fp32(read_u16(grp + 4 + 2 * (b / 8))) * (float)m[b];
                } else {
                    scale[j] = fp16_to_fp32(read_u16(grp + 2 * b));
                }
            }
        }
        break;
    case GT_Q4_1:
        for (int b = 0; b < K / 32; b++) {
            const uint8_t *blk = row + (size_t)b * 20;
            for (int l = 0; l < 16; l++) {
                q[32 * b + l] = (int8_t)(blk[4 + l] & 0xF);
                q[32 * b + 16 + l] = (int8_t)(blk[4 + l] >> 4);
            }
            scale[b] = fp16_to_fp32(read_u16(blk));
            minv[b] = fp16_to_fp32(read_u16(blk + 2));
        }
        break;
    case GT_Q8_0:
        for (int b = 0; b < K / 32; b++) {
            const uint8_t *blk = row + (size_t)b * 34;
            memcpy(q + 32 * b, blk + 2, 32);
            scale[b] = fp16_to_fp32(read_u16(blk));
        }
        break;
    case GT_Q4_K:
        for (int b = 0; b < K / 256; b++) {
            const uint8_t *blk = row + (size_t)b * 144, *qs = blk + 16;
            const float d = fp16_to_fp32(read_u16(blk)), dmin = fp16_to_fp32(read_u16(blk + 2));
            uint8_t sc[8], m[8];
            q4k_scales_mins(blk + 4, sc, m);
            for (int c = 0; c < 4; c++) {
                int8_t *o = q + 256 * b + 64 * c;
                for (int l = 0; l < 32; l++) {
                    o[l] = (int8_t)(qs[32 * c + l] & 0xF);
                    o[32 + l] = (int8_t)(qs[32 * c + l] >> 4);
                }
            }
            for (int j = 0; j < 8; j++) {
                scale[8 * b + j] = d * (float)sc[j];
                minv[8 * b + j] = -dmin * (float)m[j];
            }
        }
        break;
    case GT_Q6_K:
        for (int b = 0; b < K / 256; b++) {
            const uint8_t *blk = row + (size_t)b * 210;
            const int8_t *sc = (const int8_t *)(blk + 192);
            const float d = fp16_to_fp32(read_u16(blk + 208));
            for (int h = 0; h < 2; h++) {
                const uint8_t *ql = blk + 64 * h, *qh = blk + 128 + 32 * h;
                for (int k = 0; k < 4; k++) {
                    int8_t *o = q + 256 * b + 128 * h + 32 * k;
                    const uint8_t *lo = ql + 32 * (k & 1);
                    const int shift = 4 * (k >> 1);
                    for (int l = 0; l < 32; l++)
                        o[l] = (int8_t)((((lo[l] >> shift) & 0xF) | (((qh[l] >> (2 * k)) & 3) << 4)) - 32);
                }
            }
            for (int j = 0; j < 16; j++) scale[16 * b + j] = d * (float)sc[j];
        }
        break;
    }
    for (int j = 0; j < nsb; j++) {
        int s = 0;
        for (int l = 0; l < sb; l++) s += q[sb * j + l];
        corr[j] = -128 * s;
    }
}

#endif
