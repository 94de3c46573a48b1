/* tune_data.c - moe-tune's training data (see tune_data.h). */
#include "tune_data.h"
#include "common.h"
#include "jsonl.h"
#include "records.h"
#include "stream.h"

#include <errno.h>
#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define IGNORED (-100)

long moe_tune_shift_labels(int32_t *target, const int32_t *label, int len) {
    long n = 0;
    for (int t = 0; t < len; t++) {
        target[t] = t + 1 < len ? label[t + 1] : IGNORED;
        n += target[t] >= 0;
    }
    return n;
}

/* ---- one sample, piece by piece ------------------------------------------------ */

typedef struct {
    int32_t *ids, *labels;
    int len, cap;
} sample;

static void sample_add(sample *s, const int32_t *ids, size_t n, int trained) {
    if (s->len + (long)n > s->cap) {
        s->cap = (int)(s->len + (long)n) * 2 + 16;
        s->ids = moe_realloc(s->ids, (size_t)s->cap * sizeof *s->ids);
        s->labels = moe_realloc(s->labels, (size_t)s->cap * sizeof *s->labels);
    }
    for (size_t i = 0; i < n; i++) {
        s->ids[s->len] = ids[i];
        s->labels[s->len++] = trained ? ids[i] : IGNORED;
    }
}

/* Tokenize text and add it (special tokens only for the sample's first piece). */
static int sample_add_text(sample *s, const moe_tune_data_opts *o, const char *text, size_t len, int trained) {
    int32_t *ids;
    size_t n;
    if (moe_tokenizer_encode(o->tok, text, len, s->len == 0, &ids, &n) < 0) return -1;
    sample_add(s, ids, n, trained);
    free(ids);
    return 0;
}

static void sample_add_eos(sample *s, const moe_tune_data_opts *o) {
    if (o->eos_id >= 0) sample_add(s, &o->eos_id, 1, 1);
}

/* The sample as a training sequence: cut to max_length, ids checked, targets shifted. */
static int sample_finish(sample *s, const moe_tune_data_opts *o, moe_tune_data *d, const char *where) {
    int len = o->max_length > 0 && s->len > o->max_length ? o->max_length : s->len;
    for (int t = 0; t < len; t++)
        if (s->ids[t] < 0 || s->ids[t] >= o->vocab) {
            moe_error_set(MOE_ERR_DATA, "%s: token id %d is outside the model's vocabulary (%d)", where,
                          (int)s->ids[t], o->vocab);
            return -1;
        }
    if (len == 0) {
        moe_error_set(MOE_ERR_DATA, "%s: the sample has no tokens", where);
        return -1;
    }
    d->seqs = moe_realloc(d->seqs, (size_t)(d->n + 1) * sizeof *d->seqs);
    moe_tune_seq *q = &d->seqs[d->n++];
    q->len = len;
    q->ids = moe_malloc((size_t)len * sizeof *q->ids);
    q->targets = moe_malloc((size_t)len * sizeof *q->targets);
    memcpy(q->ids, s->ids, (size_t)len * sizeof *q->ids);
    q->ntargets = moe_tune_shift_labels(q->targets, s->labels, len);
    d->ntargets += q->ntargets;
    s->len = 0;
    return 0;
}

/* ---- the JSON shapes of a sample ------------------------------------------------ */

static int need_string(json_t *v, const char *what, const char *where) {
    if (json_is_string(v)) return 0;
    moe_error_set(MOE_ERR_DATA, "%s: %s %s", where, what, v ? "is not a string" : "is missing");
    return -1;
}

static int add_turn(sample *s, const moe_tune_data_opts *o, json_t *turn, size_t i, const char *where) {
    char what[64];
    json_t *role = json_object_get(turn, "role"), *content = json_object_get(turn, "content");
    snprintf(what, sizeof what, "turns[%zu].role", i);
    if (need_string(role, what, where) < 0) return -1;
    snprintf(what, sizeof what, "turns[%zu].content", i);
    if (need_string(content, what, where) < 0) return -1;
    int assistant = strcmp(json_string_value(role), "assistant") == 0;
    size_t rn = json_string_length(role), cn = json_string_length(content);
    char *head = moe_malloc(rn + 3), *body = moe_malloc(cn + 2);
    memcpy(head, json_string_value(role), rn);
    memcpy(head + rn, ": ", 3);
    memcpy(body, json_string_value(content), cn);
    memcpy(body + cn, "\n", 2);
    int rc = sample_add_text(s, o, head, rn + 2, 0);
    if (rc == 0) rc = sample_add_text(s, o, body, cn + 1, assistant);
    free(head);
    free(body);
    return rc;
}

static int sample_from_turns(sample *s, const moe_tune_data_opts *o, json_t *turns, const char *where) {
    if (!json_is_array(turns) || json_array_size(turns) == 0) {
        moe_error_set(MOE_ERR_DATA, "%s: 'turns' must be a non-empty array of {\"role\", \"content\"}", where);
        return -1;
    }
    size_t last_assistant = (size_t)-1;
    for (size_t i = 0; i < json_array_size(turns); i++) {
        json_t *turn = json_array_get(turns, i);
        if (!json_is_object(turn)) {
            moe_error_set(MOE_ERR_DATA, "%s: turns[%zu] is not an object", where, i);
            return -1;
        }
        if (add_turn(s, o, turn, i, where) < 0) return -1;
        if (strcmp(json_string_value(json_object_get(turn, "role")), "assistant") == 0) last_assistant = i;
    }
    if (last_assistant == (size_t)-1) {
        moe_error_set(MOE_ERR_DATA, "%s: no \"assistant\" turn (nothing to train on)", where);
        return -1;
    }
    sample_add_eos(s, o); /* after the last turn, which is best the assistant's */
    return 0;
}

/* {"ids": [...]}: tokenized elsewhere, every token trained on. */
static int sample_from_ids(sample *s, json_t *ids, const char *where) {
    if (!json_is_array(ids)) {
        moe_error_set(MOE_ERR_DATA, "%s: 'ids' is not a list of token ids", where);
        return -1;
    }
    for (size_t i = 0; i < json_array_size(ids); i++) {
        json_t *v = json_array_get(ids, i);
        if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > INT32_MAX) {
            moe_error_set(MOE_ERR_DATA, "%s: ids[%zu] is not a token id", where, i);
            return -1;
        }
        int32_t id = (int32_t)json_integer_value(v);
        sample_add(s, &id, 1, 1);
    }
    return 0;
}

/* One JSON object: {"text"}, {"prompt","response"}, {"turns"} or {"ids"}. */
static int sample_from_object(sample *s, const moe_tune_data_opts *o, json_t *obj, const char *where) {
    json_t *text = json_object_get(obj, "text"), *prompt = json_object_get(obj, "prompt");
    json_t *turns = json_object_get(obj, "turns"), *ids = json_object_get(obj, "ids");
    if (ids && !text && !prompt && !turns) return sample_from_ids(s, ids, where);
    if (!o->tok) {
        moe_error_set(MOE_ERR_DATA, "%s: text needs the model's tokenizer.json, which it lacks", where);
        return -1;
    }
    if (text) {
        if (need_string(text, "'text'", where) < 0) return -1;
        int32_t *ids;
        size_t n;
        if (moe_tokenizer_encode_trunc(o->tok, json_string_value(text), json_string_length(text), 1,
                                       o->max_length > 0 ? (size_t)o->max_length : 0, &ids, &n) < 0)
            return -1;
        sample_add(s, ids, n, 1);
        free(ids);
        return 0;
    }
    if (prompt) {
        json_t *response = json_object_get(obj, "response");
        if (need_string(prompt, "'prompt'", where) < 0 || need_string(response, "'response'", where) < 0 ||
            sample_add_text(s, o, json_string_value(prompt), json_string_length(prompt), 0) < 0 ||
            sample_add_text(s, o, json_string_value(response), json_string_length(response), 1) < 0)
            return -1;
        sample_add_eos(s, o);
        return 0;
    }
    if (turns) return sample_from_turns(s, o, turns, where);
    moe_error_set(MOE_ERR_DATA, "%s: no 'text', 'prompt', 'turns' or 'ids' field", where);
    return -1;
}

static int add_object(moe_tune_data *d, sample *s, const moe_tune_data_opts *o, json_t *obj, const char *where) {
    if (!json_is_object(obj)) {
        moe_error_set(MOE_ERR_DATA, "%s: not a JSON object", where);
        return -1;
    }
    if (sample_from_object(s, o, obj, where) < 0) {
        s->len = 0;
        return -1;
    }
    return sample_finish(s, o, d, where);
}

/* ---- the three file formats ---------------------------------------------------- */

static int load_jsonl(moe_tune_data *d, const char *path, const moe_tune_data_opts *o) {
    moe_jsonl *r = moe_jsonl_open(path);
    if (!r) return -1;
    sample s = {0};
    const char *line;
    size_t len;
    int rc;
    while ((rc = moe_jsonl_next(r, &line, &len)) > 0) {
        if (moe_jsonl_blank(line, len)) continue;
        char where[4096];
        snprintf(where, sizeof where, "%s: line %llu", moe_jsonl_name(r), (unsigned long long)moe_jsonl_lineno(r));
        json_error_t err;
        json_t *obj = json_loadb(line, len, JSON_ALLOW_NUL, &err);
        if (!obj) {
            moe_error_set(MOE_ERR_DATA, "%s: not JSON: %s", where, err.text);
            rc = -1;
            break;
        }
        rc = add_object(d, &s, o, obj, where);
        json_decref(obj);
        if (rc < 0) break;
    }
    free(s.ids);
    free(s.labels);
    moe_jsonl_close(r);
    return rc;
}

/* {"instances": [...]}, the original's file; 0 if root is not that shape. */
static int load_instances(moe_tune_data *d, const char *path, json_t *root, const moe_tune_data_opts *o) {
    json_t *inst = json_object_get(root, "instances");
    if (!json_is_array(inst)) {
        moe_error_set(MOE_ERR_DATA, "%s: 'instances' must be a list of {\"text\": ...}", path);
        return -1;
    }
    sample s = {0};
    int rc = 0;
    for (size_t i = 0; rc == 0 && i < json_array_size(inst); i++) {
        char where[4096];
        snprintf(where, sizeof where, "%s: instances[%zu]", path, i);
        rc = add_object(d, &s, o, json_array_get(inst, i), where);
    }
    free(s.ids);
    free(s.labels);
    return rc;
}

static int load_tokens(moe_tune_data *d, const char *path, const moe_tune_data_opts *o) {
    moe_reader *r = moe_reader_open(path);
    moe_tokens_check check;
    if (!r || moe_tokens_check_init(&check, o->model_dir, o->force) < 0) {
        moe_reader_close(r);
        return -1;
    }
    sample s = {0};
    const msgpack_object *rec;
    int rc;
    while ((rc = moe_reader_next(r, &rec)) > 0) {
        if (!moe_record_is(rec, MOE_REC_TOKENS)) continue;
        moe_tokens t;
        if (moe_tokens_read(r, rec, &check, &t) < 0) {
            rc = -1;
            break;
        }
        char where[4096];
        snprintf(where, sizeof where, "%s: record %llu", moe_reader_name(r), (unsigned long long)moe_reader_index(r));
        sample_add(&s, t.ids, t.n, 1);
        free(t.ids);
        if ((rc = sample_finish(&s, o, d, where)) < 0) break;
    }
    free(s.ids);
    free(s.labels);
    moe_reader_close(r);
    return rc;
}

/* The first bytes: a zstd frame (a moe-stream), or JSON. */
static int sniff(const char *path, unsigned char head[4]) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        moe_error_set(MOE_ERR_IO, "%s: %s", path, strerror(errno));
        return -1;
    }
    memset(head, 0, 4);
    size_t n = fread(head, 1, 4, f);
    fclose(f);
    return (int)n;
}

int moe_tune_data_load(moe_tune_data *d, const char *path, const moe_tune_data_opts *o) {
    memset(d, 0, sizeof *d);
    int rc;
    unsigned char head[4];
    if (strcmp(path, "-") == 0) rc = load_jsonl(d, path, o);
    else if ((rc = sniff(path, head)) < 0) return -1;
    else if (rc == 4 && !memcmp(head, "\x28\xb5\x2f\xfd", 4)) rc = load_tokens(d, path, o);
    else {
        /* one JSON document with "instances", else JSON Lines */
        json_error_t err;
        json_t *root = json_load_file(path, JSON_ALLOW_NUL, &err);
        if (json_is_object(root) && json_object_get(root, "instances")) rc = load_instances(d, path, root, o);
        else rc = load_jsonl(d, path, o);
        json_decref(root);
    }
    if (rc == 0 && d->n == 0) {
        moe_error_set(MOE_ERR_DATA, "%s: no samples", strcmp(path, "-") ? path : "<stdin>");
        rc = -1;
    }
    if (rc < 0) moe_tune_data_free(d);
    return rc < 0 ? -1 : 0;
}

void moe_tune_data_free(moe_tune_data *d) {
    for (int i = 0; i < d->n; i++) {
        free(d->seqs[i].ids);
        free(d->seqs[i].targets);
    }
    free(d->seqs);
    memset(d, 0, sizeof *d);
}

/* ---- epoch order ----------------------------------------------------------------- */

static uint64_t splitmix64(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

void moe_tune_epoch_order(int *order, int n, uint64_t seed, long epoch, int shuffle) {
    for (int i = 0; i < n; i++) order[i] = i;
    if (!shuffle) return;
    uint64_t s = seed ^ ((uint64_t)epoch * 0xD1B54A32D192ED03ull);
    for (int i = n - 1; i > 0; i--) {
        /* j uniform in [0, i]: the high word of a 64x64-bit product */
        int j = (int)(((unsigned __int128)splitmix64(&s) * (uint64_t)(i + 1)) >> 64);
        int t = order[i];
        order[i] = order[j];
        order[j] = t;
    }
}
