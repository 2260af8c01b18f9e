"""The Shakespeare corpus and its three disjoint splits, defined once.

The corpus is `<repo>/../shared/data/shakespeare/*.txt`: one work (play or poem) a file. It is split
by whole works, so no line of text is shared between splits:

- `heldout`: evaluation text (perplexity, KL divergence of a quantized model from the fp16 one);
- `calib`: calibration text for quantizers (importance matrices, GPTQ/AWQ statistics); never
  evaluated on, so a quantizer is never measured on the text it was tuned with;
- `train`: every other work; the built-in model and its tokenizer are trained on it.

Every consumer (training script, quantizers, benchmarks, tests) goes through this module. The
tests use the copy in `tests/data/` (every heldout and calib work and two short train works; their
conftest points `$POCKETLM_SHARED_DIR` at `tests/`), so they pass on a clone with nothing beside it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import PocketLMError

SPLITS = ("train", "heldout", "calib")

# Fixed lists of file stems. A tragedy, a comedy and the sonnets (verse) for evaluation; a
# romance and a history for calibration. Everything else is training text.
HELDOUT_WORKS = ("julius_caesar_gut", "twelfth_night_gut", "sonnets_gut")
CALIB_WORKS = ("tempest_gut", "richard_ii_gut")

# Project Gutenberg wraps its texts in "*** START OF ... ***" / "*** END OF ... ***" lines with a
# licence before and after; the shared files are mostly clean already, but strip it if present.
_GUTENBERG_START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_GUTENBERG_END = re.compile(r"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_GUTENBERG_TAIL = re.compile(r"^End of (the )?Project Gutenberg.*$", re.I | re.M)


def default_shared_dir() -> Path:
    """The shared data folder: `$POCKETLM_SHARED_DIR`, else `../shared` beside the repository
    checkout (editable install) or beside the current directory (an installed package run from the
    checkout, as CI does)."""
    env = os.environ.get("POCKETLM_SHARED_DIR")
    if env:
        return Path(env)
    beside_repo = Path(__file__).resolve().parents[2] / "shared"
    if (beside_repo / "data").is_dir():
        return beside_repo
    return Path.cwd().resolve().parent / "shared"


def corpus_dir(shared_dir: str | Path | None = None) -> Path:
    """The folder holding the corpus `*.txt` files; a PocketLMError if it is missing or empty."""
    base = Path(shared_dir) if shared_dir is not None else default_shared_dir()
    folder = base / "data" / "shakespeare"
    if not folder.is_dir():
        raise PocketLMError("the Shakespeare corpus folder is missing", str(folder))
    if not any(folder.glob("*.txt")):
        raise PocketLMError("the Shakespeare corpus folder holds no *.txt files", str(folder))
    return folder


def split_of(stem: str) -> str:
    """Which split a work (file stem) belongs to."""
    if stem in HELDOUT_WORKS:
        return "heldout"
    if stem in CALIB_WORKS:
        return "calib"
    return "train"


def corpus_files(split: str, shared_dir: str | Path | None = None) -> list[Path]:
    """The works of one split, sorted by file name (a deterministic order)."""
    if split not in SPLITS:
        raise PocketLMError(f"unknown corpus split {split!r}; expected one of {', '.join(SPLITS)}")
    folder = corpus_dir(shared_dir)
    files = sorted(folder.glob("*.txt"))
    stems = {p.stem for p in files}
    for stem in HELDOUT_WORKS + CALIB_WORKS:
        if stem not in stems:
            raise PocketLMError(f"the corpus lacks the work {stem}.txt named by the fixed split",
                                str(folder))
    return [p for p in files if split_of(p.stem) == split]


def strip_gutenberg(text: str) -> str:
    """Drop Project Gutenberg header and licence footer, if any; normalise line ends to '\\n'."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff")
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text) or _GUTENBERG_TAIL.search(text)
    if end:
        text = text[:end.start()]
    return text.strip("\n") + "\n"


def read_work(path: str | Path) -> str:
    """One work's text without boilerplate."""
    try:
        raw = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PocketLMError(f"cannot read corpus file: {e}", str(path)) from None
    return strip_gutenberg(raw)


def read_split(split: str, shared_dir: str | Path | None = None) -> str:
    """All works of a split, in file-name order, separated by a blank line."""
    return "\n".join(read_work(p) for p in corpus_files(split, shared_dir))
