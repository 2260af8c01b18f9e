"""GGUF container constants shared by the reader and the writer (numpy + stdlib only).

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


# Every ggml type id that has appeared in GGUF files (ggml.h `enum ggml_type`):
# id -> (name, values per block, bytes per block). Ids 4, 5 (Q4_2, Q4_3) were removed before GGUF;
# 31-33 and 36-38 are the removed ARM repacked types, still found in old files.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    31: ("Q4_0_4_4", 32, 18),
    32: ("Q4_0_4_8", 32, 18),
    33: ("Q4_0_8_8", 32, 18),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    36: ("IQ4_NL_4_4", 32, 18),
    37: ("IQ4_NL_4_8", 32, 18),
    38: ("IQ4_NL_8_8", 32, 18),
    39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36),
    41: ("Q1_0", 128, 18),
}
GGML_TYPE_IDS: dict[str, int] = {name: tid for tid, (name, _, _) in GGML_TYPES.items()}

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


def type_name(type_id: int) -> str:
    entry = GGML_TYPES.get(int(type_id))
    return entry[0] if entry else f"type {int(type_id)}"


def align(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def row_bytes(type_id: int, n_values: int) -> int:
    """Bytes of `n_values` consecutive values (a multiple of the block size) of a ggml type."""
    _, block, size = GGML_TYPES[int(type_id)]
    return n_values // block * size


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
