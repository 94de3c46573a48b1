/* test_optim.c - moe-tune's optimizer (lib/optim.c): the schedule's values,
 * AdamW steps with clipping and weight decay against a double-precision
 * transcription of PyTorch's AdamW and clip_grad_norm_, and the resume state
 * (save, load into a fresh optimizer, the next step the same bytes). */
#include "optim.h"
#include "common.h"
#include "testutil.h"

static void test_schedule(void **state) {
    (void)state;
    moe_optim_opts o;
    moe_optim_defaults(&o);
    o.lr = 1e-3;
    o.lr_min = 1e-4;
    o.steps = 10;
    o.warmup = 2;
    assert_int_equal(moe_optim_warmup_steps(&o), 2);
    assert_float_equal(moe_optim_lr(&o, 1), 5e-4, 1e-15);
    assert_float_equal(moe_optim_lr(&o, 2), 1e-3, 1e-15);
    assert_float_equal(moe_optim_lr(&o, 3), 1e-3, 1e-15); /* the peak twice */
    assert_float_equal(moe_optim_lr(&o, 6), 1e-4 + 9e-4 * 4 / 7, 1e-15);
    assert_float_equal(moe_optim_lr(&o, 10), 1e-4, 1e-15); /* the floor at the last step */
    o.warmup = 0.25; /* a ratio: round(2.5) = 3 steps */
    assert_int_equal(moe_optim_warmup_steps(&o), 3);
    assert_float_equal(moe_optim_lr(&o, 3), 1e-3, 1e-15);
    o.warmup = 0;
    assert_float_equal(moe_optim_lr(&o, 1), 1e-4 + 9e-4 * 9 / 9, 1e-15);
    assert_float_equal(moe_optim_lr(&o, 2), 1e-4 + 9e-4 * 8 / 9, 1e-15);
    o.warmup = 3; /* the README's example: 3.33e-4, 6.67e-4, 1e-3, 1e-3, 8.5e-4, ..., 1e-4 */
    double want[10] = {1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3, 8.5e-4, 7e-4, 5.5e-4, 4e-4, 2.5e-4, 1e-4};
    for (int k = 1; k <= 10; k++) assert_float_equal(moe_optim_lr(&o, k), want[k - 1], 1e-15);
}

/* Two parameters: a [2, 3] matrix (decayed) and a [4] vector (not). */
typedef struct {
    moe_param p[2];
    moe_param *ptr[2];
    float w[2][6], g[2][6];
} params;

static void make_params(params *ps) {
    memset(ps, 0, sizeof *ps);
    const char *names[2] = {"model.layers.0.mlp.up_proj.weight", "model.norm.weight"};
    for (int i = 0; i < 2; i++) {
        moe_param *p = &ps->p[i];
        p->name = names[i];
        p->layer = i ? -1 : 0;
        p->ndim = i ? 1 : 2;
        p->shape[0] = i ? 4 : 2;
        p->shape[1] = i ? 0 : 3;
        p->n = i ? 4 : 6;
        p->w = ps->w[i];
        p->g = ps->g[i];
        for (size_t j = 0; j < p->n; j++) ps->w[i][j] = 0.5f - 0.3f * (float)j + (float)i;
        ps->ptr[i] = p;
    }
}

static void set_grads(params *ps, int step) {
    for (int i = 0; i < 2; i++)
        for (size_t j = 0; j < ps->p[i].n; j++) ps->g[i][j] = (float)(0.4 * sin(1.0 + j + 3 * i + step) * (i + 1));
}

/* PyTorch: clip_grad_norm_ then AdamW, in double. */
static void reference_step(double w[2][6], double m[2][6], double v[2][6], params *ps, const moe_optim_opts *o,
                           int k) {
    double ss = 0;
    for (int i = 0; i < 2; i++)
        for (size_t j = 0; j < ps->p[i].n; j++) ss += (double)ps->g[i][j] * ps->g[i][j];
    double norm = sqrt(ss), coef = o->clip / (norm + 1e-6), s = coef < 1 ? coef : 1;
    double lr = moe_optim_lr(o, k), bc1 = 1 - pow(o->beta1, k), bc2 = 1 - pow(o->beta2, k);
    for (int i = 0; i < 2; i++)
        for (size_t j = 0; j < ps->p[i].n; j++) {
            double g = ps->g[i][j] * s;
            w[i][j] -= lr * (i == 0 ? o->weight_decay : 0) * w[i][j];
            m[i][j] = o->beta1 * m[i][j] + (1 - o->beta1) * g;
            v[i][j] = o->beta2 * v[i][j] + (1 - o->beta2) * g * g;
            w[i][j] -= lr / bc1 * m[i][j] / (sqrt(v[i][j]) / sqrt(bc2) + o->eps);
        }
}

static moe_optim_opts test_opts(void) {
    moe_optim_opts o;
    moe_optim_defaults(&o);
    o.lr = 1e-2;
    o.lr_min = 1e-3;
    o.steps = 4;
    o.warmup = 1;
    o.weight_decay = 0.1;
    o.clip = 0.5; /* below the gradients' norm (about 1.3): clipping acts */
    return o;
}

static void test_adamw_steps(void **state) {
    (void)state;
    const moe_backend *b = moe_backend_cpu();
    params ps;
    make_params(&ps);
    double w[2][6], m[2][6] = {{0}}, v[2][6] = {{0}};
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 6; j++) w[i][j] = ps.w[i][j];
    moe_optim_opts o = test_opts();
    moe_optim *op = moe_optim_new(b, ps.ptr, 2, &o);
    assert_non_null(op);
    for (int k = 1; k <= 4; k++) {
        set_grads(&ps, k);
        moe_optim_stats st;
        assert_int_equal(moe_optim_step(op, &st), 0);
        assert_true(st.gscale < 1);
        assert_float_equal(st.lr, moe_optim_lr(&o, k), 0);
        reference_step(w, m, v, &ps, &o, k);
        for (int i = 0; i < 2; i++)
            for (size_t j = 0; j < ps.p[i].n; j++)
                if (fabs(ps.w[i][j] - w[i][j]) > 1e-6 * fabs(w[i][j]) + 1e-7)
                    fail_msg("step %d param %d [%zu]: %.9g, PyTorch %.9g", k, i, j, ps.w[i][j], w[i][j]);
    }
    assert_int_equal(moe_optim_steps_done(op), 4);
    moe_optim_free(op);
}

static void test_state_round_trip(void **state) {
    (void)state;
    const moe_backend *b = moe_backend_cpu();
    moe_optim_opts o = test_opts();
    params a, c;
    make_params(&a);
    moe_optim *oa = moe_optim_new(b, a.ptr, 2, &o);
    assert_non_null(oa);
    for (int k = 1; k <= 2; k++) {
        set_grads(&a, k);
        assert_int_equal(moe_optim_step(oa, NULL), 0);
    }
    const char *path = tu_path("state.safetensors");
    moe_st_writer *w = moe_st_writer_open(path);
    assert_int_equal(moe_optim_save(oa, w), 0);
    assert_int_equal(moe_st_writer_close(w), 0);

    make_params(&c); /* masters back at their start: load must restore them */
    moe_optim *oc = moe_optim_new(b, c.ptr, 2, &o);
    moe_st_file *f = moe_st_open(path);
    assert_non_null(f);
    assert_int_equal(moe_optim_load(oc, f), 0);
    moe_st_close(f);
    assert_int_equal(moe_optim_steps_done(oc), 2);
    assert_memory_equal(a.w, c.w, sizeof a.w);
    set_grads(&a, 3);
    set_grads(&c, 3);
    assert_int_equal(moe_optim_step(oa, NULL), 0);
    assert_int_equal(moe_optim_step(oc, NULL), 0);
    assert_memory_equal(a.w, c.w, sizeof a.w); /* moments and step count restored too */

    /* a state without a parameter is refused, naming it */
    c.p[1].name = "model.other.weight";
    f = moe_st_open(path);
    assert_int_equal(moe_optim_load(oc, f), -1);
    assert_non_null(strstr(moe_error(), "tensor model.other.weight.master missing"));
    moe_st_close(f);
    moe_optim_free(oa);
    moe_optim_free(oc);
}

static void test_divergence_is_an_error(void **state) {
    (void)state;
    params ps;
    make_params(&ps);
    moe_optim_opts o = test_opts();
    moe_optim *op = moe_optim_new(moe_backend_cpu(), ps.ptr, 2, &o);
    assert_non_null(op);
    set_grads(&ps, 1);
    ps.g[1][2] = NAN;
    assert_int_equal(moe_optim_step(op, NULL), -1);
    assert_non_null(strstr(moe_error(), "step 1: the gradient norm is nan"));
    moe_optim_free(op);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_schedule),
        cmocka_unit_test(test_adamw_steps),
        cmocka_unit_test(test_state_round_trip),
        cmocka_unit_test(test_divergence_is_an_error),
    };
    return cmocka_run_group_tests(tests, tu_setup_dir, tu_teardown_dir);
}
