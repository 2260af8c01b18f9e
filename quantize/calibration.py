"""Calibration data: N token sequences of length L that the quantizer runs through the model.

Source: a plain-text file, a folder of `*.txt` files (sorted by name, read recursively), or, by
default, the corpus `calib` split (works never used for evaluation, see `pocketlm.corpus`).
The text is tokenised with the model's own tokenizer; the sequences are N non-overlapping windows
spread evenly over the tokens, each starting with BOS (as every prompt the model sees does, and
as llama.cpp's imatrix tool feeds its chunks).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pocketlm.errors import PocketLMError

DEFAULT_SAMPLES = 64
DEFAULT_LENGTH = 256
_ENCODE_PIECE_CHARS = 32_768  # text is encoded in pieces cut at line ends, only as far as needed


@dataclass(frozen=True)
class Calibration:
    tokens: np.ndarray  # [N, L] int64, first column BOS
    source: str         # "corpus:calib" or the file/folder path

    @property
    def samples(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def length(self) -> int:
        return int(self.tokens.shape[1])

    def summary(self) -> str:
        """What goes into the GGUF's `pocketlm.calibration` key."""
        return f"{self.source}; {self.samples} samples x {self.length} tokens"


def read_calibration_text(source: str | os.PathLike | None) -> tuple[str, str]:
    """(text, description of the source). None -> the corpus `calib` split."""
    if source is None:
        from pocketlm.corpus import read_split

        return read_split("calib"), "corpus:calib"
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise PocketLMError("calibration folder holds no *.txt files", path)
    elif path.is_file():
        files = [path]
    else:
        raise PocketLMError("calibration text not found (expected a text file or a folder of *.txt)", path)
    texts = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise PocketLMError(f"calibration text is not UTF-8 (byte {e.start})", f) from None
        except OSError as e:
            raise PocketLMError(f"cannot read calibration text: {e.strerror}", f) from None
        if text.strip():
            texts.append(text)
    if not texts:
        raise PocketLMError("calibration text is empty", path)
    return "\n".join(texts), str(path)


def encode_enough(tokenizer, text: str, needed: int | None = None) -> list[int]:
    """Token ids of `text` without BOS, encoding piece by piece until `needed` ids are there
    (None: all of it). Pieces end at line breaks, so no token straddles a cut."""
    ids: list[int] = []
    start = 0
    while start < len(text) and (needed is None or len(ids) < needed):
        end = min(len(text), start + _ENCODE_PIECE_CHARS)
        if end < len(text):
            newline = text.rfind("\n", start, end)
            end = newline + 1 if newline > start else end
        ids.extend(tokenizer.encode(text[start:end], add_bos=False))
        start = end
    return ids


def make_sequences(ids: list[int], samples: int, length: int, bos_id: int | None, source: str) -> np.ndarray:
    """N evenly spread, non-overlapping windows of `length` tokens (BOS + length-1 text tokens)."""
    if samples < 1 or length < 2:
        raise PocketLMError(f"calibration needs at least 1 sample of at least 2 tokens, got "
                            f"{samples} x {length}")
    body = length - 1 if bos_id is not None else length
    if len(ids) < samples * body:
        raise PocketLMError(
            f"calibration text too short: {len(ids)} tokens, but {samples} samples x {length} tokens "
            f"need {samples * body}; give more text or lower --calib-samples/--calib-len", source)
    stride = len(ids) // samples
    arr = np.asarray(ids, dtype=np.int64)
    rows = [arr[k * stride:k * stride + body] for k in range(samples)]
    out = np.stack(rows)
    if bos_id is not None:
        out = np.concatenate([np.full((samples, 1), bos_id, dtype=np.int64), out], axis=1)
    return out


def load_calibration(tokenizer, source: str | os.PathLike | None = None, samples: int = DEFAULT_SAMPLES,
                     length: int = DEFAULT_LENGTH) -> Calibration:
    """Tokenised calibration sequences [samples, length] from `source` (None: corpus calib split)."""
    text, where = read_calibration_text(source)
    ids = encode_enough(tokenizer, text)  # all of it, so that the windows spread over the whole text
    return Calibration(make_sequences(ids, samples, length, tokenizer.bos_id, where), where)
