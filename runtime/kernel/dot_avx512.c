/* AVX-512 (F, BW, VL) + VNNI dot products (Ice Lake, Sapphire Rapids, Zen 4 and later), with
 * `vpdpbusd` for the u8 x s8 sums: packed Q4_0 and Q8_0 in 512-bit registers, raw Q4_0/Q4_1 per
 * block in 256-bit ones; the K-quants use the AVX2 kernels (fallback). Same integer sums and
 * per-block float formula as dot_scalar.c. CPUs with AVX-512 but no VNNI use the AVX2 path. */
#include "kernel.h"

#if defined(POCKETLM_X86)
#include <immintrin.h>

#define TARGET __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))
#define INLINE static inline __attribute__((always_inline)) TARGET
#define BLOCK_ID(i) (idx ? idx[i] : (i))
#define DEFINE_DOT(name, impl)                                                                     \
    TARGET static float name(const uint8_t *row, const q8_act *a, int nb, const int32_t *idx, int n) { \
        return idx ? impl(row, a, nb, idx, n) : impl(row, a, nb, NULL, nb);                                \
    }

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
 * costs extra shuffles); VNNI fuses the AVX2 path's maddubs + madd. Four accumulators hide the FMA
 * latency. */
INLINE float q4_generic(const uint8_t *row, const q8_act *a, int nb_row, const int32_t *idx, int n, int bsz, int has_m) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    float corr = 0.0f;
    const int qoff = has_m ? 4 : 2;
    int i = 0;
    for (; i + 3 < n; i += 4) {
        prefetch_ahead(row, idx, i, n, nb_row, bsz);
        for (int u = 0; u < 4; u++) {
            const int b = BLOCK_ID(i + u);
            const uint8_t *k = row + (size_t)b * bsz;
            const __m256i w = _mm256_and_si256(spread_nibbles(k + qoff), m4);
            const __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w,
                                                  _mm256_loadu_si256((const __m256i *)(a->qs + b * QK)));
            const float d = half(k);
            acc[u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * a->d[b]), acc[u]);
            corr += (has_m ? half(k + 2) : d) * a->s[b];
        }
    }
    for (; i < n; i++) {
        const int b = BLOCK_ID(i);
        const uint8_t *k = row + (size_t)b * bsz;
        const __m256i w = _mm256_and_si256(spread_nibbles(k + qoff), m4);
        const __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w,
                                              _mm256_loadu_si256((const __m256i *)(a->qs + b * QK)));
        const float d = half(k);
        acc[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * a->d[b]), acc[0]);
        corr += (has_m ? half(k + 2) : d) * a->s[b];
    }
    const __m256 all = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(all), _mm256_extractf128_ps(all, 1));
    s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
    const float total = _mm_cvtss_f32(s4);
    return has_m ? total + corr : total - 8.0f * corr;
}

INLINE float q4_0(const uint8_t *row, const q8_act *a, int nb_row, const int32_t *idx, int n) {
    return q4_generic(row, a, nb_row, idx, n, 18, 0);
}
INLINE float q4_1(const uint8_t *row, const q8_act *a, int nb_row, const int32_t *idx, int n) {
    return q4_generic(row, a, nb_row, idx, n, 20, 1);
}

/* s8 x s8 with vpdpbusd: |w| (unsigned) times a carrying w's sign. */
INLINE __m512i q8_pair(const uint8_t *k0, const uint8_t *k1, __m512i x) {
    const __m512i w = join256(_mm256_loadu_si256((const __m256i *)(k0 + 2)), _mm256_loadu_si256((const __m256i *)(k1 + 2)));
    const __m512i xs = _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(w), _mm512_setzero_si512(), x);
    return _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_abs_epi8(w), xs);
}

INLINE float q8_0(const uint8_t *row, const q8_act *a, int nb_row, const int32_t *idx, int n) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int i = 0;
    for (; i + 3 < n; i += 4) {
        const int b0 = BLOCK_ID(i), b1 = BLOCK_ID(i + 1), b2 = BLOCK_ID(i + 2), b3 = BLOCK_ID(i + 3);
        const uint8_t *k0 = row + (size_t)b0 * 34, *k1 = row + (size_t)b1 * 34;
        const uint8_t *k2 = row + (size_t)b2 * 34, *k3 = row + (size_t)b3 * 34;
        prefetch_ahead(row, idx, i, n, nb_row, 34);
        prefetch_ahead(row + 64, idx, i, n, nb_row, 34);
        const __m512i p01 = q8_pair(k0, k1, act_pair(a, b0, b1));
        const __m512i p23 = q8_pair(k2, k3, act_pair(a, b2, b3));
        acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p01), scale_pair(half(k0) * a->d[b0], half(k1) * a->d[b1]), acc0);
        acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p23), scale_pair(half(k2) * a->d[b2], half(k3) * a->d[b3]), acc1);
    }
    __m256 tail = _mm256_setzero_ps();
    for (; i < n; i++) {
        const int b = BLOCK_ID(i);
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

/* Packed Q4_0 (kernel.h): per 8-block group one 8-scale conversion, two 64-byte loads, four
 * vpdpbusd; idx/n count groups. */
INLINE float q4_0_packed(const uint8_t *row, const q8_act *a, int nb_row, const int32_t *idx, int n) {
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    /* lanes 0..7 take the scale of the pair's first block, lanes 8..15 of its second */
    const __m512i s01 = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i s23 = _mm512_add_epi32(s01, _mm512_set1_epi32(2));
    const __m512i s45 = _mm512_add_epi32(s01, _mm512_set1_epi32(4));
    const __m512i s67 = _mm512_add_epi32(s01, _mm512_set1_epi32(6));
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps(), acc2 = _mm512_setzero_ps(),
           acc3 = _mm512_setzero_ps();
    __m256 corr = _mm256_setzero_ps();
    for (int i = 0; i < n; i++) {
        const int g = BLOCK_ID(i);
        const uint8_t *grp = row + (size_t)g * 144;
        prefetch_ahead(row, idx, i, n, nb_row, 144);
        prefetch_ahead(row + 64, idx, i, n, nb_row, 144);
        const __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)grp));
        const __m512 sv = _mm512_castps256_ps512(_mm256_mul_ps(dv, _mm256_loadu_ps(a->d + 8 * g)));
        corr = _mm256_fmadd_ps(dv, _mm256_loadu_ps(a->s + 8 * g), corr);
        const int8_t *aq = a->qs + (size_t)g * 256;
        const __m512i v0 = _mm512_loadu_si512(grp + 16), v1 = _mm512_loadu_si512(grp + 80);
        const __m512i p0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(v0, m4), _mm512_loadu_si512(aq));
        const __m512i p1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(_mm512_srli_epi16(v0, 4), m4),
                                               _mm512_loadu_si512(aq + 64));
        const __m512i p2 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(v1, m4), _mm512_loadu_si512(aq + 128));
        const __m512i p3 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(_mm512_srli_epi16(v1, 4), m4),
                                               _mm512_loadu_si512(aq + 192));
        acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p0), _mm512_permutexvar_ps(s01, sv), acc0);
        acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p1), _mm512_permutexvar_ps(s23, sv), acc1);
        acc2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p2), _mm512_permutexvar_ps(s45, sv), acc2);
        acc3 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p3), _mm512_permutexvar_ps(s67, sv), acc3);
    }
    const __m512 all = _mm512_add_ps(_mm512_add_ps(acc0, acc1), _mm512_add_ps(acc2, acc3));
    const __m512 c = _mm512_castpd_ps(_mm512_insertf64x4(_mm512_setzero_pd(), _mm256_castps_pd(corr), 0));
    return _mm512_reduce_add_ps(all) - 8.0f * _mm512_reduce_add_ps(c);
}

DEFINE_DOT(dot_q4_0, q4_0)
DEFINE_DOT(dot_q4_0_packed, q4_0_packed)
DEFINE_DOT(dot_q4_1, q4_1)
DEFINE_DOT(dot_q8_0, q8_0)

const kernel_path path_avx512 = {
    .name = "avx512",
    .dot = {dot_q4_0, dot_q4_1, dot_q8_0, NULL, NULL, dot_q4_0_packed},
    .fallback = "avx2",
    .gemm = &gemm_avx512,
};

#endif
