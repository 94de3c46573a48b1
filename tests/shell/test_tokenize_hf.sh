#!/bin/sh
# moe-tokenize against Hugging Face `tokenizers`: golden vectors of the DeepSeek-LLM
# (DeepSeekMoE) tokenizer rebuilt from llama.cpp's GGUF, llama.cpp's own vectors for
# deepseek-llm and deepseek-coder.  The live comparison with `tokenizers` itself is
# test_tokenize_hf_live.sh.
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
exit 0
