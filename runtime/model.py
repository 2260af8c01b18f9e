"""The runtime's model loop for the Phi-3 family: the model description (pocketlm/config.py) run
by the C kernel straight from the memory-mapped GGUF blocks (zero copy: the kernel reads the file's
pages).

    model = load("phi3-q4_0.gguf", threads=2, ctx=2048, kv="f16")
    for piece in model.generate("The meaning of life is", max_tokens=64):
        print(piece, end="")
    print(model.stats)

Two paths, one forward (pocketlm/reference.py is the numpy original both are tested against):
  * decode and a few tokens (T <= ROWS_IN_C, quantized linears: a decode step, a verify, a short
    prompt): every layer in one kernel call (`_kernel.forward_rows`, runtime/kernel/decode.c:
    norms, biases, RoPE, cache write, attention over the fp16/fp32/int8 cache, the gated
    activation, residuals), so no Python runs between the matvecs;
  * a prompt chunk (longer prompts; every T for F16/F32 weights): per layer five kernel calls on the
    thread pool (norm, qkv matmul + RoPE, attention over the cache, o, gate_up + activation, down):
        h += o(attention_i(rope(qkv(norm(h)))))      attention_i: dense, sliding window or block-sparse
        h += down(act(gate_up(norm(h))))              act: SwiGLU or GeGELU
  logits = output(norm(h)) * logit_scale, masked token ids at MASKED_LOGIT.

Policies (documented here, tested in tests/test_runtime.py):
  * LongRoPE: `longrope="context"` (the default, llama.cpp's rule): long factors for every position
    when the context size n_ctx exceeds the original context, short factors otherwise; the KV cache
    never needs recomputing. `longrope="sequence"` is Hugging Face's rule: each forward call picks
    long factors once the sequence (cache + new tokens) passes the original context (keys already
    cached keep their short-factor rotation, as transformers does).
  * Context: the KV cache is preallocated to n_ctx positions. A prompt that does not fit raises
    PocketLMError; generation that reaches n_ctx stops with finish reason "context" (no sliding).
  * Attention: a query at position p attends to keys j <= p, within p - window < j for a sliding
    window, and only the key blocks its head sees on Phi-3-small's block-sparse layers.
  * Weights the kernel lacks: F32/F16/BF16 linear layers run in numpy (slow, for tiny test
    models); any other type the kernel does not implement (Q5_K, IQ*, ...) is refused at load.
  * Corrupt blocks (a NaN/inf scale): `validate=True` scans every block at load. The default
    (`validate="lazy"`) keeps loading fast (the scan reads every page of the file): a corrupt scale
    turns the activations or logits non-finite, which the loop checks at every step; it then scans
    the file and raises PocketLMError naming the tensor and block, so no text is ever produced from
    a corrupt block either way.
  * Repacking (`repack="auto"`, the default): where the kernel has a faster layout for a type on
    this CPU (Q4_0, Q8_0, Q4_K: `kernel.should_repack`), the matrices are repacked once per model
    file into a cache file that later loads map read-only (see packed_cache.py, which announces
    the writing on stderr); the original file's pages of those matrices are then never read, so
    memory stays at about the file size. `repack="memory"` (`--no-cache`) repacks at every load
    into memory instead of a file; `repack=False` runs every matrix zero-copy from the model file.
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

from ..config import LAYER_LINEARS, Phi3Config, tensor_specs
from ..errors import PocketLMError
from ..export.gguf_format import bf16_to_float32, type_name
from ..export.gguf_reader import GGUFReader
from ..hostinfo import default_threads
from ..kv_cache import KV_TYPES, KVCache
from ..layers import rope_cos_sin
from ..quantize.formats import GGMLType, dequantize
from ..reference import MASKED_LOGIT
from ..threads import check_threads
from . import _kernel
from . import kernel as kern
from .packed_cache import packed_matrices

DENSE_TYPES = {int(GGMLType.F32), int(GGMLType.F16), int(GGMLType.BF16)}
KERNEL_TYPES = kern.KERNEL_TYPES  # the block types the C kernel runs (its own table, checked against formats)
DEFAULT_BATCH = 256      # prompt tokens per prefill chunk (bounds prefill temporaries)
ROWS_IN_C = 16           # up to this many tokens (a verify, a short prompt) go through all layers in one
                         # kernel call: the per-layer Python loop cost 2-3 ms per forward at phi-3-mini shape
LONGROPE_POLICIES = ("context", "sequence")
NORM_KINDS = {"rms": 0, "layer": 1}          # the kernel's NORM_* / ACT_* codes (kernel.h)
ACTIVATION_KINDS = {"swiglu": 0, "gegelu": 1}


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
    """One [rows, K] weight (+ bias): raw GGUF blocks for the kernel, or a float array for numpy."""

    def __init__(self, name: str, raw: np.ndarray, gtype: int, rows: int, K: int,
                 dense: np.ndarray | None = None, bias: np.ndarray | None = None):
        self.name, self.raw, self.gtype, self.rows, self.K = name, raw, gtype, rows, K
        self.dense = dense      # [rows, K] view (F32/F16/BF16 files only)
        self.bias = bias        # [rows] float32 or None

    def mat(self, X: np.ndarray, exact: bool = False) -> np.ndarray:
        """X [M, K] -> X W^T + b [M, rows]; `exact`: each row's bits are its own matvec's (the kernel
        leaves out its tiled and 2 x 2 kernels, whose float order differs)."""
        if self.dense is not None:
            out = X @ self.dense.T
        else:
            out = np.empty((X.shape[0], self.rows), dtype=np.float32)
            if X.shape[0] == 1:  # the batched path gains nothing for one row
                _kernel.matvec(self.raw, self.gtype, self.rows, self.K, X[0], out[0])
            else:
                _kernel.matmul(self.raw, self.gtype, self.rows, self.K, X, X.shape[0], out, exact)
        if self.bias is not None:
            out += self.bias
        return out

    def plan(self) -> tuple[np.ndarray, int, np.ndarray | None]:
        """What the kernel's decode plan takes for this linear."""
        return self.raw, self.gtype, self.bias


@dataclass
class Norm:
    weight: np.ndarray          # [D] float32
    bias: np.ndarray | None     # [D] float32 (LayerNorm) or None (RMSNorm)


@dataclass
class Layer:
    attn_norm: Norm
    qkv: Linear            # [(H + 2 KV) hd, D]: rows [q | k | v]
    o: Linear              # [D, H hd]
    ffn_norm: Norm
    gate_up: Linear        # [2F, D]: rows [gate | up]
    down: Linear           # [D, F]
    sparse: tuple[int, int, int, int] | None  # (block, local_blocks, vert_stride, head_step), or dense


class Model:
    """A loaded GGUF model with its KV cache. Not thread-safe (one generation at a time)."""

    def __init__(self, path: str, reader: GGUFReader, cfg: Phi3Config, n_ctx: int, kv: str,
                 longrope: str, batch: int, validate: bool | str, repack: bool | str = "auto",
                 dense_attention: bool = False):
        self.path, self.reader, self.cfg = path, reader, cfg
        self.n_ctx, self.batch = n_ctx, batch
        self.stats = Stats()
        self.tokens: list[int] = []  # the token ids whose keys/values the cache holds, in order
        self.last_prefill_tokens = 0  # tokens the last prefill() evaluated (the rest came from the cache)
        self._kernel_seconds = 0.0
        self._repack = repack
        self._dense_attention = dense_attention
        self._plan: tuple[np.ndarray, Any] | None = None  # (the cache's k array, forward_rows plan)
        self._load_weights(validate is True)
        self.cache = KVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, n_ctx, cfg.head_dim, kv)
        self._init_rope(longrope)
        self.tokenizer = _load_tokenizer(reader, path)

    # ------------------------------------------------------------------ loading

    def _load_weights(self, validate: bool) -> None:
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

        def vector(name: str) -> np.ndarray | None:
            if name not in expected:
                return None
            w = r.dequantize(name).astype(np.float32)
            if not np.isfinite(w).all():
                raise PocketLMError(f"tensor {name!r} holds NaN or infinite values", self.path)
            return w

        def norm(name: str) -> Norm:
            return Norm(vector(f"{name}.weight"), vector(f"{name}.bias"))

        def linear(name: str) -> Linear:
            return self._linear(f"{name}.weight", vector(f"{name}.bias"), validate)

        self._packed = {}
        if self._repack:
            names = [f"blk.{i}.{t}.weight" for i in range(cfg.num_hidden_layers) for t in LAYER_LINEARS]
            infos = [r.tensors[n] for n in [*names, "output.weight"] if n in r.tensors]
            mats = [(t.name, r.raw(t.name), int(t.type_id), *t.shape) for t in infos
                    if kern.should_repack(int(t.type_id), t.shape[1])]
            self._packed = packed_matrices(self.path, mats, use_cache=self._repack == "auto")

        def sparsity(i: int) -> tuple[int, int, int, int] | None:
            bs = cfg.layer_sparsity(i)
            if bs is None or self._dense_attention:
                return None
            return bs.block_size, bs.local_blocks, bs.vert_stride, bs.head_step(cfg.num_attention_heads)

        self.layers = [
            Layer(norm(f"blk.{i}.attn_norm"), linear(f"blk.{i}.attn_qkv"), linear(f"blk.{i}.attn_output"),
                  norm(f"blk.{i}.ffn_norm"), linear(f"blk.{i}.ffn_up"), linear(f"blk.{i}.ffn_down"), sparsity(i))
            for i in range(cfg.num_hidden_layers)]
        self.output_norm = norm("output_norm")
        # llama.cpp falls back to the token embedding when a file has no output matrix (tied weights)
        out_name = "output" if "output.weight" in r.tensors else "token_embd"
        if tuple(r.tensors[f"{out_name}.weight"].shape) != (cfg.vocab_size, cfg.hidden_size):
            raise PocketLMError(f"tensor {out_name}.weight has shape {r.tensors[f'{out_name}.weight'].shape}, "
                                f"expected {(cfg.vocab_size, cfg.hidden_size)}", self.path)
        self.output = linear(out_name)
        self._masked = np.asarray(cfg.masked_token_ids, dtype=np.int64)
        self._embd_info = r.tensors["token_embd.weight"]
        if self._embd_info.gtype is None:
            raise PocketLMError(f"token_embd.weight has type {self._embd_info.type_name}, which pocketlm "
                                f"cannot read", self.path)
        self._embd = r.tensor("token_embd.weight")  # [V, row bytes] raw, or [V, D] typed
        embd_type = int(self._embd_info.type_id)
        if validate and embd_type in KERNEL_TYPES and self.output.name != "token_embd.weight":
            self._check_blocks("token_embd.weight", r.raw("token_embd.weight"), int(self._embd_info.type_id))

    def _linear(self, name: str, bias: np.ndarray | None, validate: bool) -> Linear:
        info = self.reader.tensors[name]
        rows, K = info.shape
        gtype = int(info.type_id)
        raw = self.reader.raw(name)
        if gtype in DENSE_TYPES:  # tiny test models: numpy in float32 (a copy for F16/BF16)
            dense = self.reader.dequantize(name)
            if not np.isfinite(dense).all():
                raise PocketLMError(f"tensor {name!r} holds NaN or infinite values", self.path)
            return Linear(name, raw, gtype, rows, K, dense=dense, bias=bias)
        if gtype not in KERNEL_TYPES:
            raise PocketLMError(f"tensor {name!r} has type {type_name(gtype)}, which the pocketlm kernel "
                                f"does not implement (supported: Q4_0, Q4_1, Q8_0, Q4_K, Q6_K, F16, F32)",
                                self.path)
        if validate:
            self._check_blocks(name, raw, gtype)
        if name in self._packed:
            _release_pages(raw)  # only read if validate=True scanned them
            raw, gtype = self._packed[name], kern.packed_type(gtype)
        return Linear(name, raw, gtype, rows, K, bias=bias)

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
        kern.check_tensor(name, raw, gtype, self.path)  # the one check every verb applies

    def _init_rope(self, policy: str) -> None:
        """cos/sin tables [n_ctx, rope_dim/2] for the short and (LongRoPE) long factors."""
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
        """Rows of the token embedding [T, D] float32 (times the embedding multiplier), dequantized
        only for the tokens asked."""
        info = self._embd_info
        rows = self._embd[ids]                     # [T, D] typed, or [T, row bytes] of blocks
        if int(info.type_id) == int(GGMLType.BF16):
            h = bf16_to_float32(rows)
        elif int(info.type_id) in DENSE_TYPES:
            h = rows.astype(np.float32)
        else:
            h = dequantize(rows, info.gtype, (len(ids), self.cfg.hidden_size))
        if self.cfg.embedding_multiplier != 1.0:
            h *= np.float32(self.cfg.embedding_multiplier)
        return h

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
            if arr.size <= ROWS_IN_C and self._decode_plan() is not None:
                logits = self._forward_rows(arr, all_logits)
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

    # ------------------------------------------------------------------ the decode step and a few tokens

    def _decode_plan(self) -> Any:
        """The kernel's decode-step plan (weights, norms, biases, patterns, KV cache), or None where
        the layers need numpy: dense (F16/F32/BF16) linears. Rebuilt if the cache arrays change."""
        if self._plan is not None and self._plan[0] is self.cache.k:
            return self._plan[1]
        linears = [lin for L in self.layers for lin in (L.qkv, L.o, L.gate_up, L.down)]
        if any(lin.dense is not None for lin in linears):
            return None
        cfg = self.cfg
        layers = [(L.attn_norm.weight, L.attn_norm.bias, L.ffn_norm.weight, L.ffn_norm.bias,
                   L.qkv.plan(), L.o.plan(), L.gate_up.plan(), L.down.plan(), L.sparse) for L in self.layers]
        dims = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                cfg.intermediate_size, self.n_ctx, cfg.sliding_window or 0, cfg.rms_norm_eps,
                NORM_KINDS[cfg.norm], ACTIVATION_KINDS[cfg.activation], cfg.gegelu_limit, cfg.attention_scale,
                cfg.rope_dim)
        scales = (self.cache.k_scale, self.cache.v_scale) if self.cache.kind == "int8" else ()
        self._plan = (self.cache.k, _kernel.decode_plan(layers, dims, self.cache.k, self.cache.v, *scales))
        return self._plan[1]

    def _forward_rows(self, ids: np.ndarray, all_logits: bool) -> np.ndarray:
        """A decode step or a few tokens (a verify, a short prompt) through every layer in one kernel
        call, then the head: logits [T, V] with all_logits, else [V] of the last (a new array); the
        same bits as _forward_chunk."""
        pos, t = self.cache.length, ids.size
        cos_t, sin_t = self._rope[self._use_long(pos + t)]
        h = np.ascontiguousarray(self.embed(ids), dtype=np.float32)        # [T, D]
        clock = time.perf_counter
        t0 = clock()
        _kernel.forward_rows(self._decode_plan(), h, np.ascontiguousarray(cos_t[pos:pos + t]),
                             np.ascontiguousarray(sin_t[pos:pos + t]), pos)
        logits = self._head(h if all_logits else h[-1:], exact=True)
        self._kernel_seconds += clock() - t0
        self.cache.length = pos + t
        self.tokens.extend(int(x) for x in ids)
        return logits if all_logits else logits[-1]

    # ------------------------------------------------------------------ a prompt chunk (T >= 1)

    def _forward_chunk(self, ids: np.ndarray, want_logits: bool, all_rows: bool) -> np.ndarray | None:
        cfg, cache = self.cfg, self.cache
        pos, t = cache.length, ids.size
        n_h, n_kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        cos_t, sin_t = self._rope[self._use_long(pos + t)]
        cos, sin = cos_t[pos:pos + t], sin_t[pos:pos + t]                  # [T, rope_dim/2]
        h = np.ascontiguousarray(self.embed(ids), dtype=np.float32)        # [T, D]
        x = np.empty_like(h)
        attn = np.empty((t, n_h * hd), dtype=np.float32)
        act = np.empty((t, cfg.intermediate_size), dtype=np.float32)
        act_kind = ACTIVATION_KINDS[cfg.activation]
        exact = t <= ROWS_IN_C  # the kernels forward_rows takes: a few rows give the bits of as many steps
        clock = time.perf_counter
        t0 = clock()
        for i, L in enumerate(self.layers):
            self._norm(h, L.attn_norm, x)
            qkv = L.qkv.mat(x, exact)                                      # [T, (H+2KV) hd]
            _kernel.rope(qkv, n_h + n_kv, hd, cfg.rope_dim, cos, sin)      # q and k heads, in place
            scales = (cache.k_scale[i], cache.v_scale[i]) if cache.kind == "int8" else (None, None)
            _kernel.kv_store(qkv, n_h, n_kv, hd, cache.k[i], cache.v[i], *scales, self.n_ctx, pos)  # = cache.write
            _kernel.attention_rows(qkv, cache.k[i], cache.v[i], *scales, n_h, n_kv, hd, self.n_ctx, pos,
                                   cfg.sliding_window or 0, cfg.attention_scale, L.sparse, attn)
            h += L.o.mat(attn, exact)
            self._norm(h, L.ffn_norm, x)
            _kernel.gated_act(L.gate_up.mat(x, exact), act_kind, cfg.gegelu_limit, act)  # [T, 2F] -> [T, F]
            h += L.down.mat(act, exact)
        cache.length = pos + t
        self.tokens.extend(int(x) for x in ids)
        logits = self._head(h if all_rows else h[-1:], exact) if want_logits else None  # [T or 1, V]
        self._kernel_seconds += clock() - t0
        return logits

    def _norm(self, h: np.ndarray, norm: Norm, out: np.ndarray) -> None:
        _kernel.norm(h, norm.weight, norm.bias, self.cfg.rms_norm_eps, out)

    def _head(self, h: np.ndarray, exact: bool = False) -> np.ndarray:
        """h [T, D] -> logits [T, V]: final norm, output matrix, logit scale, masked ids."""
        x = np.empty_like(h)
        self._norm(np.ascontiguousarray(h), self.output_norm, x)
        logits = self.output.mat(x, exact)
        if self.cfg.logit_scale != 1.0:
            logits *= np.float32(self.cfg.logit_scale)
        if self._masked.size:
            logits[:, self._masked] = MASKED_LOGIT
        return logits


# ---------------------------------------------------------------------------- helpers

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
    from ..tokenizer import tokenizer_from_gguf_fields
    return tokenizer_from_gguf_fields(fields, source=path)


# ---------------------------------------------------------------------------- load

def load(path: str | os.PathLike, threads: int | None = None, ctx: int | None = None, kv: str = "f16",
         longrope: str = "context", batch: int = DEFAULT_BATCH, validate: bool | str = "lazy",
         repack: bool | str = "auto", dense_attention: bool = False) -> Model:
    """Map a phi3 / phi3small GGUF file and get it ready to run.

    threads: kernel threads (default: the machine's cores, at most 4); ctx: context size (default
    the model's, at most 4096; at most the model's max_position_embeddings); kv: "f16" | "int8" |
    "f32"; longrope: "context" | "sequence" (see the module docstring); batch: prompt tokens per
    prefill chunk; validate: True scans every block's scale for NaN/inf at load, "lazy" only when
    a step produces non-finite values; repack: "auto" | "memory" | False (see the module docstring);
    dense_attention: a debug switch for benchmarks: block-sparse layers attend to every earlier
    position (what the pattern saves is measured against it; the model is then not the same).
    """
    t0 = time.perf_counter()
    path = os.fspath(path)
    threads = default_threads() if threads is None else check_threads(threads)  # one rule for every verb
    if kv not in KV_TYPES:
        raise PocketLMError(f"kv must be one of {', '.join(KV_TYPES)}, got {kv!r}")
    if validate not in (True, False, "lazy"):
        raise PocketLMError(f"validate must be True, False or 'lazy', got {validate!r}")
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
    if repack not in (False, "auto", "memory"):
        raise PocketLMError(f"repack must be 'auto', 'memory' or False, got {repack!r}")
    model = Model(path, reader, cfg, ctx, kv, longrope, batch, validate, repack, dense_attention)
    model.stats.load_seconds = time.perf_counter() - t0
    return model
