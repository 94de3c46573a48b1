#!/usr/bin/env python3
"""Compare moe-tokenize with Hugging Face `tokenizers` on random and real text.

  tokenizer_fuzz.py [--unicode] BIN MODEL_DIR [N_RANDOM] [SEED] [CORPUS...]

Generates N_RANDOM random texts (seeded) that mix the character classes the split regexes
care about, adds the lines of each CORPUS file, tokenizes them with `moe-tokenize --no-special`
and with tokenizers.Tokenizer.from_file(MODEL_DIR/tokenizer.json).encode(add_special_tokens=False),
compares the ids and decode(ids) (skip_special_tokens=False), and prints the differences.  Exit 0 if all agree, 1 otherwise.

--unicode: adversarial texts at the edges of the Unicode data instead (unicode_text): letters,
digits and marks added in Unicode 15 and 16 next to "'s" and friends, combining marks of every
Unicode version in every order, characters with compatibility or canonical decompositions and
their decomposed forms.  `tokenizers` 0.23 splits with Unicode 16.0 categories and normalizes
with Unicode 9.0 tables.  Needs the PyPI package unicodedata2 (16.0.0) for the Unicode 16 data.
"Added after" means after Python's own unicodedata (14.0 for Python 3.11, which made the committed
golden texts): another Python draws other texts from the same seed.
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


try:   # the Unicode version of `tokenizers`' regexes (16.0), when installed
    import unicodedata2 as UCD
except ImportError:
    UCD = unicodedata


def assigned(c):
    """Assigned in the Unicode data at hand (UCD)."""
    return UCD.category(c) not in ("Cn", "Cs")


_POOLS16 = None


def unicode_pools():
    """Code point pools for unicode_text, from UCD (computed once)."""
    global _POOLS16
    if _POOLS16 is None:
        new_ln, marks, compat, canon = [], [], [], []
        for cp in range(0x110000):
            c = chr(cp)
            cat = UCD.category(c)
            if cat in ("Cn", "Cs", "Co"):
                continue
            if cat[0] in "LNMPS" and unicodedata.category(c) == "Cn":
                new_ln.append(c)          # assigned after Python's own data (14.0)
            if UCD.combining(c):
                marks.append(c)
            d = UCD.decomposition(c)
            if d.startswith("<"):
                compat.append(c)
            elif d:
                canon.append(c)
        _POOLS16 = (new_ln, marks, compat, canon)
    return _POOLS16


def unicode_text(r):
    """One adversarial text (see the module doc)."""
    new_ln, marks, compat, canon = unicode_pools()
    out = []
    for _ in range(r.randint(1, 8)):
        k = r.random()
        if k < 0.3 and new_ln:
            out.append("".join(r.choice(new_ln) for _ in range(r.randint(1, 3))))
            out.append(r.choice(["'s", "'S", "'ll", "'d", "'t", " ", "1", "12", "!", "a", "", "'s ", "\n"]))
        elif k < 0.55 and marks:
            base = r.choice(["a", "e", "ᄀ", "ก", "क", " ", "", "'", "1", r.choice(new_ln or ["a"])])
            ms = [r.choice(marks) for _ in range(r.randint(1, 4))]
            ms += r.sample(["\u0301", "\u0316", "\u0334", "\u0345", "\u05B0"], r.randint(0, 2))
            r.shuffle(ms)
            out.append(base + "".join(ms))
        elif k < 0.7 and compat:
            out.append("".join(r.choice(compat) for _ in range(r.randint(1, 3))))
        elif k < 0.85 and canon:
            c = r.choice(canon)
            out.append(c if r.random() < 0.5 else UCD.normalize("NFD", c))
        else:
            pool = r.choice(POOLS)
            out.append("".join(r.choice(pool) for _ in range(r.randint(1, 6))))
    return "".join(out)


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
    args = sys.argv[1:]
    gen = rand_text
    if args and args[0] == "--unicode":
        if UCD is unicodedata or UCD.unidata_version != "16.0.0":
            print("SKIP: --unicode needs the PyPI package unicodedata2==16.0.0")
            return 77
        gen = unicode_text
        args = args[1:]
    bindir, model = args[0], args[1]
    n = int(args[2]) if len(args) > 2 else 300
    seed = int(args[3]) if len(args) > 3 else 1
    r = random.Random(seed)
    texts = [gen(r) for _ in range(n)]
    for c in args[4:]:
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
