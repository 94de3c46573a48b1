/* test_jsonl.c - the JSON Lines reader of moe-tokenize and moe-eval
 * (lib/jsonl.c): numbered lines, a sample's text, errors "FILE: line N:". */
#include "jsonl.h"
#include "testutil.h"

static void write_text(const char *path, const char *text) {
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fputs(text, f) >= 0, 1);
    assert_int_equal(fclose(f), 0);
}

static void test_lines_numbered(void **state) {
    (void)state;
    const char *p = tu_path("a.jsonl");
    write_text(p, "{\"text\": \"one\"}\n\n  \r\n{\"text\": \"two\"}"); /* no final newline */
    moe_jsonl *r = moe_jsonl_open(p);
    assert_non_null(r);
    assert_string_equal(moe_jsonl_name(r), p);
    const char *line;
    size_t len;
    int blanks = 0, samples = 0;
    while (moe_jsonl_next(r, &line, &len) > 0) {
        assert_int_equal(strlen(line), len); /* no newline kept */
        if (moe_jsonl_blank(line, len)) {
            blanks++;
            continue;
        }
        json_t *o;
        const char *text;
        size_t n;
        assert_int_equal(moe_jsonl_text(moe_jsonl_name(r), moe_jsonl_lineno(r), line, len, "text", 0, &o,
                                         &text, &n), 0);
        assert_string_equal(text, samples ? "two" : "one");
        assert_int_equal(moe_jsonl_lineno(r), samples ? 4 : 1);
        json_decref(o);
        samples++;
    }
    assert_int_equal(blanks, 2);
    assert_int_equal(samples, 2);
    assert_int_equal(moe_jsonl_offset(r), moe_jsonl_size(r));
    moe_jsonl_close(r);
}

static void expect_text_error(const char *line, const char *field, int turns, const char *want) {
    json_t *o = NULL;
    const char *text;
    size_t n;
    assert_int_equal(moe_jsonl_text("f.jsonl", 7, line, strlen(line), field, turns, &o, &text, &n), -1);
    json_decref(o);
    assert_int_equal(moe_error_kind(), MOE_ERR_DATA);
    if (strncmp(moe_error(), want, strlen(want)) != 0) fail_msg("got '%s', want '%s'", moe_error(), want);
}

static void test_text_errors(void **state) {
    (void)state;
    expect_text_error("{\"text\": ", "text", 0, "f.jsonl: line 7: not JSON: ");
    expect_text_error("[1, 2]", "text", 0, "f.jsonl: line 7: not a JSON object");
    expect_text_error("{\"txt\": \"a\"}", "text", 0, "f.jsonl: line 7: missing field 'text'");
    expect_text_error("{\"body\": 3}", "body", 0, "f.jsonl: line 7: not a string: field 'body'");
    /* turns: the first turn, else the field */
    expect_text_error("{\"turns\": [1]}", "text", 1, "f.jsonl: line 7: missing field 'text'");
    const char *chat = "{\"turns\": [\"hi\", \"there\"], \"text\": \"no\"}";
    json_t *o;
    const char *text;
    size_t n;
    assert_int_equal(moe_jsonl_text("f", 1, chat, strlen(chat), "text", 1, &o, &text, &n), 0);
    assert_string_equal(text, "hi");
    json_decref(o);
    assert_int_equal(moe_jsonl_text("f", 1, chat, strlen(chat), "text", 0, &o, &text, &n), 0);
    assert_string_equal(text, "no");
    json_decref(o);
}

/* Regression: moe-eval formatted the current error into itself, printing
 * "calib.jsonl: line 1: calib.jsonl: line 1: ded". */
static void test_error_at_prefixes_once(void **state) {
    (void)state;
    moe_error_set(MOE_ERR_DATA, "text too long: %d tokens exceeded", 5000);
    moe_jsonl_error_at("calib.jsonl", 1);
    assert_string_equal(moe_error(), "calib.jsonl: line 1: text too long: 5000 tokens exceeded");
    assert_int_equal(moe_error_kind(), MOE_ERR_DATA);
}

static void test_missing_file(void **state) {
    (void)state;
    assert_null(moe_jsonl_open(tu_path("nonexistent.jsonl")));
    assert_int_equal(moe_error_kind(), MOE_ERR_IO);
    assert_non_null(strstr(moe_error(), "nonexistent.jsonl: "));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_lines_numbered),
        cmocka_unit_test(test_text_errors),
        cmocka_unit_test(test_error_at_prefixes_once),
        cmocka_unit_test(test_missing_file),
    };
    return cmocka_run_group_tests(tests, tu_setup_dir, tu_teardown_dir);
}
