#!/bin/sh
# demo.sh - what `make demo` runs: CD-MoE on the built-in trained default,
# models/default (a small DeepSeekMoE trained on TinyStories; recipe:
# pipelines/train-demo.sh), with nothing beyond the repository.
#
#   pipelines/demo.sh [--out DIR] [--no-sweep] [--tune]
#
# 1. pipelines/cd-moe.sh: calibration on models/default/data/calib.jsonl,
#    LAYERS (default 3) of the 5 MoE layers condensed to E(1+EXPERTS)
#    (default 4), dense vs condensed: perplexity on the held-out
#    heldout.jsonl, story-cloze accuracy, speed and memory
#    (OUT/cd-moe/06-eval.txt).
# 2. pipelines/sweep.sh (unless --no-sweep): CD-MoE E(s+0), E(s+4) against
#    LayerDrop, BlockDrop and expert pruning over 1 to 5 MoE layers (12 and
#    8 experts kept); the table OUT/sweep/sweep.md and the plots of held-out
#    perplexity (OUT/sweep/sweep-memory.svg, sweep-speedup.svg) and of
#    story-cloze accuracy (sweep-memory-acc.svg, sweep-speedup-acc.svg).
#    --tune also tunes every checkpoint and the dense model (moe-tune on
#    data/tune.jsonl, every weight, TUNE_ARGS, default 50 steps of 16 x 128
#    tokens, lr 3e-4 to 3e-5; TUNE_TRAIN=paper: CD-MoE only its condensed
#    layers' experts) and adds the METHOD+tune rows and the dense+tune
#    control: about ten more minutes on 2 cores.
# Tasks from ../shared (PIQA and COPA in MosaicML's JSONL, their
# first SHARED_ITEMS (default 200) items) are added to stage 1 when present.
# Everything goes under --out (default work/demo); a rerun reuses it.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
out=work/demo sweep=1 tune=
while [ $# -gt 0 ]; do
    case $1 in
    --out) out=$2; shift 2 ;;
    --no-sweep) sweep=0; shift ;;
    --tune) tune=--tune; shift ;;
    -h|--help) sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "demo.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
model=$here/models/default data=$here/models/default/data
# from the repository's root (make demo), the tables name the model as models/default
[ "$(pwd -P)" != "$(cd "$here" && pwd -P)" ] || model=models/default
[ -f "$model/config.json" ] || { echo "demo.sh: $model: the default model is missing" >&2; exit 3; }
mkdir -p "$out"

# ../shared's tasks, cut to their first items so that the demo stays short
tasks=$data/story-cloze.jsonl
shared_eval=$here/../shared/data/eval/llm-foundry
for t in piqa copa; do
    f=$(ls "$shared_eval"/$t*.jsonl 2>/dev/null | head -n 1) || true
    [ -n "$f" ] || continue
    head -n "${SHARED_ITEMS:-200}" "$f" >"$out/$t.jsonl"
    tasks="$tasks $out/$t.jsonl"
done

echo "demo: dense vs condensed ($out/cd-moe)" >&2
LAYERS=${LAYERS:-3} EXPERTS=${EXPERTS:-4} PPL=$data/heldout.jsonl TASKS=$tasks \
    sh "$here/pipelines/cd-moe.sh" "$model" "$data/calib.jsonl" --out "$out/cd-moe" --last 6 >/dev/null
cat "$out/cd-moe/06-eval.txt"
[ "$sweep" = 1 ] || exit 0
echo "demo: CD-MoE against the baselines ($out/sweep)" >&2
TUNE_ARGS=${TUNE_ARGS:---steps 50 --batch 16 --max-length 128 --lr 3e-4 --min-lr 3e-5 --warmup 5} \
BENCH_TOKENS=${BENCH_TOKENS:-512} BENCH_RUNS=${BENCH_RUNS:-5} PLOT_Y=perplexity \
    sh "$here/pipelines/sweep.sh" "$model" "$data/calib.jsonl" "$data/heldout.jsonl" "$data/story-cloze.jsonl" \
    --out "$out/sweep" --layers "1 2 3 4 5" --methods "cdmoe-s0 cdmoe-sk layerdrop blockdrop prune-freq prune-reap" \
    $tune --tune-data "$data/tune.jsonl"
