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

static int forward(const char *dir, const char *idsf, int nseq, int T) {
    moe_model_set_threads(0);
    double t0 = moe_now();
    moe_model_opts mo = {0};
    moe_model_opts_from_env(&mo); /* MOE_CPU_WEIGHTS=f32 (bench/forward.sh) */
    moe_model *m = moe_model_open(dir, &mo);
    double t_open = moe_now() - t0;
    if (!m) {
        fprintf(stderr, "forward_bench: %s\n", moe_error());
        return 1;
    }
    const moe_config *c = moe_model_config(m);
    int L = c->num_layers, H = c->hidden_size, V = c->vocab_size;
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
    /* best of 3 full forwards (each converts every layer's weights again):
     * the machine may be shared */
    double best[6] = {0};
    for (int rep = 0; rep < 3; rep++) {
        double t_load = 0, t_att = 0, t_mlp = 0, t_head = 0, t;
        double t_start = moe_now();
        for (int s = 0; s < nseq; s++)
            moe_model_embed(m, x + (size_t)s * T * H, ids + (size_t)s * T, T);
        for (int l = 0; l < L; l++) {
            t = moe_now();
            if (moe_layer_load(m, l) < 0) {
                fprintf(stderr, "forward_bench: %s\n", moe_error());
                return 1;
            }
            t_load += moe_now() - t;
            t = moe_now();
            for (int s = 0; s < nseq; s++) moe_layer_attention(m, l, x + (size_t)s * T * H, T);
            t_att += moe_now() - t;
            t = moe_now();
            moe_layer_mlp_input(m, l, xn, x, (int)tot);
            moe_layer_mlp_run(m, l, y, xn, (int)tot, NULL, NULL);
            for (size_t i = 0; i < tot * H; i++) x[i] += y[i];
            t_mlp += moe_now() - t;
            moe_layer_unload(m, l);
        }
        t = moe_now();
        moe_model_final_norm(m, x, x, (int)tot);
        moe_model_lm_head(m, lg, x, (int)tot); /* all sequences: lm_head converted once */
        t_head = moe_now() - t;
        double total = moe_now() - t_start;
        if (rep == 0 || total < best[0]) {
            double b[6] = {total, t_load, t_att, t_mlp, t_head, lg[0]};
            memcpy(best, b, sizeof b);
        }
    }
    printf("open_s=%.3f\ntotal_s=%.3f\nload_s=%.3f\nattention_s=%.3f\nmlp_s=%.3f\nlm_head_s=%.3f\n"
           "tokens=%zu\ntok_per_s=%.1f\nlogit0=%.6g\n",
           t_open, best[0], best[1], best[2], best[3], best[4], tot, tot / best[0], best[5]);
    moe_model_close(m);
    free(ids);
    return 0;
}

static double gflops(int M, int N, int K, double secs, int reps) {
    return 2.0 * M * N * K * reps / secs / 1e9;
}

/* best GFLOP/s of 7 timed windows of >= 20 ms each */
static double time_gemm(int ours, const moe_backend *be, float *a, float *b, float *c, int T, int K,
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

static int gemm(void) {
    const moe_backend *be = moe_backend_cpu();
    int n = 2048;
    float *a = calloc((size_t)n * n, 4), *b = calloc((size_t)n * n, 4), *cc = calloc((size_t)n * n, 4);
    for (size_t i = 0; i < (size_t)n * n; i++) a[i] = b[i] = (float)(i % 7) * 0.1f;
    /* our op (OpenMP tiles of single-threaded sgemm) vs a plain threaded
     * cblas_sgemm at the forward's shapes (T tokens x in -> out).  All of
     * ours first, then OpenBLAS's: each runtime's idle threads spin for a
     * while after use and would slow the other down. */
    struct { const char *name; int T, K, N; double ours, blas; } s[] = {
        {"attn_proj_1024x1024x1024", 1024, 1024, 1024, 0, 0},
        {"shared_gate_up_1024x1024x2816", 1024, 1024, 2816, 0, 0},
        {"expert_gate_up_96x1024x1408", 96, 1024, 1408, 0, 0},
        {"expert_down_96x704x1024", 96, 704, 1024, 0, 0},
        {"router_1024x1024x64", 1024, 1024, 64, 0, 0},
    };
    size_t ns = sizeof s / sizeof *s;
    for (size_t i = 0; i < ns; i++) s[i].ours = time_gemm(1, be, a, b, cc, s[i].T, s[i].K, s[i].N);
    struct timespec ts = {0, 500000000};
    nanosleep(&ts, NULL);
    double peak = time_gemm(0, be, a, b, cc, n, n, n);
    for (size_t i = 0; i < ns; i++) s[i].blas = time_gemm(0, be, a, b, cc, s[i].T, s[i].K, s[i].N);
    printf("openblas_peak_gflops=%.1f (2048^3 sgemm, OpenBLAS's own %d threads)\n", peak,
           omp_get_num_procs());
    for (size_t i = 0; i < ns; i++)
        printf("gemm_%s: ours %.1f GFLOP/s, openblas %.1f GFLOP/s (ours/openblas %.2f, %.0f%% of peak)\n",
               s[i].name, s[i].ours, s[i].blas, s[i].ours / s[i].blas, 100 * s[i].ours / peak);
    free(a), free(b), free(cc);
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 2 && !strcmp(argv[1], "gemm")) return gemm();
    if (argc == 6 && !strcmp(argv[1], "forward"))
        return forward(argv[2], argv[3], atoi(argv[4]), atoi(argv[5]));
    fprintf(stderr, "usage: forward_bench forward MODEL IDS NSEQ T | gemm\n");
    return 2;
}
