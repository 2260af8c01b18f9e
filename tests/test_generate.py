"""Sampling, the generation API and the `run`/`chat` commands.

- Sampler: each filter against a hand-worked example, the sampled distribution against the
  softmax it should follow, the seed.
- generate(): stop strings, stop tokens, max tokens, --ignore-eos, the context end, streaming
  text equal to the tokenizer's decode of the tokens.
- llama.cpp (llama-cpp-python) on the same file: the built-in trained model, quantized to Q4_0,
  Q8_0 and Q4_K by the project's formats, decodes the same 64 greedy tokens.
- `pocketlm run` / `pocketlm chat` as subprocesses: text on stdout, speeds on stderr, errors exit 2.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from quant_helpers import NEAR_TIE, llama_cpp_greedy  # tests/ is on sys.path (conftest)

from pocketlm.checkpoint import Checkpoint
from pocketlm.errors import PocketLMError
from pocketlm.export.gguf_reader import GGUFReader
from pocketlm.quantize.formats import GGMLType
from pocketlm.reference import Phi3Reference
from pocketlm.runtime.generate import _split_stop, generate
from pocketlm.runtime.model import load
from pocketlm.runtime.sampling import Sampler, SamplingParams, apply_repeat_penalty, candidates, softmax
from pocketlm.tokenizer import Tokenizer

sys.path.insert(0, str(Path(__file__).parent))
files = importlib.import_module("gguf_files")

REPO = Path(__file__).resolve().parents[1]
BUILTIN = REPO / "pocketlm" / "builtin"
Q = GGMLType


# ---------------------------------------------------------------------------- sampler

def test_repeat_penalty_divides_positive_and_multiplies_negative_logits():
    logits = np.array([2.0, -1.0, 0.5, 3.0], np.float32)
    out = apply_repeat_penalty(logits, [0, 1, 1], 2.0)
    np.testing.assert_allclose(out, [1.0, -2.0, 0.5, 3.0])
    assert logits[0] == 2.0  # the caller's array is not modified


def test_candidates_top_k_top_p_min_p_by_hand():
    logits = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05], np.float32))
    ids, _ = candidates(logits, top_k=3, top_p=1.0, min_p=0.0)
    assert ids.tolist() == [0, 1, 2]
    ids, _ = candidates(logits, top_k=0, top_p=0.7, min_p=0.0)      # 0.5 + 0.2 reaches 0.7
    assert ids.tolist() == [0, 1]
    ids, _ = candidates(logits, top_k=0, top_p=0.71, min_p=0.0)
    assert ids.tolist() == [0, 1, 2]
    ids, _ = candidates(logits, top_k=0, top_p=1.0, min_p=0.25)     # keep p >= 0.125
    assert ids.tolist() == [0, 1, 2]
    ids, _ = candidates(logits, top_k=0, top_p=1.0, min_p=0.5)      # keep p >= 0.25
    assert ids.tolist() == [0]
    # top-p renormalises after top-k: 0.5 / 0.7 = 0.714 reaches 0.7 on its own
    ids, _ = candidates(logits, top_k=2, top_p=0.7, min_p=0.0)
    assert ids.tolist() == [0]


def test_greedy_and_top_k_1_take_the_argmax_with_the_lowest_id_on_ties():
    logits = np.array([0.1, 3.0, 3.0, -2.0], np.float32)
    assert Sampler(SamplingParams(temperature=0))(logits) == 1
    assert Sampler(SamplingParams(temperature=1.5, top_k=1, seed=3))(logits) == 1


def test_sampled_frequencies_follow_the_tempered_softmax():
    logits = np.array([1.0, 0.5, 0.0, -0.5, -3.0], np.float32)
    sampler = Sampler(SamplingParams(temperature=0.7, top_k=0, top_p=1.0, min_p=0.0, seed=11))
    n = 20000
    counts = np.bincount([sampler(logits) for _ in range(n)], minlength=5)
    expected = softmax(logits / 0.7) * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 20.5  # chi-square, 4 degrees of freedom, p = 0.0004


def test_seed_makes_sampling_reproducible():
    logits = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    a = Sampler(SamplingParams(seed=5, top_k=0, top_p=1.0, min_p=0.0, temperature=1.0))
    b = Sampler(SamplingParams(seed=5, top_k=0, top_p=1.0, min_p=0.0, temperature=1.0))
    assert [a(logits) for _ in range(50)] == [b(logits) for _ in range(50)]


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0.0), dict(top_p=1.5), dict(min_p=2.0),
                                 dict(top_k=-1), dict(repeat_penalty=0.0)])
def test_bad_sampling_parameters_are_clear_errors(bad):
    with pytest.raises(PocketLMError, match="sampling"):
        Sampler(SamplingParams(**bad))


def test_split_stop_holds_back_a_possible_stop_prefix():
    assert _split_stop("hello wor", ["world"]) == ("hello ", "wor", False)
    assert _split_stop("hello world!", ["world"]) == ("hello ", "", True)
    assert _split_stop("abc", ["xyz"]) == ("abc", "", False)
    assert _split_stop("hello wor", ["world"], final=True) == ("hello wor", "", False)


# ---------------------------------------------------------------------------- built-in model files

BLOCK_TYPES = (Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q4_K, Q.Q6_K)
LLAMA_QUANTIZE = """
import ctypes, sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
p.nthread = 1
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))
"""


@pytest.fixture(scope="module")
def builtin_files(tmp_path_factory) -> dict[GGMLType | str, Path]:
    """The built-in trained model as GGUF: each block type written by the project's formats and
    writer, and "llama-q4_0" made by llama.cpp's own quantizer from our F16 export."""
    ckpt = Checkpoint.open(BUILTIN)
    tok = Tokenizer.from_hf_dir(ckpt.tokenizer_dir)
    weights = files.longrope_weights(ckpt.config, {n: ckpt.tensor(n) for n in ckpt.names()})
    out = tmp_path_factory.mktemp("builtin")
    made: dict[GGMLType | str, Path] = {
        t: files.write_gguf(out / f"builtin-{t.name}.gguf", ckpt.config, weights, t, tok.to_gguf_fields())
        for t in (*BLOCK_TYPES, Q.F16)}
    made["llama-q4_0"] = out / "builtin-llama-q4_0.gguf"
    res = subprocess.run([sys.executable, "-P", "-c", LLAMA_QUANTIZE, str(made[Q.F16]), str(made["llama-q4_0"])],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return made


@pytest.mark.parametrize("kind", [*BLOCK_TYPES, "llama-q4_0"], ids=lambda t: getattr(t, "name", t))
def test_builtin_logits_agree_with_reference_within_1e_2(builtin_files, kind):
    """Relative error of the logits (Frobenius) against the fp32 reference on the file's own
    dequantized weights, whole prompt and token by token (int8 activations included)."""
    path = builtin_files[kind]
    model = load(path, threads=2, ctx=128)
    ids = model.tokenizer.encode("KING RICHARD:\nNow is the winter of our discontent made glorious summer")
    with GGUFReader(path) as r:
        cfg = model.cfg
        ref = Phi3Reference(cfg, {n: r.dequantize(n) for n in r.tensors})
    want = ref.forward(ids)
    whole = model.forward(ids, all_logits=True)
    model.reset()
    steps = np.stack([model.forward([t]) for t in ids])
    for got in (whole, steps):
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2
        assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9


@pytest.fixture(scope="module")
def model(builtin_files):
    return load(builtin_files[Q.Q8_0], threads=2, ctx=256)


def greedy_text(model, prompt: str, n: int, **kw) -> tuple[list[int], str, str]:
    model.reset()
    gen = generate(model, prompt, max_tokens=n, temperature=0, **kw)
    text = "".join(gen)
    return gen.tokens, text, gen.finish_reason


def test_streamed_text_equals_the_decoded_tokens(model):
    """The stream continues the prompt: prompt text + streamed text == decode(prompt + tokens)."""
    tok = model.tokenizer
    tokens, text, reason = greedy_text(model, "KING.\nNow, my lords,", 40, ignore_eos=True)
    assert reason == "length" and len(tokens) == 40
    assert tok.pieces[tokens[0]].startswith("▁")  # the first token carries a real space
    prompt = tok.encode("KING.\nNow, my lords,")
    assert tok.decode(prompt) + text == tok.decode(prompt + tokens)


def test_stop_string_cuts_the_text_before_it(model):
    _, text, _ = greedy_text(model, "ROMEO:", 40, ignore_eos=True)
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip(), "the greedy text is too uniform for this test"
    _, cut, reason = greedy_text(model, "ROMEO:", 40, ignore_eos=True, stop=[stop])
    assert reason == "stop"
    assert cut == text[:text.index(stop)]


def test_stop_token_and_ignore_eos(model):
    tokens, _, _ = greedy_text(model, "JULIET:", 30, ignore_eos=True)
    i = next(i for i in range(3, 30) if tokens[i] not in tokens[:i])   # its first appearance
    got, _, reason = greedy_text(model, "JULIET:", 30, stop_tokens=[tokens[i]])
    assert reason == "stop" and got == tokens[:i]
    # the same token as the tokenizer's eos: it stops, unless ignore_eos
    saved = model.tokenizer.eos_id
    model.tokenizer.eos_id = tokens[i]
    try:
        assert greedy_text(model, "JULIET:", 30)[0] == tokens[:i]
        got, _, reason = greedy_text(model, "JULIET:", 30, ignore_eos=True)
        assert reason == "length" and got == tokens
    finally:
        model.tokenizer.eos_id = saved


def test_generation_stops_at_the_context_end(builtin_files):
    small = load(builtin_files[Q.Q8_0], threads=1, ctx=24)
    gen = generate(small, "KING:", max_tokens=100, temperature=0, ignore_eos=True)
    list(gen)
    prompt_len = len(small.tokenizer.encode("KING:"))
    assert gen.finish_reason == "context"
    assert len(gen.tokens) == 24 - prompt_len + 1  # the last sampled token needs no cache slot
    with pytest.raises(PocketLMError, match="more than the context"):
        generate(small, "to be or not to be " * 10, max_tokens=4)


def test_stats_report_speeds_and_kernel_share(model):
    greedy_text(model, "ROMEO:", 20, ignore_eos=True)
    s = model.stats
    assert s.prefill_tokens > 0 and s.decode_tokens == 19
    assert s.prefill_tps > 0 and s.decode_tps > 0 and 0.0 < s.python_overhead < 1.0


# ---------------------------------------------------------------------------- llama.cpp greedy

@pytest.mark.parametrize("gtype", [*BLOCK_TYPES, "llama-q4_0"], ids=lambda t: getattr(t, "name", t))
def test_greedy_64_tokens_equal_llama_cpp_on_the_same_file(builtin_files, gtype):
    """Free-running, our 64 greedy tokens equal llama.cpp's up to the first near-tie (if any).
    Then, fed llama.cpp's own 64-token greedy path, we pick its token at every step except at
    near-ties: every one of the 64 steps is compared, not just those before a divergence."""
    path = builtin_files[gtype]
    model = load(path, threads=1, ctx=256)
    ids = model.tokenizer.encode("ROMEO:\nBut soft, what light through yonder window breaks?\n")
    tokens, gaps = llama_cpp_greedy(path, ids, 64, threads=1)
    theirs = {"tokens": tokens, "gaps": gaps}
    gen = generate(model, ids, max_tokens=64, temperature=0, ignore_eos=True)
    list(gen.token_ids())
    same = next((i for i, (a, b) in enumerate(zip(gen.tokens, theirs["tokens"], strict=True)) if a != b), 64)
    if same < 64:
        assert theirs["gaps"][same] < NEAR_TIE, (
            f"diverged at token {same} without a near-tie (llama.cpp top-2 gap {theirs['gaps'][same]:.3f})")
    model.reset()
    logits = model.forward(ids)
    differ = []
    for i, tok in enumerate(theirs["tokens"]):
        ours = int(np.argmax(logits))
        if ours != tok:
            differ.append(i)
            assert theirs["gaps"][i] < NEAR_TIE, f"step {i}: we pick {ours}, llama.cpp {tok}"
        logits = model.forward([tok])
    print(f"{getattr(gtype, 'name', gtype)}: free-running {same} of 64 tokens equal; on llama.cpp's path "
          f"{64 - len(differ)} of 64 choices equal (the others at near-ties: steps {differ})")
    assert len(differ) <= 2


# ---------------------------------------------------------------------------- CLI

def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-P", "-m", "pocketlm.cli", *args], capture_output=True, text=True,
                          input=stdin, timeout=300)


def test_run_streams_the_api_text_and_reports_speeds(builtin_files, model):
    path = builtin_files[Q.Q8_0]
    _, text, _ = greedy_text(model, "ROMEO:", 24, ignore_eos=True)
    res = cli("run", str(path), "-p", "ROMEO:", "-n", "24", "--temp", "0", "--ignore-eos", "--threads", "1")
    assert res.returncode == 0, res.stderr
    assert res.stdout == text + "\n"
    assert "tok/s" in res.stderr and "generated 24 tokens" in res.stderr
    quiet = cli("run", str(path), "-p", "ROMEO:", "-n", "4", "--temp", "0", "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_run_sampling_with_a_seed_is_reproducible(builtin_files):
    path = builtin_files[Q.Q8_0]
    args = ("run", str(path), "-p", "KING:", "-n", "16", "--temp", "0.9", "--top-k", "20", "--top-p", "0.9",
            "--min-p", "0.02", "--repeat-penalty", "1.1", "--seed", "42", "--quiet", "--kv", "int8")
    a, b = cli(*args), cli(*args)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.strip()


def test_chat_from_a_pipe_keeps_the_history(builtin_files, model):
    path = builtin_files[Q.Q8_0]
    res = cli("chat", str(path), "-n", "12", "--temp", "0", "--quiet", stdin="Hello there\nAnd then?\n")
    assert res.returncode == 0, res.stderr
    answers = res.stdout.split("\n")
    # the same two turns through the API, the second prompt holding the first exchange
    tok = model.tokenizer
    messages = [{"role": "user", "content": "Hello there"}]
    model.reset()
    first = generate(model, tok.encode(tok.apply_chat_template(messages)), max_tokens=12, temperature=0)
    first_text = "".join(first)
    messages += [{"role": "assistant", "content": first_text}, {"role": "user", "content": "And then?"}]
    second_ids = tok.encode(tok.apply_chat_template(messages))
    second = generate(model, second_ids, max_tokens=12, temperature=0)
    second_text = "".join(second)
    # the shared prefix came from the cache (re-tokenizing the answer text may differ from the
    # sampled ids after the first special token, as with llama.cpp, so not the whole first turn)
    first_prompt = tok.encode(tok.apply_chat_template(messages[:1]))
    assert model.last_prefill_tokens <= len(second_ids) - len(first_prompt)
    assert res.stdout == f"{first_text}\n{second_text}\n", answers


@pytest.mark.parametrize("args, message", [
    (("--threads", "0"), "--threads must be >= 1"),
    (("-p", "to be or not to be " * 40, "--ctx", "32"), "more than the context of 32"),
    (("--ctx", "999999"), "exceeds the model's maximum"),
])
def test_run_bad_input_exits_2_with_a_clear_message(builtin_files, args, message):
    path = builtin_files[Q.Q8_0]
    base = ["run", str(path), "-n", "4"]
    if "-p" not in args:
        base += ["-p", "hi"]
    res = cli(*base, *args)
    assert res.returncode == 2
    assert message in res.stderr and "Traceback" not in res.stderr


def test_run_refuses_a_file_that_is_not_gguf(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf file at all, really not" * 4)
    res = cli("run", str(bad), "-p", "hi")
    assert res.returncode == 2 and "not a GGUF file" in res.stderr
