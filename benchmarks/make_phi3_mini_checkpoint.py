"""Write a phi-3-mini-shaped checkpoint with random fp16 weights (7.6 GB), for quantizer scale runs.

    python benchmarks/make_phi3_mini_checkpoint.py [--out ~/.cache/pocketlm/phi3-mini-random]

Shapes and config are Phi-3-mini-4k-instruct's (32 layers, hidden 3072, ffn 8192, 32 heads, vocab
32064); the tokenizer is the real Phi-3 vocabulary from `shared/data/phi3/ggml-vocab-phi-3.gguf`.
Weights ~ N(0, 0.02), norms ~ 1 + N(0, 0.05). The safetensors file is streamed: the header (with
every tensor's offsets) first, then each tensor generated and written in 16M-value chunks, so the
script itself stays at a few hundred MB whatever the model size. Nothing is rewritten if the folder
already holds a complete checkpoint. It lives outside the repository: delete it when done.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from pocketlm.config import Phi3Config, tensor_specs  # noqa: E402

DEFAULT_OUT = Path.home() / ".cache" / "pocketlm" / "phi3-mini-random"
VOCAB = REPO.parent / "shared" / "data" / "phi3" / "ggml-vocab-phi-3.gguf"
CHUNK = 1 << 24  # values generated per write

PHI3_MINI = Phi3Config(
    vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
    original_max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
    sliding_window=2047, bos_token_id=1, eos_token_id=32000, pad_token_id=32000)


def safetensors_header(specs) -> tuple[bytes, int]:
    """(8-byte length + JSON header padded to 8 bytes, data bytes) for F16 tensors in spec order."""
    entries, offset = {}, 0
    for s in specs:
        nbytes = math.prod(s.shape) * 2
        entries[s.hf_name] = {"dtype": "F16", "shape": list(s.shape),
                              "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    entries["__metadata__"] = {"format": "pt"}
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offset


def write_tensor(f, shape: tuple[int, ...], kind: str, rng: np.random.Generator) -> None:
    n = math.prod(shape)
    for start in range(0, n, CHUNK):
        count = min(CHUNK, n - start)
        x = rng.standard_normal(count, dtype=np.float32)
        x = 1.0 + 0.05 * x if kind == "norm" else 0.02 * x
        f.write(x.astype(np.float16).tobytes())


def write_checkpoint(out: Path, cfg: Phi3Config = PHI3_MINI, seed: int = 0) -> Path:
    from pocketlm.export.gguf_reader import GGUFReader
    from pocketlm.tokenizer import Tokenizer

    out.mkdir(parents=True, exist_ok=True)
    target = out / "model.safetensors"
    specs = [s for s in tensor_specs(cfg) if s.hf_name is not None]
    header, data_bytes = safetensors_header(specs)
    if target.is_file() and target.stat().st_size == len(header) + data_bytes:
        print(f"{target} already complete ({target.stat().st_size / 1e9:.2f} GB)")
        return out
    rng = np.random.default_rng(seed)
    tmp = target.with_suffix(".tmp")
    t0 = time.perf_counter()
    with open(tmp, "wb") as f:
        f.write(header)
        for i, s in enumerate(specs):
            write_tensor(f, s.shape, s.kind, rng)
            print(f"\r{i + 1}/{len(specs)} tensors, {f.tell() / 1e9:.2f} GB, "
                  f"{time.perf_counter() - t0:.0f} s", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    os.replace(tmp, target)
    hf = cfg.to_hf_dict()
    hf["torch_dtype"] = "float16"
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    with GGUFReader(VOCAB) as r:
        Tokenizer.from_gguf_fields(r.tokenizer_fields(), VOCAB).write_hf_files(out)
    print(f"wrote {out}: {target.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    write_checkpoint(args.out, seed=args.seed)


if __name__ == "__main__":
    main()
