"""`pocketlm bench`, the device projections, budgets and advice, the plot and benchmarks/report.py.

One bench run on a tiny GGUF (hidden 128, 2 layers, the real Phi-3 vocabulary so llama.cpp loads it)
with both peers is shared by the tests below; everything else runs on hand-made numbers.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pocketlm import phone_calibration as calib
from pocketlm.bench import kv_bytes_per_position, model_facts
from pocketlm.cli import main
from pocketlm.devices import (
    DEVICES,
    Budget,
    Efficiency,
    Workload,
    detect_device,
    parse_getprop,
    project,
)
from pocketlm.errors import PocketLMError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gguf_files import phi3_vocab_fields, write_gguf  # noqa: E402


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, data_root) -> Path:
    from pocketlm.config import Phi3Config, tensor_specs
    from pocketlm.quantize.formats import GGMLType

    cfg = Phi3Config(vocab_size=32064, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                     original_max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=10000.0,
                     bos_token_id=1, eos_token_id=32000)
    rng = np.random.default_rng(0)
    w = {s.name: (np.ones(s.shape) if s.kind == "norm" else rng.normal(0, 0.05, s.shape)).astype(np.float32)
         for s in tensor_specs(cfg)}
    path = tmp_path_factory.mktemp("bench") / "tiny-q4_0.gguf"
    return write_gguf(path, cfg, w, GGMLType.Q4_0, phi3_vocab_fields(data_root))


@pytest.fixture(scope="session")
def bench_run(tiny_gguf, tmp_path_factory) -> tuple[dict, Path, str]:
    """(JSON results, plot path, stdout) of one `pocketlm bench --vs llama.cpp,onnxruntime` run."""
    out = tmp_path_factory.mktemp("bench-out")
    cache = tmp_path_factory.mktemp("cache")
    env = {"POCKETLM_BW_BYTES": str(64 << 20), "POCKETLM_CACHE": str(cache)}
    cmd = [sys.executable, "-P", "-m", "pocketlm.cli", "bench", str(tiny_gguf), "--prompt-len", "64", "--gen", "8",
           "--ctx", "1024", "--threads", "2", "--vs", "llama.cpp,onnxruntime", "--json", str(out / "r.json"),
           "--plot", str(out / "r.png")]
    import os
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((out / "r.json").read_text()), out / "r.png", res.stdout + res.stderr


# ---------------------------------------------------------------------------- the bench run

def test_bench_json_schema(bench_run, tiny_gguf):
    res, _, _ = bench_run
    assert res["schema"] == "pocketlm.bench/1"
    for key in ("host", "model", "budget", "engines", "devices", "published", "plot", "created", "command"):
        assert key in res
    h = res["host"]
    assert h["read_bandwidth_gbs"] > 0 and h["int8_peak_gops"] > 0 and h["threads"] == 2
    m = res["model"]
    assert m["file_bytes"] == tiny_gguf.stat().st_size and (m["prompt_tokens"], m["gen_tokens"]) == (64, 8)
    # Q4_0 is 18 bytes per 32 weights (4.5 bpw); the embedding is read one row per token
    assert m["bits_per_weight"] == pytest.approx(4.5)
    assert m["kv_bytes_per_position"] == 2 * 2 * 2 * 32 * 2       # k+v, layers, kv heads, head dim, f16
    names = [e["name"] for e in res["engines"]]
    assert names == ["pocketlm", "llama.cpp", "onnxruntime"]
    for e in res["engines"]:
        assert "error" not in e, e
        for k in ("prefill_tok_s", "decode_tok_s", "first_token_s", "peak_rss_bytes", "rss_anon_bytes",
                  "rss_file_bytes", "bytes_per_token", "achieved_bandwidth_gbs", "bandwidth_efficiency",
                  "compute_efficiency", "version"):
            assert e[k] > 0 if isinstance(e[k], float | int) else e[k], (e["name"], k)
        assert e["achieved_bandwidth_gbs"] == pytest.approx(e["decode_tok_s"] * e["bytes_per_token"] / 1e9)
        assert e["peak_rss_bytes"] >= e["rss_anon_bytes"]
    ours = res["engines"][0]
    assert ours["rss_file_bytes"] > 0.5 * m["file_bytes"]        # the model is memory-mapped, not copied
    assert [s["context"] for s in ours["decode_vs_context"]] == [128, 512, 1024 - 6]   # within --ctx 1024
    for peer in res["engines"][1:]:
        ratio = peer["ratio_vs_pocketlm"]["decode"]
        assert ratio == pytest.approx(peer["decode_tok_s"] / ours["decode_tok_s"])
    kinds = {r["kind"] for r in res["devices"]}
    assert kinds == {"projection"}                               # no --device auto: nothing measured
    assert len(res["devices"]) == 3 * len(DEVICES)
    assert m["quant_type"] == "Q4_0"
    for r in res["devices"]:
        assert set(r["passes"]) == {"decode", "first_token", "memory"}
        assert r["ok"] == all(r["passes"].values())
        assert set(r["verdicts"].values()) <= {"pass", "fail", "borderline"}
        assert r["basis"] in ("calibrated", "fallback") and 0 < r["decode_band"] < 1, r
        lo, hi = r["decode_range_tok_s"]
        assert lo < r["decode_tok_s"] < hi
        # a verdict is borderline exactly when the budget lies inside the band
        inside = lo <= res["budget"]["decode_tok_s"] <= hi
        assert (r["verdicts"]["decode"] == "borderline") == inside, r


def test_projections_come_from_the_published_phone_figures(bench_run):
    """A device with published llama.cpp Q4_0 rows: llama.cpp's projection is their median achieved
    bandwidth / this file's bytes per token, the other engines' that times their speed relative to
    llama.cpp measured here; a device without: its DRAM peak x the fitted phone efficiency."""
    res, _, _ = bench_run
    rows = calib.load_measurements()
    engines = {e["name"]: e for e in res["engines"]}
    llama = engines["llama.cpp"]
    s23 = [r for r in rows if (r.device, r.engine, r.family) == ("galaxy-s23", "llama.cpp", "Q4_0")]
    achieved = float(np.median([r.decode_tok_s * r.bytes_per_token for r in s23]))
    achieved_ops = float(np.median([r.prefill_tok_s * 2 * r.n_weight_params for r in s23]))
    for name, e in engines.items():
        rec = next(r for r in res["devices"] if (r["device"], r["engine"]) == ("galaxy-s23", name))
        assert rec["basis"] == "calibrated" and rec["quant_used"] == "Q4_0" and rec["calibration_rows"] == len(s23)
        ratio = e["decode_tok_s"] / llama["decode_tok_s"]
        assert rec["ratio_vs_llama_cpp"]["decode"] == pytest.approx(ratio)
        assert rec["decode_tok_s"] == pytest.approx(achieved / e["bytes_per_token"] * ratio)
        ops = e["compute_gops"] * 1e9 / e["prefill_tok_s"]
        assert rec["prefill_tok_s"] == pytest.approx(
            achieved_ops / ops * e["prefill_tok_s"] / llama["prefill_tok_s"])
        assert rec["first_token_s"] == pytest.approx(128 / rec["prefill_tok_s"])
        assert rec["roofline_decode_tok_s"] == pytest.approx(
            DEVICES["galaxy-s23"].bandwidth_gbs * 1e9 * e["bandwidth_efficiency"] / e["bytes_per_token"])
    eff = calib.phone_efficiency(rows, DEVICES, "Q4_0", "decode")
    for r in res["devices"]:
        if r["device"] == "pixel8":   # no published figure on a Tensor G3
            e = engines[r["engine"]]
            assert r["basis"] == "fallback" and "weaker" in r["calibration"]
            assert r["decode_tok_s"] == pytest.approx(
                eff * 67.2e9 / e["bytes_per_token"] * e["decode_tok_s"] / llama["decode_tok_s"])


def test_without_a_llama_cpp_run_the_ratio_is_assumed_and_said():
    from pocketlm.bench import ratio_vs_reference

    ours = {"name": "pocketlm", "decode_tok_s": 10.0, "prefill_tok_s": 40.0}
    ort = {"name": "onnxruntime", "decode_tok_s": 5.0, "prefill_tok_s": 20.0}
    assert ratio_vs_reference(ours, [ours, ort]) is None
    assert ratio_vs_reference(ort, [ours, ort]) == {"decode": 0.5, "prefill": 0.5, "assumed": True}
    e = calib.estimate(DEVICES["galaxy-s23"], "pocketlm", "Q4_0", 2.1e9, 7.4e9, calib.load_measurements(),
                       DEVICES, None, {})
    assert not e.ratio_measured and "assumed 1" in e.note and e.basis == "calibrated"


def test_published_figures_are_compared_only_for_phi3_mini(bench_run):
    """The tiny model is no phi-3-mini: its run lists no published comparison; relabelled as a
    phi-3-mini-shaped model, every published phi-3-mini-shaped llama.cpp figure appears with its
    leave-one-out projection, and the ONNX Runtime Galaxy S21 figure beside this run's projection."""
    from pocketlm.bench import published_comparison

    res, _, _ = bench_run
    assert res["published"] == []
    mini = {**res["model"], "n_layers": 32, "n_heads": 32, "head_dim": 96}
    rows = published_comparison(mini, res["devices"])
    data = [r for r in calib.load_measurements() if r.model in ("phi-3-mini", "phi-3.5-mini")]
    llama = {(r.device, r.quant) for r in data if r.engine == "llama.cpp"}
    assert {(p["device"], p["quant"]) for p in rows if p["engine"] == "llama.cpp"} == llama
    for p in rows:
        assert p["error"] == pytest.approx(p["projected_decode_tok_s"] / p["decode_tok_s"] - 1)
    (s21,) = [p for p in rows if p["engine"] == "onnxruntime"]
    proj = next(r for r in res["devices"] if (r["device"], r["engine"]) == ("galaxy-s21", "onnxruntime"))
    assert s21["projected_decode_tok_s"] == proj["decode_tok_s"] and s21["decode_tok_s"] == 6.2


def test_bench_prints_one_table_with_all_engines(bench_run):
    _, _, text = bench_run
    for word in ("pocketlm", "llama.cpp", "onnxruntime", "CALIBRATED", "FALLBACK", "vs pocketlm",
                 "read bandwidth", "error band"):
        assert word in text
    assert "[pocketlm" in text and "[llama.cpp" in text    # progress lines of the children


def test_plot_is_a_png(bench_run):
    res, png, _ = bench_run
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert res["plot"] == str(png)


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch):
    from pocketlm.bench_plot import require_matplotlib

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(PocketLMError, match="needs matplotlib"):
        require_matplotlib()


def test_report_regenerates_the_readme_section(bench_run, tmp_path):
    from pocketlm.bench import published_comparison

    res, _, _ = bench_run
    mini = {**res["model"], "n_layers": 32, "n_heads": 32, "head_dim": 96}
    res = {**res, "published": published_comparison(mini, res["devices"])}  # as a phi-3-mini run has
    assert res["published"]
    results = tmp_path / "r.json"
    results.write_text(json.dumps(res))
    readme = tmp_path / "README.md"
    readme.write_text("# title\n\nintro\n\n<!-- bench:start -->\nold table\n<!-- bench:end -->\n\nafter\n")
    report = [sys.executable, str(REPO / "benchmarks" / "report.py"), str(results), "--readme", str(readme)]
    subprocess.run(report, check=True, capture_output=True, text=True)
    text = readme.read_text()
    assert text.startswith("# title\n\nintro\n\n<!-- bench:start -->\n")
    assert text.endswith("<!-- bench:end -->\n\nafter\n")
    assert "old table" not in text
    for p in res["published"]:
        assert f"{p['error']:+.0%}" in text                     # each error stated
    assert "projection" in text.lower() and "llama.cpp" in text and "onnxruntime" in text
    assert "r.png" in text                                       # the plot is linked
    before = text
    subprocess.run(report, check=True, capture_output=True)
    assert readme.read_text() == before                          # idempotent


def test_report_refuses_a_readme_without_markers(bench_run, tmp_path):
    res, _, _ = bench_run
    (tmp_path / "r.json").write_text(json.dumps(res))
    (tmp_path / "README.md").write_text("# no markers\n")
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "report.py"), str(tmp_path / "r.json"),
                          "--readme", str(tmp_path / "README.md")], capture_output=True, text=True)
    assert out.returncode != 0 and "bench:start" in out.stderr


# ---------------------------------------------------------------------------- argument errors

@pytest.mark.parametrize("args, message", [
    (["--device", "nokia3310"], "unknown device"),
    (["--vs", "mlc"], "unknown engine"),
    (["--prompt-len", "1000", "--gen", "100", "--ctx", "1024"], "do not fit the context"),
])
def test_bad_arguments_are_clear_errors(tiny_gguf, capsys, args, message):
    assert main(["bench", str(tiny_gguf), *args]) == 2
    assert message in capsys.readouterr().err


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    assert main(["bench", str(tmp_path / "nope.gguf")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_model_facts_match_the_file(tiny_gguf):
    m = model_facts(str(tiny_gguf), 512, "int8")
    assert (m["n_layers"], m["n_kv_heads"], m["head_dim"], m["ctx"]) == (2, 2, 32, 512)
    assert (m["hidden"], m["intermediate"], m["n_heads"], m["vocab"]) == (128, 256, 4, 32064)
    # the phone projections look up the file's shape in the published data's models by these facts
    models = json.loads(calib.DATA_PATH.read_text())["models"]
    phi3 = {**m, **{k: models["phi-3-mini"][k] for k in ("n_layers", "hidden", "intermediate", "n_heads",
                                                         "n_kv_heads", "head_dim", "vocab")}}
    assert calib.shape_key(phi3) == calib.shape_key(models["phi-3.5-mini"])
    assert calib.shape_key(m) != calib.shape_key(phi3)
    assert m["kv_bytes_per_position"] == kv_bytes_per_position(2, 2, 32, "int8")
    assert kv_bytes_per_position(2, 2, 32, "int8") == 2 * 2 * 2 * 32 * (1 + 2 / 32)
    from pocketlm.export.gguf_reader import GGUFReader

    with GGUFReader(tiny_gguf) as r:
        mats = [t for t in r.tensors.values() if len(t.shape) == 2 and t.name != "token_embd.weight"]
        embd = r.tensors["token_embd.weight"]
        assert m["weight_bytes_per_token"] == sum(t.nbytes for t in mats) + embd.nbytes // embd.shape[0]


# ---------------------------------------------------------------------------- budgets on hand-made numbers

def phi3_mini_work(ctx: int = 4096, kv: str = "f16", bpw: float = 4.5) -> Workload:
    params = 3.7e9
    kv_pos = kv_bytes_per_position(32, 32, 96, kv)
    return Workload(weight_bytes_per_token=params * bpw / 8, weight_file_bytes=params * bpw / 8,
                    n_weight_params=params, kv_bytes_per_position=kv_pos, kv_positions_read=192, ctx=ctx,
                    ops_per_token=2 * params, overhead_bytes=0.05e9,
                    kv_int8_bytes_per_position=kv_bytes_per_position(32, 32, 96, "int8"), kv_type=kv)


def test_twice_the_bandwidth_projects_twice_the_decode_speed():
    work, eff = phi3_mini_work(), Efficiency(0.6, 0.1)
    dev = DEVICES["galaxy-s21"]
    fast = dataclasses.replace(dev, bandwidth_gbs=2 * dev.bandwidth_gbs)
    a, b = project(dev, "pocketlm", work, eff, Budget()), project(fast, "pocketlm", work, eff, Budget())
    assert b.decode_tok_s == pytest.approx(2 * a.decode_tok_s)
    assert b.prefill_tok_s == a.prefill_tok_s                   # prefill is compute-bound
    assert a.decode_tok_s == pytest.approx(51.2e9 * 0.6 / work.bytes_per_token)


def test_decode_failure_advice_passes_when_applied():
    work, eff = phi3_mini_work(), Efficiency(0.5, 0.5)
    p = project(DEVICES["galaxy-s21"], "pocketlm", work, eff, Budget())
    assert p.decode_tok_s == pytest.approx(25.6e9 / (3.7e9 * 4.5 / 8 + 192 * 393216))
    assert not p.passes["decode"]
    (advice,) = [a for a in p.advice if a.startswith("decode")]
    bpw = float(advice.split("at most ")[1].split(" bits")[0])
    assert bpw < 4.5
    assert project(DEVICES["galaxy-s21"], "pocketlm", phi3_mini_work(bpw=bpw), eff, Budget()).passes["decode"]
    assert not project(DEVICES["galaxy-s21"], "pocketlm", phi3_mini_work(bpw=bpw + 0.1), eff,
                       Budget()).passes["decode"]


def test_memory_failure_advice_names_int8_kv_and_a_context_that_fits():
    work, eff = phi3_mini_work(ctx=4096), Efficiency(1.0, 1.0)
    iphone = DEVICES["iphone14"]
    p = project(iphone, "pocketlm", work, eff, Budget())
    assert p.memory_gb == pytest.approx((3.7e9 * 4.5 / 8 + 4096 * 393216 + 0.05e9) / 1e9)
    assert not p.passes["memory"] and p.memory_limit_gb == iphone.app_memory_gb
    (advice,) = [a for a in p.advice if a.startswith("memory")]
    assert "int8 KV cache" in advice
    assert project(iphone, "pocketlm", phi3_mini_work(ctx=4096, kv="int8"), eff, Budget()).passes["memory"]
    ctx = int(advice.split("context of at most ")[1].split(" ")[0])
    assert project(iphone, "pocketlm", phi3_mini_work(ctx=ctx), eff, Budget()).passes["memory"]
    assert not project(iphone, "pocketlm", phi3_mini_work(ctx=ctx + 1), eff, Budget()).passes["memory"]


def test_first_token_failure_advice_and_overridden_budgets():
    work, eff = phi3_mini_work(ctx=1024), Efficiency(1.0, 0.02)
    dev = DEVICES["rpi5"]
    p = project(dev, "pocketlm", work, eff, Budget())
    assert p.first_token_s == pytest.approx(128 / (dev.int8_gops * 1e9 * 0.02 / (2 * 3.7e9)))
    assert not p.passes["first_token"]
    (advice,) = [a for a in p.advice if a.startswith("first token")]
    fits = int(advice.split("a prompt of at most ")[1].split(" tokens")[0])
    assert project(dev, "pocketlm", work, eff, Budget(prompt_tokens=fits)).passes["first_token"]
    assert not project(dev, "pocketlm", work, eff, Budget(prompt_tokens=fits + 1)).passes["first_token"]
    # budgets are overridable: a looser decode budget and an explicit memory cap
    loose = project(dev, "pocketlm", work, eff, Budget(decode_tok_s=1.0, memory_gb=1.0))
    assert loose.passes["decode"] and not loose.passes["memory"] and loose.memory_limit_gb == 1.0


def test_a_passing_projection_has_no_advice():
    p = project(DEVICES["galaxy-s24"], "pocketlm", phi3_mini_work(ctx=1024), Efficiency(1.0, 1.0), Budget())
    assert p.ok and p.advice == []


def test_device_profiles_are_consistent():
    for d in DEVICES.values():
        assert 10 < d.bandwidth_gbs < 100 and d.app_memory_gb < d.ram_gb and d.big_cores >= 2
        assert d.source and d.int8_gops > 100
    # peak = transfer rate x bus width: LPDDR5-6400 x 64 bits = 51.2 GB/s, LPDDR5X-9600 = 76.8 GB/s
    assert DEVICES["galaxy-s21"].bandwidth_gbs == 6400e6 * 8 / 1e9
    assert DEVICES["galaxy-s24"].bandwidth_gbs == 9600e6 * 8 / 1e9
    # 4.5 bpw phi-3-mini (3.8B) ceiling on an A16: ~24 tok/s (REFERENCE.md section 5)
    ceiling = DEVICES["iphone14"].bandwidth_gbs * 1e9 / (3.8e9 * 4.5 / 8)
    assert ceiling == pytest.approx(24, abs=0.5)


# ---------------------------------------------------------------------------- SoC detection

@pytest.mark.parametrize("props, cpuinfo, dt, key", [
    ({"ro.soc.model": "SM8350", "ro.board.platform": "lahaina"}, "", "", "galaxy-s21"),
    ({"ro.board.platform": "pineapple"}, "", "", "galaxy-s24"),
    ({"ro.soc.model": "Tensor G3", "ro.board.platform": "zuma"}, "", "", "pixel8"),
    ({"ro.soc.model": "SM7475"}, "", "", "sd7-gen2"),
    ({}, "Hardware\t: BCM2835\nModel\t\t: Raspberry Pi 5 Model B Rev 1.0\n", "", "rpi5"),
    ({}, "processor : 0\nCPU part : 0xd0b\n", "radxa,rock-5b\0rockchip,rk3588\0", "rk3588"),
    ({"ro.soc.model": "s5e9945", "ro.product.model": "SM-S921B"}, "", "", None),   # Exynos S24: no profile
    ({}, "model name : Intel(R) Xeon(R)\n", "", None),
])
def test_detect_device(props, cpuinfo, dt, key):
    assert detect_device(cpuinfo, props, dt) == key


def test_parse_getprop():
    text = "[ro.soc.model]: [SM8350]\n[ro.product.model]: [SM-G991B]\n[empty]: []\n"
    assert parse_getprop(text) == {"ro.soc.model": "SM8350", "ro.product.model": "SM-G991B", "empty": ""}
