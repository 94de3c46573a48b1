# moe-eval --dump through a pipe against the golden outputs of the Python
# references; batching and thread count do not change a byte; bad input.
. tests/shell/lib.sh
PY=$(find_python) || skip "python3 with msgpack and zstandard not found"
FIX=tests/fixtures/models

for arch in deepseek qwen2_moe qwen3_moe olmoe mixtral; do
    for dt in f32 bf16; do
        d=$FIX/$arch-$dt
        $PY tests/shell/eval_dump_py.py tokens "$d" "$TMP/tok.zst" || fail "making tokens"
        cat "$TMP/tok.zst" | moe-eval --model "$d" --dump hidden,logits - >"$TMP/out.zst" \
            || fail "$arch-$dt: moe-eval failed"
        $PY tests/shell/eval_dump_py.py check "$d" "$TMP/out.zst" || fail "$arch-$dt: dump differs"
    done
done

# batching (layer-major over several sequences) and threads change nothing
d=$FIX/qwen3_moe-bf16
$PY tests/shell/eval_dump_py.py tokens "$d" "$TMP/tok.zst"
moe-eval -m "$d" -d hidden,logits --no-provenance --threads 1 "$TMP/tok.zst" -o "$TMP/a.zst" || fail "threads 1"
moe-eval -m "$d" -d hidden,logits --no-provenance --threads 2 --batch-tokens 1 "$TMP/tok.zst" -o "$TMP/b.zst" \
    || fail "threads 2"
cmp -s "$TMP/a.zst" "$TMP/b.zst" || fail "output depends on --threads / --batch-tokens"
moe-eval -m "$d" -d logits --max-length 3 "$TMP/tok.zst" | moe-dump --type dump \
    | grep -q '"shape":\[3,256\]' || fail "--max-length / logits-only"

# errors
expect_fail 2 "model DIR is required" moe-eval --dump hidden "$TMP/tok.zst"
expect_fail 2 "unknown item 'attn'" moe-eval -m "$d" --dump hidden,attn "$TMP/tok.zst"
expect_fail 3 "nonexistent" moe-eval -m "$TMP/nonexistent" -d hidden "$TMP/tok.zst"
$PY tests/shell/eval_dump_py.py tokens "$d" "$TMP/calib.zst" calib
expect_fail 1 "'tokens' is needed" moe-eval -m "$d" -d hidden "$TMP/calib.zst"
$PY - "$TMP/bad.zst" <<'PYEOF'
import sys, msgpack, zstandard, struct
raw = msgpack.packb({"format": "moe-stream", "version": 1, "kinds": ["tokens"], "provenance": []})
raw += msgpack.packb({"type": "tokens", "index": 0, "ids": {"dtype": "i32", "shape": [2], "data": struct.pack("<2i", 5, 999)}})
raw += msgpack.packb({"type": "end", "records": 1})
open(sys.argv[1], "wb").write(zstandard.ZstdCompressor(write_checksum=True).compress(raw))
PYEOF
expect_fail 1 "token id 999" moe-eval -m "$d" -d hidden "$TMP/bad.zst"
exit 0
