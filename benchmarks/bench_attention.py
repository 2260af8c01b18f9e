"""Speed of the C attention (`kernel.attention_rows`): Phi-3-small block-sparse vs the same layer
forced dense, decode and prompt; and the C prompt attention vs the numpy one it replaced.

1. Decode, Phi-3-small shape (32 query heads, 8 kv heads, head_dim 128, fp16 cache, scale 1/128,
   block 64, 16 local blocks, vertical stride 8, hetero heads): time of one token's attention over
   one layer at context 4096 and 8192 (the query at position ctx-1), sparse vs dense. Each timed
   pass walks `--layers` separate layer caches (like the model's 16 sparse layers), so the cache is
   read from memory, not from the last level cache. Also: the bytes a kv head's GQA group must
   read (the union of its 4 query heads' blocks: 40 of 64 blocks at 4096, 72 of 128 at 8192).
2. Prompt: a 4096-token prompt's attention over one layer (T = 4096 rows at once), sparse vs dense.
3. Phi-3-mini shape (32 heads, 32 kv heads, head_dim 96, fp16 cache): a 512-token prompt's
   attention, numpy (the runtime's former `Model._attend_chunk`, reproduced below) vs the C kernel.

    python benchmarks/bench_attention.py [--threads 2] [--contexts 4096 8192] [--prompt 4096] [--cpu-time]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if "--cpu-time" in sys.argv:  # one BLAS thread: numpy's worker threads would escape the caller's CPU clock
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = "1"

import numpy as np

from pocketlm.blocksparse import BlockSparse, block_mask
from pocketlm.runtime import kernel

H, KV, HD = 32, 8, 128                      # Phi-3-small attention shape
PHI3_SMALL = BlockSparse(64, 16, 8)         # blocksparse_block_size, num_local_blocks, vert_stride
SCALE = 1.0 / HD                            # Phi-3-small: 1 / head_dim (PHI3_SMALL.md section 3)


CLOCK = time.perf_counter  # --cpu-time: time.thread_time (with 1 thread: immune to other processes' load)


def best_time(fn, repeat: int) -> float:
    """Seconds of the fastest of `repeat` calls (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = CLOCK()
        fn()
        best = min(best, CLOCK() - t0)
    return best


def random_cache(n_layers: int, kv: int, n_ctx: int, hd: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """fp16 caches [n_layers, kv, n_ctx, hd] (N(0, 1) values: the score spread of a real model's)."""
    rng = np.random.default_rng(seed)
    shape = (n_layers, kv, n_ctx, hd)
    return (rng.standard_normal(shape, dtype=np.float32).astype(np.float16),
            rng.standard_normal(shape, dtype=np.float32).astype(np.float16))


def group_blocks_read(bs: BlockSparse, ctx: int) -> tuple[int, int]:
    """(key blocks a GQA group of 4 query heads reads at query block ctx-1, blocks in the context)."""
    n_blocks = (ctx - 1) // bs.block_size + 1
    mask = block_mask(bs, H, n_blocks)[:, n_blocks - 1]         # [H, key block]
    union = mask.reshape(KV, H // KV, n_blocks).any(axis=1)       # [KV, key block]
    return int(union[0].sum()), n_blocks


def bench_decode(ctx: int, layers: int, repeat: int) -> dict:
    kc, vc = random_cache(layers, KV, ctx, HD, seed=ctx)
    q = np.random.default_rng(1).standard_normal((1, H * HD), dtype=np.float32)
    out = np.empty((1, H * HD), np.float32)

    def one_token(sparse):
        def run():
            for i in range(layers):
                kernel.attention_rows(q, kc[i], vc[i], H, ctx - 1, scale=SCALE, sparse=sparse, out=out)
        return run

    dense = best_time(one_token(None), repeat) / layers
    sparse = best_time(one_token(PHI3_SMALL), repeat) / layers
    read, total = group_blocks_read(PHI3_SMALL, ctx)
    dense_bytes = 2 * KV * ctx * HD * 2                           # K and V, fp16
    return {"ctx": ctx, "dense_ms": dense * 1e3, "sparse_ms": sparse * 1e3, "ratio": sparse / dense,
            "blocks": f"{read}/{total}", "dense_GBps": dense_bytes / dense / 1e9,
            "sparse_GBps": dense_bytes * read / total / sparse / 1e9}


def bench_prompt(T: int, repeat: int) -> dict:
    kc, vc = random_cache(1, KV, T, HD, seed=T + 1)
    q = np.random.default_rng(2).standard_normal((T, H * HD), dtype=np.float32)
    out = np.empty((T, H * HD), np.float32)
    dense = best_time(lambda: kernel.attention_rows(q, kc[0], vc[0], H, 0, scale=SCALE, out=out), repeat)
    sparse = best_time(lambda: kernel.attention_rows(q, kc[0], vc[0], H, 0, scale=SCALE, sparse=PHI3_SMALL,
                                                     out=out), repeat)
    return {"T": T, "dense_s": dense, "sparse_s": sparse, "ratio": sparse / dense}


ATTN_QUERY_CHUNK = 64


def numpy_attend_chunk(keys_all: np.ndarray, values_all: np.ndarray, q: np.ndarray, pos: int) -> np.ndarray:
    """The runtime's numpy prompt attention before the C kernel (runtime/model.py `_attend_chunk`
    at commit 58d2f73, dense causal, fp16 cache, no window): q [H, T, hd] -> [T, H hd]."""
    n_h, t, hd = q.shape
    n_kv = keys_all.shape[0]
    keys = keys_all[:, : pos + t].astype(np.float32)                   # KVCache.keys widens to float32
    values = values_all[:, : pos + t].astype(np.float32)
    k_pos = np.arange(0, pos + t)
    qg = q.reshape(n_kv, n_h // n_kv, t, hd)                           # [KV, G, T, hd]
    out = np.empty((t, n_h * hd), dtype=np.float32)
    kt = keys.transpose(0, 2, 1)[:, None]                              # [KV, 1, hd, S]
    for c0 in range(0, t, ATTN_QUERY_CHUNK):
        c1 = min(t, c0 + ATTN_QUERY_CHUNK)
        q_pos = np.arange(pos + c0, pos + c1)
        scores = qg[:, :, c0:c1] @ kt                                  # [KV, G, C, S]
        scores *= np.float32(1.0 / np.sqrt(hd))
        allowed = k_pos[None, :] <= q_pos[:, None]                     # [C, S]
        scores[..., ~allowed] = -np.inf
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        a = scores @ values[:, None]                                   # [KV, G, C, hd]
        out[c0:c1] = a.reshape(n_h, c1 - c0, hd).transpose(1, 0, 2).reshape(c1 - c0, n_h * hd)
    return out


def bench_mini_prompt(T: int, repeat: int) -> dict:
    h, kv, hd = 32, 32, 96                                             # phi-3-mini
    kc, vc = random_cache(1, kv, T, hd, seed=3)
    q = np.random.default_rng(4).standard_normal((T, h * hd), dtype=np.float32)
    q_heads = np.ascontiguousarray(q.reshape(T, h, hd).transpose(1, 0, 2))  # [H, T, hd] as model.py had it
    c_out = kernel.attention_rows(q, kc[0], vc[0], h, 0)
    np_out = numpy_attend_chunk(kc[0], vc[0], q_heads, 0)
    err = float(np.abs(c_out - np_out).max())
    t_np = best_time(lambda: numpy_attend_chunk(kc[0], vc[0], q_heads, 0), repeat)
    t_c = best_time(lambda: kernel.attention_rows(q, kc[0], vc[0], h, 0, out=c_out), repeat)
    return {"T": T, "numpy_ms": t_np * 1e3, "c_ms": t_c * 1e3, "speedup": t_np / t_c, "max_abs_diff": err}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--layers", type=int, default=8, help="layer caches walked per timed decode pass")
    ap.add_argument("--prompt", type=int, default=4096, help="prompt length of the prefill comparison (0: skip)")
    ap.add_argument("--mini-prompt", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--cpu-time", action="store_true",
                    help="1 thread, timed by the CPU time of the calling thread (for a shared, loaded machine)")
    args = ap.parse_args()
    global CLOCK
    if args.cpu_time:
        args.threads, CLOCK = 1, time.thread_time
    kernel.set_threads(args.threads)
    clock = "thread CPU time" if args.cpu_time else "wall time"
    print(f"kernel path {kernel.active_path()}, {args.threads} threads, {clock}; Phi-3-small attention: {H} heads, "
          f"{KV} kv heads, head_dim {HD}, fp16 cache, {PHI3_SMALL}")
    print("\ndecode, one token, one layer (ms)")
    print(f"{'context':>8} {'dense':>8} {'sparse':>8} {'ratio':>6} {'blocks read':>12} {'dense GB/s':>11} "
          f"{'sparse GB/s':>12}")
    for ctx in args.contexts:
        r = bench_decode(ctx, args.layers, args.repeat)
        print(f"{r['ctx']:>8} {r['dense_ms']:>8.3f} {r['sparse_ms']:>8.3f} {r['ratio']:>6.2f} {r['blocks']:>12} "
              f"{r['dense_GBps']:>11.1f} {r['sparse_GBps']:>12.1f}")
    if args.prompt:
        r = bench_prompt(args.prompt, max(1, args.repeat // 3))
        print(f"\nprompt of {r['T']} tokens, one layer: dense {r['dense_s']:.3f} s, sparse {r['sparse_s']:.3f} s, "
              f"ratio {r['ratio']:.2f}")
    if args.mini_prompt:
        r = bench_mini_prompt(args.mini_prompt, args.repeat)
        print(f"\nphi-3-mini prompt of {r['T']} tokens, one layer: numpy {r['numpy_ms']:.1f} ms, "
              f"C {r['c_ms']:.1f} ms ({r['speedup']:.1f}x), max |difference| {r['max_abs_diff']:.1e}")


if __name__ == "__main__":
    main()
