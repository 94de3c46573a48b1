/* gpu_moe_layer.c - one MoE layer's forward on the CUDA backend, at the
 * shape of DeepSeekMoE-16B by default (hidden 2048, 64 routed experts of
 * width 1408, top-6, 2 shared experts), on random BF16 weights, for T
 * tokens (default 25600), against the cuBLAS BF16 GEMM rate measured in the
 * same run (8192³ on random data).
 *
 * Three variants of the routed part:
 *   grouped: one gather of all T·K routed rows (sorted by expert), one
 *            grouped GEMM for gate+up, one SwiGLU, one grouped GEMM for down,
 *            then one scatter-add per expert (ascending id: deterministic);
 *   loop:    what lib/model/forward.c does through kernels.h today: per expert
 *            gather, GEMM, SwiGLU, GEMM, scatter-add;
 *   experts: what lib/model/forward.c does now: the backend's `experts` op (gather
 *            to BF16, grouped gate/up GEMM, SwiGLU to BF16, grouped down
 *            GEMM) and its `combine` op (weighted sum per token, k order).
 * Both include the router GEMM, routing, the host-side dispatch and the
 * shared experts.  Their outputs must agree (relative error printed).
 *
 * Prints one JSON object on stdout; exits 77 ("SKIP: ...") without a GPU.
 * Built by the Makefile as build/bench/gpu_moe_layer; run by bench/gpu-check.sh. */
#include <getopt.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend_cuda.h"
#include "common.h"
#include "device.h"
#include "kernels.h"

static const moe_backend *B;
static int T = 25600, H = 2048, I = 1408, E = 64, K = 6, S = 2, ITERS = 5;

typedef struct {
    void *router;          /* [E, H] */
    void **gu, **down;     /* [E] x [2I, H], [H, I] */
    void *s_gu, *s_down;   /* [2·S·I, H], [H, S·I] */
} weights;

typedef struct {
    float *lg, *xe, *gu, *h, *o, *sgu, *sh, *twt;
    int32_t *idx, *tok, *slot;
    float *swt;
    float *wt;
    int32_t *idx_h;
    float *wt_h;
} bufs;

static double ms_since(double t0) { return (moe_now() - t0) * 1e3; }

/* router + host dispatch: fills d (host) and tok/twt (device) */
static void route(const weights *w, bufs *b, const float *xn, moe_dispatch *d) {
    B->matmul(b->lg, xn, w->router, NULL, T, H, E, 0);
    B->router(b->idx, b->wt, NULL, b->lg, MOE_ROUTE_SOFTMAX_TOPK, MOE_RENORM_NONE, T, E, K);
    B->download(b->idx_h, b->idx, sizeof(int32_t) * (size_t)T * K);
    B->download(b->wt_h, b->wt, sizeof(float) * (size_t)T * K);
    moe_dispatch_build(d, b->idx_h, b->wt_h, T, E, K);
    B->upload(b->tok, d->tokens, sizeof(int32_t) * (size_t)T * K);
    B->upload(b->twt, d->weights, sizeof(float) * (size_t)T * K);
}

static void shared(const weights *w, bufs *b, float *y, const float *xn) {
    int SI = S * I;
    if (S <= 0) return;
    B->matmul(b->sgu, xn, w->s_gu, NULL, T, H, 2 * SI, 0);
    B->swiglu(b->sh, b->sgu, T, SI);
    B->matmul(y, b->sh, w->s_down, NULL, T, SI, H, 1);
}

static void layer_grouped(const weights *w, bufs *b, float *y, const float *xn) {
    moe_dispatch d;
    route(w, b, xn, &d);
    int nk = T * K;
    B->gather_rows(b->xe, xn, b->tok, nk, H);
    moe_cuda_matmul_grouped(b->gu, b->xe, (const void *const *)w->gu, d.off, E, H, 2 * I, 0);
    B->swiglu(b->h, b->gu, nk, I);
    moe_cuda_matmul_grouped(b->o, b->h, (const void *const *)w->down, d.off, E, I, H, 0);
    B->zero(y, sizeof(float) * (size_t)T * H);
    for (int e = 0; e < E; e++) {
        int n = d.off[e + 1] - d.off[e];
        if (n)
            B->scatter_add_rows(y, b->o + (size_t)d.off[e] * H, b->tok + d.off[e], b->twt + d.off[e],
                                n, H);
    }
    shared(w, b, y, xn);
    B->sync();
    moe_dispatch_free(&d);
}

static void layer_experts(const weights *w, bufs *b, float *y, const float *xn) {
    moe_dispatch d;
    route(w, b, xn, &d);
    B->upload(b->slot, d.slot, sizeof(int32_t) * (size_t)T * K);
    B->upload(b->swt, d.slot_wt, sizeof(float) * (size_t)T * K);
    B->experts(b->o, xn, b->tok, d.off, (const void *const *)w->gu, (const void *const *)w->down,
               E, H, I);
    B->combine(y, b->o, b->slot, b->swt, T, K, H);
    shared(w, b, y, xn);
    B->sync();
    moe_dispatch_free(&d);
}

static void layer_loop(const weights *w, bufs *b, float *y, const float *xn) {
    moe_dispatch d;
    route(w, b, xn, &d);
    B->zero(y, sizeof(float) * (size_t)T * H);
    for (int e = 0; e < E; e++) {
        int n = d.off[e + 1] - d.off[e];
        if (!n) continue;
        B->gather_rows(b->xe, xn, b->tok + d.off[e], n, H);
        B->matmul(b->gu, b->xe, w->gu[e], NULL, n, H, 2 * I, 0);
        B->swiglu(b->h, b->gu, n, I);
        B->matmul(b->o, b->h, w->down[e], NULL, n, I, H, 0);
        B->scatter_add_rows(y, b->o, b->tok + d.off[e], b->twt + d.off[e], n, H);
    }
    shared(w, b, y, xn);
    B->sync();
    moe_dispatch_free(&d);
}

static void *wbf16(size_t n, uint64_t seed, float scale) {
    void *p = B->alloc(n * 2);
    moe_cuda_fill_random(p, MOE_DT_BF16, n, seed, scale);
    return p;
}

int main(int argc, char **argv) {
    static const struct option lo[] = {
        {"tokens", required_argument, 0, 't'}, {"hidden", required_argument, 0, 'H'},
        {"moe-inter", required_argument, 0, 'I'}, {"experts", required_argument, 0, 'E'},
        {"top-k", required_argument, 0, 'k'}, {"shared", required_argument, 0, 's'},
        {"iters", required_argument, 0, 'n'}, {0, 0, 0, 0}};
    int c;
    while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (c) {
        case 't': T = atoi(optarg); break;
        case 'H': H = atoi(optarg); break;
        case 'I': I = atoi(optarg); break;
        case 'E': E = atoi(optarg); break;
        case 'k': K = atoi(optarg); break;
        case 's': S = atoi(optarg); break;
        case 'n': ITERS = atoi(optarg); break;
        default:
            fprintf(stderr, "usage: gpu_moe_layer [--tokens T] [--hidden H] [--moe-inter I] "
                            "[--experts E] [--top-k K] [--shared S] [--iters N]\n");
            return 2;
        }
    }
    if (T <= 0 || H <= 0 || I <= 0 || E <= 0 || K <= 0 || K > E || S < 0 || ITERS <= 0) {
        fprintf(stderr, "gpu_moe_layer: bad sizes\n");
        return 2;
    }
    char why[256] = "";
    if (moe_device_cuda_count(why, sizeof why) <= 0) {
        printf("SKIP: no CUDA device (%s)\n", why[0] ? why : "none visible");
        return 77;
    }
    B = moe_backend_cuda();
    if (!B) {
        fprintf(stderr, "gpu_moe_layer: %s\n", moe_error());
        return 4;
    }
    fprintf(stderr, "gpu_moe_layer: %s; T=%d H=%d I=%d E=%d K=%d S=%d\n", moe_cuda_device_name(), T,
            H, I, E, K, S);

    /* peak first, on an otherwise empty device */
    double peak = moe_cuda_gemm_tflops(8192, 8192, 8192, 0, 10);
    double peak32 = moe_cuda_gemm_tflops(8192, 8192, 8192, 1, 10);
    /* a GEMM of the routed experts' shape, for reference: [T·K/E, H] x [H, 2I] */
    double shape_tf = moe_cuda_gemm_tflops(T * K / E > 0 ? T * K / E : 1, 2 * I, H, 1, 20);
    moe_cuda_mem_reset_peak();

    weights w;
    w.router = wbf16((size_t)E * H, 1, 0.02f);
    w.gu = malloc(sizeof(void *) * E);
    w.down = malloc(sizeof(void *) * E);
    for (int e = 0; e < E; e++) {
        w.gu[e] = wbf16((size_t)2 * I * H, 100 + e, 0.02f);
        w.down[e] = wbf16((size_t)H * I, 1000 + e, 0.02f);
    }
    w.s_gu = S ? wbf16((size_t)2 * S * I * H, 7, 0.02f) : NULL;
    w.s_down = S ? wbf16((size_t)H * S * I, 8, 0.02f) : NULL;

    size_t nk = (size_t)T * K;
    bufs b;
    b.lg = B->alloc(sizeof(float) * (size_t)T * E);
    b.xe = B->alloc(sizeof(float) * nk * H);
    b.gu = B->alloc(sizeof(float) * nk * 2 * I);
    b.h = B->alloc(sizeof(float) * nk * I);
    b.o = B->alloc(sizeof(float) * nk * H);
    b.sgu = B->alloc(sizeof(float) * (size_t)T * 2 * (S ? S : 1) * I);
    b.sh = B->alloc(sizeof(float) * (size_t)T * (S ? S : 1) * I);
    b.twt = B->alloc(sizeof(float) * nk);
    b.idx = B->alloc(sizeof(int32_t) * nk);
    b.tok = B->alloc(sizeof(int32_t) * nk);
    b.wt = B->alloc(sizeof(float) * nk);
    b.slot = B->alloc(sizeof(int32_t) * nk);
    b.swt = B->alloc(sizeof(float) * nk);
    b.idx_h = malloc(sizeof(int32_t) * nk);
    b.wt_h = malloc(sizeof(float) * nk);
    float *xn = B->alloc(sizeof(float) * (size_t)T * H);
    float *y1 = B->alloc(sizeof(float) * (size_t)T * H), *y2 = B->alloc(sizeof(float) * (size_t)T * H);
    float *y3 = B->alloc(sizeof(float) * (size_t)T * H);
    moe_cuda_fill_random(xn, MOE_DT_F32, (size_t)T * H, 42, 1.0f);

    /* warm-up, then timed runs */
    layer_grouped(&w, &b, y1, xn);
    double t0 = moe_now();
    for (int i = 0; i < ITERS; i++) layer_grouped(&w, &b, y1, xn);
    double ms_g = ms_since(t0) / ITERS;
    layer_loop(&w, &b, y2, xn);
    t0 = moe_now();
    for (int i = 0; i < ITERS; i++) layer_loop(&w, &b, y2, xn);
    double ms_l = ms_since(t0) / ITERS;
    layer_experts(&w, &b, y3, xn);
    t0 = moe_now();
    for (int i = 0; i < ITERS; i++) layer_experts(&w, &b, y3, xn);
    double ms_x = ms_since(t0) / ITERS;
    if (moe_cuda_status() < 0) {
        fprintf(stderr, "gpu_moe_layer: %s\n", moe_error());
        return 4;
    }

    /* the two variants agree */
    size_t ny = (size_t)T * H;
    float *h1 = malloc(sizeof(float) * ny), *h2 = malloc(sizeof(float) * ny);
    float *h3 = malloc(sizeof(float) * ny);
    B->download(h1, y1, sizeof(float) * ny);
    B->download(h2, y2, sizeof(float) * ny);
    B->download(h3, y3, sizeof(float) * ny);
    double num = 0, den = 0, num3 = 0;
    int finite = 1;
    for (size_t i = 0; i < ny; i++) {
        double d = (double)h1[i] - h2[i], d3 = (double)h3[i] - h2[i];
        num += d * d;
        num3 += d3 * d3;
        den += (double)h2[i] * h2[i];
        if (!isfinite(h1[i]) || !isfinite(h3[i])) finite = 0;
    }
    double rel = den > 0 ? sqrt(num / den) : sqrt(num);
    /* experts rounds SwiGLU's output to BF16 (as cu_matmul would): ~1e-3 */
    double rel3 = den > 0 ? sqrt(num3 / den) : sqrt(num3);

    double flops = 2.0 * T * H * E + 6.0 * nk * H * I + 6.0 * T * H * (double)S * I;
    moe_cuda_mem m;
    moe_cuda_mem_stats(&m);
    double tf_g = flops / (ms_g * 1e-3) / 1e12, tf_l = flops / (ms_l * 1e-3) / 1e12;
    double tf_x = flops / (ms_x * 1e-3) / 1e12;
    printf("{\"device\":\"%s\",\"tokens\":%d,\"hidden\":%d,\"moe_inter\":%d,\"experts\":%d,"
           "\"top_k\":%d,\"shared\":%d,\"gflop\":%.1f,"
           "\"ms_grouped\":%.3f,\"tflops_grouped\":%.1f,\"ms_loop\":%.3f,\"tflops_loop\":%.1f,"
           "\"peak_bf16_tflops\":%.1f,\"peak_bf16_f32out_tflops\":%.1f,"
           "\"expert_shape_gemm_tflops\":%.1f,\"frac_of_peak_grouped\":%.3f,"
           "\"rel_diff_grouped_vs_loop\":%.3g,\"finite\":%s,"
           "\"ms_experts_op\":%.3f,\"tflops_experts_op\":%.1f,\"rel_diff_experts_op_vs_loop\":%.3g,"
           "\"backend_peak_bytes\":%zu,\"device_used_peak_bytes\":%zu}\n",
           moe_cuda_device_name(), T, H, I, E, K, S, flops / 1e9, ms_g, tf_g, ms_l, tf_l, peak,
           peak32, shape_tf, peak > 0 ? tf_g / peak : 0.0, rel, finite ? "true" : "false", ms_x, tf_x, rel3, m.peak,
           m.used_peak);
    fprintf(stderr,
            "gpu_moe_layer: grouped %.2f ms (%.0f TFLOP/s, %.0f%% of the %.0f TFLOP/s BF16 peak), "
            "per-expert loop %.2f ms (%.0f TFLOP/s), experts+combine ops %.2f ms (%.0f TFLOP/s); "
            "outputs differ from the loop's by %.2g, %.2g (relative)\n",
            ms_g, tf_g, peak > 0 ? 100 * tf_g / peak : 0.0, peak, ms_l, tf_l, ms_x, tf_x, rel, rel3);
    return finite && rel < 1e-3 && rel3 < 1e-2 ? 0 : 1;
}
