/* calib.c - CD-MoE step 1 (routing statistics), reading the search tools'
 * inputs from a stream, and the calib/ranking/plan records. */
#include "search.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

/* ---- small helpers -------------------------------------------------------- */

void moe_seqs_free(moe_seqs *s) {
    if (!s) return;
    for (int i = 0; i < s->n; i++) free(s->ids[i]);
    free(s->ids);
    free(s->len);
    free(s->sample);
    memset(s, 0, sizeof *s);
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

static int calib_alloc(moe_calib *c, int L, int E, int K) {
    c->L = L;
    c->E = E;
    c->K = K;
    c->layers = moe_calloc((size_t)L, sizeof *c->layers);
    return 0;
}

static void calib_layer_init(moe_calib_layer *cl, int E) {
    cl->present = 1;
    cl->sum = moe_calloc((size_t)E, sizeof(double));
    cl->count = moe_calloc((size_t)E, sizeof(int64_t));
    cl->mean = moe_calloc((size_t)E, sizeof(double));
    cl->load = moe_calloc((size_t)E, sizeof(double));
}

void moe_calib_free(moe_calib *c) {
    if (!c || !c->layers) return;
    for (int l = 0; l < c->L; l++) {
        moe_calib_layer *cl = &c->layers[l];
        free(cl->sum);
        free(cl->count);
        free(cl->mean);
        free(cl->load);
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
    free(p->cand);
    memset(p, 0, sizeof *p);
}

/* ---- collecting a stream's inputs -------------------------------------------- */

static int read_layer_key(moe_reader *r, const msgpack_object *rec, int L, int *l) {
    int64_t v;
    if (moe_record_int(r, rec, "layer", &v) < 0) return -1;
    if (v < 0 || v >= L) {
        moe_error_set(MOE_ERR_DATA, "%s: record %llu: layer %lld out of range (model has %d layers)",
                      moe_reader_name(r), (unsigned long long)moe_reader_index(r), (long long)v, L);
        return -1;
    }
    *l = (int)v;
    return 0;
}

static int want_array(moe_reader *r, const msgpack_object *rec, const char *key, int64_t n,
                      moe_array *a) {
    if (moe_record_array(r, rec, key, a) < 0) return -1;
    if (a->count != n) {
        moe_error_set(MOE_ERR_DATA, "%s: record %llu: '%s' has %lld values, expected %lld",
                      moe_reader_name(r), (unsigned long long)moe_reader_index(r), key,
                      (long long)a->count, (long long)n);
        return -1;
    }
    return 0;
}

static int collect_tokens(moe_reader *r, const msgpack_object *rec, moe_seqs *s) {
    moe_array a;
    int64_t sample = (int64_t)s->n;
    /* moe-tokenize numbers samples with "index"; "sample" is accepted too */
    const msgpack_object *so = moe_map_get(rec, "index");
    if (!so) so = moe_map_get(rec, "sample");
    if (so && (so->type == MSGPACK_OBJECT_POSITIVE_INTEGER)) sample = (int64_t)so->via.u64;
    if (moe_record_array(r, rec, "ids", &a) < 0) return -1;
    if (a.count <= 0 || a.count > INT32_MAX) {
        moe_error_set(MOE_ERR_DATA, "%s: record %llu: sample %lld has no tokens", moe_reader_name(r),
                      (unsigned long long)moe_reader_index(r), (long long)sample);
        return -1;
    }
    int32_t *ids = moe_malloc(sizeof(int32_t) * (size_t)a.count);
    if (moe_array_to_i32(&a, ids) < 0) {
        free(ids);
        moe_error_set(MOE_ERR_DATA, "%s: record %llu: 'ids' does not fit int32", moe_reader_name(r),
                      (unsigned long long)moe_reader_index(r));
        return -1;
    }
    s->ids = moe_realloc(s->ids, sizeof(int32_t *) * (size_t)(s->n + 1));
    s->len = moe_realloc(s->len, sizeof(int) * (size_t)(s->n + 1));
    s->sample = moe_realloc(s->sample, sizeof(int64_t) * (size_t)(s->n + 1));
    s->ids[s->n] = ids;
    s->len[s->n] = (int)a.count;
    s->sample[s->n] = sample;
    s->n++;
    return 0;
}

static int collect_calib(moe_reader *r, const msgpack_object *rec, moe_calib *c) {
    int l;
    int64_t E;
    if (read_layer_key(r, rec, c->L, &l) < 0) return -1;
    if (moe_record_int(r, rec, "experts", &E) < 0) return -1;
    if (E != c->E) {
        moe_error_set(MOE_ERR_DATA, "%s: record %llu: calib for %lld experts, the model has %d",
                      moe_reader_name(r), (unsigned long long)moe_reader_index(r), (long long)E, c->E);
        return -1;
    }
    moe_calib_layer *cl = &c->layers[l];
    if (cl->present) {
        moe_error_set(MOE_ERR_DATA, "%s: record %llu: second calib record for layer %d",
                      moe_reader_name(r), (unsigned long long)moe_reader_index(r), l);
        return -1;
    }
    calib_layer_init(cl, c->E);
    moe_array a;
    if (want_array(r, rec, "sum", E, &a) < 0) return -1;
    array_f64(&a, cl->sum);
    if (want_array(r, rec, "count", E, &a) < 0) return -1;
    array_i64(&a, cl->count);
    if (want_array(r, rec, "mean", E, &a) < 0) return -1;
    array_f64(&a, cl->mean);
    if (moe_map_get(rec, "load") && want_array(r, rec, "load", E, &a) == 0) array_f64(&a, cl->load);
    moe_error_clear();
    const msgpack_object *t = moe_map_get(rec, "tokens");
    if (t && t->type == MSGPACK_OBJECT_POSITIVE_INTEGER) cl->tokens = (int64_t)t->via.u64;
    t = moe_map_get(rec, "entropy");
    if (t && (t->type == MSGPACK_OBJECT_FLOAT64 || t->type == MSGPACK_OBJECT_FLOAT32))
        cl->entropy = t->via.f64;
    return 0;
}

static int collect_ranking(moe_reader *r, const msgpack_object *rec, moe_ranking *rk) {
    int l;
    if (read_layer_key(r, rec, rk->L, &l) < 0) return -1;
    moe_rank_layer *rl = &rk->layers[l];
    if (rl->present) {
        moe_error_set(MOE_ERR_DATA, "%s: record %llu: second ranking record for layer %d",
                      moe_reader_name(r), (unsigned long long)moe_reader_index(r), l);
        return -1;
    }
    moe_array a, sc;
    if (moe_record_array(r, rec, "experts", &a) < 0) return -1;
    if (want_array(r, rec, "scores", a.count, &sc) < 0) return -1;
    int n = (int)a.count;
    rl->present = 1;
    rl->n = n;
    rl->experts = moe_malloc(sizeof(int) * (size_t)(n + 1));
    rl->scores = moe_malloc(sizeof(double) * (size_t)(n + 1));
    int32_t *tmp = moe_malloc(sizeof(int32_t) * (size_t)(n + 1));
    if (moe_array_to_i32(&a, tmp) < 0) {
        free(tmp);
        moe_error_set(MOE_ERR_DATA, "%s: record %llu: bad 'experts'", moe_reader_name(r),
                      (unsigned long long)moe_reader_index(r));
        return -1;
    }
    for (int i = 0; i < n; i++) {
        if (tmp[i] < 0 || tmp[i] >= rk->E) {
            moe_error_set(MOE_ERR_DATA, "%s: record %llu: layer %d: expert %d out of range (0..%d)",
                          moe_reader_name(r), (unsigned long long)moe_reader_index(r), l, tmp[i],
                          rk->E - 1);
            free(tmp);
            return -1;
        }
        rl->experts[i] = tmp[i];
    }
    free(tmp);
    array_f64(&sc, rl->scores);
    const char *ms;
    size_t ml;
    if (moe_record_str(r, rec, "metric", &ms, &ml) == 0) {
        char buf[16] = {0};
        memcpy(buf, ms, ml < 15 ? ml : 15);
        rk->metric = moe_metric_from_name(buf);
    }
    moe_error_clear();
    return 0;
}

int moe_search_collect(moe_reader *r, moe_writer *w, int L, int E, moe_seqs *seqs,
                       moe_calib *calib, moe_ranking *ranking) {
    const msgpack_object *rec;
    int rc;
    if (seqs) memset(seqs, 0, sizeof *seqs);
    if (calib) calib_alloc(calib, L, E, 0);
    if (ranking) {
        memset(ranking, 0, sizeof *ranking);
        ranking->L = L;
        ranking->E = E;
        ranking->layers = moe_calloc((size_t)L, sizeof *ranking->layers);
    }
    while ((rc = moe_reader_next(r, &rec)) > 0) {
        if (w && moe_writer_copy(w, rec) < 0) return -1;
        if (seqs && moe_record_is(rec, MOE_REC_TOKENS)) {
            if (collect_tokens(r, rec, seqs) < 0) return -1;
        } else if (calib && moe_record_is(rec, MOE_REC_CALIB)) {
            if (collect_calib(r, rec, calib) < 0) return -1;
        } else if (ranking && moe_record_is(rec, MOE_REC_RANKING)) {
            if (collect_ranking(r, rec, ranking) < 0) return -1;
        }
    }
    return rc < 0 ? -1 : 0;
}

/* ---- step 1: calibration ------------------------------------------------------ */

typedef struct {
    moe_calib *c;
    double *ent;      /* [L] entropy sums */
    moe_progress *progress; /* one step per MoE layer per batch */
} calib_ctx;

static void calib_cb(void *vctx, int layer, int T, int K, int E, const int32_t *idx,
                     const float *wt, const float *probs) {
    calib_ctx *x = vctx;
    moe_progress_add(x->progress, 1);
    moe_calib_layer *cl = &x->c->layers[layer];
    if (!cl->present) calib_layer_init(cl, E);
    for (int t = 0; t < T; t++) {
        for (int k = 0; k < K; k++) {
            int e = idx[(size_t)t * K + k];
            cl->sum[e] += (double)wt[(size_t)t * K + k];
            cl->count[e]++;
        }
        double h = 0.0;
        for (int e = 0; e < E; e++) {
            double p = probs[(size_t)t * E + e];
            if (p > 0) h -= p * log(p);
        }
        x->ent[layer] += h;
    }
    cl->tokens += T;
}

int moe_calib_run(moe_model *m, const moe_seqs *s, int max_length, size_t batch_tokens,
                  moe_calib *out, moe_search_work *work) {
    const moe_config *cfg = moe_model_config(m);
    double t0 = moe_now();
    memset(out, 0, sizeof *out);
    if (s->n == 0) {
        moe_error_set(MOE_ERR_DATA, "no token sequences in the input (a 'tokens' stream is needed)");
        return -1;
    }
    calib_alloc(out, cfg->num_layers, cfg->n_routed_experts, cfg->top_k);
    moe_progress progress;
    calib_ctx x = {out, moe_calloc((size_t)cfg->num_layers, sizeof(double)), &progress};
    moe_seq *seqs = moe_calloc((size_t)s->n, sizeof *seqs);
    uint64_t tot = 0;
    for (int i = 0; i < s->n; i++) {
        seqs[i].ids = s->ids[i];
        seqs[i].T = max_length > 0 && s->len[i] > max_length ? max_length : s->len[i];
        tot += (uint64_t)seqs[i].T;
    }
    int rc = 0, nbatch = 0, nmoe = 0;
    for (int l = 0; l < cfg->num_layers; l++) nmoe += cfg->layers[l].kind == MOE_MLP_MOE;
    for (int i = 0; i < s->n; nbatch++) { /* count batches, for the progress total */
        size_t nt = 0;
        int j = i;
        while (j < s->n && (j == i || batch_tokens == 0 || nt + (size_t)seqs[j].T <= batch_tokens))
            nt += (size_t)seqs[j++].T;
        i = j;
    }
    moe_progress_start(&progress, "moe-calib", "MoE layers", (uint64_t)nmoe * (uint64_t)nbatch);
    for (int i = 0; i < s->n && rc == 0;) {
        int j = i;
        size_t nt = 0;
        while (j < s->n && (j == i || batch_tokens == 0 || nt + (size_t)seqs[j].T <= batch_tokens))
            nt += (size_t)seqs[j++].T;
        rc = moe_model_forward(m, seqs + i, j - i, 0, calib_cb, &x);
        i = j;
    }
    moe_progress_end(&progress);
    free(seqs);
    if (rc == 0) {
        for (int l = 0; l < out->L; l++) {
            moe_calib_layer *cl = &out->layers[l];
            if (!cl->present) continue;
            for (int e = 0; e < out->E; e++) {
                cl->mean[e] = cl->count[e] ? cl->sum[e] / (double)cl->count[e] : NAN;
                cl->load[e] = (double)cl->count[e] / ((double)cl->tokens * out->K);
            }
            cl->entropy = cl->tokens ? x.ent[l] / (double)cl->tokens : 0.0;
        }
    }
    free(x.ent);
    if (work) {
        work->layer_tokens += tot * (uint64_t)cfg->num_layers;
        work->seconds += moe_now() - t0;
    }
    if (rc < 0) moe_calib_free(out);
    return rc;
}

/* ---- records ------------------------------------------------------------------------ */

int moe_calib_write(moe_writer *w, const moe_calib *c) {
    int ordinal = 0;
    for (int l = 0; l < c->L; l++) {
        const moe_calib_layer *cl = &c->layers[l];
        if (!cl->present) continue;
        msgpack_packer *pk = moe_writer_record(w, MOE_REC_CALIB, 10);
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
    }
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

int moe_plan_write(moe_writer *w, const moe_plan *p) {
    msgpack_packer *pk = moe_writer_record(w, MOE_REC_PLAN, p->cand ? 8 : 7);
    if (!pk) return -1;
    int64_t n = p->n, shp[2] = {p->n, p->L};
    int32_t *ord = moe_malloc(sizeof(int32_t) * (size_t)(n + 1));
    for (int i = 0; i < p->n; i++) ord[i] = p->order[i];
    moe_pack_kv_int(pk, "experts", p->k);
    moe_pack_kv_str(pk, "metric", moe_metric_name(p->metric));
    moe_pack_kv_int(pk, "max_length", p->max_length);
    moe_pack_kv_int(pk, "beam", p->beam);
    moe_pack_kv_int(pk, "layers", p->n);
    moe_pack_kv_array(pk, "order", MOE_DT_I32, 1, &n, ord);
    moe_pack_kv_array(pk, "scores", MOE_DT_F64, 1, &n, p->scores);
    if (p->cand) moe_pack_kv_array(pk, "candidates", MOE_DT_F64, 2, shp, p->cand);
    free(ord);
    return 0;
}

/* ---- work and option helpers ----------------------------------------------------------- */

void moe_search_work_str(const moe_search_work *w, char *buf, size_t n) {
    snprintf(buf, n,
             "%llu candidates, %llu layer-token evaluations, %llu expert-token evaluations, "
             "%llu token divergences, %.3g GFLOP, %.2f s",
             (unsigned long long)w->candidates, (unsigned long long)w->layer_tokens,
             (unsigned long long)w->expert_tokens, (unsigned long long)w->div_tokens,
             w->flops / 1e9, w->seconds);
    size_t len = strlen(buf);
    if (w->device_peak && len < n)
        snprintf(buf + len, n - len, ", device peak %.2f GiB", w->device_peak / 1073741824.0);
}

int moe_search_work_write(moe_writer *w, const char *tool, const moe_search_work *work) {
    msgpack_packer *pk = moe_writer_record(w, "work", 6);
    if (!pk) return -1;
    moe_pack_kv_str(pk, "tool", tool);
    moe_pack_kv_int(pk, "candidates", (int64_t)work->candidates);
    moe_pack_kv_int(pk, "layer_tokens", (int64_t)work->layer_tokens);
    moe_pack_kv_int(pk, "expert_tokens", (int64_t)work->expert_tokens);
    moe_pack_kv_int(pk, "div_tokens", (int64_t)work->div_tokens);
    moe_pack_kv_double(pk, "flops", work->flops);
    return 0;
}

int moe_parse_layer_list(const char *s, int **out, int *n) {
    int cap = 16, k = 0;
    int *v = moe_malloc(sizeof(int) * (size_t)cap);
    const char *p = s;
    while (*p) {
        char *end;
        long a = strtol(p, &end, 10), b;
        if (end == p || a < 0 || a > 1000000) goto bad;
        p = end;
        b = a;
        if (*p == '-') {
            p++;
            b = strtol(p, &end, 10);
            if (end == p || b < a || b > 1000000) goto bad;
            p = end;
        }
        for (long i = a; i <= b; i++) {
            if (k == cap) v = moe_realloc(v, sizeof(int) * (size_t)(cap *= 2));
            v[k++] = (int)i;
        }
        if (*p == ',') {
            p++;
            if (!*p) goto bad;
        } else if (*p) {
            goto bad;
        }
    }
    if (k == 0) goto bad;
    *out = v;
    *n = k;
    return 0;
bad:
    free(v);
    return -1;
}

int moe_parse_weight(const char *s, moe_weight_override *w) {
    char *end;
    long l = strtol(s, &end, 10);
    if (end == s || *end != ':' || l < 0 || l > 1000000) return -1;
    const char *p = end + 1;
    long e = strtol(p, &end, 10);
    if (end == p || *end != '=' || e < 0 || e > 1000000) return -1;
    p = end + 1;
    double v = strtod(p, &end);
    if (end == p || *end || !isfinite(v)) return -1;
    w->layer = (int)l;
    w->expert = (int)e;
    w->weight = (float)v;
    return 0;
}
