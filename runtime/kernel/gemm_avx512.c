/* AVX-512 VNNI micro-kernel of the batched path (gemm.h): ROWS = 4 weight rows x 32 activation
 * rows (two 16-lane registers) per tile. Per 4 values: two 64-byte activation loads, four 4-byte
 * weight broadcasts, eight `vpdpbusd`; per sub-block: one int->float conversion and two float ops
 * per accumulator. 8 integer + 8 float accumulators (+ 8 partial sums for the K-quants, whose
 * activation scale spans 256 values) stay in the 32 zmm registers. */
#include "gemm.h"

#if defined(POCKETLM_X86)
#include <immintrin.h>

#define TARGET __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))
#define INLINE static inline __attribute__((always_inline)) TARGET
#define LANES 32
#define ROWS 4 /* weight rows per tile (row-major, as the scalar kernel) */

/* ---- weight decoding (the same codes and factors as gemm_decode_row, 32 or 64 at a time) ---- */

/* 32 nibbles of 16 bytes in value order (low nibbles, then high), as unsigned 0..15. */
INLINE __m256i nibbles32(const uint8_t *qs) {
    const __m128i v = _mm_loadu_si128((const __m128i *)qs);
    const __m256i both = _mm256_inserti128_si256(_mm256_castsi128_si256(v), _mm_srli_epi16(v, 4), 1);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

/* corr[j] = -128 * sum of codes j*sb .. j*sb+sb-1 of q[K] (sb 16 or 32): byte sums of q + 128
 * with `vpsadbw`, minus the offset. */
INLINE void code_sums(const int8_t *q, int K, int sb, int32_t *corr) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    for (int k = 0; k < K; k += 64) {
        uint64_t part[8]; /* sums of 8 bytes */
        _mm512_storeu_si512(part, _mm512_sad_epu8(_mm512_xor_si512(_mm512_loadu_si512(q + k), flip),
                                                  _mm512_setzero_si512()));
        for (int i = 0; i < 8; i += sb / 8) {
            int64_t s = 0;
            for (int u = 0; u < sb / 8; u++) s += (int64_t)part[i + u];
            corr[(k + 8 * i) / sb] = -128 * (int32_t)(s - 128 * sb);
        }
    }
}

/* One packed group's codes (kernel.h) into value order: V[v] holds values 4v..4v+3 of the 16
 * sub-blocks (one dword lane each); a dword transpose (unpack 32, unpack 64 within 128-bit lanes,
 * then 16-byte moves) writes sub-block b's 32 codes to q[32b..32b+31]. */
INLINE void packed_codes(const __m512i V[8], int8_t *q) {
    __m512i B[2][4]; /* B[h][e]: 128-bit lane l holds dword 4l + e of V[4h .. 4h+3] */
    for (int h = 0; h < 2; h++) {
        const __m512i a_lo = _mm512_unpacklo_epi32(V[4 * h], V[4 * h + 1]), a_hi = _mm512_unpackhi_epi32(V[4 * h], V[4 * h + 1]);
        const __m512i b_lo = _mm512_unpacklo_epi32(V[4 * h + 2], V[4 * h + 3]), b_hi = _mm512_unpackhi_epi32(V[4 * h + 2], V[4 * h + 3]);
        B[h][0] = _mm512_unpacklo_epi64(a_lo, b_lo);
        B[h][1] = _mm512_unpackhi_epi64(a_lo, b_lo);
        B[h][2] = _mm512_unpacklo_epi64(a_hi, b_hi);
        B[h][3] = _mm512_unpackhi_epi64(a_hi, b_hi);
    }
    int8_t tmp[2][4][64];
    for (int h = 0; h < 2; h++)
        for (int e = 0; e < 4; e++) _mm512_storeu_si512(tmp[h][e], B[h][e]);
    for (int e = 0; e < 4; e++)
        for (int l = 0; l < 4; l++) { /* sub-block 4l + e: codes 0..15 from V[0..3], 16..31 from V[4..7] */
            int8_t *o = q + 32 * (4 * l + e);
            _mm_storeu_si128((__m128i *)o, _mm_loadu_si128((const __m128i *)(tmp[0][e] + 16 * l)));
            _mm_storeu_si128((__m128i *)(o + 16), _mm_loadu_si128((const __m128i *)(tmp[1][e] + 16 * l)));
        }
}

TARGET static void decode_avx512(const gtype_info *t, const uint8_t *row, int K, int r, wtile *w) {
    const int sb = t->gtype == GT_Q6_K ? 16 : 32, nsb = K / sb;
    int8_t *q = w->q + (size_t)r * K;
    float *scale = w->scale + (size_t)r * nsb, *minv = w->minv + (size_t)r * (K / 32);
    const __m256i eight = _mm256_set1_epi8(8);
    switch (t->gtype) {
    case GT_Q4_0_PACKED:
    case GT_Q8_0_PACKED:
    case GT_Q4_K_PACKED: {
        const int q8 = t->gtype == GT_Q8_0_PACKED, gbytes = q8 ? 544 : 288;
        const __m512i m4 = _mm512_set1_epi8(0x0F), flip = _mm512_set1_epi8((char)0x80);
        const __m512i off = _mm512_set1_epi8(t->gtype == GT_Q4_0_PACKED ? 8 : 0);
        for (int g = 0; g < K / PACK_VALUES; g++) {
            const uint8_t *grp = row + (size_t)g * gbytes;
            __m512i V[8];
            for (int v = 0; v < 8; v++) {
                if (q8) {
                    V[v] = _mm512_xor_si512(_mm512_loadu_si512(grp + 32 + 64 * v), flip); /* u8 - 128 */
                } else {
                    const __m512i c = _mm512_loadu_si512(grp + 32 + 64 * (v / 2));
                    V[v] = _mm512_sub_epi8(_mm512_and_si512(v % 2 ? _mm512_srli_epi16(c, 4) : c, m4), off);
                }
            }
            packed_codes(V, q + PACK_VALUES * g);
            if (t->gtype == GT_Q4_K_PACKED) {
                for (int s = 0; s < 2; s++) {
                    uint8_t sc[8], m[8];
                    q4k_scales_mins(grp + 8 + 12 * s, sc, m);
                    const float d = _cvtsh_ss(read_u16(grp + 2 * s)), dmin = _cvtsh_ss(read_u16(grp + 4 + 2 * s));
                    for (int j = 0; j < 8; j++) {
                        scale[16 * g + 8 * s + j] = d * (float)sc[j];
                        minv[16 * g + 8 * s + j] = -dmin * (float)m[j];
                    }
                }
            } else {
                _mm512_storeu_ps(scale + 16 * g, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)grp)));
            }
        }
        break;
    }
    case GT_Q4_0:
        for (int b = 0; b < K / 32; b++) {
            const uint8_t *blk = row + (size_t)b * 18;
            _mm256_storeu_si256((__m256i *)(q + 32 * b), _mm256_sub_epi8(nibbles32(blk + 2), eight));
            scale[b] = _cvtsh_ss(read_u16(blk));
        }
        break;
    case GT_Q4_1:
        for (int b = 0; b < K / 32; b++) {
            const uint8_t *blk = row + (size_t)b * 20;
            _mm256_storeu_si256((__m256i *)(q + 32 * b), nibbles32(blk + 4));
            scale[b] = _cvtsh_ss(read_u16(blk));
            minv[b] = _cvtsh_ss(read_u16(blk + 2));
        }
        break;
    case GT_Q8_0:
        for (int b = 0; b < K / 32; b++) {
            const uint8_t *blk = row + (size_t)b * 34;
            _mm256_storeu_si256((__m256i *)(q + 32 * b), _mm256_loadu_si256((const __m256i *)(blk + 2)));
            scale[b] = _cvtsh_ss(read_u16(blk));
        }
        break;
    case GT_Q4_K: {
        const __m256i m4 = _mm256_set1_epi8(0x0F);
        for (int b = 0; b < K / 256; b++) {
            const uint8_t *blk = row + (size_t)b * 144;
            const float d = _cvtsh_ss(read_u16(blk)), dmin = _cvtsh_ss(read_u16(blk + 2));
            uint8_t sc[8], m[8];
            q4k_scales_mins(blk + 4, sc, m);
            for (int j = 0; j < 8; j++) {
                scale[8 * b + j] = d * (float)sc[j];
                minv[8 * b + j] = -dmin * (float)m[j];
            }
            for (int c = 0; c < 4; c++) { /* 32 bytes: low nibbles = sub-block 2c, high = 2c+1 */
                const __m256i v = _mm256_loadu_si256((const __m256i *)(blk + 16 + 32 * c));
                _mm256_storeu_si256((__m256i *)(q + 256 * b + 64 * c), _mm256_and_si256(v, m4));
                _mm256_storeu_si256((__m256i *)(q + 256 * b + 64 * c + 32), _mm256_and_si256(_mm256_srli_epi16(v, 4), m4));
            }
        }
        break;
    }
    case GT_Q6_K: {
        const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(0x30), off = _mm256_set1_epi8(32);
        for (int b = 0; b < K / 256; b++) {
            const uint8_t *blk = row + (size_t)b * 210;
            const float d = _cvtsh_ss(read_u16(blk + 208));
            for (int j = 0; j < 16; j++) scale[16 * b + j] = d * (float)((const int8_t *)(blk + 192))[j];
            for (int h = 0; h < 2; h++) {
                const __m256i l0 = _mm256_loadu_si256((const __m256i *)(blk + 64 * h));
                const __m256i l1 = _mm256_loadu_si256((const __m256i *)(blk + 64 * h + 32));
                const __m256i hb = _mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * h));
                /* value 32k + l: low 4 bits from l0/l1 (k & 1) nibble k >> 1, high 2 from hb bits 2k */
                const __m256i lo[4] = {_mm256_and_si256(l0, m4), _mm256_and_si256(l1, m4),
                                       _mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                                       _mm256_and_si256(_mm256_srli_epi16(l1, 4), m4)};
                const __m256i hi[4] = {_mm256_and_si256(_mm256_slli_epi16(hb, 4), m2),
                                       _mm256_and_si256(_mm256_slli_epi16(hb, 2), m2), _mm256_and_si256(hb, m2),
                                       _mm256_and_si256(_mm256_srli_epi16(hb, 2), m2)};
                for (int k = 0; k < 4; k++)
                    _mm256_storeu_si256((__m256i *)(q + 256 * b + 128 * h + 32 * k),
                                        _mm256_sub_epi8(_mm256_or_si256(lo[k], hi[k]), off));
            }
        }
        break;
    }
    default:
        gemm_decode_row(t, row, K, q, scale, minv, w->corr + (size_t)r * nsb);
        return;
    }
    code_sums(q, K, sb, w->corr + (size_t)r * nsb);
}

INLINE __m512i bcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

/* Integer dots of sub-block j (sb values) for the 4 rows x 2 halves, starting from the corrections. */
INLINE void subblock_dots(const wtile *w, const agroup *a, int sb, int nsb, int j, __m512i P[ROWS][2]) {
    const int K = w->K;
    for (int r = 0; r < ROWS; r++) P[r][0] = P[r][1] = _mm512_set1_epi32(w->corr[r * nsb + j]);
    const uint8_t *ap = a->qs + (size_t)j * (sb / 4) * LANES * 4;
    const int8_t *wq = w->q + (size_t)j * sb;
    for (int c = 0; c < sb / 4; c++, ap += LANES * 4, wq += 4) {
        const __m512i A0 = _mm512_loadu_si512(ap), A1 = _mm512_loadu_si512(ap + 64);
        for (int r = 0; r < ROWS; r++) {
            const __m512i wv = bcast4(wq + (size_t)r * K);
            P[r][0] = _mm512_dpbusd_epi32(P[r][0], A0, wv);
            P[r][1] = _mm512_dpbusd_epi32(P[r][1], A1, wv);
        }
    }
}

/* Activation scale per sub-block (Q4_0, Q4_1, Q8_0, packed Q4_0). */
INLINE void tile_32(const wtile *w, const agroup *a, int has_min, float *out) {
    const int K = w->K, nsb = K / 32;
    __m512 acc[ROWS][2];
    for (int r = 0; r < ROWS; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int j = 0; j < nsb; j++) {
        __m512i P[ROWS][2];
        subblock_dots(w, a, 32, nsb, j, P);
        const __m512 d0 = _mm512_loadu_ps(a->d + (size_t)j * LANES), d1 = _mm512_loadu_ps(a->d + (size_t)j * LANES + 16);
        for (int r = 0; r < ROWS; r++) {
            const __m512 s = _mm512_set1_ps(w->scale[r * nsb + j]);
            acc[r][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(P[r][0]), _mm512_mul_ps(d0, s), acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(P[r][1]), _mm512_mul_ps(d1, s), acc[r][1]);
        }
        if (has_min) {
            const __m512 x0 = _mm512_loadu_ps(a->xs + (size_t)j * LANES), x1 = _mm512_loadu_ps(a->xs + (size_t)j * LANES + 16);
            for (int r = 0; r < ROWS; r++) {
                const __m512 m = _mm512_set1_ps(w->minv[r * nsb + j]);
                acc[r][0] = _mm512_fmadd_ps(x0, m, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(x1, m, acc[r][1]);
            }
        }
    }
    for (int r = 0; r < ROWS; r++) {
        _mm512_storeu_ps(out + r * LANES, acc[r][0]);
        _mm512_storeu_ps(out + r * LANES + 16, acc[r][1]);
    }
}

/* K-quants: activation scale per 256 values, so each super-block's sub-block sums are gathered in
 * a partial sum first and scaled once. */
INLINE void tile_k(const wtile *w, const agroup *a, int sb, int has_min, float *out) {
    const int K = w->K, nsb = K / sb, per = QK_K / sb;
    __m512 acc[ROWS][2];
    for (int r = 0; r < ROWS; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int b = 0; b < K / QK_K; b++) {
        __m512 part[ROWS][2];
        for (int r = 0; r < ROWS; r++) part[r][0] = part[r][1] = _mm512_setzero_ps();
        for (int jj = 0; jj < per; jj++) {
            const int j = b * per + jj;
            __m512i P[ROWS][2];
            subblock_dots(w, a, sb, nsb, j, P);
            for (int r = 0; r < ROWS; r++) {
                const __m512 s = _mm512_set1_ps(w->scale[r * nsb + j]);
                part[r][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(P[r][0]), s, part[r][0]);
                part[r][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(P[r][1]), s, part[r][1]);
            }
            if (has_min) { /* sb == 32 */
                const __m512 x0 = _mm512_loadu_ps(a->xs + (size_t)j * LANES);
                const __m512 x1 = _mm512_loadu_ps(a->xs + (size_t)j * LANES + 16);
                for (int r = 0; r < ROWS; r++) {
                    const __m512 m = _mm512_set1_ps(w->minv[r * (K / 32) + j]);
                    part[r][0] = _mm512_fmadd_ps(x0, m, part[r][0]);
                    part[r][1] = _mm512_fmadd_ps(x1, m, part[r][1]);
                }
            }
        }
        const __m512 d0 = _mm512_loadu_ps(a->d + (size_t)b * LANES), d1 = _mm512_loadu_ps(a->d + (size_t)b * LANES + 16);
        for (int r = 0; r < ROWS; r++) {
            acc[r][0] = _mm512_fmadd_ps(part[r][0], d0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(part[r][1], d1, acc[r][1]);
        }
    }
    for (int r = 0; r < ROWS; r++) {
        _mm512_storeu_ps(out + r * LANES, acc[r][0]);
        _mm512_storeu_ps(out + r * LANES + 16, acc[r][1]);
    }
}

GEMM_DEFINE_TILE(tile_avx512, TARGET)

const gemm_kernel gemm_avx512 = {"avx512", ROWS, LANES, decode_avx512, tile_avx512, NULL};

#endif
