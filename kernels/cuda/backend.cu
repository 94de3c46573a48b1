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
// The backward ops keep to that: sums over tokens (dW by cuBLAS, dbias and
// the norm weights' gradient by fixed chunks, embedding rows in token order,
// attention's dk/dv by one block per key tile) never race.
// Element-wise formulas follow kernels/cpu.c; products that the CPU rounds
// before an add use __fmul_rn/__fadd_rn so that nvcc does not fuse them.
//
// The ops live in one file per family (memory.cu, gemm.cu, experts.cu,
// norms.cu, attention.cu, elementwise.cu, routing.cu, reductions.cu; shared
// declarations in common.cuh); this file holds the state and the error
// handling, the op table, initialisation, the extras of backend_cuda.h and
// the plugin's one exported symbol.
#include "cuda/common.cuh"

static moe_cuda_error_fn g_err;
void report(const char *msg) {
    if (g_err) g_err(MOE_ERR_DEVICE, msg);
}

// ---- state and error handling ---------------------------------------------

cu_state g = {0, 0, 0, 0, 0, -1, 0, 0, 0, 0, 0, 0, {0}, {0}, 0, 0, 0};

std::unordered_map<void *, size_t> *g_sizes;
char g_dummy[64]; // handed out by alloc after a device error

void fail(const char *fmt, ...) {
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

bool cuda_ok(cudaError_t e, const char *expr, const char *file, int line) {
    if (e == cudaSuccess) return true;
    fail("%s:%d: %s: %s (%s)", file, line, expr, cudaGetErrorName(e), cudaGetErrorString(e));
    return false;
}
bool cublas_ok(cublasStatus_t s, const char *expr, const char *file, int line) {
    if (s == CUBLAS_STATUS_SUCCESS) return true;
    fail("%s:%d: %s: %s (%s)", file, line, expr, cublasGetStatusName(s), cublasGetStatusString(s));
    return false;
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
    b->weight_dtype = MOE_DT_BF16;
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
    b->matmul_backward = cu_matmul_backward;
    b->rmsnorm_backward = cu_rmsnorm_backward;
    b->rope_backward = cu_rope_backward;
    b->attention_backward = cu_attention_backward;
    b->swiglu_backward = cu_swiglu_backward;
    b->sigmoid_gate_add_backward = cu_sigmoid_gate_add_backward;
    b->combine_backward = cu_combine_backward;
    b->router_backward = cu_router_backward;
    b->embed_backward = cu_embed_backward;
    b->cross_entropy = cu_cross_entropy;
    b->adamw = cu_adamw;
    b->sumsq = cu_sumsq;
    b->to_weight_dtype = cu_to_weight_dtype;
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
    if (dtype == MOE_DT_BF16)
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

