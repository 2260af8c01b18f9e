"""GGUF writer: typed metadata, a header planned up front, tensor data streamed one tensor at a time.

The caller declares every tensor (name, ggml type, numpy shape) when opening the writer, so the
header (metadata, tensor infos with their final offsets) is written first and each tensor's bytes go
straight to their place as the producer hands them over: the quantizer never holds the whole model.

    with GGUFWriter(path, metadata, [(name, GGMLType.Q4_0, (rows, cols)), ...]) as w:
        for name, data in produce():
            w.write_tensor(name, data)      # float array for F32/F16/BF16, raw uint8 blocks otherwise
    # leaving the block commits: all tensors must have been written

The file appears atomically: bytes go to a temporary file in the same folder, renamed over `path`
on commit; any exception (or KeyboardInterrupt) inside the block deletes the temporary file.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import struct
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pocketlm.errors import PocketLMError

from .gguf_format import (
    ALIGNMENT_KEY,
    BF16,
    DEFAULT_ALIGNMENT,
    FLOAT_TYPES,
    GGML_TYPES,
    GGUF_MAGIC,
    GGUF_VERSION,
    INTEGER_TYPES,
    MAX_DIMS,
    PLAIN_DTYPES,
    SCALAR_DTYPES,
    SCALAR_STRUCT,
    ValueType,
    align,
    float32_to_bf16,
    tensor_nbytes,
    type_name,
)

V = ValueType

# GGUF types llama.cpp's loader insists on (it rejects e.g. a uint64 where it reads a uint32).
# Keys under the architecture prefix are matched by their suffix ("phi3.block_count" -> "block_count").
ARCH_KEY_TYPES: dict[str, ValueType] = {
    "vocab_size": V.UINT32,
    "context_length": V.UINT32,
    "embedding_length": V.UINT32,
    "feed_forward_length": V.UINT32,
    "block_count": V.UINT32,
    "attention.head_count": V.UINT32,
    "attention.head_count_kv": V.UINT32,
    "attention.layer_norm_rms_epsilon": V.FLOAT32,
    "attention.layer_norm_epsilon": V.FLOAT32,
    "attention.sliding_window": V.UINT32,
    "rope.dimension_count": V.UINT32,
    "rope.freq_base": V.FLOAT32,
    "rope.scaling.original_context_length": V.UINT32,
    "rope.scaling.attn_factor": V.FLOAT32,
    "rope.scaling.factor": V.FLOAT32,
}
KEY_TYPES: dict[str, ValueType] = {
    "general.alignment": V.UINT32,
    "general.file_type": V.UINT32,
    "general.quantization_version": V.UINT32,
    "tokenizer.ggml.bos_token_id": V.UINT32,
    "tokenizer.ggml.eos_token_id": V.UINT32,
    "tokenizer.ggml.unknown_token_id": V.UINT32,
    "tokenizer.ggml.padding_token_id": V.UINT32,
    "tokenizer.ggml.seperator_token_id": V.UINT32,
    "tokenizer.ggml.eot_token_id": V.UINT32,
    "tokenizer.ggml.eom_token_id": V.UINT32,
    "tokenizer.ggml.add_bos_token": V.BOOL,
    "tokenizer.ggml.add_eos_token": V.BOOL,
    "tokenizer.ggml.add_space_prefix": V.BOOL,
}
# array keys -> element type
ARRAY_KEY_TYPES: dict[str, ValueType] = {
    "tokenizer.ggml.tokens": V.STRING,
    "tokenizer.ggml.merges": V.STRING,
    "tokenizer.ggml.scores": V.FLOAT32,
    "tokenizer.ggml.token_type": V.INT32,
}

_INT_RANGES = {t: (int(np.iinfo(SCALAR_DTYPES[t]).min), int(np.iinfo(SCALAR_DTYPES[t]).max))
               for t in INTEGER_TYPES}


@dataclass(frozen=True)
class Typed:
    """A metadata value with an explicit GGUF type (for arrays, `vtype` is the element type)."""

    value: Any
    vtype: ValueType


# ---------------------------------------------------------------------------- metadata encoding

def encode_metadata(metadata: Mapping[str, Any]) -> bytes:
    """The key/value section: for each key, its string, value type and value."""
    out = bytearray()
    for key, value in metadata.items():
        if not isinstance(key, str) or not key:
            raise PocketLMError(f"GGUF metadata key {key!r} must be a non-empty string")
        try:
            out += _string(key, strict=True)
            out += _value(key, value, _declared_type(key))
        except (TypeError, ValueError, OverflowError) as e:
            raise PocketLMError(f"GGUF metadata {key!r}: {e}") from None
    return bytes(out)


def _declared_type(key: str) -> ValueType | None:
    if key in KEY_TYPES:
        return KEY_TYPES[key]
    if key in ARRAY_KEY_TYPES:
        return ARRAY_KEY_TYPES[key]
    _, _, suffix = key.partition(".")
    if not key.startswith(("general.", "tokenizer.")):
        return ARCH_KEY_TYPES.get(suffix)
    return None


def _string(s: str, strict: bool = False) -> bytes:
    raw = s.encode("utf-8", "strict" if strict else "surrogateescape")
    return struct.pack("<Q", len(raw)) + raw


def _value(key: str, value: Any, declared: ValueType | None) -> bytes:
    """u32 value type + encoded value; `declared` is the scalar or array-element type to use."""
    if isinstance(value, Typed):
        value, declared = value.value, value.vtype
    if isinstance(value, (list, tuple, np.ndarray)):
        etype, body = _array(key, value, declared)
        return struct.pack("<I", V.ARRAY) + struct.pack("<IQ", etype, len(value)) + body
    vtype = declared if declared is not None else _infer_scalar_type(value)
    return struct.pack("<I", vtype) + _scalar(vtype, value)


def _infer_scalar_type(value: Any) -> ValueType:
    if isinstance(value, (bool, np.bool_)):
        return V.BOOL
    if isinstance(value, str):
        return V.STRING
    if isinstance(value, np.generic):
        for t, dt in SCALAR_DTYPES.items():
            if t != V.BOOL and value.dtype == dt.newbyteorder("="):
                return t
    if isinstance(value, (int, np.integer)):
        v = int(value)
        if 0 <= v < 2**32:
            return V.UINT32  # counts and token ids: what llama.cpp reads
        if -(2**31) <= v < 0:
            return V.INT32
        return V.INT64 if v < 0 or v < 2**63 else V.UINT64
    if isinstance(value, (float, np.floating)):
        return V.FLOAT32
    raise TypeError(f"cannot store a {type(value).__name__} in GGUF metadata")


def _scalar(vtype: ValueType, value: Any) -> bytes:
    if vtype == V.STRING:
        if not isinstance(value, str):
            raise TypeError(f"expected a string, got {type(value).__name__}")
        return _string(value)
    if vtype == V.BOOL:
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"expected a bool, got {type(value).__name__}")
        return b"\x01" if value else b"\x00"
    if vtype in INTEGER_TYPES:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"expected an integer for {vtype.name}, got {value!r}")
        lo, hi = _INT_RANGES[vtype]
        if not lo <= int(value) <= hi:
            raise ValueError(f"{value} is out of range for {vtype.name}")
        return SCALAR_STRUCT[vtype].pack(int(value))
    if vtype in FLOAT_TYPES:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
            raise TypeError(f"expected a number for {vtype.name}, got {value!r}")
        return SCALAR_STRUCT[vtype].pack(float(value))
    raise TypeError(f"{vtype!r} is not a scalar value type")


def _array(key: str, values: Sequence[Any] | np.ndarray, etype: ValueType | None) -> tuple[ValueType, bytes]:
    """(element type, encoded elements) of a list, tuple or 1-D numpy array."""
    if isinstance(values, np.ndarray):
        if values.ndim != 1:
            raise ValueError(f"arrays must be 1-D, got shape {values.shape}")
        if etype is None:
            etype = V.BOOL if values.dtype == np.bool_ else _dtype_type(values.dtype)
        if etype in SCALAR_DTYPES and values.dtype != object:
            return etype, _numeric_array(etype, values)
        values = values.tolist()
    if etype is None:
        etype = _infer_element_type(values)
    if etype == V.STRING:
        return etype, b"".join(_scalar(V.STRING, s) for s in values)
    if etype == V.ARRAY:
        return etype, b"".join(_value(key, v, None)[4:] for v in values)
    for v in values:  # type-check every element (numpy would silently cast "3" or True)
        _scalar(etype, v)
    return etype, _numeric_array(etype, np.asarray(values))


def _dtype_type(dtype: np.dtype) -> ValueType | None:
    for t, dt in SCALAR_DTYPES.items():
        if t != V.BOOL and dtype == dt.newbyteorder("="):
            return t
    return None


def _numeric_array(etype: ValueType, values: np.ndarray) -> bytes:
    target = SCALAR_DTYPES[etype]
    if etype in INTEGER_TYPES:
        if values.size and not np.issubdtype(values.dtype, np.integer):
            raise TypeError(f"expected integers for a {etype.name} array, got {values.dtype}")
        lo, hi = _INT_RANGES[etype]
        if values.size and (int(values.min()) < lo or int(values.max()) > hi):
            raise ValueError(f"array values out of range for {etype.name}")
    return np.ascontiguousarray(values, dtype=target).tobytes()


def _infer_element_type(values: Sequence[Any]) -> ValueType:
    if not values:
        return V.INT32  # gguf-py's choice for an empty list without a declared type
    if all(isinstance(v, str) for v in values):
        return V.STRING
    if all(isinstance(v, (list, tuple, np.ndarray)) for v in values):
        return V.ARRAY
    if all(isinstance(v, (bool, np.bool_)) for v in values):
        return V.BOOL
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in values):
        return V.INT32 if all(-(2**31) <= int(v) < 2**31 for v in values) else V.INT64
    if all(isinstance(v, (int, float, np.integer, np.floating)) for v in values):
        return V.FLOAT32
    raise TypeError("array elements must all be strings, bools, numbers or arrays")


# ---------------------------------------------------------------------------- tensor plan

@dataclass(frozen=True)
class _Planned:
    name: str
    type_id: int
    shape: tuple[int, ...]  # numpy shape
    offset: int             # relative to the data section
    nbytes: int


def plan_tensors(tensors: Iterable[tuple[str, int, Sequence[int]]], alignment: int) -> list[_Planned]:
    """Check the declared tensors and give each its offset in the data section."""
    planned, seen, offset = [], set(), 0
    for entry in tensors:
        try:
            name, type_id, shape = entry
        except (TypeError, ValueError):
            raise PocketLMError(f"declare a GGUF tensor as (name, ggml type, shape), not {entry!r}") from None
        if not isinstance(name, str) or not name or name in seen:
            raise PocketLMError(f"GGUF tensor name {name!r} is empty, not a string or given twice")
        seen.add(name)
        type_id = int(type_id)
        if type_id not in GGML_TYPES:
            raise PocketLMError(f"GGUF tensor {name!r}: unknown ggml type id {type_id}")
        shape = tuple(int(d) for d in shape)
        if not 1 <= len(shape) <= MAX_DIMS or any(d <= 0 for d in shape):
            raise PocketLMError(f"GGUF tensor {name!r}: shape {shape} must have 1..{MAX_DIMS} positive "
                                f"dimensions")
        block = GGML_TYPES[type_id][1]
        if shape[-1] % block:
            raise PocketLMError(f"GGUF tensor {name!r}: last dimension {shape[-1]} is not a multiple of "
                                f"the {type_name(type_id)} block size {block}")
        nbytes = tensor_nbytes(type_id, shape)
        planned.append(_Planned(name, type_id, shape, offset, nbytes))
        offset += align(nbytes, alignment)
    return planned


def encode_tensor_infos(planned: Sequence[_Planned]) -> bytes:
    out = bytearray()
    for t in planned:
        out += _string(t.name, strict=True)
        out += struct.pack("<I", len(t.shape))
        out += struct.pack(f"<{len(t.shape)}Q", *reversed(t.shape))  # GGUF: innermost dimension first
        out += struct.pack("<IQ", t.type_id, t.offset)
    return bytes(out)


# ---------------------------------------------------------------------------- the writer

class GGUFWriter:
    """Writes one GGUF v3 file; see the module docstring.

    `metadata`: key -> value (Python/numpy values, typed by `KEY_TYPES` and friends, or `Typed`);
    `general.alignment` there sets the alignment (default 32). `tensors`: (name, ggml type id or
    GGMLType, numpy shape) for every tensor, in file order. `write_tensor` may be called in any
    order, once per tensor.
    """

    def __init__(self, path: str | os.PathLike, metadata: Mapping[str, Any],
                 tensors: Iterable[tuple[str, int, Sequence[int]]]):
        self.path = os.fspath(path)
        metadata = dict(metadata)
        self.alignment = int(metadata.get(ALIGNMENT_KEY, DEFAULT_ALIGNMENT))
        if self.alignment <= 0 or self.alignment & (self.alignment - 1):
            raise PocketLMError(f"{ALIGNMENT_KEY} must be a power of two, got {self.alignment}", self.path)
        self._planned = {t.name: t for t in plan_tensors(tensors, self.alignment)}
        header = (GGUF_MAGIC + struct.pack("<IQQ", GGUF_VERSION, len(self._planned), len(metadata))
                  + encode_metadata(metadata) + encode_tensor_infos(list(self._planned.values())))
        self.data_offset = align(len(header), self.alignment)
        self._written: set[str] = set()
        folder = os.path.dirname(os.path.abspath(self.path))
        # The temporary file's cleanup is registered *before* the file exists: an exception raised
        # by a signal handler (SIGINT, SIGTERM) between creating it and remembering it would
        # otherwise leave it behind. Safety net: a writer dropped without commit or abort (or an
        # interpreter exiting) leaves no temporary file either.
        self._handle: list[Any] = [None]  # the open file, once there is one, for the cleanup
        for _ in range(100):
            self._tmp = os.path.join(folder, f"{os.path.basename(self.path)}.{secrets.token_hex(6)}.tmp")
            self._cleanup = weakref.finalize(self, _remove_quietly, self._handle, self._tmp)
            try:
                fd = os.open(self._tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
            except FileExistsError:
                self._cleanup.detach()  # someone else's file: never remove it
                continue
            except OSError as e:
                self._cleanup.detach()
                raise PocketLMError(f"cannot create a file in {folder}: {e.strerror}", self.path) from None
            break
        else:
            raise PocketLMError(f"cannot create a temporary file in {folder}", self.path)
        self._file = self._handle[0] = os.fdopen(fd, "wb")
        try:
            self._file.write(header)
            self._file.write(bytes(self.data_offset - len(header)))
        except BaseException:
            self.abort()
            raise

    @property
    def tensor_names(self) -> list[str]:
        return list(self._planned)

    def write_tensor(self, name: str, data: np.ndarray) -> None:
        """Store one declared tensor: a float array of its shape for F32/F16/BF16 (converted here),
        or its raw bytes as uint8 (any shape, exactly the type's byte size) for any type."""
        if self._file is None:
            raise PocketLMError("GGUF writer is already closed", self.path)
        t = self._planned.get(name)
        if t is None:
            raise PocketLMError(f"tensor {name!r} was not declared when the writer was opened", self.path)
        if name in self._written:
            raise PocketLMError(f"tensor {name!r} is written twice", self.path)
        raw = self._tensor_bytes(t, np.asarray(data))
        try:
            self._file.seek(self.data_offset + t.offset)
            self._file.write(raw)
            self._file.write(bytes(align(t.nbytes, self.alignment) - t.nbytes))
        except OSError as e:
            raise PocketLMError(f"cannot write tensor {name!r}: {e.strerror}", self.path) from None
        self._written.add(name)

    def _tensor_bytes(self, t: _Planned, data: np.ndarray) -> memoryview:
        where = f"tensor {t.name!r} ({type_name(t.type_id)}, shape {t.shape})"
        if data.dtype == np.uint8:
            if data.nbytes != t.nbytes:
                raise PocketLMError(f"{where}: got {data.nbytes} raw bytes, expected {t.nbytes}", self.path)
            return memoryview(np.ascontiguousarray(data)).cast("B")
        if t.type_id not in PLAIN_DTYPES:
            raise PocketLMError(f"{where}: quantized data must be raw uint8 blocks, got {data.dtype}",
                                self.path)
        if tuple(data.shape) != t.shape:
            raise PocketLMError(f"{where}: got an array of shape {tuple(data.shape)}", self.path)
        if t.type_id == BF16:
            if data.dtype == np.uint16:  # already bf16 bit patterns
                out = data
            else:
                _check_finite(data, where, self.path)
                out = float32_to_bf16(data)
        else:
            with np.errstate(over="ignore"):  # overflow to inf is reported just below
                out = data.astype(PLAIN_DTYPES[t.type_id], copy=False)
            if out.dtype.kind == "f":
                _check_finite(data, where, self.path)
                if out.dtype != data.dtype:
                    _check_finite(out, f"{where} after conversion to {type_name(t.type_id)} (overflow)",
                                  self.path)
        return memoryview(np.ascontiguousarray(out)).cast("B")

    def close(self) -> None:
        """Commit: check every tensor was written, flush to disk, rename into place."""
        if self._file is None:
            return
        missing = [n for n in self._planned if n not in self._written]
        if missing:
            self.abort()
            raise PocketLMError(f"GGUF file not written: {len(missing)} declared tensors never arrived "
                                f"(first: {missing[0]!r})", self.path)
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            os.chmod(self._tmp, 0o666 & ~_umask())
            os.replace(self._tmp, self.path)
        except OSError as e:
            self.abort()
            raise PocketLMError(f"cannot write GGUF file: {e.strerror}", self.path) from None
        self._cleanup.detach()

    def abort(self) -> None:
        """Discard everything written so far (the target path is left untouched)."""
        self._file = None
        self._cleanup()

    def __enter__(self) -> GGUFWriter:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _check_finite(a: np.ndarray, where: str, path: str) -> None:
    if not np.isfinite(a).all():
        raise PocketLMError(f"{where} holds NaN or infinite values", path)


def _remove_quietly(handle: list[Any], tmp: str) -> None:
    if handle[0] is not None:
        with contextlib.suppress(OSError):
            handle[0].close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
