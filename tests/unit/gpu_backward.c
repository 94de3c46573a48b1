/* gpu_backward.c - every backward op of kernels.h (training) on the CUDA
 * backend against the CPU op (the oracle), on random inputs of odd sizes:
 * per-op relative tolerances (BF16 weights on both sides; the GPU's BF16
 * rounding of activations and gradients in the GEMMs gets the forward's
 * 8e-3, everything else fp32 rounding), accumulation (+=) into non-zero
 * gradients, NULL gradients skipped, determinism.  Exits 77 ("SKIP: no
 * CUDA device") where no GPU is visible; `make test` runs it on the CUDA
 * emulator. */
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

/* a device copy of a host array of n floats */
static float *devf(const float *h, size_t n) { return dev(h, sizeof(float) * (n ? n : 1)); }
static float *copyf(const float *h, size_t n) {
    float *p = moe_malloc(sizeof(float) * (n ? n : 1));
    memcpy(p, h, sizeof(float) * n);
    return p;
}
/* download device array d of n floats and compare it with want */
static void check_dev(const char *what, const float *d, const float *want, size_t n, double tol) {
    float *got = host(d, n);
    check_close(what, got, want, n, tol);
    free(got);
}
/* the device array still holds exactly h (a NULL gradient's neighbour left alone) */
static void check_untouched(const char *what, const float *d, const float *h, size_t n) {
    float *got = host(d, n);
    if (memcmp(got, h, sizeof(float) * n)) {
        print_error("%s: changed, but the op was told not to touch it\n", what);
        fail();
    }
    free(got);
}

/* ---- matmul ------------------------------------------------------------------------------- */

/* dx += dy·W, dW += dyᵀ·x, dbias += Σ dy against the CPU with the same
 * (BF16-rounded) weight.  exact: dy and x BF16-exact, so the BF16 path
 * rounds nothing and only the summation order differs. */
static void one_matmul_backward(int T, int K, int N, int exact, int f32) {
    size_t nx = (size_t)T * K, nw = (size_t)N * K, ny = (size_t)T * N;
    float *x = rnd(nx, 1.0f), *dy = rnd(ny, 1.0f), *w0 = rnd(nw, 0.1f), *w = bf16_round(w0, nw);
    if (exact) {
        float *a = bf16_round(x, nx), *b = bf16_round(dy, ny);
        free(x), free(dy);
        x = a, dy = b;
    }
    float *dx0 = rnd(nx, 0.5f), *dw0 = rnd(nw, 0.5f), *db0 = rnd(N, 0.5f);
    float *dx = copyf(dx0, nx), *dw = copyf(dw0, nw), *db = copyf(db0, N);
    C->matmul_backward(dx, dw, db, dy, x, w, T, K, N);

    float *gx = devf(x, nx), *gdy = devf(dy, ny), *gdx = devf(dx0, nx), *gdw = devf(dw0, nw),
          *gdb = devf(db0, N);
    void *gw = dev_bf16(w, nw);
    if (f32) moe_cuda_set_precision(MOE_CUDA_PREC_F32);
    G->matmul_backward(gdx, gdw, gdb, gdy, gx, gw, T, K, N);
    moe_cuda_set_precision(MOE_CUDA_PREC_BF16);
    char what[128];
    double tol = exact || f32 ? 2e-5 : 8e-3;
    const char *path = f32 ? "f32" : exact ? "bf16 exact-input" : "bf16";
    snprintf(what, sizeof what, "matmul_backward %s dx T=%d K=%d N=%d", path, T, K, N);
    check_dev(what, gdx, dx, nx, tol);
    snprintf(what, sizeof what, "matmul_backward %s dw T=%d K=%d N=%d", path, T, K, N);
    check_dev(what, gdw, dw, nw, tol);
    snprintf(what, sizeof what, "matmul_backward %s dbias T=%d K=%d N=%d", path, T, K, N);
    check_dev(what, gdb, db, N, 1e-5); /* sums of the same dy (f32 or double) */
    assert_int_equal(moe_cuda_status(), 0);

    /* only dbias asked for: dx and dw untouched; then determinism of dw */
    G->upload(gdx, dx0, sizeof(float) * nx);
    G->upload(gdw, dw0, sizeof(float) * nw);
    G->matmul_backward(NULL, NULL, gdb, gdy, gx, gw, T, K, N);
    check_untouched("matmul_backward dx (NULL dx)", gdx, dx0, nx);
    check_untouched("matmul_backward dw (NULL dw)", gdw, dw0, nw);
    G->matmul_backward(NULL, gdw, NULL, gdy, gx, gw, T, K, N);
    float *once = host(gdw, nw);
    G->upload(gdw, dw0, sizeof(float) * nw);
    G->matmul_backward(NULL, gdw, NULL, gdy, gx, gw, T, K, N);
    float *twice = host(gdw, nw);
    assert_memory_equal(once, twice, sizeof(float) * nw);
    free(once), free(twice);

    G->free(gx), G->free(gdy), G->free(gdx), G->free(gdw), G->free(gdb), G->free(gw);
    free(x), free(dy), free(w0), free(w), free(dx0), free(dw0), free(db0), free(dx), free(dw),
        free(db);
}

static void test_matmul_backward(void **state) {
    (void)state;
    for (int path = 0; path < 3; path++) { /* bf16 exact, bf16, f32 */
        one_matmul_backward(37, 203, 77, path == 0, path == 2);
        one_matmul_backward(1, 64, 1, path == 0, path == 2);
        one_matmul_backward(131, 96, 257, path == 0, path == 2);
    }
    one_matmul_backward(300, 5, 3, 1, 0); /* more tokens than features: the sums over T */
}

/* ---- norms, rope ------------------------------------------------------------------------------ */

static void one_rmsnorm_backward(int T, int Cc, float eps, int with_dw) {
    size_t n = (size_t)T * Cc;
    float *x = rnd(n, 3.0f), *w = rnd(Cc, 1.0f), *dy = rnd(n, 1.0f);
    float *dx0 = rnd(n, 0.5f), *dw0 = rnd(Cc, 0.5f);
    float *dx = copyf(dx0, n), *dw = copyf(dw0, Cc);
    C->rmsnorm_backward(dx, with_dw ? dw : NULL, dy, x, w, eps, T, Cc);
    float *gx = devf(x, n), *gw = devf(w, Cc), *gdy = devf(dy, n), *gdx = devf(dx0, n),
          *gdw = devf(dw0, Cc);
    G->rmsnorm_backward(gdx, with_dw ? gdw : NULL, gdy, gx, gw, eps, T, Cc);
    char what[96];
    snprintf(what, sizeof what, "rmsnorm_backward dx T=%d C=%d", T, Cc);
    check_dev(what, gdx, dx, n, 1e-5);
    snprintf(what, sizeof what, "rmsnorm_backward dw T=%d C=%d", T, Cc);
    if (with_dw)
        check_dev(what, gdw, dw, Cc, 1e-5);
    else
        check_untouched(what, gdw, dw0, Cc);
    G->free(gx), G->free(gw), G->free(gdy), G->free(gdx), G->free(gdw);
    free(x), free(w), free(dy), free(dx0), free(dw0), free(dx), free(dw);
}

static void test_rmsnorm_backward(void **state) {
    (void)state;
    one_rmsnorm_backward(13, 333, 1e-6f, 1);
    one_rmsnorm_backward(13, 333, 1e-6f, 0);
    one_rmsnorm_backward(7 * 5, 18, 1e-5f, 1); /* per-head q/k norm: many short rows */
    one_rmsnorm_backward(200, 64, 1e-6f, 1);   /* more rows than the column sum's chunks */
}

static void one_rope_backward(int T, int nh, int D, int pos0, float theta) {
    size_t n = (size_t)T * nh * D;
    float *d = rnd(n, 2.0f), *want = copyf(d, n);
    C->rope_backward(want, theta, pos0, T, nh, D);
    float *gd = devf(d, n);
    G->rope_backward(gd, theta, pos0, T, nh, D);
    char what[96];
    snprintf(what, sizeof what, "rope_backward T=%d nh=%d D=%d pos0=%d", T, nh, D, pos0);
    check_dev(what, gd, want, n, 1e-6);
    /* a rotation: rope then its backward gives the input back */
    G->upload(gd, d, sizeof(float) * n);
    G->rope(gd, theta, pos0, T, nh, D);
    G->rope_backward(gd, theta, pos0, T, nh, D);
    snprintf(what, sizeof what, "rope_backward(rope(x)) = x T=%d nh=%d D=%d", T, nh, D);
    check_dev(what, gd, d, n, 1e-6);
    G->free(gd);
    free(d), free(want);
}

static void test_rope_backward(void **state) {
    (void)state;
    one_rope_backward(11, 3, 38, 5, 10000.0f);
    one_rope_backward(29, 4, 128, 3000, 1000000.0f);
    one_rope_backward(1, 1, 2, 0, 10000.0f);
}

/* ---- attention -------------------------------------------------------------------------------- */

/* gradients of causal GQA attention against the CPU op, from the CPU's forward
 * output; acc: the gradients start non-zero (+=) */
static void one_attention_backward(int T, int nh, int nkv, int D, int acc) {
    size_t nq = (size_t)T * nh * D, nk = (size_t)T * nkv * D;
    float *q = rnd(nq, 1.0f), *k = rnd(nk, 1.0f), *v = rnd(nk, 1.0f), *dout = rnd(nq, 1.0f);
    float *out = moe_malloc(sizeof(float) * nq);
    float scale = 1.0f / sqrtf((float)D) * 2.0f; /* sharper softmax than usual */
    C->attention(out, q, k, v, scale, T, nh, nkv, D);
    float s0 = acc ? 0.5f : 0.0f;
    float *dq0 = rnd(nq, s0), *dk0 = rnd(nk, s0), *dv0 = rnd(nk, s0);
    float *dq = copyf(dq0, nq), *dk = copyf(dk0, nk), *dv = copyf(dv0, nk);
    C->attention_backward(dq, dk, dv, dout, q, k, v, out, scale, T, nh, nkv, D);

    float *gq = devf(q, nq), *gk = devf(k, nk), *gv = devf(v, nk), *gout = devf(out, nq),
          *gdout = devf(dout, nq), *gdq = devf(dq0, nq), *gdk = devf(dk0, nk), *gdv = devf(dv0, nk);
    G->attention_backward(gdq, gdk, gdv, gdout, gq, gk, gv, gout, scale, T, nh, nkv, D);
    assert_int_equal(moe_cuda_status(), 0);
    char what[128];
    snprintf(what, sizeof what, "attention_backward dq T=%d nh=%d nkv=%d D=%d acc=%d", T, nh, nkv, D, acc);
    check_dev(what, gdq, dq, nq, 1e-5);
    snprintf(what, sizeof what, "attention_backward dk T=%d nh=%d nkv=%d D=%d acc=%d", T, nh, nkv, D, acc);
    check_dev(what, gdk, dk, nk, 1e-5);
    snprintf(what, sizeof what, "attention_backward dv T=%d nh=%d nkv=%d D=%d acc=%d", T, nh, nkv, D, acc);
    check_dev(what, gdv, dv, nk, 1e-5);
    /* determinism: the same call again gives the same bytes */
    float *first = host(gdk, nk);
    G->upload(gdk, dk0, sizeof(float) * nk);
    G->attention_backward(gdq, gdk, gdv, gdout, gq, gk, gv, gout, scale, T, nh, nkv, D);
    float *again = host(gdk, nk);
    assert_memory_equal(first, again, sizeof(float) * nk);
    free(first), free(again);
    G->free(gq), G->free(gk), G->free(gv), G->free(gout), G->free(gdout), G->free(gdq),
        G->free(gdk), G->free(gdv);
    free(q), free(k), free(v), free(dout), free(out), free(dq0), free(dk0), free(dv0), free(dq),
        free(dk), free(dv);
}

static void test_attention_backward(void **state) {
    (void)state;
    one_attention_backward(45, 6, 2, 40, 0);
    one_attention_backward(1, 2, 1, 8, 1);
    one_attention_backward(70, 4, 4, 128, 0); /* several key tiles, head_dim 128 */
    one_attention_backward(33, 8, 1, 64, 1);  /* one KV head for 8 query heads */
    one_attention_backward(17, 2, 2, 256, 0); /* the largest shared-memory tiles */
}

/* ---- element-wise ------------------------------------------------------------------------------ */

static void test_swiglu_backward(void **state) {
    (void)state;
    int T = 9, I = 131;
    size_t n2 = (size_t)T * 2 * I;
    float *gu = rnd(n2, 4.0f), *dh = rnd((size_t)T * I, 1.0f), *dgu0 = rnd(n2, 0.5f);
    float *dgu = copyf(dgu0, n2);
    C->swiglu_backward(dgu, dh, gu, T, I);
    float *ggu = devf(gu, n2), *gdh = devf(dh, (size_t)T * I), *gdgu = devf(dgu0, n2);
    G->swiglu_backward(gdgu, gdh, ggu, T, I);
    check_dev("swiglu_backward", gdgu, dgu, n2, 1e-6);
    G->free(ggu), G->free(gdh), G->free(gdgu);
    free(gu), free(dh), free(dgu0), free(dgu);
}

static void test_sigmoid_gate_add_backward(void **state) {
    (void)state;
    int T = 7, Cc = 99;
    size_t n = (size_t)T * Cc;
    float *x = rnd(n, 1.0f), *dy = rnd(n, 1.0f), *z = rnd(T, 5.0f);
    float *dx0 = rnd(n, 0.5f), *dz0 = rnd(T, 0.5f);
    float *gx = devf(x, n), *gdy = devf(dy, n), *gz = devf(z, T);
    for (int which = 0; which < 3; which++) { /* both, dx only, dz only */
        float *dx = copyf(dx0, n), *dz = copyf(dz0, T);
        int want_dx = which != 2, want_dz = which != 1;
        C->sigmoid_gate_add_backward(want_dx ? dx : NULL, want_dz ? dz : NULL, dy, x, z, T, Cc);
        float *gdx = devf(dx0, n), *gdz = devf(dz0, T);
        G->sigmoid_gate_add_backward(want_dx ? gdx : NULL, want_dz ? gdz : NULL, gdy, gx, gz, T, Cc);
        if (want_dx) check_dev("sigmoid_gate_add_backward dx", gdx, dx, n, 1e-6);
        else check_untouched("sigmoid_gate_add_backward dx", gdx, dx0, n);
        if (want_dz) check_dev("sigmoid_gate_add_backward dz", gdz, dz, T, 1e-5);
        else check_untouched("sigmoid_gate_add_backward dz", gdz, dz0, T);
        G->free(gdx), G->free(gdz);
        free(dx), free(dz);
    }
    G->free(gx), G->free(gdy), G->free(gz);
    free(x), free(dy), free(z), free(dx0), free(dz0);
}

/* ---- routing, combine, embedding ------------------------------------------------------------------ */

static void one_router_backward(int mode, int renorm, int T, int E, int K, int with_dprobs) {
    float *l = rnd((size_t)T * E, 3.0f), *dwt = rnd((size_t)T * K, 1.0f);
    float *dprobs = with_dprobs ? rnd((size_t)T * E, 1.0f) : NULL;
    int32_t *idx = moe_malloc(sizeof(int32_t) * T * K);
    float *wt = moe_malloc(sizeof(float) * T * K), *probs = moe_malloc(sizeof(float) * T * E);
    C->router(idx, wt, probs, l, mode, renorm, T, E, K);
    float *want = rnd((size_t)T * E, 9.0f); /* garbage: written, not added to */
    float *garbage = copyf(want, (size_t)T * E);
    C->router_backward(want, dwt, dprobs, idx, wt, probs, mode, renorm, T, E, K);
    float *gdl = devf(garbage, (size_t)T * E), *gdwt = devf(dwt, (size_t)T * K),
          *gdp = with_dprobs ? devf(dprobs, (size_t)T * E) : NULL, *gwt = devf(wt, (size_t)T * K),
          *gp = devf(probs, (size_t)T * E);
    int32_t *gidx = dev(idx, sizeof(int32_t) * T * K);
    G->router_backward(gdl, gdwt, gdp, gidx, gwt, gp, mode, renorm, T, E, K);
    char what[96];
    snprintf(what, sizeof what, "router_backward mode=%d renorm=%d E=%d K=%d dprobs=%d", mode,
             renorm, E, K, with_dprobs);
    check_dev(what, gdl, want, (size_t)T * E, 1e-5);
    G->free(gdl), G->free(gdwt), G->free(gdp), G->free(gwt), G->free(gp), G->free(gidx);
    free(l), free(dwt), free(dprobs), free(idx), free(wt), free(probs), free(want), free(garbage);
}

static void test_router_backward(void **state) {
    (void)state;
    for (int dp = 0; dp <= 1; dp++) {
        for (int i = 0; i < N_ROUTER_CASES; i++)
            one_router_backward(router_cases[i].mode, router_cases[i].renorm, router_cases[i].T,
                                router_cases[i].E, router_cases[i].K, dp);
    }
}

static void test_combine_backward(void **state) {
    (void)state;
    int T = 41, K = 5, H = 203, n = T * K;
    /* every row of out belongs to one (t, k): a permutation of the rows */
    int32_t *slot = moe_malloc(sizeof(int32_t) * n);
    for (int i = 0; i < n; i++) slot[i] = (int32_t)(((long)i * 37 + 11) % n); /* gcd(37, 205) = 1 */
    float *out = rnd((size_t)n * H, 2.0f), *wt = rnd(n, 1.0f), *dy = rnd((size_t)T * H, 1.0f);
    float *garb_o = rnd((size_t)n * H, 9.0f), *garb_w = rnd(n, 9.0f);
    float *dout = copyf(garb_o, (size_t)n * H), *dwt = copyf(garb_w, n);
    C->combine_backward(dout, dwt, dy, out, slot, wt, T, K, H);
    float *gout = devf(out, (size_t)n * H), *gwt = devf(wt, n), *gdy = devf(dy, (size_t)T * H);
    int32_t *gslot = dev(slot, sizeof(int32_t) * n);
    float *gdout = devf(garb_o, (size_t)n * H), *gdwt = devf(garb_w, n);
    G->combine_backward(gdout, gdwt, gdy, gout, gslot, gwt, T, K, H);
    check_dev("combine_backward dout", gdout, dout, (size_t)n * H, 1e-7); /* one product: exact */
    check_dev("combine_backward dwt", gdwt, dwt, n, 1e-5);
    /* NULL dout: only dwt written */
    G->upload(gdout, garb_o, sizeof(float) * n * H);
    G->combine_backward(NULL, gdwt, gdy, gout, gslot, gwt, T, K, H);
    check_untouched("combine_backward dout (NULL)", gdout, garb_o, (size_t)n * H);
    G->free(gout), G->free(gwt), G->free(gdy), G->free(gslot), G->free(gdout), G->free(gdwt);
    free(slot), free(out), free(wt), free(dy), free(garb_o), free(garb_w), free(dout), free(dwt);
}

static void test_embed_backward(void **state) {
    (void)state;
    int V = 50, H = 77, T = 200;
    int32_t ids[200];
    for (int t = 0; t < T; t++) ids[t] = (int32_t)((t * t + 3 * t) % 23); /* rows repeat */
    float *dx = rnd((size_t)T * H, 1.0f), *dE0 = rnd((size_t)V * H, 0.5f);
    float *dE = copyf(dE0, (size_t)V * H);
    C->embed_backward(dE, dx, ids, T, H);
    float *gdx = devf(dx, (size_t)T * H), *gdE = devf(dE0, (size_t)V * H);
    int32_t *gids = dev(ids, sizeof ids);
    G->embed_backward(gdE, gdx, gids, T, H);
    /* the same additions in the same (token) order as the CPU's loop */
    check_dev("embed_backward", gdE, dE, (size_t)V * H, 1e-7);
    G->free(gdx), G->free(gdE), G->free(gids);
    free(dx), free(dE0), free(dE);
}

/* ---- loss, optimiser ------------------------------------------------------------------------------ */

static void one_cross_entropy(int T, int V, int alias) {
    float *logits = rnd((size_t)T * V, 6.0f);
    int32_t *tg = moe_malloc(sizeof(int32_t) * T);
    for (int t = 0; t < T; t++) tg[t] = t % 4 == 3 ? -100 : (int32_t)((t * 7919) % V);
    float dscale = 1.0f / 37.0f;
    float *loss = moe_malloc(sizeof(float) * T), *dl = moe_malloc(sizeof(float) * T * V);
    C->cross_entropy(loss, dl, logits, tg, dscale, T, V);
    float *glog = devf(logits, (size_t)T * V), *gloss = G->alloc(sizeof(float) * T);
    float *gdl = alias ? glog : G->alloc(sizeof(float) * T * V);
    int32_t *gtg = dev(tg, sizeof(int32_t) * T);
    G->cross_entropy(gloss, gdl, glog, gtg, dscale, T, V);
    char what[64];
    snprintf(what, sizeof what, "cross_entropy loss V=%d", V);
    check_dev(what, gloss, loss, T, 1e-6);
    snprintf(what, sizeof what, "cross_entropy dlogits V=%d alias=%d", V, alias);
    check_dev(what, gdl, dl, (size_t)T * V, 1e-5);
    /* the loss alone */
    float *zero = calloc(T, sizeof(float));
    G->upload(gloss, zero, sizeof(float) * T);
    G->upload(glog, logits, sizeof(float) * T * V);
    G->cross_entropy(gloss, NULL, glog, gtg, dscale, T, V);
    check_dev("cross_entropy loss only", gloss, loss, T, 1e-6);
    G->free(glog), G->free(gloss), G->free(gtg);
    if (!alias) G->free(gdl);
    free(logits), free(tg), free(loss), free(dl), free(zero);
}

static void test_cross_entropy(void **state) {
    (void)state;
    one_cross_entropy(13, 1001, 0);
    one_cross_entropy(9, 5000, 1); /* dlogits in place of the logits */
    one_cross_entropy(4, 3, 0);
}

static void test_adamw(void **state) {
    (void)state;
    size_t n = 10007;
    float *p = rnd(n, 1.0f), *m = calloc(n, sizeof(float)), *v = calloc(n, sizeof(float));
    float *gp = devf(p, n), *gm = devf(m, n), *gv = devf(v, n);
    for (int step = 1; step <= 4; step++) {
        float *gr = rnd(n, 0.01f * step), *ggr = devf(gr, n);
        float lr = 1e-3f / step, gscale = step == 3 ? 0.25f : 1.0f;
        C->adamw(p, m, v, gr, n, lr, 0.9f, 0.999f, 1e-8f, 0.01f, gscale, step);
        G->adamw(gp, gm, gv, ggr, n, lr, 0.9f, 0.999f, 1e-8f, 0.01f, gscale, step);
        G->free(ggr);
        free(gr);
    }
    check_dev("adamw p", gp, p, n, 1e-6);
    check_dev("adamw m", gm, m, n, 1e-6);
    check_dev("adamw v", gv, v, n, 1e-6);
    G->free(gp), G->free(gm), G->free(gv);
    free(p), free(m), free(v);
}

static void test_sumsq_to_weight_dtype(void **state) {
    (void)state;
    size_t sizes[] = {1, 255, 100003};
    for (int i = 0; i < 3; i++) {
        size_t n = sizes[i];
        float *x = rnd(n, 3.0f), *gx = devf(x, n);
        double want = C->sumsq(x, n), got = G->sumsq(gx, n), again = G->sumsq(gx, n);
        check_close_d("sumsq", &got, &want, 1, 1e-12);
        assert_true(got == again); /* fixed order */
        /* the BF16 compute copy: round to nearest even, as moe_f32_to_bf16 */
        uint16_t *want_b = moe_malloc(2 * n), *got_b = moe_malloc(2 * n);
        moe_dtype_from_f32(MOE_DT_BF16, x, want_b, n);
        void *gb = G->alloc(2 * n);
        G->to_weight_dtype(gb, gx, n);
        G->download(got_b, gb, 2 * n);
        assert_memory_equal(got_b, want_b, 2 * n);
        G->free(gx), G->free(gb);
        free(x), free(want_b), free(got_b);
    }
    assert_int_equal(moe_cuda_status(), 0);
}

/* every backward op is in both tables (a missing one fails here, by name) */
static void test_tables(void **state) {
    (void)state;
    const moe_backend *b[2] = {G, C};
    for (int i = 0; i < 2; i++) {
        assert_non_null(b[i]->matmul_backward);
        assert_non_null(b[i]->rmsnorm_backward);
        assert_non_null(b[i]->rope_backward);
        assert_non_null(b[i]->attention_backward);
        assert_non_null(b[i]->swiglu_backward);
        assert_non_null(b[i]->sigmoid_gate_add_backward);
        assert_non_null(b[i]->combine_backward);
        assert_non_null(b[i]->router_backward);
        assert_non_null(b[i]->embed_backward);
        assert_non_null(b[i]->cross_entropy);
        assert_non_null(b[i]->adamw);
        assert_non_null(b[i]->sumsq);
        assert_non_null(b[i]->to_weight_dtype);
    }
}

int main(void) {
    int rc = gpu_test_init();
    if (rc) return rc;
    const struct CMUnitTest tables[] = {cmocka_unit_test(test_tables)};
    if (cmocka_run_group_tests_name("tables", tables, NULL, NULL)) return 1; /* no NULL calls below */
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_matmul_backward),    cmocka_unit_test(test_rmsnorm_backward),
        cmocka_unit_test(test_rope_backward),      cmocka_unit_test(test_attention_backward),
        cmocka_unit_test(test_swiglu_backward),    cmocka_unit_test(test_sigmoid_gate_add_backward),
        cmocka_unit_test(test_router_backward),    cmocka_unit_test(test_combine_backward),
        cmocka_unit_test(test_embed_backward),     cmocka_unit_test(test_cross_entropy),
        cmocka_unit_test(test_adamw),              cmocka_unit_test(test_sumsq_to_weight_dtype),
    };
    return cmocka_run_group_tests_name("backward", tests, NULL, NULL);
}
