/* test_backward.c - the CPU backward ops of kernels.h ("backward" section).
 *
 * Each op's gradient of a scalar L = <r, f(x)> (r random) against central
 * finite differences of a double-precision re-implementation of the forward
 * written here (so a wrong formula in cpu.c cannot agree with itself), on
 * small random shapes: odd sizes, T = 1, GQA, K = 1 routers, both router
 * modes and every renorm, ignored targets.  Every gradient check also
 * asserts that the negated gradient would have been rejected.  Then: the
 * accumulate (+=) and "written" semantics, NULL gradients skipped,
 * "cpu" vs "cpu-ref" (plain loops) and "cpu-bf16", bits across thread
 * counts, AdamW against numbers from torch.optim.AdamW and the router
 * against torch autograd (tests/ref/backward_golden.py -> backward_golden.h). */
#include "kernels.h"
#include "testutil.h"

#include "backward_golden.h"

static uint64_t rng = 0x9e3779b97f4a7c15ULL;
static float *rand_vec(size_t n) { return tu_rand_vec(&rng, n); }
static float *zeros(size_t n) { return calloc(n ? n : 1, sizeof(float)); }
static float *dup(const float *x, size_t n) {
    float *y = malloc((n ? n : 1) * sizeof(float));
    memcpy(y, x, n * sizeof(float));
    return y;
}
static double *to_d(const float *x, size_t n) {
    double *y = malloc((n ? n : 1) * sizeof(double));
    for (size_t i = 0; i < n; i++) y[i] = x[i];
    return y;
}
static double dotd(const double *a, const double *b, size_t n) {
    double s = 0;
    for (size_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}
static double sigm(double z) { return 1.0 / (1.0 + exp(-z)); }

/* ---- finite differences ------------------------------------------------- */

typedef double (*loss_fn)(void *ctx);

/* dL/dx_i by central differences, x one of the double arrays f reads */
static double *fd_grad(double *x, size_t n, loss_fn f, void *ctx) {
    double *g = malloc((n ? n : 1) * sizeof(double));
    for (size_t i = 0; i < n; i++) {
        double xi = x[i], h = 1e-6 * (fabs(xi) > 1 ? fabs(xi) : 1);
        x[i] = xi + h;
        double lp = f(ctx);
        x[i] = xi - h;
        double lm = f(ctx);
        x[i] = xi;
        g[i] = (lp - lm) / (2 * h);
    }
    return g;
}

/* ||sign·g − ref|| / ||ref|| */
static double rel_err_d(const float *g, const double *ref, size_t n, double sign) {
    double d = 0, r = 0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(g[i])) return INFINITY;
        double e = sign * g[i] - ref[i];
        d += e * e;
        r += ref[i] * ref[i];
    }
    return r > 0 ? sqrt(d / r) : sqrt(d);
}

/* g (the op's gradient) within 1e-4 of the finite differences, and the check
 * able to fail: the same gradient negated is rejected.  A gradient that is
 * zero by construction (fd all 0) must come out (nearly) zero. */
static void check_grad(const char *what, const float *g, const double *fd, size_t n) {
    double nrm = sqrt(dotd(fd, fd, n));
    double e = rel_err_d(g, fd, n, 1.0), neg = rel_err_d(g, fd, n, -1.0);
    if (nrm < 1e-9) {
        if (e > 1e-6) print_message("%s: expected a zero gradient, |g| = %.3g\n", what, e);
        assert_true(e <= 1e-6);
        return;
    }
    if (e >= 1e-4) print_message("%s: rel err %.3g against finite differences\n", what, e);
    assert_true(e < 1e-4);
    assert_true(neg > 1e-4); /* a sign error would have been caught */
}

/* a·(1) + b == c within float rounding: the op added into pre-filled b */
static void check_accumulated(const float *c, const float *b, const float *a, size_t n) {
    for (size_t i = 0; i < n; i++) {
        double want = (double)a[i] + b[i];
        assert_true(fabs(c[i] - want) <= 1e-5 * (fabs(want) + fabs(a[i]) + 1e-3));
    }
}

/* ---- matmul --------------------------------------------------------------- */

typedef struct {
    int T, K, N;
    double *x, *w, *b, *r;
} mm_ctx;
static double mm_loss(void *p) {
    mm_ctx *c = p;
    double L = 0;
    for (int t = 0; t < c->T; t++)
        for (int n = 0; n < c->N; n++)
            L += c->r[t * c->N + n] * (dotd(c->x + t * c->K, c->w + n * c->K, c->K) + c->b[n]);
    return L;
}

static void one_matmul(const moe_backend *be, int T, int K, int N) {
    float *x = rand_vec((size_t)T * K), *w = rand_vec((size_t)N * K), *b = rand_vec(N);
    float *r = rand_vec((size_t)T * N);
    mm_ctx c = {T, K, N, to_d(x, (size_t)T * K), to_d(w, (size_t)N * K), to_d(b, N),
                to_d(r, (size_t)T * N)};
    float *dx = zeros((size_t)T * K), *dw = zeros((size_t)N * K), *db = zeros(N);
    be->matmul_backward(dx, dw, db, r, x, w, T, K, N);
    double *gx = fd_grad(c.x, (size_t)T * K, mm_loss, &c), *gw = fd_grad(c.w, (size_t)N * K, mm_loss, &c);
    double *gb = fd_grad(c.b, N, mm_loss, &c);
    check_grad("matmul dx", dx, gx, (size_t)T * K);
    check_grad("matmul dw", dw, gw, (size_t)N * K);
    check_grad("matmul dbias", db, gb, N);
    /* accumulate into pre-filled gradients; NULL ones skipped */
    float *bx = rand_vec((size_t)T * K), *bw = rand_vec((size_t)N * K), *bb = rand_vec(N);
    float *ax = dup(bx, (size_t)T * K), *aw = dup(bw, (size_t)N * K), *ab = dup(bb, N);
    be->matmul_backward(ax, aw, ab, r, x, w, T, K, N);
    check_accumulated(ax, bx, dx, (size_t)T * K);
    check_accumulated(aw, bw, dw, (size_t)N * K);
    check_accumulated(ab, bb, db, N);
    memcpy(ax, bx, sizeof(float) * T * K);
    be->matmul_backward(ax, NULL, NULL, r, x, w, T, K, N);
    check_accumulated(ax, bx, dx, (size_t)T * K);
    memcpy(aw, bw, sizeof(float) * N * K);
    be->matmul_backward(NULL, aw, NULL, r, x, w, T, K, N);
    check_accumulated(aw, bw, dw, (size_t)N * K);
    free(x), free(w), free(b), free(r), free(dx), free(dw), free(db), free(gx), free(gw), free(gb);
    free(bx), free(bw), free(bb), free(ax), free(aw), free(ab);
    free(c.x), free(c.w), free(c.b), free(c.r);
}

static void test_matmul_backward(void **state) {
    (void)state;
    const moe_backend *tabs[2] = {moe_backend_cpu(), moe_backend_cpu_ref()};
    int shapes[][3] = {{1, 1, 1}, {1, 5, 3}, {7, 13, 9}, {5, 33, 2}};
    for (int b = 0; b < 2; b++)
        for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
            one_matmul(tabs[b], shapes[s][0], shapes[s][1], shapes[s][2]);
}

/* the tiled sgemm version against the plain loops, at shapes that cross every
 * tile edge (rows 256, columns 512, weight-row chunks 1024); "cpu-bf16" gives
 * the bits of "cpu" on the widened weights */
static void test_matmul_backward_tiles(void **state) {
    (void)state;
    const moe_backend *cpu = moe_backend_cpu(), *ref = moe_backend_cpu_ref();
    const moe_backend *bf = moe_backend_cpu_bf16();
    int T = 257, K = 513, N = 1025;
    float *x = rand_vec((size_t)T * K), *w = rand_vec((size_t)N * K), *dy = rand_vec((size_t)T * N);
    uint16_t *wb = malloc(sizeof(uint16_t) * N * K);
    bf->to_weight_dtype(wb, w, (size_t)N * K);
    for (size_t i = 0; i < (size_t)N * K; i++) w[i] = moe_bf16_to_f32(wb[i]);
    float *g[3][3];
    const moe_backend *tabs[3] = {cpu, ref, bf};
    const void *ws[3] = {w, w, wb};
    for (int b = 0; b < 3; b++) {
        g[b][0] = zeros((size_t)T * K), g[b][1] = zeros((size_t)N * K), g[b][2] = zeros(N);
        tabs[b]->matmul_backward(g[b][0], g[b][1], g[b][2], dy, x, ws[b], T, K, N);
    }
    assert_true(tu_rel_err(g[0][0], g[1][0], (size_t)T * K) < 1e-5);
    assert_true(tu_rel_err(g[0][1], g[1][1], (size_t)N * K) < 1e-5);
    assert_true(tu_rel_err(g[0][2], g[1][2], N) < 1e-6);
    assert_memory_equal(g[0][0], g[2][0], sizeof(float) * T * K);
    assert_memory_equal(g[0][1], g[2][1], sizeof(float) * N * K);
    assert_memory_equal(g[0][2], g[2][2], sizeof(float) * N);
    for (int b = 0; b < 3; b++) free(g[b][0]), free(g[b][1]), free(g[b][2]);
    free(x), free(w), free(dy), free(wb);
}

/* ---- RMSNorm, RoPE ---------------------------------------------------------- */

typedef struct {
    int T, C;
    double eps, *x, *w, *r;
} rms_ctx;
static double rms_loss(void *p) {
    rms_ctx *c = p;
    double L = 0;
    for (int t = 0; t < c->T; t++) {
        const double *x = c->x + t * c->C;
        double inv = 1.0 / sqrt(dotd(x, x, c->C) / c->C + c->eps);
        for (int i = 0; i < c->C; i++) L += c->r[t * c->C + i] * c->w[i] * x[i] * inv;
    }
    return L;
}

static void test_rmsnorm_backward(void **state) {
    (void)state;
    const moe_backend *be = moe_backend_cpu();
    int shapes[][2] = {{1, 5}, {1, 2}, {4, 64}, {3, 67}}; /* C = 1 is a sign function */
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int T = shapes[s][0], C = shapes[s][1];
        size_t n = (size_t)T * C;
        float *x = rand_vec(n), *w = rand_vec(C), *r = rand_vec(n);
        rms_ctx c = {T, C, 1e-6, to_d(x, n), to_d(w, C), to_d(r, n)};
        float *dx = zeros(n), *dw = zeros(C);
        be->rmsnorm_backward(dx, dw, r, x, w, 1e-6f, T, C);
        double *gx = fd_grad(c.x, n, rms_loss, &c), *gw = fd_grad(c.w, C, rms_loss, &c);
        check_grad("rmsnorm dx", dx, gx, n);
        check_grad("rmsnorm dw", dw, gw, C);
        float *bx = rand_vec(n), *bw = rand_vec(C), *ax = dup(bx, n), *aw = dup(bw, C);
        be->rmsnorm_backward(ax, aw, r, x, w, 1e-6f, T, C);
        check_accumulated(ax, bx, dx, n);
        check_accumulated(aw, bw, dw, C);
        memcpy(ax, bx, sizeof(float) * n);
        be->rmsnorm_backward(ax, NULL, r, x, w, 1e-6f, T, C);
        check_accumulated(ax, bx, dx, n);
        free(x), free(w), free(r), free(dx), free(dw), free(gx), free(gw), free(bx), free(bw);
        free(ax), free(aw), free(c.x), free(c.w), free(c.r);
    }
}

typedef struct {
    int T, nh, D, pos0;
    float theta;
    double *x, *r;
} rope_ctx;
static double rope_loss(void *p) {
    rope_ctx *c = p;
    int half = c->D / 2;
    double L = 0;
    for (int t = 0; t < c->T; t++)
        for (int j = 0; j < half; j++) {
            /* the angle as the op forms it (float), rotated in double */
            float inv = 1.0f / (float)pow((double)c->theta, (double)((float)(2 * j) / (float)c->D));
            double a = (float)(c->pos0 + t) * inv;
            for (int h = 0; h < c->nh; h++) {
                size_t o = ((size_t)t * c->nh + h) * c->D;
                double x0 = c->x[o + j], x1 = c->x[o + j + half];
                L += c->r[o + j] * (x0 * cos(a) - x1 * sin(a));
                L += c->r[o + j + half] * (x1 * cos(a) + x0 * sin(a));
            }
        }
    return L;
}

static void test_rope_backward(void **state) {
    (void)state;
    const moe_backend *be = moe_backend_cpu();
    int shapes[][3] = {{1, 1, 2}, {5, 3, 8}, {4, 2, 6}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int T = shapes[s][0], nh = shapes[s][1], D = shapes[s][2];
        size_t n = (size_t)T * nh * D;
        float *x = rand_vec(n), *r = rand_vec(n);
        rope_ctx c = {T, nh, D, 7, 10000.0f, to_d(x, n), to_d(r, n)};
        float *d = dup(r, n);
        be->rope_backward(d, 10000.0f, 7, T, nh, D);
        double *g = fd_grad(c.x, n, rope_loss, &c);
        check_grad("rope", d, g, n);
        /* and it inverts the forward */
        be->rope(d, 10000.0f, 7, T, nh, D);
        assert_true(tu_rel_err(d, r, n) < 1e-6);
        free(x), free(r), free(d), free(g), free(c.x), free(c.r);
    }
}

/* ---- attention ---------------------------------------------------------------- */

typedef struct {
    int T, nh, nkv, D;
    double scale, *q, *k, *v, *r;
} att_ctx;
static double att_loss(void *p) {
    att_ctx *c = p;
    int rep = c->nh / c->nkv, D = c->D;
    double *s = malloc(sizeof(double) * c->T), L = 0;
    for (int h = 0; h < c->nh; h++)
        for (int i = 0; i < c->T; i++) {
            const double *qi = c->q + ((size_t)i * c->nh + h) * D;
            double mx = -INFINITY, sum = 0;
            for (int j = 0; j <= i; j++) {
                s[j] = c->scale * dotd(qi, c->k + ((size_t)j * c->nkv + h / rep) * D, D);
                if (s[j] > mx) mx = s[j];
            }
            for (int j = 0; j <= i; j++) sum += s[j] = exp(s[j] - mx);
            for (int j = 0; j <= i; j++) {
                const double *vj = c->v + ((size_t)j * c->nkv + h / rep) * D;
                L += s[j] / sum * dotd(c->r + ((size_t)i * c->nh + h) * D, vj, D);
            }
        }
    free(s);
    return L;
}

static void one_attention(const moe_backend *be, int T, int nh, int nkv, int D) {
    size_t nq = (size_t)T * nh * D, nk = (size_t)T * nkv * D;
    float scale = 1.0f / sqrtf((float)D);
    float *q = rand_vec(nq), *k = rand_vec(nk), *v = rand_vec(nk), *r = rand_vec(nq);
    for (size_t i = 0; i < nq; i++) q[i] *= 2.0f; /* peakier softmax */
    float *out = zeros(nq), *dq = zeros(nq), *dk = zeros(nk), *dv = zeros(nk);
    be->attention(out, q, k, v, scale, T, nh, nkv, D);
    be->attention_backward(dq, dk, dv, r, q, k, v, out, scale, T, nh, nkv, D);
    att_ctx c = {T, nh, nkv, D, scale, to_d(q, nq), to_d(k, nk), to_d(v, nk), to_d(r, nq)};
    double *gq = fd_grad(c.q, nq, att_loss, &c), *gk = fd_grad(c.k, nk, att_loss, &c);
    double *gv = fd_grad(c.v, nk, att_loss, &c);
    check_grad("attention dq", dq, gq, nq);
    check_grad("attention dk", dk, gk, nk);
    check_grad("attention dv", dv, gv, nk);
    float *bq = rand_vec(nq), *bk = rand_vec(nk), *bv = rand_vec(nk);
    float *aq = dup(bq, nq), *ak = dup(bk, nk), *av = dup(bv, nk);
    be->attention_backward(aq, ak, av, r, q, k, v, out, scale, T, nh, nkv, D);
    check_accumulated(aq, bq, dq, nq);
    check_accumulated(ak, bk, dk, nk);
    check_accumulated(av, bv, dv, nk);
    free(q), free(k), free(v), free(r), free(out), free(dq), free(dk), free(dv);
    free(gq), free(gk), free(gv), free(bq), free(bk), free(bv), free(aq), free(ak), free(av);
    free(c.q), free(c.k), free(c.v), free(c.r);
}

static void test_attention_backward(void **state) {
    (void)state;
    const moe_backend *tabs[2] = {moe_backend_cpu(), moe_backend_cpu_ref()};
    /* T = 1; MHA; GQA 2 and 4; odd D; more queries than one block of 64 */
    int shapes[][4] = {{1, 2, 1, 4}, {6, 3, 3, 5}, {5, 2, 1, 4}, {7, 8, 2, 3}, {70, 2, 1, 4}};
    for (int b = 0; b < 2; b++)
        for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
            one_attention(tabs[b], shapes[s][0], shapes[s][1], shapes[s][2], shapes[s][3]);
}

/* blocked sgemm version against the plain loops, several query blocks */
static void test_attention_backward_vs_ref(void **state) {
    (void)state;
    const moe_backend *cpu = moe_backend_cpu(), *ref = moe_backend_cpu_ref();
    int T = 150, D = 16, heads[][2] = {{4, 4}, {4, 1}, {6, 3}};
    for (int s = 0; s < 3; s++) {
        int nh = heads[s][0], nkv = heads[s][1];
        size_t nq = (size_t)T * nh * D, nk = (size_t)T * nkv * D;
        float *q = rand_vec(nq), *k = rand_vec(nk), *v = rand_vec(nk), *r = rand_vec(nq);
        float *out = zeros(nq), *g[2][3];
        cpu->attention(out, q, k, v, 0.3f, T, nh, nkv, D);
        const moe_backend *tabs[2] = {cpu, ref};
        for (int b = 0; b < 2; b++) {
            g[b][0] = zeros(nq), g[b][1] = zeros(nk), g[b][2] = zeros(nk);
            tabs[b]->attention_backward(g[b][0], g[b][1], g[b][2], r, q, k, v, out, 0.3f, T, nh, nkv,
                                        D);
        }
        assert_true(tu_rel_err(g[0][0], g[1][0], nq) < 1e-5);
        assert_true(tu_rel_err(g[0][1], g[1][1], nk) < 1e-5);
        assert_true(tu_rel_err(g[0][2], g[1][2], nk) < 1e-5);
        for (int b = 0; b < 2; b++) free(g[b][0]), free(g[b][1]), free(g[b][2]);
        free(q), free(k), free(v), free(r), free(out);
    }
}

/* ---- element-wise ----------------------------------------------------------- */

typedef struct {
    int T, I;
    double *gu, *r;
} swi_ctx;
static double swi_loss(void *p) {
    swi_ctx *c = p;
    double L = 0;
    for (int t = 0; t < c->T; t++)
        for (int i = 0; i < c->I; i++) {
            double g = c->gu[(size_t)t * 2 * c->I + i], u = c->gu[(size_t)t * 2 * c->I + c->I + i];
            L += c->r[t * c->I + i] * g * sigm(g) * u;
        }
    return L;
}

static void test_swiglu_backward(void **state) {
    (void)state;
    const moe_backend *be = moe_backend_cpu();
    int shapes[][2] = {{1, 1}, {3, 7}, {4, 16}};
    for (int s = 0; s < 3; s++) {
        int T = shapes[s][0], I = shapes[s][1];
        size_t n = (size_t)T * 2 * I;
        float *gu = rand_vec(n), *r = rand_vec((size_t)T * I);
        for (size_t i = 0; i < n; i++) gu[i] *= 3.0f;
        swi_ctx c = {T, I, to_d(gu, n), to_d(r, (size_t)T * I)};
        float *d = zeros(n);
        be->swiglu_backward(d, r, gu, T, I);
        double *g = fd_grad(c.gu, n, swi_loss, &c);
        check_grad("swiglu", d, g, n);
        float *b = rand_vec(n), *a = dup(b, n);
        be->swiglu_backward(a, r, gu, T, I);
        check_accumulated(a, b, d, n);
        free(gu), free(r), free(d), free(g), free(b), free(a), free(c.gu), free(c.r);
    }
}

typedef struct {
    int T, C;
    double *x, *z, *r;
} gate_ctx;
static double gate_loss(void *p) {
    gate_ctx *c = p;
    double L = 0;
    for (int t = 0; t < c->T; t++) L += sigm(c->z[t]) * dotd(c->r + t * c->C, c->x + t * c->C, c->C);
    return L;
}

static void test_sigmoid_gate_backward(void **state) {
    (void)state;
    const moe_backend *be = moe_backend_cpu();
    int shapes[][2] = {{1, 1}, {5, 9}};
    for (int s = 0; s < 2; s++) {
        int T = shapes[s][0], C = shapes[s][1];
        size_t n = (size_t)T * C;
        float *x = rand_vec(n), *z = rand_vec(T), *r = rand_vec(n);
        gate_ctx c = {T, C, to_d(x, n), to_d(z, T), to_d(r, n)};
        float *dx = zeros(n), *dz = zeros(T);
        be->sigmoid_gate_add_backward(dx, dz, r, x, z, T, C);
        double *gx = fd_grad(c.x, n, gate_loss, &c), *gz = fd_grad(c.z, T, gate_loss, &c);
        check_grad("sigmoid gate dx", dx, gx, n);
        check_grad("sigmoid gate dz", dz, gz, T);
        float *bx = rand_vec(n), *bz = rand_vec(T), *ax = dup(bx, n), *az = dup(bz, T);
        be->sigmoid_gate_add_backward(ax, az, r, x, z, T, C);
        check_accumulated(ax, bx, dx, n);
        check_accumulated(az, bz, dz, T);
        memcpy(az, bz, sizeof(float) * T);
        be->sigmoid_gate_add_backward(NULL, az, r, x, z, T, C);
        check_accumulated(az, bz, dz, T);
        memcpy(ax, bx, sizeof(float) * n);
        be->sigmoid_gate_add_backward(ax, NULL, r, x, z, T, C);
        check_accumulated(ax, bx, dx, n);
        free(x), free(z), free(r), free(dx), free(dz), free(gx), free(gz), free(bx), free(bz);
        free(ax), free(az), free(c.x), free(c.z), free(c.r);
    }
}

/* ---- routing ----------------------------------------------------------------- */

typedef struct {
    int T, K, H;
    const int32_t *slot;
    double *out, *wt, *r;
} comb_ctx;
static double comb_loss(void *p) {
    comb_ctx *c = p;
    double L = 0;
    for (int t = 0; t < c->T; t++)
        for (int k = 0; k < c->K; k++)
            L += c->wt[t * c->K + k] * dotd(c->r + t * c->H, c->out + (size_t)c->slot[t * c->K + k] * c->H, c->H);
    return L;
}

static void test_combine_backward(void **state) {
    (void)state;
    const moe_backend *be = moe_backend_cpu();
    int shapes[][3] = {{1, 1, 3}, {4, 3, 5}};
    for (int s = 0; s < 2; s++) {
        int T = shapes[s][0], K = shapes[s][1], H = shapes[s][2], n = T * K;
        int32_t *slot = malloc(sizeof(int32_t) * n);
        for (int i = 0; i < n; i++) slot[i] = (i * 7 + 3) % n; /* a permutation (n = 1, 12) */
        float *out = rand_vec((size_t)n * H), *wt = rand_vec(n), *r = rand_vec((size_t)T * H);
        comb_ctx c = {T, K, H, slot, to_d(out, (size_t)n * H), to_d(wt, n), to_d(r, (size_t)T * H)};
        float *dout = rand_vec((size_t)n * H), *dwt = rand_vec(n); /* written: garbage before */
        be->combine_backward(dout, dwt, r, out, slot, wt, T, K, H);
        double *go = fd_grad(c.out, (size_t)n * H, comb_loss, &c), *gw = fd_grad(c.wt, n, comb_loss, &c);
        check_grad("combine dout", dout, go, (size_t)n * H);
        check_grad("combine dwt", dwt, gw, n);
        float *d2 = zeros(n);
        be->combine_backward(NULL, d2, r, out, slot, wt, T, K, H);
        assert_memory_equal(d2, dwt, sizeof(float) * n);
        free(slot), free(out), free(wt), free(r), free(dout), free(dwt), free(go), free(gw), free(d2);
        free(c.out), free(c.wt), free(c.r);
    }
}

typedef struct {
    int T, E, K, mode, renorm;
    const int32_t *idx;
    double *l, *r, *rp; /* rp: weights of the probs term, or NULL */
} rt_ctx;
static double rt_loss(void *p) {
    rt_ctx *c = p;
    double L = 0, *pr = malloc(sizeof(double) * c->E);
    for (int t = 0; t < c->T; t++) {
        const double *l = c->l + t * c->E;
        const int32_t *ix = c->idx + t * c->K;
        double mx = -INFINITY, sum = 0, w[64], ws = 0;
        for (int e = 0; e < c->E; e++) mx = l[e] > mx ? l[e] : mx;
        for (int e = 0; e < c->E; e++) sum += pr[e] = exp(l[e] - mx);
        for (int e = 0; e < c->E; e++) pr[e] /= sum;
        if (c->mode == MOE_ROUTE_TOPK_SOFTMAX) { /* softmax of the selected logits */
            for (int k = 0; k < c->K; k++) ws += w[k] = exp(l[ix[k]] - mx);
            for (int k = 0; k < c->K; k++) w[k] /= ws;
        } else {
            for (int k = 0; k < c->K; k++) ws += w[k] = pr[ix[k]];
            if (c->renorm != MOE_RENORM_NONE)
                for (int k = 0; k < c->K; k++)
                    w[k] /= ws + (c->renorm == MOE_RENORM_SUM_EPS ? 1e-20 : 0.0);
        }
        for (int k = 0; k < c->K; k++) L += c->r[t * c->K + k] * w[k];
        if (c->rp) L += dotd(c->rp + t * c->E, pr, c->E);
    }
    free(pr);
    return L;
}

static void one_router(int mode, int renorm, int T, int E, int K, int with_probs) {
    const moe_backend *be = moe_backend_cpu();
    float *l = rand_vec((size_t)T * E), *r = rand_vec((size_t)T * K), *rp = rand_vec((size_t)T * E);
    for (size_t i = 0; i < (size_t)T * E; i++) l[i] *= 3.0f;
    int32_t *idx = malloc(sizeof(int32_t) * T * K);
    float *wt = zeros((size_t)T * K), *probs = zeros((size_t)T * E);
    be->router(idx, wt, probs, l, mode, renorm, T, E, K);
    float *dl = rand_vec((size_t)T * E); /* written: garbage before */
    be->router_backward(dl, r, with_probs ? rp : NULL, idx, wt, probs, mode, renorm, T, E, K);
    rt_ctx c = {T, E, K, mode, renorm, idx, to_d(l, (size_t)T * E), to_d(r, (size_t)T * K),
                with_probs ? to_d(rp, (size_t)T * E) : NULL};
    double *g = fd_grad(c.l, (size_t)T * E, rt_loss, &c);
    char what[96];
    snprintf(what, sizeof what, "router mode %d renorm %d T %d E %d K %d probs %d", mode, renorm, T,
             E, K, with_probs);
    check_grad(what, dl, g, (size_t)T * E);
    free(l), free(r), free(rp), free(idx), free(wt), free(probs), free(dl), free(g);
    free(c.l), free(c.r), free(c.rp);
}

static void test_router_backward(void **state) {
    (void)state;
    int shapes[][3] = {{1, 4, 1}, {3, 9, 3}, {5, 6, 2}, {2, 8, 8}};
    for (int mode = 0; mode < 2; mode++)
        for (int renorm = 0; renorm < 3; renorm++)
            for (int s = 0; s < 4; s++)
                for (int wp = 0; wp < 2; wp++)
                    one_router(mode, renorm, shapes[s][0], shapes[s][1], shapes[s][2], wp);
}

/* torch autograd through Hugging Face's routing code (softmax in fp32, topk,
 * renorm by the sum (+1e-20 for deepseek)): tests/ref/backward_golden.py */
static void test_router_backward_torch(void **state) {
    (void)state;
    const moe_backend *be = moe_backend_cpu();
    for (size_t c = 0; c < sizeof golden_router / sizeof golden_router[0]; c++) {
        const golden_router_case *g = &golden_router[c];
        int T = GR_T, E = GR_E, K = g->K;
        int32_t idx[GR_T * GR_E];
        float wt[GR_T * GR_E], probs[GR_T * GR_E], dl[GR_T * GR_E];
        be->router(idx, wt, probs, golden_router_logits, g->mode, g->renorm, T, E, K);
        be->router_backward(dl, golden_router_dwt, g->with_probs ? golden_router_dprobs : NULL,
                            idx, wt, probs, g->mode, g->renorm, T, E, K);
        assert_true(tu_rel_err(dl, g->dlogits, (size_t)T * E) < 1e-5);
        for (int i = 0; i < T * E; i++) dl[i] = -dl[i];
        assert_true(tu_rel_err(dl, g->dlogits, (size_t)T * E) > 1e-5);
    }
}

/* ---- embedding, loss ------------------------------------------------------- */

static void test_embed_backward(void **state) {
    (void)state;
    const moe_backend *be = moe_backend_cpu();
    int V = 7, H = 70, T = 9;
    int32_t ids[9] = {3, 0, 3, 6, 3, 1, 0, 6, 2}; /* repeats */
    float *dx = rand_vec((size_t)T * H), *b = rand_vec((size_t)V * H), *dE = dup(b, (size_t)V * H);
    be->embed_backward(dE, dx, ids, T, H);
    /* the gradient of Σ_t <dx_t, E[ids_t]> is linear: sum by hand, token order */
    for (int v = 0; v < V; v++)
        for (int c = 0; c < H; c++) {
            float want = b[v * H + c];
            for (int t = 0; t < T; t++)
                if (ids[t] == v) want += dx[t * H + c];
            assert_true(dE[v * H + c] == want);
        }
    float *before = dup(dE, (size_t)V * H);
    be->embed_backward(dE, dx, ids, 1, H); /* T = 1: row ids[0] = 3 only */
    for (int v = 0; v < V; v++)
        for (int c = 0; c < H; c++)
            assert_true(dE[v * H + c] == before[v * H + c] + (v == 3 ? dx[c] : 0.0f));
    free(before);
    free(dx), free(b), free(dE);
}

typedef struct {
    int T, V;
    const int32_t *tg;
    double *l;
} ce_ctx;
static double ce_row(const double *l, int V, int tg) {
    double mx = -INFINITY, s = 0;
    for (int c = 0; c < V; c++) mx = l[c] > mx ? l[c] : mx;
    for (int c = 0; c < V; c++) s += exp(l[c] - mx);
    return mx + log(s) - l[tg];
}
static double ce_loss(void *p) { /* mean over the kept rows, as HF */
    ce_ctx *c = p;
    double L = 0;
    int n = 0;
    for (int t = 0; t < c->T; t++)
        if (c->tg[t] >= 0) L += ce_row(c->l + (size_t)t * c->V, c->V, c->tg[t]), n++;
    return L / n;
}

static void test_cross_entropy(void **state) {
    (void)state;
    const moe_backend *be = moe_backend_cpu();
    int T = 6, V = 37, n = 4;
    int32_t tg[6] = {5, -100, 0, 36, -100, 5};
    float *l = rand_vec((size_t)T * V), *loss = rand_vec(T), *dl = rand_vec((size_t)T * V);
    for (int i = 0; i < T * V; i++) l[i] *= 4.0f;
    be->cross_entropy(loss, dl, l, tg, 1.0f / n, T, V);
    ce_ctx c = {T, V, tg, to_d(l, (size_t)T * V)};
    for (int t = 0; t < T; t++) {
        double want = tg[t] < 0 ? 0.0 : ce_row(c.l + (size_t)t * V, V, tg[t]);
        assert_true(fabs(loss[t] - want) <= 1e-6 * (fabs(want) + 1));
    }
    double *g = fd_grad(c.l, (size_t)T * V, ce_loss, &c);
    check_grad("cross entropy", dl, g, (size_t)T * V);
    for (int c2 = 0; c2 < V; c2++) assert_true(dl[1 * V + c2] == 0.0f && dl[4 * V + c2] == 0.0f);
    /* loss only; and dlogits in place of logits */
    float *loss2 = zeros(T), *inplace = dup(l, (size_t)T * V);
    be->cross_entropy(loss2, NULL, l, tg, 1.0f / n, T, V);
    assert_memory_equal(loss2, loss, sizeof(float) * T);
    be->cross_entropy(loss2, inplace, inplace, tg, 1.0f / n, T, V);
    assert_memory_equal(inplace, dl, sizeof(float) * T * V);
    /* T = 1 */
    be->cross_entropy(loss2, dl, l, tg, 1.0f, 1, V);
    assert_true(fabs(loss2[0] - loss[0]) == 0);
    free(l), free(loss), free(dl), free(g), free(c.l), free(loss2), free(inplace);
}

/* ---- optimizer and helpers ------------------------------------------------ */

/* the steps of tests/ref/backward_golden.py through torch.optim.AdamW */
static void test_adamw_torch(void **state) {
    (void)state;
    const moe_backend *be = moe_backend_cpu();
    for (size_t c = 0; c < sizeof golden_adamw / sizeof golden_adamw[0]; c++) {
        const golden_adamw_case *a = &golden_adamw[c];
        float p[GA_N], m[GA_N] = {0}, v[GA_N] = {0};
        memcpy(p, golden_adamw_p0, sizeof p);
        for (int s = 0; s < GA_STEPS; s++)
            be->adamw(p, m, v, golden_adamw_grads[s], GA_N, a->lr, a->beta1, a->beta2, a->eps,
                      a->weight_decay, a->gscale, s + 1);
        /* torch's arithmetic reproduced operation for operation: the same bits */
        int same = 0;
        double moved = 0;
        for (int i = 0; i < GA_N; i++) {
            same += p[i] == a->p[i] && m[i] == a->m[i] && v[i] == a->v[i];
            if (!(p[i] == a->p[i] && m[i] == a->m[i] && v[i] == a->v[i]))
                print_message("adamw case %zu [%d]: p %a/%a m %a/%a v %a/%a\n", c, i, p[i], a->p[i],
                              m[i], a->m[i], v[i], a->v[i]);
            assert_true(fabsf(p[i] - a->p[i]) <= 1e-6f * (fabsf(a->p[i]) + 1e-3f));
            assert_true(fabsf(m[i] - a->m[i]) <= 1e-6f * fabsf(a->m[i]) + 1e-12f);
            assert_true(fabsf(v[i] - a->v[i]) <= 1e-6f * fabsf(a->v[i]) + 1e-15f);
            moved += fabs((double)p[i] - golden_adamw_p0[i]);
        }
        assert_int_equal(same, GA_N);
        assert_true(moved > 1e-6); /* the steps did something, so a no-op would fail */
    }
}

static void test_sumsq_to_weight(void **state) {
    (void)state;
    const moe_backend *be = moe_backend_cpu(), *bf = moe_backend_cpu_bf16();
    size_t n = 300001;
    float *x = rand_vec(n);
    double want = 0;
    for (size_t i = 0; i < n; i++) want += (double)x[i] * x[i];
    assert_true(fabs(be->sumsq(x, n) - want) <= 1e-12 * want);
    assert_true(be->sumsq(x, 0) == 0.0 && be->sumsq(x, 1) == (double)x[0] * x[0]);
    /* bf16: round to nearest even (ties: 1 + 2^-8 -> 1, 1 + 3·2^-8 -> 1 + 2^-6) */
    float t[4] = {1.0f + 0x1p-8f, 1.0f + 3 * 0x1p-8f, -2.5f, 1.0f + 0x1p-8f + 0x1p-20f};
    uint16_t h[4];
    bf->to_weight_dtype(h, t, 4);
    assert_true(moe_bf16_to_f32(h[0]) == 1.0f);
    assert_true(moe_bf16_to_f32(h[1]) == 1.0f + 0x1p-6f);
    assert_true(moe_bf16_to_f32(h[2]) == -2.5f);
    assert_true(moe_bf16_to_f32(h[3]) == 1.0f + 0x1p-7f);
    uint16_t *hb = malloc(sizeof(uint16_t) * n);
    bf->to_weight_dtype(hb, x, n);
    for (size_t i = 0; i < n; i++) assert_true(hb[i] == moe_f32_to_bf16(x[i]));
    float *y = zeros(n);
    be->to_weight_dtype(y, x, n);
    assert_memory_equal(y, x, sizeof(float) * n);
    free(x), free(hb), free(y);
}

/* ---- thread invariance -------------------------------------------------- */

/* every op that runs in parallel, once per thread count; all outputs
 * concatenated into out (n floats) */
static size_t run_all(float *out, int threads) {
    moe_kernels_set_threads(threads);
    const moe_backend *be = moe_backend_cpu();
    uint64_t saved = rng;
    rng = 12345;
    int T = 300, K = 600, N = 530, nh = 8, nkv = 2, D = 32, V = 3000, E = 16, KK = 4;
    float *x = rand_vec((size_t)T * K), *w = rand_vec((size_t)N * K), *dy = rand_vec((size_t)T * N);
    float *q = rand_vec((size_t)T * nh * D), *k = rand_vec((size_t)T * nkv * D);
    float *v = rand_vec((size_t)T * nkv * D), *lg = rand_vec((size_t)T * V);
    int32_t *tg = malloc(sizeof(int32_t) * T), *idx = malloc(sizeof(int32_t) * T * KK);
    for (int t = 0; t < T; t++) tg[t] = (t * 37) % V;
    size_t o = 0;
    /* matmul */
    be->matmul_backward(out + o, out + o + (size_t)T * K, out + o + (size_t)T * K + (size_t)N * K, dy,
                        x, w, T, K, N);
    o += (size_t)T * K + (size_t)N * K + N;
    uint16_t *wb = malloc(sizeof(uint16_t) * N * K); /* cpu-bf16: BF16 weight */
    moe_backend_cpu_bf16()->to_weight_dtype(wb, w, (size_t)N * K);
    moe_backend_cpu_bf16()->matmul_backward(out + o, NULL, NULL, dy, x, wb, T, K, N);
    o += (size_t)T * K;
    free(wb);
    /* attention (out: the forward's) */
    float *ao = zeros((size_t)T * nh * D);
    be->attention(ao, q, k, v, 0.2f, T, nh, nkv, D);
    be->attention_backward(out + o, out + o + (size_t)T * nh * D,
                           out + o + (size_t)T * nh * D + (size_t)T * nkv * D, q, q, k, v, ao, 0.2f,
                           T, nh, nkv, D);
    o += (size_t)T * nh * D + 2 * (size_t)T * nkv * D;
    /* rmsnorm with its weight gradient; embedding; loss; router; sumsq */
    be->rmsnorm_backward(out + o, out + o + (size_t)T * K, x, x, w, 1e-6f, T, K);
    o += (size_t)T * K + K;
    be->embed_backward(out + o, x, tg, T, K); /* a [V, K] table */
    o += (size_t)V * K;
    be->cross_entropy(out + o, out + o + T, lg, tg, 0.01f, T, V);
    o += T + (size_t)T * V;
    float *wt = zeros((size_t)T * KK), *pr = zeros((size_t)T * E);
    be->router(idx, wt, pr, lg, MOE_ROUTE_SOFTMAX_TOPK, MOE_RENORM_SUM, T, E, KK);
    be->router_backward(out + o, dy, lg, idx, wt, pr, MOE_ROUTE_SOFTMAX_TOPK, MOE_RENORM_SUM, T, E, KK);
    o += (size_t)T * E;
    double ss = be->sumsq(lg, (size_t)T * V);
    memcpy(out + o, &ss, sizeof ss);
    o += 2;
    free(x), free(w), free(dy), free(q), free(k), free(v), free(lg), free(tg), free(idx), free(ao);
    free(wt), free(pr);
    rng = saved;
    moe_kernels_set_threads(0);
    return o;
}

static void test_thread_invariance(void **state) {
    (void)state;
    size_t n = 8 << 20;
    float *a = calloc(n, sizeof(float)), *b = calloc(n, sizeof(float));
    size_t na = run_all(a, 1), nb = run_all(b, 2);
    assert_true(na == nb && na < n);
    assert_memory_equal(a, b, na * sizeof(float));
    float *c = calloc(n, sizeof(float));
    run_all(c, 3);
    assert_memory_equal(a, c, na * sizeof(float));
    free(a), free(b), free(c);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_matmul_backward),
        cmocka_unit_test(test_matmul_backward_tiles),
        cmocka_unit_test(test_rmsnorm_backward),
        cmocka_unit_test(test_rope_backward),
        cmocka_unit_test(test_attention_backward),
        cmocka_unit_test(test_attention_backward_vs_ref),
        cmocka_unit_test(test_swiglu_backward),
        cmocka_unit_test(test_sigmoid_gate_backward),
        cmocka_unit_test(test_combine_backward),
        cmocka_unit_test(test_router_backward),
        cmocka_unit_test(test_router_backward_torch),
        cmocka_unit_test(test_embed_backward),
        cmocka_unit_test(test_cross_entropy),
        cmocka_unit_test(test_adamw_torch),
        cmocka_unit_test(test_sumsq_to_weight),
        cmocka_unit_test(test_thread_invariance),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
