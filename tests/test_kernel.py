"""The C quantized matmul kernel against independent oracles.

Oracles: gguf-py (`gguf.quants.quantize` for Q4_0/Q4_1/Q8_0 weights, `gguf.quants.dequantize` for
every type) and float64 numpy. Two levels: (1) the kernel agrees with dequant(W) @ x to within the
int8 activation error; (2) with the activation quantization replayed in numpy (d = amax/127,
q = round-half-away(x/d), the kernel's documented rule), it agrees with float64 to ~1e-5, which pins
every byte of the block layouts. Plus: each SIMD path equals the scalar path, batched == matvecs,
the load-time packed layouts (Q4_0, Q8_0, Q4_K) == the raw ones, threads 1 == 2 and any row split
bit for bit, bad arguments raise PocketLMError (never a crash).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf.quants as gq
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from pocketlm.errors import PocketLMError
from pocketlm.kv_cache import KVCache
from pocketlm.quantize import formats
from pocketlm.runtime import _kernel
from pocketlm.runtime import kernel as k

REPO = Path(__file__).resolve().parents[1]
TYPES = [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q4_K, Q.Q6_K]
PATHS = k.available_paths()
N, K = 48, 1024  # K: 32 blocks of 32 / 4 super-blocks of 256


@pytest.fixture(autouse=True)
def _restore_kernel_state():
    path, threads = k.active_path(), k.get_threads()
    yield
    k.use_path(path)
    k.set_threads(threads)


def random_kquant(t: Q, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant bytes with finite fp16 super-block scales: every code and 6-bit scale pattern."""
    _, nbytes = k.block_shape(t)
    raw = rng.integers(0, 256, size=(rows * cols // 256, nbytes), dtype=np.uint8)
    d = rng.uniform(1e-3, 2e-2, size=(raw.shape[0], 2)).astype(np.float16).view(np.uint8)
    if t == Q.Q4_K:
        raw[:, 0:4] = d  # d, dmin
    else:
        raw[:, 208:210] = d[:, 0:2]  # d
    return raw.reshape(rows, -1)


def make_weights(t: Q, rows: int, cols: int, seed: int = 0, source: str = "oracle") -> np.ndarray:
    """[rows, row_bytes] uint8 GGUF bytes of a random matrix."""
    rng = np.random.default_rng(seed)
    if t in (Q.Q4_K, Q.Q6_K) and source == "random":
        return random_kquant(t, rows, cols, rng)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    if t in (Q.Q4_K, Q.Q6_K):
        return formats.quantize(w, int(t))
    return gq.quantize(w, t)


def dequant(raw: np.ndarray, t: Q) -> np.ndarray:
    return gq.dequantize(raw, t).astype(np.float64)


def act_roundtrip(x: np.ndarray, block: int) -> np.ndarray:
    """The kernel's int8 activation (float32 math) dequantized: the exact input of its integer dots."""
    xb = x.astype(np.float32).reshape(-1, block)
    d = np.abs(xb).max(axis=1, keepdims=True) / np.float32(127)
    normal = d >= np.finfo(np.float32).tiny  # a subnormal scale quantizes its block to zeros
    inv = np.where(normal, np.float32(1) / np.where(normal, d, 1), np.float32(0)).astype(np.float32)
    v = xb * inv
    q = np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))  # C roundf: half away from zero
    return (q.astype(np.float64) * d.astype(np.float64)).reshape(-1)


def act_block(t: Q) -> int:
    return 256 if t in (Q.Q4_K, Q.Q6_K) else 32


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_matvec_matches_gguf_dequant(t: Q, path: str) -> None:
    for source in ("oracle", "random") if t in (Q.Q4_K, Q.Q6_K) else ("oracle",):
        raw = make_weights(t, N, K, seed=1, source=source)
        x = np.random.default_rng(2).standard_normal(K).astype(np.float32)
        W = dequant(raw, t)
        k.use_path(path)
        y = k.matvec(raw, t, N, K, x)
        assert y.dtype == np.float32 and y.shape == (N,)
        scale = np.linalg.norm(W, axis=1) * np.linalg.norm(x)
        # (1) within the int8-activation error of the float product
        np.testing.assert_array_less(np.abs(y - W @ x.astype(np.float64)), 1e-2 * scale)
        # (2) the same integers in float64: layouts exact up to float32 accumulation
        np.testing.assert_array_less(np.abs(y - W @ act_roundtrip(x, act_block(t))), 2e-6 * scale + 1e-30)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("t", [Q.Q8_0, Q.Q6_K], ids=lambda t: t.name)
def test_activation_rounding_value_by_value(t: Q, path: str) -> None:
    """Identity weights: output j is x_j's int8 code times its block's scale and nothing else, so
    every value's rounding is checked against the numpy replay of the rule (one code off moves it by
    1/127 of the block's largest value, over 1e3 times the tolerance): the SIMD quantizers' too
    (blocks of 32 for Q8_0, exact; 256 for Q6_K, whose dot leaves float residues of ~1e-7 where the
    other codes of a sub-block cancel), on ties, signed zeros, an all-zero block and a
    subnormal-scale one."""
    rng = np.random.default_rng(40)
    x = rng.standard_normal(K).astype(np.float32) * 3
    x[0:32] = 0.0                                   # an all-zero block
    x[32:64] *= np.float32(1e-37)                   # amax / 127 below FLT_MIN: quantizes to zeros
    x[64:96] = (np.arange(32) - 15.5).astype(np.float32) * np.float32(127 / 16.5)  # k + 0.5 codes
    x[96:128] = -0.0                                # signed zeros
    x[300] = 40.0                                   # the amax of its block: code 127 exactly
    eye = np.eye(K, dtype=np.float32)
    raw = gq.quantize(eye, t) if t == Q.Q8_0 else formats.quantize(eye, int(t))
    tol = {"rtol": 1e-5, "atol": 1e-30} if t == Q.Q8_0 else {"rtol": 1e-4, "atol": 1e-5 * float(np.abs(x).max())}
    k.use_path(path)
    y = k.matvec(raw, t, K, K, x).astype(np.float64)
    np.testing.assert_allclose(y, dequant(raw, t) @ act_roundtrip(x, act_block(t)), **tol)
    Y = k.matmul(raw, t, K, K, np.stack([x, -x, x * 0.5]))  # the batched paths quantize the same way
    for m, sign in enumerate((1.0, -1.0, 0.5)):
        np.testing.assert_allclose(Y[m], dequant(raw, t) @ act_roundtrip(x * np.float32(sign), act_block(t)),
                                   **tol, err_msg=f"row {m}")


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_simd_paths_equal_scalar(t: Q) -> None:
    raw = make_weights(t, 64, 2048, seed=3, source="random")
    x = np.random.default_rng(4).standard_normal(2048).astype(np.float32) * 3
    k.use_path("scalar")
    ref = k.matvec(raw, t, 64, 2048, x)
    scale = np.linalg.norm(dequant(raw, t), axis=1) * np.linalg.norm(x)
    for path in PATHS[1:]:
        k.use_path(path)
        np.testing.assert_array_less(np.abs(k.matvec(raw, t, 64, 2048, x) - ref), 1e-6 * scale, err_msg=path)


# M = 5: the multi-activation kernels (Q6_K and the packed types), else row by row (ARM i8mm: 2
# rows x 2 activations); M = 45: the tiled path (gemm.c) where the path has one for the type at that
# size; M = 260: the tiled path for every type it takes (past every kernel's gemm_from, at most 256),
# with a partial group of activations and (rows 47) a partial tile of weight rows.
@pytest.mark.parametrize("M", [5, 45, 260])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("t", [*TYPES, "packed Q4_0", "packed Q8_0", "packed Q4_K"],
                         ids=lambda t: getattr(t, "name", t))
def test_matmul_equals_matvecs(t: Q | str, path: str, M: int) -> None:
    rows = 47
    src_t = Q[t.split()[1]] if isinstance(t, str) else t
    src = "random" if src_t in (Q.Q4_K, Q.Q6_K) else "oracle"  # K-quants: every code and 6-bit scale
    raw = make_weights(src_t, rows, K, seed=5, source=src)
    W = dequant(raw, src_t)
    if isinstance(t, str):
        raw, t = k.repack(raw, src_t, rows, K), k.packed_type(src_t)
    X = np.random.default_rng(6).standard_normal((M, K)).astype(np.float32)
    X[3] *= 1e-3  # rows of very different magnitude: per-row activation scales
    k.use_path(path)
    Y = k.matmul(raw, t, rows, K, X)
    assert Y.shape == (M, rows)
    scale = np.linalg.norm(W, axis=1)
    for m in range(M):  # equal up to summation order
        bound = 1e-6 * scale * np.linalg.norm(X[m])
        np.testing.assert_array_less(np.abs(Y[m] - k.matvec(raw, t, rows, K, X[m])), bound, err_msg=f"row {m}")


# ARM i8mm's 2x2 kernels (raw Q4_0, Q4_1, Q8_0 below the tiled path) sum in their own float order.
TWO_BY_TWO = {("neon_i8mm", Q.Q4_0), ("neon_i8mm", Q.Q4_1), ("neon_i8mm", Q.Q8_0)}


PACKED = ["packed Q4_0", "packed Q8_0", "packed Q4_K"]
# K = 3072 (6 packed groups): the row length whose packed Q4_0 blocks run fully unrolled (dot_avx512.c)
SMALL_BATCH_CASES = [(t, K) for t in [*TYPES, *PACKED]] + [(t, 3072) for t in PACKED]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("t", "kdim"), SMALL_BATCH_CASES, ids=lambda v: str(getattr(v, "name", v)))
def test_small_batches_equal_matvecs_bit_for_bit(t: Q | str, kdim: int, path: str) -> None:
    """M = 2..15 activation rows (a verify's or a short prompt's batch): each row of the batched
    product is the matvec of that row bit for bit (the multi-activation kernels reproduce the single
    dot's float order; row by row it is the same dot), so a verify of K tokens gives the logits of K
    decode steps; and it agrees with float64 dequantize-then-matmul (gguf-py) on the kernel's int8
    activations."""
    rows, K = 43, kdim  # 43: not a multiple of any kernel's row block: a chunk's last rows one at a time
    src_t = Q[t.split()[1]] if isinstance(t, str) else t
    raw = make_weights(src_t, rows, K, seed=23, source="random" if src_t in (Q.Q4_K, Q.Q6_K) else "oracle")
    W = dequant(raw, src_t)
    if isinstance(t, str):
        raw, t = k.repack(raw, src_t, rows, K), k.packed_type(src_t)
    X = np.random.default_rng(24).standard_normal((15, K)).astype(np.float32)
    X[1] *= 1e-3  # rows of very different magnitude: per-row activation scales
    X[4] *= 40
    ref = np.stack([act_roundtrip(x, act_block(src_t)) for x in X]) @ W.T  # [15, rows] float64
    scale = np.linalg.norm(W, axis=1) * np.linalg.norm(X, axis=1)[:, None]
    k.use_path(path)
    k.set_threads(2)
    exact = (path, t) not in TWO_BY_TWO
    for M in range(2, 16):
        Y = k.matmul(raw, t, rows, K, X[:M])
        np.testing.assert_array_less(np.abs(Y - ref[:M]), 2e-6 * scale[:M], err_msg=f"M={M}")
        for m in range(M):
            y = k.matvec(raw, t, rows, K, X[m])
            if exact:
                np.testing.assert_array_equal(Y[m].view(np.uint32), y.view(np.uint32), err_msg=f"M={M} row {m}")
            else:
                np.testing.assert_array_less(np.abs(Y[m] - y), 1e-6 * scale[m], err_msg=f"M={M} row {m}")


def test_weights_from_read_only_file_map(tmp_path: Path) -> None:
    """Weights straight from a read-only memory map of a file (as from a GGUF), at an offset."""
    raw = make_weights(Q.Q8_0, N, K, seed=17)
    path = tmp_path / "w.bin"
    path.write_bytes(b"\0" * 100 + raw.tobytes())
    mapped = np.memmap(path, dtype=np.uint8, mode="r", offset=100, shape=(raw.size,))
    x = np.random.default_rng(18).standard_normal(K).astype(np.float32)
    np.testing.assert_array_equal(k.matvec(mapped, Q.Q8_0, N, K, x), k.matvec(raw, Q.Q8_0, N, K, x))
    np.testing.assert_array_equal(k.matvec(raw.tobytes(), Q.Q8_0, N, K, x), k.matvec(raw, Q.Q8_0, N, K, x))


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_threads_identical(t: Q) -> None:
    raw = make_weights(t, 97, K, seed=10)  # odd row count: uneven split
    x = np.random.default_rng(11).standard_normal(K).astype(np.float32)
    X = np.random.default_rng(12).standard_normal((3, K)).astype(np.float32)
    XL = np.random.default_rng(13).standard_normal((40, K)).astype(np.float32)
    for path in PATHS:
        k.use_path(path)
        k.set_threads(1)
        y1, Y1, Z1 = k.matvec(raw, t, 97, K, x), k.matmul(raw, t, 97, K, X), k.matmul(raw, t, 97, K, XL)
        k.set_threads(2)
        assert k.get_threads() == 2
        for _ in range(20):  # many short jobs: the pool's hand-over
            np.testing.assert_array_equal(k.matvec(raw, t, 97, K, x), y1)
        np.testing.assert_array_equal(k.matmul(raw, t, 97, K, X), Y1)
        np.testing.assert_array_equal(k.matmul(raw, t, 97, K, XL), Z1)  # the tiled path


def test_thread_pool_many_small_jobs() -> None:
    """Back-to-back jobs of every size (1 row .. many chunks): the pool hands over without loss."""
    raw = make_weights(Q.Q4_0, 600, 256, seed=19)
    x = np.random.default_rng(20).standard_normal(256).astype(np.float32)
    k.set_threads(1)
    want = k.matvec(raw, Q.Q4_0, 600, 256, x)
    for threads in (2, 3):
        k.set_threads(threads)
        for i in range(300):
            rows = (1, 2, 17, 33, 97, 600)[i % 6]
            np.testing.assert_array_equal(k.matvec(raw[:rows], Q.Q4_0, rows, 256, x), want[:rows])


def test_threads_from_python_threads() -> None:
    """Concurrent callers (GIL released in C) serialize on the pool and get correct results."""
    import threading

    raw = make_weights(Q.Q4_0, 256, K)
    xs = [np.random.default_rng(s).standard_normal(K).astype(np.float32) for s in range(4)]
    k.set_threads(2)
    want = [k.matvec(raw, Q.Q4_0, 256, K, x) for x in xs]
    got: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        for _ in range(10):
            got[i] = k.matvec(raw, Q.Q4_0, 256, K, xs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for i in range(4):
        np.testing.assert_array_equal(got[i], want[i])


PACKABLE = [Q.Q4_0, Q.Q8_0, Q.Q4_K]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("t", PACKABLE, ids=lambda t: t.name)
def test_packed_equals_raw(t: Q, path: str) -> None:
    """The load-time packed layouts (one SIMD lane per 32-value block) give the raw layout's results:
    against the float64 oracle on the same int8 activation, against the raw kernel, row by row and
    in groups of any size (the multi-row kernel must give each row's dot bit for bit), batched."""
    rows, cols = 41, 2048
    raw = make_weights(t, rows, cols, seed=13, source="random" if t == Q.Q4_K else "oracle")
    if t == Q.Q8_0:  # code -128 (absent from gguf-py's quantizer, legal in the format)
        raw.reshape(-1, 34)[::7, 2 + 5] = 0x80
    packed = k.repack(raw, t, rows, cols)
    pt = k.packed_type(t)
    assert packed.nbytes == raw.nbytes and packed.shape == raw.shape
    x = np.random.default_rng(15).standard_normal(cols).astype(np.float32)
    k.use_path(path)
    W = dequant(raw, t)
    scale = np.linalg.norm(W, axis=1) * np.linalg.norm(x)
    y = k.matvec(packed, pt, rows, cols, x)
    np.testing.assert_array_less(np.abs(y - k.matvec(raw, t, rows, cols, x)), 1e-6 * scale)
    np.testing.assert_array_less(np.abs(y - W @ act_roundtrip(x, act_block(t))), 2e-6 * scale)
    for n in range(1, 10):  # every split into a multi-row part and single rows
        np.testing.assert_array_equal(k.matvec(packed[:n], pt, n, cols, x), y[:n])
        np.testing.assert_array_equal(k.matvec(packed[n:], pt, rows - n, cols, x), y[n:])
    X = np.random.default_rng(16).standard_normal((3, cols)).astype(np.float32)
    Y = k.matmul(packed, pt, rows, cols, X)
    for m in range(3):
        np.testing.assert_array_equal(Y[m], k.matvec(packed, pt, rows, cols, X[m]))
    assert k.should_repack(t, cols) == (path != "scalar" and k.active_path() == path)
    assert not k.should_repack(t, 256 * 3) and not k.should_repack(Q.Q6_K, cols) and not k.should_repack(Q.Q4_1, cols)


def test_packed_layout_bytes() -> None:
    """The documented layout (kernel.h), built here from the definition: value 4v + i of block b
    is byte 4b + i of code vector v (Q4: chunk v // 2, nibble v % 2; Q8_0: chunk v, code + 128)."""
    raw = make_weights(Q.Q4_0, 2, 1024, seed=21)
    packed = k.repack(raw, Q.Q4_0, 2, 1024).reshape(2, 2, 288)
    blocks = raw.reshape(2, 2, 16, 18)
    codes = np.concatenate([blocks[..., 2:] & 15, blocks[..., 2:] >> 4], axis=-1)  # [row, group, block, 32]
    np.testing.assert_array_equal(packed[..., :32].reshape(2, 2, 16, 2), blocks[..., :2])
    chunks = packed[..., 32:].reshape(2, 2, 4, 16, 4)  # [row, group, chunk, block, byte]
    for v in range(8):
        nib = (chunks[:, :, v // 2] >> (4 * (v % 2))) & 15
        np.testing.assert_array_equal(nib, codes[..., 4 * v:4 * v + 4])
    raw8 = make_weights(Q.Q8_0, 1, 512, seed=22)
    p8 = k.repack(raw8, Q.Q8_0, 1, 512).reshape(544)
    b8 = raw8.reshape(16, 34)
    np.testing.assert_array_equal(p8[32:].reshape(8, 16, 4), (b8[:, 2:].reshape(16, 8, 4) ^ 0x80).transpose(1, 0, 2))


def test_extreme_activations() -> None:
    """Tiny (subnormal) and huge finite activations: finite results, no undefined conversions."""
    raw = make_weights(Q.Q8_0, N, K, seed=21)
    W = dequant(raw, Q.Q8_0)
    for value in (1e-39, 3e-38, 1e30, -3e38):
        x = np.full(K, value, np.float32)
        x[::3] *= -0.5
        for path in PATHS:
            k.use_path(path)
            y = k.matvec(raw, Q.Q8_0, N, K, x)
            Y = k.matmul(raw, Q.Q8_0, N, K, np.tile(x, (20, 1)))  # the tiled path too
            assert np.all(np.isfinite(y)) or abs(value) > 1e37, (value, path)
            assert np.all(np.isfinite(Y)) or abs(value) > 1e37, (value, path)
            if 1e-30 < abs(value) < 1e37:
                scale = np.linalg.norm(W, axis=1) * np.linalg.norm(x.astype(np.float64))
                for got in (y, *Y):
                    np.testing.assert_array_less(np.abs(got - W @ x.astype(np.float64)), 1e-2 * scale)


def test_non_finite_activation_named_by_index() -> None:
    """The kernel's scan for NaN / infinity (chunked, branch-free) names the first bad element at
    any position, chunk edges included, and passes the largest finite values and subnormals."""
    raw = make_weights(Q.Q8_0, 4, 3072)
    x = np.random.default_rng(41).standard_normal(3072).astype(np.float32)
    x[[5, 6]] = [np.finfo(np.float32).max, -np.finfo(np.float32).max]
    x[7] = np.float32(1e-45)  # the smallest subnormal
    with np.errstate(over="ignore", invalid="ignore"):
        k.matvec(raw, Q.Q8_0, 4, 3072, x)  # finite: no error
    for i, bad in [(0, np.nan), (1023, np.inf), (1024, -np.inf), (2047, np.nan), (3071, np.inf)]:
        y = x.copy()
        y[i] = bad
        y[min(i + 1, 3071)] = np.nan  # a later one is not the one named
        with pytest.raises(PocketLMError, match=f"NaN or infinity at element {i}$"):
            k.matvec(raw, Q.Q8_0, 4, 3072, y)
        with pytest.raises(PocketLMError, match=f"NaN or infinity at element {3072 + i}$"):
            k.matmul(raw, Q.Q8_0, 4, 3072, np.stack([x, y]))


def test_check_blocks_finds_nan_scale() -> None:
    for t in TYPES:
        raw = make_weights(t, 8, 512)
        assert k.check_blocks(raw, t) is None
        _, nbytes = k.block_shape(t)
        bad = raw.copy().reshape(-1, nbytes)
        off = 208 if t == Q.Q6_K else (2 if t in (Q.Q4_1, Q.Q4_K) else 0)  # dmin / m / d field
        bad[5, off : off + 2] = np.frombuffer(np.float16(np.nan).tobytes(), np.uint8)
        bad[9, off : off + 2] = np.frombuffer(np.float16(np.inf).tobytes(), np.uint8)
        assert k.check_blocks(bad, t) == 5, t.name


def test_bad_arguments_raise() -> None:
    raw = make_weights(Q.Q4_0, 4, 64)
    x = np.ones(64, np.float32)
    bad_calls = {
        "unsupported type": lambda: k.matvec(raw, 6, 4, 64, x),
        "K not a block multiple": lambda: k.matvec(raw, Q.Q4_0, 4, 48, np.ones(48, np.float32)),
        "short weights": lambda: k.matvec(raw.reshape(-1)[:-1], Q.Q4_0, 4, 64, x),
        "rows too many": lambda: k.matvec(raw, Q.Q4_0, 5, 64, x),
        "rows zero": lambda: k.matvec(raw, Q.Q4_0, 0, 64, x),
        "negative K": lambda: k.matvec(raw, Q.Q4_0, 4, -64, x),
        "x length": lambda: k.matvec(raw, Q.Q4_0, 4, 64, np.ones(32, np.float32)),
        "x dtype": lambda: k.matvec(raw, Q.Q4_0, 4, 64, np.ones(64, np.float64)),
        "x strided": lambda: k.matvec(raw, Q.Q4_0, 4, 64, np.ones(128, np.float32)[::2]),
        "x 2-D": lambda: k.matvec(raw, Q.Q4_0, 4, 64, np.ones((1, 64), np.float32)),
        "x NaN": lambda: k.matvec(raw, Q.Q4_0, 4, 64, np.full(64, np.nan, np.float32)),
        "out length": lambda: k.matvec(raw, Q.Q4_0, 4, 64, x, out=np.empty(3, np.float32)),
        "out dtype": lambda: k.matvec(raw, Q.Q4_0, 4, 64, x, out=np.empty(4, np.float64)),
        "out read-only": lambda: k.matvec(raw, Q.Q4_0, 4, 64, x, out=np.frombuffer(bytes(16), np.float32)),
        "weights not a buffer": lambda: k.matvec([1, 2, 3], Q.Q4_0, 4, 64, x),
        "X 1-D": lambda: k.matmul(raw, Q.Q4_0, 4, 64, x),
        "X width": lambda: k.matmul(raw, Q.Q4_0, 4, 64, np.ones((2, 32), np.float32)),
        "X empty": lambda: k.matmul(raw, Q.Q4_0, 4, 64, np.ones((0, 64), np.float32)),
        "matmul out": lambda: k.matmul(raw, Q.Q4_0, 4, 64, np.ones((2, 64), np.float32),
                                       out=np.empty((2, 3), np.float32)),
        "threads 0": lambda: k.set_threads(0),
        "threads bool": lambda: k.set_threads(True),
        "unknown path": lambda: k.use_path("sse9"),
        "check_blocks partial block": lambda: k.check_blocks(raw.reshape(-1)[:-1], Q.Q4_0),
        "repack Q6_K": lambda: k.repack(make_weights(Q.Q6_K, 4, 512), Q.Q6_K, 4, 512),
        "repack K % 512": lambda: k.repack(make_weights(Q.Q4_0, 4, 256), Q.Q4_0, 4, 256),
        "packed K % 512": lambda: k.matvec(raw, k.Q4_0_PACKED, 4, 64, x),
    }
    for what, call in bad_calls.items():
        with pytest.raises(PocketLMError, match="kernel"):
            call()
            pytest.fail(what)
    # the C layer itself raises the standard exceptions (not only the wrapper's checks)
    with pytest.raises(ValueError):
        _kernel.matvec(raw, 2, 4, 64, np.ones(32, np.float32), np.empty(4, np.float32))
    with pytest.raises(TypeError):
        _kernel.matvec(raw, 2, 4, 64, np.ones(64, np.int32), np.empty(4, np.float32))
    with pytest.raises(ValueError):
        _kernel.matmul(raw, 2, 4, 64, np.ones((2, 64), np.float32), 3, np.empty((3, 4), np.float32))
    with pytest.raises(TypeError):  # the block-sparse weight index is gone from the signature
        _kernel.matvec(raw, 2, 4, 64, x, np.empty(4, np.float32), None)


def test_features_and_paths() -> None:
    feats = k.cpu_features()
    assert "scalar" in PATHS and PATHS[0] == "scalar"
    assert k.active_path() in PATHS
    if "avx512vnni" in feats and "avx512bw" in feats:
        assert "avx512" in PATHS
    if "avx2" in feats:
        assert "avx2" in PATHS
    if os.path.exists("/proc/cpuinfo"):  # Linux: never claims what the kernel does not list
        flags = Path("/proc/cpuinfo").read_text()
        for feat in ("avx2", "avx512f", "avx512bw", "avx512vl", "asimddp", "i8mm"):
            name = {"asimddp": "dotprod"}.get(feat, feat)
            assert (f" {feat}" in flags) >= (name in feats), feat


@pytest.mark.parametrize("value", ["scalar", "no_such_path"])
def test_env_override(value: str) -> None:
    code = "from pocketlm.runtime import kernel; print(kernel.active_path())"
    env = {**os.environ, "POCKETLM_KERNEL": value}
    r = subprocess.run([sys.executable, "-P", "-c", code], env=env, capture_output=True, text=True, timeout=60)
    if value == "scalar":
        assert r.returncode == 0 and r.stdout.strip() == "scalar", r.stderr
    else:
        assert r.returncode != 0 and "PocketLMError" in r.stderr
        assert "POCKETLM_KERNEL=no_such_path" in r.stderr


@pytest.mark.parametrize("cc", ["gcc", "clang"])
def test_native_selftest(cc: str, tmp_path: Path) -> None:
    """The kernel's C self-test built for this machine by gcc and by clang (clang contracts
    a * b + c into FMAs where gcc does not): every path the CPU runs against float64, and the
    element-wise SIMD builds (activation quantizer, gated activations) against the baseline C."""
    if not shutil.which(cc):
        pytest.skip(f"{cc} missing")
    kernel_dir = REPO / "runtime" / "kernel"
    sources = [str(p) for p in sorted(kernel_dir.glob("*.c")) if p.name != "module.c"]
    exe = tmp_path / "selftest"
    build = subprocess.run([cc, "-O2", "-std=c11", "-D_GNU_SOURCE", "-Wall", "-Wextra", "-Wno-unused-function",
                            f"-I{kernel_dir}", "-pthread", "-o", str(exe), *sources, "-lm"],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    r = subprocess.run([str(exe), " ".join(k.available_paths())], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ALL PASSED" in r.stdout, r.stdout + r.stderr


def test_arm64_selftest_under_qemu() -> None:
    """NEON paths (plain, dotprod, i8mm) and their run-time selection, cross-built for aarch64."""
    if not (shutil.which("aarch64-linux-gnu-gcc") and shutil.which("qemu-aarch64")):
        pytest.skip("aarch64-linux-gnu-gcc or qemu-aarch64 missing (apt: gcc-aarch64-linux-gnu qemu-user)")
    script = REPO / "runtime" / "kernel" / "cross_test_arm64.sh"
    r = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    for cpu in ("max", "cortex-a76", "cortex-a53"):
        assert f"qemu -cpu {cpu}: PASS" in r.stdout, r.stdout


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ["f16", "f32", "int8"])
def test_kv_store_equals_cache_write(kind: str, path: str) -> None:
    """The runtime's cache write of T fused qkv rows (strided: a column slice of wider rows) stores
    the bytes KVCache.write (the reference's) stores, scales included; positions past the cache and
    a cache of another dtype are refused."""
    H, KV, hd, n_ctx, T, pos = 4, 2, 40, 32, 7, 9  # hd 40: an F16C part and a tail
    rng = np.random.default_rng(30)
    wide = rng.standard_normal((T, (H + 2 * KV) * hd + 5)).astype(np.float32) * 3
    wide[0, H * hd] = 1e-6  # rounds to an fp16 subnormal
    wide[1, H * hd + 3] = 70000.0  # overflows fp16
    qkv = wide[:, :(H + 2 * KV) * hd]
    ref, got = KVCache(2, KV, n_ctx, hd, kind), KVCache(2, KV, n_ctx, hd, kind)
    with np.errstate(over="ignore"):  # 70000 -> inf, numpy's cast warns
        ref.write(1, pos, qkv[:, H * hd:(H + KV) * hd].reshape(T, KV, hd).transpose(1, 0, 2),
                  qkv[:, (H + KV) * hd:].reshape(T, KV, hd).transpose(1, 0, 2))
    scales = (got.k_scale[1], got.v_scale[1]) if kind == "int8" else (None, None)
    k.use_path(path)
    _kernel.kv_store(qkv, H, KV, hd, got.k[1], got.v[1], *scales, n_ctx, pos)
    np.testing.assert_array_equal(got.k.view(np.uint8), ref.k.view(np.uint8))
    np.testing.assert_array_equal(got.v.view(np.uint8), ref.v.view(np.uint8))
    if kind == "int8":
        np.testing.assert_array_equal(got.k_scale.view(np.uint16), ref.k_scale.view(np.uint16))
        np.testing.assert_array_equal(got.v_scale.view(np.uint16), ref.v_scale.view(np.uint16))
    with pytest.raises(ValueError, match="do not fit"):
        _kernel.kv_store(qkv, H, KV, hd, got.k[1], got.v[1], *scales, n_ctx, n_ctx - T + 1)
    with pytest.raises(TypeError):
        _kernel.kv_store(qkv, H, KV, hd, got.k[1].astype(np.float64), got.v[1], *scales, n_ctx, pos)


def test_row_ops_match_numpy_and_check_shapes() -> None:
    """Prefill's element-wise steps (rowops.c) against float64 numpy: RMSNorm and LayerNorm, RoPE,
    SwiGLU and GeGELU (its clamps hit on both sides); bad shapes raise."""
    rng = np.random.default_rng(30)
    T, D, H, hd, F = 37, 96, 5, 16, 80
    h = (rng.standard_normal((T, D)) + 3).astype(np.float32)  # a mean LayerNorm must remove
    w = rng.standard_normal(D).astype(np.float32)
    b = rng.standard_normal(D).astype(np.float32)
    for threads in (1, 2):
        k.set_threads(threads)
        out = np.empty_like(h)
        _kernel.norm(h, w, None, 1e-5, out)
        h64 = h.astype(np.float64)
        want = h64 / np.sqrt((h64 ** 2).mean(axis=1, keepdims=True) + 1e-5) * w
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
        _kernel.norm(h, w, b, 1e-5, out)
        c64 = h64 - h64.mean(axis=1, keepdims=True)
        want = c64 / np.sqrt((c64 ** 2).mean(axis=1, keepdims=True) + 1e-5) * w + b
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
        x = rng.standard_normal((T, H * hd + 7)).astype(np.float32)  # 7 trailing columns untouched
        ang = rng.uniform(0, 6, (T, hd // 2))
        cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
        got = x.copy()
        _kernel.rope(got, H, hd, hd, cos, sin)
        x1, x2 = x[:, :H * hd].reshape(T, H, 2, hd // 2).transpose(2, 0, 1, 3).astype(np.float64)
        c, s = cos[:, None].astype(np.float64), sin[:, None].astype(np.float64)
        want = np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).reshape(T, H * hd)
        np.testing.assert_allclose(got[:, :H * hd], want, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(got[:, H * hd:], x[:, H * hd:])
        gu = rng.standard_normal((T, 2 * F)).astype(np.float32) * 4
        act = np.empty((T, F), np.float32)
        _kernel.gated_act(gu, 0, 0.0, act)
        g, u = gu[:, :F].astype(np.float64), gu[:, F:].astype(np.float64)
        np.testing.assert_allclose(act, g / (1 + np.exp(-g)) * u, rtol=1e-5, atol=1e-6)
        limit = 5.0  # about 20 % of the values past it on either side
        _kernel.gated_act(gu, 1, limit, act)
        gc, uc = np.minimum(g, limit), np.clip(u, -limit, limit)
        np.testing.assert_allclose(act, gc / (1 + np.exp(-1.702 * gc)) * (uc + 1), rtol=1e-5, atol=1e-5)
    bad = {
        "h's shape": lambda: _kernel.norm(h, w, None, 1e-5, np.empty((T, D + 1), np.float32)),
        "w has": lambda: _kernel.norm(h, w[:-1], None, 1e-5, np.empty_like(h)),
        "b has": lambda: _kernel.norm(h, w, b[:-1], 1e-5, np.empty_like(h)),
        "do not fit": lambda: _kernel.rope(h, 7, 16, 16, cos, sin),
        "rotary 18": lambda: _kernel.rope(h, 2, 16, 18, cos, sin),
        "cos has": lambda: _kernel.rope(h, 2, 16, 16, cos[:-1], sin),
        "out must be": lambda: _kernel.gated_act(gu, 0, 0.0, np.empty((T, F + 1), np.float32)),
        "2-D float32": lambda: _kernel.gated_act(gu[0], 0, 0.0, act),
        "activation kind 2": lambda: _kernel.gated_act(gu, 2, 1.0, act),
        "activation kind 1": lambda: _kernel.gated_act(gu, 1, 0.0, act),
    }
    for message, call in bad.items():
        with pytest.raises((ValueError, TypeError), match=message):
            call()
