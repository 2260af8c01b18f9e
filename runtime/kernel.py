"""Typed wrapper of the C quantized matmul kernel `pocketlm.runtime._kernel`.

Weights stay in their GGUF block format (raw bytes of a tensor, rows of blocks, e.g. a slice of a
memory-mapped file); activations are float32. The C side checks every size, dtype and index and
raises ValueError/TypeError; here those become PocketLMError.

Code path: the fastest one the CPU supports (`active_path()`), overridable with the environment
variable POCKETLM_KERNEL=scalar|avx2|avx512|neon|neon_dotprod|neon_i8mm (read at import) or
`use_path(name)`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from ..errors import PocketLMError
from ..quantize import ggml_types
from ..quantize.ggml_types import GGMLType
from . import _kernel

Buffer = Any  # bytes, memoryview, mmap slice or uint8 ndarray: anything with the buffer protocol
T = TypeVar("T")

ENV_PATH = "POCKETLM_KERNEL"
Q4_0 = GGMLType.Q4_0
# The kernel's load-time layouts (not GGUF types; runtime/kernel/kernel.h): groups of 512 values
# (16 blocks of 32, or two Q4_K super-blocks) with their scales first and the codes interleaved so
# that each int32 SIMD lane accumulates one 32-value block; same size as the source type.
Q4_0_PACKED = 1002
Q8_0_PACKED = 1008
Q4_K_PACKED = 1012
PACKED = {int(GGMLType.Q4_0): Q4_0_PACKED, int(GGMLType.Q8_0): Q8_0_PACKED, int(GGMLType.Q4_K): Q4_K_PACKED}
SOURCE_OF_PACKED = {v: k for k, v in PACKED.items()}
PACK_VALUES = 512  # values per packed group: a matrix is packable when K % 512 == 0


def _kernel_knows(gtype: int) -> bool:
    try:
        _kernel.type_info(gtype)
    except (ValueError, OverflowError):
        return False
    return True


# The GGUF types the C kernel computes with (its table in types.c, asked through `type_info`); the
# block shapes come from the one Python table (quantize/ggml_types.py), checked against C by tests.
KERNEL_TYPES: frozenset[int] = frozenset(t for t in ggml_types.GGML_TYPES if _kernel_knows(t))


def _call(fn: Callable[..., T], *args: Any) -> T:
    try:
        return fn(*args)
    except (ValueError, TypeError, OverflowError) as e:
        raise PocketLMError(f"kernel: {e}") from None


def cpu_features() -> list[str]:
    """CPU features the kernel looks at, e.g. ['avx2', 'fma', 'f16c', 'avx512f', ...]."""
    return _kernel.cpu_features().split()


def available_paths() -> list[str]:
    """Code paths usable on this CPU, slowest first."""
    return _kernel.available_paths().split()


def active_path() -> str:
    return _kernel.active_path()


def use_path(name: str) -> None:
    """Select a code path (tests compare paths); PocketLMError if this CPU cannot run it."""
    _call(_kernel.set_path, name)


def set_threads(n: int) -> None:
    """Number of threads (caller included) the matmuls split weight rows over; n >= 1."""
    if not isinstance(n, int) or isinstance(n, bool):
        raise PocketLMError(f"kernel: thread count must be an int, got {type(n).__name__}")
    _call(_kernel.set_threads, n)


def get_threads() -> int:
    return _kernel.get_threads()


def block_shape(gtype: int) -> tuple[int, int]:
    """(values per block, bytes per block) of a GGML type the kernel supports."""
    return _call(_kernel.type_info, int(gtype))


def row_bytes(gtype: int, K: int) -> int:
    """Bytes of one weight row of K values (a packed layout has its source type's size)."""
    return ggml_types.row_bytes(SOURCE_OF_PACKED.get(int(gtype), gtype), K)


def check_blocks(raw: Buffer, gtype: int) -> int | None:
    """Index of the first block with a NaN or infinite scale (a corrupt file), or None."""
    bad = _call(_kernel.check_blocks, raw, int(gtype))
    return None if bad < 0 else bad


def check_tensor(name: str, raw: Buffer, gtype: int, path: str | os.PathLike | None = None) -> None:
    """The check every verb that reads tensor data applies (run, eval, export): a PocketLMError
    naming the tensor and its first block with a NaN or infinite scale. Tensors of types the kernel
    does not know (F32, F16, BF16: plain numbers) are checked by their readers."""
    if int(gtype) not in KERNEL_TYPES:
        return
    bad = check_blocks(raw, gtype)
    if bad is not None:
        raise PocketLMError(f"tensor {name!r} is corrupt: block {bad} has a NaN or infinite scale", path)


def packed_type(gtype: int) -> int | None:
    """The kernel's packed layout of a GGUF type (Q4_0, Q8_0, Q4_K), or None."""
    return PACKED.get(int(gtype))


def should_repack(gtype: int, K: int) -> bool:
    """True if repacking this matrix at load makes the active path faster: a type with a packed
    layout, K % 512 == 0, and a SIMD kernel for that layout on this path. The packed copy replaces
    the mapped bytes (packed_cache.py keeps it in a cache file, or in memory)."""
    packed = packed_type(gtype)
    return (packed is not None and K % PACK_VALUES == 0 and active_path() != "scalar"
            and _kernel.native_kernel(packed))


def repack(raw: Buffer, gtype: int, rows: int, K: int) -> np.ndarray:
    """Q4_0 / Q8_0 / Q4_K bytes [rows, row bytes] -> the packed layout (`packed_type(gtype)`), a new
    uint8 array of the same size [rows, row bytes]. Use it with matvec/matmul(..., packed_type(gtype),
    rows, K). K must be a multiple of 512."""
    source = ggml_types.row_bytes(gtype, K) if int(gtype) in PACKED and K % 32 == 0 and rows > 0 else 0
    out = np.empty(rows * source, dtype=np.uint8)
    _call(_kernel.repack, raw, int(gtype), rows, K, out)
    return out.reshape(rows, -1)


def matvec(raw: Buffer, gtype: int, rows: int, K: int, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """y[rows] = W[rows, K] . x[K] (float32), W given as raw GGUF blocks."""
    if not isinstance(x, np.ndarray) or x.ndim != 1:
        raise PocketLMError(f"kernel: x must be a 1-D float32 array, got {_describe(x)}")
    if out is None:
        out = np.empty(rows, dtype=np.float32)
    _call(_kernel.matvec, raw, int(gtype), rows, K, x, out)
    return out


def matmul(raw: Buffer, gtype: int, rows: int, K: int, X: np.ndarray,
           out: np.ndarray | None = None) -> np.ndarray:
    """Y[M, rows] = X[M, K] . W[rows, K]^T (float32): the prefill (batched) product."""
    if not isinstance(X, np.ndarray) or X.ndim != 2:
        raise PocketLMError(f"kernel: X must be a 2-D float32 array [M, K], got {_describe(X)}")
    M = X.shape[0]
    if out is None:
        out = np.empty((M, rows), dtype=np.float32)
    _call(_kernel.matmul, raw, int(gtype), rows, K, X, M, out)
    return out


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, lo: int, hi: int,
              out: np.ndarray | None = None) -> np.ndarray:
    """Decode attention of one token: out[H, hd] = softmax(q . k[:, lo:hi]^T / sqrt(hd)) . v[:, lo:hi].

    q: float32 [H, hd]; k, v: one layer's KV cache [KV, n_ctx, hd], float16 (or uint16 fp16 bits)
    or float32, C-contiguous (KVCache stores them so); H % KV == 0 (grouped-query: query head h uses
    kv head h // (H // KV)); 0 <= lo < hi <= n_ctx is the causal / sliding-window range.
    """
    if not isinstance(q, np.ndarray) or q.ndim != 2:
        raise PocketLMError(f"kernel: q must be a 2-D float32 array [heads, head_dim], got {_describe(q)}")
    for name, c in (("k", k), ("v", v)):
        if not isinstance(c, np.ndarray) or c.ndim != 3:
            raise PocketLMError(f"kernel: {name} must be a 3-D array [kv_heads, n_ctx, head_dim], "
                                f"got {_describe(c)}")
    if k.shape != v.shape:
        raise PocketLMError(f"kernel: k {k.shape} and v {v.shape} must have the same shape")
    H, hd = q.shape
    KV, n_ctx, k_hd = k.shape
    if k_hd != hd:
        raise PocketLMError(f"kernel: q has head_dim {hd} but the cache has head_dim {k_hd}")
    for name, n in (("lo", lo), ("hi", hi)):
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool):
            raise PocketLMError(f"kernel: {name} must be an int, got {type(n).__name__}")
    if out is None:
        out = np.empty((H, hd), dtype=np.float32)
    _call(_kernel.attention, q, k, v, H, KV, hd, n_ctx, int(lo), int(hi), out)
    return out


def attention_rows(q: np.ndarray, k: np.ndarray, v: np.ndarray, n_heads: int, pos: int, *,
                   k_scale: np.ndarray | None = None, v_scale: np.ndarray | None = None, window: int = 0,
                   scale: float | None = None, sparse: Any = None,
                   out: np.ndarray | None = None) -> np.ndarray:
    """Attention of T query rows at positions pos..pos+T-1 over one layer's KV cache -> out [T, H*hd].

    q: float32 [T, >= n_heads*hd] whose first n_heads*hd columns are the queries (rows may be
    strided: a column slice of the fused qkv rows works as is); k, v: [KV, n_ctx, hd] float32,
    float16 (or uint16 fp16 bits) or int8 with k_scale, v_scale fp16 [KV, n_ctx]; the rows' own
    keys must already be in the cache. Row t sees keys j <= pos+t, j > pos+t-window (window > 0),
    and with `sparse` (a pocketlm.blocksparse.BlockSparse, or a tuple (block, local_blocks,
    vert_stride, head_step)) only the key blocks its head sees. scale: default 1/sqrt(hd).
    """
    for name, c in (("k", k), ("v", v)):
        if not isinstance(c, np.ndarray) or c.ndim != 3:
            raise PocketLMError(f"kernel: {name} must be a 3-D array [kv_heads, n_ctx, head_dim], "
                                f"got {_describe(c)}")
    if not isinstance(q, np.ndarray) or q.ndim != 2:
        raise PocketLMError(f"kernel: q must be a 2-D float32 array [rows, >= heads*head_dim], got {_describe(q)}")
    KV, n_ctx, hd = k.shape
    for name, n in (("n_heads", n_heads), ("pos", pos), ("window", window)):
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool):
            raise PocketLMError(f"kernel: {name} must be an int, got {type(n).__name__}")
    if sparse is not None and hasattr(sparse, "head_step"):
        sparse = (sparse.block_size, sparse.local_blocks, sparse.vert_stride, sparse.head_step(int(n_heads)))
    if sparse is not None:
        if not isinstance(sparse, tuple) or len(sparse) != 4 or not all(
                isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in sparse):
            raise PocketLMError(f"kernel: sparse must be a BlockSparse or a tuple of 4 ints, got {sparse!r}")
        sparse = tuple(int(x) for x in sparse)
    if scale is None:
        scale = 1.0 / float(np.sqrt(hd))
    if out is None:
        out = np.empty((q.shape[0], int(n_heads) * hd), dtype=np.float32)
    _call(_kernel.attention_rows, q, k, v, k_scale, v_scale, int(n_heads), KV, hd, n_ctx, int(pos),
          int(window), float(scale), sparse, out)
    return out


def _describe(a: object) -> str:
    if isinstance(a, np.ndarray):
        return f"array of shape {a.shape} and dtype {a.dtype}"
    return type(a).__name__


def _apply_env() -> None:
    name = os.environ.get(ENV_PATH)
    if name:
        try:
            _kernel.set_path(name)
        except ValueError as e:
            raise PocketLMError(f"{ENV_PATH}={name}: {e}") from None


_apply_env()
