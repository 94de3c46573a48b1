/* test_generate.c - moe-generate's library parts (lib/generate.c): the
 * random generator against SplitMix64's published values, greedy and
 * sampled token choice (ties, top-k, top-p, frequencies), non-finite
 * logits, and the streamed text (UTF-8 characters split across byte-level
 * tokens, stop strings) with the eval fixture's byte-level tokenizer. */
#include "common.h"
#include "generate.h"
#include "testutil.h"

#define TOKENIZER "tests/fixtures/eval/model"

static void test_splitmix_reference(void **state) {
    (void)state;
    /* SplitMix64 from state 1234567: Vigna's reference outputs; the first
     * uniform is the first output's top 53 bits */
    uint64_t s = 1234567;
    double u = moe_gen_uniform(&s);
    assert_true(u == (double)(6457827717110365317ull >> 11) * 0x1.0p-53);
    assert_true(moe_gen_uniform(&s) == (double)(3203168211198807973ull >> 11) * 0x1.0p-53);
    assert_true(moe_gen_uniform(&s) == (double)(9817491932198370423ull >> 11) * 0x1.0p-53);
    /* distinct streams start apart */
    assert_true(moe_gen_rng_init(7, 0) != moe_gen_rng_init(7, 1));
    assert_true(moe_gen_rng_init(7, 0) != moe_gen_rng_init(8, 0));
}

static void test_greedy_first_max(void **state) {
    (void)state;
    float z[5] = {0.5f, 2.0f, -1.0f, 2.0f, 1.0f};
    moe_gen_opts o = {.top_p = 1.0};
    uint64_t rng = 1, before = rng;
    assert_int_equal(moe_gen_pick(z, 5, &o, &rng), 1);
    assert_true(rng == before); /* greedy draws nothing */
    o.temperature = 1.0;
    o.top_k = 1; /* top-1 sampling is greedy too, ties to the lower id */
    for (int i = 0; i < 50; i++) assert_int_equal(moe_gen_pick(z, 5, &o, &rng), 1);
}

static void count_picks(const float *z, int V, const moe_gen_opts *o, int n, int *counts) {
    uint64_t rng = moe_gen_rng_init(o->seed, 0);
    memset(counts, 0, sizeof(int) * (size_t)V);
    for (int i = 0; i < n; i++) {
        int32_t id = moe_gen_pick(z, V, o, &rng);
        assert_true(id >= 0 && id < V);
        counts[id]++;
    }
}

static void test_sampling_frequencies(void **state) {
    (void)state;
    /* p = 0.5, 0.3, 0.15, 0.05 */
    float z[4] = {logf(0.5f), logf(0.3f), logf(0.15f), logf(0.05f)};
    int c[4], n = 40000;
    moe_gen_opts o = {.temperature = 1.0, .top_p = 1.0, .seed = 3};
    count_picks(z, 4, &o, n, c);
    const double p[4] = {0.5, 0.3, 0.15, 0.05};
    for (int v = 0; v < 4; v++) assert_true(fabs(c[v] / (double)n - p[v]) < 0.01);
    /* top-k 2: 0.5 / 0.8 and 0.3 / 0.8 */
    o.top_k = 2;
    count_picks(z, 4, &o, n, c);
    assert_int_equal(c[2] + c[3], 0);
    assert_true(fabs(c[0] / (double)n - 0.625) < 0.01);
    /* top-p 0.7: the shortest prefix reaching 0.7 is {0, 1} */
    o.top_k = 0;
    o.top_p = 0.7;
    count_picks(z, 4, &o, n, c);
    assert_int_equal(c[2] + c[3], 0);
    assert_true(c[1] > 0);
    o.top_p = 0.4; /* {0} alone */
    count_picks(z, 4, &o, n, c);
    assert_int_equal(c[0], n);
    /* a low temperature sharpens: almost always the argmax */
    o.top_p = 1.0;
    o.temperature = 0.05;
    count_picks(z, 4, &o, n, c);
    assert_true(c[0] > n - 10);
}

static void test_sampling_reproducible(void **state) {
    (void)state;
    float z[64];
    for (int v = 0; v < 64; v++) z[v] = sinf((float)v);
    moe_gen_opts o = {.temperature = 0.8, .top_p = 0.9, .top_k = 20, .seed = 11};
    uint64_t a = moe_gen_rng_init(11, 5), b = a;
    int differ = 0;
    int32_t prev = -1;
    for (int i = 0; i < 200; i++) {
        int32_t x = moe_gen_pick(z, 64, &o, &a), y = moe_gen_pick(z, 64, &o, &b);
        assert_int_equal(x, y);
        if (prev >= 0 && x != prev) differ = 1;
        prev = x;
    }
    assert_true(differ); /* it does sample */
}

static void test_non_finite_logits(void **state) {
    (void)state;
    float z[3] = {0.0f, NAN, 1.0f};
    moe_gen_opts o = {.top_p = 1.0};
    uint64_t rng = 0;
    assert_int_equal(moe_gen_pick(z, 3, &o, &rng), -1);
    assert_int_equal(moe_error_kind(), MOE_ERR_DATA);
    assert_non_null(strstr(moe_error(), "not finite"));
}

/* Push the ids of text one by one: what comes out, concatenated. */
static char *stream_text(moe_tokenizer *t, const int32_t *ids, size_t n, const char *const *stops,
                         int nstops, int *stopped, int *split_seen) {
    moe_detok d;
    moe_detok_init(&d, t, stops, nstops);
    char *all = calloc(1, 4096);
    size_t len = 0;
    *stopped = 0;
    for (size_t i = 0; i < n && !*stopped; i++) {
        const char *out;
        size_t ol;
        int r = moe_detok_push(&d, ids[i], &out, &ol);
        assert_true(r >= 0);
        assert_int_equal(moe_utf8_check(out, ol), ol); /* never half a character */
        memcpy(all + len, out, ol);
        len += ol;
        *stopped = r;
        char *one = NULL;
        size_t one_len = 0;
        assert_int_equal(moe_tokenizer_decode(t, &ids[i], 1, MOE_TOK_RAW, &one, &one_len), 0);
        if (moe_utf8_check(one, one_len) != one_len) *split_seen = 1;
        free(one);
    }
    if (!*stopped) {
        const char *out;
        size_t ol;
        assert_int_equal(moe_detok_finish(&d, &out, &ol), 0);
        memcpy(all + len, out, ol);
        len += ol;
    }
    all[len] = 0;
    moe_detok_free(&d);
    return all;
}

static void test_detok_utf8_and_stops(void **state) {
    (void)state;
    moe_tokenizer *t = moe_tokenizer_open(TOKENIZER);
    assert_non_null(t);
    const char *text = "Once upon a time, caf\xc3\xa9 \xe2\x82\xac 5 and \xf0\x9f\x98\x80 the end.";
    int32_t *ids = NULL;
    size_t n = 0;
    assert_int_equal(moe_tokenizer_encode(t, text, strlen(text), 0, &ids, &n), 0);
    int stopped = 0, split = 0;
    char *got = stream_text(t, ids, n, NULL, 0, &stopped, &split);
    assert_string_equal(got, text);
    assert_true(split); /* some token is part of a character: the case is exercised */
    free(got);
    /* a stop string: the text before its first occurrence, and no more */
    const char *stops[2] = {"zzz", "\xe2\x82\xac 5"};
    got = stream_text(t, ids, n, stops, 2, &stopped, &split);
    assert_int_equal(stopped, 1);
    assert_string_equal(got, "Once upon a time, caf\xc3\xa9 ");
    free(got);
    /* the start of a stop string that never completes is given out in the end */
    const char *partial[1] = {"end.!"};
    got = stream_text(t, ids, n, partial, 1, &stopped, &split);
    assert_int_equal(stopped, 0);
    assert_string_equal(got, text);
    free(got);
    free(ids);
    moe_tokenizer_close(t);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_splitmix_reference),
        cmocka_unit_test(test_greedy_first_max),
        cmocka_unit_test(test_sampling_frequencies),
        cmocka_unit_test(test_sampling_reproducible),
        cmocka_unit_test(test_non_finite_logits),
        cmocka_unit_test(test_detok_utf8_and_stops),
    };
    return cmocka_run_group_tests(tests, tu_setup_dir, tu_teardown_dir);
}
