/* testmodel.h - the forward runs the model's device tests share
 * (test_model_device.c, gpu_model.c): the tiny fixture models of
 * tests/fixtures/models, their NSEQ fixture sequences run on a given device,
 * every hidden state, the logits and the expert choices kept.  Header only,
 * like testutil.h. */
#ifndef MOE_TESTMODEL_H
#define MOE_TESTMODEL_H

#include "backend_cuda.h"
#include "common.h"
#include "model.h"
#include "testutil.h"

#define FIX "tests/fixtures/models"
#define NSEQ 3
static const char *ARCHS[] __attribute__((unused)) = {"deepseek", "qwen2_moe", "qwen3_moe", "olmoe",
                                                      "mixtral"};

/* the ids of a fixture sequence: .npy, little-endian <i4, 1-D; NULL if unreadable */
static inline int32_t *tm_read_ids(const char *path, int *T) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    unsigned char pre[10];
    int32_t *ids = NULL;
    if (fread(pre, 1, 10, f) == 10 && !memcmp(pre, "\x93NUMPY", 6) && pre[6] == 1) {
        size_t hl = pre[8] | (pre[9] << 8);
        char *h = calloc(1, hl + 1);
        char *p;
        if (fread(h, 1, hl, f) == hl && strstr(h, "'<i4'") && (p = strstr(h, "'shape'")) &&
            (p = strchr(p, '('))) {
            long n = strtol(p + 1, NULL, 10);
            if (n > 0) {
                ids = malloc(sizeof(int32_t) * (size_t)n);
                if (fread(ids, 4, (size_t)n, f) != (size_t)n) {
                    free(ids);
                    ids = NULL;
                }
                *T = (int)n;
            }
        }
        free(h);
    }
    fclose(f);
    return ids;
}

/* routing observer: keeps every layer's expert ids, concatenated */
typedef struct {
    int32_t *idx;
    size_t n, cap;
} tm_routes;

static inline void tm_on_route(void *ctx, int layer, int T, int K, int E, const int32_t *idx,
                               const float *wt, const float *probs) {
    (void)layer, (void)E, (void)wt, (void)probs;
    tm_routes *r = ctx;
    size_t m = (size_t)T * K;
    if (r->n + m > r->cap) {
        r->cap = (r->n + m) * 2;
        r->idx = moe_realloc(r->idx, sizeof(int32_t) * r->cap);
    }
    memcpy(r->idx + r->n, idx, sizeof(int32_t) * m);
    r->n += m;
}

typedef struct {
    moe_seq s[NSEQ];
    int32_t *ids[NSEQ];
    tm_routes r;
    int L, H, V;
} tm_run;

/* The fixture sequences of dir through the open model m, as one batch. */
static inline void tm_forward(tm_run *out, moe_model *m, const char *dir, const char *device) {
    const moe_config *c = moe_model_config(m);
    int L = c->num_layers, H = c->hidden_size, V = c->vocab_size;
    memset(out, 0, sizeof *out);
    out->L = L, out->H = H, out->V = V;
    for (int i = 0; i < NSEQ; i++) {
        char p[512];
        snprintf(p, sizeof p, "%s/seq%d_ids.npy", dir, i);
        int T = 0;
        if (!(out->ids[i] = tm_read_ids(p, &T))) fail_msg("cannot read %s", p);
        out->s[i] = (moe_seq){out->ids[i], T, malloc(sizeof(float) * (size_t)(L + 1) * T * H),
                              malloc(sizeof(float) * (size_t)T * V)};
    }
    if (moe_model_forward(m, out->s, NSEQ, 0, tm_on_route, &out->r) < 0)
        fail_msg("%s (%s): %s", dir, device, moe_error());
}

/* The fixture model in dir on device, its sequences as one batch. */
static inline void tm_run_model(tm_run *out, const char *dir, const char *device) {
    moe_model_opts o = {.device = device};
    moe_model *m = moe_model_open(dir, &o);
    if (!m) fail_msg("%s (%s): %s", dir, device, moe_error());
    tm_forward(out, m, dir, device);
    if (moe_backend_status(moe_model_backend(m)) < 0) fail_msg("%s: %s", dir, moe_error());
    moe_model_close(m);
}

static inline void tm_free_run(tm_run *r) {
    for (int i = 0; i < NSEQ; i++) free(r->ids[i]), free(r->s[i].hidden), free(r->s[i].logits);
    free(r->r.idx);
}

#endif
