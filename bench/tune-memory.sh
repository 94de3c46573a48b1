#!/bin/sh
# bench/tune-memory.sh - device memory of a training step (moe-tune's engine,
# lib/train.h) measured against the budget written in lib/train.h, without a
# GPU: the CUDA backend's own source runs on the CUDA emulator with the
# arithmetic skipped (MOE_CUDA_EMU_NOCOMPUTE=1), so every allocation is made
# at real shapes and counted, and nothing is computed.
#
# The model: DeepSeekMoE-16B's shapes (tests/fixtures/ckpt/deepseek-moe-16b.
# config.json) with LAYERS decoder layers (default 4: the dense layer 0 and 3
# MoE layers, ~4.4 GB on disk), of which the MoE layers CONDENSED (default
# "1 3", decoder indices) are condensed to E(2+6) (2 shared + 6 routed
# experts; moe-condense from CD-MoE-style JSON files), so that the backward
# runs through condensed and routed layers alike (bench/lib/condense-fixed.sh).  The step: 8 x 256 tokens
# (SEQS x LEN), MOE_TRAIN_CONDENSED, AdamW moments in float32 for the trained
# tensors, with and without recomputation (bench/gpu_train.c).
#
# Printed: per stage (weights and trainer state, AdamW moments, the step's
# activations and transients) the bytes the backend allocated against the
# budget's formula evaluated for the same model, then the same formula for
# the paper's setting (28 layers, 9 condensed, the lowest trained layer 7).
# The working files go to BENCH_DIR (default /tmp/cdmoe-bench-tune-memory,
# kept for the next run; ~7 GB).  Needs the emulator: make cuda-emu.
set -eu
cd "$(dirname "$0")/.."
: "${BIN:=bin}" "${BUILD:=build}"
LAYERS=${LAYERS:-4} CONDENSED=${CONDENSED:-1 3} SEQS=${SEQS:-8} LEN=${LEN:-256}
WORK=${BENCH_DIR:-${TMPDIR:-/tmp}/cdmoe-bench-tune-memory}
EMU=$BUILD/emu/libcdmoe_cuda_emu.so
make -s "$BUILD/bench/gpu_train" "$EMU" >/dev/null
[ -f "$EMU" ] || { echo "tune-memory: no CUDA emulator ($EMU): make cuda-emu" >&2; exit 1; }
mkdir -p "$WORK"

# ---- the checkpoint: 16B shapes, LAYERS layers, CONDENSED condensed to E(2+6) --------------
SRC=$WORK/ds16b-l$LAYERS
DST=$WORK/ds16b-l$LAYERS-c$(echo "$CONDENSED" | tr ' ' '_')
if [ ! -f "$SRC/config.json" ]; then
    sed "s/\"num_hidden_layers\": 28/\"num_hidden_layers\": $LAYERS/" \
        tests/fixtures/ckpt/deepseek-moe-16b.config.json >"$WORK/config.json"
    "$BIN/moe-init" --quiet --config "$WORK/config.json" --seed 1 -o "$SRC.tmp"
    mv "$SRC.tmp" "$SRC"
fi
if [ ! -f "$DST/config.json" ]; then
    rm -rf "$DST.tmp"
    BIN=$BIN sh bench/lib/condense-fixed.sh "$SRC" "$DST.tmp" "$CONDENSED"
    mv "$DST.tmp" "$DST"
fi

# ---- measured: the emulator without arithmetic ------------------------------------------------
run() { # extra args...
    MOE_CUDA_EMU=1 MOE_CUDA_EMU_NOCOMPUTE=1 MOE_CUDA_PLUGIN=$(pwd)/$EMU \
        "$BUILD/bench/gpu_train" --model "$DST" --seqs "$SEQS" --len "$LEN" --steps 1 "$@" 2>/dev/null
}
J0=$(run)
J1=$(run --recompute)
field() { echo "$1" | sed -n "s/.*\"$2\":\([0-9.]*\).*/\1/p"; }

# ---- the budget of lib/train.h for a DeepSeek-shaped model -----------------------------------
# budget L LOWEST "CONDENSED..." RECOMPUTE -> "weights state moments activations transients"
# (bytes, as lib/train.h counts them; weights: every layer in BF16, norms in
# float32; state: masters and gradients of the trained tensors; activations:
# what the forward keeps for the backward; transients: buffers that outlive
# their use in the model's pool and the CUDA scratch, one layer's backward,
# the loss head)
budget() {
    awk -v L="$1" -v low="$2" -v cond="$3" -v rec="$4" -v N=$((SEQS * LEN)) 'BEGIN {
        H = 2048; V = 102400; I = 10944; Im = 1408; E = 64; K = 6; Is = 2 * 1408; kept = 6
        nc = split(cond, c, " "); for (i = 1; i <= nc; i++) isc[c[i]] = 1
        routed = E * 3 * H * Im + 3 * H * Is + E * H; condl = kept * 3 * H * Im + 3 * H * Is
        # BF16 matrices (the frozen embedding stays on the host), f32 norms
        w = V * H * 2 + 3 * H * I * 2 + L * (4 * H * H * 2 + 2 * H * 4) + H * 4
        for (l = 1; l < L; l++) w += (l in isc ? condl : routed) * 2
        tr = nc * condl
        a = N * H * 4; mlp = N * K * H * 4 + N * 2 * Is * 4 + a + N * K * 4 * 4 + N * E * 4 + N * 4
        layer = 8 * a + mlp; acts = 0
        for (l = low; l < L; l++) acts += rec ? a : (l == 0 ? 8 * a + N * 2 * I * 4 : layer)
        if (rec) acts += layer
        chunk = int(16 * 1048576 / V)
        dense0 = N * 2 * I * 4 + N * I * 4 + N * I * 2 * 1.25
        scratch = 1.25 * (N * K * 2 * Im * 4 + N * K * H * 2 + N * K * Im * 2)
        bwd = N * K * H * 4 + 8 * a + N * 2 * Im * 4 + 2 * N * Im * 4
        head = chunk * V * 4 + chunk * V * 2 * 1.25 + 2 * a
        printf "%.0f %.0f %.0f %.0f %.0f\n", w, tr * 8, tr * 8, acts, dense0 + scratch + bwd + head
    }'
}
GB() { awk -v b="$1" 'BEGIN { printf "%.2f", b / 1e9 }'; }
low=$(field "$J0" lowest_trained)
set -- $(budget "$LAYERS" "$low" "$CONDENSED" 0)
bw=$1 bs=$2 bm=$3 ba0=$4 bt=$5
set -- $(budget "$LAYERS" "$low" "$CONDENSED" 1)
ba1=$4
open=$(field "$J0" live_after_open) trn=$(field "$J0" live_after_trainer) mom=$(field "$J0" live_after_moments)
echo "-- DeepSeekMoE-16B shapes, $LAYERS layers (condensed: $CONDENSED, E(2+6)), $SEQS x $LEN tokens, lowest trained layer $low"
echo "-- measured: bytes the CUDA backend allocated (emulator, MOE_CUDA_EMU_NOCOMPUTE=1); budget: lib/train.h's formula"
printf '%-46s %9s %9s\n' "stage" "measured" "budget"
printf '%-46s %8s G %8s G\n' "weights (BF16) + trained masters and gradients" "$(GB "$trn")" "$(GB $((bw + bs)))"
printf '%-46s %8s G %8s G\n' "+ AdamW moments" "$(GB $((mom - trn)))" "$(GB "$bm")"
for r in 0 1; do
    [ $r = 0 ] && J=$J0 ba=$ba0 name="step peak, no recompute" || { J=$J1 ba=$ba1 name="step peak, recompute"; }
    peak=$(field "$J" backend_peak_bytes)
    printf '%-46s %8s G %8s G  (activations %s G + transients %s G over the moments)\n' "$name" \
        "$(GB "$peak")" "$(GB $((bw + bs + bm + ba + bt)))" "$(GB "$ba")" "$(GB "$bt")"
    echo "RESULT tune-memory $LAYERS layers recompute=$r: measured peak $(GB "$peak") GB vs budget $(GB $((bw + bs + bm + ba + bt))) GB (ratio $(awk -v a="$peak" -v b=$((bw + bs + bm + ba + bt)) 'BEGIN { printf "%.3f", a / b }'))"
done
[ "$open" -gt 0 ] 2>/dev/null && echo "-- (model open alone: $(GB "$open") GB)"
set -- $(budget 28 7 "7 11 13 15 16 20 22 23 27" 1)
full1=$(awk -v a="$1" -v b="$2" -v c="$3" -v d="$4" -v e="$5" 'BEGIN { printf "%.0f", a + b + c + d + e }')
set -- $(budget 28 7 "7 11 13 15 16 20 22 23 27" 0)
full0=$(awk -v a="$1" -v b="$2" -v c="$3" -v d="$4" -v e="$5" 'BEGIN { printf "%.0f", a + b + c + d + e }')
echo "RESULT tune-memory paper setting (28 layers, 9 condensed, from layer 7): budget $(GB "$full1") GB with recompute, $(GB "$full0") GB without (+ ~0.6 GB CUDA context); goal < 40 GB"
