"""The decode roofline measured beside the decode it bounds.

On a shared machine the read bandwidth moves from minute to minute (this 2-core Zen 4 VM has read
30 GB/s and 55 GB/s within one benchmark run), so a bandwidth sampled once at the start of a run
and a decode speed measured minutes later can put the same kernel at 60 % or at 100 % of "the
roofline". Here the two alternate in one process: a bandwidth sample (numpy sums over a buffer far
beyond the caches, pocketlm.hostinfo.BandwidthProbe), then a few decode steps, and again; each
round's fraction is the bytes the steps read per second over that round's sample, and the median
round is reported. Every engine is measured the same way, in its own process.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from pocketlm.hostinfo import BandwidthProbe

PROBE_BYTES = 1 << 30  # 1 GiB: 30x this machine's L3; the sample takes ~40 ms


@dataclass
class PairedRoofline:
    bandwidth_gbs: list[float]   # per round: the probe's best-of-2 sample
    achieved_gbs: list[float]    # per round: bytes the decode steps read per second

    @property
    def fractions(self) -> list[float]:
        return [a / b for a, b in zip(self.achieved_gbs, self.bandwidth_gbs, strict=True)]

    @property
    def fraction(self) -> float:
        """Median over the rounds of achieved / sampled bandwidth."""
        return statistics.median(self.fractions)

    def as_dict(self) -> dict:
        return {"roofline_fraction": self.fraction, "roofline_fractions": self.fractions,
                "probe_gbs": self.bandwidth_gbs, "achieved_gbs": self.achieved_gbs}


def paired_roofline(step: Callable[[], object], bytes_per_step: float, threads: int, rounds: int = 5,
                    steps: int = 12) -> PairedRoofline:
    """Alternate `rounds` times: sample the read bandwidth with `threads` threads, then time `steps`
    calls of `step` (one decode step each, reading `bytes_per_step` bytes). Allocates the probe's
    1 GiB buffer: measure peak RSS before calling this."""
    probe = BandwidthProbe(threads, PROBE_BYTES)
    bw, achieved = [], []
    try:
        for _ in range(rounds):
            bw.append(probe.gbs(repeats=2))
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            achieved.append(bytes_per_step * steps / (time.perf_counter() - t0) / 1e9)
    finally:
        probe.close()
    return PairedRoofline(bw, achieved)
