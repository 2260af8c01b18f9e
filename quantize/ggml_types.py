"""GGML tensor types and their block shapes, defined once for every stage.

The quantizer (`formats.py`, which re-exports this), the GGUF reader and writer
(`export/gguf_format.py`), the ONNX exporter (`export/onnx_weights.py`) and the runtime
(`runtime/kernel.py`) all read this table; the C kernel's own table (runtime/kernel/types.c) is
checked against it by tests/test_formats.py.
"""

from __future__ import annotations

from enum import IntEnum

from ..errors import PocketLMError

QK = 32     # values per block of the legacy types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0)
QK_K = 256  # values per super-block of the K-quants

# Every ggml type id that has appeared in GGUF files (ggml.h `enum ggml_type`):
# id -> (name, values per block, bytes per block). Ids 4, 5 (Q4_2, Q4_3) were removed before GGUF;
# 31-33 and 36-38 are the removed ARM repacked types, still found in old files.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", QK, 18),        # fp16 d | 16 B of nibbles
    3: ("Q4_1", QK, 20),        # fp16 d | fp16 m | 16 B
    6: ("Q5_0", QK, 22),
    7: ("Q5_1", QK, 24),
    8: ("Q8_0", QK, 34),        # fp16 d | 32 int8
    9: ("Q8_1", QK, 40),
    10: ("Q2_K", QK_K, 84),
    11: ("Q3_K", QK_K, 110),
    12: ("Q4_K", QK_K, 144),    # fp16 d | fp16 dmin | 12 B 6-bit scales/mins | 128 B
    13: ("Q5_K", QK_K, 176),    # as Q4_K + 32 B of fifth bits
    14: ("Q6_K", QK_K, 210),    # 128 B ql | 64 B qh | 16 int8 scales | fp16 d
    15: ("Q8_K", QK_K, 292),
    16: ("IQ2_XXS", QK_K, 66),
    17: ("IQ2_XS", QK_K, 74),
    18: ("IQ3_XXS", QK_K, 98),
    19: ("IQ1_S", QK_K, 50),
    20: ("IQ4_NL", QK, 18),
    21: ("IQ3_S", QK_K, 110),
    22: ("IQ2_S", QK_K, 82),
    23: ("IQ4_XS", QK_K, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", QK_K, 56),
    30: ("BF16", 1, 2),
    31: ("Q4_0_4_4", QK, 18),
    32: ("Q4_0_4_8", QK, 18),
    33: ("Q4_0_8_8", QK, 18),
    34: ("TQ1_0", QK_K, 54),
    35: ("TQ2_0", QK_K, 66),
    36: ("IQ4_NL_4_4", QK, 18),
    37: ("IQ4_NL_4_8", QK, 18),
    38: ("IQ4_NL_8_8", QK, 18),
    39: ("MXFP4", QK, 17),
    40: ("NVFP4", 64, 36),
    41: ("Q1_0", 128, 18),
}
GGML_TYPE_IDS: dict[str, int] = {name: tid for tid, (name, _, _) in GGML_TYPES.items()}


class GGMLType(IntEnum):
    """The GGML types pocketlm quantizes to and dequantizes (ids as stored in GGUF files)."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q8_0 = 8
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    BF16 = 30


# type -> (values per block, bytes per block), for pocketlm's own types
BLOCK_SHAPE: dict[GGMLType, tuple[int, int]] = {t: GGML_TYPES[t][1:] for t in GGMLType}


def type_name(type_id: int) -> str:
    entry = GGML_TYPES.get(int(type_id))
    return entry[0] if entry else f"type {int(type_id)}"


def block_shape(type_id: int) -> tuple[int, int]:
    """(values per block, bytes per block) of any ggml type id; a PocketLMError for unknown ids."""
    entry = GGML_TYPES.get(int(type_id))
    if entry is None:
        raise PocketLMError(f"unknown GGUF tensor type {int(type_id)}")
    return entry[1], entry[2]


def row_bytes(type_id: int, n_values: int) -> int:
    """Bytes of `n_values` consecutive values of a ggml type (a multiple of its block size)."""
    values, nbytes = block_shape(type_id)
    if n_values % values:
        raise PocketLMError(f"row of {n_values} values is not a multiple of the {type_name(type_id)} "
                            f"block size {values}")
    return n_values // values * nbytes
