"""An independent CPU oracle of Phi-3-small's forward pass (`Phi3SmallForCausalLM`), in torch.

Written from the project's Phi-3-small notes (PHI3_SMALL.md) sections 2-4 alone (Microsoft's own
code runs only on CUDA), and deliberately simple: one dense (H, T, S) masked softmax per layer, the
block-sparse pattern applied as a boolean mask (block mask expanded to tokens AND causal). It reads
the HF folder straight from its safetensors files under HF names, computes in float64 by default,
and runs either a whole sequence or incrementally through a KV cache (keys are cached after RoPE, so
a cached key keeps the rotation it was given when it was computed, as in HF's LongRoPE).

Dummy ids are set to float32 min (-3.4028235e38), as HF's `masked_fill(min_value_of_dtype)` on its
float32 logits does (vLLM and mlx use -inf instead).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

FLOAT32_MIN = float(torch.finfo(torch.float32).min)  # -3.4028234663852886e38
# The real model's 91 dummy ids (PHI3_SMALL.md section 5), used only when config.json has no list.
REAL_DUMMY_IDS = [100256, 100258, 100259, 100260, 100264, 100265, *range(100267, 100352)]


# ----------------------------------------------------------------------------------- block pattern

def head_sliding_step(vert_stride: int, num_heads: int, homo_head: bool) -> int:
    """vLLM/HF `get_head_sliding_step`: 0 for the homo pattern, else max(1, int(vert_stride / heads))."""
    return 0 if homo_head else max(1, int(vert_stride / num_heads))


def block_mask(n_blocks: int, num_heads: int, local_blocks: int, vert_stride: int,
               homo_head: bool) -> torch.Tensor:
    """Bool [H, n_blocks, n_blocks]: query block i of head h sees key block j iff
    j <= i and (i - j < local_blocks or (j + h * step + 1) % vert_stride == 0)  (PHI3_SMALL.md 4.1)."""
    step = head_sliding_step(vert_stride, num_heads, homo_head)
    i = torch.arange(n_blocks)[None, :, None]  # query block
    j = torch.arange(n_blocks)[None, None, :]  # key block
    h = torch.arange(num_heads)[:, None, None]  # global query head
    return (j <= i) & ((i - j < local_blocks) | ((j + h * step + 1) % vert_stride == 0))


# ----------------------------------------------------------------------------------- config

@dataclass
class Phi3SmallSpec:
    """The config.json fields the forward pass reads (Microsoft's names, section 1)."""
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ff: int
    vocab: int
    eps: float
    gegelu_limit: float
    block_size: int
    local_blocks: int
    vert_stride: int
    homo_head: bool
    dense_every_n: int
    rope_base: float
    rope_position_scale: float
    mup_embedding_multiplier: float
    mup_width_multiplier: float
    mup_attn_multiplier: float
    mup_use_scaling: bool
    max_pos: int
    dummy_ids: list[int]
    tie: bool
    # LongRoPE (128k) only:
    original_max: int | None = None
    short_factor: list[float] | None = None
    long_factor: list[float] | None = None
    short_mscale: float = 1.0
    long_mscale: float = 1.0
    raw: dict = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.heads // self.kv_heads

    def is_dense(self, layer: int) -> bool:
        """Section 4.3: layer i (0-based) is dense iff (i + 1) % dense_attention_every_n_layers == 0."""
        return (layer + 1) % self.dense_every_n == 0

    @property
    def attn_scale(self) -> float:
        """mup_attn_multiplier / head_dim with mup_use_scaling (1/128 on the real model), else 1/sqrt(hd)."""
        if self.mup_use_scaling:
            return self.mup_attn_multiplier / self.head_dim
        return 1.0 / math.sqrt(self.head_dim)

    @classmethod
    def from_config(cls, raw: dict) -> Phi3SmallSpec:
        vocab = raw["vocab_size"]
        dummy = raw.get("dummy_token_indices")
        if dummy is None:
            dummy = REAL_DUMMY_IDS if vocab == 100352 else []
        spec = cls(
            hidden=raw["hidden_size"], layers=raw["num_hidden_layers"], heads=raw["num_attention_heads"],
            kv_heads=raw["num_key_value_heads"], ff=raw["ff_intermediate_size"], vocab=vocab,
            eps=raw["layer_norm_epsilon"], gegelu_limit=raw["gegelu_limit"],
            block_size=raw["blocksparse_block_size"], local_blocks=raw["blocksparse_num_local_blocks"],
            vert_stride=raw["blocksparse_vert_stride"], homo_head=raw["blocksparse_homo_head_pattern"],
            dense_every_n=raw["dense_attention_every_n_layers"], rope_base=raw["rope_embedding_base"],
            rope_position_scale=raw.get("rope_position_scale", 1.0),
            mup_embedding_multiplier=raw["mup_embedding_multiplier"],
            mup_width_multiplier=raw["mup_width_multiplier"], mup_attn_multiplier=raw["mup_attn_multiplier"],
            mup_use_scaling=raw["mup_use_scaling"], max_pos=raw["max_position_embeddings"],
            dummy_ids=list(dummy), tie=raw.get("tie_word_embeddings", True), raw=raw)
        rs = raw.get("rope_scaling")
        if rs:
            spec.original_max = rs.get("original_max_position_embeddings", raw.get("original_max_position_embeddings"))
            spec.short_factor = list(rs["short_factor"])
            spec.long_factor = list(rs["long_factor"])
            # HF positional_embedding.py: a missing or <= 0 mscale takes the default.
            short, long_ = rs.get("short_mscale", 0) or 0, rs.get("long_mscale", 0) or 0
            spec.short_mscale = short if short > 0 else 1.0
            spec.long_mscale = long_ if long_ > 0 else math.sqrt(
                1 + math.log(spec.max_pos / spec.original_max) / math.log(spec.original_max))
        return spec


# ----------------------------------------------------------------------------------- oracle

@dataclass
class KVCache:
    """Per layer: keys after RoPE and values, each [kv_heads, S, head_dim]."""
    keys: list[torch.Tensor | None]
    values: list[torch.Tensor | None]
    length: int = 0


def layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """(x - mean) / sqrt(biased var + eps) * w + b over the last axis."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """NeoX rotation: [-x2, x1] for x = [x1, x2] halves of the last axis."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def gegelu(u: torch.Tensor, limit: float) -> torch.Tensor:
    """u [..., 2 ff] with interleaved columns -> [..., ff] (HF `gegelu`): gelu input = even columns,
    clamped from above only; linear input = odd columns, clamped on both sides; quick-GELU
    g * sigmoid(1.702 g) times (linear + 1). (Inf inputs are not produced by the tests.)"""
    g, lin = u[..., 0::2], u[..., 1::2]
    g = torch.clamp(g, max=limit)
    lin = torch.clamp(lin, min=-limit, max=limit)
    return g * torch.sigmoid(1.702 * g) * (lin + 1.0)


class TorchPhi3Small:
    """Phi-3-small logits [T, V] from an HF checkpoint folder.

    `forward(tokens)` runs the whole sequence from position 0; `forward(tokens, cache)` continues
    the cache (prefix first, then tokens one by one or in chunks). `force_dense=True` makes every
    layer dense causal (the model Phi-3-small would be without its block pattern)."""

    def __init__(self, folder: str | Path, dtype: torch.dtype = torch.float64, force_dense: bool = False):
        self.folder = Path(folder)
        self.spec = Phi3SmallSpec.from_config(json.loads((self.folder / "config.json").read_text()))
        self.dtype = dtype
        self.force_dense = force_dense
        self.w = {k: t.to(dtype) for k, t in self._load().items()
                  if not k.endswith("rotary_emb.inv_freq")}  # the 8k buffer is ignored
        s = self.spec
        self.out_weight = self.w["model.embed_tokens.weight"] if s.tie else self.w["lm_head.weight"]
        # Filled by forward when trace=True: per layer, the up_proj outputs u [T, 2 ff].
        self.trace: list[torch.Tensor] = []

    def _load(self) -> dict[str, torch.Tensor]:
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = ["model.safetensors"]
        tensors: dict[str, torch.Tensor] = {}
        for f in files:
            tensors.update(load_file(str(self.folder / f)))
        return tensors

    def new_cache(self) -> KVCache:
        n = self.spec.layers
        return KVCache([None] * n, [None] * n)

    # ------------------------------------------------------------------ pieces

    def rope(self, positions: torch.Tensor, total_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, head_dim] for absolute `positions` [T]; total_len = cached + new tokens of this
        call decides the LongRoPE factor set (long iff total_len > original_max; section 3.7)."""
        s, d = self.spec, self.spec.head_dim
        exponent = torch.arange(0, d, 2, dtype=torch.float64) / d  # 2i/d, i = 0..d/2-1
        pos = positions.to(torch.float64)
        if s.original_max is None:
            inv_freq = 1.0 / s.rope_base ** exponent
            pos = pos * s.rope_position_scale
            mscale = 1.0
        else:
            long_ = total_len > s.original_max
            factor = torch.tensor(s.long_factor if long_ else s.short_factor, dtype=torch.float64)
            inv_freq = 1.0 / (factor * s.rope_base ** exponent)
            mscale = s.long_mscale if long_ else s.short_mscale
        angles = pos[:, None] * inv_freq[None, :]  # [T, d/2]
        emb = torch.cat([angles, angles], dim=-1)  # [T, d]: dimension i pairs with i + d/2
        return (torch.cos(emb) * mscale).to(self.dtype), (torch.sin(emb) * mscale).to(self.dtype)

    def attention_mask(self, q_pos: torch.Tensor, k_len: int, dense: bool) -> torch.Tensor:
        """Bool [H, T, S]: key position <= query position AND (dense or block visible)."""
        s = self.spec
        k_pos = torch.arange(k_len)
        causal = k_pos[None, :] <= q_pos[:, None]  # [T, S]
        if dense:
            return causal[None].expand(s.heads, -1, -1)
        n_blocks = int(max(int(q_pos.max()) + 1, k_len) + s.block_size - 1) // s.block_size
        bm = block_mask(n_blocks, s.heads, s.local_blocks, s.vert_stride, s.homo_head)  # [H, nb, nb]
        qb, kb = q_pos // s.block_size, k_pos // s.block_size
        return bm[:, qb][:, :, kb] & causal[None]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
               dense: bool) -> torch.Tensor:
        """q [H, T, D] (rotated), k/v [KV, S, D] (all keys so far) -> [T, H*D].
        Dense masked softmax; query head h reads KV head h // group (repeat_interleave)."""
        s = self.spec
        k = k.repeat_interleave(s.group, dim=0)  # [H, S, D]
        v = v.repeat_interleave(s.group, dim=0)
        scores = (q @ k.transpose(1, 2)) * s.attn_scale  # [H, T, S]
        mask = self.attention_mask(q_pos, k.shape[1], dense)
        scores = scores.masked_fill(~mask, float("-inf"))
        p = torch.softmax(scores, dim=-1)
        out = p @ v  # [H, T, D]
        return out.transpose(0, 1).reshape(q.shape[1], s.heads * s.head_dim)

    def split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """qkv [T, (H + 2 KV) D], head-major groups -> q [H, T, D], k [KV, T, D], v [KV, T, D].
        Group g = slots 0..r-1 (query heads g*r + j), slot r (key g), slot r+1 (value g)."""
        s = self.spec
        t, r, d = qkv.shape[0], s.group, s.head_dim
        x = qkv.reshape(t, s.kv_heads, r + 2, d)
        q = x[:, :, :r].reshape(t, s.heads, d)  # head index g*r + j, in (g, j) order
        k, v = x[:, :, r], x[:, :, r + 1]  # [T, KV, D]
        return q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)

    # ------------------------------------------------------------------ forward

    def forward(self, tokens: list[int], cache: KVCache | None = None, trace: bool = False) -> torch.Tensor:
        """Logits [T, V] (self.dtype) of `tokens` placed after the cache's contents."""
        # One thread: these tensors are tiny, and torch's pool spinning against other processes on
        # a busy 2-core machine made a decode step 15x slower. Restored afterwards.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.no_grad():
                return self._forward(tokens, cache, trace)
        finally:
            torch.set_num_threads(threads)

    def _forward(self, tokens: list[int], cache: KVCache | None, trace: bool) -> torch.Tensor:
        s, w = self.spec, self.w
        cache = cache if cache is not None else self.new_cache()
        past, t = cache.length, len(tokens)
        q_pos = torch.arange(past, past + t)
        cos, sin = self.rope(q_pos, past + t)  # [T, D]
        self.trace = []

        h = w["model.embed_tokens.weight"][torch.tensor(tokens)] * s.mup_embedding_multiplier  # [T, hidden]
        for i in range(s.layers):
            p = f"model.layers.{i}"
            x = layer_norm(h, w[f"{p}.input_layernorm.weight"], w[f"{p}.input_layernorm.bias"], s.eps)
            qkv = x @ w[f"{p}.self_attn.query_key_value.weight"].T + w[f"{p}.self_attn.query_key_value.bias"]
            q, k, v = self.split_qkv(qkv)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            if cache.keys[i] is not None:
                k = torch.cat([cache.keys[i], k], dim=1)
                v = torch.cat([cache.values[i], v], dim=1)
            cache.keys[i], cache.values[i] = k, v
            dense = self.force_dense or s.is_dense(i)
            a = self.attend(q, k, v, q_pos, dense)
            h = h + a @ w[f"{p}.self_attn.dense.weight"].T + w[f"{p}.self_attn.dense.bias"]

            y = layer_norm(h, w[f"{p}.post_attention_layernorm.weight"],
                           w[f"{p}.post_attention_layernorm.bias"], s.eps)
            u = y @ w[f"{p}.mlp.up_proj.weight"].T + w[f"{p}.mlp.up_proj.bias"]  # [T, 2 ff]
            if trace:
                self.trace.append(u)
            h = h + gegelu(u, s.gegelu_limit) @ w[f"{p}.mlp.down_proj.weight"].T + w[f"{p}.mlp.down_proj.bias"]
        cache.length = past + t

        h = layer_norm(h, w["model.final_layernorm.weight"], w["model.final_layernorm.bias"], s.eps)
        logits = (h @ self.out_weight.T) / s.mup_width_multiplier  # [T, V]
        if s.dummy_ids:
            logits[:, torch.tensor(s.dummy_ids)] = FLOAT32_MIN
        return logits

    def incremental(self, tokens: list[int], prefill: int, chunk: int = 1) -> torch.Tensor:
        """Prompt of `prefill` tokens, then the rest `chunk` at a time through one cache: [T, V]."""
        cache = self.new_cache()
        outs = [self.forward(tokens[:prefill], cache)]
        for start in range(prefill, len(tokens), chunk):
            outs.append(self.forward(tokens[start:start + chunk], cache))
        return torch.cat(outs)
