"""Decode speed of pocketlm against llama.cpp with the two engines in lockstep.

    python benchmarks/bench_lockstep.py --recipes q4_0 q8_0 --threads 2 1
    python benchmarks/bench_lockstep.py --rounds 24 --tokens 8

This VM's read bandwidth moves between about 30 and 60 GB/s within a minute, so two decode runs made
seconds apart can differ by 1.4x for the same engine, and a ratio of two such runs (bench_runtime.py,
bench_process.py) lands wherever each engine happened to catch the memory. Here both engines stay
loaded in their own processes (llama-cpp-python with its REPACK path, as bench_runtime.py runs it;
pocketlm's packed copy), each prefills the same 128-token prompt, and then they take turns: engine A
decodes `--tokens` tokens greedily while B waits on its pipe, then B, then B again and A (the order
alternates so neither always goes first). Each round's ratio compares two chunks timed within about
a second of each other; the median over the rounds is the figure, with its range. Same phi-3-mini-
shaped files as bench_runtime.py (make_phi3_mini_gguf.py; random weights, speed only).

Between the two chunks of a round a third process samples the read bandwidth with the same thread
count (benchmarks/roofline.py's probe: numpy sums over 1 GiB). Each engine's share of that round's
roofline is the bytes its chunk read per second (weights, and the f16 KV cache rows up to the
chunk's middle position, which both engines hold alike) over the sample; the "ceiling" is the
roofline over llama.cpp's tok/s, the ratio an engine streaming at exactly the probe's bandwidth
would reach against llama.cpp in that round. A target above the ceiling asks for more than the
memory gave.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_runtime import MODELS, bytes_per_token, prompt_ids, warm_page_cache  # noqa: E402  (sibling script)
from roofline import PROBE_BYTES  # noqa: E402

ENGINES = ("pocketlm", "llama.cpp")
PROBE = "bandwidth"
PROMPT = 128


# ---------------------------------------------------------------------------- children

def pocketlm_engine(path: str, threads: int, ctx: int):
    """-> decode(n): n greedy tokens after the prompt, as bench_runtime.py's pocketlm child decodes."""
    from pocketlm.runtime.model import load

    model = load(path, threads=threads, ctx=ctx)
    state = {"token": int(np.argmax(model.forward(prompt_ids(PROMPT))))}

    def decode(n: int) -> None:
        for _ in range(n):
            state["token"] = int(np.argmax(model.forward([state["token"]])))
    return decode


def llama_engine(path: str, threads: int, ctx: int):
    """-> decode(n), as bench_runtime.py's llama.cpp child decodes (REPACK unless an AMX build)."""
    from pocketlm.bench import LlamaGreedy

    llm = LlamaGreedy(path, threads, ctx)
    llm.prefill(prompt_ids(PROMPT))

    def decode(n: int) -> None:
        for _ in range(n):
            llm.step()
    return decode


def probe_engine(path: str, threads: int, ctx: int):
    """-> sample(n): the read bandwidth in GB/s (best of 2 sums over 1 GiB; n is ignored)."""
    from pocketlm.hostinfo import BandwidthProbe

    probe = BandwidthProbe(threads, PROBE_BYTES)
    return lambda n: probe.gbs(repeats=2)


def child(engine: str, path: str, threads: int, ctx: int) -> None:
    """Load (and prefill), say "ready", then per line on stdin decode that many tokens (the probe:
    sample the bandwidth) and answer the seconds it took and what the call returned; an empty line
    or end of input ends it."""
    make = {"pocketlm": pocketlm_engine, "llama.cpp": llama_engine, PROBE: probe_engine}[engine]
    run = make(path, threads, ctx)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            break
        t0 = time.perf_counter()
        value = run(int(line))
        print(json.dumps({"seconds": time.perf_counter() - t0, "value": value}), flush=True)


# ---------------------------------------------------------------------------- parent

class Engine:
    """One engine's child process, driven line by line."""

    def __init__(self, name: str, path: Path, threads: int, ctx: int):
        env = {**os.environ, "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS", "1")}
        self.name = name
        # a file, not a pipe: nothing blocks on unread logs; closed by close()
        self.stderr = tempfile.TemporaryFile("w+")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, __file__, "--child", name, str(path), str(threads), str(ctx)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True, env=env)
        self._read()  # "ready"

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.stderr.seek(0)
            err = self.stderr.read().strip().splitlines()
            raise RuntimeError(f"{self.name} child ended: {err[-1] if err else 'no output'}")
        return json.loads(line)

    def call(self, n: int) -> dict:
        """{"seconds": ..., "value": ...} of one request (decode n tokens, or sample the bandwidth)."""
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)
        self.stderr.close()


def lockstep(path: Path, threads: int, rounds: int, tokens: int, ctx: int) -> dict[str, list[float]]:
    """Per engine, the seconds of each chunk of `tokens` decoded tokens over `rounds` alternating
    rounds (after one untimed warm-up chunk each), and under PROBE the GB/s sampled between the two
    chunks of each round."""
    procs: list[Engine] = []
    try:
        for name in (*ENGINES, PROBE):
            procs.append(Engine(name, path, threads, ctx))
        engines, probe = procs[:2], procs[2]
        for e in engines:
            e.call(tokens)
        out: dict[str, list[float]] = {name: [] for name in (*ENGINES, PROBE)}
        for r in range(rounds):
            first, second = engines if r % 2 == 0 else engines[::-1]
            out[first.name].append(first.call(tokens)["seconds"])
            out[PROBE].append(probe.call(0)["value"])
            out[second.name].append(second.call(tokens)["seconds"])
        return out
    finally:
        for e in procs:
            e.close()


def kv_bytes_per_position(path: Path) -> int:
    """Bytes of one position's keys and values over every layer in an f16 cache (both engines'
    default), the rows a decode step reads besides the weights."""
    from pocketlm.config import Phi3Config
    from pocketlm.export.gguf_reader import GGUFReader

    with GGUFReader(path) as r:
        cfg = Phi3Config.from_gguf_metadata(r.metadata, source=str(path))
    return cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2 * 2  # keys + values, 2 bytes


def report(recipe: str, threads: int, tokens: int, times: dict[str, list[float]], per_token: list[float]) -> None:
    """One table row; per_token[r]: the bytes a step of round r reads (weights + KV rows)."""
    ours, theirs, gbs = (np.array(times[k]) for k in (*ENGINES, PROBE))
    tps_ours, tps_theirs = tokens / ours, tokens / theirs   # per round
    ratio = tps_ours / tps_theirs
    roof = gbs * 1e9 / np.array(per_token)                  # tok/s at the sampled bandwidth, per round
    share_ours, share_theirs, ceiling = tps_ours / roof, tps_theirs / roof, roof / tps_theirs
    med = statistics.median
    print(f"| {recipe} | {threads} | {med(tps_ours):.2f} | {med(tps_theirs):.2f} | "
          f"**{med(ratio):.2f}x** | {ratio.min():.2f}-{ratio.max():.2f}x | {int((ratio > 1).sum())}/{len(ratio)} | "
          f"{med(gbs):.1f} ({gbs.min():.1f}-{gbs.max():.1f}) | {med(share_ours):.0%} / {med(share_theirs):.0%} | "
          f"{med(ceiling):.2f}x |", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="phi3-mini", choices=tuple(MODELS), help="the random file's shape")
    ap.add_argument("--recipes", nargs="+", default=["q4_0"], choices=("q4_0", "q4_k_m", "q8_0"))
    ap.add_argument("--threads", nargs="+", type=int, default=[2, 1])
    ap.add_argument("--rounds", type=int, default=16, help="alternating rounds (each engine one chunk per round)")
    ap.add_argument("--tokens", type=int, default=8, help="tokens decoded per chunk")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        engine, path, threads, ctx = args.child
        child(engine, path, int(threads), int(ctx))
        return 0
    need = PROMPT + (args.rounds + 1) * args.tokens
    if args.rounds < 1 or args.tokens < 1 or need > args.ctx:
        ap.error(f"--rounds and --tokens must be >= 1 and the prompt ({PROMPT}) + (rounds + 1) x tokens "
                 f"({need}) must fit --ctx {args.ctx}")

    from pocketlm.hostinfo import host_cpu

    print(f"host: {host_cpu()}, {os.cpu_count()} CPUs; load average at start {os.getloadavg()[0]:.2f}; "
          f"{args.rounds} rounds of {args.tokens} tokens per engine, prompt {PROMPT}, ctx {args.ctx}\n")
    print("| file | threads | pocketlm tok/s (median) | llama.cpp tok/s (median) | decode ratio: median | "
          "range over rounds | rounds pocketlm ahead | probe GB/s: median (range) | "
          "share of the roofline: pocketlm / llama.cpp | ceiling over llama.cpp |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for recipe in args.recipes:
        path = MODELS[args.model].ensure(recipe)
        warm_page_cache(path)
        weights, kv_row = bytes_per_token(path), kv_bytes_per_position(path)
        # round r's chunks decode positions PROMPT + (r + 1) t .. PROMPT + (r + 2) t - 1 (after the warm-up)
        per_token = [weights + kv_row * (PROMPT + (r + 1.5) * args.tokens) for r in range(args.rounds)]
        for t in args.threads:
            report(recipe, t, args.tokens, lockstep(path, t, args.rounds, args.tokens, args.ctx), per_token)
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
