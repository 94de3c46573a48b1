# Streams written by stock Python msgpack+zstandard are read by moe-dump and
# moe-merge; streams written by our library are read back by Python.
. tests/shell/lib.sh
PY=$(find_python) || skip "no python3 with msgpack and zstandard (make deps installs Debian's)"
S=tests/shell/stream_py.py

$PY $S write "$TMP/py.msgpack.zst" || fail "python writer"
moe-dump "$TMP/py.msgpack.zst" >"$TMP/dump.jsonl" || fail "moe-dump of a python stream"
[ "$(wc -l <"$TMP/dump.jsonl")" -eq 7 ] || fail "expected header + 6 lines, got $(wc -l <"$TMP/dump.jsonl")"
# JSON is valid and the summaries are right
$PY - "$TMP/dump.jsonl" <<'PYEOF' || fail "dump content"
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
h, recs = lines[0], lines[1:]
assert h["format"] == "moe-stream" and h["kinds"] == ["test"], h
r3 = recs[3]
assert r3["values"]["shape"] == [1000] and r3["values"]["first"][:2] == [3.0, 3.25], r3["values"]
assert r3["values"]["min"] == 3.0 and r3["values"]["max"] == 3 + 999 * 0.25
assert r3["ids"]["shape"] == [1, 1000] and r3["ids"]["first"][0] == -3
assert recs[0]["note"] == "caf\u00e9 \U0001F600 \"q\"\n"
assert recs[5]["wide"]["first"] == [-(2**40), 2**40], recs[5]
assert recs[5]["half"]["first"] == [1.5, -2.0]
PYEOF
moe-dump --full --type other --no-header "$TMP/py.msgpack.zst" | grep -q '"data":\[-1099511627776,1099511627776\]' \
    || fail "--full/--type"
moe-dump --check "$TMP/py.msgpack.zst" | grep -qx "$TMP/py.msgpack.zst: ok, 6 records, kinds \[test\]" || fail "--check"

# our writer -> python reader (through a pipe and through a file)
cat "$TMP/py.msgpack.zst" | moe-merge - >"$TMP/ours.msgpack.zst" || fail "moe-merge from a pipe"
$PY $S read "$TMP/ours.msgpack.zst" | grep -q "^ok 6 records, kinds test tools stream_py,moe-merge" \
    || fail "python cannot read our stream"
moe-merge - <"$TMP/py.msgpack.zst" >"$TMP/ours2.msgpack.zst" || fail "moe-merge from a file"
cmp -s "$TMP/ours.msgpack.zst" "$TMP/ours2.msgpack.zst" || fail "pipe and file inputs give different outputs"
moe-merge --no-provenance -o "$TMP/o1" "$TMP/py.msgpack.zst" || fail "moe-merge -o"
moe-merge --no-provenance "$TMP/py.msgpack.zst" >"$TMP/o2" || fail "moe-merge to stdout"
cmp -s "$TMP/o1" "$TMP/o2" || fail "-o and stdout outputs differ"
ls -A "$TMP" | grep -q '\.tmp\.' && fail "temporary file left behind"

# bad inputs, at the tool level: one line naming the file, exit 1
for kind in format version noend count notype shape nonmsgpack; do
    $PY $S bad $kind "$TMP/bad-$kind" || fail "python bad $kind"
done
expect_fail 1 "bad-format: not a moe-stream \(format 'not-moe'\)" moe-dump "$TMP/bad-format"
expect_fail 1 "bad-version: stream version 99 is not supported" moe-dump "$TMP/bad-version"
expect_fail 1 "bad-noend: truncated stream \(no end record after 2 records\)" moe-dump "$TMP/bad-noend"
expect_fail 1 "bad-count: end record counts 7 records but 2 were read" moe-dump --check "$TMP/bad-count"
expect_fail 1 "bad-notype: record 0: not a map with a 'type' string" moe-dump "$TMP/bad-notype"
expect_fail 1 "bad-shape: .*data is 8 bytes but shape \[3\] of f32 needs 12" moe-merge -o "$TMP/never" "$TMP/bad-shape"
[ -e "$TMP/never" ] && fail "moe-merge left an output behind"
ls -A "$TMP" | grep -q '\.tmp\.' && fail "temporary file left behind after an error"
expect_fail 1 "bad-nonmsgpack: corrupt stream \(not valid msgpack" moe-dump "$TMP/bad-nonmsgpack"
exit 0
