"""`pocketlm.bench.benchmark` is the bench: `pocketlm bench`, `pocketlm.benchmark` and the demo are thin
layers over it, and the command line it records repeats the run whoever called it (issue 10)."""

from __future__ import annotations

import shutil
import sys

import pytest

import pocketlm
from pocketlm import bench
from pocketlm.cli import build_parser, main
from pocketlm.devices import Budget
from pocketlm.errors import PocketLMError


def test_benchmark_records_a_command_that_repeats_it_not_the_callers_argv(tiny_model, tmp_path, monkeypatch):
    _, gguf = tiny_model
    monkeypatch.chdir(tmp_path)
    shutil.copy(gguf, tmp_path / "m.gguf")
    monkeypatch.setattr(sys, "argv", ["some-script.py", "--its-own", "flags"])
    res = pocketlm.benchmark("m.gguf", prompt_len=16, gen=4, threads=1)
    assert res["command"] == ["pocketlm", "bench", "m.gguf", "--threads", "1", "--prompt-len", "16", "--gen", "4"]
    assert "error" not in res["engines"][0] and res["model"]["prompt_tokens"] == 16
    args = build_parser().parse_args(res["command"][1:])  # the recorded command parses to the same run
    assert (args.model, args.threads, args.prompt_len, args.gen, args.device) == ("m.gguf", 1, 16, 4, "all")


def test_the_command_line_is_a_thin_layer_over_benchmark(tiny_model, monkeypatch, capsys):
    _, gguf = tiny_model
    calls = []

    def fake(path, **kw):
        calls.append((path, kw))
        return {"engines": [{"error": "not measured"}]}

    monkeypatch.setattr(bench, "benchmark", fake)
    monkeypatch.setattr(bench, "format_tables", lambda *args, **kwargs: "tables")
    assert main(["bench", str(gguf), "--gen", "5", "--vs", "llama.cpp", "--budget-decode", "20"]) == 1
    (path, kw), = calls
    assert path == str(gguf) and kw["gen"] == 5 and kw["vs"] == "llama.cpp" and kw["prompt_len"] == 128
    assert kw["budget"] == Budget(decode_tok_s=20.0)
    calls.clear()
    pocketlm.benchmark(gguf, gen=7, kv="int8")  # the Python API: no argv in between
    (path, kw), = calls
    assert path == gguf and kw["gen"] == 7 and kw["kv"] == "int8"


def test_bench_command_line_leaves_defaults_out_and_keeps_every_setting():
    argv = bench.bench_command_line("dir/m.gguf", threads=None, prompt_len=128, gen=32, ctx=None, kv="f16",
                                    device="all", vs=None, onnx=None, budget=Budget())
    assert argv == ["pocketlm", "bench", "dir/m.gguf"]
    argv = bench.bench_command_line("m.gguf", threads=2, prompt_len=64, gen=8, ctx=512, kv="int8",
                                    device="pixel8", vs="onnxruntime", onnx="exp", budget=Budget(memory_gb=3.5))
    args = build_parser().parse_args(argv[1:])
    assert (args.threads, args.prompt_len, args.gen, args.ctx, args.kv, args.device, args.vs, args.onnx,
            args.budget_memory) == (2, 64, 8, 512, "int8", "pixel8", "onnxruntime", "exp", 3.5)


def test_benchmark_refuses_bad_input_before_measuring(tmp_path):
    with pytest.raises(PocketLMError, match="no such file"):
        bench.benchmark(tmp_path / "missing.gguf")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(PocketLMError, match="threads must be >= 1"):
        bench.benchmark(tmp_path / "m.gguf", threads=0)
