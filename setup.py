"""Build of the C kernel `pocketlm.runtime._kernel` (all other metadata lives in pyproject.toml).

No -march=native: every SIMD path is compiled with a per-function target attribute and chosen at
run time from the CPU's features, so one build runs on any x86-64 / ARM64 machine.
"""

from __future__ import annotations

import sys
from pathlib import Path

from setuptools import Extension, setup

KERNEL_DIR = Path("runtime") / "kernel"
# selftest.c is the standalone driver for cross-builds; it has its own main().
SOURCES = sorted(str(p) for p in KERNEL_DIR.glob("*.c") if p.name != "selftest.c")


def platform_macros() -> list[tuple[str, str | None]]:
    if sys.platform == "darwin":
        return [("_DARWIN_C_SOURCE", None)]  # sysctlbyname under -std=c11
    return [("_GNU_SOURCE", None)]  # getauxval, posix_memalign, pthread under -std=c11 (glibc, bionic)


def platform_link_args() -> list[str]:
    # -pthread works with gcc and clang on glibc and bionic (Termux: no separate libpthread);
    # macOS has pthreads in libSystem
    return [] if sys.platform == "darwin" else ["-pthread"]


kernel = Extension(
    "pocketlm.runtime._kernel",
    sources=SOURCES,
    depends=[str(p) for p in KERNEL_DIR.glob("*.h")],
    include_dirs=[str(KERNEL_DIR)],
    define_macros=platform_macros(),
    extra_compile_args=["-O3", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-function"],
    extra_link_args=platform_link_args(),
    libraries=[] if sys.platform == "darwin" else ["m"],
)

setup(ext_modules=[kernel])
