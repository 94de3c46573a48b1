# The whole method end to end on the built-in default (pipelines/cd-moe.sh), and
# a cross-check between stages: the condensed checkpoint that moe-condense wrote,
# run by moe-eval, reproduces the divergence moe-layer-search reported for it.
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

PY=$(find_python) || skip "no python3 with msgpack and zstandard for the cross-check"
$PY -c 'import numpy' 2>/dev/null || skip "no numpy for the cross-check"
for m in model condensed; do
    moe-eval --model "$TMP/p/$m" --dump hidden --max-length 256 "$TMP/p/01-tokens.msgpack.zst" \
        >"$TMP/$m.msgpack.zst" || fail "moe-eval --dump on $m"
done
$PY - "$TMP/model.msgpack.zst" "$TMP/condensed.msgpack.zst" "$TMP/p/04-plan.msgpack.zst" <<'PYEOF' || fail "cross-check"
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
want = arr(plan["scores"], "<f8")[1]          # score after condensing the first 2 layers
got = float(np.mean(js))
print("JS of the condensed checkpoint %.6e, layer search reported %.6e" % (got, want))
assert want > 0 and abs(got - want) <= 1e-3 * want, (got, want)
PYEOF
exit 0
