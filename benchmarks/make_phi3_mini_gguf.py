"""Build (once, cached) a phi-3-mini-shaped GGUF with random weights for the runtime benchmark.

    python benchmarks/make_phi3_mini_gguf.py --recipe q4_0     # ~2.2 GB, a few seconds to a minute

Shape of microsoft/Phi-3-mini-4k-instruct (32 layers, hidden 3072, 32 heads, ffn 8192, vocab 32064,
context 4096), the real Phi-3 vocabulary from `shared/data/phi3/ggml-vocab-phi-3.gguf`, tensor
types from the project's recipes (q4_0: Q4_0 with output Q6_K; q4_k_m: Q4_K/Q6_K mix; q8_0).
Random blocks (benchmarks/random_gguf.py): only speed is measured on this file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from random_gguf import build, cache_dir, ensure_built

from pocketlm.config import Phi3Config
from pocketlm.export.gguf_reader import GGUFReader

REPO = Path(__file__).resolve().parents[1]
VOCAB_GGUF = REPO.parent / "shared" / "data" / "phi3" / "ggml-vocab-phi-3.gguf"

PHI3_MINI = Phi3Config(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       original_max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                       sliding_window=2047, bos_token_id=1, eos_token_id=32000)


def cached_path(recipe: str) -> Path:
    return cache_dir() / f"phi3-mini-random-{recipe}.gguf"


def build_mini(recipe: str, out: Path, seed: int = 0) -> Path:
    with GGUFReader(VOCAB_GGUF) as r:
        vocab = r.tokenizer_fields()
    return build(PHI3_MINI, vocab, recipe, out, "phi3-mini-random", seed)


def ensure(recipe: str = "q4_0") -> Path:
    """The cached file for `recipe`, built if missing."""
    return ensure_built(cached_path(recipe), lambda path: build_mini(recipe, path))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="q4_0", choices=("q4_0", "q4_k_m", "q8_0"))
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = ap.parse_args()
    path = cached_path(args.recipe)
    if args.force or not path.is_file():
        build_mini(args.recipe, path)
    print(f"{path} ({path.stat().st_size / 1e9:.2f} GB)")


if __name__ == "__main__":
    main()
