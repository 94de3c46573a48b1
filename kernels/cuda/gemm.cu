// gemm.cu - GEMM glue around cuBLAS: activations rounded to BF16, the f32
// parity path, bias, and the grouped GEMM of the routed experts.
// Part of the CUDA backend: see backend.cu and common.cuh.
#include "cuda/common.cuh"

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

// x rounded to BF16 in scratch buffer s
static const __nv_bfloat16 *bf16_copy(scratch &s, const float *x, size_t n) {
    __nv_bfloat16 *xb = (__nv_bfloat16 *)scratch_get(s, n * sizeof(__nv_bfloat16));
    if (g.failed) return NULL;
    k_f32_to_bf16<<<nblocks(n, 256), 256, 0, g.stream>>>(xb, x, n);
    CK_LAUNCH("k_f32_to_bf16");
    return xb;
}
const __nv_bfloat16 *to_bf16(const float *x, size_t n) { return bf16_copy(s_xb, x, n); }

// a BF16 weight widened to f32 (MOE_CUDA_PREC_F32), in s_wf
static const float *weight_f32(const void *w, size_t n) {
    float *wf = (float *)scratch_get(s_wf, n * sizeof(float));
    if (g.failed) return NULL;
    k_bf16_to_f32<<<nblocks(n, 256), 256, 0, g.stream>>>(wf, (const __nv_bfloat16 *)w, n);
    CK_LAUNCH("k_bf16_to_f32");
    return wf;
}

// y[T,N] (row-major) = x[T,K] · W[N,K]ᵀ: in cuBLAS's column-major terms
// yᵀ (N×T, ld N) = op_T(W as K×N, ld K) · (xᵀ as K×T, ld K).
static void gemm_rows(float *y, const void *xin, cudaDataType xt, const void *w, cudaDataType wt,
                      int T, int K, int N, float beta) {
    const float alpha = 1.0f;
    CKB(cublasGemmEx(g.blas, CUBLAS_OP_T, CUBLAS_OP_N, N, T, K, &alpha, w, wt, K, xin, xt, K, &beta,
                     y, CUDA_R_32F, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

void cu_matmul(float *y, const float *x, const void *w, const float *bias, int T, int K,
                      int N, int accumulate) {
    LIVE();
    if (T <= 0 || N <= 0) return;
    if (K <= 0) {
        if (!accumulate) CK(cudaMemsetAsync(y, 0, sizeof(float) * (size_t)T * N, g.stream));
    } else if (g.precision == MOE_CUDA_PREC_F32) {
        const float *wf = weight_f32(w, (size_t)N * K);
        if (!wf) return;
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

// ---- backward of matmul, the compute copy of a master weight -----------------------------
//
// y = x·Wᵀ + b.  In cuBLAS's column-major terms (row-major [R, C] = C×R):
//   dx [T,K] += dy·W:   dxᵀ (K×T, ld K) += W (K×N, ld K) · dyᵀ (N×T, ld N)
//   dW [N,K] += dyᵀ·x:  dWᵀ (K×N, ld K) += xᵀ (K×T, ld K) · op_T(dyᵀ (N×T, ld N))
// As the forward: BF16 operands (dy and x rounded to BF16, W as it is) with
// FP32 accumulation into the f32 gradients (beta = 1), or, with
// MOE_CUDA_PREC_F32, f32 operands (W widened) and an FP32 GEMM.  cuBLAS on
// one stream with its default algorithms is deterministic (no atomics);
// dbias is a fixed-order column sum (colsum_add).
scratch s_gb; // dy in BF16 (x goes to s_xb)
void cu_matmul_backward(float *dx, float *dw, float *dbias, const float *dy, const float *x,
                        const void *w, int T, int K, int N) {
    LIVE();
    if (T <= 0 || N <= 0) return;
    const float one = 1.0f;
    bool f32 = g.precision == MOE_CUDA_PREC_F32;
    if (K > 0 && (dx || dw)) {
        const void *dyo = dy;
        cudaDataType ty = f32 ? CUDA_R_32F : CUDA_R_16BF;
        if (!f32 && !(dyo = bf16_copy(s_gb, dy, (size_t)T * N))) return;
        if (dx) {
            const void *wo = f32 ? (const void *)weight_f32(w, (size_t)N * K) : w;
            if (!wo) return;
            CKB(cublasGemmEx(g.blas, CUBLAS_OP_N, CUBLAS_OP_N, K, T, N, &one, wo, ty, K, dyo, ty, N,
                             &one, dx, CUDA_R_32F, K, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        }
        if (dw && !g.failed) {
            const void *xo = f32 ? (const void *)x : (const void *)to_bf16(x, (size_t)T * K);
            if (!xo) return;
            CKB(cublasGemmEx(g.blas, CUBLAS_OP_N, CUBLAS_OP_T, K, N, T, &one, xo, ty, K, dyo, ty, N,
                             &one, dw, CUDA_R_32F, K, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        }
    }
    if (dbias) colsum_add(dbias, dy, NULL, NULL, T, N);
    if (g.sync_each && !g.failed) CK(cudaStreamSynchronize(g.stream));
}

// dst (BF16) = src rounded to nearest even: an updated master's compute copy
void cu_to_weight_dtype(void *dst, const float *src, size_t n) {
    LIVE();
    if (!n) return;
    k_f32_to_bf16<<<nblocks(n, 256), 256, 0, g.stream>>>((__nv_bfloat16 *)dst, src, n);
    CK_LAUNCH("k_f32_to_bf16");
}

// Grouped GEMM on BF16 activations: for each group g with w[g] != NULL and
// off[g] < off[g+1], rows r = off[g]-off[0] .. of y [rows, N] (f32) get
//   y_r = xb_r · W_gᵀ (+ beta·y_r)
// with xb [rows, K] BF16 and W_g [N, K] BF16, FP32 accumulation.  One
// cublasGemmGroupedBatchedEx call (one group per expert, group size 1), or a
// loop of cublasGemmEx when this cuBLAS refuses the types.  Rows of skipped
// groups are not written.  w and off are host arrays.
gparams g_gp[GP_SETS];
static int g_gpi;

void grouped_bf16(float *y, const __nv_bfloat16 *xb, const void *const *w,
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

void pl_matmul_grouped(float *y, const float *x, const void *const *w, const int32_t *off,
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

