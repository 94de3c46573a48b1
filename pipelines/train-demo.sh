#!/bin/sh
# train-demo.sh - the recipe of models/default, the built-in model of `make demo`.
#
#   pipelines/train-demo.sh [--out DIR] [--steps N] [--stop-after S]
#
# A small DeepSeekMoE (model_type deepseek: 6 layers, hidden 128, the first
# layer dense, then 16 routed experts of width 64, top-4, and 1 shared expert
# per MoE layer; 1024-id byte-level BPE) trained from moe-init's random
# weights with `moe-tune --train all` (every weight, plus the load-balancing
# loss) on TinyStories from ../shared/data/lm/tinystories (the train files;
# the valid file is held out: models/default/data/ holds the samples drawn
# from it).  The tokenizer needs a Python with Hugging Face `tokenizers`
# (PYTHON=...; pip install tokenizers).  Writes DIR/model (default work/train-demo/model);
# copy it to models/default to replace the committed one.
# --stop-after S stops at step S of the N-step schedule (moe-tune --stop-after:
# the weights are those of step S of the full run).  models/default is the
# whole 1500-step run (5.5 minutes on 2 quiet cores).
# Reproducible: the whole recipe run with THREADS=2, with THREADS=1, and once
# more by hand with the same commands gave byte-identical model.safetensors.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-$here/bin}
PYTHON=${PYTHON:-python3}
SHARED=${SHARED:-$here/../shared}
THREADS=${THREADS:-2}
out=work/train-demo steps=1500 stop=
while [ $# -gt 0 ]; do
    case $1 in
    --out) out=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --stop-after) stop="--stop-after $2"; shift 2 ;;
    -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "train-demo.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
ts=$SHARED/data/lm/tinystories
train1=$ts/TinyStories-train-head_944KB.txt train2=$ts/TinyStoriesV2-GPT4-train-head10k-lines.txt
for f in "$train1" "$train2"; do
    [ -f "$f" ] || { echo "train-demo.sh: $f: missing (the TinyStories text of ../shared)" >&2; exit 3; }
done
mkdir -p "$out"
log() { echo "train-demo: $*" >&2; }

log "tokenizer: byte-level BPE, 1024 ids, on the train files"
init=$out/init
"$BIN/moe-init" --arch deepseek --hidden 128 --layers 6 --heads 4 --kv-heads 4 --first-dense 1 \
    --experts 16 --top-k 4 --shared 1 --moe-intermediate 64 --intermediate 256 --vocab 1024 \
    --max-pos 512 --dtype bf16 --seed 1 --force -o "$init" --quiet
"$PYTHON" "$here/pipelines/train-tokenizer.py" --vocab 1024 -o "$init/tokenizer.json" "$train1" "$train2"
# the trained tokenizer's BOS and EOS (ids 1022 and 1023) replace moe-init's byte-level ones
sed -i 's/"bos_token_id": [0-9]*/"bos_token_id": 1022/; s/"eos_token_id": [0-9]*/"eos_token_id": 1023/' \
    "$init/config.json"
cat >"$init/tokenizer_config.json" <<'JSON'
{
  "add_bos_token": true,
  "add_eos_token": false,
  "bos_token": "<|begin_of_text|>",
  "clean_up_tokenization_spaces": false,
  "eos_token": "<|end_of_text|>",
  "model_max_length": 512,
  "tokenizer_class": "PreTrainedTokenizerFast"
}
JSON

log "data: train paragraphs packed into records of at most 480 characters"
"$PYTHON" "$here/pipelines/demo-data.py" train 480 "$train1" "$train2" >"$out/train.jsonl"

log "training: $steps steps of 16 sequences of at most 128 tokens, AdamW, every weight"
"$BIN/moe-tune" --model "$init" -o "$out/model" --force --data "$out/train.jsonl" --train all \
    --steps "$steps" --lr 3e-3 --min-lr 3e-4 --warmup 100 --batch 16 --max-length 128 --aux-coef 0.001 \
    --weight-decay 0.1 --seed 1 --threads "$THREADS" --device cpu --save-every 100 \
    --log "$out/tune.msgpack.zst" $stop
rm -f "$out/model/tune-state.safetensors" # the resume state (optimizer moments): not part of the model
log "done: $out/model"
