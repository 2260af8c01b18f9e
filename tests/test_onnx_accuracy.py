"""`--accuracy-level auto` (the default): the measured cost of int8 activations decides.

(a) the KL divergence and top-1 agreement it measures equal torch's (an independent oracle);
(b) on the built-in trained model's Q4_0 export the probe measures a cost inside the thresholds
    and the default export is level 4, whose logits on held-out text stay close to level 1's;
    on the same model with outlier activation channels (the same function: its fp32 logits are
    the built-in model's) the probe refuses level 4 and the default export stays at level 1;
(c) the export says what it chose and why (summary, CLI), and rewriting the level is atomic and
    complete.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from pocketlm.export.onnx_accuracy import (
    FLOOR_KLD,
    MAX_RATIO,
    MIN_TOP1,
    PROBE_TEXT,
    compare_levels,
    int8_activation_cost,
    kld_top1,
    level_logits,
    rounding_noise_scales,
    set_accuracy_level,
)
from pocketlm.export.onnx_export import PROBE_TOKENS, export_onnx

pytest.importorskip("onnxruntime")
REPO = Path(__file__).resolve().parents[1]
BUILTIN = REPO / "pocketlm" / "builtin"


def _quality_module():
    spec = importlib.util.spec_from_file_location("onnx_level_quality", REPO / "benchmarks" / "onnx_level_quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def levels_in(model_path: Path) -> set[int]:
    nodes = onnx.load(str(model_path), load_external_data=False).graph.node
    return {helper.get_attribute_value(a) for n in nodes if n.op_type == "MatMulNBits"
            for a in n.attribute if a.name == "accuracy_level"}


# ---------------------------------------------------------------------------- (a) the measure

def test_kld_and_top1_equal_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    p = rng.normal(0, 3, (3, 17, 50)).astype(np.float32)
    q = (p + rng.normal(0, 0.5, p.shape)).astype(np.float32)
    kl, agree = kld_top1(p, q)
    want = torch.nn.functional.kl_div(torch.log_softmax(torch.tensor(q, dtype=torch.float64), -1),
                                      torch.log_softmax(torch.tensor(p, dtype=torch.float64), -1),
                                      log_target=True, reduction="none").sum(-1).numpy()
    np.testing.assert_allclose(kl, want, rtol=1e-9, atol=1e-12)
    assert agree.shape == (3, 17) and agree.mean() == (p.argmax(-1) == q.argmax(-1)).mean() < 1
    same = compare_levels(p, p)
    assert same.kld == 0 and same.top1 == 1 and same.flips == 0 and same.acceptable
    cost = compare_levels(p, q, rounded=p + 0.01)
    assert cost.tokens == 51 and cost.kld == pytest.approx(float(want.mean()))
    assert cost.rounding_kld == pytest.approx(float(kld_top1(p, p + 0.01)[0].mean()))  # a shift: KL 0
    assert not cost.acceptable and f"{cost.flips} changes" in str(cost)


def test_criterion_planted():
    """Each condition refuses on its own: confident top-1 flips, a KL over MAX_RATIO of the
    yardstick, or no yardstick above the floor; near-uniform positions' flips do not count."""
    base = np.zeros((100, 4), np.float32)
    base[:, 0] = 4.0
    base[:5, 1] = 3.999     # 5 confident near-ties ...
    flipped = base.copy()
    flipped[:5, :2] = [3.999, 4.0]  # ... flipped: 5 % of confident positions, a tiny KL
    c = compare_levels(base, flipped, rounded=base + np.eye(4, dtype=np.float32)[1])
    assert c.confident == 100 and c.kld < FLOOR_KLD and c.top1 == 0.95 < MIN_TOP1 and not c.acceptable
    rng = np.random.default_rng(1)
    clear = np.zeros((100, 4), np.float32)
    clear[:, 0] = 4.0                                                      # no near-ties: KL alone decides
    noisy = clear + rng.normal(0, 0.08, clear.shape).astype(np.float32)   # level 4's noise
    small = clear + rng.normal(0, 1.0, clear.shape).astype(np.float32)    # a yardstick ~150x its KL
    big = clear + rng.normal(0, 0.16, clear.shape).astype(np.float32)     # a yardstick ~4x its KL
    c = compare_levels(clear, noisy, small)
    assert c.kld > FLOOR_KLD and c.top1 == 1 and c.ratio < MAX_RATIO and c.acceptable
    c = compare_levels(clear, noisy, big)
    assert c.kld > FLOOR_KLD and c.ratio > MAX_RATIO and not c.acceptable
    assert not compare_levels(clear, noisy).acceptable  # above the floor, no yardstick: refused
    flat = rng.normal(0, 0.01, (50, 1000)).astype(np.float32)  # near-uniform: top-1 means nothing
    c = compare_levels(flat, flat[:, ::-1].copy(), flat)
    assert c.confident == 0 and c.top1 == 1.0 and "no confident position" in str(c)


def test_rounding_noise_has_the_variance_of_one_rounding(tmp_path):
    """The yardstick's weights differ from the file's by noise of variance s^2/12 per weight (one
    rounding step s), on a Q4_0-layout layer written to disk as the exporter writes it."""
    from onnx import TensorProto

    from pocketlm.export.onnx_graph import ExternalData, GraphBuilder, tensor_info, write_model
    from pocketlm.export.onnx_weights import NBitsWeight, dequantize_nbits

    rng = np.random.default_rng(2)
    n, k = 256, 512
    codes = rng.integers(0, 16, (n, k), dtype=np.uint8)
    w = NBitsWeight(n, k, 4, 32, (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8),
                    rng.uniform(0.5, 2.0, (n, k // 32)).astype(np.float32), None)
    with open(tmp_path / "model.onnx.data", "wb") as f:
        g = GraphBuilder(ExternalData(f, "model.onnx.data"), 1)
        y = g.matmul_nbits("x", "/lm_head", w)
    model = g.model([tensor_info("x", TensorProto.FLOAT, [1, k])], [tensor_info(y, TensorProto.FLOAT, [1, n])],
                    "t", {})
    write_model(model, tmp_path / "model.onnx")
    noise = rounding_noise_scales(tmp_path, "model.onnx")
    ((_, scales),) = noise.items()
    noisy = NBitsWeight(n, k, 4, 32, w.b, scales, None)
    err = dequantize_nbits(noisy).astype(np.float64) - dequantize_nbits(w)
    step2 = np.repeat(w.scales.astype(np.float64) ** 2, 32, axis=1)
    assert float((err ** 2).mean() / (step2 / 12).mean()) == pytest.approx(1.0, rel=0.1)


# ---------------------------------------------------------------------------- (b) real models

@pytest.fixture(scope="module")
def builtin_files(tmp_path_factory):
    """The built-in model and its outlier copy, each quantized Q4_0 (rtn) and exported by default."""
    from pocketlm.quantize.pipeline import quantize_checkpoint

    root = tmp_path_factory.mktemp("accuracy")
    outliers = root / "outliers-ckpt"
    _quality_module().outlier_checkpoint(BUILTIN, outliers)
    made = {}
    for name, ckpt in (("builtin", BUILTIN), ("outliers", outliers)):
        gguf = root / f"{name}.gguf"
        quantize_checkpoint(ckpt, gguf, recipe="q4_0", method="rtn")
        made[name] = (ckpt, gguf, export_onnx(gguf, root / f"{name}-onnx", progress=False))
    return made


def heldout_chunks(n: int, ctx: int) -> np.ndarray:
    from pocketlm.quantize.evaluate import eval_chunks, eval_text
    from pocketlm.tokenizer import tokenizer_from_dir

    text, where = eval_text(None)
    return eval_chunks(tokenizer_from_dir(BUILTIN), text, where, n * (ctx - 1), ctx)


def test_outlier_model_is_the_same_function(builtin_files):
    mod = _quality_module()
    tokens = heldout_chunks(2, 64)
    plain = mod.fp32_logits(builtin_files["builtin"][0], tokens)
    out = mod.fp32_logits(builtin_files["outliers"][0], tokens)
    assert np.abs(out - plain).max() / np.abs(plain).max() < 1e-3


def test_default_export_is_level_4_on_the_builtin_model(builtin_files):
    _, _, summary = builtin_files["builtin"]
    assert summary.accuracy_level == 4 and "auto: check passed" in summary.accuracy_reason
    assert levels_in(summary.path / "model.onnx") == {4}
    nodes = onnx.load(str(summary.path / "model.onnx"), load_external_data=False).graph.node
    assert not any(n.name.endswith("MatMulNBits_hi") for n in nodes)  # the Q6_K output whole, 8-bit
    # the probe's verdict holds on held-out text the probe never saw: level 4 stays near level 1
    tokens = heldout_chunks(4, 128)
    exact = level_logits(summary.path, "model.onnx", tokens, 1)
    fast = level_logits(summary.path, "model.onnx", tokens, 4)
    cost = compare_levels(exact, fast)
    assert cost.tokens == 512 and cost.kld < FLOOR_KLD * 5 and cost.top1 >= MIN_TOP1, cost


def test_default_export_refuses_level_4_with_outlier_activations(builtin_files):
    _, _, summary = builtin_files["outliers"]
    assert summary.accuracy_level == 1 and "auto: level 4 refused" in summary.accuracy_reason
    assert levels_in(summary.path / "model.onnx") == {1}
    # rebuilt at level 1: the Q6_K output layer as two exact 4-bit halves, not a slow 8-bit node
    nodes = onnx.load(str(summary.path / "model.onnx"), load_external_data=False).graph.node
    bits = {helper.get_attribute_value(a) for n in nodes if n.op_type == "MatMulNBits" for a in n.attribute
            if a.name == "bits"}
    assert bits == {4} and any(n.name.endswith("MatMulNBits_hi") for n in nodes)
    # and the refusal holds on held-out text too: level 4 costs more than the threshold there
    tokens = heldout_chunks(4, 128)
    noise = rounding_noise_scales(summary.path, "model.onnx")
    cost = compare_levels(level_logits(summary.path, "model.onnx", tokens, 1),
                          level_logits(summary.path, "model.onnx", tokens, 4),
                          level_logits(summary.path, "model.onnx", tokens, 1, overrides=noise))
    assert not cost.acceptable and cost.ratio > MAX_RATIO, cost


# ---------------------------------------------------------------------------- (c) reporting

def test_cli_prints_the_choice_and_its_measure(builtin_files, tmp_path, capsys):
    from pocketlm.cli import main

    _, gguf, _ = builtin_files["builtin"]
    assert main(["export", str(gguf), "--onnx", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("chose "))
    assert "accuracy_level 4" in line and "auto: check passed" in line and "nats" in line
    assert f"{PROBE_TOKENS}-token probe" in line or "-token probe" in line
    assert main(["export", str(gguf), "--onnx", str(tmp_path / "one"), "--accuracy-level", "1"]) == 0
    assert "chose accuracy_level 1 (float32 activations)" in capsys.readouterr().out
    assert levels_in(tmp_path / "one" / "model.onnx") == {1}


def test_probe_is_real_text_of_probe_length(builtin_files):
    from pocketlm.tokenizer import tokenizer_from_dir

    ids = tokenizer_from_dir(BUILTIN).encode(PROBE_TEXT)
    assert len(ids) >= PROBE_TOKENS  # the probe uses PROBE_TOKENS of them
    _, _, summary = builtin_files["builtin"]
    cost = int8_activation_cost(summary.path, "model.onnx", ids[:PROBE_TOKENS])
    assert f"{PROBE_TOKENS}-token probe" in summary.accuracy_reason and str(cost) in summary.accuracy_reason


def test_set_accuracy_level_rewrites_every_node_atomically(builtin_files, tmp_path):
    _, _, summary = builtin_files["builtin"]
    folder = summary.path
    target = folder / ".copy.model.onnx"  # beside the data file it references
    try:
        set_accuracy_level(folder / "model.onnx", 1, target)
        assert levels_in(target) == {1} and levels_in(folder / "model.onnx") == {4}
        meta = {p.key: p.value for p in onnx.load(str(target), load_external_data=False).metadata_props}
        assert meta["pocketlm.accuracy_level"] == "1"
        assert not (folder / ".copy.model.onnx.tmp").exists()
    finally:
        target.unlink(missing_ok=True)


def test_bench_says_which_level_onnxruntime_ran(builtin_files, tmp_path, monkeypatch):
    """`pocketlm bench --vs onnxruntime` exports with the default (auto) and names the level it ran."""
    import io

    from pocketlm.bench import Progress, child_onnxruntime, ensure_onnx

    _, gguf, _ = builtin_files["builtin"]
    monkeypatch.setenv("POCKETLM_CACHE", str(tmp_path))
    log = io.StringIO()
    folder = ensure_onnx(str(gguf), None, Progress("t", log))
    assert folder.is_relative_to(tmp_path) and levels_in(folder / "model.onnx") == {4}
    assert "the export chose accuracy_level 4" in log.getvalue()
    out = child_onnxruntime({"onnx": str(folder), "threads": 1, "prompt": 8, "gen": 4, "vocab": 2048},
                            Progress("t", log))
    assert out["version"].endswith("accuracy_level 4") and out["decoded_tokens"] == 4


def test_rounding_noise_of_a_split_8bit_layer_is_that_of_the_whole_weight(tmp_path):
    """Level 1 writes an 8-bit (Q6_K-like) layer as lo + 16 hi halves: both halves get one factor
    per block, so their sum carries s^2/12 per weight, as the whole 8-bit node would."""
    from onnx import TensorProto, numpy_helper

    from pocketlm.export.onnx_graph import ExternalData, GraphBuilder, tensor_info, write_model
    from pocketlm.export.onnx_weights import NBitsWeight, dequantize_nbits

    rng = np.random.default_rng(3)
    n, k = 128, 256
    codes = (rng.integers(0, 64, (n, k)) + 96).astype(np.uint8)           # Q6_K: q + 96, zero point 128
    w = NBitsWeight(n, k, 8, 16, codes.reshape(n, k // 16, 16), rng.uniform(0.5, 2, (n, k // 16)).astype(np.float32),
                    None)
    with open(tmp_path / "model.onnx.data", "wb") as f:
        g = GraphBuilder(ExternalData(f, "model.onnx.data"), 1)
        y = g.linear("x", "/lm_head", w)
    write_model(g.model([tensor_info("x", TensorProto.FLOAT, [1, k])], [tensor_info(y, TensorProto.FLOAT, [1, n])],
                        "t", {}), tmp_path / "model.onnx")
    noise = rounding_noise_scales(tmp_path, "model.onnx")
    assert sorted(noise) == ["/lm_head.weight_scales_hi", "/lm_head.weight_scales_lo"]
    model = onnx.load(str(tmp_path / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    total = 0.0
    for tag in ("lo", "hi"):
        node = next(x for x in model.graph.node if x.name.endswith(f"MatMulNBits_{tag}"))
        zp = inits[node.input[3]] if len(node.input) > 3 and node.input[3] else None
        total = total + dequantize_nbits(NBitsWeight(n, k, 4, 16, inits[node.input[1]], noise[node.input[2]], zp))
    err = total.astype(np.float64) - dequantize_nbits(w)
    step2 = np.repeat(w.scales.astype(np.float64) ** 2, 16, axis=1)
    assert float((err ** 2).mean() / (step2 / 12).mean()) == pytest.approx(1.0, rel=0.1)
