# moe-generate --device cuda (make test-gpu; in `make test` on the CUDA
# emulator; skips where no GPU is usable): with FP32 GEMMs the greedy tokens
# are the CPU's, and each is the argmax of moe-eval --device cuda --dump
# logits on prompt + tokens (the device KV cache continues whole-sequence
# attention); the default BF16 precision runs to the end.
. tests/shell/lib.sh
M=tests/fixtures/eval/model
[ -x "$BIN/moe-generate" ] || skip "moe-generate not built"
rc=0
moe-generate --quiet --device cuda -m $M -n 1 hi >/dev/null 2>"$TMP/err" || rc=$?
if [ $rc -eq 4 ] && grep -q "no usable CUDA device\|no CUDA backend" "$TMP/err"; then
    skip "no CUDA device ($(cat "$TMP/err"))"
fi
[ $rc -eq 0 ] || fail "moe-generate --device cuda exited $rc: $(cat "$TMP/err")"

ids() { moe-dump --full --no-header --type tokens "$1"; }
set -- -m $M -n 6 --ignore-eos --batch 2 "Once upon a time" "The cat" "x"
moe-generate --quiet --device cpu "$@" -o "$TMP/cpu.zst" || fail "cpu run"
MOE_CUDA_PRECISION=f32 moe-generate --quiet --device cuda "$@" -o "$TMP/gpu.zst" || fail "cuda f32 run"
ids "$TMP/cpu.zst" >"$TMP/a"
ids "$TMP/gpu.zst" >"$TMP/b"
cmp -s "$TMP/a" "$TMP/b" || fail "cuda (f32) greedy tokens differ from the CPU's: $(diff "$TMP/a" "$TMP/b")"
moe-generate --quiet --device cuda "$@" >"$TMP/bf16.txt" || fail "cuda bf16 run"
[ "$(wc -l <"$TMP/bf16.txt")" -eq 3 ] || fail "cuda bf16: not 3 generations"

PY=$(find_python) || skip "python3 with msgpack and zstandard not found (device argmax check)"
$PY -c 'import numpy' 2>/dev/null || skip "python3 with numpy not found (device argmax check)"
MOE_CUDA_PRECISION=f32 moe-eval --device cuda -m $M --dump logits "$TMP/gpu.zst" -o "$TMP/d.zst" \
    || fail "moe-eval --device cuda --dump"
$PY tests/shell/generate_check.py greedy "$TMP/d.zst" 6 || fail "cuda: greedy is not the argmax"
exit 0
