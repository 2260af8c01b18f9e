"""Write a Phi-3 checkpoint to GGUF the way llama.cpp's `convert_hf_to_gguf.py` (Phi3MiniModel) does.

Unquantized export (`--dtype f16|f32`): the input to llama.cpp's own quantizer in the quality
benchmark. The quantizer pipeline writes its files through `phi3_gguf_metadata` as well, so both
carry the same keys:

- `phi3.*` from `Phi3Config.to_gguf_metadata()`; `phi3.attention.sliding_window` is always present
  (0 when the model has none: older llama.cpp builds require the key; newer ones ignore Phi-3's
  window) and `phi3.rope.scaling.attn_factor` for LongRoPE.
- `general.name`: llama.cpp gives Phi-3's special tokens their whitespace rule (rstrip) only when
  the name contains "phi3" or "phi-3", so a name without either gets a "phi3-" prefix.
- `general.file_type`, `general.quantization_version` (2, as the converter writes).
- `tokenizer.ggml.*` and `tokenizer.chat_template` from `Tokenizer.to_gguf_fields()`, the vocabulary
  padded to the model's vocab_size with "[PAD<i>]" unused tokens (Phi-3 checkpoints have 32011
  tokens for 32064 embedding rows; llama.cpp takes n_vocab from the token list).
- `pocketlm.version`, `pocketlm.recipe`, `pocketlm.method` (+ what the quantizer adds).

Tensors: every entry of `tensor_specs(cfg)` in that order; norms and the LongRoPE factor tensors
stay F32 (as llama.cpp keeps 1-D tensors), the embedding and linear layers take the chosen dtype.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pocketlm import __version__
from pocketlm.checkpoint import Checkpoint
from pocketlm.config import Phi3Config, TensorSpec, tensor_specs
from pocketlm.errors import PocketLMError
from pocketlm.quantize.formats import GGMLType
from pocketlm.tokenizer import UNUSED, tokenizer_from_dir, tokenizer_from_gguf_fields

from .gguf_writer import GGUFWriter

# llama.cpp `enum llama_ftype`: the dominant tensor type, written as general.file_type.
FILE_TYPES = {
    "f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q4_k_s": 14, "q4_k_m": 15, "q6_k": 18, "bf16": 32,
}
EXPORT_DTYPES = {"f16": GGMLType.F16, "f32": GGMLType.F32}
QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION
PAD_SCORE = -10000.0  # what convert_hf_to_gguf gives its "[PAD<i>]" filler tokens


def gguf_model_name(name: str, phi3_whitespace_rule: bool = True) -> str:
    """general.name for llama.cpp, which strips the whitespace after Phi-3's chat tokens exactly
    when the name contains "phi3" or "phi-3": the name says phi3 exactly when our tokenizer strips."""
    says_phi3 = re.search(r"phi-?3", name, re.IGNORECASE) is not None
    if phi3_whitespace_rule and not says_phi3:
        return f"phi3-{name}"
    if not phi3_whitespace_rule and says_phi3:
        return re.sub(r"phi-?3", "model", name, flags=re.IGNORECASE)
    return name


def pad_vocabulary(fields: Mapping[str, Any], vocab_size: int, source: str | None = None) -> dict[str, Any]:
    """Tokenizer fields with the token list padded to `vocab_size` (the embedding's row count)."""
    fields = dict(fields)
    tokens = list(fields["tokenizer.ggml.tokens"])
    n, extra = len(tokens), vocab_size - len(tokens)
    if extra < 0:
        types = np.asarray(fields.get("tokenizer.ggml.token_type", ()), np.int32)
        if types.size != n or not (types[vocab_size:] == UNUSED).all():
            raise PocketLMError(f"the tokenizer has {n} tokens, more than the model's vocab_size {vocab_size}",
                                source)
        # only unused padding past the model's rows (a tokenizer padded to a multiple): cut it
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
            if key in fields:
                fields[key] = fields[key][:vocab_size]
    elif extra:
        scores = np.asarray(fields["tokenizer.ggml.scores"], np.float32)
        types = np.asarray(fields["tokenizer.ggml.token_type"], np.int32)
        fields["tokenizer.ggml.tokens"] = tokens + [f"[PAD{i}]" for i in range(n, vocab_size)]
        fields["tokenizer.ggml.scores"] = np.concatenate([scores, np.full(extra, PAD_SCORE, np.float32)])
        fields["tokenizer.ggml.token_type"] = np.concatenate([types, np.full(extra, UNUSED, np.int32)])
    return fields


def phi3_gguf_metadata(cfg: Phi3Config, tokenizer_fields: Mapping[str, Any], *, name: str, file_type: int,
                       recipe: str, method: str, extra: Mapping[str, Any] | None = None,
                       source: str | None = None) -> dict[str, Any]:
    """All metadata of a pocketlm Phi-3 GGUF (values typed by the writer's key tables)."""
    arch = cfg.to_gguf_metadata()
    md: dict[str, Any] = {
        "general.architecture": arch.pop("general.architecture"),
        # llama.cpp's name rule only matters for the architecture it runs (phi3)
        "general.name": (gguf_model_name(name, tokenizer_from_gguf_fields(tokenizer_fields).wants_phi3_name)
                         if cfg.gguf_arch == "phi3" else name),
        "general.file_type": int(file_type),
        "general.quantization_version": QUANTIZATION_VERSION,
    }
    md.update(arch)
    md.update(pad_vocabulary(tokenizer_fields, cfg.vocab_size, source))
    md.update({"pocketlm.version": __version__, "pocketlm.recipe": recipe, "pocketlm.method": method})
    md.update(extra or {})
    return md


def export_tensor_type(spec: TensorSpec, dtype: GGMLType) -> GGMLType:
    """F32 for norms, biases and rope factors (as llama.cpp keeps them), `dtype` for everything else."""
    return GGMLType.F32 if spec.kind in ("norm", "bias", "rope_factors") else dtype


def export_gguf(checkpoint_dir: str | os.PathLike, out_path: str | os.PathLike, dtype: str = "f16",
                name: str | None = None) -> Path:
    """Write the checkpoint at `checkpoint_dir` to `out_path` unquantized (F16 or F32 weights)."""
    if dtype not in EXPORT_DTYPES:
        raise PocketLMError(f"unknown export dtype {dtype!r}; choose one of {', '.join(EXPORT_DTYPES)}")
    ckpt = Checkpoint.open(checkpoint_dir)
    cfg = ckpt.config
    if ckpt.tokenizer_dir is None:
        raise PocketLMError("no tokenizer.json or *.tiktoken: a GGUF file must carry the vocabulary", ckpt.path)
    tokenizer = tokenizer_from_dir(ckpt.tokenizer_dir)
    metadata = phi3_gguf_metadata(
        cfg, tokenizer.to_gguf_fields(), name=name or Path(ckpt.path).resolve().name,
        file_type=FILE_TYPES[dtype], recipe=dtype, method="none", source=str(ckpt.path))
    specs = tensor_specs(cfg)
    declared = [(s.name, export_tensor_type(s, EXPORT_DTYPES[dtype]), s.shape) for s in specs]
    with GGUFWriter(out_path, metadata, declared) as writer:
        for spec in specs:  # one tensor in memory at a time
            writer.write_tensor(spec.name, ckpt.tensor(spec.name))
    return Path(out_path)
