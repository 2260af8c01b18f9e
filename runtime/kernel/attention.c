/* Attention of T query rows over one layer's KV cache (fp32, fp16, or int8 with fp16 per-row
 * scales): decode (T = 1) and prompt chunks (T > 1, whose keys/values are already in the cache),
 * dense causal, sliding window, and Phi-3-small's block-sparse pattern (pocketlm/blocksparse.py).
 *
 * For query row t (position p = pos + t) and query head h (kv head g = h / (H / KV)):
 *   key j is visible iff j <= p, j > p - window (window > 0), and, with a block-sparse
 *   descriptor, key block jb = j / block is visible from query block ib = p / block for head h:
 *     ib - jb < local_blocks  or  (jb + h * head_step + 1) % vert_stride == 0
 *   s_j = scale * q[t, h] . k[g, j];  out[t, h] = sum_j softmax(s)_j v[g, j]   (float32)
 *
 * Flash-style: keys are visited in chunks of at most KCHUNK rows on a grid aligned to absolute
 * positions (inside each visible block), with an online softmax per (row, head): running max m,
 * running sum l, accumulator acc[hd]; a chunk that raises the max rescales l and acc by exp(m_old -
 * m_new). Only visible blocks are read (no dense mask), and memory is O(KCHUNK * hd) per work item
 * whatever the prompt length. A chunk serves every (row, head) of the work item that sees it: the
 * query heads of one GQA group and up to TQ prompt rows share each K/V read. The SIMD kernels read
 * the fp16 / int8 rows in place, converting in registers (storing a converted chunk and loading it
 * back cost more than converting at every use: 3x the arithmetic in decode, which it held to
 * 8 GB/s, and 1.4-1.8x the time of prompt tiles); the portable C converts each chunk once into
 * fp32 scratch, to the same values. Because the chunk grid is absolute, a row's result does not
 * depend on how the prompt was split into calls or work items (decode at p gives the same bits as
 * row p of a prompt), nor on the thread count.
 *
 * simd = 0 runs the portable C (the reference); otherwise AVX2+FMA+F16C on x86 or NEON on ARM64
 * (same loop structure, vector inner products, vector exp; pair kernels run two (row, head)
 * entries with the same keys at once, each key row loaded once for both, with the bits of the
 * single-entry kernels). The SIMD kernels reading the cache in place prefetch each key's row
 * ATTN_PREFETCH_BYTES ahead along its head's stream, one pass's rows at a time (a head's rows are
 * a few short runs of 4 KB pages, where the hardware prefetchers, which stop at page boundaries,
 * left decode latency-bound at 9 GB/s; prefetching a whole next chunk at once slowed it by 1.6x).
 * Work items (query-row tile x kv head x head
 * subgroup) run on the thread pool, the heaviest (last) tiles first. */
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "kernel.h"

#if defined(POCKETLM_X86)
#include <immintrin.h>
#endif
#if defined(POCKETLM_ARM64)
#include <arm_neon.h>
#endif

#define KCHUNK 64 /* keys scored at once (the portable C's scratch: 2 x 64 x hd floats, 64 KB at hd 128) */
#define TQ 16     /* prompt rows per work item (they share each chunk's cache reads) */

/* Cache rows as the kernels read them: row r (value i) of kind KV_F32 (also the portable C's fp32
 * scratch of a converted chunk), KV_F16, or KV_I8 times the row's fp16 scale rs[r]. The SIMD
 * kernels convert in registers exactly as cvt_*_scalar converts into the scratch (fp16 -> fp32 is
 * exact; int8 * scale is one float multiply either way), so every path sees the same values. */
typedef struct {
    const void *base;
    const uint16_t *rs;  /* KV_I8: the rows' fp16 scales; else NULL */
    size_t row_bytes;    /* hd * bytes per value */
    int ahead;           /* rows from base on that the work item will read (prefetch stops there); 0: none */
} rows_t;

static inline rows_t rows_at(rows_t R, int r) {
    const rows_t o = {(const uint8_t *)R.base + (size_t)r * R.row_bytes, R.rs ? R.rs + r : NULL, R.row_bytes,
                      R.ahead > r ? R.ahead - r : 0};
    return o;
}

#ifndef ATTN_PREFETCH_BYTES
#define ATTN_PREFETCH_BYTES 8192 /* into L2, this far ahead (4-16 KB measured: 8 KB best at long contexts) */
#endif

/* The cache lines ATTN_PREFETCH_BYTES past rows [r, r + n) of R, up to its last row to be read. */
static inline __attribute__((always_inline)) void prefetch_rows(rows_t R, int r, int n) {
    const size_t end = (size_t)R.ahead * R.row_bytes, hi0 = (size_t)(r + n) * R.row_bytes + ATTN_PREFETCH_BYTES;
    const size_t hi = hi0 < end ? hi0 : end;
    for (size_t b = ((size_t)r * R.row_bytes + ATTN_PREFETCH_BYTES) & ~(size_t)63; b < hi; b += 64)
        __builtin_prefetch((const uint8_t *)R.base + b, 0, 2);
}

/* A row's vectors in near-equal blocks of at most `most` vectors; returns the next block's size. */
static inline int block_vectors(int vecs_left, int most) {
    const int blocks = (vecs_left + most - 1) / most;
    return (vecs_left + blocks - 1) / blocks;
}

/* n cache rows of hd values -> fp32 dst [n, hd]; int8 rows are multiplied by their fp16 scale. */
typedef void (*cvt_fn)(float *dst, const void *src, const uint16_t *scale, int n, int hd);
/* s[r] = scale * q . K[r] for r < n. */
typedef void (*scores_fn)(const float *q, rows_t K, int n, int hd, float scale, float *s);
/* acc[hd] += sum_r p[r] V[r] for r < n. */
typedef void (*accum_fn)(float *acc, const float *p, rows_t V, int n, int hd);
/* The same for two query rows over the same keys (pair kernels, SIMD paths only): each row's
 * result has the bits of scores_fn / accum_fn on that row alone (same operations in the same
 * order), while each key row is loaded once for both. */
typedef void (*scores2_fn)(const float *q0, const float *q1, rows_t K, int n, int hd, float scale, float *s0,
                           float *s1);
typedef void (*accum2_fn)(float *acc0, float *acc1, const float *p0, const float *p1, rows_t V, int n, int hd);
/* Online-softmax step over the scores s[n] of one chunk: m_new = max(*m, max s), s[r] = exp(s[r] -
 * m_new) in place, *corr = exp(*m - m_new) (0 the first time, when *m = -inf), *m = m_new; returns
 * sum_r s[r]. exp is exp_approx's polynomial (3e-7 relative) in every path. */
typedef float (*softmax_fn)(float *s, int n, float *m, float *corr);

/* The SIMD kernels of one storage kind (f32: also every converted chunk). */
typedef struct {
    scores_fn scores;
    accum_fn accum;
    scores2_fn scores2;
    accum2_fn accum2;
} kernel_set;

/* ---- portable (the reference): fp32 rows (the cache, or the converted chunk) --------------- */

static void cvt_f16_scalar(float *dst, const void *src, const uint16_t *scale, int n, int hd) {
    (void)scale;
    const uint16_t *r = src;
    for (size_t i = 0; i < (size_t)n * hd; i++) dst[i] = fp16_to_fp32(r[i]);
}

static void cvt_i8_scalar(float *dst, const void *src, const uint16_t *scale, int n, int hd) {
    const int8_t *r = src;
    for (int t = 0; t < n; t++) {
        const float s = fp16_to_fp32(scale[t]);
        for (int i = 0; i < hd; i++) dst[(size_t)t * hd + i] = (float)r[(size_t)t * hd + i] * s;
    }
}

static void scores_scalar(const float *q, rows_t Kr, int n, int hd, float scale, float *s) {
    const float *K = Kr.base;
    for (int r = 0; r < n; r++) {
        float d = 0.0f;
        for (int i = 0; i < hd; i++) d += q[i] * K[(size_t)r * hd + i];
        s[r] = d * scale;
    }
}

static void accum_scalar(float *acc, const float *p, rows_t Vr, int n, int hd) {
    const float *V = Vr.base;
    for (int r = 0; r < n; r++)
        for (int i = 0; i < hd; i++) acc[i] += p[r] * V[(size_t)r * hd + i];
}

static float softmax_scalar(float *s, int n, float *m, float *corr) {
    float cm = *m;
    for (int r = 0; r < n; r++) cm = s[r] > cm ? s[r] : cm;
    *corr = *m == -INFINITY ? 0.0f : exp_approx(*m - cm);
    *m = cm;
    float sum = 0.0f;
    for (int r = 0; r < n; r++) sum += (s[r] = exp_approx(s[r] - cm));
    return sum;
}

/* ---- x86: AVX2 + F16C + FMA (every non-scalar x86 path requires all three, see dispatch.c) -- */

#if defined(POCKETLM_X86)
#define X86_TARGET __attribute__((target("avx2,f16c,fma")))
#define X86_INLINE static inline __attribute__((always_inline, target("avx2,f16c,fma")))

X86_INLINE float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Row r's scale (int8 rows; 0 otherwise), then 8 values at i or one value, as cvt_*_scalar gives them. */
X86_INLINE float row_scale(rows_t R, int kind, int r) { return kind == KV_I8 ? _cvtsh_ss(R.rs[r]) : 0.0f; }
X86_INLINE __m256 row8(rows_t R, int kind, int hd, int r, int i, float s) {
    const size_t at = (size_t)r * hd + i;
    if (kind == KV_F32) return _mm256_loadu_ps((const float *)R.base + at);
    if (kind == KV_F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)R.base + at)));
    const __m128i b = _mm_loadl_epi64((const __m128i *)((const int8_t *)R.base + at));
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), _mm256_set1_ps(s));
}
X86_INLINE float row1(rows_t R, int kind, int hd, int r, int i, float s) {
    const size_t at = (size_t)r * hd + i;
    if (kind == KV_F32) return ((const float *)R.base)[at];
    if (kind == KV_F16) return _cvtsh_ss(((const uint16_t *)R.base)[at]);
    return (float)((const int8_t *)R.base)[at] * s;
}

/* One key's score: its sum over i in order in one 8-lane accumulator, hsum256, the tail values
 * in order (the pair kernel does the same per key, so pairs and singles agree bit for bit). */
X86_INLINE float score_finish(__m256 acc, const float *q, rows_t K, int kind, int hd, int r, int i, float c,
                              float scale) {
    float d = hsum256(acc);
    for (; i < hd; i++) d += q[i] * row1(K, kind, hd, r, i, c);
    return d * scale;
}

/* 8 keys per pass: 8 independent FMA chains keep both FMA pipes busy (latency 4, 2 per cycle) and
 * each q load feeds 8 FMAs */
X86_INLINE void scores_x86(const float *q, rows_t K, int kind, int n, int hd, float scale, float *s) {
    int r = 0;
    for (; r + 8 <= n; r += 8) {
        float c[8];
        __m256 a[8];
        prefetch_rows(K, r, 8);
        for (int j = 0; j < 8; j++) c[j] = row_scale(K, kind, r + j), a[j] = _mm256_setzero_ps();
        int i = 0;
        for (; i + 8 <= hd; i += 8) {
            const __m256 qv = _mm256_loadu_ps(q + i);
            for (int j = 0; j < 8; j++) a[j] = _mm256_fmadd_ps(qv, row8(K, kind, hd, r + j, i, c[j]), a[j]);
        }
        for (int j = 0; j < 8; j++) s[r + j] = score_finish(a[j], q, K, kind, hd, r + j, i, c[j], scale);
    }
    for (; r < n; r++) {
        const float c0 = row_scale(K, kind, r);
        __m256 a0 = _mm256_setzero_ps();
        prefetch_rows(K, r, 1);
        int i = 0;
        for (; i + 8 <= hd; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), row8(K, kind, hd, r, i, c0), a0);
        s[r] = score_finish(a0, q, K, kind, hd, r, i, c0, scale);
    }
}

/* acc[i0 .. i0 + 8 NV) += sum_r p[r] V[r][same lanes] with NV accumulators in registers over all n
 * keys (NV a constant after inlining; 8 or more keep both FMA pipes busy). Every lane adds its
 * products in key order, one FMA each, whichever block or kernel (single or pair) it falls in. */
X86_INLINE void accum_block_x86(float *acc, const float *p, rows_t V, int kind, int n, int hd, int i0, int NV) {
    __m256 a[12];
    for (int v = 0; v < NV; v++) a[v] = _mm256_loadu_ps(acc + i0 + 8 * v);
    for (int r = 0; r < n; r++) {
        const __m256 pv = _mm256_set1_ps(p[r]);
        const float c = row_scale(V, kind, r);
        if (i0 == 0) prefetch_rows(V, r, 1);
        for (int v = 0; v < NV; v++) a[v] = _mm256_fmadd_ps(pv, row8(V, kind, hd, r, i0 + 8 * v, c), a[v]);
    }
    for (int v = 0; v < NV; v++) _mm256_storeu_ps(acc + i0 + 8 * v, a[v]);
}

/* The same for two accumulator rows sharing each V load (2 x NV accumulators, NV <= 6). */
X86_INLINE void accum2_block_x86(float *acc0, float *acc1, const float *p0, const float *p1, rows_t V, int kind,
                                 int n, int hd, int i0, int NV) {
    __m256 a[6], b[6];
    for (int v = 0; v < NV; v++) a[v] = _mm256_loadu_ps(acc0 + i0 + 8 * v), b[v] = _mm256_loadu_ps(acc1 + i0 + 8 * v);
    for (int r = 0; r < n; r++) {
        const __m256 x = _mm256_set1_ps(p0[r]), y = _mm256_set1_ps(p1[r]);
        const float c = row_scale(V, kind, r);
        if (i0 == 0) prefetch_rows(V, r, 1);
        for (int v = 0; v < NV; v++) {
            const __m256 vv = row8(V, kind, hd, r, i0 + 8 * v, c);
            a[v] = _mm256_fmadd_ps(x, vv, a[v]), b[v] = _mm256_fmadd_ps(y, vv, b[v]);
        }
    }
    for (int v = 0; v < NV; v++) _mm256_storeu_ps(acc0 + i0 + 8 * v, a[v]), _mm256_storeu_ps(acc1 + i0 + 8 * v, b[v]);
}

/* The lanes past the last multiple of 8, one at a time (the same in single and pair kernels). */
X86_INLINE void accum_lanes_x86(float *acc, const float *p, rows_t V, int kind, int n, int hd, int i0) {
    for (int i = i0; i < hd; i++)
        for (int r = 0; r < n; r++) acc[i] += p[r] * row1(V, kind, hd, r, i, row_scale(V, kind, r));
}

#define NV_CASES(call) /* `call(NV)` with NV a constant 1..12 */                                           \
    switch (nv) {                                                                                          \
    case 1: call(1); break; case 2: call(2); break; case 3: call(3); break; case 4: call(4); break;        \
    case 5: call(5); break; case 6: call(6); break; case 7: call(7); break; case 8: call(8); break;        \
    case 9: call(9); break; case 10: call(10); break; case 11: call(11); break; default: call(12); break;  \
    }

X86_INLINE void accum_x86(float *acc, const float *p, rows_t V, int kind, int n, int hd) {
    const int vecs = hd / 8;
    for (int done = 0, nv; done < vecs; done += nv) {
        nv = block_vectors(vecs - done, 12);
#define ACC1(NV) accum_block_x86(acc, p, V, kind, n, hd, 8 * done, NV)
        NV_CASES(ACC1)
#undef ACC1
    }
    accum_lanes_x86(acc, p, V, kind, n, hd, 8 * vecs);
}

X86_INLINE void accum2_x86(float *acc0, float *acc1, const float *p0, const float *p1, rows_t V, int kind, int n,
                           int hd) {
    const int vecs = hd / 8;
    for (int done = 0, nv; done < vecs; done += nv) {
        nv = block_vectors(vecs - done, 6);
#define ACC2(NV) accum2_block_x86(acc0, acc1, p0, p1, V, kind, n, hd, 8 * done, (NV) < 6 ? (NV) : 6)
        NV_CASES(ACC2)
#undef ACC2
    }
    accum_lanes_x86(acc0, p0, V, kind, n, hd, 8 * vecs);
    accum_lanes_x86(acc1, p1, V, kind, n, hd, 8 * vecs);
}

/* two query rows x 4 keys per pass: 8 accumulators, each key load feeds 2 FMAs, each q load 4 */
X86_INLINE void scores2_x86(const float *q0, const float *q1, rows_t K, int kind, int n, int hd, float scale,
                            float *s0, float *s1) {
    int r = 0;
    for (; r + 4 <= n; r += 4) {
        const float c0 = row_scale(K, kind, r), c1 = row_scale(K, kind, r + 1);
        const float c2 = row_scale(K, kind, r + 2), c3 = row_scale(K, kind, r + 3);
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        prefetch_rows(K, r, 4);
        int i = 0;
        for (; i + 8 <= hd; i += 8) {
            const __m256 x = _mm256_loadu_ps(q0 + i), y = _mm256_loadu_ps(q1 + i);
            __m256 kv = row8(K, kind, hd, r, i, c0);
            a0 = _mm256_fmadd_ps(x, kv, a0), b0 = _mm256_fmadd_ps(y, kv, b0);
            kv = row8(K, kind, hd, r + 1, i, c1);
            a1 = _mm256_fmadd_ps(x, kv, a1), b1 = _mm256_fmadd_ps(y, kv, b1);
            kv = row8(K, kind, hd, r + 2, i, c2);
            a2 = _mm256_fmadd_ps(x, kv, a2), b2 = _mm256_fmadd_ps(y, kv, b2);
            kv = row8(K, kind, hd, r + 3, i, c3);
            a3 = _mm256_fmadd_ps(x, kv, a3), b3 = _mm256_fmadd_ps(y, kv, b3);
        }
        float d0 = hsum256(a0), d1 = hsum256(a1), d2 = hsum256(a2), d3 = hsum256(a3);
        float e0 = hsum256(b0), e1 = hsum256(b1), e2 = hsum256(b2), e3 = hsum256(b3);
        for (; i < hd; i++) {
            const float k0 = row1(K, kind, hd, r, i, c0), k1 = row1(K, kind, hd, r + 1, i, c1);
            const float k2 = row1(K, kind, hd, r + 2, i, c2), k3 = row1(K, kind, hd, r + 3, i, c3);
            d0 += q0[i] * k0, d1 += q0[i] * k1, d2 += q0[i] * k2, d3 += q0[i] * k3;
            e0 += q1[i] * k0, e1 += q1[i] * k1, e2 += q1[i] * k2, e3 += q1[i] * k3;
        }
        s0[r] = d0 * scale, s0[r + 1] = d1 * scale, s0[r + 2] = d2 * scale, s0[r + 3] = d3 * scale;
        s1[r] = e0 * scale, s1[r + 1] = e1 * scale, s1[r + 2] = e2 * scale, s1[r + 3] = e3 * scale;
    }
    if (r < n) {
        scores_x86(q0, rows_at(K, r), kind, n - r, hd, scale, s0 + r);
        scores_x86(q1, rows_at(K, r), kind, n - r, hd, scale, s1 + r);
    }
}

/* One instantiation per storage kind: every `kind` test folds away. */
#define X86_KERNEL_SET(sfx, KIND)                                                                           \
    X86_TARGET static void scores_##sfx(const float *q, rows_t K, int n, int hd, float scale, float *s) {  \
        scores_x86(q, K, KIND, n, hd, scale, s);                                                           \
    }                                                                                                      \
    X86_TARGET static void accum_##sfx(float *acc, const float *p, rows_t V, int n, int hd) {             \
        accum_x86(acc, p, V, KIND, n, hd);                                                                 \
    }                                                                                                      \
    X86_TARGET static void scores2_##sfx(const float *q0, const float *q1, rows_t K, int n, int hd,       \
                                         float scale, float *s0, float *s1) {                             \
        scores2_x86(q0, q1, K, KIND, n, hd, scale, s0, s1);                                               \
    }                                                                                                      \
    X86_TARGET static void accum2_##sfx(float *acc0, float *acc1, const float *p0, const float *p1,       \
                                        rows_t V, int n, int hd) {                                         \
        accum2_x86(acc0, acc1, p0, p1, V, KIND, n, hd);                                                   \
    }
X86_KERNEL_SET(f32_avx2, KV_F32)
X86_KERNEL_SET(f16_avx2, KV_F16)
X86_KERNEL_SET(i8_avx2, KV_I8)
static const kernel_set KERNELS_X86[3] = {
    {scores_f32_avx2, accum_f32_avx2, scores2_f32_avx2, accum2_f32_avx2},
    {scores_f16_avx2, accum_f16_avx2, scores2_f16_avx2, accum2_f16_avx2},
    {scores_i8_avx2, accum_i8_avx2, scores2_i8_avx2, accum2_i8_avx2},
};

/* exp_approx on 8 lanes (same clamps, reduction and polynomial; round half to even for n) */
X86_TARGET static __m256 exp8_avx2(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

X86_TARGET static float softmax_avx2(float *s, int n, float *m, float *corr) {
    __m256 mv = _mm256_set1_ps(*m);
    int r = 0;
    for (; r + 8 <= n; r += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(s + r));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mv), _mm256_extractf128_ps(mv, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    float cm = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
    for (; r < n; r++) cm = s[r] > cm ? s[r] : cm;
    *corr = *m == -INFINITY ? 0.0f : exp_approx(*m - cm);
    *m = cm;
    const __m256 cv = _mm256_set1_ps(cm);
    __m256 acc = _mm256_setzero_ps();
    r = 0;
    for (; r + 8 <= n; r += 8) {
        const __m256 e = exp8_avx2(_mm256_sub_ps(_mm256_loadu_ps(s + r), cv));
        _mm256_storeu_ps(s + r, e);
        acc = _mm256_add_ps(acc, e);
    }
    float sum = hsum256(acc);
    for (; r < n; r++) sum += (s[r] = exp_approx(s[r] - cm));
    return sum;
}
#endif

/* ---- ARM64: NEON (fp16 <-> fp32 conversion is part of base AArch64) ----------------------- */

#if defined(POCKETLM_ARM64)
/* Row r's scale (int8 rows; 0 otherwise), then 4 values at i or one value, as cvt_*_scalar gives them. */
static inline __attribute__((always_inline)) float row_scale(rows_t R, int kind, int r) {
    return kind == KV_I8 ? fp16_to_fp32(R.rs[r]) : 0.0f;
}
static inline __attribute__((always_inline)) float32x4_t row4(rows_t R, int kind, int hd, int r, int i, float s) {
    const size_t at = (size_t)r * hd + i;
    if (kind == KV_F32) return vld1q_f32((const float *)R.base + at);
    if (kind == KV_F16) return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t *)R.base + at)));
    int32_t w; /* 4 bytes (an 8-byte load could pass the cache's end) */
    memcpy(&w, (const int8_t *)R.base + at, 4);
    const int16x8_t h = vmovl_s8(vreinterpret_s8_s32(vdup_n_s32(w)));
    return vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(h))), s);
}
static inline __attribute__((always_inline)) float row1(rows_t R, int kind, int hd, int r, int i, float s) {
    const size_t at = (size_t)r * hd + i;
    if (kind == KV_F32) return ((const float *)R.base)[at];
    if (kind == KV_F16) return fp16_to_fp32(((const uint16_t *)R.base)[at]);
    return (float)((const int8_t *)R.base)[at] * s;
}
#define NEON_INLINE static inline __attribute__((always_inline))

/* One key's score: its sum over i in order in one 4-lane accumulator, the lane sum, the tail values
 * in order (the pair kernel does the same per key). */
NEON_INLINE float score_finish_arm(float32x4_t acc, const float *q, rows_t K, int kind, int hd, int r, int i,
                                   float c, float scale) {
    float d = vaddvq_f32(acc);
    for (; i < hd; i++) d += q[i] * row1(K, kind, hd, r, i, c);
    return d * scale;
}

/* 8 keys per pass: 8 independent FMA chains (latency 4, 2 pipes on the big cores) */
NEON_INLINE void scores_arm(const float *q, rows_t K, int kind, int n, int hd, float scale, float *s) {
    int r = 0;
    for (; r + 8 <= n; r += 8) {
        float c[8];
        float32x4_t a[8];
        prefetch_rows(K, r, 8);
        for (int j = 0; j < 8; j++) c[j] = row_scale(K, kind, r + j), a[j] = vdupq_n_f32(0.0f);
        int i = 0;
        for (; i + 4 <= hd; i += 4) {
            const float32x4_t qv = vld1q_f32(q + i);
            for (int j = 0; j < 8; j++) a[j] = vfmaq_f32(a[j], qv, row4(K, kind, hd, r + j, i, c[j]));
        }
        for (int j = 0; j < 8; j++) s[r + j] = score_finish_arm(a[j], q, K, kind, hd, r + j, i, c[j], scale);
    }
    for (; r < n; r++) {
        const float c0 = row_scale(K, kind, r);
        float32x4_t a0 = vdupq_n_f32(0.0f);
        prefetch_rows(K, r, 1);
        int i = 0;
        for (; i + 4 <= hd; i += 4) a0 = vfmaq_f32(a0, vld1q_f32(q + i), row4(K, kind, hd, r, i, c0));
        s[r] = score_finish_arm(a0, q, K, kind, hd, r, i, c0, scale);
    }
}

/* acc[i0 .. i0 + 4 NV) += sum_r p[r] V[r][same lanes], NV accumulators in registers (NV constant
 * after inlining); every lane adds its products in key order, one FMA each, in any kernel. */
NEON_INLINE void accum_block_arm(float *acc, const float *p, rows_t V, int kind, int n, int hd, int i0, int NV) {
    float32x4_t a[16];
    for (int v = 0; v < NV; v++) a[v] = vld1q_f32(acc + i0 + 4 * v);
    for (int r = 0; r < n; r++) {
        const float c = row_scale(V, kind, r);
        if (i0 == 0) prefetch_rows(V, r, 1);
        for (int v = 0; v < NV; v++) a[v] = vfmaq_n_f32(a[v], row4(V, kind, hd, r, i0 + 4 * v, c), p[r]);
    }
    for (int v = 0; v < NV; v++) vst1q_f32(acc + i0 + 4 * v, a[v]);
}

/* Two accumulator rows sharing each V load (2 x NV accumulators, NV <= 12). */
NEON_INLINE void accum2_block_arm(float *acc0, float *acc1, const float *p0, const float *p1, rows_t V, int kind,
                                  int n, int hd, int i0, int NV) {
    float32x4_t a[12], b[12];
    for (int v = 0; v < NV; v++) a[v] = vld1q_f32(acc0 + i0 + 4 * v), b[v] = vld1q_f32(acc1 + i0 + 4 * v);
    for (int r = 0; r < n; r++) {
        const float c = row_scale(V, kind, r);
        if (i0 == 0) prefetch_rows(V, r, 1);
        for (int v = 0; v < NV; v++) {
            const float32x4_t vv = row4(V, kind, hd, r, i0 + 4 * v, c);
            a[v] = vfmaq_n_f32(a[v], vv, p0[r]), b[v] = vfmaq_n_f32(b[v], vv, p1[r]);
        }
    }
    for (int v = 0; v < NV; v++) vst1q_f32(acc0 + i0 + 4 * v, a[v]), vst1q_f32(acc1 + i0 + 4 * v, b[v]);
}

/* The lanes past the last multiple of 4, one at a time (the same in single and pair kernels). */
NEON_INLINE void accum_lanes_arm(float *acc, const float *p, rows_t V, int kind, int n, int hd, int i0) {
    for (int i = i0; i < hd; i++)
        for (int r = 0; r < n; r++) acc[i] += p[r] * row1(V, kind, hd, r, i, row_scale(V, kind, r));
}

#define NV_CASES_16(call) /* `call(NV)` with NV a constant 1..16 */                                        \
    switch (nv) {                                                                                          \
    case 1: call(1); break; case 2: call(2); break; case 3: call(3); break; case 4: call(4); break;        \
    case 5: call(5); break; case 6: call(6); break; case 7: call(7); break; case 8: call(8); break;        \
    case 9: call(9); break; case 10: call(10); break; case 11: call(11); break; case 12: call(12); break;  \
    case 13: call(13); break; case 14: call(14); break; case 15: call(15); break; default: call(16); break; \
    }

NEON_INLINE void accum_arm(float *acc, const float *p, rows_t V, int kind, int n, int hd) {
    const int vecs = hd / 4;
    for (int done = 0, nv; done < vecs; done += nv) {
        nv = block_vectors(vecs - done, 16);
#define ACC1(NV) accum_block_arm(acc, p, V, kind, n, hd, 4 * done, NV)
        NV_CASES_16(ACC1)
#undef ACC1
    }
    accum_lanes_arm(acc, p, V, kind, n, hd, 4 * vecs);
}

NEON_INLINE void accum2_arm(float *acc0, float *acc1, const float *p0, const float *p1, rows_t V, int kind, int n,
                            int hd) {
    const int vecs = hd / 4;
    for (int done = 0, nv; done < vecs; done += nv) {
        nv = block_vectors(vecs - done, 12);
#define ACC2(NV) accum2_block_arm(acc0, acc1, p0, p1, V, kind, n, hd, 4 * done, (NV) < 12 ? (NV) : 12)
        NV_CASES_16(ACC2)
#undef ACC2
    }
    accum_lanes_arm(acc0, p0, V, kind, n, hd, 4 * vecs);
    accum_lanes_arm(acc1, p1, V, kind, n, hd, 4 * vecs);
}

NEON_INLINE void scores2_arm(const float *q0, const float *q1, rows_t K, int kind, int n, int hd, float scale,
                             float *s0, float *s1) {
    int r = 0;
    for (; r + 4 <= n; r += 4) {
        const float c0 = row_scale(K, kind, r), c1 = row_scale(K, kind, r + 1);
        const float c2 = row_scale(K, kind, r + 2), c3 = row_scale(K, kind, r + 3);
        float32x4_t a0 = vdupq_n_f32(0.0f), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        prefetch_rows(K, r, 4);
        int i = 0;
        for (; i + 4 <= hd; i += 4) {
            const float32x4_t x = vld1q_f32(q0 + i), y = vld1q_f32(q1 + i);
            float32x4_t kv = row4(K, kind, hd, r, i, c0);
            a0 = vfmaq_f32(a0, x, kv), b0 = vfmaq_f32(b0, y, kv);
            kv = row4(K, kind, hd, r + 1, i, c1);
            a1 = vfmaq_f32(a1, x, kv), b1 = vfmaq_f32(b1, y, kv);
            kv = row4(K, kind, hd, r + 2, i, c2);
            a2 = vfmaq_f32(a2, x, kv), b2 = vfmaq_f32(b2, y, kv);
            kv = row4(K, kind, hd, r + 3, i, c3);
            a3 = vfmaq_f32(a3, x, kv), b3 = vfmaq_f32(b3, y, kv);
        }
        float d0 = vaddvq_f32(a0), d1 = vaddvq_f32(a1), d2 = vaddvq_f32(a2), d3 = vaddvq_f32(a3);
        float e0 = vaddvq_f32(b0), e1 = vaddvq_f32(b1), e2 = vaddvq_f32(b2), e3 = vaddvq_f32(b3);
        for (; i < hd; i++) {
            const float k0 = row1(K, kind, hd, r, i, c0), k1 = row1(K, kind, hd, r + 1, i, c1);
            const float k2 = row1(K, kind, hd, r + 2, i, c2), k3 = row1(K, kind, hd, r + 3, i, c3);
            d0 += q0[i] * k0, d1 += q0[i] * k1, d2 += q0[i] * k2, d3 += q0[i] * k3;
            e0 += q1[i] * k0, e1 += q1[i] * k1, e2 += q1[i] * k2, e3 += q1[i] * k3;
        }
        s0[r] = d0 * scale, s0[r + 1] = d1 * scale, s0[r + 2] = d2 * scale, s0[r + 3] = d3 * scale;
        s1[r] = e0 * scale, s1[r + 1] = e1 * scale, s1[r + 2] = e2 * scale, s1[r + 3] = e3 * scale;
    }
    if (r < n) {
        scores_arm(q0, rows_at(K, r), kind, n - r, hd, scale, s0 + r);
        scores_arm(q1, rows_at(K, r), kind, n - r, hd, scale, s1 + r);
    }
}

#define NEON_KERNEL_SET(sfx, KIND)                                                                          \
    static void scores_##sfx(const float *q, rows_t K, int n, int hd, float scale, float *s) {             \
        scores_arm(q, K, KIND, n, hd, scale, s);                                                           \
    }                                                                                                      \
    static void accum_##sfx(float *acc, const float *p, rows_t V, int n, int hd) {                        \
        accum_arm(acc, p, V, KIND, n, hd);                                                                 \
    }                                                                                                      \
    static void scores2_##sfx(const float *q0, const float *q1, rows_t K, int n, int hd, float scale,     \
                              float *s0, float *s1) {                                                     \
        scores2_arm(q0, q1, K, KIND, n, hd, scale, s0, s1);                                               \
    }                                                                                                      \
    static void accum2_##sfx(float *acc0, float *acc1, const float *p0, const float *p1, rows_t V, int n,  \
                             int hd) {                                                                     \
        accum2_arm(acc0, acc1, p0, p1, V, KIND, n, hd);                                                   \
    }
NEON_KERNEL_SET(f32_neon, KV_F32)
NEON_KERNEL_SET(f16_neon, KV_F16)
NEON_KERNEL_SET(i8_neon, KV_I8)
static const kernel_set KERNELS_ARM[3] = {
    {scores_f32_neon, accum_f32_neon, scores2_f32_neon, accum2_f32_neon},
    {scores_f16_neon, accum_f16_neon, scores2_f16_neon, accum2_f16_neon},
    {scores_i8_neon, accum_i8_neon, scores2_i8_neon, accum2_i8_neon},
};

/* exp_approx on 4 lanes (same clamps, reduction and polynomial; round half to even for n) */
static inline float32x4_t exp4_neon(float32x4_t x) {
    x = vminq_f32(vmaxq_f32(x, vdupq_n_f32(-87.0f)), vdupq_n_f32(88.0f));
    const float32x4_t n = vrndnq_f32(vmulq_n_f32(x, 1.44269504f));
    float32x4_t r = vfmsq_n_f32(x, n, 0.693359375f);
    r = vfmaq_n_f32(r, n, 2.12194440e-4f);
    float32x4_t p = vdupq_n_f32(1.0f / 720.0f);
    p = vfmaq_f32(vdupq_n_f32(1.0f / 120.0f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.0f / 24.0f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.0f / 6.0f), p, r);
    p = vfmaq_f32(vdupq_n_f32(0.5f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.0f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.0f), p, r);
    const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
    return vmulq_f32(p, vreinterpretq_f32_s32(e));
}

static float softmax_neon(float *s, int n, float *m, float *corr) {
    float32x4_t mv = vdupq_n_f32(*m);
    int r = 0;
    for (; r + 4 <= n; r += 4) mv = vmaxq_f32(mv, vld1q_f32(s + r));
    float cm = vmaxvq_f32(mv);
    for (; r < n; r++) cm = s[r] > cm ? s[r] : cm;
    *corr = *m == -INFINITY ? 0.0f : exp_approx(*m - cm);
    *m = cm;
    const float32x4_t cv = vdupq_n_f32(cm);
    float32x4_t acc = vdupq_n_f32(0.0f);
    r = 0;
    for (; r + 4 <= n; r += 4) {
        const float32x4_t e = exp4_neon(vsubq_f32(vld1q_f32(s + r), cv));
        vst1q_f32(s + r, e);
        acc = vaddq_f32(acc, e);
    }
    float sum = vaddvq_f32(acc);
    for (; r < n; r++) sum += (s[r] = exp_approx(s[r] - cm));
    return sum;
}
#endif

/* ---- argument check ---------------------------------------------------------------------- */

const char *attention_args_error(const attention_args *a) {
    if (a->H < 1 || a->KV < 1 || a->hd < 1 || a->n_ctx < 1 || a->T < 1 || a->H > 65536 || a->hd > 65536)
        return "heads, kv_heads, head_dim, n_ctx and the row count must be >= 1 (heads, head_dim <= 65536)";
    if (a->H % a->KV) return "heads is not a multiple of kv_heads";
    if (a->kind < KV_F32 || a->kind > KV_I8) return "unknown cache kind";
    if ((a->kind == KV_I8) != (a->k_scale != NULL) || (a->kind == KV_I8) != (a->v_scale != NULL))
        return "k_scale and v_scale go with (and only with) an int8 cache";
    if (a->q_stride < a->H * a->hd) return "the q row stride is smaller than heads * head_dim";
    if (a->pos < 0 || a->pos > a->n_ctx - a->T) return "positions pos..pos+T-1 do not fit in the cache";
    if (a->window < 0) return "window must be >= 0 (0: none)";
    if (!(isfinite(a->scale) && a->scale > 0.0f)) return "scale must be a positive finite number";
    const block_sparse *sp = a->sparse;
    if (sp && (sp->block < 1 || sp->local_blocks < 1 || sp->vert_stride < 1 || sp->head_step < 0 ||
               sp->block > 65536 || sp->vert_stride > 65536 || sp->head_step > 65536))
        return "block-sparse block, local_blocks, vert_stride must be >= 1 and head_step >= 0 (each <= 65536)";
    return NULL;
}

/* ---- driver ------------------------------------------------------------------------------ */

typedef struct {
    const attention_args *a;
    cvt_fn cvt;           /* NULL: the kernels read the cache rows in place (fp32, or any SIMD path) */
    scores_fn scores;
    accum_fn accum;
    softmax_fn softmax;
    scores2_fn scores2; /* NULL: rows one at a time */
    accum2_fn accum2;
    size_t elem;          /* bytes per cached value: 4, 2 or 1 */
    int rows_per_item;    /* TQ, or 1 for decode */
    int n_tiles, heads_per_item, subs_per_group;
    int B;                /* key block: the sparse block size, or KCHUNK when dense */
    atomic_int failed;    /* a work item could not allocate its scratch */
} attn_job;

static inline int block_visible(const block_sparse *sp, int h, int ib, int jb) {
    if (!sp) return 1;
    return jb <= ib && (ib - jb < sp->local_blocks ||
                        ((int64_t)jb + (int64_t)h * sp->head_step + 1) % sp->vert_stride == 0);
}

/* Lowest key position row p may see (window), and the first visible position overall. */
static inline int first_key(const attention_args *a, int p) {
    return a->window > 0 && p + 1 > a->window ? p + 1 - a->window : 0;
}

/* The first key block >= jb (and <= jb_last) that some head in [h0, h1) sees from some query block
 * in [ib0, ib1]; jb_last + 1 if none. Dense: jb itself. */
static int next_block(const attention_args *a, int jb, int jb_last, int ib0, int ib1, int h0, int h1) {
    if (!a->sparse) return jb;
    for (; jb <= jb_last; jb++)
        for (int ib = ib0; ib <= ib1; ib++)
            for (int h = h0; h < h1; h++)
                if (block_visible(a->sparse, h, ib, jb)) return jb;
    return jb;
}

/* Keys [*k0, *k1) of the chunk [lo, c1) in key block jb that row t, head h sees; 0 if none. */
static inline int row_keys(const attention_args *a, int t, int h, int jb, int lo, int c1, int *k0, int *k1) {
    const int p = a->pos + t, f = first_key(a, p);
    if (!block_visible(a->sparse, h, p / (a->sparse ? a->sparse->block : 1), jb)) return 0;
    *k0 = f > lo ? f : lo;
    *k1 = p + 1 < c1 ? p + 1 : c1;
    return *k0 < *k1;
}

/* The first entry e' >= e (of R = rows x heads, head-major: row t0 + e' % nr, head h0 + e' / nr)
 * that sees keys of the chunk [lo, c1) in block jb; R if none. */
static inline int next_entry(const attention_args *a, int e, int R, int t0, int nr, int h0, int jb, int lo, int c1) {
    int k0, k1;
    while (e < R && !row_keys(a, t0 + e % nr, h0 + e / nr, jb, lo, c1, &k0, &k1)) e++;
    return e;
}

/* After the scores s[n] of one (row, head): its online-softmax step; a new max rescales the
 * running sum l and the accumulator o[hd]. s then holds the weights for p.V. */
static inline void softmax_step(const attn_job *J, float *s, int n, float *m, float *l, float *o, int hd) {
    float corr;
    const float sum = J->softmax(s, n, m, &corr);
    if (corr != 1.0f) {
        *l *= corr;
        for (int i = 0; i < hd; i++) o[i] *= corr;
    }
    *l += sum;
}

#ifndef ATTN_NEXT_ITEM_BYTES
#define ATTN_NEXT_ITEM_BYTES 4096
#endif

/* Decode (one query row, dense, the cache read in place): the first ATTN_NEXT_ITEM_BYTES of the keys
 * and values of the work item this thread most likely takes next (items come from a shared counter,
 * so about every pool_threads()-th), so that head's run does not start with demand misses (the
 * in-kernel prefetch only runs ahead within a run). */
static void prefetch_next_item(const attn_job *J, int next, int n_chunks, int g_now) {
    const attention_args *a = J->a;
    if (next >= n_chunks) return;
    const int g = next % (a->KV * J->subs_per_group) / J->subs_per_group;
    if (g == g_now) return; /* the same kv head: its rows are being read now */
    const size_t rb = (size_t)a->hd * J->elem, lo = (size_t)first_key(a, a->pos) * rb;
    const size_t end = (size_t)(a->pos + 1) * rb, hi = lo + ATTN_NEXT_ITEM_BYTES < end ? lo + ATTN_NEXT_ITEM_BYTES : end;
    const size_t head = (size_t)g * a->n_ctx * rb;
    for (size_t b = lo; b < hi; b += 64) {
        __builtin_prefetch((const uint8_t *)a->k + head + b, 0, 2);
        __builtin_prefetch((const uint8_t *)a->v + head + b, 0, 2);
    }
}

static void attend_item(void *ctx, int chunk, int n_chunks) {
    attn_job *J = ctx;
    const attention_args *a = J->a;
    /* chunk -> (tile, kv head, head subgroup); tiles in reverse: the last rows have the most keys */
    const int per_tile = a->KV * J->subs_per_group;
    const int tile = J->n_tiles - 1 - chunk / per_tile, g = chunk % per_tile / J->subs_per_group;
    const int sub = chunk % J->subs_per_group, G = a->H / a->KV, hd = a->hd;
    const int t0 = tile * J->rows_per_item, t1 = t0 + J->rows_per_item < a->T ? t0 + J->rows_per_item : a->T;
    const int h0 = g * G + sub * J->heads_per_item;
    const int h1 = h0 + J->heads_per_item < (g + 1) * G ? h0 + J->heads_per_item : (g + 1) * G;
    const int nr = t1 - t0, nh = h1 - h0, R = nr * nh; /* (row, head) pairs of this item */
    if (nh <= 0) return;
    if (a->T == 1 && !J->cvt && !a->sparse && ATTN_NEXT_ITEM_BYTES > 0)
        prefetch_next_item(J, chunk + pool_threads(), n_chunks, g);

    /* scratch: Kf, Vf [KCHUNK, hd] (fp16/int8 only), s [2, KCHUNK], m [R], l [R], acc [R, hd] */
    const size_t conv = J->cvt ? 2 * (size_t)KCHUNK * hd : 0;
    float *mem = malloc(sizeof(float) * (conv + 2 * KCHUNK + 2 * (size_t)R + (size_t)R * hd));
    if (!mem) {
        atomic_store(&J->failed, 1);
        return;
    }
    float *Kf = mem, *Vf = mem + (conv ? (size_t)KCHUNK * hd : 0), *s = mem + conv;
    float *s1 = s + KCHUNK, *m = s1 + KCHUNK, *l = m + R, *acc = l + R;
    for (int r = 0; r < R; r++) m[r] = -INFINITY, l[r] = 0.0f;
    memset(acc, 0, sizeof(float) * (size_t)R * hd);

    const int B = J->B, p_first = a->pos + t0, p_last = a->pos + t1 - 1;
    const int klo = first_key(a, p_first), khi = p_last + 1; /* keys any row of the item may see */
    const size_t head_row0 = (size_t)g * a->n_ctx;            /* row [g, 0] of the [KV, n_ctx] cache */
    const size_t row_bytes = (size_t)hd * J->elem;
    const uint8_t *kc = a->k, *vc = a->v;
    const int jb_last = (khi - 1) / B;
    for (int jb = next_block(a, klo / B, jb_last, p_first / B, p_last / B, h0, h1); jb <= jb_last;
         jb = next_block(a, jb + 1, jb_last, p_first / B, p_last / B, h0, h1)) {
        const int b0 = jb * B, b1 = b0 + B < khi ? b0 + B : khi;
        /* chunks on the absolute grid b0 + k*KCHUNK, cut to the keys [klo, khi) */
        for (int c0 = b0; c0 < b1; c0 += KCHUNK) {
            const int c1 = c0 + KCHUNK < b1 ? c0 + KCHUNK : b1;
            if (c1 <= klo) continue;
            const int lo = c0 > klo ? c0 : klo; /* rows [lo, c1) of the chunk are read */
            const size_t first = head_row0 + (size_t)lo;
            const int i8 = a->kind == KV_I8;
            /* positions lo..; read in place, the rows up to the item's last key are prefetched (to
             * the block's end when block-sparse: the next block read may be far) */
            const int ahead = (a->sparse ? b1 : khi) - lo;
            rows_t Kc = {kc + first * row_bytes, i8 ? a->k_scale + first : NULL, row_bytes, ahead};
            rows_t Vc = {vc + first * row_bytes, i8 ? a->v_scale + first : NULL, row_bytes, ahead};
            if (J->cvt) { /* converted once for every (row, head) of the item */
                J->cvt(Kf, Kc.base, Kc.rs, c1 - lo, hd);
                J->cvt(Vf, Vc.base, Vc.rs, c1 - lo, hd);
                Kc = (rows_t){Kf, NULL, (size_t)hd * sizeof(float), 0};
                Vc = (rows_t){Vf, NULL, (size_t)hd * sizeof(float), 0};
            }
            /* each (row, head) that sees keys of this chunk: scores, online-softmax step, p.V.
             * Entries e = (head, row) in head-major order; two consecutive ones with the same
             * keys (two rows of a head, or in decode two heads of the GQA group) go through the
             * pair kernels together */
            int e = next_entry(a, 0, R, t0, nr, h0, jb, lo, c1), k0 = 0, k1 = 0;
            if (e < R) row_keys(a, t0 + e % nr, h0 + e / nr, jb, lo, c1, &k0, &k1);
            while (e < R) {
                const int f = next_entry(a, e + 1, R, t0, nr, h0, jb, lo, c1);
                int f0 = 0, f1 = 0;
                if (f < R) row_keys(a, t0 + f % nr, h0 + f / nr, jb, lo, c1, &f0, &f1);
                const int n = k1 - k0, te = t0 + e % nr, he = h0 + e / nr;
                const int r = (te - t0) * nh + (he - h0);
                const float *q = a->q + (size_t)te * a->q_stride + (size_t)he * hd;
                const rows_t Kr = rows_at(Kc, k0 - lo), Vr = rows_at(Vc, k0 - lo);
                if (J->scores2 && f < R && f0 == k0 && f1 == k1) {
                    const int tf = t0 + f % nr, hf = h0 + f / nr, r2 = (tf - t0) * nh + (hf - h0);
                    J->scores2(q, a->q + (size_t)tf * a->q_stride + (size_t)hf * hd, Kr, n, hd, a->scale, s, s1);
                    softmax_step(J, s, n, &m[r], &l[r], acc + (size_t)r * hd, hd);
                    softmax_step(J, s1, n, &m[r2], &l[r2], acc + (size_t)r2 * hd, hd);
                    J->accum2(acc + (size_t)r * hd, acc + (size_t)r2 * hd, s, s1, Vr, n, hd);
                    e = next_entry(a, f + 1, R, t0, nr, h0, jb, lo, c1);
                    if (e < R) row_keys(a, t0 + e % nr, h0 + e / nr, jb, lo, c1, &k0, &k1);
                } else {
                    J->scores(q, Kr, n, hd, a->scale, s);
                    softmax_step(J, s, n, &m[r], &l[r], acc + (size_t)r * hd, hd);
                    J->accum(acc + (size_t)r * hd, s, Vr, n, hd);
                    e = f, k0 = f0, k1 = f1;
                }
            }
        }
    }
    /* every (row, head) saw at least its own key (the diagonal block is local, the window >= 1):
     * l >= exp(0) = 1 */
    for (int t = t0; t < t1; t++)
        for (int h = h0; h < h1; h++) {
            const int r = (t - t0) * nh + (h - h0);
            const float inv = 1.0f / l[r];
            float *dst = a->out + (size_t)t * a->H * hd + (size_t)h * hd;
            for (int i = 0; i < hd; i++) dst[i] = acc[(size_t)r * hd + i] * inv;
        }
    free(mem);
}

int run_attention(const attention_args *a, int simd) {
    if (attention_args_error(a)) return -2;
    static const cvt_fn CVT[3] = {NULL, cvt_f16_scalar, cvt_i8_scalar};
    static const size_t ELEM[3] = {4, 2, 1};
    attn_job J = {.a = a, .cvt = CVT[a->kind], .scores = scores_scalar, .accum = accum_scalar,
                  .softmax = softmax_scalar, .elem = ELEM[a->kind]};
    /* SIMD: every item reads the cache rows in place with the kernels of its kind, decode and
     * prompt tiles alike (converting a prompt tile's chunk into fp32 scratch once for its rows,
     * as this did before, was slower: x86, fp16 cache, 2 threads, us per layer, T = 9 at position
     * 64 / 512 / 2048: 147 / 982 / 3771 converted against 105 / 552 / 2010 in place; T = 128 at 0 /
     * 1024: 1628 / 22953 against 1187 / 13723; int8 even to 1.16x faster; the same bits) */
    const kernel_set *ks = NULL;
#if defined(POCKETLM_X86)
    if (simd) ks = KERNELS_X86, J.softmax = softmax_avx2;
#elif defined(POCKETLM_ARM64)
    if (simd) ks = KERNELS_ARM, J.softmax = softmax_neon;
#endif
    if (ks) {
        const kernel_set *k = &ks[a->kind];
        J.cvt = NULL;
        J.scores = k->scores, J.accum = k->accum, J.scores2 = k->scores2, J.accum2 = k->accum2;
    }
    J.B = a->sparse ? a->sparse->block : KCHUNK;
    J.rows_per_item = a->T == 1 ? 1 : TQ;
    J.n_tiles = (a->T + J.rows_per_item - 1) / J.rows_per_item;
    /* split GQA groups into head subgroups only when tiles x kv heads leave threads idle (decode
     * with few kv heads): a whole group shares each chunk's conversion and cache reads */
    const int G = a->H / a->KV, threads = pool_threads();
    const int64_t items = (int64_t)J.n_tiles * a->KV;
    int subs = items >= 4 * threads ? 1 : (int)((4 * threads + items - 1) / items);
    subs = subs < G ? subs : G;
    J.heads_per_item = (G + subs - 1) / subs;
    J.subs_per_group = (G + J.heads_per_item - 1) / J.heads_per_item;
    atomic_init(&J.failed, 0);
    const int64_t n_items = items * J.subs_per_group;
    if (n_items > (1 << 30)) return -2;
    /* small jobs stay on the caller: waking the pool costs more than a few hundred dot products
     * (work ~ query rows x heads x visible keys x hd, bounded here by the dense count) */
    const int64_t span = a->window > 0 && a->window < a->pos + a->T ? a->window : a->pos + a->T;
    const double work = (double)a->T * a->H * (double)span * a->hd;
    if (work < 65536.0 || n_items == 1) {
        for (int c = 0; c < (int)n_items; c++) attend_item(&J, c, (int)n_items);
    } else {
        pool_run(attend_item, &J, (int)n_items);
    }
    return atomic_load(&J.failed) ? -1 : 0;
}
