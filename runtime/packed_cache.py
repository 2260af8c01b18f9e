"""Q4_0 matrices repacked once into the kernel's faster layout, kept in a cache file beside the model.

The kernel decodes Q4_0 faster from its own interleaved layout (`kernel.Q4_0_PACKED`, the same size
as Q4_0). Repacking a 2 GB model takes seconds, so it is done once per model file: every matrix the
kernel wants repacked is written, in file order, to one cache file, which later loads map read-only
(zero copy again; the original file's pages for those matrices are never touched). Models whose
packed matrices total less than 64 MB are repacked in memory at each load instead.

Cache key: the model file's absolute path, size and modification time, and the kernel build
(its shared object's size and modification time: a rebuilt kernel may change the layout). The file
goes to $POCKETLM_CACHE/packed (default ~/.cache/pocketlm/packed), written atomically; if it cannot
be written, the matrices are repacked into memory instead.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import _kernel
from . import kernel as kern

ALIGN = 64  # each packed matrix starts on a 64-byte boundary of the cache file
MIN_CACHED_BYTES = 64 << 20  # smaller models are repacked in memory at every load (milliseconds)


def cache_dir() -> Path:
    return Path(os.environ.get("POCKETLM_CACHE", Path.home() / ".cache" / "pocketlm")) / "packed"


def _key(model_path: str) -> str:
    st = os.stat(model_path)
    so = os.stat(_kernel.__file__)
    raw = f"{os.path.abspath(model_path)}|{st.st_size}|{st.st_mtime_ns}|{so.st_size}|{so.st_mtime_ns}"
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def _offsets(sizes: Sequence[int]) -> tuple[list[int], int]:
    offsets, pos = [], 0
    for n in sizes:
        offsets.append(pos)
        pos += (n + ALIGN - 1) // ALIGN * ALIGN
    return offsets, pos


Matrix = tuple[str, np.ndarray, int, int]  # (name, raw Q4_0 bytes, rows, K)


def packed_matrices(model_path: str, mats: Sequence[Matrix]) -> dict[str, np.ndarray]:
    """name -> packed bytes (1-D uint8) for `mats` = [(name, raw Q4_0 bytes, rows, K), ...]."""
    if not mats:
        return {}
    sizes = [raw.nbytes for _, raw, _, _ in mats]
    offsets, total = _offsets(sizes)
    if total < MIN_CACHED_BYTES:
        return _in_memory(mats)
    path = cache_dir() / f"{Path(model_path).name}.{_key(model_path)}.q4_0_packed"
    if not (path.is_file() and path.stat().st_size == total):
        try:
            _write(path, mats, offsets, total)
        except OSError:  # read-only home, full disk: repack into memory instead
            return _in_memory(mats)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    return {name: data[off:off + n] for (name, _, _, _), off, n in zip(mats, offsets, sizes, strict=True)}


def _in_memory(mats: Sequence[Matrix]) -> dict[str, np.ndarray]:
    return {name: kern.repack(raw, kern.Q4_0, rows, K).reshape(-1) for name, raw, rows, K in mats}


def _write(path: Path, mats: Sequence[Matrix], offsets: list[int], total: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for (_, raw, rows, K), off in zip(mats, offsets, strict=True):
                f.seek(off)
                f.write(memoryview(kern.repack(raw, kern.Q4_0, rows, K)).cast("B"))
            f.truncate(total)
        os.replace(tmp, path)
        for old in path.parent.glob(f"{Path(path.name.split('.q4_0_packed')[0]).stem}.*.q4_0_packed"):
            if old != path:  # an older build of the same model file: stale
                old.unlink(missing_ok=True)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
