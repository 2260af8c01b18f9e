"""The shipped second built-in model (`pocketlm/builtin_small/`, Phi-3-small architecture).

Oracles: tiktoken (reads the rank file and tokenizes the held-out text), the independent torch
forward of Phi-3-small (tests/torch_phi3small.py, reading the folder by Microsoft's names and
layouts), a unigram model of the train split (tests/data counts), and pocketlm's numpy reference
for the runtime's C forward.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from torch_phi3small import TorchPhi3Small

import pocketlm
from pocketlm import corpus
from pocketlm.checkpoint import Checkpoint
from pocketlm.reference import Phi3Reference
from pocketlm.tokenizer import tokenizer_from_dir

SMALL = Path(pocketlm.__file__).resolve().parent / "builtin_small"
MAX_BYTES = 12_000_000  # the budget for the shipped folder
REQUIRED = ("config.json", "generation_config.json", "model.safetensors", "shakespeare_bpe.tiktoken",
            "tokenizer_config.json", "training.json")
WINDOW = 512            # the evaluated held-out window: 32 blocks of 16, the pattern bites from 64 on
INT8_ACT_TOL = 3e-2     # the runtime rounds activations to int8 for quantized matmuls


@pytest.fixture(scope="module")
def ckpt() -> Checkpoint:
    return Checkpoint.open(SMALL)


@pytest.fixture(scope="module")
def tok():
    return tokenizer_from_dir(SMALL)


@pytest.fixture(scope="module")
def reference(ckpt) -> Phi3Reference:
    return Phi3Reference.from_checkpoint(ckpt)


@pytest.fixture(scope="module")
def record() -> dict:
    return json.loads((SMALL / "training.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def heldout_window(tok, data_root) -> np.ndarray:
    """<|endoftext|> + WINDOW - 1 tokens from the middle of Julius Caesar (tests/data)."""
    path = next(p for p in corpus.corpus_files("heldout", data_root) if p.stem == "julius_caesar_gut")
    text = corpus.read_work(path)
    mid = text.index("\n", len(text) // 2) + 1
    ids = tok.encode(text[mid:mid + 8000], parse_special=False)[: WINDOW - 1]
    assert len(ids) == WINDOW - 1
    return np.asarray([tok.bos_id, *ids])


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    """Max error over the logits that are not masked, relative to their largest magnitude."""
    live = want > -1e30
    return float(np.abs(got[live] - want[live]).max() / np.abs(want[live]).max())


def nll(logits: np.ndarray, ids: np.ndarray) -> float:
    """Mean NLL (nats) of ids[1:] under logits[:-1] ([T, V])."""
    z = logits[:-1].astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].mean())


# ----------------------------------------------------------------------------------- the folder

def test_files_fit_the_budget():
    for name in REQUIRED:
        assert (SMALL / name).is_file(), name
    total = sum(p.stat().st_size for p in SMALL.iterdir() if p.is_file())
    assert total <= MAX_BYTES, total
    assert not any(p.name.endswith(".tmp") for p in SMALL.iterdir())


def test_folder_is_laid_out_as_microsoft_ships_phi3_small(ckpt, tok):
    from safetensors import safe_open

    raw = json.loads((SMALL / "config.json").read_text(encoding="utf-8"))
    assert raw["architectures"] == ["Phi3SmallForCausalLM"] and raw["model_type"] == "phi3small"
    for key in ("ff_intermediate_size", "gegelu_limit", "blocksparse_block_size", "blocksparse_num_local_blocks",
                "blocksparse_vert_stride", "dense_attention_every_n_layers", "mup_embedding_multiplier",
                "mup_width_multiplier", "mup_attn_multiplier", "mup_use_scaling", "rope_embedding_base",
                "layer_norm_epsilon"):
        assert key in raw, key
    assert "tie_word_embeddings" not in raw  # Microsoft's file: the embedding is the output
    with safe_open(SMALL / "model.safetensors", "pt") as f:
        names = set(f.keys())
        assert {f.get_slice(k).get_dtype() for k in names} == {"BF16"}
    assert "lm_head.weight" not in names
    assert "model.layers.0.self_attn.query_key_value.bias" in names and "model.final_layernorm.bias" in names

    cfg = ckpt.config
    assert (cfg.architecture, cfg.norm, cfg.activation, cfg.gegelu_limit) == (
        "Phi3SmallForCausalLM", "layer", "gegelu", 20.0)
    assert cfg.linear_bias and cfg.tie_word_embeddings
    assert cfg.embedding_multiplier == 10.0 and cfg.logit_scale == 1 / 8
    assert cfg.attention_scale == pytest.approx(1 / cfg.head_dim)  # mup_attn_multiplier 1 with mup_use_scaling
    assert cfg.num_attention_heads == 4 * cfg.num_key_value_heads
    bs = cfg.block_sparse
    assert (bs.block_size, bs.local_blocks, bs.vert_stride, bs.homo_head) == (16, 4, 4, False)
    assert [cfg.layer_sparsity(i) is None for i in range(cfg.num_hidden_layers)] == [False, True] * (
        cfg.num_hidden_layers // 2)
    assert cfg.vocab_size == tok.vocab_size and cfg.masked_token_ids == tuple(sorted(tok.dummy_token_ids))
    assert cfg.hidden_size % 256 == 0 and cfg.intermediate_size % 256 == 0  # Q4_K super-blocks


def test_tokenizer_is_a_small_tiktoken_bpe_with_phi3_small_specials(tok, data_root, monkeypatch):
    """tiktoken itself reads the rank file and tokenizes held-out text exactly as pocketlm (its
    loader's path-keyed cache off: a retrained file at the same path must not come back stale)."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    assert 2000 <= tok.n_ranks <= 4000
    assert tok.vocab_size % 64 == 0
    assert tok.eot_id == tok.n_ranks + 1 and tok.end_id == tok.n_ranks + 10  # 100257 / 100266 shifted
    pattern = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
               r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
    ranks = load_tiktoken_bpe(str(SMALL / "shakespeare_bpe.tiktoken"))
    assert len(ranks) == tok.n_ranks
    enc = tiktoken.Encoding("builtin_small", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
    text = corpus.read_work(corpus.corpus_files("heldout", data_root)[0])[:30000] + " 1623 café\n\n"
    ids = tok.encode(text, parse_special=False)
    assert ids == enc.encode_ordinary(text)
    assert len(text) / len(ids) > 3  # a trained vocabulary: several bytes per token, not bytes
    chat = tok.apply_chat_template([{"role": "user", "content": "Hail"}])
    assert chat == "<|endoftext|><|user|>\nHail<|end|>\n<|assistant|>\n"
    assert tok.encode(chat)[:2] == [tok.eot_id, tok.special_ids["<|user|>"]]


# ------------------------------------------------------------------------------------- the model

def test_reference_matches_the_torch_oracle(reference, heldout_window):
    """pocketlm's reader + reference against the torch forward written from the Phi-3-small facts."""
    ids = heldout_window[:160]
    want = TorchPhi3Small(SMALL).forward(ids.tolist()).numpy()
    assert rel_error(reference.forward(ids), want) < 1e-4


def test_heldout_perplexity_is_far_below_unigram(reference, heldout_window, tok, record, data_root):
    ids = heldout_window
    ppl = math.exp(nll(reference.forward(ids), ids))
    targets = ids[1:]
    # Unigram of the train split (add-one smoothing), from the counts in tests/data.
    counts = np.load(data_root / "data" / "builtin_small_train_unigram_counts.npy").astype(np.float64) + 1.0
    assert counts.shape == (tok.vocab_size,)
    unigram = math.exp(float(-np.log(counts / counts.sum())[targets].mean()))
    assert ppl < unigram / 2, (ppl, unigram)
    assert record["heldout"]["perplexity"] < record["heldout"]["unigram_perplexity"] / 2
    # The training script's baseline came from the same counts.
    assert record["split_tokens"]["train"] == int(counts.sum() - tok.vocab_size)


def test_block_sparse_pattern_matters(ckpt, reference, heldout_window):
    """Past 64 tokens the trained model depends on its pattern: dense attention changes the
    logits and predicts the held-out text worse; inside the local window the two agree."""
    ids = heldout_window
    sparse = reference.forward(ids)
    dense = Phi3Reference(replace(ckpt.config, block_sparse=None), reference.w).forward(ids)
    window = 4 * 16
    assert rel_error(dense[:window], sparse[:window]) < 1e-5
    assert rel_error(dense[window:], sparse[window:]) > 1e-2
    assert nll(sparse, ids) < nll(dense, ids)


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory) -> Path:
    from pocketlm.export.gguf_export import export_gguf

    return export_gguf(SMALL, tmp_path_factory.mktemp("small") / "small-f32.gguf", dtype="f32")


def test_runtime_matches_the_reference(f32_gguf, reference, heldout_window):
    """The C forward (prompt in chunks, then the decode step past the local window) of the f32 GGUF."""
    from pocketlm.runtime.model import load

    ids = heldout_window[:150].tolist()
    want = reference.forward(np.asarray(ids))
    model = load(f32_gguf, threads=2, ctx=256, kv="f32", batch=37)
    got = np.concatenate([model.forward(ids[:100], all_logits=True)] + [model.forward([t])[None] for t in ids[100:]])
    assert rel_error(got, want) < 1e-4


def test_quantized_runtime_matches_the_reference_on_its_weights(tmp_path, heldout_window):
    from pocketlm.quantize.evaluate import gguf_logits
    from pocketlm.quantize.pipeline import quantize_checkpoint
    from pocketlm.runtime.model import load

    out = tmp_path / "small-q4_0.gguf"
    quantize_checkpoint(SMALL, out, recipe="q4_0", method="rtn")
    ids = heldout_window[:120].tolist()
    want = gguf_logits(out, np.asarray(ids))
    model = load(out, threads=2, ctx=128, kv="f32")
    model.forward(ids[:90])
    got = np.stack([model.forward([t]) for t in ids[90:]])
    assert rel_error(got, want[90:]) < INT8_ACT_TOL


def test_greedy_text_decodes_to_shakespeare(f32_gguf, reference, tok, data_root):
    """Greedy tokens of the runtime equal the reference's; the text is made of corpus words."""
    from pocketlm.runtime.generate import generate
    from pocketlm.runtime.model import load

    prompt = [tok.bos_id, *tok.encode("KING.\nNow, my lords,")]
    cache, want = reference.new_cache(), []
    logits = reference.forward(prompt, cache)[-1]
    for _ in range(40):
        want.append(int(np.argmax(logits)))
        logits = reference.forward(want[-1:], cache)[-1]
    model = load(f32_gguf, threads=2, ctx=128, kv="f32")
    logits, got = model.forward(prompt), []
    for _ in range(40):
        got.append(int(np.argmax(logits)))
        logits = model.forward(got[-1:])
    assert got == want
    text = "".join(generate(model, prompt, max_tokens=40, temperature=0.0, ignore_eos=True))
    assert text == tok.decode(want)
    words = re.findall(r"[A-Za-z]+", text)
    known = set(re.findall(r"[A-Za-z]+", "\n".join(
        corpus.read_work(p) for s in corpus.SPLITS for p in corpus.corpus_files(s, data_root))))
    assert len(words) >= 10 and sum(w in known for w in words) >= 0.9 * len(words), text


def test_demo_names_its_models(tmp_path):
    from pocketlm.demo import MODELS, run_demo
    from pocketlm.errors import PocketLMError

    assert MODELS["small"][0] == SMALL
    with pytest.raises(PocketLMError, match="unknown built-in model 'medium'"):
        run_demo(tmp_path, model_name="medium", bench=False)
