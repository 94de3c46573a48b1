# Streams made to hurt a reader (issue 14): a typed array whose byte size
# wraps around 2^64, a zstd bomb (a few KB that decompress to hundreds of MB),
# a list declaring hundreds of millions of elements.  Every tool refuses them
# with one line naming the stream and the record, exits 1, and never needs
# more memory than the record limit: the runs below have a virtual-memory
# limit (ulimit -v) that an unbounded allocation would hit.
. tests/shell/lib.sh
PY=$(find_python) || skip "no python3 with msgpack and zstandard (make deps installs Debian's)"
S=tests/shell/stream_py.py
# AddressSanitizer reserves terabytes of address space and cannot start under
# ulimit -v: in a sanitizer build (make SAN=1) the refusals are still checked,
# the memory bounds are not
if ldd "$(command -v moe-dump)" 2>/dev/null | grep -q libasan; then
    vlimit() { :; }; vlimit_cmd() { :; }; san=1; echo "note: sanitizer build: memory limits not applied"
else
    vlimit() { ulimit -v "$1"; }; vlimit_cmd() { echo "ulimit -v $1;"; }; san=0
fi
M=tests/fixtures/models/qwen3_moe-f32

# each tool that reads a token stream: moe-dump (plain, --check, --header,
# --cdmoe-json), moe-merge, moe-calib, moe-tokenize --decode, moe-eval --dump
readers() { # FILE: run every reader on FILE, each must fail with exit 1 and PATTERN
    f=$1 pattern=$2
    for cmd in "moe-dump" "moe-dump --check" "moe-dump --header" "moe-dump --cdmoe-json order" \
               "moe-merge -o $TMP/merged.zst" "moe-calib --model $M -o $TMP/calib.zst" \
               "moe-tokenize --model tests/fixtures/tokenizer/synth-split --decode -o $TMP/text.jsonl" "moe-eval --model $M --dump logits -o $TMP/d.zst" \
               "moe-condense --model $M --layers 1 --experts 1 -o $TMP/cond"; do
        # shellcheck disable=SC2086
        expect_fail 1 "$pattern" sh -c "$(vlimit_cmd 1500000) exec $cmd \"\$0\"" "$f"
    done
    [ ! -e "$TMP/merged.zst" ] && [ ! -e "$TMP/calib.zst" ] && [ ! -e "$TMP/text.jsonl" ] \
        && [ ! -e "$TMP/d.zst" ] && [ ! -e "$TMP/cond" ] || fail "an output was left behind for $f"
}

# shape [2^40, 2^22] of i32 = 2^64 bytes, which wrapped to 0 and matched no data
$PY $S hostile wrap "$TMP/wrap.zst" || fail "python writer"
readers "$TMP/wrap.zst" "wrap.zst: record 0: .*shape too large"

# 1.1 GiB of zeros in one record (about 40 KB of zstd): over the default
# 1024 MiB limit, refused as soon as its size is declared
$PY $S hostile bomb "$TMP/bomb.zst" 1100 || fail "python writer"
[ "$(wc -c <"$TMP/bomb.zst")" -lt 200000 ] || fail "the bomb is not small"
readers "$TMP/bomb.zst" "bomb.zst: record 0 needs more than 1024 MiB of memory"

# a list declaring 300 Mi elements (msgpack-c would allocate 7 GB for them)
$PY $S hostile arraybomb "$TMP/abomb.zst" 300 || fail "python writer"
readers "$TMP/abomb.zst" "abomb.zst: record 0 needs more than 1024 MiB"

# the limit is MOE_MAX_RECORD_MIB: 200 MiB of zeros pass with the default and
# are refused at 100; memory stays near the record's size (moe-merge once
# kept three copies of every record)
$PY $S hostile bomb "$TMP/b200.zst" 200 || fail "python writer"
(vlimit 900000; moe-dump --check "$TMP/b200.zst") >"$TMP/out" || fail "a 200 MiB record under the limit"
(vlimit 900000; moe-merge "$TMP/b200.zst" "$TMP/b200.zst" >"$TMP/m.zst") || fail "merge in bounded memory"
moe-dump --check "$TMP/m.zst" | grep -q ": ok, 1 records" || fail "merge did not join the duplicates"
MOE_MAX_RECORD_MIB=100 expect_fail 1 "b200.zst: record 0 needs more than 100 MiB" moe-dump --check "$TMP/b200.zst"

# with the limit raised past what memory allows, an allocation fails: still
# a message naming the stream and exit 1, never an abort (status 134)
for cmd in "moe-dump --check" "moe-merge" "moe-calib --quiet --model $M"; do
    [ $san = 1 ] && break
    MOE_MAX_RECORD_MIB=4096 expect_fail 1 "bomb.zst: out of memory|out of memory" \
        sh -c "ulimit -v 600000; exec $cmd \"\$0\" >/dev/null" "$TMP/bomb.zst"
done

# moe-eval --dump checks each record against the limit before allocating it
# (a huge vocabulary once asked for 34 GB and aborted): 1100 tokens of logits
# over 256 ids are 1.1 MB, over a 1 MiB limit
$PY - "$TMP/long.zst" <<'PYEOF' || fail "python writer"
import sys, struct, msgpack, zstandard
raw = msgpack.packb({"format": "moe-stream", "version": 1, "kinds": ["tokens"], "provenance": []})
raw += msgpack.packb({"type": "tokens", "index": 0, "ids": {"dtype": "i32", "shape": [1100], "data": struct.pack("<1100i", *([5] * 1100))}})
raw += msgpack.packb({"type": "end", "records": 1})
open(sys.argv[1], "wb").write(zstandard.ZstdCompressor(write_checksum=True).compress(raw))
PYEOF
MOE_MAX_RECORD_MIB=1 expect_fail 1 "long.zst: record 0: the dump of its 1100 tokens would be [0-9.]+ MiB, more than the 1 MiB" \
    moe-eval --model $M --dump logits -o "$TMP/d.zst" "$TMP/long.zst"
[ ! -e "$TMP/d.zst" ] || fail "a refused dump left its output"
MOE_MAX_RECORD_MIB=1 moe-eval --model $M --dump logits --max-length 1000 "$TMP/long.zst" | moe-dump --check - \
    | grep -q "ok, 2 records" || fail "a dump within the limit"
exit 0
