/* gpu_util.h - what the GPU parity tests (tests/unit/gpu_*.c) share: the
 * backend under test and the CPU oracle, random inputs, device copies, and
 * the relative-error checks.  Header only (static): each test binary is one
 * .c file. */
#ifndef MOE_GPU_UTIL_H
#define MOE_GPU_UTIL_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend_cuda.h"
#include "common.h"
#include "device.h"
#include "dtype.h"
#include "kernels.h"

static __attribute__((unused)) const moe_backend *G, *C; /* GPU under test, CPU oracle */

/* G = the CUDA backend, C = the CPU's; 0, or main's exit status: 77 (SKIP)
 * without a device, 1 when the backend cannot start */
static inline int gpu_test_init(void) {
    char why[256] = "";
    if (moe_device_cuda_count(why, sizeof why) <= 0) {
        printf("SKIP: no CUDA device (%s)\n", why[0] ? why : "none visible");
        return 77;
    }
    G = moe_backend_cuda();
    if (!G) {
        fprintf(stderr, "moe_backend_cuda: %s\n", moe_error());
        return 1;
    }
    C = moe_backend_cpu();
    printf("device: %s\n", moe_cuda_device_name());
    return 0;
}

static __attribute__((unused)) uint64_t rng = 0x9e3779b97f4a7c15ull;
static inline float frand(void) { /* uniform [-1, 1) */
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float)((rng >> 40) * (1.0 / 8388608.0)) - 1.0f;
}
static inline float *rnd(size_t n, float scale) {
    float *p = moe_malloc(sizeof(float) * (n ? n : 1));
    for (size_t i = 0; i < n; i++) p[i] = frand() * scale;
    return p;
}
static inline float *bf16_round(const float *x, size_t n) { /* values exactly representable in bf16 */
    float *p = moe_malloc(sizeof(float) * (n ? n : 1));
    for (size_t i = 0; i < n; i++) p[i] = moe_bf16_to_f32(moe_f32_to_bf16(x[i]));
    return p;
}
static inline void *dev(const void *h, size_t nbytes) {
    void *d = G->alloc(nbytes);
    G->upload(d, h, nbytes);
    return d;
}
static inline float *host(const float *d, size_t n) {
    float *h = moe_malloc(sizeof(float) * (n ? n : 1));
    G->download(h, d, sizeof(float) * n);
    return h;
}
static inline void *dev_bf16(const float *w, size_t n) { /* weight as the model uploads it */
    uint16_t *t = moe_malloc(2 * (n ? n : 1));
    moe_dtype_from_f32(MOE_DT_BF16, w, t, n);
    void *d = dev(t, 2 * n);
    free(t);
    return d;
}

/* ||got - want|| / ||want|| (L2), and the worst element relative to max |want| */
static inline void check_close(const char *what, const float *got, const float *want, size_t n,
                        double tol) {
    double num = 0, den = 0, maxd = 0, maxw = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)got[i] - want[i];
        if (!isfinite(got[i])) d = INFINITY;
        num += d * d;
        den += (double)want[i] * want[i];
        if (fabs(d) > maxd) maxd = fabs(d);
        if (fabs(want[i]) > maxw) maxw = fabs(want[i]);
    }
    double rel = den > 0 ? sqrt(num / den) : sqrt(num);
    double relmax = maxw > 0 ? maxd / maxw : maxd;
    if (!(rel <= tol && relmax <= tol * 10)) {
        print_error("%s: relative L2 error %.3g, max error %.3g of max |x| (tolerance %.3g)\n",
                    what, rel, relmax, tol);
        fail();
    }
}
static inline void check_close_d(const char *what, const double *got, const double *want, size_t n,
                          double tol) {
    for (size_t i = 0; i < n; i++) {
        double d = fabs(got[i] - want[i]), s = fabs(want[i]);
        if (!(d <= tol * s + 1e-12)) {
            print_error("%s[%zu]: %.17g vs CPU %.17g (relative tolerance %.3g)\n", what, i, got[i],
                        want[i], tol);
            fail();
        }
    }
}

/* the router configurations the tests run (forward and backward): mode,
 * renormalisation, tokens, experts, top-k */
static const struct {
    int mode, renorm, T, E, K;
} router_cases[] __attribute__((unused)) = {
    {MOE_ROUTE_SOFTMAX_TOPK, MOE_RENORM_NONE, 129, 60, 4},
    {MOE_ROUTE_SOFTMAX_TOPK, MOE_RENORM_SUM, 129, 64, 6},
    {MOE_ROUTE_SOFTMAX_TOPK, MOE_RENORM_SUM_EPS, 77, 64, 6},
    {MOE_ROUTE_TOPK_SOFTMAX, MOE_RENORM_NONE, 131, 8, 2},
    {MOE_ROUTE_SOFTMAX_TOPK, MOE_RENORM_SUM, 3, 128, 8},
};
#define N_ROUTER_CASES ((int)(sizeof router_cases / sizeof router_cases[0]))

#endif
