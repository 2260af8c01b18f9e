"""Where a decode step's time goes, per layer: the step's own kernel pieces timed one at a time.

    python benchmarks/profile_decode.py [--recipe q4_0] [--threads 1 2] [--pos 128 1024 2048]

On the phi-3-mini-shaped file (make_phi3_mini_gguf.py), for each thread count: the whole decode
step (`_kernel.decode_step`, every layer in one call, best of --steps), then each piece of a layer
replayed through its own kernel entry on all 32 layers' weights in turn (so weights stream from
DRAM as in the real step, never from the 32 MB L3): the four matvecs (qkv, o, gate_up, down),
attention over the cache at the given positions, the norms / RoPE / activation, and the thread
pool's cost per hand-over (a matvec too small to measure anything else, at n threads minus at 1).
Times are per layer in microseconds; "GB/s" is weight bytes over the matvec's time; the Python
call overhead of one kernel call (measured on a no-op call) is subtracted from every piece.
Pieces add up to a little more than the step (the step has no Python between them and keeps
the activations in cache), so the last column is the sum over the step's own time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import make_phi3_mini_gguf  # noqa: E402  (a sibling script)

from pocketlm.hostinfo import host_cpu  # noqa: E402
from pocketlm.runtime import _kernel  # noqa: E402
from pocketlm.runtime import kernel as kern  # noqa: E402
from pocketlm.runtime.model import load  # noqa: E402


def best(fn, repeat: int) -> float:
    t = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        t = min(t, time.perf_counter() - t0)
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="q4_0", choices=("q4_0", "q4_k_m", "q8_0"))
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--pos", nargs="+", type=int, default=[128, 2048])
    ap.add_argument("--steps", type=int, default=8, help="decode steps timed (best kept)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    path = make_phi3_mini_gguf.ensure(args.recipe)
    ctx = max(args.pos) + 8
    model = load(path, threads=args.threads[0], ctx=ctx, kv="f16")
    cfg = model.cfg
    D, H, KV, hd, F = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, \
        cfg.intermediate_size
    n_layers = cfg.num_hidden_layers
    print(f"cpu: {host_cpu()} ({os.cpu_count()} cores), path {kern.active_path()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"file: {path.name}; per layer: qkv {model.layers[0].qkv.raw.nbytes / 1e6:.1f} MB, "
          f"o {model.layers[0].o.raw.nbytes / 1e6:.1f} MB, gate_up {model.layers[0].gate_up.raw.nbytes / 1e6:.1f} MB, "
          f"down {model.layers[0].down.raw.nbytes / 1e6:.1f} MB")
    rng = np.random.default_rng(0)
    # a cache with finite values everywhere (random keys/values at every position)
    model.cache.k[...] = rng.standard_normal(model.cache.k.shape[1:]).astype(np.float16)[None]
    model.cache.v[...] = model.cache.k

    noop = best(lambda: [_kernel.get_threads() for _ in range(1000)], 5) / 1000
    x_d = rng.standard_normal(D).astype(np.float32)
    x_f = rng.standard_normal(F).astype(np.float32)
    pieces = {"qkv": (x_d, "qkv"), "o": (x_d, "o"), "gate_up": (x_d, "gate_up"), "down": (x_f, "down")}
    for t in args.threads:
        kern.set_threads(t)
        print(f"\n== {t} thread(s) (load average {os.getloadavg()[0]:.2f}); microseconds per layer")
        # pool hand-over: 256 rows (16 chunks of 16 rows) of 512 values, ~73 KB: all cached
        tiny = model.layers[0].qkv.raw.reshape(-1)[:256 * kern.row_bytes(model.layers[0].qkv.gtype, 512)]
        xt, yt = x_d[:512].copy(), np.empty(256, np.float32)
        calls = 2000

        def tiny_calls(tiny=tiny, xt=xt, yt=yt, calls=calls) -> None:
            for _ in range(calls):
                _kernel.matvec(tiny, model.layers[0].qkv.gtype, 256, 512, xt, yt)

        pool_us = {}
        for n in (1, t):
            kern.set_threads(n)
            pool_us[n] = (best(tiny_calls, args.repeat) / calls - noop) * 1e6
        kern.set_threads(t)
        handover = pool_us[t] - pool_us[1]
        mat_us, gbs = {}, {}
        for name, (x, attr) in pieces.items():
            lins = [getattr(L, attr) for L in model.layers]
            y = np.empty(lins[0].rows, np.float32)

            def run(lins=lins, x=x, y=y) -> None:
                for lin in lins:
                    _kernel.matvec(lin.raw, lin.gtype, lin.rows, lin.K, x, y)

            run()
            secs = best(run, args.repeat) / n_layers - noop
            mat_us[name] = secs * 1e6
            gbs[name] = lins[0].raw.nbytes / secs / 1e9
        h = rng.standard_normal((1, D)).astype(np.float32)
        out = np.empty_like(h)
        L0 = model.layers[0]
        norm_us = (best(lambda h=h, L0=L0, out=out: [_kernel.norm(h, L0.attn_norm.weight, None, 1e-5, out)
                                                    for _ in range(1000)], args.repeat) / 1000 - noop) * 1e6
        qkv = rng.standard_normal((1, (H + 2 * KV) * hd)).astype(np.float32)
        cos, sin = model._rope[False][0][:1], model._rope[False][1][:1]
        rope_us = (best(lambda qkv=qkv, cos=cos, sin=sin: [_kernel.rope(qkv, H + KV, hd, cfg.rope_dim, cos, sin)
                                                           for _ in range(1000)], args.repeat) / 1000 - noop) * 1e6
        gu = rng.standard_normal((1, 2 * F)).astype(np.float32) * 0.1
        act = np.empty((1, F), np.float32)
        act_us = (best(lambda gu=gu, act=act: [_kernel.gated_act(gu, 0, 0.0, act) for _ in range(1000)],
                       args.repeat) / 1000 - noop) * 1e6
        att_out = np.empty((1, H * hd), np.float32)
        att_us = {}
        for pos in args.pos:
            def att(pos=pos, qkv=qkv, att_out=att_out) -> None:
                for i in range(n_layers):
                    _kernel.attention_rows(qkv, model.cache.k[i], model.cache.v[i], None, None, H, KV, hd, ctx, pos,
                                           0, 1.0 / np.sqrt(hd), None, att_out)
            att()
            att_us[pos] = (best(att, args.repeat) / n_layers - noop) * 1e6
        # the whole step, at the first position asked
        step_us = {}
        for pos in args.pos:
            hs = (rng.standard_normal(D) * 0.1).astype(np.float32)
            plan = model._decode_plan()
            c, s = model._rope[False][0][pos], model._rope[False][1][pos]

            def step(plan=plan, hs=hs, c=c, s=s, pos=pos) -> None:
                h1 = hs.copy()
                _kernel.decode_step(plan, h1, c, s, pos)

            step()
            step_us[pos] = best(step, args.steps) / n_layers * 1e6
        weights = sum(getattr(model.layers[0], a).raw.nbytes for a in pieces)
        mats = sum(mat_us.values())
        print("  matvecs: " + ", ".join(f"{k} {v:7.1f} ({gbs[k]:5.1f} GB/s)" for k, v in mat_us.items())
              + f"; total {mats:7.1f} us = {weights / mats / 1e3:5.1f} GB/s")
        print(f"  norms 2 x {norm_us:5.1f}, rope {rope_us:5.1f}, activation {act_us:5.1f}; "
              f"pool hand-over {handover:5.1f} us x 5 per layer "
              f"(tiny matvec {pool_us[1]:.1f} us at 1 thread, {pool_us[t]:.1f} at {t})")
        for pos in args.pos:
            parts = mats + att_us[pos] + 2 * norm_us + rope_us + act_us + (5 * handover if t > 1 else 0)
            print(f"  position {pos:5d}: attention {att_us[pos]:7.1f}; sum of pieces {parts:7.1f} vs the step "
                  f"{step_us[pos]:7.1f} us/layer ({n_layers * step_us[pos] / 1e3:6.1f} ms/token, "
                  f"{1e6 / (n_layers * step_us[pos]):5.2f} tok/s without the head)")


if __name__ == "__main__":
    main()
