# moe-tune reproduces PyTorch's 10 AdamW steps (tests/fixtures/train/README.md,
# section 2): each fixture run's per-step losses and gradient norms within 1e-4
# relative, its learning rates, and the final trained tensors within 1e-4
# (relative L2 per tensor), for the five architectures' condensed cases,
# --train-weights and --train all.
. tests/shell/lib.sh
PY=$(find_python) || skip "no python3 with msgpack and zstandard"
$PY -c 'import numpy' 2>/dev/null || skip "no numpy"
F=tests/fixtures/train
[ -f $F/adamw_data.jsonl ] || fail "fixtures $F missing"
n=0
for run in $F/adamw_*.json; do
    name=$(basename "$run" .json)
    $PY tests/shell/tune_check.py setup "$run" "$TMP/$name-model"
    # shellcheck disable=SC2046 # the run's options, word by word
    moe-tune --model "$TMP/$name-model" -o "$TMP/$name" --data $F/adamw_data.jsonl $($PY tests/shell/tune_check.py args "$run") \
        --threads 2 -q >/dev/null || fail "moe-tune $name"
    $PY tests/shell/tune_check.py check "$run" "$TMP/$name/tune.msgpack.zst" "$TMP/$name" || fail "$name"
    n=$((n + 1))
done
[ $n -eq 7 ] || fail "7 runs expected, $n found"
