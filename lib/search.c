/* search.c - CD-MoE step 2: greedy expert ranking per MoE layer and greedy
 * layer search, each fast (layer-major, cached) and naive (the original
 * algorithm literally: a full model forward per candidate).  See search.h. */
#include "search.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common.h"

/* ---- sequences, truncated and concatenated ------------------------------------
 * A search's token sequences are a moe_batch (model.h): truncated to
 * max_length, concatenated, seq[] the sequence of each token. */

static void batch_of(moe_batch *ss, const moe_seqs *s, int max_length) {
    moe_batch_init(ss, s->n, (const int32_t *const *)s->ids, s->len, max_length);
}

/* Per-sequence sums of per-token divergences -> the original's score:
 * mean over the tokens of a sequence, then mean over sequences. */
static double score_of(const moe_batch *ss, const double *acc) {
    double s = 0.0;
    for (int i = 0; i < ss->n; i++) s += acc[i] / (double)ss->T[i];
    return s / ss->n;
}

/* acc[owner] += d over tokens [t0, t0+nt) */
static void accumulate(const moe_batch *ss, double *acc, const double *d, size_t t0, size_t nt) {
    for (size_t t = 0; t < nt; t++) acc[ss->seq[t0 + t]] += d[t];
}

/* ---- work accounting ------------------------------------------------------------- */

static double expert_flops(const moe_config *c) {
    return 2.0 * 3.0 * c->hidden_size * (double)c->moe_intermediate_size;
}

static double layer_flops(const moe_config *c, int l) {
    double H = c->hidden_size, qd = (double)c->num_heads * c->head_dim,
           kvd = (double)c->num_kv_heads * c->head_dim;
    double f = 2.0 * H * (2.0 * qd + 2.0 * kvd);
    if (c->layers[l].kind == MOE_MLP_DENSE)
        f += 2.0 * 3.0 * H * moe_config_dense_width(c, l);
    else
        f += c->top_k * expert_flops(c) + 2.0 * 3.0 * H * c->shared_intermediate_size +
             2.0 * H * c->n_routed_experts;
    return f;
}

static void count_layers(moe_search_work *w, const moe_config *c, int from, size_t tokens) {
    if (!w) return;
    for (int l = from; l < c->num_layers; l++) {
        w->layer_tokens += tokens;
        w->flops += layer_flops(c, l) * (double)tokens;
    }
}

static int is_moe(const moe_config *c, int l) { return c->layers[l].kind == MOE_MLP_MOE; }

/* ---- layer residency ------------------------------------------------------------ */

/* Free device memory, or 0 on host backends and when the backend cannot tell. */
static size_t device_free(moe_model *m) {
    const moe_backend *be = moe_model_backend(m);
    size_t fr = 0, tot = 0;
    if (!be->host_memory && be->mem_info) be->mem_info(&fr, &tot);
    return fr;
}

/* The search's view of the layers: which kind each MoE layer has (the model
 * unloads a layer whose kind changes) and their residency (model.h: the
 * whole model stays loaded between passes when moe_model_fits(); else each
 * layer is unloaded after use; o->stream_weights forces streaming, for tests
 * and benchmarks). */
typedef struct {
    moe_model *m;
    const moe_config *c;
    moe_residency r;
    int *const *ex;    /* condensed form of each MoE layer (layer search) */
    float *const *ws;
    const int *kk;
    moe_drop_kind drop; /* baselines: a chosen layer is dropped so, not condensed */
} layers_t;

static void lt_init(layers_t *lt, moe_model *m, const moe_search_opts *o) {
    memset(lt, 0, sizeof *lt);
    lt->m = m;
    lt->c = moe_model_config(m);
    /* a known state: nothing loaded (a no-op for a freshly opened model) */
    for (int l = 0; l < lt->c->num_layers; l++) moe_layer_unload(m, l);
    moe_residency_init(&lt->r, m, !(o && o->stream_weights) && moe_model_fits(m));
}

/* 1 when layer l has its chosen form: condensed, or dropped (baselines) */
static int lt_is_condensed(const layers_t *lt, int l) {
    if (lt->drop) return moe_model_layer_drop(lt->m, l) == lt->drop;
    return moe_model_layer_kind(lt->m, l) == MOE_MLP_CONDENSED;
}

/* Give MoE layer l its chosen form (condensed = 1: condensed, or dropped for
 * the baselines) or its checkpoint kind. */
static int lt_kind(layers_t *lt, int l, int condensed) {
    if (!is_moe(lt->c, l) || condensed == lt_is_condensed(lt, l)) return 0;
    if (condensed && lt->drop) return moe_model_drop_layer(lt->m, l, lt->drop);
    if (condensed) return moe_model_condense_layer(lt->m, l, lt->kk[l], lt->ex[l], lt->ws[l]);
    moe_model_restore_layer(lt->m, l);
    return 0;
}

/* the work record's layer loads; the residency ends */
static void lt_free(layers_t *lt, moe_search_work *work) {
    if (work) work->layer_loads += lt->r.loads;
    moe_residency_free(&lt->r);
}

/* each layer's input into cache[l] (run_layers) */
typedef struct {
    const moe_backend *be;
    float **cache;
    size_t TH;
} cache_ctx;

static int cache_input(void *ctx, int l, float *x) {
    cache_ctx *cc = ctx;
    cc->be->copy(cc->cache[l], x, cc->TH * sizeof(float));
    return 0;
}

/* Run decoder layers [from, L), each with its current kind, on the
 * concatenated tokens X (in place); when cache is not NULL, cache[l] receives
 * the input of layer l for l >= from (cache[L] the final-normed output).
 * Ends with the final norm applied to X. */
static int run_layers(layers_t *lt, const moe_batch *ss, int from, float *X, float **cache,
                      float *xn, float *y) {
    moe_model *m = lt->m;
    const moe_config *c = lt->c;
    size_t TH = ss->tot * (size_t)c->hidden_size;
    cache_ctx cc = {moe_model_backend(m), cache, TH};
    moe_run_hooks h = {.ctx = &cc, .before = cache ? cache_input : NULL};
    if (moe_run_layers(m, ss, from, c->num_layers, X, xn, y, &lt->r, &h) < 0) return -1;
    if (moe_model_final_norm(m, X, X, (int)ss->tot) < 0) return -1;
    if (cache) cc.be->copy(cache[c->num_layers], X, TH * sizeof(float));
    return 0;
}

/* Divergence of candidate vs target over all tokens, per-sequence sums into acc. */
static void diverge(const moe_backend *be, const moe_batch *ss, int metric, const float *tgt,
                    const float *cand, size_t t0, size_t nt, int H, double *d, double *acc) {
    be->divergence(d, tgt, cand, metric, (int)nt, H);
    accumulate(ss, acc, d, t0, nt);
}

/* ---- calibration weights ---------------------------------------------------------------- */

static int layer_weights(const moe_calib *calib, const moe_search_opts *o, int l, int E, float *w,
                         int *routed) {
    if (!calib || !calib->layers || l >= calib->L || !calib->layers[l].present) {
        moe_error_set(MOE_ERR_DATA,
                      "no routing statistics for layer %d in the input (run moe-calib first)", l);
        return -1;
    }
    const moe_calib_layer *cl = &calib->layers[l];
    for (int e = 0; e < E; e++) {
        routed[e] = cl->count[e] > 0 && isfinite(cl->mean[e]);
        w[e] = routed[e] ? (float)cl->mean[e] : 0.0f;
    }
    for (int i = 0; o && i < o->n_weights; i++) {
        const moe_weight_override *ov = &o->weights[i];
        if (ov->layer != l) continue;
        if (ov->expert < 0 || ov->expert >= E) {
            moe_error_set(MOE_ERR_DATA, "weight for layer %d expert %d: the model has %d experts", l,
                          ov->expert, E);
            return -1;
        }
        routed[ov->expert] = 1;
        w[ov->expert] = ov->weight;
    }
    return 0;
}

/* The plan records the weights each layer of the order was condensed with
 * (ws[l]: k weights per MoE layer), so that moe-condense writes what was scored. */
static void plan_weights(moe_plan *p, float *const *ws) {
    p->present = 1;
    p->weights = moe_malloc(sizeof(float) * ((size_t)p->n * (size_t)p->k + 1));
    for (int i = 0; i < p->n; i++)
        memcpy(p->weights + (size_t)i * p->k, ws[p->order[i]], sizeof(float) * (size_t)p->k);
}

static void rank_layer_alloc(moe_rank_layer *rl, int K, int E, const int *routed) {
    rl->present = 1;
    rl->n = 0;
    rl->experts = moe_malloc(sizeof(int) * (size_t)(K + 1));
    rl->scores = moe_malloc(sizeof(double) * (size_t)(K + 1));
    rl->cand = moe_malloc(sizeof(double) * (size_t)(K + 1) * E);
    for (size_t i = 0; i < (size_t)(K + 1) * E; i++) rl->cand[i] = NAN;
    rl->unrouted = moe_malloc(sizeof(int) * (size_t)(E + 1));
    rl->n_unrouted = 0;
    for (int e = 0; e < E; e++)
        if (!routed[e]) rl->unrouted[rl->n_unrouted++] = e;
}

/* Lowest score wins, strictly (ties: lowest id); NaN never wins. */
static int argmin(const double *sc, const int *ok, int E) {
    int best = -1;
    double b = INFINITY;
    for (int e = 0; e < E; e++)
        if (ok[e] && sc[e] < b) {
            b = sc[e];
            best = e;
        }
    if (best < 0)
        for (int e = 0; e < E; e++)
            if (ok[e] && isinf(sc[e]) && sc[e] > 0) return e;
    return best;
}

/* ---- expert ranking: fast ------------------------------------------------------------------- */

typedef struct {
    moe_model *m;
    const moe_config *c;
    const moe_backend *be;
    const moe_batch *ss;
    const moe_search_opts *o;
    moe_search_work *work;
    float *xn, *tgt, *base, *p, *cb, *eo; /* [tot, H] each (eo: chunk scratch) */
    float **cache;                          /* [E] expert outputs, all tokens, or NULL */
    double *d;                              /* [tot] */
    /* the pass (rank_at_layer) */
    const moe_calib *calib;
    const int *sel;
    float *w;
    int *routed;
    moe_ranking *out;
    moe_progress progress;
} rank_ctx;

static int rank_layer_fast(rank_ctx *x, int l, const float *w, const int *routed,
                           moe_rank_layer *rl) {
    const moe_config *c = x->c;
    const moe_backend *be = x->be;
    int E = c->n_routed_experts, H = c->hidden_size, K = x->o->max_experts;
    int last = l == c->num_layers - 1;
    size_t tot = x->ss->tot, TH = tot * (size_t)H;
    int ncand = 0;
    for (int e = 0; e < E; e++) ncand += routed[e];
    rank_layer_alloc(rl, K, E, routed);

    /* cache the candidates' outputs for all tokens, as many as fit (in
     * expert order); the others are recomputed per token chunk at every pick
     * (and, when the model does not keep the layer's experts converted,
     * converted again each time: a big budget saves both) */
    size_t budget = x->o->mem_bytes ? x->o->mem_bytes : ((size_t)1 << 30);
    size_t per_exp = TH * sizeof(float);
    size_t nfit = per_exp ? budget / per_exp : (size_t)E;
    int ncached = 0;
    float **cache = moe_calloc((size_t)E, sizeof(float *));
    for (int e = 0; e < E; e++) {
        if (!routed[e] || (size_t)ncached >= nfit) continue;
        cache[e] = moe_model_alloc(x->m, TH);
        ncached++;
        if (moe_layer_expert(x->m, l, e, cache[e], x->xn, (int)tot) < 0) goto fail;
        if (x->work) {
            x->work->expert_tokens += tot;
            x->work->flops += expert_flops(c) * (double)tot;
        }
    }
    size_t chunk = ncached == ncand ? tot : budget / ((size_t)H * sizeof(float) * 2);
    if (chunk < 1) chunk = 1;
    if (chunk > tot) chunk = tot;
    be->copy(x->p, x->base, TH * sizeof(float));
    int *ok = moe_malloc(sizeof(int) * (size_t)E);
    double *sc = moe_malloc(sizeof(double) * (size_t)E);
    double *acc = moe_malloc(sizeof(double) * (size_t)E * x->ss->n);
    memcpy(ok, routed, sizeof(int) * (size_t)E);
    int rc = 0;
    for (int pick = 0; pick < K && rc == 0; pick++) {
        int any = 0;
        for (int e = 0; e < E; e++) any |= ok[e];
        if (!any) break;
        memset(acc, 0, sizeof(double) * (size_t)E * x->ss->n);
        for (size_t t0 = 0; t0 < tot && rc == 0; t0 += chunk) {
            size_t nt = tot - t0 < chunk ? tot - t0 : chunk;
            size_t off = t0 * (size_t)H;
            for (int e = 0; e < E && rc == 0; e++) {
                if (!ok[e]) continue;
                const float *eo = cache[e] ? cache[e] + off : x->eo;
                if (!cache[e]) {
                    rc = moe_layer_expert(x->m, l, e, x->eo, x->xn + off, (int)nt);
                    if (rc < 0) break;
                    if (x->work) {
                        x->work->expert_tokens += nt;
                        x->work->flops += expert_flops(c) * (double)nt;
                    }
                }
                be->copy(x->cb, x->p + off, nt * H * sizeof(float));
                be->axpy(x->cb, eo, w[e], nt * H);
                if (last) moe_model_final_norm(x->m, x->cb, x->cb, (int)nt);
                diverge(be, x->ss, x->o->metric, x->tgt + off, x->cb, t0, nt, H, x->d,
                        acc + (size_t)e * x->ss->n);
                if (x->work) x->work->div_tokens += nt;
            }
        }
        if (rc < 0) break;
        for (int e = 0; e < E; e++) {
            sc[e] = ok[e] ? score_of(x->ss, acc + (size_t)e * x->ss->n) : NAN;
            rl->cand[(size_t)pick * E + e] = sc[e];
            if (ok[e] && x->work) x->work->candidates++;
        }
        int best = argmin(sc, ok, E);
        if (best < 0) break;
        rl->experts[rl->n] = best;
        rl->scores[rl->n] = sc[best];
        rl->n++;
        ok[best] = 0;
        /* P += w_best * Expert_best */
        for (size_t t0 = 0; t0 < tot && rc == 0; t0 += chunk) {
            size_t nt = tot - t0 < chunk ? tot - t0 : chunk;
            size_t off = t0 * (size_t)H;
            const float *eo = cache[best] ? cache[best] + off : x->eo;
            if (!cache[best]) rc = moe_layer_expert(x->m, l, best, x->eo, x->xn + off, (int)nt);
            if (rc == 0) be->axpy(x->p + off, eo, w[best], nt * H);
        }
    }
    free(ok);
    free(sc);
    free(acc);
    for (int e = 0; e < E; e++) moe_model_free(x->m, cache[e]);
    free(cache);
    return rc;
fail:
    for (int e = 0; e < E; e++) moe_model_free(x->m, cache[e]);
    free(cache);
    return -1;
}

/* The ranking's part of the pass at layer l, after its MLP (x: the layer's
 * input, xn: the MLP's input, y: its output): a selected layer's target
 * (its original output), base (residual + shared part) and ranking. */
static int rank_at_layer(void *ctx, int l, const float *X, const float *xn, const float *y) {
    rank_ctx *x = ctx;
    const moe_config *c = x->c;
    const moe_backend *be = x->be;
    size_t tot = x->ss->tot, TH = tot * (size_t)c->hidden_size;
    int rc = 0;
    (void)xn; /* x->xn */
    if (x->work) {
        x->work->layer_tokens += tot;
        x->work->flops += layer_flops(c, l) * (double)tot;
    }
    if (x->sel[l]) {
        be->copy(x->tgt, X, TH * sizeof(float));
        be->axpy(x->tgt, y, 1.0f, TH);
        if (l == c->num_layers - 1) moe_model_final_norm(x->m, x->tgt, x->tgt, (int)tot);
        rc = moe_layer_shared(x->m, l, x->base, x->xn, (int)tot);
        if (rc == 0) be->axpy(x->base, X, 1.0f, TH);
        if (rc == 0) rc = layer_weights(x->calib, x->o, l, c->n_routed_experts, x->w, x->routed);
        if (rc == 0) rc = rank_layer_fast(x, l, x->w, x->routed, &x->out->layers[l]);
    }
    moe_progress_add(&x->progress, 1);
    return rc;
}

static int rank_fast(moe_model *m, const moe_batch *ss, const moe_calib *calib,
                     const moe_search_opts *o, const int *sel, moe_ranking *out,
                     moe_search_work *work) {
    const moe_config *c = moe_model_config(m);
    const moe_backend *be = moe_model_backend(m);
    int L = c->num_layers, H = c->hidden_size, E = c->n_routed_experts;
    size_t TH = ss->tot * (size_t)H;
    int last_sel = -1;
    for (int l = 0; l < L; l++)
        if (sel[l]) last_sel = l;
    float *X = moe_model_alloc(m, TH), *y = moe_model_alloc(m, TH);
    rank_ctx x = {.m = m, .c = c, .be = be, .ss = ss, .o = o, .work = work};
    x.xn = moe_model_alloc(m, TH);
    x.tgt = moe_model_alloc(m, TH);
    x.base = moe_model_alloc(m, TH);
    x.p = moe_model_alloc(m, TH);
    x.cb = moe_model_alloc(m, TH);
    x.eo = moe_model_alloc(m, TH);
    x.d = moe_malloc(sizeof(double) * (ss->tot + 1));
    float *w = moe_malloc(sizeof(float) * (size_t)E);
    int *routed = moe_malloc(sizeof(int) * (size_t)E);
    layers_t lt;
    lt_init(&lt, m, o);
    int rc = moe_batch_embed(m, ss, X);
    x.calib = calib;
    x.sel = sel;
    x.w = w;
    x.routed = routed;
    x.out = out;
    moe_progress_start(&x.progress, "moe-expert-rank", "layers", (uint64_t)last_sel + 1);
    /* one pass, each layer loaded once (its experts: see rank_layer_fast) */
    moe_run_hooks h = {.ctx = &x, .mlp_out = rank_at_layer};
    if (rc == 0) rc = moe_run_layers(m, ss, 0, last_sel + 1, X, x.xn, y, &lt.r, &h);
    moe_progress_end(&x.progress);
    lt_free(&lt, work);
    moe_model_free(m, X);
    moe_model_free(m, y);
    moe_model_free(m, x.xn);
    moe_model_free(m, x.tgt);
    moe_model_free(m, x.base);
    moe_model_free(m, x.p);
    moe_model_free(m, x.cb);
    moe_model_free(m, x.eo);
    free(x.d);
    free(w);
    free(routed);
    return rc;
}

/* ---- naive: the original literally ------------------------------------------------------------ */

typedef struct {
    moe_seq *seq;   /* copies of ss->seq with hidden buffers [L+1, T, H] */
    float *hid;
} fullrun;

static void fullrun_init(fullrun *f, const moe_batch *ss, int L, int H) {
    f->seq = moe_calloc((size_t)ss->n + 1, sizeof *f->seq);
    f->hid = moe_malloc(sizeof(float) * (size_t)(L + 1) * ss->tot * H + 1);
    size_t o = 0;
    for (int s = 0; s < ss->n; s++) {
        f->seq[s].ids = ss->ids[s];
        f->seq[s].T = ss->T[s];
        f->seq[s].hidden = f->hid + o;
        o += (size_t)(L + 1) * ss->T[s] * H;
    }
}

static void fullrun_free(fullrun *f) {
    free(f->seq);
    free(f->hid);
}

/* hidden_states[i] of sequence s */
static float *hid_of(const fullrun *f, int s, int i, int H) {
    return f->seq[s].hidden + (size_t)i * f->seq[s].T * H;
}

/* Score hidden_states[i] of run b against run a (host memory). */
static double score_runs(const moe_backend *be, const moe_batch *ss, const fullrun *a,
                         const fullrun *b, int i, int H, int metric, moe_search_work *work) {
    double *acc = moe_calloc((size_t)ss->n, sizeof(double));
    double *d = moe_malloc(sizeof(double) * (ss->tot + 1));
    for (int s = 0; s < ss->n; s++) {
        int T = ss->T[s];
        be->divergence(d, hid_of(a, s, i, H), hid_of(b, s, i, H), metric, T, H);
        for (int t = 0; t < T; t++) acc[s] += d[t];
        if (work) work->div_tokens += (uint64_t)T;
    }
    double r = score_of(ss, acc);
    free(acc);
    free(d);
    return r;
}

static int forward_full(moe_model *m, const moe_batch *ss, fullrun *f, moe_search_work *work) {
    count_layers(work, moe_model_config(m), 0, ss->tot);
    return moe_model_forward(m, f->seq, ss->n, 0, NULL, NULL);
}

static int rank_naive(moe_model *m, const moe_batch *ss, const moe_calib *calib,
                      const moe_search_opts *o, const int *sel, moe_ranking *out,
                      moe_search_work *work) {
    const moe_config *c = moe_model_config(m);
    const moe_backend *be = moe_model_backend(m);
    int L = c->num_layers, H = c->hidden_size, E = c->n_routed_experts, K = o->max_experts;
    fullrun orig, cand;
    fullrun_init(&orig, ss, L, H);
    fullrun_init(&cand, ss, L, H);
    float *w = moe_malloc(sizeof(float) * (size_t)E), *ws = moe_malloc(sizeof(float) * (size_t)(K + 1));
    int *routed = moe_malloc(sizeof(int) * (size_t)E), *ex = moe_malloc(sizeof(int) * (size_t)(K + 1));
    double *sc = moe_malloc(sizeof(double) * (size_t)E);
    int rc = forward_full(m, ss, &orig, work);
    for (int l = 0; l < L && rc == 0; l++) {
        if (!sel[l]) continue;
        if ((rc = layer_weights(calib, o, l, E, w, routed)) < 0) break;
        moe_rank_layer *rl = &out->layers[l];
        rank_layer_alloc(rl, K, E, routed);
        int *ok = moe_malloc(sizeof(int) * (size_t)E);
        memcpy(ok, routed, sizeof(int) * (size_t)E);
        for (int pick = 0; pick < K && rc == 0; pick++) {
            int any = 0;
            for (int e = 0; e < E; e++) {
                sc[e] = NAN;
                any |= ok[e];
            }
            if (!any) break;
            for (int e = 0; e < E && rc == 0; e++) {
                if (!ok[e]) continue;
                for (int i = 0; i < rl->n; i++) {
                    ex[i] = rl->experts[i];
                    ws[i] = w[rl->experts[i]];
                }
                ex[rl->n] = e;
                ws[rl->n] = w[e];
                rc = moe_model_condense_layer(m, l, rl->n + 1, ex, ws);
                if (rc == 0) rc = forward_full(m, ss, &cand, work);
                moe_model_restore_layer(m, l);
                if (rc == 0) sc[e] = score_runs(be, ss, &orig, &cand, l + 1, H, o->metric, work);
                if (work) work->candidates++;
            }
            if (rc < 0) break;
            for (int e = 0; e < E; e++) rl->cand[(size_t)pick * E + e] = sc[e];
            int best = argmin(sc, ok, E);
            if (best < 0) break;
            rl->experts[rl->n] = best;
            rl->scores[rl->n] = sc[best];
            rl->n++;
            ok[best] = 0;
        }
        free(ok);
    }
    fullrun_free(&orig);
    fullrun_free(&cand);
    free(w);
    free(ws);
    free(routed);
    free(ex);
    free(sc);
    return rc;
}

int moe_rank_run(moe_model *m, const moe_seqs *s, const moe_calib *calib,
                 const moe_search_opts *o, moe_ranking *out, moe_search_work *work) {
    const moe_config *c = moe_model_config(m);
    int L = c->num_layers, E = c->n_routed_experts;
    double t0 = moe_now();
    memset(out, 0, sizeof *out);
    if (s->n == 0) {
        moe_error_set(MOE_ERR_DATA, "no token sequences in the input (a 'tokens' stream is needed)");
        return -1;
    }
    if (o->max_experts < 1 || o->max_experts > E) {
        moe_error_set(MOE_ERR_DATA, "--max-experts %d: the model has %d routed experts per layer",
                      o->max_experts, E);
        return -1;
    }
    int *sel = moe_calloc((size_t)L, sizeof(int));
    if (o->layers) {
        for (int i = 0; i < o->n_layers; i++) {
            int l = o->layers[i];
            if (l < 0 || l >= L || !is_moe(c, l)) {
                moe_error_set(MOE_ERR_DATA, "--layers: layer %d is not a routed MoE layer of the model",
                              l);
                free(sel);
                return -1;
            }
            sel[l] = 1;
        }
    } else {
        for (int l = 0; l < L; l++) sel[l] = is_moe(c, l);
    }
    for (int l = 0; l < L; l++)
        if (sel[l] && (!calib->layers || !calib->layers[l].present)) {
            moe_error_set(MOE_ERR_DATA,
                          "no routing statistics for layer %d in the input (run moe-calib first)", l);
            free(sel);
            return -1;
        }
    out->L = L;
    out->E = E;
    out->metric = o->metric;
    out->max_length = o->max_length;
    out->layers = moe_calloc((size_t)L, sizeof *out->layers);
    moe_batch ss;
    batch_of(&ss, s, o->max_length);
    int rc = o->naive ? rank_naive(m, &ss, calib, o, sel, out, work)
                      : rank_fast(m, &ss, calib, o, sel, out, work);
    moe_batch_free(&ss);
    free(sel);
    if (rc == 0) rc = moe_backend_status(moe_model_backend(m)); /* scores came from the device */
    if (work) work->seconds += moe_now() - t0;
    if (rc < 0) moe_ranking_free(out);
    return rc;
}

/* ---- layer search ---------------------------------------------------------------------------- */

typedef struct {
    int n;
    int *set;       /* decoder layers condensed, in pick order */
    float **cache;  /* fast: [L+1] inputs of every layer (cache[L]: final output) */
    int pending;    /* layer-major: cache[l] for l > pending still to compute by the
                       next pass (the beam's base stream starts there); -1: complete */
} beam_t;

typedef struct {
    int beam, cand;
    double score;
    size_t seq;     /* position in the scoring order, for a stable sort */
} trial_t;

static int trial_cmp(const void *a, const void *b) {
    const trial_t *x = a, *y = b;
    int xn = isnan(x->score), yn = isnan(y->score);
    if (xn != yn) return xn - yn;   /* NaN last */
    if (!xn && x->score != y->score) return x->score < y->score ? -1 : 1;
    return x->seq < y->seq ? -1 : x->seq > y->seq;
}

static int in_set(const beam_t *b, int l) {
    for (int j = 0; j < b->n; j++)
        if (b->set[j] == l) return 1;
    return 0;
}

/* Condense exactly the layers of `set` (+ extra if >= 0); restore all others. */
static int apply_set(layers_t *lt, const beam_t *b, int extra) {
    for (int l = 0; l < lt->c->num_layers; l++)
        if (lt_kind(lt, l, l == extra || in_set(b, l)) < 0) return -1;
    return 0;
}

static void restore_all(layers_t *lt) {
    for (int l = 0; l < lt->c->num_layers; l++) lt_kind(lt, l, 0);
}

/* A stream of the layer-major pass: a candidate (beam b + layer cand), from
 * layer cand on the cached input of the beam's model, or a beam's base
 * stream (cand -1), which fills the beam's cache from layer start on. */
typedef struct {
    int beam, start, cand;
    float *X;       /* candidate: its activations [tot, H]; base: NULL (runs in the cache) */
    size_t trial;   /* candidate: index in trials */
} lstream;

/* kind of layer l for stream st: 1 = condensed */
static int stream_kind(const layers_t *lt, const beam_t *beams, const lstream *st, int l) {
    return is_moe(lt->c, l) && (l == st->cand || in_set(&beams[st->beam], l));
}

/* One layer-major pass over layers [min start, L): each layer loaded once
 * per kind that an active stream needs there (checkpoint kind, condensed),
 * every stream of that kind run through it while it is loaded.  Each stream
 * makes exactly the calls run_layers makes for it, in the same buffers'
 * layout, so its values are those of the candidate-major loop bit for bit.
 * Base streams first at the end: at step 0 the original model's output
 * (tgt_out) is what the candidates are scored against. */
static int layer_pass(layers_t *lt, const moe_batch *ss, beam_t *beams, lstream *S, int n,
                      float *tgt, int tgt_out, int metric, trial_t *trials, float *xn, float *y,
                      double *acc, double *d) {
    moe_model *m = lt->m;
    const moe_config *c = lt->c;
    const moe_backend *be = moe_model_backend(m);
    int L = c->num_layers, H = c->hidden_size;
    size_t TH = ss->tot * (size_t)H;
    int from = L;
    for (int i = 0; i < n; i++)
        if (S[i].start < from) from = S[i].start;
    for (int l = from; l < L; l++) {
        for (int i = 0; i < n; i++) {
            beam_t *b = &beams[S[i].beam];
            if (S[i].start > l) continue;
            if (S[i].cand < 0)
                be->copy(b->cache[l + 1], b->cache[l], TH * sizeof(float));
            else if (S[i].start == l)
                be->copy(S[i].X, b->cache[l], TH * sizeof(float));
        }
        /* the kind already loaded first; otherwise condensed first, so that
         * the checkpoint kind (most streams' next pass) stays when not streaming */
        int first = is_moe(c, l) && moe_layer_loaded(m, l) ? lt_is_condensed(lt, l) : 1;
        for (int g = 0; g < 2; g++) {
            int kind = g == 0 ? first : !first, any = 0;
            for (int i = 0; i < n && !any; i++)
                any = S[i].start <= l && stream_kind(lt, beams, &S[i], l) == kind;
            if (!any) continue;
            if (lt_kind(lt, l, kind) < 0 || moe_residency_use(&lt->r, l) < 0) return -1;
            for (int i = 0; i < n; i++) {
                if (S[i].start > l || stream_kind(lt, beams, &S[i], l) != kind) continue;
                float *X = S[i].cand < 0 ? beams[S[i].beam].cache[l + 1] : S[i].X;
                if (moe_run_layer(m, ss, l, X, xn, y, NULL) < 0) return -1;
            }
        }
        moe_residency_done(&lt->r, l);
    }
    for (int i = 0; i < n; i++) {
        if (S[i].cand >= 0) continue;
        beam_t *b = &beams[S[i].beam];
        if (moe_model_final_norm(m, b->cache[L], b->cache[L], (int)ss->tot) < 0) return -1;
        if (tgt_out) be->copy(tgt, b->cache[L], TH * sizeof(float));
        b->pending = -1;
    }
    for (int i = 0; i < n; i++) {
        if (S[i].cand < 0) continue;
        if (moe_model_final_norm(m, S[i].X, S[i].X, (int)ss->tot) < 0) return -1;
        memset(acc, 0, sizeof(double) * (size_t)ss->n);
        diverge(be, ss, metric, tgt, S[i].X, 0, ss->tot, H, d, acc);
        trials[S[i].trial].score = score_of(ss, acc);
    }
    return 0;
}

static int lstream_cmp(const void *a, const void *b) {
    const lstream *x = a, *y = b;
    if (x->start != y->start) return x->start < y->start ? -1 : 1;
    return x->trial < y->trial ? -1 : x->trial > y->trial;
}

/* Budget for the candidates' activation buffers of the layer-major search. */
static size_t search_budget(moe_model *m, const moe_search_opts *o) {
    if (o->mem_bytes) return o->mem_bytes;
    /* device: a quarter of its free memory (at least 256 MiB), or 4 GiB when
     * the backend cannot tell */
    if (!moe_model_backend(m)->host_memory) {
        size_t fr = device_free(m);
        if (!fr) return (size_t)4 << 30;
        return fr / 4 > ((size_t)256 << 20) ? fr / 4 : (size_t)256 << 20;
    }
    long pages = sysconf(_SC_PHYS_PAGES), psz = sysconf(_SC_PAGESIZE);
    size_t phys = pages > 0 && psz > 0 ? (size_t)pages * (size_t)psz : (size_t)8 << 30;
    size_t b = phys / 4;
    if (b < ((size_t)256 << 20)) b = (size_t)256 << 20;
    return b;
}

/* Score the candidates trials[0..nt) of one greedy step layer-major: beams'
 * pending base streams and the candidates, sorted by start layer, in batches
 * whose buffers fit the budget; one pass over the layers per batch (the
 * base streams in the first).  Loads per pass: for each layer from the
 * batch's first start, one per kind needed there. */
static int layer_major_step(layers_t *lt, const moe_batch *ss, beam_t *beams, int nbeams,
                            trial_t *trials, int nt, size_t budget, float *tgt, int step,
                            int metric, float *xn, float *y, double *acc, double *d) {
    moe_model *m = lt->m;
    size_t TH = ss->tot * (size_t)lt->c->hidden_size;
    size_t per = TH * sizeof(float);
    int nb = per ? (int)(budget / per < (size_t)nt ? budget / per : (size_t)nt) : nt;
    if (nb < 1) nb = 1;
    lstream *cands = moe_malloc(sizeof(lstream) * (size_t)(nt + 1));
    lstream *S = moe_malloc(sizeof(lstream) * (size_t)(nt + nbeams + 1));
    float **bufs = moe_calloc((size_t)nb, sizeof(float *));
    for (int i = 0; i < nb; i++) bufs[i] = moe_model_alloc(m, TH);
    for (int i = 0; i < nt; i++)
        cands[i] = (lstream){trials[i].beam, trials[i].cand, trials[i].cand, NULL, (size_t)i};
    qsort(cands, (size_t)nt, sizeof *cands, lstream_cmp);
    int rc = 0;
    for (int i0 = 0; i0 < nt && rc == 0; i0 += nb) {
        int n = 0;
        for (int b = 0; b < nbeams && i0 == 0; b++)
            if (beams[b].pending >= 0) S[n++] = (lstream){b, beams[b].pending, -1, NULL, 0};
        for (int i = i0; i < nt && i < i0 + nb; i++) {
            S[n] = cands[i];
            S[n++].X = bufs[i - i0];
        }
        rc = layer_pass(lt, ss, beams, S, n, tgt, step == 0 && i0 == 0, metric, trials, xn, y,
                        acc, d);
    }
    for (int i = 0; i < nb; i++) moe_model_free(m, bufs[i]);
    free(bufs);
    free(cands);
    free(S);
    return rc;
}

/* ---- layer search: the strategies and the beam ------------------------------------------------
 * One search's state, shared by its three strategies: layer-major (the
 * default), candidate-major (the previous fast loop, kept as the reference
 * the tests compare it with: --candidate-major) and naive (the original). */
typedef struct {
    moe_model *m;
    const moe_config *c;
    const moe_backend *be;
    const moe_search_opts *o;
    moe_search_work *work;
    moe_plan *out;
    moe_batch ss;
    layers_t lt;
    int L, H, N, B, nmoe;
    int *moel;          /* [nmoe] the MoE layers */
    int **ex, *kk;      /* [L] condensed form of each MoE layer: first k ranked experts */
    float **ws;         /*     and their mean weights */
    size_t TH, budget;
    float *X, *xn, *y, *tgt;
    double *acc, *d;
    fullrun orig, cand; /* naive */
    beam_t *beams, *nb;
    int nbeams;
    trial_t *trials;
    moe_progress progress;
} lsearch;

/* A strategy: how the search starts (the original output, the first beam's
 * cache), how one greedy step scores every candidate of every beam into
 * S->trials (returns their number), and how a chosen beam's cache is
 * completed from its new layer cl on (fast strategies only). */
typedef struct {
    int (*start)(lsearch *S);
    int (*step)(lsearch *S, int step, int *nt);
    int (*extend)(lsearch *S, beam_t *nb, const beam_t *p, int cl);
} search_strategy;

static void beam_cache_alloc(lsearch *S, beam_t *b) {
    b->cache = moe_calloc((size_t)S->L + 1, sizeof(float *));
    for (int l = 0; l <= S->L; l++) b->cache[l] = moe_model_alloc(S->m, S->TH);
}

static void beam_free(lsearch *S, beam_t *b) {
    free(b->set);
    if (b->cache) {
        for (int l = 0; l <= S->L; l++) moe_model_free(S->m, b->cache[l]);
        free(b->cache);
    }
    memset(b, 0, sizeof *b);
}

/* the candidates of this step in the scoring order: beam, then layer */
static int list_trials(lsearch *S) {
    int nt = 0;
    for (int b = 0; b < S->nbeams; b++)
        for (int i = 0; i < S->nmoe; i++)
            if (!in_set(&S->beams[b], S->moel[i]))
                S->trials[nt++] = (trial_t){b, S->moel[i], NAN, (size_t)nt};
    return nt;
}

/* -- layer-major: a step's candidates in passes over the layers (layer_major_step) */

static int start_layer_major(lsearch *S) {
    beam_cache_alloc(S, &S->beams[0]);
    int rc = moe_batch_embed(S->m, &S->ss, S->beams[0].cache[0]);
    S->beams[0].pending = 0; /* step 0's first pass computes the original model */
    count_layers(S->work, S->c, 0, S->ss.tot);
    return rc;
}

static int step_layer_major(lsearch *S, int step, int *nt) {
    *nt = list_trials(S);
    if (*nt == 0) return 0;
    return layer_major_step(&S->lt, &S->ss, S->beams, S->nbeams, S->trials, *nt, S->budget,
                            S->tgt, step, S->o->metric, S->xn, S->y, S->acc, S->d);
}

static int extend_layer_major(lsearch *S, beam_t *nb, const beam_t *p, int cl) {
    (void)p;
    nb->pending = cl; /* the next step's first pass fills the rest */
    count_layers(S->work, S->c, cl, S->ss.tot);
    return 0;
}

/* -- candidate-major: each candidate from its layer on, one after the other */

static int start_candidate_major(lsearch *S) {
    beam_cache_alloc(S, &S->beams[0]);
    int rc = moe_batch_embed(S->m, &S->ss, S->X);
    if (rc == 0) rc = run_layers(&S->lt, &S->ss, 0, S->X, S->beams[0].cache, S->xn, S->y);
    if (rc == 0) S->be->copy(S->tgt, S->X, S->TH * sizeof(float));
    count_layers(S->work, S->c, 0, S->ss.tot);
    return rc;
}

static int step_candidate_major(lsearch *S, int step, int *nt) {
    (void)step;
    *nt = list_trials(S);
    for (int j = 0; j < *nt; j++) {
        trial_t *t = &S->trials[j];
        if (apply_set(&S->lt, &S->beams[t->beam], t->cand) < 0) return -1;
        S->be->copy(S->X, S->beams[t->beam].cache[t->cand], S->TH * sizeof(float));
        if (run_layers(&S->lt, &S->ss, t->cand, S->X, NULL, S->xn, S->y) < 0) return -1;
        memset(S->acc, 0, sizeof(double) * (size_t)S->ss.n);
        diverge(S->be, &S->ss, S->o->metric, S->tgt, S->X, 0, S->ss.tot, S->H, S->d, S->acc);
        t->score = score_of(&S->ss, S->acc);
    }
    return 0;
}

static int extend_candidate_major(lsearch *S, beam_t *nb, const beam_t *p, int cl) {
    int rc = apply_set(&S->lt, nb, -1);
    if (rc == 0) {
        S->be->copy(S->X, p->cache[cl], S->TH * sizeof(float));
        rc = run_layers(&S->lt, &S->ss, cl, S->X, nb->cache, S->xn, S->y);
        count_layers(S->work, S->c, cl, S->ss.tot);
    }
    return rc;
}

/* -- naive: a whole forward per candidate */

static int start_naive(lsearch *S) {
    fullrun_init(&S->orig, &S->ss, S->L, S->H);
    fullrun_init(&S->cand, &S->ss, S->L, S->H);
    return forward_full(S->m, &S->ss, &S->orig, S->work);
}

static int step_naive(lsearch *S, int step, int *nt) {
    (void)step;
    *nt = list_trials(S);
    for (int j = 0; j < *nt; j++) {
        trial_t *t = &S->trials[j];
        if (apply_set(&S->lt, &S->beams[t->beam], t->cand) < 0) return -1;
        if (forward_full(S->m, &S->ss, &S->cand, S->work) < 0) return -1;
        t->score = score_runs(S->be, &S->ss, &S->orig, &S->cand, S->L, S->H, S->o->metric, S->work);
    }
    return 0;
}

static const search_strategy LAYER_MAJOR = {start_layer_major, step_layer_major,
                                            extend_layer_major};
static const search_strategy CANDIDATE_MAJOR = {start_candidate_major, step_candidate_major,
                                                extend_candidate_major};
static const search_strategy NAIVE = {start_naive, step_naive, NULL};

/* -- the beam */

/* The condensed form of every MoE layer: its first k ranked experts with
 * their mean weights. */
static int condensed_forms(lsearch *S, const moe_calib *calib, const moe_ranking *ranking, int k) {
    int E = S->c->n_routed_experts;
    S->ex = moe_calloc((size_t)S->L, sizeof(int *));
    S->ws = moe_calloc((size_t)S->L, sizeof(float *));
    S->kk = moe_calloc((size_t)S->L, sizeof(int));
    float *w = moe_malloc(sizeof(float) * (size_t)E);
    int *routed = moe_malloc(sizeof(int) * (size_t)E);
    int rc = 0;
    for (int i = 0; i < S->nmoe && rc == 0; i++) {
        int l = S->moel[i];
        S->ex[l] = moe_malloc(sizeof(int) * (size_t)(k + 1));
        S->ws[l] = moe_malloc(sizeof(float) * (size_t)(k + 1));
        S->kk[l] = k;
        if (k == 0) continue;
        const moe_rank_layer *rl = ranking && ranking->layers ? &ranking->layers[l] : NULL;
        if (!rl || !rl->present) {
            moe_error_set(MOE_ERR_DATA,
                          "no expert ranking for layer %d in the input (run moe-expert-rank, or "
                          "moe-merge the shards)", l);
            rc = -1;
            break;
        }
        if (rl->n < k) {
            moe_error_set(MOE_ERR_DATA, "layer %d: the ranking has %d experts, --experts %d", l,
                          rl->n, k);
            rc = -1;
            break;
        }
        if ((rc = layer_weights(calib, S->o, l, E, w, routed)) < 0) break;
        for (int j = 0; j < k; j++) {
            int e = rl->experts[j];
            if (!routed[e]) {
                moe_error_set(MOE_ERR_DATA, "layer %d: ranked expert %d has no mean weight", l, e);
                rc = -1;
                break;
            }
            S->ex[l][j] = e;
            S->ws[l][j] = w[e];
        }
    }
    free(w);
    free(routed);
    return rc;
}

/* The plan's header and arrays. */
static void plan_init(lsearch *S, int k) {
    moe_plan *out = S->out;
    out->k = k;
    out->L = S->L;
    out->beam = S->B;
    out->metric = S->o->metric;
    out->max_length = S->o->max_length;
    out->order = moe_malloc(sizeof(int) * (size_t)(S->N + 1));
    out->scores = moe_malloc(sizeof(double) * (size_t)(S->N + 1));
    if (S->B == 1) {
        out->cand = moe_malloc(sizeof(double) * (size_t)(S->N + 1) * S->L);
        for (size_t i = 0; i < (size_t)(S->N + 1) * S->L; i++) out->cand[i] = NAN;
    }
}

/* The step's scores into the work counts, the progress and the plan. */
static void record_step(lsearch *S, int step, int nt, int naive) {
    for (int j = 0; j < nt; j++) {
        if (!naive) { /* (the naive forwards count themselves) */
            count_layers(S->work, S->c, S->trials[j].cand, S->ss.tot);
            if (S->work) S->work->div_tokens += S->ss.tot;
        }
        if (S->work) S->work->candidates++;
        moe_progress_add(&S->progress, 1);
        if (S->B == 1) S->out->cand[(size_t)step * S->L + S->trials[j].cand] = S->trials[j].score;
    }
}

/* Keep the best B trials as the next step's beams (stable by scoring
 * order), their caches completed by the strategy. */
static int advance_beams(lsearch *S, const search_strategy *st, int step, int nt) {
    qsort(S->trials, (size_t)nt, sizeof *S->trials, trial_cmp);
    int nn = nt < S->B ? nt : S->B, rc = 0;
    for (int j = 0; j < nn && rc == 0; j++) {
        const beam_t *p = &S->beams[S->trials[j].beam];
        beam_t *nb = &S->nb[j];
        int cl = S->trials[j].cand;
        nb->n = p->n + 1;
        nb->set = moe_malloc(sizeof(int) * (size_t)(S->N + 1));
        memcpy(nb->set, p->set, sizeof(int) * (size_t)p->n);
        nb->set[p->n] = cl;
        nb->pending = -1;
        if (st->extend && step + 1 < S->N) {
            beam_cache_alloc(S, nb);
            for (int l = 0; l <= cl; l++) S->be->copy(nb->cache[l], p->cache[l], S->TH * sizeof(float));
            rc = st->extend(S, nb, p, cl);
        }
    }
    S->out->order[step] = S->nb[0].set[S->nb[0].n - 1];
    S->out->scores[step] = S->trials[0].score;
    S->out->n = step + 1;
    for (int b = 0; b < S->nbeams; b++) beam_free(S, &S->beams[b]);
    memcpy(S->beams, S->nb, sizeof *S->beams * (size_t)nn);
    memset(S->nb, 0, sizeof *S->nb * (size_t)S->B);
    S->nbeams = nn;
    return rc;
}

static int lsearch_init(lsearch *S, moe_model *m, const moe_seqs *s, const moe_search_opts *o,
                        moe_plan *out, moe_search_work *work) {
    memset(S, 0, sizeof *S);
    S->m = m;
    S->c = moe_model_config(m);
    S->be = moe_model_backend(m);
    S->o = o;
    S->work = work;
    S->out = out;
    S->L = S->c->num_layers;
    S->H = S->c->hidden_size;
    S->moel = moe_malloc(sizeof(int) * (size_t)(S->L + 1));
    for (int l = 0; l < S->L; l++)
        if (is_moe(S->c, l)) S->moel[S->nmoe++] = l;
    S->N = o->max_layers > 0 && o->max_layers < S->nmoe ? o->max_layers : S->nmoe;
    S->B = o->beam > 0 ? o->beam : 1;
    batch_of(&S->ss, s, o->max_length);
    S->TH = S->ss.tot * (size_t)S->H;
    S->acc = moe_malloc(sizeof(double) * (size_t)S->ss.n);
    S->d = moe_malloc(sizeof(double) * (S->ss.tot + 1));
    S->X = moe_model_alloc(m, S->TH);
    S->xn = moe_model_alloc(m, S->TH);
    S->y = moe_model_alloc(m, S->TH);
    S->tgt = moe_model_alloc(m, S->TH);
    S->beams = moe_calloc((size_t)S->B, sizeof *S->beams);
    S->nb = moe_calloc((size_t)S->B, sizeof *S->nb);
    S->nbeams = 1;
    for (int b = 0; b < S->B; b++) S->beams[b].pending = -1;
    S->trials = moe_malloc(sizeof(trial_t) * (size_t)S->B * (S->nmoe + 1));
    S->budget = search_budget(m, o);
    return 0;
}

static void lsearch_free(lsearch *S) {
    for (int b = 0; b < S->nbeams; b++) beam_free(S, &S->beams[b]);
    free(S->beams);
    free(S->nb);
    free(S->trials);
    if (S->orig.seq) fullrun_free(&S->orig);
    if (S->cand.seq) fullrun_free(&S->cand);
    moe_model_free(S->m, S->X);
    moe_model_free(S->m, S->xn);
    moe_model_free(S->m, S->y);
    moe_model_free(S->m, S->tgt);
    free(S->acc);
    free(S->d);
    moe_batch_free(&S->ss);
    for (int l = 0; l < S->L && S->ex; l++) {
        free(S->ex[l]);
        free(S->ws[l]);
    }
    free(S->ex);
    free(S->ws);
    free(S->kk);
    free(S->moel);
}

/* ---- the baselines' one-shot criterion (He et al.) ------------------------------------------ */

typedef struct {
    const moe_backend *be;
    const moe_batch *ss;
    int method, H;
    float *in, *tmp;     /* [tot, H]: a layer's input (BlockDrop), x + y (LayerDrop) */
    double *d, *acc;
    double *sim;         /* [L] mean cosine similarity of MoE layer l's input and output */
    const moe_config *c;
} cosine_ctx;

/* sim[l] = mean over sequences of the mean over tokens of cos(a, b) */
static void cosine_score(cosine_ctx *cc, int l, const float *a, const float *b) {
    memset(cc->acc, 0, sizeof(double) * (size_t)cc->ss->n);
    diverge(cc->be, cc->ss, MOE_DIV_COSINE, a, b, 0, cc->ss->tot, cc->H, cc->d, cc->acc);
    cc->sim[l] = 1.0 - score_of(cc->ss, cc->acc);
}

static int cosine_before(void *ctx, int l, float *x) {
    cosine_ctx *cc = ctx;
    if (cc->method == MOE_PLAN_BLOCKDROP && is_moe(cc->c, l))
        cc->be->copy(cc->in, x, sizeof(float) * cc->ss->tot * (size_t)cc->H);
    return 0;
}

static int cosine_mlp_out(void *ctx, int l, const float *x, const float *xn, const float *y) {
    (void)xn;
    cosine_ctx *cc = ctx;
    if (cc->method != MOE_PLAN_LAYERDROP || !is_moe(cc->c, l)) return 0;
    size_t TH = cc->ss->tot * (size_t)cc->H;
    cc->be->copy(cc->tmp, x, sizeof(float) * TH);
    cc->be->axpy(cc->tmp, y, 1.0f, TH); /* the MLP block's output: x + MLP(xn) */
    cosine_score(cc, l, x, cc->tmp);
    return 0;
}

static int cosine_after(void *ctx, int l, float *x) {
    cosine_ctx *cc = ctx;
    if (cc->method == MOE_PLAN_BLOCKDROP && is_moe(cc->c, l)) cosine_score(cc, l, cc->in, x);
    return 0;
}

/* The order of the n most similar MoE layers (ties: the lower layer) and their similarities. */
static void cosine_plan(const cosine_ctx *cc, int n, moe_plan *out) {
    int L = cc->c->num_layers;
    char *taken = moe_calloc((size_t)L + 1, 1);
    out->order = moe_malloc(sizeof(int) * (size_t)(n + 1));
    out->scores = moe_malloc(sizeof(double) * (size_t)(n + 1));
    for (out->n = 0; out->n < n; out->n++) {
        int best = -1;
        for (int l = 0; l < L; l++)
            if (is_moe(cc->c, l) && !taken[l] && (best < 0 || cc->sim[l] > cc->sim[best])) best = l;
        if (best < 0) break;
        taken[best] = 1;
        out->order[out->n] = best;
        out->scores[out->n] = cc->sim[best];
    }
    free(taken);
}

/* One forward of the original model, every MoE layer scored by the
 * similarity of its input and output; the most similar first. */
static int cosine_order(moe_model *m, const moe_seqs *s, const moe_search_opts *o, moe_plan *out,
                        moe_search_work *work) {
    const moe_config *c = moe_model_config(m);
    moe_batch ss;
    batch_of(&ss, s, o->max_length);
    size_t TH = ss.tot * (size_t)c->hidden_size;
    cosine_ctx cc = {moe_model_backend(m), &ss, o->method, c->hidden_size,
                     moe_model_alloc(m, TH), moe_model_alloc(m, TH),
                     moe_malloc(sizeof(double) * (ss.tot + 1)), moe_malloc(sizeof(double) * (size_t)(ss.n + 1)),
                     moe_calloc((size_t)c->num_layers + 1, sizeof(double)), c};
    float *X = moe_model_alloc(m, TH);
    layers_t lt;
    lt_init(&lt, m, o);
    moe_run_hooks h = {.ctx = &cc, .before = cosine_before, .mlp_out = cosine_mlp_out, .after = cosine_after};
    int rc = moe_batch_embed(m, &ss, X);
    if (rc == 0) rc = moe_run_layers(m, &ss, 0, c->num_layers, X, NULL, NULL, &lt.r, &h);
    if (rc == 0) rc = moe_backend_status(moe_model_backend(m));
    int nmoe = 0;
    for (int l = 0; l < c->num_layers; l++) nmoe += is_moe(c, l);
    out->k = 0;
    out->L = c->num_layers;
    out->beam = 1;
    out->metric = MOE_DIV_COSINE;
    out->max_length = o->max_length;
    out->method = o->method;
    out->criterion = MOE_PLAN_COSINE;
    out->present = 1;
    if (rc == 0) cosine_plan(&cc, o->max_layers > 0 && o->max_layers < nmoe ? o->max_layers : nmoe, out);
    count_layers(work, c, 0, ss.tot);
    if (work) work->div_tokens += (uint64_t)nmoe * ss.tot;
    lt_free(&lt, work);
    moe_model_free(m, X);
    moe_model_free(m, cc.in);
    moe_model_free(m, cc.tmp);
    free(cc.d);
    free(cc.acc);
    free(cc.sim);
    moe_batch_free(&ss);
    return rc;
}

int moe_layer_search_run(moe_model *m, const moe_seqs *s, const moe_calib *calib,
                         const moe_ranking *ranking, const moe_search_opts *o, moe_plan *out,
                         moe_search_work *work) {
    int E = moe_model_config(m)->n_routed_experts, k = o->method == MOE_PLAN_CDMOE ? o->k : 0;
    double t0 = moe_now();
    memset(out, 0, sizeof *out);
    if (s->n == 0) {
        moe_error_set(MOE_ERR_DATA, "no token sequences in the input (a 'tokens' stream is needed)");
        return -1;
    }
    if (o->criterion == MOE_PLAN_COSINE) {
        if (o->method == MOE_PLAN_CDMOE) {
            moe_error_set(MOE_ERR_DATA, "the cosine criterion is for the drop methods (layerdrop, blockdrop)");
            return -1;
        }
        int rc = cosine_order(m, s, o, out, work);
        if (work) work->seconds += moe_now() - t0;
        if (rc < 0) moe_plan_free(out);
        return rc;
    }
    if (k < 0 || k > E) {
        moe_error_set(MOE_ERR_DATA, "--experts %d: the model has %d routed experts per layer", k, E);
        return -1;
    }
    const search_strategy *st = o->naive ? &NAIVE : o->candidate_major ? &CANDIDATE_MAJOR
                                                                        : &LAYER_MAJOR;
    lsearch S;
    lsearch_init(&S, m, s, o, out, work);
    int rc = condensed_forms(&S, calib, ranking, k);
    plan_init(&S, k);
    out->method = o->method;
    lt_init(&S.lt, m, o);
    S.lt.drop = (moe_drop_kind)o->method; /* LAYERDROP = MOE_DROP_MLP, BLOCKDROP = MOE_DROP_BLOCK */
    S.lt.ex = S.ex;
    S.lt.ws = S.ws;
    S.lt.kk = S.kk;
    restore_all(&S.lt);
    if (rc == 0) rc = st->start(&S);
    S.beams[0].set = moe_malloc(sizeof(int) * (size_t)(S.N + 1));
    uint64_t total = 0;
    for (int step = 0; step < S.N; step++) total += (uint64_t)(S.nmoe - step) * (uint64_t)S.B;
    moe_progress_start(&S.progress, "moe-layer-search", "candidates", total);
    for (int step = 0; step < S.N && rc == 0; step++) {
        int nt = 0;
        rc = st->step(&S, step, &nt);
        if (rc == 0) record_step(&S, step, nt, st == &NAIVE);
        if (rc < 0 || nt == 0) break;
        rc = advance_beams(&S, st, step, nt);
    }
    moe_progress_end(&S.progress);
    /* the order is the best beam's set */
    if (rc == 0 && out->n > 0) memcpy(out->order, S.beams[0].set, sizeof(int) * (size_t)out->n);
    if (rc == 0 && o->method == MOE_PLAN_CDMOE) plan_weights(out, S.ws);
    out->present = rc == 0;
    restore_all(&S.lt);
    lt_free(&S.lt, work);
    lsearch_free(&S);
    if (rc == 0) rc = moe_backend_status(moe_model_backend(m)); /* scores came from the device */
    if (work) work->seconds += moe_now() - t0;
    if (rc < 0) moe_plan_free(out);
    return rc;
}
