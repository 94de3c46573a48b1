# moe-eval (perplexity, tasks, bench, two models) on the eval fixture model:
# figures equal the Python reference (tests/fixtures/eval/expected.json), a
# checkpoint condensed through config.json gives the reference's condensed
# perplexity, results do not depend on threads or batch size, the stream is
# valid, usage and data errors exit as documented.
. tests/shell/lib.sh
FIX=tests/fixtures/eval
M=$FIX/model
command -v python3 >/dev/null 2>&1 || skip "python3 not found (needed to read JSON)"
# one thread unless the thread count is the point (the machine may be shared)
ev() { moe-eval --threads 1 "$@"; }

# 1. JSON figures against the reference
ev -m $M --ppl $FIX/ppl_text.jsonl --task $FIX/tiny_task.jsonl --task $FIX/tiny_lm.jsonl \
    --task $FIX/formats/winogrande/dev.jsonl --json >"$TMP/r.json" || fail "moe-eval --json"
python3 - "$TMP/r.json" $FIX/expected.json <<'EOF' || fail "figures differ from the reference"
import json, sys
got, exp = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
m = got["models"][0]
def close(a, b, tol=1e-5):
    assert abs(a - b) <= tol * max(1.0, abs(b)), (a, b)
close(m["ppl"]["ppl"], exp["ppl"]["ppl"])
close(m["ppl"]["ppl_token"], exp["ppl"]["ppl_token"])
assert m["ppl"]["skipped"] == exp["ppl"]["n_skipped"] and m["ppl"]["tokens"] == exp["ppl"]["n_tokens"]
want = {t["file"]: t for t in exp["tasks"] if "max_length" not in t}
for t, f in zip(m["tasks"], ["tiny_task.jsonl", "tiny_lm.jsonl", "formats/winogrande/dev.jsonl"]):
    e = want[f]
    assert t["task"] == e["task"], (t["task"], e["task"])
    close(t["acc"], e["acc"], 1e-12)
    if "acc_norm" in e: close(t["acc_norm"], e["acc_norm"], 1e-12)
    else: assert "acc_norm" not in t
    if "perplexity" in e: close(t["perplexity"], e["perplexity"], 1e-4)
EOF

# 2. the table names both perplexities
ev -m $M --ppl $FIX/ppl_text.jsonl --limit 2 >"$TMP/t.txt" || fail "table"
grep -q "ppl (CD-MoE: mean/sample)" "$TMP/t.txt" || fail "table lacks the CD-MoE perplexity"
grep -q "ppl (token-weighted)" "$TMP/t.txt" || fail "table lacks the token-weighted perplexity"
grep -q "ppl samples / tokens *2/" "$TMP/t.txt" || fail "--limit 2 not applied"

# 3. stream output; threads and batch size change no byte
moe-eval -m $M --ppl $FIX/ppl_text.jsonl --task $FIX/tiny_task.jsonl --limit 3 --no-provenance --threads 1 \
    -o "$TMP/a.zst" >/dev/null || fail "-o (threads 1)"
moe-eval -m $M --ppl $FIX/ppl_text.jsonl --task $FIX/tiny_task.jsonl --limit 3 --no-provenance --threads 2 \
    --batch-tokens 7 -o "$TMP/b.zst" >/dev/null || fail "-o (threads 2)"
cmp -s "$TMP/a.zst" "$TMP/b.zst" || fail "results depend on --threads / --batch-tokens"
moe-dump --check "$TMP/a.zst" | grep -q "kinds \[eval\]" || fail "stream kind"
moe-dump --type ppl "$TMP/a.zst" | grep -q '"ppl_token"' || fail "ppl record"
moe-dump --type task "$TMP/a.zst" | grep -q '"task":"tiny_task"' || fail "task record"

# 3b. prefix sharing (default) and --no-prefix-cache give the same bytes on every
#     fixture task (also a short window, --task-max-length 24, where truncated
#     windows fall back to whole sequences); the shared path runs fewer tokens
for args in "" "--task-max-length 24"; do
    set -- --task $FIX/tiny_task.jsonl --task $FIX/tiny_schema.jsonl --task $FIX/tiny_lm.jsonl \
        --task $FIX/formats/piqa/valid.jsonl --task $FIX/formats/winogrande/dev.jsonl \
        --task $FIX/formats/hellaswag/hellaswag_tiny.txt --task $FIX/formats/rte/dev.tsv $args
    ev -m $M "$@" --no-provenance -o "$TMP/pc.zst" --json >"$TMP/pc.json" || fail "prefix cache ($args)"
    ev -m $M "$@" --no-provenance -o "$TMP/np.zst" --json --no-prefix-cache >"$TMP/np.json" \
        || fail "--no-prefix-cache ($args)"
    cmp -s "$TMP/pc.zst" "$TMP/np.zst" || fail "prefix sharing changes the results ($args)"
done
python3 - "$TMP/pc.json" "$TMP/np.json" <<'EOF' || fail "tokens run with/without prefix sharing"
import json, sys
pc, np = (json.load(open(p))["models"][0]["tasks"] for p in sys.argv[1:3])
for a, b in zip(pc, np):
    assert a["tokens"] == b["tokens"] and a["tokens_run"] <= b["tokens_run"] <= b["tokens"], (a, b)
t = {x["task"]: x for x in pc}
assert t["tiny_task"]["tokens_run"] < t["tiny_task"]["tokens"], t["tiny_task"]
EOF

# 4. a checkpoint condensed through config.json: the reference's condensed perplexity,
#    fewer parameters; two models side by side with --bench
mkdir "$TMP/cond"
cp $M/model.safetensors $M/tokenizer.json "$TMP/cond/"
python3 - $M/config.json "$TMP/cond/config.json" $FIX/expected.json <<'EOF'
import json, sys
c, e = json.load(open(sys.argv[1])), json.load(open(sys.argv[3]))["ppl"]["condensed"]
c["condensed_layers"] = {str(e["layer"]): {"experts": e["experts"], "weights": e["weights"]}}
json.dump(c, open(sys.argv[2], "w"), indent=2)
EOF
ev -m $M -m "$TMP/cond" --ppl $FIX/ppl_text.jsonl --bench --bench-tokens 32 --bench-runs 1 \
    --json >"$TMP/c.json" || fail "two models"
python3 - "$TMP/c.json" $FIX/expected.json <<'EOF' || fail "condensed figures"
import json, sys
got, exp = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
d, c = got["models"]
e = exp["ppl"]["condensed"]
assert abs(c["ppl"]["ppl"] - e["ppl"]) <= 1e-5 * e["ppl"], (c["ppl"]["ppl"], e["ppl"])
assert abs(c["ppl"]["ppl_token"] - e["ppl_token"]) <= 1e-5 * e["ppl_token"]
assert c["params"] < d["params"] and c["bytes"] < d["bytes"]
cmp = got["compare"]
assert abs(cmp["memory_ratio_params"] - c["params"] / d["params"]) < 1e-12
assert cmp["speedup"] > 0 and d["bench"]["tokens_per_s"] > 0 and c["bench"]["tokens"] == 32
EOF
ev -m $M -m "$TMP/cond" --bench --bench-tokens 8 --bench-runs 1 | grep -q "speedup (model 2 vs 1)" \
    || fail "table lacks the speedup"

# 4b. the same condensation written by moe-condense (the original's JSON plan
#     shape: decoder layer 1 is MoE ordinal 1 here) gives the same perplexity
echo '{"1-2": [0.4, 1, 0.4], "1-0": [0.25, 1, 0.25]}' >"$TMP/w.json"
echo '{"1": [2, 0]}' >"$TMP/e.json"
echo '[1]' >"$TMP/o.json"
moe-condense --model $M --layers 1 --experts 2 -o "$TMP/mc" --cdmoe-weights "$TMP/w.json" \
    --cdmoe-experts "$TMP/e.json" --cdmoe-order "$TMP/o.json" >/dev/null || fail "moe-condense"
ev -m "$TMP/mc" --ppl $FIX/ppl_text.jsonl --json >"$TMP/mc.json" || fail "eval of moe-condense output"
python3 - "$TMP/mc.json" $FIX/expected.json <<'EOF' || fail "moe-condense checkpoint perplexity"
import json, sys
got, e = json.load(open(sys.argv[1]))["models"][0], json.load(open(sys.argv[2]))["ppl"]["condensed"]
assert abs(got["ppl"]["ppl"] - e["ppl"]) <= 1e-5 * e["ppl"], (got["ppl"]["ppl"], e["ppl"])
assert abs(got["ppl"]["ppl_token"] - e["ppl_token"]) <= 1e-5 * e["ppl_token"]
EOF

# 5. a token stream as --ppl input (the dump's pass-through keeps it readable)
PY=$(find_python) && {
    $PY - "$TMP/tok.zst" $FIX/expected.json <<'EOF' || fail "making tokens"
import json, struct, sys, msgpack, zstandard
s = json.load(open(sys.argv[2]))["ppl"]["samples"]
raw = msgpack.packb({"format": "moe-stream", "version": 1, "kinds": ["tokens"], "provenance": []})
for i, x in enumerate(s):
    raw += msgpack.packb({"type": "tokens", "index": i, "ids": {"dtype": "i32", "shape": [len(x["ids"])],
                          "data": struct.pack("<%di" % len(x["ids"]), *x["ids"])}})
raw += msgpack.packb({"type": "end", "records": len(s)})
open(sys.argv[1], "wb").write(zstandard.ZstdCompressor(write_checksum=True).compress(raw))
EOF
    ev -m $M --ppl "$TMP/tok.zst" --json >"$TMP/s.json" || fail "--ppl TOKENS"
    python3 - "$TMP/s.json" "$TMP/r.json" <<'EOF' || fail "token-stream perplexity differs from text"
import json, sys
a, b = (json.load(open(p))["models"][0]["ppl"] for p in sys.argv[1:3])
assert a == b, (a, b)
EOF
}

# 6. moe-tokenize -> moe-eval --ppl TOKENS equals --ppl TEXT
grep '"text"' $FIX/ppl_text.jsonl >"$TMP/text.jsonl"
moe-tokenize -m $M "$TMP/text.jsonl" -o "$TMP/t2.zst" || fail "moe-tokenize"
ev -m $M --ppl "$TMP/t2.zst" --json >"$TMP/a.json" || fail "--ppl tokens from moe-tokenize"
ev -m $M --ppl "$TMP/text.jsonl" --json >"$TMP/b.json" || fail "--ppl text subset"
moe-tokenize -m $M "$TMP/text.jsonl" | ev -m $M -m $M --ppl - --json >"$TMP/c.json" \
    || fail "moe-tokenize | moe-eval --ppl - (two models)"
python3 - "$TMP/a.json" "$TMP/c.json" <<'EOF' || fail "--ppl - differs from --ppl FILE"
import json, sys
a, c = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
assert c["models"][0]["ppl"] == c["models"][1]["ppl"] == a["models"][0]["ppl"]
EOF
python3 - "$TMP/a.json" "$TMP/b.json" <<'EOF' || fail "moe-tokenize stream perplexity differs from text"
import json, sys
a, b = (json.load(open(p))["models"][0]["ppl"] for p in sys.argv[1:3])
assert a == b, (a, b)
EOF

# 7. errors
expect_fail 2 "nothing to do" moe-eval -m $M
expect_fail 2 "model DIR is required" moe-eval --ppl $FIX/ppl_text.jsonl
expect_fail 2 "task-format: 'csv' unknown" moe-eval -m $M --task-format csv --task $FIX/tiny_task.jsonl
expect_fail 2 "at most two models" moe-eval -m $M -m $M -m $M --bench
expect_fail 3 "nonexistent" moe-eval -m $M --task "$TMP/nonexistent.jsonl"
printf '{"query": "q", "choices": ["a"], "gold": 5}\n' >"$TMP/bad.jsonl"
expect_fail 1 "bad.jsonl: line 1: gold 5 out of range" moe-eval -m $M --task "$TMP/bad.jsonl"
printf '{"txt": "x"}\n' >"$TMP/badppl.jsonl"
expect_fail 1 "badppl.jsonl: line 1: missing field 'text'\$" moe-eval -m $M --ppl "$TMP/badppl.jsonl"
# the same JSON Lines reader and messages as moe-tokenize; standard input is
# named as such, not as the temporary file it is spooled to
printf '{"text": "a"}\n\n[1]\n' >"$TMP/badppl2.jsonl"
expect_fail 1 "^moe-eval: <stdin>: line 3: not a JSON object\$" moe-eval -m $M --ppl - <"$TMP/badppl2.jsonl"
printf '{"text": "a"}\n{"text": \n' >"$TMP/badppl3.jsonl"
expect_fail 1 "^moe-eval: [^ ]*badppl3.jsonl: line 2: not JSON: " moe-eval -m $M --ppl "$TMP/badppl3.jsonl"
exit 0
