# The whole method end to end on the built-in default (pipelines/cd-moe.sh), and
# a cross-check between stages: the condensed checkpoint that moe-condense wrote,
# run by moe-eval, reproduces the divergence moe-layer-search reported for it
# (also with --weight supplying an unrouted expert's weight).
. tests/shell/lib.sh
sh pipelines/cd-moe.sh --out "$TMP/p" >"$TMP/log" 2>&1 || fail "pipeline: $(tail -n 20 "$TMP/log")"
for s in 01-tokens 02-calib 03-ranked 04-plan; do
    moe-dump --check "$TMP/p/$s.msgpack.zst" >/dev/null || fail "$s"
done
moe-dump --header "$TMP/p/04-plan.msgpack.zst" | grep -q '"kinds":\["tokens","calib","ranking","plan"\]' \
    || fail "kinds of the plan stream"
[ -f "$TMP/p/condensed/model.safetensors" ] || fail "no condensed checkpoint"
grep -q "condensed 2 layers" "$TMP/p/05-condense.txt" || fail "condense report: $(cat "$TMP/p/05-condense.txt")"

# our streams exported as the original's JSON files give the same checkpoint
for w in weights experts order; do
    moe-dump --cdmoe-json $w "$TMP/p/04-plan.msgpack.zst" >"$TMP/$w.json" || fail "--cdmoe-json $w"
done
grep -q '"0-[0-9]*": \[' "$TMP/weights.json" || fail "weights.json shape: $(head -3 "$TMP/weights.json")"
moe-condense --model "$TMP/p/model" --layers 2 --experts 2 -o "$TMP/from-json" --cdmoe-weights "$TMP/weights.json" \
    --cdmoe-experts "$TMP/experts.json" --cdmoe-order "$TMP/order.json" >/dev/null || fail "condense from JSON"
cmp -s "$TMP/from-json/model.safetensors" "$TMP/p/condensed/model.safetensors" || fail "JSON path differs"
grep -A12 condensed_layers "$TMP/from-json/config.json" >"$TMP/a"
grep -A12 condensed_layers "$TMP/p/condensed/config.json" >"$TMP/b"
cmp -s "$TMP/a" "$TMP/b" || fail "condensed_layers differ between the stream and JSON paths"
expect_fail 1 "no plan records for the order file \(run moe-layer-search first\)" \
    moe-dump --cdmoe-json order "$TMP/p/02-calib.msgpack.zst"

# --weight through the whole pipe: one short sample leaves expert 4 unrouted in
# every MoE layer; the ranking and the search use the supplied weight for it,
# the plan records the weights each layer was scored with, and moe-condense
# writes them (it failed with "expert 4 has no mean routing weight")
echo '{"text": "fox"}' >"$TMP/one.jsonl"
m=$TMP/p/model
moe-tokenize --model "$m" -o "$TMP/w-tokens" "$TMP/one.jsonl" || fail "tokenize one sample"
moe-calib --model "$m" "$TMP/w-tokens" >"$TMP/w-calib" 2>/dev/null || fail "calib one sample"
counts=$(moe-dump --type calib "$TMP/w-calib" | sed -n 's/.*"count":{[^}]*"first":\[\([^]]*\)\].*/\1/p' \
    | cut -d, -f5 | tr -d '\n')
[ "$counts" = "00000" ] || fail "expert 4 should be unrouted in all 5 MoE layers, counts: $counts"
W="--weight 1:4=0.05 --weight 2:4=0.05 --weight 3:4=0.05 --weight 4:4=0.05 --weight 5:4=0.05"
moe-expert-rank --model "$m" --max-experts 3 $W "$TMP/w-calib" >"$TMP/w-rank" 2>/dev/null || fail "rank with --weight"
moe-dump --type ranking "$TMP/w-rank" | grep -q '"layer":4,.*"experts":{"dtype":"i32","shape":\[3\],"first":\[[0-9,]*4' \
    || fail "layer 4 (two routed experts) should rank expert 4"
moe-layer-search --model "$m" --experts 3 $W "$TMP/w-rank" >"$TMP/w-plan" 2>/dev/null || fail "search with --weight"
moe-dump --type plan "$TMP/w-plan" | grep -q '"weights":{"dtype":"f32","shape":\[5,3\]' || fail "plan without weights"
moe-condense --model "$m" --layers 5 --experts 3 -o "$TMP/w-condensed" "$TMP/w-plan" >/dev/null \
    || fail "condense with the plan's weights"

PY=$(find_python) || skip "no python3 with msgpack and zstandard for the cross-check"
$PY -c 'import numpy' 2>/dev/null || skip "no numpy for the cross-check"

# js_matches_plan DENSE CONDENSED TOKENS PLAN STEP: the JS divergence of the final
# hidden states of the two checkpoints on TOKENS is the plan's score after STEP+1 layers
js_matches_plan() {
    for x in "$1" "$2"; do
        moe-eval --model "$x" --dump hidden --max-length 256 "$3" >"$TMP/dump.msgpack.zst" \
            || fail "moe-eval --dump on $x"
        mv "$TMP/dump.msgpack.zst" "$TMP/$(basename "$x").dump"
    done
    $PY - "$TMP/$(basename "$1").dump" "$TMP/$(basename "$2").dump" "$4" "$5" <<'PYEOF' || fail "cross-check $4"
import sys, msgpack, zstandard, numpy as np
def records(p, t):
    with open(p, "rb") as f:
        return [r for r in msgpack.Unpacker(zstandard.ZstdDecompressor().stream_reader(f), raw=False)
                if isinstance(r, dict) and r.get("type") == t]
def arr(a, dt="<f4"): return np.frombuffer(a["data"], dtype=dt).reshape(a["shape"])
def softmax(x): e = np.exp(x - x.max(-1, keepdims=True)); return e / e.sum(-1, keepdims=True)
js = []
for a, b in zip(records(sys.argv[1], "dump"), records(sys.argv[2], "dump")):
    p, q = softmax(arr(a["hidden"])[-1].astype(np.float64)), softmax(arr(b["hidden"])[-1].astype(np.float64))
    m, e = (p + q) / 2, 1e-10
    kl = lambda x: ((x + e) * (np.log(x + e) - np.log(m + e))).sum() / x.shape[0]
    js.append(0.5 * (kl(p) + kl(q)))
plan = records(sys.argv[3], "plan")[0]
want = arr(plan["scores"], "<f8")[int(sys.argv[4])]
got = float(np.mean(js))
print("JS of the condensed checkpoint %.6e, layer search reported %.6e" % (got, want))
assert want > 0 and abs(got - want) <= 1e-3 * want, (got, want)
PYEOF
}
js_matches_plan "$TMP/p/model" "$TMP/p/condensed" "$TMP/p/01-tokens.msgpack.zst" "$TMP/p/04-plan.msgpack.zst" 1
js_matches_plan "$TMP/p/model" "$TMP/w-condensed" "$TMP/w-tokens" "$TMP/w-plan" 4
exit 0
