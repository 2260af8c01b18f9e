"""GGUF reader: metadata as Python values, tensors as memory-mapped numpy views (numpy + stdlib only).

Shared by the runtime, the ONNX exporter and `pocketlm info`. Nothing is copied out of the file
except metadata: `tensor()` returns a view into the map (typed for F32/F16/BF16 and the integer
types, raw uint8 blocks for quantized types). Every count, length, dimension and offset read from
the header is checked against the file size *before* it is used, so a damaged or hostile file gives
one `PocketLMError` naming the file and the field, never a crash or a huge allocation.

Metadata values: integers and floats as Python numbers, bool as bool, strings as str (UTF-8;
undecodable bytes kept via `surrogateescape`), numeric and bool arrays as numpy arrays (copies, so
they do not pin the map), string arrays and arrays of arrays as lists.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from pocketlm.errors import PocketLMError
from pocketlm.quantize.formats import GGMLType

from .gguf_format import (
    ALIGNMENT_KEY,
    BF16,
    DEFAULT_ALIGNMENT,
    GGML_TYPES,
    GGUF_MAGIC,
    MAX_DIMS,
    MIN_VALUE_SIZE,
    PLAIN_DTYPES,
    READABLE_VERSIONS,
    SCALAR_DTYPES,
    SCALAR_STRUCT,
    ValueType,
    align,
    bf16_to_float32,
    row_bytes,
    type_name,
)

HEADER_SIZE = 24  # magic, version, tensor_count, kv_count
MIN_TENSOR_INFO_SIZE = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset
MIN_KV_SIZE = 8 + 4 + 1  # key length, value type, smallest value
MAX_ARRAY_DEPTH = 8  # arrays of arrays nest this deep at most (llama.cpp writes depth 1)
MAX_DIM = 2**63 - 1  # ggml stores dimensions as int64


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type_id: int              # ggml type id as stored (may be a type pocketlm cannot dequantize)
    shape: tuple[int, ...]    # numpy shape: the GGUF dimensions reversed (rows first)
    offset: int               # absolute byte offset of the data in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return type_name(self.type_id)

    @property
    def gtype(self) -> GGMLType | None:
        """The type as pocketlm's `GGMLType`, or None for types pocketlm does not implement."""
        try:
            return GGMLType(self.type_id)
        except ValueError:
            return None

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class _Cursor:
    """Reads little-endian header fields from the mapped file, checking each against its end."""

    def __init__(self, buf: memoryview, path: str):
        self.buf = buf
        self.size = len(buf)
        self.pos = 0
        self.path = path

    def error(self, message: str) -> PocketLMError:
        return PocketLMError(f"malformed GGUF: {message}", self.path)

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.error(f"file is truncated: {what} needs {n} bytes at offset {self.pos}, "
                             f"but the file ends at {self.size}")

    def scalar(self, vtype: ValueType, what: str) -> int | float:
        st = SCALAR_STRUCT[vtype]
        self.need(st.size, what)
        (value,) = st.unpack_from(self.buf, self.pos)
        self.pos += st.size
        return value

    def u32(self, what: str) -> int:
        return int(self.scalar(ValueType.UINT32, what))

    def u64(self, what: str) -> int:
        return int(self.scalar(ValueType.UINT64, what))

    def check_count(self, count: int, min_size: int, what: str) -> None:
        """A count is plausible only if that many of the smallest item fit in the rest of the file."""
        remaining = self.size - self.pos
        if count * min_size > remaining:
            raise self.error(f"{what} is {count}, which needs at least {count * min_size} bytes at offset "
                             f"{self.pos}, but only {remaining} remain (file truncated or count corrupt)")

    def raw_string(self, what: str) -> memoryview:
        n = self.u64(f"{what} length")
        if n > self.size - self.pos:
            raise self.error(f"{what} has length {n}, past the end of the file "
                             f"(offset {self.pos}, file size {self.size})")
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        return raw

    def name(self, what: str) -> str:
        """A key or tensor name: must be valid UTF-8."""
        raw = self.raw_string(what)
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            raise self.error(f"{what} is not valid UTF-8: {bytes(raw[:40])!r}") from None

    def string(self, what: str) -> str:
        return str(self.raw_string(what), "utf-8", "surrogateescape")

    def value_type(self, what: str) -> ValueType:
        code = self.u32(what)
        try:
            return ValueType(code)
        except ValueError:
            raise self.error(f"{what} is {code}, not a GGUF value type (0..12)") from None

    def value(self, vtype: ValueType, what: str, depth: int = 0) -> tuple[Any, ValueType | None]:
        """One metadata value -> (value, element type for arrays else None)."""
        if vtype == ValueType.STRING:
            return self.string(what), None
        if vtype == ValueType.ARRAY:
            return self.array(what, depth)
        v = self.scalar(vtype, what)
        return (bool(v) if vtype == ValueType.BOOL else v), None

    def array(self, what: str, depth: int) -> tuple[Any, ValueType]:
        if depth >= MAX_ARRAY_DEPTH:
            raise self.error(f"{what}: arrays nested more than {MAX_ARRAY_DEPTH} deep")
        etype = self.value_type(f"{what} element type")
        count = self.u64(f"{what} element count")
        self.check_count(count, MIN_VALUE_SIZE[etype], f"{what} element count")
        if etype in SCALAR_DTYPES:
            dt = SCALAR_DTYPES[etype]
            arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos).copy()
            self.pos += count * dt.itemsize
            return (arr.astype(bool) if etype == ValueType.BOOL else arr), etype
        if etype == ValueType.STRING:
            return [self.string(f"{what}[{i}]") for i in range(count)], etype
        return [self.array(f"{what}[{i}]", depth + 1)[0] for i in range(count)], etype


class GGUFReader:
    """A parsed GGUF file. Use as a context manager or call `close()`; views stay valid until then.

    Attributes: `path`, `version`, `alignment`, `file_size`, `data_offset` (start of the data
    section), `metadata` (key -> value, file order), `value_types` (key -> (type, element type or
    None)), `tensors` (name -> TensorInfo, file order).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.metadata: dict[str, Any] = {}
        self.value_types: dict[str, tuple[ValueType, ValueType | None]] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._map = _open_map(self.path)
        self.file_size = len(self._map)
        view = memoryview(self._map)
        try:
            self._parse(_Cursor(view, self.path))
        except BaseException:
            self._map = None
            raise
        finally:
            view.release()

    # ------------------------------------------------------------------ parsing

    def _parse(self, cur: _Cursor) -> None:
        cur.need(HEADER_SIZE, "header")
        magic = bytes(cur.buf[:4])
        if magic != GGUF_MAGIC:
            raise cur.error(f"bad magic {magic!r} (expected {GGUF_MAGIC!r}): not a GGUF file")
        cur.pos = 4
        self.version = _check_version(cur)
        n_tensors = cur.u64("header tensor_count")
        n_kv = cur.u64("header kv_count")
        cur.check_count(n_kv, MIN_KV_SIZE, "header kv_count")
        for i in range(n_kv):
            self._read_kv(cur, i)
        self.alignment = self._alignment(cur)
        cur.check_count(n_tensors, MIN_TENSOR_INFO_SIZE, "header tensor_count")
        infos: dict[str, tuple[int, tuple[int, ...], int, int]] = {}
        for i in range(n_tensors):
            name, *info = self._read_tensor_info(cur, i)
            if name in infos:
                raise cur.error(f"tensor {name!r} appears twice")
            infos[name] = info
        self.header_size = cur.pos
        self.data_offset = align(cur.pos, self.alignment)  # offsets in the header are relative to it
        for name, (type_id, shape, rel_offset, nbytes) in infos.items():
            self.tensors[name] = TensorInfo(name, type_id, shape, self.data_offset + rel_offset, nbytes)
        self._check_tensor_extents(cur)
        self._check_block_count(cur)

    def _check_block_count(self, cur: _Cursor) -> None:
        """`<arch>.block_count` layers need at least that many tensors: a corrupt count (2^31) would
        otherwise have a loader plan billions of layers before it missed the first tensor. A
        vocabulary-only file (no tensors, e.g. llama.cpp's ggml-vocab-*.gguf) keeps its model's count."""
        arch = self.metadata.get("general.architecture")
        count = self.metadata.get(f"{arch}.block_count") if isinstance(arch, str) else None
        if self.tensors and isinstance(count, int | np.integer) and count > len(self.tensors):
            raise cur.error(f"metadata '{arch}.block_count' is {count}, but the file holds only "
                            f"{len(self.tensors)} tensors (each layer has several)")

    def _read_kv(self, cur: _Cursor, i: int) -> None:
        key = cur.name(f"metadata key #{i}")
        if key in self.metadata:
            raise cur.error(f"metadata key {key!r} appears twice")
        vtype = cur.value_type(f"metadata {key!r} value type")
        value, etype = cur.value(vtype, f"metadata {key!r}")
        self.metadata[key] = value
        self.value_types[key] = (vtype, etype)

    def _alignment(self, cur: _Cursor) -> int:
        if ALIGNMENT_KEY not in self.metadata:
            return DEFAULT_ALIGNMENT
        value = self.metadata[ALIGNMENT_KEY]
        if self.value_types[ALIGNMENT_KEY][0] != ValueType.UINT32:
            got = self.value_types[ALIGNMENT_KEY][0].name
            raise cur.error(f"{ALIGNMENT_KEY} must be a uint32, got {got}")
        if value <= 0 or value & (value - 1):
            raise cur.error(f"{ALIGNMENT_KEY} is {value}, not a power of two")
        return int(value)

    def _read_tensor_info(self, cur: _Cursor, i: int) -> tuple[str, int, tuple[int, ...], int, int]:
        name = cur.name(f"tensor #{i} name")
        what = f"tensor {name!r}"
        n_dims = cur.u32(f"{what} n_dims")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.error(f"{what} has {n_dims} dimensions (1..{MAX_DIMS} allowed)")
        dims = [cur.u64(f"{what} dimension {j}") for j in range(n_dims)]
        type_id = cur.u32(f"{what} type")
        rel_offset = cur.u64(f"{what} offset")
        if type_id not in GGML_TYPES:
            raise cur.error(f"{what} has unknown ggml type id {type_id}")
        tname, block, _ = GGML_TYPES[type_id]
        n = 1
        for j, d in enumerate(dims):
            if d > MAX_DIM:
                raise cur.error(f"{what} dimension {j} is {d}, larger than int64")
            n *= d
        if dims[0] % block:
            raise cur.error(f"{what}: innermost dimension {dims[0]} is not a multiple of the "
                            f"{tname} block size {block}")
        nbytes = row_bytes(type_id, n)
        if nbytes > self.file_size:
            raise cur.error(f"{what} with shape {tuple(reversed(dims))} ({tname}) needs {nbytes} bytes, "
                            f"more than the whole file ({self.file_size} bytes)")
        if rel_offset % self.alignment:
            raise cur.error(f"{what} offset {rel_offset} is not a multiple of the alignment {self.alignment}")
        return name, type_id, tuple(reversed(dims)), rel_offset, nbytes

    def _check_tensor_extents(self, cur: _Cursor) -> None:
        """Every tensor lies inside the file, in the data section, and no two overlap."""
        end_prev, prev = self.data_offset, None
        for t in sorted(self.tensors.values(), key=lambda t: t.offset):
            if t.offset + t.nbytes > self.file_size:
                raise cur.error(f"tensor {t.name!r} data (offset {t.offset}, {t.nbytes} bytes) runs past "
                                f"the end of the file ({self.file_size} bytes)")
            if t.offset < end_prev:
                raise cur.error(f"tensor {t.name!r} data (offset {t.offset}) overlaps "
                                f"{'the header' if prev is None else repr(prev)}")
            end_prev, prev = t.offset + t.nbytes, t.name

    # ------------------------------------------------------------------ access

    def __enter__(self) -> GGUFReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Drop the map; views handed out keep their pages until they are garbage collected."""
        self._map = None

    def __iter__(self) -> Iterator[TensorInfo]:
        return iter(self.tensors.values())

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise PocketLMError(f"GGUF file has no tensor {name!r}", self.path) from None

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 view into the file (no copy)."""
        if self._map is None:
            raise PocketLMError("GGUF reader is closed", self.path)
        t = self.info(name)
        return np.asarray(self._map[t.offset:t.offset + t.nbytes])

    def tensor(self, name: str) -> np.ndarray:
        """Zero-copy view: typed (F32, F16, BF16 as uint16 bits, I8..I64, F64) with the tensor's
        shape, or for block-quantized types uint8 of shape (*shape[:-1], bytes per row)."""
        t = self.info(name)
        raw = self.raw(name)
        dtype = PLAIN_DTYPES.get(t.type_id)
        if dtype is not None:
            return raw.view(dtype).reshape(t.shape)
        return raw.reshape(*t.shape[:-1], row_bytes(t.type_id, t.shape[-1]))

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor as a new float32 array of its shape (quantized types via pocketlm.quantize)."""
        t = self.info(name)
        if t.type_id == BF16:
            return bf16_to_float32(self.tensor(name))
        if t.type_id in PLAIN_DTYPES:
            return self.tensor(name).astype(np.float32)
        if t.gtype is None:
            raise PocketLMError(f"tensor {name!r} has type {t.type_name}, which pocketlm cannot "
                                f"dequantize", self.path)
        from pocketlm.quantize.formats import dequantize
        try:
            return dequantize(self.raw(name), t.gtype, t.shape, name)
        except PocketLMError as e:
            raise PocketLMError(str(e), self.path) from None

    def tokenizer_fields(self) -> dict[str, Any]:
        """The `tokenizer.*` metadata (for `Tokenizer.from_gguf_fields`)."""
        return {k: v for k, v in self.metadata.items() if k.startswith("tokenizer.")}


def _open_map(path: str) -> np.memmap:
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise PocketLMError(f"cannot read GGUF file: {e.strerror}", path) from None
    if os.path.isdir(path):
        raise PocketLMError("is a directory, expected a GGUF file", path)
    if size < HEADER_SIZE:
        raise PocketLMError(f"malformed GGUF: file is truncated ({size} bytes, a GGUF header needs "
                            f"{HEADER_SIZE})", path)
    try:
        return np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as e:
        raise PocketLMError(f"cannot map GGUF file: {e}", path) from None


def _check_version(cur: _Cursor) -> int:
    version = cur.u32("header version")
    if version in READABLE_VERSIONS:
        return version
    if int.from_bytes(version.to_bytes(4, "little"), "big") in READABLE_VERSIONS:
        raise cur.error("big-endian GGUF files are not supported")
    raise cur.error(f"unsupported GGUF version {version} (pocketlm reads versions "
                    f"{', '.join(map(str, READABLE_VERSIONS))})")
