"""android_demo/ without a phone: shellcheck, the on-device entry point run on this host as if it were
a Snapdragon 888 phone, and the adb harness against a fake `adb` (and `ssh`) that records its calls.

(The ARM64 build of the kernel under qemu-aarch64 is tests/test_kernel.py's, via
runtime/kernel/cross_test_arm64.sh.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "android_demo"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_bench import tiny_gguf  # noqa: E402, F401  (the session fixture)

SD888_GETPROP = """[ro.product.model]: [SM-G991U]
[ro.soc.manufacturer]: [QTI]
[ro.soc.model]: [SM8350]
[ro.board.platform]: [lahaina]
"""
SD888_PARTS = ["0xd05"] * 4 + ["0xd41"] * 3 + ["0xd44"]     # 4x A55, 3x A78, 1x X1
SD888_CPUINFO = "".join(f"processor\t: {i}\nFeatures\t: fp asimd asimddp\nCPU implementer\t: 0x41\n"
                        f"CPU part\t: {part}\n\n" for i, part in enumerate(SD888_PARTS))

# A fake adb: records every call in $FAKE_ADB_LOG (one line per call, NUL-free), keeps the phone's
# files under $FAKE_PHONE, lists $FAKE_ADB_DEVICES as attached, and when asked to run
# termux_setup.sh "runs" it by copying $FAKE_PHONE_RESULT to the shared JSON path.
FAKE_ADB = r"""#!/usr/bin/env bash
echo "$*" >> "$FAKE_ADB_LOG"
if [ "$1" = -s ]; then shift 2; fi
case "$1" in
  devices) printf 'List of devices attached\n'
           [ -n "${FAKE_ADB_DEVICES:-}" ] && printf '%b\n' "$FAKE_ADB_DEVICES"
           printf '\n' ;;
  push) mkdir -p "$FAKE_PHONE$(dirname "$3")"; cp "$2" "$FAKE_PHONE$3" ;;
  pull) [ -f "$FAKE_PHONE$2" ] || { echo "adb: error: remote object '$2' does not exist" >&2; exit 1; }
        cp "$FAKE_PHONE$2" "$3" ;;
  forward) ;;
  shell) shift
         case "$*" in
           *termux_setup.sh*) if [ -n "${FAKE_SHARED:-1}" ]; then mkdir -p "$FAKE_PHONE/sdcard/Download"
                              cp "$FAKE_PHONE_RESULT" "$FAKE_PHONE/sdcard/Download/pocketlm-bench.json"; fi
                              echo "termux_setup: results: ..." ;;
         esac ;;
  *) echo "fake adb: unexpected $1" >&2; exit 1 ;;
esac
"""
FAKE_SSH = r"""#!/usr/bin/env bash
echo "$*" >> "$FAKE_SSH_LOG"
case "${*: -1}" in cat*) cat "$FAKE_PHONE_RESULT" ;; esac
"""
RECORDER = """#!/usr/bin/env bash
echo "$*" >> "{log}"
"""


def write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture(scope="module")
def phone_run(tiny_gguf, tmp_path_factory):  # noqa: F811
    """termux_setup.sh run on this host as a Galaxy S21: fake pkg and pip, the real `pocketlm`."""
    tmp = tmp_path_factory.mktemp("termux")
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    write_exe(bin_dir / "pkg", RECORDER.format(log=tmp / "pkg.log"))
    pip = write_exe(bin_dir / "fake-pip", RECORDER.format(log=tmp / "pip.log"))
    (tmp / "getprop.txt").write_text(SD888_GETPROP)
    (tmp / "cpuinfo.txt").write_text(SD888_CPUINFO)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "POCKETLM_NOT_TERMUX_OK": "1",
           "POCKETLM_PIP": str(pip), "POCKETLM_HOME": str(tmp / "home"), "PYTHON": sys.executable,
           "POCKETLM_CPUINFO": str(tmp / "cpuinfo.txt"), "POCKETLM_GETPROP": str(tmp / "getprop.txt"),
           "POCKETLM_DT_COMPATIBLE": str(tmp / "none"), "POCKETLM_BW_BYTES": str(64 << 20)}
    env.pop("PREFIX", None)
    out = tmp / "bench.json"
    res = subprocess.run(["bash", str(DEMO / "termux_setup.sh"), "--src", str(REPO), "--model",
                          str(tiny_gguf), "--json", str(out), "--gen", "8", "--ctx", "512", "--threads", "2"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp, json.loads(out.read_text()), res


def test_scripts_pass_shellcheck():
    scripts = sorted(DEMO.glob("*.sh"))
    assert {p.name for p in scripts} >= {"termux_setup.sh", "adb_bench.sh"}
    assert shutil.which("shellcheck"), "shellcheck is not installed (CI installs it with apt)"
    res = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout


def test_termux_setup_installs_from_the_pushed_source_only(phone_run):
    tmp, _, _ = phone_run
    pkg = (tmp / "pkg.log").read_text().split()
    assert pkg == ["install", "-y", "python", "python-pip", "python-numpy", "clang"]
    pip_calls = (tmp / "pip.log").read_text().splitlines()
    assert pip_calls == [f"install --no-build-isolation --no-deps {REPO}"]   # nothing fetched for pocketlm


def test_termux_setup_chats_and_labels_the_bench_as_measured_on_the_soc(phone_run):
    _, res, proc = phone_run
    assert "[pocketlm] load" in proc.stderr                       # the chat ran and reported its speed
    measured = [r for r in res["devices"] if r["kind"] == "measured"]
    assert len(measured) == 1
    m = measured[0]
    assert (m["device"], m["soc"], m["engine"]) == ("galaxy-s21", "Snapdragon 888", "pocketlm")
    ours = res["engines"][0]
    assert m["decode_tok_s"] == ours["decode_tok_s"] and m["measured_first_token_s"] == ours["first_token_s"]
    assert res["host"]["detected_device"] == "galaxy-s21"
    # the projection for the same SoC is there too, labelled as a projection
    assert any(r["kind"] == "projection" and r["device"] == "galaxy-s21" and r["engine"] == "pocketlm"
               for r in res["devices"])


def test_termux_setup_refuses_to_run_off_termux(tiny_gguf, tmp_path):  # noqa: F811
    env = {k: v for k, v in os.environ.items() if k not in ("PREFIX", "POCKETLM_NOT_TERMUX_OK")}
    script = DEMO / "termux_setup.sh"
    res = subprocess.run(["bash", str(script), "--src", str(REPO), "--model", str(tiny_gguf)],
                         capture_output=True, text=True, env=env)
    assert res.returncode != 0 and "not Termux" in res.stderr


# ---------------------------------------------------------------------------- the adb harness

def harness_env(tmp: Path, result: Path, devices: str) -> dict:
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    write_exe(bin_dir / "adb", FAKE_ADB)
    write_exe(bin_dir / "ssh", FAKE_SSH)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_ADB_LOG": str(tmp / "adb.log"),
            "FAKE_SSH_LOG": str(tmp / "ssh.log"), "FAKE_PHONE": str(tmp / "phone"),
            "FAKE_PHONE_RESULT": str(result),
            "FAKE_ADB_DEVICES": devices, "PYTHON": sys.executable}


def run_harness(tmp: Path, model: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(DEMO / "adb_bench.sh"), str(model), "--results", str(tmp / "results"),
                           "--report", str(tmp / "report.md"), *args],
                          capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("devices, message", [
    ("", "no Android device attached"),
    ("R5CR1234\\tunauthorized", "not authorised"),
    ("A1\\tdevice\\nB2\\tdevice", "choose one with --serial"),
])
def test_harness_needs_exactly_one_authorised_phone(tiny_gguf, tmp_path, devices, message):  # noqa: F811
    env = harness_env(tmp_path, tmp_path / "none.json", devices)
    res = run_harness(tmp_path, tiny_gguf, env)
    assert res.returncode == 3 and message in res.stderr
    calls = (tmp_path / "adb.log").read_text().splitlines()
    assert all(c == "devices" for c in calls)                    # nothing pushed, nothing run


def host_json(phone: dict, tmp: Path) -> Path:
    """A host run for the report: the phone run's projections without its measurement."""
    host = {**phone, "devices": [r for r in phone["devices"] if r["kind"] == "projection"]}
    path = tmp / "results" / "host.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(host))
    return path


def test_harness_pushes_runs_pulls_and_reports(phone_run, tiny_gguf, tmp_path):  # noqa: F811
    _, phone, _ = phone_run
    result = tmp_path / "phone-result.json"
    result.write_text(json.dumps(phone))
    host_json(phone, tmp_path)
    env = harness_env(tmp_path, result, "FAKE123\\tdevice")
    res = run_harness(tmp_path, tiny_gguf, env)
    assert res.returncode == 0, res.stderr
    calls = (tmp_path / "adb.log").read_text().splitlines()
    assert calls[0] == "devices"
    pushes = [c.split() for c in calls if " push " in c]
    assert [p[-1] for p in pushes] == ["/data/local/tmp/pocketlm/pocketlm-src.tar.gz",
                                       "/data/local/tmp/pocketlm/termux_setup.sh",
                                       f"/data/local/tmp/pocketlm/{tiny_gguf.name}"]
    assert all(p[:2] == ["-s", "FAKE123"] for p in pushes)
    (run,) = [c for c in calls if "termux_setup.sh --src" in c]
    assert "run-as com.termux" in run and "--model /data/local/tmp/pocketlm/" in run
    assert calls[-1].startswith("-s FAKE123 pull /sdcard/Download/pocketlm-bench.json ")
    # the pushed source: what the phone builds the kernel from, without desktop build outputs
    with tarfile.open(tmp_path / "phone" / "data/local/tmp/pocketlm/pocketlm-src.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"pyproject.toml", "setup.py", "runtime/kernel/matmul.c", "runtime/kernel/kernel.h",
            "pocketlm/bench.py", "android_demo/termux_setup.sh"} <= names
    assert not any(n.endswith(".so") or "__pycache__" in n for n in names)
    (pulled,) = (tmp_path / "results").glob("phone-FAKE123-*.json")
    assert json.loads(pulled.read_text()) == phone
    report = (tmp_path / "report.md").read_text()
    assert "Measured on phones" in report and "Galaxy S21 (Snapdragon 888)" in report
    m = next(r for r in phone["devices"] if r["kind"] == "measured")
    p = next(r for r in phone["devices"] if r["kind"] == "projection" and r["device"] == "galaxy-s21"
             and r["engine"] == "pocketlm")
    assert f"{p['decode_tok_s'] / m['decode_tok_s'] - 1:+.0%}" in report


def test_harness_over_ssh_reads_the_json_through_the_channel(phone_run, tiny_gguf, tmp_path):  # noqa: F811
    _, phone, _ = phone_run
    result = tmp_path / "phone-result.json"
    result.write_text(json.dumps(phone))
    env = {**harness_env(tmp_path, result, "FAKE123\\tdevice"), "FAKE_SHARED": ""}  # no storage access
    res = run_harness(tmp_path, tiny_gguf, env, "--via", "ssh")
    assert res.returncode == 0, res.stderr
    calls = (tmp_path / "adb.log").read_text().splitlines()
    assert "-s FAKE123 forward tcp:8022 tcp:8022" in calls
    ssh = (tmp_path / "ssh.log").read_text().splitlines()
    assert ssh[0].startswith("-p 8022") and "termux_setup.sh --src" in ssh[0]
    assert ssh[-1].endswith("cat /data/data/com.termux/files/home/pocketlm/bench.json")
    (pulled,) = (tmp_path / "results").glob("phone-FAKE123-*.json")
    assert json.loads(pulled.read_text()) == phone
