"""`pocketlm export`: a checkpoint folder to an unquantized GGUF, or a GGUF to an ONNX folder.

    pocketlm export CKPT_DIR --gguf OUT.gguf [--dtype f16|f32]
    pocketlm export MODEL.gguf --onnx OUT_DIR [--accuracy-level auto|0|1|4]

Nothing heavy is imported until a handler runs (the parser is built for every command, `run` too).
"""

from __future__ import annotations

import argparse


def _run(args: argparse.Namespace) -> int:
    from pocketlm.errors import PocketLMError

    if (args.gguf is None) == (args.onnx is None):
        raise PocketLMError("give exactly one of --gguf OUT.gguf (from a checkpoint folder) or "
                            "--onnx OUT_DIR (from a GGUF file)")
    if args.onnx is not None:
        from .onnx_export import run_onnx_export

        return run_onnx_export(args)
    from .gguf_export import export_gguf
    from .gguf_info import describe_gguf

    out = export_gguf(args.source, args.gguf, dtype=args.dtype)
    print(describe_gguf(out))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a checkpoint to GGUF (llama.cpp) or a GGUF to ONNX")
    p.add_argument("source", metavar="SOURCE",
                   help="checkpoint folder (with --gguf) or GGUF file (with --onnx)")
    p.add_argument("--gguf", metavar="OUT.gguf", help="write the checkpoint as an unquantized GGUF file")
    p.add_argument("--dtype", choices=("f16", "f32"), default="f16",
                   help="with --gguf: type of the embedding and linear weights (norms stay f32); default f16")
    p.add_argument("--onnx", metavar="OUT_DIR",
                   help="convert the GGUF file into an ONNX folder for ONNX Runtime / onnxruntime-genai")
    p.add_argument("--accuracy-level", choices=("0", "1", "4", "auto"), default=None,
                   help="with --onnx: MatMulNBits accuracy level: auto (default: 4 if its measured cost on a "
                        "probe text is small, see pocketlm.export.onnx_accuracy, else 1), 1 (float32 "
                        "activations), 4 (int8 activations: ~3x faster decoding; can change top tokens on "
                        "models with activation outliers, onnxruntime issue 29849) or 0")
    p.set_defaults(func=_run)
