# The search tools with --device cuda on the tiny models (run by
# `make test-gpu`; skips where no GPU is usable): moe-calib | moe-expert-rank
# | moe-layer-search give the Python reference's picks (the same expected.txt
# the CPU run matches, tests/shell/test_search_tools.sh) with FP32 GEMMs
# (--precision f32), run to the end with --precision bf16 (the default), and
# moe-eval's perplexity agrees with the CPU's.  CDMOE_GPU_TOOLS_MODELS (names
# under tests/fixtures/search) narrows the model list (the quick emulated run
# of `make test`).
. tests/shell/lib.sh
FX=tests/fixtures/search
[ -x "$BIN/moe-calib" ] || skip "moe-calib not built"

# a GPU, or skip (exit 4 naming the reason)
rc=0
moe-calib --quiet --device cuda --model "$FX/models/deepseek-l5" "$FX/deepseek-l5/tokens.msgpack.zst" \
    >"$TMP/probe" 2>"$TMP/err" || rc=$?
if [ $rc -eq 4 ] && grep -q "no usable CUDA device\|no CUDA backend" "$TMP/err"; then
    skip "no CUDA device ($(cat "$TMP/err"))"
fi
[ $rc -eq 0 ] || fail "moe-calib --device cuda exited $rc: $(cat "$TMP/err")"
# without --quiet, the summary line says how much device memory the run took
moe-calib --device cuda --model "$FX/models/deepseek-l5" "$FX/deepseek-l5/tokens.msgpack.zst" \
    >"$TMP/probe" 2>"$TMP/err" || fail "moe-calib --device cuda (not quiet): $(cat "$TMP/err")"
grep -q "device peak [0-9.]* GiB" "$TMP/err" || fail "no device peak in the summary: $(cat "$TMP/err")"
moe-calib --device cpu --model "$FX/models/deepseek-l5" "$FX/deepseek-l5/tokens.msgpack.zst" \
    >"$TMP/probe" 2>"$TMP/err" || fail "moe-calib --device cpu: $(cat "$TMP/err")"
grep -q "device peak" "$TMP/err" && fail "a CPU run reports a device peak: $(cat "$TMP/err")"

picks() {
    moe-dump --full --no-header --type ranking --type plan "$1" | sed -n \
        -e 's/^{"type":"ranking","layer":\([0-9]*\),.*"experts":{[^}]*"data":\[\([^]]*\)\].*/ranking \1: \2/p' \
        -e 's/^{"type":"plan","experts":\([0-9]*\),.*"order":{[^}]*"data":\[\([^]]*\)\].*/plan \1: \2/p' \
        | tr ',' ' '
}

for prec in f32 bf16; do
    for name in ${CDMOE_GPU_TOOLS_MODELS:-deepseek qwen2_moe qwen3_moe olmoe mixtral deepseek-l5}; do
        d=$FX/$name
        model=$(sed -n 's/.*"model": "\(.*\)".*/\1/p' "$d/params.json")
        k=$(sed -n 's/.*"top_k": \([0-9]*\).*/\1/p' "$d/params.json")
        moe-calib --quiet --device cuda --precision $prec --model "$model" "$d/tokens.msgpack.zst" >"$TMP/calib" 2>"$TMP/err" \
            || fail "$name ($prec): moe-calib: $(cat "$TMP/err")"
        moe-expert-rank --quiet --device cuda --precision $prec --model "$model" --max-length 16 "$TMP/calib" >"$TMP/rank" \
            2>"$TMP/err" || fail "$name ($prec): moe-expert-rank: $(cat "$TMP/err")"
        moe-layer-search --quiet --device cuda --precision $prec --model "$model" --experts 0 --max-length 16 "$TMP/rank" \
            >"$TMP/p0" 2>"$TMP/err" || fail "$name ($prec): moe-layer-search --experts 0: $(cat "$TMP/err")"
        moe-layer-search --quiet --device cuda --precision $prec --model "$model" --experts "$k" --max-length 16 "$TMP/p0" \
            >"$TMP/pk" 2>"$TMP/err" || fail "$name ($prec): moe-layer-search --experts $k: $(cat "$TMP/err")"
        if [ $prec = f32 ]; then
            picks "$TMP/pk" >"$TMP/got"
            diff "$d/expected.txt" "$TMP/got" >"$TMP/diff" ||
                fail "$name (cuda, f32) differs from the reference: $(cat "$TMP/diff")"
        fi
        echo "ok $name ($prec)"
    done
done

# perplexity, cuda (bf16) vs cpu
d=$FX/deepseek-l5
model=$FX/models/deepseek-l5
ppl() { moe-eval --device "$1" --model $model --ppl "$d/tokens.msgpack.zst" --json 2>"$TMP/err" |
    sed -n 's/.*"ppl": {"ppl": \([0-9.e+-]*\).*/\1/p'; }
a=$(ppl cpu) || fail "moe-eval cpu: $(cat "$TMP/err")"
b=$(ppl cuda) || fail "moe-eval cuda: $(cat "$TMP/err")"
[ -n "$a" ] && [ -n "$b" ] || fail "no perplexity (cpu '$a', cuda '$b')"
awk -v a="$a" -v b="$b" 'BEGIN { r = (a - b) / a; if (r < 0) r = -r; exit !(r < 1e-2) }' ||
    fail "perplexity cuda $b vs cpu $a"
echo "ok moe-eval ppl cpu $a cuda $b"

# multiple choice with prefix sharing on the device: the log-likelihoods agree
# with the device's own whole-sequence path (within 1e-5) and with the CPU's
# (within 1e-2, as the perplexity above)
E=tests/fixtures/eval
for dev in cpu "cuda" "cuda --no-prefix-cache"; do
    # shellcheck disable=SC2086
    MOE_CUDA_PRECISION=f32 moe-eval --quiet --device $dev --model $E/model --task $E/tiny_task.jsonl \
        --task $E/formats/hellaswag/hellaswag_tiny.txt --no-provenance -o - 2>"$TMP/err" |
        moe-dump --full --no-header --type task - >"$TMP/mc_$(echo $dev | tr -dc a-z)" ||
        fail "moe-eval --device $dev --task: $(cat "$TMP/err")"
done
python3 - "$TMP/mc_cpu" "$TMP/mc_cuda" "$TMP/mc_cudanoprefixcache" <<'EOF' || fail "device prefix sharing"
import json, struct, sys
def ll(p):
    out = []
    for line in open(p):
        d = json.loads(line)["loglik"]["data"]
        out += d if isinstance(d, list) else []
    return out
a, b, c = (ll(p) for p in sys.argv[1:4])
assert a and len(a) == len(b) == len(c), (len(a), len(b), len(c))
for x, y, z in zip(a, b, c):
    assert abs(x - y) <= 1e-2 * max(1, abs(x)) and abs(y - z) <= 1e-5 * max(1, abs(y)), (x, y, z)
EOF
echo "ok moe-eval tasks cuda (prefix sharing) vs cpu"
