/* test_records.c - lib/records.c: the plan's weights written and read back
 * and used by moe-condense's plan (cplan), plans older than the key, the
 * tokenizer fingerprint recorded and checked, and moe-dump --cdmoe-json on
 * hostile plan records (a double free). */
#include "cdmoe_export.h"
#include "common.h"
#include "config.h"
#include "cplan.h"
#include "records.h"
#include "testutil.h"

#define MODEL "tests/fixtures/search/models/deepseek-l5" /* 5 layers, MoE 1..4, 8 experts */

static moe_writer *open_out(const char *path) {
    moe_provenance prov = {.tool = "test-records", .argc = 0, .argv = NULL, .kind = "plan"};
    moe_writer *w = moe_writer_open(path, NULL, &prov, 1);
    if (!w) fail_msg("%s", moe_error());
    return w;
}

static moe_reader *open_in(const char *path) {
    moe_reader *r = moe_reader_open(path);
    if (!r) fail_msg("%s", moe_error());
    return r;
}

/* calib records for layers 1..4: every expert routed once with weight (l + e) / 100,
 * except expert 4 of layer 3 (never routed) */
static void write_calib(moe_writer *w) {
    moe_calib c;
    moe_calib_init(&c, 5, 8, 2);
    for (int l = 1; l < 5; l++) {
        moe_calib_layer_init(&c.layers[l], 8);
        for (int e = 0; e < 8; e++) {
            int routed = !(l == 3 && e == 4);
            c.layers[l].count[e] = routed;
            c.layers[l].sum[e] = routed ? (l + e) / 100.0 : 0;
            c.layers[l].mean[e] = routed ? (l + e) / 100.0 : NAN;
        }
    }
    assert_int_equal(moe_calib_write(w, &c), 0);
    moe_calib_free(&c);
}

/* rankings: experts 4, 0, 1, ... in every MoE layer */
static void write_ranking(moe_writer *w) {
    moe_ranking rk = {.L = 5, .E = 8};
    rk.layers = moe_calloc(5, sizeof *rk.layers);
    for (int l = 1; l < 5; l++) {
        moe_rank_layer *rl = &rk.layers[l];
        rl->present = 1;
        rl->n = 3;
        rl->experts = moe_malloc(3 * sizeof(int));
        rl->scores = moe_calloc(3, sizeof(double));
        rl->cand = moe_calloc(3 * 8, sizeof(double));
        rl->unrouted = moe_malloc(sizeof(int));
        for (int j = 0; j < 3; j++) rl->experts[j] = j == 0 ? 4 : j - 1;
    }
    assert_int_equal(moe_ranking_write(w, &rk), 0);
    moe_ranking_free(&rk);
}

/* a plan of order {3, 1}, k = 2; with_weights: the weights the search scored */
static void write_plan(moe_writer *w, int with_weights) {
    int order[2] = {3, 1};
    double scores[2] = {0.1, 0.2};
    float weights[4] = {0.05f, 0.25f, 0.5f, 0.75f};
    moe_plan p = {.present = 1, .k = 2, .n = 2, .order = order, .scores = scores,
                  .weights = with_weights ? weights : NULL, .L = 5, .beam = 1};
    assert_int_equal(moe_plan_write(w, &p), 0);
}

static moe_cplan *read_cplan(const char *path, moe_config **cfg) {
    *cfg = moe_config_load(MODEL);
    if (!*cfg) fail_msg("%s", moe_error());
    moe_cplan *p = moe_cplan_new(*cfg);
    moe_reader *r = open_in(path);
    if (moe_cplan_read_stream(p, *cfg, r) < 0) fail_msg("%s", moe_error());
    moe_reader_close(r);
    return p;
}

static void test_plan_weights(void **state) {
    (void)state;
    const char *path = tu_path("plan.zst");
    moe_writer *w = open_out(path);
    write_calib(w);
    write_ranking(w);
    write_plan(w, 1);
    assert_int_equal(moe_writer_close(w), 0);

    /* read back as records */
    moe_reader *r = open_in(path);
    moe_records_opts o = {5, 8, NULL};
    moe_plan plan;
    assert_int_equal(moe_records_collect(r, NULL, &o, NULL, NULL, NULL, &plan), 0);
    moe_reader_close(r);
    assert_true(plan.present);
    assert_int_equal(plan.k, 2);
    assert_int_equal(plan.n, 2);
    assert_int_equal(plan.order[0], 3);
    assert_non_null(plan.weights);
    assert_true(plan.weights[0] == 0.05f && plan.weights[3] == 0.75f);
    moe_plan_free(&plan);

    /* moe-condense takes the plan's weights, even for an expert calibration never routed */
    moe_config *cfg;
    moe_cplan *cp = read_cplan(path, &cfg);
    int layers[2], experts[4];
    float wt[4];
    if (moe_cplan_select(cp, 2, 2, layers, experts, wt) < 0) fail_msg("%s", moe_error());
    assert_int_equal(layers[0], 3);
    assert_int_equal(experts[0], 4);
    assert_int_equal(experts[1], 0);
    assert_true(wt[0] == 0.05f && wt[1] == 0.25f && wt[2] == 0.5f && wt[3] == 0.75f);
    moe_cplan_free(cp);
    moe_config_free(cfg);
}

static void test_plan_without_weights(void **state) {
    (void)state;
    /* a plan from before the "weights" key: the calib means, and the
     * unrouted expert is refused as before */
    const char *path = tu_path("old-plan.zst");
    moe_writer *w = open_out(path);
    write_calib(w);
    write_ranking(w);
    write_plan(w, 0);
    assert_int_equal(moe_writer_close(w), 0);
    moe_config *cfg;
    moe_cplan *cp = read_cplan(path, &cfg);
    int layers[2], experts[4];
    float wt[4];
    assert_int_equal(moe_cplan_select(cp, 2, 2, layers, experts, wt), -1);
    assert_non_null(strstr(moe_error(), "layer 3: expert 4 has no mean routing weight"));
    /* with layer 1 first in the order (all its experts routed): the calib means */
    cp->order[0] = 1;
    if (moe_cplan_select(cp, 1, 2, layers, experts, wt) < 0) fail_msg("%s", moe_error());
    assert_true(wt[0] == (float)((1 + 4) / 100.0) && wt[1] == (float)((1 + 0) / 100.0));
    moe_cplan_free(cp);
    moe_config_free(cfg);
}

/* moe-dump --cdmoe-json order on a plan record followed by one without
 * "order": an error, not a double free */
static void test_export_plan_without_order(void **state) {
    (void)state;
    const char *path = tu_path("two-plans.zst");
    moe_writer *w = open_out(path);
    write_calib(w);
    write_plan(w, 1);
    msgpack_packer *pk = moe_writer_record(w, MOE_REC_PLAN, 1);
    moe_pack_kv_int(pk, "experts", 2);
    assert_int_equal(moe_writer_close(w), 0);
    moe_reader *r = open_in(path);
    FILE *out = fopen(tu_path("order.json"), "w");
    assert_non_null(out);
    assert_int_equal(moe_cdmoe_export(r, "order", out), -1);
    assert_non_null(strstr(moe_error(), "order"));
    fclose(out);
    moe_reader_close(r);

    /* the first plan alone exports: MoE ordinals of layers 3, 1 */
    w = open_out(path);
    write_calib(w);
    write_plan(w, 1);
    assert_int_equal(moe_writer_close(w), 0);
    r = open_in(path);
    out = fopen(tu_path("order.json"), "w");
    assert_int_equal(moe_cdmoe_export(r, "order", out), 0);
    fclose(out);
    moe_reader_close(r);
    size_t len;
    char *text = tu_read_file(tu_path("order.json"), &len);
    assert_string_equal(text, "[2, 0]\n");
    free(text);
}

static void test_tokens_fingerprint(void **state) {
    (void)state;
    char fp[65], other[65];
    assert_int_equal(moe_tokenizer_fingerprint("tests/fixtures/eval/model", fp), 1);
    assert_int_equal(moe_tokenizer_fingerprint("tests/fixtures/eval/model/tokenizer.json", other), 1);
    assert_string_equal(fp, other);
    assert_int_equal(strlen(fp), 64);
    assert_int_equal(moe_tokenizer_fingerprint(MODEL, other), 0); /* no tokenizer.json */
    assert_int_equal(moe_tokenizer_fingerprint("tests/fixtures/tokenizer/synth-llama", other), 1);
    assert_string_not_equal(fp, other);

    const char *path = tu_path("tokens.zst");
    moe_writer *w = open_out(path);
    int32_t ids[3] = {5, 6, 7};
    assert_int_equal(moe_tokens_write(w, 0, ids, 3, fp), 0);    /* this tokenizer */
    assert_int_equal(moe_tokens_write(w, 1, ids, 3, NULL), 0);  /* unknown (older streams, --ids) */
    assert_int_equal(moe_tokens_write(w, 2, ids, 3, other), 0); /* another tokenizer */
    assert_int_equal(moe_tokens_write(w, 3, ids, 0, fp), 0);    /* empty */
    assert_int_equal(moe_writer_close(w), 0);

    moe_tokens_check check, none;
    assert_int_equal(moe_tokens_check_init(&check, "tests/fixtures/eval/model", 0), 0);
    assert_int_equal(moe_tokens_check_init(&none, MODEL, 0), 0);
    for (int pass = 0; pass < 3; pass++) { /* model's tokenizer; --force; a model without tokenizer.json */
        moe_tokens_check *c = pass == 2 ? &none : &check;
        check.force = pass == 1;
        moe_reader *r = open_in(path);
        const msgpack_object *rec;
        int i = 0;
        while (moe_reader_next(r, &rec) > 0) {
            moe_tokens t;
            int rc = moe_tokens_read(r, rec, c, &t);
            int want_ok = i < 2 || (i == 2 && pass > 0); /* the empty one: never */
            assert_int_equal(rc, want_ok ? 0 : -1);
            if (rc == 0) {
                assert_int_equal(t.index, i);
                assert_int_equal(t.n, 3);
                assert_int_equal(t.ids[2], 7);
                free(t.ids);
            } else if (i == 2) {
                if (!strstr(moe_error(), "record 2: tokens were made with tokenizer")) fail_msg("%s", moe_error());
                assert_non_null(strstr(moe_error(), "--force"));
            }
            i++;
        }
        moe_reader_close(r);
    }
    /* without a model (moe-tokenize --decode) every record reads */
    moe_reader *r = open_in(path);
    const msgpack_object *rec;
    int n = 0;
    while (moe_reader_next(r, &rec) > 0) {
        moe_tokens t;
        assert_int_equal(moe_tokens_read(r, rec, NULL, &t), 0);
        free(t.ids);
        n++;
    }
    assert_int_equal(n, 4);
    moe_reader_close(r);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_plan_weights),
        cmocka_unit_test(test_plan_without_weights),
        cmocka_unit_test(test_export_plan_without_order),
        cmocka_unit_test(test_tokens_fingerprint),
    };
    return cmocka_run_group_tests(tests, tu_setup_dir, tu_teardown_dir);
}
