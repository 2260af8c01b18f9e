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
level-4 cost is judged against (onnx_accuracy.MAX_KLD). Beside them, on the same chunks: the
onnxruntime-genai model builder's int4 output of each checkpoint (`-p int4 -e cpu --extra_options
int4_accuracy_level=4`, run at its level 4 and at 1), pocketlm's runtime and llama.cpp
(llama-cpp-python, a child process) on the Q4_0 file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
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


_LLAMA_LOGITS = """
import sys, numpy as np, llama_cpp
from llama_cpp import llama as L
default = llama_cpp.llama_model_default_params
def params():
    p = default(); p.use_extra_bufts = False; return p   # this build crashes in its AMX/repack path
L.llama_cpp.llama_model_default_params = params
tokens = np.load(sys.argv[2])
llm = llama_cpp.Llama(sys.argv[1], n_ctx=tokens.shape[1], n_batch=tokens.shape[1], n_threads=2, logits_all=True,
                      verbose=False)
out = []
for chunk in tokens:
    llm.reset()
    llm.eval(chunk.tolist())
    out.append(np.array(llm.scores[: len(chunk)], np.float32))
np.save(sys.argv[3], np.stack(out))
"""


def llama_cpp_logits(gguf: Path, tokens: np.ndarray, work: Path) -> np.ndarray:
    """llama.cpp's logits [C, L, V] of every chunk (llama-cpp-python in a child process)."""
    np.save(work / "tokens.npy", tokens)
    subprocess.run([sys.executable, "-P", "-c", _LLAMA_LOGITS, str(gguf), str(work / "tokens.npy"),
                    str(work / "llama.npy")], check=True)
    return np.load(work / "llama.npy")


def pocketlm_logits(gguf: Path, tokens: np.ndarray) -> np.ndarray:
    """pocketlm runtime's logits [C, L, V] (its C kernel: activations rounded to 8 bits)."""
    from pocketlm.runtime.model import load

    model = load(gguf, threads=2, ctx=tokens.shape[1], kv="f32")
    out = []
    for chunk in tokens:
        model.reset()
        out.append(model.forward(chunk.tolist(), all_logits=True))
    return np.stack(out)


def builder_folder(ckpt: Path, out: Path) -> Path:
    """onnxruntime-genai's model builder, int4 at accuracy level 4 (Microsoft's CPU/mobile recipe)."""
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(ckpt), "-o", str(out),
                    "-p", "int4", "-e", "cpu", "-c", str(out) + "-hf", "--extra_options", "int4_accuracy_level=4"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


def others(name: str, ckpt: Path, work: Path, tokens: np.ndarray, ref: np.ndarray) -> list[dict]:
    """KLD vs fp32 of the builder's int4 output (at its level 4 and at 1), and of pocketlm's runtime
    and llama.cpp on the Q4_0 file `measure` wrote."""
    from pocketlm.export.onnx_accuracy import kld_top1, level_logits

    rows = []
    folder = builder_folder(ckpt, work / f"{name}-builder")
    runs = {"builder int4, level 4": lambda: level_logits(folder, "model.onnx", tokens[:, :-1], 4),
            "builder int4, level 1": lambda: level_logits(folder, "model.onnx", tokens[:, :-1], 1)}
    gguf = work / f"{name}-q4_0.gguf"
    runs["pocketlm Q4_0"] = lambda: pocketlm_logits(gguf, tokens[:, :-1])
    runs["llama.cpp Q4_0"] = lambda: llama_cpp_logits(gguf, tokens[:, :-1], work)
    for label, run in runs.items():
        try:
            kl, agree = kld_top1(ref, run())
        except Exception as e:  # a peer that cannot run here is reported, not fatal
            print(f"{name:9s} {label}: failed ({e})", flush=True)
            continue
        rows.append({"model": name, "engine": label, "kld": float(kl.mean()), "top1": float(agree.mean())})
        print(f"{name:9s} {label}: KLD vs fp32 {kl.mean():.5f} (top-1 {agree.mean():.4f})", flush=True)
    return rows


def measure(name: str, ckpt: Path, work: Path, tokens: np.ndarray, ref: np.ndarray) -> list[dict]:
    from pocketlm.export.onnx_accuracy import compare_levels, kld_top1, level_logits, rounding_noise_scales
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
        rounded = level_logits(folder, "model.onnx", tokens[:, :-1], 1,
                               overrides=rounding_noise_scales(folder, "model.onnx"))
        cost = compare_levels(logits[1], logits[4], rounded)
        row["kld_l1_l4"], row["top1_l1_l4"] = cost.kld, float(np.mean(kld_top1(logits[1], logits[4])[1]))
        row["yardstick"], row["ratio"] = cost.rounding_kld, cost.ratio
        rows.append(row)
        print(f"{name:9s} {recipe:7s} KLD vs fp32: level 1 {row['kld_l1']:.5f} (top-1 {row['top1_l1']:.4f}), "
              f"level 4 {row['kld_l4']:.5f} (top-1 {row['top1_l4']:.4f}); level 4 vs 1: KL {cost.kld:.5f}, "
              f"top-1 {row['top1_l1_l4']:.4f}, {cost.ratio:.4f} of the rounding yardstick {cost.rounding_kld:.4f}; "
              f"auto -> {auto.accuracy_level}: {auto.accuracy_reason}", flush=True)
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
        extra = others("builtin", BUILTIN, work, tokens, ref_plain)
        extra += others("outliers", outliers, work, tokens, ref_out)
    print(f"\n{tokens.shape[0]} x {tokens.shape[1]} tokens of {where} ({tokens.shape[0] * (tokens.shape[1] - 1)} "
          f"scored), {time.time() - t0:.0f} s\n")
    print("| model | file | KLD level 1 | KLD level 4 | level 4 adds | top-1 L1 / L4 vs fp32 | KL(L1, L4) | "
          "top-1 L1 = L4 | yardstick | ratio | auto |")
    print("| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['model']} | {r['recipe'].upper()} | {r['kld_l1']:.5f} | {r['kld_l4']:.5f} | "
              f"{r['kld_l4'] - r['kld_l1']:+.5f} | {r['top1_l1']:.4f} / {r['top1_l4']:.4f} | {r['kld_l1_l4']:.5f} | "
              f"{r['top1_l1_l4']:.4f} | {r['yardstick']:.4f} | {r['ratio']:.4f} | {r['auto_level']} |")
    for m in ("builtin", "outliers"):
        q4, km = (next(r for r in rows if r["model"] == m and r["recipe"] == x) for x in ("q4_0", "q4_k_m"))
        step = q4["kld_l1"] - km["kld_l1"]
        print(f"{m}: Q4_0 -> Q4_K_M KLD step {step:.5f}; level 4 adds {q4['kld_l4'] - q4['kld_l1']:+.5f} to Q4_0 "
              f"({(q4['kld_l4'] - q4['kld_l1']) / step:.2f} of the step), KL(L1, L4) {q4['kld_l1_l4']:.5f}")
    print("\n| model | engine | KLD vs fp32 | top-1 |\n| --- | --- | ---: | ---: |")
    for r in extra:
        print(f"| {r['model']} | {r['engine']} | {r['kld']:.5f} | {r['top1']:.4f} |")
    if args.json:
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps({"rows": rows, "engines": extra, **facts}, indent=2))
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
