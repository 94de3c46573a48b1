# The built-in default of `make demo` (models/default, pipelines/demo.sh): a
# trained DeepSeekMoE that the tools load, whose committed tokenizer round-trips
# the committed held-out text, whose perplexity on that text is far below
# that of the same architecture with moe-init's random weights, that reads the
# stories (story cloze well above chance), and whose experts specialise (routing
# entropy below uniform, no dead expert).  Fast: the demo itself (calibration,
# search, sweep) is not run here.
. tests/shell/lib.sh
m=models/default d=models/default/data
for f in config.json model.safetensors tokenizer.json tokenizer_config.json; do
    [ -f "$m/$f" ] || fail "$m/$f is missing"
done
for f in calib.jsonl heldout.jsonl story-cloze.jsonl NOTICE; do [ -f "$d/$f" ] || fail "$d/$f is missing"; done
grep -q "CDLA-Sharing-1.0" "$d/NOTICE" || fail "$d/NOTICE does not name the licence"
cfg() { sed -n "s/^ *\"$1\": \([^,]*\),*$/\1/p" "$m/config.json"; }
[ "$(cfg model_type)" = '"deepseek"' ] || fail "model_type $(cfg model_type)"
[ "$(cfg first_k_dense_replace)" = 1 ] || fail "first_k_dense_replace $(cfg first_k_dense_replace)"
[ "$(cfg n_shared_experts)" -ge 1 ] && [ "$(cfg n_routed_experts)" -ge 8 ] || fail "not fine-grained + shared experts"
[ "$(wc -c <"$m/model.safetensors")" -lt 8000000 ] || fail "the default model is over 8 MB"

# the tokenizer: BPE (well under one token per byte), BOS first, text back intact
moe-tokenize --model "$m" -o "$TMP/tok.zst" "$d/heldout.jsonl"
moe-dump "$TMP/tok.zst" | grep -q '"first":\[1022,' || fail "sequences do not start with BOS (1022)"
moe-tokenize --model "$m" --decode --skip-special "$TMP/tok.zst" >"$TMP/back.jsonl"
if command -v python3 >/dev/null 2>&1; then
    python3 - "$d/heldout.jsonl" "$TMP/back.jsonl" <<'PY' || fail "tokenizer round trip"
import json, sys
a = [json.loads(l)["text"] for l in open(sys.argv[1])]
b = [json.loads(l)["text"] for l in open(sys.argv[2])]
assert a == b, next((x, y) for x, y in zip(a, b) if x != y) if len(a) == len(b) else (len(a), len(b))
PY
else
    echo "note: no python3; the round trip's texts were not compared"
fi
bytes=$(wc -c <"$d/heldout.jsonl")
ntok=$(moe-dump "$TMP/tok.zst" | sed -n 's/.*"shape":\[\([0-9]*\)\].*/\1/p' | awk '{ s += $1 } END { print s }')
awk -v b="$bytes" -v t="$ntok" 'BEGIN { exit !(b / t > 2.5) }' || fail "$ntok tokens for $bytes bytes: not a trained BPE"

# perplexity on held-out text: trained vs the same shapes with random weights
ppl() { moe-eval --quiet -m "$1" --ppl "$d/heldout.jsonl" --limit 16 --json | sed -n 's/.*"ppl": {"ppl": \([0-9.eE+-]*\).*/\1/p'; }
moe-init --config "$m/config.json" --seed 7 -o "$TMP/random" --quiet
cp "$m/tokenizer.json" "$m/tokenizer_config.json" "$TMP/random/"
trained=$(ppl "$m") random=$(ppl "$TMP/random")
[ -n "$trained" ] && [ -n "$random" ] || fail "no perplexity from moe-eval"
awk -v t="$trained" -v r="$random" 'BEGIN { exit !(t < 20 && r > 500) }' \
    || fail "held-out perplexity: trained $trained (must be < 20), random $random (> 500)"
echo "held-out perplexity: trained $trained, random $random"

# the story cloze (4 choices of about the same length): well above chance (0.25)
acc=$(moe-eval --quiet -m "$m" --task "$d/story-cloze.jsonl" --limit 200 --json | sed -n 's/.*"average": {"acc": \([0-9.eE+-]*\).*/\1/p')
awk -v a="$acc" 'BEGIN { exit !(a > 0.35) }' || fail "story cloze accuracy '$acc' (must be > 0.35)"
echo "story cloze (200 items): $acc"

# the experts specialise: in every MoE layer the mean routing entropy on the held-out
# text is under 0.95 of a uniform router's (ln 16), and every expert takes at least
# a third of a uniform share of the routed tokens
moe-tokenize --model "$m" "$d/heldout.jsonl" | moe-calib --quiet --model "$m" - | moe-dump --full --type calib --no-header - >"$TMP/calib.jsonl"
[ "$(grep -c '"type":"calib"' "$TMP/calib.jsonl")" -eq 5 ] || fail "not 5 MoE layers"
sed -n 's/.*"entropy":\([0-9.eE+-]*\).*/\1/p' "$TMP/calib.jsonl" | awk -v n="$(cfg n_routed_experts)" '
    { print "routing entropy, MoE layer " NR ": " $1 " (uniform " log(n) ")"; if ($1 >= 0.95 * log(n)) bad = 1 }
    END { exit bad }' || fail "the routing is near uniform: the experts do not specialise"
sed -n 's/.*"load":{[^}]*"data":\[\([^]]*\)\].*/\1/p' "$TMP/calib.jsonl" | tr ',' '\n' \
    | awk -v n="$(cfg n_routed_experts)" '$1 < 1 / (3 * n) { bad = 1 } END { exit bad }' || fail "a (nearly) dead expert"
