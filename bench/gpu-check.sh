#!/bin/sh
# bench/gpu-check.sh - the one GPU check of issue 7, made for a single call of
# the device tool (about 5-8 minutes on one H200): build for Hopper, GPU
# parity tests, one MoE layer at 25 600 tokens against the measured cuBLAS
# BF16 peak, a DeepSeekMoE-16B-shaped model (fewer layers) through the whole
# forward, moe-calib, moe-expert-rank, moe-layer-search and moe-eval on the
# GPU, peak GPU memory, training steps of a condensed copy (tokens/s, achieved
# TFLOP/s, peak memory; bench/gpu_train.c), and the resident memory of a
# CPU-only tool run (the CUDA backend is a plugin, libcdmoe_cuda.so, loaded
# only for CUDA runs).
# Results go to $OUT (at most 5 files); a short table is printed last.
#
# The GPU machine reaches no package registry and lacks our Debian libraries
# (msgpack-c, zstd, jansson, oniguruma, utf8proc, OpenBLAS, cmocka).  They
# travel as .deb files and are unpacked there into a private prefix with
# `dpkg -x` (never over /); the build and the programs are pointed at it
# (include/library paths, rpath, LD_LIBRARY_PATH).  nvcc, gcc and the CUDA
# libraries are the machine's own.
#
# Step by step, from a session whose task has a device:
#   1. here, once:   sh bench/gpu-check.sh --prepare
#                    (apt-get download of the .debs into .debs/, which git ignores)
#   2. here, optional: sh bench/gpu-check.sh --rehearse
#                    (the whole script on the CUDA emulator, tests/cudaemu, against
#                     .debs/ unpacked in /tmp: build, the parity tests, small shapes)
#   3. device tool:  run(command="sh bench/gpu-check.sh", carry=[".debs"], timeout_s=560)
#      then give_back.  The figures are in output_tail and in $OUT/summary.txt.
#
# Environment: LAYERS (decoder layers of the 16B-shaped model, default 4 = 1
# dense + 3 MoE), SEQS x LEN (calibration tokens, default 100 x 256 = 25 600),
# TOKENS (MoE-layer benchmark, default 25600), JOBS (make -j, default nproc).
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
MODE=${1:-run}
DEBS="libmsgpack-dev libmsgpackc2 libzstd-dev libzstd1 zstd libjansson-dev libjansson4
libonig-dev libonig5 libutf8proc-dev libutf8proc2 libopenblas-dev libopenblas-pthread-dev
libopenblas0 libopenblas0-pthread libgfortran5 libquadmath0 libcmocka-dev libcmocka0"

if [ "$MODE" = --prepare ]; then
    mkdir -p .debs && cd .debs || exit 1
    rm -f ./*.deb
    # shellcheck disable=SC2086
    apt-get download $DEBS || { echo "gpu-check: apt-get download failed" >&2; exit 1; }
    echo "gpu-check: $(ls | wc -l) packages, $(du -sh . | cut -f1) in .debs/ (carry it: carry=[\".debs\"])"
    exit 0
fi
case $MODE in run | --rehearse) ;; *) echo "usage: $0 [--prepare|--rehearse]" >&2; exit 2 ;; esac

OUT=${OUT:-/tmp/cdmoe-gpu-check}
[ "$MODE" = --rehearse ] && OUT=/tmp/cdmoe-gpu-rehearse
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/cdmoe-gpu.XXXXXX)
PREFIX=/tmp/cdmoe-prefix # fixed: the binaries' rpath points here
LOG=$OUT/log.txt
RES=$OUT/results.json
TABLE=$WORK/table
: >"$LOG"; : >"$RES"; : >"$TABLE"
trap 'rm -rf "$WORK"' EXIT
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 4)}
LAYERS=${LAYERS:-4}
SEQS=${SEQS:-100}
LEN=${LEN:-256}
TOKENS=${TOKENS:-25600}
T_START=$(date +%s)
DEV=cuda
[ "$MODE" = --rehearse ] && TOKENS=512 # the emulator computes on the CPU: small shapes

say() { echo "gpu-check: $*"; echo "== $*" >>"$LOG"; }
row() { printf '%-30s %-6s %6s  %s\n' "$1" "$2" "$3" "$4" >>"$TABLE"; }
elapsed() { echo $(( $(date +%s) - $1 )); }
# the row of a step that printed one JSON object into FILE: ok with FIGURES,
# skip (exit 77: its first line says why) or FAIL; the object goes to the log
# and, when ok, to results.json
json_row() { # name, exit status, file, start time, figures
    cat "$3" >>"$LOG"
    if [ "$2" -eq 0 ]; then
        cat "$3" >>"$RES"
        row "$1" ok "$(elapsed "$4")" "$5"
    elif [ "$2" -eq 77 ]; then
        row "$1" skip "$(elapsed "$4")" "$(head -n 1 "$3")"
    else
        row "$1" FAIL "$(elapsed "$4")" "exit $2, see log.txt"
    fi
}

# GPU memory sampler around a step (max MiB used, all processes), when nvidia-smi exists
smi_start() {
    SMI_PID=
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 >"$WORK/smi" 2>/dev/null &
        SMI_PID=$!
    fi
}
smi_stop() { # prints "peak N MiB" or nothing
    [ -n "$SMI_PID" ] || return 0
    kill "$SMI_PID" 2>/dev/null; wait "$SMI_PID" 2>/dev/null
    sort -n "$WORK/smi" | tail -n 1 | awk '{ if ($1 != "") printf "GPU peak %d MiB", $1 }'
}

# ---- 0. the carried Debian libraries, unpacked into a private prefix --------------------
if ls .debs/*.deb >/dev/null 2>&1; then
    rm -rf "$PREFIX"
    for f in .debs/*.deb; do dpkg -x "$f" "$PREFIX" || { say "dpkg -x $f failed"; exit 1; }; done
    LIBDIR=$PREFIX/usr/lib/x86_64-linux-gnu
    PKG_CFLAGS="-DUTF8PROC_EXPORTS -I$PREFIX/usr/include -I$PREFIX/usr/include/x86_64-linux-gnu/openblas-pthread"
    PKG_LIBS="-L$LIBDIR -L$LIBDIR/openblas-pthread -Wl,-rpath,$LIBDIR -Wl,-rpath,$LIBDIR/openblas-pthread \
-lmsgpackc -lzstd -ljansson -lonig -lutf8proc -lopenblas"
    LD_LIBRARY_PATH=$LIBDIR:$LIBDIR/openblas-pthread${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    export LD_LIBRARY_PATH
    CARRIED=1 # (PKG_LIBS's -L also serves the bare -lcmocka of the test binaries)
    say "libraries: $(ls .debs/*.deb | wc -l) .debs unpacked into $PREFIX"
else
    PKG_CFLAGS=$(pkg-config --cflags msgpack libzstd jansson oniguruma libutf8proc openblas 2>/dev/null)
    PKG_LIBS=$(pkg-config --libs msgpack libzstd jansson oniguruma libutf8proc openblas 2>/dev/null)
    CARRIED=
    say "libraries: no .debs/ (run --prepare here first); using the system's"
fi

# ---- 1. build for Hopper --------------------------------------------------------------------
[ -d /usr/local/cuda/bin ] && PATH=/usr/local/cuda/bin:$PATH && export PATH
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >>"$LOG" 2>&1
B=build-gpu
rm -rf $B # a clean build: objects and rpaths of another run do not count
t=$(date +%s)
say "build (sm_90, -j$JOBS)"
if make -j"$JOBS" BUILD=$B BIN=$B/bin CUDA=1 \
    CUDA_ARCH="-gencode arch=compute_90,code=sm_90" \
    PKG_CFLAGS="$PKG_CFLAGS" PKG_LIBS="$PKG_LIBS" \
    all-tests $([ "$MODE" = --rehearse ] && echo cuda-emu) >>"$LOG" 2>&1; then
    row "build sm_90" ok "$(elapsed $t)" "nvcc $(nvcc --version 2>/dev/null | sed -n 's/.*release \([0-9.]*\).*/\1/p')"
else
    row "build sm_90" FAIL "$(elapsed $t)" "see log.txt"
    tail -n 30 "$LOG"; cat "$TABLE"; exit 1
fi
if [ -n "$CARRIED" ]; then # the programs must use the carried libraries
    ldd $B/bin/moe-eval >>"$LOG" 2>&1
    ldd $B/bin/moe-eval | grep -q "not found" && { say "unresolved libraries:"; ldd $B/bin/moe-eval | grep "not found"; }
fi
BIN=$B/bin
PATH=$ROOT/$BIN:$PATH; export PATH
if [ "$MODE" = --rehearse ]; then # every "GPU" step runs on the CUDA emulator (tests/cudaemu)
    MOE_CUDA_EMU=1 MOE_CUDA_PLUGIN=$ROOT/$B/emu/libcdmoe_cuda_emu.so
    export MOE_CUDA_EMU MOE_CUDA_PLUGIN
    say "rehearsal: CUDA emulator $MOE_CUDA_PLUGIN"
fi
# the plugin is built and found beside the tools; a CPU-only run does not load cuBLAS
if [ -f $B/libcdmoe_cuda.so ] && [ -f $BIN/libcdmoe_cuda.so ]; then
    rss=
    [ -x /usr/bin/time ] && rss=$(/usr/bin/time -f %M moe-dump --version 2>&1 >/dev/null | tail -n 1)
    row "CUDA plugin" ok 0 "libcdmoe_cuda.so built; moe-dump --version RSS ${rss:-?} KB (no cuBLAS)"
else
    row "CUDA plugin" FAIL 0 "libcdmoe_cuda.so missing from $B or $BIN"
fi

# ---- 2. GPU parity tests ----------------------------------------------------------------------
t=$(date +%s)
say "make test-gpu"
BIN=$BIN BUILD=$B timeout 240 sh tests/run.sh --gpu >"$OUT/test-gpu.log" 2>&1
rc=$?
summary=$(tail -n 1 "$OUT/test-gpu.log")
cat "$OUT/test-gpu.log" >>"$LOG"
[ $rc -eq 0 ] && st=ok || st=FAIL
grep -q "^SKIP" "$OUT/test-gpu.log" && ! grep -q "^PASS" "$OUT/test-gpu.log" && st=skip
row "tests/run.sh --gpu" $st "$(elapsed $t)" "$summary"

# ---- 3. one MoE layer at 25 600 tokens ---------------------------------------------------------------
t=$(date +%s)
say "MoE layer, DeepSeekMoE-16B shape, $TOKENS tokens"
smi_start
# (rehearsal: the emulator skips the arithmetic here; the figures are meaningless)
$([ "$MODE" = --rehearse ] && echo env MOE_CUDA_EMU_NOCOMPUTE=1) \
    timeout 120 $B/bench/gpu_moe_layer --tokens "$TOKENS" --iters 5 >"$WORK/layer.json" 2>>"$LOG"
rc=$?
mem=$(smi_stop)
fig=$(sed 's/.*"ms_grouped":\([0-9.]*\),"tflops_grouped":\([0-9.]*\),"ms_loop":\([0-9.]*\),"tflops_loop":\([0-9.]*\),"peak_bf16_tflops":\([0-9.]*\),.*/grouped \1 ms = \2 TFLOP\/s vs peak \5; per-expert loop \3 ms = \4/' "$WORK/layer.json")
fig="$fig; experts+combine ops (the model's path) $(sed 's/.*"ms_experts_op":\([0-9.]*\),"tflops_experts_op":\([0-9.]*\),.*/\1 ms = \2 TFLOP\/s/' "$WORK/layer.json")"
json_row "MoE layer ${TOKENS} tok" $rc "$WORK/layer.json" $t "$fig; $mem"

# ---- 4. a DeepSeekMoE-16B-shaped checkpoint with LAYERS layers ------------------------------------------
MODEL=$WORK/ds16b
# DeepSeekMoE-16B's config.json with fewer layers
H=2048 NH=16 IM=10944 MI=1408 NE=64 V=102400
if [ "$MODE" = --rehearse ]; then # small shape here: the point is the plumbing
    H=256 NH=4 IM=512 MI=96 NE=16 V=1024 SEQS=4 LEN=64
fi
cat >"$WORK/config.json" <<EOF
{"architectures": ["DeepseekForCausalLM"], "model_type": "deepseek",
 "hidden_size": $H, "intermediate_size": $IM, "moe_intermediate_size": $MI,
 "num_hidden_layers": $LAYERS, "num_attention_heads": $NH, "num_key_value_heads": $NH,
 "n_routed_experts": $NE, "n_shared_experts": 2, "num_experts_per_tok": 6,
 "first_k_dense_replace": 1, "moe_layer_freq": 1, "norm_topk_prob": false,
 "scoring_func": "softmax", "hidden_act": "silu", "max_position_embeddings": 4096,
 "rms_norm_eps": 1e-06, "rope_theta": 10000, "vocab_size": $V, "tie_word_embeddings": false,
 "attention_bias": false, "torch_dtype": "bfloat16"}
EOF
t=$(date +%s)
say "moe-init deepseek (DeepSeekMoE-16B shape), $LAYERS layers"
if timeout 180 moe-init --config "$WORK/config.json" --seed 1 --quiet -o "$MODEL" >>"$LOG" 2>&1; then
    row "moe-init 16B-shape x$LAYERS" ok "$(elapsed $t)" "$(du -sh "$MODEL" | cut -f1) on disk (H=$H E=$NE)"
else
    row "moe-init 16B-shape x$LAYERS" FAIL "$(elapsed $t)" "see log.txt"
    MODEL=
fi

# ---- 5. whole forward (layer-major, all tokens on the GPU), logits vs the CPU ---------------------------
TOK=$WORK/tokens.msgpack.zst
if [ -n "$MODEL" ]; then
    $B/bench/gpu_forward tokens --model "$MODEL" --seqs "$SEQS" --len "$LEN" -o "$TOK" >>"$LOG" 2>&1 || TOK=
    t=$(date +%s)
    say "forward $SEQS x $LEN tokens"
    smi_start
    timeout 150 $B/bench/gpu_forward forward --model "$MODEL" --seqs "$SEQS" --len "$LEN" --check-tokens 32 \
        >"$WORK/fwd.json" 2>>"$LOG"
    rc=$?
    mem=$(smi_stop)
    fig=$(sed 's/.*"seconds":\([0-9.]*\),"tokens_per_s":\([0-9]*\),"backend_peak_bytes":\([0-9]*\),.*"logits_rel_err_vs_cpu":\([-0-9.e]*\).*/\1 s, \2 tok\/s, backend peak \3 B, logits vs CPU \4/' "$WORK/fwd.json")
    json_row "forward ${SEQS}x${LEN}" $rc "$WORK/fwd.json" $t "$fig; $mem"
    # the same forward with the old weight path (f32 staging on the host): the load
    # path's gain, measured in the same run
    if [ $rc -eq 0 ]; then
        t=$(date +%s)
        say "forward $SEQS x $LEN tokens, MOE_STAGE_F32=1"
        MOE_STAGE_F32=1 timeout 150 $B/bench/gpu_forward forward --model "$MODEL" --seqs "$SEQS" \
            --len "$LEN" >"$WORK/fwd32.json" 2>>"$LOG"
        rc=$?
        cat "$WORK/fwd32.json" >>"$LOG"
        if [ $rc -eq 0 ]; then
            s_new=$(sed 's/.*"seconds":\([0-9.]*\).*/\1/' "$WORK/fwd.json")
            s_old=$(sed 's/.*"seconds":\([0-9.]*\).*/\1/' "$WORK/fwd32.json")
            row "forward, f32 staging" ok "$(elapsed $t)" \
                "$s_old s; direct BF16 staging is $(awk -v a="$s_old" -v b="$s_new" 'BEGIN { printf "%.2f", a / b }')x faster"
        else
            row "forward, f32 staging" FAIL "$(elapsed $t)" "exit $rc, see log.txt"
        fi
    fi
fi

# ---- 6. moe-calib and moe-expert-rank on the GPU (when the tools are in this build) ---------------------
run_tool() { # name, timeout, command...
    name=$1 lim=$2; shift 2
    t=$(date +%s)
    say "$name"
    smi_start
    timeout "$lim" "$@" >"$WORK/tool.err" 2>&1
    rc=$?
    cat "$WORK/tool.err" >>"$LOG"
    mem=$(smi_stop)
    peak=$(sed -n 's/.*\(device peak [0-9.]* GiB\).*/\1/p' "$WORK/tool.err" | tail -n 1)
    [ -n "$peak" ] && mem="$peak (allocated); $mem"
    if [ $rc -eq 0 ]; then row "$name" ok "$(elapsed $t)" "$mem"
    else row "$name" FAIL "$(elapsed $t)" "exit $rc (4 = device error), see log.txt; $mem"; fi
    echo "{\"step\":\"$name\",\"exit\":$rc,\"seconds\":$(elapsed $t),\"mem\":\"$mem\"}" >>"$RES"
    return $rc
}
if [ -n "$MODEL" ] && [ -n "$TOK" ]; then
    if [ -x "$BIN/moe-calib" ]; then
        if run_tool "moe-calib --device $DEV" 120 moe-calib --device "$DEV" --model "$MODEL" "$TOK" -o "$WORK/calib.zst"; then
            if [ -x "$BIN/moe-expert-rank" ]; then
                run_tool "moe-expert-rank --device $DEV" 150 moe-expert-rank --device "$DEV" \
                    --model "$MODEL" "$WORK/calib.zst" -o "$WORK/rank.zst" &&
                    moe-dump --type ranking "$WORK/rank.zst" 2>/dev/null | head -c 2000 >>"$LOG" &&
                    run_tool "moe-layer-search --device $DEV" 120 moe-layer-search --device "$DEV" \
                        --model "$MODEL" --experts 2 --layers 1 --max-length 64 "$WORK/rank.zst" \
                        -o "$WORK/plan.zst"
            fi
        fi
    else
        row "moe-calib / moe-expert-rank" skip 0 "not in this build"
    fi
    [ -x "$BIN/moe-eval" ] && run_tool "moe-eval --ppl --device $DEV" 90 moe-eval --device "$DEV" \
        --model "$MODEL" --ppl "$TOK" --limit 8 --json -o "$WORK/eval.zst"
fi

# ---- 7. training steps (lib/train.h, moe-tune's engine) on a condensed copy --------------------
# Condensed layers 1 and 3 (E(2+6), bench/lib/condense-fixed.sh) of the 16B-shaped model;
# MOE_TRAIN_CONDENSED, 8 x 256 tokens, AdamW: seconds per step, tokens/s, model TFLOP/s
# (forward + backward, bench/gpu_train.c), peak GPU memory; with and without recompute.
if [ -n "$MODEL" ] && [ -x $B/bench/gpu_train ]; then
    CMODEL=$WORK/ds16b-cond
    TSEQS=8 TLEN=256 TSTEPS=4
    [ "$MODE" = --rehearse ] && TSEQS=2 TLEN=64 TSTEPS=2
    CL="1 3"
    [ "$LAYERS" -lt 4 ] && CL=1
    if BIN=$BIN sh bench/lib/condense-fixed.sh "$MODEL" "$CMODEL" "$CL" >>"$LOG" 2>&1; then
        for rec in "" --recompute; do
            name="train ${TSEQS}x${TLEN}${rec:+ recompute}"
            t=$(date +%s)
            say "$name"
            smi_start
            timeout 150 $B/bench/gpu_train --model "$CMODEL" --seqs $TSEQS --len $TLEN \
                --steps $TSTEPS $rec >"$WORK/train.json" 2>>"$LOG"
            rc=$?
            mem=$(smi_stop)
            fig=$(sed 's/.*"step_seconds":\([0-9.]*\),"tokens_per_s":\([0-9]*\),"tflops":\([0-9.]*\),"loss":\([0-9.]*\),.*"backend_peak_bytes":\([0-9]*\),.*/\1 s\/step, \2 tok\/s, \3 TFLOP\/s, loss \4, backend peak \5 B/' "$WORK/train.json")
            json_row "$name" $rc "$WORK/train.json" $t "$fig; $mem"
        done
    else
        row "train (condense)" FAIL 0 "bench/lib/condense-fixed.sh failed, see log.txt"
    fi
fi

# ---- table ------------------------------------------------------------------------------------------------
{
    echo "cdmoe gpu-check $(date -u '+%Y-%m-%d %H:%M UTC') $(git rev-parse --short HEAD 2>/dev/null) mode=$MODE, $(elapsed "$T_START") s"
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    printf '%-30s %-6s %6s  %s\n' step status secs figures
    cat "$TABLE"
} >"$OUT/summary.txt"
echo
cat "$OUT/summary.txt"
! grep -q " FAIL " "$TABLE"
