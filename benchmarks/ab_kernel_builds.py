"""Two builds of the C kernel compared in one process: decode steps, alternated round by round.

    pip install --no-deps --target /tmp/variant path/to/modified/checkout
    python benchmarks/ab_kernel_builds.py /tmp/variant/pocketlm/runtime/_kernel*.so [--recipe q4_0]
        [--threads 2] [--rounds 12] [--pos 128]

On this shared VM the read bandwidth moves between about 30 and 60 GB/s from minute to minute, so
two builds timed in separate processes, even interleaved, differ by more than the change being
tried (a few per cent). Here the installed kernel (A) and the other build (B, its `_kernel` shared
object loaded beside A's under another module name) decode the phi-3-mini-shaped file
(make_phi3_mini_gguf.py) in turns: each round samples the bandwidth (benchmarks/roofline.py's
probe), then times A and B, 2 x 8 steps each at position --pos (the best of the two), the order
swapped every round. Both builds must give the same logits (checked first): a build that changes
the arithmetic is not an A/B of speed. Printed: per round each build's ms per step and share of
the sampled roofline (weight bytes read per token, as bench_runtime.py counts them), then the median
speed-up of B over A. B runs A's weights layout and decode plan format, so the two builds must
differ only inside the kernels, not in the plan or the packed layout.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import make_phi3_mini_gguf  # noqa: E402  (sibling scripts)
from bench_runtime import bytes_per_token  # noqa: E402
from roofline import PROBE_BYTES  # noqa: E402

import pocketlm.runtime.model as model_module  # noqa: E402
from pocketlm.hostinfo import BandwidthProbe, host_cpu  # noqa: E402
from pocketlm.runtime import _kernel  # noqa: E402
from pocketlm.runtime import kernel as kern  # noqa: E402
from pocketlm.runtime.model import load  # noqa: E402

STEPS = 8  # decode steps per timing; each build is timed twice per round


def load_other_build(so_path: str) -> ModuleType:
    """The other build's extension module, under a name of its own (its init symbol is the same)."""
    spec = importlib.util.spec_from_file_location("ab_variant._kernel", so_path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"ab_kernel_builds: {so_path} is not a loadable extension module")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("other", help="the other build's _kernel shared object")
    ap.add_argument("--recipe", default="q4_0", choices=("q4_0", "q4_k_m", "q8_0"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--pos", type=int, default=128, help="cache length the steps start from")
    args = ap.parse_args()

    path = make_phi3_mini_gguf.ensure(args.recipe)
    model = load(path, threads=args.threads, ctx=args.pos + 2 * STEPS + 8, kv="f16")
    other = load_other_build(args.other)
    other.set_path(kern.active_path())
    other.set_threads(args.threads)
    model.forward(list(range(1, args.pos + 1)))

    builds = {}  # name -> (kernel module, decode plan built by that module)
    for name, mod in (("A", _kernel), ("B", other)):
        model_module._kernel, model._plan = mod, None
        model._decode_plan()
        builds[name] = (mod, model._plan)

    def use(name: str) -> None:
        model_module._kernel, model._plan = builds[name]

    logits = {}
    for name in builds:
        use(name)
        logits[name] = model.forward([7])
        model.truncate(args.pos)
    if not np.array_equal(logits["A"], logits["B"]):
        raise SystemExit("ab_kernel_builds: the two builds give different logits; compare speed only "
                         "between builds with the same arithmetic")

    token = [5]

    def step_seconds() -> float:
        t0 = time.perf_counter()
        for _ in range(STEPS):
            token[0] = int(np.argmax(model.forward([token[0]])))
        seconds = (time.perf_counter() - t0) / STEPS
        model.truncate(args.pos)
        return seconds

    per_token = bytes_per_token(path)
    print(f"cpu: {host_cpu()}, path {kern.active_path()}, {args.threads} thread(s), {path.name}, "
          f"position {args.pos}; A = installed build, B = {args.other}")
    probe = BandwidthProbe(args.threads, PROBE_BYTES)
    rows = []  # (probe GB/s, A seconds per step, B seconds per step)
    try:
        for r in range(args.rounds):
            bw = probe.gbs(repeats=2)
            secs = {}
            for name in ("AB" if r % 2 == 0 else "BA"):
                use(name)
                secs[name] = min(step_seconds(), step_seconds())
            rows.append((bw, secs["A"], secs["B"]))
            share = {n: per_token / s / 1e9 / bw for n, s in secs.items()}
            print(f"probe {bw:5.1f} GB/s  A {1e3 * secs['A']:6.2f} ms ({share['A']:4.0%})  "
                  f"B {1e3 * secs['B']:6.2f} ms ({share['B']:4.0%})  B speed-up {secs['A'] / secs['B']:.3f}",
                  flush=True)
    finally:
        probe.close()
        use("A")
    speedup = statistics.median(a / b for _, a, b in rows)
    share_a = statistics.median(per_token / a / 1e9 / bw for bw, a, _ in rows)
    share_b = statistics.median(per_token / b / 1e9 / bw for bw, _, b in rows)
    print(f"median over {len(rows)} rounds: B speed-up {speedup:.3f}; share of the sampled roofline "
          f"A {share_a:.0%}, B {share_b:.0%}")


if __name__ == "__main__":
    main()
