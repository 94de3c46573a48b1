/* cdmoe_export.c - streams to the original CD-MoE JSON files. */
#include "cdmoe_export.h"
#include "common.h"
#include "jsonout.h"

#include <stdlib.h>
#include <string.h>

typedef struct {
    int layer, ordinal, E;
    double *sum, *mean;
    int64_t *count;
} calib_rec;

typedef struct {
    int layer, n;
    int32_t *experts;
} rank_rec;

typedef struct {
    calib_rec *calib;
    int ncalib;
    rank_rec *rank;
    int nrank;
    int32_t *order;
    int norder;
} collected;

static int read_f64(const moe_array *a, double *dst) {
    float *tmp = moe_malloc(sizeof(float) * (size_t)(a->count ? a->count : 1));
    if (a->dtype == MOE_DT_F64) memcpy(dst, a->data, sizeof(double) * (size_t)a->count);
    else {
        moe_array_to_f32(a, tmp);
        for (int64_t i = 0; i < a->count; i++) dst[i] = tmp[i];
    }
    free(tmp);
    return 0;
}

static int collect_calib(moe_reader *r, const msgpack_object *rec, collected *c) {
    int64_t layer, ord;
    moe_array s, n, m;
    if (moe_record_int(r, rec, "layer", &layer) < 0 || moe_record_int(r, rec, "moe_ordinal", &ord) < 0 ||
        moe_record_array(r, rec, "sum", &s) < 0 || moe_record_array(r, rec, "count", &n) < 0 ||
        moe_record_array(r, rec, "mean", &m) < 0)
        return -1;
    if (n.count != s.count || m.count != s.count) {
        moe_error_set(MOE_ERR_DATA, "%s: record %llu (calib): sum, count and mean differ in length",
                      moe_reader_name(r), (unsigned long long)moe_reader_index(r));
        return -1;
    }
    c->calib = moe_realloc(c->calib, sizeof *c->calib * (size_t)(c->ncalib + 1));
    calib_rec *k = &c->calib[c->ncalib++];
    k->layer = (int)layer;
    k->ordinal = (int)ord;
    k->E = (int)s.count;
    k->sum = moe_malloc(sizeof(double) * (size_t)(k->E + 1));
    k->mean = moe_malloc(sizeof(double) * (size_t)(k->E + 1));
    k->count = moe_malloc(sizeof(int64_t) * (size_t)(k->E + 1));
    read_f64(&s, k->sum);
    read_f64(&m, k->mean);
    double *cd = moe_malloc(sizeof(double) * (size_t)(k->E + 1));
    if (n.dtype == MOE_DT_I64) memcpy(k->count, n.data, sizeof(int64_t) * (size_t)k->E);
    else {
        read_f64(&n, cd);
        for (int e = 0; e < k->E; e++) k->count[e] = (int64_t)cd[e];
    }
    free(cd);
    return 0;
}

static int collect_i32(moe_reader *r, const msgpack_object *rec, const char *key, int32_t **out, int *n) {
    moe_array a;
    if (moe_record_array(r, rec, key, &a) < 0) return -1;
    *out = moe_malloc(sizeof(int32_t) * (size_t)(a.count + 1));
    *n = (int)a.count;
    if (moe_array_to_i32(&a, *out) == 0) return 0;
    moe_error_set(MOE_ERR_DATA, "%s: record %llu: key '%s': %s", moe_reader_name(r),
                  (unsigned long long)moe_reader_index(r), key, moe_error());
    return -1;
}

static int collect(moe_reader *r, collected *c) {
    const msgpack_object *rec;
    int rc;
    while ((rc = moe_reader_next(r, &rec)) > 0) {
        if (moe_record_is(rec, "calib")) {
            if (collect_calib(r, rec, c) < 0) return -1;
        } else if (moe_record_is(rec, "ranking")) {
            int64_t layer;
            c->rank = moe_realloc(c->rank, sizeof *c->rank * (size_t)(c->nrank + 1));
            rank_rec *k = &c->rank[c->nrank];
            if (moe_record_int(r, rec, "layer", &layer) < 0 || collect_i32(r, rec, "experts", &k->experts, &k->n) < 0)
                return -1;
            k->layer = (int)layer;
            c->nrank++;
        } else if (moe_record_is(rec, "plan")) {
            free(c->order);
            if (collect_i32(r, rec, "order", &c->order, &c->norder) < 0) return -1;
        }
    }
    return rc;
}

static int ordinal_of(const collected *c, int layer, moe_reader *r) {
    for (int i = 0; i < c->ncalib; i++)
        if (c->calib[i].layer == layer) return c->calib[i].ordinal;
    moe_error_set(MOE_ERR_DATA, "%s: no calib record for decoder layer %d (the original's MoE-layer numbering "
                  "comes from moe-calib's records)", moe_reader_name(r), layer);
    return -1;
}

static int cmp_calib(const void *a, const void *b) {
    return ((const calib_rec *)a)->ordinal - ((const calib_rec *)b)->ordinal;
}

static int write_json(const collected *c, const char *what, FILE *out, moe_reader *r) {
    if (strcmp(what, "weights") == 0) {
        if (!c->ncalib) goto missing;
        qsort(c->calib, (size_t)c->ncalib, sizeof *c->calib, cmp_calib);
        fputs("{", out);
        int first = 1;
        for (int i = 0; i < c->ncalib; i++)
            for (int e = 0; e < c->calib[i].E; e++) {
                if (c->calib[i].count[e] <= 0) continue; /* the original omits unrouted experts */
                fprintf(out, "%s\n    \"%d-%d\": [", first ? "" : ",", c->calib[i].ordinal, e);
                moe_json_number(out, c->calib[i].sum[e], 0);
                fprintf(out, ", %lld, ", (long long)c->calib[i].count[e]);
                moe_json_number(out, c->calib[i].mean[e], 0);
                fputs("]", out);
                first = 0;
            }
        fputs("\n}\n", out);
    } else if (strcmp(what, "experts") == 0) {
        if (!c->nrank) goto missing;
        fputs("{", out);
        for (int i = 0; i < c->nrank; i++) {
            int o = ordinal_of(c, c->rank[i].layer, r);
            if (o < 0) return -1;
            fprintf(out, "%s\n    \"%d\": [", i ? "," : "", o);
            for (int j = 0; j < c->rank[i].n; j++) fprintf(out, "%s%d", j ? ", " : "", c->rank[i].experts[j]);
            fputs("]", out);
        }
        fputs("\n}\n", out);
    } else if (strcmp(what, "order") == 0) {
        if (!c->order) goto missing;
        fputs("[", out);
        for (int i = 0; i < c->norder; i++) {
            int o = ordinal_of(c, c->order[i], r);
            if (o < 0) return -1;
            fprintf(out, "%s%d", i ? ", " : "", o);
        }
        fputs("]\n", out);
    } else {
        moe_error_set(MOE_ERR_DATA, "unknown CD-MoE file '%s' (weights, experts or order)", what);
        return -1;
    }
    return 0;
missing:
    moe_error_set(MOE_ERR_DATA, "%s: no %s records for the %s file (run %s first)", moe_reader_name(r),
                  !strcmp(what, "weights") ? "calib" : !strcmp(what, "experts") ? "ranking" : "plan", what,
                  !strcmp(what, "weights") ? "moe-calib" : !strcmp(what, "experts") ? "moe-expert-rank"
                                                                                 : "moe-layer-search");
    return -1;
}

int moe_cdmoe_export(moe_reader *r, const char *what, FILE *out) {
    collected c = {0};
    int rc = collect(r, &c);
    if (rc == 0) rc = write_json(&c, what, out, r);
    for (int i = 0; i < c.ncalib; i++) {
        free(c.calib[i].sum);
        free(c.calib[i].mean);
        free(c.calib[i].count);
    }
    for (int i = 0; i < c.nrank; i++) free(c.rank[i].experts);
    free(c.calib);
    free(c.rank);
    free(c.order);
    return rc;
}
