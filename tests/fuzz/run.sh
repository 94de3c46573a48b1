#!/bin/sh
# tests/fuzz/run.sh BUILD SECONDS TARGET... - run each libFuzzer target
# (BUILD/fuzz/bin/TARGET, made by `make fuzz`) for SECONDS seconds, one after
# the other, from the seeds (tests/fuzz/seeds.py) and the corpus that earlier
# runs grew (BUILD/fuzz/corpus/TARGET, kept between runs).  Prints one line
# per target with its executions and executions per second; a crash, leak,
# timeout or out-of-memory leaves its input in BUILD/fuzz/artifacts/TARGET/
# and prints the report's summary.  Last line "fuzz: N passed, N failed"
# (targets); exit 1 if any target failed.
#   FUZZ_FLAGS   more libFuzzer flags (e.g. -jobs, -dict)
set -u
cd "$(dirname "$0")/../.."
build=$1 seconds=$2
shift 2
root=$build/fuzz
rm -rf "$root/seeds"
python3 tests/fuzz/seeds.py "$root/seeds" || { echo "fuzz: seeds.py failed" >&2; exit 1; }
failed=0 passed=0 total=0
for t in "$@"; do
    corpus=$root/corpus/$t art=$root/artifacts/$t log=$root/logs/$t.log
    mkdir -p "$corpus" "$art" "$root/logs"
    # 1.5 GB of RSS is far above what one input needs (the readers bound
    # their memory); a single huge malloc fails as it does outside the
    # sanitizer (returns NULL: msgpack-c asks for 256 GB for a 200-byte
    # container header, see tests/fuzz/pending/README) instead of stopping the
    # run, and what a reader then touches still counts against the RSS limit.
    ASAN_OPTIONS=${ASAN_OPTIONS:+$ASAN_OPTIONS:}allocator_may_return_null=1 \
    "$root/bin/$t" -max_total_time="$seconds" -timeout=20 -rss_limit_mb=1536 -malloc_limit_mb=1048576 \
        -print_final_stats=1 \
        -artifact_prefix="$art/" ${FUZZ_FLAGS:-} "$corpus" "$root/seeds/$t" >"$log" 2>&1
    rc=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
    execs=${execs:-0} rate=${rate:-0}
    total=$((total + execs))
    if [ $rc -eq 0 ]; then
        passed=$((passed + 1))
        echo "fuzz: $t: $execs executions in ${seconds}s ($rate/s), no crash"
    else
        failed=$((failed + 1))
        echo "fuzz: $t: FAILED after $execs executions (exit $rc); input: $(ls -t "$art" | head -n 1 | sed "s|^|$art/|")"
        grep -m 1 -E '^(==[0-9]+==ERROR|SUMMARY|.*runtime error)' "$log" | sed 's/^/    /'
        grep -m 8 -E '^ +#[0-9]+ ' "$log" | sed 's/^/    /'
        echo "    (log: $log)"
    fi
done
echo "fuzz: $# targets, $total executions in all"
echo "fuzz: $passed passed, $failed failed"
[ $failed -eq 0 ]
