"""`pocketlm bench`: speed and memory of a GGUF model on this machine, projected onto phones.

    pocketlm bench model.gguf --device all --vs llama.cpp,onnxruntime --json out.json --plot out.png

Each engine runs in its own subprocess (so peak RSS is that engine's alone) on the same random prompt
of ordinary tokens, greedily, end-of-text ignored: pocketlm (this runtime), llama.cpp
(llama-cpp-python on the same GGUF: the prompt in one eval, then N single-token evals) and
onnxruntime-genai (on the ONNX export of the GGUF, made on the fly into a cache folder unless
--onnx is given; min_length forces N tokens). Then every engine is projected onto the device
profiles of `pocketlm.devices`, calibrated on published phone measurements (`pocketlm.phone_calibration`:
a device's measured llama.cpp speed x this engine's speed relative to llama.cpp here; the weaker
DRAM-peak estimate where a phone has none), and checked against the phone budget with each
estimate's leave-one-out error band: a budget inside the band reads "borderline".
On a phone, `--device auto` finds the SoC and labels this run's figures as measured on it.

JSON schema: docs/bench_schema.md.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import phone_calibration as calib
from .devices import (
    DEVICES,
    Budget,
    Device,
    Efficiency,
    Projection,
    Workload,
    detect_device,
    project,
    ratio_error,
)
from .errors import PocketLMError
from .threads import check_threads, threads_arg

SCHEMA = "pocketlm.bench/1"
PEERS = ("llama.cpp", "onnxruntime")
SWEEP_CONTEXTS = (128, 512, 1024, 2048)   # decode speed measured at these positions (within --ctx)
SWEEP_TOKENS = 6                           # tokens decoded at each sweep position
ONNX_CACHE_ENV = "POCKETLM_CACHE"
GiB = 1 << 30


# ---------------------------------------------------------------------------- progress

class Progress:
    """One status line on stderr: rewritten in place on a terminal, one line per stage otherwise."""

    def __init__(self, prefix: str = "bench", stream=None):
        self.prefix, self.stream = prefix, stream or sys.stderr
        self.t0 = time.perf_counter()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last = 0.0

    def stage(self, text: str) -> None:
        self._write(text, final=not self.tty)

    def update(self, text: str) -> None:
        """A fast-changing status (token counts): every call on a terminal, every 10 s in a log."""
        if self.tty:
            self._write(text, final=False)
        elif time.perf_counter() - self._last >= 10.0:
            self._write(text, final=True)

    def done(self, text: str) -> None:
        self._write(text, final=True)

    def _write(self, text: str, final: bool) -> None:
        self._last = time.perf_counter()
        line = f"[{self.prefix} {self._last - self.t0:6.1f}s] {text}"
        if self.tty:
            self.stream.write("\r\x1b[2K" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


# ---------------------------------------------------------------------------- the model's costs

def prompt_ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    """Random ordinary-token ids (no special tokens: ids 300..min(vocab, 32000)), the same for every
    engine."""
    lo, hi = (300, min(vocab, 32000)) if vocab > 600 else (3, vocab)
    return np.random.default_rng(seed).integers(lo, hi, n).tolist()


def kv_bytes_per_position(n_layers: int, n_kv_heads: int, head_dim: int, kv: str) -> float:
    """KV cache bytes of one position over all layers (keys + values); int8 adds one fp16 scale per
    head and position (pocketlm/kv_cache.py)."""
    per_value = {"f16": 2.0, "f32": 4.0, "int8": 1.0 + 2.0 / head_dim}[kv]
    return 2 * n_layers * n_kv_heads * head_dim * per_value


def model_facts(path: str, ctx: int | None, kv: str) -> dict[str, Any]:
    """Sizes the projections need, read from the GGUF header (no weights loaded)."""
    from .config import Phi3Config
    from .export.gguf_reader import GGUFReader

    with GGUFReader(path) as r:
        factors = {n: r.dequantize(n) for n in ("rope_factors_long.weight", "rope_factors_short.weight")
                   if n in r.tensors}
        cfg = Phi3Config.from_gguf_metadata(r.metadata, factors, source=path)
        tensors = list(r.tensors.values())
        name = str(r.metadata.get("general.name", Path(path).stem))
        type_bytes: dict[str, int] = {}   # the quantization type that holds most weight bytes
        for t in tensors:
            if len(t.shape) == 2 and t.name != "token_embd.weight":
                type_bytes[t.type_name] = type_bytes.get(t.type_name, 0) + t.nbytes
        quant_type = max(type_bytes, key=type_bytes.__getitem__) if type_bytes else "unknown"
    tied = not any(t.name == "output.weight" for t in tensors)
    weight_bytes = params = 0
    for t in tensors:
        if len(t.shape) != 2:
            continue
        n = int(np.prod(t.shape))
        if t.name == "token_embd.weight":
            weight_bytes += t.nbytes if tied else t.nbytes // t.shape[0]  # one row per token
            params += n if tied else n // t.shape[0]
            continue
        weight_bytes += t.nbytes
        params += n
    if ctx is None:
        ctx = min(cfg.max_position_embeddings, 2048)
    L, H, KV, hd = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    return {"path": os.path.abspath(path), "name": name, "file_bytes": os.path.getsize(path),
            "n_layers": L, "n_heads": H, "n_kv_heads": KV, "head_dim": hd, "vocab": cfg.vocab_size,
            "hidden": cfg.hidden_size, "intermediate": cfg.intermediate_size,
            "max_context": cfg.max_position_embeddings, "sliding_window": cfg.sliding_window or 0,
            "weight_bytes_per_token": weight_bytes, "n_weight_params": params,
            "bits_per_weight": 8 * weight_bytes / params, "quant_type": quant_type, "ctx": ctx, "kv": kv,
            "kv_bytes_per_position": kv_bytes_per_position(L, KV, hd, kv),
            "kv_cache_bytes": kv_bytes_per_position(L, KV, hd, kv) * ctx}


PHI3_MINI_MODELS = ("phi-3-mini", "phi-3.5-mini")   # the published models of phi-3-mini's shape


def published_comparison(model: dict, records: list[dict], rows: list | None = None) -> list[dict]:
    """The published phi-3-mini-shaped phone figures beside their projections (only for a run of a
    phi-3-mini-shaped model): llama.cpp rows projected leave-one-out from the other published rows
    (calibrated: the same device's other rows; fallback: the device left out), other engines' rows
    beside this run's projection of that engine on that device."""
    if not is_phi3_mini_shaped(model):
        return []
    rows = calib.load_measurements() if rows is None else rows
    loo = calib.leave_one_out(rows, DEVICES)
    out = []
    for r in rows:
        if r.model not in PHI3_MINI_MODELS or r.decode_tok_s is None:
            continue
        base = {"device": r.device, "engine": r.engine, "model": r.model, "quant": r.quant,
                "decode_tok_s": r.decode_tok_s, "lower_bound": r.lower_bound, "source": r.source}
        if r.engine == calib.REFERENCE_ENGINE:
            for x in loo:
                if x.row is r and x.metric == "decode":
                    out.append({**base, "path": f"leave-one-out {x.path}", "projected_decode_tok_s": x.projected,
                                "error": x.error})
            continue
        proj = next((p for p in records if p["kind"] == "projection" and p["device"] == r.device
                     and p["engine"] == r.engine), None)
        if proj is not None:
            out.append({**base, "path": f"this run ({proj['basis']})",
                        "projected_decode_tok_s": proj["decode_tok_s"],
                        "error": ratio_error(proj["decode_tok_s"], r.decode_tok_s)})
    return out


def is_phi3_mini_shaped(model: dict) -> bool:
    """32 layers of 32 heads x 96 (hidden 3072): the model the published phone figures measured."""
    return (model["n_layers"], model["n_heads"], model["head_dim"]) == (32, 32, 96)


def positions_read(position: float, window: int) -> float:
    """KV positions a decode step at `position` reads (all before it, or the sliding window)."""
    return min(position + 1, window) if window else position + 1


def ops_per_prompt_token(m: dict, prompt: int) -> float:
    """2 x multiply-adds of one prompt token: weights, plus attention over half the prompt on average."""
    keys = positions_read(prompt / 2, m["sliding_window"])
    attn = 2 * 2 * m["n_layers"] * m["n_heads"] * m["head_dim"] * keys
    return 2 * m["n_weight_params"] + attn


# ---------------------------------------------------------------------------- engines (children)

def _memory() -> dict[str, int]:
    from .hostinfo import memory_status

    s = memory_status()
    return {"peak_rss_bytes": s["VmHWM"], "rss_bytes": s["VmRSS"], "rss_anon_bytes": s["RssAnon"],
            "rss_file_bytes": s["RssFile"]}


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


def child_pocketlm(spec: dict, progress: Progress) -> dict:
    """Load, prefill the prompt, decode N tokens; then decode a few tokens at each sweep context."""
    from .runtime import kernel
    from .runtime.generate import generate
    from .runtime.model import load

    progress.stage(f"pocketlm: loading {os.path.basename(spec['path'])} ({spec['threads']} threads)")
    model = load(spec["path"], threads=spec["threads"], ctx=spec["ctx"], kv=spec["kv"])
    after_load = _memory()
    ids = prompt_ids(spec["prompt"], model.cfg.vocab_size)
    progress.stage(f"pocketlm: prefill {len(ids)} tokens, then decode {spec['gen']}")
    gen = generate(model, ids, max_tokens=spec["gen"] + 1, temperature=0, ignore_eos=True)
    for _ in gen:
        progress.update(f"pocketlm: decoded {len(gen.tokens)}/{spec['gen'] + 1}")
    if gen.tokens == [] or model.tokenizer is None:   # no text pieces to iterate: run it out
        list(gen.token_ids())
    s = model.stats
    sweep = []
    for position in spec["sweep"]:
        progress.update(f"pocketlm: decode speed at context {position}")
        sweep.append({"context": position, "decode_tok_s": _decode_at(model, position, SWEEP_TOKENS)})
    res = {"name": "pocketlm", "version": _version("pocketlm"), "kernel_path": kernel.active_path(),
           "kv": spec["kv"], "load_s": s.load_seconds, "prefill_tok_s": s.prefill_tps,
           "decode_tok_s": s.decode_tps, "first_token_s": s.first_token_seconds,
           "decoded_tokens": s.decode_tokens, "python_overhead": s.python_overhead,
           "kv_cache_bytes": model.cache.nbytes, "anon_after_load_bytes": after_load["rss_anon_bytes"],
           "decode_vs_context": sweep, **_memory()}
    if spec.get("speculate"):  # the same generation again with speculation (issue 15)
        progress.update(f"pocketlm: decode {spec['gen']} with --speculate {spec['speculate']}")
        sg = generate(model, ids, max_tokens=spec["gen"] + 1, temperature=0, ignore_eos=True,
                      speculate=spec["speculate"], draft_max=spec["draft_max"])
        list(sg.token_ids())
        st = sg.speculation
        res["speculative"] = {"mode": st.mode, "draft_max": st.draft_max, "decode_tok_s": s.decode_tps,
                              "same_tokens": sg.tokens == gen.tokens, "acceptance": st.acceptance,
                              "tokens_per_forward": st.tokens_per_forward, "verifies": st.verifies,
                              "drafted": st.drafted, "accepted": st.accepted}
    return res


def _decode_at(model, position: int, n: int) -> float:
    """tok/s of n greedy decode steps starting at `position` of the cache. Positions past what was
    evaluated are claimed without computing them: their keys are zeros or stale, which costs the
    same to read as real ones (speed does not depend on the values)."""
    if position < model.n_past:
        model.truncate(position)
    else:
        model.tokens.extend([0] * (position - model.n_past))
        model.cache.length = position
    tok, steps = 0, []
    for _ in range(n):
        t0 = time.perf_counter()
        tok = int(np.argmax(model.forward([tok])))
        steps.append(time.perf_counter() - t0)
    return 1.0 / float(np.median(steps))  # the median step: robust to one slow (cold) step


def llama_cpp_use_repack(llama_cpp) -> bool:
    """Give llama.cpp its repacked-weight buffers (its fastest CPU path) unless the build has AMX.

    llama-cpp-python 0.3.x built with AMX (the default -march=native build on a CPU that reports
    AMX, as this machine's does) segfaults in `ggml_backend_amx_mul_mat` here; a build with
    `-DGGML_NATIVE=OFF -DGGML_AMX_*=OFF` (see README) runs its REPACK path fine. Returns whether
    the extra buffer types stay on (patches `llama_model_default_params` when they must go)."""
    from llama_cpp import llama as llama_module

    if "AMX_INT8 = 1" not in llama_cpp.llama_print_system_info().decode(errors="replace"):
        return True
    default_params = llama_cpp.llama_model_default_params

    def params():
        p = default_params()
        if hasattr(p, "use_extra_bufts"):
            p.use_extra_bufts = False
        return p

    llama_module.llama_cpp.llama_model_default_params = params
    return False


class LlamaGreedy:
    """llama.cpp as `pocketlm bench` and benchmarks/ run it (llama-cpp-python, REPACK unless an AMX
    build, see `llama_cpp_use_repack`; `load_s` times the constructor): a prefill, then greedy
    (argmax) steps, `token` the last one chosen."""

    def __init__(self, path: str, threads: int, ctx: int):
        import llama_cpp

        self.repack = llama_cpp_use_repack(llama_cpp)  # off only for AMX builds
        t0 = time.perf_counter()
        self.llm = llama_cpp.Llama(path, n_ctx=ctx, n_batch=512, n_ubatch=512, n_threads=threads,
                                   n_threads_batch=threads, logits_all=False, verbose=False)
        self.load_s = time.perf_counter() - t0
        n_vocab, get = self.llm.n_vocab(), llama_cpp.llama_get_logits_ith
        self._last = lambda: np.ctypeslib.as_array(get(self.llm.ctx, -1), shape=(n_vocab,))
        self.token = -1

    def prefill(self, ids: list[int]) -> None:
        self.llm.eval(ids)
        self.token = int(np.argmax(self._last()))

    def step(self) -> None:
        self.llm.eval([self.token])
        self.token = int(np.argmax(self._last()))


def child_llama_cpp(spec: dict, progress: Progress) -> dict:
    import llama_cpp

    progress.stage(f"llama.cpp: loading ({spec['threads']} threads)")
    llm = LlamaGreedy(spec["path"], spec["threads"], spec["ctx"])
    ids = prompt_ids(spec["prompt"], llm.llm.n_vocab())
    progress.stage(f"llama.cpp: prefill {len(ids)} tokens, then decode {spec['gen']}")
    t0 = time.perf_counter()
    llm.prefill(ids)
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(spec["gen"]):
        llm.step()
        progress.update(f"llama.cpp: decoded {i + 1}/{spec['gen']}")
    decode_s = time.perf_counter() - t0
    return {"name": "llama.cpp", "version": f"llama-cpp-python {llama_cpp.__version__}", "kv": "f16",
            "load_s": llm.load_s, "prefill_tok_s": len(ids) / prefill_s, "decode_tok_s": spec["gen"] / decode_s,
            "first_token_s": prefill_s, "decoded_tokens": spec["gen"], **_memory()}


def child_onnxruntime(spec: dict, progress: Progress) -> dict:
    import onnxruntime_genai as og

    progress.stage(f"onnxruntime-genai: loading {spec['onnx']} ({spec['threads']} threads)")
    t0 = time.perf_counter()
    config = og.Config(spec["onnx"])
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": spec["threads"], "inter_op_num_threads": 1}}}}))
    model = og.Model(config)
    load_s = time.perf_counter() - t0
    ids = prompt_ids(spec["prompt"], spec["vocab"])
    total = len(ids) + spec["gen"] + 1
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=total, min_length=total, do_sample=False)
    gen = og.Generator(model, params)
    progress.stage(f"onnxruntime-genai: prefill {len(ids)} tokens, then decode {spec['gen']}")
    t0 = time.perf_counter()
    gen.append_tokens(np.array([ids], np.int32))   # runs the prompt
    gen.generate_next_token()                      # samples the first token from the prompt's logits
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(spec["gen"]):                   # each: one forward step + sampling
        gen.generate_next_token()
        progress.update(f"onnxruntime-genai: decoded {i + 1}/{spec['gen']}")
    decode_s = time.perf_counter() - t0
    from .export.onnx_info import accuracy_levels

    levels = "/".join(map(str, accuracy_levels(spec["onnx"]))) or "-"  # 4: int8 activations, 1: float32
    progress.stage(f"onnxruntime: MatMulNBits accuracy_level {levels}")
    return {"name": "onnxruntime", "version": f"onnxruntime-genai {og.__version__}, accuracy_level {levels}",
            "kv": "f32",
            "load_s": load_s, "prefill_tok_s": len(ids) / first_s, "decode_tok_s": spec["gen"] / decode_s,
            "first_token_s": first_s, "decoded_tokens": spec["gen"], **_memory()}


CHILDREN = {"pocketlm": child_pocketlm, "llama.cpp": child_llama_cpp, "onnxruntime": child_onnxruntime}


def run_child(engine: str, spec: dict, progress: Progress) -> dict:
    """Run one engine in a fresh interpreter; its last stdout line is its JSON result. Its progress
    goes straight to our stderr."""
    # -P: never import a source checkout's `pocketlm/` folder from the current directory in place of
    # the installed package (the stage folders are mapped into it only by the install)
    cmd = [sys.executable, "-P", "-m", "pocketlm.bench", "--child", engine, json.dumps(spec)]
    res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    lines = res.stdout.strip().splitlines()
    if res.returncode != 0 or not lines:
        why = f"exit code {res.returncode}" if res.returncode >= 0 else f"killed by signal {-res.returncode}"
        progress.done(f"{engine}: failed ({why}); its messages are above")
        return {"name": engine, "error": f"{engine} failed ({why})"}
    out = json.loads(lines[-1])
    if "error" in out:
        progress.done(f"{engine}: {out['error']}")
    return out


def child_main(engine: str, spec_json: str) -> int:
    progress = Progress(engine)
    try:
        out = CHILDREN[engine](json.loads(spec_json), progress)
    except PocketLMError as e:
        out = {"name": engine, "error": str(e)}
    except ImportError as e:
        out = {"name": engine, "error": f"{engine} is not installed ({e})"}
    if progress.tty:
        progress.done(f"{engine}: done")
    print(json.dumps(out))
    return 0


# ---------------------------------------------------------------------------- ONNX export cache

def onnx_cache_folder(gguf: str) -> Path:
    """Where the on-the-fly ONNX export of this exact file (path, size, mtime) lives."""
    st = os.stat(gguf)
    # "|auto": exports made before the default accuracy level became auto are not reused
    key = hashlib.sha1(f"{os.path.abspath(gguf)}|{st.st_size}|{st.st_mtime_ns}|auto".encode()).hexdigest()[:12]
    root = Path(os.environ.get(ONNX_CACHE_ENV, Path.home() / ".cache" / "pocketlm"))
    return root / "bench-onnx" / f"{Path(gguf).stem}-{key}"


def ensure_onnx(gguf: str, onnx_dir: str | None, progress: Progress) -> Path:
    if onnx_dir:
        folder = Path(onnx_dir)
        if not (folder / "genai_config.json").is_file():
            raise PocketLMError("is not an ONNX export folder (no genai_config.json)", folder)
        return folder
    folder = onnx_cache_folder(gguf)
    if (folder / "genai_config.json").is_file():
        progress.stage(f"onnxruntime: reusing the export in {folder}")
        return folder
    from .export.onnx_export import export_onnx

    progress.stage(f"onnxruntime: exporting the GGUF to ONNX in {folder} (once per file)")
    summary = export_onnx(gguf, folder, progress=True)  # the default export: accuracy level auto
    progress.stage(f"onnxruntime: the export chose {summary.accuracy_reason}")
    return folder


def onnx_weight_bytes_per_token(folder: Path) -> float | None:
    """Bytes of the exported weights a decode step reads: the initializers of its MatMul(NBits)
    nodes (codes, scales, zero points); the embedding table is gathered one row at a time."""
    try:
        import onnx

        m = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    except Exception:
        return None
    matmul_inputs = {x for n in m.graph.node if n.op_type in ("MatMulNBits", "MatMul") for x in n.input}
    total = 0
    for init in m.graph.initializer:
        if init.name in matmul_inputs:
            length = {e.key: e.value for e in init.external_data}.get("length")
            total += int(length) if length else len(init.raw_data)
    return float(total) if total else None


# ---------------------------------------------------------------------------- the run

def parse_devices(value: str) -> tuple[list[Device], bool]:
    """--device NAME[,NAME]|all|auto -> (profiles to project onto, auto)."""
    if value in ("all", "auto"):
        return list(DEVICES.values()), value == "auto"
    out = []
    for key in value.split(","):
        key = key.strip()
        if key not in DEVICES:
            raise PocketLMError(f"unknown device {key!r}; choose from {', '.join(DEVICES)}, all, auto")
        out.append(DEVICES[key])
    return out, False


def parse_peers(value: str | None) -> list[str]:
    if not value:
        return []
    peers = [p.strip() for p in value.split(",") if p.strip()]
    for p in peers:
        if p not in PEERS:
            raise PocketLMError(f"--vs: unknown engine {p!r}; choose from {', '.join(PEERS)}")
    return list(dict.fromkeys(peers))


def engine_workload(model: dict, engine: dict, prompt: int, gen: int, onnx_bytes: float | None) -> Workload:
    """The per-token costs of one engine's run: its KV type, its weights' bytes (ONNX export for
    onnxruntime) and its memory besides weights and KV cache."""
    kv = engine.get("kv", model["kv"])
    kv_pos = kv_bytes_per_position(model["n_layers"], model["n_kv_heads"], model["head_dim"], kv)
    kv_int8 = kv_bytes_per_position(model["n_layers"], model["n_kv_heads"], model["head_dim"], "int8")
    weights = model["weight_bytes_per_token"]
    if engine["name"] == "onnxruntime" and onnx_bytes:
        weights = onnx_bytes
    params = model["n_weight_params"]
    if engine["name"] == "pocketlm":
        overhead = engine.get("anon_after_load_bytes", 0)
    else:  # peak RSS minus the weights and the KV cache this run used (what is left is overhead)
        used_kv = kv_pos * (prompt + gen + 1 if engine["name"] == "onnxruntime" else model["ctx"])
        overhead = max(0.0, engine.get("peak_rss_bytes", 0) - model["file_bytes"] - used_kv)
    return Workload(weight_bytes_per_token=weights, weight_file_bytes=model["file_bytes"],
                    n_weight_params=params, kv_bytes_per_position=kv_pos,
                    kv_positions_read=positions_read(prompt + gen / 2, model["sliding_window"]),
                    ctx=model["ctx"], ops_per_token=ops_per_prompt_token(model, prompt),
                    overhead_bytes=overhead, kv_int8_bytes_per_position=kv_int8, kv_type=kv)


def add_efficiency(engine: dict, work: Workload, host: dict) -> Efficiency:
    bw = engine["decode_tok_s"] * work.bytes_per_token
    engine["bytes_per_token"] = work.bytes_per_token
    engine["achieved_bandwidth_gbs"] = bw / 1e9
    engine["bandwidth_efficiency"] = bw / 1e9 / host["read_bandwidth_gbs"]
    engine["compute_gops"] = engine["prefill_tok_s"] * work.ops_per_token / 1e9
    engine["compute_efficiency"] = engine["compute_gops"] / host["int8_peak_gops"]
    return Efficiency(engine["bandwidth_efficiency"], engine["compute_efficiency"])


def ratio_vs_reference(engine: dict, engines: list[dict]) -> dict | None:
    """{decode, prefill} of this engine / llama.cpp measured here on the same file (what carries a
    published llama.cpp phone figure over to this engine); without a llama.cpp run, a peer's ratio
    to pocketlm marked assumed (pocketlm taken as fast as llama.cpp), pocketlm's None (assumed 1)."""
    ref = next((x for x in engines if x["name"] == calib.REFERENCE_ENGINE and "error" not in x), None)
    base = ref or next((x for x in engines if x["name"] == "pocketlm" and "error" not in x), None)
    if base is None or (ref is None and engine["name"] == "pocketlm"):
        return None
    return {"decode": engine["decode_tok_s"] / base["decode_tok_s"],
            "prefill": engine["prefill_tok_s"] / base["prefill_tok_s"], "assumed": ref is None}


def calibrated_record(dev: Device, engine: str, quant: str, work: Workload, host_eff: Efficiency | None,
                      ratio: dict | None, rows: list, bands: dict, budget: Budget,
                      memory_bytes: float | None, shape: calib.Shape | None = None) -> dict:
    """One device's projection of one engine from the published phone measurements, its error band
    and verdicts; the host-efficiency roofline kept beside it as `roofline_*`. shape: the file's
    `phone_calibration.shape_key` (the phone's rows of that shape, or its prefill effect)."""
    est = calib.estimate(dev, engine, quant, work.bytes_per_token, work.ops_per_token, rows, DEVICES,
                         ratio, bands, shape=shape)
    # the device efficiency that reproduces the calibrated rates, so budgets and advice re-project
    # from them (advice: bytes per token or prompt length that pass at this phone's achieved rate)
    eff = Efficiency(est.decode_tok_s * work.bytes_per_token / (dev.bandwidth_gbs * calib.GB),
                     est.prefill_tok_s * work.ops_per_token / (dev.int8_gops * calib.GB))
    rec = projection_record(project(dev, engine, work, eff, budget, memory_bytes))
    roof = None if host_eff is None else project(dev, engine, work, host_eff, budget, memory_bytes)
    need = budget.prompt_tokens / budget.first_token_s   # prefill tok/s the first-token budget needs
    bd, bp = est.decode_band, est.prefill_band
    rec.update({
        "basis": est.basis, "calibration": est.note, "calibration_rows": est.rows,
        "quant_used": est.quant, "quant_matched": est.quant_matched,
        "ratio_vs_llama_cpp": {"decode": est.ratio_decode, "prefill": est.ratio_prefill,
                               "measured": est.ratio_measured},
        "decode_band": bd, "prefill_band": bp,
        "decode_range_tok_s": [est.decode_tok_s * (1 - bd), est.decode_tok_s * (1 + bd)],
        "first_token_range_s": [rec["first_token_s"] / (1 + bp), rec["first_token_s"] / max(1e-9, 1 - bp)],
        "verdicts": {"decode": calib.verdict(est.decode_tok_s, bd, budget.decode_tok_s),
                     "first_token": calib.verdict(est.prefill_tok_s, bp, need),
                     "memory": "pass" if rec["passes"]["memory"] else "fail"},
        "roofline_decode_tok_s": roof and roof.decode_tok_s, "roofline_prefill_tok_s": roof and roof.prefill_tok_s})
    return rec


def projection_record(p: Projection, kind: str = "projection") -> dict:
    d = p.device
    return {"kind": kind, "device": d.key, "name": d.name, "soc": d.soc, "engine": p.engine,
            "bandwidth_gbs": d.bandwidth_gbs, "int8_gops": d.int8_gops, "decode_tok_s": p.decode_tok_s,
            "prefill_tok_s": p.prefill_tok_s, "first_token_s": p.first_token_s, "memory_gb": p.memory_gb,
            "memory_limit_gb": p.memory_limit_gb, "passes": p.passes, "ok": p.ok, "advice": p.advice}


def measured_record(key: str | None, label: str, engine: dict, work: Workload, budget: Budget) -> dict:
    """This run's own figures as a measurement on the device it ran on (`--device auto`)."""
    dev = DEVICES.get(key) if key else None
    first = budget.prompt_tokens / engine["prefill_tok_s"]
    mem = work.memory_bytes / 1e9
    limit = budget.memory_gb if budget.memory_gb is not None else (dev.app_memory_gb if dev else math.inf)
    passes = {"decode": engine["decode_tok_s"] >= budget.decode_tok_s,
              "first_token": first <= budget.first_token_s, "memory": mem <= limit}
    return {"kind": "measured", "device": key, "name": dev.name if dev else label,
            "soc": dev.soc if dev else label,
            "engine": engine["name"], "bandwidth_gbs": dev.bandwidth_gbs if dev else None,
            "decode_tok_s": engine["decode_tok_s"], "prefill_tok_s": engine["prefill_tok_s"],
            "first_token_s": first, "measured_first_token_s": engine["first_token_s"],
            "peak_rss_gb": engine.get("peak_rss_bytes", 0) / 1e9, "memory_gb": mem,
            "memory_limit_gb": None if math.isinf(limit) else limit, "passes": passes,
            "ok": all(passes.values()), "verdicts": {k: _mark(v).lower() for k, v in passes.items()},
            "advice": []}


def benchmark(model_path: str | os.PathLike, *, threads: int | None = None, prompt_len: int = 128,
              gen: int = 32, ctx: int | None = None, kv: str = "f16", device: str = "all",
              vs: str | None = None, onnx: str | os.PathLike | None = None, budget: Budget | None = None,
              speculate: str | None = None, draft_max: int = 8) -> dict:
    """Measure a GGUF model here (optionally beside llama.cpp / onnxruntime-genai: `vs`), project it
    onto phone profiles (`device`) and check `budget`: the results dict `--json` writes
    (docs/bench_schema.md). `pocketlm bench` and `pocketlm.benchmark` are thin layers over this;
    the dict's "command" is the `pocketlm bench` command line that repeats the run."""
    progress = Progress()
    path = os.fspath(model_path)
    if not os.path.isfile(path):
        raise PocketLMError("no such file", path)
    if threads is not None:
        threads = check_threads(threads, "--threads")
    if prompt_len < 1 or gen < 1:
        raise PocketLMError("--prompt-len and --gen must be >= 1")
    if speculate is not None:
        from .runtime.speculative import make_speculator
        make_speculator(speculate, draft_max)  # a bad mode or --draft-max fails here, not in the child
    budget = Budget() if budget is None else budget
    command = bench_command_line(path, threads=threads, prompt_len=prompt_len, gen=gen, ctx=ctx, kv=kv,
                                 device=device, vs=vs, onnx=onnx, budget=budget, speculate=speculate,
                                 draft_max=draft_max)
    devices, auto = parse_devices(device)
    peers = parse_peers(vs)
    from . import hostinfo

    threads = threads or hostinfo.default_threads()
    model = model_facts(path, ctx, kv)
    ctx = model["ctx"]
    if ctx > model["max_context"]:
        raise PocketLMError(f"--ctx {ctx} exceeds the model's maximum of {model['max_context']}", path)
    if prompt_len + gen + 1 > ctx:
        raise PocketLMError(f"prompt {prompt_len} + {gen} generated tokens do not fit the context "
                            f"of {ctx} (raise --ctx)", path)
    model.update(prompt_tokens=prompt_len, gen_tokens=gen)
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    host = hostinfo.describe(threads)
    progress.stage(f"measuring this host's read bandwidth ({threads} threads)")
    host["read_bandwidth_gbs"] = hostinfo.read_bandwidth_gbs(threads)
    progress.stage(f"read bandwidth {host['read_bandwidth_gbs']:.1f} GB/s; int8 peak estimate "
                   f"{host['int8_peak_gops']:.0f} Gops ({host['int8_peak_basis']})")

    # the sweep positions within the context (the last one pulled back so its steps fit)
    sweep = sorted({min(c, ctx - SWEEP_TOKENS) for c in SWEEP_CONTEXTS if c <= ctx and ctx > SWEEP_TOKENS})
    spec = {"path": os.path.abspath(path), "threads": threads, "ctx": ctx, "kv": kv,
            "prompt": prompt_len, "gen": gen, "sweep": sweep, "vocab": model["vocab"],
            "speculate": speculate, "draft_max": draft_max}
    engines = [run_child("pocketlm", spec, progress)]
    onnx_bytes = None
    for peer in peers:
        if peer == "onnxruntime":
            folder = ensure_onnx(path, onnx, progress)
            spec_o = {**spec, "onnx": str(folder)}
            onnx_bytes = onnx_weight_bytes_per_token(folder)
            engines.append(run_child(peer, spec_o, progress))
        else:
            engines.append(run_child(peer, spec, progress))
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    host["load_average"] = [load_start, load_end]

    records: list[dict] = []
    works: dict[str, Workload] = {}
    effs: dict[str, Efficiency] = {}
    ours = engines[0]
    for e in engines:
        if "error" in e:
            continue
        work = works[e["name"]] = engine_workload(model, e, prompt_len, gen, onnx_bytes)
        effs[e["name"]] = add_efficiency(e, work, host)
        if "error" not in ours and e is not ours:
            e["ratio_vs_pocketlm"] = {"decode": e["decode_tok_s"] / ours["decode_tok_s"],
                                      "prefill": e["prefill_tok_s"] / ours["prefill_tok_s"]}
    rows = calib.load_measurements()
    bands = calib.bands_from(calib.leave_one_out(rows, DEVICES))
    for e in engines:
        if "error" in e:
            continue
        work, ratio = works[e["name"]], ratio_vs_reference(e, engines)
        peer_memory = None if e["name"] == "pocketlm" else work.memory_bytes
        for dev in devices:
            records.append(calibrated_record(dev, e["name"], model["quant_type"], work, effs[e["name"]], ratio,
                                             rows, bands, budget, peer_memory, calib.shape_key(model)))
    if auto and "error" not in ours:
        key = detect_device(hostinfo.read_cpuinfo(), hostinfo.read_getprop(), hostinfo.read_dt_compatible())
        label = hostinfo.read_getprop().get("ro.product.model") or host["cpu"]
        host["detected_device"] = key
        if key is None:
            progress.done(f"--device auto: this SoC ({label}) has no profile; its figures are shown as "
                          f"measured on '{label}'")
        records.insert(0, measured_record(key, label, ours, works["pocketlm"], budget))
    published = published_comparison(model, records)
    created = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    return {"schema": SCHEMA, "created": created,
            "command": command,
            "host": host, "model": model,
            "budget": {"decode_tok_s": budget.decode_tok_s, "first_token_s": budget.first_token_s,
                       "prompt_tokens": budget.prompt_tokens, "memory_gb": budget.memory_gb},
            "engines": engines, "devices": records, "published": published, "plot": None}


def bench_command_line(path: str, *, threads: int | None, prompt_len: int, gen: int, ctx: int | None, kv: str,
                       device: str, vs: str | None, onnx: str | os.PathLike | None, budget: Budget,
                       speculate: str | None = None, draft_max: int = 8) -> list[str]:
    """The `pocketlm bench` argv that repeats a run with these settings (defaults left out); the
    model path as given (a relative path stays relative, so a report shows a path anyone can run)."""
    argv = ["pocketlm", "bench", path]
    defaults = Budget()
    for flag, value, default in (
            ("--threads", threads, None), ("--prompt-len", prompt_len, 128), ("--gen", gen, 32),
            ("--ctx", ctx, None), ("--kv", kv, "f16"), ("--device", device, "all"), ("--vs", vs, None),
            ("--onnx", None if onnx is None else os.fspath(onnx), None),
            ("--budget-decode", budget.decode_tok_s, defaults.decode_tok_s),
            ("--budget-ttft", budget.first_token_s, defaults.first_token_s),
            ("--budget-prompt", budget.prompt_tokens, defaults.prompt_tokens),
            ("--budget-memory", budget.memory_gb, defaults.memory_gb),
            ("--speculate", speculate, None), ("--draft-max", draft_max if speculate else 8, 8)):
        if value != default:
            argv += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    return argv


def run_bench(args: argparse.Namespace) -> dict:
    """`benchmark` on parsed `pocketlm bench` arguments."""
    budget = Budget(decode_tok_s=args.budget_decode, first_token_s=args.budget_ttft,
                    prompt_tokens=args.budget_prompt, memory_gb=args.budget_memory)
    if getattr(args, "no_cache", False):  # read by runtime/packed_cache.py in the engine's child process
        os.environ["POCKETLM_NO_PACKED_CACHE"] = "1"
    return benchmark(args.model, threads=args.threads, prompt_len=args.prompt_len, gen=args.gen, ctx=args.ctx,
                     kv=args.kv, device=args.device, vs=args.vs, onnx=args.onnx, budget=budget,
                     speculate=args.speculate, draft_max=args.draft_max)


# ---------------------------------------------------------------------------- output

def _mark(ok: bool) -> str:
    return "pass" if ok else "FAIL"


def format_tables(res: dict, phones: bool = True) -> str:
    h, m = res["host"], res["model"]
    lines = [f"host: {h['cpu']} ({h['machine']}), {h['threads']} threads, kernel {h['kernel_path']}, "
             f"read bandwidth {h['read_bandwidth_gbs']:.1f} GB/s, int8 peak ~{h['int8_peak_gops']:.0f} Gops",
             f"model: {m['name']} ({m['file_bytes'] / 1e9:.2f} GB, {m['bits_per_weight']:.2f} bpw), prompt "
             f"{m['prompt_tokens']}, generate {m['gen_tokens']}, context {m['ctx']}, KV {m['kv']}",
             "",
             f"{'engine':<12} {'prefill t/s':>11} {'decode t/s':>10} {'TTFT s':>7} {'peak RSS MB':>11} "
             f"{'anon MB':>8} {'file MB':>8} {'MB/token':>8} {'GB/s':>6} {'BW eff':>6} {'vs pocketlm':>18}"]
    for e in res["engines"]:
        if "error" in e:
            lines.append(f"{e['name']:<12} error: {e['error']}")
            continue
        ratio = e.get("ratio_vs_pocketlm")
        rtxt = f"dec {ratio['decode']:.2f}x pre {ratio['prefill']:.2f}x" if ratio else ""
        lines.append(f"{e['name']:<12} {e['prefill_tok_s']:>11.2f} {e['decode_tok_s']:>10.2f} "
                     f"{e['first_token_s']:>7.2f} {e['peak_rss_bytes'] / 1e6:>11.0f} "
                     f"{e['rss_anon_bytes'] / 1e6:>8.0f} {e['rss_file_bytes'] / 1e6:>8.0f} "
                     f"{e['bytes_per_token'] / 1e6:>8.0f} {e['achieved_bandwidth_gbs']:>6.1f} "
                     f"{e['bandwidth_efficiency']:>6.0%} {rtxt:>18}")
    sweep = next((e.get("decode_vs_context") for e in res["engines"] if e["name"] == "pocketlm"), None)
    if sweep:
        lines.append("pocketlm decode vs context: " + ", ".join(
            f"{s['context']}: {s['decode_tok_s']:.2f} tok/s" for s in sweep))
    sp = next((e.get("speculative") for e in res["engines"] if e["name"] == "pocketlm"), None)
    if sp:
        lines.append(f"pocketlm --speculate {sp['mode']} --draft-max {sp['draft_max']}: decode "
                     f"{sp['decode_tok_s']:.2f} tok/s, acceptance {sp['acceptance']:.0%} "
                     f"({sp['accepted']}/{sp['drafted']}), {sp['tokens_per_forward']:.2f} tokens per forward pass, "
                     f"same tokens as plain: {'yes' if sp['same_tokens'] else 'no'}")
    if phones:
        lines += ["", *phone_lines(res)]
    return "\n".join(lines)


def phone_lines(res: dict) -> list[str]:
    """The phone table: per device and engine the projection, its error band and the verdicts."""
    b = res["budget"]
    lines = [f"phone budget: decode >= {b['decode_tok_s']:g} tok/s, first token of a "
             f"{b['prompt_tokens']}-token prompt <= {b['first_token_s']:g} s, memory <= "
             f"{'the app limit' if b['memory_gb'] is None else str(b['memory_gb']) + ' GB'}",
             "CALIBRATED = published llama.cpp figures on that phone x this engine's speed relative to "
             "llama.cpp here; FALLBACK = the phone's DRAM peak x the efficiency phones with published figures "
             "reach (weaker); MEASURED = this run, on that device. +-: the leave-one-out error band (90 %); "
             "a budget inside it is 'borderline'",
             f"{'basis':<10} {'device':<17} {'SoC':<24} {'engine':<12} {'decode':>7} {'+-':>4} "
             f"{'TTFT s':>7} {'+-':>4} {'mem GB':>9} decode     ttft       mem"]
    for r in res["devices"]:
        limit = f"{r['memory_gb']:.1f}"
        if r["memory_limit_gb"]:
            limit += f"/{r['memory_limit_gb']:.1f}"
        v = r.get("verdicts") or {k: _mark(x).lower() for k, x in r["passes"].items()}
        kind = r.get("basis", r["kind"]) if r["kind"] == "projection" else "measured"
        bd, bp = r.get("decode_band"), r.get("prefill_band")
        lines.append(f"{kind.upper():<10} {r['name'][:17]:<17} {r['soc'][:24]:<24} {r['engine']:<12} "
                     f"{r['decode_tok_s']:>7.1f} {_pct(bd):>4} {r['first_token_s']:>7.2f} {_pct(bp):>4} "
                     f"{limit:>9} {_v(v['decode']):<10} {_v(v['first_token']):<10} {_v(v['memory'])}")
        for a in r["advice"] if r["engine"] == "pocketlm" else []:
            lines.append(f"{'':<12}-> {a}")
    notes = list(dict.fromkeys(r["calibration"] for r in res["devices"]
                               if r.get("calibration") and r["engine"] == "pocketlm"))
    if notes:
        lines += ["pocketlm's projections rest on:"] + [f"  - {n}" for n in notes]
    if res["published"]:
        lines += ["", "published phi-3-mini-shaped phone figures beside their projections "
                      "(error = projection / published - 1):"]
        for p in res["published"]:
            bound = "> " if p["lower_bound"] else ""
            lines.append(f"  {p['device']:<11} {p['engine']:<12} {p['model']:<13} {p['quant']:<7} "
                         f"published {bound}{p['decode_tok_s']:g}, {p['path']} {p['projected_decode_tok_s']:.1f} "
                         f"tok/s: error {p['error']:+.0%}")
    return lines


def phi3_mini_phone_lines(budget: Budget | None = None) -> list[str]:
    """The phone table for a phi-3-mini-sized Q4_0 file (3.72 B weights at 4.55 bits, f16 KV cache at
    the default run's mean position), pocketlm taken as fast as llama.cpp: what `pocketlm demo` shows
    in place of its 4 M-parameter model's phone figures, which say nothing about a phone."""
    budget = Budget() if budget is None else budget
    shape = {"n_layers": 32, "n_heads": 32, "n_kv_heads": 32, "head_dim": 96, "sliding_window": 0,
             "n_weight_params": 3722382336, "hidden": 3072, "intermediate": 8192, "vocab": 32064}
    kv = kv_bytes_per_position(32, 32, 96, "f16")
    work = Workload(weight_bytes_per_token=2119234752, weight_file_bytes=2176176128,   # our Q4_0 file
                    n_weight_params=shape["n_weight_params"], kv_bytes_per_position=kv,
                    kv_positions_read=positions_read(128 + 16, 0), ctx=2048,
                    # overhead: RssAnon after loading that file (benchmarks/results/phi3-mini-q4_0-x86.json)
                    ops_per_token=ops_per_prompt_token(shape, 128), overhead_bytes=34938880,
                    kv_int8_bytes_per_position=kv_bytes_per_position(32, 32, 96, "int8"))
    rows = calib.load_measurements()
    bands = calib.bands_from(calib.leave_one_out(rows, DEVICES))
    recs = [calibrated_record(d, "pocketlm", "Q4_0", work, None, None, rows, bands,
                              budget, None, calib.shape_key(shape)) for d in DEVICES.values()]
    res = {"budget": {"decode_tok_s": budget.decode_tok_s, "first_token_s": budget.first_token_s,
                      "prompt_tokens": budget.prompt_tokens, "memory_gb": budget.memory_gb},
           "devices": recs, "published": []}
    return ["phone figures for a PHI-3-MINI-SIZED Q4_0 file (3.7 B weights, 2.2 GB), not the built-in model: "
            "published llama.cpp phone figures, pocketlm assumed as fast as llama.cpp (measure the ratio with "
            "`pocketlm bench FILE --vs llama.cpp`); memory: the file + an f16 KV cache of 2048 positions",
            *phone_lines(res)]


def _pct(band: float | None) -> str:
    return "-" if band is None or not math.isfinite(band) else f"{band:.0%}"


def _v(verdict: str) -> str:
    return {"pass": "pass", "fail": "FAIL", "borderline": "borderline"}.get(verdict, verdict)


def write_json(res: dict, path: str) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(res, f, indent=1, allow_nan=False, default=_json_default)
        f.write("\n")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)   # mkstemp makes 0600
    os.replace(tmp, target)


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"not JSON serializable: {type(x).__name__}")


def _finite(obj: Any) -> Any:
    """NaN/inf -> None (JSON has neither)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def bench_command(args: argparse.Namespace) -> int:
    if args.plot:  # fail before minutes of measuring, not after
        from .bench_plot import require_matplotlib
        require_matplotlib()
    return report(run_bench(args), args.json, args.plot)


def report(res: dict, json_path: str | os.PathLike | None = None, plot: str | os.PathLike | None = None,
           phones: bool = True) -> int:
    """Print `benchmark`'s tables (the phone table unless `phones` is False), write its JSON and plot
    when asked; 0 if every engine ran, else 1."""
    if plot:
        from .bench_plot import plot_results
        plot_results(res, plot)
        res["plot"] = os.path.abspath(plot)
    res = _finite(res)
    print(format_tables(res) if phones else format_tables(res, phones=False))
    if json_path:
        write_json(res, json_path)
        print(f"\nwrote {json_path}", file=sys.stderr)
    return 0 if all("error" not in e for e in res["engines"]) else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench", help="measure tok/s and memory here, project them onto phones against a budget",
        description="Measure prefill/decode speed, time to first token and memory of a GGUF model on this "
                    "machine (optionally beside llama.cpp and onnxruntime-genai), then project it onto phone "
                    "profiles and check the phone budget. JSON schema: docs/bench_schema.md.")
    p.add_argument("model", help="phi3 GGUF file")
    p.add_argument("--threads", "-t", type=threads_arg, default=None,
                   help="threads for every engine, 1..CPUs (default: the big cores, at most 4)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default 128)")
    p.add_argument("--gen", type=int, default=32, help="tokens to decode (default 32)")
    p.add_argument("--ctx", type=int, default=None, help="context size (default: model's, max 2048)")
    p.add_argument("--kv", choices=("f16", "int8", "f32"), default="f16", help="pocketlm KV cache type")
    p.add_argument("--no-cache", action="store_true",
                   help="repack weights in memory, never into ~/.cache/pocketlm/packed (see `pocketlm run --help`)")
    p.add_argument("--device", default="all",
                   help=f"device profile(s) to project onto: {', '.join(DEVICES)} (comma list), all, or "
                        f"auto (on a phone: detect the SoC and label this run as measured on it)")
    p.add_argument("--vs", default=None, help="peers to run on the same model: llama.cpp,onnxruntime")
    p.add_argument("--onnx", default=None,
                   help="ONNX export folder for onnxruntime (default: export on the fly, cached)")
    p.add_argument("--speculate", choices=("lookup",), default=None,
                   help="also decode with speculative lookup decoding: acceptance rate, tokens per forward pass")
    p.add_argument("--draft-max", type=int, default=8, help="most tokens drafted per verify (default 8)")
    p.add_argument("--json", default=None, help="write the results as JSON (docs/bench_schema.md)")
    p.add_argument("--plot", default=None, help="write a PNG: tok/s vs context, projected tok/s per device")
    p.add_argument("--budget-decode", type=float, default=Budget.decode_tok_s,
                   help="decode budget, tok/s (12)")
    p.add_argument("--budget-ttft", type=float, default=Budget.first_token_s,
                   help="time-to-first-token budget, s (1.5)")
    p.add_argument("--budget-prompt", type=int, default=Budget.prompt_tokens,
                   help="prompt tokens the TTFT budget is for (128)")
    p.add_argument("--budget-memory", type=float, default=None,
                   help="memory budget, GB (default: each device's app memory limit)")
    p.set_defaults(func=bench_command)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        sys.exit(child_main(sys.argv[2], sys.argv[3]))
    sys.exit("usage: python -m pocketlm.bench --child ENGINE SPEC_JSON (internal; use `pocketlm bench`)")
