"""Phone projections calibrated on published phone-CPU measurements, and how good they are.

The data: `phone_measurements.json` beside this file (published rows with their sources; rows measured
with `pocketlm bench --device auto` on a phone slot in as they are), plus any files named in
$POCKETLM_PHONE_MEASUREMENTS (os.pathsep-separated; each a measurements file or a bench JSON).

Decode at batch 1 is bandwidth-bound: a phone that ran a model of B bytes per token at T tok/s
achieved B x T bytes/s, and a file of B' bytes per token runs at about B x T / B' on it. The achieved
bandwidth of a device is the median of B x T over its rows of one engine and quantization family
(llama.cpp's kernels differ by type: its repacked Q4_0 path is not its Q4_K path).

Prefill is compute-bound: a prompt token multiplies every weight once (2 ops per weight; the weights
are reused across the prompt's tokens, so their bytes hardly matter), so prefill is normalised by
ops per token = 2 x weights, not bytes. Within one quantization family the two are nearly
proportional; across families (Q4_0 vs Q8_0) bytes would mislead, and they did: scaling prefill by
bytes gives a leave-one-out median error of 18 % against 6 % by weights (benchmarks/phone_projection_check.py).

Projection of engine E on device D for the user's file (quantization family Q):
  - "measured": D has rows of E itself (a phone run of pocketlm): their achieved rates, ratio 1.
  - "calibrated": D has llama.cpp rows of family Q: their achieved rates x (E / llama.cpp speed
    measured on this host on the same file; assumed 1 without a llama.cpp run, and labelled so).
  - "fallback" (the weaker estimate): D's DRAM peak x the share of peak that phones with llama.cpp
    rows of family Q achieve (median over devices); prefill likewise (see `_peak` for why the DRAM
    peak and not the int8 peak).
Each estimate carries a relative band: the 90th percentile of |error| of its path in the
leave-one-out check over the data. A budget inside the band reads "borderline".
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import PocketLMError

DATA_PATH = Path(__file__).with_name("phone_measurements.json")
SCHEMA = "pocketlm.phone_measurements/1"
ENV = "POCKETLM_PHONE_MEASUREMENTS"
REFERENCE_ENGINE = "llama.cpp"   # the engine whose published phone figures calibrate the others
BAND_QUANTILE = 0.9              # the band is this quantile of the path's leave-one-out |error|
GB = 1e9
PATHS = ("measured", "calibrated", "fallback")


def quant_family(quant: str | None) -> str:
    """Q4_K_M, Q4_K_S, q4_k -> Q4_K; Q4_0 -> Q4_0: llama.cpp's kernel is chosen by the block type."""
    q = (quant or "").upper()
    return "Q4_K" if q.startswith("Q4_K") else q


@dataclass(frozen=True)
class Measurement:
    """One phone-CPU measurement (a row of phone_measurements.json). Rates in tok/s, bytes in bytes."""

    device: str
    engine: str
    model: str
    quant: str
    source: str
    decode_tok_s: float | None = None
    prefill_tok_s: float | None = None
    weight_bytes_per_token: float | None = None
    kv_bytes_per_token: float | None = None
    n_weight_params: float | None = None
    kind: str = "published"
    engine_version: str | None = None
    threads: int | None = None
    prompt_tokens: int | None = None
    gen_tokens: int | None = None
    lower_bound: bool = False

    @property
    def bytes_per_token(self) -> float | None:
        """Bytes one decode step reads (weights + the KV cache at the mean position; unknown KV as 0)."""
        if self.weight_bytes_per_token is None:
            return None
        return self.weight_bytes_per_token + (self.kv_bytes_per_token or 0.0)

    @property
    def ops_per_token(self) -> float | None:
        """2 x multiply-adds of one prompt token in the weight matrices (attention left out: under 5 %
        of the weights' ops at these prompt lengths and shapes)."""
        return None if self.n_weight_params is None else 2.0 * self.n_weight_params

    @property
    def family(self) -> str:
        return quant_family(self.quant)

    def achieved(self, metric: str) -> float | None:
        """decode: achieved bytes/s; prefill: achieved ops/s (None if the row lacks either part)."""
        rate, scale = self.rate(metric), self.scale(metric)
        return None if rate is None or scale is None or self.lower_bound else rate * scale

    def rate(self, metric: str) -> float | None:
        return self.decode_tok_s if metric == "decode" else self.prefill_tok_s

    def scale(self, metric: str) -> float | None:
        return self.bytes_per_token if metric == "decode" else self.ops_per_token


_FIELDS = frozenset(Measurement.__dataclass_fields__)


def parse_rows(doc: dict, where: str = "phone measurements") -> list[Measurement]:
    """Rows of a measurements document, checked: a device, engine, model, a non-empty source and
    positive rates (or null)."""
    if doc.get("schema") != SCHEMA:
        raise PocketLMError(f"not a {SCHEMA} file (schema {doc.get('schema')!r})", where)
    out = []
    for i, row in enumerate(doc.get("rows", [])):
        unknown = set(row) - _FIELDS - {"bytes_basis"}
        missing = [k for k in ("device", "engine", "model", "quant", "source") if not row.get(k)]
        if missing or unknown:
            raise PocketLMError(f"row {i}: missing {missing} / unknown keys {sorted(unknown)}", where)
        for k in ("decode_tok_s", "prefill_tok_s", "weight_bytes_per_token", "n_weight_params"):
            v = row.get(k)
            if v is not None and not (isinstance(v, int | float) and v > 0 and math.isfinite(v)):
                raise PocketLMError(f"row {i}: {k} must be a positive number or null, not {v!r}", where)
        out.append(Measurement(**{k: v for k, v in row.items() if k in _FIELDS}))
    return out


def measurement_from_bench(res: dict, source: str) -> dict:
    """The measurements document of a `pocketlm bench --device auto --json` run on a phone
    (android_demo/): its `measured` rows, with the model's bytes and weights per token."""
    m, h = res["model"], res["host"]
    rows = []
    for r in res["devices"]:
        if r["kind"] != "measured" or not r.get("device"):
            continue   # a phone with no profile has no bandwidth to fit: kept out of the data
        e = next(x for x in res["engines"] if x["name"] == r["engine"])
        rows.append({"kind": "measured", "device": r["device"], "engine": r["engine"],
                     "engine_version": e.get("version"), "model": m["name"],
                     "quant": m.get("quant_type") or "unknown", "threads": h.get("threads"),
                     "prompt_tokens": m.get("prompt_tokens"), "gen_tokens": m.get("gen_tokens"),
                     "prefill_tok_s": r["prefill_tok_s"], "decode_tok_s": r["decode_tok_s"],
                     "lower_bound": False, "weight_bytes_per_token": m["weight_bytes_per_token"],
                     "kv_bytes_per_token": e["bytes_per_token"] - m["weight_bytes_per_token"],
                     "n_weight_params": m["n_weight_params"],
                     "source": f"{source} (pocketlm bench --device auto, {res.get('created', '')})"})
    return {"schema": SCHEMA, "rows": rows}


def _load_file(path: Path) -> list[Measurement]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PocketLMError(f"cannot read phone measurements ({e})", path) from None
    if str(doc.get("schema", "")).startswith("pocketlm.bench/"):
        doc = measurement_from_bench(doc, str(path))
    return parse_rows(doc, str(path))


def load_measurements(extra: Iterable[str | os.PathLike] = (), use_env: bool = True) -> list[Measurement]:
    """The shipped rows, then rows of `extra` files and of $POCKETLM_PHONE_MEASUREMENTS."""
    paths = [Path(p) for p in extra]
    if use_env and os.environ.get(ENV):
        paths += [Path(p) for p in os.environ[ENV].split(os.pathsep) if p]
    rows = list(_shipped())
    for p in paths:
        rows += _load_file(p)
    return rows


@lru_cache(maxsize=1)
def _shipped() -> tuple[Measurement, ...]:
    return tuple(_load_file(DATA_PATH))


# ---------------------------------------------------------------------------- fitting

def achieved_rate(rows: Sequence[Measurement], metric: str) -> float | None:
    """Median achieved bytes/s (decode) or ops/s (prefill) over rows (None if none has it)."""
    vals = [v for r in rows if (v := r.achieved(metric)) is not None]
    return statistics.median(vals) if vals else None


def _peak(device: Any, metric: str, prefill_peak: str = "bandwidth") -> float:
    """The figure a fallback estimate scales with: the DRAM peak (bytes/s) for decode; for prefill
    the DRAM peak too by default, or the big-core int8 peak estimate (ops/s) with
    prefill_peak="int8". Prefill is compute-bound, but our int8 peaks (cores x clock x SIMD pipes)
    predict phones' llama.cpp prefill poorly (leave-one-out median error 58 % against 29 % with the
    DRAM peak, which tracks the SoC generation): see benchmarks/phone_projection_check.py."""
    if metric == "decode" or prefill_peak == "bandwidth":
        return device.bandwidth_gbs * GB
    return device.int8_gops * GB


def phone_efficiency(rows: Sequence[Measurement], devices: dict, family: str, metric: str,
                     exclude_device: str | None = None, prefill_peak: str = "bandwidth") -> float | None:
    """Share of its peak that a phone reaches with the reference engine on a quantization family:
    per device the median achieved rate / its peak, then the median over devices."""
    per_device = []
    for key in sorted({r.device for r in rows}):
        if key == exclude_device or key not in devices:
            continue
        ref = [r for r in rows if r.device == key and r.engine == REFERENCE_ENGINE and r.family == family]
        rate = achieved_rate(ref, metric)
        if rate is not None:
            per_device.append(rate / _peak(devices[key], metric, prefill_peak))
    return statistics.median(per_device) if per_device else None


@dataclass
class PhoneEstimate:
    """A projection of one engine on one device for one file."""

    decode_tok_s: float
    prefill_tok_s: float
    basis: str              # measured / calibrated / fallback
    decode_band: float      # relative: the truth lies within value x (1 +- band) in 90 % of the checks
    prefill_band: float
    rows: int               # measurements it rests on (fallback: devices the efficiency was fitted on)
    quant: str              # the quantization family of the rows used
    quant_matched: bool     # False: the device has no rows of the file's family; another family's used
    ratio_decode: float     # engine / reference engine, decode, on this host
    ratio_prefill: float
    ratio_measured: bool    # False: assumed 1 (no reference-engine run beside it)
    note: str


def estimate(device: Any, engine: str, family: str, bytes_per_token: float, ops_per_token: float,
             rows: Sequence[Measurement], devices: dict, ratio: dict[str, Any] | None,
             bands: dict[tuple[str, str], float]) -> PhoneEstimate:
    """Project `engine` on `device` for a file of `bytes_per_token` and `ops_per_token` (see the
    module doc). ratio: {decode, prefill} of engine / llama.cpp measured on this host on the same
    file (with "assumed": True when it is relative to pocketlm, taken as fast as llama.cpp); None:
    assumed 1."""
    family = quant_family(family)
    own = [r for r in rows if r.device == device.key and r.engine == engine and r.family == family]
    ref_all = [r for r in rows if r.device == device.key and r.engine == REFERENCE_ENGINE]
    ref = [r for r in ref_all if r.family == family]
    matched = True
    if own and engine != REFERENCE_ENGINE:
        use, basis, rd, rp, measured = own, "measured", 1.0, 1.0, True
        note = f"{len(own)} phone measurement(s) of {engine} itself"
    else:
        rd, rp = (ratio or {}).get("decode", 1.0), (ratio or {}).get("prefill", 1.0)
        measured = (ratio is not None and not ratio.get("assumed")) or engine == REFERENCE_ENGINE
        if not ref and ref_all:   # the device has llama.cpp rows, none of this family: the nearest
            matched = False
            fams = sorted({r.family for r in ref_all}, key=lambda f: (f != "Q4_0", f))
            family_used = fams[0]
            ref = [r for r in ref_all if r.family == family_used]
        use, basis = ref, "calibrated"
        note = f"{len(ref)} published {REFERENCE_ENGINE} measurement(s) on this device"
    dec = achieved_rate(use, "decode") if use else None
    pre = achieved_rate(use, "prefill") if use else None
    band_path = basis if matched else "fallback"
    n = len(use)
    used_family = use[0].family if use else family
    fallback_note = []
    if dec is None:
        eff = phone_efficiency(rows, devices, family, "decode") or phone_efficiency(rows, devices, "Q4_0", "decode")
        dec = eff * _peak(device, "decode") if eff else math.nan
        fallback_note.append("decode")
    if pre is None:
        eff = phone_efficiency(rows, devices, family, "prefill") or phone_efficiency(rows, devices, "Q4_0", "prefill")
        pre = eff * _peak(device, "prefill") if eff else math.nan
        fallback_note.append("prefill")
    if fallback_note and not use:
        basis, band_path, n, used_family = "fallback", "fallback", _fitted_devices(rows, devices, family), family
        note = ("no phone measurement on this device: its peak x the share of peak phones with "
                f"{REFERENCE_ENGINE} measurements reach (the weaker estimate)")
    elif fallback_note:
        note += f"; {' and '.join(fallback_note)} from its peak x the fitted phone efficiency"
    if not measured:
        who = engine if ratio is None else "pocketlm"
        note += f"; {who} / {REFERENCE_ENGINE} speed assumed 1 (no --vs {REFERENCE_ENGINE} run)"
    if not matched:
        note += f"; no {family} rows on this device, {used_family} rows used"
    band_d = bands.get((band_path if "decode" not in fallback_note else "fallback", "decode"), math.nan)
    band_p = bands.get((band_path if "prefill" not in fallback_note else "fallback", "prefill"), math.nan)
    return PhoneEstimate(dec * rd / bytes_per_token, pre * rp / ops_per_token, basis, band_d, band_p, n,
                         used_family, matched, rd, rp, measured, note)


def _fitted_devices(rows: Sequence[Measurement], devices: dict, family: str) -> int:
    return len({r.device for r in rows if r.engine == REFERENCE_ENGINE and r.family == family
                and r.device in devices and r.achieved("decode") is not None})


# ---------------------------------------------------------------------------- leave-one-out

@dataclass(frozen=True)
class LooResult:
    row: Measurement
    path: str        # calibrated (from the same device's other rows) or fallback (device left out)
    metric: str      # decode or prefill
    projected: float
    error: float     # projected / published - 1


def leave_one_out(rows: Sequence[Measurement], devices: dict, prefill_peak: str = "bandwidth") -> list[LooResult]:
    """Project every row from the others, both ways the bench can: 'calibrated' from the other rows
    of its device, engine and quantization family (rate x scale, median, / its scale); 'fallback'
    with its whole device left out, from the peak efficiency the other devices' reference-engine
    rows of its family reach. Lower bounds and rows without bytes or weights are not projected."""
    out = []
    for metric in ("decode", "prefill"):
        for r in rows:
            if r.achieved(metric) is None:
                continue
            peers = [o for o in rows if o is not r and o.device == r.device and o.engine == r.engine
                     and o.family == r.family]
            rate = achieved_rate(peers, metric)
            if rate is not None:
                p = rate / r.scale(metric)
                out.append(LooResult(r, "calibrated", metric, p, p / r.rate(metric) - 1))
            if r.engine == REFERENCE_ENGINE and r.device in devices:
                eff = phone_efficiency(rows, devices, r.family, metric, r.device, prefill_peak)
                if eff is not None:
                    p = eff * _peak(devices[r.device], metric, prefill_peak) / r.scale(metric)
                    out.append(LooResult(r, "fallback", metric, p, p / r.rate(metric) - 1))
    return out


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile by linear interpolation (numpy's default), nan for no values."""
    v = sorted(values)
    if not v:
        return math.nan
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def error_summary(results: Sequence[LooResult]) -> dict[tuple[str, str], dict[str, float]]:
    """(path, metric) -> n, median |error|, 90th percentile |error|, max |error|, median signed error."""
    out = {}
    for path in ("calibrated", "fallback"):
        for metric in ("decode", "prefill"):
            errs = [x.error for x in results if x.path == path and x.metric == metric]
            if errs:
                a = [abs(e) for e in errs]
                out[(path, metric)] = {"n": len(errs), "median_abs": statistics.median(a),
                                       "p90_abs": quantile(a, BAND_QUANTILE), "max_abs": max(a),
                                       "median": statistics.median(errs)}
    return out


def bands_from(results: Sequence[LooResult]) -> dict[tuple[str, str], float]:
    """(path, metric) -> relative band. A phone run of the engine itself ('measured') is taken to be
    as good as a calibration on the same device."""
    s = error_summary(results)
    bands = {k: v["p90_abs"] for k, v in s.items()}
    for metric in ("decode", "prefill"):
        if ("calibrated", metric) in bands:
            bands[("measured", metric)] = bands[("calibrated", metric)]
    return bands


def verdict(value: float, band: float, threshold: float, higher_is_better: bool = True) -> str:
    """pass / fail when the whole band value x (1 +- band) is on one side of the threshold,
    borderline when the threshold is inside it."""
    if not math.isfinite(value):
        return "fail"
    band = band if math.isfinite(band) else 0.0
    lo, hi = value * (1 - band), value * (1 + band)
    if higher_is_better:
        return "pass" if lo >= threshold else "fail" if hi < threshold else "borderline"
    return "pass" if hi <= threshold else "fail" if lo > threshold else "borderline"
