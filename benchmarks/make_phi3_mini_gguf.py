"""Build (once, cached) a phi-3-mini-shaped GGUF with random weights for the runtime benchmark.

    python benchmarks/make_phi3_mini_gguf.py --recipe q4_0     # ~2.2 GB, a few seconds to a minute

Shape of microsoft/Phi-3-mini-4k-instruct (32 layers, hidden 3072, 32 heads, ffn 8192, vocab 32064,
context 4096), the real Phi-3 vocabulary from `shared/data/phi3/ggml-vocab-phi-3.gguf`, tensor
types from the project's recipes (q4_0: Q4_0 with output Q6_K; q4_k_m: Q4_K/Q6_K mix; q8_0).

Weights are random blocks, not quantized floats: random code bytes with every scale field set to a
finite fp16 value sized so that the weights have a standard deviation near 0.02 (what a trained
model has), which keeps activations finite through 32 layers. Only speed is measured on this file.
Written with the project's GGUF writer, one tensor at a time (never the whole model in memory),
to ~/.cache/pocketlm (or $POCKETLM_CACHE), atomically.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from pocketlm.config import Phi3Config, tensor_specs
from pocketlm.export.gguf_export import phi3_gguf_metadata
from pocketlm.export.gguf_reader import GGUFReader
from pocketlm.export.gguf_writer import GGUFWriter
from pocketlm.quantize.formats import BLOCK_SHAPE, GGMLType
from pocketlm.quantize.recipes import get_recipe

REPO = Path(__file__).resolve().parents[1]
VOCAB_GGUF = REPO.parent / "shared" / "data" / "phi3" / "ggml-vocab-phi-3.gguf"
T = GGMLType

PHI3_MINI = Phi3Config(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       original_max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                       sliding_window=2047, bos_token_id=1, eos_token_id=32000)
ROWS_PER_CHUNK = 1024  # rows generated at a time (bounds memory)


def cache_dir() -> Path:
    return Path(os.environ.get("POCKETLM_CACHE", Path.home() / ".cache" / "pocketlm"))


def cached_path(recipe: str) -> Path:
    return cache_dir() / f"phi3-mini-random-{recipe}.gguf"


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


def build(recipe: str, out: Path, seed: int = 0) -> Path:
    cfg = PHI3_MINI
    with GGUFReader(VOCAB_GGUF) as r:
        vocab = r.tokenizer_fields()
    rec = get_recipe(recipe)
    types = rec.tensor_types(cfg)
    md = phi3_gguf_metadata(cfg, vocab, name="phi3-mini-random", file_type=rec.file_type, recipe=recipe,
                            method="random")
    specs = tensor_specs(cfg)
    rng = np.random.default_rng(seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    with GGUFWriter(out, md, [(s.name, types[s.name], s.shape) for s in specs]) as w:
        for s in specs:
            t = types[s.name]
            if t == T.F32:
                w.write_tensor(s.name, np.ones(s.shape, np.float32))
                continue
            rows, k = s.shape
            per_row = k // BLOCK_SHAPE[t][0]
            raw = np.concatenate([random_blocks(rng, t, min(ROWS_PER_CHUNK, rows - r0) * per_row).reshape(-1)
                                  for r0 in range(0, rows, ROWS_PER_CHUNK)])
            w.write_tensor(s.name, raw)
    return out


def ensure(recipe: str = "q4_0") -> Path:
    """The cached file for `recipe`, built if missing."""
    path = cached_path(recipe)
    if not path.is_file():
        print(f"building {path} (once) ...", file=sys.stderr, flush=True)
        build(recipe, path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="q4_0", choices=("q4_0", "q4_k_m", "q8_0"))
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = ap.parse_args()
    path = cached_path(args.recipe)
    if args.force or not path.is_file():
        build(args.recipe, path)
    print(f"{path} ({path.stat().st_size / 1e9:.2f} GB)")


if __name__ == "__main__":
    main()
