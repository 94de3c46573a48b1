/* select.c - run-time choice of the compute backend (--device), the sticky
 * device-error check, and the stand-ins for the CUDA extras in builds
 * without CUDA (so that every caller links whatever the build). */
#include <stdio.h>
#include <string.h>

#include "backend_cuda.h"
#include "common.h"
#include "device.h"
#include "kernels.h"

const moe_backend *moe_backend_select(const char *device) {
    if (device && *device && strcmp(device, "cuda") != 0) return moe_backend_get(device);
    if (device && *device) { /* explicitly "cuda": no fallback */
        if (!moe_device_cuda_built()) {
            moe_error_set(MOE_ERR_DEVICE,
                          "--device cuda: this build has no CUDA backend (rebuild with nvcc "
                          "installed, or use --device cpu)");
            return NULL;
        }
        char why[256] = "";
        if (moe_device_cuda_count(why, sizeof why) <= 0) {
            moe_error_set(MOE_ERR_DEVICE, "--device cuda: no usable CUDA device (%s)",
                          why[0] ? why : "none visible");
            return NULL;
        }
        return moe_backend_cuda(); /* NULL + MOE_ERR_DEVICE if initialisation fails */
    }
    /* default: cuda when built and a device is visible, else cpu */
    if (moe_device_cuda_built() && moe_device_cuda_count(NULL, 0) > 0) {
        const moe_backend *b = moe_backend_cuda();
        if (!b) {
            char msg[400];
            snprintf(msg, sizeof msg, "%s", moe_error());
            moe_error_set(MOE_ERR_DEVICE, "%s (a GPU is visible but unusable; --device cpu runs "
                                          "on the CPU)", msg);
        }
        return b;
    }
    return moe_backend_cpu();
}

int moe_backend_status(const moe_backend *b) {
    if (b && b->name && !strcmp(b->name, "cuda")) return moe_cuda_status();
    return 0;
}

void moe_backend_matmul_grouped(const moe_backend *b, float *y, const float *x,
                                const void *const *w, const int32_t *off, int G, int K, int N,
                                int accumulate) {
#ifdef MOE_HAVE_CUDA
    if (b->name && !strcmp(b->name, "cuda")) {
        moe_cuda_matmul_grouped(y, x, w, off, G, K, N, accumulate);
        return;
    }
#endif
    for (int g = 0; g < G; g++) {
        int n = off[g + 1] - off[g];
        if (n <= 0) continue;
        size_t r0 = (size_t)(off[g] - off[0]);
        b->matmul(y + r0 * N, x + r0 * K, w[g], NULL, n, K, N, accumulate);
    }
}

#ifndef MOE_HAVE_CUDA
/* builds without CUDA: the extras exist and say so */
const moe_backend *moe_backend_cuda(void) {
    moe_error_set(MOE_ERR_DEVICE, "cuda: this build has no CUDA backend (nvcc was not found; CUDA=0)");
    return NULL;
}
int moe_cuda_status(void) { return 0; }
void moe_cuda_set_precision(int prec) { (void)prec; }
void moe_cuda_set_grouped(int on) { (void)on; }
void moe_cuda_matmul_grouped(float *y, const float *x, const void *const *w, const int32_t *off,
                             int G, int K, int N, int accumulate) {
    (void)y, (void)x, (void)w, (void)off, (void)G, (void)K, (void)N, (void)accumulate;
    moe_error_set(MOE_ERR_DEVICE, "cuda: this build has no CUDA backend");
}
void moe_cuda_mem_stats(moe_cuda_mem *m) { memset(m, 0, sizeof *m); }
void moe_cuda_mem_reset_peak(void) {}
const char *moe_cuda_device_name(void) { return "none"; }
void moe_cuda_fill_random(void *d, int dtype, size_t n, uint64_t seed, float scale) {
    (void)d, (void)dtype, (void)n, (void)seed, (void)scale;
}
double moe_cuda_gemm_tflops(int M, int N, int K, int f32_out, int iters) {
    (void)M, (void)N, (void)K, (void)f32_out, (void)iters;
    return -1;
}
#endif
