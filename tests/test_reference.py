"""The numpy reference forward pass against transformers' Phi3ForCausalLM (the oracle)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from pocketlm.checkpoint import Checkpoint
from pocketlm.reference import Phi3Reference


def hf_logits(folder, tokens) -> np.ndarray:
    model = transformers.Phi3ForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float().numpy()


def hf_logits_incremental(folder, tokens, prefill: int) -> np.ndarray:
    """Prompt of `prefill` tokens, then one token at a time through transformers' own cache."""
    model = transformers.Phi3ForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    outs = []
    with torch.no_grad():
        out = model(torch.tensor([tokens[:prefill]]), use_cache=True)
        outs.append(out.logits[0])
        for t in tokens[prefill:]:
            out = model(torch.tensor([[t]]), cache=out.cache, use_cache=True)
            outs.append(out.logits[0])
    return torch.cat(outs).float().numpy()


def max_rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# (config kind, sequence length): LongRoPE below and above the original 64 positions,
# the sliding window (8) shorter than the sequence, Phi-4-mini's partial RoPE with tied embeddings.
CASES = [("mha", 40), ("gqa", 40), ("longrope", 40), ("longrope", 100), ("swa", 30), ("partial", 40),
         ("partial-longrope", 40), ("partial-longrope", 100)]


@pytest.mark.parametrize(("kind", "seq"), CASES)
def test_whole_prompt_matches_transformers(tiny_checkpoint, kind, seq):
    folder = tiny_checkpoint(kind)
    tokens = np.random.default_rng(seq).integers(0, 300, seq).tolist()
    ref = Phi3Reference.from_checkpoint(Checkpoint.open(folder))
    assert max_rel_err(ref.forward(tokens), hf_logits(folder, tokens)) < 1e-4


@pytest.mark.parametrize(("kind", "seq"), [("gqa", 24), ("swa", 24), ("longrope", 24), ("partial", 24)])
def test_token_by_token_cache_matches_transformers(tiny_checkpoint, kind, seq):
    folder = tiny_checkpoint(kind)
    tokens = np.random.default_rng(1).integers(0, 300, seq).tolist()
    prefill = 6
    ref = Phi3Reference.from_checkpoint(Checkpoint.open(folder))
    cache = ref.new_cache()
    ours = [ref.forward(tokens[:prefill], cache)]
    ours += [ref.forward([t], cache) for t in tokens[prefill:]]
    expected = hf_logits_incremental(folder, tokens, prefill)
    assert cache.length == seq
    assert max_rel_err(np.concatenate(ours), expected) < 1e-4


def test_longrope_switches_to_long_factors_past_original_context(tiny_checkpoint):
    """Token by token across position 64: transformers switches factors per step, and so do we."""
    folder = tiny_checkpoint("longrope")
    tokens = np.random.default_rng(2).integers(0, 300, 70).tolist()
    ref = Phi3Reference.from_checkpoint(Checkpoint.open(folder))
    cache = ref.new_cache()
    ours = [ref.forward(tokens[:60], cache)] + [ref.forward([t], cache) for t in tokens[60:]]
    assert max_rel_err(np.concatenate(ours), hf_logits_incremental(folder, tokens, 60)) < 1e-4


def test_bf16_and_fp16_checkpoints_read_as_stored(tiny_checkpoint):
    for dtype in ("bfloat16", "float16"):
        folder = tiny_checkpoint("gqa", dtype)
        ckpt = Checkpoint.open(folder)
        model = transformers.Phi3ForCausalLM.from_pretrained(folder, dtype=torch.float32)
        expected = model.model.layers[1].mlp.down_proj.weight.detach().numpy()
        assert np.array_equal(ckpt.tensor("blk.1.ffn_down.weight"), expected)


def test_partial_rope_longrope_switch_through_the_cache(tiny_checkpoint):
    """Partial RoPE (3/4 of each head) with LongRoPE factors sized to the rotary part, across
    position 64 token by token; tied embeddings (no lm_head in the checkpoint)."""
    folder = tiny_checkpoint("partial-longrope")
    ckpt = Checkpoint.open(folder)
    assert ckpt.config.rope_dim == 12 and ckpt.config.tie_word_embeddings
    assert "output.weight" not in ckpt.names()
    tokens = np.random.default_rng(4).integers(0, 300, 70).tolist()
    ref = Phi3Reference.from_checkpoint(ckpt)
    cache = ref.new_cache()
    ours = [ref.forward(tokens[:60], cache)] + [ref.forward([t], cache) for t in tokens[60:]]
    assert max_rel_err(np.concatenate(ours), hf_logits_incremental(folder, tokens, 60)) < 1e-4
