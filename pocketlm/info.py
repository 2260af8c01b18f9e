"""`pocketlm info PATH`: what a checkpoint folder, GGUF file or ONNX folder holds, in a few lines."""

from __future__ import annotations

import argparse
from pathlib import Path

from .checkpoint import Checkpoint, read_json_object
from .config import SMALL_ARCHITECTURE, Phi3Config, parameter_count
from .errors import PocketLMError


def describe_checkpoint(path: str | Path) -> str:
    ckpt = Checkpoint.open(path)
    cfg = ckpt.config
    dtypes = ", ".join(f"{d} x{n}" for d, n in sorted(ckpt.dtypes().items()))
    lines = [
        f"checkpoint    {ckpt.path}",
        f"architecture  {describe_architecture(cfg)}",
        f"parameters    {parameter_count(cfg):,}",
        f"dtypes        {dtypes} ({ckpt.nbytes() / 1e6:.1f} MB in {len(ckpt.files)} file(s))",
        f"context       {cfg.max_position_embeddings} tokens"
        + (f", sliding window {cfg.sliding_window}" if cfg.sliding_window else ""),
        f"rope          {describe_rope(cfg)}",
        f"attention     {describe_attention(cfg)}",
        f"tokenizer     {_describe_tokenizer(ckpt.path)}",
    ]
    return "\n".join(lines)


def describe_architecture(cfg: Phi3Config) -> str:
    attn = "MHA" if cfg.num_key_value_heads == cfg.num_attention_heads else "GQA"
    name = "phi-3-small, " if cfg.architecture == SMALL_ARCHITECTURE else ""
    text = (f"{cfg.architecture} ({name}{cfg.gguf_arch}): {cfg.num_hidden_layers} layers, hidden "
            f"{cfg.hidden_size}, ffn {cfg.intermediate_size}, heads {cfg.num_attention_heads}/"
            f"{cfg.num_key_value_heads} ({attn}), head dim {cfg.head_dim}")
    if cfg.architecture == SMALL_ARCHITECTURE:
        text += (f"; LayerNorm with bias, GeGELU (limit {cfg.gegelu_limit:g}), biases on every linear, "
                 f"muP: embedding x{cfg.embedding_multiplier:g}, logits x{cfg.logit_scale:g}, "
                 f"{len(cfg.masked_token_ids)} masked token ids")
    return text


def describe_rope(cfg: Phi3Config) -> str:
    scaling = "none (plain RoPE)"
    if cfg.rope_scaling is not None:
        scaling = (f"LongRoPE, original context {cfg.original_max_position_embeddings}, "
                   f"attention factor {cfg.rope_scaling.attention_factor:.4f}")
        if cfg.rope_scaling.short_attention_factor is not None:
            scaling += f" (short {cfg.rope_scaling.short_attention_factor:.4f})"
    partial = "" if cfg.rotary_dim is None else f", on {cfg.rope_dim} of {cfg.head_dim} values per head (partial)"
    return f"theta {cfg.rope_theta:g}{partial}, scaling {scaling}"


def describe_attention(cfg: Phi3Config) -> str:
    scale = f"scale {cfg.attention_scale:.6g}"
    bs = cfg.block_sparse
    if bs is None:
        return f"dense causal, {scale}"
    sparse = [i for i in range(cfg.num_hidden_layers) if cfg.layer_sparsity(i) is not None]
    return (f"block-sparse in {len(sparse)} of {cfg.num_hidden_layers} layers (dense every "
            f"{cfg.dense_every_n}): blocks of {bs.block_size} tokens, {bs.local_blocks} local blocks, "
            f"vertical stride {bs.vert_stride}, {'one pattern for all heads' if bs.homo_head else 'per-head'}"
            f" pattern; {scale}")


def _describe_tokenizer(folder: Path) -> str:
    ranks = sorted(folder.glob("*.tiktoken"))
    if ranks:
        from .tokenizer_tiktoken import TiktokenTokenizer

        tok = TiktokenTokenizer.from_hf_dir(folder)
        return f"tiktoken byte-level BPE ({tok.vocab_size} ids), {ranks[0].name}"
    path = folder / "tokenizer.json"
    if not path.is_file():
        return "none (no tokenizer.json or *.tiktoken)"
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
