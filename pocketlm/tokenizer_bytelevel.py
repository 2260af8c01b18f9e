r"""Phi-4-mini's tokenizer: Hugging Face byte-level BPE with the o200k (GPT-4o) split, in plain Python.

What `microsoft/Phi-4-mini-instruct` ships (tokenizer_config.json `tokenizer_class` "GPT2Tokenizer",
which is how llama.cpp's convert_hf_to_gguf.py `Phi3MiniModel.set_vocab` tells it from Phi-3's
SentencePiece vocabulary) and what this module reads from any tokenizer.json of that kind:

- model: BPE without byte_fallback; `vocab` maps GPT-2 byte-to-unicode strings (every byte a
  printable character, " " is "Ġ") to ids, `merges` lists pairs by rank ("a b" strings or
  [a, b] lists). BPE as HF `tokenizers` does it: start from the piece's byte characters and
  repeatedly apply the listed merge of lowest rank, leftmost on ties (the heap merge of
  `pocketlm.tokenizer._merge_pairs`); with `ignore_merges` a piece that is a token stays whole;
- pre_tokenizer: Sequence[Split(o200k pattern, Isolated), ByteLevel(add_prefix_space false,
  use_regex false)]: the o200k pieces (`pocketlm.pretokenize`), BPE inside each piece;
- added_tokens: found in the text before splitting, leftmost first and the longest at a
  position (HF's AddedVocabulary); `special` ones are left out of decoded text when skipping
  special tokens. Every id is read from the file; Phi-4-mini's, as seen in public copies of its
  generation_config.json (bos 199999, eos [200020, 199999], pad 199999) and in code that names
  them: <|endoftext|> 199999, <|assistant|> 200019, <|end|> 200020, <|user|> 200021, <|system|>
  200022, <|tool|> 200023; o200k_base puts <|endofprompt|> at 200018; the tool tokens <|/tool|>,
  <|tool_call|>, <|/tool_call|>, <|tool_response|> and <|tag|> follow (their ids were not seen in
  the stored copies). config.json's vocab_size 200064 pads the rest;
- decoder: ByteLevel: token strings back to bytes, invalid UTF-8 replaced by U+FFFD.

GGUF (`to_gguf_fields`) in llama.cpp's layout for this model (convert_hf_to_gguf.py
`_set_vocab_gpt2` / `get_vocab_base`, gguf-py SpecialVocab): `tokenizer.ggml.model` "gpt2",
`tokenizer.ggml.pre` "gpt-4o" (the hash of Phi-4-mini's pre-tokenizer output equals
Xenova/gpt-4o's; llama-vocab.cpp runs LLAMA_VOCAB_PRE_TYPE_GPT4O with the o200k pattern), every id
up to vocab_size in `tokens` ("[PAD{i}]" for ids without a token), `token_type` 1 normal, 3
control (special added tokens and added tokens that look like "<|...|>"), 4 user-defined (other
added tokens), 5 unused (the padding), `merges` as "a b" strings, the bos/eos/padding ids, the
add_bos/add_eos flags and the chat template. llama.cpp has no ignore_merges for "gpt-4o", so a
tokenizer.json with ignore_merges gets `tokenizer.pocketlm.ignore_merges` (llama.cpp skips keys
it does not know).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import PocketLMError
from .pretokenize import pretokenize
from .tokenizer import (
    CONTROL,
    NORMAL,
    UNUSED,
    USER_DEFINED,
    _as_str,
    _merge_pairs,
    _read_json,
    _scalar,
    _write_atomic,
)
from .tokenizer_tiktoken import _BYTE_CHARS, _CHAR_BYTES, ByteStreamDecoder

# tiktoken_ext/openai_public.py o200k_base pat_str; the Split pattern of Phi-4-mini's tokenizer.json
# (the "original regex from tokenizer.json" llama-vocab.cpp quotes for LLAMA_VOCAB_PRE_TYPE_GPT4O).
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
GGUF_MODEL = "gpt2"  # tokenizer.ggml.model of llama.cpp's byte-level BPE vocabularies
GGUF_PRE = "gpt-4o"  # tokenizer.ggml.pre for the o200k split (llama-vocab.cpp)
IGNORE_MERGES_KEY = "tokenizer.pocketlm.ignore_merges"

# tokenizer_config.json of microsoft/Phi-4-mini-instruct ("chat_template"; the same string is
# quoted by guidance's chat_templates.py and onnxruntime-extensions' Phi-4 test, and rendered by
# llama.cpp PR 12288's discussion).
PHI4_MINI_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and "
    "message['tools'] is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + "
    "message['tools'] + '<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + "
    "message['content'] + '<|end|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)
STOP_TOKENS = ("<|end|>", "<|endoftext|>")  # generation_config.json eos_token_id [200020, 199999]
_CACHE_LIMIT = 65_536  # pieces kept encoded (about words): bounded memory on a phone


def _looks_special(text: str) -> bool:
    """convert_hf_to_gguf.py `does_token_look_special` for the names a Phi vocabulary can hold."""
    return (text.startswith("<|") and text.endswith("|>")) or text in ("<pad>", "<mask>")


class AddedToken:
    """One entry of tokenizer.json's added_tokens: text matched whole before BPE."""

    __slots__ = ("content", "id", "special")

    def __init__(self, token_id: int, content: str, special: bool):
        self.id, self.content, self.special = token_id, content, special

    def __repr__(self) -> str:
        return f"AddedToken({self.id}, {self.content!r}, special={self.special})"


class ByteLevelTokenizer:
    """Byte-level BPE by merge rank with the o200k split and added tokens (see the module docstring)."""

    def __init__(
        self,
        vocab: Mapping[str, int],
        merges: Sequence[tuple[str, str]],
        added: Sequence[AddedToken] = (),
        *,
        vocab_size: int | None = None,
        bos: str | None = "<|endoftext|>",
        eos: str | None = "<|endoftext|>",
        pad: str | None = "<|endoftext|>",
        add_bos: bool = False,
        add_eos: bool = False,
        ignore_merges: bool = False,
        chat_template: str | None = PHI4_MINI_CHAT_TEMPLATE,
        source: str | os.PathLike | None = None,
    ):
        self.source = None if source is None else os.fspath(source)
        self.vocab: dict[str, int] = {str(t): int(i) for t, i in vocab.items()}
        if not self.vocab:
            raise self._error("the BPE vocab is empty")
        self.added: list[AddedToken] = list(added)
        ids = [*self.vocab.values(), *(t.id for t in self.added)]
        if min(ids) < 0:
            raise self._error(f"token id {min(ids)} is negative")
        smallest = max(ids) + 1
        vocab_size = smallest if vocab_size is None else int(vocab_size)
        if vocab_size < smallest:
            raise self._error(f"vocab_size {vocab_size} is below the largest token id {smallest - 1}")
        self._vocab_size = vocab_size
        missing = [b for b, c in enumerate(_BYTE_CHARS) if c not in self.vocab]
        if missing:
            raise self._error(f"byte-level BPE needs every byte as a token; bytes {missing[:5]} have none")

        # Text and bytes of every id; added tokens win over a vocab entry with the same id (HF).
        self.token_text: list[str | None] = [None] * vocab_size
        for text, i in self.vocab.items():
            self.token_text[i] = text
        self._bytes: list[bytes | None] = [None] * vocab_size
        for text, i in self.vocab.items():
            # ByteLevel decoder: a character outside GPT-2's table stands for its own UTF-8 bytes
            self._bytes[i] = b"".join(
                bytes([_CHAR_BYTES[c]]) if c in _CHAR_BYTES else c.encode("utf-8", "surrogateescape")
                for c in text
            )
        self.special_ids: set[int] = set()
        self.added_ids: dict[str, int] = {}
        for t in self.added:
            self.token_text[t.id] = t.content
            self._bytes[t.id] = t.content.encode("utf-8", "surrogateescape")
            self.added_ids[t.content] = t.id
            if t.special:
                self.special_ids.add(t.id)
        # Longest first, so that at one position the longest added token wins (leftmost-longest).
        by_length = sorted(self.added_ids, key=len, reverse=True)
        self._added_re = re.compile("|".join(map(re.escape, by_length))) if by_length else None
        ordinary = [c for c in by_length if self.added_ids[c] not in self.special_ids]
        self._ordinary_re = re.compile("|".join(map(re.escape, ordinary))) if ordinary else None

        self.merges: list[tuple[str, str]] = [(str(a), str(b)) for a, b in merges]
        self._pair_rank: dict[tuple[str, str], int] = {}
        for rank, (a, b) in enumerate(self.merges):
            if a + b not in self.vocab:
                raise self._error(f"merge {rank} {a!r} + {b!r} makes {a + b!r}, which is not in the vocab")
            self._pair_rank.setdefault((a, b), rank)  # HF keeps the first rank of a repeated pair
        self.ignore_merges = bool(ignore_merges)

        self.bos_id, self.eos_id, self.pad_id = (self._named_id(bos, "bos"), self._named_id(eos, "eos"),
                                                 self._named_id(pad, "pad"))
        self.unk_id = None
        if add_bos and self.bos_id is None:
            raise self._error("add_bos_token is set but there is no bos token")
        self.add_bos, self.add_eos = bool(add_bos), bool(add_eos) and self.eos_id is not None
        self.chat_template = chat_template
        self._cache: dict[str, tuple[int, ...]] = {}

    def _named_id(self, name: str | None, what: str) -> int | None:
        if name is None:
            return None
        token_id = self.added_ids.get(name, self.vocab.get(name))
        if token_id is None:
            raise self._error(f"{what} token {name!r} is not in the vocabulary")
        return token_id

    # ----------------------------------------------------------------------------------- loading

    @classmethod
    def from_hf_json(
        cls,
        path: str | os.PathLike,
        config: Mapping[str, Any] | None = None,
        vocab_size: int | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> ByteLevelTokenizer:
        """From a tokenizer.json (`data`, if given, is its parsed content), the parsed
        tokenizer_config.json (`config`) and the model's vocab_size (config.json)."""
        if data is None:
            data = _read_json(path)
        try:
            return _read_hf(cls, data, config or {}, vocab_size, path)
        except (TypeError, ValueError, KeyError, AttributeError, IndexError, OverflowError) as e:
            raise PocketLMError(f"malformed tokenizer.json: {type(e).__name__}: {e}", path) from None

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike, data: Mapping[str, Any] | None = None) -> ByteLevelTokenizer:
        """From a checkpoint folder: tokenizer.json, and if present tokenizer_config.json
        (special_tokens_map.json under it), chat_template.jinja and config.json's vocab_size."""
        folder = Path(path)
        if not (folder / "tokenizer.json").is_file():
            raise PocketLMError("no tokenizer.json in this folder", folder)
        config: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins
            if (folder / name).is_file():
                part = _read_json(folder / name)
                if not isinstance(part, Mapping):
                    raise PocketLMError("expected a JSON object", folder / name)
                config.update(part)
        if (folder / "chat_template.jinja").is_file():
            config["chat_template"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        vocab_size = None
        if (folder / "config.json").is_file():
            model_config = _read_json(folder / "config.json")
            value = model_config.get("vocab_size") if isinstance(model_config, Mapping) else None
            if value is not None:
                if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                    raise PocketLMError(f"vocab_size {value!r} is not a positive integer", folder / "config.json")
                vocab_size = value
        return cls.from_hf_json(folder / "tokenizer.json", config, vocab_size, data)

    @classmethod
    def from_gguf_fields(
        cls, fields: Mapping[str, Any], source: str | os.PathLike | None = None
    ) -> ByteLevelTokenizer:
        """Inverse of `to_gguf_fields` (also reads llama.cpp's own gpt-4o vocab files)."""

        def need(key: str) -> Any:
            if key not in fields:
                raise PocketLMError(f"GGUF tokenizer field {key!r} is missing", source)
            return fields[key]

        model, pre = _as_str(need("tokenizer.ggml.model")), _as_str(fields.get("tokenizer.ggml.pre", "default"))
        if model != GGUF_MODEL or pre != GGUF_PRE:
            raise PocketLMError(
                f"tokenizer.ggml.model/pre are {model!r}/{pre!r}; pocketlm reads byte-level BPE with "
                f"{GGUF_MODEL!r}/{GGUF_PRE!r}",
                source,
            )
        tokens = [_as_str(t) for t in need("tokenizer.ggml.tokens")]
        types = [int(t) for t in np.asarray(need("tokenizer.ggml.token_type")).reshape(-1)]
        if len(types) != len(tokens):
            raise PocketLMError(f"{len(tokens)} tokens but {len(types)} token types", source)
        merges = []
        for rank, m in enumerate(need("tokenizer.ggml.merges")):
            parts = _as_str(m).split(" ")
            if len(parts) != 2 or not all(parts):
                raise PocketLMError(f"merge {rank} {_as_str(m)!r} is not two tokens apart by one space", source)
            merges.append((parts[0], parts[1]))
        vocab, added = {}, []
        for i, (text, kind) in enumerate(zip(tokens, types, strict=True)):
            if kind == NORMAL:
                vocab[text] = i
            elif kind in (CONTROL, USER_DEFINED):
                added.append(AddedToken(i, text, special=kind == CONTROL))
            elif kind != UNUSED:
                raise PocketLMError(f"token {i} {text!r} has type {kind}, which byte-level BPE does not use", source)

        def name(key: str) -> str | None:
            value = fields.get(f"tokenizer.ggml.{key}")
            if value is None:
                return None
            token_id = int(_scalar(value))
            if not 0 <= token_id < len(tokens) or types[token_id] == UNUSED:
                raise PocketLMError(f"tokenizer.ggml.{key} {token_id} names no token", source)
            return tokens[token_id]

        template = fields.get("tokenizer.chat_template")
        try:
            return cls(
                vocab,
                merges,
                added,
                vocab_size=len(tokens),
                bos=name("bos_token_id"),
                eos=name("eos_token_id"),
                pad=name("padding_token_id"),
                add_bos=bool(_scalar(fields.get("tokenizer.ggml.add_bos_token", False))),
                add_eos=bool(_scalar(fields.get("tokenizer.ggml.add_eos_token", False))),
                ignore_merges=bool(_scalar(fields.get(IGNORE_MERGES_KEY, False))),
                chat_template=None if template is None else _as_str(template),
                source=source,
            )
        except PocketLMError as e:
            raise PocketLMError(f"GGUF tokenizer: {e}", source) from None

    # ---------------------------------------------------------------------------------- encoding

    @property
    def vocab_size(self) -> int:
        """Rows of the embedding (Phi-4-mini: 200064, config.json's vocab_size)."""
        return self._vocab_size

    @property
    def stop_ids(self) -> list[int]:
        """eos, <|end|> and <|endoftext|> (Phi-4-mini: 199999, 200020)."""
        ids = {self.added_ids[t] for t in STOP_TOKENS if t in self.added_ids}
        if self.eos_id is not None:
            ids.add(self.eos_id)
        return sorted(ids)

    @property
    def wants_phi3_name(self) -> bool:
        """llama.cpp's Phi-3 whitespace rule never applies (interface of `Tokenizer`)."""
        return False

    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        """Token ids of `text`. Added tokens in it become their ids; with `parse_special` False the
        special ones stay text (llama.cpp's rule). bos first when `add_bos` (None: the
        vocabulary's setting, off for Phi-4-mini)."""
        if not isinstance(text, str):
            raise PocketLMError(f"encode() takes text (str), got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: U+FFFD, as tiktoken's encode does
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        ids: list[int] = []
        if self.add_bos if add_bos is None else add_bos:
            if self.bos_id is None:
                raise self._error("add_bos is asked for but the vocabulary has no bos token")
            ids.append(self.bos_id)
        finder = self._added_re if parse_special else self._ordinary_re
        start = 0
        for match in finder.finditer(text) if finder is not None else ():
            self._encode_ordinary(text[start : match.start()], ids)
            ids.append(self.added_ids[match.group()])
            start = match.end()
        self._encode_ordinary(text[start:], ids)
        if self.add_eos and add_bos is not False:
            ids.append(self.eos_id)
        return ids

    def _encode_ordinary(self, text: str, out: list[int]) -> None:
        """Append the ids of `text` (no added tokens in it) to `out`, piece by piece."""
        cache = self._cache
        for piece in pretokenize(text, "o200k") if text else ():
            ids = cache.get(piece)
            if ids is None:
                ids = self._bpe(piece)
                if len(cache) < _CACHE_LIMIT:  # when full, keep the pieces seen first (common words)
                    cache[piece] = ids
            out.extend(ids)

    def _bpe(self, piece: str) -> tuple[int, ...]:
        """HF BPE of one piece: its UTF-8 bytes as GPT-2 characters, merged by rank."""
        chars = [_BYTE_CHARS[b] for b in piece.encode("utf-8")]
        vocab = self.vocab
        if self.ignore_merges:
            whole = vocab.get("".join(chars))
            if whole is not None:
                return (whole,)
        get = self._pair_rank.get
        return tuple(vocab[s] for s in _merge_pairs(chars, lambda a, b: get((a, b))))

    # ---------------------------------------------------------------------------------- decoding

    def token_bytes(self, token_id: int, skip_special: bool = True) -> bytes:
        """The bytes of one token; b"" for special added tokens when `skip_special` and for
        padding ids without a token."""
        if not isinstance(token_id, (int, np.integer)) or not 0 <= token_id < self._vocab_size:
            raise PocketLMError(f"token id {token_id!r} is out of range [0, {self._vocab_size})")
        token_id = int(token_id)
        if skip_special and token_id in self.special_ids:
            return b""
        return self._bytes[token_id] or b""

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of `ids`; invalid UTF-8 comes out as U+FFFD (never raises for valid ids)."""
        return b"".join(self.token_bytes(i, skip_special) for i in ids).decode("utf-8", errors="replace")

    def stream_decoder(self, skip_special: bool = True, continuation: bool = False) -> ByteStreamDecoder:
        """A decoder fed one id at a time (the interface of `pocketlm.tokenizer.StreamDecoder`;
        `continuation` changes nothing: byte-level BPE has no dummy space prefix)."""
        return ByteStreamDecoder(self, skip_special)  # type: ignore[arg-type]  # duck-typed: token_bytes

    # -------------------------------------------------------------------------------------- chat

    def apply_chat_template(self, messages: Iterable[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """Phi-4-mini's prompt, as its Jinja template renders it: `<|role|>{content}<|end|>` per
        message (no newlines), a system message with a `tools` string as
        `<|system|>{content}<|tool|>{tools}<|/tool|><|end|>`, then `<|assistant|>` or eos."""
        parts = []
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
                raise PocketLMError(f"chat message {i} needs a 'role' and a 'content'")
            role, content = message["role"], message["content"]
            if not isinstance(role, str) or not isinstance(content, str):
                raise PocketLMError(f"chat message {i}: role and content must be text")
            tools = message.get("tools")
            if role == "system" and tools is not None:
                if not isinstance(tools, str):  # the template concatenates it as a string
                    raise PocketLMError(f"chat message {i}: 'tools' must be text (a JSON string)")
                parts.append(f"<|system|>{content}<|tool|>{tools}<|/tool|><|end|>")
            else:
                parts.append(f"<|{role}|>{content}<|end|>")
        if add_generation_prompt:
            parts.append("<|assistant|>")
        elif self.eos_id is not None:
            parts.append(self.token_text[self.eos_id] or "")
        return "".join(parts)

    # ----------------------------------------------------------------------------------- writing

    def token_types(self) -> list[int]:
        """GGUF token types, as llama.cpp's converter sets them (see the module docstring)."""
        types = [UNUSED] * self._vocab_size
        for i in self.vocab.values():
            types[i] = NORMAL
        for t in self.added:
            types[t.id] = CONTROL if t.special or _looks_special(t.content) else USER_DEFINED
        return types

    def to_gguf_fields(self) -> dict[str, Any]:
        """GGUF metadata in llama.cpp's layout for Phi-4-mini (see the module docstring)."""
        tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(self.token_text)]
        fields: dict[str, Any] = {
            "tokenizer.ggml.model": GGUF_MODEL,
            "tokenizer.ggml.pre": GGUF_PRE,
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": np.asarray(self.token_types(), dtype=np.int32),
            "tokenizer.ggml.merges": [f"{a} {b}" for a, b in self.merges],
            "tokenizer.ggml.add_bos_token": self.add_bos,
            "tokenizer.ggml.add_eos_token": self.add_eos,
        }
        for key, value in (("bos_token_id", self.bos_id), ("eos_token_id", self.eos_id),
                           ("padding_token_id", self.pad_id)):
            if value is not None:
                fields[f"tokenizer.ggml.{key}"] = int(value)
        if self.ignore_merges:
            fields[IGNORE_MERGES_KEY] = True
        if self.chat_template is not None:
            fields["tokenizer.chat_template"] = self.chat_template
        return fields

    def write_hf_files(self, out_dir: str | os.PathLike) -> None:
        """tokenizer.json and tokenizer_config.json (for the ONNX export); HF reads them as this."""
        write_hf_files(self, out_dir)

    def _error(self, message: str) -> PocketLMError:
        return PocketLMError(message, self.source)

    def __repr__(self) -> str:
        return f"ByteLevelTokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, {self.source!r})"


# ------------------------------------------------------------------------------ tokenizer.json


def is_bytelevel_json(data: Any) -> bool:
    """Whether parsed tokenizer.json content is byte-level BPE (a ByteLevel pre-tokenizer and
    a BPE model without byte_fallback), the kind this module reads."""
    if not isinstance(data, Mapping) or not isinstance(data.get("model"), Mapping):
        return False
    model = data["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        return False
    return any(p.get("type") == "ByteLevel" for p in _flatten(data.get("pre_tokenizer"), "pretokenizers"))


def _flatten(node: Any, key: str) -> list[Mapping[str, Any]]:
    if not isinstance(node, Mapping):
        return []
    if node.get("type") == "Sequence":
        children = node.get(key)
        return [m for child in children for m in _flatten(child, key)] if isinstance(children, list) else []
    return [node]


def _read_hf(
    cls: type[ByteLevelTokenizer],
    data: Mapping[str, Any],
    config: Mapping[str, Any],
    vocab_size: int | None,
    path: str | os.PathLike,
) -> ByteLevelTokenizer:
    def error(message: str) -> PocketLMError:
        return PocketLMError(message, path)

    if not isinstance(data, Mapping):
        raise error("tokenizer.json is not a JSON object")
    model = data.get("model")
    if not isinstance(model, Mapping) or model.get("type") != "BPE":
        raise error("the tokenizer model is not BPE")
    if model.get("byte_fallback"):
        raise error("a BPE model with byte_fallback is SentencePiece-style, not byte-level")
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise error(f"BPE {key} {model[key]!r} is not supported")
    if model.get("dropout"):
        raise error("BPE dropout is not supported (encoding would be random)")
    if data.get("normalizer") is not None:
        raise error(f"normalizer {data['normalizer'].get('type')!r} is not supported (byte-level BPE has none)")

    steps = _flatten(data.get("pre_tokenizer"), "pretokenizers")
    kinds = [s.get("type") for s in steps]
    if kinds != ["Split", "ByteLevel"]:
        raise error(f"pre-tokenizers {kinds}; pocketlm reads Split(o200k pattern) + ByteLevel")
    split, byte_level = steps
    pattern = split.get("pattern")
    if not isinstance(pattern, Mapping) or pattern.get("Regex") != O200K_PATTERN:
        raise error("the Split pre-tokenizer's pattern is not the o200k (GPT-4o) one")
    if split.get("behavior") != "Isolated" or split.get("invert"):
        raise error(f"Split behavior {split.get('behavior')!r}/invert {split.get('invert')!r}; expected Isolated")
    if byte_level.get("add_prefix_space") or byte_level.get("use_regex", True):
        raise error("the ByteLevel pre-tokenizer must have add_prefix_space and use_regex off")
    decoder = data.get("decoder")
    if decoder is not None and decoder.get("type") != "ByteLevel":
        raise error(f"decoder {decoder.get('type')!r}; byte-level BPE decodes with ByteLevel")

    vocab = model.get("vocab")
    if not isinstance(vocab, Mapping):
        raise error("the BPE model has no vocab")
    for text, i in vocab.items():
        if not isinstance(i, int) or isinstance(i, bool):
            raise error(f"vocab entry {text!r} has id {i!r}, not an integer")
    merges = []
    for rank, m in enumerate(model.get("merges") or []):
        pair = m.split(" ") if isinstance(m, str) else m
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(x, str) for x in pair):
            raise error(f"merge {rank} {m!r} is not a pair of tokens")
        merges.append((pair[0], pair[1]))
    added = []
    for t in data.get("added_tokens") or []:
        if any(t.get(flag) for flag in ("single_word", "lstrip", "rstrip")):
            raise error(f"added token {t.get('content')!r}: single_word/lstrip/rstrip are not supported")
        content = t["content"]
        if not isinstance(content, str) or not content:
            raise error(f"added token {t.get('id')!r} has no text")
        added.append(AddedToken(int(t["id"]), content, bool(t.get("special", False))))

    def name(key: str) -> str | None:
        value = config.get(key, "<|endoftext|>" if key != "pad_token" else None)
        if isinstance(value, Mapping):
            value = value.get("content")
        if value is None:
            return None
        if not isinstance(value, str):
            raise error(f"{key} {value!r} is not text")
        known = value in vocab or any(t.content == value for t in added)
        if not known and key not in config:
            return None  # the default is only a guess
        return value

    template = config.get("chat_template", PHI4_MINI_CHAT_TEMPLATE)
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = {t.get("name"): t.get("template") for t in template}.get("default")
    return cls(
        vocab,
        merges,
        added,
        vocab_size=vocab_size,
        bos=name("bos_token"),
        eos=name("eos_token"),
        pad=name("pad_token"),
        add_bos=bool(config.get("add_bos_token", False)),
        add_eos=bool(config.get("add_eos_token", False)),
        ignore_merges=bool(model.get("ignore_merges", False)),
        chat_template=template if isinstance(template, str) else None,
        source=path,
    )


def write_hf_files(tok: ByteLevelTokenizer, out_dir: str | os.PathLike) -> None:
    """tokenizer.json and tokenizer_config.json that HF `tokenizers`/transformers read as `tok`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    added = [
        {"id": t.id, "content": t.content, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": t.special}
        for t in tok.added
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
                {"type": "Split", "pattern": {"Regex": O200K_PATTERN}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
            "ignore_merges": tok.ignore_merges, "vocab": tok.vocab, "merges": [[a, b] for a, b in tok.merges],
        },
    }
    config: dict[str, Any] = {
        "add_bos_token": tok.add_bos,
        "add_eos_token": tok.add_eos,
        "added_tokens_decoder": {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added},
        "clean_up_tokenization_spaces": False,
        "tokenizer_class": "GPT2Tokenizer",
    }
    for key, i in (("bos_token", tok.bos_id), ("eos_token", tok.eos_id), ("pad_token", tok.pad_id)):
        if i is not None:
            config[key] = tok.token_text[i]
    if tok.chat_template is not None:
        config["chat_template"] = tok.chat_template
    for name, content in (("tokenizer.json", tokenizer_json), ("tokenizer_config.json", config)):
        _write_atomic(out / name, json.dumps(content, ensure_ascii=False, indent=1) + "\n")
