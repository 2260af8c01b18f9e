"""Oracles shared by the ONNX export tests (tests/test_onnx_export.py, tests/test_onnx_phi3small.py):
gguf-py's dequantization of a GGUF, our reference forward on it, MatMulNBits' weight by the
operator's definition (ContribOperators.md) and onnxruntime's own dequantization read back by a
one-node probe."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pocketlm.config import Phi3Config
from pocketlm.export.gguf_reader import GGUFReader
from pocketlm.reference import Phi3Reference


def gguf_py_weights(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of the file dequantized by gguf-py (an independent reader), flat float32."""
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            for t in gguf.GGUFReader(path).tensors}


def reference_from_gguf(path: Path) -> Phi3Reference:
    """Our reference on gguf-py's dequantization of every tensor (an independent reader)."""
    weights = {}
    for t in gguf.GGUFReader(path).tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        weights[t.name] = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
    factors = {n: w for n, w in weights.items() if n.startswith("rope_factors_")}
    with GGUFReader(path) as r:
        cfg = Phi3Config.from_gguf_metadata(r.metadata, factors, source=str(path))
    return Phi3Reference(cfg, weights)


def session_for(model_path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])


def spec_dequantize(b: np.ndarray, scales: np.ndarray, zp: np.ndarray | None, bits: int, block: int,
                    k: int) -> np.ndarray:
    """MatMulNBits' weight [N, K] by ContribOperators.md, written independently of the exporter."""
    n = b.shape[0]
    flat = b.reshape(n, -1)
    if bits == 4:
        codes = np.empty((n, flat.shape[1] * 2), np.int64)
        codes[:, 0::2], codes[:, 1::2] = flat & 0xF, flat >> 4
    else:
        codes = flat.astype(np.int64)
    kb = scales.shape[1]
    if zp is None:
        z = np.full((n, kb), 2 ** (bits - 1))
    elif bits == 4:
        z = np.empty((n, zp.shape[1] * 2), np.int64)
        z[:, 0::2], z[:, 1::2] = zp & 0xF, zp >> 4
        z = z[:, :kb]
    else:
        z = zp.astype(np.int64)
    w = (codes.reshape(n, kb, block) - z[..., None]) * scales[..., None].astype(np.float64)
    return w.reshape(n, -1)[:, :k]


def nbits_layers(folder: Path, lm_head: str = "output.weight") -> dict[str, list]:
    """GGUF tensor name -> [(MatMulNBits node, its attributes)] (two nodes where an 8-bit weight is
    split in 4-bit halves), plus the initializers under the key "". `lm_head`: the GGUF tensor the
    output layer holds (token_embd.weight for a tied model without output.weight)."""
    model = onnx.load(str(folder / "model.onnx"), load_external_data=True)
    layers: dict[str, list] = {"": {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            layers.setdefault(_gguf_name(node.name.rsplit("/", 1)[0], lm_head), []).append((node, attrs))
    return layers


def _gguf_name(prefix: str, lm_head: str) -> str:
    if prefix == "/lm_head":
        return lm_head
    layer, part = prefix.split("/")[2].split(".")[1], "/".join(prefix.split("/")[3:])
    gguf_part = {"attn/qkv_proj": "attn_qkv", "attn/o_proj": "attn_output", "mlp/gate_up_proj": "ffn_up",
                 "mlp/down_proj": "ffn_down"}[part]
    return f"blk.{layer}.{gguf_part}.weight"


def nbits_weight(nodes: list, inits: dict[str, np.ndarray]) -> np.ndarray:
    """The weight [N, K] (float64) one layer's MatMulNBits node(s) hold, by the operator's
    definition, plus the block minimums the exporter adds for affine types."""
    parts = []
    for node, attrs in nodes:
        b, scales = inits[node.input[1]], inits[node.input[2]]
        zp = inits[node.input[3]] if len(node.input) > 3 and node.input[3] else None
        parts.append(spec_dequantize(b, scales, zp, attrs["bits"], attrs["block_size"], attrs["K"]))
    w = parts[0] if len(parts) == 1 else parts[0] + parts[1]
    prefix = nodes[0][0].name.rsplit("/", 1)[0]
    if f"{prefix}.weight_mins_t" in inits:  # affine types: + block minimum
        mins = inits[f"{prefix}.weight_mins_t"].T
        w = w + np.repeat(mins, nodes[0][1]["block_size"], axis=1)
    return w


def onnxruntime_weight_t(nodes: list, inits: dict[str, np.ndarray]) -> np.ndarray:
    """W.T [K, N] as onnxruntime itself dequantizes it: MatMulNBits(A = identity) without bias
    (one product with 1.0 per output, exact), summed over a split layer's halves, plus the block
    minimums of affine types (the graph adds blocksum(A) @ mins.T, which for A = identity is each
    block's minimum; the exporter checks that this sum is exact)."""
    import onnxruntime as ort

    wt = 0.0
    for node, attrs in nodes:
        k, n = attrs["K"], attrs["N"]
        used = [i for i in node.input[1:4] if i]  # B, scales, zero points: not the bias
        zp = [] if len(node.input) <= 3 or not node.input[3] else [node.input[3]]
        inputs = ["A", node.input[1], node.input[2], *zp]
        probe = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=k, N=n,
                                 bits=attrs["bits"], block_size=attrs["block_size"], accuracy_level=1)
        graph = helper.make_graph([probe], "probe",
                                  [helper.make_tensor_value_info("A", TensorProto.FLOAT, [k, k])],
                                  [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [k, n])],
                                  [numpy_helper.from_array(inits[i], i) for i in used])
        opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
        model = helper.make_model(graph, opset_imports=opsets, ir_version=10)
        s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        wt = wt + s.run(None, {"A": np.eye(k, dtype=np.float32)})[0]
    prefix = nodes[0][0].name.rsplit("/", 1)[0]
    if f"{prefix}.weight_mins_t" in inits:
        wt = wt + np.repeat(inits[f"{prefix}.weight_mins_t"], nodes[0][1]["block_size"], axis=0)
    return wt


def genai_greedy(folder: Path, prompt: list[int], n: int) -> list[int]:
    """onnxruntime-genai's greedy tokens after `prompt` (at most n; it stops at an end token)."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + n, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([prompt], np.int32))
    out = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out


def reference_greedy(ref: Phi3Reference, prompt: list[int], n: int) -> list[int]:
    """The reference's n greedy tokens after `prompt`, through its cache."""
    cache, feed, out = ref.new_cache(), list(prompt), []
    for _ in range(n):
        tok = int(np.argmax(ref.forward(feed, cache)[-1]))
        out.append(tok)
        feed = [tok]
    return out
