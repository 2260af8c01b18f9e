"""What the benchmark needs to know about the machine it runs on (a desktop, a board or a phone).

- `read_bandwidth_gbs(threads)`: measured DRAM read bandwidth (numpy sums over a buffer far larger
  than the caches, split over `threads` Python threads; numpy releases the GIL in the reduction).
  Measured once per process and cached; `BandwidthProbe` keeps its buffer for repeated samples.
- `int8_peak(threads)`: this CPU's peak int8 rate, estimated exactly as the device profiles' peaks
  are (pocketlm.devices): cores x clock x int8 multiply-adds per cycle x 2.
- `memory_status()`: /proc/self/status peak RSS (VmHWM), resident anonymous memory (RssAnon) and
  resident file-backed memory (RssFile: the memory-mapped model) in bytes.
- `read_cpuinfo()`, `read_getprop()`, `read_dt_compatible()`: the sources `--device auto` probes.
  Environment overrides (tests, or a phone whose /proc is restricted): POCKETLM_CPUINFO,
  POCKETLM_GETPROP (a file of `getprop` output), POCKETLM_DT_COMPATIBLE (a file).
"""

from __future__ import annotations

import functools
import os
import platform
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .devices import ARM_CORES, cpu_parts, parse_getprop

ENV_CPUINFO, ENV_GETPROP, ENV_DT = "POCKETLM_CPUINFO", "POCKETLM_GETPROP", "POCKETLM_DT_COMPATIBLE"
ENV_BW_BYTES = "POCKETLM_BW_BYTES"   # buffer size override (tests use a small one)
BANDWIDTH_BUFFER = 1 << 29   # bytes summed per pass: 512 MiB, far beyond any cache (at most 1/4 of free RAM)


class BandwidthProbe:
    """A reusable read-bandwidth probe: numpy sums over one buffer far larger than the caches,
    split over `threads` Python threads (numpy releases the GIL in the reduction). Keeping the
    buffer lets a benchmark sample the bandwidth again and again between its own timings."""

    def __init__(self, threads: int, nbytes: int | None = None):
        nbytes = nbytes or int(os.environ.get(ENV_BW_BYTES, BANDWIDTH_BUFFER))
        avail = _meminfo().get("MemAvailable")
        if avail and nbytes > avail // 4:
            nbytes = max(64 << 20, avail // 4)
        self.buffer = np.ones(nbytes // 8)          # touched: every page is resident before timing
        self.parts = np.array_split(self.buffer, threads)
        self.pool = ThreadPoolExecutor(threads)

    def gbs(self, repeats: int = 3) -> float:
        """Best-of-`repeats` GB/s (10^9 bytes)."""
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(self.pool.map(np.sum, self.parts))
            best = min(best, time.perf_counter() - t0)
        return self.buffer.nbytes / best / 1e9

    def close(self) -> None:
        self.pool.shutdown()
        self.buffer = self.parts = None


@functools.cache
def read_bandwidth_gbs(threads: int, nbytes: int | None = None, repeats: int = 3) -> float:
    """Best-of-`repeats` GB/s (10^9 bytes) of summing an nbytes float64 buffer in `threads` threads."""
    probe = BandwidthProbe(threads, nbytes)
    try:
        return probe.gbs(repeats)
    finally:
        probe.close()


def memory_status() -> dict[str, int]:
    """Bytes of VmHWM (peak RSS), VmRSS, RssAnon, RssFile of this process (0 where not reported)."""
    out = dict.fromkeys(("VmHWM", "VmRSS", "RssAnon", "RssFile"), 0)
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return out
    for key in out:
        m = re.search(rf"^{key}:\s+(\d+)\s+kB", text, re.M)
        if m:
            out[key] = int(m.group(1)) * 1024
    return out


def _meminfo() -> dict[str, int]:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return {}
    return {m.group(1): int(m.group(2)) * 1024 for m in re.finditer(r"^(\w+):\s+(\d+)\s+kB", text, re.M)}


def _read_override(env: str, default: str | None) -> str:
    path = os.environ.get(env) or default
    if not path:
        return ""
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def read_cpuinfo() -> str:
    return _read_override(ENV_CPUINFO, "/proc/cpuinfo")


def read_dt_compatible() -> str:
    return _read_override(ENV_DT, "/proc/device-tree/compatible")


def read_getprop() -> dict[str, str]:
    """Android system properties (`getprop`), or {} off Android."""
    if os.environ.get(ENV_GETPROP):
        return parse_getprop(_read_override(ENV_GETPROP, None))
    try:
        res = subprocess.run(["getprop"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {}
    return parse_getprop(res.stdout) if res.returncode == 0 else {}


def cpu_model(cpuinfo: str) -> str:
    for key in ("model name", "Hardware", "Model", "Processor"):
        m = re.search(rf"^{key}\s*:\s*(.+)$", cpuinfo, re.M)
        if m:
            return m.group(1).strip()
    return platform.processor() or platform.machine()


def host_cpu() -> str:
    """This machine's CPU model name (what every benchmark prints beside its figures)."""
    return cpu_model(read_cpuinfo())


def _max_freq_ghz(cpu: int) -> float | None:
    try:
        khz = Path(f"/sys/devices/system/cpu/cpu{cpu}/cpufreq/cpuinfo_max_freq").read_text()
        return int(khz) / 1e6
    except (OSError, ValueError):
        return None


def default_threads() -> int:
    """Threads to benchmark with: the big cores (on a big.LITTLE phone, the cores whose top clock
    beats the slowest cluster's; adding little cores slows decode down), at most 4."""
    n = os.cpu_count() or 1
    freqs = [f for f in (_max_freq_ghz(i) for i in range(n)) if f is not None]
    if len(freqs) == n and len(set(freqs)) > 1:
        n = sum(f > min(freqs) for f in freqs)
    return max(1, min(4, n))


def int8_peak(threads: int, cpuinfo: str | None = None, kernel_path: str | None = None) -> tuple[float, str]:
    """(peak int8 Gops of `threads` cores, how it was estimated).

    x86: multiply-adds per cycle per core from the widest int8 instruction the kernel path uses:
    AVX-512 VNNI `vpdpbusd` zmm = 64, two ports = 128; AVX2 `vpmaddubsw` ymm = 32, two ports = 64;
    clock from /proc/cpuinfo "cpu MHz". ARM: 128-bit SIMD pipes x 16 (`sdot`) per core from the
    "CPU part" table in pocketlm.devices (as for the device profiles), clock from cpufreq, fastest
    cores first. A virtual machine's vCPUs may be hyperthreads of fewer physical cores, in which case
    this overstates the peak and understates the compute efficiency.
    """
    cpuinfo = read_cpuinfo() if cpuinfo is None else cpuinfo
    if kernel_path is None:
        from .runtime import kernel
        kernel_path = kernel.active_path()
    parts = cpu_parts(cpuinfo)
    if parts:
        cores = []
        for i, part in enumerate(parts):
            name, pipes, _ = ARM_CORES.get(part, (f"part {part:#x}", 2, True))
            ghz = _max_freq_ghz(i) or 2.0
            cores.append((ghz * pipes * 16, name, ghz))
        cores.sort(reverse=True)
        used = cores[:threads]
        gops = sum(c[0] for c in used) * 2
        names = ", ".join(f"{n} {g:.2f} GHz" for _, n, g in used)
        return gops, f"{len(used)} cores ({names}), 16 int8 MACs per sdot per 128-bit pipe"
    m = re.search(r"^cpu MHz\s*:\s*([\d.]+)", cpuinfo, re.M)
    ghz = float(m.group(1)) / 1000 if m else 2.0
    macs = {"avx512": 128, "avx2": 64}.get(kernel_path, 16)
    gops = threads * ghz * macs * 2
    return gops, f"{threads} cores x {ghz:.2f} GHz x {macs} int8 MACs/cycle ({kernel_path}) x 2"


def describe(threads: int) -> dict:
    """The host block of the bench JSON (without the bandwidth, measured separately)."""
    from .runtime import kernel

    cpuinfo = read_cpuinfo()
    peak, basis = int8_peak(threads, cpuinfo, kernel.active_path())
    return {"name": platform.node(), "machine": platform.machine(), "system": platform.system(),
            "cpu": cpu_model(cpuinfo), "cores": os.cpu_count(), "threads": threads,
            "kernel_path": kernel.active_path(), "cpu_features": kernel.cpu_features(),
            "int8_peak_gops": peak, "int8_peak_basis": basis,
            "ram_bytes": _meminfo().get("MemTotal", 0),
            "python": platform.python_version(), "numpy": np.__version__}
