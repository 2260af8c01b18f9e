"""Weight matrices repacked once into the kernel's faster layouts, kept in a cache file.

The kernel reads Q4_0, Q8_0 and Q4_K faster from its own interleaved layouts (`kernel.packed_type`,
the same size as the source type). Repacking a 2 GB model takes seconds, so it is done once per
model file: every matrix the kernel wants repacked is written, in file order, to one cache file,
which later loads map read-only (zero copy again; the original file's pages for those matrices are
never touched). Models whose packed matrices total less than 64 MB are repacked in memory at each
load instead, and so is everything with `use_cache=False` (`--no-cache` on the command line: no
disk used, the packed copy costs anonymous memory of the same size and the repacking time at every
load).

Cache key: the model file's absolute path, size and modification time, and the kernel build
(its shared object's size and modification time: a rebuilt kernel may change the layout). The file
goes to $POCKETLM_CACHE/packed (default ~/.cache/pocketlm/packed), written atomically, and its
writing is announced on stderr with its size; if it cannot be written, the matrices are repacked
into memory instead. A newer cache file of the same model replaces older ones. To reclaim the
space: `rm -r ~/.cache/pocketlm/packed` (or the $POCKETLM_CACHE one); the next load rebuilds what
it needs. `pocketlm info MODEL.gguf` shows the cache files of a model.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import _kernel
from . import kernel as kern

ALIGN = 64  # each packed matrix starts on a 64-byte boundary of the cache file
MIN_CACHED_BYTES = 64 << 20  # smaller models are repacked in memory at every load (milliseconds)
SUFFIX = ".packed"
ENV_NO_CACHE = "POCKETLM_NO_PACKED_CACHE"  # "1": as use_cache=False (`pocketlm bench --no-cache` sets it)


def cache_dir() -> Path:
    return Path(os.environ.get("POCKETLM_CACHE", Path.home() / ".cache" / "pocketlm")) / "packed"


def _key(model_path: str) -> str:
    st = os.stat(model_path)
    so = os.stat(_kernel.__file__)
    raw = f"{os.path.abspath(model_path)}|{st.st_size}|{st.st_mtime_ns}|{so.st_size}|{so.st_mtime_ns}"
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def cache_path(model_path: str) -> Path:
    """Where the packed copy of this model file (for this kernel build) lives or would live."""
    return cache_dir() / f"{Path(model_path).name}.{_key(model_path)}{SUFFIX}"


def cached_copies(model_path: str) -> list[tuple[Path, int, bool]]:
    """(path, bytes, current) of every cache file of a model file of this name; current: made for
    this very file and kernel build (the others are stale and are replaced at the next load)."""
    folder, name = cache_dir(), Path(model_path).name
    if not folder.is_dir():
        return []
    try:
        current = cache_path(model_path)
    except OSError:
        current = None
    out = []
    for p in sorted(folder.glob(f"{name}.*{SUFFIX}")):
        if p.name[len(name) + 1:-len(SUFFIX)].isalnum():  # name.<key>.packed, not another model's
            try:
                out.append((p, p.stat().st_size, p == current))
            except OSError:
                continue
    return out


def _offsets(sizes: Sequence[int]) -> tuple[list[int], int]:
    offsets, pos = [], 0
    for n in sizes:
        offsets.append(pos)
        pos += (n + ALIGN - 1) // ALIGN * ALIGN
    return offsets, pos


Matrix = tuple[str, np.ndarray, int, int, int]  # (name, raw bytes, GGML type, rows, K)


def packed_matrices(model_path: str, mats: Sequence[Matrix], use_cache: bool = True) -> dict[str, np.ndarray]:
    """name -> packed bytes (1-D uint8) for `mats` = [(name, raw bytes, gtype, rows, K), ...]."""
    if not mats:
        return {}
    sizes = [raw.nbytes for _, raw, _, _, _ in mats]
    offsets, total = _offsets(sizes)
    if total < MIN_CACHED_BYTES or not use_cache or os.environ.get(ENV_NO_CACHE, "") not in ("", "0"):
        return _in_memory(mats)
    path = cache_path(model_path)
    if not (path.is_file() and path.stat().st_size == total):
        try:
            _write(path, mats, offsets, total)
        except OSError as e:  # read-only home, full disk: repack into memory instead
            print(f"pocketlm: could not write the repacked weights to {path} ({e.strerror or e}); "
                  f"repacking in memory", file=sys.stderr)
            return _in_memory(mats)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    return {name: data[off:off + n] for (name, _, _, _, _), off, n in zip(mats, offsets, sizes, strict=True)}


def _in_memory(mats: Sequence[Matrix]) -> dict[str, np.ndarray]:
    return {name: kern.repack(raw, gtype, rows, K).reshape(-1) for name, raw, gtype, rows, K in mats}


def _write(path: Path, mats: Sequence[Matrix], offsets: list[int], total: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"pocketlm: first run of this file with this kernel build: writing its weights in the kernel's "
          f"faster layout to {path} ({total / 1e9:.2f} GB, once; --no-cache skips it, "
          f"`rm -r {path.parent}` reclaims it)", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for (_, raw, gtype, rows, K), off in zip(mats, offsets, strict=True):
                f.seek(off)
                f.write(memoryview(kern.repack(raw, gtype, rows, K)).cast("B"))
            f.truncate(total)
        os.replace(tmp, path)
        model_name = path.name[:path.name.rindex(".", 0, len(path.name) - len(SUFFIX))]
        for old in path.parent.glob(f"{model_name}.*{SUFFIX}"):
            if old != path and old.name[len(model_name) + 1:-len(SUFFIX)].isalnum():
                old.unlink(missing_ok=True)  # an older build of the same model file: stale
        for old in path.parent.glob(f"{model_name}.*.q4_0_packed"):  # the previous layout's files
            old.unlink(missing_ok=True)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    print(f"pocketlm: repacked in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
