"""The streaming quantizer: files gguf-py and llama.cpp read, llama.cpp's logits, AWQ folding,
interruption, degenerate calibration."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gguf
import numpy as np
import pytest

from pocketlm.checkpoint import Checkpoint
from pocketlm.errors import PocketLMError
from pocketlm.quantize import pipeline
from pocketlm.quantize.calib_matmul import calibration_matmul
from pocketlm.quantize.calibration import load_calibration
from pocketlm.quantize.evaluate import gguf_logits
from pocketlm.quantize.pipeline import METHODS, Options, parse_method, quantize_checkpoint
from pocketlm.quantize.recipes import get_recipe
from pocketlm.reference import Phi3Reference
from pocketlm.tokenizer import Tokenizer

_spec = importlib.util.spec_from_file_location("quant_helpers", Path(__file__).with_name("quant_helpers.py"))
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)

SMALL_CALIB = dict(calib_samples=8, calib_len=64)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """hidden 256 (K-quants fit), 2 layers, GQA, 1024-token Phi-3 vocabulary."""
    return helpers.make_checkpoint(tmp_path_factory.mktemp("ckpt256"))


def test_written_file_has_the_recipes_types_and_metadata(ckpt, tmp_path):
    out = tmp_path / "m.gguf"
    summary = quantize_checkpoint(ckpt, out, recipe="q4_k_m", method="imatrix", **SMALL_CALIB)
    reader = gguf.GGUFReader(out)  # gguf-py: an independent reader
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    expected = get_recipe("q4_k_m").tensor_types(Checkpoint.open(ckpt).config)
    assert types == {n: t.name for n, t in expected.items()}
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("pocketlm.recipe") == "q4_k_m"
    assert field("pocketlm.method") == "imatrix"
    assert field("pocketlm.calibration") == "corpus:calib; 8 samples x 64 tokens"
    assert field("general.file_type") == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert summary.file_bytes == out.stat().st_size
    for t in reader.tensors:  # gguf-py dequantizes every type we write: all finite
        assert np.isfinite(gguf.quants.dequantize(t.data, t.tensor_type)).all(), t.name


@pytest.mark.parametrize("recipe,method", [("q4_0", "gptq"), ("q8_0", "rtn"), ("q4_k_m", "awq+imatrix")])
def test_llama_cpp_gives_our_logits(ckpt, tmp_path, recipe, method):
    """The oracle: llama.cpp's logits for our file equal the eval harness's, with llama.cpp's
    activation rounding emulated (`llama_cpp_round_activations`).

    One token per context: from the second position on, llama.cpp's float summation order in
    attention differs from numpy's by ~1e-7, which now and then moves an activation across a Q8
    rounding boundary, and that one code step then spreads through the rest of the sequence. With
    a single token the comparison is exact except for such rare flips (in the rms-norm sums).
    A wrong tensor, layout, scale or type gives errors of order 1 on every token."""
    out = tmp_path / "m.gguf"
    quantize_checkpoint(ckpt, out, recipe=recipe, method=method, options=Options(awq_grid=5), **SMALL_CALIB)
    tokens = np.random.default_rng(0).integers(3, 1024, 16)
    theirs = helpers.llama_cpp_logits(out, tokens.tolist(), separate=True)  # [16, V]
    ours = gguf_logits(out, tokens[:, None], llama_cpp_activations=True)[:, 0]
    errors = np.abs(theirs - ours).max(axis=1) / np.abs(ours).max(axis=1)
    assert np.median(errors) < 1e-5, errors
    assert errors.max() < 0.05, errors
    # without the emulation the difference is llama.cpp's activation rounding: far larger
    plain = gguf_logits(out, np.array([5]))
    assert np.abs(helpers.llama_cpp_logits(out, [5]) - plain).max() / np.abs(plain).max() > 1e-4


def test_f16_file_multi_token_logits_match_llama_cpp(ckpt, tmp_path):
    """Whole sequences (attention, RoPE, KV) through the harness and llama.cpp: F16 weights, whose
    fp16 activation rounding is fine enough not to flip anything visible."""
    out = tmp_path / "f16.gguf"
    quantize_checkpoint(ckpt, out, recipe="f16")
    tokens = np.random.default_rng(1).integers(3, 1024, 24)
    tokens[0] = 1
    theirs = helpers.llama_cpp_logits(out, tokens.tolist())
    ours = gguf_logits(out, tokens, llama_cpp_activations=True)
    np.testing.assert_allclose(theirs, ours, atol=2e-3 * np.abs(ours).max())


@pytest.fixture(scope="module")
def outlier_ckpt(tmp_path_factory) -> Path:
    """Every 16th channel of each norm x8: the outlier input channels AWQ exists for."""
    ckpt = helpers.make_checkpoint(tmp_path_factory.mktemp("outliers"), seed=5)

    def boost(tensors):
        for name, t in tensors.items():
            if name.endswith("layernorm.weight"):
                t[::16] *= 8.0

    _edit_checkpoint(ckpt, boost)
    return ckpt


def _edit_checkpoint(ckpt: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(ckpt / "model.safetensors")
    edit(tensors)
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})


def test_awq_fold_leaves_the_float_model_unchanged(outlier_ckpt):
    ckpt = outlier_ckpt
    ck = Checkpoint.open(ckpt)
    cfg = ck.config
    weights = {n: ck.tensor(n) for n in ck.names()}
    q = pipeline._Quantizer(ck, get_recipe("q4_0"), parse_method("awq+gptq"), 1, Options(awq_grid=5))
    tokens = load_calibration(Tokenizer.from_hf_dir(ckpt), None, 4, 32).tokens
    folded = dict(weights)
    h = weights["token_embd.weight"][tokens]
    for i in range(cfg.num_hidden_layers):
        layer = {n: w for n, w in folded.items() if n.startswith(f"blk.{i}.")}
        stats = q.collect(i, layer, h)
        q.apply_awq(i, layer, stats)
        folded.update(layer)
        h = pipeline.run_layer(cfg, i, layer, h)
    q.close()
    for i in range(cfg.num_hidden_layers):  # the scales are real (not all 1)
        assert not np.allclose(folded[f"blk.{i}.attn_norm.weight"], weights[f"blk.{i}.attn_norm.weight"])
        assert not np.allclose(folded[f"blk.{i}.ffn_norm.weight"], weights[f"blk.{i}.ffn_norm.weight"])
    test_tokens = np.random.default_rng(2).integers(3, 1024, 20)
    before = Phi3Reference(cfg, weights).forward(test_tokens)
    after = Phi3Reference(cfg, folded).forward(test_tokens)
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4 * np.abs(before).max())


def test_awq_file_holds_the_folded_norms(outlier_ckpt, tmp_path):
    ckpt = outlier_ckpt
    out = tmp_path / "awq.gguf"
    quantize_checkpoint(ckpt, out, recipe="q4_0", method="awq+rtn", **SMALL_CALIB)
    reader = gguf.GGUFReader(out)
    tensors = {t.name: t for t in reader.tensors}
    ck = Checkpoint.open(ckpt)
    norm_file = np.asarray(tensors["blk.0.attn_norm.weight"].data, np.float32)
    qkv_file = gguf.quants.dequantize(tensors["blk.0.attn_qkv.weight"].data, tensors["blk.0.attn_qkv.weight"]
                                      .tensor_type).reshape(ck.config.qkv_size, -1)
    norm, qkv = ck.tensor("blk.0.attn_norm.weight"), ck.tensor("blk.0.attn_qkv.weight")
    assert not np.allclose(norm_file, norm, rtol=1e-3)
    # the product the float model computes is unchanged up to Q4_0 rounding
    folded_product, product = qkv_file * norm_file[None, :], qkv * norm[None, :]
    assert np.abs(folded_product - product).mean() < 0.1 * np.abs(product).mean()


def test_interrupt_leaves_no_file(ckpt, tmp_path, monkeypatch):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"an older file")
    calls = []
    real = pipeline.round_tensor

    def interrupted(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "round_tensor", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(ckpt, out, recipe="q4_0", method="rtn")
    assert "blk.1.attn_qkv.weight" not in calls  # stopped inside layer 0
    assert out.read_bytes() == b"an older file"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no temporary file left


def test_dead_inputs_fall_back_and_never_write_nan(tmp_path):
    """blk.0.attn_norm all zero: attn_qkv never sees a non-zero input (singular, all-zero Hessian);
    half of blk.1.ffn_norm zero: ffn_up's Hessian is singular on those channels."""
    ckpt = helpers.make_checkpoint(tmp_path / "dead", seed=3)

    def kill(tensors):
        tensors["model.layers.0.input_layernorm.weight"][:] = 0.0
        tensors["model.layers.1.post_attention_layernorm.weight"][::2] = 0.0

    _edit_checkpoint(ckpt, kill)
    out = tmp_path / "dead.gguf"
    summary = quantize_checkpoint(ckpt, out, recipe="q4_0", method="gptq", **SMALL_CALIB)
    assert any(f.startswith("blk.0.attn_qkv.weight") for f in summary.fallbacks), summary.fallbacks
    for t in gguf.GGUFReader(out).tensors:
        assert np.isfinite(gguf.quants.dequantize(t.data, t.tensor_type)).all(), t.name


@pytest.mark.parametrize("method", ["imatrix", "gptq"])  # gptq: sequential, threads sweep row chunks
def test_threads_do_not_change_the_bytes(ckpt, tmp_path, method):
    one = quantize_checkpoint(ckpt, tmp_path / "one.gguf", recipe="q4_0", method=method, threads=1,
                              **SMALL_CALIB)
    two = quantize_checkpoint(ckpt, tmp_path / "two.gguf", recipe="q4_0", method=method, threads=2,
                              **SMALL_CALIB)
    assert Path(one.path).read_bytes() == Path(two.path).read_bytes()


def test_unknown_method_lists_the_valid_ones(ckpt, tmp_path):
    with pytest.raises(PocketLMError) as e:
        quantize_checkpoint(ckpt, tmp_path / "x.gguf", method="gptq+awq")
    for name in METHODS:
        assert name in str(e.value)
    assert not (tmp_path / "x.gguf").exists()


def test_calibration_errors(ckpt, tmp_path):
    tok = Tokenizer.from_hf_dir(ckpt)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(PocketLMError, match="empty"):
        load_calibration(tok, empty)
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be, that is the question.\n")
    with pytest.raises(PocketLMError, match="too short") as e:
        load_calibration(tok, short, samples=4, length=64)
    assert "short.txt" in str(e.value)
    with pytest.raises(PocketLMError, match=r"no \*\.txt files"):
        load_calibration(tok, _empty_dir(tmp_path))
    with pytest.raises(PocketLMError, match="not found"):
        load_calibration(tok, tmp_path / "missing.txt")
    with pytest.raises(PocketLMError, match="too short"):  # through the whole pipeline: no file
        quantize_checkpoint(ckpt, tmp_path / "m.gguf", method="gptq", calib=short)
    assert not (tmp_path / "m.gguf").exists()
    # a folder of text files: sequences of the requested shape, each starting with BOS
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("Friends, Romans, countrymen, lend me your ears.\n" * 40)
    (folder / "b.txt").write_text("Now is the winter of our discontent.\n" * 40)
    cal = load_calibration(tok, folder, samples=6, length=32)
    assert cal.tokens.shape == (6, 32) and (cal.tokens[:, 0] == tok.bos_id).all()


def _empty_dir(tmp_path: Path) -> Path:
    d = tmp_path / "no_texts"
    d.mkdir()
    (d / "notes.md").write_text("not a .txt file")
    return d


def _tie_embeddings(ckpt: Path) -> None:
    """Make a checkpoint with tied embeddings: no lm_head, token_embd serves as the output head."""
    import json

    _edit_checkpoint(ckpt, lambda tensors: tensors.pop("lm_head.weight"))
    config = json.loads((ckpt / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (ckpt / "config.json").write_text(json.dumps(config))


def _file_tensor(path: Path, name: str) -> np.ndarray:
    t = next(t for t in gguf.GGUFReader(path).tensors if t.name == name)
    return gguf.quants.dequantize(t.data, t.tensor_type)


def test_embedding_gptq_lowers_the_error_layer_0_sees(ckpt, tmp_path):
    """The token embedding with gptq (embedding_hessian: how layer 0 reads the residual stream) gives
    layer 0 outputs closer to the float model's than rtn or mse rounding of the same rows."""
    from pocketlm.quantize import formats as F
    from pocketlm.quantize.search import quantize_mse

    ck = Checkpoint.open(ckpt)
    cfg, emb = ck.config, ck.tensor("token_embd.weight")
    out = tmp_path / "gptq.gguf"
    quantize_checkpoint(ckpt, out, recipe="q4_0", method="gptq", **SMALL_CALIB)
    tokens = load_calibration(Tokenizer.from_hf_dir(ckpt), None, 8, 64).tokens
    layer = {n: ck.tensor(n) for n in ck.names() if n.startswith("blk.0.")}
    ref = pipeline.run_layer(cfg, 0, layer, emb[tokens])

    def layer0_error(emb_q: np.ndarray) -> float:
        return float(np.linalg.norm(pipeline.run_layer(cfg, 0, layer, emb_q[tokens]) - ref) / np.linalg.norm(ref))

    q4 = F.GGMLType.Q4_0
    err = {"gptq": layer0_error(_file_tensor(out, "token_embd.weight")),
           "rtn": layer0_error(F.dequantize(F.quantize(emb, q4), q4, emb.shape)),
           "mse": layer0_error(F.dequantize(quantize_mse(emb, q4), q4, emb.shape))}
    assert err["gptq"] < 0.93 * min(err["rtn"], err["mse"]), err


def test_embedding_hessian_with_dead_channels(ckpt):
    """Channels layer 0 never reads (norm weight 0) still reach later layers through the residual:
    the Hessian stays positive definite and GPTQ rounds those channels instead of zeroing them."""
    from pocketlm.quantize import formats as F
    from pocketlm.quantize.gptq import gptq_quantize

    ck = Checkpoint.open(ckpt)
    dead = np.arange(0, ck.config.hidden_size, 4)
    tensors = {n: ck.tensor(n) for n in ck.names()}
    for norm in ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight"):
        tensors[norm] = tensors[norm].copy()
        tensors[norm][dead] = 0.0
    h = pipeline.embedding_hessian(tensors.__getitem__, ck.config.hidden_size)
    assert np.isfinite(h).all() and np.allclose(h, h.T)
    assert np.linalg.eigvalsh(h).min() >= 0.99 * pipeline.EMBEDDING_RESIDUAL
    emb = tensors["token_embd.weight"]
    q4 = F.GGMLType.Q4_0
    emb_q = F.dequantize(gptq_quantize(emb, q4, h, act_order=True), q4, emb.shape)
    assert np.isfinite(emb_q).all()
    rel = np.linalg.norm(emb_q[:, dead] - emb[:, dead]) / np.linalg.norm(emb[:, dead])
    assert rel < 0.5, rel  # rounded (Q4_0: ~0.1), not zeroed (1.0)


def test_float_target_lowers_kld(ckpt, tmp_path):
    """gptq's default (sequential, float target, embedding GPTQ) against plain sequential GPTQ on
    the same calibration: a lower KL divergence on held-out text. Without sequential calibration
    the float target is off (it would over-correct)."""
    from pocketlm.quantize.evaluate import evaluate

    kld = {}
    for label, opts in (("plain", Options(float_target=False, embedding_gptq=False, sequential=True)),
                        ("default", Options())):
        out = tmp_path / f"{label}.gguf"
        quantize_checkpoint(ckpt, out, recipe="q4_0", method="gptq", options=opts, **SMALL_CALIB)
        kld[label] = evaluate(out, ckpt, n_tokens=1024, ctx=64).kld
    assert kld["default"] < 0.7 * kld["plain"], kld
    q = pipeline._Quantizer(Checkpoint.open(ckpt), get_recipe("q4_0"), parse_method("gptq"), 1,
                            Options(sequential=False))
    assert not q.float_target and not q.sequential
    q.close()


@pytest.mark.skipif(calibration_matmul() is None, reason="no native bfloat16 on this CPU (or no torch)")
def test_bf16_calibration(ckpt, tmp_path):
    """The calibration's bfloat16 products (calib_matmul): each within bfloat16 rounding of the
    float64 product and not the float32 one (so it is the path taken), weights converted once and
    again when replaced; and a gptq file calibrated with them as close to the float model (KLD on
    held-out text) as one calibrated in float32."""
    from pocketlm.quantize.evaluate import evaluate

    mm = calibration_matmul()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 64)).astype(np.float32)
    w = rng.standard_normal((24, 64)).astype(np.float32)
    exact = x.astype(np.float64) @ w.T.astype(np.float64)
    got = mm("w", x, w)
    assert got.dtype == np.float32 and got.shape == (40, 24)
    err = np.abs(got - exact).max() / np.abs(exact).max()
    assert 1e-5 < err < 2e-2, err  # bfloat16 (8-bit mantissa), not float32 (~1e-7)
    np.testing.assert_array_equal(mm("w", mm.stored(x), w), got)
    w2 = w * 2
    np.testing.assert_allclose(mm("w", x, w2), 2 * got, rtol=1e-2, atol=1e-2 * np.abs(got).max())
    np.testing.assert_allclose(mm.cross(x, x), x.T @ x, rtol=0, atol=2e-2 * np.abs(x.T @ x).max())
    kld = {}
    for label, bf16 in (("f32", False), ("bf16", True)):
        out = tmp_path / f"{label}.gguf"
        quantize_checkpoint(ckpt, out, recipe="q4_0", method="gptq", options=Options(bf16_calibration=bf16),
                            **SMALL_CALIB)
        kld[label] = evaluate(out, ckpt, n_tokens=1024, ctx=64).kld
    assert kld["bf16"] < 1.1 * kld["f32"], kld


def test_tied_embeddings(tmp_path):
    """token_embd is also the output head: one tensor (output's type), read back as tied by the
    eval harness; gptq calibrates it (embedding_hessian) and beats rtn."""
    from pocketlm.quantize.evaluate import evaluate

    ckpt = helpers.make_checkpoint(tmp_path / "tied", seed=1)
    _tie_embeddings(ckpt)
    assert Checkpoint.open(ckpt).config.tie_word_embeddings
    kld = {}
    for method in ("rtn", "gptq"):
        out = tmp_path / f"{method}.gguf"
        summary = quantize_checkpoint(ckpt, out, recipe="q4_0", method=method, **SMALL_CALIB)
        assert summary.tensor_types["token_embd.weight"] == "Q6_K" and "output.weight" not in summary.tensor_types
        assert np.isfinite(_file_tensor(out, "token_embd.weight")).all()
        kld[method] = evaluate(out, ckpt, n_tokens=1024, ctx=64).kld
    assert kld["gptq"] < 0.7 * kld["rtn"], kld


@pytest.mark.parametrize("arch", ["phi3", "phi3small"])
def test_layer_stages_give_the_reference_layers_inputs(ckpt, tmp_path, arch):
    """Sequential calibration resumes a layer between its halves (`_LayerStages`): each linear's
    inputs, sequence by sequence, and the layer's output equal what the whole reference layer
    (`layer_inputs`, `run_layer`) computes with the same weights, also after earlier linears were
    replaced (quantized) mid-way. Phi-3 (RMSNorm, GQA) and Phi-3-small (LayerNorm and biases,
    GeGELU, block-sparse layer 0)."""
    from phi3small_fixtures import make_phi3small_checkpoint

    from pocketlm.config import LAYER_LINEARS
    from pocketlm.quantize import formats as F

    path = ckpt if arch == "phi3" else make_phi3small_checkpoint(tmp_path / "small", layers=2)
    ck = Checkpoint.open(path)
    cfg = ck.config
    rng = np.random.default_rng(0)
    h = rng.standard_normal((3, 40, cfg.hidden_size)).astype(np.float32)
    for i in range(cfg.num_hidden_layers):
        weights = {n: ck.tensor(n) for n in ck.names() if n.startswith(f"blk.{i}.")}
        stages = pipeline._LayerStages(cfg, i, weights, h)
        assert stages.halves == ([f"blk.{i}.attn_qkv.weight", f"blk.{i}.attn_output.weight"],
                                 [f"blk.{i}.ffn_up.weight", f"blk.{i}.ffn_down.weight"])
        for lin in LAYER_LINEARS:
            name = f"blk.{i}.{lin}.weight"
            expected = [x[name] for x in pipeline.layer_inputs(cfg, i, dict(weights), h, {name})]
            got = list(stages.inputs(name))
            assert len(got) == len(expected) == 3
            for a, b in zip(got, expected, strict=True):
                np.testing.assert_array_equal(a, b)
            q8 = F.GGMLType.Q8_0  # as the pipeline does: the linear replaced by its dequantized weights
            weights[name] = F.dequantize(F.quantize(weights[name], q8), q8, weights[name].shape)
        np.testing.assert_array_equal(stages.output(), pipeline.run_layer(cfg, i, weights, h))


def test_tied_embedding_hessian_covers_the_output_head(tmp_path):
    """Tied embeddings with gptq: token_embd is quantized after the layers, with the head as a third
    reader of embedding_hessian (X^T X of the final normed states). Oracle: the calibration replayed
    independently (the float embedding rows, then the file's dequantized layers through the
    reference forward), its X^T X, and GPTQ of the embedding under that Hessian: the file's
    tensor. Without the head reader the rounding differs, and with it the head's logits are
    closer to the float model's on the calibration states. The calibration's products in float32,
    as the replay's (bfloat16 ones round differently: test_bf16_calibration)."""
    from pocketlm.layers import norm
    from pocketlm.quantize import formats as F
    from pocketlm.quantize.gptq import gptq_quantize

    path = helpers.make_checkpoint(tmp_path / "tied", seed=2)
    _tie_embeddings(path)
    ck = Checkpoint.open(path)
    cfg, emb = ck.config, ck.tensor("token_embd.weight")
    out = tmp_path / "gptq.gguf"
    summary = quantize_checkpoint(path, out, recipe="q4_0", method="gptq", **SMALL_CALIB,
                                  options=Options(bf16_calibration=False))
    gtype = F.GGMLType[summary.tensor_types["token_embd.weight"]]
    tokens = load_calibration(Tokenizer.from_hf_dir(path), None, 8, 64).tokens
    file_weights = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(
        [int(d) for d in t.shape]))) for t in gguf.GGUFReader(out).tensors}
    ref = Phi3Reference(cfg, {**file_weights, "token_embd.weight": emb})
    xs = []
    for seq in tokens:
        hs = ref.embed(seq)
        cache = ref.new_cache()
        for i in range(cfg.num_hidden_layers):
            hs = ref.layer(i, hs, np.arange(len(seq)), cache, False)
        xs.append(norm(cfg, hs, file_weights["output_norm.weight"], None))
    x = np.concatenate(xs).astype(np.float64)  # [N*L, D] the head's inputs
    hess = pipeline.embedding_hessian(ck.tensor, cfg.hidden_size, head_xtx=x.T @ x)
    expected = F.dequantize(gptq_quantize(emb, gtype, hess, act_order=True), gtype, emb.shape)
    got = file_weights["token_embd.weight"]
    assert np.mean(got != expected) < 0.01  # float32 summation order moves a rare code (GPTQ spreads it)
    without = F.dequantize(gptq_quantize(emb, gtype, pipeline.embedding_hessian(ck.tensor, cfg.hidden_size),
                                         act_order=True), gtype, emb.shape)
    assert np.mean(without != expected) > 0.1, np.mean(without != expected)

    def head_error(e: np.ndarray) -> float:
        return float(np.linalg.norm(x @ (e - emb).T) / np.linalg.norm(x @ emb.T))

    assert head_error(got) < 0.95 * head_error(without), (head_error(got), head_error(without))
    with pytest.raises(PocketLMError, match="head statistics"):
        pipeline.embedding_hessian(ck.tensor, cfg.hidden_size, head_xtx=np.eye(3))


def test_progress_estimate():
    """The time left: mean time per decoder layer so far x layers left, plus the head (taken as
    long as the embedding step); none before a layer is done."""
    bar = pipeline.Progress(total=34, enabled=False)  # embedding, 32 layers, head
    assert bar.estimate(0, 0.0) is None
    bar.first = 10.0  # the embedding step took 10 s
    assert bar.estimate(1, 10.0) is None
    assert bar.estimate(4, 10.0 + 3 * 60.0) == pytest.approx(29 * 60.0 + 10.0)
    assert bar.estimate(33, 10.0 + 32 * 60.0) == pytest.approx(10.0)  # only the head is left
    assert bar.estimate(34, 2000.0) == 0.0
    assert pipeline.clock(59.6) == "1:00" and pipeline.clock(3725) == "1:02:05"
