"""Seeded fuzzing of every input file pocketlm reads, through the command line (issue 10).

A tiny real model (hidden 64, one layer, 512 Phi-3 tokens) as a checkpoint folder and as the Q4_0
GGUF `pocketlm quantize` makes of it. Mutations:
- GGUF: bit flips in the header, the metadata, the vocabulary strings and the tensor infos;
  truncations; every kind of count, length, dimension and offset field (located with gguf-py, the
  oracle for the layout) overwritten with 0, 2^31, 2^32-1, 2^63-1 and 2^64-1 (2^31, 2^32-1, 0 for
  the 32-bit fields) -- through `info`, `run -n 1` and `eval`;
- config.json: values replaced by other types and extremes, keys dropped, bit flips;
- model.safetensors: its header's length and JSON bytes flipped, truncations;
- tokenizer.json: values replaced, keys dropped, bit flips -- each through `info` and `quantize`.

Each case must end with exit code 0 or with exit code 2 and one line `pocketlm: error: ...` naming
the file: no Python traceback (any exception but SystemExit fails the test), no hang (an alarm),
no multi-GB allocation (tracemalloc's peak, which sees numpy's buffers; a handful of cases also
run as subprocesses under an address-space limit, which also catches signals such as SIGSEGV).
"""

from __future__ import annotations

import json
import resource
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from pocketlm.cli import main

SEED = 20240610
MAX_PEAK_BYTES = 512 * 2**20   # a case may allocate this much Python/numpy memory at most
CASE_SECONDS = 20              # a case slower than this is a hang
U64_VALUES = (0, 2**31, 2**32 - 1, 2**63 - 1, 2**64 - 1)
U32_VALUES = (0, 2**31, 2**32 - 1)
SUBPROCESS_CASES = 6
ADDRESS_SPACE_LIMIT = 4 * 2**30  # the subprocesses: 4 GB of address space (torch is not imported)


class Hang(BaseException):
    pass


def _alarm(signum, frame):
    raise Hang


@pytest.fixture(scope="module")
def fuzz_model(tmp_path_factory) -> tuple[Path, Path]:
    from quant_helpers import make_checkpoint

    from pocketlm.quantize.pipeline import quantize_checkpoint

    root = tmp_path_factory.mktemp("fuzz-model")
    ckpt = make_checkpoint(root / "ckpt", hidden=64, layers=1, vocab=512)
    gguf = root / "tiny.gguf"
    quantize_checkpoint(ckpt, gguf, recipe="q4_0", method="rtn", progress=False)
    return ckpt, gguf


class Harness:
    """Runs `pocketlm ARGV` in this process and checks how it ended; counts cases and time."""

    def __init__(self, capsys):
        self.capsys = capsys
        self.cases = 0
        self.errors = 0

    def __call__(self, argv: list, named: Path, what: str) -> int:
        self.cases += 1
        tracemalloc.reset_peak()
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(CASE_SECONDS)
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:  # argparse
            code = e.code
        except Hang:
            pytest.fail(f"{what}: {argv[0]} ran longer than {CASE_SECONDS} s")
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
        _, peak = tracemalloc.get_traced_memory()
        assert peak < MAX_PEAK_BYTES, f"{what}: {argv[0]} allocated {peak / 2**20:.0f} MB"
        _, err = self.capsys.readouterr()
        assert code in (0, 2), f"{what}: {argv[0]} exited {code}: {err}"
        if code == 2:
            self.errors += 1
            lines = err.strip().splitlines()
            assert lines and lines[-1].startswith("pocketlm: error: "), f"{what}: {err}"
            assert not any(line.startswith("pocketlm: error: ") for line in lines[:-1]), f"{what}: {err}"
            assert str(named) in lines[-1], f"{what}: the error does not name {named}: {lines[-1]}"
        return code


@pytest.fixture
def harness(capsys):
    tracemalloc.start()
    try:
        yield Harness(capsys)
    finally:
        tracemalloc.stop()


# ------------------------------------------------------------------------------------- GGUF

def gguf_layout(path: Path) -> dict[str, list[tuple[int, int]]]:
    """Byte ranges of a GGUF's parts, from gguf-py: name -> [(offset, size)]."""
    import gguf

    r = gguf.GGUFReader(path)
    base = r.data.__array_interface__["data"][0]

    def at(part: np.ndarray) -> tuple[int, int]:
        return part.__array_interface__["data"][0] - base, part.nbytes

    u64, u32, vocab, infos = [], [], [], []
    for name, field in r.fields.items():
        if name.startswith("GGUF."):  # the header's own counts, as gguf-py reports them
            (u64 if field.parts[0].dtype == np.uint64 else u32).append(at(field.parts[0]))
            continue
        for part in field.parts:
            if part.size == 1 and part.dtype in (np.uint64, np.uint32):  # lengths, counts, types
                (u64 if part.dtype == np.uint64 else u32).append(at(part))
        if name == "tokenizer.ggml.tokens":
            first, last = at(field.parts[6]), at(field.parts[-1])
            vocab.append((first[0], last[0] + last[1] - first[0]))
    for t in r.tensors:
        for part in t.field.parts:
            if part.dtype in (np.uint64, np.uint32):  # name length, n_dims, dims, type, offset
                for j in range(part.size):
                    (u64 if part.dtype == np.uint64 else u32).append((at(part)[0] + j * part.itemsize,
                                                                       part.itemsize))
        off, _ = at(t.field.parts[0])
        infos.append((off, sum(p.nbytes for p in t.field.parts)))
    meta_start = 24
    data_start = min(int(t.data_offset) for t in r.tensors)
    info_start = min(off for off, _ in infos)
    return {"u64": u64, "u32": u32, "header": [(0, 24)], "metadata": [(meta_start, info_start - meta_start)],
            "vocabulary": vocab, "tensor infos": [(info_start, data_start - info_start)],
            "size": [(0, path.stat().st_size)]}


def gguf_mutants(src: Path, rng: np.random.Generator):
    """(description, bytes) of mutated copies of the GGUF at `src`."""
    data = src.read_bytes()
    layout = gguf_layout(src)
    assert len(layout["u64"]) > 40 and len(layout["u32"]) > 30 and layout["vocabulary"][0][1] > 2000
    for region in ("header", "metadata", "vocabulary", "tensor infos"):
        (start, size), = layout[region]
        for _ in range(20 if region != "header" else 10):
            b = bytearray(data)
            pos = start + int(rng.integers(size))
            bit = int(rng.integers(8))
            b[pos] ^= 1 << bit
            yield f"bit {bit} of byte {pos} ({region}) flipped", bytes(b)
    for cut in sorted({int(c) for c in rng.integers(1, len(data), 12)} | {0, 4, 23, 24}):
        yield f"truncated to {cut} bytes", data[:cut]
    for kind, values in (("u64", U64_VALUES), ("u32", U32_VALUES)):
        fields = layout[kind]
        picks = rng.choice(len(fields), size=min(len(fields), 30), replace=False)
        for i in picks:
            pos, size = fields[int(i)]
            value = values[int(rng.integers(len(values)))]
            b = bytearray(data)
            b[pos:pos + size] = int(value).to_bytes(size, "little")
            yield f"{kind} field at byte {pos} set to {value}", bytes(b)


def test_fuzz_gguf_through_info_run_and_eval(fuzz_model, tmp_path, harness):
    ckpt, src = fuzz_model
    rng = np.random.default_rng(SEED)
    path = tmp_path / "mutant.gguf"
    t0 = time.perf_counter()
    files = 0
    subprocess_picks = []
    for what, data in gguf_mutants(src, rng):
        files += 1
        path.write_bytes(data)
        harness(["info", path], path, what)
        harness(["run", path, "-p", "hi", "-n", "1", "--temp", "0", "--quiet"], path, what)
        harness(["eval", path, "--ref", ckpt, "--tokens", "64", "--ctx", "32"], path, what)
        if len(subprocess_picks) < SUBPROCESS_CASES and rng.random() < 0.05:
            keep = tmp_path / f"sub{len(subprocess_picks)}.gguf"
            shutil.copy(path, keep)
            subprocess_picks.append((what, keep))
    for what, keep in subprocess_picks:
        run_limited(["run", str(keep), "-p", "hi", "-n", "1", "--quiet"], keep, what)
    elapsed = time.perf_counter() - t0
    print(f"GGUF fuzz: {files} mutated files, {harness.cases} in-process runs ({harness.errors} clean errors), "
          f"{len(subprocess_picks)} subprocess runs, {elapsed:.1f} s")
    assert files >= 120 and 0 < harness.errors < harness.cases  # mutants refused, and some still load


def run_limited(argv: list[str], named: Path, what: str) -> None:
    """`pocketlm ARGV` as a subprocess with an address-space limit: no signal, exit 0 or 2."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))

    res = subprocess.run([sys.executable, "-P", "-m", "pocketlm.cli", *argv],  # -P: not ./pocketlm
                         capture_output=True, text=True, timeout=120, preexec_fn=limit)
    assert res.returncode in (0, 2), f"{what}: exit {res.returncode} (a signal if negative): {res.stderr}"
    assert "Traceback" not in res.stderr, f"{what}: {res.stderr}"
    if res.returncode == 2:
        assert str(named) in res.stderr.strip().splitlines()[-1]


# ------------------------------------------------------------------ checkpoint folder inputs

ODD_VALUES = [None, -1, 0, 2**63, 2**64, 1e308, -1e308, float("nan"), "x", "", [], {}, [1, 2], {"a": 1}, True]


def json_mutants(obj, rng: np.random.Generator, n: int):
    """(description, text) of JSON documents derived from `obj`: values replaced, keys dropped, and
    bit flips of the serialised text."""
    text = json.dumps(obj)
    paths = []

    def walk(x, path):
        if isinstance(x, dict):
            for k, v in x.items():
                paths.append((*path, k))
                walk(v, (*path, k))
        elif isinstance(x, list) and x and len(x) < 50:
            for i, v in enumerate(x[:3]):
                paths.append((*path, i))
                walk(v, (*path, i))

    walk(obj, ())
    for _ in range(n):
        mutant = json.loads(text)
        path = paths[int(rng.integers(len(paths)))]
        parent = mutant
        for k in path[:-1]:
            parent = parent[k]
        if rng.random() < 0.2 and isinstance(parent, dict):
            del parent[path[-1]]
            yield f"{'.'.join(map(str, path))} dropped", json.dumps(mutant)
        else:
            value = ODD_VALUES[int(rng.integers(len(ODD_VALUES)))]
            parent[path[-1]] = value
            yield f"{'.'.join(map(str, path))} = {value!r}", json.dumps(mutant)
    raw = text.encode()
    for _ in range(n // 3):
        b = bytearray(raw)
        pos = int(rng.integers(len(b)))
        b[pos] ^= 1 << int(rng.integers(8))
        yield f"bit flip at byte {pos}", bytes(b)


def test_fuzz_checkpoint_files_through_info_and_quantize(fuzz_model, tmp_path, harness):
    src, _ = fuzz_model
    rng = np.random.default_rng(SEED + 1)
    folder = tmp_path / "ckpt"
    shutil.copytree(src, folder)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    t0 = time.perf_counter()
    files = 0

    def check(name: str, what: str, content) -> None:
        nonlocal files
        files += 1
        target = folder / name
        target.write_bytes(content if isinstance(content, bytes) else content.encode())
        harness(["info", folder], folder, f"{name}: {what}")
        code = harness(["quantize", folder, "-o", out_dir / "q.gguf", "-q"], folder, f"{name}: {what}")
        left = sorted(p.name for p in out_dir.iterdir())
        assert left == (["q.gguf"] if code == 0 else []), f"{name}: {what}: left {left}"
        for p in out_dir.iterdir():
            p.unlink()

    for name in ("config.json", "tokenizer.json"):
        original = (src / name).read_text()
        for what, text in json_mutants(json.loads(original), rng, 45):
            check(name, what, text)
        (folder / name).write_text(original)

    st = (src / "model.safetensors").read_bytes()
    n = int.from_bytes(st[:8], "little")
    for value in (*U64_VALUES, n - 1, n + 1, len(st)):
        check("model.safetensors", f"header length set to {value}", value.to_bytes(8, "little") + st[8:])
    for _ in range(25):
        b = bytearray(st)
        pos = 8 + int(rng.integers(n))
        b[pos] ^= 1 << int(rng.integers(8))
        check("model.safetensors", f"header byte {pos} flipped", bytes(b))
    for cut in sorted({int(c) for c in rng.integers(1, len(st), 10)} | {0, 7, 8 + n}):
        check("model.safetensors", f"truncated to {cut} bytes", st[:cut])
    elapsed = time.perf_counter() - t0
    print(f"checkpoint fuzz: {files} mutated files, {harness.cases} runs ({harness.errors} clean errors), "
          f"{elapsed:.1f} s")
    assert files >= 120 and 0 < harness.errors < harness.cases


def test_fuzz_is_seeded():
    """The same seed gives the same mutants (a failure can be replayed)."""
    a = list(json_mutants({"a": 1, "b": [1, 2]}, np.random.default_rng(SEED), 10))
    b = list(json_mutants({"a": 1, "b": [1, 2]}, np.random.default_rng(SEED), 10))
    assert a == b and len(a) == 13

