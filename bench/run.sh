#!/bin/sh
# bench/run.sh - run every benchmark script bench/*.sh (except this one).
# Benchmarks print ratios against a peer measured in the same run.
set -u
cd "$(dirname "$0")/.."
: "${BIN:=bin}"
BIN=$(cd "$BIN" && pwd); export BIN
CDMOE_SHARED=${CDMOE_SHARED:-$(cd .. && pwd)/shared}; export CDMOE_SHARED
status=0
for b in bench/*.sh; do
    [ "$(basename "$b")" = run.sh ] && continue
    [ "$(basename "$b")" = gpu-check.sh ] && continue
    if [ "$(basename "$b")" = tune-memory.sh ] && [ -z "${BENCH_MEMORY:-}" ]; then
        echo "== $b: skipped (opt-in, writes ~7 GB: BENCH_MEMORY=1 make bench)"
        continue
    fi
    echo "== $b"
    sh "$b" || { echo "bench $b failed"; status=1; }
done
exit $status
