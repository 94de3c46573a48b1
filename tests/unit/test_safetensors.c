/* test_safetensors.c - reader validation (every malformed case gives one line
 * naming the file and, where there is one, the tensor), conversions, writer. */
#include <sys/stat.h>

#include "common.h"
#include "safetensors.h"
#include "testutil.h"

/* Write a safetensors-like file: 8-byte length (hlen_override if >= 0),
 * header text, then `data_len` bytes of data (values i & 0xff). */
static const char *write_raw(const char *name, const char *header, long long hlen_override, size_t data_len)
{
    const char *path = tu_path(name);
    size_t hl = strlen(header);
    unsigned char *b = malloc(8 + hl + data_len);
    uint64_t n = hlen_override >= 0 ? (uint64_t)hlen_override : hl;
    for (int i = 0; i < 8; i++) b[i] = (unsigned char)(n >> (8 * i));
    memcpy(b + 8, header, hl);
    for (size_t i = 0; i < data_len; i++) b[8 + hl + i] = (unsigned char)(i & 0xff);
    tu_write_file(path, b, 8 + hl + data_len);
    free(b);
    return path;
}

/* The open must fail with one line containing the file path and `want`
 * (and `tensor` when not NULL). */
static void expect_bad(const char *name, const char *header, long long hlen, size_t data_len, const char *want,
                       const char *tensor)
{
    const char *p = write_raw(name, header, hlen, data_len);
    moe_error_clear();
    moe_st_file *f = moe_st_open(p);
    if (f) {
        moe_st_close(f);
        fail_msg("%s: opened, expected an error containing '%s'", name, want);
    }
    const char *e = moe_error();
    if (!strstr(e, p) || !strstr(e, want) || strchr(e, '\n') || (tensor && !strstr(e, tensor)))
        fail_msg("%s: error '%s' lacks path/'%s'/'%s' or is not one line", name, e, want, tensor ? tensor : "");
    assert_int_equal(moe_error_kind(), MOE_ERR_DATA);
}

static void test_good_file(void **state)
{
    (void)state;
    /* a: F32 [2] (8 bytes), b: BF16 [2,2] (8 bytes), s: F16 scalar (2 bytes) */
    const char *h = "{\"__metadata__\":{\"format\":\"pt\"},"
                    "\"b\":{\"dtype\":\"BF16\",\"shape\":[2,2],\"data_offsets\":[8,16]},"
                    "\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                    "\"s\":{\"dtype\":\"F16\",\"shape\":[],\"data_offsets\":[16,18]},"
                    "\"e\":{\"dtype\":\"F32\",\"shape\":[0,3],\"data_offsets\":[18,18]}}   ";
    const char *p = write_raw("good.safetensors", h, -1, 18);
    moe_st_file *f = moe_st_open(p);
    if (!f) fail_msg("%s", moe_error());
    assert_int_equal(moe_st_count(f), 4);
    assert_string_equal(moe_st_tensor_at(f, 0)->name, "a"); /* sorted by name */
    assert_string_equal(moe_st_metadata(f, "format"), "pt");
    assert_null(moe_st_metadata(f, "nope"));
    const moe_st_tensor *b = moe_st_find(f, "b");
    assert_non_null(b);
    assert_int_equal(b->dtype, MOE_DT_BF16);
    assert_int_equal(b->ndim, 2);
    assert_int_equal(b->numel, 4);
    assert_int_equal(b->nbytes, 8);
    assert_null(moe_st_find(f, "zz"));
    const moe_st_tensor *s = moe_st_find(f, "s");
    assert_int_equal(s->ndim, 0);
    assert_int_equal(s->numel, 1);
    assert_int_equal(moe_st_find(f, "e")->numel, 0);
    /* bytes of b are 8..15: bf16 words 0x0908, 0x0b0a, ... */
    float v[4];
    assert_int_equal(moe_st_read_f32(b, v), 0);
    uint32_t u = 0x09080000u;
    float w;
    memcpy(&w, &u, 4);
    assert_true(v[0] == w);
    int64_t good[2] = {2, 2}, bad[2] = {4, 1};
    assert_int_equal(moe_st_check_shape(b, 2, good), 0);
    assert_int_equal(moe_st_check_shape(b, 2, bad), -1);
    assert_non_null(strstr(moe_error(), "tensor b: shape [2, 2], expected [4, 1]"));
    moe_st_prefetch(b);
    moe_st_release(b);
    moe_st_close(f);
}

static void test_malformed(void **state)
{
    (void)state;
    const char *ok1 = "{\"t\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}";
    /* header length beyond the end of the file */
    expect_bad("hlen.safetensors", ok1, 4000, 8, "beyond the end", NULL);
    /* header length above the 100 MB limit */
    expect_bad("huge.safetensors", ok1, 200000000, 8, "limit", NULL);
    /* file shorter than 8 bytes */
    {
        const char *path = tu_path("short.safetensors");
        tu_write_text(path, "abc");
        assert_null(moe_st_open(path));
        assert_non_null(strstr(moe_error(), path));
    }
    expect_bad("json.safetensors", "{\"t\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}", -1, 8,
               "not valid JSON", NULL);
    expect_bad("notobj.safetensors", "[1, 2, 3]   ", -1, 0, "'{'", NULL);
    expect_bad("dup.safetensors",
               "{\"t\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
               "\"t\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", -1, 8, "not valid JSON", NULL);
    expect_bad("dtype.safetensors", "{\"t\":{\"dtype\":\"F33\",\"shape\":[2],\"data_offsets\":[0,8]}}", -1, 8,
               "unknown dtype 'F33'", "tensor t");
    expect_bad("shape.safetensors", "{\"t\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", -1, 8,
               "shape", "tensor t");
    expect_bad("shape2.safetensors", "{\"t\":{\"dtype\":\"F32\",\"shape\":\"2\",\"data_offsets\":[0,8]}}", -1, 8,
               "shape", "tensor t");
    expect_bad("offs.safetensors", "{\"t\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0]}}", -1, 8,
               "data_offsets", "tensor t");
    expect_bad("outside.safetensors", "{\"t\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", -1, 8,
               "outside the data area", "tensor t");
    expect_bad("size.safetensors", "{\"t\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", -1, 8,
               "needs 12", "tensor t");
    expect_bad("overlap.safetensors",
               "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
               "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", -1, 12, "overlaps", "tensor b");
    expect_bad("gap.safetensors", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", -1, 8,
               "gap", "tensor a");
    expect_bad("trailing.safetensors", ok1, -1, 12, "trailing", NULL);
    /* truncated: header promises 16 bytes of data, the file has 10 */
    expect_bad("trunc.safetensors",
               "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
               "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}", -1, 10, "truncated", "tensor b");
    expect_bad("meta.safetensors", "{\"__metadata__\":{\"format\":1}}", -1, 0, "__metadata__", NULL);
    expect_bad("subbyte.safetensors", "{\"t\":{\"dtype\":\"F4\",\"shape\":[3],\"data_offsets\":[0,2]}}", -1, 2,
               "whole number of bytes", "tensor t");
    /* missing file: I/O error */
    const char *path = tu_path("absent.safetensors");
    assert_null(moe_st_open(path));
    assert_int_equal(moe_error_kind(), MOE_ERR_IO);
    assert_non_null(strstr(moe_error(), path));
}

static void test_convert(void **state)
{
    (void)state;
    /* f16 -> f32 -> f16 is the identity for every non-NaN half */
    for (uint32_t h = 0; h < 65536; h++) {
        uint16_t x = (uint16_t)h, y;
        float f;
        moe_dtype_to_f32(MOE_DT_F16, &x, &f, 1);
        if (isnan(f)) continue;
        moe_dtype_from_f32(MOE_DT_F16, &f, &y, 1);
        if (x != y) fail_msg("f16 0x%04x -> %g -> 0x%04x", x, f, y);
    }
    uint16_t one = 0x3c00, mhalf = 0xb800, tiny = 0x0001;
    float f;
    moe_dtype_to_f32(MOE_DT_F16, &one, &f, 1);
    assert_true(f == 1.0f);
    moe_dtype_to_f32(MOE_DT_F16, &mhalf, &f, 1);
    assert_true(f == -0.5f);
    moe_dtype_to_f32(MOE_DT_F16, &tiny, &f, 1);
    assert_true(f == ldexpf(1.0f, -24));
    /* bf16: round to nearest even */
    float in[4] = {1.0f, 1.00390625f /* 1 + 2^-8: tie -> even (1.0) */, 1.01171875f /* 1+3*2^-8: tie -> up */,
                   -2.5f};
    uint16_t out[4];
    moe_dtype_from_f32(MOE_DT_BF16, in, out, 4);
    assert_int_equal(out[0], 0x3f80);
    assert_int_equal(out[1], 0x3f80);
    assert_int_equal(out[2], 0x3f82);
    assert_int_equal(out[3], 0xc020);
    float back[4];
    moe_dtype_to_f32(MOE_DT_BF16, out, back, 4);
    assert_true(back[3] == -2.5f);
    assert_int_equal(moe_dtype_to_f32(MOE_DT_I32, out, back, 1), -1);
    /* big conversions (streamed, in chunks, threads): every value, odd source
     * and destination alignments, odd length */
    size_t n = ((size_t)1 << 18) + 12345;
    unsigned char *src = malloc(2 * n + 1);
    float *dst = malloc(sizeof(float) * (n + 1));
    for (size_t i = 0; i < n; i++) {
        uint16_t h = (uint16_t)(i * 40503u);
        memcpy(src + 1 + 2 * i, &h, 2);
    }
    assert_int_equal(moe_dtype_to_f32(MOE_DT_BF16, src + 1, dst + 1, n), 0);
    for (size_t i = 0; i < n; i++) {
        uint32_t u = (uint32_t)(uint16_t)(i * 40503u) << 16, v;
        memcpy(&v, dst + 1 + i, 4);
        if (u != v) fail_msg("bf16 element %zu: %08x, expected %08x", i, v, u);
    }
    free(src);
    free(dst);
}

static uint64_t fill_calls;
static int fill_iota(void *ctx, const char *name, uint64_t start, uint64_t n, void *out)
{
    (void)ctx, (void)name;
    float *o = out;
    for (uint64_t i = 0; i < n; i++) o[i] = (float)(start + i);
    fill_calls++;
    return 0;
}

static int fill_fail(void *ctx, const char *name, uint64_t start, uint64_t n, void *out)
{
    (void)ctx, (void)start, (void)n, (void)out;
    moe_error_set(MOE_ERR_DATA, "fill failed for %s", name);
    return -1;
}

static void write_sample(const char *path)
{
    static uint16_t bf[3] = {0x3f80, 0x4000, 0xc040};
    static double f64[2] = {1.5, -2.25};
    moe_st_writer *w = moe_st_writer_open(path);
    int64_t s3[1] = {3}, big[2] = {1000, 1500}, s2[1] = {2};
    assert_int_equal(moe_st_writer_add(w, "z.bf16", MOE_DT_BF16, 1, s3, bf, NULL, NULL), 0);
    assert_int_equal(moe_st_writer_add(w, "a.big", MOE_DT_F32, 2, big, NULL, fill_iota, NULL), 0);
    assert_int_equal(moe_st_writer_add(w, "m.f64", MOE_DT_F64, 1, s2, f64, NULL, NULL), 0);
    assert_int_equal(moe_st_writer_add(w, "m.f64", MOE_DT_F64, 1, s2, f64, NULL, NULL), -1); /* duplicate */
    assert_int_equal(moe_st_writer_meta(w, "note", "x\"y"), 0);
    assert_int_equal(moe_st_writer_bytes(w), 6 + 6000000 + 16);
    if (moe_st_writer_close(w) < 0) fail_msg("%s", moe_error());
}

static void test_writer(void **state)
{
    (void)state;
    char p1[512], p2[512];
    snprintf(p1, sizeof p1, "%s", tu_path("w1.safetensors"));
    snprintf(p2, sizeof p2, "%s", tu_path("w2.safetensors"));
    fill_calls = 0;
    write_sample(p1);
    assert_true(fill_calls > 1); /* chunked */
    write_sample(p2);
    size_t n1, n2;
    char *b1 = tu_read_file(p1, &n1), *b2 = tu_read_file(p2, &n2);
    assert_int_equal(n1, n2);
    assert_memory_equal(b1, b2, n1); /* deterministic */
    uint64_t hl = 0;
    for (int i = 7; i >= 0; i--) hl = (hl << 8) | (unsigned char)b1[i];
    assert_int_equal(hl % 8, 0);
    assert_non_null(strstr(b1 + 8, "\"__metadata__\":{\"format\":\"pt\""));
    /* order: F64 before F32 before BF16 (descending dtype) */
    char *pf64 = strstr(b1 + 8, "m.f64"), *pf32 = strstr(b1 + 8, "a.big"), *pbf = strstr(b1 + 8, "z.bf16");
    assert_true(pf64 && pf32 && pbf && pf64 < pf32 && pf32 < pbf);
    free(b1);
    free(b2);
    moe_st_file *f = moe_st_open(p1);
    if (!f) fail_msg("%s", moe_error());
    assert_string_equal(moe_st_metadata(f, "note"), "x\"y");
    const moe_st_tensor *t = moe_st_find(f, "a.big");
    assert_int_equal(t->offset % 8, 0);
    float *v = malloc(1500000 * sizeof(float));
    assert_int_equal(moe_st_read_f32(t, v), 0);
    for (int i = 0; i < 1500000; i += 7919) assert_true(v[i] == (float)i);
    assert_true(v[1499999] == 1499999.0f);
    free(v);
    float z[3], m[2];
    assert_int_equal(moe_st_read_f32(moe_st_find(f, "z.bf16"), z), 0);
    assert_true(z[0] == 1.0f && z[1] == 2.0f && z[2] == -3.0f);
    assert_int_equal(moe_st_read_f32(moe_st_find(f, "m.f64"), m), 0);
    assert_true(m[0] == 1.5f && m[1] == -2.25f);
    moe_st_close(f);

    /* a failing fill leaves nothing behind */
    const char *p3 = tu_path("w3.safetensors");
    moe_st_writer *w = moe_st_writer_open(p3);
    int64_t s[1] = {10};
    moe_st_writer_add(w, "t", MOE_DT_F32, 1, s, NULL, fill_fail, NULL);
    assert_int_equal(moe_st_writer_close(w), -1);
    assert_non_null(strstr(moe_error(), "fill failed for t"));
    struct stat st;
    assert_int_not_equal(stat(p3, &st), 0);
    assert_false(tu_dir_has("tmp")); /* no temporary left */

    /* unwritable place: I/O error naming the file */
    w = moe_st_writer_open("/nonexistent-dir/x.safetensors");
    moe_st_writer_add(w, "t", MOE_DT_F32, 1, s, NULL, fill_iota, NULL);
    assert_int_equal(moe_st_writer_close(w), -1);
    assert_int_equal(moe_error_kind(), MOE_ERR_IO);
    assert_non_null(strstr(moe_error(), "/nonexistent-dir/"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_good_file),
        cmocka_unit_test(test_malformed),
        cmocka_unit_test(test_convert),
        cmocka_unit_test(test_writer),
    };
    return cmocka_run_group_tests(tests, tu_setup_dir, tu_teardown_dir);
}
