"""`pocketlm demo`: the whole story on the built-in model, offline, with no arguments.

    built-in checkpoint -> quantize (recommended recipe, calibrated) -> GGUF
                        -> export ONNX (onnxruntime-genai folder)
                        -> generate a continuation with pocketlm's runtime
                        -> bench on this host; phone budgets of a phi-3-mini-sized file

Every artefact lands in one folder (default `./pocketlm-demo`), named at the start and the end.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .errors import PocketLMError

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"
# `pocketlm demo --model small`: the second built-in model, of the Phi-3-small architecture.
MODELS = {"mini": (BUILTIN_DIR, "Phi-3 architecture"),
          "small": (BUILTIN_DIR.with_name("builtin_small"), "Phi-3-small architecture: block-sparse, GeGELU, muP")}
DEFAULT_PROMPT = "KING.\nNow, my lords,"
DEFAULT_OUT = "pocketlm-demo"
RECIPE, METHOD = "pocket", "gptq"  # the recommended recipe; see quantize/recipes.py and the README
STAGES = 5
CALIB_SAMPLES, CALIB_LEN = 16, 128  # enough for a 4-layer model; keeps the demo under 2 minutes


def _stage(k: int, text: str) -> float:
    print(f"\n[{k}/{STAGES}] {text}", file=sys.stderr, flush=True)
    return time.perf_counter()


def reference_generate(ckpt_dir: Path, prompt: str, max_tokens: int, temperature: float = 0.0,
                       seed: int = 0) -> Iterator[str]:
    """Stream a continuation from the fp32 reference model (the golden model, not the runtime)."""
    from .checkpoint import Checkpoint
    from .reference import Phi3Reference
    from .tokenizer import tokenizer_from_dir

    tok = tokenizer_from_dir(ckpt_dir)
    model = Phi3Reference.from_checkpoint(Checkpoint.open(ckpt_dir))
    rng = np.random.default_rng(seed)
    cache = model.new_cache()
    logits = model.forward(tok.encode(prompt), cache)[-1]
    decoder = tok.stream_decoder(continuation=True)
    for _ in range(max_tokens):
        token = _pick(logits, temperature, rng)
        if token in tok.stop_ids:
            break
        yield decoder.push(token)
        logits = model.forward([token], cache)[-1]
    yield decoder.flush()


def _pick(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    p = np.exp((logits - logits.max()) / temperature)
    return int(rng.choice(len(p), p=p / p.sum()))


def calibration_tokens(samples: int = 16, length: int = 128, seed: int = 0,
                       ckpt_dir: Path = BUILTIN_DIR) -> tuple[np.ndarray | None, str]:
    """Calibration for the demo: the corpus `calib` split when `../shared` is there (None: the
    pipeline's default), else text sampled from the fp32 model itself (data-free calibration),
    so the demo runs on a machine that has only the package."""
    from . import corpus

    try:
        corpus.corpus_dir()
        return None, "corpus calib split"
    except PocketLMError:
        pass
    from .checkpoint import Checkpoint
    from .reference import Phi3Reference
    from .tokenizer import tokenizer_from_dir

    tok = tokenizer_from_dir(ckpt_dir)
    model = Phi3Reference.from_checkpoint(Checkpoint.open(ckpt_dir))
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(samples):
        ids, cache = [tok.bos_id], model.new_cache()
        logits = model.forward(ids, cache)[-1]
        while len(ids) < length:
            ids.append(_pick(logits, 1.0, rng))
            logits = model.forward(ids[-1:], cache)[-1]
        rows.append(ids)
    return np.asarray(rows, dtype=np.int64), f"{samples} x {length} tokens sampled from the fp32 model"


def run_demo(out_dir: str | Path = DEFAULT_OUT, prompt: str = DEFAULT_PROMPT, max_tokens: int = 64,
             bench: bool = True, model_name: str = "mini") -> int:
    from .bench import benchmark, report
    from .info import describe_checkpoint
    from .quantize.pipeline import quantize_checkpoint
    from .runtime.generate import generate
    from .runtime.model import load

    if model_name not in MODELS:
        raise PocketLMError(f"unknown built-in model {model_name!r}; expected one of {', '.join(MODELS)}")
    ckpt_dir, what = MODELS[model_name]
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    print(f"pocketlm demo: artefacts go to {out}", file=sys.stderr)

    _stage(1, f"the built-in model {model_name!r} ({what}, trained on Shakespeare)")
    print(describe_checkpoint(ckpt_dir))

    t = _stage(2, f"quantize: recipe {RECIPE}, method {METHOD}")
    calib, calib_what = calibration_tokens(CALIB_SAMPLES, CALIB_LEN, ckpt_dir=ckpt_dir)
    print(f"calibration: {calib_what}", file=sys.stderr)
    gguf = out / f"{ckpt_dir.name}-{RECIPE}.gguf"
    s = quantize_checkpoint(ckpt_dir, gguf, recipe=RECIPE, method=METHOD, calib_tokens=calib,
                            calib_samples=CALIB_SAMPLES, calib_len=CALIB_LEN, progress=True)
    print(f"wrote {gguf.name}: {s.bits_per_weight:.2f} bits per weight, {s.file_bytes / 1e6:.2f} MB "
          f"(checkpoint: {ckpt_dir.joinpath('model.safetensors').stat().st_size / 1e6:.1f} MB), "
          f"calibration {s.calibration} ({time.perf_counter() - t:.1f} s)")

    t = _stage(3, "export the same integer weights to ONNX (onnxruntime-genai folder)")
    try:
        import onnx  # noqa: F401  (the exporter's one dependency beyond numpy)
    except ImportError:
        print("skipped: the ONNX exporter needs the `onnx` package (pip install 'pocketlm[onnx]')",
              file=sys.stderr)
    else:
        from .export.onnx_export import export_onnx

        export_onnx(gguf, out / "onnx", progress=True)
        print(f"({time.perf_counter() - t:.1f} s)", file=sys.stderr)

    _stage(4, f"generate with pocketlm's runtime (numpy + C kernel) from {gguf.name}, greedy")
    model = load(gguf)
    run = generate(model, prompt, max_tokens=max_tokens, temperature=0.0)
    print(prompt, end="", flush=True)
    for piece in run:
        print(piece, end="", flush=True)
    print(f"\n{run.stats}", file=sys.stderr)
    print("\nthe fp32 reference model (numpy), same prompt, for comparison:", file=sys.stderr)
    print(prompt + "".join(reference_generate(ckpt_dir, prompt, max_tokens)))

    if bench:
        _stage(5, "bench on this host, projected onto phone budgets")
        from .bench import phi3_mini_phone_lines

        # the built-in model's own phone figures (4 M weights) say nothing about a phone: the phone
        # table is for a phi-3-mini-sized file instead, labelled as such (bench.json keeps both)
        report(benchmark(gguf, device="all", prompt_len=128, gen=32), out / "bench.json", phones=False)
        print("\n" + "\n".join(phi3_mini_phone_lines()))
    print(f"\ndemo done in {time.perf_counter() - t_all:.0f} s; artefacts in {out}:", file=sys.stderr)
    for p in sorted(out.iterdir()):
        print(f"  {p.name}", file=sys.stderr)
    return 0


def _run(args: argparse.Namespace) -> int:
    return run_demo(args.out, args.prompt, args.n, bench=not args.no_bench, model_name=args.model)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the built-in model end to end: quantize, export, generate, bench")
    p.add_argument("-o", "--out", default=DEFAULT_OUT, help=f"artefact folder (default ./{DEFAULT_OUT})")
    p.add_argument("-p", "--prompt", default=DEFAULT_PROMPT)
    p.add_argument("-n", type=int, default=64, help="tokens to generate")
    p.add_argument("--no-bench", action="store_true", help="skip the benchmark stage")
    p.add_argument("--model", choices=tuple(MODELS), default="mini",
                   help="mini: the Phi-3 built-in model; small: the Phi-3-small one (pocketlm/builtin_small)")
    p.set_defaults(func=_run)
