"""Faults that bad input and a hostile environment found (issue 10), each through the command line:
one clear error line naming the file and the problem, exit code 2, nothing left behind.

In-process through `pocketlm.cli.main` where a Python exception is the failure mode; as real
subprocesses where the fault is the process's environment (a closed pipe, a full disk, SIGTERM).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pocketlm.cli import main
from pocketlm.errors import PocketLMError
from pocketlm.export.gguf_reader import GGUFReader
from pocketlm.quantize.formats import BLOCK_SHAPE, GGMLType
from pocketlm.threads import available_cpus, check_threads

CLI = [sys.executable, "-P", "-m", "pocketlm.cli"]  # -P: the installed package, not ./pocketlm


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `pocketlm ARGV` in this process; argparse's exit counts too."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def corrupt_scale(src: Path, dst: Path, tensor: str, block: int, value: float = np.nan) -> Path:
    """A copy of `src` with the fp16 scale `d` of one block of `tensor` set to `value`."""
    data = bytearray(src.read_bytes())
    with GGUFReader(src) as r:
        t = r.tensors[tensor]
        _, nbytes = BLOCK_SHAPE[t.gtype]
        at = t.offset + block * nbytes + (208 if t.gtype == GGMLType.Q6_K else 0)  # Q6_K keeps d last
    data[at:at + 2] = np.array([value], np.float16).tobytes()
    dst.write_bytes(bytes(data))
    return dst


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ----------------------------------------------------------------------------- config.json

@pytest.mark.parametrize("content", ["[]", '"x"', "3", "null", "{", "\xff"])
def test_config_json_that_is_not_an_object(tmp_path, tiny_model, capsys, content):
    ckpt, _ = tiny_model
    bad = tmp_path / "ckpt"
    shutil.copytree(ckpt, bad)
    (bad / "config.json").write_bytes(content.encode("latin-1"))
    for argv in (["info", bad], ["quantize", bad, "-o", tmp_path / "out" / "q.gguf", "-q"]):
        (tmp_path / "out").mkdir(exist_ok=True)
        code, _, err = run_main(capsys, *argv)
        assert code == 2
        line = one_error_line(err)
        assert str(bad / "config.json") in line
        assert ("expected a JSON object" in line) == (content in ("[]", '"x"', "3", "null")), line
        assert leftovers(tmp_path / "out") == []


def test_info_on_a_missing_path_says_it_does_not_exist(tmp_path, capsys):
    for missing in (tmp_path / "missing.gguf", tmp_path / "missing-folder"):
        code, _, err = run_main(capsys, "info", missing)
        assert code == 2
        assert one_error_line(err) == f"pocketlm: error: {missing}: does not exist"


def test_tokenizer_json_that_is_not_a_tokenizer(tmp_path, tiny_model, capsys):
    ckpt, _ = tiny_model
    bad = tmp_path / "ckpt"
    shutil.copytree(ckpt, bad)
    for content in ("[1, 2]", '{"model": 3}', '{"model": {"vocab": {}}, "added_tokens": [{"id": 1}]}'):
        (bad / "tokenizer.json").write_text(content)
        code, _, err = run_main(capsys, "info", bad)
        assert code == 2 and str(bad / "tokenizer.json") in one_error_line(err)


# ------------------------------------------------------------------------- invalid UTF-8 tokens

@pytest.fixture(scope="module")
def invalid_utf8_gguf(tiny_model, tmp_path_factory) -> Path:
    """The tiny model with the word-start mark U+2581 of every token string (bytes e2 96 81) turned
    into ff 96 81: token strings that are not UTF-8, the same length, the file otherwise intact."""
    _, src = tiny_model
    data = src.read_bytes()
    with GGUFReader(src) as r:
        start = min(t.offset for t in r.tensors.values())
    head = data[:start]
    assert head.count(b"\xe2\x96\x81") > 100
    out = tmp_path_factory.mktemp("utf8") / "invalid-utf8.gguf"
    out.write_bytes(head.replace(b"\xe2\x96\x81", b"\xff\x96\x81") + data[start:])
    return out


def test_run_writes_invalid_token_bytes_as_replacement_characters(invalid_utf8_gguf, capsys):
    code, out, err = run_main(capsys, "run", invalid_utf8_gguf, "-p", "hi there", "-n", "40", "--temp", "0",
                              "--quiet")
    assert code == 0, err
    assert "\ufffd" in out  # the oracle for the replacement: bytes.decode("utf-8", "replace")
    out.encode("utf-8")  # no lone surrogate reached the output


def test_decoders_replace_invalid_utf8_like_bytes_decode(invalid_utf8_gguf):
    from pocketlm.tokenizer import Tokenizer

    with GGUFReader(invalid_utf8_gguf) as r:
        tok = Tokenizer.from_gguf_fields(r.tokenizer_fields(), invalid_utf8_gguf)
    rng = np.random.default_rng(0)
    ids = [int(i) for i in rng.integers(3, tok.vocab_size, 300)]
    raw = b"".join(tok.token_bytes(i) for i in ids)
    assert b"\xff\x96\x81" in raw  # the file's own bytes, not a re-encoding
    expected = raw.decode("utf-8", errors="replace")
    text = tok.decode(ids)
    assert text == tok._strip_prefix(expected) and "\ufffd" in text
    stream = tok.stream_decoder()
    assert "".join(stream.push(i) for i in ids) + stream.flush() == text
    text.encode("utf-8")


def test_run_survives_a_stdout_that_cannot_encode(invalid_utf8_gguf):
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    res = subprocess.run([*CLI, "run", str(invalid_utf8_gguf), "-p", "hi", "-n", "20", "--temp", "0", "--quiet"],
                         capture_output=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr.decode()
    assert b"Traceback" not in res.stderr


def test_chat_reads_undecodable_input_and_writes_what_it_generates(invalid_utf8_gguf):
    res = subprocess.run([*CLI, "chat", str(invalid_utf8_gguf), "-n", "12", "--temp", "0", "--quiet"],
                         input=b"caf\xe9 \xff hello\n/exit\n", capture_output=True, timeout=120)
    assert res.returncode == 0, res.stderr.decode()
    assert b"Traceback" not in res.stderr
    res.stdout.decode("utf-8")  # strict: what chat wrote is valid UTF-8


# ----------------------------------------------------------------------- stdout closed or full

def test_closed_stdout_ends_quietly(tiny_model):
    _, gguf = tiny_model
    for argv in (["run", str(gguf), "-p", "hi", "-n", "200", "--ignore-eos"], ["info", str(gguf)]):
        r, w = os.pipe()
        os.close(r)  # the reader is gone before the first write: `... | head -c 0`
        try:
            res = subprocess.run([*CLI, *argv], stdout=w, stderr=subprocess.PIPE, timeout=120)
        finally:
            os.close(w)
        assert res.returncode == 128 + signal.SIGPIPE, res.stderr.decode()
        assert res.stderr == b""


def test_head_reading_a_few_bytes_ends_generation_quietly(tiny_model):
    _, gguf = tiny_model
    proc = subprocess.Popen([*CLI, "run", str(gguf), "-p", "hi", "-n", "2000", "--ignore-eos", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.read(5)
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert len(first) == 5
    assert proc.returncode in (0, 128 + signal.SIGPIPE)  # 0 only if it finished before head closed
    assert err == b""


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_full_stdout_is_one_error_line(tiny_model):
    _, gguf = tiny_model
    for argv in (["run", str(gguf), "-p", "hi", "-n", "20"], ["info", str(gguf)]):
        with open("/dev/full", "w") as full:
            res = subprocess.run([*CLI, *argv], stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
        assert res.returncode == 2
        assert one_error_line(res.stderr) == ("pocketlm: error: cannot write to standard output: "
                                              "No space left on device")


# ------------------------------------------------------------------------- corrupt block scales

@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_eval_refuses_a_corrupt_block_scale(tiny_model, tmp_path, capsys, value):
    ckpt, gguf = tiny_model
    bad = corrupt_scale(gguf, tmp_path / "bad.gguf", "blk.1.ffn_down.weight", 3, value)
    for extra in ([], ["--json"]):
        code, out, err = run_main(capsys, "eval", bad, "--ref", ckpt, "--tokens", "128", "--ctx", "64", *extra)
        assert code == 2 and out == ""
        assert one_error_line(err) == (f"pocketlm: error: {bad}: tensor 'blk.1.ffn_down.weight' is corrupt: "
                                       f"block 3 has a NaN or infinite scale")
    code, _, err = run_main(capsys, "run", bad, "-p", "hi", "-n", "2")  # the message `run` gives
    assert code == 2 and "tensor 'blk.1.ffn_down.weight' is corrupt: block 3 has a NaN" in err


def test_eval_json_of_a_sound_file_is_strict_json(tiny_model, capsys):
    import json

    ckpt, gguf = tiny_model
    code, out, err = run_main(capsys, "eval", gguf, "--ref", ckpt, "--tokens", "128", "--ctx", "64", "--json")
    assert code == 0, err
    result = json.loads(out, parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    assert 0 <= result["kld"] < 1 and result["ppl_quant"] > 1


def test_onnx_export_names_the_corrupt_tensor_and_block(tiny_model, tmp_path, capsys):
    pytest.importorskip("onnx")
    from pocketlm.quantize.pipeline import quantize_checkpoint

    ckpt, _ = tiny_model
    q4k = quantize_checkpoint(ckpt, tmp_path / "q4_k.gguf", recipe="q4_k_m", method="rtn", progress=False)
    with GGUFReader(q4k.path) as r:
        name = next(n for n, t in r.tensors.items() if t.type_name == "Q4_K" and n.startswith("blk."))
    bad = corrupt_scale(Path(q4k.path), tmp_path / "bad.gguf", name, 2)
    out = tmp_path / "onnx"
    code, _, err = run_main(capsys, "export", bad, "--onnx", out)
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert line == f"pocketlm: error: {bad}: tensor {name!r} is corrupt: block 2 has a NaN or infinite scale"
    assert "round in float32" not in err and not out.exists()
    assert leftovers(tmp_path) == sorted(["q4_k.gguf", "bad.gguf"])


def test_onnx_affine_check_blames_corruption_not_rounding_for_types_the_kernel_lacks():
    from pocketlm.export import onnx_weights as ow
    from pocketlm.quantize.formats import GGML_TYPE_IDS

    codes = np.zeros((2, 4, 32), np.uint8)
    scales = np.ones((2, 4), np.float32)
    mins = np.zeros((2, 4), np.float32)
    mins[1, 2] = np.inf  # row 1, block 2 of Q5_1 (not a kernel type): block 4 + 2 = 6
    with pytest.raises(PocketLMError, match=r"'w' is corrupt: block 6 has a NaN or infinite scale"):
        ow._check_affine_exact(codes, scales, mins, "w", GGML_TYPE_IDS["Q5_1"], "f.gguf")


# ----------------------------------------------------------------------------- SIGTERM

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_during_quantize_leaves_nothing_behind(tiny_model, tmp_path, sig):
    ckpt, _ = tiny_model
    out = tmp_path / "out"
    out.mkdir()
    # GPTQ with calibration: slow enough (about a second) to be caught while writing
    proc = subprocess.Popen([*CLI, "quantize", str(ckpt), "-o", str(out / "q.gguf"), "--method", "gptq",
                             "--calib-samples", "8", "--calib-len", "64", "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(out.glob("*.tmp")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert list(out.glob("q.gguf.*.tmp")), "the quantizer finished before its temporary file was seen"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert one_error_line(err) == "pocketlm: terminated"
    assert leftovers(out) == []


# ----------------------------------------------------------------------------- thread counts

def test_check_threads_refuses_below_one_and_caps_at_the_cpu_count(capsys):
    cpus = available_cpus()
    assert [check_threads(n) for n in range(1, cpus + 1)] == list(range(1, cpus + 1))
    assert capsys.readouterr().err == ""
    assert check_threads(cpus + 1) == cpus and check_threads(999) == cpus
    notes = capsys.readouterr().err.splitlines()
    assert notes == [f"pocketlm: note: threads {n} is more than the {cpus} CPUs available; using {cpus}"
                     for n in (cpus + 1, 999)]
    for bad in (0, -2, 1.5, "4", True, None):
        with pytest.raises(PocketLMError, match="threads must be"):
            check_threads(bad)


@pytest.mark.parametrize("verb", ["run", "chat", "quantize", "bench"])
def test_every_verb_applies_the_thread_rule(tiny_model, tmp_path, capsys, verb):
    ckpt, gguf = tiny_model
    argv = {"run": ["run", gguf, "-p", "hi"], "chat": ["chat", gguf],
            "quantize": ["quantize", ckpt, "-o", tmp_path / "q.gguf"], "bench": ["bench", gguf]}[verb]
    for bad in ("0", "-2", "x"):
        code, out, err = run_main(capsys, *argv, "--threads", bad)
        assert code == 2 and out == ""
        got = f"must be an integer >= 1, got {bad!r}" if bad == "x" else f"--threads must be >= 1, got {bad}"
        assert err.strip().splitlines()[-1].endswith(f"argument --threads{'/-t' if verb != 'quantize' else ''}: {got}")
    assert leftovers(tmp_path) == []


def test_run_caps_999_threads_with_a_note(tiny_model, capsys):
    _, gguf = tiny_model
    code, out, err = run_main(capsys, "run", gguf, "-p", "hi", "-n", "2", "--threads", "999", "--quiet")
    cpus = available_cpus()
    assert code == 0 and out
    assert err.splitlines() == [f"pocketlm: note: --threads 999 is more than the {cpus} CPUs available; "
                                f"using {cpus}"]
    from pocketlm.runtime import kernel

    assert kernel.get_threads() == cpus
