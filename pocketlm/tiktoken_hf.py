r"""A tiktoken-style tokenizer (`TiktokenTokenizer`) as Hugging Face `tokenizers` files, for the
ONNX export (onnxruntime-genai, transformers read tokenizer.json).

HF BPE merges listed pairs by their position in `merges`; tiktoken merges any adjacent pair whose
concatenation is a token, lowest rank first. The usual conversion (transformers'
`TikTokenConverter`) lists for each token of rank r, in rank order, the two parts tiktoken's BPE
splits it into when only ranks below r may merge; `ignore_merges` keeps a piece that is a token
whole, as tiktoken does. The pre-tokenizer is the cl100k pattern with \s spelled out as Unicode
White_Space (not left to Oniguruma's idea of \s), then ByteLevel without its own regex. Equality of ids is
what the tests check against tiktoken, not assumed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .pretokenize import WHITE_SPACE
from .tokenizer import _merge_pairs, _write_atomic

if TYPE_CHECKING:
    from .tokenizer_tiktoken import TiktokenTokenizer


def merges_from_ranks(ranks: list[bytes]) -> list[tuple[bytes, bytes]]:
    """For each token of rank r (2+ bytes, in rank order) the pair tiktoken's BPE joins last
    when only ranks < r may merge; tokens that BPE cannot reach get no merge."""
    rank_of = {t: i for i, t in enumerate(ranks)}
    get = rank_of.get
    merges = []
    for r, token in enumerate(ranks):
        if len(token) < 2:
            continue

        def below(a: bytes, b: bytes, r: int = r) -> int | None:
            rank = get(a + b)
            return rank if rank is not None and rank < r else None

        parts = _merge_pairs([token[i : i + 1] for i in range(len(token))], below)
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
    return merges


def _hf_pattern() -> str:
    r"""The cl100k pattern for Oniguruma, \s as the White_Space class."""
    space = "".join(f"\\x{{{ord(c):X}}}" for c in WHITE_SPACE)
    return (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
        rf"| ?[^{space}\p{{L}}\p{{N}}]+[\r\n]*|[{space}]*[\r\n]+|[{space}]+(?![^{space}])|[{space}]+"
    )


def hf_files(tok: TiktokenTokenizer) -> dict[str, Any]:
    """tokenizer.json and tokenizer_config.json contents for `tok`."""
    from .tokenizer_tiktoken import _BYTE_CHARS

    def text(token: bytes) -> str:
        return "".join(_BYTE_CHARS[b] for b in token)

    added = [
        {"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for name, i in tok.special_ids.items()
    ]
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": _hf_pattern()}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,
            "vocab": {text(t): i for i, t in enumerate(tok.ranks)},
            "merges": [[text(a), text(b)] for a, b in merges_from_ranks(tok.ranks)],
        },
    }
    eot = tok.special_names[tok.eot_id - tok.n_ranks]
    config: dict[str, Any] = {
        "added_tokens_decoder": {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added},
        "bos_token": eot,
        "eos_token": eot,
        "pad_token": eot,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 8192,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if tok.chat_template is not None:
        config["chat_template"] = tok.chat_template
    return {"tokenizer.json": tokenizer_json, "tokenizer_config.json": config}


def write_hf_files(tok: TiktokenTokenizer, out_dir: str | os.PathLike) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, content in hf_files(tok).items():
        _write_atomic(out / name, json.dumps(content, ensure_ascii=False, indent=1) + "\n")
