"""`pocketlm info PATH`: what a checkpoint folder, GGUF file or ONNX folder holds, in a few lines."""

from __future__ import annotations

import argparse
from pathlib import Path

from .checkpoint import Checkpoint, read_json_object
from .config import parameter_count
from .errors import PocketLMError


def describe_checkpoint(path: str | Path) -> str:
    ckpt = Checkpoint.open(path)
    cfg = ckpt.config
    rope = "none (plain RoPE)"
    if cfg.rope_scaling is not None:
        rope = (f"LongRoPE, original context {cfg.original_max_position_embeddings}, "
                f"attention factor {cfg.rope_scaling.attention_factor:.4f}")
    dtypes = ", ".join(f"{d} x{n}" for d, n in sorted(ckpt.dtypes().items()))
    attn = "MHA" if cfg.num_key_value_heads == cfg.num_attention_heads else "GQA"
    lines = [
        f"checkpoint    {ckpt.path}",
        f"architecture  Phi3ForCausalLM: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"ffn {cfg.intermediate_size}, heads {cfg.num_attention_heads}/{cfg.num_key_value_heads} "
        f"({attn}), head dim {cfg.head_dim}",
        f"parameters    {parameter_count(cfg):,}",
        f"dtypes        {dtypes} ({ckpt.nbytes() / 1e6:.1f} MB in {len(ckpt.files)} file(s))",
        f"context       {cfg.max_position_embeddings} tokens"
        + (f", sliding window {cfg.sliding_window}" if cfg.sliding_window else ""),
        f"rope          theta {cfg.rope_theta:g}, scaling {rope}",
        f"tokenizer     {_describe_tokenizer(ckpt.path)}",
    ]
    return "\n".join(lines)


def _describe_tokenizer(folder: Path) -> str:
    path = folder / "tokenizer.json"
    if not path.is_file():
        return "none (no tokenizer.json)"
    tok = read_json_object(path)
    model = tok.get("model")
    vocab = model.get("vocab") if isinstance(model, dict) else None
    added = tok.get("added_tokens", [])
    if not isinstance(vocab, dict | list) or not isinstance(added, list) or not all(
            isinstance(t, dict) and isinstance(t.get("content"), str) for t in added):
        raise PocketLMError("not a tokenizer.json (expected model.vocab and a list of added_tokens)", path)
    n = len(vocab) + sum(1 for t in added if t["content"] not in vocab)
    fallback = ", byte fallback" if model.get("byte_fallback") else ""
    return f"{model.get('type', '?')} ({n} tokens{fallback}), {path.name}"


def describe(path: str | Path) -> str:
    """Describe a checkpoint folder, a GGUF file or an exported ONNX folder."""
    path = Path(path)
    if not path.exists():
        raise PocketLMError("does not exist", path)
    if path.is_file():
        from .export.gguf_info import describe_gguf

        return describe_gguf(path)
    if (path / "genai_config.json").is_file():
        from .export.onnx_export import describe_onnx

        return describe_onnx(path)
    return describe_checkpoint(path)


def _run(args: argparse.Namespace) -> int:
    print(describe(args.path))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="describe a checkpoint folder, GGUF file or ONNX folder")
    p.add_argument("path", help="Hugging Face checkpoint folder, .gguf file or exported ONNX folder")
    p.set_defaults(func=_run)
