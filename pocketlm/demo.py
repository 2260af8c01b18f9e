"""`pocketlm demo`: the built-in model, start to finish, with no network and no arguments."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"
DEFAULT_PROMPT = "ROMEO.\nBut soft, what light"


def reference_generate(ckpt_dir: Path, prompt: str, max_tokens: int, temperature: float = 0.0,
                       seed: int = 0) -> Iterator[str]:
    """Stream a continuation from the fp32 reference model (the golden model, not the runtime)."""
    from .checkpoint import Checkpoint
    from .reference import Phi3Reference
    from .tokenizer import Tokenizer

    ckpt = Checkpoint.open(ckpt_dir)
    tok = Tokenizer.from_hf_dir(ckpt_dir)
    model = Phi3Reference.from_checkpoint(ckpt)
    rng = np.random.default_rng(seed)
    cache = model.new_cache()
    logits = model.forward(tok.encode(prompt), cache)[-1]
    decoder = tok.stream_decoder(continuation=True)
    for _ in range(max_tokens):
        if temperature > 0:
            p = np.exp((logits - logits.max()) / temperature)
            token = int(rng.choice(len(p), p=p / p.sum()))
        else:
            token = int(np.argmax(logits))
        if token in tok.stop_ids:
            break
        yield decoder.push(token)
        logits = model.forward([token], cache)[-1]
    yield decoder.flush()


def run_demo(prompt: str = DEFAULT_PROMPT, max_tokens: int = 64, temperature: float = 0.0) -> int:
    from .info import describe_checkpoint

    print(describe_checkpoint(BUILTIN_DIR))
    print(f"\nreference model (numpy fp32), greedy continuation of {prompt!r}:\n")
    print(prompt, end="", flush=True)
    start, n = time.perf_counter(), 0
    for piece in reference_generate(BUILTIN_DIR, prompt, max_tokens, temperature):
        print(piece, end="", flush=True)
        n += 1
    elapsed = time.perf_counter() - start
    print(f"\n\n[{n} tokens in {elapsed:.1f} s, {n / elapsed:.1f} tok/s]", file=sys.stderr)
    return 0


def _run(args: argparse.Namespace) -> int:
    return run_demo(args.prompt, args.n, args.temp)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the built-in model end to end (offline)")
    p.add_argument("-p", "--prompt", default=DEFAULT_PROMPT)
    p.add_argument("-n", type=int, default=64, help="tokens to generate")
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    p.set_defaults(func=_run)
