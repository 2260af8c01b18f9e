"""The public API end to end on the built-in model, and `pocketlm demo` as a user runs it."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

import pocketlm
from pocketlm.demo import BUILTIN_DIR
from pocketlm.reference import Phi3Reference


def test_api_quantize_load_generate(tmp_path):
    ckpt = pocketlm.load_checkpoint(BUILTIN_DIR)
    out = tmp_path / "builtin-q8_0.gguf"
    summary = pocketlm.quantize_model(ckpt.path, out, recipe="q8_0", method="rtn")
    assert out.is_file() and 8.0 < summary.bits_per_weight < 9.0
    model = pocketlm.load(out, threads=1, ctx=256)
    run = pocketlm.generate(model, "KING.\nNow, my lords,", max_tokens=16, temperature=0, ignore_eos=True)
    text = "".join(run)
    assert len(run.tokens) == 16 and text.strip()
    # Q8_0 barely moves the model: its greedy tokens are the fp32 reference's
    ref = Phi3Reference.from_checkpoint(ckpt)
    ids = model.tokenizer.encode("KING.\nNow, my lords,")
    cache = ref.new_cache()
    logits = ref.forward(ids, cache)[-1]
    expected = []
    for _ in range(16):
        expected.append(int(np.argmax(logits)))
        logits = ref.forward(expected[-1:], cache)[-1]
    assert run.tokens[:8] == expected[:8]


def test_demo_runs_end_to_end(tmp_path):
    """`pocketlm demo` in a fresh process: every stage, every artefact in the folder it names."""
    cmd = [sys.executable, "-P", "-m", "pocketlm.cli", "demo", "-o", str(tmp_path / "d"), "-n", "24"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    for stage in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"):
        assert stage in res.stderr
    names = {p.name for p in (tmp_path / "d").iterdir()}
    assert {"builtin-pocket.gguf", "onnx", "bench.json"} <= names
    # the phone table is a phi-3-mini-sized file's (issue 17), not the 4 M-parameter model's
    assert "PHI-3-MINI-SIZED" in res.stdout and "CALIBRATED" in res.stdout and "iPhone" in res.stdout
