#!/bin/sh
# bench/generate.sh - moe-generate's greedy decoding speed against Hugging Face
# transformers' generate (KV cache, float32, batch 1) on the same checkpoint,
# measured in the same run, and what decoding several prompts layer-major
# (--batch) gains.  Also says how many of the generated tokens agree with
# transformers' (a random model has near-ties, where float32 summation order
# may flip a choice; the first disagreement ends the comparison of a prompt).
# The model: random qwen2_moe (moe-init), BENCH_GEN_LAYERS layers (default 4),
# hidden 512, 32 experts top-4, shared expert; 8 prompts of ~24 tokens, 64 new
# tokens each.  The peer needs PY (default $CDMOE_REF_PYTHON, else
# .venv-ref/bin/python) with torch and transformers; without it only the
# batch ratio is printed.  BENCH_GEN_THREADS=N (default 2) for both.
set -eu
cd "$(dirname "$0")/.."
: "${BIN:=bin}"
L=${BENCH_GEN_LAYERS:-4} NEW=${BENCH_GEN_NEW:-64} TH=${BENCH_GEN_THREADS:-2}
WORK=${BENCH_DIR:-${TMPDIR:-/tmp}/cdmoe-bench-generate}
PY=${PY:-${CDMOE_REF_PYTHON:-.venv-ref/bin/python}}
[ -x "$PY" ] || PY=.venv-ref/bin/python
mkdir -p "$WORK"
D=$WORK/qwen2_moe-l$L
[ -f "$D/config.json" ] || "$BIN/moe-init" --quiet --arch qwen2_moe --hidden 512 --layers "$L" --heads 8 \
    --kv-heads 8 --experts 32 --top-k 4 --moe-intermediate 256 --shared-intermediate 512 \
    --intermediate 1024 --vocab 8192 --dtype f32 --std 0.05 --seed 5 -o "$D"
i=0
while [ $i -lt 8 ]; do
    echo "{\"prompt\": \"Prompt $i: the quick brown fox number $i jumps over $((i * 7)) lazy dogs\"}"
    i=$((i + 1))
done >"$WORK/prompts.jsonl"

rate() { sed -n 's/.* new tokens in \([0-9.]*\) s (\([0-9.]*\) tokens\/s).*/\2/p' "$1"; }
echo "-- qwen2_moe hidden 512, $L layers, 32 experts top-4 + shared; 8 prompts, $NEW new tokens, $TH threads"
for b in 1 8; do
    "$BIN/moe-generate" --threads "$TH" -m "$D" -n "$NEW" --ignore-eos --batch $b -f "$WORK/prompts.jsonl" \
        -o "$WORK/ours-b$b.msgpack.zst" 2>"$WORK/ours-b$b.err"
    echo "moe-generate --batch $b: $(rate "$WORK/ours-b$b.err") tokens/s"
done
python3 -c "import sys; a, b = float(sys.argv[1]), float(sys.argv[2]); print(f'batch 8 vs 1: {b / a:.2f}x')" \
    "$(rate "$WORK/ours-b1.err")" "$(rate "$WORK/ours-b8.err")"

if ! "$PY" -c 'import torch, transformers, msgpack, zstandard' 2>/dev/null; then
    echo "SKIP transformers peer: $PY lacks torch, transformers, msgpack or zstandard"
    exit 0
fi
"$PY" - "$D" "$WORK/prompts.jsonl" "$WORK/ours-b1.msgpack.zst" "$NEW" "$TH" "$(rate "$WORK/ours-b1.err")" <<'EOF'
import json, sys, time
import msgpack, numpy as np, torch, zstandard
from transformers import AutoModelForCausalLM

model_dir, prompts, ours, new, threads, our_rate = sys.argv[1:7]
new, our_rate = int(new), float(our_rate)
torch.set_num_threads(int(threads))
with open(ours, "rb") as f:
    recs = [r for r in msgpack.Unpacker(zstandard.ZstdDecompressor().stream_reader(f), raw=False)
            if isinstance(r, dict) and r.get("type") == "tokens"]
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
elapsed, agree, total = 0.0, 0, 0
for r in recs:
    ids = np.frombuffer(r["ids"]["data"], dtype="<i4")
    p = r["prompt_tokens"]
    x = torch.tensor(ids[:p], dtype=torch.long)[None]
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model.generate(x, max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=True,
                             pad_token_id=0)
        elapsed += time.perf_counter() - t0
    theirs, mine = out[0, p:].tolist(), ids[p:].tolist()
    k = next((i for i, (a, b) in enumerate(zip(theirs, mine)) if a != b), len(mine))
    agree += k
    total += len(mine)
hf_rate = total / elapsed
print(f"transformers generate (batch 1, KV cache): {hf_rate:.1f} tokens/s")
print(f"moe-generate --batch 1 vs transformers: {our_rate / hf_rate:.2f}x")
print(f"greedy tokens equal to transformers' before the first difference: {agree}/{total}")
EOF
