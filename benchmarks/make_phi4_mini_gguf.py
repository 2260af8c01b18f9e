"""Build (once, cached) a phi-4-mini-shaped GGUF with random weights for the runtime benchmark.

    python benchmarks/make_phi4_mini_gguf.py --recipe q4_0     # ~2.3 GB

Shape of microsoft/Phi-4-mini-instruct's config.json (Phi3ForCausalLM: 32 layers, hidden 3072, 24
query / 8 key-value heads of 128, partial_rotary_factor 0.75 so RoPE turns 96 of them, ffn 8192,
vocab 200064, tied embeddings, context 131072 with LongRoPE from 4096), so the tied 200064 x 3072
output matrix takes its real share of every token. The vocabulary is the real Phi-3 one padded to
200064 entries (llama.cpp needs a vocabulary; its content does not change the speed), tensor types
from the project's recipes (the tied matrix takes the output's type). Random blocks
(benchmarks/random_gguf.py): only speed is measured on this file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from make_phi3_mini_gguf import VOCAB_GGUF
from random_gguf import build, cache_dir, ensure_built

from pocketlm.config import LongRope, Phi3Config, longrope_attention_factor
from pocketlm.export.gguf_reader import GGUFReader

ROT_HALF = 48  # LongRoPE factors per rotary frequency: 96 rotary values / 2
PHI4_MINI = Phi3Config(
    vocab_size=200064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=24,
    num_key_value_heads=8, max_position_embeddings=131072, original_max_position_embeddings=4096,
    rms_norm_eps=1e-5, rope_theta=10000.0, rotary_dim=96, tie_word_embeddings=True,
    rope_scaling=LongRope(short_factor=(1.0,) * ROT_HALF, long_factor=tuple(1.0 + i for i in range(ROT_HALF)),
                          attention_factor=longrope_attention_factor(131072, 4096)),
    bos_token_id=1, eos_token_id=32000).validate()


def cached_path(recipe: str) -> Path:
    return cache_dir() / f"phi4-mini-random-{recipe}.gguf"


def build_phi4(recipe: str, out: Path) -> Path:
    with GGUFReader(VOCAB_GGUF) as r:
        vocab = r.tokenizer_fields()
    return build(PHI4_MINI, vocab, recipe, out, "phi4-mini-random")


def ensure(recipe: str = "q4_0") -> Path:
    """The cached file for `recipe`, built if missing."""
    return ensure_built(cached_path(recipe), lambda path: build_phi4(recipe, path))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="q4_0", choices=("q4_0", "q4_k_m", "q8_0"))
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = ap.parse_args()
    if args.force and cached_path(args.recipe).is_file():
        cached_path(args.recipe).unlink()
    path = ensure(args.recipe)
    print(f"{path} ({path.stat().st_size / 1e9:.2f} GB)")


if __name__ == "__main__":
    main()
