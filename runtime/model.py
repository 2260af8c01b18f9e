"""The runtime's Phi-3 model loop: numpy for everything but the matmuls, which run in the C kernel
straight from the memory-mapped GGUF blocks (zero copy: the kernel reads the file's pages).

    model = load("phi3-q4_0.gguf", threads=2, ctx=2048, kv="f16")
    for piece in model.generate("The meaning of life is", max_tokens=64):
        print(piece, end="")
    print(model.stats)

One forward step (h [T, D]; T = 1 while decoding, a chunk of the prompt while prefilling):
    per layer:  h += o_proj(attention(rope(qkv(rms_norm(h)))))     4 kernel calls per layer:
                h += down(silu(gate) * up)                          qkv, o, gate_up, down (fused)
    logits = output(rms_norm(h))
Decoding (T = 1) with quantized linears runs every layer in one kernel call (`_kernel.decode_step`,
runtime/kernel/decode.c: norms, RoPE, cache write, attention over the fp16/fp32/int8 cache converted
in registers, SwiGLU, residuals), so no Python runs between the matvecs; `_layers_numpy` is the same
loop in numpy + kernel calls, used for dense weights and as the tests' reference.
Prefill runs the kernel's batched matmul and its row-wise RMSNorm, RoPE and SwiGLU on the thread pool;
the prompt's attention and the cache writes stay in numpy.

Policies (documented here, tested in tests/test_runtime.py):
  * LongRoPE: `longrope="context"` (the default, llama.cpp's rule): long factors for every position
    when the context size n_ctx exceeds the original context, short factors otherwise; the KV cache
    never needs recomputing. `longrope="sequence"` is Hugging Face's rule: each forward call picks
    long factors once the sequence (cache + new tokens) passes the original context (keys already
    cached keep their short-factor rotation, as transformers does).
  * Context: the KV cache is preallocated to n_ctx positions. A prompt that does not fit raises
    PocketLMError; generation that reaches n_ctx stops with finish reason "context" (no sliding).
  * Sliding window: a query at position p attends to keys p - window < j <= p.
  * Weights the kernel lacks: F32/F16/BF16 linear layers run in numpy (slow, for tiny test
    models); any other type the kernel does not implement (Q5_K, IQ*, ...) is refused at load.
  * Corrupt blocks (a NaN/inf scale): `validate=True` scans every block at load. The default
    (`validate="lazy"`) keeps loading fast (the scan reads every page of the file): a corrupt scale
    turns the activations or logits non-finite, which the loop checks at every step; it then scans
    the file and raises PocketLMError naming the tensor and block, so no text is ever produced from
    a corrupt block either way.
  * Q4_0 repacking (`repack="auto"`, the default): where the kernel has a faster layout for Q4_0
    on this CPU (`kernel.should_repack`), the matrices are repacked once per model file into a
    cache file that later loads map read-only (see packed_cache.py); the original file's pages of
    those matrices are then never read, so memory stays at about the file size. `repack=False`
    runs every matrix zero-copy from the model file itself.
  * Block sparsity: rows sampled from each matrix (1 in 64) are checked for empty blocks (all
    scales zero); a matrix where they make up at least 10 % gets the kernel's per-row index of
    non-empty blocks, built once, and its matvecs skip the empty blocks (`sparse=True` checks every
    matrix in full, `sparse=False` never builds an index).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import Phi3Config, tensor_specs
from ..errors import PocketLMError
from ..export.gguf_format import bf16_to_float32, type_name
from ..export.gguf_reader import GGUFReader
from ..quantize.formats import GGMLType, dequantize
from ..reference import rope_cos_sin
from . import _kernel
from . import kernel as kern
from .kv_cache import KV_TYPES, KVCache
from .packed_cache import packed_matrices

DENSE_TYPES = {int(GGMLType.F32), int(GGMLType.F16), int(GGMLType.BF16)}
KERNEL_TYPES = {int(GGMLType.Q4_0), int(GGMLType.Q4_1), int(GGMLType.Q8_0), int(GGMLType.Q4_K),
                int(GGMLType.Q6_K)}
DEFAULT_BATCH = 256      # prompt tokens per prefill chunk (bounds prefill temporaries)
ATTN_QUERY_CHUNK = 64    # query rows per attention block while prefilling (bounds the score matrix)
SPARSE_MAX_DENSITY = 0.9  # keep a block-sparse index only when it skips at least 10 % of blocks
SPARSE_SAMPLE_STRIDE = 64  # sparse="auto": rows sampled per matrix to decide whether to index it
LONGROPE_POLICIES = ("context", "sequence")


@dataclass
class Stats:
    """Timings of the last generation (seconds) and the load."""

    load_seconds: float = 0.0
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    decode_kernel_seconds: float = 0.0  # time inside kernel calls while decoding
    first_token_seconds: float = 0.0    # from the start of the prompt to the first sampled token

    @property
    def prefill_tps(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def python_overhead(self) -> float:
        """Fraction of decode time spent outside the kernel (numpy attention, norms, sampling...)."""
        if not self.decode_seconds:
            return 0.0
        return 1.0 - self.decode_kernel_seconds / self.decode_seconds

    def __str__(self) -> str:
        return (f"prefill {self.prefill_tokens} tokens at {self.prefill_tps:.1f} tok/s, "
                f"decode {self.decode_tokens} tokens at {self.decode_tps:.1f} tok/s")


class Linear:
    """One [rows, K] weight: raw GGUF blocks for the kernel, or a float array for numpy."""

    def __init__(self, name: str, raw: np.ndarray, gtype: int, rows: int, K: int,
                 dense: np.ndarray | None = None, index: Any = None):
        self.name, self.raw, self.gtype, self.rows, self.K = name, raw, gtype, rows, K
        self.dense = dense      # [rows, K] view (F32/F16/BF16 files only)
        self.index = index      # kernel sparse-index handle or None

    def vec(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """out[rows] = W x (x [K] float32 contiguous)."""
        if self.dense is not None:
            np.dot(self.dense, x, out=out)
            return out
        _kernel.matvec(self.raw, self.gtype, self.rows, self.K, x, out, self.index)
        return out

    def mat(self, X: np.ndarray) -> np.ndarray:
        """X [M, K] -> [M, rows]."""
        if self.dense is not None:
            return X @ self.dense.T
        out = np.empty((X.shape[0], self.rows), dtype=np.float32)
        if X.shape[0] == 1:  # the batched path gains nothing for one row
            _kernel.matvec(self.raw, self.gtype, self.rows, self.K, X[0], out[0], self.index)
        else:
            _kernel.matmul(self.raw, self.gtype, self.rows, self.K, X, X.shape[0], out)
        return out


@dataclass
class Layer:
    attn_norm: np.ndarray  # [D] float32
    qkv: Linear            # [(H + 2 KV) hd, D]
    o: Linear              # [D, H hd]
    ffn_norm: np.ndarray
    gate_up: Linear        # [2F, D]: rows [gate | up]
    down: Linear           # [D, F]


@dataclass
class _DecodeBuffers:
    """Preallocated per-token arrays: decoding allocates nothing proportional to the weights."""

    h: np.ndarray
    x: np.ndarray
    qkv: np.ndarray
    attn: np.ndarray
    proj: np.ndarray
    gate_up: np.ndarray
    act: np.ndarray
    logits: np.ndarray


class Model:
    """A loaded GGUF model with its KV cache. Not thread-safe (one generation at a time)."""

    def __init__(self, path: str, reader: GGUFReader, cfg: Phi3Config, n_ctx: int, kv: str,
                 longrope: str, batch: int, validate: bool | str, sparse: bool | str,
                 repack: bool | str = "auto"):
        self.path, self.reader, self.cfg = path, reader, cfg
        self.n_ctx, self.batch = n_ctx, batch
        self.stats = Stats()
        self.tokens: list[int] = []  # the token ids whose keys/values the cache holds, in order
        self.last_prefill_tokens = 0  # tokens the last prefill() evaluated (the rest came from the cache)
        self._kernel_seconds = 0.0
        self._repack = repack
        self._plan: tuple[np.ndarray, Any] | None = None  # (the cache's k array, decode_step plan)
        self._load_weights(validate is True, sparse)
        self.cache = KVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, n_ctx, cfg.head_dim, kv)
        self._init_rope(longrope)
        d, f = cfg.hidden_size, cfg.intermediate_size
        qd = cfg.num_attention_heads * cfg.head_dim
        z = np.zeros
        self._buf = _DecodeBuffers(h=z(d, np.float32), x=z(d, np.float32), qkv=z(cfg.qkv_size, np.float32),
                                   attn=z(qd, np.float32), proj=z(d, np.float32),
                                   gate_up=z(2 * f, np.float32), act=z(f, np.float32),
                                   logits=z(cfg.vocab_size, np.float32))
        self.tokenizer = _load_tokenizer(reader, path)

    # ------------------------------------------------------------------ loading

    def _load_weights(self, validate: bool, sparse: bool | str) -> None:
        cfg, r = self.cfg, self.reader
        expected = {s.name: s for s in tensor_specs(cfg)}
        for name, spec in expected.items():
            if name == "output.weight":
                continue
            if name not in r.tensors:
                raise PocketLMError(f"GGUF file lacks tensor {name!r}", self.path)
            if tuple(r.tensors[name].shape) != spec.shape:
                raise PocketLMError(f"tensor {name!r} has shape {r.tensors[name].shape}, the config "
                                    f"implies {spec.shape}", self.path)

        def norm(name: str) -> np.ndarray:
            w = r.dequantize(name).astype(np.float32)
            if not np.isfinite(w).all():
                raise PocketLMError(f"tensor {name!r} holds NaN or infinite values", self.path)
            return w

        def linear(name: str) -> Linear:
            return self._linear(name, validate, sparse)

        self._packed = {}
        if self._repack:
            names = [f"blk.{i}.{t}.weight" for i in range(cfg.num_hidden_layers)
                     for t in ("attn_qkv", "attn_output", "ffn_up", "ffn_down")] + ["output.weight"]
            infos = [r.tensors[n] for n in names if n in r.tensors]
            mats = [(t.name, r.raw(t.name), *t.shape) for t in infos
                    if kern.should_repack(int(t.type_id), t.shape[1])]
            self._packed = packed_matrices(self.path, mats)

        self.layers = [
            Layer(norm(f"blk.{i}.attn_norm.weight"), linear(f"blk.{i}.attn_qkv.weight"),
                  linear(f"blk.{i}.attn_output.weight"), norm(f"blk.{i}.ffn_norm.weight"),
                  linear(f"blk.{i}.ffn_up.weight"), linear(f"blk.{i}.ffn_down.weight"))
            for i in range(cfg.num_hidden_layers)]
        self.output_norm = norm("output_norm.weight")
        # llama.cpp falls back to the token embedding when a file has no output matrix (tied weights)
        out_name = "output.weight" if "output.weight" in r.tensors else "token_embd.weight"
        if tuple(r.tensors[out_name].shape) != (cfg.vocab_size, cfg.hidden_size):
            raise PocketLMError(f"tensor {out_name!r} has shape {r.tensors[out_name].shape}, expected "
                                f"{(cfg.vocab_size, cfg.hidden_size)}", self.path)
        self.output = linear(out_name)
        self._embd_info = r.tensors["token_embd.weight"]
        if self._embd_info.gtype is None:
            raise PocketLMError(f"token_embd.weight has type {self._embd_info.type_name}, which pocketlm "
                                f"cannot read", self.path)
        self._embd = r.tensor("token_embd.weight")  # [V, row bytes] raw, or [V, D] typed
        embd_type = int(self._embd_info.type_id)
        if validate and embd_type in KERNEL_TYPES and self.output.name != "token_embd.weight":
            self._check_blocks("token_embd.weight", r.raw("token_embd.weight"), int(self._embd_info.type_id))

    def _linear(self, name: str, validate: bool, sparse: bool | str) -> Linear:
        info = self.reader.tensors[name]
        rows, K = info.shape
        gtype = int(info.type_id)
        raw = self.reader.raw(name)
        if gtype in DENSE_TYPES:  # tiny test models: numpy in float32 (a copy for F16/BF16)
            dense = self.reader.dequantize(name)
            if not np.isfinite(dense).all():
                raise PocketLMError(f"tensor {name!r} holds NaN or infinite values", self.path)
            return Linear(name, raw, gtype, rows, K, dense=dense)
        if gtype not in KERNEL_TYPES:
            raise PocketLMError(f"tensor {name!r} has type {type_name(gtype)}, which the pocketlm kernel "
                                f"does not implement (supported: Q4_0, Q4_1, Q8_0, Q4_K, Q6_K, F16, F32)",
                                self.path)
        if validate:
            self._check_blocks(name, raw, gtype)
        if name in self._packed:
            _release_pages(raw)  # only read if validate=True scanned them
            raw, gtype = self._packed[name], kern.Q4_0_PACKED
        index = None
        if sparse == "auto" and rows >= 4 * SPARSE_SAMPLE_STRIDE:
            sample = np.ascontiguousarray(raw.reshape(rows, -1)[::SPARSE_SAMPLE_STRIDE])
            if kern.build_sparse_index(sample, gtype, sample.shape[0], K).density > SPARSE_MAX_DENSITY:
                sparse = False
        if sparse:
            idx = kern.build_sparse_index(raw, gtype, rows, K)
            if idx.density <= SPARSE_MAX_DENSITY:
                index = idx.handle
        return Linear(name, raw, gtype, rows, K, index=index)

    def find_corrupt_blocks(self) -> None:
        """Scan every quantized tensor; PocketLMError naming the first block with a NaN/inf scale."""
        for name, info in self.reader.tensors.items():
            if int(info.type_id) in KERNEL_TYPES:
                self._check_blocks(name, self.reader.raw(name), int(info.type_id))

    def _non_finite(self, where: str) -> PocketLMError:
        self.find_corrupt_blocks()  # raises when a block is to blame
        return PocketLMError(f"the model produced non-finite values ({where}); the weights overflow "
                             f"float32 for this input", self.path)

    def _check_blocks(self, name: str, raw: np.ndarray, gtype: int) -> None:
        bad = kern.check_blocks(raw, gtype)
        if bad is not None:
            raise PocketLMError(f"tensor {name!r} is corrupt: block {bad} has a NaN or infinite scale",
                                self.path)

    def _init_rope(self, policy: str) -> None:
        """cos/sin tables [n_ctx, head_dim/2] for the short and (LongRoPE) long factors."""
        if policy not in LONGROPE_POLICIES:
            raise PocketLMError(f"LongRoPE policy {policy!r} is not one of {LONGROPE_POLICIES}")
        self.longrope = policy
        cfg = self.cfg
        positions = np.arange(self.n_ctx)
        self._rope = {False: rope_cos_sin(cfg, positions, long=False)}
        if cfg.rope_scaling is not None:
            self._rope[True] = rope_cos_sin(cfg, positions, long=True)
        self._context_long = (cfg.rope_scaling is not None
                              and self.n_ctx > cfg.original_max_position_embeddings)

    def _use_long(self, end: int) -> bool:
        if self.cfg.rope_scaling is None:
            return False
        if self.longrope == "context":
            return self._context_long
        return end > self.cfg.original_max_position_embeddings

    # ------------------------------------------------------------------ public

    @property
    def n_past(self) -> int:
        return self.cache.length

    def reset(self) -> None:
        """Forget the conversation (the cache is reused, not reallocated)."""
        self.cache.truncate(0)
        self.tokens.clear()

    def truncate(self, length: int) -> None:
        self.cache.truncate(length)
        del self.tokens[length:]

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """Rows of the token embedding [T, D] float32, dequantized only for the tokens asked."""
        info = self._embd_info
        rows = self._embd[ids]                     # [T, D] typed, or [T, row bytes] of blocks
        if int(info.type_id) == int(GGMLType.BF16):
            return bf16_to_float32(rows)
        if int(info.type_id) in DENSE_TYPES:
            return rows.astype(np.float32)
        return dequantize(rows, info.gtype, (len(ids), self.cfg.hidden_size))

    def check_tokens(self, ids: Sequence[int]) -> np.ndarray:
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= self.cfg.vocab_size):
            bad = int(arr[(arr < 0) | (arr >= self.cfg.vocab_size)][0])
            raise PocketLMError(f"token id {bad} is out of range [0, {self.cfg.vocab_size})", self.path)
        return arr

    def forward(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Feed `ids` after what the cache holds; logits of the last token [V] (a new array), or of
        every token [T, V] with `all_logits`."""
        arr = self.check_tokens(ids)
        if arr.size == 0:
            raise PocketLMError("forward needs at least one token")
        start = self.cache.length
        if start + arr.size > self.n_ctx:
            raise PocketLMError(f"{start + arr.size} tokens ({start} in the cache + {arr.size} new) do not "
                                f"fit the context of {self.n_ctx} tokens (raise --ctx, at most "
                                f"{self.cfg.max_position_embeddings} for this model)", self.path)
        try:
            if arr.size == 1 and not all_logits:
                logits = self._decode_one(int(arr[0])).copy()
            else:
                outs = []
                for c0 in range(0, arr.size, self.batch):
                    chunk = arr[c0:c0 + self.batch]
                    last = c0 + self.batch >= arr.size
                    outs.append(self._forward_chunk(chunk, all_logits or last, all_rows=all_logits))
                logits = np.concatenate(outs, axis=0) if all_logits else outs[-1][-1]
        except ValueError as e:  # the kernel refuses non-finite activations
            if "NaN or infinity" not in str(e):
                raise
            self.truncate(start)
            raise self._non_finite(str(e)) from None
        if not np.isfinite(logits).all():
            self.truncate(start)
            raise self._non_finite("logits")
        return logits

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        """Logits [V] after `ids`, reusing the longest cached prefix (a chat's earlier turns)."""
        ids = [int(i) for i in ids]
        if not ids:
            raise PocketLMError("the prompt is empty (no tokens)")
        common = 0
        for a, b in zip(self.tokens, ids, strict=False):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # always evaluate at least the last token
        self.truncate(common)
        self.last_prefill_tokens = len(ids) - common
        return self.forward(ids[common:])

    def generate(self, prompt: str | Sequence[int], **kwargs: Any) -> Iterator[str]:
        """Stream text pieces; see pocketlm.runtime.generate.generate for the arguments."""
        from .generate import generate
        return generate(self, prompt, **kwargs)

    # ------------------------------------------------------------------ the decode step (T = 1)

    def _decode_one(self, token: int) -> np.ndarray:
        b, cache = self._buf, self.cache
        pos = cache.length
        cos_t, sin_t = self._rope[self._use_long(pos + 1)]
        cos, sin = cos_t[pos], sin_t[pos]                                   # [hd/2]
        b.h[:] = self.embed(np.array([token]))[0]
        plan = self._decode_plan()
        clock = time.perf_counter
        if plan is not None:  # every layer in one kernel call
            t = clock()
            _kernel.decode_step(plan, b.h, cos, sin, pos)
            k0 = self._kernel_seconds + clock() - t
        else:
            k0 = self._layers_numpy(pos, cos, sin)
        _rms_norm_vec(b.h, self.output_norm, self.cfg.rms_norm_eps, b.x)
        t = clock()
        self.output.vec(b.x, b.logits)
        self._kernel_seconds = k0 + clock() - t
        cache.length = pos + 1
        self.tokens.append(token)
        return b.logits

    def _decode_plan(self) -> Any:
        """The kernel's decode-step plan (weights, norms, KV cache), or None where the layers need
        numpy: dense (F16/F32/BF16) linears. Rebuilt if the cache arrays change."""
        if self._plan is not None and self._plan[0] is self.cache.k:
            return self._plan[1]
        linears = [lin for L in self.layers for lin in (L.qkv, L.o, L.gate_up, L.down)]
        if any(lin.dense is not None for lin in linears):
            return None
        cfg = self.cfg
        layers = [(L.attn_norm, L.ffn_norm, *((lin.raw, lin.gtype, lin.index) for lin in (L.qkv, L.o, L.gate_up,
                                                                                           L.down)))
                  for L in self.layers]
        dims = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                cfg.intermediate_size, self.n_ctx, cfg.sliding_window or 0, cfg.rms_norm_eps)
        scales = (self.cache.k_scale, self.cache.v_scale) if self.cache.kind == "int8" else ()
        self._plan = (self.cache.k, _kernel.decode_plan(layers, dims, self.cache.k, self.cache.v, *scales))
        return self._plan[1]

    def _layers_numpy(self, pos: int, cos: np.ndarray, sin: np.ndarray) -> float:
        """The layers of one decode step in numpy + kernel calls (dense weights; also the reference
        for the kernel's decode_step). Returns the updated kernel-seconds counter."""
        cfg, b, cache = self.cfg, self._buf, self.cache
        n_h, n_kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        eps = cfg.rms_norm_eps
        k0 = self._kernel_seconds
        clock = time.perf_counter
        for i, L in enumerate(self.layers):
            _rms_norm_vec(b.h, L.attn_norm, eps, b.x)
            t = clock()
            L.qkv.vec(b.x, b.qkv)
            k0 += clock() - t
            q = b.qkv[:n_h * hd].reshape(n_h, hd)
            k = b.qkv[n_h * hd:(n_h + n_kv) * hd].reshape(n_kv, hd)
            v = b.qkv[(n_h + n_kv) * hd:].reshape(n_kv, hd)
            _rope_inplace(q, cos, sin)
            _rope_inplace(k, cos, sin)
            cache.write(i, pos, k[:, None, :], v[:, None, :])
            t = clock()
            self._attend_one(i, q, pos, b.attn)
            if cache.kind != "int8":  # the C kernel's attention (int8 stays in numpy)
                k0 += clock() - t
            t = clock()
            L.o.vec(b.attn, b.proj)
            k0 += clock() - t
            b.h += b.proj
            _rms_norm_vec(b.h, L.ffn_norm, eps, b.x)
            t = clock()
            L.gate_up.vec(b.x, b.gate_up)
            k0 += clock() - t
            f = cfg.intermediate_size
            _swiglu(b.gate_up[:f], b.gate_up[f:], b.act)
            t = clock()
            L.down.vec(b.act, b.proj)
            k0 += clock() - t
            b.h += b.proj
        return k0

    def _attend_one(self, layer: int, q: np.ndarray, pos: int, out: np.ndarray) -> None:
        """out [H*hd] = attention of q [H, hd] over the cached keys visible from position pos."""
        cfg = self.cfg
        n_kv, hd = cfg.num_key_value_heads, cfg.head_dim
        s0 = max(0, pos + 1 - cfg.sliding_window) if cfg.sliding_window else 0
        if self.cache.kind != "int8":
            # C: fp16 rows converted in registers, instead of widening the cache to float32 here
            _kernel.attention(q, self.cache.k[layer], self.cache.v[layer], cfg.num_attention_heads, n_kv, hd,
                              self.cache.n_ctx, s0, pos + 1, out)
            return
        keys, k_scale = self.cache.keys(layer, s0, pos + 1)               # [KV, S, hd]
        qg = q.reshape(n_kv, -1, hd)                                       # [KV, G, hd]
        scores = qg @ keys.transpose(0, 2, 1)                              # [KV, G, S]
        if k_scale is not None:
            scores *= k_scale[:, None, :]
        scores *= np.float32(1.0 / np.sqrt(hd))
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        values, v_scale = self.cache.values(layer, s0, pos + 1)
        if v_scale is not None:
            scores *= v_scale[:, None, :]
        np.matmul(scores, values, out=out.reshape(n_kv, -1, hd))

    # ------------------------------------------------------------------ a prompt chunk (T >= 1)

    def _forward_chunk(self, ids: np.ndarray, want_logits: bool, all_rows: bool) -> np.ndarray | None:
        cfg, cache = self.cfg, self.cache
        pos, t = cache.length, ids.size
        n_h, n_kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        f, eps = cfg.intermediate_size, cfg.rms_norm_eps
        cos_t, sin_t = self._rope[self._use_long(pos + t)]
        cos, sin = cos_t[pos:pos + t], sin_t[pos:pos + t]                  # [T, hd/2]
        h = np.ascontiguousarray(self.embed(ids), dtype=np.float32)        # [T, D]
        x = np.empty_like(h)
        act = np.empty((t, f), dtype=np.float32)
        for i, L in enumerate(self.layers):
            _kernel.rms_norm(h, L.attn_norm, eps, x)
            qkv = L.qkv.mat(x)                                             # [T, (H+2KV) hd]
            _kernel.rope(qkv, n_h + n_kv, hd, cos, sin)                    # q and k heads, in place
            q = qkv[:, :n_h * hd].reshape(t, n_h, hd).transpose(1, 0, 2)  # [H, T, hd]
            k = qkv[:, n_h * hd:(n_h + n_kv) * hd].reshape(t, n_kv, hd).transpose(1, 0, 2)
            v = qkv[:, (n_h + n_kv) * hd:].reshape(t, n_kv, hd).transpose(1, 0, 2)
            cache.write(i, pos, k, v)
            a = self._attend_chunk(i, q, pos)                              # [T, H hd]
            h += L.o.mat(a)
            _kernel.rms_norm(h, L.ffn_norm, eps, x)
            _kernel.swiglu(L.gate_up.mat(x), act)                          # [T, 2F] -> [T, F]
            h += L.down.mat(act)
        cache.length = pos + t
        self.tokens.extend(int(x) for x in ids)
        if not want_logits:
            return None
        rows = h if all_rows else h[-1:]
        return self.output.mat(_rms_norm(rows, self.output_norm, eps))     # [T or 1, V]

    def _attend_chunk(self, layer: int, q: np.ndarray, pos: int) -> np.ndarray:
        """Attention of q [H, T, hd] (positions pos..pos+T-1) over the cache -> [T, H hd]."""
        cfg = self.cfg
        n_h, n_kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        t = q.shape[1]
        window = cfg.sliding_window
        s0 = max(0, pos - window + 1) if window else 0
        keys, k_scale = self.cache.keys(layer, s0, pos + t)                # [KV, S, hd]
        values, v_scale = self.cache.values(layer, s0, pos + t)
        k_pos = np.arange(s0, pos + t)
        qg = q.reshape(n_kv, n_h // n_kv, t, hd)                           # [KV, G, T, hd]
        out = np.empty((t, n_h * hd), dtype=np.float32)
        kt = keys.transpose(0, 2, 1)[:, None]                              # [KV, 1, hd, S]
        for c0 in range(0, t, ATTN_QUERY_CHUNK):
            c1 = min(t, c0 + ATTN_QUERY_CHUNK)
            q_pos = np.arange(pos + c0, pos + c1)
            scores = qg[:, :, c0:c1] @ kt                                  # [KV, G, C, S]
            if k_scale is not None:
                scores *= k_scale[:, None, None, :]
            scores *= np.float32(1.0 / np.sqrt(hd))
            allowed = k_pos[None, :] <= q_pos[:, None]                     # [C, S]
            if window:
                allowed &= k_pos[None, :] > q_pos[:, None] - window
            scores[..., ~allowed] = -np.inf
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=-1, keepdims=True)
            if v_scale is not None:
                scores *= v_scale[:, None, None, :]
            a = scores @ values[:, None]                                   # [KV, G, C, hd]
            out[c0:c1] = a.reshape(n_h, c1 - c0, hd).transpose(1, 0, 2).reshape(c1 - c0, n_h * hd)
        return out


# ---------------------------------------------------------------------------- numpy pieces

def _rms_norm_vec(h: np.ndarray, w: np.ndarray, eps: float, out: np.ndarray) -> None:
    """out[D] = h / sqrt(mean(h^2) + eps) * w, without temporaries."""
    scale = np.float32(1.0 / np.sqrt(float(np.dot(h, h)) / h.size + eps))
    np.multiply(h, w, out=out)
    out *= scale


def _rms_norm(h: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """h [T, D] -> [T, D] (a new contiguous float32 array)."""
    var = np.einsum("td,td->t", h, h) / np.float32(h.shape[1])
    return np.ascontiguousarray((h * (1.0 / np.sqrt(var + np.float32(eps)))[:, None]) * w, dtype=np.float32)


def _swiglu(gate: np.ndarray, up: np.ndarray, out: np.ndarray) -> None:
    """out = silu(gate) * up = gate * up / (1 + exp(-gate))."""
    np.negative(gate, out=out)
    np.exp(out, out=out)
    out += 1.0
    np.divide(gate, out, out=out)
    out *= up


def _rope_inplace(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> None:
    """NEOX rotation of x [heads, hd] in place (cos/sin [hd/2])."""
    half = x.shape[-1] // 2
    x1 = x[:, :half].copy()
    x2 = x[:, half:]
    x[:, :half] = x1 * cos - x2 * sin
    x2 *= cos
    x2 += x1 * sin


def _release_pages(view: np.ndarray) -> None:
    """Drop this process's mapping of the whole pages under `view` (file-backed, read-only: the
    data stays in the page cache and would fault back in if read again). Linux/Android only."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    page = mmap.PAGESIZE
    start = (view.ctypes.data + page - 1) // page * page
    end = (view.ctypes.data + view.nbytes) // page * page
    if end > start:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)


def _load_tokenizer(reader: GGUFReader, path: str):
    fields = reader.tokenizer_fields()
    if "tokenizer.ggml.tokens" not in fields:
        return None
    from ..tokenizer import Tokenizer
    return Tokenizer.from_gguf_fields(fields, source=path)


# ---------------------------------------------------------------------------- load

def load(path: str | os.PathLike, threads: int | None = None, ctx: int | None = None, kv: str = "f16",
         longrope: str = "context", batch: int = DEFAULT_BATCH, validate: bool | str = "lazy",
         sparse: bool | str = "auto", repack: bool | str = "auto") -> Model:
    """Map a phi3 GGUF file and get it ready to run.

    threads: kernel threads (default: the machine's cores, at most 4); ctx: context size (default
    the model's, at most 4096; at most the model's max_position_embeddings); kv: "f16" | "int8" |
    "f32"; longrope: "context" | "sequence" (see the module docstring); batch: prompt tokens per
    prefill chunk; validate: True scans every block's scale for NaN/inf at load, "lazy" only when
    a step produces non-finite values; sparse: "auto" | True | False; repack: "auto" | False (see
    the module docstring).
    """
    t0 = time.perf_counter()
    path = os.fspath(path)
    if threads is None:
        threads = min(4, os.cpu_count() or 1)
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise PocketLMError(f"threads must be an integer >= 1, got {threads!r}")
    if kv not in KV_TYPES:
        raise PocketLMError(f"kv must be one of {', '.join(KV_TYPES)}, got {kv!r}")
    if validate not in (True, False, "lazy") or sparse not in (True, False, "auto"):
        raise PocketLMError(f"validate must be True/False/'lazy' and sparse True/False/'auto', got "
                            f"{validate!r}, {sparse!r}")
    if not isinstance(batch, int) or batch < 1:
        raise PocketLMError(f"batch must be an integer >= 1, got {batch!r}")
    reader = GGUFReader(path)
    rope_factors = {n: reader.dequantize(n) for n in ("rope_factors_long.weight", "rope_factors_short.weight")
                    if n in reader.tensors}
    cfg = Phi3Config.from_gguf_metadata(reader.metadata, rope_factors, source=path)
    if ctx is None:
        ctx = min(cfg.max_position_embeddings, 4096)
    if not isinstance(ctx, int) or isinstance(ctx, bool) or ctx < 1:
        raise PocketLMError(f"context size must be an integer >= 1, got {ctx!r}")
    if ctx > cfg.max_position_embeddings:
        raise PocketLMError(f"context size {ctx} exceeds the model's maximum of "
                            f"{cfg.max_position_embeddings} positions", path)
    kern.set_threads(threads)
    if repack not in (False, "auto"):
        raise PocketLMError(f"repack must be 'auto' or False, got {repack!r}")
    model = Model(path, reader, cfg, ctx, kv, longrope, batch, validate, sparse, repack)
    model.stats.load_seconds = time.perf_counter() - t0
    return model
