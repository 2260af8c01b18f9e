"""Phone projections calibrated on published phone-CPU measurements, and how good they are.

The data: `phone_measurements.json` beside this file (published rows with their sources; rows measured
with `pocketlm bench --device auto` on a phone slot in as they are), plus any files named in
$POCKETLM_PHONE_MEASUREMENTS (os.pathsep-separated; each a measurements file or a bench JSON).

Decode at batch 1 is bandwidth-bound: a phone that ran a model of B bytes per token at T tok/s
achieved B x T bytes/s, and a file of B' bytes per token runs at about B x T / B' on it (B counts
every matrix once and the token embedding one row, though llama.cpp loads a tied embedding twice:
see the data's `about`). The achieved bandwidth of a device is the median of B x T over its rows of
one engine and quantization family (llama.cpp's kernels differ by type: its repacked Q4_0 path is
not its Q4_K path).

Prefill is compute-bound: a prompt token multiplies every weight once (2 ops per weight; the weights
are reused across the prompt's tokens, so their bytes hardly matter), so prefill is normalised by
ops per token = 2 x weights, not bytes. Within one quantization family the two are nearly
proportional; across families (Q4_0 vs Q8_0) bytes would mislead, and they did: scaling prefill by
bytes gives leave-one-out errors of 16 % at the 90th percentile and 29 % at most, against 11 % and
16 % by weights (benchmarks/phone_projection_check.py).

Prefill is calibrated per quantization family (a device's Q4_0 rows predict Q4_0 files, its K-quant
rows K-quant files), with one rule for what a family's name does not say. A K-quant block spans 256
weights of a row, so llama.cpp stores a matrix whose rows are not a multiple of 256 in a 32-block
type instead (src/llama-quant.cpp `tensor_type_fallback`: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0),
which runs on other kernels (PocketPal's logs hold 285 MiB more of gemma-3-1b Q4_K_M than of its
Q4_0 twin outside llama.cpp's repacked int8-matmul buffers, about its Q5_0 matrices' size, and that
file prefills at half its peers' rate). A K-quant file's prompt token therefore costs
ops x (1 - s + s / rho): s, the share of its weights in such matrices (`k_fallback_share`, from
the model's shapes: 0 for every Phi-3 and most models, 0.76 for gemma-3-1b, hidden size 1152);
rho, the fallback matrices' rate relative to the family's own kernels, fitted per family on the
rows with s > 0 against their own device's rows with s = 0 (`fallback_ratios`). Every prefill rate
is compared in these units (decode is not: its bytes already count what the fallback types read).
In the shipped data only gemma-3-1b has s > 0, so rho rests on one model on three phones (0.44;
the leave-one-out refits it without the row it projects).

Models differ beyond their bytes and weights: every phone prefills phi-3.5-mini 12-21 % slower per
weight than its other models, in every family. So a file's rate on a device comes from the device's
rows of the file's shape (`shape_key`: the matrices a token multiplies; phi-3-mini and phi-3.5-mini
share one) when it has some in that family; else, for prefill, from its rows of other shapes x the
shape's effect, its rate against the other shapes on the phones that ran both (`shape_effect`; 1 for
a shape no phone ran); decode, whose per-model differences once bytes are right do not carry from
phone to phone (the effect made the check's decode medians worse), from the median over all the
device's rows.

Projection of engine E on device D for the user's file (quantization family Q):
  - "measured": D has rows of E itself (a phone run of pocketlm): their achieved rates, ratio 1.
  - "calibrated": D has llama.cpp rows of family Q: their achieved rates x (E / llama.cpp speed
    measured on this host on the same file; assumed 1 without a llama.cpp run, and labelled so).
  - "cross-family" (still basis "calibrated", with its own wider band): D has llama.cpp rows of
    another family only: their achieved rates x the Q / other-family ratio fitted on the devices
    that have both (`family_ratio`); without such devices the other family's rates as they are,
    with the fallback band.
  - "fallback" (the weaker estimate): D's DRAM peak x the share of peak that phones with llama.cpp
    rows of family Q achieve (median over devices); prefill likewise (see `_peak` for why the DRAM
    peak and not the int8 peak). One share for all phones: the measured LPDDR5X phones reach 28 %,
    36 % and 47 % of their peaks, which no DRAM type or core class in the profiles separates (a fit
    per DRAM type checked no better; each core generation has one measured phone).
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
PATHS = ("measured", "calibrated", "cross-family", "fallback")
LOO_PATHS = ("calibrated", "cross-family", "fallback")   # the paths the leave-one-out check can test
K_BLOCK = 256    # weights of a row one K-quant block spans (QK_K in llama.cpp's ggml-common.h)
# The metrics a model's shape effect (see shape_effect) corrects. Prefill only: phi-3.5-mini prefills
# 12-21 % below its phones' other models in every family, on every phone, and the leave-one-out check
# confirms the correction; decode, once bytes per token are right, varies by shape with no pattern that
# carries from phone to phone (with the correction the calibrated and cross-family decode medians were
# 3.1 % and 3.6 % against 2.5 % and 2.2 %: benchmarks/phone_projection_check.py).
SHAPE_METRICS = ("prefill",)

Shape = tuple[tuple[int, int, int], ...]   # see shape_key


def quant_family(quant: str | None) -> str:
    """Q4_K_M, Q4_K_S, q4_k -> Q4_K; Q4_0 -> Q4_0: llama.cpp's kernel is chosen by the block type."""
    q = (quant or "").upper()
    return "Q4_K" if q.startswith("Q4_K") else q


def is_k_family(family: str) -> bool:
    """Q4_K, Q6_K, ...: block-256 types, which llama.cpp cannot use for every matrix shape."""
    return "_K" in family


def matrix_shapes(model: dict[str, Any]) -> list[tuple[int, int, int]]:
    """(row length, rows, how many) of each weight matrix a prompt token multiplies, from a model's
    config (the `models` entries of phone_measurements.json): attention q, k and v, its output, the
    MLP's gate and up, its down projection, the output head. A fused qkv or gate_up matrix has the
    same row length as its parts, so the split does not change what follows."""
    h, inter, layers = model["hidden"], model["intermediate"], model["n_layers"]
    q, kv = model["n_heads"] * model["head_dim"], model["n_kv_heads"] * model["head_dim"]
    return [(h, q, layers), (h, kv, 2 * layers), (q, h, layers), (h, inter, 2 * layers),
            (inter, h, layers), (h, model["vocab"], 1)]


def shape_key(model: dict[str, Any]) -> Shape:
    """What a model's speed per weight can depend on: the weight matrices a token multiplies
    (`matrix_shapes`). Models that differ only in their weights or in a tied embedding share a key
    (phi-3-mini and phi-3.5-mini; qwen2.5-1.5b and deepseek-r1-distill-qwen-1.5b); phi-4-mini, with
    grouped-query attention and a 200 k vocabulary, does not share phi-3-mini's."""
    return tuple(matrix_shapes(model))


def k_fallback_share(model: dict[str, Any]) -> float:
    """Share of a model's matrix weights whose rows are not a multiple of 256: the part of a K-quant
    file that llama.cpp holds in a 32-block fallback type (see the module doc)."""
    mats = matrix_shapes(model)
    total = sum(cols * rows * n for cols, rows, n in mats)
    off = sum(cols * rows * n for cols, rows, n in mats if cols % K_BLOCK)
    return off / total if total else 0.0


def work_factor(share: float, rho: float | None) -> float:
    """A prompt token's work in units of the family's own kernels: the fallback share counts 1/rho
    (rho unknown: 1, the file taken as its family's)."""
    return 1.0 if not share or not rho else 1.0 - share + share / rho


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
    k_fallback_share: float = 0.0   # see k_fallback_share(); 0 for a row that is not a K-quant GGUF
    shape: Shape | None = None      # shape_key() of its model (None: shapes unknown)

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

    def achieved(self, metric: str, rho: float | None = None) -> float | None:
        """decode: achieved bytes/s; prefill: achieved ops/s in units of the family's own kernels
        (rho: see `fallback_ratios`). None if the row lacks either part or is a lower bound."""
        rate, scale = self.rate(metric), self.scale(metric, rho)
        return None if rate is None or scale is None or self.lower_bound else rate * scale

    def rate(self, metric: str) -> float | None:
        return self.decode_tok_s if metric == "decode" else self.prefill_tok_s

    def scale(self, metric: str, rho: float | None = None) -> float | None:
        """decode: bytes per token; prefill: ops per token x `work_factor` of the row's fallback share."""
        if metric == "decode":
            return self.bytes_per_token
        ops = self.ops_per_token
        return None if ops is None else ops * work_factor(self.k_fallback_share, rho)


_FIELDS = frozenset(Measurement.__dataclass_fields__) - {"shape"}   # shape: from the document's models


def parse_rows(doc: dict, where: str = "phone measurements") -> list[Measurement]:
    """Rows of a measurements document, checked: a device, engine, model, a non-empty source and
    positive rates (or null). A K-quant row's `k_fallback_share` comes from its model's shapes in the
    document's `models` (a row may give it itself; 0 when neither says), and so does every row's
    `shape` (None for a model the document does not describe)."""
    if doc.get("schema") != SCHEMA:
        raise PocketLMError(f"not a {SCHEMA} file (schema {doc.get('schema')!r})", where)
    out = []
    models = doc.get("models", {})
    for i, row in enumerate(doc.get("rows", [])):
        unknown = set(row) - _FIELDS - {"bytes_basis"}
        missing = [k for k in ("device", "engine", "model", "quant", "source") if not row.get(k)]
        if missing or unknown:
            raise PocketLMError(f"row {i}: missing {missing} / unknown keys {sorted(unknown)}", where)
        for k in ("decode_tok_s", "prefill_tok_s", "weight_bytes_per_token", "n_weight_params"):
            v = row.get(k)
            if v is not None and not (isinstance(v, int | float) and v > 0 and math.isfinite(v)):
                raise PocketLMError(f"row {i}: {k} must be a positive number or null, not {v!r}", where)
        share = row.get("k_fallback_share", _model_share(row, models))
        if not (isinstance(share, int | float) and 0 <= share <= 1):
            raise PocketLMError(f"row {i}: k_fallback_share must be within 0..1, not {share!r}", where)
        fields = {k: v for k, v in row.items() if k in _FIELDS}
        model = models.get(row["model"])
        out.append(Measurement(**{**fields, "k_fallback_share": float(share),
                                  "shape": shape_key(model) if model else None}))
    return out


def _model_share(row: dict, models: dict) -> float:
    model = models.get(row.get("model"))
    if model is None or not is_k_family(quant_family(row.get("quant"))):
        return 0.0
    return k_fallback_share(model)


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

Rho = dict[str, float]   # quantization family -> rho (see fallback_ratios)


def achieved_rate(rows: Sequence[Measurement], metric: str, rho: Rho | None = None) -> float | None:
    """Median achieved bytes/s (decode) or ops/s (prefill, in units of each row's family's own
    kernels given rho) over rows (None if none has it)."""
    rho = rho or {}
    vals = [v for r in rows if (v := r.achieved(metric, rho.get(r.family))) is not None]
    return statistics.median(vals) if vals else None


def shape_effect(rows: Sequence[Measurement], shape: Shape | None, metric: str, rho: Rho | None = None,
                 engine: str = REFERENCE_ENGINE) -> float:
    """How fast files of `shape` run against a phone's other models, measured where both ran: per
    (device, quantization family) of `engine`'s rows that holds the shape, the achieved rate of its
    rows of that shape / of its rows of other shapes; the median over those cells (every family
    pooled: phi-3.5-mini's deficit is the same in Q4_0, Q4_K and Q8_0, and a family with one phone of
    the shape would otherwise go uncorrected). 1 when no cell has both, or the shape is unknown."""
    if shape is None:
        return 1.0
    per_cell = []
    for device, family in sorted({(r.device, r.family) for r in rows if r.shape == shape and r.engine == engine}):
        cell = [r for r in rows if (r.device, r.engine, r.family) == (device, engine, family)]
        mine = achieved_rate([r for r in cell if r.shape == shape], metric, rho)
        others = achieved_rate([r for r in cell if r.shape != shape], metric, rho)
        if mine is not None and others is not None:
            per_cell.append(mine / others)
    return statistics.median(per_cell) if per_cell else 1.0


def shape_rate(here: Sequence[Measurement], metric: str, rho: Rho | None = None, shape: Shape | None = None,
               pool: Sequence[Measurement] = (), direct: bool = True,
               shape_metrics: Sequence[str] = SHAPE_METRICS) -> float | None:
    """A device's achieved rate for a file of `shape`, from `here` (its rows of one engine and family):
    its rows of that very shape when it has them (the most direct measurement; not with
    `direct=False`, for rows of another family than the file's: a shape's prefill rate in one family
    predicted its rate in another worse than the shape effect did); else, for `shape_metrics`, its
    rows of other shapes x `shape_effect` fitted on `pool`; else (and with the shape unknown) the
    median over all of `here` (`achieved_rate`)."""
    if shape is None:
        return achieved_rate(here, metric, rho)
    same = achieved_rate([r for r in here if r.shape == shape], metric, rho) if direct else None
    if same is not None:
        return same
    if metric not in shape_metrics:
        return achieved_rate(here, metric, rho)
    others = achieved_rate([r for r in here if r.shape != shape], metric, rho)
    engine = here[0].engine if here else REFERENCE_ENGINE
    return None if others is None else others * shape_effect(pool, shape, metric, rho, engine)


def fallback_ratios(rows: Sequence[Measurement]) -> Rho:
    """Per K-quant family, rho: the prefill rate of its fallback matrices / that of its own, the
    median over rows with a fallback share s > 0. A row that prefills at q x the rate of its
    device's s = 0 rows (same engine and family) spends 1/q = 1 - s + s/rho of their time per op,
    so rho = s / (1/q - 1 + s). Families with no such row (or no s = 0 row beside it) are left out:
    their files are taken at the family's rate."""
    fits: dict[str, list[float]] = {}
    for r in rows:
        s, raw = r.k_fallback_share, r.achieved("prefill")
        if not s or raw is None:
            continue
        own = [o for o in rows if (o.device, o.engine, o.family) == (r.device, r.engine, r.family)
               and not o.k_fallback_share]
        native = achieved_rate(own, "prefill")
        rest = None if native is None else native / raw - (1 - s)
        if rest is not None and rest > 0:   # else the row beat its family's rate: no ratio fits it
            fits.setdefault(r.family, []).append(s / rest)
    return {fam: statistics.median(v) for fam, v in fits.items()}


def _peak(device: Any, metric: str, prefill_peak: str = "bandwidth") -> float:
    """The figure a fallback estimate scales with: the DRAM peak (bytes/s) for decode; for prefill
    the DRAM peak too by default, or the big-core int8 peak estimate (ops/s) with
    prefill_peak="int8". Prefill is compute-bound, but our int8 peaks (cores x clock x SIMD pipes)
    predict phones' llama.cpp prefill poorly (leave-one-out median error 57 % against 29 % with the
    DRAM peak, which tracks the SoC generation): see benchmarks/phone_projection_check.py."""
    if metric == "decode" or prefill_peak == "bandwidth":
        return device.bandwidth_gbs * GB
    return device.int8_gops * GB


def _reference(rows: Sequence[Measurement], device: str, family: str | None = None) -> list[Measurement]:
    """The reference engine's rows on a device (of one family, if given)."""
    return [r for r in rows if r.device == device and r.engine == REFERENCE_ENGINE
            and (family is None or r.family == family)]


def phone_efficiency(rows: Sequence[Measurement], devices: dict, family: str, metric: str,
                     exclude_device: str | None = None, prefill_peak: str = "bandwidth",
                     rho: Rho | None = None, shape: Shape | None = None,
                     shape_metrics: Sequence[str] = SHAPE_METRICS) -> float | None:
    """Share of its peak that a phone reaches with the reference engine on a quantization family
    (for a file of `shape`, see `shape_rate`): per device its rate / its peak, then the median over
    devices."""
    per_device = []
    for key in sorted({r.device for r in rows}):
        if key == exclude_device or key not in devices:
            continue
        rate = shape_rate(_reference(rows, key, family), metric, rho, shape, rows, shape_metrics=shape_metrics)
        if rate is not None:
            per_device.append(rate / _peak(devices[key], metric, prefill_peak))
    return statistics.median(per_device) if per_device else None


def nearest_family(family: str, available: Iterable[str]) -> str | None:
    """The family to stand in for `family` when a device has none of it: Q4_0 (the 4-bit family
    with the most published rows) first, then by name; None if nothing else is available."""
    others = sorted(set(available) - {family}, key=lambda f: (f != "Q4_0", f))
    return others[0] if others else None


def family_ratio(rows: Sequence[Measurement], target: str, source: str, metric: str,
                 rho: Rho | None = None, exclude_device: str | None = None) -> tuple[float | None, int]:
    """The reference engine's achieved rate on `target` files / on `source` files: per device that
    has both, the ratio of its medians; then the median over those devices (and how many)."""
    per_device = []
    for key in sorted({r.device for r in rows} - {exclude_device}):
        t = achieved_rate(_reference(rows, key, target), metric, rho)
        s = achieved_rate(_reference(rows, key, source), metric, rho)
        if t is not None and s is not None:
            per_device.append(t / s)
    return (statistics.median(per_device) if per_device else None), len(per_device)


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


@dataclass
class _Source:
    """The rows an estimate rests on, how they carry over to the file, and what to call it."""

    rows: list[Measurement]
    basis: str                 # measured / calibrated / fallback
    band_path: str             # the leave-one-out path whose band applies
    family: str                # the family of `rows`
    carry: dict[str, float]    # per metric: the factor the rows' rates carry over to the file's family by
    note: str


def _device_source(device: Any, engine: str, family: str, rows: Sequence[Measurement],
                   rho: Rho) -> _Source | None:
    """The device's own rows for this file: the engine's own phone runs, else the reference engine's
    rows of the file's family, else of the nearest other family x the fitted family ratio."""
    own = [r for r in rows if r.device == device.key and r.engine == engine and r.family == family]
    if own and engine != REFERENCE_ENGINE:
        return _Source(own, "measured", "measured", family, {"decode": 1.0, "prefill": 1.0},
                       f"{len(own)} phone measurement(s) of {engine} itself")
    ref = _reference(rows, device.key, family)
    if ref:
        return _Source(ref, "calibrated", "calibrated", family, {"decode": 1.0, "prefill": 1.0},
                       f"{len(ref)} published {REFERENCE_ENGINE} measurement(s) on this device")
    other = nearest_family(family, {r.family for r in _reference(rows, device.key)})
    if other is None:
        return None
    use = _reference(rows, device.key, other)
    fits = {m: family_ratio(rows, family, other, m, rho, device.key) for m in ("decode", "prefill")}
    note = f"{len(use)} published {REFERENCE_ENGINE} measurement(s) on this device"
    if any(v is None for v, _ in fits.values()):   # no device has both: the other family as it is
        return _Source(use, "calibrated", "fallback", other, {"decode": 1.0, "prefill": 1.0},
                       note + f"; no {family} rows on this device, {other} rows used")
    n = min(n for _, n in fits.values())
    return _Source(use, "calibrated", "cross-family", other, {m: v for m, (v, _) in fits.items()},
                   note + f"; no {family} rows on this device: its {other} rows x the {family} / {other} "
                   f"ratio of {n} device(s) with both")


def _band(bands: dict[tuple[str, str], float], path: str, metric: str) -> float:
    """The band of a path; a cross-family estimate's is never narrower than a calibrated one's."""
    band = bands.get((path, metric), math.nan)
    if path == "cross-family":
        band = max(band, bands.get(("calibrated", metric), math.nan))
    return band


def estimate(device: Any, engine: str, family: str, bytes_per_token: float, ops_per_token: float,
             rows: Sequence[Measurement], devices: dict, ratio: dict[str, Any] | None,
             bands: dict[tuple[str, str], float], k_fallback_share: float = 0.0,
             shape: Shape | None = None) -> PhoneEstimate:
    """Project `engine` on `device` for a file of `bytes_per_token` and `ops_per_token` (see the
    module doc). ratio: {decode, prefill} of engine / llama.cpp measured on this host on the same
    file (with "assumed": True when it is relative to pocketlm, taken as fast as llama.cpp); None:
    assumed 1. k_fallback_share: the file's share of K-quant fallback matrices (0: none; the bench
    passes none, as every Phi-3 size has hidden and intermediate sizes that are multiples of 256).
    shape: the file's `shape_key` (None: unknown, the device's rows of every model taken alike), for
    the device's rows of that shape or, for prefill, the shape's effect (`shape_rate`)."""
    family = quant_family(family)
    rho = fallback_ratios(rows)
    work = {"decode": bytes_per_token, "prefill": ops_per_token * work_factor(k_fallback_share, rho.get(family))}
    src = _device_source(device, engine, family, rows, rho) or _Source(
        [], "fallback", "fallback", family, {"decode": 1.0, "prefill": 1.0},
        "no phone measurement on this device: its peak x the share of peak phones with "
        f"{REFERENCE_ENGINE} measurements reach (the weaker estimate)")
    if src.basis == "measured":   # the engine itself on this phone: no host ratio to carry it over
        rd, rp, measured = 1.0, 1.0, True
    else:
        rd, rp = (ratio or {}).get("decode", 1.0), (ratio or {}).get("prefill", 1.0)
        measured = (ratio is not None and not ratio.get("assumed")) or engine == REFERENCE_ENGINE
    rates, paths, gaps = {}, {}, []
    for metric in ("decode", "prefill"):
        rate = shape_rate(src.rows, metric, rho, shape, rows, direct=src.family == family)
        if rate is not None:
            rates[metric], paths[metric] = rate * src.carry[metric], src.band_path
        else:   # no row of the device has this metric: the fitted phone efficiency
            rates[metric] = _fallback_rate(device, family, metric, rows, devices, rho, shape)
            paths[metric] = "fallback"
            gaps.append(metric)
    note = _note(src, gaps, measured, engine, ratio) + _shape_note(src, family, shape, rows, rho)
    if k_fallback_share and family in rho:
        note += (f"; {k_fallback_share:.0%} of its weights in K-quant fallback matrices, "
                 f"run at {rho[family]:.2f}x the {family} rate")
    n = len(src.rows) if src.rows else _fitted_devices(rows, devices, family)
    return PhoneEstimate(rates["decode"] * rd / work["decode"], rates["prefill"] * rp / work["prefill"],
                         src.basis, _band(bands, paths["decode"], "decode"), _band(bands, paths["prefill"], "prefill"),
                         n, src.family, src.family == family, rd, rp, measured, note)


def _fallback_rate(device: Any, family: str, metric: str, rows: Sequence[Measurement], devices: dict,
                   rho: Rho, shape: Shape | None = None) -> float:
    """The device's peak x the phone efficiency of the family (of Q4_0 if no phone has the family)."""
    eff = (phone_efficiency(rows, devices, family, metric, rho=rho, shape=shape)
           or phone_efficiency(rows, devices, "Q4_0", metric, rho=rho, shape=shape))
    return eff * _peak(device, metric) if eff else math.nan


def _shape_note(src: _Source, family: str, shape: Shape | None, rows: Sequence[Measurement], rho: Rho) -> str:
    if shape is None:
        return ""
    same = [r for r in src.rows if r.shape == shape]
    metrics = [m for m in ("decode", "prefill") if any(r.achieved(m) is not None for r in same)]
    if metrics and src.family == family:
        return f"; {' and '.join(metrics)} from its {len(same)} row(s) of this model's shape"
    if "prefill" not in SHAPE_METRICS:
        return ""
    effect = shape_effect(rows, shape, "prefill", rho)
    return "" if effect == 1.0 else (f"; prefill x {effect:.2f}, this model shape's rate against the other "
                                     "models' on the phones that ran both")


def _note(src: _Source, gaps: list[str], measured: bool, engine: str, ratio: dict[str, Any] | None) -> str:
    note = src.note
    if gaps and src.rows:
        note += f"; {' and '.join(gaps)} from its peak x the fitted phone efficiency"
    if not measured:
        who = engine if ratio is None else "pocketlm"
        note += f"; {who} / {REFERENCE_ENGINE} speed assumed 1 (no --vs {REFERENCE_ENGINE} run)"
    return note


def _fitted_devices(rows: Sequence[Measurement], devices: dict, family: str) -> int:
    return len({r.device for r in rows if r.engine == REFERENCE_ENGINE and r.family == family
                and r.device in devices and r.achieved("decode") is not None})


# ---------------------------------------------------------------------------- leave-one-out

@dataclass(frozen=True)
class LooResult:
    row: Measurement
    path: str        # calibrated, cross-family or fallback (see leave_one_out)
    metric: str      # decode or prefill
    projected: float
    error: float     # projected / published - 1


def leave_one_out(rows: Sequence[Measurement], devices: dict, prefill_peak: str = "bandwidth",
                  shape_metrics: Sequence[str] = SHAPE_METRICS) -> list[LooResult]:
    """Project every row from the others, each way the bench can:
      'calibrated': from the other rows of its device, engine and quantization family;
      'cross-family' (reference-engine rows): with all its device's rows of its family left out,
        from the device's rows of the nearest other family x the family ratio of the other devices;
      'fallback' (reference-engine rows): with its whole device left out, from the peak efficiency
        the other devices' reference-engine rows of its family reach.
    rho (K-quant fallback matrices) and the shape effect (`shape_metrics`, see `shape_rate`) are refitted
    each time without the rows left out: a row's own phone's rows of its shape in other families
    count for the first two paths, never for the fallback. Lower bounds and rows without bytes or
    weights are not projected."""
    out = []
    for metric in ("decode", "prefill"):
        for r in rows:
            if r.achieved(metric) is None:
                continue
            for path, project in (("calibrated", _loo_calibrated), ("cross-family", _loo_cross_family),
                                  ("fallback", _loo_fallback)):
                p = project(r, rows, devices, metric, prefill_peak, shape_metrics)
                if p is not None:
                    out.append(LooResult(r, path, metric, p, p / r.rate(metric) - 1))
    return out


def _loo_calibrated(r: Measurement, rows: Sequence[Measurement], devices: dict, metric: str,
                    prefill_peak: str, shape_metrics: Sequence[str] = SHAPE_METRICS) -> float | None:
    rest = [o for o in rows if o is not r]
    rho = fallback_ratios(rest)
    peers = [o for o in rest if (o.device, o.engine, o.family) == (r.device, r.engine, r.family)]
    rate = shape_rate(peers, metric, rho, r.shape, rest, shape_metrics=shape_metrics)
    return None if rate is None else rate / r.scale(metric, rho.get(r.family))


def _loo_cross_family(r: Measurement, rows: Sequence[Measurement], devices: dict, metric: str,
                      prefill_peak: str, shape_metrics: Sequence[str] = SHAPE_METRICS) -> float | None:
    if r.engine != REFERENCE_ENGINE:
        return None
    rest = [o for o in rows if not (o.device == r.device and o.family == r.family)]
    other = nearest_family(r.family, {o.family for o in _reference(rest, r.device) if o.achieved(metric)})
    if other is None:
        return None
    rho = fallback_ratios(rest)
    ratio, _ = family_ratio(rest, r.family, other, metric, rho, r.device)
    base = shape_rate(_reference(rest, r.device, other), metric, rho, r.shape, rest, direct=False,
                      shape_metrics=shape_metrics)
    return None if ratio is None or base is None else base * ratio / r.scale(metric, rho.get(r.family))


def _loo_fallback(r: Measurement, rows: Sequence[Measurement], devices: dict, metric: str,
                  prefill_peak: str, shape_metrics: Sequence[str] = SHAPE_METRICS) -> float | None:
    if r.engine != REFERENCE_ENGINE or r.device not in devices:
        return None
    rest = [o for o in rows if o.device != r.device]
    rho = fallback_ratios(rest)
    eff = phone_efficiency(rest, devices, r.family, metric, prefill_peak=prefill_peak, rho=rho, shape=r.shape,
                           shape_metrics=shape_metrics)
    if eff is None:
        return None
    return eff * _peak(devices[r.device], metric, prefill_peak) / r.scale(metric, rho.get(r.family))


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
    for path in LOO_PATHS:
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
