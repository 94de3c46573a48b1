/* forward.c - the forward computation of the model, one function per piece
 * it computes: the embedding (moe_model_embed), the attention block
 * (moe_layer_attention, moe_layer_attention_kv: x += Attn(RMSNorm_in(x))),
 * the MLP block's input norm (moe_layer_mlp_input) and its kinds (dense
 * SwiGLU, routed MoE: router, experts, combine, shared expert; condensed),
 * the final norm and lm_head.  Each takes its weights from weights.c
 * (mdl_ensure_loaded) and computes with the backend's ops only, so a
 * backward twin (moe_layer_attention_backward, ...) belongs beside each.
 * The layer-major loop over a batch of sequences is run.c's. */
#include "internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

/* ---- compute pieces ------------------------------------------------------- */

int moe_model_embed(moe_model *m, float *x, const int32_t *ids, int T) {
    const moe_config *c = m->cfg;
    size_t H = (size_t)c->hidden_size;
    const moe_st_tensor *t = moe_ckpt_get(m->ck, -1, MOE_T_EMBED, -1);
    if (!t) return -1;
    size_t es = (size_t)moe_dtype_bits(t->dtype) / 8;
    float *h = m->be->host_memory ? x : moe_malloc(sizeof(float) * H * (size_t)T + 1);
    int rc = 0;
    for (int i = 0; i < T; i++) {
        if (ids[i] < 0 || ids[i] >= c->vocab_size) {
            moe_error_set(MOE_ERR_DATA, "%s: token id %d at position %d out of range (vocab %d)",
                          moe_ckpt_dir(m->ck), ids[i], i, c->vocab_size);
            rc = -1;
            break;
        }
        moe_dtype_to_f32(t->dtype, (const char *)t->data + (size_t)ids[i] * H * es, h + i * H, H);
    }
    if (!m->be->host_memory) {
        if (rc == 0) m->be->upload(x, h, sizeof(float) * H * (size_t)T);
        free(h);
    }
    moe_st_release(t);
    return rc == 0 ? moe_backend_status(m->be) : rc;
}

/* The attention's input side for T tokens at positions pos0..: xn =
 * RMSNorm_in(x); q, k, v projections (+ biases); qk-norm (whole or per head);
 * RoPE on q and k. */
static void qkv_project(moe_model *m, const layer_w *w, float *q /* [T, nh·D] */,
                        float *k /* [T, nkv·D] */, float *v /* [T, nkv·D] */,
                        float *xn /* [T, H] scratch */, const float *x /* [T, H] */, int T,
                        int pos0) {
    const moe_config *c = m->cfg;
    const moe_backend *be = m->be;
    int H = c->hidden_size, nh = c->num_heads, nkv = c->num_kv_heads, D = c->head_dim;
    float eps = (float)c->rms_norm_eps;
    be->rmsnorm(xn, x, w->in_norm, eps, T, H);
    be->matmul(q, xn, w->wq, w->bq, T, H, nh * D, 0);
    be->matmul(k, xn, w->wk, w->bk, T, H, nkv * D, 0);
    be->matmul(v, xn, w->wv, w->bv, T, H, nkv * D, 0);
    if (c->qk_norm == MOE_QK_NORM_FULL) {
        be->rmsnorm(q, q, w->qn, eps, T, nh * D);
        be->rmsnorm(k, k, w->kn, eps, T, nkv * D);
    } else if (c->qk_norm == MOE_QK_NORM_HEAD) {
        be->rmsnorm(q, q, w->qn, eps, T * nh, D);
        be->rmsnorm(k, k, w->kn, eps, T * nkv, D);
    }
    be->rope(q, (float)c->rope_theta, pos0, T, nh, D);
    be->rope(k, (float)c->rope_theta, pos0, T, nkv, D);
}

int moe_layer_attention(moe_model *m, int l, float *x, int T) {
    if (mdl_ensure_loaded(m, l) < 0) return -1;
    const moe_config *c = m->cfg;
    if (c->sliding_window > 0 && T > c->sliding_window) {
        moe_error_set(MOE_ERR_DATA, "%s: sequence of %d tokens is longer than sliding_window %d "
                      "(not supported)", c->path, T, c->sliding_window);
        return -1;
    }
    const moe_backend *be = m->be;
    layer_w *w = &m->lw[l];
    int H = c->hidden_size, nh = c->num_heads, nkv = c->num_kv_heads, D = c->head_dim;
    size_t t = (size_t)T;
    float *xn = mdl_scratch(m, S_XN, sizeof(float) * t * H);
    float *q = mdl_scratch(m, S_Q, sizeof(float) * t * nh * D);
    float *k = mdl_scratch(m, S_K, sizeof(float) * t * nkv * D);
    float *v = mdl_scratch(m, S_V, sizeof(float) * t * nkv * D);
    float *att = mdl_scratch(m, S_ATT, sizeof(float) * t * nh * D);
    qkv_project(m, w, q, k, v, xn, x, T, 0);
    be->attention(att, q, k, v, (float)(1.0 / sqrt((double)D)), T, nh, nkv, D);
    be->matmul(x, att, w->wo, NULL, T, nh * D, H, 1); /* x += att·Woᵀ */
    return moe_backend_status(be);
}

int moe_layer_mlp_input(moe_model *m, int l, float *xn, const float *x, int T) {
    if (mdl_ensure_loaded(m, l) < 0) return -1;
    m->be->rmsnorm(xn, x, m->lw[l].post_norm, (float)m->cfg->rms_norm_eps, T, m->cfg->hidden_size);
    return 0;
}

/* y (+)= SwiGLU MLP with fused gate_up [2I,H] and down [H,I] */
static void swiglu_mlp(moe_model *m, float *y, const float *x, const void *gu_w,
                       const void *down_w, int down_f32, int T, int I, int accumulate) {
    const moe_backend *be = m->be;
    int H = m->cfg->hidden_size;
    float *gu = mdl_scratch(m, S_GU, sizeof(float) * (size_t)T * 2 * I);
    float *h = mdl_scratch(m, S_H, sizeof(float) * (size_t)T * I);
    be->matmul(gu, x, gu_w, NULL, T, H, 2 * I, 0);
    be->swiglu(h, gu, T, I);
    if (down_f32)
        be->matmul_f32(y, h, down_w, NULL, T, I, H, accumulate);
    else
        be->matmul(y, h, down_w, NULL, T, I, H, accumulate);
}

/* y += shared part (gated for qwen2_moe) */
static void add_shared(moe_model *m, layer_w *w, float *y, const float *xn, int T) {
    if (!w->s_gu) return;
    const moe_backend *be = m->be;
    int H = m->cfg->hidden_size;
    float *o = mdl_scratch(m, S_O, sizeof(float) * (size_t)T * H);
    swiglu_mlp(m, o, xn, w->s_gu, w->s_down, 0, T, w->Is, 0);
    if (w->s_gate) {
        float *z = mdl_scratch(m, S_Z, sizeof(float) * (size_t)T);
        be->matmul(z, xn, w->s_gate, NULL, T, H, 1, 0);
        be->sigmoid_gate_add(y, o, z, T, H);
    } else {
        be->axpy(y, o, 1.0f, (size_t)T * H);
    }
}

/* routing into host arrays (idx, wt, probs) */
static int route(moe_model *m, int l, const float *xn, int T, int32_t *idx_h, float *wt_h,
                 float *probs_h) {
    const moe_config *c = m->cfg;
    const moe_backend *be = m->be;
    layer_w *w = &m->lw[l];
    int E = c->n_routed_experts, K = c->top_k, H = c->hidden_size;
    void *router = w->router;
    if (!router) { /* overridden layer: router not loaded */
        router = mdl_load_mat(m, l, MOE_T_ROUTER, -1);
        if (!router) return -1;
        mdl_weights_ready(m);
    }
    float *lg = mdl_scratch(m, S_LOGITS, sizeof(float) * (size_t)T * E);
    int32_t *idx = mdl_scratch(m, S_IDX, sizeof(int32_t) * (size_t)T * K);
    float *wt = mdl_scratch(m, S_WT, sizeof(float) * (size_t)T * K);
    float *probs = probs_h ? mdl_scratch(m, S_PROBS, sizeof(float) * (size_t)T * E) : NULL;
    m->router_be->matmul(lg, xn, router, NULL, T, H, E, 0); /* float32 logits (model.h) */
    int mode = c->router == MOE_ROUTER_TOPK_SOFTMAX ? MOE_ROUTE_TOPK_SOFTMAX : MOE_ROUTE_SOFTMAX_TOPK;
    int renorm = MOE_RENORM_NONE;
    if (c->norm_topk_prob && mode == MOE_ROUTE_SOFTMAX_TOPK)
        renorm = c->norm_topk_eps > 0 ? MOE_RENORM_SUM_EPS : MOE_RENORM_SUM;
    if (K == 1 && c->arch->id == MOE_ARCH_DEEPSEEK) renorm = MOE_RENORM_NONE; /* "top_k > 1 and" */
    be->router(idx, wt, probs, lg, mode, renorm, T, E, K);
    be->download(idx_h, idx, sizeof(int32_t) * (size_t)T * K);
    be->download(wt_h, wt, sizeof(float) * (size_t)T * K);
    if (probs_h) be->download(probs_h, probs, sizeof(float) * (size_t)T * E);
    if (router != w->router) mdl_free(m, router);
    return moe_backend_status(be); /* the routing went to the host: check it is real */
}

int moe_layer_route(moe_model *m, int l, const float *xn, int T, int32_t *idx, float *wt,
                    float *probs) {
    if (mdl_ensure_loaded(m, l) < 0) return -1;
    if (m->cfg->layers[l].kind != MOE_MLP_MOE) {
        moe_error_set(MOE_ERR_DATA, "%s: layer %d has no router", moe_ckpt_dir(m->ck), l);
        return -1;
    }
    return route(m, l, xn, T, idx, wt, probs);
}

/* Routed experts of one chunk of tokens: grouped expert op, then the
 * weighted combine in ascending expert id per token. */
static int routed_chunk(moe_model *m, int l, float *y, const float *xn, int T, const int32_t *idx,
                        const float *wt) {
    const moe_config *c = m->cfg;
    const moe_backend *be = m->be;
    int E = c->n_routed_experts, K = c->top_k, H = c->hidden_size, Im = c->moe_intermediate_size;
    moe_dispatch d;
    moe_dispatch_build(&d, idx, wt, T, E, K);
    size_t nk = (size_t)T * K;
    int32_t *rows = mdl_scratch(m, S_TOK, sizeof(int32_t) * nk + 4);
    int32_t *slot = mdl_scratch(m, S_IDX, sizeof(int32_t) * nk + 4);
    float *swt = mdl_scratch(m, S_TWT, sizeof(float) * nk + 4);
    float *out = mdl_scratch(m, S_XE, sizeof(float) * nk * H + 4);
    be->upload(rows, d.tokens, sizeof(int32_t) * nk);
    be->upload(slot, d.slot, sizeof(int32_t) * nk);
    be->upload(swt, d.slot_wt, sizeof(float) * nk);
    const void **wg = moe_calloc((size_t)E, sizeof(void *)), **wd = moe_calloc((size_t)E, sizeof(void *));
    void **tg = moe_calloc((size_t)E, sizeof(void *)), **td = moe_calloc((size_t)E, sizeof(void *));
    layer_w *w = &m->lw[l];
    /* experts not cached are converted in groups of at most a quarter of the
     * cache budget (the rest stays free for buffers and mapped pages) */
    size_t ebytes = (size_t)3 * Im * H * mdl_wsz(m), budget = m->cache_bytes / 4;
    int rc = 0;
    for (int e0 = 0; e0 < E && rc == 0;) {
        size_t used = 0;
        int e1 = e0;
        for (; e1 < E; e1++) {
            if (d.off[e1 + 1] == d.off[e1]) continue;
            if (w->e_gu && w->e_gu[e1]) {
                wg[e1] = w->e_gu[e1];
                wd[e1] = w->e_down[e1];
                continue;
            }
            if (used > 0 && used + ebytes > budget) break;
            tg[e1] = (void *)1; /* to convert */
            used += ebytes;
        }
        if (used > 0) rc = mdl_convert_experts(m, l, e0, e1, tg, td);
        if (used > 0) mdl_weights_ready(m);
        for (int e = e0; e < e1 && rc == 0; e++)
            if (tg[e]) {
                wg[e] = tg[e];
                wd[e] = td[e];
            }
        if (rc == 0) be->experts(out, xn, rows, d.off, wg, wd, E, H, Im);
        for (int e = e0; e < e1; e++) {
            if (tg[e] && tg[e] != (void *)1) mdl_free(m, tg[e]);
            mdl_free(m, td[e]);
            tg[e] = td[e] = NULL;
            wg[e] = wd[e] = NULL;
        }
        e0 = e1;
    }
    free(tg);
    free(td);
    if (rc == 0) be->combine(y, out, slot, swt, T, K, H);
    free(wg);
    free(wd);
    moe_dispatch_free(&d);
    return rc;
}

static int routed_mlp(moe_model *m, int l, float *y, const float *xn, int T, moe_router_fn cb,
                      void *ctx) {
    const moe_config *c = m->cfg;
    layer_w *w = &m->lw[l];
    int E = c->n_routed_experts, K = c->top_k, H = c->hidden_size, Im = c->moe_intermediate_size;
    int32_t *idx = moe_malloc(sizeof(int32_t) * (size_t)T * K + 1);
    float *wt = moe_malloc(sizeof(float) * (size_t)T * K + 1);
    float *probs = cb ? moe_malloc(sizeof(float) * (size_t)T * E + 1) : NULL;
    int rc = route(m, l, xn, T, idx, wt, probs);
    /* tokens in chunks whose expert buffers (rows x (2H + Im) floats, plus the
     * backend's own of the same order) stay under ~1 GiB; a token's result does
     * not depend on the chunking */
    size_t per_tok = (size_t)K * (2 * (size_t)H + (size_t)Im) * sizeof(float) * 2;
    int chunk = (int)(((size_t)1 << 30) / per_tok);
    if (chunk < 1) chunk = 1;
    for (int t0 = 0; t0 < T && rc == 0; t0 += chunk) {
        int tc = T - t0 < chunk ? T - t0 : chunk;
        rc = routed_chunk(m, l, y + (size_t)t0 * H, xn + (size_t)t0 * H, tc, idx + (size_t)t0 * K,
                          wt + (size_t)t0 * K);
    }
    if (rc == 0) add_shared(m, w, y, xn, T);
    if (rc == 0) rc = moe_backend_status(m->be);
    if (rc == 0 && cb) cb(ctx, l, T, K, E, idx, wt, probs);
    free(idx);
    free(wt);
    free(probs);
    return rc;
}

int moe_layer_mlp_run(moe_model *m, int l, float *y, const float *xn, int T, moe_router_fn cb,
                  void *ctx) {
    if (mdl_ensure_loaded(m, l) < 0) return -1;
    layer_w *w = &m->lw[l];
    size_t TH = (size_t)T * m->cfg->hidden_size;
    switch (moe_model_layer_kind(m, l)) {
    case MOE_MLP_DENSE:
        swiglu_mlp(m, y, xn, w->gu, w->down, 0, T, w->I, 0);
        return moe_backend_status(m->be);
    case MOE_MLP_CONDENSED:
        if (w->I > 0)
            swiglu_mlp(m, y, xn, w->gu, w->down, w->down_f32, T, w->I, 0);
        else
            m->be->zero(y, TH * sizeof(float));
        add_shared(m, w, y, xn, T);
        return moe_backend_status(m->be);
    case MOE_MLP_MOE:
        return routed_mlp(m, l, y, xn, T, cb, ctx);
    }
    return -1;
}

int moe_layer_forward(moe_model *m, int l, float *x, int T, moe_router_fn cb, void *ctx) {
    if (moe_layer_attention(m, l, x, T) < 0) return -1;
    size_t TH = (size_t)T * m->cfg->hidden_size;
    float *xn = moe_model_alloc(m, TH), *y = moe_model_alloc(m, TH);
    int rc = moe_layer_mlp_input(m, l, xn, x, T);
    if (rc == 0) rc = moe_layer_mlp_run(m, l, y, xn, T, cb, ctx);
    if (rc == 0) m->be->axpy(x, y, 1.0f, TH);
    moe_model_free(m, xn);
    moe_model_free(m, y);
    return rc;
}

int moe_layer_expert(moe_model *m, int l, int e, float *y, const float *xn, int T) {
    if (mdl_ensure_loaded(m, l) < 0) return -1;
    const moe_config *c = m->cfg;
    if (c->layers[l].kind == MOE_MLP_DENSE || e < 0 || e >= c->n_routed_experts ||
        !moe_config_has_expert(c, l, e)) {
        moe_error_set(MOE_ERR_DATA, "%s: layer %d has no routed expert %d", moe_ckpt_dir(m->ck),
                      l, e);
        return -1;
    }
    void *gu, *down;
    int tmp;
    if (mdl_expert_weights(m, l, e, &gu, &down, &tmp) < 0) return -1;
    swiglu_mlp(m, y, xn, gu, down, 0, T, c->moe_intermediate_size, 0);
    if (tmp) {
        mdl_free(m, gu);
        mdl_free(m, down);
    }
    return moe_backend_status(m->be);
}

int moe_layer_shared(moe_model *m, int l, float *y, const float *xn, int T) {
    if (mdl_ensure_loaded(m, l) < 0) return -1;
    const moe_config *c = m->cfg;
    layer_w *w = &m->lw[l];
    size_t TH = (size_t)T * c->hidden_size;
    m->be->zero(y, TH * sizeof(float));
    if (c->layers[l].kind == MOE_MLP_DENSE || !c->layers[l].has_shared ||
        c->shared_intermediate_size == 0)
        return 0;
    if (w->s_gu) {
        add_shared(m, w, y, xn, T);
        return moe_backend_status(m->be);
    }
    /* condensed layer with the ungated shared MLP fused away: load it now */
    size_t H = (size_t)c->hidden_size;
    layer_w tmpw = {0};
    tmpw.Is = c->shared_intermediate_size;
    tmpw.s_gu = mdl_load_gate_up(m, l, MOE_T_SHARED_GATE, MOE_T_SHARED_UP, -1, (size_t)tmpw.Is * H);
    tmpw.s_down = tmpw.s_gu ? mdl_load_mat(m, l, MOE_T_SHARED_DOWN, -1) : NULL;
    int rc = tmpw.s_down ? 0 : -1;
    mdl_weights_ready(m);
    if (rc == 0) add_shared(m, &tmpw, y, xn, T);
    mdl_free(m, tmpw.s_gu);
    mdl_free(m, tmpw.s_down);
    return rc == 0 ? moe_backend_status(m->be) : rc;
}

int moe_model_final_norm(moe_model *m, float *y, const float *x, int T) {
    m->be->rmsnorm(y, x, m->final_norm, (float)m->cfg->rms_norm_eps, T, m->cfg->hidden_size);
    return moe_backend_status(m->be);
}

/* logits of T tokens, row t written to rowdst[t] (V floats; host memory when
 * dst_host, else backend memory).  lm_head is converted chunk by chunk of
 * vocabulary rows, each chunk once for all tokens. */
int mdl_lm_head_to_rows(moe_model *m, const float *x, int T, float *const *rowdst, int dst_host) {
    const moe_config *c = m->cfg;
    const moe_backend *be = m->be;
    const moe_st_tensor *t = moe_ckpt_get(m->ck, -1, MOE_T_LM_HEAD, -1);
    if (!t) return -1;
    size_t H = (size_t)c->hidden_size, V = (size_t)c->vocab_size;
    size_t chunk = ((size_t)64 << 20) / (H * sizeof(float));
    if (chunk < 256) chunk = 256;
    if (chunk > V) chunk = V;
    float *yc = mdl_scratch(m, S_Y, sizeof(float) * (size_t)T * chunk);
    for (size_t r0 = 0; r0 < V; r0 += chunk) {
        size_t nr = V - r0 < chunk ? V - r0 : chunk;
        int borrowed;
        void *wb = mdl_lm_head_rows(m, t, r0, nr, &borrowed);
        be->matmul(yc, x, wb, NULL, T, (int)H, (int)nr, 0);
        if (!borrowed) mdl_free(m, wb);
        if (dst_host && !be->host_memory) {
            /* one transfer per chunk, not one per token: each download waits
             * for the device */
            float *hc = moe_malloc(sizeof(float) * (size_t)T * nr);
            be->download(hc, yc, sizeof(float) * (size_t)T * nr);
            for (int i = 0; i < T; i++) memcpy(rowdst[i] + r0, hc + (size_t)i * nr, nr * sizeof(float));
            free(hc);
        } else {
            for (int i = 0; i < T; i++) be->copy(rowdst[i] + r0, yc + (size_t)i * nr, nr * sizeof(float));
        }
        moe_st_release(t); /* drop the mapped pages read so far */
    }
    return moe_backend_status(be);
}

int moe_model_lm_head(moe_model *m, float *logits, const float *x, int T) {
    float **rows = moe_malloc(sizeof(float *) * ((size_t)T + 1));
    for (int i = 0; i < T; i++) rows[i] = logits + (size_t)i * m->cfg->vocab_size;
    int rc = mdl_lm_head_to_rows(m, x, T, rows, 0);
    free(rows);
    return rc;
}

/* ---- attention over a KV cache (prefix sharing) ------------------------------ */

size_t moe_model_kv_floats(const moe_model *m, int T) {
    return (size_t)(T > 0 ? T : 0) * (size_t)m->cfg->num_kv_heads * (size_t)m->cfg->head_dim;
}

int moe_layer_attention_kv(moe_model *m, int l, float *x, int T, int pos0, float *kc, float *vc) {
    if (mdl_ensure_loaded(m, l) < 0) return -1;
    const moe_config *c = m->cfg;
    if (T < 1 || pos0 < 0 || !kc || !vc) {
        moe_error_set(MOE_ERR_DATA, "%s: attention over a cache: bad arguments (T %d, pos0 %d)",
                      c->path, T, pos0);
        return -1;
    }
    if (c->sliding_window > 0 && pos0 + T > c->sliding_window) {
        moe_error_set(MOE_ERR_DATA, "%s: sequence of %d tokens is longer than sliding_window %d "
                      "(not supported)", c->path, pos0 + T, c->sliding_window);
        return -1;
    }
    const moe_backend *be = m->be;
    layer_w *w = &m->lw[l];
    int H = c->hidden_size, nh = c->num_heads, nkv = c->num_kv_heads, D = c->head_dim;
    size_t t = (size_t)T, kvd = (size_t)nkv * D;
    float *xn = mdl_scratch(m, S_XN, sizeof(float) * t * H);
    float *q = mdl_scratch(m, S_Q, sizeof(float) * t * nh * D);
    float *att = mdl_scratch(m, S_ATT, sizeof(float) * t * nh * D);
    float *k = kc + (size_t)pos0 * kvd, *v = vc + (size_t)pos0 * kvd; /* this call's rows */
    qkv_project(m, w, q, k, v, xn, x, T, pos0); /* as moe_layer_attention, row for row */
    be->attention_kv(att, q, kc, vc, (float)(1.0 / sqrt((double)D)), pos0, T, nh, nkv, D);
    be->matmul(x, att, w->wo, NULL, T, nh * D, H, 1); /* x += att·Woᵀ */
    return moe_backend_status(be);
}
