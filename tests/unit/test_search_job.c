/* test_search_job.c - the set-up the search tools share (lib/search_job.c):
 * input records collected and copied, kinds required, the output closed
 * with a work record, or removed on failure; --weight values appended. */
#include "common.h"
#include "search_job.h"
#include "testutil.h"

#define MODEL "tests/fixtures/search/models/deepseek-l5"
#define TOKENS "tests/fixtures/search/deepseek-l5/tokens.msgpack.zst"

static void open_model(moe_search_job *j) {
    moe_model_opts mo = {.device = "cpu"};
    moe_model_set_threads(1);
    if (moe_search_job_model(j, MODEL, &mo) < 0) fail_msg("%s", moe_error());
    assert_non_null(j->model);
    assert_int_equal(j->cfg->num_layers, moe_model_config(j->model)->num_layers);
}

static void test_open_finish(void **state) {
    (void)state;
    char *argv[] = {"test-search-job", "x"};
    moe_search_job j = {.tool = "test-search-job", .kind = "testkind", .argc = 2, .argv = argv};
    open_model(&j);
    const char *out = tu_path("out.zst");
    if (moe_search_job_open(&j, TOKENS, out, 0, 0) < 0) fail_msg("%s", moe_error());
    assert_true(j.seqs.n > 0);
    assert_null(j.calib.layers);   /* not asked for */
    assert_null(j.ranking.layers);
    j.work.candidates = 7;
    assert_int_equal(moe_search_job_finish(&j), 0);
    assert_null(j.out);
    moe_search_job_abort(&j); /* nothing left to abort */
    int nseqs = j.seqs.n;
    moe_search_job_close(&j);
    assert_null(j.model);

    /* the output: input records copied, then the work record; kind and provenance added */
    moe_reader *r = moe_reader_open(out);
    if (!r) fail_msg("%s", moe_error());
    const msgpack_object *h = moe_reader_header(r);
    assert_true(moe_header_has_kind(h, "tokens"));
    assert_true(moe_header_has_kind(h, "testkind"));
    const msgpack_object *pv = moe_map_get(h, "provenance");
    assert_non_null(pv);
    const msgpack_object *last = &pv->via.array.ptr[pv->via.array.size - 1];
    assert_true(moe_obj_streq(moe_map_get(last, "tool"), "test-search-job"));
    const msgpack_object *rec;
    int rc, tokens = 0, work = 0;
    while ((rc = moe_reader_next(r, &rec)) > 0) {
        if (moe_record_is(rec, MOE_REC_TOKENS)) {
            assert_int_equal(work, 0);
            tokens++;
        } else if (moe_record_is(rec, "work")) {
            int64_t c;
            assert_int_equal(moe_record_int(r, rec, "candidates", &c), 0);
            assert_int_equal(c, 7);
            work++;
        }
    }
    assert_int_equal(rc, 0);
    assert_int_equal(tokens, nseqs);
    assert_int_equal(work, 1);
    moe_reader_close(r);
}

/* a kind the input lacks: refused before any output is opened */
static void test_need(void **state) {
    (void)state;
    moe_search_job j = {.tool = "t", .kind = "k", .need = MOE_SEARCH_IN_CALIB};
    open_model(&j);
    const char *out = tu_path("need.zst");
    assert_int_equal(moe_search_job_open(&j, TOKENS, out, 0, 0), -1);
    assert_non_null(strstr(moe_error(), "'calib' is needed (make it with moe-calib)"));
    assert_null(j.out);
    moe_search_job_close(&j);
    assert_false(tu_dir_has("need"));
}

/* a record that cannot be read: the output opened is removed */
static void test_bad_record_removes_output(void **state) {
    (void)state;
    const char *in = tu_path("badrec.zst");
    moe_provenance prov = {.tool = "moe-tokenize", .kind = MOE_REC_TOKENS};
    moe_writer *w = moe_writer_open(in, NULL, &prov, 1);
    assert_non_null(w);
    msgpack_packer *pk = moe_writer_record(w, MOE_REC_TOKENS, 2);
    moe_pack_kv_int(pk, "index", 0);
    moe_pack_kv_str(pk, "ids", "not an array");
    assert_int_equal(moe_writer_close(w), 0);
    moe_search_job j = {.tool = "t", .kind = "k"};
    open_model(&j);
    assert_int_equal(moe_search_job_open(&j, in, tu_path("out-bad.zst"), 0, 0), -1);
    assert_non_null(strstr(moe_error(), "badrec.zst"));
    assert_null(j.out);
    moe_search_job_close(&j);
    assert_false(tu_dir_has("out-bad"));
}

static void test_add_weight(void **state) {
    (void)state;
    moe_weight_override *w = NULL;
    int n = 0;
    assert_int_equal(moe_search_add_weight(&w, &n, "1:2=0.5"), 0);
    assert_int_equal(moe_search_add_weight(&w, &n, "3:4=0.25"), 0);
    assert_int_equal(moe_search_add_weight(&w, &n, "1:2"), -1);
    assert_int_equal(n, 2);
    assert_int_equal(w[1].layer, 3);
    assert_int_equal(w[1].expert, 4);
    assert_true(w[1].weight == 0.25f);
    assert_true(w[0].weight == 0.5f);
    free(w);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_open_finish),
        cmocka_unit_test(test_need),
        cmocka_unit_test(test_bad_record_removes_output),
        cmocka_unit_test(test_add_weight),
    };
    return cmocka_run_group_tests(tests, tu_setup_dir, tu_teardown_dir);
}
