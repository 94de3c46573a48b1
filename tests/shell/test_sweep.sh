# pipelines/sweep.sh on a tiny random model: every method at every layer
# count in the table (Markdown and JSON), the memory ratios as the parameter
# counts give them, the plots, a rerun that reuses every intermediate (and
# writes the same table), --tune skipped with a message when moe-tune is not
# built and run for real on every method when it is (and through a stand-in
# for its arguments), and bad arguments refused.
. tests/shell/lib.sh
export OMP_NUM_THREADS=1 BENCH_TOKENS=16 BENCH_RUNS=1
case $BIN in /*) ;; *) BIN=$PWD/$BIN ;; esac
export BIN
PATH=$BIN:$PATH
ROOT=$PWD
cd "$TMP"
moe-init --arch deepseek --hidden 32 --layers 4 --heads 2 --kv-heads 2 --experts 8 --top-k 2 --shared 1 \
    --moe-intermediate 16 --intermediate 64 --vocab 300 --seed 1 -o model >/dev/null || fail "moe-init"
i=0
while [ $i -lt 8 ]; do
    echo "{\"text\": \"Sample $i: the quick brown fox number $i jumps over $((i * 7)) lazy dogs, then rests.\"}"
    i=$((i + 1))
done >calib.jsonl
sweep() { sh "$ROOT/pipelines/sweep.sh" model calib.jsonl calib.jsonl "$ROOT/tests/fixtures/eval/tiny_task.jsonl" \
    --out out --layers "1 2" --prune "6" "$@"; }
sweep --tune >md 2>err || fail "sweep: $(tail -5 err)"
[ -x "$BIN/moe-tune" ] || grep -q "moe-tune is not built; tuning skipped" err || fail "no --tune message"
for m in cdmoe-s0 cdmoe-sk layerdrop blockdrop layerdrop-cos blockdrop-cos; do
    for n in 1 2; do grep -q "^| $m | $n | " out/sweep.md || fail "no row $m $n: $(cat out/sweep.md)"; done
done
grep -q "^| prune-freq | 6 | " out/sweep.md && grep -q "^| prune-reap | 6 | " out/sweep.md || fail "no pruning rows"
grep -q "^| dense | - | [0-9]* | 1.0000 | " out/sweep.md || fail "dense row"
cmp -s md out/sweep.md || fail "stdout is not the table"
[ "$(grep -c '\[[0-9]*/14\]' err)" -eq 14 ] || fail "progress: $(cat err)"
# memory ratio = parameters / the dense model's; a dropped block weighs less than a dropped MLP
awk -F' *\\| *' 'NR == 3 { d = $4 } NR > 2 { r = $4 / d; if (r - $5 > 1e-4 || $5 - r > 1e-4) { print "bad ratio: " $0; exit 1 } }' \
    out/sweep.md || fail "memory ratios"
ld=$(awk -F' *\\| *' '$2 == "layerdrop" && $3 == 2 { print $4 }' out/sweep.md)
bd=$(awk -F' *\\| *' '$2 == "blockdrop" && $3 == 2 { print $4 }' out/sweep.md)
[ "$bd" -lt "$ld" ] || fail "blockdrop ($bd) not smaller than layerdrop ($ld)"
# perplexity and accuracy filled in; the JSON has the same runs
awk -F' *\\| *' 'NR > 2 && ($8 == "-" || $9 == "-") { exit 1 }' out/sweep.md || fail "empty perplexity/accuracy"
# with moe-tune built, --tune tunes every checkpoint for real (every weight each has, the
# dropped and pruned ones included): a +tune row for each, and the dense model's control row
if [ -x "$BIN/moe-tune" ]; then
    runs=30 lines=17
    grep -q "^| dense+tune | - | " out/sweep.md || fail "no dense+tune control row: $(cat out/sweep.md)"
    grep -q "tuning failed" err && fail "a checkpoint moe-tune could not tune: $(grep 'tuning failed' err)"
    for m in cdmoe-s0 cdmoe-sk layerdrop blockdrop layerdrop-cos blockdrop-cos; do
        for n in 1 2; do grep -q "^| $m+tune | $n | " out/sweep.md || fail "no row $m+tune $n: $(cat out/sweep.md)"; done
    done
    for m in prune-freq prune-reap; do grep -q "^| $m+tune | 6 | " out/sweep.md || fail "no row $m+tune"; done
else
    runs=15 lines=8
fi
[ "$(grep -o '"method"' out/sweep.json | wc -l)" -eq $runs ] || fail "JSON runs: $(cat out/sweep.json)"
PY=$(find_python) && { $PY -c 'import json,sys; r=json.load(open(sys.argv[1]))["runs"]; assert r[0]["method"]=="dense" and all(x["ppl"] > 1 for x in r)' \
    out/sweep.json || fail "sweep.json"; }
# accuracy plotted (a task was given), and perplexity in the -ppl plots
grep -q ">accuracy<" out/sweep-memory.svg && grep -q ">perplexity<" out/sweep-memory-ppl.svg || fail "plots' y"
for p in memory speedup memory-ppl speedup-ppl; do
    f=out/sweep-$p.svg
    head -c 4 $f | grep -q "<svg" && tail -n 1 $f | grep -q "</svg>" || fail "$f"
    [ "$(grep -c '<polyline' $f)" -eq $lines ] || fail "$f: not one line per method (and tuned method)"
    grep -q 'stroke-dasharray' $f || fail "$f: no dense line"
done
# a rerun reuses everything and writes the same table
cp out/sweep.md md1
sleep 1
sweep --tune >md 2>err || fail "rerun: $(tail -5 err)"
grep -q "^sweep: \[1/14\]" err || fail "rerun: no progress"
[ "$(grep -c 'reused' err)" -ge 30 ] || fail "rerun did not reuse: $(cat err)"
changed=$(find out/runs out/*.msgpack.zst -newer md1)
[ -z "$changed" ] || fail "the rerun rewrote $changed"
cmp -s md1 out/sweep.md || fail "the rerun's table differs"
# --tune runs moe-tune on each checkpoint and evaluates the result (a stand-in
# moe-tune that copies the model, recording its arguments)
mkdir fakebin
for t in "$BIN"/moe-*; do ln -s "$t" fakebin/; done
rm -f fakebin/moe-tune
cat >fakebin/moe-tune <<'TUNE'
#!/bin/sh
echo "$@" >>"$(dirname "$0")/tune.args"
while [ $# -gt 0 ]; do case $1 in --model) m=$2; shift 2 ;; -o) o=$2; shift 2 ;; *) shift ;; esac; done
cp -r "$m" "$o"
TUNE
chmod +x fakebin/moe-tune
BIN=$PWD/fakebin sh "$ROOT/pipelines/sweep.sh" model calib.jsonl calib.jsonl --out out5 --layers 1 \
    --methods "cdmoe-s0 layerdrop" --tune --tune-data calib.jsonl >md 2>err || fail "--tune: $(tail -5 err)"
grep -q "^| cdmoe-s0+tune | 1 | " out5/sweep.md && grep -q "^| layerdrop+tune | 1 | " out5/sweep.md \
    || fail "no tuned rows: $(cat out5/sweep.md)"
[ "$(grep -c -- "--train all" fakebin/tune.args)" -eq 3 ] && [ "$(grep -c -- "--data calib.jsonl" fakebin/tune.args)" -eq 3 ] \
    || fail "moe-tune arguments: $(cat fakebin/tune.args)"
# TUNE_TRAIN=paper: CD-MoE trains its condensed layers' experts only, the others every weight
rm -f fakebin/tune.args
TUNE_TRAIN=paper BIN=$PWD/fakebin sh "$ROOT/pipelines/sweep.sh" model calib.jsonl calib.jsonl --out out6 --layers 1 \
    --methods "cdmoe-s0 layerdrop" --tune >md 2>err || fail "--tune, TUNE_TRAIN=paper: $(tail -5 err)"
[ "$(grep -c -- "--train condensed" fakebin/tune.args)" -eq 1 ] && [ "$(grep -c -- "--train all" fakebin/tune.args)" -eq 2 ] \
    && grep -q -- "--model [^ ]*cdmoe-s0-1 .*--train condensed" fakebin/tune.args \
    || fail "TUNE_TRAIN=paper: moe-tune arguments: $(cat fakebin/tune.args)"
expect_fail 2 "TUNE_TRAIN=some: not all or paper" env TUNE_TRAIN=some sh "$ROOT/pipelines/sweep.sh" model calib.jsonl --tune
# a checkpoint moe-tune refuses is reported and left untuned; the sweep goes on
printf '#!/bin/sh\necho "moe-tune: layer 3: no post_attention_layernorm" >&2\nexit 1\n' >fakebin/moe-tune
BIN=$PWD/fakebin sh "$ROOT/pipelines/sweep.sh" model calib.jsonl calib.jsonl --out out3 --layers 1 \
    --methods layerdrop --tune >md 2>err || fail "--tune, failing: $(tail -5 err)"
grep -q "tuning failed, row skipped: moe-tune: layer 3" err || fail "no tuning failure message: $(cat err)"
grep -q "+tune" out3/sweep.md && fail "a failed tuning has a row"

# bad arguments
expect_fail 2 "--methods: unknown method 'dropout'" sh "$ROOT/pipelines/sweep.sh" model calib.jsonl --methods dropout
expect_fail 2 "--layers: 9 is not in 1..3" sh "$ROOT/pipelines/sweep.sh" model calib.jsonl --out out2 --layers 9
expect_fail 1 "nope: no config.json" sh "$ROOT/pipelines/sweep.sh" nope calib.jsonl
expect_fail 1 "--tune-data nope.jsonl: no such file" sh "$ROOT/pipelines/sweep.sh" model calib.jsonl --tune --tune-data nope.jsonl
exit 0
