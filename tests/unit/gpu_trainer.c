/* gpu_trainer.c - the trainer (lib/train.h) on the CUDA backend against the
 * trainer on the CPU: the fixture models (tests/fixtures/models/ARCH-bf16),
 * every weight trained (MOE_TRAIN_ALL, with the load-balancing loss, so
 * that every backward op runs: embedding, norms, attention, routers,
 * experts, shared experts and their gate, lm_head), and a condensed layer
 * trained alone (MOE_TRAIN_CONDENSED).  The loss and every parameter's
 * gradient are compared: with MOE_CUDA_PRECISION=f32 GEMMs within 1e-4
 * (relative L2), with the BF16 GEMMs the loss within 1e-2.  Exits 77
 * ("SKIP: no CUDA device") where no GPU is visible; `make test` runs it on
 * the CUDA emulator. */
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
#include "model.h"
#include "train.h"
#include "gpu_util.h"

#define NS 2
static const int LENS[NS] = {7, 12};

/* two sequences of random ids below V; targets the next id, the last -100 */
typedef struct {
    int32_t *ids[NS], *tg[NS];
    moe_train_batch b;
} batch;

static void make_batch(batch *bt, int V) {
    for (int s = 0; s < NS; s++) {
        bt->ids[s] = moe_malloc(sizeof(int32_t) * LENS[s]);
        bt->tg[s] = moe_malloc(sizeof(int32_t) * LENS[s]);
        for (int t = 0; t < LENS[s]; t++) bt->ids[s][t] = (int32_t)((frand() + 1.0f) * 0.5f * V) % V;
        for (int t = 0; t < LENS[s]; t++) bt->tg[s][t] = t + 1 < LENS[s] ? bt->ids[s][t + 1] : -100;
    }
    bt->b = (moe_train_batch){NS, (const int32_t *const *)bt->ids, (const int32_t *const *)bt->tg,
                              LENS};
}
static void free_batch(batch *bt) {
    for (int s = 0; s < NS; s++) free(bt->ids[s]), free(bt->tg[s]);
}

/* one backward of the batch on a device: the loss and every gradient (host copies) */
typedef struct {
    double loss, aux;
    int np;
    char **names;
    float **g;
    size_t *n;
} grads;

static void run_trainer(grads *out, const char *dir, const char *device, const moe_train_opts *to,
                        const batch *bt, int condense) {
    moe_model_opts o = {.device = device};
    moe_model *m = moe_model_open(dir, &o);
    if (!m) print_error("%s on %s: %s\n", dir, device, moe_error());
    assert_non_null(m);
    if (condense) { /* decoder layer 1 condensed to experts 5, 2, 7 (the fixture's condensed.json) */
        const int ex[3] = {5, 2, 7};
        const float w[3] = {0.31f, 0.22f, 0.115f};
        assert_int_equal(moe_model_condense_layer(m, 1, 3, ex, w), 0);
    }
    moe_trainer *tr = moe_trainer_new(m, to);
    if (!tr) print_error("moe_trainer_new on %s: %s\n", device, moe_error());
    assert_non_null(tr);
    moe_trainer_zero_grads(tr);
    moe_train_result res;
    int rc = moe_trainer_backward(tr, &bt->b, 1.0f / 17.0f, 1.0f, &res);
    if (rc < 0) print_error("moe_trainer_backward on %s: %s\n", device, moe_error());
    assert_int_equal(rc, 0);
    out->loss = res.loss_sum;
    out->aux = res.aux_loss;
    out->np = moe_trainer_nparams(tr);
    out->names = moe_calloc((size_t)out->np, sizeof(char *));
    out->g = moe_calloc((size_t)out->np, sizeof(float *));
    out->n = moe_calloc((size_t)out->np, sizeof(size_t));
    const moe_backend *be = moe_model_backend(m);
    for (int i = 0; i < out->np; i++) {
        moe_param *p = moe_trainer_param(tr, i);
        out->names[i] = moe_strdup(p->name);
        out->n[i] = p->n;
        out->g[i] = moe_malloc(sizeof(float) * (p->n ? p->n : 1));
        be->download(out->g[i], p->g, sizeof(float) * p->n);
    }
    assert_int_equal(moe_backend_status(be), 0);
    moe_trainer_free(tr);
    moe_model_close(m);
}

static void free_grads(grads *g) {
    for (int i = 0; i < g->np; i++) free(g->names[i]), free(g->g[i]);
    free(g->names), free(g->g), free(g->n);
}

static void compare_grads(const char *what, const grads *gpu, const grads *cpu, double tol) {
    assert_int_equal(gpu->np, cpu->np);
    assert_true(cpu->np > 0);
    for (int i = 0; i < cpu->np; i++) {
        assert_string_equal(gpu->names[i], cpu->names[i]);
        assert_int_equal(gpu->n[i], cpu->n[i]);
        char name[256];
        snprintf(name, sizeof name, "%s: d %s", what, cpu->names[i]);
        check_close(name, gpu->g[i], cpu->g[i], cpu->n[i], tol);
    }
}

static void one_model(const char *arch, moe_train_set set, int condense) {
    char dir[256];
    snprintf(dir, sizeof dir, "tests/fixtures/models/%s-bf16", arch);
    moe_model_opts o = {.device = "cpu"};
    moe_model *m = moe_model_open(dir, &o);
    assert_non_null(m);
    int V = moe_model_config(m)->vocab_size;
    moe_model_close(m);
    batch bt;
    make_batch(&bt, V);
    moe_train_opts to = {.set = set, .aux_coef = set == MOE_TRAIN_ALL ? 0.01 : 0};
    grads cpu, gpu32, gpu;
    run_trainer(&cpu, dir, "cpu", &to, &bt, condense);
    moe_cuda_set_precision(MOE_CUDA_PREC_F32);
    run_trainer(&gpu32, dir, "cuda", &to, &bt, condense);
    moe_cuda_set_precision(MOE_CUDA_PREC_BF16);
    char what[96];
    snprintf(what, sizeof what, "%s %s f32 GEMMs", arch, set == MOE_TRAIN_ALL ? "all" : "condensed");
    double l32 = gpu32.loss;
    check_close_d(what, &l32, &cpu.loss, 1, 1e-5);
    if (set == MOE_TRAIN_ALL) check_close_d(what, &gpu32.aux, &cpu.aux, 1, 1e-4);
    compare_grads(what, &gpu32, &cpu, 1e-4);
    run_trainer(&gpu, dir, "cuda", &to, &bt, condense); /* BF16 GEMMs: the loss only */
    snprintf(what, sizeof what, "%s loss, BF16 GEMMs", arch);
    check_close_d(what, &gpu.loss, &cpu.loss, 1, 1e-2);
    free_grads(&cpu), free_grads(&gpu32), free_grads(&gpu);
    free_batch(&bt);
}

static void test_train_all(void **state) {
    (void)state;
    const char *archs[] = {"deepseek", "qwen2_moe", "qwen3_moe", "olmoe", "mixtral"};
    for (int i = 0; i < 5; i++) one_model(archs[i], MOE_TRAIN_ALL, 0);
}

static void test_train_condensed(void **state) {
    (void)state;
    one_model("deepseek", MOE_TRAIN_CONDENSED, 1);
}

int main(void) {
    int rc = gpu_test_init();
    if (rc) return rc;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_train_all),
        cmocka_unit_test(test_train_condensed),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
