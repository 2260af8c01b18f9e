/* AVX-512 (F, BW, VL) + VNNI dot products (Ice Lake, Sapphire Rapids, Zen 4 and later), with
 * `vpdpbusd` for the u8 x s8 sums: packed Q4_0 and Q8_0 in 512-bit registers, raw Q4_0/Q4_1 per
 * block in 256-bit ones; Q4_K and Q6_K with 64-byte code loads and `vpmaddubsw` + `vpmaddwd`
 * (Q6_K: `vpdpwssd`) for their sub-block scales. Same integer sums and per-block float formula as
 * dot_scalar.c. CPUs with AVX-512 but no VNNI use the AVX2 path. The multi-activation kernels
 * (dotacts_fn) of the packed types and Q6_K: a batch of activations is compute-bound, where
 * 512-bit VNNI pays. */
#include "kernel.h"

#if defined(POCKETLM_X86)
#include <immintrin.h>

#define TARGET __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))
#define INLINE static inline __attribute__((always_inline)) TARGET
#define DEFINE_DOT(name, impl) \
    TARGET static float name(const uint8_t *row, const q8_act *a, int nb) { return impl(row, a, nb); }

INLINE float half(const uint8_t *p) { return _cvtsh_ss(read_u16(p)); }

/* [lo(q), hi(q)] nibbles of 16 bytes in value order, not yet masked. */
INLINE __m256i spread_nibbles(const uint8_t *qs) {
    const __m128i q = _mm_loadu_si128((const __m128i *)qs);
    return _mm256_inserti128_si256(_mm256_castsi128_si256(q), _mm_srli_epi16(q, 4), 1);
}

INLINE __m512i join256(__m256i lo, __m256i hi) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

/* Activations of blocks b0 and b1 (adjacent in the dense case: one load). */
INLINE __m512i act_pair(const q8_act *a, int b0, int b1) {
    if (b1 == b0 + 1) return _mm512_loadu_si512(a->qs + b0 * QK);
    return join256(_mm256_loadu_si256((const __m256i *)(a->qs + b0 * QK)),
                   _mm256_loadu_si256((const __m256i *)(a->qs + b1 * QK)));
}

/* Lanes 0..7 scaled by s0, lanes 8..15 by s1. */
INLINE __m512 scale_pair(float s0, float s1) {
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_set1_ps(s0)),
                                               _mm256_castps_pd(_mm256_set1_ps(s1)), 1));
}

/* Q4_0 / Q4_1 in the raw GGUF layout: the 18/20-byte block stride defeats wide loads, so this
 * works per block in 256-bit registers (measured faster than pairing blocks in 512-bit ones, which
 * costs extra shuffles); VNNI fuses the AVX2 path's maddubs + madd. Four accumulators per
 * activation hide the FMA latency. M activations (a constant after inlining, at most MAX_RAW_ACTS)
 * share each block's unpacked codes; each gets the single dot's operations in the same order (the
 * single dot is M = 1), so a batch's results are its matvecs' bit for bit. */
#define MAX_RAW_ACTS 3

/* Block b (its bytes at k) of M activations into accumulator `slot` of each. */
INLINE void q4_block(const uint8_t *k, const q8_act *acts, int M, int b, int qoff, int has_m,
                     __m256 acc[MAX_RAW_ACTS][4], float corr[MAX_RAW_ACTS], int slot) {
    const __m256i w = _mm256_and_si256(spread_nibbles(k + qoff), _mm256_set1_epi8(0x0F));
    const float d = half(k), c = has_m ? half(k + 2) : d;
    for (int m = 0; m < M; m++) {
        const q8_act *a = &acts[m];
        const __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, _mm256_loadu_si256((const __m256i *)(a->qs + b * QK)));
        acc[m][slot] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * a->d[b]), acc[m][slot]);
        corr[m] += c * a->s[b];
    }
}

INLINE void q4_generic(const uint8_t *row, const q8_act *acts, int M, int n, int bsz, int has_m, float *out,
                       size_t os) {
    __m256 acc[MAX_RAW_ACTS][4];
    float corr[MAX_RAW_ACTS];
    for (int m = 0; m < M; m++) {
        for (int u = 0; u < 4; u++) acc[m][u] = _mm256_setzero_ps();
        corr[m] = 0.0f;
    }
    const int qoff = has_m ? 4 : 2;
    int i = 0;
    for (; i + 3 < n; i += 4) {
        prefetch_ahead(row, i, bsz);
        for (int u = 0; u < 4; u++) q4_block(row + (size_t)(i + u) * bsz, acts, M, i + u, qoff, has_m, acc, corr, u);
    }
    for (; i < n; i++) q4_block(row + (size_t)i * bsz, acts, M, i, qoff, has_m, acc, corr, 0); /* the tail: acc 0 */
    for (int m = 0; m < M; m++) {
        const __m256 all = _mm256_add_ps(_mm256_add_ps(acc[m][0], acc[m][1]), _mm256_add_ps(acc[m][2], acc[m][3]));
        __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(all), _mm256_extractf128_ps(all, 1));
        s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
        const float total = _mm_cvtss_f32(s4);
        out[m * os] = has_m ? total + corr[m] : total - 8.0f * corr[m];
    }
}

INLINE float q4_0(const uint8_t *row, const q8_act *a, int n) {
    float out;
    q4_generic(row, a, 1, n, 18, 0, &out, 1);
    return out;
}
INLINE float q4_1(const uint8_t *row, const q8_act *a, int n) {
    float out;
    q4_generic(row, a, 1, n, 20, 1, &out, 1);
    return out;
}

/* s8 x s8 with vpdpbusd: |w| (unsigned) times a carrying w's sign. */
INLINE __m512i q8_pair(const uint8_t *k0, const uint8_t *k1, __m512i x) {
    const __m512i w = join256(_mm256_loadu_si256((const __m256i *)(k0 + 2)), _mm256_loadu_si256((const __m256i *)(k1 + 2)));
    const __m512i xs = _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(w), _mm512_setzero_si512(), x);
    return _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_abs_epi8(w), xs);
}

INLINE float q8_0(const uint8_t *row, const q8_act *a, int n) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int i = 0;
    for (; i + 3 < n; i += 4) {
        const int b0 = i, b1 = i + 1, b2 = i + 2, b3 = i + 3;
        const uint8_t *k0 = row + (size_t)b0 * 34, *k1 = row + (size_t)b1 * 34;
        const uint8_t *k2 = row + (size_t)b2 * 34, *k3 = row + (size_t)b3 * 34;
        prefetch_ahead(row, i, 34);
        prefetch_ahead(row + 64, i, 34);
        const __m512i p01 = q8_pair(k0, k1, act_pair(a, b0, b1));
        const __m512i p23 = q8_pair(k2, k3, act_pair(a, b2, b3));
        acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p01), scale_pair(half(k0) * a->d[b0], half(k1) * a->d[b1]), acc0);
        acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p23), scale_pair(half(k2) * a->d[b2], half(k3) * a->d[b3]), acc1);
    }
    __m256 tail = _mm256_setzero_ps();
    for (; i < n; i++) {
        const int b = i;
        const uint8_t *k = row + (size_t)b * 34;
        const __m256i w = _mm256_loadu_si256((const __m256i *)(k + 2));
        const __m256i x = _mm256_loadu_si256((const __m256i *)(a->qs + b * QK));
        const __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_abs_epi8(w), _mm256_sign_epi8(x, w));
        tail = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(half(k) * a->d[b]), tail);
    }
    __m512 all = _mm512_add_ps(acc0, acc1);
    all = _mm512_add_ps(all, _mm512_castpd_ps(_mm512_insertf64x4(_mm512_setzero_pd(), _mm256_castps_pd(tail), 0)));
    return _mm512_reduce_add_ps(all);
}

/* ---- the packed layouts (kernel.h): one int32 lane per 32-value sub-block ---------------- */

/* The lines of `bytes` bytes at p into L2 (`prefetcht1`): a group of a later row block (see
 * packed_acts). Into L1 (`prefetcht0`), each such miss holds one of the few L1 miss buffers for the
 * whole DRAM latency: from DRAM, 4 rows x 2 activations streamed at half the matvec's rate. */
INLINE void prefetch_l2(const uint8_t *p, int bytes) {
    for (int line = 0; line < bytes; line += 64) __builtin_prefetch(p + line, 0, 2);
}

/* ---- several activations (dotacts_fn) on the packed layouts ------------------------------------
 * The decode step on this path uses the AVX2 packed dots (see path_avx512), so these reproduce
 * them lane for lane: the same integer sum per sub-block (lane b = sub-block b, the AVX2 dots'
 * half h = lanes 8h..8h+7), the same float operations per lane in the same order, and the AVX2
 * reduction (hsum_as_avx2). A block is R weight rows x M activations (constants after inlining):
 * each 64-byte code vector is loaded and unpacked once per block and fed to M `vpdpbusd` chains,
 * each activation vector once and fed to R of them. On Zen 4 a zmm `vpdpbusd`, `vmulps` or
 * `vfmadd` issues once per cycle (they share two pipes) and other zmm ops two per cycle besides,
 * so a pair (row, activation) costs 8 `vpdpbusd` + 2 float ops (+1 for Q4_K's min) per group:
 * the Q4_0 offset is folded into the integer sums (as in the AVX2 dot) rather than a third. */

#define MAX_ROWS 4 /* the largest block of any type below */
#define MAX_ACTS 6 /* Q6_K's 1 x 6 */
#define PREFETCH_BLOCKS 2 /* row blocks ahead (measured: more than 1 streams better from DRAM) */
enum { PK_Q4_0, PK_Q8_0, PK_Q4_K };

/* The AVX2 packed dots' reduction of their two 8-lane accumulators (lanes 0..7 and 8..15 here):
 * their sum, then lanes 0..3 + 4..7, 0..1 + 2..3, 0 + 1 (dot_avx2.c: hsum_halves). */
INLINE float hsum_as_avx2(__m512 v) {
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    const __m256 v8 = _mm256_add_ps(_mm512_castps512_ps256(v), hi);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v8), _mm256_extractf128_ps(v8, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* The integer sums of a group start from the code offset times the activation's sums (off32):
 * -8 for Q4_0 (codes q - 8), -128 for Q8_0 (codes stored + 128 and multiplied unsigned), none for
 * Q4_K. */
INLINE __m512i group_start(const q8_act *a, int g, int kind) {
    return kind == PK_Q4_K ? _mm512_setzero_si512() : _mm512_loadu_si512(a->off32 + 16 * g);
}

/* s[r][m] lane b += integer dot of sub-block b of row r with activation m: 4-bit codes (chunk c:
 * low nibbles x vector 2c, high x 2c + 1), or Q8_0's codes + 128 as uint8. Each code vector is
 * loaded once into a register (an asm barrier: otherwise gcc folds the load into both the `vpand`
 * and the shift, two loads per vector; and for Q8_0 with 3 activations it loaded each weight vector
 * again before every `vpdpbusd`, two loads per product: one thread, the matrix in L2, 2 x 3 blocks
 * 20.9 -> 15.4 cycles per row x activation x 512 values, a 9-token forward of a phi-3-mini-shaped
 * Q8_0 file at 2 threads 271 -> 213 ms). */
INLINE void group_sums(const uint8_t *const grp[MAX_ROWS], const int8_t *const aq[MAX_ACTS], int R, int M, int kind,
                       __m512i s[MAX_ROWS][MAX_ACTS]) {
    if (kind == PK_Q8_0) {
        for (int v = 0; v < 8; v++) {
            __m512i w[MAX_ROWS];
            for (int r = 0; r < R; r++) {
                w[r] = _mm512_loadu_si512(grp[r] + 32 + 64 * v);
                __asm__("" : "+v"(w[r]));
            }
            for (int m = 0; m < M; m++) {
                const __m512i a = _mm512_loadu_si512(aq[m] + 64 * v);
                for (int r = 0; r < R; r++) s[r][m] = _mm512_dpbusd_epi32(s[r][m], w[r], a);
            }
        }
        return;
    }
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    for (int c = 0; c < 4; c++) {
        __m512i lo[MAX_ROWS], hi[MAX_ROWS];
        for (int r = 0; r < R; r++) {
            __m512i v = _mm512_loadu_si512(grp[r] + 32 + 64 * c);
            __asm__("" : "+v"(v));
            lo[r] = _mm512_and_si512(v, m4);
            hi[r] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
        }
        for (int m = 0; m < M; m++) {
            const __m512i a0 = _mm512_loadu_si512(aq[m] + 128 * c), a1 = _mm512_loadu_si512(aq[m] + 128 * c + 64);
            for (int r = 0; r < R; r++) s[r][m] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(s[r][m], lo[r], a0), hi[r], a1);
        }
    }
}

/* Q4_K_PACKED: the 16 6-bit scales (bytes 0..15 of the low 128 bits) and mins (of the high 128)
 * of a group, the super-blocks' 12 bytes each decoded as q4k_scale_words does with the words
 * w0, w1, w2 of each super-block in a 128-bit lane: dwords [w0, w2, w1, w2] give sc[0..3],
 * sc[4..7]'s and m[4..7]'s low bits (w2 >> 4 for the mins), m[0..3]; [w0, w0, w1, w1] >> 2 the top
 * two bits of w0 / w1's bytes at bits 4, 5. */
INLINE void q4k_group_scales(const uint8_t *grp, __m512 *sc, __m512 *mn) {
    const __m256i w = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(grp + 8))),
                                              _mm_loadu_si128((const __m128i *)(grp + 20)), 1);
    const __m256i a = _mm256_shuffle_epi32(w, _MM_SHUFFLE(2, 1, 2, 0)), b = _mm256_shuffle_epi32(w, _MM_SHUFFLE(1, 1, 0, 0));
    const __m256i low = _mm256_and_si256(_mm256_srlv_epi32(a, _mm256_setr_epi32(0, 0, 0, 4, 0, 0, 0, 4)),
                                         _mm256_setr_epi32(0x3F3F3F3F, 0x0F0F0F0F, 0x3F3F3F3F, 0x0F0F0F0F, 0x3F3F3F3F,
                                                           0x0F0F0F0F, 0x3F3F3F3F, 0x0F0F0F0F));
    const __m256i top = _mm256_and_si256(_mm256_srli_epi32(b, 2), _mm256_setr_epi32(0, 0x30303030, 0, 0x30303030, 0,
                                                                                     0x30303030, 0, 0x30303030));
    /* qwords [sc s0, m s0, sc s1, m s1] -> [sc s0, sc s1, m s0, m s1] */
    const __m256i all = _mm256_permute4x64_epi64(_mm256_or_si256(low, top), _MM_SHUFFLE(3, 1, 2, 0));
    *sc = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(all)));
    *mn = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(all, 1)));
}

/* The weight factors of a group, per lane (sub-block): acc += isum * (f * da), accm += fm * sa
 * (Q4_K). Q4_0 / Q8_0 f = d_b; Q4_K f = d_s * sc_b, fm = dmin_s * m_b (exact products, as AVX2's). */
INLINE void group_factors(const uint8_t *grp, int kind, __m512 *f, __m512 *fm) {
    if (kind != PK_Q4_K) {
        *f = *fm = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)grp));
        return;
    }
    const __m512i lane_s = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512 hv = _mm512_cvtph_ps(_mm256_castsi128_si256(_mm_loadl_epi64((const __m128i *)grp))); /* d0 d1 dmin0 dmin1 */
    __m512 sc, mn;
    q4k_group_scales(grp, &sc, &mn);
    *f = _mm512_mul_ps(sc, _mm512_permutexvar_ps(lane_s, hv));
    *fm = _mm512_mul_ps(mn, _mm512_permutexvar_ps(_mm512_add_epi32(lane_s, _mm512_set1_epi32(2)), hv));
}

/* Group g (512 values) of R rows x M activations into the float accumulators. */
INLINE void packed_group(const uint8_t *row, size_t rb, const q8_act *acts, int g, int kind, int R, int M,
                         __m512 acc[MAX_ROWS][MAX_ACTS], __m512 accm[MAX_ROWS][MAX_ACTS]) {
    const int gbytes = kind == PK_Q8_0 ? 544 : 288;
    const uint8_t *grp[MAX_ROWS];
    const int8_t *aq[MAX_ACTS];
    __m512i s[MAX_ROWS][MAX_ACTS];
    for (int r = 0; r < R; r++) {
        grp[r] = row + r * rb + (size_t)g * gbytes;
        prefetch_l2(grp[r] + PREFETCH_BLOCKS * R * rb, gbytes);
    }
    for (int m = 0; m < M; m++) {
        aq[m] = acts[m].qs16 + (size_t)g * PACK_VALUES;
        const __m512i start = group_start(&acts[m], g, kind);
        for (int r = 0; r < R; r++) s[r][m] = start;
    }
    group_sums(grp, aq, R, M, kind, s);
    for (int r = 0; r < R; r++) {
        __m512 f, fm;
        group_factors(grp[r], kind, &f, &fm);
        for (int m = 0; m < M; m++) {
            const __m512 da = _mm512_loadu_ps(acts[m].d32 + 16 * g);
            acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[r][m]), _mm512_mul_ps(f, da), acc[r][m]);
            if (kind == PK_Q4_K) accm[r][m] = _mm512_fmadd_ps(fm, _mm512_loadu_ps(acts[m].s + 16 * g), accm[r][m]);
        }
    }
}

/* hsum_as_avx2 of 16 vectors at once, v[4r + m] -> lanes 4m + r (the same pairings per vector:
 * lanes i + 8, then i + 4, i + 2, i + 1), by a transposing tree: 45 ops for 16 sums, not 128. */
INLINE __m512 hsum16_as_avx2(const __m512 v[16]) {
    __m512 a[8], b[4], c[2];
    for (int i = 0; i < 8; i++)
        a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int i = 0; i < 4; i++)
        b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    for (int i = 0; i < 2; i++)
        c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    return _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_ps(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* out[m * os + r] of an R x M block of Q4_0 or Q8_0 sums (R = 2 or 4), hsum16_as_avx2'ed: one
 * thread, the matrix in L2, M = 9, cycles per row x activation x 512 values: Q4_0 4 x 3 blocks
 * 10.8 -> 10.4, Q8_0 2 x 4 17.3 -> 16.5 (Q4_K's 2 x 4 with its min sums: no gain, kept apart). */
INLINE void store_block_sums(__m512 acc[MAX_ROWS][MAX_ACTS], int R, int M, float *out, size_t os) {
    __m512 v[16];
    for (int r = 0; r < 4; r++)
        for (int m = 0; m < 4; m++) v[4 * r + m] = r < R && m < M ? acc[r][m] : _mm512_setzero_ps();
    const __m512 sums = hsum16_as_avx2(v);
    const __m512i lanes_0123 = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 2, 1, 0);
    for (int m = 0; m < M; m++) { /* lanes 4m .. 4m + R - 1 to out[m * os ..] */
        const __m512 mine = _mm512_permutexvar_ps(_mm512_add_epi32(lanes_0123, _mm512_set1_epi32(4 * m)), sums);
        _mm512_mask_storeu_ps(out + m * os, (__mmask16)((1u << R) - 1), mine);
    }
}

/* Rows of UNROLLED_GROUPS groups (K = 3072: the hidden size of phi-3-mini, phi-3.5-mini and
 * phi-4-mini) run the packed Q4_0 blocks of 4 rows with the group loop fully unrolled: one thread,
 * the matrix in L2, M = 9, 11.4 -> 10.8 cycles per row x activation x 512 values (gcc 12); whole
 * 9-token forwards of a phi-3-mini-shaped Q4_0 file, the builds alternated in one process, medians:
 * 2 threads 130.5 -> 125.5 ms (quiet) and 138.2 -> 130.6 (busy), 1 thread 247.0 -> 238.7 ms.
 * Unrolling by 2, 3 or 6 with a variable count gained nothing, nor did full unrolling at 10 or 16
 * groups; at 8 (K = 4096, phi-3-small) it gained 3.5-4 % in L2 but nothing outside the noise in
 * whole forwards of a 2-layer phi-3-small file (9 tokens 42.6 against 42.2 ms). Other types and
 * shapes keep the loop (code size). */
#define UNROLLED_GROUPS 6

/* n groups; `unrolled` (a constant at each call site): n is UNROLLED_GROUPS, as one straight run. */
INLINE void packed_acts(const uint8_t *row, size_t rb, const q8_act *acts, int n, int kind, int R, int M, float *out,
                        size_t os, int unrolled) {
    __m512 acc[MAX_ROWS][MAX_ACTS], accm[MAX_ROWS][MAX_ACTS];
    for (int r = 0; r < R; r++)
        for (int m = 0; m < M; m++) acc[r][m] = accm[r][m] = _mm512_setzero_ps();
    if (unrolled) {
        _Pragma("GCC unroll 6") for (int g = 0; g < UNROLLED_GROUPS; g++)
            packed_group(row, rb, acts, g, kind, R, M, acc, accm);
    } else {
        for (int g = 0; g < n; g++) packed_group(row, rb, acts, g, kind, R, M, acc, accm);
    }
    if (kind != PK_Q4_K && R >= 2) {
        store_block_sums(acc, R, M, out, os);
        return;
    }
    for (int r = 0; r < R; r++)
        for (int m = 0; m < M; m++) /* the AVX2 dots' final formulas */
            out[m * os + r] = kind == PK_Q4_K ? hsum_as_avx2(acc[r][m]) - hsum_as_avx2(accm[r][m]) : hsum_as_avx2(acc[r][m]);
}

/* The dotacts_fn of a body(row, rb, acts, nb, R, M, out, os): blocks of rmax rows x up to amax
 * activations, each a call of the body with constant R and M; a chunk's last rows (fewer than
 * rmax) one at a time. */
#define ACTS_CASE(body, row, out, R, M, amax) \
    case M:                                   \
        if ((M) <= (amax)) body(row, rb, acts, nb, R, M, out, os); \
        break;
#define ACTS_SWITCH(body, row, out, R, amax)                                                       \
    switch (M) {                                                                                   \
        ACTS_CASE(body, row, out, R, 6, amax) ACTS_CASE(body, row, out, R, 5, amax)                \
        ACTS_CASE(body, row, out, R, 4, amax) ACTS_CASE(body, row, out, R, 3, amax)                \
        ACTS_CASE(body, row, out, R, 2, amax) default : body(row, rb, acts, nb, R, 1, out, os);    \
    }
#define DEFINE_DOTACTS(name, body, rmax, amax)                                                     \
    TARGET static void name##_block(const uint8_t *row, size_t rb, int nrows, const q8_act *acts, int M, int nb, \
                                    float *out, size_t os) {                                       \
        if (nrows == (rmax)) {                                                                     \
            ACTS_SWITCH(body, row, out, rmax, amax)                                                \
            return;                                                                                \
        }                                                                                          \
        for (int r = 0; r < nrows; r++) {                                                          \
            const uint8_t *row1 = row + r * rb;                                                    \
            float *out1 = out + r;                                                                 \
            ACTS_SWITCH(body, row1, out1, 1, amax)                                                 \
        }                                                                                          \
    }                                                                                              \
    TARGET static void name(const uint8_t *row, size_t rb, int nrows, const q8_act *acts, int nacts, int nb, \
                            float *out, size_t os) {                                               \
        dotacts_blocks(name##_block, rmax, amax, row, rb, nrows, acts, nacts, nb, out, os);        \
    }
#define Q4_0_ACTS(row, rb, acts, nb, R, M, out, os)                                                \
    do {                                                                                           \
        if ((R) == MAX_ROWS && (nb) == UNROLLED_GROUPS)                                            \
            packed_acts(row, rb, acts, nb, PK_Q4_0, R, M, out, os, 1);                             \
        else                                                                                       \
            packed_acts(row, rb, acts, nb, PK_Q4_0, R, M, out, os, 0);                             \
    } while (0)
#define Q8_0_ACTS(row, rb, acts, nb, R, M, out, os) packed_acts(row, rb, acts, nb, PK_Q8_0, R, M, out, os, 0)
#define Q4_K_ACTS(row, rb, acts, nb, R, M, out, os) packed_acts(row, rb, acts, nb, PK_Q4_K, R, M, out, os, 0)
/* Block shapes measured on Zen 4 (one thread, the matrix in L2, cycles per activation x 512
 * values at M = 8): Q4_0 4 x 3 11.7 (2 x 4 13.3, 4 x 4 12.5, 3 x 4 12.7, 2 x 6 13.5, 1 x 8 14.9);
 * Q8_0 2 x 4 18.7 (4 x 3 21.5, 4 x 2 20.3); Q4_K 2 x 4 17.1 (4 x 3 18.1, 3 x 3 17.9). */
DEFINE_DOTACTS(q4_0_packed_acts, Q4_0_ACTS, 4, 3)
DEFINE_DOTACTS(q8_0_packed_acts, Q8_0_ACTS, 2, 4)
DEFINE_DOTACTS(q4_k_packed_acts, Q4_K_ACTS, 2, 4)


/* i16 lanes 16h..16h+15 of the result = v16[2*pair + h] for h in 0, 1 (v16: 8 or 16 int16). */
INLINE __m512i spread_pairs(__m512i v16, int first) {
    const __m512i lo = _mm512_set1_epi16((short)first), hi = _mm512_set1_epi16((short)(first + 1));
    return _mm512_permutexvar_epi16(_mm512_mask_blend_epi16(0xFFFF0000u, lo, hi), v16);
}

/* Q4_K (same integers as dot_scalar.c): 64-byte loads of the codes; the nibbles of each half
 * rearranged into value order (values 0..63 / 64..127 of the super-block's 128-byte half) so the
 * activation is read with plain loads; u8 x s8 pair sums (`vpmaddubsw`, at most 2*15*127) times
 * the 6-bit scales (`vpmaddwd`) into int32; min term and float FMA once per super-block. */
INLINE float q4_k(const uint8_t *row, const q8_act *a, int n) {
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    /* 64-bit lanes: [lo.0 lo.1 lo.2 lo.3 | hi.0 ...] -> [lo 0-3 | hi 0-3] (values 0..63) and the rest */
    const __m512i first = _mm512_set_epi64(11, 10, 9, 8, 3, 2, 1, 0), second = _mm512_set_epi64(15, 14, 13, 12, 7, 6, 5, 4);
    __m512 acc = _mm512_setzero_ps();
    float acc_min = 0.0f;
    for (int i = 0; i < n; i++) {
        const int b = i;
        const uint8_t *blk = row + (size_t)b * 144, *qs = blk + 16;
        const int8_t *aq = a->qs + (size_t)b * QK_K;
        prefetch_ahead(row, i, 144);
        prefetch_ahead(row + 64, i, 144);
        prefetch_ahead(row + 128, i, 144);
        uint8_t sc[8], mn[8];
        q4k_scales_mins(blk + 4, sc, mn);
        const __m512i sc16 = _mm512_castsi128_si512(_mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)sc)));
        __m512i sumi = _mm512_setzero_si512();
        for (int c = 0; c < 2; c++) { /* 64 code bytes: sub-blocks 4c .. 4c+3 */
            const __m512i v = _mm512_loadu_si512(qs + 64 * c);
            const __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
            const __m512i q0 = _mm512_permutex2var_epi64(lo, first, hi);  /* sub-blocks 4c, 4c+1 */
            const __m512i q1 = _mm512_permutex2var_epi64(lo, second, hi); /* 4c+2, 4c+3 */
            const __m512i p0 = _mm512_maddubs_epi16(q0, _mm512_loadu_si512(aq + 128 * c));
            const __m512i p1 = _mm512_maddubs_epi16(q1, _mm512_loadu_si512(aq + 128 * c + 64));
            sumi = _mm512_add_epi32(sumi, _mm512_madd_epi16(p0, spread_pairs(sc16, 4 * c)));
            sumi = _mm512_add_epi32(sumi, _mm512_madd_epi16(p1, spread_pairs(sc16, 4 * c + 2)));
        }
        const float da = a->d[b];
        acc = _mm512_fmadd_ps(_mm512_set1_ps(half(blk) * da), _mm512_cvtepi32_ps(sumi), acc);
        acc_min += half(blk + 2) * da * (float)q4k_min_sum(a->bsums + b * 16, mn);
    }
    return _mm512_reduce_add_ps(acc) - acc_min;
}

/* Q6_K's stream is prefetched this far ahead into L2 (`prefetcht1`, as the packed kernels do):
 * at ~22 cycles per 210-byte super-block, PREFETCH_BYTES (1 KB) into L1 is only ~30 ns ahead,
 * well short of the DRAM latency. One thread, 96 MB of Q6_K rows (K = 3072), best of 20 passes
 * alternated in one run with the other job of this machine running: 1 KB into L1 18.5-21.0 GB/s,
 * 4 KB into L2 18.6-20.0, 8 KB 23.1-25.4, 12-32 KB 23.2-26.1 (flat), where a plain AVX-512 read
 * of the same buffer streams 25.2. The rows of a matvec chunk are contiguous, so near a chunk's
 * end this fetches the next chunk's start (chunks are MBs: phi-3-mini's smallest is 2.6 MB). */
#define Q6K_PREFETCH_BYTES 16384

/* i16 lane t of a 64-value register covers values 2t, 2t+1, i.e. sub-block t / 8 of the four the
 * register holds: scale index vectors for `vpermw` from the super-block's 16 int16 scales, for
 * the registers of sub-blocks 4r .. 4r+3 (r = 0..3). */
INLINE void q6k_scale_index(__m512i idx[4]) {
    const __m512i lane_sub = _mm512_srli_epi16(
        _mm512_set_epi16(31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16, 15, 14, 13, 12, 11, 10, 9, 8,
                         7, 6, 5, 4, 3, 2, 1, 0), 3);
    for (int r = 0; r < 4; r++) idx[r] = _mm512_add_epi16(lane_sub, _mm512_set1_epi16((short)(4 * r)));
}

/* The 6-bit codes (0..63) of a 128-value half in value order: q[0] values 0..63, q[1] 64..127.
 * One 64-byte load of ql gives values 0..31 and 32..63 (low nibbles, 256-bit halves) and
 * 64..127 (high nibbles); the 32 qh bytes are broadcast to both 256-bit halves, where value group
 * k takes bits 2k, 2k+1 (k = 0, 2 in the lower half, 1, 3 in the upper). Masked once to the bits
 * of the half's groups (0x33 / 0xCC), shifted per 256-bit half to bits 4-5 with bits 6-7 clear,
 * and merged with the nibbles by one bit select (`vpternlogd`: m4 ? nibble : high bits) each: 6
 * shift/mask ops and 2 selects per 128 values (the previous kernel: 9 ops, two masks per
 * register). */
INLINE void q6k_codes(const uint8_t *blk, int h, __m512i q[2]) {
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const __m512i hmask = _mm512_inserti64x4(_mm512_set1_epi8(0x33), _mm256_set1_epi8((char)0xCC), 1);
    const __m512i shl = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(2), 1);
    const __m512i shr = _mm512_inserti64x4(_mm512_set1_epi16(0), _mm256_set1_epi16(2), 1);
    const __m512i v = _mm512_loadu_si512(blk + 64 * h);
    const __m512i hb = _mm512_and_si512(_mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * h))),
                                        hmask);
    q[0] = _mm512_ternarylogic_epi32(m4, v, _mm512_sllv_epi16(hb, shl), 0xCA);
    q[1] = _mm512_ternarylogic_epi32(m4, _mm512_srli_epi16(v, 4), _mm512_srlv_epi16(hb, shr), 0xCA);
}

/* Q6_K (same integers as dot_scalar.c): codes 0..63 (u8) x s8 pair sums (`vpmaddubsw`, at most
 * 2 * 63 * 127, no saturation) times the int8 scales of the 16-value sub-blocks spread per i16
 * lane (`vpermw`), accumulated by `vpdpwssd` (VNNI: `vpmaddwd` + `vpaddd` in one op) in one
 * chain per activation starting from -32 * sum_j sc_j * bsums_j (the codes' offset, 8 lanes); per
 * super-block one int->float conversion and FMA. (Two chains per activation, as before, cost a
 * zeroing and an add each: at M = 3, 26.9 -> 25.0 cycles per activation x 512 values with one.)
 * Every int32 lane holds the sum the previous kernel (maddubs, madd, add, offset subtracted) gave
 * it, so the results are bit for bit the same. The codes and scale vectors are built once per
 * super-block for M activations (R = 1 row; the single dot is M = 1). One thread, 96 rows of K = 3072 in L2, Zen 4 at 3.67 GHz:
 * 6.3-6.4 -> 6.0-6.2 ns (22 cycles) per super-block at M = 1, about 40 vector ops: this core
 * retires about two 512-bit ops per cycle of any kind (a register-only mix of maddubs, dpwssd,
 * shifts, permw, ternlog: 26 ops in 13.1 cycles), so op count is the budget. Tried, no better
 * than 3 % in L2: `vpshufb` scale spreading, one chain or four, the fp16 scales of 16 blocks
 * converted per row first (their byte stores and vector reload stall on store forwarding), codes
 * built one block ahead, 2 to 4 rows per pass sharing the activation loads (and 2 rows streamed
 * at 8 GB/s from DRAM). The DRAM stream gains from the L2 prefetch above. */
INLINE void q6_k_acts(const uint8_t *row, size_t rb, const q8_act *acts, int n, int R, int M, float *out, size_t os) {
    (void)rb, (void)R;
    __m512i idx[4];
    q6k_scale_index(idx);
    __m512 acc[MAX_ACTS];
    for (int m = 0; m < M; m++) acc[m] = _mm512_setzero_ps();
    for (int i = 0; i < n; i++) {
        const int b = i;
        const uint8_t *blk = row + (size_t)b * 210;
        prefetch_l2(blk + Q6K_PREFETCH_BYTES, 256);
        const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(blk + 192)));
        const __m512i scz = _mm512_castsi256_si512(sc16);
        const __m256i sc_off = _mm256_mullo_epi16(sc16, _mm256_set1_epi16(-32));
        __m512i s[MAX_ACTS];
        for (int m = 0; m < M; m++) {
            const __m256i off = _mm256_madd_epi16(sc_off, _mm256_loadu_si256((const __m256i *)(acts[m].bsums + b * 16)));
            s[m] = _mm512_zextsi256_si512(off);
        }
        for (int h = 0; h < 2; h++) {
            __m512i q[2];
            q6k_codes(blk, h, q);
            const __m512i s0 = _mm512_permutexvar_epi16(idx[2 * h], scz), s1 = _mm512_permutexvar_epi16(idx[2 * h + 1], scz);
            for (int m = 0; m < M; m++) {
                const int8_t *aq = acts[m].qs + (size_t)b * QK_K + 128 * h;
                s[m] = _mm512_dpwssd_epi32(s[m], _mm512_maddubs_epi16(q[0], _mm512_loadu_si512(aq)), s0);
                s[m] = _mm512_dpwssd_epi32(s[m], _mm512_maddubs_epi16(q[1], _mm512_loadu_si512(aq + 64)), s1);
            }
        }
        const float d = half(blk + 208);
        for (int m = 0; m < M; m++)
            acc[m] = _mm512_fmadd_ps(_mm512_set1_ps(d * acts[m].d[b]), _mm512_cvtepi32_ps(s[m]),
                                     acc[m]);
    }
    for (int m = 0; m < M; m++) out[m * os] = _mm512_reduce_add_ps(acc[m]);
}

/* 1 x 6, cycles per activation x 512 values (one thread, the matrix in L2): M = 9 (as 5 + 4) 22.6,
 * M = 6 22.9-25.2, against 24.6-25.0 and 25.7-27.9 as blocks of at most 3; blocks of 7 or 9 spill */
DEFINE_DOTACTS(q6_k_dotacts, q6_k_acts, 1, 6)
#define Q4_0_RAW_ACTS(row, rb, acts, nb, R, M, out, os) q4_generic(row, acts, M, nb, 18, 0, out, os)
#define Q4_1_RAW_ACTS(row, rb, acts, nb, R, M, out, os) q4_generic(row, acts, M, nb, 20, 1, out, os)
/* Raw Q4_0 / Q4_1: matrices whose K is not a multiple of 512 keep the GGUF layout (kernel.py,
 * should_repack), e.g. the built-in model's (hidden size 256). */
DEFINE_DOTACTS(q4_0_raw_acts, Q4_0_RAW_ACTS, 1, MAX_RAW_ACTS)
DEFINE_DOTACTS(q4_1_raw_acts, Q4_1_RAW_ACTS, 1, MAX_RAW_ACTS)

TARGET static float dot_q6_k(const uint8_t *row, const q8_act *a, int nb) {
    float out;
    q6_k_acts(row, 0, a, nb, 1, 1, &out, 1);
    return out;
}

DEFINE_DOT(dot_q4_0, q4_0)
DEFINE_DOT(dot_q4_1, q4_1)
DEFINE_DOT(dot_q8_0, q8_0)
DEFINE_DOT(dot_q4_k, q4_k)

const kernel_path path_avx512 = {
    .name = "avx512",
    /* The packed layouts' decode matvecs come from the AVX2 path (NULL: the fallback chain). From
     * DRAM they are bound by the memory stream, not by their arithmetic: on Zen 4 (phi-3-mini Q4_0,
     * 2 threads) 512-bit single- and 4-row dots streamed at 11.7 and 8.8 tok/s against AVX2's 16.2,
     * and a 256-bit VNNI version of the AVX2 dot, 10 % (Q4_0) and 34 % (Q8_0) faster with the
     * matrix in L2, streamed the same GB/s from DRAM as AVX2's (benchmarks/bench_kernel.py, paths
     * alternated, 1 and 2 threads). Q4_K's decode runs its multi-activation kernel (acts_matvec). */
    .dot = {dot_q4_0, dot_q4_1, dot_q8_0, dot_q4_k, dot_q6_k, NULL, NULL, NULL},
    .fallback = "avx2",
    .dotacts = {[SLOT_Q4_0] = q4_0_raw_acts, [SLOT_Q4_1] = q4_1_raw_acts, [SLOT_Q6_K] = q6_k_dotacts,
                [SLOT_Q4_0_PACKED] = q4_0_packed_acts, [SLOT_Q8_0_PACKED] = q8_0_packed_acts,
                [SLOT_Q4_K_PACKED] = q4_k_packed_acts},
    /* where gemm_avx512 overtakes them (Zen 4, 1 and 2 threads, phi-3-mini shapes: the tiled path
     * lays the weights out again per call, so it needs many activations to pay; packed Q4_0 at
     * 2 threads on 16384 x 3072: 5.5 vs 8.4 ms at M = 32, 22 vs 25 at 128, even at 192) */
    .acts_gemm_from = {[SLOT_Q6_K] = 24, [SLOT_Q4_0_PACKED] = 128, [SLOT_Q8_0_PACKED] = 64, [SLOT_Q4_K_PACKED] = 48},
    /* packed Q4_K's 2-row kernel also runs the decode matvecs: one thread, phi-3-mini Q4_K_M
     * (benchmarks/profile_decode.py, alternated): gate_up 18.3 -> 23-27 GB/s, o 19 -> 26 GB/s from
     * DRAM (AVX2's single-row dot is compute-bound there); packed Q4_0's 4-row kernel streams slower
     * than AVX2's dot (61 against 76 % of the roofline) and Q6_K gains nothing */
    .acts_matvec = {[SLOT_Q4_K_PACKED] = 1},
    .gemm = &gemm_avx512,
};

#endif
