/* gpu_train.c - training steps of lib/train.h for bench/gpu-check.sh and
 * bench/tune-memory.sh (and, with --device cpu, for CPU timings):
 *
 *   gpu_train --model DIR --seqs N --len T [--steps S] [--recompute]
 *             [--all] [--device cuda|cpu]
 *
 * S steps of MOE_TRAIN_CONDENSED (--all: MOE_TRAIN_ALL) on N random
 * sequences of T tokens: zero the gradients, forward + backward
 * (dscale 1/tokens), AdamW on every trained tensor (float32 moments, lr
 * 1e-5, weight decay 0.01), refresh the compute copies.  Prints one JSON
 * object: backend bytes live after opening the model, after building the
 * trainer, after allocating the moments; seconds per step (the steps after
 * the first when S > 1), tokens/s, achieved model TFLOP/s (forward 2·N·P
 * over every layer, backward 2·N·P for d input above the lowest trained
 * layer + 2·N·P_trained for the weight gradients; attention's T² terms and
 * recomputation not counted), the last loss, the backend's peak bytes.
 * Exits 77 ("SKIP: ...") for cuda without a device. */
#include <getopt.h>
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
#include "gpu_bench.h"

static int die(const char *what) {
    fprintf(stderr, "gpu_train: %s: %s\n", what, moe_error());
    return moe_error_kind() == MOE_ERR_DEVICE ? 4 : 1;
}

static size_t live_bytes(const moe_backend *be) {
    size_t live = 0, peak = 0;
    if (be->mem_used) be->mem_used(&live, &peak);
    return live;
}

/* weights one token multiplies by in layer l (the experts it reaches) */
static double layer_params(const moe_model *m, int l) {
    const moe_config *c = moe_model_config(m);
    double H = c->hidden_size, D = c->head_dim;
    double att = H * D * (2.0 * c->num_heads + 2.0 * c->num_kv_heads);
    double sh = c->layers[l].has_shared ? 3.0 * H * c->shared_intermediate_size : 0;
    switch (moe_model_layer_kind(m, l)) {
    case MOE_MLP_DENSE:
        return att + 3.0 * H * moe_config_dense_width(c, l);
    case MOE_MLP_MOE:
        return att + sh + H * c->n_routed_experts + 3.0 * H * c->moe_intermediate_size * c->top_k;
    case MOE_MLP_CONDENSED:
        return att + sh + 3.0 * H * c->moe_intermediate_size * c->layers[l].n_kept;
    case MOE_MLP_NONE: /* LayerDrop: the attention only; BlockDrop: nothing */
        return moe_model_layer_drop(m, l) == MOE_DROP_BLOCK ? 0 : att;
    }
    return att;
}

/* forward + backward model FLOPs of one step of N tokens (see the header) */
static double step_flops(const moe_model *m, moe_trainer *tr, double N, int lowest) {
    const moe_config *c = moe_model_config(m);
    double f = 2.0 * N * c->hidden_size * c->vocab_size * 3.0; /* lm_head: logits, dx, dW */
    for (int l = 0; l < c->num_layers; l++) {
        double p = layer_params(m, l);
        f += 2.0 * N * p * (l >= lowest ? 2.0 : 1.0);
    }
    for (int i = 0; i < moe_trainer_nparams(tr); i++) {
        moe_param *p = moe_trainer_param(tr, i);
        if (p->ndim == 2 && p->layer >= 0) f += 2.0 * N * (double)p->n; /* dW (experts: ~) */
    }
    return f;
}

typedef struct {
    const char *model, *device;
    int seqs, len, steps, recompute, all;
} args;

static int parse(int argc, char **argv, args *a) {
    static const struct option lo[] = {{"model", required_argument, 0, 'm'},
                                       {"seqs", required_argument, 0, 'n'},
                                       {"len", required_argument, 0, 't'},
                                       {"steps", required_argument, 0, 's'},
                                       {"device", required_argument, 0, 'd'},
                                       {"recompute", no_argument, 0, 'r'},
                                       {"all", no_argument, 0, 'a'},
                                       {0, 0, 0, 0}};
    *a = (args){NULL, "cuda", 8, 256, 3, 0, 0};
    for (int ch; (ch = getopt_long(argc, argv, "", lo, NULL)) != -1;) {
        if (ch == 'm') a->model = optarg;
        else if (ch == 'n') a->seqs = atoi(optarg);
        else if (ch == 't') a->len = atoi(optarg);
        else if (ch == 's') a->steps = atoi(optarg);
        else if (ch == 'd') a->device = optarg;
        else if (ch == 'r') a->recompute = 1;
        else if (ch == 'a') a->all = 1;
        else return -1;
    }
    return a->model && a->seqs > 0 && a->len > 1 && a->steps > 0 ? 0 : -1;
}

/* one step: gradients of the batch, AdamW, compute copies refreshed */
static int train_step(moe_trainer *tr, const moe_backend *be, const moe_train_batch *b,
                      float **mo, float **vo, int step, double *loss) {
    moe_train_result r;
    moe_trainer_zero_grads(tr);
    float dscale = 1.0f / (float)(b->nseq * (b->lens[0] - 1));
    if (moe_trainer_backward(tr, b, dscale, 1.0f, &r) < 0) return -1;
    for (int i = 0; i < moe_trainer_nparams(tr); i++) {
        moe_param *p = moe_trainer_param(tr, i);
        be->adamw(p->w, mo[i], vo[i], p->g, p->n, 1e-5f, 0.9f, 0.999f, 1e-8f,
                  p->ndim > 1 ? 0.01f : 0.0f, 1.0f, step);
    }
    if (moe_trainer_sync_weights(tr) < 0) return -1;
    be->sync();
    *loss = r.ntokens ? r.loss_sum / (double)r.ntokens + r.aux_loss : 0;
    return moe_backend_status(be);
}

int main(int argc, char **argv) {
    args a;
    if (parse(argc, argv, &a) < 0) {
        fprintf(stderr, "usage: gpu_train --model DIR --seqs N --len T [--steps S] [--recompute] "
                        "[--all] [--device cuda|cpu]\n");
        return 2;
    }
    int cuda = !strcmp(a.device, "cuda");
    if (cuda && no_cuda_device()) return 77;
    moe_model_opts o = {.device = a.device};
    moe_model_opts_from_env(&o);
    moe_model *m = moe_model_open(a.model, &o);
    if (!m) return die(a.model);
    const moe_backend *be = moe_model_backend(m);
    size_t open_b = live_bytes(be);
    moe_train_opts to = {.set = a.all ? MOE_TRAIN_ALL : MOE_TRAIN_CONDENSED,
                         .recompute = a.recompute, .aux_coef = -1};
    moe_trainer *tr = moe_trainer_new(m, &to);
    if (!tr) return die(a.model);
    size_t trainer_b = live_bytes(be);
    int np = moe_trainer_nparams(tr), lowest = moe_model_config(m)->num_layers;
    float **mo = calloc((size_t)np + 1, sizeof *mo), **vo = calloc((size_t)np + 1, sizeof *vo);
    for (int i = 0; i < np; i++) {
        moe_param *p = moe_trainer_param(tr, i);
        mo[i] = moe_model_alloc(m, p->n);
        vo[i] = moe_model_alloc(m, p->n);
        if (p->layer < lowest) lowest = p->layer;
    }
    size_t moments_b = live_bytes(be);
    if (cuda) moe_cuda_mem_reset_peak();
    int V = moe_model_config(m)->vocab_size;
    int32_t **ids = random_ids(a.seqs, a.len, V), **tg = malloc(sizeof *tg * (size_t)a.seqs);
    int *lens = malloc(sizeof(int) * (size_t)a.seqs);
    for (int s = 0; s < a.seqs; s++) {
        tg[s] = malloc(sizeof(int32_t) * (size_t)a.len);
        lens[s] = a.len;
        for (int t = 0; t < a.len; t++) tg[s][t] = t + 1 < a.len ? ids[s][t + 1] : -100;
    }
    moe_train_batch b = {a.seqs, (const int32_t *const *)ids, (const int32_t *const *)tg, lens};
    double loss = 0, t0 = moe_now(), t1 = t0;
    for (int k = 1; k <= a.steps; k++) {
        if (train_step(tr, be, &b, mo, vo, k, &loss) < 0) return die("step");
        if (k == 1) t1 = moe_now();
    }
    double secs = a.steps > 1 ? (moe_now() - t1) / (a.steps - 1) : t1 - t0;
    double N = (double)a.seqs * a.len;
    size_t peak = 0, live = 0;
    if (be->mem_used) be->mem_used(&live, &peak);
    printf("{\"device\":\"%s\",\"seqs\":%d,\"len\":%d,\"steps\":%d,\"recompute\":%d,"
           "\"lowest_trained\":%d,\"params\":%zu,\"live_after_open\":%zu,\"live_after_trainer\":%zu,"
           "\"live_after_moments\":%zu,\"step_seconds\":%.4f,\"tokens_per_s\":%.0f,\"tflops\":%.4f,"
           "\"loss\":%.6f,\"backend_peak_bytes\":%zu,\"threads\":\"%s\"}\n",
           cuda ? moe_cuda_device_name() : be->name, a.seqs, a.len, a.steps, a.recompute, lowest,
           moe_trainer_param_count(tr), open_b, trainer_b, moments_b, secs, N / secs,
           step_flops(m, tr, N, lowest < 0 ? 0 : lowest) / secs / 1e12, loss, peak,
           getenv("OMP_NUM_THREADS") ? getenv("OMP_NUM_THREADS") : "all");
    for (int i = 0; i < np; i++) moe_model_free(m, mo[i]), moe_model_free(m, vo[i]);
    for (int s = 0; s < a.seqs; s++) free(ids[s]), free(tg[s]);
    free(mo), free(vo), free(ids), free(tg), free(lens);
    moe_trainer_free(tr);
    moe_model_close(m);
    return 0;
}
