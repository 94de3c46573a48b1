/* device.c - device discovery; the CUDA part lives in kernels/cuda/. */
#include "device.h"

#include <stdio.h>

#ifdef MOE_HAVE_CUDA
int moe_cuda_probe(char *msg, size_t msglen); /* kernels/cuda/probe.cu */
int moe_device_cuda_built(void) { return 1; }
int moe_device_cuda_count(char *msg, size_t msglen) { return moe_cuda_probe(msg, msglen); }
#else
int moe_device_cuda_built(void) { return 0; }
int moe_device_cuda_count(char *msg, size_t msglen) {
    if (msg && msglen) snprintf(msg, msglen, "this build has no CUDA backend (nvcc was not found; CUDA=0)");
    return 0;
}
#endif
