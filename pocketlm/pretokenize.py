r"""tiktoken's cl100k pre-tokenizer in plain Python `re` (no `regex` module on a phone).

cl100k_base splits text into pieces with (`openai/tiktoken`, `tiktoken_ext/openai_public.py`)

    (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+

and BPE runs on each piece apart. Python's `re` has no \p{..} classes and its `\s` is not
Rust's, so the same pattern is written here with explicit character classes:

- \p{L} (general category L*) and \p{N} (N*) are listed from `unicodedata` (built once, 0.1 s);
- \s is Unicode White_Space, what the Rust `regex` crate (behind tiktoken's fancy-regex) means by
  it. Python's `str.isspace()` adds U+001C..U+001F, which White_Space leaves out.

Speed: Python `re` tests a class's characters above U+FFFF one range at a time (only the BMP part
becomes a bitmap), which made these classes 6x slower. So the classes hold BMP characters only,
and the rare characters above U+FFFF are matched through a stand-in of the same kind ("a" for a
letter, "0" for a digit, "!" otherwise: none is whitespace or case-folds to a contraction
letter); the pieces are then cut from the original text at the same positions.

Both engines are backtracking for this pattern (fancy-regex runs it on its backtracking VM
because of the look-ahead), so alternation is leftmost-first in both and the pieces are equal.
Character categories follow Python's Unicode database (14.0 on Python 3.11); the Rust crate may
be a version or two newer, which matters only for letters and digits assigned since.

o200k (GPT-4o; Phi-4-mini's tokenizer.json Split pattern, llama.cpp's `gpt-4o` pre-tokenizer) is
written the same way (`tiktoken_ext/openai_public.py`, `o200k_base`):

    [^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?
    |[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?
    |\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+

A word ends where a capital follows a small letter ("camelCase" -> "camel", "Case"; "fooBAR" ->
"foo", "BAR"; "HTTPServer" stays whole) and keeps its contraction ("don't", "I'M"). Its classes
need the finer categories (Lu/Lt, Ll, Lm/Lo, M), so the stand-ins for characters above U+FFFF keep them apart too.
"""

from __future__ import annotations

import functools
import re
import unicodedata

# Unicode White_Space (PropList.txt), the Rust regex crate's \s.
WHITE_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + (
    "\u2028\u2029\u202f\u205f\u3000"
)


def _class_body(chars: list[int]) -> str:
    """`[...]` contents (no brackets) for a sorted list of code points, as ranges."""
    parts = []
    start = prev = chars[0]
    for c in [*chars[1:], -2]:
        if c == prev + 1:
            prev = c
            continue
        parts.append(f"\\U{start:08x}" if start == prev else f"\\U{start:08x}-\\U{prev:08x}")
        start = prev = c
    return "".join(parts)


@functools.cache
def _bmp_categories() -> dict[str, list[int]]:
    """BMP code points by general category (two letters), one pass over unicodedata."""
    category = unicodedata.category
    by_category: dict[str, list[int]] = {}
    for c in range(0x10000):
        by_category.setdefault(category(chr(c)), []).append(c)
    return by_category


def _class_of(*categories: str) -> str:
    """`[...]` contents for the BMP characters of the given categories ("L" means all L*)."""
    chars: list[int] = []
    for name, members in _bmp_categories().items():
        if any(name.startswith(c) for c in categories):
            chars.extend(members)
    return _class_body(sorted(chars))


@functools.cache
def cl100k_regex() -> re.Pattern[str]:
    """The cl100k_base pattern compiled for Python `re`."""
    L, N = _class_of("L"), _class_of("N")
    S = _class_body(sorted(map(ord, WHITE_SPACE)))
    pattern = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
        rf"|[^\r\n{L}{N}]?[{L}]+"
        rf"|[{N}]{{1,3}}"
        rf"| ?[^{S}{L}{N}]+[\r\n]*"
        rf"|[{S}]*[\r\n]+"
        rf"|[{S}]+(?![^{S}])"
        rf"|[{S}]+"
    )
    return re.compile(pattern)


@functools.cache
def o200k_regex() -> re.Pattern[str]:
    """The o200k_base (GPT-4o) pattern compiled for Python `re` (see the module docstring)."""
    L, N = _class_of("L"), _class_of("N")
    upper = _class_of("Lu", "Lt", "Lm", "Lo", "M")  # [\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]
    lower = _class_of("Ll", "Lm", "Lo", "M")  # [\p{Ll}\p{Lm}\p{Lo}\p{M}]
    S = _class_body(sorted(map(ord, WHITE_SPACE)))
    contraction = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    pattern = (
        rf"[^\r\n{L}{N}]?[{upper}]*[{lower}]+{contraction}"
        rf"|[^\r\n{L}{N}]?[{upper}]+[{lower}]*{contraction}"
        rf"|[{N}]{{1,3}}"
        rf"| ?[^{S}{L}{N}]+[\r\n/]*"
        rf"|[{S}]*[\r\n]+"
        rf"|[{S}]+(?![^{S}])"
        rf"|[{S}]+"
    )
    return re.compile(pattern)


PATTERNS = {"cl100k": cl100k_regex, "o200k": o200k_regex}

_ASTRAL = re.compile("[\U00010000-\U0010ffff]")
# A BMP character of the same kind for each category of characters above U+FFFF. None is
# whitespace or case-folds to a contraction letter, and each sits in the same classes of both
# patterns as the characters it stands for: Lu/Lt "A", Ll "a", Lm U+02B0, Lo U+00AA, M U+0300
# (Mn), N "0", anything else "!".
_STAND_INS = {"Lu": "A", "Lt": "A", "Ll": "a", "Lm": "\u02b0", "Lo": "\u00aa", "N": "0", "M": "\u0300"}


@functools.lru_cache(maxsize=4096)
def _stand_in(char: str) -> str:
    """A BMP character the patterns treat exactly like `char` (a character above U+FFFF)."""
    kind = unicodedata.category(char)
    return _STAND_INS.get(kind) or _STAND_INS.get(kind[0], "!")


def pretokenize(text: str, pattern: str = "cl100k") -> list[str]:
    """The pieces of `text` under `pattern` ("cl100k" or "o200k"), in order; their
    concatenation is `text`."""
    compiled = PATTERNS[pattern]()
    if text.isascii() or not _ASTRAL.search(text):
        return compiled.findall(text)
    proxy = _ASTRAL.sub(lambda m: _stand_in(m.group()), text)  # same length, same positions
    return [text[m.start() : m.end()] for m in compiled.finditer(proxy)]
