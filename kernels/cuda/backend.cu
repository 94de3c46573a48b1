// backend.cu - the CUDA implementation of kernels.h (see backend_cuda.h for
// the error model and the precision choices).
//
// Everything runs on one non-blocking stream in issue order; `sync` waits
// for it.  Each op's result is deterministic: reductions are done by one
// block per row in a fixed tree order, cuBLAS runs with its default
// (deterministic, no atomics) settings on one stream, and no op uses atomics.
// Element-wise formulas follow kernels/cpu.c; products that the CPU rounds
// before an add use __fmul_rn/__fadd_rn so that nvcc does not fuse them.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <unordered_map>
#include <vector>

extern "C" {
#include "common.h"
#include "kernels.h"
}
#include "backend_cuda.h"

// ---- state and error handling ---------------------------------------------

static struct {
    int init;        // 0 = not tried, 1 = ready, -1 = failed (error kept in msg)
    int failed;      // sticky device error
    int device;
    int sync_each;   // MOE_CUDA_SYNC=1
    int precision;   // MOE_CUDA_PREC_*
    int grouped_ok;  // cublasGemmGroupedBatchedEx accepted BF16 -> F32 (1), refused (0), untried (-1)
    cudaStream_t stream;
    cublasHandle_t blas;
    int pools;       // stream-ordered allocator available
    size_t att_smem; // dynamic shared memory the attention kernel is allowed
    size_t smem_optin;
    char msg[512];
    char name[256];
    size_t live, peak, used_peak;
} g = {0, 0, 0, 0, 0, -1, 0, 0, 0, 0, 0, {0}, {0}, 0, 0, 0};

static std::unordered_map<void *, size_t> *g_sizes;
static char g_dummy[64]; // handed out by alloc after a device error

static void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void fail(const char *fmt, ...) {
    if (g.failed) return; // keep the first error: later ones are consequences
    char buf[440];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    snprintf(g.msg, sizeof g.msg, "cuda: %s", buf);
    g.failed = 1;
    moe_error_set(MOE_ERR_DEVICE, "%s", g.msg);
}

static bool cuda_ok(cudaError_t e, const char *expr, const char *file, int line) {
    if (e == cudaSuccess) return true;
    fail("%s:%d: %s: %s (%s)", file, line, expr, cudaGetErrorName(e), cudaGetErrorString(e));
    return false;
}
static bool cublas_ok(cublasStatus_t s, const char *expr, const char *file, int line) {
    if (s == CUBLAS_STATUS_SUCCESS) return true;
    fail("%s:%d: %s: %s (%s)", file, line, expr, cublasGetStatusName(s), cublasGetStatusString(s));
    return false;
}
// Every CUDA / cuBLAS call goes through one of these; they name the expression.
#define CK(expr) cuda_ok((expr), #expr, __FILE__, __LINE__)
#define CKB(expr) cublas_ok((expr), #expr, __FILE__, __LINE__)
// After a kernel launch: launch errors now, execution errors with MOE_CUDA_SYNC=1.
#define CK_LAUNCH(name)                                                                     \
    do {                                                                                    \
        CK(cudaGetLastError());                                                             \
        if (g.sync_each && !g.failed) cuda_ok(cudaStreamSynchronize(g.stream), name, __FILE__, __LINE__); \
    } while (0)
// Top of every op: nothing runs after a device error.
#define LIVE() \
    do {       \
        if (g.failed) return; \
    } while (0)

static inline unsigned nblocks(size_t n, unsigned threads) {
    size_t b = (n + threads - 1) / threads;
    if (b > 1u << 20) b = 1u << 20; // grid-stride loops cover the rest
    return (unsigned)(b ? b : 1);
}

// ---- memory -----------------------------------------------------------------

static void *raw_alloc(size_t n) {
    if (g.failed) return g_dummy;
    if (n == 0) n = 1;
    void *p = NULL;
    cudaError_t e = g.pools ? cudaMallocAsync(&p, n, g.stream) : cudaMalloc(&p, n);
    if (e != cudaSuccess || !p) {
        (void)cudaGetLastError(); // clear the (non-sticky) allocation error
        size_t fr = 0, tot = 0;
        cudaMemGetInfo(&fr, &tot);
        if (e == cudaErrorMemoryAllocation)
            fail("out of device memory allocating %.1f MiB (free %.0f of %.0f MiB; "
                 "this backend holds %.0f MiB)",
                 n / 1048576.0, fr / 1048576.0, tot / 1048576.0, g.live / 1048576.0);
        else
            cuda_ok(e, g.pools ? "cudaMallocAsync(&p, n, stream)" : "cudaMalloc(&p, n)", __FILE__,
                    __LINE__);
        return g_dummy;
    }
    (*g_sizes)[p] = n;
    g.live += n;
    if (g.live > g.peak) g.peak = g.live;
    size_t fr = 0, tot = 0;
    if (cudaMemGetInfo(&fr, &tot) == cudaSuccess && tot - fr > g.used_peak) g.used_peak = tot - fr;
    return p;
}

static void raw_free(void *p) {
    if (!p || p == (void *)g_dummy) return;
    auto it = g_sizes->find(p);
    if (it != g_sizes->end()) {
        g.live -= it->second;
        g_sizes->erase(it);
    }
    if (g.failed) return; // the context may be unusable; leak rather than cascade
    if (g.pools)
        CK(cudaFreeAsync(p, g.stream));
    else
        CK(cudaFree(p));
}

static void *cu_alloc(size_t n) { return raw_alloc(n); }
static void cu_free(void *p) { raw_free(p); }

static void cu_upload(void *dst, const void *src, size_t n) {
    LIVE();
    if (n) CK(cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, g.stream));
    if (g.sync_each) CK(cudaStreamSynchronize(g.stream));
}
static void cu_download(void *dst, const void *src, size_t n) {
    if (g.failed) {
        if (n) memset(dst, 0, n);
        return;
    }
    if (!n) return;
    if (CK(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToHost, g.stream)))
        CK(cudaStreamSynchronize(g.stream));
    if (g.failed) memset(dst, 0, n);
}
static void cu_copy(void *dst, const void *src, size_t n) {
    LIVE();
    if (n && dst != src) CK(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToDevice, g.stream));
}
static void cu_zero(void *dst, size_t n) {
    LIVE();
    if (n) CK(cudaMemsetAsync(dst, 0, n, g.stream));
}
static void cu_sync(void) {
    LIVE();
    CK(cudaStreamSynchronize(g.stream));
}

// Growable scratch buffers (stream-ordered, so replacing one is safe).
struct scratch {
    void *p;
    size_t n;
};
static scratch s_xb, s_wf, s_probs, s_ptrs, s_rope, s_div;
static void *scratch_get(scratch &s, size_t n) {
    if (n > s.n) {
        raw_free(s.p);
        size_t want = n + n / 4;
        s.p = raw_alloc(want);
        s.n = s.p == (void *)g_dummy ? 0 : want;
    }
    return s.p;
}

// ---- block reductions (blockDim.x a multiple of 32, all threads call) --------

#define FULL 0xffffffffu

__device__ double block_sum(double v, double *sh /* [33] */) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(FULL, v, o);
    __syncthreads(); // sh may still be read from a previous call
    if (lane == 0) sh[w] = v;
    __syncthreads();
    if (w == 0) {
        v = lane < nw ? sh[lane] : 0.0;
        for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(FULL, v, o);
        if (lane == 0) sh[32] = v;
    }
    __syncthreads();
    return sh[32];
}

__device__ float block_max(float v, float *sh /* [33] */) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_down_sync(FULL, v, o));
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    if (w == 0) {
        v = lane < nw ? sh[lane] : -INFINITY;
        for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_down_sync(FULL, v, o));
        if (lane == 0) sh[32] = v;
    }
    __syncthreads();
    return sh[32];
}

#define ROW_THREADS 256

// ---- GEMM ---------------------------------------------------------------------

__global__ void k_f32_to_bf16(__nv_bfloat16 *d, const float *s, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        d[i] = __float2bfloat16_rn(s[i]);
}
__global__ void k_bf16_to_f32(float *d, const __nv_bfloat16 *s, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        d[i] = __bfloat162float(s[i]);
}
__global__ void k_add_bias(float *y, const float *b, size_t T, int N) {
    size_t n = T * (size_t)N;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        y[i] += b[i % N];
}

static const __nv_bfloat16 *to_bf16(const float *x, size_t n) {
    __nv_bfloat16 *xb = (__nv_bfloat16 *)scratch_get(s_xb, n * sizeof(__nv_bfloat16));
    if (g.failed) return NULL;
    k_f32_to_bf16<<<nblocks(n, 256), 256, 0, g.stream>>>(xb, x, n);
    CK_LAUNCH("k_f32_to_bf16");
    return xb;
}

// y[T,N] (row-major) = x[T,K] · W[N,K]ᵀ: in cuBLAS's column-major terms
// yᵀ (N×T, ld N) = op_T(W as K×N, ld K) · (xᵀ as K×T, ld K).
static void gemm_rows(float *y, const void *xin, cudaDataType xt, const void *w, cudaDataType wt,
                      int T, int K, int N, float beta) {
    const float alpha = 1.0f;
    CKB(cublasGemmEx(g.blas, CUBLAS_OP_T, CUBLAS_OP_N, N, T, K, &alpha, w, wt, K, xin, xt, K, &beta,
                     y, CUDA_R_32F, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

static void cu_matmul(float *y, const float *x, const void *w, const float *bias, int T, int K,
                      int N, int accumulate) {
    LIVE();
    if (T <= 0 || N <= 0) return;
    if (K <= 0) {
        if (!accumulate) CK(cudaMemsetAsync(y, 0, sizeof(float) * (size_t)T * N, g.stream));
    } else if (g.precision == MOE_CUDA_PREC_F32) {
        size_t nw = (size_t)N * K;
        float *wf = (float *)scratch_get(s_wf, nw * sizeof(float));
        if (g.failed) return;
        k_bf16_to_f32<<<nblocks(nw, 256), 256, 0, g.stream>>>(wf, (const __nv_bfloat16 *)w, nw);
        CK_LAUNCH("k_bf16_to_f32");
        gemm_rows(y, x, CUDA_R_32F, wf, CUDA_R_32F, T, K, N, accumulate ? 1.0f : 0.0f);
    } else {
        const __nv_bfloat16 *xb = to_bf16(x, (size_t)T * K);
        if (!xb) return;
        gemm_rows(y, xb, CUDA_R_16BF, w, CUDA_R_16BF, T, K, N, accumulate ? 1.0f : 0.0f);
    }
    if (bias && !g.failed) {
        size_t n = (size_t)T * N;
        k_add_bias<<<nblocks(n, 256), 256, 0, g.stream>>>(y, bias, (size_t)T, N);
        CK_LAUNCH("k_add_bias");
    }
    if (g.sync_each && !g.failed) CK(cudaStreamSynchronize(g.stream));
}

extern "C" void moe_cuda_matmul_grouped(float *y, const float *x, const void *const *w,
                                        const int32_t *off, int G, int K, int N, int accumulate) {
    LIVE();
    if (G <= 0 || N <= 0) return;
    int rows = off[G] - off[0];
    if (rows <= 0) return;
    float *y0 = y, beta = accumulate ? 1.0f : 0.0f;
    const float *x0 = x;
    if (K <= 0 || g.precision == MOE_CUDA_PREC_F32) { // the plain op covers these
        for (int e = 0; e < G; e++) {
            int n = off[e + 1] - off[e];
            if (n > 0)
                cu_matmul(y0 + (size_t)(off[e] - off[0]) * N, x0 + (size_t)(off[e] - off[0]) * K,
                          w[e], NULL, n, K, N, accumulate);
        }
        return;
    }
    const __nv_bfloat16 *xb = to_bf16(x, (size_t)rows * K);
    if (!xb) return;
    // one group per non-empty expert (group_size 1, its own m)
    std::vector<const void *> A, B;
    std::vector<void *> C;
    std::vector<int> m, n, k, lda, ldb, ldc, gs;
    std::vector<cublasOperation_t> ta, tb;
    std::vector<float> al, be;
    for (int e = 0; e < G; e++) {
        int r = off[e + 1] - off[e];
        if (r <= 0) continue;
        size_t row0 = (size_t)(off[e] - off[0]);
        A.push_back(w[e]);
        B.push_back(xb + row0 * K);
        C.push_back(y0 + row0 * N);
        m.push_back(N), n.push_back(r), k.push_back(K);
        lda.push_back(K), ldb.push_back(K), ldc.push_back(N), gs.push_back(1);
        ta.push_back(CUBLAS_OP_T), tb.push_back(CUBLAS_OP_N);
        al.push_back(1.0f), be.push_back(beta);
    }
    int ng = (int)A.size();
    if (g.grouped_ok != 0) {
        // pointer arrays live in device memory: A | B | C
        void **dp = (void **)scratch_get(s_ptrs, sizeof(void *) * 3 * (size_t)ng);
        if (g.failed) return;
        std::vector<const void *> hp;
        hp.insert(hp.end(), A.begin(), A.end());
        hp.insert(hp.end(), B.begin(), B.end());
        hp.insert(hp.end(), C.begin(), C.end());
        if (!CK(cudaMemcpyAsync(dp, hp.data(), sizeof(void *) * 3 * (size_t)ng,
                                cudaMemcpyHostToDevice, g.stream)))
            return;
        // hp is pageable: the copy has been staged when cudaMemcpyAsync returns,
        // but keep it simple and safe: wait before hp goes out of scope below.
        cublasStatus_t st = cublasGemmGroupedBatchedEx(
            g.blas, ta.data(), tb.data(), m.data(), n.data(), k.data(), al.data(),
            (const void *const *)dp, CUDA_R_16BF, lda.data(), (const void *const *)(dp + ng),
            CUDA_R_16BF, ldb.data(), be.data(), (void *const *)(dp + 2 * ng), CUDA_R_32F,
            ldc.data(), ng, gs.data(), CUBLAS_COMPUTE_32F);
        if (st == CUBLAS_STATUS_SUCCESS) {
            g.grouped_ok = 1;
            CK(cudaStreamSynchronize(g.stream));
            return;
        }
        if (st != CUBLAS_STATUS_NOT_SUPPORTED && st != CUBLAS_STATUS_INVALID_VALUE) {
            cublas_ok(st, "cublasGemmGroupedBatchedEx(BF16 x BF16 -> F32)", __FILE__, __LINE__);
            return;
        }
        g.grouped_ok = 0; // this cuBLAS does not group these types: loop instead
    }
    for (int i = 0; i < ng; i++) {
        if (!CKB(cublasGemmEx(g.blas, CUBLAS_OP_T, CUBLAS_OP_N, N, n[i], K, &al[i], A[i],
                              CUDA_R_16BF, K, B[i], CUDA_R_16BF, K, &be[i], C[i], CUDA_R_32F, N,
                              CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT)))
            return;
    }
    if (g.sync_each) CK(cudaStreamSynchronize(g.stream));
}

// ---- RMSNorm, RoPE ------------------------------------------------------------

__global__ void k_rmsnorm(float *y, const float *x, const float *w, float eps, int C) {
    __shared__ double sh[33];
    const float *xr = x + (size_t)blockIdx.x * C;
    float *yr = y + (size_t)blockIdx.x * C;
    double ss = 0.0;
    for (int c = threadIdx.x; c < C; c += blockDim.x) ss += (double)xr[c] * xr[c];
    ss = block_sum(ss, sh);
    float r = (float)(1.0 / sqrt(ss / C + (double)eps));
    for (int c = threadIdx.x; c < C; c += blockDim.x) yr[c] = w[c] * (xr[c] * r); // y may alias x
}

static void cu_rmsnorm(float *y, const float *x, const float *w, float eps, int T, int C) {
    LIVE();
    if (T <= 0 || C <= 0) return;
    // y may alias x: no __restrict__ anywhere, each element read and written by one thread
    for (int t0 = 0; t0 < T; t0 += 1 << 30) {
        int n = T - t0 < (1 << 30) ? T - t0 : (1 << 30);
        k_rmsnorm<<<n, ROW_THREADS, 0, g.stream>>>(y + (size_t)t0 * C, x + (size_t)t0 * C, w, eps, C);
        CK_LAUNCH("k_rmsnorm");
    }
}

__global__ void k_rope(float *x, const float *invf, int pos0, int T, int nh, int D) {
    int half = D / 2;
    size_t n = (size_t)T * half;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        int t = (int)(i / half), j = (int)(i % half);
        float a = (float)(pos0 + t) * invf[j];
        float c = (float)cos((double)a), s = (float)sin((double)a);
        for (int h = 0; h < nh; h++) {
            float *v = x + ((size_t)t * nh + h) * D;
            float x0 = v[j], x1 = v[j + half];
            v[j] = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s));
            v[j + half] = __fadd_rn(__fmul_rn(x1, c), __fmul_rn(x0, s));
        }
    }
}

static void cu_rope(float *x, float theta, int pos0, int T, int nh, int D) {
    LIVE();
    int half = D / 2;
    if (T <= 0 || nh <= 0 || half <= 0) return;
    // inverse frequencies on the host exactly as the CPU op computes them;
    // cached on the device for the last (theta, D)
    static float last_theta = -1.0f;
    static int last_D = -1;
    float *invf = (float *)s_rope.p;
    if (!invf || theta != last_theta || D != last_D || s_rope.n < sizeof(float) * half) {
        std::vector<float> h(half);
        for (int j = 0; j < half; j++) {
            float e = (float)(2 * j) / (float)D;
            float p = (float)pow((double)theta, (double)e);
            h[j] = 1.0f / p;
        }
        invf = (float *)scratch_get(s_rope, sizeof(float) * half);
        if (g.failed) return;
        if (!CK(cudaMemcpyAsync(invf, h.data(), sizeof(float) * half, cudaMemcpyHostToDevice,
                                g.stream)) ||
            !CK(cudaStreamSynchronize(g.stream))) // h is a local: wait for the copy
            return;
        last_theta = theta;
        last_D = D;
    }
    size_t n = (size_t)T * half;
    k_rope<<<nblocks(n, 256), 256, 0, g.stream>>>(x, invf, pos0, T, nh, D);
    CK_LAUNCH("k_rope");
}

// ---- attention ------------------------------------------------------------------
//
// One block per (tile of ATT_BQ queries, query head).  Key/value tiles of
// ATT_BK rows go through shared memory; the softmax is the online
// (running max / running sum) form, all fp32; each output element is owned
// by one thread and accumulated in key order, so results are deterministic.

#define ATT_BQ 16
#define ATT_BK 32 // == warp size: one lane per key in the softmax step
#define ATT_THREADS 128

static size_t att_smem_bytes(int D) {
    return sizeof(float) *
           ((size_t)ATT_BQ * D * 2 + (size_t)ATT_BK * (D + 1) + (size_t)ATT_BK * D + ATT_BQ * ATT_BK +
            3 * ATT_BQ);
}

__global__ void __launch_bounds__(ATT_THREADS)
    k_attention(float *out, const float *q, const float *k, const float *v, float scale, int T,
                int nh, int nkv, int D) {
    extern __shared__ float sm[];
    const int KS = D + 1; // padded key rows: no bank conflicts in the score loop
    float *Qs = sm;                  // [BQ][D]
    float *Ks = Qs + ATT_BQ * D;     // [BK][D+1]
    float *Vs = Ks + ATT_BK * KS;    // [BK][D]
    float *Ss = Vs + ATT_BK * D;     // [BQ][BK]
    float *Os = Ss + ATT_BQ * ATT_BK; // [BQ][D]
    float *Ms = Os + ATT_BQ * D;     // [BQ] running max
    float *Ls = Ms + ATT_BQ;         // [BQ] running sum
    float *Cs = Ls + ATT_BQ;         // [BQ] rescale factor of this tile

    const int h = blockIdx.y, kh = h / (nh / nkv);
    const int q0 = blockIdx.x * ATT_BQ;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const size_t qs = (size_t)nh * D, ks = (size_t)nkv * D;

    for (int e = tid; e < ATT_BQ * D; e += ATT_THREADS) {
        int r = e / D, d = e % D, i = q0 + r;
        Qs[e] = i < T ? q[(size_t)i * qs + (size_t)h * D + d] : 0.0f;
        Os[e] = 0.0f;
    }
    if (tid < ATT_BQ) {
        Ms[tid] = -INFINITY;
        Ls[tid] = 0.0f;
        Cs[tid] = 1.0f;
    }
    const int qlast = min(q0 + ATT_BQ, T) - 1;
    for (int k0 = 0; k0 <= qlast; k0 += ATT_BK) {
        __syncthreads(); // the previous tile is no longer read
        for (int e = tid; e < ATT_BK * D; e += ATT_THREADS) {
            int c = e / D, d = e % D, j = k0 + c;
            float kv = 0.0f, vv = 0.0f;
            if (j < T) {
                kv = k[(size_t)j * ks + (size_t)kh * D + d];
                vv = v[(size_t)j * ks + (size_t)kh * D + d];
            }
            Ks[c * KS + d] = kv;
            Vs[c * D + d] = vv;
        }
        __syncthreads();
        for (int e = tid; e < ATT_BQ * ATT_BK; e += ATT_THREADS) {
            int r = e / ATT_BK, c = e % ATT_BK, i = q0 + r, j = k0 + c;
            float s = -INFINITY;
            if (i < T && j <= i) {
                const float *qr = Qs + r * D, *kr = Ks + c * KS;
                float acc = 0.0f;
                for (int d = 0; d < D; d++) acc += qr[d] * kr[d];
                s = acc * scale;
            }
            Ss[e] = s;
        }
        __syncthreads();
        for (int r = warp; r < ATT_BQ; r += ATT_THREADS / 32) {
            float s = Ss[r * ATT_BK + lane];
            float tmax = s;
            for (int o = 16; o > 0; o >>= 1) tmax = fmaxf(tmax, __shfl_xor_sync(FULL, tmax, o));
            float mold = Ms[r];
            float mnew = fmaxf(mold, tmax);
            float p = 0.0f, corr = 1.0f;
            if (mnew != -INFINITY) { // rows past T, or keys all masked so far: nothing to add
                p = expf(s - mnew);  // s = -inf gives 0
                corr = expf(mold - mnew);
            }
            float psum = p;
            for (int o = 16; o > 0; o >>= 1) psum += __shfl_xor_sync(FULL, psum, o);
            Ss[r * ATT_BK + lane] = p;
            if (lane == 0) {
                Ms[r] = mnew;
                Ls[r] = Ls[r] * corr + psum;
                Cs[r] = corr;
            }
        }
        __syncthreads();
        for (int e = tid; e < ATT_BQ * D; e += ATT_THREADS) {
            int r = e / D, d = e % D;
            const float *pr = Ss + r * ATT_BK;
            float acc = Os[e] * Cs[r];
            for (int c = 0; c < ATT_BK; c++) acc += pr[c] * Vs[c * D + d];
            Os[e] = acc;
        }
    }
    __syncthreads();
    for (int e = tid; e < ATT_BQ * D; e += ATT_THREADS) {
        int r = e / D, d = e % D, i = q0 + r;
        if (i < T) out[(size_t)i * qs + (size_t)h * D + d] = Os[e] / Ls[r];
    }
}

static void cu_attention(float *out, const float *q, const float *k, const float *v, float scale,
                         int T, int nh, int nkv, int D) {
    LIVE();
    if (T <= 0 || nh <= 0 || D <= 0) return;
    size_t smem = att_smem_bytes(D);
    if (smem > g.att_smem) {
        if (smem > g.smem_optin) {
            fail("attention: head_dim %d needs %zu bytes of shared memory per block, the device "
                 "allows %zu",
                 D, smem, g.smem_optin);
            return;
        }
        if (!CK(cudaFuncSetAttribute(k_attention, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     (int)smem)))
            return;
        g.att_smem = smem;
    }
    dim3 grid((unsigned)((T + ATT_BQ - 1) / ATT_BQ), (unsigned)nh);
    k_attention<<<grid, ATT_THREADS, smem, g.stream>>>(out, q, k, v, scale, T, nh, nkv, D);
    CK_LAUNCH("k_attention");
}

// ---- element-wise -----------------------------------------------------------------

__global__ void k_swiglu(float *h, const float *gu, int T, int I) {
    size_t n = (size_t)T * I;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t t = i / I, c = i % I;
        float gv = gu[t * 2 * I + c], u = gu[t * 2 * I + I + c];
        float sg = 1.0f / (1.0f + expf(-gv));
        h[i] = (gv * sg) * u;
    }
}
static void cu_swiglu(float *h, const float *gu, int T, int I) {
    LIVE();
    size_t n = (size_t)T * (I > 0 ? I : 0);
    if (!n) return;
    k_swiglu<<<nblocks(n, 256), 256, 0, g.stream>>>(h, gu, T, I);
    CK_LAUNCH("k_swiglu");
}

__global__ void k_axpy(float *y, const float *x, float a, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        y[i] = __fadd_rn(y[i], __fmul_rn(a, x[i]));
}
static void cu_axpy(float *y, const float *x, float a, size_t n) {
    LIVE();
    if (!n) return;
    k_axpy<<<nblocks(n, 256), 256, 0, g.stream>>>(y, x, a, n);
    CK_LAUNCH("k_axpy");
}

__global__ void k_sigmoid_gate_add(float *y, const float *x, const float *z, int T, int C) {
    size_t n = (size_t)T * C;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float gt = 1.0f / (1.0f + expf(-z[i / C]));
        y[i] = __fadd_rn(y[i], __fmul_rn(gt, x[i]));
    }
}
static void cu_sigmoid_gate_add(float *y, const float *x, const float *z, int T, int C) {
    LIVE();
    size_t n = (size_t)T * (C > 0 ? C : 0);
    if (!n) return;
    k_sigmoid_gate_add<<<nblocks(n, 256), 256, 0, g.stream>>>(y, x, z, T, C);
    CK_LAUNCH("k_sigmoid_gate_add");
}

// ---- routing and dispatch -----------------------------------------------------------

// the CPU's softmax_row: float exps, double sum, one float reciprocal
__device__ void d_softmax_row(float *p, const float *x, int C) {
    float mx = -INFINITY;
    for (int c = 0; c < C; c++) mx = fmaxf(mx, x[c]);
    double sum = 0.0;
    for (int c = 0; c < C; c++) {
        p[c] = expf(x[c] - mx);
        sum += p[c];
    }
    float inv = (float)(1.0 / sum);
    for (int c = 0; c < C; c++) p[c] *= inv;
}

// the CPU's topk_row: ties to the lower index, sorted descending
__device__ void d_topk_row(int32_t *idx, float *val, const float *s, int E, int K) {
    for (int k = 0; k < K; k++) {
        int best = -1;
        for (int e = 0; e < E; e++) {
            bool taken = false;
            for (int j = 0; j < k; j++)
                if (idx[j] == e) taken = true;
            if (taken) continue;
            if (best < 0 || s[e] > s[best]) best = e;
        }
        idx[k] = best;
        val[k] = s[best];
    }
}

__global__ void k_router(int32_t *idx, float *wt, float *probs, float *scratch,
                         const float *logits, int mode, int renorm, int T, int E, int K) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    const float *l = logits + (size_t)t * E;
    int32_t *ix = idx + (size_t)t * K;
    float *w = wt + (size_t)t * K;
    if (mode == MOE_ROUTE_TOPK_SOFTMAX) {
        d_topk_row(ix, w, l, E, K);
        d_softmax_row(w, w, K);
        if (probs) d_softmax_row(probs + (size_t)t * E, l, E);
    } else {
        float *p = probs ? probs + (size_t)t * E : scratch + (size_t)t * E;
        d_softmax_row(p, l, E);
        d_topk_row(ix, w, p, E, K);
    }
    if (renorm != MOE_RENORM_NONE) {
        float s = 0.0f;
        for (int k = 0; k < K; k++) s += w[k];
        if (renorm == MOE_RENORM_SUM_EPS) s += 1e-20f;
        for (int k = 0; k < K; k++) w[k] /= s;
    }
}

static void cu_router(int32_t *idx, float *wt, float *probs, const float *logits, int mode,
                      int renorm, int T, int E, int K) {
    LIVE();
    if (T <= 0 || E <= 0 || K <= 0) return;
    float *scratch = NULL;
    if (mode != MOE_ROUTE_TOPK_SOFTMAX && !probs) {
        scratch = (float *)scratch_get(s_probs, sizeof(float) * (size_t)T * E);
        if (g.failed) return;
    }
    k_router<<<(T + 127) / 128, 128, 0, g.stream>>>(idx, wt, probs, scratch, logits, mode, renorm,
                                                     T, E, K);
    CK_LAUNCH("k_router");
}

__global__ void k_gather_rows(float *dst, const float *src, const int32_t *rows, int n, int C) {
    size_t tot = (size_t)n * C;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < tot;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t r = i / C, c = i % C;
        dst[i] = src[(size_t)rows[r] * C + c];
    }
}
static void cu_gather_rows(float *dst, const float *src, const int32_t *rows, int n, int C) {
    LIVE();
    size_t tot = (size_t)(n > 0 ? n : 0) * (C > 0 ? C : 0);
    if (!tot) return;
    k_gather_rows<<<nblocks(tot, 256), 256, 0, g.stream>>>(dst, src, rows, n, C);
    CK_LAUNCH("k_gather_rows");
}

// rows are distinct within one call (kernels.h), so every destination
// element has exactly one writer: no atomics, same result as the CPU's loop
__global__ void k_scatter_add_rows(float *dst, const float *src, const int32_t *rows,
                                   const float *scale, int n, int C) {
    size_t tot = (size_t)n * C;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < tot;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t r = i / C, c = i % C;
        float *d = dst + (size_t)rows[r] * C + c;
        *d = scale ? __fadd_rn(*d, __fmul_rn(src[i], scale[r])) : __fadd_rn(*d, src[i]);
    }
}
static void cu_scatter_add_rows(float *dst, const float *src, const int32_t *rows,
                                const float *scale, int n, int C) {
    LIVE();
    size_t tot = (size_t)(n > 0 ? n : 0) * (C > 0 ? C : 0);
    if (!tot) return;
    k_scatter_add_rows<<<nblocks(tot, 256), 256, 0, g.stream>>>(dst, src, rows, scale, n, C);
    CK_LAUNCH("k_scatter_add_rows");
}

// ---- reductions for the search tools ---------------------------------------------------

__global__ void k_softmax_rows(float *p, const float *x, int C) {
    __shared__ float shf[33];
    __shared__ double shd[33];
    const float *xr = x + (size_t)blockIdx.x * C;
    float *pr = p + (size_t)blockIdx.x * C;
    float mx = -INFINITY;
    for (int c = threadIdx.x; c < C; c += blockDim.x) mx = fmaxf(mx, xr[c]);
    mx = block_max(mx, shf);
    double s = 0.0;
    for (int c = threadIdx.x; c < C; c += blockDim.x) s += (double)expf(xr[c] - mx);
    s = block_sum(s, shd);
    float inv = (float)(1.0 / s);
    for (int c = threadIdx.x; c < C; c += blockDim.x) pr[c] = expf(xr[c] - mx) * inv; // p may alias x: same c, same thread
}

static void cu_softmax_rows(float *p, const float *x, int T, int C) {
    LIVE();
    if (T <= 0 || C <= 0) return;
    k_softmax_rows<<<T, ROW_THREADS, 0, g.stream>>>(p, x, C);
    CK_LAUNCH("k_softmax_rows");
}

// the CPU's row_divergence, one block per token, sums in double
__global__ void k_divergence(double *dout, const float *a, const float *b, int metric, int C) {
    __shared__ float shf[33];
    __shared__ double shd[33];
    const float *ar = a + (size_t)blockIdx.x * C, *br = b + (size_t)blockIdx.x * C;
    const double eps = 1e-10;
    double r = 0.0;
    if (metric == MOE_DIV_JS || metric == MOE_DIV_KL) {
        float ma = -INFINITY, mb = -INFINITY;
        for (int c = threadIdx.x; c < C; c += blockDim.x) {
            ma = fmaxf(ma, ar[c]);
            mb = fmaxf(mb, br[c]);
        }
        ma = block_max(ma, shf);
        mb = block_max(mb, shf);
        double sa = 0.0, sb = 0.0;
        for (int c = threadIdx.x; c < C; c += blockDim.x) {
            sa += (double)expf(ar[c] - ma);
            sb += (double)expf(br[c] - mb);
        }
        sa = block_sum(sa, shd);
        sb = block_sum(sb, shd);
        float ia = (float)(1.0 / sa), ib = (float)(1.0 / sb);
        double kp = 0.0, kq = 0.0;
        for (int c = threadIdx.x; c < C; c += blockDim.x) {
            float pa = expf(ar[c] - ma) * ia, pb = expf(br[c] - mb) * ib;
            double p = (double)pa + eps, q = (double)pb + eps;
            if (metric == MOE_DIV_JS) {
                float m = 0.5f * (pa + pb);
                double lm = log((double)m + eps);
                kp += p * (log(p) - lm);
                kq += q * (log(q) - lm);
            } else {
                kp += p * (log(p) - log(q));
            }
        }
        kp = block_sum(kp, shd);
        if (metric == MOE_DIV_JS) {
            kq = block_sum(kq, shd);
            r = 0.5 * (kp + kq);
        } else {
            r = kp;
        }
    } else if (metric == MOE_DIV_MSE) {
        double s = 0.0;
        for (int c = threadIdx.x; c < C; c += blockDim.x) {
            double d = (double)ar[c] - br[c];
            s += d * d;
        }
        r = block_sum(s, shd) / C;
    } else { // MOE_DIV_COSINE
        double ab = 0, aa = 0, bb = 0;
        for (int c = threadIdx.x; c < C; c += blockDim.x) {
            ab += (double)ar[c] * br[c];
            aa += (double)ar[c] * ar[c];
            bb += (double)br[c] * br[c];
        }
        ab = block_sum(ab, shd);
        aa = block_sum(aa, shd);
        bb = block_sum(bb, shd);
        double den = sqrt(aa) * sqrt(bb);
        r = den > 0 ? 1.0 - ab / den : (aa == bb ? 0.0 : 1.0);
    }
    if (threadIdx.x == 0) dout[blockIdx.x] = r;
}

static void cu_divergence(double *d, const float *a, const float *b, int metric, int T, int C) {
    LIVE();
    if (T <= 0) return;
    if (C <= 0) {
        CK(cudaMemsetAsync(d, 0, sizeof(double) * T, g.stream));
        return;
    }
    // d should be backend memory (kernels.h); a host array is tolerated, since
    // per-token results are usually read on the host right away: the kernel
    // writes a device scratch and the result is copied back synchronously
    cudaPointerAttributes at;
    bool host = true;
    if (cudaPointerGetAttributes(&at, d) == cudaSuccess)
        host = at.type != cudaMemoryTypeDevice && at.type != cudaMemoryTypeManaged;
    else
        (void)cudaGetLastError();
    double *dd = d;
    if (host) {
        dd = (double *)scratch_get(s_div, sizeof(double) * (size_t)T);
        if (g.failed) return;
    }
    k_divergence<<<T, ROW_THREADS, 0, g.stream>>>(dd, a, b, metric, C);
    CK_LAUNCH("k_divergence");
    if (host && !g.failed &&
        CK(cudaMemcpyAsync(d, dd, sizeof(double) * (size_t)T, cudaMemcpyDeviceToHost, g.stream)))
        CK(cudaStreamSynchronize(g.stream));
}

// ---- the table, initialisation, extras ------------------------------------------------------

static moe_backend g_backend;

static int init_once(void) {
    if (g.init) return g.init;
    g.init = -1;
    g_sizes = new std::unordered_map<void *, size_t>();
    const char *env = getenv("MOE_CUDA_SYNC");
    g.sync_each = env && *env && strcmp(env, "0") != 0;
    env = getenv("MOE_CUDA_PRECISION");
    if (env && !strcmp(env, "f32")) g.precision = MOE_CUDA_PREC_F32;
    env = getenv("MOE_CUDA_DEVICE");
    g.device = env && *env ? atoi(env) : 0;

    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0) {
        (void)cudaGetLastError();
        snprintf(g.msg, sizeof g.msg, "cuda: no usable CUDA device (%s)",
                 e != cudaSuccess ? cudaGetErrorString(e) : "cudaGetDeviceCount found 0 devices");
        moe_error_set(MOE_ERR_DEVICE, "%s", g.msg);
        return -1;
    }
    if (g.device < 0 || g.device >= n) {
        snprintf(g.msg, sizeof g.msg, "cuda: MOE_CUDA_DEVICE=%d but only %d device(s) visible",
                 g.device, n);
        moe_error_set(MOE_ERR_DEVICE, "%s", g.msg);
        return -1;
    }
    // from here on, failures are ordinary checked calls (sticky)
    if (!CK(cudaSetDevice(g.device))) return -1;
    cudaDeviceProp prop;
    if (!CK(cudaGetDeviceProperties(&prop, g.device))) return -1;
    g.smem_optin = prop.sharedMemPerBlockOptin;
    g.att_smem = 48 * 1024;
    size_t fr = 0, tot = 0;
    if (!CK(cudaMemGetInfo(&fr, &tot))) return -1;
    snprintf(g.name, sizeof g.name, "%.120s, sm_%d%d, %d SMs, %.1f GiB", prop.name, prop.major,
             prop.minor, prop.multiProcessorCount, tot / 1073741824.0);
    int pools = 0;
    if (!CK(cudaDeviceGetAttribute(&pools, cudaDevAttrMemoryPoolsSupported, g.device))) return -1;
    if (!CK(cudaStreamCreateWithFlags(&g.stream, cudaStreamNonBlocking))) return -1;
    if (pools) {
        cudaMemPool_t pool;
        if (!CK(cudaDeviceGetDefaultMemPool(&pool, g.device))) return -1;
        uint64_t keep = UINT64_MAX; // keep freed blocks for reuse (layer after layer)
        if (!CK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep))) return -1;
        g.pools = 1;
    }
    if (!CKB(cublasCreate(&g.blas))) return -1;
    if (!CKB(cublasSetStream(g.blas, g.stream))) return -1;
    if (!CKB(cublasSetMathMode(g.blas, CUBLAS_DEFAULT_MATH))) return -1; // no TF32 for f32 GEMMs

    moe_backend *b = &g_backend;
    b->name = "cuda";
    b->weight_dtype = MOE_WT_BF16;
    b->alloc = cu_alloc;
    b->free = cu_free;
    b->upload = cu_upload;
    b->download = cu_download;
    b->copy = cu_copy;
    b->zero = cu_zero;
    b->sync = cu_sync;
    b->matmul = cu_matmul;
    b->rmsnorm = cu_rmsnorm;
    b->rope = cu_rope;
    b->attention = cu_attention;
    b->swiglu = cu_swiglu;
    b->axpy = cu_axpy;
    b->sigmoid_gate_add = cu_sigmoid_gate_add;
    b->router = cu_router;
    b->gather_rows = cu_gather_rows;
    b->scatter_add_rows = cu_scatter_add_rows;
    b->softmax_rows = cu_softmax_rows;
    b->divergence = cu_divergence;
    g.init = 1;
    return 1;
}

extern "C" const moe_backend *moe_backend_cuda(void) {
    if (init_once() != 1) {
        moe_error_set(MOE_ERR_DEVICE, "%s", g.msg[0] ? g.msg : "cuda: initialisation failed");
        return NULL;
    }
    return &g_backend;
}

extern "C" int moe_cuda_status(void) {
    if (!g.failed) return 0;
    moe_error_set(MOE_ERR_DEVICE, "%s", g.msg);
    return -1;
}

extern "C" void moe_cuda_set_grouped(int on) { g.grouped_ok = on ? -1 : 0; }

extern "C" void moe_cuda_set_precision(int prec) {
    g.precision = prec == MOE_CUDA_PREC_F32 ? MOE_CUDA_PREC_F32 : MOE_CUDA_PREC_BF16;
}

extern "C" void moe_cuda_mem_stats(moe_cuda_mem *m) {
    memset(m, 0, sizeof *m);
    m->live = g.live;
    m->peak = g.peak;
    m->used_peak = g.used_peak;
    if (g.init == 1 && !g.failed) {
        cudaMemGetInfo(&m->free, &m->total);
        if (m->total - m->free > g.used_peak) g.used_peak = m->total - m->free;
        m->used_peak = g.used_peak;
    }
}

extern "C" void moe_cuda_mem_reset_peak(void) {
    g.peak = g.live;
    g.used_peak = 0;
}

extern "C" const char *moe_cuda_device_name(void) { return g.name[0] ? g.name : "none"; }

// ---- benchmark helper: cuBLAS BF16 GEMM rate on random data -------------------------------------

__global__ void k_fill_bf16(__nv_bfloat16 *d, size_t n, uint64_t seed) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        uint64_t z = seed + i * 0x9e3779b97f4a7c15ull; // splitmix64
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        z ^= z >> 31;
        d[i] = __float2bfloat16_rn((float)((z >> 40) * (1.0 / 8388608.0)) - 1.0f);
    }
}

extern "C" double moe_cuda_gemm_tflops(int M, int N, int K, int f32_out, int iters) {
    if (init_once() != 1 || g.failed) return -1;
    size_t na = (size_t)M * K, nb = (size_t)K * N, nc = (size_t)M * N;
    __nv_bfloat16 *A = (__nv_bfloat16 *)raw_alloc(na * 2), *B = (__nv_bfloat16 *)raw_alloc(nb * 2);
    void *Cm = raw_alloc(nc * (f32_out ? 4 : 2));
    double tf = -1;
    if (!g.failed) {
        k_fill_bf16<<<nblocks(na, 256), 256, 0, g.stream>>>(A, na, 1);
        k_fill_bf16<<<nblocks(nb, 256), 256, 0, g.stream>>>(B, nb, 2);
        CK_LAUNCH("k_fill_bf16");
        const float alpha = 1.0f, beta = 0.0f;
        cudaEvent_t e0, e1;
        CK(cudaEventCreate(&e0));
        CK(cudaEventCreate(&e1));
        for (int it = -3; it < iters && !g.failed; it++) { // 3 warm-ups
            if (it == 0) CK(cudaEventRecord(e0, g.stream));
            CKB(cublasGemmEx(g.blas, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &alpha, B, CUDA_R_16BF, K,
                             A, CUDA_R_16BF, K, &beta, Cm, f32_out ? CUDA_R_32F : CUDA_R_16BF, N,
                             CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        }
        CK(cudaEventRecord(e1, g.stream));
        float ms = 0;
        if (CK(cudaEventSynchronize(e1)) && CK(cudaEventElapsedTime(&ms, e0, e1)) && ms > 0)
            tf = 2.0 * M * N * K * iters / (ms * 1e-3) / 1e12;
        cudaEventDestroy(e0);
        cudaEventDestroy(e1);
    }
    raw_free(A), raw_free(B), raw_free(Cm);
    return g.failed ? -1 : tf;
}

__global__ void k_fill_f32(float *d, size_t n, uint64_t seed, float scale) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        uint64_t z = seed * 0xd1b54a32d192ed03ull + i * 0x9e3779b97f4a7c15ull;
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        z ^= z >> 31;
        d[i] = scale * ((float)((z >> 40) * (1.0 / 8388608.0)) - 1.0f);
    }
}
__global__ void k_fill_bf16s(__nv_bfloat16 *d, size_t n, uint64_t seed, float scale) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        uint64_t z = seed * 0xd1b54a32d192ed03ull + i * 0x9e3779b97f4a7c15ull;
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        z ^= z >> 31;
        d[i] = __float2bfloat16_rn(scale * ((float)((z >> 40) * (1.0 / 8388608.0)) - 1.0f));
    }
}

extern "C" void moe_cuda_fill_random(void *d, int dtype, size_t n, uint64_t seed, float scale) {
    LIVE();
    if (!n) return;
    if (dtype == MOE_WT_BF16)
        k_fill_bf16s<<<nblocks(n, 256), 256, 0, g.stream>>>((__nv_bfloat16 *)d, n, seed, scale);
    else
        k_fill_f32<<<nblocks(n, 256), 256, 0, g.stream>>>((float *)d, n, seed, scale);
    CK_LAUNCH("k_fill_random");
}
