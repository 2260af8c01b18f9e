"""The golden forward pass of the Phi-3 family: numpy, float32, with a KV cache.

Quantization quality is measured against it and calibration activations run through it; the
runtime's C forward is checked against it. One path serves Phi3ForCausalLM and
Phi3SmallForCausalLM: what differs is data in the model description (config.py):

  h = embed(tokens) * embedding_multiplier                                  # [T, D]
  per layer:  h += o(attention_i(rope(qkv(norm(h)))))     qkv rows [q | k | v], + biases if any
              h += down(act(gate_up(norm(h))))             act: swiglu | gegelu on [gate | up]
  logits = lm_head(norm(h)) * logit_scale, masked ids -> float32 min       # [T, V]

attention_i is causal softmax(q.k * attention_scale) over the keys layer i sees: all earlier
positions, a sliding window, or Phi-3-small's block-sparse pattern (blocksparse.py).
Tests: tests/test_reference.py (transformers' Phi3ForCausalLM), tests/test_phi3small_model.py (a
torch model written from the Phi-3-small facts). Weights: GGUF name -> float32 array.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from .blocksparse import BlockSparse, token_mask
from .config import Phi3Config
from .errors import PocketLMError
from .kv_cache import KVCache
from .layers import apply_rope, gated_activation, norm, rope_cos_sin, uses_long_factors

# Called with (GGUF weight name, the input that linear layer sees [T, in]); the quantizer's
# calibration uses it to collect activation statistics.
LinearTap = Callable[[str, np.ndarray], None]

# (GGUF weight name, x [T, in], weight [out, in]) -> x @ weight.T [T, out] float32: how the linears
# multiply (default numpy float32; the quantizer's calibration passes a bfloat16 one).
Matmul = Callable[[str, np.ndarray, np.ndarray], np.ndarray]

# The logit of a masked (dummy) token: float32's lowest finite value, as Hugging Face's
# masked_fill(min_value_of_dtype) gives; finite, so softmax and log-softmax stay finite.
MASKED_LOGIT = np.finfo(np.float32).min


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: np.ndarray, scale: float,
              window: int | None = None, sparse: BlockSparse | None = None) -> np.ndarray:
    """Causal grouped-query attention, optionally within a sliding window or a block-sparse pattern.

    q [H, T, hd], k/v [KV, S, hd] holding positions 0..S-1, q_pos [T] -> [H, T, hd].
    A query at position p sees keys j <= p; with `window`, only p - window < j; with `sparse`,
    only the blocks its head sees.
    """
    n_heads = q.shape[0]
    group = n_heads // k.shape[0]
    k = np.repeat(k, group, axis=0)                                   # [H, S, hd]: head h reads kv h // group
    v = np.repeat(v, group, axis=0)
    scores = (q @ k.transpose(0, 2, 1)) * np.float32(scale)         # [H, T, S]
    k_pos = np.arange(k.shape[1])
    if sparse is not None:
        allowed = token_mask(sparse, n_heads, q_pos, k.shape[1])      # [H, T, S]
    else:
        allowed = (k_pos[None, :] <= q_pos[:, None])[None]            # [1, T, S]
        if window is not None:
            allowed = allowed & (k_pos[None, :] > q_pos[:, None] - window)
    scores = np.where(allowed, scores, -np.inf)
    scores = scores - scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(axis=-1, keepdims=True)
    return p @ v


class Phi3Reference:
    """Phi3ForCausalLM / Phi3SmallForCausalLM in numpy float32."""

    def __init__(self, cfg: Phi3Config, weights: Mapping[str, np.ndarray], matmul: Matmul | None = None):
        self.cfg = cfg
        self.w = weights
        self.matmul = matmul

    @classmethod
    def from_checkpoint(cls, ckpt) -> Phi3Reference:
        """All weights converted to float32 once (fine for small models; big ones stream layers)."""
        return cls(ckpt.config, {name: ckpt.tensor(name) for name in ckpt.names()})

    def new_cache(self, capacity: int | None = None) -> KVCache:
        """A float32 cache for `capacity` positions (default: the model's context, at most 4096)."""
        cfg = self.cfg
        n = capacity or min(cfg.max_position_embeddings, 4096)
        return KVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, n, cfg.head_dim, "f32")

    # ------------------------------------------------------------------ pieces

    def embed(self, tokens: Sequence[int]) -> np.ndarray:
        ids = np.asarray(tokens, dtype=np.int64)
        if ids.ndim != 1 or ids.size == 0:
            raise PocketLMError("expected a non-empty 1-D sequence of token ids")
        if ids.min() < 0 or ids.max() >= self.cfg.vocab_size:
            raise PocketLMError(f"token id out of range [0, {self.cfg.vocab_size})")
        h = np.asarray(self.w["token_embd.weight"][ids], dtype=np.float32)  # [T, D]
        if self.cfg.embedding_multiplier != 1.0:
            h = h * np.float32(self.cfg.embedding_multiplier)
        return h

    def _norm(self, name: str, x: np.ndarray) -> np.ndarray:
        return norm(self.cfg, x, self.w[f"{name}.weight"], self.w.get(f"{name}.bias"))

    def _linear(self, name: str, x: np.ndarray, tap: LinearTap | None) -> np.ndarray:
        """x [T, in] @ weight[out, in].T (+ bias) -> [T, out]."""
        if tap is not None:
            tap(f"{name}.weight", x)
        w = self.w[f"{name}.weight"]
        y = x @ w.T if self.matmul is None else self.matmul(f"{name}.weight", x, w)
        bias = self.w.get(f"{name}.bias")
        return y if bias is None else y + bias

    def layer(self, i: int, h: np.ndarray, positions: np.ndarray, cache: KVCache | None,
              long_rope: bool, tap: LinearTap | None = None) -> np.ndarray:
        """One decoder layer: h [T, D] -> [T, D]; writes this layer's keys/values to the cache at
        positions[0] (cache None: h is a whole sequence from position 0, attending to itself)."""
        return self.ffn_block(i, self.attention_block(i, h, positions, cache, long_rope, tap), tap)

    def attention_block(self, i: int, h: np.ndarray, positions: np.ndarray, cache: KVCache | None,
                        long_rope: bool, tap: LinearTap | None = None) -> np.ndarray:
        """The layer's first residual half: h + attn_output(attention(qkv(norm(h)))) [T, D]
        (the quantizer's calibration resumes a layer between its halves)."""
        a = self.attention_mix(i, h, positions, cache, long_rope, tap)
        return self.residual(f"blk.{i}.attn_output", h, a, tap)

    def attention_mix(self, i: int, h: np.ndarray, positions: np.ndarray, cache: KVCache | None,
                      long_rope: bool, tap: LinearTap | None = None) -> np.ndarray:
        """attention(qkv(norm(h))) [T, H*hd]: the first half up to attn_output's input."""
        cfg = self.cfg
        p = f"blk.{i}."
        n_h, n_kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        t = h.shape[0]

        qkv = self._linear(p + "attn_qkv", self._norm(p + "attn_norm", h), tap)  # [T, (H+2KV)*hd]
        q = qkv[:, : n_h * hd].reshape(t, n_h, hd).transpose(1, 0, 2)           # [H, T, hd]
        k = qkv[:, n_h * hd : (n_h + n_kv) * hd].reshape(t, n_kv, hd).transpose(1, 0, 2)
        v = qkv[:, (n_h + n_kv) * hd :].reshape(t, n_kv, hd).transpose(1, 0, 2)
        cos, sin = rope_cos_sin(cfg, positions, long_rope)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_all, v_all = (k, v) if cache is None else self._cached(cache, i, positions, k, v)
        a = attention(q, k_all, v_all, positions, cfg.attention_scale, cfg.sliding_window,
                      cfg.layer_sparsity(i))                                    # [H, T, hd]
        return a.transpose(1, 0, 2).reshape(t, n_h * hd)

    def residual(self, name: str, h: np.ndarray, x: np.ndarray, tap: LinearTap | None = None) -> np.ndarray:
        """h [T, D] + linear `name` (a half's last, attn_output or ffn_down) of x [T, in]."""
        return h + self._linear(name, x, tap)

    @staticmethod
    def _cached(cache: KVCache, i: int, positions: np.ndarray, k: np.ndarray, v: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
        """Write k, v [KV, T, hd] at positions[0].. and read back every position up to the last."""
        cache.write(i, int(positions[0]), k, v)
        return cache.read(i, int(positions[-1]) + 1)

    def ffn_block(self, i: int, h: np.ndarray, tap: LinearTap | None = None) -> np.ndarray:
        """The layer's second residual half: h + ffn_down(act(ffn_up(norm(h)))) [T, D]."""
        return self.residual(f"blk.{i}.ffn_down", h, self.ffn_mix(i, h, tap), tap)

    def ffn_mix(self, i: int, h: np.ndarray, tap: LinearTap | None = None) -> np.ndarray:
        """act(ffn_up(norm(h))) [T, F]: the second half up to ffn_down's input."""
        p = f"blk.{i}."
        gate_up = self._linear(p + "ffn_up", self._norm(p + "ffn_norm", h), tap)  # [T, 2F]
        return gated_activation(self.cfg, gate_up)

    def head(self, h: np.ndarray, tap: LinearTap | None = None) -> np.ndarray:
        """Final norm and lm_head: h [T, D] -> logits [T, V] (scaled, masked ids at MASKED_LOGIT)."""
        cfg = self.cfg
        x = self._norm("output_norm", h)
        name = "output" if "output.weight" in self.w else "token_embd"
        logits = self._linear(name, x, tap)
        if cfg.logit_scale != 1.0:
            logits = logits * np.float32(cfg.logit_scale)
        if cfg.masked_token_ids:
            logits[:, list(cfg.masked_token_ids)] = MASKED_LOGIT
        return logits

    # ------------------------------------------------------------------ whole model

    def forward(self, tokens: Sequence[int], cache: KVCache | None = None,
                tap: LinearTap | None = None) -> np.ndarray:
        """Logits [T, V] for `tokens` following whatever the cache already holds."""
        cache = cache if cache is not None else self.new_cache(capacity=len(tokens))
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
        cache.length = end
        return self.head(h, tap)
