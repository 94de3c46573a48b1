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

# truncation at the tool level
head -c 20 "$TMP/m2.msgpack.zst" >"$TMP/trunc"
expect_fail 1 "trunc: truncated stream" moe-dump "$TMP/trunc"

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
