"""Train a small byte-level BPE vocabulary and write it as a tiktoken rank file.

    python benchmarks/train_bpe.py --ranks 2976 --out shakespeare.tiktoken [--shared-dir DIR]

What Phi-3-small's cl100k_base is, at a small scale: text is cut into pieces by the cl100k
pre-tokenizer (`pocketlm.pretokenize`, so no token crosses a piece border), each piece is a
sequence of bytes, and BPE merges the most frequent adjacent pair of tokens, over and over:

- ranks 0..255 are the 256 single bytes (in byte order), so every text is encodable;
- rank 256 + k is the k-th merge's token (its bytes: the two tokens' bytes joined). tiktoken
  encodes by merging, within a piece, the adjacent pair whose joined bytes have the lowest rank,
  which replays these merges in the order they were learned;
- ties in pair counts go to the smallest (left id, right id), so a run is deterministic; a merge
  whose joined bytes already are a token reuses that rank (each rank names distinct bytes).

The rank file holds one `base64(token bytes) rank` line per token, the format of
`cl100k_base.tiktoken`; `pocketlm.tokenizer_tiktoken.TiktokenTokenizer` (and tiktoken itself)
read it and lay Phi-3-small's special tokens out after the last rank.
"""

from __future__ import annotations

import argparse
import base64
import heapq
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from itertools import pairwise
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
from pocketlm.pretokenize import pretokenize  # noqa: E402


def piece_counts(texts: Iterable[str]) -> Counter[bytes]:
    """How often each cl100k piece occurs (as UTF-8 bytes) in `texts`."""
    counts: Counter[bytes] = Counter()
    for text in texts:
        counts.update(p.encode("utf-8") for p in pretokenize(text))
    return counts


def train_bpe(counts: Counter[bytes], n_ranks: int) -> list[bytes]:
    """Token bytes by rank: the 256 bytes, then merges until `n_ranks` tokens (or no pair is left).

    Pair counts are kept incrementally (pair -> summed piece frequency, pair -> pieces holding it),
    and the best pair comes from a max-heap whose stale entries are skipped when popped.
    """
    if n_ranks < 256:
        raise ValueError(f"a byte-level vocabulary needs at least 256 ranks, got {n_ranks}")
    ranks = [bytes([b]) for b in range(256)]
    rank_of = {t: i for i, t in enumerate(ranks)}
    words = [list(piece) for piece in counts]          # each piece as token ids (bytes at first)
    freqs = list(counts.values())
    pair_count: defaultdict[tuple[int, int], int] = defaultdict(int)
    holders: defaultdict[tuple[int, int], set[int]] = defaultdict(set)
    for w, (word, f) in enumerate(zip(words, freqs, strict=True)):
        for pair in pairwise(word):
            pair_count[pair] += f
            holders[pair].add(w)
    heap = [(-c, p) for p, c in pair_count.items()]
    heapq.heapify(heap)

    while len(ranks) < n_ranks and heap:
        neg, pair = heapq.heappop(heap)
        if pair_count.get(pair, 0) != -neg or neg == 0:
            continue  # stale entry: the count changed since it was pushed
        joined = ranks[pair[0]] + ranks[pair[1]]
        new = rank_of.get(joined)
        if new is None:
            new = len(ranks)
            ranks.append(joined)
            rank_of[joined] = new
        changed: set[tuple[int, int]] = set()
        for w in list(holders[pair]):
            word, f = words[w], freqs[w]
            for p in pairwise(word):   # take the piece's pairs out ...
                pair_count[p] -= f
                holders[p].discard(w)
                changed.add(p)
            merged, i = [], 0
            while i < len(word):                             # ... merge left to right ...
                if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
                    merged.append(new)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            words[w] = merged
            for p in pairwise(merged):  # ... and put the new pairs in
                pair_count[p] += f
                holders[p].add(w)
                changed.add(p)
        for p in changed:
            c = pair_count.get(p, 0)
            if c > 0:
                heapq.heappush(heap, (-c, p))
            else:
                pair_count.pop(p, None)
                holders.pop(p, None)
    return ranks


def write_rank_file(ranks: list[bytes], path: Path) -> None:
    """`base64(bytes) rank` lines, ranks 0..n-1 in order (tiktoken's format)."""
    lines = [f"{base64.b64encode(t).decode('ascii')} {r}\n" for r, t in enumerate(ranks)]
    path.write_text("".join(lines), encoding="ascii")


def main() -> None:
    from pocketlm import corpus

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2976, help="tokens in the rank file (bytes included)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shared-dir", type=Path, default=None)
    args = ap.parse_args()
    t0 = time.perf_counter()
    texts = [corpus.read_work(p) for p in corpus.corpus_files("train", args.shared_dir)]
    ranks = train_bpe(piece_counts(texts), args.ranks)
    write_rank_file(ranks, args.out)
    print(f"{len(ranks)} ranks -> {args.out} ({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
