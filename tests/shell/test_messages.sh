# Errors name the file and what is wrong, exactly once (issue 14, section 4):
# moe-eval's JSON Lines errors (formatted into themselves, they read
# "calib.jsonl: line 1: calib.jsonl: line 1: ded"), moe-tokenize --decode's
# conversion errors (named neither file nor record), moe-condense's "no
# layer order" and the other plan errors (named no file), moe-eval's
# perplexity without a usable sample, moe-dump --cdmoe-json's conversions.
. tests/shell/lib.sh
PY=$(find_python) || skip "python3 with msgpack and zstandard not found (writes the streams)"
M=tests/fixtures/eval/model
S=tests/fuzz/seeds

# moe-eval: a tokenizer error on line 1, prefixed once
mkdir -p "$TMP/m2"
cp $M/config.json $M/model.safetensors "$TMP/m2/"
cp tests/fixtures/tokenizer/synth-llama/tokenizer.json "$TMP/m2/" # adds 2 special tokens
expect_fail 1 "^moe-eval: $M/../ppl_text.jsonl: line 1: max length 1 is below the 2 special tokens added$" \
    moe-eval -m "$TMP/m2" --ppl $M/../ppl_text.jsonl --max-length 1
# ... and a perplexity with no sample of 2 tokens names its file
echo '{"text": ""}' >"$TMP/empty.jsonl"
expect_fail 1 "^moe-eval: $TMP/empty.jsonl: perplexity: no sample has 2 or more tokens$" \
    moe-eval -m $M --ppl "$TMP/empty.jsonl"

# the search tools: what their input lacks names the input
: | moe-tokenize --model $M -o "$TMP/none.msgpack.zst" - || fail "an empty token stream"
expect_fail 1 "^moe-calib: $TMP/none.msgpack.zst: no token sequences in the input" \
    moe-calib --model $M "$TMP/none.msgpack.zst"
expect_fail 1 "^moe-calib: <stdin>: no token sequences in the input" \
    sh -c "moe-calib --model $M - <'$TMP/none.msgpack.zst'"

# moe-tokenize --decode: ids that are not int32 name the file, record and key
"$PY" - "$TMP" <<'PYEOF' || fail "writing the streams"
import struct, sys
sys.path.insert(0, "tests/shell")
from stream_py import write
t = sys.argv[1]
H = {"format": "moe-stream", "version": 1, "kinds": ["tokens", "calib", "ranking", "plan"], "provenance": []}
ok = {"type": "tokens", "index": 0, "ids": {"dtype": "i32", "shape": [1], "data": struct.pack("<i", 5)}}
write(t + "/wide.msgpack.zst", [ok, {"type": "tokens", "index": 1,
      "ids": {"dtype": "i64", "shape": [2], "data": struct.pack("<2q", 1, 2 ** 40)}}], header=H)
write(t + "/float.msgpack.zst", [{"type": "tokens", "index": 0,
      "ids": {"dtype": "f32", "shape": [1], "data": struct.pack("<f", 5)}}], header=H)
write(t + "/order.msgpack.zst", [{"type": "plan", "experts": 2, "layers": 2,
      "order": {"dtype": "i64", "shape": [1], "data": struct.pack("<q", 2 ** 40)}}], header=H)
PYEOF
expect_fail 1 "^moe-tokenize: $TMP/wide.msgpack.zst: record 1: key 'ids': typed array value 1099511627776 does not fit in int32$" \
    moe-tokenize -m $M --decode "$TMP/wide.msgpack.zst"
expect_fail 1 "^moe-tokenize: $TMP/float.msgpack.zst: record 0: key 'ids': typed array of f32 where integers are expected$" \
    moe-tokenize -m $M --decode "$TMP/float.msgpack.zst"
# moe-dump --cdmoe-json: the same for a plan's order
expect_fail 1 "^moe-dump: $TMP/order.msgpack.zst: record 0: key 'order': typed array value 1099511627776 does not fit in int32$" \
    moe-dump --cdmoe-json order "$TMP/order.msgpack.zst"

# moe-condense: what the plan lacks, named by where it came from
expect_fail 1 "^moe-condense: $S/calib.msgpack.zst: no layer order \(run moe-layer-search" \
    moe-condense --model $M --layers 1 --experts 1 -o "$TMP/c" $S/calib.msgpack.zst
expect_fail 1 "^moe-condense: <stdin>: no layer order" \
    moe-condense --model $M --layers 1 --experts 1 -o "$TMP/c" - <$S/ranking.msgpack.zst
expect_fail 1 "^moe-condense: $S/plan.msgpack.zst: 3 layers asked for, but the layer order has only 2$" \
    moe-condense --model $M --layers 3 --experts 1 -o "$TMP/c" $S/plan.msgpack.zst
echo '[0]' >"$TMP/order.json"
expect_fail 1 "^moe-condense: $TMP/order.json: layer [0-9]+: 1 experts asked for, but it has no expert ranking" \
    moe-condense --model $M --layers 1 --experts 1 -o "$TMP/c" --cdmoe-order "$TMP/order.json"
[ ! -e "$TMP/c" ] || fail "a failed moe-condense left its output"
echo "messages name their files"
