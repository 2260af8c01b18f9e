"""Shared fixtures: the test data in `tests/data/` (Phi-3 vocabulary, chat template, a few works of
the corpus; see tests/data/README.md), so the suite passes on a fresh clone with nothing beside it."""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the CLI does (pocketlm/cli.py): no BLAS spinning

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # shared test helpers: quant_helpers, gguf_files

REPO = Path(__file__).resolve().parents[1]
# Laid out like the maintainers' shared data folder (data/phi3/, data/shakespeare/), so
# `pocketlm.corpus` reads it unchanged.
DATA_ROOT = REPO / "tests"
# The corpus splits the code under test defaults to (quantize's calibration text, eval's held-out
# text) resolve here too: the tests read nothing outside the clone.
os.environ["POCKETLM_SHARED_DIR"] = str(DATA_ROOT)


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The folder holding `data/` (the test copies of the shared data)."""
    return DATA_ROOT


# Tiny random Phi-3 configs covering every code path: MHA and GQA, 4k-style and LongRoPE-128k-style
# (original context 64 so short tests cross it), and a sliding window shorter than test sequences.
TINY_CONFIGS = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2),
    "longrope": dict(num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                     original_max_position_embeddings=64, rope_scaling="longrope"),
    "swa": dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=8),
    # Phi-4-mini's kind: RoPE on 3/4 of each head, tied embeddings (with and without LongRoPE)
    "partial": dict(num_attention_heads=4, num_key_value_heads=2, partial_rotary_factor=0.75,
                    tie_word_embeddings=True),
    "partial-longrope": dict(num_attention_heads=4, num_key_value_heads=2, partial_rotary_factor=0.75,
                             tie_word_embeddings=True, max_position_embeddings=512,
                             original_max_position_embeddings=64, rope_scaling="longrope"),
}


def tiny_hf_config(kind: str, **overrides):
    """A transformers Phi3Config: hidden 64, 2 layers, head_dim 16, vocab 300 (unless overridden)."""
    import numpy as np
    import transformers

    spec = {**TINY_CONFIGS[kind], **overrides}
    hidden = spec.pop("hidden_size", 64)
    heads = spec["num_attention_heads"]
    max_pos = spec.pop("max_position_embeddings", 256)
    orig = spec.pop("original_max_position_embeddings", max_pos)
    rope_scaling = None
    if spec.pop("rope_scaling", None):
        rng = np.random.default_rng(7)
        half = int(hidden // heads * spec.get("partial_rotary_factor", 1.0)) // 2
        rope_scaling = {"type": "longrope",
                        "short_factor": (1.0 + rng.random(half)).round(4).tolist(),
                        "long_factor": (1.0 + 8 * rng.random(half)).round(4).tolist()}
    return transformers.Phi3Config(
        vocab_size=spec.pop("vocab_size", 300), hidden_size=hidden,
        intermediate_size=spec.pop("intermediate_size", 128),
        num_hidden_layers=spec.pop("num_hidden_layers", 2), max_position_embeddings=max_pos,
        original_max_position_embeddings=orig, rope_scaling=rope_scaling,
        sliding_window=spec.pop("sliding_window", None), bos_token_id=1, eos_token_id=2,
        pad_token_id=0, tie_word_embeddings=spec.pop("tie_word_embeddings", False), **spec)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory: kind -> folder with a saved random tiny Phi3ForCausalLM (fp32 safetensors)."""
    import torch
    import transformers

    made: dict[str, Path] = {}

    def make(kind: str, dtype: str = "float32") -> Path:
        key = f"{kind}-{dtype}"
        if key not in made:
            torch.manual_seed(0)
            model = transformers.Phi3ForCausalLM(tiny_hf_config(kind)).eval()
            with torch.no_grad():  # larger-than-init weights so errors are not hidden by tiny logits
                for p in model.parameters():
                    if p.dim() == 2:
                        p.normal_(0.0, 0.08)
            model = model.to(getattr(torch, dtype))
            out = tmp_path_factory.mktemp(key)
            model.save_pretrained(out)
            made[key] = out
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint folder, its Q4_0 GGUF): a random Phi-3 (hidden 256, 2 layers, the first 1024
    tokens of the Phi-3 vocabulary) for the command-line tests; quantized by `pocketlm quantize`."""
    from quant_helpers import make_checkpoint

    from pocketlm.quantize.pipeline import quantize_checkpoint

    root = tmp_path_factory.mktemp("tiny-model")
    ckpt = make_checkpoint(root / "ckpt", hidden=256, layers=2, vocab=1024)
    gguf = root / "tiny-q4_0.gguf"
    quantize_checkpoint(ckpt, gguf, recipe="q4_0", method="rtn", progress=False)
    return ckpt, gguf
