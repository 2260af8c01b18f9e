"""Phi-3-small's tokenizer: tiktoken byte-level BPE in plain Python (numpy and the standard library).

What HF `tokenization_phi3_small.py` (Phi3SmallTokenizer) builds from `cl100k_base.tiktoken`:

- ranks: a tiktoken rank file, one `base64(token bytes) rank` per line; the rank is the token id
  (ranks must be 0..n-1, every single byte among them);
- pieces: the cl100k pre-tokenizer (`pocketlm.pretokenize`); BPE never crosses a piece border;
- BPE as tiktoken does it (`_byte_pair_merge`): a piece that is a token is that token; otherwise
  start from its bytes and repeatedly merge the adjacent pair whose concatenation has the lowest
  rank, leftmost on ties, until no adjacent concatenation is a token;
- special tokens right after the ranks, in Phi-3-small's order (`SPECIAL_NAMES`): with cl100k's
  100256 ranks that is 100256 `<|dummy_id_2|>`, 100257 `<|endoftext|>` ... 100351
  `<|dummy_id_86|>`. Any rank file gets the same layout at n_ranks + offset, so a small model
  trained with a 2-4k-rank BPE keeps Phi-3-small's special tokens. The vocabulary is padded to
  a multiple of 64 (`PAD_MULTIPLE`; cl100k: 100256 + 96 = 100352 already is one) with more
  `<|dummy_id_k|>` tokens;
- special-token strings inside text are encoded as their ids (allowed_special="all");
- decode drops ids >= eot (`<|endoftext|>`) when skipping special tokens, as HF does, and
  replaces invalid UTF-8 with U+FFFD, as tiktoken does.

GGUF (`to_gguf_fields`, pocketlm's own `phi3small` architecture, which llama.cpp does not run):
`tokenizer.ggml.model` "tiktoken", `tokenizer.ggml.pre` "cl100k", `tokenizer.ggml.tokens` every
rank's bytes as a GPT-2 byte-to-unicode string (valid UTF-8, as GGUF strings must be; a token's
rank is its index, so no merges or scores are stored) followed by the special tokens' names,
`tokenizer.ggml.token_type` 1 (normal) for ranks, 3 (control) for samplable special tokens and 5
(unused) for the masked dummy ids, the bos/eos/padding/eot ids and the chat template.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import PocketLMError
from .pretokenize import pretokenize
from .tokenizer import CONTROL, NORMAL, UNUSED, _as_str, _merge_pairs, _read_json, _scalar

# Phi-3-small's special tokens in id order, from id n_ranks on (HF SPECIAL_TOKENS, cl100k ids
# 100256..100351). The ones not listed here are dummies: dummy_id_k for k = 0..86.
_NAMED = {
    0: "<|dummy_id_2|>",
    1: "<|endoftext|>",
    2: "<|fim_prefix|>",
    3: "<|fim_middle|>",
    4: "<|fim_suffix|>",
    5: "<|system|>",
    6: "<|user|>",
    7: "<|assistant|>",
    8: "<|dummy_id_0|>",
    9: "<|dummy_id_1|>",
    10: "<|end|>",
    20: "<|endofprompt|>",
}
N_SPECIAL = 96  # offsets 0..95: 100256..100351 with cl100k


def _special_names() -> list[str]:
    names, dummy = [], 3  # offsets 11..19 are dummy_id_3..11, 21..95 dummy_id_12..86
    for offset in range(N_SPECIAL):
        if offset in _NAMED:
            names.append(_NAMED[offset])
        else:
            names.append(f"<|dummy_id_{dummy}|>")
            dummy += 1
    return names


SPECIAL_NAMES: tuple[str, ...] = tuple(_special_names())
EOT, END = "<|endoftext|>", "<|end|>"
# The special tokens the model may sample; every other one is masked out of the logits (HF
# `dummy_token_indices`: the dummy ids, fim_prefix/middle/suffix and endofprompt; 91 with cl100k).
SAMPLABLE = frozenset({EOT, "<|system|>", "<|user|>", "<|assistant|>", END})
PAD_MULTIPLE = 64  # Phi-3-small's EFFECTIVE_PADDED_VOCAB_SIZE 100352 = 1568 * 64

# tokenizer_config.json of microsoft/Phi-3-small-8k-instruct and -128k-instruct.
PHI3_SMALL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{'<|' + message['role'] + '|>' + '\\n' + "
    "message['content'] + '<|end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)

TIKTOKEN_MODEL = "tiktoken"  # tokenizer.ggml.model of our GGUF files
PRETOKENIZER = "cl100k"  # tokenizer.ggml.pre: the only pattern implemented
_CACHE_LIMIT = 65_536  # pieces kept encoded (about words): bounded memory on a phone


def gpt2_byte_chars() -> list[str]:
    """GPT-2's byte-to-unicode table: byte b -> a printable character (printable Latin-1 bytes
    stand for themselves, the other 68 bytes for U+0100.. in byte order)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


_BYTE_CHARS = gpt2_byte_chars()
_CHAR_BYTES = {c: b for b, c in enumerate(_BYTE_CHARS)}


def read_rank_file(path: str | os.PathLike) -> list[bytes]:
    """Token bytes by rank from a tiktoken rank file (`base64(bytes) rank` per line)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise PocketLMError(f"cannot read tiktoken rank file: {e.strerror}", path) from None
    by_rank: dict[int, bytes] = {}
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2 or not fields[1].isdigit():
            shown = line[:60].decode("utf-8", "replace")
            raise PocketLMError(f"line {number} is not 'base64 rank': {shown!r}", path)
        try:
            token = base64.b64decode(fields[0], validate=True)
        except binascii.Error:
            shown = fields[0][:60].decode("utf-8", "replace")
            raise PocketLMError(f"line {number}: {shown!r} is not base64", path) from None
        rank = int(fields[1])
        if rank in by_rank:
            raise PocketLMError(f"line {number}: rank {rank} appears twice", path)
        by_rank[rank] = token
    if sorted(by_rank) != list(range(len(by_rank))):
        missing = sorted(set(range(max(by_rank, default=-1) + 1)) - set(by_rank))[:5]
        raise PocketLMError(f"ranks must be 0..n-1 (token ids); missing {missing or 'all'}", path)
    return [by_rank[r] for r in range(len(by_rank))]


class TiktokenTokenizer:
    """Byte-level BPE by rank with Phi-3-small's special tokens (see the module docstring)."""

    def __init__(
        self,
        ranks: Sequence[bytes],
        *,
        vocab_size: int | None = None,
        chat_template: str | None = PHI3_SMALL_CHAT_TEMPLATE,
        source: str | os.PathLike | None = None,
    ):
        self.source = None if source is None else os.fspath(source)
        self.ranks: list[bytes] = [bytes(t) for t in ranks]
        n = len(self.ranks)
        self._rank_of: dict[bytes, int] = {t: i for i, t in enumerate(self.ranks)}
        if len(self._rank_of) != n:
            raise self._error("the rank file lists the same token bytes twice")
        missing = [b for b in range(256) if bytes([b]) not in self._rank_of]
        if missing:
            raise self._error(f"byte-level BPE needs every single byte as a token; missing {missing[:5]}")
        smallest = n + N_SPECIAL
        if vocab_size is None:
            vocab_size = -(-smallest // PAD_MULTIPLE) * PAD_MULTIPLE
        if vocab_size < smallest:
            raise self._error(f"vocab_size {vocab_size} cannot hold {n} ranks and {N_SPECIAL} special tokens")
        self.n_ranks = n
        self._vocab_size = int(vocab_size)
        # Padding beyond Phi-3-small's 96 special tokens continues the dummy names.
        extra = [f"<|dummy_id_{87 + k}|>" for k in range(vocab_size - smallest)]
        self.special_names: list[str] = [*SPECIAL_NAMES, *extra]
        self.special_ids: dict[str, int] = {name: n + k for k, name in enumerate(self.special_names)}
        self.eot_id = self.special_ids[EOT]
        self.end_id = self.special_ids[END]
        self.bos_id = self.eos_id = self.pad_id = self.eot_id  # HF: bos = eos = pad = <|endoftext|>
        self.unk_id = None
        self.add_bos = self.add_eos = False  # plain encode adds nothing; the chat template adds bos
        self.chat_template = chat_template
        # Longest name first, so a name that starts another never wins (Phi-3-small has none).
        self._specials_by_length = sorted(self.special_ids, key=len, reverse=True)
        self._cache: dict[str, tuple[int, ...]] = {}

    # ----------------------------------------------------------------------------------- loading

    @classmethod
    def from_rank_file(
        cls, path: str | os.PathLike, *, chat_template: str | None = PHI3_SMALL_CHAT_TEMPLATE
    ) -> TiktokenTokenizer:
        return cls(read_rank_file(path), chat_template=chat_template, source=path)

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> TiktokenTokenizer:
        """From a checkpoint folder holding one `*.tiktoken` rank file (Phi-3-small ships
        `cl100k_base.tiktoken`) and optionally tokenizer_config.json (its chat_template wins)."""
        folder = Path(path)
        rank_files = sorted(folder.glob("*.tiktoken"))
        if len(rank_files) != 1:
            found = [p.name for p in rank_files]
            raise PocketLMError(f"expected one *.tiktoken rank file in this folder, found {found}", folder)
        template = PHI3_SMALL_CHAT_TEMPLATE
        config_path = folder / "tokenizer_config.json"
        if config_path.is_file():
            config = _read_json(config_path)
            if isinstance(config, Mapping) and isinstance(config.get("chat_template"), str):
                template = config["chat_template"]
        return cls.from_rank_file(rank_files[0], chat_template=template)

    @classmethod
    def from_gguf_fields(
        cls, fields: Mapping[str, Any], source: str | os.PathLike | None = None
    ) -> TiktokenTokenizer:
        """Inverse of `to_gguf_fields`; the special tokens must sit where the layout puts them."""

        def need(key: str) -> Any:
            if key not in fields:
                raise PocketLMError(f"GGUF tokenizer field {key!r} is missing", source)
            return fields[key]

        model, pre = _as_str(need("tokenizer.ggml.model")), _as_str(need("tokenizer.ggml.pre"))
        if model != TIKTOKEN_MODEL or pre != PRETOKENIZER:
            raise PocketLMError(
                f"tokenizer.ggml.model/pre are {model!r}/{pre!r}; expected {TIKTOKEN_MODEL!r}/{PRETOKENIZER!r}",
                source,
            )
        tokens = [_as_str(t) for t in need("tokenizer.ggml.tokens")]
        types = [int(t) for t in np.asarray(need("tokenizer.ggml.token_type")).reshape(-1)]
        if len(types) != len(tokens):
            raise PocketLMError(f"{len(tokens)} tokens but {len(types)} token types", source)
        n = next((i for i, t in enumerate(types) if t != NORMAL), len(types))
        ranks = []
        for i, text in enumerate(tokens[:n]):
            try:
                ranks.append(bytes(_CHAR_BYTES[c] for c in text))
            except KeyError:
                raise PocketLMError(f"token {i} {text!r} is not a GPT-2 byte string", source) from None
        template = fields.get("tokenizer.chat_template")
        try:
            tok = cls(ranks, vocab_size=len(tokens), chat_template=None if template is None else _as_str(template),
                      source=source)
        except PocketLMError as e:
            raise PocketLMError(f"GGUF tokenizer: {e}", source) from None
        if tokens[n:] != tok.special_names or types[n:] != tok._special_types():
            bad = next(i for i in range(n, len(tokens))
                       if tokens[i] != tok.special_names[i - n] or types[i] != tok._special_types()[i - n])
            raise PocketLMError(
                f"token {bad} is {tokens[bad]!r} (type {types[bad]}); the Phi-3-small layout after "
                f"{n} ranks puts {tok.special_names[bad - n]!r} there",
                source,
            )
        for key, want in (("bos_token_id", tok.bos_id), ("eos_token_id", tok.eos_id), ("eot_token_id", tok.end_id)):
            got = fields.get(f"tokenizer.ggml.{key}")
            if got is not None and int(_scalar(got)) != want:
                raise PocketLMError(f"tokenizer.ggml.{key} is {int(_scalar(got))}, the layout says {want}", source)
        return tok

    # ---------------------------------------------------------------------------------- encoding

    @property
    def vocab_size(self) -> int:
        """Rows of the embedding: ranks + special tokens + padding (Phi-3-small: 100352)."""
        return self._vocab_size

    @property
    def stop_ids(self) -> list[int]:
        """<|endoftext|> and <|end|> (Phi-3-small: 100257, 100266)."""
        return [self.eot_id, self.end_id]

    @property
    def dummy_token_ids(self) -> list[int]:
        """Special ids masked out of the logits (Phi-3-small: 91 ids)."""
        return [i for name, i in self.special_ids.items() if name not in SAMPLABLE]

    @property
    def wants_phi3_name(self) -> bool:
        """llama.cpp's Phi-3 whitespace rule never applies (interface of `Tokenizer`)."""
        return False

    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        """Token ids of `text`; special-token names in it become their ids unless `parse_special`
        is False. `add_bos` puts <|endoftext|> first (default: no, like HF)."""
        if not isinstance(text, str):
            raise PocketLMError(f"encode() takes text (str), got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: U+FFFD, as tiktoken's encode does
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        ids = [self.bos_id] if add_bos else []
        start = 0
        for position, name in self._find_specials(text) if parse_special else ():
            self._encode_ordinary(text[start:position], ids)
            ids.append(self.special_ids[name])
            start = position + len(name)
        self._encode_ordinary(text[start:], ids)
        return ids

    def _find_specials(self, text: str) -> Iterable[tuple[int, str]]:
        """(position, name) of special-token names in `text`, left to right, not overlapping."""
        if "<|" not in text:
            return
        position = text.find("<|")
        while position >= 0:
            name = next((s for s in self._specials_by_length if text.startswith(s, position)), None)
            if name is None:
                position = text.find("<|", position + 1)
                continue
            yield position, name
            position = text.find("<|", position + len(name))

    def _encode_ordinary(self, text: str, out: list[int]) -> None:
        """Append the ids of `text` (no special tokens) to `out`, piece by piece."""
        cache = self._cache
        for piece in pretokenize(text) if text else ():
            ids = cache.get(piece)
            if ids is None:
                ids = self._bpe(piece.encode("utf-8"))
                if len(cache) < _CACHE_LIMIT:  # when full, keep the pieces seen first (common words)
                    cache[piece] = ids
            out.extend(ids)

    def _bpe(self, data: bytes) -> tuple[int, ...]:
        """tiktoken's byte-pair merge of one piece's bytes into token ids."""
        rank_of = self._rank_of
        whole = rank_of.get(data)
        if whole is not None:  # tiktoken's shortcut: a piece that is a token stays whole
            return (whole,)
        get = rank_of.get
        parts = _merge_pairs([data[i : i + 1] for i in range(len(data))], lambda a, b: get(a + b))
        return tuple(rank_of[p] for p in parts)

    # ---------------------------------------------------------------------------------- decoding

    def token_bytes(self, token_id: int, skip_special: bool = True) -> bytes:
        """The bytes of one token; b"" for ids >= <|endoftext|> when `skip_special` (HF's rule)."""
        if not isinstance(token_id, (int, np.integer)) or not 0 <= token_id < self._vocab_size:
            raise PocketLMError(f"token id {token_id!r} is out of range [0, {self._vocab_size})")
        token_id = int(token_id)
        if token_id < self.n_ranks:
            return self.ranks[token_id]
        if skip_special and token_id >= self.eot_id:
            return b""
        return self.special_names[token_id - self.n_ranks].encode("utf-8")

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of `ids`; invalid UTF-8 comes out as U+FFFD (never raises for valid ids)."""
        return b"".join(self.token_bytes(i, skip_special) for i in ids).decode("utf-8", errors="replace")

    def stream_decoder(self, skip_special: bool = True, continuation: bool = False) -> ByteStreamDecoder:
        """A decoder fed one id at a time (same interface as `pocketlm.tokenizer.StreamDecoder`;
        `continuation` changes nothing: byte-level BPE has no dummy space prefix)."""
        return ByteStreamDecoder(self, skip_special)

    # -------------------------------------------------------------------------------------- chat

    def apply_chat_template(self, messages: Iterable[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        """Phi-3-small's prompt: bos, then `<|role|>\\n{content}<|end|>\\n` per message (any role,
        as the Jinja template does), then `<|assistant|>\\n` or the eos token."""
        parts = [EOT]
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
                raise PocketLMError(f"chat message {i} needs a 'role' and a 'content'")
            role, content = message["role"], message["content"]
            if not isinstance(role, str) or not isinstance(content, str):
                raise PocketLMError(f"chat message {i}: role and content must be text")
            parts.append(f"<|{role}|>\n{content}{END}\n")
        parts.append("<|assistant|>\n" if add_generation_prompt else EOT)
        return "".join(parts)

    # ----------------------------------------------------------------------------------- writing

    def _special_types(self) -> list[int]:
        return [CONTROL if name in SAMPLABLE else UNUSED for name in self.special_names]

    def to_gguf_fields(self) -> dict[str, Any]:
        """GGUF metadata for our `phi3small` architecture (see the module docstring)."""
        byte_chars = _BYTE_CHARS
        tokens = ["".join([byte_chars[b] for b in t]) for t in self.ranks] + self.special_names
        types = np.asarray([NORMAL] * self.n_ranks + self._special_types(), dtype=np.int32)
        fields: dict[str, Any] = {
            "tokenizer.ggml.model": TIKTOKEN_MODEL,
            "tokenizer.ggml.pre": PRETOKENIZER,
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.bos_token_id": self.bos_id,
            "tokenizer.ggml.eos_token_id": self.eos_id,
            "tokenizer.ggml.padding_token_id": self.pad_id,
            "tokenizer.ggml.eot_token_id": self.end_id,
            "tokenizer.ggml.add_bos_token": False,
            "tokenizer.ggml.add_eos_token": False,
        }
        if self.chat_template is not None:
            fields["tokenizer.chat_template"] = self.chat_template
        return fields

    def write_hf_files(self, out_dir: str | os.PathLike) -> None:
        """tokenizer.json (HF `tokenizers` gives the same ids) and tokenizer_config.json."""
        from .tiktoken_hf import write_hf_files

        write_hf_files(self, out_dir)

    def _error(self, message: str) -> PocketLMError:
        return PocketLMError(message, self.source)

    def __repr__(self) -> str:
        return f"TiktokenTokenizer(ranks={self.n_ranks}, vocab_size={self.vocab_size}, {self.source!r})"


class ByteStreamDecoder:
    """Token ids in, complete UTF-8 text out; partial sequences wait for the next token. The
    concatenation of everything `push` and `flush` return equals `decode(ids)`."""

    def __init__(self, tokenizer: TiktokenTokenizer, skip_special: bool = True):
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._tokenizer.token_bytes(token_id, self._skip_special))

    def flush(self) -> str:
        """Whatever is held back (an incomplete UTF-8 sequence comes out as U+FFFD)."""
        return self._utf8.decode(b"", final=True)
