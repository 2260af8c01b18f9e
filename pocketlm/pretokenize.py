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
def cl100k_regex() -> re.Pattern[str]:
    """The cl100k_base pattern compiled for Python `re`."""
    category = unicodedata.category
    letters, numbers = [], []
    for c in range(0x10000):
        kind = category(chr(c))[0]
        if kind == "L":
            letters.append(c)
        elif kind == "N":
            numbers.append(c)
    L, N = _class_body(letters), _class_body(numbers)
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


_ASTRAL = re.compile("[\U00010000-\U0010ffff]")


@functools.lru_cache(maxsize=4096)
def _stand_in(char: str) -> str:
    """A BMP character the pattern treats exactly like `char` (a character above U+FFFF)."""
    return {"L": "a", "N": "0"}.get(unicodedata.category(char)[0], "!")


def pretokenize(text: str) -> list[str]:
    """The cl100k pieces of `text`, in order; their concatenation is `text`."""
    pattern = cl100k_regex()
    if text.isascii() or not _ASTRAL.search(text):
        return pattern.findall(text)
    proxy = _ASTRAL.sub(lambda m: _stand_in(m.group()), text)  # same length, same positions
    return [text[m.start() : m.end()] for m in pattern.finditer(proxy)]
