"""Helpers for the runtime tests: write a Phi-3 GGUF from float weights with chosen block types.

Files go through the project's writer (`GGUFWriter`) and block formats (`formats.quantize`), the
way the quantizer writes them: norms and LongRoPE factors stay F32, every other tensor takes the
type asked for. `dequantized_weights` reads a file back into float32 arrays (what the reference
forward pass runs on).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pocketlm.config import Phi3Config, tensor_specs
from pocketlm.export.gguf_export import phi3_gguf_metadata
from pocketlm.export.gguf_reader import GGUFReader
from pocketlm.export.gguf_writer import GGUFWriter
from pocketlm.quantize.formats import GGMLType, quantize

# llama_ftype written as general.file_type (the dominant tensor type)
FILE_TYPES = {GGMLType.F32: 0, GGMLType.F16: 1, GGMLType.Q4_0: 2, GGMLType.Q4_1: 3, GGMLType.Q8_0: 7,
              GGMLType.Q4_K: 15, GGMLType.Q6_K: 18}


def write_gguf(path: Path, cfg: Phi3Config, weights: Mapping[str, np.ndarray], gtype: GGMLType,
               tokenizer_fields: Mapping[str, Any] | None = None,
               overrides: Mapping[str, GGMLType] | None = None) -> Path:
    """A GGUF at `path`: every matrix in `gtype` (or `overrides[name]`), 1-D tensors F32."""
    if tokenizer_fields:  # the exporter's metadata: vocabulary padded to vocab_size, phi3 name
        md = phi3_gguf_metadata(cfg, tokenizer_fields, name="phi3-test", file_type=FILE_TYPES.get(gtype, 0),
                                recipe=gtype.name.lower(), method="rtn")
    else:
        md = {"general.name": "phi3-test", **cfg.to_gguf_metadata()}
    specs = tensor_specs(cfg)
    types = {}
    for s in specs:
        if s.kind in ("norm", "rope_factors"):
            types[s.name] = GGMLType.F32
        else:
            types[s.name] = (overrides or {}).get(s.name, gtype)
    with GGUFWriter(path, md, [(s.name, types[s.name], s.shape) for s in specs]) as w:
        for s in specs:
            x = np.asarray(weights[s.name], dtype=np.float32)
            t = types[s.name]
            w.write_tensor(s.name, x if t in (GGMLType.F32, GGMLType.F16) else quantize(x, t, s.name))
    return path


def phi3_vocab_fields(data_root: Path) -> dict[str, Any]:
    """The real Phi-3 vocabulary (32064 tokens) as GGUF tokenizer fields: llama.cpp needs one."""
    with GGUFReader(data_root / "data" / "phi3" / "ggml-vocab-phi-3.gguf") as r:
        return r.tokenizer_fields()


def longrope_weights(cfg: Phi3Config, weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`weights` plus the two LongRoPE factor tensors GGUF stores (when the config has LongRoPE)."""
    out = dict(weights)
    if cfg.rope_scaling is not None:
        out["rope_factors_long.weight"] = np.asarray(cfg.rope_scaling.long_factor, np.float32)
        out["rope_factors_short.weight"] = np.asarray(cfg.rope_scaling.short_factor, np.float32)
    return out


def dequantized_weights(path: Path) -> dict[str, np.ndarray]:
    with GGUFReader(path) as r:
        return {name: r.dequantize(name).astype(np.float32) for name in r.tensors}
