/* test_bf16.c - BF16 compute on the CPU (--precision bf16, kernels/cpu_bf16.c):
 *   - matmul and experts against a double-precision reference on the
 *     BF16-rounded inputs (and clearly away from the unrounded one: the
 *     activations are rounded), odd K, ragged tiles, unaligned weights,
 *     accumulate and bias;
 *   - the portable C kernels give the AVX512-BF16 kernels' bits;
 *   - a row's result depends neither on the other rows of its call nor on
 *     the thread count; the grouped experts equal matmul, SwiGLU, matmul;
 *   - the fixture models: bf16 vs f32 hidden states and logits within the
 *     error of Hugging Face's own bf16 forward (tests/fixtures/models/NOTES.md),
 *     the expert choices that differ counted and printed. */
#include "kernels.h"
#include "testmodel.h" /* FIX, NSEQ, ARCHS, tm_run */

static uint32_t rng = 12345;
static float frand(void) {
    rng = rng * 1664525u + 1013904223u;
    return (float)((rng >> 8) & 0xffff) / 65536.0f - 0.5f;
}
static float *rand_vec(size_t n) {
    float *v = malloc(sizeof(float) * (n ? n : 1));
    for (size_t i = 0; i < n; i++) v[i] = frand();
    return v;
}
/* BF16 copy of w (n elements) starting at element `shift` of the buffer */
static uint16_t *bf16_of(const float *w, size_t n, int shift) {
    uint16_t *b = malloc(sizeof(uint16_t) * (n + (size_t)shift + 1));
    for (size_t i = 0; i < n; i++) b[i + (size_t)shift] = moe_f32_to_bf16(w[i]);
    return b;
}
static double bf(float f) { return moe_bf16_to_f32(moe_f32_to_bf16(f)); }

/* worst |y - ref| / Σ_k |x_k·w_k| over the outputs, ref in double from x
 * rounded to BF16 (round_x) or not */
static double worst_err(const float *y, const float *y0, const float *x, const uint16_t *w,
                        const float *bias, int T, int K, int N, int acc, int round_x) {
    double worst = 0;
    for (int t = 0; t < T; t++)
        for (int n = 0; n < N; n++) {
            double s = 0, mag = 1e-30;
            for (int k = 0; k < K; k++) {
                double xv = round_x ? bf(x[(size_t)t * K + k]) : x[(size_t)t * K + k];
                double p = xv * moe_bf16_to_f32(w[(size_t)n * K + k]);
                s += p;
                mag += fabs(p);
            }
            if (acc) s += y0[(size_t)t * N + n], mag += fabs(y0[(size_t)t * N + n]);
            if (bias) s += bias[n], mag += fabs(bias[n]);
            double e = fabs(y[(size_t)t * N + n] - s) / mag;
            if (e > worst) worst = e;
        }
    return worst;
}

static const int SHAPES[][3] = {{1, 64, 3},    {7, 33, 65},   {49, 1023, 17}, {130, 128, 260},
                                {2, 700, 1},   {100, 7, 9},   {17, 1, 5},     {300, 256, 130}};
#define NSHAPES (sizeof SHAPES / sizeof *SHAPES)

static void test_matmul_reference(void **state) {
    (void)state;
    const moe_backend *b = moe_backend_cpu_bf16_compute();
    assert_int_equal(b->weight_dtype, MOE_DT_BF16);
    for (size_t i = 0; i < NSHAPES; i++) {
        int T = SHAPES[i][0], K = SHAPES[i][1], N = SHAPES[i][2], shift = (int)i % 2;
        int acc = (int)(i / 2) % 2;
        float *x = rand_vec((size_t)T * K), *w = rand_vec((size_t)N * K), *bias = rand_vec(N);
        uint16_t *wb = bf16_of(w, (size_t)N * K, shift);
        float *y0 = rand_vec((size_t)T * N), *y = malloc(sizeof(float) * T * N);
        memcpy(y, y0, sizeof(float) * T * N);
        b->matmul(y, x, wb + shift, acc ? bias : NULL, T, K, N, acc);
        double e = worst_err(y, y0, x, wb + shift, acc ? bias : NULL, T, K, N, acc, 1);
        double e_unrounded = worst_err(y, y0, x, wb + shift, acc ? bias : NULL, T, K, N, acc, 0);
        if (e > 1e-6) print_error("shape %dx%dx%d: rel err %.3g\n", T, K, N, e);
        assert_true(e < 1e-6); /* float32 sums of exact products */
        /* an unrounded x misses by BF16's precision (2^-9) somewhere */
        if (K > 8 && e_unrounded < 1e-5) print_error("shape %dx%dx%d: unrounded %.3g\n", T, K, N, e_unrounded);
        if (K > 8) assert_true(e_unrounded > 1e-5);
        free(x), free(w), free(bias), free(wb), free(y0), free(y);
    }
}

/* portable C == AVX512-BF16 (bit for bit), 1 and 2 threads the same, and a
 * row computed alone (or in another batch) equals the row in the full call */
static void test_portable_rows_threads(void **state) {
    (void)state;
    const moe_backend *b = moe_backend_cpu_bf16_compute();
    if (!moe_cpu_bf16_native()) print_message("no AVX512-BF16 here: portable kernels only\n");
    for (size_t i = 0; i < NSHAPES; i++) {
        int T = SHAPES[i][0], K = SHAPES[i][1], N = SHAPES[i][2];
        float *x = rand_vec((size_t)T * K), *w = rand_vec((size_t)N * K);
        uint16_t *wb = bf16_of(w, (size_t)N * K, 0);
        size_t ny = (size_t)T * N;
        float *y[4];
        for (int j = 0; j < 4; j++) y[j] = malloc(sizeof(float) * ny);
        moe_kernels_set_threads(2);
        b->matmul(y[0], x, wb, NULL, T, K, N, 0);
        moe_kernels_set_threads(1);
        b->matmul(y[1], x, wb, NULL, T, K, N, 0);
        moe_cpu_bf16_force_portable(1);
        b->matmul(y[2], x, wb, NULL, T, K, N, 0);
        moe_cpu_bf16_force_portable(0);
        for (int t = 0; t < T; t += 1 + T / 5) /* row by row, and the rows from t on */
            b->matmul(y[3] + (size_t)t * N, x + (size_t)t * K, wb, NULL, t % 2 ? 1 : T - t, K, N, 0);
        moe_kernels_set_threads(0);
        assert_memory_equal(y[0], y[1], sizeof(float) * ny);
        assert_memory_equal(y[0], y[2], sizeof(float) * ny);
        for (int t = 0; t < T; t += 1 + T / 5)
            assert_memory_equal(y[0] + (size_t)t * N, y[3] + (size_t)t * N, sizeof(float) * N);
        for (int j = 0; j < 4; j++) free(y[j]);
        free(x), free(w), free(wb);
    }
}

/* the grouped experts == per expert: gather, matmul, SwiGLU, matmul (same
 * kernels, so the same bits), 1 and 2 threads; an expert left NULL is skipped */
static void test_experts(void **state) {
    (void)state;
    const moe_backend *b = moe_backend_cpu_bf16_compute();
    enum { T = 70, E = 5, K = 2, H = 96, Im = 75 };
    int32_t idx[T * K];
    float wt[T * K];
    for (int t = 0; t < T; t++) {
        idx[t * K] = (t * 7) % E;
        idx[t * K + 1] = (t * 7 + 1 + t % 3) % E;
        wt[t * K] = wt[t * K + 1] = 0.5f;
    }
    moe_dispatch d;
    moe_dispatch_build(&d, idx, wt, T, E, K);
    float *x = rand_vec((size_t)T * H);
    uint16_t *wg[E], *wd[E];
    const void *pg[E], *pd[E];
    for (int e = 0; e < E; e++) {
        float *g = rand_vec((size_t)2 * Im * H), *dn = rand_vec((size_t)H * Im);
        pg[e] = wg[e] = bf16_of(g, (size_t)2 * Im * H, 0);
        pd[e] = wd[e] = bf16_of(dn, (size_t)H * Im, 0);
        free(g), free(dn);
    }
    pg[3] = NULL; /* skipped */
    size_t n = (size_t)d.off[E];
    float *o1 = calloc(n * H, sizeof(float)), *o2 = calloc(n * H, sizeof(float)), *ref = calloc(n * H, sizeof(float));
    moe_kernels_set_threads(1);
    b->experts(o1, x, d.tokens, d.off, pg, pd, E, H, Im);
    moe_kernels_set_threads(2);
    b->experts(o2, x, d.tokens, d.off, pg, pd, E, H, Im);
    moe_kernels_set_threads(0);
    float *xg = malloc(sizeof(float) * n * H), *gu = malloc(sizeof(float) * n * 2 * Im);
    float *h = malloc(sizeof(float) * n * Im);
    for (int e = 0; e < E; e++) {
        int r0 = d.off[e], nr = d.off[e + 1] - r0;
        if (!pg[e] || nr == 0) continue;
        b->gather_rows(xg, x, d.tokens + r0, nr, H);
        b->matmul(gu, xg, pg[e], NULL, nr, H, 2 * Im, 0);
        b->swiglu(h, gu, nr, Im);
        b->matmul(ref + (size_t)r0 * H, h, pd[e], NULL, nr, Im, H, 0);
    }
    assert_memory_equal(o1, ref, sizeof(float) * n * H);
    assert_memory_equal(o2, ref, sizeof(float) * n * H);
    for (int e = 0; e < E; e++) free(wg[e]), free(wd[e]);
    free(x), free(o1), free(o2), free(ref), free(xg), free(gu), free(h);
    moe_dispatch_free(&d);
}

/* Hugging Face's own bf16 forward against its float32 forward on the same
 * BF16 weights (NOTES.md: relative L2 error of the last hidden state and of
 * the logits, in ARCHS order): the bound ours must stay within. */
static const double HF_BF16_ERR[][2] = {
    {1.12e-02, 1.12e-02}, {9.06e-03, 9.05e-03}, {9.68e-03, 1.02e-02}, {8.82e-02, 8.65e-02},
    {9.12e-03, 9.32e-03}};

static void run_precision(tm_run *r, const char *dir, int precision) {
    moe_model_opts o = {.device = "cpu", .precision = precision};
    moe_model *m = moe_model_open(dir, &o);
    if (!m) fail_msg("%s: %s", dir, moe_error());
    if (precision == MOE_PRECISION_BF16)
        assert_string_equal(moe_model_backend(m)->name, "cpu-bf16-compute");
    tm_forward(r, m, dir, "cpu");
    moe_model_close(m);
}

static void test_fixture_models(void **state) {
    (void)state;
    for (size_t a = 0; a < sizeof ARCHS / sizeof *ARCHS; a++) {
        char dir[256];
        snprintf(dir, sizeof dir, "%s/%s-bf16", FIX, ARCHS[a]);
        tm_run f, b;
        run_precision(&f, dir, MOE_PRECISION_DEFAULT);
        run_precision(&b, dir, MOE_PRECISION_BF16);
        int L = f.L, H = f.H, V = f.V;
        double worst_hidden = 0, last = 0, logits = 0, num = 0, den = 0;
        for (int s = 0; s < NSEQ; s++) {
            int T = f.s[s].T;
            for (int i = 1; i <= L; i++) {
                size_t o = (size_t)i * T * H;
                double e = tu_rel_err(b.s[s].hidden + o, f.s[s].hidden + o, (size_t)T * H);
                if (e > worst_hidden) worst_hidden = e;
                if (i == L && e > last) last = e;
            }
            double e = tu_rel_err(b.s[s].logits, f.s[s].logits, (size_t)T * V);
            if (e > logits) logits = e;
            for (size_t k = 0; k < (size_t)T * V; k++) { /* and pooled over the sequences */
                double dd = b.s[s].logits[k] - f.s[s].logits[k];
                num += dd * dd, den += (double)f.s[s].logits[k] * f.s[s].logits[k];
            }
        }
        size_t flips = 0;
        assert_int_equal(f.r.n, b.r.n);
        for (size_t i = 0; i < f.r.n; i++) flips += f.r.idx[i] != b.r.idx[i];
        print_message("%-9s bf16 vs f32: last hidden %.3g (HF %.3g), logits %.3g (HF %.3g), "
                      "worst hidden state %.3g, expert choices differing %zu of %zu\n",
                      ARCHS[a], last, HF_BF16_ERR[a][0], logits, HF_BF16_ERR[a][1], worst_hidden,
                      flips, f.r.n);
        assert_true(last <= HF_BF16_ERR[a][0]);
        assert_true(logits <= HF_BF16_ERR[a][1]);
        assert_true(sqrt(num / den) > 1e-5); /* BF16 was used at all */
        tm_free_run(&f);
        tm_free_run(&b);
    }
}

/* a float32 checkpoint under --precision bf16: its weights rounded at load,
 * the logits within BF16's error of the float32 run, and not equal to them */
static void test_f32_checkpoint(void **state) {
    (void)state;
    char d32[256];
    snprintf(d32, sizeof d32, "%s/%s-f32", FIX, ARCHS[1]);
    tm_run a, f;
    run_precision(&a, d32, MOE_PRECISION_BF16);
    run_precision(&f, d32, MOE_PRECISION_DEFAULT);
    for (int s = 0; s < NSEQ; s++) {
        double e = tu_rel_err(a.s[s].logits, f.s[s].logits, (size_t)a.s[s].T * a.V);
        assert_true(e > 1e-6 && e < 3e-2);
    }
    tm_free_run(&a);
    tm_free_run(&f);
}

/* cpu-ref has no BF16 compute: a clear error, not a silent float32 run */
static void test_refused(void **state) {
    (void)state;
    char dir[256];
    snprintf(dir, sizeof dir, "%s/%s-bf16", FIX, ARCHS[0]);
    moe_model_opts o = {.device = "cpu-ref", .precision = MOE_PRECISION_BF16};
    moe_error_clear();
    assert_null(moe_model_open(dir, &o));
    assert_non_null(strstr(moe_error(), "bf16"));
    assert_int_equal(moe_precision_parse("bf16"), MOE_PRECISION_BF16);
    assert_int_equal(moe_precision_parse("f32"), MOE_PRECISION_F32);
    assert_int_equal(moe_precision_parse("fp16"), -1);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_matmul_reference),     cmocka_unit_test(test_portable_rows_threads),
        cmocka_unit_test(test_experts),              cmocka_unit_test(test_fixture_models),
        cmocka_unit_test(test_f32_checkpoint),       cmocka_unit_test(test_refused),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
