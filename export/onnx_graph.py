"""The blocks of a Phi-3-family decoder as ONNX nodes (onnx helpers + numpy); `onnx_decoder`
composes them from the model description.

Inputs and outputs are those onnxruntime-genai's phi3 decoder binds (names from genai_config.json):

    input_ids               int64 [batch, seq]
    attention_mask          int64 [batch, total_seq]        total_seq = past + seq
    past_key_values.N.key   float32 [batch, kv_heads, past_seq, head_dim]   (BNSH; .value alike)
    logits                  float32 [batch, seq, vocab]
    present.N.key           float32 [batch, kv_heads, total_seq, head_dim]  (.value alike)

One layer (h: the residual stream [batch, seq, hidden]; "norm" is RMSNorm = (Skip)Simplified-
LayerNormalization, or LayerNorm with bias = LayerNormalization / SkipLayerNormalization):

    x = norm(h) | x, h = SkipNorm(previous MLP out, h)
    qkv = MatMulNBits(x) (+ bias)            packed [q | k | v], the GGUF row order
    a, present = GroupQueryAttention | SparseAttention(qkv, past, ..., cos, sin)   rotary inside
    x, h = SkipNorm(MatMulNBits(a) (+ bias), h)
    gate, up = Split(MatMulNBits(x) (+ bias));  out = MatMulNBits(act(gate, up)) (+ bias)
    act: SwiGLU gate * Sigmoid(gate) * up | GeGELU QuickGelu(min(gate, L)) * (clip(up, -L, L) + 1)

The attention ops derive positions from the attention mask's row sums, so there is no
position_ids input. Weight tensors are written straight to the external data file one at a time
(`ExternalData`), so the ModelProto stays small whatever the model size.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper

from .onnx_weights import NBitsWeight, QuantizedEmbedding, split_to_4bit

MS = "com.microsoft"
OPSET = 21
IR_VERSION = 10
EXTERNAL_ALIGNMENT = 65536  # lets ONNX Runtime memory-map each big initializer (page/granule aligned)
INLINE_LIMIT = 4096          # smaller tensors are stored inside model.onnx

_NP_TO_ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
               np.dtype(np.uint8): TensorProto.UINT8, np.dtype(np.int64): TensorProto.INT64,
               np.dtype(np.int32): TensorProto.INT32, np.dtype(np.bool_): TensorProto.BOOL}


class ExternalData:
    """Appends initializer bytes to one data file; hands back TensorProtos that point into it."""

    def __init__(self, file: BinaryIO, location: str):
        self.file = file
        self.location = location  # file name relative to model.onnx
        self.size = 0

    def tensor(self, name: str, array: np.ndarray) -> TensorProto:
        array = np.ascontiguousarray(array)
        dtype = _NP_TO_ONNX[array.dtype]
        if array.nbytes < INLINE_LIMIT:
            return helper.make_tensor(name, dtype, array.shape, array.tobytes(), raw=True)
        offset = -(-self.size // EXTERNAL_ALIGNMENT) * EXTERNAL_ALIGNMENT
        if offset > self.size:
            self.file.write(bytes(offset - self.size))
        self.file.write(memoryview(array).cast("B"))
        self.size = offset + array.nbytes
        t = TensorProto(name=name, data_type=dtype, dims=array.shape,
                        data_location=TensorProto.EXTERNAL)
        for key, value in (("location", self.location), ("offset", str(offset)),
                           ("length", str(array.nbytes))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        return t


class GraphBuilder:
    """Collects nodes and initializers; `linear`, `norm`, ... add one block each and return names."""

    def __init__(self, data: ExternalData, accuracy_level: int):
        self.data = data
        self.accuracy_level = accuracy_level
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._constants: dict[tuple, str] = {}

    # ------------------------------------------------------------------ primitives

    def node(self, op: str, inputs: Sequence[str], outputs: Sequence[str] | int = 1, name: str = "",
             domain: str = "", **attrs) -> list[str]:
        """Add a node; `outputs` as names or a count (names derived from `name`)."""
        name = name or f"/{op}_{len(self.nodes)}"
        if isinstance(outputs, int):
            outputs = [f"{name}/output_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, list(inputs), list(outputs), name=name,
                                           domain=domain or None, **attrs))
        return list(outputs)

    def weight(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(self.data.tensor(name, array))
        return name

    def const(self, values, dtype=np.int64) -> str:
        """A small int/float constant initializer, shared by value."""
        arr = np.asarray(values, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._constants:
            self._constants[key] = self.weight(f"/constants/{arr.dtype.name}/{arr.tolist()}", arr)
        return self._constants[key]

    # ------------------------------------------------------------------ layers

    def linear(self, x: str, prefix: str, w: NBitsWeight | np.ndarray, bias: np.ndarray | None = None) -> str:
        """x [.., K] -> x @ W.T (+ bias) [.., N]; `w` is MatMulNBits initializers or a float W.T
        [K, N]; `bias` float32 [N] is MatMulNBits' own bias input where the layer is one
        MatMulNBits, else an Add after it (one float32 addition either way, as the reference)."""
        if isinstance(w, np.ndarray):
            wt = self.weight(f"{prefix}.weight_t", w)
            if w.dtype != np.float32:  # F16 stays F16 on disk, widened exactly at load time
                wt = self.node("Cast", [wt], name=f"{prefix}/Cast", to=TensorProto.FLOAT)[0]
            return self._add_bias(self.node("MatMul", [x, wt], name=f"{prefix}/MatMul")[0], prefix, bias)
        if w.bits == 8 and self.accuracy_level in (0, 1):  # no float32 8-bit kernel: see split_to_4bit
            low, high = split_to_4bit(w)
            parts = [self.matmul_nbits(x, prefix, low, "_lo"), self.matmul_nbits(x, prefix, high, "_hi")]
            y = self.node("Add", parts, name=f"{prefix}/Add")[0]
        elif w.mins is None:
            return self.matmul_nbits(x, prefix, w, bias=bias)
        else:
            y = self.matmul_nbits(x, prefix, w)
        if w.mins is None:
            return self._add_bias(y, prefix, bias)
        # Affine blocks: + sum over each block of x, times that block's minimum (exact weights, see
        # onnx_weights): [.., K] -> [.., K/bs, bs] -> [.., K/bs] @ mins.T [K/bs, N].
        kb = w.k // w.block_size
        p = f"{prefix}/mins"
        blocks = self.node("Reshape", [x, self.const([0, 0, kb, w.block_size])], name=f"{p}/Reshape")[0]
        sums = self.node("ReduceSum", [blocks, self.const([-1])], name=f"{p}/ReduceSum", keepdims=0)[0]
        mins_t = self.weight(f"{prefix}.weight_mins_t", np.ascontiguousarray(w.mins.T))
        corr = self.node("MatMul", [sums, mins_t], name=f"{prefix}/mins/MatMul")[0]
        y = self.node("Add", [y, corr], name=f"{prefix}/mins/Add")[0]
        return self._add_bias(y, prefix, bias)

    def _add_bias(self, y: str, prefix: str, bias: np.ndarray | None) -> str:
        if bias is None:
            return y
        return self.node("Add", [y, self.weight(f"{prefix}.bias", bias)], name=f"{prefix}/BiasAdd")[0]

    def matmul_nbits(self, x: str, prefix: str, w: NBitsWeight, tag: str = "",
                     bias: np.ndarray | None = None) -> str:
        """One MatMulNBits; inputs A, B, scales, zero_points, g_idx (unused), bias."""
        b = w.b.reshape(w.n, -1, w.block_size * w.bits // 8)
        inputs = [x, self.weight(f"{prefix}.weight_Q{w.bits}{tag}", b),
                  self.weight(f"{prefix}.weight_scales{tag}", w.scales)]
        if w.zero_points is not None or bias is not None:
            inputs.append("" if w.zero_points is None else self.weight(f"{prefix}.weight_zp{tag}", w.zero_points))
        if bias is not None:
            inputs += ["", self.weight(f"{prefix}.bias", bias)]
        return self.node("MatMulNBits", inputs, name=f"{prefix}/MatMulNBits{tag}", domain=MS, K=w.k, N=w.n,
                         bits=w.bits, block_size=w.block_size, accuracy_level=self.accuracy_level)[0]

    def embedding(self, ids: str, table: QuantizedEmbedding | np.ndarray) -> str:
        name = "/model/embed_tokens"
        if isinstance(table, QuantizedEmbedding):
            w = "model.embed_tokens.weight"
            inputs = [self.weight(f"{w}_Q", table.data), ids, self.weight(f"{w}_scales", table.scales)]
            if table.zero_points is not None:
                inputs.append(self.weight(f"{w}_zp", table.zero_points))
            out = self.node("GatherBlockQuantized", inputs, name=f"{name}/GatherBlockQuantized", domain=MS,
                            gather_axis=0, quantize_axis=1, block_size=table.block_size, bits=table.bits)[0]
            if table.mins is None:
                return out
            # + each row's block minimums: [B, S, D] -> [B, S, D/bs, bs] + [B, S, D/bs, 1] -> [B, S, D]
            kb = table.mins.shape[1]
            p = f"{name}/mins"
            mins = self.node("Gather", [self.weight(f"{w}_mins", table.mins), ids], name=f"{p}/Gather")[0]
            mins = self.node("Unsqueeze", [mins, self.const([-1])], name=f"{p}/Unsqueeze")[0]
            shape = self.const([0, 0, kb, table.block_size])
            blocks = self.node("Reshape", [out, shape], name=f"{p}/Reshape")[0]
            out = self.node("Add", [blocks, mins], name=f"{p}/Add")[0]
            return self.node("Reshape", [out, self.const([0, 0, kb * table.block_size])],
                             name=f"{p}/Reshape_back")[0]
        out = self.node("Gather", [self.weight("model.embed_tokens.weight", table), ids],
                        name=f"{name}/Gather")[0]
        if table.dtype != np.float32:
            out = self.node("Cast", [out], name=f"{name}/Cast", to=TensorProto.FLOAT)[0]
        return out

    def norm(self, x: str, gamma: np.ndarray, beta: np.ndarray | None, prefix: str, eps: float) -> str:
        """RMSNorm (beta None) or LayerNorm with bias over the last axis, float32 statistics."""
        if beta is None:
            return self.node("SimplifiedLayerNormalization", [x, self.weight(f"{prefix}.weight", gamma)],
                             name=f"{prefix}/SimplifiedLayerNorm", axis=-1, epsilon=eps, stash_type=1)[0]
        inputs = [x, self.weight(f"{prefix}.weight", gamma), self.weight(f"{prefix}.bias", beta)]
        return self.node("LayerNormalization", inputs, name=f"{prefix}/LayerNorm", axis=-1, epsilon=eps,
                         stash_type=1)[0]

    def skip_norm(self, x: str, skip: str, gamma: np.ndarray, beta: np.ndarray | None, prefix: str,
                  eps: float) -> tuple[str, str]:
        """-> (norm(x + skip), x + skip): RMSNorm (beta None) or LayerNorm with bias."""
        op = "SkipSimplifiedLayerNormalization" if beta is None else "SkipLayerNormalization"
        name = f"{prefix}/{op.replace('Normalization', 'Norm')}"
        inputs = [x, skip, self.weight(f"{prefix}.weight", gamma)]
        if beta is not None:
            inputs.append(self.weight(f"{prefix}.bias", beta))
        out, _, _, total = self.node(op, inputs, [f"{name}/output_0", "", "", f"{name}/output_3"],
                                     name=name, domain=MS, epsilon=eps)
        return out, total

    def swiglu(self, gate_up: str, ffn: int, prefix: str) -> str:
        """[.., 2F] (rows [gate | up]) -> silu(gate) * up [.., F]."""
        gate, up = self.node("Split", [gate_up, self.const([ffn, ffn])], 2, name=f"{prefix}/Split", axis=-1)
        sig = self.node("Sigmoid", [gate], name=f"{prefix}/Sigmoid")[0]
        silu = self.node("Mul", [gate, sig], name=f"{prefix}/SiLU")[0]
        return self.node("Mul", [silu, up], name=f"{prefix}/Mul")[0]

    def gegelu(self, gate_up: str, ffn: int, limit: float, prefix: str) -> str:
        """[.., 2F] (rows [gelu input g | linear input l], pocketlm's layout) -> [.., F]:
        min(g, L) * sigmoid(1.702 min(g, L)) * (clip(l, -L, L) + 1), infinities passing the clamps
        unchanged (as Hugging Face's `gegelu` and pocketlm.layers.gated_activation)."""
        gate, up = self.node("Split", [gate_up, self.const([ffn, ffn])], 2, name=f"{prefix}/Split", axis=-1)
        lim = float(np.float32(limit))

        def clamp(x: str, low: float | None, tag: str) -> str:
            inputs = [x, "" if low is None else self.const(low, np.float32), self.const(lim, np.float32)]
            clipped = self.node("Clip", inputs, name=f"{prefix}/{tag}/Clip")[0]
            inf = self.node("IsInf", [x], name=f"{prefix}/{tag}/IsInf")[0]
            return self.node("Where", [inf, x, clipped], name=f"{prefix}/{tag}/Where")[0]

        g = clamp(gate, None, "gelu")
        act = self.node("QuickGelu", [g], name=f"{prefix}/gelu/QuickGelu", domain=MS, alpha=1.702)[0]
        lin = self.node("Add", [clamp(up, -lim, "linear"), self.const(1.0, np.float32)],
                        name=f"{prefix}/linear/Add")[0]
        return self.node("Mul", [act, lin], name=f"{prefix}/Mul")[0]

    # ------------------------------------------------------------------ the model proto

    def model(self, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
              doc: str, metadata: dict[str, str]) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "pocketlm_phi3", inputs, outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                        helper.make_opsetid(MS, 1)],
                                  ir_version=IR_VERSION, producer_name="pocketlm", doc_string=doc)
        for k, v in metadata.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = k, v
        return model


def tensor_info(name: str, elem_type: int, shape: Sequence[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, list(shape))


def write_model(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Serialize the (small, data-free) ModelProto; initializer bytes are already in the data file."""
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
