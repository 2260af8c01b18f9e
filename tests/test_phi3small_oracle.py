"""Self-checks of the Phi-3-small torch oracle (tests/torch_phi3small.py) and its fixtures, with no
pocketlm code involved. Oracles used here: the worked examples of the Phi-3-small notes (PHI3_SMALL.md) 4.1 for the
block rule, torch's own layer_norm and scaled_dot_product_attention, the cache-free whole-sequence run,
the dense causal model inside the local window, and onnxruntime's com.microsoft.SparseAttention CPU
kernel fed CSR layouts built from the oracle's block mask."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from phi3small_fixtures import default_long_mscale, dummy_token_ids, make_phi3small_checkpoint
from safetensors import safe_open
from torch_phi3small import FLOAT32_MIN, TorchPhi3Small, block_mask, head_sliding_step, layer_norm

SEQ = 200  # > 6 blocks of 16: the local window (2 blocks) and stride (4 blocks) both bite


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Factory: keyword arguments of make_phi3small_checkpoint -> folder (cached per module)."""
    made: dict[str, Path] = {}

    def make(**kw) -> Path:
        key = json.dumps(kw, sort_keys=True)
        if key not in made:
            made[key] = make_phi3small_checkpoint(tmp_path_factory.mktemp("p3s"), **kw)
        return made[key]

    return make


def tokens(n: int, seed: int = 0, vocab: int = 352) -> list[int]:
    # Ordinary ids only (below the 96 special ids), plus bos first as the chat template has it.
    bos = vocab - 96 + 1
    return [bos, *np.random.default_rng(seed).integers(0, vocab - 96, n - 1).tolist()]


def finite(logits: torch.Tensor, vocab: int = 352) -> torch.Tensor:
    keep = torch.ones(vocab, dtype=torch.bool)
    keep[dummy_token_ids(vocab)] = False
    return logits[:, keep]


# ----------------------------------------------------------------------------------- fixture files

def test_fixture_is_laid_out_as_microsoft_ships_it(ckpt):
    folder = ckpt()
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == ["Phi3SmallForCausalLM"] and cfg["model_type"] == "phi3small"
    assert cfg["attention_bias"] is False and "tie_word_embeddings" not in cfg
    assert cfg["bos_token_id"] == cfg["eos_token_id"] == 352 - 96 + 1
    assert len(cfg["dummy_token_indices"]) == 91
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(set(index.values())) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert "lm_head.weight" not in index and "model.layers.0.self_attn.rotary_emb.inv_freq" in index
    for name in ("model.layers.3.self_attn.query_key_value.bias", "model.layers.0.mlp.up_proj.bias",
                 "model.layers.2.mlp.down_proj.bias", "model.layers.1.self_attn.dense.bias",
                 "model.final_layernorm.bias", "model.layers.0.input_layernorm.bias"):
        assert name in index
    with safe_open(str(folder / index["model.layers.0.self_attn.query_key_value.weight"]), "pt") as f:
        qkv = f.get_tensor("model.layers.0.self_attn.query_key_value.weight")
    assert qkv.dtype == torch.bfloat16 and tuple(qkv.shape) == ((4 + 2) * 16, 64)
    with safe_open(str(folder / index["model.final_layernorm.bias"]), "pt") as f:
        assert f.get_tensor("model.final_layernorm.bias").abs().min() > 0  # LayerNorm biases non-zero


def test_head_major_qkv_split():
    """Rows labelled by (group g, slot, dim): slot j < r is query head g*r + j, slot r key g, r+1 value g."""

    class Spec:  # only the fields split_qkv reads
        heads, kv_heads, head_dim, group = 8, 2, 3, 4

    oracle = object.__new__(TorchPhi3Small)
    oracle.spec = Spec()
    labels = torch.tensor([[g * 1000 + slot * 10 + d for g in range(2) for slot in range(6) for d in range(3)]],
                          dtype=torch.float64)  # one token, [1, (8 + 4) * 3]
    q, k, v = oracle.split_qkv(labels)
    for h in range(8):
        assert q[h, 0].tolist() == [(h // 4) * 1000 + (h % 4) * 10 + d for d in range(3)]
    for g in range(2):
        assert k[g, 0].tolist() == [g * 1000 + 40 + d for d in range(3)]
        assert v[g, 0].tolist() == [g * 1000 + 50 + d for d in range(3)]


# ----------------------------------------------------------------------------------- block rule

def test_block_rule_matches_the_documented_examples():
    """Phi-3-small's own pattern (32 heads, 16 local blocks, stride 8), PHI3_SMALL.md 4.1."""
    bm = block_mask(128, 32, 16, 8, homo_head=False)
    local = set(range(16, 32))
    assert seen_cols(bm[0, 31]) == {7, 15} | local
    assert seen_cols(bm[3, 31]) == {4, 12} | local
    assert seen_cols(bm[7, 31]) == {0, 8} | local
    assert all(len(seen_cols(bm[h, 127])) == 30 for h in range(32))
    assert all(torch.equal(bm[h], bm[h + 8]) for h in range(24))
    assert len({tuple(bm[h].flatten().tolist()) for h in range(4)}) == 4  # a KV group's heads differ
    causal = torch.tril(torch.ones(16, 16, dtype=torch.bool))
    assert all(torch.equal(bm[h, :16, :16], causal) for h in range(32))  # <= 1024 tokens: dense
    assert [h for h in range(32) if bm[h, 16, 0]] == [7, 15, 23, 31]  # first difference at block 16
    assert head_sliding_step(8, 32, False) == 1 and head_sliding_step(8, 4, False) == 2
    assert head_sliding_step(8, 32, True) == 0


def test_homo_head_pattern_is_shared_by_all_heads():
    homo = block_mask(24, 4, 2, 4, homo_head=True)
    assert all(torch.equal(homo[h], homo[0]) for h in range(4))
    assert seen_cols(homo[0, 10]) == {3, 7, 9, 10}  # (j + 1) % 4 == 0, and the 2 local blocks
    hetero = block_mask(24, 4, 2, 4, homo_head=False)
    assert len({tuple(hetero[h].flatten().tolist()) for h in range(4)}) == 4


def seen_cols(row: torch.Tensor) -> set[int]:
    return set(torch.nonzero(row).flatten().tolist())


# ----------------------------------------------------------------------------------- the forward

@pytest.mark.parametrize("kw", [{}, {"homo_head": True}, {"dtype": "f32", "shards": 1},
                                {"longrope": "128k"}], ids=["hetero", "homo", "f32", "128k-long"])
def test_incremental_equals_whole_sequence(ckpt, kw):
    oracle = TorchPhi3Small(ckpt(**kw))
    toks = tokens(SEQ)
    whole = oracle.forward(toks)
    # 128k: a prompt past original_max (64), so whole and incremental both use the long factors.
    prefill = 70 if kw.get("longrope") else 23
    for chunk in (1, 7):
        inc = oracle.incremental(toks, prefill, chunk)
        assert torch.allclose(inc, whole, rtol=0, atol=1e-9)
    assert (whole == FLOAT32_MIN).sum().item() == SEQ * 91


@pytest.mark.parametrize("homo", [False, True])
def test_sparse_equals_dense_causal_inside_the_local_window_only(ckpt, homo):
    folder = ckpt(homo_head=homo)
    toks = tokens(SEQ)
    sparse = finite(TorchPhi3Small(folder).forward(toks))
    dense = finite(TorchPhi3Small(folder, force_dense=True).forward(toks))
    window = 2 * 16  # local_blocks * block_size
    assert torch.allclose(sparse[:window], dense[:window], rtol=0, atol=1e-10)
    row_diff = (sparse - dense).abs().amax(-1)
    assert row_diff[window] > 1e-3  # first query of block 2: key block 0 drops out for heads 1-3
    assert (row_diff[window:] > 1e-3).float().mean() > 0.9


def test_hetero_and_homo_patterns_give_different_models(ckpt):
    toks = tokens(SEQ)
    a = finite(TorchPhi3Small(ckpt()).forward(toks))
    b = finite(TorchPhi3Small(ckpt(homo_head=True)).forward(toks))  # same weights (same seed)
    assert torch.allclose(a[:32], b[:32], rtol=0, atol=1e-10) and (a[32:] - b[32:]).abs().max() > 1e-2


def test_gegelu_clamp_is_exercised(ckpt):
    oracle = TorchPhi3Small(ckpt())
    toks = tokens(SEQ)
    clamped = finite(oracle.forward(toks, trace=True))
    gelu_in = torch.cat([u[:, 0::2] for u in oracle.trace])
    lin_in = torch.cat([u[:, 1::2] for u in oracle.trace])
    assert (gelu_in > 20).sum() >= 10 and (lin_in.abs() > 20).sum() >= 10
    oracle.spec.gegelu_limit = math.inf  # the same model without the clamp
    assert (finite(oracle.forward(toks)) - clamped).abs().max() > 1e-2


def test_layer_norm_and_dense_attention_against_torch():
    """The hand-written LayerNorm and the dense-layer attention against torch's own ops."""
    gen = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(5, 64, generator=gen, dtype=torch.float64) for _ in range(3))
    assert torch.allclose(layer_norm(x, w[0], b[0], 1e-5),
                          torch.nn.functional.layer_norm(x, (64,), w[0], b[0], 1e-5), atol=1e-12)

    class Spec:
        heads, kv_heads, head_dim, group, attn_scale = 8, 2, 16, 4, 1 / 16

    oracle = object.__new__(TorchPhi3Small)
    oracle.spec = Spec()
    q = 3 * torch.randn(8, 20, 16, generator=gen, dtype=torch.float64)
    k, v = (3 * torch.randn(2, 20, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    ours = oracle.attend(q, k, v, torch.arange(20), dense=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1 / 16, enable_gqa=True)
    assert torch.allclose(ours, ref.transpose(0, 1).reshape(20, 128), atol=1e-12)


# ----------------------------------------------------------------------------------- LongRoPE

def test_longrope_switches_factor_sets_past_original_max(ckpt):
    folder = ckpt(longrope="128k")
    oracle = TorchPhi3Small(folder)
    rs = json.loads((folder / "config.json").read_text())["rope_scaling"]
    pos = torch.arange(64)
    exponent = torch.arange(0, 16, 2, dtype=torch.float64) / 16
    for total, factor, mscale in ((64, rs["short_factor"], rs["short_mscale"]),
                                  (65, rs["long_factor"], rs["long_mscale"])):
        ang = pos[:, None] / (torch.tensor(factor, dtype=torch.float64) * 1e6 ** exponent)
        cos, sin = oracle.rope(pos, total)
        assert torch.allclose(cos[:, :8], torch.cos(ang) * mscale, atol=1e-12)
        assert torch.allclose(sin[:, 8:], torch.sin(ang) * mscale, atol=1e-12)
    # Whole sequences: 64 tokens use the short set, 65 tokens the long set at every position.
    toks = tokens(65)
    assert (finite(oracle.forward(toks[:64])) - finite(oracle.forward(toks))[:64]).abs().max() > 1e-3
    # The 8k model is causal: appending a token does not change earlier logits.
    plain = TorchPhi3Small(ckpt())
    assert torch.allclose(plain.forward(toks[:64]), plain.forward(toks)[:64], rtol=0, atol=1e-10)


def test_longrope_cached_keys_keep_their_rotation(ckpt):
    """Decoding across original_max mixes factor sets (HF); the rows before the switch are unchanged."""
    oracle = TorchPhi3Small(ckpt(longrope="128k"))
    toks = tokens(100)
    whole = finite(oracle.forward(toks))
    inc = finite(oracle.incremental(toks, 40))
    short_only = finite(oracle.forward(toks[:64]))
    assert torch.allclose(inc[:64], short_only, rtol=0, atol=1e-9)
    assert (inc[64:] - whole[64:]).abs().amax(-1).min() > 1e-4


def test_longrope_default_mscales(ckpt):
    folder = ckpt(longrope="128k", mscales=(0.0, -1.0))
    spec = TorchPhi3Small(folder).spec
    assert spec.short_mscale == 1.0
    assert spec.long_mscale == pytest.approx(math.sqrt(1 + math.log(512 / 64) / math.log(64)), abs=1e-15)
    assert default_long_mscale(131072, 8192) == pytest.approx(1.1435437497937313, abs=1e-15)


# ----------------------------------------------------------------------------------- onnxruntime

def _sparse_attention_session(heads: int, kv_heads: int, head_dim: int, block: int, max_cache: int, scale: float):
    from onnx import TensorProto, helper

    f, i32 = TensorProto.FLOAT, TensorProto.INT32
    names = ["query", "key", "value", "past_key", "past_value", "block_row_indices", "block_col_indices",
             "total_sequence_length", "key_total_sequence_lengths"]
    node = helper.make_node("SparseAttention", names, ["output", "present_key", "present_value"],
                            domain="com.microsoft", num_heads=heads, kv_num_heads=kv_heads,
                            sparse_block_size=block, scale=scale)
    cache = [1, kv_heads, max_cache, head_dim]
    inputs = [helper.make_tensor_value_info("query", f, [1, None, heads * head_dim]),
              helper.make_tensor_value_info("key", f, [1, None, kv_heads * head_dim]),
              helper.make_tensor_value_info("value", f, [1, None, kv_heads * head_dim]),
              helper.make_tensor_value_info("past_key", f, cache),
              helper.make_tensor_value_info("past_value", f, cache),
              helper.make_tensor_value_info("block_row_indices", i32, [None, None]),
              helper.make_tensor_value_info("block_col_indices", i32, [None, None]),
              helper.make_tensor_value_info("total_sequence_length", i32, [1]),
              helper.make_tensor_value_info("key_total_sequence_lengths", i32, [1])]
    outputs = [helper.make_tensor_value_info("output", f, [1, None, heads * head_dim]),
               helper.make_tensor_value_info("present_key", f, cache),
               helper.make_tensor_value_info("present_value", f, cache)]
    model = helper.make_model(helper.make_graph([node], "sparse_attention", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def csr_layouts(bm: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Bool [H, nb, nb] -> CSR row pointers [H, nb + 1] and column indices [H, max_nnz] (-1 padded)."""
    rows = np.zeros((bm.shape[0], bm.shape[1] + 1), dtype=np.int32)
    cols = [torch.nonzero(bm[h])[:, 1].numpy().astype(np.int32) for h in range(bm.shape[0])]
    for h in range(bm.shape[0]):
        rows[h, 1:] = np.cumsum(bm[h].sum(-1).numpy())
    width = max(len(c) for c in cols)
    return rows, np.stack([np.pad(c, (0, width - len(c)), constant_values=-1) for c in cols])


@pytest.mark.parametrize("kw", [{}, {"homo_head": True}, {"vert_stride": 8, "local_blocks": 3},
                                {"heads": 8, "kv_heads": 2}],
                         ids=["hetero", "homo", "stride8-step2", "8-heads-2-kv"])
def test_sparse_layer_attention_matches_onnxruntime_sparse_attention(ckpt, kw):
    """Layer-0 (block-sparse) attention of the oracle against ORT's CPU SparseAttention kernel:
    a 90-token prompt (not a multiple of the block), then 1-token and 5-token decode steps to 120."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    import onnxruntime as ort

    oracle = TorchPhi3Small(ckpt(**kw), dtype=torch.float32)
    s = oracle.spec
    hd, max_cache = s.head_dim, 128
    assert not s.is_dense(0)
    rows, cols = csr_layouts(block_mask(max_cache // s.block_size, s.heads, s.local_blocks, s.vert_stride,
                                        s.homo_head))
    sess = _sparse_attention_session(s.heads, s.kv_heads, hd, s.block_size, max_cache, s.attn_scale)
    gen = torch.Generator().manual_seed(1)
    total = 120
    q = 2.5 * torch.randn(s.heads, total, hd, generator=gen)
    k, v = (2.5 * torch.randn(s.kv_heads, total, hd, generator=gen) for _ in range(2))
    past_k = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, s.kv_heads, max_cache, hd), np.float32))
    past_v = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, s.kv_heads, max_cache, hd), np.float32))

    def flat(x: torch.Tensor, a: int, b: int) -> np.ndarray:  # [N, T, D] -> [1, b - a, N * D]
        return np.ascontiguousarray(x[:, a:b].transpose(0, 1).reshape(1, b - a, -1).numpy())

    steps = [(0, 90), *[(t, t + 1) for t in range(90, 100)], *[(t, t + 5) for t in range(100, 120, 5)]]
    ours, theirs = [], []
    for a, b in steps:
        io = sess.io_binding()
        io.bind_cpu_input("query", flat(q, a, b))
        io.bind_cpu_input("key", flat(k, a, b))
        io.bind_cpu_input("value", flat(v, a, b))
        io.bind_ortvalue_input("past_key", past_k)
        io.bind_ortvalue_input("past_value", past_v)
        io.bind_output("output")  # bound first: copy_outputs_to_cpu() returns outputs in binding order
        io.bind_ortvalue_output("present_key", past_k)  # the CPU kernel needs past and present shared
        io.bind_ortvalue_output("present_value", past_v)
        io.bind_cpu_input("block_row_indices", rows)
        io.bind_cpu_input("block_col_indices", cols)
        io.bind_cpu_input("total_sequence_length", np.array([b], np.int32))
        io.bind_cpu_input("key_total_sequence_lengths", np.array([b], np.int32))
        sess.run_with_iobinding(io)
        theirs.append(io.copy_outputs_to_cpu()[0][0])
        ours.append(oracle.attend(q[:, a:b], k[:, :b], v[:, :b], torch.arange(a, b), dense=False).numpy())
    ours_all, theirs_all = np.concatenate(ours), np.concatenate(theirs)
    assert np.abs(ours_all - theirs_all).max() < 1e-5 * np.abs(theirs_all).max()
    # Not vacuous: the same inputs under plain causal attention differ clearly past the window.
    dense = oracle.attend(q, k, v, torch.arange(total), dense=True).numpy()
    assert np.abs(dense[40:] - theirs_all[40:]).max() > 0.1
