"""GGUF -> ONNX export, proven by the peers:

(a) onnxruntime.InferenceSession on the exported folder gives the logits of our reference forward
    pass on the GGUF's dequantized weights (dequantized by gguf-py), for a prompt and then token by
    token through the KV cache: MHA, GQA, LongRoPE across the original context, sliding window;
    Q4_0, Q8_0, Q4_1, F16, Q4_K, Q6_K, Q5_0, Q5_1, Q5_K files, and files from llama.cpp's own
    quantizer (Q4_K_M, Q5_K_M).
(b) onnxruntime-genai runs the folder as it is and generates the same greedy tokens as llama.cpp
    (llama-cpp-python on the same GGUF) and as the reference, on the built-in trained model.
(c) the weights ONNX dequantizes (recomputed from the MatMulNBits initializers by the operator's
    definition, and read back from onnxruntime itself by multiplying with the identity) equal
    gguf-py's dequantization of the GGUF bit for bit.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import gguf
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx_helpers import (  # tests/ is on sys.path (conftest)
    genai_greedy,
    gguf_py_weights,
    nbits_layers,
    nbits_weight,
    onnxruntime_weight_t,
    reference_from_gguf,
    reference_greedy,
    session_for,
)
from quant_helpers import NEAR_TIE, llama_cpp_greedy

from pocketlm.config import tensor_specs
from pocketlm.errors import PocketLMError
from pocketlm.export.gguf_export import phi3_gguf_metadata
from pocketlm.export.gguf_reader import GGUFReader
from pocketlm.export.gguf_writer import GGUFWriter
from pocketlm.export.onnx_export import describe_onnx, export_onnx
from pocketlm.quantize.formats import GGMLType, quantize
from pocketlm.tokenizer import Tokenizer

ort = pytest.importorskip("onnxruntime")  # a declared test dependency: missing means a broken install

PROMPT = [1, 5, 7, 200, 33, 90, 4, 17, 250, 11]
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # conftest, quant_helpers (tests/ is not a package)


# ---------------------------------------------------------------------------- fixtures

def tiny_tokenizer(n: int) -> Tokenizer:
    """<unk> <s> </s>, the 256 byte tokens, then filler pieces up to `n` tokens."""
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    pieces += ["▁" + chr(97 + i % 26) * (1 + i // 26) for i in range(n - len(pieces))]
    types = [2, 3, 3] + [6] * 256 + [1] * (n - 259)
    return Tokenizer(pieces, [0.0] * n, types, bos_id=1, eos_id=2, unk_id=0)


def write_gguf(path: Path, ckpt_dir: Path, qtype: int, types: dict[str, int] | None = None) -> Path:
    """The checkpoint as a GGUF: linear layers and embedding in `qtype`, norms F32."""
    from pocketlm.checkpoint import Checkpoint

    ckpt = Checkpoint.open(ckpt_dir)
    cfg = ckpt.config
    md = phi3_gguf_metadata(cfg, tiny_tokenizer(cfg.vocab_size).to_gguf_fields(), name="tiny",
                            file_type=1, recipe=gguf.GGMLQuantizationType(qtype).name, method="rtn")
    specs = tensor_specs(cfg)

    def gtype(spec):
        if spec.kind in ("norm", "rope_factors"):
            return GGMLType.F32
        return (types or {}).get(spec.name, qtype)

    with GGUFWriter(path, md, [(s.name, gtype(s), s.shape) for s in specs]) as w:
        for s in specs:
            if s.kind == "rope_factors":
                scaling = cfg.rope_scaling
                x = np.asarray(scaling.long_factor if "long" in s.name else scaling.short_factor, np.float32)
            else:
                x = np.asarray(ckpt.tensor(s.name), np.float32)
            t = gtype(s)
            if t in (GGMLType.F32, GGMLType.F16):
                w.write_tensor(s.name, x)
            elif t in list(GGMLType):
                w.write_tensor(s.name, quantize(x, t, s.name))
            else:  # a type pocketlm does not quantize: gguf-py's bytes, else random blocks
                w.write_tensor(s.name, foreign_blocks(x, t))
    return path


def foreign_blocks(x: np.ndarray, type_id: int) -> np.ndarray:
    """x in a ggml type pocketlm does not implement: gguf-py's quantizer where it has one, else
    random code bytes with the fp16 scale fields (at the start of each block) set to 0.5..2 / 64."""
    qtype = gguf.GGMLQuantizationType(type_id)
    try:
        return gguf.quants.quantize(x, qtype)
    except NotImplementedError:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        rng = np.random.default_rng(type_id)
        raw = rng.integers(0, 256, (x.shape[0], x.shape[1] // block, size), dtype=np.uint8)
        scales = (rng.uniform(0.5, 2.0, (*raw.shape[:2], 2)) / 64).astype(np.float16)
        raw[..., :4] = scales.view(np.uint8).reshape(*raw.shape[:2], 4)  # d, dmin
        return raw.reshape(x.shape[0], -1)


@pytest.fixture(scope="session")
def tiny_export(tiny_checkpoint, tmp_path_factory):
    """Factory: (kind, type name) -> (gguf path, exported folder)."""
    import transformers

    tiny_hf_config = importlib.import_module("conftest").tiny_hf_config
    made: dict[tuple[str, str], tuple[Path, Path]] = {}

    def make(kind: str, qtype: str) -> tuple[Path, Path]:
        if (kind, qtype) not in made:
            out = tmp_path_factory.mktemp(f"onnx-{kind}-{qtype}")
            if qtype.endswith("_K"):  # K-quant rows need multiples of 256
                import torch

                torch.manual_seed(0)
                model = transformers.Phi3ForCausalLM(
                    tiny_hf_config(kind, hidden_size=256, intermediate_size=256)).eval()
                with torch.no_grad():
                    for p in model.parameters():
                        if p.dim() == 2:
                            p.normal_(0.0, 0.08)
                model.save_pretrained(out / "ckpt")
                ckpt = out / "ckpt"
            else:
                ckpt = tiny_checkpoint(kind)
            gguf_path = write_gguf(out / "model.gguf", ckpt, gguf_type(qtype))
            # level 1 (float32 activations): these folders are compared with the reference's logits
            export_onnx(gguf_path, out / "onnx", accuracy_level=1, progress=False)
            made[kind, qtype] = (gguf_path, out / "onnx")
        return made[kind, qtype]

    return make


def gguf_type(name: str) -> int:
    """pocketlm's GGMLType where it has one, else the ggml type id (Q5_0, Q5_1, Q5_K)."""
    return GGMLType[name] if name in GGMLType.__members__ else int(gguf.GGMLQuantizationType[name])


def session(folder: Path):
    return session_for(folder / "model.onnx")


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


# ---------------------------------------------------------------------------- (a) logits

CASES = [(k, q) for k in ("mha", "gqa", "longrope", "swa") for q in ("Q4_0", "Q8_0", "Q4_1", "F16")]
CASES += [("gqa", "Q4_K"), ("longrope", "Q6_K"), ("gqa", "Q5_0"), ("swa", "Q5_1"), ("mha", "Q5_K")]
# partial RoPE (Phi-4-mini's 3/4 of each head), tied output: the K-quant fixtures' head_dim 64
# rotates 48 values, which onnxruntime's caches allow (width 24, a multiple of 8)
CASES += [("partial", "Q4_K"), ("partial-longrope", "Q6_K")]


@pytest.mark.parametrize(("kind", "qtype"), CASES)
def test_logits_match_reference_through_the_cache(tiny_export, kind, qtype):
    gguf_path, folder = tiny_export(kind, qtype)
    ref = reference_from_gguf(gguf_path)
    cfg = ref.cfg
    sess = session(folder)
    names = [o.name for o in sess.get_outputs()]
    kv = {f"past_key_values.{i}.{k}": np.zeros((1, cfg.num_key_value_heads, 0, cfg.head_dim), np.float32)
          for i in range(cfg.num_hidden_layers) for k in ("key", "value")}
    # LongRoPE: original context 64, so prompt + steps cross it; sliding window 8 < the prompt.
    prompt = (PROMPT * 6)[:50] if kind.endswith("longrope") else PROMPT
    steps = 24
    cache, feed, total = ref.new_cache(), list(prompt), 0
    for _ in range(steps + 1):
        total += len(feed)
        out = sess.run(None, {"input_ids": np.array([feed], np.int64),
                              "attention_mask": np.ones((1, total), np.int64), **kv})
        want = ref.forward(feed, cache)
        assert out[0].shape == (1, len(feed), cfg.vocab_size)
        assert rel_err(out[0][0], want) < 1e-3, f"{kind} {qtype} at length {total}"
        kv = {n.replace("present", "past_key_values"): v for n, v in zip(names[1:], out[1:], strict=True)}
        feed = [int(np.argmax(want[-1]))]
    assert total > 64 or not kind.endswith("longrope")


@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q5_K_M"])
def test_llama_cpp_quantized_files_export(tmp_path, ftype):
    """GGUFs from llama.cpp's own quantizer (K-quant mixes with Q4_K/Q5_K/Q6_K and fallbacks) export
    and give the reference's logits on their gguf-py-dequantized weights."""
    from pocketlm.export.gguf_export import export_gguf

    helpers = importlib.import_module("quant_helpers")
    ckpt = helpers.make_checkpoint(tmp_path / "ckpt", hidden=256, vocab=1024)
    f16 = export_gguf(ckpt, tmp_path / "f16.gguf", dtype="f16")
    quantized = helpers.llama_cpp_quantize(f16, tmp_path / f"{ftype}.gguf", ftype)
    with GGUFReader(quantized) as r:
        types = {t.type_name for t in r}
    assert types & {"Q4_K", "Q5_K"} and "Q6_K" in types, types
    export_onnx(quantized, tmp_path / "onnx", accuracy_level=1, progress=False)
    ref = reference_from_gguf(quantized)
    sess = session(tmp_path / "onnx")
    kv = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in sess.get_inputs()[2:]}
    out = sess.run(["logits"], {"input_ids": np.array([PROMPT], np.int64),
                                "attention_mask": np.ones((1, len(PROMPT)), np.int64), **kv})[0]
    assert rel_err(out[0], ref.forward(PROMPT)) < 1e-3


def test_longrope_uses_both_caches(tiny_export):
    """The If node switches to the long-factor caches past the original context (64 here)."""
    _, folder = tiny_export("longrope", "Q4_0")
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    assert [d for d in inits["cos_cache_small"].dims] == [64, 8]
    assert [d for d in inits["cos_cache_large"].dims] == [512, 8]
    assert any(n.op_type == "If" for n in model.graph.node)


# ---------------------------------------------------------------------------- (c) weights

@pytest.mark.parametrize(("qtype", "level"), [("Q4_0", None), ("Q8_0", None), ("Q8_0", 4), ("Q4_1", None),
                                              ("Q4_K", None), ("Q6_K", None), ("Q6_K", 4), ("Q5_0", None),
                                              ("Q5_1", None), ("Q5_1", 4), ("Q5_K", None)])
def test_onnx_weights_equal_gguf_bit_for_bit(tiny_export, tmp_path, qtype, level):
    gguf_path, folder = tiny_export("gqa", qtype)
    if level is not None:  # level 4 keeps 8-bit weights whole (level 1 splits them in 4-bit halves)
        export_onnx(gguf_path, tmp_path / "onnx", accuracy_level=level, progress=False)
        folder = tmp_path / "onnx"
    theirs = gguf_py_weights(gguf_path)
    layers = nbits_layers(folder)
    inits = layers.pop("")
    assert len(layers) == 2 * 4 + 1  # 4 linear layers x 2 blocks + lm_head
    for name, nodes in layers.items():
        w = nbits_weight(nodes, inits)
        want = theirs[name].reshape(w.shape)
        assert np.array_equal(w, want.astype(np.float64)), f"{name}: not exactly the GGUF values"
        assert w.astype(np.float32).view(np.uint32).tolist() == want.view(np.uint32).tolist(), name
        bits = {a["bits"] for _, a in nodes}
        assert bits == ({8} if level == 4 and qtype in ("Q8_0", "Q6_K", "Q5_1") else {4}), name


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0", "Q6_K", "Q5_0"])
def test_onnxruntime_dequantizes_to_the_gguf_values(tiny_export, qtype):
    """MatMulNBits(A = identity) returns W.T exactly (one product with 1.0 per output), so this reads
    onnxruntime's own dequantization of every layer and compares it with gguf-py's."""
    gguf_path, folder = tiny_export("gqa", qtype)
    theirs = gguf_py_weights(gguf_path)
    layers = nbits_layers(folder)
    inits = layers.pop("")
    for name, nodes in layers.items():
        wt = onnxruntime_weight_t(nodes, inits)
        want = theirs[name].reshape(wt.shape[1], wt.shape[0])
        # equal as floats: bit for bit except the sign of zero, which a sum cannot show
        assert np.array_equal(wt.T, want), name


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0", "Q4_1", "Q4_K", "Q6_K", "Q5_0", "Q5_1", "Q5_K", "F16"])
def test_embedding_rows_equal_gguf(tiny_export, qtype):
    """The graph's embedding output (made a model output) for every token id, one id per batch row,
    against gguf-py's dequantized token_embd."""
    gguf_path, folder = tiny_export("gqa", qtype)
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    first_norm = next(n for n in model.graph.node if n.op_type == "SimplifiedLayerNormalization")
    model.graph.output.append(helper.make_tensor_value_info(first_norm.input[0], TensorProto.FLOAT, None))
    probe = folder / "embedding_probe.onnx"  # beside model.onnx.data, which it references
    probe.write_bytes(model.SerializeToString())
    try:
        sess = session_for(probe)
        want = gguf_py_weights(gguf_path)["token_embd.weight"]
        v = want.shape[0]
        kv = {i.name: np.zeros((v, i.shape[1], 0, i.shape[3]), np.float32) for i in sess.get_inputs()[2:]}
        got = sess.run([first_norm.input[0]], {"input_ids": np.arange(v, dtype=np.int64)[:, None],
                                               "attention_mask": np.ones((v, 1), np.int64), **kv})[0]
    finally:
        probe.unlink()
    assert np.array_equal(got[:, 0, :], want)


# ---------------------------------------------------------------------------- refusals, folder

def test_refuses_types_it_cannot_carry_exactly(tiny_checkpoint, tmp_path):
    """An IQ4_NL tensor (codes index a non-uniform table: no (q - z) * s form) is refused with its
    name and type; nothing is left behind."""
    iq4_nl = int(gguf.GGMLQuantizationType.IQ4_NL)
    write_gguf(tmp_path / "iq4.gguf", tiny_checkpoint("mha"), GGMLType.Q8_0,
               types={"blk.0.attn_output.weight": iq4_nl})
    with pytest.raises(PocketLMError, match=r"blk\.0\.attn_output\.weight.*IQ4_NL"):
        export_onnx(tmp_path / "iq4.gguf", tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iq4.gguf"]


def test_refuses_a_rotary_width_onnxruntime_cannot_run(tiny_checkpoint, tmp_path):
    """Partial RoPE on head_dim 16 rotates 12 values: onnxruntime's cos/sin caches must be a multiple
    of 8 wide (6 here), so the export refuses it up front, naming the file; nothing is written."""
    write_gguf(tmp_path / "partial.gguf", tiny_checkpoint("partial"), GGMLType.Q8_0)
    with pytest.raises(PocketLMError, match=r"partial\.gguf: the rotary dimension 12 is not a multiple of 16"):
        export_onnx(tmp_path / "partial.gguf", tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["partial.gguf"]


def test_refuses_q4_k_whose_float32_dequantization_rounds():
    """Q4_K with a tiny dmin next to a large d: d*sc*q - dmin*m needs more than 24 bits."""
    from pocketlm.export.onnx_weights import convert_linear

    block = np.zeros(144, np.uint8)
    block[0:2] = np.frombuffer(np.float16(1.0).tobytes(), np.uint8)
    block[2:4] = np.frombuffer(np.float16(2.0 ** -14 * 1.5).tobytes(), np.uint8)
    block[4:16] = 0x3F   # scales and mins 63
    block[16:] = 0x5A
    with pytest.raises(PocketLMError, match=r"'w'.*Q4_K.*round"):
        convert_linear(block.reshape(1, 144), GGMLType.Q4_K, (1, 256), "w")


def test_folder_is_replaced_atomically_and_foreign_folders_kept(tiny_export, tmp_path):
    gguf_path, _ = tiny_export("mha", "Q4_0")
    out = tmp_path / "out"
    export_onnx(gguf_path, out, progress=False)
    first = (out / "model.onnx.data").stat().st_ino
    export_onnx(gguf_path, out, accuracy_level=4, progress=False)  # replaces the earlier export
    assert (out / "model.onnx.data").stat().st_ino != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(PocketLMError, match=r"notes\.txt"):
        export_onnx(gguf_path, tmp_path / "mine", progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    nodes = onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node
    levels = {helper.get_attribute_value(a) for n in nodes for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {4}


def test_default_q4_0_graph_is_the_model_builders_computation(tiny_export, tmp_path):
    """What keeps a Q4_0 export at the model builder's speed (issue 14; README, ONNX section): every
    Q4_0 layer is the builder's MatMulNBits exactly (4 bits, block 32, float32 scales, inputs A, B,
    scales only: no zero points, g_idx or bias), at level 4; QKV is one node; GroupQueryAttention
    takes that packed output and rotates inside from cos/sin caches; no float Cast anywhere and the
    logits come straight from the output MatMulNBits."""
    gguf_path, _ = tiny_export("gqa", "Q4_0")
    export_onnx(gguf_path, tmp_path / "onnx", accuracy_level=4, progress=False)
    model = onnx.load(str(tmp_path / "onnx" / "model.onnx"), load_external_data=False)
    g = model.graph
    dtypes = {t.name: t.data_type for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    nbits = [n for n in g.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 4 * 2 + 1  # qkv, o, gate_up, down per layer + the output layer
    for n in nbits:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        assert (attrs["bits"], attrs["block_size"], attrs["accuracy_level"]) == (4, 32, 4), n.name
        assert len(n.input) == 3 and dtypes[n.input[2]] == TensorProto.FLOAT, n.name
    for gqa in (n for n in g.node if n.op_type == "GroupQueryAttention"):
        attrs = {a.name: helper.get_attribute_value(a) for a in gqa.attribute}
        assert attrs["do_rotary"] == 1 and list(gqa.input[1:3]) == ["", ""]
        assert producer[gqa.input[0]].name.endswith("attn/qkv_proj/MatMulNBits")
        assert [dtypes.get(i) for i in gqa.input[7:9]] == [TensorProto.FLOAT] * 2  # cos, sin caches
    casts = [n for n in g.node if n.op_type == "Cast"]
    assert all(next(a.i for a in n.attribute if a.name == "to") == TensorProto.INT32 for n in casts)
    assert producer["logits"].op_type == "MatMulNBits" and producer["logits"].name == "/lm_head/MatMulNBits"


def test_genai_config_and_describe(tiny_export):
    _, folder = tiny_export("gqa", "Q4_0")
    cfg = json.loads((folder / "genai_config.json").read_text())
    dec = cfg["model"]["decoder"]
    assert cfg["model"]["type"] == "phi3" and cfg["model"]["vocab_size"] == 300
    assert (dec["num_attention_heads"], dec["num_key_value_heads"], dec["head_size"]) == (4, 2, 16)
    assert dec["inputs"]["past_key_names"] == "past_key_values.%d.key"
    text = describe_onnx(folder)
    assert "MatMulNBits x9" in text and "accuracy_level 1" in text and "Q4_0" in text
    with pytest.raises(PocketLMError, match="not an ONNX export folder"):
        describe_onnx(folder.parent)


# ---------------------------------------------------------------------------- (b) genai vs llama.cpp

# llama.cpp in a child process (a crash there must not take pytest down), without the "extra"
# repacked weight buffers, which crash this llama-cpp-python build on small shapes (see test_generate).
@pytest.mark.parametrize(("kind", "qtype"), [("gqa", "Q4_0"), ("longrope", "Q8_0"), ("swa", "Q4_1")])
def test_genai_runs_the_folder_like_the_reference(tiny_export, kind, qtype):
    """onnxruntime-genai (its own KV-cache handling: past and present share one buffer) on tiny
    models, past the LongRoPE switch (64) and the sliding window (8)."""
    gguf_path, folder = tiny_export(kind, qtype)
    prompt = PROMPT * 5 if kind == "longrope" else PROMPT
    n = 40
    ours = reference_greedy(reference_from_gguf(gguf_path), prompt, n)
    theirs = genai_greedy(folder, prompt, n)
    assert theirs == ours[: len(theirs)] and (len(theirs) == n or theirs[-1] == 2)


@pytest.fixture(scope="session")
def builtin_export(tmp_path_factory):
    """The built-in trained model quantized Q4_0 (output Q6_K) by pocketlm, exported to ONNX."""
    from pocketlm.quantize.pipeline import quantize_checkpoint

    builtin = REPO / "pocketlm" / "builtin"
    out = tmp_path_factory.mktemp("builtin-onnx")
    gguf_path = out / "builtin-q4_0.gguf"
    quantize_checkpoint(builtin, gguf_path, recipe="q4_0", method="rtn")
    export_onnx(gguf_path, out / "onnx", accuracy_level=1, progress=False)
    return gguf_path, out / "onnx"


def test_genai_llama_cpp_and_reference_agree_on_builtin_model(builtin_export):
    gguf_path, folder = builtin_export
    tok = Tokenizer.from_hf_dir(folder)
    # A prompt without a near-tie in the first 40 greedy steps (llama.cpp's int8 activation rounding
    # flips near-ties: "ROMEO:..." flips at step 24 where the top two logits are 0.002 apart).
    prompt = tok.encode("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\n"
                        "Speak, speak.\n\nFirst Citizen:\n")
    n = 40
    ours = reference_greedy(reference_from_gguf(gguf_path), prompt, n)
    genai = genai_greedy(folder, prompt, n)  # stops early only at an end-of-text token
    assert len(genai) >= 32 and genai == ours[: len(genai)]
    llama, gaps = llama_cpp_greedy(gguf_path, prompt, n)
    same = next((i for i, (a, b) in enumerate(zip(llama, ours, strict=True)) if a != b), n)
    assert same >= 32, f"llama.cpp leaves the reference at token {same}: {llama} vs {ours}"
    assert same == n or gaps[same] < NEAR_TIE, f"divergence at {same} without a near-tie: {gaps[same]}"



def test_auto_accuracy_level_follows_the_int8_check(tiny_export, tmp_path):
    from pocketlm.export.onnx_accuracy import int8_activation_cost

    gguf_path, _ = tiny_export("gqa", "Q8_0")
    summary = export_onnx(gguf_path, tmp_path / "auto", progress=False)  # the default is auto
    assert summary.accuracy_level in (1, 4) and "auto" in summary.accuracy_reason
    nodes = onnx.load(str(tmp_path / "auto" / "model.onnx"), load_external_data=False).graph.node
    levels = {helper.get_attribute_value(a) for n in nodes for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {summary.accuracy_level}
    assert ("check passed" in summary.accuracy_reason) == (summary.accuracy_level == 4)
    # the measured cost of level 4 against level 1 decides; on this model it is small
    cost = int8_activation_cost(tmp_path / "auto", "model.onnx", PROMPT * 3)
    assert cost.tokens == 30 and cost.acceptable and 0 <= cost.kld < 1e-3 and cost.top1 >= 0.9
    assert sorted(p.name for p in (tmp_path / "auto").iterdir()) == sorted(
        ["model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json"])
