"""The quantization methods, one handler per scheme: each turns one weight matrix W [out, in]
float32 (plus calibration statistics of its input) into the tensor's GGUF bytes in a block type.

  rtn      llama.cpp's reference rounding                              formats.quantize
  mse      scale search minimising squared error (unit importance)    search.search_quantize
  imatrix  the same search weighted by the imatrix (mean x^2)          search.search_quantize
  gptq     Hessian-based error compensation, H = 2/n X^T X             gptq.gptq_quantize
  awq      per-input-channel scales before any of the above            awq.awq_search

They are pure functions of one matrix and its statistics; the model pipeline (pipeline.py) feeds
them layer by layer. Methods compose: AWQ scales W (W * s, inputs x / s, so the imatrix becomes
imatrix / s^2 and H becomes H / (s s^T)), then a rounding method quantizes the scaled W.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..errors import PocketLMError
from .awq import apply_awq, awq_search, scale_hessian
from .formats import GGMLType, quantize
from .gptq import HessianAccumulator, gptq_quantize
from .search import quantize_imatrix, quantize_mse, search_quantize

__all__ = [
    "METHODS", "HessianAccumulator", "apply_awq", "awq_scales", "awq_search", "gptq_quantize",
    "quantize_with", "rtn_quantize", "scale_hessian", "search_quantize",
]

AWQ_MAX_ROWS = 2048  # rows of W the AWQ search evaluates (evenly spaced; see awq.awq_search)


def rtn_quantize(w: np.ndarray, gtype: GGMLType | int, name: str | None = None) -> np.ndarray:
    """llama.cpp's reference round-to-nearest (no calibration)."""
    return quantize(w, gtype, name)


def awq_scales(w: np.ndarray, gtype: GGMLType | int, x: np.ndarray, mean_abs: np.ndarray | None = None,
               grid: int = 20) -> np.ndarray:
    """AWQ scales s [in] for W [out, in] from calibration input rows X [n, in]."""
    s, _ = awq_search(w, x, gtype, grid, mean_abs=mean_abs, max_rows=AWQ_MAX_ROWS)
    return s


def _gptq(w, gtype, *, imatrix=None, hessian=None, name=None):
    if hessian is None:
        raise PocketLMError(f"tensor {name or ''}: gptq needs a Hessian (calibration statistics)")
    return gptq_quantize(w, gtype, hessian, imatrix, name=name)


def _rtn(w, gtype, *, imatrix=None, hessian=None, name=None):
    return quantize(w, gtype, name)


def _mse(w, gtype, *, imatrix=None, hessian=None, name=None):
    return quantize_mse(w, gtype, name)


def _imatrix(w, gtype, *, imatrix=None, hessian=None, name=None):
    return quantize_imatrix(w, gtype, imatrix, name)


METHODS: dict[str, Callable[..., np.ndarray]] = {"rtn": _rtn, "mse": _mse, "imatrix": _imatrix, "gptq": _gptq}


def quantize_with(method: str, w: np.ndarray, gtype: GGMLType | int, *, imatrix: np.ndarray | None = None,
                  hessian: np.ndarray | None = None, name: str | None = None) -> np.ndarray:
    """Dispatch by method name: W [out, in] -> GGUF bytes uint8 [out, row_bytes]."""
    try:
        handler = METHODS[method]
    except KeyError:
        raise PocketLMError(f"unknown quantization method {method!r} (one of {', '.join(METHODS)})") from None
    return handler(w, gtype, imatrix=imatrix, hessian=hessian, name=name)
