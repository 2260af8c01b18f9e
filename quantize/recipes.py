"""Recipes: which GGML type each tensor of a Phi-3 model is stored in.

A recipe maps a `TensorSpec` (name, shape, kind, layer) to a `GGMLType`. Norms and LongRoPE
factors always stay F32 (llama.cpp never quantizes 1-D tensors).

- `q4_0`, `q8_0`, `q4_k_m`, `f16` reproduce llama.cpp's file types of the same name
  (`llama_tensor_get_type` in llama.cpp `src/llama-quant.cpp`): the test
  `tests/test_recipes.py::test_recipes_match_llama_cpp` quantizes an F16 GGUF with
  `llama_cpp.llama_model_quantize` and compares every tensor's type with ours.
  * q4_0: every linear and token_embd Q4_0, output Q6_K (Q8_0 if its rows are not a multiple of 256).
  * q8_0: everything Q8_0.
  * q4_k_m: Q4_K; attn_qkv and ffn_down Q6_K on the `use_more_bits` layers (the first and last
    eighth of layers and every third layer between); output Q6_K. Fused attn_qkv counts as
    llama.cpp's "attn_v" category there (the vendored llama.cpp of llama-cpp-python 0.3.36 gives it
    Q6_K/Q4_K; REFERENCE.md's "attn_qkv Q5_K" is an older rule that this version no longer reaches).
    Shape fallbacks as llama.cpp: Q6_K -> Q8_0 when a row is not a multiple of 256; Q4_K -> Q4_1
    (llama.cpp uses Q5_0, which pocketlm does not implement: 5.0 instead of 5.5 bits per weight).
- `pocket`: our recommended ~4.5 bits-per-weight recipe (see `POCKET_NOTE`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pocketlm.config import Phi3Config, TensorSpec, tensor_specs
from pocketlm.errors import PocketLMError

from .formats import BLOCK_SHAPE, GGMLType

T = GGMLType

# llama.cpp's `enum llama_ftype` values, stored as `general.file_type` (informational for readers).
LLAMA_FTYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "q4_k_s": 14, "q4_k_m": 15}

# Measured by benchmarks/quant_quality.py on the built-in model (gptq): KLD 0.00082 at 4.97 bpw there
# (embedding and output are a large share of a 4M-parameter model), vs llama.cpp Q4_K_M 0.00275 at
# 5.10 bpw and our q4_k_m 0.00091; 4.58 bpw at phi-3-mini shape (q4_0: 4.56, q4_k_m: 5.02).
POCKET_NOTE = (
    "Q4_K (4.5 bpw) for every linear layer and token_embd, Q6_K for output and for ffn_down of "
    "the first and last layer; use with gptq.")


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's rule for the layers that get more bits in *_K_M mixes."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def _fits(gtype: GGMLType, row: int) -> bool:
    return row % BLOCK_SHAPE[gtype][0] == 0


def _fallback(gtype: GGMLType, row: int) -> GGMLType:
    """llama.cpp's `tensor_type_fallback`: a type whose block divides the row length."""
    order = {T.Q6_K: (T.Q6_K, T.Q8_0, T.F16), T.Q4_K: (T.Q4_K, T.Q4_1, T.F16),
             T.Q4_0: (T.Q4_0, T.F16), T.Q4_1: (T.Q4_1, T.F16), T.Q8_0: (T.Q8_0, T.F16)}
    for candidate in order.get(gtype, (gtype,)):
        if _fits(candidate, row):
            return candidate
    return T.F16


def _role(spec: TensorSpec) -> str:
    """'attn_qkv', 'ffn_down', ... for layer tensors, 'token_embd' / 'output' for the globals."""
    return spec.name.split(".")[-2]


def _q4_0(spec: TensorSpec, cfg: Phi3Config) -> GGMLType:
    if _role(spec) == "output":
        return T.Q6_K
    return T.Q4_0


def _q8_0(spec: TensorSpec, cfg: Phi3Config) -> GGMLType:
    return T.Q8_0


def _f16(spec: TensorSpec, cfg: Phi3Config) -> GGMLType:
    return T.F16


def _q4_k_m(spec: TensorSpec, cfg: Phi3Config) -> GGMLType:
    role = _role(spec)
    if role == "output":
        return T.Q6_K
    if role in ("attn_qkv", "ffn_down") and use_more_bits(spec.layer, cfg.num_hidden_layers):
        return T.Q6_K
    return T.Q4_K


def _pocket(spec: TensorSpec, cfg: Phi3Config) -> GGMLType:
    role, n = _role(spec), cfg.num_hidden_layers
    if role == "output":
        return T.Q6_K
    if role == "ffn_down" and spec.layer in (0, n - 1):
        return T.Q6_K
    return T.Q4_K


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    file_type: int                                        # llama_ftype for general.file_type
    choose: Callable[[TensorSpec, Phi3Config], GGMLType]  # for 2-D tensors only

    def tensor_type(self, spec: TensorSpec, cfg: Phi3Config) -> GGMLType:
        if len(spec.shape) < 2 or spec.kind in ("norm", "rope_factors"):
            return T.F32
        if spec.kind == "embedding" and cfg.tie_word_embeddings:
            # tied weights: llama.cpp quantizes token_embd like output (it serves as both)
            spec = TensorSpec("output.weight", spec.hf_name, spec.shape, "linear")
        return _fallback(self.choose(spec, cfg), spec.shape[-1])

    def tensor_types(self, cfg: Phi3Config) -> dict[str, GGMLType]:
        """GGUF name -> type, for every tensor of the model in file order."""
        return {s.name: self.tensor_type(s, cfg) for s in tensor_specs(cfg)}


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("q4_0", "llama.cpp Q4_0: linears and token_embd Q4_0, output Q6_K", LLAMA_FTYPE["q4_0"], _q4_0),
    Recipe("q4_k_m", "llama.cpp Q4_K_M: Q4_K, Q6_K for output and for attn_qkv/ffn_down on "
           "use_more_bits layers", LLAMA_FTYPE["q4_k_m"], _q4_k_m),
    Recipe("q8_0", "llama.cpp Q8_0: everything Q8_0", LLAMA_FTYPE["q8_0"], _q8_0),
    Recipe("f16", "llama.cpp F16: every 2-D tensor F16, 1-D tensors F32", LLAMA_FTYPE["f16"], _f16),
    Recipe("pocket", "pocketlm's recommendation (~4.5 bpw): " + POCKET_NOTE, LLAMA_FTYPE["q4_k_s"], _pocket),
)}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise PocketLMError(f"unknown recipe {name!r}; valid recipes: {', '.join(RECIPES)}") from None


def bits_per_weight(types: dict[str, GGMLType], cfg: Phi3Config) -> float:
    """Stored bits over stored values for the whole model (norms and rope factors included)."""
    bits = values = 0
    for s in tensor_specs(cfg):
        n = 1
        for d in s.shape:
            n *= d
        per_block, nbytes = BLOCK_SHAPE[types[s.name]]
        bits += n // per_block * nbytes * 8
        values += n
    return bits / values
