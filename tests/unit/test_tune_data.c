/* test_tune_data.c - moe-tune's training data (lib/tune_data.c): the three
 * JSON shapes and what is trained on, the original's instances file, token
 * streams, truncation, errors naming the line, the epoch order. */
#include "records.h"
#include "stream.h"
#include "tune_data.h"
#include "common.h"
#include "testutil.h"

#define MODEL "tests/fixtures/eval/model" /* byte-level BPE, BOS = EOS = 316 */
#define BOS 316

static moe_tokenizer *tok;

static int setup(void **state) {
    tok = moe_tokenizer_open(MODEL);
    return tok ? tu_setup_dir(state) : -1;
}

static int teardown(void **state) {
    moe_tokenizer_close(tok);
    return tu_teardown_dir(state);
}

static moe_tune_data_opts opts(int max_length) {
    return (moe_tune_data_opts){.tok = tok, .model_dir = MODEL, .max_length = max_length, .vocab = 317, .eos_id = BOS};
}

/* ids of text without special tokens */
static size_t encode(const char *text, int32_t **ids) {
    size_t n;
    assert_int_equal(moe_tokenizer_encode(tok, text, strlen(text), 0, ids, &n), 0);
    return n;
}

static int load_text(moe_tune_data *d, const char *text, int max_length) {
    const char *p = tu_path("d.jsonl");
    tu_write_text(p, text);
    moe_tune_data_opts o = opts(max_length);
    return moe_tune_data_load(d, p, &o);
}

static void test_text_trains_everything(void **state) {
    (void)state;
    moe_tune_data d;
    assert_int_equal(load_text(&d, "{\"text\": \"hello world\"}\n\n", 0), 0);
    int32_t *ids;
    size_t n = encode("hello world", &ids);
    assert_int_equal(d.n, 1);
    moe_tune_seq *q = &d.seqs[0];
    assert_int_equal(q->len, (int)n + 1);
    assert_int_equal(q->ids[0], BOS);
    for (size_t i = 0; i < n; i++) {
        assert_int_equal(q->ids[i + 1], ids[i]);
        assert_int_equal(q->targets[i], ids[i]); /* shifted: position i predicts token i+1 */
    }
    assert_int_equal(q->targets[n], -100);
    assert_int_equal(q->ntargets, (long)n);
    assert_int_equal(d.ntargets, (long)n);
    free(ids);
    moe_tune_data_free(&d);
}

static void test_prompt_response_trains_the_response(void **state) {
    (void)state;
    moe_tune_data d;
    assert_int_equal(load_text(&d, "{\"prompt\": \"Q: two?\", \"response\": \" yes\"}\n", 0), 0);
    int32_t *p, *r;
    size_t np = encode("Q: two?", &p), nr = encode(" yes", &r);
    moe_tune_seq *q = &d.seqs[0];
    assert_int_equal(q->len, (int)(1 + np + nr + 1)); /* BOS prompt response EOS */
    for (size_t t = 0; t < np; t++) assert_int_equal(q->targets[t], -100); /* predicting the prompt */
    for (size_t i = 0; i < nr; i++) assert_int_equal(q->targets[np + i], r[i]);
    assert_int_equal(q->targets[np + nr], BOS); /* the EOS after the response */
    assert_int_equal(q->ntargets, (long)nr + 1);
    free(p);
    free(r);
    moe_tune_data_free(&d);
}

static void test_turns_train_the_assistant(void **state) {
    (void)state;
    moe_tune_data d;
    assert_int_equal(load_text(&d, "{\"turns\": [{\"role\": \"user\", \"content\": \"hi\"}, "
                                   "{\"role\": \"assistant\", \"content\": \"ok\"}]}\n", 0), 0);
    int32_t *a, *b, *c, *e;
    size_t na = encode("user: ", &a), nb = encode("hi\n", &b), nc = encode("assistant: ", &c), ne = encode("ok\n", &e);
    moe_tune_seq *q = &d.seqs[0];
    assert_int_equal(q->len, (int)(1 + na + nb + nc + ne + 1));
    size_t first = 1 + na + nb + nc; /* first assistant content token */
    long counted = 0;
    for (int t = 0; t < q->len; t++) {
        int trained = (size_t)t + 1 >= first;
        assert_int_equal(q->targets[t] >= 0, trained && t + 1 < q->len);
        counted += q->targets[t] >= 0;
    }
    assert_int_equal(counted, (long)ne + 1);
    assert_int_equal(q->ids[q->len - 1], BOS);
    free(a), free(b), free(c), free(e);
    moe_tune_data_free(&d);
}

static void test_ids(void **state) {
    (void)state;
    moe_tune_data d;
    moe_tune_data_opts o = opts(3);
    o.tok = NULL; /* ids need no tokenizer */
    const char *p = tu_path("ids.jsonl");
    tu_write_text(p, "{\"ids\": [4, 5, 6, 7]}\n{\"ids\": [9, 8]}\n");
    assert_int_equal(moe_tune_data_load(&d, p, &o), 0);
    assert_int_equal(d.n, 2);
    assert_int_equal(d.seqs[0].len, 3); /* cut to max_length */
    int32_t want[3] = {5, 6, -100};
    assert_memory_equal(d.seqs[0].targets, want, sizeof want);
    assert_int_equal(d.seqs[1].targets[0], 8);
    assert_int_equal(d.ntargets, 3);
    moe_tune_data_free(&d);
}

static void test_instances_and_truncation(void **state) {
    (void)state;
    const char *p = tu_path("inst.json");
    tu_write_text(p, "{\"instances\": [{\"text\": \"one two three four five six\"}, {\"text\": \"x\"}]}");
    moe_tune_data d;
    moe_tune_data_opts o = opts(4);
    assert_int_equal(moe_tune_data_load(&d, p, &o), 0);
    assert_int_equal(d.n, 2);
    assert_int_equal(d.seqs[0].len, 4);
    assert_int_equal(d.seqs[0].ntargets, 3);
    assert_int_equal(d.seqs[0].targets[3], -100);
    moe_tune_data_free(&d);
}

static void test_token_stream(void **state) {
    (void)state;
    const char *p = tu_path("t.msgpack.zst");
    moe_provenance prov = {.tool = "test", .kind = "tokens"};
    moe_writer *w = moe_writer_open(p, NULL, &prov, 1);
    assert_non_null(w);
    int32_t a[] = {5, 6, 7}, b[] = {9, 10};
    assert_int_equal(moe_tokens_write(w, 0, a, 3, NULL), 0);
    assert_int_equal(moe_tokens_write(w, 1, b, 2, NULL), 0);
    assert_int_equal(moe_writer_close(w), 0);
    moe_tune_data d;
    moe_tune_data_opts o = opts(0);
    assert_int_equal(moe_tune_data_load(&d, p, &o), 0);
    assert_int_equal(d.n, 2);
    assert_int_equal(d.seqs[0].len, 3);
    assert_int_equal(d.seqs[0].targets[0], 6);
    assert_int_equal(d.seqs[0].targets[1], 7);
    assert_int_equal(d.seqs[1].targets[0], 10);
    assert_int_equal(d.ntargets, 3);
    moe_tune_data_free(&d);
}

static void expect_error(const char *text, const char *message) {
    moe_tune_data d;
    moe_error_clear();
    assert_int_equal(load_text(&d, text, 0), -1);
    if (!strstr(moe_error(), message)) fail_msg("error '%s' lacks '%s'", moe_error(), message);
    assert_int_equal(d.n, 0);
}

static void test_errors(void **state) {
    (void)state;
    expect_error("{\"text\": \"a\"}\n{\"text\": 3", "d.jsonl: line 2: not JSON");
    expect_error("{\"text\": 3}", "d.jsonl: line 1: 'text' is not a string");
    expect_error("{\"prompt\": \"a\"}", "line 1: 'response' is missing");
    expect_error("{\"turns\": [{\"role\": \"user\", \"content\": \"a\"}]}", "line 1: no \"assistant\" turn");
    expect_error("{\"turns\": [{\"role\": \"user\"}]}", "line 1: turns[0].content is missing");
    expect_error("{\"other\": 1}", "line 1: no 'text', 'prompt', 'turns' or 'ids' field");
    expect_error("{\"ids\": [1, -2]}", "line 1: ids[1] is not a token id");
    expect_error("[1]", "line 1: not a JSON object");
    expect_error("\n\n", "d.jsonl: no samples");
    moe_tune_data d;
    moe_tune_data_opts o = opts(0);
    o.vocab = 300; /* BOS 316 is then outside */
    const char *p = tu_path("v.jsonl");
    tu_write_text(p, "{\"text\": \"a\"}");
    assert_int_equal(moe_tune_data_load(&d, p, &o), -1);
    assert_non_null(strstr(moe_error(), "v.jsonl: line 1: token id 316 is outside the model's vocabulary (300)"));
}

static void test_epoch_order(void **state) {
    (void)state;
    int a[50], b[50], c[50], seen[50] = {0};
    moe_tune_epoch_order(a, 50, 7, 0, 1);
    moe_tune_epoch_order(b, 50, 7, 0, 1);
    moe_tune_epoch_order(c, 50, 7, 1, 1);
    assert_memory_equal(a, b, sizeof a); /* (seed, epoch) alone decide it */
    assert_memory_not_equal(a, c, sizeof a);
    int moved = 0;
    for (int i = 0; i < 50; i++) {
        seen[a[i]]++;
        moved += a[i] != i;
    }
    for (int i = 0; i < 50; i++) assert_int_equal(seen[i], 1); /* a permutation */
    assert_true(moved > 25);
    moe_tune_epoch_order(a, 50, 7, 3, 0);
    for (int i = 0; i < 50; i++) assert_int_equal(a[i], i);
}

static void test_shift_labels(void **state) {
    (void)state;
    int32_t label[5] = {1, -100, 3, 4, 5}, target[5];
    assert_int_equal(moe_tune_shift_labels(target, label, 5), 3);
    int32_t want[5] = {-100, 3, 4, 5, -100};
    assert_memory_equal(target, want, sizeof want);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_text_trains_everything), cmocka_unit_test(test_prompt_response_trains_the_response),
        cmocka_unit_test(test_turns_train_the_assistant), cmocka_unit_test(test_instances_and_truncation),
        cmocka_unit_test(test_token_stream),           cmocka_unit_test(test_errors),
        cmocka_unit_test(test_ids),
        cmocka_unit_test(test_epoch_order),            cmocka_unit_test(test_shift_labels),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
