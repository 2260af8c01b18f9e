"""Quality of a quantized GGUF against the float32 reference model, on held-out text.

    pocketlm eval MODEL.gguf --ref CKPT_DIR [--text FILE] [--tokens N] [--ctx L] [--json]

The text (default: the corpus `heldout` split; calibration works are refused) is tokenised with the
reference's tokenizer and cut into chunks of `ctx` tokens, each BOS + ctx-1 text tokens, evaluated
independently. At every position but the last the next-token distributions are compared:

  KLD   mean KL(P_ref || P_quant) in nats, as llama.cpp's `perplexity --kl-divergence` reports it
  PPL   exp(mean negative log-likelihood of the actual next token), for both models
  top-1 fraction of positions where both models rank the same token first

The quantized model's logits are the reference forward pass (`pocketlm.reference`) on the GGUF's
dequantized weights (`formats.dequantize`), so any GGUF with pocketlm's block types works, including
files made by llama.cpp's own quantizer; a type pocketlm lacks (Q5_K, IQ4_XS, ...) is named in the
error. Both models are run layer by layer over all chunks: one layer of each in memory at a time.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from pocketlm.checkpoint import Checkpoint
from pocketlm.config import Phi3Config, tensor_specs
from pocketlm.errors import PocketLMError
from pocketlm.layers import norm
from pocketlm.reference import MASKED_LOGIT

from .calibration import encode_enough
from .formats import GGMLType
from .pipeline import run_layer

DEFAULT_TOKENS = 8192
DEFAULT_CTX = 256
TensorSource = Callable[[str], np.ndarray]  # GGUF name -> float32 tensor


@dataclass
class EvalResult:
    model: str
    reference: str
    text: str
    chunks: int
    ctx: int
    scored_tokens: int
    kld: float          # mean KL(ref || quant), nats
    kld_p99: float      # 99th percentile over positions
    ppl_ref: float
    ppl_quant: float
    top1: float         # agreement of the argmax
    recipe: str | None = None
    method: str | None = None

    def text_report(self) -> str:
        return (f"{self.model} vs {self.reference} on {self.text} ({self.chunks} x {self.ctx} tokens, "
                f"{self.scored_tokens} scored)\n"
                f"  KLD     {self.kld:.6f}  (p99 {self.kld_p99:.5f})\n"
                f"  PPL     ref {self.ppl_ref:.4f}   quant {self.ppl_quant:.4f}   "
                f"(+{100 * (self.ppl_quant / self.ppl_ref - 1):.2f} %)\n"
                f"  top-1   {self.top1:.4f}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, allow_nan=False)  # strict JSON: evaluate() refuses NaN


# ---------------------------------------------------------------------------- models as tensor sources

class GGUFModel:
    """A GGUF file's config and dequantized tensors (one at a time).

    llama_cpp_activations=True: the linear layers round their input the way llama.cpp's CPU backend
    does before its dot products (see `LlamaCppLinear`), for logit-exact comparisons with llama.cpp.
    """

    def __init__(self, path: str | os.PathLike, llama_cpp_activations: bool = False):
        self.llama_cpp_activations = llama_cpp_activations
        from pocketlm.export.gguf_reader import GGUFReader

        self.path = os.fspath(path)
        self.reader = GGUFReader(self.path)
        md = self.reader.metadata
        rope = {n: self.reader.dequantize(n) for n in self.reader.tensors if n.startswith("rope_factors_")}
        self.config = Phi3Config.from_gguf_metadata(md, rope, source=self.path)
        if "output.weight" not in self.reader.tensors:  # tied embeddings: token_embd is the head too,
            self.config = replace(self.config, tie_word_embeddings=True)  # as llama.cpp reads the file
        for t in self.reader:
            if t.gtype is None:
                raise PocketLMError(f"tensor {t.name!r} has type {t.type_name}, which pocketlm cannot "
                                    f"dequantize (it reads F32, F16, BF16, Q4_0, Q4_1, Q8_0, Q4_K, Q6_K)",
                                    self.path)
        self.check_tensors()

    def check_tensors(self) -> None:
        """What `pocketlm run` checks before it computes anything: no block with a NaN or infinite
        scale (the kernel's scan), and no NaN or infinite value in a float tensor; a PocketLMError
        naming the tensor otherwise (not a report of KLD nan)."""
        from pocketlm.runtime.kernel import check_tensor

        for t in self.reader:
            raw = self.reader.raw(t.name)
            check_tensor(t.name, raw, int(t.gtype), self.path)
            if t.gtype in (GGMLType.F32, GGMLType.F16, GGMLType.BF16):  # typed views; BF16 as uint16
                flat = self.reader.tensor(t.name).reshape(-1)
                finite = (flat & 0x7F80) != 0x7F80 if t.gtype == GGMLType.BF16 else np.isfinite(flat)
                if not finite.all():
                    bad = int(np.flatnonzero(~finite)[0])
                    raise PocketLMError(f"tensor {t.name!r} is corrupt: value {bad} is NaN or infinite",
                                        self.path)

    def tensor(self, name: str) -> np.ndarray:
        w = self.reader.dequantize(name)
        if self.llama_cpp_activations and w.ndim == 2 and name != "token_embd.weight":
            return LlamaCppLinear(w, self.reader.info(name).gtype)
        return w

    def output(self) -> np.ndarray:
        """The output matrix [V, D]; tied files use token_embd, whose product with the final states
        llama.cpp computes like any other matmul (activations rounded for its type)."""
        name = "token_embd.weight" if self.config.tie_word_embeddings else "output.weight"
        w = self.reader.dequantize(name)
        return LlamaCppLinear(w, self.reader.info(name).gtype) if self.llama_cpp_activations else w

    def close(self) -> None:
        self.reader.close()


def llama_cpp_round_activations(x: np.ndarray, weight_type: GGMLType) -> np.ndarray:
    """x [T, in] as llama.cpp's x86 CPU matmul sees it for weights of `weight_type` (ggml-cpu
    `vec_dot_type`), so that float products with the dequantized weights equal its integer dot
    products up to float rounding:
      F32            as is
      F16/BF16       rounded to fp16
      Q4_0/Q8_0      Q8_0: 32-value blocks, scale fp16(amax/127), codes rint(x * 127/amax) with
                     ties to even (AVX `_mm256_round_ps`; ggml's portable C rounds ties away)
      Q4_1           as Q8_0 (llama.cpp uses Q8_1, whose fp16 block sum adds a small extra error)
      Q4_K/Q6_K      Q8_K: 256-value blocks, float scale max/-127 of the signed largest value,
                     codes nearest(x * -127/max) capped at 127 (`quantize_row_q8_K_ref`)
    """
    if weight_type == GGMLType.F32:
        return x
    if weight_type in (GGMLType.F16, GGMLType.BF16):
        return x.astype(np.float16).astype(np.float32)
    if weight_type in (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0):
        blocks = np.ascontiguousarray(x, np.float32).reshape(-1, 32)
        amax = np.abs(blocks).max(axis=1)
        d = (amax / np.float32(127)).astype(np.float16).astype(np.float32)
        inv = np.zeros_like(amax)
        np.divide(np.float32(127), amax, out=inv, where=amax != 0)
        return (np.rint(blocks * inv[:, None]) * d[:, None]).reshape(x.shape)
    blocks = np.ascontiguousarray(x, np.float32).reshape(-1, 256)
    idx = np.abs(blocks).argmax(axis=1)
    vmax = blocks[np.arange(blocks.shape[0]), idx]
    iscale = np.float32(-127) / np.where(vmax == 0, np.float32(1), vmax)
    q = np.minimum(np.rint(blocks * iscale[:, None]), 127)
    out = q * (np.float32(1) / iscale)[:, None]
    out[vmax == 0] = 0
    return out.reshape(x.shape)


class LlamaCppLinear:
    """A dequantized weight [out, in] for which `x @ w.T` first rounds x as llama.cpp does.

    The reference computes `x @ weight.T`; `__array_ufunc__ = None` makes numpy hand that product
    to `__rmatmul__` of the `.T` object."""

    __array_ufunc__ = None

    def __init__(self, w: np.ndarray, gtype: GGMLType):
        self.w, self.gtype = w, gtype
        self.shape, self.ndim = w.shape, w.ndim

    @property
    def T(self) -> _LlamaCppLinearT:
        return _LlamaCppLinearT(self)


class _LlamaCppLinearT:
    __array_ufunc__ = None

    def __init__(self, linear: LlamaCppLinear):
        self.linear = linear

    def __rmatmul__(self, x: np.ndarray) -> np.ndarray:
        return llama_cpp_round_activations(x, self.linear.gtype) @ self.linear.w.T


def _check_same_model(a: Phi3Config, b: Phi3Config, where: str) -> None:
    fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads")
    diff = [f"{f} {getattr(a, f)} vs {getattr(b, f)}" for f in fields if getattr(a, f) != getattr(b, f)]
    if diff:
        raise PocketLMError(f"the GGUF is not a quantization of the reference checkpoint: {', '.join(diff)}",
                            where)


# ---------------------------------------------------------------------------- forward passes

def hidden_states(cfg: Phi3Config, tensor: TensorSource, tokens: np.ndarray) -> np.ndarray:
    """Final normed hidden states [C, L, D] of token chunks [C, L], streaming one layer at a time."""
    h = tensor("token_embd.weight")[tokens] * np.float32(cfg.embedding_multiplier)  # [C, L, D]
    specs = tensor_specs(cfg)
    for i in range(cfg.num_hidden_layers):
        weights = {s.name: tensor(s.name) for s in specs if s.layer == i}  # LongRoPE factors come from cfg
        h = run_layer(cfg, i, weights, h)
    bias = tensor("output_norm.bias") if cfg.norm == "layer" else None
    return norm(cfg, h, tensor("output_norm.weight"), bias)


def output_weight(cfg: Phi3Config, tensor: TensorSource) -> np.ndarray:
    return tensor("token_embd.weight" if cfg.tie_word_embeddings else "output.weight")  # [V, D]


def head_logits(cfg: Phi3Config, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Logits [..., V] of final normed states x [..., D] under the output matrix w [V, D]: the
    reference's head (logit scale, masked ids)."""
    logits = x @ w.T
    if cfg.logit_scale != 1.0:
        logits *= np.float32(cfg.logit_scale)
    if cfg.masked_token_ids:
        logits[..., list(cfg.masked_token_ids)] = MASKED_LOGIT
    return logits


def gguf_logits(path: str | os.PathLike, tokens: np.ndarray,
                llama_cpp_activations: bool = False) -> np.ndarray:
    """Logits [T, V] of the token sequence [T] (or [C, T, V] of C sequences [C, T]) under the GGUF's
    dequantized weights (optionally with llama.cpp's activation rounding, see
    `llama_cpp_round_activations`)."""
    model = GGUFModel(path, llama_cpp_activations)
    tokens = np.asarray(tokens, np.int64)
    try:
        x = hidden_states(model.config, model.tensor, tokens if tokens.ndim == 2 else tokens[None])
        logits = head_logits(model.config, x, model.output())
        return logits if tokens.ndim == 2 else logits[0]
    finally:
        model.close()


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


# ---------------------------------------------------------------------------- text

def eval_text(text: str | os.PathLike | None) -> tuple[str, str]:
    """(text, description); None -> the corpus heldout split. Calibration works are refused."""
    from pocketlm import corpus

    if text is None:
        return corpus.read_split("heldout"), "corpus:heldout"
    path = Path(text)
    if path.stem in corpus.CALIB_WORKS:
        raise PocketLMError("this is a calibration work of the corpus: never evaluate on calibration text",
                            path)
    try:
        content = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PocketLMError("evaluation text not found", path) from None
    except (OSError, UnicodeDecodeError) as e:
        raise PocketLMError(f"cannot read evaluation text: {e}", path) from None
    if not content.strip():
        raise PocketLMError("evaluation text is empty", path)
    return content, str(path)


def eval_chunks(tokenizer, text: str, where: str, n_tokens: int, ctx: int) -> np.ndarray:
    """[C, ctx] int64: BOS + ctx-1 consecutive text tokens each, about n_tokens scored in all."""
    if ctx < 2:
        raise PocketLMError(f"--ctx must be at least 2, got {ctx}")
    body = ctx - 1
    chunks = max(1, n_tokens // body)
    ids = encode_enough(tokenizer, text, chunks * body)
    if len(ids) < body:
        raise PocketLMError(f"evaluation text has {len(ids)} tokens, fewer than one chunk of {ctx}", where)
    chunks = min(chunks, len(ids) // body)
    arr = np.asarray(ids[: chunks * body], np.int64).reshape(chunks, body)
    bos = tokenizer.bos_id if tokenizer.bos_id is not None else arr[0, 0]
    return np.concatenate([np.full((chunks, 1), bos, np.int64), arr], axis=1)


# ---------------------------------------------------------------------------- the harness

def evaluate(model_path: str | os.PathLike, ref_dir: str | os.PathLike, text: str | os.PathLike | None = None,
             n_tokens: int = DEFAULT_TOKENS, ctx: int = DEFAULT_CTX) -> EvalResult:
    """Compare the GGUF at `model_path` with the float32 checkpoint at `ref_dir` (see module doc)."""
    from pocketlm.tokenizer import tokenizer_from_dir, tokenizer_from_gguf_fields

    ref = Checkpoint.open(ref_dir)
    quant = GGUFModel(model_path)
    try:
        _check_same_model(ref.config, quant.config, quant.path)
        if ctx > ref.config.max_position_embeddings:
            raise PocketLMError(f"--ctx {ctx} exceeds the model's context "
                                f"{ref.config.max_position_embeddings}")
        tok = (tokenizer_from_dir(ref.tokenizer_dir) if ref.tokenizer_dir is not None
               else tokenizer_from_gguf_fields(quant.reader.tokenizer_fields(), quant.path))
        content, where = eval_text(text)
        tokens = eval_chunks(tok, content, where, n_tokens, ctx)
        h_ref = hidden_states(ref.config, ref.tensor, tokens)
        h_q = hidden_states(quant.config, quant.tensor, tokens)
        w_ref = output_weight(ref.config, ref.tensor)
        w_q = quant.output()
        kld, nll_ref, nll_q, agree = [], [], [], []
        for c in range(tokens.shape[0]):
            lp_ref = _log_softmax(head_logits(ref.config, h_ref[c, :-1], w_ref))  # [ctx-1, V]: tokens 1..
            lp_q = _log_softmax(head_logits(quant.config, h_q[c, :-1], w_q))
            target = tokens[c, 1:]
            kld.append((np.exp(lp_ref) * (lp_ref - lp_q)).sum(axis=-1))
            rows = np.arange(target.size)
            nll_ref.append(-lp_ref[rows, target])
            nll_q.append(-lp_q[rows, target])
            agree.append(lp_ref.argmax(-1) == lp_q.argmax(-1))
        kl = np.concatenate(kld)
        md = quant.reader.metadata
        result = EvalResult(
            model=quant.path, reference=str(ref.path), text=where, chunks=int(tokens.shape[0]), ctx=ctx,
            scored_tokens=int(kl.size), kld=float(kl.mean()), kld_p99=float(np.percentile(kl, 99)),
            ppl_ref=float(np.exp(np.concatenate(nll_ref).mean())),
            ppl_quant=float(np.exp(np.concatenate(nll_q).mean())),
            top1=float(np.concatenate(agree).mean()),
            recipe=md.get("pocketlm.recipe"), method=md.get("pocketlm.method"))
    finally:
        quant.close()
    numbers = {"KLD": result.kld, "KLD p99": result.kld_p99, "reference PPL": result.ppl_ref,
               "PPL": result.ppl_quant}
    bad = [k for k, v in numbers.items() if not math.isfinite(v)]
    if bad:  # finite weights can still overflow float32 on some text: say so, never print NaN
        raise PocketLMError(f"{', '.join(bad)} not finite: the model or its reference overflows float32 "
                            f"on this text", quant.path)
    return result
