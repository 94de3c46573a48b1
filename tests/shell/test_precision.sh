# --precision bf16 in the search tools on the tiny models: moe-calib |
# moe-expert-rank | moe-layer-search run to the end, and each greedy pick
# equals the float32 run's or differs only where the float32 scores of the
# two candidates are closer than BF16's error on them (precision_picks.py
# prints every case).  The layer search in bf16 reads the float32 ranking, so
# that its picks are compared on the same input.  (The forward's accuracy:
# tests/unit/test_bf16.c.)
. tests/shell/lib.sh
export OMP_NUM_THREADS=1
FX=tests/fixtures/search
command -v python3 >/dev/null || skip "no python3"

search() { # PRECISION MODEL K TOKENS RANKING-IN(or -) OUT
    prec=$1 model=$2 k=$3 tokens=$4 rank=$5 out=$6
    if [ "$rank" = - ]; then
        moe-calib --quiet --precision "$prec" --model "$model" "$tokens" >"$TMP/calib" || fail "moe-calib $prec"
        rank=$TMP/rank_$prec
        moe-expert-rank --quiet --precision "$prec" --model "$model" --max-length 16 "$TMP/calib" >"$rank" \
            || fail "moe-expert-rank $prec"
    fi
    moe-layer-search --quiet --precision "$prec" --model "$model" --experts 0 --max-length 16 "$rank" \
        >"$TMP/p0" || fail "moe-layer-search --experts 0 $prec"
    moe-layer-search --quiet --precision "$prec" --model "$model" --experts "$k" --max-length 16 "$TMP/p0" \
        >"$out" || fail "moe-layer-search --experts $k $prec"
}

for name in deepseek qwen2_moe qwen3_moe olmoe mixtral deepseek-l5; do
    d=$FX/$name
    model=$(sed -n 's/.*"model": "\(.*\)".*/\1/p' "$d/params.json")
    k=$(sed -n 's/.*"top_k": \([0-9]*\).*/\1/p' "$d/params.json")
    search f32 "$model" "$k" "$d/tokens.msgpack.zst" - "$TMP/f32"
    search bf16 "$model" "$k" "$d/tokens.msgpack.zst" - "$TMP/bf16"
    # rankings (and the plans that follow from them), then plans from the same ranking
    search bf16 "$model" "$k" - "$TMP/rank_f32" "$TMP/bf16_on_f32"
    moe-dump --full --no-header --type ranking "$TMP/rank_bf16" >"$TMP/b.jsonl" || fail "moe-dump"
    moe-dump --full --no-header --type plan "$TMP/bf16_on_f32" >>"$TMP/b.jsonl" || fail "moe-dump"
    moe-dump --full --no-header --type ranking "$TMP/rank_f32" >"$TMP/a.jsonl" || fail "moe-dump"
    moe-dump --full --no-header --type plan "$TMP/f32" >>"$TMP/a.jsonl" || fail "moe-dump"
    python3 tests/shell/precision_picks.py "$TMP/a.jsonl" "$TMP/b.jsonl" >"$TMP/report" ||
        fail "$name: bf16 picks not explained by BF16's error: $(cat "$TMP/report")"
    sed "s/^/$name: /" "$TMP/report"
done
