"""Runtime benchmark: pocketlm against llama.cpp (llama-cpp-python) on the same phi-3-mini-shaped file.

    python benchmarks/bench_runtime.py                          # Q4_0, 1 and 2 threads
    python benchmarks/bench_runtime.py --recipes q4_0 q4_k_m q8_0
    python benchmarks/bench_runtime.py --model phi4-mini        # Phi-4-mini's shape: partial RoPE,
                                                                # a tied 200064 x 3072 output matrix

For each file (built once and cached by make_phi3_mini_gguf.py / make_phi4_mini_gguf.py) and thread
count, each engine runs
in its own subprocess (so peak RSS is that engine's alone): load, prefill a 128-token prompt, then
decode 64 tokens greedily (argmax, end-of-text ignored), context 512. The third engine is
onnxruntime-genai on pocketlm's ONNX export of the same file (`pocketlm.bench.ensure_onnx`: exported
once, cached under ~/.cache/pocketlm/bench-onnx; its decode includes its greedy search step). Also
measured: the machine's read bandwidth (numpy sum over a 2 GB array, 1 and 2 threads) and the decode
roofline it implies (bandwidth / bytes of weights read per token); the "paired" column: each engine's
decode against the bandwidth sampled between rounds of its own decode steps, in its own process
(benchmarks/roofline.py; the shared machine's bandwidth moves during a run); pocketlm's decode at
positions 128, 1024 and 2048 against the paired roofline of weights + KV cache rows; pocketlm's time to load the file
and produce the first token of a 16-token prompt (fresh process, warm page cache); pocketlm's Python
overhead per decoded token (1 - time inside kernel calls / decode time, instrumented in the model
loop).

llama.cpp runs with its extra buffer types (REPACK: a load-time interleaved copy of the weights, its
fastest CPU path) unless its build has AMX: llama-cpp-python built with AMX crashes on this
machine's AMX unit, so such a build runs without them (`pocketlm.bench.llama_cpp_use_repack`; the
README tells how to build it without AMX). The table says which.

Targets (issue 5): decode >= 1.05x llama.cpp and onnxruntime-genai on Q4_0 (>= 0.9x llama.cpp on
Q4_K_M, Q8_0), prefill >= 0.8x, peak RSS <= file + KV cache + 250 MB, load + first token < 2 s,
Python overhead < 10 %. Numbers are only meaningful on a quiet machine: the script prints the load
average it saw.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pocketlm.bench import LlamaGreedy
from pocketlm.hostinfo import read_bandwidth_gbs

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import make_phi3_mini_gguf  # noqa: E402  (sibling scripts)
import make_phi4_mini_gguf  # noqa: E402
from roofline import paired_roofline  # noqa: E402

MODELS = {"phi3-mini": make_phi3_mini_gguf, "phi4-mini": make_phi4_mini_gguf}

MB = 1e6


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB  # ru_maxrss is in KiB


def prompt_ids(n: int, seed: int = 0) -> list[int]:
    """Random ordinary-token ids (no special tokens), the same for both engines."""
    return np.random.default_rng(seed).integers(300, 32000, n).tolist()


# ---------------------------------------------------------------------------- children

def child_pocketlm(path: str, threads: int, n_prompt: int, n_decode: int, ctx: int, kv: str) -> dict:
    from pocketlm.runtime.generate import generate
    from pocketlm.runtime.model import load

    model = load(path, threads=threads, ctx=ctx, kv=kv)
    load_s = model.stats.load_seconds
    gen = generate(model, prompt_ids(n_prompt), max_tokens=n_decode + 1, temperature=0, ignore_eos=True)
    generated = list(gen.token_ids())
    s = model.stats
    out = {"load_s": load_s, "prefill_tps": s.prefill_tps, "decode_tps": s.decode_tps,
           "python_overhead": s.python_overhead, "decoded": s.decode_tokens, "peak_rss_mb": peak_rss_mb(),
           "kv_mb": model.cache.nbytes / MB}
    state = {"token": generated[-1]}

    def step() -> None:  # greedy decode, as the timed run above
        state["token"] = int(np.argmax(model.forward([state["token"]])))

    return {**out, **paired_roofline(step, bytes_per_token(Path(path)), threads).as_dict()}


def child_first_token(path: str, threads: int, ctx: int, kv: str) -> dict:
    t0 = time.perf_counter()
    from pocketlm.runtime.generate import generate
    from pocketlm.runtime.model import load

    model = load(path, threads=threads, ctx=ctx, kv=kv)
    gen = generate(model, prompt_ids(16, seed=1), max_tokens=1, temperature=0, ignore_eos=True)
    for _ in gen.token_ids():
        pass
    return {"load_first_token_s": time.perf_counter() - t0, "load_s": model.stats.load_seconds}


def child_short(path: str, threads: int, ctx: int, kv: str, repeat: int = 3) -> dict:
    """Prompt speed of a 12-token and a 128-token prompt at context `ctx` (issue 13: a short prompt
    must not pay for the context size it does not use), each the first prompt of its model, best
    of `repeat` fresh models (one sample of a 0.2 s prompt moves by 2x on this shared machine)."""
    from pocketlm.runtime.model import load

    out = {}
    for n in (12, 128):
        best = float("inf")
        for _ in range(repeat):
            model = load(path, threads=threads, ctx=ctx, kv=kv)
            t0 = time.perf_counter()
            model.forward(prompt_ids(n, seed=2))
            best = min(best, time.perf_counter() - t0)
            del model
        out[f"tps_{n}"] = n / best
    return out


CONTEXT_POSITIONS = (128, 1024, 2048)


def child_context(path: str, threads: int, kv: str) -> dict:
    """Decode at positions 128, 1024 and 2048 against the roofline of every byte a step reads
    (weights and the KV cache rows up to the position), paired as above (benchmarks/roofline.py).
    The cache is filled with random rows instead of a prefill (attention time does not depend on
    the values); each step decodes at the position and is rolled back out of the cache."""
    from pocketlm.runtime.model import load

    top = max(CONTEXT_POSITIONS)
    model = load(path, threads=threads, ctx=top + 64, kv=kv)
    cache, cfg, rng = model.cache, model.cfg, np.random.default_rng(0)
    for layer in range(cfg.num_hidden_layers):  # one layer at a time: no multi-GB temporaries
        for arr in (cache.k, cache.v):
            shape = arr[layer, :, :top].shape
            arr[layer, :, :top] = (rng.integers(-127, 128, shape) if arr.dtype == np.int8
                                   else rng.standard_normal(shape) * 0.5).astype(arr.dtype)
    if cache.kind == "int8":
        cache.k_scale[:, :, :top] = cache.v_scale[:, :, :top] = 0.01
    per_row = cfg.num_key_value_heads * (cfg.head_dim * cache.k.itemsize + (2 if cache.kind == "int8" else 0)) * 2
    weights = bytes_per_token(Path(path))
    out = {}
    for pos in CONTEXT_POSITIONS:
        cache.length, model.tokens = pos, [1] * pos

        def step(pos: int = pos) -> None:
            model.forward([1])
            model.truncate(pos)

        per_token = weights + cfg.num_hidden_layers * (pos + 1) * per_row
        r = paired_roofline(step, per_token, threads, rounds=3, steps=8)
        out[str(pos)] = {"tps": statistics.median(r.achieved_gbs) * 1e9 / per_token,
                         "bytes_per_token": per_token, **r.as_dict()}
    return out


def child_llama(path: str, threads: int, n_prompt: int, n_decode: int, ctx: int) -> dict:
    llm = LlamaGreedy(path, threads, ctx)
    t0 = time.perf_counter()
    llm.prefill(prompt_ids(n_prompt))
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(n_decode):
        llm.step()
    decode_s = time.perf_counter() - t0
    out = {"load_s": llm.load_s, "prefill_tps": n_prompt / prefill_s, "decode_tps": n_decode / decode_s,
           "peak_rss_mb": peak_rss_mb(), "repack": llm.repack}
    return {**out, **paired_roofline(llm.step, bytes_per_token(Path(path)), threads).as_dict()}


def child_onnxruntime(path: str, threads: int, n_prompt: int, n_decode: int) -> dict:
    """onnxruntime-genai on pocketlm's ONNX export of the same file (exported once, cached)."""
    from pocketlm.bench import Progress, ensure_onnx
    from pocketlm.bench import child_onnxruntime as run_genai

    progress = Progress("onnxruntime", stream=sys.stderr)
    folder = ensure_onnx(path, None, progress)
    r = run_genai({"onnx": str(folder), "threads": threads, "prompt": n_prompt, "gen": n_decode,
                   "vocab": vocab_size(Path(path))}, progress)
    return {"load_s": r["load_s"], "prefill_tps": r["prefill_tok_s"], "decode_tps": r["decode_tok_s"],
            "peak_rss_mb": r["peak_rss_bytes"] / MB}


def run_child(*args: str) -> dict:
    # as `pocketlm run` does (pocketlm/cli.py): numpy's BLAS single-threaded beside the kernel's pool,
    # else its spinning threads fight the pool for the 2 cores
    env = {**os.environ, "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS", "1")}
    res = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        return {"error": (res.stderr.strip().splitlines() or ["crashed"])[-1][:200]}
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- machine

def bytes_per_token(path: Path) -> int:
    """Weight bytes a decode step reads: every tensor but the embedding (one row of it), unless the
    embedding is also the output matrix (tied, Phi-4-mini), which is read whole."""
    from pocketlm.export.gguf_reader import GGUFReader

    with GGUFReader(path) as r:
        tied = "output.weight" not in r.tensors
        return sum(t.nbytes for t in r.tensors.values() if tied or t.name != "token_embd.weight")


def vocab_size(path: Path) -> int:
    from pocketlm.export.gguf_reader import GGUFReader

    with GGUFReader(path) as r:
        return int(r.tensors["token_embd.weight"].shape[0])


# ---------------------------------------------------------------------------- report

def best_interleaved(repeat: int, jobs: list[tuple[str, ...]]) -> list[dict]:
    """Per job (a child's arguments), its run with the best decode speed out of `repeat`, the jobs
    taking turns (1, 2, .., 1, 2, ..): every engine's best comes from the same stretch of the shared
    machine's time, not from minutes apart (this VM's bandwidth moves between about 30 and 60 GB/s)."""
    runs: list[list[dict]] = [[] for _ in jobs]
    for _ in range(repeat):
        for job, done in zip(jobs, runs, strict=True):
            done.append(run_child(*job))
    best = []
    for done in runs:
        ok = [r for r in done if "error" not in r]
        best.append(max(ok, key=lambda r: r["decode_tps"]) if ok else done[0])
    return best


def print_row(t: int, name: str, r: dict, roof: float) -> None:
    if "error" in r:
        print(f"{t:>3} {name:<16} error: {r['error']}")
        return
    ovh = f"{100 * r['python_overhead']:5.1f}%" if "python_overhead" in r else "     -"
    paired = f"{r['roofline_fraction']:>6.0%}" if "roofline_fraction" in r else "     -"
    print(f"{t:>3} {name:<16} {r['prefill_tps']:>11.2f} {r['decode_tps']:>10.2f} "
          f"{r['decode_tps'] / roof:>7.0%} {paired} {r['peak_rss_mb']:>11.0f} {r['load_s']:>6.2f} {ovh} "
          f"{os.getloadavg()[0]:>5.1f}")


def warm_page_cache(path: Path) -> None:
    """Read the file once so that neither engine pays for disk reads (this VM's page cache drops
    files it has not touched lately)."""
    with open(path, "rb", buffering=0) as f:
        while f.read(64 << 20):
            pass


def report_file(recipe: str, args: argparse.Namespace, bw: dict[int, float]) -> None:
    path = MODELS[args.model].ensure(recipe)
    warm_page_cache(path)
    run_child("first", str(path), "1", "--ctx", str(args.ctx), "--kv", args.kv[0])  # pages in pocketlm's packed copy
    size_mb = path.stat().st_size / MB
    per_tok = bytes_per_token(path)
    print(f"\n== {recipe}: {path} ({size_mb:.0f} MB, {per_tok / MB:.0f} MB read per token), "
          f"prompt {args.prompt}, decode {args.decode}, ctx {args.ctx}, best of {args.repeat}")
    print(f"{'thr':>3} {'engine':<16} {'prefill t/s':>11} {'decode t/s':>10} {'roofline':>8} {'paired':>6} "
          f"{'peak RSS MB':>11} {'load s':>6} {'py ovh':>6} {'load':>5}")
    common = ("--prompt", str(args.prompt), "--decode", str(args.decode), "--ctx", str(args.ctx))
    for t in args.threads:
        roof = bw[t] * 1e9 / per_tok
        jobs = [("llama", str(path), str(t), *common)]
        if args.onnx:
            jobs.append(("onnxruntime", str(path), str(t), *common))
        jobs += [("pocketlm", str(path), str(t), *common, "--kv", kv) for kv in args.kv]
        theirs, *rest = best_interleaved(args.repeat, jobs)
        genai = rest.pop(0) if args.onnx else None
        print_row(t, "llama.cpp" + (" repack" if theirs.get("repack") else ""), theirs, roof)
        if genai is not None:
            print_row(t, "onnxruntime-genai", genai, roof)
        for kv, ours in zip(args.kv, rest, strict=True):
            print_row(t, f"pocketlm kv={kv}", ours, roof)
            if "error" in ours or "error" in theirs:
                continue
            budget = size_mb + ours["kv_mb"] + 250
            decode = ours["decode_tps"] / theirs["decode_tps"]
            prefill = ours["prefill_tps"] / theirs["prefill_tps"]
            if genai is not None and "error" not in genai:
                print(f"    pocketlm/onnxruntime-genai: decode {ours['decode_tps'] / genai['decode_tps']:.2f}x, "
                      f"prefill {ours['prefill_tps'] / genai['prefill_tps']:.2f}x")
            print(f"    pocketlm/llama.cpp: decode {decode:.2f}x, prefill {prefill:.2f}x; peak RSS "
                  f"{ours['peak_rss_mb']:.0f} MB vs budget {budget:.0f} MB (file + KV {ours['kv_mb']:.0f} MB "
                  f"+ 250 MB)")
        print(f"    roofline at {t} thread(s): {roof:.1f} tok/s ({bw[t]:.1f} GB/s / {per_tok / MB:.0f} MB)")
    t = max(args.threads)
    for ctx in (512, 4096):
        short = run_child("short", str(path), str(t), "--ctx", str(ctx), "--kv", args.kv[0])
        if "error" not in short:
            print(f"pocketlm prompt speed at ctx {ctx} ({t} threads): 12 tokens {short['tps_12']:.1f} tok/s, "
                  f"128 tokens {short['tps_128']:.1f} tok/s: ratio {short['tps_12'] / short['tps_128']:.2f}")
    context = run_child("context", str(path), str(t), "--kv", args.kv[0])
    for pos, r in ({} if "error" in context else context).items():
        print(f"pocketlm decode at position {pos} ({t} threads, kv {args.kv[0]}): {r['tps']:.2f} tok/s, "
              f"{r['roofline_fraction']:.0%} of the paired roofline counting weights + KV cache "
              f"({r['bytes_per_token'] / MB:.0f} MB per token)")
    if "error" in context:
        print(f"decode at positions {CONTEXT_POSITIONS}: error: {context['error']}")
    first = run_child("first", str(path), str(t), "--ctx", str(args.ctx), "--kv", args.kv[0])
    if "error" in first:
        print(f"load + first token: error: {first['error']}")
    else:
        print(f"pocketlm load + first token of a 16-token prompt ({t} threads, fresh process, warm "
              f"cache): {first['load_first_token_s']:.2f} s (load {first['load_s']:.2f} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="phi3-mini", choices=tuple(MODELS), help="the random file's shape")
    ap.add_argument("--recipes", nargs="+", default=["q4_0"], choices=("q4_0", "q4_k_m", "q8_0"))
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--kv", nargs="+", default=["f16"], choices=("f16", "int8", "f32"),
                    help="pocketlm KV cache type(s) to measure")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs per measurement, the engines taking turns; the best decode kept per engine")
    ap.add_argument("--no-onnx", dest="onnx", action="store_false",
                    help="skip onnxruntime-genai (it runs pocketlm's ONNX export of the file, made once and cached)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, path, threads = args.child[:3]
        if kind == "pocketlm":
            out = child_pocketlm(path, int(threads), args.prompt, args.decode, args.ctx, args.kv[0])
        elif kind == "first":
            out = child_first_token(path, int(threads), args.ctx, args.kv[0])
        elif kind == "short":
            out = child_short(path, int(threads), args.ctx, args.kv[0])
        elif kind == "context":
            out = child_context(path, int(threads), args.kv[0])
        elif kind == "onnxruntime":
            out = child_onnxruntime(path, int(threads), args.prompt, args.decode)
        else:
            out = child_llama(path, int(threads), args.prompt, args.decode, args.ctx)
        print(json.dumps(out))
        return

    import platform

    import llama_cpp

    from pocketlm.runtime import kernel

    info = Path("/proc/cpuinfo").read_text().splitlines() if os.path.exists("/proc/cpuinfo") else []
    cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), platform.processor())
    print(f"cpu: {cpu}, {os.cpu_count()} cores, pocketlm kernel path {kernel.active_path()}; "
          f"llama.cpp: llama-cpp-python {llama_cpp.__version__}")
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    bw = {t: read_bandwidth_gbs(t, 2 * 10**9) for t in args.threads}
    print("read bandwidth: " + ", ".join(f"{t} thread(s) {bw[t]:.1f} GB/s" for t in args.threads))
    for recipe in args.recipes:
        report_file(recipe, args, bw)
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
