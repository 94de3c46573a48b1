/* cpu.c - the CPU backend: OpenBLAS for GEMM, OpenMP for the rest.
 *
 * Two tables share most ops: "cpu" (GEMM and attention through cblas_sgemm)
 * and "cpu-ref" (plain loops for GEMM and attention, one output element per
 * loop nest, the oracle for the optimised ops and for other backends).
 *
 * Determinism.  Every OpenMP loop here partitions independent outputs (rows,
 * tokens, heads, fixed blocks of GEMM output columns); no reduction is ever
 * split across threads, so results do not depend on the thread count.
 * OpenBLAS is only ever called single-threaded (see blas_single), and tiny
 * GEMMs are padded so that a row's result never depends on how many rows
 * share the call (see sgemm_tile).  test_kernels.c checks both.
 */
#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "common.h"
#include "cpu_bf16.h"
#include "kernels.h"

/* ---- threads ----------------------------------------------------------- */

/* OpenBLAS always runs single-threaded inside our OpenMP threads: mixing its
 * own thread pool with OpenMP's makes both spin for the same cores (a 5-8x
 * slowdown measured on 2 cores), and a partitioning of our own keeps results
 * independent of the thread count by construction. */
static int g_blas_single = 0;
static void blas_single(void) {
    if (!g_blas_single) {
        openblas_set_num_threads(1);
        g_blas_single = 1;
    }
}

void moe_kernels_set_threads(int n) {
    if (n <= 0) n = omp_get_num_procs();
    omp_set_num_threads(n);
    openblas_set_num_threads(1);
    g_blas_single = 1;
}


/* ---- memory ------------------------------------------------------------- */

/* Blocks of 4 MiB and more (converted weights, activations) are 2 MiB
 * aligned and asked to be backed by transparent huge pages where the system
 * allows it ("madvise" mode): one page fault per 2 MiB instead of per 4 KiB
 * when a layer's weights are written, and fewer TLB misses when the GEMMs
 * stream them. */
#define HUGE_MIN ((size_t)4 << 20)
#define HUGE_ALIGN ((size_t)2 << 20)

static void *cpu_alloc(size_t n) {
    void *p = NULL;
    if (n == 0) n = 1;
    size_t a = n >= HUGE_MIN ? HUGE_ALIGN : 64;
    size_t sz = (n + a - 1) & ~(a - 1);
    if (posix_memalign(&p, a, sz) != 0) p = NULL;
#ifdef MADV_HUGEPAGE
    if (p && a == HUGE_ALIGN) madvise(p, sz, MADV_HUGEPAGE); /* advice only */
#endif
    if (!p) p = moe_malloc(n); /* aborts with a message */
    return p;
}
static void cpu_free(void *p) { free(p); }
static void cpu_memcpy(void *dst, const void *src, size_t n) {
    if (n) memmove(dst, src, n);
}
static void cpu_zero(void *dst, size_t n) { memset(dst, 0, n); }
static void cpu_sync(void) {}
/* asynchronous uploads on the CPU: done at once */
static void *cpu_host_alloc(size_t n) { return moe_malloc(n ? n : 1); }

/* host memory is not tracked per backend; a CPU op never fails */
static void cpu_mem_used(size_t *live, size_t *peak) { *live = *peak = 0; }
static int cpu_status(void) { return 0; }

/* MemAvailable (what can be allocated without swapping, page cache counted
 * as reclaimable) and MemTotal; sysconf's figures when /proc is absent. */
static void cpu_mem_info(size_t *free_bytes, size_t *total_bytes) {
    *free_bytes = *total_bytes = 0;
    FILE *f = fopen("/proc/meminfo", "r");
    if (f) {
        char line[256];
        unsigned long long kb;
        while (fgets(line, sizeof line, f)) {
            if (sscanf(line, "MemTotal: %llu kB", &kb) == 1) *total_bytes = (size_t)kb << 10;
            if (sscanf(line, "MemAvailable: %llu kB", &kb) == 1) *free_bytes = (size_t)kb << 10;
        }
        fclose(f);
    }
    long pages = sysconf(_SC_PHYS_PAGES), avail = sysconf(_SC_AVPHYS_PAGES);
    long psz = sysconf(_SC_PAGESIZE);
    if (!*total_bytes && pages > 0 && psz > 0) *total_bytes = (size_t)pages * (size_t)psz;
    if (!*free_bytes && avail > 0 && psz > 0) *free_bytes = (size_t)avail * (size_t)psz;
}
static uint64_t cpu_ticket;
static uint64_t cpu_upload_async(void *dst, const void *src, size_t n) {
    if (n) memmove(dst, src, n);
    uint64_t t;
#pragma omp atomic capture
    t = ++cpu_ticket;
    return t;
}
static void cpu_upload_wait(uint64_t t) { (void)t; }
static void cpu_nop(void) {}

/* ---- GEMM --------------------------------------------------------------- */

static void add_bias(float *y, const float *bias, int T, int N) {
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++)
        for (int n = 0; n < N; n++) y[(size_t)t * N + n] += bias[n];
}

/* y[:, n0:n0+nc] (+)= x·W[n0:n0+nc]ᵀ with one single-threaded sgemm.
 * OpenBLAS (0.3.x on SkylakeX and others) routes "small" products
 * (M·N·K <= 100³) to special kernels whose rounding differs from the
 * blocked kernels, and newer versions route single-row products to GEMV.
 * Either would make a token's result depend on how many other tokens share
 * the call (batching, tokens per expert).  So tiny calls are padded with zero
 * rows up to a size the blocked kernels take; per-row results of those do not
 * depend on the row count (tests/unit/test_kernels.c checks it). */
#define SMALL_MNK 1000000.0

/* y[t, 0:nc] (row stride ldy) (+)= x[t, :]·w[0:nc, :]ᵀ, one single-threaded sgemm */
static void sgemm_tile(float *y, int ldy, const float *x, const float *w, int T, int K, int nc,
                       int accumulate) {
    if ((double)T * nc * K > SMALL_MNK && T >= 2) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, nc, K, 1.0f, x, K, w, K,
                    accumulate ? 1.0f : 0.0f, y, ldy);
        return;
    }
    int Tp = (int)(SMALL_MNK / ((double)nc * K)) + 1;
    if (Tp < 2) Tp = 2;
    if (Tp < T) Tp = T;
    float *xp = calloc((size_t)Tp * K, sizeof(float));
    float *yp = calloc((size_t)Tp * nc, sizeof(float));
    if (!xp || !yp) moe_malloc((size_t)-1 / 2); /* out of memory: aborts with a message */
    memcpy(xp, x, sizeof(float) * (size_t)T * K);
    if (accumulate)
        for (int t = 0; t < T; t++) memcpy(yp + (size_t)t * nc, y + (size_t)t * ldy, sizeof(float) * nc);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, Tp, nc, K, 1.0f, xp, K, w, K,
                accumulate ? 1.0f : 0.0f, yp, nc);
    for (int t = 0; t < T; t++) memcpy(y + (size_t)t * ldy, yp + (size_t)t * nc, sizeof(float) * nc);
    free(xp);
    free(yp);
}

/* The output is split into tiles, one single-threaded sgemm per tile, tiles
 * spread over the OpenMP threads.  Column tiles are GEMM_COLS wide, fixed
 * (a column's rounding can depend on the width of the sgemm it is computed
 * in); row tiles are sized from the thread count so that there are about two
 * tiles per thread with as few re-packings of W as possible -- this is safe
 * because a row's result never depends on the number of rows in its sgemm
 * (test_kernels.c: test_batch_invariance, test_thread_invariance).  512
 * columns: 15-30% faster than 128 at the forward's projection shapes (fewer
 * re-packings of x, longer kernel runs), still 2+ tiles per 1024 columns. */
#define GEMM_COLS 512

static int row_tile(int T, int N) {
    int nct = (N + GEMM_COLS - 1) / GEMM_COLS;
    int want = 2 * omp_get_max_threads();
    int nrt = (want + nct - 1) / nct;
    int tr = (T + nrt - 1) / nrt;
    return tr < 64 ? 64 : tr;
}

/* ---- BF16 weights ---------------------------------------------------------
 * The "cpu-bf16" table (chosen by the model for BF16 checkpoints) takes its
 * matmul/experts weights as BF16 and widens each weight tile to float32 just
 * before the tile's sgemm, into a buffer of the calling thread that is reused
 * call after call (so it stays in cache).  bf16 -> f32 is exact and the
 * sgemm calls are the same (shapes, strides, x and y), so results are byte-
 * identical to the "cpu" table's on the widened weights. */

static void bf16_to_f32(float *dst, const void *src, size_t n) {
    const unsigned char *s = src;
    size_t i = 0;
#if defined(__SSE2__)
    const __m128i z = _mm_setzero_si128();
    for (; i + 8 <= n; i += 8) {
        __m128i v = _mm_loadu_si128((const __m128i *)(s + 2 * i)); /* may be unaligned */
        _mm_storeu_si128((__m128i *)(dst + i), _mm_unpacklo_epi16(z, v));
        _mm_storeu_si128((__m128i *)(dst + i + 4), _mm_unpackhi_epi16(z, v));
    }
#endif
    for (; i < n; i++) {
        uint16_t h;
        memcpy(&h, s + 2 * i, 2);
        dst[i] = moe_bf16_to_f32(h);
    }
}

/* per-thread f32 buffers for widened weight tiles (grow only; 2 per thread:
 * an expert's gate/up and down) */
static __thread float *tls_wbuf[2];
static __thread size_t tls_wcap[2];
static float *wbuf(int i, size_t n) {
    if (tls_wcap[i] < n) {
        cpu_free(tls_wbuf[i]);
        tls_wbuf[i] = cpu_alloc(n * sizeof(float));
        tls_wcap[i] = n;
    }
    return tls_wbuf[i];
}

/* weight rows [n0, n0+nc) of a [N, K] weight in dtype wdt as f32: the weight
 * itself (f32) or the thread's buffer (bf16) */
static const float *wtile(const void *w, int wdt, int buf, size_t n0, size_t nc, size_t K) {
    if (wdt == MOE_DT_F32) return (const float *)w + n0 * K;
    float *b = wbuf(buf, nc * K);
    bf16_to_f32(b, (const unsigned char *)w + 2 * n0 * K, nc * K);
    return b;
}

static void matmul_dt(float *y, const float *x, const void *w, int wdt, const float *bias, int T,
                      int K, int N, int accumulate) {
    if (T <= 0 || N <= 0) return;
    blas_single();
    if (K <= 0) {
        if (!accumulate) memset(y, 0, sizeof(float) * (size_t)T * N);
    } else {
        int TR = row_tile(T, N);
        int nr = (T + TR - 1) / TR, nb = (N + GEMM_COLS - 1) / GEMM_COLS;
        /* small products run on one thread: a parallel region costs more than
         * they do (and a preempted worker stalls it on a busy machine) */
#pragma omp parallel if (nr * nb > 1 && (double)T * N * K > 2e6)
        {
            int last = -1; /* column tile held widened in this thread's buffer */
#pragma omp for schedule(dynamic, 1)
            for (int i = 0; i < nr * nb; i++) {
                /* f32: row tiles outermost (as ever); bf16: column tiles outermost,
                 * so that a thread's next tile often reuses the widened W tile.
                 * Tiles are independent: the order does not change results. */
                int r = wdt == MOE_DT_F32 ? i / nb : i % nr;
                int b = wdt == MOE_DT_F32 ? i % nb : i / nr;
                int t0 = r * TR, tc = T - t0 < TR ? T - t0 : TR;
                int n0 = b * GEMM_COLS, nc = N - n0 < GEMM_COLS ? N - n0 : GEMM_COLS;
                const float *wt;
                if (wdt == MOE_DT_F32 || b != last)
                    wt = wtile(w, wdt, 0, (size_t)n0, (size_t)nc, (size_t)K);
                else
                    wt = tls_wbuf[0];
                last = b;
                sgemm_tile(y + (size_t)t0 * N + n0, N, x + (size_t)t0 * K, wt, tc, K, nc,
                           accumulate);
            }
        }
    }
    if (bias) add_bias(y, bias, T, N);
}

static void cpu_matmul(float *y, const float *x, const void *w, const float *bias, int T, int K,
                       int N, int accumulate) {
    matmul_dt(y, x, w, MOE_DT_F32, bias, T, K, N, accumulate);
}

static void cpu_matmul_bf16(float *y, const float *x, const void *w, const float *bias, int T,
                            int K, int N, int accumulate) {
    matmul_dt(y, x, w, MOE_DT_BF16, bias, T, K, N, accumulate);
}

static void cpu_matmul_f32(float *y, const float *x, const float *w, const float *bias, int T,
                           int K, int N, int accumulate) {
    matmul_dt(y, x, w, MOE_DT_F32, bias, T, K, N, accumulate);
}

static void ref_matmul(float *y, const float *x, const void *wv, const float *bias, int T, int K,
                       int N, int accumulate) {
    const float *w = wv;
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++) {
        for (int n = 0; n < N; n++) {
            float s = 0.0f;
            const float *xr = x + (size_t)t * K, *wr = w + (size_t)n * K;
            for (int k = 0; k < K; k++) s += xr[k] * wr[k];
            float *o = y + (size_t)t * N + n;
            *o = accumulate ? *o + s : s;
        }
    }
    if (bias) add_bias(y, bias, T, N);
}

/* Backward of matmul, y = x·Wᵀ + b:  dx += dy·W,  dw += dyᵀ·x,  dbias += Σ_t dy_t.
 *
 * Every tile of an output is one thread's, and every reduction runs inside
 * one thread in a fixed order, on tiles of fixed sizes (not sized from the
 * thread count as the forward's row tiles are), so the sgemm calls -- hence
 * the bits -- depend only on the shapes:
 *   dx: tiles of BW_ROWS rows x BW_COLS columns; the reduction over the N
 *       weight rows runs in chunks of BW_CHUNK rows, ascending, each one
 *       sgemm accumulating into the tile (bf16: the chunk's W[n0:, k0:] is
 *       widened into the thread's buffer first; the f32 table reads it in
 *       place with the same sgemm shapes, so "cpu" and "cpu-bf16" agree bit
 *       for bit on the widened weights, as their forwards do);
 *   dw: tiles of BW_COLS x BW_COLS, each one sgemm over all T tokens;
 *   dbias: per feature, tokens in order, summed in double.
 * The dx and dw tiles form one list of tasks (the larger dx tiles first), so
 * that both products together keep many cores busy at a few hundred tokens.
 * The sizes trade one core's speed against the task count: single-threaded
 * (CPU time, AVX-512 OpenBLAS), 0.91-0.95x one whole sgemm per product at
 * T 512, K 1408-2048, N 2048-2816 (rows 128: 0.88-0.92x; 1024 columns:
 * 0.96x but a third of the tasks), with 32 tasks at those shapes. */
#define BW_ROWS 256
#define BW_COLS 512
#define BW_CHUNK 1024

typedef struct {
    float *dx, *dw;
    const float *dy, *x;
    const void *w;
    int wdt, T, K, N;
} mmb_args;

/* dx[t0:t0+tc, k0:k0+kc] += dy[t0:, :]·W[:, k0:k0+kc], N in chunks */
static void mmb_dx_tile(const mmb_args *a, int t0, int tc, int k0, int kc) {
    int K = a->K, N = a->N;
    for (int n0 = 0; n0 < N; n0 += BW_CHUNK) {
        int nc = N - n0 < BW_CHUNK ? N - n0 : BW_CHUNK;
        const float *wc = (const float *)a->w + (size_t)n0 * K + k0;
        int ldw = K;
        if (a->wdt != MOE_DT_F32) {
            float *b = wbuf(0, (size_t)BW_CHUNK * BW_COLS);
            const unsigned char *src = (const unsigned char *)a->w + 2 * ((size_t)n0 * K + k0);
            for (int n = 0; n < nc; n++) bf16_to_f32(b + (size_t)n * kc, src + 2 * (size_t)n * K, kc);
            wc = b;
            ldw = kc;
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, tc, kc, nc, 1.0f,
                    a->dy + (size_t)t0 * N + n0, N, wc, ldw, 1.0f, a->dx + (size_t)t0 * K + k0, K);
    }
}

/* dw[n0:n0+nc, k0:k0+kc] += dy[:, n0:]ᵀ·x[:, k0:] over all T */
static void mmb_dw_tile(const mmb_args *a, int n0, int nc, int k0, int kc) {
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, nc, kc, a->T, 1.0f, a->dy + n0, a->N,
                a->x + k0, a->K, 1.0f, a->dw + (size_t)n0 * a->K + k0, a->K);
}

static void mmb_tiles(const mmb_args *a) {
    int T = a->T, K = a->K, N = a->N, nb = (K + BW_COLS - 1) / BW_COLS;
    int ndx = a->dx ? (T + BW_ROWS - 1) / BW_ROWS * nb : 0;
    int ndw = a->dw ? (N + BW_COLS - 1) / BW_COLS * nb : 0;
#pragma omp parallel for schedule(dynamic, 1) if (ndx + ndw > 1 && (double)T * N * K > 2e6)
    for (int i = 0; i < ndx + ndw; i++) {
        int j = i < ndx ? i : i - ndx;
        int k0 = j % nb * BW_COLS, kc = K - k0 < BW_COLS ? K - k0 : BW_COLS;
        if (i < ndx) {
            int t0 = j / nb * BW_ROWS;
            mmb_dx_tile(a, t0, T - t0 < BW_ROWS ? T - t0 : BW_ROWS, k0, kc);
        } else {
            int n0 = j / nb * BW_COLS;
            mmb_dw_tile(a, n0, N - n0 < BW_COLS ? N - n0 : BW_COLS, k0, kc);
        }
    }
}

/* dbias_n += Σ_t dy_tn, tokens in order, in double; features in blocks of 64 */
static void bias_backward(float *dbias, const float *dy, int T, int N) {
    int nb = (N + 63) / 64;
#pragma omp parallel for schedule(static) if ((size_t)T * N > 65536)
    for (int b = 0; b < nb; b++) {
        int n0 = b * 64, nc = N - n0 < 64 ? N - n0 : 64;
        double acc[64] = {0};
        for (int t = 0; t < T; t++)
            for (int n = 0; n < nc; n++) acc[n] += dy[(size_t)t * N + n0 + n];
        for (int n = 0; n < nc; n++) dbias[n0 + n] += (float)acc[n];
    }
}

static void matmul_backward_dt(float *dx, float *dw, float *dbias, const float *dy, const float *x,
                               const void *w, int wdt, int T, int K, int N) {
    if (T <= 0 || N <= 0) return;
    blas_single();
    mmb_args a = {dx, dw, dy, x, w, wdt, T, K, N};
    if (K > 0) mmb_tiles(&a);
    if (dbias) bias_backward(dbias, dy, T, N);
}

static void cpu_matmul_backward(float *dx, float *dw, float *dbias, const float *dy, const float *x,
                                const void *w, int T, int K, int N) {
    matmul_backward_dt(dx, dw, dbias, dy, x, w, MOE_DT_F32, T, K, N);
}

static void cpu_matmul_backward_bf16(float *dx, float *dw, float *dbias, const float *dy,
                                     const float *x, const void *w, int T, int K, int N) {
    matmul_backward_dt(dx, dw, dbias, dy, x, w, MOE_DT_BF16, T, K, N);
}

/* Reference: one output element per loop nest, sums in float in index order. */
static void ref_matmul_backward(float *dx, float *dw, float *dbias, const float *dy, const float *x,
                                const void *wv, int T, int K, int N) {
    const float *w = wv;
    if (dx) {
#pragma omp parallel for schedule(static)
        for (int t = 0; t < T; t++)
            for (int k = 0; k < K; k++) {
                float s = 0.0f;
                for (int n = 0; n < N; n++) s += dy[(size_t)t * N + n] * w[(size_t)n * K + k];
                dx[(size_t)t * K + k] += s;
            }
    }
    if (dw) {
#pragma omp parallel for schedule(static)
        for (int n = 0; n < N; n++)
            for (int k = 0; k < K; k++) {
                float s = 0.0f;
                for (int t = 0; t < T; t++) s += dy[(size_t)t * N + n] * x[(size_t)t * K + k];
                dw[(size_t)n * K + k] += s;
            }
    }
    if (dbias) bias_backward(dbias, dy, T, N);
}

/* ---- RMSNorm, RoPE ---------------------------------------------------- */

/* 1/rms of one row of C values (sum of squares in double) */
static float rms_inv(const float *x, float eps, int C) {
    double ss = 0.0;
    for (int c = 0; c < C; c++) ss += (double)x[c] * x[c];
    return (float)(1.0 / sqrt(ss / C + (double)eps));
}

static void cpu_rmsnorm(float *y, const float *x, const float *w, float eps, int T, int C) {
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++) {
        const float *xr = x + (size_t)t * C;
        float *yr = y + (size_t)t * C;
        float r = rms_inv(xr, eps, C);
        for (int c = 0; c < C; c++) yr[c] = w[c] * (xr[c] * r);
    }
}

/* y = w ⊙ x·r, r = (mean x² + eps)^(-1/2):
 *   dx = r·(w ⊙ dy) − r³/C · <w ⊙ dy, x> · x;   dw += Σ_t dy_t ⊙ x_t·r_t
 * (dw per feature block of 64, tokens in order, in double) */
static void cpu_rmsnorm_backward(float *dx, float *dw, const float *dy, const float *x,
                                 const float *w, float eps, int T, int C) {
    float *rs = moe_malloc(sizeof(float) * (size_t)(T > 0 ? T : 1));
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++) {
        const float *xr = x + (size_t)t * C, *g = dy + (size_t)t * C;
        float *d = dx + (size_t)t * C;
        float r = rms_inv(xr, eps, C);
        double dot = 0.0;
        for (int c = 0; c < C; c++) dot += (double)g[c] * w[c] * xr[c];
        float coef = (float)((double)r * r * r * dot / C);
        for (int c = 0; c < C; c++) d[c] += r * (w[c] * g[c]) - coef * xr[c];
        rs[t] = r;
    }
    if (dw) {
        int nb = (C + 63) / 64;
#pragma omp parallel for schedule(static) if ((size_t)T * C > 65536)
        for (int b = 0; b < nb; b++) {
            int c0 = b * 64, cc = C - c0 < 64 ? C - c0 : 64;
            double acc[64] = {0};
            for (int t = 0; t < T; t++)
                for (int c = 0; c < cc; c++)
                    acc[c] += (double)dy[(size_t)t * C + c0 + c] * (x[(size_t)t * C + c0 + c] * rs[t]);
            for (int c = 0; c < cc; c++) dw[c0 + c] += (float)acc[c];
        }
    }
    free(rs);
}

/* rotate every head of x by +angle (sign 1: the forward) or -angle (sign -1:
 * its transpose, the backward); -s is exact, so sign 1 gives the forward's bits */
static void rope_rotate(float *x, float theta, int pos0, int T, int nh, int D, float sign) {
    int half = D / 2;
    float *invf = malloc(sizeof(float) * (size_t)(half > 0 ? half : 1));
    for (int j = 0; j < half; j++) {
        /* as torch: inv = 1 / theta ** (float(2j) / D), all in float32 */
        float e = (float)(2 * j) / (float)D;
        float p = (float)pow((double)theta, (double)e);
        invf[j] = 1.0f / p;
    }
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++) {
        float pos = (float)(pos0 + t);
        for (int j = 0; j < half; j++) {
            float a = pos * invf[j];
            float c = (float)cos((double)a), s = sign * (float)sin((double)a);
            for (int h = 0; h < nh; h++) {
                float *v = x + ((size_t)t * nh + h) * D;
                float x0 = v[j], x1 = v[j + half];
                v[j] = x0 * c - x1 * s;
                v[j + half] = x1 * c + x0 * s;
            }
        }
    }
    free(invf);
}

static void cpu_rope(float *x, float theta, int pos0, int T, int nh, int D) {
    rope_rotate(x, theta, pos0, T, nh, D, 1.0f);
}

/* a rotation's gradient is the inverse rotation: d ← Rᵀ·d */
static void cpu_rope_backward(float *d, float theta, int pos0, int T, int nh, int D) {
    rope_rotate(d, theta, pos0, T, nh, D, -1.0f);
}

/* ---- attention ---------------------------------------------------------- */

static void cpu_attention_kv(float *out, const float *q, const float *k, const float *v,
                             float scale, int P, int T, int nh, int nkv, int D);
/* the blocked, row-invariant kernel of attention_kv (appended below) with no cache */
static void cpu_attention(float *out, const float *q, const float *k, const float *v, float scale,
                          int T, int nh, int nkv, int D) {
    cpu_attention_kv(out, q, k, v, scale, 0, T, nh, nkv, D);
}

/* ---- element-wise ------------------------------------------------------- */

static void cpu_swiglu(float *h, const float *gu, int T, int Im) {
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++) {
        const float *g = gu + (size_t)t * 2 * Im, *u = g + Im;
        float *o = h + (size_t)t * Im;
        for (int i = 0; i < Im; i++) {
            float sg = 1.0f / (1.0f + expf(-g[i]));
            o[i] = (g[i] * sg) * u[i];
        }
    }
}

/* h = silu(g)·u:  dg += dh·u·σ(g)·(1 + g·(1 − σ(g))) (torch's silu backward),
 * du += dh·silu(g) */
static void cpu_swiglu_backward(float *dgu, const float *dh, const float *gu, int T, int Im) {
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++) {
        const float *g = gu + (size_t)t * 2 * Im, *u = g + Im, *d = dh + (size_t)t * Im;
        float *dg = dgu + (size_t)t * 2 * Im, *du = dg + Im;
        for (int i = 0; i < Im; i++) {
            float sg = 1.0f / (1.0f + expf(-g[i]));
            dg[i] += d[i] * u[i] * (sg * (1.0f + g[i] * (1.0f - sg)));
            du[i] += d[i] * (g[i] * sg);
        }
    }
}

static void cpu_axpy(float *y, const float *x, float a, size_t n) {
#pragma omp parallel for schedule(static) if (n > 65536)
    for (size_t i = 0; i < n; i++) y[i] += a * x[i];
}

static void cpu_sigmoid_gate_add(float *y, const float *x, const float *z, int T, int C) {
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++) {
        float g = 1.0f / (1.0f + expf(-z[t]));
        for (int c = 0; c < C; c++) y[(size_t)t * C + c] += g * x[(size_t)t * C + c];
    }
}

/* y_t += σ(z_t)·x_t:  dx_t += σ(z_t)·dy_t;  dz_t += σ(z_t)(1 − σ(z_t))·<dy_t, x_t> */
static void cpu_sigmoid_gate_add_backward(float *dx, float *dz, const float *dy, const float *x,
                                          const float *z, int T, int C) {
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++) {
        float g = 1.0f / (1.0f + expf(-z[t]));
        const float *d = dy + (size_t)t * C;
        if (dx)
            for (int c = 0; c < C; c++) dx[(size_t)t * C + c] += g * d[c];
        if (dz) {
            double dot = 0.0;
            for (int c = 0; c < C; c++) dot += (double)d[c] * x[(size_t)t * C + c];
            dz[t] += (float)(g * (1.0 - g) * dot);
        }
    }
}

/* ---- routing ------------------------------------------------------------ */

static void softmax_row(float *p, const float *x, int C) {
    float mx = -INFINITY;
    for (int c = 0; c < C; c++)
        if (x[c] > mx) mx = x[c];
    double sum = 0.0;
    for (int c = 0; c < C; c++) {
        p[c] = expf(x[c] - mx);
        sum += p[c];
    }
    float inv = (float)(1.0 / sum);
    for (int c = 0; c < C; c++) p[c] *= inv;
}

/* top-k of s[0..E-1] by value, ties to the lower index, sorted descending */
static void topk_row(int32_t *idx, float *val, const float *s, int E, int K) {
    for (int k = 0; k < K; k++) {
        int best = -1;
        for (int e = 0; e < E; e++) {
            int taken = 0;
            for (int j = 0; j < k; j++)
                if (idx[j] == e) taken = 1;
            if (taken) continue;
            if (best < 0 || s[e] > s[best]) best = e;
        }
        idx[k] = best;
        val[k] = s[best];
    }
}

static void cpu_router(int32_t *idx, float *wt, float *probs, const float *logits, int mode,
                       int renorm, int T, int E, int K) {
#pragma omp parallel
    {
        float *p = malloc(sizeof(float) * (size_t)E);
#pragma omp for schedule(static)
        for (int t = 0; t < T; t++) {
            const float *l = logits + (size_t)t * E;
            int32_t *ix = idx + (size_t)t * K;
            float *w = wt + (size_t)t * K;
            if (mode == MOE_ROUTE_TOPK_SOFTMAX) {
                topk_row(ix, w, l, E, K);
                softmax_row(w, w, K); /* w holds the selected logits, max first */
                if (probs) softmax_row(probs + (size_t)t * E, l, E);
            } else {
                softmax_row(p, l, E);
                topk_row(ix, w, p, E, K);
                if (probs) memcpy(probs + (size_t)t * E, p, sizeof(float) * E);
            }
            if (renorm != MOE_RENORM_NONE) {
                float s = 0.0f;
                for (int k = 0; k < K; k++) s += w[k];
                if (renorm == MOE_RENORM_SUM_EPS) s += 1e-20f;
                for (int k = 0; k < K; k++) w[k] /= s;
            }
        }
        free(p);
    }
}

/* One token's logit gradient.  Top-k selection is a constant index set (as
 * autograd through torch.topk), so with p = softmax(l), w_k = p[idx_k] and,
 * when renormalised, w̃_k = w_k / S (S = Σ_k w_k, + 1e-20 for SUM_EPS):
 *   dw_k = (dw̃_k − Σ_j dw̃_j·w̃_j) / S     (or dw̃_k without renorm)
 *   dp_e = dprobs_e + Σ_k [idx_k = e]·dw_k
 *   dl_e = p_e·(dp_e − Σ_e' p_e'·dp_e')   (softmax backward) */
static void router_backward_row(float *dl, double *dp, const float *dwt, const float *dprobs,
                                const int32_t *idx, const float *wt, const float *p, int renorm,
                                int E, int K) {
    for (int e = 0; e < E; e++) dp[e] = dprobs ? dprobs[e] : 0.0;
    if (renorm == MOE_RENORM_NONE) {
        for (int k = 0; k < K; k++) dp[idx[k]] += dwt[k];
    } else {
        float S = 0.0f; /* as the forward sums the selected weights */
        for (int k = 0; k < K; k++) S += p[idx[k]];
        if (renorm == MOE_RENORM_SUM_EPS) S += 1e-20f;
        double dot = 0.0;
        for (int k = 0; k < K; k++) dot += (double)dwt[k] * wt[k];
        for (int k = 0; k < K; k++) dp[idx[k]] += ((double)dwt[k] - dot) / S;
    }
    double pdp = 0.0;
    for (int e = 0; e < E; e++) pdp += p[e] * dp[e];
    for (int e = 0; e < E; e++) dl[e] = (float)(p[e] * (dp[e] - pdp));
}

/* TOPK_SOFTMAX (softmax over the k selected logits) is SOFTMAX_TOPK then a
 * renormalisation by the sum: the same function, so the same gradient. */
static void cpu_router_backward(float *dlogits, const float *dwt, const float *dprobs,
                                const int32_t *idx, const float *wt, const float *probs, int mode,
                                int renorm, int T, int E, int K) {
    if (mode == MOE_ROUTE_TOPK_SOFTMAX) renorm = MOE_RENORM_SUM;
#pragma omp parallel
    {
        double *dp = malloc(sizeof(double) * (size_t)(E > 0 ? E : 1));
#pragma omp for schedule(static)
        for (int t = 0; t < T; t++)
            router_backward_row(dlogits + (size_t)t * E, dp, dwt + (size_t)t * K,
                                dprobs ? dprobs + (size_t)t * E : NULL, idx + (size_t)t * K,
                                wt + (size_t)t * K, probs + (size_t)t * E, renorm, E, K);
        free(dp);
    }
}

static void cpu_gather_rows(float *dst, const float *src, const int32_t *rows, int n, int C) {
#pragma omp parallel for schedule(static) if (n * (size_t)C > 65536)
    for (int i = 0; i < n; i++)
        memcpy(dst + (size_t)i * C, src + (size_t)rows[i] * C, sizeof(float) * C);
}

static void cpu_scatter_add_rows(float *dst, const float *src, const int32_t *rows,
                                 const float *scale, int n, int C) {
#pragma omp parallel for schedule(static) if (n * (size_t)C > 65536)
    for (int i = 0; i < n; i++) {
        float a = scale ? scale[i] : 1.0f;
        float *d = dst + (size_t)rows[i] * C;
        const float *s = src + (size_t)i * C;
        if (scale)
            for (int c = 0; c < C; c++) d[c] += s[c] * a;
        else
            for (int c = 0; c < C; c++) d[c] += s[c];
    }
}

/* Grouped experts.  One task per expert with rows, tasks spread over the
 * threads (largest first, dynamically): gather the expert's rows, one
 * single-threaded sgemm for gate and up together (w_gu holds the gate rows
 * then the up rows, so the product is [g | u], 2*Im columns), SwiGLU, one
 * sgemm for down.  An expert's result does not depend on which thread runs
 * it, nor on the thread count (its GEMMs always have the full widths 2*Im
 * and H); a row's result does not depend on the number of rows (sgemm_tile).
 * Whole-width GEMMs pack each expert's rows once per product instead of once
 * per column block, and the threads need no barrier between gate/up and down
 * (test_kernels.c: test_experts_invariance). */
int moe_cpu_expert_tasks(int *task, const int32_t *off, const void *const *w_gu, int E, int H,
                         int Im, int *maxr, double *macs) {
    int nt = 0;
    for (int e = 0; e < E; e++) {
        int nr = off[e + 1] - off[e];
        if (!w_gu[e] || nr <= 0) continue;
        /* insertion by descending row count, then ascending id */
        int j = nt++;
        while (j > 0 && off[task[j - 1] + 1] - off[task[j - 1]] < nr) {
            task[j] = task[j - 1];
            j--;
        }
        task[j] = e;
        if (nr > *maxr) *maxr = nr;
        *macs += 3.0 * nr * H * Im;
    }
    return nt;
}

static void experts_dt(float *out, const float *x, const int32_t *rows, const int32_t *off,
                       const void *const *w_gu, const void *const *w_down, int wdt, int E, int H,
                       int Im) {
    blas_single();
    if (off[E] <= 0) return;
    int *task = moe_malloc(sizeof(int) * ((size_t)E + 1)), maxr = 0;
    double macs = 0;
    int nt = moe_cpu_expert_tasks(task, off, w_gu, E, H, Im, &maxr, &macs);
#pragma omp parallel if (nt > 1 && macs > 2e6)
    {
        float *xg = NULL, *g = NULL, *h = NULL;
#pragma omp for schedule(dynamic, 1)
        for (int j = 0; j < nt; j++) {
            if (!xg) {
                xg = cpu_alloc(sizeof(float) * (size_t)maxr * H);
                g = cpu_alloc(sizeof(float) * (size_t)maxr * 2 * Im);
                h = cpu_alloc(sizeof(float) * (size_t)maxr * Im);
            }
            int e = task[j], r0 = off[e], nr = off[e + 1] - off[e];
            for (int r = 0; r < nr; r++)
                memcpy(xg + (size_t)r * H, x + (size_t)rows[r0 + r] * H, sizeof(float) * H);
            /* bf16: the expert's weights widened whole (the GEMMs keep their full
             * widths), into buffers of this thread reused expert after expert */
            sgemm_tile(g, 2 * Im, xg, wtile(w_gu[e], wdt, 0, 0, 2 * (size_t)Im, (size_t)H), nr, H,
                       2 * Im, 0);
            for (int r = 0; r < nr; r++) {
                const float *gr = g + (size_t)r * 2 * Im, *ur = gr + Im;
                float *hr = h + (size_t)r * Im;
                for (int c = 0; c < Im; c++) {
                    float sg = 1.0f / (1.0f + expf(-gr[c]));
                    hr[c] = (gr[c] * sg) * ur[c];
                }
            }
            sgemm_tile(out + (size_t)r0 * H, H, h, wtile(w_down[e], wdt, 1, 0, (size_t)H, (size_t)Im),
                       nr, Im, H, 0);
        }
        if (xg) {
            cpu_free(xg);
            cpu_free(g);
            cpu_free(h);
        }
    }
    free(task);
}

static void cpu_experts(float *out, const float *x, const int32_t *rows, const int32_t *off,
                        const void *const *w_gu, const void *const *w_down, int E, int H, int Im) {
    experts_dt(out, x, rows, off, w_gu, w_down, MOE_DT_F32, E, H, Im);
}

static void cpu_experts_bf16(float *out, const float *x, const int32_t *rows, const int32_t *off,
                             const void *const *w_gu, const void *const *w_down, int E, int H,
                             int Im) {
    experts_dt(out, x, rows, off, w_gu, w_down, MOE_DT_BF16, E, H, Im);
}

/* Reference: per expert, per row, plain loops. */
static void ref_experts(float *out, const float *x, const int32_t *rows, const int32_t *off,
                        const void *const *w_gu, const void *const *w_down, int E, int H, int Im) {
    for (int e = 0; e < E; e++) {
        if (!w_gu[e]) continue;
        const float *wg = w_gu[e], *wd = w_down[e];
#pragma omp parallel
        {
            float *hh = malloc(sizeof(float) * (size_t)Im);
#pragma omp for schedule(static)
            for (int i = off[e]; i < off[e + 1]; i++) {
                const float *xr = x + (size_t)rows[i] * H;
                for (int c = 0; c < Im; c++) {
                    float g = 0, u = 0;
                    for (int k = 0; k < H; k++) {
                        g += xr[k] * wg[(size_t)c * H + k];
                        u += xr[k] * wg[(size_t)(Im + c) * H + k];
                    }
                    hh[c] = g / (1.0f + expf(-g)) * u;
                }
                for (int o = 0; o < H; o++) {
                    float s = 0;
                    for (int c = 0; c < Im; c++) s += hh[c] * wd[(size_t)o * Im + c];
                    out[(size_t)i * H + o] = s;
                }
            }
            free(hh);
        }
    }
}

static void cpu_combine(float *y, const float *out, const int32_t *slot, const float *wt, int T,
                        int K, int H) {
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++) {
        float *yr = y + (size_t)t * H;
        for (int c = 0; c < H; c++) yr[c] = 0.0f;
        for (int k = 0; k < K; k++) {
            const float *o = out + (size_t)slot[(size_t)t * K + k] * H;
            float a = wt[(size_t)t * K + k];
            for (int c = 0; c < H; c++) yr[c] += o[c] * a;
        }
    }
}

/* y_t = Σ_k wt_tk·out_{slot_tk}:  dout_{slot_tk} = wt_tk·dy_t,  dwt_tk = <dy_t, out_{slot_tk}>
 * (both written: each row of out is one (t, k)'s) */
static void cpu_combine_backward(float *dout, float *dwt, const float *dy, const float *out,
                                 const int32_t *slot, const float *wt, int T, int K, int H) {
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++) {
        const float *g = dy + (size_t)t * H;
        for (int k = 0; k < K; k++) {
            size_t r = (size_t)slot[(size_t)t * K + k];
            if (dout) {
                float a = wt[(size_t)t * K + k];
                for (int c = 0; c < H; c++) dout[r * H + c] = g[c] * a;
            }
            if (dwt) {
                double dot = 0.0;
                for (int c = 0; c < H; c++) dot += (double)g[c] * out[r * H + c];
                dwt[(size_t)t * K + k] = (float)dot;
            }
        }
    }
}

/* ---- reductions for the search tools ----------------------------------- */

static void cpu_softmax_rows(float *p, const float *x, int T, int C) {
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++) softmax_row(p + (size_t)t * C, x + (size_t)t * C, C);
}

/* CD-MoE's calculate_js_divergence: p = softmax(a), q = softmax(b),
 * m = (p+q)/2, KL(x||y) = Σ (x+ε)(log(x+ε) − log(y+ε)) with ε = 1e-10,
 * JS = (KL(p||m) + KL(q||m)) / 2.  Probabilities are float32 as in torch, the
 * sums are double. */
static double row_divergence(const float *a, const float *b, float *pa, float *pb, int metric,
                             int C) {
    const double eps = 1e-10;
    double r = 0.0;
    switch (metric) {
    case MOE_DIV_JS:
        softmax_row(pa, a, C);
        softmax_row(pb, b, C);
        {
            double kp = 0.0, kq = 0.0;
            for (int c = 0; c < C; c++) {
                float m = 0.5f * (pa[c] + pb[c]);
                double lm = log((double)m + eps);
                double p = (double)pa[c] + eps, q = (double)pb[c] + eps;
                kp += p * (log(p) - lm);
                kq += q * (log(q) - lm);
            }
            r = 0.5 * (kp + kq);
        }
        break;
    case MOE_DIV_KL:
        softmax_row(pa, a, C);
        softmax_row(pb, b, C);
        for (int c = 0; c < C; c++) {
            double p = (double)pa[c] + eps, q = (double)pb[c] + eps;
            r += p * (log(p) - log(q));
        }
        break;
    case MOE_DIV_MSE:
        for (int c = 0; c < C; c++) {
            double d = (double)a[c] - b[c];
            r += d * d;
        }
        r /= C;
        break;
    case MOE_DIV_COSINE: {
        double ab = 0, aa = 0, bb = 0;
        for (int c = 0; c < C; c++) {
            ab += (double)a[c] * b[c];
            aa += (double)a[c] * a[c];
            bb += (double)b[c] * b[c];
        }
        double den = sqrt(aa) * sqrt(bb);
        r = den > 0 ? 1.0 - ab / den : (aa == bb ? 0.0 : 1.0);
        break;
    }
    }
    return r;
}

static void cpu_divergence(double *d, const float *a, const float *b, int metric, int T, int C) {
#pragma omp parallel
    {
        float *pa = malloc(sizeof(float) * (size_t)C * 2), *pb = pa + C;
#pragma omp for schedule(static)
        for (int t = 0; t < T; t++)
            d[t] = row_divergence(a + (size_t)t * C, b + (size_t)t * C, pa, pb, metric, C);
        free(pa);
    }
}

/* ---- training: embedding gradient, loss, optimizer ---------------------- */

/* x_t = E[ids_t]:  dE[ids_t] += dx_t.  Threads own blocks of 64 columns and
 * walk the tokens in order, so every row accumulates in token order. */
static void cpu_embed_backward(float *dE, const float *dx, const int32_t *ids, int T, int H) {
    int nb = (H + 63) / 64;
#pragma omp parallel for schedule(static) if ((size_t)T * H > 65536)
    for (int b = 0; b < nb; b++) {
        int c0 = b * 64, cc = H - c0 < 64 ? H - c0 : 64;
        for (int t = 0; t < T; t++) {
            float *d = dE + (size_t)ids[t] * H + c0;
            const float *g = dx + (size_t)t * H + c0;
            for (int c = 0; c < cc; c++) d[c] += g[c];
        }
    }
}

/* loss_t = logsumexp(l_t) − l_t[target] (fp32 max-subtracted exp, double
 * sum); dl_t = (softmax(l_t) − onehot)·dscale, written (may alias l: a row's
 * max and target logit are read before the row is overwritten).  Ignored rows: 0, 0. */
static void cpu_cross_entropy(float *loss, float *dlogits, const float *logits,
                              const int32_t *targets, float dscale, int T, int V) {
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++) {
        const float *l = logits + (size_t)t * V;
        int tg = targets[t];
        if (tg < 0) {
            loss[t] = 0.0f;
            if (dlogits) memset(dlogits + (size_t)t * V, 0, sizeof(float) * V);
            continue;
        }
        float mx = -INFINITY, lt = l[tg];
        for (int c = 0; c < V; c++)
            if (l[c] > mx) mx = l[c];
        /* exp(l − max) kept in dlogits (one expf per logit), normalised after */
        float *d = dlogits ? dlogits + (size_t)t * V : NULL;
        double sum = 0.0;
        for (int c = 0; c < V; c++) {
            float e = expf(l[c] - mx);
            sum += e;
            if (d) d[c] = e;
        }
        loss[t] = (float)((double)mx + log(sum) - (double)lt);
        if (!d) continue;
        double inv = 1.0 / sum;
        for (int c = 0; c < V; c++) {
            double p = d[c] * inv;
            d[c] = (float)((c == tg ? p - 1.0 : p) * dscale);
        }
    }
}

/* torch.optim.AdamW's single-tensor step, operation for operation in float32
 * (its Python-float scalars are doubles rounded to float where they meet a
 * tensor):  p *= 1 − lr·wd;  m = lerp(m, g, 1 − β1);  v = β2·v + (1 − β2)·g·g;
 * p += −(lr / (1 − β1^t)) · m / (sqrt(v) / sqrt(1 − β2^t) + eps).
 * lerp and addcmul are fused multiply-adds in torch's CPU kernels, and
 * addcdiv is (value·m)/denom: written the same way, the results are torch's
 * bits (test_backward.c checks them against tests/ref/backward_golden.py). */
static void cpu_adamw(float *p, float *m, float *v, const float *g, size_t n, float lr, float beta1,
                      float beta2, float eps, float weight_decay, float gscale, int step) {
    float decay = (float)(1.0 - (double)lr * weight_decay);
    float w1 = (float)(1.0 - (double)beta1), b2 = beta2, w2 = (float)(1.0 - (double)beta2);
    double bc1 = 1.0 - pow(beta1, step), bc2 = 1.0 - pow(beta2, step);
    float neg_step = (float)(-(double)lr / bc1), bc2_sqrt = (float)sqrt(bc2);
#pragma omp parallel for schedule(static) if (n > 65536)
    for (size_t i = 0; i < n; i++) {
        float gi = g[i] * gscale;
        float pi = p[i] * decay;
        /* torch's lerp: weight < 0.5 ? m + w·(g − m) : g − (g − m)·(1 − w), each one fma */
        float mi = w1 < 0.5f ? fmaf(w1, gi - m[i], m[i]) : fmaf(-(gi - m[i]), 1.0f - w1, gi);
        float vi = v[i] * b2;
        vi = fmaf(w2 * gi, gi, vi); /* addcmul_(g, g, value = 1 − β2) */
        float denom = sqrtf(vi) / bc2_sqrt + eps;
        p[i] = pi + neg_step * mi / denom;
        m[i] = mi;
        v[i] = vi;
    }
}

/* Σ x² in double: fixed chunks of 2^16 summed on any thread, then the
 * chunk sums in order -- the same bits whatever the thread count */
#define SUMSQ_CHUNK ((size_t)1 << 16)
static double cpu_sumsq(const float *x, size_t n) {
    size_t nc = (n + SUMSQ_CHUNK - 1) / SUMSQ_CHUNK;
    if (nc <= 1) {
        double s = 0.0;
        for (size_t i = 0; i < n; i++) s += (double)x[i] * x[i];
        return s;
    }
    double *part = moe_malloc(sizeof(double) * nc);
#pragma omp parallel for schedule(static)
    for (size_t c = 0; c < nc; c++) {
        size_t i0 = c * SUMSQ_CHUNK, i1 = i0 + SUMSQ_CHUNK < n ? i0 + SUMSQ_CHUNK : n;
        double s = 0.0;
        for (size_t i = i0; i < i1; i++) s += (double)x[i] * x[i];
        part[c] = s;
    }
    double s = 0.0;
    for (size_t c = 0; c < nc; c++) s += part[c];
    free(part);
    return s;
}

static void cpu_to_weight_f32(void *dst, const float *src, size_t n) {
    if (n && dst != src) memmove(dst, src, n * sizeof(float));
}

static void cpu_to_weight_bf16(void *dst, const float *src, size_t n) {
    uint16_t *d = dst;
#pragma omp parallel for schedule(static) if (n > 65536)
    for (size_t i = 0; i < n; i++) d[i] = moe_f32_to_bf16(src[i]);
}

/* ---- tables ------------------------------------------------------------- */

static void ref_attention_kv(float *out, const float *q, const float *k, const float *v,
                             float scale, int P, int T, int nh, int nkv, int D);
static void ref_attention(float *out, const float *q, const float *k, const float *v, float scale,
                          int T, int nh, int nkv, int D);
static void cpu_attention_backward(float *dq, float *dk, float *dv, const float *dout,
                                   const float *q, const float *k, const float *v, const float *out,
                                   float scale, int T, int nh, int nkv, int D);
static void ref_attention_backward(float *dq, float *dk, float *dv, const float *dout,
                                   const float *q, const float *k, const float *v, const float *out,
                                   float scale, int T, int nh, int nkv, int D);

static const moe_backend cpu_backend = {
    .name = "cpu",
    .weight_dtype = MOE_DT_F32,
    .host_memory = 1,
    .alloc = cpu_alloc,
    .free = cpu_free,
    .upload = cpu_memcpy,
    .download = cpu_memcpy,
    .copy = cpu_memcpy,
    .zero = cpu_zero,
    .sync = cpu_sync,
    .matmul = cpu_matmul,
    .rmsnorm = cpu_rmsnorm,
    .rope = cpu_rope,
    .attention = cpu_attention,
    .attention_kv = cpu_attention_kv,
    .swiglu = cpu_swiglu,
    .axpy = cpu_axpy,
    .sigmoid_gate_add = cpu_sigmoid_gate_add,
    .router = cpu_router,
    .gather_rows = cpu_gather_rows,
    .scatter_add_rows = cpu_scatter_add_rows,
    .experts = cpu_experts,
    .combine = cpu_combine,
    .softmax_rows = cpu_softmax_rows,
    .divergence = cpu_divergence,
    .matmul_backward = cpu_matmul_backward,
    .rmsnorm_backward = cpu_rmsnorm_backward,
    .rope_backward = cpu_rope_backward,
    .attention_backward = cpu_attention_backward,
    .swiglu_backward = cpu_swiglu_backward,
    .sigmoid_gate_add_backward = cpu_sigmoid_gate_add_backward,
    .combine_backward = cpu_combine_backward,
    .router_backward = cpu_router_backward,
    .embed_backward = cpu_embed_backward,
    .cross_entropy = cpu_cross_entropy,
    .adamw = cpu_adamw,
    .sumsq = cpu_sumsq,
    .to_weight_dtype = cpu_to_weight_f32,
    .host_alloc = cpu_host_alloc,
    .host_free = free,
    .upload_async = cpu_upload_async,
    .upload_wait = cpu_upload_wait,
    .upload_fence = cpu_nop,
    .trim = cpu_nop,
    .mem_info = cpu_mem_info,
    .mem_used = cpu_mem_used,
    .status = cpu_status,
};


const moe_backend *moe_backend_cpu(void) { return &cpu_backend; }
/* "cpu-ref": the "cpu" table with the plain reference loops for the ops that
 * cpu blocks or hands to BLAS (built from it, so that every other op is cpu's) */
static moe_backend cpu_ref_backend;
static pthread_once_t cpu_ref_once = PTHREAD_ONCE_INIT;
static void cpu_ref_init(void) {
    cpu_ref_backend = cpu_backend;
    cpu_ref_backend.name = "cpu-ref";
    cpu_ref_backend.matmul = ref_matmul;
    cpu_ref_backend.attention = ref_attention;
    cpu_ref_backend.attention_kv = ref_attention_kv;
    cpu_ref_backend.experts = ref_experts;
    cpu_ref_backend.matmul_backward = ref_matmul_backward;
    cpu_ref_backend.attention_backward = ref_attention_backward;
}
const moe_backend *moe_backend_cpu_ref(void) {
    pthread_once(&cpu_ref_once, cpu_ref_init);
    return &cpu_ref_backend;
}
/* "cpu-bf16": the "cpu" table with the weight ops for BF16 (built from it, so
 * that every other op stays the same as cpu's) */
static moe_backend cpu_bf16_backend;
static pthread_once_t cpu_bf16_once = PTHREAD_ONCE_INIT;
static void cpu_bf16_init(void) {
    cpu_bf16_backend = cpu_backend;
    cpu_bf16_backend.name = "cpu-bf16";
    cpu_bf16_backend.weight_dtype = MOE_DT_BF16;
    cpu_bf16_backend.matmul = cpu_matmul_bf16;
    cpu_bf16_backend.matmul_f32 = cpu_matmul_f32;
    cpu_bf16_backend.experts = cpu_experts_bf16;
    cpu_bf16_backend.matmul_backward = cpu_matmul_backward_bf16;
    cpu_bf16_backend.to_weight_dtype = cpu_to_weight_bf16;
}
const moe_backend *moe_backend_cpu_bf16(void) {
    pthread_once(&cpu_bf16_once, cpu_bf16_init);
    return &cpu_bf16_backend;
}
/* "cpu-bf16-compute" (--precision bf16): cpu-bf16 whose weight GEMMs take
 * BF16 inputs (cpu_bf16.c); matmul_f32 (f32 weights: a condensed layer's
 * down projection, the router) stays float32 */
static moe_backend cpu_bf16c_backend;
static pthread_once_t cpu_bf16c_once = PTHREAD_ONCE_INIT;
static void cpu_bf16c_init(void) {
    cpu_bf16c_backend = *moe_backend_cpu_bf16();
    cpu_bf16c_backend.name = "cpu-bf16-compute";
    cpu_bf16c_backend.matmul = moe_cpu_bf16_matmul;
    cpu_bf16c_backend.experts = moe_cpu_bf16_experts;
}
const moe_backend *moe_backend_cpu_bf16_compute(void) {
    pthread_once(&cpu_bf16c_once, cpu_bf16c_init);
    return &cpu_bf16c_backend;
}

/* kernels/select.c (the CUDA plugin's loader): NULL with an error when the
 * build has no CUDA or no usable GPU is present. */
const moe_backend *moe_backend_cuda(void);

const moe_backend *moe_backend_get(const char *name) {
    if (!name || !strcmp(name, "cpu")) return &cpu_backend;
    if (!strcmp(name, "cpu-ref")) return moe_backend_cpu_ref();
    if (!strcmp(name, "cpu-bf16")) return moe_backend_cpu_bf16();
    if (!strcmp(name, "cpu-bf16-compute")) return moe_backend_cpu_bf16_compute();
    if (!strcmp(name, "cuda")) return moe_backend_cuda();
    moe_error_set(MOE_ERR_DATA, "unknown device '%s' (expected cpu, cpu-ref, cpu-bf16, cpu-bf16-compute or cuda)", name);
    return NULL;
}

/* ---- host helpers --------------------------------------------------------- */

void moe_dispatch_build(moe_dispatch *d, const int32_t *idx, const float *wt, int T, int E, int K) {
    d->E = E;
    d->T = T;
    d->K = K;
    d->off = moe_calloc((size_t)E + 1, sizeof(int32_t));
    d->tokens = moe_malloc(sizeof(int32_t) * ((size_t)T * K + 1));
    d->weights = moe_malloc(sizeof(float) * ((size_t)T * K + 1));
    for (size_t i = 0; i < (size_t)T * K; i++) d->off[idx[i] + 1]++;
    for (int e = 0; e < E; e++) d->off[e + 1] += d->off[e];
    int32_t *fill = moe_malloc(sizeof(int32_t) * ((size_t)E + 1));
    memcpy(fill, d->off, sizeof(int32_t) * ((size_t)E + 1));
    d->slot = moe_malloc(sizeof(int32_t) * ((size_t)T * K + 1));
    d->slot_wt = moe_malloc(sizeof(float) * ((size_t)T * K + 1));
    for (int t = 0; t < T; t++)
        for (int k = 0; k < K; k++) {
            int e = idx[(size_t)t * K + k];
            int32_t p = fill[e]++;
            d->tokens[p] = t;
            d->weights[p] = wt[(size_t)t * K + k];
        }
    /* per token, its slots in ascending expert id (insertion sort, K small) */
    for (int t = 0; t < T; t++) {
        int32_t *sl = d->slot + (size_t)t * K;
        float *sw = d->slot_wt + (size_t)t * K;
        int32_t ex[64];
        int KK = K < 64 ? K : 64;
        for (int k = 0; k < KK; k++) {
            int e = idx[(size_t)t * K + k];
            int j = k;
            while (j > 0 && ex[j - 1] > e) {
                ex[j] = ex[j - 1];
                sw[j] = sw[j - 1];
                j--;
            }
            ex[j] = e;
            sw[j] = wt[(size_t)t * K + k];
        }
        /* the row of (t, e) within expert e's block: tokens are ascending there */
        for (int k = 0; k < KK; k++) {
            int e = ex[k], lo = d->off[e], hi = d->off[e + 1] - 1;
            while (lo < hi) { /* binary search for token t */
                int mid = (lo + hi) / 2;
                if (d->tokens[mid] < t)
                    lo = mid + 1;
                else
                    hi = mid;
            }
            sl[k] = lo;
        }
    }
    free(fill);
}

void moe_dispatch_free(moe_dispatch *d) {
    free(d->off);
    free(d->tokens);
    free(d->weights);
    free(d->slot);
    free(d->slot_wt);
    memset(d, 0, sizeof *d);
}

/* ---- attention over a KV cache (attention_kv) ------------------------------ */

/* Shared by the forward and backward kernels: s[0..last] ← exp(s − max),
 * returns 1 / Σ (fp32 exp, double sum); the row's softmax is s[j]·inv. */
static float exp_prefix(float *s, int last) {
    float mx = -INFINITY;
    for (int j = 0; j <= last; j++)
        if (s[j] > mx) mx = s[j];
    double sum = 0.0;
    for (int j = 0; j <= last; j++) {
        s[j] = expf(s[j] - mx);
        sum += s[j];
    }
    return (float)(1.0 / sum);
}

/* reference scores of query qi against keys 0..last of KV head kh: s[j] = scale·qi·k_j */
static void ref_scores(float *s, const float *qi, const float *k, float scale, int last, int kh,
                       int nkv, int D) {
    for (int j = 0; j <= last; j++) {
        const float *kj = k + ((size_t)j * nkv + kh) * D;
        float d = 0.0f;
        for (int c = 0; c < D; c++) d += qi[c] * kj[c];
        s[j] = d * scale;
    }
}

/* Reference: one (head, query) at a time, plain loops; query t at position
 * P + t sees keys 0..P+t. */
static void ref_attention_kv(float *out, const float *q, const float *k, const float *v,
                             float scale, int P, int T, int nh, int nkv, int D) {
    int rep = nh / nkv, N = P + T;
#pragma omp parallel
    {
        float *s = malloc(sizeof(float) * (size_t)(N > 0 ? N : 1));
#pragma omp for schedule(dynamic, 4) collapse(2)
        for (int h = 0; h < nh; h++) {
            for (int i = 0; i < T; i++) {
                int kh = h / rep, last = P + i;
                const float *qi = q + ((size_t)i * nh + h) * D;
                ref_scores(s, qi, k, scale, last, kh, nkv, D);
                float inv = exp_prefix(s, last);
                float *o = out + ((size_t)i * nh + h) * D;
                for (int c = 0; c < D; c++) o[c] = 0.0f;
                for (int j = 0; j <= last; j++) {
                    float p = s[j] * inv;
                    const float *vj = v + ((size_t)j * nkv + kh) * D;
                    for (int c = 0; c < D; c++) o[c] += p * vj[c];
                }
            }
        }
        free(s);
    }
}

/* Reference for the whole sequence: no cached keys. */
static void ref_attention(float *out, const float *q, const float *k, const float *v, float scale,
                          int T, int nh, int nkv, int D) {
    ref_attention_kv(out, q, k, v, scale, 0, T, nh, nkv, D);
}

/* Optimised, row-invariant, heads spread over the threads.  Keys are taken
 * in fixed blocks of ATT_KB from key 0 (a last partial block is copied and
 * zero-padded to ATT_KB rows); per
 * block b, the queries that see any of its keys (rows t0..T-1) get
 *   S[:, block] = scale · q·k_bᵀ          (M rows, N = ATT_KB, K = D)
 * then, after the masked softmax of every row over keys 0..P+t (fp32 exp,
 * double sum, as before; masked entries exact zeros),
 *   out += P[:, block]·v_b                (M rows, N = D, K = ATT_KB)
 * in ascending block order.  Every GEMM thus has a shape fixed by (D,
 * ATT_KB) except its row count M, a row's result does not depend on M (the
 * padding of small calls as in sgemm_tile), and a row meets the same blocks
 * in the same order whatever P and T: its bits depend only on its query,
 * the keys and values it sees, and its position.  Masked keys inside a
 * row's last block add 0·v = 0 exactly (finite v), so a row also agrees
 * when later keys exist or not (context run alone vs the whole sequence).
 * Cost, against the former kernel (one whole T x T sgemm pair per head; 16
 * heads, D 128, one thread, noisy shared machine): 0.75-0.9x the time at
 * T 256..2048 (blocks above the diagonal skipped), 1.4-1.8x at T 64 (small
 * products padded); 8 queries over 2040 cached keys ~15-30 ms, mostly the
 * padding of their 2 x 16 blocks x 16 heads small products. */
#define ATT_KB 128

/* C[0:M] = alpha·A·op(B) + beta·C with one single-threaded sgemm whose row
 * count is padded as sgemm_tile's (pa/pc: scratch of SMALL_MNK/(N·K)+1 rows
 * or M rows, whichever is larger, of K and N floats) */
static void gemm_pad(int transb, int M, int N, int K, float alpha, const float *A, int lda,
                     const float *B, int ldb, float beta, float *C, int ldc, float *pa, float *pc) {
    CBLAS_TRANSPOSE tb = transb ? CblasTrans : CblasNoTrans;
    if ((double)M * N * K > SMALL_MNK && M >= 2) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
    int Mp = (int)(SMALL_MNK / ((double)N * K)) + 1;
    if (Mp < 2) Mp = 2;
    if (Mp < M) Mp = M;
    for (int i = 0; i < M; i++) memcpy(pa + (size_t)i * K, A + (size_t)i * lda, sizeof(float) * K);
    if (beta != 0.0f)
        for (int i = 0; i < M; i++) memcpy(pc + (size_t)i * N, C + (size_t)i * ldc, sizeof(float) * N);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, tb, Mp, N, K, alpha, pa, K, B, ldb, beta, pc, N);
    for (int i = 0; i < M; i++) memcpy(C + (size_t)i * ldc, pc + (size_t)i * N, sizeof(float) * N);
}

static void cpu_attention_kv(float *out, const float *q, const float *k, const float *v,
                             float scale, int P, int T, int nh, int nkv, int D) {
    if (T <= 0 || nh <= 0 || D <= 0) return;
    blas_single();
    int rep = nh / nkv, N = P + T;
    int nb = (N + ATT_KB - 1) / ATT_KB;
    size_t ldS = (size_t)nb * ATT_KB;
    int Mp = (int)(SMALL_MNK / ((double)ATT_KB * D)) + 1;
    if (Mp < T) Mp = T;
    if (Mp < 2) Mp = 2;
    size_t wmax = (size_t)(D > ATT_KB ? D : ATT_KB);
#pragma omp parallel if (nh > 1)
    {
        float *S = cpu_alloc(sizeof(float) * (size_t)T * ldS);
        float *kb = cpu_alloc(sizeof(float) * (size_t)ATT_KB * D);
        float *vb = cpu_alloc(sizeof(float) * (size_t)ATT_KB * D);
        float *pa = calloc((size_t)Mp * wmax, sizeof(float));
        float *pc = calloc((size_t)Mp * wmax, sizeof(float));
        if (!pa || !pc) moe_malloc((size_t)-1 / 2); /* out of memory: aborts with a message */
#pragma omp for schedule(dynamic, 1)
        for (int h = 0; h < nh; h++) {
            int kh = h / rep;
            float *oh = out + (size_t)h * D;
            for (int t = 0; t < T; t++) memset(oh + (size_t)t * nh * D, 0, sizeof(float) * D);
            for (int b = 0; b < nb; b++) {
                int j0 = b * ATT_KB, nk = N - j0 < ATT_KB ? N - j0 : ATT_KB;
                int t0 = j0 - P > 0 ? j0 - P : 0; /* first query that sees key j0 */
                /* a whole block is read in place (sgemm packs it anyway); a
                 * partial one is copied and zero-padded */
                const float *kp = k + ((size_t)j0 * nkv + kh) * D;
                int ldk = nkv * D;
                if (nk < ATT_KB) {
                    for (int c = 0; c < nk; c++)
                        memcpy(kb + (size_t)c * D, kp + (size_t)c * ldk, sizeof(float) * D);
                    memset(kb + (size_t)nk * D, 0, sizeof(float) * (ATT_KB - nk) * D);
                    kp = kb;
                    ldk = D;
                }
                gemm_pad(1, T - t0, ATT_KB, D, scale, q + (size_t)t0 * nh * D + (size_t)h * D,
                         nh * D, kp, ldk, 0.0f, S + (size_t)t0 * ldS + j0, (int)ldS, pa, pc);
            }
            for (int t = 0; t < T; t++) {
                float *s = S + (size_t)t * ldS;
                int last = P + t, end = (last / ATT_KB + 1) * ATT_KB;
                float inv = exp_prefix(s, last);
                for (int j = 0; j <= last; j++) s[j] *= inv;
                for (int j = last + 1; j < end; j++) s[j] = 0.0f;
            }
            for (int b = 0; b < nb; b++) {
                int j0 = b * ATT_KB, nk = N - j0 < ATT_KB ? N - j0 : ATT_KB;
                int t0 = j0 - P > 0 ? j0 - P : 0;
                const float *vp = v + ((size_t)j0 * nkv + kh) * D;
                int ldv = nkv * D;
                if (nk < ATT_KB) {
                    for (int c = 0; c < nk; c++)
                        memcpy(vb + (size_t)c * D, vp + (size_t)c * ldv, sizeof(float) * D);
                    memset(vb + (size_t)nk * D, 0, sizeof(float) * (ATT_KB - nk) * D);
                    vp = vb;
                    ldv = D;
                }
                gemm_pad(0, T - t0, D, ATT_KB, 1.0f, S + (size_t)t0 * ldS + j0, (int)ldS, vp, ldv,
                         1.0f, oh + (size_t)t0 * nh * D, nh * D, pa, pc);
            }
        }
        cpu_free(S);
        cpu_free(kb);
        cpu_free(vb);
        free(pa);
        free(pc);
    }
}

/* ---- attention backward ------------------------------------------------------
 *
 * With P = softmax(scale·q·kᵀ) (causal) and out = P·v, per head:
 *   dP = dout·vᵀ;  dS = P ⊙ (dP − rowsum(dout ⊙ out));
 *   dq += scale·dS·k;  dk += scale·dSᵀ·q;  dv += Pᵀ·dout.
 *
 * Reference: one (head, query) at a time, plain loops, P recomputed as
 * ref_attention does; KV heads spread over the threads, each running its
 * query heads and queries in order (so dk, dv sum in a fixed order). */
static void ref_attention_row_backward(float *dq, float *dk, float *dv, const float *dout,
                                       const float *q, const float *k, const float *v,
                                       const float *out, float *s, float scale, int i, int h,
                                       int kh, int nh, int nkv, int D) {
    const float *qi = q + ((size_t)i * nh + h) * D, *gi = dout + ((size_t)i * nh + h) * D;
    const float *oi = out + ((size_t)i * nh + h) * D;
    ref_scores(s, qi, k, scale, i, kh, nkv, D);
    float inv = exp_prefix(s, i), rowdot = 0.0f;
    for (int c = 0; c < D; c++) rowdot += gi[c] * oi[c];
    float *dqi = dq + ((size_t)i * nh + h) * D;
    for (int j = 0; j <= i; j++) {
        float p = s[j] * inv, dp = 0.0f;
        const float *kj = k + ((size_t)j * nkv + kh) * D, *vj = v + ((size_t)j * nkv + kh) * D;
        for (int c = 0; c < D; c++) dp += gi[c] * vj[c];
        float ds = p * (dp - rowdot);
        float *dkj = dk + ((size_t)j * nkv + kh) * D, *dvj = dv + ((size_t)j * nkv + kh) * D;
        for (int c = 0; c < D; c++) {
            dqi[c] += scale * ds * kj[c];
            dkj[c] += scale * ds * qi[c];
            dvj[c] += p * gi[c];
        }
    }
}

static void ref_attention_backward(float *dq, float *dk, float *dv, const float *dout,
                                   const float *q, const float *k, const float *v, const float *out,
                                   float scale, int T, int nh, int nkv, int D) {
    int rep = nh / nkv;
#pragma omp parallel
    {
        float *s = malloc(sizeof(float) * (size_t)(T > 0 ? T : 1));
#pragma omp for schedule(dynamic, 1)
        for (int kh = 0; kh < nkv; kh++)
            for (int h = kh * rep; h < (kh + 1) * rep; h++)
                for (int i = 0; i < T; i++)
                    ref_attention_row_backward(dq, dk, dv, dout, q, k, v, out, s, scale, i, h, kh,
                                               nh, nkv, D);
        free(s);
    }
}

/* Optimised: one task per query head (tasks spread over the threads), its
 * queries in blocks of ATTB_QB rows, ascending.  A block of queries t0..t1-1
 * sees keys 0..t1-1 (nk of them); for it
 *   S  = scale·q_b·kᵀ   [qb, nk]   softmax recomputed row by row (causal)
 *   dP = dout_b·vᵀ      [qb, nk]   then dS = P ⊙ (dP − rowsum(dout ⊙ out))
 *   dq_b += scale·dS·k;  dk_h += scale·dSᵀ·q_b;  dv_h += Pᵀ·dout_b
 * five sgemms, no buffer beyond [qb, T].  With one query head per KV head,
 * dk_h and dv_h are dk and dv themselves; otherwise each query head sums
 * into its own [T, D] buffers, added to dk, dv afterwards in head order, so
 * the bits never depend on which thread ran which head. */
#define ATTB_QB 64

typedef struct {
    const float *q, *k, *v, *dout, *out;
    float *dq;
    float scale;
    int T, nh, nkv, D;
} attb_args;

/* S[qb, nk] (ld nk) ← P (causal softmax rows of queries t0..), dP ← dS */
static void attb_softmax_grad(float *S, float *dP, const attb_args *a, int h, int t0, int qb,
                              int nk) {
    for (int i = 0; i < qb; i++) {
        float *s = S + (size_t)i * nk, *dp = dP + (size_t)i * nk;
        int last = t0 + i;
        float inv = exp_prefix(s, last);
        size_t row = ((size_t)last * a->nh + h) * a->D;
        double rd = 0.0;
        for (int c = 0; c < a->D; c++) rd += (double)a->dout[row + c] * a->out[row + c];
        float rowdot = (float)rd;
        for (int j = 0; j <= last; j++) {
            s[j] *= inv;
            dp[j] = s[j] * (dp[j] - rowdot);
        }
        for (int j = last + 1; j < nk; j++) s[j] = dp[j] = 0.0f;
    }
}

static void attb_head(const attb_args *a, int h, float *dkh, float *dvh, int ldkv, float *S,
                      float *dP) {
    int D = a->D, kh = h / (a->nh / a->nkv);
    int ldq = a->nh * D, ldk = a->nkv * D;
    const float *kp = a->k + (size_t)kh * D, *vp = a->v + (size_t)kh * D;
    for (int t0 = 0; t0 < a->T; t0 += ATTB_QB) {
        int qb = a->T - t0 < ATTB_QB ? a->T - t0 : ATTB_QB, nk = t0 + qb;
        const float *qb_ = a->q + (size_t)t0 * ldq + (size_t)h * D;
        const float *gb = a->dout + (size_t)t0 * ldq + (size_t)h * D;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, qb, nk, D, a->scale, qb_, ldq, kp, ldk,
                    0.0f, S, nk);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, qb, nk, D, 1.0f, gb, ldq, vp, ldk,
                    0.0f, dP, nk);
        attb_softmax_grad(S, dP, a, h, t0, qb, nk);
        if (a->dq)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, qb, D, nk, a->scale, dP, nk, kp,
                        ldk, 1.0f, a->dq + (size_t)t0 * ldq + (size_t)h * D, ldq);
        if (dkh)
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, nk, D, qb, a->scale, dP, nk, qb_,
                        ldq, 1.0f, dkh, ldkv);
        if (dvh)
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, nk, D, qb, 1.0f, S, nk, gb, ldq,
                        1.0f, dvh, ldkv);
    }
}

/* dst[t, kh, :] += Σ_{h of kh, ascending} part[h][t, :] */
static void attb_reduce(float *dst, const float *part, int T, int nh, int nkv, int D) {
    if (!dst) return;
    int rep = nh / nkv;
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++)
        for (int h = 0; h < nh; h++) {
            float *d = dst + ((size_t)t * nkv + h / rep) * D;
            const float *p = part + ((size_t)h * T + t) * D;
            for (int c = 0; c < D; c++) d[c] += p[c];
        }
}

static void cpu_attention_backward(float *dq, float *dk, float *dv, const float *dout,
                                   const float *q, const float *k, const float *v, const float *out,
                                   float scale, int T, int nh, int nkv, int D) {
    if (T <= 0 || nh <= 0 || D <= 0) return;
    blas_single();
    attb_args a = {q, k, v, dout, out, dq, scale, T, nh, nkv, D};
    int shared = nh == nkv; /* one query head per KV head: write dk, dv in place */
    size_t part = (size_t)nh * T * D;
    float *dks = NULL, *dvs = NULL;
    if (!shared) {
        if (dk) dks = moe_calloc(part, sizeof(float));
        if (dv) dvs = moe_calloc(part, sizeof(float));
    }
#pragma omp parallel if (nh > 1 && (double)T * T * D * nh > 1e6)
    {
        size_t sb = (size_t)(T < ATTB_QB ? T : ATTB_QB) * T;
        float *S = cpu_alloc(sizeof(float) * sb), *dP = cpu_alloc(sizeof(float) * sb);
#pragma omp for schedule(dynamic, 1)
        for (int h = 0; h < nh; h++) {
            float *dkh, *dvh;
            if (shared) {
                dkh = dk ? dk + (size_t)h * D : NULL;
                dvh = dv ? dv + (size_t)h * D : NULL;
            } else {
                dkh = dks ? dks + (size_t)h * T * D : NULL;
                dvh = dvs ? dvs + (size_t)h * T * D : NULL;
            }
            attb_head(&a, h, dkh, dvh, shared ? nkv * D : D, S, dP);
        }
        cpu_free(S);
        cpu_free(dP);
    }
    if (!shared) {
        attb_reduce(dk, dks, T, nh, nkv, D);
        attb_reduce(dv, dvs, T, nh, nkv, D);
        free(dks);
        free(dvs);
    }
}
