/* test_kernels.c - CPU ops against plain references and hand-computed values;
 * optimised vs reference backend; byte-identical results across thread counts. */
#include "kernels.h"
#include "testutil.h"

static uint64_t rng = 88172645463325252ULL;
static float *rand_vec(size_t n) { return tu_rand_vec(&rng, n); }
static void test_matmul_vs_ref(void **state) {
    (void)state;
    const moe_backend *cpu = moe_backend_cpu(), *ref = moe_backend_cpu_ref();
    int T = 37, K = 67, N = 129;
    float *x = rand_vec((size_t)T * K), *w = rand_vec((size_t)N * K), *b = rand_vec(N);
    float *y1 = rand_vec((size_t)T * N), *y2 = malloc(sizeof(float) * T * N);
    memcpy(y2, y1, sizeof(float) * T * N);
    cpu->matmul(y1, x, w, b, T, K, N, 1);
    ref->matmul(y2, x, w, b, T, K, N, 1);
    assert_true(tu_rel_err(y1, y2, (size_t)T * N) < 1e-6);
    cpu->matmul(y1, x, w, NULL, T, K, N, 0);
    /* one element by hand */
    double s = 0;
    for (int k = 0; k < K; k++) s += (double)x[5 * K + k] * w[7 * K + k];
    assert_true(fabs(y1[5 * N + 7] - s) < 1e-5);
    free(x), free(w), free(b), free(y1), free(y2);
}

static void test_attention_vs_ref(void **state) {
    (void)state;
    const moe_backend *cpu = moe_backend_cpu(), *ref = moe_backend_cpu_ref();
    int T = 29, nh = 6, nkv = 2, D = 16;
    float *q = rand_vec((size_t)T * nh * D), *k = rand_vec((size_t)T * nkv * D);
    float *v = rand_vec((size_t)T * nkv * D);
    float *o1 = malloc(sizeof(float) * T * nh * D), *o2 = malloc(sizeof(float) * T * nh * D);
    cpu->attention(o1, q, k, v, 0.25f, T, nh, nkv, D);
    ref->attention(o2, q, k, v, 0.25f, T, nh, nkv, D);
    assert_true(tu_rel_err(o1, o2, (size_t)T * nh * D) < 1e-6);
    /* first query attends only to the first key: output = v_0 of its kv head */
    for (int h = 0; h < nh; h++)
        for (int d = 0; d < D; d++) assert_float_equal(o2[h * D + d], v[(h / 3) * D + d], 1e-6);
    free(q), free(k), free(v), free(o1), free(o2);
}

/* attention_kv: cpu vs cpu-ref, and the row invariance kernels.h promises:
 * T queries over P cached keys give the bits of the last T rows of the whole
 * sequence's attention, and a prefix run alone gives its rows' bits. */
static void one_attention_kv(int P, int T, int nh, int nkv, int D) {
    const moe_backend *cpu = moe_backend_cpu(), *ref = moe_backend_cpu_ref();
    int N = P + T;
    size_t qd = (size_t)nh * D;
    float *q = rand_vec((size_t)N * qd), *k = rand_vec((size_t)N * nkv * D);
    float *v = rand_vec((size_t)N * nkv * D);
    float *full = malloc(sizeof(float) * N * qd), *fref = malloc(sizeof(float) * N * qd);
    float *o1 = malloc(sizeof(float) * T * qd), *o2 = malloc(sizeof(float) * T * qd);
    float *pre = malloc(sizeof(float) * (P + 1) * qd);
    cpu->attention(full, q, k, v, 0.3f, N, nh, nkv, D);
    ref->attention(fref, q, k, v, 0.3f, N, nh, nkv, D);
    cpu->attention_kv(o1, q + (size_t)P * qd, k, v, 0.3f, P, T, nh, nkv, D);
    ref->attention_kv(o2, q + (size_t)P * qd, k, v, 0.3f, P, T, nh, nkv, D);
    assert_true(tu_rel_err(full, fref, (size_t)N * qd) < 1e-6);
    assert_true(tu_rel_err(o1, o2, (size_t)T * qd) < 1e-6);
    /* bit-identical to the whole sequence's rows (both backends) */
    assert_memory_equal(o1, full + (size_t)P * qd, sizeof(float) * T * qd);
    assert_memory_equal(o2, fref + (size_t)P * qd, sizeof(float) * T * qd);
    if (P > 0) { /* the prefix alone */
        cpu->attention_kv(pre, q, k, v, 0.3f, 0, P, nh, nkv, D);
        assert_memory_equal(pre, full, sizeof(float) * P * qd);
        ref->attention_kv(pre, q, k, v, 0.3f, 0, P, nh, nkv, D);
        assert_memory_equal(pre, fref, sizeof(float) * P * qd);
    }
    free(q), free(k), free(v), free(full), free(fref), free(o1), free(o2), free(pre);
}

static void test_attention_kv(void **state) {
    (void)state;
    one_attention_kv(0, 29, 6, 2, 16);
    one_attention_kv(37, 5, 6, 2, 16);
    one_attention_kv(64, 1, 4, 4, 32);
    one_attention_kv(130, 70, 8, 2, 64);  /* blocks straddled, large GEMMs */
    one_attention_kv(300, 3, 4, 1, 128);
    one_attention_kv(1, 200, 2, 1, 8);
}

/* Same result bytes whatever the thread count (OpenMP and OpenBLAS). */
static void test_thread_invariance(void **state) {
    (void)state;
    const moe_backend *cpu = moe_backend_cpu();
    int T = 300, K = 260, N = 517, nh = 8, nkv = 2, D = 32;
    float *x = rand_vec((size_t)T * K), *w = rand_vec((size_t)N * K);
    float *q = rand_vec((size_t)T * nh * D), *k = rand_vec((size_t)T * nkv * D);
    float *v = rand_vec((size_t)T * nkv * D);
    float *y[3], *o[3];
    int threads[3] = {1, 2, 3};
    for (int i = 0; i < 3; i++) {
        moe_kernels_set_threads(threads[i]);
        y[i] = malloc(sizeof(float) * T * N);
        o[i] = malloc(sizeof(float) * T * nh * D);
        cpu->matmul(y[i], x, w, NULL, T, K, N, 0);
        cpu->attention(o[i], q, k, v, 0.17f, T, nh, nkv, D);
    }
    for (int i = 1; i < 3; i++) {
        assert_memory_equal(y[0], y[i], sizeof(float) * T * N);
        assert_memory_equal(o[0], o[i], sizeof(float) * T * nh * D);
    }
    moe_kernels_set_threads(0);
    for (int i = 0; i < 3; i++) free(y[i]), free(o[i]);
    free(x), free(w), free(q), free(k), free(v);
}

/* A row's GEMM result does not depend on how many rows are computed with it,
 * so batching sequences (layer-major) changes no byte. */
static void test_batch_invariance(void **state) {
    (void)state;
    const moe_backend *cpu = moe_backend_cpu();
    int T = 300, sizes[3][2] = {{520, 333}, {64, 64}, {1024, 1408}};
    for (int s = 0; s < 3; s++) {
        int K = sizes[s][0], N = sizes[s][1];
        float *x = rand_vec((size_t)T * K), *w = rand_vec((size_t)N * K);
        float *y = malloc(sizeof(float) * T * N), *y2 = malloc(sizeof(float) * T * N);
        cpu->matmul(y, x, w, NULL, T, K, N, 0);
        for (int M = 1; M <= 40; M++) {
            cpu->matmul(y2, x + (size_t)5 * K, w, NULL, M, K, N, 0);
            assert_memory_equal(y + (size_t)5 * N, y2, sizeof(float) * M * N);
        }
        free(x), free(w), free(y), free(y2);
    }
}

static void test_rmsnorm_rope_swiglu(void **state) {
    (void)state;
    const moe_backend *cpu = moe_backend_cpu();
    float x[4] = {1, -2, 3, -4}, w[4] = {1, 2, 0.5f, 1}, y[4];
    cpu->rmsnorm(y, x, w, 1e-6f, 1, 4);
    double r = 1.0 / sqrt((1 + 4 + 9 + 16) / 4.0 + 1e-6);
    for (int i = 0; i < 4; i++) assert_float_equal(y[i], w[i] * x[i] * r, 1e-6);
    /* rope: position 3, D = 4, theta 100: pairs (0,2) angle 3, (1,3) angle 3/10 */
    float q[2 * 4] = {0, 0, 0, 0, 1, 2, 3, 4};
    cpu->rope(q, 100.0f, 2, 2, 1, 4); /* tokens at positions 2 and 3 */
    double a0 = 3.0, a1 = 3.0 / 10.0;
    assert_float_equal(q[4], 1 * cos(a0) - 3 * sin(a0), 1e-5);
    assert_float_equal(q[6], 3 * cos(a0) + 1 * sin(a0), 1e-5);
    assert_float_equal(q[5], 2 * cos(a1) - 4 * sin(a1), 1e-5);
    assert_float_equal(q[7], 4 * cos(a1) + 2 * sin(a1), 1e-5);
    float gu[4] = {1, -2, 3, 0.5f}, h[2];
    cpu->swiglu(h, gu, 1, 2);
    assert_float_equal(h[0], 1 / (1 + exp(-1.0)) * 3, 1e-6);
    assert_float_equal(h[1], -2 / (1 + exp(2.0)) * 0.5, 1e-6);
}

static void test_router(void **state) {
    (void)state;
    const moe_backend *cpu = moe_backend_cpu();
    /* token 0: tie between experts 1 and 3 -> lower id first */
    float lg[2 * 5] = {0.1f, 2.0f, -1.0f, 2.0f, 0.5f, 3.0f, 0.0f, 1.0f, -2.0f, 2.5f};
    int32_t idx[4];
    float wt[4], probs[10];
    cpu->router(idx, wt, probs, lg, MOE_ROUTE_SOFTMAX_TOPK, MOE_RENORM_NONE, 2, 5, 2);
    assert_int_equal(idx[0], 1);
    assert_int_equal(idx[1], 3);
    assert_int_equal(idx[2], 0);
    assert_int_equal(idx[3], 4);
    double z = exp(3.0) + exp(0.0) + exp(1.0) + exp(-2.0) + exp(2.5);
    assert_float_equal(wt[2], exp(3.0) / z, 1e-6);
    assert_float_equal(probs[5 + 4], exp(2.5) / z, 1e-6);
    /* renormalised == top-k-then-softmax (Mixtral) */
    float w2[4];
    int32_t i2[4];
    cpu->router(idx, wt, NULL, lg, MOE_ROUTE_SOFTMAX_TOPK, MOE_RENORM_SUM, 2, 5, 2);
    cpu->router(i2, w2, NULL, lg, MOE_ROUTE_TOPK_SOFTMAX, MOE_RENORM_NONE, 2, 5, 2);
    assert_memory_equal(idx, i2, sizeof idx);
    for (int i = 0; i < 4; i++) assert_float_equal(wt[i], w2[i], 1e-6);
    assert_float_equal(w2[2], 1 / (1 + exp(-0.5)), 1e-6);
}

static void test_dispatch_gather_scatter(void **state) {
    (void)state;
    const moe_backend *cpu = moe_backend_cpu();
    int32_t idx[6] = {2, 0, 0, 1, 2, 1}; /* T=3, K=2 */
    float wt[6] = {0.5f, 0.25f, 1, 2, 3, 4};
    moe_dispatch d;
    moe_dispatch_build(&d, idx, wt, 3, 3, 2);
    int32_t off[4] = {0, 2, 4, 6}, tok[6] = {0, 1, 1, 2, 0, 2};
    float ww[6] = {0.25f, 1, 2, 4, 0.5f, 3};
    assert_memory_equal(d.off, off, sizeof off);
    assert_memory_equal(d.tokens, tok, sizeof tok);
    assert_memory_equal(d.weights, ww, sizeof ww);
    float src[3 * 2] = {1, 2, 3, 4, 5, 6}, g[2 * 2], dst[3 * 2] = {0};
    cpu->gather_rows(g, src, d.tokens + 2, 2, 2); /* expert 1: tokens 1, 2 */
    float ge[4] = {3, 4, 5, 6};
    assert_memory_equal(g, ge, sizeof ge);
    cpu->scatter_add_rows(dst, g, d.tokens + 2, d.weights + 2, 2, 2);
    float de[6] = {0, 0, 6, 8, 20, 24};
    assert_memory_equal(dst, de, sizeof de);
    moe_dispatch_free(&d);
}

/* grouped experts (optimised vs plain loops) and the weighted combine */
static void test_experts_combine(void **state) {
    (void)state;
    const moe_backend *cpu = moe_backend_cpu(), *ref = moe_backend_cpu_ref();
    int T = 41, E = 5, K = 2, H = 48, Im = 150; /* Im > one 128-column block */
    int32_t idx[41 * 2];
    float wt[41 * 2];
    for (int t = 0; t < T; t++) {
        idx[t * K] = (t * 3) % E;
        idx[t * K + 1] = (t * 3 + 1 + t % 2) % E;
        wt[t * K] = 0.25f + 0.01f * t;
        wt[t * K + 1] = 0.5f;
    }
    moe_dispatch d;
    moe_dispatch_build(&d, idx, wt, T, E, K);
    float *x = rand_vec((size_t)T * H);
    float *wg[5], *wd[5];
    const void *pg[5], *pd[5];
    for (int e = 0; e < E; e++) {
        pg[e] = wg[e] = rand_vec((size_t)2 * Im * H);
        pd[e] = wd[e] = rand_vec((size_t)H * Im);
    }
    pg[3] = NULL; /* skipped expert: rows untouched */
    size_t n = (size_t)T * K;
    float *o1 = calloc(n * H, sizeof(float)), *o2 = calloc(n * H, sizeof(float));
    cpu->experts(o1, x, d.tokens, d.off, pg, pd, E, H, Im);
    ref->experts(o2, x, d.tokens, d.off, pg, pd, E, H, Im);
    assert_true(tu_rel_err(o1, o2, n * H) < 1e-5);
    for (int i = d.off[3]; i < d.off[4]; i++) assert_true(o1[(size_t)i * H] == 0.0f);
    pg[3] = wg[3];
    cpu->experts(o1, x, d.tokens, d.off, pg, pd, E, H, Im);
    /* combine: per token, ascending expert id */
    float *y = malloc(sizeof(float) * T * H);
    cpu->combine(y, o1, d.slot, d.slot_wt, T, K, H);
    for (int t = 0; t < T; t += 7) {
        int e0 = idx[t * K], e1 = idx[t * K + 1];
        float w0 = wt[t * K], w1 = wt[t * K + 1];
        if (e1 < e0) {
            int tmp = e0; e0 = e1; e1 = tmp;
            float tw = w0; w0 = w1; w1 = tw;
        }
        int r0 = d.slot[t * K], r1 = d.slot[t * K + 1];
        assert_int_equal(d.tokens[r0], t);
        assert_int_equal(d.tokens[r1], t);
        assert_true(r0 >= d.off[e0] && r0 < d.off[e0 + 1]);
        for (int c = 0; c < H; c++)
            assert_true(y[t * H + c] == (0.0f + o1[(size_t)r0 * H + c] * w0) + o1[(size_t)r1 * H + c] * w1);
    }
    for (int e = 0; e < E; e++) free(wg[e]), free(wd[e]);
    free(x), free(o1), free(o2), free(y);
    moe_dispatch_free(&d);
}

/* Grouped experts: same bytes whatever the thread count, and a token's expert
 * outputs do not depend on which other tokens share its experts (search
 * tools: fast == naive; batching sequences). */
static void test_experts_invariance(void **state) {
    (void)state;
    const moe_backend *cpu = moe_backend_cpu();
    enum { T = 60, E = 6, K = 2, H = 256, Im = 320 };
    int32_t idx[T * K];
    float wt[T * K];
    for (int t = 0; t < T; t++) {
        idx[t * K] = (t * 5) % E;
        idx[t * K + 1] = (t * 5 + 1 + t % 3) % E;
        wt[t * K] = wt[t * K + 1] = 0.5f;
    }
    float *x = rand_vec((size_t)T * H);
    float *wg[E], *wd[E];
    const void *pg[E], *pd[E];
    for (int e = 0; e < E; e++) {
        pg[e] = wg[e] = rand_vec((size_t)2 * Im * H);
        pd[e] = wd[e] = rand_vec((size_t)H * Im);
    }
    moe_dispatch d;
    moe_dispatch_build(&d, idx, wt, T, E, K);
    size_t n = (size_t)T * K;
    float *o[3];
    int threads[3] = {1, 2, 3};
    for (int i = 0; i < 3; i++) {
        moe_kernels_set_threads(threads[i]);
        o[i] = calloc(n * H, sizeof(float));
        cpu->experts(o[i], x, d.tokens, d.off, pg, pd, E, H, Im);
    }
    moe_kernels_set_threads(0);
    for (int i = 1; i < 3; i++) assert_memory_equal(o[0], o[i], sizeof(float) * n * H);
    /* tokens 7..7+M-1 alone: each (token, expert) row as in the full batch */
    float *o2 = calloc(n * H, sizeof(float));
    for (int M = 1; M <= 14; M++) {
        moe_dispatch d2;
        moe_dispatch_build(&d2, idx + 7 * K, wt + 7 * K, M, E, K);
        cpu->experts(o2, x + (size_t)7 * H, d2.tokens, d2.off, pg, pd, E, H, Im);
        for (int t = 0; t < M; t++)
            for (int k = 0; k < K; k++)
                assert_memory_equal(o[0] + (size_t)d.slot[(7 + t) * K + k] * H,
                                    o2 + (size_t)d2.slot[t * K + k] * H, sizeof(float) * H);
        moe_dispatch_free(&d2);
    }
    for (int e = 0; e < E; e++) free(wg[e]), free(wd[e]);
    for (int i = 0; i < 3; i++) free(o[i]);
    free(x), free(o2);
    moe_dispatch_free(&d);
}

/* "cpu-bf16": BF16 weights widened tile by tile give the same bytes as "cpu" on
 * the widened weights: matmul (tiny padded products, several column tiles, a
 * ragged last tile, a weight at an odd 2-byte address, accumulate, bias) and
 * the grouped experts, 1 and 2 threads; matmul_f32 is "cpu"'s matmul. */
static uint16_t *to_bf16(float *w, size_t n, int shift) { /* rounds w in place; +shift elements */
    uint16_t *b = malloc((n + (size_t)shift) * sizeof(uint16_t));
    for (size_t i = 0; i < n; i++) {
        b[i + (size_t)shift] = moe_f32_to_bf16(w[i]);
        w[i] = moe_bf16_to_f32(b[i + (size_t)shift]);
    }
    return b;
}

static void test_bf16_weights_exact(void **state) {
    (void)state;
    const moe_backend *cpu = moe_backend_cpu(), *bf = moe_backend_cpu_bf16();
    assert_int_equal(bf->weight_dtype, MOE_DT_BF16);
    const int shapes[][3] = {{1, 64, 3}, {7, 33, 65}, {300, 260, 1100}, {130, 128, 1024},
                             {2, 700, 1}, {513, 96, 64}};
    for (int th = 1; th <= 2; th++) {
        moe_kernels_set_threads(th);
        for (size_t i = 0; i < sizeof shapes / sizeof *shapes; i++) {
            int T = shapes[i][0], K = shapes[i][1], N = shapes[i][2];
            for (int shift = 0; shift <= 1; shift++) {
                float *x = rand_vec((size_t)T * K), *w = rand_vec((size_t)N * K), *b = rand_vec(N);
                uint16_t *wb = to_bf16(w, (size_t)N * K, shift);
                float *y1 = rand_vec((size_t)T * N), *y2 = malloc(sizeof(float) * T * N);
                float *y3 = malloc(sizeof(float) * T * N);
                memcpy(y2, y1, sizeof(float) * T * N);
                memcpy(y3, y1, sizeof(float) * T * N);
                int acc = (int)(i + (size_t)shift) % 2;
                cpu->matmul(y1, x, w, acc ? b : NULL, T, K, N, acc);
                bf->matmul(y2, x, wb + shift, acc ? b : NULL, T, K, N, acc);
                bf->matmul_f32(y3, x, w, acc ? b : NULL, T, K, N, acc);
                assert_memory_equal(y1, y2, sizeof(float) * T * N);
                assert_memory_equal(y1, y3, sizeof(float) * T * N);
                free(x), free(w), free(b), free(wb), free(y1), free(y2), free(y3);
            }
        }
        enum { T = 90, E = 5, K = 2, H = 256, Im = 330 };
        int32_t idx[T * K];
        float wt[T * K];
        for (int t = 0; t < T; t++) {
            idx[t * K] = (t * 7) % E;
            idx[t * K + 1] = (t * 7 + 1 + t % 3) % E;
            wt[t * K] = wt[t * K + 1] = 0.5f;
        }
        moe_dispatch d;
        moe_dispatch_build(&d, idx, wt, T, E, K);
        float *x = rand_vec((size_t)T * H), *wg[E], *wd[E];
        uint16_t *bg[E], *bd[E];
        const void *pg[E], *pd[E], *qg[E], *qd[E];
        for (int e = 0; e < E; e++) {
            pg[e] = wg[e] = rand_vec((size_t)2 * Im * H);
            pd[e] = wd[e] = rand_vec((size_t)H * Im);
            qg[e] = bg[e] = to_bf16(wg[e], (size_t)2 * Im * H, 0);
            qd[e] = bd[e] = to_bf16(wd[e], (size_t)H * Im, 0);
        }
        size_t n = (size_t)T * K;
        float *o1 = calloc(n * H, sizeof(float)), *o2 = calloc(n * H, sizeof(float));
        cpu->experts(o1, x, d.tokens, d.off, pg, pd, E, H, Im);
        bf->experts(o2, x, d.tokens, d.off, qg, qd, E, H, Im);
        assert_memory_equal(o1, o2, sizeof(float) * n * H);
        for (int e = 0; e < E; e++) free(wg[e]), free(wd[e]), free(bg[e]), free(bd[e]);
        free(x), free(o1), free(o2);
        moe_dispatch_free(&d);
    }
    moe_kernels_set_threads(0);
}

static void test_divergences(void **state) {
    (void)state;
    const moe_backend *cpu = moe_backend_cpu();
    float a[2 * 3] = {1, 2, 3, 0, 0, 0}, b[2 * 3] = {1, 2, 3, 1, 0, 0};
    double d[2];
    cpu->divergence(d, a, b, MOE_DIV_JS, 2, 3);
    assert_true(d[0] == 0.0);
    /* token 1: p uniform, q = softmax(1,0,0) */
    double q0 = exp(1.0) / (exp(1.0) + 2), q1 = 1 / (exp(1.0) + 2), p = 1 / 3.0;
    double m0 = (p + q0) / 2, m1 = (p + q1) / 2;
    double js = 0.5 * (p * log(p / m0) + 2 * p * log(p / m1) + q0 * log(q0 / m0) + 2 * q1 * log(q1 / m1));
    assert_float_equal(d[1], js, 1e-7);
    cpu->divergence(d, a, b, MOE_DIV_KL, 2, 3);
    assert_float_equal(d[1], p * log(p / q0) + 2 * p * log(p / q1), 1e-7);
    cpu->divergence(d, a, b, MOE_DIV_MSE, 2, 3);
    assert_float_equal(d[1], 1.0 / 3, 1e-12);
    float c1[2] = {1, 0}, c2[2] = {1, 1};
    cpu->divergence(d, c1, c2, MOE_DIV_COSINE, 1, 2);
    assert_float_equal(d[0], 1 - 1 / sqrt(2.0), 1e-7);
    float sm[3];
    cpu->softmax_rows(sm, b + 3, 1, 3);
    assert_float_equal(sm[0], q0, 1e-7);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_matmul_vs_ref),
        cmocka_unit_test(test_attention_vs_ref),
        cmocka_unit_test(test_attention_kv),
        cmocka_unit_test(test_thread_invariance),
        cmocka_unit_test(test_batch_invariance),
        cmocka_unit_test(test_rmsnorm_rope_swiglu),
        cmocka_unit_test(test_router),
        cmocka_unit_test(test_dispatch_gather_scatter),
        cmocka_unit_test(test_experts_combine),
        cmocka_unit_test(test_experts_invariance),
        cmocka_unit_test(test_bf16_weights_exact),
        cmocka_unit_test(test_divergences),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
