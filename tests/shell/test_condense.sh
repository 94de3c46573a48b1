# moe-condense: plans from the original's JSON files, the written checkpoint,
# refusals, and bad plans.  Uses the committed tiny model fixtures.
. tests/shell/lib.sh
M=tests/fixtures/models/qwen2_moe-f32   # layer 0 dense (mlp_only_layers), 1-2 MoE, 8 experts
[ -f $M/model.safetensors ] || fail "fixture $M missing"
cd "$TMP" && M=$OLDPWD/$M

# MoE ordinal 0 = decoder layer 1, ordinal 1 = decoder layer 2
echo '{"0-1":[1.0,4,0.25],"0-3":[2.0,4,0.5],"1-6":[1.6,4,0.4],"1-1":[0.5,2,0.25],"1-0":[0.1,1,0.1]}' >w.json
echo '{"0":[3,1],"1":[6,1,0]}' >e.json
echo '[1,0]' >o.json
moe-condense --model $M --layers 2 --experts 2 -o out --cdmoe-weights w.json --cdmoe-experts e.json \
    --cdmoe-order o.json >report.txt || fail "condense: $(cat report.txt)"
grep -q "condensed 2 layers with 2 routed experts each: 2 1" report.txt || fail "report: $(cat report.txt)"
grep -Eq "^parameters +[0-9.]+K +[0-9.]+K +0\.[0-9]+" report.txt || fail "no parameter line: $(cat report.txt)"
[ "$(stat -c %s out/model.safetensors)" -lt "$(stat -c %s $M/model.safetensors)" ] || fail "not smaller"
PY=$(find_python) || PY=
if [ -n "$PY" ]; then
    $PY - out/config.json <<'PYEOF' || fail "config.json content"
import json, sys
c = json.load(open(sys.argv[1]))
cl = c["condensed_layers"]
assert list(cl) == ["1", "2"], cl
assert cl["2"]["experts"] == [6, 1] and abs(cl["2"]["weights"][0] - 0.4) < 1e-7, cl
assert cl["1"]["experts"] == [3, 1] and abs(cl["1"]["weights"][1] - 0.25) < 1e-7, cl
assert c["cdmoe_provenance"][0]["tool"] == "moe-condense"
assert c["model_type"] == "qwen2_moe" and c["mlp_only_layers"] == [0]
PYEOF
fi
# the tensors: kept experts present, dropped experts and routers gone
hdr=$(head -c 200000 out/model.safetensors | tr -c '[:print:]' '\n' | grep -o '"model[^"]*"' | tr -d '"')
echo "$hdr" | grep -qx "model.layers.2.mlp.experts.6.up_proj.weight" || fail "kept expert missing"
echo "$hdr" | grep -qx "model.layers.2.mlp.experts.0.up_proj.weight" && fail "dropped expert kept"
echo "$hdr" | grep -qx "model.layers.2.mlp.gate.weight" && fail "router kept"
echo "$hdr" | grep -qx "model.layers.2.mlp.shared_expert_gate.weight" || fail "shared gate dropped"
echo "$hdr" | grep -qx "model.layers.0.mlp.gate_proj.weight" || fail "dense layer dropped"

# an existing output is refused without --force, replaced with it
expect_fail 3 "out: exists \(use --force" moe-condense --model $M --layers 1 --experts 1 -o out \
    --cdmoe-weights w.json --cdmoe-experts e.json --cdmoe-order o.json
moe-condense --model $M --layers 1 --experts 1 -o out --force --cdmoe-weights w.json --cdmoe-experts e.json \
    --cdmoe-order o.json >/dev/null || fail "--force"
grep -q '"1": {' out/config.json && fail "--force did not replace the output"

# bad plans: one line naming the problem, no output left behind
echo '{"0-1":[1.0,4]}' >bad1.json
expect_fail 1 "bad1.json: \"0-1\": expected \[sum, count, mean\]" moe-condense --model $M --layers 1 \
    --experts 1 -o x --cdmoe-weights bad1.json --cdmoe-experts e.json --cdmoe-order o.json
echo '{"0-1":' >bad2.json
expect_fail 1 "bad2.json:[0-9]+: " moe-condense --model $M --layers 1 --experts 1 -o x --cdmoe-weights bad2.json \
    --cdmoe-experts e.json --cdmoe-order o.json
echo '[5]' >bad3.json
expect_fail 1 "bad3.json: the order names MoE layer 5, but the model has only 2 MoE layers" moe-condense \
    --model $M --layers 1 --experts 1 -o x --cdmoe-weights w.json --cdmoe-experts e.json --cdmoe-order bad3.json
expect_fail 1 "layer 1: 3 experts asked for, but fewer are ranked" moe-condense \
    --model $M --layers 2 --experts 3 -o x --cdmoe-weights w.json --cdmoe-experts e.json --cdmoe-order o.json
echo '{"1-6":[1.6,4,0.4]}' >w2.json
expect_fail 1 "layer 2: expert 1 has no mean routing weight" moe-condense --model $M --layers 1 --experts 2 \
    -o x --cdmoe-weights w2.json --cdmoe-experts e.json --cdmoe-order o.json
expect_fail 1 "3 layers asked for, but the layer order has only 2" moe-condense --model $M --layers 3 \
    --experts 1 -o x --cdmoe-weights w.json --cdmoe-experts e.json --cdmoe-order o.json
expect_fail 2 "--experts 9: the model has 8 routed experts" moe-condense --model $M --layers 1 --experts 9 \
    -o x --cdmoe-order o.json
expect_fail 1 "no layer order" moe-condense --model $M --layers 1 --experts 1 -o x --cdmoe-weights w.json
[ -e x ] && fail "output left behind after an error"
ls -A | grep -q '\.tmp\.' && fail "temporary directory left behind"

# killed mid-write: no OUT, ever.  SIGTERM cleans up at once; after SIGKILL the
# next run sweeps the dead process's temporary directory.
moe-init --arch qwen2_moe --hidden 256 --layers 3 --experts 32 --top-k 2 --moe-intermediate 256 \
    --dtype f32 --seed 5 -o big >/dev/null || fail "moe-init big"
echo '{"0-1":[1,1,1],"1-1":[1,1,1],"2-1":[1,1,1]}' >wb.json; echo '{"0":[1],"1":[1],"2":[1]}' >eb.json
echo '[0,1,2]' >ob.json
kill_mid_write() { # signal; returns 1 if the run finished before the signal landed
    moe-condense --model big --layers 1 --experts 1 -o killed --cdmoe-weights wb.json --cdmoe-experts eb.json \
        --cdmoe-order ob.json >/dev/null 2>&1 &
    pid=$!
    i=0
    while [ $i -lt 2000 ] && ! ls -A | grep -q '^\.killed\.tmp\.'; do sleep 0.002; i=$((i + 1)); done
    kill -"$1" $pid 2>/dev/null || true # it may have finished already
    rc=0
    wait $pid 2>/dev/null || rc=$?
    if [ -e killed ]; then
        [ $rc -eq 0 ] || fail "OUT exists after $1 (exit $rc)"
        rm -rf killed
        return 1
    fi
    [ $rc -ne 0 ] || fail "moe-condense exited 0 after $1 but wrote no OUT"
    return 0
}
for sig in TERM KILL; do
    landed=0 try=0
    while [ $landed -eq 0 ] && [ $try -lt 8 ]; do
        kill_mid_write $sig && landed=1
        try=$((try + 1))
    done
    [ $landed -eq 1 ] || echo "note: every run finished before the $sig landed; not tested"
    [ $sig = TERM ] && ls -A | grep -q '^\.killed\.tmp\.' && fail "temporary directory left after SIGTERM"
    [ $sig = KILL ] && [ $landed -eq 1 ] && ! ls -A | grep -q '^\.killed\.tmp\.' && echo "note: no stale directory"
done
moe-condense --model big --layers 1 --experts 1 -o killed --cdmoe-weights wb.json --cdmoe-experts eb.json \
    --cdmoe-order ob.json >/dev/null || fail "condense after a kill"
ls -A | grep -q '^\.killed\.tmp\.' && fail "stale temporary directory not swept"
[ -f killed/model.safetensors ] || fail "no output after the rerun"

# the original's published files, on a model of DeepSeekMoE-16B's layer/expert counts
S=${CDMOE_SHARED:-}/reference/cd-moe
if [ -f "$S/dynamic_weight.json" ] && command -v moe-init >/dev/null; then
    moe-init --arch deepseek --hidden 16 --layers 28 --heads 2 --kv-heads 2 --experts 64 --top-k 6 \
        --shared 2 --moe-intermediate 8 --intermediate 32 --vocab 300 --seed 3 -o ds >/dev/null \
        || fail "moe-init deepseek-shaped"
    moe-condense --model ds --layers 15 --experts 6 -o ds-cd --cdmoe-weights "$S/dynamic_weight.json" \
        --cdmoe-experts "$S/layer_idx_to_expert_idx.greedy_jl.json" --cdmoe-order "$S/layer_idx_order.e6.json" \
        >r.txt || fail "original JSON files: $(cat r.txt)"
    # order [19, 15, ...] are MoE ordinals: decoder layers 20, 16, ...
    grep -q "condensed 15 layers with 6 routed experts each: 20 16 23 11 13 7 15 22 27 8 18 2 25 24 10" r.txt \
        || fail "ordinal mapping: $(cat r.txt)"
    moe-condense --model ds --layers 15 --experts 0 -o ds-e0 --cdmoe-order "$S/layer_idx_order.e0.json" \
        >/dev/null || fail "E(2+0) from layer_idx_order.e0.json"
else
    echo "note: original CD-MoE JSON files not tested (../shared or moe-init absent)"
fi
exit 0
