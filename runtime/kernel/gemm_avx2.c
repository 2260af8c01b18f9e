/* AVX2 micro-kernel of the batched path (gemm.h), for x86-64 CPUs without AVX-512 VNNI: 4 weight
 * rows (row-major tile, as the scalar kernel) x 8 activation rows (one 256-bit register). Without
 * `vpdpbusd`, each 4-value product is `vpmaddubsw` (u8 activation + 128 times s8 code, pairs into
 * int16) + `vpmaddwd` by ones (into int32). A pair sum is at most 2 * 255 * 32 for the 4- and 6-bit
 * codes; Q8_0's codes reach -128 and would saturate int16, so Q8_0 (raw or packed) keeps the row-by-row path. */
#include "gemm.h"

#if defined(POCKETLM_X86)
#include <immintrin.h>

#define TARGET __attribute__((target("avx2,fma,f16c")))
#define INLINE static inline __attribute__((always_inline)) TARGET
#define ROWS 4
#define LANES 8

TARGET static void decode_avx2(const gtype_info *t, const uint8_t *row, int K, int r, wtile *w) {
    const int nsb = K / (t->gtype == GT_Q6_K ? 16 : 32);
    gemm_decode_row(t, row, K, w->q + (size_t)r * K, w->scale + (size_t)r * nsb, w->minv + (size_t)r * (K / 32),
                    w->corr + (size_t)r * nsb);
}

static int supports_avx2(const gtype_info *t) { return t->gtype != GT_Q8_0 && t->gtype != GT_Q8_0_PACKED; }

INLINE __m256i bcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

/* Integer dots of sub-block j for the 4 rows, starting from the corrections. */
INLINE void subblock_dots(const wtile *w, const agroup *a, int sb, int nsb, int j, __m256i P[ROWS]) {
    const int K = w->K;
    const __m256i ones = _mm256_set1_epi16(1);
    for (int r = 0; r < ROWS; r++) P[r] = _mm256_set1_epi32(w->corr[r * nsb + j]);
    const uint8_t *ap = a->qs + (size_t)j * (sb / 4) * LANES * 4;
    const int8_t *wq = w->q + (size_t)j * sb;
    for (int c = 0; c < sb / 4; c++, ap += LANES * 4, wq += 4) {
        const __m256i A = _mm256_loadu_si256((const __m256i *)ap);
        for (int r = 0; r < ROWS; r++) {
            const __m256i p16 = _mm256_maddubs_epi16(A, bcast4(wq + (size_t)r * K));
            P[r] = _mm256_add_epi32(P[r], _mm256_madd_epi16(p16, ones));
        }
    }
}

INLINE void tile_32(const wtile *w, const agroup *a, int has_min, float *out) {
    const int K = w->K, nsb = K / 32;
    __m256 acc[ROWS];
    for (int r = 0; r < ROWS; r++) acc[r] = _mm256_setzero_ps();
    for (int j = 0; j < nsb; j++) {
        __m256i P[ROWS];
        subblock_dots(w, a, 32, nsb, j, P);
        const __m256 d = _mm256_loadu_ps(a->d + (size_t)j * LANES);
        for (int r = 0; r < ROWS; r++)
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(P[r]), _mm256_mul_ps(d, _mm256_set1_ps(w->scale[r * nsb + j])),
                                     acc[r]);
        if (has_min) {
            const __m256 x = _mm256_loadu_ps(a->xs + (size_t)j * LANES);
            for (int r = 0; r < ROWS; r++) acc[r] = _mm256_fmadd_ps(x, _mm256_set1_ps(w->minv[r * nsb + j]), acc[r]);
        }
    }
    for (int r = 0; r < ROWS; r++) _mm256_storeu_ps(out + r * LANES, acc[r]);
}

INLINE void tile_k(const wtile *w, const agroup *a, int sb, int has_min, float *out) {
    const int K = w->K, nsb = K / sb, per = QK_K / sb;
    __m256 acc[ROWS];
    for (int r = 0; r < ROWS; r++) acc[r] = _mm256_setzero_ps();
    for (int b = 0; b < K / QK_K; b++) {
        __m256 part[ROWS];
        for (int r = 0; r < ROWS; r++) part[r] = _mm256_setzero_ps();
        for (int jj = 0; jj < per; jj++) {
            const int j = b * per + jj;
            __m256i P[ROWS];
            subblock_dots(w, a, sb, nsb, j, P);
            for (int r = 0; r < ROWS; r++)
                part[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(P[r]), _mm256_set1_ps(w->scale[r * nsb + j]), part[r]);
            if (has_min) {
                const __m256 x = _mm256_loadu_ps(a->xs + (size_t)j * LANES);
                for (int r = 0; r < ROWS; r++)
                    part[r] = _mm256_fmadd_ps(x, _mm256_set1_ps(w->minv[r * (K / 32) + j]), part[r]);
            }
        }
        const __m256 d = _mm256_loadu_ps(a->d + (size_t)b * LANES);
        for (int r = 0; r < ROWS; r++) acc[r] = _mm256_fmadd_ps(part[r], d, acc[r]);
    }
    for (int r = 0; r < ROWS; r++) _mm256_storeu_ps(out + r * LANES, acc[r]);
}

GEMM_DEFINE_TILE(tile_avx2, TARGET)

const gemm_kernel gemm_avx2 = {"avx2", ROWS, LANES, decode_avx2, tile_avx2, supports_avx2};

#endif
