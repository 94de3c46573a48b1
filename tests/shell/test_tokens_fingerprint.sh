# Token streams name the tokenizer that made them (the SHA-256 of its
# tokenizer.json); the tools that run a model refuse tokens from another
# tokenizer unless given --force, and accept streams without a fingerprint.
. tests/shell/lib.sh
model=tests/fixtures/eval/model
printf '{"text": "the quick brown fox"}\n{"text": "jumps over the lazy dog"}\n' >"$TMP/t.jsonl"
# the same vocabulary, another tokenizer.json (one more byte)
cp -r "$model" "$TMP/m2"
echo >>"$TMP/m2/tokenizer.json"
moe-tokenize --model "$model" -o "$TMP/own" "$TMP/t.jsonl" || fail "tokenize"
moe-tokenize --model "$TMP/m2" -o "$TMP/other" "$TMP/t.jsonl" || fail "tokenize with the other tokenizer"

# the fingerprint is the SHA-256 of tokenizer.json, in every tokens record
fp=$(sha256sum "$model/tokenizer.json" | cut -d' ' -f1)
[ "$(moe-dump --type tokens "$TMP/own" | grep -c "\"tokenizer\":\"$fp\"")" = 2 ] \
    || fail "tokens records lack the fingerprint $fp: $(moe-dump --type tokens "$TMP/own")"

mismatch="other(-calib)?: record 0: tokens were made with tokenizer [0-9a-f]{64}, but this model's tokenizer.json is $fp; use --force"
expect_fail 1 "moe-calib: .*$mismatch" moe-calib --model "$model" "$TMP/other"
expect_fail 1 "moe-eval: .*$mismatch" moe-eval --model "$model" --ppl "$TMP/other"
expect_fail 1 "moe-eval: .*$mismatch" moe-eval --model "$model" --dump hidden "$TMP/other"
moe-calib --model "$model" --force "$TMP/other" >"$TMP/other-calib" 2>"$TMP/err" || fail "calib --force: $(cat "$TMP/err")"
grep -q "warning: .*other: record 0: tokens were made with tokenizer .*(continuing: --force)" "$TMP/err" \
    || fail "no warning with --force: $(cat "$TMP/err")"
expect_fail 1 "moe-expert-rank: .*$mismatch" moe-expert-rank --model "$model" --max-experts 1 "$TMP/other-calib"
moe-expert-rank --model "$model" --max-experts 1 --force "$TMP/other-calib" >/dev/null 2>&1 || fail "rank --force"
moe-eval --model "$model" --force --ppl "$TMP/other" >/dev/null 2>&1 || fail "eval --ppl --force"

# the tokenizer's own tokens pass; so do streams without a fingerprint (ids
# made elsewhere, streams older than the key); decoding checks nothing
moe-calib --model "$model" "$TMP/own" >/dev/null 2>&1 || fail "calib on its own tokens"
moe-eval --model "$model" --ppl "$TMP/own" >/dev/null || fail "eval on its own tokens"
printf '[5, 6, 7]\n' | moe-tokenize --model "$TMP/m2" --ids >"$TMP/ids" || fail "tokenize --ids"
moe-dump --type tokens "$TMP/ids" | grep -q '"tokenizer"' && fail "--ids tokens should carry no fingerprint"
moe-calib --model "$model" "$TMP/ids" >/dev/null 2>&1 || fail "calib on tokens without a fingerprint"
moe-calib --model "$model" tests/fixtures/search/deepseek-l5/tokens.msgpack.zst >/dev/null 2>&1 \
    || fail "calib on a stream made before the fingerprint"
moe-tokenize --model "$model" --decode "$TMP/other" >/dev/null || fail "decode"
exit 0
