"""How good are `pocketlm bench`'s phone projections? Leave-one-out over the phone measurements.

    python benchmarks/phone_projection_check.py                    # the shipped published rows
    python benchmarks/phone_projection_check.py phone-run.json ... # plus phone runs (android_demo/)
    python benchmarks/phone_projection_check.py --markdown         # the README table
    python benchmarks/phone_projection_check.py --pocketpal samsung-s23.json poco-myron.json poco-x7-klee.json
        # and the K-quant fallback rule on every K-quant type of PocketPal AI's baseline files
        # (github.com/a-ghorbani/pocketpal-ai, e2e/baselines/benchmark/), not only Q4_K

Every published measurement (pocketlm/phone_measurements.json) is projected from the others, the
three ways the bench projects (pocketlm/phone_calibration.py):
  calibrated:   from the other rows of the same device, engine and quantization family (their median
                achieved bytes/s for decode, ops/s for prefill, divided by the row's bytes / ops per
                token; a K-quant file's ops weighted by its fallback share, rho refitted without the row;
                rows of the same model shape used alone when there are some; prefill from other shapes
                x the shape's effect, refitted without the row);
  cross-family: with the device's rows of that family left out, from its rows of the nearest other
                family x the family ratio of the other devices;
  fallback:     with the whole device left out, from the share of the DRAM peak the other phones reach.
error = projection / published - 1. The bench's error bands are the 90th percentiles printed here.
Target (issue 17): median |error| <= 15 %, none above 35 %. Exit code 0 whether or not it is met:
this is a report, not a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

from pocketlm import phone_calibration as calib
from pocketlm.devices import DEVICES

TARGET_MEDIAN, TARGET_MAX = 0.15, 0.35


def table(summary: dict, markdown: bool) -> list[str]:
    head = ("path", "metric", "n", "median |error|", "90th pct |error| (band)", "max |error|", "median error")
    rows = [(p, m, str(v["n"]), f"{v['median_abs']:.1%}", f"{v['p90_abs']:.1%}", f"{v['max_abs']:.1%}",
             f"{v['median']:+.1%}") for (p, m), v in summary.items()]
    if markdown:   # no "|" inside a Markdown cell
        head = tuple(h.replace("|error|", "abs error") for h in head)
        return ["| " + " | ".join(head) + " |", "| --- | --- |" + " ---: |" * 5,
                *("| " + " | ".join(r) + " |" for r in rows)]
    w = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
    return ["  ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in [head, *rows]]


def verdict_line(summary: dict) -> list[str]:
    out = []
    for key, v in summary.items():
        ok = v["median_abs"] <= TARGET_MEDIAN and v["max_abs"] <= TARGET_MAX
        out.append(f"{key[0]} {key[1]}: target (median <= {TARGET_MEDIAN:.0%}, max <= {TARGET_MAX:.0%}) "
                   f"{'met' if ok else 'NOT met'}")
    return out


def worst(results: list, n: int, markdown: bool) -> list[str]:
    """The n largest errors of each path and metric."""
    out = ["| path | metric | error | device | model | quant | published tok/s | projected tok/s |",
           "| --- | --- | ---: | --- | --- | --- | ---: | ---: |"] if markdown else []
    for path in calib.LOO_PATHS:
        for metric in ("decode", "prefill"):
            xs = sorted((x for x in results if (x.path, x.metric) == (path, metric)), key=lambda x: -abs(x.error))
            for x in xs[:n]:
                r = x.row
                cells = (path, metric, f"{x.error:+.1%}", r.device, r.model, r.quant, f"{r.rate(metric):g}",
                         f"{x.projected:.2f}")
                out.append("| " + " | ".join(cells) + " |" if markdown else
                           f"  {cells[2]:>7}  {path:<12} {metric:<7} {r.device:<12} {r.model:<30} {r.quant:<7} "
                           f"published {cells[6]}, projected {cells[7]} tok/s")
    return out


def fallback_by_memory_type(rows: list) -> list:
    """The fallback path with the phone efficiency fitted only on devices of the same DRAM type
    (LPDDR4X, LPDDR5, LPDDR5X; all devices when no other of its type has rows): the per-class
    alternative, checked the same way (whole device left out)."""
    out = []
    mem = {k: d.memory.split("-")[0].split(",")[0] for k, d in DEVICES.items()}
    for metric in ("decode", "prefill"):
        for r in rows:
            if r.engine != calib.REFERENCE_ENGINE or r.device not in DEVICES or r.achieved(metric) is None:
                continue
            rest = [o for o in rows if o.device != r.device]
            rho = calib.fallback_ratios(rest)
            same = [o for o in rest if mem.get(o.device) == mem[r.device]]
            eff = (calib.phone_efficiency(same, DEVICES, r.family, metric, rho=rho, shape=r.shape)
                   or calib.phone_efficiency(rest, DEVICES, r.family, metric, rho=rho, shape=r.shape))
            if eff is not None:
                p = eff * DEVICES[r.device].bandwidth_gbs * calib.GB / r.scale(metric, rho.get(r.family))
                out.append(calib.LooResult(r, "fallback", metric, p, p / r.rate(metric) - 1))
    return out


def alternatives(rows: list) -> list[str]:
    """The models not taken, each checked leave-one-out like the one taken."""
    by_bytes = [dataclasses.replace(r, n_weight_params=r.bytes_per_token / 2) if r.bytes_per_token else r
                for r in rows]
    no_share = [dataclasses.replace(r, k_fallback_share=0.0) for r in rows]
    no_shape = calib.leave_one_out([dataclasses.replace(r, shape=None) for r in rows], DEVICES)
    shape_decode = calib.leave_one_out(rows, DEVICES, shape_metrics=("decode", "prefill"))
    checks = (
        *((f"{p} prefill, every model of a phone alike (no model shape)", no_shape, (p, "prefill"))
          for p in calib.LOO_PATHS),
        *((f"{p} decode, with the shape effect as for prefill", shape_decode, (p, "decode"))
          for p in calib.LOO_PATHS),
        ("calibrated prefill, scaled by bytes per token instead of weights",
         calib.leave_one_out(by_bytes, DEVICES), ("calibrated", "prefill")),
        ("calibrated prefill, per family only (no K-quant fallback share)",
         calib.leave_one_out(no_share, DEVICES), ("calibrated", "prefill")),
        ("fallback prefill, scaled by the int8 peak instead of the DRAM peak",
         calib.leave_one_out(rows, DEVICES, prefill_peak="int8"), ("fallback", "prefill")),
        ("fallback decode, phone efficiency fitted per DRAM type",
         fallback_by_memory_type(rows), ("fallback", "decode")),
        ("fallback prefill, phone efficiency fitted per DRAM type",
         fallback_by_memory_type(rows), ("fallback", "prefill")),
    )
    out = []
    for name, results, key in checks:
        v = calib.error_summary(results).get(key)
        if v:
            out.append(f"  {name}: median |error| {v['median_abs']:.1%}, 90th pct {v['p90_abs']:.1%}, "
                       f"max {v['max_abs']:.1%}")
    return out


def efficiencies(rows: list) -> list[str]:
    """Each measured phone's share of its DRAM peak (decode, Q4_0): what the fallback has to guess."""
    out = []
    for key in sorted({r.device for r in rows if r.engine == calib.REFERENCE_ENGINE}):
        ref = [r for r in rows if (r.device, r.engine, r.family) == (key, calib.REFERENCE_ENGINE, "Q4_0")]
        rate = calib.achieved_rate(ref, "decode")
        if rate is not None and key in DEVICES:
            d = DEVICES[key]
            out.append(f"  {key:<12} {d.memory:<24} {rate / calib.GB:5.1f} GB/s of {d.bandwidth_gbs:5.1f} "
                       f"({rate / calib.GB / d.bandwidth_gbs:.0%})")
    return out


# PocketPal AI's baseline files name their phones; the profiles (pocketlm/devices.py) they match
POCKETPAL_DEVICES = {"samsung-s23": "galaxy-s23", "poco-myron": "poco-myron", "poco-x7-klee": "poco-x7-pro"}


def pocketpal_prefill_rows(paths: list[str]) -> list:
    """CPU prefill rows of PocketPal baseline files, every quantization type, for the models whose
    shapes the shipped data holds (prefill needs only the weights, not the bytes)."""
    models = json.loads(calib.DATA_PATH.read_text())["models"]
    rows = []
    for path in paths:
        doc = json.loads(Path(path).read_text())
        device = POCKETPAL_DEVICES[doc["device"]]
        for run in doc["runs"]:
            model = models.get(run["model_id"])
            if run["effective_backend"] != "cpu" or run["status"] != "ok" or model is None:
                continue
            quant = run["quant"].upper()
            share = calib.k_fallback_share(model) if calib.is_k_family(calib.quant_family(quant)) else 0.0
            rows.append(calib.Measurement(device, calib.REFERENCE_ENGINE, run["model_id"], quant, path,
                                          prefill_tok_s=run["pp_avg"], n_weight_params=model["n_weight_params"],
                                          k_fallback_share=share))
    return rows


def fallback_rule_check(rows: list) -> list[str]:
    """Each row with a K-quant fallback share projected from its phone's other rows of its type,
    rho refitted without it, with the rule and without (as calibrated prefill in the main check)."""
    out = []
    for family in sorted({r.family for r in rows if r.k_fallback_share}):
        same = [r for r in rows if r.family == family]
        with_rule, without = [], []
        for r in (r for r in same if r.k_fallback_share):
            rest = [o for o in same if o is not r]
            rho = calib.fallback_ratios(rest)
            peers = [o for o in rest if o.device == r.device]
            with_rule.append(calib.achieved_rate(peers, "prefill", rho) / r.scale("prefill", rho.get(family))
                             / r.prefill_tok_s - 1)
            without.append(calib.achieved_rate(peers, "prefill") / r.scale("prefill") / r.prefill_tok_s - 1)
        rho_all = calib.fallback_ratios(same).get(family, float("nan"))
        out.append(f"  {family:<7} rho {rho_all:.2f}, {len(with_rule)} rows: "
                   f"with the rule {', '.join(f'{e:+.0%}' for e in with_rule)} "
                   f"(median |error| {statistics.median(map(abs, with_rule)):.0%}); "
                   f"without {', '.join(f'{e:+.0%}' for e in without)}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("extra", nargs="*", help="more measurement files or `pocketlm bench --json` phone runs")
    ap.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    ap.add_argument("--worst", type=int, default=3, help="list the N largest errors of each path (default 3)")
    ap.add_argument("--pocketpal", nargs="+", default=[], metavar="JSON",
                    help="PocketPal AI baseline files: check the K-quant fallback rule on all their K-quant types")
    args = ap.parse_args()
    rows = calib.load_measurements(args.extra)
    results = calib.leave_one_out(rows, DEVICES)
    summary = calib.error_summary(results)
    devices = sorted({r.device for r in rows})
    print(f"{len(rows)} measurements on {len(devices)} devices ({', '.join(devices)}); "
          f"{sum(r.engine == calib.REFERENCE_ENGINE for r in rows)} of them {calib.REFERENCE_ENGINE}")
    rho = calib.fallback_ratios(rows)
    shares = sorted({(r.model, r.k_fallback_share) for r in rows if r.k_fallback_share})
    print("K-quant fallback: " + (", ".join(f"{m} {s:.0%} of weights" for m, s in shares) or "no row has any")
          + "; rho " + (", ".join(f"{f} {v:.2f}" for f, v in rho.items()) or "not fitted") + "\n")
    print("\n".join(table(summary, args.markdown)))
    print("\n" + "\n".join(verdict_line(summary)))
    phi = [x for x in results if x.row.model in ("phi-3-mini", "phi-3.5-mini", "phi-4-mini")]
    print("\nthe phi-3-mini-sized rows only (phi-3-mini, phi-3.5-mini, phi-4-mini):")
    print("\n".join(table(calib.error_summary(phi), args.markdown)))
    print(f"\nlargest errors of each path (of {len(results)} projections):")
    print("\n".join(worst(results, args.worst, args.markdown)))
    print("\nalternatives not taken:")
    print("\n".join(alternatives(rows)))
    print("\nshare of the DRAM peak each measured phone reaches (llama.cpp, decode, Q4_0):")
    print("\n".join(efficiencies(rows)))
    if args.pocketpal:
        print("\nthe K-quant fallback rule on every K-quant type of the PocketPal files (calibrated prefill):")
        print("\n".join(fallback_rule_check(pocketpal_prefill_rows(args.pocketpal))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
