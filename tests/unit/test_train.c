/* test_train.c - the trainer (lib/train.h) on the tiny fixture models of the
 * five architectures (tests/fixtures/models/ *-f32): the training forward's
 * logits against moe_model_forward's; every trained tensor's gradient and
 * d loss / d x_0 against PyTorch autograd (tests/fixtures/train: condensed
 * and train-all cases with the load-balancing loss, one with recompute);
 * recompute and thread count give the same bytes; a model without
 * condensed layers is refused for MOE_TRAIN_CONDENSED. */
#include <jansson.h>

#include "kernels.h"
#include "testmodel.h" /* FIX, NSEQ, ARCHS */
#include "safetensors.h"
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

/* ---- gradients against PyTorch autograd (tests/fixtures/train, README.md) ------------------ */

#define GTOL 1e-4

typedef struct {
    json_t *j;
    moe_st_file *st;
    moe_model *m;
    int32_t *ids[8], *tg[8];
    int T[8];
    moe_train_batch b;
} grad_fixture;

static void gf_open(grad_fixture *g, const char *arch, const char *kase) {
    char p[512];
    memset(g, 0, sizeof *g);
    snprintf(p, sizeof p, "tests/fixtures/train/grad_%s_%s.json", arch, kase);
    json_error_t je;
    if (!(g->j = json_load_file(p, 0, &je))) fail_msg("%s: %s", p, je.text);
    snprintf(p, sizeof p, "tests/fixtures/train/grad_%s_%s.safetensors", arch, kase);
    if (!(g->st = moe_st_open(p))) fail_msg("%s: %s", p, moe_error());
    const char *dir = json_string_value(json_object_get(g->j, "model"));
    moe_model_opts o = {.backend = train_backend()};
    if (!(g->m = moe_model_open(dir, &o))) fail_msg("%s: %s", dir, moe_error());
    const char *key;
    json_t *v;
    json_object_foreach(json_object_get(g->j, "condensed_layers"), key, v) {
        json_t *ex = json_object_get(v, "experts"), *wt = json_object_get(v, "weights");
        int n = (int)json_array_size(ex), e[16];
        float w[16];
        for (int i = 0; i < n; i++) {
            e[i] = (int)json_integer_value(json_array_get(ex, i));
            w[i] = (float)json_number_value(json_array_get(wt, i));
        }
        assert_int_equal(moe_model_condense_layer(g->m, atoi(key), n, e, w), 0);
    }
    json_t *dropped = json_object_get(g->j, "dropped_layers"); /* {"mlp": [...], "block": [...]} */
    size_t i;
    json_array_foreach(json_object_get(dropped, "mlp"), i, v)
        assert_int_equal(moe_model_drop_layer(g->m, (int)json_integer_value(v), MOE_DROP_MLP), 0);
    json_array_foreach(json_object_get(dropped, "block"), i, v)
        assert_int_equal(moe_model_drop_layer(g->m, (int)json_integer_value(v), MOE_DROP_BLOCK), 0);
    json_t *seqs = json_object_get(g->j, "sequences");
    int ns = (int)json_array_size(seqs);
    assert_true(ns > 0 && ns <= 8);
    for (int s = 0; s < ns; s++) {
        json_t *ids = json_object_get(json_array_get(seqs, s), "ids");
        json_t *tg = json_object_get(json_array_get(seqs, s), "targets");
        g->T[s] = (int)json_array_size(ids);
        g->ids[s] = malloc(sizeof(int32_t) * (size_t)g->T[s]);
        g->tg[s] = malloc(sizeof(int32_t) * (size_t)g->T[s]);
        for (int t = 0; t < g->T[s]; t++) {
            g->ids[s][t] = (int32_t)json_integer_value(json_array_get(ids, t));
            g->tg[s][t] = (int32_t)json_integer_value(json_array_get(tg, t));
        }
    }
    g->b = (moe_train_batch){ns, (const int32_t *const *)g->ids, (const int32_t *const *)g->tg, g->T};
}

static void gf_close(grad_fixture *g) {
    for (int s = 0; s < g->b.nseq; s++) free(g->ids[s]), free(g->tg[s]);
    moe_model_close(g->m);
    moe_st_close(g->st);
    json_decref(g->j);
}

/* reference tensor `name` of the fixture against n floats of ours */
static double gf_compare(grad_fixture *g, const char *name, const float *ours, size_t n) {
    const moe_st_tensor *t = moe_st_find(g->st, name);
    if (!t) fail_msg("fixture has no tensor %s", name);
    float *ref = malloc(sizeof(float) * n);
    assert_int_equal(moe_st_read_f32(t, ref), 0);
    double e = rel_l2(ours, ref, n);
    free(ref);
    return e;
}

/* every trained tensor's gradient and each sequence's d loss / d x_0 within
 * 1e-4 of autograd's; the trainer trains exactly the fixture's tensors */
static void grad_fixture_case(const char *arch, const char *kase, int recompute) {
    grad_fixture g;
    gf_open(&g, arch, kase);
    int all = !strcmp(kase, "all"), dropped = !strcmp(kase, "dropped"); /* dropped: all, no aux */
    double dscale = json_number_value(json_object_get(g.j, "dscale"));
    double aux_coef = all ? json_number_value(json_object_get(g.j, "aux_coef")) : dropped ? 0 : -1;
    moe_train_opts o = {.set = all || dropped ? MOE_TRAIN_ALL : MOE_TRAIN_CONDENSED, .train_weights = 1,
                        .input_grad = 1, .recompute = recompute, .aux_coef = aux_coef};
    moe_trainer *tr = moe_trainer_new(g.m, &o);
    if (!tr) fail_msg("%s %s: %s", arch, kase, moe_error());
    json_t *trained = json_object_get(g.j, "trained");
    assert_int_equal(moe_trainer_nparams(tr), (int)json_array_size(trained));
    moe_trainer_zero_grads(tr);
    moe_train_result r;
    assert_int_equal(moe_trainer_backward(tr, &g.b, (float)dscale, 1.0f, &r), 0);
    double loss = dscale * r.loss_sum + r.aux_loss;
    double lref = json_number_value(json_object_get(g.j, "loss"));
    if (fabs(loss - lref) > 1e-5 * fabs(lref)) fail_msg("%s %s: loss %.9g, PyTorch %.9g", arch, kase, loss, lref);
    if (all) {
        double aref = aux_coef * json_number_value(json_object_get(g.j, "aux"));
        if (fabs(r.aux_loss - aref) > 1e-5 * aref) fail_msg("%s: aux %.9g, PyTorch %.9g", arch, r.aux_loss, aref);
    }
    double worst = 0;
    const char *wname = "";
    for (int i = 0; i < moe_trainer_nparams(tr); i++) {
        moe_param *p = moe_trainer_param(tr, i);
        double e = gf_compare(&g, p->name, p->g, p->n);
        if (e > worst) worst = e, wname = p->name;
    }
    for (int s = 0; s < g.b.nseq; s++) {
        size_t n = (size_t)g.T[s] * moe_model_config(g.m)->hidden_size;
        float *dx = malloc(sizeof(float) * n);
        char name[32];
        assert_int_equal(moe_trainer_input_grad(tr, s, dx), 0);
        snprintf(name, sizeof name, "input_grad.%d", s);
        double e = gf_compare(&g, name, dx, n);
        if (e > worst) worst = e, wname = "input_grad";
        free(dx);
    }
    printf("%s %s%s: %d tensors, worst rel err %.3g (%s)\n", arch, kase,
           recompute ? " (recompute)" : "", moe_trainer_nparams(tr), worst, wname);
    if (worst > GTOL) fail_msg("%s %s: %s rel err %.3g > %g", arch, kase, wname, worst, GTOL);
    moe_trainer_free(tr);
    gf_close(&g);
}

static void test_grad_pytorch(void **state) {
    (void)state;
    for (int a = 0; a < 5; a++) {
        grad_fixture_case(ARCHS[a], "condensed", 0);
        grad_fixture_case(ARCHS[a], "all", a == 0);
    }
}

/* LayerDrop and BlockDrop layers (the baselines' checkpoints, dropped at run time here) */
static void test_grad_dropped(void **state) {
    (void)state;
    grad_fixture_case("deepseek", "dropped", 0);
    grad_fixture_case("qwen2_moe", "dropped", 1);
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
    /* a LayerDrop model: no condensed layers either; a dropped layer has no MLP to train */
    assert_int_equal(moe_model_drop_layer(m, 1, MOE_DROP_MLP), 0);
    assert_null(moe_trainer_new(m, &o));
    assert_non_null(strstr(moe_error(), "dropped, not condensed"));
    int layer = 1;
    moe_train_opts ol = {.set = MOE_TRAIN_LAYERS, .layers = &layer, .nlayers = 1, .aux_coef = -1};
    assert_null(moe_trainer_new(m, &ol));
    assert_non_null(strstr(moe_error(), "layer 1 is dropped (LayerDrop)"));
    moe_model_close(m);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_refuse_uncondensed),
        cmocka_unit_test(test_logits),
        cmocka_unit_test(test_grad_pytorch),
        cmocka_unit_test(test_grad_dropped),
        cmocka_unit_test(test_same_bytes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
