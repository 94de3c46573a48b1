#!/bin/sh
# bench/eval.sh - moe-eval --bench: prefill speed and weight memory of a condensed
# model against its dense original, measured in the same run (the paper's
# speedup and memory ratio), plus the perplexity both give on TinyStories text
# when ../shared is present.
# The model: random qwen2_moe (moe-init), BENCH_EVAL_LAYERS layers (default 6), hidden 512,
# 32 experts top-4, a shared expert of 2 experts' width; the condensed copy keeps
# 2 routed experts (+ the shared one) in layers 1..4 (config.json "condensed_layers";
# the tensors are hard links to the dense files, the unused ones ignored).
# BENCH_EVAL_THREADS=N sets --threads (on a loaded machine 1 thread can be the fastest).
set -eu
cd "$(dirname "$0")/.."
: "${BIN:=bin}"
L=${BENCH_EVAL_LAYERS:-6} TOKS=${BENCH_EVAL_TOKENS:-256}
WORK=${BENCH_DIR:-${TMPDIR:-/tmp}/cdmoe-bench-eval}
mkdir -p "$WORK"
D=$WORK/dense-l$L C=$WORK/cond-l$L
if [ ! -f "$D/config.json" ]; then
    cat >"$WORK/qwen2_moe.json" <<JSON
{"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "hidden_size": 512,
 "num_hidden_layers": $L, "num_attention_heads": 8, "num_key_value_heads": 8,
 "intermediate_size": 1024, "moe_intermediate_size": 256, "shared_expert_intermediate_size": 512,
 "num_experts": 32, "num_experts_per_tok": 4, "norm_topk_prob": false, "decoder_sparse_step": 1,
 "mlp_only_layers": [], "vocab_size": 8192, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
 "max_position_embeddings": 4096, "hidden_act": "silu", "tie_word_embeddings": false,
 "use_sliding_window": false, "qkv_bias": true, "torch_dtype": "bfloat16"}
JSON
    "$BIN/moe-init" --quiet --config "$WORK/qwen2_moe.json" --seed 11 -o "$D"
fi
rm -rf "$C"
mkdir "$C"
for f in "$D"/*; do [ "$(basename "$f")" = config.json ] || ln "$f" "$C/" 2>/dev/null || cp "$f" "$C/"; done
python3 - "$D/config.json" "$C/config.json" "$L" <<'EOF'
import json, sys
c = json.load(open(sys.argv[1]))
L = int(sys.argv[3])
c["condensed_layers"] = {str(l): {"experts": [0, 1], "weights": [0.12, 0.1]} for l in range(1, min(5, L))}
json.dump(c, open(sys.argv[2], "w"), indent=2)
EOF
PPL=
TXT=${CDMOE_SHARED:-../shared}/data/lm/tinystories/TinyStories-valid-head_794KB.txt
if [ -f "$TXT" ]; then
    python3 - "$TXT" "$WORK/text.jsonl" <<'EOF'
import json, sys
lines = [l.strip() for l in open(sys.argv[1], encoding="utf-8") if l.strip()][:20]
with open(sys.argv[2], "w") as f:
    for l in lines:
        f.write(json.dumps({"text": l}) + "\n")
EOF
    PPL="--ppl $WORK/text.jsonl"
else
    echo "SKIP perplexity: $TXT absent (../shared)"
fi
echo "-- qwen2_moe hidden 512, $L layers, 32 experts top-4 + shared; condensed: layers 1..4 keep 2 experts"
# shellcheck disable=SC2086
"$BIN/moe-eval" --quiet ${BENCH_EVAL_THREADS:+--threads $BENCH_EVAL_THREADS} -m "$D" -m "$C" $PPL --bench --bench-tokens "$TOKS" --bench-runs ${BENCH_EVAL_RUNS:-5} \
    --json >"$WORK/r.json"
python3 - "$WORK/r.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
d, c = r["models"]
cmp = r["compare"]
s = ""
if "ppl" in d:
    s = f"; ppl (CD-MoE) dense {d['ppl']['ppl']:.2f} condensed {c['ppl']['ppl']:.2f}"
print(f"RESULT eval: prefill {d['bench']['tokens_per_s']:.1f} -> {c['bench']['tokens_per_s']:.1f} tok/s, "
      f"speedup condensed/dense = {cmp['speedup']:.2f}; memory ratio = {cmp['memory_ratio_params']:.3f} "
      f"(params), {cmp['memory_ratio_bytes']:.3f} (bytes){s}")
EOF

# Prefix sharing in multiple-choice scoring: a synthetic task with long contexts
# (BENCH_EVAL_CTX words, default 400, 4 choices of 2-6 words, BENCH_EVAL_ITEMS items,
# default 16) scored by the dense model with the context run once per item
# (default) and with --no-prefix-cache, same run; the log-likelihoods must agree
# (bit-identical on the CPU).
python3 - "$WORK/mc_long.jsonl" "${BENCH_EVAL_CTX:-400}" "${BENCH_EVAL_ITEMS:-16}" <<'EOF'
import json, random, sys
rng = random.Random(5)
words = "the a cat dog sat ran on under over mat tree house river small big red green blue " \
        "quick slow bird fish sun moon day night went saw found took gave".split()
with open(sys.argv[1], "w") as f:
    for i in range(int(sys.argv[3])):
        q = " ".join(rng.choice(words) for _ in range(int(sys.argv[2]))) + "."
        ch = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 6))) for _ in range(4)]
        f.write(json.dumps({"query": q, "choices": ch, "gold": 0}) + "\n")
EOF
for mode in share full; do
    # shellcheck disable=SC2046
    "$BIN/moe-eval" --quiet ${BENCH_EVAL_THREADS:+--threads $BENCH_EVAL_THREADS} -m "$D" \
        --task "$WORK/mc_long.jsonl" $( [ $mode = full ] && echo --no-prefix-cache ) \
        --no-provenance -o "$WORK/mc_$mode.zst" --json >"$WORK/mc_$mode.json"
done
cmp -s "$WORK/mc_share.zst" "$WORK/mc_full.zst" && SAME=bit-identical || SAME=DIFFERENT
python3 - "$WORK/mc_share.json" "$WORK/mc_full.json" "$SAME" <<'EOF'
import json, sys
s, f = (json.load(open(p))["models"][0]["tasks"][0] for p in sys.argv[1:3])
print(f"RESULT eval prefix cache: {s['items']} items x 4 choices, {s['tokens']} tokens fed; "
      f"run {s['tokens_run']} (shared) vs {f['tokens_run']} (full) = {f['tokens_run'] / s['tokens_run']:.2f}x fewer; "
      f"{s['seconds']:.2f} s vs {f['seconds']:.2f} s = speedup {f['seconds'] / s['seconds']:.2f}x; "
      f"log-likelihoods {sys.argv[3]}")
EOF
