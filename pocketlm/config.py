"""The Phi-3 family, defined once: hyper-parameters, LongRoPE, and the names and shapes of the weights.

Every stage uses this module: the checkpoint reader parses Hugging Face `config.json` into a
`Phi3Config`, the GGUF writer turns it into `phi3.*` metadata and the runtime turns that metadata
back into the same `Phi3Config`.

Weights are named by their GGUF names (`blk.3.attn_qkv.weight`) everywhere inside pocketlm;
`gguf_name` maps a Hugging Face name to ours and each `TensorSpec` carries both. Shapes are numpy shapes
([out_features, in_features] for linear layers), the same in safetensors and in GGUF
(GGUF lists its dimensions innermost first, i.e. reversed).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import PocketLMError, UnsupportedModelError

ARCHITECTURE = "Phi3ForCausalLM"
GGUF_ARCH = "phi3"

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
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 32000
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict, compare=False)  # unrecognised keys, kept for export

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

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
        if not self.rms_norm_eps > 0 or not self.rope_theta > 0:
            raise bad("rms_norm_eps and rope_theta must be positive")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise bad(f"sliding_window must be positive or null, got {self.sliding_window}")
        if self.rope_scaling is not None:
            half = self.head_dim // 2
            for which in ("short_factor", "long_factor"):
                n = len(getattr(self.rope_scaling, which))
                if n != half:
                    raise bad(f"rope_scaling.{which} has {n} values, expected head_dim/2 = {half}")
        return self

    # ------------------------------------------------------------------ Hugging Face config.json

    @classmethod
    def from_hf_dict(cls, raw: Mapping[str, Any], source: str | None = None) -> Phi3Config:
        """Parse a `config.json` written by transformers 4.x or 5.x; refuse other architectures."""
        check_architecture(raw, source)
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
        partial = float(d.get("partial_rotary_factor", rope_params.get("partial_rotary_factor", 1.0)))
        if partial != 1.0:
            raise UnsupportedModelError(
                f"partial_rotary_factor={partial} (Phi-4-style partial RoPE) is not supported yet", source)
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
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=int(d.get("bos_token_id", 1) or 1),
            eos_token_id=int(eos),
            pad_token_id=None if d.get("pad_token_id") is None else int(d["pad_token_id"]),
            extra={k: v for k, v in d.items() if k not in known},
        )
        return cfg.validate(source)

    def to_hf_dict(self) -> dict[str, Any]:
        """A transformers-4.x-style `config.json` (the spelling Microsoft's checkpoints use)."""
        d = {k: v for k, v in asdict(self).items() if k not in ("extra", "rope_scaling")}
        d.update(architectures=[ARCHITECTURE], model_type="phi3", hidden_act="silu",
                 attention_bias=False, attention_dropout=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
        d["rope_scaling"] = None if self.rope_scaling is None else {
            "type": "longrope",
            "short_factor": list(self.rope_scaling.short_factor),
            "long_factor": list(self.rope_scaling.long_factor),
        }
        return d

    # ------------------------------------------------------------------ GGUF metadata

    def to_gguf_metadata(self) -> dict[str, Any]:
        """The `phi3.*` keys llama.cpp reads (values as Python ints/floats; the writer types them)."""
        a = GGUF_ARCH
        md: dict[str, Any] = {
            "general.architecture": a,
            f"{a}.context_length": self.max_position_embeddings,
            f"{a}.embedding_length": self.hidden_size,
            f"{a}.feed_forward_length": self.intermediate_size,
            f"{a}.block_count": self.num_hidden_layers,
            f"{a}.attention.head_count": self.num_attention_heads,
            f"{a}.attention.head_count_kv": self.num_key_value_heads,
            f"{a}.attention.layer_norm_rms_epsilon": float(self.rms_norm_eps),
            f"{a}.attention.sliding_window": int(self.sliding_window or 0),
            f"{a}.rope.dimension_count": self.head_dim,
            f"{a}.rope.freq_base": float(self.rope_theta),
            f"{a}.rope.scaling.original_context_length": self.original_max_position_embeddings,
            f"{a}.vocab_size": self.vocab_size,
        }
        if self.rope_scaling is not None:
            md[f"{a}.rope.scaling.attn_factor"] = float(self.rope_scaling.attention_factor)
        return md

    @classmethod
    def from_gguf_metadata(cls, md: Mapping[str, Any], rope_factors: Mapping[str, Any] | None = None,
                           source: str | None = None) -> Phi3Config:
        """Rebuild the config from GGUF metadata (`rope_factors`: the two LongRoPE factor tensors)."""
        arch = md.get("general.architecture")
        if arch != GGUF_ARCH:
            raise UnsupportedModelError(
                f"GGUF architecture {arch!r} is not supported (pocketlm runs {GGUF_ARCH!r})", source)
        a = GGUF_ARCH

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
            )
        n_vocab = md.get(f"{a}.vocab_size") or len(md.get("tokenizer.ggml.tokens", ())) or 0
        swa = int(get("attention.sliding_window", 0))
        cfg = cls(
            vocab_size=int(n_vocab),
            hidden_size=int(get("embedding_length")),
            intermediate_size=int(get("feed_forward_length")),
            num_hidden_layers=int(get("block_count")),
            num_attention_heads=heads,
            num_key_value_heads=int(get("attention.head_count_kv", heads)),
            max_position_embeddings=ctx,
            original_max_position_embeddings=orig,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=longrope,
            sliding_window=swa or None,
            bos_token_id=int(md.get("tokenizer.ggml.bos_token_id", 1)),
            eos_token_id=int(md.get("tokenizer.ggml.eos_token_id", 32000)),
            pad_token_id=md.get("tokenizer.ggml.padding_token_id"),
        )
        return cfg.validate(source)


def longrope_attention_factor(max_pos: int, orig: int, explicit: float | None = None) -> float:
    """Scale applied to cos/sin under LongRoPE, as transformers and llama.cpp compute it."""
    if explicit is not None:
        return float(explicit)
    scale = max_pos / orig
    if scale <= 1.0:
        return 1.0
    return math.sqrt(1.0 + math.log(scale) / math.log(orig))


def check_architecture(raw: Mapping[str, Any], source: str | None = None) -> None:
    """Accept Phi3ForCausalLM; refuse Phi-3-small and anything else with a message that names it."""
    archs = raw.get("architectures") or []
    model_type = raw.get("model_type")
    if "Phi3SmallForCausalLM" in archs or model_type == "phi3small":
        raise UnsupportedModelError(
            "Phi3SmallForCausalLM (phi-3-small: tiktoken vocabulary, GeGELU, block-sparse attention) "
            "is recognised but not supported yet", source)
    if ARCHITECTURE in archs or (not archs and model_type == "phi3"):
        return
    name = ", ".join(archs) or f"model_type={model_type!r}"
    raise UnsupportedModelError(f"architecture {name} is not supported (pocketlm runs {ARCHITECTURE})",
                                source)


# ---------------------------------------------------------------------------- weight names

@dataclass(frozen=True)
class TensorSpec:
    name: str                 # GGUF name, e.g. "blk.0.attn_qkv.weight"
    hf_name: str | None       # Hugging Face name; None for tensors derived from the config
    shape: tuple[int, ...]    # numpy shape: [out_features, in_features] for linear layers
    kind: str                 # "embedding" | "norm" | "linear" | "rope_factors"
    layer: int | None = None


# (GGUF suffix, Hugging Face suffix, kind) for each tensor of a decoder layer.
_LAYER_TENSORS = (
    ("attn_norm.weight", "input_layernorm.weight", "norm"),
    ("attn_qkv.weight", "self_attn.qkv_proj.weight", "linear"),
    ("attn_output.weight", "self_attn.o_proj.weight", "linear"),
    ("ffn_norm.weight", "post_attention_layernorm.weight", "norm"),
    ("ffn_up.weight", "mlp.gate_up_proj.weight", "linear"),  # rows: [gate | up]
    ("ffn_down.weight", "mlp.down_proj.weight", "linear"),
)
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def gguf_name(hf: str) -> str | None:
    """GGUF name of a Hugging Face tensor name (None for tensors pocketlm does not use)."""
    for g, h in _GLOBAL_TENSORS.items():
        if hf == h:
            return g
    m = _HF_LAYER.match(hf)
    if m:
        for g, h, _ in _LAYER_TENSORS:
            if m.group(2) == h:
                return f"blk.{m.group(1)}.{g}"
    return None


def tensor_specs(cfg: Phi3Config) -> list[TensorSpec]:
    """Every tensor of the model in file order, with its expected shape."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    layer_shapes = {
        "attn_norm.weight": (d,),
        "attn_qkv.weight": (cfg.qkv_size, d),
        "attn_output.weight": (d, cfg.num_attention_heads * hd),
        "ffn_norm.weight": (d,),
        "ffn_up.weight": (2 * f, d),
        "ffn_down.weight": (d, f),
    }
    specs = [TensorSpec("token_embd.weight", _GLOBAL_TENSORS["token_embd.weight"],
                        (cfg.vocab_size, d), "embedding")]
    if cfg.rope_scaling is not None:
        specs += [TensorSpec("rope_factors_long.weight", None, (hd // 2,), "rope_factors"),
                  TensorSpec("rope_factors_short.weight", None, (hd // 2,), "rope_factors")]
    for i in range(cfg.num_hidden_layers):
        for g, h, kind in _LAYER_TENSORS:
            specs.append(TensorSpec(f"blk.{i}.{g}", f"model.layers.{i}.{h}", layer_shapes[g], kind, i))
    specs.append(TensorSpec("output_norm.weight", _GLOBAL_TENSORS["output_norm.weight"], (d,), "norm"))
    if not cfg.tie_word_embeddings:
        specs.append(TensorSpec("output.weight", _GLOBAL_TENSORS["output.weight"], (cfg.vocab_size, d),
                                "linear"))
    return specs


def parameter_count(cfg: Phi3Config) -> int:
    return sum(math.prod(s.shape) for s in tensor_specs(cfg) if s.kind != "rope_factors")
