"""GGUF tensors -> ONNX Runtime initializers that compute exactly the GGUF weights (numpy only).

A quantized linear layer becomes `com.microsoft.MatMulNBits` (ContribOperators.md), which computes
A @ W.T with W dequantized per block of `block_size` values along K:

    W[n, k] = (code[n, k] - zero_point[n, k // block]) * scale[n, k // block]

`B` is uint8 [N, K/block, block*bits/8], values in K order, the first of each byte pair in the low
nibble; `scales` float32 [N, K/block]; `zero_points` uint8 (4 bits: two per byte, low nibble first,
[N, ceil(K/block/2)]; 8 bits: [N, K/block]); absent zero points mean 2^(bits-1).

How each GGUF block type maps (every product below is exact in float32: an fp16 value has 11
significant bits, a 6-bit code times an fp16 scale at most 17, so nothing rounds):

  Q4_0  x = (q - 8) * d          -> 4 bits, block 32, scale d, default zero point 8; the nibbles are
                                    re-packed (GGUF: byte j = elements j and j+16; ONNX: 2j and 2j+1)
  Q8_0  x = q * d, q int8        -> 8 bits, block 32, code q + 128, default zero point 128
  Q6_K  x = d * sc * (q - 32)    -> 8 bits, block 16, code q + 96, default zero point 128, scale d*sc
  Q4_1  x = q * d + m            -> 4 bits, block 32, zero point 0, scale d, plus `mins` m [N, K/32]
  Q4_K  x = (d*sc) * q - dmin*m  -> 4 bits, block 32, zero point 0, scale d*sc, plus `mins` -dmin*m
  Q5_0  x = (q - 16) * d         -> 8 bits, block 32, code q + 112, default zero point 128
  Q5_1  x = q * d + m            -> 8 bits, block 32, zero point 0, scale d, plus `mins` m
  Q5_K  x = (d*sc) * q - dmin*m  -> 8 bits, block 32, zero point 0, scale d*sc, plus `mins` -dmin*m

The affine types (Q4_1, Q4_K) cannot be written as (q - z) * s with a float zero point and keep the
GGUF value (that needs float32 z with fl(s * z) == -m, which usually does not exist), so the graph
adds the block minimums separately: A @ W.T = A @ (q*s).T + blocksum(A) @ mins.T, where blocksum sums
A over each block of 32 along K. That is exact arithmetic of the same weights; it equals GGUF's
float32 dequantization bit for bit whenever q*s + m itself needs no rounding in float32, which
`convert_linear` checks for every element (and refuses the tensor otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pocketlm.errors import PocketLMError
from pocketlm.quantize.formats import (
    GGML_TYPE_IDS,
    QK,
    GGMLType,
    block_shape,
    type_name,
    unpack_scale_min_k4,
)


@dataclass
class NBitsWeight:
    """Initializers of one MatMulNBits node for a GGUF weight of numpy shape [N, K]."""

    n: int
    k: int
    bits: int
    block_size: int
    b: np.ndarray                       # uint8 [N, K/block, block*bits/8]
    scales: np.ndarray                  # float32 [N, K/block]
    zero_points: np.ndarray | None      # uint8, see module docstring; None = 2^(bits-1)
    mins: np.ndarray | None = None      # float32 [N, K/block] added per block (affine types)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.b, self.scales, self.zero_points, self.mins) if a is not None)


# ---------------------------------------------------------------------------- GGUF block parsing
# Each parser takes the raw tensor bytes reshaped to [N, bytes per row] and returns integer codes
# (uint8 [N, K], in K order) and the per-block float32 factors.

def _blocks(raw: np.ndarray, n: int, gtype: int) -> np.ndarray:
    """Raw bytes [N, row bytes] -> [N, blocks per row, bytes per block] of ggml type `gtype`."""
    return np.ascontiguousarray(raw).reshape(n, -1, block_shape(gtype)[1])


def _f16(b: np.ndarray, start: int) -> np.ndarray:
    """fp16 field at byte `start` of each block -> float32 [N, n_blocks]."""
    return np.ascontiguousarray(b[..., start:start + 2]).view("<f2")[..., 0].astype(np.float32)


def _split_nibbles(qs: np.ndarray) -> np.ndarray:
    """GGUF 32-value nibble block [.., 16] -> codes [.., 32]: byte j = element j (low), j+16 (high)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Codes [.., 2m] (values 0..15) -> MatMulNBits bytes [.., m]: element 2j low, 2j+1 high."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def _parse_q4_0(raw: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    b = _blocks(raw, n, GGMLType.Q4_0)
    return _split_nibbles(b[..., 2:]), _f16(b, 0)


def _parse_q4_1(raw: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    b = _blocks(raw, n, GGMLType.Q4_1)
    return _split_nibbles(b[..., 4:]), _f16(b, 0), _f16(b, 2)


def _parse_q8_0(raw: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    b = _blocks(raw, n, GGMLType.Q8_0)
    return np.ascontiguousarray(b[..., 2:]).view(np.int8), _f16(b, 0)


def _parse_q4_k(raw: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> codes [N, K], sub-block scales d*sc and mins -dmin*m [N, K/32] (float32, exact)."""
    b = _blocks(raw, n, GGMLType.Q4_K)
    d, dmin = _f16(b, 0)[..., None], _f16(b, 2)[..., None]          # [N, nsb, 1]
    sc, m = unpack_scale_min_k4(b[..., 4:16])                           # [N, nsb, 8]
    qs = b[..., 16:].reshape(n, -1, 4, 32)                           # 4 chunks of 64 values
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)            # chunk c: values 64c + 0..63
    scales = (d * sc.astype(np.float32)).reshape(n, -1)
    mins = -(dmin * m.astype(np.float32)).reshape(n, -1)
    return codes.reshape(n, -1), scales, mins


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1 high bits: uint32 qh [.., 4 bytes] -> [.., 32] bit j = element j."""
    bits = np.ascontiguousarray(qh).view("<u4")[..., 0:1] >> np.arange(32, dtype=np.uint32)
    return (bits & 1).astype(np.uint8)


def _parse_q5_0(raw: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    b = _blocks(raw, n, Q5_0)
    return _split_nibbles(b[..., 6:]) | (_fifth_bits(b[..., 2:6]) << 4), _f16(b, 0)


def _parse_q5_1(raw: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    b = _blocks(raw, n, Q5_1)
    return _split_nibbles(b[..., 8:]) | (_fifth_bits(b[..., 4:8]) << 4), _f16(b, 0), _f16(b, 2)


def _parse_q5_k(raw: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> codes [N, K] (0..31), sub-block scales d*sc and mins -dmin*m [N, K/32] (float32, exact).
    Like Q4_K, plus a fifth bit: qh[l] bit 2c (low half of chunk c) and 2c+1 (high half)."""
    b = _blocks(raw, n, GGMLType.Q5_K)
    d, dmin = _f16(b, 0)[..., None], _f16(b, 2)[..., None]
    sc, m = unpack_scale_min_k4(b[..., 4:16])
    qh = b[..., 16:48][..., None, :]                                  # [N, nsb, 1, 32]
    qs = b[..., 48:].reshape(n, -1, 4, 32)
    c = np.arange(4, dtype=np.uint8)[:, None]
    low = (qs & 0x0F) | (((qh >> (2 * c)) & 1) << 4)
    high = (qs >> 4) | (((qh >> (2 * c + 1)) & 1) << 4)
    codes = np.concatenate([low, high], axis=-1)
    scales = (d * sc.astype(np.float32)).reshape(n, -1)
    mins = -(dmin * m.astype(np.float32)).reshape(n, -1)
    return codes.reshape(n, -1), scales, mins


def _parse_q6_k(raw: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """-> codes q [N, K] (0..63, value (q - 32) * scale) and scales d*sc [N, K/16] (float32, exact)."""
    b = _blocks(raw, n, GGMLType.Q6_K)
    ql = b[..., 0:128].reshape(n, -1, 2, 64)                         # per 128-value half
    qh = b[..., 128:192].reshape(n, -1, 2, 32)
    sc = np.ascontiguousarray(b[..., 192:208]).view(np.int8).astype(np.float32)  # [N, nsb, 16]
    d = _f16(b, 208)[..., None]
    # value 32*j + l of a half (j = 0..3, l = 0..31): ql nibble (low for j<2 ... see llama.cpp
    # dequantize_row_q6_K), high two bits from qh[l] >> 2j.
    low = np.stack([ql[..., :32] & 0x0F, ql[..., 32:] & 0x0F, ql[..., :32] >> 4, ql[..., 32:] >> 4], axis=-2)
    high = np.stack([(qh >> (2 * j)) & 3 for j in range(4)], axis=-2)  # [N, nsb, 2, 4, 32]
    codes = (low | (high << 4)).reshape(n, -1)
    scales = (d * sc).reshape(n, -1)
    return codes, scales


# ---------------------------------------------------------------------------- conversion

# ggml types pocketlm's quantizer does not produce, but llama.cpp's does
Q5_0, Q5_1, Q5_K = GGML_TYPE_IDS["Q5_0"], GGML_TYPE_IDS["Q5_1"], GGMLType.Q5_K
MATMUL_NBITS_TYPES = (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0, GGMLType.Q4_K, GGMLType.Q6_K,
                      Q5_0, Q5_1, Q5_K)
FLOAT_TYPES = (GGMLType.F32, GGMLType.F16)


def convert_linear(raw: np.ndarray, gtype: int, shape: tuple[int, int], name: str,
                   source: str | None = None) -> NBitsWeight:
    """Raw GGUF bytes of a [N, K] weight (ggml type id `gtype`) -> MatMulNBits initializers holding
    the same values. Corrupt data (a NaN or infinite block scale) is refused as such, naming the
    tensor and the block, before any exactness check could blame float32 rounding for it."""
    from pocketlm.runtime.kernel import check_tensor

    check_tensor(name, raw, gtype, source)  # the scan `pocketlm run` does, for the kernel's types
    w = _convert_linear(raw, gtype, shape, name, source)
    _check_finite_factors(w.scales, w.mins, w.k, gtype, name, source)
    return w


def _check_finite_factors(scales: np.ndarray, mins: np.ndarray | None, k: int, gtype: int, name: str,
                          source: str | None) -> None:
    """The same check for every type (Q5_* too): a NaN/inf scale or min ([N, sub-blocks per row],
    float32) is a corrupt block; the message names the block as the kernel's scan does."""
    blocks_per_row = k // block_shape(gtype)[0]
    for factors in (scales, mins):
        if factors is None:
            continue
        finite = np.isfinite(factors.reshape(factors.shape[0], -1))
        if not finite.all():
            row, sub = np.argwhere(~finite)[0]
            block = int(row) * blocks_per_row + int(sub) // (finite.shape[1] // blocks_per_row)
            raise PocketLMError(f"tensor {name!r} is corrupt: block {block} has a NaN or infinite scale",
                                source)


def _convert_linear(raw: np.ndarray, gtype: int, shape: tuple[int, int], name: str,
                    source: str | None) -> NBitsWeight:
    n, k = shape
    if gtype == GGMLType.Q4_0:
        codes, d = _parse_q4_0(raw, n)
        return NBitsWeight(n, k, 4, QK, _pack_nibbles(codes), d, None)
    if gtype == GGMLType.Q8_0:
        q, d = _parse_q8_0(raw, n)
        return NBitsWeight(n, k, 8, QK, (q.view(np.uint8) ^ 0x80), d, None)
    if gtype == GGMLType.Q6_K:
        codes, scales = _parse_q6_k(raw, n)
        b = (codes + 96).astype(np.uint8).reshape(n, k // 16, 16)
        return NBitsWeight(n, k, 8, 16, b, scales, None)
    if gtype == GGMLType.Q4_1:
        codes, d, m = _parse_q4_1(raw, n)
        w = NBitsWeight(n, k, 4, QK, _pack_nibbles(codes), d, _zero_nibbles(n, k // QK), m)
        _check_affine_exact(codes.reshape(n, -1, QK), d, m, name, gtype, source)
        return w
    if gtype == GGMLType.Q4_K:
        codes, scales, mins = _parse_q4_k(raw, n)
        codes = codes.reshape(n, k // QK, QK)
        _check_affine_exact(codes, scales, mins, name, gtype, source)
        return NBitsWeight(n, k, 4, QK, _pack_nibbles(codes), scales, _zero_nibbles(n, k // QK), mins)
    if gtype == Q5_0:
        codes, d = _parse_q5_0(raw, n)
        return NBitsWeight(n, k, 8, QK, (codes + 112).astype(np.uint8), d, None)
    if gtype in (Q5_1, Q5_K):
        codes, scales, mins = _parse_q5_1(raw, n) if gtype == Q5_1 else _parse_q5_k(raw, n)
        codes = codes.reshape(n, k // QK, QK)
        _check_affine_exact(codes, scales, mins, name, gtype, source)
        zp = np.zeros((n, k // QK), np.uint8)
        return NBitsWeight(n, k, 8, QK, codes.astype(np.uint8), scales, zp, mins)
    supported = ", ".join(type_name(t) for t in (*MATMUL_NBITS_TYPES, *FLOAT_TYPES))
    raise PocketLMError(f"tensor {name!r} has type {type_name(gtype)}, which the ONNX exporter cannot "
                        f"convert losslessly (supported: {supported})", source)


def _zero_nibbles(n: int, k_blocks: int) -> np.ndarray:
    """Explicit 4-bit zero points of 0: uint8 [N, ceil(k_blocks/2)]."""
    return np.zeros((n, (k_blocks + 1) // 2), dtype=np.uint8)


def _check_affine_exact(codes: np.ndarray, scales: np.ndarray, mins: np.ndarray, name: str,
                        gtype: int, source: str | None) -> None:
    """Refuse unless code*scale + min is exact in float32 for every element (codes [N, nb, 32]).

    Then GGUF's float32 dequantization (which rounds that sum once) and the ONNX graph (which adds
    the two terms through the matmul) hold the same number.
    """
    _check_finite_factors(scales, mins, codes.shape[1] * codes.shape[2], gtype, name, source)
    bad = 0
    for r in range(0, codes.shape[0], 1024):  # rows in chunks: bounded temporaries
        a = codes[r:r + 1024].astype(np.float32) * scales[r:r + 1024, :, None]  # exact (see above)
        b = mins[r:r + 1024, :, None]
        # Knuth's TwoSum: the rounding error of a + b, exactly, in float32 arithmetic.
        s = a + b
        bb = s - a
        err = (a - (s - bb)) + (b - bb)
        bad += int(np.count_nonzero(err))
    if bad:
        raise PocketLMError(
            f"tensor {name!r} ({type_name(gtype)}): {bad} values of code*scale + min round in float32, so "
            f"no ONNX initializer reproduces GGUF's dequantized weights bit for bit; re-quantize this "
            f"tensor as Q4_0 or Q8_0 to export it to ONNX", source)


def split_to_4bit(w: NBitsWeight) -> tuple[NBitsWeight, NBitsWeight]:
    """An 8-bit weight (zero point 128, or 0 for the affine types) as two 4-bit ones that sum to it.

    ONNX Runtime has no float32-activation kernel for 8-bit MatMulNBits (it dequantizes the whole
    matrix on every call: ~20x slower than 4 bits here), so at accuracy_level 0/1 the exporter
    writes code c = lo + 16*hi as (lo - 0) * s  +  (hi - 8) * 16s (zero point 0: (hi - 0) * 16s).
    Both terms and their sum (c - zp) * s are exact in float32 (16s only moves the exponent), so
    the summed weights are the GGUF's bit for bit.
    """
    zero = w.zero_points is not None  # explicit zero points are all 0 (affine types, + mins)
    if w.bits != 8 or (zero and w.zero_points.any()):
        raise ValueError("split_to_4bit takes an 8-bit weight with zero point 128 or 0")
    kb = w.scales.shape[1]
    codes = w.b.reshape(w.n, kb, w.block_size)
    bs = w.block_size
    low = NBitsWeight(w.n, w.k, 4, bs, _pack_nibbles(codes & 0x0F), w.scales, _zero_nibbles(w.n, kb))
    high = NBitsWeight(w.n, w.k, 4, bs, _pack_nibbles(codes >> 4), w.scales * np.float32(16),
                       _zero_nibbles(w.n, kb) if zero else None)
    return low, high


def dequantize_nbits(w: NBitsWeight) -> np.ndarray:
    """W [N, K] float32 as MatMulNBits (plus the mins term) defines it; used by checks and tests."""
    n, kb = w.scales.shape
    if w.bits == 4:
        codes = np.stack([w.b & 0x0F, w.b >> 4], axis=-1).reshape(n, kb, w.block_size)
    else:
        codes = w.b.reshape(n, kb, w.block_size)
    if w.zero_points is None:
        zp = np.full((n, kb), 1 << (w.bits - 1), dtype=np.float64)
    elif w.bits == 4:
        zp = np.stack([w.zero_points & 0x0F, w.zero_points >> 4], axis=-1).reshape(n, -1)[:, :kb]
    else:
        zp = w.zero_points
    x = (codes.astype(np.float64) - zp[..., None]) * w.scales[..., None]
    if w.mins is not None:
        x = x + w.mins[..., None]
    return x.reshape(n, kb * w.block_size)[:, : w.k].astype(np.float32)


# ---------------------------------------------------------------------------- embeddings

@dataclass
class QuantizedEmbedding:
    """Initializers of a `com.microsoft.GatherBlockQuantized` over a [V, D] table (uint8 data):
    row = (code - zero_point) * scale per block, plus `mins` per block for the affine types."""

    bits: int
    block_size: int
    data: np.ndarray                    # uint8 [V, D*bits/8]: packed codes, low nibble first for 4 bits
    scales: np.ndarray                  # float32 [V, D/block]
    zero_points: np.ndarray | None = None  # 4 bits: uint8 [V, ceil(D/block/2)]; None = 2^(bits-1)
    mins: np.ndarray | None = None      # float32 [V, D/block], added after the gather


def convert_embedding(raw: np.ndarray, gtype: int, shape: tuple[int, int],
                      name: str = "token_embd.weight", source: str | None = None) -> QuantizedEmbedding:
    """The table as GatherBlockQuantized initializers holding exactly the GGUF values (the same
    mapping as `convert_linear`; Q4_1/Q4_K add their block minimums after the gather)."""
    v, d = shape
    if gtype in (GGMLType.Q4_1, GGMLType.Q4_K, Q5_0, Q5_1, Q5_K):
        w = convert_linear(raw, gtype, shape, name, source)
        data = w.b.reshape(v, d * w.bits // 8)
        return QuantizedEmbedding(w.bits, QK, data, w.scales, w.zero_points, w.mins)
    if gtype == GGMLType.Q4_0:
        codes, scales = _parse_q4_0(raw, v)
        return QuantizedEmbedding(4, QK, _pack_nibbles(codes).reshape(v, d // 2), scales)
    if gtype == GGMLType.Q8_0:
        q, scales = _parse_q8_0(raw, v)
        return QuantizedEmbedding(8, QK, (q.view(np.uint8) ^ 0x80).reshape(v, d), scales)
    if gtype == GGMLType.Q6_K:
        codes, scales = _parse_q6_k(raw, v)
        return QuantizedEmbedding(8, 16, (codes + 96).astype(np.uint8), scales)
    return convert_linear(raw, gtype, shape, name, source)  # raises: not a supported type
