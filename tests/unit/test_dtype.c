/* test_dtype.c - the one dtype enum (lib/dtype.c): both spellings name the
 * same value, sizes, and the float conversions the stream reader, the
 * safetensors reader and the backends share. */
#include "dtype.h"
#include "testutil.h"

static void test_names(void **state) {
    (void)state;
    static const char *stream[] = {"f32", "f64", "f16", "bf16", "i8", "u8", "i32", "u32", "i64"};
    for (size_t i = 0; i < sizeof stream / sizeof *stream; i++) {
        int dt = moe_dtype_from_name(stream[i], strlen(stream[i]));
        assert_true(dt >= 0);
        assert_string_equal(moe_dtype_name((moe_dtype)dt), stream[i]);
        /* the safetensors spelling of the same value is the upper-case one */
        char upper[8];
        for (size_t k = 0; k <= strlen(stream[i]); k++)
            upper[k] = (char)(stream[i][k] >= 'a' && stream[i][k] <= 'z' ? stream[i][k] - 32 : stream[i][k]);
        assert_int_equal(moe_dtype_from_st_name(upper), dt);
    }
    /* safetensors-only dtypes are no stream dtypes */
    assert_int_equal(moe_dtype_from_name("f8_e4m3", 7), -1);
    assert_string_equal(moe_dtype_name(MOE_DT_F8_E4M3), "?");
    assert_string_equal(moe_dtype_st_name(MOE_DT_F8_E4M3), "F8_E4M3");
    assert_int_equal(moe_dtype_size(MOE_DT_BF16), 2);
    assert_int_equal(moe_dtype_size(MOE_DT_I64), 8);
    assert_int_equal(moe_dtype_bits(MOE_DT_F4), 4);
}

static void test_round_trips(void **state) {
    (void)state;
    float in[5] = {1.0f, -2.5f, 65504.0f, 1e-7f, 3.14159f}, back[5];
    uint16_t h[5];
    assert_int_equal(moe_dtype_from_f32(MOE_DT_F16, in, h, 5), 0);
    assert_int_equal(moe_dtype_to_f32(MOE_DT_F16, h, back, 5), 0);
    for (int i = 0; i < 3; i++) assert_true(back[i] == in[i]);
    assert_int_equal(moe_dtype_from_f32(MOE_DT_BF16, in, h, 5), 0);
    for (int i = 0; i < 5; i++) assert_int_equal(h[i], moe_f32_to_bf16(in[i]));
    assert_int_equal(moe_dtype_to_f32(MOE_DT_BF16, h, back, 5), 0);
    assert_true(back[1] == -2.5f);
    for (int i = 0; i < 5; i++) assert_true(back[i] == moe_bf16_to_f32(h[i]));
    /* big arrays take the streaming path: same values */
    size_t n = (1u << 18) + 3;
    uint16_t *src = malloc(n * 2);
    float *dst = malloc(n * 4);
    for (size_t i = 0; i < n; i++) src[i] = (uint16_t)(i * 7919u);
    assert_int_equal(moe_dtype_to_f32(MOE_DT_BF16, src, dst, n), 0);
    for (size_t i = 0; i < n; i++)
        if (memcmp(&dst[i], &(float){moe_bf16_to_f32(src[i])}, 4)) fail_msg("element %zu", i);
    free(src);
    free(dst);
    assert_int_equal(moe_dtype_to_f32(MOE_DT_I32, in, back, 1), -1);
    assert_int_equal(moe_dtype_from_f32(MOE_DT_F64, in, back, 1), -1);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_names),
        cmocka_unit_test(test_round_trips),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
