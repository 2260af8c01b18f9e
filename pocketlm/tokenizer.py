"""Phi-3's SentencePiece-BPE tokenizer in plain Python (no transformers, no tokenizers on a phone).

Encoding follows llama.cpp's SPM tokenizer (`llm_tokenizer_spm`, `tokenizer_st_partition`):

1. Special tokens (token types 2 unknown, 3 control, 4 user-defined) are cut out of the text, the
   longest first. `parse_special=False` leaves control tokens as text (user-defined ones are
   always parsed; llama.cpp also counts </s>, <|end|>, <|endoftext|>... as control, see
   LLAMA_CONTROL_LOOKING). A token with rstrip (lstrip) swallows the ASCII whitespace after
   (before) it; llama.cpp gives every Phi-3 special token rstrip except <unk>, <s>, <|endoftext|>
   (keyed on general.name containing "phi3"/"phi-3"). HF tokenizer.json files carry the flags.
2. Each remaining piece of text gets " " prepended (the first one and every one after a special
   token), and spaces become "▁".
3. BPE: start from single characters and repeatedly merge the adjacent pair whose concatenation is
   the vocabulary piece with the highest score (ties: leftmost). A tokenizer read from a Hugging
   Face tokenizer.json merges by the rank of the pair in its `merges` list instead (HF semantics).
4. A character that is no piece becomes its UTF-8 bytes as <0xNN> tokens.

Speed: BPE runs once per chunk of text and chunks are cached. Chunks are cut where no merge can
cross (see `_chunk_pattern`): before a "▁" that follows another character (no Llama/Phi-3 piece
holds "x▁" with x != "▁") and around characters that are in no multi-character piece (Phi-3: a
newline). Merges in different chunks never touch the same symbols, so their order cannot matter.
"""

from __future__ import annotations

import codecs
import heapq
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .chat import apply_chat_template as _render_chat
from .errors import PocketLMError

# SentencePiece / GGUF token types (`tokenizer.ggml.token_type`).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPECIAL_TYPES = (UNKNOWN, CONTROL, USER_DEFINED)  # cut out of the text before BPE

SPACE = "▁"  # U+2581, SentencePiece's escaped space
ASCII_SPACES = frozenset(" \t\n\v\f\r")  # C isspace(): what llama.cpp's rstrip/lstrip remove
# Unicode White_Space (Rust char::is_whitespace): what HF tokenizers' rstrip/lstrip remove.
UNICODE_SPACES = frozenset(chr(c) for c in range(0x110000) if chr(c).isspace()) - set("\x1c\x1d\x1e\x1f")

# llama.cpp (llama-vocab.cpp) gives tokens with these texts the CONTROL attribute whatever their
# type: they end generation or mark fill-in-the-middle. Control tokens are parsed in text only
# with parse_special and are left out of decoded text.
LLAMA_CONTROL_LOOKING = frozenset(
    {
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "<|end_of_text|>",
        "<EOT>",
        "_<EOT>",
        "[EOT]",
        "[EOS]",
        "<end_of_utterance>",
        "<|eom_id|>",
        "<|return|>",
        "<|call|>",
        "<|flush|>",
        "<|calls|>",
        "</s>",
        "<eos>",
        "<turn|>",
        "<|tool_response>",
        "<|fim_prefix|>",
        "<fim-prefix>",
        "<fim_prefix>",
        "<PRE>",
        "<|code_prefix|>",
        "<|prefix|>",
        "<|fim_suffix|>",
        "<fim-suffix>",
        "<fim_suffix>",
        "<SUF>",
        "<|code_suffix|>",
        "<|suffix|>",
        "<|fim_middle|>",
        "<fim-middle>",
        "<fim_middle>",
        "<MID>",
        "<|code_middle|>",
        "<|middle|>",
        "<|fim_pad|>",
        "<fim-pad>",
        "<fim_pad>",
        "<PAD>",
        "[PAD]",
        "<|fim_repo|>",
        "<|repo_name|>",
        "<fim-repo>",
        "<REPO>",
        "<reponame>",
        "<|file_sep|>",
    }
)
PHI3_CHAT_TOKENS = ("<|end|>", "<|endoftext|>")  # stop generation besides eos
PHI3_NO_RSTRIP = ("<unk>", "<s>", "<|endoftext|>")  # llama.cpp llama-vocab.cpp, Phi-3 rule

_BYTE_PIECE = re.compile(r"<0x([0-9A-F]{2})>")
_CACHE_LIMIT = 65_536  # chunks (about words) kept encoded: ~10 MB at most, phones are short of memory

# How a raw text fragment is turned into BPE input. "always": " " before every fragment
# (llama.cpp, HF Prepend normalizer); "first": only before a fragment at the start of the text
# (HF Metaspace prepend_scheme "first"); "never".
PREFIX_SCHEMES = ("always", "first", "never")

GGUF_FIELD_TYPES = {
    "tokenizer.ggml.model": "string",
    "tokenizer.ggml.pre": "string",
    "tokenizer.ggml.tokens": "array[string]",
    "tokenizer.ggml.scores": "array[float32]",
    "tokenizer.ggml.token_type": "array[int32]",
    "tokenizer.ggml.bos_token_id": "uint32",
    "tokenizer.ggml.eos_token_id": "uint32",
    "tokenizer.ggml.unknown_token_id": "uint32",
    "tokenizer.ggml.padding_token_id": "uint32",
    "tokenizer.ggml.add_bos_token": "bool",
    "tokenizer.ggml.add_eos_token": "bool",
    "tokenizer.ggml.add_space_prefix": "bool",
    "tokenizer.chat_template": "string",
    "tokenizer.pocketlm.metaspace_prepend_scheme": "string",
    "tokenizer.pocketlm.metaspace_split": "bool",
}
METASPACE_SCHEME_KEY = "tokenizer.pocketlm.metaspace_prepend_scheme"
METASPACE_SPLIT_KEY = "tokenizer.pocketlm.metaspace_split"


class Tokenizer:
    """A SentencePiece-BPE vocabulary (Llama / Phi-3 style) that encodes and decodes text."""

    def __init__(
        self,
        pieces: Sequence[str],
        scores: Sequence[float],
        token_types: Sequence[int],
        *,
        bos_id: int | None = 1,
        eos_id: int | None = 2,
        unk_id: int | None = 0,
        pad_id: int | None = None,
        add_bos: bool = True,
        add_eos: bool = False,
        chat_template: str | None = None,
        merges: Sequence[tuple[str, str]] | None = None,
        control_ids: Iterable[int] | None = None,
        rstrip_ids: Iterable[int] = (),
        lstrip_ids: Iterable[int] = (),
        strip_chars: frozenset[str] = ASCII_SPACES,
        prefix_scheme: str = "always",
        prefix_only_if_missing: bool = False,
        split_on_space: bool = False,
        source: str | os.PathLike | None = None,
    ):
        self.source = None if source is None else os.fspath(source)
        if not (len(pieces) == len(scores) == len(token_types)) or not pieces:
            raise self._error(
                f"tokens ({len(pieces)}), scores ({len(scores)}) and token types ({len(token_types)}) "
                "must be non-empty lists of the same length"
            )
        if prefix_scheme not in PREFIX_SCHEMES:
            raise self._error(f"unknown space prefix scheme {prefix_scheme!r}")
        self.pieces: list[str] = [str(p) for p in pieces]
        self.scores: list[float] = [float(s) for s in scores]
        self.token_types: list[int] = [int(t) for t in token_types]
        self.bos_id, self.eos_id, self.unk_id, self.pad_id = (
            self._check_id(bos_id, "bos"),
            self._check_id(eos_id, "eos"),
            self._check_id(unk_id, "unknown"),
            self._check_id(pad_id, "padding"),
        )
        if add_bos and self.bos_id is None:
            raise self._error("add_bos is set but there is no bos token")
        self.add_bos, self.add_eos = bool(add_bos), bool(add_eos)
        self.chat_template = chat_template
        self.prefix_scheme = prefix_scheme
        self.prefix_only_if_missing = prefix_only_if_missing
        self.split_on_space = split_on_space
        self.strip_chars = strip_chars
        self.rstrip_ids, self.lstrip_ids = frozenset(rstrip_ids), frozenset(lstrip_ids)
        # Parsed only with parse_special, hidden when decoding: control and unknown tokens.
        if control_ids is None:
            control_ids = (i for i, t in enumerate(self.token_types) if t in (CONTROL, UNKNOWN))
        self.control_ids = frozenset(control_ids)

        # llama.cpp's token_to_id: the last of duplicate pieces wins.
        self.piece_to_id: dict[str, int] = {p: i for i, p in enumerate(self.pieces)}
        self._special = sorted(
            (
                i
                for i, t in enumerate(self.token_types)
                if (t in SPECIAL_TYPES or i in self.control_ids) and self.pieces[i]
            ),
            key=lambda i: (-len(self.pieces[i]), i),
        )
        self._byte_ids = self._byte_table()
        self._piece_bytes = self._decode_table()

        self.merges = None if merges is None else [(str(a), str(b)) for a, b in merges]
        if self.merges is None:
            # Score of every piece, negated so that heapq's minimum is the best merge.
            self._neg_score = {p: -self.scores[i] for p, i in self.piece_to_id.items()}
            formable = [p for p in self.pieces if len(p) > 1]
        else:
            self._pair_rank = {pair: r for r, pair in reversed(list(enumerate(self.merges)))}
            for a, b in self.merges:
                if a + b not in self.piece_to_id:
                    raise self._error(f"merge {a!r} + {b!r} makes {a + b!r}, which is not in the vocabulary")
            formable = [a + b for a, b in self.merges]
            if any(_BYTE_PIECE.fullmatch(x) for pair in self.merges for x in pair):
                formable.append("".join(chr(c) for c in range(256)))  # bytes merge: no isolated chars
        self._chunk_re = _chunk_pattern(formable, split_on_space)
        self._cache: dict[str, tuple[int, ...]] = {}

    # ----------------------------------------------------------------------------------- loading

    @classmethod
    def from_gguf_fields(
        cls, fields: Mapping[str, Any], source: str | os.PathLike | None = None
    ) -> Tokenizer:
        """Build from GGUF metadata: `tokenizer.ggml.*`, `tokenizer.chat_template` and, to decide
        Phi-3's whitespace stripping as llama.cpp does, `general.name`."""

        def need(key: str) -> Any:
            if key not in fields:
                raise PocketLMError(f"GGUF tokenizer field {key!r} is missing", source)
            return fields[key]

        model = _as_str(need("tokenizer.ggml.model"))
        if model in ("tiktoken", "gpt2"):  # byte-level BPE (phi3small, Phi-4-mini): see tokenizer_from_gguf_fields
            return tokenizer_from_gguf_fields(fields, source)
        if model != "llama":
            raise PocketLMError(
                f"tokenizer.ggml.model is {model!r}; pocketlm reads only 'llama' (SentencePiece BPE)",
                source,
            )
        pieces = [_as_str(p) for p in need("tokenizer.ggml.tokens")]
        scores = [float(s) for s in need("tokenizer.ggml.scores")]
        types = [int(t) for t in need("tokenizer.ggml.token_type")]

        def optional_id(key: str, default: int | None) -> int | None:
            value = fields.get(key, default)
            return None if value is None else int(_scalar(value))

        # llama.cpp keys Phi-3's whitespace stripping on general.name containing "phi3"/"phi-3";
        # a mapping without general.name goes by the presence of Phi-3's chat tokens.
        name = fields.get("general.name")
        if name is not None:
            is_phi3 = any(s in _as_str(name).lower() for s in ("phi-3", "phi3"))
        else:
            is_phi3 = "<|end|>" in pieces and "<|user|>" in pieces
        control_ids = [
            i
            for i, (p, t) in enumerate(zip(pieces, types, strict=False))
            if t in (CONTROL, UNKNOWN) or p in LLAMA_CONTROL_LOOKING
        ]
        rstrip_ids = _phi3_rstrip_ids(pieces, types, control_ids) if is_phi3 else ()

        template = fields.get("tokenizer.chat_template")
        if METASPACE_SCHEME_KEY in fields:  # written by to_gguf_fields for HF Metaspace vocabularies
            spacing = {
                "prefix_scheme": _as_str(fields[METASPACE_SCHEME_KEY]),
                "prefix_only_if_missing": True,
                "split_on_space": bool(_scalar(fields.get(METASPACE_SPLIT_KEY, False))),
            }
        else:
            add_prefix = _scalar(fields.get("tokenizer.ggml.add_space_prefix", True))
            spacing = {"prefix_scheme": "always" if add_prefix else "never"}
        return cls(
            pieces,
            scores,
            types,
            bos_id=optional_id("tokenizer.ggml.bos_token_id", 1),
            eos_id=optional_id("tokenizer.ggml.eos_token_id", 2),
            unk_id=optional_id("tokenizer.ggml.unknown_token_id", 0),
            pad_id=optional_id("tokenizer.ggml.padding_token_id", None),
            add_bos=bool(_scalar(fields.get("tokenizer.ggml.add_bos_token", True))),
            add_eos=bool(_scalar(fields.get("tokenizer.ggml.add_eos_token", False))),
            chat_template=None if template is None else _as_str(template),
            control_ids=control_ids,
            rstrip_ids=rstrip_ids,
            source=source,
            **spacing,
        )

    @classmethod
    def from_hf_json(cls, path: str | os.PathLike, config: Mapping[str, Any] | None = None) -> Tokenizer:
        """Build from a Hugging Face `tokenizer.json` (BPE model, byte fallback); `config` is the
        parsed `tokenizer_config.json` (+ special_tokens_map.json) when there is one."""
        data = _read_json(path)
        try:
            return _HFReader(data, config or {}, path).tokenizer(cls)
        except (TypeError, ValueError, KeyError, AttributeError, IndexError, OverflowError) as e:
            # a field of the wrong type or shape the reader met unguarded: one line naming the file
            raise PocketLMError(f"malformed tokenizer.json: {type(e).__name__}: {e}", path) from None

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Build from a checkpoint folder: tokenizer.json, tokenizer_config.json,
        special_tokens_map.json, chat_template.jinja (the last three optional)."""
        folder = Path(path)
        tokenizer_json = folder / "tokenizer.json"
        if not tokenizer_json.is_file():
            raise PocketLMError("no tokenizer.json in this folder", folder)
        config: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins
            if (folder / name).is_file():
                config.update(_read_json(folder / name))
        if (folder / "chat_template.jinja").is_file():  # transformers >= 4.52 writes it apart
            config["chat_template"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        return cls.from_hf_json(tokenizer_json, config)

    # ---------------------------------------------------------------------------------- encoding

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end generation: eos, and <|end|>, <|endoftext|> where the vocabulary has them."""
        ids = {self.piece_to_id[p] for p in PHI3_CHAT_TOKENS if p in self.piece_to_id}
        if self.eos_id is not None:
            ids.add(self.eos_id)
        return sorted(ids)

    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        """Token ids of `text`: bos first when `add_bos` (None: the vocabulary's setting); eos last
        when the vocabulary adds eos, unless add_bos is False (llama.cpp's add_special)."""
        if not isinstance(text, str):
            raise PocketLMError(f"encode() takes text (str), got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise PocketLMError(f"text is not valid Unicode at character {e.start} ({e.reason})") from None
        ids: list[int] = []
        if self.add_bos if add_bos is None else add_bos:
            ids.append(self.bos_id)
        after_special = True  # the text start counts as "after a special token"
        for i, fragment in enumerate(self._partition(text, parse_special)):
            if isinstance(fragment, int):
                ids.append(fragment)
                after_special = True
                continue
            ids.extend(self._encode_fragment(fragment, self._wants_prefix(i, after_special)))
            after_special = False
        if self.add_eos and add_bos is not False and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def _wants_prefix(self, index: int, after_special: bool) -> bool:
        if self.prefix_scheme == "always":
            return after_special
        return self.prefix_scheme == "first" and index == 0

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Cut special tokens out of `text`, the longest first (llama.cpp tokenizer_st_partition)."""
        fragments: list[str | int] = [text] if text else []
        for token_id in self._special:
            if not parse_special and token_id in self.control_ids:
                continue
            token = self.pieces[token_id]
            if token not in text:
                continue
            lstrip, rstrip = token_id in self.lstrip_ids, token_id in self.rstrip_ids
            split: list[str | int] = []
            for fragment in fragments:
                if isinstance(fragment, int) or token not in fragment:
                    split.append(fragment)
                    continue
                start = 0
                while (match := fragment.find(token, start)) >= 0:
                    left_end = match
                    while lstrip and left_end > start and fragment[left_end - 1] in self.strip_chars:
                        left_end -= 1
                    if left_end > start:
                        split.append(fragment[start:left_end])
                    split.append(token_id)
                    start = match + len(token)
                    while rstrip and start < len(fragment) and fragment[start] in self.strip_chars:
                        start += 1
                if start < len(fragment):
                    split.append(fragment[start:])
            fragments = split
        return fragments

    def _encode_fragment(self, fragment: str, prefix: bool) -> list[int]:
        text = fragment.replace(" ", SPACE)
        if prefix and not (self.prefix_only_if_missing and text.startswith(SPACE)):
            text = SPACE + text
        chunks = (text,) if self._chunk_re is None else self._chunk_re.findall(text)
        ids: list[int] = []
        cache = self._cache
        for chunk in chunks:
            chunk_ids = cache.get(chunk)
            if chunk_ids is None:
                chunk_ids = tuple(self._bpe(chunk))
                if len(cache) < _CACHE_LIMIT:  # when full, keep the chunks seen first (common words)
                    cache[chunk] = chunk_ids
            ids.extend(chunk_ids)
        return ids

    def _bpe(self, text: str) -> list[int]:
        """Merge the characters of `text` into pieces; symbols that are no piece become bytes."""
        if self.merges is None:
            symbols = _merge_by_score(list(text), self._neg_score)
        else:
            symbols = _merge_by_rank(self._hf_initial_symbols(text), self._pair_rank)
        ids: list[int] = []
        for s in symbols:
            token_id = self.piece_to_id.get(s)
            if token_id is not None:
                ids.append(token_id)
            else:
                ids.extend(self._byte_ids[b] for b in s.encode("utf-8"))
        return ids

    def _hf_initial_symbols(self, text: str) -> list[str]:
        """HF BPE: characters that are no piece turn into <0xNN> symbols before merging."""
        symbols = []
        for ch in text:
            if ch in self.piece_to_id:
                symbols.append(ch)
            else:
                symbols.extend(self.pieces[self._byte_ids[b]] for b in ch.encode("utf-8"))
        return symbols

    def _byte_table(self) -> list[int]:
        """Token id for each byte value: <0xNN>, else the single-byte character, else unk."""
        table = []
        for b in range(256):
            token_id = self.piece_to_id.get(f"<0x{b:02X}>")
            if token_id is None and b < 128:
                token_id = self.piece_to_id.get(chr(b))
            if token_id is None:
                token_id = self.unk_id
            if token_id is None:
                raise self._error(f"byte 0x{b:02X} has no <0x{b:02X}> token and there is no unknown token")
            table.append(token_id)
        return table

    # ---------------------------------------------------------------------------------- decoding

    def _decode_table(self) -> list[bytes | None]:
        """UTF-8 bytes of each token; None for control/unknown tokens, shown only when asked. A
        GGUF token string that is not valid UTF-8 (kept by the reader as surrogate escapes) gives
        back its original bytes; decoding replaces invalid sequences with U+FFFD, as llama.cpp's
        text output does, so no text handed to a caller holds a lone surrogate."""
        table: list[bytes | None] = []
        for i, (piece, kind) in enumerate(zip(self.pieces, self.token_types, strict=True)):
            match = _BYTE_PIECE.fullmatch(piece)
            if i in self.control_ids:
                table.append(None)
            elif kind == BYTE and match:
                table.append(bytes([int(match.group(1), 16)]))
            elif kind in (CONTROL, UNKNOWN):
                table.append(None)
            elif kind == USER_DEFINED:
                table.append(piece.encode("utf-8", "surrogateescape"))
            elif kind == UNUSED:
                table.append(b"")
            else:
                table.append(piece.replace(SPACE, " ").encode("utf-8", "surrogateescape"))
        return table

    def token_bytes(self, token_id: int, skip_special: bool = True) -> bytes:
        """The bytes token `token_id` stands for (b"" for control tokens when `skip_special`)."""
        if not isinstance(token_id, (int, np.integer)) or not 0 <= token_id < len(self.pieces):
            raise PocketLMError(f"token id {token_id!r} is out of range [0, {len(self.pieces)})")
        data = self._piece_bytes[int(token_id)]
        if data is None:
            return b"" if skip_special else self.pieces[token_id].encode("utf-8", "surrogateescape")
        return data

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of `ids`; control tokens are dropped unless `skip_special` is False. The space the
        encoder put in front of the text is removed (like HF's Strip decoder)."""
        data = b"".join(self.token_bytes(i, skip_special) for i in ids)
        return self._strip_prefix(data.decode("utf-8", errors="replace"))

    def _strip_prefix(self, text: str) -> str:
        return text[1:] if self.prefix_scheme != "never" and text.startswith(" ") else text

    @property
    def wants_phi3_name(self) -> bool:
        """Whether llama.cpp reproduces this tokenizer's whitespace stripping only when the GGUF's
        general.name contains "phi3" (its Phi-3 rule). Without such a name llama.cpp strips
        nothing, so a GGUF writer names the model accordingly; llama.cpp cannot express any
        other rstrip/lstrip set. (With the name, llama.cpp also needs <unk>, <s>, </s> and
        <|endoftext|> in the vocabulary, or it fails to load.)"""
        needed = ("<unk>", "<s>", "</s>", "<|endoftext|>")
        if self.lstrip_ids or not self.rstrip_ids or any(p not in self.piece_to_id for p in needed):
            return False
        return set(self.rstrip_ids) == set(_phi3_rstrip_ids(self.pieces, self.token_types, self.control_ids))

    def stream_decoder(self, skip_special: bool = True, continuation: bool = False) -> StreamDecoder:
        """A decoder fed one token at a time that returns only complete UTF-8 text.

        `continuation=True` for text that follows a prompt: the leading space of the first token is
        then a real space, not SentencePiece's dummy prefix, and is kept."""
        return StreamDecoder(self, skip_special, continuation)

    # -------------------------------------------------------------------------------------- chat

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The Phi-3 prompt for `messages` (see pocketlm.chat)."""
        eos = "" if self.eos_id is None else self.pieces[self.eos_id]
        return _render_chat(messages, add_generation_prompt, eos)

    # ----------------------------------------------------------------------------------- writing

    def to_gguf_fields(self) -> dict[str, Any]:
        """GGUF metadata for this vocabulary; value types in GGUF_FIELD_TYPES (tokens: list of str,
        scores: float32 array, token_type: int32 array, ids: uint32, flags: bool)."""
        fields: dict[str, Any] = {
            "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.tokens": list(self.pieces),
            "tokenizer.ggml.scores": np.asarray(self.scores, dtype=np.float32),
            "tokenizer.ggml.token_type": np.asarray(self.token_types, dtype=np.int32),
            "tokenizer.ggml.add_bos_token": self.add_bos,
            "tokenizer.ggml.add_eos_token": self.add_eos,
            "tokenizer.ggml.add_space_prefix": self.prefix_scheme != "never",
        }
        for key, value in (
            ("bos_token_id", self.bos_id),
            ("eos_token_id", self.eos_id),
            ("unknown_token_id", self.unk_id),
            ("padding_token_id", self.pad_id),
        ):
            if value is not None:
                fields[f"tokenizer.ggml.{key}"] = int(value)
        if self.chat_template is not None:
            fields["tokenizer.chat_template"] = self.chat_template
        if self.prefix_only_if_missing or self.prefix_scheme == "first" or self.split_on_space:
            # HF Metaspace spacing, which llama.cpp cannot express (it prefixes every fragment
            # with " ", even one that starts with a space): kept for pocketlm's own runtime.
            fields[METASPACE_SCHEME_KEY] = self.prefix_scheme
            fields[METASPACE_SPLIT_KEY] = self.split_on_space
        return fields

    def write_hf_files(self, out_dir: str | os.PathLike) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json (loadable by
        HF tokenizers, transformers and onnxruntime-genai; they tokenize like this object)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name, content in _hf_files(self).items():
            _write_atomic(out / name, json.dumps(content, ensure_ascii=False, indent=2) + "\n")

    # ----------------------------------------------------------------------------------- helpers

    def _check_id(self, token_id: int | None, what: str) -> int | None:
        if token_id is None:
            return None
        token_id = int(token_id)
        if not 0 <= token_id < len(self.pieces):
            raise self._error(f"{what} token id {token_id} is out of range [0, {len(self.pieces)})")
        return token_id

    def _error(self, message: str) -> PocketLMError:
        return PocketLMError(message, self.source)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, {self.source!r})"
        )


class StreamDecoder:
    """Turns generated token ids into text as they come, holding back partial UTF-8 sequences.
    The concatenation of everything `push` and `flush` return equals `Tokenizer.decode(ids)`."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True, continuation: bool = False):
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._started = continuation

    def push(self, token_id: int) -> str:
        return self._emit(self._utf8.decode(self._tokenizer.token_bytes(token_id, self._skip_special)))

    def flush(self) -> str:
        """Whatever is held back (an incomplete UTF-8 sequence comes out as U+FFFD)."""
        return self._emit(self._utf8.decode(b"", final=True))

    def _emit(self, text: str) -> str:
        if text and not self._started:
            self._started = True
            return self._tokenizer._strip_prefix(text)
        return text


# ------------------------------------------------------------------------------ tokenizer.json


class _HFReader:
    """Reads the parts of an HF tokenizer.json (+ tokenizer_config.json) a Llama-style BPE uses."""

    def __init__(self, data: Mapping[str, Any], config: Mapping[str, Any], path: str | os.PathLike):
        self.data, self.config, self.path = data, config, path

    def error(self, message: str) -> PocketLMError:
        return PocketLMError(message, self.path)

    def tokenizer(self, cls: type[Tokenizer]) -> Tokenizer:
        model = self.data.get("model")
        if not isinstance(model, Mapping) or model.get("type") != "BPE":
            kind = model.get("type") if isinstance(model, Mapping) else None
            raise self.error(f"tokenizer model is {kind!r}; pocketlm reads SentencePiece-style 'BPE' models")
        if not model.get("byte_fallback", False):
            raise self.error("the BPE model has no byte_fallback (pocketlm reads SentencePiece-style BPE)")
        pieces = self.pieces(model)
        merges = self.merges(model)
        types = self.token_types(pieces, model)
        added = {int(t["id"]): t for t in self.data.get("added_tokens") or []}
        scheme, only_if_missing, split = self.space_handling()
        bos = self.special_id("bos_token", pieces, "<s>")
        eos = self.special_id("eos_token", pieces, "</s>")
        unk = self.special_id("unk_token", pieces, model.get("unk_token"))
        pad = self.special_id("pad_token", pieces, None)
        add_bos = self.config.get("add_bos_token")
        if add_bos is None:
            add_bos = self.post_processor_adds(bos, pieces)
        template = self.config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default")
        return cls(
            pieces,
            _scores_from_merges(pieces, merges),  # what a GGUF needs to merge like the ranks
            types,
            bos_id=bos,
            eos_id=eos,
            unk_id=unk,
            pad_id=pad,
            add_bos=bool(add_bos) and bos is not None,
            add_eos=bool(self.config.get("add_eos_token", False)),
            chat_template=template,
            merges=merges,
            rstrip_ids=[i for i, t in added.items() if t.get("rstrip")],
            lstrip_ids=[i for i, t in added.items() if t.get("lstrip")],
            strip_chars=UNICODE_SPACES,
            prefix_scheme=scheme,
            prefix_only_if_missing=only_if_missing,
            split_on_space=split,
            source=self.path,
        )

    def pieces(self, model: Mapping[str, Any]) -> list[str]:
        by_id = {int(i): p for p, i in model.get("vocab", {}).items()}
        for token in self.data.get("added_tokens") or []:
            by_id.setdefault(int(token["id"]), token["content"])
        if not by_id:
            raise self.error("the BPE model has an empty vocab")
        missing = sorted(set(range(len(by_id))) - set(by_id))  # ids outside 0..n-1 leave a gap
        if missing:
            raise self.error(f"token ids {missing[:5]} are missing from the vocab (ids must be 0..n-1)")
        return [by_id[i] for i in range(len(by_id))]

    def merges(self, model: Mapping[str, Any]) -> list[tuple[str, str]]:
        merges = []
        for m in model.get("merges", []):
            pair = m.split(" ") if isinstance(m, str) else m
            if len(pair) != 2:
                raise self.error(f"merge {m!r} is not a pair of pieces")
            merges.append((pair[0], pair[1]))
        return merges

    def token_types(self, pieces: list[str], model: Mapping[str, Any]) -> list[int]:
        types = [BYTE if _BYTE_PIECE.fullmatch(p) else NORMAL for p in pieces]
        unk = model.get("unk_token")
        for i, p in enumerate(pieces):
            if p == unk:
                types[i] = UNKNOWN
        for token in self.data.get("added_tokens") or []:
            types[int(token["id"])] = CONTROL if token.get("special") else USER_DEFINED
        return types

    def space_handling(self) -> tuple[str, bool, bool]:
        """(prefix scheme, prefix only if the text does not start with a space, split on spaces)."""
        normalizers = _flatten(self.data.get("normalizer"), "normalizers")
        pre_tokenizers = _flatten(self.data.get("pre_tokenizer"), "pretokenizers")
        prepend = any(n.get("type") == "Prepend" and n.get("prepend") == SPACE for n in normalizers)
        for n in normalizers:
            if n.get("type") not in ("Prepend", "Replace"):
                raise self.error(f"unsupported normalizer {n.get('type')!r} (pocketlm reads Prepend/Replace)")
            if n.get("type") == "Replace" and (
                n.get("pattern") != {"String": " "} or n.get("content") != SPACE
            ):
                raise self.error(f"unsupported Replace normalizer {n!r}")
        metaspace = [p for p in pre_tokenizers if p.get("type") == "Metaspace"]
        if len(metaspace) != len(pre_tokenizers):
            kinds = [p.get("type") for p in pre_tokenizers]
            raise self.error(f"unsupported pre-tokenizers {kinds} (pocketlm reads Metaspace only)")
        if metaspace:
            m = metaspace[0]
            if m.get("replacement", SPACE) != SPACE:
                raise self.error(f"Metaspace replacement {m.get('replacement')!r} is not {SPACE!r}")
            scheme = m.get("prepend_scheme")
            if scheme is None:  # tokenizers < 0.15
                scheme = "always" if m.get("add_prefix_space", True) else "never"
            if scheme not in PREFIX_SCHEMES:
                raise self.error(f"unknown Metaspace prepend_scheme {scheme!r}")
            return scheme, True, bool(m.get("split", True))
        if not any(n.get("type") == "Replace" for n in normalizers):
            raise self.error("neither a Replace(' ', '▁') normalizer nor a Metaspace pre-tokenizer")
        return ("always" if prepend else "never"), False, False

    def special_id(self, key: str, pieces: list[str], default: str | None) -> int | None:
        value = self.config.get(key, default)
        if isinstance(value, Mapping):
            value = value.get("content")
        if value is None:
            return None
        ids = [i for i, p in enumerate(pieces) if p == value]
        if not ids:
            if key in self.config:
                raise self.error(f"{key} {value!r} is not in the vocabulary")
            return None
        return ids[-1]

    def post_processor_adds(self, bos: int | None, pieces: list[str]) -> bool:
        processors = _flatten(self.data.get("post_processor"), "processors")
        for p in processors:
            if p.get("type") == "TemplateProcessing" and bos is not None:
                first = (p.get("single") or [{}])[0]
                return first.get("SpecialToken", {}).get("id") == pieces[bos]
        return False


def _flatten(node: Mapping[str, Any] | None, key: str) -> list[Mapping[str, Any]]:
    """The members of a Sequence node (or the node itself) as a list."""
    if node is None:
        return []
    if node.get("type") == "Sequence":
        return [m for child in node.get(key, []) for m in _flatten(child, key)]
    return [node]


# ------------------------------------------------------------------------------------- BPE


def _merge_by_score(symbols: list[str], neg_score: dict[str, float]) -> list[str]:
    """SentencePiece BPE (llama.cpp llm_tokenizer_spm): repeatedly merge the adjacent pair whose
    concatenation is the piece with the highest score; ties go to the leftmost pair."""
    get = neg_score.get
    return _merge_pairs(symbols, lambda a, b: get(a + b))


def _merge_by_rank(symbols: list[str], pair_rank: dict[tuple[str, str], int]) -> list[str]:
    """HF tokenizers BPE: repeatedly apply the listed merge with the lowest rank, leftmost first."""
    get = pair_rank.get
    return _merge_pairs(symbols, lambda a, b: get((a, b)))


def _merge_pairs(symbols: list[str], priority: Callable[[str, str], float | None]) -> list[str]:
    """Merge adjacent symbols, lowest `priority(left, right)` first (None: never), leftmost on ties.

    A heap of candidate pairs over a doubly linked list of symbols; a popped pair is stale when
    one side was merged away or grew since it was queued (llama.cpp's test: the combined length)."""
    n = len(symbols)
    if n < 2:
        return symbols
    following = [*range(1, n), -1]
    preceding = list(range(-1, n - 1))
    heap = []  # (priority, left index, right index, combined length in characters)
    for i in range(n - 1):
        p = priority(symbols[i], symbols[i + 1])
        if p is not None:
            heap.append((p, i, i + 1, len(symbols[i]) + len(symbols[i + 1])))
    heapq.heapify(heap)
    pop, push = heapq.heappop, heapq.heappush
    while heap:
        _, left, right, size = pop(heap)
        a, b = symbols[left], symbols[right]
        if not a or not b or len(a) + len(b) != size:
            continue
        merged = a + b
        symbols[left], symbols[right] = merged, ""
        after = following[right]
        following[left] = after
        if after >= 0:
            preceding[after] = left
            c = symbols[after]
            p = priority(merged, c)
            if p is not None:
                push(heap, (p, left, after, size + len(c)))
        before = preceding[left]
        if before >= 0:
            c = symbols[before]
            p = priority(c, merged)
            if p is not None:
                push(heap, (p, before, left, size + len(c)))
    return [s for s in symbols if s]


def _chunk_pattern(formable: Sequence[str], split_on_space: bool) -> re.Pattern[str] | None:
    """A regex whose matches cut BPE input into chunks no merge can cross, or None.

    A merge across a border would make a piece that holds the two characters at the border, so
    a border is safe where no formable piece (a piece of 2+ characters that merging can make)
    holds them: before a "▁" that follows another character, when no such piece holds "x▁" with
    x != "▁"; and on both sides of a character in no such piece (e.g. "\\n" in Phi-3), which is
    looked for among the first 256 code points.
    """
    inner_space = re.compile(f"[^{SPACE}]{SPACE}")
    if any(inner_space.search(p) for p in formable):
        return None
    used = set("".join(formable))
    isolated = re.escape("".join(chr(c) for c in range(256) if chr(c) not in used and chr(c) != " "))
    if split_on_space:  # HF Metaspace(split=True) cuts before every "▁" anyway
        return re.compile(f"[{isolated}]|{SPACE}[^{SPACE}{isolated}]*|[^{SPACE}{isolated}]+")
    return re.compile(f"[{isolated}]|{SPACE}*[^{SPACE}{isolated}]+|{SPACE}+")


# ---------------------------------------------------------------------------- HF files out


def _hf_files(tok: Tokenizer) -> dict[str, Any]:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json contents for `tok`."""
    merges = tok.merges if tok.merges is not None else _merges_from_scores(tok.pieces, tok.scores)
    spaced = any(" " in a or " " in b for a, b in merges)
    added = [
        {
            "id": i,
            "content": tok.pieces[i],
            "single_word": False,
            "lstrip": i in tok.lstrip_ids,
            "rstrip": i in tok.rstrip_ids,
            "normalized": False,
            "special": i in tok.control_ids,
        }
        for i in sorted(tok._special)
    ]
    if tok.prefix_only_if_missing or tok.prefix_scheme == "first" or tok.split_on_space:
        normalizer = None
        pre_tokenizer = {
            "type": "Metaspace",
            "replacement": SPACE,
            "prepend_scheme": tok.prefix_scheme,
            "split": tok.split_on_space,
        }
    else:
        steps = [{"type": "Prepend", "prepend": SPACE}] if tok.prefix_scheme == "always" else []
        steps.append({"type": "Replace", "pattern": {"String": " "}, "content": SPACE})
        normalizer, pre_tokenizer = {"type": "Sequence", "normalizers": steps}, None
    decoders = [
        {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ]
    if tok.prefix_scheme != "never":
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    unk = None if tok.unk_id is None else tok.pieces[tok.unk_id]
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": _hf_post_processor(tok),
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": unk,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": {p: i for p, i in tok.piece_to_id.items()},
            "merges": [[a, b] for a, b in merges] if spaced else [f"{a} {b}" for a, b in merges],
        },
    }
    names = {
        "bos_token": tok.bos_id,
        "eos_token": tok.eos_id,
        "unk_token": tok.unk_id,
        "pad_token": tok.pad_id,
    }
    special_map = {key: tok.pieces[i] for key, i in names.items() if i is not None}
    config: dict[str, Any] = {
        "add_bos_token": tok.add_bos,
        "add_eos_token": tok.add_eos,
        "add_prefix_space": None if tok.prefix_scheme == "always" else tok.prefix_scheme != "never",
        "added_tokens_decoder": {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added},
        **special_map,
        "clean_up_tokenization_spaces": False,
        # transformers' LlamaTokenizer keeps the Prepend normalizer only with legacy=True
        "legacy": normalizer is not None,
        "model_max_length": 131072,
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "LlamaTokenizer",
        "use_default_system_prompt": False,
    }
    if config["add_prefix_space"] is None:
        del config["add_prefix_space"]
    if tok.chat_template is not None:
        config["chat_template"] = tok.chat_template
    return {
        "tokenizer.json": tokenizer_json,
        "tokenizer_config.json": config,
        "special_tokens_map.json": special_map,
    }


def _hf_post_processor(tok: Tokenizer) -> dict[str, Any] | None:
    """TemplateProcessing that adds bos (and eos) the way `encode` does."""
    before = [tok.bos_id] if tok.add_bos else []
    after = [tok.eos_id] if tok.add_eos and tok.eos_id is not None else []
    if not before and not after:
        return None

    def special(i: int, type_id: int) -> dict[str, Any]:
        return {"SpecialToken": {"id": tok.pieces[i], "type_id": type_id}}

    def sequence(name: str, type_id: int) -> dict[str, Any]:
        return {"Sequence": {"id": name, "type_id": type_id}}

    single = [special(i, 0) for i in before] + [sequence("A", 0)] + [special(i, 0) for i in after]
    pair = single + [special(i, 1) for i in before] + [sequence("B", 1)] + [special(i, 1) for i in after]
    used = sorted(set(before + after))
    return {
        "type": "TemplateProcessing",
        "single": single,
        "pair": pair,
        "special_tokens": {
            tok.pieces[i]: {"id": tok.pieces[i], "ids": [i], "tokens": [tok.pieces[i]]} for i in used
        },
    }


def _merges_from_scores(pieces: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """BPE merges equivalent to merging by piece score, as transformers' SentencePieceExtractor
    derives them: every split of a piece into two pieces, ordered by the piece's score (highest
    first), then longer left part, then longer right part, then by the ids of the parts."""
    index: dict[str, int] = {}
    for i, p in enumerate(pieces):
        index[p] = i
    candidates = []
    for i, piece in enumerate(pieces):
        if index[piece] != i:
            continue
        local = []
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in index and right in index:
                local.append((index[left], index[right], left, right))
        local.sort()
        candidates.extend(
            (-scores[i], -len(left), -len(right), n, left, right)
            for n, (_, _, left, right) in enumerate(local, start=len(candidates))
        )
    candidates.sort()
    return [(left, right) for *_, left, right in candidates]


# ---------------------------------------------------------------------------------- helpers


def _phi3_rstrip_ids(pieces: Sequence[str], types: Sequence[int], control_ids: Iterable[int]) -> list[int]:
    """llama.cpp's Phi-3 rule: special tokens and </s> swallow the whitespace after them,
    except <unk>, <s> and <|endoftext|>."""
    ids = {i for i, t in enumerate(types) if t in SPECIAL_TYPES} | set(control_ids)
    ids |= {i for i, p in enumerate(pieces) if p == "</s>"}
    return sorted(i for i in ids if pieces[i] not in PHI3_NO_RSTRIP)


def _scores_from_merges(pieces: Sequence[str], merges: Sequence[tuple[str, str]]) -> list[float]:
    """SentencePiece-style scores for a merges list: a piece scores minus the rank of the first
    merge that makes it, so merging by score repeats merging by rank. Pieces no merge makes
    score 0 (characters, bytes, special tokens; their score is never consulted)."""
    scores = [0.0] * len(pieces)
    index = {p: i for i, p in enumerate(pieces)}
    seen = set()
    for rank, (a, b) in enumerate(merges):
        i = index[a + b]
        if i not in seen:
            seen.add(i)
            scores[i] = -float(rank + 1)
    return scores


def _scalar(value: Any) -> Any:
    """A GGUF scalar given as itself, a 0-d/1-element numpy array, or a 1-element list."""
    if isinstance(value, np.ndarray):
        return value.reshape(-1)[0].item() if value.size == 1 else value
    if isinstance(value, (list, tuple)) and len(value) == 1:
        return value[0]
    return value


def _as_str(value: Any) -> str:
    value = _scalar(value)
    if isinstance(value, (bytes, bytearray, np.ndarray)):
        return bytes(value).decode("utf-8")
    return str(value)


def _read_json(path: str | os.PathLike) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise PocketLMError(f"cannot read: {e.strerror}", path) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PocketLMError(f"not valid JSON: {e}", path) from None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def tokenizer_from_gguf_fields(fields: Mapping[str, Any], source: str | os.PathLike | None = None) -> Any:
    """The tokenizer GGUF `fields` describe: `TiktokenTokenizer` (byte-level BPE by rank,
    Phi-3-small) for tokenizer.ggml.model "tiktoken", `ByteLevelTokenizer` (HF byte-level BPE,
    Phi-4-mini) for "gpt2", else the SentencePiece `Tokenizer`."""
    model = _as_str(fields.get("tokenizer.ggml.model", ""))
    if model == "tiktoken":
        from .tokenizer_tiktoken import TiktokenTokenizer

        return TiktokenTokenizer.from_gguf_fields(fields, source)
    if model == "gpt2":
        from .tokenizer_bytelevel import ByteLevelTokenizer

        return ByteLevelTokenizer.from_gguf_fields(fields, source)
    return Tokenizer.from_gguf_fields(fields, source)


def tokenizer_from_dir(path: str | os.PathLike) -> Any:
    """The tokenizer of a checkpoint folder: a `*.tiktoken` rank file (Phi-3-small), a byte-level
    BPE tokenizer.json (Phi-4-mini) or a SentencePiece-style tokenizer.json (Phi-3)."""
    folder = Path(path)
    if any(folder.glob("*.tiktoken")):
        from .tokenizer_tiktoken import TiktokenTokenizer

        return TiktokenTokenizer.from_hf_dir(folder)
    if (folder / "tokenizer.json").is_file():
        from .tokenizer_bytelevel import ByteLevelTokenizer, is_bytelevel_json

        data = _read_json(folder / "tokenizer.json")  # parsed once, handed on
        if is_bytelevel_json(data):
            return ByteLevelTokenizer.from_hf_dir(folder, data)
    return Tokenizer.from_hf_dir(folder)


def has_tokenizer(path: str | os.PathLike) -> bool:
    folder = Path(path)
    return (folder / "tokenizer.json").is_file() or any(folder.glob("*.tiktoken"))
