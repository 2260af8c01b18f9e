"""The C decode attention (`kernel.attention`) against a float64 numpy oracle.

One query token, H query heads over a [KV, n_ctx, hd] fp16 or float32 cache (the KVCache layout),
positions [lo, hi): scores q.k / sqrt(hd), stable softmax, weighted sum of v. Checked: MHA and GQA,
head sizes 64/96/128 (and an odd one for the SIMD tails), lengths 1..600, windows starting past 0;
the scalar and SIMD paths agree (and POCKETLM_KERNEL=scalar selects the scalar one in a fresh
process); 1 and 2 threads give identical bits; bad arguments raise PocketLMError.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from pocketlm.errors import PocketLMError
from pocketlm.runtime import kernel as k

PATHS = k.available_paths()
SIMD_PATHS = [p for p in PATHS if p != "scalar"]


@pytest.fixture(autouse=True)
def _restore_kernel_state():
    path, threads = k.active_path(), k.get_threads()
    yield
    k.use_path(path)
    k.set_threads(threads)


def make_case(H: int, KV: int, hd: int, n_ctx: int, dtype=np.float16, seed: int = 0):
    """q [H, hd] float32 and caches [KV, n_ctx, hd] with score spreads like a real model's."""
    rng = np.random.default_rng(seed)
    q = (rng.standard_normal((H, hd)) * 2).astype(np.float32)
    kc = rng.standard_normal((KV, n_ctx, hd)).astype(dtype)
    vc = rng.standard_normal((KV, n_ctx, hd)).astype(dtype)
    return q, kc, vc


def reference(q: np.ndarray, kc: np.ndarray, vc: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """float64 attention: out [H, hd]."""
    H, hd = q.shape
    KV = kc.shape[0]
    qg = q.astype(np.float64).reshape(KV, H // KV, hd)                    # [KV, G, hd]
    keys = kc[:, lo:hi].astype(np.float64)                               # [KV, S, hd]
    vals = vc[:, lo:hi].astype(np.float64)
    s = qg @ keys.transpose(0, 2, 1) / np.sqrt(hd)                       # [KV, G, S]
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return (p @ vals).reshape(H, hd)


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    # float32 accumulation over hd products and S positions: ~1e-6 of the output's scale
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("H,KV", [(4, 4), (8, 2), (6, 1)])
@pytest.mark.parametrize("hd", [64, 96, 128])
def test_matches_float64(path: str, H: int, KV: int, hd: int) -> None:
    k.use_path(path)
    n_ctx = 640
    q, kc, vc = make_case(H, KV, hd, n_ctx, seed=hd + H)
    for lo, hi in [(0, 1), (0, 2), (0, 7), (0, 33), (0, 257), (0, 600), (599, 600), (100, 356), (40, 640)]:
        assert_close(k.attention(q, kc, vc, lo, hi), reference(q, kc, vc, lo, hi))


@pytest.mark.parametrize("path", PATHS)
def test_float32_and_uint16_caches_and_odd_head_dim(path: str) -> None:
    """float32 caches; fp16 bits as uint16 (same answer as float16); hd = 20 runs the SIMD tails."""
    k.use_path(path)
    q, kc, vc = make_case(8, 2, 20, 50, dtype=np.float32, seed=1)
    assert_close(k.attention(q, kc, vc, 3, 47), reference(q, kc, vc, 3, 47))
    q, kc, vc = make_case(8, 4, 96, 50, seed=2)
    as_f16 = k.attention(q, kc, vc, 0, 50)
    np.testing.assert_array_equal(k.attention(q, kc.view(np.uint16), vc.view(np.uint16), 0, 50), as_f16)
    assert_close(as_f16, reference(q, kc, vc, 0, 50))


def test_large_scores_are_stable() -> None:
    """Scores in the thousands: exp overflows unless the max is subtracted."""
    q, kc, vc = make_case(4, 2, 64, 300, seed=3)
    q *= 300
    out = k.attention(q, kc, vc, 0, 300)
    assert np.isfinite(out).all()
    assert_close(out, reference(q, kc, vc, 0, 300))


@pytest.mark.parametrize("path", SIMD_PATHS)
def test_simd_equals_scalar(path: str) -> None:
    q, kc, vc = make_case(32, 8, 96, 600, seed=4)
    k.use_path("scalar")
    scalar = k.attention(q, kc, vc, 10, 600)
    k.use_path(path)
    simd = k.attention(q, kc, vc, 10, 600)
    np.testing.assert_allclose(simd, scalar, rtol=1e-5, atol=1e-6 * np.abs(scalar).max())


def test_threads_do_not_change_bits() -> None:
    """Big enough to use the pool (32 heads x 600 positions x 96); heads are split, not positions."""
    q, kc, vc = make_case(32, 32, 96, 600, seed=5)
    k.set_threads(1)
    one = k.attention(q, kc, vc, 0, 600)
    k.set_threads(2)
    np.testing.assert_array_equal(k.attention(q, kc, vc, 0, 600), one)


def test_env_override_selects_scalar() -> None:
    """POCKETLM_KERNEL=scalar in a fresh process gives the scalar path's exact bits."""
    code = ("import sys, numpy as np; from pocketlm.runtime import kernel as k; "
            "rng = np.random.default_rng(6); q = rng.standard_normal((8, 64)).astype(np.float32); "
            "c = rng.standard_normal((2, 2, 300, 64)).astype(np.float16); "
            "sys.stdout.write(k.active_path() + ' ' + k.attention(q, c[0], c[1], 0, 300).tobytes().hex())")
    env = {**os.environ, "POCKETLM_KERNEL": "scalar"}
    r = subprocess.run([sys.executable, "-P", "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    name, hexbytes = r.stdout.split()
    assert name == "scalar"
    rng = np.random.default_rng(6)
    q = rng.standard_normal((8, 64)).astype(np.float32)
    c = rng.standard_normal((2, 2, 300, 64)).astype(np.float16)
    k.use_path("scalar")
    np.testing.assert_array_equal(np.frombuffer(bytes.fromhex(hexbytes), np.float32).reshape(8, 64),
                                  k.attention(q, c[0], c[1], 0, 300))


def test_bad_arguments_raise() -> None:
    q, kc, vc = make_case(8, 2, 64, 32)
    bad = [
        (q.astype(np.float64), kc, vc, 0, 8, None),                 # q dtype
        (q.reshape(-1), kc, vc, 0, 8, None),                         # q rank
        (q[:, :32], kc[..., :32], vc[..., :32], 0, 8, None),          # not contiguous
        (q, kc, vc[:, :16], 0, 8, None),                             # k, v shapes differ
        (q[:, :32].copy(), kc, vc, 0, 8, None),                      # head_dim differs
        (q[:5].copy(), kc, vc, 0, 8, None),                          # 5 heads over 2 kv heads
        (q, kc, vc, -1, 8, None),                                    # lo < 0
        (q, kc, vc, 8, 8, None),                                     # empty range
        (q, kc, vc, 9, 8, None),                                     # reversed
        (q, kc, vc, 0, 33, None),                                    # past the cache
        (q, kc, vc.astype(np.float32), 0, 8, None),                  # k fp16, v float32
        (q, kc.astype(np.int8), vc.astype(np.int8), 0, 8, None),     # int8 is numpy's job
        (q, kc, vc, 0, 8, np.zeros((8, 63), np.float32)),            # out shape
        (q, kc, vc, 0, 8, np.zeros((8, 64), np.float64)),            # out dtype
        (q, kc, vc, 0, 8.0, None),                                   # hi not an int
    ]
    for args in bad:
        with pytest.raises(PocketLMError, match="kernel: "):
            k.attention(*args[:5], out=args[5])
    nan_q = q.copy()
    nan_q[3, 7] = np.nan
    with pytest.raises(PocketLMError, match="NaN"):
        k.attention(nan_q, kc, vc, 0, 8)
    read_only = np.zeros((8, 64), np.float32)
    read_only.flags.writeable = False
    with pytest.raises(PocketLMError, match="writable"):
        k.attention(q, kc, vc, 0, 8, out=read_only)
    f32 = make_case(8, 2, 64, 32, dtype=np.float32)[1]
    with pytest.raises(PocketLMError, match="overlap"):
        k.attention(q, f32, f32, 0, 8, out=f32[0, :8])


def test_raw_binding_checks_sizes() -> None:
    """The C side re-checks what the wrapper derived: heads, kv heads, head_dim, n_ctx vs the buffers."""
    from pocketlm.runtime import _kernel

    q, kc, vc = make_case(8, 2, 64, 32)
    out = np.zeros((8, 64), np.float32)
    good = [q, kc, vc, 8, 2, 64, 32, 0, 8, out]
    _kernel.attention(*good)
    for i, value in [(3, 16), (4, 4), (5, 32), (6, 64), (3, 0), (4, 0), (5, 0), (6, 0), (4, 3)]:
        args = list(good)
        args[i] = value
        with pytest.raises(ValueError):
            _kernel.attention(*args)
