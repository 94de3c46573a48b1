/* gpu_kernels.c - every CUDA op against the CPU op (the oracle) on random
 * inputs of odd sizes, with per-op relative-error thresholds; determinism;
 * the sticky device error.  Exits 77 ("SKIP: no CUDA device") where no GPU
 * is visible or the build has no CUDA.  Run by `make test-gpu`. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend_cuda.h"
#include "common.h"
#include "device.h"
#include "kernels.h"
#include "gpu_util.h"

/* ---- GEMM ---------------------------------------------------------------------- */

static void one_matmul(int T, int K, int N, int with_bias, int accumulate) {
    float *x = rnd((size_t)T * K, 1.0f), *w = rnd((size_t)N * K, 0.1f);
    float *wr = bf16_round(w, (size_t)N * K), *xr = bf16_round(x, (size_t)T * K);
    float *bias = with_bias ? rnd(N, 0.5f) : NULL;
    float *y0 = rnd((size_t)T * N, 1.0f);
    float *want = moe_malloc(sizeof(float) * T * N), *want_r = moe_malloc(sizeof(float) * T * N);
    memcpy(want, y0, sizeof(float) * T * N);
    memcpy(want_r, y0, sizeof(float) * T * N);
    C->matmul(want, x, wr, bias, T, K, N, accumulate);    /* f32 activations */
    C->matmul(want_r, xr, wr, bias, T, K, N, accumulate); /* bf16-rounded activations */

    float *dx = dev(x, sizeof(float) * T * K), *dxr = dev(xr, sizeof(float) * T * K);
    void *dw = dev_bf16(w, (size_t)N * K);
    float *db = bias ? dev(bias, sizeof(float) * N) : NULL;
    float *dy = dev(y0, sizeof(float) * T * N);
    char what[128];

    /* BF16 path on bf16-exact inputs: only the summation order differs */
    G->matmul(dy, dxr, dw, db, T, K, N, accumulate);
    float *got = host(dy, (size_t)T * N);
    snprintf(what, sizeof what, "matmul bf16 exact-input T=%d K=%d N=%d bias=%d acc=%d", T, K, N,
             with_bias, accumulate);
    check_close(what, got, want_r, (size_t)T * N, 2e-5);
    free(got);

    /* BF16 path on f32 inputs: x rounded to bf16 (relative 2^-9 per element) */
    G->upload(dy, y0, sizeof(float) * T * N);
    G->matmul(dy, dx, dw, db, T, K, N, accumulate);
    got = host(dy, (size_t)T * N);
    snprintf(what, sizeof what, "matmul bf16 T=%d K=%d N=%d bias=%d acc=%d", T, K, N, with_bias,
             accumulate);
    check_close(what, got, want, (size_t)T * N, 8e-3);
    free(got);

    /* F32 path: fp32 GEMM (no TF32) */
    moe_cuda_set_precision(MOE_CUDA_PREC_F32);
    G->upload(dy, y0, sizeof(float) * T * N);
    G->matmul(dy, dx, dw, db, T, K, N, accumulate);
    moe_cuda_set_precision(MOE_CUDA_PREC_BF16);
    got = host(dy, (size_t)T * N);
    snprintf(what, sizeof what, "matmul f32 T=%d K=%d N=%d bias=%d acc=%d", T, K, N, with_bias,
             accumulate);
    check_close(what, got, want, (size_t)T * N, 2e-5);
    free(got);
    assert_int_equal(moe_cuda_status(), 0);

    G->free(dx), G->free(dxr), G->free(dw), G->free(db), G->free(dy);
    free(x), free(w), free(wr), free(xr), free(bias), free(y0), free(want), free(want_r);
}

static void test_matmul(void **state) {
    (void)state;
    one_matmul(37, 203, 77, 1, 0);
    one_matmul(37, 203, 77, 0, 1);
    one_matmul(1, 64, 1, 1, 1);
    one_matmul(301, 1001, 513, 1, 0);
    one_matmul(5, 3, 2049, 0, 0);
}

static void test_matmul_grouped(void **state) {
    (void)state;
    enum { NG = 6, K = 129, N = 95 };
    int32_t off[NG + 1] = {0, 3, 3, 20, 21, 61, 61}; /* empty groups included */
    int rows = off[NG];
    float *x0 = rnd((size_t)rows * K, 1.0f), *x = bf16_round(x0, (size_t)rows * K);
    free(x0);
    float *w[NG], *wr[NG];
    void *dw[NG];
    for (int g = 0; g < NG; g++) {
        w[g] = rnd((size_t)N * K, 0.1f);
        wr[g] = bf16_round(w[g], (size_t)N * K);
        dw[g] = dev_bf16(w[g], (size_t)N * K);
    }
    for (int run = 0; run < 4; run++) {
        int acc = run & 1, grouped = run < 2; /* cublasGemmGroupedBatchedEx, then the loop */
        moe_cuda_set_grouped(grouped);
        float *y0 = rnd((size_t)rows * N, 1.0f);
        float *want = moe_malloc(sizeof(float) * rows * N);
        memcpy(want, y0, sizeof(float) * rows * N);
        for (int g = 0; g < NG; g++)
            if (off[g + 1] > off[g])
                C->matmul(want + (size_t)off[g] * N, x + (size_t)off[g] * K, wr[g], NULL,
                          off[g + 1] - off[g], K, N, acc);
        float *dx = dev(x, sizeof(float) * rows * K), *dy = dev(y0, sizeof(float) * rows * N);
        moe_cuda_matmul_grouped(dy, dx, (const void *const *)dw, off, NG, K, N, acc);
        float *got = host(dy, (size_t)rows * N);
        char what[64];
        snprintf(what, sizeof what, "matmul_grouped %s acc=%d", grouped ? "grouped" : "loop", acc);
        check_close(what, got, want, (size_t)rows * N, 2e-5);
        G->free(dx), G->free(dy);
        free(y0), free(want), free(got);
    }
    moe_cuda_set_grouped(1);
    for (int g = 0; g < NG; g++) G->free(dw[g]), free(w[g]), free(wr[g]);
    free(x);
    assert_int_equal(moe_cuda_status(), 0);
}

/* ---- norm, rope, attention ---------------------------------------------------------- */

static void test_rmsnorm(void **state) {
    (void)state;
    int T = 13, Cc = 333;
    float *x = rnd((size_t)T * Cc, 3.0f), *w = rnd(Cc, 1.0f), *want = moe_malloc(sizeof(float) * T * Cc);
    C->rmsnorm(want, x, w, 1e-6f, T, Cc);
    float *dx = dev(x, sizeof(float) * T * Cc), *dw = dev(w, sizeof(float) * Cc);
    float *dy = G->alloc(sizeof(float) * T * Cc);
    G->rmsnorm(dy, dx, dw, 1e-6f, T, Cc);
    float *got = host(dy, (size_t)T * Cc);
    check_close("rmsnorm", got, want, (size_t)T * Cc, 1e-6);
    free(got);
    G->rmsnorm(dx, dx, dw, 1e-6f, T, Cc); /* in place */
    got = host(dx, (size_t)T * Cc);
    check_close("rmsnorm in place", got, want, (size_t)T * Cc, 1e-6);
    free(got);
    /* per-head q/k norm shape: many short rows */
    int R = 7 * 5, D = 18;
    float *q = rnd((size_t)R * D, 1.0f), *qw = rnd(D, 1.0f), *qwant = moe_malloc(sizeof(float) * R * D);
    C->rmsnorm(qwant, q, qw, 1e-5f, R, D);
    float *dq = dev(q, sizeof(float) * R * D), *dqw = dev(qw, sizeof(float) * D);
    G->rmsnorm(dq, dq, dqw, 1e-5f, R, D);
    got = host(dq, (size_t)R * D);
    check_close("rmsnorm per head", got, qwant, (size_t)R * D, 1e-6);
    G->free(dx), G->free(dw), G->free(dy), G->free(dq), G->free(dqw);
    free(x), free(w), free(want), free(got), free(q), free(qw), free(qwant);
}

static void one_rope(int T, int nh, int D, int pos0, float theta) {
    size_t n = (size_t)T * nh * D;
    float *x = rnd(n, 2.0f), *want = moe_malloc(sizeof(float) * n);
    memcpy(want, x, sizeof(float) * n);
    C->rope(want, theta, pos0, T, nh, D);
    float *dx = dev(x, sizeof(float) * n);
    G->rope(dx, theta, pos0, T, nh, D);
    float *got = host(dx, n);
    char what[96];
    snprintf(what, sizeof what, "rope T=%d nh=%d D=%d pos0=%d", T, nh, D, pos0);
    check_close(what, got, want, n, 1e-6);
    G->free(dx);
    free(x), free(want), free(got);
}

static void test_rope(void **state) {
    (void)state;
    one_rope(11, 3, 38, 5, 10000.0f);
    one_rope(29, 4, 128, 3000, 1000000.0f);
    one_rope(1, 1, 2, 0, 10000.0f);
}

static void one_attention(int T, int nh, int nkv, int D) {
    size_t nq = (size_t)T * nh * D, nk = (size_t)T * nkv * D;
    float *q = rnd(nq, 1.0f), *k = rnd(nk, 1.0f), *v = rnd(nk, 1.0f);
    float *want = moe_malloc(sizeof(float) * nq);
    float scale = 1.0f / sqrtf((float)D) * 2.0f; /* sharper softmax than usual */
    moe_backend_cpu_ref()->attention(want, q, k, v, scale, T, nh, nkv, D);
    float *dq = dev(q, sizeof(float) * nq), *dk = dev(k, sizeof(float) * nk),
          *dv = dev(v, sizeof(float) * nk), *dout = G->alloc(sizeof(float) * nq);
    G->attention(dout, dq, dk, dv, scale, T, nh, nkv, D);
    float *got = host(dout, nq);
    char what[96];
    snprintf(what, sizeof what, "attention T=%d nh=%d nkv=%d D=%d", T, nh, nkv, D);
    check_close(what, got, want, nq, 1e-5);
    /* determinism: a second run gives the same bytes */
    G->attention(dout, dq, dk, dv, scale, T, nh, nkv, D);
    float *again = host(dout, nq);
    assert_memory_equal(got, again, sizeof(float) * nq);
    G->free(dq), G->free(dk), G->free(dv), G->free(dout);
    free(q), free(k), free(v), free(want), free(got), free(again);
}

static void test_attention(void **state) {
    (void)state;
    one_attention(45, 6, 2, 40);
    one_attention(1, 2, 1, 8);
    one_attention(70, 4, 4, 128);
    one_attention(33, 8, 1, 64);
    one_attention(131, 16, 4, 128);
    one_attention(17, 2, 2, 256);
    assert_int_equal(moe_cuda_status(), 0);
}

/* attention over a KV cache: T queries at positions P.. over P + T keys, against the
 * CPU reference, and against the device's own whole-sequence attention (rows P..) */
static void one_attention_kv(int P, int T, int nh, int nkv, int D) {
    int N = P + T;
    size_t nq = (size_t)T * nh * D, nqa = (size_t)N * nh * D, nk = (size_t)N * nkv * D;
    float *q = rnd(nqa, 1.0f), *k = rnd(nk, 1.0f), *v = rnd(nk, 1.0f);
    float *want = moe_malloc(sizeof(float) * nq);
    float scale = 1.0f / sqrtf((float)D) * 2.0f;
    const float *qn = q + (size_t)P * nh * D;
    moe_backend_cpu_ref()->attention_kv(want, qn, k, v, scale, P, T, nh, nkv, D);
    float *dq = dev(qn, sizeof(float) * nq), *dqa = dev(q, sizeof(float) * nqa),
          *dk = dev(k, sizeof(float) * nk), *dv = dev(v, sizeof(float) * nk),
          *dout = G->alloc(sizeof(float) * nq), *dall = G->alloc(sizeof(float) * nqa);
    G->attention_kv(dout, dq, dk, dv, scale, P, T, nh, nkv, D);
    float *got = host(dout, nq);
    char what[96];
    snprintf(what, sizeof what, "attention_kv P=%d T=%d nh=%d nkv=%d D=%d", P, T, nh, nkv, D);
    check_close(what, got, want, nq, 1e-5);
    G->attention(dall, dqa, dk, dv, scale, N, nh, nkv, D);
    float *all = host(dall, nqa);
    check_close(what, got, all + (size_t)P * nh * D, nq, 1e-5);
    G->free(dq), G->free(dqa), G->free(dk), G->free(dv), G->free(dout), G->free(dall);
    free(q), free(k), free(v), free(want), free(got), free(all);
}

static void test_attention_kv(void **state) {
    (void)state;
    one_attention_kv(40, 5, 6, 2, 40);
    one_attention_kv(0, 17, 2, 1, 8);
    one_attention_kv(33, 1, 4, 4, 128);
    one_attention_kv(100, 37, 8, 2, 64);
    assert_int_equal(moe_cuda_status(), 0);
}

/* ---- element-wise ----------------------------------------------------------------------- */

static void test_elementwise(void **state) {
    (void)state;
    int T = 9, I = 131;
    float *gu = rnd((size_t)T * 2 * I, 4.0f), *want = moe_malloc(sizeof(float) * T * I);
    C->swiglu(want, gu, T, I);
    float *dgu = dev(gu, sizeof(float) * T * 2 * I), *dh = G->alloc(sizeof(float) * T * I);
    G->swiglu(dh, dgu, T, I);
    float *got = host(dh, (size_t)T * I);
    check_close("swiglu", got, want, (size_t)T * I, 1e-6);
    free(got), free(want), free(gu), G->free(dgu), G->free(dh);

    size_t n = 100003;
    float *y = rnd(n, 1.0f), *x = rnd(n, 1.0f), *ywant = moe_malloc(sizeof(float) * n);
    memcpy(ywant, y, sizeof(float) * n);
    C->axpy(ywant, x, -0.37f, n);
    float *dy = dev(y, sizeof(float) * n), *dx = dev(x, sizeof(float) * n);
    G->axpy(dy, dx, -0.37f, n);
    got = host(dy, n);
    check_close("axpy", got, ywant, n, 1e-7); /* same rounding as the CPU: ~exact */
    free(got), free(y), free(x), free(ywant), G->free(dy), G->free(dx);

    int Tc = 7, Cc = 99;
    float *ya = rnd((size_t)Tc * Cc, 1.0f), *xa = rnd((size_t)Tc * Cc, 1.0f), *z = rnd(Tc, 5.0f);
    float *wa = moe_malloc(sizeof(float) * Tc * Cc);
    memcpy(wa, ya, sizeof(float) * Tc * Cc);
    C->sigmoid_gate_add(wa, xa, z, Tc, Cc);
    float *dya = dev(ya, sizeof(float) * Tc * Cc), *dxa = dev(xa, sizeof(float) * Tc * Cc),
          *dz = dev(z, sizeof(float) * Tc);
    G->sigmoid_gate_add(dya, dxa, dz, Tc, Cc);
    got = host(dya, (size_t)Tc * Cc);
    check_close("sigmoid_gate_add", got, wa, (size_t)Tc * Cc, 1e-6);
    free(got), free(ya), free(xa), free(z), free(wa), G->free(dya), G->free(dxa), G->free(dz);
}

/* ---- routing and dispatch --------------------------------------------------------------- */

static void one_router(int mode, int renorm, int T, int E, int K, int ties) {
    float *l = rnd((size_t)T * E, 3.0f);
    if (ties) /* few distinct values: the tie rule (lower id first) decides */
        for (size_t i = 0; i < (size_t)T * E; i++) l[i] = floorf(l[i]);
    int32_t *iw = moe_malloc(sizeof(int32_t) * T * K), *ig = moe_malloc(sizeof(int32_t) * T * K);
    float *ww = moe_malloc(sizeof(float) * T * K), *pw = moe_malloc(sizeof(float) * T * E);
    C->router(iw, ww, pw, l, mode, renorm, T, E, K);
    float *dl = dev(l, sizeof(float) * T * E);
    int32_t *di = G->alloc(sizeof(int32_t) * T * K);
    float *dwt = G->alloc(sizeof(float) * T * K), *dp = G->alloc(sizeof(float) * T * E);
    for (int with_probs = 0; with_probs <= 1; with_probs++) {
        G->router(di, dwt, with_probs ? dp : NULL, dl, mode, renorm, T, E, K);
        G->download(ig, di, sizeof(int32_t) * T * K);
        float *wg = host(dwt, (size_t)T * K);
        char what[96];
        snprintf(what, sizeof what, "router mode=%d renorm=%d ties=%d probs=%d", mode, renorm, ties,
                 with_probs);
        for (int i = 0; i < T * K; i++)
            if (ig[i] != iw[i]) {
                print_error("%s: token %d slot %d: expert %d, CPU %d\n", what, i / K, i % K, ig[i],
                            iw[i]);
                fail();
            }
        check_close(what, wg, ww, (size_t)T * K, 1e-6);
        free(wg);
        if (with_probs) {
            float *pg = host(dp, (size_t)T * E);
            check_close(what, pg, pw, (size_t)T * E, 1e-6);
            free(pg);
        }
    }
    G->free(dl), G->free(di), G->free(dwt), G->free(dp);
    free(l), free(iw), free(ig), free(ww), free(pw);
}

static void test_router(void **state) {
    (void)state;
    for (int ties = 0; ties <= 1; ties++) {
        for (int i = 0; i < N_ROUTER_CASES; i++)
            one_router(router_cases[i].mode, router_cases[i].renorm, router_cases[i].T,
                       router_cases[i].E, router_cases[i].K, ties);
    }
}

static void test_gather_scatter(void **state) {
    (void)state;
    int T = 33, Cc = 77, n = 50;
    float *src = rnd((size_t)T * Cc, 1.0f);
    int32_t rows[50];
    for (int i = 0; i < n; i++) rows[i] = (int32_t)((i * 7 + 3) % T); /* repeats allowed */
    float *want = moe_malloc(sizeof(float) * n * Cc);
    C->gather_rows(want, src, rows, n, Cc);
    float *dsrc = dev(src, sizeof(float) * T * Cc), *dd = G->alloc(sizeof(float) * n * Cc);
    int32_t *drows = dev(rows, sizeof rows);
    G->gather_rows(dd, dsrc, drows, n, Cc);
    float *got = host(dd, (size_t)n * Cc);
    assert_memory_equal(got, want, sizeof(float) * n * Cc);
    free(got), free(want), G->free(dd), G->free(drows);

    /* scatter: distinct rows (a permutation of some tokens) */
    int m = 21;
    int32_t srows[21];
    for (int i = 0; i < m; i++) srows[i] = (int32_t)((i * 5 + 2) % T); /* gcd(5, 33) = 1 */
    for (int i = 0; i < m; i++)
        for (int j = 0; j < i; j++) assert_true(srows[i] != srows[j]);
    float *s = rnd((size_t)m * Cc, 1.0f), *sc = rnd(m, 1.0f);
    for (int with_scale = 0; with_scale <= 1; with_scale++) {
        float *dst = moe_malloc(sizeof(float) * T * Cc);
        memcpy(dst, src, sizeof(float) * T * Cc);
        C->scatter_add_rows(dst, s, srows, with_scale ? sc : NULL, m, Cc);
        float *ddst = dev(src, sizeof(float) * T * Cc), *ds = dev(s, sizeof(float) * m * Cc),
              *dsc = dev(sc, sizeof(float) * m);
        int32_t *dsr = dev(srows, sizeof srows);
        G->scatter_add_rows(ddst, ds, dsr, with_scale ? dsc : NULL, m, Cc);
        got = host(ddst, (size_t)T * Cc);
        check_close(with_scale ? "scatter_add_rows scaled" : "scatter_add_rows", got, dst,
                    (size_t)T * Cc, 1e-7);
        free(got), free(dst), G->free(ddst), G->free(ds), G->free(dsc), G->free(dsr);
    }
    free(src), free(s), free(sc), G->free(dsrc);
}

/* ---- grouped experts and combine ---------------------------------------------------------- */

/* Routed experts against the CPU op: E experts of which some are skipped
 * (NULL weights: their out rows must stay untouched) and some receive no
 * token; odd H, Im.  BF16 path on bf16-exact inputs (the GPU also rounds
 * SwiGLU's output to bf16 before the down GEMM), FP32 path, the loop of
 * cublasGemmEx instead of the grouped call, and determinism. */
static void one_experts(int T, int E, int K, int H, int Im, int skip_mod) {
    float *x0 = rnd((size_t)T * H, 1.0f), *x = bf16_round(x0, (size_t)T * H);
    free(x0);
    /* routing: K distinct experts per token, never expert E-1 (an empty one) */
    int32_t *idx = moe_malloc(sizeof(int32_t) * T * K);
    float *wt = rnd((size_t)T * K, 1.0f);
    for (int t = 0; t < T; t++)
        for (int k = 0; k < K; k++) {
            int e = (t * 7 + k * 5 + (t * k) % 3) % (E - 1);
            for (int j = 0; j < k; j++)
                if (idx[t * K + j] == e) e = (e + 1) % (E - 1), j = -1; /* rescan */
            idx[t * K + k] = e;
        }
    moe_dispatch d;
    moe_dispatch_build(&d, idx, wt, T, E, K);
    int n = d.off[E];
    assert_int_equal(n, T * K);
    assert_int_equal(d.off[E] - d.off[E - 1], 0);
    /* weights: CPU f32 (bf16-exact values), GPU bf16 */
    const void **cg = moe_calloc(E, sizeof(void *)), **cd = moe_calloc(E, sizeof(void *));
    const void **gg = moe_calloc(E, sizeof(void *)), **gd = moe_calloc(E, sizeof(void *));
    float **wg = moe_calloc(E, sizeof(float *)), **wd = moe_calloc(E, sizeof(float *));
    int skipped_rows = 0;
    for (int e = 0; e < E; e++) {
        float *a = rnd((size_t)2 * Im * H, 0.1f), *b = rnd((size_t)H * Im, 0.1f);
        wg[e] = bf16_round(a, (size_t)2 * Im * H);
        wd[e] = bf16_round(b, (size_t)H * Im);
        free(a), free(b);
        if (skip_mod && e % skip_mod == 1) { /* skipped: NULL for both sides */
            skipped_rows += d.off[e + 1] - d.off[e];
            continue;
        }
        cg[e] = wg[e], cd[e] = wd[e];
        gg[e] = dev_bf16(wg[e], (size_t)2 * Im * H);
        gd[e] = dev_bf16(wd[e], (size_t)H * Im);
    }
    if (skip_mod) assert_true(skipped_rows > 0); /* the test covers skipping */
    const float sentinel = 12345.0f;
    float *want = moe_malloc(sizeof(float) * n * H), *init = moe_malloc(sizeof(float) * n * H);
    for (size_t i = 0; i < (size_t)n * H; i++) init[i] = sentinel;
    memcpy(want, init, sizeof(float) * n * H);
    C->experts(want, x, d.tokens, d.off, cg, cd, E, H, Im);

    float *dx = dev(x, sizeof(float) * T * H), *dout = dev(init, sizeof(float) * n * H);
    int32_t *drows = dev(d.tokens, sizeof(int32_t) * n);
    float *first = NULL;
    for (int run = 0; run < 4; run++) { /* bf16 grouped, bf16 again, bf16 loop, f32 */
        moe_cuda_set_grouped(run != 2);
        if (run == 3) moe_cuda_set_precision(MOE_CUDA_PREC_F32);
        G->upload(dout, init, sizeof(float) * n * H);
        G->experts(dout, dx, drows, d.off, gg, gd, E, H, Im);
        moe_cuda_set_precision(MOE_CUDA_PREC_BF16);
        moe_cuda_set_grouped(1);
        float *got = host(dout, (size_t)n * H);
        assert_int_equal(moe_cuda_status(), 0);
        /* skipped experts' rows are untouched; the others are compared */
        float *gw = moe_malloc(sizeof(float) * n * H), *ww = moe_malloc(sizeof(float) * n * H);
        size_t m = 0;
        for (int e = 0; e < E; e++)
            for (int i = d.off[e]; i < d.off[e + 1]; i++) {
                const float *gr = got + (size_t)i * H, *wr = want + (size_t)i * H;
                if (!cg[e]) {
                    for (int c = 0; c < H; c++)
                        if (gr[c] != sentinel) {
                            print_error("experts: row %d of skipped expert %d was written\n", i, e);
                            fail();
                        }
                    continue;
                }
                memcpy(gw + m, gr, sizeof(float) * H);
                memcpy(ww + m, wr, sizeof(float) * H);
                m += H;
            }
        char what[128];
        snprintf(what, sizeof what, "experts %s T=%d E=%d K=%d H=%d Im=%d skip=%d",
                 run == 3 ? "f32" : run == 2 ? "bf16 loop" : "bf16 grouped", T, E, K, H, Im,
                 skip_mod);
        check_close(what, gw, ww, m, run == 3 ? 5e-5 : 8e-3);
        if (run == 0) first = got;
        else {
            if (run == 1) /* determinism: the same call gives the same bytes */
                assert_memory_equal(got, first, sizeof(float) * n * H);
            free(got);
        }
        free(gw), free(ww);
    }
    /* combine of these expert outputs, CPU vs GPU (same roundings: ~exact) */
    float *y = moe_malloc(sizeof(float) * T * H);
    float *dy = G->alloc(sizeof(float) * T * H), *dsw = dev(d.slot_wt, sizeof(float) * T * K);
    int32_t *dslot = dev(d.slot, sizeof(int32_t) * T * K);
    float *df = dev(first, sizeof(float) * n * H);
    C->combine(y, first, d.slot, d.slot_wt, T, K, H);
    G->combine(dy, df, dslot, dsw, T, K, H);
    float *gy = host(dy, (size_t)T * H);
    check_close("combine", gy, y, (size_t)T * H, 1e-7);
    free(gy), free(y), free(first);
    G->free(dy), G->free(dsw), G->free(dslot), G->free(df);
    for (int e = 0; e < E; e++) {
        G->free((void *)gg[e]), G->free((void *)gd[e]);
        free(wg[e]), free(wd[e]);
    }
    G->free(dx), G->free(dout), G->free(drows);
    free(cg), free(cd), free(gg), free(gd), free(wg), free(wd);
    free(want), free(init), free(x), free(idx), free(wt);
    moe_dispatch_free(&d);
}

static void test_experts(void **state) {
    (void)state;
    one_experts(37, 9, 3, 131, 77, 3);  /* experts 1, 4, 7 skipped; 8 empty */
    one_experts(53, 6, 2, 64, 100, 0);  /* all run */
    one_experts(5, 17, 4, 95, 33, 2);   /* most experts see one token or none */
    one_experts(1, 3, 1, 7, 5, 0);      /* one token */
    assert_int_equal(moe_cuda_status(), 0);
}

static void test_combine(void **state) {
    (void)state;
    int T = 41, K = 5, H = 203, n = 97;
    float *out = rnd((size_t)n * H, 2.0f), *wt = rnd((size_t)T * K, 1.0f);
    int32_t *slot = moe_malloc(sizeof(int32_t) * T * K);
    for (int i = 0; i < T * K; i++) slot[i] = (int32_t)((i * 31 + 7) % n); /* any rows, repeats too */
    float *want = moe_malloc(sizeof(float) * T * H);
    C->combine(want, out, slot, wt, T, K, H);
    float *dout = dev(out, sizeof(float) * n * H), *dwt = dev(wt, sizeof(float) * T * K);
    int32_t *dslot = dev(slot, sizeof(int32_t) * T * K);
    float *dy = dev(out, sizeof(float) * T * H); /* garbage in y: overwritten, not added to */
    G->combine(dy, dout, dslot, dwt, T, K, H);
    float *got = host(dy, (size_t)T * H);
    check_close("combine", got, want, (size_t)T * H, 1e-7);
    free(got), free(out), free(wt), free(slot), free(want);
    G->free(dout), G->free(dwt), G->free(dslot), G->free(dy);
}

/* ---- reductions ------------------------------------------------------------------------------ */

static void test_softmax_rows(void **state) {
    (void)state;
    int T = 17, Cc = 1001;
    float *x = rnd((size_t)T * Cc, 8.0f), *want = moe_malloc(sizeof(float) * T * Cc);
    C->softmax_rows(want, x, T, Cc);
    float *dx = dev(x, sizeof(float) * T * Cc), *dp = G->alloc(sizeof(float) * T * Cc);
    G->softmax_rows(dp, dx, T, Cc);
    float *got = host(dp, (size_t)T * Cc);
    check_close("softmax_rows", got, want, (size_t)T * Cc, 1e-6);
    free(got), free(x), free(want), G->free(dx), G->free(dp);
}

static void one_divergence(int T, int Cc, float noise) {
    float *a = rnd((size_t)T * Cc, 4.0f), *b = rnd((size_t)T * Cc, 4.0f);
    if (noise > 0) /* b close to a: small divergences, the hard case */
        for (size_t i = 0; i < (size_t)T * Cc; i++) b[i] = a[i] + noise * b[i];
    float *da = dev(a, sizeof(float) * T * Cc), *db = dev(b, sizeof(float) * T * Cc);
    double *dd = G->alloc(sizeof(double) * T);
    double *want = moe_malloc(sizeof(double) * T), *got = moe_malloc(sizeof(double) * T);
    const char *names[] = {"js", "kl", "mse", "cosine"};
    for (int metric = MOE_DIV_JS; metric <= MOE_DIV_COSINE; metric++) {
        C->divergence(want, a, b, metric, T, Cc);
        G->divergence(dd, da, db, metric, T, Cc);
        G->download(got, dd, sizeof(double) * T);
        char what[96];
        snprintf(what, sizeof what, "divergence %s C=%d noise=%g", names[metric], Cc, noise);
        /* probabilities are fp32 (expf may differ by an ulp between libm and CUDA) */
        check_close_d(what, got, want, (size_t)T, noise > 0 && metric <= MOE_DIV_KL ? 2e-3 : 1e-5);
    }
    /* a host output array is tolerated (lib/search.c passes one) */
    double *hd = moe_malloc(sizeof(double) * T);
    C->divergence(want, a, b, MOE_DIV_JS, T, Cc);
    G->divergence(hd, da, db, MOE_DIV_JS, T, Cc);
    check_close_d("divergence js into host memory", hd, want, (size_t)T, noise > 0 ? 2e-3 : 1e-5);
    free(hd);
    G->free(da), G->free(db), G->free(dd);
    free(a), free(b), free(want), free(got);
}

static void test_divergence(void **state) {
    (void)state;
    one_divergence(19, 515, 0.0f);
    one_divergence(5, 2048, 0.01f);
    one_divergence(3, 7, 0.0f);
}

/* ---- selection, errors (last: the error is sticky) ---------------------------------------------- */

static void test_select(void **state) {
    (void)state;
    assert_ptr_equal(moe_backend_select("cuda"), G);
    unsetenv("MOE_DEVICE");
    assert_ptr_equal(moe_backend_select(NULL), G); /* default with a GPU */
    assert_ptr_equal(moe_backend_select("cpu"), moe_backend_cpu());
    moe_error_clear();
    assert_null(moe_backend_select("tpu"));
    assert_int_equal(moe_error_kind(), MOE_ERR_DATA);
    assert_int_equal(moe_backend_status(G), 0);
}

static void test_sticky_error(void **state) {
    (void)state;
    float h[4] = {1, 2, 3, 4};
    float *d4 = dev(h, sizeof h);
    moe_error_clear();
    /* a head_dim no device can hold in shared memory: refused before any launch,
     * so the CUDA context stays healthy for whatever runs after this test */
    G->attention(d4, d4, d4, d4, 1.0f, 1, 1, 1, 1 << 20);
    G->sync();
    assert_int_equal(moe_backend_status(G), -1);
    assert_int_equal(moe_error_kind(), MOE_ERR_DEVICE);
    print_message("sticky error: %s\n", moe_error());
    assert_non_null(strstr(moe_error(), "head_dim"));
    moe_error_clear();
    G->axpy(d4, d4, 1.0f, 4); /* a no-op now */
    assert_int_equal(moe_cuda_status(), -1); /* and the error comes back */
    assert_non_null(strstr(moe_error(), "head_dim"));
    float *d = G->alloc(16); /* dummy after the error */
    G->download(h, d, sizeof h);
    for (int i = 0; i < 4; i++) assert_true(h[i] == 0.0f);
    G->free(d);
}

int main(void) {
    int rc = gpu_test_init();
    if (rc) return rc;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_matmul),       cmocka_unit_test(test_matmul_grouped),
        cmocka_unit_test(test_rmsnorm),      cmocka_unit_test(test_rope),
        cmocka_unit_test(test_attention),    cmocka_unit_test(test_attention_kv),
        cmocka_unit_test(test_elementwise),
        cmocka_unit_test(test_router),       cmocka_unit_test(test_gather_scatter),
        cmocka_unit_test(test_experts),      cmocka_unit_test(test_combine),
        cmocka_unit_test(test_softmax_rows), cmocka_unit_test(test_divergence),
        cmocka_unit_test(test_select),       cmocka_unit_test(test_sticky_error),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
