/* test_select.c - run-time backend selection (--device) on any machine:
 * explicit cpu, unknown names, and "cuda" when no GPU is visible (or the
 * build has none) giving a device error, never a silent fallback. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend_cuda.h"
#include "common.h"
#include "device.h"
#include "kernels.h"

static int have_gpu(void) { return moe_device_cuda_built() && moe_device_cuda_count(NULL, 0) > 0; }

static void test_cpu(void **state) {
    (void)state;
    assert_ptr_equal(moe_backend_select("cpu"), moe_backend_cpu());
    assert_ptr_equal(moe_backend_select("cpu-ref"), moe_backend_cpu_ref());
    assert_int_equal(moe_backend_status(moe_backend_cpu()), 0);
}

static void test_unknown(void **state) {
    (void)state;
    moe_error_clear();
    assert_null(moe_backend_select("tpu"));
    assert_int_equal(moe_error_kind(), MOE_ERR_DATA);
    assert_non_null(strstr(moe_error(), "tpu"));
}

static void test_default(void **state) {
    (void)state;
    unsetenv("MOE_DEVICE"); /* tests/run.sh sets it */
    const moe_backend *b = moe_backend_select(NULL);
    assert_non_null(b);
    assert_string_equal(b->name, have_gpu() ? "cuda" : "cpu");
    assert_ptr_equal(moe_backend_select(""), b);
    /* $MOE_DEVICE replaces the default, not an explicit device */
    setenv("MOE_DEVICE", "cpu-ref", 1);
    assert_ptr_equal(moe_backend_select(NULL), moe_backend_cpu_ref());
    assert_ptr_equal(moe_backend_select("cpu"), moe_backend_cpu());
    setenv("MOE_DEVICE", "tpu", 1);
    moe_error_clear();
    assert_null(moe_backend_select(""));
    assert_int_equal(moe_error_kind(), MOE_ERR_DATA);
    unsetenv("MOE_DEVICE");
}

static void test_cuda_unavailable(void **state) {
    (void)state;
    if (have_gpu()) skip();
    moe_error_clear();
    assert_null(moe_backend_select("cuda"));
    assert_int_equal(moe_error_kind(), MOE_ERR_DEVICE); /* exit code 4 through moe_cli_fail */
    assert_non_null(strstr(moe_error(), "--device cuda"));
    moe_error_clear();
    assert_null(moe_backend_cuda());
    assert_int_equal(moe_error_kind(), MOE_ERR_DEVICE);
}

/* Every op of a backend table is set.  kernels.h's struct is a name, two
 * ints, then function pointers only: checked generically, so that an op
 * added to kernels.h and forgotten by a backend fails here (the model would
 * call a NULL pointer).  The CUDA table is obtained without a device. */
typedef void (*any_fn)(void);
static void check_table(const moe_backend *b) {
    assert_non_null(b);
    assert_non_null(b->name);
    size_t first = offsetof(moe_backend, alloc);
    /* only function pointers from alloc to the end (update this test if not) */
    assert_int_equal(offsetof(moe_backend, status) + sizeof(any_fn), sizeof(moe_backend));
    assert_int_equal((sizeof(moe_backend) - first) % sizeof(any_fn), 0);
    int bad = 0;
    for (size_t o = first; o < sizeof(moe_backend); o += sizeof(any_fn)) {
        if (o == offsetof(moe_backend, matmul_f32) && strncmp(b->name, "cpu-bf16", 8) != 0)
            continue; /* optional (a backend whose weights are not f32 may offer it) */
        any_fn f;
        memcpy(&f, (const char *)b + o, sizeof f);
        if (!f) {
            print_error("backend %s: op #%zu (byte offset %zu) is NULL\n", b->name,
                        (o - first) / sizeof(any_fn), o);
            bad = 1;
        }
    }
    assert_false(bad);
}

static void test_tables_complete(void **state) {
    (void)state;
    check_table(moe_backend_cpu());
    check_table(moe_backend_cpu_ref());
    check_table(moe_backend_cpu_bf16());
    assert_int_equal(moe_backend_cpu_bf16()->weight_dtype, MOE_DT_BF16);
    assert_ptr_equal(moe_backend_get("cpu-bf16"), moe_backend_cpu_bf16());
    check_table(moe_backend_cpu_bf16_compute());
    assert_int_equal(moe_backend_cpu_bf16_compute()->weight_dtype, MOE_DT_BF16);
    assert_ptr_equal(moe_backend_get("cpu-bf16-compute"), moe_backend_cpu_bf16_compute());
    moe_error_clear();
    const moe_backend *cu = moe_cuda_backend_table();
    if (moe_device_cuda_built()) {
        if (!cu) print_error("CUDA plugin: %s\n", moe_error());
        assert_non_null(cu); /* the plugin was built and must load, GPU or not */
        assert_string_equal(cu->name, "cuda");
        assert_int_equal(cu->weight_dtype, MOE_DT_BF16);
        check_table(cu);
    } else {
        assert_null(cu);
    }
}

/* the grouped GEMM helper on the CPU: a loop of matmul, same bytes */
/* mem_info on the CPU: MemTotal and MemAvailable, consistent with sysconf */
static void test_cpu_mem_info(void **state) {
    (void)state;
    size_t fr = 0, tot = 0;
    moe_backend_cpu()->mem_info(&fr, &tot);
    long pages = sysconf(_SC_PHYS_PAGES), psz = sysconf(_SC_PAGESIZE);
    size_t phys = (size_t)pages * (size_t)psz;
    assert_true(tot > 0 && fr > 0 && fr <= tot);
    assert_true(tot <= phys + ((size_t)64 << 20) && tot >= phys / 2); /* same memory, ~ */
}

static void test_matmul_grouped_cpu(void **state) {
    (void)state;
    const moe_backend *b = moe_backend_cpu();
    enum { G = 4, K = 19, N = 7 };
    int32_t off[G + 1] = {0, 2, 2, 9, 10};
    float x[10 * K], y[10 * N], want[10 * N], w[G][N * K];
    const void *wp[G];
    for (int i = 0; i < 10 * K; i++) x[i] = (float)((i * 37) % 11) - 5.0f;
    for (int g = 0; g < G; g++) {
        for (int i = 0; i < N * K; i++) w[g][i] = (float)((i * 13 + g) % 7) - 3.0f;
        wp[g] = w[g];
    }
    for (int acc = 0; acc <= 1; acc++) {
        for (int i = 0; i < 10 * N; i++) y[i] = want[i] = (float)i;
        for (int g = 0; g < G; g++)
            if (off[g + 1] > off[g])
                b->matmul(want + off[g] * N, x + off[g] * K, w[g], NULL, off[g + 1] - off[g], K, N,
                          acc);
        moe_backend_matmul_grouped(b, y, x, wp, off, G, K, N, acc);
        assert_memory_equal(y, want, sizeof y);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cpu),
        cmocka_unit_test(test_unknown),
        cmocka_unit_test(test_default),
        cmocka_unit_test(test_cuda_unavailable),
        cmocka_unit_test(test_matmul_grouped_cpu),
        cmocka_unit_test(test_cpu_mem_info),
        cmocka_unit_test(test_tables_complete),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
