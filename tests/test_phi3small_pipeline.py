"""Phi-3-small through pocketlm end to end: checkpoint -> GGUF (f32 export and every recipe and
method of the quantizer) -> the runtime's C forward (prompt chunks and the one-call decode step,
block-sparse attention, f16 / f32 / int8 KV caches).

Oracles: the torch model written from the Phi-3-small facts (tests/torch_phi3small.py) for the f32
file; for quantized files, the numpy reference run on the GGUF's own dequantized weights
(quantize.evaluate.gguf_logits), which tests/test_phi3small_model.py ties to the same torch model.
"""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from phi3small_fixtures import dummy_token_ids, make_phi3small_checkpoint
from torch_phi3small import TorchPhi3Small

from pocketlm.config import Phi3Config
from pocketlm.errors import PocketLMError
from pocketlm.export.gguf_export import export_gguf
from pocketlm.export.gguf_reader import GGUFReader
from pocketlm.quantize.evaluate import gguf_logits
from pocketlm.quantize.pipeline import quantize_checkpoint
from pocketlm.runtime.model import load

WINDOW = 2 * 16  # local_blocks * block_size: the sparse pattern bites past this many tokens
INT8_ACT_TOL = 3e-2  # the kernel rounds activations to int8 for quantized matmuls (as llama.cpp does)


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    """Max error over the logits that are not masked, relative to their largest magnitude."""
    live = want > -1e30
    return float(np.abs(got[live] - want[live]).max() / np.abs(want[live]).max())


def with_byte_ranks(folder: Path) -> Path:
    """Give the fixture a tiktoken rank file of the 256 single bytes: 96 Phi-3-small special tokens
    follow at 256.., so the vocabulary is the fixture's 352 ids (bos = eos = 257)."""
    lines = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)]
    (folder / "bytes.tiktoken").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return with_byte_ranks(make_phi3small_checkpoint(tmp_path_factory.mktemp("p3s"), layers=4, max_pos=512))


@pytest.fixture(scope="module")
def f32_file(folder, tmp_path_factory) -> Path:
    return export_gguf(folder, tmp_path_factory.mktemp("gguf") / "small-f32.gguf", dtype="f32")


def tokens(n: int, seed: int = 0) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, 256, n)]


def test_gguf_carries_the_description(folder, f32_file):
    """phi3small.* metadata rebuild the same model description; biases and norms stay F32."""
    from pocketlm.checkpoint import Checkpoint

    want = Checkpoint.open(folder).config
    with GGUFReader(f32_file) as r:
        assert r.metadata["general.architecture"] == "phi3small"
        got = Phi3Config.from_gguf_metadata(r.metadata, source=str(f32_file))
        assert r.tensors["blk.0.attn_qkv.bias"].type_name == "F32"
        assert r.tensors["output_norm.bias"].type_name == "F32"
        assert "output.weight" not in r.tensors  # tied: the embedding is the output
    assert got.rms_norm_eps == pytest.approx(want.rms_norm_eps, rel=1e-6)  # stored as float32
    assert replace(got, rms_norm_eps=want.rms_norm_eps, pad_token_id=want.pad_token_id) == want
    assert got.masked_token_ids == tuple(dummy_token_ids(352))


@pytest.mark.parametrize("kv", ["f32", "f16", "int8"])
def test_runtime_matches_the_torch_model_through_the_cache(folder, f32_file, kv):
    """A prompt across the local window in chunks of odd sizes, then decode past it one token at a
    time (the C decode step), against the torch model on the checkpoint's own weights."""
    ids = tokens(90, seed=1)
    want = TorchPhi3Small(folder).forward(ids).numpy()
    model = load(f32_file, threads=2, ctx=128, kv=kv, batch=23)
    got = np.concatenate([model.forward(ids[:50], all_logits=True)] +
                         [model.forward([t])[None] for t in ids[50:]])
    tol = {"f32": 1e-4, "f16": 3e-3, "int8": 3e-2}[kv]
    assert rel_error(got, want) < tol
    assert (got[:, dummy_token_ids(352)] < -1e30).all()


@pytest.mark.parametrize(("recipe", "method"), [("q4_0", "rtn"), ("q4_k_m", "rtn"), ("q8_0", "rtn"),
                                                ("pocket", "imatrix"), ("q4_0", "gptq"), ("q4_0", "awq"),
                                                ("q4_k_m", "awq+gptq"), ("q4_0", "mse")])
def test_quantized_files_run_in_the_decode_step(folder, tmp_path, recipe, method):
    """Every recipe and method quantizes Phi-3-small (biases and norms float, the tied matrix once);
    the runtime's decode step agrees with the reference on the file's dequantized weights."""
    calib = np.random.default_rng(7).integers(0, 256, (4, 64))
    out = tmp_path / f"{recipe}-{method}.gguf"
    quantize_checkpoint(folder, out, recipe=recipe, method=method, calib_tokens=calib)
    with GGUFReader(out) as r:
        assert {r.tensors[n].type_name for n in r.tensors if n.endswith(".bias")} == {"F32"}
        assert "output.weight" not in r.tensors
    ids = tokens(48, seed=3)
    want = gguf_logits(out, np.asarray(ids))
    model = load(out, threads=2, ctx=64, kv="f32")
    model.forward(ids[:40])
    got = np.stack([model.forward([t]) for t in ids[40:]])
    assert rel_error(got, want[40:]) < INT8_ACT_TOL
    # a few rows at a time in one kernel call (a verify) = the per-layer loop, bit for bit
    loop = load(out, threads=2, ctx=64, kv="f32")
    loop._decode_plan = lambda: None
    model.reset()
    for a, b in ((0, 7), (7, 16), (16, 32), (32, 35), (35, 48)):
        np.testing.assert_array_equal(model.forward(ids[a:b], all_logits=True), loop.forward(ids[a:b], all_logits=True))


def test_sparse_pattern_matters_in_the_runtime(folder, f32_file):
    """Past the local window the runtime's logits follow the block-sparse model, not a dense one."""
    ids = tokens(80, seed=5)
    dense = TorchPhi3Small(folder, force_dense=True).forward(ids).numpy()
    sparse = TorchPhi3Small(folder).forward(ids).numpy()
    got = load(f32_file, threads=1, ctx=96, kv="f32").forward(ids, all_logits=True)
    assert rel_error(got[:WINDOW], dense[:WINDOW]) < 1e-4  # within the window the two agree
    assert rel_error(got, sparse) < 1e-4
    assert rel_error(sparse[WINDOW:], dense[WINDOW:]) > 1e-2
    # the benchmarks' debug switch: every layer dense, prompt and decode step alike
    forced = load(f32_file, threads=1, ctx=96, kv="f32", dense_attention=True)
    got = np.concatenate([forced.forward(ids[:60], all_logits=True)] + [forced.forward([t])[None] for t in ids[60:]])
    assert rel_error(got, dense) < 1e-4


def test_generation_and_tokenizer(f32_file):
    """The runtime carries the tiktoken tokenizer from the GGUF and never samples a dummy id."""
    model = load(f32_file, threads=1, ctx=128)
    assert model.tokenizer.encode("hi") == [ord("h"), ord("i")]
    out = "".join(model.generate("hello", max_tokens=20, temperature=1.0, seed=0))
    assert isinstance(out, str)
    assert not set(model.tokens) & set(dummy_token_ids(352))


def test_bad_phi3small_config_is_refused(tmp_path):
    folder = make_phi3small_checkpoint(tmp_path / "bad", layers=1, shards=1)
    cfg = (folder / "config.json").read_text().replace('"blocksparse_vert_stride": 4', '"blocksparse_vert_stride": 0')
    (folder / "config.json").write_text(cfg)
    from pocketlm.checkpoint import Checkpoint

    with pytest.raises(PocketLMError, match="vert_stride"):
        Checkpoint.open(folder)


def test_cli_verbs_on_a_phi3small_file(folder, tmp_path, capsys):
    """quantize, info, run, chat, eval and bench end to end through the CLI."""
    from pocketlm.cli import main as cli_main

    out = tmp_path / "small.gguf"
    assert cli_main(["quantize", str(folder), "-o", str(out), "--recipe", "q4_0"]) == 0
    assert cli_main(["info", str(out)]) == 0
    assert "phi3small" in capsys.readouterr().out
    assert cli_main(["run", str(out), "-p", "hello", "-n", "6", "--seed", "1"]) == 0
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question. " * 40)
    capsys.readouterr()
    assert cli_main(["eval", str(out), "--ref", str(folder), "--text", str(text), "--ctx", "64", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0 < result["kld"] < 1 and result["top1"] > 0.5
    assert cli_main(["bench", str(out), "--device", "all", "--prompt-len", "16", "--gen", "4", "--ctx", "64"]) == 0
    assert "Galaxy S21" in capsys.readouterr().out


def test_gguf_name_is_kept(f32_file, folder):
    """llama.cpp's phi3 naming rule (a "phi3-" prefix or "phi-3" removed, for its whitespace rule) is
    for the architecture it runs, not for phi3small files."""
    with GGUFReader(f32_file) as r:
        assert r.metadata["general.name"] == folder.resolve().name
