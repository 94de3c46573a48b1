/* test_eval.c - moe-eval's scoring against tests/fixtures/eval/expected.json
 * (PyTorch + transformers + tokenizers, tests/ref/make_eval_fixtures.py):
 * per-sample NLL and both perplexities (dense and a run-time condensed
 * layer), every task file's per-choice loglik / is_greedy / pred / acc /
 * acc_norm, the harness pair encoding, batch-size invariance, reader errors. */
#include <jansson.h>

#include "common.h"
#include "eval.h"
#include "model.h"
#include "testutil.h"
#include "tokenizer.h"

#define FIX "tests/fixtures/eval"

static json_t *expected;
static moe_model *model;
static moe_tokenizer *tok;

static int setup(void **state) {
    if (tu_setup_dir(state) < 0) return -1;
    json_error_t e;
    expected = json_load_file(FIX "/expected.json", 0, &e);
    if (!expected) {
        fprintf(stderr, "expected.json: %s\n", e.text);
        return -1;
    }
    model = moe_model_open(FIX "/model", NULL);
    tok = moe_tokenizer_open(FIX "/model");
    if (!model || !tok) fprintf(stderr, "open: %s\n", moe_error());
    return model && tok ? 0 : -1;
}

static int teardown(void **state) {
    moe_tokenizer_close(tok);
    moe_model_close(model);
    json_decref(expected);
    return tu_teardown_dir(state);
}

static void assert_rel(double got, double want, double tol, const char *what) {
    double d = fabs(got - want), s = fabs(want) > 1.0 ? fabs(want) : 1.0;
    if (!(d <= tol * s)) fail_msg("%s: got %.10g, want %.10g (rel %.3g)", what, got, want, d / s);
}

/* ---- perplexity ----------------------------------------------------------------- */

typedef struct {
    int32_t **ids;
    int *T;
    int n;
} samples_t;

static void load_samples(samples_t *s) {
    json_t *arr = json_object_get(json_object_get(expected, "ppl"), "samples");
    FILE *f = fopen(FIX "/ppl_text.jsonl", "r");
    assert_non_null(f);
    char line[4096];
    s->n = 0;
    s->ids = calloc(64, sizeof(int32_t *));
    s->T = calloc(64, sizeof(int));
    while (fgets(line, sizeof line, f)) {
        json_t *o = json_loads(line, 0, NULL);
        if (!o) continue;
        json_t *t = json_object_get(o, "turns");
        t = t ? json_array_get(t, 0) : json_object_get(o, "text");
        size_t n = 0;
        assert_int_equal(moe_tokenizer_encode(tok, json_string_value(t), json_string_length(t), 1,
                                              &s->ids[s->n], &n),
                         0);
        /* our tokenizer gives the reference's ids */
        json_t *want = json_object_get(json_array_get(arr, (size_t)s->n), "ids");
        assert_int_equal(n, json_array_size(want));
        for (size_t i = 0; i < n; i++)
            assert_int_equal(s->ids[s->n][i], json_integer_value(json_array_get(want, i)));
        s->T[s->n++] = (int)n;
        json_decref(o);
    }
    fclose(f);
    assert_int_equal(s->n, json_array_size(arr));
}

static void free_samples(samples_t *s) {
    for (int i = 0; i < s->n; i++) free(s->ids[i]);
    free(s->ids);
    free(s->T);
}

static void check_ppl(const moe_ppl_result *r, json_t *ref, json_t *nlls) {
    for (int i = 0; i < r->n; i++) {
        json_t *w = json_array_get(nlls, (size_t)i);
        if (json_is_object(w)) w = json_object_get(w, "nll");
        if (json_is_null(w)) {
            assert_true(isnan(r->sample_nll[i]));
            continue;
        }
        char what[64];
        snprintf(what, sizeof what, "sample %d NLL", i);
        assert_rel(r->sample_nll[i], json_real_value(w), 1e-5, what);
    }
    assert_rel(r->ppl, json_real_value(json_object_get(ref, "ppl")), 1e-5, "ppl");
    assert_rel(r->ppl_token, json_real_value(json_object_get(ref, "ppl_token")), 1e-5,
               "ppl_token");
}

static void test_ppl(void **state) {
    (void)state;
    samples_t s;
    load_samples(&s);
    json_t *ref = json_object_get(expected, "ppl");
    moe_ppl_result r;
    assert_int_equal(moe_eval_ppl(model, (const int32_t *const *)s.ids, s.T, s.n, NULL, &r), 0);
    check_ppl(&r, ref, json_object_get(ref, "samples"));
    assert_int_equal(r.n_samples, json_integer_value(json_object_get(ref, "n_samples")));
    assert_int_equal(r.n_skipped, json_integer_value(json_object_get(ref, "n_skipped")));
    assert_int_equal(r.n_tokens, json_integer_value(json_object_get(ref, "n_tokens")));
    /* one sequence per batch: the same, bit for bit */
    moe_eval_opts o = {.batch_tokens = 1};
    moe_ppl_result r1;
    assert_int_equal(moe_eval_ppl(model, (const int32_t *const *)s.ids, s.T, s.n, &o, &r1), 0);
    for (int i = 0; i < s.n; i++)
        if (!isnan(r.sample_nll[i])) assert_memory_equal(&r.sample_nll[i], &r1.sample_nll[i], 8);
    moe_ppl_result_free(&r1);
    moe_ppl_result_free(&r);
    free_samples(&s);
}

static void test_ppl_condensed(void **state) {
    (void)state;
    samples_t s;
    load_samples(&s);
    json_t *ref = json_object_get(json_object_get(expected, "ppl"), "condensed");
    int layer = (int)json_integer_value(json_object_get(ref, "layer"));
    json_t *je = json_object_get(ref, "experts"), *jw = json_object_get(ref, "weights");
    int n = (int)json_array_size(je), ex[16];
    float w[16];
    for (int i = 0; i < n; i++) {
        ex[i] = (int)json_integer_value(json_array_get(je, (size_t)i));
        w[i] = (float)json_real_value(json_array_get(jw, (size_t)i));
    }
    assert_int_equal(moe_model_condense_layer(model, layer, n, ex, w), 0);
    moe_ppl_result r;
    int rc = moe_eval_ppl(model, (const int32_t *const *)s.ids, s.T, s.n, NULL, &r);
    moe_model_restore_layer(model, layer);
    assert_int_equal(rc, 0);
    check_ppl(&r, ref, json_object_get(ref, "sample_nll"));
    moe_ppl_result_free(&r);
    free_samples(&s);
}

/* ---- tasks ------------------------------------------------------------------------ */

static void test_tasks(void **state) {
    (void)state;
    json_t *tasks = json_object_get(expected, "tasks");
    assert_true(json_array_size(tasks) >= 8);
    for (size_t ti = 0; ti < json_array_size(tasks); ti++) {
        json_t *et = json_array_get(tasks, ti);
        char path[512];
        snprintf(path, sizeof path, FIX "/%s", json_string_value(json_object_get(et, "file")));
        moe_task *t = moe_task_load(path, NULL, NULL, 0);
        if (!t) fail_msg("%s: %s", path, moe_error());
        assert_string_equal(t->name, json_string_value(json_object_get(et, "task")));
        json_t *items = json_object_get(et, "items");
        assert_int_equal(t->n_items, json_array_size(items));
        moe_task_opts to = {0};
        json_t *ml = json_object_get(et, "max_length");
        if (ml) to.max_length = (int)json_integer_value(ml);
        moe_task_result r;
        if (moe_eval_task(model, tok, t, &to, NULL, &r) < 0) fail_msg("%s: %s", path, moe_error());
        for (int i = 0; i < t->n_items; i++) {
            json_t *it = json_array_get(items, (size_t)i);
            json_t *ll = json_object_get(it, "loglik"), *gr = json_object_get(it, "greedy");
            json_t *enc = json_object_get(it, "encodings");
            assert_int_equal(t->items[i].n, json_array_size(ll));
            assert_int_equal(t->items[i].gold, json_integer_value(json_object_get(it, "gold")));
            for (int j = 0; j < t->items[i].n; j++) {
                char what[600];
                snprintf(what, sizeof what, "%s item %d choice %d loglik", path, i, j);
                assert_rel(r.loglik[r.choice_off[i] + j],
                           json_real_value(json_array_get(ll, (size_t)j)), 1e-5, what);
                assert_int_equal(r.greedy[r.choice_off[i] + j],
                                 json_is_true(json_array_get(gr, (size_t)j)));
                /* the harness's pair encoding (contexts that are not empty) */
                json_t *e = json_array_get(enc, (size_t)j);
                if (t->items[i].ctx[j][0] && !ml) {
                    int32_t *ids = NULL;
                    size_t n = 0, nctx = 0;
                    assert_int_equal(moe_eval_encode_pair(tok, t->items[i].ctx[j],
                                                          t->items[i].cont[j], 0, &ids, &n, &nctx),
                                     0);
                    json_t *ci = json_object_get(e, "cont_ids");
                    if (nctx > 0) {
                        assert_int_equal(nctx, json_integer_value(json_object_get(e, "ctx_tokens")));
                        assert_int_equal(n - nctx, json_array_size(ci));
                        for (size_t k = 0; k < n - nctx; k++)
                            assert_int_equal(ids[nctx + k],
                                             json_integer_value(json_array_get(ci, k)));
                    }
                    free(ids);
                }
            }
            assert_int_equal(r.pred[i], json_integer_value(json_object_get(it, "pred")));
            if (t->has_acc_norm)
                assert_int_equal(r.pred_norm[i],
                                 json_integer_value(json_object_get(it, "pred_norm")));
        }
        assert_rel(r.acc, json_real_value(json_object_get(et, "acc")), 1e-12, "acc");
        json_t *an = json_object_get(et, "acc_norm");
        if (an) assert_rel(r.acc_norm, json_real_value(an), 1e-12, "acc_norm");
        else assert_true(isnan(r.acc_norm));
        json_t *pp = json_object_get(et, "perplexity");
        if (pp) assert_rel(r.perplexity, json_real_value(pp), 1e-4, "perplexity");
        moe_task_result_free(&r);
        moe_task_free(t);
    }
}

/* ---- readers ----------------------------------------------------------------------- */

static const char *write_tmp(const char *name, const char *text) {
    const char *p = tu_path(name);
    tu_write_text(p, text);
    return p;
}

static void expect_load_error(const char *name, const char *text, const char *fmt,
                              const char *needle) {
    const char *p = write_tmp(name, text);
    moe_task *t = moe_task_load(p, fmt, NULL, 0);
    if (t) fail_msg("%s: loaded, expected an error containing '%s'", name, needle);
    if (!strstr(moe_error(), needle)) fail_msg("%s: error '%s' lacks '%s'", name, moe_error(), needle);
    remove(p);
}

static void test_readers(void **state) {
    (void)state;
    /* formats and delimiters */
    const char *p = write_tmp("arc_easy.jsonl",
                              "{\"query\": \"Question: Q?\", \"choices\": [\"a\", \"bb\"], \"gold\": 1}\n");
    moe_task *t = moe_task_load(p, NULL, NULL, 0);
    assert_non_null(t);
    assert_string_equal(t->format, "mc");
    assert_string_equal(t->name, "arc_easy");
    assert_string_equal(t->items[0].cont[1], "\nAnswer: bb"); /* MosaicML's delimiter */
    assert_int_equal(t->items[0].norm_len[1], 2);
    moe_task_free(t);
    t = moe_task_load(p, NULL, "|", 0);
    assert_string_equal(t->items[0].cont[0], "|a");
    moe_task_free(t);
    remove(p);
    /* winogrande: partial scoring */
    t = moe_task_load(FIX "/formats/winogrande/dev.jsonl", NULL, NULL, 1);
    assert_non_null(t);
    assert_int_equal(t->n_items, 1);
    assert_string_equal(t->items[0].ctx[1], "The glass fell on the pillow and the pillow");
    assert_string_equal(t->items[0].cont[1], " did not break.");
    moe_task_free(t);
    /* hellaswag preprocess */
    t = moe_task_load(FIX "/formats/hellaswag/hellaswag_tiny.txt", NULL, NULL, 0);
    assert_non_null(t);
    assert_string_equal(t->items[0].cont[0], " flies to the moon. quickly.");
    assert_string_equal(t->items[0].cont[1], " sings to the pan loudly.");
    moe_task_free(t);
    /* the norm length counts characters, not bytes */
    p = write_tmp("u.jsonl", "{\"query\": \"q\", \"choices\": [\"\xc3\xa9t\xc3\xa9\"], \"gold\": 0}\n");
    t = moe_task_load(p, NULL, NULL, 0);
    assert_int_equal(t->items[0].norm_len[0], 3);
    moe_task_free(t);
    remove(p);
    /* errors name the file and line */
    expect_load_error("g.jsonl", "{\"query\": \"q\", \"choices\": [\"a\"], \"gold\": 3}\n", NULL,
                      "line 1: gold 3 out of range");
    expect_load_error("j.jsonl", "{\"query\": \"q\", \"choices\": [\"a\"], \"gold\": 0}\n{oops\n",
                      NULL, "line 2");
    expect_load_error("x.jsonl", "{\"foo\": 1}\n", NULL, "cannot tell the task format");
    expect_load_error("m.jsonl", "{\"query\": \"q\", \"gold\": 0}\n", "mc", "'choices'");
    expect_load_error("p.jsonl", "{\"goal\": \"g\", \"sol1\": \"a\", \"sol2\": \"b\"}\n", NULL,
                      "labels file");
    expect_load_error("h.txt", "ctx\n7\na\nb\nc\nd\n", NULL, "label '7'");
    expect_load_error("h2.txt", "ctx\n1\na\n", NULL, "not a multiple of 6");
    expect_load_error("r.tsv", "a\tb\n", NULL, "sentence1, sentence2, label");
    expect_load_error("w.jsonl",
                      "{\"sentence\": \"no blank\", \"option1\": \"a\", \"option2\": \"b\", "
                      "\"answer\": \"1\"}\n",
                      NULL, "no '_'");
    expect_load_error("e.jsonl", "\n", "mc", "no items");
    assert_null(moe_task_load(FIX "/nonexistent.jsonl", NULL, NULL, 0));
    assert_int_equal(moe_error_kind(), MOE_ERR_IO);
    assert_null(moe_task_load(FIX "/tiny_task.jsonl", "bogus", NULL, 0));
}

static void test_sizes(void **state) {
    (void)state;
    uint64_t p = 0, b = 0;
    assert_int_equal(moe_eval_model_size(model, &p, &b), 0);
    assert_true(p > 0);
    assert_int_equal(b, 4 * p); /* float32 checkpoint */
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ppl),     cmocka_unit_test(test_ppl_condensed),
        cmocka_unit_test(test_tasks),   cmocka_unit_test(test_readers),
        cmocka_unit_test(test_sizes),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
