"""Small batches at phi-3-mini shape: what a speculative verify of T tokens and a short prompt cost.

    python benchmarks/bench_small_batch.py --threads 2 --rounds 5

On the phi-3-mini-shaped Q4_0 file (benchmarks/make_phi3_mini_gguf.py; random weights, speed only),
context 512: the decode step (`Model.forward([t])` after 64 positions), the forward of T tokens
with all logits after 64 positions (a verify of T - 1 drafts) as a multiple of that step, and the
tok/s of whole prompts of a few lengths from an empty cache against a 128-token one (issue 13's
short-prompt target: >= 0.6x). Every figure is measured in interleaved rounds (load drift hits all
alike), best of the rounds; the cache is truncated back to 64 positions after each verify.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from make_phi3_mini_gguf import ensure

from pocketlm.hostinfo import host_cpu
from pocketlm.runtime.model import load

CONTEXT = 64


def measure(threads: int, rounds: int, verify_sizes: list[int],
            prompt_sizes: list[int]) -> dict[tuple[str, int], float]:
    """Best seconds of ("decode", 1), ("verify", T) and ("prompt", N)."""
    model = load(ensure("q4_0"), threads=threads, ctx=512)
    rng = np.random.default_rng(0)

    def ids(n: int) -> list[int]:
        return [int(x) for x in rng.integers(3, 30000, n)]

    model.forward(ids(CONTEXT))
    model.forward(ids(1))  # warm the decode plan
    model.truncate(CONTEXT)
    keys = [("decode", 1), *(("verify", t) for t in verify_sizes), *(("prompt", n) for n in prompt_sizes)]
    best = dict.fromkeys(keys, float("inf"))
    for _ in range(rounds):
        for kind, n in keys:
            if kind == "prompt":
                model.reset()
            t0 = time.perf_counter()
            model.forward(ids(n), all_logits=kind == "verify")
            best[kind, n] = min(best[kind, n], time.perf_counter() - t0)
            if kind == "prompt":
                model.reset()
                model.forward(ids(CONTEXT))
            else:
                model.truncate(CONTEXT)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (best of)")
    ap.add_argument("--verify", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6, 7, 8, 9, 16],
                    help="tokens per verify forward")
    ap.add_argument("--prompts", type=int, nargs="+", default=[12, 16, 128], help="prompt lengths")
    args = ap.parse_args()
    best = measure(args.threads, args.rounds, args.verify, args.prompts)
    dec = best["decode", 1]
    print(f"{host_cpu()}, {args.threads} threads, best of {args.rounds}, load average {os.getloadavg()[0]:.1f}\n")
    print(f"decode step {dec * 1e3:.1f} ms ({1 / dec:.2f} tok/s)\n")
    print("| tokens T (drafts T - 1) | best ms | x decode step |\n|---:|---:|---:|")
    for t in args.verify:
        print(f"| {t} | {best['verify', t] * 1e3:.1f} | {best['verify', t] / dec:.2f} |")
    longest = max(args.prompts)
    ref = longest / best["prompt", longest]
    print(f"\n| prompt tokens | tok/s | x the {longest}-token prompt |\n|---:|---:|---:|")
    for n in args.prompts:
        tps = n / best["prompt", n]
        print(f"| {n} | {tps:.1f} | {tps / ref:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
