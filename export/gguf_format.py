"""GGUF container constants shared by the reader and the writer (numpy, stdlib and the type table).

A GGUF file (little-endian, versions 2 and 3 share the layout):

    magic "GGUF" | u32 version | u64 tensor_count | u64 kv_count
    kv_count x  (string key, u32 value type, value)
    tensor_count x (string name, u32 n_dims, u64 dims[n_dims] innermost first, u32 ggml type,
                    u64 offset relative to the data section)
    zero padding to `general.alignment` (default 32)
    data section: every tensor at its offset, each padded to the alignment

A string is a u64 byte length followed by UTF-8 bytes; an array is a u32 element type, a u64
count and the elements.
"""

from __future__ import annotations

import struct
from enum import IntEnum

import numpy as np

from pocketlm.quantize.ggml_types import GGML_TYPE_IDS, GGML_TYPES, row_bytes, type_name  # noqa: F401 (re-exported)

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3  # what the writer produces; the reader also takes 2
READABLE_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
ALIGNMENT_KEY = "general.alignment"


class ValueType(IntEnum):
    """Metadata value types (gguf.h `enum gguf_type`)."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# scalar value type -> little-endian numpy dtype (its itemsize is the encoded size)
SCALAR_DTYPES: dict[ValueType, np.dtype] = {
    ValueType.UINT8: np.dtype("<u1"),
    ValueType.INT8: np.dtype("<i1"),
    ValueType.UINT16: np.dtype("<u2"),
    ValueType.INT16: np.dtype("<i2"),
    ValueType.UINT32: np.dtype("<u4"),
    ValueType.INT32: np.dtype("<i4"),
    ValueType.FLOAT32: np.dtype("<f4"),
    ValueType.BOOL: np.dtype("<u1"),
    ValueType.UINT64: np.dtype("<u8"),
    ValueType.INT64: np.dtype("<i8"),
    ValueType.FLOAT64: np.dtype("<f8"),
}
SCALAR_STRUCT: dict[ValueType, struct.Struct] = {
    t: struct.Struct("<" + code) for t, code in (
        (ValueType.UINT8, "B"), (ValueType.INT8, "b"), (ValueType.UINT16, "H"), (ValueType.INT16, "h"),
        (ValueType.UINT32, "I"), (ValueType.INT32, "i"), (ValueType.FLOAT32, "f"), (ValueType.BOOL, "B"),
        (ValueType.UINT64, "Q"), (ValueType.INT64, "q"), (ValueType.FLOAT64, "d"))
}
INTEGER_TYPES = {ValueType.UINT8, ValueType.INT8, ValueType.UINT16, ValueType.INT16, ValueType.UINT32,
                 ValueType.INT32, ValueType.UINT64, ValueType.INT64}
FLOAT_TYPES = {ValueType.FLOAT32, ValueType.FLOAT64}

# Smallest encoding of one value of each type; bounds a count read from a header before anything is
# allocated for it (a string is at least its u64 length, an array its u32 type and u64 count).
MIN_VALUE_SIZE: dict[ValueType, int] = {
    **{t: dt.itemsize for t, dt in SCALAR_DTYPES.items()},
    ValueType.STRING: 8,
    ValueType.ARRAY: 12,
}


# The ggml type table (id -> name, values per block, bytes per block) is defined once, in
# quantize/ggml_types.py; GGML_TYPES, GGML_TYPE_IDS, type_name and row_bytes are re-exported here.

# Types whose elements are plain numbers: the reader gives typed views of them (BF16 as uint16).
PLAIN_DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"),
    1: np.dtype("<f2"),
    24: np.dtype("<i1"),
    25: np.dtype("<i2"),
    26: np.dtype("<i4"),
    27: np.dtype("<i8"),
    28: np.dtype("<f8"),
    30: np.dtype("<u2"),
}
BF16 = 30


def align(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def tensor_nbytes(type_id: int, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor with this numpy shape; the last (innermost) dimension holds whole blocks."""
    n = 1
    for d in shape:
        n *= d
    return row_bytes(type_id, n)


def bf16_to_float32(raw: np.ndarray) -> np.ndarray:
    """BF16 bit patterns (uint16) -> float32: the bf16 bits are the high half of a float32."""
    return (np.asarray(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> BF16 bit patterns (uint16), rounding to nearest even as ggml does for finite values."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)
