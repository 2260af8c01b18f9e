"""What int8 activations (MatMulNBits accuracy_level 4) cost in quality, measured against fp32.

    python benchmarks/onnx_level_quality.py [--tokens 8192] [--ctx 256] [--json out.json]

Two models, each quantized by pocketlm (rtn) as Q4_0 and as Q4_K_M and exported to ONNX:
  - builtin: the built-in trained model (pocketlm/builtin);
  - outliers: the same model with activations carrying outlier channels like real Phi-3.5 -- a few
    hidden channels scaled up 20-50x by the RMSNorm weight before every linear layer (and the
    linear's input columns scaled down by the same factor), and a few feed-forward channels scaled up
    by the `up` rows of gate_up_proj (down_proj's columns scaled down). The same function in exact
    arithmetic (the fp32 logits are checked), saved in float32; every MatMulNBits input now holds
    20-50x channels in its int8 blocks.
On the corpus heldout split (chunks of --ctx tokens, BOS first, every chunk from an empty cache):
KL(P_fp32 || P) and top-1 agreement of each export at level 1 and at level 4 against the fp32
checkpoint; KL(P_level1 || P_level4) directly; and what `--accuracy-level auto` decides on the file
(its probe, onnx_accuracy.int8_activation_cost). The Q4_0 -> Q4_K_M KLD step is the scale the
level-4 cost is judged against (onnx_accuracy.MAX_KLD).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BUILTIN = REPO / "pocketlm" / "builtin"


def outlier_checkpoint(src: Path, dst: Path, seed: int = 0, hidden: int = 4, ffn: int = 4) -> dict:
    """Write `src` with outlier activation channels to `dst` (float32); -> what was scaled."""
    from safetensors.numpy import load_file, save_file

    w = {k: v.astype(np.float32) for k, v in load_file(str(src / "model.safetensors")).items()}
    cfg = json.loads((src / "config.json").read_text())
    d, f, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    rng = np.random.default_rng(seed)
    hc = rng.choice(d, hidden, replace=False)
    hs = rng.uniform(20, 50, hidden).astype(np.float32)
    fc = rng.choice(f, ffn, replace=False)
    fs = rng.uniform(20, 50, ffn).astype(np.float32)
    pairs = [(f"model.layers.{i}.input_layernorm.weight", f"model.layers.{i}.self_attn.qkv_proj.weight")
             for i in range(n)]
    pairs += [(f"model.layers.{i}.post_attention_layernorm.weight", f"model.layers.{i}.mlp.gate_up_proj.weight")
              for i in range(n)]
    pairs.append(("model.norm.weight", "lm_head.weight"))
    for norm, linear in pairs:  # RMSNorm output channel c times s, the next linear's input column / s
        w[norm][hc] *= hs
        w[linear][:, hc] /= hs
    for i in range(n):          # up rows times s -> down_proj's input channel times s, its column / s
        w[f"model.layers.{i}.mlp.gate_up_proj.weight"][f + fc] *= fs[:, None]
        w[f"model.layers.{i}.mlp.down_proj.weight"][:, fc] /= fs
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.name != "model.safetensors" and p.is_file():
            shutil.copy(p, dst / p.name)
    cfg["torch_dtype"] = "float32"
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(w, str(dst / "model.safetensors"))
    return {"hidden_channels": hc.tolist(), "hidden_scales": np.round(hs, 1).tolist(),
            "ffn_channels": fc.tolist(), "ffn_scales": np.round(fs, 1).tolist()}


def fp32_logits(ckpt_dir: Path, tokens: np.ndarray) -> np.ndarray:
    """The fp32 reference's logits [C, L, V] (quantize/evaluate's streaming forward)."""
    from pocketlm.checkpoint import Checkpoint
    from pocketlm.quantize.evaluate import head_logits, hidden_states, output_weight

    ref = Checkpoint.open(ckpt_dir)
    x = hidden_states(ref.config, ref.tensor, tokens)
    return head_logits(ref.config, x, output_weight(ref.config, ref.tensor))


def measure(name: str, ckpt: Path, work: Path, tokens: np.ndarray, ref: np.ndarray) -> list[dict]:
    from pocketlm.export.onnx_accuracy import compare_levels, kld_top1, level_logits
    from pocketlm.export.onnx_export import export_onnx
    from pocketlm.quantize.pipeline import quantize_checkpoint

    rows = []
    for recipe in ("q4_0", "q4_k_m"):
        gguf = work / f"{name}-{recipe}.gguf"
        quantize_checkpoint(ckpt, gguf, recipe=recipe, method="rtn")
        folder = work / f"{name}-{recipe}-onnx"
        auto = export_onnx(gguf, folder, accuracy_level="auto", progress=False)
        logits = {lvl: level_logits(folder, "model.onnx", tokens[:, :-1], lvl) for lvl in (1, 4)}
        row = {"model": name, "recipe": recipe, "auto_level": auto.accuracy_level,
               "auto_reason": auto.accuracy_reason}
        for lvl, lg in logits.items():
            kl, agree = kld_top1(ref, lg)
            row[f"kld_l{lvl}"], row[f"top1_l{lvl}"] = float(kl.mean()), float(agree.mean())
            row[f"kld_p99_l{lvl}"] = float(np.percentile(kl, 99))
        cost = compare_levels(logits[1], logits[4])
        row["kld_l1_l4"], row["top1_l1_l4"] = cost.kld, cost.top1
        rows.append(row)
        print(f"{name:9s} {recipe:7s} KLD vs fp32: level 1 {row['kld_l1']:.5f} (top-1 {row['top1_l1']:.4f}), "
              f"level 4 {row['kld_l4']:.5f} (top-1 {row['top1_l4']:.4f}); level 4 vs 1: KL {cost.kld:.5f}, "
              f"top-1 {cost.top1:.4f}; auto -> {auto.accuracy_level}", flush=True)
    return rows


def main() -> int:
    from pocketlm.quantize.evaluate import eval_chunks, eval_text
    from pocketlm.tokenizer import tokenizer_from_dir

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192, help="held-out tokens scored (about)")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    t0 = time.time()
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs", flush=True)
    tok = tokenizer_from_dir(BUILTIN)
    text, where = eval_text(None)
    tokens = eval_chunks(tok, text, where, args.tokens, args.ctx)  # [C, ctx]
    rows, facts = [], {}
    with tempfile.TemporaryDirectory(prefix="onnx-level-quality-") as tmp:
        work = Path(tmp)
        outliers = work / "outliers-ckpt"
        facts["outliers"] = outlier_checkpoint(BUILTIN, outliers)
        ref_plain = fp32_logits(BUILTIN, tokens[:, :-1])
        ref_out = fp32_logits(outliers, tokens[:, :-1])
        same = float(np.abs(ref_out - ref_plain).max() / np.abs(ref_plain).max())
        facts["outlier_model_fp32_rel_diff"] = same
        print(f"outlier model: {facts['outliers']}; its fp32 logits differ from the built-in model's by "
              f"{same:.1e} of the largest (the same function)", flush=True)
        rows += measure("builtin", BUILTIN, work, tokens, ref_plain)
        rows += measure("outliers", outliers, work, tokens, ref_out)
    print(f"\n{tokens.shape[0]} x {tokens.shape[1]} tokens of {where} ({tokens.shape[0] * (tokens.shape[1] - 1)} "
          f"scored), {time.time() - t0:.0f} s\n")
    print("| model | file | KLD level 1 | KLD level 4 | level 4 adds | top-1 L1 / L4 vs fp32 | KL(L1, L4) | "
          "top-1 L1 = L4 | auto |")
    print("| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['model']} | {r['recipe'].upper()} | {r['kld_l1']:.5f} | {r['kld_l4']:.5f} | "
              f"{r['kld_l4'] - r['kld_l1']:+.5f} | {r['top1_l1']:.4f} / {r['top1_l4']:.4f} | {r['kld_l1_l4']:.5f} | "
              f"{r['top1_l1_l4']:.4f} | {r['auto_level']} |")
    for m in ("builtin", "outliers"):
        q4, km = (next(r for r in rows if r["model"] == m and r["recipe"] == x) for x in ("q4_0", "q4_k_m"))
        step = q4["kld_l1"] - km["kld_l1"]
        print(f"{m}: Q4_0 -> Q4_K_M KLD step {step:.5f}; level 4 adds {q4['kld_l4'] - q4['kld_l1']:+.5f} to Q4_0 "
              f"({(q4['kld_l4'] - q4['kld_l1']) / step:.2f} of the step), KL(L1, L4) {q4['kld_l1_l4']:.5f}")
    if args.json:
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps({"rows": rows, **facts}, indent=2))
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
