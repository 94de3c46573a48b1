#!/bin/sh
# bench/backward.sh - the CPU backward ops that carry training's FLOPs
# (matmul_backward, attention_backward) against PyTorch autograd's backward of
# the same ops, and matmul_backward against the same two products as threaded
# OpenBLAS sgemms; all cores on both sides, measured in the same run.
# Shapes: DeepSeekMoE-16B's (hidden 2048, expert 1408, 16 heads of 128) at 512
# tokens, a small model's, and GQA.  PyTorch: $CDMOE_REF_PYTHON, else
# .venv-ref/bin/python, else python3 (skipped without torch).  BENCH_THREADS=N:
# N threads on every side (default all cores); BENCH_CLOCK=cpu: process CPU time
# instead of the wall clock (BENCH_THREADS=1 BENCH_CLOCK=cpu: the steadiest
# figures on a busy machine).
set -eu
cd "$(dirname "$0")/.."
: "${BUILD:=build}"
make -s "$BUILD/bench/backward_bench" >/dev/null
BB=$BUILD/bench/backward_bench
PY=${CDMOE_REF_PYTHON:-}
[ -n "$PY" ] || { [ -x .venv-ref/bin/python ] && PY=.venv-ref/bin/python; } || PY=python3
$PY -c 'import torch' 2>/dev/null || PY=
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}
echo "-- machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg); threads: ${BENCH_THREADS:-all}, clock: ${BENCH_CLOCK:-wall}"
[ -n "$PY" ] || echo "-- no torch: PyTorch columns skipped"

# value of KEY in the lines of $1
val() { printf '%s\n' "$1" | sed -n "s/^$2=//p"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a > 0 && b > 0) printf "%.2f", b / a; else printf "n/a" }'; }

for s in "512 2048 2816" "512 1408 2048" "2048 256 704"; do
    set -- $s
    key=matmul_T$1_K$2_N$3
    ours=$($BB matmul "$@")
    o=$(val "$ours" "${key}_ours_ms") b=$(val "$ours" "${key}_openblas_ms") t=
    [ -z "$PY" ] || t=$(val "$($PY bench/backward_torch.py matmul "$@")" "${key}_torch_ms")
    echo "matmul_backward T=$1 K=$2 N=$3 (dx+dw): ours ${o} ms ($(val "$ours" "${key}_ours_gflops") GFLOP/s)," \
        "openblas ${b} ms, torch ${t:-n/a} ms; speed-up vs openblas $(ratio "$o" "$b"), vs torch $(ratio "$o" "${t:-0}")"
done
for s in "256 16 16 128" "1024 16 16 128" "512 32 4 128"; do
    set -- $s
    key=attention_T$1_H$2_KV$3_D$4
    ours=$($BB attention "$@")
    o=$(val "$ours" "${key}_ours_ms") t=
    [ -z "$PY" ] || t=$(val "$($PY bench/backward_torch.py attention "$@")" "${key}_torch_ms")
    echo "attention_backward T=$1 heads=$2 kv=$3 D=$4: ours ${o} ms ($(val "$ours" "${key}_ours_gflops") GFLOP/s)," \
        "torch (SDPA) ${t:-n/a} ms; speed-up vs torch $(ratio "$o" "${t:-0}")"
done
