"""GPTQ (Frantar et al. 2022): quantize the columns of W one at a time and spread each column's
rounding error over the columns not yet quantized, weighted by the inverse Hessian of the layer's
output error, H = 2/n X^T X for calibration inputs X [n, in].

Written into GGUF blocks: a block's scale fields (Q4_0 d; Q4_1 d, m; Q8_0 d; Q4_K and Q5_K d, dmin
and the 8 sub-block scales/mins; Q6_K d and 16 sub-block scales) are chosen when the sweep first
reaches a column of that block (for K-quants: of that 256-column super-block), by the importance-weighted
scale search of quantize/search.py (importance = the imatrix, mean x^2 = diag(H)/2) on the
error-updated, not yet quantized weights of the whole block. The sweep then rounds each column
to the nearest code of its fixed grid: code = clamp(round((w - offset) / step) + zero).

act_order sorts the columns by descending diag(H). Blocks stay contiguous runs of 32/256 columns
of the ORIGINAL order, so a block's columns are scattered over the sweep; its fields are still
chosen at the first of them to be reached, from the current weights of all its columns (those
beyond the current lazy batch get the batch's pending updates applied first). This is the
"dynamic groups" behaviour, not "static groups" (all scales chosen before the sweep).

Float target (`cross`): with inputs X from the already quantized model and X_f = X + Delta from
the float model, GPTQ on W* = W + W D (H + ridge I)^-1, D = Delta^T X, minimises the error against
the float model's outputs (see `float_target_weight`); W* is computed from an inverse Cholesky
factor of H + ridge I (U^T U = (H + ridge I)^-1) by matrix products, before GPTQ's own factor.

Numerics and memory: H is accumulated in float32 batches of at least in/4 rows (2048 from 1024
inputs; X^T X as symmetric rank-k updates: numpy calls BLAS syrk for `x.T @ x`, half a general
product's flops, split over two threads with `workers`). Its
factorization, the float target and the sweep run in `dtype` (float32 by default, as in the
reference implementation; numpy's own linalg would compute in float64 with two extra copies): one
working copy of H in sweep order, factorized and inverted, and rows of W `row_chunk` at a time (rows
are independent in GPTQ). With torch installed the Cholesky factorization runs in place in torch's
LAPACK (`torch.linalg.cholesky_ex`) and the triangular inverse and the float target's solves are
torch triangular solves (measured on this 2-core machine at in 3072: 1.0 cpu-s against 3.7-5.2
for the blocked numpy path, which stays as the numpy-only fallback: its diagonal blocks and panels
in LAPACK, the trailing updates as float32 matrix products, no second [in, in] array). Beyond the
caller's arrays that is two to three [in, in] matrices in `dtype` plus one chunk of rows: under
1 GB at phi-3-mini's ffn_down (in 8192).
Damping: percdamp (default 1 %) of mean(diag H) added to the diagonal. A Hessian that is still not
positive definite is damped 10x more, up to 6 times (then np.linalg.LinAlgError). Dead input
channels (diag H == 0: never active in the calibration set) get H[j, j] = 1 and W[:, j] = 0
before the sweep, as in the reference implementation; their weights do not affect the calibrated
output, and the imatrix search gives them a tiny importance.

Fused weights: Phi-3's attn_qkv ([q | k | v] rows) and ffn_up ([gate | up] rows) share one input,
hence one Hessian; rows of W are independent in GPTQ, so the fused matrix is passed whole, with
that single H. Nothing else is needed.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..errors import PocketLMError
from .formats import GGMLType, QuantFormat, check_quantizable, quantize
from .search import checked_importance, row_sigma2, search_fields, value_weights

F32 = np.float32
Product = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (a [m, k], b [n, k]) -> a @ b.T [m, n] float32
DAMP_RETRIES = 6
ROW_CHUNK = 4096      # rows of W swept at a time (bounds the sweep's copies of W; 8192 was no faster)
SPLIT_MIN = 1024      # inputs from which X^T X is split over two threads (HessianAccumulator)
FLUSH_ROWS = 2048     # calibration rows buffered before a pass over the [in, in] sums (at least in/4;
                      # below SPLIT_MIN inputs 256: there a pass is cheap)
TARGET_DAMP = 0.1     # the float target's ridge, fraction of mean(diag H)
INVERT_BASE = 256     # triangular inverse: blocks up to this size go to LAPACK
CHOLESKY_BLOCK = 256  # blocked in-place Cholesky: diagonal block size


@contextlib.contextmanager
def timed(times: dict[str, float] | None, part: str) -> Iterator[None]:
    """Adds the block's wall seconds to times[part] (times None: nothing). For the profile of
    pipeline.Options.profile."""
    if times is None:
        yield
        return
    t0 = time.perf_counter()
    try:
        yield
    finally:
        times[part] = times.get(part, 0.0) + time.perf_counter() - t0


def torch_linalg():
    """The torch module when it is installed and not switched off (POCKETLM_NO_TORCH=1, for testing
    the numpy-only path), else None. Used for the Cholesky factorizations and triangular solves,
    where it is about 4x faster than the blocked numpy fallback on this machine; results agree to
    float32 rounding."""
    if os.environ.get("POCKETLM_NO_TORCH"):
        return None
    try:
        import torch
    except ImportError:
        return None
    return torch


class HessianAccumulator:
    """Running H = 2/n sum_t x_t x_t^T over calibration rows x_t [in], added a batch at a time
    (sums in float32: rows are added in batches of at least in/4, so there are few additions).

    With `add_pair` it also sums D = sum_t (x_float_t - x_t) x_t^T, the statistic of the float target
    (see `float_target_weight`). Rows are buffered until FLUSH_ROWS (or in/4) are pending, so that
    short batches (one calibration sequence) do not each pay a pass over the [in, in] sums.
    cross_product(a, b) = a^T b computes D's terms (default numpy float32; calib_matmul's bfloat16).
    workers >= 2 splits X^T X over two threads (`_add_xtx`)."""

    def __init__(self, n_in: int, cross_product: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
                 workers: int = 1):
        self._product = cross_product or (lambda a, b: a.T @ b)  # a, b [n, in] -> a^T b [in, in] float32
        self._split = n_in // 2 if workers >= 2 and n_in >= SPLIT_MIN else 0  # (0: one syrk)
        self._xtx = np.zeros((n_in, n_in), dtype=F32)  # sum x x^T (float32: a few large batches)
        self._cross: np.ndarray | None = None                  # [in, in] float32 sum (x_float - x) x^T
        self._pending: list[tuple[np.ndarray, np.ndarray | None]] = []
        self._pending_rows = 0
        self.flush_rows = max(FLUSH_ROWS if n_in >= SPLIT_MIN else 256, n_in // 4)
        self.paired: bool | None = None  # whether the rows come with float rows (all or none)
        self.count = 0

    def add(self, x: np.ndarray) -> None:
        """x [..., in] activations."""
        self._push(self._rows(x), None)

    def add_pair(self, x: np.ndarray, x_float: np.ndarray) -> None:
        """x [..., in] as the quantized prefix of the model gives them, x_float the same rows as the
        float model gives them."""
        x, x_float = self._rows(x), self._rows(x_float)
        if x_float.shape != x.shape:
            raise PocketLMError(f"float-model activations {x_float.shape} do not pair with {x.shape}")
        self._push(x, x_float)

    def _push(self, x: np.ndarray, x_float: np.ndarray | None) -> None:
        if self.paired is None:
            self.paired = x_float is not None
        if self.paired != (x_float is not None):
            raise PocketLMError("a Hessian's calibration rows must all be paired with float rows, or none")
        self._pending.append((x, x_float))
        self._pending_rows += x.shape[0]
        self.count += x.shape[0]
        if self._pending_rows >= self.flush_rows:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        x = np.concatenate([p[0] for p in self._pending])
        self._add_xtx(x)
        if self.paired:
            delta = np.concatenate([p[1] for p in self._pending])
            delta -= x
            if self._cross is None:
                self._cross = np.zeros(self._xtx.shape, F32)
            self._cross += self._product(delta, x)
        self._pending, self._pending_rows = [], 0

    def _add_xtx(self, x: np.ndarray) -> None:
        """_xtx += x^T x for x [n, in]. Split at k = in/2 (x = [a | b]): a^T a and b^T b (symmetric
        rank-k updates: numpy calls syrk, n k^2 / 2 multiply-adds each) on one thread, b^T a (a general
        product, n k^2) on another: equal halves of the work on two cores, whatever BLAS threads
        numpy has (the CLI runs OpenBLAS single-threaded). The upper block is mirrored on reading."""
        k = self._split
        if not k:
            self._xtx += x.T @ x
            return
        a, b = x[:, :k], x[:, k:]

        def diagonal() -> None:
            self._xtx[:k, :k] += a.T @ a
            self._xtx[k:, k:] += b.T @ b

        def lower() -> None:
            self._xtx[k:, :k] += b.T @ a

        with ThreadPoolExecutor(2) as pool:
            for f in [pool.submit(diagonal), pool.submit(lower)]:
                f.result()

    @property
    def xtx(self) -> np.ndarray:
        """[in, in] float32 sum x x^T."""
        self._flush()
        k = self._split
        if k:
            self._xtx[:k, k:] = self._xtx[k:, :k].T
        return self._xtx

    @property
    def cross(self) -> np.ndarray | None:
        """[in, in] float32 sum (x_float - x) x^T, or None without paired rows."""
        self._flush()
        return self._cross

    def scale_inputs(self, s: np.ndarray) -> None:
        """The inputs become x / s (s [in] > 0, e.g. AWQ scales folded into the layer before)."""
        self._flush()
        inv = (1.0 / np.asarray(s, np.float64)).astype(F32)
        for m in (self._xtx, self._cross):
            if m is not None:
                m *= inv[:, None]
                m *= inv[None, :]

    def _rows(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=F32).reshape(-1, self._xtx.shape[0])
        if not np.isfinite(x).all():
            raise PocketLMError("calibration activations contain NaN/Inf")
        return x

    @property
    def hessian(self) -> np.ndarray:
        """[in, in] float64, 2/n X^T X (a new array)."""
        if self.count == 0:
            raise PocketLMError("no calibration rows were added to the Hessian")
        return self.xtx.astype(np.float64) * (2.0 / self.count)

    @property
    def imatrix(self) -> np.ndarray:
        """[in] mean x^2 per input channel (= diag(H) / 2)."""
        return (np.diag(self.xtx) / max(self.count, 1)).astype(F32)


def float_target_weight(w: np.ndarray, xtx: np.ndarray, cross: np.ndarray, damp: float) -> np.ndarray:
    """W [out, in] -> W* = W + W D (X^T X + damp * mean(diag X^T X) I)^-1, float32 (reference form:
    one float64 solve; `gptq_quantize(..., cross=D)` computes the same from its Cholesky factor).

    The layer's inputs X [n, in] come from the already quantized model before it; the float model
    gives X_f = X + Delta instead (D = Delta^T X, xtx = X^T X). GPTQ alone minimises
    ||X (W - Wq)^T||, which treats X as the truth; what matters is how close the quantized layer's
    outputs X Wq^T come to the float model's X_f W^T. W* is the least-squares solution of
    X W*^T = X_f W^T (ridge towards W), and ||X_f W^T - X Wq^T||^2 = ||X (W* - Wq)^T||^2 + const for
    the undamped W*, so GPTQ on W* with the same H minimises the float-target error: the layer
    absorbs the part of the upstream quantization error that is linear in its input. (GPTAQ, Li
    et al. 2025, reaches the same objective inside the sweep.)"""
    xtx = np.asarray(xtx, np.float64)
    scale = float(np.mean(np.diag(xtx)))
    if not scale > 0:
        return w
    a = xtx + damp * scale * np.eye(xtx.shape[0])  # positive definite; a dead input j gets no correction
    corr = np.linalg.solve(a, np.asarray(cross, np.float64).T @ w.T.astype(np.float64))  # A^-1 D^T W^T
    return (w + corr.T).astype(F32)


def _invert_lower(m: np.ndarray) -> None:
    """In place: lower-triangular m [n, n] -> its inverse (2x2 block recursion, about n^3 / 3 products;
    the upper triangle stays as it is, zero)."""
    n = m.shape[0]
    if n <= INVERT_BASE:
        m[...] = np.tril(np.linalg.inv(m))
        return
    k = n // 2
    _invert_lower(m[:k, :k])
    _invert_lower(m[k:, k:])
    m[k:, :k] = -(m[k:, k:] @ (m[k:, :k] @ m[:k, :k]))  # inv([[A, 0], [B, C]]) = [[A^-1, 0], [-C^-1 B A^-1, C^-1]]


def _reverse_inplace(m: np.ndarray) -> None:
    """m [n, n] -> m[::-1, ::-1] in place (row swaps: no second n x n array)."""
    n = m.shape[0]
    for i in range(n // 2):
        j = n - 1 - i
        top = m[i, ::-1].copy()
        m[i] = m[j, ::-1]
        m[j] = top
    if n % 2:
        m[n // 2] = m[n // 2, ::-1].copy()


def _cholesky_inplace(a: np.ndarray, block: int = CHOLESKY_BLOCK) -> None:
    """In place: symmetric positive definite a [n, n] -> its lower Cholesky factor L (upper triangle
    zeroed), in a's dtype. Blocked, right-looking: LAPACK (numpy, which computes in float64) only
    for the diagonal blocks, the panels and trailing updates as float32/64 matrix products over
    the lower triangle (about n^3 / 3 flops), so no second [n, n] array is ever allocated.
    Raises np.linalg.LinAlgError if a is not positive definite."""
    n = a.shape[0]
    for k0 in range(0, n, block):
        k1 = min(k0 + block, n)
        l11 = np.linalg.cholesky(a[k0:k1, k0:k1]).astype(a.dtype)
        a[k0:k1, k0:k1] = l11
        if k1 == n:
            break
        inv_t = np.linalg.inv(l11).T.astype(a.dtype)  # L21 = A21 L11^-T
        a[k1:, k0:k1] = a[k1:, k0:k1] @ inv_t
        panel = a[k1:, k0:k1]
        for j0 in range(k1, n, block):  # A22 -= L21 L21^T, block column by block column, lower part only
            j1 = min(j0 + block, n)
            a[j0:, j0:j1] -= panel[j0 - k1 :] @ panel[j0 - k1 : j1 - k1].T
    for r0 in range(0, n, block):  # the upper triangle still holds H
        r1 = min(r0 + block, n)
        a[r0:r1, r1:] = 0.0
        a[r0:r1, r0:r1] = np.tril(a[r0:r1, r0:r1])


def _inverse_cholesky_reversed(hessian: np.ndarray, rev: np.ndarray, dead: np.ndarray, percdamp: float,
                               dtype: type) -> tuple[np.ndarray, float]:
    """H [in, in] (any dtype), rev: the reversed sweep order, dead [in] (original order) ->
    (upper U [in, in] in sweep order and `dtype` with U^T U = (H_sweep + damp I)^-1, damp).

    One [in, in] array in `dtype` is allocated: J H J is copied into it (row blocks), factorized and
    inverted in place, and reversed back into sweep order (J L^-1 J is upper triangular)."""
    torch = torch_linalg()
    damp = None
    for _ in range(DAMP_RETRIES + 1):
        a, damp = _damped_cholesky(hessian, rev, dead, percdamp, dtype, damp)
        if torch is not None:
            t = torch.from_numpy(a)
            inv = torch.eye(a.shape[0], dtype=t.dtype)
            torch.linalg.solve_triangular(t, inv, upper=False, out=inv)  # L^-1, in place of the identity
            a[...] = inv.numpy()[::-1, ::-1]  # J L^-1 J: upper triangular, in sweep order
            del t, inv
        else:
            _invert_lower(a)
            _reverse_inplace(a)
        if np.isfinite(a).all():
            return a, damp
        damp *= 10.0
    raise np.linalg.LinAlgError(f"Hessian inverse not finite even with damping {damp / 10:g}")


def _damped_cholesky(hessian: np.ndarray, order: np.ndarray, dead: np.ndarray, percdamp: float, dtype: type,
                     damp: float | None = None) -> tuple[np.ndarray, float]:
    """H [in, in] -> (lower L [in, in] in `dtype`, damp) with L L^T = H[order][:, order] + damp I, dead
    inputs' diagonal (original order) 1. damp: percdamp * mean diag unless given; 10x more after each
    failed factorization, up to DAMP_RETRIES times (then np.linalg.LinAlgError). One [in, in] array
    (torch: factorized in place)."""
    torch = torch_linalg()
    n = hessian.shape[0]
    a = np.empty((n, n), dtype=dtype)
    diag = np.diag(hessian).astype(np.float64)[order]
    diag[dead[order]] = 1.0
    diag_mean = float(diag.mean())
    if damp is None:
        damp = percdamp * diag_mean if diag_mean > 0 else 1.0
        damp = max(damp, 1e-12 * max(diag_mean, 1.0))
    for _ in range(DAMP_RETRIES + 1):
        for r0 in range(0, n, CHOLESKY_BLOCK):  # (again after a failed attempt: it overwrote a)
            a[r0 : r0 + CHOLESKY_BLOCK] = hessian[order[r0 : r0 + CHOLESKY_BLOCK]][:, order]
        a.flat[:: n + 1] = diag + damp
        if torch is not None:
            t = torch.from_numpy(a)
            _, info = torch.linalg.cholesky_ex(t, out=(t, torch.empty((), dtype=torch.int32)))
            if int(info) == 0 and np.isfinite(a).all():
                return a, damp
        else:
            try:
                _cholesky_inplace(a)
                return a, damp
            except np.linalg.LinAlgError:
                pass
        damp *= 10.0
    raise np.linalg.LinAlgError(f"Hessian not positive definite even with damping {damp / 10:g}")


def inverse_cholesky(h: np.ndarray, percdamp: float) -> tuple[np.ndarray, float]:
    """Upper-triangular U with U^T U = (H + damp I)^-1, and the damp used. h [in, in] float32/64
    (computed in that precision).

    With J the order-reversing permutation and J (H + damp I) J = L L^T (lower Cholesky),
    (H + damp I)^-1 = (J L^-1 J)^T (J L^-1 J) and J L^-1 J is upper triangular: one Cholesky and
    one triangular inverse (in place) instead of the reference's Cholesky, inverse and second Cholesky.
    """
    n = h.shape[0]
    return _inverse_cholesky_reversed(h, np.arange(n)[::-1], np.zeros(n, bool), percdamp, h.dtype.type)


class _BlockGrid:
    """The fixed code grid of every block once chosen: fields per block and per-column affine map,
    kept as [n_sub, rows] so that a column's step is a contiguous row."""

    def __init__(self, fmt: type[QuantFormat], rows: int, n_in: int):
        self.fmt = fmt
        self.n_blocks = n_in // fmt.block_size
        self.fields: list[tuple[np.ndarray, ...] | None] = [None] * self.n_blocks
        self.step: list[np.ndarray | None] = [None] * self.n_blocks     # [n_sub, rows]
        self.divisor: list[np.ndarray | None] = [None] * self.n_blocks  # [n_sub, rows] step, 1 where 0
        self.offset: list[np.ndarray | None] = [None] * self.n_blocks   # [n_sub, rows] or None
        self.flat: list[bool] = [False] * self.n_blocks                  # some step is 0

    def choose(self, b: int, values: np.ndarray, weights: np.ndarray) -> None:
        """values, weights [rows, block_size] (original column order) -> this block's fields."""
        _, *fields = search_fields(self.fmt, values, weights)
        self.fields[b] = tuple(fields)
        step, offset = self.fmt.affine(*fields)
        rows = values.shape[0]
        self.step[b] = np.ascontiguousarray(step.reshape(rows, -1).T)
        self.flat[b] = bool((self.step[b] == 0).any())
        self.divisor[b] = np.where(self.step[b] == 0, F32(1), self.step[b]) if self.flat[b] else self.step[b]
        self.offset[b] = None if offset is None else np.ascontiguousarray(offset.reshape(rows, -1).T)

    def round_column(self, c: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Column c [rows] -> (codes [rows], dequantized values [rows]) on its block's grid."""
        fmt = self.fmt
        b, j = divmod(c, fmt.block_size)
        sub = j // (fmt.block_size // self.step[b].shape[0])
        step = self.step[b][sub]
        offset = None if self.offset[b] is None else self.offset[b][sub]
        q = np.rint((w if offset is None else w - offset) / self.divisor[b][sub])
        q += F32(fmt.code_zero)
        if self.flat[b]:
            q[step == 0] = fmt.code_zero
        np.clip(q, fmt.code_min, fmt.code_max, out=q)
        deq = step * (q - F32(fmt.code_zero))
        if offset is not None:
            deq += offset
        return q, deq

    def pack(self, codes: np.ndarray) -> np.ndarray:
        """codes [rows, in] -> GGUF bytes [rows, row_bytes]."""
        rows = codes.shape[0]
        fields = [np.stack(f, axis=1) for f in zip(*self.fields, strict=True)]  # each [rows, n_blocks, ...]
        fields = [f.reshape(rows * self.n_blocks, *f.shape[2:]) for f in fields]
        dtype = np.int8 if self.fmt.code_min < 0 else np.uint8
        blocks = codes.reshape(rows * self.n_blocks, self.fmt.block_size).astype(dtype)
        return self.fmt.pack(blocks, *fields).reshape(rows, -1)


def gptq_quantize(w: np.ndarray, gtype: GGMLType | int, hessian: np.ndarray,
                  importance: np.ndarray | None = None, *, act_order: bool = False,
                  percdamp: float = 0.01, blocksize: int = 128, dtype: type = np.float32,
                  cross: np.ndarray | None = None, target_damp: float = TARGET_DAMP,
                  row_chunk: int = ROW_CHUNK, workers: int = 1, name: str | None = None,
                  times: dict[str, float] | None = None, product: Product | None = None) -> np.ndarray:
    """W [out, in] float32, H [in, in] = 2/n X^T X -> GGUF bytes uint8 [out, row_bytes].

    H may be any positive multiple of X^T X (damping is relative to its mean diagonal, the block
    search's importance only relative between channels). cross [in, in]: D = sum (x_float - x) x^T
    in the same units as H, for the float target (module doc); None: plain GPTQ. target_damp: the
    float target's ridge, a fraction of mean(diag H) (it wants more than GPTQ's percdamp when the
    calibration set is small: measured on the built-in model with 2k tokens, 0.1 vs 0.01 gave
    KLD 0.00174 vs 0.00213; with 16k tokens both about 0.00123).
    importance [in]: the block scale search's channel weights (default diag(H) / 2 = mean x^2).
    blocksize: columns per lazy batch update (any value gives the same result up to rounding; in
    float64 exactly the same). dtype: of the factorization, float target and sweep (float32 BLAS
    by default). row_chunk: rows of W swept at a time (memory only; the result does not depend on it).
    workers: threads sweeping row chunks at once (then chunks of at most rows / workers rows).
    times: receives wall seconds of the parts "target", "factor" and "sweep" (see `timed`).
    product(a, b) = a @ b.T: the float target's correction products (W M^T, D^T W^T; e.g.
    calib_matmul's bfloat16, as the correction is small beside W); default `dtype` numpy.
    Raises np.linalg.LinAlgError if H cannot be made positive definite by damping.
    """
    fmt = check_quantizable(w, gtype, name)
    if not issubclass(fmt, QuantFormat):
        return quantize(w, gtype, name)
    if w.ndim != 2 or blocksize < 1 or row_chunk < 1 or not percdamp >= 0:
        raise PocketLMError(f"tensor {name or ''}: gptq needs W [out, in], blocksize >= 1, percdamp >= 0 "
                            f"(got shape {w.shape}, blocksize {blocksize}, percdamp {percdamp})")
    rows, n_in = w.shape
    if hessian.shape != (n_in, n_in) or not np.isfinite(hessian).all():
        raise PocketLMError(f"tensor {name or ''}: Hessian of shape {hessian.shape} does not match weight "
                            f"{w.shape} or is not finite")
    if cross is not None and cross.shape != (n_in, n_in):
        raise PocketLMError(f"tensor {name or ''}: float-target statistics of shape {cross.shape} do not match "
                            f"weight {w.shape}")
    diag = np.diag(hessian).astype(np.float64)
    dead = diag <= 0
    imp = checked_importance(diag / 2 if importance is None else importance, n_in, name)
    imp = checked_importance(np.where(dead, F32(0), imp), n_in, name)

    perm = np.argsort(-diag, kind="stable") if act_order else np.arange(n_in)
    inv_perm = np.argsort(perm)
    rev = perm[::-1]
    workers = max(1, min(workers, rows))
    row_chunk = min(row_chunk, -(-rows // workers))
    if cross is not None:  # W* (before dead columns are zeroed: the float model still uses them)
        with timed(times, "target"):
            w = _float_target(w, hessian, np.asarray(cross), perm, dead, target_damp, dtype, row_chunk, workers,
                              product)
    with timed(times, "factor"):
        u, _ = _inverse_cholesky_reversed(hessian, rev, dead, percdamp, dtype)  # U^T U = (H + damp I)^-1
    out = np.empty((rows, n_in // fmt.block_size * fmt.type_size), dtype=np.uint8)

    def sweep_rows(r0: int) -> None:
        wt = np.ascontiguousarray(np.asarray(w[r0 : r0 + row_chunk], dtype=dtype)[:, perm].T)  # [in, rows]
        wt[dead[perm]] = 0.0
        out[r0 : r0 + row_chunk] = _sweep(fmt, wt, u, perm, inv_perm, imp, blocksize, name)

    with timed(times, "sweep"):
        _for_chunks(sweep_rows, rows, row_chunk, workers)
    return out


def _for_chunks(fn: Callable[[int], None], rows: int, row_chunk: int, workers: int) -> None:
    """fn(r0) for every chunk start r0 of `rows` rows, on `workers` threads (numpy's BLAS and ufuncs
    release the GIL, so the chunks overlap)."""
    starts = range(0, rows, row_chunk)
    if workers == 1:
        for r0 in starts:
            fn(r0)
        return
    with ThreadPoolExecutor(workers) as pool:
        for future in [pool.submit(fn, r0) for r0 in starts]:
            future.result()


def _float_target(w: np.ndarray, hessian: np.ndarray, cross: np.ndarray, perm: np.ndarray, dead: np.ndarray,
                  damp: float, dtype: type, row_chunk: int, workers: int, product: Product | None = None
                  ) -> np.ndarray:
    """W [rows, in] -> W* = W + W D (H + damp I)^-1 [rows, in] in `dtype` (`float_target_weight`),
    from an inverse Cholesky factor of its own (its ridge is not GPTQ's damping), freed before
    GPTQ factorizes H: at most one [in, in] factor, D^T in sweep order and W* at a time."""
    torch = torch_linalg()
    if torch is not None:
        return _float_target_torch(torch, w, hessian, cross, dead, damp, dtype, row_chunk, workers, product)
    u, _ = _inverse_cholesky_reversed(hessian, perm[::-1], dead, damp, dtype)
    op = _float_target_operator(cross, u, perm, w.shape[0], dtype)
    del u
    inv_perm = np.argsort(perm)
    out = np.array(w, dtype=dtype)

    def correct(r0: int) -> None:
        chunk = out[r0 : r0 + row_chunk]  # a view: corrected in place
        chunk += op(chunk)[inv_perm].T

    _for_chunks(correct, w.shape[0], row_chunk, workers)
    return out


def _float_target_torch(torch, w: np.ndarray, hessian: np.ndarray, cross: np.ndarray, dead: np.ndarray,
                        damp: float, dtype: type, row_chunk: int, workers: int, product: Product | None = None
                        ) -> np.ndarray:
    """`_float_target` with torch's Cholesky solves, in the original column order: L L^T = A =
    H + damp I. W*^T = W^T + A^-1 D^T W^T, the cheaper way round: with fewer inputs than rows
    M = A^-1 D^T [in, in] once (2 in^3 flops) and W* = W + W M^T (2 in^2 rows); else
    A^-1 (D^T W^T) (4 in^2 rows): phi-3-mini's ffn_down 0.8 TFLOP instead of 1.2."""
    n, rows = hessian.shape[0], w.shape[0]
    l, _ = _damped_cholesky(hessian, np.arange(n), dead, damp, dtype)
    lt = torch.from_numpy(l)
    out = np.array(w, dtype=dtype)
    if n < rows:
        m = torch.cholesky_solve(torch.from_numpy(np.ascontiguousarray(cross.T, dtype=dtype)), lt)  # [in, in]
        del lt, l
        if product is not None:  # (multi-threaded itself: chunks one after the other, for memory)
            for r0 in range(0, rows, row_chunk):
                out[r0 : r0 + row_chunk] += product(out[r0 : r0 + row_chunk], m.numpy())
            return out
        mt = m.numpy().T  # M^T

        def correct(r0: int) -> None:
            chunk = out[r0 : r0 + row_chunk]  # a view: corrected in place
            chunk += chunk @ mt

        _for_chunks(correct, rows, row_chunk, workers)
        return out
    dt = np.asarray(cross, dtype=dtype).T
    z = torch.from_numpy(dt @ out.T if product is None else product(dt, out))  # D^T W^T [in, rows]
    out += torch.cholesky_solve(z, lt).numpy().T
    return out


def _float_target_operator(cross: np.ndarray, u: np.ndarray, perm: np.ndarray, rows: int, dtype: type
                           ) -> Callable[[np.ndarray], np.ndarray]:
    """chunk W_c [r, in] -> (W*_c - W_c)^T [in (sweep order), r] = (H + damp I)^-1 D^T W_c^T in sweep
    order, with (H + damp I)^-1 = U^T U in sweep order. D^T's rows are permuted once; with fewer
    inputs than rows M = U^T U D^T is formed once (4 in^3 flops), else applied as three products
    per chunk (6 in^2 r flops)."""
    dt = np.ascontiguousarray(cross.T[perm], dtype=dtype)  # [in (sweep order), in]
    if u.shape[0] < rows:
        m = u.T @ (u @ dt)
        del dt
        return lambda chunk: m @ chunk.T
    return lambda chunk: u.T @ (u @ (dt @ chunk.T))


def _sweep(fmt: type[QuantFormat], wt: np.ndarray, u: np.ndarray, perm: np.ndarray, inv_perm: np.ndarray,
           imp: np.ndarray, blocksize: int, name: str | None) -> np.ndarray:
    """GPTQ's column sweep over wt [in (sweep order), rows] (updated in place) -> GGUF bytes [rows, row_bytes].

    Lazy in both directions: the columns after a batch get its updates as one product at its end;
    within a batch, column p is brought up to date when it is reached, w_p - u[i1:p, p] . err[i1:p]
    (one pass over the batch's errors), instead of every later column of the batch being updated
    after each column (a rank-1 update of up to blocksize x rows values per column): 2x faster at
    4096 rows. Same arithmetic, in another order."""
    n_in, rows = wt.shape
    dtype = wt.dtype.type
    sigma2 = row_sigma2(wt[inv_perm].T)  # llama.cpp's row term for the Q4_0/Q4_1/Q8_0 value weights
    codes = np.zeros((n_in, rows), dtype=np.int16)  # sweep order
    grid = _BlockGrid(fmt, rows, n_in)
    group = fmt.block_size  # columns whose fields are chosen together (K-quants: a super-block)

    for i1 in range(0, n_in, blocksize):
        i2 = min(i1 + blocksize, n_in)
        err1 = np.zeros((i2 - i1, rows), dtype=dtype)
        for i in range(i2 - i1):
            p = i1 + i
            c = int(perm[p])
            b = c // group
            if grid.fields[b] is None:  # every column of the block is at position p or later
                cols = np.arange(b * group, (b + 1) * group)
                pos = inv_perm[cols]
                vals = wt[pos]  # [group, rows] a copy
                if i:
                    vals -= u[i1:p, pos].T @ err1[:i]  # the batch's pending updates
                vals = np.ascontiguousarray(vals.T)
                grid.choose(b, vals, value_weights(fmt.gtype, vals, imp[cols], sigma2))
            # (einsum sums over the batch in the same order for every row, so the bytes do not depend
            # on how the rows are chunked over threads; BLAS's gemv order does)
            w_p = wt[p] - np.einsum("j,jr->r", u[i1:p, p], err1[:i]) if i else wt[p]
            q, deq = grid.round_column(c, w_p)
            codes[p] = q
            err1[i] = (w_p - deq) / u[p, p]
        if not np.isfinite(err1).all():
            raise FloatingPointError(f"GPTQ on {name or 'tensor'} diverged (non-finite weights)")
        if i2 < n_in:
            wt[i2:] -= u[i1:i2, i2:].T @ err1
    return grid.pack(codes[inv_perm].T)
