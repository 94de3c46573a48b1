/* backward_bench.c - timings of the CPU backward ops that carry the training
 * FLOPs (bench/backward.sh sets them beside PyTorch autograd's):
 *
 *   backward_bench matmul T K N      matmul_backward (dx and dw) vs the same two
 *                                    products as threaded OpenBLAS sgemms
 *   backward_bench attention T NH NKV D   attention_backward
 *
 * Each prints key=value lines: the best of 7 windows of >= 50 ms, in ms.
 * Threads: $BENCH_THREADS (default: all cores).  BENCH_CLOCK=cpu times the
 * process's CPU time instead of the wall clock (with BENCH_THREADS=1: the
 * figure least disturbed by other processes on a busy machine). */
#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common.h"
#include "kernels.h"

static float *rand_vec(size_t n, unsigned seed) {
    float *v = moe_malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) {
        seed = seed * 1664525u + 1013904223u;
        v[i] = (float)(seed >> 8) / 16777216.0f - 0.5f;
    }
    return v;
}

static int bench_threads(void) {
    const char *e = getenv("BENCH_THREADS");
    int n = e ? atoi(e) : 0;
    return n > 0 ? n : omp_get_num_procs();
}

/* seconds: the wall clock, or the process's CPU time (BENCH_CLOCK=cpu) */
static double bench_now(void) {
    const char *e = getenv("BENCH_CLOCK");
    if (!e || strcmp(e, "cpu") != 0) return moe_now();
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

typedef void (*bench_fn)(void *ctx);

/* best milliseconds per call over 7 windows of >= 50 ms */
static double best_ms(bench_fn f, void *ctx) {
    f(ctx); /* warm-up: page faults, scratch buffers */
    double best = 1e30;
    for (int r = 0; r < 7; r++) {
        int reps = 0;
        double t = bench_now();
        do {
            f(ctx);
            reps++;
        } while (bench_now() - t < 0.05);
        double ms = (bench_now() - t) * 1e3 / reps;
        if (ms < best) best = ms;
    }
    return best;
}

typedef struct {
    const moe_backend *be;
    int T, K, N;
    float *x, *w, *dy, *dx, *dw;
} mm_ctx;

static void mm_ours(void *p) {
    mm_ctx *c = p;
    c->be->matmul_backward(c->dx, c->dw, NULL, c->dy, c->x, c->w, c->T, c->K, c->N);
}
static void mm_blas(void *p) { /* dx += dy·W, dw += dyᵀ·x, OpenBLAS's own threads */
    mm_ctx *c = p;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, c->T, c->K, c->N, 1, c->dy, c->N, c->w,
                c->K, 1, c->dx, c->K);
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, c->N, c->K, c->T, 1, c->dy, c->N, c->x, c->K,
                1, c->dw, c->K);
}

static int bench_matmul(int T, int K, int N) {
    mm_ctx c = {moe_backend_cpu(), T, K, N, rand_vec((size_t)T * K, 1), rand_vec((size_t)N * K, 2),
                rand_vec((size_t)T * N, 3), rand_vec((size_t)T * K, 4), rand_vec((size_t)N * K, 5)};
    moe_kernels_set_threads(bench_threads());
    double ours = best_ms(mm_ours, &c);
    openblas_set_num_threads(bench_threads());
    double blas = best_ms(mm_blas, &c);
    moe_kernels_set_threads(bench_threads()); /* back to single-threaded OpenBLAS inside ours */
    double gf = 4.0 * T * K * N / 1e6;
    printf("matmul_T%d_K%d_N%d_ours_ms=%.2f\nmatmul_T%d_K%d_N%d_openblas_ms=%.2f\n"
           "matmul_T%d_K%d_N%d_ours_gflops=%.1f\n",
           T, K, N, ours, T, K, N, blas, T, K, N, gf / ours);
    free(c.x), free(c.w), free(c.dy), free(c.dx), free(c.dw);
    return 0;
}

typedef struct {
    const moe_backend *be;
    int T, nh, nkv, D;
    float *q, *k, *v, *out, *dout, *dq, *dk, *dv;
} att_ctx;

static void att_ours(void *p) {
    att_ctx *c = p;
    c->be->attention_backward(c->dq, c->dk, c->dv, c->dout, c->q, c->k, c->v, c->out,
                              1.0f / sqrtf((float)c->D), c->T, c->nh, c->nkv, c->D);
}

static int bench_attention(int T, int nh, int nkv, int D) {
    size_t nq = (size_t)T * nh * D, nk = (size_t)T * nkv * D;
    att_ctx c = {moe_backend_cpu(), T, nh, nkv, D, rand_vec(nq, 1), rand_vec(nk, 2), rand_vec(nk, 3),
                 moe_malloc(nq * sizeof(float)), rand_vec(nq, 4), rand_vec(nq, 5), rand_vec(nk, 6),
                 rand_vec(nk, 7)};
    moe_kernels_set_threads(bench_threads());
    c.be->attention(c.out, c.q, c.k, c.v, 1.0f / sqrtf((float)D), T, nh, nkv, D);
    double ours = best_ms(att_ours, &c);
    /* per head 5 products of T x T x D (S recomputed, dP, dq, dk, dv), causal: half each */
    double gf = 5.0 * T * (double)T * D * nh / 1e6;
    printf("attention_T%d_H%d_KV%d_D%d_ours_ms=%.2f\nattention_T%d_H%d_KV%d_D%d_ours_gflops=%.1f\n",
           T, nh, nkv, D, ours, T, nh, nkv, D, gf / ours);
    free(c.q), free(c.k), free(c.v), free(c.out), free(c.dout), free(c.dq), free(c.dk), free(c.dv);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 5 && !strcmp(argv[1], "matmul"))
        return bench_matmul(atoi(argv[2]), atoi(argv[3]), atoi(argv[4]));
    if (argc == 6 && !strcmp(argv[1], "attention"))
        return bench_attention(atoi(argv[2]), atoi(argv[3]), atoi(argv[4]), atoi(argv[5]));
    fprintf(stderr, "usage: backward_bench matmul T K N | attention T NH NKV D\n");
    return 2;
}
