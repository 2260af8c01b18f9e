"""Quantization methods (quantize/search.py, gptq.py, awq.py, methods.py).

Oracles: llama.cpp's own importance-matrix quantizer (`ggml_quantize_chunk` with an imatrix, from
the libggml that llama-cpp-python ships), gguf-py's dequantizer for every byte we write, and the
output error ||X W^T - X W_q^T|| on held-out activations with realistic structure (a few outlier
channels, strongly correlated inputs).
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import quants as gq
from quant_helpers import ggml_quantize  # tests/ is on sys.path (conftest)

from pocketlm.errors import PocketLMError
from pocketlm.quantize import awq, gptq, methods, search
from pocketlm.quantize import formats as F

QUANT_TYPES = ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]
K_IN, N_OUT = 512, 96


def activations(rng: np.random.Generator, mix: np.ndarray, n: int) -> np.ndarray:
    """x [n, K_IN]: a few strong latent directions mixed into all channels (correlated inputs,
    spectrum decaying like 1/j), small isotropic noise, and 3 outlier channels 10x larger."""
    z = rng.standard_normal((n, K_IN)) * (3.0 / np.arange(1, K_IN + 1))
    x = z @ mix + 0.02 * rng.standard_normal((n, K_IN))
    x[:, [3, 77, 300]] *= 10
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def layer():
    """A linear layer W [N_OUT, K_IN], calibration inputs X, held-out inputs X_test, statistics."""
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((K_IN, K_IN)) / np.sqrt(K_IN)
    x, x_test = activations(rng, mix, 2048), activations(rng, mix, 1024)
    w = (rng.standard_normal((N_OUT, K_IN)) * 0.05).astype(np.float32)
    acc = gptq.HessianAccumulator(K_IN)
    for batch in np.array_split(x, 4):
        acc.add(batch)
    return {"w": w, "x": x, "x_test": x_test, "h": acc.hessian, "imatrix": acc.imatrix}


@pytest.fixture(params=["torch", "numpy"])
def backend(request, monkeypatch):
    """GPTQ's linear algebra through torch (when installed) and through the numpy-only fallback
    (gptq.torch_linalg honours POCKETLM_NO_TORCH): both must meet the same oracles."""
    if request.param == "numpy":
        monkeypatch.setenv("POCKETLM_NO_TORCH", "1")
    elif gptq.torch_linalg() is None:
        pytest.skip("torch is not installed")
    assert (gptq.torch_linalg() is None) == (request.param == "numpy")
    return request.param


def output_error(layer: dict, raw: np.ndarray, gtype: F.GGMLType, s: np.ndarray | None = None,
                 x: np.ndarray | None = None) -> float:
    """Relative output error on held-out inputs; s: AWQ scales (the stored weight is W * s)."""
    x = layer["x_test"] if x is None else x
    wq = F.dequantize(raw, gtype, layer["w"].shape)
    if s is not None:
        wq = wq / s[None, :]
    ref = x @ layer["w"].T
    return float(np.linalg.norm(ref - x @ wq.T) / np.linalg.norm(ref))


def assert_valid_gguf(raw: np.ndarray, gtype: F.GGMLType, shape: tuple[int, int]) -> np.ndarray:
    """The bytes decode in gguf-py exactly as in pocketlm, to finite values."""
    ours = F.dequantize(raw, gtype, shape)
    np.testing.assert_array_equal(ours, gq.dequantize(raw, gguf.GGMLQuantizationType[gtype.name]))
    assert np.isfinite(ours).all()
    return ours


def test_hessian_accumulator_matches_definition(layer):
    x = layer["x"].astype(np.float64)
    np.testing.assert_allclose(layer["h"], 2.0 / len(x) * x.T @ x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer["imatrix"], (x * x).mean(axis=0), rtol=1e-5)
    with pytest.raises(PocketLMError, match="no calibration rows"):
        _ = gptq.HessianAccumulator(4).hessian


def test_hessian_split_over_two_threads_matches_definition():
    """X^T X split into its diagonal blocks and the lower block on two threads (inputs >= SPLIT_MIN),
    with the upper block mirrored on reading, also after more rows and an input scaling."""
    rng = np.random.default_rng(3)
    n_in = gptq.SPLIT_MIN + 6
    x = rng.standard_normal((700, n_in)).astype(np.float32)
    acc = gptq.HessianAccumulator(n_in, workers=2)
    assert acc._split == n_in // 2
    acc.add(x[:300])
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(acc.xtx, x64[:300].T @ x64[:300], rtol=1e-4, atol=1e-2)
    acc.add(x[300:])
    s = rng.uniform(0.5, 2.0, n_in)
    acc.scale_inputs(s)
    xs = x64 / s
    np.testing.assert_allclose(acc.hessian, 2.0 / len(x) * xs.T @ xs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"])
def test_search_bytes_identical_to_llama_cpp_imatrix_quantizer(name, layer):
    """`imatrix` = llama.cpp quantizing with that imatrix; `mse` = llama.cpp with unit importance."""
    gtype = F.GGMLType[name]
    rng = np.random.default_rng(1)
    w = np.concatenate([layer["w"], rng.standard_normal((8, K_IN)).astype(np.float32) * 3,
                        np.zeros((1, K_IN), np.float32), np.full((1, K_IN), -0.25, np.float32)])
    np.testing.assert_array_equal(search.quantize_imatrix(w, gtype, layer["imatrix"]),
                                  ggml_quantize(w, gtype, layer["imatrix"]))
    np.testing.assert_array_equal(search.quantize_mse(w, gtype), ggml_quantize(w, gtype, np.ones(K_IN)))


@pytest.mark.parametrize("name", ["Q4_0", "Q4_K"])
def test_output_error_ordering(name, layer):
    """imatrix < mse ~ rtn; gptq far below rtn on correlated inputs; act-order about the same."""
    gtype = F.GGMLType[name]
    err = {
        "rtn": output_error(layer, F.quantize(layer["w"], gtype), gtype),
        "mse": output_error(layer, search.quantize_mse(layer["w"], gtype), gtype),
        "imatrix": output_error(layer, search.quantize_imatrix(layer["w"], gtype, layer["imatrix"]), gtype),
        "gptq": output_error(layer, gptq.gptq_quantize(layer["w"], gtype, layer["h"]), gtype),
        "gptq_act": output_error(layer, gptq.gptq_quantize(layer["w"], gtype, layer["h"], act_order=True),
                                 gtype),
    }
    assert err["imatrix"] < 0.9 * err["mse"], err
    assert err["mse"] < 1.1 * err["rtn"], err
    assert err["gptq"] < 0.4 * err["rtn"], err
    assert err["gptq"] < 0.4 * err["imatrix"], err
    assert err["gptq_act"] < 1.1 * err["gptq"], err


@pytest.mark.parametrize("name", ["Q4_0", "Q4_K"])
def test_awq_then_gptq_not_worse_than_gptq(name, layer):
    gtype = F.GGMLType[name]
    plain = gptq.gptq_quantize(layer["w"], gtype, layer["h"])
    s, stats = awq.awq_search(layer["w"], layer["x"], gtype, grid=5,
                              rounding=awq.gptq_rounding(gtype, layer["h"]))
    assert s.shape == (K_IN,) and np.isfinite(s).all() and (s > 0).all()
    assert stats["error"] <= stats["plain_error"] and len(stats["errors"]) == 5
    scaled = gptq.gptq_quantize(awq.apply_awq(layer["w"], s), gtype, awq.scale_hessian(layer["h"], s))
    for x in (layer["x"], layer["x_test"]):
        assert output_error(layer, scaled, gtype, s, x) <= 1.01 * output_error(layer, plain, gtype, None, x)


def test_awq_rtn_search_lowers_rtn_error(layer):
    """Default AWQ (RTN in the loop): the outlier channels get larger scales, the error drops."""
    gtype = F.GGMLType.Q4_0
    s, stats = awq.awq_search(layer["w"], layer["x"], gtype, mean_abs=np.abs(layer["x"]).mean(axis=0))
    assert stats["alpha"] > 0 and stats["error"] < 0.9 * stats["plain_error"]
    assert s[[3, 77, 300]].min() > np.median(s)
    raw = F.quantize(awq.apply_awq(layer["w"], s), gtype)
    plain = F.quantize(layer["w"], gtype)
    assert output_error(layer, raw, gtype, s) < 0.95 * output_error(layer, plain, gtype)
    np.testing.assert_array_equal(methods.awq_scales(layer["w"], gtype, layer["x"]), s)


@pytest.mark.parametrize("name", QUANT_TYPES)
def test_every_method_writes_valid_gguf_blocks(name, layer):
    gtype = F.GGMLType[name]
    shape = layer["w"].shape
    rtn_err = output_error(layer, F.quantize(layer["w"], gtype), gtype)
    for method in methods.METHODS:
        raw = methods.quantize_with(method, layer["w"], gtype, imatrix=layer["imatrix"], hessian=layer["h"])
        assert raw.shape == (shape[0], F.row_bytes(gtype, shape[1])) and raw.dtype == np.uint8
        assert_valid_gguf(raw, gtype, shape)
    raw = methods.quantize_with("gptq", layer["w"], gtype, hessian=layer["h"])
    assert output_error(layer, raw, gtype) < 0.5 * rtn_err


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_lazy_batches_are_exact(act_order, layer):
    """Lazy batch updates (and the pending updates applied when act-order first reaches a block)
    reorganise the same computation: in float64, batch sizes 1, 7 and 128 give the same bytes
    (Q4_K: super-blocks of 256 span batches of 128 and 7)."""
    w, h = layer["w"][:24], layer["h"]
    for gtype in (F.GGMLType.Q4_0, F.GGMLType.Q4_K):
        outs = [gptq.gptq_quantize(w, gtype, h, act_order=act_order, blocksize=b, dtype=np.float64)
                for b in (1, 7, 128)]
        for other in outs[1:]:
            np.testing.assert_array_equal(other, outs[0])


def obq_reference(w: np.ndarray, h: np.ndarray, gtype: F.GGMLType, act_order: bool) -> np.ndarray:
    """GPTQ written the slow, textbook way (optimal brain quantization, float64): one column at a
    time, update all remaining columns with the explicit inverse Hessian, then remove the column
    from it by a rank-1 downdate. No Cholesky, no lazy batches, no pending updates. The grid of a
    block is chosen at its first column by pocketlm's scale search (not what is tested here)."""
    fmt = F.format_for(gtype)
    w = w.astype(np.float64).copy()
    h = h.astype(np.float64).copy()
    dead = np.diag(h) <= 0
    h[dead, dead] = 1
    w[:, dead] = 0
    imp = search.checked_importance(np.where(dead, 0, np.diag(h) / 2), w.shape[1])
    sigma2 = search.row_sigma2(w.astype(np.float32))
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(w.shape[1])
    hinv = np.linalg.inv(h + 0.01 * np.mean(np.diag(h)) * np.eye(len(h)))
    bs, grids = fmt.block_size, {}
    codes = np.zeros(w.shape)
    for c in order:
        b = c // bs
        if b not in grids:
            vals = w[:, b * bs : (b + 1) * bs].astype(np.float32)
            weights = search.value_weights(gtype, vals, imp[b * bs : (b + 1) * bs], sigma2)
            _, *fields = search.search_fields(fmt, vals, weights)
            step, offset = fmt.affine(*fields)
            offset = None if offset is None else offset.reshape(len(w), -1)
            grids[b] = (step.reshape(len(w), -1), offset, fields)
        step, offset, _ = grids[b]
        sub = (c % bs) // (bs // step.shape[1])
        st = step[:, sub].astype(np.float64)
        off = 0.0 if offset is None else offset[:, sub].astype(np.float64)
        q = np.where(st == 0, fmt.code_zero,
                     np.clip(np.rint((w[:, c] - off) / np.where(st == 0, 1, st)) + fmt.code_zero,
                             fmt.code_min, fmt.code_max))
        codes[:, c] = q
        err = (w[:, c] - (st * (q - fmt.code_zero) + off)) / hinv[c, c]
        w -= np.outer(err, hinv[c])
        hinv -= np.outer(hinv[:, c], hinv[c]) / hinv[c, c]
    n_blocks = w.shape[1] // bs
    fields = [np.stack(f, axis=1).reshape(len(w) * n_blocks, *f[0].shape[1:])
              for f in zip(*(grids[b][2] for b in range(n_blocks)), strict=True)]
    dtype = np.int8 if fmt.code_min < 0 else np.uint8
    return fmt.pack(codes.reshape(-1, bs).astype(dtype), *fields).reshape(len(w), -1)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("name", ["Q4_0", "Q4_K"])
def test_gptq_matches_textbook_obq(name, act_order, layer, backend):
    gtype = F.GGMLType[name]
    w = layer["w"][:12]
    ours = gptq.gptq_quantize(w, gtype, layer["h"], act_order=act_order, dtype=np.float64)
    np.testing.assert_array_equal(ours, obq_reference(w, layer["h"], gtype, act_order))


@pytest.mark.parametrize("name", QUANT_TYPES)
def test_gptq_dead_channels_and_singular_hessian(name, layer, backend):
    gtype = F.GGMLType[name]
    w = layer["w"][:16]
    x = layer["x"][:64].copy()
    x[:, 40:80] = 0  # dead input channels (a whole Q4_0 block and parts of others)
    h_dead = 2.0 / len(x) * x.T.astype(np.float64) @ x
    raw = gptq.gptq_quantize(w, gtype, h_dead)  # 64 rows < 512 inputs: singular as well
    wq = assert_valid_gguf(raw, gtype, w.shape)
    if gtype in (F.GGMLType.Q4_0, F.GGMLType.Q8_0, F.GGMLType.Q6_K):  # symmetric: 0 is a code
        assert (wq[:, 64:80] == 0).all()  # a fully dead block of 32 is all zero
    rank_one = np.outer(x[0], x[0]).astype(np.float64)
    assert_valid_gguf(gptq.gptq_quantize(w, gtype, rank_one), gtype, w.shape)
    assert_valid_gguf(gptq.gptq_quantize(w, gtype, np.zeros((K_IN, K_IN))), gtype, w.shape)


def upstream_error(layer: dict, x: np.ndarray) -> np.ndarray:
    """x [n, K_IN] as the float model gives it -> as a quantized prefix gives it: a linear distortion
    (the same for calibration and held-out rows, as a quantized layer before would cause) plus noise."""
    rng = np.random.default_rng(11)
    distortion = rng.standard_normal((K_IN, K_IN)) * (0.1 / np.sqrt(K_IN))
    noise = np.random.default_rng(len(x)).standard_normal(x.shape) * 0.02
    return (x + x @ distortion + noise).astype(np.float32)


def paired_accumulator(x_float: np.ndarray, x: np.ndarray) -> gptq.HessianAccumulator:
    acc = gptq.HessianAccumulator(K_IN)
    for xb, fb in zip(np.array_split(x, 3), np.array_split(x_float, 3), strict=True):
        acc.add_pair(xb, fb)
    return acc


def test_float_target_is_the_least_squares_fit(layer):
    """W* solves min ||X_f W^T - X W*^T|| (normal equations), and is W when X_f == X."""
    x_f = layer["x"]
    x = upstream_error(layer, x_f)
    acc = paired_accumulator(x_f, x)
    x64, f64 = x.astype(np.float64), x_f.astype(np.float64)
    np.testing.assert_allclose(acc.xtx, x64.T @ x64, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(acc.cross, (f64 - x64).T @ x64, rtol=1e-4, atol=1e-3)
    w_star = gptq.float_target_weight(layer["w"], acc.xtx, acc.cross, damp=1e-9).astype(np.float64)
    residual = x64 @ w_star.T - f64 @ layer["w"].T.astype(np.float64)  # [n, out]
    normal = x64.T @ residual  # zero at the least-squares optimum
    assert np.abs(normal).max() < 1e-4 * np.abs(x64.T @ (f64 @ layer["w"].T)).max()
    same = paired_accumulator(x_f, x_f)
    np.testing.assert_array_equal(gptq.float_target_weight(layer["w"], same.xtx, same.cross, 0.1), layer["w"])
    plain = gptq.HessianAccumulator(K_IN)
    plain.add(x)
    assert plain.cross is None
    with pytest.raises(PocketLMError, match="all be paired"):
        plain.add_pair(x[:10], x_f[:10])


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_float_target_from_its_cholesky_factor(act_order, layer, backend):
    """gptq_quantize(cross=D) forms W* from a Cholesky factor (numpy: an inverse factor in sweep
    order; torch: Cholesky solves) by matrix products, in row chunks and threads: equal to the
    reference W* (one float64 solve), both ways round (fewer inputs than rows and more); the codes
    do not depend on the row chunking or the threads."""
    x_f = layer["x"]
    acc = paired_accumulator(x_f, upstream_error(layer, x_f))
    w = layer["w"][:40]
    xtx = acc.xtx.astype(np.float64)
    perm = np.argsort(-np.diag(xtx), kind="stable") if act_order else np.arange(K_IN)
    dead = np.zeros(K_IN, bool)
    reference = gptq.float_target_weight(w, xtx, acc.cross, damp=0.1)
    for chunk, workers in ((40, 1), (7, 3)):  # 40 rows < 512 inputs: three products per chunk
        ours = gptq._float_target(w, xtx, acc.cross, perm, dead, 0.1, np.float64, chunk, workers)
        np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-6)
    tall = np.concatenate([layer["w"]] * 6)  # 576 rows > 512 inputs: M = A^-1 D^T formed once
    ours = gptq._float_target(tall, xtx, acc.cross, perm, dead, 0.1, np.float32, 100, 2)
    np.testing.assert_allclose(ours, gptq.float_target_weight(tall, xtx, acc.cross, damp=0.1), rtol=2e-3,
                               atol=2e-5)
    u, _ = gptq.inverse_cholesky(xtx[np.ix_(perm, perm)], 0.1)  # M = U^T U D^T formed once
    corr_t = gptq._float_target_operator(acc.cross, u, perm, 10 * K_IN, np.float64)(w.astype(np.float64))
    np.testing.assert_allclose(corr_t[np.argsort(perm)].T, reference - w, rtol=1e-4, atol=1e-6)
    gtype = F.GGMLType.Q4_0
    whole = gptq.gptq_quantize(w, gtype, xtx, act_order=act_order, cross=acc.cross)
    for kw in (dict(row_chunk=7), dict(workers=3)):
        np.testing.assert_array_equal(gptq.gptq_quantize(w, gtype, xtx, act_order=act_order, cross=acc.cross,
                                                         **kw), whole)


@pytest.mark.parametrize("name", ["Q4_0", "Q4_K"])
def test_gptq_with_float_target_fits_the_float_outputs(name, layer):
    """Inputs X from a quantized prefix, X_f from the float model: GPTQ on the float-target W*
    comes closer to the float outputs X_f W^T on held-out rows than GPTQ on W."""
    gtype = F.GGMLType[name]
    x_f = layer["x"]
    x = upstream_error(layer, x_f)
    acc = paired_accumulator(x_f, x)
    xt_f = layer["x_test"]
    xt = upstream_error(layer, xt_f)
    ref = xt_f @ layer["w"].T

    def err(raw: np.ndarray) -> float:
        return float(np.linalg.norm(ref - xt @ F.dequantize(raw, gtype, layer["w"].shape).T) / np.linalg.norm(ref))

    plain = err(gptq.gptq_quantize(layer["w"], gtype, acc.xtx))
    target = err(gptq.gptq_quantize(layer["w"], gtype, acc.xtx, cross=acc.cross))
    assert target < 0.75 * plain, (target, plain)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_in_place_cholesky_and_triangular_inverse(dtype):
    """The blocked in-place factorization GPTQ uses (no second [n, n] array) against LAPACK, on a
    size that is not a multiple of the block sizes."""
    n = 700
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2 * n, n))
    a = x.T @ x / (2 * n) + 0.05 * np.eye(n)
    m = a.astype(dtype)
    gptq._cholesky_inplace(m)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    assert m.dtype == dtype and (np.triu(m, 1) == 0).all()
    np.testing.assert_allclose(m, np.linalg.cholesky(a), rtol=tol, atol=tol)
    gptq._invert_lower(m)
    np.testing.assert_allclose(m, np.linalg.inv(np.linalg.cholesky(a)), rtol=20 * tol, atol=20 * tol)
    with pytest.raises(np.linalg.LinAlgError):
        gptq._cholesky_inplace(-a.astype(dtype))


def test_gptq_indefinite_hessian_is_damped_until_positive(backend):
    h = np.array([[1.0, 3.0], [3.0, 1.0]])  # eigenvalues 4, -2: not a Gram matrix
    u, damp = gptq.inverse_cholesky(h, 0.01)
    assert damp > 2 and np.isfinite(u).all()
    np.testing.assert_allclose(u.T @ u, np.linalg.inv(h + damp * np.eye(2)), rtol=1e-10)


def test_method_input_errors(layer):
    w = layer["w"]
    with pytest.raises(PocketLMError, match="Hessian"):
        gptq.gptq_quantize(w, F.GGMLType.Q4_0, np.eye(3))
    with pytest.raises(PocketLMError, match="importance"):
        search.quantize_imatrix(w, F.GGMLType.Q4_0, np.ones(7))
    with pytest.raises(PocketLMError, match="importance"):
        search.quantize_imatrix(w, F.GGMLType.Q4_0, -np.ones(K_IN))
    with pytest.raises(PocketLMError, match="unknown quantization method"):
        methods.quantize_with("q9", w, F.GGMLType.Q4_0)
    with pytest.raises(PocketLMError, match="gptq needs a Hessian"):
        methods.quantize_with("gptq", w, F.GGMLType.Q4_0)
    bad = w.copy()
    bad[0, 0] = np.nan
    with pytest.raises(PocketLMError, match="tensor contains NaN/Inf"):
        search.quantize_mse(bad, F.GGMLType.Q4_K)
    with pytest.raises(PocketLMError, match="tensor contains NaN/Inf"):
        gptq.gptq_quantize(bad, F.GGMLType.Q4_K, layer["h"])
    with pytest.raises(PocketLMError, match="calibration inputs"):
        awq.awq_search(w, layer["x"][:, :10], F.GGMLType.Q4_0)
