# moe-generate: greedy tokens are the argmax of moe-eval --dump logits step by
# step (dense, condensed, folded checkpoints); sampling is reproducible (same
# bytes twice, 1 vs 2 threads, any --batch); stop strings, EOS ids, length
# limits; the outputs (text, JSON Lines, token stream) feed the other tools;
# bad input and bad options give one-line errors and the documented codes.
. tests/shell/lib.sh
PY=$(find_python) || skip "python3 with msgpack and zstandard not found"
$PY -c 'import numpy' 2>/dev/null || skip "python3 with numpy not found"
M=tests/fixtures/eval/model # a qwen2_moe fixture with a byte-level BPE tokenizer
# one thread: on a loaded machine, a tiny model's many small steps make
# threads wait on each other (the check of 1 vs 2 threads names --threads)
gen() { moe-generate --quiet --threads 1 "$@"; }

# ---- greedy = argmax of a whole-sequence forward, on three kinds of checkpoint:
# the fixture, it condensed (decoder layer 1 to experts [2, 0]), and a deepseek
# model condensed and folded into a dense MLP (qwen2_moe's gated shared expert
# cannot be folded)
echo '{"1-2": [0.4, 1, 0.4], "1-0": [0.25, 1, 0.25]}' >"$TMP/w.json"
echo '{"1": [2, 0]}' >"$TMP/e.json"
echo '[1]' >"$TMP/o.json"
cdmoe_json="--cdmoe-weights $TMP/w.json --cdmoe-experts $TMP/e.json --cdmoe-order $TMP/o.json"
moe-condense --model $M --layers 1 --experts 2 -o "$TMP/condensed" $cdmoe_json >/dev/null \
    || fail "moe-condense"
moe-init --arch deepseek --hidden 32 --layers 3 --heads 4 --kv-heads 4 --experts 4 --top-k 2 --shared 1 \
    --moe-intermediate 16 --intermediate 64 --vocab 300 --std 0.2 --seed 1 -o "$TMP/ds" >/dev/null
moe-condense --model "$TMP/ds" --layers 1 --experts 2 --fold -o "$TMP/folded" $cdmoe_json >/dev/null \
    || fail "moe-condense --fold"
grep -q '"folded"' "$TMP/folded/config.json" || fail "the folded checkpoint is not folded"
for d in $M "$TMP/condensed" "$TMP/ds" "$TMP/folded"; do
    gen -m "$d" -n 10 --ignore-eos --batch 2 -o "$TMP/g.zst" "Once upon a time" "The cat" "x" \
        || fail "$d: moe-generate"
    moe-eval -m "$d" --dump logits "$TMP/g.zst" -o "$TMP/d.zst" || fail "$d: moe-eval --dump"
    $PY tests/shell/generate_check.py greedy "$TMP/d.zst" 10 || fail "$d: greedy is not the argmax"
done
# the three checkpoints do differ (else the loop above proves little)
gen -m $M -n 10 --ignore-eos "Once upon a time" >"$TMP/dense.txt"
gen -m "$TMP/condensed" -n 10 --ignore-eos "Once upon a time" >"$TMP/cond.txt"
cmp -s "$TMP/dense.txt" "$TMP/cond.txt" && fail "condensing changed nothing"

# ---- the text output is the token stream decoded; --batch and --threads change nothing
gen -m $M -n 10 --ignore-eos "Once upon a time" "The cat" "x" >"$TMP/a.txt"
gen -m $M -n 10 --ignore-eos -o "$TMP/g.zst" "Once upon a time" "The cat" "x"
moe-tokenize -m $M --decode --skip-special "$TMP/g.zst" >"$TMP/dec.jsonl"
$PY - "$TMP/dec.jsonl" "$TMP/a.txt" <<'EOF' || fail "text differs from the decoded token stream"
import json, sys
texts = [json.loads(l)["text"] for l in open(sys.argv[1], encoding="utf-8")]
prompts = ["Once upon a time", "The cat", "x"]
want = "".join(t[len(p):] + "\n" for t, p in zip(texts, prompts))
got = open(sys.argv[2], encoding="utf-8").read()
assert got == want, (got, want)
EOF
samp="-n 16 -t 0.9 --top-k 50 --top-p 0.95 --samples 2 --ignore-eos"
gen -m $M $samp --seed 7 --threads 1 --batch 1 "Once upon a time" "The cat" "x" >"$TMP/s1.txt"
moe-generate --quiet -m $M $samp --seed 7 --threads 2 --batch 6 "Once upon a time" "The cat" "x" >"$TMP/s2.txt"
gen -m $M $samp --seed 7 --batch 4 "Once upon a time" "The cat" "x" >"$TMP/s3.txt"
cmp -s "$TMP/s1.txt" "$TMP/s2.txt" || fail "sampling depends on --threads / --batch"
cmp -s "$TMP/s1.txt" "$TMP/s3.txt" || fail "sampling depends on --batch"
[ "$(wc -l <"$TMP/s1.txt")" -eq 6 ] || fail "3 prompts x 2 samples: not 6 lines"
gen -m $M $samp --seed 8 "Once upon a time" "The cat" "x" >"$TMP/s4.txt"
cmp -s "$TMP/s1.txt" "$TMP/s4.txt" && fail "--seed changes nothing"
[ "$(sed -n 1p "$TMP/s1.txt")" = "$(sed -n 2p "$TMP/s1.txt")" ] && fail "two samples of one prompt are equal"
cmp -s "$TMP/s1.txt" "$TMP/a.txt" && fail "sampling gave the greedy text"

# ---- max new tokens, the position limit, EOS ids from generation_config.json
gen -m $M -n 5 --ignore-eos -o "$TMP/g.zst" "Once upon a time" "The cat"
$PY tests/shell/generate_check.py counts "$TMP/g.zst" >"$TMP/counts"
awk '$2 - $1 != 5 { exit 1 }' "$TMP/counts" || fail "-n 5: $(cat "$TMP/counts")"
long=$($PY -c 'print("a b " * 165)')
gen -m $M -n 40 --ignore-eos -o "$TMP/long.zst" "$long"
$PY tests/shell/generate_check.py counts "$TMP/long.zst" | awk '$2 != 512 { exit 1 }' \
    || fail "generation does not stop at max_position_embeddings (512)"
# -n 0: no token, each generation still has its line
[ "$(gen -m $M -n 0 --echo "abc" "de")" = "$(printf 'abc\nde')" ] || fail "-n 0 --echo"
gen -m $M -n 0 --jsonl "abc" | grep -q '"completion":"","text":"abc","finish":"length"' || fail "-n 0 --jsonl"
expect_fail 1 "prompt 1: [0-9]+ tokens, more than the model.s max_position_embeddings \(512\)" gen -m $M "$long$long"
mkdir "$TMP/eos"
for f in $M/*; do ln -s "$(cd "$(dirname "$f")" && pwd)/$(basename "$f")" "$TMP/eos/"; done
gen -m $M -n 6 --ignore-eos -o "$TMP/g.zst" "Once upon a time"
third=$($PY -c '
import sys; sys.path.insert(0, "tests/shell"); import generate_check as g
_, r = g.records(sys.argv[1]); ids = g.arr(r[0]["ids"]); p = r[0]["prompt_tokens"]
gen = list(ids[p:]); print(gen[2], p + gen.index(gen[2]) + 1)' "$TMP/g.zst")
set -- $third
echo "{\"eos_token_id\": [316, $1]}" >"$TMP/eos/generation_config.json"
gen -m "$TMP/eos" -n 6 -o "$TMP/e.zst" "Once upon a time"
$PY tests/shell/generate_check.py counts "$TMP/e.zst" | grep -qx "[0-9]* $2" || fail "no stop at the EOS id $1"
gen -m "$TMP/eos" -n 6 --jsonl "Once upon a time" | grep -q '"finish":"eos"' || fail "finish is not eos"
gen -m "$TMP/eos" -n 6 --ignore-eos -o "$TMP/e.zst" "Once upon a time"
$PY tests/shell/generate_check.py counts "$TMP/e.zst" | awk '$2 - $1 != 6 { exit 1 }' || fail "--ignore-eos"
echo '{"eos_token_id": "x"}' >"$TMP/eos/generation_config.json"
expect_fail 1 "generation_config.json: eos_token_id is not a token id" gen -m "$TMP/eos" "hi"

# ---- stop strings: the text ends before the first occurrence
gen -m $M -n 30 --ignore-eos --jsonl "Once upon a time" >"$TMP/full.jsonl"
stop=$($PY - "$TMP/full.jsonl" <<'EOF'
import json, sys
c = json.loads(open(sys.argv[1], encoding="utf-8").readline())["completion"]
i = next(i for i in range(6, len(c) - 2) if all(ch.isascii() and ch.isalnum() for ch in c[i:i + 2]))
print(c[i:i + 2])
EOF
)
gen -m $M -n 30 --ignore-eos --stop "$stop" --stop "never-seen" --jsonl "Once upon a time" >"$TMP/stop.jsonl"
$PY - "$TMP/full.jsonl" "$TMP/stop.jsonl" "$stop" <<'EOF' || fail "stop string '$stop'"
import json, sys
full = json.loads(open(sys.argv[1], encoding="utf-8").readline())
got = json.loads(open(sys.argv[2], encoding="utf-8").readline())
stop = sys.argv[3]
want = full["completion"][:full["completion"].index(stop)]
assert got["completion"] == want and got["finish"] == "stop", (got, want)
assert got["text"] == "Once upon a time" + want
EOF
gen -m $M -n 30 --ignore-eos --stop "$stop" "Once upon a time" >"$TMP/stop.txt"
$PY -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["completion"])' "$TMP/stop.jsonl" \
    | cmp -s - "$TMP/stop.txt" || fail "stop string: text and --jsonl differ"

# ---- prompts from a file, JSON Lines or lines, or stdin; --echo
printf '{"prompt": "Once upon a time"}\n\n{"prompt": "The cat"}\n' >"$TMP/p.jsonl"
printf 'Once upon a time\nThe cat\n' >"$TMP/p.txt"
gen -m $M -n 10 --ignore-eos -f "$TMP/p.jsonl" >"$TMP/f1.txt"
gen -m $M -n 10 --ignore-eos <"$TMP/p.txt" >"$TMP/f2.txt"
gen -m $M -n 10 --ignore-eos -p "Once upon a time" "The cat" >"$TMP/f3.txt"
cmp -s "$TMP/f1.txt" "$TMP/f2.txt" && cmp -s "$TMP/f1.txt" "$TMP/f3.txt" || fail "prompt sources differ"
gen -m $M -n 10 --ignore-eos --echo "The cat" | grep -q "^The cat" || fail "--echo"
# a token stream of moe-tokenize as prompts: the same text, and -o carries its provenance on
printf '{"text": "Once upon a time"}\n{"text": "The cat"}\n' >"$TMP/t.jsonl"
moe-tokenize -m $M "$TMP/t.jsonl" | gen -m $M -n 10 --ignore-eos -f - >"$TMP/f4.txt"
cmp -s "$TMP/f1.txt" "$TMP/f4.txt" || fail "prompts as a token stream differ from the text prompts"
moe-tokenize -m $M "$TMP/t.jsonl" -o "$TMP/t.zst"
gen -m $M -n 4 -f "$TMP/t.zst" -o "$TMP/chain.zst"
moe-dump --header "$TMP/chain.zst" | grep -q '"kinds":\["tokens"\],"provenance":\[{"tool":"moe-tokenize".*{"tool":"moe-generate"' \
    || fail "provenance chain: $(moe-dump --header "$TMP/chain.zst")"
moe-tokenize -m "$TMP/ds" "$TMP/t.jsonl" -o "$TMP/other.zst"
expect_fail 1 "other.zst.*tokenizer" gen -m $M -f "$TMP/other.zst"
gen -m $M -n 2 --force -f "$TMP/other.zst" >/dev/null 2>"$TMP/err" || fail "--force: $(cat "$TMP/err")"
grep -q "warning" "$TMP/err" || fail "--force without a warning"

# ---- data-free calibration text: --jsonl feeds moe-tokenize and moe-calib
gen -m $M -n 24 -t 1 --samples 3 --seed 1 --jsonl '' >"$TMP/self.jsonl"
[ "$(wc -l <"$TMP/self.jsonl")" -eq 3 ] || fail "--samples 3: not 3 lines"
moe-tokenize -m $M "$TMP/self.jsonl" | moe-calib --model $M >"$TMP/calib.zst" || fail "calibration on generated text"
moe-dump --check "$TMP/calib.zst" >/dev/null || fail "calib stream"
gen -m $M -n 8 -o - "Once" | moe-eval -m $M --ppl - --json | grep -q '"ppl"' || fail "-o - | moe-eval --ppl"

# ---- terminals: text may go to one, a token stream may not
if command -v script >/dev/null 2>&1; then
    script -qec "$BIN/moe-generate --quiet -m $M -n 3 hi; echo rc=\$?" /dev/null >"$TMP/tty" 2>&1
    grep -q "rc=0" "$TMP/tty" || fail "text to a terminal: $(cat "$TMP/tty")"
    script -qec "$BIN/moe-generate -m $M -n 3 -o - hi; echo rc=\$?" /dev/null >"$TMP/tty" 2>&1
    grep -q "refusing to write a binary stream to a terminal" "$TMP/tty" || fail "tty not refused: $(cat "$TMP/tty")"
    grep -q "rc=3" "$TMP/tty" || fail "tty refusal exit status: $(cat "$TMP/tty")"
else
    echo "note: script(1) absent, terminal output not tested"
fi
moe-generate -m $M -n 3 hi 2>"$TMP/err" >/dev/null
grep -Eq "tokens/s" "$TMP/err" || fail "no tokens/s on stderr"
moe-generate --quiet -m $M -n 3 hi 2>"$TMP/err" >/dev/null
[ ! -s "$TMP/err" ] || fail "--quiet is not quiet: $(cat "$TMP/err")"

# ---- bad input and bad options
expect_fail 1 "qwen2_moe-f32: no tokenizer.json in the model directory \(name one with --tokenizer\)" \
    gen -m tests/fixtures/models/qwen2_moe-f32 hi
expect_fail 3 "nonexistent" gen -m "$TMP/nonexistent" hi
expect_fail 3 "nonexistent.jsonl" gen -m $M -f "$TMP/nonexistent.jsonl"
printf '{"prompt": "a"}\n{"prompt": \n' >"$TMP/bad.jsonl"
expect_fail 1 "bad.jsonl: line 2: not JSON" gen -m $M -f "$TMP/bad.jsonl"
printf '{"text": "a"}\n' >"$TMP/bad.jsonl"
expect_fail 1 "bad.jsonl: line 1: missing field 'prompt'" gen -m $M -f "$TMP/bad.jsonl"
printf 'ok\n\377\376\n' >"$TMP/bad.txt"
expect_fail 1 "bad.txt: line 2: invalid UTF-8" gen -m $M -f "$TMP/bad.txt"
: >"$TMP/empty.txt"
expect_fail 1 "empty.txt: no prompts" gen -m $M -f "$TMP/empty.txt"
expect_fail 2 "model DIR is required" gen hi
expect_fail 2 "top-p must be in" gen -m $M -t 1 --top-p 0 hi
expect_fail 2 "top-p must be in" gen -m $M -t 1 --top-p 1.5 hi
expect_fail 2 "temperature must be >= 0" gen -m $M -t -1 hi
expect_fail 2 "give a --temperature above 0" gen -m $M --top-k 5 hi
expect_fail 2 "give a --temperature above 0" gen -m $M --samples 2 hi
expect_fail 2 "no --jsonl or --echo" gen -m $M --jsonl -o "$TMP/x.zst" hi
expect_fail 2 "empty string" gen -m $M --stop '' hi
expect_fail 2 "max-new-tokens" gen -m $M -n -1 hi
expect_fail 2 "unknown option" gen -m $M --bogus hi
[ ! -e "$TMP/x.zst" ] || fail "a refused run left an output"
exit 0
