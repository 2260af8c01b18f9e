"""A Phi-4-mini-shaped checkpoint through pocketlm end to end: `Phi3ForCausalLM` with partial RoPE
(partial_rotary_factor 0.75), tied embeddings, LongRoPE sized to the rotary part and a byte-level
BPE vocabulary with Phi-4-mini's special tokens (tests/phi4_fixtures.py).

Oracles: transformers' Phi3ForCausalLM for the checkpoint; llama.cpp (llama-cpp-python) on our
GGUF: its tokenizer, its logits (with its int8 activation rounding emulated), its greedy tokens;
onnxruntime-genai on our ONNX export: its greedy tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from onnx_helpers import genai_greedy, reference_from_gguf, reference_greedy
from phi4_fixtures import corpus_text, padded_vocab, write_phi4_tokenizer
from quant_helpers import NEAR_TIE, llama_cpp_greedy, llama_cpp_logits

from pocketlm.checkpoint import Checkpoint
from pocketlm.export.gguf_reader import GGUFReader
from pocketlm.quantize.evaluate import gguf_logits
from pocketlm.quantize.pipeline import quantize_checkpoint
from pocketlm.reference import Phi3Reference
from pocketlm.runtime.model import load
from pocketlm.tokenizer import tokenizer_from_dir

HIDDEN, HEADS = 256, 4  # head_dim 64, rotary 48 (multiples of 16, which onnxruntime's GQA needs)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phi4-mini")
    write_phi4_tokenizer(out, corpus_text(), write_config=False)
    n = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
    rng = np.random.default_rng(3)
    rot_half = int(HIDDEN // HEADS * 0.75) // 2
    cfg = transformers.Phi3Config(
        vocab_size=padded_vocab(len(n) - 12), hidden_size=HIDDEN, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=512,
        original_max_position_embeddings=128, partial_rotary_factor=0.75, tie_word_embeddings=True,
        rope_scaling={"type": "longrope", "short_factor": (1.0 + rng.random(rot_half)).tolist(),
                      "long_factor": (2.0 + 4.0 * rng.random(rot_half)).tolist()},
        bos_token_id=len(n) - 12, eos_token_id=len(n) - 12, pad_token_id=len(n) - 12, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    model = transformers.Phi3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.05)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def q8_file(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phi4-gguf") / "phi4-q8_0.gguf"
    quantize_checkpoint(folder, out, recipe="q8_0", method="rtn")
    return out


def test_checkpoint_and_reference_match_transformers(folder):
    ckpt = Checkpoint.open(folder)
    cfg = ckpt.config
    assert (cfg.rope_dim, cfg.head_dim, cfg.tie_word_embeddings) == (48, 64, True)
    assert "output.weight" not in ckpt.names()
    ids = np.random.default_rng(1).integers(0, 3000, 150).tolist()  # past the original 128 positions
    model = transformers.Phi3ForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    got = Phi3Reference.from_checkpoint(ckpt).forward(ids)
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4


def test_info_describes_partial_rope_and_tied_output(folder, q8_file, capsys):
    from pocketlm.cli import main as cli_main

    assert cli_main(["info", str(folder)]) == 0
    assert "on 48 of 64 values per head (partial)" in capsys.readouterr().out
    assert cli_main(["info", str(q8_file)]) == 0
    assert "phi3: 2 layers" in capsys.readouterr().out


def test_gguf_is_llama_cpps_layout(q8_file, folder):
    with GGUFReader(q8_file) as r:
        md = r.metadata
        assert md["general.architecture"] == "phi3"
        assert md["phi3.rope.dimension_count"] == 48
        assert md["tokenizer.ggml.model"] == "gpt2" and md["tokenizer.ggml.pre"] == "gpt-4o"
        assert "output.weight" not in r.tensors  # tied: quantized once, as token_embd


def test_llama_cpp_tokenizes_and_computes_like_us(q8_file, folder):
    """llama.cpp on our file: the same ids for a chat prompt, the same single-token logits as the
    reference on the file's dequantized weights (with llama.cpp's activation rounding)."""
    import llama_cpp

    tok = tokenizer_from_dir(folder)
    text = tok.apply_chat_template([{"role": "user", "content": "Who is't that knocks? Speak, Horatio!"}])
    llm = llama_cpp.Llama(model_path=str(q8_file), vocab_only=True, verbose=False)
    try:
        theirs = llm.tokenize(text.encode(), add_bos=False, special=True)
    finally:
        llm.close()
    assert theirs == tok.encode(text)
    tokens = np.random.default_rng(0).integers(3, 3000, 12)
    ours = gguf_logits(q8_file, tokens[:, None], llama_cpp_activations=True)[:, 0]
    got = llama_cpp_logits(q8_file, tokens.tolist(), separate=True)
    errors = np.abs(got - ours).max(axis=1) / np.abs(ours).max(axis=1)
    assert np.median(errors) < 1e-5, errors


def test_runtime_matches_the_reference_and_llama_cpp(q8_file, folder):
    """The runtime's logits along its own greedy continuation equal the reference's on the file's
    dequantized weights (int8 activations: within 3 %); its greedy tokens are llama.cpp's but at
    near-ties."""
    tok = tokenizer_from_dir(folder)
    prompt = tok.encode("HAMLET.\nTo be, or not to be, that is the question:\n")
    n = 24
    # llama.cpp's LongRoPE rule (long factors whenever n_ctx passes the original 128), as it runs here
    model = load(q8_file, threads=2, ctx=256)
    ours = [int(t) for t in model.generate(prompt, max_tokens=n, temperature=0, ignore_eos=True).token_ids()]
    # Hugging Face's rule, as the reference applies it (short factors below 128 tokens)
    seq = load(q8_file, threads=2, ctx=256, longrope="sequence")
    got = seq.forward(prompt + ours[:-1], all_logits=True)[len(prompt) - 1:]
    want = gguf_logits(q8_file, np.asarray(prompt + ours[:-1]))[len(prompt) - 1:]
    assert np.abs(got - want).max() / np.abs(want).max() < 3e-2
    theirs, gaps = llama_cpp_greedy(q8_file, prompt, n)
    same = next((i for i, (a, b) in enumerate(zip(theirs, ours, strict=True)) if a != b), n)
    assert same == n or gaps[same] < NEAR_TIE, f"llama.cpp leaves us at {same} without a near-tie: {gaps[same]}"


def test_onnx_export_runs_in_genai_like_the_reference(q8_file, folder, tmp_path):
    from pocketlm.export.onnx_export import export_onnx

    export_onnx(q8_file, tmp_path / "onnx", accuracy_level=1, progress=False)  # float32 activations: the oracle
    tok = tokenizer_from_dir(folder)
    prompt = tok.encode("OPHELIA.\nGood my lord,\n")
    n = 16
    theirs = genai_greedy(tmp_path / "onnx", prompt, n)
    want = reference_greedy(reference_from_gguf(q8_file), prompt, n)
    assert theirs == want[: len(theirs)] and len(theirs) >= n // 2
