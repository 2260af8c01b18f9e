"""AWQ (Lin et al. 2023): per-input-channel scales that protect the channels with large activations.

W [out, in] becomes W * s (column j times s[j]) and the inputs x / s, so the product is unchanged;
the caller folds 1/s into the RMSNorm weight before the layer exactly (norm_w / s). The scale is
s = mean|x|^alpha, normalised so that sqrt(max(s) * min(s)) = 1, with alpha grid-searched in
{0, 1/grid, ..., (grid-1)/grid} (grid 20: 0 .. 0.95) minimising the output error
  || X W^T - (X / s) Q(W * s)^T ||^2
on calibration inputs X [n, in], Q = quantize-dequantize in the target GGUF type: by default
llama.cpp's reference rounding (like AWQ's pseudo-quantizer); `rounding` can put the method that
follows into the loop (imatrix_rounding, gptq_rounding: slower, gptq by a factor of the grid).
alpha = 0 (s = 1) is plain rounding, so with the following method in the loop AWQ is never worse
than that method alone on the calibration rows. With RTN in the loop it can be (slightly) worse
before GPTQ, which already handles the outlier channels through the Hessian. For fused layers (Phi-3's
attn_qkv, ffn_up) W holds all rows that share the input and the error is summed over all of them.

Channels with mean|x| = 0 (dead in the calibration set) keep s = 1: a tiny s would put a huge
1/s into the norm weight. AWQ's separate clipping search is not done here: the scale searches of
`mse`/`imatrix`/`gptq` that follow choose each block's range by weighted squared error, which
already clips the block maxima where that helps.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..errors import PocketLMError
from .formats import GGMLType, check_quantizable, dequantize, quantize
from .gptq import gptq_quantize
from .search import search_quantize

F32 = np.float32
MIN_SCALE = 1e-4  # AWQ clamps mean|x|^alpha below at 1e-4


def awq_scale(mean_abs: np.ndarray, alpha: float) -> np.ndarray:
    """[in] mean |x| -> [in] s = mean_abs^alpha normalised, dead channels 1."""
    live = mean_abs > 0
    s = np.ones_like(mean_abs, dtype=np.float64)
    if live.any():
        s_live = np.maximum(mean_abs[live].astype(np.float64) ** alpha, MIN_SCALE)
        s[live] = s_live / np.sqrt(s_live.max() * s_live.min())
    return s.astype(F32)


# A rounding for the search: (W * s [rows, in], s [in]) -> dequantized W * s [rows, in] float32
Rounding = Callable[[np.ndarray, np.ndarray], np.ndarray]


def rtn_rounding(gtype: GGMLType | int) -> Rounding:
    return lambda ws, s: dequantize(quantize(ws, gtype), gtype, ws.shape)


def imatrix_rounding(gtype: GGMLType | int, imatrix: np.ndarray) -> Rounding:
    """imatrix [in] of the unscaled inputs (becomes imatrix / s^2)."""
    imatrix = np.asarray(imatrix, dtype=np.float64)
    return lambda ws, s: dequantize(search_quantize(ws, gtype, imatrix / np.square(s, dtype=np.float64)),
                                    gtype, ws.shape)


def gptq_rounding(gtype: GGMLType | int, hessian: np.ndarray) -> Rounding:
    """hessian [in, in] of the unscaled inputs (becomes H / (s s^T))."""
    return lambda ws, s: dequantize(gptq_quantize(ws, gtype, scale_hessian(hessian, s)), gtype, ws.shape)


def awq_search(w: np.ndarray, x: np.ndarray, gtype: GGMLType | int, grid: int = 20, *,
               mean_abs: np.ndarray | None = None, max_rows: int | None = None,
               rounding: Rounding | None = None, name: str | None = None) -> tuple[np.ndarray, dict]:
    """W [out, in], calibration inputs X [n, in] -> (s [in] float32, stats).

    mean_abs [in]: mean |x| over all calibration tokens (default: over X). max_rows: evaluate the
    error on at most this many rows of W, taken evenly spaced (all parts of a fused matrix stay
    represented); None uses all rows. stats: {"alpha", "error", "errors" (per alpha),
    "plain_error" (alpha 0)}, errors as mean squared output error per element.
    """
    check_quantizable(w, gtype, name)
    x = np.asarray(x, dtype=F32)
    if x.ndim != 2 or x.shape[1] != w.shape[1] or x.shape[0] == 0:
        raise PocketLMError(f"tensor {name or ''}: AWQ needs calibration inputs [n, {w.shape[1]}], "
                            f"got {x.shape}")
    if not np.isfinite(x).all():
        raise PocketLMError(f"tensor {name or ''}: calibration inputs contain NaN/Inf")
    if mean_abs is None:
        mean_abs = np.abs(x).mean(axis=0)
    mean_abs = np.asarray(mean_abs, dtype=F32)
    if max_rows is not None and w.shape[0] > max_rows:
        w = w[np.linspace(0, w.shape[0] - 1, max_rows).round().astype(np.int64)]
    w = np.asarray(w, dtype=F32)
    rounding = rtn_rounding(gtype) if rounding is None else rounding
    ref = x @ w.T  # [n, out]
    errors = []
    best_s, best_err, best_alpha = None, np.inf, 0.0
    for g in range(grid):
        alpha = g / grid
        s = awq_scale(mean_abs, alpha)
        wq = rounding(w * s[None, :], s) / s[None, :]
        diff = x @ wq.T - ref
        err = float(np.mean(diff * diff, dtype=np.float64))
        errors.append(err)
        if err < best_err:
            best_s, best_err, best_alpha = s, err, alpha
    stats = {"alpha": best_alpha, "error": best_err, "errors": errors, "plain_error": errors[0]}
    return best_s, stats


def apply_awq(w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """W [out, in] -> W * s (the weight the rounding methods then quantize)."""
    return np.asarray(w, dtype=F32) * np.asarray(s, dtype=F32)[None, :]


def scale_hessian(h: np.ndarray, s: np.ndarray) -> np.ndarray:
    """H of inputs x -> H of inputs x / s: H / (s s^T)."""
    s64 = np.asarray(s, dtype=np.float64)
    return np.asarray(h, dtype=np.float64) / np.outer(s64, s64)
