/* tune.h - a moe-tune run: the stages, the steps, validation, the output
 * checkpoint, the training log and --resume (the trainer is lib/train.h,
 * the optimizer lib/optim.h, the data lib/tune_data.h).
 *
 * A run has one stage per data file (--data, then --sft as the original's
 * second stage), each with its own optimizer (fresh moments) and schedule.
 * Step k of a stage (from 1) takes, from epoch e = (k-1) / S of the stage
 * (S = ceil(n / (batch·accum)) steps per epoch, the last one of an epoch
 * possibly smaller), the sequences at positions j·batch·accum ...
 * (j = (k-1) mod S) of that epoch's order, in `accum` micro-batches of
 * `batch` sequences.  The loss of a step is the token-weighted mean over
 * all its sequences (each micro-batch's cross-entropy sum is scaled by
 * 1/(tokens of the whole step)), plus, with MOE_TRAIN_ALL, the mean over
 * its micro-batches of the load-balancing term.  Everything a step needs follows from
 * (seed, stage, k): the data position and the shuffling RNG need no state
 * of their own, and a resumed run is the uninterrupted one.
 *
 * Output (OUT, written under a temporary name and renamed at each save):
 *   the input model's files, with the trained tensors replaced (in the
 *   checkpoint's dtype), config.json's condensed weights updated
 *   (train_weights) and a moe-tune entry in its cdmoe_provenance;
 *   tune.msgpack.zst, the log (kind "tune": "step" and "val" records);
 *   tune-state.safetensors (when the run stops early, with save_every, or
 *   with save_state): float32 masters and moments, the step, the log so
 *   far, and the options that decide the result, for --resume. */
#ifndef MOE_TUNE_H
#define MOE_TUNE_H

#include <stdint.h>

#include "optim.h"
#include "records.h"
#include "train.h"

typedef struct {
    const char *model_dir, *out_dir;
    const char *data, *sft, *val;  /* sft, val: NULL when absent */
    const char *log;               /* a copy of the log stream, or NULL */
    const char *resume;            /* OUT of the interrupted run, or NULL */
    const char *device;            /* NULL: the default */
    int precision;                 /* MOE_PRECISION_* (model.h); 0: the device's default */
    moe_train_opts train;
    moe_optim_opts optim;          /* steps is set per stage */
    long epochs, steps;            /* steps > 0: that many per stage, else epochs */
    int batch, accum, max_length, shuffle;
    long val_every;                /* 0: validate at the end only */
    long stop_after;               /* > 0: stop (saving the state) after this global step */
    long save_every;               /* > 0: save OUT with its state every N steps */
    int save_state;                /* keep tune-state.safetensors in the final OUT */
    uint64_t seed;
    int force, no_provenance;
    int argc;                      /* for the provenance */
    char **argv;
    /* called after every step (the tool draws progress); may be NULL */
    void (*progress)(void *ctx, const moe_tune_step *s, long step_of_stage, long steps_of_stage);
    void *progress_ctx;
} moe_tune_opts;

typedef struct {
    long steps;            /* steps taken in this run (not counting resumed ones) */
    double first_loss, last_loss;
    int nval;              /* validations in this run */
    double first_val, last_val;
    int stopped;           /* stopped by stop_after */
} moe_tune_summary;

void moe_tune_defaults(moe_tune_opts *o);
int moe_tune_run(const moe_tune_opts *o, moe_tune_summary *sum);

#endif
