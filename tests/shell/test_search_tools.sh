# moe-calib | moe-expert-rank | moe-layer-search on the tiny models: the picks
# of the Python reference of the original CD-MoE (tests/fixtures/search/*/
# expected.txt), fast == --naive, layer shards merged == whole, thread-count
# independence, and bad inputs.  (Numeric agreement: tests/unit/test_search.c.)
. tests/shell/lib.sh
export OMP_NUM_THREADS=1
FX=tests/fixtures/search

# "ranking L: e e" and "plan K: l l l" lines from a stream
picks() {
    moe-dump --full --no-header --type ranking --type plan "$1" | sed -n \
        -e 's/^{"type":"ranking","layer":\([0-9]*\),.*"experts":{[^}]*"data":\[\([^]]*\)\].*/ranking \1: \2/p' \
        -e 's/^{"type":"plan","experts":\([0-9]*\),.*"order":{[^}]*"data":\[\([^]]*\)\].*/plan \1: \2/p' \
        | tr ',' ' '
}

for name in deepseek qwen2_moe qwen3_moe olmoe mixtral deepseek-l5 qwen2_moe-l5; do
    d=$FX/$name
    model=$(sed -n 's/.*"model": "\(.*\)".*/\1/p' "$d/params.json")
    k=$(sed -n 's/.*"top_k": \([0-9]*\).*/\1/p' "$d/params.json")
    for mode in fast naive; do
        flag=; [ $mode = naive ] && flag=--naive
        moe-calib --quiet --model "$model" "$d/tokens.msgpack.zst" >"$TMP/calib" || fail "$name: moe-calib"
        moe-expert-rank --quiet --model "$model" --max-length 16 $flag "$TMP/calib" >"$TMP/rank" \
            || fail "$name: moe-expert-rank $flag"
        moe-layer-search --quiet --model "$model" --experts 0 --max-length 16 $flag "$TMP/rank" >"$TMP/p0" \
            || fail "$name: moe-layer-search --experts 0 $flag"
        moe-layer-search --quiet --model "$model" --experts "$k" --max-length 16 $flag "$TMP/p0" >"$TMP/pk" \
            || fail "$name: moe-layer-search --experts $k $flag"
        picks "$TMP/pk" >"$TMP/got"
        diff "$d/expected.txt" "$TMP/got" >"$TMP/diff" || fail "$name ($mode) differs from the reference: $(cat "$TMP/diff")"
    done
    echo "ok $name"
done

d=$FX/deepseek-l5
model=$FX/models/deepseek-l5
moe-calib --quiet --model $model $d/tokens.msgpack.zst >"$TMP/calib" || fail calib

# --layers shards, merged, equal the whole ranking; the layer search accepts the merge
moe-expert-rank --quiet --no-provenance --model $model --max-length 16 "$TMP/calib" >"$TMP/all" || fail rank
moe-expert-rank --quiet --model $model --max-length 16 --layers 1,2 "$TMP/calib" >"$TMP/s1" || fail shard1
moe-expert-rank --quiet --model $model --max-length 16 --layers 3-4 "$TMP/calib" >"$TMP/s2" || fail shard2
moe-merge "$TMP/s1" "$TMP/s2" >"$TMP/merged" || fail merge
[ "$(picks "$TMP/merged")" = "$(picks "$TMP/all")" ] || fail "merged shards differ from the whole ranking"
moe-layer-search --quiet --model $model --experts 2 --max-length 16 "$TMP/merged" >"$TMP/plan" || fail "search on merged"
grep -q "plan 2: 4 1 3 2" "$d/expected.txt" || fail "fixture changed"
picks "$TMP/plan" | grep -q "^plan 2: 4 1 3 2$" || fail "plan on merged shards: $(picks "$TMP/plan")"

# the layer-major layer search writes what the candidate-major loop writes, byte for
# byte, with layers kept or streamed, and loads fewer layers when streaming
moe-expert-rank --quiet --model $model --max-length 16 "$TMP/calib" >"$TMP/rank" || fail rank
for beam in 1 3; do
    moe-layer-search --quiet --no-provenance --candidate-major --model $model --experts 2 --beam $beam \
        --max-length 16 "$TMP/rank" >"$TMP/cm" || fail "candidate-major"
    for flags in "" "--stream-weights" "--stream-weights --mem-mib 1"; do
        moe-layer-search --quiet --no-provenance $flags --model $model --experts 2 --beam $beam \
            --max-length 16 "$TMP/rank" >"$TMP/lm" || fail "layer-major $flags"
        cmp -s "$TMP/cm" "$TMP/lm" || fail "layer search $flags --beam $beam differs from --candidate-major"
    done
done
loads() { moe-layer-search "$@" 2>&1 >/dev/null | sed -n 's/.*, \([0-9]*\) layer loads$/\1/p'; }
new=$(loads --stream-weights --model $model --experts 2 --max-length 16 "$TMP/rank")
old=$(loads --stream-weights --candidate-major --model $model --experts 2 --max-length 16 "$TMP/rank")
[ -n "$new" ] && [ -n "$old" ] && [ "$new" -lt "$old" ] || fail "layer loads: $new layer-major, $old candidate-major"

# byte-identical output whatever the thread count
moe-expert-rank --quiet --no-provenance --threads 2 --model $model --max-length 16 "$TMP/calib" >"$TMP/t2" || fail rank-t2
OMP_NUM_THREADS=2 moe-expert-rank --quiet --no-provenance --threads 1 --model $model --max-length 16 "$TMP/calib" >"$TMP/t1" || fail rank-t1
cmp -s "$TMP/t1" "$TMP/t2" || fail "output depends on the thread count"

# calibration one sequence at a time == all at once, byte for byte
moe-calib --quiet --no-provenance --model $model $d/tokens.msgpack.zst >"$TMP/ca" || fail calib-all
moe-calib --quiet --no-provenance --batch-tokens 1 --model $model $d/tokens.msgpack.zst >"$TMP/cb" || fail calib-batch
cmp -s "$TMP/ca" "$TMP/cb" || fail "calibration depends on batching"

# bad inputs
expect_fail 2 "--model DIR is required" moe-expert-rank "$TMP/calib"
expect_fail 2 "--max-experts 99: the model has 8 routed experts" moe-expert-rank --model $model --max-experts 99 "$TMP/calib"
expect_fail 2 "--metric: expected js" moe-expert-rank --model $model --metric foo "$TMP/calib"
expect_fail 2 "--layers: expected a list" moe-expert-rank --model $model --layers 1,,2 "$TMP/calib"
expect_fail 1 "--layers: layer 0 is not a routed MoE layer" moe-expert-rank --model $model --layers 0 "$TMP/calib"
expect_fail 2 "--weight: expected LAYER:EXPERT=WEIGHT" moe-expert-rank --model $model --weight 1:2 "$TMP/calib"
expect_fail 2 "--experts K is required" moe-layer-search --model $model "$TMP/rank"
expect_fail 1 "'calib' is needed" moe-expert-rank --model $model $d/tokens.msgpack.zst
expect_fail 1 "'ranking' is needed" moe-layer-search --model $model --experts 2 "$TMP/calib"
printf '\204\246format\252moe-stream\247version\001\245kinds\220\252provenance\220\202\244type\243end\247records\000' \
    | zstd -q -c >"$TMP/empty.zst"
expect_fail 1 "'tokens' is needed" moe-calib --model $model "$TMP/empty.zst"
# a stream made with another model is refused (and accepted with --force)
expect_fail 1 "but this model is .*use --force" moe-expert-rank --model $FX/models/qwen2_moe-l5 "$TMP/calib"
moe-expert-rank --quiet --force --model $FX/models/qwen2_moe-l5 --max-length 16 "$TMP/calib" >/dev/null \
    2>"$TMP/force.err" && fail "a calib of another model's layers was accepted"
# the library's warning carries the tool's name, as every line on stderr does
grep -q "^moe-expert-rank: warning: .*but this model is .*(continuing: --force)$" "$TMP/force.err" \
    || fail "--force warning not prefixed with the tool's name: $(cat "$TMP/force.err")"
echo "ok tools"
