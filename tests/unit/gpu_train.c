/* gpu_train.c - the trainer (lib/train.h) on the CUDA backend against the
 * CPU backend: every trained tensor's gradient and d loss / d x_0, on the
 * tiny BF16 fixture models of the five architectures (weights exact on both
 * sides), condensed case (a layer condensed at run time, its fixed weights
 * trained), train-all case (load-balancing loss included) and dropped case
 * (layer 0 BlockDrop, layer 1 LayerDrop, at run time; every weight trained):
 *
 *   MOE_CUDA_PREC_F32 (float32 GEMMs): rel. error < 1e-4 per tensor (the
 *   worst tensor's);  default precision (BF16 activations into the GEMMs):
 *   < 5e-2.
 *
 * Exits 77 ("SKIP: no CUDA device") where no GPU is visible. */
#include "device.h"
#include "kernels.h"
#include "testmodel.h"
#include "train.h"

#define MAXSEG 512

/* worst relative error over the segments (tensors) */
static double worst_rel(const float *a, const float *ref, const size_t *seg, int nseg) {
    double w = 0;
    for (int i = 0; i < nseg; i++) {
        double e = tu_rel_err(a, ref, seg[i]);
        if (e > w) w = e;
        a += seg[i];
        ref += seg[i];
    }
    return w;
}

/* the gradients of one backward on the fixture's sequences, concatenated
 * parameter by parameter, then d loss / d x_0 of every sequence */
enum { CASE_CONDENSED, CASE_ALL, CASE_DROPPED };
static const char *const CASE_NAMES[] = {"condensed", "all", "dropped"};

static float *train_grads(const char *dir, const char *device, int kase, size_t *seg, int *nseg) {
    moe_model_opts o = {.device = device};
    moe_model *m = moe_model_open(dir, &o);
    if (!m) fail_msg("%s (%s): %s", dir, device, moe_error());
    int ex[2] = {1, 3};
    float w[2] = {0.4f, 0.25f};
    if (kase == CASE_DROPPED) {
        assert_int_equal(moe_model_drop_layer(m, 0, MOE_DROP_BLOCK), 0);
        assert_int_equal(moe_model_drop_layer(m, 1, MOE_DROP_MLP), 0);
    } else {
        assert_int_equal(moe_model_condense_layer(m, 1, 2, ex, w), 0);
    }
    int32_t *ids[NSEQ], *tg[NSEQ];
    int T[NSEQ];
    size_t rows = 0;
    for (int s = 0; s < NSEQ; s++) {
        char p[512];
        snprintf(p, sizeof p, "%s/seq%d_ids.npy", dir, s);
        if (!(ids[s] = tm_read_ids(p, &T[s]))) fail_msg("cannot read %s", p);
        tg[s] = malloc(sizeof(int32_t) * (size_t)T[s]);
        for (int t = 0; t < T[s]; t++) tg[s][t] = t + 1 < T[s] ? ids[s][t + 1] : -100;
        rows += (size_t)T[s];
    }
    moe_train_batch b = {NSEQ, (const int32_t *const *)ids, (const int32_t *const *)tg, T};
    moe_train_opts to = {.set = kase == CASE_CONDENSED ? MOE_TRAIN_CONDENSED : MOE_TRAIN_ALL, .train_weights = 1,
                         .input_grad = 1, .aux_coef = 0.1};
    moe_trainer *tr = moe_trainer_new(m, &to);
    if (!tr) fail_msg("%s (%s): %s", dir, device, moe_error());
    moe_trainer_zero_grads(tr);
    assert_int_equal(moe_trainer_backward(tr, &b, 1.0f / (float)rows, 1.0f, NULL), 0);
    size_t H = (size_t)moe_model_config(m)->hidden_size, tot = moe_trainer_param_count(tr), k = 0;
    float *g = malloc(sizeof(float) * (tot + rows * H));
    const moe_backend *be = moe_model_backend(m);
    int ns = 0;
    for (int i = 0; i < moe_trainer_nparams(tr); i++) {
        moe_param *p = moe_trainer_param(tr, i);
        be->download(g + k, p->g, sizeof(float) * p->n);
        k += p->n;
        if (ns < MAXSEG) seg[ns++] = p->n;
    }
    for (int s = 0; s < NSEQ; s++) {
        assert_int_equal(moe_trainer_input_grad(tr, s, g + k), 0);
        k += (size_t)T[s] * H;
        if (ns < MAXSEG) seg[ns++] = (size_t)T[s] * H;
    }
    assert_true(ns < MAXSEG);
    *nseg = ns;
    moe_trainer_free(tr);
    moe_model_close(m);
    for (int s = 0; s < NSEQ; s++) free(ids[s]), free(tg[s]);
    return g;
}

static void test_gradients(void **state) {
    (void)state;
    int bad = 0;
    for (size_t a = 0; a < sizeof ARCHS / sizeof *ARCHS; a++)
        for (int kase = CASE_CONDENSED; kase <= CASE_DROPPED; kase++) {
            char dir[256];
            snprintf(dir, sizeof dir, "%s/%s-bf16", FIX, ARCHS[a]);
            size_t sc[MAXSEG], sg[MAXSEG], s32[MAXSEG];
            int nc, ng, n32;
            float *c = train_grads(dir, "cpu", kase, sc, &nc);
            moe_cuda_set_precision(MOE_CUDA_PREC_F32);
            float *g32 = train_grads(dir, "cuda", kase, s32, &n32);
            moe_cuda_set_precision(MOE_CUDA_PREC_BF16);
            float *g = train_grads(dir, "cuda", kase, sg, &ng);
            assert_int_equal(nc, ng);
            assert_int_equal(nc, n32);
            assert_memory_equal(sc, sg, sizeof(size_t) * (size_t)nc);
            double e = worst_rel(g, c, sc, nc), e32 = worst_rel(g32, c, sc, nc);
            int np = nc - NSEQ;
            int ok = e32 < 1e-4 && e < 5e-2;
            print_message("%-34s %-9s %3d tensors: f32 path %.2e, bf16 path %.2e%s\n", dir,
                          CASE_NAMES[kase], np, e32, e, ok ? "" : "  <-- FAIL");
            bad += !ok;
            free(c), free(g), free(g32);
        }
    assert_int_equal(bad, 0);
}

int main(void) {
    char why[256] = "";
    if (moe_device_cuda_count(why, sizeof why) <= 0) {
        printf("SKIP: no CUDA device (%s)\n", why[0] ? why : "none visible");
        return 77;
    }
    if (!moe_backend_cuda()) {
        fprintf(stderr, "moe_backend_cuda: %s\n", moe_error());
        return 1;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_gradients),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
