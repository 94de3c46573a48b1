#!/usr/bin/env python3
"""Golden vectors for moe-tokenize, made with the Hugging Face `tokenizers` library.

Writes tests/fixtures/tokenizer/texts.jsonl (our own stress texts, one {"text": ...} per
line) and tests/fixtures/tokenizer/golden-<model>.jsonl, one line per text:
  {"i": k, "ids": [...], "ids_special": [...], "trunc": {"N": [...]}, "decoded": "...",
   "roundtrip": true|false}
ids: add_special_tokens=False; ids_special: with the post-processor that transformers 4.x
builds (Llama/Gemma tokenizer classes: "[BOS] $A [EOS]" from add_bos_token/add_eos_token in
tokenizer_config.json, else tokenizer.json's own); trunc: that tokenizer with
enable_truncation(max_length=N); decoded: decode(ids, skip_special_tokens=False).

Usage: make_tokenizer_golden.py [SHARED_DIR]   (default $CDMOE_SHARED or ../shared)
       make_tokenizer_golden.py --unicode [SHARED_DIR]
--unicode writes only tests/fixtures/tokenizer/unicode-texts.jsonl (adversarial texts at the
edges of the Unicode data, tokenizer_fuzz.unicode_text; needs unicodedata2==16.0.0) and
golden-unicode-<model>.jsonl for them.
The tokenizer.json files are read from SHARED_DIR/data/tokenizers/<model>/ and never copied.
deepseek-llm (the DeepSeekMoE tokenizer) exists there only as llama.cpp's vocabulary GGUF: its
tokenizer.json is rebuilt in a temporary directory by gguf_to_tokenizer_json.py, which is checked
here against llama.cpp's HF-made vectors first.
"""
import json
import os
import sys
import tempfile

import tokenizers
from tokenizers.processors import TemplateProcessing

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "fixtures", "tokenizer")
MODELS = ["gpt2", "qwen3", "deepseek-v3"]
TRUNC = [1, 2, 5, 17]


def stress_texts():
    t = [
        "", " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n \n\n  \t\t \r\r\n",
        "Hello world", " Hello world", "  Hello", "   Hello  ", "Hello\n\nworld\n",
        "I'm you're he's we've they'll she'd it's I'M YOU'RE HE'S WE'VE THEY'LL SHE'D",
        "don't can't won't shouldn't y'all 'tis rock'n'roll O'Neill ' 's 'S ''",
        "Straße ſ 'ſ 'ſt ﬁne ﬂow",
        "0 1 12 123 1234 12345 123456 1234567 12345678 123456789 1234567890 12345678901234567890",
        "3.14159 -42 +7 1e10 0x1F 1,000,000 1.000.000,50 $19.99 50% 2024-06-01 12:34:56",
        "٣٤٥ ०१२ ½ ¾ ² ³ ⅓ Ⅻ ① ⑩ ３４５",
        "Hello!!! What?! ... …… --- *** ### @user #tag <html><body>&amp;</body></html>",
        "a+b=c; x->y; f(x)={y|y>0}; [1,2,3]; 'quote' \"dq\" `bt` ~tilde^caret",
        "    def f(x):\n        return x * 2  # comment\n\n\tif x:\n\t\tpass\n",
        "café naïve résumé coöperate Ångström Führer über Öl ÿ ñ ç",
        "cafe\u0301 nai\u0308ve A\u030angstro\u0308m e\u0301\u0301 \u0301start",
        "Ελληνικά κείμενο Русский текст Українська мова עברית العربية",
        "中文文本测试，包含标点。日本語のテキスト、カタカナとひらがな。한국어 텍스트입니다.",
        "混合English和中文123数字abc。",
        "ภาษาไทย हिन्दी বাংলা தமிழ் ქართული Հայերեն",
        "emoji 😀😃😄 👍🏽 👨‍👩‍👧‍👦 🇩🇪🇯🇵 ❤️ ☃ ✓ 🦄 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟘𝟙𝟚 𐍈 𠜎𠜱",
        "zero\u200bwidth\u200d joiner\ufeffbom\u00a0nbsp\u2009thin\u3000ideo",
        "control\x00nul\x01\x02\x1b[0m\x7f del",
        "Tab\tseparated\tvalues\n1\t2\t3\n",
        "<|endoftext|>", "a<|endoftext|>b", " <|endoftext|> ", "<|endoftext|><|endoftext|>",
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
        "<｜begin▁of▁sentence｜>Hello<｜end▁of▁sentence｜>",
        "<think>\nreasoning\n</think>\n\nanswer",
        "<|endoftext", "endoftext|>", "<|im_start|", "<<|endoftext|>>",
        "ied 4 ½ months", "Führer", "!!!!!!", "   Hello\n    Hello",
        "A" * 300, "ab" * 200, " " * 50 + "x", "\n" * 20, "9" * 40, "😀" * 20,
        "The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX! the-quick_brown.fox",
        "URLs: https://example.com/path?q=1&r=two#frag mailto:a.b@c.de ftp://x.y/z",
        "Mixed   spaces\u00a0 and\u2003em\u2002en  \n \t end  ",
        "Ǆǅǆ ǈ ǋ Ⅸ ꭰ Ꭰ ᏸ ﬀ ｆｕｌｌ ＷＩＤＴＨ 𐐀𐐨",
        "क्षत्रिय ਪੰਜਾਬੀ ગુજરાતી ଓଡ଼ିଆ తెలుగు ಕನ್ನಡ മലയാളം සිංහල",
        "ℌ𝔢𝔩𝔩𝔬 ℂ ℍ ℕ ℙ ℚ ℝ ℤ Ω K Å ℮",
        "tokenizer's `regex`: (?i:'s|'t) vs \\p{L}+ and [^\\s\\p{L}\\p{N}]",
        "line1\r\nline2\rline3\n\r\nline4\u2028line5\u2029line6\x85line7",
        "     \n     leading and trailing whitespace on lines     \n     ",
    ]
    return t


def post_with_config(tok, model_dir):
    """The post-processor transformers 4.x would use (see module doc)."""
    cfg_path = os.path.join(model_dir, "tokenizer_config.json")
    if not os.path.exists(cfg_path):
        return
    cfg = json.load(open(cfg_path, encoding="utf-8"))
    cls = cfg.get("tokenizer_class") or ""
    if "LlamaTokenizer" not in cls and "GemmaTokenizer" not in cls:
        return
    def content(v):
        return v if isinstance(v, str) or v is None else v.get("content")
    add_bos = cfg.get("add_bos_token", True)
    add_eos = cfg.get("add_eos_token", False)
    bos, eos = content(cfg.get("bos_token")), content(cfg.get("eos_token"))
    single, specials = [], []
    if add_bos:
        single.append(bos)
        specials.append((bos, tok.token_to_id(bos)))
    single.append("$A")
    if add_eos:
        single.append(eos)
        specials.append((eos, tok.token_to_id(eos)))
    tok.post_processor = TemplateProcessing(single=" ".join(single), special_tokens=specials)


def golden(model_dir, texts, out_path):
    tok = tokenizers.Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    post_with_config(tok, model_dir)
    with open(out_path, "w", encoding="utf-8") as f:
        for i, s in enumerate(texts):
            ids = tok.encode(s, add_special_tokens=False).ids
            ids_sp = tok.encode(s).ids
            trunc = {}
            for n in TRUNC:
                tok.enable_truncation(max_length=n)
                try:
                    trunc[str(n)] = tok.encode(s).ids
                except Exception:
                    trunc[str(n)] = None
                tok.no_truncation()
            dec = tok.decode(ids, skip_special_tokens=False)
            rec = {"i": i, "ids": ids, "ids_special": ids_sp, "trunc": trunc, "decoded": dec,
                   "roundtrip": dec == s}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def write_texts(path, texts):
    with open(path, "w", encoding="utf-8") as f:
        for s in texts:
            f.write(json.dumps({"text": s}, ensure_ascii=False) + "\n")


def main_unicode(shared, n=120, seed=2026):
    import random
    sys.path.insert(0, HERE)
    import tokenizer_fuzz
    if tokenizer_fuzz.UCD.unidata_version != "16.0.0":
        raise SystemExit("--unicode needs the PyPI package unicodedata2==16.0.0")
    r = random.Random(seed)
    texts = [tokenizer_fuzz.unicode_text(r) for _ in range(n)]
    write_texts(os.path.join(OUT, "unicode-texts.jsonl"), texts)
    for m in MODELS:
        d = os.path.join(shared, "data", "tokenizers", m)
        golden(d, texts, os.path.join(OUT, "golden-unicode-%s.jsonl" % m))
        print("wrote golden-unicode-%s.jsonl (tokenizers %s)" % (m, tokenizers.__version__))


def main():
    args = sys.argv[1:]
    unicode_only = bool(args) and args[0] == "--unicode"
    if unicode_only:
        args = args[1:]
    shared = args[0] if args else os.environ.get(
        "CDMOE_SHARED", os.path.join(HERE, "..", "..", "..", "shared"))
    os.makedirs(OUT, exist_ok=True)
    if unicode_only:
        return main_unicode(shared)
    texts = stress_texts()
    write_texts(os.path.join(OUT, "texts.jsonl"), texts)
    for m in MODELS:
        d = os.path.join(shared, "data", "tokenizers", m)
        golden(d, texts, os.path.join(OUT, "golden-%s.jsonl" % m))
        print("wrote golden-%s.jsonl (tokenizers %s)" % (m, tokenizers.__version__))
    sys.path.insert(0, HERE)
    import gguf_to_tokenizer_json as g2t
    vocab = os.path.join(shared, "data", "tokenizers", "llama.cpp-vocab")
    for m in ["deepseek-llm"]:
        with tempfile.TemporaryDirectory() as d:
            g2t.convert(os.path.join(vocab, "ggml-vocab-%s.gguf" % m), d)
            tok = tokenizers.Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
            inp = open(os.path.join(vocab, "ggml-vocab-%s.gguf.inp" % m), encoding="utf-8").read()
            out = open(os.path.join(vocab, "ggml-vocab-%s.gguf.out" % m)).read().split("\n")
            for a, b in zip(inp.split("\n__ggml_vocab_test__\n")[:-1], out):
                if tok.encode(a, add_special_tokens=False).ids != [int(x) for x in b.split()]:
                    raise SystemExit("rebuilt %s tokenizer.json disagrees with llama.cpp on %r" % (m, a))
            golden(d, texts, os.path.join(OUT, "golden-%s.jsonl" % m))
        print("wrote golden-%s.jsonl (rebuilt from the GGUF, llama.cpp vectors agree)" % m)


if __name__ == "__main__":
    main()
