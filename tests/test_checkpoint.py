"""Checkpoint folders and Phi-3 configs: every published spelling parses, bad input gets one clear error."""

from __future__ import annotations

import json
import math
import shutil
import struct

import numpy as np
import pytest

from pocketlm.checkpoint import Checkpoint
from pocketlm.cli import main
from pocketlm.config import Phi3Config, parameter_count, tensor_specs
from pocketlm.errors import PocketLMError, UnsupportedModelError

# Published config.json values (Microsoft's checkpoints, written by transformers 4.x).
MINI_4K = dict(architectures=["Phi3ForCausalLM"], model_type="phi3", vocab_size=32064, hidden_size=3072,
               intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, max_position_embeddings=4096,
               original_max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
               rope_scaling=None, sliding_window=2047, bos_token_id=1, eos_token_id=32000,
               pad_token_id=32000, tie_word_embeddings=False, torch_dtype="bfloat16")
LONG = {**MINI_4K, "max_position_embeddings": 131072, "sliding_window": 262144}
MINI_128K_SU = {**LONG, "rope_scaling": {"type": "su", "short_factor": [1.05] * 48,
                                         "long_factor": [1.0 + i / 10 for i in range(48)]}}
PHI35_MINI = {**LONG, "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 48,
                                       "long_factor": [2.0] * 48}}
MEDIUM = {**MINI_4K, "hidden_size": 5120, "intermediate_size": 17920, "num_hidden_layers": 40,
          "num_attention_heads": 40, "num_key_value_heads": 10}
# The same phi-3.5-mini as transformers 5 writes it.
PHI35_TF5 = {k: v for k, v in PHI35_MINI.items() if k not in ("rope_scaling", "rope_theta", "torch_dtype")}
PHI35_TF5.update(dtype="bfloat16", rope_parameters={
    "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 48, "long_factor": [2.0] * 48,
    "original_max_position_embeddings": 4096})


def test_phi3_mini_4k():
    cfg = Phi3Config.from_hf_dict(MINI_4K)
    assert (cfg.head_dim, cfg.qkv_size, cfg.sliding_window, cfg.rope_scaling) == (96, 9216, 2047, None)
    assert abs(parameter_count(cfg) / 1e9 - 3.82) < 0.01  # "3.8B"


@pytest.mark.parametrize("raw", [MINI_128K_SU, PHI35_MINI, PHI35_TF5], ids=["su", "longrope", "tf5"])
def test_longrope_spellings(raw):
    cfg = Phi3Config.from_hf_dict(raw)
    expected = math.sqrt(1 + math.log(131072 / 4096) / math.log(4096))  # 1.1902
    assert cfg.rope_scaling is not None and cfg.original_max_position_embeddings == 4096
    assert abs(cfg.rope_scaling.attention_factor - expected) < 1e-12
    assert len(cfg.rope_scaling.long_factor) == 48


def test_medium_gqa_shapes():
    cfg = Phi3Config.from_hf_dict(MEDIUM)
    shapes = {s.name: s.shape for s in tensor_specs(cfg)}
    assert shapes["blk.0.attn_qkv.weight"] == ((40 + 2 * 10) * 128, 5120)
    assert shapes["blk.39.ffn_up.weight"] == (2 * 17920, 5120)
    assert abs(parameter_count(cfg) / 1e9 - 14.0) < 0.1


def test_gguf_metadata_round_trip():
    for raw in (MINI_4K, PHI35_MINI, MEDIUM):
        cfg = Phi3Config.from_hf_dict(raw)
        factors = None
        if cfg.rope_scaling:
            factors = {"rope_factors_long.weight": np.array(cfg.rope_scaling.long_factor),
                       "rope_factors_short.weight": np.array(cfg.rope_scaling.short_factor)}
        tokens = {"tokenizer.ggml.eos_token_id": 32000, "tokenizer.ggml.bos_token_id": 1,
                  "tokenizer.ggml.padding_token_id": 32000}
        assert Phi3Config.from_gguf_metadata(cfg.to_gguf_metadata() | tokens, factors) == cfg


@pytest.mark.parametrize(("raw", "message"), [
    # a Phi-3-small config.json without Phi-3-small's own fields (ff_intermediate_size, blocksparse_*)
    ({**MINI_4K, "architectures": ["Phi3SmallForCausalLM"], "model_type": "phi3small"}, "Phi-3-small"),
    ({**MINI_4K, "architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "LlamaForCausalLM"),
    ({**MINI_4K, "rope_scaling": {"type": "yarn", "factor": 4.0}}, "yarn"),
])
def test_unsupported_models_are_refused_by_name(raw, message):
    with pytest.raises(UnsupportedModelError, match=message):
        Phi3Config.from_hf_dict(raw, "config.json")


@pytest.mark.parametrize(("change", "message"), [
    ({"num_attention_heads": 7}, "not a multiple"),
    ({"num_key_value_heads": 5}, "not a multiple"),
    ({"hidden_size": 0}, "positive"),
    ({"rope_scaling": {"type": "su", "short_factor": [1.0] * 3, "long_factor": [1.0] * 48}}, "rotary dimension / 2"),
])
def test_inconsistent_configs_are_refused(change, message):
    with pytest.raises(PocketLMError, match=message):
        Phi3Config.from_hf_dict({**MINI_4K, **change}, "config.json")


# ---------------------------------------------------------------------------- bad checkpoint folders

def _copy(tiny_checkpoint, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint("gqa"), dst)
    return dst


def _expect_cli_error(path, capsys, *needles):
    capsys.readouterr()  # drop what fixtures printed
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("pocketlm: error: ")
    for needle in needles:
        assert needle in err
    return err


def test_info_describes_a_checkpoint(tiny_checkpoint, capsys):
    assert main(["info", str(tiny_checkpoint("longrope"))]) == 0
    out = capsys.readouterr().out
    assert "LongRoPE" in out and "F32" in out and "parameters" in out


def test_missing_config(tiny_checkpoint, tmp_path, capsys):
    d = _copy(tiny_checkpoint, tmp_path)
    (d / "config.json").unlink()
    _expect_cli_error(d, capsys, "config.json", "missing")


def test_truncated_safetensors_header(tiny_checkpoint, tmp_path, capsys):
    d = _copy(tiny_checkpoint, tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    _expect_cli_error(d, capsys, "model.safetensors", "truncated")


def test_truncated_tensor_data(tiny_checkpoint, tmp_path, capsys):
    d = _copy(tiny_checkpoint, tmp_path)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    _expect_cli_error(d, capsys, "model.safetensors", "truncated")


def test_shape_disagrees_with_config(tiny_checkpoint, tmp_path, capsys):
    d = _copy(tiny_checkpoint, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    _expect_cli_error(d, capsys, "gate_up_proj", "shape")


def test_unknown_architecture_cli(tiny_checkpoint, tmp_path, capsys):
    d = _copy(tiny_checkpoint, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["MistralForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    _expect_cli_error(d, capsys, "MistralForCausalLM", "config.json")


def test_sharded_checkpoint_and_missing_shard(tiny_checkpoint, tmp_path, capsys):
    """Split the single file into two shards by hand; then delete one."""
    src = Checkpoint.open(tiny_checkpoint("gqa"))
    d = _copy(tiny_checkpoint, tmp_path)
    (d / "model.safetensors").unlink()
    entries = src.files[0].entries
    names = sorted(entries)
    weight_map = {}
    for k, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        shard = f"model-0000{k + 1}-of-00002.safetensors"
        _write_safetensors(d / shard, {n: src.files[0].raw(n) for n in part})
        weight_map |= {n: shard for n in part}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    sharded = Checkpoint.open(d)
    assert len(sharded.files) == 2
    for name in src.names():
        assert np.array_equal(sharded.tensor(name), src.tensor(name))
    (d / "model-00002-of-00002.safetensors").unlink()
    _expect_cli_error(d, capsys, "model-00002-of-00002.safetensors", "missing")


def _write_safetensors(path, tensors: dict[str, np.ndarray]) -> None:
    header, offset, blobs = {}, 0, []
    for name, arr in tensors.items():
        blob = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def test_release_drops_pages_but_views_stay_valid(tiny_checkpoint):
    ckpt = Checkpoint.open(tiny_checkpoint("gqa"))
    view = ckpt.raw("blk.0.attn_qkv.weight")
    before = np.array(view)
    ckpt.release()
    assert np.array_equal(view, before)  # pages come back from the page cache on access
    assert np.array_equal(ckpt.tensor("blk.0.attn_qkv.weight"), before)
