# moe-tune end to end on a tiny condensed model: options and bad input (one
# line, exit code, nothing half-written), the same bytes with 1 and 2 threads,
# a stopped and resumed run equal to the uninterrupted one, held-out
# perplexity going down (moe-eval), the result loading in the other tools, the
# log stream (moe-dump, a stock msgpack reader), --train-weights, --sft, --val,
# --precision.
. tests/shell/lib.sh
command -v moe-tune >/dev/null || fail "moe-tune not built"
cd "$TMP"

# a tiny deepseek (float32; layer 0 dense, 1-2 MoE), layer 2 condensed with 2 experts
moe-init --quiet --arch deepseek --hidden 32 --layers 3 --experts 4 --top-k 2 --shared 1 --moe-intermediate 16 \
    --intermediate 64 --vocab 300 --dtype f32 --seed 5 -o dense
echo '{"1-0":[1,4,0.4],"1-2":[1,4,0.3]}' >w.json
echo '{"1":[0,2]}' >e.json
echo '[1]' >o.json
moe-condense --model dense --layers 1 --experts 2 -o cond --cdmoe-weights w.json --cdmoe-experts e.json \
    --cdmoe-order o.json >/dev/null

# training and held-out text from the same little language
sentences() { # first count
    i=$1
    while [ "$i" -lt $(($1 + $2)) ]; do
        a=$((i % 5)) b=$((i % 3))
        animal=$(echo "cat dog bird fox cow" | cut -d' ' -f$((a + 1)))
        place=$(echo "mat park tree" | cut -d' ' -f$((b + 1)))
        echo "{\"text\": \"the $animal sat on the $place. the $animal saw the $place and sat.\"}"
        i=$((i + 1))
    done
}
sentences 0 24 >train.jsonl
sentences 100 6 >val.jsonl

T="--data train.jsonl --batch 2 --accum 2 --max-length 64 --lr 3e-3 --min-lr 3e-4 --warmup 2 --seed 3 -q"

# ---- options and bad input -----------------------------------------------------------
expect_fail 2 "moe-tune: --model DIR is required" moe-tune -o x --data train.jsonl
expect_fail 2 "moe-tune: --data FILE is required" moe-tune --model cond -o x
expect_fail 2 "--epochs and --steps: give one of them" moe-tune --model cond -o x --data train.jsonl --epochs 1 --steps 2
expect_fail 2 "--val-every needs --val FILE" moe-tune --model cond -o x --data train.jsonl --val-every 2
expect_fail 2 "--train-weights .* --train condensed" moe-tune --model cond -o x --data train.jsonl --train all --train-weights
expect_fail 2 "--train: expected condensed, all or layer indices" moe-tune --model cond -o x --data train.jsonl --train 1,x
expect_fail 2 "--lr: must be > 0" moe-tune --model cond -o x --data train.jsonl --lr 0
expect_fail 2 "-o cond: that is the model being read" moe-tune --model cond -o cond --data train.jsonl
expect_fail 2 "unrecognized|unknown" moe-tune --model cond -o x --data train.jsonl --bogus
mkdir exists
expect_fail 3 "moe-tune: exists: exists \(use --force" moe-tune --model cond -o exists --data train.jsonl
rmdir exists
expect_fail 3 "moe-tune: nodir/log.zst: No such file or directory" moe-tune --model cond -o x --data train.jsonl --log nodir/log.zst
expect_fail 3 "moe-tune: nothere.jsonl: No such file" moe-tune --model cond -o x --data nothere.jsonl
{ head -n 2 train.jsonl; echo '{"text": "a"'; } >bad.jsonl
expect_fail 1 "moe-tune: bad.jsonl: line 3: not JSON" moe-tune --model cond -o x --data bad.jsonl
echo '{"prompt": "a"}' >bad2.jsonl
expect_fail 1 "moe-tune: bad2.jsonl: line 1: 'response' is missing" moe-tune --model cond -o x --data bad2.jsonl
expect_fail 1 "moe-tune: .*condensed" moe-tune --model dense -o x --data train.jsonl
[ ! -e x ] || fail "a failed run left its output"
ls -a | grep -q '\.tmp\.' && fail "a failed run left a temporary file: $(ls -a)"

# ---- determinism: 1 and 2 threads ---------------------------------------------------------
# shellcheck disable=SC2086
moe-tune --model cond -o a $T --steps 6 --val val.jsonl --val-every 3 --threads 1 --no-provenance >a.txt
# shellcheck disable=SC2086
moe-tune --model cond -o b $T --steps 6 --val val.jsonl --val-every 3 --threads 2 --no-provenance >b.txt
grep -Eq "^steps 6  loss [0-9.e+-]+ -> [0-9.e+-]+  val loss" a.txt || fail "summary: $(cat a.txt)"
cmp -s a/model.safetensors b/model.safetensors || fail "1 and 2 threads give different weights"
cmp -s cond/model.safetensors a/model.safetensors && fail "the weights did not change"
no_timing() { moe-dump --no-header "$1" | sed 's/"tokens_per_s":[^,}]*,//; s/"seconds":[^,}]*//'; }
no_timing a/tune.msgpack.zst >a.log
no_timing b/tune.msgpack.zst >b.log
cmp -s a.log b.log || fail "1 and 2 threads give different logs: $(diff a.log b.log | head -5)"
[ "$(grep -c '"type":"step"' a.log)" -eq 6 ] || fail "6 step records expected: $(cat a.log)"
[ "$(grep -c '"type":"val"' a.log)" -eq 2 ] || fail "validations at steps 3 and 6 expected: $(cat a.log)"
[ ! -e a/tune-state.safetensors ] || fail "a finished run kept its state without --save-state"

# --recompute: the same bytes; --train all and a layer list run on a model without condensed layers
# shellcheck disable=SC2086
moe-tune --model cond -o r $T --steps 6 --val val.jsonl --val-every 3 --recompute --no-provenance >/dev/null
cmp -s a/model.safetensors r/model.safetensors || fail "--recompute changed the result"
# shellcheck disable=SC2086
moe-tune --model dense -o all $T --steps 2 --train all >/dev/null
# shellcheck disable=SC2086
moe-tune --model dense -o list $T --steps 2 --train 1,2 >/dev/null
expect_fail 1 "moe-tune: dense: layer 7 out of range" moe-tune --model dense -o x --data train.jsonl --train 7
[ ! -e x ] || fail "a failed run left its output"

# ---- resume: 3 steps, stop, 3 more = 6 steps ------------------------------------------------
# shellcheck disable=SC2086
moe-tune --model cond -o c $T --steps 6 --val val.jsonl --val-every 3 --stop-after 3 --no-provenance >c.txt
grep -q "stopped" c.txt || fail "the stopped run does not say so: $(cat c.txt)"
[ -f c/tune-state.safetensors ] || fail "no resume state after --stop-after"
moe-eval --model c --ppl val.jsonl >/dev/null || fail "the checkpoint saved at the stop does not load"
# shellcheck disable=SC2086
expect_fail 1 "c/tune-state.safetensors: saved by a run with lr=0.003; this run has lr=0.002" \
    moe-tune --model cond $T --steps 6 --val val.jsonl --val-every 3 --resume c --lr 2e-3
# shellcheck disable=SC2086
moe-tune --model cond $T --steps 6 --val val.jsonl --val-every 3 --resume c --threads 2 --no-provenance >/dev/null
cmp -s a/model.safetensors c/model.safetensors || fail "stopped + resumed differs from the uninterrupted run"
no_timing c/tune.msgpack.zst >c.log
cmp -s a.log c.log || fail "the resumed log differs: $(diff a.log c.log | head -5)"

# ---- it learns: held-out perplexity goes down, and every tool loads the result -------------
# shellcheck disable=SC2086
moe-tune --model cond -o tuned $T --epochs 4 --lr 1e-2 --min-lr 1e-3 --train-weights --log tuned.log >/dev/null
moe-eval --model cond --model tuned --ppl val.jsonl >eval.txt
before=$(sed -n 's/^ppl (token-weighted) *\([0-9.]*\) *\([0-9.]*\)$/\1/p' eval.txt)
after=$(sed -n 's/^ppl (token-weighted) *\([0-9.]*\) *\([0-9.]*\)$/\2/p' eval.txt)
[ -n "$before" ] && [ -n "$after" ] || fail "no perplexities: $(cat eval.txt)"
awk -v b="$before" -v a="$after" 'BEGIN { exit !(a < 0.8 * b) }' || fail "held-out ppl $before -> $after"
moe-tokenize --model tuned -o tok.zst val.jsonl
moe-calib --model tuned tok.zst >calib.zst || fail "moe-calib on the tuned model"
moe-condense --model tuned --layers 0 --experts 0 -o recond --cdmoe-weights w.json --cdmoe-experts e.json \
    --cdmoe-order o.json >/dev/null || fail "moe-condense on the tuned model"
grep -q '"tool": "moe-tune"' tuned/config.json || fail "no moe-tune provenance in config.json"
weights() { tr -d ' \n' <"$1" | grep -o '"weights":\[[^]]*\]'; }
w_before=$(weights cond/config.json)
w_after=$(weights tuned/config.json)
[ -n "$w_after" ] && [ "$w_before" != "$w_after" ] || fail "--train-weights left the weights: $w_before / $w_after"
cmp -s tuned.log tuned/tune.msgpack.zst || fail "--log differs from OUT/tune.msgpack.zst"
moe-dump --check tuned.log | grep -q "kinds \[tune\]" || fail "log kinds: $(moe-dump --check tuned.log)"

# ---- two stages, prompt/response data; the log read by a stock msgpack reader ---------------
echo '{"prompt": "the cat sat on the", "response": " mat."}' >sft.jsonl
echo '{"turns": [{"role": "user", "content": "where?"}, {"role": "assistant", "content": "the park"}]}' >>sft.jsonl
# shellcheck disable=SC2086
moe-tune --model cond -o two $T --steps 2 --sft sft.jsonl --log - >two.zst 2>two.err
grep -q "^steps 4" two.err || fail "--log -: the summary should go to stderr: $(cat two.err)"
moe-dump --type step two.zst | grep -q '"stage":2,"step":4' || fail "stage 2 steps: $(moe-dump two.zst)"
# ---- --precision ---------------------------------------------------------------------------
# bf16 computes the weight GEMMs from BF16 weights and activations (the backward ops of the
# cpu-bf16-compute table take the same BF16 weights): another loss than float32, close to it;
# f32 is the CPU's default (the same checkpoint bytes)
# shellcheck disable=SC2086
moe-tune --model cond -o pdef $T --steps 3 >sdef || fail "--precision default"
# shellcheck disable=SC2086
moe-tune --model cond -o p32 $T --steps 3 --precision f32 >s32 || fail "--precision f32"
# shellcheck disable=SC2086
moe-tune --model cond -o p16 $T --steps 3 --precision bf16 >s16 2>e16 || fail "--precision bf16: $(cat e16)"
cmp -s pdef/model.safetensors p32/model.safetensors || fail "--precision f32 is not the CPU's default"
cmp -s s32 s16 && fail "--precision bf16 trains as float32 does: $(cat s16)"
l32=$(awk '{ print $4 }' s32) l16=$(awk '{ print $4 }' s16)
awk -v a="$l32" -v b="$l16" 'BEGIN { d = (a - b) / a; exit !(d < 0.02 && d > -0.02) }' \
    || fail "--precision bf16: first loss $l16, float32 $l32"
expect_fail 2 "precision" moe-tune --model cond -o x --data train.jsonl --precision fp8
PY=$(find_python) || exit 0
$PY - two.zst <<'PYEOF' || fail "stock msgpack reader"
import sys, msgpack, zstandard
with open(sys.argv[1], "rb") as f:
    objs = list(msgpack.Unpacker(zstandard.ZstdDecompressor().stream_reader(f), raw=False))
assert objs[0]["kinds"] == ["tune"] and objs[0]["provenance"][0]["tool"] == "moe-tune", objs[0]
steps = [o for o in objs[1:] if o.get("type") == "step"]
assert [s["step"] for s in steps] == [1, 2, 3, 4] and [s["stage"] for s in steps] == [1, 1, 2, 2], steps
assert all(s["loss"] > 0 and s["lr"] > 0 and s["tokens"] > 0 for s in steps), steps
PYEOF
exit 0
