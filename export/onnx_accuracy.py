"""MatMulNBits `accuracy_level`: float32 or int8 activations, what int8 costs, and "auto".

Level 4 quantizes each activation block (block_size values along K) to int8 before the dot
products: 3-5x faster per 4-bit matmul on CPU (VNNI on x86, sdot/i8mm on ARM) -- the same kind of
arithmetic as llama.cpp's Q4_0/Q4_K dot products (activations rounded to Q8_0/Q8_K) and pocketlm's
kernel. On a model whose activations carry outlier channels the rounding of the other values in an
outlier's block grows, and onnxruntime issue 29849 reports flipped top tokens on Phi-3.5-mini.

So the cost is measured, not assumed: `int8_activation_cost` runs a probe text through the exported
folder at level 1 (float32 activations: the GGUF's model to float32 rounding), at level 4, and --
the yardstick -- at level 1 with the weights given one more rounding's worth of noise
(`rounding_noise_scales`: every block scale times 1 + sigma*n, which puts s^2/12 of error variance
on each weight, as rounding to the file's own grid does). It compares the mean KL divergence
KL(P_level1 || P_level4) per position with KL(P_level1 || P_yardstick), and the top-1 token at
confident positions. The yardstick makes the criterion scale-free: what a model's quantization
costs differs by orders of magnitude between models (a 4 M-parameter trained model, Q4_0 vs fp32:
0.004 nats; a random phi-3-mini-shaped model: 0.24), and int8 activations matter only relative to
it -- the question the issue asks ("a cost well below the Q4_0 -> Q4_K_M difference is not a reason
to ship a 3x slower file"). `LevelCost.acceptable`, behind `pocketlm export --accuracy-level auto`
(the default): top-1 kept on >= MIN_TOP1 of the positions whose level-1 top-1 probability is >=
CONFIDENT, and KL(L1, L4) <= FLOOR_KLD or <= MAX_RATIO x the yardstick's KL.

The numbers (`python benchmarks/onnx_level_quality.py`, README "ONNX export"; KL in nats vs fp32 on
8,160 held-out tokens; pocketlm rtn files; "outlier copy": the built-in model with 4 hidden and 4
feed-forward channels scaled 20-50x, the same function):
                     Q4_0 L1  Q4_0 L4  Q4_K_M L1  Q4_K_M L4  probe: KL(L1,L4) / yardstick = ratio
  built-in model     0.00369  0.00375  0.00273    0.00289    Q4_0 5.8e-5 / 0.0044 = 0.013
                                                             Q4_K_M 1.7e-4 / 0.0032 = 0.054
  outlier copy       0.01545  0.01813  0.03287    0.04198    Q4_0 3.5e-3 / 0.0048 = 0.72
                                                             Q4_K_M 1.2e-2 / 0.048 = 0.24
  random 8-layer phi-3-mini shape (benchmarks/onnx_vs_builder.py), Q4_0 vs fp32 0.24, Q4_K_M
  0.13 (pocketlm eval, 254 tokens): probe Q4_0 1.1e-3 / 0.20 = 0.006, Q4_K_M 2.9e-3 / 0.11 = 0.027
The yardstick tracks the real quantization KL (built-in Q4_0: 0.0044 against 0.0037 measured; random
Q4_0: 0.20 against 0.24), so the ratio is "what level 4 adds, as a fraction of what the file's own
rounding costs": 1-5 % where level 4 is harmless (it adds 0.00006 nats to the built-in Q4_0 file,
1/16 of the Q4_0 -> Q4_K_M step of 0.00096), 24-72 % on the outlier copy (where it adds 0.003-0.009,
17-28 % of the file's whole quantization cost).
  - MAX_RATIO = 0.1: 2x above the largest accepted ratio (0.054), 2.4x below the smallest outlier one.
  - MIN_TOP1 = 0.97 of confident positions (CONFIDENT = 0.2): the built-in files flip none of ~92,
    the outlier copy 1-2; a near-uniform model (the random one: top-1 probability 0.002) has no
    confident position, and its top-1 flips carry no meaning.
  - FLOOR_KLD = 1e-4 nats: below it level 4 is accepted without a yardstick (F16/F32 layers have
    no rounding to compare with).
The probe is a fixed English paragraph (PROBE_TEXT): any real text exercises the activation
outliers, which are properties of channels, not of topics. It runs through
`onnx_runner.CachedSession` (KV buffers shared between past and present), so it works for
Phi-3-small's SparseAttention layers as for GroupQueryAttention.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .onnx_runner import CachedSession

# A plain English paragraph (about 130 Phi-3 tokens): the probe of `--accuracy-level auto`.
PROBE_TEXT = ("The committee met on Tuesday to review the budget for the coming year. After a long "
              "discussion about roads, schools and the new library, the members agreed to publish "
              "their report in March, and the mayor thanked everyone for their patience. Several "
              "residents had written letters asking for a safer crossing near the river, where the "
              "old bridge is too narrow for both cars and bicycles. The engineer said that a wider "
              "bridge would cost twice as much as repairs, but would last for fifty years instead of "
              "ten. In the end the council voted to ask the state for help, and to decide in the "
              "autumn, when the final figures from the contractors are known.")

MAX_RATIO = 0.1    # level 4's KL from level 1 / the KL one more weight rounding causes (see module doc)
MIN_TOP1 = 0.97    # fraction of confident probe positions (level-1 top-1 probability >= CONFIDENT)
CONFIDENT = 0.2    # whose top-1 token level 4 keeps; flat positions flip on any noise
FLOOR_KLD = 1e-4   # nats: below this, level 4 is accepted whatever the yardstick (F16 files have none)


@dataclass(frozen=True)
class LevelCost:
    """What int8 activations (level 4) change against float32 ones (level 1) on some tokens, beside
    the yardstick: what one more rounding of the file's weights changes (`rounding_noise_scales`)."""

    tokens: int         # positions compared
    kld: float          # mean KL(P_level1 || P_level4), nats
    kld_max: float      # the largest single-position KL, nats
    top1: float         # fraction of confident positions with the same argmax (1.0 if none)
    confident: int      # positions whose level-1 top-1 probability is >= CONFIDENT
    max_logit_diff: float  # max |logit difference| / max |level-1 logit|
    rounding_kld: float | None = None  # mean KL(P_level1 || P_level1 with rounding noise), nats

    @property
    def flips(self) -> int:
        return round((1.0 - self.top1) * self.confident)

    @property
    def ratio(self) -> float | None:
        return None if not self.rounding_kld else self.kld / self.rounding_kld

    @property
    def acceptable(self) -> bool:
        if self.top1 < MIN_TOP1:
            return False
        if self.kld <= FLOOR_KLD:
            return True
        return self.ratio is not None and self.ratio <= MAX_RATIO

    def __str__(self) -> str:
        if self.ratio is None:  # not measured, or weights without rounding (F16/F32 layers)
            yard = f"(no rounding yardstick; floor {FLOOR_KLD:g} nats)"
        else:
            yard = (f"= {self.ratio:.3f} of the {self.rounding_kld:.2e} nats one more rounding of the weights "
                    f"costs (threshold {MAX_RATIO:g}, floor {FLOOR_KLD:g} nats)")
        if self.confident:
            top = (f"top-1 kept on {100 * self.top1:.1f} % of {self.confident} confident positions "
                   f"({self.flips} changes; threshold {100 * MIN_TOP1:g} %)")
        else:
            top = f"no confident position (top-1 probability >= {CONFIDENT:g}) whose top-1 could change"
        return (f"int8 activations on a {self.tokens}-token probe: KL from float32 activations "
                f"{self.kld:.2e} nats {yard}; {top}; max logit difference {self.max_logit_diff:.2e} "
                f"of the largest logit")


def set_accuracy_level(model_path: str | os.PathLike, level: int,
                       out_path: str | os.PathLike | None = None) -> None:
    """Rewrite every MatMulNBits' accuracy_level in a model.onnx (its weights stay in the data file);
    written to a temporary name and renamed, so a reader never sees half a file."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            for a in node.attribute:
                if a.name == "accuracy_level":
                    a.i = level
    for entry in model.metadata_props:
        if entry.key == "pocketlm.accuracy_level":
            entry.value = str(level)
    out = Path(out_path or model_path)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(model.SerializeToString())
    os.replace(tmp, out)


def level_logits(folder: str | os.PathLike, model_file: str, chunks: np.ndarray | list[list[int]],
                 level: int, threads: int = 0, overrides: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Logits [C, L, V] of token chunks [C, L] (each one prompt from an empty cache), with the
    folder's model rewritten to `level` (a variant file beside the data file it references);
    `overrides`: initializer name -> array used in place of the stored one."""
    import onnxruntime as ort

    chunks = np.asarray(chunks, np.int64)
    folder = Path(folder)
    variant = folder / f".level{level}.{model_file}"
    set_accuracy_level(folder / model_file, level, variant)
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = threads
        kept = [ort.OrtValue.ortvalue_from_numpy(v) for v in (overrides or {}).values()]  # alive with sess
        for name, value in zip(overrides or {}, kept, strict=True):
            opts.add_initializer(name, value)
        sess = ort.InferenceSession(str(variant), opts, providers=["CPUExecutionProvider"])
        config = folder / "genai_config.json"  # head_size, for folders that leave it symbolic (builder)
        hd = json.loads(config.read_text())["model"]["decoder"]["head_size"] if config.is_file() else None
        # past and present bound to one buffer: SparseAttention (Phi-3-small) runs only that way
        return np.stack([CachedSession(sess, chunks.shape[1], hd)(c.tolist()) for c in chunks])
    finally:
        variant.unlink(missing_ok=True)


def prompt_logits(folder: str | os.PathLike, model_file: str, tokens: list[int], level: int) -> np.ndarray:
    """Logits [T, V] of `tokens` as one prompt, with the folder's model at `level`."""
    return level_logits(folder, model_file, [list(tokens)], level)[0]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-probabilities over the last axis."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def kld_top1(p_logits: np.ndarray, q_logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per position ([..., V] -> [...]): KL(P || Q) in nats and whether the argmaxes agree; the
    same quantity as `pocketlm eval` (quantize/evaluate.py) and llama.cpp's --kl-divergence."""
    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return (np.exp(lp) * (lp - lq)).sum(axis=-1), p_logits.argmax(-1) == q_logits.argmax(-1)


def compare_levels(exact: np.ndarray, fast: np.ndarray, rounded: np.ndarray | None = None) -> LevelCost:
    """LevelCost of level-4 logits `fast` against level-1 logits `exact` (both [..., V]); `rounded`:
    level-1 logits of the model with rounding noise on its weights (the yardstick), if measured."""
    kl, agree = kld_top1(exact, fast)
    lp = log_softmax(exact)
    confident = lp.max(-1) >= np.log(CONFIDENT)
    # no confident position (a near-uniform model): no top-1 token means anything, nothing to keep
    top1 = float(agree[confident].mean()) if confident.any() else 1.0
    rel = float(np.abs(fast - exact).max() / max(float(np.abs(exact).max()), 1e-30))
    noise = None if rounded is None else float(kld_top1(exact, rounded)[0].mean())
    return LevelCost(int(kl.size), float(kl.mean()), float(kl.max()), top1, int(confident.sum()), rel, noise)


def _read_initializer(folder: Path, t) -> np.ndarray:
    """One initializer's array, from model.onnx or the external data file (only its bytes)."""
    from onnx import helper, numpy_helper

    if t.data_location != 1:  # inline
        return numpy_helper.to_array(t)
    ext = {e.key: e.value for e in t.external_data}
    dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
    count = int(ext["length"]) // dtype.itemsize
    return np.fromfile(folder / ext["location"], dtype, count, offset=int(ext.get("offset", 0))).reshape(t.dims)


def _codes(folder: Path, inits: dict, node, rows: int) -> np.ndarray:
    """A MatMulNBits node's codes minus zero points, float64 [rows, K/block, block] (first rows)."""
    bits = next(a.i for a in node.attribute if a.name == "bits")
    b = _read_initializer(folder, inits[node.input[1]])[:rows]
    kb = b.shape[1]
    codes = np.stack([b & 0x0F, b >> 4], -1).reshape(*b.shape[:2], -1) if bits == 4 else b
    zname = node.input[3] if len(node.input) > 3 else ""
    if not zname:
        return codes.astype(np.float64) - float(1 << (bits - 1))
    zp = _read_initializer(folder, inits[zname])[:rows]
    if bits == 4:
        zp = np.stack([zp & 0x0F, zp >> 4], -1).reshape(zp.shape[0], -1)[:, :kb]
    return codes.astype(np.float64) - zp.astype(np.float64)[..., None]


def rounding_noise_scales(folder: str | os.PathLike, model_file: str, seed: int = 0,
                          sample_rows: int = 256) -> dict[str, np.ndarray]:
    """Every MatMulNBits' scales [N, K/block] times (1 + sigma * n), n ~ N(0, 1) per block: noise on
    the weights (q - z) * s of the same variance as one more rounding to the file's grid, s^2 / 12
    per weight (sigma^2 = 1 / (12 E[(q - z)^2]), E over the first `sample_rows` rows). A block-wide
    factor keeps the noisy model in the file's own format (only the scales, 1/16-1/8 of its bytes,
    are copied). An 8-bit layer written as two 4-bit halves (level 1: lo + 16 hi) gets one factor
    for both, computed from the whole code, so the sum carries the noise of the 8-bit weight."""
    import onnx

    folder = Path(folder)
    model = onnx.load(str(folder / model_file), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    layers: dict[str, list] = {}  # layer prefix -> its MatMulNBits node(s)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            layers.setdefault(node.name.rsplit("/", 1)[0], []).append(node)
    rng = np.random.default_rng(seed)
    out = {}
    for nodes in layers.values():
        if len(nodes) == 2 and {n.name[-3:] for n in nodes} == {"_lo", "_hi"}:
            lo, hi = sorted(nodes, key=lambda n: n.name[-3:] != "_lo")
            centred = _codes(folder, inits, lo, sample_rows) + 16.0 * _codes(folder, inits, hi, sample_rows)
        else:
            nodes = nodes[:1]
            centred = _codes(folder, inits, nodes[0], sample_rows)
        sigma = 1.0 / np.sqrt(12.0 * max(float(np.mean(centred ** 2)), 1e-12))
        shape = tuple(inits[nodes[0].input[2]].dims)
        factor = 1.0 + sigma * rng.standard_normal(shape)
        for n in nodes:
            out[n.input[2]] = (_read_initializer(folder, inits[n.input[2]]) * factor).astype(np.float32)
    return out


def int8_activation_cost(folder: str | os.PathLike, model_file: str, tokens: list[int],
                         yardstick: bool = True) -> LevelCost:
    """Run `tokens` as one prompt at level 1, at level 4 and (yardstick) at level 1 with rounding
    noise on the weights (`rounding_noise_scales`); compare. Sessions run one at a time."""
    exact = prompt_logits(folder, model_file, tokens, 1)
    fast = prompt_logits(folder, model_file, tokens, 4)
    rounded = None
    if yardstick:
        noise = rounding_noise_scales(folder, model_file)
        if noise:
            rounded = level_logits(folder, model_file, [list(tokens)], 1, overrides=noise)[0]
    return compare_levels(exact, fast, rounded)


def int8_activation_check(folder: str | os.PathLike, model_file: str, tokens: list[int]) -> tuple[bool, str]:
    """-> (level 4's cost on `tokens` is acceptable, a one-line account)."""
    cost = int8_activation_cost(folder, model_file, tokens)
    return cost.acceptable, str(cost)
