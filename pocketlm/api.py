"""The public Python API: one function per CLI job, re-exported as `pocketlm.<name>`.

(`quantize_model` and `benchmark`, not `quantize`/`bench`: those names are pocketlm's subpackages.)

    import pocketlm
    ckpt = pocketlm.load_checkpoint("phi-3-mini-4k-instruct")        # pocketlm info
    pocketlm.quantize_model(ckpt.path, "mini.gguf", recipe="q4_0", method="gptq")  # pocketlm quantize
    pocketlm.export_onnx("mini.gguf", "mini-onnx")                   # pocketlm export --onnx
    model = pocketlm.load("mini.gguf", threads=2)                    # pocketlm run
    for text in pocketlm.generate(model, "<|user|>\\nHi<|end|>\\n<|assistant|>\\n", max_tokens=64):
        print(text, end="")
    results = pocketlm.benchmark("mini.gguf", device="all", vs="llama.cpp")  # pocketlm bench

Each function imports its stage only when called, so `import pocketlm` stays light (the runtime
on a phone needs numpy and the kernel only).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .checkpoint import Checkpoint
    from .export.onnx_export import ExportSummary
    from .quantize.pipeline import QuantizeSummary
    from .runtime.generate import Generation
    from .runtime.model import Model

PathLike = str | os.PathLike


def load_checkpoint(path: PathLike) -> Checkpoint:
    """A Hugging Face Phi-3 checkpoint folder, memory-mapped (tensors read one at a time)."""
    from .checkpoint import Checkpoint

    return Checkpoint.open(path)


def quantize_model(checkpoint_dir: PathLike, out_path: PathLike, recipe: str = "q4_0", method: str = "rtn",
             **options: Any) -> QuantizeSummary:
    """Quantize a checkpoint folder into a GGUF file, one layer at a time (see `quantize_checkpoint`
    for calibration options: calib, calib_samples, calib_len, calib_tokens, threads, progress)."""
    from .quantize.pipeline import quantize_checkpoint

    return quantize_checkpoint(checkpoint_dir, out_path, recipe=recipe, method=method, **options)


def export_gguf(checkpoint_dir: PathLike, out_path: PathLike, dtype: str = "f16") -> os.PathLike:
    """An unquantized (f16/f32) GGUF of a checkpoint folder, for llama.cpp."""
    from .export.gguf_export import export_gguf as _export

    return _export(checkpoint_dir, out_path, dtype=dtype)


def export_onnx(gguf_path: PathLike, out_dir: PathLike, accuracy_level: int | str | None = None,
                progress: bool = False) -> ExportSummary:
    """A lossless ONNX decoder + onnxruntime-genai folder holding the GGUF's integer weights."""
    from .export.onnx_export import export_onnx as _export

    return _export(gguf_path, out_dir, accuracy_level=accuracy_level, progress=progress)


def load(gguf_path: PathLike, **options: Any) -> Model:
    """pocketlm's runtime on a phi3 GGUF (threads, ctx, kv="f16"|"int8"|"f32", ...)."""
    from .runtime.model import load as _load

    return _load(gguf_path, **options)


def generate(model: Model, prompt: str, *, speculate: str | None = None, draft_max: int = 8,
             **options: Any) -> Generation:
    """Stream text after `prompt` (max_tokens, temperature, top_k, top_p, min_p, repeat_penalty,
    seed, stop, stop_tokens, ignore_eos, speculate="lookup" with draft_max: lossless speculative
    decoding from the prompt's own text); iterate it for text pieces."""
    from .runtime.generate import generate as _generate

    return _generate(model, prompt, speculate=speculate, draft_max=draft_max, **options)


def benchmark(gguf_path: PathLike, *, threads: int | None = None, prompt_len: int = 128, gen: int = 32,
              ctx: int | None = None, device: str = "all", vs: str | None = None, **options: Any) -> dict:
    """`pocketlm bench` as a function: the results dict that `--json` writes (docs/bench_schema.md);
    options: kv, onnx (an export folder for the onnxruntime peer), budget (`pocketlm.bench.Budget`)."""
    from .bench import benchmark as _benchmark

    return _benchmark(gguf_path, threads=threads, prompt_len=prompt_len, gen=gen, ctx=ctx, device=device, vs=vs,
                      **options)
