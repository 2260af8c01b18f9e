"""MatMulNBits `accuracy_level`: float32 or int8 activations, what int8 costs, and "auto".

Level 4 quantizes each activation block (block_size values along K) to int8 before the dot
products: 3-5x faster per 4-bit matmul on CPU (VNNI on x86, sdot/i8mm on ARM) -- the same kind of
arithmetic as llama.cpp's Q4_0/Q4_K dot products (activations rounded to Q8_0/Q8_K) and pocketlm's
kernel. On a model whose activations carry outlier channels the rounding of the other values in an
outlier's block grows, and onnxruntime issue 29849 reports flipped top tokens on Phi-3.5-mini.

So the cost is measured, not assumed: `int8_activation_cost` runs a probe text through the exported
folder at level 1 (float32 activations: the GGUF's model to float32 rounding) and at level 4, and
reports the mean KL divergence KL(P_level1 || P_level4) in nats per position and the top-1
agreement. `LevelCost.acceptable` holds when both stay inside the thresholds below; `pocketlm
export --accuracy-level auto` (the default) writes level 4 then, else level 1.

The thresholds come from `python benchmarks/onnx_level_quality.py` (README "ONNX export"): KL from
fp32 on 8,160 held-out tokens, pocketlm rtn files, the built-in model and its outlier copy (a few
channels 20-50x, the same function):
                                     Q4_0 L1   Q4_0 L4   Q4_K_M L1  Q4_K_M L4  KL(L1,L4)     top-1 L1=L4
  built-in model                     0.00369   0.00375   0.00273    0.00289    5e-5 / 1.4e-4 99.3 / 98.8 %
  outlier copy                       0.01545   0.01813   0.03287    0.04198    2.7e-3 / 8.5e-3 94.8 / 92.4 %
  the probe (128 tokens), KL(L1,L4): built-in 5.8e-5 / 1.7e-4 (top-1 100 / 99.2 %), outlier copy
  3.5e-3 / 1.2e-2 (94.5 / 91.4 %).
On the built-in model level 4 adds 0.00006 nats to Q4_0's KLD: 1/16 of the step from Q4_0 to
Q4_K_M (0.00096), the quality choice users make by picking a file. On the outlier copy it adds
0.0027-0.009, more than that whole step.
  - MAX_KLD = 0.0005 nats: half the built-in model's Q4_0 -> Q4_K_M step, so that choosing speed
    never costs as much as a quantization grade; 3x above the largest built-in cost the probe
    measured, 7x below the smallest outlier cost.
  - MIN_TOP1 = 0.97: up to 3 flips in 128 probe positions (near-ties: the built-in files flip 0-1),
    never the 5-9 % of the outlier copy.
The probe is a fixed English paragraph (PROBE_TEXT): any real text exercises the activation
outliers, which are properties of channels, not of topics. It runs through
`onnx_runner.CachedSession` (KV buffers shared between past and present), so it works for
Phi-3-small's SparseAttention layers as for GroupQueryAttention.
"""

from __future__ import annotations

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

MAX_KLD = 0.0005  # nats per position, mean KL(P_level1 || P_level4) on the probe (see module doc)
MIN_TOP1 = 0.97    # fraction of probe positions whose top-1 token level 4 keeps


@dataclass(frozen=True)
class LevelCost:
    """What int8 activations (level 4) change against float32 ones (level 1) on some tokens."""

    tokens: int         # positions compared
    kld: float          # mean KL(P_level1 || P_level4), nats
    kld_max: float      # the largest single-position KL, nats
    top1: float         # fraction of positions with the same argmax
    max_logit_diff: float  # max |logit difference| / max |level-1 logit|

    @property
    def flips(self) -> int:
        return round((1.0 - self.top1) * self.tokens)

    @property
    def acceptable(self) -> bool:
        return self.kld <= MAX_KLD and self.top1 >= MIN_TOP1

    def __str__(self) -> str:
        return (f"int8 activations on a {self.tokens}-token probe: KL from float32 activations "
                f"{self.kld:.2e} nats (max {self.kld_max:.2e}; threshold {MAX_KLD:g}), top-1 kept "
                f"{100 * self.top1:.1f} % ({self.flips} top-1 changes; threshold {100 * MIN_TOP1:g} %), "
                f"max logit difference {self.max_logit_diff:.2e} of the largest logit")


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
                 level: int, threads: int = 0) -> np.ndarray:
    """Logits [C, L, V] of token chunks [C, L] (each one prompt from an empty cache), with the
    folder's model rewritten to `level` (a variant file beside the data file it references)."""
    import onnxruntime as ort

    chunks = np.asarray(chunks, np.int64)
    folder = Path(folder)
    variant = folder / f".level{level}.{model_file}"
    set_accuracy_level(folder / model_file, level, variant)
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(variant), opts, providers=["CPUExecutionProvider"])
        # past and present bound to one buffer: SparseAttention (Phi-3-small) runs only that way
        return np.stack([CachedSession(sess, max_cache=chunks.shape[1])(c.tolist()) for c in chunks])
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


def compare_levels(exact: np.ndarray, fast: np.ndarray) -> LevelCost:
    """LevelCost of level-4 logits `fast` against level-1 logits `exact` (both [..., V])."""
    kl, agree = kld_top1(exact, fast)
    rel = float(np.abs(fast - exact).max() / max(float(np.abs(exact).max()), 1e-30))
    return LevelCost(int(kl.size), float(kl.mean()), float(kl.max()), float(agree.mean()), rel)


def int8_activation_cost(folder: str | os.PathLike, model_file: str, tokens: list[int]) -> LevelCost:
    """Run `tokens` as one prompt at level 1 and at level 4 and compare (two sessions, one at a time)."""
    exact = prompt_logits(folder, model_file, tokens, 1)
    fast = prompt_logits(folder, model_file, tokens, 4)
    return compare_levels(exact, fast)


def int8_activation_check(folder: str | os.PathLike, model_file: str, tokens: list[int]) -> tuple[bool, str]:
    """-> (level 4's cost on `tokens` is acceptable, a one-line account)."""
    cost = int8_activation_cost(folder, model_file, tokens)
    return cost.acceptable, str(cost)
