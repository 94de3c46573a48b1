// probe.cu - find CUDA devices and check that cuBLAS initialises on one.
// The first CUDA translation unit: it keeps nvcc + cuBLAS in every build.
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <stdio.h>

extern "C" int moe_cuda_probe(char *msg, size_t msglen) {
    int n = 0;
    cudaError_t err = cudaGetDeviceCount(&n);
    if (err != cudaSuccess) {
        if (msg && msglen) snprintf(msg, msglen, "cudaGetDeviceCount: %s", cudaGetErrorString(err));
        return 0;
    }
    if (n > 0) {
        cublasHandle_t h;
        cublasStatus_t st = cublasCreate(&h);
        if (st != CUBLAS_STATUS_SUCCESS) {
            if (msg && msglen) snprintf(msg, msglen, "cublasCreate failed (status %d)", (int)st);
            return 0;
        }
        cublasDestroy(h);
    }
    return n;
}
