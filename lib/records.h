/* records.h - every record type of the cdmoe streams, read and written in
 * one place, so that each tool (and moe-dump --cdmoe-json) sees the same
 * keys the same way:
 *
 *   tokens   moe-tokenize      {"index": i, "ids": i32[T], "tokenizer": fingerprint}
 *   calib    moe-calib         per MoE layer: routing statistics
 *   ranking  moe-expert-rank   per MoE layer: greedy expert ranking
 *   plan     moe-layer-search  greedy layer order, and the weights each
 *                              condensed layer was scored with
 *   work     the search tools  counts of the work done
 *   dump     moe-eval --dump   hidden states / logits per sample
 *   model, ppl, task, bench, compare
 *            moe-eval -o       evaluation results per model (model_index)
 *   step, val
 *            moe-tune --log    per optimizer step / per validation (kind "tune")
 *
 * The keys are documented in moe-stream(5) and the writing tools' man
 * pages.  Readers accept streams written before a key was added (a plan
 * without "weights", tokens without "tokenizer").
 *
 * Library rules: nothing printed except --force warnings, errors through
 * moe_error_set(), each naming the stream and the record. */
#ifndef MOE_RECORDS_H
#define MOE_RECORDS_H

#include <stddef.h>
#include <stdint.h>

#include "eval.h"
#include "stream.h"

#define MOE_REC_TOKENS "tokens"
#define MOE_REC_CALIB "calib"
#define MOE_REC_RANKING "ranking"
#define MOE_REC_PLAN "plan"
#define MOE_REC_WORK "work"
#define MOE_REC_DUMP "dump"

/* ---- tokens ------------------------------------------------------------------ */

/* The tokenizer fingerprint: SHA-256 (64 lowercase hex digits) of the bytes
 * of tokenizer.json.  path: a model directory or the tokenizer.json file.
 * 1 (hex set), 0 (the directory has no tokenizer.json) or -1 (I/O error). */
int moe_tokenizer_fingerprint(const char *path, char hex[65]);

/* What a consumer with a model checks each tokens record against. */
typedef struct {
    char want[65];   /* the model's tokenizer fingerprint; "" = unknown: not checked */
    int force;       /* a mismatch is a warning (printed once) instead of an error */
    int warned;
} moe_tokens_check;

/* Fingerprint the tokenizer of model_dir (none there: nothing checked).  0 or -1. */
int moe_tokens_check_init(moe_tokens_check *c, const char *model_dir, int force);

typedef struct {
    int64_t index;   /* "index" (or "sample"); -1 when the record has neither */
    int32_t *ids;    /* [n], malloc'd (the caller frees) */
    size_t n;
} moe_tokens;

/* Read a tokens record.  With check (a consumer that runs a model): the
 * record's tokenizer fingerprint must match, and the ids must not be empty. */
int moe_tokens_read(moe_reader *r, const msgpack_object *rec, moe_tokens_check *check,
                    moe_tokens *out);
/* tokenizer: fingerprint to record, or NULL (ids made elsewhere). */
int moe_tokens_write(moe_writer *w, int64_t index, const int32_t *ids, size_t n,
                     const char *tokenizer);
/* The same with "prompt_tokens" (moe-generate: ids = the prompt's first
 * prompt_tokens ids + the generated ones); prompt_tokens < 0: left out. */
int moe_tokens_write_prompt(moe_writer *w, int64_t index, const int32_t *ids, size_t n,
                            const char *tokenizer, int64_t prompt_tokens);

/* ---- what the search tools read and write ------------------------------------- */

typedef struct {
    int n;
    int32_t **ids; /* [n][len[i]] */
    int *len;
    int64_t *sample;
} moe_seqs;

typedef struct {
    int present;
    int moe_ordinal; /* the record's "moe_ordinal" (0 = first MoE layer); -1 if absent */
    int64_t tokens;
    double *sum;     /* [E] */
    int64_t *count;  /* [E] */
    double *mean;    /* [E]; NaN where count == 0 (never routed) */
    double entropy;  /* mean over tokens of the routing entropy, nats */
    double *load;    /* [E] */
    double *reap;    /* [E] REAP saliency: mean over the tokens routed to the expert of
                        gate weight x ||expert output||_2 (moe-calib --reap); NULL if
                        not measured; NaN where count == 0 */
} moe_calib_layer;

typedef struct {
    int L, E, K;               /* decoder layers, routed experts, top-k */
    moe_calib_layer *layers;   /* [L]; present only for MoE layers */
} moe_calib;

typedef struct {
    int present;
    int n;              /* experts picked */
    int *experts;       /* [n] in pick order */
    double *scores;     /* [n] score after each pick */
    double *cand;       /* [n * E] every candidate's score per pick; NaN = not a candidate */
    int n_unrouted;
    int *unrouted;      /* experts left out: never routed in calibration */
} moe_rank_layer;

typedef struct {
    int L, E;
    int metric, max_length;
    moe_rank_layer *layers; /* [L] */
} moe_ranking;

typedef struct {
    int present;        /* a plan record was read (or computed) */
    int k;              /* routed experts kept per condensed layer */
    int n;              /* layers in the order */
    int *order;         /* [n] decoder-layer indices, greedy order */
    double *scores;     /* [n] score after each step */
    float *weights;     /* [n * k] mean weights of the first k ranked experts of
                           order[i] (row i) as the search scored them (--weight
                           overrides included); NULL from streams older than the key */
    int L;
    double *cand;       /* [n * L] candidates' scores per step (beam 1); NaN = not a candidate */
    int beam, metric, max_length;
    int method;         /* MOE_PLAN_CDMOE (condense), MOE_PLAN_LAYERDROP (drop the MLP),
                           MOE_PLAN_BLOCKDROP (drop the decoder layer); the numbering
                           of moe_drop_kind.  "method" key, absent = cdmoe */
    int criterion;      /* MOE_PLAN_GREEDY (greedy on the divergence) or MOE_PLAN_COSINE
                           (one shot: layers by the cosine similarity of their input
                           and output, most similar first; scores = that similarity) */
} moe_plan;

enum { MOE_PLAN_CDMOE, MOE_PLAN_LAYERDROP, MOE_PLAN_BLOCKDROP };
enum { MOE_PLAN_GREEDY, MOE_PLAN_COSINE };
/* "cdmoe" / "layerdrop" / "blockdrop" and "greedy" / "cosine" <-> the enums; -1 if unknown */
const char *moe_plan_method_name(int method);
int moe_plan_method_from_name(const char *s);
const char *moe_plan_criterion_name(int criterion);
int moe_plan_criterion_from_name(const char *s);

void moe_seqs_free(moe_seqs *s);
void moe_calib_free(moe_calib *c);
void moe_ranking_free(moe_ranking *r);
void moe_plan_free(moe_plan *p);

/* Sized tables: L layers of E experts, no layer present. */
void moe_calib_init(moe_calib *c, int L, int E, int K);
void moe_calib_layer_init(moe_calib_layer *cl, int E);

/* metric names "js", "kl", "mse", "cosine" <-> MOE_DIV_*; -1 if unknown */
int moe_metric_from_name(const char *s);
const char *moe_metric_name(int metric);

typedef struct {
    int L, E;                 /* the model's decoder layers and routed experts, which the
                                 records must fit; 0: taken from the records (no model) */
    moe_tokens_check *tokens; /* check the tokens records against a model (NULL: not) */
} moe_records_opts;

/* Read every record of r to its end, copying each to copy (if not NULL) and
 * collecting the token sequences, calib, ranking and plan records (any of
 * seqs, calib, ranking, plan may be NULL: those records are not collected;
 * of several plan records the last counts).  0 or -1. */
int moe_records_collect(moe_reader *r, moe_writer *copy, const moe_records_opts *o,
                        moe_seqs *seqs, moe_calib *calib, moe_ranking *ranking, moe_plan *plan);

int moe_calib_write(moe_writer *w, const moe_calib *c);
int moe_ranking_write(moe_writer *w, const moe_ranking *r);
int moe_plan_write(moe_writer *w, const moe_plan *p);

/* ---- dump (moe-eval --dump) ---------------------------------------------------- */

/* {"type":"dump","index":i,"hidden":f32[L1,T,H] (hidden != NULL),
 *  "logits":f32[T,V] (logits != NULL)} */
int moe_dump_write(moe_writer *w, int64_t index, int T, const float *hidden, int L1, int H,
                   const float *logits, int V);

/* ---- evaluation results (moe-eval -o) -------------------------------------------- */

/* What moe-eval measured of one model (the records' keys, see moe-eval(1)). */
typedef struct {
    const char *dir, *fingerprint;
    uint64_t params, bytes;
    uint64_t active;                  /* parameters per token (moe_eval_active_params) */
    const moe_ppl_result *ppl;        /* NULL: no perplexity */
    int ntasks;
    moe_task *const *tasks;           /* [ntasks] */
    const moe_task_result *task;      /* [ntasks] */
    int has_bench;
    long bench_tokens, bench_runs;
    double bench_s, tok_per_s, peak_rss_mib;
    int resident;
} moe_eval_record;

/* The records of model k: "model", then "ppl", "task"s and "bench" as measured. */
int moe_eval_write(moe_writer *w, int k, const moe_eval_record *e);
/* The "compare" record of two models (speedup only when both were benchmarked). */
int moe_eval_compare_write(moe_writer *w, const moe_eval_record *dense, const moe_eval_record *condensed,
                           int bench);

/* ---- training log (moe-tune, kind "tune") ---------------------------------------- */

#define MOE_KIND_TUNE "tune"

/* One optimizer step: {"type":"step", "stage", "step", "epoch", "loss", "lr",
 * "grad_norm", "tokens", "sequences", "tokens_per_s", "seconds"}.  loss is
 * the step's token-weighted mean cross-entropy (before the update), tokens
 * the targets it counted; seconds the wall time since the run started. */
typedef struct {
    int stage;            /* 1: --data, 2: --sft */
    long step, epoch;     /* step from 1 over the whole run; epoch of the stage from 1 */
    double loss, lr, grad_norm;
    long tokens, sequences;
    double tokens_per_s, seconds;
} moe_tune_step;
/* A validation: {"type":"val", "stage", "step", "loss", "ppl", "tokens"}. */
typedef struct {
    int stage;
    long step;
    double loss;          /* mean cross-entropy per token */
    long tokens;
} moe_tune_val;

int moe_tune_step_write(moe_writer *w, const moe_tune_step *s);
int moe_tune_val_write(moe_writer *w, const moe_tune_val *v);

#endif
