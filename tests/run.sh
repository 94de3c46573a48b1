#!/bin/sh
# tests/run.sh - run the whole suite: cmocka unit binaries, then shell tests.
# Prints one line per test binary/script and a closing "N passed, N failed, N skipped".
# Environment: BIN (tools), BUILD (build dir), CDMOE_SHARED (default ../shared).
# Options: --gpu  run only the GPU parity tests (they skip without a GPU).
#          --emu  run only the GPU parity tests against the CUDA emulator
#                 (tests/cudaemu) named by CUDA_EMU (a plugin path); the whole
#                 suite runs them too, after the others, where CUDA_EMU is set.
set -u
cd "$(dirname "$0")/.."
BIN=${BIN:-bin}
BUILD=${BUILD:-build}
CDMOE_SHARED=${CDMOE_SHARED:-$(cd .. && pwd)/shared}
BIN=$(cd "$BIN" && pwd)
export BIN BUILD CDMOE_SHARED
# The suite's golden outputs are the CPU backend's: run it there whatever the
# machine (tools default to cuda when a GPU is visible).  The GPU tests name
# their devices explicitly.
MOE_DEVICE=cpu
export MOE_DEVICE
PATH="$BIN:$PATH"
export PATH

gpu=0 emu=0
[ "${1:-}" = "--gpu" ] && gpu=1
[ "${1:-}" = "--emu" ] && emu=1

passed=0 failed=0 skipped=0 failures=""
log_dir=$(mktemp -d /tmp/cdmoe-tests.XXXXXX)

run_one() { # name, command...
    name=$1; shift
    log="$log_dir/$(echo "$name" | tr '/' '_').log"
    start=$(date +%s)
    "$@" >"$log" 2>&1
    rc=$?
    secs=$(( $(date +%s) - start ))
    if [ $rc -eq 0 ]; then
        passed=$((passed + 1)); echo "PASS  $name (${secs}s)"
    elif [ $rc -eq 77 ]; then
        skipped=$((skipped + 1)); echo "SKIP  $name: $(grep -m1 -i 'skip' "$log" || tail -n1 "$log")"
    else
        failed=$((failed + 1)); failures="$failures $name"
        echo "FAIL  $name (exit $rc)"; sed 's/^/    | /' "$log" | tail -n 40
    fi
}

gpu_tests() { # name prefix
    for t in "$BUILD"/tests/gpu_*; do
        case $t in *.d|*.o) continue;; esac
        [ -x "$t" ] && run_one "$1$(basename "$t")" "$t"
    done
    for t in tests/shell/gpu_*.sh; do [ -f "$t" ] && run_one "$1$t" sh "$t"; done
}
# the GPU tests on the CUDA emulator: the real backend source run on the CPU
emu_tests() {
    if [ -n "${CUDA_EMU:-}" ] && [ -f "$CUDA_EMU" ]; then
        (
            MOE_CUDA_EMU=1 MOE_CUDA_PLUGIN=$(cd "$(dirname "$CUDA_EMU")" && pwd)/$(basename "$CUDA_EMU")
            export MOE_CUDA_EMU MOE_CUDA_PLUGIN
            # in the whole suite, the search tools on two of the six models
            # (all six: make test-cuda-emu)
            [ $emu -eq 1 ] || { CDMOE_GPU_TOOLS_MODELS=${CDMOE_GPU_TOOLS_MODELS:-deepseek mixtral}; export CDMOE_GPU_TOOLS_MODELS; }
            st=$(dirname "$CUDA_EMU")/selftest # the emulator's own checks first
            [ -x "$st" ] && run_one "emu:selftest" "$st"
            gpu_tests "emu:"
            # threads of a block last to first: a missing barrier shows
            for k in gpu_kernels gpu_backward; do
                t=$BUILD/tests/$k
                [ -x "$t" ] && run_one "emu:$k(reverse order)" env MOE_CUDA_EMU_ORDER=reverse "$t"
            done
            echo "$passed $failed $skipped $failures" >"$log_dir/emu.counts"
        )
        read passed failed skipped failures <"$log_dir/emu.counts"
    else
        skipped=$((skipped + 1))
        echo "SKIP  emu:gpu tests: the CUDA emulator plugin was not built (CUDA_EMU='${CUDA_EMU:-}'; make cuda-emu)"
    fi
}

if [ $gpu -eq 1 ]; then
    gpu_tests ""
elif [ $emu -eq 1 ]; then
    emu_tests
else
    for t in "$BUILD"/tests/test_*; do
        [ -x "$t" ] || continue
        case $t in *.d|*.o) continue;; esac
        run_one "$(basename "$t")" "$t"
    done
    for t in tests/shell/test_*.sh; do [ -f "$t" ] && run_one "$t" sh "$t"; done
    emu_tests
fi
rm -rf "$log_dir"
echo
[ -n "$failures" ] && echo "failed:$failures"
echo "tests: $passed passed, $failed failed, $skipped skipped"
[ $failed -eq 0 ]
