/* pocketlm quantized matmul kernel: shared declarations.
 *
 * y[N] = W[N, K] . x[K] with W in GGUF block formats (raw bytes, rows of blocks, as stored in the
 * file). The activation x is quantized once per matmul to int8 (per-32 scale for Q4_0/Q4_1/Q8_0,
 * per-256 scale with per-16 sums for the K-quants) and each row is dotted in integer arithmetic.
 *
 * Files: module.c (Python binding, argument checks), dispatch.c (CPU features, path choice),
 * types.c (type table, fp16, empty/corrupt block tests, Q4_0 repacking), q8_activations.c,
 * matmul.c (drivers), gemm.h + gemm.c + gemm_avx2.c + gemm_avx512.c + gemm_neon.c (the register-tiled batched path
 * for prefill), decode.c (one decode step through every layer), rowops.c (prefill's element-wise steps),
 * attention.c (decode and prompt attention over the KV cache, dense / window / block-sparse), threadpool.c,
 * dot_scalar.c (the reference), dot_avx2.c, dot_avx512.c,
 * dot_neon.c + dot_neon_body.h (plain NEON, dotprod, i8mm), selftest.c + cross_test_arm64.sh
 * (standalone test for cross-builds).
 */
#ifndef POCKETLM_KERNEL_H
#define POCKETLM_KERNEL_H

#include <stddef.h>
#include <stdint.h>
#include <math.h>
#include <string.h>

/* GGML type ids as stored in GGUF. */
enum { GT_Q4_0 = 2, GT_Q4_1 = 3, GT_Q8_0 = 8, GT_Q4_K = 12, GT_Q6_K = 14 };
/* pocketlm's own load-time repacked layouts (not GGUF types; ids outside GGML's range), the same
 * bytes per weight as their source type. One group = 16 sub-blocks of 32 values (512 values) laid
 * out so that int32 lane b (0..15) of a 512-bit register -- or lane b % 4 of the b / 4-th 128-bit
 * one -- holds sub-block b: a `vpdpbusd` / `sdot` chain over the group's 8 code vectors leaves one
 * sub-block's integer dot per lane, converted to float once per 32 values, with the scales
 * applied as 16-lane vectors (no per-block broadcasts or permutes).
 *   Q4_0_PACKED (288 B = 16 Q4_0 blocks): bytes 0..31 the 16 fp16 scales d[b]; then 4 chunks of
 *     64 bytes: byte 4b + i of chunk c holds value 8c + i of block b in its low nibble and value
 *     8c + 4 + i in its high nibble (codes 0..15 as in Q4_0: x = d * (q - 8)).
 *   Q8_0_PACKED (544 B = 16 Q8_0 blocks): bytes 0..31 the 16 fp16 scales; then 8 chunks of 64
 *     bytes: byte 4b + i of chunk v holds code 4v + i of block b plus 128, as uint8
 *     (x = d * (u - 128)).
 *   Q4_K_PACKED (288 B = 2 Q4_K super-blocks s = 0, 1): bytes 0..7 fp16 d0, d1, dmin0, dmin1;
 *     8..19 and 20..31 the 12 scale/min bytes of super-block 0 and 1 as in Q4_K; then 4 chunks of
 *     64 bytes as Q4_0_PACKED, where "block" b is sub-block b % 8 of super-block b / 8
 *     (x = d_s * sc_j * q - dmin_s * m_j).
 * So vector v (0..7) of a group -- chunk v / 2, low nibbles for even v, high for odd (Q4), chunk v
 * (Q8) -- holds values 4v..4v+3 of every sub-block, and the activation is interleaved the same
 * way once per matvec (q8_act.qs16). Rows of K values hold K / 512 groups (K % 512 == 0). */
#define GT_Q4_0_PACKED 1002
#define GT_Q8_0_PACKED 1008
#define GT_Q4_K_PACKED 1012
#define PACK_VALUES 512 /* values per packed group */

/* Dense slot of each supported type in the per-path function tables. */
enum { SLOT_Q4_0, SLOT_Q4_1, SLOT_Q8_0, SLOT_Q4_K, SLOT_Q6_K, SLOT_Q4_0_PACKED, SLOT_Q8_0_PACKED, SLOT_Q4_K_PACKED,
       N_SLOTS };

#define QK 32    /* values per block of Q4_0 / Q4_1 / Q8_0 and per activation block */
#define QK_K 256 /* values per K-quant super-block */

typedef struct {
    int gtype;        /* GGML type id */
    int slot;         /* SLOT_* */
    int block_values; /* 32, 256, or 512 (packed groups) */
    int block_bytes;  /* 18, 20, 34, 144, 210; packed 288, 544 */
    int act_block;    /* activation block: 32 (Q8_0-style) or 256 (Q8_K-style) */
} gtype_info;

/* NULL if the type is not supported by the kernel. */
const gtype_info *kernel_type_info(int gtype);

/* The int8 activation of one input row of length K.
 * 32-block types: d[K/32], s[K/32] = d * sum(qs of the block) (for the offset/min terms).
 * K-quants:       d[K/256], bsums[K/16] = integer sums of qs over each 16 values.
 * Packed types (act_prepare_packed, after quantizing): qs16 = qs interleaved as the packed
 * groups' code vectors (qs16[512g + 64v + 4b + i] = qs[512g + 32b + 4v + i]); d32[K/32] the
 * scale of each 32 values and s[K/32] = d32 * their sum (K-quants too); for Q4_0_PACKED and
 * Q8_0_PACKED also off32[K/32], the integer code-offset terms. */
typedef struct {
    int K;
    int8_t *qs;     /* [K], natural order */
    float *d;       /* activation scale per block */
    float *s;       /* [K/32] (32-block and packed types) */
    int16_t *bsums; /* [K/16] (K-quants only) */
    int8_t *qs16;   /* [K] packed types only */
    float *d32;     /* [K/32] packed types only (== d for 32-value activation blocks) */
    int32_t *off32; /* [K/32] Q4_0_PACKED, Q8_0_PACKED only: -c * the integer sum of each 32 values,
                     * c the codes' offset (8 for Q4_0's q - 8, 128 for Q8_0 codes stored + 128):
                     * added to an integer dot of the stored codes, it gives the signed codes' */
} q8_act;

/* Quantize x[K] (K % 32 == 0 resp. % 256 == 0) into a; a's arrays must be sized for K. */
void quantize_act_32(const float *x, int K, q8_act *a);
void quantize_act_256(const float *x, int K, q8_act *a);
/* Bytes needed for the arrays of one activation row of length K (one allocation, see act_bind). */
size_t act_bytes(int K);
void act_bind(q8_act *a, void *mem, int K);
/* For a packed weight type t: fill qs16, d32 (and s for K-quants, off32 for Q4_0_PACKED and
 * Q8_0_PACKED) of an activation already quantized. */
void act_prepare_packed(const gtype_info *t, q8_act *a);
static inline int is_packed_type(int gtype) {
    return gtype == GT_Q4_0_PACKED || gtype == GT_Q8_0_PACKED || gtype == GT_Q4_K_PACKED;
}

/* Dot of one weight row (nb blocks of raw GGUF bytes, or nb packed groups) with the activation. */
typedef float (*dot_fn)(const uint8_t *row, const q8_act *a, int nb);

/* Several weight rows times several activations (a verify's or a short prompt's batch): out[m *
 * out_stride + r] = row r (at row + r * row_bytes) . acts[m] for r < nrows, m < nacts (any counts
 * >= 1). The kernel blocks rows and activations to its registers: each weight vector is loaded and
 * unpacked once per block of activations and applied to all of them, each activation vector once
 * per block of rows. Every result is bit-identical to the dot_fn the path's table resolves for the
 * slot (the same integer lanes, the same float operations per lane in the same order), so M
 * activations give exactly the M matvecs' results (a verify's logits are the decode steps'). */
typedef void (*dotacts_fn)(const uint8_t *row, size_t row_bytes, int nrows, const q8_act *acts, int nacts, int nb,
                           float *out, size_t out_stride);

/* A dotacts_fn as blocks of at most rmax rows times at most amax activations, each one call of
 * `block` (a dotacts_fn for those bounds, typically a switch to bodies of constant size): per block
 * of rows, the activations in near-equal blocks (9 = 3 + 3 + 3, not 4 + 4 + 1: every block shares
 * its weight vectors as widely as the others). */
static inline void dotacts_blocks(dotacts_fn block, int rmax, int amax, const uint8_t *row, size_t row_bytes, int nrows,
                                  const q8_act *acts, int nacts, int nb, float *out, size_t out_stride) {
    const int nblocks = (nacts + amax - 1) / amax;
    for (int r = 0; r < nrows; r += rmax)
        for (int b = 0; b < nblocks; b++) {
            const int m0 = nacts * b / nblocks, m1 = nacts * (b + 1) / nblocks;
            block(row + (size_t)r * row_bytes, row_bytes, nrows - r < rmax ? nrows - r : rmax, acts + m0, m1 - m0, nb,
                  out + (size_t)m0 * out_stride + r, out_stride);
        }
}

/* Two weight rows times two activation rows at once (ARM i8mm `smmla` computes a 2x2 int8 product):
 * out[2*r + m] = row_r . act_m for r, m in {0, 1}. Used by the batched (prefill) driver. */
typedef void (*dot2x2_fn)(const uint8_t *row0, const uint8_t *row1, const q8_act *a0, const q8_act *a1,
                          int nb, float out[4]);

/* gemm.h: a path's register-tiled batched micro-kernel (optional). */
typedef struct gemm_kernel gemm_kernel;

typedef struct {
    const char *name;
    dot_fn dot[N_SLOTS]; /* NULL entries are filled from the fallback path at init */
    const char *fallback;
    dot2x2_fn dot2x2[N_SLOTS]; /* optional, the path's own only */
    /* optional: the path's own entry, else the one of the path its dot comes from; an own entry
     * must reproduce the resolved dot (avx512's packed ones reproduce the AVX2 dots it uses) */
    dotacts_fn dotacts[N_SLOTS];
    /* with each dotacts entry: the batch size M from which the path's tiled kernel (gemm) is the
     * faster one, measured (0: GEMM_MIN_M) */
    int acts_gemm_from[N_SLOTS];
    /* with each dotacts entry: 1 if it also runs the slot's matvecs (one activation; bit for bit the
     * dot, so only where it was measured faster streaming the weights from DRAM) */
    int acts_matvec[N_SLOTS];
    const gemm_kernel *gemm;   /* optional, the path's own only: the batched path for M >= GEMM_MIN_M */
} kernel_path;

extern const kernel_path path_scalar;
extern const gemm_kernel gemm_scalar;
#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#define POCKETLM_X86 1
extern const kernel_path path_avx2;
extern const kernel_path path_avx512;
extern const gemm_kernel gemm_avx512;
extern const gemm_kernel gemm_avx2;
#endif
#if defined(__aarch64__)
#define POCKETLM_ARM64 1
extern const kernel_path path_neon;
extern const kernel_path path_neon_dotprod;
extern const kernel_path path_neon_i8mm;
extern const gemm_kernel gemm_neon_dotprod;
#endif

/* dispatch.c: CPU features and the table of usable paths. */
const char *cpu_features_string(void); /* space-separated, e.g. "avx2 fma f16c avx512f ..." */
int path_available(const char *name);  /* 1 if the CPU runs it and it is compiled in */
#if defined(POCKETLM_X86)
/* 1 if the CPU and OS run the avx2 / avx512 path (cpuid + register-state check, cached): for
 * element-wise code built for them from the same C, bit for bit the baseline's, whatever path the
 * matmuls take. */
int cpu_has_avx2(void);
int cpu_has_avx512(void);
#endif
const char *available_paths_string(void);
const char *path_static_name(const char *name); /* the path's own (static) name string, or NULL */
const char *best_path_name(void);
/* Resolved function table for the named path (fallbacks filled); NULL if unavailable. */
const dot_fn *path_table(const char *name);
const dot2x2_fn *path_table2x2(const char *name); /* the path's 2x2 kernels (entries may be NULL) */
/* Likewise the multi-activation kernels, each with the batch size from which run_matmul takes the
 * tiled path instead (GEMM_MIN_M where the path gave none). */
typedef struct {
    dotacts_fn fn[N_SLOTS]; /* NULL: none for the slot */
    int gemm_from[N_SLOTS];
    int matvec[N_SLOTS];    /* 1: run_matvec takes fn too (kernel_path.acts_matvec) */
} acts_table;
const acts_table *path_acts_table(const dot_fn *table);
const gemm_kernel *path_gemm(const char *name);     /* the path's batched micro-kernel or NULL */

/* fp16 <-> fp32, portable. */
float fp16_to_fp32(uint16_t h);
static inline uint16_t read_u16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

/* Q4_K: 6-bit scale and min of sub-block j (0..7) from the 12 packed bytes. */
static inline void q4k_scale_min(int j, const uint8_t *q, uint8_t *sc, uint8_t *m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (uint8_t)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *m = (uint8_t)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

/* types.c: the packed type of a GGUF type (Q4_0, Q8_0, Q4_K), or 0; repack n_groups groups of
 * src (raw blocks of gtype, whole rows: K % 512 == 0) into dst (same size). 0, or -1 if gtype has
 * no packed layout. */
int packed_type_of(int gtype);
int repack_groups(int gtype, const uint8_t *src, uint8_t *dst, size_t n_groups);

/* Software prefetch PREFETCH_BYTES ahead in a row's stream of blocks (this machine's hardware
 * prefetchers alone leave the matvec short of the memory bandwidth); rows are contiguous, so
 * near a row's end it fetches the next row's start. i counts blocks of bsz bytes. */
#define PREFETCH_BYTES 1024
static inline void prefetch_ahead(const uint8_t *row, int i, int bsz) {
    __builtin_prefetch(row + (size_t)i * bsz + PREFETCH_BYTES);
}

/* Q4_K: all 8 scales (sc[0..7]) and mins (m[0..7]) at once, word-parallel (same values as
 * q4k_scale_min): with w0, w1, w2 the 12 bytes as little-endian u32, sc[0..3] = w0 & 63,
 * m[0..3] = w1 & 63, sc[4..7] = (w2 & 15) | (w0 >> 6) << 4, m[4..7] = (w2 >> 4 & 15) | (w1 >> 6) << 4,
 * byte-wise. */
typedef struct {
    uint32_t sc_lo, sc_hi, m_lo, m_hi; /* bytes sc[0..3], sc[4..7], m[0..3], m[4..7] */
} q4k_words;
static inline q4k_words q4k_scale_words(const uint8_t *q) {
    uint32_t w[3];
    memcpy(w, q, 12);
    const q4k_words o = {w[0] & 0x3F3F3F3Fu, (w[2] & 0x0F0F0F0Fu) | (((w[0] >> 6) & 0x03030303u) << 4),
                         w[1] & 0x3F3F3F3Fu, ((w[2] >> 4) & 0x0F0F0F0Fu) | (((w[1] >> 6) & 0x03030303u) << 4)};
    return o;
}
static inline void q4k_scales_mins(const uint8_t *q, uint8_t sc[8], uint8_t m[8]) {
    const q4k_words o = q4k_scale_words(q);
    memcpy(sc, &o.sc_lo, 4);
    memcpy(sc + 4, &o.sc_hi, 4);
    memcpy(m, &o.m_lo, 4);
    memcpy(m + 4, &o.m_hi, 4);
}

/* Q4_K's min term of one super-block: sum_j m_j * (bsums[2j] + bsums[2j+1]) (8 products). */
static inline int q4k_min_sum(const int16_t *bsums, const uint8_t m[8]) {
    int s = 0;
    for (int j = 0; j < 8; j++) s += m[j] * (bsums[2 * j] + bsums[2 * j + 1]);
    return s;
}

/* types.c: block inspection done once at load. */
/* 1 if a scale field of the block is NaN or infinite. */
int block_is_bad(const gtype_info *t, const uint8_t *blk);

/* matmul.c: the drivers (thread split, activation quantization). Return 0 or -1 on OOM. */
int run_matvec(const dot_fn *table, const gtype_info *t, const uint8_t *w, int rows, int K,
               const float *x, float *y);
/* Batched: the tiled path (gemm.c) where the path has one and M >= GEMM_MIN_M (with a
 * multi-activation kernel for the type: M >= its gemm_from), else the multi-activation kernel
 * (dotacts_fn: bit-identical to M matvecs), else row by row. */
#define GEMM_MIN_M 16
int run_matmul(const dot_fn *table, const dot2x2_fn *table2, const gemm_kernel *gemm, const gtype_info *t,
               const uint8_t *w, int rows, int K, const float *X, int M, float *Y);
/* gemm.c: the tiled batched path. Returns 0 or -1 on OOM. gemm_supports: whether gk runs type t. */
int gemm_supports(const gemm_kernel *gk, const gtype_info *t);
int run_gemm(const gemm_kernel *gk, const gtype_info *t, const uint8_t *w, int rows, int K, const float *X, int M,
             float *Y);

/* attention.c: attention of T query rows over one layer's KV cache: decode (T = 1) and prompt
 * chunks (T > 1; their keys and values are already in the cache), dense causal, sliding window and
 * block-sparse (Phi-3-small, pocketlm/blocksparse.py).
 * q: T rows of H * hd float32 (query head h at columns h*hd..h*hd+hd-1), row stride q_stride >= H*hd
 * floats (the fused qkv rows [T, (H+2KV)*hd] can be passed as they are); k, v: [KV, n_ctx, hd] in
 * the KVCache layout, of element kind KV_F32, KV_F16 or KV_I8 (int8 codes with one fp16 scale per
 * head and position: k_scale, v_scale [KV, n_ctx]; NULL otherwise); H % KV == 0 (query head h
 * reads kv head h / (H / KV)); row t is at position pos + t (0 <= pos, pos + T <= n_ctx) and sees
 * keys j <= pos + t, j > pos + t - window if window > 0, and, if sparse != NULL, only the key
 * blocks its head sees from its query block (with ib = p / block, jb = j / block:
 * jb <= ib and (ib - jb < local_blocks or (jb + h * head_step + 1) % vert_stride == 0));
 * scores q.k * scale (1/sqrt(hd) for Phi-3, 1/hd for Phi-3-small); out [T, H*hd] float32 (must
 * not overlap q, k, v). Only the visible key blocks are read.
 * simd = 0 selects the portable C (the scalar path), otherwise F16C/AVX2 on x86 or NEON on ARM64.
 * Returns 0, -1 when a work item's scratch cannot be allocated, -2 on arguments that
 * attention_args_error rejects (it returns the reason, or NULL when they are valid; it cannot
 * check buffer lengths: the caller does). */
enum { KV_F32 = 0, KV_F16 = 1, KV_I8 = 2 };
typedef struct {
    int block, local_blocks, vert_stride, head_step; /* tokens per block; blocks; blocks; heads' shift */
} block_sparse;
typedef struct {
    const float *q;
    int q_stride;                      /* floats between query rows */
    const void *k, *v;                 /* one layer's cache [KV, n_ctx, hd] */
    const uint16_t *k_scale, *v_scale; /* KV_I8: fp16 [KV, n_ctx]; else NULL */
    float *out;                        /* [T, H*hd] */
    int H, KV, hd, n_ctx, kind, T, pos, window;
    float scale;
    const block_sparse *sparse; /* NULL: dense (or window only) */
} attention_args;
const char *attention_args_error(const attention_args *a);
int run_attention(const attention_args *a, int simd);

/* decode.c: one token through every layer (see decode.c), for either architecture of the model
 * description (pocketlm/config.py): quantized linears with optional biases, RMSNorm or LayerNorm,
 * SwiGLU or GeGELU, dense / sliding-window / block-sparse attention per layer, over an fp16 / fp32 /
 * int8 KV cache [n_layers, KV, n_ctx, hd]. All sizes are checked by the binding when the plan is built. */
typedef struct {
    const uint8_t *w;
    const gtype_info *t;
    int rows, K;
    const float *bias; /* [rows] or NULL */
} dec_linear;
typedef struct {
    const float *attn_norm, *attn_norm_b, *ffn_norm, *ffn_norm_b; /* [D]; the biases NULL for RMSNorm */
    dec_linear qkv, o, gate_up, down;  /* [(H+2KV)hd, D], [D, H hd], [2F, D] rows [gate | up], [D, F] */
    block_sparse sparse;               /* sparse.block == 0: dense attention (within the plan's window) */
} dec_layer;
typedef struct {
    int n_layers, D, H, KV, hd, F, n_ctx, window, kv_kind; /* window 0: none; KV_* */
    int rot;                                               /* RoPE on the first rot values of a head */
    int norm, act;                                         /* NORM_*, ACT_* */
    float eps, act_limit, attn_scale;                      /* act_limit: GeGELU's L */
    const dec_layer *layers;
    void *k_cache, *v_cache;
    uint16_t *k_scale, *v_scale; /* KV_I8: fp16 [n_layers, KV, n_ctx] */
    float *scratch; /* decode_scratch_floats(plan) floats */
} decode_plan;
size_t decode_scratch_floats(const decode_plan *p);
/* The keys and values of one position (k, v: [KV * hd] float32) into one layer's cache [KV, n_ctx,
 * hd] of kind KV_* (int8: its fp16 scales [KV, n_ctx]), as KVCache.write (pocketlm/kv_cache.py)
 * stores them: fp16 rounded to nearest even; int8 codes rint(x / s) clipped to 127 with s =
 * fp16(amax / 127). simd: F16C on x86 (the same fp16 bits), else portable C. */
void kv_store_pos(int kind, int simd, void *k_cache, void *v_cache, uint16_t *k_scale, uint16_t *v_scale, int KV,
                  int n_ctx, int hd, int pos, const float *k, const float *v);
/* T rows through every layer (a decode step's one, a verify's or a short prompt's few): h [T, D] in
 * place, cos, sin [T, rot/2] of positions pos..pos+T-1 (pos + T <= n_ctx). The linears of T > 1 rows
 * take only the kernels that reproduce the path's dot bit for bit (the multi-activation kernels,
 * else row by row; not the tiled path nor i8mm's 2 x 2 kernels, whose float order differs), so T rows
 * give the bits of T decode steps: a speculative verify's logits are exactly the steps'. The same
 * kernel calls in the same order as the per-layer Python loop (runtime/model.py, _forward_chunk, which
 * asks for the same kernels up to ROWS_IN_C rows); one row runs in the plan's scratch. 0, or -1 on
 * OOM. */
int run_forward_rows(const dot_fn *table, int simd, const decode_plan *p, float *h, int T, const float *cos,
                     const float *sin, int pos);

/* exp(x) for float32, relative error below 3e-7 over [-87, 88] (finite inputs are clamped to it):
 * no library call and no branch (the clamps are arithmetic selects), so loops over it vectorize.
 * x = n ln2 + r, |r| <= ln2/2, exp(r) by its degree-6 Taylor polynomial, 2^n built in the exponent. */
static inline float exp_approx(float x) {
    x += (float)(x < -87.0f) * (-87.0f - x);
    x += (float)(x > 88.0f) * (88.0f - x);
    const float t = x * 1.44269504f;
    const float n = (float)(int)(t + copysignf(0.5f, t)); /* round half away (roundf would be a call) */
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f; /* ln2 in two parts: r stays exact */
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const union { int32_t i; float f; } two_n = {((int32_t)n + 127) * (1 << 23)};
    return p * two_n.f;
}

/* rowops.c: element-wise steps on one row, or over T rows on the pool (pocketlm/layers.py is their
 * numpy reference). norm: RMSNorm out = h / rms(h) * w, or LayerNorm out = (h - mean) / std * w + b
 * ([T, D] rows); rope: NEOX rotation in place of the first rot values of each of the first n_heads
 * heads (hd values each) of each row of x (row stride `stride` floats), cos/sin [T, rot/2]; gated activation of gu [2F] = [gate | up] -> out [F]:
 * SwiGLU silu(gate) * up, or GeGELU (Phi-3-small, limit L) quick_gelu(min(gate, L)) * (clip(up, +-L) + 1). */
enum { NORM_RMS = 0, NORM_LAYER = 1 };
enum { ACT_SWIGLU = 0, ACT_GEGELU = 1 };
void rms_norm_row(const float *h, const float *w, int D, float eps, float *out);
void layer_norm_row(const float *h, const float *w, const float *b, int D, float eps, float *out);
void norm_row(int kind, const float *h, const float *w, const float *b, int D, float eps, float *out);
void rope_row(float *x, int n_heads, int hd, int rot, const float *cos, const float *sin); /* rot <= hd, even */
void swiglu_row(const float *gu, int F, float *out);                           /* gu [2F] -> out [F] */
void gegelu_row(const float *gu, int F, float limit, float *out);
void gated_act_row(int kind, const float *gu, int F, float limit, float *out);
void run_norm_rows(int kind, const float *h, const float *w, const float *b, int T, int D, float eps, float *out);
void run_rope_rows(float *x, int T, int stride, int n_heads, int hd, int rot, const float *cos, const float *sin);
void run_gated_act_rows(int kind, const float *gu, int T, int F, float limit, float *out);

/* threadpool.c: run fn(ctx, c, n) for every chunk c in 0..n-1 on the pool (the caller included);
 * returns when all are done. Chunks are taken dynamically, so results must not depend on who runs
 * which chunk. */
typedef void (*pool_task)(void *ctx, int chunk, int n_chunks);
int pool_set_threads(int n); /* 0 ok, -1 failure */
int pool_threads(void);
void pool_run(pool_task fn, void *ctx, int n_chunks);
int pool_chunks(int rows, int min_rows); /* a chunk count for splitting `rows` */

#endif
