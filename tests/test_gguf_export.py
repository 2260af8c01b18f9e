"""Unquantized GGUF export, proven by llama.cpp (llama-cpp-python), transformers and gguf-py.

Fixtures: tiny random Phi-3 models made with transformers (MHA and GQA, plain 4k RoPE and
LongRoPE), carrying the real Phi-3 vocabulary (an HF tokenizer built by transformers from
`tests/data/phi3/ggml-vocab-phi-3.gguf`), exported with `export_gguf`.

- gguf-py reads the export: metadata types are the ones llama.cpp's own vocabulary file uses,
  tensor types/shapes/bytes are the HF weights (F16-rounded; norms and rope factors F32).
- llama.cpp loads the export and its logits agree with `Phi3ForCausalLM` on the same weights:
  with an F32 KV cache to 2e-3 (llama.cpp's CPU path rounds activations to F16 for F16 weights;
  top-1 identical wherever the error cannot flip it), with llama.cpp's default F16 cache to 1e-2.
  LongRoPE is compared under llama.cpp's rule (long factors iff n_ctx > original context;
  llama.cpp pads n_ctx to a multiple of 256) and transformers' rule (long iff the sequence is
  longer than the original context): short factors with n_ctx = original context and a short
  prompt, long factors with n_ctx > original and a prompt longer than the original context.
- llama.cpp's tokenizer on the export gives the same ids as on llama.cpp's vocabulary file.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest
import torch
import transformers

from pocketlm.cli import main as cli_main
from pocketlm.config import Phi3Config, tensor_specs
from pocketlm.errors import PocketLMError
from pocketlm.export.gguf_export import (
    export_gguf,
    export_tensor_type,
    gguf_model_name,
    pad_vocabulary,
    phi3_gguf_metadata,
)
from pocketlm.export.gguf_format import ValueType
from pocketlm.export.gguf_info import describe_gguf
from pocketlm.export.gguf_reader import GGUFReader
from pocketlm.export.gguf_writer import GGUFWriter
from pocketlm.quantize.formats import GGMLType
from pocketlm.tokenizer import UNUSED, Tokenizer

VOCAB_FILE = "data/phi3/ggml-vocab-phi-3.gguf"
GGML_F32 = 0  # ggml type id for llama.cpp's KV cache type

CONFIGS = {
    "mha-4k": dict(num_key_value_heads=4, max_position_embeddings=4096),
    "gqa-4k": dict(num_key_value_heads=2, max_position_embeddings=4096, sliding_window=2047),
    # LongRoPE: original context 256 because llama.cpp pads n_ctx to a multiple of 256
    "gqa-longrope": dict(num_key_value_heads=2, max_position_embeddings=1024,
                         original_max_position_embeddings=256, longrope=True),
    # Phi-4-mini's kind: RoPE on 3/4 of each head (llama.cpp: phi3.rope.dimension_count), tied embeddings
    "partial-tied": dict(num_key_value_heads=2, max_position_embeddings=4096, partial_rotary_factor=0.75,
                         tie_word_embeddings=True),
}


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory, data_root) -> Path:
    """Phi-3's vocabulary as Hugging Face tokenizer files (transformers' GGUF converter)."""
    src = tmp_path_factory.mktemp("vocab")
    shutil.copy(data_root / VOCAB_FILE, src / "vocab.gguf")
    tok = transformers.AutoTokenizer.from_pretrained(src, gguf_file="vocab.gguf")
    out = tmp_path_factory.mktemp("hf_tokenizer")
    tok.save_pretrained(out)
    return out


def _make_checkpoint(folder: Path, tokenizer_dir: Path, num_key_value_heads: int,
                     max_position_embeddings: int, original_max_position_embeddings: int | None = None,
                     sliding_window: int | None = None, longrope: bool = False,
                     partial_rotary_factor: float = 1.0, tie_word_embeddings: bool = False) -> Path:
    rng = np.random.default_rng(7)
    kwargs = dict(vocab_size=32064, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=num_key_value_heads,
                  max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-5, rope_theta=10000.0,
                  bos_token_id=1, eos_token_id=32000, pad_token_id=32000, tie_word_embeddings=tie_word_embeddings,
                  sliding_window=sliding_window, initializer_range=0.1, partial_rotary_factor=partial_rotary_factor)
    if longrope:
        half = 64 // 4 // 2
        kwargs.update(original_max_position_embeddings=original_max_position_embeddings, rope_scaling={
            "type": "longrope",
            "short_factor": (1.0 + rng.random(half)).tolist(),
            "long_factor": (2.0 + 4.0 * rng.random(half)).tolist(),
        })
    torch.manual_seed(0)
    model = transformers.Phi3ForCausalLM(transformers.Phi3Config(**kwargs))
    with torch.no_grad():  # norms away from 1 so that a mix-up of norm tensors shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    model.save_pretrained(folder)
    for f in os.listdir(tokenizer_dir):
        shutil.copy(tokenizer_dir / f, folder / f)
    return folder


@pytest.fixture(scope="session")
def exports(tmp_path_factory, hf_tokenizer_dir) -> dict[str, tuple[Path, Path]]:
    """config name -> (checkpoint folder, f16 GGUF)."""
    out = {}
    for name, kwargs in CONFIGS.items():
        ckpt = _make_checkpoint(tmp_path_factory.mktemp(name), hf_tokenizer_dir, **kwargs)
        gguf_path = tmp_path_factory.mktemp("gguf") / f"{name}-f16.gguf"
        export_gguf(ckpt, gguf_path, dtype="f16")
        out[name] = (ckpt, gguf_path)
    return out


def _hf_logits(ckpt: Path, ids: list[int], round_to_f16: bool) -> np.ndarray:
    model = transformers.Phi3ForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        if round_to_f16:  # the weights llama.cpp sees in an F16 file (norms stay F32)
            for name, p in model.named_parameters():
                if "norm" not in name:
                    p.copy_(p.half().float())
        return model(torch.tensor([ids])).logits[0].numpy()


def _llama_logits(path: Path, ids: list[int], n_ctx: int, f32_cache: bool) -> np.ndarray:
    cache = dict(type_k=GGML_F32, type_v=GGML_F32) if f32_cache else {}
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True,
                          n_threads=2, verbose=False, **cache)
    try:
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)], dtype=np.float32)
    finally:
        llm.close()


# llama.cpp's regular CPU path multiplies F16 weights with activations rounded to F16 (about 1e-3
# relative); builds whose extra buffer types take F16 matmuls (AMX, here) compute them in float and
# land within 1e-6. The bound admits the first; a wrong layout or name is off by O(1).
F16_MATMUL_TOL = 2e-3


def _prompt(n: int, seed: int = 3) -> list[int]:
    return [1, *np.random.default_rng(seed).integers(2, 32000, n - 1).tolist()]


def _assert_logits_agree(ours: np.ndarray, ref: np.ndarray, rel_tol: float, all_top1: bool) -> None:
    err = np.abs(ours - ref)
    rel = err.max() / np.abs(ref).max()
    assert rel < rel_tol, f"max relative error {rel:.2e}"
    top = np.sort(ref, axis=-1)
    decided = (top[:, -1] - top[:, -2]) > 2 * err.max(axis=-1)  # rows whose top-1 the error cannot flip
    if all_top1:
        decided[:] = True
    assert decided.sum() >= len(ref) // 2
    np.testing.assert_array_equal(ours.argmax(-1)[decided], ref.argmax(-1)[decided])


# ---------------------------------------------------------------------------- what the file holds

@pytest.fixture(scope="session")
def gguf_py(exports, data_root) -> dict[str, gguf.GGUFReader]:
    """gguf-py's view of llama.cpp's vocabulary file and of the LongRoPE export (slow: parse once)."""
    return {"vocab": gguf.GGUFReader(data_root / VOCAB_FILE),
            "gqa-longrope": gguf.GGUFReader(exports["gqa-longrope"][1])}


def test_metadata_types_match_llama_cpp_vocab_file(exports, gguf_py):
    theirs, ours = gguf_py["vocab"], gguf_py["gqa-longrope"]
    shared = [k for k in theirs.fields if k in ours.fields and not k.startswith("GGUF.")]
    assert len(shared) >= 20
    for key in shared:  # llama.cpp's loader rejects a key of the wrong type
        assert ours.fields[key].types == theirs.fields[key].types, key
    for key in ("tokenizer.ggml.tokens", "tokenizer.chat_template", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.add_bos_token", "tokenizer.ggml.eos_token_id"):
        assert ours.fields[key].contents() == theirs.fields[key].contents(), key
    assert ours.fields["phi3.rope.dimension_count"].contents() == 16  # head_dim
    assert ours.fields["phi3.rope.scaling.attn_factor"].types == [gguf.GGUFValueType.FLOAT32]
    assert ours.fields["general.file_type"].contents() == 1  # LLAMA_FTYPE_MOSTLY_F16
    assert "phi3" in ours.fields["general.name"].contents().lower()
    for name, (_, path) in exports.items():  # the other exports: same types (our reader, proven above)
        with GGUFReader(path) as r:
            for key in shared:
                assert r.value_types[key][0] == theirs.fields[key].types[0], (name, key)
            assert r.value_types["phi3.attention.sliding_window"] == (ValueType.UINT32, None)
            assert r.metadata["phi3.attention.sliding_window"] == (2047 if name == "gqa-4k" else 0)


def test_tensors_are_the_checkpoint_weights(exports, gguf_py):
    from safetensors.numpy import load_file

    ckpt, _ = exports["gqa-longrope"]
    hf = load_file(ckpt / "model.safetensors")
    config = json.loads((ckpt / "config.json").read_text())
    rope = config.get("rope_parameters") or config["rope_scaling"]
    reader = gguf_py["gqa-longrope"]
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 3 + 2 + 2 * 6
    np.testing.assert_array_equal(tensors["rope_factors_long.weight"].data, np.float32(rope["long_factor"]))
    np.testing.assert_array_equal(tensors["rope_factors_short.weight"].data, np.float32(rope["short_factor"]))
    for gguf_name, hf_name in (("token_embd.weight", "model.embed_tokens.weight"),
                               ("output.weight", "lm_head.weight"),
                               ("blk.1.attn_qkv.weight", "model.layers.1.self_attn.qkv_proj.weight"),
                               ("blk.0.ffn_up.weight", "model.layers.0.mlp.gate_up_proj.weight"),
                               ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),
                               ("blk.1.attn_output.weight", "model.layers.1.self_attn.o_proj.weight"),
                               ("blk.1.ffn_norm.weight", "model.layers.1.post_attention_layernorm.weight"),
                               ("output_norm.weight", "model.norm.weight")):
        t, w = tensors[gguf_name], hf[hf_name]
        assert list(t.shape) == list(reversed(w.shape))  # GGUF lists dimensions innermost first
        if w.ndim == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            np.testing.assert_array_equal(t.data, w)
        else:
            assert t.tensor_type == gguf.GGMLQuantizationType.F16
            np.testing.assert_array_equal(t.data, w.astype(np.float16))
    md = GGUFReader(exports["gqa-longrope"][1]).metadata
    assert md["phi3.rope.scaling.original_context_length"] == 256
    expected_attn_factor = np.sqrt(1 + np.log(1024 / 256) / np.log(256))
    assert md["phi3.rope.scaling.attn_factor"] == pytest.approx(expected_attn_factor, rel=1e-6)


# ---------------------------------------------------------------------------- llama.cpp runs it

@pytest.mark.parametrize("name", ["mha-4k", "gqa-4k", "partial-tied"])
def test_llama_cpp_logits_match_transformers(exports, name):
    ckpt, path = exports[name]
    ids = _prompt(40)
    ref = _hf_logits(ckpt, ids, round_to_f16=True)
    _assert_logits_agree(_llama_logits(path, ids, 256, f32_cache=True), ref, F16_MATMUL_TOL, all_top1=False)
    _assert_logits_agree(_llama_logits(path, ids, 256, f32_cache=False), ref, 1e-2, all_top1=False)


def test_llama_cpp_longrope_short_factors(exports):
    """n_ctx = original context: llama.cpp uses the short factors; so does transformers for 40 tokens."""
    ckpt, path = exports["gqa-longrope"]
    ids = _prompt(40)
    ref = _hf_logits(ckpt, ids, round_to_f16=True)
    _assert_logits_agree(_llama_logits(path, ids, 256, f32_cache=True), ref, F16_MATMUL_TOL, all_top1=False)


def test_llama_cpp_longrope_long_factors(exports):
    """n_ctx > original context: llama.cpp uses the long factors; transformers too for a 300-token prompt."""
    ckpt, path = exports["gqa-longrope"]
    ids = _prompt(300)
    ref = _hf_logits(ckpt, ids, round_to_f16=True)
    ours = _llama_logits(path, ids, 512, f32_cache=True)
    _assert_logits_agree(ours, ref, F16_MATMUL_TOL, all_top1=False)
    short_rule = _hf_logits(ckpt, ids[:40], round_to_f16=True)  # the factor choice is visible
    assert np.abs(ours[:40] - short_rule).max() > 1e-2


def test_f32_export_is_exact(exports, tmp_path):
    ckpt, _ = exports["mha-4k"]
    path = export_gguf(ckpt, tmp_path / "f32.gguf", dtype="f32")
    with GGUFReader(path) as r:
        assert {t.type_name for t in r} == {"F32"}
        assert r.metadata["general.file_type"] == 0
    ids = _prompt(24)
    ref = _hf_logits(ckpt, ids, round_to_f16=False)
    _assert_logits_agree(_llama_logits(path, ids, 256, f32_cache=True), ref, 1e-5, all_top1=True)


TEXTS = [
    "Hello world",
    "<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n",
    "  leading spaces\tand tabs\n\nnew lines ",
    "Ünïcödé 中文 🙂 emoji",
    "<s>text</s> <|endoftext|><|system|>  x",
    "ROMEO:\nBut, soft! what light through yonder window breaks?",
]


def test_llama_cpp_tokenizer_and_chat_template(exports, data_root):
    _, path = exports["mha-4k"]
    ours = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    theirs = llama_cpp.Llama(model_path=str(data_root / VOCAB_FILE), vocab_only=True, verbose=False)
    try:
        for text in TEXTS:
            for special in (True, False):
                expected = theirs.tokenize(text.encode(), add_bos=True, special=special)
                assert ours.tokenize(text.encode(), add_bos=True, special=special) == expected, text
        template = ours.metadata["tokenizer.chat_template"]
        assert template == theirs.metadata["tokenizer.chat_template"]
        assert "<|assistant|>" in template
    finally:
        ours.close()
        theirs.close()
    # and our own reader + tokenizer read the same vocabulary back
    with GGUFReader(path) as r:
        tok = Tokenizer.from_gguf_fields(r.metadata, path)
        assert tok.encode(TEXTS[1]) == theirs_ids(data_root, TEXTS[1])


def theirs_ids(data_root: Path, text: str) -> list[int]:
    llm = llama_cpp.Llama(model_path=str(data_root / VOCAB_FILE), vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode(), add_bos=True, special=True)
    finally:
        llm.close()


# ---------------------------------------------------------------------------- helpers, CLI, errors

def test_pad_vocabulary():
    fields = {"tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.scores": [0.0, -1.0],
              "tokenizer.ggml.token_type": [1, 3]}
    padded = pad_vocabulary(fields, 5)
    assert padded["tokenizer.ggml.tokens"] == ["a", "b", "[PAD2]", "[PAD3]", "[PAD4]"]
    assert padded["tokenizer.ggml.token_type"].tolist() == [1, 3, UNUSED, UNUSED, UNUSED]
    assert padded["tokenizer.ggml.scores"].tolist() == [0.0, -1.0, -10000.0, -10000.0, -10000.0]
    with pytest.raises(PocketLMError, match="more than"):
        pad_vocabulary(fields, 1)


def test_model_name_keeps_llama_cpp_phi3_rules():
    assert gguf_model_name("Phi-3-mini-4k-instruct") == "Phi-3-mini-4k-instruct"
    assert gguf_model_name("my-model") == "phi3-my-model"
    assert gguf_model_name("phi3-tiny", phi3_whitespace_rule=False) == "model-tiny"


def test_cli_export_and_describe(exports, tmp_path, capsys):
    ckpt, _ = exports["gqa-longrope"]
    out = tmp_path / "cli.gguf"
    assert cli_main(["export", str(ckpt), "--gguf", str(out), "--dtype", "f16"]) == 0
    printed = capsys.readouterr().out
    assert "phi3: 2 layers, hidden 64, ffn 128, heads 4/2 (GQA)" in printed
    assert "LongRoPE from 256" in printed
    assert "F16 x10" in printed and "F32 x7" in printed
    assert "llama (32064 tokens)" in printed and "chat template" in printed
    assert "recipe f16" in printed
    assert cli_main(["export", str(tmp_path / "missing"), "--gguf", str(tmp_path / "x.gguf")]) == 2
    assert "missing: does not exist" in capsys.readouterr().err
    assert cli_main(["export", str(ckpt)]) == 2
    assert "exactly one of --gguf" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists()


def test_describe_vocab_only_and_quantized_files(data_root, tmp_path):
    text = describe_gguf(data_root / VOCAB_FILE)
    assert "tensors       none" in text and "32064 tokens" in text and "32 layers" in text
    path = tmp_path / "q.gguf"
    w = gguf.GGUFWriter(path, "phi3")
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    w.add_tensor("a", gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q4_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    w.add_tensor("b", x[0])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    text = describe_gguf(path)
    assert "Q4_0 x1 (80.0% of weights)" in text and "F32 x1" in text
    assert f"{(4 * 2 * 18 + 64 * 4) * 8 / 320:.2f} bits per weight" in text


def test_export_refuses_bad_input(exports, tmp_path):
    ckpt, _ = exports["mha-4k"]
    with pytest.raises(PocketLMError, match="dtype"):
        export_gguf(ckpt, tmp_path / "x.gguf", dtype="q4")
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(ckpt / f, bare / f)
    with pytest.raises(PocketLMError, match="tokenizer"):
        export_gguf(bare, tmp_path / "x.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare"]


def test_reader_value_types_for_export(exports):
    _, path = exports["mha-4k"]
    with GGUFReader(path) as r:
        assert r.value_types["tokenizer.ggml.scores"] == (ValueType.ARRAY, ValueType.FLOAT32)
        assert r.value_types["tokenizer.ggml.token_type"] == (ValueType.ARRAY, ValueType.INT32)
        assert r.value_types["phi3.block_count"] == (ValueType.UINT32, None)
        emb = r.tensor("token_embd.weight")
        assert emb.dtype == np.float16 and emb.shape == (32064, 64) and not emb.flags.owndata


# ---------------------------------------------------------------------------- llama.cpp's quantizer output

@pytest.fixture(scope="session")
def llama_cpp_q3_k_m(tmp_path_factory, data_root) -> Path:
    """A 256-wide random Phi-3 written by our writer (F16), quantized to Q3_K_M by llama.cpp itself."""
    cfg = Phi3Config(vocab_size=32064, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
                     original_max_position_embeddings=4096)
    with GGUFReader(data_root / VOCAB_FILE) as vocab:
        metadata = phi3_gguf_metadata(cfg, vocab.tokenizer_fields(), name="phi3-k", file_type=1,
                                      recipe="f16", method="none")
    specs = tensor_specs(cfg)
    folder = tmp_path_factory.mktemp("llama_cpp_quant")
    rng = np.random.default_rng(0)
    with GGUFWriter(folder / "f16.gguf", metadata,
                    [(s.name, export_tensor_type(s, GGMLType.F16), s.shape) for s in specs]) as w:
        for s in specs:
            w.write_tensor(s.name, rng.standard_normal(s.shape, dtype=np.float32) * 0.05)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = 12  # LLAMA_FTYPE_MOSTLY_Q3_K_M: Q3_K, Q4_K, Q5_K, Q6_K
    params.nthread = 2
    out = folder / "q3_k_m.gguf"
    rc = llama_cpp.llama_model_quantize(str(folder / "f16.gguf").encode(), str(out).encode(),
                                        ctypes.byref(params))
    assert rc == 0
    return out


def test_reads_llama_cpp_quantizer_output(llama_cpp_q3_k_m):
    theirs = gguf.GGUFReader(llama_cpp_q3_k_m)
    with GGUFReader(llama_cpp_q3_k_m) as r:
        assert {t.type_name for t in r} >= {"Q3_K", "Q4_K", "Q5_K", "Q6_K", "F32"}
        assert r.metadata["general.file_type"] == 12
        assert [t.name for t in theirs.tensors] == list(r.tensors)
        for t in theirs.tensors:
            info = r.info(t.name)
            assert (info.type_id, info.offset) == (int(t.tensor_type), t.data_offset)
            assert info.shape == tuple(reversed([int(d) for d in t.shape]))
            assert r.raw(t.name).tobytes() == np.ascontiguousarray(t.data).tobytes()
            if info.type_name != "Q3_K":  # a type pocketlm implements (Q5_K too): same values as gguf-py
                np.testing.assert_array_equal(
                    r.dequantize(t.name),
                    gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(info.shape))
            else:  # Q3_K: listed, rejected only when its values are asked for
                assert info.gtype is None
                with pytest.raises(PocketLMError, match=info.type_name):
                    r.dequantize(t.name)
        assert "Q4_K x" in describe_gguf(llama_cpp_q3_k_m)
