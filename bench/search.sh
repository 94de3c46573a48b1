#!/bin/sh
# bench/search.sh - moe-expert-rank and moe-layer-search, fast vs --naive (the
# original algorithm: a full model forward per candidate), same model, same
# run; and the cost model for DeepSeekMoE-16B.
set -u
cd "$(dirname "$0")/.."
: "${BIN:=bin}"
PATH="$BIN:$PATH"
TMP=$(mktemp -d /tmp/cdmoe-bench.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
M=$TMP/model
TOK=tests/fixtures/search/deepseek-l5/tokens.msgpack.zst
REPS=${REPS:-3}
# a small random DeepSeekMoE (hidden 256, 4 MoE layers x 16 experts, top-4; 20 MB)
moe-init --arch deepseek --hidden 256 --layers 5 --experts 16 --top-k 4 --moe-intermediate 128 \
    --intermediate 512 --std 0.05 --norm-std 0.1 --seed 7 -o $M >/dev/null || exit 1

moe-calib --quiet --model $M $TOK >"$TMP/calib" || exit 1
now() { date +%s.%N; }
timeit() { # label, command...: best of REPS wall times
    label=$1; shift
    best=
    i=0
    while [ $i -lt "$REPS" ]; do
        t0=$(now); "$@" >/dev/null 2>&1 || { echo "$label failed"; exit 1; }; t1=$(now)
        best=$(echo "$t0 $t1 ${best:-1e9}" | awk '{d = $2 - $1; print (d < $3 ? d : $3)}')
        i=$((i + 1))
    done
    echo "$best"
}

echo "model: moe-init deepseek, hidden 256, 4 MoE layers x 16 experts, top-4; 63 tokens; threads 1"
fast=$(timeit fast moe-expert-rank --threads 1 --quiet --model $M --max-length 0 "$TMP/calib")
naive=$(REPS=1 timeit naive moe-expert-rank --threads 1 --quiet --naive --model $M --max-length 0 "$TMP/calib")
echo "$fast $naive" | awk '{printf "moe-expert-rank: fast %.4f s, naive %.4f s, speedup x%.1f\n", $1, $2, $2 / $1}'
moe-expert-rank --threads 1 --quiet --model $M --max-length 0 "$TMP/calib" >"$TMP/rank" 2>/dev/null
fast=$(timeit fast moe-layer-search --threads 1 --quiet --model $M --experts 4 --max-length 0 "$TMP/rank")
naive=$(timeit naive moe-layer-search --threads 1 --quiet --naive --model $M --experts 4 --max-length 0 "$TMP/rank")
echo "$fast $naive" | awk '{printf "moe-layer-search: fast %.4f s, naive %.4f s, speedup x%.1f\n", $1, $2, $2 / $1}'
moe-expert-rank --threads 1 --model $M --max-length 0 "$TMP/calib" 2>&1 >/dev/null | grep -v warning | sed 's/^/  fast:  /'
moe-expert-rank --threads 1 --naive --model $M --max-length 0 "$TMP/calib" 2>&1 >/dev/null | grep -v warning | sed 's/^/  naive: /'

# Layer search when the weights stream (a checkpoint over 1 GiB unloads every
# layer after use; forced here with --stream-weights on a 13-layer model, 47 MB):
# layer-major (default) vs candidate-major (the previous loop), same output.
M2=$TMP/model13
moe-init --arch deepseek --hidden 256 --layers 13 --experts 16 --top-k 4 --moe-intermediate 128 \
    --intermediate 512 --std 0.05 --norm-std 0.1 --seed 7 -o $M2 >/dev/null || exit 1
moe-calib --quiet --model $M2 $TOK >"$TMP/calib13" || exit 1
moe-expert-rank --threads 1 --quiet --model $M2 --max-length 0 "$TMP/calib13" >"$TMP/rank13" 2>/dev/null || exit 1
loads() { moe-layer-search --threads 1 "$@" 2>&1 >/dev/null | sed -n 's/.*, \([0-9]*\) layer loads$/\1/p'; }
for kept in streamed kept; do
    sw=--stream-weights; [ $kept = kept ] && sw=
    a="$sw --model $M2 --experts 4 --max-length 0 $TMP/rank13"
    moe-layer-search --threads 1 --quiet --no-provenance $a >"$TMP/lm" || exit 1
    moe-layer-search --threads 1 --quiet --no-provenance --candidate-major $a >"$TMP/cm" || exit 1
    cmp -s "$TMP/lm" "$TMP/cm" || { echo "layer-major and candidate-major outputs differ"; exit 1; }
    lm=$(REPS=${REPS_STREAM:-2} timeit layer-major moe-layer-search --threads 1 --quiet $a)
    cm=$(REPS=${REPS_STREAM:-2} timeit candidate-major moe-layer-search --threads 1 --quiet --candidate-major $a)
    echo "$lm $cm $(loads $a) $(loads --candidate-major $a)" | awk -v k=$kept '{printf "moe-layer-search, 13 layers (12 MoE, 12 steps), weights %s: layer-major %d layer loads %.3f s, candidate-major %d loads %.3f s: loads x%.2f fewer, speedup x%.2f (same output)\n", k, $3, $1, $4, $2, $4 / $3, $2 / $1}'
done

# Cost model, DeepSeekMoE-16B as the original ran it: 27 MoE layers (decoder
# layers 1..27 of 28), 64 routed experts (1408 wide), 6 picked per layer,
# hidden 2048, ~2.8e9 active parameters per token, 100 texts x 256 tokens.
awk 'BEGIN {
    L = 27; E = 64; K = 6; T = 25600; H = 2048; I = 1408; act = 2.8e9; N = 15
    cand = 0; for (k = 0; k < K; k++) cand += E - k
    fwd_orig = L * (cand + 1)                 # a full forward per candidate + 1 reference per layer
    fl_orig = fwd_orig * T * 2 * act
    fl_fast = T * 2 * act + L * E * T * 2 * 3 * H * I    # one layer-major pass + each expert once
    printf "DeepSeekMoE-16B expert ranking: original %d model forwards (%.2e FLOP); ours 1 forward + %d expert evaluations per token (%.2e FLOP), x%.0f fewer\n", fwd_orig, fl_orig, L * E, fl_fast, fl_orig / fl_fast
    lo = 0; lf = 0
    for (s = 0; s < N; s++) { lo += L - s }    # layer search, N = 15 steps as published
    # ours: a candidate c restarts at decoder layer c: (28 - c) / 28 of a forward, c = 1..27
    for (s = 0; s < N; s++) { for (c = 1; c <= L; c++) lf += (28 - c) / 28.0 * (L - s) / L }
    printf "DeepSeekMoE-16B layer search (15 steps): original %d model forwards; ours ~%.0f forward equivalents (prefix cache), x%.1f fewer\n", lo, lf + N, lo / (lf + N)
    # layer loads when streaming (28 decoder layers, MoE 1..27; candidates
    # taken at the average start, layer 14): candidate-major loads layers
    # c..27 per candidate + the rebuild from the chosen layer; layer-major one
    # pass per step (one budget batch): the checkpoint kind of each layer
    # once + one condensed load (attention, 6 experts, shared) per candidate
    cm = 0; lmj = 0
    for (s = 0; s < N; s++) { cm += (L - s) * 14 + 14; lmj += 27 + (L - s) }
    printf "DeepSeekMoE-16B layer search (15 steps), streamed layers: candidate-major ~%d layer loads, layer-major ~%d (x%.1f fewer; %d of them condensed: 6 of 64 experts)\n", cm, lmj, cm / lmj, lmj - 27 * N
}'
