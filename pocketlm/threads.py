"""One rule for thread counts, for every verb (`--threads` of run, chat, bench, quantize, eval, ...)
and for the Python API: refuse counts below 1; cap counts above the CPUs this process may use, with
a one-line note on stderr (999 kernel threads on 2 cores made prefill 100x slower, not faster)."""

from __future__ import annotations

import argparse
import os
import sys

from .errors import PocketLMError


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one, e.g. under taskset)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def check_threads(threads: int, what: str = "threads") -> int:
    """`threads` if it is an integer in [1, CPUs]; capped to the CPU count (a note on stderr) when
    above; a PocketLMError when below 1 or not an integer. `what` names it in the messages."""
    if isinstance(threads, bool) or not hasattr(threads, "__index__"):
        raise PocketLMError(f"{what} must be an integer >= 1, got {threads!r}")
    threads = int(threads)
    if threads < 1:
        raise PocketLMError(f"{what} must be >= 1, got {threads}")
    cpus = available_cpus()
    if threads > cpus:
        print(f"pocketlm: note: {what} {threads} is more than the {cpus} CPUs available; using {cpus}",
              file=sys.stderr)
        return cpus
    return threads


def threads_arg(text: str) -> int:
    """argparse `type=` for `--threads`: `check_threads` on the command line (argparse then prints
    the usage line and the message, and exits with 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    try:
        return check_threads(value, "--threads")
    except PocketLMError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
