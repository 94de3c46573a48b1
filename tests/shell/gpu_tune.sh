# moe-tune --device cuda against moe-tune on the CPU (run by `make test-gpu`,
# and on the CUDA emulator by `make test`; skips where no GPU is usable): the
# bf16 fixture models (the weights both backends compute with) condensed as
# PyTorch's AdamW fixtures are, the same 10 steps (tests/fixtures/train): the
# per-step losses and gradient norms and the float32 masters within 1e-4 with
# FP32 GEMMs (MOE_CUDA_PRECISION=f32), within 5e-2 in the default BF16
# precision; deepseek condensed with --train-weights, qwen2_moe --train all.
. tests/shell/lib.sh
PY=$(find_python) || skip "no python3 with msgpack and zstandard"
$PY -c 'import numpy' 2>/dev/null || skip "no numpy"
F=tests/fixtures/train
rc=0
moe-tune --device cuda --model tests/fixtures/models/deepseek-f32 -o "$TMP/probe" --data $F/adamw_data.jsonl \
    --train all --steps 1 -q >/dev/null 2>"$TMP/err" || rc=$?
if [ $rc -eq 4 ] && grep -q "no usable CUDA device\|no CUDA backend" "$TMP/err"; then
    skip "no CUDA device ($(cat "$TMP/err"))"
fi
[ $rc -eq 0 ] || fail "moe-tune --device cuda exited $rc: $(cat "$TMP/err")"
for name in adamw_deepseek_condensed_weights adamw_qwen2_moe_all; do
    run=$F/$name.json
    arch=${name#adamw_}; arch=${arch%%_condensed*}; arch=${arch%_all}
    m=$TMP/$name-model
    $PY tests/shell/tune_check.py setup "$run" "$m" tests/fixtures/models/$arch-bf16
    opts=$($PY tests/shell/tune_check.py args "$run")
    # shellcheck disable=SC2086 # the run's options, word by word
    moe-tune --device cpu --model "$m" -o "$TMP/$name-cpu" --data $F/adamw_data.jsonl $opts --save-state -q \
        >/dev/null || fail "$name on the CPU"
    for prec in f32 bf16; do
        tol=1e-4
        [ $prec = bf16 ] && tol=5e-2
        # the emulator is slow: one BF16 run there
        [ $prec = bf16 ] && [ $name = adamw_qwen2_moe_all ] && [ -n "${MOE_CUDA_EMU:-}" ] && continue
        # shellcheck disable=SC2086
        MOE_CUDA_PRECISION=$prec moe-tune --device cuda --model "$m" -o "$TMP/$name-$prec" \
            --data $F/adamw_data.jsonl $opts --save-state -q >/dev/null 2>"$TMP/err" \
            || fail "$name ($prec): $(cat "$TMP/err")"
        $PY tests/shell/tune_check.py compare "$TMP/$name-cpu" "$TMP/$name-$prec" $tol || fail "$name ($prec)"
    done
done
