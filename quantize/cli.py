"""`pocketlm quantize` and `pocketlm eval`: the quantizer and its quality harness on the command line."""

from __future__ import annotations

import argparse

from pocketlm.threads import available_cpus, threads_arg


def _quantize(args: argparse.Namespace) -> int:
    from .pipeline import Options, quantize_checkpoint

    opts = Options(act_order=not args.no_act_order, percdamp=args.damp, sequential=args.sequential)
    summary = quantize_checkpoint(
        args.checkpoint, args.output, recipe=args.recipe, method=args.method, calib=args.calib,
        calib_samples=args.calib_samples, calib_len=args.calib_len, threads=args.threads,
        progress=not args.quiet, options=opts)
    print(summary.text())
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate

    result = evaluate(args.model, args.ref, text=args.text, n_tokens=args.tokens, ctx=args.ctx)
    print(result.to_json() if args.json else result.text_report())
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    q = sub.add_parser("quantize", help="quantize a checkpoint folder to a GGUF file, one layer at a time",
                       description="Quantize a Hugging Face Phi-3 checkpoint folder into a GGUF file "
                                   "(streaming: one decoder layer in memory at a time).")
    q.add_argument("checkpoint", help="Hugging Face checkpoint folder (config.json, safetensors, tokenizer)")
    q.add_argument("-o", "--output", required=True, help="output .gguf file (written atomically)")
    # names are checked by quantize_checkpoint (a PocketLMError lists the valid ones), so that
    # building the parser imports nothing heavy
    q.add_argument("--recipe", default="q4_0",
                   help="which type each tensor gets: q4_0 (default), q4_k_m, q8_0, f16, pocket")
    q.add_argument("--method", default="rtn",
                   help="how codes are chosen: rtn (default), mse, imatrix, gptq, awq, awq+gptq, ...")
    q.add_argument("--calib", default=None,
                   help="calibration text file or folder of *.txt (default: the corpus calib split)")
    q.add_argument("--calib-samples", type=int, default=64, help="calibration sequences N")
    q.add_argument("--calib-len", type=int, default=256, help="tokens per calibration sequence L")
    q.add_argument("--threads", type=threads_arg, default=available_cpus(),
                   help="threads quantizing independent tensors in parallel, 1..CPUs (default: all CPUs)")
    q.add_argument("--damp", type=float, default=0.01, help="GPTQ damping, fraction of mean(diag H)")
    q.add_argument("--no-act-order", action="store_true", help="GPTQ: keep the column order")
    seq = q.add_mutually_exclusive_group()
    seq.add_argument("--sequential", dest="sequential", action="store_const", const=True, default=None,
                     help="calibrate each linear layer on inputs through the already quantized ones of its "
                          "decoder layer (no thread parallelism within a layer; the default for gptq)")
    seq.add_argument("--no-sequential", dest="sequential", action="store_const", const=False,
                     help="calibrate a layer's linears in parallel (gptq then runs without its float target)")
    q.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=_quantize)

    e = sub.add_parser("eval", help="KL divergence, perplexity and top-1 agreement of a GGUF vs its "
                                    "float reference",
                       description="Compare a quantized GGUF with the float32 reference checkpoint on "
                                   "held-out text.")
    e.add_argument("model", help="GGUF file (ours or llama.cpp's)")
    e.add_argument("--ref", required=True, help="the float checkpoint folder it was made from")
    e.add_argument("--text", default=None, help="evaluation text file (default: the corpus heldout split)")
    e.add_argument("--tokens", type=int, default=8192, help="tokens to score (about)")
    e.add_argument("--ctx", type=int, default=256, help="tokens per evaluation chunk")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.set_defaults(func=_eval)
