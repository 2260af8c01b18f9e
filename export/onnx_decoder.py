"""The decoder graph, composed from the model description (`pocketlm.config.Phi3Config`).

One builder serves Phi3ForCausalLM and Phi3SmallForCausalLM; every difference is read from the
config, never from the architecture's name:

  norm "rms" | "layer"           (Skip)SimplifiedLayerNormalization | LayerNormalization /
                                 SkipLayerNormalization with bias
  linear_bias                    MatMulNBits' bias input (or an Add), float32 as in the GGUF
  activation "swiglu" | "gegelu" SwiGLU | GeGELU with gegelu_limit (onnx_graph.GraphBuilder)
  layer_sparsity(i)              None: GroupQueryAttention (local_window_size = sliding_window);
                                 a BlockSparse: com.microsoft.SparseAttention with its CSR layouts
  attention_scale                the `scale` attribute of both attention ops
  embedding_multiplier           Mul after the embedding
  logit_scale, masked_token_ids  Mul after the output matmul; Where(mask, float32 lowest, logits)
                                 (pocketlm.reference.MASKED_LOGIT)
  tie_word_embeddings            the output matmul reads token_embd.weight when the GGUF has no
                                 output.weight (its own integer codes, converted a second time)

Gate and up stay one MatMulNBits over the GGUF's packed [gate | up] rows plus a Split (the model
builder writes two nodes and no Split): the Split's copy is measurable alone (+0.1 ms per decode
step, +8 ms per 128-token prompt against the builder's activation nodes; 8 layers, 1 thread), but an
export with the builder's two nodes measured 1.00x of this one in decode and prefill
(benchmarks/onnx_profile.py, both load orders): one wider matmul gains back what the copy costs.

Rotary: both attention ops rotate q and k inside (do_rotary=1, rotary_interleaved=0: NeoX halves,
as pocketlm.layers.apply_rope) from cos/sin caches [positions, rope_dim/2] computed by
pocketlm.layers.rope_cos_sin; LongRoPE switches between two cache pairs with an If (see
onnx_export's docstring).

SparseAttention's CPU kernel (onnxruntime 1.32, contrib_ops/cpu/sparse/sparse_attention.cc) only
works when past_key/present_key (and the values) are ONE buffer of max_cache positions
("past_key->DataRaw() == present_key->DataRaw()" is enforced): a plain `session.run` with a
zero-length past fails; io_binding one OrtValue as both past and present works (onnx_runner), and
so does onnxruntime-genai with `past_present_share_buffer` (genai_config.json), which binds its
own [batch, kv_heads, max_length, head_dim] buffers that way.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np
from onnx import TensorProto, helper

from pocketlm.blocksparse import BlockSparse, csr_layouts
from pocketlm.config import Phi3Config
from pocketlm.errors import PocketLMError
from pocketlm.layers import rope_cos_sin
from pocketlm.reference import MASKED_LOGIT

from .onnx_graph import MS, GraphBuilder, tensor_info

if TYPE_CHECKING:
    from .onnx_export import _Source


def check_exportable(cfg: Phi3Config, source: str) -> None:
    """Refuse what onnxruntime's attention ops cannot run, before anything is written: with rotary
    inside, GroupQueryAttention and SparseAttention need head_dim a multiple of 16 and cos/sin caches
    whose width (rotary dimension / 2; partial RoPE rotates fewer values) is a multiple of 8 (their
    CPU kernels fail at run time otherwise: "head_size shall be a multiple of 16", "cos_cache
    dimension 1 must be <= head_size / 2 and a multiple of 8")."""
    why = None
    if cfg.head_dim % 16:
        why = f"head_dim {cfg.head_dim} is not a multiple of 16"
    elif cfg.rope_dim % 16:
        why = f"the rotary dimension {cfg.rope_dim} is not a multiple of 16"
    if why:
        raise PocketLMError(f"{why}, which onnxruntime's GroupQueryAttention / SparseAttention need "
                            f"with rotary embeddings; this model cannot be exported to ONNX", source)


def rope_caches(g: GraphBuilder, cfg: Phi3Config, total_len_i64: str) -> tuple[str, str]:
    """cos/sin caches [positions, rope_dim/2] for the attention ops (LongRoPE: an If picks the
    long-factor pair once the total sequence passes the original context). With partial RoPE the
    ops rotate the first rope_dim values of each head (NeoX halves within them) and pass the rest,
    as pocketlm.layers.apply_rope."""

    def caches(tag: str, length: int, long: bool) -> tuple[str, str]:
        cos, sin = rope_cos_sin(cfg, np.arange(length), long)
        return g.weight(f"cos_cache{tag}", cos), g.weight(f"sin_cache{tag}", sin)

    if cfg.rope_scaling is None:
        return caches("", cfg.max_position_embeddings, False)
    orig = cfg.original_max_position_embeddings
    branches = {}
    for tag, length, long in (("_large", cfg.max_position_embeddings, True), ("_small", orig, False)):
        cos, sin = caches(tag, length, long)
        outs = [f"/model/rope{tag}/cos", f"/model/rope{tag}/sin"]
        nodes = [helper.make_node("Identity", [cos], [outs[0]], name=f"/model/rope{tag}/cos/Identity"),
                 helper.make_node("Identity", [sin], [outs[1]], name=f"/model/rope{tag}/sin/Identity")]
        shape = [length, cfg.rope_dim // 2]  # partial RoPE: the ops rotate 2 * width values
        branches[tag] = helper.make_graph(nodes, f"rope{tag}", [],
                                          [tensor_info(o, TensorProto.FLOAT, shape) for o in outs])
    is_long = g.node("Greater", [total_len_i64, g.const(orig)], name="/model/rope_caches/Greater")[0]
    cos, sin = g.node("If", [is_long], ["cos_cache", "sin_cache"], name="/model/rope_caches/If",
                      then_branch=branches["_large"], else_branch=branches["_small"])
    return cos, sin


class AttentionLengths:
    """attention_mask [B, T] -> the lengths both attention ops read:
    seqlens_k int32 [B] (row sums - 1, GroupQueryAttention), key_total int32 [B] (row sums,
    SparseAttention), total32 int32 scalar (T), total64 int64 scalar (T, for the LongRoPE switch)."""

    def __init__(self, g: GraphBuilder):
        p = "/model/attn_mask_reformat"
        rows = g.node("ReduceSum", ["attention_mask", g.const([1])], name=f"{p}/ReduceSum", keepdims=0)[0]
        last = g.node("Sub", [rows, g.const(1)], name=f"{p}/Sub")[0]
        self.seqlens_k = g.node("Cast", [last], name=f"{p}/Sub/Cast", to=TensorProto.INT32)[0]
        self._rows, self._g = rows, g
        self._key_total: str | None = None
        shape = g.node("Shape", ["attention_mask"], name=f"{p}/Shape")[0]
        self.total64 = g.node("Gather", [shape, g.const(1)], name=f"{p}/Gather", axis=0)[0]
        self.total32 = g.node("Cast", [self.total64], name=f"{p}/Gather/Cast", to=TensorProto.INT32)[0]

    @property
    def key_total(self) -> str:
        if self._key_total is None:  # only a block-sparse model needs it
            self._key_total = self._g.node("Cast", [self._rows], name="/model/attn_mask_reformat/ReduceSum/Cast",
                                           to=TensorProto.INT32)[0]
        return self._key_total


class _Layouts:
    """SparseAttention's CSR inputs, one initializer pair per distinct block pattern, covering the
    whole context (the kernel requires max_blocks * block_size >= the total sequence)."""

    def __init__(self, g: GraphBuilder, cfg: Phi3Config):
        self.g, self.cfg = g, cfg
        self.made: dict[BlockSparse, tuple[str, str]] = {}

    def __call__(self, bs: BlockSparse) -> tuple[str, str]:
        if bs not in self.made:
            n_blocks = -(-self.cfg.max_position_embeddings // bs.block_size)
            rows, cols = csr_layouts(bs, self.cfg.num_attention_heads, n_blocks)
            tag = "" if not self.made else f"_{len(self.made)}"
            self.made[bs] = (self.g.weight(f"block_row_indices{tag}", rows),
                             self.g.weight(f"block_col_indices{tag}", cols))
        return self.made[bs]


def attention(g: GraphBuilder, cfg: Phi3Config, i: int, qkv: str, lengths: AttentionLengths, cos: str,
              sin: str, layouts: _Layouts) -> str:
    """Layer i's attention over packed qkv [B, S, (H + 2 KV) hd] -> [B, S, H hd]; writes
    present.i.key/value from past_key_values.i.key/value ([B, KV, cache, hd])."""
    b = f"/model/layers.{i}/attn"
    past = [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
    sparse = cfg.layer_sparsity(i)
    common = dict(domain=MS, num_heads=cfg.num_attention_heads, kv_num_heads=cfg.num_key_value_heads,
                  do_rotary=1, rotary_interleaved=0, scale=float(cfg.attention_scale))
    if sparse is None:
        window = -1 if cfg.sliding_window is None else cfg.sliding_window
        op, inputs, extra = "GroupQueryAttention", [qkv, "", "", *past, lengths.seqlens_k, lengths.total32,
                                                    cos, sin], {"local_window_size": window}
    else:
        rows, cols = layouts(sparse)
        op, inputs, extra = "SparseAttention", [qkv, "", "", *past, rows, cols, lengths.total32,
                                                lengths.key_total, cos, sin], {
                                                    "sparse_block_size": sparse.block_size}
    out, _, _ = g.node(op, inputs, [f"{b}/{op}/output_0", f"present.{i}.key", f"present.{i}.value"],
                       name=f"{b}/{op}", **common, **extra)
    return out


def build_decoder(g: GraphBuilder, src: _Source, progress: bool) -> Counter:
    """Add every node of the decoder to `g`; -> GGUF type name -> tensors used."""
    cfg = src.cfg
    eps = float(cfg.rms_norm_eps)
    used: Counter = Counter()

    def take(name: str) -> str:
        used[src.info(name).type_name] += 1
        return name

    def bias(name: str) -> np.ndarray | None:
        return src.floats(take(name)) if cfg.linear_bias else None

    def norm_weights(name: str) -> tuple[np.ndarray, np.ndarray | None]:
        beta = src.floats(take(f"{name}.bias")) if cfg.norm == "layer" else None
        return src.floats(take(f"{name}.weight")), beta

    def linear(x: str, prefix: str, name: str) -> str:
        return g.linear(x, prefix, src.linear(take(f"{name}.weight")), bias(f"{name}.bias"))

    h = g.embedding("input_ids", src.embedding(take("token_embd.weight")))
    if cfg.embedding_multiplier != 1.0:
        h = g.node("Mul", [h, g.const(np.float32(cfg.embedding_multiplier), np.float32)],
                   name="/model/embed_tokens/Mul")[0]
    lengths = AttentionLengths(g)
    cos, sin = rope_caches(g, cfg, lengths.total64)
    layouts = _Layouts(g, cfg)
    mlp_out = None
    for i in range(cfg.num_hidden_layers):
        t0 = time.time()
        p, b = f"blk.{i}.", f"/model/layers.{i}"
        gamma, beta = norm_weights(p + "attn_norm")
        if mlp_out is None:
            x = g.norm(h, gamma, beta, f"{b}/input_layernorm", eps)
        else:
            x, h = g.skip_norm(mlp_out, h, gamma, beta, f"{b}/input_layernorm", eps)
        qkv = linear(x, f"{b}/attn/qkv_proj", p + "attn_qkv")
        attn = attention(g, cfg, i, qkv, lengths, cos, sin, layouts)
        o = linear(attn, f"{b}/attn/o_proj", p + "attn_output")
        gamma, beta = norm_weights(p + "ffn_norm")
        x, h = g.skip_norm(o, h, gamma, beta, f"{b}/post_attention_layernorm", eps)
        gate_up = linear(x, f"{b}/mlp/gate_up_proj", p + "ffn_up")
        if cfg.activation == "gegelu":
            act = g.gegelu(gate_up, cfg.intermediate_size, cfg.gegelu_limit, f"{b}/mlp")
        else:
            act = g.swiglu(gate_up, cfg.intermediate_size, f"{b}/mlp")
        mlp_out = linear(act, f"{b}/mlp/down_proj", p + "ffn_down")
        if progress:
            print(f"  layer {i + 1}/{cfg.num_hidden_layers} ({time.time() - t0:.1f} s)", file=sys.stderr)
    gamma, beta = norm_weights("output_norm")
    x, _ = g.skip_norm(mlp_out, h, gamma, beta, "/model/norm", eps)
    head = "output.weight" if "output.weight" in src.reader.tensors else "token_embd.weight"
    logits = g.linear(x, "/lm_head", src.linear(take(head)))
    if head == "token_embd.weight":
        used[src.info(head).type_name] -= 1  # counted once as the embedding already
    if cfg.logit_scale != 1.0:  # the reference multiplies by float32(logit_scale)
        logits = g.node("Mul", [logits, g.const(np.float32(cfg.logit_scale), np.float32)],
                        name="/lm_head/Mul")[0]
    if cfg.masked_token_ids:
        mask = np.zeros(cfg.vocab_size, np.bool_)
        mask[list(cfg.masked_token_ids)] = True
        logits = g.node("Where", [g.weight("lm_head.masked_token_ids", mask),
                                  g.const(MASKED_LOGIT, np.float32), logits], name="/lm_head/mask/Where")[0]
    g.nodes[-1].output[0] = "logits"
    return used


def decoder_io(cfg: Phi3Config) -> tuple[list, list]:
    """Graph inputs and outputs (names as onnxruntime-genai binds them, see genai_config)."""
    kv, hd = cfg.num_key_value_heads, cfg.head_dim
    inputs = [tensor_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              tensor_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"])]
    outputs = [tensor_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", cfg.vocab_size])]
    for i in range(cfg.num_hidden_layers):
        for kind in ("key", "value"):
            inputs.append(tensor_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT,
                                      ["batch_size", kv, "past_sequence_length", hd]))
            outputs.append(tensor_info(f"present.{i}.{kind}", TensorProto.FLOAT,
                                       ["batch_size", kv, "total_sequence_length", hd]))
    return inputs, outputs


def needs_shared_kv_buffer(cfg: Phi3Config) -> bool:
    """True when some layer is SparseAttention: then past and present must be one buffer."""
    return any(cfg.layer_sparsity(i) is not None for i in range(cfg.num_hidden_layers))
