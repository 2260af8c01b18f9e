"""A Phi-4-mini-style tokenizer folder built with HF `tokenizers` (no real Phi-4-mini tokenizer.json
is at hand offline): BPE trained on the Shakespeare in tests/data over the 256 byte characters,
the o200k Split + ByteLevel pre-tokenizer, the ByteLevel decoder, Phi-4-mini's special tokens as
added tokens at Phi-4-mini's offsets after the vocabulary (<|endoftext|> one past it with a hole
before, like 199999 after o200k's 199998 ranks; <|endofprompt|> at +20, the chat and tool tokens
from +21), the Phi-4-mini chat template in tokenizer_config.json."""

from __future__ import annotations

import json
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from pocketlm.tokenizer_bytelevel import O200K_PATTERN, PHI4_MINI_CHAT_TEMPLATE

DATA = Path(__file__).resolve().parent / "data"
N_MERGES = 3000
# Offsets after the trained vocabulary, as Phi-4-mini's ids sit after o200k's 199998 ranks
# (199999 <|endoftext|>, 200018 <|endofprompt|>, 200019 <|assistant|> ...).
SPECIALS = {
    1: "<|endoftext|>",
    20: "<|endofprompt|>",
    21: "<|assistant|>",
    22: "<|end|>",
    23: "<|user|>",
    24: "<|system|>",
    25: "<|tool|>",
    26: "<|/tool|>",
    27: "<|tool_call|>",
    28: "<|/tool_call|>",
    29: "<|tool_response|>",
    30: "<|tag|>",
}


def corpus_text() -> str:
    files = sorted((DATA / "shakespeare").glob("*.txt"))
    assert files
    return "\n".join(f.read_text(encoding="utf-8") for f in files)


def padded_vocab(n: int) -> int:
    """config.json's vocab_size for a BPE of n entries: past the specials, to a multiple of 64."""
    return -(-(n + 31) // 64) * 64 + 64


def write_phi4_tokenizer(out: Path, corpus: str, n_merges: int = N_MERGES, write_config: bool = True) -> Path:
    """tokenizer.json + tokenizer_config.json (+ a config.json with only vocab_size) in `out`."""
    hf = tokenizers.Tokenizer(models.BPE(ignore_merges=False))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(O200K_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256 + n_merges, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    hf.train_from_iterator([corpus], trainer)
    data = json.loads(hf.to_str())
    n = len(data["model"]["vocab"])
    # Added tokens also in the model's vocab keep their ids in HF (as in real checkpoints).
    data["added_tokens"] = [
        {"id": n + k, "content": c, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True}
        for k, c in SPECIALS.items()
    ]
    for t in data["added_tokens"]:
        data["model"]["vocab"][t["content"]] = t["id"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
              "pad_token": "<|endoftext|>", "chat_template": PHI4_MINI_CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    if write_config:  # the vocab_size a checkpoint's config.json pads the embedding to (like 200064)
        (out / "config.json").write_text(json.dumps({"vocab_size": padded_vocab(n)}), encoding="utf-8")
    return out


