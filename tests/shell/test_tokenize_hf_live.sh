#!/bin/sh
# moe-tokenize against Hugging Face `tokenizers` itself, live: seeded random texts and
# adversarial Unicode texts (tokenizer_fuzz.py, --unicode) on every real tokenizer.json in
# ../shared, on the DeepSeek-LLM tokenizer rebuilt from llama.cpp's GGUF, on moe-init's, and
# on the synthetic normal-form tokenizers.  Needs a python with tokenizers, msgpack, zstandard
# and unicodedata2 (16.0.0): $CDMOE_REF_PYTHON, else .venv-ref/bin/python (made by
# `python3 -m venv .venv-ref && .venv-ref/bin/pip install tokenizers msgpack zstandard
# unicodedata2==16.0.0`), else python3.  Skips, saying so, without one.
. tests/shell/lib.sh
S=${CDMOE_SHARED:-../shared}
PY=
for py in ${CDMOE_REF_PYTHON:-} .venv-ref/bin/python python3; do
    if [ -x "$(command -v "$py" 2>/dev/null)" ] &&
        "$py" -c 'import tokenizers, msgpack, zstandard, unicodedata2' 2>/dev/null; then
        PY=$py; break
    fi
done
[ -n "$PY" ] || skip "no python with tokenizers, msgpack, zstandard and unicodedata2 (see tests/shell/test_tokenize_hf_live.sh)"
fuzz() { # model dir
    "$PY" tests/ref/tokenizer_fuzz.py "$BIN" "$1" 1500 2026 || fail "$1: random texts differ from tokenizers"
    "$PY" tests/ref/tokenizer_fuzz.py --unicode "$BIN" "$1" 1000 2027 || fail "$1: Unicode texts differ from tokenizers"
}
for f in nfc nfkc lower; do fuzz tests/fixtures/tokenizer/synth-$f; done
"$BIN/moe-init" --arch qwen3_moe --seed 3 --vocab 700 -o "$TMP/mi" >/dev/null || fail "moe-init"
fuzz "$TMP/mi"
[ -d "$S/data/tokenizers" ] || { echo "note: $S/data/tokenizers absent: real tokenizers not compared"; exit 0; }
for m in gpt2 qwen3 deepseek-v3; do
    [ -f "$S/data/tokenizers/$m/tokenizer.json" ] && fuzz "$S/data/tokenizers/$m"
done
V=$S/data/tokenizers/llama.cpp-vocab
if [ -f "$V/ggml-vocab-deepseek-llm.gguf" ]; then
    "$PY" tests/ref/gguf_to_tokenizer_json.py "$V/ggml-vocab-deepseek-llm.gguf" "$TMP/deepseek-llm" ||
        fail "cannot rebuild deepseek-llm"
    fuzz "$TMP/deepseek-llm"
fi
exit 0
