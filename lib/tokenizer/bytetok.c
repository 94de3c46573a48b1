/* bytetok.c - minimal byte-level BPE tokenizer writer (see bytetok.h). */
#include "bytetok.h"
#include "common.h"

#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Frequent English words (and pieces); merged left to right, space-prefixed
 * ones marked by a leading ' '.  The order fixes the merge ranks. */
static const char *const words[] = {
    " the", "in", "er", "on", " a", "re", "at", "en", "or", " of", " and", " to", "ing", "is",
    " in", "ed", "es", "an", "it", "al", " is", " for", " that", " on", " with", " as", " was",
    " be", " by", "ion", " this", " are", " he", " it", " from", " at", " or", " have", " not",
    " his", " an", " which", " but", " they", " you", " we", " has", " were", " their", " one",
    " all", " can", " more", " been", " there", " would", " when", " time", " other", " new",
    "ly", "ent", "ation", "ter", "ment", "The", " The", "\n\n", "  ", "    ", ".\n", ", ", ". ",
    " model", " expert", " layer", " token", " data",
};

/* GPT-2 byte -> code point. */
static unsigned byte_cp(int b)
{
    if ((b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff)) return (unsigned)b;
    int n = 0;
    for (int x = 0; x < b; x++)
        if (!((x >= 0x21 && x <= 0x7e) || (x >= 0xa1 && x <= 0xac) || (x >= 0xae && x <= 0xff))) n++;
    return 256u + (unsigned)n;
}

static int put_utf8(char *o, unsigned cp)
{
    if (cp < 0x80) { o[0] = (char)cp; return 1; }
    o[0] = (char)(0xc0 | (cp >> 6));
    o[1] = (char)(0x80 | (cp & 0x3f));
    return 2; /* all code points here are < 0x800 */
}

/* Byte-level string of raw bytes s[0..n). */
static void bl_string(const char *s, size_t n, char *out)
{
    size_t o = 0;
    for (size_t i = 0; i < n; i++) o += (size_t)put_utf8(out + o, byte_cp((unsigned char)s[i]));
    out[o] = 0;
}

typedef struct {
    char left[64], right[64], merged[64];
} merge;

/* Build the merge list (up to max merges).  Returns the count. */
static int build_merges(merge *m, int max, json_t *vocab_seen)
{
    int n = 0;
    for (size_t w = 0; w < sizeof words / sizeof *words && n < max; w++) {
        const char *word = words[w];
        size_t len = strlen(word);
        char cur[64];
        bl_string(word, 1, cur);
        for (size_t k = 1; k < len && n < max; k++) {
            char nxt[64], joined[64];
            bl_string(word + k, 1, nxt);
            bl_string(word, k + 1, joined);
            if (!json_object_get(vocab_seen, joined)) {
                snprintf(m[n].left, sizeof m[n].left, "%s", cur);
                snprintf(m[n].right, sizeof m[n].right, "%s", nxt);
                snprintf(m[n].merged, sizeof m[n].merged, "%s", joined);
                json_object_set_new(vocab_seen, joined, json_true());
                n++;
            }
            snprintf(cur, sizeof cur, "%s", joined);
        }
    }
    return n;
}

int moe_bytetok_size(int vocab_size)
{
    if (vocab_size < 257) return -1;
    merge *m = moe_malloc(1024 * sizeof *m);
    json_t *seen = json_object();
    int nm = build_merges(m, vocab_size - 257 < 1024 ? vocab_size - 257 : 1024, seen);
    json_decref(seen);
    free(m);
    return 256 + nm + 1;
}

static int write_json(const char *dir, const char *name, json_t *o, size_t flags)
{
    char *p = moe_malloc(strlen(dir) + strlen(name) + 2);
    sprintf(p, "%s/%s", dir, name);
    char *s = json_dumps(o, flags);
    FILE *fp = fopen(p, "wb");
    int rc = -1;
    if (!fp) {
        moe_error_set(MOE_ERR_IO, "%s: cannot create: %s", p, strerror(errno));
    } else {
        size_t n = strlen(s);
        int bad = fwrite(s, 1, n, fp) != n || fputc('\n', fp) == EOF;
        bad |= fclose(fp) != 0;
        if (bad) moe_error_set(MOE_ERR_IO, "%s: write failed: %s", p, strerror(errno));
        else rc = 0;
    }
    free(s);
    free(p);
    return rc;
}

int moe_bytetok_write(const char *dir, int vocab_size, int model_max_length)
{
    if (vocab_size < 257) {
        moe_error_set(MOE_ERR_DATA, "%s: vocabulary of %d ids is too small for a byte-level tokenizer (>= 257)",
                      dir, vocab_size);
        return -1;
    }
    int maxm = vocab_size - 257 < 1024 ? vocab_size - 257 : 1024;
    merge *m = moe_malloc(1024 * sizeof *m);
    json_t *vocab = json_object(), *seen = json_object();
    char tok[8];
    for (int b = 0; b < 256; b++) {
        int k = put_utf8(tok, byte_cp(b));
        tok[k] = 0;
        json_object_set_new(vocab, tok, json_integer(b));
        json_object_set_new(seen, tok, json_true());
    }
    int nm = build_merges(m, maxm, seen);
    json_decref(seen);
    json_t *merges = json_array();
    for (int i = 0; i < nm; i++) {
        json_object_set_new(vocab, m[i].merged, json_integer(256 + i));
        char line[140];
        snprintf(line, sizeof line, "%s %s", m[i].left, m[i].right);
        json_array_append_new(merges, json_string(line));
    }
    free(m);
    int eot = 256 + nm;
    json_t *bl = json_pack("{s:s,s:b,s:b,s:b}", "type", "ByteLevel", "add_prefix_space", 0,
                           "trim_offsets", 1, "use_regex", 1);
    json_t *root = json_object();
    json_object_set_new(root, "version", json_string("1.0"));
    json_object_set_new(root, "truncation", json_null());
    json_object_set_new(root, "padding", json_null());
    json_object_set_new(root, "added_tokens",
                        json_pack("[{s:i,s:s,s:b,s:b,s:b,s:b,s:b}]", "id", eot, "content", "<|endoftext|>",
                                  "single_word", 0, "lstrip", 0, "rstrip", 0, "normalized", 0, "special", 1));
    json_object_set_new(root, "normalizer", json_null());
    json_object_set_new(root, "pre_tokenizer", json_deep_copy(bl));
    json_object_set_new(root, "post_processor", json_deep_copy(bl));
    json_object_set_new(root, "decoder", bl);
    json_object_set_new(root, "model",
                        json_pack("{s:s,s:n,s:n,s:n,s:n,s:b,s:b,s:b,s:o,s:o}", "type", "BPE", "dropout",
                                  "unk_token", "continuing_subword_prefix", "end_of_word_suffix", "fuse_unk", 0,
                                  "byte_fallback", 0, "ignore_merges", 0, "vocab", vocab, "merges", merges));
    int rc = write_json(dir, "tokenizer.json", root, JSON_INDENT(2) | JSON_ENSURE_ASCII);
    json_decref(root);
    if (rc < 0) return -1;
    json_t *tc = json_pack("{s:s,s:s,s:s,s:s,s:i,s:b,s:b,s:b}", "tokenizer_class", "PreTrainedTokenizerFast",
                           "bos_token", "<|endoftext|>", "eos_token", "<|endoftext|>", "pad_token",
                           "<|endoftext|>", "model_max_length", model_max_length, "add_bos_token", 0,
                           "add_eos_token", 0, "clean_up_tokenization_spaces", 0);
    rc = write_json(dir, "tokenizer_config.json", tc, JSON_INDENT(2) | JSON_SORT_KEYS);
    json_decref(tc);
    return rc;
}
