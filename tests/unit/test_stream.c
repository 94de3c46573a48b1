/* test_stream.c - moe-stream round trips and every kind of bad input. */
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zstd.h>

#include "common.h"
#include "stream.h"
#include "testutil.h"

static uint64_t rng = 88172645463325252ull;
static uint64_t next_rand(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static moe_provenance prov = {.tool = "test-stream", .argc = 0, .argv = NULL, .model = "fp-test", .kind = "test"};

/* Write nrec records, record i holding an f32 array of sizes[i] values
 * (value j = i*1000 + j) and an i32 array of the same length. */
static void write_stream(const char *path, int nrec, const int *sizes) {
    moe_writer *w = moe_writer_open(path, NULL, &prov, 0);
    assert_non_null(w);
    for (int i = 0; i < nrec; i++) {
        int64_t n = sizes[i];
        float *f = malloc((n ? n : 1) * sizeof *f);
        int32_t *k = malloc((n ? n : 1) * sizeof *k);
        for (int64_t j = 0; j < n; j++) { f[j] = (float)(i * 1000 + j) * 0.5f; k[j] = (int32_t)(j - i); }
        msgpack_packer *pk = moe_writer_record(w, "sample", 3);
        moe_pack_kv_int(pk, "index", i);
        moe_pack_kv_array(pk, "values", MOE_DT_F32, 1, &n, f);
        int64_t shape[2] = {1, n};
        moe_pack_kv_array(pk, "ids", MOE_DT_I32, 2, shape, k);
        free(f);
        free(k);
    }
    assert_int_equal(moe_writer_close(w), 0);
}

static void check_stream(const char *path, int nrec, const int *sizes) {
    moe_reader *r = moe_reader_open(path);
    assert_non_null(r);
    assert_true(moe_header_has_kind(moe_reader_header(r), "test"));
    assert_int_equal(moe_reader_check_model(r, "fp-test", 0), 0);
    const msgpack_object *rec;
    int i = 0, rc;
    while ((rc = moe_reader_next(r, &rec)) > 0) {
        assert_true(moe_record_is(rec, "sample"));
        int64_t idx;
        assert_int_equal(moe_record_int(r, rec, "index", &idx), 0);
        assert_int_equal(idx, i);
        moe_array a, b;
        assert_int_equal(moe_record_array(r, rec, "values", &a), 0);
        assert_int_equal(moe_record_array(r, rec, "ids", &b), 0);
        assert_int_equal(a.count, sizes[i]);
        assert_int_equal(b.ndim, 2);
        assert_int_equal(b.shape[1], sizes[i]);
        float *f = malloc((a.count ? a.count : 1) * sizeof *f);
        int32_t *k = malloc((b.count ? b.count : 1) * sizeof *k);
        moe_array_to_f32(&a, f);
        assert_int_equal(moe_array_to_i32(&b, k), 0);
        for (int64_t j = 0; j < a.count; j++) {
            assert_true(f[j] == (float)(i * 1000 + j) * 0.5f);
            assert_int_equal(k[j], j - i);
        }
        free(f);
        free(k);
        i++;
    }
    assert_int_equal(rc, 0);
    assert_int_equal(i, nrec);
    moe_reader_close(r);
}

static void test_round_trip_sizes(void **state) {
    (void)state;
    int sizes[40];
    for (int i = 0; i < 40; i++) {
        uint64_t k = next_rand() % 4;
        sizes[i] = k == 0 ? 0 : k == 1 ? (int)(next_rand() % 10) : k == 2 ? (int)(next_rand() % 5000)
                                                                     : (int)(next_rand() % 400000);
    }
    sizes[0] = 0;
    sizes[1] = 1 << 20; /* one large array: 4 MiB, spans many zstd blocks */
    const char *p = tu_path("rt.msgpack.zst");
    write_stream(p, 40, sizes);
    check_stream(p, 40, sizes);
}

static void test_empty_stream(void **state) {
    (void)state;
    const char *p = tu_path("empty.msgpack.zst");
    write_stream(p, 0, NULL);
    check_stream(p, 0, NULL);
}

static void test_pass_through_and_provenance(void **state) {
    (void)state;
    int sizes[3] = {3, 0, 7};
    const char *a = tu_path("a.msgpack.zst"), *b = tu_path("b.msgpack.zst");
    write_stream(a, 3, sizes);
    moe_reader *r = moe_reader_open(a);
    assert_non_null(r);
    char *argv[] = {"moe-second", "--flag", "x"};
    moe_provenance p2 = {.tool = "moe-second", .argc = 3, .argv = argv, .model = "fp-test", .kind = "second"};
    moe_writer *w = moe_writer_open(b, moe_reader_header(r), &p2, 0);
    assert_non_null(w);
    const msgpack_object *rec;
    int rc;
    while ((rc = moe_reader_next(r, &rec)) > 0) assert_int_equal(moe_writer_copy(w, rec), 0);
    assert_int_equal(rc, 0);
    moe_reader_close(r);
    assert_int_equal(moe_writer_close(w), 0);

    check_stream(b, 3, sizes);
    r = moe_reader_open(b);
    const msgpack_object *h = moe_reader_header(r);
    assert_true(moe_header_has_kind(h, "test"));
    assert_true(moe_header_has_kind(h, "second"));
    const msgpack_object *pv = moe_map_get(h, "provenance");
    assert_int_equal(pv->via.array.size, 2);
    assert_true(moe_obj_streq(moe_map_get(&pv->via.array.ptr[1], "tool"), "moe-second"));
    const msgpack_object *args = moe_map_get(&pv->via.array.ptr[1], "args");
    assert_int_equal(args->via.array.size, 2);
    assert_true(moe_obj_streq(&args->via.array.ptr[1], "x"));
    /* another model: refused, or accepted with force */
    assert_int_equal(moe_reader_check_model(r, "fp-other", 0), -1);
    assert_non_null(strstr(moe_error(), "--force"));
    assert_int_equal(moe_reader_check_model(r, "fp-other", 1), 0);
    assert_int_equal(moe_reader_require_kind(r, "calib", "run moe-calib first"), -1);
    assert_non_null(strstr(moe_error(), "'calib' is needed"));
    moe_reader_close(r);
}

static void test_deterministic_bytes(void **state) {
    (void)state;
    int sizes[4] = {5, 100, 0, 3000};
    const char *p1 = tu_path("d1"), *p2 = tu_path("d2");
    write_stream(p1, 4, sizes);
    write_stream(p2, 4, sizes);
    size_t n1, n2;
    char *b1 = tu_read_file(p1, &n1), *b2 = tu_read_file(p2, &n2);
    assert_int_equal(n1, n2);
    assert_memory_equal(b1, b2, n1);
    free(b1);
    free(b2);
}

/* ---- bad input ------------------------------------------------------------ */

/* Open and read everything; expect failure whose message contains `want`
 * and names the file. */
static void expect_bad(const char *path, const char *want) {
    moe_error_clear();
    moe_reader *r = moe_reader_open(path);
    int rc = -1;
    if (r) {
        const msgpack_object *rec;
        while ((rc = moe_reader_next(r, &rec)) > 0) {
            moe_array a;
            /* look at arrays so that shape/length mismatches surface */
            for (uint32_t i = 0; i < rec->via.map.size; i++) {
                const msgpack_object *v = &rec->via.map.ptr[i].val;
                if (v->type == MSGPACK_OBJECT_MAP && moe_array_parse(v, &a, path) < 0) { rc = -1; break; }
            }
            if (rc < 0) break;
        }
        moe_reader_close(r);
    }
    assert_int_equal(rc, -1);
    if (!strstr(moe_error(), want) || !strstr(moe_error(), path))
        fail_msg("error '%s' lacks '%s' or the file name", moe_error(), want);
    assert_int_equal(moe_error_kind(), MOE_ERR_DATA);
}

/* Compress raw msgpack bytes into a zstd file. */
static void write_zstd(const char *path, const void *raw, size_t n) {
    size_t cap = ZSTD_compressBound(n);
    void *buf = malloc(cap);
    size_t z = ZSTD_compress(buf, cap, raw, n, 3);
    assert_false(ZSTD_isError(z));
    tu_write_file(path, buf, z);
    free(buf);
}

static void test_truncated(void **state) {
    (void)state;
    int sizes[5] = {100, 20000, 5, 300000, 9};
    const char *p = tu_path("full"), *t = tu_path("trunc");
    write_stream(p, 5, sizes);
    size_t n;
    unsigned char *b = (unsigned char *)tu_read_file(p, &n);
    size_t cuts[] = {n - 1, n - 4, n / 2, 10, 5};
    for (size_t i = 0; i < sizeof cuts / sizeof *cuts; i++) {
        tu_write_file(t, b, cuts[i]);
        expect_bad(t, "truncated");
    }
    free(b);
}

static void test_corrupt_bytes(void **state) {
    (void)state;
    int sizes[3] = {1000, 2000, 3000};
    const char *p = tu_path("good"), *c = tu_path("corrupt");
    write_stream(p, 3, sizes);
    size_t n;
    unsigned char *b = (unsigned char *)tu_read_file(p, &n);
    for (size_t pos = 20; pos < n; pos += n / 7) {
        unsigned char *d = malloc(n);
        memcpy(d, b, n);
        d[pos] ^= 0x5a;
        tu_write_file(c, d, n);
        moe_error_clear();
        expect_bad(c, "");
        free(d);
    }
    free(b);
}

static void test_not_zstd_and_empty(void **state) {
    (void)state;
    const char *p = tu_path("plain");
    tu_write_file(p, "hello world, not zstd", 21);
    expect_bad(p, "not zstd-compressed");
    tu_write_file(p, "", 0);
    expect_bad(p, "empty input");
}

static void pack_to(msgpack_sbuffer *sb, msgpack_packer *pk) {
    msgpack_sbuffer_init(sb);
    msgpack_packer_init(pk, sb, msgpack_sbuffer_write);
}

static void pack_header(msgpack_packer *pk, const char *fmt, int version) {
    msgpack_pack_map(pk, 4);
    moe_pack_kv_str(pk, "format", fmt);
    moe_pack_kv_int(pk, "version", version);
    moe_pack_str(pk, "kinds");
    msgpack_pack_array(pk, 0);
    moe_pack_str(pk, "provenance");
    msgpack_pack_array(pk, 0);
}

static void pack_end(msgpack_packer *pk, int count) {
    msgpack_pack_map(pk, 2);
    moe_pack_kv_str(pk, "type", "end");
    moe_pack_kv_int(pk, "records", count);
}

static void test_zstd_of_non_msgpack(void **state) {
    (void)state;
    const char *p = tu_path("nonmp");
    const unsigned char junk[] = {0xc1, 0xc1, 0xc1, 0xc1}; /* 0xc1 is never valid msgpack */
    write_zstd(p, junk, sizeof junk);
    expect_bad(p, "not valid msgpack");
    write_zstd(p, "\x93\x01\x02\x03", 4); /* a msgpack array, not a header map */
    expect_bad(p, "not a moe-stream");
}

static void test_wrong_format_and_version(void **state) {
    (void)state;
    msgpack_sbuffer sb;
    msgpack_packer pk;
    const char *p = tu_path("fmt");
    pack_to(&sb, &pk);
    pack_header(&pk, "other-format", 1);
    pack_end(&pk, 0);
    write_zstd(p, sb.data, sb.size);
    msgpack_sbuffer_destroy(&sb);
    expect_bad(p, "not a moe-stream (format 'other-format')");

    pack_to(&sb, &pk);
    pack_header(&pk, MOE_STREAM_FORMAT, MOE_STREAM_VERSION + 1);
    pack_end(&pk, 0);
    write_zstd(p, sb.data, sb.size);
    msgpack_sbuffer_destroy(&sb);
    expect_bad(p, "not supported");
}

/* A stream of one record {"type": TYPE, KEY: RAW} (RAW: packed msgpack). */
static void write_one_record(const char *p, const char *type, const char *key, const void *raw, size_t n) {
    msgpack_sbuffer sb;
    msgpack_packer pk;
    pack_to(&sb, &pk);
    pack_header(&pk, MOE_STREAM_FORMAT, 1);
    msgpack_pack_map(&pk, 2);
    moe_pack_kv_str(&pk, "type", type);
    moe_pack_str(&pk, key);
    msgpack_sbuffer_write(&sb, raw, n);
    pack_end(&pk, 1);
    write_zstd(p, sb.data, sb.size);
    msgpack_sbuffer_destroy(&sb);
}

static void expect_too_big(const void *raw, size_t n) {
    write_one_record(tu_path("big"), "x", "v", raw, n);
    expect_bad(tu_path("big"), "record 0 needs more than 1024 MiB of memory");
}

/* A typed array whose byte size wraps around 2^64: shape [2^40, 2^22] of
 * i32 is 2^64 bytes, which a wrapping product takes for 0 (issue 14). */
static void pack_wrapping_array(msgpack_packer *pk, const char *dtype, int64_t d0, int64_t d1) {
    msgpack_pack_map(pk, 3);
    moe_pack_kv_str(pk, "dtype", dtype);
    moe_pack_str(pk, "shape");
    msgpack_pack_array(pk, 2);
    msgpack_pack_int64(pk, d0);
    msgpack_pack_int64(pk, d1);
    moe_pack_str(pk, "data");
    msgpack_pack_bin(pk, 0);
}

static void test_array_size_overflow(void **state) {
    (void)state;
    static const struct { const char *dtype; int64_t d0, d1; } cases[] = {
        {"i32", (int64_t)1 << 40, (int64_t)1 << 22}, /* 2^62 elements * 4 = 2^64 */
        {"f64", (int64_t)1 << 40, (int64_t)1 << 21}, /* 2^61 * 8 */
        {"u8", (int64_t)1 << 40, (int64_t)1 << 40},  /* 2^80 elements */
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        msgpack_sbuffer sb;
        msgpack_packer pk;
        pack_to(&sb, &pk);
        pack_wrapping_array(&pk, cases[i].dtype, cases[i].d0, cases[i].d1);
        msgpack_unpacked u;
        msgpack_unpacked_init(&u);
        assert_int_equal(msgpack_unpack_next(&u, sb.data, sb.size, NULL), MSGPACK_UNPACK_SUCCESS);
        moe_array a;
        moe_error_clear();
        assert_int_equal(moe_array_parse(&u.data, &a, "arr"), -1);
        assert_non_null(strstr(moe_error(), "shape too large"));
        msgpack_unpacked_destroy(&u);
        msgpack_sbuffer_destroy(&sb);
    }
    /* and the reader refuses the record, so no tool passes it on */
    msgpack_sbuffer sb;
    msgpack_packer pk;
    const char *p = tu_path("wrap");
    pack_to(&sb, &pk);
    pack_wrapping_array(&pk, "i32", (int64_t)1 << 40, (int64_t)1 << 22);
    write_one_record(p, "tokens", "ids", sb.data, sb.size);
    msgpack_sbuffer_destroy(&sb);
    moe_reader *r = moe_reader_open(p);
    assert_non_null(r);
    const msgpack_object *rec;
    assert_int_equal(moe_reader_next(r, &rec), -1);
    assert_non_null(strstr(moe_error(), "shape too large"));
    assert_non_null(strstr(moe_error(), p));
    moe_reader_close(r);
}

/* A record that declares more memory than the record limit (1024 MiB by
 * default) is refused as soon as the declaration is read, before msgpack-c
 * allocates or buffers it: a huge list, map, bin, str or ext, and one whose
 * many small declarations add up. */
static void test_record_size_limit(void **state) {
    (void)state;
    static const unsigned char big[][6] = {
        {0xdd, 0x10, 0, 0, 0},       /* list of 2^28 elements: 6 GiB of msgpack_object */
        {0xdf, 0x04, 0, 0, 0},       /* map of 2^26 pairs */
        {0xc6, 0x40, 0, 0, 1},       /* bin of 1 GiB + 1 */
        {0xdb, 0xff, 0xff, 0xff, 0xff}, /* str of 4 GiB */
        {0xc9, 0x40, 0, 0, 0},       /* ext of 1 GiB */
    };
    for (size_t i = 0; i < sizeof big / sizeof *big; i++) expect_too_big(big[i], 5);
    /* a list of 2^16 lists of 2^11 elements each: 2^27 elements, 3 GiB once allocated */
    size_t n = 5 + 3 * ((size_t)1 << 16);
    unsigned char *raw = malloc(n);
    memcpy(raw, "\xdd\x00\x01\x00\x00", 5);
    for (size_t i = 5; i < n; i += 3) memcpy(raw + i, "\xdc\x08\x00", 3);
    expect_too_big(raw, n);
    free(raw);
}

static void test_record_problems(void **state) {
    (void)state;
    msgpack_sbuffer sb;
    msgpack_packer pk;
    const char *p = tu_path("rec");
    /* record without type */
    pack_to(&sb, &pk);
    pack_header(&pk, MOE_STREAM_FORMAT, 1);
    msgpack_pack_map(&pk, 1);
    moe_pack_kv_int(&pk, "index", 3);
    pack_end(&pk, 1);
    write_zstd(p, sb.data, sb.size);
    msgpack_sbuffer_destroy(&sb);
    expect_bad(p, "record 0: not a map with a 'type' string");

    /* typed array whose byte length does not match its shape */
    pack_to(&sb, &pk);
    pack_header(&pk, MOE_STREAM_FORMAT, 1);
    msgpack_pack_map(&pk, 2);
    moe_pack_kv_str(&pk, "type", "x");
    moe_pack_str(&pk, "values");
    msgpack_pack_map(&pk, 3);
    moe_pack_kv_str(&pk, "dtype", "f32");
    moe_pack_str(&pk, "shape");
    msgpack_pack_array(&pk, 2);
    msgpack_pack_int(&pk, 2);
    msgpack_pack_int(&pk, 2);
    moe_pack_str(&pk, "data");
    msgpack_pack_bin(&pk, 12);
    msgpack_pack_bin_body(&pk, "0123456789ab", 12);
    pack_end(&pk, 1);
    write_zstd(p, sb.data, sb.size);
    msgpack_sbuffer_destroy(&sb);
    expect_bad(p, "data is 12 bytes but shape [2,2] of f32 needs 16");

    /* missing end record; wrong count; data after the end */
    pack_to(&sb, &pk);
    pack_header(&pk, MOE_STREAM_FORMAT, 1);
    msgpack_pack_map(&pk, 1);
    moe_pack_kv_str(&pk, "type", "x");
    write_zstd(p, sb.data, sb.size);
    expect_bad(p, "no end record after 1 records");
    pack_end(&pk, 2);
    write_zstd(p, sb.data, sb.size);
    expect_bad(p, "end record counts 2 records but 1 were read");
    msgpack_sbuffer_destroy(&sb);

    pack_to(&sb, &pk);
    pack_header(&pk, MOE_STREAM_FORMAT, 1);
    pack_end(&pk, 0);
    msgpack_pack_int(&pk, 7);
    write_zstd(p, sb.data, sb.size);
    msgpack_sbuffer_destroy(&sb);
    expect_bad(p, "data after the end record");
}

static void test_accessor_errors(void **state) {
    (void)state;
    int sizes[1] = {4};
    const char *p = tu_path("acc.msgpack.zst");
    write_stream(p, 1, sizes);
    moe_reader *r = moe_reader_open(p);
    const msgpack_object *rec;
    assert_int_equal(moe_reader_next(r, &rec), 1);
    int64_t v;
    moe_array a;
    assert_int_equal(moe_record_int(r, rec, "missing", &v), -1);
    assert_non_null(strstr(moe_error(), "record 0 (sample): missing key 'missing'"));
    assert_int_equal(moe_record_int(r, rec, "values", &v), -1);
    assert_non_null(strstr(moe_error(), "key 'values' is not an integer"));
    assert_int_equal(moe_record_array(r, rec, "index", &a), -1);
    assert_non_null(strstr(moe_error(), "not a typed array"));
    moe_reader_close(r);
}

static void test_abort_leaves_nothing(void **state) {
    (void)state;
    const char *p = tu_path("aborted.msgpack.zst");
    moe_writer *w = moe_writer_open(p, NULL, &prov, 0);
    assert_non_null(w);
    moe_writer_record(w, "x", 0);
    moe_writer_abort(w);
    struct stat st;
    assert_int_not_equal(stat(p, &st), 0);
    assert_false(tu_dir_has("aborted"));
}

static void test_write_error_reported(void **state) {
    (void)state;
    /* /dev/full: every write fails with ENOSPC.  Through stdout so that the
     * writer writes the device directly (no temporary name). */
    int saved = dup(1);
    int fd = open("/dev/full", O_WRONLY);
    if (fd < 0) skip();
    dup2(fd, 1);
    close(fd);
    moe_writer *w = moe_writer_open("-", NULL, &prov, 0);
    int rc = -1;
    if (w) {
        int64_t n = 100000;
        float *f = calloc(n, sizeof *f);
        for (int i = 0; i < 4; i++) moe_pack_kv_array(moe_writer_record(w, "x", 1), "v", MOE_DT_F32, 1, &n, f);
        free(f);
        rc = moe_writer_close(w);
    }
    dup2(saved, 1);
    close(saved);
    assert_int_equal(rc, -1);
    assert_non_null(strstr(moe_error(), "write error"));
    assert_int_equal(moe_error_kind(), MOE_ERR_IO);
}

static void test_dtypes(void **state) {
    (void)state;
    assert_int_equal(moe_dtype_from_name("bf16", 4), MOE_DT_BF16);
    assert_int_equal(moe_dtype_from_name("f8", 2), -1);
    /* bf16 and f16 conversions */
    uint16_t bf[3] = {0x3f80, 0xc000, 0x0000}, h[4] = {0x3c00, 0xc000, 0x0001, 0x7bff};
    moe_array a = {.dtype = MOE_DT_BF16, .ndim = 1, .shape = {3}, .count = 3, .data = bf, .nbytes = 6};
    float f[4];
    moe_array_to_f32(&a, f);
    assert_true(f[0] == 1.0f && f[1] == -2.0f && f[2] == 0.0f);
    moe_array b = {.dtype = MOE_DT_F16, .ndim = 1, .shape = {4}, .count = 4, .data = h, .nbytes = 8};
    moe_array_to_f32(&b, f);
    assert_true(f[0] == 1.0f && f[1] == -2.0f && f[2] == 5.9604644775390625e-08f && f[3] == 65504.0f);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip_sizes),
        cmocka_unit_test(test_empty_stream),
        cmocka_unit_test(test_pass_through_and_provenance),
        cmocka_unit_test(test_deterministic_bytes),
        cmocka_unit_test(test_truncated),
        cmocka_unit_test(test_corrupt_bytes),
        cmocka_unit_test(test_not_zstd_and_empty),
        cmocka_unit_test(test_zstd_of_non_msgpack),
        cmocka_unit_test(test_wrong_format_and_version),
        cmocka_unit_test(test_record_problems),
        cmocka_unit_test(test_array_size_overflow),
        cmocka_unit_test(test_record_size_limit),
        cmocka_unit_test(test_accessor_errors),
        cmocka_unit_test(test_abort_leaves_nothing),
        cmocka_unit_test(test_write_error_reported),
        cmocka_unit_test(test_dtypes),
    };
    return cmocka_run_group_tests_name("stream", tests, tu_setup_dir, tu_teardown_dir);
}
