#!/bin/sh
# bench/tune.sh - training throughput of moe-tune vs PyTorch (bench/train_torch.py:
# forward, backward, clipping, AdamW in float32 on the CPU) on the same condensed
# checkpoint, the same token ids and the same thread count, and where moe-tune's
# time goes (perf, when it may sample).  Both train the condensed layers' experts.
# Sizes: BENCH_TUNE_HIDDEN=512 BENCH_TUNE_LAYERS=4 BENCH_TUNE_EXPERTS=16 BENCH_TUNE_TOPK=4
# BENCH_TUNE_MOE_INTER=256 BENCH_TUNE_VOCAB=8192 BENCH_TUNE_BATCH=4 BENCH_TUNE_SEQ=256
# BENCH_TUNE_STEPS=3 (timed steps, after one warm-up step; the best counts on both sides),
# BENCH_TUNE_ROUNDS=2 (each round runs moe-tune right before PyTorch, so that a shared
# machine's drifting load skews the ratio less; a ratio per round, and of the bests).
set -eu
cd "$(dirname "$0")/.."
: "${BIN:=bin}"
H=${BENCH_TUNE_HIDDEN:-512} LAYERS=${BENCH_TUNE_LAYERS:-4} E=${BENCH_TUNE_EXPERTS:-16} K=${BENCH_TUNE_TOPK:-4}
MI=${BENCH_TUNE_MOE_INTER:-256} VOCAB=${BENCH_TUNE_VOCAB:-8192} B=${BENCH_TUNE_BATCH:-4}
T=${BENCH_TUNE_SEQ:-256} N=${BENCH_TUNE_STEPS:-3} ROUNDS=${BENCH_TUNE_ROUNDS:-2}
THREADS=$(nproc)
# OpenMP threads that spin while they wait take the cores from the threads that
# work on a shared machine: both sides wait passively (override by setting it)
OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}
export OMP_WAIT_POLICY
WORK=${BENCH_DIR:-${TMPDIR:-/tmp}/cdmoe-bench-tune}
mkdir -p "$WORK"
PY=${CDMOE_REF_PYTHON:-python3}
for p in "$PY" .venv-ref/bin/python; do
    if command -v "$p" >/dev/null 2>&1 && "$p" -c 'import torch, transformers, numpy' 2>/dev/null; then PY=$p; break; fi
done
"$PY" -c 'import numpy' 2>/dev/null || { echo "SKIP tune bench: no python3 with numpy (CDMOE_REF_PYTHON)"; exit 0; }

# qwen2_moe (transformers' own class on the PyTorch side, through modeling_cdmoe.py
# once condensed): layers 1 and 3 condensed, keeping 4 routed experts each
M=$WORK/model-h$H-l$LAYERS-e$E
C=$WORK/condensed-h$H-l$LAYERS-e$E
if [ ! -f "$C/config.json" ]; then
    cat >"$WORK/qwen2_moe.json" <<JSON
{"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "hidden_size": $H,
 "num_hidden_layers": $LAYERS, "num_attention_heads": 8, "num_key_value_heads": 8,
 "intermediate_size": $((4 * MI)), "moe_intermediate_size": $MI, "shared_expert_intermediate_size": $((2 * MI)),
 "num_experts": $E, "num_experts_per_tok": $K, "norm_topk_prob": false, "decoder_sparse_step": 1,
 "mlp_only_layers": [], "vocab_size": $VOCAB, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
 "max_position_embeddings": 4096, "hidden_act": "silu", "tie_word_embeddings": false,
 "use_sliding_window": false, "qkv_bias": true, "torch_dtype": "float32"}
JSON
    rm -rf "$M"
    "$BIN/moe-init" --quiet --config "$WORK/qwen2_moe.json" --dtype f32 --std 0.02 --seed 7 -o "$M"
    echo '{"1-0":[1,4,0.3],"1-1":[1,4,0.25],"1-2":[1,4,0.2],"1-3":[1,4,0.15],"3-4":[1,4,0.3],"3-5":[1,4,0.25],"3-6":[1,4,0.2],"3-7":[1,4,0.15]}' >"$WORK/w.json"
    echo '{"1":[0,1,2,3],"3":[4,5,6,7]}' >"$WORK/e.json"
    echo '[1,3]' >"$WORK/o.json"
    "$BIN/moe-condense" --model "$M" --layers 2 --experts 4 -o "$C" --cdmoe-weights "$WORK/w.json" \
        --cdmoe-experts "$WORK/e.json" --cdmoe-order "$WORK/o.json" >/dev/null
fi
# B sequences of T random ids: one step's batch, the same every step on both sides
"$PY" - "$WORK" "$B" "$T" "$VOCAB" "$((N + 1))" <<'PYEOF'
import json, sys
import numpy as np
work, b, t, vocab, steps = sys.argv[1], *map(int, sys.argv[2:])
ids = np.random.default_rng(1234).integers(0, vocab, size=(b, t), dtype=np.int32)
ids.astype("<i4").tofile(f"{work}/ids.i32")
with open(f"{work}/ids.jsonl", "w") as f:
    for _ in range(steps):
        for row in ids:
            f.write(json.dumps({"ids": row.tolist()}) + "\n")
PYEOF

echo "-- machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg) (other busy processes skew every figure)"
echo "-- model: qwen2_moe hidden $H, $LAYERS layers ($E experts top-$K, inter $MI, shared 2x), vocab $VOCAB;"
echo "   layers 1 and 3 condensed to 4 experts, their experts and shared expert trained (float32)"
echo "-- steps: batch $B x $T tokens, 1 warm-up + $N timed, $THREADS threads, OMP_WAIT_POLICY=$OMP_WAIT_POLICY"
tune() { # extra command in front
    rm -rf "$WORK/out"
    "$@" "$BIN/moe-tune" --model "$C" -o "$WORK/out" --data "$WORK/ids.jsonl" --batch "$B" --max-length "$T" \
        --steps $((N + 1)) --no-shuffle --lr 1e-5 --warmup 0 --threads "$THREADS" -q --log "$WORK/log.zst" >/dev/null
}
ours_best() { # the best timed step of the last run
    "$BIN/moe-dump" --no-header --type step "$WORK/log.zst" | sed -n 's/.*"tokens_per_s":\([0-9.e+]*\).*/\1/p' \
        | tail -n +2 | sort -g | tail -n 1
}
have_torch=0
"$PY" -c 'import torch, transformers' 2>/dev/null && [ -f bench/train_torch.py ] && have_torch=1
best_ours=0 best_torch=0
for round in $(seq 1 "$ROUNDS"); do
    tune
    ours=$(ours_best)
    best_ours=$(echo "$ours $best_ours" | awk '{print ($1 > $2) ? $1 : $2}')
    if [ $have_torch = 0 ]; then
        echo "round $round: moe-tune $ours trained tok/s"
        continue
    fi
    "$PY" bench/train_torch.py "$C" --batch "$B" --length "$T" --steps "$N" --threads "$THREADS" \
        --ids "$WORK/ids.i32" >"$WORK/torch.json" 2>"$WORK/torch.err" || { cat "$WORK/torch.err"; exit 1; }
    # trained tokens (targets: B·(T-1) a step), the count moe-tune's log gives
    torch=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["trained_tokens_per_s"])' "$WORK/torch.json")
    best_torch=$(echo "$torch $best_torch" | awk '{print ($1 > $2) ? $1 : $2}')
    echo "round $round: moe-tune $ours, PyTorch $torch trained tok/s; ratio $(echo "$ours $torch" | awk '{printf "%.2f", $1/$2}')"
done
if [ $have_torch = 1 ]; then
    echo "PyTorch (last round): $(cat "$WORK/torch.json")"
    echo "RESULT training tokens/s (trained tokens, best of $ROUNDS rounds): moe-tune $best_ours, PyTorch $best_torch; ratio moe-tune/PyTorch = $(echo "$best_ours $best_torch" | awk '{printf "%.2f", $1/$2}')"
else
    echo "moe-tune: best $best_ours trained tok/s"
    echo "SKIP PyTorch peer: no python with torch and transformers, or bench/train_torch.py absent"
fi
# where the time goes: moe-tune's own samples by function (perf, where allowed)
if command -v perf >/dev/null 2>&1 && perf record -q -o "$WORK/perf.probe" true 2>/dev/null; then
    tune perf record -q -F 499 -o "$WORK/perf.data" --
    echo "-- where moe-tune's time goes (perf samples; the run includes loading and writing):"
    perf report -i "$WORK/perf.data" --stdio --sort symbol 2>/dev/null | awk '
        /^ +[0-9.]+%/ { p = $1 + 0; s = ""
            for (i = 1; i <= NF; i++) if ($i == "[.]" || $i == "[k]") s = $(i + 1)
            if (s ~ /^sgemm_.*kernel/) g = "GEMM arithmetic (OpenBLAS kernels)"
            else if (s ~ /^sgemm_/) g = "GEMM packing and scaling (OpenBLAS copies)"
            else if (s ~ /cross_entropy|expf|exp_prefix|swiglu|sigmoid|softmax|attention/) g = "cross-entropy, attention softmax, SwiGLU (exp)"
            else if (s ~ /adamw|sumsq/) g = "AdamW and gradient norm"
            else if (s ~ /^(cpu_|rope_|add_bias|experts_dt|moe_dispatch)/) g = "other kernels (norms, RoPE, gather/scatter, combine)"
            else if (s ~ /mem(set|move|cpy)|clear_page|page_fault/) g = "memory: copies, zeroing, page faults"
            else if (s ~ /^(GOMP|gomp|futex|sched|__sched|do_sched|finish_task|schedule|_raw_spin)/) g = "OpenMP and scheduling"
            else g = "other (loading, writing, host code)"
            share[g] += p }
        END { for (g in share) printf "  %5.1f%%  %s\n", share[g], g }' | sort -rn
    echo "-- top 12 symbols:"
    perf report -i "$WORK/perf.data" --stdio --sort dso,symbol 2>/dev/null | grep -E '^ +[0-9]' | head -n 12
else
    echo "-- (perf unavailable: no profile)"
fi
