# --device: "cuda" where no GPU is usable (or the build has none) is a device
# error, exit 4, one line naming cuda; never a silent fallback to the CPU.
# An unknown device is a usage error.  On a machine with a GPU, --device cuda
# must get past device selection (checked by the GPU tests; skipped here).
. tests/shell/lib.sh
d=tests/fixtures/models/mixtral-bf16
[ -x "$BIN/moe-eval" ] || skip "moe-eval not built"
expect_fail 2 "--device: expected cpu or cuda" moe-eval --device tpu -m "$d" -d logits /dev/null
rc=0
moe-eval --device cuda -m "$d" -d logits /dev/null -o "$TMP/o" >"$TMP/out" 2>"$TMP/err" || rc=$?
if [ $rc -eq 4 ]; then
    grep -q "cuda" "$TMP/err" || fail "exit 4 without naming cuda: $(cat "$TMP/err")"
    [ "$(wc -l <"$TMP/err")" -eq 1 ] || fail "more than one error line: $(cat "$TMP/err")"
    [ ! -e "$TMP/o" ] || fail "an output was left behind"
    # the CPU still works with the same build
    expect_fail 1 "empty input" moe-eval --device cpu -m "$d" -d logits /dev/null
    exit 0
fi
[ $rc -eq 1 ] && grep -q "empty input" "$TMP/err" && skip "a usable GPU is present (device selection passed)"
fail "moe-eval --device cuda exited $rc: $(cat "$TMP/err")"
