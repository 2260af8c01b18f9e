"""`pocketlm` command line: one console script, one subcommand per user job.

Each subcommand lives beside the code it drives and exposes `register(subparsers)`; heavy imports
happen inside the handlers so that `pocketlm run` loads only numpy and the kernel.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import signal
import sys
import threading

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


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM, so that every `finally` and `with` block runs (the
    quantizer's and the GGUF writer's temporary files are removed) before the process exits.
    A BaseException, like KeyboardInterrupt: no `except Exception` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = int(signum)


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(signum)


class StdoutFailed(BaseException):
    """Writing standard output failed (`error`: a closed pipe, a full disk). A BaseException, so
    no handler meant for the verb's own files catches it; `main` turns it into the exit."""

    def __init__(self, error: OSError):
        super().__init__(error)
        self.error = error


class _GuardedStdout:
    """sys.stdout during a verb: a failed write or flush raises StdoutFailed, so `main` can tell
    it from an OSError on any other file. Everything else is the wrapped stream's."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as e:
            raise StdoutFailed(e) from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as e:
            raise StdoutFailed(e) from None

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _replace_undecodable_output()
    previous = _install_sigterm()
    stdout = sys.stdout
    sys.stdout = _GuardedStdout(stdout)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a full disk or closed pipe shows here, not at interpreter exit
        return code
    except PocketLMError as e:
        print(f"pocketlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pocketlm: interrupted", file=sys.stderr)
        return 130
    except Terminated as t:
        print("pocketlm: terminated", file=sys.stderr)
        return 128 + t.signum
    except StdoutFailed as failed:
        _discard_stdout(stdout)
        if isinstance(failed.error, BrokenPipeError):
            # The reader went away (`pocketlm run ... | head -c 5`): end quietly, as Unix tools
            # do, with the status a shell reports for a tool killed by SIGPIPE.
            return 128 + signal.SIGPIPE
        e = failed.error
        print(f"pocketlm: error: cannot write to standard output: {e.strerror or e}", file=sys.stderr)
        return 2
    finally:
        sys.stdout = stdout
        for sig, handler in (previous or {}).items():
            signal.signal(sig, handler)


def _install_sigterm():
    """SIGTERM (and SIGHUP: the terminal went away) -> Terminated in the main thread; returns the
    handlers to restore (None off the main thread, where Python cannot install handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    wanted = [signal.SIGTERM, *([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])]
    return {sig: signal.signal(sig, _raise_terminated) for sig in wanted}


def _replace_undecodable_output() -> None:
    """Generated text can hold anything a vocabulary's bytes decode to; a stdout whose encoding
    cannot show a character (a C locale, PYTHONIOENCODING=ascii) writes "?" instead of failing;
    undecodable bytes typed into `chat` read as U+FFFD."""
    for stream in (sys.stdin, sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            with contextlib.suppress(ValueError, OSError, io.UnsupportedOperation):
                reconfigure(errors="replace")


def _discard_stdout(stream) -> None:
    """Point the real stdout at /dev/null so the interpreter's final flush of what is still buffered
    does not fail a second time (the recipe in Python's signal documentation)."""
    try:
        fd = stream.fileno()
    except (AttributeError, ValueError, OSError):
        return  # not a real file (a test's capture buffer)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
