#!/usr/bin/env python3
"""Rebuild a Hugging Face tokenizer.json (+ tokenizer_config.json) from one of llama.cpp's
vocabulary GGUFs, for tokenizers whose tokenizer.json we do not have (DeepSeek-LLM, the
DeepSeekMoE tokenizer; DeepSeek-Coder).  Standard library only.

  gguf_to_tokenizer_json.py VOCAB.gguf OUTDIR

Vocabulary, merges and added tokens come from the GGUF (llama.cpp's "[PAD...]" filler entries
are dropped).  The pre-tokenizer is the Sequence that the published tokenizer.json of that
family uses (the split regexes llama.cpp transcribes for its `tokenizer.ggml.pre` type, with the
original, non-NFC code points, then Digits and ByteLevel).  Check the result against llama.cpp's
HF-made vectors: tokenizer_fuzz.py / tests/shell/test_tokenize_deepseek_llm.sh do.
"""
import json
import os
import struct
import sys

# DeepSeek-LLM: "\s?" + a run of cased letters; the class as code point ranges.
CASED = [
    (0x41, 0x5A), (0x61, 0x7A), (0xB5, 0xB5), (0xC0, 0xD6), (0xD8, 0xF6), (0xF8, 0x1BA),
    (0x1BC, 0x1BF), (0x1C4, 0x293), (0x295, 0x2AF), (0x370, 0x373), (0x376, 0x377),
    (0x37B, 0x37D), (0x37F, 0x37F), (0x386, 0x386), (0x388, 0x38A), (0x38C, 0x38C),
    (0x38E, 0x3A1), (0x3A3, 0x3F5), (0x3F7, 0x481), (0x48A, 0x52F), (0x531, 0x556),
    (0x10A0, 0x10C5), (0x13A0, 0x13F5), (0x13F8, 0x13FD), (0x1C90, 0x1CBA), (0x1CBD, 0x1CBF),
    (0x1D00, 0x1D2B), (0x1D6B, 0x1D77), (0x1D79, 0x1D9A), (0x1E00, 0x1F15), (0x1F18, 0x1F1D),
    (0x1F20, 0x1F45), (0x1F48, 0x1F4D), (0x1F50, 0x1F57), (0x1F59, 0x1F59), (0x1F5B, 0x1F5B),
    (0x1F5D, 0x1F5D), (0x1F5F, 0x1F7D), (0x1F80, 0x1FB4), (0x1FB6, 0x1FBC), (0x1FBE, 0x1FBE),
    (0x1FC2, 0x1FC4), (0x1FC6, 0x1FCC), (0x1FD0, 0x1FD3), (0x1FD6, 0x1FDB), (0x1FE0, 0x1FEC),
    (0x1FF2, 0x1FF4), (0x1FF6, 0x1FFC), (0x2102, 0x2102), (0x2107, 0x2107), (0x210A, 0x2113),
    (0x2115, 0x2115), (0x2119, 0x211D), (0x2124, 0x2124), (0x2126, 0x2126), (0x2128, 0x2128),
    (0x212A, 0x212D), (0x212F, 0x2134), (0x2139, 0x2139), (0x213C, 0x213F), (0x2145, 0x2149),
    (0x214E, 0x214E), (0x2183, 0x2184), (0x2C00, 0x2C7B), (0x2C7E, 0x2CE4), (0x2CEB, 0x2CEE),
    (0x2CF2, 0x2CF3), (0xA640, 0xA66D), (0xA680, 0xA69B), (0xA722, 0xA76F), (0xA771, 0xA787),
    (0xA78B, 0xA78E), (0xAB70, 0xABBF), (0xFB00, 0xFB06), (0xFB13, 0xFB17), (0xFF21, 0xFF3A),
    (0xFF41, 0xFF5A), (0x10400, 0x1044F), (0x104B0, 0x104D3), (0x104D8, 0x104FB),
    (0x10C80, 0x10CB2), (0x10CC0, 0x10CF2), (0x118A0, 0x118DF), (0x1E900, 0x1E943),
]
CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"


def char_class(ranges):
    out = []
    for lo, hi in ranges:
        out.append(chr(lo) if lo == hi else chr(lo) + "-" + chr(hi))
    return "[" + "".join(out) + "]"


def split(regex):
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


PRE = {
    "deepseek-llm": [
        split("[\r\n]"),
        split("\\s?" + char_class(CASED) + "+"),
        split("\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+"),
        split("\\s+$"),
        split(CJK),
        {"type": "Digits", "individual_digits": True},
    ],
    "deepseek-coder": [
        split("[\r\n]"),
        split("\\s?\\p{L}+"),
        split("\\s?\\p{P}+"),
        split(CJK),
        {"type": "Digits", "individual_digits": True},
    ],
}


def read_gguf(path):
    d = open(path, "rb").read()
    pos = [4]

    def u(fmt):
        v = struct.unpack_from("<" + fmt, d, pos[0])
        pos[0] += struct.calcsize("<" + fmt)
        return v[0]

    def s():
        n = u("Q")
        v = d[pos[0]:pos[0] + n].decode("utf-8")
        pos[0] += n
        return v

    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

    def val(t):
        if t in scalar:
            return u(scalar[t])
        if t == 8:
            return s()
        if t == 9:
            et, n = u("I"), u("Q")
            return [val(et) for _ in range(n)]
        raise ValueError("unknown GGUF value type %d" % t)

    if d[:4] != b"GGUF":
        raise ValueError("%s: not a GGUF file" % path)
    u("I")
    u("Q")
    kv = {}
    for _ in range(u("Q")):
        k = s()
        kv[k] = val(u("I"))
    return kv


def convert(gguf, outdir):
    kv = read_gguf(gguf)
    pre = kv.get("tokenizer.ggml.pre")
    if kv.get("tokenizer.ggml.model") != "gpt2" or pre not in PRE:
        raise SystemExit("%s: unsupported tokenizer (model %s, pre %s)" % (gguf, kv.get("tokenizer.ggml.model"), pre))
    toks, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    vocab, added = {}, []
    for i, (t, ty) in enumerate(zip(toks, types)):
        if ty == 1:
            vocab[t] = i
        elif ty in (3, 4) and not (t.startswith("[PAD") and t.endswith("]")):
            special = ty == 3
            added.append({"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": not special, "special": special})
    tj = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": []},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": PRE[pre] + [
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "vocab": vocab, "merges": kv["tokenizer.ggml.merges"]},
    }
    bos = toks[kv["tokenizer.ggml.bos_token_id"]]
    eos = toks[kv["tokenizer.ggml.eos_token_id"]]
    cfg = {"add_bos_token": bool(kv.get("tokenizer.ggml.add_bos_token", True)),
           "add_eos_token": bool(kv.get("tokenizer.ggml.add_eos_token", False)),
           "bos_token": bos, "eos_token": eos, "pad_token": eos, "unk_token": None,
           "model_max_length": 4096, "tokenizer_class": "LlamaTokenizerFast"}
    os.makedirs(outdir, exist_ok=True)
    with open(os.path.join(outdir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tj, f, ensure_ascii=False)
    with open(os.path.join(outdir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, ensure_ascii=False, indent=1)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    convert(sys.argv[1], sys.argv[2])
