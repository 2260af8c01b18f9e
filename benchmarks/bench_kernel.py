"""Speed of the C quantized matvec vs the machine's memory read bandwidth.

A decode step reads every weight once, so a matvec should stream weights at close to the
bandwidth a plain numpy sum achieves. For phi-3-mini shapes (qkv 3072->9216, gate_up 3072->16384,
down 8192->3072), each weight type and each code path the CPU supports, with 1 and 2 threads, this
prints GB/s of weights read and the fraction of the measured read bandwidth. Matrices are laid out
consecutively in a buffer much larger than the caches (like the layers of a model) and each timed
pass walks all of them. "_packed" types are the load-time layouts (one SIMD lane per 32-value
block) the runtime uses where the path has them. Then the batched (prefill) product, one thread,
3072 x 3072: GMAC/s with 15 activation rows (the multi-activation kernels where the code path
has one for the type, else row by row) and with 128 (the register-tiled path where the code path
has one, for packed Q4_0 on AVX-512 from 128 on).

    python benchmarks/bench_kernel.py [--buffer-mb 1536] [--paths avx2 avx512] [--types Q4_0 Q8_0]
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np

from pocketlm.runtime import kernel

SHAPES = {"qkv": (9216, 3072), "gate_up": (16384, 3072), "down": (3072, 8192)}  # (rows N, K)
Q4_0, Q4_1, Q8_0, Q4_K, Q6_K = 2, 3, 8, 12, 14
TYPES = {
    "Q4_0": Q4_0, "Q4_0_packed": kernel.Q4_0_PACKED, "Q4_1": Q4_1, "Q8_0": Q8_0, "Q8_0_packed": kernel.Q8_0_PACKED,
    "Q4_K": Q4_K, "Q4_K_packed": kernel.Q4_K_PACKED, "Q6_K": Q6_K,
}
SOURCE = {kernel.Q4_0_PACKED: Q4_0, kernel.Q8_0_PACKED: Q8_0, kernel.Q4_K_PACKED: Q4_K}  # packed -> GGUF type
# byte offsets of the fp16 scale fields of each block (set to a valid value; the rest is random)
SCALE_FIELDS = {Q4_0: [0], Q4_1: [0, 2], Q8_0: [0], Q4_K: [0, 2], Q6_K: [208]}


def read_bandwidth(nbytes: int, threads: int, repeats: int = 3) -> float:
    """GB/s of numpy float32 sums over `nbytes`, split across `threads` Python threads (numpy
    releases the GIL inside the reduction)."""
    a = np.ones(nbytes // 4, dtype=np.float32)
    parts = np.array_split(a, threads)
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        workers = [threading.Thread(target=p.sum) for p in parts]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = max(best, a.nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def fill_blocks(buf: np.ndarray, gtype: int) -> None:
    """Turn random bytes into valid blocks: finite fp16 scales (0.01) in every scale field."""
    gtype = SOURCE.get(gtype, gtype)
    _, nbytes = kernel.block_shape(gtype)
    blocks = buf[: buf.size // nbytes * nbytes].reshape(-1, nbytes)
    half = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    for off in SCALE_FIELDS[gtype]:
        blocks[:, off : off + 2] = half


def matrices(buf: np.ndarray, gtype: int, rows: int, K: int) -> list[np.ndarray]:
    size = rows * kernel.row_bytes(gtype, K)
    if buf.size < size:
        raise SystemExit(f"bench_kernel: --buffer-mb {buf.size >> 20} holds no {rows} x {K} matrix "
                         f"({size / 2**20:.0f} MB); give at least {-(-size >> 20)}")
    return [buf[i * size : (i + 1) * size] for i in range(buf.size // size)]


def time_pass(mats: list[np.ndarray], gtype: int, rows: int, K: int, x: np.ndarray, y: np.ndarray,
              repeats: int) -> float:
    """Best seconds for one walk over all matrices."""
    for m in mats:  # warm-up: page faults, thread start
        kernel.matvec(m, gtype, rows, K, x, y)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for m in mats:
            kernel.matvec(m, gtype, rows, K, x, y)
        best = min(best, time.perf_counter() - t0)
    return best


# phi-3-mini per layer: (rows, K) of each matmul and the shape whose speed stands for it
PHI3_LAYER = [
    ((9216, 3072), "qkv"), ((3072, 3072), "qkv"), ((16384, 3072), "gate_up"), ((3072, 8192), "down"),
]


def decode_estimate(gtype: int, gbs: dict[str, float]) -> str:
    """Weight-read time of one phi-3-mini decode step (32 layers) at the measured speeds."""
    values, nbytes = kernel.block_shape(SOURCE.get(gtype, gtype))
    secs = sum(rows * K // values * nbytes / (gbs[s] * 1e9) for (rows, K), s in PHI3_LAYER) * 32
    return f"{1e3 * secs:6.1f} ms/token ({1 / secs:5.1f} tok/s bound)"


def bench_dense(buf: np.ndarray, types: list[str], paths: list[str], threads: list[int],
                bw: dict[int, float], repeats: int) -> None:
    header = " ".join(f"{f'{t} thr GB/s (% bw)':>20}" for t in threads)
    print(f"\n{'type':<12} {'path':<8} {'shape':<8} {header}")
    for tname in types:
        gtype = TYPES[tname]
        raw_type = SOURCE.get(gtype, gtype)
        fill_blocks(buf, raw_type)
        for path in paths:
            kernel.use_path(path)
            speeds: dict[int, dict[str, float]] = {t: {} for t in threads}
            for sname, (rows, K) in SHAPES.items():
                mats = matrices(buf, raw_type, rows, K)
                if gtype in SOURCE:
                    mats = [kernel.repack(m, raw_type, rows, K).reshape(-1) for m in mats]
                x = np.random.default_rng(0).standard_normal(K).astype(np.float32)
                y = np.empty(rows, np.float32)
                cells = []
                for t in threads:
                    kernel.set_threads(t)
                    secs = time_pass(mats, gtype, rows, K, x, y, 1 if path == "scalar" else repeats)
                    gbs = sum(m.nbytes for m in mats) / secs / 1e9
                    speeds[t][sname] = gbs
                    cells.append(f"{gbs:8.1f} ({100 * gbs / bw[t]:5.1f} %)")
                print(f"{tname:<12} {path:<8} {sname:<8} " + " ".join(f"{c:>20}" for c in cells), flush=True)
                del mats
            est = ", ".join(f"{t} thr {decode_estimate(gtype, speeds[t])}" for t in threads)
            print(f"{'':<12} {path:<8} phi-3-mini decode weights (no attention): {est}")


def bench_batched(types: list[str], paths: list[str], repeats: int) -> None:
    rows = K = 3072
    print("\nbatched product, 1 thread, 3072 x 3072: GMAC/s small batch (M=15) -> tiled (M=128)")
    kernel.set_threads(1)
    rng = np.random.default_rng(2)
    for name in types:
        gtype = TYPES[name]
        src = SOURCE.get(gtype, gtype)
        bv, bb = kernel.block_shape(src)
        w = np.frombuffer(rng.bytes(rows * K // bv * bb), dtype=np.uint8).copy()
        fill_blocks(w, src)
        if gtype in SOURCE:
            w = kernel.repack(w, src, rows, K)
        cells = []
        for path in paths:
            kernel.use_path(path)
            speed = []
            for M in (15, 128):
                X = rng.standard_normal((M, K)).astype(np.float32)
                best = min(_timed_matmul(w, gtype, rows, K, X) for _ in range(repeats))
                speed.append(rows * K * M / best / 1e9)
            cells.append(f"{path} {speed[0]:.0f} -> {speed[1]:.0f}")
        print(f"  {name:<12} " + "   ".join(cells))


def _timed_matmul(w: np.ndarray, gtype: int, rows: int, K: int, X: np.ndarray) -> float:
    t0 = time.perf_counter()
    kernel.matmul(w, gtype, rows, K, X)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--buffer-mb", type=int, default=1536, help="weights buffer walked per pass (>> caches)")
    ap.add_argument("--types", nargs="+", default=list(TYPES), choices=list(TYPES))
    ap.add_argument("--paths", nargs="+", default=kernel.available_paths())
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-batched", action="store_true")
    args = ap.parse_args()

    print(f"cpu features: {' '.join(kernel.cpu_features())}; paths: {' '.join(kernel.available_paths())}")
    bw = {t: read_bandwidth(args.buffer_mb << 20, t) for t in args.threads}
    print("read bandwidth (numpy sum): " + ", ".join(f"{t} thr {bw[t]:.1f} GB/s" for t in args.threads))
    buf = np.frombuffer(np.random.default_rng(0).bytes(args.buffer_mb << 20), dtype=np.uint8).copy()
    bench_dense(buf, args.types, args.paths, args.threads, bw, args.repeats)
    if not args.skip_batched:
        bench_batched(args.types, args.paths, args.repeats)


if __name__ == "__main__":
    main()
