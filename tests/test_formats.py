"""GGUF block formats (quantize/formats.py) against gguf-py and llama.cpp's own quantizer.

Oracles: `gguf.quants.quantize/dequantize` (gguf-py) and `ggml_quantize_chunk` from the libggml
that llama-cpp-python ships (llama.cpp's C reference quantizers, called through ctypes).
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import quants as gq
from quant_helpers import ggml_quantize  # tests/ is on sys.path (conftest)

from pocketlm.errors import PocketLMError
from pocketlm.quantize import formats as F

QUANT_TYPES = ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]
ALL_TYPES = [*QUANT_TYPES, "F32", "F16", "BF16"]


def gguf_type(name: str) -> gguf.GGMLQuantizationType:
    return gguf.GGMLQuantizationType[name]


def pathological_rows(k: int = 512) -> np.ndarray:
    """Rows of hard cases, each repeated over whole blocks and super-blocks: [rows, k] float32."""
    rng = np.random.default_rng(7)
    rows = {
        "zero": np.zeros(k),
        "one_outlier": np.where(np.arange(k) % 97 == 5, 3e4, rng.standard_normal(k) * 1e-3),
        "all_negative": -np.abs(rng.standard_normal(k)) - 0.5,
        "all_positive": np.abs(rng.standard_normal(k)) + 2.0,
        "fp16_subnormal": rng.standard_normal(k) * 1e-6,   # scales are fp16 subnormals
        "fp32_tiny": rng.standard_normal(k) * 1e-39,      # float32 subnormal inputs
        "constant": np.full(k, 0.37),
        "ties": np.round(rng.standard_normal(k) * 4) / 4,  # many x/d exactly on .5
        "sparse": np.where(rng.random(k) < 0.05, rng.standard_normal(k), 0.0),
        "large": rng.standard_normal(k) * 1e3,
    }
    return np.stack(list(rows.values())).astype(np.float32)


def random_rows(rows: int = 48, k: int = 1024, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, k)) * rng.uniform(0.01, 2.0, (rows, 1))
    x[:, ::61] *= 12  # some outlier columns
    return x.astype(np.float32)


def assert_same_tensor(ours: np.ndarray, theirs: np.ndarray, gtype: F.GGMLType, x: np.ndarray) -> None:
    """Bytes identical, except rows of float32-subnormal values, where the oracles' codes come
    from casting inf/NaN (undefined in C): there the decoded values (all 0) must be identical."""
    tiny = np.abs(x).max(axis=1) < 1e-30
    np.testing.assert_array_equal(ours[~tiny], theirs[~tiny])
    decode = lambda raw: F.dequantize(raw, gtype, (int(tiny.sum()), x.shape[1]))  # noqa: E731
    np.testing.assert_array_equal(decode(ours[tiny]), decode(theirs[tiny]))


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q8_0", "BF16"])
def test_rtn_bytes_identical_to_gguf_py(name):
    gtype = F.GGMLType[name]
    for x in (random_rows(), pathological_rows()):
        ours = F.quantize(x, gtype)
        with np.errstate(all="ignore"):
            theirs = gq.quantize(x, gguf_type(name)).view(np.uint8).reshape(ours.shape)
        assert_same_tensor(ours, theirs, gtype, x)


@pytest.mark.parametrize("name", QUANT_TYPES)
def test_rtn_bytes_identical_to_llama_cpp(name):
    gtype = F.GGMLType[name]
    for x in (random_rows(seed=1), pathological_rows(1024)):
        assert_same_tensor(F.quantize(x, gtype), ggml_quantize(x, gtype), gtype, x)


@pytest.mark.parametrize("name", ALL_TYPES)
def test_dequantize_identical_to_gguf_py(name):
    gtype = F.GGMLType[name]
    for x in (random_rows(seed=2), pathological_rows()):
        raw = F.quantize(x, gtype)
        np.testing.assert_array_equal(F.dequantize(raw, gtype, x.shape), gq.dequantize(raw, gguf_type(name)))


@pytest.mark.parametrize("name", ALL_TYPES)
def test_dequantize_arbitrary_bytes_identical_to_gguf_py(name):
    """Every bit pattern (any code, any scale incl. fp16 subnormal/inf/NaN) decodes like gguf-py."""
    fmt = F.format_for(F.GGMLType[name])
    raw = np.random.default_rng(3).integers(0, 256, (16, 8 * fmt.type_size), dtype=np.uint8)
    shape = (16, 8 * fmt.block_size)
    with np.errstate(invalid="ignore", over="ignore"):
        ours = F.dequantize(memoryview(raw.tobytes()), fmt.gtype, shape)
        theirs = gq.dequantize(raw, gguf_type(name))
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("name", QUANT_TYPES)
def test_pack_unpack_roundtrip_is_the_gguf_layout(name):
    """Explicit codes and scales written by pack() come back from unpack() and decode in gguf-py
    to exactly decode(codes, fields)."""
    fmt = F.format_for(F.GGMLType[name])
    rng = np.random.default_rng(4)
    n = 12
    codes = rng.integers(fmt.code_min, fmt.code_max + 1, (n, fmt.block_size))
    codes = codes.astype(np.int8 if fmt.code_min < 0 else np.uint8)
    f16 = lambda: rng.standard_normal(n).astype(np.float16)  # noqa: E731
    fields = {
        "Q4_0": lambda: (f16(),),
        "Q8_0": lambda: (f16(),),
        "Q4_1": lambda: (f16(), f16()),
        "Q4_K": lambda: (f16(), f16(), rng.integers(0, 64, (n, 8)).astype(np.uint8),
                         rng.integers(0, 64, (n, 8)).astype(np.uint8)),
        "Q5_K": lambda: (f16(), f16(), rng.integers(0, 64, (n, 8)).astype(np.uint8),
                         rng.integers(0, 64, (n, 8)).astype(np.uint8)),
        "Q6_K": lambda: (f16(), rng.integers(-128, 128, (n, 16)).astype(np.int8)),
    }[name]()
    raw = fmt.pack(codes, *fields)
    assert raw.shape == (n, fmt.type_size) and raw.dtype == np.uint8
    back = fmt.unpack(raw)
    for a, b in zip((codes, *fields), back, strict=True):
        np.testing.assert_array_equal(a, b)
    decoded = gq.dequantize(raw, gguf_type(name)).reshape(n, -1)
    np.testing.assert_array_equal(decoded, fmt.decode(codes, *fields))
    with pytest.raises(PocketLMError, match="codes outside"):
        fmt.pack(np.full(codes.shape, 128, dtype=np.int16), *fields)


def test_kquant_error_size_on_gaussian_data():
    """Relative RMS error of the reference round-trip on N(0, 1): what llama.cpp itself gives
    (0.0713 for Q4_K, 0.0361 for Q5_K, 0.0178 for Q6_K on this data: 4.5, 5.5 and 6.56 bits per
    weight; each extra bit about halves the error)."""
    x = np.random.default_rng(5).standard_normal((256, 2048)).astype(np.float32)
    rel = {}
    for name in ("Q4_0", "Q4_K", "Q5_K", "Q6_K", "Q8_0"):
        gtype = F.GGMLType[name]
        y = F.dequantize(F.quantize(x, gtype), gtype, x.shape)
        rel[name] = float(np.sqrt(np.mean((y - x) ** 2) / np.mean(x**2)))
    assert 0.065 < rel["Q4_K"] < 0.078
    assert 0.033 < rel["Q5_K"] < 0.039
    assert 0.015 < rel["Q6_K"] < 0.020
    assert rel["Q8_0"] < 0.006
    assert rel["Q4_K"] < rel["Q4_0"]  # same 4.5 bpw, the asymmetric sub-block search is better


@pytest.mark.parametrize("name", ALL_TYPES)
def test_sizes_match_gguf_py(name):
    gtype = F.GGMLType[name]
    block, size = gguf.GGML_QUANT_SIZES[gguf_type(name)]
    fmt = F.format_for(gtype)
    assert (fmt.block_size, fmt.type_size) == (block, size) == F.BLOCK_SHAPE[gtype]
    assert F.row_bytes(gtype, 3072) == 3072 // block * size
    assert F.tensor_bytes(gtype, (5, 3072)) == 5 * 3072 // block * size
    assert F.bits_per_weight(gtype) == size * 8 / block


def test_bad_inputs_give_clear_errors():
    x = np.ones((4, 100), dtype=np.float32)
    with pytest.raises(PocketLMError, match=r"\(4, 100\).*multiple of the Q4_0 block size 32"):
        F.quantize(x, F.GGMLType.Q4_0, "blk.0.attn_qkv.weight")
    for bad in (np.nan, np.inf, -np.inf):
        y = np.ones((2, 256), dtype=np.float32)
        y[1, 7] = bad
        for name in ALL_TYPES:
            with pytest.raises(PocketLMError, match="tensor contains NaN/Inf"):
                F.quantize(y, F.GGMLType[name])
    with pytest.raises(PocketLMError, match="float16"):
        F.quantize(np.full((1, 32), 1e6, dtype=np.float32), F.GGMLType.Q4_0)  # d = 1.25e5
    with pytest.raises(PocketLMError, match="float16"):
        F.quantize(np.full((1, 4), 7e4, dtype=np.float32), F.GGMLType.F16)
    with pytest.raises(PocketLMError, match="bytes"):
        F.dequantize(np.zeros(17, np.uint8), F.GGMLType.Q4_0, (1, 32))
    with pytest.raises(PocketLMError, match="unsupported GGUF tensor type"):
        F.format_for(6)  # Q5_0: not a pocketlm type
    with pytest.raises(PocketLMError):
        F.row_bytes(F.GGMLType.Q4_K, 3000)
