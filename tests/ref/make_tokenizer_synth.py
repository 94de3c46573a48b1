#!/usr/bin/env python3
"""Small tokenizers of our own that exercise the parts of the pipeline the real files in
../shared do not: byte_fallback BPE with a Llama-style normalizer and decoder, Metaspace,
unk/fuse_unk, subword prefix/suffix, every Split behaviour and invert, Digits, NFKC/NFD,
Lowercase, Strip, lstrip/rstrip/single_word added tokens, TemplateProcessing with BOS+EOS,
RobertaProcessing; and one byte-level tokenizer per Unicode normal form (synth-nfc, -nfd, -nfkc,
-nfkd) and Lowercase (synth-lower), its golden texts extended by adversarial Unicode texts (needs unicodedata2==16.0.0).  Trained with `tokenizers` on our stress texts (texts.jsonl, made by
make_tokenizer_golden.py) and written with their golden vectors to
tests/fixtures/tokenizer/synth-<name>/{tokenizer.json,golden.jsonl}.  No shared files needed.
"""
import json
import os
import sys

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers import processors, trainers

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "..", "fixtures", "tokenizer")
ENGLISH = """Once upon a time there was a little fox who lived in the forest. Every morning the fox
ran to the river, drank some water and looked at the clouds. "What a beautiful day!" she said.
The numbers 1, 22, 333 and 4444 are written in the book; prices were $3.50 and 12.5%.
Tokenizers split text into words, numbers and punctuation before the merges are applied.
"""


def texts():
    t = [json.loads(l)["text"] for l in open(os.path.join(FIX, "texts.jsonl"), encoding="utf-8")]
    return t + ENGLISH.split("\n") + ["low lower lowest newer wider", "ab-cd,ef.gh 12-34,56.78"]


def llama():
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tr = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=60,
                             show_progress=False)
    return tok, tr, "<s> $A </s>", [("<s>", 1), ("</s>", 2)], True


def meta():
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, continuing_subword_prefix="##",
                               end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex("[,;]"), "merged_with_previous"),
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)])
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    tr = trainers.BpeTrainer(vocab_size=350, special_tokens=["<unk>", "<bos>", "<eos>"], limit_alphabet=50,
                             continuing_subword_prefix="##", end_of_word_suffix="</w>", show_progress=False)
    return tok, tr, "<bos> $A <eos>", [("<bos>", 1), ("<eos>", 2)], False


def split():
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.Strip(), normalizers.NFD()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("-", "removed"),
        pre_tokenizers.Split(Regex("[,.]"), "merged_with_next"),
        pre_tokenizers.Split(Regex("[aeiou]+"), "contiguous", invert=True),
        pre_tokenizers.Split(Regex("\\s"), "isolated", invert=True),
        pre_tokenizers.Digits(individual_digits=False),
        pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(vocab_size=500, special_tokens=["<cls>", "<sep>"],
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    return tok, tr, None, None, False


def unicode_texts(n=80, seed=16):
    """Adversarial texts at the edges of the Unicode data (tokenizer_fuzz.unicode_text)."""
    import random
    import tokenizer_fuzz
    r = random.Random(seed)
    return [tokenizer_fuzz.unicode_text(r) for _ in range(n)]


def normal_form(form):
    """Byte-level BPE behind one Unicode normalizer (NFC, NFD, NFKC, NFKD, Lowercase): the ids
    show the normalized text byte for byte, and the GPT-2 split regex sees it."""
    def build():
        tok = Tokenizer(models.BPE())
        tok.normalizer = getattr(normalizers, form)()
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        tr = trainers.BpeTrainer(vocab_size=400, special_tokens=["<cls>", "<sep>"],
                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        return tok, tr, None, None, False, EDGE_CASES + unicode_texts()
    return build


# Marks tokenizers does not reorder (added in Unicode 10, 12, 14), a compatibility character
# it keeps (13), a composition it does not make (13), letters it splits as letters (15, 16).
EDGE_CASES = ["e\u1DF6\u0301\u0316", "\u0E81\u0EBA\u0E39\u0334", "a\u0898\u0316", "7\U0001FBF7 \U0001FBF7",
              "\U00011935\U00011930 \U00011938", "\u1C89's \U00011F04'S \U0001E4D0'll", "\U00031350's 12",
              "\u0130stanbul \u0130I\u0307 \u1C89\uA7CB\uA7DC\U00010D50 \u03A3\u039F\u03A3 \u1E9E \u2126",
              # where a single_word token may match: the Rust regex crate's \\w
              "word\u0301 \u0301word word\u200d \u24b6word word\u00b2 \u00bdword word\u203f \u216bword",
              "word\U0001F130 \u0e31word word\u0903 \u00aaword word\u2070 x\u02b0word \u3007word word\uff3f"]


def finish(name, tok, tr, template, specials, byte_tokens, more_texts=()):
    tok.train_from_iterator(texts(), tr)
    if byte_tokens:   # Llama-style <0xXX> entries in the model vocabulary
        j = json.loads(tok.to_str())
        v = j["model"]["vocab"]
        for b in range(256):
            v.setdefault("<0x%02X>" % b, len(v))
        tok = Tokenizer.from_str(json.dumps(j))
    tok.add_tokens([AddedToken("[lstrip]", lstrip=True), AddedToken("[rstrip]", rstrip=True),
                    AddedToken("word", single_word=True), AddedToken("<|raw|>", normalized=False)])
    tok.add_special_tokens(["<|special|>"])
    if template:
        tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=specials)
    else:
        tok.post_processor = processors.RobertaProcessing(("<sep>", tok.token_to_id("<sep>")),
                                                          ("<cls>", tok.token_to_id("<cls>")))
    d = os.path.join(FIX, "synth-" + name)
    os.makedirs(d, exist_ok=True)
    tok.save(os.path.join(d, "tokenizer.json"))
    extra = ["a [lstrip] b", "a   [lstrip]b", "a[rstrip]   b", "word words sword word_ word-word word",
             "x<|raw|>y <|special|>z", "ПРИВЕТ Ｆｕｌｌ ﬁ ǅ", "a,b;c, d ;e", "  trailing  ", "-a-b-", "x" * 50]
    with open(os.path.join(d, "golden.jsonl"), "w", encoding="utf-8") as f:
        for i, s in enumerate(texts() + extra + list(more_texts)):
            ids = tok.encode(s, add_special_tokens=False).ids
            rec = {"i": i, "text": s, "ids": ids, "ids_special": tok.encode(s).ids,
                   "decoded": tok.decode(ids, skip_special_tokens=False),
                   "decoded_skip": tok.decode(tok.encode(s).ids, skip_special_tokens=True)}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    print("wrote synth-%s (%d ids)" % (name, tok.get_vocab_size()))


BUILDERS = {"llama": llama, "meta": meta, "split": split, "nfc": normal_form("NFC"),
            "nfd": normal_form("NFD"), "nfkc": normal_form("NFKC"), "nfkd": normal_form("NFKD"),
            "lower": normal_form("Lowercase")}


def main():
    """make_tokenizer_synth.py [NAME...]: the named tokenizers (default: all)."""
    sys.path.insert(0, HERE)
    for name in sys.argv[1:] or BUILDERS:
        finish(name, *BUILDERS[name]())


if __name__ == "__main__":
    main()
