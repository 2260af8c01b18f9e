"""Quantization quality: pocketlm's quantizer against llama.cpp's, on the built-in trained models.

    python benchmarks/quant_quality.py [--model mini] [--ckpt pocketlm/builtin] [--tokens 16384] [--ctx 256]
                                       [--methods rtn,mse,imatrix,gptq,awq,awq+gptq] [--json out.json]
    python benchmarks/quant_quality.py --model small [--recipes q4_0,q4_k_m,q8_0,pocket]

`--model small` (pocketlm/builtin_small, Phi-3-small architecture; see quant_quality_small.py):
llama.cpp cannot run the architecture, so there are no llama.cpp rows; our `rtn` rows round as
llama.cpp does (byte-identical, proven on phi-3-mini) and stand for it. Every recipe is run with
every method, chunks are 512 tokens (the sparse layers' pattern matters from 64 tokens on), and
one more row measures the block-sparse pattern itself: the KLD of the fp32 model evaluated with
every layer dense. Target: ours q4_0 (best method) KLD <= 0.5 x ours q4_0 rtn.

`--model mini` (the default):

One table (and a markdown copy for the README) of bits per weight, file size, KL divergence from
the float32 model, perplexity and top-1 agreement on the corpus `heldout` split (calibration
uses the `calib` split; the model was trained on `train`), for:
  - fp16 (our F16 GGUF export);
  - llama.cpp's own quantizer (`llama_cpp.llama_model_quantize` on that F16 GGUF) at Q4_0, Q4_K_M, Q8_0;
  - ours at q4_0 with each method, at q4_k_m with the best q4_0 method, and our `pocket` recipe.
Every file is scored by the same harness (`pocketlm.quantize.evaluate`). The issue's targets are
printed as ratios against llama.cpp:
  ours q4_0 KLD <= 0.5 x llama.cpp Q4_0 and <= llama.cpp Q4_K_M;  ours q4_k_m KLD <= 0.75 x llama.cpp Q4_K_M.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
from pocketlm.export.gguf_reader import GGUFReader  # noqa: E402
from pocketlm.quantize.evaluate import evaluate  # noqa: E402
from pocketlm.quantize.pipeline import Options, quantize_checkpoint  # noqa: E402

LLAMA_FTYPES = ("Q4_0", "Q4_K_M", "Q8_0")
DEFAULT_METHODS = ("rtn", "mse", "imatrix", "gptq", "awq", "awq+gptq")


def file_bpw(path: Path) -> float:
    """Stored bits over stored values of all tensors of a GGUF file (ours and llama.cpp's alike)."""
    with GGUFReader(path) as r:
        infos = list(r)
        return sum(t.nbytes for t in infos) * 8 / sum(t.n_elements for t in infos)


def llama_quantize(src: Path, dst: Path, ftype: str) -> float:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = 2
    t0 = time.perf_counter()
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize {ftype} failed")
    return time.perf_counter() - t0


def run(args: argparse.Namespace) -> list[dict]:
    from pocketlm.export.gguf_export import export_gguf

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    def score(label: str, source: str, path: Path, seconds: float, recipe: str = "",
              method: str = "") -> dict:
        r = evaluate(path, args.ckpt, n_tokens=args.tokens, ctx=args.ctx)
        row = dict(label=label, source=source, recipe=recipe, method=method, bpw=file_bpw(path),
                   mb=path.stat().st_size / 1e6, kld=r.kld, kld_p99=r.kld_p99, ppl=r.ppl_quant,
                   ppl_ref=r.ppl_ref, top1=r.top1, seconds=seconds)
        rows.append(row)
        print(f"{label:28s} bpw {row['bpw']:.3f}  KLD {r.kld:.5f}  PPL {r.ppl_quant:.3f}  top-1 {r.top1:.4f}"
              f"  ({seconds:.1f} s)", flush=True)
        return row

    t0 = time.perf_counter()
    f16 = export_gguf(args.ckpt, work / "f16.gguf", "f16")
    score("fp16", "export", f16, time.perf_counter() - t0, "f16")
    for ftype in LLAMA_FTYPES:
        dst = work / f"llama_{ftype.lower()}.gguf"
        score(f"llama.cpp {ftype}", "llama.cpp", dst, llama_quantize(f16, dst, ftype), ftype.lower())

    opts = Options(act_order=not args.no_act_order, percdamp=args.damp, sequential=args.sequential,
                   float_target=not args.no_float_target,
                   embedding_gptq=not args.no_embedding_gptq)
    calib = dict(calib_samples=args.calib_samples, calib_len=args.calib_len, threads=args.threads,
                 options=opts)

    def ours(recipe: str, method: str) -> dict:
        dst = work / f"ours_{recipe}_{method.replace('+', '_')}.gguf"
        s = quantize_checkpoint(args.ckpt, dst, recipe=recipe, method=method, **calib)
        return score(f"ours {recipe} {method}", "pocketlm", dst, s.seconds, recipe, method)

    q4 = [ours("q4_0", m) for m in args.methods]
    best = min(q4, key=lambda r: r["kld"])["method"]
    ours("q4_k_m", best)
    ours("pocket", args.pocket_method or best)
    return rows


def table(rows: list[dict], kld_digits: int = 5) -> str:
    head = ("| model | bits/weight | size (MB) | KLD vs fp32 | PPL (fp32 {:.3f}) | top-1 agreement |\n"
            "| --- | ---: | ---: | ---: | ---: | ---: |\n").format(rows[0]["ppl_ref"])

    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    body = "".join(f"| {r['label']} | {num(r['bpw'], '.3f')} | {num(r['mb'], '.2f')} | {r['kld']:.{kld_digits}f} | "
                   f"{r['ppl']:.3f} | {r['top1']:.4f} |\n" for r in rows)
    return head + body


def verdicts(rows: list[dict]) -> str:
    by = {r["label"]: r for r in rows}
    l_q40, l_q4km = by["llama.cpp Q4_0"]["kld"], by["llama.cpp Q4_K_M"]["kld"]
    ours = [r for r in rows if r["source"] == "pocketlm"]
    q40 = min((r for r in ours if r["recipe"] == "q4_0"), key=lambda r: r["kld"])
    q4km = next(r for r in ours if r["recipe"] == "q4_k_m")
    pocket = next(r for r in rows if r["recipe"] == "pocket")

    def line(name: str, ratio: float, target: float) -> str:
        return f"{name}: {ratio:.3f} (target <= {target}) {'MET' if ratio <= target else 'NOT MET'}"

    return "\n".join([
        line(f"ours q4_0 ({q40['method']}) KLD / llama.cpp Q4_0 KLD", q40["kld"] / l_q40, 0.5),
        line(f"ours q4_0 ({q40['method']}) KLD / llama.cpp Q4_K_M KLD", q40["kld"] / l_q4km, 1.0),
        line(f"ours q4_k_m ({q4km['method']}) KLD / llama.cpp Q4_K_M KLD", q4km["kld"] / l_q4km, 0.75),
        f"ours pocket ({pocket['method']}): {pocket['bpw']:.3f} bpw, KLD / llama.cpp Q4_K_M KLD "
        f"{pocket['kld'] / l_q4km:.3f}",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("mini", "small"), default="mini",
                    help="mini: pocketlm/builtin (Phi-3); small: pocketlm/builtin_small (Phi-3-small)")
    ap.add_argument("--ckpt", type=Path, default=None, help="default: the --model's built-in folder")
    ap.add_argument("--work", type=Path, default=None, help="default: /tmp/pocketlm_quant_quality[_small]")
    ap.add_argument("--tokens", type=int, default=16384, help="held-out tokens scored")
    ap.add_argument("--ctx", type=int, default=None, help="tokens per evaluated chunk (mini 256, small 512)")
    ap.add_argument("--recipes", type=lambda s: s.split(","), default=None,
                    help="small: recipes, each run with every method (default q4_0,q4_k_m,q8_0,pocket)")
    ap.add_argument("--methods", type=lambda s: s.split(","), default=list(DEFAULT_METHODS))
    ap.add_argument("--pocket-method", default=None, help="method for the pocket recipe (default: best q4_0)")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-len", type=int, default=None, help="mini 256, small 512")
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--no-act-order", action="store_true")
    seq = ap.add_mutually_exclusive_group()
    seq.add_argument("--sequential", dest="sequential", action="store_const", const=True, default=None,
                     help="sequential calibration for every method (default: for gptq only, see Options)")
    seq.add_argument("--no-sequential", dest="sequential", action="store_const", const=False)
    ap.add_argument("--no-float-target", action="store_true", help="gptq: plain GPTQ objective (ablation)")
    ap.add_argument("--no-embedding-gptq", action="store_true", help="gptq: token_embd by mse (ablation)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = ap.parse_args()
    small = args.model == "small"
    args.ckpt = args.ckpt or REPO / "pocketlm" / ("builtin_small" if small else "builtin")
    args.work = args.work or Path("/tmp/pocketlm_quant_quality" + ("_small" if small else ""))
    args.ctx = args.ctx or (512 if small else 256)
    args.calib_len = args.calib_len or (512 if small else 256)
    if small:
        from quant_quality_small import run_small, verdicts_small

        rows = run_small(args, score_file=evaluate, bpw=file_bpw)
        print("\n" + table(rows, kld_digits=7))  # the small model's KLDs are 1e-5..1e-3
        print(verdicts_small(rows))
    else:
        rows = run(args)
        print("\n" + table(rows))
        print(verdicts(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
