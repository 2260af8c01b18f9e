"""`pocketlm run` and `pocketlm chat`: generation from a GGUF file on the command line.

Both import only numpy and the kernel extension (no torch, transformers or onnx): this module
imports nothing heavy at the top, and the runtime modules it loads in the handlers are numpy-only.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import PocketLMError
from ..threads import threads_arg


def register(subparsers: argparse._SubParsersAction) -> None:
    run = subparsers.add_parser("run", help="generate text from a prompt with a GGUF model",
                                description="Stream a continuation of a prompt to stdout; speeds go to "
                                            "stderr at the end.")
    run.add_argument("model", help="phi3 GGUF file")
    run.add_argument("-p", "--prompt", required=True, help="prompt text")
    run.add_argument("-n", "--n-predict", type=int, default=128, help="tokens to generate (default 128)")
    _sampling_args(run)
    run.add_argument("--ignore-eos", action="store_true",
                     help="keep generating exactly N tokens past end-of-text (for benchmarks)")
    run.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    run.set_defaults(func=run_command)

    chat = subparsers.add_parser("chat", help="interactive chat with a GGUF model (Phi-3 template)",
                                 description="Reads one user message per line from stdin (a terminal or a "
                                             "pipe); /reset clears the history, /exit or end of input quits.")
    chat.add_argument("model", help="phi3 GGUF file")
    chat.add_argument("-n", "--n-predict", type=int, default=512, help="max tokens per answer (default 512)")
    chat.add_argument("--system", default="", help="system message")
    _sampling_args(chat)
    chat.set_defaults(func=chat_command)


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temp", type=float, default=0.8, help="temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=40, help="top-k, 0 = off (default 40)")
    p.add_argument("--top-p", type=float, default=0.95, help="top-p, 1 = off (default 0.95)")
    p.add_argument("--min-p", type=float, default=0.05, help="min-p, 0 = off (default 0.05)")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="repetition penalty, 1 = off")
    p.add_argument("--seed", type=int, default=None, help="random seed")
    p.add_argument("--threads", "-t", type=threads_arg, default=None,
                   help="kernel threads, 1..CPUs (default: cores, max 4)")
    p.add_argument("--ctx", "-c", type=int, default=None, help="context size (default: model's, max 4096)")
    p.add_argument("--kv", choices=("f16", "int8", "f32"), default="f16", help="KV cache type (default f16)")
    p.add_argument("--quiet", action="store_true", help="do not print speeds")
    p.add_argument("--speculate", choices=("lookup",), default=None,
                   help="lookup: draft tokens from the prompt and the text so far, verify them in one batched "
                        "forward (same output as without; backs off when drafts fail)")
    p.add_argument("--draft-max", type=int, default=8, help="most tokens drafted per verify, 1-15 (default 8)")
    p.add_argument("--no-cache", action="store_true",
                   help="do not write (or read) the repacked copy of the weights under ~/.cache/pocketlm/packed "
                        "(the first run of a Q4_0/Q8_0/Q4_K file otherwise writes one, about the file's size; "
                        "`rm -r ~/.cache/pocketlm/packed` deletes them): repack in memory at every load instead")


def _load(args: argparse.Namespace):
    from .model import load

    if args.n_predict < 1:
        raise PocketLMError(f"-n must be >= 1, got {args.n_predict}")
    model = load(args.model, threads=args.threads, ctx=args.ctx, kv=args.kv,
                 repack="memory" if args.no_cache else "auto")
    if model.tokenizer is None:
        raise PocketLMError("this GGUF file carries no tokenizer", args.model)
    return model


def _gen_kwargs(args: argparse.Namespace) -> dict:
    return dict(max_tokens=args.n_predict, temperature=args.temp, top_k=args.top_k, top_p=args.top_p,
                min_p=args.min_p, repeat_penalty=args.repeat_penalty, seed=args.seed,
                speculate=args.speculate, draft_max=args.draft_max)


def _report(model, gen, quiet: bool) -> None:
    if quiet:
        return
    s = model.stats
    print(f"\n[pocketlm] load {s.load_seconds:.2f} s | prompt {s.prefill_tokens} tokens, "
          f"{s.prefill_tps:.1f} tok/s | generated {len(gen.tokens)} tokens, {s.decode_tps:.1f} tok/s "
          f"| stop: {gen.finish_reason}", file=sys.stderr)
    if gen.speculation is not None:
        print(f"[pocketlm] {gen.speculation.summary()}", file=sys.stderr)


def run_command(args: argparse.Namespace) -> int:
    from .generate import generate

    model = _load(args)
    gen = generate(model, args.prompt, ignore_eos=args.ignore_eos, stop=args.stop, **_gen_kwargs(args))
    for piece in gen:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    _report(model, gen, args.quiet)
    return 0


def chat_command(args: argparse.Namespace) -> int:
    from .generate import generate

    model = _load(args)
    tok = model.tokenizer
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if text.strip() in ("/exit", "/quit"):
            break
        if text.strip() == "/reset":
            messages = list(system)
            model.reset()
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
        ids = tok.encode(prompt, add_bos=None)
        if len(ids) + 1 > model.n_ctx:
            raise PocketLMError(f"the conversation ({len(ids)} tokens) no longer fits the context of "
                                f"{model.n_ctx}; use /reset or a larger --ctx")
        gen = generate(model, ids, **_gen_kwargs(args))
        for piece in gen:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": gen.text})
        _report(model, gen, args.quiet)
    return 0
