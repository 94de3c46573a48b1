/* tune.c - a moe-tune run (see tune.h). */
#define _GNU_SOURCE
#include "tune.h"
#include "common.h"
#include "condense.h"
#include "dtype.h"
#include "tune_data.h"

#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define STATE_FILE "tune-state.safetensors"
#define LOG_FILE "tune.msgpack.zst"
#define LOG_COLS 11 /* a log entry as a row of the state's "log" tensor */

typedef struct {
    int is_val;
    moe_tune_step s;
    moe_tune_val v;
} log_entry;

typedef struct {
    const moe_tune_opts *o;
    moe_model *m;
    moe_trainer *tr;
    const moe_backend *b;
    moe_param **params;
    int np;
    moe_tokenizer *tok;
    moe_tune_data data[2], val;
    int nstages, has_val;
    log_entry *log;
    long nlog;
    double t0;                /* moe_now() at the start, less the resumed run's seconds */
    char options[2048];       /* what decides the result, for --resume */
    int resume_stage;         /* the saved position: stage and step within it (0: none) */
    long resume_step, resume_global;
    moe_st_file *state;
} tune_run;

void moe_tune_defaults(moe_tune_opts *o) {
    memset(o, 0, sizeof *o);
    moe_optim_defaults(&o->optim);
    o->train.aux_coef = -1;
    o->epochs = 1;
    o->batch = 8;
    o->accum = 1;
    o->max_length = 256;
    o->shuffle = 1;
}

/* ---- steps and batches ------------------------------------------------------- */

static long steps_per_epoch(const tune_run *r, int stage) {
    long per = (long)r->o->batch * r->o->accum;
    return (r->data[stage].n + per - 1) / per;
}

static long stage_steps(const tune_run *r, int stage) {
    return r->o->steps > 0 ? r->o->steps : r->o->epochs * steps_per_epoch(r, stage);
}

/* The sequences of step k (from 1) of a stage: [*first, *last) of order, which
 * is filled with the step's epoch order. */
static long step_sequences(const tune_run *r, int stage, long k, int *order, int *first, int *last) {
    long spe = steps_per_epoch(r, stage), epoch = (k - 1) / spe, j = (k - 1) % spe;
    long per = (long)r->o->batch * r->o->accum;
    int n = r->data[stage].n;
    moe_tune_epoch_order(order, n, r->o->seed + (uint64_t)stage * 0x9E3779B97F4A7C15ull, epoch, r->o->shuffle);
    *first = (int)(j * per);
    *last = (int)((j + 1) * per < n ? (j + 1) * per : n);
    return epoch + 1;
}

/* A trainer batch over seqs[idx[0 .. n-1]] (arrays of at least n entries). */
static void make_batch(moe_train_batch *b, const moe_tune_data *d, const int *idx, int n, const int32_t **ids,
                       const int32_t **targets, int *lens) {
    for (int i = 0; i < n; i++) {
        const moe_tune_seq *q = &d->seqs[idx[i]];
        ids[i] = q->ids;
        targets[i] = q->targets;
        lens[i] = q->len;
    }
    *b = (moe_train_batch){.nseq = n, .ids = ids, .targets = targets, .lens = lens};
}

/* Forward and backward of one step's micro-batches; gradients accumulated. */
static int step_gradients(tune_run *r, int stage, const int *seqs, int n, moe_tune_step *st) {
    const moe_tune_data *d = &r->data[stage];
    long ntok = 0;
    for (int i = 0; i < n; i++) ntok += d->seqs[seqs[i]].ntargets;
    float dscale = ntok ? 1.0f / (float)ntok : 0.0f;
    const int32_t **ids = moe_malloc((size_t)r->o->batch * sizeof *ids);
    const int32_t **targets = moe_malloc((size_t)r->o->batch * sizeof *targets);
    int *lens = moe_malloc((size_t)r->o->batch * sizeof *lens);
    /* the load-balancing term (--train all) is averaged over the micro-batches,
     * so the objective does not depend on how a step is split */
    int nmb = (n + r->o->batch - 1) / r->o->batch;
    double loss = 0, aux = 0;
    int rc = 0;
    moe_trainer_zero_grads(r->tr);
    for (int at = 0; rc == 0 && at < n; at += r->o->batch) {
        moe_train_batch b;
        moe_train_result res;
        make_batch(&b, d, seqs + at, n - at < r->o->batch ? n - at : r->o->batch, ids, targets, lens);
        rc = moe_trainer_backward(r->tr, &b, dscale, 1.0f / (float)nmb, &res);
        loss += res.loss_sum;
        aux += res.aux_loss;
    }
    free(ids);
    free(targets);
    free(lens);
    st->loss = (ntok ? loss / (double)ntok : 0) + aux / nmb;
    st->tokens = ntok;
    st->sequences = n;
    return rc;
}

/* Mean cross-entropy per token over the validation set. */
static int validate(tune_run *r, moe_tune_val *v) {
    const moe_tune_data *d = &r->val;
    int B = r->o->batch, *idx = moe_malloc((size_t)B * sizeof *idx), *lens = moe_malloc((size_t)B * sizeof *lens);
    const int32_t **ids = moe_malloc((size_t)B * sizeof *ids), **targets = moe_malloc((size_t)B * sizeof *targets);
    double loss = 0;
    long ntok = 0;
    int rc = 0;
    for (int at = 0; rc == 0 && at < d->n; at += B) {
        int n = d->n - at < B ? d->n - at : B;
        for (int i = 0; i < n; i++) idx[i] = at + i;
        moe_train_batch b;
        moe_train_result res;
        make_batch(&b, d, idx, n, ids, targets, lens);
        rc = moe_trainer_loss(r->tr, &b, &res);
        loss += res.loss_sum;
        ntok += res.ntokens;
    }
    free(idx);
    free(lens);
    free(ids);
    free(targets);
    v->loss = ntok ? loss / (double)ntok : 0;
    v->tokens = ntok;
    return rc;
}

static void log_add(tune_run *r, const log_entry *e) {
    r->log = moe_realloc(r->log, (size_t)(r->nlog + 1) * sizeof *r->log);
    r->log[r->nlog++] = *e;
}

/* ---- the output checkpoint ------------------------------------------------------ */

static moe_param *find_param(const tune_run *r, const char *name) {
    for (int i = 0; i < r->np; i++)
        if (strcmp(r->params[i]->name, name) == 0) return r->params[i];
    return NULL;
}

/* A parameter's master in host memory (float32, malloc'd). */
static float *param_host(const tune_run *r, const moe_param *p) {
    float *h = moe_malloc((p->n ? p->n : 1) * sizeof *h);
    r->b->download(h, p->w, p->n * sizeof *h);
    return h;
}

/* config.json: the source's, condensed weights replaced by the trained ones,
 * and the provenance entry. */
static char *tuned_config_json(const tune_run *r) {
    char path[4096];
    json_t *root = moe_config_json_load(r->o->model_dir, path, sizeof path);
    if (!root) return NULL;
    json_t *cl = json_object_get(root, "condensed_layers");
    for (int i = 0; i < r->np; i++) {
        int l;
        if (sscanf(r->params[i]->name, "condensed_layers.%d.weights", &l) != 1) continue;
        char key[16];
        snprintf(key, sizeof key, "%d", l);
        json_t *entry = json_object_get(cl, key), *wt = json_array();
        float *h = param_host(r, r->params[i]);
        for (size_t j = 0; j < r->params[i]->n; j++) json_array_append_new(wt, json_real(h[j]));
        free(h);
        if (json_is_object(entry)) json_object_set(entry, "weights", wt);
        json_decref(wt);
    }
    moe_config_json_provenance(root, "moe-tune", r->o->argc, r->o->argv, moe_model_fingerprint(r->m));
    return moe_config_json_text(root, path);
}

static int copy_fill(void *ctx, const char *name, uint64_t start, uint64_t n, void *out) {
    (void)name;
    const moe_st_tensor *t = ctx;
    size_t esize = (size_t)moe_dtype_bits(t->dtype) / 8;
    memcpy(out, (const char *)t->data + start * esize, n * esize);
    return 0;
}

/* Every tensor of the source: trained ones from their masters (in the
 * tensor's dtype; the buffers go to *bufs, freed by the caller after close). */
static int add_tensors(const tune_run *r, moe_ckpt_writer *w, void ***bufs, int *nbufs) {
    const moe_ckpt *ck = moe_model_ckpt(r->m);
    moe_tensor_ref *refs;
    int n = moe_config_tensor_list(moe_ckpt_config(ck), &refs), rc = n < 0 ? -1 : 0;
    *bufs = moe_calloc((size_t)(r->np + 1), sizeof **bufs);
    for (int i = 0; rc == 0 && i < n; i++) {
        const moe_st_tensor *t = moe_ckpt_find(ck, refs[i].name);
        const moe_param *p = find_param(r, refs[i].name);
        if (!t) {
            moe_error_set(MOE_ERR_DATA, "%s: tensor %s missing", moe_ckpt_dir(ck), refs[i].name);
            rc = -1;
        } else if (p) {
            float *h = param_host(r, p);
            void *data = moe_malloc(p->n * (size_t)moe_dtype_bits(t->dtype) / 8 + 1);
            rc = moe_dtype_from_f32(t->dtype, h, data, p->n);
            free(h);
            (*bufs)[(*nbufs)++] = data;
            if (rc == 0) rc = moe_ckpt_writer_add(w, refs[i].name, t->dtype, t->ndim, t->shape, data, NULL, NULL);
        } else {
            rc = moe_ckpt_writer_add(w, refs[i].name, t->dtype, t->ndim, t->shape, NULL, copy_fill, (void *)t);
        }
    }
    if (n >= 0) free(refs);
    return rc;
}

static int write_log(const tune_run *r, const char *path) {
    moe_provenance prov = {.tool = "moe-tune", .argc = r->o->argc, .argv = r->o->argv,
                           .model = moe_model_fingerprint(r->m), .kind = MOE_KIND_TUNE};
    moe_writer *w = moe_writer_open(path, NULL, &prov, r->o->no_provenance);
    if (!w) return -1;
    int rc = 0;
    for (long i = 0; rc == 0 && i < r->nlog; i++)
        rc = r->log[i].is_val ? moe_tune_val_write(w, &r->log[i].v) : moe_tune_step_write(w, &r->log[i].s);
    if (rc < 0) {
        moe_writer_abort(w);
        return -1;
    }
    return moe_writer_close(w);
}

static void log_rows(const tune_run *r, double *rows) {
    for (long i = 0; i < r->nlog; i++) {
        const log_entry *e = &r->log[i];
        double *x = rows + i * LOG_COLS;
        if (e->is_val) {
            double v[LOG_COLS] = {1, e->v.stage, (double)e->v.step, 0, e->v.loss, 0, 0, (double)e->v.tokens};
            memcpy(x, v, sizeof v);
        } else {
            const moe_tune_step *s = &e->s;
            double v[LOG_COLS] = {0, s->stage, (double)s->step, (double)s->epoch, s->loss, s->lr, s->grad_norm,
                                  (double)s->tokens, (double)s->sequences, s->tokens_per_s, s->seconds};
            memcpy(x, v, sizeof v);
        }
    }
}

static int write_state(const tune_run *r, moe_optim *op, const char *dir, int stage, long step, long global) {
    char path[4096], num[64];
    snprintf(path, sizeof path, "%s/%s", dir, STATE_FILE);
    moe_st_writer *w = moe_st_writer_open(path);
    if (!w) return -1;
    double *rows = moe_malloc((size_t)(r->nlog ? r->nlog : 1) * LOG_COLS * sizeof *rows);
    log_rows(r, rows);
    int64_t shape[2] = {r->nlog, LOG_COLS};
    int rc = moe_optim_save(op, w);
    if (rc == 0 && r->nlog) rc = moe_st_writer_add(w, "log", MOE_DT_F64, 2, shape, rows, NULL, NULL);
    snprintf(num, sizeof num, "%d %ld %ld", stage, step, global);
    if (rc == 0) rc = moe_st_writer_meta(w, "position", num);
    if (rc == 0) rc = moe_st_writer_meta(w, "options", r->options);
    if (rc == 0) rc = moe_st_writer_meta(w, "source_model", moe_model_fingerprint(r->m));
    if (rc == 0) rc = moe_st_writer_close(w);
    else moe_st_writer_abort(w);
    free(rows);
    return rc;
}

/* Write OUT (replacing an earlier save of this run); with_state: the resume state too. */
static int save(const tune_run *r, moe_optim *op, int with_state, int stage, long step, long global) {
    const moe_ckpt *ck = moe_model_ckpt(r->m);
    char *config = tuned_config_json(r);
    uint64_t shard = moe_ckpt_bytes(ck) > 5000000000ull ? 5000000000ull : 0;
    moe_ckpt_writer *w = config ? moe_ckpt_writer_open(r->o->out_dir, shard, 1) : NULL;
    void **bufs = NULL;
    int nbufs = 0, rc = w ? add_tensors(r, w, &bufs, &nbufs) : -1;
    const char *tmp = w ? moe_ckpt_writer_tmpdir(w) : NULL;
    char path[4096];
    if (rc == 0) rc = moe_condense_copy_side_files(r->o->model_dir, tmp);
    if (rc == 0) rc = moe_ckpt_writer_text(w, "config.json", config);
    if (rc == 0) {
        snprintf(path, sizeof path, "%s/%s", tmp, LOG_FILE);
        rc = write_log(r, path);
    }
    if (rc == 0 && with_state) rc = write_state(r, op, tmp, stage, step, global);
    if (rc == 0) rc = moe_ckpt_writer_close(w);
    else if (w) {
        moe_ckpt_writer_abort(w);
    }
    for (int i = 0; i < nbufs; i++) free(bufs[i]);
    free(bufs);
    free(config);
    if (rc == 0 && r->o->log) rc = write_log(r, r->o->log);
    return rc;
}

/* ---- setting up ------------------------------------------------------------------- */

/* What decides the result, as "key=value" words: a resumed run must agree. */
static void describe_options(tune_run *r) {
    const moe_tune_opts *o = r->o;
    char layers[512] = "";
    for (int i = 0, n = 0; i < o->train.nlayers && n < (int)sizeof layers - 16; i++)
        n += snprintf(layers + n, sizeof layers - (size_t)n, "%s%d", i ? "," : "", o->train.layers[i]);
    snprintf(r->options, sizeof r->options,
             "train=%d:%s train_weights=%d lr=%.9g min_lr=%.9g warmup=%.9g epochs=%ld steps=%ld batch=%d "
             "accum=%d max_length=%d shuffle=%d seed=%llu clip=%.9g weight_decay=%.9g aux_coef=%.9g "
             "data=%d/%ld sft=%d/%ld",
             (int)o->train.set, layers, o->train.train_weights, o->optim.lr, o->optim.lr_min, o->optim.warmup,
             o->steps > 0 ? 0 : o->epochs, o->steps, o->batch, o->accum, o->max_length, o->shuffle,
             (unsigned long long)o->seed, o->optim.clip, o->optim.weight_decay, o->train.aux_coef, r->data[0].n,
             r->data[0].ntargets, r->data[1].n, r->data[1].ntargets);
}

static int load_data(tune_run *r) {
    const moe_config *cfg = moe_model_config(r->m);
    moe_tune_data_opts d = {.tok = r->tok, .model_dir = r->o->model_dir, .force = r->o->force,
                            .max_length = r->o->max_length, .vocab = cfg->vocab_size, .eos_id = cfg->eos_token_id};
    const char *files[2] = {r->o->data, r->o->sft};
    r->nstages = r->o->sft ? 2 : 1;
    for (int s = 0; s < r->nstages; s++)
        if (moe_tune_data_load(&r->data[s], files[s], &d) < 0) return -1;
    r->has_val = r->o->val != NULL;
    if (r->has_val && moe_tune_data_load(&r->val, r->o->val, &d) < 0) return -1;
    return 0;
}

static int open_run(tune_run *r) {
    moe_model_opts mo = {0};
    moe_model_opts_from_env(&mo);
    mo.device = r->o->device;
    if (r->o->precision) mo.precision = r->o->precision;
    r->m = moe_model_open(r->o->model_dir, &mo);
    if (!r->m) return -1;
    r->b = moe_model_backend(r->m);
    char tj[4096];
    struct stat st;
    snprintf(tj, sizeof tj, "%s/tokenizer.json", r->o->model_dir);
    if (stat(tj, &st) == 0 && !(r->tok = moe_tokenizer_open(r->o->model_dir))) return -1;
    if (load_data(r) < 0) return -1;
    r->tr = moe_trainer_new(r->m, &r->o->train);
    if (!r->tr) return -1;
    r->np = moe_trainer_nparams(r->tr);
    r->params = moe_calloc((size_t)(r->np + 1), sizeof *r->params);
    for (int i = 0; i < r->np; i++) r->params[i] = moe_trainer_param(r->tr, i);
    describe_options(r);
    return 0;
}

/* The first word where two option descriptions differ, for the message. */
static void first_difference(const char *a, const char *b, char *wa, char *wb, size_t n) {
    size_t i = 0;
    while (a[i] && a[i] == b[i]) i++;
    while (i > 0 && a[i - 1] != ' ') i--; /* back to the word's start */
    snprintf(wa, n, "%.*s", (int)strcspn(a + i, " "), a + i);
    snprintf(wb, n, "%.*s", (int)strcspn(b + i, " "), b + i);
}

/* The log so far, from the state's "log" tensor. */
static int read_log(tune_run *r, const char *path) {
    const moe_st_tensor *t = moe_st_find(r->state, "log");
    if (!t) return 0;
    if (t->ndim != 2 || t->shape[1] != LOG_COLS) {
        moe_error_set(MOE_ERR_DATA, "%s: tensor log: not [N, %d]", path, LOG_COLS);
        return -1;
    }
    double *rows = moe_malloc((size_t)t->shape[0] * LOG_COLS * sizeof *rows + 1);
    memcpy(rows, t->data, (size_t)t->shape[0] * LOG_COLS * sizeof *rows);
    for (int64_t i = 0; i < t->shape[0]; i++) {
        const double *x = rows + i * LOG_COLS;
        log_entry e = {.is_val = x[0] != 0};
        if (e.is_val) e.v = (moe_tune_val){(int)x[1], (long)x[2], x[4], (long)x[7]};
        else e.s = (moe_tune_step){(int)x[1], (long)x[2], (long)x[3], x[4], x[5], x[6], (long)x[7], (long)x[8],
                                   x[9], x[10]};
        log_add(r, &e);
    }
    if (r->nlog && !r->log[r->nlog - 1].is_val) r->t0 -= r->log[r->nlog - 1].s.seconds;
    free(rows);
    return 0;
}

/* --resume: the saved position, checked against this run's options. */
static int open_state(tune_run *r) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", r->o->resume, STATE_FILE);
    r->state = moe_st_open(path);
    if (!r->state) return -1;
    const char *pos = moe_st_metadata(r->state, "position"), *opt = moe_st_metadata(r->state, "options");
    const char *src = moe_st_metadata(r->state, "source_model");
    if (!pos || !opt || !src || sscanf(pos, "%d %ld %ld", &r->resume_stage, &r->resume_step, &r->resume_global) != 3 ||
        r->resume_stage < 1 || r->resume_stage > r->nstages) {
        moe_error_set(MOE_ERR_DATA, "%s: not a moe-tune state (metadata position, options, source_model)", path);
        return -1;
    }
    if (strcmp(src, moe_model_fingerprint(r->m)) != 0) {
        moe_error_set(MOE_ERR_DATA, "%s: saved from a run on another model (--model %s differs)", path,
                      r->o->model_dir);
        return -1;
    }
    if (strcmp(opt, r->options) != 0) {
        char was[256], now[256];
        first_difference(opt, r->options, was, now, sizeof was);
        moe_error_set(MOE_ERR_DATA, "%s: saved by a run with %s; this run has %s (a resumed run needs the same "
                      "options and data)", path, was, now);
        return -1;
    }
    return read_log(r, path);
}

static void close_run(tune_run *r) {
    moe_st_close(r->state);
    free(r->params);
    free(r->log);
    moe_trainer_free(r->tr);
    for (int s = 0; s < 2; s++) moe_tune_data_free(&r->data[s]);
    moe_tune_data_free(&r->val);
    if (r->tok) moe_tokenizer_close(r->tok);
    moe_model_close(r->m);
}

/* ---- the run ------------------------------------------------------------------------ */

typedef struct {
    int stage;          /* 0-based */
    long steps;         /* of the stage */
    long global0;       /* global step before the stage's first */
    moe_optim *op;
    int *order;
} stage_ctx;

/* One optimizer step k of the stage: gradients, update, log entry. */
static int take_step(tune_run *r, stage_ctx *c, long k, moe_tune_step *st) {
    int first, last;
    double t = moe_now();
    memset(st, 0, sizeof *st);
    st->stage = c->stage + 1;
    st->step = c->global0 + k;
    st->epoch = step_sequences(r, c->stage, k, c->order, &first, &last);
    if (step_gradients(r, c->stage, c->order + first, last - first, st) < 0) return -1;
    moe_optim_stats os;
    if (moe_optim_step(c->op, &os) < 0 || moe_trainer_sync_weights(r->tr) < 0) return -1;
    st->lr = os.lr;
    st->grad_norm = os.grad_norm;
    double now = moe_now();
    st->tokens_per_s = now > t ? (double)st->tokens / (now - t) : 0;
    st->seconds = now - r->t0;
    log_entry e = {.is_val = 0, .s = *st};
    log_add(r, &e);
    return 0;
}

static int add_validation(tune_run *r, int stage, long global, moe_tune_summary *sum) {
    log_entry e = {.is_val = 1};
    if (validate(r, &e.v) < 0) return -1;
    e.v.stage = stage + 1;
    e.v.step = global;
    log_add(r, &e);
    if (!sum->nval++) sum->first_val = e.v.loss;
    sum->last_val = e.v.loss;
    return 0;
}

/* Where a stage starts: 0, or the resumed step (the optimizer state loaded). */
static int stage_start(tune_run *r, stage_ctx *c, long *k0) {
    *k0 = 0;
    if (!r->state || c->stage + 1 > r->resume_stage) return 0;
    if (c->stage + 1 < r->resume_stage) {
        *k0 = c->steps; /* done before the save */
        return 0;
    }
    if (moe_optim_load(c->op, r->state) < 0 || moe_trainer_sync_weights(r->tr) < 0) return -1;
    *k0 = r->resume_step;
    return 0;
}

/* After step k: validation, periodic saves, the stop.  1: stop now. */
static int after_step(tune_run *r, stage_ctx *c, long k, moe_tune_summary *sum) {
    const moe_tune_opts *o = r->o;
    long g = c->global0 + k;
    int last = k == c->steps;
    if (r->has_val && ((o->val_every > 0 && k % o->val_every == 0) || last) && add_validation(r, c->stage, g, sum) < 0)
        return -1;
    if (o->stop_after > 0 && g == o->stop_after) {
        sum->stopped = 1;
        return save(r, c->op, 1, c->stage + 1, k, g) < 0 ? -1 : 1;
    }
    if (o->save_every > 0 && g % o->save_every == 0 && !(last && c->stage + 1 == r->nstages) &&
        save(r, c->op, 1, c->stage + 1, k, g) < 0)
        return -1;
    return 0;
}

/* Stage s from its start (or the resumed step) to its end.  1: stopped. */
static int run_stage(tune_run *r, stage_ctx *c, moe_tune_summary *sum) {
    moe_optim_opts oo = r->o->optim;
    oo.steps = c->steps;
    c->op = moe_optim_new(r->b, r->params, r->np, &oo);
    long k0;
    if (!c->op || stage_start(r, c, &k0) < 0) return -1;
    c->order = moe_malloc((size_t)r->data[c->stage].n * sizeof *c->order);
    int rc = 0;
    for (long k = k0 + 1; rc == 0 && k <= c->steps; k++) {
        moe_tune_step st;
        if ((rc = take_step(r, c, k, &st)) < 0) break;
        if (!sum->steps++) sum->first_loss = st.loss;
        sum->last_loss = st.loss;
        if (r->o->progress) r->o->progress(r->o->progress_ctx, &st, k, c->steps);
        rc = after_step(r, c, k, sum);
    }
    free(c->order);
    return rc;
}

int moe_tune_run(const moe_tune_opts *o, moe_tune_summary *sum) {
    tune_run r = {.o = o};
    memset(sum, 0, sizeof *sum);
    r.t0 = moe_now();
    int rc = open_run(&r);
    if (rc == 0 && o->resume) rc = open_state(&r);
    long global0 = 0;
    moe_optim *last = NULL;
    for (int s = 0; rc == 0 && s < r.nstages; s++) {
        stage_ctx c = {.stage = s, .steps = stage_steps(&r, s), .global0 = global0};
        rc = run_stage(&r, &c, sum);
        global0 += c.steps;
        moe_optim_free(last);
        last = c.op;
        if (rc == 1) break;
    }
    if (rc == 0) rc = save(&r, last, o->save_state, r.nstages, stage_steps(&r, r.nstages - 1), global0);
    moe_optim_free(last);
    close_run(&r);
    return rc < 0 ? -1 : 0;
}
