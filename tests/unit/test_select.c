/* test_select.c - run-time backend selection (--device) on any machine:
 * explicit cpu, unknown names, and "cuda" when no GPU is visible (or the
 * build has none) giving a device error, never a silent fallback. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <string.h>

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
    const moe_backend *b = moe_backend_select(NULL);
    assert_non_null(b);
    assert_string_equal(b->name, have_gpu() ? "cuda" : "cpu");
    assert_ptr_equal(moe_backend_select(""), b);
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

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cpu),
        cmocka_unit_test(test_unknown),
        cmocka_unit_test(test_default),
        cmocka_unit_test(test_cuda_unavailable),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
