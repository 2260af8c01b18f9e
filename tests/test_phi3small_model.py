"""pocketlm on Phi-3-small (`Phi3SmallForCausalLM`) checkpoints against the independent torch oracle
(tests/torch_phi3small.py, itself checked in tests/test_phi3small_oracle.py).

Written against pocketlm's public interfaces (Checkpoint.open, Phi3Reference.from_checkpoint,
new_cache, forward, `pocketlm info`).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from phi3small_fixtures import dummy_token_ids, make_phi3small_checkpoint
from torch_phi3small import TorchPhi3Small

from pocketlm.checkpoint import Checkpoint
from pocketlm.cli import main
from pocketlm.reference import Phi3Reference

VOCAB = 352
ORIGINAL_MAX = 64  # original_max_position_embeddings of the 128k-style fixtures (max 512)
WINDOW = 2 * 16  # local_blocks * block_size of the default fixture: sparse != dense past this


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Factory: keyword arguments of make_phi3small_checkpoint -> folder (cached per module)."""
    made: dict[tuple, Path] = {}

    def make(**kw) -> Path:
        key = tuple(sorted(kw.items()))
        if key not in made:
            made[key] = make_phi3small_checkpoint(tmp_path_factory.mktemp("p3s"), **kw)
        return made[key]

    return make


def tokens(n: int, seed: int = 0) -> list[int]:
    """bos, then ordinary ids (below the 96 special ids at the top of the vocabulary)."""
    bos = VOCAB - 96 + 1
    return [bos, *np.random.default_rng(seed).integers(0, VOCAB - 96, n - 1).tolist()]


def compare(ours: np.ndarray, expected: np.ndarray) -> float:
    """Max error over the samplable ids relative to the oracle's largest logit there; the dummy ids
    must be masked in ours (float32 min as HF, or -inf as vLLM/mlx: anything <= -1e30)."""
    ours = np.asarray(ours, dtype=np.float64)
    assert ours.shape == expected.shape
    dummy = np.zeros(VOCAB, dtype=bool)
    dummy[dummy_token_ids(VOCAB)] = True
    assert np.all(ours[:, dummy] <= -1e30), "dummy ids are not masked"
    assert np.all(np.isfinite(ours[:, ~dummy]))
    return float(np.max(np.abs(ours[:, ~dummy] - expected[:, ~dummy])) / np.max(np.abs(expected[:, ~dummy])))


def reference(folder: Path) -> Phi3Reference:
    return Phi3Reference.from_checkpoint(Checkpoint.open(folder))


# (fixture keywords, sequence length). 8k-style hetero/homo, bf16 and f32, GQA with 2 KV heads, a
# head sliding step of 2 (vert_stride 8 over 4 heads), dense every 3rd layer, 128k-style below and above
# original_max (whole sequence: the long factors for every position).
WHOLE = [
    ({}, 200),
    ({"homo_head": True}, 200),
    ({"dtype": "f32", "shards": 1}, 200),
    ({"heads": 8, "kv_heads": 2, "seed": 3}, 150),
    ({"vert_stride": 8, "local_blocks": 3, "seed": 4}, 200),
    ({"dense_every_n": 3, "layers": 3, "seed": 5}, 120),
    ({"longrope": "128k"}, 60),
    ({"longrope": "128k"}, 150),
    ({"longrope": "128k", "mscales": (0.0, 0.0), "dtype": "f32"}, 150),
]


@pytest.mark.parametrize(("kw", "seq"), WHOLE, ids=[
    "hetero", "homo", "f32", "gqa2", "step2", "dense-every-3", "128k-short", "128k-long", "128k-default-mscale"])
def test_whole_sequence_matches_oracle(ckpt, kw, seq):
    folder = ckpt(**kw)
    toks = tokens(seq, seed=seq)
    expected = TorchPhi3Small(folder).forward(toks).numpy()
    ours = reference(folder).forward(toks)
    assert compare(ours, expected) < 1e-4


# Prompt, then one token at a time past the local window (and, for 128k, across original_max: keys
# cached before the switch keep their short-factor rotation, as in HF).
CACHED = [({}, 20, 100), ({"homo_head": True}, 20, 80), ({"dtype": "f32", "shards": 1}, 10, 60),
          ({"longrope": "128k"}, 40, 90), ({"longrope": "128k"}, 70, 100)]


@pytest.mark.parametrize(("kw", "prefill", "seq"), CACHED,
                         ids=["hetero", "homo", "f32", "128k-crossing", "128k-long"])
def test_cache_decode_matches_oracle(ckpt, kw, prefill, seq):
    folder = ckpt(**kw)
    toks = tokens(seq, seed=prefill)
    expected = TorchPhi3Small(folder).incremental(toks, prefill).numpy()
    ref = reference(folder)
    cache = ref.new_cache()
    ours = [ref.forward(toks[:prefill], cache)]
    ours += [ref.forward([t], cache) for t in toks[prefill:]]
    assert cache.length == seq
    assert compare(np.concatenate(ours), expected) < 1e-4


def test_block_pattern_is_not_dense_attention(ckpt):
    """Not vacuous: past the local window the oracle's sparse and dense models differ by far more than
    the tolerance, so matching the oracle means applying the pattern."""
    folder = ckpt()
    toks = tokens(120)
    sparse = TorchPhi3Small(folder).forward(toks).numpy()
    dense = TorchPhi3Small(folder, force_dense=True).forward(toks).numpy()
    ours = reference(folder).forward(toks)
    assert compare(ours, sparse) < 1e-4
    assert compare(ours[WINDOW:], dense[WINDOW:]) > 1e-2


def test_info_names_phi3_small_and_its_block_pattern(ckpt, capsys):
    folder = ckpt(block_size=16, local_blocks=3, vert_stride=5, seed=6)
    capsys.readouterr()
    assert main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"phi-?3-?small", out, re.IGNORECASE), out
    assert re.search(r"sparse", out, re.IGNORECASE), out
    pattern = "\n".join(line for line in out.splitlines() if re.search(r"sparse|block|stride|local", line, re.I))
    assert {"16", "3", "5"} <= set(re.findall(r"\d+", pattern)), out  # block size, local blocks, stride


def test_info_describes_the_128k_variant(ckpt, capsys):
    capsys.readouterr()
    assert main(["info", str(ckpt(longrope="128k"))]) == 0
    out = capsys.readouterr().out
    assert re.search(r"phi-?3-?small", out, re.IGNORECASE) and "LongRoPE" in out, out
