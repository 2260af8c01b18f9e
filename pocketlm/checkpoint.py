"""Hugging Face checkpoint folders: `config.json` + safetensors (single or sharded), memory-mapped.

Tensors are never loaded all at once: each shard is memory-mapped and a tensor is converted to
float32 only when asked for, so a 28 GB fp16 phi-3-medium can be walked layer by layer on a
24 GB machine. The safetensors parser is our own (numpy + json), so the runtime path needs no
torch and no `safetensors` package.

safetensors layout: u64 little-endian header length N | N bytes of JSON
{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}} | data (offsets relative
to the byte after the header).
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import Phi3Config, TensorSpec, checkpoint_row_order, gguf_name, tensor_specs
from .errors import PocketLMError
from .tokenizer import has_tokenizer

# safetensors dtype -> (numpy storage dtype, bytes per element). BF16 is stored as uint16 and
# widened to float32 by shifting into the high half (numpy has no bfloat16).
_DTYPES = {"F32": (np.float32, 4), "F16": (np.float16, 2), "BF16": (np.uint16, 2)}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32: the 16 bits are the high half of a float32."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


class SafetensorsFile:
    """One memory-mapped `.safetensors` file; `raw(name)` is a zero-copy view in the stored dtype."""

    def __init__(self, path: Path):
        self.path = path
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise PocketLMError("truncated safetensors file: no header length", path)
                (n,) = struct.unpack("<Q", head)
                if n > _MAX_HEADER or 8 + n > size:
                    raise PocketLMError(
                        f"truncated or corrupt safetensors header: header length {n} but file has "
                        f"{size} bytes", path)
                header = json.loads(f.read(n))
        except FileNotFoundError:
            raise PocketLMError("file not found", path) from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PocketLMError(f"corrupt safetensors header: {e}", path) from None
        if not isinstance(header, dict):
            raise PocketLMError("corrupt safetensors header: not a JSON object", path)
        data_start = 8 + n
        self.metadata = header.pop("__metadata__", {}) or {}
        self.entries: dict[str, _Entry] = {}
        for name, info in header.items():
            self.entries[name] = self._entry(name, info, data_start, size)
        self._map: np.memmap | None = None

    def _entry(self, name: str, info: dict, data_start: int, size: int) -> _Entry:
        try:
            dtype, shape, (b, e) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise PocketLMError(f"corrupt safetensors entry for tensor {name!r}", self.path) from None
        if dtype not in _DTYPES:
            raise PocketLMError(f"tensor {name!r} has dtype {dtype}; pocketlm reads F32, F16, BF16",
                                self.path)
        nbytes = math.prod(shape) * _DTYPES[dtype][1]
        if any(s < 0 for s in shape) or not (0 <= b <= e) or e - b != nbytes:
            raise PocketLMError(f"tensor {name!r}: data offsets {b}..{e} do not match shape {shape} "
                                f"of {dtype}", self.path)
        if data_start + e > size:
            raise PocketLMError(f"truncated file: tensor {name!r} ends at byte {data_start + e} but "
                                f"the file has {size} bytes", self.path)
        return _Entry(self.path, dtype, shape, data_start + b, data_start + e)

    def raw(self, name: str) -> np.ndarray:
        entry = self.entries[name]
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        storage = _DTYPES[entry.dtype][0]
        flat = self._map[entry.begin:entry.end].view(storage)
        return flat.reshape(entry.shape)

    def release(self) -> None:
        """Drop this file's mapped pages from the process (they stay in the OS page cache): pages
        read so far otherwise count in the resident set, so walking a 28 GB checkpoint would show
        28 GB RSS. Views taken earlier stay valid; their pages are read back on access."""
        m = getattr(self._map, "_mmap", None)
        if m is not None and hasattr(m, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            m.madvise(mmap.MADV_DONTNEED)


class Checkpoint:
    """A Hugging Face Phi-3 checkpoint folder, its tensors addressed by GGUF names."""

    def __init__(self, path: Path, config: Phi3Config, raw_config: dict,
                 files: list[SafetensorsFile], locations: dict[str, tuple[SafetensorsFile, str]]):
        self.path = path
        self.config = config
        self.raw_config = raw_config
        self.files = files
        self._locations = locations  # gguf name -> (file, HF name)
        self._row_orders = {s.name: order for s in tensor_specs(config)
                            if (order := checkpoint_row_order(s, config)) is not None}

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        path = Path(path)
        if not path.exists():
            raise PocketLMError("does not exist", path)
        if not path.is_dir():
            raise PocketLMError("not a checkpoint folder (expected a directory with config.json)", path)
        config_path = path / "config.json"
        raw_config = read_json_object(config_path, missing="missing config.json")
        try:
            config = Phi3Config.from_hf_dict(raw_config, str(config_path))
        except (TypeError, ValueError, KeyError, AttributeError, OverflowError, ZeroDivisionError) as e:
            # a value of the wrong type or range that the config parser met unguarded
            raise PocketLMError(f"invalid config.json: {type(e).__name__}: {e}", config_path) from None
        _check_representable(config, config_path)
        files = [SafetensorsFile(f) for f in _shard_paths(path)]
        locations: dict[str, tuple[SafetensorsFile, str]] = {}
        for f in files:
            for hf in f.entries:
                name = gguf_name(hf, config.architecture)
                if name is not None:
                    locations[name] = (f, hf)
        ckpt = cls(path, config, raw_config, files, locations)
        ckpt._check_tensors()
        return ckpt

    def _check_tensors(self) -> None:
        for spec in self.specs():
            if spec.hf_name is None:
                continue
            if spec.name not in self._locations:
                raise PocketLMError(f"tensor {spec.hf_name} is missing from the checkpoint", self.path)
            f, hf = self._locations[spec.name]
            shape = f.entries[hf].shape
            if shape != spec.shape:
                raise PocketLMError(f"tensor {hf} has shape {list(shape)} but config.json implies "
                                    f"{list(spec.shape)}", f.path)

    # ------------------------------------------------------------------ access

    def specs(self) -> list[TensorSpec]:
        return tensor_specs(self.config)

    def names(self) -> list[str]:
        """GGUF names of every tensor of the model, in file order (incl. derived rope factors)."""
        return [s.name for s in self.specs()]

    def raw(self, name: str) -> np.ndarray:
        """A stored tensor in its stored dtype (BF16 as uint16), rows in pocketlm's layout: a
        zero-copy view, or a reordered copy where the checkpoint's row layout differs (Phi-3-small's
        head-major qkv and interleaved gate rows, `config.checkpoint_row_order`)."""
        f, hf = self._locations[name]
        order = self._row_orders.get(name)
        return f.raw(hf) if order is None else f.raw(hf)[order]

    def stored_dtype(self, name: str) -> str:
        f, hf = self._locations[name]
        return f.entries[hf].dtype

    def tensor(self, name: str) -> np.ndarray:
        """One tensor as float32 (a fresh array; the only copy made)."""
        rope = self.config.rope_scaling
        if name == "rope_factors_long.weight" and rope is not None:
            return np.asarray(rope.long_factor, dtype=np.float32)
        if name == "rope_factors_short.weight" and rope is not None:
            return np.asarray(rope.short_factor, dtype=np.float32)
        if name not in self._locations:
            raise PocketLMError(f"no tensor {name!r} in this checkpoint", self.path)
        raw = self.raw(name)
        out = bf16_to_f32(raw) if self.stored_dtype(name) == "BF16" else np.array(raw, dtype=np.float32)
        if not np.isfinite(out).all():  # corrupt data, or a header whose offsets shift it
            raise PocketLMError(f"tensor {name!r} holds NaN or infinite values", self._locations[name][0].path)
        return out

    def dtypes(self) -> Counter:
        return Counter(f.entries[hf].dtype for f, hf in self._locations.values())

    @property
    def tokenizer_dir(self) -> Path | None:
        return self.path if has_tokenizer(self.path) else None

    def nbytes(self) -> int:
        return sum(f.path.stat().st_size for f in self.files)

    def release(self) -> None:
        """Drop the mapped pages of every shard from this process (see `SafetensorsFile.release`)."""
        for f in self.files:
            f.release()


def _check_representable(config: Phi3Config, config_path: Path) -> None:
    """Every value the config parser accepted fits the GGUF field it becomes (a context of 1e308
    or a negative head count does not), checked by the GGUF writer's own encoder."""
    from .export.gguf_writer import encode_metadata

    try:
        encode_metadata(config.to_gguf_metadata())
    except PocketLMError as e:
        raise PocketLMError(f"invalid config.json: {e}", config_path) from None


def read_json_object(path: Path, missing: str = "file not found") -> dict:
    """A JSON file that must hold an object (config.json, tokenizer.json, an index): a PocketLMError
    naming the file for anything else (absent, unreadable, not UTF-8, not JSON, `[]`, `"x"`, `3`)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PocketLMError(missing, path) from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise PocketLMError(f"invalid JSON: {str(e) or type(e).__name__}", path) from None
    if not isinstance(value, dict):
        raise PocketLMError(f"expected a JSON object, found {type(value).__name__}", path)
    return value


def _shard_paths(path: Path) -> list[Path]:
    """`model.safetensors`, or the shards named by `model.safetensors.index.json` (each must exist)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise PocketLMError("invalid safetensors index: no weight_map of tensor -> file name", index)
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not (path / shard).is_file():
                raise PocketLMError(f"shard {shard} named in the index is missing", path / shard)
        return [path / s for s in shards]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    if list(path.glob("*.bin")) or list(path.glob("*.pt")):
        raise PocketLMError("only PyTorch .bin weights found; pocketlm reads safetensors "
                            "(convert with `save_pretrained(..., safe_serialization=True)`)", path)
    raise PocketLMError("no model.safetensors or model.safetensors.index.json", path)
