"""Scale of the GGUF -> ONNX exporter on a phi-3-mini-shaped Q4_0 GGUF (about 2.2 GB).

    python benchmarks/onnx_export_scale.py [--gguf FILE] [--speed]

Targets (issue 3): under 3 minutes and under 1.5x the GGUF size in peak RSS. The export runs in a
child process so its peak RSS is measured alone (`ru_maxrss` of the child). Without --gguf it uses
`benchmarks/make_phi3_mini_gguf.py`'s cached q4_0 file when that script exists, else it writes its
own to ~/.cache/pocketlm: phi-3-mini shapes (32 layers, hidden 3072, ffn 8192, vocab 32064), the real
Phi-3 vocabulary, random Q4_0 blocks (output Q6_K as llama.cpp's Q4_0 file type) - the exporter's
cost does not depend on the values.

The export time includes the default `--accuracy-level auto` probe (128 tokens at level 1 and at
level 4, onnx_accuracy), which runs on every export.

--speed also times greedy decoding with onnxruntime: the default export (auto: level 4, int8
activations, 8-bit layers whole, when the probe accepts it) against an export at accuracy_level 1
(float32 activations, 8-bit layers split in 4-bit halves). benchmarks/onnx_vs_builder.py is the
full comparison (onnxruntime-genai, the model builder's output, pocketlm, llama.cpp).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CACHE = Path.home() / ".cache" / "pocketlm"
PHI3_MINI = dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                 original_max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5,
                 bos_token_id=1, eos_token_id=32000, sliding_window=2047)


def random_blocks(rng: np.random.Generator, rows: int, row_bytes: int, block_bytes: int,
                  scale_offsets: tuple[int, ...]) -> np.ndarray:
    """Random quantized rows whose fp16 scale fields hold sane values (1e-3..1e-2)."""
    raw = rng.integers(0, 256, (rows, row_bytes), dtype=np.uint8)
    blocks = raw.reshape(rows, -1, block_bytes)
    for off in scale_offsets:
        d = rng.uniform(1e-3, 1e-2, blocks.shape[:2]).astype(np.float16)
        blocks[..., off:off + 2] = d.view(np.uint8).reshape(*blocks.shape[:2], 2)
    return raw


def build_gguf(path: Path) -> Path:
    """Write a phi-3-mini-shaped Q4_0 GGUF tensor by tensor (no whole-model array in memory)."""
    from pocketlm.config import Phi3Config, tensor_specs
    from pocketlm.export.gguf_export import phi3_gguf_metadata
    from pocketlm.export.gguf_reader import GGUFReader
    from pocketlm.export.gguf_writer import GGUFWriter
    from pocketlm.quantize.formats import GGMLType

    cfg = Phi3Config(**PHI3_MINI).validate()
    with GGUFReader(SHARED / "data" / "phi3" / "ggml-vocab-phi-3.gguf") as vocab:
        fields = vocab.tokenizer_fields()
    md = phi3_gguf_metadata(cfg, fields, name="phi3-mini-random", file_type=2, recipe="q4_0", method="random")
    specs = tensor_specs(cfg)

    def gtype(s):
        if s.kind == "norm":
            return GGMLType.F32
        return GGMLType.Q6_K if s.name == "output.weight" else GGMLType.Q4_0

    rng = np.random.default_rng(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with GGUFWriter(path, md, [(s.name, gtype(s), s.shape) for s in specs]) as w:
        for s in specs:
            t = gtype(s)
            if t == GGMLType.F32:
                w.write_tensor(s.name, rng.uniform(0.5, 1.5, s.shape).astype(np.float32))
                continue
            rows, k = s.shape
            if t == GGMLType.Q4_0:
                w.write_tensor(s.name, random_blocks(rng, rows, k // 32 * 18, 18, (0,)))
            else:
                w.write_tensor(s.name, random_blocks(rng, rows, k // 256 * 210, 210, (208,)))
    return path


def default_gguf() -> Path:
    maker = REPO / "benchmarks" / "make_phi3_mini_gguf.py"
    if maker.is_file():
        spec = importlib.util.spec_from_file_location("make_phi3_mini_gguf", maker)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return Path(mod.ensure("q4_0"))
    path = CACHE / "onnx-bench-phi3-mini-q4_0.gguf"
    if not path.is_file():
        print(f"writing {path} (one-time) ...", flush=True)
        t0 = time.time()
        build_gguf(path)
        print(f"  {path.stat().st_size / 1e9:.2f} GB in {time.time() - t0:.0f} s", flush=True)
    return path


def export_child(gguf_path: Path, out: Path, level: int | None) -> tuple[float, int]:
    """Run the export in a child process -> (wall seconds, peak RSS bytes of the child)."""
    code = ("import sys; from pocketlm.export.onnx_export import export_onnx; "
            "lvl = None if sys.argv[3] == 'default' else int(sys.argv[3]); "
            "export_onnx(sys.argv[1], sys.argv[2], accuracy_level=lvl, progress=False)")
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.time()
    lvl = "default" if level is None else str(level)
    subprocess.run([sys.executable, "-P", "-c", code, str(gguf_path), str(out), lvl], check=True)
    wall = time.time() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak <= before:
        print("  (note: peak RSS of this child did not exceed an earlier child's)")
    return wall, peak * 1024


def decode_speed(folder: Path, n_tokens: int = 16, prompt_len: int = 32) -> tuple[float, float]:
    """(prompt tokens/s, generated tokens/s) of greedy decoding of the folder's model with onnxruntime."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    kv_shape = sess.get_inputs()[2].shape
    kv = {i.name: np.zeros((1, kv_shape[1], 0, kv_shape[3]), np.float32) for i in sess.get_inputs()[2:]}
    ids = list(range(100, 100 + prompt_len))
    t0 = time.time()
    out = sess.run(None, {"input_ids": np.array([ids], np.int64),
                          "attention_mask": np.ones((1, len(ids)), np.int64), **kv})
    prompt_s = time.time() - t0
    total = len(ids)
    t0 = time.time()
    for _ in range(n_tokens):
        kv = {n.replace("present", "past_key_values"): v for n, v in zip(names[1:], out[1:], strict=True)}
        tok = int(np.argmax(out[0][0, -1]))
        total += 1
        out = sess.run(None, {"input_ids": np.array([[tok]], np.int64),
                              "attention_mask": np.ones((1, total), np.int64), **kv})
    gen_s = time.time() - t0
    return prompt_len / prompt_s, n_tokens / gen_s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, help="GGUF to export (default: a phi-3-mini-shaped Q4_0 file)")
    ap.add_argument("--out", type=Path, default=CACHE / "phi3-mini-random-onnx")
    ap.add_argument("--speed", action="store_true", help="also time decoding: the default export and level 1")
    args = ap.parse_args()
    gguf_path = args.gguf or default_gguf()
    size = gguf_path.stat().st_size
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; GGUF {gguf_path} "
          f"({size / 1e9:.2f} GB)", flush=True)
    wall, peak = export_child(gguf_path, args.out, None)
    out_size = sum(f.stat().st_size for f in args.out.iterdir() if f.name.startswith("model.onnx"))
    print(f"export: {wall:.1f} s (target < 180 s: {wall / 180:.2f}x of budget), "
          f"peak RSS {peak / 1e9:.2f} GB = {peak / size:.2f}x the GGUF size (target < 1.5x), "
          f"ONNX model {out_size / 1e9:.2f} GB")
    if args.speed:
        pp, tg = decode_speed(args.out)
        from pocketlm.export.onnx_info import accuracy_levels

        print(f"onnxruntime, default export (auto: accuracy_level {accuracy_levels(args.out)}): prompt "
              f"{pp:.1f} tok/s, generation {tg:.2f} tok/s", flush=True)
        out1 = args.out.with_name(args.out.name + "-level1")
        wall1, _ = export_child(gguf_path, out1, 1)
        pp, tg = decode_speed(out1)
        print(f"onnxruntime, --accuracy-level 1 export ({wall1:.0f} s): prompt {pp:.1f} tok/s, "
              f"generation {tg:.2f} tok/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
