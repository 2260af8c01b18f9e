"""Streaming quantization: checkpoint folder -> GGUF file, one decoder layer at a time.

    quantize_checkpoint("ckpt/", "model.gguf", recipe="q4_0", method="gptq")

For each decoder layer i:
  1. load the layer's six tensors as float32 from the memory-mapped checkpoint;
  2. run the calibration hidden states h [N, L, D] (which went through the already quantized and
     dequantized layers 0..i-1) through the float layer, collecting for each linear layer the
     statistics of its input (`LinearStats`: sum of x x^T, of x^2, of |x|, a row sample);
  3. AWQ (if asked): per-input-channel scales s for attn_qkv and ffn_up, folded exactly into the
     norm before them (norm weight and bias / s, weight columns * s), so the float model is unchanged;
  4. quantize the four linear layers (a thread pool: numpy releases the GIL) with the method;
     with `Options.sequential` ("true sequential", the default for gptq) instead one after the
     other, each calibrated on inputs that went through the already quantized linears of this layer
     (`_LayerStages`: the layer is resumed between its two residual halves, and the input of each
     half's last linear is kept, so the layer's products run once, not once per linear's prefix);
  5. write the layer's tensors through the streaming GGUF writer, advance h with the dequantized
     layer, drop the layer.
GPTQ's float target (`Options.float_target`, on by default, needs sequential calibration): a
second stream hf [N, L, D] runs through the float model (once per layer, `_float_layer`, keeping
each linear's inputs until its turn); each linear's inputs from both streams (paired sequence by
sequence) give W*, the weight that best maps the quantized
model's inputs to the float model's outputs (gptq.float_target_weight), and GPTQ rounds W*. So
each layer also compensates the error that the quantized layers before it (and the embedding)
left in its inputs. On the built-in model (q4_0) this takes the KLD from 0.00238 to 0.00140.
Peak memory: one layer in float32, the statistics of the linear being quantized (float32
[in, in] X^T X and, for the float target, D), GPTQ's working set (gptq.py: two more [in, in]
matrices and a chunk of rows) and the calibration activations (h, hf, one sequence's layer
inputs, the float layer's inputs of the linears not yet quantized, the kept inputs of
attn_output or ffn_down); never the whole model. Once ffn_down's statistics are in, the
dequantized copies of the layer's other linears are dropped before its solve (the largest).
The calibration's products run in bfloat16 where the CPU has it natively and torch is installed
(`calib_matmul`, `Options.bf16_calibration`). Measurements at phi-3-mini and phi-3-medium shape:
README ("Quantization quality", scale) and benchmarks/quant_scale.py, which prints
`Options.profile`.

Methods (`METHODS`): a rounding method, optionally after AWQ scaling ("awq+gptq"):
  rtn      llama.cpp's reference rounding (no calibration)
  mse      per-block scale search minimising squared error (no calibration)
  imatrix  scale search weighted by the calibration importance (mean x^2 per input channel)
  gptq     Hessian-based error compensation (H = 2/n X^T X), towards the float model's outputs
  awq      AWQ scaling then imatrix-weighted rounding; "awq+<rounding>" chooses the rounding.
The token embedding is a lookup, not a matmul: gptq rounds it with GPTQ under the Hessian of how
layer 0 reads the residual stream (`embedding_hessian`), the other calibrated methods with `mse`.
The output head gets the full method (its input statistics are the calibration's final normed
states). Tied embeddings (token_embd is the head too) are quantized first, as the embedding.

Fallbacks (never NaN in the output): a linear layer that no calibration token reaches (all-zero
statistics) is rounded with `mse`; a Hessian that stays singular after damping makes GPTQ fall back
to imatrix rounding. Both are counted in the summary. Every tensor is checked finite before it is
written. An exception or Ctrl-C leaves no output file (the writer removes its temporary file).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path

import numpy as np

from pocketlm.checkpoint import Checkpoint
from pocketlm.config import LAYER_LINEARS, Phi3Config, tensor_specs
from pocketlm.errors import PocketLMError
from pocketlm.layers import norm, uses_long_factors
from pocketlm.reference import Matmul, Phi3Reference

from .awq import awq_search, imatrix_rounding, rtn_rounding
from .calib_matmul import Bf16Matmul, calibration_matmul
from .calibration import DEFAULT_LENGTH, DEFAULT_SAMPLES, Calibration, load_calibration
from .formats import GGMLType, dequantize, quantize, tensor_bytes
from .gptq import TARGET_DAMP, HessianAccumulator, Product, gptq_quantize, timed
from .recipes import Recipe, get_recipe
from .search import search_quantize

ROUNDINGS = ("rtn", "mse", "imatrix", "gptq")
METHODS = ("rtn", "mse", "imatrix", "gptq", "awq", "awq+rtn", "awq+mse", "awq+imatrix", "awq+gptq")
CALIBRATED = ("imatrix", "gptq")
AWQ_SAMPLE_ROWS = 2048  # calibration rows kept per linear layer for AWQ's output-error search
AWQ_MAX_ROWS = 2048     # weight rows the AWQ search evaluates (evenly spaced over the fused matrix)
PLAIN = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)


AWQ_FOLDS = {"attn_qkv": "attn_norm", "ffn_up": "ffn_norm"}  # scaled linear -> the norm it folds into


@dataclass(frozen=True)
class Method:
    """A parsed method name: optional AWQ scaling, then a rounding."""

    name: str
    awq: bool
    rounding: str

    @property
    def needs_calibration(self) -> bool:
        return self.awq or self.rounding in CALIBRATED

    @property
    def needs_hessian(self) -> bool:
        return self.rounding == "gptq"


def parse_method(name: str) -> Method:
    if name not in METHODS:
        raise PocketLMError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    parts = name.split("+")
    if parts[0] == "awq":
        return Method(name, True, parts[1] if len(parts) > 1 else "imatrix")
    return Method(name, False, parts[0])


# ---------------------------------------------------------------------------- statistics

class LinearStats:
    """What the calibration inputs x [T, in] of one linear layer tell the quantizer."""

    def __init__(self, n_in: int, hessian: bool, sample_stride: int = 0,
                 cross_product: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None, workers: int = 1):
        self.count = 0
        self.sum_sq = np.zeros(n_in, np.float64)    # [in] sum of x^2 (imatrix = sum_sq / count)
        self.sum_abs = np.zeros(n_in, np.float64)   # [in] sum of |x| (AWQ's activation scale)
        self.hess = HessianAccumulator(n_in, cross_product, workers) if hessian else None  # [in, in] sum x x^T
        self.stride = sample_stride                 # keep every stride-th row (0: keep none)
        self.samples: list[np.ndarray] = []

    def add(self, x: np.ndarray, x_float: np.ndarray | None = None) -> None:
        """x [T, in] through the quantized prefix; x_float [T, in] the same rows through the float
        model (GPTQ's float target, see gptq.float_target_weight), or None."""
        x = np.asarray(x, np.float32)
        self.count += x.shape[0]
        self.sum_sq += np.einsum("ti,ti->i", x, x, dtype=np.float64)
        self.sum_abs += np.abs(x).sum(axis=0, dtype=np.float64)
        if self.hess is not None:
            if x_float is None:
                self.hess.add(x)
            else:
                self.hess.add_pair(x, x_float)
        if self.stride:
            self.samples.append(x[:: self.stride].copy())

    @property
    def importance(self) -> np.ndarray:
        """[in] mean x^2 per input channel (llama.cpp's importance matrix)."""
        return (self.sum_sq / max(self.count, 1)).astype(np.float32)

    @property
    def mean_abs(self) -> np.ndarray:
        return (self.sum_abs / max(self.count, 1)).astype(np.float32)

    def sample_rows(self) -> np.ndarray:
        return np.concatenate(self.samples) if self.samples else np.zeros((0, self.sum_sq.size), np.float32)

    def scale_inputs(self, s: np.ndarray) -> None:
        """The inputs become x / s (AWQ folded s into the norm before this layer)."""
        s64 = s.astype(np.float64)
        self.sum_sq /= s64 * s64
        self.sum_abs /= s64
        if self.hess is not None:
            self.hess.scale_inputs(s64)
        self.samples = [x / s for x in self.samples]

    @property
    def dead(self) -> bool:
        return self.count == 0 or not np.any(self.sum_sq > 0)


def run_layer(cfg: Phi3Config, i: int, weights: Mapping[str, np.ndarray], h: np.ndarray,
              tap: Callable[[str, np.ndarray], None] | None = None, matmul: Matmul | None = None) -> np.ndarray:
    """h [N, L, D] through decoder layer i (weights: at least that layer's tensors) -> [N, L, D].
    tap(name, x) sees each linear's input x [L, in], sequence after sequence. matmul: the
    linears' products (default numpy float32)."""
    ref = Phi3Reference(cfg, weights, matmul)
    positions = np.arange(h.shape[1])
    long_rope = uses_long_factors(cfg, h.shape[1])
    return np.stack([ref.layer(i, seq, positions, None, long_rope, tap) for seq in h])


class _InputsSeen(Exception):
    """Raised by layer_inputs' tap: the wanted inputs are recorded, the rest of the layer is not needed."""


def layer_inputs(cfg: Phi3Config, i: int, weights: Mapping[str, np.ndarray], h: np.ndarray,
                 names: set[str], matmul: Matmul | None = None) -> Iterator[dict[str, np.ndarray]]:
    """For each calibration sequence of h [N, L, D]: name -> input [L, in] of layer i's linears
    `names`, running the layer only as far as the last of them (attn_qkv's input costs a norm,
    ffn_down's about 80 % of the layer)."""
    ref = Phi3Reference(cfg, weights, matmul)
    positions = np.arange(h.shape[1])
    long_rope = uses_long_factors(cfg, h.shape[1])
    seen: dict[str, np.ndarray] = {}

    def tap(name: str, x: np.ndarray) -> None:
        if name in names:
            seen[name] = x
            if len(seen) == len(names):
                raise _InputsSeen

    for seq in h:
        seen.clear()
        with contextlib.suppress(_InputsSeen):
            ref.layer(i, seq, positions, None, long_rope, tap)
        yield dict(seen)


# ---------------------------------------------------------------------------- one tensor

@dataclass
class Options:
    """Tuning knobs of the calibrated methods (defaults: what benchmarks/quant_quality.py chose)."""

    act_order: bool = True       # GPTQ: columns by descending diag(H)
    percdamp: float = 0.01       # GPTQ: damping, fraction of mean(diag H)
    awq_grid: int = 20           # AWQ: exponents 0, 1/grid, ..., (grid-1)/grid
    sequential: bool | None = None  # quantize a layer's linears one after the other (_sequential_linears);
    #                                 None: exactly when the float target is used
    float_target: bool = True    # GPTQ: fit the float model's outputs, not the quantized prefix's (module doc)
    target_damp: float = TARGET_DAMP  # GPTQ float target: ridge, fraction of mean(diag X^T X)
    embedding_gptq: bool = True  # GPTQ: the token embedding too, with `embedding_hessian`
    fallbacks: list[str] = field(default_factory=list)  # what fell back, for the summary
    profile: dict[str, float] | None = None  # a dict to receive wall seconds per part (PROFILE_PARTS)
    bf16_calibration: bool = True  # calibration products in bfloat16 where the CPU has it (calib_matmul)


# The parts `Options.profile` times (wall seconds; with --threads 2 the GPTQ parts run on both cores):
#   read     checkpoint tensors -> float32          forward  calibration forward passes (both streams)
#   hessian  X^T X, float-target and imatrix sums   target   GPTQ's float-target least squares (W*)
#   factor   GPTQ's Cholesky and triangular inverse sweep   GPTQ's column loop (incl. block scale search)
#   round    non-GPTQ rounding (rtn/mse/imatrix)    write    dequantize check and GGUF write
PROFILE_PARTS = ("read", "forward", "hessian", "target", "factor", "sweep", "round", "write")


def round_tensor(name: str, w: np.ndarray, gtype: GGMLType, rounding: str, stats: LinearStats | None,
                 opts: Options, workers: int = 1, product: Product | None = None) -> np.ndarray:
    """w [out, in] float32 -> the tensor's GGUF bytes (uint8 [out, row_bytes]) in gtype.
    workers: threads for GPTQ's row chunks; product: its float target's correction products."""
    if gtype in PLAIN:
        return quantize(w, gtype, name)
    if rounding in CALIBRATED and (stats is None or stats.dead):
        if stats is not None:
            opts.fallbacks.append(f"{name}: no calibration signal, used mse")
        rounding = "mse"
    with timed(opts.profile, "round"):
        if rounding == "rtn":
            return quantize(w, gtype, name)
        if rounding == "mse":
            return search_quantize(w, gtype, None, name)
        if rounding == "imatrix":
            return search_quantize(w, gtype, stats.importance, name)
    with timed(opts.profile, "hessian"):
        xtx, cross = stats.hess.xtx, stats.hess.cross  # (flushes the last buffered rows)
    try:  # X^T X: any multiple of H will do; cross: the float target's statistics (None: plain GPTQ)
        return gptq_quantize(w, gtype, xtx, stats.importance, act_order=opts.act_order,
                             percdamp=opts.percdamp, cross=cross, target_damp=opts.target_damp,
                             workers=workers, name=name, times=opts.profile, product=product)
    except (np.linalg.LinAlgError, FloatingPointError) as e:
        opts.fallbacks.append(f"{name}: GPTQ failed ({e}), used imatrix")
        return search_quantize(w, gtype, stats.importance, name)


def checked_dequantize(name: str, raw: np.ndarray, gtype: GGMLType, shape: tuple[int, ...]) -> np.ndarray:
    """Dequantized float32 weights; PocketLMError if the quantizer produced NaN/Inf (never written)."""
    out = dequantize(raw, gtype, shape, name)
    if not np.isfinite(out).all():
        raise PocketLMError(f"internal error: quantizing {name} gave non-finite values; nothing written")
    return out


# ---------------------------------------------------------------------------- progress

def clock(seconds: float) -> str:
    """Seconds -> "m:ss" or "h:mm:ss"."""
    m, sec = divmod(round(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{sec:02d}" if m >= 60 else f"{m}:{sec:02d}"


class Progress:
    """One `\\r` status line on stderr (no tqdm):
    `[layer 3/32] ##........  3/34  elapsed 2:41  left ~39:50`.

    Steps: the embedding, each decoder layer, the output head (total = layers + 2). The estimate of
    the time left, once a layer is done: the mean time of the layers done so far times the layers
    left, plus the head, counted as long as the embedding step took (the same [vocab, hidden] matrix)."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.start = total, enabled, time.perf_counter()
        self.first: float | None = None  # seconds of the embedding step

    def estimate(self, done: int, elapsed: float) -> float | None:
        """Seconds left after `done` steps and `elapsed` seconds, or None (no layer done yet)."""
        layers = self.total - 2
        if self.first is None or done < 2:
            return None
        layers_done = min(done - 1, layers)
        per_layer = (elapsed - self.first) / layers_done if layers_done else 0.0
        return (layers - layers_done) * per_layer + (self.first if done < self.total else 0.0)

    def show(self, done: int, label: str) -> None:
        elapsed = time.perf_counter() - self.start
        if done >= 1 and self.first is None:
            self.first = elapsed
        if not self.enabled:
            return
        width = 30
        fill = width * done // max(self.total, 1)
        left = self.estimate(done, elapsed)
        eta = "" if left is None else f"  left ~{clock(left)}"
        sys.stderr.write(f"\r[{label}] {'#' * fill}{'.' * (width - fill)} {done}/{self.total}  "
                         f"elapsed {clock(elapsed)}{eta}   ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


# ---------------------------------------------------------------------------- the pipeline

@dataclass
class QuantizeSummary:
    path: str
    recipe: str
    method: str
    calibration: str
    bits_per_weight: float      # stored bits / stored values, whole file's tensors
    file_bytes: int
    seconds: float
    tensor_types: dict[str, str]
    fallbacks: list[str]

    def text(self) -> str:
        lines = [f"wrote {self.path}: {self.file_bytes / 1e6:.1f} MB, {self.bits_per_weight:.3f} bits per "
                 f"weight, recipe {self.recipe}, method {self.method}, {self.seconds:.1f} s",
                 f"calibration: {self.calibration}"]
        lines += [f"fallback: {f}" for f in self.fallbacks]
        return "\n".join(lines)


class _Quantizer:
    def __init__(self, ckpt: Checkpoint, recipe: Recipe, method: Method, threads: int, opts: Options):
        self.ckpt, self.cfg, self.recipe, self.method = ckpt, ckpt.config, recipe, method
        self.types = recipe.tensor_types(self.cfg)
        self.specs = {s.name: s for s in tensor_specs(self.cfg)}
        self.threads = max(1, threads)
        self.pool = ThreadPoolExecutor(self.threads)
        self.opts = opts
        # The float target only with sequential calibration: in parallel mode attn_output's inputs
        # (say) are computed with the float attn_qkv, so attn_qkv and attn_output would each
        # compensate the same upstream error and together over-correct it.
        self.float_target = method.needs_hessian and opts.float_target and opts.sequential is not False
        self.sequential = self.float_target if opts.sequential is None else opts.sequential
        self.calib_rows = 0  # N * L of the calibration (set by _stream)
        self.times = opts.profile  # part -> seconds (wall), or None
        # the calibration's products: bfloat16 where the CPU runs it natively (calib_matmul)
        self.bf16 = method.needs_calibration and opts.bf16_calibration
        self.products = self.matmul()  # for the float target's D (it keeps no weights)

    def matmul(self) -> Bf16Matmul | None:
        """New calibration products (bfloat16 where native, `calib_matmul`; None: numpy float32) for
        one pass over a layer: the bfloat16 copies of the weights it converts go with it."""
        return calibration_matmul() if self.bf16 else None

    def profile(self, part: str) -> contextlib.AbstractContextManager[None]:
        """Adds the wall time of the block to `Options.profile[part]` (when profiling)."""
        return timed(self.times, part)

    def new_stats(self, i: int, lin: str, rows: int | None = None) -> LinearStats:
        """Empty statistics for layer i's linear `lin` (rows: calibration rows, for AWQ's sampling
        stride; default the calibration's N * L)."""
        name = f"blk.{i}.{lin}.weight"
        rows = self.calib_rows if rows is None else rows
        stride = max(1, rows // AWQ_SAMPLE_ROWS) if self.method.awq else 0
        return LinearStats(self.specs[name].shape[1], self.method.needs_hessian,
                           stride if lin in AWQ_FOLDS else 0, self.products and self.products.cross, self.threads)

    def collect(self, i: int, weights: Mapping[str, np.ndarray], h: np.ndarray,
                linears: tuple[str, ...] = LAYER_LINEARS, floats: Mapping[str, np.ndarray] | None = None,
                hf: np.ndarray | None = None) -> dict[str, LinearStats]:
        """Statistics of the inputs of layer i's `linears`, h [N, L, D] from the quantized prefix;
        with the float layer `floats` and the float model's hidden states hf [N, L, D], paired with
        the same inputs in the float model (GPTQ's float target)."""
        p = f"blk.{i}."
        stats = {p + f"{lin}.weight": self.new_stats(i, lin, h.shape[0] * h.shape[1]) for lin in linears}
        names = set(stats)
        quantized = layer_inputs(self.cfg, i, weights, h, names, self.matmul())
        floats_in = repeat(None) if hf is None else layer_inputs(self.cfg, i, floats, hf, names, self.matmul())
        while True:  # one calibration sequence at a time
            with self.profile("forward"):
                xs = next(quantized, None)
                xfs = None if xs is None else next(floats_in)
            if xs is None:
                return stats
            with self.profile("hessian"):
                for name, x in xs.items():
                    stats[name].add(x, None if xfs is None else xfs[name])

    def apply_awq(self, i: int, weights: dict[str, np.ndarray], stats: dict[str, LinearStats]) -> None:
        """Search AWQ scales for attn_qkv and ffn_up and fold them into the norms (in place)."""
        p = f"blk.{i}."
        for lin, norm_name in AWQ_FOLDS.items():
            name = p + f"{lin}.weight"
            if name not in stats:
                continue
            st, gtype = stats[name], self.types[name]
            if st.dead or gtype in PLAIN:
                continue
            # the rounding that follows, in the search loop (GPTQ through its imatrix proxy: 20x cheaper)
            loop = (rtn_rounding(gtype) if self.method.rounding == "rtn"
                    else imatrix_rounding(gtype, st.importance))
            s, _ = awq_search(weights[name], st.sample_rows(), gtype, self.opts.awq_grid,
                              mean_abs=st.mean_abs, max_rows=AWQ_MAX_ROWS, rounding=loop, name=name)
            s = s.astype(np.float32)
            weights[name] = weights[name] * s[None, :]
            weights[p + f"{norm_name}.weight"] = weights[p + f"{norm_name}.weight"] / s
            if p + f"{norm_name}.bias" in weights:  # LayerNorm: its output w * x_hat + b is what s divides
                weights[p + f"{norm_name}.bias"] = weights[p + f"{norm_name}.bias"] / s
            st.scale_inputs(s)

    def quantize_many(self, items: list[tuple[str, np.ndarray, LinearStats | None, str]]
                      ) -> dict[str, np.ndarray]:
        """name -> GGUF bytes for several tensors at once (thread pool; threads left over, e.g. all
        of them for the one tensor of sequential calibration, go to GPTQ's row chunks)."""
        workers = max(1, self.threads // len(items))
        product = self.products and self.products.product
        futures = {name: self.pool.submit(round_tensor, name, w, self.types[name], rounding, st, self.opts,
                                          workers, product)
                   for name, w, st, rounding in items}
        pending = set(futures.values())
        while pending:  # short waits: Ctrl-C may land on a worker thread; the main thread must see it
            _, pending = wait(pending, timeout=0.2)
        return {name: f.result() for name, f in futures.items()}

    def close(self, interrupted: bool = False) -> None:
        """Stop the pool; after an error or Ctrl-C do not wait for tensors still being quantized."""
        self.pool.shutdown(wait=not interrupted, cancel_futures=True)


def _embedding_rounding(method: Method) -> str:
    return "rtn" if method.rounding == "rtn" and not method.awq else "mse"


EMBEDDING_RESIDUAL = 0.01  # weight of the residual path in embedding_hessian (mean diag of the rest: 1)
EMBEDDING_READERS = (("attn_norm", "attn_qkv"), ("ffn_norm", "ffn_up"))  # layer 0's reads of the stream


def embedding_hessian(tensor: Callable[[str], np.ndarray], hidden: int,
                      residual: float = EMBEDDING_RESIDUAL, head_xtx: np.ndarray | None = None) -> np.ndarray:
    """[D, D] float64: GPTQ's Hessian for the token embedding [V, D] (tensor: GGUF name -> float32).

    A row error e [D] enters the residual stream, which layer 0 reads through RMSNorm (weight g)
    into attn_qkv (W [out, D]) and, with the attention output added, into ffn_up. To first order
    the error of those reads is W diag(g) e / rms(row): a linear layer with input e, so
    GPTQ's objective for row e is e^T H e with H = diag(g) W^T W diag(g) summed over both readers.
    The per-row factor 1/rms(row)^2 does not change a row's optimum (rows are quantized
    independently), so it is left out. Each reader's part is normalised to mean diagonal 1, so
    that qkv and gate_up count equally whatever their row counts; `residual` * I stands for the
    path around the norm (the residual stream itself, read again by every later layer) and keeps
    a channel that layer 0 never reads (g == 0) from being zeroed as a dead GPTQ input.
    Later layers' reads are left out on purpose: measured on the built-in model they dilute H
    (KLD 0.00230 with all layers vs 0.00194 with layer 0 alone, q4_0 without the float target).

    Tied embeddings (token_embd is also the output head): head_xtx [D, D] = X^T X of the head's
    inputs, the calibration's final normed states X [n, D]. Row v's error e changes logit v by x.e,
    so the head role is one more reader with Hessian X^T X (the head's own GPTQ Hessian), normalised
    like the others: H = (qkv + gate_up + head) / 3 + residual I."""
    grams = []
    for norm_name, lin in EMBEDDING_READERS:
        a = tensor(f"blk.0.{lin}.weight") * tensor(f"blk.0.{norm_name}.weight")[None, :]  # [out, D] float32
        grams.append((a.T @ a).astype(np.float64))  # float32 BLAS: a weighting, not a solve
    if head_xtx is not None:
        if head_xtx.shape != (hidden, hidden):
            raise PocketLMError(f"head statistics of shape {head_xtx.shape} do not match hidden size {hidden}")
        grams.append(np.asarray(head_xtx, np.float64))
    h = np.zeros((hidden, hidden), np.float64)
    for gram in grams:
        trace = float(np.trace(gram))
        if np.isfinite(trace) and trace > 0:
            h += gram * (hidden / trace)
    return h / len(grams) + residual * np.eye(hidden)


def _embedding_gptq(q: _Quantizer) -> bool:
    return q.method.needs_hessian and q.opts.embedding_gptq and q.types["token_embd.weight"] not in PLAIN


def _quantize_embedding(q: _Quantizer, emb: np.ndarray, head_xtx: np.ndarray | None = None) -> np.ndarray:
    """token_embd [V, D] -> GGUF bytes: GPTQ with `embedding_hessian` (head_xtx: the tied head's
    input statistics) for gptq methods, else rtn/mse."""
    name, gtype = "token_embd.weight", q.types["token_embd.weight"]
    if not _embedding_gptq(q):
        return q.quantize_many([(name, emb, None, _embedding_rounding(q.method))])[name]
    try:
        hess = embedding_hessian(q.ckpt.tensor, q.cfg.hidden_size, head_xtx=head_xtx)
        return gptq_quantize(emb, gtype, hess, act_order=q.opts.act_order, percdamp=q.opts.percdamp,
                             workers=q.threads, name=name, times=q.times)
    except (np.linalg.LinAlgError, FloatingPointError) as e:
        q.opts.fallbacks.append(f"{name}: GPTQ failed ({e}), used mse")
        return search_quantize(emb, gtype, None, name)


def quantize_checkpoint(ckpt_dir: str | os.PathLike, out_path: str | os.PathLike, recipe: str = "q4_0",
                        method: str = "rtn", calib: str | os.PathLike | None = None,
                        calib_samples: int = DEFAULT_SAMPLES, calib_len: int = DEFAULT_LENGTH,
                        calib_tokens: np.ndarray | None = None, threads: int = 1,
                        progress: bool = False, name: str | None = None,
                        options: Options | None = None) -> QuantizeSummary:
    """Quantize the checkpoint folder `ckpt_dir` into the GGUF file `out_path`.

    recipe: one of `recipes.RECIPES`; method: one of `METHODS`. Calibrated methods read text from
    `calib` (file or folder; None: the corpus calib split), `calib_samples` x `calib_len` tokens, or
    take `calib_tokens` [N, L] directly. Returns a `QuantizeSummary`."""
    from pocketlm.export.gguf_export import phi3_gguf_metadata
    from pocketlm.export.gguf_writer import GGUFWriter
    from pocketlm.tokenizer import tokenizer_from_dir

    t0 = time.perf_counter()
    rec, meth = get_recipe(recipe), parse_method(method)
    ckpt = Checkpoint.open(ckpt_dir)
    cfg = ckpt.config
    if ckpt.tokenizer_dir is None:
        raise PocketLMError("no tokenizer.json or *.tiktoken: a GGUF file must carry the vocabulary", ckpt.path)
    tokenizer = tokenizer_from_dir(ckpt.tokenizer_dir)
    calibration = _calibration(meth, tokenizer, cfg, calib, calib_samples, calib_len, calib_tokens)
    calib_text = calibration.summary() if calibration is not None else "none"
    q = _Quantizer(ckpt, rec, meth, threads, Options() if options is None else options)
    metadata = phi3_gguf_metadata(
        cfg, tokenizer.to_gguf_fields(), name=name or Path(ckpt.path).resolve().name,
        file_type=rec.file_type, recipe=rec.name, method=meth.name,
        extra={"pocketlm.calibration": calib_text}, source=str(ckpt.path))
    declared = [(s.name, q.types[s.name], s.shape) for s in q.specs.values()]
    bar = Progress(cfg.num_hidden_layers + 2, progress)
    try:
        with GGUFWriter(out_path, metadata, declared) as writer:  # an exception removes the temp file
            _stream(q, writer, calibration, bar)
    except BaseException:
        q.close(interrupted=True)
        raise
    finally:
        bar.close()
    q.close()
    types = {n: t.name for n, t in q.types.items()}
    nbytes = sum(tensor_bytes(q.types[s.name], s.shape) for s in q.specs.values())
    values = sum(int(np.prod(s.shape)) for s in q.specs.values())
    return QuantizeSummary(os.fspath(out_path), rec.name, meth.name, calib_text, nbytes * 8 / values,
                           os.path.getsize(out_path), time.perf_counter() - t0, types,
                           list(q.opts.fallbacks))


def _calibration(meth: Method, tokenizer, cfg: Phi3Config, calib, samples: int, length: int,
                 tokens: np.ndarray | None) -> Calibration | None:
    if not meth.needs_calibration:
        return None
    if tokens is not None:
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.ndim != 2 or tokens.size == 0:
            raise PocketLMError(f"calibration tokens must be a non-empty [N, L] array, got {tokens.shape}")
        cal = Calibration(tokens, "tokens")
    else:
        cal = load_calibration(tokenizer, calib, samples, length)
    if cal.length > cfg.max_position_embeddings:
        raise PocketLMError(f"calibration length {cal.length} exceeds the model's context "
                            f"{cfg.max_position_embeddings}")
    if cal.tokens.min() < 0 or cal.tokens.max() >= cfg.vocab_size:
        raise PocketLMError(f"calibration token ids fall outside the vocabulary [0, {cfg.vocab_size})")
    return cal


def _stream(q: _Quantizer, writer, calibration: Calibration | None, bar: Progress) -> None:
    ckpt, cfg = q.ckpt, q.cfg
    done = 0
    bar.show(done, "embedding")
    # globals that are not linear layers: token embedding, LongRoPE factors
    emb_name = "token_embd.weight"
    emb = ckpt.tensor(emb_name)
    h = hf = None
    scale = np.float32(cfg.embedding_multiplier)
    if calibration is not None:
        q.calib_rows = calibration.samples * calibration.length
    if calibration is not None and cfg.tie_word_embeddings and _embedding_gptq(q):
        # tied: GPTQ's embedding Hessian needs the head's inputs, known after the last layer
        # (_quantize_head quantizes and writes it); the calibration starts from the float rows
        h = emb[calibration.tokens] * scale
        hf = h.copy() if q.float_target else None
    else:
        emb_raw = _quantize_embedding(q, emb)
        writer.write_tensor(emb_name, _finite(emb_name, emb_raw, q.types[emb_name], emb.shape))
        if calibration is not None:
            emb_q = checked_dequantize(emb_name, emb_raw, q.types[emb_name], emb.shape)
            h = emb_q[calibration.tokens] * scale  # [N, L, D] through the quantized embedding
            if q.float_target:
                hf = emb[calibration.tokens] * scale  # [N, L, D] the float model's hidden states
            del emb_q
        del emb_raw
    del emb
    for rope in ("rope_factors_long.weight", "rope_factors_short.weight"):
        if rope in q.specs:
            writer.write_tensor(rope, ckpt.tensor(rope))
    done += 1
    states = [h, hf]  # advanced layer by layer in place, so that a layer can drop what it has used
    del h, hf
    for i in range(cfg.num_hidden_layers):
        bar.show(done, f"layer {i + 1}/{cfg.num_hidden_layers}")
        _quantize_layer(q, writer, i, states)  # (releases the mapped pages of what it read)
        done += 1
    bar.show(done, "output")
    _quantize_head(q, writer, *states)
    done += 1
    bar.show(done, "done")


def _quantize_layer(q: _Quantizer, writer, i: int, states: list[np.ndarray | None]) -> None:
    """Quantize and write layer i; advance states = [h, hf], the calibration hidden states of the
    quantized model and of the float model (None without the float target, which implies
    sequential calibration), through it in place."""
    p = f"blk.{i}."
    names = [n for n in q.specs if n.startswith(p)]
    with q.profile("read"):
        weights = {n: q.ckpt.tensor(n) for n in names}  # this layer only, float32 copies
        q.ckpt.release()  # (the mapped pages they came from)
    if states[0] is not None and q.sequential:
        raws = _sequential_linears(q, i, weights, states)
        with q.profile("write"):
            for n in names:
                raw = raws.pop(n) if n in raws else quantize(weights[n], q.types[n], n)
                writer.write_tensor(n, _finite(n, raw, q.types[n], q.specs[n].shape))
        return
    h, hf = states
    # (no float target in parallel mode)
    hf_next = None if hf is None else run_layer(q.cfg, i, weights, hf, matmul=q.matmul())
    stats: dict[str, LinearStats] = {}
    if h is not None:
        stats = q.collect(i, weights, h)
        if q.method.awq:
            q.apply_awq(i, weights, stats)
    items = [(p + f"{lin}.weight", weights[p + f"{lin}.weight"], stats.get(p + f"{lin}.weight"),
              q.method.rounding) for lin in LAYER_LINEARS]
    raws = q.quantize_many(items)
    del stats, items
    deq: dict[str, np.ndarray] = {}
    with q.profile("write"):
        for n in names:
            raw = raws.pop(n) if n in raws else quantize(weights[n], q.types[n], n)
            deq[n] = checked_dequantize(n, raw, q.types[n], q.specs[n].shape)
            writer.write_tensor(n, raw)
            weights.pop(n, None)  # float and dequantized copies of the layer do not pile up
            del raw
    if h is not None:
        with q.profile("forward"):
            h = run_layer(q.cfg, i, deq, h, matmul=q.matmul())
    states[:] = [h, hf_next]


class _LayerStages:
    """Layer i's calibration states for sequential calibration, through the weights as they are
    when asked (`weights` is read at call time: a linear replaced by its dequantized values takes
    effect in the next stage). Each half of the layer (Phi3Reference.attention_mix + residual,
    ffn_mix + residual) ends in a linear whose input does not depend on its own weights: that
    input (attn_output's, ffn_down's) is kept when its statistics are collected, so the half's
    output later costs that one product. The layer's products over the calibration: qkv + o + up
    + down once, as a single forward pass, where recomputing each linear's prefix cost
    qkv + (qkv, o) + up + (up, down): 1.7x the layer. `matmul`: the reference's products
    (calib_matmul), whose `stored` form keeps the inputs (bfloat16: half the bytes)."""

    def __init__(self, cfg: Phi3Config, i: int, weights: Mapping[str, np.ndarray], h: np.ndarray,
                 matmul: Bf16Matmul | None = None):
        self.ref, self.i, self.h = Phi3Reference(cfg, weights, matmul), i, h  # h [N, L, D]
        self.matmul = matmul
        self.keep = (lambda x: x) if matmul is None else matmul.stored
        self.positions = np.arange(h.shape[1])
        self.long_rope = uses_long_factors(cfg, h.shape[1])
        self.h2: np.ndarray | None = None  # [N, L, D] after the attention half (quantized qkv and o)
        self.halves = _halves(self.ref, i, h[0, :1])
        self.kept: list = []  # per sequence, the input of the current half's last linear

    def _mix(self, second: bool, seq: np.ndarray, tap: Callable[[str, np.ndarray], None] | None) -> np.ndarray:
        if second:
            return self.ref.ffn_mix(self.i, seq, tap)
        return self.ref.attention_mix(self.i, seq, self.positions, None, self.long_rope, tap)

    def _finish(self, second: bool) -> np.ndarray:
        """The half's output from its kept inputs: h2 (after the first half) or the layer's output."""
        last, start = self.halves[second][-1], (self.h2 if second else self.h)
        if len(self.kept) != start.shape[0]:
            raise PocketLMError(f"internal error: layer {self.i}'s {last} inputs were not all collected")
        out = np.stack([self.ref.residual(last[: -len(".weight")], seq, x) for seq, x in zip(start, self.kept,
                                                                                              strict=True)])
        self.kept = []
        if not second:
            self.h = None  # the layer's input is not needed any more
        return out

    def inputs(self, name: str) -> Iterator[np.ndarray]:
        """The input [L, in] of linear `name`, sequence after sequence. The first call for a linear of
        the second half fixes h2 (the first half must be final)."""
        seen: list[np.ndarray] = []

        def tap(n: str, x: np.ndarray) -> None:
            if n == name:
                seen.append(x)
                raise _InputsSeen

        second = name in self.halves[1]
        if second and self.h2 is None:
            self.h2 = self._finish(False)
        last = name == self.halves[second][-1]
        for seq in (self.h2 if second else self.h):
            if last:  # the whole mix is this linear's input
                x = self._mix(second, seq, None)
                self.kept.append(self.keep(x))
                yield x
                continue
            seen.clear()
            with contextlib.suppress(_InputsSeen):
                self._mix(second, seq, tap)
            if not seen:
                raise PocketLMError(f"internal error: layer {self.i} never reads {name}")
            yield seen[0]

    def release(self, name: str) -> list[str]:
        """After the inputs of linear `name` are collected: the linears no later stage reads (the
        first half's once the second has started; a half's earlier ones once its last is kept),
        with this object's own copies of them dropped."""
        second = name in self.halves[1]
        half = self.halves[second]
        done = (list(self.halves[0]) if second else []) + (half[:-1] if name == half[-1] else [])
        done = [n for n in done if n != name]
        if self.matmul is not None:
            self.matmul.forget(done)
        return done

    def output(self) -> np.ndarray:
        """The layer's output [N, L, D] through the weights as they are now."""
        if self.h2 is None:
            self.h2 = self._finish(False)
        return self._finish(True)


def _halves(ref: Phi3Reference, i: int, probe: np.ndarray) -> tuple[list[str], list[str]]:
    """(linears of the attention half, of the ffn half) of layer i in the order they run, read off
    one token probe [1, D]; each half's last is the residual linear (attn_output, ffn_down)."""
    first: list[str] = []
    second: list[str] = []
    h2 = ref.attention_block(i, probe, np.arange(1), None, False, lambda n, x: first.append(n))
    ref.ffn_block(i, h2, lambda n, x: second.append(n))
    return first, second


def _float_layer(cfg: Phi3Config, i: int, weights: Mapping[str, np.ndarray], hf: np.ndarray, names: list[str],
                 matmul: Matmul | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One pass of the float model's states hf [N, L, D] through the float layer i: (name -> that
    linear's inputs [N, L, in] float32 for the float target's pairing, the layer's output [N, L, D])."""
    ref = Phi3Reference(cfg, weights, matmul)
    positions = np.arange(hf.shape[1])
    long_rope = uses_long_factors(cfg, hf.shape[1])
    inputs: dict[str, np.ndarray] = {}
    out = np.empty_like(hf)
    for s, seq in enumerate(hf):
        def tap(name: str, x: np.ndarray, s: int = s) -> None:
            if name in names:
                if name not in inputs:
                    inputs[name] = np.empty((hf.shape[0], *x.shape), np.float32)
                inputs[name][s] = x
        out[s] = ref.layer(i, seq, positions, None, long_rope, tap)
    return inputs, out


def _sequential_linears(q: _Quantizer, i: int, weights: dict[str, np.ndarray], states: list[np.ndarray | None]
                        ) -> dict[str, np.ndarray]:
    """Quantize layer i's linears one after the other, each calibrated on inputs that already went
    through the quantized ones before it (GPTQ's "true sequential"); states = [h, hf]: h [N, L, D]
    the quantized model's hidden states, hf the float model's or None; with hf each linear also gets
    the same inputs in the float layer (the float target). Returns name -> GGUF bytes; states
    become the layer's outputs (each input state is dropped once used). The float layer runs once,
    keeping its linears' inputs (freed stage by stage); the quantized one in `_LayerStages`.
    `weights` ends up holding only the (possibly AWQ-folded) norms and biases: a linear's float
    copy is dropped once it is quantized."""
    linears = [f"blk.{i}.{lin}.weight" for lin in LAYER_LINEARS]
    float_inputs: dict[str, np.ndarray] = {}
    h, hf = states
    states[:] = [None, None]
    hf_next = None
    if hf is not None:
        with q.profile("forward"):
            float_inputs, hf_next = _float_layer(q.cfg, i, weights, hf, linears, q.matmul())
        del hf
    current = dict(weights)  # float32, linears replaced by dequantized weights as they are quantized
    n_seq = h.shape[0]
    stages = _LayerStages(q.cfg, i, current, h, q.matmul())
    del h  # (the stages drop it once the first half's output is known)
    raws: dict[str, np.ndarray] = {}
    for lin, name in zip(LAYER_LINEARS, linears, strict=True):
        stats = q.new_stats(i, lin)
        xf = float_inputs.pop(name, None)  # [N, L, in] or None
        seqs = stages.inputs(name)
        for s in range(n_seq):
            with q.profile("forward"):
                x = next(seqs)
            with q.profile("hessian"):
                stats.add(x, None if xf is None else xf[s])
        del xf, seqs, x
        if q.method.awq:
            q.apply_awq(i, current, {name: stats})
        for other in stages.release(name):  # e.g. qkv and o once the ffn half starts; before the
            current.pop(other, None)        # largest solve (ffn_down) none is left beside it
        raws[name] = q.quantize_many([(name, current[name], stats, q.method.rounding)])[name]
        del stats  # the Hessians before the next linear's are collected
        weights.pop(name)
        current[name] = checked_dequantize(name, raws[name], q.types[name], current[name].shape)
    with q.profile("forward"):
        states[:] = [stages.output(), hf_next]  # (from the kept ffn_down inputs: needs only the last linear)
    for name, w in current.items():  # the norms and biases (norms possibly AWQ-folded)
        if name not in raws:
            weights[name] = w
    return raws


def _quantize_head(q: _Quantizer, writer, h: np.ndarray | None, hf: np.ndarray | None) -> None:
    cfg = q.cfg
    norms = {n: q.ckpt.tensor(n) for n in ("output_norm.weight", "output_norm.bias") if n in q.specs}
    for n, w in norms.items():
        writer.write_tensor(n, _finite(n, quantize(w, q.types[n], n), q.types[n], w.shape))
    if cfg.tie_word_embeddings:
        if h is not None and _embedding_gptq(q):  # the deferred tied embedding (_stream)
            with q.profile("hessian"):
                st = LinearStats(cfg.hidden_size, True)
                st.add(norm(cfg, h.reshape(-1, h.shape[-1]), norms["output_norm.weight"],
                            norms.get("output_norm.bias")))  # [N*L, D] the head's inputs
                head_xtx = st.hess.xtx
            name = "token_embd.weight"
            emb = q.ckpt.tensor(name)
            raw = _quantize_embedding(q, emb, head_xtx)
            writer.write_tensor(name, _finite(name, raw, q.types[name], emb.shape))
        return
    name = "output.weight"
    w = q.ckpt.tensor(name)
    st = None
    if h is not None:
        st = LinearStats(w.shape[1], q.method.needs_hessian)
        final = [None if x is None else norm(cfg, x.reshape(-1, x.shape[-1]), norms["output_norm.weight"],
                                              norms.get("output_norm.bias"))
                 for x in (h, hf)]  # [N*L, D] final normed states: quantized prefix, float model
        st.add(*final)
    rounding = q.method.rounding if h is not None else _embedding_rounding(q.method)
    raw = q.quantize_many([(name, w, st, rounding)])[name]
    writer.write_tensor(name, _finite(name, raw, q.types[name], w.shape))


def _finite(name: str, raw: np.ndarray, gtype: GGMLType, shape: tuple[int, ...]) -> np.ndarray:
    checked_dequantize(name, raw, gtype, shape)
    return raw
