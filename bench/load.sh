#!/bin/sh
# bench/load.sh - device load path: time to stage and upload one
# DeepSeekMoE-16B-shaped MoE layer (2048 hidden, 64 experts x 1408, 2 shared,
# BF16 on disk; layer 0 is dense, layer 1 is measured) on a CPU stand-in for a
# device backend (bench/load_bench.c), the old f32 round trip (MOE_STAGE_F32=1)
# vs the direct BF16 staging, in the same run; then the same without the
# stand-in host -> device copies (host staging alone, as when a GPU's copy
# engine does the copies in parallel).  The checkpoint (~1.3 GB: 2
# layers, vocabulary 1024) is written once under $BENCH_DIR (default
# /tmp/cdmoe-bench-load) and kept in the page cache: this measures the host
# work, not the disk.  BENCH_LOAD_REPS=3.
set -eu
cd "$(dirname "$0")/.."
: "${BIN:=bin}" "${BUILD:=build}"
WORK=${BENCH_DIR:-${TMPDIR:-/tmp}/cdmoe-bench-load}
mkdir -p "$WORK"
make -s "$BUILD/bench/load_bench" >/dev/null
M=$WORK/deepseek-16b-widths-2l
if [ ! -f "$M/config.json" ]; then
    cat >"$WORK/deepseek.json" <<JSON
{"architectures": ["DeepseekForCausalLM"], "model_type": "deepseek", "hidden_size": 2048,
 "num_hidden_layers": 2, "num_attention_heads": 16, "num_key_value_heads": 16,
 "intermediate_size": 10944, "moe_intermediate_size": 1408, "n_routed_experts": 64,
 "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1, "moe_layer_freq": 1,
 "norm_topk_prob": false, "scoring_func": "softmax", "vocab_size": 1024, "rms_norm_eps": 1e-06,
 "rope_theta": 10000, "rope_scaling": null, "max_position_embeddings": 4096, "hidden_act": "silu",
 "attention_bias": false, "tie_word_embeddings": false, "torch_dtype": "bfloat16"}
JSON
    "$BIN/moe-init" --quiet --config "$WORK/deepseek.json" --seed 5 -o "$M"
fi
echo "-- machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "-- model: DeepSeekMoE-16B widths, 2 layers, bf16 ($(du -sh "$M" | cut -f1)); loading layer 1 (MoE)"
"$BUILD/bench/load_bench" "$M" 1 "${BENCH_LOAD_REPS:-3}" | tee "$WORK/load.txt"
old=$(sed -n 's/^old_s=//p' "$WORK/load.txt"); new=$(sed -n 's/^new_s=//p' "$WORK/load.txt")
gb=$(sed -n 's/^layer_bytes=//p' "$WORK/load.txt" | awk '{printf "%.2f", $1/1e9}')
echo "RESULT layer load, device path ($gb GB of experts, BF16): old f32 staging ${old} s, direct BF16 staging ${new} s; ratio old/new = $(echo "$old $new" | awk '{printf "%.2f", $1/$2}')"
os=$(sed -n 's/^old_stage_s=//p' "$WORK/load.txt"); ns=$(sed -n 's/^new_stage_s=//p' "$WORK/load.txt")
echo "RESULT host staging alone (the copies left to a copy engine): old ${os} s, new ${ns} s; ratio old/new = $(echo "$os $ns" | awk '{printf "%.2f", $1/$2}')"
