#!/bin/sh
# Tokenizer throughput: moe-tokenize --threads 1 vs Hugging Face `tokenizers` (Rust, single-threaded:
# RAYON_NUM_THREADS=1, TOKENIZERS_PARALLELISM=false) on ~3.2 MB of TinyStories, same run.
# Ours: wall time of moe-tokenize on the JSON Lines (read, encode, write the stream) minus its
# time on an empty input (loading tokenizer.json); HF: Tokenizer.encode over the same texts.
set -u
: "${BIN:=bin}"
S=${CDMOE_SHARED:-../shared}
TS=$S/data/lm/tinystories
[ -d "$TS" ] || { echo "tokenize bench: SKIP ($TS absent: ../shared absent)"; exit 0; }
PY=
for p in python3 /usr/bin/python3; do
    $p -c 'import tokenizers' 2>/dev/null && PY=$p && break
done
[ -n "$PY" ] || { echo "tokenize bench: SKIP (no python3 with the tokenizers package)"; exit 0; }
T=$(mktemp -d); trap 'rm -rf "$T"' EXIT
cat "$TS"/*.txt | $PY -c '
import json, sys
for l in sys.stdin.read().split("\n"):
    if l.strip():
        print(json.dumps({"text": l}))' > "$T/in.jsonl"
: > "$T/empty.jsonl"
now() { date +%s.%N; }
for m in gpt2 qwen3 deepseek-v3; do
    M=$S/data/tokenizers/$m
    [ -f "$M/tokenizer.json" ] || { echo "tokenize bench $m: SKIP ($M absent)"; continue; }
    load=9999 full=9999
    for i in 1 2 3; do   # best of three, each
        t0=$(now); "$BIN/moe-tokenize" --threads 1 --model "$M" --no-special -o "$T/e.zst" "$T/empty.jsonl" || exit 1
        t1=$(now); "$BIN/moe-tokenize" --threads 1 --model "$M" --no-special -o "$T/o.zst" "$T/in.jsonl" || exit 1
        t2=$(now)
        load=$(awk -v a="$t0" -v b="$t1" -v l="$load" 'BEGIN { x = b - a; print (x < l ? x : l) }')
        full=$(awk -v b="$t1" -v c="$t2" -v f="$full" 'BEGIN { x = c - b; print (x < f ? x : f) }')
    done
    hf=$(RAYON_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false $PY - "$M/tokenizer.json" "$T/in.jsonl" <<'PYEOF'
import json, sys, time
import tokenizers
t_load = time.perf_counter()
tok = tokenizers.Tokenizer.from_file(sys.argv[1])
t_load = time.perf_counter() - t_load
texts = [json.loads(l)["text"] for l in open(sys.argv[2], encoding="utf-8")]
best = 1e9
for rep in range(3):   # best of three
    t0 = time.perf_counter()
    n = 0
    for s in texts:
        n += len(tok.encode(s, add_special_tokens=False).ids)
    best = min(best, time.perf_counter() - t0)
print(n, best, t_load)
PYEOF
)
    set -- $hf
    mb=$(awk -v b="$(stat -c %s "$T/in.jsonl")" 'BEGIN { printf "%.1f", b / 1e6 }')
    awk -v m="$m" -v n="$1" -v hf="$2" -v hfload="$3" -v load="$load" -v full="$full" -v mb="$mb" 'BEGIN {
        ours = full - load; if (ours <= 0.001) ours = 0.001
        printf "tokenize %-11s %s MB, %d tokens: moe-tokenize %.2f s (%.2f Mtok/s; load %.2f s), HF tokenizers %.2f s (%.2f Mtok/s; load %.2f s); ours is %.1fx faster\n",
            m, mb, n, ours, n / ours / 1e6, load, hf, n / hf / 1e6, hfload, hf / ours }'
done
