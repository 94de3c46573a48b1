/* train.h - gradients of the causal-LM loss of a model with respect to
 * chosen weights: moe-tune's engine (the optimizer, the data and the
 * schedule are moe-tune's: lib/optim.h, lib/tune_data.h).
 *
 * Built on lib/model: the training forward saves, per layer, what the
 * backward needs, and each piece's backward twin sits beside its forward in
 * lib/model/forward.c (moe_layer_attention / moe_layer_attention_backward,
 * ...), computed with the backend's backward ops (kernels.h).
 *
 *   loss = dscale · Σ_t CE(logits_t, target_t)   (targets < 0 ignored)
 *        + aux_scale · coef · aux                (MOE_TRAIN_ALL, routed layers)
 *
 * aux as Hugging Face computes it: for qwen2_moe, qwen3_moe, olmoe, mixtral
 * one term pooled over every router of the model and every token of the
 * batch (load_balancing_loss_func), for deepseek Σ_l of each layer's
 * (seq_aux: per sequence, averaged) -- tests/fixtures/train/README.md
 * writes both out.  coef = moe_train_opts.aux_coef, or the config's
 * router_aux_loss_coef (deepseek: aux_loss_alpha).
 *
 * What is trained (moe_train_opts.set):
 *   CONDENSED  every Linear of the shared experts (qwen2_moe's
 *              shared_expert_gate too) and of the kept routed experts of the
 *              condensed layers, as condensed in the checkpoint or at run time
 *              (moe_model_condense_layer) (and, with train_weights, the
 *              condensed layers' fixed expert weights); everything else frozen.
 *              A model without condensed layers is refused (the baselines'
 *              LayerDrop / BlockDrop / pruned checkpoints have none: train
 *              them ALL, as pipelines/sweep.sh --tune does).
 *   ALL        every weight (embedding, attention, norms, routers, experts,
 *              lm_head; a tied lm_head is one parameter), plus the
 *              architecture's load-balancing loss as Hugging Face computes it.
 *   LAYERS     the MLP weights (as CONDENSED; dense layers' gate/up/down;
 *              not the routers) of the listed layers (a dropped one refused).
 * Dropped layers (moe_model_layer_drop, from the config or at run time): a
 * LayerDrop layer has its attention alone (no post-attention norm, no MLP),
 * trained and differentiated as any; a BlockDrop layer is the identity, x
 * and its gradient pass unchanged; neither's missing tensors are loaded.
 * Frozen weights get no gradient buffers.  Gradients flow through the frozen
 * layers above the lowest trained layer; nothing is computed below it
 * (unless input_grad asks for d loss / d x_0).
 *
 * Parameters are float32 masters in backend memory, one per Hugging Face
 * tensor of the checkpoint (its name), plus, for train_weights, one [n]
 * vector per condensed layer named "condensed_layers.<l>.weights".  After
 * the optimizer changes w, moe_trainer_sync_weights refreshes the copies
 * the forward computes with.
 *
 * Deterministic: same batch, same bytes, whatever the thread count (CPU).
 * Errors: -1 / NULL with moe_error_set(); nothing is printed. */
/* Device memory budget, the paper's setting: DeepSeekMoE-16B shapes (H 2048,
 * 28 layers: 1 dense (10944) + 27 MoE of 64 experts x 1408, 2 shared, top-6;
 * 16 heads x 128; vocab 102400), E(2+6) (2 shared + 6 kept routed experts),
 * 9 condensed layers trained (CD-MoE's order for e6: decoder layers
 * 7 11 13 15 16 20 22 23 27, so the backward runs from layer 27 down to 7),
 * batch 8 x 256 = N 2048 tokens, MOE_TRAIN_CONDENSED, AdamW with float32
 * master weights and moments for the trained tensors only, BF16 elsewhere
 * (CUDA: weight_dtype BF16).  Every layer stays resident (train.c); the
 * frozen embedding stays on the host (its rows are read per batch).
 *   weights, BF16, 11.65 B parameters:                            23.30 GB
 *     18 routed MoE layers x 1.142 GB (experts 64 x 3 x 1408 x 2048,
 *     shared 3 x 2816 x 2048, router) = 20.56; 28 attention blocks x 33.6 MB
 *     = 0.94; lm_head 0.42; dense layer 0 0.13; the 9 condensed layers
 *     9 x 138 MB = 1.25 (their compute copies)
 *   trained: 9 x (6 x 3 x 1408 x 2048 + 3 x 2816 x 2048) = 622.9 M
 *     float32 masters 2.49 + gradients 2.49 + AdamW m, v 4.98:    9.97 GB
 *   saved activations, per layer the backward runs (N x H x 4 B = 16.8 MB
 *     per [N, H] tensor): x, RMSNorm(x), q, k, v, attention output, x after
 *     attention, MLP input: 134 MB; routed or condensed MLP: expert outputs
 *     [N x 6, H] 101 MB + shared gate|up [N, 5632] 46 MB + shared output
 *     17 MB + routing 0.6 MB: 298 MB a layer (dense layer 0: gate|up 179 MB)
 *       without recomputation, 21 layers (7..27):                  6.27 GB
 *       with recompute (moe_train_opts.recompute): their inputs
 *       21 x 16.8 MB + one layer's 298 MB recomputed:               0.65 GB
 *   buffers that outlive their use (the model's pool and the CUDA scratch
 *     keep them for reuse):                                        1.03 GB
 *     the dense layer 0's forward (gate|up 179 MB, SwiGLU 90 MB, BF16 copy
 *     of the activations 56 MB) 0.33; the experts op's scratch for N x 6
 *     rows (gathered rows BF16, gate|up f32, SwiGLU BF16, +25% growth) 0.28;
 *     one layer's backward (d expert outputs 101 MB, d x, d MLP input, the
 *     norms' and attention's gradients, per expert its gathered rows, their
 *     gradient and the gate|up recomputed for up to N rows) 0.28; the loss
 *     head (a 64 MiB logits chunk of 163 rows, its BF16 copy, the final
 *     norm's output and gradient) 0.14
 *   CUDA context and cuBLAS workspace (not counted by the backend): ~0.6 GB
 * Total with recompute 23.30 + 9.97 + 0.65 + 1.03 + 0.6 = 35.5 GB (under
 * 40 GB: a 40 GB A100 fits; the original's recipe needs an 80 GB card);
 * without recomputation 41.2 GB.  The frozen routed experts are 58% of it.
 * bench/tune-memory.sh measures what the CUDA backend allocates (the
 * emulator without arithmetic, MOE_CUDA_EMU_NOCOMPUTE=1) for these shapes
 * with 4 layers (2 condensed) and compares it with this budget evaluated for
 * that model: 6.25 GB measured vs 6.24 GB without recompute, 5.70 vs 5.70
 * with (BENCH_MEMORY=1 make bench, or sh bench/tune-memory.sh).  (The
 * weights, state and activations were counted before measuring; the
 * buffers kept for reuse were itemised from that first measurement, which
 * found them 0.4 GB above the first estimate.  A second model, not used to
 * itemise, checks it: 6 layers, 2 and 5 condensed, routed layers 3 and 4 in
 * the backward: 8.90 GB measured vs 8.89 without recompute, 8.07 vs 8.07
 * with; LAYERS=6 CONDENSED="2 5" sh bench/tune-memory.sh.) */
#ifndef MOE_TRAIN_H
#define MOE_TRAIN_H

#include <stddef.h>
#include <stdint.h>

#include "model.h"

typedef enum {
    MOE_TRAIN_CONDENSED = 0,
    MOE_TRAIN_ALL = 1,
    MOE_TRAIN_LAYERS = 2,
} moe_train_set;

typedef struct {
    moe_train_set set;
    const int *layers;  /* MOE_TRAIN_LAYERS: layer indices */
    int nlayers;
    int train_weights;  /* condensed layers' fixed expert weights trained too */
    int recompute;      /* keep only each layer's input; recompute its forward in the backward */
    int input_grad;     /* also compute d loss / d x_0 (tests) */
    double aux_coef;    /* MOE_TRAIN_ALL: load-balancing coefficient; < 0: the config's */
} moe_train_opts;

typedef struct {
    const char *name;   /* Hugging Face tensor name, or "condensed_layers.<l>.weights" */
    int layer;          /* -1: not in a layer (embedding, final norm, lm_head) */
    int ndim;
    int64_t shape[2];
    size_t n;           /* elements */
    float *w;           /* [n] float32 master, backend memory */
    float *g;           /* [n] gradient, backend memory */
} moe_param;

/* A batch of nseq sequences.  targets[s][t] is the label of position t,
 * already shifted by the caller (Hugging Face: labels[t+1]; the last
 * position and ignored positions -100). */
typedef struct {
    int nseq;
    const int32_t *const *ids;     /* [nseq][lens[s]] host */
    const int32_t *const *targets; /* [nseq][lens[s]] host */
    const int *lens;
} moe_train_batch;

typedef struct {
    double loss_sum;    /* Σ CE over counted tokens (not scaled) */
    long ntokens;       /* tokens with a target >= 0 */
    double aux_loss;    /* the load-balancing loss as Hugging Face adds it to the loss (its
                           coefficient included, aux_scale not): coef·aux over all routed
                           layers at once (qwen*, olmoe, mixtral), Σ_l alpha·aux_l (deepseek) */
} moe_train_result;

typedef struct moe_trainer moe_trainer;

/* The model must be open with a backend that has the backward ops. */
moe_trainer *moe_trainer_new(moe_model *m, const moe_train_opts *o);
void moe_trainer_free(moe_trainer *tr);

int moe_trainer_nparams(const moe_trainer *tr);
moe_param *moe_trainer_param(moe_trainer *tr, int i);
size_t moe_trainer_param_count(const moe_trainer *tr); /* Σ n */
void moe_trainer_zero_grads(moe_trainer *tr);

/* Forward with saved activations, loss, backward: gradients of
 * dscale·Σ CE + aux_scale·aux_loss ADDED to every parameter's g. */
int moe_trainer_backward(moe_trainer *tr, const moe_train_batch *b, float dscale,
                         float aux_scale, moe_train_result *res);
/* The loss only (validation): no gradient, no saved activations. */
int moe_trainer_loss(moe_trainer *tr, const moe_train_batch *b, moe_train_result *res);
/* The forward computes with the masters' current values from now on. */
int moe_trainer_sync_weights(moe_trainer *tr);
/* Logits of every position of the batch, [Σ lens, V] float32 into host
 * memory, from the training forward (tests compare it with moe_model_forward). */
int moe_trainer_logits(moe_trainer *tr, const moe_train_batch *b, float *logits);
/* input_grad: d loss / d x_0 of sequence s of the last backward, [lens[s], H]
 * float32 into host memory. */
int moe_trainer_input_grad(moe_trainer *tr, int s, float *dx0);

#endif
