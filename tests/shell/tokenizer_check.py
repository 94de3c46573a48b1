"""Check moe-tokenize against golden vectors (used by test_tokenize_hf.sh).

  tokenizer_check.py golden BIN MODEL_DIR TEXTS GOLDEN   ids, ids with BOS/EOS, truncation, decode
  tokenizer_check.py vectors BIN MODEL_DIR INP OUT       llama.cpp's *.gguf.inp / *.gguf.out
Needs msgpack and zstandard only (not `tokenizers`).  Exit 0 if all agree.
"""
import io
import json
import os
import struct
import subprocess
import sys
import tempfile

import msgpack
import zstandard


def run_tool(bindir, model, infile, *args):
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "t.zst")
        subprocess.run([os.path.join(bindir, "moe-tokenize"), "--model", model, "-o", out, *args, infile],
                       check=True)
        raw = zstandard.ZstdDecompressor().stream_reader(open(out, "rb")).read()
        dec = subprocess.run([os.path.join(bindir, "moe-tokenize"), "--model", model, "--decode", out],
                             check=True, capture_output=True).stdout.decode("utf-8")
    up = msgpack.Unpacker(raw=False)
    up.feed(raw)
    ids = [list(struct.unpack("<%di" % r["ids"]["shape"][0], r["ids"]["data"]))
           for r in list(up)[1:] if r.get("type") == "tokens"]
    texts = [json.loads(l)["text"] for l in dec.split("\n") if l]
    return ids, texts


def golden(bindir, model, texts, gold):
    g = [json.loads(l) for l in open(gold, encoding="utf-8")]
    bad = 0
    def cmp(what, got, key):
        nonlocal bad
        for i, (a, rec) in enumerate(zip(got, g)):
            want = key(rec)
            if want is not None and a != want:
                bad += 1
                print("%s %s text %d:\n  want %s\n  got  %s" % (os.path.basename(gold), what, i, want, a))
    ids, dec = run_tool(bindir, model, texts, "--no-special")
    if len(ids) != len(g):
        print("record count %d != %d" % (len(ids), len(g)))
        return 1
    cmp("ids", ids, lambda r: r["ids"])
    cmp("decode", dec, lambda r: r["decoded"])
    ids, _ = run_tool(bindir, model, texts)
    cmp("ids_special", ids, lambda r: r["ids_special"])
    for n in g[0]["trunc"]:
        ids, _ = run_tool(bindir, model, texts, "--max-length", n)
        cmp("trunc%s" % n, ids, lambda r: r["trunc"][n])
    print("%s: %d texts, %d mismatches" % (os.path.basename(gold), len(g), bad))
    return 1 if bad else 0


def vectors(bindir, model, inp, out):
    tests = open(inp, encoding="utf-8").read().split("\n__ggml_vocab_test__\n")[:-1]
    want = [[int(x) for x in l.split()] for l in open(out).read().split("\n")[:len(tests)]]
    with tempfile.TemporaryDirectory() as d:
        f = os.path.join(d, "in.jsonl")
        with open(f, "w", encoding="utf-8") as fh:
            for t in tests:
                fh.write(json.dumps({"text": t}) + "\n")
        got, _ = run_tool(bindir, model, f, "--no-special")
    bad = sum(1 for a, b in zip(got, want) if a != b) + abs(len(got) - len(want))
    for t, a, b in zip(tests, got, want):
        if a != b:
            print("%r:\n  want %s\n  got  %s" % (t, b, a))
    print("%s: %d vectors, %d mismatches" % (os.path.basename(inp), len(tests), bad))
    return 1 if bad else 0


if __name__ == "__main__":
    fn = {"golden": golden, "vectors": vectors}[sys.argv[1]]
    sys.exit(fn(*sys.argv[2:]))
