"""The golden Phi-3 forward pass: numpy, float32, with a KV cache.

Quantization quality is measured against it and calibration activations run through it; the
runtime's kernel path is checked against it on dequantized weights. It follows Hugging Face's
Phi3ForCausalLM step by step (the oracle in tests/test_reference.py):

  h = embed(tokens)                                   # [T, D]
  per layer:  h += o_proj(attn(rope(qkv(norm(h)))))   # fused qkv rows: [q | k | v]
              h += down(silu(gate) * up)              # fused gate_up rows: [gate | up]
  logits = lm_head(norm(h))                           # [T, V]

Weights come as a mapping GGUF name -> float32 array ([out, in] for linear layers).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .config import Phi3Config
from .errors import PocketLMError

# Called with (GGUF weight name, the input that linear layer sees [T, in]); the quantizer's
# calibration uses it to collect activation statistics.
LinearTap = Callable[[str, np.ndarray], None]


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x [T, D] -> x / sqrt(mean(x^2) + eps) * weight."""
    var = np.mean(x * x, axis=-1, keepdims=True)
    return (x / np.sqrt(var + eps)) * weight


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def rope_inv_freq(cfg: Phi3Config, long: bool) -> np.ndarray:
    """Rotary frequencies [head_dim/2] in radians per position, LongRoPE factors applied."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    if cfg.rope_scaling is not None:
        factors = cfg.rope_scaling.long_factor if long else cfg.rope_scaling.short_factor
        inv = inv / np.asarray(factors, dtype=np.float64)
    return inv.astype(np.float32)


def rope_cos_sin(cfg: Phi3Config, positions: np.ndarray, long: bool) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [T, head_dim/2] for the given positions, scaled by LongRoPE's attention factor."""
    angles = positions.astype(np.float32)[:, None] * rope_inv_freq(cfg, long)[None, :]
    scale = np.float32(cfg.rope_scaling.attention_factor if cfg.rope_scaling else 1.0)
    return np.cos(angles) * scale, np.sin(angles) * scale


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """NEOX-style rotation of x [heads, T, hd]: the halves (x1, x2) rotate as a complex pair."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def uses_long_factors(cfg: Phi3Config, seq_len: int) -> bool:
    """Hugging Face's rule: long factors once the sequence (max position + 1) passes the original context."""
    return cfg.rope_scaling is not None and seq_len > cfg.original_max_position_embeddings


@dataclass
class KVCache:
    """Per-layer keys and values [kv_heads, positions, head_dim], grown as tokens arrive."""

    keys: list[np.ndarray] = field(default_factory=list)
    values: list[np.ndarray] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.keys[0].shape[1] if self.keys else 0

    def append(self, layer: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if layer == len(self.keys):
            self.keys.append(k)
            self.values.append(v)
        else:
            self.keys[layer] = np.concatenate([self.keys[layer], k], axis=1)
            self.values[layer] = np.concatenate([self.values[layer], v], axis=1)
        return self.keys[layer], self.values[layer]


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: np.ndarray,
              window: int | None) -> np.ndarray:
    """Causal (optionally sliding-window) grouped-query attention.

    q [H, T, hd], k/v [KV, S, hd] holding positions 0..S-1, q_pos [T] -> [H, T, hd].
    A query at position p sees keys at positions p - window < j <= p.
    """
    n_heads, _, hd = q.shape
    group = n_heads // k.shape[0]
    k = np.repeat(k, group, axis=0)  # [H, S, hd]
    v = np.repeat(v, group, axis=0)
    scores = (q @ k.transpose(0, 2, 1)) / np.float32(np.sqrt(hd))  # [H, T, S]
    k_pos = np.arange(k.shape[1])
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        allowed &= k_pos[None, :] > q_pos[:, None] - window
    scores = np.where(allowed[None], scores, -np.inf)
    scores = scores - scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(axis=-1, keepdims=True)
    return p @ v


class Phi3Reference:
    """Phi3ForCausalLM in numpy float32."""

    def __init__(self, cfg: Phi3Config, weights: Mapping[str, np.ndarray]):
        self.cfg = cfg
        self.w = weights

    @classmethod
    def from_checkpoint(cls, ckpt) -> Phi3Reference:
        """All weights converted to float32 once (fine for small models; big ones stream layers)."""
        return cls(ckpt.config, {name: ckpt.tensor(name) for name in ckpt.names()})

    def new_cache(self) -> KVCache:
        return KVCache()

    # ------------------------------------------------------------------ pieces

    def embed(self, tokens: Sequence[int]) -> np.ndarray:
        ids = np.asarray(tokens, dtype=np.int64)
        if ids.ndim != 1 or ids.size == 0:
            raise PocketLMError("expected a non-empty 1-D sequence of token ids")
        if ids.min() < 0 or ids.max() >= self.cfg.vocab_size:
            raise PocketLMError(f"token id out of range [0, {self.cfg.vocab_size})")
        return np.asarray(self.w["token_embd.weight"][ids], dtype=np.float32)  # [T, D]

    def layer(self, i: int, h: np.ndarray, positions: np.ndarray, cache: KVCache,
              long_rope: bool, tap: LinearTap | None = None) -> np.ndarray:
        """One decoder layer: h [T, D] -> [T, D]; appends this layer's keys/values to the cache."""
        cfg, w = self.cfg, self.w
        p = f"blk.{i}."
        n_h, n_kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        t = h.shape[0]

        x = rms_norm(h, w[p + "attn_norm.weight"], cfg.rms_norm_eps)
        qkv = _linear(x, w[p + "attn_qkv.weight"], p + "attn_qkv.weight", tap)  # [T, (H+2KV)*hd]
        q = qkv[:, : n_h * hd].reshape(t, n_h, hd).transpose(1, 0, 2)           # [H, T, hd]
        k = qkv[:, n_h * hd : (n_h + n_kv) * hd].reshape(t, n_kv, hd).transpose(1, 0, 2)
        v = qkv[:, (n_h + n_kv) * hd :].reshape(t, n_kv, hd).transpose(1, 0, 2)
        cos, sin = rope_cos_sin(cfg, positions, long_rope)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_all, v_all = cache.append(i, k, v)
        a = attention(q, k_all, v_all, positions, cfg.sliding_window)           # [H, T, hd]
        a = a.transpose(1, 0, 2).reshape(t, n_h * hd)
        h = h + _linear(a, w[p + "attn_output.weight"], p + "attn_output.weight", tap)

        x = rms_norm(h, w[p + "ffn_norm.weight"], cfg.rms_norm_eps)
        gate_up = _linear(x, w[p + "ffn_up.weight"], p + "ffn_up.weight", tap)  # [T, 2F]
        f = cfg.intermediate_size
        act = silu(gate_up[:, :f]) * gate_up[:, f:]
        return h + _linear(act, w[p + "ffn_down.weight"], p + "ffn_down.weight", tap)

    def head(self, h: np.ndarray, tap: LinearTap | None = None) -> np.ndarray:
        """Final norm and lm_head: h [T, D] -> logits [T, V]."""
        x = rms_norm(h, self.w["output_norm.weight"], self.cfg.rms_norm_eps)
        name = "token_embd.weight" if self.cfg.tie_word_embeddings else "output.weight"
        return _linear(x, self.w[name], name, tap)

    # ------------------------------------------------------------------ whole model

    def forward(self, tokens: Sequence[int], cache: KVCache | None = None,
                tap: LinearTap | None = None) -> np.ndarray:
        """Logits [T, V] for `tokens` following whatever the cache already holds."""
        cache = cache if cache is not None else self.new_cache()
        start = cache.length
        h = self.embed(tokens)
        end = start + h.shape[0]
        if end > self.cfg.max_position_embeddings:
            raise PocketLMError(f"sequence of {end} tokens exceeds the context length "
                                f"{self.cfg.max_position_embeddings}")
        positions = np.arange(start, end)
        long_rope = uses_long_factors(self.cfg, end)
        for i in range(self.cfg.num_hidden_layers):
            h = self.layer(i, h, positions, cache, long_rope, tap)
        return self.head(h, tap)


def _linear(x: np.ndarray, weight: np.ndarray, name: str, tap: LinearTap | None) -> np.ndarray:
    """x [T, in] @ weight[out, in].T -> [T, out]."""
    if tap is not None:
        tap(name, x)
    return x @ weight.T
