"""Phone (and phone-class board) profiles, budgets, and the roofline projection onto them.

Decode at batch 1 reads every weight once per token (plus the KV cache up to the current position),
so a device's decode speed is bounded by memory bandwidth / bytes per token. We project an engine
measured on this host onto a device by keeping the engine's measured efficiency on this host
(achieved bandwidth / this host's measured read bandwidth) and swapping in the device's peak DRAM
bandwidth:

    decode_device  = device_bandwidth x host_efficiency / bytes_per_token
    prefill_device = device_int8_peak x host_compute_efficiency / ops_per_token
    time to first token = budget prompt tokens / prefill_device   (the first token comes out of
                                                                   the prompt's logits)

host_compute_efficiency = the host's achieved prefill ops/s / the host's int8 peak, estimated the
same way as the devices' peaks (cores x clock x int8 multiply-adds per cycle x 2; see
`pocketlm.hostinfo.int8_peak`). These are projections, labelled `kind: "projection"` everywhere they
are printed or stored; figures measured on a phone (`pocketlm bench --device auto` there) are
labelled `kind: "measured"`.

Known bias: phone CPUs reach a smaller share of their DRAM peak than a server core does (31-57 %
in the published figures), so this host-efficiency roofline is optimistic for decode and, with
llama.cpp's repacked int8 kernels on phones, pessimistic for prefill. `pocketlm bench` therefore
projects from published phone measurements (`pocketlm.phone_calibration`, the data in
phone_measurements.json) and keeps this roofline only as a reference figure (`roofline_*` keys).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

GB = 1e9


@dataclass(frozen=True)
class Device:
    key: str
    name: str
    soc: str
    memory: str              # DRAM type and bus
    ram_gb: float
    bandwidth_gbs: float     # peak DRAM bandwidth, GB/s (10^9 bytes): transfer rate x bus bytes
    app_memory_gb: float     # what one app can hold before the OS kills it (see the notes below)
    big_cores: int           # cores worth running inference on (prime + performance)
    little_cores: int
    int8_gops: float         # peak int8 ops/s of the big cores, 10^9 (2 ops per multiply-add)
    source: str              # where the figures come from


def _int8_gops(*clusters: tuple[int, float, int]) -> float:
    """Peak int8 Gops of (cores, GHz, 128-bit SIMD pipes per core) clusters: a 128-bit `sdot`
    does 16 int8 multiply-adds (= 32 ops) per pipe per cycle."""
    return sum(n * ghz * pipes * 16 * 2 for n, ghz, pipes in clusters)


# SIMD pipes: Cortex-X1/X2/X3/X4 and Apple's P-cores have four 128-bit NEON pipes, Cortex-A76/A78/
# A710/A715/A720 two (Arm's software optimization guides; Apple: Dougall Johnson's Firestorm
# measurements). Little cores are left out: inference runs on the big cores (REFERENCE.md section 6:
# adding little cores cost 30-40 % decode speed).
# App memory: Android has no fixed per-app native limit; the low-memory killer acts on pressure and
# the OS keeps 2-3 GB (REFERENCE.md section 6), so a phone's budget is RAM - 3 GB. iOS: an app gets
# about half of RAM without the `com.apple.developer.kernel.increased-memory-limit` entitlement
# (Apple developer documentation). Boards (Raspberry Pi, RK3588) run Linux: RAM - 1.5 GB.
DEVICES: dict[str, Device] = {d.key: d for d in (
    # Apple A16 Bionic (iPhone 14 Pro; the Phi-3 report says "iPhone 14 with A16 Bionic chip" - the
    # plain iPhone 14 has the A15 with LPDDR4X-4266, 34.1 GB/s): LPDDR5-6400 on 64 bits = 51.2 GB/s;
    # 2 P-cores at 3.46 GHz + 4 E-cores; 6 GB. Phi-3 report (arXiv 2404.14219): 4-bit phi-3-mini
    # runs natively at more than 12 tok/s.
    Device("iphone14", "iPhone 14 Pro", "Apple A16 Bionic", "LPDDR5-6400, 64-bit", 6, 51.2, 3.0, 2, 4,
           _int8_gops((2, 3.46, 4)), "Apple A16 specs; Phi-3 report (arXiv 2404.14219)"),
    # Snapdragon 888: LPDDR5-6400 on 4x16 bits = 51.2 GB/s; 1x X1 2.84 GHz + 3x A78 2.42 GHz +
    # 4x A55 1.8 GHz; Galaxy S21 8 GB (Qualcomm SD888 product brief). ONNX Runtime reports
    # 6.2 tok/s generation for phi-3-mini int4 on a Galaxy S21 (REFERENCE.md section 5).
    Device("galaxy-s21", "Galaxy S21", "Snapdragon 888", "LPDDR5-6400, 64-bit", 8, 51.2, 5.0, 4, 4,
           _int8_gops((1, 2.84, 4), (3, 2.42, 2)), "Qualcomm Snapdragon 888 product brief"),
    # Google Tensor G3 (Pixel 8): 1x X3 2.91 GHz + 4x A715 2.37 GHz + 4x A510 1.7 GHz (Device Info
    # HW listing reported by Android Authority, Oct 2023); 8 GB LPDDR5X. Google publishes no memory
    # clock: we take the Snapdragon 8 Gen 2 class figure, LPDDR5X-8400 on 64 bits = 67.2 GB/s
    # (REFERENCE.md section 5).
    Device("pixel8", "Pixel 8", "Google Tensor G3", "LPDDR5X, 64-bit (8400 assumed)", 8, 67.2, 5.0, 5, 4,
           _int8_gops((1, 2.91, 4), (4, 2.37, 2)), "Android Authority Tensor G3 listing; REFERENCE.md s5"),
    # Snapdragon 8 Gen 3: LPDDR5X-9600 on 64 bits = 76.8 GB/s; 1x X4 3.3 GHz + 3x A720 3.15 GHz +
    # 2x A720 2.96 GHz + 2x A520 2.27 GHz (Qualcomm product brief); Galaxy S24 Ultra 12 GB (the S24
    # and S24+ use the Exynos 2400 outside North America).
    Device("galaxy-s24", "Galaxy S24 Ultra", "Snapdragon 8 Gen 3", "LPDDR5X-9600, 64-bit", 12, 76.8, 9.0,
           6, 2, _int8_gops((1, 3.3, 4), (3, 3.15, 2), (2, 2.96, 2)),
           "Qualcomm Snapdragon 8 Gen 3 product brief"),
    # Snapdragon 7+ Gen 2 (mid-range, e.g. Poco F5 / Redmi Note 12 Turbo): LPDDR5-6400 on 64 bits =
    # 51.2 GB/s; 1x X2 2.91 GHz + 3x A710 2.49 GHz + 4x A510 1.8 GHz (Qualcomm product brief); 8 GB.
    # llama.cpp (REFERENCE.md section 6): Llama 1B Q4_0 prefill ~150, decode ~30 tok/s.
    Device("sd7-gen2", "Mid-range phone", "Snapdragon 7+ Gen 2", "LPDDR5-6400, 64-bit", 8, 51.2, 5.0, 4, 4,
           _int8_gops((1, 2.91, 4), (3, 2.49, 2)), "Qualcomm Snapdragon 7+ Gen 2 product brief"),
    # Snapdragon 8 Gen 2 for Galaxy (Galaxy S23): LPDDR5X-8400 (4200 MHz) on 64 bits = 67.2 GB/s;
    # 1x X3 3.36 GHz + 2x A715 2.8 GHz + 2x A710 2.8 GHz + 3x A510 2.0 GHz (Qualcomm product brief;
    # the "for Galaxy" prime clock from Samsung's S23 specifications); 8 GB (Samsung). Published:
    # PocketPal AI's llama.cpp baselines (pocketlm/phone_measurements.json).
    Device("galaxy-s23", "Galaxy S23", "Snapdragon 8 Gen 2", "LPDDR5X-8400, 64-bit", 8, 67.2, 5.0, 5, 3,
           _int8_gops((1, 3.36, 4), (4, 2.8, 2)),
           "Qualcomm Snapdragon 8 Gen 2 product brief; Samsung Galaxy S23 specifications"),
    # Snapdragon 8 Elite Gen 5 (SM8850; PocketPal AI's test phone "poco-myron", its file names the
    # SoC): LPDDR5X-10667 (5300 MHz) on 64 bits = 84.8 GB/s (Qualcomm product brief, not verified
    # here); 2x Oryon prime 4.6 GHz + 6x Oryon 3.62 GHz, four 128-bit SIMD pipes each (assumed, as
    # Oryon in the X Elite). RAM: not published with the baseline; 12 GB assumed (it ran a 5 GB
    # model): unverified.
    Device("poco-myron", "POCO 'myron' (PocketPal test phone)", "Snapdragon 8 Elite Gen 5",
           "LPDDR5X-10667, 64-bit", 12, 84.8, 9.0, 8, 0, _int8_gops((2, 4.6, 4), (6, 3.62, 4)),
           "Qualcomm Snapdragon 8 Elite Gen 5 product brief (unverified here); PocketPal AI baseline"),
    # MediaTek Dimensity 8400 (MT6899; POCO X7 Pro, PocketPal's "poco-x7-klee"): LPDDR5X-8533 on
    # 64 bits = 68.3 GB/s; 1x A725 3.25 GHz + 3x A725 3.0 GHz + 4x A725 2.1 GHz (MediaTek product
    # page); 8 GB (PocketPal's coverage notes: a 7.5 GiB device).
    Device("poco-x7-pro", "POCO X7 Pro", "MediaTek Dimensity 8400", "LPDDR5X-8533, 64-bit", 8, 68.3, 5.0,
           4, 4, _int8_gops((1, 3.25, 2), (3, 3.0, 2)),
           "MediaTek Dimensity 8400 product page; PocketPal AI baseline COVERAGE.md (RAM)"),
    # OnePlus 12: Snapdragon 8 Gen 3 as the Galaxy S24 Ultra, 12 GB (OnePlus specifications). The
    # phone of ExecuTorch's published Llama 3.2 figures (phone_measurements.json).
    Device("oneplus12", "OnePlus 12", "Snapdragon 8 Gen 3", "LPDDR5X-9600, 64-bit", 12, 76.8, 9.0,
           6, 2, _int8_gops((1, 3.3, 4), (3, 3.15, 2), (2, 2.96, 2)),
           "Qualcomm Snapdragon 8 Gen 3 product brief; OnePlus 12 specifications"),
    # Raspberry Pi 5: BCM2712, LPDDR4X-4267 on 32 bits = 17.1 GB/s; 4x A76 2.4 GHz; 8 GB (Raspberry
    # Pi 5 product brief). A phone-class board that anyone can buy and measure.
    Device("rpi5", "Raspberry Pi 5", "Broadcom BCM2712", "LPDDR4X-4267, 32-bit", 8, 17.1, 6.5, 4, 0,
           _int8_gops((4, 2.4, 2)), "Raspberry Pi 5 product brief"),
    # Rockchip RK3588 boards (Rock 5B, Orange Pi 5): LPDDR4X-4224 on 64 bits = 33.8 GB/s; 4x A76
    # 2.4 GHz + 4x A55 1.8 GHz; 8-16 GB (Rockchip RK3588 datasheet). llama.cpp phi-3-mini Q4_0,
    # 4 threads: 5.1 tok/s decode (REFERENCE.md section 5).
    Device("rk3588", "RK3588 board", "Rockchip RK3588", "LPDDR4X-4224, 64-bit", 8, 33.8, 6.5, 4, 4,
           _int8_gops((4, 2.4, 2)), "Rockchip RK3588 datasheet"),
)}


# Published phone measurements: pocketlm/phone_measurements.json (pocketlm.phone_calibration).


@dataclass(frozen=True)
class Budget:
    """What a phone app needs (defaults: the Phi-3 report's iPhone 14 figure and a snappy reply)."""

    decode_tok_s: float = 12.0
    first_token_s: float = 1.5     # for a prompt of `prompt_tokens`
    prompt_tokens: int = 128
    memory_gb: float | None = None  # None: each device's app memory limit


@dataclass(frozen=True)
class Workload:
    """What one decoded token and one prompt cost, from the model file and the run's settings.

    weight_bytes_per_token: bytes of every weight matrix a decode step reads (all tensors but the
    token embedding, of which one row); weight_file_bytes: the whole file (it is all resident);
    n_weight_params: weights in those matrices (for bits per weight); kv_bytes_per_position: KV
    cache bytes of one position over all layers in the run's cache type; kv_positions_read: KV
    positions a decode step reads at the measured context (capped by a sliding window);
    ctx: context the cache is allocated for; ops_per_token: 2 x multiply-adds of one prompt token;
    overhead_bytes: the engine's memory besides weights and KV cache (interpreter, buffers).
    """

    weight_bytes_per_token: float
    weight_file_bytes: float
    n_weight_params: float
    kv_bytes_per_position: float
    kv_positions_read: float
    ctx: int
    ops_per_token: float
    overhead_bytes: float
    kv_int8_bytes_per_position: float = 0.0   # the same cache in int8 (for advice)
    kv_type: str = "f16"

    @property
    def bytes_per_token(self) -> float:
        return self.weight_bytes_per_token + self.kv_bytes_per_position * self.kv_positions_read

    @property
    def memory_bytes(self) -> float:
        return self.weight_file_bytes + self.kv_bytes_per_position * self.ctx + self.overhead_bytes

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.weight_bytes_per_token / self.n_weight_params


@dataclass(frozen=True)
class Efficiency:
    """An engine's efficiency measured on this host."""

    bandwidth: float   # achieved decode bytes/s / the host's measured read bandwidth
    compute: float     # achieved prefill ops/s / the host's int8 peak estimate


@dataclass
class Projection:
    device: Device
    engine: str
    decode_tok_s: float
    prefill_tok_s: float
    first_token_s: float
    memory_gb: float
    memory_limit_gb: float
    passes: dict[str, bool]
    advice: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(self.passes.values())


def decode_rate(device: Device, eff: Efficiency, bytes_per_token: float) -> float:
    return device.bandwidth_gbs * GB * eff.bandwidth / bytes_per_token


def prefill_rate(device: Device, eff: Efficiency, ops_per_token: float) -> float:
    return device.int8_gops * GB * eff.compute / ops_per_token


def project(device: Device, engine: str, work: Workload, eff: Efficiency, budget: Budget,
            memory_bytes: float | None = None) -> Projection:
    """Roofline projection of one engine's run onto one device, with pass/fail and advice.

    memory_bytes: the engine's memory at this context if known otherwise (peers: their peak RSS
    on this host); default the workload's weights + full KV cache + overhead.
    """
    decode = decode_rate(device, eff, work.bytes_per_token)
    prefill = prefill_rate(device, eff, work.ops_per_token)
    first = budget.prompt_tokens / prefill
    mem = (work.memory_bytes if memory_bytes is None else memory_bytes) / GB
    limit = device.app_memory_gb if budget.memory_gb is None else budget.memory_gb
    passes = {"decode": decode >= budget.decode_tok_s, "first_token": first <= budget.first_token_s,
              "memory": mem <= limit}
    proj = Projection(device, engine, decode, prefill, first, mem, limit, passes)
    proj.advice = advise(proj, work, eff, budget)
    return proj


def advise(p: Projection, work: Workload, eff: Efficiency, budget: Budget) -> list[str]:
    """For each failing budget, the changes that would pass it (each checked by re-projecting)."""
    out: list[str] = []
    dev = p.device
    kv_int8 = work.kv_int8_bytes_per_position or work.kv_bytes_per_position
    if not p.passes["decode"]:
        out.append(_decode_advice(dev, work, eff, budget, kv_int8))
    if not p.passes["first_token"]:
        prefill = p.prefill_tok_s
        need = budget.prompt_tokens / budget.first_token_s
        fits = int(prefill * budget.first_token_s)
        out.append(f"first token: a {budget.prompt_tokens}-token prompt needs {need:.0f} tok/s prefill, "
                   f"{need / prefill:.1f}x the projected {prefill:.1f}: prefill on the GPU/NPU or a faster "
                   f"int8 matmul (fewer bits do not help compute-bound prefill); a prompt of at most "
                   f"{fits} tokens passes")
    if not p.passes["memory"]:
        out.append(_memory_advice(p, work, kv_int8))
    return out


def _decode_advice(dev: Device, work: Workload, eff: Efficiency, budget: Budget, kv_int8: float) -> str:
    allowed = dev.bandwidth_gbs * GB * eff.bandwidth / budget.decode_tok_s  # bytes per token that pass
    tips = []
    kv_read = work.kv_bytes_per_position * work.kv_positions_read
    if work.kv_type != "int8" and kv_int8 < work.kv_bytes_per_position \
            and work.weight_bytes_per_token + kv_int8 * work.kv_positions_read <= allowed:
        tips.append("an int8 KV cache (--kv int8)")
    weight_room = allowed - kv_read
    bpw = math.floor(80 * weight_room / work.n_weight_params) / 10 if weight_room > 0 else 0.0
    if bpw >= 2.0:
        tips.append(f"at most {bpw:.1f} bits per weight (now {work.bits_per_weight:.1f})")
    if work.kv_bytes_per_position > 0 and allowed > work.weight_bytes_per_token:
        positions = int((allowed - work.weight_bytes_per_token) / work.kv_bytes_per_position)
        if positions < work.kv_positions_read:
            tips.append(f"a context of at most {positions} tokens")
    if not tips:
        return (f"decode: needs {work.bytes_per_token / allowed:.1f}x fewer bytes per token than any "
                f"4-bit-or-more change gives: a smaller model")
    return "decode passes with " + " or ".join(tips)


def _memory_advice(p: Projection, work: Workload, kv_int8: float) -> str:
    over = p.memory_gb - p.memory_limit_gb
    tips = []
    kv_full = work.kv_bytes_per_position * work.ctx
    if work.kv_type != "int8" and kv_int8 < work.kv_bytes_per_position \
            and kv_full - kv_int8 * work.ctx >= over * GB:
        tips.append(f"an int8 KV cache (--kv int8, saves {(kv_full - kv_int8 * work.ctx) / GB:.2f} GB)")
    room = p.memory_limit_gb * GB - work.weight_file_bytes - work.overhead_bytes
    if room > 0 and work.kv_bytes_per_position > 0:
        ctx = int(room / work.kv_bytes_per_position)
        if ctx < work.ctx:
            tips.append(f"a context of at most {ctx} tokens")
    weight_room = p.memory_limit_gb * GB - kv_full - work.overhead_bytes
    scale = weight_room / work.weight_file_bytes if work.weight_file_bytes else 0.0
    bpw = math.floor(10 * work.bits_per_weight * scale) / 10
    if bpw >= 2.0:
        tips.append(f"at most {bpw:.1f} bits per weight")
    if not tips:
        return f"memory: over by {over:.2f} GB and no single change fits: a smaller model"
    return f"memory (over by {over:.2f} GB) passes with " + " or ".join(tips)


# ---------------------------------------------------------------------------- on-device detection

# Needles matched (lower case) against getprop's ro.soc.model / ro.board.platform / ro.product.model,
# /proc/cpuinfo ("Hardware", "Model") and the device tree's `compatible`.
SOC_NEEDLES: dict[str, tuple[str, ...]] = {
    "galaxy-s21": ("sm8350", "lahaina", "snapdragon 888"),
    "galaxy-s24": ("sm8650", "pineapple", "snapdragon 8 gen 3"),
    "galaxy-s23": ("sm8550", "kalama", "snapdragon 8 gen 2"),
    "poco-myron": ("sm8850", "snapdragon 8 elite gen 5"),
    "poco-x7-pro": ("mt6899", "dimensity 8400"),
    "sd7-gen2": ("sm7475", "snapdragon 7+ gen 2"),
    "pixel8": ("zuma", "tensor g3"),
    "rk3588": ("rk3588",),
    "rpi5": ("raspberry pi 5", "bcm2712"),
}


def parse_getprop(text: str) -> dict[str, str]:
    """`getprop` output lines `[key]: [value]` -> {key: value}."""
    return {m.group(1): m.group(2) for m in re.finditer(r"^\[([^\]]+)\]:\s*\[(.*)\]\s*$", text, re.M)}


def detect_device(cpuinfo: str, getprop: dict[str, str], dt_compatible: str = "") -> str | None:
    """Device key of the SoC we run on (from /proc/cpuinfo, `getprop`, the device tree), or None."""
    props = [getprop.get(k, "") for k in ("ro.soc.model", "ro.board.platform", "ro.hardware",
                                          "ro.product.board", "ro.product.model")]
    hw = [m.group(1) for m in re.finditer(r"^(?:Hardware|Model)\s*:\s*(.+)$", cpuinfo, re.M)]
    text = " ".join([*props, *hw, dt_compatible.replace("\0", " ")]).lower()
    for key, needles in SOC_NEEDLES.items():
        if any(n in text for n in needles):
            return key
    return None


def cpu_parts(cpuinfo: str) -> list[int]:
    """ARM 'CPU part' numbers of each core listed in /proc/cpuinfo (implementer 0x41 = Arm)."""
    return [int(m.group(1), 16) for m in re.finditer(r"^CPU part\s*:\s*(0x[0-9a-fA-F]+)", cpuinfo, re.M)]


# Arm core part numbers (REFERENCE.md section 6) -> (name, 128-bit SIMD pipes, big core?)
ARM_CORES: dict[int, tuple[str, int, bool]] = {
    0xd05: ("Cortex-A55", 1, False), 0xd46: ("Cortex-A510", 1, False), 0xd80: ("Cortex-A520", 1, False),
    0xd0b: ("Cortex-A76", 2, True), 0xd41: ("Cortex-A78", 2, True), 0xd47: ("Cortex-A710", 2, True),
    0xd4d: ("Cortex-A715", 2, True), 0xd81: ("Cortex-A720", 2, True), 0xd44: ("Cortex-X1", 4, True),
    0xd48: ("Cortex-X2", 4, True), 0xd4e: ("Cortex-X3", 4, True), 0xd82: ("Cortex-X4", 4, True),
}


def ratio_error(projected: float, published: float) -> float:
    """projection / published - 1 (0.25 = the projection is 25 % above the published figure)."""
    return projected / published - 1.0 if published > 0 and math.isfinite(projected) else math.nan
