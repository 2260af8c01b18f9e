"""`quant_quality.py --model small`: quantization quality on the built-in Phi-3-small model.

llama.cpp has no Phi-3-small, so its quantizer is not a peer here; our `rtn` rows round exactly
as llama.cpp's quantizer does (byte-identical, tested on phi-3-mini) and stand for it. Rows:
  - fp16 (our F16 GGUF export of the bf16 checkpoint);
  - ours at every recipe (q4_0, q4_k_m, q8_0, pocket) with every method;
  - "fp32, every layer dense": the fp32 weights with the block-sparse pattern switched off
    (`dataclasses.replace(cfg, block_sparse=None)`), scored against the sparse model on the same
    chunks. It measures how much the pattern matters (it must not be near zero).
Target: ours q4_0 with the best method at most 0.5 x the KLD of ours q4_0 rtn.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from pocketlm.checkpoint import Checkpoint
from pocketlm.quantize.evaluate import eval_chunks, eval_text, head_logits, hidden_states, output_weight
from pocketlm.quantize.pipeline import Options, quantize_checkpoint
from pocketlm.tokenizer import tokenizer_from_dir

DEFAULT_RECIPES = ("q4_0", "q4_k_m", "q8_0", "pocket")
DENSE_LABEL = "fp32, every layer dense (pattern off)"


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def dense_pattern_row(ckpt_dir: Path, n_tokens: int, ctx: int) -> dict:
    """KLD, perplexity and top-1 agreement of the fp32 model run with every layer dense, against
    the same weights with their block-sparse layers, on the held-out chunks the harness scores."""
    ckpt = Checkpoint.open(ckpt_dir)
    cfg = ckpt.config
    if cfg.block_sparse is None:
        raise SystemExit(f"{ckpt_dir} has no block-sparse layers")
    tok = tokenizer_from_dir(ckpt.tokenizer_dir)
    text, where = eval_text(None)
    tokens = eval_chunks(tok, text, where, n_tokens, ctx)                  # [C, ctx]
    dense_cfg = replace(cfg, block_sparse=None)                          # debug switch: all dense
    h_sparse = hidden_states(cfg, ckpt.tensor, tokens)                    # [C, ctx, D]
    h_dense = hidden_states(dense_cfg, ckpt.tensor, tokens)
    w = output_weight(cfg, ckpt.tensor)
    kld, nll_s, nll_d, agree = [], [], [], []
    for c in range(tokens.shape[0]):
        lp_s = _log_softmax(head_logits(cfg, h_sparse[c, :-1], w))       # [ctx-1, V]
        lp_d = _log_softmax(head_logits(cfg, h_dense[c, :-1], w))
        target, rows = tokens[c, 1:], np.arange(ctx - 1)
        kld.append((np.exp(lp_s) * (lp_s - lp_d)).sum(axis=-1))
        nll_s.append(-lp_s[rows, target])
        nll_d.append(-lp_d[rows, target])
        agree.append(lp_s.argmax(-1) == lp_d.argmax(-1))
    kl = np.concatenate(kld)
    return dict(label=DENSE_LABEL, source="ablation", recipe="", method="", bpw=None, mb=None,
                kld=float(kl.mean()), kld_p99=float(np.percentile(kl, 99)),
                ppl=float(np.exp(np.concatenate(nll_d).mean())), ppl_ref=float(np.exp(np.concatenate(nll_s).mean())),
                top1=float(np.concatenate(agree).mean()), seconds=0.0)


def run_small(args: argparse.Namespace, score_file: Callable, bpw: Callable[[Path], float]) -> list[dict]:
    """Every recipe x method on the small model, scored by `score_file` (quantize.evaluate.evaluate)."""
    from pocketlm.export.gguf_export import export_gguf

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    def score(label: str, path: Path, seconds: float, recipe: str, method: str = "") -> None:
        r = score_file(path, args.ckpt, n_tokens=args.tokens, ctx=args.ctx)
        row = dict(label=label, source="pocketlm", recipe=recipe, method=method, bpw=bpw(path),
                   mb=path.stat().st_size / 1e6, kld=r.kld, kld_p99=r.kld_p99, ppl=r.ppl_quant,
                   ppl_ref=r.ppl_ref, top1=r.top1, seconds=seconds)
        rows.append(row)
        print(f"{label:28s} bpw {row['bpw']:.3f}  KLD {r.kld:.5f}  PPL {r.ppl_quant:.3f}  top-1 {r.top1:.4f}"
              f"  ({seconds:.1f} s)", flush=True)

    t0 = time.perf_counter()
    f16 = export_gguf(args.ckpt, work / "f16.gguf", "f16")
    score("fp16", f16, time.perf_counter() - t0, "f16")
    opts = Options(act_order=not args.no_act_order, percdamp=args.damp, sequential=args.sequential,
                   float_target=not args.no_float_target, embedding_gptq=not args.no_embedding_gptq)
    for recipe in args.recipes or DEFAULT_RECIPES:
        for method in args.methods:
            dst = work / f"ours_{recipe}_{method.replace('+', '_')}.gguf"
            s = quantize_checkpoint(args.ckpt, dst, recipe=recipe, method=method, calib_samples=args.calib_samples,
                                    calib_len=args.calib_len, threads=args.threads, options=opts)
            score(f"ours {recipe} {method}", dst, s.seconds, recipe, method)
    row = dense_pattern_row(args.ckpt, args.tokens, args.ctx)
    rows.append(row)
    print(f"{DENSE_LABEL}: KLD {row['kld']:.5f}  PPL {row['ppl']:.3f} (sparse {row['ppl_ref']:.3f})  "
          f"top-1 {row['top1']:.4f}", flush=True)
    return rows


def verdicts_small(rows: list[dict]) -> str:
    ours = [r for r in rows if r["source"] == "pocketlm" and r["method"]]
    lines = []
    for recipe in dict.fromkeys(r["recipe"] for r in ours):
        mine = [r for r in ours if r["recipe"] == recipe]
        rtn = next((r for r in mine if r["method"] == "rtn"), None)
        best = min(mine, key=lambda r: r["kld"])
        if rtn is None or rtn["kld"] == 0:
            continue
        ratio = best["kld"] / rtn["kld"]
        verdict = f" (target <= 0.5) {'MET' if ratio <= 0.5 else 'NOT MET'}" if recipe == "q4_0" else ""
        lines.append(f"ours {recipe} ({best['method']}) KLD / ours {recipe} rtn KLD: {ratio:.3f}{verdict}")
    dense = next((r for r in rows if r["label"] == DENSE_LABEL), None)
    q4_rtn = next((r for r in ours if r["recipe"] == "q4_0" and r["method"] == "rtn"), None)
    if dense is not None:
        line = f"block-sparse pattern off (every layer dense): KLD {dense['kld']:.5f}"
        if q4_rtn is not None:
            line += f" = {dense['kld'] / q4_rtn['kld']:.2f} x ours q4_0 rtn"
        lines.append(line)
    return "\n".join(lines)
