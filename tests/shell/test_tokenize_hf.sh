#!/bin/sh
# moe-tokenize against Hugging Face `tokenizers`: golden vectors of the DeepSeek-LLM
# (DeepSeekMoE) tokenizer rebuilt from llama.cpp's GGUF, llama.cpp's own vectors for
# deepseek-llm and deepseek-coder, and (when the `tokenizers` package is installed) a seeded
# random-text comparison on every real tokenizer.json in ../shared and on moe-init's.
. tests/shell/lib.sh
S=${CDMOE_SHARED:-../shared}
V=$S/data/tokenizers/llama.cpp-vocab
[ -f "$V/ggml-vocab-deepseek-llm.gguf" ] || skip "$V/ggml-vocab-deepseek-llm.gguf absent (../shared absent)"
PY=$(find_python) || skip "no python3 with msgpack and zstandard"
for v in deepseek-llm deepseek-coder; do
    "$PY" tests/ref/gguf_to_tokenizer_json.py "$V/ggml-vocab-$v.gguf" "$TMP/$v" || fail "cannot rebuild $v"
    "$PY" tests/shell/tokenizer_check.py vectors "$BIN" "$TMP/$v" "$V/ggml-vocab-$v.gguf.inp" \
        "$V/ggml-vocab-$v.gguf.out" || fail "$v: llama.cpp vectors differ"
done
"$PY" tests/shell/tokenizer_check.py golden "$BIN" "$TMP/deepseek-llm" tests/fixtures/tokenizer/texts.jsonl \
    tests/fixtures/tokenizer/golden-deepseek-llm.jsonl || fail "deepseek-llm: golden vectors differ"
if "$PY" -c 'import tokenizers' 2>/dev/null; then
    for m in gpt2 qwen3 deepseek-v3; do
        [ -f "$S/data/tokenizers/$m/tokenizer.json" ] || continue
        "$PY" tests/ref/tokenizer_fuzz.py "$BIN" "$S/data/tokenizers/$m" 1500 2026 || fail "$m: differs from HF"
    done
    "$PY" tests/ref/tokenizer_fuzz.py "$BIN" "$TMP/deepseek-llm" 1500 2026 || fail "deepseek-llm: differs from HF"
    "$BIN/moe-init" --arch qwen3_moe --seed 3 --vocab 700 -o "$TMP/mi" >/dev/null || fail "moe-init"
    "$PY" tests/ref/tokenizer_fuzz.py "$BIN" "$TMP/mi" 1500 2026 || fail "moe-init's tokenizer: differs from HF"
else
    echo "note: python package 'tokenizers' absent; random-text comparison not run"
fi
exit 0
