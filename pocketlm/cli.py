"""`pocketlm` command line: one console script, one subcommand per user job.

Each subcommand lives beside the code it drives and exposes `register(subparsers)`; heavy imports
happen inside the handlers so that `pocketlm run` loads only numpy and the kernel.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# pocketlm parallelises its own work (--threads: the kernel's pool, the quantizer's tensor pool), so
# numpy's BLAS runs one thread per caller: OpenBLAS's spinning threads on top of ours made small
# GPTQ solves 15x slower on this 2-core machine. Set before numpy loads; a user's own setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from .errors import PocketLMError

# module path -> its `register(subparsers)` adds one or more subcommands
COMMAND_MODULES = [
    "pocketlm.info",
    "pocketlm.demo",
    "pocketlm.quantize.cli",
    "pocketlm.export.cli",
    "pocketlm.runtime.cli",
    "pocketlm.bench",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pocketlm",
        description="Quantize, export, run and benchmark Phi-3-family models for phones.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except PocketLMError as e:
        print(f"pocketlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pocketlm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
