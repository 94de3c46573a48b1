#!/bin/sh
# bench/lm-eval-compare.sh - lm-evaluation-harness on a condensed checkpoint
# (modeling_cdmoe.py, trust_remote_code) against moe-eval --task, same items.
#
#   bench/lm-eval-compare.sh [ARCH [TASK.jsonl [N]]]
#
# Makes a tiny float32 ARCH model (moe-init, default qwen3_moe), condenses its
# last MoE layers, writes an lm-eval task YAML for the first N (default 40)
# items of TASK.jsonl (MosaicML {"query","choices","gold"}, delimiter " ";
# default ../shared OpenBookQA), runs both offline and prints acc, acc_norm and
# the largest relative difference of the per-choice log-likelihoods.
# Needs PY (default .venv-ref/bin/python) with torch, transformers, lm-eval,
# accelerate, msgpack and zstandard.  Not part of make test.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
arch=${1:-qwen3_moe}
task=${2:-$here/../shared/data/eval/llm-foundry/openbook_qa.jsonl}
n=${3:-40}
PY=${PY:-$here/.venv-ref/bin/python}
PATH="$here/bin:$(dirname "$PY"):$PATH"
[ -f "$task" ] || { echo "lm-eval-compare: $task: no such file" >&2; exit 2; }
w=$(mktemp -d /tmp/cdmoe-lmeval.XXXXXX)
trap 'rm -rf "$w"' EXIT
cd "$w"
moe-init --quiet --arch "$arch" --hidden 32 --layers 3 --experts 8 --top-k 2 --vocab 512 --dtype f32 \
    --std 0.15 --seed 5 -o base
"$PY" "$here/tests/shell/hf_load_check.py" plan base .
moe-condense --model base --layers 1 --experts 2 -o cond --cdmoe-weights w.json --cdmoe-experts e.json \
    --cdmoe-order o.json >/dev/null
head -n "$n" "$task" >items.jsonl
mkdir tasks
cat >tasks/items.yaml <<EOY
task: items
dataset_path: json
dataset_kwargs:
  data_files:
    test: $w/items.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{query}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{gold}}"
target_delimiter: " "
metric_list:
  - metric: acc
  - metric: acc_norm
EOY
moe-eval --model cond --task items.jsonl --delimiter " " -o me.zst >/dev/null
HF_HOME=$w/hf HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 lm_eval --model hf \
    --model_args "pretrained=$w/cond,trust_remote_code=True,dtype=float32" --tasks items \
    --include_path "$w/tasks" --device cpu --batch_size 4 --log_samples --output_path "$w/out" >lm.log 2>&1 \
    || { tail -20 lm.log >&2; exit 1; }
"$PY" - "$arch" <<'EOP'
import glob, json, sys
import msgpack, numpy as np, zstandard
with open("me.zst", "rb") as f:
    recs = list(msgpack.Unpacker(zstandard.ZstdDecompressor().stream_reader(f), raw=False))
t = [r for r in recs if r.get("type") == "task"][0]
ll = np.frombuffer(t["loglik"]["data"], "<f8")
off = np.frombuffer(t["choice_offsets"]["data"], "<i4")
samples = sorted((json.loads(l) for l in open(glob.glob("out/*/samples_items_*.jsonl")[0])),
                 key=lambda s: s["doc_id"])
res = json.load(open(glob.glob("out/*/results_*.json")[0]))["results"]["items"]
worst = 0.0
for i, s in enumerate(samples):
    hf = np.array([float(r[0][0]) for r in s["resps"]])
    me = ll[off[i]:off[i + 1]]
    worst = max(worst, float(np.abs(hf - me).max() / max(1.0, np.abs(me).max())))
print("%s, %d items: moe-eval acc %.4f acc_norm %.4f | lm-eval acc %.4f acc_norm %.4f | "
      "loglik max rel diff %.2e" % (sys.argv[1], len(samples), t["acc"], t["acc_norm"],
                                    res["acc,none"], res["acc_norm,none"], worst))
EOP
