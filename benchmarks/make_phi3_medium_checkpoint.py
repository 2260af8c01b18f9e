"""Write a phi-3-medium-shaped checkpoint with random bf16 weights (27.9 GB in 6 shards), for the
quantizer's larger-than-RAM run (benchmarks/quant_scale.py --ckpt ...).

    python benchmarks/make_phi3_medium_checkpoint.py [--out ~/.cache/pocketlm/phi3-medium-random]

Shapes and config are Phi-3-medium-4k-instruct's: 40 layers, hidden 5120, ffn 17920, 40 query heads
and 10 key/value heads of 128 (GQA), vocab 32064, 14.0 B parameters. Tensors are generated and
written shard by shard (make_phi3_mini_checkpoint.write_checkpoint: 16M values at a time, each
shard renamed into place when complete), so this script needs a few hundred MB of memory, not
28 GB. It lives outside the repository: delete it when done.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from make_phi3_mini_checkpoint import write_checkpoint  # noqa: E402

from pocketlm.config import Phi3Config  # noqa: E402

DEFAULT_OUT = Path.home() / ".cache" / "pocketlm" / "phi3-medium-random"
SHARD_BYTES = 5 * 10**9  # Microsoft's phi-3-medium ships 6 shards of about 5 GB

PHI3_MEDIUM = Phi3Config(
    vocab_size=32064, hidden_size=5120, intermediate_size=17920, num_hidden_layers=40,
    num_attention_heads=40, num_key_value_heads=10, max_position_embeddings=4096,
    original_max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
    sliding_window=2047, bos_token_id=1, eos_token_id=32000, pad_token_id=32000)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    write_checkpoint(args.out, PHI3_MEDIUM, seed=args.seed, dtype="BF16", shard_bytes=SHARD_BYTES)


if __name__ == "__main__":
    main()
