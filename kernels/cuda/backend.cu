// backend.cu - the CUDA implementation of kernels.h (see backend_cuda.h for
// the error model and the precision choices).
//
// Everything runs on one non-blocking stream in issue order; `sync` waits
// for it (and for the copy stream).  Weight uploads queued with upload_async
// run on a second non-blocking stream (the copy stream), ordered after the
// compute stream's work issued before them (an event per upload), and the
// compute stream waits for them at upload_fence (an event, no host wait).
// Each op's result is deterministic: reductions are done by one block per
// row in a fixed tree order, cuBLAS runs with its default
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
#include "cuda_plugin.h"

// The library's error state lives in the executable: report through the
// callback it handed to moe_cuda_plugin_open.
static moe_cuda_error_fn g_err;
static void report(const char *msg) {
    if (g_err) g_err(MOE_ERR_DEVICE, msg);
}

// ---- state and error handling ---------------------------------------------

static struct {
    int init;        // 0 = not tried, 1 = ready, -1 = failed (error kept in msg)
    int failed;      // sticky device error
    int device;
    int sync_each;   // moe_device_opts.sync_each_op
    int precision;   // MOE_CUDA_PREC_*
    int grouped_ok;  // cublasGemmGroupedBatchedEx accepted BF16 -> F32 (1), refused (0), untried (-1)
    cudaStream_t stream;
    cudaStream_t cstream; // copy stream of upload_async
    cublasHandle_t blas;
    int pools;       // stream-ordered allocator available
    size_t att_smem; // dynamic shared memory the attention kernel is allowed
    size_t smem_optin;
    char msg[512];
    char name[256];
    size_t live, peak, used_peak;
} g = {0, 0, 0, 0, 0, -1, 0, 0, 0, 0, 0, 0, {0}, {0}, 0, 0, 0};

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
    report(g.msg);
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

static int up_unfenced; // upload_async copies queued since the last upload_fence
static void cu_upload_fence(void);

static void raw_free(void *p) {
    if (!p || p == (void *)g_dummy) return;
    auto it = g_sizes->find(p);
    if (it != g_sizes->end()) {
        g.live -= it->second;
        g_sizes->erase(it);
    }
    if (g.failed) return; // the context may be unusable; leak rather than cascade
    if (up_unfenced) cu_upload_fence(); // a queued copy may still write into p
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
    if (g.cstream && !g.failed) CK(cudaStreamSynchronize(g.cstream));
}

// ---- asynchronous uploads (kernels.h: host_alloc .. upload_fence) ----------------------
//
// Ticket t's completion is event up_ev[t % UP_EVENTS]; before that event is
// recorded again (ticket t + UP_EVENTS), the host waits for it, so any ticket
// older than the ring is complete.  up_done: every ticket <= it is complete.
// Each upload first makes the copy stream wait for an event recorded on the
// compute stream: dst may come from a block that ops issued earlier still
// use (the model's pool, or cudaMallocAsync reusing a cudaFreeAsync'd block).
#define UP_EVENTS 256
static cudaEvent_t up_ev[UP_EVENTS], up_order, up_fence_ev;
static uint64_t up_issued, up_done;
static std::unordered_map<void *, size_t> *g_pinned; // host_alloc blocks that are pinned

static void *cu_host_alloc(size_t n) {
    if (n == 0) n = 1;
    void *p = NULL;
    if (g.init == 1 && !g.failed) {
        cudaError_t e = cudaHostAlloc(&p, n, cudaHostAllocDefault);
        if (e == cudaSuccess && p) {
            (*g_pinned)[p] = n;
            return p;
        }
        (void)cudaGetLastError(); // not sticky: pageable memory works too (slower copies)
        p = NULL;
    }
    p = malloc(n);
    if (!p) {
        fprintf(stderr, "cuda: out of host memory allocating %zu bytes\n", n);
        abort(); // kernels.h: never NULL
    }
    return p;
}

static void cu_upload_wait(uint64_t t) {
    if (g.failed) return;
    if (t == 0 || t > up_issued) t = up_issued;
    if (t <= up_done) return;
    if (t == up_issued) {
        if (CK(cudaStreamSynchronize(g.cstream))) up_done = up_issued;
        return;
    }
    if (up_issued - t < UP_EVENTS && !CK(cudaEventSynchronize(up_ev[t % UP_EVENTS]))) return;
    up_done = t; // copies on one stream complete in order
}

static void cu_host_free(void *p) {
    if (!p) return;
    if (g_pinned) {
        auto it = g_pinned->find(p);
        if (it != g_pinned->end()) {
            g_pinned->erase(it);
            if (!g.failed) {
                cu_upload_wait(0); // no copy may still read it (kernels.h already asks this)
                CK(cudaFreeHost(p));
            }
            return; // after a device error: leak rather than cascade
        }
    }
    free(p);
}

static uint64_t cu_upload_async(void *dst, const void *src, size_t n) {
    uint64_t t = ++up_issued;
    if (g.failed) {
        up_done = t;
        return t;
    }
    up_unfenced = 1;
    int slot = (int)(t % UP_EVENTS);
    if (t > UP_EVENTS && up_done < t - UP_EVENTS) { // the slot's previous ticket
        if (!CK(cudaEventSynchronize(up_ev[slot]))) return t;
        up_done = t - UP_EVENTS;
    }
    if (!CK(cudaEventRecord(up_order, g.stream)) || !CK(cudaStreamWaitEvent(g.cstream, up_order, 0)))
        return t;
    if (n && !CK(cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, g.cstream))) return t;
    CK(cudaEventRecord(up_ev[slot], g.cstream));
    if (g.sync_each && !g.failed && CK(cudaStreamSynchronize(g.cstream))) up_done = t;
    return t;
}

static void cu_upload_fence(void) {
    LIVE();
    if (!up_unfenced) return;
    if (CK(cudaEventRecord(up_fence_ev, g.cstream)) &&
        CK(cudaStreamWaitEvent(g.stream, up_fence_ev, 0)))
        up_unfenced = 0;
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

// Give the big scratch buffers back (the experts' ~450 MB at 25 600 tokens
// of DeepSeekMoE-16B, the activations' BF16 copy, the f32 weight copy of
// MOE_CUDA_PRECISION=f32).  The model calls it between phases (after the
// layers, at close), not per op, so the buffers are not reallocated per call;
// freed pool memory goes back to the device too.
static void cu_mem_info(size_t *free_bytes, size_t *total_bytes) {
    *free_bytes = *total_bytes = 0;
    if (g.failed) return;
    CK(cudaMemGetInfo(free_bytes, total_bytes));
}

static scratch s_exg, s_egu, s_eh;
static void cu_trim(void) {
    LIVE();
    scratch *big[] = {&s_xb, &s_wf, &s_probs, &s_div, &s_exg, &s_egu, &s_eh};
    for (scratch *b : big) {
        raw_free(b->p);
        b->p = NULL;
        b->n = 0;
    }
    if (g.pools && !g.failed) {
        cudaMemPool_t pool;
        if (CK(cudaStreamSynchronize(g.stream)) && CK(cudaDeviceGetDefaultMemPool(&pool, g.device)))
            CK(cudaMemPoolTrimTo(pool, 0));
    }
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

// Grouped GEMM on BF16 activations: for each group g with w[g] != NULL and
// off[g] < off[g+1], rows r = off[g]-off[0] .. of y [rows, N] (f32) get
//   y_r = xb_r · W_gᵀ (+ beta·y_r)
// with xb [rows, K] BF16 and W_g [N, K] BF16, FP32 accumulation.  One
// cublasGemmGroupedBatchedEx call (one group per expert, group size 1), or a
// loop of cublasGemmEx when this cuBLAS refuses the types.  Rows of skipped
// groups are not written.  w and off are host arrays.
// The host-side arguments (problem sizes, scalars, and the pinned pointer
// table copied to the device) live in a ring of GP_SETS parameter sets that
// outlive the call; a set is refilled only after the event recorded behind
// its GEMM has completed (normally long ago), so no stream synchronisation is
// needed per call and the vectors keep their capacity (no allocation churn).
#define GP_SETS 4
struct gparams {
    std::vector<const void *> A, B;
    std::vector<void *> C;
    std::vector<int> m, n, k, lda, ldb, ldc, gs;
    std::vector<cublasOperation_t> ta, tb;
    std::vector<float> al, be;
    void **hp;    // pinned: A | B | C, the source of the async copy to the device
    size_t hp_cap;
    cudaEvent_t done;
    bool pending;
};
static gparams g_gp[GP_SETS];
static int g_gpi;

static void grouped_bf16(float *y, const __nv_bfloat16 *xb, const void *const *w,
                         const int32_t *off, int G, int K, int N, float beta) {
    gparams &P = g_gp[g_gpi];
    if (P.pending) { // this set's previous GEMM (GP_SETS calls ago) must have read it
        if (!CK(cudaEventSynchronize(P.done))) return;
        P.pending = false;
    }
    P.A.clear(), P.B.clear(), P.C.clear(), P.m.clear(), P.n.clear(), P.k.clear();
    P.lda.clear(), P.ldb.clear(), P.ldc.clear(), P.gs.clear(), P.ta.clear(), P.tb.clear();
    P.al.clear(), P.be.clear();
    for (int e = 0; e < G; e++) {
        int r = off[e + 1] - off[e];
        if (r <= 0 || !w[e]) continue;
        size_t row0 = (size_t)(off[e] - off[0]);
        P.A.push_back(w[e]);
        P.B.push_back(xb + row0 * K);
        P.C.push_back(y + row0 * N);
        P.m.push_back(N), P.n.push_back(r), P.k.push_back(K);
        P.lda.push_back(K), P.ldb.push_back(K), P.ldc.push_back(N), P.gs.push_back(1);
        P.ta.push_back(CUBLAS_OP_T), P.tb.push_back(CUBLAS_OP_N);
        P.al.push_back(1.0f), P.be.push_back(beta);
    }
    int ng = (int)P.A.size();
    if (ng == 0) return;
    if (g.grouped_ok != 0) {
        size_t np = 3 * (size_t)ng;
        if (P.hp_cap < np) { // grows to the largest expert count once
            if (P.hp) CK(cudaFreeHost(P.hp));
            P.hp = NULL;
            P.hp_cap = 0;
            if (!CK(cudaHostAlloc((void **)&P.hp, sizeof(void *) * np, cudaHostAllocDefault)))
                return;
            P.hp_cap = np;
        }
        memcpy(P.hp, P.A.data(), sizeof(void *) * ng);
        memcpy(P.hp + ng, P.B.data(), sizeof(void *) * ng);
        memcpy(P.hp + 2 * ng, P.C.data(), sizeof(void *) * ng);
        // the device copy: stream-ordered, so the next call's copy cannot
        // overwrite it before this GEMM has read it
        void **dp = (void **)scratch_get(s_ptrs, sizeof(void *) * np);
        if (g.failed) return;
        if (!CK(cudaMemcpyAsync(dp, P.hp, sizeof(void *) * np, cudaMemcpyHostToDevice, g.stream)))
            return;
        cublasStatus_t st = cublasGemmGroupedBatchedEx(
            g.blas, P.ta.data(), P.tb.data(), P.m.data(), P.n.data(), P.k.data(), P.al.data(),
            (const void *const *)dp, CUDA_R_16BF, P.lda.data(), (const void *const *)(dp + ng),
            CUDA_R_16BF, P.ldb.data(), P.be.data(), (void *const *)(dp + 2 * ng), CUDA_R_32F,
            P.ldc.data(), ng, P.gs.data(), CUBLAS_COMPUTE_32F);
        if (st == CUBLAS_STATUS_SUCCESS) {
            g.grouped_ok = 1;
            if (CK(cudaEventRecord(P.done, g.stream))) P.pending = true;
            g_gpi = (g_gpi + 1) % GP_SETS;
            if (g.sync_each) CK(cudaStreamSynchronize(g.stream));
            return;
        }
        if (st != CUBLAS_STATUS_NOT_SUPPORTED && st != CUBLAS_STATUS_INVALID_VALUE) {
            cublas_ok(st, "cublasGemmGroupedBatchedEx(BF16 x BF16 -> F32)", __FILE__, __LINE__);
            return;
        }
        g.grouped_ok = 0; // this cuBLAS does not group these types: loop instead
        // (the pinned table may still be read by the queued copy: keep it pending)
        if (CK(cudaEventRecord(P.done, g.stream))) P.pending = true;
        g_gpi = (g_gpi + 1) % GP_SETS;
    }
    for (int i = 0; i < ng; i++) { // scalars by host pointer: read before each call returns
        if (!CKB(cublasGemmEx(g.blas, CUBLAS_OP_T, CUBLAS_OP_N, N, P.n[i], K, &P.al[i], P.A[i],
                              CUDA_R_16BF, K, P.B[i], CUDA_R_16BF, K, &P.be[i], P.C[i], CUDA_R_32F,
                              N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT)))
            return;
    }
    if (g.sync_each) CK(cudaStreamSynchronize(g.stream));
}

static void pl_matmul_grouped(float *y, const float *x, const void *const *w, const int32_t *off,
                              int G, int K, int N, int accumulate) {
    LIVE();
    if (G <= 0 || N <= 0) return;
    int rows = off[G] - off[0];
    if (rows <= 0) return;
    if (K <= 0 || g.precision == MOE_CUDA_PREC_F32) { // the plain op covers these
        for (int e = 0; e < G; e++) {
            int n = off[e + 1] - off[e];
            if (n > 0)
                cu_matmul(y + (size_t)(off[e] - off[0]) * N, x + (size_t)(off[e] - off[0]) * K,
                          w[e], NULL, n, K, N, accumulate);
        }
        return;
    }
    const __nv_bfloat16 *xb = to_bf16(x, (size_t)rows * K);
    if (!xb) return;
    grouped_bf16(y, xb, w, off, G, K, N, accumulate ? 1.0f : 0.0f);
}

// ---- grouped routed experts and their combine ------------------------------------
//
// experts: gather the rows of x (rounded to BF16 on the way: the GEMM input),
// one grouped gate/up GEMM [n, 2·Im] (f32), SwiGLU rounded to BF16, one
// grouped down GEMM into out.  Every output element is written by one
// thread or one GEMM tile: no atomics, deterministic.  With
// MOE_CUDA_PREC_F32, per expert FP32 GEMMs on f32 activations instead.

__global__ void k_gather_bf16(__nv_bfloat16 *dst, const float *src, const int32_t *rows, int n,
                              int C) {
    size_t tot = (size_t)n * C;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < tot;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t r = i / C, c = i % C;
        dst[i] = __float2bfloat16_rn(src[(size_t)rows[r] * C + c]);
    }
}

// h = silu(g)·u as k_swiglu (the CPU's formula), stored as BF16 or f32
template <typename T> __device__ inline T store_as(float v);
template <> __device__ inline float store_as<float>(float v) { return v; }
template <> __device__ inline __nv_bfloat16 store_as<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}
template <typename T> __global__ void k_swiglu_to(T *h, const float *gu, int R, int I) {
    size_t n = (size_t)R * I;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t t = i / I, c = i % I;
        float gv = gu[t * 2 * I + c], u = gu[t * 2 * I + I + c];
        float sg = 1.0f / (1.0f + expf(-gv));
        h[i] = store_as<T>((gv * sg) * u);
    }
}

static void cu_gather_rows(float *dst, const float *src, const int32_t *rows, int n, int C);

static void cu_experts(float *out, const float *x, const int32_t *rows, const int32_t *off,
                       const void *const *w_gu, const void *const *w_down, int E, int H, int Im) {
    LIVE();
    if (E <= 0 || H <= 0) return;
    int n = off[E] - off[0];
    if (n <= 0) return;
    // the experts that run; runs of consecutive ones share element-wise launches
    std::vector<const void *> wg(E, nullptr), wd(E, nullptr);
    std::vector<int> run0, run1; // row ranges [run0, run1) relative to off[0]
    for (int e = 0; e < E; e++) {
        int r0 = off[e] - off[0], r1 = off[e + 1] - off[0];
        if (!w_gu[e] || r1 <= r0) continue;
        wg[e] = w_gu[e];
        wd[e] = w_down[e];
        if (!run1.empty() && run1.back() == r0)
            run1.back() = r1;
        else
            run0.push_back(r0), run1.push_back(r1);
    }
    if (run0.empty()) return;
    if (Im <= 0) { // W_down · (empty) = 0
        for (size_t i = 0; i < run0.size(); i++)
            CK(cudaMemsetAsync(out + (size_t)run0[i] * H, 0,
                               sizeof(float) * (size_t)(run1[i] - run0[i]) * H, g.stream));
        return;
    }
    size_t I2 = 2 * (size_t)Im;
    float *gu = (float *)scratch_get(s_egu, sizeof(float) * (size_t)n * I2);
    if (g.failed) return;
    if (g.precision == MOE_CUDA_PREC_F32) {
        float *xg = (float *)scratch_get(s_exg, sizeof(float) * (size_t)n * H);
        float *h = (float *)scratch_get(s_eh, sizeof(float) * (size_t)n * Im);
        if (g.failed) return;
        cu_gather_rows(xg, x, rows, n, H);
        for (int e = 0; e < E; e++) {
            if (!wg[e]) continue;
            size_t r0 = (size_t)(off[e] - off[0]);
            cu_matmul(gu + r0 * I2, xg + r0 * H, wg[e], NULL, off[e + 1] - off[e], H, (int)I2, 0);
        }
        for (size_t i = 0; i < run0.size() && !g.failed; i++) {
            size_t cnt = (size_t)(run1[i] - run0[i]) * Im;
            k_swiglu_to<float><<<nblocks(cnt, 256), 256, 0, g.stream>>>(
                h + (size_t)run0[i] * Im, gu + (size_t)run0[i] * I2, run1[i] - run0[i], Im);
            CK_LAUNCH("k_swiglu_to<float>");
        }
        for (int e = 0; e < E; e++) {
            if (!wd[e]) continue;
            size_t r0 = (size_t)(off[e] - off[0]);
            cu_matmul(out + r0 * H, h + r0 * Im, wd[e], NULL, off[e + 1] - off[e], Im, H, 0);
        }
        return;
    }
    __nv_bfloat16 *xb = (__nv_bfloat16 *)scratch_get(s_exg, sizeof(__nv_bfloat16) * (size_t)n * H);
    __nv_bfloat16 *hb = (__nv_bfloat16 *)scratch_get(s_eh, sizeof(__nv_bfloat16) * (size_t)n * Im);
    if (g.failed) return;
    size_t tot = (size_t)n * H;
    k_gather_bf16<<<nblocks(tot, 256), 256, 0, g.stream>>>(xb, x, rows, n, H);
    CK_LAUNCH("k_gather_bf16");
    if (g.failed) return;
    grouped_bf16(gu, xb, wg.data(), off, E, H, (int)I2, 0.0f);
    for (size_t i = 0; i < run0.size() && !g.failed; i++) {
        size_t cnt = (size_t)(run1[i] - run0[i]) * Im;
        k_swiglu_to<__nv_bfloat16><<<nblocks(cnt, 256), 256, 0, g.stream>>>(
            hb + (size_t)run0[i] * Im, gu + (size_t)run0[i] * I2, run1[i] - run0[i], Im);
        CK_LAUNCH("k_swiglu_to<bf16>");
    }
    if (g.failed) return;
    grouped_bf16(out, hb, wd.data(), off, E, Im, H, 0.0f);
}

// y_t = Σ_k wt_tk · out_{slot_tk}: one thread per (t, c), k in order, the
// CPU's roundings (product rounded, then added to a sum started at 0)
__global__ void k_combine(float *y, const float *out, const int32_t *slot, const float *wt, int T,
                          int K, int H) {
    size_t n = (size_t)T * H;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t t = i / H, c = i % H;
        float acc = 0.0f;
        for (int k = 0; k < K; k++) {
            size_t s = (size_t)slot[t * K + k];
            acc = __fadd_rn(acc, __fmul_rn(out[s * H + c], wt[t * K + k]));
        }
        y[i] = acc;
    }
}

static void cu_combine(float *y, const float *out, const int32_t *slot, const float *wt, int T,
                       int K, int H) {
    LIVE();
    size_t n = (size_t)(T > 0 ? T : 0) * (H > 0 ? H : 0);
    if (!n) return;
    k_combine<<<nblocks(n, 256), 256, 0, g.stream>>>(y, out, slot, wt, T, K < 0 ? 0 : K, H);
    CK_LAUNCH("k_combine");
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
    k_attention(float *out, const float *q, const float *k, const float *v, float scale, int P,
                int T, int nh, int nkv, int D) {
    // queries 0..T-1 sit at positions P..P+T-1; keys 0..P+T-1 (P cached ones first)
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
    const int qlast = min(q0 + ATT_BQ, T) - 1, NK = P + T;
    for (int k0 = 0; k0 <= P + qlast; k0 += ATT_BK) {
        __syncthreads(); // the previous tile is no longer read
        for (int e = tid; e < ATT_BK * D; e += ATT_THREADS) {
            int c = e / D, d = e % D, j = k0 + c;
            float kv = 0.0f, vv = 0.0f;
            if (j < NK) {
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
            if (i < T && j <= P + i) {
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

static void cu_attention_kv(float *out, const float *q, const float *k, const float *v,
                            float scale, int P, int T, int nh, int nkv, int D) {
    LIVE();
    if (T <= 0 || nh <= 0 || D <= 0 || P < 0) return;
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
    k_attention<<<grid, ATT_THREADS, smem, g.stream>>>(out, q, k, v, scale, P, T, nh, nkv, D);
    CK_LAUNCH("k_attention");
}

static void cu_attention(float *out, const float *q, const float *k, const float *v, float scale,
                         int T, int nh, int nkv, int D) {
    cu_attention_kv(out, q, k, v, scale, 0, T, nh, nkv, D);
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

static void cu_mem_used(size_t *live, size_t *peak) {
    *live = g.live;
    *peak = g.peak;
}

static int pl_status(void) {
    if (!g.failed) return 0;
    report(g.msg);
    return -1;
}

// The op table.  Filled without touching the device, so that a check can
// see every entry set (moe_cuda_backend_table); the ops themselves need
// moe_backend_cuda() to have succeeded.
static const moe_backend *fill_table(void) {
    moe_backend *b = &g_backend;
    if (b->name) return b;
    b->weight_dtype = MOE_WT_BF16;
    b->host_memory = 0;
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
    b->attention_kv = cu_attention_kv;
    b->swiglu = cu_swiglu;
    b->axpy = cu_axpy;
    b->sigmoid_gate_add = cu_sigmoid_gate_add;
    b->router = cu_router;
    b->gather_rows = cu_gather_rows;
    b->scatter_add_rows = cu_scatter_add_rows;
    b->experts = cu_experts;
    b->combine = cu_combine;
    b->softmax_rows = cu_softmax_rows;
    b->divergence = cu_divergence;
    b->host_alloc = cu_host_alloc;
    b->host_free = cu_host_free;
    b->upload_async = cu_upload_async;
    b->upload_wait = cu_upload_wait;
    b->upload_fence = cu_upload_fence;
    b->trim = cu_trim;
    b->mem_info = cu_mem_info;
    b->mem_used = cu_mem_used;
    b->status = pl_status;
    b->name = "cuda";
    return b;
}

static int init_once(void) {
    if (g.init) return g.init;
    g.init = -1;
    g_sizes = new std::unordered_map<void *, size_t>();

    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0) {
        (void)cudaGetLastError();
        snprintf(g.msg, sizeof g.msg, "cuda: no usable CUDA device (%s)",
                 e != cudaSuccess ? cudaGetErrorString(e) : "cudaGetDeviceCount found 0 devices");
        report(g.msg);
        return -1;
    }
    if (g.device < 0 || g.device >= n) {
        snprintf(g.msg, sizeof g.msg, "cuda: device %d asked for (MOE_CUDA_DEVICE) but only %d device(s) visible",
                 g.device, n);
        report(g.msg);
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
    if (!CK(cudaStreamCreateWithFlags(&g.cstream, cudaStreamNonBlocking))) return -1;
    for (int i = 0; i < UP_EVENTS; i++)
        if (!CK(cudaEventCreateWithFlags(&up_ev[i], cudaEventDisableTiming))) return -1;
    if (!CK(cudaEventCreateWithFlags(&up_order, cudaEventDisableTiming)) ||
        !CK(cudaEventCreateWithFlags(&up_fence_ev, cudaEventDisableTiming)))
        return -1;
    for (int i = 0; i < GP_SETS; i++)
        if (!CK(cudaEventCreateWithFlags(&g_gp[i].done, cudaEventDisableTiming))) return -1;
    g_pinned = new std::unordered_map<void *, size_t>();
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

    fill_table();
    g.init = 1;
    return 1;
}

static const moe_backend *pl_backend(void) {
    if (init_once() != 1) {
        report(g.msg[0] ? g.msg : "cuda: initialisation failed");
        return NULL;
    }
    return &g_backend;
}

static void pl_set_grouped(int on) { g.grouped_ok = on ? -1 : 0; }

static void pl_set_precision(int prec) {
    g.precision = prec == MOE_CUDA_PREC_F32 ? MOE_CUDA_PREC_F32 : MOE_CUDA_PREC_BF16;
}

// moe_backend_configure: the device only before initialisation
static void pl_configure(const moe_device_opts *o) {
    if (o->device_index && g.init == 0) g.device = o->device_index;
    if (o->sync_each_op) g.sync_each = 1;
    if (o->f32_compute) g.precision = MOE_CUDA_PREC_F32;
}

static void pl_mem_stats(moe_cuda_mem *m) {
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

static void pl_mem_reset_peak(void) {
    g.peak = g.live;
    g.used_peak = 0;
}

static const char *pl_device_name(void) { return g.name[0] ? g.name : "none"; }

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

static double pl_gemm_tflops(int M, int N, int K, int f32_out, int iters) {
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

static void pl_fill_random(void *d, int dtype, size_t n, uint64_t seed, float scale) {
    LIVE();
    if (!n) return;
    if (dtype == MOE_WT_BF16)
        k_fill_bf16s<<<nblocks(n, 256), 256, 0, g.stream>>>((__nv_bfloat16 *)d, n, seed, scale);
    else
        k_fill_f32<<<nblocks(n, 256), 256, 0, g.stream>>>((float *)d, n, seed, scale);
    CK_LAUNCH("k_fill_random");
}

// ---- the plugin's one exported symbol ----------------------------------------------------------

extern "C" int moe_cuda_probe(char *msg, size_t msglen); // probe.cu

extern "C" __attribute__((visibility("default"))) const moe_cuda_plugin *
moe_cuda_plugin_open(int abi, moe_cuda_error_fn err) {
    static const moe_cuda_plugin pl = {
        MOE_CUDA_PLUGIN_ABI, sizeof(moe_cuda_plugin), sizeof(moe_backend), sizeof(moe_cuda_mem),
        moe_cuda_probe,      fill_table,              pl_backend,          pl_status,
        pl_set_precision,    pl_set_grouped,          pl_matmul_grouped,   pl_mem_stats,
        pl_mem_reset_peak,   pl_gemm_tflops,          pl_fill_random,      pl_device_name,
        pl_configure,
    };
    if (abi != MOE_CUDA_PLUGIN_ABI) return NULL;
    g_err = err;
    return &pl;
}
