"""GGUF container: our writer and reader against gguf-py (the independent oracle), and bad files.

- gguf-py's `GGUFReader` reads every file our writer produces: same value types, values, shapes
  and tensor bytes.
- our reader reads files produced by gguf-py's `GGUFWriter` (quantized tensors made by
  `gguf.quants.quantize`) and llama.cpp's own vocabulary file: same values and bytes.
- malformed files, derived from a valid one at byte positions located by gguf-py, each give one
  PocketLMError naming the file and the field, without a large allocation.
"""

from __future__ import annotations

import os
import struct
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest

from pocketlm.errors import PocketLMError
from pocketlm.export.gguf_format import GGML_TYPES, ValueType, bf16_to_float32, float32_to_bf16
from pocketlm.export.gguf_reader import GGUFReader
from pocketlm.export.gguf_writer import GGUFWriter, Typed
from pocketlm.quantize.formats import BLOCK_SHAPE, GGMLType

Q = gguf.GGMLQuantizationType
RNG = np.random.default_rng(1234)


def test_type_table_agrees_with_gguf_py_and_formats():
    for tid, (name, block, size) in GGML_TYPES.items():
        if tid in {t.value for t in Q}:
            assert Q(tid).name == name
            assert gguf.GGML_QUANT_SIZES[Q(tid)] == (block, size)
    for t in Q:  # every type gguf-py knows is in our table
        assert t.value in GGML_TYPES
    for t, shape in BLOCK_SHAPE.items():
        assert GGML_TYPES[int(t)][1:] == shape


def test_bf16_conversion_matches_gguf_py():
    x = RNG.standard_normal(1000).astype(np.float32) * 100
    ours = float32_to_bf16(x)
    theirs = gguf.quants.quantize(x, Q.BF16).view(np.uint16)
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(bf16_to_float32(ours),
                                  gguf.quants.dequantize(theirs.view(np.uint8), Q.BF16))


# ---------------------------------------------------------------------------- our writer -> gguf-py

METADATA = {
    "general.architecture": "phi3",
    "general.name": "tiny test ✓",
    "general.file_type": 1,
    "phi3.context_length": 4096,
    "phi3.attention.layer_norm_rms_epsilon": 1e-5,
    "phi3.rope.freq_base": 10000.0,
    "tokenizer.ggml.tokens": ["<unk>", "<s>", "▁hello", "é\n"],
    "tokenizer.ggml.scores": [0.0, -1.5, 2.25, -1000.0],
    "tokenizer.ggml.token_type": [2, 3, 1, 4],
    "tokenizer.ggml.add_bos_token": True,
    "tokenizer.ggml.bos_token_id": 1,
    "test.negative": -5,
    "test.int64": 2**40,
    "test.float64": Typed(0.1, ValueType.FLOAT64),
    "test.uint8": Typed(200, ValueType.UINT8),
    "test.int16_array": Typed([-3, 7], ValueType.INT16),
    "test.numpy_u64": np.array([1, 2**50], dtype=np.uint64),
    "test.bools": [True, False, True],
    "test.nested": [[1, 2], [3]],
}
# name -> (gguf-py type, expected values for gguf-py's contents())
EXPECTED_TYPES = {
    "general.name": [ValueType.STRING],
    "general.file_type": [ValueType.UINT32],
    "phi3.context_length": [ValueType.UINT32],
    "phi3.attention.layer_norm_rms_epsilon": [ValueType.FLOAT32],
    "phi3.rope.freq_base": [ValueType.FLOAT32],
    "tokenizer.ggml.tokens": [ValueType.ARRAY, ValueType.STRING],
    "tokenizer.ggml.scores": [ValueType.ARRAY, ValueType.FLOAT32],
    "tokenizer.ggml.token_type": [ValueType.ARRAY, ValueType.INT32],
    "tokenizer.ggml.add_bos_token": [ValueType.BOOL],
    "tokenizer.ggml.bos_token_id": [ValueType.UINT32],
    "test.negative": [ValueType.INT32],
    "test.int64": [ValueType.INT64],
    "test.float64": [ValueType.FLOAT64],
    "test.uint8": [ValueType.UINT8],
    "test.int16_array": [ValueType.ARRAY, ValueType.INT16],
    "test.numpy_u64": [ValueType.ARRAY, ValueType.UINT64],
    "test.bools": [ValueType.ARRAY, ValueType.BOOL],
    "test.nested": [ValueType.ARRAY, ValueType.ARRAY, ValueType.INT32],
}


def _tensors() -> dict[str, tuple[int, np.ndarray, np.ndarray]]:
    """name -> (ggml type, what we hand the writer, the bytes gguf-py must find)."""
    w = RNG.standard_normal((8, 64)).astype(np.float32)
    out = {
        "f32": (GGMLType.F32, w[0], w[0].view(np.uint8)),
        "f16": (GGMLType.F16, w, w.astype(np.float16).view(np.uint8)),
        "bf16": (GGMLType.BF16, w[:2], gguf.quants.quantize(w[:2], Q.BF16).view(np.uint8)),
    }
    for q in (Q.Q4_0, Q.Q8_0, Q.Q5_0):  # Q5_0: a type pocketlm does not implement, written raw
        blocks = gguf.quants.quantize(w, q)
        out[q.name.lower()] = (q.value, blocks, blocks)
    return out


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("gguf") / "ours.gguf"
    tensors = _tensors()
    declared = [(n, t, (d.shape if d.dtype != np.uint8 else (8, 64))) for n, (t, d, _) in tensors.items()]
    with GGUFWriter(path, METADATA, declared) as w:
        for name in reversed(list(tensors)):  # any order: each goes to its planned offset
            w.write_tensor(name, tensors[name][1])
    return path, tensors


def test_gguf_py_reads_our_metadata(written):
    path, _ = written
    r = gguf.GGUFReader(path)
    assert r.fields["GGUF.version"].contents() == 3
    for key, types in EXPECTED_TYPES.items():
        assert [int(t) for t in r.fields[key].types] == [int(t) for t in types], key
    for key, value in METADATA.items():
        got = r.fields[key].contents()
        if isinstance(value, Typed):
            value = value.value
        if key == "test.nested":  # gguf-py flattens nested arrays
            value = [1, 2, 3]
        if isinstance(value, np.ndarray):
            value = value.tolist()
        if isinstance(value, float) or (isinstance(value, list) and isinstance(value[0], float)):
            np.testing.assert_allclose(got, value, rtol=1e-7, err_msg=key)
        else:
            assert got == value, key


def test_gguf_py_reads_our_tensors(written):
    path, tensors = written
    r = gguf.GGUFReader(path)
    by_name = {t.name: t for t in r.tensors}
    assert list(by_name) == list(tensors)
    for name, (gtype, data, expected_bytes) in tensors.items():
        t = by_name[name]
        assert int(t.tensor_type) == int(gtype)
        numpy_shape = data.shape if data.dtype != np.uint8 else (8, 64)
        assert tuple(int(d) for d in t.shape) == tuple(reversed(numpy_shape))
        assert t.data_offset % 32 == 0
        assert np.ascontiguousarray(t.data).tobytes() == np.ascontiguousarray(expected_bytes).tobytes()


def test_our_reader_round_trip(written):
    path, tensors = written
    with GGUFReader(path) as r:
        assert r.version == 3
        assert r.metadata["general.name"] == "tiny test ✓"
        assert r.metadata["tokenizer.ggml.tokens"] == METADATA["tokenizer.ggml.tokens"]
        assert r.value_types["test.numpy_u64"] == (ValueType.ARRAY, ValueType.UINT64)
        np.testing.assert_array_equal(r.metadata["test.numpy_u64"], METADATA["test.numpy_u64"])
        assert [a.tolist() for a in r.metadata["test.nested"]] == [[1, 2], [3]]
        for name, (gtype, _, expected_bytes) in tensors.items():
            assert r.info(name).type_id == int(gtype)
            assert r.raw(name).tobytes() == np.ascontiguousarray(expected_bytes).tobytes()
            assert r.raw(name).flags.owndata is False  # a view into the map, not a copy
        np.testing.assert_array_equal(r.tensor("f32"), tensors["f32"][1])
        np.testing.assert_array_equal(r.dequantize("f16"),
                                      tensors["f16"][1].astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(r.dequantize("bf16"), gguf.quants.dequantize(
            tensors["bf16"][2], Q.BF16).reshape(2, 64))
        assert r.tensor("q4_0").shape == (8, 2 * 18)  # rows of raw blocks
        with pytest.raises(PocketLMError, match="Q5_0"):
            r.dequantize("q5_0")


def test_writer_alignment_and_file_type_from_metadata(tmp_path):
    path = tmp_path / "a64.gguf"
    x = np.arange(96, dtype=np.float32)
    with GGUFWriter(path, {"general.alignment": 64}, [("a", 0, (3,)), ("b", 0, (96,))]) as w:
        w.write_tensor("a", x[:3])
        w.write_tensor("b", x)
    r = gguf.GGUFReader(path)
    assert r.alignment == 64
    assert [t.data_offset % 64 for t in r.tensors] == [0, 0]
    np.testing.assert_array_equal(r.tensors[1].data, x)
    assert os.path.getsize(path) % 64 == 0  # the last tensor is padded too (llama.cpp's loader expects it)


# ---------------------------------------------------------------------------- gguf-py writer -> our reader

def test_our_reader_reads_gguf_py_files(tmp_path):
    path = tmp_path / "theirs.gguf"
    w = gguf.GGUFWriter(path, "phi3")
    w.add_uint32("phi3.block_count", 2)
    w.add_float32("phi3.rope.freq_base", 10000.0)
    w.add_string("general.name", "théirs")
    w.add_bool("tokenizer.ggml.add_eos_token", False)
    w.add_int64("test.i64", -(2**40))
    w.add_float64("test.f64", 0.1)
    w.add_array("test.strings", ["a", "", "ü"])
    w.add_array("test.floats", [1.5, -2.0])
    x = RNG.standard_normal((4, 256)).astype(np.float32)
    quantized = {}
    for q in (Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q5_1, Q.BF16):
        quantized[q] = gguf.quants.quantize(x, q)
        w.add_tensor(f"t.{q.name}", quantized[q], raw_dtype=q)
    w.add_tensor("t.F32", x)
    w.add_tensor("t.F16", x.astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    theirs = gguf.GGUFReader(path)
    with GGUFReader(path) as r:
        for key, field in theirs.fields.items():
            if key.startswith("GGUF."):
                continue
            assert r.value_types[key][0] == field.types[0], key
            ours = r.metadata[key]
            if isinstance(ours, np.ndarray):
                ours = ours.tolist()
            assert ours == (pytest.approx(field.contents()) if isinstance(ours, float) else field.contents())
        for t in theirs.tensors:
            info = r.info(t.name)
            assert info.type_id == int(t.tensor_type)
            assert info.shape == tuple(reversed([int(d) for d in t.shape]))
            assert info.offset == t.data_offset
            assert r.raw(t.name).tobytes() == np.ascontiguousarray(t.data).tobytes()
        np.testing.assert_array_equal(r.tensor("t.F32"), x)
        np.testing.assert_array_equal(r.dequantize("t.F16"), x.astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(r.dequantize("t.BF16"),
                                      gguf.quants.dequantize(quantized[Q.BF16], Q.BF16))
        for q in (Q.Q4_0, Q.Q8_0):  # types pocketlm dequantizes: the same floats as gguf-py
            np.testing.assert_array_equal(r.dequantize(f"t.{q.name}"),
                                          gguf.quants.dequantize(quantized[q], q))
        with pytest.raises(PocketLMError, match="Q5_1"):
            r.dequantize("t.Q5_1")


def test_reads_llama_cpp_vocab_file(data_root):
    path = data_root / "data/phi3/ggml-vocab-phi-3.gguf"
    theirs = gguf.GGUFReader(path)
    with GGUFReader(path) as r:
        assert not r.tensors
        fields = r.tokenizer_fields()
        assert len(fields["tokenizer.ggml.tokens"]) == 32064
        assert fields["tokenizer.ggml.tokens"] == theirs.fields["tokenizer.ggml.tokens"].contents()
        np.testing.assert_array_equal(fields["tokenizer.ggml.scores"],
                                      np.array(theirs.fields["tokenizer.ggml.scores"].contents(), np.float32))
        assert fields["tokenizer.chat_template"] == theirs.fields["tokenizer.chat_template"].contents()
        assert r.metadata["phi3.block_count"] == 32


# ---------------------------------------------------------------------------- writer failure modes

def _declared():
    return [("a", GGMLType.F32, (4,)), ("b", GGMLType.F16, (2, 4)), ("c", GGMLType.Q4_0, (1, 32))]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_writer_leaves_nothing_behind_on_exception(tmp_path, exc):
    target = tmp_path / "model.gguf"
    target.write_bytes(b"old contents")
    with pytest.raises(exc), GGUFWriter(target, {"general.name": "x"}, _declared()) as w:
        w.write_tensor("a", np.ones(4, np.float32))
        raise exc()
    assert _leftovers(tmp_path) == ["model.gguf"]
    assert target.read_bytes() == b"old contents"


@pytest.mark.parametrize("case, match", [
    ("missing", "never arrived"),
    ("twice", "written twice"),
    ("undeclared", "not declared"),
    ("wrong shape", "shape"),
    ("wrong raw size", "raw bytes"),
    ("float for quantized", "raw uint8"),
    ("nan", "NaN"),
    ("f16 overflow", "overflow"),
])
def test_writer_rejects_bad_tensor_data(tmp_path, case, match):
    target = tmp_path / "model.gguf"
    good = {"a": np.ones(4, np.float32), "b": np.ones((2, 4), np.float32), "c": np.zeros(18, np.uint8)}
    bad = dict(good)
    with pytest.raises(PocketLMError, match=match), GGUFWriter(target, {}, _declared()) as w:
        if case == "missing":
            del bad["c"]
        elif case == "twice":
            w.write_tensor("a", good["a"])
        elif case == "undeclared":
            bad["z"] = good["a"]
        elif case == "wrong shape":
            bad["b"] = np.ones((4, 2), np.float32)
        elif case == "wrong raw size":
            bad["c"] = np.zeros(17, np.uint8)
        elif case == "float for quantized":
            bad["c"] = np.ones((1, 32), np.float32)
        elif case == "nan":
            bad["a"] = np.array([1, np.nan, 0, 0], np.float32)
        elif case == "f16 overflow":
            bad["b"] = np.full((2, 4), 1e6, np.float32)
        for name, data in bad.items():
            w.write_tensor(name, data)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("tensors, metadata, match", [
    ([("a", 0, (4,)), ("a", 0, (4,))], {}, "twice"),
    ([("a", 99, (4,))], {}, "unknown ggml type"),
    ([("a", GGMLType.Q4_0, (2, 48))], {}, "block size"),
    ([("a", 0, (0,))], {}, "positive"),
    ([("a", 0, (1, 1, 1, 1, 1))], {}, "dimensions"),
    ([], {"general.alignment": 24}, "power of two"),
    ([], {"phi3.block_count": -1}, "out of range"),
    ([], {"tokenizer.ggml.add_bos_token": 1}, "bool"),
    ([], {"tokenizer.ggml.token_type": [1, 2.5]}, "integer"),
    ([], {"test.object": object()}, "cannot store"),
])
def test_writer_rejects_bad_declarations(tmp_path, tensors, metadata, match):
    with pytest.raises(PocketLMError, match=match):
        GGUFWriter(tmp_path / "x.gguf", metadata, tensors)
    assert _leftovers(tmp_path) == []


# ---------------------------------------------------------------------------- malformed files

@pytest.fixture(scope="module")
def valid_file(tmp_path_factory) -> tuple[bytes, gguf.GGUFReader]:
    path = tmp_path_factory.mktemp("valid") / "valid.gguf"
    metadata = {"general.architecture": "phi3", "general.alignment": 32, "test.ints": [1, 2, 3],
                "test.strs": ["ab", "cd"]}
    x = np.ones((2, 64), np.float32)
    declared = [("t0", GGMLType.F32, (2, 32)), ("t1", GGMLType.Q4_0, (2, 64)), ("t2", GGMLType.F16, (32,))]
    with GGUFWriter(path, metadata, declared) as w:
        w.write_tensor("t0", x[:, :32])
        w.write_tensor("t1", gguf.quants.quantize(x, Q.Q4_0))
        w.write_tensor("t2", x[0, :32])
    return path.read_bytes(), gguf.GGUFReader(path)


def _part(field, index: int) -> int:
    """Byte position of part `index` of a gguf-py field: key length, key, value type, then the value
    (string: length, bytes; array: element type, count, elements)."""
    return int(field.offset) + sum(int(p.nbytes) for p in field.parts[:index])


def _put(data: bytes, pos: int, fmt: str, value) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, pos, value)
    return bytes(b)


def _kv(r, key):
    return r.fields[key]


def _tensor_field(r, i):
    return r.tensors[i].field  # parts: name length, name, n_dims, dims, type, offset


MALFORMED = {
    # name: (make(bytes, gguf-py reader) -> bytes, words the message must contain)
    "empty file": (lambda d, r: b"", "truncated"),
    "truncated in header": (lambda d, r: d[:13], "truncated"),
    "truncated in a key": (lambda d, r: d[:_part(_kv(r, "general.architecture"), 1) + 3], "truncated"),
    "truncated in an array": (lambda d, r: d[:_part(_kv(r, "test.ints"), 5) + 2], "truncated"),
    "truncated in tensor infos": (lambda d, r: d[:_part(_tensor_field(r, 1), 3) + 4], "truncated"),
    "truncated in tensor data": (lambda d, r: d[:r.tensors[1].data_offset + 5], "runs past the end"),
    "truncated by one byte": (lambda d, r: d[:-1], "runs past the end"),
    "wrong magic": (lambda d, r: b"GGML" + d[4:], "bad magic"),
    "version 99": (lambda d, r: _put(d, 4, "<I", 99), "version 99"),
    "version 1": (lambda d, r: _put(d, 4, "<I", 1), "version 1"),
    "big-endian": (lambda d, r: _put(d, 4, ">I", 3), "big-endian"),
    "2^60 tensors": (lambda d, r: _put(d, 8, "<Q", 2**60), "tensor_count"),
    "2^60 keys": (lambda d, r: _put(d, 16, "<Q", 2**60), "kv_count"),
    "key length 10^15": (lambda d, r: _put(d, _part(_kv(r, "general.architecture"), 0), "<Q", 10**15),
                         "length 1000000000000000"),
    "string value length 10^15": (
        lambda d, r: _put(d, _part(_kv(r, "general.architecture"), 3), "<Q", 10**15),
        "'general.architecture' has length"),
    "string length past end": (lambda d, r: _put(d, _part(_kv(r, "test.strs"), 5), "<Q", len(d)),
                               "past the end"),
    "array count 10^15": (lambda d, r: _put(d, _part(_kv(r, "test.ints"), 4), "<Q", 10**15),
                          "'test.ints' element count"),
    "unknown value type": (lambda d, r: _put(d, _part(_kv(r, "test.ints"), 2), "<I", 13), "value type"),
    "unknown array element type": (lambda d, r: _put(d, _part(_kv(r, "test.ints"), 3), "<I", 77),
                                   "element type"),
    "alignment not a power of two": (lambda d, r: _put(d, _part(_kv(r, "general.alignment"), 3), "<I", 24),
                                     "power of two"),
    "duplicate key": (lambda d, r: d.replace(b"test.strs", b"test.ints", 1), "'test.ints' appears twice"),
    "duplicate tensor": (lambda d, r: d.replace(b"t1", b"t0", 1), "'t0' appears twice"),
    "5 dimensions": (lambda d, r: _put(d, _part(_tensor_field(r, 0), 2), "<I", 5), "dimensions"),
    "absurd dimension": (lambda d, r: _put(d, _part(_tensor_field(r, 0), 3), "<Q", 2**60), "'t0'"),
    "dimension over int64": (lambda d, r: _put(d, _part(_tensor_field(r, 0), 3) + 8, "<Q", 2**64 - 1),
                             "larger than int64"),
    "unknown tensor type": (lambda d, r: _put(d, _part(_tensor_field(r, 2), 4), "<I", 99),
                            "unknown ggml type"),
    "removed tensor type 4": (lambda d, r: _put(d, _part(_tensor_field(r, 2), 4), "<I", 4),
                              "unknown ggml type"),
    "not a whole block": (lambda d, r: _put(d, _part(_tensor_field(r, 1), 3), "<Q", 48), "block size"),
    "tensor past end of file": (lambda d, r: _put(d, _part(_tensor_field(r, 2), 5), "<Q", len(d)),
                                "'t2' data"),
    "misaligned offset": (lambda d, r: _put(d, _part(_tensor_field(r, 2), 5), "<Q", 8), "not a multiple"),
    "overlapping tensors": (lambda d, r: _put(d, _part(_tensor_field(r, 2), 5), "<Q", 0), "overlaps"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_file_gives_one_clear_error(tmp_path, valid_file, case):
    data, r = valid_file
    make, words = MALFORMED[case]
    bad = make(data, r)
    assert bad != data
    path = tmp_path / "bad.gguf"
    path.write_bytes(bad)
    tracemalloc.start()
    try:
        with pytest.raises(PocketLMError) as err:
            GGUFReader(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(err.value)
    assert str(path) in message
    assert words in message, message
    assert peak < 16 * 2**20  # the header's claims never turn into an allocation


def test_valid_file_parses(valid_file, tmp_path):
    data, _ = valid_file
    path = tmp_path / "ok.gguf"
    path.write_bytes(data)
    with GGUFReader(path) as r:
        assert list(r.tensors) == ["t0", "t1", "t2"]


def test_reads_version_2(valid_file, tmp_path):
    """GGUF v2 has v3's layout (v3 only added big-endian files)."""
    data, _ = valid_file
    path = tmp_path / "v2.gguf"
    path.write_bytes(_put(data, 4, "<I", 2))
    with GGUFReader(path) as r:
        assert r.version == 2
        assert r.metadata["test.strs"] == ["ab", "cd"]
        np.testing.assert_array_equal(r.tensor("t0"), np.ones((2, 32), np.float32))


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(PocketLMError, match="cannot read"):
        GGUFReader(tmp_path / "nope.gguf")
    with pytest.raises(PocketLMError, match="directory"):
        GGUFReader(tmp_path)
