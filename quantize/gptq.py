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

Numerics: H and its inverse Cholesky factor in float64 (numpy LAPACK), the sweep in float32 BLAS.
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

import numpy as np

from ..errors import PocketLMError
from .formats import GGMLType, QuantFormat, check_quantizable, quantize
from .search import checked_importance, row_sigma2, search_fields, value_weights

F32 = np.float32
DAMP_RETRIES = 6


class HessianAccumulator:
    """Running H = 2/n sum_t x_t x_t^T over calibration rows x_t [in], added a batch at a time.

    With `add_pair` it also sums D = sum_t (x_float_t - x_t) x_t^T, the statistic of the float target
    (see `float_target_weight`)."""

    def __init__(self, n_in: int):
        self.xtx = np.zeros((n_in, n_in), dtype=np.float64)  # sum x x^T
        self.cross: np.ndarray | None = None                  # [in, in] sum (x_float - x) x^T
        self.count = 0

    def add(self, x: np.ndarray) -> None:
        """x [..., in] activations (float32 BLAS per batch, accumulated in float64)."""
        x = self._rows(x)
        self.xtx += x.T @ x
        self.count += x.shape[0]

    def add_pair(self, x: np.ndarray, x_float: np.ndarray) -> None:
        """x [..., in] as the quantized prefix of the model gives them, x_float the same rows as the
        float model gives them."""
        x, x_float = self._rows(x), self._rows(x_float)
        if x_float.shape != x.shape:
            raise PocketLMError(f"float-model activations {x_float.shape} do not pair with {x.shape}")
        if self.cross is None:
            self.cross = np.zeros_like(self.xtx)
        self.cross += (x_float - x).T @ x
        self.add(x)

    def scale_inputs(self, s: np.ndarray) -> None:
        """The inputs become x / s (s [in] > 0, e.g. AWQ scales folded into the layer before)."""
        ss = np.outer(s, s).astype(np.float64)
        self.xtx /= ss
        if self.cross is not None:
            self.cross /= ss

    def _rows(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=F32).reshape(-1, self.xtx.shape[0])
        if not np.isfinite(x).all():
            raise PocketLMError("calibration activations contain NaN/Inf")
        return x

    @property
    def hessian(self) -> np.ndarray:
        """[in, in] float64, 2/n X^T X."""
        if self.count == 0:
            raise PocketLMError("no calibration rows were added to the Hessian")
        return self.xtx * (2.0 / self.count)

    @property
    def imatrix(self) -> np.ndarray:
        """[in] mean x^2 per input channel (= diag(H) / 2)."""
        return (np.diag(self.xtx) / max(self.count, 1)).astype(F32)


def float_target_weight(w: np.ndarray, acc: HessianAccumulator, damp: float) -> np.ndarray:
    """W [out, in] -> W* = W + W D (X^T X + damp * mean(diag X^T X) I)^-1, float32.

    The layer's inputs X [n, in] come from the already quantized model before it; the float model
    gives X_f = X + Delta instead (D = Delta^T X). GPTQ alone minimises ||X (W - Wq)^T||, which
    treats X as the truth; what matters is how close the quantized layer's outputs X Wq^T come to
    the float model's X_f W^T. W* is the least-squares solution of X W*^T = X_f W^T (ridge towards
    W), and ||X_f W^T - X Wq^T||^2 = ||X (W* - Wq)^T||^2 + const for the undamped W*, so GPTQ on W*
    with the same H minimises the float-target error: the layer absorbs the part of the upstream
    quantization error that is linear in its input. (GPTAQ, Li et al. 2025, reaches the same
    objective inside the sweep.) Without paired statistics (acc.cross None) W is returned as is."""
    if acc.cross is None or acc.count == 0:
        return w
    xtx = acc.xtx
    scale = float(np.mean(np.diag(xtx)))
    if not scale > 0:
        return w
    a = xtx + damp * scale * np.eye(xtx.shape[0])  # positive definite; a dead input j gets no correction
    rhs = acc.cross.T @ w.T.astype(np.float64)  # [in, out] = D^T W^T
    try:
        corr = np.linalg.solve(a, rhs)          # (X^T X + damp I)^-1 D^T W^T: a symmetric
    except np.linalg.LinAlgError:
        return w
    out = (w + corr.T).astype(F32)
    return out if np.isfinite(out).all() else w


def inverse_cholesky(h: np.ndarray, percdamp: float) -> tuple[np.ndarray, float]:
    """Upper-triangular U with U^T U = (H + damp I)^-1, and the damp used. h [in, in] float64.

    With J the order-reversing permutation and J (H + damp I) J = L L^T (lower Cholesky),
    (H + damp I)^-1 = (J L^-1 J)^T (J L^-1 J) and J L^-1 J is upper triangular: one Cholesky and
    one triangular inverse instead of the reference's Cholesky, inverse and second Cholesky.
    """
    n = h.shape[0]
    diag_mean = float(np.mean(np.diag(h)))
    damp = percdamp * diag_mean if diag_mean > 0 else 1.0
    damp = max(damp, 1e-12 * max(diag_mean, 1.0))
    flipped = h[::-1, ::-1]
    for _ in range(DAMP_RETRIES + 1):
        try:
            lower = np.linalg.cholesky(flipped + damp * np.eye(n))
            u = np.linalg.inv(lower)[::-1, ::-1]
            if np.isfinite(u).all():
                return np.triu(u), damp
        except np.linalg.LinAlgError:
            pass
        damp *= 10.0
    raise np.linalg.LinAlgError(f"Hessian not positive definite even with damping {damp / 10:g}")


class _BlockGrid:
    """The fixed code grid of every block once chosen: fields per block and per-column affine map."""

    def __init__(self, fmt: type[QuantFormat], rows: int, n_in: int):
        self.fmt = fmt
        self.n_blocks = n_in // fmt.block_size
        self.fields: list[tuple[np.ndarray, ...] | None] = [None] * self.n_blocks
        self.step: list[np.ndarray | None] = [None] * self.n_blocks    # [rows, n_sub]
        self.offset: list[np.ndarray | None] = [None] * self.n_blocks  # [rows, n_sub] or None

    def choose(self, b: int, values: np.ndarray, weights: np.ndarray) -> None:
        """values, weights [rows, block_size] (original column order) -> this block's fields."""
        _, *fields = search_fields(self.fmt, values, weights)
        self.fields[b] = tuple(fields)
        step, offset = self.fmt.affine(*fields)
        rows = values.shape[0]
        self.step[b] = step.reshape(rows, -1)
        self.offset[b] = None if offset is None else offset.reshape(rows, -1)

    def round_column(self, c: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Column c [rows] -> (codes [rows], dequantized values [rows]) on its block's grid."""
        fmt = self.fmt
        b, j = divmod(c, fmt.block_size)
        step_b = self.step[b]
        sub = j // (fmt.block_size // step_b.shape[1])
        step = step_b[:, sub]
        offset = None if self.offset[b] is None else self.offset[b][:, sub]
        v = w if offset is None else w - offset
        safe = np.where(step == 0, F32(1), step)
        q = np.rint(v / safe) + F32(fmt.code_zero)
        q = np.where(step == 0, F32(fmt.code_zero), q)
        np.clip(q, fmt.code_min, fmt.code_max, out=q)
        deq = step * (q - F32(fmt.code_zero))
        if offset is not None:
            deq = deq + offset
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
                  name: str | None = None) -> np.ndarray:
    """W [out, in] float32, H [in, in] = 2/n X^T X -> GGUF bytes uint8 [out, row_bytes].

    importance [in]: the block scale search's channel weights (default diag(H) / 2 = mean x^2).
    blocksize: columns per lazy batch update (any value gives the same result up to rounding; in
    float64 exactly the same). dtype: of the sweep (float32 BLAS by default).
    Raises np.linalg.LinAlgError if H cannot be made positive definite by damping.
    """
    fmt = check_quantizable(w, gtype, name)
    if not issubclass(fmt, QuantFormat):
        return quantize(w, gtype, name)
    if w.ndim != 2 or blocksize < 1 or not percdamp >= 0:
        raise PocketLMError(f"tensor {name or ''}: gptq needs W [out, in], blocksize >= 1, percdamp >= 0 "
                            f"(got shape {w.shape}, blocksize {blocksize}, percdamp {percdamp})")
    rows, n_in = w.shape
    h = np.array(hessian, dtype=np.float64)
    if h.shape != (n_in, n_in) or not np.isfinite(h).all():
        raise PocketLMError(f"tensor {name or ''}: Hessian of shape {h.shape} does not match weight {w.shape}"
                            " or is not finite")
    weights = np.array(w, dtype=dtype)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    weights[:, dead] = 0.0
    imp = checked_importance(np.diag(h) / 2 if importance is None else importance, n_in, name)
    imp = np.where(dead, F32(0), imp)
    imp = checked_importance(imp, n_in, name)
    sigma2 = row_sigma2(weights)  # llama.cpp's row term for the Q4_0/Q4_1/Q8_0 value weights

    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(n_in)
    inv_perm = np.argsort(perm)
    u, _ = inverse_cholesky(h[np.ix_(perm, perm)], percdamp)
    u = u.astype(dtype)

    wt = np.ascontiguousarray(weights[:, perm].T)  # [in (sweep order), out]: a column is a row
    del weights, h
    codes = np.zeros((rows, n_in), dtype=np.int16)  # original column order
    grid = _BlockGrid(fmt, rows, n_in)
    group = fmt.block_size  # columns whose fields are chosen together (K-quants: a super-block)

    for i1 in range(0, n_in, blocksize):
        i2 = min(i1 + blocksize, n_in)
        w1 = wt[i1:i2]  # view: updated in place
        err1 = np.zeros((i2 - i1, rows), dtype=dtype)
        for i in range(i2 - i1):
            p = i1 + i
            c = int(perm[p])
            b = c // group
            if grid.fields[b] is None:
                cols = np.arange(b * group, (b + 1) * group)
                pos = inv_perm[cols]
                vals = wt[pos].copy()  # [group, rows]; in-batch rows are already up to date
                later = pos >= i2
                if i and later.any():  # pending updates of this batch for columns beyond it
                    vals[later] -= u[i1:p, pos[later]].T @ err1[:i]
                vals = np.ascontiguousarray(vals.T)
                grid.choose(b, vals, value_weights(fmt.gtype, vals, imp[cols], sigma2))
            q, deq = grid.round_column(c, w1[i])
            codes[:, c] = q
            err = (w1[i] - deq) / u[p, p]
            w1[i:] -= np.outer(u[p, p:i2], err)
            err1[i] = err
        if i2 < n_in:
            wt[i2:] -= u[i1:i2, i2:].T @ err1
    if not np.isfinite(wt).all():
        raise FloatingPointError(f"GPTQ on {name or 'tensor'} diverged (non-finite weights)")
    return grid.pack(codes)
