#!/bin/sh
# moe-tokenize command line: JSON Lines, --lines, --ids, --decode round trip, --max-length,
# --no-special, and every kind of bad input (one-line errors naming file:line, exit codes).
. tests/shell/lib.sh
M=tests/fixtures/tokenizer/synth-llama       # our own tokenizer: BOS <s>=1, EOS </s>=2

moe-tokenize --help | grep -q -- '--max-length' || fail "--help lacks --max-length"
printf '{"text":"Hello world"}\n\n{"text":"", "x":1}\n{"text":"a [lstrip] b <|special|>"}\n' > "$TMP/in.jsonl"
moe-tokenize --model $M -o "$TMP/t.zst" "$TMP/in.jsonl" || fail "tokenize"
moe-dump "$TMP/t.zst" > "$TMP/dump" || fail "moe-dump"
grep -q '"kinds":\["tokens"\]' "$TMP/dump" || fail "kind tokens missing: $(head -1 "$TMP/dump")"
[ "$(grep -c '"type":"tokens"' "$TMP/dump")" -eq 3 ] || fail "expected 3 records (blank line skipped)"
grep -q '"index":2' "$TMP/dump" || fail "index 2 missing"
# empty text with specials = [<s>, </s>]
grep '"index":1,' "$TMP/dump" | grep -q '"shape":\[2\],"first":\[1,2\]' || fail "empty text: $(grep '"index":1,' "$TMP/dump")"
# decode round trip (without specials: the text comes back)
moe-tokenize --model $M --no-special -o "$TMP/n.zst" "$TMP/in.jsonl" || fail "tokenize --no-special"
moe-tokenize --model $M --decode "$TMP/n.zst" > "$TMP/dec.jsonl" || fail "decode"
grep -q '^{"index":0,"text":"Hello world"}$' "$TMP/dec.jsonl" || fail "decode: $(cat "$TMP/dec.jsonl")"
moe-tokenize --model $M --decode --skip-special -o "$TMP/dec2.jsonl" "$TMP/t.zst" || fail "decode -o"
grep -q '"index":2,"text":"a \[lstrip\] b "' "$TMP/dec2.jsonl" || fail "decode --skip-special: $(cat "$TMP/dec2.jsonl")"
# --max-length: specials count and are kept
printf '{"text":"one two three four five six seven"}\n' > "$TMP/long.jsonl"
moe-tokenize --model $M --max-length 4 -o "$TMP/m.zst" "$TMP/long.jsonl" || fail "max-length"
moe-dump --full "$TMP/m.zst" | grep -q '"shape":\[4\],"data":\[1,[0-9]*,[0-9]*,2\]' || fail "max-length 4: $(moe-dump --full "$TMP/m.zst")"
# --lines and --field
printf 'line one\r\nline two\n\n' | moe-tokenize --model $M --lines --no-special -o "$TMP/l.zst" - || fail "--lines"
[ "$(moe-dump "$TMP/l.zst" | grep -c '"type":"tokens"')" -eq 3 ] || fail "--lines: empty line is a sample"
moe-tokenize --model $M --decode "$TMP/l.zst" | head -1 | grep -q '"text":"line one"' || fail "--lines strips CR LF"
printf '{"body":"x"}\n' | moe-tokenize --model $M --field body -o "$TMP/f.zst" - || fail "--field"
# threads: the same stream whatever their number
many_lines() { i=0; while [ $i -lt 300 ]; do echo "{\"text\":\"line $i: caf\u00e9 $i$i, the end.\"}"; i=$((i+1)); done; }
many_lines > "$TMP/many.jsonl"
moe-tokenize --model $M --no-provenance --threads 1 -o "$TMP/t1.zst" "$TMP/many.jsonl" || fail "threads 1"
moe-tokenize --model $M --no-provenance --threads 3 -o "$TMP/t3.zst" "$TMP/many.jsonl" || fail "threads 3"
cmp -s "$TMP/t1.zst" "$TMP/t3.zst" || fail "--threads 3 output differs from --threads 1"
# --ids
printf '[1, 5, 7]\n{"text": [3]}\n' | moe-tokenize --model $M --ids -o "$TMP/i.zst" - || fail "--ids"
moe-dump --full "$TMP/i.zst" | grep -q '"data":\[1,5,7\]' || fail "--ids content"

# the byte-level tokenizer moe-init writes: decode(encode(x)) == x
moe-init --arch deepseek --seed 1 -o "$TMP/mi" >/dev/null || fail "moe-init"
printf 'Hello w\303\266rld \360\237\230\200 caf\303\251\n  the end <|endoftext|> x  \n\n12345 + 678 = ?!\n' > "$TMP/rt.txt"
moe-tokenize --model "$TMP/mi" --lines -o "$TMP/rt.zst" "$TMP/rt.txt" || fail "moe-init tokenizer: tokenize"
moe-tokenize --model "$TMP/mi" --decode "$TMP/rt.zst" | sed 's/^{"index":[0-9]*,"text":"//; s/"}$//' > "$TMP/rt.out"
cmp -s "$TMP/rt.txt" "$TMP/rt.out" || fail "moe-init tokenizer does not round-trip: $(cat "$TMP/rt.out")"

# bad input
expect_fail 2 "required" moe-tokenize "$TMP/in.jsonl"
expect_fail 2 "exclude" moe-tokenize --model $M --lines --ids "$TMP/in.jsonl"
expect_fail 2 "max-length" moe-tokenize --model $M --max-length 0 "$TMP/in.jsonl"
expect_fail 3 "nope" moe-tokenize --model $M -o "$TMP/x.zst" "$TMP/nope.jsonl"
expect_fail 3 "tokenizer.json" moe-tokenize --model "$TMP" -o "$TMP/x.zst" "$TMP/in.jsonl"
printf '{"text":"a"}\n{"txt":"b"}\n' > "$TMP/bad1.jsonl"
expect_fail 1 "bad1.jsonl: line 2: missing field 'text'" moe-tokenize --model $M -o "$TMP/x.zst" "$TMP/bad1.jsonl"
printf '{"text":"a"}\nnot json\n' > "$TMP/bad2.jsonl"
expect_fail 1 "bad2.jsonl: line 2: not JSON" moe-tokenize --model $M -o "$TMP/x.zst" "$TMP/bad2.jsonl"
printf '{"text":7}\n' > "$TMP/bad3.jsonl"
expect_fail 1 "bad3.jsonl: line 1: not a string: field 'text'" moe-tokenize --model $M -o "$TMP/x.zst" "$TMP/bad3.jsonl"
printf '["a"]\n' > "$TMP/bad4.jsonl"
expect_fail 1 "bad4.jsonl: line 1: not a JSON object" moe-tokenize --model $M -o "$TMP/x.zst" "$TMP/bad4.jsonl"
printf 'ok\nbad \377 byte\n' > "$TMP/bad5.txt"
expect_fail 1 "bad5.txt: line 2: invalid UTF-8 at byte 4" moe-tokenize --model $M --lines -o "$TMP/x.zst" "$TMP/bad5.txt"
printf '{"text":"bad \377"}\n' > "$TMP/bad6.jsonl"
expect_fail 1 "bad6.jsonl: line 1: not JSON" moe-tokenize --model $M -o "$TMP/x.zst" "$TMP/bad6.jsonl"
printf '[1, 99999]\n' > "$TMP/bad7.jsonl"
expect_fail 1 "bad7.jsonl: line 1: element 1 is not a token id" moe-tokenize --model $M --ids -o "$TMP/x.zst" "$TMP/bad7.jsonl"
printf '{"model": {"type": "Unigram", "vocab": []}}' > "$TMP/tokenizer.json"
expect_fail 1 "unsupported model type 'Unigram'" moe-tokenize --model "$TMP" -o "$TMP/x.zst" "$TMP/in.jsonl"
# token ids beyond the vocabulary the file declares (2^31 made the id table double forever)
printf '{"added_tokens": [{"content": "<x>", "id": 2147483648, "special": true}], "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}}' > "$TMP/tokenizer.json"
expect_fail 1 "tokenizer.json: added_tokens\[0\] '<x>' has id 2147483648, but the next free id .* is 1" \
    timeout 20 moe-tokenize --model "$TMP" -o "$TMP/x.zst" "$TMP/in.jsonl"
printf '{"model": {"type": "BPE", "vocab": {"a": 0, "b": 134217728}, "merges": []}}' > "$TMP/tokenizer.json"
expect_fail 1 "tokenizer.json: model.vocab: token 'b' has id 134217728, beyond the 2 tokens" \
    timeout 20 moe-tokenize --model "$TMP" -o "$TMP/x.zst" "$TMP/in.jsonl"
expect_fail 1 "max length 1 is below the 2 special tokens" moe-tokenize --model $M --max-length 1 -o "$TMP/x.zst" "$TMP/in.jsonl"
expect_fail 1 "not a moe-stream" moe-tokenize --model $M --decode "$TMP/dump"
[ ! -e "$TMP/x.zst" ] || fail "a failed run left its output behind"
ls -a "$TMP" | grep -q '\.tmp\.' && fail "temporary file left behind"
exit 0
