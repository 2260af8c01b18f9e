"""A torch `Phi3SmallForCausalLM` for training, saved as Microsoft ships Phi-3-small.

Parameters carry Hugging Face's names; while training, the fused rows are planar (qkv rows
[q | k | v], up_proj rows [gelu inputs | linear inputs]: contiguous slices, cheaper than strided
ones). `hf_state_dict` writes them in Microsoft's layout (../shared/PHI3_SMALL.md sections 1-4):
`query_key_value` rows head-major (KV group g = [q heads gG..gG+G-1 | k g | v g], head_dim rows
each, G query heads per KV head), `up_proj` rows interleaved (row 2k: GeGELU input of unit k, row
2k+1: its linear input), a bias on every linear and LayerNorm, no lm_head (the output is the
embedding). `config_json` writes config.json with Microsoft's field names, so the folder loads
through pocketlm's checkpoint reader like a real Phi-3-small.

The forward pass, for whole sequences from position 0 (training and the trainer's evaluation):

  h = embed(ids) * mup_embedding_multiplier                                 # [B, T, D]
  per layer:  h += dense(attn(rope(qkv(LayerNorm(h)))))   softmax scale mup_attn_multiplier / head_dim
              h += down(gegelu(up(LayerNorm(h))))          GeGELU with limit L
  logits = LayerNorm(h) @ embed.T / mup_width_multiplier, dummy ids at -inf  # [B, T, V]

Block-sparse layers (every layer but each dense_every_n-th) use the pattern of
`pocketlm.blocksparse` as a dense [H, T, T] boolean mask, which is exact and cheap at 512 tokens.
tests/torch_phi3small.py is the independent oracle the shipped model is tested against; this file
only trains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

REPO = Path(__file__).resolve().parents[1]
from pocketlm.blocksparse import BlockSparse, token_mask  # noqa: E402


@dataclass(frozen=True)
class SmallShape:
    """The trained model's hyperparameters (config.json fields in parentheses)."""

    vocab: int                      # (vocab_size) ranks + 96 special ids, padded to 64
    hidden: int = 256               # (hidden_size) a multiple of 256: Q4_K super-blocks
    layers: int = 4                 # (num_hidden_layers)
    heads: int = 8                  # (num_attention_heads) head_dim 32
    kv_heads: int = 2               # (num_key_value_heads) 4 query heads per KV head, as Phi-3-small
    ff: int = 768                   # (ff_intermediate_size) a multiple of 256
    max_pos: int = 4096             # (max_position_embeddings)
    rope_base: float = 10000.0      # (rope_embedding_base) 1e6 in Phi-3-small's 8k context
    eps: float = 1e-5               # (layer_norm_epsilon)
    gegelu_limit: float = 20.0
    mup_embedding: float = 10.0
    mup_width: float = 8.0
    mup_attn: float = 1.0
    block_size: int = 16            # (blocksparse_block_size) Phi-3-small: 64
    local_blocks: int = 4           # (blocksparse_num_local_blocks) 16
    vert_stride: int = 4            # (blocksparse_vert_stride) 8
    dense_every_n: int = 2          # (dense_attention_every_n_layers)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    @property
    def pattern(self) -> BlockSparse:
        return BlockSparse(self.block_size, self.local_blocks, self.vert_stride, homo_head=False)

    def is_dense(self, layer: int) -> bool:
        return (layer + 1) % self.dense_every_n == 0


def config_json(shape: SmallShape, bos: int, end: int, dummy_ids: list[int]) -> dict:
    """config.json in the field names and style of microsoft/Phi-3-small-8k-instruct."""
    return {
        "_name_or_path": "pocketlm-builtin-small",
        "architectures": ["Phi3SmallForCausalLM"],
        "attention_bias": False,  # as Microsoft's file says, although every linear has a bias
        "attention_dropout_prob": 0.0,
        "auto_map": {"AutoConfig": "configuration_phi3_small.Phi3SmallConfig",
                     "AutoModelForCausalLM": "modeling_phi3_small.Phi3SmallForCausalLM",
                     "AutoTokenizer": "tokenization_phi3_small.Phi3SmallTokenizer"},
        "blocksparse_block_size": shape.block_size,
        "blocksparse_homo_head_pattern": False,
        "blocksparse_num_local_blocks": shape.local_blocks,
        "blocksparse_triton_kernel_block_size": shape.block_size,
        "blocksparse_vert_stride": shape.vert_stride,
        "bos_token_id": bos,
        "dense_attention_every_n_layers": shape.dense_every_n,
        # Phi3SmallConfig derives this from the tokenizer; re-saved configs carry it as a list.
        "dummy_token_indices": dummy_ids,
        "embedding_dropout_prob": 0.0,
        "eos_token_id": bos,
        "ff_dim_multiplier": None,
        "ff_intermediate_size": shape.ff,
        "ffn_dropout_prob": 0.0,
        "gegelu_limit": shape.gegelu_limit,
        "gegelu_pad_to_256": True,
        "hidden_act": "gegelu",
        "hidden_size": shape.hidden,
        "initializer_range": 0.02,
        "layer_norm_epsilon": shape.eps,
        "max_position_embeddings": shape.max_pos,
        "model_type": "phi3small",
        "mup_attn_multiplier": shape.mup_attn,
        "mup_embedding_multiplier": shape.mup_embedding,
        "mup_use_scaling": True,
        "mup_width_multiplier": shape.mup_width,
        "num_attention_heads": shape.heads,
        "num_hidden_layers": shape.layers,
        "num_key_value_heads": shape.kv_heads,
        "pad_sequence_to_multiple_of_64": True,
        "reorder_and_upcast_attn": False,
        "rope_embedding_base": shape.rope_base,
        "rope_position_scale": 1.0,
        "rope_scaling": None,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.38.1",
        "use_cache": True,
        "vocab_size": shape.vocab,
    }


class _Attention(nn.Module):
    def __init__(self, s: SmallShape):
        super().__init__()
        self.query_key_value = nn.Linear(s.hidden, (s.heads + 2 * s.kv_heads) * s.head_dim)
        self.dense = nn.Linear(s.heads * s.head_dim, s.hidden)


class _MLP(nn.Module):
    def __init__(self, s: SmallShape):
        super().__init__()
        self.up_proj = nn.Linear(s.hidden, 2 * s.ff)  # rows [gelu inputs | linear inputs] while training
        self.down_proj = nn.Linear(s.ff, s.hidden)


class _Layer(nn.Module):
    def __init__(self, s: SmallShape):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(s.hidden, eps=s.eps)
        self.self_attn = _Attention(s)
        self.post_attention_layernorm = nn.LayerNorm(s.hidden, eps=s.eps)
        self.mlp = _MLP(s)


class _Body(nn.Module):
    def __init__(self, s: SmallShape):
        super().__init__()
        self.embed_tokens = nn.Embedding(s.vocab, s.hidden)
        self.layers = nn.ModuleList(_Layer(s) for _ in range(s.layers))
        self.final_layernorm = nn.LayerNorm(s.hidden, eps=s.eps)


class Phi3SmallLM(nn.Module):
    """Parameters under Microsoft's names (`model.layers.0.self_attn.query_key_value.weight`, ...)."""

    def __init__(self, shape: SmallShape, dummy_ids: list[int], init_std: float = 0.02,
                 embed_std: float = 0.02):
        super().__init__()
        self.shape = shape
        self.model = _Body(shape)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif "layernorm" in name:
                nn.init.ones_(p)
            elif "embed_tokens" in name:
                nn.init.normal_(p, std=embed_std)
            else:
                # GPT-2's residual scaling: the projections into the stream shrink with depth
                depth = math.sqrt(2 * shape.layers) if name.endswith(("dense.weight", "down_proj.weight")) else 1
                nn.init.normal_(p, std=init_std / depth)
        mask = torch.zeros(shape.vocab)
        mask[dummy_ids] = float("-inf")
        self.register_buffer("logit_mask", mask, persistent=False)  # [V]: 0 or -inf (dummy ids)
        self._masks: dict[int, torch.Tensor] = {}

    def sparse_mask(self, t: int) -> torch.Tensor:
        """Bool [H, T, T]: block pattern AND causal, for positions 0..t-1 (cached per length)."""
        if t not in self._masks:
            m = token_mask(self.shape.pattern, self.shape.heads, np.arange(t), t)
            self._masks[t] = torch.from_numpy(m)
        return self._masks[t]

    def rope(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, head_dim] for positions 0..t-1 (NeoX halves: dimension i pairs with i + hd/2)."""
        hd = self.shape.head_dim
        inv = 1.0 / self.shape.rope_base ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        ang = torch.arange(t, dtype=torch.float64)[:, None] * inv[None, :]
        emb = torch.cat([ang, ang], dim=-1)
        return emb.cos().float(), emb.sin().float()

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin

    def forward(self, ids: torch.Tensor, dense: bool = False) -> torch.Tensor:
        """ids [B, T] (positions 0..T-1) -> logits [B, T, V]. dense=True: every layer dense causal."""
        s = self.shape
        b, t = ids.shape
        cos, sin = self.rope(t)
        h = self.model.embed_tokens(ids) * s.mup_embedding                       # [B, T, D]
        for i, layer in enumerate(self.model.layers):
            x = layer.input_layernorm(h)
            qkv = layer.self_attn.query_key_value(x)                                  # [B, T, (H+2KV) hd]
            q = qkv[..., : s.heads * s.head_dim].view(b, t, s.heads, s.head_dim).transpose(1, 2)  # [B, H, T, hd]
            k, v = (qkv[..., (s.heads + j * s.kv_heads) * s.head_dim:(s.heads + (j + 1) * s.kv_heads) * s.head_dim]
                    .view(b, t, s.kv_heads, s.head_dim).transpose(1, 2) for j in (0, 1))  # [B, KV, T, hd]
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
            k = k.repeat_interleave(s.group, dim=1)       # query head h reads KV head h // group
            v = v.repeat_interleave(s.group, dim=1)
            scale = s.mup_attn / s.head_dim
            if dense or s.is_dense(i):
                a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
            else:
                a = F.scaled_dot_product_attention(q, k, v, attn_mask=self.sparse_mask(t)[None], scale=scale)
            h = h + layer.self_attn.dense(a.transpose(1, 2).reshape(b, t, s.hidden))
            u = layer.mlp.up_proj(layer.post_attention_layernorm(h))                  # [B, T, 2F]
            g = torch.clamp(u[..., : s.ff], max=s.gegelu_limit)
            lin = torch.clamp(u[..., s.ff :], min=-s.gegelu_limit, max=s.gegelu_limit)
            h = h + layer.mlp.down_proj(g * torch.sigmoid(1.702 * g) * (lin + 1.0))
        x = self.model.final_layernorm(h)
        logits = (x @ self.model.embed_tokens.weight.T) / s.mup_width
        return logits + self.logit_mask

    def hf_state_dict(self, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
        """The checkpoint's tensors: HF names, Microsoft's row layouts, `dtype`, no lm_head."""
        s = self.shape
        hd, g = s.head_dim, s.group
        # head-major qkv: group j = [q heads jG..jG+G-1, k head j, v head j], each head_dim rows
        q_rows = torch.arange(s.heads * hd).view(s.kv_heads, g, hd)
        k_rows = s.heads * hd + torch.arange(s.kv_heads * hd).view(s.kv_heads, 1, hd)
        v_rows = k_rows + s.kv_heads * hd
        qkv_order = torch.cat([q_rows, k_rows, v_rows], dim=1).reshape(-1)
        # interleaved up_proj: gelu input k at row 2k, linear input k at row 2k + 1
        up_order = torch.stack([torch.arange(s.ff), s.ff + torch.arange(s.ff)], dim=1).reshape(-1)
        out = {}
        for name, t in self.state_dict().items():
            if ".query_key_value." in name:
                t = t[qkv_order]
            elif ".up_proj." in name:
                t = t[up_order]
            out[name] = t.detach().to(dtype).contiguous()
        return out
