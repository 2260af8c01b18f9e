/* GGUF block types known to the kernel, fp16 conversion, block inspection. */
#include <math.h>
#include <string.h>

#include "kernel.h"

static const gtype_info TYPES[] = {
    {GT_Q4_0, SLOT_Q4_0, QK, 18, QK},          {GT_Q4_1, SLOT_Q4_1, QK, 20, QK},
    {GT_Q8_0, SLOT_Q8_0, QK, 34, QK},          {GT_Q4_K, SLOT_Q4_K, QK_K, 144, QK_K},
    {GT_Q6_K, SLOT_Q6_K, QK_K, 210, QK_K},     {GT_Q4_0_PACKED, SLOT_Q4_0_PACKED, 256, 144, QK},
};

const gtype_info *kernel_type_info(int gtype) {
    for (size_t i = 0; i < sizeof(TYPES) / sizeof(TYPES[0]); i++)
        if (TYPES[i].gtype == gtype) return &TYPES[i];
    return NULL;
}

float fp16_to_fp32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (man << 13); /* inf / nan */
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else { /* subnormal: renormalise */
        int e = -1;
        do {
            man <<= 1;
            e++;
        } while (!(man & 0x400));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3FF) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static int half_is_zero(const uint8_t *p) { return (read_u16(p) & 0x7FFF) == 0; }
static int half_is_bad(const uint8_t *p) { return (read_u16(p) & 0x7C00) == 0x7C00; }

static int q4k_all_zero(const uint8_t *scales, int want_min) {
    for (int j = 0; j < 8; j++) {
        uint8_t sc, m;
        q4k_scale_min(j, scales, &sc, &m);
        if ((want_min ? m : sc) != 0) return 0;
    }
    return 1;
}

int block_is_empty(const gtype_info *t, const uint8_t *b) {
    switch (t->gtype) {
    case GT_Q4_0:
    case GT_Q8_0:
        return half_is_zero(b); /* x = d * (...) */
    case GT_Q4_1:
        return half_is_zero(b) && half_is_zero(b + 2); /* x = d*q + m */
    case GT_Q4_K: /* x = d*sc*q - dmin*m */
        return (half_is_zero(b) || q4k_all_zero(b + 4, 0)) && (half_is_zero(b + 2) || q4k_all_zero(b + 4, 1));
    case GT_Q4_0_PACKED:
        for (int j = 0; j < 8; j++)
            if (!half_is_zero(b + 2 * j)) return 0;
        return 1;
    case GT_Q6_K: { /* x = d*scale*(q - 32) */
        if (half_is_zero(b + 208)) return 1;
        for (int j = 0; j < 16; j++)
            if (b[192 + j] != 0) return 0;
        return 1;
    }
    }
    return 0;
}

int block_is_bad(const gtype_info *t, const uint8_t *b) {
    switch (t->gtype) {
    case GT_Q4_0:
    case GT_Q8_0:
        return half_is_bad(b);
    case GT_Q4_1:
    case GT_Q4_K:
        return half_is_bad(b) || half_is_bad(b + 2);
    case GT_Q6_K:
        return half_is_bad(b + 208);
    case GT_Q4_0_PACKED:
        for (int j = 0; j < 8; j++)
            if (half_is_bad(b + 2 * j)) return 1;
        return 0;
    }
    return 0;
}

/* Value l (0..31) of block j (0..7) of a packed group sits in chunk j/4, byte 32*(j%2) + l,
 * nibble (j%4)/2 (see kernel.h). */
void repack_q4_0(const uint8_t *src, uint8_t *dst, size_t n_groups) {
    for (size_t g = 0; g < n_groups; g++, src += 8 * 18, dst += 144) {
        memset(dst + 16, 0, 128);
        for (int j = 0; j < 8; j++) {
            const uint8_t *blk = src + j * 18;
            dst[2 * j] = blk[0];
            dst[2 * j + 1] = blk[1];
            uint8_t *chunk = dst + 16 + 64 * (j / 4);
            const int base = 32 * (j % 2), shift = 4 * ((j % 4) / 2);
            for (int l = 0; l < 32; l++) {
                const int q = l < 16 ? blk[2 + l] & 0xF : blk[2 + l - 16] >> 4;
                chunk[base + l] |= (uint8_t)(q << shift);
            }
        }
    }
}
