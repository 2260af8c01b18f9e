"""`pocketlm info` on an exported ONNX folder: what it holds, read from model.onnx without weights."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np

from pocketlm.errors import PocketLMError

MODEL_FILE = "model.onnx"
GENAI_CONFIG = "genai_config.json"


def is_onnx_folder(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / MODEL_FILE).is_file() and (p / GENAI_CONFIG).is_file()


def accuracy_levels(folder: str | os.PathLike) -> list[int]:
    """The MatMulNBits accuracy_level(s) of an exported folder's model.onnx (read without weights):
    [1] float32 activations, [4] int8 activations; [] if it has no MatMulNBits."""
    import onnx

    model = onnx.load(str(Path(folder) / MODEL_FILE), load_external_data=False)
    return sorted({a.i for n in model.graph.node if n.op_type == "MatMulNBits"
                   for a in n.attribute if a.name == "accuracy_level"})


def describe_onnx(folder: str | os.PathLike) -> str:
    """A few lines for `pocketlm info` on an exported folder (reads model.onnx without weights)."""
    import onnx

    folder = Path(folder)
    if not is_onnx_folder(folder):
        raise PocketLMError(f"not an ONNX export folder (needs {MODEL_FILE} and {GENAI_CONFIG})", folder)
    try:
        genai = json.loads((folder / GENAI_CONFIG).read_text(encoding="utf-8"))
        dec = genai["model"]["decoder"]
        model = onnx.load(str(folder / dec.get("filename", MODEL_FILE)), load_external_data=False)
    except (OSError, ValueError, KeyError) as e:
        raise PocketLMError(f"cannot read the ONNX folder: {e}", folder) from None
    ops = Counter(n.op_type for n in model.graph.node)
    meta = {p.key: p.value for p in model.metadata_props}
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    n_params = _parameter_count(model, genai)
    levels = sorted({a.i for n in nbits for a in n.attribute if a.name == "accuracy_level"})
    bits = Counter(next(a.i for a in n.attribute if a.name == "bits") for n in nbits)
    files = [f for f in folder.iterdir() if f.is_file()]
    size = sum(f.stat().st_size for f in files if f.name.startswith(MODEL_FILE))
    m = genai["model"]
    tok = "tokenizer.json" if (folder / "tokenizer.json").is_file() else "none (no tokenizer.json)"
    bit_counts = ", ".join(f"{b}-bit x{c}" for b, c in sorted(bits.items()))
    bpw = f", {8 * size / n_params:.2f} bits per weight" if n_params else ""
    lines = [
        f"onnx folder   {folder}",
        f"architecture  {m.get('type')}: {dec.get('num_hidden_layers')} layers, "
        f"hidden {dec.get('hidden_size')}, heads {dec.get('num_attention_heads')}/"
        f"{dec.get('num_key_value_heads')}, head dim {dec.get('head_size')}",
        f"operators     {', '.join(f'{k} x{v}' for k, v in ops.most_common(8))}",
        f"attention     {_attention_summary(model)}",
        f"linear layers MatMulNBits x{len(nbits)} ({bit_counts}), "
        f"accuracy_level {', '.join(map(str, levels)) or '-'}",
        f"GGUF types    {meta.get('pocketlm.tensor_types', '?')} (from {meta.get('pocketlm.source', '?')})",
        f"size          {size / 1e6:.1f} MB{bpw}",
        f"context       {m.get('context_length')} tokens, vocab {m.get('vocab_size')}",
        f"tokenizer     {tok}; bos {m.get('bos_token_id')}, eos {m.get('eos_token_id')}",
    ]
    return "\n".join(lines)


def _attention_summary(model) -> str:
    """Attention ops per layer kind: GroupQueryAttention (dense or sliding window) and
    SparseAttention (Phi-3-small's block-sparse layers: block size, CSR layouts for the heads)."""
    parts = []
    for op in ("GroupQueryAttention", "SparseAttention"):
        nodes = [n for n in model.graph.node if n.op_type == op]
        if not nodes:
            continue
        attrs = {a.name: a for a in nodes[0].attribute}
        detail = f"scale {attrs['scale'].f:.6g}" if "scale" in attrs else "scale default"
        if op == "SparseAttention":
            rows = {t.name: t for t in model.graph.initializer}.get(nodes[0].input[5])
            layouts = f", {rows.dims[0]} layouts" if rows is not None else ""
            detail += f", block {attrs['sparse_block_size'].i}{layouts}"
        elif attrs.get("local_window_size") is not None and attrs["local_window_size"].i > 0:
            detail += f", window {attrs['local_window_size'].i}"
        parts.append(f"{op} x{len(nodes)} ({detail})")
    return ", ".join(parts) or "-"


def _parameter_count(model, genai: dict) -> int:
    """Weights of the model: K*N of each linear layer (a split 8-bit layer counted once), float
    linear layers by their initializer, and the embedding table (vocab x hidden); a tied output
    layer (metadata pocketlm.tied_output) holds the embedding again and is not counted twice."""
    try:
        n = int(genai["model"]["vocab_size"]) * int(genai["model"]["decoder"]["hidden_size"])
    except (KeyError, TypeError, ValueError):
        return 0
    layers = {}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            layers[node.name.rsplit("/", 1)[0]] = attrs.get("K", 0) * attrs.get("N", 0)
    tied = any(p.key == "pocketlm.tied_output" and p.value == "1" for p in model.metadata_props)
    if tied:
        layers.pop("/lm_head", None)
    n += sum(layers.values())
    for t in model.graph.initializer:
        if t.name.endswith(".weight_t") and not (tied and t.name == "/lm_head.weight_t"):
            n += int(np.prod(t.dims))
    return n
