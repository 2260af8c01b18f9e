"""The element-wise pieces of a Phi-3-family layer in numpy float32, each written once.

The reference forward (reference.py) and the quantizer's calibration read them; the runtime's C
kernel has its own copy of each (runtime/kernel/rowops.c), tested against these.
"""

from __future__ import annotations

import numpy as np

from .config import Phi3Config

QUICK_GELU = np.float32(1.702)  # Phi-3-small's "gelu" is x * sigmoid(1.702 x)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x [..., D] -> x / sqrt(mean(x^2) + eps) * weight."""
    var = np.mean(x * x, axis=-1, keepdims=True)
    return (x / np.sqrt(var + eps)) * weight


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """x [..., D] -> (x - mean) / sqrt(biased var + eps) * weight + bias."""
    centred = x - np.mean(x, axis=-1, keepdims=True)
    var = np.mean(centred * centred, axis=-1, keepdims=True)
    return centred / np.sqrt(var + eps) * weight + bias


def norm(cfg: Phi3Config, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """The model's norm: RMSNorm (Phi-3) or LayerNorm with bias (Phi-3-small)."""
    if cfg.norm == "layer":
        return layer_norm(x, weight, bias, cfg.rms_norm_eps)
    return rms_norm(x, weight, cfg.rms_norm_eps)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def gated_activation(cfg: Phi3Config, gate_up: np.ndarray) -> np.ndarray:
    """[..., 2F] rows [gate | up] -> [..., F].

    swiglu: silu(gate) * up.
    gegelu (Phi-3-small, limit L): g = min(gate, L), l = clip(up, -L, L), g * sigmoid(1.702 g) * (l + 1);
    infinities pass the clamps unchanged, as in Hugging Face's `gegelu`.
    """
    f = gate_up.shape[-1] // 2
    gate, up = gate_up[..., :f], gate_up[..., f:]
    if cfg.activation == "swiglu":
        return silu(gate) * up
    limit = np.float32(cfg.gegelu_limit)
    g = np.where(np.isinf(gate), gate, np.minimum(gate, limit))
    lin = np.where(np.isinf(up), up, np.clip(up, -limit, limit))
    with np.errstate(over="ignore"):  # exp of a large -g is inf: sigmoid 0, the exact limit
        return g / (1.0 + np.exp(-QUICK_GELU * g)) * (lin + np.float32(1.0))


def rope_inv_freq(cfg: Phi3Config, long: bool) -> np.ndarray:
    """Rotary frequencies [rope_dim/2] in radians per position, LongRoPE factors applied."""
    rd = cfg.rope_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, rd, 2, dtype=np.float64) / rd))
    if cfg.rope_scaling is not None:
        factors = cfg.rope_scaling.long_factor if long else cfg.rope_scaling.short_factor
        inv = inv / np.asarray(factors, dtype=np.float64)
    return inv.astype(np.float32)


def rope_cos_sin(cfg: Phi3Config, positions: np.ndarray, long: bool) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [T, rope_dim/2] for the given positions, scaled by LongRoPE's attention factor."""
    angles = positions.astype(np.float32)[:, None] * rope_inv_freq(cfg, long)[None, :]
    scale = np.float32(cfg.rope_scaling.scale(long) if cfg.rope_scaling else 1.0)
    return np.cos(angles) * scale, np.sin(angles) * scale


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """NEOX-style rotation of x [heads, T, hd]: within the first rope_dim = 2 * cos.shape[-1] values
    the halves (x1, x2) rotate as a complex pair; the rest of each head passes (partial RoPE)."""
    half = cos.shape[-1]
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)


def uses_long_factors(cfg: Phi3Config, seq_len: int) -> bool:
    """Hugging Face's rule: long factors once the sequence (max position + 1) passes the original context."""
    return cfg.rope_scaling is not None and seq_len > cfg.original_max_position_embeddings
