/* records.c - the stream records, read and written in one place (see records.h). */
#include "records.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "common.h"
#include "search.h"
#include "sha256.h"

#define LAYERS_MAX 1000000 /* bound on a layer index when no model gives one */

/* "FILE: record N" for messages */
#define REC_FMT "%s: record %llu"
#define REC_ARGS(r) moe_reader_name(r), (unsigned long long)moe_reader_index(r)

/* ---- small helpers ---------------------------------------------------------- */

/* A typed array as doubles / int64 (any numeric dtype). */
static void array_f64(const moe_array *a, double *dst) {
    if (a->dtype == MOE_DT_F64) {
        memcpy(dst, a->data, sizeof(double) * (size_t)a->count);
        return;
    }
    if (a->dtype == MOE_DT_I64) {
        for (int64_t i = 0; i < a->count; i++) {
            int64_t v;
            memcpy(&v, (const char *)a->data + 8 * i, 8);
            dst[i] = (double)v;
        }
        return;
    }
    float *f = moe_malloc(sizeof(float) * (size_t)a->count + 1);
    moe_array_to_f32(a, f);
    for (int64_t i = 0; i < a->count; i++) dst[i] = f[i];
    free(f);
}

static void array_i64(const moe_array *a, int64_t *dst) {
    if (a->dtype == MOE_DT_I64) {
        memcpy(dst, a->data, sizeof(int64_t) * (size_t)a->count);
        return;
    }
    double *d = moe_malloc(sizeof(double) * (size_t)a->count + 1);
    array_f64(a, d);
    for (int64_t i = 0; i < a->count; i++) dst[i] = (int64_t)d[i];
    free(d);
}

/* rec[key] as int32 values, malloc'd (at least one element). */
static int read_i32(moe_reader *r, const msgpack_object *rec, const char *key, int32_t **out, int *n) {
    moe_array a;
    if (moe_record_array(r, rec, key, &a) < 0) return -1;
    if (a.count > INT32_MAX) {
        moe_error_set(MOE_ERR_DATA, REC_FMT ": '%s' has too many values", REC_ARGS(r), key);
        return -1;
    }
    int32_t *v = moe_malloc(sizeof(int32_t) * (size_t)(a.count + 1));
    if (moe_array_to_i32(&a, v) < 0) {
        free(v);
        moe_error_set(MOE_ERR_DATA, REC_FMT ": key '%s': %s", REC_ARGS(r), key, moe_error());
        return -1;
    }
    *out = v;
    *n = (int)a.count;
    return 0;
}

static int want_array(moe_reader *r, const msgpack_object *rec, const char *key, int64_t n,
                      moe_array *a) {
    if (moe_record_array(r, rec, key, a) < 0) return -1;
    if (a->count != n) {
        moe_error_set(MOE_ERR_DATA, REC_FMT ": '%s' has %lld values, expected %lld", REC_ARGS(r), key,
                      (long long)a->count, (long long)n);
        return -1;
    }
    return 0;
}

/* The record's "metric" as MOE_DIV_* (unchanged when absent or unknown). */
static void read_metric(const msgpack_object *rec, int *metric) {
    const msgpack_object *m = moe_map_get(rec, "metric");
    if (!m || m->type != MSGPACK_OBJECT_STR) return;
    char buf[16] = {0};
    memcpy(buf, m->via.str.ptr, m->via.str.size < 15 ? m->via.str.size : 15);
    int v = moe_metric_from_name(buf);
    if (v >= 0) *metric = v;
}

/* An optional non-negative integer key (a wrong type or absence leaves *out). */
static void read_opt_uint(const msgpack_object *rec, const char *key, int64_t *out) {
    const msgpack_object *t = moe_map_get(rec, key);
    if (t && t->type == MSGPACK_OBJECT_POSITIVE_INTEGER && t->via.u64 <= INT64_MAX) *out = (int64_t)t->via.u64;
}

static const char *metric_names[] = {"js", "kl", "mse", "cosine"};

int moe_metric_from_name(const char *s) {
    for (int i = 0; i < 4; i++)
        if (strcmp(s, metric_names[i]) == 0) return i;
    return -1;
}

const char *moe_metric_name(int metric) {
    return metric >= 0 && metric < 4 ? metric_names[metric] : "?";
}

/* ---- tokens ------------------------------------------------------------------ */

int moe_tokenizer_fingerprint(const char *path, char hex[65]) {
    struct stat st;
    char *file = NULL;
    if (stat(path, &st) == 0 && S_ISDIR(st.st_mode)) {
        file = moe_malloc(strlen(path) + 32);
        sprintf(file, "%s/tokenizer.json", path);
    } else {
        file = moe_strdup(path);
    }
    FILE *f = fopen(file, "rb");
    if (!f) {
        int none = errno == ENOENT;
        if (!none) moe_error_set(MOE_ERR_IO, "%s: %s", file, strerror(errno));
        free(file);
        return none ? 0 : -1;
    }
    moe_sha256 s;
    moe_sha256_init(&s);
    char buf[1 << 16];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, f)) > 0) moe_sha256_update(&s, buf, n);
    int bad = ferror(f);
    fclose(f);
    if (bad) {
        moe_error_set(MOE_ERR_IO, "%s: read error", file);
        free(file);
        return -1;
    }
    free(file);
    moe_sha256_hex(&s, hex);
    return 1;
}

int moe_tokens_check_init(moe_tokens_check *c, const char *model_dir, int force) {
    memset(c, 0, sizeof *c);
    c->force = force;
    return moe_tokenizer_fingerprint(model_dir, c->want) < 0 ? -1 : 0;
}

/* The record's tokenizer fingerprint against the model's (see moe_tokens_check). */
static int check_tokenizer(moe_reader *r, const msgpack_object *rec, moe_tokens_check *c) {
    const msgpack_object *t = moe_map_get(rec, "tokenizer");
    if (!c->want[0] || !t) return 0; /* nothing to compare (older streams have no key) */
    if (t->type == MSGPACK_OBJECT_STR && t->via.str.size == 64 && !memcmp(t->via.str.ptr, c->want, 64))
        return 0;
    char have[65] = "?";
    if (t->type == MSGPACK_OBJECT_STR)
        snprintf(have, sizeof have, "%.*s", (int)(t->via.str.size < 64 ? t->via.str.size : 64), t->via.str.ptr);
    char msg[512];
    snprintf(msg, sizeof msg, REC_FMT ": tokens were made with tokenizer %s, but this model's tokenizer.json is %s",
             REC_ARGS(r), have, c->want);
    if (c->force) {
        if (!c->warned) moe_warn("%s (continuing: --force)", msg);
        c->warned = 1;
        return 0;
    }
    moe_error_set(MOE_ERR_DATA, "%s; use --force to override", msg);
    return -1;
}

int moe_tokens_read(moe_reader *r, const msgpack_object *rec, moe_tokens_check *check,
                    moe_tokens *out) {
    memset(out, 0, sizeof *out);
    out->index = -1;
    /* moe-tokenize numbers samples with "index"; "sample" is accepted too */
    read_opt_uint(rec, "sample", &out->index);
    read_opt_uint(rec, "index", &out->index);
    moe_array a;
    if (moe_record_array(r, rec, "ids", &a) < 0) return -1;
    if (a.ndim != 1 || a.count > INT32_MAX) {
        moe_error_set(MOE_ERR_DATA, REC_FMT ": 'ids' must be a 1-d array of at most 2^31-1 tokens", REC_ARGS(r));
        return -1;
    }
    if (check && a.count == 0) {
        moe_error_set(MOE_ERR_DATA, REC_FMT ": the sample has no tokens", REC_ARGS(r));
        return -1;
    }
    if (check && check_tokenizer(r, rec, check) < 0) return -1;
    out->ids = moe_malloc(sizeof(int32_t) * (size_t)(a.count + 1));
    if (moe_array_to_i32(&a, out->ids) < 0) {
        free(out->ids);
        out->ids = NULL;
        moe_error_set(MOE_ERR_DATA, REC_FMT ": key 'ids': %s", REC_ARGS(r), moe_error());
        return -1;
    }
    out->n = (size_t)a.count;
    return 0;
}

int moe_tokens_write(moe_writer *w, int64_t index, const int32_t *ids, size_t n, const char *tokenizer) {
    return moe_tokens_write_prompt(w, index, ids, n, tokenizer, -1);
}

int moe_tokens_write_prompt(moe_writer *w, int64_t index, const int32_t *ids, size_t n,
                            const char *tokenizer, int64_t prompt_tokens) {
    msgpack_packer *pk = moe_writer_record(w, MOE_REC_TOKENS,
                                           2 + (tokenizer != NULL) + (prompt_tokens >= 0));
    if (!pk) return -1;
    moe_pack_kv_int(pk, "index", index);
    int64_t shape[1] = {(int64_t)n};
    moe_pack_kv_array(pk, "ids", MOE_DT_I32, 1, shape, ids);
    if (tokenizer) moe_pack_kv_str(pk, "tokenizer", tokenizer);
    if (prompt_tokens >= 0) moe_pack_kv_int(pk, "prompt_tokens", prompt_tokens);
    return 0;
}

static int collect_tokens(moe_reader *r, const msgpack_object *rec, moe_tokens_check *check, moe_seqs *s) {
    moe_tokens t;
    moe_tokens_check none = {{0}, 0, 0};
    if (moe_tokens_read(r, rec, check ? check : &none, &t) < 0) return -1;
    s->ids = moe_realloc(s->ids, sizeof(int32_t *) * (size_t)(s->n + 1));
    s->len = moe_realloc(s->len, sizeof(int) * (size_t)(s->n + 1));
    s->sample = moe_realloc(s->sample, sizeof(int64_t) * (size_t)(s->n + 1));
    s->ids[s->n] = t.ids;
    s->len[s->n] = (int)t.n;
    s->sample[s->n] = t.index >= 0 ? t.index : s->n;
    s->n++;
    return 0;
}

/* ---- calib, ranking, plan: freeing and sizing ---------------------------------- */

void moe_seqs_free(moe_seqs *s) {
    if (!s) return;
    for (int i = 0; i < s->n; i++) free(s->ids[i]);
    free(s->ids);
    free(s->len);
    free(s->sample);
    memset(s, 0, sizeof *s);
}

void moe_calib_init(moe_calib *c, int L, int E, int K) {
    c->L = L;
    c->E = E;
    c->K = K;
    c->layers = moe_calloc((size_t)(L ? L : 1), sizeof *c->layers);
}

void moe_calib_layer_init(moe_calib_layer *cl, int E) {
    cl->present = 1;
    cl->moe_ordinal = -1;
    cl->sum = moe_calloc((size_t)E + 1, sizeof(double));
    cl->count = moe_calloc((size_t)E + 1, sizeof(int64_t));
    cl->mean = moe_calloc((size_t)E + 1, sizeof(double));
    cl->load = moe_calloc((size_t)E + 1, sizeof(double));
}

void moe_calib_free(moe_calib *c) {
    if (!c || !c->layers) return;
    for (int l = 0; l < c->L; l++) {
        moe_calib_layer *cl = &c->layers[l];
        free(cl->sum);
        free(cl->count);
        free(cl->mean);
        free(cl->load);
        free(cl->reap);
    }
    free(c->layers);
    memset(c, 0, sizeof *c);
}

void moe_ranking_free(moe_ranking *r) {
    if (!r || !r->layers) return;
    for (int l = 0; l < r->L; l++) {
        free(r->layers[l].experts);
        free(r->layers[l].scores);
        free(r->layers[l].cand);
        free(r->layers[l].unrouted);
    }
    free(r->layers);
    memset(r, 0, sizeof *r);
}

void moe_plan_free(moe_plan *p) {
    if (!p) return;
    free(p->order);
    free(p->scores);
    free(p->weights);
    free(p->cand);
    memset(p, 0, sizeof *p);
}

/* Grow a per-layer table *layers of *L entries (each elem bytes, zeroed) to hold layer l. */
static void grow_layers(void **layers, int *L, size_t elem, int l) {
    if (l < *L) return;
    *layers = moe_realloc(*layers, elem * (size_t)(l + 1));
    memset((char *)*layers + elem * (size_t)*L, 0, elem * (size_t)(l + 1 - *L));
    *L = l + 1;
}

/* The record's "layer": within the model's L layers, or (no model: dynamic)
 * any plausible index, the table grown to hold it. */
static int read_layer_key(moe_reader *r, const msgpack_object *rec, int dynamic, int L, int *l) {
    int64_t v;
    if (moe_record_int(r, rec, "layer", &v) < 0) return -1;
    if (v < 0 || v >= (dynamic ? LAYERS_MAX : L)) {
        if (dynamic)
            moe_error_set(MOE_ERR_DATA, REC_FMT ": layer %lld out of range", REC_ARGS(r), (long long)v);
        else
            moe_error_set(MOE_ERR_DATA, REC_FMT ": layer %lld out of range (model has %d layers)", REC_ARGS(r),
                          (long long)v, L);
        return -1;
    }
    *l = (int)v;
    return 0;
}

/* ---- calib ------------------------------------------------------------------------ */

static int collect_calib(moe_reader *r, const msgpack_object *rec, int dynamic, moe_calib *c) {
    int l;
    int64_t E;
    if (read_layer_key(r, rec, dynamic, c->L, &l) < 0) return -1;
    if (moe_record_int(r, rec, "experts", &E) < 0) return -1;
    if (dynamic && c->E == 0 && E > 0 && E <= LAYERS_MAX) c->E = (int)E; /* the first record sets E */
    if (E != c->E) {
        if (dynamic)
            moe_error_set(MOE_ERR_DATA, REC_FMT ": calib for %lld experts, earlier records have %d", REC_ARGS(r),
                          (long long)E, c->E);
        else
            moe_error_set(MOE_ERR_DATA, REC_FMT ": calib for %lld experts, the model has %d", REC_ARGS(r),
                          (long long)E, c->E);
        return -1;
    }
    if (dynamic) grow_layers((void **)&c->layers, &c->L, sizeof *c->layers, l);
    moe_calib_layer *cl = &c->layers[l];
    if (cl->present) {
        moe_error_set(MOE_ERR_DATA, REC_FMT ": second calib record for layer %d", REC_ARGS(r), l);
        return -1;
    }
    moe_calib_layer_init(cl, c->E);
    moe_array a;
    if (want_array(r, rec, "sum", E, &a) < 0) return -1;
    array_f64(&a, cl->sum);
    if (want_array(r, rec, "count", E, &a) < 0) return -1;
    array_i64(&a, cl->count);
    if (want_array(r, rec, "mean", E, &a) < 0) return -1;
    array_f64(&a, cl->mean);
    if (moe_map_get(rec, "load") && want_array(r, rec, "load", E, &a) == 0) array_f64(&a, cl->load);
    if (moe_map_get(rec, "reap")) {
        if (want_array(r, rec, "reap", E, &a) < 0) return -1;
        cl->reap = moe_malloc(sizeof(double) * (size_t)(E + 1));
        array_f64(&a, cl->reap);
    }
    moe_error_clear();
    int64_t v = -1;
    read_opt_uint(rec, "moe_ordinal", &v);
    cl->moe_ordinal = v <= INT32_MAX ? (int)v : -1;
    read_opt_uint(rec, "tokens", &cl->tokens);
    const msgpack_object *t = moe_map_get(rec, "entropy");
    if (t && (t->type == MSGPACK_OBJECT_FLOAT64 || t->type == MSGPACK_OBJECT_FLOAT32))
        cl->entropy = t->via.f64;
    return 0;
}

int moe_calib_write(moe_writer *w, const moe_calib *c) {
    int ordinal = 0;
    for (int l = 0; l < c->L; l++) {
        const moe_calib_layer *cl = &c->layers[l];
        if (!cl->present) continue;
        msgpack_packer *pk = moe_writer_record(w, MOE_REC_CALIB, 10 + (cl->reap != NULL));
        if (!pk) return -1;
        int64_t E = c->E;
        moe_pack_kv_int(pk, "layer", l);
        moe_pack_kv_int(pk, "moe_ordinal", ordinal++);
        moe_pack_kv_int(pk, "experts", c->E);
        moe_pack_kv_int(pk, "top_k", c->K);
        moe_pack_kv_int(pk, "tokens", cl->tokens);
        moe_pack_kv_array(pk, "sum", MOE_DT_F64, 1, &E, cl->sum);
        moe_pack_kv_array(pk, "count", MOE_DT_I64, 1, &E, cl->count);
        moe_pack_kv_array(pk, "mean", MOE_DT_F64, 1, &E, cl->mean);
        moe_pack_kv_double(pk, "entropy", cl->entropy);
        moe_pack_kv_array(pk, "load", MOE_DT_F64, 1, &E, cl->load);
        if (cl->reap) moe_pack_kv_array(pk, "reap", MOE_DT_F64, 1, &E, cl->reap);
    }
    return 0;
}

/* ---- ranking ------------------------------------------------------------------------ */

static int collect_ranking(moe_reader *r, const msgpack_object *rec, int dynamic, moe_ranking *rk) {
    int l;
    if (read_layer_key(r, rec, dynamic, rk->L, &l) < 0) return -1;
    if (dynamic) grow_layers((void **)&rk->layers, &rk->L, sizeof *rk->layers, l);
    moe_rank_layer *rl = &rk->layers[l];
    if (rl->present) {
        moe_error_set(MOE_ERR_DATA, REC_FMT ": second ranking record for layer %d", REC_ARGS(r), l);
        return -1;
    }
    moe_array sc;
    int32_t *ex;
    int n;
    if (read_i32(r, rec, "experts", &ex, &n) < 0) return -1;
    if (want_array(r, rec, "scores", n, &sc) < 0) {
        free(ex);
        return -1;
    }
    for (int i = 0; i < n; i++)
        if (ex[i] < 0 || ex[i] >= (dynamic ? LAYERS_MAX : rk->E)) {
            moe_error_set(MOE_ERR_DATA, REC_FMT ": layer %d: expert %d out of range (0..%d)", REC_ARGS(r), l,
                          ex[i], (dynamic ? LAYERS_MAX : rk->E) - 1);
            free(ex);
            return -1;
        }
    rl->present = 1;
    rl->n = n;
    rl->experts = moe_malloc(sizeof(int) * (size_t)(n + 1));
    for (int i = 0; i < n; i++) rl->experts[i] = ex[i];
    free(ex);
    rl->scores = moe_malloc(sizeof(double) * (size_t)(n + 1));
    array_f64(&sc, rl->scores);
    read_metric(rec, &rk->metric);
    return 0;
}

int moe_ranking_write(moe_writer *w, const moe_ranking *r) {
    for (int l = 0; l < r->L; l++) {
        const moe_rank_layer *rl = &r->layers[l];
        if (!rl->present) continue;
        msgpack_packer *pk = moe_writer_record(w, MOE_REC_RANKING, 7);
        if (!pk) return -1;
        int64_t n = rl->n, shp[2] = {rl->n, r->E}, nu = rl->n_unrouted;
        int32_t *ex = moe_malloc(sizeof(int32_t) * (size_t)(n + 1));
        int32_t *un = moe_malloc(sizeof(int32_t) * (size_t)(nu + 1));
        for (int i = 0; i < rl->n; i++) ex[i] = rl->experts[i];
        for (int i = 0; i < rl->n_unrouted; i++) un[i] = rl->unrouted[i];
        moe_pack_kv_int(pk, "layer", l);
        moe_pack_kv_str(pk, "metric", moe_metric_name(r->metric));
        moe_pack_kv_int(pk, "max_length", r->max_length);
        moe_pack_kv_array(pk, "experts", MOE_DT_I32, 1, &n, ex);
        moe_pack_kv_array(pk, "scores", MOE_DT_F64, 1, &n, rl->scores);
        moe_pack_kv_array(pk, "candidates", MOE_DT_F64, 2, shp, rl->cand);
        moe_pack_kv_array(pk, "unrouted", MOE_DT_I32, 1, &nu, un);
        free(ex);
        free(un);
    }
    return 0;
}

/* ---- plan --------------------------------------------------------------------------- */

/* The plan's "weights" (absent in older streams: left NULL). */
static int read_plan_weights(moe_reader *r, const msgpack_object *rec, moe_plan *p) {
    if (!moe_map_get(rec, "weights")) return 0;
    moe_array a;
    if (want_array(r, rec, "weights", (int64_t)p->n * p->k, &a) < 0) return -1;
    if (a.ndim != 2 || a.shape[0] != p->n || a.shape[1] != p->k) {
        moe_error_set(MOE_ERR_DATA, REC_FMT ": 'weights' must have shape [%d, %d] (layers, experts)", REC_ARGS(r),
                      p->n, p->k);
        return -1;
    }
    p->weights = moe_malloc(sizeof(float) * ((size_t)p->n * (size_t)p->k + 1));
    moe_array_to_f32(&a, p->weights);
    for (size_t i = 0; i < (size_t)p->n * (size_t)p->k; i++)
        if (!isfinite(p->weights[i])) {
            moe_error_set(MOE_ERR_DATA, REC_FMT ": 'weights' holds a value that is not finite", REC_ARGS(r));
            return -1;
        }
    return 0;
}

static const char *plan_methods[] = {"cdmoe", "layerdrop", "blockdrop"};
static const char *plan_criteria[] = {"greedy", "cosine"};

static int name_index(const char *const *names, int n, const char *s) {
    for (int i = 0; i < n; i++)
        if (strcmp(names[i], s) == 0) return i;
    return -1;
}

const char *moe_plan_method_name(int m) { return m >= 0 && m < 3 ? plan_methods[m] : "?"; }
int moe_plan_method_from_name(const char *s) { return name_index(plan_methods, 3, s); }
const char *moe_plan_criterion_name(int c) { return c >= 0 && c < 2 ? plan_criteria[c] : "?"; }
int moe_plan_criterion_from_name(const char *s) { return name_index(plan_criteria, 2, s); }

/* An optional string key naming one of `names` (absent: *out unchanged); -1 if unknown. */
static int read_plan_name(moe_reader *r, const msgpack_object *rec, const char *key,
                          int (*from_name)(const char *), int *out) {
    const msgpack_object *m = moe_map_get(rec, key);
    if (!m) return 0;
    char buf[32] = {0};
    if (m->type == MSGPACK_OBJECT_STR && m->via.str.size < sizeof buf)
        memcpy(buf, m->via.str.ptr, m->via.str.size);
    int v = from_name(buf);
    if (v < 0) {
        moe_error_set(MOE_ERR_DATA, REC_FMT ": plan: unknown %s", REC_ARGS(r), key);
        return -1;
    }
    *out = v;
    return 0;
}

/* Read a plan record into a fresh plan; on success it replaces *out (the
 * last plan of a stream counts).  On error *out is left as it was. */
static int collect_plan(moe_reader *r, const msgpack_object *rec, moe_plan *out) {
    moe_plan p = {.present = 1, .beam = 1};
    int64_t k;
    if (moe_record_int(r, rec, "experts", &k) < 0) return -1;
    if (k < 0 || k > LAYERS_MAX) {
        moe_error_set(MOE_ERR_DATA, REC_FMT ": plan for %lld experts per layer", REC_ARGS(r), (long long)k);
        return -1;
    }
    p.k = (int)k;
    int32_t *order;
    if (read_i32(r, rec, "order", &order, &p.n) < 0) return -1;
    p.order = moe_malloc(sizeof(int) * (size_t)(p.n + 1));
    for (int i = 0; i < p.n; i++) p.order[i] = order[i];
    free(order);
    moe_array a;
    if (moe_map_get(rec, "scores")) {
        if (want_array(r, rec, "scores", p.n, &a) < 0) goto fail;
        p.scores = moe_malloc(sizeof(double) * (size_t)(p.n + 1));
        array_f64(&a, p.scores);
    }
    if (read_plan_weights(r, rec, &p) < 0) goto fail;
    int64_t v = p.beam;
    read_opt_uint(rec, "beam", &v);
    p.beam = v <= INT32_MAX ? (int)v : 1;
    v = 0;
    read_opt_uint(rec, "max_length", &v);
    p.max_length = v <= INT32_MAX ? (int)v : 0;
    read_metric(rec, &p.metric);
    if (read_plan_name(r, rec, "method", moe_plan_method_from_name, &p.method) < 0 ||
        read_plan_name(r, rec, "criterion", moe_plan_criterion_from_name, &p.criterion) < 0)
        goto fail;
    moe_plan_free(out);
    *out = p;
    return 0;
fail:
    moe_plan_free(&p);
    return -1;
}

int moe_plan_write(moe_writer *w, const moe_plan *p) {
    /* method and criterion only when not the default: CD-MoE plans keep their bytes */
    int named = p->method != MOE_PLAN_CDMOE || p->criterion != MOE_PLAN_GREEDY;
    msgpack_packer *pk = moe_writer_record(w, MOE_REC_PLAN,
                                           7 + (p->weights != NULL) + (p->cand != NULL) + 2 * named);
    if (!pk) return -1;
    int64_t n = p->n, shp[2] = {p->n, p->L}, wshp[2] = {p->n, p->k};
    int32_t *ord = moe_malloc(sizeof(int32_t) * (size_t)(n + 1));
    for (int i = 0; i < p->n; i++) ord[i] = p->order[i];
    moe_pack_kv_int(pk, "experts", p->k);
    moe_pack_kv_str(pk, "metric", moe_metric_name(p->metric));
    moe_pack_kv_int(pk, "max_length", p->max_length);
    moe_pack_kv_int(pk, "beam", p->beam);
    moe_pack_kv_int(pk, "layers", p->n);
    moe_pack_kv_array(pk, "order", MOE_DT_I32, 1, &n, ord);
    moe_pack_kv_array(pk, "scores", MOE_DT_F64, 1, &n, p->scores);
    if (p->weights) moe_pack_kv_array(pk, "weights", MOE_DT_F32, 2, wshp, p->weights);
    if (p->cand) moe_pack_kv_array(pk, "candidates", MOE_DT_F64, 2, shp, p->cand);
    if (named) {
        moe_pack_kv_str(pk, "method", moe_plan_method_name(p->method));
        moe_pack_kv_str(pk, "criterion", moe_plan_criterion_name(p->criterion));
    }
    free(ord);
    return 0;
}

/* ---- collecting a stream ------------------------------------------------------------ */

int moe_records_collect(moe_reader *r, moe_writer *copy, const moe_records_opts *o,
                        moe_seqs *seqs, moe_calib *calib, moe_ranking *ranking, moe_plan *plan) {
    const msgpack_object *rec;
    int rc, dynamic = o->L == 0;
    if (seqs) memset(seqs, 0, sizeof *seqs);
    if (calib) moe_calib_init(calib, o->L, o->E, 0);
    if (ranking) {
        memset(ranking, 0, sizeof *ranking);
        ranking->L = o->L;
        ranking->E = o->E;
        ranking->layers = moe_calloc((size_t)(o->L ? o->L : 1), sizeof *ranking->layers);
    }
    if (plan) memset(plan, 0, sizeof *plan);
    while ((rc = moe_reader_next(r, &rec)) > 0) {
        if (copy && moe_writer_copy(copy, rec) < 0) return -1;
        if (seqs && moe_record_is(rec, MOE_REC_TOKENS)) {
            if (collect_tokens(r, rec, o->tokens, seqs) < 0) return -1;
        } else if (calib && moe_record_is(rec, MOE_REC_CALIB)) {
            if (collect_calib(r, rec, dynamic, calib) < 0) return -1;
        } else if (ranking && moe_record_is(rec, MOE_REC_RANKING)) {
            if (collect_ranking(r, rec, dynamic, ranking) < 0) return -1;
        } else if (plan && moe_record_is(rec, MOE_REC_PLAN)) {
            if (collect_plan(r, rec, plan) < 0) return -1;
        }
    }
    return rc < 0 ? -1 : 0;
}

/* ---- work, dump ------------------------------------------------------------------------ */

int moe_search_work_write(moe_writer *w, const char *tool, const moe_search_work *work) {
    msgpack_packer *pk = moe_writer_record(w, MOE_REC_WORK, 6);
    if (!pk) return -1;
    moe_pack_kv_str(pk, "tool", tool);
    moe_pack_kv_int(pk, "candidates", (int64_t)work->candidates);
    moe_pack_kv_int(pk, "layer_tokens", (int64_t)work->layer_tokens);
    moe_pack_kv_int(pk, "expert_tokens", (int64_t)work->expert_tokens);
    moe_pack_kv_int(pk, "div_tokens", (int64_t)work->div_tokens);
    moe_pack_kv_double(pk, "flops", work->flops);
    return 0;
}

int moe_dump_write(moe_writer *w, int64_t index, int T, const float *hidden, int L1, int H,
                   const float *logits, int V) {
    msgpack_packer *pk = moe_writer_record(w, MOE_REC_DUMP, 1 + (hidden != NULL) + (logits != NULL));
    if (!pk) return -1;
    moe_pack_kv_int(pk, "index", index);
    if (hidden) {
        int64_t sh[3] = {L1, T, H};
        moe_pack_kv_array(pk, "hidden", MOE_DT_F32, 3, sh, hidden);
    }
    if (logits) {
        int64_t sh[2] = {T, V};
        moe_pack_kv_array(pk, "logits", MOE_DT_F32, 2, sh, logits);
    }
    return 0;
}

/* ---- evaluation results ------------------------------------------------------------ */

static int write_ppl(moe_writer *w, int k, const moe_ppl_result *p) {
    msgpack_packer *pk = moe_writer_record(w, "ppl", 9);
    if (!pk) return -1;
    moe_pack_kv_int(pk, "model_index", k);
    moe_pack_kv_double(pk, "ppl", p->ppl);
    moe_pack_kv_double(pk, "ppl_token", p->ppl_token);
    moe_pack_kv_double(pk, "mean_nll", p->mean_nll);
    moe_pack_kv_double(pk, "token_nll", p->token_nll);
    moe_pack_kv_int(pk, "samples", p->n_samples);
    moe_pack_kv_int(pk, "tokens", p->n_tokens);
    int64_t sh[1] = {p->n};
    moe_pack_kv_array(pk, "sample_nll", MOE_DT_F64, 1, sh, p->sample_nll);
    moe_pack_kv_array(pk, "sample_tokens", MOE_DT_I32, 1, sh, p->sample_tokens);
    return 0;
}

static int write_task(moe_writer *w, int k, const moe_task *task, const moe_task_result *t) {
    int lm = task->kind == MOE_TASK_LM, nn = task->has_acc_norm;
    msgpack_packer *pk = moe_writer_record(w, "task", 8 + nn + lm);
    if (!pk) return -1;
    moe_pack_kv_int(pk, "model_index", k);
    moe_pack_kv_str(pk, "task", task->name);
    moe_pack_kv_str(pk, "format", task->format);
    moe_pack_kv_int(pk, "items", t->n_items);
    moe_pack_kv_double(pk, "acc", t->acc);
    if (nn) moe_pack_kv_double(pk, "acc_norm", t->acc_norm);
    if (lm) moe_pack_kv_double(pk, "perplexity", t->perplexity);
    int64_t sc[1] = {t->choice_off[t->n_items]}, si[1] = {t->n_items + 1}, sp[1] = {t->n_items};
    moe_pack_kv_array(pk, "loglik", MOE_DT_F64, 1, sc, t->loglik);
    moe_pack_kv_array(pk, "choice_offsets", MOE_DT_I32, 1, si, t->choice_off);
    moe_pack_kv_array(pk, "pred", MOE_DT_I32, 1, sp, t->pred);
    return 0;
}

static int write_bench(moe_writer *w, int k, const moe_eval_record *e) {
    msgpack_packer *pk = moe_writer_record(w, "bench", 7);
    if (!pk) return -1;
    moe_pack_kv_int(pk, "model_index", k);
    moe_pack_kv_int(pk, "tokens", e->bench_tokens);
    moe_pack_kv_int(pk, "runs", e->bench_runs);
    moe_pack_kv_double(pk, "seconds", e->bench_s);
    moe_pack_kv_double(pk, "tokens_per_s", e->tok_per_s);
    moe_pack_kv_double(pk, "peak_rss_mib", e->peak_rss_mib);
    moe_pack_kv_str(pk, "weights", e->resident ? "resident" : "streamed");
    return 0;
}

int moe_eval_write(moe_writer *w, int k, const moe_eval_record *e) {
    msgpack_packer *pk = moe_writer_record(w, "model", 6);
    if (!pk) return -1;
    moe_pack_kv_int(pk, "model_index", k);
    moe_pack_kv_str(pk, "dir", e->dir);
    moe_pack_kv_str(pk, "fingerprint", e->fingerprint);
    moe_pack_kv_int(pk, "params", (int64_t)e->params);
    moe_pack_kv_int(pk, "bytes", (int64_t)e->bytes);
    moe_pack_kv_int(pk, "active_params", (int64_t)e->active);
    if (e->ppl && write_ppl(w, k, e->ppl) < 0) return -1;
    for (int i = 0; i < e->ntasks; i++)
        if (write_task(w, k, e->tasks[i], &e->task[i]) < 0) return -1;
    if (e->has_bench && write_bench(w, k, e) < 0) return -1;
    return 0;
}

int moe_eval_compare_write(moe_writer *w, const moe_eval_record *dense, const moe_eval_record *condensed,
                           int bench) {
    msgpack_packer *pk = moe_writer_record(w, "compare", 2 + (bench ? 1 : 0));
    if (!pk) return -1;
    moe_pack_kv_double(pk, "memory_ratio_params", (double)condensed->params / (double)dense->params);
    moe_pack_kv_double(pk, "memory_ratio_bytes", (double)condensed->bytes / (double)dense->bytes);
    if (bench) moe_pack_kv_double(pk, "speedup", dense->bench_s / condensed->bench_s);
    return 0;
}

/* ---- training log -------------------------------------------------------------------- */

int moe_tune_step_write(moe_writer *w, const moe_tune_step *s) {
    msgpack_packer *pk = moe_writer_record(w, "step", 10);
    if (!pk) return -1;
    moe_pack_kv_int(pk, "stage", s->stage);
    moe_pack_kv_int(pk, "step", s->step);
    moe_pack_kv_int(pk, "epoch", s->epoch);
    moe_pack_kv_double(pk, "loss", s->loss);
    moe_pack_kv_double(pk, "lr", s->lr);
    moe_pack_kv_double(pk, "grad_norm", s->grad_norm);
    moe_pack_kv_int(pk, "tokens", s->tokens);
    moe_pack_kv_int(pk, "sequences", s->sequences);
    moe_pack_kv_double(pk, "tokens_per_s", s->tokens_per_s);
    moe_pack_kv_double(pk, "seconds", s->seconds);
    return 0;
}

int moe_tune_val_write(moe_writer *w, const moe_tune_val *v) {
    msgpack_packer *pk = moe_writer_record(w, "val", 5);
    if (!pk) return -1;
    moe_pack_kv_int(pk, "stage", v->stage);
    moe_pack_kv_int(pk, "step", v->step);
    moe_pack_kv_double(pk, "loss", v->loss);
    moe_pack_kv_double(pk, "ppl", exp(v->loss));
    moe_pack_kv_int(pk, "tokens", v->tokens);
    return 0;
}
