"""The quality harness: KLD / PPL / top-1 of a GGUF against the float reference."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from pocketlm.cli import main as cli_main
from pocketlm.errors import PocketLMError
from pocketlm.export.gguf_export import export_gguf
from pocketlm.quantize.evaluate import eval_chunks, evaluate, gguf_logits
from pocketlm.quantize.pipeline import quantize_checkpoint
from pocketlm.tokenizer import Tokenizer

_spec = importlib.util.spec_from_file_location("quant_helpers", Path(__file__).with_name("quant_helpers.py"))
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)

EVAL = dict(n_tokens=192, ctx=64)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval")
    ckpt = helpers.make_checkpoint(folder / "ckpt", seed=1)
    out = {"ckpt": ckpt, "f32": export_gguf(ckpt, folder / "f32.gguf", "f32"),
           "f16": export_gguf(ckpt, folder / "f16.gguf", "f16")}
    for recipe in ("q4_0", "q8_0"):
        out[recipe] = Path(quantize_checkpoint(ckpt, folder / f"{recipe}.gguf", recipe=recipe).path)
    return out


def test_f32_file_of_the_same_checkpoint_has_zero_kld(files):
    r = evaluate(files["f32"], files["ckpt"], **EVAL)
    assert r.kld == 0.0 and r.top1 == 1.0 and r.ppl_quant == r.ppl_ref
    assert r.chunks == 3 and r.scored_tokens == 3 * 63 and r.text == "corpus:heldout"


def test_quantized_files_have_positive_ordered_kld(files):
    q4 = evaluate(files["q4_0"], files["ckpt"], **EVAL)
    q8 = evaluate(files["q8_0"], files["ckpt"], **EVAL)
    assert 0 < q8.kld < q4.kld
    assert q4.top1 < 1.0
    assert (q4.recipe, q4.method) == ("q4_0", "rtn")


def test_kld_and_perplexity_match_a_torch_oracle(files):
    """Reference logits from transformers' Phi3ForCausalLM, KL and NLL by torch."""
    import torch
    import torch.nn.functional as F
    import transformers

    from pocketlm.corpus import read_split

    tok = Tokenizer.from_hf_dir(files["ckpt"])
    tokens = eval_chunks(tok, read_split("heldout"), "heldout", EVAL["n_tokens"], EVAL["ctx"])
    model = transformers.Phi3ForCausalLM.from_pretrained(files["ckpt"], torch_dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.as_tensor(tokens)).logits[:, :-1].double()
    quant = torch.as_tensor(gguf_logits(files["q4_0"], tokens))[:, :-1].double()
    lp_ref, lp_q = F.log_softmax(ref, -1), F.log_softmax(quant, -1)
    kld = F.kl_div(lp_q, lp_ref, log_target=True, reduction="none").sum(-1).mean().item()
    target = torch.as_tensor(tokens[:, 1:])
    ppl_ref = torch.exp(F.nll_loss(lp_ref.reshape(-1, lp_ref.shape[-1]), target.reshape(-1))).item()
    r = evaluate(files["q4_0"], files["ckpt"], **EVAL)
    assert r.kld == pytest.approx(kld, rel=2e-3)
    assert r.ppl_ref == pytest.approx(ppl_ref, rel=1e-4)
    assert r.top1 == pytest.approx((lp_ref.argmax(-1) == lp_q.argmax(-1)).double().mean().item(), abs=0.02)


def test_evaluates_llama_cpps_own_files_and_names_missing_types(files, tmp_path):
    q4km = helpers.llama_cpp_quantize(files["f16"], tmp_path / "q4_k_m.gguf", "Q4_K_M")
    r = evaluate(q4km, files["ckpt"], **EVAL)
    assert 0 < r.kld < 1 and np.isfinite(r.ppl_quant)
    iq4 = helpers.llama_cpp_quantize(files["f16"], tmp_path / "iq4_nl.gguf", "IQ4_NL")
    with pytest.raises(PocketLMError, match="IQ4_NL"):
        evaluate(iq4, files["ckpt"], **EVAL)


def test_bad_text(files, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(PocketLMError, match="empty"):
        evaluate(files["q4_0"], files["ckpt"], text=empty, **EVAL)
    calib_work = tmp_path / "tempest_gut.txt"
    calib_work.write_text("Full fathom five thy father lies.\n" * 100)
    with pytest.raises(PocketLMError, match="calibration"):
        evaluate(files["q4_0"], files["ckpt"], text=calib_work, **EVAL)


def test_cli_eval_json(files, capsys):
    rc = cli_main(["eval", str(files["q8_0"]), "--ref", str(files["ckpt"]), "--tokens", "126", "--ctx", "64",
                   "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["chunks"] == 2 and result["kld"] > 0 and 0 < result["top1"] <= 1
