/* ARM64 dotprod micro-kernel of the batched path (gemm.h): 8 weight rows x 4 activation rows per
 * tile, with the lane form of `sdot`: one 16-byte register holds the same 4 values of 4 weight rows
 * (the tile is interleaved that way at decode), another the 4-value slots of the 4 activation rows
 * (the panel's layout, +128 undone with one XOR), and `sdot v.4s, w.16b, a.4b[l]` adds 4 rows x
 * activation l. Per 4 values: 3 loads, 1 XOR, 8 `sdot`; per 32-value sub-block 3 float ops per
 * accumulator. 8 integer + 8 float accumulators (+ 8 partial sums for the K-quants) in the 32
 * NEON registers. Selected by the neon_dotprod and neon_i8mm paths (dispatch.c). */
#include "gemm.h"

#if defined(POCKETLM_ARM64)
#include <arm_neon.h>

#if defined(__clang__)
#define TARGET __attribute__((target("dotprod")))
#else
#define TARGET __attribute__((target("arch=armv8.2-a+dotprod")))
#endif
#define INLINE static inline __attribute__((always_inline)) TARGET
#define ROWS 8
#define LANES 4

/* acc += w (4 rows x 4 values) . lane l of a (4 values of activation l); l a literal 0..3. */
#if defined(__ARM_FEATURE_DOTPROD) || !defined(__clang__) || __clang_major__ >= 16
#define SDOT_LANE(acc, w, a, l) vdotq_laneq_s32(acc, w, a, l)
#else /* older clang declares the intrinsic only under -march=...+dotprod */
#define SDOT_LANE(acc, w, a, l)                                                                    \
    ({                                                                                             \
        int32x4_t r_ = (acc);                                                                      \
        __asm__("sdot %0.4s, %1.16b, %2.4b[" #l "]" : "+w"(r_) : "w"(w), "w"(a));                  \
        r_;                                                                                        \
    })
#endif

/* Interleaved tile: codes [K/4][ROWS][4] (4 values of each row in turn), factors [sub-block][ROWS]. */
TARGET static void decode_neon(const gtype_info *t, const uint8_t *row, int K, int r, wtile *w) {
    const int nsb = K / (t->gtype == GT_Q6_K ? 16 : 32);
    gemm_decode_row(t, row, K, w->row_q, w->row_scale, w->row_minv, w->row_corr);
    for (int c = 0; c < K / 4; c++) memcpy(w->q + ((size_t)c * ROWS + r) * 4, w->row_q + 4 * c, 4);
    for (int j = 0; j < nsb; j++) w->scale[j * ROWS + r] = w->row_scale[j];
    for (int j = 0; j < K / 32; j++) w->minv[j * ROWS + r] = w->row_minv[j];
}

/* P[h][l] (rows 4h..4h+3, activation l) = integer dots of sub-block j (sb values). */
INLINE void subblock_dots(const wtile *w, const agroup *a, int sb, int j, int32x4_t P[2][LANES]) {
    const uint8x16_t flip = vdupq_n_u8(0x80);
    for (int h = 0; h < 2; h++)
        for (int l = 0; l < LANES; l++) P[h][l] = vdupq_n_s32(0);
    const uint8_t *ap = a->qs + (size_t)j * (sb / 4) * LANES * 4;
    const int8_t *wq = w->q + (size_t)j * (sb / 4) * ROWS * 4;
    for (int c = 0; c < sb / 4; c++, ap += LANES * 4, wq += ROWS * 4) {
        const int8x16_t x = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(ap), flip)); /* back to int8 */
        const int8x16_t w0 = vld1q_s8(wq), w1 = vld1q_s8(wq + 16);
        P[0][0] = SDOT_LANE(P[0][0], w0, x, 0);
        P[0][1] = SDOT_LANE(P[0][1], w0, x, 1);
        P[0][2] = SDOT_LANE(P[0][2], w0, x, 2);
        P[0][3] = SDOT_LANE(P[0][3], w0, x, 3);
        P[1][0] = SDOT_LANE(P[1][0], w1, x, 0);
        P[1][1] = SDOT_LANE(P[1][1], w1, x, 1);
        P[1][2] = SDOT_LANE(P[1][2], w1, x, 2);
        P[1][3] = SDOT_LANE(P[1][3], w1, x, 3);
    }
}

INLINE void store_tile(float32x4_t acc[2][LANES], float *out) {
    for (int h = 0; h < 2; h++)
        for (int l = 0; l < LANES; l++) {
            float v[4];
            vst1q_f32(v, acc[h][l]);
            for (int i = 0; i < 4; i++) out[(4 * h + i) * LANES + l] = v[i];
        }
}

/* Activation scale per sub-block (Q4_0, Q4_1, Q8_0, packed Q4_0). */
INLINE void tile_32(const wtile *w, const agroup *a, int has_min, float *out) {
    const int K = w->K, nsb = K / 32;
    float32x4_t acc[2][LANES];
    for (int h = 0; h < 2; h++)
        for (int l = 0; l < LANES; l++) acc[h][l] = vdupq_n_f32(0.0f);
    for (int j = 0; j < nsb; j++) {
        int32x4_t P[2][LANES];
        subblock_dots(w, a, 32, j, P);
        for (int h = 0; h < 2; h++) {
            const float32x4_t s = vld1q_f32(w->scale + j * ROWS + 4 * h);
            const float32x4_t m = has_min ? vld1q_f32(w->minv + j * ROWS + 4 * h) : vdupq_n_f32(0.0f);
            for (int l = 0; l < LANES; l++) {
                acc[h][l] = vfmaq_f32(acc[h][l], vcvtq_f32_s32(P[h][l]), vmulq_n_f32(s, a->d[j * LANES + l]));
                if (has_min) acc[h][l] = vfmaq_n_f32(acc[h][l], m, a->xs[j * LANES + l]);
            }
        }
    }
    store_tile(acc, out);
}

/* K-quants: activation scale per 256 values, applied once per super-block to a partial sum. */
INLINE void tile_k(const wtile *w, const agroup *a, int sb, int has_min, float *out) {
    const int K = w->K, per = QK_K / sb;
    float32x4_t acc[2][LANES];
    for (int h = 0; h < 2; h++)
        for (int l = 0; l < LANES; l++) acc[h][l] = vdupq_n_f32(0.0f);
    for (int b = 0; b < K / QK_K; b++) {
        float32x4_t part[2][LANES];
        for (int h = 0; h < 2; h++)
            for (int l = 0; l < LANES; l++) part[h][l] = vdupq_n_f32(0.0f);
        for (int jj = 0; jj < per; jj++) {
            const int j = b * per + jj;
            int32x4_t P[2][LANES];
            subblock_dots(w, a, sb, j, P);
            for (int h = 0; h < 2; h++) {
                const float32x4_t s = vld1q_f32(w->scale + j * ROWS + 4 * h);
                const float32x4_t m = has_min ? vld1q_f32(w->minv + j * ROWS + 4 * h) : vdupq_n_f32(0.0f);
                for (int l = 0; l < LANES; l++) {
                    part[h][l] = vfmaq_f32(part[h][l], vcvtq_f32_s32(P[h][l]), s);
                    if (has_min) part[h][l] = vfmaq_n_f32(part[h][l], m, a->xs[j * LANES + l]);
                }
            }
        }
        for (int h = 0; h < 2; h++)
            for (int l = 0; l < LANES; l++) acc[h][l] = vfmaq_n_f32(acc[h][l], part[h][l], a->d[b * LANES + l]);
    }
    store_tile(acc, out);
}

GEMM_DEFINE_TILE(tile_neon, TARGET)

const gemm_kernel gemm_neon_dotprod = {"neon_dotprod", ROWS, LANES, decode_neon, tile_neon, NULL};

#endif
