"""Lossless speculative decoding with prompt lookup (`speculate="lookup"`).

Decode reads every weight once per token; a forward of T tokens reads them once for all T. When the
next tokens are already in the context (a pasted passage quoted, a list repeated, code edited), they
can be guessed for free and checked together:

  * draft: the last n tokens (n from `NGRAM_MAX` down to `NGRAM_MIN`) are looked up among the
    earlier tokens of the prompt and the text generated so far; the longest n-gram that occurred
    before gives the next draft token: the token that followed it most often, or, without one
    clear winner or when that token also followed its most recent occurrence, the run of tokens
    that followed that occurrence (prompt-lookup decoding, llama.cpp's `llama-lookup`). The lookup
    is repeated on the text plus the draft so far until K tokens are drafted, so a draft goes on
    past the end of the text it copies (a repeated line drafts its next repetition in full);
  * verify: `model.forward([last, d1 .. dk], all_logits=True)` is one batched forward through the
    KV cache; row i holds the logits after `last, d1 .. di`;
  * accept: greedy keeps d(i+1) when it is the argmax of row i (the token plain greedy would pick
    from those logits). Sampling uses the speculative-sampling rule for a deterministic draft
    (q = one-hot at d): accept d with probability p(d), where p is the sampler's own final
    distribution (penalty, top-k, top-p, min-p, temperature); on rejection draw from p with d
    removed and renormalised (max(0, p - q) normalised). Each emitted token then has exactly the
    distribution plain sampling gives it. The first rejection ends the step with the corrected
    token; when every draft is kept, the last row gives one more token for free;
  * roll back: the cache entries of rejected drafts are dropped with `Model.truncate` (f16, int8
    and f32 caches: the entries are per position, so truncation is exact).

Never slower: each verify is a bet. The controller keeps an acceptance estimate per n-gram length
(updated by verifies and, for free, by plain steps whose token can be compared with the draft's
first token) and a cost model c(T) of a T-token forward relative to one decode step (measured
online from the model's own forwards and kept across its generations, or a fixed table). It
verifies the k that maximises the expected tokens per unit cost, (1 + a + ... + a^k) / c(k + 1),
and takes a plain step unless that beats 1 by `MIN_GAIN`; so when drafts keep failing, or a batch
costs what k steps cost, it backs off to plain decoding while still watching whether the drafts
would have been right (and, with online costs, re-measures a batch after `EXPLORE` times its last
estimated cost in plain steps, so the re-measuring costs under 1 % of the time however dear it is).

Greedy output equals plain greedy's token for token as long as the batched forward's logits equal
the one-token forward's (on the quantized kernels they may differ in rounding: the tests compare
where no near-tie exists and check exactness on an F32 file).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..errors import PocketLMError
from .model import ROWS_IN_C
from .sampling import Sampler, SamplingParams, apply_repeat_penalty, candidates, softmax

if TYPE_CHECKING:
    from .model import Model

SPECULATE_MODES = ("lookup",)
DEFAULT_DRAFT_MAX = 8
MAX_DRAFT = ROWS_IN_C - 1  # a verify of up to ROWS_IN_C tokens runs the kernels whose rows are the decode
                           # steps' bits; a longer batch would take the tiled path, another float order
NGRAM_MAX = 4          # longest suffix looked up (longer matches predict better; tried first)
NGRAM_MIN = 1          # shortest; its drafts are often wrong, which the per-length estimate learns
MIN_GAIN = 1.05        # expected tokens per unit cost a verify must reach (margin for noisy costs)
PRIOR_ACCEPT = 0.5     # acceptance estimate before any observation (gain 1.0 at the prior slope: no bet)
PRIOR_SLOPE = 0.5      # cost per extra token of a batch, before any measurement (issue 15: 1.51x at T = 2)
EMA = 0.2              # weight of a new observation in the running estimates
EXPLORE = 256          # a likely draft is verified anyway after EXPLORE x c(2) one-token forwards, so
                       # a cost estimate that once ruled batches out is measured again at < 1 % of the time


# ---------------------------------------------------------------------------- drafting

class Followers:
    """What followed one n-gram: the position of the token after its most recent occurrence, and
    the token that followed it most often (`unique`: no other token as often)."""

    __slots__ = ("counts", "lead_count", "leader", "pos", "unique")

    def __init__(self, pos: int, token: int):
        self.pos, self.leader, self.lead_count, self.unique = pos, token, 1, True
        self.counts = {token: 1}

    def add(self, pos: int, token: int) -> None:
        self.pos = pos
        c = self.counts[token] = self.counts.get(token, 0) + 1
        if c > self.lead_count:
            self.leader, self.lead_count, self.unique = token, c, True
        elif c == self.lead_count and token != self.leader:
            self.unique = False


KEY_BITS = 32  # an n-gram's dictionary key: its token ids as digits in base 2**32 (ints hash faster
               # than tuples; drafting runs once per generated token)


class NGramIndex:
    """The tokens so far and, per n-gram length, what followed each n-gram: the position after its
    one occurrence (an int: most n-grams occur once), or `Followers` once it recurs. Updates and
    lookups are O(n) dictionary operations, never a scan."""

    def __init__(self, n_min: int = NGRAM_MIN, n_max: int = NGRAM_MAX):
        if not 1 <= n_min <= n_max:
            raise PocketLMError(f"n-gram lengths must satisfy 1 <= n_min <= n_max, got {n_min}, {n_max}")
        self.n_min, self.n_max = n_min, n_max
        self.seq: list[int] = []
        self._grams: dict[int, dict[int, int | Followers]] = {n: {} for n in range(n_min, n_max + 1)}
        self._tail = [0] * (n_max + 1)  # [n]: the key of the last n tokens (n <= len(seq))

    def _advance(self, tail: list[int], length: int, token: int) -> None:
        """tail (the keys after `length` tokens) -> the keys after one more, `token`."""
        for n in range(min(self.n_max, length + 1), 1, -1):
            tail[n] = (tail[n - 1] << KEY_BITS) | token
        tail[1] = token

    def append(self, token: int) -> None:
        seq, end, token, tail = self.seq, len(self.seq), int(token), self._tail
        if not 0 <= token < 1 << KEY_BITS:
            raise PocketLMError(f"token id {token} is out of range [0, 2**{KEY_BITS})")
        for n in range(self.n_min, min(self.n_max, end) + 1):
            table, gram = self._grams[n], tail[n]  # the last n tokens, now followed by `token` at `end`
            f = table.get(gram)
            if f is None:
                table[gram] = end
            elif isinstance(f, Followers):
                f.add(end, token)
            else:                               # its second occurrence
                table[gram] = f = Followers(f, seq[f])
                f.add(end, token)
        self._advance(tail, end, token)
        seq.append(token)

    def extend(self, tokens: list[int]) -> None:
        for t in tokens:
            self.append(t)

    def draft(self, k: int) -> tuple[list[int], int]:
        """(up to k tokens guessed to come next, the length of the n-gram that gave the first), or
        ([], 0) when no suffix occurred before. Each step looks up the text plus the draft so far:
        the most frequent follower of the longest matching n-gram (n_max down to n_min tokens) when
        no other token followed it as often and it differs from what followed the n-gram's most
        recent occurrence, else the tokens that followed that occurrence, up to the end of the text."""
        seq, out, first_n = self.seq, [], 0
        tail, length = self._tail, len(seq)  # the keys of the text + draft (copied once it grows)
        while len(out) < k:
            for n in range(min(self.n_max, length), self.n_min - 1, -1):
                f = self._grams[n].get(tail[n])
                if f is not None:
                    break
            else:
                break
            first_n = first_n or n
            if isinstance(f, Followers) and f.unique and f.leader != seq[f.pos]:
                new = [f.leader]
            else:
                pos = f.pos if isinstance(f, Followers) else f
                new = seq[pos:pos + k - len(out)]  # pos < len(seq): at least one token
            out += new
            if len(out) < k:
                tail = list(tail) if tail is self._tail else tail
                for t in new:
                    self._advance(tail, length, t)
                    length += 1
        return out, first_n


# ---------------------------------------------------------------------------- cost model

class VerifyCost:
    """c(T): the time of a T-token forward as a multiple of one decode step (c(1) = 1).

    With a `table` ({T: ratio}, e.g. measured at phi-3-mini shape by benchmarks/bench_speculative.py)
    c is interpolated linearly between its points and extrapolated from the last two. Without one
    it is measured online: c(T) = 1 + slope (T - 1), the slope a running estimate from the verify
    forwards against the one-token forwards (a single slope: a batch of a few rows costs
    about linearly more per row on both kernel paths)."""

    def __init__(self, table: Mapping[int, float] | None = None, prior_slope: float = PRIOR_SLOPE):
        self.table = None
        if table is not None:
            pts = {1: 1.0, **{int(t): float(c) for t, c in table.items()}}
            if any(t < 1 or not np.isfinite(c) or c <= 0 for t, c in pts.items()):
                raise PocketLMError(f"verify costs must map token counts >= 1 to positive ratios, got {table!r}")
            self.table = sorted(pts.items())
        self.slope = prior_slope
        self._memo: dict[int, float] = {}
        self._cheapest: dict[int, float] = {}
        self._best_rate: dict[int, float] = {}
        self.idle = 0  # one-token forwards since the last batch was measured
        self._step_seconds: float | None = None  # running one-token forward time

    def __call__(self, t: int) -> float:
        if self.table is None:
            return 1.0 + self.slope * (t - 1)
        c = self._memo.get(t)
        if c is None:  # a fixed table: computed once per T (np.interp costs microseconds per step)
            c = self._memo[t] = self._interpolate(t)
        return c

    def cheapest(self, t_max: int) -> float:
        """The least c(T) for 2 <= T <= t_max (a table need not rise monotonically)."""
        if self.table is None:
            return 1.0 + self.slope
        c = self._cheapest.get(t_max)
        if c is None:
            c = self._cheapest[t_max] = min(self(t) for t in range(2, max(t_max, 2) + 1))
        return c

    def best_rate(self, t_max: int) -> float:
        """The most tokens per unit cost any batch of 2 <= T <= t_max tokens could give, max T / c(T)
        (every one of its drafts kept)."""
        if self.table is None:  # T / (1 + s (T - 1)) is monotonic in T: its maximum is at an end
            s, t = self.slope, max(t_max, 2)
            return max(2.0 / (1.0 + s), t / (1.0 + s * (t - 1)))
        r = self._best_rate.get(t_max)
        if r is None:
            r = self._best_rate[t_max] = max(t / self(t) for t in range(2, max(t_max, 2) + 1))
        return r

    def _interpolate(self, t: int) -> float:
        xs = [p[0] for p in self.table]
        ys = [p[1] for p in self.table]
        if len(xs) == 1:
            return 1.0 + PRIOR_SLOPE * (t - 1)
        if t >= xs[-1]:
            return ys[-1] + (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) * (t - xs[-1])
        return float(np.interp(t, xs, ys))

    def observe(self, t: int, seconds: float) -> None:
        """Record a forward of t tokens that took `seconds` (ignored with a fixed table)."""
        if self.table is not None:
            return
        if t == 1:
            self.idle += 1
            s = self._step_seconds
            self._step_seconds = seconds if s is None else s + EMA * (seconds - s)
        elif self._step_seconds:
            self.idle = 0
            ratio = seconds / self._step_seconds
            self.slope += EMA * (max(0.0, (ratio - 1.0) / (t - 1)) - self.slope)


# the online cost model learned on each loaded model, kept across its generations (a chat's turns,
# repeated runs): what a batch costs is a property of the model and machine, not of the text
_LEARNED: weakref.WeakKeyDictionary[Model, VerifyCost] = weakref.WeakKeyDictionary()


def cost_model(model: Model, table: Mapping[int, float] | None) -> VerifyCost:
    """A fixed-table cost model, or the one this model has been measuring (created on first use)."""
    if table is not None:
        return VerifyCost(table)
    if model not in _LEARNED:
        _LEARNED[model] = VerifyCost()
    return _LEARNED[model]


# ---------------------------------------------------------------------------- statistics

@dataclass
class SpecStats:
    """What speculation did in one generation (`Generation.speculation`)."""

    mode: str
    draft_max: int
    verifies: int = 0       # batched forwards that checked drafts
    plain_steps: int = 0    # one-token forwards
    drafted: int = 0        # draft tokens sent to verification
    accepted: int = 0       # of those, kept
    skipped: int = 0        # steps with a draft the controller judged not worth verifying
    tokens: int = 0         # tokens emitted after the first (the first comes from the prompt's logits)
    sizes: list[int] = field(default_factory=list)  # tokens fed per decode forward, in order

    @property
    def forwards(self) -> int:
        return self.verifies + self.plain_steps

    @property
    def acceptance(self) -> float:
        """Fraction of verified draft tokens kept."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / self.forwards if self.forwards else 0.0

    @property
    def tokens_per_verify(self) -> float:
        """Tokens each verify produced: the kept drafts plus the corrected or bonus token."""
        return (self.accepted + self.verifies) / self.verifies if self.verifies else 0.0

    def projected_speedup(self, cost: Callable[[int], float]) -> float:
        """Plain decoding's time over this run's, both in decode steps under the cost model `cost`
        (c(T) of a T-token forward): plain needs one step per token, this run sum(c(T))."""
        spent = sum(cost(t) for t in self.sizes)
        return self.tokens / spent if spent else 1.0

    def summary(self) -> str:
        return (f"speculate {self.mode}: {self.accepted}/{self.drafted} drafts accepted "
                f"({self.acceptance:.0%}), {self.tokens_per_forward:.2f} tokens per forward, "
                f"{self.verifies} verifies, {self.plain_steps} plain steps")


# ---------------------------------------------------------------------------- acceptance

def distribution(logits: np.ndarray, history: list[int], params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, probabilities): exactly the distribution `Sampler` draws from (sampling.py)."""
    p = params
    logits = apply_repeat_penalty(logits, history[-p.repeat_last_n:] if p.repeat_last_n else (),
                                  p.repeat_penalty)
    ids, kept = candidates(logits, p.top_k, p.top_p, p.min_p)
    return ids, softmax(kept / np.float32(p.temperature))


def residual(ids: np.ndarray, probs: np.ndarray, draft: int) -> np.ndarray:
    """max(0, p - q) renormalised for the one-hot draft q at `draft`: p with the draft removed."""
    out = np.where(ids == draft, 0.0, probs)
    return out / out.sum()


def accept(logits: np.ndarray, draft: int, sampler: Sampler, history: list[int]) -> tuple[int, bool]:
    """(the token emitted at this position, whether it is the draft) after `history`."""
    params = sampler.params
    if params.temperature <= 0:
        token = sampler(logits, history)   # greedy: plain decoding's own choice
        return token, token == draft
    ids, probs = distribution(logits, history, params)
    p_draft = float(probs[ids == draft].sum())
    if sampler.rng.random() < p_draft:
        return draft, True
    res = residual(ids, probs, draft)     # p_draft < 1 here, so some mass is left
    return int(ids[sampler.rng.choice(ids.size, p=res)]), False


# ---------------------------------------------------------------------------- the controller

class LookupSpeculator:
    """Produces the generated tokens of one generation with prompt-lookup speculation."""

    def __init__(self, draft_max: int = DEFAULT_DRAFT_MAX, costs: Mapping[int, float] | None = None,
                 n_min: int = NGRAM_MIN, n_max: int = NGRAM_MAX):
        if not isinstance(draft_max, int) or isinstance(draft_max, bool) or not 1 <= draft_max <= MAX_DRAFT:
            raise PocketLMError(f"draft_max must be an integer from 1 to {MAX_DRAFT}, got {draft_max!r}")
        self.draft_max = draft_max
        self._costs = costs
        self.cost = VerifyCost(costs)  # replaced by the model's learned one when generation starts
        self.n_min, self.n_max = n_min, n_max
        self.alpha = {n: PRIOR_ACCEPT for n in range(n_min, n_max + 1)}  # acceptance per n-gram length
        self.stats = SpecStats("lookup", draft_max)

    def _observe(self, n: int, outcomes: list[bool]) -> None:
        a = self.alpha[n]
        for ok in outcomes:
            a += EMA * (float(ok) - a)
        self.alpha[n] = a

    def choose(self, n_draft: int, n: int) -> int:
        """How many of the n_draft drafted tokens to verify (0: a plain step)."""
        if n_draft == 0:
            return 0
        a, best, best_k, expected = self.alpha[n], MIN_GAIN, 0, 1.0
        # no k pays when a batch with every draft kept (k + 1 tokens) does not, or endless kept drafts
        # (1 / (1 - a) tokens) at the cheapest batch do not: the common case of a backed-off
        # controller, decided without the loop
        hopeless = (self.cost.best_rate(n_draft + 1) <= MIN_GAIN
                    or (a < 1.0 and 1.0 / (1.0 - a) <= MIN_GAIN * self.cost.cheapest(n_draft + 1)))
        for k in range(1, 0 if hopeless else n_draft + 1):
            expected += a ** k            # E[tokens] = 1 + a + ... + a^k (geometric acceptance)
            gain = expected / self.cost(k + 1)
            if gain > best:
                best, best_k = gain, k
        if best_k == 0 and self.cost.table is None and self.cost.idle >= EXPLORE * self.cost(2) and a > 0.5:
            return 1  # re-measure what a batch costs now (the load, or the kernel, may have changed)
        return best_k

    def tokens(self, model: Model, sampler: Sampler, logits: np.ndarray, history: list[int],
               max_tokens: int) -> Iterator[int]:
        """Yield generated tokens (appending each to `history`) after the prompt, whose logits are
        `logits`; forwards only when the next token is asked for, returns when the context is full.
        On close the cache keeps what plain decoding would have: the prompt and every emitted token
        but the last."""
        st, clock = self.stats, time.perf_counter
        self.cost = cost_model(model, self._costs)
        base = model.n_past
        index = NGramIndex(self.n_min, self.n_max)
        index.extend(history)
        yielded = 0
        queue = [sampler(logits, history)]
        try:
            while True:
                for t in queue:
                    history.append(t)
                    index.append(t)
                    yielded += 1
                    if yielded > 1:
                        st.tokens += 1
                    yield t
                if model.n_past >= model.n_ctx:
                    return
                last = history[-1]
                # room: every verified draft may be emitted (max_tokens; the extra token of a fully
                # kept draft may go unused) and cached after `last` (context)
                room = min(max_tokens - yielded, model.n_ctx - model.n_past - 1, self.draft_max)
                # the first draft token (for the free look), the rest only when a verify may pay: no
                # k <= room pays => none <= the draft's length does; drafts are prefixes of longer ones
                draft, n = index.draft(1) if room > 0 else ([], 0)
                k = self.choose(room if draft else 0, n)
                if k > 1:
                    draft, n = index.draft(k)
                    k = self.choose(len(draft), n)
                if k == 0:
                    if draft:
                        st.skipped += 1
                    t0 = clock()
                    logits = model.forward([last])
                    self.cost.observe(1, clock() - t0)
                    st.plain_steps += 1
                    st.sizes.append(1)
                    token = sampler(logits, history)
                    if draft:  # a free look at whether the draft would have been kept
                        self._observe(n, [token == draft[0]])
                    queue = [token]
                else:
                    queue = self._verify(model, sampler, last, draft[:k], n, history)
        finally:
            if yielded:
                model.truncate(min(model.n_past, base + yielded - 1))

    def _verify(self, model: Model, sampler: Sampler, last: int, drafts: list[int], n: int,
                history: list[int]) -> list[int]:
        st, start = self.stats, model.n_past
        t0 = time.perf_counter()
        rows = model.forward([last, *drafts], all_logits=True)   # [k + 1, V]
        self.cost.observe(len(drafts) + 1, time.perf_counter() - t0)
        st.verifies += 1
        st.drafted += len(drafts)
        st.sizes.append(len(drafts) + 1)
        hist = list(history)  # the penalty at row i sees the drafts before it
        out: list[int] = []
        for i, d in enumerate(drafts):
            token, ok = accept(rows[i], d, sampler, hist)
            out.append(token)
            if not ok:
                break
            hist.append(d)
        else:
            out.append(sampler(rows[len(drafts)], hist))     # every draft kept: the last row's token
        kept = len(out) - 1
        st.accepted += kept
        self._observe(n, [True] * kept + ([False] if kept < len(drafts) else []))
        model.truncate(start + 1 + kept)  # drop the rejected drafts' keys and values
        return out


def make_speculator(speculate: str | None, draft_max: int = DEFAULT_DRAFT_MAX,
                    costs: Mapping[int, float] | None = None) -> LookupSpeculator | None:
    """The speculator for `speculate` (None / "off": plain decoding)."""
    if speculate in (None, "", "off", "none"):
        return None
    if speculate not in SPECULATE_MODES:
        raise PocketLMError(f"speculate must be one of {', '.join(SPECULATE_MODES)} or None, got {speculate!r}")
    return LookupSpeculator(draft_max, costs)
