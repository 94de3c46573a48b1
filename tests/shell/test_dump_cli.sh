# Tool-level behaviour that needs no Python: bad input files, pipes, terminals.
. tests/shell/lib.sh

printf '' >"$TMP/empty"
expect_fail 1 "empty: empty input" moe-dump "$TMP/empty"
expect_fail 1 "<stdin>: empty input" moe-dump - </dev/null
printf 'hello' >"$TMP/plain"
expect_fail 1 "plain: not a moe-stream \(not zstd-compressed\)" moe-dump "$TMP/plain"
expect_fail 3 "nonexistent: No such file" moe-dump "$TMP/nonexistent"
printf 'not msgpack at all' | zstd -q -c >"$TMP/nonmp.zst"
expect_fail 1 "nonmp.zst: not a moe-stream" moe-dump "$TMP/nonmp.zst"

# make a valid stream with our own writer (merge of nothing but a header is not
# possible, so build one from a zstd'ed msgpack written by printf)
# header {"format":"moe-stream","version":1,"kinds":[],"provenance":[]} + end {"type":"end","records":0}
printf '\204\246format\252moe-stream\247version\001\245kinds\220\252provenance\220\202\244type\243end\247records\000' \
    | zstd -q -c >"$TMP/min.msgpack.zst"
moe-dump --check "$TMP/min.msgpack.zst" | grep -q "ok, 0 records" || fail "minimal stream not accepted"
moe-merge "$TMP/min.msgpack.zst" "$TMP/min.msgpack.zst" >"$TMP/m2.msgpack.zst" || fail "merge"
moe-dump --header "$TMP/m2.msgpack.zst" | grep -q '"tool":"moe-merge"' || fail "provenance not appended"

# moe-merge writes a record shared by several inputs once, and keeps the rest
# in input order (3000 records each: the set must not be quadratic to pass quickly)
TK=tests/fixtures/tokenizer/synth-split
awk 'BEGIN { for (i = 0; i < 3000; i++) printf "[%d,%d]\n", i % 50, (i * 7) % 50 }' >"$TMP/ida"
awk 'BEGIN { for (i = 0; i < 3000; i++) printf "[%d,%d,1]\n", (i * 7) % 50, i % 50 }' >"$TMP/idb"
moe-tokenize --model $TK --ids "$TMP/ida" -o "$TMP/ta" || fail "tokenize a"
moe-tokenize --model $TK --ids "$TMP/idb" -o "$TMP/tb" || fail "tokenize b"
moe-merge "$TMP/ta" "$TMP/tb" "$TMP/ta" "$TMP/tb" -o "$TMP/tab" || fail "merge a b a b"
moe-dump --check "$TMP/tab" | grep -q "ok, 6000 records" || fail "merge a b a b: $(moe-dump --check "$TMP/tab")"
moe-dump --type tokens "$TMP/tab" | sed -n 3002p >"$TMP/first_b"
moe-dump --type tokens "$TMP/tb" | sed -n 2p >"$TMP/tb1"
cmp -s "$TMP/first_b" "$TMP/tb1" || fail "merged records out of input order"

# truncation at the tool level
head -c 20 "$TMP/m2.msgpack.zst" >"$TMP/trunc"
expect_fail 1 "trunc: truncated stream" moe-dump "$TMP/trunc"
# --header verifies the whole stream as every mode does (issue 14: a stream
# cut to half passed --header and --check --header with exit 0)
head -c $(( $(wc -c <"$TMP/tab") / 2 )) "$TMP/tab" >"$TMP/half"
expect_fail 1 "half: truncated stream" moe-dump --header "$TMP/half"
expect_fail 1 "half: truncated stream" moe-dump --check --header "$TMP/half"
moe-dump --check --header "$TMP/tab" | grep -q "ok, 6000 records" || fail "--check --header"

# a terminal as the output of a binary stream is refused
if command -v script >/dev/null 2>&1; then
    script -qec "$BIN/moe-merge $TMP/min.msgpack.zst; echo rc=\$?" /dev/null >"$TMP/tty" 2>&1
    grep -q "refusing to write a binary stream to a terminal" "$TMP/tty" || fail "tty not refused: $(cat "$TMP/tty")"
    grep -q "rc=3" "$TMP/tty" || fail "tty refusal exit status: $(cat "$TMP/tty")"
else
    echo "note: script(1) absent, terminal refusal not tested"
fi

# writing to a full disk fails loudly
if [ -w /dev/full ]; then
    moe-merge "$TMP/min.msgpack.zst" >/dev/full 2>"$TMP/err" && fail "write to /dev/full succeeded"
    grep -q "write error" "$TMP/err" || fail "no write error message"
fi

# moe-dump | head: no noise on a closed pipe
moe-merge "$TMP/min.msgpack.zst" >"$TMP/a.msgpack.zst"
i=0; while [ $i -lt 30 ]; do set -- "$@" "$TMP/a.msgpack.zst"; i=$((i+1)); done
moe-dump "$@" 2>"$TMP/err" | head -n 1 >/dev/null
[ -s "$TMP/err" ] && fail "noise on a closed pipe: $(cat "$TMP/err")"
exit 0
