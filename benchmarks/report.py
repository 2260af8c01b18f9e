"""Regenerate the README's benchmark section from `pocketlm bench --json` results, in one command.

    python benchmarks/report.py benchmarks/results/*.json --readme README.md
    python benchmarks/report.py RESULTS.json... --out benchmarks/results/README_bench.md --link-base .
    python benchmarks/report.py RESULTS.json...                 # print the section

The section sits between `<!-- bench:start -->` and `<!-- bench:end -->` in the README; everything
else in the file is kept byte for byte (written atomically). Results files come in two kinds:
host runs (projections onto the phone profiles) and phone runs (`--device auto` on a phone, from
android_demo/: figures labelled measured). Phone runs are set beside the projection a host run made
for the same SoC and engine, with the error stated (projection / measured - 1), as are the
published phone measurements (REFERENCE.md section 5) that every host run carries.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import tempfile
from pathlib import Path

START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def load(paths: list[str]) -> list[tuple[Path, dict]]:
    out = []
    for p in paths:
        path = Path(p)
        try:
            res = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            sys.exit(f"report: {path}: cannot read results ({e})")
        if not str(res.get("schema", "")).startswith("pocketlm.bench/"):
            sys.exit(f"report: {path}: not a `pocketlm bench --json` file (schema {res.get('schema')!r})")
        out.append((path, res))
    return out


def is_phone_run(res: dict) -> bool:
    return any(r["kind"] == "measured" for r in res["devices"])


def _f(x: float | None, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


def _mark(ok: bool) -> str:
    return "pass" if ok else "**fail**"


def engines_table(res: dict) -> list[str]:
    m, h = res["model"], res["host"]
    rows = ["| engine | prefill tok/s | decode tok/s | first token s | peak RSS MB | anon / file-mapped MB "
            "| MB read per token | achieved GB/s (of host's) | decode, prefill vs pocketlm |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for e in res["engines"]:
        if "error" in e:
            rows.append(f"| {e['name']} | error: {e['error']} | | | | | | | |")
            continue
        r = e.get("ratio_vs_pocketlm")
        ratio = f"{r['decode']:.2f}x, {r['prefill']:.2f}x" if r else "1.00x, 1.00x"
        rows.append(f"| {e['name']} ({e.get('version', '')}) | {e['prefill_tok_s']:.1f} "
                    f"| {e['decode_tok_s']:.2f} | {e['first_token_s']:.2f} | {e['peak_rss_bytes'] / 1e6:.0f} "
                    f"| {e['rss_anon_bytes'] / 1e6:.0f} / {e['rss_file_bytes'] / 1e6:.0f} "
                    f"| {e['bytes_per_token'] / 1e6:.0f} | {e['achieved_bandwidth_gbs']:.1f} "
                    f"({e['bandwidth_efficiency']:.0%}) | {ratio} |")
    load_avg = h.get("load_average") or [None, None]
    rows += ["", f"Host: {h['cpu']} ({h['machine']}), {h['threads']} threads, kernel path "
                 f"`{h['kernel_path']}`; measured read bandwidth {h['read_bandwidth_gbs']:.1f} GB/s; int8 "
                 f"peak estimate {h['int8_peak_gops']:.0f} Gops ({h['int8_peak_basis']}); load average "
                 f"{_f(load_avg[0], '.2f')} at start, {_f(load_avg[1], '.2f')} at end. Model: {m['name']}, "
                 f"{m['file_bytes'] / 1e9:.2f} GB, {m['bits_per_weight']:.2f} bits per weight; prompt "
                 f"{m['prompt_tokens']} tokens, {m['gen_tokens']} decoded, context {m['ctx']}, pocketlm KV "
                 f"cache {m['kv']}."]
    busy = max((x for x in load_avg if x is not None), default=0.0)
    if h.get("cores") and busy > 0.5 * h["cores"]:
        rows += ["", f"**Measured on a busy machine** (load average up to {busy:.1f} on {h['cores']} cores, "
                     "other jobs running): every engine lost speed to them, engines whose threads spin-wait "
                     "(llama.cpp) most; rerun on a quiet machine before quoting these numbers."]
    sweep = next((e.get("decode_vs_context") for e in res["engines"] if e["name"] == "pocketlm"), None)
    if sweep:
        rows += ["", "pocketlm decode speed by context position: " + ", ".join(
            f"{s['context']}: {s['decode_tok_s']:.2f} tok/s" for s in sweep) + "."]
    return rows


def projections_table(res: dict) -> list[str]:
    """One row per device: every engine's projected decode and first-token times, pocketlm's memory,
    failing budgets in bold."""
    b = res["budget"]
    mem = "the app's memory limit" if b["memory_gb"] is None else f"{b['memory_gb']:g} GB"
    rows = [f"Budget: decode >= {b['decode_tok_s']:g} tok/s, first token of a {b['prompt_tokens']}-token "
            f"prompt <= {b['first_token_s']:g} s, memory <= {mem}. **Projections**, not measurements: "
            "published llama.cpp figures on the phone x each engine's speed relative to llama.cpp here "
            "(pocketlm/phone_calibration.py; *fallback*: the phone's DRAM peak x the share of peak measured "
            "phones reach, the weaker estimate), with the leave-one-out error band (+-). A figure that fails "
            "its budget is in bold, one whose band holds the budget is marked (borderline).", ""]
    proj = [r for r in res["devices"] if r["kind"] == "projection"]
    engines = list(dict.fromkeys(r["engine"] for r in proj))
    devices = list(dict.fromkeys(r["device"] for r in proj))
    by = {(r["device"], r["engine"]): r for r in proj}
    rows += ["| device (SoC) | peak GB/s | " + " | ".join(f"decode tok/s {e}" for e in engines) + " | "
             + " | ".join(f"first token s {e}" for e in engines) + " | memory GB / limit (pocketlm) |",
             "| --- | ---: |" + " ---: |" * (2 * len(engines) + 1)]

    def cell(r: dict | None, key: str, fmt: str, budget: str) -> str:
        if r is None:
            return "-"
        text = format(r[key], fmt)
        band = r.get("decode_band" if budget == "decode" else "prefill_band")
        if band is not None and budget != "memory":
            text += f" +-{band:.0%}"
        if (r.get("verdicts") or {}).get(budget) == "borderline":
            return f"{text} (borderline)"
        return text if r["passes"][budget] else f"**{text}**"

    advice = []
    for dev in devices:
        first = next(by[(dev, e)] for e in engines if (dev, e) in by)
        ours = by.get((dev, "pocketlm"))
        decode = [cell(by.get((dev, e)), "decode_tok_s", ".1f", "decode") for e in engines]
        ttft = [cell(by.get((dev, e)), "first_token_s", ".2f", "first_token") for e in engines]
        memory = "-"
        if ours is not None:
            memory = cell(ours, "memory_gb", ".2f", "memory") + f" / {_f(ours['memory_limit_gb'])}"
            advice += [f"- {ours['name']}: {a}" for a in ours["advice"]]
        basis = f" *{first['basis']}*" if first.get("basis") == "fallback" else ""
        rows.append(f"| {first['name']} ({first['soc']}){basis} | {first['bandwidth_gbs']:.1f} | "
                    + " | ".join(decode) + " | " + " | ".join(ttft) + f" | {memory} |")
    if advice:
        rows += ["", "What would pass a failing pocketlm budget (each change re-projected):", "", *advice]
    return rows


def published_table(res: dict) -> list[str]:
    names = {r["device"]: f"{r['name']} ({r['soc']})" for r in res["devices"] if r["device"]}
    rows = ["| device | published measurement | engine projected | projection tok/s "
            "| error (projection / published - 1) |",
            "| --- | --- | --- | ---: | ---: |"]
    for p in res.get("published", []):
        bound = "more than " if p["lower_bound"] else ""
        note = " (vs a lower bound)" if p["lower_bound"] else ""
        rows.append(f"| {names.get(p['device'], p['device'])} | {p['model']}: {bound}"
                    f"{p['decode_tok_s']:g} tok/s ({p['source']}) | {p['engine']} "
                    f"| {p['projected_decode_tok_s']:.1f} | {p['error']:+.0%}{note} |")
    return rows


def measured_table(phone_runs: list[tuple[Path, dict]], host_runs: list[tuple[Path, dict]]) -> list[str]:
    rows = ["| device | engine | measured decode tok/s | measured first token s | projection (host run) "
            "| error (projection / measured - 1) | source |",
            "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for path, res in phone_runs:
        for r in res["devices"]:
            if r["kind"] != "measured":
                continue
            proj = None
            for _, host in host_runs:
                proj = next((x for x in host["devices"] if x["kind"] == "projection"
                             and x["device"] == r["device"] and x["engine"] == r["engine"]), None)
                if proj:
                    break
            ptxt = f"{proj['decode_tok_s']:.1f}" if proj else "no host projection"
            err = f"{proj['decode_tok_s'] / r['decode_tok_s'] - 1:+.0%}" if proj else "-"
            rows.append(f"| {r['name']} ({r['soc']}) | {r['engine']} | {r['decode_tok_s']:.2f} "
                        f"| {r['measured_first_token_s']:.2f} | {ptxt} | {err} | `{path.name}` |")
    return rows


def plot_link(res: dict, results_path: Path, base: Path) -> str | None:
    plot = res.get("plot")
    if not plot:
        return None
    candidates = [Path(plot), results_path.parent / Path(plot).name]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        return None
    return os.path.relpath(found.resolve(), base.resolve())


# A home directory on any machine (the results may come from another one): shown as `~`.
_HOME = re.compile(r"^(/root|/home/[^/]+|/Users/[^/]+)(?=/)")
# The phi-3-mini-shaped random GGUF that benchmarks/make_phi3_mini_gguf.py builds into its cache.
_RANDOM_MINI = re.compile(r"phi3-mini-random-(q4_0|q4_k_m|q8_0)\.gguf$")


def portable_path(arg: str) -> str:
    """A path as any user can type it: a home directory as `~`, a path inside this repository
    relative to its root; anything else unchanged."""
    if not os.path.isabs(arg):
        return arg
    repo = str(Path(__file__).resolve().parents[1])
    if arg == repo or arg.startswith(repo + os.sep):
        return os.path.relpath(arg, repo)
    return _HOME.sub("~", arg)


def portable_command(command: list[str]) -> list[str]:
    """The recorded `pocketlm bench` argv as shell lines any user can run: paths made portable,
    preceded by the command that builds the benchmark model when it is the random phi-3-mini."""
    argv = [portable_path(a) for a in command]
    lines = []
    model = next((a for a in argv[2:] if a.endswith(".gguf")), "")
    built = _RANDOM_MINI.search(model)
    if built:
        lines.append(f"python benchmarks/make_phi3_mini_gguf.py --recipe {built.group(1)}  # builds {model} once")
    lines.append(" ".join(shlex.quote(a) if not a.startswith("~/") else a for a in argv))
    return lines


def section(runs: list[tuple[Path, dict]], base: Path) -> str:
    host_runs = [(p, r) for p, r in runs if not is_phone_run(r)]
    phone_runs = [(p, r) for p, r in runs if is_phone_run(r)]
    names = ", ".join(f"`{os.path.relpath(p.resolve(), base.resolve())}`" for p, _ in runs)
    out = [START, f"<!-- generated by benchmarks/report.py from {names}; edit those, not this -->", ""]
    for path, res in host_runs:
        m, h = res["model"], res["host"]
        out += [f"### {m['name']} on {h['cpu']} ({res['created'][:10]})", "",
                "```sh", *portable_command(res["command"]), "```", "", *engines_table(res), ""]
        link = plot_link(res, path, base)
        if link:
            out += [f"![decode speed vs context, and projected decode speed per device]({link})", ""]
        out += ["#### Phone budget", "", *projections_table(res), ""]
        if res.get("published"):
            out += ["#### Projections beside published phone measurements", "", *published_table(res), "",
                    "The roofline assumes a phone reaches the same share of its DRAM peak as this host does; "
                    "phone CPUs, running on a few big cores, usually reach less, and each engine's own "
                    "overheads on a phone differ from those here, so these errors are the method's, stated "
                    "as measured.", ""]
    if phone_runs:
        out += ["### Measured on phones", "", *measured_table(phone_runs, host_runs), ""]
    out.append(END)
    return "\n".join(out)


def replace_section(text: str, new: str, where: Path) -> str:
    i, j = text.find(START), text.find(END)
    if i < 0 or j < i:
        sys.exit(f"report: {where}: no `{START}` ... `{END}` markers to replace")
    return text[:i] + new + text[j + len(END):]


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)   # mkstemp makes 0600; a report is an ordinary file
    os.replace(tmp, path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", help="`pocketlm bench --json` files (host and phone runs)")
    ap.add_argument("--readme", type=Path, help="README to update between the bench markers")
    ap.add_argument("--out", type=Path, help="write the section (with markers) to this file")
    ap.add_argument("--link-base", type=Path, default=None,
                    help="folder the section's links are relative to (default: the README's or --out's "
                         "folder; the repository root for a section to be pasted into README.md)")
    args = ap.parse_args()
    runs = load(args.results)
    if args.readme:
        new = section(runs, args.link_base or args.readme.parent)
        write_atomic(args.readme, replace_section(args.readme.read_text(), new, args.readme))
        print(f"updated {args.readme}", file=sys.stderr)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.out, section(runs, args.link_base or args.out.parent) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    if not args.readme and not args.out:
        print(section(runs, args.link_base or Path.cwd()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
