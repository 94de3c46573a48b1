#!/bin/sh
# bench/forward.sh - prefill throughput of our forward pass vs PyTorch's CPU
# forward (Hugging Face transformers) on the same random checkpoint, in
# float32 and in bf16 (ours: --precision bf16), the share of time per op, and
# GFLOP/s vs the machine's measured peak per precision.  Opt-in memory check (writes ~9 GB):
#   BENCH_MEMORY=1 make bench   (DeepSeekMoE-16B widths, 8 layers, 256 tokens,
#                                peak RSS of moe-eval via /usr/bin/time -v; goal < 2 GB)
# Sizes (defaults from the issue): BENCH_HIDDEN=1024 BENCH_LAYERS=8 BENCH_EXPERTS=64
# BENCH_TOPK=6 BENCH_MOE_INTER=704 BENCH_VOCAB=32000 BENCH_SEQ=512 BENCH_NSEQ=2
set -eu
cd "$(dirname "$0")/.."
: "${BIN:=bin}" "${BUILD:=build}"
H=${BENCH_HIDDEN:-1024} LAYERS=${BENCH_LAYERS:-8} E=${BENCH_EXPERTS:-64} K=${BENCH_TOPK:-6}
MI=${BENCH_MOE_INTER:-704} VOCAB=${BENCH_VOCAB:-32000} SEQ=${BENCH_SEQ:-512} NSEQ=${BENCH_NSEQ:-2}
WORK=${BENCH_DIR:-${TMPDIR:-/tmp}/cdmoe-bench-forward}
mkdir -p "$WORK"
make -s "$BUILD/bench/forward_bench" >/dev/null
FB=$BUILD/bench/forward_bench

echo "-- machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg) (other busy processes skew every figure;"
echo "   OMP_WAIT_POLICY=passive makes both sides more robust on a shared machine)"
echo "-- GEMM (float32 and our BF16 op, all cores) and the machine's peaks"
"$FB" gemm | tee "$WORK/gemm.txt"

# qwen2_moe: a DeepSeek-like MoE (64 experts top-6, 2 experts' worth of shared
# expert) that transformers implements natively, so PyTorch runs its own code.
M=$WORK/model-h$H-l$LAYERS-e$E
# (every size and flag spelled out in a config.json handed to moe-init --config)
if [ ! -f "$M/config.json" ]; then
    cat >"$WORK/qwen2_moe.json" <<JSON
{"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "hidden_size": $H,
 "num_hidden_layers": $LAYERS, "num_attention_heads": 16, "num_key_value_heads": 16,
 "intermediate_size": $((4 * MI)), "moe_intermediate_size": $MI, "shared_expert_intermediate_size": $((2 * MI)),
 "num_experts": $E, "num_experts_per_tok": $K, "norm_topk_prob": false, "decoder_sparse_step": 1,
 "mlp_only_layers": [], "vocab_size": $VOCAB, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
 "max_position_embeddings": 4096, "hidden_act": "silu", "tie_word_embeddings": false,
 "use_sliding_window": false, "qkv_bias": true, "torch_dtype": "bfloat16"}
JSON
    "$BIN/moe-init" --quiet --config "$WORK/qwen2_moe.json" --std 0.02 --seed 7 -o "$M"
fi
echo "-- model: qwen2_moe hidden $H, $LAYERS layers, $E experts top-$K (inter $MI), shared 2x, vocab $VOCAB, bf16 on disk ($(du -sh "$M" | cut -f1))"
echo "-- prefill: $NSEQ sequences x $SEQ tokens"
PY=python3
for py in ${CDMOE_REF_PYTHON:-} "$PWD/.venv-ref/bin/python" python3; do
    if "$py" -c "import torch, transformers" 2>/dev/null; then PY=$py; break; fi
done
$PY bench/forward_torch.py ids "$M" "$NSEQ" "$SEQ" "$WORK/ids.i32"
HAVE_TORCH=0
$PY -c 'import torch, transformers' 2>/dev/null && HAVE_TORCH=1
torch_run() { # DTYPE OUT: PyTorch's forward, when there is one
    [ $HAVE_TORCH = 1 ] && $PY bench/forward_torch.py run "$M" "$NSEQ" "$SEQ" "$WORK/ids.i32" "$1" 2>/dev/null | tee "$2"
    return 0
}
# each of ours right before its PyTorch peer (the load of a shared machine
# drifts: neighbours in time are compared): float32 (the default), BF16
# compute (--precision bf16); then the old f32 path (every layer's BF16
# weights converted to f32 at load)
"$FB" forward "$M" "$WORK/ids.i32" "$NSEQ" "$SEQ" | tee "$WORK/ours.txt"
torch_run float32 "$WORK/torch.txt"
MOE_PRECISION=bf16 "$FB" forward "$M" "$WORK/ids.i32" "$NSEQ" "$SEQ" | tee "$WORK/ours_bf16.txt"
torch_run bfloat16 "$WORK/torch_bf16.txt"
MOE_CPU_WEIGHTS=f32 "$FB" forward "$M" "$WORK/ids.i32" "$NSEQ" "$SEQ" >"$WORK/ours_f32.txt"
val() { sed -n "s/^$1=//p" "$2"; }
ratio() { echo "$1 $2" | awk '{printf "%.2f", $1/$2}'; }
pk32=$(val peak_f32_gflops "$WORK/gemm.txt" | cut -d' ' -f1)
pk16=$(val peak_bf16_gflops "$WORK/gemm.txt" | cut -d' ' -f1)
for p in f32 bf16; do
    f=$WORK/ours.txt pk=$pk32
    [ $p = bf16 ] && f=$WORK/ours_bf16.txt pk=$pk16
    g=$(val compute_gflops "$f")
    echo "RESULT $p time per op ($(val backend "$f")): $(val share "$f")"
    echo "RESULT $p achieved $g GFLOP/s (all products, weight load excluded) = $(echo "$g $pk" | awk '{printf "%.0f", ($2 > 0 ? 100*$1/$2 : 0)}')% of the machine's $p peak $pk GFLOP/s"
done
if [ $HAVE_TORCH = 1 ]; then
    ours=$(val tok_per_s "$WORK/ours.txt") torch=$(val torch_tok_per_s "$WORK/torch.txt")
    o16=$(val tok_per_s "$WORK/ours_bf16.txt") t16=$(val torch_tok_per_s "$WORK/torch_bf16.txt")
    echo "RESULT forward prefill float32: ours $ours tok/s, PyTorch float32 $torch tok/s; ratio ours/PyTorch = $(ratio "$ours" "$torch") (goal >= 1.5)"
    echo "RESULT forward prefill bf16: ours (--precision bf16) $o16 tok/s, PyTorch bfloat16 $t16 tok/s; ratio ours/PyTorch = $(ratio "$o16" "$t16") (goal >= 1); ours bf16/f32 = $(ratio "$o16" "$ours")"
    o32=$(val tok_per_s "$WORK/ours_f32.txt")
    echo "RESULT forward prefill, f32 weights (MOE_CPU_WEIGHTS=f32, per-layer bf16->f32 conversion, load $(val load_s "$WORK/ours_f32.txt") s vs $(val load_s "$WORK/ours.txt") s): $o32 tok/s; ratio f32/PyTorch = $(ratio "$o32" "$torch"), BF16 weights/f32 weights = $(ratio "$ours" "$o32")"
    tot=$(val total_s "$WORK/ours.txt") ld=$(val load_s "$WORK/ours.txt") tt=$(val torch_total_s "$WORK/torch.txt")
    echo "RESULT compute only (ours without the per-layer weight load, which PyTorch does once): float32 ratio $(echo "$tot $ld $tt" | awk '{printf "%.2f", $3/($1-$2)}')"
else
    echo "SKIP PyTorch peer: no python with torch and transformers (CDMOE_REF_PYTHON, .venv-ref/ or python3)"
fi

if [ "${BENCH_MEMORY:-0}" = 1 ]; then
    BIG=$WORK/deepseek-16b-widths-8l
    if [ ! -f "$BIG/config.json" ]; then
        cat >"$WORK/deepseek.json" <<JSON
{"architectures": ["DeepseekForCausalLM"], "model_type": "deepseek", "hidden_size": 2048,
 "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 16,
 "intermediate_size": 10944, "moe_intermediate_size": 1408, "n_routed_experts": 64,
 "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1, "moe_layer_freq": 1,
 "norm_topk_prob": false, "scoring_func": "softmax", "vocab_size": 102400, "rms_norm_eps": 1e-06,
 "rope_theta": 10000, "rope_scaling": null, "max_position_embeddings": 4096, "hidden_act": "silu",
 "attention_bias": false, "tie_word_embeddings": false, "torch_dtype": "bfloat16"}
JSON
        "$BIN/moe-init" --quiet --config "$WORK/deepseek.json" --seed 3 -o "$BIG"
    fi
    echo "-- memory: deepseek, DeepSeekMoE-16B widths, 8 layers, $(du -sh "$BIG" | cut -f1) on disk, 256 tokens"
    $PY bench/forward_torch.py ids "$BIG" 1 256 "$WORK/ids256.i32"
    $PY - "$WORK/ids256.i32" "$WORK/tok256.zst" <<'PYEOF'
import sys, msgpack, zstandard, numpy as np
ids = np.fromfile(sys.argv[1], dtype="<i4")
raw = msgpack.packb({"format": "moe-stream", "version": 1, "kinds": ["tokens"], "provenance": []})
raw += msgpack.packb({"type": "tokens", "index": 0, "ids": {"dtype": "i32", "shape": [len(ids)], "data": ids.tobytes()}})
raw += msgpack.packb({"type": "end", "records": 1})
open(sys.argv[2], "wb").write(zstandard.ZstdCompressor(write_checksum=True).compress(raw))
PYEOF
    /usr/bin/time -v "$BIN/moe-eval" -m "$BIG" -d logits "$WORK/tok256.zst" >/dev/null 2>"$WORK/time.txt"
    rss_kb=$(sed -n 's/.*Maximum resident set size (kbytes): //p' "$WORK/time.txt")
    wall=$(sed -n 's/.*Elapsed (wall clock) time (h:mm:ss or m:ss): //p' "$WORK/time.txt")
    echo "RESULT memory: checkpoint $(du -sb "$BIG" | awk '{printf "%.1f GB", $1/1e9}'), peak RSS $(echo "$rss_kb" | awk '{printf "%.2f GB", $1/1e6}') (goal < 2 GB), wall $wall"
    [ "$rss_kb" -lt 2000000 ] || { echo "FAIL: peak RSS above 2 GB"; exit 1; }
fi
