"""Run an exported decoder under plain onnxruntime with its KV cache in place.

SparseAttention's CPU kernel requires past and present to be one buffer (onnx_decoder's
docstring), so `CachedSession` does what onnxruntime-genai does with `past_present_share_buffer`:
one OrtValue [batch 1, kv_heads, max_cache, head_dim] per past_key_values.N.* input, bound through
io_binding as that input AND as the matching present.N.* output; the attention ops write the new
positions into it and read the first `length` positions (GroupQueryAttention and SparseAttention
both take the valid length from the attention mask, not from the buffer's shape).

    run = CachedSession(session, max_cache=256)
    logits = run(prompt)            # [len(prompt), vocab]
    logits = run([next_token])      # [1, vocab], following what the cache holds
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pocketlm.errors import PocketLMError


class CachedSession:
    """One sequence through an onnxruntime.InferenceSession of an exported folder (batch 1)."""

    def __init__(self, session, max_cache: int, head_dim: int | None = None):
        """`head_dim`: for models whose past inputs leave it symbolic (the model builder's
        "kv_cache_dim"); our exports declare it."""
        import onnxruntime as ort

        self.session = session
        self.max_cache = int(max_cache)
        self.length = 0  # positions already in the cache
        self.caches = {}
        for i in session.get_inputs():
            if i.name.startswith("past_key_values."):
                kv, hd = i.shape[1], i.shape[3] if isinstance(i.shape[3], int) else head_dim
                if not isinstance(kv, int) or hd is None:
                    raise PocketLMError(f"{i.name} has shape {i.shape}: give the KV cache's head_dim")
                self.caches[i.name] = ort.OrtValue.ortvalue_from_numpy(
                    np.zeros((1, kv, self.max_cache, hd), np.float32))

    def __call__(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits [len(tokens), vocab] of `tokens` after the cached positions."""
        n = len(tokens)
        if n == 0 or self.length + n > self.max_cache:
            raise PocketLMError(f"{n} tokens after {self.length} do not fit a cache of {self.max_cache}")
        total = self.length + n
        b = self.session.io_binding()
        b.bind_output("logits")  # first, so copy_outputs_to_cpu()[0] is the logits
        b.bind_cpu_input("input_ids", np.asarray([tokens], np.int64))
        b.bind_cpu_input("attention_mask", np.ones((1, total), np.int64))
        for name, value in self.caches.items():
            b.bind_ortvalue_input(name, value)
            b.bind_ortvalue_output(name.replace("past_key_values.", "present."), value)
        self.session.run_with_iobinding(b)
        self.length = total
        return b.copy_outputs_to_cpu()[0][0]
