"""The phone measurements data, the calibrated projection, leave-one-out and the borderline verdicts
(pocketlm/phone_calibration.py, pocketlm/phone_measurements.json). No model runs here."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from pocketlm import phone_calibration as calib
from pocketlm.devices import DEVICES, Device
from pocketlm.errors import PocketLMError


def test_shipped_data_parses_and_every_row_has_a_source():
    doc = json.loads(calib.DATA_PATH.read_text())
    rows = calib.parse_rows(doc)
    assert len(rows) == len(doc["rows"]) >= 60
    for r in rows:
        assert r.source.strip() and r.device in DEVICES, r
        assert r.decode_tok_s is not None and r.decode_tok_s > 0
        if r.engine == calib.REFERENCE_ENGINE:   # what calibrates: shape and bytes known
            assert r.weight_bytes_per_token and r.n_weight_params, r
            assert r.model in doc["models"], r.model
    for name, m in doc["models"].items():
        assert m["source"].startswith("https://"), name
    # the figures the issue quotes are in the data as published
    s23 = next(r for r in rows if (r.device, r.model, r.quant) == ("galaxy-s23", "phi-3.5-mini", "Q4_0"))
    assert (s23.prefill_tok_s, s23.decode_tok_s, s23.threads, s23.prompt_tokens) == (43.12, 9.94, 6, 256)
    assert "pocketpal-ai" in s23.source


def test_phi35_bytes_per_token_is_the_file_less_the_embedding():
    """Phi-3.5-mini Q4_0 (3.82 B weights, untied embedding): the weights a token reads come to
    4.5-4.7 bits per weight over the matrices it multiplies (Q4_0 is 4.5, the Q6_K head a bit more)."""
    r = next(r for r in calib.load_measurements(use_env=False)
             if (r.device, r.model, r.quant) == ("poco-myron", "phi-3.5-mini", "Q4_0"))
    assert 4.5 <= 8 * r.weight_bytes_per_token / r.n_weight_params <= 4.75


def test_bad_rows_are_refused():
    good = {"device": "galaxy-s23", "engine": "llama.cpp", "model": "m", "quant": "Q4_0", "source": "x",
            "decode_tok_s": 1.0}
    calib.parse_rows({"schema": calib.SCHEMA, "rows": [good]})
    for bad in ({**good, "source": ""}, {**good, "decode_tok_s": -1}, {**good, "tok_s": 3}):
        with pytest.raises(PocketLMError):
            calib.parse_rows({"schema": calib.SCHEMA, "rows": [bad]})
    with pytest.raises(PocketLMError):
        calib.parse_rows({"schema": "other/1", "rows": []})


def _device(key: str, bw: float) -> Device:
    return Device(key, key, key, "", 8, bw, 5, 4, 4, 100.0, "synthetic")


def _synthetic(noise: float, eff: dict[str, float], seed: int = 0) -> tuple[list, dict]:
    """Planted: decode = eff_device x bandwidth / bytes, prefill = c_device x bandwidth / ops, times
    lognormal noise of `noise`."""
    rng = np.random.default_rng(seed)
    devices = {k: _device(k, bw) for k, bw in (("a", 50.0), ("b", 70.0), ("c", 90.0))}
    rows = []
    for key, dev in devices.items():
        for params in (1e9, 1.7e9, 3.8e9):
            bpt = params * 4.5 / 8
            n1, n2 = np.exp(rng.normal(0, noise, 2)) if noise else (1.0, 1.0)
            rows.append(calib.Measurement(
                key, "llama.cpp", f"m{params:g}", "Q4_0", "synthetic",
                decode_tok_s=float(eff[key] * dev.bandwidth_gbs * 1e9 / bpt * n1),
                prefill_tok_s=float(2 * eff[key] * dev.bandwidth_gbs * 1e9 / (2 * params) * n2),
                weight_bytes_per_token=bpt, n_weight_params=params))
    return rows, devices


def test_leave_one_out_recovers_a_planted_relationship():
    # one efficiency for every device: both paths exact
    rows, devices = _synthetic(0.0, {"a": 0.4, "b": 0.4, "c": 0.4})
    res = calib.leave_one_out(rows, devices)
    assert {(x.path, x.metric) for x in res} == {(p, m) for p in ("calibrated", "fallback")
                                                 for m in ("decode", "prefill")}
    assert max(abs(x.error) for x in res) < 1e-12
    # per-device efficiencies: the calibrated path is still exact, the fallback errs by the spread
    rows, devices = _synthetic(0.0, {"a": 0.3, "b": 0.4, "c": 0.5})
    res = calib.leave_one_out(rows, devices)
    assert max(abs(x.error) for x in res if x.path == "calibrated") < 1e-12
    fb = {x.row.device: x.error for x in res if x.path == "fallback" and x.metric == "decode"}
    assert fb["a"] == pytest.approx(0.45 / 0.3 - 1) and fb["c"] == pytest.approx(0.35 / 0.5 - 1)
    # planted noise: the errors come out at the noise's size, not zero and not wild
    rows, devices = _synthetic(0.1, {"a": 0.4, "b": 0.4, "c": 0.4}, seed=1)
    s = calib.error_summary(calib.leave_one_out(rows, devices))[("calibrated", "decode")]
    assert 0.02 < s["median_abs"] < 0.25


def test_estimate_paths_and_the_host_ratio():
    rows, devices = _synthetic(0.0, {"a": 0.3, "b": 0.4, "c": 0.5})
    bands = {("calibrated", "decode"): 0.1, ("calibrated", "prefill"): 0.1, ("fallback", "decode"): 0.3,
             ("fallback", "prefill"): 0.3, ("measured", "decode"): 0.1, ("measured", "prefill"): 0.1}
    bpt, ops = 2.2e9, 7.6e9
    e = calib.estimate(devices["b"], "pocketlm", "Q4_0", bpt, ops, rows, devices,
                       {"decode": 1.25, "prefill": 0.5}, bands)
    assert e.basis == "calibrated" and e.ratio_measured and e.rows == 3
    assert e.decode_tok_s == pytest.approx(0.4 * 70e9 / bpt * 1.25)
    assert e.prefill_tok_s == pytest.approx(2 * 0.4 * 70e9 / ops * 0.5) and e.decode_band == 0.1
    e = calib.estimate(devices["b"], "pocketlm", "Q4_0", bpt, ops, rows, devices, None, bands)
    assert not e.ratio_measured and "assumed 1" in e.note
    assert e.decode_tok_s == pytest.approx(0.4 * 70e9 / bpt)
    # a device with no rows: its peak x the median efficiency (0.4) of those that have some
    new = _device("new", 100.0)
    e = calib.estimate(new, "llama.cpp", "Q4_0", bpt, ops, rows, {**devices, "new": new}, None, bands)
    assert e.basis == "fallback" and e.decode_band == 0.3 and "weaker" in e.note
    assert e.decode_tok_s == pytest.approx(0.4 * 100e9 / bpt)
    # a file of a family the device has no rows of: another family's rows, flagged, the wider band
    e = calib.estimate(devices["b"], "llama.cpp", "Q8_0", bpt, ops, rows, devices, None, bands)
    assert not e.quant_matched and e.quant == "Q4_0" and e.decode_band == 0.3


def _row(device: str, quant: str, model: str, decode: float | None, prefill: float | None, bpt: float,
         params: float, share: float = 0.0) -> calib.Measurement:
    return calib.Measurement(device, "llama.cpp", model, quant, "synthetic", decode_tok_s=decode,
                             prefill_tok_s=prefill, weight_bytes_per_token=bpt, n_weight_params=params,
                             k_fallback_share=share)


def test_leave_one_out_on_a_hand_computed_set():
    """Two phones (50 and 100 GB/s), two decode rows each, one family. Calibrated: each row from its
    phone's other row (achieved bytes/s / its bytes); fallback: from the other phone's median share
    of peak. Every figure below is worked out by hand."""
    devices = {"a": _device("a", 50.0), "b": _device("b", 100.0)}
    rows = [_row("a", "Q4_0", "m1", 10.0, None, 1e9, 2e9), _row("a", "Q4_0", "m2", 6.0, None, 2e9, 4e9),
            _row("b", "Q4_0", "m1", 30.0, None, 1e9, 2e9), _row("b", "Q4_0", "m2", 12.0, None, 2e9, 4e9)]
    res = calib.leave_one_out(rows, devices)
    got = {(x.path, x.row.device, x.row.model): x.error for x in res}
    expect = {("calibrated", "a", "m1"): 12 / 10 - 1, ("calibrated", "a", "m2"): 5 / 6 - 1,
              ("calibrated", "b", "m1"): 24 / 30 - 1, ("calibrated", "b", "m2"): 15 / 12 - 1,
              # b reaches median(30, 24) / 100 = 27 % of its peak, a median(10, 12) / 50 = 22 %
              ("fallback", "a", "m1"): 13.5 / 10 - 1, ("fallback", "a", "m2"): 6.75 / 6 - 1,
              ("fallback", "b", "m1"): 22 / 30 - 1, ("fallback", "b", "m2"): 11 / 12 - 1}
    assert got == pytest.approx(expect)   # and no cross-family path: one family only
    s = calib.error_summary(res)
    assert set(s) == {("calibrated", "decode"), ("fallback", "decode")}
    cal = s[("calibrated", "decode")]   # |errors| 1/6, 0.2, 0.2, 0.25
    assert (cal["n"], cal["median_abs"], cal["max_abs"]) == (4, pytest.approx(0.2), pytest.approx(0.25))
    assert cal["p90_abs"] == pytest.approx(0.2 + 0.7 * 0.05) and cal["median"] == pytest.approx((0.2 - 1 / 6) / 2)
    fb = s[("fallback", "decode")]      # |errors| 0.35, 0.125, 4/15, 1/12
    assert fb["median_abs"] == pytest.approx((0.125 + 4 / 15) / 2) and fb["max_abs"] == pytest.approx(0.35)


def test_k_fallback_share_from_the_shapes():
    """gemma-3-1b (hidden 1152 = 4.5 x 256): q, k, v, gate, up and the tied head have rows of 1152
    and fall back; o (rows of 1024) and down (6912 = 27 x 256) do not. Phi-3 shapes never fall back."""
    doc = json.loads(calib.DATA_PATH.read_text())
    for name, m in doc["models"].items():   # the matrices are all the weights the data counts
        assert sum(c * r * n for c, r, n in calib.matrix_shapes(m)) == m["n_weight_params"], name
    gemma = doc["models"]["gemma-3-1b"]
    off = 26 * (1152 * 1024 + 2 * 1152 * 256 + 2 * 1152 * 6912) + 1152 * 262144
    assert calib.k_fallback_share(gemma) == pytest.approx(off / 999751680)
    assert calib.k_fallback_share(doc["models"]["phi-3-mini"]) == 0.0
    shares = {(r.model, r.quant): r.k_fallback_share for r in calib.parse_rows(doc)}
    assert shares[("gemma-3-1b", "Q4_K_M")] == pytest.approx(off / 999751680)
    assert shares[("gemma-3-1b", "Q4_0")] == shares[("gemma-3-1b", "Q8_0")] == 0.0   # 32-blocks fit
    assert shares[("phi-3.5-mini", "Q4_K_M")] == 0.0
    row = {"device": "galaxy-s23", "engine": "llama.cpp", "model": "x", "quant": "Q4_K_M", "source": "s"}
    with pytest.raises(PocketLMError):
        calib.parse_rows({"schema": calib.SCHEMA, "rows": [{**row, "k_fallback_share": 1.5}]})


RHO, SHARE = 0.4, 0.5   # planted: fallback matrices run at 0.4x the family's rate, half the weights


def _families(no_k_rows: str | None = None) -> tuple[list, dict]:
    """Planted, three phones: Q4_0 prefill at 3 Gops per GB/s of peak, Q4_K at 0.7x that, decode
    0.4 / 0.36 of the peak; one K-quant model with SHARE of its weights falling back. `no_k_rows`:
    a phone with Q4_0 rows only."""
    devices = {k: _device(k, bw) for k, bw in (("a", 50.0), ("b", 70.0), ("c", 90.0))}
    rows = []
    for key, dev in devices.items():
        peak = dev.bandwidth_gbs * 1e9
        for params in (1e9, 1.7e9, 3.8e9):
            for quant, dec, pre, bits in (("Q4_0", 0.4, 3.0, 4.5), ("Q4_K_M", 0.36, 2.1, 4.8)):
                if quant == "Q4_K_M" and key == no_k_rows:
                    continue
                bpt = params * bits / 8
                share = SHARE if quant == "Q4_K_M" and params == 1.7e9 else 0.0
                factor = 1 - share + share / RHO
                rows.append(_row(key, quant, f"m{params:g}", dec * peak / bpt,
                                 pre * peak / (2 * params * factor), bpt, params, share))
    return rows, devices


def test_per_family_calibration_recovers_the_planted_fallback_ratio():
    rows, devices = _families()
    assert calib.fallback_ratios(rows) == {"Q4_K": pytest.approx(RHO)}
    res = calib.leave_one_out(rows, devices)
    assert {x.path for x in res} == {"calibrated", "cross-family", "fallback"}
    assert max(abs(x.error) for x in res if x.path != "fallback") < 1e-9
    # without the rule the falling-back rows are projected at their family's rate: 1.75x too fast
    plain = [dataclasses.replace(r, k_fallback_share=0.0) for r in rows]
    errs = [x.error for x in calib.leave_one_out(plain, devices)
            if (x.path, x.metric) == ("calibrated", "prefill") and x.row.family == "Q4_K" and x.row.model == "m1.7e+09"]
    assert errs == pytest.approx([1 - SHARE + SHARE / RHO - 1] * 3)
    # the bench's estimate for such a file: the device's K-quant rate / (ops x 1.75)
    bands = {("calibrated", "prefill"): 0.1, ("calibrated", "decode"): 0.1}
    e = calib.estimate(devices["b"], "llama.cpp", "Q4_K_M", 1e9, 6e9, rows, devices, None, bands,
                       k_fallback_share=SHARE)
    assert e.prefill_tok_s == pytest.approx(2.1 * 70e9 / (6e9 * 1.75)) and "fallback matrices" in e.note
    e = calib.estimate(devices["b"], "llama.cpp", "Q4_K_M", 1e9, 6e9, rows, devices, None, bands)
    assert e.prefill_tok_s == pytest.approx(2.1 * 70e9 / 6e9)


def test_a_phone_without_the_files_family_uses_the_fitted_family_ratio():
    rows, devices = _families(no_k_rows="b")
    bands = {("calibrated", "decode"): 0.1, ("calibrated", "prefill"): 0.1, ("cross-family", "decode"): 0.2,
             ("cross-family", "prefill"): 0.05, ("fallback", "decode"): 0.3, ("fallback", "prefill"): 0.3}
    e = calib.estimate(devices["b"], "llama.cpp", "Q4_K_M", 1e9, 6e9, rows, devices, None, bands)
    assert e.basis == "calibrated" and not e.quant_matched and e.quant == "Q4_0" and e.rows == 3
    # b's Q4_0 rates x the Q4_K / Q4_0 ratio of a and c (0.9 decode, 0.7 prefill)
    assert e.decode_tok_s == pytest.approx(0.36 * 70e9 / 1e9) and e.prefill_tok_s == pytest.approx(2.1 * 70e9 / 6e9)
    assert "ratio of 2 device(s) with both" in e.note
    assert (e.decode_band, e.prefill_band) == (0.2, 0.1)   # never narrower than the calibrated band
    # b without prefill figures: its prefill is the fallback's (the K-quant phones' share of peak),
    # not carried over by the family ratio a second time
    no_prefill = [dataclasses.replace(r, prefill_tok_s=None) if r.device == "b" else r for r in rows]
    e = calib.estimate(devices["b"], "llama.cpp", "Q4_K_M", 1e9, 6e9, no_prefill, devices, None, bands)
    assert e.prefill_tok_s == pytest.approx(2.1 * 70e9 / 6e9) and e.prefill_band == 0.3
    assert e.decode_tok_s == pytest.approx(0.36 * 70e9 / 1e9) and "prefill from its peak" in e.note
    res = calib.leave_one_out(rows, devices)
    cross = [x for x in res if x.path == "cross-family"]
    assert cross and max(abs(x.error) for x in cross) < 1e-9
    assert "b" not in {x.row.device for x in cross if x.row.family == "Q4_K"}   # b has no Q4_K rows


def test_the_shipped_data_meets_the_target_on_the_calibrated_and_cross_family_paths():
    """Issue 17's target (median |error| <= 15 %, none above 35 %), which gemma-3-1b Q4_K_M's prefill
    missed (+90 to +106 %) while its K-quant fallback was ignored, and cross-family prefill missed
    (+37 %, phi-3.5-mini Q4_K_M) before the shape effect. phi-3.5-mini's prefill, 12-21 % below its
    phones' other models, is no longer projected too fast (its calibrated median was +9.5 %)."""
    res = calib.leave_one_out(calib.load_measurements(use_env=False), DEVICES)
    s = calib.error_summary(res)
    for path in ("calibrated", "cross-family"):
        for metric in ("decode", "prefill"):
            assert s[(path, metric)]["median_abs"] <= 0.15 and s[(path, metric)]["max_abs"] <= 0.35, (path, metric)
    gemma = [x.error for x in res if (x.path, x.metric, x.row.model, x.row.quant)
             == ("calibrated", "prefill", "gemma-3-1b", "Q4_K_M")]
    assert len(gemma) == 3 and max(map(abs, gemma)) < 0.15
    phi = [x.error for x in res if (x.path, x.metric, x.row.model) == ("calibrated", "prefill", "phi-3.5-mini")]
    assert len(phi) == 7 and abs(float(np.median(phi))) < 0.05


def test_pocketpal_bytes_per_token_count_every_matrix_once():
    """A Q8_0 file reads every matrix once at 8.5 bits per weight (the token embedding one row), so
    its bytes per token are its weights x 8.5 / 8, whatever the model: the shapes' count
    (n_weight_params, from config.json) against PocketPal's reported weight buffers. A tied
    embedding is in those buffers twice (llama.cpp loads the output head as a duplicate of the token
    embedding); counted twice, gemma-3-1b's bytes were 30 % too many."""
    rows = [r for r in calib.load_measurements(use_env=False) if "pocketpal-ai" in r.source]
    q8 = [r for r in rows if r.quant == "Q8_0"]
    assert {r.model for r in q8} >= {"gemma-3-1b", "qwen2.5-1.5b", "smollm2-1.7b", "phi-4-mini", "phi-3.5-mini"}
    for r in q8:
        assert r.weight_bytes_per_token == pytest.approx(r.n_weight_params * 8.5 / 8, rel=1e-3), r.model
    # qwen2.5-1.5b (tied) and deepseek-r1-distill-qwen-1.5b (untied) have the same matrices and read the same
    by = {(r.model, r.quant): r.weight_bytes_per_token for r in rows}
    for quant in ("Q4_0", "Q4_K_M", "Q8_0"):
        assert by[("qwen2.5-1.5b", quant)] == pytest.approx(by[("deepseek-r1-distill-qwen-1.5b", quant)], rel=1e-5)


SHAPE_A, SHAPE_B, SHAPE_C = ((1, 1, 1),), ((2, 2, 2),), ((3, 3, 3),)


def _shaped() -> tuple[list, dict]:
    """Prefill in Gops/s achieved: phone a 100 for shapes A and B, 80 for C (0.8x); b 200, C 170
    (0.85x); c 300, no C row. Decode 10 GB/s everywhere but a's C row, 20. One family, 1e9 weights
    and bytes per token, so tok/s = achieved / 2 (prefill) or / 1 (decode), in units of 1e9."""
    devices = {k: _device(k, bw) for k, bw in (("a", 50.0), ("b", 100.0), ("c", 150.0))}
    rates = {"a": (100, 80), "b": (200, 170), "c": (300, None)}
    rows = []
    for key, (base, c_rate) in rates.items():
        for model, shape, rate in (("A", SHAPE_A, base), ("B", SHAPE_B, base), ("C", SHAPE_C, c_rate)):
            if rate is not None:
                decode = 20.0 if (key, model) == ("a", "C") else 10.0
                rows.append(dataclasses.replace(_row(key, "Q4_0", model, decode, rate / 2, 1e9, 1e9), shape=shape))
    return rows, devices


def test_shape_effect_and_rate_by_hand():
    rows, devices = _shaped()
    assert calib.shape_effect(rows, SHAPE_C, "prefill") == pytest.approx((0.8 + 0.85) / 2)
    # A: a 100 / median(100, 80), b 200 / median(200, 170), c 300 / 300: the median of the three
    assert calib.shape_effect(rows, SHAPE_A, "prefill") == pytest.approx(200 / 185)
    assert calib.shape_effect(rows, None, "prefill") == calib.shape_effect(rows, ((9, 9, 9),), "prefill") == 1.0
    c_rows = [r for r in rows if r.device == "c"]
    a_rows = [r for r in rows if r.device == "a"]
    # c never ran C: its other shapes' 300 x the effect; a ran it: its own 80, no effect
    assert calib.shape_rate(c_rows, "prefill", shape=SHAPE_C, pool=rows) == pytest.approx(300e9 * 0.825)
    assert calib.shape_rate(a_rows, "prefill", shape=SHAPE_C, pool=rows) == pytest.approx(80e9)
    assert calib.shape_rate(a_rows, "prefill", shape=SHAPE_C, pool=rows, direct=False) == pytest.approx(100e9 * 0.825)
    # decode: its own rows of the shape when it has them, else the median of all (no effect)
    assert calib.shape_rate(a_rows, "decode", shape=SHAPE_C, pool=rows) == pytest.approx(20e9)
    assert calib.shape_rate(c_rows, "decode", shape=SHAPE_C, pool=rows) == pytest.approx(10e9)
    assert calib.shape_rate(a_rows, "prefill") == pytest.approx(100e9)   # shape unknown: the median
    # the bench's estimate for a file of shape C on c, 1e9 weights (2e9 ops per token)
    bands = {("calibrated", "prefill"): 0.1, ("calibrated", "decode"): 0.1}
    e = calib.estimate(devices["c"], "llama.cpp", "Q4_0", 1e9, 2e9, rows, devices, None, bands, shape=SHAPE_C)
    assert e.prefill_tok_s == pytest.approx(300 * 0.825 / 2) and "x 0.82" in e.note
    e = calib.estimate(devices["a"], "llama.cpp", "Q4_0", 1e9, 2e9, rows, devices, None, bands, shape=SHAPE_C)
    assert (e.prefill_tok_s, e.decode_tok_s) == (pytest.approx(40.0), pytest.approx(20.0))
    assert "this model's shape" in e.note
    e = calib.estimate(devices["a"], "llama.cpp", "Q4_0", 1e9, 2e9, rows, devices, None, bands)
    assert e.prefill_tok_s == pytest.approx(50.0)   # no shape given: a's median over A, B and C


def test_leave_one_out_with_the_shape_effect_by_hand():
    rows, devices = _shaped()
    got = {(x.path, x.metric, x.row.device, x.row.model): x.projected for x in calib.leave_one_out(rows, devices)}
    # calibrated, a's C row: a's A and B (100) x the effect on the rest (b only: 0.85), 2e9 ops per token
    assert got[("calibrated", "prefill", "a", "C")] == pytest.approx(100 * 0.85 / 2)
    assert got[("calibrated", "prefill", "b", "C")] == pytest.approx(200 * 0.8 / 2)
    # a's A row: its twin-less peers B (100) and C (80) are other shapes; the effect of A over b and c
    # (each cell: A / the median of its other shapes) = median(200 / 185, 300 / 300)
    assert got[("calibrated", "prefill", "a", "A")] == pytest.approx(90 * (200 / 185 + 1) / 2 / 2)
    # fallback, b's C row with b left out: a reaches 80 / 50 of its peak with C itself, c reaches
    # 300 x 0.8 (the effect over a and c: a's cell only) / 150; the median of the two
    eff = (80 / 50 + 300 * 0.8 / 150) / 2
    assert got[("fallback", "prefill", "b", "C")] == pytest.approx(eff * 100 / 2)
    # decode has no effect: b's C row from b's A and B (10), a's C row from a's A and B
    assert got[("calibrated", "decode", "b", "C")] == pytest.approx(10.0)
    assert got[("calibrated", "decode", "a", "C")] == pytest.approx(10.0)


def _scaled(r: calib.Measurement, k: float) -> calib.Measurement:
    return dataclasses.replace(r, decode_tok_s=r.decode_tok_s and r.decode_tok_s * k,
                               prefill_tok_s=r.prefill_tok_s and r.prefill_tok_s * k)


@pytest.mark.parametrize("path, left_out", [
    ("calibrated", lambda r, o: o is r),
    ("cross-family", lambda r, o: (o.device, o.family) == (r.device, r.family)),
    ("fallback", lambda r, o: o.device == r.device),
])
def test_leave_one_out_does_not_leak_what_it_leaves_out(path, left_out):
    """Tripling every rate of what a path leaves out (the row; its phone's rows of its family; its
    whole phone) changes none of that row's projections, shape effect, family ratio and rho included;
    tripling the same shape's rows on the other phones does change its prefill (the effect is used)."""
    project = {"calibrated": calib._loo_calibrated, "cross-family": calib._loo_cross_family,
               "fallback": calib._loo_fallback}[path]
    rows = calib.load_measurements(use_env=False)
    moved = 0
    for r in rows:
        if r.engine != calib.REFERENCE_ENGINE:
            continue
        changed = [_scaled(o, 3.0) if left_out(r, o) else o for o in rows]
        r2 = changed[rows.index(r)] if path == "calibrated" else r
        for metric in ("decode", "prefill"):
            if r.achieved(metric) is None:
                continue
            p = project(r, rows, DEVICES, metric, "bandwidth")
            p2 = project(r2, changed, DEVICES, metric, "bandwidth")
            assert (p is None and p2 is None) or p2 == pytest.approx(p, rel=1e-12), (path, metric, r)
        if r.model == "phi-3.5-mini" and r.prefill_tok_s and path != "fallback":
            elsewhere = [_scaled(o, 3.0) if o.shape == r.shape and o.device != r.device else o for o in rows]
            p, p2 = (project(r, x, DEVICES, "prefill", "bandwidth") for x in (rows, elsewhere))
            moved += p is not None and p2 != pytest.approx(p, rel=1e-6)
    assert path == "fallback" or moved > 0


def test_a_phi3_mini_shaped_file_is_projected_from_phi35_mini_rows():
    """With the file's shape, the Galaxy S23's Q4_0 projection of a file as large as phi-3.5-mini
    Q4_0 is that row itself (decode 9.94, prefill 43.12 tok/s published); without it, the median over
    the phone's seven models, which prefill phi-3.5-mini's shape 14 % too fast."""
    rows = calib.load_measurements(use_env=False)
    doc = json.loads(calib.DATA_PATH.read_text())
    shape = calib.shape_key(doc["models"]["phi-3-mini"])
    s23 = next(r for r in rows if (r.device, r.model, r.quant) == ("galaxy-s23", "phi-3.5-mini", "Q4_0"))
    assert s23.shape == shape
    args = (DEVICES["galaxy-s23"], "llama.cpp", "Q4_0", s23.bytes_per_token, s23.ops_per_token, rows, DEVICES, None, {})
    e = calib.estimate(*args, shape=shape)
    assert (e.decode_tok_s, e.prefill_tok_s) == (pytest.approx(9.94), pytest.approx(43.12))
    assert calib.estimate(*args).prefill_tok_s > 1.1 * 43.12
    # a phone without phi-3.5-mini rows (rk3588 has one phi-3-mini decode row only) gets the shape's
    # prefill effect, fitted on the three PocketPal phones: 0.79-0.88 of their other models
    effect = calib.shape_effect(rows, shape, "prefill", calib.fallback_ratios(rows))
    assert 0.79 <= effect <= 0.88


@pytest.mark.parametrize("value, band, threshold, higher, expect", [
    (15.0, 0.2, 12.0, True, "pass"),        # 12.0 .. 18.0: all >= 12
    (14.0, 0.2, 12.0, True, "borderline"),  # 11.2 .. 16.8
    (9.0, 0.2, 12.0, True, "fail"),         # 7.2 .. 10.8
    (10.0, 0.2, 12.0, True, "borderline"),  # 8 .. 12: the top touches the budget
    (1.0, 0.2, 1.5, False, "pass"),         # 0.8 .. 1.2 s <= 1.5 s
    (1.4, 0.2, 1.5, False, "borderline"),
    (2.0, 0.2, 1.5, False, "fail"),
    (14.0, 0.0, 12.0, True, "pass"),        # no band: pass/fail only
    (math.nan, 0.2, 12.0, True, "fail"),
])
def test_borderline_verdicts(value, band, threshold, higher, expect):
    assert calib.verdict(value, band, threshold, higher) == expect


def test_bands_are_the_90th_percentile_of_the_loo_errors():
    assert calib.quantile([0.0, 1.0], 0.9) == pytest.approx(0.9)
    assert calib.quantile(list(range(11)), 0.9) == pytest.approx(9.0)
    rows = calib.load_measurements(use_env=False)
    res = calib.leave_one_out(rows, DEVICES)
    bands = calib.bands_from(res)
    errs = sorted(abs(x.error) for x in res if (x.path, x.metric) == ("calibrated", "decode"))
    assert bands[("calibrated", "decode")] == pytest.approx(float(np.quantile(errs, 0.9)))
    assert bands[("measured", "decode")] == bands[("calibrated", "decode")]


def _phone_run() -> dict:
    """A `pocketlm bench --device auto --json` result as android_demo/ pulls it from a phone
    (docs/bench_schema.md): a measured row first, then projections."""
    model = {"name": "phi3-mini-random", "weight_bytes_per_token": 2119234752, "n_weight_params": 3722382336,
             "quant_type": "Q4_0", "prompt_tokens": 128, "gen_tokens": 32, "n_layers": 32, "n_heads": 32,
             "head_dim": 96}
    engine = {"name": "pocketlm", "version": "0.1.0", "decode_tok_s": 8.0, "prefill_tok_s": 30.0,
              "bytes_per_token": 2119234752 + 144 * 393216}
    measured = {"kind": "measured", "device": "galaxy-s23", "name": "Galaxy S23", "soc": "Snapdragon 8 Gen 2",
                "engine": "pocketlm", "decode_tok_s": 8.0, "prefill_tok_s": 30.0}
    projection = {**measured, "kind": "projection", "device": "rk3588", "decode_tok_s": 99.0}
    return {"schema": "pocketlm.bench/1", "created": "2026-01-01T00:00:00+00:00", "host": {"threads": 4},
            "model": model, "engines": [engine], "devices": [measured, projection]}


def test_a_phone_run_slots_into_the_data(tmp_path, monkeypatch):
    """A bench JSON from android_demo/ is read as it is (a file argument or $POCKETLM_PHONE_MEASUREMENTS);
    its measured row becomes a `measured` row, which then projects pocketlm on that phone with ratio 1
    and enters the leave-one-out check like any other row."""
    path = tmp_path / "phone-R5CT.json"
    path.write_text(json.dumps(_phone_run()))
    shipped = calib.load_measurements(use_env=False)
    monkeypatch.setenv(calib.ENV, str(path))
    rows = calib.load_measurements()
    assert len(rows) == len(shipped) + 1
    mine = rows[-1]
    assert (mine.kind, mine.device, mine.engine, mine.quant, mine.decode_tok_s) == (
        "measured", "galaxy-s23", "pocketlm", "Q4_0", 8.0)
    assert mine.bytes_per_token == 2119234752 + 144 * 393216 and str(path) in mine.source
    bands = calib.bands_from(calib.leave_one_out(rows, DEVICES))
    e = calib.estimate(DEVICES["galaxy-s23"], "pocketlm", "Q4_0", mine.bytes_per_token, mine.ops_per_token,
                       rows, DEVICES, {"decode": 3.0, "prefill": 3.0}, bands)
    assert e.basis == "measured" and e.ratio_decode == 1.0
    assert e.decode_tok_s == pytest.approx(8.0) and e.prefill_tok_s == pytest.approx(30.0)
    # the converted document is the data file's format: appending it to the shipped file works too
    doc = json.loads(calib.DATA_PATH.read_text())
    doc["rows"] += calib.measurement_from_bench(_phone_run(), "phone-R5CT.json")["rows"]
    assert calib.parse_rows(doc)[-1] == calib.parse_rows(
        calib.measurement_from_bench(_phone_run(), "phone-R5CT.json"))[0]


def test_the_demo_phone_table_is_for_a_phi3_mini_sized_file():
    """`pocketlm demo` shows phone figures of a phi-3-mini-sized Q4_0 file, labelled; its Galaxy S23
    decode figure is the calibrated one, the phone's Q4_0 rows of phi-3-mini's shape (the demo passes
    the shape: pocketlm/bench.py; here llama.cpp's published phi-3.5-mini Q4_0 row) at their
    achieved bandwidth / the file's bytes per token (ratio assumed 1). Without the shape it would be
    the median over the phone's seven models, 8.5 tok/s."""
    from pocketlm.bench import phi3_mini_phone_lines

    text = "\n".join(phi3_mini_phone_lines())
    assert "PHI-3-MINI-SIZED" in text and "assumed as fast as llama.cpp" in text
    (s23,) = [line for line in text.splitlines() if "Galaxy S23" in line]
    decode = float(s23.split("pocketlm")[1].split()[0])
    shape = calib.shape_key(json.loads(calib.DATA_PATH.read_text())["models"]["phi-3-mini"])
    rows = [r for r in calib.load_measurements()
            if (r.device, r.engine, r.family, r.shape) == ("galaxy-s23", "llama.cpp", "Q4_0", shape)]
    assert [r.model for r in rows] == ["phi-3.5-mini"]
    achieved = float(np.median([r.decode_tok_s * r.bytes_per_token for r in rows]))
    kv = 2 * 32 * 32 * 96 * 2 * (128 + 16 + 1)   # f16 K and V of 32 layers at the mean decode position
    assert decode == pytest.approx(achieved / (2119234752 + kv), abs=0.051)
    assert decode == pytest.approx(9.94, rel=0.05)


def test_bandwidth_probe_samples_again_and_again():
    from pocketlm.hostinfo import BandwidthProbe

    probe = BandwidthProbe(2, 8 << 20)
    try:
        assert probe.buffer.nbytes == 8 << 20 and len(probe.parts) == 2
        samples = [probe.gbs(repeats=1) for _ in range(3)]  # one buffer, sampled three times
    finally:
        probe.close()
    assert all(np.isfinite(g) and g > 0 for g in samples) and probe.buffer is None
