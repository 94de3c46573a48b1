/* tokenizer.c - load tokenizer.json (+ tokenizer_config.json), encode, decode. */
#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <jansson.h>
#include "common.h"
#include "tok_internal.h"

#define GPT2_REGEX "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"

/* ---- JSON helpers ------------------------------------------------------ */

static const char *jstr(const json_t *o, const char *key)
{
    json_t *v = json_object_get(o, key);
    return json_is_string(v) ? json_string_value(v) : NULL;
}

static int jbool(const json_t *o, const char *key, int dflt)
{
    json_t *v = json_object_get(o, key);
    return json_is_boolean(v) ? json_is_true(v) : dflt;
}

/* A token id given as a JSON number: -1 unless an integer in [0, 2^31). */
static int32_t json_id(const json_t *x)
{
    json_int_t v = json_integer_value(x);
    return json_is_integer(x) && v >= 0 && v <= INT32_MAX ? (int32_t)v : -1;
}

/* A count given as a JSON number, clamped to [0, INT_MAX] (not wrapped). */
static int json_count(const json_t *x)
{
    json_int_t v = json_integer_value(x);
    return v < 0 ? 0 : v > INT_MAX ? INT_MAX : (int)v;
}

static char *dupn(const char *s, size_t n)
{
    char *p = moe_malloc(n + 1);
    memcpy(p, s, n);
    p[n] = 0;
    return p;
}

/* pattern {"String": s} or {"Regex": r} */
static int parse_pattern(moe_tokenizer *t, const json_t *o, tk_regex *r, const char *what)
{
    json_t *p = json_object_get(o, "pattern");
    json_t *s = json_object_get(p, "String"), *re = json_object_get(p, "Regex");
    if (json_is_string(s))
        return tk_regex_compile(r, json_string_value(s), json_string_length(s), 1, &t->regex_room, what);
    if (json_is_string(re))
        return tk_regex_compile(r, json_string_value(re), json_string_length(re), 0, &t->regex_room, what);
    moe_error_set(MOE_ERR_DATA, "%s: pattern is neither String nor Regex", what);
    return -1;
}

static int prepend_scheme(const json_t *o)
{
    const char *s = jstr(o, "prepend_scheme");
    if (s) return !strcmp(s, "first") ? PREPEND_FIRST : !strcmp(s, "never") ? PREPEND_NEVER : PREPEND_ALWAYS;
    return jbool(o, "add_prefix_space", 1) ? PREPEND_ALWAYS : PREPEND_NEVER;
}

static int metaspace_repl(const json_t *o, char *repl, int *len)
{
    const char *r = jstr(o, "replacement");
    if (!r) r = "\xE2\x96\x81";
    size_t n = strlen(r);
    if (n == 0 || n > 4) return -1;
    memcpy(repl, r, n);
    repl[n] = 0;
    *len = (int)n;
    return 0;
}

/* ---- components -------------------------------------------------------- */

static int add_norm(moe_tokenizer *t, const json_t *o)
{
    if (!o || json_is_null(o)) return 0;
    const char *ty = jstr(o, "type");
    if (!ty) { moe_error_set(MOE_ERR_DATA, "%s: normalizer without type", t->path); return -1; }
    if (!strcmp(ty, "Sequence")) {
        json_t *a = json_object_get(o, "normalizers");
        size_t i;
        json_t *c;
        json_array_foreach(a, i, c) if (add_norm(t, c) < 0) return -1;
        return 0;
    }
    tk_norm nm;
    memset(&nm, 0, sizeof nm);
    if (!strcmp(ty, "NFC")) nm.type = NRM_NFC;
    else if (!strcmp(ty, "NFD")) nm.type = NRM_NFD;
    else if (!strcmp(ty, "NFKC")) nm.type = NRM_NFKC;
    else if (!strcmp(ty, "NFKD")) nm.type = NRM_NFKD;
    else if (!strcmp(ty, "Lowercase")) nm.type = NRM_LOWER;
    else if (!strcmp(ty, "Prepend")) {
        const char *p = jstr(o, "prepend");
        nm.type = NRM_PREPEND;
        nm.str = moe_strdup(p ? p : "");
        nm.slen = strlen(nm.str);
    } else if (!strcmp(ty, "Replace")) {
        const char *c = jstr(o, "content");
        nm.type = NRM_REPLACE;
        nm.str = moe_strdup(c ? c : "");
        nm.slen = strlen(nm.str);
        char what[600];
        snprintf(what, sizeof what, "%s: normalizer Replace", t->path);
        if (parse_pattern(t, o, &nm.pat, what) < 0) { free(nm.str); return -1; }
    } else if (!strcmp(ty, "Strip")) {
        nm.type = NRM_STRIP;
        nm.left = jbool(o, "strip_left", 1);
        nm.right = jbool(o, "strip_right", 1);
    } else {
        moe_error_set(MOE_ERR_DATA, "%s: unsupported normalizer type '%s'", t->path, ty);
        return -1;
    }
    t->norm = moe_realloc(t->norm, (size_t)(t->nnorm + 1) * sizeof *t->norm);
    t->norm[t->nnorm++] = nm;
    return 0;
}

static int add_pretok(moe_tokenizer *t, const json_t *o)
{
    if (!o || json_is_null(o)) return 0;
    const char *ty = jstr(o, "type");
    char what[600];
    if (!ty) { moe_error_set(MOE_ERR_DATA, "%s: pre_tokenizer without type", t->path); return -1; }
    if (t->byte_level) {
        moe_error_set(MOE_ERR_DATA, "%s: unsupported pre_tokenizer: %s after ByteLevel", t->path, ty);
        return -1;
    }
    if (!strcmp(ty, "Sequence")) {
        json_t *a = json_object_get(o, "pretokenizers");
        size_t i;
        json_t *c;
        json_array_foreach(a, i, c) if (add_pretok(t, c) < 0) return -1;
        return 0;
    }
    tk_pretok pt;
    memset(&pt, 0, sizeof pt);
    if (!strcmp(ty, "Split")) {
        pt.type = PT_SPLIT;
        const char *b = jstr(o, "behavior");
        if (!b) b = "Isolated";
        if (!strcmp(b, "Isolated")) pt.behavior = SPLIT_ISOLATED;
        else if (!strcmp(b, "Removed")) pt.behavior = SPLIT_REMOVED;
        else if (!strcmp(b, "MergedWithPrevious")) pt.behavior = SPLIT_MERGED_PREV;
        else if (!strcmp(b, "MergedWithNext")) pt.behavior = SPLIT_MERGED_NEXT;
        else if (!strcmp(b, "Contiguous")) pt.behavior = SPLIT_CONTIGUOUS;
        else {
            moe_error_set(MOE_ERR_DATA, "%s: unsupported Split behavior '%s'", t->path, b);
            return -1;
        }
        pt.invert = jbool(o, "invert", 0);
        snprintf(what, sizeof what, "%s: pre_tokenizer Split", t->path);
        if (parse_pattern(t, o, &pt.pat, what) < 0) return -1;
    } else if (!strcmp(ty, "ByteLevel")) {
        pt.type = PT_BYTELEVEL;
        pt.add_prefix_space = jbool(o, "add_prefix_space", 1);
        pt.use_regex = jbool(o, "use_regex", 1);
        snprintf(what, sizeof what, "%s: ByteLevel regex", t->path);
        if (pt.use_regex && tk_regex_compile(&pt.pat, GPT2_REGEX, strlen(GPT2_REGEX), 0, &t->regex_room, what) < 0)
            return -1;
        t->byte_level = 1;
    } else if (!strcmp(ty, "Digits")) {
        pt.type = PT_DIGITS;
        pt.individual = jbool(o, "individual_digits", 0);
    } else if (!strcmp(ty, "WhitespaceSplit")) {
        pt.type = PT_WSPLIT;
    } else if (!strcmp(ty, "Metaspace")) {
        pt.type = PT_METASPACE;
        if (metaspace_repl(o, pt.repl, &pt.repl_len) < 0) {
            moe_error_set(MOE_ERR_DATA, "%s: bad Metaspace replacement", t->path);
            return -1;
        }
        pt.prepend = prepend_scheme(o);
        pt.split = jbool(o, "split", 1);
    } else {
        moe_error_set(MOE_ERR_DATA, "%s: unsupported pre_tokenizer type '%s'", t->path, ty);
        return -1;
    }
    t->pre = moe_realloc(t->pre, (size_t)(t->npre + 1) * sizeof *t->pre);
    t->pre[t->npre++] = pt;
    return 0;
}

static int add_dec(moe_tokenizer *t, const json_t *o)
{
    if (!o || json_is_null(o)) return 0;
    const char *ty = jstr(o, "type");
    if (!ty) { moe_error_set(MOE_ERR_DATA, "%s: decoder without type", t->path); return -1; }
    t->has_decoder = 1;
    if (!strcmp(ty, "Sequence")) {
        json_t *a = json_object_get(o, "decoders");
        size_t i;
        json_t *c;
        json_array_foreach(a, i, c) if (add_dec(t, c) < 0) return -1;
        return 0;
    }
    tk_dec d;
    memset(&d, 0, sizeof d);
    if (!strcmp(ty, "ByteLevel")) d.type = DEC_BYTELEVEL;
    else if (!strcmp(ty, "ByteFallback")) d.type = DEC_BYTEFALLBACK;
    else if (!strcmp(ty, "Fuse")) d.type = DEC_FUSE;
    else if (!strcmp(ty, "Replace")) {
        json_t *p = json_object_get(o, "pattern");
        const char *s = jstr(p, "String"), *c = jstr(o, "content");
        if (!s || !c) {
            moe_error_set(MOE_ERR_DATA, "%s: unsupported decoder Replace (only String patterns)", t->path);
            return -1;
        }
        d.type = DEC_REPLACE;
        d.from = moe_strdup(s); d.flen = strlen(s);
        d.to = moe_strdup(c); d.tlen = strlen(c);
    } else if (!strcmp(ty, "Strip")) {
        const char *c = jstr(o, "content");
        d.type = DEC_STRIP;
        d.content = moe_strdup(c ? c : " ");
        d.clen = strlen(d.content);
        d.start = json_count(json_object_get(o, "start"));
        d.stop = json_count(json_object_get(o, "stop"));
    } else if (!strcmp(ty, "Metaspace")) {
        d.type = DEC_METASPACE;
        if (metaspace_repl(o, d.repl, &d.repl_len) < 0) {
            moe_error_set(MOE_ERR_DATA, "%s: bad Metaspace replacement", t->path);
            return -1;
        }
        d.prepend = prepend_scheme(o);
    } else {
        moe_error_set(MOE_ERR_DATA, "%s: unsupported decoder type '%s'", t->path, ty);
        return -1;
    }
    t->dec = moe_realloc(t->dec, (size_t)(t->ndec + 1) * sizeof *t->dec);
    t->dec[t->ndec++] = d;
    return 0;
}

static void ids_add(int32_t **v, size_t *n, int32_t id)
{
    *v = moe_realloc(*v, (*n + 1) * sizeof **v);
    (*v)[(*n)++] = id;
}

/* The ids of a TemplateProcessing special token. */
static int template_ids(moe_tokenizer *t, const json_t *specials, const char *name, int32_t **v, size_t *n)
{
    json_t *ids = json_object_get(json_object_get(specials, name), "ids");
    if (!json_is_array(ids)) {
        moe_error_set(MOE_ERR_DATA, "%s: post_processor: special token '%s' not defined", t->path, name);
        return -1;
    }
    size_t i;
    json_t *x;
    json_array_foreach(ids, i, x) ids_add(v, n, json_id(x));
    return 0;
}

static int add_post(moe_tokenizer *t, const json_t *o)
{
    if (!o || json_is_null(o)) return 0;
    const char *ty = jstr(o, "type");
    if (!ty) { moe_error_set(MOE_ERR_DATA, "%s: post_processor without type", t->path); return -1; }
    if (!strcmp(ty, "ByteLevel")) return 0;
    if (!strcmp(ty, "Sequence")) {
        json_t *a = json_object_get(o, "processors");
        size_t i;
        json_t *c;
        json_array_foreach(a, i, c) if (add_post(t, c) < 0) return -1;
        return 0;
    }
    if (!strcmp(ty, "TemplateProcessing")) {
        json_t *single = json_object_get(o, "single"), *specials = json_object_get(o, "special_tokens");
        int seen_a = 0;
        size_t i;
        json_t *it;
        json_array_foreach(single, i, it) {
            json_t *sp = json_object_get(it, "SpecialToken");
            if (sp) {
                const char *name = jstr(sp, "id");
                if (!name) { moe_error_set(MOE_ERR_DATA, "%s: post_processor: bad SpecialToken", t->path); return -1; }
                if (template_ids(t, specials, name, seen_a ? &t->suffix : &t->prefix,
                                 seen_a ? &t->nsuffix : &t->nprefix) < 0)
                    return -1;
            } else if (json_object_get(it, "Sequence")) {
                seen_a = 1;
            }
        }
        return 0;
    }
    if (!strcmp(ty, "RobertaProcessing") || !strcmp(ty, "BertProcessing")) {
        json_t *cls = json_object_get(o, "cls"), *sep = json_object_get(o, "sep");
        ids_add(&t->prefix, &t->nprefix, json_id(json_array_get(cls, 1)));
        ids_add(&t->suffix, &t->nsuffix, json_id(json_array_get(sep, 1)));
        return 0;
    }
    moe_error_set(MOE_ERR_DATA, "%s: unsupported post_processor type '%s'", t->path, ty);
    return -1;
}

/* ---- vocabulary, merges, added tokens ----------------------------------- */

static void set_id_str(moe_tokenizer *t, int32_t id, const char *s, size_t n)
{
    if ((size_t)id >= t->nids) {
        size_t nn = t->nids ? t->nids : 1024;
        while (nn <= (size_t)id) nn *= 2;
        t->id_str = moe_realloc(t->id_str, nn * sizeof *t->id_str);
        t->id_len = moe_realloc(t->id_len, nn * sizeof *t->id_len);
        t->is_special = moe_realloc(t->is_special, nn);
        memset(t->id_str + t->nids, 0, (nn - t->nids) * sizeof *t->id_str);
        memset(t->id_len + t->nids, 0, (nn - t->nids) * sizeof *t->id_len);
        memset(t->is_special + t->nids, 0, nn - t->nids);
        t->nids = nn;
    }
    free(t->id_str[id]);
    t->id_str[id] = dupn(s, n);
    t->id_len[id] = (uint32_t)n;
}

static void vocab_add(moe_tokenizer *t, const char *key, size_t kl, int32_t id)
{
    tk_strmap_put(&t->vocab, key, kl, id);
}

/* The id -> token table of the model vocabulary, once it is read.  A
 * vocabulary of V tokens has the ids 0..V-1: a larger id is refused, as it
 * would grow the table without bound (an id of 2^27 once cost 3.3 GB). */
static int vocab_index(moe_tokenizer *t)
{
    size_t nv = t->vocab.n;
    for (size_t i = 0; i < nv; i++) {
        const struct tk_ent *en = &t->vocab.ent[i];
        if ((size_t)en->val >= nv) {
            moe_error_set(MOE_ERR_DATA, "%s: model.vocab: token '%.*s' has id %d, beyond the %zu tokens of the vocabulary",
                          t->path, (int)(en->len > 60 ? 60 : en->len), t->vocab.pool.p + en->off, (int)en->val, nv);
            return -1;
        }
    }
    for (size_t i = 0; i < nv; i++) {
        const struct tk_ent *en = &t->vocab.ent[i];
        set_id_str(t, en->val, t->vocab.pool.p + en->off, en->len);
    }
    return 0;
}

/* One merge: "a b" (is_string) or the pair (a, b).  Rank = position among the
 * merges kept (a "#version" line is skipped). */
static int merge_add(moe_tokenizer *t, size_t idx, const char *a, size_t al, const char *b, size_t bl,
                     int is_string)
{
    if (is_string) {
        if (al >= 8 && !memcmp(a, "#version", 8)) return 0;
        const char *sp = memchr(a, ' ', al);
        if (!sp || memchr(sp + 1, ' ', al - (size_t)(sp + 1 - a))) {
            moe_error_set(MOE_ERR_DATA, "%s: merge %zu '%.*s' is not two tokens", t->path, idx, (int)al, a);
            return -1;
        }
        b = sp + 1;
        bl = al - (size_t)(b - a);
        al = (size_t)(sp - a);
    }
    int32_t ia = tk_strmap_get(&t->vocab, a, al), ib = tk_strmap_get(&t->vocab, b, bl);
    tk_buf *nb = &t->mbuf;
    nb->n = 0;
    tk_buf_put(nb, a, al);
    size_t skip = (t->cp_len && bl >= t->cp_len && !memcmp(b, t->cont_prefix, t->cp_len)) ? t->cp_len : 0;
    tk_buf_put(nb, b + skip, bl - skip);
    int32_t iab = tk_strmap_get(&t->vocab, nb->p, nb->n);
    if (ia < 0 || ib < 0 || iab < 0) {
        moe_error_set(MOE_ERR_DATA, "%s: merge %zu '%.*s %.*s': token not in vocab", t->path, idx, (int)al, a,
                      (int)bl, b);
        return -1;
    }
    tk_merge_put(&t->merges, ia, ib, t->merge_rank++, iab);
    return 0;
}

/* The model; vocab and merges come from the raw text when fast (spans from
 * tk_json_find_model), else from the jansson tree. */
static int load_model(moe_tokenizer *t, const json_t *m, const char *text, const size_t *span)
{
    const char *ty = jstr(m, "type");
    json_t *vocab = json_object_get(m, "vocab"), *merges = json_object_get(m, "merges");
    int fast = span && span[1] > span[0] && span[3] > span[2];
    if ((ty && strcmp(ty, "BPE")) || !json_is_object(vocab) || !json_is_array(merges)) {
        moe_error_set(MOE_ERR_DATA, "%s: unsupported model type '%s' (only BPE)", t->path,
                      ty ? ty : "(none)");
        return -1;
    }
    json_t *dr = json_object_get(m, "dropout");
    if (json_is_number(dr) && json_number_value(dr) > 0) {
        moe_error_set(MOE_ERR_DATA, "%s: BPE dropout is not supported", t->path);
        return -1;
    }
    if (fast) {
        if (tk_json_vocab(t, text, span[0], span[1], vocab_add) < 0) return -1;
    } else {
        const char *key;
        json_t *v;
        json_object_foreach(vocab, key, v) {
            json_int_t id = json_integer_value(v);
            if (!json_is_integer(v) || id < 0 || id > INT32_MAX - 1) {
                moe_error_set(MOE_ERR_DATA, "%s: vocab entry '%s' has a bad id", t->path, key);
                return -1;
            }
            vocab_add(t, key, strlen(key), (int32_t)id);
        }
    }
    if (vocab_index(t) < 0) return -1;
    const char *cp = jstr(m, "continuing_subword_prefix"), *eow = jstr(m, "end_of_word_suffix");
    t->cont_prefix = moe_strdup(cp ? cp : "");
    t->cp_len = strlen(t->cont_prefix);
    t->eow_suffix = moe_strdup(eow ? eow : "");
    t->eow_len = strlen(t->eow_suffix);
    t->fuse_unk = jbool(m, "fuse_unk", 0);
    t->byte_fallback = jbool(m, "byte_fallback", 0);
    t->ignore_merges = jbool(m, "ignore_merges", 0);
    const char *unk = jstr(m, "unk_token");
    t->unk_id = unk ? tk_strmap_get(&t->vocab, unk, strlen(unk)) : -1;
    if (unk && t->unk_id < 0) {
        moe_error_set(MOE_ERR_DATA, "%s: unk_token '%s' not in vocab", t->path, unk);
        return -1;
    }
    if (fast) return tk_json_merges(t, text, span[2], span[3], merge_add);
    size_t i;
    json_t *mg;
    json_array_foreach(merges, i, mg) {
        int rc;
        if (json_is_string(mg)) {
            rc = merge_add(t, i, json_string_value(mg), json_string_length(mg), NULL, 0, 1);
        } else if (json_is_array(mg) && json_array_size(mg) == 2 &&
                   json_is_string(json_array_get(mg, 0)) && json_is_string(json_array_get(mg, 1))) {
            json_t *a = json_array_get(mg, 0), *b = json_array_get(mg, 1);
            rc = merge_add(t, i, json_string_value(a), json_string_length(a), json_string_value(b),
                           json_string_length(b), 0);
        } else {
            moe_error_set(MOE_ERR_DATA, "%s: merge %zu is neither \"a b\" nor [a, b]", t->path, i);
            rc = -1;
        }
        if (rc < 0) return -1;
    }
    return 0;
}

static int added_cmp(const void *x, const void *y)
{
    const tk_added *a = x, *b = y;
    unsigned ca = (unsigned char)a->content[0], cb = (unsigned char)b->content[0];
    if (ca != cb) return ca < cb ? -1 : 1;
    if (a->len != b->len) return a->len > b->len ? -1 : 1;
    return a->id < b->id ? -1 : a->id > b->id;
}

static void addset_finish(tk_addset *s)
{
    if (s->n) qsort(s->tok, s->n, sizeof *s->tok, added_cmp);
    size_t k = 0;
    for (int c = 0; c <= 256; c++) {
        while (k < s->n && (unsigned char)s->tok[k].content[0] < c) k++;
        s->first[c] = (uint32_t)k;
    }
}

/* The id tokenizers gives an added token, whatever id the file declares: its
 * id in the model vocabulary if it is there, else the next id after the
 * vocabulary and the added tokens before it (tokenizers' AddedVocabulary;
 * `largest` is the largest id given so far, -1 before the first). */
static int32_t added_id_hf(const moe_tokenizer *t, const char *c, size_t cl, int32_t largest)
{
    int32_t in_vocab = tk_strmap_get(&t->vocab, c, cl);
    if (in_vocab >= 0) return in_vocab;
    int32_t nv = (int32_t)t->vocab.n;
    return largest < 0 || (largest < nv && nv > 0) ? nv : largest + 1;
}

/* The added token's declared id must be the one tokenizers gives it (see
 * added_id_hf): ids then stay below the vocabulary size plus the number of
 * added tokens, and the file means what tokenizers reads in it.  A token
 * listed again (same content) is skipped, as tokenizers does, if it repeats
 * its id.  *id: the id, or -1 for a token to skip. */
static int added_id(moe_tokenizer *t, tk_strmap *seen, size_t i, const char *c, json_int_t declared,
                    int32_t *largest, int32_t *id)
{
    size_t cl = strlen(c);
    int32_t before = tk_strmap_get(seen, c, cl);
    int32_t want = before >= 0 ? before : added_id_hf(t, c, cl, *largest);
    if (declared != want) {
        moe_error_set(MOE_ERR_DATA, "%s: added_tokens[%zu] '%.60s' has id %lld, but %s %d", t->path, i, c,
                      (long long)declared,
                      before >= 0 ? "it was listed before with id"
                      : tk_strmap_get(&t->vocab, c, cl) >= 0 ? "the model vocabulary gives it id"
                      : "the next free id (after the vocabulary and the added tokens before it) is",
                      (int)want);
        return -1;
    }
    *id = before >= 0 ? -1 : want;
    if (before < 0) {
        tk_strmap_put(seen, c, cl, want);
        if (want > *largest) *largest = want;
    }
    return 0;
}

static int load_added(moe_tokenizer *t, const json_t *arr)
{
    size_t i;
    json_t *o;
    tk_strmap seen = {0};
    int32_t largest = -1;
    json_array_foreach(arr, i, o) {
        const char *c = jstr(o, "content");
        json_t *idv = json_object_get(o, "id");
        if (!c || !json_is_integer(idv) || json_integer_value(idv) < 0) {
            moe_error_set(MOE_ERR_DATA, "%s: added_tokens[%zu] lacks content or id", t->path, i);
            tk_strmap_free(&seen);
            return -1;
        }
        size_t cl = strlen(c);
        if (!cl) continue;   /* tokenizers gives an empty token no id */
        int32_t id;
        if (added_id(t, &seen, i, c, json_integer_value(idv), &largest, &id) < 0) {
            tk_strmap_free(&seen);
            return -1;
        }
        if (id < 0) continue;
        set_id_str(t, id, c, cl);
        tk_added a = {0};
        a.id = id;
        a.special = jbool(o, "special", 0);
        a.normalized = jbool(o, "normalized", !a.special);
        a.lstrip = jbool(o, "lstrip", 0);
        a.rstrip = jbool(o, "rstrip", 0);
        a.single_word = jbool(o, "single_word", 0);
        t->is_special[id] = (unsigned char)a.special;
        tk_addset *set = a.normalized ? &t->added_norm : &t->added_raw;
        a.orig = dupn(c, cl);
        a.olen = cl;
        if (a.normalized && t->nnorm) {
            /* tokenizers matches (and decodes) a normalized added token by its
             * normalized content */
            tk_buf nb = {0};
            if (tk_normalize(t, c, cl, &nb) < 0) {
                free(a.orig);
                tk_strmap_free(&seen);
                return -1;
            }
            a.content = nb.p ? nb.p : moe_strdup("");
            a.len = nb.n;
            if (!a.len) { free(a.content); free(a.orig); continue; }
            set_id_str(t, id, a.content, a.len);
        } else {
            a.content = dupn(c, cl);
            a.len = cl;
        }
        set->tok = moe_realloc(set->tok, (set->n + 1) * sizeof *set->tok);
        set->tok[set->n++] = a;
    }
    tk_strmap_free(&seen);
    addset_finish(&t->added_raw);
    addset_finish(&t->added_norm);
    return 0;
}

/* The ids the post-processor adds must be tokens of the vocabulary (the file
 * gives them as numbers, apart from the tokens). */
static int check_post_ids(const moe_tokenizer *t)
{
    const int32_t *lists[2] = {t->prefix, t->suffix};
    size_t counts[2] = {t->nprefix, t->nsuffix};
    for (int k = 0; k < 2; k++)
        for (size_t i = 0; i < counts[k]; i++) {
            int32_t id = lists[k][i];
            if (id < 0 || (size_t)id >= t->nids || !t->id_str[id]) {
                moe_error_set(MOE_ERR_DATA, "%s: post_processor: special token id %d is not in the vocabulary",
                              t->path, (int)id);
                return -1;
            }
        }
    return 0;
}

/* tokenizer_config.json: transformers 4.x Llama/CodeLlama/Gemma (add_bos_token
 * defaults to true) and GPT-NeoX (OLMoE; false) fast tokenizers rebuild the
 * post-processor as "[BOS] $A [EOS]" from add_bos_token/add_eos_token. */
static int load_config(moe_tokenizer *t, const char *cfg_path)
{
    struct stat st;
    if (stat(cfg_path, &st) != 0) return 0;
    json_error_t err;
    json_t *c = json_load_file(cfg_path, 0, &err);
    if (!c) {
        moe_error_set(MOE_ERR_DATA, "%s:%d: %s", cfg_path, err.line, err.text);
        return -1;
    }
    const char *cls = jstr(c, "tokenizer_class");
    int rc = 0;
    int neox = cls && strstr(cls, "GPTNeoXTokenizer");
    if (cls && (strstr(cls, "LlamaTokenizer") || strstr(cls, "GemmaTokenizer") || neox)) {
        int bos = jbool(c, "add_bos_token", !neox), eos = jbool(c, "add_eos_token", 0);
        t->nprefix = t->nsuffix = 0;
        const char *which[2] = {"bos_token", "eos_token"};
        int want[2] = {bos, eos};
        for (int k = 0; k < 2 && rc == 0; k++) {
            if (!want[k]) continue;
            json_t *v = json_object_get(c, which[k]);
            const char *s = json_is_string(v) ? json_string_value(v) : jstr(v, "content");
            int32_t id = s ? moe_tokenizer_token_id(t, s) : -1;
            if (id < 0) {
                moe_error_set(MOE_ERR_DATA, "%s: add_%s is set but %s is %s", cfg_path, which[k],
                              which[k], s ? "not in the vocabulary" : "missing");
                rc = -1;
                break;
            }
            if (k == 0) ids_add(&t->prefix, &t->nprefix, id);
            else ids_add(&t->suffix, &t->nsuffix, id);
        }
    }
    json_decref(c);
    return rc;
}


moe_tokenizer *moe_tokenizer_open(const char *path)
{
    struct stat st;
    char *json_path, *cfg_path;
    if (stat(path, &st) != 0) {
        moe_error_set(MOE_ERR_IO, "%s: %s", path, strerror(errno));
        return NULL;
    }
    size_t pl = strlen(path);
    if (S_ISDIR(st.st_mode)) {
        json_path = moe_malloc(pl + 32);
        cfg_path = moe_malloc(pl + 32);
        sprintf(json_path, "%s/tokenizer.json", path);
        sprintf(cfg_path, "%s/tokenizer_config.json", path);
    } else {
        json_path = moe_strdup(path);
        cfg_path = moe_malloc(pl + 32);
        const char *sl = strrchr(path, '/');
        if (sl) sprintf(cfg_path, "%.*s/tokenizer_config.json", (int)(sl - path), path);
        else strcpy(cfg_path, "tokenizer_config.json");
    }
    moe_tokenizer *t = moe_calloc(1, sizeof *t);
    t->path = json_path;
    t->regex_room = TK_REGEX_ROOM;
    size_t tlen = 0, span[4];
    char *text = moe_read_file(json_path, &tlen), *light = NULL;
    if (!text) goto fail;
    int fast = tk_json_find_model(text, tlen, span) == 0 && span[1] > span[0] && span[3] > span[2];
    if (fast) {   /* the same text with vocab and merges blanked (line numbers kept) */
        light = moe_malloc(tlen + 1);
        memcpy(light, text, tlen);
        for (int k = 0; k < 4; k += 2) {
            for (size_t i = span[k] + 1; i + 1 < span[k + 1]; i++)
                if (light[i] != '\n') light[i] = ' ';
        }
    }
    json_error_t err;
    json_t *j = json_loadb(fast ? light : text, tlen, 0, &err);
    free(light);
    if (!j) {
        moe_error_set(MOE_ERR_DATA, "%s:%d: %s", json_path, err.line, err.text);
        free(text);
        goto fail;
    }
    int bad = add_norm(t, json_object_get(j, "normalizer")) < 0 ||
              add_pretok(t, json_object_get(j, "pre_tokenizer")) < 0 ||
              load_model(t, json_object_get(j, "model"), text, fast ? span : NULL) < 0;
    free(text);
    if (bad ||
        load_added(t, json_object_get(j, "added_tokens")) < 0 ||
        add_post(t, json_object_get(j, "post_processor")) < 0 || check_post_ids(t) < 0 ||
        add_dec(t, json_object_get(j, "decoder")) < 0 ||
        load_config(t, cfg_path) < 0) {
        json_decref(j);
        goto fail;
    }
    json_decref(j);
    free(cfg_path);
    int bfast = t->byte_level && !t->cp_len && !t->eow_len;
    char u[4];
    for (int b = 0; b < 256; b++) {
        t->byte_id[b] = tk_strmap_get(&t->vocab, u, (size_t)tk_utf8_encode(tk_byte_char[b], u));
        if (t->byte_id[b] < 0) bfast = 0;
    }
    t->byte_fast = bfast;
    return t;
fail:
    free(cfg_path);
    moe_tokenizer_close(t);
    return NULL;
}

moe_tokenizer *moe_tokenizer_clone(const moe_tokenizer *t)
{
    moe_tokenizer *c = moe_malloc(sizeof *c);
    *c = *t;
    c->is_clone = 1;
    memset(&c->cache, 0, sizeof c->cache);
    memset(&c->cache_ids, 0, sizeof c->cache_ids);
    memset(&c->work, 0, sizeof c->work);
    memset(&c->nbuf, 0, sizeof c->nbuf);
    memset(&c->mbuf, 0, sizeof c->mbuf);
    memset(&c->out, 0, sizeof c->out);
    c->sym = NULL; c->sym_cap = 0;
    c->heap = NULL; c->heap_cap = 0;
    memset(&c->pa, 0, sizeof c->pa);
    memset(&c->pb, 0, sizeof c->pb);
    memset(&c->mt, 0, sizeof c->mt);
    /* a compiled regex may be shared by threads, its match region may not */
    c->norm = moe_malloc((size_t)(t->nnorm ? t->nnorm : 1) * sizeof *c->norm);
    if (t->nnorm) memcpy(c->norm, t->norm, (size_t)t->nnorm * sizeof *c->norm);
    for (int i = 0; i < c->nnorm; i++)
        if (c->norm[i].pat.re) c->norm[i].pat.region = onig_region_new();
    c->pre = moe_malloc((size_t)(t->npre ? t->npre : 1) * sizeof *c->pre);
    if (t->npre) memcpy(c->pre, t->pre, (size_t)t->npre * sizeof *c->pre);
    for (int i = 0; i < c->npre; i++)
        if (c->pre[i].pat.re) c->pre[i].pat.region = onig_region_new();
    return c;
}

static void free_state(moe_tokenizer *t)
{
    tk_strmap_free(&t->cache);
    free(t->cache_ids.p);
    free(t->work.p); free(t->nbuf.p); free(t->mbuf.p); free(t->out.p);
    free(t->sym); free(t->heap);
    free(t->pa.p); free(t->pb.p); free(t->mt.p);
}

void moe_tokenizer_close(moe_tokenizer *t)
{
    if (!t) return;
    if (t->is_clone) {
        for (int i = 0; i < t->nnorm; i++) if (t->norm[i].pat.region) onig_region_free(t->norm[i].pat.region, 1);
        for (int i = 0; i < t->npre; i++) if (t->pre[i].pat.region) onig_region_free(t->pre[i].pat.region, 1);
        free(t->norm); free(t->pre);
        free_state(t);
        free(t);
        return;
    }
    for (int i = 0; i < t->nnorm; i++) { free(t->norm[i].str); tk_regex_free(&t->norm[i].pat); }
    for (int i = 0; i < t->npre; i++) tk_regex_free(&t->pre[i].pat);
    for (int i = 0; i < t->ndec; i++) {
        free(t->dec[i].from); free(t->dec[i].to); free(t->dec[i].content);
    }
    free(t->norm); free(t->pre); free(t->dec);
    tk_addset *sets[2] = {&t->added_raw, &t->added_norm};
    for (int k = 0; k < 2; k++) {
        for (size_t i = 0; i < sets[k]->n; i++) { free(sets[k]->tok[i].content); free(sets[k]->tok[i].orig); }
        free(sets[k]->tok);
    }
    for (size_t i = 0; i < t->nids; i++) free(t->id_str[i]);
    free(t->id_str); free(t->id_len); free(t->is_special);
    tk_strmap_free(&t->vocab);
    free(t->merges.t);
    free_state(t);
    free(t->prefix); free(t->suffix);
    free(t->cont_prefix); free(t->eow_suffix);
    free(t->path);
    free(t);
}

/* ---- encode ---------------------------------------------------------------- */

static int32_t prev_char(const char *s, size_t i)   /* code point ending at s[i-1], -1 if none */
{
    if (!i) return -1;
    size_t k = i - 1;
    while (k > 0 && ((unsigned char)s[k] & 0xC0) == 0x80 && i - k < 4) k--;
    int32_t cp;
    return tk_utf8_decode((const unsigned char *)s + k, i - k, &cp) == (int)(i - k) ? cp : -1;
}

static int32_t next_char(const char *s, size_t n, size_t i, int *len)
{
    int32_t cp;
    *len = i < n ? tk_utf8_decode((const unsigned char *)s + i, n - i, &cp) : -1;
    return *len > 0 ? cp : -1;
}

static int is_word_char(int32_t cp) { return cp >= 0 && tk_is_word_char(cp); }

/* Leftmost-longest added token in s[from..n): 1 and the match (stripped
 * bounds in *mb, *me), or 0. */
static int added_find(const tk_addset *a, const char *s, size_t n, size_t from, size_t *mb, size_t *me,
                      int32_t *id)
{
    if (!a->n) return 0;
    for (size_t i = from; i < n; i++) {
        unsigned c = (unsigned char)s[i];
        for (uint32_t k = a->first[c]; k < a->first[c + 1]; k++) {
            const tk_added *tk = &a->tok[k];
            if (tk->len > n - i || memcmp(s + i, tk->content, tk->len)) continue;
            size_t b = i, e = i + tk->len;
            if (tk->single_word) {
                int l;
                if (is_word_char(prev_char(s, b)) || is_word_char(next_char(s, n, e, &l))) continue;
            }
            if (tk->lstrip) {
                int32_t cp;
                while (b > from && (cp = prev_char(s, b)) >= 0 && tk_is_whitespace(cp)) {
                    char u[4];
                    b -= (size_t)tk_utf8_encode(cp, u);
                }
            }
            if (tk->rstrip) {
                int l;
                int32_t cp;
                while ((cp = next_char(s, n, e, &l)) >= 0 && tk_is_whitespace(cp)) e += (size_t)l;
            }
            *mb = b; *me = e; *id = tk->id;
            return 1;
        }
    }
    return 0;
}

/* A valid UTF-8 piece without raw added tokens: normalize, cut normalized
 * added tokens, pre-tokenize, BPE. */
static int encode_valid(moe_tokenizer *t, const char *s, size_t n, int first)
{
    const char *ns = s;
    size_t nn = n;
    if (t->nnorm) {
        if (tk_normalize(t, s, n, &t->nbuf) < 0) return -1;
        ns = t->nbuf.p; nn = t->nbuf.n;
    }
    size_t pos = 0;
    for (;;) {
        size_t mb = nn, me = nn;
        int32_t id = -1;
        int found = added_find(&t->added_norm, ns, nn, pos, &mb, &me, &id);
        if (mb > pos) {
            t->work.n = 0;
            tk_buf_put(&t->work, ns + pos, mb - pos);
            tk_pretokenize(t, 0, mb - pos, first && pos == 0);
        }
        if (!found) break;
        tk_ids_push(&t->out, id);
        pos = me;
    }
    return 0;
}

static int encode_gap(moe_tokenizer *t, const char *s, size_t n, size_t base)
{
    size_t i = 0;
    while (i < n) {
        size_t v = moe_utf8_check(s + i, n - i);
        if (v && encode_valid(t, s + i, v, base + i == 0) < 0) return -1;
        i += v;
        if (i < n) {
            if (!t->byte_level) {
                moe_error_set(MOE_ERR_DATA, "invalid UTF-8 at byte %zu", base + i);
                return -1;
            }
            tk_bpe_word(t, s + i, 1);
            i++;
        }
    }
    return 0;
}

int moe_tokenizer_encode_trunc(moe_tokenizer *t, const char *text, size_t len, int add_special,
                               size_t max_length, int32_t **ids, size_t *n)
{
    *ids = NULL; *n = 0;
    t->out.n = 0;
    size_t pos = 0;
    for (;;) {
        size_t mb = len, me = len;
        int32_t id = -1;
        int found = added_find(&t->added_raw, text, len, pos, &mb, &me, &id);
        if (mb > pos && encode_gap(t, text + pos, mb - pos, pos) < 0) return -1;
        if (!found) break;
        tk_ids_push(&t->out, id);
        pos = me;
    }
    size_t body = t->out.n, nspec = add_special ? t->nprefix + t->nsuffix : 0;
    if (max_length) {
        if (max_length < nspec) {
            moe_error_set(MOE_ERR_DATA, "max length %zu is below the %zu special tokens added", max_length,
                          nspec);
            return -1;
        }
        if (body > max_length - nspec) body = max_length - nspec;
    }
    size_t total = body + nspec;
    int32_t *r = moe_malloc((total ? total : 1) * sizeof *r);
    size_t k = 0;
    if (add_special) for (size_t i = 0; i < t->nprefix; i++) r[k++] = t->prefix[i];
    if (body) memcpy(r + k, t->out.p, body * sizeof *r);
    k += body;
    if (add_special) for (size_t i = 0; i < t->nsuffix; i++) r[k++] = t->suffix[i];
    *ids = r;
    *n = total;
    if (t->out.cap > (1u << 20)) { free(t->out.p); t->out.p = NULL; t->out.n = t->out.cap = 0; }
    return 0;
}

int moe_tokenizer_encode(moe_tokenizer *t, const char *text, size_t len, int add_special, int32_t **ids,
                         size_t *n)
{
    return moe_tokenizer_encode_trunc(t, text, len, add_special, 0, ids, n);
}

/* ---- decode and queries -------------------------------------------------- */

int moe_tokenizer_decode(const moe_tokenizer *t, const int32_t *ids, size_t n, int flags, char **text,
                         size_t *len)
{
    char **tok = moe_malloc((n ? n : 1) * sizeof *tok);
    size_t *tl = moe_malloc((n ? n : 1) * sizeof *tl), k = 0;
    *text = NULL;
    for (size_t i = 0; i < n; i++) {
        int32_t id = ids[i];
        if (id < 0 || (size_t)id >= t->nids || !t->id_str[id]) {
            moe_error_set(MOE_ERR_DATA, "token id %d is not in the vocabulary", (int)id);
            free(tok); free(tl);
            return -1;
        }
        if ((flags & MOE_TOK_SKIP_SPECIAL) && t->is_special[id]) continue;
        tok[k] = t->id_str[id];
        tl[k++] = t->id_len[id];
    }
    tk_buf out = {0};
    tk_decode_chain(t, tok, tl, k, flags & MOE_TOK_RAW, &out);
    free(tok); free(tl);
    *text = out.p;
    if (len) *len = out.n;
    return 0;
}

size_t moe_tokenizer_vocab_size(const moe_tokenizer *t)
{
    size_t n = t->nids;
    while (n && !t->id_str[n - 1]) n--;
    return n;
}

int32_t moe_tokenizer_token_id(const moe_tokenizer *t, const char *token)
{
    size_t n = strlen(token);
    const tk_addset *sets[2] = {&t->added_raw, &t->added_norm};
    for (int k = 0; k < 2; k++)
        for (size_t i = 0; i < sets[k]->n; i++) {
            const tk_added *a = &sets[k]->tok[i];
            if (a->olen == n && !memcmp(a->orig, token, n)) return a->id;
        }
    return tk_strmap_get(&t->vocab, token, n);
}

size_t moe_tokenizer_num_special(const moe_tokenizer *t, int add_special)
{
    return add_special ? t->nprefix + t->nsuffix : 0;
}
