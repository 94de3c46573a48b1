#!/bin/sh
# cd-moe.sh - the whole CD-MoE method, end to end, keeping every intermediate.
#
#   pipelines/cd-moe.sh [MODEL_DIR [CALIB.jsonl]] [--out DIR] [--stage N] [--last N]
#                       [--self-calib N]
#
# With no MODEL_DIR, runs on a tiny random model written by moe-init and
# calibration text generated here (the plumbing, as the tests run it); `make
# demo` (pipelines/demo.sh) runs it on the trained default, models/default.
# --self-calib N: data-free calibration, on N texts the model writes itself
# (moe-generate from BOS alone, sampled at temperature 1, seed 1, MAX_LENGTH
# tokens each; kept as OUT/00-self-calib.jsonl) instead of CALIB.jsonl.
# Stages (each writes OUT/NN-name.msgpack.zst and a log OUT/NN-name.log):
#   1 tokenize   2 calibrate   3 rank experts   4 search layers
#   5 condense   6 evaluate dense vs condensed
#   7 tune (optional: only with TUNE_DATA=FILE, moe-tune's --data; TUNE_SFT=FILE
#     adds its second stage, TUNE_ARGS more options): trains the condensed
#     layers' experts into OUT/tuned and evaluates condensed vs tuned
# --stage N resumes at stage N, reusing the outputs of the earlier stages;
# --last N stops after stage N (cd-moe-slurm.sh runs the ranking in between).
# Stages whose tool is not built yet are reported and skipped.
set -eu

# ---- settings -------------------------------------------------------------
EXPERTS=${EXPERTS:-2}        # routed experts kept per condensed layer (K)
LAYERS=${LAYERS:-2}          # decoder layers to condense (N)
MAX_LENGTH=${MAX_LENGTH:-256}
TASKS=${TASKS:-}             # multiple-choice task files for stage 6 (space-separated)
PPL=${PPL:-}                 # held-out {"text"} JSONL for stage 6's perplexity (default: CALIB)
TUNE_DATA=${TUNE_DATA:-}     # stage 7: training text for moe-tune (empty: no stage 7)
TUNE_SFT=${TUNE_SFT:-}       # stage 7: a second (SFT) stage's data
TUNE_ARGS=${TUNE_ARGS:-}     # stage 7: more moe-tune options (e.g. "--epochs 2 --lr 2e-5")
here=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-$here/bin}
PATH="$BIN:$PATH"

model= calib= out=work/cd-moe stage=1 last=7 self_calib=
while [ $# -gt 0 ]; do
    case $1 in
    --out) out=$2; shift 2 ;;
    --stage) stage=$2; shift 2 ;;
    --last) last=$2; shift 2 ;;
    --self-calib) self_calib=$2; shift 2
        case $self_calib in ''|*[!0-9]*|0) echo "cd-moe.sh: --self-calib needs a number of texts above 0" >&2
            exit 2 ;; esac ;;
    -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "cd-moe.sh: unknown option $1" >&2; exit 2 ;;
    *) if [ -z "$model" ]; then model=$1; elif [ -z "$calib" ]; then calib=$1;
       else echo "cd-moe.sh: too many arguments" >&2; exit 2; fi; shift ;;
    esac
done
mkdir -p "$out"

have() { [ -x "$BIN/$1" ]; }
log() { echo "cd-moe: $*" >&2; }
check() { moe-dump --check "$1" >&2; }

# ---- the built-in default ---------------------------------------------------
if [ -z "$model" ]; then
    model=$out/model calib=$out/calib.jsonl
    if have moe-init && [ ! -d "$model" ]; then
        log "default: tiny random deepseek-style model in $model"
        moe-init --arch deepseek --hidden 64 --layers 6 --heads 4 --kv-heads 4 --experts 8 --top-k 2 \
            --shared 2 --moe-intermediate 32 --intermediate 128 --vocab 512 --seed 1 -o "$model" >&2
    fi
    if [ ! -f "$calib" ]; then
        i=0
        while [ $i -lt 16 ]; do
            echo "{\"text\": \"Sample $i: the quick brown fox number $i jumps over $((i * 7)) lazy dogs, then rests.\"}"
            i=$((i + 1))
        done >"$calib"
    fi
fi

# ---- data-free calibration: text the model writes itself ---------------------
if [ -n "$self_calib" ]; then
    [ -z "$calib" ] || [ "$calib" = "$out/calib.jsonl" ] \
        || { echo "cd-moe.sh: --self-calib replaces CALIB.jsonl: give one or the other" >&2; exit 2; }
    calib=$out/00-self-calib.jsonl
    if [ "$stage" -le 1 ] || [ ! -f "$calib" ]; then
        log "self-calibration: $self_calib texts of $MAX_LENGTH tokens written by the model"
        moe-generate --model "$model" --prompt '' --samples "$self_calib" --temperature 1 --seed 1 \
            --max-new-tokens "$MAX_LENGTH" --jsonl >"$calib.tmp" 2>"$out/00-self-calib.log" \
            || { rm -f "$calib.tmp"; log "moe-generate failed: $(tail -n 1 "$out/00-self-calib.log")"; exit 1; }
        mv "$calib.tmp" "$calib"
    fi
fi

run_stage() { # number name tool
    n=$1 name=$2 tool=$3
    if [ "$n" -lt "$stage" ] || [ "$n" -gt "$last" ]; then return 1; fi
    if ! have "$tool"; then log "stage $n ($name): $tool is not built yet; skipped"; return 1; fi
    log "stage $n: $name"
    return 0
}

s1=$out/01-tokens.msgpack.zst s2=$out/02-calib.msgpack.zst s3=$out/03-ranked.msgpack.zst
s4=$out/04-plan.msgpack.zst
if run_stage 1 tokenize moe-tokenize; then
    moe-tokenize --model "$model" --max-length "$MAX_LENGTH" -o "$s1" "$calib" 2>"$out/01-tokenize.log"
    check "$s1"
fi
if run_stage 2 calibrate moe-calib; then
    moe-calib --model "$model" "$s1" >"$s2" 2>"$out/02-calib.log"; check "$s2"
fi
if run_stage 3 "rank experts" moe-expert-rank; then
    moe-expert-rank --model "$model" --max-experts "$EXPERTS" --max-length "$MAX_LENGTH" "$s2" >"$s3" \
        2>"$out/03-rank.log"
    check "$s3"
fi
if run_stage 4 "search layers" moe-layer-search; then
    moe-layer-search --model "$model" --experts "$EXPERTS" --max-length "$MAX_LENGTH" "$s3" >"$s4" \
        2>"$out/04-search.log"
    check "$s4"
fi
if run_stage 5 condense moe-condense; then
    moe-condense --model "$model" --layers "$LAYERS" --experts "$EXPERTS" --force -o "$out/condensed" "$s4" \
        2>"$out/05-condense.log" | tee "$out/05-condense.txt" >&2
fi
if run_stage 6 evaluate moe-eval && [ -d "$out/condensed" ]; then
    # dense vs condensed side by side: perplexity, tasks, speed and memory
    tasks=
    for t in ${TASKS:-}; do tasks="$tasks --task $t"; done
    moe-eval --model "$model" --model "$out/condensed" --ppl "${PPL:-$calib}" $tasks --bench \
        -o "$out/06-eval.msgpack.zst" 2>"$out/06-eval.log" | tee "$out/06-eval.txt"
fi
if [ -n "$TUNE_DATA" ] && run_stage 7 tune moe-tune && [ -d "$out/condensed" ]; then
    sft=
    [ -n "$TUNE_SFT" ] && sft="--sft $TUNE_SFT"
    # shellcheck disable=SC2086 # TUNE_ARGS: words on purpose
    moe-tune --model "$out/condensed" -o "$out/tuned" --force --data "$TUNE_DATA" $sft --val "$calib" \
        --log "$out/07-tune.msgpack.zst" $TUNE_ARGS 2>"$out/07-tune.log" | tee "$out/07-tune.txt" >&2
    moe-eval --model "$out/condensed" --model "$out/tuned" --ppl "${PPL:-$calib}" -o "$out/07-eval.msgpack.zst" \
        2>>"$out/07-tune.log" | tee -a "$out/07-tune.txt"
fi

# Whatever was produced: show that every stream is whole and readable.
found=0
for f in "$out"/*.msgpack.zst; do
    [ -f "$f" ] || continue
    found=1
    moe-dump --check "$f"
done
if [ $found -eq 0 ]; then
    # Nothing upstream exists yet: a stream round trip through the tools that do.
    printf '\204\246format\252moe-stream\247version\001\245kinds\220\252provenance\220\202\244type\243end\247records\000' \
        | zstd -q -c | moe-merge - >"$out/00-roundtrip.msgpack.zst"
    moe-dump "$out/00-roundtrip.msgpack.zst"
    moe-dump --check "$out/00-roundtrip.msgpack.zst"
fi
log "done; intermediates in $out"
