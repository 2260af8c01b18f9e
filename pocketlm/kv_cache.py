"""The KV cache, one class for the numpy reference (float32) and the runtime (fp16 by default, int8
as an option): preallocated to a context length, written per layer at a position.

Per layer, keys and values are stored [kv_heads, n_ctx, head_dim] so that one head's positions are
contiguous (the attention reads `[:, :length]` slices without copying the layout).

  f16   2 bytes per value (the default; phi-3-mini: 384 KiB per token).
  int8  1 byte per value + one fp16 scale per head and position (absmax / 127), about half of f16.
        The scale is applied to the attention scores (keys) and probabilities (values), so the
        int8 rows are only widened to float32, never multiplied out.
  f32   4 bytes per value: no conversion at read time (fastest in numpy; twice f16's memory).

The runtime's C kernel reads the arrays in place; `read(layer, end)` gives float32 arrays
[kv_heads, end, head_dim] (a view for f32, the reference's kind; a widened copy otherwise).

Memory: the arrays are anonymous memory maps in small pages (`zeroed_array`), so nothing is
allocated until written and a prompt costs only the pages its positions touch, whatever n_ctx is.
(numpy asks for transparent huge pages on arrays this large: every (layer, head) row then faults
in 2 MB, and a 12-token prompt at n_ctx 4096 zeroed the whole 1.6 GB cache, 3 s here.)
"""

from __future__ import annotations

import contextlib
import mmap

import numpy as np

from .errors import PocketLMError

KV_TYPES = ("f16", "int8", "f32")


class KVCache:
    def __init__(self, n_layers: int, n_kv_heads: int, n_ctx: int, head_dim: int, kind: str = "f16"):
        if kind not in KV_TYPES:
            raise PocketLMError(f"KV cache type {kind!r} is not one of {', '.join(KV_TYPES)}")
        self.kind = kind
        self.n_ctx = n_ctx
        self.length = 0  # positions 0..length-1 hold valid entries
        shape = (n_layers, n_kv_heads, n_ctx, head_dim)
        store = {"f16": np.float16, "int8": np.int8, "f32": np.float32}[kind]
        self.k = zeroed_array(shape, store)
        self.v = zeroed_array(shape, store)
        if kind == "int8":
            self.k_scale = zeroed_array(shape[:3], np.float16)  # [layers, kv_heads, n_ctx]
            self.v_scale = zeroed_array(shape[:3], np.float16)

    @property
    def nbytes(self) -> int:
        n = self.k.nbytes + self.v.nbytes
        if self.kind == "int8":
            n += self.k_scale.nbytes + self.v_scale.nbytes
        return n

    def write(self, layer: int, pos: int, k: np.ndarray, v: np.ndarray) -> None:
        """Store k, v [kv_heads, T, head_dim] (float32) at positions pos..pos+T-1."""
        t = k.shape[1]
        if pos + t > self.n_ctx:
            raise PocketLMError(f"KV cache overflow: positions {pos}..{pos + t - 1} do not fit the "
                                f"context of {self.n_ctx}")
        if self.kind == "int8":
            _quantize_into(k, self.k[layer, :, pos:pos + t], self.k_scale[layer, :, pos:pos + t])
            _quantize_into(v, self.v[layer, :, pos:pos + t], self.v_scale[layer, :, pos:pos + t])
        else:
            self.k[layer, :, pos:pos + t] = k
            self.v[layer, :, pos:pos + t] = v

    def read(self, layer: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """Keys and values of positions 0..end-1 as float32 [kv_heads, end, head_dim]: views for an
        f32 cache (the reference's), widened copies otherwise (int8 rows times their scales)."""
        k, v = self.k[layer, :, :end], self.v[layer, :, :end]
        if self.kind == "f32":
            return k, v
        k, v = k.astype(np.float32), v.astype(np.float32)
        if self.kind == "int8":
            k *= self.k_scale[layer, :, :end, None].astype(np.float32)
            v *= self.v_scale[layer, :, :end, None].astype(np.float32)
        return k, v

    def truncate(self, length: int) -> None:
        """Forget positions >= length (entries are overwritten by later writes)."""
        self.length = max(0, min(length, self.length))


def zeroed_array(shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """A zero-filled writable array on an anonymous memory map: pages are zeroed by the OS on first
    touch, 4 KB at a time (huge pages declined where the OS would use them), so untouched positions
    cost neither time nor memory."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if n == 0:
        return np.zeros(shape, dtype)
    buf = mmap.mmap(-1, n)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # Linux, Android ("always" THP would fault 2 MB at a time)
        with contextlib.suppress(OSError):
            buf.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


def _quantize_into(x: np.ndarray, q_out: np.ndarray, scale_out: np.ndarray) -> None:
    """x [H, T, hd] float32 -> int8 codes [H, T, hd] and fp16 scales [H, T] (absmax / 127)."""
    amax = np.abs(x).max(axis=-1)                                  # [H, T]
    scale = (amax / 127.0).astype(np.float16)
    s32 = scale.astype(np.float32)
    inv = np.divide(1.0, s32, out=np.zeros_like(s32), where=s32 > 0)
    q_out[...] = np.clip(np.rint(x * inv[..., None]), -127, 127).astype(np.int8)
    scale_out[...] = scale
