"""Phi-3-small at its real shape in pocketlm's runtime: decode against the read-bandwidth roofline,
and what the block-sparse pattern saves against the same file with the pattern forced dense.

    python benchmarks/bench_phi3_small.py [--threads 2] [--contexts 4096 8192]

On the phi-3-small-shaped random Q4_0 file (benchmarks/make_phi3_small_gguf.py, built once), in
one run, each measurement in its own process:
- decode tok/s at context 512 (16-token prompt, 48 decoded), against the roofline: read bandwidth
  / bytes read per token (every weight once; the tied 100352 x 4096 embedding is the output
  matrix, read whole every token; plus the KV cache rows). The bandwidth is sampled at the start
  and, for the figure that counts, between rounds of decode steps in the decoding process
  (benchmarks/roofline.py: this shared machine's bandwidth moves from minute to minute);
- peak RSS of that process against the file size + KV cache + 250 MB;
- at positions 4096 and 8192: the per-token attention time of the 16 block-sparse layers (the C
  kernel on the model's own KV cache, filled with random fp16 rows: attention time does not
  depend on the values), sparse against the pattern forced dense (`load(dense_attention=True)`'s
  rule), and whole decode steps at that position, sparse against forced dense;
- a 4096-token prompt through the first two layers (one block-sparse, one dense) of the same
  shape, sparse against forced dense: prefill time per layer pair.
No peer runs this model on a CPU (llama.cpp declined it), so the comparisons are the roofline and
sparse against dense.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import make_phi3_small_gguf  # noqa: E402  (sibling scripts)
from roofline import paired_roofline  # noqa: E402

from pocketlm.hostinfo import host_cpu  # noqa: E402

MB = 1e6
MAX_CONTEXT = 8192  # Phi-3-small-8k's max_position_embeddings


def vm_hwm_mb() -> float:
    """Peak resident set of this process (Linux /proc; ru_maxrss elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / MB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB


def prompt_ids(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(300, 100000, n).tolist()


# ---------------------------------------------------------------------------- children

def child_decode(path: str, threads: int) -> dict:
    from pocketlm.export.gguf_reader import GGUFReader
    from pocketlm.runtime.model import load

    with GGUFReader(path) as r:
        weight_bytes = sum(t.nbytes for t in r.tensors.values())  # tied: the embedding is read whole
    model = load(path, threads=threads, ctx=512)
    state = {"logits": model.forward(prompt_ids(16))}

    def step() -> None:
        state["logits"] = model.forward([int(np.argmax(state["logits"]))])

    for _ in range(4):  # untimed: pages in every weight (the packed copy the first load wrote)
        step()
    t0 = time.perf_counter()
    n = 48
    for _ in range(n):
        step()
    decode_s = time.perf_counter() - t0
    out = {"decode_tps": n / decode_s, "peak_rss_mb": vm_hwm_mb(), "kv_mb": model.cache.nbytes / MB,
           "kv_bytes_per_token": _kv_bytes(model, 20 + n // 2)}
    # then the roofline, sampled between rounds of decode steps (after the peak RSS: its buffer)
    per_token = weight_bytes + _kv_bytes(model, model.n_past + 30)
    return {**out, **paired_roofline(step, per_token, threads).as_dict()}


def _kv_bytes(model, position: int) -> int:
    """KV cache bytes one decode step reads at `position` (dense layers all rows, sparse layers the
    visible blocks' rows)."""
    cfg = model.cache
    per_row = model.cfg.num_key_value_heads * model.cfg.head_dim * cfg.k.itemsize * 2  # k and v
    rows = 0
    for layer in model.layers:
        if layer.sparse is None:
            rows += position + 1
        else:
            block, local, stride, step = layer.sparse
            qb = position // block
            # a KV head's rows are read once per visible block of any of its query heads
            seen = {kb for h in range(model.cfg.num_attention_heads) for kb in range(qb + 1)
                    if qb - kb < local or (kb + h * step + 1) % stride == 0}
            rows += min(position + 1, len(seen) * block)
    return rows * per_row


def child_attention(path: str, threads: int, position: int, repeats: int) -> dict:
    """Attention per token on the block-sparse layers at `position`, sparse vs dense; then whole
    decode steps at that position, sparse vs forced dense."""
    from pocketlm.runtime import _kernel
    from pocketlm.runtime.model import load

    out: dict = {}
    for dense in (False, True):
        model = load(path, threads=threads, ctx=MAX_CONTEXT, dense_attention=dense)
        cfg, cache = model.cfg, model.cache
        position = min(position, cache.n_ctx - 12)  # room for the 1 + 2 warm-up + 8 timed steps
        rng = np.random.default_rng(0)
        fill = rng.standard_normal((cfg.num_key_value_heads, position, cfg.head_dim)).astype(np.float16)
        for i in range(cfg.num_hidden_layers):
            cache.k[i, :, :position] = fill
            cache.v[i, :, :position] = fill
        cache.length = position
        sparse_layers = [i for i in range(cfg.num_hidden_layers) if cfg.layer_sparsity(i) is not None]
        q = rng.standard_normal((1, cfg.num_attention_heads * cfg.head_dim)).astype(np.float32)
        attn = np.empty_like(q)
        pattern = model.layers[sparse_layers[0]].sparse  # None when forced dense
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for i in sparse_layers:
                _kernel.attention_rows(q, cache.k[i], cache.v[i], None, None, cfg.num_attention_heads,
                                       cfg.num_key_value_heads, cfg.head_dim, cache.n_ctx, position, 0,
                                       cfg.attention_scale, pattern, attn)
            times.append(time.perf_counter() - t0)
        logits = model.forward(prompt_ids(1))  # decodes at `position` (the cache says so)
        for _ in range(2):  # untimed: pages in every weight
            logits = model.forward([int(np.argmax(logits))])
        steps = 8
        t0 = time.perf_counter()
        for _ in range(steps):
            logits = model.forward([int(np.argmax(logits))])
        key = "dense" if dense else "sparse"
        out[f"{key}_attention_ms"] = 1e3 * float(np.median(times))
        out[f"{key}_decode_tps"] = steps / (time.perf_counter() - t0)
        out["sparse_layers"] = len(sparse_layers)
        out["position"] = position
        del model, cache
    return out


def child_prefill(path: str, threads: int, n_prompt: int) -> dict:
    """The prompt through the file's layers, sparse and forced dense; and the block-sparse layer's
    attention alone over the prompt, in the runtime's chunks of 256 rows, both patterns."""
    from pocketlm.runtime import _kernel
    from pocketlm.runtime.model import DEFAULT_BATCH, load

    out: dict = {}
    for dense in (True, False):
        model = load(path, threads=threads, ctx=n_prompt, dense_attention=dense)
        ids = prompt_ids(n_prompt, seed=2)
        t0 = time.perf_counter()
        model.forward(ids)
        out["dense_s" if dense else "sparse_s"] = time.perf_counter() - t0
    cfg, cache = model.cfg, model.cache
    layer = next(i for i in range(cfg.num_hidden_layers) if cfg.layer_sparsity(i) is not None)
    q = np.random.default_rng(3).standard_normal((n_prompt, cfg.num_attention_heads * cfg.head_dim),
                                                  dtype=np.float32)
    attn = np.empty_like(q)
    for name, pattern in (("dense", None), ("sparse", model.layers[layer].sparse)):
        t0 = time.perf_counter()
        for c0 in range(0, n_prompt, DEFAULT_BATCH):
            rows = slice(c0, min(n_prompt, c0 + DEFAULT_BATCH))
            _kernel.attention_rows(q[rows], cache.k[layer], cache.v[layer], None, None, cfg.num_attention_heads,
                                   cfg.num_key_value_heads, cfg.head_dim, cache.n_ctx, c0, 0, cfg.attention_scale,
                                   pattern, attn[rows])
        out[f"{name}_attention_s"] = time.perf_counter() - t0
    return out


CHILDREN = {"decode": child_decode, "attention": child_attention, "prefill": child_prefill}


def run_child(name: str, *args: str | int) -> dict:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}  # as `pocketlm run` does
    res = subprocess.run([sys.executable, __file__, "--child", name, *map(str, args)], capture_output=True,
                         text=True, env=env)
    if res.returncode != 0:
        return {"error": (res.stderr.strip().splitlines() or ["crashed"])[-1][:300]}
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- report

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--prompt", type=int, default=4096, help="prompt tokens for the prefill comparison")
    ap.add_argument("--repeats", type=int, default=20, help="attention timings per position (median)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        name, *rest = args.child
        print(json.dumps(CHILDREN[name](rest[0], *map(int, rest[1:]))))
        return

    from pocketlm.export.gguf_reader import GGUFReader
    from pocketlm.hostinfo import read_bandwidth_gbs

    path = make_phi3_small_gguf.ensure("q4_0")
    pair = make_phi3_small_gguf.ensure("q4_0", layers=2)
    with GGUFReader(path) as r:
        weight_bytes = sum(t.nbytes for t in r.tensors.values())  # tied: the embedding is read whole
    file_mb = path.stat().st_size / MB
    print(f"CPU: {host_cpu()}, {os.cpu_count()} cores; threads {args.threads}; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"file: {path} ({file_mb:.0f} MB)")
    with open(path, "rb", buffering=0) as f:  # warm the page cache
        while f.read(64 << 20):
            pass
    bw = read_bandwidth_gbs(args.threads, 2 * 10**9)
    print(f"read bandwidth ({args.threads} threads): {bw:.1f} GB/s")

    d = run_child("decode", path, args.threads)
    if "error" in d:
        print("decode:", d["error"])
    else:
        per_token = weight_bytes + d["kv_bytes_per_token"]
        roof = bw * 1e9 / per_token
        print(f"decode at context 512: {d['decode_tps']:.2f} tok/s; roofline at the start's bandwidth "
              f"{roof:.2f} tok/s ({per_token / MB:.0f} MB per token) -> {d['decode_tps'] / roof:.0%}")
        print(f"decode against the bandwidth sampled between its rounds (benchmarks/roofline.py): "
              f"{d['roofline_fraction']:.0%} of the roofline (median of "
              f"{', '.join(f'{f:.0%}' for f in d['roofline_fractions'])}; probe "
              f"{', '.join(f'{g:.1f}' for g in d['probe_gbs'])} GB/s, decode read "
              f"{', '.join(f'{g:.1f}' for g in d['achieved_gbs'])} GB/s)")
        budget = file_mb + d["kv_mb"] + 250
        print(f"peak RSS {d['peak_rss_mb']:.0f} MB; budget file + KV + 250 MB = {budget:.0f} MB "
              f"({'within' if d['peak_rss_mb'] <= budget else 'OVER'})")

    print(f"{'position':>8} {'attention ms/token, sparse':>27} {'dense':>7} {'ratio':>6} "
          f"{'decode tok/s sparse':>20} {'dense':>7} {'ratio':>6}")
    for pos in args.contexts:
        a = run_child("attention", path, args.threads, pos, args.repeats)
        if "error" in a:
            print(f"{pos:>8} error: {a['error']}")
            continue
        print(f"{a['position']:>8} {a['sparse_attention_ms']:>27.2f} {a['dense_attention_ms']:>7.2f} "
              f"{a['sparse_attention_ms'] / a['dense_attention_ms']:>6.2f}x {a['sparse_decode_tps']:>20.2f} "
              f"{a['dense_decode_tps']:>7.2f} {a['sparse_decode_tps'] / a['dense_decode_tps']:>6.2f}x")

    p = run_child("prefill", pair, args.threads, args.prompt)
    if "error" in p:
        print("prefill:", p["error"])
    else:
        print(f"prefill of {args.prompt} tokens through one sparse + one dense layer (the full width, plus "
              f"the output head): sparse {p['sparse_s']:.1f} s, forced dense {p['dense_s']:.1f} s "
              f"({p['sparse_s'] / p['dense_s']:.2f}x); the sparse layer's attention alone: "
              f"{p['sparse_attention_s']:.2f} s vs {p['dense_attention_s']:.2f} s dense "
              f"({p['sparse_attention_s'] / p['dense_attention_s']:.2f}x)")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
