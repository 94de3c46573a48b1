/* test_model_device.c - the model's device path without a GPU.
 *
 * lib/model.c takes another path for a backend whose memory is not host
 * memory (host_memory 0: weights converted and uploaded, activations
 * downloaded) and whose weights are BF16, as with CUDA.  Here that path runs
 * on an emulated device: CPU ops on memory in one arena that is PROT_NONE
 * except while a backend op runs, so any host access to backend memory
 * outside the interface crashes the test; its matmul rounds activations and
 * weights to BF16 like the CUDA backend.  The whole forward (five
 * architectures, F32/BF16 checkpoints) must match the CPU backend within the
 * tolerance the GPU parity test uses (2e-2), and the routing observer must
 * see the same experts as far as BF16 rounding allows.
 *
 * The emulator is handed to the model by wrapping moe_backend_get at link
 * time (Makefile: -Wl,--wrap=moe_backend_get for this binary only):
 * device "cuda-emu" is this backend, every other name the real one. */
#include <sys/mman.h>

#include "kernels.h"
#include "testmodel.h"

/* ---- the emulated device ---------------------------------------------------------- */

#define ARENA_BYTES ((size_t)8 << 30) /* reserved, not committed */
static unsigned char *arena;
static size_t arena_used;
static const moe_backend *cpu;
static long n_ops;

static void dev_open(void) {
    if (arena_used && mprotect(arena, arena_used, PROT_READ | PROT_WRITE) != 0) abort();
    n_ops++;
}
static void dev_close(void) {
    if (arena_used && mprotect(arena, arena_used, PROT_NONE) != 0) abort();
}

/* bump allocation, 64-byte aligned, with the size in front; freed blocks are
 * not reused (the fixtures are tiny), their pages are given back */
static void *e_alloc(size_t n) {
    size_t need = ((n + 64 + 4095) / 4096) * 4096;
    if (arena_used + need > ARENA_BYTES) {
        fprintf(stderr, "emulated device: arena exhausted\n");
        abort();
    }
    unsigned char *p = arena + arena_used;
    arena_used += need;
    dev_open();
    memcpy(p, &need, sizeof need);
    dev_close();
    return p + 64;
}
static void e_free(void *p) {
    if (!p) return;
    dev_open();
    size_t need;
    memcpy(&need, (unsigned char *)p - 64, sizeof need);
    memset((unsigned char *)p - 64, 0xA5, need); /* use after free reads garbage */
    dev_close();
}
static void e_upload(void *d, const void *s, size_t n) { dev_open(); if (n) memcpy(d, s, n); dev_close(); }
static void e_download(void *d, const void *s, size_t n) { dev_open(); if (n) memcpy(d, s, n); dev_close(); }
static void e_copy(void *d, const void *s, size_t n) { dev_open(); if (n) memmove(d, s, n); dev_close(); }
static void e_zero(void *d, size_t n) { dev_open(); memset(d, 0, n); dev_close(); }
static void e_sync(void) {}

static void e_matmul(float *y, const float *x, const void *w, const float *bias, int T, int K, int N,
                     int acc) {
    dev_open();
    size_t nx = (size_t)T * K, nw = (size_t)N * K;
    float *xr = malloc(sizeof(float) * (nx + 1)), *wf = malloc(sizeof(float) * (nw + 1));
    for (size_t i = 0; i < nx; i++) xr[i] = moe_bf16_to_f32(moe_f32_to_bf16(x[i]));
    for (size_t i = 0; i < nw; i++) wf[i] = moe_bf16_to_f32(((const uint16_t *)w)[i]);
    cpu->matmul(y, xr, wf, bias, T, K, N, acc);
    free(xr), free(wf);
    dev_close();
}
#define WRAP(name, params, args) \
    static void e_##name params { dev_open(); cpu->name args; dev_close(); }
WRAP(rmsnorm, (float *y, const float *x, const float *w, float eps, int T, int C), (y, x, w, eps, T, C))
WRAP(rope, (float *x, float th, int p0, int T, int nh, int D), (x, th, p0, T, nh, D))
WRAP(attention, (float *o, const float *q, const float *k, const float *v, float s, int T, int nh, int nkv, int D),
     (o, q, k, v, s, T, nh, nkv, D))
WRAP(swiglu, (float *h, const float *gu, int T, int Im), (h, gu, T, Im))
WRAP(axpy, (float *y, const float *x, float a, size_t n), (y, x, a, n))
WRAP(sigmoid_gate_add, (float *y, const float *x, const float *z, int T, int C), (y, x, z, T, C))
WRAP(router, (int32_t *i, float *w, float *p, const float *l, int m, int r, int T, int E, int K),
     (i, w, p, l, m, r, T, E, K))
WRAP(gather_rows, (float *d, const float *s, const int32_t *r, int n, int C), (d, s, r, n, C))
WRAP(scatter_add_rows, (float *d, const float *s, const int32_t *r, const float *sc, int n, int C),
     (d, s, r, sc, n, C))
WRAP(softmax_rows, (float *p, const float *x, int T, int C), (p, x, T, C))
WRAP(combine, (float *y, const float *o, const int32_t *sl, const float *wt, int T, int K, int H),
     (y, o, sl, wt, T, K, H))

/* Grouped experts from the emulated primitives (BF16 weights, inputs rounded
 * to BF16 as in e_matmul): gather, gate/up GEMM, SwiGLU, down GEMM. */
static void e_experts(float *out, const float *x, const int32_t *rows, const int32_t *off,
                      const void *const *w_gu, const void *const *w_down, int E, int H, int Im) {
    for (int e = 0; e < E; e++) {
        int n = off[e + 1] - off[e];
        if (!w_gu[e] || n <= 0) continue;
        float *xe = e_alloc(sizeof(float) * (size_t)n * H), *gu = e_alloc(sizeof(float) * (size_t)n * 2 * Im),
              *h = e_alloc(sizeof(float) * (size_t)n * Im);
        e_gather_rows(xe, x, rows + off[e], n, H);
        e_matmul(gu, xe, w_gu[e], NULL, n, H, 2 * Im, 0);
        e_swiglu(h, gu, n, Im);
        e_matmul(out + (size_t)off[e] * H, h, w_down[e], NULL, n, Im, H, 0);
        e_free(xe), e_free(gu), e_free(h);
    }
}
WRAP(divergence, (double *d, const float *a, const float *b, int m, int T, int C), (d, a, b, m, T, C))

static moe_backend emu;

const moe_backend *__real_moe_backend_get(const char *name);
const moe_backend *__wrap_moe_backend_get(const char *name);
const moe_backend *__wrap_moe_backend_get(const char *name) {
    if (name && !strcmp(name, "cuda-emu")) return &emu;
    return __real_moe_backend_get(name);
}

static int setup(void **state) {
    (void)state;
    arena = mmap(NULL, ARENA_BYTES, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (arena == MAP_FAILED) return -1;
    cpu = moe_backend_cpu();
    emu = (moe_backend){.name = "cuda-emu", .weight_dtype = MOE_WT_BF16, .alloc = e_alloc,
                        .free = e_free, .upload = e_upload, .download = e_download,
                        .copy = e_copy, .zero = e_zero, .sync = e_sync, .matmul = e_matmul,
                        .rmsnorm = e_rmsnorm, .rope = e_rope, .attention = e_attention,
                        .swiglu = e_swiglu, .axpy = e_axpy, .sigmoid_gate_add = e_sigmoid_gate_add,
                        .router = e_router, .gather_rows = e_gather_rows,
                        .scatter_add_rows = e_scatter_add_rows, .experts = e_experts,
                        .combine = e_combine, .softmax_rows = e_softmax_rows,
                        .divergence = e_divergence};
    return 0;
}

/* ---- the comparison -------------------------------------------------------------------- */

static void test_forward_on_emulated_device(void **state) {
    (void)state;
    int bad = 0;
    for (size_t a = 0; a < sizeof ARCHS / sizeof *ARCHS; a++)
        for (int d = 0; d < 2; d++) {
            char dir[256];
            snprintf(dir, sizeof dir, "%s/%s-%s", FIX, ARCHS[a], d ? "bf16" : "f32");
            tm_run c, e;
            tm_run_model(&c, dir, "cpu");
            long ops0 = n_ops;
            tm_run_model(&e, dir, "cuda-emu");
            double worst = 0;
            for (int s = 0; s < NSEQ; s++) {
                int T = c.s[s].T;
                double er = tu_rel_err(e.s[s].hidden, c.s[s].hidden, (size_t)(c.L + 1) * T * c.H);
                if (er > worst) worst = er;
                er = tu_rel_err(e.s[s].logits, c.s[s].logits, (size_t)T * c.V);
                if (er > worst) worst = er;
            }
            size_t same = 0;
            for (size_t i = 0; i < c.r.n && i < e.r.n; i++) same += c.r.idx[i] == e.r.idx[i];
            int ok = worst < 2e-2 && e.r.n == c.r.n && same * 100 >= c.r.n * 95;
            print_message("%-32s rel err %.2e, routing %zu/%zu same, %ld device ops%s\n", dir, worst,
                          same, c.r.n, n_ops - ops0, ok ? "" : "  <-- FAIL");
            bad += !ok;
            tm_free_run(&c), tm_free_run(&e);
        }
    assert_int_equal(bad, 0);
}

/* the per-layer API the search tools use, on the device path */
static void test_layer_api_on_emulated_device(void **state) {
    (void)state;
    const char *dir = FIX "/qwen2_moe-bf16";
    moe_model_opts o = {.device = "cuda-emu"};
    moe_model *m = moe_model_open(dir, &o);
    if (!m) fail_msg("%s", moe_error());
    const moe_config *c = moe_model_config(m);
    int H = c->hidden_size, T = 5, l = 1, E = c->n_routed_experts, K = c->top_k;
    int32_t ids[5] = {1, 2, 3, 4, 5};
    const moe_backend *be = moe_model_backend(m);
    float *x = moe_model_alloc(m, (size_t)T * H), *xn = moe_model_alloc(m, (size_t)T * H);
    float *y = moe_model_alloc(m, (size_t)T * H), *ye = moe_model_alloc(m, (size_t)T * H);
    assert_int_equal(moe_model_embed(m, x, ids, T), 0);
    assert_int_equal(moe_layer_load(m, l), 0);
    assert_int_equal(moe_layer_attention(m, l, x, T), 0);
    assert_int_equal(moe_layer_mlp_input(m, l, xn, x, T), 0);
    int32_t *idx = malloc(sizeof(int32_t) * T * K);
    float *wt = malloc(sizeof(float) * T * K), *probs = malloc(sizeof(float) * T * E);
    assert_int_equal(moe_layer_route(m, l, xn, T, idx, wt, probs), 0);
    for (int i = 0; i < T * K; i++) assert_true(idx[i] >= 0 && idx[i] < E);
    assert_int_equal(moe_layer_expert(m, l, idx[0], ye, xn, T), 0);
    assert_int_equal(moe_layer_shared(m, l, y, xn, T), 0);
    float *h = malloc(sizeof(float) * T * H);
    be->download(h, ye, sizeof(float) * T * H);
    double s = 0;
    for (int i = 0; i < T * H; i++) s += fabs(h[i]);
    assert_true(s > 0 && isfinite(s));
    moe_layer_unload(m, l);
    moe_model_free(m, x), moe_model_free(m, xn), moe_model_free(m, y), moe_model_free(m, ye);
    free(idx), free(wt), free(probs), free(h);
    moe_model_close(m);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_forward_on_emulated_device),
        cmocka_unit_test(test_layer_api_on_emulated_device),
    };
    return cmocka_run_group_tests(tests, setup, NULL);
}
