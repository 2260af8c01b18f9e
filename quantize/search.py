"""The `mse` and `imatrix` methods: per-block scale search minimising (weighted) squared error.

This is llama.cpp's importance-matrix quantization (`quantize_row_*_impl` in ggml-quants.c):
bytes identical to llama.cpp's `ggml_quantize_chunk(..., imatrix)` for Q4_0, Q4_1, Q4_K, Q5_K
and Q6_K.
  imatrix  importance = the calibration imatrix, mean x^2 per input channel
  mse      importance = 1 for every channel (no calibration)
The importance of input channel j becomes a weight per value W[r, j] by llama.cpp's recipe:
  Q4_0, Q4_1, Q8_0  w = imp[j] * sqrt(sigma2_row + W[r, j]^2),  sigma2_row = mean of W[r]^2
  Q4_K, Q5_K        w = imp[j] * sqrt(sigma2 + W[r, j]^2),      sigma2 = 2 * mean x^2 of the super-block
  Q6_K              w = imp[j]
Q8_0 is pocketlm's extension (llama.cpp ignores the imatrix for Q8_0): the Q4_0 search with codes
-128..127. Channels of zero importance (dead in the calibration set) get a tiny positive importance
so that a block of only such channels is still quantized by plain squared error, not zeroed.
"""

from __future__ import annotations

import numpy as np

from ..errors import PocketLMError
from .formats import QK_K, GGMLType, QuantFormat, check_quantizable, format_for, quantize

F32 = np.float32
CHUNK_VALUES = 1 << 16  # values per search call (bounds the ~40 temporaries of the K-quant search)


def checked_importance(importance: np.ndarray | None, k: int, name: str | None = None) -> np.ndarray:
    """[k] float32 importance, all > 0 (None -> ones). Zero entries become 1e-6 * mean of the rest."""
    if importance is None:
        return np.ones(k, dtype=F32)
    imp = np.asarray(importance, dtype=np.float64).reshape(-1)
    label = f"tensor {name!r}" if name else "tensor"
    if imp.size != k or not np.isfinite(imp).all() or (imp < 0).any():
        raise PocketLMError(f"{label}: importance must be {k} finite non-negative values "
                            f"(got {imp.size} values, min {imp.min() if imp.size else 'n/a'})")
    live = imp > 0
    floor = 1e-6 * imp[live].mean() if live.any() else 1.0
    return np.where(live, imp, floor).astype(F32)


def row_sigma2(x: np.ndarray) -> np.ndarray:
    """[rows, K] -> [rows] mean x^2 per row, summed in row order as llama.cpp does."""
    xt = np.ascontiguousarray(x.T, dtype=F32)
    return (xt * xt).sum(axis=0) / F32(x.shape[1])


def value_weights(gtype: GGMLType, x: np.ndarray, importance: np.ndarray,
                  sigma2: np.ndarray | None = None) -> np.ndarray:
    """llama.cpp's per-value weights for the scale search. x [rows, n] float32 (whole blocks),
    importance [n] > 0; sigma2 [rows] (Q4_0/Q4_1/Q8_0: mean x^2 of the whole row; default: of x)."""
    if gtype == GGMLType.Q6_K:
        return np.broadcast_to(importance, x.shape).astype(F32)
    if gtype in (GGMLType.Q4_K, GGMLType.Q5_K):
        rows, n = x.shape
        sb = np.ascontiguousarray(x.reshape(rows * (n // QK_K), QK_K).T)  # [256, super-blocks]
        s2 = (F32(2) * (sb * sb).sum(axis=0) / F32(QK_K)).reshape(rows, n // QK_K)
        s2 = np.repeat(s2, QK_K, axis=1)
    else:
        s2 = (row_sigma2(x) if sigma2 is None else sigma2.astype(F32))[:, None]
    return importance[None, :] * np.sqrt(s2 + x * x)


def search_fields(fmt: type[QuantFormat], x: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, ...]:
    """Scale search over whole blocks: x, weights [rows, n] (n a multiple of the block size)
    -> (codes [rows * n/bs, bs], *fields) in row-major block order."""
    blocks = np.ascontiguousarray(x, dtype=F32).reshape(-1, fmt.block_size)
    wblocks = np.ascontiguousarray(weights, dtype=F32).reshape(-1, fmt.block_size)
    step = max(1, CHUNK_VALUES // fmt.block_size)
    parts = [fmt.search_blocks(blocks[i : i + step], wblocks[i : i + step])
             for i in range(0, len(blocks), step)]
    return tuple(np.concatenate(p, axis=0) for p in zip(*parts, strict=True))


def search_quantize(w: np.ndarray, gtype: GGMLType | int, importance: np.ndarray | None = None,
                    name: str | None = None) -> np.ndarray:
    """W [rows, K] -> GGUF bytes uint8 [rows, row_bytes]: `mse` (importance None) or `imatrix`."""
    fmt = check_quantizable(w, gtype, name)
    if not issubclass(fmt, QuantFormat):
        return quantize(w, gtype, name)  # float types: nothing to search
    k = w.shape[-1]
    w2 = np.ascontiguousarray(w, dtype=F32).reshape(-1, k)
    imp = checked_importance(importance, k, name)
    out = np.empty((w2.shape[0], k // fmt.block_size * fmt.type_size), dtype=np.uint8)
    rows_per_chunk = max(1, CHUNK_VALUES // k)
    try:
        for r in range(0, w2.shape[0], rows_per_chunk):
            x = w2[r : r + rows_per_chunk]
            fields = search_fields(fmt, x, value_weights(fmt.gtype, x, imp))
            out[r : r + rows_per_chunk] = fmt.pack(*fields).reshape(len(x), -1)
    except PocketLMError as e:
        raise PocketLMError(f"tensor {name or ''} of shape {w.shape} as {fmt.gtype.name}: {e}") from None
    return out.reshape(*w.shape[:-1], -1)


def quantize_mse(w: np.ndarray, gtype: GGMLType | int, name: str | None = None) -> np.ndarray:
    """Scale search minimising llama.cpp's weighted squared error with unit importance."""
    return search_quantize(w, gtype, None, name)


def quantize_imatrix(w: np.ndarray, gtype: GGMLType | int, imatrix: np.ndarray,
                     name: str | None = None) -> np.ndarray:
    """Scale search weighted by the calibration imatrix [K] (mean x^2 per input channel)."""
    if imatrix is None:
        raise PocketLMError(f"tensor {name or ''}: the imatrix method needs calibration statistics")
    format_for(gtype)
    return search_quantize(w, gtype, imatrix, name)
