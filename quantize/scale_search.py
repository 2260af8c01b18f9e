"""llama.cpp's per-group scale searches (ggml-quants.c), vectorised over many groups at once.

Every function works on a group-major transposed layout: `x` is [L, G], the L values of G
independent groups (one group per column), so that the reductions over a group are sums along
axis 0, which numpy evaluates as sequential float32 adds in the same order as the C loops. All
arithmetic is float32 like the C code; `nearest_int` (round half to even) is `np.rint`.

Returned codes are the unsigned integers llama.cpp calls `L` (offset by `nmax` for the signed
searches), as float32 holding small integers.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)  # ggml-quants.c: below this a group counts as all zero


def _safe_divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num/den where den != 0, else 0 (the C code guards every such division)."""
    out = np.zeros_like(num)
    np.divide(num, den, out=out, where=den != 0)
    return out


def signed_max(x: np.ndarray) -> np.ndarray:
    """[L, G] -> [G]: the signed value of largest magnitude (the first one on ties, like C's `>`)."""
    idx = np.argmax(np.abs(x), axis=0)
    return np.take_along_axis(x, idx[None, :], axis=0)[0]


def make_qx_quants(x: np.ndarray, nmax: int, weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric scale search (`make_qx_quants`, rmse_type 1): codes l in [-nmax, nmax-1].

    x: [L, G] float32; weights: [L, G] float32 (None: x^2, as llama.cpp without an imatrix).
    Tries the inverse scale -nmax/max and 18 neighbours -(nmax + 0.1*is)/max, and for each the
    weighted least-squares scale sum(w x l)/sum(w l^2); keeps the one maximising sumlx^2/suml2
    (= minimising the weighted squared error). Returns (scale [G], codes [L, G] = l + nmax).
    Groups with max |x| < 1e-15 get scale 0 and codes 0.
    """
    x = np.ascontiguousarray(x, dtype=F32)  # C order: axis-0 sums are sequential adds
    w = x * x if weights is None else np.ascontiguousarray(weights, dtype=F32)
    wx = w * x
    vmax = signed_max(x)
    is_zero = np.abs(vmax) < GROUP_MAX_EPS
    vmax = np.where(is_zero, F32(1), vmax)

    def trial(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        l = np.rint(iscale * x)
        np.clip(l, -nmax, nmax - 1, out=l)
        return l, (wx * l).sum(axis=0), ((w * l) * l).sum(axis=0)

    codes, sumlx, suml2 = trial(F32(-nmax) / vmax)
    scale = _safe_divide(sumlx, suml2)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        l, sumlx, suml2 = trial(-(F32(nmax) + F32(0.1) * F32(step)) / vmax)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        codes = np.where(better, l, codes)
        scale = np.where(better, _safe_divide(sumlx, suml2), scale)
        best = np.where(better, scale * sumlx, best)
    codes += F32(nmax)
    codes[:, is_zero] = 0
    scale[is_zero] = 0
    return scale, codes


def make_qkx_quants(
    x: np.ndarray, nmax: int, weights: np.ndarray, rmin: float, rdelta: float, nstep: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric scale + min search (`make_qkx2_quants` / `make_qkx3_quants`, squared error).

    x, weights: [L, G] float32. Model x ~ scale*l + min with l in [0, nmax] and min <= 0. Starts
    from the (min, max) grid, then tries inverse scales (rmin + rdelta*is + nmax)/(max - min) for
    is = 0..nstep, each followed by a weighted least-squares refit of (scale, min); keeps the fit
    of least weighted squared error. As in the C code the running best `min` feeds the next
    candidate's grid. Returns (scale [G], the_min [G] = -min >= 0, codes [L, G] in 0..nmax).
    The qkx2 and qkx3 variants differ only in guards against a degenerate range (max <= min), which
    this function applies in both cases (no difference for finite, non-constant groups).
    """
    x = np.ascontiguousarray(x, dtype=F32)  # C order: axis-0 sums are sequential adds
    weights = np.ascontiguousarray(weights, dtype=F32)
    xmin = np.minimum(x.min(axis=0), F32(0))
    xmax = x.max(axis=0)
    sum_w = weights.sum(axis=0)
    sum_x = (weights * x).sum(axis=0)
    flat = xmax <= xmin

    def grid(iscale: np.ndarray, vmin: np.ndarray) -> np.ndarray:
        v = iscale * (x - vmin)
        l = np.rint(np.minimum(v, F32(nmax)))
        l[~(v > 0)] = 0  # also catches NaN from a degenerate range
        return l

    def error(scale: np.ndarray, vmin: np.ndarray, l: np.ndarray) -> np.ndarray:
        diff = scale * l + vmin - x
        return (weights * (diff * diff)).sum(axis=0)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        rng = np.where(flat, F32(1), xmax - xmin)
        iscale = F32(nmax) / rng
        scale = F32(1) / iscale
        codes = grid(iscale, xmin)
        best_error = error(scale, xmin, codes)
        vmin = xmin
        for step in range(nstep + 1):
            iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / (xmax - vmin)
            l = grid(iscale, vmin)
            wl = weights * l
            sum_l = wl.sum(axis=0)
            sum_l2 = (wl * l).sum(axis=0)
            sum_xl = (wl * x).sum(axis=0)
            det = sum_w * sum_l2 - sum_l * sum_l
            ok = det > 0
            this_scale = _safe_divide(sum_w * sum_xl - sum_x * sum_l, det)
            this_min = _safe_divide(sum_l2 * sum_x - sum_l * sum_xl, det)
            positive = this_min > 0
            this_min = np.where(positive, F32(0), this_min)
            this_scale = np.where(positive, _safe_divide(sum_xl, sum_l2), this_scale)
            cur_error = error(this_scale, this_min, l)
            better = ok & (cur_error < best_error) & ~flat
            codes = np.where(better, l, codes)
            best_error = np.where(better, cur_error, best_error)
            scale = np.where(better, this_scale, scale)
            vmin = np.where(better, this_min, vmin)
    codes[:, flat] = 0
    scale = np.where(flat, F32(0), scale)
    return scale, -vmin, codes


def make_qp_quants(x: np.ndarray, nmax: int, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quantize non-negative values (sub-block scales or mins) to 0..nmax (`make_qp_quants`).

    x, weights: [n, G] float32 (n = sub-blocks per super-block, G super-blocks). Scans 9 inverse
    scales around nmax/max by weighted squared error, then refines the codes one at a time (up to
    5 sweeps) while sumlx^2/suml2 improves. Returns (scale [G], codes [n, G] in 0..nmax).
    """
    x = np.ascontiguousarray(x, dtype=F32)  # C order: axis-0 sums are sequential adds
    weights = np.ascontiguousarray(weights, dtype=F32)
    vmax = np.maximum(x.max(axis=0), F32(0))
    is_zero = vmax < GROUP_MAX_EPS
    vmax = np.where(is_zero, F32(1), vmax)

    iscale = F32(nmax) / vmax
    scale = F32(1) / iscale
    l = np.rint(iscale * x)
    diff = x - scale * l
    best_mse = (weights * diff * diff).sum(axis=0)
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = (F32(0.1) * F32(step) + F32(nmax)) / vmax
        scale_is = F32(1) / iscale_is
        l = np.minimum(np.rint(iscale_is * x), F32(nmax))
        diff = x - scale_is * l
        mse = (weights * diff * diff).sum(axis=0)
        better = mse < best_mse
        best_mse = np.where(better, mse, best_mse)
        iscale = np.where(better, iscale_is, iscale)

    codes = np.minimum(np.rint(iscale * x), F32(nmax))
    sumlx = (weights * x * codes).sum(axis=0)
    suml2 = (weights * codes * codes).sum(axis=0)
    for _ in range(5):
        changed = np.zeros(x.shape[1], dtype=bool)
        for i in range(x.shape[0]):
            w, xi, li = weights[i], x[i], codes[i]
            slx = sumlx - w * xi * li
            sl2 = suml2 - w * li * li
            usable = (slx > 0) & (sl2 > 0)
            new_l = np.minimum(np.rint(_safe_divide(xi * sl2, slx)), F32(nmax))
            slx = slx + w * xi * new_l
            sl2 = sl2 + w * new_l * new_l
            take = usable & (new_l != li) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            codes[i] = np.where(take, new_l, li)
            sumlx = np.where(take, slx, sumlx)
            suml2 = np.where(take, sl2, suml2)
            changed |= take
        if not changed.any():
            break
    codes[:, is_zero] = 0
    return np.where(is_zero, F32(0), _safe_divide(sumlx, suml2)), codes
