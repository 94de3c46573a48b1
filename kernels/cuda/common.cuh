// common.cuh - what the CUDA backend's files share (kernels/cuda/*.cu, one
// per op family as ggml-cuda does: memory, gemm, experts, norms, attention,
// elementwise, routing, reductions; backend.cu holds the state, the error
// handling, the op table and the plugin entry).  Everything here is hidden
// in the plugin (-fvisibility=hidden); only moe_cuda_plugin_open is exported.
// See backend_cuda.h for the error model and the precision choices.
#ifndef MOE_CUDA_COMMON_CUH
#define MOE_CUDA_COMMON_CUH

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

// ---- state and error handling (backend.cu) ----------------------------------

struct cu_state {
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
};
extern cu_state g;
extern std::unordered_map<void *, size_t> *g_sizes; // live allocations and their sizes
extern char g_dummy[64]; // handed out by alloc after a device error

// The library's error state lives in the executable: report through the
// callback it handed to moe_cuda_plugin_open.
void report(const char *msg);
// The first device error, kept (sticky): every later op is a no-op.
void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
bool cuda_ok(cudaError_t e, const char *expr, const char *file, int line);
bool cublas_ok(cublasStatus_t s, const char *expr, const char *file, int line);
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

// ---- memory (memory.cu) -----------------------------------------------------

void *raw_alloc(size_t n);
void raw_free(void *p);
// Growable scratch buffers (stream-ordered, so replacing one is safe).
struct scratch {
    void *p;
    size_t n;
};
void *scratch_get(scratch &s, size_t n);
extern scratch s_xb, s_wf, s_probs, s_ptrs, s_rope, s_div; // trimmed by cu_trim
extern scratch s_exg, s_egu, s_eh;                        // the experts' (experts.cu)
extern scratch s_gb, s_colsum, s_rowr, s_att, s_sumsq;     // the backward ops'
#define UP_EVENTS 256
extern cudaEvent_t up_ev[UP_EVENTS], up_order, up_fence_ev; // created by init_once
extern std::unordered_map<void *, size_t> *g_pinned;       // host_alloc blocks that are pinned

// ---- GEMM (gemm.cu) -----------------------------------------------------------

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
extern gparams g_gp[GP_SETS];
const __nv_bfloat16 *to_bf16(const float *x, size_t n);
void grouped_bf16(float *y, const __nv_bfloat16 *xb, const void *const *w, const int32_t *off,
                  int G, int K, int N, float beta);
void pl_matmul_grouped(float *y, const float *x, const void *const *w, const int32_t *off, int G,
                       int K, int N, int accumulate);

// ---- block reductions for the kernels (device code, one copy per file) ---------

#define FULL 0xffffffffu

static __device__ inline double block_sum(double v, double *sh /* [33] */) {
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

static __device__ inline float block_max(float v, float *sh /* [33] */) {
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

// ---- the ops of kernels.h, by file ----------------------------------------------

void *cu_alloc(size_t n); // memory.cu
void cu_free(void *p);
void cu_upload(void *dst, const void *src, size_t n);
void cu_download(void *dst, const void *src, size_t n);
void cu_copy(void *dst, const void *src, size_t n);
void cu_zero(void *dst, size_t n);
void cu_sync(void);
void *cu_host_alloc(size_t n);
void cu_host_free(void *p);
uint64_t cu_upload_async(void *dst, const void *src, size_t n);
void cu_upload_wait(uint64_t t);
void cu_upload_fence(void);
void cu_trim(void);
void cu_mem_info(size_t *free_bytes, size_t *total_bytes);
void cu_matmul(float *y, const float *x, const void *w, const float *bias, int T, int K, int N,
               int accumulate); // gemm.cu
void cu_experts(float *out, const float *x, const int32_t *rows, const int32_t *off,
                const void *const *w_gu, const void *const *w_down, int E, int H,
                int Im); // experts.cu
void cu_combine(float *y, const float *out, const int32_t *slot, const float *wt, int T, int K,
                int H);
void cu_rmsnorm(float *y, const float *x, const float *w, float eps, int T, int C); // norms.cu
void cu_rope(float *x, float theta, int pos0, int T, int nh, int D);
void cu_attention(float *out, const float *q, const float *k, const float *v, float scale, int T,
                  int nh, int nkv, int D); // attention.cu
void cu_attention_kv(float *out, const float *q, const float *k, const float *v, float scale,
                     int P, int T, int nh, int nkv, int D);
__global__ void k_swiglu(float *h, const float *gu, int T, int I); // elementwise.cu
void cu_swiglu(float *h, const float *gu, int T, int I);
void cu_axpy(float *y, const float *x, float a, size_t n);
void cu_sigmoid_gate_add(float *y, const float *x, const float *z, int T, int C);
void cu_router(int32_t *idx, float *wt, float *probs, const float *logits, int mode, int renorm,
               int T, int E, int K); // routing.cu
void cu_gather_rows(float *dst, const float *src, const int32_t *rows, int n, int C);
void cu_scatter_add_rows(float *dst, const float *src, const int32_t *rows, const float *scale,
                         int n, int C);
void cu_softmax_rows(float *p, const float *x, int T, int C); // reductions.cu
void cu_divergence(double *d, const float *a, const float *b, int metric, int T, int C);

// backward (kernels.h, "backward"), beside their forwards
void cu_matmul_backward(float *dx, float *dw, float *dbias, const float *dy, const float *x,
                        const void *w, int T, int K, int N); // gemm.cu
void cu_to_weight_dtype(void *dst, const float *src, size_t n);
void cu_rmsnorm_backward(float *dx, float *dw, const float *dy, const float *x, const float *w,
                         float eps, int T, int C); // norms.cu
void cu_rope_backward(float *d, float theta, int pos0, int T, int nh, int D);
void cu_attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *q,
                           const float *k, const float *v, const float *out, float scale, int T,
                           int nh, int nkv, int D); // attention.cu
void cu_swiglu_backward(float *dgu, const float *dh, const float *gu, int T, int I); // elementwise.cu
void cu_sigmoid_gate_add_backward(float *dx, float *dz, const float *dy, const float *x,
                                  const float *z, int T, int C);
void cu_adamw(float *p, float *m, float *v, const float *gr, size_t n, float lr, float beta1,
              float beta2, float eps, float weight_decay, float gscale, int step);
void cu_combine_backward(float *dout, float *dwt, const float *dy, const float *out,
                         const int32_t *slot, const float *wt, int T, int K, int H); // experts.cu
void cu_router_backward(float *dlogits, const float *dwt, const float *dprobs, const int32_t *idx,
                        const float *wt, const float *probs, int mode, int renorm, int T, int E,
                        int K); // routing.cu
void cu_embed_backward(float *dE, const float *dx, const int32_t *ids, int T, int H);
void cu_cross_entropy(float *loss, float *dlogits, const float *logits, const int32_t *targets,
                      float dscale, int T, int V); // reductions.cu
double cu_sumsq(const float *x, size_t n);
// out[c] += Σ_t a_tc·(b ? b_tc : 1)·(rs ? rs_t : 1), in a fixed order (no atomics)
void colsum_add(float *out, const float *a, const float *b, const float *rs, int T, int C);

#endif
