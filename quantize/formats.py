"""GGUF tensor types: the block formats, defined once for quantizer, exporters and runtime.

One class per block format (like gguf-py's `quants.py`), vectorised over blocks with numpy:
`quantize_blocks` is llama.cpp's reference round-to-nearest quantizer (`quantize_row_*_ref` in
ggml-quants.c; bytes identical to gguf-py where gguf-py quantizes), `dequantize_blocks` its
inverse. Quantized formats also expose `pack(codes, *fields)` / `unpack(raw)`, so that a calibrated
method (quantize/search.py, gptq.py) chooses integer codes and scales and has them written exactly,
and `affine(*fields)`, the per-value map code -> float the dequantizer applies.

Byte layouts (ggml-common.h), one block:
  Q4_0  fp16 d | 16 B qs              x = d * (q - 8); qs[j] = q[j] | q[j+16] << 4
  Q4_1  fp16 d | fp16 m | 16 B qs     x = d * q + m
  Q8_0  fp16 d | 32 x int8            x = d * q
  Q4_K  fp16 d | fp16 dmin | 12 B 6-bit scales and mins of 8 sub-blocks of 32 | 128 B qs
        x = d*sc*q - dmin*m; each 64 values use 32 bytes: value l in the low nibble, l+32 high
  Q5_K  as Q4_K with 32 B qh before qs: q in 0..31, low 4 bits in qs as Q4_K, bit 4 of value l of
        sub-block s in bit s of qh[l]
  Q6_K  128 B ql | 64 B qh | 16 x int8 scales | fp16 d        x = d*sc*(q - 32), sub-blocks of 16
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from ..errors import PocketLMError
from . import scale_search as ss
from .ggml_types import (  # noqa: F401  (re-exported: every stage imports the table from here)
    BLOCK_SHAPE,
    GGML_TYPE_IDS,
    GGML_TYPES,
    QK,
    QK_K,
    GGMLType,
    block_shape,
    row_bytes,
    type_name,
)

F32 = np.float32


# The type ids and block shapes live in one table (ggml_types.py), re-exported here.


def to_f16(values: np.ndarray, what: str) -> np.ndarray:
    """float32 -> float16 with round-to-nearest-even (GGML_FP32_TO_FP16); overflow is an error."""
    with np.errstate(over="ignore"):
        out = np.asarray(values, dtype=F32).astype(np.float16)
    if not np.isfinite(out).all():
        big = float(np.max(np.abs(np.asarray(values, dtype=np.float64))))
        raise PocketLMError(f"{what} {big:g} does not fit in float16 (values too large for this format)")
    return out


def _f16_bytes(values: np.ndarray) -> np.ndarray:
    """[n] float16 (other floats are rounded, overflow is an error) -> [n, 2] uint8 little-endian."""
    values = np.asarray(values)
    if values.dtype != np.float16:
        values = to_f16(values, "scale")
    return np.ascontiguousarray(values, dtype="<f2").view(np.uint8).reshape(-1, 2)


def _f16_field(raw: np.ndarray, start: int) -> np.ndarray:
    """[n, type_size] uint8 -> [n] float16 read at byte `start` of every block."""
    return np.ascontiguousarray(raw[:, start : start + 2]).view("<f2")[:, 0]


def _check_codes(codes: np.ndarray, shape: tuple[int, int], lo: int, hi: int, name: str) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.shape != shape:
        raise PocketLMError(f"{name}.pack: codes have shape {codes.shape}, expected {shape}")
    if codes.size and (codes.min() < lo or codes.max() > hi):
        raise PocketLMError(f"{name}.pack: codes outside {lo}..{hi}")
    return codes


def _pack_nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return (lo.astype(np.uint8) & 0x0F) | (hi.astype(np.uint8) << 4)


class BlockFormat:
    """A GGUF tensor type: `block_size` values stored in `type_size` bytes."""

    gtype: ClassVar[GGMLType]
    block_size: ClassVar[int]
    type_size: ClassVar[int]

    def __init_subclass__(cls, gtype: GGMLType | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if gtype is not None:
            cls.gtype = gtype
            cls.block_size, cls.type_size = BLOCK_SHAPE[gtype]

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        """[n, block_size] float32 (finite) -> [n, type_size] uint8, reference rounding."""
        raise NotImplementedError

    @classmethod
    def dequantize_blocks(cls, raw: np.ndarray) -> np.ndarray:
        """[n, type_size] uint8 -> [n, block_size] float32."""
        raise NotImplementedError


# ---------------------------------------------------------------- float pass-through types


class F32Format(BlockFormat, gtype=GGMLType.F32):
    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(blocks, dtype="<f4").view(np.uint8).reshape(-1, 4)

    @classmethod
    def dequantize_blocks(cls, raw: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(raw).view("<f4").astype(F32).reshape(-1, 1)


class F16Format(BlockFormat, gtype=GGMLType.F16):
    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return _f16_bytes(to_f16(blocks.reshape(-1), "F16 value"))

    @classmethod
    def dequantize_blocks(cls, raw: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(raw).view("<f2").astype(F32).reshape(-1, 1)


class BF16Format(BlockFormat, gtype=GGMLType.BF16):
    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        # ggml_compute_fp32_to_bf16: round to nearest even on the top 16 bits (inputs are finite)
        bits = np.ascontiguousarray(blocks, dtype="<f4").reshape(-1).view(np.uint32).astype(np.uint64)
        out = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype("<u2")
        if ((out & 0x7FFF) == 0x7F80).any():
            raise PocketLMError("BF16 value does not fit in bfloat16 (rounds to infinity)")
        return out.view(np.uint8).reshape(-1, 2)

    @classmethod
    def dequantize_blocks(cls, raw: np.ndarray) -> np.ndarray:
        bits = np.ascontiguousarray(raw).view("<u2").astype(np.uint32) << 16
        return bits.view(F32).reshape(-1, 1)


# ---------------------------------------------------------------- quantized block types


class QuantFormat(BlockFormat):
    """A block format with integer codes: value = step * (code - code_zero) + offset."""

    code_min: ClassVar[int]  # stored code range (Q8_0: int8, others unsigned)
    code_max: ClassVar[int]
    code_zero: ClassVar[int]  # the code subtracted before scaling (Q4_0: 8, Q6_K: 32, else 0)

    @classmethod
    def search_blocks(cls, blocks: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, ...]:
        """Importance-weighted scale search (llama.cpp's `quantize_row_*_impl` with quant_weights):
        blocks, weights [n, block_size] float32 (weights: the final per-value weights, see
        quantize/search.py) -> (codes, *fields) minimising the weighted squared error."""
        raise NotImplementedError

    @classmethod
    def pack(cls, codes: np.ndarray, *fields: np.ndarray) -> np.ndarray:
        """Integer codes [n, block_size] and the block's scale fields -> [n, type_size] uint8."""
        raise NotImplementedError

    @classmethod
    def unpack(cls, raw: np.ndarray) -> tuple[np.ndarray, ...]:
        """[n, type_size] uint8 -> (codes [n, block_size], *fields) in `pack`'s order."""
        raise NotImplementedError

    @classmethod
    def affine(cls, *fields: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Fields -> (step, offset) float32: [n, 1] (one scale per block) or [n, n_sub, 1] (per
        sub-block of block_size / n_sub values); offset None when the format has none."""
        raise NotImplementedError

    @classmethod
    def decode(cls, codes: np.ndarray, *fields: np.ndarray) -> np.ndarray:
        """Codes and fields -> float32 values [n, block_size], exactly as dequantize computes."""
        step, offset = cls.affine(*fields)
        n = codes.shape[0]
        q = (codes.astype(np.int16) - cls.code_zero).astype(F32)
        q = q.reshape((*step.shape[:-1], -1))
        values = step * q
        if offset is not None:
            values = values + offset
        return values.reshape(n, cls.block_size)

    @classmethod
    def dequantize_blocks(cls, raw: np.ndarray) -> np.ndarray:
        return cls.decode(*cls.unpack(raw))


class Q4_0(QuantFormat, gtype=GGMLType.Q4_0):
    """Fields: d float16 [n]."""

    code_min, code_max, code_zero = 0, 15, 8

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        # quantize_row_q4_0_ref: d = max / -8 (max = signed value of largest magnitude),
        # q = min(15, trunc(x/d + 8.5)), x/d evaluated as x * (1/d) in float32.
        vmax = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1)[:, None], axis=1)
        d = vmax / F32(-8)
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            inv = np.where(d == 0, F32(0), F32(1) / d)
            v = blocks * inv + F32(8.5)
        # 1/d overflows only for float32-subnormal d (then fp16(d) == 0): keep codes defined
        v = np.nan_to_num(v, nan=8.5, posinf=15, neginf=0)
        codes = np.minimum(np.trunc(v), 15)
        return cls.pack(codes.astype(np.uint8), to_f16(d[:, 0], "Q4_0 scale"))

    @classmethod
    def search_blocks(cls, blocks: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, ...]:
        # quantize_row_q4_0_impl: make_qx_quants(nmax 8); codes kept as searched (not re-rounded
        # against the fp16 scale), like llama.cpp
        d, codes = ss.make_qx_quants(blocks.T, 8, weights.T)
        return codes.T.astype(np.uint8), to_f16(d, "Q4_0 scale")

    @classmethod
    def pack(cls, codes: np.ndarray, d: np.ndarray) -> np.ndarray:
        codes = _check_codes(codes, (len(d), 32), 0, 15, "Q4_0")
        qs = _pack_nibbles(codes[:, :16], codes[:, 16:])
        return np.concatenate([_f16_bytes(d), qs], axis=1)

    @classmethod
    def unpack(cls, raw: np.ndarray) -> tuple[np.ndarray, ...]:
        qs = raw[:, 2:18]
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=1)
        return codes, _f16_field(raw, 0)

    @classmethod
    def affine(cls, d: np.ndarray) -> tuple[np.ndarray, None]:
        return d.astype(F32)[:, None], None


class Q4_1(QuantFormat, gtype=GGMLType.Q4_1):
    """Fields: d float16 [n], m float16 [n]."""

    code_min, code_max, code_zero = 0, 15, 0

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        # quantize_row_q4_1_ref: d = (max - min) / 15, q = min(15, trunc((x - min)/d + 0.5))
        vmin = blocks.min(axis=1, keepdims=True)
        vmax = blocks.max(axis=1, keepdims=True)
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            d = (vmax - vmin) / F32(15)
            inv = np.where(d == 0, F32(0), F32(1) / d)
            v = (blocks - vmin) * inv + F32(0.5)
        v = np.nan_to_num(v, nan=0.5, posinf=15, neginf=0)
        codes = np.minimum(np.trunc(v), 15)
        return cls.pack(codes.astype(np.uint8), to_f16(d[:, 0], "Q4_1 scale"), to_f16(vmin[:, 0], "Q4_1 min"))

    @classmethod
    def search_blocks(cls, blocks: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, ...]:
        # quantize_row_q4_1_impl: make_qkx3_quants(nmax 15, rmin -0.9, rdelta 0.05, 36 steps)
        d, the_min, codes = ss.make_qkx_quants(blocks.T, 15, weights.T, -0.9, 0.05, 36)
        return codes.T.astype(np.uint8), to_f16(d, "Q4_1 scale"), to_f16(-the_min, "Q4_1 min")

    @classmethod
    def pack(cls, codes: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
        codes = _check_codes(codes, (len(d), 32), 0, 15, "Q4_1")
        qs = _pack_nibbles(codes[:, :16], codes[:, 16:])
        return np.concatenate([_f16_bytes(d), _f16_bytes(m), qs], axis=1)

    @classmethod
    def unpack(cls, raw: np.ndarray) -> tuple[np.ndarray, ...]:
        qs = raw[:, 4:20]
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=1)
        return codes, _f16_field(raw, 0), _f16_field(raw, 2)

    @classmethod
    def affine(cls, d: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return d.astype(F32)[:, None], m.astype(F32)[:, None]


class Q8_0(QuantFormat, gtype=GGMLType.Q8_0):
    """Codes int8 [n, 32]; fields: d float16 [n]."""

    code_min, code_max, code_zero = -128, 127, 0

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        # quantize_row_q8_0_ref: d = amax / 127, q = roundf(x/d) (half away from zero)
        d = np.abs(blocks).max(axis=1, keepdims=True) / F32(127)
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            inv = np.where(d == 0, F32(0), F32(1) / d)
            v = np.nan_to_num(blocks * inv, nan=0, posinf=127, neginf=-127)
        a = np.abs(v)
        whole = np.floor(a)
        rounded = whole + (a - whole >= F32(0.5))  # exact: a - floor(a) has no rounding error
        codes = np.minimum(rounded, 127) * np.sign(v)
        return cls.pack(codes.astype(np.int8), to_f16(d[:, 0], "Q8_0 scale"))

    @classmethod
    def search_blocks(cls, blocks: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, ...]:
        # llama.cpp ignores importance for Q8_0; pocketlm searches like Q4_0 with codes -128..127
        d, codes = ss.make_qx_quants(blocks.T, 128, weights.T)
        return (codes.T - 128).astype(np.int8), to_f16(d, "Q8_0 scale")

    @classmethod
    def pack(cls, codes: np.ndarray, d: np.ndarray) -> np.ndarray:
        codes = _check_codes(codes, (len(d), 32), -128, 127, "Q8_0")
        return np.concatenate([_f16_bytes(d), codes.astype(np.int8).view(np.uint8)], axis=1)

    @classmethod
    def unpack(cls, raw: np.ndarray) -> tuple[np.ndarray, ...]:
        return np.ascontiguousarray(raw[:, 2:]).view(np.int8), _f16_field(raw, 0)

    @classmethod
    def affine(cls, d: np.ndarray) -> tuple[np.ndarray, None]:
        return d.astype(F32)[:, None], None


def _requantize(x: np.ndarray, step: np.ndarray, offset: np.ndarray | None, lo: int, hi: int,
                fallback: np.ndarray) -> np.ndarray:
    """llama.cpp's last pass: l = nearest_int((x - offset) / step) clamped; where step == 0 the
    codes of the search (`fallback`) stay, as in the C `if (!d) continue;`. Shapes broadcast."""
    v = x if offset is None else x - offset
    with np.errstate(divide="ignore", invalid="ignore"):
        l = np.clip(np.rint(v / step), lo, hi)
    return np.where(step == 0, fallback, l)


def _pack_scale_min_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """6-bit scales and mins [n, 8] uint8 -> the 12 `scales` bytes [n, 12] read by get_scale_min_k4:
    bytes 0-3 scales 0-3 (+ high bits of scales 4-7 in bits 6-7), bytes 4-7 mins 0-3 (+ high bits
    of mins 4-7), bytes 8-11 low nibbles of scales|mins 4-7."""
    return np.concatenate([
        ls[:, :4] | ((ls[:, 4:] >> 4) << 6),
        lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
        (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4),
    ], axis=1)


def unpack_scale_min_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[..., 12] `scales` bytes of Q4_K/Q5_K -> (scales [..., 8], mins [..., 8]) uint8 in 0..63
    (llama.cpp `get_scale_min_k4`)."""
    s = s.astype(np.uint8)
    lo, mid, hi = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    ls = np.concatenate([lo & 63, (hi & 0x0F) | ((lo >> 6) << 4)], axis=-1)
    lm = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=-1)
    return ls, lm


class _ScaleMinK(QuantFormat):
    """The K-quants with 8 sub-blocks of 32, each with a 6-bit scale and a 6-bit min (Q4_K, Q5_K):
    x = d*sc*q - dmin*m, q in 0..code_max. Codes uint8 [n, 256]; fields: d float16 [n],
    dmin float16 [n], scales uint8 [n, 8] and mins uint8 [n, 8]. The subclass gives the code
    range, the parameters of its reference search and how the codes are laid out in bytes."""

    code_min, code_zero = 0, 0
    # make_qkx2_quants (rmin, rdelta, nstep) of quantize_row_*_ref; the imatrix search
    # (quantize_row_*_impl) is make_qkx3_quants(-0.9, 0.05, 36) for both formats
    ref_search: ClassVar[tuple[float, float, int]]

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        # quantize_row_q4_K_ref / q5_K_ref: per sub-block of 32, make_qkx2_quants with weights
        # sqrt(mean x^2) + |x|; sub-block scales and mins quantized to 6 bits against their
        # maxima; values requantized against the fp16-rounded result.
        n, name = blocks.shape[0], cls.gtype.name
        x = np.ascontiguousarray(blocks.reshape(n * 8, 32).T)  # [32, sub-blocks]; C order: sequential sums
        av_x = np.sqrt((x * x).sum(axis=0) / F32(32))
        weights = av_x + np.abs(x)
        scales, mins, codes = ss.make_qkx_quants(x, cls.code_max, weights, *cls.ref_search)
        scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
        max_scale = np.maximum(scales.max(axis=1), F32(0))
        max_min = np.maximum(mins.max(axis=1), F32(0))
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
            inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
            # C: uint8_t ls = nearest_int(...); ls = MIN(63, ls) (the uint8 store wraps). A
            # float32-subnormal maximum overflows 63/max: then fp16(d) == 0 and any code decodes to 0.
            ls = np.nan_to_num(np.rint(inv_scale[:, None] * scales), nan=0, posinf=63, neginf=0)
            lm = np.nan_to_num(np.rint(inv_min[:, None] * mins), nan=0, posinf=63, neginf=0)
        ls = np.minimum(ls.astype(np.int64) & 0xFF, 63).astype(np.uint8)
        lm = np.minimum(lm.astype(np.int64) & 0xFF, 63).astype(np.uint8)
        d = to_f16(max_scale / F32(63), f"{name} scale")
        dmin = to_f16(max_min / F32(63), f"{name} min scale")
        codes = cls._final_codes(blocks, codes, d, dmin, ls, lm)
        return cls.pack(codes, d, dmin, ls, lm)

    @classmethod
    def search_blocks(cls, blocks: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, ...]:
        # quantize_row_q4_K_impl / q5_K_impl: make_qkx3_quants per sub-block, then make_qp_quants
        # chooses the 6-bit sub-block scales and mins (weighted by each sub-block's total weight)
        n, name = blocks.shape[0], cls.gtype.name
        x = np.ascontiguousarray(blocks.reshape(n * 8, 32).T)
        w = np.ascontiguousarray(weights.reshape(n * 8, 32).T, dtype=F32)
        scales, mins, codes = ss.make_qkx_quants(x, cls.code_max, w, -0.9, 0.05, 36)
        sub_weight = np.ascontiguousarray(w.sum(axis=0).reshape(n, 8).T)  # [8, n]
        d_block, ls = ss.make_qp_quants(np.ascontiguousarray(scales.reshape(n, 8).T), 63, sub_weight)
        m_block, lm = ss.make_qp_quants(np.ascontiguousarray(mins.reshape(n, 8).T), 63, sub_weight)
        d, dmin = to_f16(d_block, f"{name} scale"), to_f16(m_block, f"{name} min scale")
        ls, lm = ls.T.astype(np.uint8), lm.T.astype(np.uint8)
        return cls._final_codes(blocks, codes, d, dmin, ls, lm), d, dmin, ls, lm

    @classmethod
    def _final_codes(cls, blocks: np.ndarray, codes: np.ndarray, d: np.ndarray, dmin: np.ndarray,
                    ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
        """Search codes [32, n * 8] -> final codes uint8 [n, 256] against the stored fields."""
        n = blocks.shape[0]
        step, offset = cls.affine(d, dmin, ls, lm)
        fallback = codes.T.reshape(n, 8, 32)
        codes = _requantize(blocks.reshape(n, 8, 32), step, offset, 0, cls.code_max, fallback)
        return codes.reshape(n, 256).astype(np.uint8)

    @classmethod
    def pack(cls, codes: np.ndarray, d: np.ndarray, dmin: np.ndarray, scales: np.ndarray,
             mins: np.ndarray) -> np.ndarray:
        n, name = len(d), cls.gtype.name
        codes = _check_codes(codes, (n, 256), 0, cls.code_max, name).astype(np.uint8)
        ls = _check_codes(scales, (n, 8), 0, 63, f"{name} scales").astype(np.uint8)
        lm = _check_codes(mins, (n, 8), 0, 63, f"{name} mins").astype(np.uint8)
        return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_scale_min_k4(ls, lm),
                               cls._pack_codes(codes)], axis=1)

    @classmethod
    def unpack(cls, raw: np.ndarray) -> tuple[np.ndarray, ...]:
        ls, lm = unpack_scale_min_k4(raw[:, 4:16])
        return cls._unpack_codes(raw[:, 16:]), _f16_field(raw, 0), _f16_field(raw, 2), ls, lm

    @classmethod
    def _pack_codes(cls, codes: np.ndarray) -> np.ndarray:
        """codes uint8 [n, 256] -> the block's bytes after `scales`."""
        raise NotImplementedError

    @classmethod
    def _unpack_codes(cls, tail: np.ndarray) -> np.ndarray:
        """The block's bytes after `scales` [n, type_size - 16] -> codes uint8 [n, 256]."""
        raise NotImplementedError

    @classmethod
    def affine(cls, d: np.ndarray, dmin: np.ndarray, scales: np.ndarray,
               mins: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        step = d.astype(F32)[:, None] * scales.astype(F32)  # [n, 8]
        offset = -(dmin.astype(F32)[:, None] * mins.astype(F32))
        return step[:, :, None], offset[:, :, None]


def _pack_low_nibbles(codes: np.ndarray) -> np.ndarray:
    """codes [n, 256] -> qs [n, 128]: the low 4 bits; in each 64-value chunk, 32 bytes hold
    value l in the low nibble and value l + 32 in the high nibble."""
    chunks = codes.reshape(len(codes), 4, 2, 32)
    return _pack_nibbles(chunks[:, :, 0], chunks[:, :, 1]).reshape(len(codes), 128)


def _unpack_low_nibbles(qs: np.ndarray) -> np.ndarray:
    """qs [n, 128] -> the low 4 bits of the codes [n, 256]."""
    qs = qs.reshape(len(qs), 4, 1, 32)
    return np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(len(qs), 256)


class Q4_K(_ScaleMinK, gtype=GGMLType.Q4_K):
    """Codes uint8 [n, 256] in 0..15; fields: d float16 [n], dmin float16 [n],
    scales uint8 [n, 8] and mins uint8 [n, 8] (6-bit, one per sub-block of 32).
    Bytes after `scales`: qs [128]."""

    code_max = 15
    ref_search = (-1.0, 0.1, 20)

    @classmethod
    def _pack_codes(cls, codes: np.ndarray) -> np.ndarray:
        return _pack_low_nibbles(codes)

    @classmethod
    def _unpack_codes(cls, tail: np.ndarray) -> np.ndarray:
        return _unpack_low_nibbles(tail)


class Q5_K(_ScaleMinK, gtype=GGMLType.Q5_K):
    """Codes uint8 [n, 256] in 0..31; fields as Q4_K. Bytes after `scales`: qh [32], qs [128]:
    qs holds the low 4 bits as in Q4_K; bit s of qh[l] is bit 4 of value l of sub-block s."""

    code_max = 31
    ref_search = (-0.5, 0.1, 15)

    @classmethod
    def _pack_codes(cls, codes: np.ndarray) -> np.ndarray:
        high = (codes >> 4).reshape(len(codes), 8, 32)  # [n, sub-block, l]
        qh = (high << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1, dtype=np.uint8)
        return np.concatenate([qh, _pack_low_nibbles(codes & 0x0F)], axis=1)

    @classmethod
    def _unpack_codes(cls, tail: np.ndarray) -> np.ndarray:
        qh = tail[:, None, :32]  # [n, 1, 32]
        high = ((qh >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1).reshape(len(tail), 256)
        return _unpack_low_nibbles(tail[:, 32:]) | (high << 4)


class Q6_K(QuantFormat, gtype=GGMLType.Q6_K):
    """Codes uint8 [n, 256] in 0..63 (value q - 32); fields: d float16 [n],
    scales int8 [n, 16] (one per sub-block of 16)."""

    code_min, code_max, code_zero = 0, 63, 32

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        # quantize_row_q6_K_ref: per sub-block of 16, make_qx_quants(nmax 32, weights x^2)
        return cls.pack(*cls._search(blocks, None))

    @classmethod
    def search_blocks(cls, blocks: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, ...]:
        # quantize_row_q6_K_impl: the same with the importance as weights
        return cls._search(blocks, weights)

    @classmethod
    def _search(cls, blocks: np.ndarray, weights: np.ndarray | None) -> tuple[np.ndarray, ...]:
        """Sub-block scale search, then the signed sub-block scales quantized to int8 against
        -128/max_scale, and the values requantized against the fp16-rounded result."""
        n = blocks.shape[0]
        x = np.ascontiguousarray(blocks.reshape(n * 16, 16).T)  # [16, sub-blocks]
        w = None if weights is None else np.ascontiguousarray(weights.reshape(n * 16, 16).T)
        scales, codes = ss.make_qx_quants(x, 32, w)
        scales = scales.reshape(n, 16)
        max_scale = ss.signed_max(np.ascontiguousarray(scales.T))
        is_zero = np.abs(max_scale) < ss.GROUP_MAX_EPS
        iscale = np.where(is_zero, F32(0), F32(-128) / np.where(is_zero, F32(1), max_scale))
        d = to_f16(np.where(is_zero, F32(0), F32(1) / np.where(is_zero, F32(1), iscale)), "Q6_K scale")
        sc = np.minimum(np.rint(iscale[:, None] * scales), 127).astype(np.int8)
        codes = codes.T.reshape(n, 16, 16)
        step, _ = cls.affine(d, sc)
        codes = _requantize(blocks.reshape(n, 16, 16), step, None, -32, 31, codes - 32) + 32
        codes[is_zero] = 0  # llama.cpp zeroes an all-zero super-block entirely
        return codes.reshape(n, 256).astype(np.uint8), d, sc

    @classmethod
    def pack(cls, codes: np.ndarray, d: np.ndarray, scales: np.ndarray) -> np.ndarray:
        n = len(d)
        codes = _check_codes(codes, (n, 256), 0, 63, "Q6_K").astype(np.uint8)
        sc = _check_codes(scales, (n, 16), -128, 127, "Q6_K scales").astype(np.int8)
        # per 128-value half h, l in 0..31: ql[l] = q[l] | q[l+64] << 4, ql[l+32] = q[l+32] |
        # q[l+96] << 4, qh[l] = 2-bit high parts of q[l], q[l+32], q[l+64], q[l+96]
        q = codes.reshape(n, 2, 4, 32)
        low = q & 0x0F
        ql = np.concatenate([_pack_nibbles(low[:, :, 0], low[:, :, 2]),
                             _pack_nibbles(low[:, :, 1], low[:, :, 3])], axis=2).reshape(n, 128)
        high = q >> 4
        qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
        qh = qh.reshape(n, 64)
        return np.concatenate([ql, qh, sc.view(np.uint8), _f16_bytes(d)], axis=1)

    @classmethod
    def unpack(cls, raw: np.ndarray) -> tuple[np.ndarray, ...]:
        n = raw.shape[0]
        ql = raw[:, :128].reshape(n, 2, 2, 32)  # [half, first/second 32 bytes, l]
        qh = raw[:, 128:192].reshape(n, 2, 1, 32)
        low = np.stack([ql[:, :, 0] & 0x0F, ql[:, :, 1] & 0x0F, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], axis=2)
        high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]) & 0x03
        codes = (low | (high << 4)).reshape(n, 256)
        scales = np.ascontiguousarray(raw[:, 192:208]).view(np.int8)
        return codes, _f16_field(raw, 208), scales

    @classmethod
    def affine(cls, d: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, None]:
        return (d.astype(F32)[:, None] * scales.astype(F32))[:, :, None], None


FORMATS: dict[GGMLType, type[BlockFormat]] = {
    f.gtype: f for f in (F32Format, F16Format, BF16Format, Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K)
}

# values per quantize/dequantize chunk: bounds the temporaries (K-quant search: ~20 arrays)
CHUNK_VALUES = 1 << 16


def format_for(gtype: GGMLType | int) -> type[BlockFormat]:
    """The block format class of a GGUF type id (PocketLMError for types pocketlm cannot handle)."""
    try:
        return FORMATS[GGMLType(int(gtype))]
    except (ValueError, KeyError):
        raise PocketLMError(f"unsupported GGUF tensor type {gtype!r}") from None


def tensor_bytes(gtype: GGMLType | int, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of numpy shape [..., K] in type gtype."""
    if len(shape) == 0:
        return row_bytes(gtype, 1)
    return int(np.prod(shape[:-1], dtype=np.int64)) * row_bytes(gtype, int(shape[-1]))


def bits_per_weight(gtype: GGMLType | int) -> float:
    fmt = format_for(gtype)
    return fmt.type_size * 8 / fmt.block_size


def _label(name: str | None) -> str:
    return f"tensor {name!r}" if name else "tensor"


def check_quantizable(x: np.ndarray, gtype: GGMLType | int, name: str | None = None) -> type[BlockFormat]:
    """The format of gtype after checking that x [..., K] can be written in it."""
    fmt = format_for(gtype)
    if not isinstance(x, np.ndarray) or x.ndim == 0 or not np.issubdtype(x.dtype, np.floating):
        raise PocketLMError(f"{_label(name)}: expected a float array [rows, K], got {type(x).__name__} "
                            f"{getattr(x, 'dtype', '')} {getattr(x, 'shape', '')}")
    if x.shape[-1] % fmt.block_size:
        raise PocketLMError(f"{_label(name)} of shape {x.shape}: row length {x.shape[-1]} is not a multiple "
                            f"of the {fmt.gtype.name} block size {fmt.block_size}")
    with np.errstate(over="ignore"):
        finite = np.isfinite(x.astype(F32, copy=False)).all()  # float64 beyond float32 range too
    if not finite:
        raise PocketLMError(f"{_label(name)} of shape {x.shape}: tensor contains NaN/Inf "
                            "(or values beyond float32)")
    return fmt


def quantize(x: np.ndarray, gtype: GGMLType | int, name: str | None = None) -> np.ndarray:
    """x [rows, K] (or [..., K]) float -> uint8 [rows, K // block_size * type_size]: the tensor's
    GGUF bytes, llama.cpp's reference round-to-nearest. `name` only labels error messages."""
    fmt = check_quantizable(x, gtype, name)
    out_shape = (*x.shape[:-1], x.shape[-1] // fmt.block_size * fmt.type_size)
    blocks = np.ascontiguousarray(x, dtype=F32).reshape(-1, fmt.block_size)
    out = np.empty((blocks.shape[0], fmt.type_size), dtype=np.uint8)
    step = max(1, CHUNK_VALUES // fmt.block_size)
    try:
        for start in range(0, blocks.shape[0], step):
            out[start : start + step] = fmt.quantize_blocks(blocks[start : start + step])
    except PocketLMError as e:
        raise PocketLMError(f"{_label(name)} of shape {x.shape} as {fmt.gtype.name}: {e}") from None
    return out.reshape(out_shape)


def dequantize(raw: np.ndarray | memoryview | bytes, gtype: GGMLType | int, shape: tuple[int, ...],
               name: str | None = None) -> np.ndarray:
    """GGUF bytes of a tensor of numpy shape [rows, K] -> float32 array of that shape."""
    fmt = format_for(gtype)
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0 or shape[-1] % fmt.block_size:
        raise PocketLMError(f"{_label(name)}: shape {shape} does not fit {fmt.gtype.name} "
                            f"blocks of {fmt.block_size}")
    data = np.frombuffer(raw, dtype=np.uint8) if not isinstance(raw, np.ndarray) else raw
    data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    want = tensor_bytes(fmt.gtype, shape)
    if data.size != want:
        raise PocketLMError(f"{_label(name)}: {data.size} bytes, but {fmt.gtype.name} {shape} needs {want}")
    blocks = data.reshape(-1, fmt.type_size)
    out = np.empty((blocks.shape[0], fmt.block_size), dtype=F32)
    step = max(1, CHUNK_VALUES // fmt.block_size)
    for start in range(0, blocks.shape[0], step):
        out[start : start + step] = fmt.dequantize_blocks(blocks[start : start + step])
    return out.reshape(shape)
