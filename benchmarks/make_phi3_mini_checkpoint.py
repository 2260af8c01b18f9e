"""Write a phi-3-mini-shaped checkpoint with random fp16 weights (7.6 GB), for quantizer scale runs.

    python benchmarks/make_phi3_mini_checkpoint.py [--out ~/.cache/pocketlm/phi3-mini-random]

(`write_checkpoint` also writes sharded bf16 checkpoints: make_phi3_medium_checkpoint.py.)

Shapes and config are Phi-3-mini-4k-instruct's (32 layers, hidden 3072, ffn 8192, 32 heads, vocab
32064); the tokenizer is the real Phi-3 vocabulary from `shared/data/phi3/ggml-vocab-phi-3.gguf`.
Weights ~ N(0, 0.02), norms ~ 1 + N(0, 0.05). The safetensors file is streamed: the header (with
every tensor's offsets) first, then each tensor generated and written in 16M-value chunks, so the
script itself stays at a few hundred MB whatever the model size. With `shard_bytes` the tensors are
split over several files (`model-0000k-of-0000n.safetensors`, whole tensors, in spec order) named by a
`model.safetensors.index.json`, each shard streamed to disk and renamed into place when complete.
Nothing is rewritten if the folder already holds a complete checkpoint (complete shards are kept
on a rerun). It lives outside the repository: delete it when done.
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
from pocketlm.config import Phi3Config, tensor_specs  # noqa: E402

DEFAULT_OUT = Path.home() / ".cache" / "pocketlm" / "phi3-mini-random"
VOCAB = REPO.parent / "shared" / "data" / "phi3" / "ggml-vocab-phi-3.gguf"
CHUNK = 1 << 24  # values generated per write

PHI3_MINI = Phi3Config(
    vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
    original_max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
    sliding_window=2047, bos_token_id=1, eos_token_id=32000, pad_token_id=32000)


def safetensors_header(specs, dtype: str = "F16") -> tuple[bytes, int]:
    """(8-byte length + JSON header padded to 8 bytes, data bytes) for F16/BF16 tensors in spec order."""
    entries, offset = {}, 0
    for s in specs:
        nbytes = math.prod(s.shape) * 2
        entries[s.hf_name] = {"dtype": dtype, "shape": list(s.shape),
                              "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    entries["__metadata__"] = {"format": "pt"}
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offset


def to_storage(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> the stored 16-bit values: F16, or BF16 bits (round to nearest even) as uint16."""
    if dtype == "F16":
        return x.astype(np.float16)
    bits = x.view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


BF16_MASK, BF16_BASE = 0x81FF, 0x3C00  # sign, 2 low exponent bits, 7 mantissa bits random; exponent 120..123


def write_tensor(f, shape: tuple[int, ...], kind: str, rng: np.random.Generator, dtype: str = "F16") -> None:
    """F16: weights ~ N(0, 0.02), norms ~ 1 + N(0, 0.05). BF16 (the 28 GB phi-3-medium): the weights
    are random bits instead, one 16-bit draw per value (about 20x cheaper than normals, which on this
    shared machine would take hours): random sign and mantissa, magnitudes log-uniform in
    [2^-7, 2^-3) (mean |w| 0.044); norms as for F16."""
    n = math.prod(shape)
    for start in range(0, n, CHUNK):
        count = min(CHUNK, n - start)
        if dtype == "BF16" and kind != "norm":
            bits = np.frombuffer(rng.bytes(2 * count), dtype=np.uint16)
            f.write(((bits & np.uint16(BF16_MASK)) | np.uint16(BF16_BASE)).tobytes())
            continue
        x = rng.standard_normal(count, dtype=np.float32)
        x = 1.0 + 0.05 * x if kind == "norm" else 0.02 * x
        f.write(to_storage(x, dtype).tobytes())


def split_shards(specs, shard_bytes: int | None) -> list[list]:
    """Specs in order, cut into runs of whole tensors of about shard_bytes (None: one file)."""
    if shard_bytes is None:
        return [list(specs)]
    shards: list[list] = [[]]
    size = 0
    for s in specs:
        nbytes = math.prod(s.shape) * 2
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += nbytes
    return shards


def write_checkpoint(out: Path, cfg: Phi3Config = PHI3_MINI, seed: int = 0, dtype: str = "F16",
                     shard_bytes: int | None = None) -> Path:
    """The random checkpoint in `out` (dtype F16 or BF16; shard_bytes: sharded, see the module doc)."""
    from pocketlm.export.gguf_reader import GGUFReader
    from pocketlm.tokenizer import Tokenizer

    out.mkdir(parents=True, exist_ok=True)
    specs = [s for s in tensor_specs(cfg) if s.hf_name is not None]
    shards = split_shards(specs, shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    t0 = time.perf_counter()
    done = 0
    for k, (name, shard) in enumerate(zip(names, shards, strict=True)):
        target = out / name
        header, data_bytes = safetensors_header(shard, dtype)
        rng = np.random.default_rng([seed, k])  # a shard's values do not depend on the others
        if target.is_file() and target.stat().st_size == len(header) + data_bytes:
            print(f"{target} already complete ({target.stat().st_size / 1e9:.2f} GB)")
            done += len(shard)
            continue
        tmp = target.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(header)
            for s in shard:
                write_tensor(f, s.shape, s.kind, rng, dtype)
                done += 1
                print(f"\rshard {k + 1}/{len(shards)}: {done}/{len(specs)} tensors, {f.tell() / 1e9:.2f} GB, "
                      f"{time.perf_counter() - t0:.0f} s", end="", file=sys.stderr, flush=True)
        os.replace(tmp, target)
    print(file=sys.stderr)
    if len(shards) > 1:
        weight_map = {s.hf_name: name for name, shard in zip(names, shards, strict=True) for s in shard}
        total = sum(math.prod(s.shape) * 2 for s in specs)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    hf = cfg.to_hf_dict()
    hf["torch_dtype"] = "float16" if dtype == "F16" else "bfloat16"
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    with GGUFReader(VOCAB) as r:
        Tokenizer.from_gguf_fields(r.tokenizer_fields(), VOCAB).write_hf_files(out)
    size = sum((out / n).stat().st_size for n in names)
    print(f"wrote {out}: {len(names)} file(s), {size / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    write_checkpoint(args.out, seed=args.seed)


if __name__ == "__main__":
    main()
