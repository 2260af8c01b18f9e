#!/usr/bin/env bash
# Install pocketlm in Termux on an Android phone and measure it there.
#
#   bash termux_setup.sh --src pocketlm-src.tar.gz --model phi3-q4_0.gguf [--json bench.json]
#                        [--threads N] [--gen N] [--ctx N] [--skip-packages] [--no-chat]
#
# 1. Termux packages: python, python-pip, python-numpy (pip cannot build numpy on the phone) and
#    clang (builds the kernel's NEON code on the phone). The kernel uses pthreads, not OpenMP, so
#    Termux's static-only libomp does not matter.
# 2. pocketlm from the source tarball (or folder) pushed by the user: `pip install
#    --no-build-isolation --no-deps` (without it pip would try to download and compile numpy and
#    setuptools). Nothing else is downloaded: the model is pushed by the user. The only exception:
#    if Termux's python has no setuptools and pkg has no python-setuptools, pip fetches setuptools
#    and wheel (build tools only).
# 3. A short `pocketlm chat` (the model answers one line), then `pocketlm bench --device auto
#    --json`: the SoC is read from /proc/cpuinfo and getprop, and the run's figures are labelled
#    as measured on it, next to the projection for that SoC.
# The JSON is also copied to /sdcard/Download/ when Termux has storage access (termux-setup-storage),
# where `adb pull` (android_demo/adb_bench.sh) picks it up.
#
# Environment: PYTHON (default python), POCKETLM_PIP (default "$PYTHON -m pip"), POCKETLM (default
# pocketlm), POCKETLM_HOME (default ~/pocketlm), POCKETLM_NOT_TERMUX_OK=1 to run off Termux (tests).
set -euo pipefail

usage() { sed -n '3,5p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
die() { echo "termux_setup: error: $*" >&2; exit 1; }
say() { echo "termux_setup: $*" >&2; }

src="" model="" json="" threads="" gen="32" ctx="" packages=1 chat=1
while [ $# -gt 0 ]; do
    case "$1" in
        --src) src="${2:?}"; shift 2 ;;
        --model) model="${2:?}"; shift 2 ;;
        --json) json="${2:?}"; shift 2 ;;
        --threads) threads="${2:?}"; shift 2 ;;
        --gen) gen="${2:?}"; shift 2 ;;
        --ctx) ctx="${2:?}"; shift 2 ;;
        --skip-packages) packages=0; shift ;;
        --no-chat) chat=0; shift ;;
        -h|--help) usage ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done
[ -n "$src" ] || die "--src pocketlm-src.tar.gz (or a source folder) is required"
[ -n "$model" ] || die "--model FILE.gguf is required"
[ -e "$src" ] || die "$src: no such file or folder (push it first, see android_demo/README.md)"
[ -f "$model" ] || die "$model: no such file (push the model first, see android_demo/README.md)"

if [ "${PREFIX:-}" != "/data/data/com.termux/files/usr" ] && [ "${POCKETLM_NOT_TERMUX_OK:-0}" != 1 ]; then
    die "this is not Termux (PREFIX=${PREFIX:-unset}); run it inside the Termux app on the phone"
fi

PYTHON="${PYTHON:-python}"
read -r -a PIP <<< "${POCKETLM_PIP:-$PYTHON -m pip}"
POCKETLM="${POCKETLM:-pocketlm}"
work="${POCKETLM_HOME:-$HOME/pocketlm}"
mkdir -p "$work"
json="${json:-$work/bench.json}"

if [ "$packages" = 1 ]; then
    say "installing Termux packages: python python-pip python-numpy clang"
    pkg install -y python python-pip python-numpy clang
fi
if ! "$PYTHON" -c "import setuptools" 2>/dev/null; then
    say "no setuptools: trying Termux's python-setuptools, else pip (build tools only)"
    if [ "$packages" = 0 ] || ! pkg install -y python-setuptools; then
        "${PIP[@]}" install setuptools wheel
    fi
fi

# The source: a tarball is unpacked into a fresh folder (a folder is used as it is).
if [ -d "$src" ]; then
    tree="$src"
else
    tree="$work/src"
    rm -rf "$tree"
    mkdir -p "$tree"
    tar -xzf "$src" -C "$tree"
fi
[ -f "$tree/pyproject.toml" ] || die "$src holds no pyproject.toml: not a pocketlm source tree"
say "building and installing pocketlm from $src (compiles the kernel with $(command -v clang || echo cc))"
"${PIP[@]}" install --no-build-isolation --no-deps "$tree"

# Models on shared storage (/sdcard) must be copied into $HOME: shared storage is slow and
# allows no mmap-friendly permissions.
case "$model" in
    /sdcard/*|/storage/*|/data/local/tmp/*)
        say "copying $model into $work (shared storage is not the place to map a model from)"
        cp "$model" "$work/"
        model="$work/$(basename "$model")" ;;
esac

bench_args=(bench "$model" --device auto --json "$json" --gen "$gen")
[ -n "$threads" ] && bench_args+=(--threads "$threads")
[ -n "$ctx" ] && bench_args+=(--ctx "$ctx")
if [ "$chat" = 1 ]; then
    say "pocketlm chat (one question, greedy):"
    printf 'Hello! Who are you?\n' | "$POCKETLM" chat "$model" -n 32 --temp 0
fi
say "pocketlm ${bench_args[*]}"
"$POCKETLM" "${bench_args[@]}"

if [ -d /sdcard/Download ] && [ -w /sdcard/Download ]; then
    cp "$json" /sdcard/Download/pocketlm-bench.json
    say "copied the results to /sdcard/Download/pocketlm-bench.json (for adb pull)"
fi
say "results: $json"
