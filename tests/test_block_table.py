"""Block formats defined once (quantize/ggml_types.py, re-exported by quantize/formats.py): every stage
reads that table, gguf-py agrees with it, and the C kernel's own table (runtime/kernel/types.c) is
checked against it through the extension's `type_info`."""

from __future__ import annotations

import gguf

from pocketlm.quantize import formats as F


def test_the_type_table_is_gguf_pys():
    """Every ggml type id gguf-py knows has the same name and block shape in our one table."""
    known = 0
    for t in gguf.GGMLQuantizationType:
        if int(t) in F.GGML_TYPES:
            known += 1
            name, block, size = F.GGML_TYPES[int(t)]
            assert name == t.name and (block, size) == gguf.GGML_QUANT_SIZES[t], t
    assert known >= 30
    assert {t: F.GGML_TYPES[t][1:] for t in F.GGMLType} == F.BLOCK_SHAPE


def test_the_kernel_c_table_agrees_with_the_python_table():
    """runtime/kernel/types.c's TYPES (through the extension's `type_info`) against the one table:
    the same (values, bytes) for every GGUF type the kernel runs, and only those types."""
    from pocketlm.runtime import _kernel
    from pocketlm.runtime import kernel as K

    in_kernel = {}
    for tid in F.GGML_TYPES:
        try:
            in_kernel[tid] = _kernel.type_info(tid)
        except ValueError:
            continue
    assert set(in_kernel) == {F.GGMLType.Q4_0, F.GGMLType.Q4_1, F.GGMLType.Q8_0, F.GGMLType.Q4_K,
                              F.GGMLType.Q6_K} == K.KERNEL_TYPES
    for tid, shape in in_kernel.items():
        assert tuple(shape) == F.BLOCK_SHAPE[F.GGMLType(tid)], F.type_name(tid)
        assert K.row_bytes(tid, 3072) == F.row_bytes(tid, 3072)
    # The packed layouts (not GGUF types): groups of 512 values, the source type's bytes per weight.
    for src, packed in K.PACKED.items():
        values, nbytes = _kernel.type_info(packed)
        src_values, src_bytes = F.BLOCK_SHAPE[F.GGMLType(src)]
        assert (values, nbytes) == (512, 512 // src_values * src_bytes)
        assert K.row_bytes(packed, 1024) == F.row_bytes(src, 1024)
    assert K.Q4_0 == F.GGMLType.Q4_0


def test_every_stage_reads_the_one_table():
    from pocketlm.export import gguf_format, onnx_weights
    from pocketlm.runtime import kernel as K

    assert gguf_format.GGML_TYPES is F.GGML_TYPES
    assert gguf_format.row_bytes is F.row_bytes and K.ggml_types.row_bytes is F.row_bytes
    assert onnx_weights.QK == F.QK and onnx_weights.unpack_scale_min_k4 is F.unpack_scale_min_k4
