/* search.h - CD-MoE steps 1 and 2: routing statistics (calibration), greedy
 * expert ranking per MoE layer, greedy search of the layers to condense.
 *
 * What is computed is the original CD-MoE algorithm (duterscmy/CD-MoE), as
 * described in tests/ref/CDMOE_ALGORITHM.md and implemented literally by the
 * Python reference tests/ref/cdmoe_reference.py; layers are identified by
 * their decoder-layer index everywhere (not by the original's MoE ordinal).
 *
 * Calibration (moe_calib_run): for every MoE layer and routed expert, the sum
 * of the top-k weights the router gave it over all tokens (after
 * renormalisation only where the model renormalises), the number of tokens
 * routed to it, their ratio (mean weight); per layer the mean routing entropy
 * (nats, full softmax) and each expert's load = count / (tokens * top_k).
 * Layer-major: all tokens through one layer before the next.  Sums in double,
 * tokens in stream order, so the result does not depend on batching.
 *
 * Expert ranking (moe_rank_run): for each MoE layer l independently, pick
 * routed experts greedily; candidate set S scored by condensing only layer l
 * (y = sum_{e in S} mean_e * Expert_e(x) + Shared(x), no router, every token)
 * and measuring the divergence between the original and the condensed output
 * of layer l (hidden_states[l+1]; after the final norm for the last layer),
 * per token over the hidden dimension, averaged over the tokens of a
 * sequence, then over sequences.  Lowest score wins; on equal scores the
 * lowest expert id.  Experts calibration never routed to have no mean weight:
 * they are left out of the candidates (and listed in the record).
 *   fast:  one layer-major pass; at layer l the MLP input xn and the residual
 *          h are known for all tokens, so a candidate costs one expert
 *          evaluation (cached), one weighted sum and one divergence.  Expert
 *          outputs are cached for all tokens, as many as fit in mem_bytes
 *          (in expert order); the others are recomputed per token chunk at
 *          every pick.  Each layer is loaded once.
 *   naive: the original literally: a full model forward per candidate.
 *
 * Layer search (moe_layer_search_run): greedy (beam) search over MoE layers,
 * each condensed with the first k experts of its ranking; a candidate scored
 * by the divergence of the final hidden state (after the final norm).
 * Candidates in ascending layer order; stable sort by score, the first `beam`
 * kept.
 *   fast:  the hidden states of the current best model are cached; a
 *          candidate that adds layer c restarts at layer c from the cached
 *          state instead of layer 0.  A step's candidates run layer-major:
 *          each layer is loaded once per pass for every candidate stream
 *          that has reached it, and once more condensed where a candidate
 *          starts (the model holds one kind per layer; the two kinds run one
 *          after the other); the chosen beams' cache rebuild runs as one more
 *          stream of the next step's pass.  One [tokens, H] buffer per
 *          candidate; candidates sorted by layer, in batches that fit
 *          mem_bytes, one pass each.  Streamed models (checkpoint > 1 GiB):
 *          ~L + candidates loads per step instead of ~L^2/2.  Same result bit
 *          for bit as the candidate-major loop (candidate_major = 1): each
 *          stream makes the same calls on the same buffers.
 *   naive: a full model forward per candidate.
 *
 * The baselines (o->method): LayerDrop and BlockDrop run the same greedy
 * search, a candidate's layer dropped (its MLP, or the whole decoder layer)
 * instead of condensed; no ranking is needed.  With o->criterion
 * MOE_PLAN_COSINE the order is one shot instead (He et al., "What matters
 * in transformers?"): one forward of the original model, each MoE layer
 * scored by the cosine similarity of its input and output (LayerDrop: the
 * hidden state before and after the MLP's residual add; BlockDrop: before
 * and after the decoder layer), per token, averaged over a sequence's
 * tokens, then over sequences; most similar first (ties: lower layer).
 *
 * Sequences longer than max_length are truncated to their first max_length
 * tokens for ranking and search (0 = no truncation); calibration uses them
 * whole unless told otherwise (the original's protocol).
 *
 * Library rules: nothing printed, errors through moe_error_set(). */
#ifndef MOE_SEARCH_H
#define MOE_SEARCH_H

#include <stddef.h>
#include <stdint.h>

#include "model.h"
#include "records.h"
#include "stream.h"

/* Work done, reported in provenance/stderr. */
typedef struct {
    uint64_t layer_tokens;   /* decoder-layer evaluations x tokens */
    uint64_t expert_tokens;  /* single routed-expert evaluations x tokens */
    uint64_t div_tokens;     /* per-token divergences */
    uint64_t candidates;     /* candidates scored */
    uint64_t layer_loads;    /* layers loaded (converted) by the fast paths; not in the
                                "work" record (it depends on memory, not on the result) */
    double flops;            /* matmul flops of the above (2 per multiply-add) */
    double seconds;
    uint64_t device_peak;    /* peak device memory allocated by this process (GPU
                                backends; 0 on the CPU); stderr only, like layer_loads */
} moe_search_work;

/* A mean weight supplied by the user (for an expert calibration never routed to). */
typedef struct {
    int layer, expert;
    float weight;
} moe_weight_override;

typedef struct {
    int metric;              /* MOE_DIV_* */
    int max_length;          /* truncation for ranking/search; 0 = none */
    int naive;
    size_t mem_bytes;        /* fast ranking: expert-output cache budget, 0 = 1 GiB;
                                fast layer search: budget for the candidates' activation
                                buffers (tokens x hidden floats each), 0 = a quarter of
                                the host's memory (device backends: 4 GiB) */
    int stream_weights;      /* unload every layer after use even when the model would
                                stay in memory (tests, benchmarks) */
    int candidate_major;     /* layer search: the previous fast loop, one candidate after
                                the other (reference for tests and benchmarks) */
    const int *layers;       /* restrict ranking to these decoder layers (NULL = all MoE) */
    int n_layers;
    int max_experts;         /* ranking: picks per layer */
    int k;                   /* layer search: experts per condensed layer */
    int max_layers;          /* layer search: length of the order (0 = all MoE layers) */
    int beam;                /* layer search: beam width (>= 1) */
    const moe_weight_override *weights; /* replace / supply mean weights */
    int n_weights;
    int method;              /* layer search: MOE_PLAN_CDMOE (condense each candidate),
                                MOE_PLAN_LAYERDROP (drop its MLP), MOE_PLAN_BLOCKDROP
                                (drop the whole layer) */
    int criterion;           /* layer search: MOE_PLAN_GREEDY, or MOE_PLAN_COSINE (He et
                                al.'s one-shot rank, drop methods only) */
} moe_search_opts;

/* ---- the algorithms ------------------------------------------------------------- */

/* batch_tokens: run the sequences in groups of at most this many tokens (a
 * longer sequence alone), each group layer-major; 0 = all at once.  The
 * result does not depend on it (bit for bit). */
int moe_calib_run(moe_model *m, const moe_seqs *s, int max_length, size_t batch_tokens,
                  moe_calib *out, moe_search_work *work);
/* The same, with REAP saliency (records.h, moe_calib_layer.reap) when reap:
 * each routed expert run again on the tokens routed to it. */
int moe_calib_run_reap(moe_model *m, const moe_seqs *s, int max_length, size_t batch_tokens, int reap,
                       moe_calib *out, moe_search_work *work);
int moe_rank_run(moe_model *m, const moe_seqs *s, const moe_calib *calib,
                 const moe_search_opts *o, moe_ranking *out, moe_search_work *work);
int moe_layer_search_run(moe_model *m, const moe_seqs *s, const moe_calib *calib,
                         const moe_ranking *ranking, const moe_search_opts *o, moe_plan *out,
                         moe_search_work *work);

/* One line describing the work done ("12 layer-tokens, ... , 1.2 GFLOP, 0.3 s"). */
void moe_search_work_str(const moe_search_work *w, char *buf, size_t n);
/* A "work" record (written by lib/records.c): the counts of w (no timings, so outputs stay byte-stable). */
int moe_search_work_write(moe_writer *w, const char *tool, const moe_search_work *work);

/* Parse "L:E=W" (decoder layer, expert, weight); -1 on bad syntax. */
int moe_parse_weight(const char *s, moe_weight_override *w);

/* Parse "1,3,5-9" into decoder-layer indices (malloc'd, *n set); -1 on bad syntax. */
int moe_parse_layer_list(const char *s, int **out, int *n);

#endif
