"""`genai_config.json`: what onnxruntime-genai needs to run an exported folder as it is.

The layout follows onnxruntime-genai's model builder (`make_genai_config`): a `model` section
(type "phi3" or "phi3small" -- the builder writes the architecture's name up to "For", lowercased --,
special token ids, context and vocabulary sizes, and the decoder's file, shapes and input/output
names) and a `search` section with greedy defaults.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pocketlm.config import SMALL_ARCHITECTURE, Phi3Config

PAST_KEY, PAST_VALUE = "past_key_values.%d.key", "past_key_values.%d.value"
PRESENT_KEY, PRESENT_VALUE = "present.%d.key", "present.%d.value"


def genai_model_type(cfg: Phi3Config) -> str:
    """onnxruntime-genai's model type: its builder writes "Phi3SmallForCausalLM" as "phi3small"."""
    return "phi3small" if cfg.architecture == SMALL_ARCHITECTURE else "phi3"


def make_genai_config(cfg: Phi3Config, *, filename: str, bos_id: int | None, eos_ids: list[int],
                      pad_id: int | None) -> dict[str, Any]:
    """The genai_config.json content for a decoder exported by `onnx_export`."""
    eos = [int(i) for i in eos_ids] or [int(cfg.eos_token_id)]
    return {
        "model": {
            "bos_token_id": int(bos_id if bos_id is not None else cfg.bos_token_id),
            "context_length": cfg.max_position_embeddings,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": cfg.head_dim,
                "hidden_size": cfg.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": PAST_KEY,
                    "past_value_names": PAST_VALUE,
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": PRESENT_KEY,
                    "present_value_names": PRESENT_VALUE,
                },
                "num_attention_heads": cfg.num_attention_heads,
                "num_hidden_layers": cfg.num_hidden_layers,
                "num_key_value_heads": cfg.num_key_value_heads,
            },
            "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": int(pad_id if pad_id is not None else eos[0]),
            "type": genai_model_type(cfg),
            "vocab_size": cfg.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": cfg.max_position_embeddings,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            # GroupQueryAttention updates the KV cache in place when past and present share a buffer;
            # SparseAttention's CPU kernel works only that way (onnx_decoder's docstring).
            "past_present_share_buffer": True,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def write_genai_config(folder: str | os.PathLike, config: dict[str, Any]) -> Path:
    path = Path(folder) / "genai_config.json"
    path.write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")
    return path
