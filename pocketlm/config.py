"""The model description: the Phi-3 family defined once, as data every stage reads.

Two architectures share one decoder layer, told apart by the fields of `Phi3Config`:

  field                 Phi3ForCausalLM (mini, medium, 3.5)   Phi3SmallForCausalLM (small)
  norm                  "rms"  RMSNorm(w)                      "layer"  LayerNorm(w, b)
  activation            "swiglu" silu(gate) * up               "gegelu" quick-GELU(min(g, L)) * (clip(l, -L, L) + 1)
  linear_bias           no                                     every linear has a bias
  attention per layer   dense or sliding window               block-sparse, dense every n-th layer
  attention_scale       1/sqrt(head_dim)                       mup_attn_multiplier / head_dim
  embedding_multiplier  1                                      mup_embedding_multiplier (10)
  logit_scale           1                                      1 / mup_width_multiplier (1/8)
  masked_token_ids      none                                   the tokenizer's dummy ids (-inf logits)
  output                lm_head (or tied)                      tied to the embedding

Inside pocketlm both keep one tensor layout: qkv rows [q | k | v] (query head h uses KV head
h // (H / KV)) and the gated projection's rows [gate | up] (GeGELU: [gelu input | linear input]).
Phi-3-small's checkpoint stores qkv head-major and its gated rows interleaved; `TensorSpec.layout`
says so and the checkpoint reader reorders the rows once (`checkpoint_row_order`), so the
quantizer, both exporters, the reference and the runtime read one layout.

The checkpoint reader parses Hugging Face `config.json` into a `Phi3Config`, the GGUF writer turns
it into `phi3.*` / `phi3small.*` metadata and the runtime turns that metadata back into the same
`Phi3Config`.

Weights are named by their GGUF names (`blk.3.attn_qkv.weight`) everywhere inside pocketlm;
`gguf_name` maps a Hugging Face name to ours and each `TensorSpec` carries both. Shapes are numpy shapes
([out_features, in_features] for linear layers), the same in safetensors and in GGUF
(GGUF lists its dimensions innermost first, i.e. reversed).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .blocksparse import BlockSparse
from .errors import PocketLMError, UnsupportedModelError

ARCHITECTURE = "Phi3ForCausalLM"
SMALL_ARCHITECTURE = "Phi3SmallForCausalLM"
GGUF_ARCH = "phi3"
SMALL_GGUF_ARCH = "phi3small"
GGUF_ARCHS = {ARCHITECTURE: GGUF_ARCH, SMALL_ARCHITECTURE: SMALL_GGUF_ARCH}

# Spellings of LongRoPE in published configs: Phi-3-mini-128k used "su", Phi-3.5 uses "longrope".
LONGROPE_TYPES = ("su", "longrope")


@dataclass(frozen=True)
class LongRope:
    """LongRoPE rescaling of the rotary frequencies (Phi-3-mini-128k, Phi-3.5-mini).

    `short_factor` applies while the sequence fits the original context, `long_factor` beyond it;
    each holds one divisor per rotary frequency (head_dim / 2 of them).
    """

    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    attention_factor: float  # multiplies cos and sin: sqrt(1 + ln(scale) / ln(original context))
    # Phi-3-small scales the short factors' cos/sin by its own short_mscale (1.0 by default);
    # None: attention_factor for both (Phi-3-mini, Phi-3.5)
    short_attention_factor: float | None = None

    def scale(self, long: bool) -> float:
        """The factor cos and sin are multiplied by, for the long or the short factors."""
        if long or self.short_attention_factor is None:
            return self.attention_factor
        return self.short_attention_factor


@dataclass(frozen=True)
class Phi3Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    original_max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: LongRope | None = None
    sliding_window: int | None = None  # attend to the last `sliding_window` positions only
    rotary_dim: int | None = None       # RoPE on the first rotary_dim values of each head (Phi-4-mini:
                                        # partial_rotary_factor 0.75); None: the whole head
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 32000
    pad_token_id: int | None = None
    # ---- the architecture (module docstring); the defaults are Phi3ForCausalLM's
    architecture: str = ARCHITECTURE
    norm: str = "rms"                   # "rms" | "layer"
    activation: str = "swiglu"          # "swiglu" | "gegelu"
    gegelu_limit: float = 0.0           # GeGELU's clamp L (Phi-3-small: 20)
    linear_bias: bool = False
    attention_multiplier: float | None = None  # softmax scale = this / head_dim; None: 1/sqrt(head_dim)
    embedding_multiplier: float = 1.0
    logit_scale: float = 1.0
    masked_token_ids: tuple[int, ...] = ()
    block_sparse: BlockSparse | None = None
    dense_every_n: int = 1              # with block_sparse: layer i is dense iff (i + 1) % n == 0
    extra: dict = field(default_factory=dict, compare=False)  # unrecognised keys, kept for export

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rope_dim(self) -> int:
        """Values of each head that RoPE rotates (the rest pass through)."""
        return self.rotary_dim or self.head_dim

    @property
    def gguf_arch(self) -> str:
        return GGUF_ARCHS[self.architecture]

    @property
    def attention_scale(self) -> float:
        """Multiplier of q.k in the softmax."""
        if self.attention_multiplier is None:
            return 1.0 / math.sqrt(self.head_dim)
        return self.attention_multiplier / self.head_dim

    def layer_sparsity(self, layer: int) -> BlockSparse | None:
        """The block-sparse pattern of decoder layer `layer`, or None where it attends densely
        (causal, within `sliding_window` if set)."""
        if self.block_sparse is None or (layer + 1) % self.dense_every_n == 0:
            return None
        return self.block_sparse

    @property
    def qkv_size(self) -> int:
        """Rows of the fused qkv_proj: [q (heads*hd) | k (kv_heads*hd) | v (kv_heads*hd)]."""
        return (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim

    def validate(self, source: str | None = None) -> Phi3Config:
        def bad(msg: str) -> PocketLMError:
            return PocketLMError(f"invalid Phi-3 config: {msg}", source)

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                     "original_max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise bad(f"{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise bad(f"hidden_size {self.hidden_size} is not a multiple of "
                      f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise bad(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                      f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise bad(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if not (isinstance(self.rope_dim, int) and 2 <= self.rope_dim <= self.head_dim and self.rope_dim % 2 == 0):
            raise bad(f"the rotary dimension {self.rope_dim} must be even and within head_dim {self.head_dim}")
        if not self.rms_norm_eps > 0 or not self.rope_theta > 0:
            raise bad("rms_norm_eps and rope_theta must be positive")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise bad(f"sliding_window must be positive or null, got {self.sliding_window}")
        if self.rope_scaling is not None:
            half = self.rope_dim // 2
            for which in ("short_factor", "long_factor"):
                n = len(getattr(self.rope_scaling, which))
                if n != half:
                    raise bad(f"rope_scaling.{which} has {n} values, expected rotary dimension / 2 = {half}")
        if self.architecture not in GGUF_ARCHS:
            raise bad(f"architecture {self.architecture!r} is not one of {', '.join(GGUF_ARCHS)}")
        if self.norm not in ("rms", "layer") or self.activation not in ("swiglu", "gegelu"):
            raise bad(f"norm {self.norm!r} / activation {self.activation!r} unknown")
        if self.activation == "gegelu" and not self.gegelu_limit > 0:
            raise bad(f"gegelu_limit must be positive, got {self.gegelu_limit}")
        for name in ("embedding_multiplier", "logit_scale"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise bad(f"{name} must be a positive finite number, got {value}")
        if self.attention_multiplier is not None and not (math.isfinite(self.attention_multiplier)
                                                          and self.attention_multiplier > 0):
            raise bad(f"the attention multiplier must be positive, got {self.attention_multiplier}")
        if any(not 0 <= t < self.vocab_size for t in self.masked_token_ids):
            raise bad(f"masked token ids must lie in [0, {self.vocab_size})")
        if self.block_sparse is not None:
            try:
                self.block_sparse.validate()
            except ValueError as e:
                raise bad(str(e)) from None
            if not isinstance(self.dense_every_n, int) or self.dense_every_n < 1:
                raise bad(f"dense_attention_every_n_layers must be >= 1, got {self.dense_every_n}")
            if self.sliding_window is not None:
                raise bad("a block-sparse model has no sliding window")
        return self

    # ------------------------------------------------------------------ Hugging Face config.json

    @classmethod
    def from_hf_dict(cls, raw: Mapping[str, Any], source: str | None = None) -> Phi3Config:
        """Parse a `config.json` written by transformers 4.x or 5.x; refuse other architectures."""
        if check_architecture(raw, source) == SMALL_ARCHITECTURE:
            return _from_hf_small(dict(raw), source)
        d = dict(raw)
        try:
            heads = int(d["num_attention_heads"])
            hidden = int(d["hidden_size"])
            max_pos = int(d["max_position_embeddings"])
        except KeyError as e:
            raise PocketLMError(f"config is missing {e.args[0]!r}", source) from None
        # transformers 5 nests rope settings in `rope_parameters`; 4.x has `rope_theta`/`rope_scaling`.
        rope_params = d.get("rope_parameters") or {}
        scaling = d.get("rope_scaling") or None
        if scaling is None and rope_params.get("rope_type", "default") != "default":
            scaling = rope_params
        rope_theta = float(d.get("rope_theta", rope_params.get("rope_theta", 10000.0)))
        orig = int(d.get("original_max_position_embeddings")
                   or rope_params.get("original_max_position_embeddings")
                   or (scaling or {}).get("original_max_position_embeddings")
                   or max_pos)
        # Phi-4-mini: RoPE on the first head_dim * partial_rotary_factor values (transformers' rule)
        partial = float(d.get("partial_rotary_factor", rope_params.get("partial_rotary_factor", 1.0)) or 1.0)
        if not 0.0 < partial <= 1.0:
            raise PocketLMError(f"partial_rotary_factor must lie in (0, 1], got {partial}", source)
        rotary_dim = None if partial == 1.0 else int(hidden // heads * partial)
        longrope = None
        if scaling is not None:
            kind = scaling.get("type", scaling.get("rope_type"))
            if kind not in LONGROPE_TYPES:
                raise UnsupportedModelError(
                    f"rope scaling type {kind!r} is not supported (Phi-3 uses one of {LONGROPE_TYPES})",
                    source)
            longrope = LongRope(
                short_factor=tuple(float(x) for x in scaling["short_factor"]),
                long_factor=tuple(float(x) for x in scaling["long_factor"]),
                attention_factor=longrope_attention_factor(max_pos, orig, scaling.get("attention_factor")),
            )
        eos = d.get("eos_token_id", 32000)
        if isinstance(eos, list):
            eos = eos[0]
        known = {f.name for f in cls.__dataclass_fields__.values()}
        cfg = cls(
            vocab_size=int(d.get("vocab_size", 32064)),
            hidden_size=hidden,
            intermediate_size=int(d.get("intermediate_size", 0)),
            num_hidden_layers=int(d.get("num_hidden_layers", 0)),
            num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            max_position_embeddings=max_pos,
            original_max_position_embeddings=orig,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            rope_theta=rope_theta,
            rope_scaling=longrope,
            sliding_window=int(d["sliding_window"]) if d.get("sliding_window") else None,
            rotary_dim=rotary_dim,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=int(d.get("bos_token_id", 1) or 1),
            eos_token_id=int(eos),
            pad_token_id=None if d.get("pad_token_id") is None else int(d["pad_token_id"]),
            extra={k: v for k, v in d.items() if k not in known},
        )
        return cfg.validate(source)

    def to_hf_dict(self) -> dict[str, Any]:
        """A transformers-4.x-style Phi3ForCausalLM `config.json` (the spelling Microsoft's checkpoints use)."""
        if self.architecture != ARCHITECTURE:
            raise PocketLMError(f"to_hf_dict writes Phi3ForCausalLM configs, not {self.architecture}")
        d = {k: getattr(self, k) for k in _PHI3_HF_KEYS}
        d.update(architectures=[ARCHITECTURE], model_type="phi3", hidden_act="silu",
                 attention_bias=False, attention_dropout=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
        if self.rotary_dim is not None:
            d["partial_rotary_factor"] = self.rotary_dim / self.head_dim
        d["rope_scaling"] = None if self.rope_scaling is None else {
            "type": "longrope",
            "short_factor": list(self.rope_scaling.short_factor),
            "long_factor": list(self.rope_scaling.long_factor),
        }
        return d

    # ------------------------------------------------------------------ GGUF metadata

    def to_gguf_metadata(self) -> dict[str, Any]:
        """`phi3.*` keys as llama.cpp reads them, or pocketlm's `phi3small.*` keys (llama.cpp has no
        Phi-3-small); values as Python ints/floats/lists (the writer types them)."""
        a = self.gguf_arch
        md: dict[str, Any] = {
            "general.architecture": a,
            f"{a}.context_length": self.max_position_embeddings,
            f"{a}.embedding_length": self.hidden_size,
            f"{a}.feed_forward_length": self.intermediate_size,
            f"{a}.block_count": self.num_hidden_layers,
            f"{a}.attention.head_count": self.num_attention_heads,
            f"{a}.attention.head_count_kv": self.num_key_value_heads,
            f"{a}.rope.dimension_count": self.rope_dim,
            f"{a}.rope.freq_base": float(self.rope_theta),
            f"{a}.rope.scaling.original_context_length": self.original_max_position_embeddings,
            f"{a}.vocab_size": self.vocab_size,
        }
        if self.rope_scaling is not None:
            md[f"{a}.rope.scaling.attn_factor"] = float(self.rope_scaling.attention_factor)
        if a == GGUF_ARCH:
            md[f"{a}.attention.layer_norm_rms_epsilon"] = float(self.rms_norm_eps)
            md[f"{a}.attention.sliding_window"] = int(self.sliding_window or 0)
            return md
        bs = self.block_sparse
        assert bs is not None  # validate() guarantees it for phi3small
        md.update({
            f"{a}.attention.layer_norm_epsilon": float(self.rms_norm_eps),
            f"{a}.attention.scale": float(self.attention_scale),
            f"{a}.attention.block_sparse.block_size": bs.block_size,
            f"{a}.attention.block_sparse.local_blocks": bs.local_blocks,
            f"{a}.attention.block_sparse.vert_stride": bs.vert_stride,
            f"{a}.attention.block_sparse.homo_head": bool(bs.homo_head),
            f"{a}.attention.dense_every_n_layers": self.dense_every_n,
            f"{a}.embedding_scale": float(self.embedding_multiplier),
            f"{a}.logit_scale": float(self.logit_scale),
            f"{a}.gegelu_limit": float(self.gegelu_limit),
            f"{a}.masked_token_ids": [int(i) for i in self.masked_token_ids],
        })
        if self.rope_scaling is not None:
            md[f"{a}.rope.scaling.attn_factor_short"] = float(self.rope_scaling.scale(long=False))
        return md

    @classmethod
    def from_gguf_metadata(cls, md: Mapping[str, Any], rope_factors: Mapping[str, Any] | None = None,
                           source: str | None = None) -> Phi3Config:
        """Rebuild the config from GGUF metadata (`rope_factors`: the two LongRoPE factor tensors)."""
        arch = md.get("general.architecture")
        if arch not in GGUF_ARCHS.values():
            raise UnsupportedModelError(
                f"GGUF architecture {arch!r} is not supported (pocketlm runs {', '.join(GGUF_ARCHS.values())})",
                source)
        a = arch
        small = a == SMALL_GGUF_ARCH

        def get(key: str, default: Any = None) -> Any:
            if f"{a}.{key}" in md:
                return md[f"{a}.{key}"]
            if default is None:
                raise PocketLMError(f"GGUF metadata lacks {a}.{key}", source)
            return default

        heads = int(get("attention.head_count"))
        ctx = int(get("context_length"))
        orig = int(get("rope.scaling.original_context_length", ctx))
        longrope = None
        if rope_factors and "rope_factors_long.weight" in rope_factors:
            attn = md.get(f"{a}.rope.scaling.attn_factor")
            longrope = LongRope(
                short_factor=tuple(float(x) for x in rope_factors["rope_factors_short.weight"]),
                long_factor=tuple(float(x) for x in rope_factors["rope_factors_long.weight"]),
                attention_factor=longrope_attention_factor(ctx, orig, attn),
                short_attention_factor=md.get(f"{a}.rope.scaling.attn_factor_short") if small else None,
            )
        n_vocab = md.get(f"{a}.vocab_size") or len(md.get("tokenizer.ggml.tokens", ())) or 0
        common = dict(
            vocab_size=int(n_vocab),
            hidden_size=int(get("embedding_length")),
            intermediate_size=int(get("feed_forward_length")),
            num_hidden_layers=int(get("block_count")),
            num_attention_heads=heads,
            num_key_value_heads=int(get("attention.head_count_kv", heads)),
            max_position_embeddings=ctx,
            original_max_position_embeddings=orig,
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=longrope,
            bos_token_id=int(md.get("tokenizer.ggml.bos_token_id", 1)),
            eos_token_id=int(md.get("tokenizer.ggml.eos_token_id", 32000)),
            pad_token_id=md.get("tokenizer.ggml.padding_token_id"),
        )
        if not small:
            swa = int(get("attention.sliding_window", 0))
            head_dim = common["hidden_size"] // max(heads, 1)
            rot = int(get("rope.dimension_count", head_dim))
            cfg = cls(**common, rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
                      sliding_window=swa or None, rotary_dim=None if rot == head_dim else rot)
            return cfg.validate(source)
        head_dim = common["hidden_size"] // max(heads, 1)
        cfg = cls(
            **common,
            rms_norm_eps=float(get("attention.layer_norm_epsilon")),
            tie_word_embeddings=True,  # Phi-3-small ties its output; a file with output.weight still uses it
            architecture=SMALL_ARCHITECTURE, norm="layer", activation="gegelu",
            gegelu_limit=float(get("gegelu_limit")), linear_bias=True,
            attention_multiplier=float(get("attention.scale")) * head_dim,
            embedding_multiplier=float(get("embedding_scale")),
            logit_scale=float(get("logit_scale")),
            masked_token_ids=tuple(int(i) for i in get("masked_token_ids", ())),
            block_sparse=BlockSparse(int(get("attention.block_sparse.block_size")),
                                     int(get("attention.block_sparse.local_blocks")),
                                     int(get("attention.block_sparse.vert_stride")),
                                     bool(get("attention.block_sparse.homo_head", False))),
            dense_every_n=int(get("attention.dense_every_n_layers")),
        )
        return cfg.validate(source)


_PHI3_HF_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "max_position_embeddings", "original_max_position_embeddings",
                 "rms_norm_eps", "rope_theta", "sliding_window", "tie_word_embeddings", "bos_token_id",
                 "eos_token_id", "pad_token_id")


def longrope_attention_factor(max_pos: int, orig: int, explicit: float | None = None) -> float:
    """Scale applied to cos/sin under LongRoPE, as transformers and llama.cpp compute it."""
    if explicit is not None:
        return float(explicit)
    scale = max_pos / orig
    if scale <= 1.0:
        return 1.0
    return math.sqrt(1.0 + math.log(scale) / math.log(orig))


def check_architecture(raw: Mapping[str, Any], source: str | None = None) -> str:
    """The architecture a `config.json` declares, if pocketlm runs it; else UnsupportedModelError."""
    if not isinstance(raw, Mapping):
        raise PocketLMError(f"config.json must hold a JSON object, not {type(raw).__name__}", source)
    archs = raw.get("architectures") or []
    if not isinstance(archs, list):
        archs = [archs]
    model_type = raw.get("model_type")
    if SMALL_ARCHITECTURE in archs or (not archs and model_type == "phi3small"):
        return SMALL_ARCHITECTURE
    if ARCHITECTURE in archs or (not archs and model_type == "phi3"):
        return ARCHITECTURE
    name = ", ".join(str(a) for a in archs) or f"model_type={model_type!r}"
    raise UnsupportedModelError(f"architecture {name} is not supported (pocketlm runs "
                                f"{' and '.join(GGUF_ARCHS)})", source)


# Phi-3-small's tokenizer pads the cl100k ranks (100256) with special tokens to 100352 ids; all but
# <|endoftext|>, <|system|>, <|user|>, <|assistant|> and <|end|> are dummies whose logits are masked
# (PHI3_SMALL.md section 5). Used when config.json does not list `dummy_token_indices`.
CL100K_RANKS = 100256
CL100K_PADDED_VOCAB = 100352
_SMALL_LIVE_SPECIALS = (1, 5, 6, 7, 10)  # offsets from CL100K_RANKS: 100257, 100261-100263, 100266


def phi3small_dummy_ids(vocab_size: int, n_ranks: int = CL100K_RANKS) -> tuple[int, ...]:
    """The masked ids of a Phi-3-small vocabulary: every id past the BPE ranks but the live specials."""
    return tuple(i for i in range(n_ranks, vocab_size) if i - n_ranks not in _SMALL_LIVE_SPECIALS)


def _from_hf_small(d: dict[str, Any], source: str | None) -> Phi3Config:
    """Phi3SmallForCausalLM's `config.json` (Microsoft's field names, PHI3_SMALL.md section 1)."""

    def need(key: str) -> Any:
        if key not in d or d[key] is None:
            raise PocketLMError(f"config is missing {key!r} (Phi-3-small)", source)
        return d[key]

    act = d.get("hidden_act", "gegelu")
    if act != "gegelu":
        raise UnsupportedModelError(f"Phi-3-small with hidden_act {act!r} (only 'gegelu')", source)
    if float(d.get("rope_position_scale", 1.0)) != 1.0:
        raise UnsupportedModelError(f"rope_position_scale {d['rope_position_scale']} (only 1.0)", source)
    if d.get("ff_intermediate_size") is None:
        raise UnsupportedModelError("Phi-3-small without ff_intermediate_size (ff_dim_multiplier sizing)",
                                    source)
    max_pos = int(need("max_position_embeddings"))
    scaling = d.get("rope_scaling") or None
    orig = int(d.get("original_max_position_embeddings")
               or (scaling or {}).get("original_max_position_embeddings") or max_pos)
    longrope = None
    if scaling is not None:
        kind = scaling.get("type", scaling.get("rope_type"))
        if kind not in LONGROPE_TYPES:
            raise UnsupportedModelError(f"rope scaling type {kind!r} is not supported", source)
        long_m, short_m = scaling.get("long_mscale"), scaling.get("short_mscale")
        longrope = LongRope(
            short_factor=tuple(float(x) for x in scaling["short_factor"]),
            long_factor=tuple(float(x) for x in scaling["long_factor"]),
            # HF positional_embedding.py: a missing or non-positive mscale takes the default
            attention_factor=float(long_m) if long_m and long_m > 0 else longrope_attention_factor(max_pos, orig),
            short_attention_factor=float(short_m) if short_m and short_m > 0 else 1.0,
        )
    vocab = int(need("vocab_size"))
    dummies = d.get("dummy_token_indices")
    if dummies is None:
        dummies = phi3small_dummy_ids(vocab) if vocab == CL100K_PADDED_VOCAB else ()
    eos = d.get("eos_token_id", 100257)
    if isinstance(eos, list):
        eos = eos[0]
    homo = d.get("blocksparse_homo_head_pattern", False)
    known = {f.name for f in Phi3Config.__dataclass_fields__.values()} | set(_SMALL_KEYS)
    cfg = Phi3Config(
        vocab_size=vocab,
        hidden_size=int(need("hidden_size")),
        intermediate_size=int(d["ff_intermediate_size"]),
        num_hidden_layers=int(need("num_hidden_layers")),
        num_attention_heads=int(need("num_attention_heads")),
        num_key_value_heads=int(d.get("num_key_value_heads") or need("num_attention_heads")),
        max_position_embeddings=max_pos,
        original_max_position_embeddings=orig,
        rms_norm_eps=float(d.get("layer_norm_epsilon", 1e-5)),
        rope_theta=float(d.get("rope_embedding_base", 1e6)),
        rope_scaling=longrope,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
        bos_token_id=int(d.get("bos_token_id", 100257)),
        eos_token_id=int(eos),
        pad_token_id=None if d.get("pad_token_id") is None else int(d["pad_token_id"]),
        architecture=SMALL_ARCHITECTURE,
        norm="layer",
        activation="gegelu",
        gegelu_limit=float(d.get("gegelu_limit", 20.0)),
        linear_bias=True,
        attention_multiplier=float(d.get("mup_attn_multiplier", 1.0)) if d.get("mup_use_scaling", True) else None,
        embedding_multiplier=float(d.get("mup_embedding_multiplier", 1.0) or 1.0),
        logit_scale=1.0 / float(d.get("mup_width_multiplier", 1.0) or 1.0),
        masked_token_ids=tuple(sorted(int(i) for i in dummies)),
        block_sparse=BlockSparse(int(need("blocksparse_block_size")), int(need("blocksparse_num_local_blocks")),
                                 int(need("blocksparse_vert_stride")), bool(homo)),
        dense_every_n=int(d.get("dense_attention_every_n_layers", 2)),
        extra={k: v for k, v in d.items() if k not in known},
    )
    return cfg.validate(source)


_SMALL_KEYS = ("ff_intermediate_size", "layer_norm_epsilon", "rope_embedding_base", "gegelu_limit",
               "mup_attn_multiplier", "mup_use_scaling", "mup_embedding_multiplier", "mup_width_multiplier",
               "dummy_token_indices", "blocksparse_block_size", "blocksparse_num_local_blocks",
               "blocksparse_vert_stride", "blocksparse_homo_head_pattern", "dense_attention_every_n_layers",
               "rope_scaling", "hidden_act")


# ---------------------------------------------------------------------------- weight names

@dataclass(frozen=True)
class TensorSpec:
    name: str                 # GGUF name, e.g. "blk.0.attn_qkv.weight"
    hf_name: str | None       # Hugging Face name; None for tensors derived from the config
    shape: tuple[int, ...]    # numpy shape: [out_features, in_features] for linear layers
    kind: str                 # "embedding" | "norm" | "linear" | "bias" | "rope_factors"
    layer: int | None = None
    # how the checkpoint orders this tensor's rows, where it differs from pocketlm's layout:
    # "head_major_qkv" or "interleaved_gate" (see checkpoint_row_order)
    layout: str | None = None


# The tensors of one decoder layer: (GGUF name, kind, pocketlm's shape from the config).
# Linear rows: attn_qkv [q | k | v], ffn_up [gate | up] (GeGELU: [gelu input | linear input]).
LAYER_LINEARS = ("attn_qkv", "attn_output", "ffn_up", "ffn_down")
LAYER_NORMS = ("attn_norm", "ffn_norm")

# Hugging Face names of each GGUF tensor, per architecture ({i}: the layer) and the checkpoint's
# row layout where it is not pocketlm's.
_HF_NAMES = {
    ARCHITECTURE: {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
        "attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
        "attn_qkv.weight": "model.layers.{i}.self_attn.qkv_proj.weight",
        "attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
        "ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
        "ffn_up.weight": "model.layers.{i}.mlp.gate_up_proj.weight",
        "ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
    },
    SMALL_ARCHITECTURE: {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.final_layernorm.weight",
        "output_norm.bias": "model.final_layernorm.bias",
        "output.weight": "lm_head.weight",
        **{f"{g}.{wb}": f"model.layers.{{i}}.{h}.{wb}"
           for g, h in (("attn_norm", "input_layernorm"), ("attn_qkv", "self_attn.query_key_value"),
                        ("attn_output", "self_attn.dense"), ("ffn_norm", "post_attention_layernorm"),
                        ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj"))
           for wb in ("weight", "bias")},
    },
}
_HF_LAYOUTS = {SMALL_ARCHITECTURE: {"attn_qkv": "head_major_qkv", "ffn_up": "interleaved_gate"}}
_GGUF_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def gguf_name(hf: str, architecture: str = ARCHITECTURE) -> str | None:
    """GGUF name of a Hugging Face tensor name (None for tensors pocketlm does not use)."""
    names = _HF_NAMES[architecture]
    m = _HF_LAYER.match(hf)
    for g, h in names.items():
        if m is None and h == hf:
            return g
        if m is not None and "{i}" in h and h.format(i=m.group(1)) == hf:
            return f"blk.{m.group(1)}.{g}"
    return None


def tensor_specs(cfg: Phi3Config) -> list[TensorSpec]:
    """Every tensor of the model in file order, with its expected shape (pocketlm's row layout)."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    hf_names, layouts = _HF_NAMES[cfg.architecture], _HF_LAYOUTS.get(cfg.architecture, {})
    linear_shapes = {
        "attn_qkv": (cfg.qkv_size, d),
        "attn_output": (d, cfg.num_attention_heads * hd),
        "ffn_up": (2 * f, d),
        "ffn_down": (d, f),
    }
    layer_tensors: list[tuple[str, str, tuple[int, ...]]] = []  # (GGUF suffix, kind, shape)
    for norm, lins in (("attn_norm", ("attn_qkv", "attn_output")), ("ffn_norm", ("ffn_up", "ffn_down"))):
        layer_tensors.append((f"{norm}.weight", "norm", (d,)))
        if cfg.norm == "layer":
            layer_tensors.append((f"{norm}.bias", "norm", (d,)))
        for lin in lins:
            layer_tensors.append((f"{lin}.weight", "linear", linear_shapes[lin]))
            if cfg.linear_bias:
                layer_tensors.append((f"{lin}.bias", "bias", linear_shapes[lin][:1]))

    def spec(name: str, kind: str, shape: tuple[int, ...], layer: int | None = None) -> TensorSpec:
        suffix = name.split(".", 2)[-1] if layer is not None else name
        hf = hf_names[suffix].format(i=layer) if suffix in hf_names else None
        layout = layouts.get(suffix.split(".")[0]) if layer is not None else None
        return TensorSpec(name, hf, shape, kind, layer, layout)

    specs = [spec("token_embd.weight", "embedding", (cfg.vocab_size, d))]
    if cfg.rope_scaling is not None:
        specs += [spec("rope_factors_long.weight", "rope_factors", (cfg.rope_dim // 2,)),
                  spec("rope_factors_short.weight", "rope_factors", (cfg.rope_dim // 2,))]
    for i in range(cfg.num_hidden_layers):
        specs += [spec(f"blk.{i}.{g}", kind, shape, i) for g, kind, shape in layer_tensors]
    specs.append(spec("output_norm.weight", "norm", (d,)))
    if cfg.norm == "layer":
        specs.append(spec("output_norm.bias", "norm", (d,)))
    if not cfg.tie_word_embeddings:
        specs.append(spec("output.weight", "linear", (cfg.vocab_size, d)))
    return specs


def checkpoint_row_order(spec: TensorSpec, cfg: Phi3Config) -> np.ndarray | None:
    """Row indices that turn the checkpoint's rows of `spec` into pocketlm's layout (None: same).

    head_major_qkv (Phi-3-small): KV groups of [q(G g) .. q(G g + G-1), k(g), v(g)], hd rows each,
    G = H / KV; becomes [q heads 0..H-1 | k | v] (query head G g + j keeps KV head g).
    interleaved_gate (Phi-3-small's up_proj): rows gelu0, linear0, gelu1, ... -> [gelu | linear].
    """
    if spec.layout == "head_major_qkv":
        kv, hd = cfg.num_key_value_heads, cfg.head_dim
        groups = np.arange(cfg.qkv_size).reshape(kv, cfg.num_attention_heads // kv + 2, hd)
        return np.concatenate([groups[:, :-2].reshape(-1), groups[:, -2].reshape(-1), groups[:, -1].reshape(-1)])
    if spec.layout == "interleaved_gate":
        n = spec.shape[0]
        return np.concatenate([np.arange(0, n, 2), np.arange(1, n, 2)])
    return None


def parameter_count(cfg: Phi3Config) -> int:
    return sum(math.prod(s.shape) for s in tensor_specs(cfg) if s.kind != "rope_factors")
