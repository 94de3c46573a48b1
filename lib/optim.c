/* optim.c - AdamW, the schedule, clipping and the resume state (see optim.h). */
#include "optim.h"
#include "common.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct moe_optim {
    const moe_backend *b;
    moe_optim_opts o;
    moe_param *const *params;
    int n;
    float **m, **v;    /* [n] moments, backend memory */
    long step;
    float *host;       /* save: masters and moments downloaded, kept until free */
};

void moe_optim_defaults(moe_optim_opts *o) {
    memset(o, 0, sizeof *o);
    o->lr = 1e-5;
    o->lr_min = 0;
    o->beta1 = 0.9;
    o->beta2 = 0.999;
    o->eps = 1e-8;
    o->weight_decay = 0.01;
    o->clip = 1.0;
}

long moe_optim_warmup_steps(const moe_optim_opts *o) {
    long w = o->warmup < 1 ? lround(o->warmup * (double)o->steps) : lround(o->warmup);
    return w < 0 ? 0 : w > o->steps ? o->steps : w;
}

double moe_optim_lr(const moe_optim_opts *o, long k) {
    long w = moe_optim_warmup_steps(o), n = o->steps;
    if (k <= w) return o->lr * (double)k / (double)w;
    if (n - 1 <= w) return o->lr; /* one step after the warm-up: it is the last */
    return o->lr_min + (o->lr - o->lr_min) * (double)(n - k) / (double)(n - 1 - w);
}

moe_optim *moe_optim_new(const moe_backend *b, moe_param *const *params, int n, const moe_optim_opts *o) {
    if (!b->adamw || !b->sumsq) {
        moe_error_set(MOE_ERR_DEVICE, "backend %s has no optimizer ops (adamw, sumsq)", b->name);
        return NULL;
    }
    moe_optim *op = moe_calloc(1, sizeof *op);
    op->b = b;
    op->o = *o;
    op->params = params;
    op->n = n;
    op->m = moe_calloc((size_t)(n ? n : 1), sizeof *op->m);
    op->v = moe_calloc((size_t)(n ? n : 1), sizeof *op->v);
    for (int i = 0; i < n; i++) {
        size_t bytes = params[i]->n * sizeof(float);
        op->m[i] = b->alloc(bytes);
        op->v[i] = b->alloc(bytes);
        b->zero(op->m[i], bytes);
        b->zero(op->v[i], bytes);
    }
    return op;
}

void moe_optim_free(moe_optim *op) {
    if (!op) return;
    for (int i = 0; i < op->n; i++) {
        op->b->free(op->m[i]);
        op->b->free(op->v[i]);
    }
    free(op->m);
    free(op->v);
    free(op->host);
    free(op);
}

long moe_optim_steps_done(const moe_optim *op) { return op->step; }

/* Matrices decay; vectors (biases, norms, fixed expert weights) do not. */
static int decays(const moe_param *p) { return p->ndim >= 2; }

int moe_optim_step(moe_optim *op, moe_optim_stats *st) {
    const moe_backend *b = op->b;
    double ss = 0; /* parameter by parameter, in order: the same sum every run */
    for (int i = 0; i < op->n; i++) ss += b->sumsq(op->params[i]->g, op->params[i]->n);
    double norm = sqrt(ss);
    if (!isfinite(norm)) {
        moe_error_set(MOE_ERR_DATA, "step %ld: the gradient norm is %g (the loss diverged; lower --lr)",
                      op->step + 1, norm);
        return -1;
    }
    double gscale = 1;
    if (op->o.clip > 0 && op->o.clip / (norm + 1e-6) < 1) gscale = op->o.clip / (norm + 1e-6);
    long k = ++op->step;
    double lr = moe_optim_lr(&op->o, k);
    for (int i = 0; i < op->n; i++) {
        moe_param *p = op->params[i];
        b->adamw(p->w, op->m[i], op->v[i], p->g, p->n, (float)lr, (float)op->o.beta1, (float)op->o.beta2,
                 (float)op->o.eps, decays(p) ? (float)op->o.weight_decay : 0.0f, (float)gscale, (int)k);
    }
    if (st) *st = (moe_optim_stats){.step = k, .lr = lr, .grad_norm = norm, .gscale = gscale};
    return 0;
}

/* ---- resume state ---------------------------------------------------------- */

static const char *state_part[3] = {"master", "exp_avg", "exp_avg_sq"};

static float *state_buffer(moe_optim *op, int i, int part) {
    return part == 0 ? op->params[i]->w : part == 1 ? op->m[i] : op->v[i];
}

int moe_optim_save(moe_optim *op, moe_st_writer *w) {
    size_t total = 0;
    for (int i = 0; i < op->n; i++) total += 3 * op->params[i]->n;
    free(op->host);
    op->host = moe_malloc((total ? total : 1) * sizeof(float));
    float *h = op->host;
    for (int i = 0; i < op->n; i++) {
        moe_param *p = op->params[i];
        for (int part = 0; part < 3; part++, h += p->n) {
            op->b->download(h, state_buffer(op, i, part), p->n * sizeof(float));
            char name[512];
            snprintf(name, sizeof name, "%s.%s", p->name, state_part[part]);
            if (moe_st_writer_add(w, name, MOE_DT_F32, p->ndim, p->shape, h, NULL, NULL) < 0) return -1;
        }
    }
    char step[32];
    snprintf(step, sizeof step, "%ld", op->step);
    return moe_st_writer_meta(w, "optim_step", step);
}

int moe_optim_load(moe_optim *op, const moe_st_file *f) {
    const char *step = moe_st_metadata(f, "optim_step");
    char *end = NULL;
    long k = step ? strtol(step, &end, 10) : -1;
    if (!step || *end || k < 0) {
        moe_error_set(MOE_ERR_DATA, "%s: no optimizer step count (metadata optim_step)", moe_st_path(f));
        return -1;
    }
    float *h = NULL;
    size_t cap = 0;
    for (int i = 0; i < op->n; i++) {
        moe_param *p = op->params[i];
        if (p->n > cap) h = moe_realloc(h, (cap = p->n) * sizeof(float));
        for (int part = 0; part < 3; part++) {
            char name[512];
            snprintf(name, sizeof name, "%s.%s", p->name, state_part[part]);
            const moe_st_tensor *t = moe_st_find(f, name);
            if (!t) {
                moe_error_set(MOE_ERR_DATA, "%s: tensor %s missing (was the state saved with other --train "
                              "options?)", moe_st_path(f), name);
                free(h);
                return -1;
            }
            if (moe_st_check_shape(t, p->ndim, p->shape) < 0 || moe_st_read_f32(t, h) < 0) {
                free(h);
                return -1;
            }
            op->b->upload(state_buffer(op, i, part), h, p->n * sizeof(float));
        }
    }
    free(h);
    op->step = k;
    return 0;
}
