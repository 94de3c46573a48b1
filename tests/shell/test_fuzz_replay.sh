# The fuzz targets (tests/fuzz) without libFuzzer: every target's function
# runs on its seed corpus and on every committed regression input
# (tests/fuzz/regressions/TARGET/, each a crash or hang that fuzzing found
# and that is fixed), through the replay builds of `make all-tests`.  Under
# `make SAN=1 test` these run with AddressSanitizer and UBSan, as the fuzzer
# ran them.  Plus, at the tools: config.json sizes far beyond a checkpoint's
# tensors exit 1 with a message (2^30 layers aborted with exit 134).
. tests/shell/lib.sh
BUILD=${BUILD:-build}
command -v python3 >/dev/null 2>&1 || skip "python3 not found (seeds.py)"
python3 tests/fuzz/seeds.py "$TMP/seeds" || fail "seeds.py"
n=0
for src in tests/fuzz/fuzz_*.c; do
    t=$(basename "$src" .c); t=${t#fuzz_}
    replay=$BUILD/fuzz/replay-$t
    [ -x "$replay" ] || fail "$replay not built (make all-tests)"
    set -- "$TMP/seeds/$t"
    [ -d "tests/fuzz/regressions/$t" ] && set -- "$@" "tests/fuzz/regressions/$t"
    out=$("$replay" "$@" 2>"$TMP/$t.err") || fail "replay of $t failed: $(tail -n 20 "$TMP/$t.err")"
    k=$(echo "$out" | sed -n 's/^replayed \([0-9]*\) inputs$/\1/p')
    [ "${k:-0}" -gt 0 ] || fail "$t: no input replayed"
    n=$((n + 1))
done
[ $n -ge 10 ] || fail "only $n fuzz targets"

# config.json sizes against the checkpoint (deepseek-l5 fixture, copied)
M=$TMP/model
mkdir -p "$M"
cp tests/fixtures/search/models/deepseek-l5/model.safetensors tests/fixtures/search/models/deepseek-l5/config.json "$M/"
for kv in num_hidden_layers:1073741824 num_hidden_layers:16777216 n_routed_experts:1073741824; do
    key=${kv%%:*} v=${kv#*:}
    sed "s/\"$key\": [0-9]*/\"$key\": $v/" tests/fixtures/search/models/deepseek-l5/config.json >"$M/config.json"
    expect_fail 1 "^moe-eval: $M/config.json: .*$v.* tensors, but the checkpoint's safetensors hold only 148$" \
        moe-eval -m "$M" --bench
done
echo "replayed $n targets; absurd config sizes refused"
