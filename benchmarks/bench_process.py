"""Decode speed measured from outside: `pocketlm run` and llama.cpp as whole processes.

    python benchmarks/bench_process.py [--recipes q4_0] [--threads 2 1] [--short 16] [--long 272] [--repeat 3]

What a user sees, with nothing instrumented inside either engine: each engine is a fresh process
(`pocketlm run FILE -p TEXT -n N --temp 0 --ignore-eos`, and llama-cpp-python loading the same
file and generating N greedy tokens, its REPACK path as in bench_runtime.py) timed by the wall
clock from start to exit, at N = --short and N = --long generated tokens. The slope of wall time
over the extra tokens, (t_long - t_short) / (long - short), is the time per decoded token with
start-up, loading and the prompt cancelled out. Best of --repeat per engine and length, the two
engines interleaved (this VM's bandwidth moves from minute to minute). Files: the phi-3-mini-shaped
ones of make_phi3_mini_gguf.py. Issue 13 asks this figure to agree with bench_runtime.py's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "The quick brown fox jumps over the lazy dog"


def child_llama(path: str, threads: int, n: int, ctx: int) -> None:
    """Load the file in llama.cpp and generate n greedy tokens past any end-of-text."""
    import llama_cpp
    import numpy as np

    from pocketlm.bench import llama_cpp_use_repack

    llama_cpp_use_repack(llama_cpp)   # off only for AMX builds, which crash here
    llm = llama_cpp.Llama(path, n_ctx=ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
    n_vocab = llm.n_vocab()
    llm.eval(llm.tokenize(PROMPT.encode()))
    for _ in range(n):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        llm.eval([int(np.argmax(logits))])


def command(engine: str, path: Path, threads: int, n: int, ctx: int) -> list[str]:
    if engine == "pocketlm":
        exe = shutil.which("pocketlm") or sys.exit("error: the pocketlm command is not on PATH")
        return [exe, "run", str(path), "-p", PROMPT, "-n", str(n), "--temp", "0", "--ignore-eos",
                "--quiet", "--threads", str(threads), "--ctx", str(ctx)]
    return [sys.executable, __file__, "--child", str(path), str(threads), str(n), str(ctx)]


def wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    return time.perf_counter() - t0


def measure(path: Path, threads: int, short: int, long: int, repeat: int, ctx: int) -> dict[str, float]:
    """tok/s per engine: (long - short) / (best wall time at long - best at short), after one untimed
    run of each (the file into the page cache; pocketlm's first run of a file writes its packed copy)."""
    for engine in ("pocketlm", "llama.cpp"):
        wall(command(engine, path, threads, short, ctx))
    best = {(e, n): float("inf") for e in ("pocketlm", "llama.cpp") for n in (short, long)}
    for _ in range(repeat):
        for n in (short, long):
            for engine in ("pocketlm", "llama.cpp"):
                best[engine, n] = min(best[engine, n], wall(command(engine, path, threads, n, ctx)))
    return {e: (long - short) / (best[e, long] - best[e, short]) for e in ("pocketlm", "llama.cpp")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", default=["q4_0"], choices=("q4_0", "q4_k_m", "q8_0"))
    ap.add_argument("--threads", nargs="+", type=int, default=[2, 1])
    ap.add_argument("--short", type=int, default=16)
    ap.add_argument("--long", type=int, default=272)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        path, threads, n, ctx = args.child
        child_llama(path, int(threads), int(n), int(ctx))
        return
    if not 0 < args.short < args.long or args.long + 16 > args.ctx:
        sys.exit("error: need 0 < --short < --long and --long + the prompt within --ctx")
    import llama_cpp
    from make_phi3_mini_gguf import cached_path  # a sibling script (its file names and cache folder)

    from pocketlm.hostinfo import host_cpu

    print(f"cpu: {host_cpu()}; llama-cpp-python {llama_cpp.__version__}; load average {os.getloadavg()[0]:.2f}")
    print(f"slope of wall time from {args.short} to {args.long} generated tokens, best of {args.repeat}, "
          "engines interleaved")
    for recipe in args.recipes:
        path = cached_path(recipe)
        if not path.exists():
            sys.exit(f"error: {path} not found: run python benchmarks/make_phi3_mini_gguf.py --recipe {recipe}")
        for t in args.threads:
            r = measure(path, t, args.short, args.long, args.repeat, args.ctx)
            print(f"{recipe:<7} {t} thread(s): pocketlm {r['pocketlm']:.2f} tok/s, llama.cpp {r['llama.cpp']:.2f} "
                  f"tok/s: {r['pocketlm'] / r['llama.cpp']:.2f}x (load average {os.getloadavg()[0]:.2f})", flush=True)


if __name__ == "__main__":
    main()
