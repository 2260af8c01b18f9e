#!/usr/bin/env bash
# Benchmark pocketlm on an Android phone from the desktop, over adb, and add the result to the report.
#
#   android_demo/adb_bench.sh MODEL.gguf [--serial SERIAL] [--via run-as|ssh] [--threads N] [--gen N]
#                             [--results DIR] [--report FILE] [--skip-packages]
#
# 1. `adb devices`: exactly one phone (or --serial) must be attached and authorised, else a clear
#    message and exit code 3.
# 2. A tarball of this source tree (git's tracked and untracked-but-not-ignored files when this is
#    a git checkout, else the folder minus build outputs; not an sdist: no build step is needed on
#    the desktop, and the phone builds the NEON kernel from the C sources) is pushed with the model
#    and termux_setup.sh to /data/local/tmp/pocketlm/ (made world-readable, so Termux can read it).
# 3. On the phone, inside Termux, termux_setup.sh installs pocketlm and runs `pocketlm bench --device
#    auto --json`. Channel --via run-as (default): `adb shell run-as com.termux ...`, which works
#    only with a debuggable Termux (the GitHub build). --via ssh: Termux's sshd (`pkg install
#    openssh; sshd` on the phone, your key in ~/.ssh/authorized_keys there) through
#    `adb forward tcp:8022 tcp:8022`.
# 4. The JSON comes back with `adb pull /sdcard/Download/pocketlm-bench.json` (Termux copies it
#    there when it has storage access), else through the channel (`run-as ... cat` / `ssh ... cat`),
#    into --results (default benchmarks/results/), and benchmarks/report.py regenerates --report
#    (default benchmarks/results/README_bench.md) from every JSON in that folder.
#
# Environment: ADB (default adb), SSH (default ssh), PYTHON (default python3).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/.." && pwd)"
die() { echo "adb_bench: error: $*" >&2; exit "${2:-1}"; }
say() { echo "adb_bench: $*" >&2; }

ADB="${ADB:-adb}"
SSH="${SSH:-ssh}"
PYTHON="${PYTHON:-python3}"
TERMUX_HOME=/data/data/com.termux/files/home
TERMUX_PREFIX=/data/data/com.termux/files/usr
REMOTE=/data/local/tmp/pocketlm
SHARED_JSON=/sdcard/Download/pocketlm-bench.json

model="" serial="" via="run-as" threads="" gen="32" results="$repo/benchmarks/results" report="" extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --serial) serial="${2:?}"; shift 2 ;;
        --via) via="${2:?}"; shift 2 ;;
        --threads) threads="${2:?}"; shift 2 ;;
        --gen) gen="${2:?}"; shift 2 ;;
        --results) results="${2:?}"; shift 2 ;;
        --report) report="${2:?}"; shift 2 ;;
        --skip-packages) extra+=(--skip-packages); shift ;;
        -h|--help) sed -n '3,6p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) die "unknown option $1 (see --help)" 2 ;;
        *) [ -z "$model" ] || die "one model only (got $model and $1)" 2; model="$1"; shift ;;
    esac
done
[ -n "$model" ] || die "usage: adb_bench.sh MODEL.gguf [options] (see --help)" 2
[ -f "$model" ] || die "$model: no such file" 2
case "$via" in run-as|ssh) ;; *) die "--via must be run-as or ssh, not $via" 2 ;; esac
report="${report:-$results/README_bench.md}"
command -v "$ADB" >/dev/null || die "adb not found: install Android platform-tools (apt-get install adb) or set ADB" 3

# ---------------------------------------------------------------- 1. the phone
attached="$("$ADB" devices | awk 'NR > 1 && $2 == "device" {print $1}')"
unauthorised="$("$ADB" devices | awk 'NR > 1 && $2 == "unauthorized" {print $1}')"
if [ -n "$serial" ]; then
    grep -qx "$serial" <<< "$attached" || die "phone $serial is not attached (adb devices lists: ${attached:-none})" 3
elif [ -z "$attached" ]; then
    if [ -n "$unauthorised" ]; then
        die "phone $unauthorised is attached but not authorised: unlock it and accept the USB debugging prompt" 3
    fi
    die "no Android device attached: connect a phone with USB debugging on (Settings > Developer options), then check with 'adb devices'" 3
elif [ "$(wc -l <<< "$attached")" -gt 1 ]; then
    die "several phones attached ($(tr '\n' ' ' <<< "$attached")): choose one with --serial" 3
else
    serial="$attached"
fi
adb_() { "$ADB" -s "$serial" "$@"; }
say "phone $serial"

# ---------------------------------------------------------------- 2. push
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
tarball="$tmp/pocketlm-src.tar.gz"
if git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$repo" && git ls-files -co --exclude-standard -z | tar --null -T - -czf "$tarball")
else
    tar -C "$repo" --exclude=.git --exclude=build --exclude='*.so' --exclude=__pycache__ \
        --exclude='*.egg-info' -czf "$tarball" .
fi
say "source tarball $(du -h "$tarball" | cut -f1); pushing it, termux_setup.sh and $(basename "$model")"
adb_ shell mkdir -p "$REMOTE"
adb_ push "$tarball" "$REMOTE/pocketlm-src.tar.gz"
adb_ push "$here/termux_setup.sh" "$REMOTE/termux_setup.sh"
adb_ push "$model" "$REMOTE/$(basename "$model")"
adb_ shell chmod -R a+rX "$REMOTE"

# ---------------------------------------------------------------- 3. run in Termux
args=(--src "$REMOTE/pocketlm-src.tar.gz" --model "$REMOTE/$(basename "$model")"
      --json "$TERMUX_HOME/pocketlm/bench.json" --gen "$gen" "${extra[@]}")
[ -n "$threads" ] && args+=(--threads "$threads")
inner="bash $REMOTE/termux_setup.sh ${args[*]}"
if [ "$via" = run-as ]; then
    # run-as starts without Termux's environment: give it PREFIX, HOME and PATH.
    env="PREFIX=$TERMUX_PREFIX HOME=$TERMUX_HOME PATH=$TERMUX_PREFIX/bin:/system/bin TMPDIR=$TERMUX_PREFIX/tmp"
    run_phone() { adb_ shell "run-as com.termux $TERMUX_PREFIX/bin/env $env $TERMUX_PREFIX/bin/bash -c '$1'"; }
else
    adb_ forward tcp:8022 tcp:8022
    run_phone() { "$SSH" -p 8022 -o StrictHostKeyChecking=accept-new localhost "$1"; }
fi
say "running termux_setup.sh on the phone via $via (installs, chats, benchmarks; minutes)"
run_phone "$inner" || die "the run on the phone failed (see its messages above)"

# ---------------------------------------------------------------- 4. pull and report
mkdir -p "$results"
stamp="$(date -u +%Y%m%d-%H%M%S)"
out="$results/phone-$serial-$stamp.json"
if ! adb_ pull "$SHARED_JSON" "$out" >/dev/null 2>&1 || [ ! -s "$out" ]; then
    say "no $SHARED_JSON (Termux has no storage access): reading the JSON through $via"
    run_phone "cat $TERMUX_HOME/pocketlm/bench.json" > "$out"
fi
"$PYTHON" -c 'import json, sys; d = json.load(open(sys.argv[1])); assert d["schema"].startswith("pocketlm.bench/")' "$out" \
    || die "$out is not a pocketlm bench result"
say "results: $out"
"$PYTHON" "$repo/benchmarks/report.py" "$results"/*.json --out "$report"
say "report: $report"
