/* test_search.c - calibration, expert ranking and layer search against the
 * Python reference of the original CD-MoE (tests/ref/cdmoe_reference.py,
 * fixtures in tests/fixtures/search/<name>/), and fast == naive. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "kernels.h"
#include "search.h"

#define FIX "tests/fixtures/search/"

static const char *names[] = {"deepseek", "qwen2_moe", "qwen3_moe", "olmoe",
                              "mixtral", "deepseek-l5", "qwen2_moe-l5"};

static json_t *load_json(const char *name, const char *file) {
    char p[512];
    snprintf(p, sizeof p, FIX "%s/%s", name, file);
    json_error_t err;
    json_t *j = json_load_file(p, 0, &err);
    if (!j) fail_msg("%s: %s", p, err.text);
    return j;
}

static void seqs_from_json(json_t *arr, moe_seqs *s) {
    memset(s, 0, sizeof *s);
    s->n = (int)json_array_size(arr);
    s->ids = calloc((size_t)s->n, sizeof *s->ids);
    s->len = calloc((size_t)s->n, sizeof *s->len);
    s->sample = calloc((size_t)s->n, sizeof *s->sample);
    for (int i = 0; i < s->n; i++) {
        json_t *q = json_array_get(arr, (size_t)i);
        s->len[i] = (int)json_array_size(q);
        s->ids[i] = malloc(sizeof(int32_t) * (size_t)s->len[i]);
        for (int t = 0; t < s->len[i]; t++)
            s->ids[i][t] = (int32_t)json_integer_value(json_array_get(q, (size_t)t));
        s->sample[i] = i;
    }
}

static double num(json_t *j) { return json_is_null(j) ? NAN : json_number_value(j); }

/* |a - b| <= rtol * |b| + atol */
static void close_to(double a, double b, double rtol, double atol, const char *what) {
    if (isnan(b) && isnan(a)) return;
    if (!(fabs(a - b) <= rtol * fabs(b) + atol))
        fail_msg("%s: %.9g vs reference %.9g (rel %.2e)", what, a, b, fabs(a - b) / fabs(b));
}

typedef struct {
    const char *name;
    moe_model *m;
    moe_seqs seqs;
    json_t *params, *calib, *ranking;
    moe_calib ref_calib; /* the reference's statistics, to isolate the ranking tests */
    int max_length, top_k;
} fixture;

static void fixture_open(fixture *f, const char *name) {
    memset(f, 0, sizeof *f);
    f->name = name;
    f->params = load_json(name, "params.json");
    json_t *tok = load_json(name, "tokens.json");
    seqs_from_json(json_object_get(tok, "sequences"), &f->seqs);
    json_decref(tok);
    f->calib = load_json(name, "calib.json");
    f->ranking = load_json(name, "ranking.json");
    const char *model = json_string_value(json_object_get(f->params, "model"));
    f->m = moe_model_open(model, NULL);
    if (!f->m) fail_msg("%s: %s", model, moe_error());
    f->max_length = (int)json_integer_value(json_object_get(f->params, "search_max_length"));
    f->top_k = (int)json_integer_value(json_object_get(f->params, "top_k"));
    const moe_config *c = moe_model_config(f->m);
    moe_calib *rc = &f->ref_calib;
    rc->L = c->num_layers;
    rc->E = c->n_routed_experts;
    rc->K = c->top_k;
    rc->layers = calloc((size_t)rc->L, sizeof *rc->layers);
    const char *key;
    json_t *v;
    json_object_foreach(f->calib, key, v) {
        moe_calib_layer *cl = &rc->layers[atoi(key)];
        cl->present = 1;
        cl->sum = calloc((size_t)rc->E, sizeof(double));
        cl->count = calloc((size_t)rc->E, sizeof(int64_t));
        cl->mean = calloc((size_t)rc->E, sizeof(double));
        cl->load = calloc((size_t)rc->E, sizeof(double));
        for (int e = 0; e < rc->E; e++) {
            cl->sum[e] = num(json_array_get(json_object_get(v, "sum"), (size_t)e));
            cl->count[e] = json_integer_value(json_array_get(json_object_get(v, "count"), (size_t)e));
            cl->mean[e] = num(json_array_get(json_object_get(v, "mean"), (size_t)e));
        }
    }
}

static void fixture_close(fixture *f) {
    moe_model_close(f->m);
    moe_seqs_free(&f->seqs);
    moe_calib_free(&f->ref_calib);
    json_decref(f->params);
    json_decref(f->calib);
    json_decref(f->ranking);
}

static void check_calib(fixture *f) {
    moe_calib c;
    if (moe_calib_run(f->m, &f->seqs, 0, 0, &c, NULL) < 0) fail_msg("%s: %s", f->name, moe_error());
    const char *key;
    json_t *v;
    int nlayers = 0;
    for (int l = 0; l < c.L; l++) nlayers += c.layers[l].present;
    assert_int_equal(nlayers, (int)json_object_size(f->calib));
    json_object_foreach(f->calib, key, v) {
        int l = atoi(key);
        moe_calib_layer *cl = &c.layers[l];
        assert_true(cl->present);
        assert_int_equal(cl->tokens, json_integer_value(json_object_get(v, "tokens")));
        char what[128];
        for (int e = 0; e < c.E; e++) {
            assert_int_equal(cl->count[e],
                             json_integer_value(json_array_get(json_object_get(v, "count"), (size_t)e)));
            snprintf(what, sizeof what, "%s calib layer %d expert %d sum", f->name, l, e);
            close_to(cl->sum[e], num(json_array_get(json_object_get(v, "sum"), (size_t)e)), 1e-5,
                     1e-7, what);
            snprintf(what, sizeof what, "%s calib layer %d expert %d mean", f->name, l, e);
            close_to(cl->mean[e], num(json_array_get(json_object_get(v, "mean"), (size_t)e)), 1e-5,
                     1e-7, what);
            snprintf(what, sizeof what, "%s calib layer %d expert %d load", f->name, l, e);
            close_to(cl->load[e], num(json_array_get(json_object_get(v, "load"), (size_t)e)), 1e-12,
                     0, what);
        }
        snprintf(what, sizeof what, "%s calib layer %d entropy", f->name, l);
        close_to(cl->entropy, num(json_object_get(v, "entropy")), 1e-5, 1e-7, what);
    }
    /* one sequence at a time, or groups: the same bits */
    for (size_t bt = 1; bt <= 32; bt += 31) {
        moe_calib b;
        if (moe_calib_run(f->m, &f->seqs, 0, bt, &b, NULL) < 0) fail_msg("%s", moe_error());
        for (int l = 0; l < c.L; l++) {
            if (!c.layers[l].present) continue;
            assert_memory_equal(b.layers[l].sum, c.layers[l].sum, sizeof(double) * (size_t)c.E);
            assert_memory_equal(b.layers[l].count, c.layers[l].count, sizeof(int64_t) * (size_t)c.E);
            assert_true(b.layers[l].entropy == c.layers[l].entropy);
        }
        moe_calib_free(&b);
    }
    moe_calib_free(&c);
}

static void check_ranking(fixture *f, const moe_ranking *r, json_t *ref, const char *mode) {
    const char *key;
    json_t *v;
    char what[160];
    json_object_foreach(ref, key, v) {
        int l = atoi(key);
        const moe_rank_layer *rl = &r->layers[l];
        json_t *ex = json_object_get(v, "experts"), *sc = json_object_get(v, "scores");
        json_t *cands = json_object_get(v, "candidates");
        assert_true(rl->present);
        if (rl->n != (int)json_array_size(ex)) fail_msg("%s %s layer %d: %d picks, reference %d",
                                                         f->name, mode, l, rl->n, (int)json_array_size(ex));
        for (int i = 0; i < rl->n; i++) {
            int want = (int)json_integer_value(json_array_get(ex, (size_t)i));
            if (rl->experts[i] != want)
                fail_msg("%s %s layer %d pick %d: expert %d, reference %d", f->name, mode, l, i,
                         rl->experts[i], want);
            snprintf(what, sizeof what, "%s %s layer %d pick %d score", f->name, mode, l, i);
            close_to(rl->scores[i], num(json_array_get(sc, (size_t)i)), 3e-5, 1e-8, what);
            json_t *pc = json_array_get(cands, (size_t)i);
            for (size_t j = 0; j < json_array_size(pc); j++) {
                json_t *pair = json_array_get(pc, j);
                int e = (int)json_integer_value(json_array_get(pair, 0));
                snprintf(what, sizeof what, "%s %s layer %d pick %d candidate %d", f->name, mode, l,
                         i, e);
                close_to(rl->cand[(size_t)i * r->E + e], num(json_array_get(pair, 1)), 3e-5, 1e-8,
                         what);
            }
        }
    }
}

static void run_rank(fixture *f, int naive, moe_ranking *r, const moe_calib *calib) {
    moe_search_opts o = {.metric = MOE_DIV_JS, .max_length = f->max_length, .naive = naive,
                         .max_experts = f->top_k};
    if (moe_rank_run(f->m, &f->seqs, calib, &o, r, NULL) < 0)
        fail_msg("%s: %s", f->name, moe_error());
}

static void check_plan(fixture *f, const moe_plan *p, json_t *ref, const char *mode) {
    json_t *ord = json_object_get(ref, "order"), *sc = json_object_get(ref, "scores");
    json_t *cands = json_object_get(ref, "candidates");
    char what[160];
    if (p->n != (int)json_array_size(ord))
        fail_msg("%s %s: %d layers, reference %d", f->name, mode, p->n, (int)json_array_size(ord));
    for (int i = 0; i < p->n; i++) {
        int want = (int)json_integer_value(json_array_get(ord, (size_t)i));
        if (p->order[i] != want)
            fail_msg("%s %s step %d: layer %d, reference %d", f->name, mode, i, p->order[i], want);
        snprintf(what, sizeof what, "%s %s step %d score", f->name, mode, i);
        close_to(p->scores[i], num(json_array_get(sc, (size_t)i)), 3e-5, 1e-8, what);
        json_t *pc = json_array_get(cands, (size_t)i);
        for (size_t j = 0; j < json_array_size(pc); j++) {
            json_t *pair = json_array_get(pc, j);
            int l = (int)json_integer_value(json_array_get(pair, 0));
            snprintf(what, sizeof what, "%s %s step %d candidate layer %d", f->name, mode, i, l);
            close_to(p->cand[(size_t)i * p->L + l], num(json_array_get(pair, 1)), 3e-5, 1e-8, what);
        }
    }
}

static void test_fixture(const char *name) {
    fixture f;
    fixture_open(&f, name);
    check_calib(&f);
    moe_ranking fast, naive;
    run_rank(&f, 0, &fast, &f.ref_calib);
    check_ranking(&f, &fast, f.ranking, "fast ranking");
    run_rank(&f, 1, &naive, &f.ref_calib);
    check_ranking(&f, &naive, f.ranking, "naive ranking");
    for (int k = 0; k <= f.top_k; k += f.top_k) {
        char file[64];
        snprintf(file, sizeof file, "layers_k%d.json", k);
        json_t *ref = load_json(name, file);
        for (int nv = 0; nv < 2; nv++) {
            moe_search_opts o = {.metric = MOE_DIV_JS, .max_length = f.max_length, .naive = nv,
                                 .k = k, .beam = 1};
            moe_plan p;
            if (moe_layer_search_run(f.m, &f.seqs, &f.ref_calib, &fast, &o, &p, NULL) < 0)
                fail_msg("%s: %s", name, moe_error());
            char mode[64];
            snprintf(mode, sizeof mode, "%s layer search k=%d", nv ? "naive" : "fast", k);
            check_plan(&f, &p, ref, mode);
            moe_plan_free(&p);
        }
        json_decref(ref);
    }
    moe_ranking_free(&fast);
    moe_ranking_free(&naive);
    fixture_close(&f);
}

static void test_deepseek(void **st) { (void)st; test_fixture(names[0]); }
static void test_qwen2_moe(void **st) { (void)st; test_fixture(names[1]); }
static void test_qwen3_moe(void **st) { (void)st; test_fixture(names[2]); }
static void test_olmoe(void **st) { (void)st; test_fixture(names[3]); }
static void test_mixtral(void **st) { (void)st; test_fixture(names[4]); }
static void test_deepseek_l5(void **st) { (void)st; test_fixture(names[5]); }
static void test_qwen2_moe_l5(void **st) { (void)st; test_fixture(names[6]); }

/* Experts never routed in calibration are left out (the original's fallback
 * to routing made them win with score 0): equal to the reference's
 * unrouted="exclude" mode. */
static void test_unrouted(void **st) {
    (void)st;
    fixture f;
    fixture_open(&f, "deepseek-l5");
    json_t *tok = load_json("deepseek-l5", "unrouted/tokens.json");
    moe_seqs few, all;
    seqs_from_json(json_object_get(tok, "sequences"), &few);
    seqs_from_json(json_object_get(tok, "search_sequences"), &all);
    json_decref(tok);
    moe_calib c;
    assert_int_equal(moe_calib_run(f.m, &few, 0, 0, &c, NULL), 0);
    json_t *ref = load_json("deepseek-l5", "unrouted/ranking_exclude.json");
    moe_ranking r;
    moe_search_opts o = {.metric = MOE_DIV_JS, .max_length = f.max_length, .max_experts = f.top_k};
    for (int nv = 0; nv < 2; nv++) {
        o.naive = nv;
        if (moe_rank_run(f.m, &all, &c, &o, &r, NULL) < 0) fail_msg("%s", moe_error());
        check_ranking(&f, &r, ref, nv ? "naive unrouted" : "fast unrouted");
        int nun = 0;
        for (int l = 0; l < r.L; l++) nun += r.layers[l].present ? r.layers[l].n_unrouted : 0;
        assert_int_equal(nun, 18);
        moe_ranking_free(&r);
    }
    json_decref(ref);
    /* a user-supplied weight makes an unrouted expert a candidate again */
    moe_weight_override wo = {1, 0, 0.05f};
    o.weights = &wo;
    o.n_weights = 1;
    moe_ranking a, b;
    o.naive = 0;
    assert_int_equal(moe_rank_run(f.m, &all, &c, &o, &a, NULL), 0);
    o.naive = 1;
    assert_int_equal(moe_rank_run(f.m, &all, &c, &o, &b, NULL), 0);
    assert_int_equal(a.layers[1].n_unrouted, 3);
    assert_false(isnan(a.layers[1].cand[0]));
    close_to(a.layers[1].cand[0], b.layers[1].cand[0], 2e-5, 1e-9, "supplied weight, fast vs naive");
    assert_true(isnan(a.layers[2].cand[1])); /* layer 2 expert 1: still left out */
    moe_ranking_free(&a);
    moe_ranking_free(&b);
    moe_calib_free(&c);
    moe_seqs_free(&few);
    moe_seqs_free(&all);
    fixture_close(&f);
}

/* A tiny expert-cache budget forces the chunked path: same result. */
static void test_chunked(void **st) {
    (void)st;
    fixture f;
    fixture_open(&f, "qwen2_moe-l5");
    moe_ranking r;
    moe_search_opts o = {.metric = MOE_DIV_JS, .max_length = f.max_length, .max_experts = f.top_k,
                         .mem_bytes = 4096};
    if (moe_rank_run(f.m, &f.seqs, &f.ref_calib, &o, &r, NULL) < 0) fail_msg("%s", moe_error());
    check_ranking(&f, &r, f.ranking, "chunked ranking");
    moe_ranking_free(&r);
    fixture_close(&f);
}

/* Expert outputs all cached, none, or some (budgets): the same ranking bit
 * for bit. */
static void test_rank_budgets(void **st) {
    (void)st;
    fixture f;
    fixture_open(&f, "deepseek-l5");
    size_t tot = 0;
    for (int i = 0; i < f.seqs.n; i++)
        tot += (size_t)(f.max_length > 0 && f.seqs.len[i] > f.max_length ? f.max_length
                                                                           : f.seqs.len[i]);
    size_t per_exp = tot * (size_t)moe_model_config(f.m)->hidden_size * sizeof(float);
    size_t budgets[] = {0, 4096, 3 * per_exp, per_exp};
    moe_ranking ref;
    for (size_t bi = 0; bi < sizeof budgets / sizeof *budgets; bi++) {
        moe_search_opts o = {.metric = MOE_DIV_JS, .max_length = f.max_length,
                             .max_experts = f.top_k, .mem_bytes = budgets[bi],
                             .stream_weights = bi == 3};
        moe_ranking r;
        moe_search_work w = {0};
        if (moe_rank_run(f.m, &f.seqs, &f.ref_calib, &o, bi ? &r : &ref, &w) < 0)
            fail_msg("%s", moe_error());
        if (bi == 3) assert_int_equal(w.layer_loads, 5); /* one pass, each layer once */
        if (bi == 0) continue;
        for (int l = 0; l < r.L; l++) {
            const moe_rank_layer *a = &r.layers[l], *b = &ref.layers[l];
            assert_int_equal(a->present, b->present);
            if (!a->present) continue;
            assert_int_equal(a->n, b->n);
            assert_memory_equal(a->experts, b->experts, sizeof(int) * (size_t)a->n);
            if (memcmp(a->scores, b->scores, sizeof(double) * (size_t)a->n) ||
                memcmp(a->cand, b->cand, sizeof(double) * (size_t)(f.top_k + 1) * r.E))
                fail_msg("budget %zu: layer %d scores differ", budgets[bi], l);
        }
        moe_ranking_free(&r);
    }
    moe_ranking_free(&ref);
    fixture_close(&f);
}

/* Other metrics and beam > 1: fast == naive. */
static void test_fast_equals_naive(void **st) {
    (void)st;
    fixture f;
    fixture_open(&f, "deepseek-l5");
    for (int metric = 0; metric < 4; metric++) {
        moe_ranking a, b;
        moe_search_opts o = {.metric = metric, .max_length = f.max_length, .max_experts = 3};
        assert_int_equal(moe_rank_run(f.m, &f.seqs, &f.ref_calib, &o, &a, NULL), 0);
        o.naive = 1;
        assert_int_equal(moe_rank_run(f.m, &f.seqs, &f.ref_calib, &o, &b, NULL), 0);
        for (int l = 0; l < a.L; l++) {
            assert_int_equal(a.layers[l].present, b.layers[l].present);
            if (!a.layers[l].present) continue;
            assert_int_equal(a.layers[l].n, b.layers[l].n);
            for (int i = 0; i < a.layers[l].n; i++) {
                assert_int_equal(a.layers[l].experts[i], b.layers[l].experts[i]);
                close_to(a.layers[l].scores[i], b.layers[l].scores[i], 2e-5, 1e-9, "fast vs naive");
            }
        }
        for (int beam = 1; beam <= 3; beam += 2) {
            moe_plan p, q;
            moe_search_opts so = {.metric = metric, .max_length = f.max_length, .k = 2, .beam = beam};
            assert_int_equal(moe_layer_search_run(f.m, &f.seqs, &f.ref_calib, &a, &so, &p, NULL), 0);
            so.naive = 1;
            assert_int_equal(moe_layer_search_run(f.m, &f.seqs, &f.ref_calib, &a, &so, &q, NULL), 0);
            assert_int_equal(p.n, q.n);
            for (int i = 0; i < p.n; i++) {
                assert_int_equal(p.order[i], q.order[i]);
                close_to(p.scores[i], q.scores[i], 2e-5, 1e-9, "layer search fast vs naive");
            }
            moe_plan_free(&p);
            moe_plan_free(&q);
        }
        moe_ranking_free(&a);
        moe_ranking_free(&b);
    }
    fixture_close(&f);
}

/* The layer-major layer search (default) equals the candidate-major loop
 * bit for bit: order, scores, every candidate's score and the work counts,
 * whether layers stay loaded or are streamed, with one pass per step or a
 * budget so small that every candidate gets its own pass; and it loads
 * fewer layers when streaming. */
static int same_bits(const void *a, const void *b, size_t n) { return memcmp(a, b, n) == 0; }

static void check_same_plan(const moe_plan *a, const moe_search_work *wa, const moe_plan *b,
                            const moe_search_work *wb, const char *what) {
    if (a->n != b->n) fail_msg("%s: %d layers vs %d", what, a->n, b->n);
    if (!same_bits(a->order, b->order, sizeof(int) * (size_t)a->n))
        fail_msg("%s: order differs", what);
    if (!same_bits(a->scores, b->scores, sizeof(double) * (size_t)a->n))
        fail_msg("%s: scores differ", what);
    if ((a->cand == NULL) != (b->cand == NULL) ||
        (a->cand && !same_bits(a->cand, b->cand, sizeof(double) * (size_t)a->n * a->L)))
        fail_msg("%s: candidate scores differ", what);
    if (wa->layer_tokens != wb->layer_tokens || wa->expert_tokens != wb->expert_tokens ||
        wa->div_tokens != wb->div_tokens || wa->candidates != wb->candidates ||
        !same_bits(&wa->flops, &wb->flops, sizeof(double)))
        fail_msg("%s: work counts differ", what);
}

static void test_layer_major(void **st) {
    (void)st;
    const char *fx[] = {"deepseek-l5", "qwen2_moe-l5", "qwen3_moe"};
    for (size_t fi = 0; fi < sizeof fx / sizeof *fx; fi++) {
        fixture f;
        fixture_open(&f, fx[fi]);
        moe_ranking r;
        run_rank(&f, 0, &r, &f.ref_calib);
        size_t tot = 0;
        for (int i = 0; i < f.seqs.n; i++)
            tot += (size_t)(f.max_length > 0 && f.seqs.len[i] > f.max_length ? f.max_length
                                                                               : f.seqs.len[i]);
        size_t cand_bytes = tot * (size_t)moe_model_config(f.m)->hidden_size * sizeof(float);
        for (int k = 0; k <= f.top_k; k += f.top_k) {
            for (int beam = 1; beam <= 3; beam += 2) {
                for (int stream = 0; stream < 2; stream++) {
                    moe_search_opts o = {.metric = MOE_DIV_JS, .max_length = f.max_length, .k = k,
                                         .beam = beam, .candidate_major = 1,
                                         .stream_weights = stream};
                    moe_plan ref;
                    moe_search_work wref = {0};
                    if (moe_layer_search_run(f.m, &f.seqs, &f.ref_calib, &r, &o, &ref, &wref) < 0)
                        fail_msg("%s: %s", f.name, moe_error());
                    /* budgets: default (one pass per step), 1 and 2 candidates per pass */
                    for (int bud = 0; bud < 3; bud++) {
                        o.candidate_major = 0;
                        o.mem_bytes = bud == 0 ? 0 : (size_t)bud * cand_bytes + cand_bytes / 2;
                        moe_plan p;
                        moe_search_work w = {0};
                        if (moe_layer_search_run(f.m, &f.seqs, &f.ref_calib, &r, &o, &p, &w) < 0)
                            fail_msg("%s: %s", f.name, moe_error());
                        char what[160];
                        snprintf(what, sizeof what, "%s k=%d beam %d%s budget %d", f.name, k, beam,
                                 stream ? " streamed" : "", bud);
                        check_same_plan(&p, &w, &ref, &wref, what);
                        if (stream && bud == 0 && !(w.layer_loads < wref.layer_loads))
                            fail_msg("%s: %llu layer loads, candidate-major %llu", what,
                                     (unsigned long long)w.layer_loads,
                                     (unsigned long long)wref.layer_loads);
                        /* deepseek-l5 (dense layer 0, MoE 1-4), 4 steps: 9 + 6 + 6 + 3 */
                        if (stream && bud == 0 && beam == 1 && k > 0 && fi == 0)
                            assert_int_equal(w.layer_loads, 24);
                        moe_plan_free(&p);
                    }
                    moe_plan_free(&ref);
                }
            }
        }
        moe_ranking_free(&r);
        fixture_close(&f);
    }
}

/* Bad inputs are refused with a message. */
static void test_bad_inputs(void **st) {
    (void)st;
    fixture f;
    fixture_open(&f, "deepseek");
    moe_ranking r;
    moe_search_opts o = {.metric = MOE_DIV_JS, .max_length = 16, .max_experts = 99};
    assert_int_equal(moe_rank_run(f.m, &f.seqs, &f.ref_calib, &o, &r, NULL), -1);
    assert_non_null(strstr(moe_error(), "routed experts"));
    moe_calib empty = {0};
    o.max_experts = 2;
    assert_int_equal(moe_rank_run(f.m, &f.seqs, &empty, &o, &r, NULL), -1);
    assert_non_null(strstr(moe_error(), "moe-calib"));
    moe_plan p;
    moe_ranking none = {0};
    moe_search_opts so = {.metric = MOE_DIV_JS, .max_length = 16, .k = 2, .beam = 1};
    assert_int_equal(moe_layer_search_run(f.m, &f.seqs, &f.ref_calib, &none, &so, &p, NULL), -1);
    assert_non_null(strstr(moe_error(), "moe-expert-rank"));
    fixture_close(&f);
}

int main(void) {
    /* tiny models: threads only add synchronisation cost */
    moe_kernels_set_threads(1);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_deepseek),    cmocka_unit_test(test_qwen2_moe),
        cmocka_unit_test(test_qwen3_moe),   cmocka_unit_test(test_olmoe),
        cmocka_unit_test(test_mixtral),     cmocka_unit_test(test_deepseek_l5),
        cmocka_unit_test(test_qwen2_moe_l5), cmocka_unit_test(test_unrouted),
        cmocka_unit_test(test_chunked), cmocka_unit_test(test_rank_budgets),     cmocka_unit_test(test_fast_equals_naive),
        cmocka_unit_test(test_layer_major), cmocka_unit_test(test_bad_inputs),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
