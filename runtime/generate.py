"""Token generation: a Python generator streaming text (or token ids) from a loaded model.

    gen = generate(model, "Once upon a time", max_tokens=64, temperature=0)
    for piece in gen:            # text pieces as soon as they are complete UTF-8
        print(piece, end="")
    gen.finish_reason            # "stop" (a stop token or string), "length" or "context"
    gen.tokens, gen.text, model.stats

Stops: on a stop token (the tokenizer's eos / <|end|> / <|endoftext|> unless `ignore_eos`, plus
`stop_tokens`), on a stop string (the text before it is yielded, the stop string is not; text that
could still begin a stop string is held back until it cannot), after `max_tokens` tokens, or when
the context is full (the KV cache holds n_ctx positions; no sliding). With `ignore_eos` exactly
`max_tokens` tokens are generated (as llama.cpp's --ignore-eos), context permitting.

`speculate="lookup"` (with `draft_max`) drafts tokens from the prompt and the text so far and checks
them in one batched forward (runtime/speculative.py): the same tokens as plain greedy decoding, the
same distribution when sampling; `gen.speculation` then holds its statistics.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..errors import PocketLMError
from .sampling import Sampler, SamplingParams
from .speculative import DEFAULT_DRAFT_MAX, LookupSpeculator, SpecStats, make_speculator

if TYPE_CHECKING:
    from .model import Model


class Generation:
    """An iterator of text pieces; after it is exhausted: tokens, text, finish_reason, stats."""

    def __init__(self, model: Model, prompt_ids: list[int], max_tokens: int, sampler: Sampler,
                 stop: Sequence[str], stop_tokens: set[int], decode_text: bool,
                 speculator: LookupSpeculator | None = None):
        self.model = model
        self.prompt_ids = prompt_ids
        self.max_tokens = max_tokens
        self.sampler = sampler
        self.stop = [s for s in stop if s]
        self.stop_tokens = stop_tokens
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self._decode_text = decode_text
        self._speculator = speculator
        self._iter = self._run()

    @property
    def stats(self):
        return self.model.stats

    @property
    def speculation(self) -> SpecStats | None:
        """Drafts, acceptance and forwards of a speculative generation (None for plain decoding)."""
        return None if self._speculator is None else self._speculator.stats

    def __iter__(self) -> Generation:
        return self

    def __next__(self) -> str:
        return next(self._iter)

    def token_ids(self) -> Iterator[int]:
        """Iterate token ids instead of text (for callers without a tokenizer)."""
        for _ in self:
            pass
        yield from self.tokens

    def _run(self) -> Iterator[str]:
        model, stats = self.model, self.model.stats
        stats.prefill_tokens = stats.decode_tokens = 0
        stats.prefill_seconds = stats.decode_seconds = stats.decode_kernel_seconds = 0.0
        # the text follows the prompt, so the first token's leading space is a real space
        decoder = model.tokenizer.stream_decoder(continuation=True) if self._decode_text else None
        pending = ""   # decoded text not yet yielded (it may be the start of a stop string)
        hit_string = False
        t0 = time.perf_counter()
        logits = model.prefill(self.prompt_ids)
        stats.prefill_tokens = model.last_prefill_tokens
        stats.prefill_seconds = time.perf_counter() - t0
        history = list(self.prompt_ids)
        t_decode = time.perf_counter()
        k_start = model._kernel_seconds
        # the tokens, one per forward or several per verify; each source appends to `history`,
        # forwards only when asked for the next token and ends when the context is full
        source = (_plain_tokens(model, self.sampler, logits, history) if self._speculator is None
                  else self._speculator.tokens(model, self.sampler, logits, history, self.max_tokens))
        n_out = 0  # tokens the source produced (a stop token included)
        try:
            for token in source:
                n_out += 1
                if not self.tokens:
                    stats.first_token_seconds = time.perf_counter() - t0
                if token in self.stop_tokens:
                    self.finish_reason = "stop"
                    break
                self.tokens.append(token)
                if decoder is not None:
                    pending += decoder.push(token)
                    out, pending, hit = _split_stop(pending, self.stop)
                    if out:
                        self.text += out
                        yield out
                    if hit:
                        self.finish_reason = "stop"
                        hit_string = True
                        break
                if len(self.tokens) >= self.max_tokens:
                    self.finish_reason = "length"
                    break
            else:
                self.finish_reason = "context"
            source.close()  # a speculative source drops cache entries past what plain decoding keeps
            stats.decode_tokens = n_out - 1  # every token but the first came from a decode forward
            if decoder is not None and not hit_string:
                pending += decoder.flush()
                out, pending, _ = _split_stop(pending, self.stop, final=True)
                if out:
                    self.text += out
                    yield out
        finally:
            stats.decode_seconds = time.perf_counter() - t_decode
            stats.decode_kernel_seconds = model._kernel_seconds - k_start


def _plain_tokens(model: Model, sampler: Sampler, logits: np.ndarray, history: list[int]) -> Iterator[int]:
    """Plain decoding: sample, then one forward of that token for the next logits."""
    while True:
        token = sampler(logits, history)
        history.append(token)
        yield token
        if model.n_past >= model.n_ctx:
            return
        logits = model.forward([token])


def _split_stop(text: str, stops: Sequence[str], final: bool = False) -> tuple[str, str, bool]:
    """(text safe to emit, text held back, stop string found)."""
    if not stops:
        return text, "", False
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    if cut >= 0:
        return text[:cut], "", True
    if final:
        return text, "", False
    hold = 0  # longest suffix of text that is a proper prefix of some stop string
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return text[:len(text) - hold], text[len(text) - hold:], False


def generate(model: Model, prompt: str | Sequence[int], max_tokens: int = 256, temperature: float = 0.8,
             top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0,
             repeat_last_n: int = 64, seed: int | None = None, stop: Sequence[str] = (),
             stop_tokens: Sequence[int] = (), ignore_eos: bool = False, add_bos: bool | None = None,
             speculate: str | None = None, draft_max: int = DEFAULT_DRAFT_MAX,
             verify_costs: Mapping[int, float] | None = None) -> Generation:
    """Start generating after `prompt` (text, or a list of token ids); see the module docstring.

    speculate: None (plain decoding) or "lookup"; draft_max: most tokens drafted per verify;
    verify_costs: {T: cost of a T-token forward in decode steps} for the controller (None: measured
    as it runs; a fixed table makes its choices reproducible, e.g. for a projection).

    The KV cache keeps the longest prefix shared with what it already holds, so a chat that
    re-sends its history only evaluates the new turn.
    """
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise PocketLMError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
    tok = model.tokenizer
    if isinstance(prompt, str):
        if tok is None:
            raise PocketLMError("this GGUF file has no tokenizer: give the prompt as token ids", model.path)
        ids = tok.encode(prompt, add_bos=add_bos)
    else:
        ids = [int(i) for i in np.asarray(prompt, dtype=np.int64).reshape(-1)]
    if not ids:
        raise PocketLMError("the prompt is empty")
    model.check_tokens(ids)
    if len(ids) > model.n_ctx:
        raise PocketLMError(f"the prompt has {len(ids)} tokens, more than the context of {model.n_ctx} "
                            f"(raise the context size, at most {model.cfg.max_position_embeddings})",
                            model.path)
    default_stops = tok.stop_ids if tok is not None else [model.cfg.eos_token_id]
    stops: set[int] = set() if ignore_eos else set(default_stops)
    stops |= {int(t) for t in stop_tokens}
    params = SamplingParams(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                            min_p=float(min_p), repeat_penalty=float(repeat_penalty),
                            repeat_last_n=int(repeat_last_n), seed=seed)
    speculator = make_speculator(speculate, draft_max, verify_costs)
    return Generation(model, ids, max_tokens, Sampler(params), list(stop), stops, decode_text=tok is not None,
                      speculator=speculator)
