// reductions.cu - row softmax and the per-token divergences of the searches.
// Part of the CUDA backend: see backend.cu and common.cuh.
#include "cuda/common.cuh"

// ---- reductions for the search tools ---------------------------------------------------

// the row's max (*mx) and Σ_c exp(x_c − max) in double, by the whole block
static __device__ inline double row_sumexp(const float *xr, int C, float *mx_out) {
    __shared__ float shf[33];
    __shared__ double shd[33];
    float mx = -INFINITY;
    for (int c = threadIdx.x; c < C; c += blockDim.x) mx = fmaxf(mx, xr[c]);
    mx = block_max(mx, shf);
    double s = 0.0;
    for (int c = threadIdx.x; c < C; c += blockDim.x) s += (double)expf(xr[c] - mx);
    *mx_out = mx;
    return block_sum(s, shd);
}

__global__ void k_softmax_rows(float *p, const float *x, int C) {
    const float *xr = x + (size_t)blockIdx.x * C;
    float *pr = p + (size_t)blockIdx.x * C;
    float mx;
    double s = row_sumexp(xr, C, &mx);
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


// ---- backward: column sums, cross-entropy, sum of squares ------------------------------------------
//
// Sums over tokens (dbias, the norm weights' gradient) without atomics: the T
// rows are cut into at most COLSUM_CHUNKS fixed chunks (a function of T only,
// not of the device); one thread per (chunk, column) sums its chunk's rows in
// order into a double partial, then one thread per column adds the partials
// in chunk order.  The result is the same bytes on every run and every GPU.

#define COLSUM_CHUNKS 64

// part[k, c] = Σ_{t in chunk k} a_tc · (b ? b_tc : 1) · (rs ? rs_t : 1)
__global__ void k_colsum_part(double *part, const float *a, const float *b, const float *rs, int T,
                              int C, int rows_per_chunk) {
    int c = blockIdx.x * blockDim.x + threadIdx.x, k = blockIdx.y;
    if (c >= C) return;
    int t0 = k * rows_per_chunk, t1 = min(T, t0 + rows_per_chunk);
    double s = 0.0;
    for (int t = t0; t < t1; t++) {
        size_t i = (size_t)t * C + c;
        double v = a[i];
        if (b) v *= b[i];
        if (rs) v *= rs[t];
        s += v;
    }
    part[(size_t)k * C + c] = s;
}
__global__ void k_colsum_finish(float *out, const double *part, int nchunks, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    double s = 0.0;
    for (int k = 0; k < nchunks; k++) s += part[(size_t)k * C + c];
    out[c] += (float)s;
}

scratch s_colsum;
void colsum_add(float *out, const float *a, const float *b, const float *rs, int T, int C) {
    if (g.failed || T <= 0 || C <= 0) return;
    int per = (T + COLSUM_CHUNKS - 1) / COLSUM_CHUNKS;
    int nch = (T + per - 1) / per;
    double *part = (double *)scratch_get(s_colsum, sizeof(double) * (size_t)nch * C);
    if (g.failed) return;
    dim3 grid((unsigned)((C + 255) / 256), (unsigned)nch);
    k_colsum_part<<<grid, 256, 0, g.stream>>>(part, a, b, rs, T, C, per);
    CK_LAUNCH("k_colsum_part");
    k_colsum_finish<<<(C + 255) / 256, 256, 0, g.stream>>>(out, part, nch, C);
    CK_LAUNCH("k_colsum_finish");
}

// One block per row: loss = logsumexp − logit[target] (max-subtracted, the
// sum of exponentials in double), dlogits = (softmax − onehot)·dscale.  The
// target's logit is read before the block's first barrier and every other
// element is read and written by the same thread, so dlogits may alias logits.
__global__ void k_cross_entropy(float *loss, float *dlogits, const float *logits,
                                const int32_t *targets, float dscale, int V) {
    const float *xr = logits + (size_t)blockIdx.x * V;
    int tgt = targets[blockIdx.x];
    if (tgt < 0 || tgt >= V) { // ignored row (−100); out-of-range ids are the caller's bug
        if (threadIdx.x == 0) loss[blockIdx.x] = 0.0f;
        if (dlogits)
            for (int c = threadIdx.x; c < V; c += blockDim.x) dlogits[(size_t)blockIdx.x * V + c] = 0.0f;
        return;
    }
    float xt = xr[tgt], mx;
    double s = row_sumexp(xr, V, &mx);
    if (threadIdx.x == 0) loss[blockIdx.x] = (float)(log(s) + (double)mx - (double)xt);
    if (!dlogits) return;
    float inv = (float)(1.0 / s);
    float *dr = dlogits + (size_t)blockIdx.x * V;
    for (int c = threadIdx.x; c < V; c += blockDim.x) {
        float p = expf(xr[c] - mx) * inv;
        dr[c] = (c == tgt ? p - 1.0f : p) * dscale;
    }
}

void cu_cross_entropy(float *loss, float *dlogits, const float *logits, const int32_t *targets,
                      float dscale, int T, int V) {
    LIVE();
    if (T <= 0 || V <= 0) return;
    k_cross_entropy<<<T, ROW_THREADS, 0, g.stream>>>(loss, dlogits, logits, targets, dscale, V);
    CK_LAUNCH("k_cross_entropy");
}

// Σ x² in double in a fixed order: SUMSQ_BLOCKS blocks (whatever the device)
// each sum a fixed grid-stride share in a fixed tree (block_sum), then one
// block sums the partials; the host waits for the result.
#define SUMSQ_BLOCKS 256
__global__ void k_sumsq_part(double *part, const float *x, size_t n) {
    __shared__ double sh[33];
    double s = 0.0;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        s += (double)x[i] * x[i];
    s = block_sum(s, sh);
    if (threadIdx.x == 0) part[blockIdx.x] = s;
}
__global__ void k_sumsq_finish(double *part, int nparts) {
    __shared__ double sh[33];
    double s = 0.0;
    for (int i = threadIdx.x; i < nparts; i += blockDim.x) s += part[i];
    s = block_sum(s, sh);
    if (threadIdx.x == 0) part[nparts] = s;
}

scratch s_sumsq;
double cu_sumsq(const float *x, size_t n) {
    if (g.failed || n == 0) return 0.0;
    double *part = (double *)scratch_get(s_sumsq, sizeof(double) * (SUMSQ_BLOCKS + 1));
    if (g.failed) return 0.0;
    k_sumsq_part<<<SUMSQ_BLOCKS, ROW_THREADS, 0, g.stream>>>(part, x, n);
    CK_LAUNCH("k_sumsq_part");
    k_sumsq_finish<<<1, ROW_THREADS, 0, g.stream>>>(part, SUMSQ_BLOCKS);
    CK_LAUNCH("k_sumsq_finish");
    double r = 0.0;
    cu_download(&r, part + SUMSQ_BLOCKS, sizeof r);
    return g.failed ? 0.0 : r;
}
