/* test_tokenizer.c - the tokenizer against golden ids made with Hugging Face
 * `tokenizers` (tests/ref/make_tokenizer_golden.py, also with --unicode for
 * adversarial Unicode texts) on the real tokenizer.json files in
 * $CDMOE_SHARED, llama.cpp's HF-made test vectors, our synthetic tokenizers
 * (tests/ref/make_tokenizer_synth.py) and the minimal byte-level tokenizer
 * (these need no shared files). */
#include <unistd.h>
#include <jansson.h>

#include "common.h"
#include "bytetok.h"
#include "testutil.h"
#include "tokenizer.h"
#include "tok_internal.h"

#define FIX "tests/fixtures/tokenizer"

static const char *shared(void)
{
    const char *s = getenv("CDMOE_SHARED");
    return s && *s ? s : "../shared";
}

/* Model dir in shared, or NULL (and a loud skip line) when absent. */
static const char *model_dir(const char *name)
{
    static char p[1024];
    snprintf(p, sizeof p, "%s/data/tokenizers/%s/tokenizer.json", shared(), name);
    if (access(p, R_OK) != 0) {
        printf("SKIP: %s absent (../shared absent)\n", p);
        return NULL;
    }
    snprintf(p, sizeof p, "%s/data/tokenizers/%s", shared(), name);
    return p;
}

static json_t *load_jsonl(const char *path)
{
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    json_t *arr = json_array();
    char *line = NULL;
    size_t cap = 0;
    ssize_t n;
    while ((n = getline(&line, &cap, f)) > 0) {
        json_error_t err;
        json_t *o = json_loadb(line, (size_t)n, JSON_ALLOW_NUL, &err);
        assert_non_null(o);
        json_array_append_new(arr, o);
    }
    free(line);
    fclose(f);
    return arr;
}

static int ids_equal(const int32_t *a, size_t n, const json_t *want, const char *what, size_t idx)
{
    size_t wn = json_array_size(want);
    int ok = wn == n;
    for (size_t i = 0; ok && i < n; i++) ok = a[i] == json_integer_value(json_array_get(want, i));
    if (!ok) {
        fprintf(stderr, "%s text %zu: got", what, idx);
        for (size_t i = 0; i < n; i++) fprintf(stderr, " %d", a[i]);
        fprintf(stderr, "\n  want");
        for (size_t i = 0; i < wn; i++) fprintf(stderr, " %d", (int)json_integer_value(json_array_get(want, i)));
        fprintf(stderr, "\n");
    }
    return ok;
}

/* set: "" for our stress texts (texts.jsonl, golden-NAME.jsonl), "unicode-"
 * for the adversarial Unicode texts (unicode-texts.jsonl, golden-unicode-NAME.jsonl). */
static void golden_model(const char *name, const char *set)
{
    const char *dir = model_dir(name);
    if (!dir) skip();
    moe_tokenizer *t = moe_tokenizer_open(dir);
    if (!t) fprintf(stderr, "%s\n", moe_error());
    assert_non_null(t);
    char gp[256], tp[256];
    snprintf(gp, sizeof gp, FIX "/golden-%s%s.jsonl", set, name);
    snprintf(tp, sizeof tp, FIX "/%stexts.jsonl", set);
    json_t *texts = load_jsonl(tp), *gold = load_jsonl(gp);
    assert_int_equal(json_array_size(texts), json_array_size(gold));
    int bad = 0, rt = 0;
    for (size_t i = 0; i < json_array_size(texts); i++) {
        json_t *tx = json_object_get(json_array_get(texts, i), "text");
        json_t *g = json_array_get(gold, i);
        const char *s = json_string_value(tx);
        size_t sl = json_string_length(tx);
        int32_t *ids;
        size_t n;
        assert_int_equal(moe_tokenizer_encode(t, s, sl, 0, &ids, &n), 0);
        bad += !ids_equal(ids, n, json_object_get(g, "ids"), name, i);
        /* decode like tokenizers.decode(skip_special_tokens=False) */
        char *dec;
        size_t dl;
        assert_int_equal(moe_tokenizer_decode(t, ids, n, 0, &dec, &dl), 0);
        json_t *wd = json_object_get(g, "decoded");
        if (dl != json_string_length(wd) || memcmp(dec, json_string_value(wd), dl)) {
            fprintf(stderr, "%s text %zu: decode differs: '%s' vs '%s'\n", name, i, dec, json_string_value(wd));
            bad++;
        }
        if (json_is_true(json_object_get(g, "roundtrip"))) {
            assert_int_equal(dl, sl);
            assert_memory_equal(dec, s, sl);
            rt++;
        }
        free(dec);
        free(ids);
        assert_int_equal(moe_tokenizer_encode(t, s, sl, 1, &ids, &n), 0);
        bad += !ids_equal(ids, n, json_object_get(g, "ids_special"), name, i);
        free(ids);
        const char *key;
        json_t *tv;
        json_object_foreach(json_object_get(g, "trunc"), key, tv) {
            int r = moe_tokenizer_encode_trunc(t, s, sl, 1, (size_t)atoi(key), &ids, &n);
            if (json_is_null(tv)) { assert_int_equal(r, -1); continue; }
            assert_int_equal(r, 0);
            bad += !ids_equal(ids, n, tv, name, i);
            free(ids);
        }
    }
    printf("%s%s: %zu texts, %d round trips checked, %d mismatches\n", set, name, json_array_size(texts), rt,
           bad);
    assert_int_equal(bad, 0);
    json_decref(texts);
    json_decref(gold);
    moe_tokenizer_close(t);
}

static void test_golden_gpt2(void **state) { (void)state; golden_model("gpt2", ""); }
static void test_golden_qwen3(void **state) { (void)state; golden_model("qwen3", ""); }
static void test_golden_deepseek_v3(void **state) { (void)state; golden_model("deepseek-v3", ""); }
/* letters, digits and marks of Unicode 15 and 16 in the split regexes
 * (tokenizers: Unicode 16.0), marks and decompositions of every Unicode
 * version in NFC (qwen3: tokenizers' Unicode 9.0 tables) */
static void test_unicode_gpt2(void **state) { (void)state; golden_model("gpt2", "unicode-"); }
static void test_unicode_qwen3(void **state) { (void)state; golden_model("qwen3", "unicode-"); }
static void test_unicode_deepseek_v3(void **state) { (void)state; golden_model("deepseek-v3", "unicode-"); }

/* llama.cpp's vectors: *.inp = tests separated by "\n__ggml_vocab_test__\n",
 * *.out = one line of HF ids (no special tokens) per test. */
static void llamacpp_vectors(const char *model, const char *vocab)
{
    const char *dir = model_dir(model);
    if (!dir) skip();
    char ip[1024], op[1024];
    snprintf(ip, sizeof ip, "%s/data/tokenizers/llama.cpp-vocab/ggml-vocab-%s.gguf.inp", shared(), vocab);
    snprintf(op, sizeof op, "%s/data/tokenizers/llama.cpp-vocab/ggml-vocab-%s.gguf.out", shared(), vocab);
    size_t il, ol;
    char *in = moe_read_file(ip, &il), *out = moe_read_file(op, &ol);
    if (!in || !out) {
        printf("SKIP: %s absent (../shared absent)\n", ip);
        free(in); free(out);
        skip();
    }
    moe_tokenizer *t = moe_tokenizer_open(dir);
    assert_non_null(t);
    const char *sep = "\n__ggml_vocab_test__\n";
    char *p = in, *q = out;
    int ntests = 0, bad = 0;
    for (;;) {
        char *e = strstr(p, sep);
        if (!e) break;
        char *ql = strchr(q, '\n');
        assert_non_null(ql);
        *ql = 0;
        json_t *want = json_array();
        for (char *tok = strtok(q, " "); tok; tok = strtok(NULL, " "))
            json_array_append_new(want, json_integer(atoi(tok)));
        int32_t *ids;
        size_t n;
        assert_int_equal(moe_tokenizer_encode(t, p, (size_t)(e - p), 0, &ids, &n), 0);
        bad += !ids_equal(ids, n, want, vocab, (size_t)ntests);
        free(ids);
        json_decref(want);
        ntests++;
        p = e + strlen(sep);
        q = ql + 1;
    }
    printf("llama.cpp %s vectors with %s: %d tests, %d mismatches\n", vocab, model, ntests, bad);
    assert_true(ntests >= 40);
    assert_int_equal(bad, 0);
    moe_tokenizer_close(t);
    free(in);
    free(out);
}

static void test_llamacpp_gpt2(void **state) { (void)state; llamacpp_vectors("gpt2", "gpt-2"); }
static void test_llamacpp_qwen2(void **state) { (void)state; llamacpp_vectors("qwen3", "qwen2"); }
static void test_llamacpp_r1qwen(void **state) { (void)state; llamacpp_vectors("qwen3", "deepseek-r1-qwen"); }

/* ---- no shared files needed ---------------------------------------------- */

/* Our own small tokenizers (tests/ref/make_tokenizer_synth.py): byte_fallback,
 * Metaspace, unk, Split behaviours, added-token flags, templates. */
static void synth(const char *name)
{
    char dir[256], gp[300];
    snprintf(dir, sizeof dir, FIX "/synth-%s", name);
    snprintf(gp, sizeof gp, "%s/golden.jsonl", dir);
    moe_tokenizer *t = moe_tokenizer_open(dir);
    if (!t) fprintf(stderr, "%s\n", moe_error());
    assert_non_null(t);
    json_t *gold = load_jsonl(gp);
    int bad = 0;
    for (size_t i = 0; i < json_array_size(gold); i++) {
        json_t *g = json_array_get(gold, i), *tx = json_object_get(g, "text");
        const char *s = json_string_value(tx);
        size_t sl = json_string_length(tx);
        int32_t *ids;
        size_t n;
        assert_int_equal(moe_tokenizer_encode(t, s, sl, 0, &ids, &n), 0);
        bad += !ids_equal(ids, n, json_object_get(g, "ids"), name, i);
        char *dec;
        size_t dl;
        assert_int_equal(moe_tokenizer_decode(t, ids, n, 0, &dec, &dl), 0);
        if (strcmp(dec, json_string_value(json_object_get(g, "decoded")))) {
            fprintf(stderr, "%s text %zu: decode '%s' vs '%s'\n", name, i, dec,
                    json_string_value(json_object_get(g, "decoded")));
            bad++;
        }
        free(dec);
        free(ids);
        assert_int_equal(moe_tokenizer_encode(t, s, sl, 1, &ids, &n), 0);
        bad += !ids_equal(ids, n, json_object_get(g, "ids_special"), name, i);
        assert_int_equal(moe_tokenizer_decode(t, ids, n, MOE_TOK_SKIP_SPECIAL, &dec, &dl), 0);
        if (strcmp(dec, json_string_value(json_object_get(g, "decoded_skip")))) {
            fprintf(stderr, "%s text %zu: decode(skip) '%s' vs '%s'\n", name, i, dec,
                    json_string_value(json_object_get(g, "decoded_skip")));
            bad++;
        }
        free(dec);
        free(ids);
    }
    printf("synth-%s: %zu texts, %d mismatches\n", name, json_array_size(gold), bad);
    assert_int_equal(bad, 0);
    json_decref(gold);
    moe_tokenizer_close(t);
}

static void test_synth_llama(void **state) { (void)state; synth("llama"); }
static void test_synth_meta(void **state) { (void)state; synth("meta"); }
static void test_synth_split(void **state) { (void)state; synth("split"); }
/* the Unicode normal forms as tokenizers computes them (Unicode 9.0 tables),
 * on adversarial texts: marks and decompositions of every Unicode version */
static void test_synth_nfc(void **state) { (void)state; synth("nfc"); }
static void test_synth_nfd(void **state) { (void)state; synth("nfd"); }
static void test_synth_nfkc(void **state) { (void)state; synth("nfkc"); }
static void test_synth_nfkd(void **state) { (void)state; synth("nfkd"); }
/* Lowercase as Rust's char::to_lowercase (Unicode 16.0, U+0130 -> "i\u0307") */
static void test_synth_lower(void **state) { (void)state; synth("lower"); }

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static uint64_t rnd(void) { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return rng; }

/* The byte-level tokenizer moe-init writes (lib/tokenizer/bytetok.c) round-trips any
 * byte string, valid UTF-8 or not. */
static void test_byte_level_roundtrip(void **state)
{
    (void)state;
    assert_int_equal(moe_bytetok_write(tu_dir, 300, 1024), 0);
    moe_tokenizer *t = moe_tokenizer_open(tu_dir);
    if (!t) fprintf(stderr, "%s\n", moe_error());
    assert_non_null(t);
    int eot = moe_bytetok_size(300) - 1;
    assert_int_equal(moe_tokenizer_vocab_size(t), eot + 1);
    assert_int_equal(moe_tokenizer_token_id(t, "<|endoftext|>"), eot);
    const char *fixed[] = {"", "the theme of the thing", "<|endoftext|>", "a<|endoftext|>\xff\xfe<|endo",
                           "\xc3\x28 \xe2\x82 \xf0\x9f\x98 \xed\xa0\x80 caf\xc3\xa9 \xf0\x9f\x98\x80"};
    for (size_t k = 0; k < sizeof fixed / sizeof *fixed; k++) {
        int32_t *ids;
        size_t n;
        char *d;
        size_t dl;
        size_t len = strlen(fixed[k]);
        assert_int_equal(moe_tokenizer_encode(t, fixed[k], len, 1, &ids, &n), 0);
        assert_int_equal(moe_tokenizer_decode(t, ids, n, MOE_TOK_RAW, &d, &dl), 0);
        assert_int_equal(dl, len);
        assert_memory_equal(d, fixed[k], len);
        free(d);
        free(ids);
    }
    /* " the" merges into one token */
    int32_t *ids;
    size_t n;
    assert_int_equal(moe_tokenizer_encode(t, " the", 4, 0, &ids, &n), 0);
    assert_int_equal(n, 1);
    free(ids);
    /* random byte strings, biased toward ASCII */
    char buf[512];
    for (int it = 0; it < 2000; it++) {
        size_t len = rnd() % sizeof buf;
        for (size_t i = 0; i < len; i++) {
            uint64_t r = rnd();
            buf[i] = (char)((r & 3) ? (int)(0x20 + (r >> 8) % 95) : (int)((r >> 8) & 0xFF));
        }
        assert_int_equal(moe_tokenizer_encode(t, buf, len, 0, &ids, &n), 0);
        char *d;
        size_t dl;
        assert_int_equal(moe_tokenizer_decode(t, ids, n, MOE_TOK_RAW, &d, &dl), 0);
        assert_int_equal(dl, len);
        assert_memory_equal(d, buf, len);
        free(d);
        free(ids);
    }
    moe_tokenizer_close(t);
}

static void test_utf8_lossy(void **state)
{
    (void)state;
    struct { const char *in, *out; } c[] = {
        {"abc", "abc"},
        {"a\xff" "b", "a\xEF\xBF\xBD" "b"},
        {"\xe2\x82", "\xEF\xBF\xBD"},                       /* truncated 3-byte: one U+FFFD */
        {"\xe2\x82" "x", "\xEF\xBF\xBD" "x"},
        {"\xed\xa0\x80", "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD"}, /* surrogate: 3 */
        {"\xf0\x9f\x98", "\xEF\xBF\xBD"},
        {"\xc0\xaf", "\xEF\xBF\xBD\xEF\xBF\xBD"},
    };
    for (size_t i = 0; i < sizeof c / sizeof *c; i++) {
        size_t n;
        char *o = moe_utf8_lossy(c[i].in, strlen(c[i].in), &n);
        assert_string_equal(o, c[i].out);
        free(o);
    }
    assert_int_equal(moe_utf8_check("ab\xc3", 3), 2);
    assert_int_equal(moe_utf8_check("ab\xc3\xa9", 4), 4);
}

static void write_file(const char *name, const char *text) { tu_write_text(tu_path(name), text); }

static void test_bad_files(void **state)
{
    (void)state;
    assert_null(moe_tokenizer_open(tu_path("nope")));
    assert_int_equal(moe_error_kind(), MOE_ERR_IO);
    write_file("tokenizer.json", "{\"model\": {\"type\": \"WordPiece\", \"vocab\": {}}}");
    assert_null(moe_tokenizer_open(tu_dir));
    assert_non_null(strstr(moe_error(), "unsupported model type 'WordPiece'"));
    write_file("tokenizer.json", "{\"pre_tokenizer\": {\"type\": \"BertPreTokenizer\"}, "
                                 "\"model\": {\"type\": \"BPE\", \"vocab\": {}, \"merges\": []}}");
    assert_null(moe_tokenizer_open(tu_dir));
    assert_non_null(strstr(moe_error(), "unsupported pre_tokenizer type 'BertPreTokenizer'"));
    write_file("tokenizer.json", "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": [\"a a\"]}}");
    assert_null(moe_tokenizer_open(tu_dir));
    assert_non_null(strstr(moe_error(), "not in vocab"));
    write_file("tokenizer.json", "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": [}");
    assert_null(moe_tokenizer_open(tu_dir));
    assert_non_null(strstr(moe_error(), "tokenizer.json:1:"));
    write_file("tokenizer.json", "{\"pre_tokenizer\": {\"type\": \"Split\", \"pattern\": {\"Regex\": \"(\"}},"
                                 "\"model\": {\"type\": \"BPE\", \"vocab\": {}, \"merges\": []}}");
    assert_null(moe_tokenizer_open(tu_dir));
    assert_non_null(strstr(moe_error(), "bad regex"));
    /* non-byte-level: invalid UTF-8 is an error */
    write_file("tokenizer.json", "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1, \"ab\": 2},"
                                 " \"merges\": [[\"a\", \"b\"]]}}");
    moe_tokenizer *t = moe_tokenizer_open(tu_dir);
    assert_non_null(t);
    int32_t *ids;
    size_t n;
    assert_int_equal(moe_tokenizer_encode(t, "abab", 4, 0, &ids, &n), 0);
    assert_int_equal(n, 2);
    assert_int_equal(ids[0], 2);
    free(ids);
    assert_int_equal(moe_tokenizer_encode(t, "ab\xff", 3, 0, &ids, &n), -1);
    assert_non_null(strstr(moe_error(), "invalid UTF-8 at byte 2"));
    char *d;
    assert_int_equal(moe_tokenizer_decode(t, (int32_t[]){0, 7}, 2, 0, &d, NULL), -1);
    assert_non_null(strstr(moe_error(), "token id 7"));
    moe_tokenizer_close(t);
    /* JSON escapes in the vocabulary and merges (read by the fast loader) */
    write_file("tokenizer.json", "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"\\u0041\": 0,"
                                 " \"\\ud83d\\ude00\": 1, \"A\\ud83d\\ude00\": 2, \"\\\"\\\\\\n\": 3},"
                                 " \"merges\": [[\"A\", \"\\ud83d\\ude00\"]]}}");
    t = moe_tokenizer_open(tu_dir);
    if (!t) fprintf(stderr, "%s\n", moe_error());
    assert_non_null(t);
    assert_int_equal(moe_tokenizer_encode(t, "A\xf0\x9f\x98\x80\"\\\n", 8, 0, &ids, &n), 0);
    assert_int_equal(n, 1);   /* the other chars are not tokens and there is no unk */
    assert_int_equal(ids[0], 2);
    free(ids);
    assert_int_equal(moe_tokenizer_token_id(t, "\"\\\n"), 3);
    moe_tokenizer_close(t);
}

/* Regexes see the general categories, \d and \w of Unicode 16.0, as the
 * Oniguruma bundled in tokenizers does (the system's may know only 14.0):
 * letters, digits and numbers added in Unicode 15 and 16 included. */
static void test_regex_unicode16(void **state)
{
    (void)state;
    static const struct { const char *pat; int32_t cp; int match; } cases[] = {
        {"\\p{L}", 0x1C89, 1},            /* CYRILLIC CAPITAL LETTER TJE, 16.0 */
        {"\\p{Lu}", 0xA7CB, 1},           /* LATIN CAPITAL LETTER RAMS HORN, 16.0 */
        {"\\p{Letter}", 0x11F04, 1},      /* KAWI LETTER A, 15.0 */
        {"\\P{L}", 0x1C89, 0}, {"\\p{^L}", 0x1C89, 0}, {"\\P{^L}", 0x1C89, 1},
        {"[^\\r\\n\\p{L}\\p{N}]", 0x1C89, 0}, {"[^\\r\\n\\p{L}\\p{N}]", '!', 1},
        {"\\p{N}", 0x1D2C0, 1},           /* KAKTOVIK NUMERAL ZERO, 15.0 */
        {"\\d", 0x11F50, 1}, {"\\D", 0x11F50, 0}, {"[\\d]", 0x11F50, 1},   /* KAWI DIGIT ZERO */
        {"\\w", 0x1C89, 1}, {"\\w", 0xB2, 1}, {"\\w", 0x24B6, 1}, {"\\w", '!', 0},
        {"\\W", 0x1C89, 0}, {"[^\\W]", 0x1C89, 1},
        {"\\p{M}", 0x0897, 1},            /* ARABIC PEPET, 16.0 */
        {"\\p{S}", 0x1CC00, 1},           /* UP-POINTING GO-KART, 16.0 */
        {"\\p{L}", 0x0378, 0},            /* unassigned */
        {"\\p{Han}", 0x4E00, 1},          /* scripts are Oniguruma's */
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        tk_regex re;
        assert_int_equal(tk_regex_compile(&re, cases[i].pat, strlen(cases[i].pat), 0, NULL, "test"), 0);
        char u[4];
        size_t n = (size_t)tk_utf8_encode(cases[i].cp, u), b, e;
        int m = tk_regex_find(&re, u, n, 0, &b, &e) && b == 0 && e == n;
        if (m != cases[i].match) fail_msg("%s on U+%04X: %d", cases[i].pat, (unsigned)cases[i].cp, m);
        tk_regex_free(&re);
    }
    /* an escaped backslash stays one: \\p{L} is the text "\p{L}" */
    tk_regex re;
    assert_int_equal(tk_regex_compile(&re, "\\\\p{L}", 6, 0, NULL, "test"), 0);
    size_t b, e;
    assert_true(tk_regex_find(&re, "x\\p{L}", 6, 0, &b, &e) && b == 1 && e == 6);
    tk_regex_free(&re);
}

/* A Split pre-tokenizer whose regex is `n` alternatives \p{L}. */
static void put_split(tk_buf *b, int n)
{
    const char *head = "{\"type\": \"Split\", \"behavior\": \"Isolated\", \"pattern\": {\"Regex\": \"";
    tk_buf_put(b, head, strlen(head));
    for (int i = 0; i < n; i++) {
        const char *alt = i ? "|\\\\p{L}" : "\\\\p{L}";
        tk_buf_put(b, alt, strlen(alt));
    }
    tk_buf_put(b, "\"}}", 3);
}

/* Written out, a \p{L} takes ~10 KB: a small file of them must not make
 * gigabytes of patterns (and seconds of compiling); 16 MiB per tokenizer. */
static void test_regex_room(void **state)
{
    (void)state;
    for (int many_splits = 0; many_splits < 2; many_splits++) {
        tk_buf b = {0};
        const char *head = "{\"model\": {\"type\": \"BPE\", \"vocab\": {}, \"merges\": []},"
                           " \"pre_tokenizer\": {\"type\": \"Sequence\", \"pretokenizers\": [";
        tk_buf_put(&b, head, strlen(head));
        for (int k = 0; k < (many_splits ? 17 : 1); k++) {
            if (k) tk_buf_put(&b, ", ", 2);
            put_split(&b, many_splits ? 100 : 2000);   /* ~1 MiB each, or 20 MiB */
        }
        tk_buf_put(&b, "]}}", 4);   /* with its NUL */
        write_file("tokenizer.json", b.p);
        free(b.p);
        assert_null(moe_tokenizer_open(tu_dir));
        if (!strstr(moe_error(), "regex too large") || !strstr(moe_error(), "tokenizer.json"))
            fail_msg("%s", moe_error());
    }
    tk_buf b = {0};   /* one such regex fits */
    const char *head = "{\"model\": {\"type\": \"BPE\", \"vocab\": {}, \"merges\": []}, \"pre_tokenizer\": ";
    tk_buf_put(&b, head, strlen(head));
    put_split(&b, 100);
    tk_buf_put(&b, "}", 2);   /* with its NUL */
    write_file("tokenizer.json", b.p);
    free(b.p);
    moe_tokenizer *t = moe_tokenizer_open(tu_dir);
    assert_non_null(t);
    moe_tokenizer_close(t);
}

/* tokenizer.json with the given added_tokens (ids as text) after a model
 * vocabulary a, b, c (ids 0..2, or `vocab` when given). */
static moe_tokenizer *open_with_added(const char *added, const char *vocab)
{
    char text[2048];
    snprintf(text, sizeof text,
             "{\"added_tokens\": [%s], \"model\": {\"type\": \"BPE\", \"vocab\": %s, \"merges\": []},"
             " \"post_processor\": null}", added, vocab ? vocab : "{\"a\": 0, \"b\": 1, \"c\": 2}");
    write_file("tokenizer.json", text);
    return moe_tokenizer_open(tu_dir);
}

#define ADDED(content, id) "{\"content\": \"" content "\", \"id\": " id ", \"special\": true}"

/* Token ids must fit the vocabulary the file declares: V model tokens have
 * ids 0..V-1, and each added token the id tokenizers gives it (its model id,
 * or the next free one).  An id of 2^31 once made the id table double
 * forever, 2^27 cost 3.3 GB. */
static void test_token_ids_bounded(void **state)
{
    (void)state;
    const char *refused[][3] = {
        {ADDED("<x>", "2147483648"), NULL, "has id 2147483648, but the next free id"},
        {ADDED("<x>", "134217728"), NULL, "has id 134217728, but the next free id"},
        {ADDED("<x>", "9223372036854775807"), NULL, "the next free id (after the vocabulary"},
        {ADDED("<x>", "1"), NULL, "'<x>' has id 1, but the next free id"},
        {ADDED("a", "2"), NULL, "'a' has id 2, but the model vocabulary gives it id 0"},
        {ADDED("<x>", "3") ", " ADDED("<x>", "4"), NULL, "it was listed before with id 3"},
        {ADDED("<x>", "4"), NULL, "has id 4, but the next free id (after the vocabulary and the added "
                                  "tokens before it) is 3"},
        {"", "{\"a\": 0, \"b\": 134217728}", "model.vocab: token 'b' has id 134217728, beyond the 2 tokens"},
        {"", "{\"a\": 0, \"b\": 2147483648}", "model.vocab: bad entry"},
    };
    for (size_t i = 0; i < sizeof refused / sizeof *refused; i++) {
        assert_null(open_with_added(refused[i][0], refused[i][1]));
        if (!strstr(moe_error(), refused[i][2]) || !strstr(moe_error(), "tokenizer.json"))
            fail_msg("case %zu: '%s' lacks '%s'", i, moe_error(), refused[i][2]);
    }
    /* what tokenizers accepts: the ids it gives, a repeated token, an empty one
     * (no id), an added token that is a vocabulary token */
    moe_tokenizer *t = open_with_added(ADDED("", "3") ", " ADDED("<x>", "3") ", " ADDED("<x>", "3") ", "
                                       ADDED("b", "1") ", " ADDED("<y>", "4"), NULL);
    if (!t) fprintf(stderr, "%s\n", moe_error());
    assert_non_null(t);
    assert_int_equal(moe_tokenizer_vocab_size(t), 5);
    assert_int_equal(moe_tokenizer_token_id(t, "<y>"), 4);
    int32_t *ids;
    size_t n;
    assert_int_equal(moe_tokenizer_encode(t, "a<x>b<y>", 8, 0, &ids, &n), 0);
    assert_int_equal(n, 4);
    assert_int_equal(ids[1], 3);
    assert_int_equal(ids[3], 4);
    free(ids);
    moe_tokenizer_close(t);
    /* a post-processor id must be a token */
    write_file("tokenizer.json", "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": []},"
                                 " \"post_processor\": {\"type\": \"RobertaProcessing\", \"cls\": [\"a\", 0],"
                                 " \"sep\": [\"z\", 4294967296]}}");
    assert_null(moe_tokenizer_open(tu_dir));
    assert_non_null(strstr(moe_error(), "post_processor: special token id -1 is not in the vocabulary"));
    /* a Strip decoder's count beyond int is clamped, not wrapped (2^32 + 1 was 1) */
    write_file("tokenizer.json", "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"   a\": 0}, \"merges\": []},"
                                 " \"decoder\": {\"type\": \"Strip\", \"content\": \" \", \"start\": 4294967297,"
                                 " \"stop\": 0}}");
    t = moe_tokenizer_open(tu_dir);
    assert_non_null(t);
    char *dec;
    assert_int_equal(moe_tokenizer_decode(t, (int32_t[]){0}, 1, 0, &dec, NULL), 0);
    assert_string_equal(dec, "a");
    free(dec);
    moe_tokenizer_close(t);
}

/* tokenizer_config.json decides BOS/EOS for Llama/Gemma/GPT-NeoX classes. */
static void test_config(void **state)
{
    (void)state;
    write_file("tokenizer.json",
               "{\"added_tokens\": [{\"id\": 3, \"content\": \"<s>\", \"special\": true},"
               " {\"id\": 4, \"content\": \"</s>\", \"special\": true}],"
               " \"post_processor\": {\"type\": \"TemplateProcessing\", \"single\": [{\"Sequence\": {\"id\": \"A\"}},"
               " {\"SpecialToken\": {\"id\": \"</s>\"}}], \"special_tokens\": {\"</s>\": {\"ids\": [4]}}},"
               " \"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1, \"ab\": 2}, \"merges\": [\"a b\"]}}");
    struct { const char *cfg; int n; int32_t want[4]; } c[] = {
        {NULL, 2, {2, 4}},   /* no config: tokenizer.json's template */
        {"{\"tokenizer_class\": \"LlamaTokenizerFast\", \"bos_token\": {\"content\": \"<s>\"}}", 2, {3, 2}},
        {"{\"tokenizer_class\": \"LlamaTokenizer\", \"add_eos_token\": true, \"bos_token\": \"<s>\","
         " \"eos_token\": \"</s>\"}", 3, {3, 2, 4}},
        {"{\"tokenizer_class\": \"GPTNeoXTokenizer\", \"bos_token\": \"<s>\"}", 1, {2}},
        {"{\"tokenizer_class\": \"Qwen2Tokenizer\", \"add_bos_token\": true, \"bos_token\": \"<s>\"}", 2, {2, 4}},
    };
    for (size_t k = 0; k < sizeof c / sizeof *c; k++) {
        unlink(tu_path("tokenizer_config.json"));
        if (c[k].cfg) write_file("tokenizer_config.json", c[k].cfg);
        moe_tokenizer *t = moe_tokenizer_open(tu_dir);
        if (!t) fprintf(stderr, "%s\n", moe_error());
        assert_non_null(t);
        int32_t *ids;
        size_t n;
        assert_int_equal(moe_tokenizer_encode(t, "ab", 2, 1, &ids, &n), 0);
        assert_int_equal(n, c[k].n);
        assert_memory_equal(ids, c[k].want, n * sizeof *ids);
        free(ids);
        assert_int_equal(moe_tokenizer_num_special(t, 1), (size_t)c[k].n - 1);
        moe_tokenizer_close(t);
    }
    write_file("tokenizer_config.json", "{\"tokenizer_class\": \"LlamaTokenizerFast\", \"bos_token\": null}");
    assert_null(moe_tokenizer_open(tu_dir));
    assert_non_null(strstr(moe_error(), "add_bos_token is set but bos_token is missing"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_utf8_lossy),
        cmocka_unit_test(test_synth_llama),
        cmocka_unit_test(test_synth_meta),
        cmocka_unit_test(test_synth_split),
        cmocka_unit_test(test_synth_nfc),
        cmocka_unit_test(test_synth_nfd),
        cmocka_unit_test(test_synth_nfkc),
        cmocka_unit_test(test_synth_nfkd),
        cmocka_unit_test(test_synth_lower),
        cmocka_unit_test_setup_teardown(test_byte_level_roundtrip, tu_setup_dir, tu_teardown_dir),
        cmocka_unit_test_setup_teardown(test_bad_files, tu_setup_dir, tu_teardown_dir),
        cmocka_unit_test_setup_teardown(test_config, tu_setup_dir, tu_teardown_dir),
        cmocka_unit_test_setup_teardown(test_token_ids_bounded, tu_setup_dir, tu_teardown_dir),
        cmocka_unit_test(test_regex_unicode16),
        cmocka_unit_test_setup_teardown(test_regex_room, tu_setup_dir, tu_teardown_dir),
        cmocka_unit_test(test_golden_gpt2),
        cmocka_unit_test(test_golden_qwen3),
        cmocka_unit_test(test_golden_deepseek_v3),
        cmocka_unit_test(test_unicode_gpt2),
        cmocka_unit_test(test_unicode_qwen3),
        cmocka_unit_test(test_unicode_deepseek_v3),
        cmocka_unit_test(test_llamacpp_gpt2),
        cmocka_unit_test(test_llamacpp_qwen2),
        cmocka_unit_test(test_llamacpp_r1qwen),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
