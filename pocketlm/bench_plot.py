"""`pocketlm bench --plot`: one PNG with decode speed vs context on this host and the projected
decode speed per device against the budget line. matplotlib is optional (the `test` extra): it is
imported only here, with the Agg backend (no display needed)."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import PocketLMError

ENGINE_COLORS = {"pocketlm": "#1f77b4", "llama.cpp": "#ff7f0e", "onnxruntime": "#2ca02c"}


def require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise PocketLMError("--plot needs matplotlib, which is not installed "
                            "(pip install matplotlib, or pocketlm[test])") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_results(res: dict, path: str | os.PathLike) -> None:
    """Left: decode tok/s vs context position (pocketlm's sweep; peers at their measured position).
    Right: projected (and measured) decode tok/s per device and engine, the budget as a line."""
    plt = require_matplotlib()
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [1, 1.6]})
    m, h, budget = res["model"], res["host"], res["budget"]
    position = m["prompt_tokens"] + m["gen_tokens"] / 2
    for e in res["engines"]:
        if "error" in e:
            continue
        color = ENGINE_COLORS.get(e["name"], "gray")
        sweep = e.get("decode_vs_context") or []
        if sweep:
            left.plot([s["context"] for s in sweep], [s["decode_tok_s"] for s in sweep], "o-", color=color,
                      label=f"{e['name']} (sweep)")
        left.plot([position], [e["decode_tok_s"]], "s", color=color, markersize=9,
                  label=f"{e['name']}: {e['decode_tok_s']:.1f} tok/s at prompt {m['prompt_tokens']}")
    left.set_xlabel("context position (tokens in the KV cache)")
    left.set_ylabel("decode tok/s (measured on this host)")
    left.set_title(f"{m['name']}: this host, {h['threads']} threads, KV {m['kv']}", fontsize=10)
    left.set_ylim(bottom=0)
    left.grid(alpha=0.3)
    left.legend(fontsize=8)

    rows = [r for r in res["devices"]]
    devices = list(dict.fromkeys((r["kind"], r["name"]) for r in rows))
    engines = list(dict.fromkeys(r["engine"] for r in rows))
    width = 0.8 / max(1, len(engines))
    bar_x: dict[tuple[str, str], float] = {}   # (device key, engine) of a projection -> its bar's x
    for j, eng in enumerate(engines):
        xs, ys = [], []
        for i, key in enumerate(devices):
            r = next((r for r in rows if (r["kind"], r["name"]) == key and r["engine"] == eng), None)
            if r is not None:
                xs.append(i + (j - (len(engines) - 1) / 2) * width)
                ys.append(r["decode_tok_s"])
                if r["kind"] == "projection":
                    bar_x[(r["device"], eng)] = xs[-1]
        # error bars: the leave-one-out band of each calibrated / fallback projection
        errs: list[list[float]] = [[], []]
        for key in devices:
            r = next((r for r in rows if (r["kind"], r["name"]) == key and r["engine"] == eng), None)
            if r is not None:
                lo, hi = r.get("decode_range_tok_s") or (r["decode_tok_s"], r["decode_tok_s"])
                errs[0].append(r["decode_tok_s"] - lo)
                errs[1].append(hi - r["decode_tok_s"])
        right.bar(xs, ys, width=width, color=ENGINE_COLORS.get(eng, "gray"), label=eng, yerr=errs,
                  error_kw={"elinewidth": 0.8, "capsize": 2})
    right.axhline(budget["decode_tok_s"], color="red", linestyle="--",
                  label=f"budget {budget['decode_tok_s']:g} tok/s")
    stars = [(bar_x[(p["device"], p["engine"])], p["decode_tok_s"]) for p in res.get("published", [])
             if (p["device"], p["engine"]) in bar_x]
    if stars:
        right.plot(*zip(*stars, strict=True), "k*", markersize=12,
                   label="published measurement (same engine and device)")
    right.set_xticks(range(len(devices)))
    right.set_xticklabels([f"{name}\n({'measured' if kind == 'measured' else 'projected'})"
                           for kind, name in devices], fontsize=8, rotation=30, ha="right")
    right.set_ylabel("decode tok/s")
    right.set_title("decode speed per device: projections calibrated on published phone figures "
                    "(bars, leave-one-out error band), budget line",
                    fontsize=10)
    right.grid(axis="y", alpha=0.3)
    right.legend(fontsize=8)
    fig.tight_layout()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, target)
