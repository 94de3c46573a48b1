/* cplan.h - what moe-condense needs to know: per MoE layer the experts'
 * mean routing weights and their greedy ranking, and the greedy order of
 * layers to condense.
 *
 * Two sources:
 *   - a moe-stream with records written by moe-calib ("calib"),
 *     moe-expert-rank ("ranking") and moe-layer-search ("plan");
 *   - the JSON files of the original CD-MoE code: dynamic_weight.json
 *     ({"O-E": [sum, count, mean]}), layer_idx_to_expert_idx*.json
 *     ({"O": [e1, e2, ...]}) and layer_idx_order*.json ([o1, o2, ...]).
 *     They number layers by MoE ordinal O (0 = the first MoE layer); the
 *     plan maps ordinals to decoder-layer indices with the model's config.
 * Inside a plan, layers are always decoder-layer indices. */
#ifndef MOE_CPLAN_H
#define MOE_CPLAN_H

#include "config.h"
#include "stream.h"

typedef struct moe_cplan {
    int num_layers;      /* decoder layers of the model */
    int n_experts;       /* routed experts per MoE layer (E) */
    /* mean routing weight of expert e in layer l: mean[l * E + e];
     * has_mean[l * E + e] = 0 when calibration never routed to it */
    double *mean;
    unsigned char *has_mean;
    /* greedy expert ranking of layer l (best first): ranked[l], n_ranked[l]
     * (0 = layer not ranked) */
    int **ranked;
    int *n_ranked;
    /* greedy layer order (decoder indices), and the K it was searched with
     * (-1 if unknown, e.g. from the original's JSON) */
    int *order;
    int n_order;
    int order_experts;
    /* the weights the search scored the order with: [n_order * order_experts],
     * row i for order[i]'s first order_experts ranked experts (they include
     * --weight overrides); NULL when not known (JSON files, older plans):
     * then the calib means are used */
    float *order_weights;
    int order_method;    /* the plan's MOE_PLAN_* method; -1 from the original's JSON */
    /* expert pruning: routing count and REAP saliency of expert e of layer l
     * at [l * E + e] (from the calib records); has_reap[l]: layer l has them */
    double *count, *reap;
    unsigned char *has_count, *has_reap;
} moe_cplan;

moe_cplan *moe_cplan_new(const moe_config *cfg);
void moe_cplan_free(moe_cplan *p);

/* Decoder index of MoE ordinal o (-1 if out of range), and back. */
int moe_cplan_moe_layer(const moe_config *cfg, int ordinal);
int moe_cplan_ordinal(const moe_config *cfg, int layer);

/* Add what a stream holds (its calib, ranking and plan records, read by
 * lib/records.c; others are ignored).  Reads the stream to its end. */
int moe_cplan_read_stream(moe_cplan *p, const moe_config *cfg, moe_reader *r);
/* Add what the original's JSON files hold; any path may be NULL. */
int moe_cplan_read_cdmoe(moe_cplan *p, const moe_config *cfg, const char *weights_json,
                        const char *experts_json, const char *order_json);

/* The condensation of the first n_layers of the order, each with its first
 * k ranked experts and their mean weights: fills layers[n_layers],
 * experts[n_layers * k], weights[n_layers * k].  Errors name what is
 * missing (no order, layer not ranked, fewer than k ranked experts, an
 * expert without a mean weight). */
int moe_cplan_select(const moe_cplan *p, int n_layers, int k, int *layers, int *experts,
                    float *weights);

/* Expert pruning: the n experts of every MoE layer with the highest routing
 * count (by_reap 0) or REAP saliency (by_reap 1), ties to the lower id,
 * listed in increasing id order in kept[ordinal * n ...] for the MoE layers
 * in layer order (*n_moe of them).  Errors name what is missing (no calib
 * record for a layer, no REAP saliency: run moe-calib --reap). */
int moe_cplan_prune(const moe_cplan *p, const moe_config *cfg, int n, int by_reap, int *kept,
                    int *n_moe);

#endif
