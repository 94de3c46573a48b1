/* forward_bench.c - timing driver for bench/forward.sh (not installed).
 *
 *   forward_bench forward MODEL IDS.i32 NSEQ T   prefill of NSEQ sequences of T
 *                                               tokens (raw int32 ids), layer-major,
 *                                               phases timed; prints key=value lines
 *   forward_bench gemm                          OpenBLAS sgemm peak vs our matmul op
 *                                               at the forward's shapes
 */
#include <cblas.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common.h"
#include "kernels.h"
#include "model.h"
#if defined(__x86_64__)
#include <immintrin.h>
#endif

/* multiply-adds x 2 of one prefill of nseq sequences of T tokens (all layers
 * MoE, as the bench model): the weight GEMMs, attention's two products over
 * the causal triangle, lm_head */
static double forward_flops(const moe_config *c, int nseq, int T) {
    double tok = (double)nseq * T, H = c->hidden_size, D = c->head_dim;
    double proj = H * D * (2.0 * c->num_heads + 2.0 * c->num_kv_heads);
    double att = 2.0 * c->num_heads * D * ((double)T * (T + 1) / 2) * nseq;
    double mlp = H * c->n_routed_experts + 3.0 * H * c->moe_intermediate_size * c->top_k +
                 3.0 * H * c->shared_intermediate_size + H;
    return 2.0 * (tok * (proj + mlp) * c->num_layers + att * c->num_layers + tok * H * c->vocab_size);
}

/* seconds of each part of one prefill */
typedef struct {
    double total, load, attention, mlp, lm_head, router, shared, logit0;
} fwd_times;

/* one prefill, layer-major; with `split`, each MoE layer's router and
 * shared expert are also run (and timed) on their own, so that the experts'
 * share is the MLP's time less those two */
static int forward_once(moe_model *m, const int32_t *ids, int nseq, int T, float *x, float *xn,
                        float *y, float *lg, int split, fwd_times *ft) {
    const moe_config *c = moe_model_config(m);
    int L = c->num_layers, H = c->hidden_size, tot = nseq * T;
    int32_t *idx = malloc(sizeof(int32_t) * (size_t)tot * (c->top_k + 1));
    float *wt = malloc(sizeof(float) * (size_t)tot * (c->top_k + 1));
    memset(ft, 0, sizeof *ft);
    double t, t_start = moe_now();
    for (int s = 0; s < nseq; s++) moe_model_embed(m, x + (size_t)s * T * H, ids + (size_t)s * T, T);
    for (int l = 0; l < L; l++) {
        t = moe_now();
        if (moe_layer_load(m, l) < 0) return -1;
        ft->load += moe_now() - t;
        t = moe_now();
        for (int s = 0; s < nseq; s++) moe_layer_attention(m, l, x + (size_t)s * T * H, T);
        ft->attention += moe_now() - t;
        moe_layer_mlp_input(m, l, xn, x, tot);
        if (split && c->n_routed_experts > 0) {
            t = moe_now();
            moe_layer_route(m, l, xn, tot, idx, wt, NULL);
            ft->router += moe_now() - t;
            t = moe_now();
            moe_layer_shared(m, l, y, xn, tot);
            ft->shared += moe_now() - t;
        }
        t = moe_now();
        moe_layer_mlp_run(m, l, y, xn, tot, NULL, NULL);
        for (size_t i = 0; i < (size_t)tot * H; i++) x[i] += y[i];
        ft->mlp += moe_now() - t;
        moe_layer_unload(m, l);
    }
    t = moe_now();
    moe_model_final_norm(m, x, x, tot);
    moe_model_lm_head(m, lg, x, tot); /* all sequences: lm_head converted once */
    ft->lm_head = moe_now() - t;
    ft->total = moe_now() - t_start;
    ft->logit0 = lg[0];
    free(idx);
    free(wt);
    return 0;
}

static int forward(const char *dir, const char *idsf, int nseq, int T) {
    moe_model_set_threads(0);
    double t0 = moe_now();
    moe_model_opts mo = {0};
    moe_model_opts_from_env(&mo); /* MOE_CPU_WEIGHTS=f32, MOE_PRECISION=bf16 (bench/forward.sh) */
    moe_model *m = moe_model_open(dir, &mo);
    double t_open = moe_now() - t0;
    if (!m) {
        fprintf(stderr, "forward_bench: %s\n", moe_error());
        return 1;
    }
    const moe_config *c = moe_model_config(m);
    int H = c->hidden_size, V = c->vocab_size;
    size_t tot = (size_t)nseq * T;
    int32_t *ids = malloc(sizeof(int32_t) * tot);
    FILE *f = fopen(idsf, "rb");
    if (!f || fread(ids, sizeof(int32_t), tot, f) != tot) {
        fprintf(stderr, "forward_bench: cannot read %zu ids from %s\n", tot, idsf);
        return 1;
    }
    fclose(f);
    float *x = moe_model_alloc(m, tot * H), *xn = moe_model_alloc(m, tot * H);
    float *y = moe_model_alloc(m, tot * H), *lg = moe_model_alloc(m, tot * V);
    /* best of 3 full forwards (each loads every layer's weights again): the
     * machine may be shared; then one more with the router and the shared
     * expert timed apart, for the shares */
    fwd_times best = {0}, ft, sp;
    for (int rep = 0; rep < 3; rep++) {
        if (forward_once(m, ids, nseq, T, x, xn, y, lg, 0, &ft) < 0) {
            fprintf(stderr, "forward_bench: %s\n", moe_error());
            return 1;
        }
        if (rep == 0 || ft.total < best.total) best = ft;
    }
    if (forward_once(m, ids, nseq, T, x, xn, y, lg, 1, &sp) < 0) return 1;
    double sum = sp.load + sp.attention + sp.mlp + sp.lm_head;
    double experts = sp.mlp - sp.router - sp.shared;
    printf("backend=%s\nopen_s=%.3f\ntotal_s=%.3f\nload_s=%.3f\nattention_s=%.3f\nmlp_s=%.3f\n"
           "lm_head_s=%.3f\ntokens=%zu\ntok_per_s=%.1f\nlogit0=%.6g\ngflop=%.2f\n"
           "compute_gflops=%.1f\n",
           moe_model_backend(m)->name, t_open, best.total, best.load, best.attention, best.mlp,
           best.lm_head, tot, tot / best.total, best.logit0, forward_flops(c, nseq, T) / 1e9,
           forward_flops(c, nseq, T) / 1e9 / (best.total - best.load));
    printf("share=attention %.0f%%, experts %.0f%%, shared %.0f%%, router %.0f%%, lm_head %.0f%%, "
           "weight load %.0f%%\n",
           100 * sp.attention / sum, 100 * experts / sum, 100 * sp.shared / sum,
           100 * sp.router / sum, 100 * sp.lm_head / sum, 100 * sp.load / sum);
    moe_model_close(m);
    free(ids);
    return 0;
}

static double gflops(int M, int N, int K, double secs, int reps) {
    return 2.0 * M * N * K * reps / secs / 1e9;
}

/* best GFLOP/s of 7 timed windows of >= 20 ms each */
static double time_gemm(int ours, const moe_backend *be, float *a, const void *b, float *c, int T, int K,
                        int N) {
    double best = 0;
    for (int r = 0; r < 7; r++) {
        if (ours)
            moe_kernels_set_threads(0);
        else
            openblas_set_num_threads(omp_get_num_procs());
        int reps = 0;
        double t = moe_now();
        do {
            if (ours)
                be->matmul(c, a, b, NULL, T, K, N, 0);
            else
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, N, K, 1, a, K, b, K, 0, c, N);
            reps++;
        } while (moe_now() - t < 0.02);
        double g = gflops(T, N, K, moe_now() - t, reps);
        if (g > best) best = g;
    }
    return best;
}

/* ---- instruction peaks: independent multiply-adds on registers only ---- */

#define PEAK_ITERS 20000000L
#if defined(__x86_64__)
#define TWELVE(OP) \
    a0 = OP(a0), a1 = OP(a1), a2 = OP(a2), a3 = OP(a3), a4 = OP(a4), a5 = OP(a5), a6 = OP(a6), \
    a7 = OP(a7), a8 = OP(a8), a9 = OP(a9), a10 = OP(a10), a11 = OP(a11)
#define SUM12 \
    _mm512_reduce_add_ps(_mm512_add_ps( \
        _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)), \
                      _mm512_add_ps(_mm512_add_ps(a4, a5), _mm512_add_ps(a6, a7))), \
        _mm512_add_ps(_mm512_add_ps(a8, a9), _mm512_add_ps(a10, a11))))
/* FLOPs done by one thread: 12 chains of 512-bit FMAs (32 FLOP each) */
__attribute__((target("avx512f,fma"))) static double peak_f32_thread(float *sink) {
    __m512 x = _mm512_set1_ps(1.0f), y = _mm512_set1_ps(1e-9f);
    __m512 a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11;
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = a8 = a9 = a10 = a11 = _mm512_setzero_ps();
#define FMA(a) _mm512_fmadd_ps(x, y, a)
    for (long k = 0; k < PEAK_ITERS; k++) TWELVE(FMA);
    *sink += SUM12;
    return PEAK_ITERS * 12 * 32.0;
}
/* 12 chains of VDPBF16PS (16 lanes x 2 products: 64 FLOP each) */
__attribute__((target("avx512f,avx512bf16"))) static double peak_bf16_thread(float *sink) {
    __m512bh x = (__m512bh)_mm512_set1_epi32(0x3f803f80), y = (__m512bh)_mm512_set1_epi32(0x00010001);
    __m512 a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11;
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = a8 = a9 = a10 = a11 = _mm512_setzero_ps();
#define DP(a) _mm512_dpbf16_ps(a, x, y)
    for (long k = 0; k < PEAK_ITERS; k++) TWELVE(DP);
    *sink += SUM12;
    return PEAK_ITERS * 12 * 64.0;
}
#endif

/* best of 3 of GFLOP/s on all cores; 0 when the CPU lacks the instructions */
static double peak(int bf16) {
#if defined(__x86_64__)
    if (bf16 ? !moe_cpu_bf16_native() : !__builtin_cpu_supports("avx512f")) return 0;
    double best = 0;
    for (int r = 0; r < 3; r++) {
        double flop = 0, t = moe_now();
        float sink = 0;
#pragma omp parallel reduction(+ : flop, sink)
        flop += bf16 ? peak_bf16_thread(&sink) : peak_f32_thread(&sink);
        double g = flop / (moe_now() - t) / 1e9 + 0 * sink;
        if (g > best) best = g;
    }
    return best;
#else
    (void)bf16;
    return 0;
#endif
}

static int gemm(void) {
    const moe_backend *be = moe_backend_cpu(), *bf = moe_backend_cpu_bf16_compute();
    int n = 2048;
    float *a = calloc((size_t)n * n, 4), *b = calloc((size_t)n * n, 4), *cc = calloc((size_t)n * n, 4);
    uint16_t *bb = calloc((size_t)n * n, 2);
    for (size_t i = 0; i < (size_t)n * n; i++) {
        a[i] = b[i] = (float)(i % 7) * 0.1f;
        bb[i] = moe_f32_to_bf16(b[i]);
    }
    /* our op (OpenMP tiles of single-threaded sgemm) vs a plain threaded
     * cblas_sgemm at the forward's shapes (T tokens x in -> out), and our
     * BF16 op.  All of ours first, then OpenBLAS's: each runtime's idle
     * threads spin for a while after use and would slow the other down. */
    struct { const char *name; int T, K, N; double ours, bf16, blas; } s[] = {
        {"attn_proj_1024x1024x1024", 1024, 1024, 1024, 0, 0, 0},
        {"shared_gate_up_1024x1024x2816", 1024, 1024, 2816, 0, 0, 0},
        {"expert_gate_up_96x1024x1408", 96, 1024, 1408, 0, 0, 0},
        {"expert_down_96x704x1024", 96, 704, 1024, 0, 0, 0},
        {"router_1024x1024x64", 1024, 1024, 64, 0, 0, 0},
    };
    size_t ns = sizeof s / sizeof *s;
    double pk32 = peak(0), pk16 = peak(1);
    double bf_big = time_gemm(1, bf, a, bb, cc, n, n, n);
    for (size_t i = 0; i < ns; i++) {
        s[i].ours = time_gemm(1, be, a, b, cc, s[i].T, s[i].K, s[i].N);
        s[i].bf16 = time_gemm(1, bf, a, bb, cc, s[i].T, s[i].K, s[i].N);
    }
    struct timespec ts = {0, 500000000};
    nanosleep(&ts, NULL);
    double blas_big = time_gemm(0, be, a, b, cc, n, n, n);
    for (size_t i = 0; i < ns; i++) s[i].blas = time_gemm(0, be, a, b, cc, s[i].T, s[i].K, s[i].N);
    printf("peak_f32_gflops=%.1f (512-bit FMAs on registers, %d threads)\n", pk32, omp_get_max_threads());
    printf("peak_bf16_gflops=%.1f (VDPBF16PS on registers; 0: no AVX512-BF16)\n", pk16);
    printf("openblas_peak_gflops=%.1f (2048^3 sgemm, OpenBLAS's own %d threads; %.0f%% of the f32 peak)\n",
           blas_big, omp_get_num_procs(), pk32 > 0 ? 100 * blas_big / pk32 : 0);
    printf("bf16_gemm_2048_gflops=%.1f (our BF16 op, 2048^3; %.0f%% of the bf16 peak)\n", bf_big,
           pk16 > 0 ? 100 * bf_big / pk16 : 0);
    for (size_t i = 0; i < ns; i++)
        printf("gemm_%s: ours f32 %.1f, openblas %.1f (ours/openblas %.2f), ours bf16 %.1f GFLOP/s "
               "(bf16/f32 %.2f)\n",
               s[i].name, s[i].ours, s[i].blas, s[i].ours / s[i].blas, s[i].bf16, s[i].bf16 / s[i].ours);
    free(a), free(b), free(cc), free(bb);
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 2 && !strcmp(argv[1], "gemm")) return gemm();
    if (argc == 6 && !strcmp(argv[1], "forward"))
        return forward(argv[2], argv[3], atoi(argv[4]), atoi(argv[5]));
    fprintf(stderr, "usage: forward_bench forward MODEL IDS NSEQ T | gemm\n");
    return 2;
}
