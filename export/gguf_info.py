"""`pocketlm info FILE.gguf`: what a GGUF file holds, in a few lines (any architecture)."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

from .gguf_reader import GGUFReader


def describe_gguf(path: str | os.PathLike) -> str:
    with GGUFReader(path) as r:
        md = r.metadata
        arch = str(md.get("general.architecture", "?"))

        def a(key: str, default: Any = None) -> Any:
            return md.get(f"{arch}.{key}", default)

        lines = [
            f"gguf          {r.path} (GGUF v{r.version}, {r.file_size / 1e6:.1f} MB)",
            f"name          {md.get('general.name', '?')}",
            f"architecture  {arch}: {_model_shape(a)}",
            f"context       {_context(a)}",
            f"tensors       {_tensor_summary(r)}",
            f"tokenizer     {_tokenizer(md)}",
        ]
        pocketlm = {k.removeprefix("pocketlm."): v for k, v in md.items() if k.startswith("pocketlm.")}
        if pocketlm:
            lines.append("pocketlm      " + ", ".join(f"{k} {_short(v)}" for k, v in pocketlm.items()))
        lines.append(f"packed cache  {_packed_cache(path)}")
        return "\n".join(lines)


def _packed_cache(path: str | os.PathLike) -> str:
    """The runtime's repacked copies of this file (runtime/packed_cache.py), if any."""
    try:
        from ..runtime.packed_cache import cache_dir, cached_copies
        copies = cached_copies(os.fspath(path))
    except (ImportError, OSError):  # no kernel built: no runtime, no cache
        return "none"
    if not copies:
        return f"none (the first `pocketlm run` of a Q4_0/Q8_0/Q4_K file writes one to {cache_dir()})"
    return "; ".join(f"{p} ({n / 1e9:.2f} GB{'' if current else ', stale: replaced at the next run'})"
                     for p, n, current in copies) + f" (delete with `rm -r {cache_dir()}`)"


def _model_shape(a) -> str:
    if a("block_count") is None:
        return "no model hyper-parameters (vocabulary only?)"
    heads, kv = a("attention.head_count", "?"), a("attention.head_count_kv", a("attention.head_count", "?"))
    return (f"{a('block_count')} layers, hidden {a('embedding_length', '?')}, "
            f"ffn {a('feed_forward_length', '?')}, heads {heads}/{kv} ({'MHA' if heads == kv else 'GQA'})")


def _context(a) -> str:
    text = f"{a('context_length', '?')} tokens"
    orig = a("rope.scaling.original_context_length")
    if a("rope.scaling.attn_factor") is not None:
        text += f", LongRoPE from {orig} (attention factor {a('rope.scaling.attn_factor'):.4f})"
    if a("attention.sliding_window"):
        text += f", sliding window {a('attention.sliding_window')}"
    if a("attention.block_sparse.block_size"):
        text += (f", block-sparse attention (blocks of {a('attention.block_sparse.block_size')}, "
                 f"{a('attention.block_sparse.local_blocks')} local, vertical stride "
                 f"{a('attention.block_sparse.vert_stride')}, dense every "
                 f"{a('attention.dense_every_n_layers')} layers; llama.cpp does not run this architecture)")
    if a("rope.freq_base") is not None:
        text += f", rope theta {a('rope.freq_base'):g}"
    return text


def _tensor_summary(r: GGUFReader) -> str:
    if not r.tensors:
        return "none"
    counts: Counter = Counter()
    weights: Counter = Counter()
    total_bytes = total_weights = 0
    for t in r:
        counts[t.type_name] += 1
        weights[t.type_name] += t.n_elements
        total_bytes += t.nbytes
        total_weights += t.n_elements
    by_type = ", ".join(f"{name} x{counts[name]} ({weights[name] / total_weights:.1%} of weights)"
                        for name, _ in weights.most_common())
    return (f"{len(r.tensors)} ({by_type}); {total_weights:,} weights, "
            f"{total_bytes * 8 / total_weights:.2f} bits per weight")


def _tokenizer(md: dict) -> str:
    tokens = md.get("tokenizer.ggml.tokens")
    if tokens is None:
        return "none"
    parts = [f"{md.get('tokenizer.ggml.model', '?')} ({len(tokens)} tokens)"]
    for key in ("bos", "eos"):
        token_id = md.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and 0 <= token_id < len(tokens):
            parts.append(f"{key} {token_id} {tokens[token_id]!r}")
    parts.append("chat template" if "tokenizer.chat_template" in md else "no chat template")
    return ", ".join(parts)


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."
