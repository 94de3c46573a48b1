/* plan.c - gather weights, rankings and layer order from streams or from
 * the original CD-MoE's JSON files. */
#include "cplan.h"
#include "common.h"
#include "records.h"

#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

moe_cplan *moe_cplan_new(const moe_config *cfg) {
    moe_cplan *p = moe_calloc(1, sizeof *p);
    p->num_layers = cfg->num_layers;
    p->n_experts = cfg->n_routed_experts;
    size_t n = (size_t)p->num_layers * (size_t)(p->n_experts ? p->n_experts : 1);
    p->mean = moe_calloc(n, sizeof *p->mean);
    p->has_mean = moe_calloc(n, 1);
    p->ranked = moe_calloc((size_t)p->num_layers, sizeof *p->ranked);
    p->n_ranked = moe_calloc((size_t)p->num_layers, sizeof *p->n_ranked);
    p->order_experts = -1;
    p->order_method = -1;
    p->count = moe_calloc(n, sizeof *p->count);
    p->reap = moe_calloc(n, sizeof *p->reap);
    p->has_count = moe_calloc((size_t)p->num_layers + 1, 1);
    p->has_reap = moe_calloc((size_t)p->num_layers + 1, 1);
    return p;
}

void moe_cplan_free(moe_cplan *p) {
    if (!p) return;
    for (int l = 0; l < p->num_layers; l++) free(p->ranked[l]);
    free(p->ranked);
    free(p->n_ranked);
    free(p->mean);
    free(p->has_mean);
    free(p->order);
    free(p->order_weights);
    free(p->count);
    free(p->reap);
    free(p->has_count);
    free(p->has_reap);
    free(p);
}

/* MoE layers of the base model: routed or already condensed. */
static int is_moe(const moe_config *cfg, int l) { return cfg->layers[l].kind != MOE_MLP_DENSE; }

int moe_cplan_moe_layer(const moe_config *cfg, int ordinal) {
    for (int l = 0, o = 0; l < cfg->num_layers; l++)
        if (is_moe(cfg, l) && o++ == ordinal) return l;
    return -1;
}

int moe_cplan_ordinal(const moe_config *cfg, int layer) {
    if (layer < 0 || layer >= cfg->num_layers || !is_moe(cfg, layer)) return -1;
    int o = 0;
    for (int l = 0; l < layer; l++) o += is_moe(cfg, l);
    return o;
}

static int set_ranking(moe_cplan *p, const moe_config *cfg, int layer, int n, const int *experts,
                       const char *where) {
    if (layer < 0 || layer >= p->num_layers || !is_moe(cfg, layer)) {
        moe_error_set(MOE_ERR_DATA, "%s: layer %d is not a MoE layer of this model", where, layer);
        return -1;
    }
    for (int i = 0; i < n; i++)
        if (experts[i] < 0 || experts[i] >= p->n_experts) {
            moe_error_set(MOE_ERR_DATA, "%s: layer %d: expert %d out of range (model has %d)", where, layer,
                          experts[i], p->n_experts);
            return -1;
        }
    free(p->ranked[layer]);
    p->ranked[layer] = moe_malloc((size_t)(n ? n : 1) * sizeof(int));
    memcpy(p->ranked[layer], experts, (size_t)n * sizeof(int));
    p->n_ranked[layer] = n;
    return 0;
}

static int set_order(moe_cplan *p, const moe_config *cfg, int n, const int *layers, int k, const char *where) {
    for (int i = 0; i < n; i++) {
        if (layers[i] < 0 || layers[i] >= p->num_layers || !is_moe(cfg, layers[i])) {
            moe_error_set(MOE_ERR_DATA, "%s: layer order names layer %d, not a MoE layer of this model", where,
                          layers[i]);
            return -1;
        }
        for (int j = 0; j < i; j++)
            if (layers[j] == layers[i]) {
                moe_error_set(MOE_ERR_DATA, "%s: layer order names layer %d twice", where, layers[i]);
                return -1;
            }
    }
    free(p->order);
    p->order = moe_malloc((size_t)(n ? n : 1) * sizeof(int));
    memcpy(p->order, layers, (size_t)n * sizeof(int));
    p->n_order = n;
    p->order_experts = k;
    return 0;
}

/* ---- streams ------------------------------------------------------------- */

/* Mean weights from the calib records: those the searches use. */
static int take_calib(moe_cplan *p, const moe_config *cfg, const moe_calib *c, const char *where) {
    for (int l = 0; l < c->L; l++) {
        const moe_calib_layer *cl = &c->layers[l];
        if (!cl->present) continue;
        if (!is_moe(cfg, l)) {
            moe_error_set(MOE_ERR_DATA, "%s: calib record for layer %d, not a MoE layer of this model", where, l);
            return -1;
        }
        for (int e = 0; e < p->n_experts; e++) {
            size_t i = (size_t)l * p->n_experts + e;
            p->has_mean[i] = cl->count[e] > 0 && isfinite(cl->mean[e]);
            p->mean[i] = p->has_mean[i] ? cl->mean[e] : 0;
            p->count[i] = (double)cl->count[e];
            p->reap[i] = cl->reap && cl->count[e] > 0 ? cl->reap[e] : 0;
        }
        p->has_count[l] = 1;
        p->has_reap[l] = cl->reap != NULL;
    }
    return 0;
}

static int take_ranking(moe_cplan *p, const moe_config *cfg, const moe_ranking *rk, const char *where) {
    for (int l = 0; l < rk->L; l++)
        if (rk->layers[l].present && set_ranking(p, cfg, l, rk->layers[l].n, rk->layers[l].experts, where) < 0)
            return -1;
    return 0;
}

static int take_plan(moe_cplan *p, const moe_config *cfg, const moe_plan *plan, const char *where) {
    if (set_order(p, cfg, plan->n, plan->order, plan->k, where) < 0) return -1;
    p->order_method = plan->method;
    free(p->order_weights);
    p->order_weights = NULL;
    if (plan->weights) {
        size_t n = (size_t)plan->n * (size_t)plan->k;
        p->order_weights = moe_malloc(sizeof(float) * (n + 1));
        memcpy(p->order_weights, plan->weights, sizeof(float) * n);
    }
    return 0;
}

int moe_cplan_read_stream(moe_cplan *p, const moe_config *cfg, moe_reader *r) {
    char where[300];
    snprintf(where, sizeof where, "%s", moe_reader_name(r));
    moe_records_opts o = {cfg->num_layers, cfg->n_routed_experts, NULL};
    moe_calib calib;
    moe_ranking ranking;
    moe_plan plan;
    int rc = moe_records_collect(r, NULL, &o, NULL, &calib, &ranking, &plan);
    if (rc == 0) rc = take_calib(p, cfg, &calib, where);
    if (rc == 0) rc = take_ranking(p, cfg, &ranking, where);
    if (rc == 0 && plan.present) rc = take_plan(p, cfg, &plan, where);
    moe_calib_free(&calib);
    moe_ranking_free(&ranking);
    moe_plan_free(&plan);
    return rc;
}

/* ---- the original's JSON files ------------------------------------------ */

static json_t *load_json(const char *path) {
    json_error_t err;
    json_t *j = json_load_file(path, 0, &err);
    if (!j)
        moe_error_set(err.line < 0 ? MOE_ERR_IO : MOE_ERR_DATA, "%s:%d: %s", path, err.line < 0 ? 0 : err.line,
                      err.text);
    return j;
}

/* Parse a non-negative decimal integer that is the whole string. */
static int parse_index(const char *s, const char *end, int *out) {
    if (s == end) return -1;
    long v = 0;
    for (const char *c = s; c < end; c++) {
        if (*c < '0' || *c > '9' || v > 1000000) return -1;
        v = v * 10 + (*c - '0');
    }
    *out = (int)v;
    return 0;
}

static int ordinal_layer(const moe_config *cfg, int o, const char *path, const char *what) {
    int l = moe_cplan_moe_layer(cfg, o);
    if (l < 0)
        moe_error_set(MOE_ERR_DATA, "%s: %s names MoE layer %d, but the model has only %d MoE layers", path, what,
                      o, moe_cplan_ordinal(cfg, cfg->num_layers - 1) + 1);
    return l;
}

static int read_cdmoe_weights(moe_cplan *p, const moe_config *cfg, const char *path) {
    json_t *j = load_json(path);
    if (!j) return -1;
    int rc = -1;
    if (!json_is_object(j)) {
        moe_error_set(MOE_ERR_DATA, "%s: expected an object of \"layer-expert\": [sum, count, mean]", path);
        goto out;
    }
    const char *key;
    json_t *v;
    json_object_foreach(j, key, v) {
        const char *dash = strchr(key, '-');
        int o, e;
        if (!dash || parse_index(key, dash, &o) || parse_index(dash + 1, key + strlen(key), &e)) {
            moe_error_set(MOE_ERR_DATA, "%s: key \"%s\" is not \"LAYER-EXPERT\"", path, key);
            goto out;
        }
        if (!json_is_array(v) || json_array_size(v) != 3 || !json_is_number(json_array_get(v, 0)) ||
            !json_is_number(json_array_get(v, 1)) || !json_is_number(json_array_get(v, 2))) {
            moe_error_set(MOE_ERR_DATA, "%s: \"%s\": expected [sum, count, mean]", path, key);
            goto out;
        }
        int l = ordinal_layer(cfg, o, path, "a key");
        if (l < 0) goto out;
        if (e >= p->n_experts) {
            moe_error_set(MOE_ERR_DATA, "%s: \"%s\": expert %d out of range (model has %d)", path, key, e,
                          p->n_experts);
            goto out;
        }
        size_t i = (size_t)l * p->n_experts + e;
        double count = json_number_value(json_array_get(v, 1));
        p->has_mean[i] = count > 0;
        /* the third value is what the original multiplies by */
        p->mean[i] = json_number_value(json_array_get(v, 2));
    }
    rc = 0;
out:
    json_decref(j);
    return rc;
}

static int int_list(json_t *a, int *out, const char *path, const char *what) {
    for (size_t i = 0; i < json_array_size(a); i++) {
        json_t *x = json_array_get(a, i);
        if (!json_is_integer(x) || json_integer_value(x) < 0) {
            moe_error_set(MOE_ERR_DATA, "%s: %s: entry %zu is not a non-negative integer", path, what, i);
            return -1;
        }
        out[i] = (int)json_integer_value(x);
    }
    return 0;
}

static int read_cdmoe_experts(moe_cplan *p, const moe_config *cfg, const char *path) {
    json_t *j = load_json(path);
    if (!j) return -1;
    int rc = -1;
    if (!json_is_object(j)) {
        moe_error_set(MOE_ERR_DATA, "%s: expected an object of \"layer\": [experts...]", path);
        goto out;
    }
    const char *key;
    json_t *v;
    json_object_foreach(j, key, v) {
        int o;
        if (parse_index(key, key + strlen(key), &o) || !json_is_array(v)) {
            moe_error_set(MOE_ERR_DATA, "%s: \"%s\": expected a layer number and a list of experts", path, key);
            goto out;
        }
        int l = ordinal_layer(cfg, o, path, "a key");
        if (l < 0) goto out;
        int n = (int)json_array_size(v);
        int *ex = moe_malloc((size_t)(n ? n : 1) * sizeof *ex);
        char what[64];
        snprintf(what, sizeof what, "layer \"%s\"", key);
        int bad = int_list(v, ex, path, what) || set_ranking(p, cfg, l, n, ex, path);
        free(ex);
        if (bad) goto out;
    }
    rc = 0;
out:
    json_decref(j);
    return rc;
}

static int read_cdmoe_order(moe_cplan *p, const moe_config *cfg, const char *path) {
    json_t *j = load_json(path);
    if (!j) return -1;
    int rc = -1;
    if (!json_is_array(j)) {
        moe_error_set(MOE_ERR_DATA, "%s: expected a list of layer numbers", path);
        goto out;
    }
    int n = (int)json_array_size(j);
    int *layers = moe_malloc((size_t)(n ? n : 1) * sizeof *layers);
    if (int_list(j, layers, path, "layer order") == 0) {
        rc = 0;
        for (int i = 0; i < n && rc == 0; i++)
            if ((layers[i] = ordinal_layer(cfg, layers[i], path, "the order")) < 0) rc = -1;
        if (rc == 0) rc = set_order(p, cfg, n, layers, -1, path);
        free(p->order_weights); /* weights come with a plan's own order only */
        p->order_weights = NULL;
    }
    free(layers);
out:
    json_decref(j);
    return rc;
}

int moe_cplan_read_cdmoe(moe_cplan *p, const moe_config *cfg, const char *weights_json, const char *experts_json,
                        const char *order_json) {
    if (weights_json && read_cdmoe_weights(p, cfg, weights_json) < 0) return -1;
    if (experts_json && read_cdmoe_experts(p, cfg, experts_json) < 0) return -1;
    if (order_json && read_cdmoe_order(p, cfg, order_json) < 0) return -1;
    return 0;
}

int moe_cplan_select(const moe_cplan *p, int n_layers, int k, int *layers, int *experts, float *weights) {
    if (n_layers > p->n_order) {
        if (p->n_order == 0)
            moe_error_set(MOE_ERR_DATA, "no layer order (run moe-layer-search, or give the original's "
                                        "layer_idx_order JSON)");
        else
            moe_error_set(MOE_ERR_DATA, "%d layers asked for, but the layer order has only %d", n_layers,
                          p->n_order);
        return -1;
    }
    if (p->order_experts >= 0 && p->order_experts != k)
        moe_warn("the layer order was searched with %d experts per layer, condensing with %d",
                 p->order_experts, k);
    for (int i = 0; i < n_layers; i++) {
        int l = p->order[i];
        layers[i] = l;
        if (k > p->n_ranked[l]) {
            moe_error_set(MOE_ERR_DATA, "layer %d: %d experts asked for, but %s", l, k,
                          p->n_ranked[l] ? "fewer are ranked" : "it has no expert ranking (run moe-expert-rank)");
            return -1;
        }
        for (int j = 0; j < k; j++) {
            int e = p->ranked[l][j];
            size_t idx = (size_t)l * p->n_experts + e;
            experts[i * k + j] = e;
            if (p->order_weights && j < p->order_experts) { /* what the search scored */
                weights[i * k + j] = p->order_weights[(size_t)i * p->order_experts + j];
                continue;
            }
            if (!p->has_mean[idx]) {
                moe_error_set(MOE_ERR_DATA, "layer %d: expert %d has no mean routing weight (calibration never "
                              "routed a token to it, or no calibration statistics were given)", l, e);
                return -1;
            }
            weights[i * k + j] = (float)p->mean[idx];
        }
    }
    return 0;
}

/* the n best of layer l's E experts by score (ties: lower id), in id order */
static void top_experts(const double *score, int E, int n, int *out) {
    unsigned char *taken = moe_calloc((size_t)E + 1, 1);
    for (int i = 0; i < n; i++) {
        int best = -1;
        for (int e = 0; e < E; e++)
            if (!taken[e] && (best < 0 || score[e] > score[best])) best = e;
        taken[best] = 1;
    }
    for (int e = 0, i = 0; e < E; e++)
        if (taken[e]) out[i++] = e;
    free(taken);
}

int moe_cplan_prune(const moe_cplan *p, const moe_config *cfg, int n, int by_reap, int *kept,
                    int *n_moe) {
    int E = p->n_experts;
    *n_moe = 0;
    for (int l = 0; l < p->num_layers; l++) {
        if (cfg->layers[l].kind != MOE_MLP_MOE) continue;
        if (!p->has_count[l] || (by_reap && !p->has_reap[l])) {
            moe_error_set(MOE_ERR_DATA, "layer %d: no %s (run moe-calib%s)", l,
                          by_reap ? "REAP saliency" : "routing counts", by_reap ? " --reap" : "");
            return -1;
        }
        top_experts((by_reap ? p->reap : p->count) + (size_t)l * E, E, n, kept + (size_t)*n_moe * n);
        (*n_moe)++;
    }
    return 0;
}
