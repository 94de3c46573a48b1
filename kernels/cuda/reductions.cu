// reductions.cu - row softmax and the per-token divergences of the searches.
// Part of the CUDA backend: see backend.cu and common.cuh.
#include "cuda/common.cuh"

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

void cu_softmax_rows(float *p, const float *x, int T, int C) {
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

void cu_divergence(double *d, const float *a, const float *b, int metric, int T, int C) {
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

