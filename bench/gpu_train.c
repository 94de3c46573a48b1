/* gpu_train.c - training steps on the CUDA backend, for bench/gpu-check.sh
 * (speed on a GPU) and bench/tune-memory.sh (memory on the emulator).
 *
 *   gpu_train --model DIR [--seqs N] [--len T] [--steps S] [--recompute] [--seed X]
 *
 * Opens DIR (a checkpoint with condensed layers) on the CUDA backend, builds
 * a trainer of its condensed layers (MOE_TRAIN_CONDENSED, lib/train.h) and
 * AdamW moments for the trained tensors (float32, backend memory, as
 * moe-tune's optimizer keeps them), then runs S steps on N random sequences
 * of T tokens: zero the gradients, forward + backward, gradient norm
 * (sumsq), AdamW on every parameter, refresh the BF16 compute copies.
 * Prints one JSON object: the memory the backend holds after each stage and
 * its peak, seconds per step (the mean of the steps after the first, which
 * warms up), tokens/s and the achieved TFLOP/s counted as model FLOPs
 * (forward + backward GEMMs and attention, recomputation not counted).
 * Exits 77 ("SKIP: ...") without a CUDA device. */
#include <getopt.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend_cuda.h"
#include "common.h"
#include "config.h"
#include "device.h"
#include "kernels.h"
#include "model.h"
#include "train.h"
#include "gpu_bench.h"

static int die(const char *what) {
    fprintf(stderr, "gpu_train: %s: %s\n", what, moe_error());
    return moe_error_kind() == MOE_ERR_DEVICE ? 4 : 1;
}

/* Model FLOPs of one step over nseq sequences of T tokens: the forward's
 * GEMMs (2 per weight per token) and causal attention (q·kᵀ and p·v), the
 * backward's input gradients from the lowest trained layer up (the same
 * again, attention twice), the weight gradients of the trained tensors. */
static double step_flops(const moe_config *c, int lowest, size_t trained, int nseq, int T) {
    double H = c->hidden_size, N = (double)nseq * T;
    double attn_w = H * c->num_heads * c->head_dim * 2.0 + H * c->num_kv_heads * c->head_dim * 2.0;
    double attn_qk = 2.0 * c->num_heads * c->head_dim * (double)T * (T + 1) * nseq; /* both products */
    double fwd = 2.0 * N * H * c->vocab_size, bwd = fwd; /* lm_head */
    for (int l = 0; l < c->num_layers; l++) {
        const moe_layer_mlp *ly = &c->layers[l];
        double mlp = 0;
        if (ly->kind == MOE_MLP_DENSE)
            mlp = 3.0 * H * moe_config_dense_width(c, l);
        else {
            int k = ly->kind == MOE_MLP_MOE ? c->top_k : ly->n_kept;
            mlp = 3.0 * H * c->moe_intermediate_size * k + 3.0 * H * c->shared_intermediate_size;
            if (ly->kind == MOE_MLP_MOE) mlp += H * c->n_routed_experts;
        }
        double layer = 2.0 * N * (attn_w + mlp);
        fwd += layer + attn_qk;
        if (l >= lowest) bwd += layer + 2.0 * attn_qk;
    }
    return fwd + bwd + 2.0 * N * (double)trained;
}

typedef struct {
    float **m, **v; /* AdamW moments per parameter */
    int n;
} moments;

static void adamw_step(const moe_backend *be, moe_trainer *tr, moments *mo, int step, float gscale) {
    for (int i = 0; i < mo->n; i++) {
        moe_param *p = moe_trainer_param(tr, i);
        be->adamw(p->w, mo->m[i], mo->v[i], p->g, p->n, 1e-5f, 0.9f, 0.95f, 1e-8f, 0.1f, gscale,
                  step);
    }
}

int main(int argc, char **argv) {
    const char *model = NULL;
    int nseq = 8, T = 256, steps = 3, recompute = 0;
    static const struct option lo[] = {{"model", required_argument, 0, 'm'},
                                       {"seqs", required_argument, 0, 'n'},
                                       {"len", required_argument, 0, 't'},
                                       {"steps", required_argument, 0, 's'},
                                       {"seed", required_argument, 0, 'x'},
                                       {"recompute", no_argument, 0, 'r'},
                                       {0, 0, 0, 0}};
    int ch;
    while ((ch = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (ch) {
        case 'm': model = optarg; break;
        case 'n': nseq = atoi(optarg); break;
        case 't': T = atoi(optarg); break;
        case 's': steps = atoi(optarg); break;
        case 'x': rng_state = strtoull(optarg, NULL, 10); break;
        case 'r': recompute = 1; break;
        default: return 2;
        }
    }
    if (!model || nseq <= 0 || T <= 1 || steps <= 0) {
        fprintf(stderr, "usage: gpu_train --model DIR [--seqs N] [--len T] [--steps S] [--recompute]\n");
        return 2;
    }
    if (no_cuda_device()) return 77;
    moe_model_opts o = {.device = "cuda"};
    moe_model_opts_from_env(&o);
    moe_model *m = moe_model_open(model, &o);
    if (!m) return die("open");
    const moe_backend *be = moe_model_backend(m);
    const moe_config *c = moe_model_config(m);
    moe_cuda_mem mem;
    moe_cuda_mem_stats(&mem);
    size_t live_open = mem.live;

    moe_train_opts to = {.set = MOE_TRAIN_CONDENSED, .recompute = recompute, .aux_coef = -1};
    moe_trainer *tr = moe_trainer_new(m, &to);
    if (!tr) return die("trainer");
    be->sync();
    moe_cuda_mem_stats(&mem);
    size_t live_trainer = mem.live;
    moments mo = {NULL, NULL, moe_trainer_nparams(tr)};
    mo.m = calloc((size_t)mo.n, sizeof *mo.m);
    mo.v = calloc((size_t)mo.n, sizeof *mo.v);
    int lowest = c->num_layers;
    for (int i = 0; i < mo.n; i++) {
        moe_param *p = moe_trainer_param(tr, i);
        mo.m[i] = be->alloc(sizeof(float) * p->n);
        mo.v[i] = be->alloc(sizeof(float) * p->n);
        be->zero(mo.m[i], sizeof(float) * p->n);
        be->zero(mo.v[i], sizeof(float) * p->n);
        if (p->layer >= 0 && p->layer < lowest) lowest = p->layer;
    }
    be->sync();
    moe_cuda_mem_stats(&mem);
    size_t live_optim = mem.live;

    /* the batch: random ids, targets = the next id (the last position ignored) */
    int V = c->vocab_size;
    int32_t **ids = random_ids(nseq, T, V), **tg = malloc(sizeof *tg * (size_t)nseq);
    int *lens = malloc(sizeof(int) * (size_t)nseq);
    for (int s = 0; s < nseq; s++) {
        tg[s] = malloc(sizeof(int32_t) * (size_t)T);
        lens[s] = T;
        for (int t = 0; t < T; t++) tg[s][t] = t + 1 < T ? ids[s][t + 1] : -100;
    }
    moe_train_batch b = {nseq, (const int32_t *const *)ids, (const int32_t *const *)tg, lens};
    float dscale = 1.0f / (float)(nseq * (T - 1));

    double t_rest = 0, loss = 0;
    for (int step = 1; step <= steps; step++) {
        double t0 = moe_now();
        moe_trainer_zero_grads(tr);
        moe_train_result res;
        if (moe_trainer_backward(tr, &b, dscale, 0.0f, &res) < 0) return die("backward");
        double ss = 0;
        for (int i = 0; i < mo.n; i++) {
            moe_param *p = moe_trainer_param(tr, i);
            ss += be->sumsq(p->g, p->n);
        }
        double norm = sqrt(ss);
        adamw_step(be, tr, &mo, step, norm > 1.0 ? (float)(1.0 / norm) : 1.0f);
        if (moe_trainer_sync_weights(tr) < 0) return die("sync_weights");
        be->sync();
        if (moe_backend_status(be) < 0) return die("step");
        double secs = moe_now() - t0;
        if (step > 1 || steps == 1) t_rest += secs;
        loss = res.ntokens ? res.loss_sum / res.ntokens : 0;
        fprintf(stderr, "gpu_train: step %d: %.3f s, loss %.4f, grad norm %.3g\n", step, secs, loss,
                norm);
    }
    double per_step = t_rest / (steps > 1 ? steps - 1 : 1);
    double flops = step_flops(c, lowest, moe_trainer_param_count(tr), nseq, T);
    moe_cuda_mem_stats(&mem);
    printf("{\"device\":\"%s\",\"layers\":%d,\"condensed\":%d,\"lowest_trained\":%d,\"seqs\":%d,"
           "\"len\":%d,\"recompute\":%d,\"params_trained\":%zu,\"step_seconds\":%.4f,"
           "\"tokens_per_s\":%.0f,\"tflops\":%.2f,\"loss\":%.4f,\"live_after_open\":%zu,"
           "\"live_after_trainer\":%zu,\"live_after_moments\":%zu,\"backend_peak_bytes\":%zu,"
           "\"device_used_peak_bytes\":%zu}\n",
           moe_cuda_device_name(), c->num_layers, c->n_condensed, lowest, nseq, T, recompute,
           moe_trainer_param_count(tr), per_step, (double)nseq * T / per_step,
           flops / per_step / 1e12, loss, live_open, live_trainer, live_optim, mem.peak,
           mem.used_peak);
    for (int i = 0; i < mo.n; i++) be->free(mo.m[i]), be->free(mo.v[i]);
    free(mo.m), free(mo.v);
    moe_trainer_free(tr);
    moe_model_close(m);
    for (int s = 0; s < nseq; s++) free(ids[s]), free(tg[s]);
    free(ids), free(tg), free(lens);
    return 0;
}
