"""Where an ONNX decoder's time goes, per operator, against another folder (issue 14).

    python benchmarks/onnx_profile.py A=FOLDER B=FOLDER [--threads 1] [--pos 128] [--steps 40]
                                      [--prefills 2] [--pairs 2]
    python benchmarks/onnx_profile.py --layouts [--threads 1] [--rounds 7]

Folders: each child process loads both folders into plain onnxruntime sessions (ONNX Runtime's
profiler on, the KV cache bound in place as onnxruntime-genai's past_present_share_buffer does),
runs --prefills prompts of --pos tokens, then --steps decode steps at position --pos, alternating
the two sessions step by step. The children alternate which folder is loaded first, because on this
machine the session loaded first decodes ~10 % slower than the second whatever the model (its
prepacked weights sit on 4 KiB pages and pay for page walks; with transparent huge pages,
GLIBC_TUNABLES=glibc.malloc.hugetlb=1, the difference disappears): only both orders together are
a fair comparison. Reported: per-role node time (median decode step, prefill), from the profiler,
and B's speed relative to A as the geometric mean over the children of the ratio of medians (CPU
time of the running thread at 1 thread, which a preempted step does not inflate; wall time at
more). Roles: qkv, o, gate/up, down, lm_head, attention, norms, activation (+ Split), embedding.

Layouts: the output layer of phi-3-mini (N 32064, K 3072) as one MatMulNBits at accuracy level 4
in each layout that holds a Q6_K tensor exactly (8 bits, block 16: Q6_K's scales are per 16
values; or two 4-bit halves) beside layouts that do not (8 bits with bigger blocks, 4 bits block 32:
the model builder's), one token and a 128-token prompt; each layout is the only session of a fresh
process (in one process the first session would pay the page walks alone), interleaved rounds,
median ms.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROLES = (("qkv", r"qkv_proj"), ("o", r"o_proj"), ("gate/up", r"gate_up_proj|gate_proj|up_proj"),
         ("down", r"down_proj"), ("lm_head", r"lm_head"), ("attention", r"Attention"),
         ("norms", r"[Nn]orm"), ("embedding", r"embed_tokens"), ("activation", r"/mlp/"))


def role(node_name: str) -> str:
    return next((r for r, pattern in ROLES if re.search(pattern, node_name)), "other")


# ---------------------------------------------------------------------------- one child

class Decoder:
    """One folder in a plain onnxruntime session with its KV cache bound in place."""

    def __init__(self, folder: str, threads: int, pos: int, profile_prefix: str):
        import onnxruntime as ort

        cfg = json.loads((Path(folder) / "genai_config.json").read_text())["model"]["decoder"]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        opts.enable_profiling, opts.profile_file_prefix = True, profile_prefix
        self.session = ort.InferenceSession(str(Path(folder) / "model.onnx"), opts,
                                            providers=["CPUExecutionProvider"])
        shape = (1, cfg["num_key_value_heads"], pos + 8, cfg["head_size"])
        self.caches = {i.name: ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32))
                       for i in self.session.get_inputs() if i.name.startswith("past_key_values.")}
        self.bindings: dict[tuple[int, int], object] = {}

    def binding(self, n: int, total: int):
        """io_binding of n tokens ending at position total - 1 (made once, reused)."""
        if (n, total) not in self.bindings:
            b = self.session.io_binding()
            ids = np.random.default_rng(n).integers(100, 32000, (1, n))
            b.bind_cpu_input("input_ids", ids.astype(np.int64))
            b.bind_cpu_input("attention_mask", np.ones((1, total), np.int64))
            b.bind_output("logits")
            for name, value in self.caches.items():
                b.bind_ortvalue_input(name, value)
                b.bind_ortvalue_output(name.replace("past_key_values.", "present."), value)
            self.bindings[n, total] = b
        return self.bindings[n, total]

    def run(self, n: int, total: int) -> tuple[float, float]:
        """-> (wall s, CPU s of this thread) of one run."""
        b = self.binding(n, total)
        t0, c0 = time.perf_counter(), time.thread_time()
        self.session.run_with_iobinding(b)
        return time.perf_counter() - t0, time.thread_time() - c0


def node_times(profile: str, skip: int, prefills: int) -> tuple[dict, dict]:
    """A profile file -> (role -> ms of the first measured prefill, role -> median ms per decode
    step); the first `skip` runs are warm-up, then `prefills` prompts, then decode steps."""
    events = json.loads(Path(profile).read_text())
    runs = sorted((e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"),
                  key=lambda e: e["ts"])
    per_run = [Counter() for _ in runs]
    j = 0
    for e in sorted((e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")),
                    key=lambda e: e["ts"]):
        while j < len(runs) and e["ts"] > runs[j]["ts"] + runs[j]["dur"]:
            j += 1
        if j < len(runs):
            per_run[j][role(e["name"])] += e["dur"] / 1000
    steps = per_run[skip + prefills:]
    names = {r for c in per_run for r in c}
    return ({r: per_run[skip][r] for r in names},
            {r: statistics.median(c[r] for c in steps) for r in names})


def child(specs: list[str], threads: int, pos: int, steps: int, prefills: int) -> dict:
    tmp = tempfile.mkdtemp(prefix="onnx-profile-")
    decoders = {name: Decoder(folder, threads, pos, f"{tmp}/{name}")
                for name, _, folder in (s.partition("=") for s in specs)}
    for d in decoders.values():          # warm-up: a prompt, then one step
        d.run(pos, pos)
        d.run(1, pos + 1)
    times = {name: {"prefill": [], "decode": []} for name in decoders}
    for _ in range(prefills):
        for name, d in decoders.items():
            times[name]["prefill"].append(d.run(pos, pos))
    order = list(decoders.items())
    for i in range(steps):               # alternate which goes first: no systematic position
        for name, d in (order if i % 2 == 0 else order[::-1]):
            times[name]["decode"].append(d.run(1, pos + 1))
    col = 1 if threads == 1 else 0       # thread CPU time is the whole run's only at 1 thread

    def median_ms(runs: list[tuple[float, float]]) -> float:
        return statistics.median(r[col] for r in runs) * 1000

    out = {}
    for name, d in decoders.items():
        profile = d.session.end_profiling()
        pre, dec = node_times(profile, 2, prefills)
        os.remove(profile)
        out[name] = {"prefill_ms": median_ms(times[name]["prefill"]), "decode_ms": median_ms(times[name]["decode"]),
                     "prefill_roles": pre, "decode_roles": dec}
    os.rmdir(tmp)
    return out


# ---------------------------------------------------------------------------- folders: parent

def compare(specs: list[str], args: argparse.Namespace) -> None:
    names = [s.partition("=")[0] for s in specs]
    results: list[dict] = []
    for _ in range(args.pairs):
        for order in (specs, specs[::-1]):
            cmd = [sys.executable, __file__, "--child", *order, "--threads", str(args.threads),
                   "--pos", str(args.pos), "--steps", str(args.steps), "--prefills", str(args.prefills)]
            res = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
            results.append(json.loads(res.stdout.strip().splitlines()[-1]))
            first = order[0].partition("=")[0]
            print(f"  child {len(results)} ({first} loaded first, load {os.getloadavg()[0]:.1f}): " +
                  ", ".join(f"{n} prefill {results[-1][n]['prefill_ms']:.0f} ms decode "
                            f"{results[-1][n]['decode_ms']:.2f} ms" for n in names), flush=True)
    report(names, results, args)


def report(names: list[str], results: list[dict], args: argparse.Namespace) -> None:
    kind = "CPU time" if args.threads == 1 else "wall time"
    print(f"\n{args.threads} thread(s), position {args.pos}, {len(results)} children (both load orders), "
          f"per-role node time, median over children (ms):\n")
    print("| role | " + " | ".join(f"{n} prefill | {n} decode" for n in names) + " |")
    print("| --- |" + " ---: | ---: |" * len(names))
    roles = sorted({r for res in results for n in names for r in res[n]["decode_roles"]},
                   key=lambda r: -results[0][names[0]]["decode_roles"].get(r, 0))
    for r in [*roles, "step"]:
        cells = []
        for n in names:
            for phase in ("prefill", "decode"):
                if r == "step":
                    v = statistics.median(res[n][f"{phase}_ms"] for res in results)
                else:
                    v = statistics.median(res[n][f"{phase}_roles"].get(r, 0.0) for res in results)
                cells.append(f"{v:.1f}" if phase == "prefill" else f"{v:.2f}")
        label = f"whole run ({kind})" if r == "step" else r
        print(f"| {label} | " + " | ".join(cells) + " |")
    base = names[0]
    for n in names[1:]:
        ratios = {p: [res[base][f"{p}_ms"] / res[n][f"{p}_ms"] for res in results] for p in ("prefill", "decode")}
        gm = {p: math.exp(statistics.fmean(map(math.log, v))) for p, v in ratios.items()}
        print(f"\n{n} speed / {base} speed ({kind}, geometric mean over both load orders): prefill "
              f"{gm['prefill']:.3f}x, decode {gm['decode']:.3f}x (per child: "
              f"{', '.join(f'{x:.3f}' for x in ratios['decode'])})")


# ---------------------------------------------------------------------------- layouts

K_OUT, N_OUT = 3072, 32064
LAYOUTS = {  # name -> [(bits, block, explicit zero points)] summed nodes; exact for Q6_K or not
    "Q6_K exact: 8 bits, block 16 (the export)": [(8, 16, False)],
    "Q6_K exact: 8 bits, block 16, explicit zero points": [(8, 16, True)],
    "Q6_K exact: two 4-bit halves, block 16 (the level-1 layout)": [(4, 16, True), (4, 16, False)],
    "not exact: 8 bits, block 32": [(8, 32, False)],
    "not exact: 8 bits, block 64": [(8, 64, False)],
    "not exact: 8 bits, block 128": [(8, 128, False)],
    "builder: 4 bits, block 32": [(4, 32, False)],
}


def layout_model(parts: list[tuple[int, int, bool]]):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits = [], []
    for i, (bits, block, zp) in enumerate(parts):
        kb = K_OUT // block
        codes = rng.integers(0, 256, (N_OUT, kb, block * bits // 8), dtype=np.uint8)
        inits += [numpy_helper.from_array(codes, f"B{i}"),
                  numpy_helper.from_array(rng.random((N_OUT, kb), dtype=np.float32) * 0.01, f"S{i}")]
        inputs = ["A", f"B{i}", f"S{i}"]
        if zp:
            zshape = (N_OUT, kb) if bits == 8 else (N_OUT, (kb + 1) // 2)
            inits.append(numpy_helper.from_array(np.full(zshape, 128 if bits == 8 else 0, np.uint8), f"Z{i}"))
            inputs.append(f"Z{i}")
        nodes.append(helper.make_node("MatMulNBits", inputs, [f"Y{i}"], domain="com.microsoft", K=K_OUT, N=N_OUT,
                                      bits=bits, block_size=block, accuracy_level=4))
    out = "Y0"
    if len(parts) == 2:
        nodes.append(helper.make_node("Add", ["Y0", "Y1"], ["Y"]))
        out = "Y"
    graph = helper.make_graph(nodes, "layout", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", K_OUT])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["M", N_OUT])], inits)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def layout_child(name: str, threads: int) -> dict:
    """One layout as the only session of this process (as deployed: see the module doc on the first
    session's pages) -> median ms of one token and of a 128-token prompt."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    s = ort.InferenceSession(layout_model(LAYOUTS[name]).SerializeToString(), opts, providers=["CPUExecutionProvider"])
    clock = time.thread_time if threads == 1 else time.perf_counter
    out = {}
    for m, calls in ((1, 30), (128, 3)):
        a = np.random.default_rng(1).standard_normal((m, K_OUT)).astype(np.float32)
        s.run(None, {"A": a})
        ms = []
        for _ in range(calls):
            t0 = clock()
            s.run(None, {"A": a})
            ms.append((clock() - t0) * 1000)
        out[m] = statistics.median(ms)
    return out


def layouts(args: argparse.Namespace) -> None:
    ms: dict[str, list[dict]] = {name: [] for name in LAYOUTS}
    load = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for name in LAYOUTS:
            cmd = [sys.executable, __file__, "--layout-child", name, "--threads", str(args.threads)]
            res = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
            ms[name].append(json.loads(res.stdout.strip().splitlines()[-1]))
        load.append(os.getloadavg()[0])
    print(f"output layer N {N_OUT} x K {K_OUT}, accuracy_level 4, {args.threads} thread(s), each layout alone "
          f"in a fresh process, median of {args.rounds} interleaved rounds (load {min(load):.1f}-{max(load):.1f}, "
          f"{'thread CPU' if args.threads == 1 else 'wall'} time):\n")
    print("| layout | bits / weight on disk (float32 scales) | 1 token, ms | 128 tokens, ms |")
    print("| --- | ---: | ---: | ---: |")
    for name, parts in LAYOUTS.items():
        bits = sum(b + 32 / blk + (b / blk if zp else 0) for b, blk, zp in parts)
        one, prompt = (statistics.median(r[str(m)] for r in ms[name]) for m in (1, 128))
        print(f"| {name} | {bits:.2f} | {one:.2f} | {prompt:.1f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="*", help="NAME=ONNX_FOLDER, two or more")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pos", type=int, default=128)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--prefills", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=2, help="children per load order")
    ap.add_argument("--layouts", action="store_true")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--layout-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.layout_child:
        print(json.dumps(layout_child(args.layout_child, args.threads)))
    elif args.child:
        print(json.dumps(child(args.folders, args.threads, args.pos, args.steps, args.prefills)))
    elif args.layouts:
        layouts(args)
    elif len(args.folders) >= 2:
        compare(args.folders, args)
    else:
        ap.error("give two or more NAME=FOLDER, or --layouts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
