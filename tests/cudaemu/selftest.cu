// selftest.cu - checks of the CUDA emulator itself (tests/cudaemu): warp
// shuffles, barriers, shared memory per block, launch limits, the runtime's
// memory checks, stream/event ordering, cuBLAS GEMM semantics (ld, op, beta,
// types, argument errors) and BF16 rounding, each against a host reference.
// Plain CUDA: the checks that hold on a real GPU too are unconditional; the
// ones about the emulator's own behaviour (deferred streams, poisoned memory)
// run only when the device is the emulator.  Built by `make cuda-emu` into
// build/emu/selftest and run first by the emulated GPU tests.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <vector>

static int failures, is_emu;
#define CHECK(cond, ...)                                  \
    do {                                                  \
        if (!(cond)) {                                    \
            failures++;                                   \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
            fprintf(stderr, __VA_ARGS__);                 \
            fputc('\n', stderr);                          \
        }                                                 \
    } while (0)
#define CU(expr) CHECK((expr) == cudaSuccess, "%s: %s", #expr, cudaGetErrorString(cudaGetLastError()))

// ---- warp and block collectives -------------------------------------------------

__device__ float block_sum(float v, float *sh) { // sh[33]
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    if (w == 0) { // one warp alone: its shuffles must not wait for the others
        v = lane < nw ? sh[lane] : 0.0f;
        for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
        if (lane == 0) sh[32] = v;
    }
    __syncthreads();
    return sh[32];
}

// out[5 per thread]: block sum, xor-butterfly warp sum, inclusive warp scan,
// lane 5's value, the block index seen through a __shared__ variable
__global__ void k_collectives(float *out, const float *in) {
    __shared__ float sh[33];
    __shared__ int who;
    int t = blockIdx.x * blockDim.x + threadIdx.x, lane = threadIdx.x & 31;
    float v = in[t];
    float s = block_sum(v, sh);
    float x = v;
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    float scan = v;
    for (int o = 1; o < 32; o <<= 1) {
        float u = __shfl_up_sync(0xffffffffu, scan, o);
        if (lane >= o) scan += u;
    }
    float b5 = __shfl_sync(0xffffffffu, v, 5);
    if (threadIdx.x == 0) who = blockIdx.x;
    __syncthreads();
    float *o = out + (size_t)t * 5;
    o[0] = s, o[1] = x, o[2] = scan, o[3] = b5, o[4] = (float)who;
}

static void test_collectives(void) {
    const int B = 3, T = 96, N = B * T;
    std::vector<float> h(N), got((size_t)N * 5);
    for (int i = 0; i < N; i++) h[i] = (float)((i * 7) % 13); // small integers: exact sums
    float *d_in, *d_out;
    CU(cudaMalloc((void **)&d_in, sizeof(float) * N));
    CU(cudaMalloc((void **)&d_out, sizeof(float) * N * 5));
    CU(cudaMemcpy(d_in, h.data(), sizeof(float) * N, cudaMemcpyHostToDevice));
    k_collectives<<<B, T>>>(d_out, d_in);
    CU(cudaGetLastError());
    CU(cudaMemcpy(got.data(), d_out, sizeof(float) * N * 5, cudaMemcpyDeviceToHost));
    for (int t = 0; t < N; t++) {
        int b = t / T, w0 = t / 32 * 32, lane = t % 32;
        float bs = 0, ws = 0, sc = 0;
        for (int i = b * T; i < (b + 1) * T; i++) bs += h[i];
        for (int i = w0; i < w0 + 32; i++) ws += h[i];
        for (int i = w0; i <= w0 + lane; i++) sc += h[i];
        const float *o = &got[(size_t)t * 5];
        CHECK(o[0] == bs, "thread %d: block sum %g, want %g", t, o[0], bs);
        CHECK(o[1] == ws, "thread %d: xor warp sum %g, want %g", t, o[1], ws);
        CHECK(o[2] == sc, "thread %d: scan %g, want %g", t, o[2], sc);
        CHECK(o[3] == h[w0 + 5], "thread %d: broadcast %g, want %g", t, o[3], h[w0 + 5]);
        CHECK(o[4] == (float)b, "thread %d: __shared__ saw block %g, want %d", t, o[4], b);
    }
    CU(cudaFree(d_in));
    CU(cudaFree(d_out));
}

// ---- dynamic shared memory and launch limits --------------------------------------

__global__ void k_smem_rev(int *out, int n) { // reverse through shared memory
    extern __shared__ int sm[];
    for (int i = threadIdx.x; i < n; i += blockDim.x) sm[i] = i;
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x) out[i] = sm[n - 1 - i];
}

static void test_launch(void) {
    const int n = 16384; // 64 KiB: needs the opt-in attribute
    int *d;
    CU(cudaMalloc((void **)&d, sizeof(int) * n));
    (void)cudaGetLastError();
    k_smem_rev<<<1, 128, sizeof(int) * n>>>(d, n);
    CHECK(cudaGetLastError() != cudaSuccess, "64 KiB of dynamic shared memory launched without the attribute");
    CU(cudaFuncSetAttribute(k_smem_rev, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)(sizeof(int) * n)));
    k_smem_rev<<<1, 128, sizeof(int) * n>>>(d, n);
    CU(cudaGetLastError());
    std::vector<int> h(n);
    CU(cudaMemcpy(h.data(), d, sizeof(int) * n, cudaMemcpyDeviceToHost));
    for (int i = 0; i < n; i++) CHECK(h[i] == n - 1 - i, "smem reverse [%d] = %d", i, h[i]);
    k_smem_rev<<<1, 2048, 16>>>(d, 4);
    CHECK(cudaGetLastError() == cudaErrorInvalidConfiguration, "a 2048-thread block was accepted");
    CU(cudaFree(d));
}

// ---- memory --------------------------------------------------------------------------

static void test_memory(void) {
    float *d, h[8] = {0};
    CU(cudaMalloc((void **)&d, sizeof h));
    CHECK(cudaMemcpy(d, h, sizeof h + 4, cudaMemcpyHostToDevice) == cudaErrorInvalidValue,
          "a copy past the allocation's end was accepted");
    CHECK(cudaMemcpy(h, h + 1, 4, cudaMemcpyDeviceToHost) == cudaErrorInvalidValue,
          "a host pointer was accepted as the source of a device-to-host copy");
    (void)cudaGetLastError();
    cudaPointerAttributes at;
    CU(cudaPointerGetAttributes(&at, d + 3));
    CHECK(at.type == cudaMemoryTypeDevice, "device pointer: type %d", (int)at.type);
    CU(cudaPointerGetAttributes(&at, h));
    CHECK(at.type == cudaMemoryTypeUnregistered, "host pointer: type %d", (int)at.type);
    void *pin;
    CU(cudaMallocHost(&pin, 64));
    CU(cudaPointerGetAttributes(&at, pin));
    CHECK(at.type == cudaMemoryTypeHost, "pinned pointer: type %d", (int)at.type);
    CU(cudaFreeHost(pin));
    size_t fr0, tot, fr1;
    CU(cudaMemGetInfo(&fr0, &tot));
    CU(cudaFree(d));
    CU(cudaMemGetInfo(&fr1, &tot));
    if (is_emu) CHECK(fr1 == fr0 + sizeof h, "free memory %zu -> %zu after freeing %zu", fr0, fr1, sizeof h);
    CHECK(cudaFree(d) == cudaErrorInvalidValue, "a double free was accepted");
    CHECK(cudaFree(h) == cudaErrorInvalidValue, "freeing host memory was accepted");
    (void)cudaGetLastError();
    if (is_emu) { // fresh device memory is NaN bytes, not zeros
        uint32_t *p, v = 0;
        CU(cudaMalloc((void **)&p, 4));
        CU(cudaMemcpy(&v, p, 4, cudaMemcpyDeviceToHost));
        CHECK(v == 0xffffffffu, "fresh device memory reads %#x", v);
        CU(cudaFree(p));
    }
}

// ---- streams and events ------------------------------------------------------------------

__global__ void k_fill(float *x, float v, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = v;
}
__global__ void k_add1(float *y, const float *x, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[i] + 1.0f;
}

static void test_streams(void) {
    const int n = 1000;
    cudaStream_t a, b;
    cudaEvent_t e;
    float *x, *y, *pin;
    CU(cudaStreamCreateWithFlags(&a, cudaStreamNonBlocking));
    CU(cudaStreamCreateWithFlags(&b, cudaStreamNonBlocking));
    CU(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    CU(cudaMalloc((void **)&x, sizeof(float) * n));
    CU(cudaMalloc((void **)&y, sizeof(float) * n));
    CU(cudaMallocHost((void **)&pin, sizeof(float) * n));
    k_fill<<<(n + 255) / 256, 256, 0, a>>>(x, 41.0f, n);
    CU(cudaEventRecord(e, a));
    if (is_emu) CHECK(cudaEventQuery(e) == cudaErrorNotReady, "the emulator ran stream work at issue");
    CU(cudaStreamWaitEvent(b, e, 0));
    k_add1<<<(n + 255) / 256, 256, 0, b>>>(y, x, n);
    CU(cudaMemcpyAsync(pin, y, sizeof(float) * n, cudaMemcpyDeviceToHost, b));
    CU(cudaStreamSynchronize(b)); // runs a's fill first: b waits for e
    for (int i = 0; i < n; i++) CHECK(pin[i] == 42.0f, "y[%d] = %g after the event wait", i, pin[i]);
    if (is_emu) { // a pinned source is read when the copy runs, not at issue
        for (int i = 0; i < n; i++) pin[i] = 1.0f;
        CU(cudaMemcpyAsync(x, pin, sizeof(float) * n, cudaMemcpyHostToDevice, a));
        for (int i = 0; i < n; i++) pin[i] = 2.0f; // a bug on a GPU: the copy may not have run
        CU(cudaStreamSynchronize(a));
        float v = 0;
        CU(cudaMemcpy(&v, x, 4, cudaMemcpyDeviceToHost));
        CHECK(v == 2.0f, "the pinned copy read %g at issue", v);
    }
    CU(cudaEventDestroy(e));
    CU(cudaStreamDestroy(a));
    CHECK(cudaStreamSynchronize(a) == cudaErrorInvalidResourceHandle, "a destroyed stream was usable");
    (void)cudaGetLastError();
    CU(cudaStreamDestroy(b));
    CU(cudaFreeHost(pin));
    CU(cudaFree(x));
    CU(cudaFree(y));
}

// ---- cuBLAS -------------------------------------------------------------------------------

static uint64_t rng = 88172645463325252ull;
static float frand(void) {
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (float)((rng >> 40) * (1.0 / 8388608.0)) - 1.0f;
}
static float bf(float f) { return __bfloat162float(__float2bfloat16_rn(f)); }

// C (m x n, ldc) = alpha op(A) op(B) + beta C, column-major, in double
static void ref_gemm(int ta, int tb, int m, int n, int k, float alpha, const std::vector<float> &A,
                     int lda, const std::vector<float> &B, int ldb, float beta, std::vector<float> &C,
                     int ldc) {
    for (int j = 0; j < n; j++)
        for (int i = 0; i < m; i++) {
            double s = 0;
            for (int p = 0; p < k; p++)
                s += (double)(ta ? A[(size_t)i * lda + p] : A[(size_t)p * lda + i]) *
                     (tb ? B[(size_t)p * ldb + j] : B[(size_t)j * ldb + p]);
            C[(size_t)j * ldc + i] = (float)(alpha * s + (beta != 0 ? beta * C[(size_t)j * ldc + i] : 0));
        }
}

static void test_gemm(void) {
    cublasHandle_t h;
    CHECK(cublasCreate(&h) == CUBLAS_STATUS_SUCCESS, "cublasCreate");
    const int m = 13, n = 7, k = 37;
    for (int bf16 = 0; bf16 < 2; bf16++)
        for (int ta = 0; ta < 2; ta++)
            for (int tb = 0; tb < 2; tb++)
                for (int acc = 0; acc < 2; acc++) {
                    int ra = ta ? k : m, ca = ta ? m : k, rb = tb ? n : k, cb = tb ? k : n;
                    int lda = ra + 3, ldb = rb + 1, ldc = m + 2;
                    std::vector<float> A((size_t)lda * ca), B((size_t)ldb * cb), C((size_t)ldc * n);
                    for (auto &v : A) v = bf(frand());
                    for (auto &v : B) v = bf(frand());
                    for (auto &v : C) v = frand();
                    size_t es = bf16 ? 2 : 4;
                    std::vector<__nv_bfloat16> Ab(A.size()), Bb(B.size());
                    for (size_t i = 0; i < A.size(); i++) Ab[i] = __float2bfloat16_rn(A[i]);
                    for (size_t i = 0; i < B.size(); i++) Bb[i] = __float2bfloat16_rn(B[i]);
                    void *dA, *dB;
                    float *dC;
                    CU(cudaMalloc(&dA, A.size() * es));
                    CU(cudaMalloc(&dB, B.size() * es));
                    CU(cudaMalloc((void **)&dC, C.size() * 4));
                    CU(cudaMemcpy(dA, bf16 ? (void *)Ab.data() : (void *)A.data(), A.size() * es, cudaMemcpyHostToDevice));
                    CU(cudaMemcpy(dB, bf16 ? (void *)Bb.data() : (void *)B.data(), B.size() * es, cudaMemcpyHostToDevice));
                    CU(cudaMemcpy(dC, C.data(), C.size() * 4, cudaMemcpyHostToDevice));
                    float alpha = 0.75f, beta = acc ? 1.0f : 0.0f;
                    cudaDataType t = bf16 ? CUDA_R_16BF : CUDA_R_32F;
                    cublasStatus_t st = cublasGemmEx(h, ta ? CUBLAS_OP_T : CUBLAS_OP_N, tb ? CUBLAS_OP_T : CUBLAS_OP_N,
                                                     m, n, k, &alpha, dA, t, lda, dB, t, ldb, &beta, dC,
                                                     CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
                    CHECK(st == CUBLAS_STATUS_SUCCESS, "cublasGemmEx: %s", cublasGetStatusName(st));
                    std::vector<float> got(C.size());
                    CU(cudaMemcpy(got.data(), dC, C.size() * 4, cudaMemcpyDeviceToHost));
                    ref_gemm(ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
                    for (int j = 0; j < n; j++)
                        for (int i = 0; i < ldc; i++) {
                            size_t x = (size_t)j * ldc + i;
                            if (i >= m) continue; // padding: untouched (compared below for one)
                            CHECK(fabsf(got[x] - C[x]) <= 1e-5f * (1 + fabsf(C[x])),
                                  "gemm bf16=%d ta=%d tb=%d acc=%d C[%d,%d] = %.9g, want %.9g", bf16, ta,
                                  tb, acc, i, j, got[x], C[x]);
                        }
                    CHECK(got[m] == C[m], "gemm wrote the ldc padding");
                    st = cublasGemmEx(h, ta ? CUBLAS_OP_T : CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, &alpha, dA, t,
                                      ra - 1 > 0 ? ra - 1 : 0, dB, t, ldb, &beta, dC, CUDA_R_32F, ldc,
                                      CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
                    CHECK(st == CUBLAS_STATUS_INVALID_VALUE, "lda < rows: %s", cublasGetStatusName(st));
                    CU(cudaFree(dA));
                    CU(cudaFree(dB));
                    CU(cudaFree(dC));
                }
    { // BF16 output: the FP32 result rounded to nearest even
        float av = 1.0f + 1.0f / 128, alpha = 0.5f + 0.5f / 128 + 0.5f / 256, zero = 0.0f;
        __nv_bfloat16 ha = __float2bfloat16_rn(av), hb = __float2bfloat16_rn(1.0f), hc;
        void *dA, *dB, *dC;
        CU(cudaMalloc(&dA, 2));
        CU(cudaMalloc(&dB, 2));
        CU(cudaMalloc(&dC, 2));
        CU(cudaMemcpy(dA, &ha, 2, cudaMemcpyHostToDevice));
        CU(cudaMemcpy(dB, &hb, 2, cudaMemcpyHostToDevice));
        cublasStatus_t st = cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, 1, 1, 1, &alpha, dA, CUDA_R_16BF, 1,
                                         dB, CUDA_R_16BF, 1, &zero, dC, CUDA_R_16BF, 1,
                                         CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
        CHECK(st == CUBLAS_STATUS_SUCCESS, "bf16-out gemm: %s", cublasGetStatusName(st));
        CU(cudaMemcpy(&hc, dC, 2, cudaMemcpyDeviceToHost));
        float want = bf(av * alpha);
        CHECK(__bfloat162float(hc) == want, "bf16 output %.9g, want %.9g", __bfloat162float(hc), want);
        CU(cudaFree(dA));
        CU(cudaFree(dB));
        CU(cudaFree(dC));
    }
    CHECK(cublasDestroy(h) == CUBLAS_STATUS_SUCCESS, "cublasDestroy");
}

// ---- BF16 conversions ---------------------------------------------------------------------

static void test_bf16(void) {
    struct {
        uint32_t in;
        unsigned short out;
    } c[] = {
        {0x3f808000u, 0x3f80}, // tie, even below: down
        {0x3f818000u, 0x3f82}, // tie, odd below: up
        {0x3f808001u, 0x3f81}, // above the tie: up
        {0x7f7fffffu, 0x7f80}, // FLT_MAX: to infinity
        {0x80000001u, 0x8000}, // tiny negative: -0
    };
    for (auto &x : c) {
        float f;
        memcpy(&f, &x.in, 4);
        __nv_bfloat16 b = __float2bfloat16_rn(f);
        unsigned short u;
        memcpy(&u, &b, 2);
        CHECK(u == x.out, "bf16(%#x) = %#x, want %#x", x.in, u, x.out);
    }
    float nan = NAN;
    __nv_bfloat16 b = __float2bfloat16_rn(nan);
    CHECK(isnan(__bfloat162float(b)), "bf16(NaN) is not NaN");
}

int main(void) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
        printf("SKIP: no CUDA device\n");
        return 77;
    }
    cudaDeviceProp p;
    if (cudaGetDeviceProperties(&p, 0) != cudaSuccess) return 1;
    is_emu = strstr(p.name, "emulator") != NULL;
    printf("device: %s\n", p.name);
    test_collectives();
    test_launch();
    test_memory();
    test_streams();
    test_gemm();
    test_bf16();
    printf("%s: %d failure(s)\n", failures ? "FAIL" : "ok", failures);
    return failures ? 1 : 0;
}
