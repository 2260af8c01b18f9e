"""Our ONNX export against onnxruntime-genai's model builder, from the same checkpoint, in one run.

    python benchmarks/onnx_vs_builder.py [--layers 8] [--threads 1,2] [--prompt 128] [--gen 64]
                                         [--repeats 2] [--only "ROW;ROW"] [--skip "ROW;ROW"]
                                         [--row NAME=ONNX_FOLDER ...] [--json out.json]

The checkpoint: phi-3-mini-shaped (hidden 3072, 32 heads, ffn 8192, vocab 32064) with --layers layers
of random fp16 weights (benchmarks/make_phi3_mini_checkpoint.py; cached in $POCKETLM_CACHE, default
~/.cache/pocketlm). From it:
  - builder int4: `python -m onnxruntime_genai.models.builder -m CKPT -o OUT -p int4 -e cpu
    --extra_options int4_accuracy_level=4` (Microsoft's recipe for its CPU/mobile int4 Phi-3 models:
    RTN, block 32, symmetric, int8 activations); build time and the child's peak RSS are printed;
  - pocketlm's GGUFs (`pocketlm quantize --method rtn`): q4_0 (llama.cpp's Q4_0 file type: output
    Q6_K), q4_k_m, and q4_0_pure (output Q4_0 too: the builder's bits); each exported by `pocketlm
    export --onnx` with the default (auto) level, Q4_0 also at --accuracy-level 1 and 4, Q4_K_M at 1.
Every ONNX folder runs in onnxruntime-genai, the GGUFs in pocketlm's runtime and llama.cpp, each in
a fresh child process (pocketlm.bench's engine children: random prompt of --prompt ordinary tokens,
--gen greedy tokens forced by min_length), at each thread count, engines interleaved within a
repeat, best of --repeats. Ratios are against the builder's output at the same thread count.
--only / --skip leave out rows and the GGUFs and exports only they need; an export is redone when
the installed exporter's source differs from the one that made it; --row adds a folder made elsewhere
(say, by the exporter before a change) as one more row of the same interleaved run.
benchmarks/onnx_profile.py says where the time goes, per operator, in two folders.
The builder needs `onnx_ir` (in pocketlm's `dev` extra: `pip install '.[dev]'`).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# $POCKETLM_CACHE as everywhere else in pocketlm (so parallel work keeps its outputs apart)
CACHE = Path(os.environ.get("POCKETLM_CACHE", Path.home() / ".cache" / "pocketlm"))


def _maker():
    spec = importlib.util.spec_from_file_location("make_phi3_mini_checkpoint",
                                                  REPO / "benchmarks" / "make_phi3_mini_checkpoint.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def checkpoint(layers: int) -> Path:
    mod = _maker()
    out = CACHE / f"phi3-mini-random-{layers}l"
    mod.write_checkpoint(out, dataclasses.replace(mod.PHI3_MINI, num_hidden_layers=layers))
    return out


def child_cost(cmd: list[str]) -> tuple[float, float]:
    """Run cmd -> (wall seconds, its peak RSS in GB; ru_maxrss of the largest child so far)."""
    t0 = time.time()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.time() - t0, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6


def build_builder(ckpt: Path, out: Path) -> str:
    if (out / "genai_config.json").is_file():
        return "cached"
    wall, rss = child_cost([sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(ckpt), "-o",
                            str(out), "-p", "int4", "-e", "cpu", "-c", str(out.with_name(out.name + "-hf")),
                            "--extra_options", "int4_accuracy_level=4"])
    return f"{wall:.0f} s, peak RSS <= {rss:.1f} GB"


# llama.cpp's `--pure` Q4_0: every linear and the output Q4_0, the builder's bit budget (its lm_head
# is int4 too); pocketlm has no such recipe, so it is registered in the child for this benchmark.
PURE_Q4_0 = ("from pocketlm.quantize import recipes as r; from pocketlm.quantize.formats import GGMLType as T; "
             "r.RECIPES['q4_0_pure'] = r.Recipe('q4_0_pure', 'every linear and the output Q4_0', 2, "
             "lambda spec, cfg: T.Q4_0); ")


def build_gguf(ckpt: Path, recipe: str, out: Path) -> str:
    if out.is_file():
        return "cached"
    code = (PURE_Q4_0 + "import sys; from pocketlm.quantize.pipeline import quantize_checkpoint; "
            "quantize_checkpoint(sys.argv[1], sys.argv[2], recipe=sys.argv[3], method='rtn')")
    wall, _ = child_cost([sys.executable, "-P", "-c", code, str(ckpt), str(out), recipe])
    return f"{wall:.0f} s"


def exporter_key() -> str:
    """A hash of the installed exporter's source: a cached export made by other code is redone."""
    import hashlib

    import pocketlm.export as pkg

    h = hashlib.sha1()
    for f in sorted(Path(pkg.__file__).parent.glob("*.py")):
        if f.name.startswith(("onnx_", "genai_")):
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def export(gguf: Path, out: Path, level: str) -> str:
    """pocketlm export --onnx at `level` ("auto" is the default); -> the level it wrote and why."""
    meta, stamp = out / "model.onnx", out.parent / f"{out.name}.exporter.txt"
    key = exporter_key()
    if (not meta.is_file() or meta.stat().st_mtime < gguf.stat().st_mtime
            or not stamp.is_file() or stamp.read_text() != key):
        args = [] if level == "auto" else ["--accuracy-level", level]
        res = subprocess.run([sys.executable, "-P", "-m", "pocketlm.cli", "export", str(gguf), "--onnx", str(out),
                              *args], check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        chose = next((x for x in res.stdout.splitlines() if x.startswith("chose ")), "")
        (out.parent / f"{out.name}.chose.txt").write_text(chose)
        stamp.write_text(key)
    return (out.parent / f"{out.name}.chose.txt").read_text() if level == "auto" else level


def main() -> int:
    from pocketlm.bench import Progress, run_child

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip", default="", help="row names to leave out, separated by ';'")
    ap.add_argument("--only", default="", help="the only rows to run, separated by ';' (the builder's always)")
    ap.add_argument("--row", action="append", default=[], metavar="NAME=FOLDER",
                    help="one more onnxruntime-genai row: an ONNX folder made elsewhere (e.g. by another "
                         "version of the exporter, to compare before and after in one interleaved run)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    work = CACHE / f"onnx-vs-builder-{args.layers}l"
    work.mkdir(parents=True, exist_ok=True)
    cpu = next((x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
                if x.startswith("model name")), platform.processor())
    skip = {s.strip() for s in args.skip.split(";") if s.strip()}
    only = {s.strip() for s in args.only.split(";") if s.strip()}

    def wanted(name: str) -> bool:
        return name.startswith("builder") or (name not in skip and (not only or name in only))

    ckpt = checkpoint(args.layers)
    print(f"builder int4: {build_builder(ckpt, work / 'builder-int4')}", flush=True)
    rows = {"builder int4, level 4": ("onnxruntime", {"onnx": str(work / "builder-int4")})}
    exports = {"q4_0": ("auto", "1", "4"), "q4_k_m": ("auto", "1"), "q4_0_pure": ("auto",)}
    plan = {}  # row name -> (recipe, level, engine)
    for r, levels in exports.items():
        for level in levels:
            label = "default (auto)" if level == "auto" else f"level {level}"
            plan[f"ours {r.upper()}, {label}"] = (r, level, "onnxruntime")
    for r in ("q4_0", "q4_k_m"):
        plan[f"pocketlm {r.upper()}"] = (r, None, "pocketlm")
        plan[f"llama.cpp {r.upper()}"] = (r, None, "llama.cpp")
    plan = {name: v for name, v in plan.items() if wanted(name)}
    ggufs = {r: work / f"{r}.gguf" for r in exports if any(v[0] == r for v in plan.values())}
    for r, p in ggufs.items():  # only the files some row needs
        print(f"pocketlm quantize {r}: {build_gguf(ckpt, r, p)}", flush=True)
    chosen = {}
    for name, (r, level, engine) in plan.items():
        if engine != "onnxruntime":
            rows[name] = (engine, {"path": str(ggufs[r])})
            continue
        folder = work / f"{r}-onnx-{level}"
        chosen[r, level] = export(ggufs[r], folder, level)
        rows[name] = ("onnxruntime", {"onnx": str(folder)})
        if level == "auto":
            print(f"export {r} default: {chosen[r, level]}", flush=True)
    for spec in args.row:
        name, _, folder = spec.partition("=")
        rows[name.strip()] = ("onnxruntime", {"onnx": folder.strip()})
    threads = [int(t) for t in args.threads.split(",")]
    base = {"prompt": args.prompt, "gen": args.gen, "ctx": args.prompt + args.gen + 16, "kv": "f32",
            "sweep": [], "vocab": 32064}
    best: dict[tuple[str, int], dict] = {}
    loads = [os.getloadavg()[0]]
    progress = Progress("onnx-vs-builder")
    for rep in range(args.repeats):
        for t in threads:
            for name, (engine, extra) in rows.items():
                out = run_child(engine, {**base, **extra, "threads": t}, progress)
                if "error" in out:
                    continue
                b = best.setdefault((name, t), {"prefill": 0.0, "decode": 0.0})
                b["prefill"] = max(b["prefill"], out["prefill_tok_s"])
                b["decode"] = max(b["decode"], out["decode_tok_s"])
                print(f"  repeat {rep + 1}, {t} threads, {name}: prefill {out['prefill_tok_s']:.1f} tok/s, "
                      f"decode {out['decode_tok_s']:.2f} tok/s (load {os.getloadavg()[0]:.1f})", flush=True)
        loads.append(os.getloadavg()[0])
    print(f"\n{cpu}, {os.cpu_count()} CPUs; load average {min(loads):.1f}-{max(loads):.1f} during the run; "
          f"phi-3-mini shape, {args.layers} layers, prompt {args.prompt}, {args.gen} greedy tokens, best of "
          f"{args.repeats}, interleaved\n")
    head = " | ".join(f"{kind} {t}T" for t in threads for kind in ("prefill", "decode"))
    print(f"| model | {head} | vs builder (prefill / decode) |")
    print("| --- |" + " ---: |" * (2 * len(threads)) + " --- |")
    for name in rows:
        cells, ratios = [], []
        for t in threads:
            b, ref = best.get((name, t)), best.get(("builder int4, level 4", t))
            cells += [f"{b['prefill']:.1f}", f"{b['decode']:.2f}"] if b else ["-", "-"]
            if b and ref:
                ratios.append(f"{t}T {b['prefill'] / ref['prefill']:.2f}x / {b['decode'] / ref['decode']:.2f}x")
        print(f"| {name} | {' | '.join(cells)} | {', '.join(ratios)} |")
    if args.json:
        data = {"cpu": cpu, "load_average": loads, "layers": args.layers, "prompt": args.prompt, "gen": args.gen,
                "chosen": {f"{r} {lvl}": c for (r, lvl), c in chosen.items()},
                "best": {f"{n} @{t}": v for (n, t), v in best.items()}}
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
