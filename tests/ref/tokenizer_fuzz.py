#!/usr/bin/env python3
"""Compare moe-tokenize with Hugging Face `tokenizers` on random and real text.

  tokenizer_fuzz.py BIN MODEL_DIR [N_RANDOM] [SEED] [CORPUS...]

Generates N_RANDOM random texts (seeded) that mix the character classes the split regexes
care about, adds the lines of each CORPUS file, tokenizes them with `moe-tokenize --no-special`
and with tokenizers.Tokenizer.from_file(MODEL_DIR/tokenizer.json).encode(add_special_tokens=False),
compares the ids and decode(ids) (skip_special_tokens=False), and prints the differences.  Exit 0 if all agree, 1 otherwise.
"""
import io
import json
import os
import random
import struct
import subprocess
import sys
import tempfile

import msgpack
import unicodedata

import tokenizers
import zstandard

POOLS = [
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "0123456789", "          ", "\n\n\r\t", "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
    "'s 't 're 've 'm 'll 'd 'S 'T 'RE 'LL ſ",
    "àáâãäåæçèéêëìíîïñòóôõöøùúûüýÿßÀÉÎÕÜ",
    "\u0300\u0301\u0302\u0308\u030a\u0327\u0345",
    "αβγδεζηθικλμνξοπρστυφχψωΑΒΓΔΩάέ", "абвгдежзийклмнопрстуфхцчшщъыьэюяАБВЁё",
    "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年",
    "가나다라마바사아자차카타파하한국어", "あいうえおかきくけこアイウエオカキクケコー",
    "😀😃😄👍🏽👨‍👩‍👧‍👦🇩🇪❤️✓🦄", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢𝟘𝟙𝟚𐍈𠜎𠜱",
    "\u00a0\u2000\u2003\u2009\u200a\u200b\u3000\u0085\u2028\u2029\ufeff",
    "½¾²³⅓Ⅻ①٣٤०१３４",
    "ǅǈǋⅨꭰᏸﬀｆＷ𐐀𐐨ℌℂΩKÅ",
    "ภาษาไทยहिन्दीবাংলা",
]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<｜begin▁of▁sentence｜>",
           "<｜end▁of▁sentence｜>", "<think>", "</think>", "<|endoftext"]


def assigned(c):
    """Assigned in Python's Unicode data (14.0 for Python 3.11).  Code points assigned later
    are left out: the system Oniguruma (6.9.8: Unicode 14) and utf8proc lack them, while the
    Oniguruma bundled in `tokenizers` knows Unicode 16."""
    return unicodedata.category(c) not in ("Cn", "Cs")


def rand_text(r):
    out = []
    for _ in range(r.randint(0, 12)):
        k = r.random()
        if k < 0.05:
            out.append(r.choice(SPECIAL))
        elif k < 0.10:
            c = chr(r.randint(0, 0x10FFFF))
            out.append(c if assigned(c) else "A")
        elif k < 0.15:
            c = chr(r.randint(0x20, 0x2FFF))
            out.append(c if assigned(c) else "B")
        else:
            pool = r.choice(POOLS)
            out.append("".join(r.choice(pool) for _ in range(r.randint(1, 8))))
    return "".join(out)


def read_stream(data):
    raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
    up = msgpack.Unpacker(raw=False)
    up.feed(raw)
    recs = list(up)
    out = []
    for r in recs[1:]:
        if r.get("type") == "tokens":
            a = r["ids"]
            out.append(list(struct.unpack("<%di" % a["shape"][0], a["data"])))
    return out


def main():
    bindir, model = sys.argv[1], sys.argv[2]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 300
    seed = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    r = random.Random(seed)
    texts = [rand_text(r) for _ in range(n)]
    for c in sys.argv[5:]:
        with open(c, encoding="utf-8") as f:
            texts += [l.rstrip("\n") for l in f]
    tok = tokenizers.Tokenizer.from_file(os.path.join(model, "tokenizer.json"))
    want = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    with tempfile.TemporaryDirectory() as d:
        inp = os.path.join(d, "in.jsonl")
        with open(inp, "w", encoding="utf-8") as f:
            for t in texts:
                f.write(json.dumps({"text": t}) + "\n")
        out = os.path.join(d, "out.zst")
        subprocess.run([os.path.join(bindir, "moe-tokenize"), "--model", model, "--no-special",
                        "-o", out, inp], check=True)
        got = read_stream(open(out, "rb").read())
        dec = subprocess.run([os.path.join(bindir, "moe-tokenize"), "--model", model, "--decode", out],
                             check=True, capture_output=True).stdout.decode("utf-8")
        got_text = [json.loads(l)["text"] for l in dec.split("\n") if l]
    want_text = tok.decode_batch(want, skip_special_tokens=False)
    bad = 0
    for i, (t, w, g) in enumerate(zip(texts, want_text, got_text)):
        if w != g:
            bad += 1
            if bad <= 10:
                print("DECODE MISMATCH %d: %r\n  hf   %r\n  ours %r" % (i, t, w, g))
    for i, (t, w, g) in enumerate(zip(texts, want, got)):
        if w != g:
            bad += 1
            if bad <= 10:
                print("MISMATCH %d: %r\n  hf  %s\n  ours %s" % (i, t, w, g))
    if len(got) != len(texts):
        print("record count %d != %d" % (len(got), len(texts)))
        bad += 1
    print("%s: %d texts, %d mismatches" % (os.path.basename(model), len(texts), bad))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
