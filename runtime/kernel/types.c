/* GGUF block types known to the kernel, fp16 conversion, block inspection. */
#include <math.h>
#include <string.h>

#include "kernel.h"

static const gtype_info TYPES[] = {
    {GT_Q4_0, SLOT_Q4_0, QK, 18, QK},          {GT_Q4_1, SLOT_Q4_1, QK, 20, QK},
    {GT_Q8_0, SLOT_Q8_0, QK, 34, QK},          {GT_Q4_K, SLOT_Q4_K, QK_K, 144, QK_K},
    {GT_Q6_K, SLOT_Q6_K, QK_K, 210, QK_K},     {GT_Q4_0_PACKED, SLOT_Q4_0_PACKED, PACK_VALUES, 288, QK},
    {GT_Q8_0_PACKED, SLOT_Q8_0_PACKED, PACK_VALUES, 544, QK}, {GT_Q4_K_PACKED, SLOT_Q4_K_PACKED, PACK_VALUES, 288, QK_K},
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

static int half_is_bad(const uint8_t *p) { return (read_u16(p) & 0x7C00) == 0x7C00; }

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
    case GT_Q8_0_PACKED:
        for (int j = 0; j < 16; j++)
            if (half_is_bad(b + 2 * j)) return 1;
        return 0;
    case GT_Q4_K_PACKED:
        for (int j = 0; j < 4; j++)
            if (half_is_bad(b + 2 * j)) return 1;
        return 0;
    }
    return 0;
}

/* The packed layouts (kernel.h). Value 4v + i of sub-block b goes to byte 4b + i of code vector v:
 * for 4-bit codes, chunk v / 2 in the low (v even) or high (v odd) nibble; for Q8_0, chunk v. */
static void pack_nibbles(const uint8_t *const qs[16], uint8_t *chunks) {
    memset(chunks, 0, 256);
    for (int b = 0; b < 16; b++)
        for (int k = 0; k < 32; k++) { /* value k of sub-block b: 4-bit code q */
            const int q = k < 16 ? qs[b][k] & 0xF : qs[b][k - 16] >> 4; /* GGML: low nibbles = values 0..15 */
            const int v = k / 4, i = k % 4;
            chunks[64 * (v / 2) + 4 * b + i] |= (uint8_t)(q << (4 * (v % 2)));
        }
}

int packed_type_of(int gtype) {
    return gtype == GT_Q4_0 ? GT_Q4_0_PACKED : gtype == GT_Q8_0 ? GT_Q8_0_PACKED : gtype == GT_Q4_K ? GT_Q4_K_PACKED : 0;
}

int repack_groups(int gtype, const uint8_t *src, uint8_t *dst, size_t n_groups) {
    const uint8_t *qs[16];
    for (size_t g = 0; g < n_groups; g++)
        switch (gtype) {
        case GT_Q4_0: /* 16 blocks of 18 bytes -> 288 */
            for (int b = 0; b < 16; b++, src += 18) {
                memcpy(dst + 2 * b, src, 2);
                qs[b] = src + 2;
            }
            pack_nibbles(qs, dst + 32);
            dst += 288;
            break;
        case GT_Q8_0: /* 16 blocks of 34 bytes -> 544 */
            for (int b = 0; b < 16; b++, src += 34) {
                memcpy(dst + 2 * b, src, 2);
                for (int k = 0; k < 32; k++) dst[32 + 64 * (k / 4) + 4 * b + k % 4] = (uint8_t)(src[2 + k] ^ 0x80);
            }
            dst += 544;
            break;
        case GT_Q4_K: { /* 2 super-blocks of 144 bytes -> 288; sub-block j of super-block s is lane 8s + j */
            uint8_t blocks[16][16]; /* each sub-block as a Q4_0 block's nibbles: byte l = values l, l + 16 */
            for (int s = 0; s < 2; s++, src += 144) {
                memcpy(dst + 2 * s, src, 2);         /* d */
                memcpy(dst + 4 + 2 * s, src + 2, 2); /* dmin */
                memcpy(dst + 8 + 12 * s, src + 4, 12);
                /* Q4_K codes: 32-byte run c (0..3) holds sub-block 2c in its low nibbles, 2c + 1 in its high */
                for (int j = 0; j < 8; j++) {
                    const uint8_t *run = src + 16 + 32 * (j / 2);
                    const int shift = 4 * (j % 2);
                    for (int l = 0; l < 16; l++)
                        blocks[8 * s + j][l] = (uint8_t)(((run[l] >> shift) & 0xF) | (((run[l + 16] >> shift) & 0xF) << 4));
                    qs[8 * s + j] = blocks[8 * s + j];
                }
            }
            pack_nibbles(qs, dst + 32);
            dst += 288;
            break;
        }
        default:
            return -1;
        }
    return 0;
}
