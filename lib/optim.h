/* optim.h - moe-tune's optimizer: AdamW over the trainer's parameters
 * (lib/train.h moe_param), the learning-rate schedule, global gradient-norm
 * clipping, and the state --resume needs.
 *
 * AdamW is PyTorch's (decoupled weight decay p -= lr·wd·p, then the moments,
 * bias-corrected, eps outside the square root), run by the backend's `adamw`
 * op on float32 masters with float32 moments; the gradient norm is the
 * backend's `sumsq`.  One optimizer step:
 *
 *   g      = Σ over the step's micro-batches of the gradients the trainer
 *            accumulated (the caller scales the loss so that g is already the
 *            gradient of the step's token-weighted mean loss)
 *   norm   = sqrt(Σ_params Σ_i g_i²)                     (before clipping)
 *   gscale = clip / (norm + 1e-6) when that is < 1, else 1   (PyTorch's
 *            clip_grad_norm_; clip <= 0: no clipping)
 *   p      = AdamW(p, gscale·g, lr(step))
 *
 * Schedule (step k = 1, 2, ... N; W warm-up steps; lr the peak, lr_min the
 * absolute floor):
 *   k <= W:  lr(k) = lr · k / W
 *   k >  W:  lr(k) = lr_min + (lr - lr_min) · (N - k) / (N - 1 - W)   (lr when N - 1 = W)
 * so the first step is not wasted at lr 0 (as in transformers'
 * get_linear_schedule_with_warmup), the peak holds at steps W and W+1, and
 * the floor is reached at the last step (which transformers' decay never
 * reaches) — tests/fixtures/train/README.md, the PyTorch reference's spec.  W = round(warmup · N) when warmup < 1 (a ratio,
 * as the original meant), else warmup steps.
 *
 * Weight decay is applied to the parameters with two dimensions (matrices);
 * biases, norm weights and a condensed layer's fixed expert weights (vectors)
 * get none, as Hugging Face's Trainer does.
 *
 * Errors: -1 / NULL with moe_error_set(); nothing printed. */
#ifndef MOE_OPTIM_H
#define MOE_OPTIM_H

#include <stddef.h>
#include <stdint.h>

#include "kernels.h"
#include "safetensors.h"
#include "train.h"

typedef struct {
    double lr, lr_min;    /* peak, absolute floor */
    double warmup;        /* < 1: a ratio of the steps; >= 1: a number of steps */
    long steps;           /* N: optimizer steps of the schedule */
    double beta1, beta2, eps, weight_decay;
    double clip;          /* max global gradient norm; <= 0: none */
} moe_optim_opts;

/* PyTorch's AdamW defaults, clipping at 1.0, no warm-up */
void moe_optim_defaults(moe_optim_opts *o);

/* W of the schedule. */
long moe_optim_warmup_steps(const moe_optim_opts *o);
/* lr(k), k from 1. */
double moe_optim_lr(const moe_optim_opts *o, long k);

typedef struct moe_optim moe_optim;

/* An optimizer over params[0 .. n-1] (their w and g in backend memory of b;
 * the pointers must stay valid).  Moments start at zero, step at 0. */
moe_optim *moe_optim_new(const moe_backend *b, moe_param *const *params, int n, const moe_optim_opts *o);
void moe_optim_free(moe_optim *op);

typedef struct {
    long step;         /* the step just taken, from 1 */
    double lr;         /* its learning rate */
    double grad_norm;  /* the global norm before clipping */
    double gscale;     /* the factor the gradients were multiplied by */
} moe_optim_stats;

/* Take the next step from the gradients in params[i]->g.  The caller zeroes
 * the gradients before accumulating the next step's. */
int moe_optim_step(moe_optim *op, moe_optim_stats *st);
long moe_optim_steps_done(const moe_optim *op);

/* The state --resume needs: for every parameter its master, first and
 * second moment (float32, host memory), and the step count.  save adds
 * tensors "<name>.master", "<name>.exp_avg", "<name>.exp_avg_sq" and the
 * metadata key "optim_step" to an open safetensors writer (the buffers stay
 * owned by op until moe_optim_free, so close the writer first).  load reads
 * them back from an open file (shapes checked, every parameter required)
 * and uploads them.  0 or -1. */
int moe_optim_save(moe_optim *op, moe_st_writer *w);
int moe_optim_load(moe_optim *op, const moe_st_file *f);

#endif
