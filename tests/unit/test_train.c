/* test_train.c - the trainer (lib/train.h) on the tiny fixture models of the
 * five architectures (tests/fixtures/models/ *-f32): the training forward's
 * logits against moe_model_forward's; gradients against finite differences
 * of the loss; recompute and thread count give the same bytes; a model
 * without condensed layers is refused for MOE_TRAIN_CONDENSED. */
#include <jansson.h>

#include "kernels.h"
#include "testmodel.h" /* FIX, NSEQ, ARCHS */
#include "train.h"

#ifdef TMP_OPS
#include "tmp_ops.h"
static const moe_backend *train_backend(void) { return tmp_backend(); }
#else
static const moe_backend *train_backend(void) { return moe_backend_cpu(); }
#endif

/* the fixture sequences as a training batch: targets = the next id, -100 last */
typedef struct {
    int32_t *ids[NSEQ], *tg[NSEQ];
    int T[NSEQ];
    moe_train_batch b;
} fx_batch;

static void fx_load(fx_batch *fb, const char *dir) {
    memset(fb, 0, sizeof *fb);
    for (int i = 0; i < NSEQ; i++) {
        char p[512];
        snprintf(p, sizeof p, "%s/seq%d_ids.npy", dir, i);
        fb->ids[i] = tm_read_ids(p, &fb->T[i]);
        if (!fb->ids[i]) fail_msg("cannot read %s", p);
        fb->tg[i] = malloc(sizeof(int32_t) * (size_t)fb->T[i]);
        for (int t = 0; t < fb->T[i]; t++) fb->tg[i][t] = t + 1 < fb->T[i] ? fb->ids[i][t + 1] : -100;
    }
    fb->b = (moe_train_batch){NSEQ, (const int32_t *const *)fb->ids, (const int32_t *const *)fb->tg,
                              fb->T};
}

static void fx_free(fx_batch *fb) {
    for (int i = 0; i < NSEQ; i++) free(fb->ids[i]), free(fb->tg[i]);
}

/* condense the layer named in the fixture's condensed.json (at run time);
 * fixtures without one: layer 1, experts 1 and 3 */
static void condense_fixture(moe_model *m, const char *dir) {
    char p[512];
    snprintf(p, sizeof p, "%s/condensed.json", dir);
    json_error_t je;
    json_t *j = json_load_file(p, 0, &je);
    if (!j) j = json_pack("{s:i, s:[i,i], s:[f,f]}", "layer", 1, "experts", 1, 3, "weights", 0.4, 0.25);
    json_t *ex = json_object_get(j, "experts"), *wt = json_object_get(j, "weights");
    int n = (int)json_array_size(ex), e[64];
    float w[64];
    for (int i = 0; i < n && i < 64; i++) {
        e[i] = (int)json_integer_value(json_array_get(ex, i));
        w[i] = (float)json_number_value(json_array_get(wt, i));
    }
    assert_int_equal(moe_model_condense_layer(m, (int)json_integer_value(json_object_get(j, "layer")),
                                              n, e, w), 0);
    json_decref(j);
}

static moe_model *open_fixture(const char *arch, int condensed, char *dir, size_t dsz) {
    snprintf(dir, dsz, "%s/%s-f32", FIX, arch);
    moe_model_opts o = {.backend = train_backend()};
    moe_model *m = moe_model_open(dir, &o);
    if (!m) fail_msg("%s: %s", dir, moe_error());
    if (condensed) condense_fixture(m, dir);
    return m;
}

static double rel_l2(const float *a, const float *b, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)a[i] - b[i];
        num += d * d;
        den += (double)b[i] * b[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

/* ---- the training forward's logits -------------------------------------------------- */

static void logits_case(const char *arch, int condensed) {
    char dir[256];
    moe_model *m = open_fixture(arch, condensed, dir, sizeof dir);
    fx_batch fb;
    fx_load(&fb, dir);
    int V = moe_model_config(m)->vocab_size, N = 0;
    moe_seq s[NSEQ];
    for (int i = 0; i < NSEQ; i++) {
        s[i] = (moe_seq){fb.ids[i], fb.T[i], NULL, malloc(sizeof(float) * (size_t)fb.T[i] * V)};
        N += fb.T[i];
    }
    assert_int_equal(moe_model_forward(m, s, NSEQ, 0, NULL, NULL), 0);
    moe_train_opts o = {.set = condensed ? MOE_TRAIN_CONDENSED : MOE_TRAIN_ALL, .aux_coef = -1};
    moe_trainer *tr = moe_trainer_new(m, &o);
    if (!tr) fail_msg("%s: %s", arch, moe_error());
    float *lg = malloc(sizeof(float) * (size_t)N * V);
    assert_int_equal(moe_trainer_logits(tr, &fb.b, lg), 0);
    for (int i = 0, off = 0; i < NSEQ; off += fb.T[i], i++) {
        const float *a = lg + (size_t)off * V;
        size_t n = (size_t)fb.T[i] * V;
        if (!condensed) { /* the same op calls: the same bytes */
            if (memcmp(a, s[i].logits, n * sizeof(float)))
                fail_msg("%s seq %d: training logits differ from moe_model_forward's (rel %.3g)",
                         arch, i, rel_l2(a, s[i].logits, n));
        } else { /* unfused experts vs the fused wide SwiGLU: rounding only */
            double e = rel_l2(a, s[i].logits, n);
            if (e > 1e-5) fail_msg("%s seq %d (condensed): rel err %.3g", arch, i, e);
        }
        free(s[i].logits);
    }
    free(lg);
    moe_trainer_free(tr);
    fx_free(&fb);
    moe_model_close(m);
}

static void test_logits(void **state) {
    (void)state;
    for (int a = 0; a < 5; a++) {
        logits_case(ARCHS[a], 0);
        logits_case(ARCHS[a], 1);
    }
}

/* ---- gradients against finite differences of the loss ---------------------------------- */

/* dscale·Σ CE + aux (aux_scale 1), as moe_trainer_backward differentiates it */
static double total_loss(moe_trainer *tr, const moe_train_batch *b, double dscale) {
    moe_train_result r;
    if (moe_trainer_loss(tr, b, &r) < 0) fail_msg("loss: %s", moe_error());
    return dscale * r.loss_sum + r.aux_loss;
}

/* every parameter moved along its gradient's direction u = g/|g| by ±h:
 * (L(w+hu) - L(w-hu)) / 2h must equal |g| */
static double fd_check(moe_trainer *tr, const moe_train_batch *b, double dscale, float h,
                       const char *what) {
    double worst = 0;
    for (int i = 0; i < moe_trainer_nparams(tr); i++) {
        moe_param *p = moe_trainer_param(tr, i);
        double gn = 0;
        for (size_t j = 0; j < p->n; j++) gn += (double)p->g[j] * p->g[j];
        gn = sqrt(gn);
        if (gn < 1e-6) continue; /* an expert no token reached */
        float *w0 = malloc(sizeof(float) * p->n), *g = malloc(sizeof(float) * p->n);
        memcpy(w0, p->w, sizeof(float) * p->n);
        memcpy(g, p->g, sizeof(float) * p->n);
        double lp, lm;
        for (size_t j = 0; j < p->n; j++) p->w[j] = w0[j] + (float)(h * g[j] / gn);
        moe_trainer_sync_weights(tr);
        lp = total_loss(tr, b, dscale);
        for (size_t j = 0; j < p->n; j++) p->w[j] = w0[j] - (float)(h * g[j] / gn);
        moe_trainer_sync_weights(tr);
        lm = total_loss(tr, b, dscale);
        memcpy(p->w, w0, sizeof(float) * p->n);
        moe_trainer_sync_weights(tr);
        double fd = (lp - lm) / (2.0 * h), e = fabs(fd - gn) / gn;
        if (getenv("TRAIN_VERBOSE")) printf("%s %s |g| %.6g fd %.6g rel %.3g\n", what, p->name, gn, fd, e);
        if (e > worst) worst = e;
        free(w0);
        free(g);
    }
    return worst;
}

/* kind 0: condensed; 1: train all; 2: train all, the load-balancing loss
 * alone (coefficient 1, no cross-entropy: a smaller step, as its values
 * are exact to double rounding but jump where a token's top-k changes) */
static void grad_case(const char *arch, int kind) {
    char dir[256];
    moe_model *m = open_fixture(arch, 1, dir, sizeof dir);
    fx_batch fb;
    fx_load(&fb, dir);
    double dscale = kind == 2 ? 0.0 : 1.0;
    moe_train_opts o = {.set = kind ? MOE_TRAIN_ALL : MOE_TRAIN_CONDENSED, .train_weights = 1,
                        .aux_coef = kind == 2 ? 1.0 : -1};
    moe_trainer *tr = moe_trainer_new(m, &o);
    if (!tr) fail_msg("%s: %s", arch, moe_error());
    moe_trainer_zero_grads(tr);
    moe_train_result r;
    assert_int_equal(moe_trainer_backward(tr, &fb.b, (float)dscale, 1.0f, &r), 0);
    assert_true(r.ntokens > 0);
    assert_true(kind ? r.aux_loss > 0 : r.aux_loss == 0);
    double e = fd_check(tr, &fb.b, dscale, kind == 2 ? 1e-4f : 1e-3f, arch);
    printf("%s %s: %d params, worst finite-difference rel err %.3g\n", arch,
           kind == 0 ? "condensed" : kind == 1 ? "all" : "aux", moe_trainer_nparams(tr), e);
    assert_true(e < 1e-2);
    moe_trainer_free(tr);
    fx_free(&fb);
    moe_model_close(m);
}

/* every architecture's condensed case; the train-all case and the two
 * forms of the load-balancing loss on deepseek and qwen2_moe (the PyTorch
 * fixtures cover all five) */
static void test_grad_fd(void **state) {
    (void)state;
    for (int a = 0; a < 5; a++) grad_case(ARCHS[a], 0);
    for (int k = 1; k <= 2; k++) {
        grad_case("deepseek", k);
        grad_case("qwen2_moe", k);
    }
}

/* ---- same bytes: recompute, thread count ------------------------------------------------ */

/* every gradient of one backward, concatenated */
static float *grads_of(const char *arch, moe_train_set set, int recompute, int threads, size_t *n) {
    char dir[256];
    moe_model_set_threads(threads);
    moe_model *m = open_fixture(arch, 1, dir, sizeof dir);
    fx_batch fb;
    fx_load(&fb, dir);
    moe_train_opts o = {.set = set, .train_weights = 1, .recompute = recompute, .input_grad = 1,
                        .aux_coef = -1};
    moe_trainer *tr = moe_trainer_new(m, &o);
    if (!tr) fail_msg("%s: %s", arch, moe_error());
    moe_trainer_zero_grads(tr);
    assert_int_equal(moe_trainer_backward(tr, &fb.b, 0.01f, 1.0f, NULL), 0);
    size_t tot = moe_trainer_param_count(tr), H = (size_t)moe_model_config(m)->hidden_size, k = 0;
    size_t T0 = (size_t)fb.T[0];
    float *all = malloc(sizeof(float) * (tot + T0 * H));
    for (int i = 0; i < moe_trainer_nparams(tr); i++) {
        moe_param *p = moe_trainer_param(tr, i);
        memcpy(all + k, p->g, sizeof(float) * p->n);
        k += p->n;
    }
    assert_int_equal(moe_trainer_input_grad(tr, 0, all + k), 0);
    *n = tot + T0 * H;
    moe_trainer_free(tr);
    fx_free(&fb);
    moe_model_close(m);
    moe_model_set_threads(0);
    return all;
}

static void test_same_bytes(void **state) {
    (void)state;
    for (int a = 0; a < 5; a++)
        for (int set = 0; set < 2; set++) {
            size_t n0, n1, n2;
            float *g0 = grads_of(ARCHS[a], (moe_train_set)set, 0, 2, &n0);
            float *g1 = grads_of(ARCHS[a], (moe_train_set)set, 1, 2, &n1);
            float *g2 = grads_of(ARCHS[a], (moe_train_set)set, 0, 1, &n2);
            assert_int_equal(n0, n1);
            assert_int_equal(n0, n2);
            if (memcmp(g0, g1, n0 * sizeof(float))) fail_msg("%s: recompute changes the gradients", ARCHS[a]);
            if (memcmp(g0, g2, n0 * sizeof(float))) fail_msg("%s: 1 vs 2 threads differ", ARCHS[a]);
            free(g0), free(g1), free(g2);
        }
}

/* ---- refusals ------------------------------------------------------------------------------ */

static void test_refuse_uncondensed(void **state) {
    (void)state;
    char dir[256];
    moe_model *m = open_fixture("qwen2_moe", 0, dir, sizeof dir);
    moe_train_opts o = {.set = MOE_TRAIN_CONDENSED, .aux_coef = -1};
    assert_null(moe_trainer_new(m, &o));
    assert_non_null(strstr(moe_error(), "no condensed layers"));
    assert_non_null(strstr(moe_error(), dir));
    moe_model_close(m);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_refuse_uncondensed),
        cmocka_unit_test(test_logits),
        cmocka_unit_test(test_grad_fd),
        cmocka_unit_test(test_same_bytes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
