"""Choosing the next token from the logits, numpy only.

The chain follows llama.cpp's default sampler order:
    repetition penalty -> top-k -> top-p -> min-p -> temperature -> draw
  * repetition penalty r (1.0 = off): for each distinct token among the last `repeat_last_n`,
    a positive logit is divided by r and a negative one multiplied by r.
  * temperature <= 0: greedy (argmax of the penalised logits; the lowest id wins a tie).
  * top-k (0 = off) keeps the k largest logits; top-p (1.0 = off) the smallest set of the most
    likely tokens whose probability reaches p; min-p (0 = off) drops tokens whose probability is
    below min_p times the most likely token's. top-p and min-p use the probabilities before the
    temperature, as llama.cpp does; the temperature then divides the surviving logits.
  * seed: the draws come from numpy's PCG64 seeded with it (None: fresh entropy).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import PocketLMError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None

    def validate(self) -> SamplingParams:
        def bad(msg: str) -> PocketLMError:
            return PocketLMError(f"sampling: {msg}")

        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise bad(f"temperature must be >= 0, got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad(f"top_k must be an integer >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise bad(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad(f"min_p must be in [0, 1], got {self.min_p}")
        if not np.isfinite(self.repeat_penalty) or self.repeat_penalty <= 0:
            raise bad(f"repeat_penalty must be > 0, got {self.repeat_penalty}")
        if not isinstance(self.repeat_last_n, int) or self.repeat_last_n < 0:
            raise bad(f"repeat_last_n must be an integer >= 0, got {self.repeat_last_n}")
        return self


class Sampler:
    def __init__(self, params: SamplingParams | None = None):
        self.params = (params or SamplingParams()).validate()
        self.rng = np.random.default_rng(self.params.seed)

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        """The next token id for logits [V] after the tokens `history` (for the penalty)."""
        p = self.params
        logits = apply_repeat_penalty(logits, history[-p.repeat_last_n:] if p.repeat_last_n else (),
                                      p.repeat_penalty)
        if p.temperature <= 0:
            return int(np.argmax(logits))
        ids, kept = candidates(logits, p.top_k, p.top_p, p.min_p)
        probs = softmax(kept / np.float32(p.temperature))
        return int(ids[self.rng.choice(ids.size, p=probs)])


def apply_repeat_penalty(logits: np.ndarray, recent: Sequence[int], penalty: float) -> np.ndarray:
    """A copy of logits [V] with llama.cpp's penalty on the distinct tokens of `recent`."""
    if penalty == 1.0 or len(recent) == 0:
        return logits
    out = np.array(logits, dtype=np.float32, copy=True)
    ids = np.unique(np.asarray(recent, dtype=np.int64))
    vals = out[ids]
    out[ids] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - np.max(x))
    return e / e.sum()


def candidates(logits: np.ndarray, top_k: int, top_p: float, min_p: float) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, their logits) surviving top-k, top-p and min-p, most likely first."""
    v = logits.shape[0]
    ids = np.argpartition(-logits, top_k - 1)[:top_k] if 0 < top_k < v else np.arange(v)
    ids = ids[np.lexsort((ids, -logits[ids]))]           # descending logit, ties by lower id
    kept = logits[ids].astype(np.float32)
    probs = softmax(kept)
    if top_p < 1.0:
        cum = np.cumsum(probs)
        n = int(np.searchsorted(cum, top_p) + 1)         # smallest prefix reaching top_p
        ids, kept, probs = ids[:n], kept[:n], probs[:n]
    if min_p > 0.0:
        keep = probs >= min_p * probs[0]
        ids, kept = ids[keep], kept[keep]
    return ids, kept
