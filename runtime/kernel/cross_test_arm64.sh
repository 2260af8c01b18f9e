#!/usr/bin/env bash
# Cross-build the kernel self-test for ARM64 and run it under qemu on three CPU models, so each
# NEON path and the run-time dispatch are exercised: -cpu max (dotprod + i8mm), cortex-a76
# (dotprod), cortex-a53 (plain NEON). Needs: apt-get install gcc-aarch64-linux-gnu
# libc6-dev-arm64-cross qemu-user (clang, if present, is also checked to compile the sources).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

sources=()
for f in "$here"/*.c; do
    [[ "$(basename "$f")" == module.c ]] || sources+=("$f")  # module.c needs Python.h
done
flags=(-O2 -std=c11 -D_GNU_SOURCE -Wall -Wextra -Wno-unused-function -I"$here")

aarch64-linux-gnu-gcc "${flags[@]}" -static -pthread -o "$out/selftest" "${sources[@]}" -lm
echo "built with aarch64-linux-gnu-gcc"
if command -v clang >/dev/null; then
    for f in "${sources[@]}"; do
        clang --target=aarch64-linux-gnu "${flags[@]}" -Werror -c "$f" -o "$out/$(basename "$f").o"
    done
    echo "compiled with clang --target=aarch64-linux-gnu"
fi

status=0
run() {  # cpu model, expected list of usable paths
    if qemu-aarch64 -cpu "$1" "$out/selftest" "$2"; then
        echo "qemu -cpu $1: PASS"
    else
        echo "qemu -cpu $1: FAIL"
        status=1
    fi
}
run max "scalar neon neon_dotprod neon_i8mm"
run cortex-a76 "scalar neon neon_dotprod"
run cortex-a53 "scalar neon"
exit $status
