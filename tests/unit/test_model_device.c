/* test_model_device.c - the model's device path without a GPU.
 *
 * lib/model/ takes another path for a backend whose memory is not host
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
 * Asynchronous uploads (kernels.h: upload_async ...) are emulated as late
 * as the rules allow: a queued copy runs only at upload_wait (up to its
 * ticket) or upload_fence; until then its destination holds NaN bytes (so an
 * op that reads a weight before the fence poisons the results), and when it
 * runs, its source must still hold the bytes it had when queued (a staging
 * buffer overwritten or freed early is counted, as is a backend block freed
 * with a copy into it pending).  Tests run the model with tiny staging
 * buffers so that the ring wraps and pieces are split; results must be the
 * same bytes as with synchronous uploads and with the old f32 staging.
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
static void check_free(const void *p, size_t n);
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
    check_free(p, need - 64);
    memset((unsigned char *)p - 64, 0xA5, need); /* use after free reads garbage */
    dev_close();
}
static void e_upload(void *d, const void *s, size_t n) { dev_open(); if (n) memcpy(d, s, n); dev_close(); }
static void e_download(void *d, const void *s, size_t n) { dev_open(); if (n) memcpy(d, s, n); dev_close(); }
static void e_copy(void *d, const void *s, size_t n) { dev_open(); if (n) memmove(d, s, n); dev_close(); }
static void e_zero(void *d, size_t n) { dev_open(); memset(d, 0, n); dev_close(); }
static void e_sync(void) {}

/* ---- asynchronous uploads, delayed ------------------------------------------------------ */

typedef struct {
    unsigned char *dst;
    const unsigned char *src;
    size_t n;
    uint64_t ticket, sum;
} e_copy_rec;
static e_copy_rec *q;       /* pending copies, in ticket order */
static size_t nq, capq;
static uint64_t e_ticket;
static long n_async, n_fence, n_bad_src, n_bad_free, n_max_pending;
static struct { unsigned char *p; size_t n; } stg_bufs[64]; /* live host_alloc'd buffers */
static int n_stg;

static uint64_t checksum(const unsigned char *p, size_t n) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 1099511628211ull;
    return h;
}
static void *e_host_alloc(size_t n) {
    unsigned char *p = malloc(n ? n : 1);
    if (!p || n_stg == 64) abort();
    stg_bufs[n_stg].p = p;
    stg_bufs[n_stg++].n = n;
    return p;
}
static void e_host_free(void *p) {
    if (!p) return;
    for (int i = 0; i < n_stg; i++)
        if (stg_bufs[i].p == p) {
            for (size_t k = 0; k < nq; k++) /* a pending copy still reads it */
                if (q[k].src >= stg_bufs[i].p && q[k].src < stg_bufs[i].p + stg_bufs[i].n) n_bad_free++;
            stg_bufs[i] = stg_bufs[--n_stg];
            break;
        }
    free(p);
}
static uint64_t e_upload_async(void *d, const void *s, size_t n) {
    if (nq == capq) q = realloc(q, sizeof *q * (capq = capq ? 2 * capq : 256));
    q[nq++] = (e_copy_rec){d, s, n, ++e_ticket, checksum(s, n)};
    if ((long)nq > n_max_pending) n_max_pending = (long)nq;
    n_async++;
    dev_open();
    memset(d, 0xff, n); /* not there yet: NaN in f32 and BF16 */
    dev_close();
    return e_ticket;
}
static void run_copies(uint64_t upto) {
    size_t k = 0;
    dev_open();
    for (; k < nq && (upto == 0 || q[k].ticket <= upto); k++) {
        if (checksum(q[k].src, q[k].n) != q[k].sum) n_bad_src++; /* staging reused too early */
        memcpy(q[k].dst, q[k].src, q[k].n);
    }
    dev_close();
    memmove(q, q + k, sizeof *q * (nq - k));
    nq -= k;
}
static void e_upload_wait(uint64_t t) { run_copies(t); }
static void e_upload_fence(void) {
    n_fence++;
    run_copies(0);
}
static void e_trim(void) {}
/* a block freed while a copy into it is pending */
static void check_free(const void *p, size_t n) {
    for (size_t i = 0; i < nq; i++)
        if (q[i].dst >= (const unsigned char *)p && q[i].dst < (const unsigned char *)p + n)
            n_bad_free++;
}


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
WRAP(attention_kv, (float *o, const float *q, const float *k, const float *v, float s, int P, int T, int nh, int nkv, int D),
     (o, q, k, v, s, P, T, nh, nkv, D))
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

static moe_backend emu, emu_sync;

const moe_backend *__real_moe_backend_get(const char *name);
const moe_backend *__wrap_moe_backend_get(const char *name);
const moe_backend *__wrap_moe_backend_get(const char *name) {
    if (name && !strcmp(name, "cuda-emu")) return &emu;
    if (name && !strcmp(name, "cuda-emu-sync")) return &emu_sync; /* no asynchronous uploads */
    return __real_moe_backend_get(name);
}

static int setup(void **state) {
    (void)state;
    arena = mmap(NULL, ARENA_BYTES, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (arena == MAP_FAILED) return -1;
    cpu = moe_backend_cpu();
    emu = (moe_backend){.name = "cuda-emu", .weight_dtype = MOE_DT_BF16, .alloc = e_alloc,
                        .free = e_free, .upload = e_upload, .download = e_download,
                        .copy = e_copy, .zero = e_zero, .sync = e_sync, .matmul = e_matmul,
                        .rmsnorm = e_rmsnorm, .rope = e_rope, .attention = e_attention,
                        .attention_kv = e_attention_kv,
                        .swiglu = e_swiglu, .axpy = e_axpy, .sigmoid_gate_add = e_sigmoid_gate_add,
                        .router = e_router, .gather_rows = e_gather_rows,
                        .scatter_add_rows = e_scatter_add_rows, .experts = e_experts,
                        .combine = e_combine, .softmax_rows = e_softmax_rows,
                        .divergence = e_divergence};
    emu_sync = emu;
    emu_sync.name = "cuda-emu-sync";
    emu.host_alloc = e_host_alloc;
    emu.host_free = e_host_free;
    emu.upload_async = e_upload_async;
    emu.upload_wait = e_upload_wait;
    emu.upload_fence = e_upload_fence;
    emu.trim = e_trim;
    return 0;
}

/* ---- the comparison -------------------------------------------------------------------- */

/* tm_run_model with model options: staging = bytes of the staging buffers
 * (0 = default); condense: layer 1 condensed to experts {0, 2} (its fused
 * weights take the f32 path) */
static void run_model_opts(tm_run *out, const char *dir, const char *device, size_t staging,
                           int condense, int stage_f32) {
    moe_model_opts o = {.device = device, .staging_bytes = staging, .stage_f32 = stage_f32};
    moe_model *m = moe_model_open(dir, &o);
    if (!m) fail_msg("%s (%s): %s", dir, device, moe_error());
    if (condense) {
        int ex[2] = {0, 2};
        float w[2] = {0.6f, 0.4f};
        if (moe_model_condense_layer(m, 1, 2, ex, w) < 0) fail_msg("%s", moe_error());
    }
    tm_forward(out, m, dir, device);
    moe_model_close(m);
    if (nq != 0) fail_msg("%s (%s): %zu copies still queued after close", dir, device, nq);
}

/* the emulator's ordering checks: no staging buffer reused or freed early, no
 * block freed under a pending copy (poisoned reads show in the results) */
static void reset_counts(void) { n_async = n_fence = n_bad_src = n_bad_free = n_max_pending = 0; }

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
            reset_counts();
            run_model_opts(&e, dir, "cuda-emu", 4096, 0, 0); /* the ring wraps, pieces split */
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
            int ok = worst < 2e-2 && e.r.n == c.r.n && same * 100 >= c.r.n * 95 &&
                     n_bad_src == 0 && n_bad_free == 0 && n_async > 0 && n_max_pending > 1;
            print_message("%-32s rel err %.2e, routing %zu/%zu same, %ld device ops, %ld async "
                          "copies (<= %ld pending), %ld fences, %ld/%ld early reuse/free%s\n",
                          dir, worst, same, c.r.n, n_ops - ops0, n_async, n_max_pending, n_fence,
                          n_bad_src, n_bad_free, ok ? "" : "  <-- FAIL");

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

static int same_bytes(const tm_run *a, const tm_run *b) {
    for (int s = 0; s < NSEQ; s++) {
        size_t T = (size_t)a->s[s].T;
        if (memcmp(a->s[s].hidden, b->s[s].hidden, sizeof(float) * (a->L + 1) * T * a->H) ||
            memcmp(a->s[s].logits, b->s[s].logits, sizeof(float) * T * a->V))
            return 0;
    }
    return a->r.n == b->r.n && !memcmp(a->r.idx, b->r.idx, sizeof(int32_t) * a->r.n);
}

/* Direct BF16 staging, asynchronous or not, and the old f32 round trip
 * (MOE_STAGE_F32=1) give the same weights, so the same bytes out; with a
 * condensed layer (its fused weights keep the f32 path) too. */
static void test_staging_paths_same_bytes(void **state) {
    (void)state;
    const char *dirs[] = {FIX "/deepseek-bf16", FIX "/qwen2_moe-f32", FIX "/mixtral-bf16"};
    for (size_t d = 0; d < sizeof dirs / sizeof *dirs; d++)
        for (int cond = 0; cond < 2; cond++) {
            tm_run a, b, c, e;
            reset_counts();
            run_model_opts(&a, dirs[d], "cuda-emu", 1000, cond, 0); /* odd size: unaligned pieces */
            assert_int_equal(n_bad_src + n_bad_free, 0);
            assert_true(n_async > 0);
            run_model_opts(&b, dirs[d], "cuda-emu", 0, cond, 0);
            run_model_opts(&c, dirs[d], "cuda-emu-sync", 0, cond, 0);
            reset_counts();
            run_model_opts(&e, dirs[d], "cuda-emu", 0, cond, 1); /* the f32 staging option */
            assert_int_equal(n_async, 0); /* the old path really ran */
            int ok = same_bytes(&a, &b) && same_bytes(&a, &c) && same_bytes(&a, &e);
            print_message("%-32s%s: async (tiny ring) = async = sync = f32 staging: %s\n", dirs[d],
                          cond ? " condensed layer 1" : "", ok ? "same bytes" : "DIFFERENT <-- FAIL");
            assert_true(ok);
            tm_free_run(&a), tm_free_run(&b), tm_free_run(&c), tm_free_run(&e);
        }
}

/* moe_layer_prefetch queues copies without running them; the first use of the
 * layer fences them; results equal a plain load's. */
static void test_prefetch_ordering(void **state) {
    (void)state;
    const char *dir = FIX "/deepseek-bf16";
    float *out[2];
    for (int pre = 0; pre < 2; pre++) {
        moe_model_opts o = {.device = "cuda-emu", .staging_bytes = 2048};
        moe_model *m = moe_model_open(dir, &o);
        if (!m) fail_msg("%s", moe_error());
        const moe_config *c = moe_model_config(m);
        int H = c->hidden_size, T = 7;
        int32_t ids[7] = {3, 1, 4, 1, 5, 9, 2};
        float *x = moe_model_alloc(m, (size_t)T * H);
        assert_int_equal(moe_model_embed(m, x, ids, T), 0);
        reset_counts();
        assert_int_equal(moe_layer_forward(m, 0, x, T, NULL, NULL), 0);
        if (pre) {
            assert_int_equal(moe_layer_prefetch(m, 1), 0);
            assert_true(nq > 0); /* queued, not run: the emulator runs them at the fence */
            long f0 = n_fence;
            moe_layer_unload(m, 0);
            assert_int_equal(moe_layer_prefetch(m, 1), 0); /* again: nothing new */
            assert_true(nq > 0 && n_fence == f0);
        }
        assert_int_equal(moe_layer_forward(m, 1, x, T, NULL, NULL), 0);
        assert_int_equal((long)nq, 0);
        /* a prefetched layer unloaded unused: its copies are fenced before the frees */
        assert_int_equal(moe_layer_prefetch(m, 2 % c->num_layers), 0);
        moe_layer_unload(m, 2 % c->num_layers);
        assert_int_equal(n_bad_src + n_bad_free, 0);
        out[pre] = malloc(sizeof(float) * (size_t)T * H);
        moe_model_backend(m)->download(out[pre], x, sizeof(float) * (size_t)T * H);
        for (int i = 0; i < T * H; i++) assert_true(isfinite(out[pre][i]));
        moe_model_free(m, x);
        moe_model_close(m);
    }
    assert_memory_equal(out[0], out[1], sizeof(float) * 7 * 2);
    free(out[0]), free(out[1]);
}

/* The emulator's checks can fail: a staging buffer changed before its wait,
 * a block freed under a pending copy, and a read before the fence (NaN). */
static void test_emulator_catches_ordering_bugs(void **state) {
    (void)state;
    reset_counts();
    float *d = e_alloc(sizeof(float) * 4), *y = e_alloc(sizeof(float) * 4);
    float *h = e_host_alloc(sizeof(float) * 4), got[4];
    for (int i = 0; i < 4; i++) h[i] = (float)i;
    uint64_t t = e_upload_async(d, h, sizeof(float) * 4);
    e_copy(y, d, sizeof(float) * 4); /* an op before the fence reads poison */
    e_download(got, y, sizeof got);
    assert_false(isfinite(got[1]));
    h[2] = 42; /* staging reused before upload_wait */
    e_upload_wait(t);
    assert_int_equal(n_bad_src, 1);
    e_download(got, d, sizeof got);
    assert_true(got[2] == 42.0f); /* the copy saw the late bytes: the bug is real */
    e_upload_async(d, h, sizeof(float) * 4);
    e_free(d); /* freed under a pending copy */
    e_host_free(h); /* ...and its source too */
    assert_int_equal(n_bad_free, 2);
    nq = 0; /* drop the broken copy */
    e_free(y);
    reset_counts();
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_forward_on_emulated_device),
        cmocka_unit_test(test_layer_api_on_emulated_device),
        cmocka_unit_test(test_staging_paths_same_bytes),
        cmocka_unit_test(test_prefetch_ordering),
        cmocka_unit_test(test_emulator_catches_ordering_bugs),
    };
    return cmocka_run_group_tests(tests, setup, NULL);
}
