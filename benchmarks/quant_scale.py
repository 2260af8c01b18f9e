"""Quantizer at full size: wall time, CPU time, peak memory and the profile of one whole run.

    python benchmarks/make_phi3_mini_checkpoint.py     # once: ~/.cache/pocketlm/phi3-mini-random (7.6 GB)
    python benchmarks/quant_scale.py --method gptq --eval-tokens 2048 --llama --run   # issue 16, mini
    python benchmarks/quant_scale.py --method rtn --calib-samples 0       # issue 4's rtn run
    python benchmarks/make_phi3_medium_checkpoint.py   # 27.9 GB of sharded bf16, > this machine's RAM
    python benchmarks/quant_scale.py --ckpt ~/.cache/pocketlm/phi3-medium-random --method imatrix \\
        --calib-samples 16 --info --run
    python benchmarks/quant_scale.py --method gptq --layers 2    # a truncated view: the first 2 layers

The quantizer runs in a child process (`quantize_checkpoint`, what `pocketlm quantize` calls, with
its progress line and `Options.profile`, and the CLI's single-threaded OpenBLAS: the quantizer
spreads its own work over `--threads`), whose own rusage (`os.wait4`) gives its peak resident set
size (ru_maxrss, which also counts the checkpoint pages it maps) and CPU seconds. Its last stdout
line is the profile as JSON: wall seconds per part (pipeline.PROFILE_PARTS). The machine is
shared: the load average before and after is printed beside the times, and CPU seconds say what
the run itself cost.

After the run, on request: `--eval-tokens N` (`pocketlm eval` against the float checkpoint on
held-out text), `--llama` (llama-cpp-python loads the file and decodes 8 tokens), `--run`
(`pocketlm run -n 8`: its decode speed against the roofline, read bandwidth / bytes read per
token, with the bandwidth measured in the same run by pocketlm.hostinfo.read_bandwidth_gbs),
`--info` (`pocketlm info` on the checkpoint). Each is a child process with its own peak RSS.
`--layers K` quantizes a truncated view (config.json with K decoder layers beside links to the
same files; full embedding and output head) for profiling on short runs.

Targets: issue 16: gptq with the default 64 x 256 calibration at phi-3-mini shape <= 45 min and
<= 4 GB; phi-3-medium rtn and imatrix <= 6 GB. Issue 4: rtn at phi-3-mini shape < 5 min, < 4 GB.
Measured by the lead for comparison: llama.cpp's F16 -> Q4_0 quantize 13 s; ONNX Runtime GenAI's
int4 builder 1 min 55 s and 23.2 GB peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CKPT = Path.home() / ".cache" / "pocketlm" / "phi3-mini-random"
PEERS = {"llama.cpp quantize F16->Q4_0": (13.0, None), "ONNX Runtime GenAI int4 builder": (115.0, 23.2)}
TARGETS = {"rtn": (300.0, 4.0), "gptq": (45 * 60.0, 4.0)}  # mini: (seconds, GB)
MEDIUM_GB = 6.0
PROMPT = "The history of the river begins"

_CHILD = """
import json, os, sys
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as `pocketlm quantize` runs (pocketlm/cli.py)
from pocketlm.quantize.pipeline import Options, quantize_checkpoint
a = json.loads(sys.argv[1])
profile = {}
s = quantize_checkpoint(a["ckpt"], a["out"], recipe=a["recipe"], method=a["method"],
                        calib_samples=a["samples"], calib_len=a["len"], threads=a["threads"], progress=True,
                        options=Options(profile=profile))
print(s.text())
print(json.dumps({"profile": profile, "seconds": s.seconds, "fallbacks": s.fallbacks}))
"""

_LLAMA = """
import sys, time, llama_cpp
from llama_cpp import llama as L
default = llama_cpp.llama_model_default_params
def params():
    p = default(); p.use_extra_bufts = False; return p   # this build crashes in its AMX/repack path
L.llama_cpp.llama_model_default_params = params
t0 = time.perf_counter()
llm = llama_cpp.Llama(sys.argv[1], n_ctx=256, n_threads=int(sys.argv[2]), verbose=False)
t1 = time.perf_counter()
out = llm(sys.argv[3], max_tokens=8, temperature=0.0)
t2 = time.perf_counter()
print(f"llama.cpp: loaded in {t1 - t0:.1f} s, {out['usage']['completion_tokens']} tokens in {t2 - t1:.1f} s: "
      f"{out['choices'][0]['text']!r}")
"""


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


def child(cmd: list[str], capture: bool = False) -> tuple[float, float, float, str]:
    """(wall seconds, CPU seconds, peak RSS GB, stdout if captured) of one child process; exits
    with its message if it fails. stderr (progress lines) passes through."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE if capture else None, text=True)
    out = proc.stdout.read() if capture else ""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"{' '.join(cmd[:4])} ... failed with exit code {code}\n{out}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024 / 1e9, out  # ru_maxrss: KiB


def load() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def quantize(args: argparse.Namespace, ckpt: Path) -> dict:
    spec = {"ckpt": str(ckpt), "out": str(args.out), "recipe": args.recipe, "method": args.method,
            "samples": args.calib_samples, "len": args.calib_len, "threads": args.threads}
    print(f"quantize {ckpt} ({args.recipe} {args.method}, calibration {args.calib_samples} x "
          f"{args.calib_len}, threads {args.threads}); {load()}", flush=True)
    wall, cpu, peak, out = child([sys.executable, "-P", "-c", _CHILD, json.dumps(spec)], capture=True)
    lines = out.strip().splitlines()
    result = json.loads(lines[-1])
    print("\n".join(lines[:-1]))
    result.update(wall=wall, cpu=cpu, peak_gb=peak)
    print(f"\npocketlm quantize {args.recipe} {args.method}: {wall:.1f} s ({wall / 60:.1f} min) wall, "
          f"{cpu:.0f} s CPU, peak RSS {peak:.2f} GB, output {args.out.stat().st_size / 1e9:.2f} GB; {load()}")
    total = sum(result["profile"].values())
    print("profile (wall seconds of the parts; the rest is start-up, calibration tokenizing, the bar):")
    for part, sec in sorted(result["profile"].items(), key=lambda kv: -kv[1]):
        print(f"  {part:8s} {sec:8.1f} s  {100 * sec / max(wall, 1e-9):5.1f} %")
    print(f"  {'(parts)':8s} {total:8.1f} s")
    return result


def roofline_decode(args: argparse.Namespace) -> None:
    """`pocketlm run -n 8` on the file; its decode tok/s against read bandwidth / bytes per token."""
    from pocketlm.export.gguf_reader import GGUFReader
    from pocketlm.hostinfo import read_bandwidth_gbs

    with GGUFReader(args.out) as r:  # every weight is read once per decoded token (the embedding: one row)
        infos = list(r)
    per_token = sum(t.nbytes for t in infos if t.name != "token_embd.weight")
    bw = read_bandwidth_gbs(args.threads)
    cmd = [sys.executable, "-P", "-m", "pocketlm.cli", "run", str(args.out), "-p", PROMPT, "-n", "8",
           "--temp", "0", "--ignore-eos", "--threads", str(args.threads)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"pocketlm run failed: {proc.stderr.strip()}")
    m = re.search(r"generated (\d+) tokens, ([\d.]+) tok/s", proc.stderr)
    tps = float(m.group(2)) if m else float("nan")
    bw_after = read_bandwidth_gbs(args.threads)
    roof = max(bw, bw_after) * 1e9 / per_token
    print(f"pocketlm run -n 8 ({wall:.1f} s in all): {proc.stdout.strip()!r}")
    print(f"  decode {tps:.2f} tok/s; roofline {roof:.2f} tok/s = read bandwidth {bw:.1f} / {bw_after:.1f} "
          f"GB/s (before/after, best taken) / {per_token / 1e9:.2f} GB read per token: {tps / roof:.0%} of it")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", type=Path, default=DEFAULT_CKPT)
    ap.add_argument("--out", type=Path, default=Path("/tmp/pocketlm_quant_scale.gguf"))
    ap.add_argument("--recipe", default="q4_0")
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--calib-samples", type=int, default=64, help="(the CLI's default: 64)")
    ap.add_argument("--calib-len", type=int, default=256, help="(the CLI's default: 256)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=None, help="quantize only the first K decoder layers")
    ap.add_argument("--eval-tokens", type=int, default=0, help="then `pocketlm eval` on about N held-out tokens")
    ap.add_argument("--llama", action="store_true", help="then load and decode 8 tokens in llama.cpp")
    ap.add_argument("--run", action="store_true", help="then `pocketlm run -n 8` against the roofline")
    ap.add_argument("--info", action="store_true", help="`pocketlm info` on the checkpoint first")
    ap.add_argument("--keep", action="store_true", help="keep the output file")
    args = ap.parse_args()
    if not (args.ckpt / "config.json").is_file():
        sys.exit(f"{args.ckpt}: no checkpoint; run benchmarks/make_phi3_mini_checkpoint.py first")
    config = json.loads((args.ckpt / "config.json").read_text())
    if args.info:
        wall, _, peak, out = child([sys.executable, "-P", "-m", "pocketlm.cli", "info", str(args.ckpt)], True)
        print(f"pocketlm info ({wall:.1f} s, peak RSS {peak:.2f} GB):\n{out.rstrip()}\n")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.ckpt if args.layers is None else truncated_view(args.ckpt, args.layers, Path(tmp))
        result = quantize(args, ckpt)
    layers = args.layers or config["num_hidden_layers"]
    medium = config["hidden_size"] >= 5120
    target = None if args.layers else (("medium", None, MEDIUM_GB) if medium else
                                       (("mini",) + TARGETS[args.method]) if args.method in TARGETS else None)
    if target:
        _, seconds, gb = target
        ok = (seconds is None or result["wall"] <= seconds) and result["peak_gb"] <= gb
        limit = "" if seconds is None else f"<= {seconds / 60:.0f} min and "
        print(f"target ({target[0]}, {args.method}): {limit}<= {gb:.0f} GB: {'MET' if ok else 'NOT MET'}")
    print(f"{layers} decoder layers: {result['wall'] / layers:.1f} s wall per layer on average (incl. embedding, "
          f"head, start-up)")
    for name, (peer_s, peer_gb) in PEERS.items():
        mem = f", memory x{result['peak_gb'] / peer_gb:.2f}" if peer_gb else ""
        print(f"vs {name}: time x{result['wall'] / peer_s:.2f}{mem}")
    try:
        if args.eval_tokens:
            cmd = [sys.executable, "-P", "-m", "pocketlm.cli", "eval", str(args.out), "--ref", str(args.ckpt),
                   "--tokens", str(args.eval_tokens)]
            wall, _, peak, out = child(cmd, capture=True)
            print(f"\npocketlm eval ({wall:.0f} s, peak RSS {peak:.2f} GB):\n{out.rstrip()}")
        if args.llama:
            wall, _, peak, out = child([sys.executable, "-P", "-c", _LLAMA, str(args.out), str(args.threads), PROMPT],
                                       capture=True)
            print(f"{out.rstrip()} (peak RSS {peak:.2f} GB)")
        if args.run:
            roofline_decode(args)
    finally:
        if not args.keep:
            args.out.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
