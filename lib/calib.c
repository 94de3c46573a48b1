/* calib.c - CD-MoE step 1 (routing statistics), and the search tools' option
 * helpers.  The records themselves are read and written by lib/records.c. */
#include "search.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

/* ---- step 1: calibration ------------------------------------------------------ */

typedef struct {
    moe_calib *c;
    double *ent;      /* [L] entropy sums */
    moe_progress *progress; /* one step per MoE layer per batch */
    moe_model *m;     /* REAP (NULL: not measured) */
    int32_t *idx;     /* the routing calib_cb saw last, for reap_hook: [T, K] */
    float *wt;
    int T, K;
} calib_ctx;

static void calib_cb(void *vctx, int layer, int T, int K, int E, const int32_t *idx,
                     const float *wt, const float *probs) {
    calib_ctx *x = vctx;
    moe_progress_add(x->progress, 1);
    moe_calib_layer *cl = &x->c->layers[layer];
    if (!cl->present) moe_calib_layer_init(cl, E);
    for (int t = 0; t < T; t++) {
        for (int k = 0; k < K; k++) {
            int e = idx[(size_t)t * K + k];
            cl->sum[e] += (double)wt[(size_t)t * K + k];
            cl->count[e]++;
        }
        double h = 0.0;
        for (int e = 0; e < E; e++) {
            double p = probs[(size_t)t * E + e];
            if (p > 0) h -= p * log(p);
        }
        x->ent[layer] += h;
    }
    cl->tokens += T;
    if (x->m) { /* keep the routing for reap_hook, which follows in the same layer */
        free(x->idx);
        free(x->wt);
        x->idx = moe_malloc(sizeof(int32_t) * (size_t)T * K + 1);
        x->wt = moe_malloc(sizeof(float) * (size_t)T * K + 1);
        memcpy(x->idx, idx, sizeof(int32_t) * (size_t)T * K);
        memcpy(x->wt, wt, sizeof(float) * (size_t)T * K);
        x->T = T;
        x->K = K;
    }
}

/* REAP saliency sums of layer l: for each expert, its output on the tokens
 * routed to it (gathered rows of xn), ||.||_2 times the gate weight, summed
 * in token order (the mean is taken at the end). */
static int reap_hook(void *ctx, int l, const float *x, const float *xn, const float *y) {
    (void)x;
    (void)y;
    calib_ctx *c = ctx;
    if (!c->m || moe_model_layer_kind(c->m, l) != MOE_MLP_MOE || !c->idx) return 0;
    const moe_backend *be = moe_model_backend(c->m);
    moe_calib_layer *cl = &c->c->layers[l];
    int H = moe_model_config(c->m)->hidden_size, E = c->c->E, T = c->T, K = c->K;
    if (!cl->reap) cl->reap = moe_calloc((size_t)E + 1, sizeof(double));
    float *xh = moe_malloc(sizeof(float) * (size_t)T * H + 1), *rows = moe_malloc(sizeof(float) * (size_t)T * H + 1);
    int *tok = moe_malloc(sizeof(int) * (size_t)T + 1);
    float *g = moe_malloc(sizeof(float) * (size_t)T + 1);
    be->download(xh, xn, sizeof(float) * (size_t)T * H);
    float *xb = moe_model_alloc(c->m, (size_t)T * H), *yb = moe_model_alloc(c->m, (size_t)T * H);
    int rc = 0;
    for (int e = 0; e < E && rc == 0; e++) {
        int n = 0;
        for (int t = 0; t < T; t++)
            for (int k = 0; k < K; k++)
                if (c->idx[(size_t)t * K + k] == e) {
                    tok[n] = t;
                    g[n++] = c->wt[(size_t)t * K + k];
                }
        if (n == 0) continue;
        for (int i = 0; i < n; i++) memcpy(rows + (size_t)i * H, xh + (size_t)tok[i] * H, sizeof(float) * H);
        be->upload(xb, rows, sizeof(float) * (size_t)n * H);
        rc = moe_layer_expert(c->m, l, e, yb, xb, n);
        if (rc == 0) be->download(rows, yb, sizeof(float) * (size_t)n * H);
        for (int i = 0; i < n && rc == 0; i++) {
            double ss = 0;
            for (int h = 0; h < H; h++) ss += (double)rows[(size_t)i * H + h] * rows[(size_t)i * H + h];
            cl->reap[e] += (double)g[i] * sqrt(ss);
        }
    }
    moe_model_free(c->m, xb);
    moe_model_free(c->m, yb);
    free(xh);
    free(rows);
    free(tok);
    free(g);
    return rc;
}

/* One batch of sequences through every layer, the router observed (and the
 * experts' outputs, for REAP); nothing else is computed. */
static int calib_batch(moe_model *m, moe_seq *seqs, int n, calib_ctx *x) {
    moe_batch b;
    moe_batch_of_seqs(&b, seqs, n);
    float *X = moe_model_alloc(m, b.tot * (size_t)moe_model_config(m)->hidden_size);
    moe_residency r;
    moe_residency_init(&r, m, 0);
    moe_run_hooks h = {.ctx = x, .mlp_out = x->m ? reap_hook : NULL, .router = calib_cb, .router_ctx = x};
    int rc = moe_batch_embed(m, &b, X);
    if (rc == 0) rc = moe_run_layers(m, &b, 0, moe_model_config(m)->num_layers, X, NULL, NULL, &r, &h);
    if (rc == 0) rc = moe_backend_status(moe_model_backend(m));
    moe_residency_free(&r);
    moe_model_free(m, X);
    moe_batch_free(&b);
    return rc;
}

int moe_calib_run(moe_model *m, const moe_seqs *s, int max_length, size_t batch_tokens,
                  moe_calib *out, moe_search_work *work) {
    return moe_calib_run_reap(m, s, max_length, batch_tokens, 0, out, work);
}

int moe_calib_run_reap(moe_model *m, const moe_seqs *s, int max_length, size_t batch_tokens, int reap,
                       moe_calib *out, moe_search_work *work) {
    const moe_config *cfg = moe_model_config(m);
    double t0 = moe_now();
    memset(out, 0, sizeof *out);
    if (s->n == 0) {
        moe_error_set(MOE_ERR_DATA, "no token sequences in the input (a 'tokens' stream is needed)");
        return -1;
    }
    moe_calib_init(out, cfg->num_layers, cfg->n_routed_experts, cfg->top_k);
    moe_progress progress;
    calib_ctx x = {out, moe_calloc((size_t)cfg->num_layers, sizeof(double)), &progress, reap ? m : NULL,
                   NULL, NULL, 0, 0};
    moe_seq *seqs = moe_calloc((size_t)s->n, sizeof *seqs);
    uint64_t tot = 0;
    for (int i = 0; i < s->n; i++) {
        seqs[i].ids = s->ids[i];
        seqs[i].T = max_length > 0 && s->len[i] > max_length ? max_length : s->len[i];
        tot += (uint64_t)seqs[i].T;
    }
    int rc = 0, nbatch = 0, nmoe = 0;
    for (int l = 0; l < cfg->num_layers; l++) nmoe += cfg->layers[l].kind == MOE_MLP_MOE;
    for (int i = 0; i < s->n; nbatch++) { /* count batches, for the progress total */
        size_t nt = 0;
        int j = i;
        while (j < s->n && (j == i || batch_tokens == 0 || nt + (size_t)seqs[j].T <= batch_tokens))
            nt += (size_t)seqs[j++].T;
        i = j;
    }
    moe_progress_start(&progress, "moe-calib", "MoE layers", (uint64_t)nmoe * (uint64_t)nbatch);
    for (int i = 0; i < s->n && rc == 0;) {
        int j = i;
        size_t nt = 0;
        while (j < s->n && (j == i || batch_tokens == 0 || nt + (size_t)seqs[j].T <= batch_tokens))
            nt += (size_t)seqs[j++].T;
        rc = calib_batch(m, seqs + i, j - i, &x);
        i = j;
    }
    moe_progress_end(&progress);
    free(seqs);
    if (rc == 0) {
        for (int l = 0; l < out->L; l++) {
            moe_calib_layer *cl = &out->layers[l];
            if (!cl->present) continue;
            for (int e = 0; e < out->E; e++) {
                cl->mean[e] = cl->count[e] ? cl->sum[e] / (double)cl->count[e] : NAN;
                cl->load[e] = (double)cl->count[e] / ((double)cl->tokens * out->K);
                if (cl->reap) cl->reap[e] = cl->count[e] ? cl->reap[e] / (double)cl->count[e] : NAN;
            }
            cl->entropy = cl->tokens ? x.ent[l] / (double)cl->tokens : 0.0;
        }
    }
    free(x.ent);
    free(x.idx);
    free(x.wt);
    if (work) {
        work->layer_tokens += tot * (uint64_t)cfg->num_layers;
        work->seconds += moe_now() - t0;
    }
    if (rc < 0) moe_calib_free(out);
    return rc;
}

/* ---- work and option helpers ----------------------------------------------------------- */

void moe_search_work_str(const moe_search_work *w, char *buf, size_t n) {
    snprintf(buf, n,
             "%llu candidates, %llu layer-token evaluations, %llu expert-token evaluations, "
             "%llu token divergences, %.3g GFLOP, %.2f s",
             (unsigned long long)w->candidates, (unsigned long long)w->layer_tokens,
             (unsigned long long)w->expert_tokens, (unsigned long long)w->div_tokens,
             w->flops / 1e9, w->seconds);
    size_t len = strlen(buf);
    if (w->device_peak && len < n)
        snprintf(buf + len, n - len, ", device peak %.2f GiB", w->device_peak / 1073741824.0);
}

int moe_parse_layer_list(const char *s, int **out, int *n) {
    int cap = 16, k = 0;
    int *v = moe_malloc(sizeof(int) * (size_t)cap);
    const char *p = s;
    while (*p) {
        char *end;
        long a = strtol(p, &end, 10), b;
        if (end == p || a < 0 || a > 1000000) goto bad;
        p = end;
        b = a;
        if (*p == '-') {
            p++;
            b = strtol(p, &end, 10);
            if (end == p || b < a || b > 1000000) goto bad;
            p = end;
        }
        for (long i = a; i <= b; i++) {
            if (k == cap) v = moe_realloc(v, sizeof(int) * (size_t)(cap *= 2));
            v[k++] = (int)i;
        }
        if (*p == ',') {
            p++;
            if (!*p) goto bad;
        } else if (*p) {
            goto bad;
        }
    }
    if (k == 0) goto bad;
    *out = v;
    *n = k;
    return 0;
bad:
    free(v);
    return -1;
}

int moe_parse_weight(const char *s, moe_weight_override *w) {
    char *end;
    long l = strtol(s, &end, 10);
    if (end == s || *end != ':' || l < 0 || l > 1000000) return -1;
    const char *p = end + 1;
    long e = strtol(p, &end, 10);
    if (end == p || *end != '=' || e < 0 || e > 1000000) return -1;
    p = end + 1;
    double v = strtod(p, &end);
    if (end == p || *end || !isfinite(v)) return -1;
    w->layer = (int)l;
    w->expert = (int)e;
    w->weight = (float)v;
    return 0;
}
