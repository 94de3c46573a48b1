# Data-free calibration: pipelines/cd-moe.sh --self-calib N calibrates the
# built-in default on N texts the model writes itself (moe-generate --jsonl),
# kept as 00-self-calib.jsonl, and runs the stages up to the condensed
# checkpoint on them (stage 6, the evaluation, is test_pipeline.sh's); a
# resumed run reuses them; bad values are refused.
. tests/shell/lib.sh
export MAX_LENGTH=24
sh pipelines/cd-moe.sh --out "$TMP/p" --self-calib 3 --last 5 >"$TMP/log" 2>&1 || fail "pipeline: $(tail -n 20 "$TMP/log")"
j=$TMP/p/00-self-calib.jsonl
[ "$(grep -c '"text":' "$j")" -eq 3 ] || fail "3 generated texts expected: $(cat "$j")"
[ "$(sort -u "$j" | wc -l)" -eq 3 ] || fail "the generated texts repeat"
grep -q "self-calibration: 3 texts" "$TMP/log" || fail "no self-calibration step in the log"
# stage 1 tokenized exactly the generated text
moe-tokenize --model "$TMP/p/model" --max-length 24 --no-provenance "$j" -o "$TMP/t.zst"
moe-dump "$TMP/t.zst" | grep '"type":"tokens"' >"$TMP/a"
moe-dump "$TMP/p/01-tokens.msgpack.zst" | grep '"type":"tokens"' >"$TMP/b"
cmp -s "$TMP/a" "$TMP/b" || fail "stage 1 did not tokenize the self-generated text"
[ -f "$TMP/p/condensed/model.safetensors" ] || fail "no condensed checkpoint"
# a resumed run keeps the texts (same bytes) and generates nothing
cp "$j" "$TMP/kept.jsonl"
sh pipelines/cd-moe.sh --out "$TMP/p" --self-calib 3 --stage 5 --last 5 >"$TMP/log2" 2>&1 || fail "resume: $(tail "$TMP/log2")"
grep -q "self-calibration" "$TMP/log2" && fail "a resumed run generated again"
cmp -s "$j" "$TMP/kept.jsonl" || fail "the texts changed"
rc=0; sh pipelines/cd-moe.sh --out "$TMP/q" --self-calib x >/dev/null 2>"$TMP/err" || rc=$?
[ $rc -eq 2 ] && grep -q "needs a number" "$TMP/err" || fail "--self-calib x: rc $rc, $(cat "$TMP/err")"
exit 0
