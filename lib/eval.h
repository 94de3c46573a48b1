/* eval.h - what moe-eval measures: perplexity and multiple-choice tasks scored
 * the way lm-evaluation-harness scores them, on top of lib/model.h.
 *
 * ---- Scoring core -----------------------------------------------------------
 * moe_eval_score() takes token windows and, for each, sums log p(ids[t] |
 * ids[<t]) over the scored positions t in [start, T) (natural log), and says
 * whether every scored token is the argmax of its distribution (the
 * harness's is_greedy).  Only ids[0..T-2] are fed (the last token is never an
 * input), and the lm_head runs only on the rows that predict scored tokens.
 * Sequences run layer-major in batches of at most batch_tokens tokens (each
 * layer's weights are loaded once per batch); log-softmax is computed per row
 * in double (max-subtracted), the sums in double, in a fixed order, so the
 * result depends neither on the thread count nor on the batch size (the
 * engine's per-row results do not depend on the number of rows).
 *
 * Prefix sharing (default; opts.no_prefix_cache = 1 turns it off).
 * Consecutive sequences with the same start >= 2 and the same tokens
 * ids[0 .. start-2] (the choices of one multiple-choice item, whose windows
 * share the context tokens exactly) form a group: per layer, those
 * start-1 context tokens run once, keeping their keys/values
 * (moe_layer_attention_kv), and each sequence then runs only its positions
 * start-1 .. T-2 over that cache.  A sequence that matches no neighbour
 * (context tokens changed by a merge across the context/continuation
 * boundary, different contexts as in partial scoring, truncated windows)
 * runs whole.  On the CPU the log-likelihoods are bit-identical either way
 * (kernels.h, attention_kv); on a device, equal within fp32 rounding.
 *
 * ---- Perplexity (moe_eval_ppl) ----------------------------------------------
 * Each sample is a token sequence (the caller tokenizes: the original CD-MoE
 * runs the tokenizer with its special tokens, i.e. DeepSeek's BOS, and no
 * truncation).  A sample's NLL is the sum over t = 1..T-1 of -log p(ids[t] |
 * ids[<t]) (Hugging Face's shifted-label loss).  Two figures:
 *   ppl        = exp( mean over samples of (NLL_s / (T_s - 1)) )
 *                what CD-MoE's compute_ppl prints (batch size 1, the model's
 *                mean loss per text, averaged over texts, exponentiated);
 *   ppl_token  = exp( Σ_s NLL_s / Σ_s (T_s - 1) )  (token-weighted).
 * Samples with fewer than 2 tokens predict nothing; they are skipped and
 * counted (Hugging Face would give NaN for them).
 *
 * ---- Tasks ------------------------------------------------------------------
 * A task is a list of items; an item has n choices, each a (context,
 * continuation) pair, and a gold index.  Formats read (moe_task_load; auto
 * detection from the file name and the first record, or forced):
 *   "mc"          JSON Lines {"query", "choices", "gold"} (MosaicML's
 *                 multiple_choice; ARC, BoolQ, OpenBookQA, PIQA, COPA, SIQA,
 *                 CommonsenseQA; our fixtures).  "context" is accepted for
 *                 "query".  context = query, continuation = delimiter +
 *                 choice.  Delimiter: MosaicML's continuation_delimiter for
 *                 its gauntlet files, by file name: arc_easy, arc_challenge,
 *                 piqa, boolq -> "\nAnswer: "; anything else " " (the
 *                 harness's target_delimiter).
 *   "schema"      JSON Lines {"context_options", "continuation", "gold"}
 *                 (MosaicML's WinoGrande): choice i = (context_options[i] +
 *                 " ", continuation); partial scoring: the same continuation
 *                 scored after each context.  No acc_norm.
 *   "lm"          JSON Lines {"context", "continuation"} (LAMBADA): one
 *                 choice (context + " ", continuation); acc = is_greedy,
 *                 perplexity = exp(-mean loglik), as the harness's
 *                 lambada_openai.
 *   "piqa"        PIQA's own valid.jsonl {"goal","sol1","sol2"} + the labels
 *                 file beside it (X.jsonl -> X-labels.lst): harness prompt
 *                 "Question: {goal}\nAnswer:" + " " + sol.
 *   "winogrande"  WinoGrande's dev.jsonl {"sentence","option1","option2",
 *                 "answer"} (answer "1"/"2"; if absent, X-labels.lst):
 *                 harness partial scoring: context_i = sentence up to "_" +
 *                 option_i, continuation = " " + (rest after "_", stripped).
 *                 No acc_norm.
 *   "hellaswag"   llama.cpp's text format (6 lines per item: context, gold
 *                 label, 4 endings): the harness's preprocess() (strip,
 *                 " [title]" -> ". ", drop "[...]", "  " -> " ") on the context
 *                 and endings, continuation = " " + ending.  The text format
 *                 has ctx_a and ctx_b joined, so the harness's
 *                 ctx_b.capitalize() cannot be reproduced: the context is
 *                 used as written (as llama.cpp does).
 *   "rte"         GLUE RTE dev.tsv (sentence1, sentence2, label, idx):
 *                 harness prompt "{s1}\nQuestion: {s2} True or False?\nAnswer:",
 *                 choices " True" / " False", gold = label (0 = entailment).
 *                 No acc_norm.
 *
 * Tokenization of a (context, continuation) pair, as the harness's HFLM
 * (_encode_pair): trailing whitespace of the context (ASCII whitespace) is
 * moved to the front of the continuation; whole = encode(context +
 * continuation), ctx = encode(context), continuation tokens = whole[len(ctx):].
 * No special tokens (the harness's default for causal LMs) unless add_bos;
 * an empty context becomes [BOS] (or EOS when the model has no BOS id; ids from
 * config.json), as the harness's prefix token; a context of only whitespace
 * is scored as [BOS] + encode(context + continuation).  The
 * window is the last max_length + 1 tokens (max_length = the model's
 * max_position_embeddings by default, as the harness).
 *
 * Metrics per task, as the harness defines them:
 *   acc       mean over items of [argmax_i loglik_i == gold]
 *   acc_norm  mean of [argmax_i loglik_i / len_i == gold], len_i = length of
 *             choice i's text in characters (Unicode code points; Python's
 *             len(str), which the harness calls byte-length normalisation;
 *             equal to bytes for ASCII), without the delimiter.
 *             Reported for "mc" (except the files named boolq, copa,
 *             commonsense_qa, siqa, social_iqa: the harness gives those acc
 *             only), "piqa" and "hellaswag".
 * argmax: first maximum (numpy); NaN wins as in numpy.
 *
 * Library rules: nothing printed; -1/NULL with moe_error_set(). */
#ifndef MOE_EVAL_H
#define MOE_EVAL_H

#include <stddef.h>
#include <stdint.h>

#include "model.h"
#include "tokenizer.h"

typedef struct {
    size_t batch_tokens;  /* tokens per layer-major batch; 0 = 4096 */
    /* progress callback (may be NULL): tokens done of total */
    void (*progress)(void *ctx, uint64_t done, uint64_t total);
    void *progress_ctx;
    int no_prefix_cache;  /* 1: run every sequence whole (no prefix sharing) */
    int64_t *tokens_run;  /* out, may be NULL: tokens run through the layers */
} moe_eval_opts;

/* ---- scoring core ----------------------------------------------------------- */

typedef struct {
    const int32_t *ids; /* [T] */
    int T;
    int start;          /* first scored position, 1 <= start <= T (T: nothing scored) */
    double logprob;     /* out: Σ_{t=start}^{T-1} log p(ids[t] | ids[<t]) */
    int greedy;         /* out: 1 if every scored token is its row's argmax */
} moe_eval_seq;

int moe_eval_score(moe_model *m, moe_eval_seq *seqs, int n, const moe_eval_opts *o);

/* ---- perplexity -------------------------------------------------------------- */

typedef struct {
    int64_t n_samples;    /* samples scored (>= 2 tokens) */
    int64_t n_skipped;    /* samples with fewer than 2 tokens */
    int64_t n_tokens;     /* predicted tokens */
    double mean_nll;      /* mean over samples of per-sample mean token NLL */
    double ppl;           /* exp(mean_nll): CD-MoE's figure */
    double token_nll;     /* Σ NLL / Σ tokens */
    double ppl_token;     /* exp(token_nll) */
    double *sample_nll;   /* [n] per-sample NLL sums (NaN when skipped) */
    int32_t *sample_tokens; /* [n] predicted tokens per sample */
    int n;
} moe_ppl_result;

int moe_eval_ppl(moe_model *m, const int32_t *const *ids, const int *T, int n,
                 const moe_eval_opts *o, moe_ppl_result *res);
void moe_ppl_result_free(moe_ppl_result *r);

/* ---- tasks ------------------------------------------------------------------- */

typedef enum { MOE_TASK_MC, MOE_TASK_LM } moe_task_kind;

typedef struct {
    int n;          /* choices */
    char **ctx;     /* [n] context of each choice (owned) */
    char **cont;    /* [n] continuation of each choice, delimiter included (owned) */
    int *norm_len;  /* [n] characters of the choice text (acc_norm) */
    int gold;
} moe_task_item;

typedef struct {
    char *name;     /* "piqa", "arc_easy", ... */
    char *path;
    const char *format;  /* "mc", "schema", "lm", "piqa", "winogrande", "hellaswag", "rte" */
    moe_task_kind kind;
    int has_acc_norm;
    int n_items;
    moe_task_item *items;
} moe_task;

/* Formats known, comma-separated, for help texts. */
const char *moe_task_formats(void);
/* Load a task file.  format NULL = auto-detect; delimiter NULL = the
 * format's default ("mc" only); limit > 0 keeps the first `limit` items. */
moe_task *moe_task_load(const char *path, const char *format, const char *delimiter, long limit);
void moe_task_free(moe_task *t);

typedef struct {
    int add_bos;       /* prepend the tokenizer's special tokens (harness add_bos_token) */
    int max_length;    /* window; 0 = the model's max_position_embeddings */
} moe_task_opts;

typedef struct {
    int n_items;
    double acc;        /* MC: accuracy; LM: greedy-match accuracy */
    double acc_norm;   /* NaN when the task has none */
    double perplexity; /* LM tasks: exp(-mean loglik); NaN otherwise */
    int64_t n_seqs;    /* windows scored */
    int64_t n_tokens;  /* tokens fed */
    int64_t n_tokens_run; /* tokens run through the layers: n_tokens less the shared
                             contexts' repeats (prefix sharing) and duplicate windows */
    /* per item: offsets into the flat per-choice arrays */
    int *choice_off;   /* [n_items + 1] */
    double *loglik;    /* [total choices] */
    int *greedy;       /* [total choices] */
    int *pred, *pred_norm; /* [n_items] */
} moe_task_result;

int moe_eval_task(moe_model *m, moe_tokenizer *tok, const moe_task *t, const moe_task_opts *to,
                  const moe_eval_opts *o, moe_task_result *r);
void moe_task_result_free(moe_task_result *r);

/* Harness-style pair encoding (exposed for tests): *ids = context tokens +
 * continuation tokens, *nctx = number of context tokens.  0 or -1. */
int moe_eval_encode_pair(moe_tokenizer *tok, const char *ctx, const char *cont, int add_bos,
                         int32_t **ids, size_t *n, size_t *nctx);

/* ---- sizes -------------------------------------------------------------------- */

/* Parameters and bytes of the tensors the model uses (what its config
 * implies; a tied lm_head counted once). */
int moe_eval_model_size(moe_model *m, uint64_t *params, uint64_t *bytes);
/* Parameters one token uses, counted from the config the same way for every
 * method: every tensor the config implies, except that a routed MoE layer's
 * experts count top_k of n_routed_experts (an expert-pruned model: top_k of
 * the kept ones); a condensed layer's kept experts all count (every token
 * runs them); dropped layers count nothing of what they lost. */
uint64_t moe_eval_active_params(const moe_config *c);

#endif
