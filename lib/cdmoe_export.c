/* cdmoe_export.c - streams to the original CD-MoE JSON files. */
#include "cdmoe_export.h"
#include "common.h"
#include "jsonout.h"
#include "records.h"

#include <stdlib.h>
#include <string.h>

typedef struct {
    moe_calib calib;
    moe_ranking ranking;
    moe_plan plan;
} collected;

static int ordinal_of(const collected *c, int layer, moe_reader *r) {
    if (layer >= 0 && layer < c->calib.L && c->calib.layers[layer].present) {
        int o = c->calib.layers[layer].moe_ordinal;
        if (o >= 0) return o;
        moe_error_set(MOE_ERR_DATA, "%s: the calib record for decoder layer %d has no 'moe_ordinal'",
                      moe_reader_name(r), layer);
        return -1;
    }
    moe_error_set(MOE_ERR_DATA, "%s: no calib record for decoder layer %d (the original's MoE-layer numbering "
                  "comes from moe-calib's records)", moe_reader_name(r), layer);
    return -1;
}

/* The calib layers in MoE-ordinal order (the original's key order). */
static int sorted_calib(const collected *c, int *layers, moe_reader *r) {
    int n = 0;
    for (int l = 0; l < c->calib.L; l++)
        if (c->calib.layers[l].present) {
            if (ordinal_of(c, l, r) < 0) return -1;
            layers[n++] = l;
        }
    for (int i = 1; i < n; i++) /* insertion sort: a few dozen layers; equal ordinals keep layer order */
        for (int j = i; j > 0 && c->calib.layers[layers[j - 1]].moe_ordinal > c->calib.layers[layers[j]].moe_ordinal; j--) {
            int t = layers[j];
            layers[j] = layers[j - 1];
            layers[j - 1] = t;
        }
    return n;
}

static int write_weights(const collected *c, FILE *out, moe_reader *r) {
    int *layers = moe_malloc(sizeof(int) * (size_t)(c->calib.L + 1));
    int n = sorted_calib(c, layers, r);
    if (n < 0) {
        free(layers);
        return -1;
    }
    fputs("{", out);
    int first = 1;
    for (int i = 0; i < n; i++) {
        const moe_calib_layer *cl = &c->calib.layers[layers[i]];
        for (int e = 0; e < c->calib.E; e++) {
            if (cl->count[e] <= 0) continue; /* the original omits unrouted experts */
            fprintf(out, "%s\n    \"%d-%d\": [", first ? "" : ",", cl->moe_ordinal, e);
            moe_json_number(out, cl->sum[e], 0);
            fprintf(out, ", %lld, ", (long long)cl->count[e]);
            moe_json_number(out, cl->mean[e], 0);
            fputs("]", out);
            first = 0;
        }
    }
    fputs("\n}\n", out);
    free(layers);
    return 0;
}

static int write_experts(const collected *c, FILE *out, moe_reader *r) {
    fputs("{", out);
    int first = 1;
    for (int l = 0; l < c->ranking.L; l++) {
        const moe_rank_layer *rl = &c->ranking.layers[l];
        if (!rl->present) continue;
        int o = ordinal_of(c, l, r);
        if (o < 0) return -1;
        fprintf(out, "%s\n    \"%d\": [", first ? "" : ",", o);
        for (int j = 0; j < rl->n; j++) fprintf(out, "%s%d", j ? ", " : "", rl->experts[j]);
        fputs("]", out);
        first = 0;
    }
    fputs("\n}\n", out);
    return 0;
}

static int write_order(const collected *c, FILE *out, moe_reader *r) {
    fputs("[", out);
    for (int i = 0; i < c->plan.n; i++) {
        int o = ordinal_of(c, c->plan.order[i], r);
        if (o < 0) return -1;
        fprintf(out, "%s%d", i ? ", " : "", o);
    }
    fputs("]\n", out);
    return 0;
}

static int any_ranking(const moe_ranking *rk) {
    for (int l = 0; l < rk->L; l++)
        if (rk->layers[l].present) return 1;
    return 0;
}

static int any_calib(const moe_calib *c) {
    for (int l = 0; l < c->L; l++)
        if (c->layers[l].present) return 1;
    return 0;
}

static int write_json(const collected *c, const char *what, FILE *out, moe_reader *r) {
    if (strcmp(what, "weights") == 0) {
        if (!any_calib(&c->calib)) goto missing;
        return write_weights(c, out, r);
    } else if (strcmp(what, "experts") == 0) {
        if (!any_ranking(&c->ranking)) goto missing;
        return write_experts(c, out, r);
    } else if (strcmp(what, "order") == 0) {
        if (!c->plan.present) goto missing;
        return write_order(c, out, r);
    }
    moe_error_set(MOE_ERR_DATA, "unknown CD-MoE file '%s' (weights, experts or order)", what);
    return -1;
missing:
    moe_error_set(MOE_ERR_DATA, "%s: no %s records for the %s file (run %s first)", moe_reader_name(r),
                  !strcmp(what, "weights") ? "calib" : !strcmp(what, "experts") ? "ranking" : "plan", what,
                  !strcmp(what, "weights") ? "moe-calib" : !strcmp(what, "experts") ? "moe-expert-rank"
                                                                                 : "moe-layer-search");
    return -1;
}

int moe_cdmoe_export(moe_reader *r, const char *what, FILE *out) {
    collected c;
    moe_records_opts o = {0, 0, NULL}; /* no model: the records give the sizes */
    int rc = moe_records_collect(r, NULL, &o, NULL, &c.calib, &c.ranking, &c.plan);
    if (rc == 0) rc = write_json(&c, what, out, r);
    moe_calib_free(&c.calib);
    moe_ranking_free(&c.ranking);
    moe_plan_free(&c.plan);
    return rc;
}
