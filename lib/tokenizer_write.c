/* tokenizer_write.c - write a minimal GPT-2-style byte-level BPE tokenizer
 * (for models made by moe-init that have no tokenizer of their own). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <jansson.h>
#include "common.h"
#include "tok_internal.h"

/* Common English byte pairs, in priority order ("Ġ" = space).  Merges whose
 * parts are not yet tokens are skipped; after these, letter pairs fill the
 * vocabulary in a fixed order. */
static const char *const merge_list[] = {
    "Ġ t", "h e", "Ġ a", "i n", "r e", "o n", "Ġt he", "e r", "Ġ s", "a t", "Ġ w", "Ġ o",
    "e n", "Ġ c", "i t", "i s", "a n", "o r", "e s", "Ġ b", "e d", "Ġ f", "in g", "Ġ p",
    "o u", "Ġa n", "a l", "a r", "Ġt o", "Ġ m", "Ġo f", "Ġ in", "Ġ d", "Ġ h", "Ġan d", "i c",
    "a s", "l e", "Ġt h", "i on", "o m", "l l", "en t", "Ġ n", "Ġ l", "s t", "Ġ re", "v e",
    "Ġ e", "r o", "l y", "Ġb e", "Ġ g", "Ġ T", "c t", "Ġ S", "i d", "o t", "Ġ I", "u t",
    "e t", "Ġ A", "Ġi s", "Ġo n", "i m", "a m", "o w", "a y", "a d", "s e", "Ġth at", "Ġ C",
    "i g", "Ġf or", "a c", "Ġ y", "v er", "u r", "Ġ u", "l d", "Ġs t", "Ġ M", "' s", "Ġ he",
    "Ġi t", "at ion", "it h", "i r", "c e", "Ġy ou", "i l", "Ġ B", "Ġw h", "o l", "Ġ P", "Ġw ith",
    "Ġ 1", "t er", "c h", "Ġa s", "Ġw e", "Ġ (", "n d", "i ll", "Ġ D", "i f", "Ġ 2", "a g",
    "er s", "k e", "Ġ \"", "Ġ H", "e m", "Ġc on", "Ġ W", "Ġ R", "he r", "Ġw as", "Ġ r", "o d",
    "Ġ F", "u l", "at e", "Ġa t", "r i", "p p", "o re", "ĠT he", "Ġs e", "u s", "Ġp ro", "Ġh a",
    "u m", "Ġa re", "Ġd e", "a in", "an d", "Ġo r", "ig h", "es t", "is t", "a b", "r om", "Ġ N",
    "t h", "Ġc om", "Ġ G", "u n", "o p", "0 0", "Ġ L", "Ġn ot", "es s", "Ġe x", "Ġ v", "re s",
    "Ġ E", "e w", "it y", "an t", "Ġb y", "e l", "o s", "or t", "o c", "q u", "Ġf rom", "Ġh ave",
    "Ġs u", "i ve", "ou ld", "Ġs h", "Ġth is", "n t", "r a", "p e", "igh t", "ar t", "m ent", "a u",
    "Ċ Ċ", "Ġ Ġ", "ĠĠ ĠĠ", ", Ġ", ". Ġ",
};

static int add_token(json_t *vocab, const char *s, int *next_id, int limit)
{
    if (json_object_get(vocab, s) || *next_id >= limit) return 0;
    json_object_set_new(vocab, s, json_integer((*next_id)++));
    return 1;
}

static int write_json(const char *dir, const char *name, json_t *j)
{
    size_t n = strlen(dir) + strlen(name) + 2;
    char *path = moe_malloc(n);
    snprintf(path, n, "%s/%s", dir, name);
    char *tmp = moe_tmp_path(path);
    moe_tmp_register(tmp);
    int rc = json_dump_file(j, tmp, JSON_INDENT(1) | JSON_PRESERVE_ORDER | JSON_ENSURE_ASCII);
    if (rc == 0) rc = moe_tmp_commit(tmp, path);
    else {
        moe_error_set(MOE_ERR_IO, "%s: cannot write: %s", path, strerror(errno));
        moe_tmp_discard(tmp);
    }
    free(tmp);
    free(path);
    return rc ? -1 : 0;
}

int moe_tokenizer_write_byte_level(const char *dir, int vocab_size)
{
    if (vocab_size < 257) {
        moe_error_set(MOE_ERR_DATA, "%s: byte-level tokenizer needs vocab_size >= 257 (got %d)", dir,
                      vocab_size);
        return -1;
    }
    struct stat st;
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode)) {
        moe_error_set(MOE_ERR_IO, "%s: not a directory", dir);
        return -1;
    }
    json_t *vocab = json_object(), *merges = json_array();
    char u[8];
    int next = 0;
    for (int b = 0; b < 256; b++) {
        u[tk_utf8_encode(tk_byte_char[b], u)] = 0;
        add_token(vocab, u, &next, vocab_size);
    }
    /* 256 = <|endoftext|>, in the model vocabulary too (as GPT-2's): tokenizers
     * wants the vocabulary's ids contiguous from 0 */
    add_token(vocab, "<|endoftext|>", &next, vocab_size);
    tk_buf tb = {0};
    size_t nlist = sizeof merge_list / sizeof *merge_list;
    for (size_t i = 0; next < vocab_size; i++) {
        char a[16], b[16];
        if (i < nlist) {
            const char *sp = strchr(merge_list[i], ' ');
            snprintf(a, sizeof a, "%.*s", (int)(sp - merge_list[i]), merge_list[i]);
            snprintf(b, sizeof b, "%s", sp + 1);
        } else if (i - nlist < 26 * 26) {   /* letter pairs */
            size_t k = i - nlist;
            snprintf(a, sizeof a, "%c", (int)('a' + k / 26));
            snprintf(b, sizeof b, "%c", (int)('a' + k % 26));
        } else if (i - nlist - 26 * 26 < 26) {   /* space + letter */
            snprintf(a, sizeof a, "\xC4\xA0");
            snprintf(b, sizeof b, "%c", (int)('a' + (i - nlist - 26 * 26)));
        } else {
            break;   /* the remaining ids stay unused */
        }
        if (!json_object_get(vocab, a) || !json_object_get(vocab, b)) continue;
        tb.n = 0;
        tk_buf_put(&tb, a, strlen(a));
        tk_buf_put(&tb, b, strlen(b));
        if (!add_token(vocab, tb.p, &next, vocab_size)) continue;
        json_array_append_new(merges, json_pack("[ss]", a, b));
    }
    free(tb.p);
    json_t *model = json_pack("{s:s, s:n, s:n, s:s, s:s, s:b, s:b, s:b, s:o, s:o}", "type", "BPE", "dropout",
                              "unk_token", "continuing_subword_prefix", "", "end_of_word_suffix", "",
                              "fuse_unk", 0, "byte_fallback", 0, "ignore_merges", 0, "vocab", vocab,
                              "merges", merges);
    json_t *added = json_pack("[{s:i, s:s, s:b, s:b, s:b, s:b, s:b}]", "id", 256, "content", "<|endoftext|>",
                              "single_word", 0, "lstrip", 0, "rstrip", 0, "normalized", 0, "special", 1);
    json_t *bl_pre = json_pack("{s:s, s:b, s:b, s:b}", "type", "ByteLevel", "add_prefix_space", 0,
                               "trim_offsets", 1, "use_regex", 1);
    json_t *bl_post = json_pack("{s:s, s:b, s:b, s:b}", "type", "ByteLevel", "add_prefix_space", 0,
                                "trim_offsets", 0, "use_regex", 1);
    json_t *bl_dec = json_pack("{s:s, s:b, s:b, s:b}", "type", "ByteLevel", "add_prefix_space", 0,
                               "trim_offsets", 1, "use_regex", 1);
    json_t *tok = json_pack("{s:s, s:n, s:n, s:o, s:n, s:o, s:o, s:o, s:o}", "version", "1.0", "truncation",
                            "padding", "added_tokens", added, "normalizer", "pre_tokenizer", bl_pre,
                            "post_processor", bl_post, "decoder", bl_dec, "model", model);
    json_t *cfg = json_pack("{s:b, s:b, s:s, s:s, s:s, s:i, s:s}", "add_bos_token", 0, "add_eos_token", 0,
                            "bos_token", "<|endoftext|>", "eos_token", "<|endoftext|>", "unk_token",
                            "<|endoftext|>", "model_max_length", 1000000, "tokenizer_class",
                            "PreTrainedTokenizerFast");
    int rc = (tok && cfg) ? 0 : -1;
    if (rc) moe_error_set(MOE_ERR_DATA, "%s: cannot build tokenizer JSON", dir);
    if (!rc) rc = write_json(dir, "tokenizer.json", tok);
    if (!rc) rc = write_json(dir, "tokenizer_config.json", cfg);
    json_decref(tok);
    json_decref(cfg);
    return rc;
}
