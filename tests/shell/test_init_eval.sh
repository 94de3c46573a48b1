# moe-init checkpoints of every architecture (bf16, sharded too) through
# moe-eval --dump in a pipe, checked against the PyTorch reference forward.
. tests/shell/lib.sh
PY=$(find_python) || skip "python3 with msgpack and zstandard not found"
$PY -c 'import torch, transformers, safetensors' 2>/dev/null || skip "torch/transformers not installed"
command -v moe-init >/dev/null || skip "moe-init not built"
pairs=
for arch in deepseek qwen2_moe qwen3_moe olmoe mixtral; do
    extra=
    [ $arch = qwen2_moe ] && extra="--shard-size 40K"
    moe-init --quiet --arch $arch --hidden 32 --layers 2 --experts 8 --top-k 2 --vocab 300 \
        --std 0.15 --norm-std 0.1 --bias-std 0.1 --seed 11 $extra -o "$TMP/$arch" \
        || fail "moe-init $arch"
    $PY tests/shell/hf_check.py tokens "$TMP/$arch" "$TMP/tok.zst" || fail "tokens"
    cat "$TMP/tok.zst" | moe-eval -m "$TMP/$arch" -d hidden,logits | cat >"$TMP/$arch.zst" \
        || fail "moe-eval $arch"
    pairs="$pairs $TMP/$arch $TMP/$arch.zst"
done
ls "$TMP/qwen2_moe" | grep -q "model-00001-of" || fail "qwen2_moe checkpoint not sharded"
# shellcheck disable=SC2086
$PY tests/shell/hf_check.py check $pairs 2>/dev/null || fail "moe-eval differs from PyTorch"
exit 0
