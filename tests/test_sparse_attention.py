"""The C attention over T query rows (`kernel.attention_rows`): dense, sliding-window and
Phi-3-small block-sparse, decode (T = 1) and prompt (T > 1), fp32 / fp16 / int8 caches.

Oracles (none of them is our own code):
  1. onnxruntime's `com.microsoft.SparseAttention` CPU kernel fed `blocksparse.csr_layouts` as its
     CSR inputs (past and present KV bound to ONE buffer through io_binding, PHI3_SMALL.md section
     8): the prompt in one call, and decode token by token through onnxruntime's own cache;
  2. a dense masked softmax in torch (float64) written here from the definition: the block rule
     expanded to tokens, AND causal (AND the window);
  3. within the local window the block-sparse pattern equals dense causal attention.
Small configs (block 16, 2-4 local blocks, vertical stride 4, GQA with 4 query heads per kv head,
hetero and homo heads) so the pattern bites from 32-64 tokens; lengths not multiples of the block.
"""

from __future__ import annotations

import numpy as np
import pytest

from pocketlm.blocksparse import BlockSparse, csr_layouts, token_mask
from pocketlm.errors import PocketLMError
from pocketlm.runtime import kernel as k

torch = pytest.importorskip("torch")

PATHS = k.available_paths()


@pytest.fixture(autouse=True)
def _restore_kernel_state():
    path, threads = k.active_path(), k.get_threads()
    yield
    k.use_path(path)
    k.set_threads(threads)


# ------------------------------------------------------------------------------------ data

def make_cache(KV: int, n_ctx: int, hd: int, kind: str, seed: int):
    """Caches of one layer [KV, n_ctx, hd] of `kind`, their scales (int8) and float64 values."""
    rng = np.random.default_rng(seed)
    if kind == "int8":
        kc = rng.integers(-127, 128, (KV, n_ctx, hd)).astype(np.int8)
        vc = rng.integers(-127, 128, (KV, n_ctx, hd)).astype(np.int8)
        ks = rng.uniform(0.004, 0.02, (KV, n_ctx)).astype(np.float16)
        vs = rng.uniform(0.004, 0.02, (KV, n_ctx)).astype(np.float16)
        kd = kc.astype(np.float64) * ks.astype(np.float64)[..., None]
        vd = vc.astype(np.float64) * vs.astype(np.float64)[..., None]
        return kc, vc, ks, vs, kd, vd
    dtype = np.float16 if kind == "f16" else np.float32
    kc = rng.standard_normal((KV, n_ctx, hd)).astype(dtype)
    vc = rng.standard_normal((KV, n_ctx, hd)).astype(dtype)
    return kc, vc, None, None, kc.astype(np.float64), vc.astype(np.float64)


def make_q(T: int, H: int, KV: int, hd: int, seed: int, spread: float = 3.0) -> np.ndarray:
    """Fused qkv rows [T, (H + 2 KV) hd]: the queries are the first H*hd columns. The k/v columns
    hold NaN: the kernel must read only the queries."""
    rng = np.random.default_rng(seed + 1000)
    qkv = np.full((T, (H + 2 * KV) * hd), np.nan, dtype=np.float32)
    qkv[:, : H * hd] = rng.standard_normal((T, H * hd)) * spread
    return qkv


def torch_reference(q: np.ndarray, kd: np.ndarray, vd: np.ndarray, H: int, pos: int, scale: float,
                    bs: BlockSparse | None = None, window: int = 0) -> np.ndarray:
    """float64 dense masked attention from the definition: out [T, H*hd].

    Query head h (kv head h // (H // KV)) at position p sees key j iff j <= p, j > p - window
    (window > 0), and with a block pattern: key block jb <= query block ib and (ib - jb < local or
    (jb + h * head_step + 1) % vert_stride == 0), head_step = 0 (homo) or max(1, stride // H)."""
    T, hd, KV, hd_v = q.shape[0], kd.shape[2], kd.shape[0], vd.shape[2]
    S = pos + T
    qt = torch.tensor(q[:, : H * hd], dtype=torch.float64).reshape(T, H, hd).transpose(0, 1)  # [H, T, hd]
    kv_of = torch.arange(H) // (H // KV)
    keys = torch.tensor(kd[:, :S])[kv_of]                                                     # [H, S, hd]
    vals = torch.tensor(vd[:, :S])[kv_of]
    qp = torch.arange(pos, S)[None, :, None]                                                  # [1, T, 1]
    kp = torch.arange(S)[None, None, :]                                                       # [1, 1, S]
    allowed = kp <= qp
    if window:
        allowed = allowed & (kp > qp - window)
    if bs is not None:
        step = 0 if bs.homo_head else max(1, bs.vert_stride // H)
        h = torch.arange(H)[:, None, None]
        ib, jb = qp // bs.block_size, kp // bs.block_size
        allowed = allowed & (jb <= ib) & (((ib - jb) < bs.local_blocks) | ((jb + h * step + 1) % bs.vert_stride == 0))
    scores = (qt @ keys.transpose(1, 2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ vals                                                # [H, T, hd]
    return out.transpose(0, 1).reshape(T, H * hd_v).numpy()


def assert_close(got: np.ndarray, want: np.ndarray, tol: float = 2e-5) -> None:
    # float32 products over hd and online-softmax sums over a few hundred keys: ~1e-6 relative
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


def run_rows(q, kc, vc, ks, vs, H, pos, *, T=None, scale, bs=None, window=0, chunks=None):
    """Our kernel over rows q[:T] at positions pos.., optionally in chunks of the given sizes."""
    T = q.shape[0] if T is None else T
    out = np.empty((T, H * kc.shape[2]), np.float32)
    sizes = chunks or [T]
    t = 0
    while t < T:
        n = min(sizes[0], T - t)
        sizes = sizes[1:] + sizes[:1]
        out[t:t + n] = k.attention_rows(q[t:t + n], kc, vc, H, pos + t, k_scale=ks, v_scale=vs,
                                        window=window, scale=scale, sparse=bs)
        t += n
    return out


HETERO = BlockSparse(16, 2, 4)
HOMO = BlockSparse(16, 2, 4, homo_head=True)
WIDE = BlockSparse(16, 4, 4)


# ------------------------------------------------------------- oracle 2: torch, from the definition

@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ["f32", "f16", "int8"])
@pytest.mark.parametrize("bs", [HETERO, HOMO, WIDE], ids=["hetero", "homo", "local4"])
def test_sparse_prompt_and_decode_match_torch(path: str, kind: str, bs: BlockSparse) -> None:
    k.use_path(path)
    H, KV, hd, L, n_ctx = 8, 2, 32, 181, 200
    kc, vc, ks, vs, kd, vd = make_cache(KV, n_ctx, hd, kind, seed=1)
    q = make_q(L, H, KV, hd, seed=2)
    want = torch_reference(q, kd, vd, H, 0, 1.0 / hd, bs)
    assert_close(run_rows(q, kc, vc, ks, vs, H, 0, scale=1.0 / hd, bs=bs), want)
    # decode: one row at a time, each at its own position (the cache holds the later keys too:
    # they must stay unseen)
    for p in [0, 15, 16, 31, 32, 47, 63, 64, 100, 127, 128, 180]:
        got = k.attention_rows(q[p:p + 1], kc, vc, H, p, k_scale=ks, v_scale=vs, scale=1.0 / hd, sparse=bs)
        assert_close(got, want[p:p + 1])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ["f32", "f16", "int8"])
def test_dense_and_window_match_torch(path: str, kind: str) -> None:
    """Dense causal and sliding window (Phi-3-mini's kind of layer), default scale 1/sqrt(hd),
    prompt rows starting past 0 (a later chunk) and decode rows."""
    k.use_path(path)
    H, KV, hd, n_ctx = 8, 2, 64, 300
    kc, vc, ks, vs, kd, vd = make_cache(KV, n_ctx, hd, kind, seed=3)
    q = make_q(150, H, KV, hd, seed=4, spread=1.0)
    scale = 1.0 / np.sqrt(hd)
    for pos, T, window in [(0, 150, 0), (120, 150, 0), (0, 150, 37), (100, 130, 64), (149, 1, 0), (299, 1, 0),
                           (299, 1, 100), (5, 1, 1)]:
        want = torch_reference(q[:T], kd, vd, H, pos, scale, window=window)
        assert_close(run_rows(q[:T], kc, vc, ks, vs, H, pos, scale=scale, window=window), want)


@pytest.mark.parametrize("hd", [20, 40])
def test_sparse_with_window_and_odd_head_dim(hd: int) -> None:
    """Both masks at once, and head sizes that leave SIMD tails (20, 40 = 32 + 8), on every path."""
    H, KV = 8, 2
    kc, vc, ks, vs, kd, vd = make_cache(KV, 160, hd, "f16", seed=5)
    q = make_q(90, H, KV, hd, seed=6)
    want = torch_reference(q, kd, vd, H, 70, 0.3, HETERO, window=45)
    for path in PATHS:
        k.use_path(path)
        assert_close(run_rows(q, kc, vc, ks, vs, H, 70, scale=0.3, bs=HETERO, window=45), want)


def test_reference_mask_is_the_blocksparse_definition() -> None:
    """The torch reference's mask equals blocksparse.token_mask (the module that builds the CSR
    layouts): with equal scores and value of key j = e_j, output row = the weights, > 0 where allowed."""
    H, KV, hd, L = 8, 2, 8, 150
    kd = np.zeros((KV, L, hd))
    vd = np.broadcast_to(np.eye(L), (KV, L, L))
    q = np.zeros((L, H * hd), np.float32)
    for bs in (HETERO, HOMO, WIDE):
        weights = torch_reference(q, kd, vd, H, 0, 1.0, bs).reshape(L, H, L).transpose(1, 0, 2)
        np.testing.assert_array_equal(weights > 0, token_mask(bs, H, np.arange(L), L))


# ------------------------------------------------------- oracle 1: onnxruntime's SparseAttention

class OrtSparseAttention:
    """onnxruntime's com.microsoft.SparseAttention CPU kernel with its own KV cache of max_cache
    positions (past and present bound to one buffer, as its CPU kernel requires)."""

    def __init__(self, H: int, KV: int, hd: int, bs: BlockSparse, scale: float, max_cache: int):
        ort = pytest.importorskip("onnxruntime")
        from onnx import TensorProto, helper

        F, I32 = TensorProto.FLOAT, TensorProto.INT32
        cache = [1, KV, max_cache, hd]
        inputs = [helper.make_tensor_value_info("query", F, [1, "S", H * hd]),
                  helper.make_tensor_value_info("key", F, [1, "S", KV * hd]),
                  helper.make_tensor_value_info("value", F, [1, "S", KV * hd]),
                  helper.make_tensor_value_info("past_key", F, cache),
                  helper.make_tensor_value_info("past_value", F, cache),
                  helper.make_tensor_value_info("block_row_indices", I32, ["layouts", "rows"]),
                  helper.make_tensor_value_info("block_col_indices", I32, ["layouts", "nnz"]),
                  helper.make_tensor_value_info("total_sequence_length", I32, [1]),
                  helper.make_tensor_value_info("key_total_sequence_lengths", I32, [1])]
        outputs = [helper.make_tensor_value_info("output", F, [1, "S", H * hd]),
                   helper.make_tensor_value_info("present_key", F, cache),
                   helper.make_tensor_value_info("present_value", F, cache)]
        node = helper.make_node("SparseAttention", [x.name for x in inputs], [x.name for x in outputs],
                                domain="com.microsoft", num_heads=H, kv_num_heads=KV, scale=scale,
                                sparse_block_size=bs.block_size)
        model = helper.make_model(helper.make_graph([node], "sparse_attention", inputs, outputs),
                                  opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
        self.sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        self.rows, self.cols = csr_layouts(bs, H, max_cache // bs.block_size)
        self.k_cache = ort.OrtValue.ortvalue_from_numpy(np.zeros(cache, np.float32))
        self.v_cache = ort.OrtValue.ortvalue_from_numpy(np.zeros(cache, np.float32))
        self.length = 0
        self.H, self.KV, self.hd = H, KV, hd

    def __call__(self, q: np.ndarray, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
        """q [S, H*hd]; keys, values [KV, S, hd] of the S new positions -> [S, H*hd]."""
        S = q.shape[0]
        total = np.array([self.length + S], np.int32)
        b = self.sess.io_binding()
        b.bind_output("output")  # first: copy_outputs_to_cpu lists the outputs in binding order
        for name, a in [("query", q[None]), ("key", keys.transpose(1, 0, 2).reshape(1, S, -1)),
                        ("value", values.transpose(1, 0, 2).reshape(1, S, -1)),
                        ("block_row_indices", self.rows), ("block_col_indices", self.cols),
                        ("total_sequence_length", total), ("key_total_sequence_lengths", total)]:
            b.bind_cpu_input(name, np.ascontiguousarray(a, dtype=a.dtype))
        b.bind_ortvalue_input("past_key", self.k_cache)
        b.bind_ortvalue_output("present_key", self.k_cache)
        b.bind_ortvalue_input("past_value", self.v_cache)
        b.bind_ortvalue_output("present_value", self.v_cache)
        self.sess.run_with_iobinding(b)
        self.length += S
        return b.copy_outputs_to_cpu()[0][0]


ORT_CASES = [  # (H, KV, bs, prompt length L)
    (8, 2, HETERO, 131),
    (8, 2, HOMO, 131),
    (8, 2, WIDE, 150),
    (4, 1, BlockSparse(16, 3, 4), 97),
]


@pytest.mark.parametrize("kind", ["f32", "f16", "int8"])
@pytest.mark.parametrize("H,KV,bs,L", ORT_CASES, ids=["hetero", "homo", "local4", "mha4"])
def test_prompt_matches_onnxruntime(kind: str, H: int, KV: int, bs: BlockSparse, L: int) -> None:
    """The whole prompt in one call, and in chunks of odd sizes through our cache."""
    hd, n_ctx, scale = 32, 160, 1.0 / 32
    kc, vc, ks, vs, kd, vd = make_cache(KV, n_ctx, hd, kind, seed=7)
    q = make_q(L, H, KV, hd, seed=8)
    qh = np.ascontiguousarray(q[:, : H * hd])
    want = OrtSparseAttention(H, KV, hd, bs, scale, n_ctx)(qh, kd[:, :L].astype(np.float32),
                                                          vd[:, :L].astype(np.float32))
    # ... and ORT itself differs from dense causal attention here (the pattern bites)
    assert np.abs(want - torch_reference(q, kd, vd, H, 0, scale)).max() > 1e-2
    assert_close(run_rows(q, kc, vc, ks, vs, H, 0, scale=scale, bs=bs), want)
    assert_close(run_rows(q, kc, vc, ks, vs, H, 0, scale=scale, bs=bs, chunks=[7, 13, 29, 1, 3]), want)


@pytest.mark.parametrize("H,KV,bs,L", ORT_CASES, ids=["hetero", "homo", "local4", "mha4"])
def test_decode_matches_onnxruntime(H: int, KV: int, bs: BlockSparse, L: int) -> None:
    """A prompt of 20 tokens, then token by token through onnxruntime's cache, across the local
    window boundary (2-4 blocks of 16) to a length that is no multiple of the block."""
    hd, n_ctx, scale, P = 32, 160, 1.0 / 32, 20
    kc, vc, ks, vs, kd, vd = make_cache(KV, n_ctx, hd, "f16", seed=9)
    q = make_q(L, H, KV, hd, seed=10)
    qh = np.ascontiguousarray(q[:, : H * hd])
    keys, values = kd.astype(np.float32), vd.astype(np.float32)
    ort_attn = OrtSparseAttention(H, KV, hd, bs, scale, n_ctx)
    assert_close(run_rows(q[:P], kc, vc, ks, vs, H, 0, scale=scale, bs=bs),
                 ort_attn(qh[:P], keys[:, :P], values[:, :P]))
    for p in range(P, L):
        want = ort_attn(qh[p:p + 1], keys[:, p:p + 1], values[:, p:p + 1])
        got = k.attention_rows(q[p:p + 1], kc, vc, H, p, k_scale=ks, v_scale=vs, scale=scale, sparse=bs)
        assert_close(got, want)


# --------------------------------------------------- oracle 3: within the local window, dense

@pytest.mark.parametrize("bs", [HETERO, WIDE], ids=["local2", "local4"])
def test_sparse_equals_dense_within_the_local_window(bs: BlockSparse) -> None:
    H, KV, hd = 8, 2, 32
    n_local = bs.local_blocks * bs.block_size
    kc, vc, ks, vs, _, _ = make_cache(KV, 2 * n_local + 16, hd, "f16", seed=11)
    q = make_q(2 * n_local + 16, H, KV, hd, seed=12)
    dense = run_rows(q, kc, vc, ks, vs, H, 0, scale=1.0 / hd)
    sparse = run_rows(q, kc, vc, ks, vs, H, 0, scale=1.0 / hd, bs=bs)
    assert_close(sparse[:n_local], dense[:n_local])
    # past the window the pattern drops blocks: the comparison above can fail
    assert np.abs(sparse[n_local + 16:] - dense[n_local + 16:]).max() > 1e-2


# ------------------------------------------------------------------------ kernel properties

def test_chunked_prompt_and_decode_give_the_same_bits() -> None:
    """Keys are visited on a grid of absolute positions, so a row's result does not depend on how
    the prompt was cut into calls: one call, odd chunks and one row at a time agree exactly."""
    H, KV, hd = 8, 2, 32
    kc, vc, ks, vs, _, _ = make_cache(KV, 200, hd, "int8", seed=13)
    q = make_q(190, H, KV, hd, seed=14)
    for bs, window in [(HETERO, 0), (None, 0), (None, 50)]:
        whole = run_rows(q, kc, vc, ks, vs, H, 0, scale=0.1, bs=bs, window=window)
        np.testing.assert_array_equal(run_rows(q, kc, vc, ks, vs, H, 0, scale=0.1, bs=bs, window=window,
                                               chunks=[5, 17, 1, 40]), whole)
        np.testing.assert_array_equal(run_rows(q, kc, vc, ks, vs, H, 0, scale=0.1, bs=bs, window=window,
                                               chunks=[1]), whole)


def test_threads_do_not_change_bits() -> None:
    H, KV, hd = 32, 8, 64
    kc, vc, ks, vs, _, _ = make_cache(KV, 600, hd, "f16", seed=15)
    q = make_q(300, H, KV, hd, seed=16)
    for bs in (None, BlockSparse(64, 4, 8)):
        k.set_threads(1)
        one = run_rows(q, kc, vc, ks, vs, H, 280, scale=1 / 64, bs=bs)
        dec1 = k.attention_rows(q[:1], kc, vc, H, 599, scale=1 / 64, sparse=bs)
        k.set_threads(2)
        np.testing.assert_array_equal(run_rows(q, kc, vc, ks, vs, H, 280, scale=1 / 64, bs=bs), one)
        np.testing.assert_array_equal(k.attention_rows(q[:1], kc, vc, H, 599, scale=1 / 64, sparse=bs), dec1)


def test_simd_paths_equal_scalar() -> None:
    H, KV, hd = 8, 2, 96
    kc, vc, ks, vs, _, _ = make_cache(KV, 400, hd, "int8", seed=17)
    q = make_q(120, H, KV, hd, seed=18)
    k.use_path("scalar")
    ref = run_rows(q, kc, vc, ks, vs, H, 250, scale=0.05, bs=WIDE)
    for path in PATHS:
        k.use_path(path)
        got = run_rows(q, kc, vc, ks, vs, H, 250, scale=0.05, bs=WIDE)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=2e-6 * np.abs(ref).max())


def test_old_decode_entry_is_the_same_kernel() -> None:
    """attention(q, k, v, lo, hi) = attention_rows at pos hi-1 with window hi-lo, scale 1/sqrt(hd)."""
    H, KV, hd = 8, 2, 64
    kc, vc, _, _, _, _ = make_cache(KV, 300, hd, "f16", seed=19)
    q = make_q(1, H, KV, hd, seed=20)
    qh = np.ascontiguousarray(q[:, : H * hd]).reshape(H, hd)
    for lo, hi in [(0, 1), (0, 300), (37, 290)]:
        np.testing.assert_array_equal(k.attention(qh, kc, vc, lo, hi).reshape(1, -1),
                                      k.attention_rows(q, kc, vc, H, hi - 1, window=hi - lo))


# --------------------------------------------------------------------------- bad arguments

def test_bad_arguments_raise() -> None:
    H, KV, hd, n_ctx = 8, 2, 32, 64
    kc, vc, _, _, _, _ = make_cache(KV, n_ctx, hd, "f16", seed=21)
    k8, v8, ks, vs, _, _ = make_cache(KV, n_ctx, hd, "int8", seed=21)
    q = make_q(10, H, KV, hd, seed=22)

    def call(q=q, kc=kc, vc=vc, pos=0, **kw):
        return k.attention_rows(q, kc, vc, H, pos, **kw)

    call()
    call(kc=k8, vc=v8, k_scale=ks, v_scale=vs)
    bad = [
        dict(q=q.astype(np.float64)),                              # q dtype
        dict(q=q[0]),                                              # q rank
        dict(q=q[:, ::2]),                                         # q elements not contiguous
        dict(q=q[:, : H * hd - 1]),                                # q narrower than heads * hd
        dict(q=q[:0]),                                             # no rows
        dict(pos=-1),                                              # before the cache
        dict(pos=n_ctx - 9),                                       # rows past the cache
        dict(window=-1),                                           # negative window
        dict(scale=0.0), dict(scale=-1.0), dict(scale=float("nan")), dict(scale=float("inf")),
        dict(sparse=(16, 2, 4)),                                   # 3 fields
        dict(sparse=(16, 0, 4, 1)),                                # no local block
        dict(sparse=(0, 2, 4, 1)),                                 # block 0
        dict(sparse=(16, 2, 0, 1)),                                # stride 0
        dict(sparse=(16, 2, 4, -1)),                               # negative head step
        dict(sparse=[16, 2, 4, 1]),                                # not a tuple
        dict(vc=vc[:, :32].copy()),                                # k, v shapes differ
        dict(vc=vc.astype(np.float32)),                            # k fp16, v float32
        dict(kc=kc.astype(np.float64), vc=vc.astype(np.float64)),  # cache dtype
        dict(kc=k8, vc=v8),                                        # int8 without scales
        dict(k_scale=ks, v_scale=vs),                              # scales with fp16
        dict(kc=k8, vc=v8, k_scale=ks.astype(np.float32), v_scale=vs),  # scale dtype
        dict(kc=k8, vc=v8, k_scale=ks[:, :32].copy(), v_scale=vs),     # scale shape
        dict(kc=k8, vc=v8, k_scale=ks, v_scale=None),              # one scale missing
        dict(out=np.zeros((10, H * hd - 1), np.float32)),          # out size
        dict(out=np.zeros((10, H * hd), np.float64)),              # out dtype
    ]
    for kw in bad:
        with pytest.raises(PocketLMError, match="kernel: "):
            call(**kw)
    nan_q = q.copy()
    nan_q[3, 7] = np.nan
    with pytest.raises(PocketLMError, match="NaN"):
        call(q=nan_q)
    read_only = np.zeros((10, H * hd), np.float32)
    read_only.flags.writeable = False
    with pytest.raises(PocketLMError, match="writable"):
        call(out=read_only)
    with pytest.raises(PocketLMError, match="overlap"):
        own = np.ascontiguousarray(q[:, : H * hd])
        call(q=own, out=own)
    f32 = make_cache(KV, n_ctx, hd, "f32", seed=23)[0]
    with pytest.raises(PocketLMError, match="overlap"):
        call(kc=f32, vc=f32, out=f32.reshape(-1)[: 10 * H * hd].reshape(10, H * hd))


def test_raw_binding_checks_sizes() -> None:
    """The C side re-checks what the wrapper derived: heads, kv heads, head_dim, n_ctx vs buffers."""
    from pocketlm.runtime import _kernel

    H, KV, hd, n_ctx = 8, 2, 32, 64
    kc, vc, _, _, _, _ = make_cache(KV, n_ctx, hd, "f16", seed=24)
    q = make_q(4, H, KV, hd, seed=25)
    out = np.zeros((4, H * hd), np.float32)
    good = [q, kc, vc, None, None, H, KV, hd, n_ctx, 0, 0, 0.1, None, out]
    _kernel.attention_rows(*good)
    for i, value in [(5, 16), (5, 3), (6, 4), (6, 3), (7, 64), (7, 16), (8, 128), (8, 32), (5, 0), (6, 0),
                     (7, 0), (8, 0), (12, (16, 2, 4, 1, 0)), (12, ("a", 2, 4, 1))]:
        args = list(good)
        args[i] = value
        with pytest.raises((ValueError, TypeError)):
            _kernel.attention_rows(*args)
