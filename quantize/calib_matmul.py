"""Matrix products of the calibration in bfloat16 (torch), with float32 accumulation.

GPTQ's calibration runs every decoder layer about twice over its 64 x 256 tokens and sums
X^T X-shaped statistics over them: at phi-3-mini's shape that is most of the quantizer's time.
Measured on this Zen 4 (AVX512_BF16, 2 threads, shapes 256-4096 x 3072 x 9216 and x 8192 x 3072):
torch's bfloat16 `linear` 350-420 GFLOP/s against numpy's float32 (OpenBLAS) 155-200.

What it costs in accuracy: inputs and weights round to bfloat16 (8-bit mantissa, relative error
up to 2^-9), the product accumulates in float32 and rounds to bfloat16 once more (torch's CPU mm
has no float32 output for bfloat16 inputs); the residual stream, norms, attention and the Hessian
X^T X stay float32. That moves a linear's output by a few tenths of a percent, far less than
4-bit weights move it (benchmarks/quant_quality.py keeps its KLD targets with it).

Used only where bfloat16 products run natively (AVX512_BF16 or AMX on x86, which torch reports);
elsewhere torch would emulate them, slower than numpy's float32, so the quantizer stays float32.
"""

from __future__ import annotations

import weakref

import numpy as np

from .gptq import torch_linalg


def bf16_native(torch) -> bool:
    """Whether this CPU multiplies bfloat16 natively (torch's own feature checks)."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, c, lambda: False)()) for c in checks)


class Bf16Matmul:
    """A `pocketlm.reference.Matmul`: x [T, in] @ w [out, in].T in bfloat16, float32 result.

    Each weight is converted once and kept while the caller keeps that array (a weak reference
    tells a replaced weight, e.g. its dequantized copy, from the one converted)."""

    def __init__(self, torch):
        self.torch = torch
        self._weights: dict[str, tuple[weakref.ref, object]] = {}

    def stored(self, x: np.ndarray):
        """x [T, in] float32 as the bfloat16 tensor the product would round it to (half the bytes
        of float32, for inputs kept to be multiplied later)."""
        return self.torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(self.torch.bfloat16)

    def weight(self, name: str, w: np.ndarray):
        cached = self._weights.get(name)
        if cached is None or cached[0]() is not w:
            cached = (weakref.ref(w), self.stored(w))
            self._weights[name] = cached
        return cached[1]

    def forget(self, names: list[str]) -> None:
        """Drop the converted copies of these weights."""
        for name in names:
            self._weights.pop(name, None)

    def __call__(self, name: str, x, w: np.ndarray) -> np.ndarray:
        """x: float32 array, or a tensor from `stored`."""
        torch = self.torch
        xb = x if isinstance(x, torch.Tensor) else self.stored(x)
        return torch.nn.functional.linear(xb, self.weight(name, w)).float().numpy()

    def product(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """a [m, k] @ b [n, k].T -> [m, n] float32 (gptq.Product: the float target's corrections)."""
        return self.torch.nn.functional.linear(self.stored(a), self.stored(b)).float().numpy()

    def cross(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """a^T b for a, b [n, in] float32 -> [in, in] float32 (the float target's D = Delta^T X)."""
        return self.torch.mm(self.stored(a).T, self.stored(b)).float().numpy()


def calibration_matmul() -> Bf16Matmul | None:
    """The bfloat16 products when torch is installed (and not switched off by POCKETLM_NO_TORCH)
    and the CPU runs them natively; None: numpy float32."""
    torch = torch_linalg()
    if torch is None or not bf16_native(torch):
        return None
    return Bf16Matmul(torch)
