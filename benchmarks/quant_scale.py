"""Quantizer at phi-3-mini scale: wall time and peak memory of `pocketlm quantize` on a 7.6 GB checkpoint.

    python benchmarks/make_phi3_mini_checkpoint.py            # once: ~/.cache/pocketlm/phi3-mini-random
    python benchmarks/quant_scale.py [--method rtn] [--recipe q4_0] [--calib-samples 4 --calib-len 128]
    python benchmarks/quant_scale.py --method gptq --layers 2,4   # a few layers, then extrapolate

Runs the real CLI in a child process and reads that process's peak resident set size (its
rusage from `os.wait4`, ru_maxrss, which also counts the checkpoint pages it maps).
`--layers A,B` quantizes truncated views of the checkpoint instead (a config.json with A, then B
decoder layers beside links to the same safetensors and tokenizer: the embedding and output head
are the full-size ones) and extrapolates the whole model's time linearly in the layer count,
per layer = (t_B - t_A) / (B - A); peak RSS does not grow with depth (one layer at a time).
Targets (issue 4): rtn under 5 minutes and under 4 GB. For comparison, measured on this machine by
the lead: llama.cpp's F16 -> Q4_0 quantize 13 s; ONNX Runtime GenAI's int4 builder 1 min 55 s and
23.2 GB peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_CKPT = Path.home() / ".cache" / "pocketlm" / "phi3-mini-random"
PEERS = {"llama.cpp quantize F16->Q4_0": (13.0, None), "ONNX Runtime GenAI int4 builder": (115.0, 23.2)}
TARGET_SECONDS, TARGET_GB = 300.0, 4.0


def truncated_view(ckpt: Path, layers: int, where: Path) -> Path:
    """A checkpoint folder with the first `layers` decoder layers of `ckpt` (links, no copies)."""
    out = where / f"layers{layers}"
    out.mkdir()
    config = json.loads((ckpt / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (out / "config.json").write_text(json.dumps(config))
    for f in ckpt.iterdir():
        if f.name != "config.json":
            (out / f.name).symlink_to(f.resolve())
    return out


def run_cli(args: argparse.Namespace, ckpt: Path) -> tuple[float, float]:
    """(seconds, peak RSS in GB) of one `pocketlm quantize` child process (its own rusage, os.wait4)."""
    cmd = [sys.executable, "-P", "-m", "pocketlm.cli", "quantize", str(ckpt), "-o", str(args.out),
           "--recipe", args.recipe, "--method", args.method, "--threads", str(args.threads),
           "--calib-samples", str(args.calib_samples), "--calib-len", str(args.calib_len)]
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - t0
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        sys.exit(f"quantize failed with exit code {child.returncode}")
    return seconds, usage.ru_maxrss * 1024 / 1e9  # ru_maxrss: KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", type=Path, default=DEFAULT_CKPT)
    ap.add_argument("--out", type=Path, default=Path("/tmp/pocketlm_quant_scale.gguf"))
    ap.add_argument("--recipe", default="q4_0")
    ap.add_argument("--method", default="rtn")
    ap.add_argument("--calib-samples", type=int, default=4)
    ap.add_argument("--calib-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", default=None,
                    help="A,B: quantize the first A and then B decoder layers only and extrapolate")
    ap.add_argument("--keep", action="store_true", help="keep the output file")
    args = ap.parse_args()
    if not (args.ckpt / "model.safetensors").is_file():
        sys.exit(f"{args.ckpt}: no checkpoint; run benchmarks/make_phi3_mini_checkpoint.py first")
    full_layers = json.loads((args.ckpt / "config.json").read_text())["num_hidden_layers"]
    if args.layers:
        a, b = (int(x) for x in args.layers.split(","))
        if not 0 < a < b <= full_layers:
            sys.exit(f"--layers A,B needs 0 < A < B <= {full_layers}")
        with tempfile.TemporaryDirectory() as tmp:
            t_a, peak_a = run_cli(args, truncated_view(args.ckpt, a, Path(tmp)))
            print(f"\n{a} layers: {t_a:.1f} s, peak RSS {peak_a:.2f} GB", flush=True)
            t_b, peak_b = run_cli(args, truncated_view(args.ckpt, b, Path(tmp)))
            print(f"\n{b} layers: {t_b:.1f} s, peak RSS {peak_b:.2f} GB", flush=True)
        per_layer = (t_b - t_a) / (b - a)
        seconds = t_b + (full_layers - b) * per_layer
        peak_gb = max(peak_a, peak_b)
        print(f"\npocketlm quantize {args.recipe} {args.method} (calibration {args.calib_samples} x "
              f"{args.calib_len}): {per_layer:.1f} s per decoder layer, {t_a - a * per_layer:.1f} s for the "
              f"rest (embedding, output head, start-up); {full_layers} layers extrapolated: {seconds:.0f} s "
              f"({seconds / 60:.1f} min); peak RSS {peak_gb:.2f} GB")
    else:
        seconds, peak_gb = run_cli(args, args.ckpt)
        size_gb = args.out.stat().st_size / 1e9
        ckpt_gb = (args.ckpt / "model.safetensors").stat().st_size / 1e9
        print(f"\npocketlm quantize {args.recipe} {args.method}: {seconds:.1f} s, peak RSS {peak_gb:.2f} GB, "
              f"output {size_gb:.2f} GB (checkpoint {ckpt_gb:.2f} GB)")
    if args.method == "rtn":
        print(f"target: < {TARGET_SECONDS:.0f} s and < {TARGET_GB:.0f} GB: "
              f"{'MET' if seconds < TARGET_SECONDS and peak_gb < TARGET_GB else 'NOT MET'}")
    for name, (peer_s, peer_gb) in PEERS.items():
        mem = f", memory x{peak_gb / peer_gb:.2f}" if peer_gb else ""
        print(f"vs {name}: time x{seconds / peer_s:.2f}{mem}")
    if not args.keep:
        args.out.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
