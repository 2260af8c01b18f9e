"""Random-weight GGUF files of a given model description, for speed benchmarks only.

Weights are random blocks, not quantized floats: random code bytes with every scale field set to a
finite fp16 value sized so that the weights have a standard deviation near 0.02 (what a trained
model has), which keeps activations finite through every layer. Written with the project's GGUF
writer one tensor at a time (never the whole model in memory), atomically, under
~/.cache/pocketlm (or $POCKETLM_CACHE).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pocketlm.config import Phi3Config, tensor_specs
from pocketlm.export.gguf_export import phi3_gguf_metadata
from pocketlm.export.gguf_writer import GGUFWriter
from pocketlm.quantize.formats import BLOCK_SHAPE, GGMLType
from pocketlm.quantize.recipes import get_recipe

T = GGMLType
ROWS_PER_CHUNK = 1024  # rows generated at a time (bounds memory)


def cache_dir() -> Path:
    return Path(os.environ.get("POCKETLM_CACHE", Path.home() / ".cache" / "pocketlm"))


def ensure_built(path: Path, make: Callable[[Path], object]) -> Path:
    """`path`, built once by make(path) if missing (the build says so on stderr: minutes, GBs)."""
    if not path.is_file():
        print(f"building {path} (once) ...", file=sys.stderr, flush=True)
        make(path)
    return path


def fp16_bytes(values: np.ndarray) -> np.ndarray:
    """float values [n] -> their fp16 little-endian bytes [n, 2]."""
    return values.astype("<f2").view(np.uint8).reshape(-1, 2)


def random_blocks(rng: np.random.Generator, gtype: GGMLType, n_blocks: int) -> np.ndarray:
    """[n_blocks, block bytes] of random codes with sane scales (weight std ~0.02)."""
    _, size = BLOCK_SHAPE[gtype]
    b = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    jitter = rng.uniform(0.75, 1.25, n_blocks)
    if gtype == T.Q4_0:      # d | 16 B: (q - 8) has std 4.6
        b[:, 0:2] = fp16_bytes(0.02 / 4.6 * jitter)
    elif gtype == T.Q4_1:    # d | m | 16 B: q*d + m, q std 4.6, mean 7.5
        b[:, 0:2] = fp16_bytes(0.02 / 4.6 * jitter)
        b[:, 2:4] = fp16_bytes(-7.5 * 0.02 / 4.6 * jitter)
    elif gtype == T.Q8_0:    # d | 32 int8: q std 74
        b[:, 0:2] = fp16_bytes(0.02 / 74 * jitter)
    elif gtype == T.Q4_K:    # d | dmin | 12 B 6-bit scales/mins (mean ~32) | 128 B
        b[:, 0:2] = fp16_bytes(0.02 / (4.6 * 32) * jitter)
        b[:, 2:4] = fp16_bytes(7.5 * 0.02 / (4.6 * 32) * jitter)
    elif gtype == T.Q6_K:    # 128 B ql | 64 B qh | 16 int8 scales | d: (q - 32) std 18.5
        b[:, 192:208] = rng.integers(1, 64, size=(n_blocks, 16), dtype=np.int8).view(np.uint8)
        b[:, 208:210] = fp16_bytes(0.02 / (18.5 * 32) * jitter)
    else:
        raise ValueError(f"no random block generator for {gtype.name}")
    return b


def build(cfg: Phi3Config, vocab: dict, recipe: str, out: Path, name: str, seed: int = 0) -> Path:
    """Write a GGUF of `cfg` with random blocks of `recipe`'s types and the tokenizer fields `vocab`;
    norm weights 1, biases and norm biases 0 (F32)."""
    rec = get_recipe(recipe)
    types = rec.tensor_types(cfg)
    md = phi3_gguf_metadata(cfg, vocab, name=name, file_type=rec.file_type, recipe=recipe, method="random")
    specs = tensor_specs(cfg)
    rng = np.random.default_rng(seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    with GGUFWriter(out, md, [(s.name, types[s.name], s.shape) for s in specs]) as w:
        for s in specs:
            t = types[s.name]
            if t == T.F32:
                fill = np.zeros if s.name.endswith(".bias") else np.ones
                w.write_tensor(s.name, fill(s.shape, np.float32))
                continue
            rows, k = s.shape
            per_row = k // BLOCK_SHAPE[t][0]
            raw = np.concatenate([random_blocks(rng, t, min(ROWS_PER_CHUNK, rows - r0) * per_row).reshape(-1)
                                  for r0 in range(0, rows, ROWS_PER_CHUNK)])
            w.write_tensor(s.name, raw)
    return out
