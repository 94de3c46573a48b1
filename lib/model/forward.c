/* forward.c - the forward computation of the model, one function per piece
 * it computes: the embedding (moe_model_embed), the attention block
 * (moe_layer_attention, moe_layer_attention_kv: x += Attn(RMSNorm_in(x))),
 * the MLP block's input norm (moe_layer_mlp_input) and its kinds (dense
 * SwiGLU, routed MoE: router, experts, combine, shared expert; condensed),
 * the final norm and lm_head.  Each takes its weights from weights.c
 * (mdl_ensure_loaded) and computes with the backend's ops only.
 * The layer-major loop over a batch of sequences is run.c's.
 *
 * Training (second half of the file): the same pieces over a batch, with
 * the trainer's weights (train.c), each forward keeping what its backward
 * needs and its backward beside it: mdl_attention_train / _backward,
 * swiglu_train / swiglu_backward_rows (dense MLP, experts, shared),
 * shared_train / shared_backward, routed and condensed experts with the
 * router (mdl_mlp_train / mdl_mlp_backward), final norm + lm_head +
 * cross-entropy fused with their backward (mdl_head_loss). */
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
    if (moe_model_layer_drop(m, l) == MOE_DROP_BLOCK) return 0; /* BlockDrop: no attention */
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
    if (!m->lw[l].post_norm) { /* a dropped MLP has no norm: its input is unused */
        m->be->zero(xn, sizeof(float) * (size_t)T * m->cfg->hidden_size);
        return moe_backend_status(m->be);
    }
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

void mdl_route_mode(const moe_model *m, int *mode, int *renorm) {
    const moe_config *c = m->cfg;
    *mode = c->router == MOE_ROUTER_TOPK_SOFTMAX ? MOE_ROUTE_TOPK_SOFTMAX : MOE_ROUTE_SOFTMAX_TOPK;
    *renorm = MOE_RENORM_NONE;
    if (c->norm_topk_prob && *mode == MOE_ROUTE_SOFTMAX_TOPK)
        *renorm = c->norm_topk_eps > 0 ? MOE_RENORM_SUM_EPS : MOE_RENORM_SUM;
    if (c->top_k == 1 && c->arch->id == MOE_ARCH_DEEPSEEK) *renorm = MOE_RENORM_NONE; /* "top_k > 1 and" */
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
    int mode, renorm;
    mdl_route_mode(m, &mode, &renorm);
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
    case MOE_MLP_NONE: /* LayerDrop / BlockDrop: no MLP */
        m->be->zero(y, TH * sizeof(float));
        return moe_backend_status(m->be);
    }
    return -1;
}

int moe_layer_forward(moe_model *m, int l, float *x, int T, moe_router_fn cb, void *ctx) {
    moe_drop_kind drop = moe_model_layer_drop(m, l);
    if (drop == MOE_DROP_BLOCK) return 0; /* BlockDrop: x passes */
    if (moe_layer_attention(m, l, x, T) < 0) return -1;
    if (drop == MOE_DROP_MLP) return 0; /* LayerDrop: no MLP */
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
    if (moe_model_layer_drop(m, l) == MOE_DROP_BLOCK) return 0; /* BlockDrop: no attention */
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

/* ---- training: each piece's forward keeping what its backward needs, and the
 * backward beside it (lib/train.h; the weights are the trainer's, train.c).
 * Per-token work runs on all N rows of the batch at once; attention and RoPE
 * per sequence (positions from 0).  The forward makes the same op calls as
 * the inference pieces above, so a layer's output has the same bytes on the
 * CPU; a condensed layer is the exception (the trainer keeps its experts
 * unfused: see train_layer in internal.h). */

static float *tbuf(moe_model *m, size_t nfloats) { return moe_model_alloc(m, nfloats); }

/* a buffer the next op writes whole (a product with no accumulation, a copy,
 * a norm, a gather): not zeroed first -- zeroing a step's activations took
 * 7% of bench/tune.sh's CPU time, page faults included.  Same size as tbuf's
 * (the model's pool hands blocks back by size). */
static float *tbuf_out(moe_model *m, size_t nfloats) {
    return mdl_alloc(m, nfloats * sizeof(float) + 4);
}

static void tfree(moe_model *m, void *p) { mdl_free(m, p); }

static int seq_fits_window(const moe_model *m, const train_rows *r) {
    const moe_config *c = m->cfg;
    for (int s = 0; s < r->n; s++)
        if (c->sliding_window > 0 && r->T[s] > c->sliding_window) {
            moe_error_set(MOE_ERR_DATA, "%s: sequence of %d tokens is longer than sliding_window "
                          "%d (not supported)", c->path, r->T[s], c->sliding_window);
            return 0;
        }
    return 1;
}

/* q/k-norm of T rows of projections p (whole or per head), from pl */
static void qk_norm_rows(moe_model *m, float *p, const float *pl, const float *w, size_t T, int nh) {
    const moe_config *c = m->cfg;
    float eps = (float)c->rms_norm_eps;
    int D = c->head_dim;
    if (c->qk_norm == MOE_QK_NORM_FULL)
        m->be->rmsnorm(p, pl, w, eps, (int)T, nh * D);
    else
        m->be->rmsnorm(p, pl, w, eps, (int)T * nh, D);
}

static void qk_norm_rows_backward(moe_model *m, float *dpl, float *dw, const float *dp,
                                  const float *pl, const float *w, size_t T, int nh) {
    const moe_config *c = m->cfg;
    float eps = (float)c->rms_norm_eps;
    int D = c->head_dim;
    if (c->qk_norm == MOE_QK_NORM_FULL)
        m->be->rmsnorm_backward(dpl, dw, dp, pl, w, eps, (int)T, nh * D);
    else
        m->be->rmsnorm_backward(dpl, dw, dp, pl, w, eps, (int)T * nh, D);
}

int mdl_attention_train(moe_model *m, const train_layer *tl, layer_save *s, float *x,
                        const train_rows *r) {
    if (!seq_fits_window(m, r)) return -1;
    const moe_config *c = m->cfg;
    const moe_backend *be = m->be;
    int H = c->hidden_size, nh = c->num_heads, nkv = c->num_kv_heads, D = c->head_dim;
    size_t N = r->N, qd = (size_t)nh * D, kvd = (size_t)nkv * D;
    s->x = tbuf_out(m, N * H);
    be->copy(s->x, x, sizeof(float) * N * H);
    s->xa = tbuf_out(m, N * H);
    s->q = tbuf_out(m, N * qd);
    s->k = tbuf_out(m, N * kvd);
    s->v = tbuf_out(m, N * kvd);
    s->att = tbuf(m, N * qd);
    be->rmsnorm(s->xa, x, tl->in_norm.w, (float)c->rms_norm_eps, (int)N, H);
    float *qp = s->q, *kp = s->k;
    if (c->qk_norm != MOE_QK_NORM_NONE) { /* projections kept before the norm */
        qp = s->ql = tbuf_out(m, N * qd);
        kp = s->kl = tbuf_out(m, N * kvd);
    }
    be->matmul(qp, s->xa, tl->wq.w, tl->bq.w, (int)N, H, (int)qd, 0);
    be->matmul(kp, s->xa, tl->wk.w, tl->bk.w, (int)N, H, (int)kvd, 0);
    be->matmul(s->v, s->xa, tl->wv.w, tl->bv.w, (int)N, H, (int)kvd, 0);
    if (c->qk_norm != MOE_QK_NORM_NONE) {
        qk_norm_rows(m, s->q, s->ql, tl->qn.w, N, nh);
        qk_norm_rows(m, s->k, s->kl, tl->kn.w, N, nkv);
    }
    float scale = (float)(1.0 / sqrt((double)D));
    for (int q = 0; q < r->n; q++) {
        size_t o = r->off[q];
        int T = r->T[q];
        be->rope(s->q + o * qd, (float)c->rope_theta, 0, T, nh, D);
        be->rope(s->k + o * kvd, (float)c->rope_theta, 0, T, nkv, D);
        be->attention(s->att + o * qd, s->q + o * qd, s->k + o * kvd, s->v + o * kvd, scale, T, nh,
                      nkv, D);
    }
    be->matmul(x, s->att, tl->wo.w, NULL, (int)N, (int)qd, H, 1); /* x += att·Woᵀ */
    return moe_backend_status(be);
}

int mdl_attention_trained(const train_layer *tl) {
    return tl->in_norm.g || tl->wq.g || tl->wk.g || tl->wv.g || tl->wo.g || tl->bq.g ||
           tl->qn.g;
}

/* dq, dk (post-RoPE on input) to the projections' gradients, per sequence */
static void rope_attention_backward(moe_model *m, const layer_save *s, float *dq, float *dk,
                                    float *dv, const float *datt, const train_rows *r) {
    const moe_config *c = m->cfg;
    const moe_backend *be = m->be;
    int nh = c->num_heads, nkv = c->num_kv_heads, D = c->head_dim;
    size_t qd = (size_t)nh * D, kvd = (size_t)nkv * D;
    float scale = (float)(1.0 / sqrt((double)D));
    for (int q = 0; q < r->n; q++) {
        size_t o = r->off[q];
        int T = r->T[q];
        be->attention_backward(dq + o * qd, dk + o * kvd, dv + o * kvd, datt + o * qd,
                               s->q + o * qd, s->k + o * kvd, s->v + o * kvd, s->att + o * qd,
                               scale, T, nh, nkv, D);
        be->rope_backward(dq + o * qd, (float)c->rope_theta, 0, T, nh, D);
        be->rope_backward(dk + o * kvd, (float)c->rope_theta, 0, T, nkv, D);
    }
}

int mdl_attention_backward(moe_model *m, const train_layer *tl, const layer_save *s, float *dx,
                           int need_dx, const train_rows *r) {
    if (!need_dx && !mdl_attention_trained(tl)) return 0;
    const moe_config *c = m->cfg;
    const moe_backend *be = m->be;
    int H = c->hidden_size, nh = c->num_heads, nkv = c->num_kv_heads, D = c->head_dim;
    size_t N = r->N, qd = (size_t)nh * D, kvd = (size_t)nkv * D;
    float *datt = tbuf(m, N * qd), *dq = tbuf(m, N * qd), *dk = tbuf(m, N * kvd);
    float *dv = tbuf(m, N * kvd), *dxa = tbuf(m, N * H);
    be->matmul_backward(datt, tl->wo.g, NULL, dx, s->att, tl->wo.w, (int)N, (int)qd, H);
    rope_attention_backward(m, s, dq, dk, dv, datt, r);
    if (c->qk_norm != MOE_QK_NORM_NONE) { /* back through the norm to the projections */
        float *dql = tbuf(m, N * qd), *dkl = tbuf(m, N * kvd);
        qk_norm_rows_backward(m, dql, tl->qn.g, dq, s->ql, tl->qn.w, N, nh);
        qk_norm_rows_backward(m, dkl, tl->kn.g, dk, s->kl, tl->kn.w, N, nkv);
        tfree(m, dq);
        tfree(m, dk);
        dq = dql;
        dk = dkl;
    }
    be->matmul_backward(dxa, tl->wq.g, tl->bq.g, dq, s->xa, tl->wq.w, (int)N, H, (int)qd);
    be->matmul_backward(dxa, tl->wk.g, tl->bk.g, dk, s->xa, tl->wk.w, (int)N, H, (int)kvd);
    be->matmul_backward(dxa, tl->wv.g, tl->bv.g, dv, s->xa, tl->wv.w, (int)N, H, (int)kvd);
    /* x_mid = x + Attn(RMSNorm(x)): dx (holding d x_mid) += the norm's backward */
    float *dxo = need_dx ? dx : tbuf(m, N * H);
    be->rmsnorm_backward(dxo, tl->in_norm.g, dxa, s->x, tl->in_norm.w, (float)c->rms_norm_eps,
                         (int)N, H);
    if (dxo != dx) tfree(m, dxo);
    void *ps[] = {datt, dq, dk, dv, dxa};
    for (size_t i = 0; i < sizeof ps / sizeof *ps; i++) tfree(m, ps[i]);
    return moe_backend_status(be);
}

/* y (+)= down·SwiGLU(gu_w·x) of T rows, the gate|up activations kept in *gu */
static void swiglu_train(moe_model *m, float *y, const float *x, const tparam *gu_w,
                         const tparam *down_w, int T, int I, int acc, float **gu) {
    const moe_backend *be = m->be;
    int H = m->cfg->hidden_size;
    float *h = mdl_scratch(m, S_H, sizeof(float) * (size_t)T * I);
    *gu = tbuf_out(m, (size_t)T * 2 * I);
    be->matmul(*gu, x, gu_w->w, NULL, T, H, 2 * I, 0);
    be->swiglu(h, *gu, T, I);
    be->matmul(y, h, down_w->w, NULL, T, I, H, acc);
}

/* its backward: dx += (when dx), weight gradients added (when trained);
 * gu: the saved gate|up activations, or NULL: recomputed from x */
static void swiglu_backward_rows(moe_model *m, float *dx, const tparam *gu_w,
                                 const tparam *down_w, const float *dy, const float *x,
                                 const float *gu, int T, int I) {
    if (!dx && !gu_w->g && !down_w->g) return;
    const moe_backend *be = m->be;
    int H = m->cfg->hidden_size;
    size_t t = (size_t)T;
    float *gtmp = NULL;
    if (!gu) {
        gu = gtmp = tbuf_out(m, t * 2 * I);
        be->matmul(gtmp, x, gu_w->w, NULL, T, H, 2 * I, 0);
    }
    float *h = tbuf_out(m, t * I), *dh = tbuf(m, t * I), *dgu = tbuf(m, t * 2 * I);
    be->swiglu(h, gu, T, I);
    be->matmul_backward(dh, down_w->g, NULL, dy, h, down_w->w, T, I, H);
    be->swiglu_backward(dgu, dh, gu, T, I);
    if (dx || gu_w->g) be->matmul_backward(dx, gu_w->g, NULL, dgu, x, gu_w->w, T, H, 2 * I);
    tfree(m, gtmp);
    tfree(m, h);
    tfree(m, dh);
    tfree(m, dgu);
}

/* y += shared part (× sigmoid gate for qwen2_moe), as add_shared */
static void shared_train(moe_model *m, const train_layer *tl, layer_save *s, float *y, int N) {
    if (!tl->s_gu.w) return;
    const moe_backend *be = m->be;
    int H = m->cfg->hidden_size;
    s->so = tbuf_out(m, (size_t)N * H);
    swiglu_train(m, s->so, s->xn, &tl->s_gu, &tl->s_down, N, tl->Is, 0, &s->sgu);
    if (tl->s_gate.w) {
        s->z = tbuf(m, (size_t)N);
        be->matmul(s->z, s->xn, tl->s_gate.w, NULL, N, H, 1, 0);
        be->sigmoid_gate_add(y, s->so, s->z, N, H);
    } else {
        be->axpy(y, s->so, 1.0f, (size_t)N * H);
    }
}

static void shared_backward(moe_model *m, const train_layer *tl, const layer_save *s, float *dxn,
                            const float *dy, int N) {
    if (!tl->s_gu.w || (!dxn && !tl->s_gu.g && !tl->s_down.g && !tl->s_gate.g)) return;
    const moe_backend *be = m->be;
    int H = m->cfg->hidden_size;
    const float *dso = dy;
    float *tmp = NULL;
    if (tl->s_gate.w) {
        tmp = tbuf(m, (size_t)N * H);
        float *dz = tbuf(m, (size_t)N);
        be->sigmoid_gate_add_backward(tmp, dz, dy, s->so, s->z, N, H);
        if (dxn || tl->s_gate.g)
            be->matmul_backward(dxn, tl->s_gate.g, NULL, dz, s->xn, tl->s_gate.w, N, H, 1);
        tfree(m, dz);
        dso = tmp;
    }
    swiglu_backward_rows(m, dxn, &tl->s_gu, &tl->s_down, dso, s->xn, s->sgu, N, tl->Is);
    tfree(m, tmp);
}

/* Groups the N·K (token, slot) pairs per expert (moe_dispatch): s->rows,
 * s->off, s->slot (each token's slots in the router's order, so that the
 * combine's backward gives d wt in that order); the forward's combine
 * order (ascending expert id, as routed_chunk) into *slot_asc, *wt_asc. */
static void dispatch_train(moe_model *m, layer_save *s, const int32_t *idx_h, const float *wt_h,
                           int N, int E, int K, int32_t **slot_asc, float **wt_asc) {
    const moe_backend *be = m->be;
    moe_dispatch d;
    moe_dispatch_build(&d, idx_h, wt_h, N, E, K);
    size_t nk = (size_t)N * K;
    int32_t *slot_r = moe_malloc(sizeof(int32_t) * nk + 4);
    for (size_t t = 0; t < (size_t)N; t++)
        for (int k = 0; k < K; k++) {
            int rank = 0; /* position of this slot's expert among the token's, ascending */
            for (int j = 0; j < K; j++) rank += idx_h[t * K + j] < idx_h[t * K + k];
            slot_r[t * K + k] = d.slot[t * K + rank];
        }
    s->off = moe_malloc(sizeof(int32_t) * ((size_t)E + 1));
    memcpy(s->off, d.off, sizeof(int32_t) * ((size_t)E + 1));
    s->rows = mdl_alloc(m, sizeof(int32_t) * nk + 4);
    s->slot = mdl_alloc(m, sizeof(int32_t) * nk + 4);
    *slot_asc = mdl_alloc(m, sizeof(int32_t) * nk + 4);
    *wt_asc = mdl_alloc(m, sizeof(float) * nk + 4);
    be->upload(s->rows, d.tokens, sizeof(int32_t) * nk);
    be->upload(s->slot, slot_r, sizeof(int32_t) * nk);
    be->upload(*slot_asc, d.slot, sizeof(int32_t) * nk);
    be->upload(*wt_asc, d.slot_wt, sizeof(float) * nk);
    free(slot_r);
    moe_dispatch_free(&d);
}

/* The grouped experts' forward expert by expert, keeping every row's gate|up
 * in s->egu for the backward, which would otherwise recompute them (one GEMM
 * of three per expert: 8% of a training step's FLOPs on bench/tune.sh's
 * model).  The products are the backward's recomputing ones (be->matmul on
 * the gathered rows), so the gradients are the same bits either way.  Only
 * where memory is the host's: a GPU's grouped GEMM beats per-expert calls,
 * and there the recompute is cheap against the memory it saves. */
static void experts_keep_gu(moe_model *m, const train_layer *tl, layer_save *s, int Im) {
    const moe_backend *be = m->be;
    int H = m->cfg->hidden_size;
    s->egu = tbuf_out(m, (size_t)s->off[tl->ne] * 2 * Im);
    for (int e = 0; e < tl->ne; e++) {
        int r0 = s->off[e], n = s->off[e + 1] - r0;
        if (n == 0) continue;
        float *xe = tbuf_out(m, (size_t)n * H), *h = tbuf_out(m, (size_t)n * Im);
        float *gu = s->egu + (size_t)r0 * 2 * Im;
        be->gather_rows(xe, s->xn, s->rows + r0, n, H);
        be->matmul(gu, xe, tl->e_gu[e].w, NULL, n, H, 2 * Im, 0);
        be->swiglu(h, gu, n, Im);
        be->matmul(s->out + (size_t)r0 * H, h, tl->e_down[e].w, NULL, n, Im, H, 0);
        tfree(m, xe);
        tfree(m, h);
    }
}

/* y = Σ_k wt_k·Expert_{idx_k}(xn) for the grouped pairs; the outputs kept */
static void experts_combine(moe_model *m, const train_layer *tl, layer_save *s, float *y,
                            const int32_t *idx_h, const float *wt_h, int N, int Im) {
    const moe_backend *be = m->be;
    int H = m->cfg->hidden_size, E = tl->ne, K = s->K;
    int32_t *slot_asc;
    float *wt_asc;
    dispatch_train(m, s, idx_h, wt_h, N, E, K, &slot_asc, &wt_asc);
    const void **wg = moe_calloc((size_t)E + 1, sizeof(void *));
    const void **wd = moe_calloc((size_t)E + 1, sizeof(void *));
    for (int e = 0; e < E; e++) {
        wg[e] = tl->e_gu[e].w;
        wd[e] = tl->e_down[e].w;
    }
    if (s->want_egu && be->host_memory) { /* every row written */
        s->out = tbuf_out(m, (size_t)N * K * H);
        experts_keep_gu(m, tl, s, Im);
    } else {
        s->out = tbuf(m, (size_t)N * K * H);
        be->experts(s->out, s->xn, s->rows, s->off, wg, wd, E, H, Im);
    }
    be->combine(y, s->out, slot_asc, wt_asc, N, K, H);
    free(wg);
    free(wd);
    tfree(m, slot_asc);
    tfree(m, wt_asc);
}

static int routed_train(moe_model *m, const train_layer *tl, layer_save *s, float *y, int N) {
    const moe_config *c = m->cfg;
    const moe_backend *be = m->be;
    int E = c->n_routed_experts, K = c->top_k, H = c->hidden_size;
    size_t nk = (size_t)N * K;
    float *lg = tbuf(m, (size_t)N * E);
    s->K = K;
    s->idx = mdl_alloc(m, sizeof(int32_t) * nk + 4);
    s->wt = tbuf(m, nk);
    s->probs = tbuf(m, (size_t)N * E);
    be->matmul(lg, s->xn, tl->router.w, NULL, N, H, E, 0);
    int mode, renorm;
    mdl_route_mode(m, &mode, &renorm);
    be->router(s->idx, s->wt, s->probs, lg, mode, renorm, N, E, K);
    if (mode != MOE_ROUTE_SOFTMAX_TOPK) be->softmax_rows(s->probs, lg, N, E); /* kernels.h: probs
                                                                   are the router's in that mode */
    tfree(m, lg);
    s->idx_h = moe_malloc(sizeof(int32_t) * nk + 4);
    s->probs_h = moe_malloc(sizeof(float) * (size_t)N * E + 4);
    float *wt_h = moe_malloc(sizeof(float) * nk + 4);
    be->download(s->idx_h, s->idx, sizeof(int32_t) * nk);
    be->download(wt_h, s->wt, sizeof(float) * nk);
    be->download(s->probs_h, s->probs, sizeof(float) * (size_t)N * E);
    int rc = moe_backend_status(be); /* the routing went to the host: check it is real */
    if (rc == 0) experts_combine(m, tl, s, y, s->idx_h, wt_h, N, c->moe_intermediate_size);
    free(wt_h);
    return rc;
}

/* a condensed layer: every token through every kept expert, fixed weights */
static int condensed_train(moe_model *m, const train_layer *tl, layer_save *s, float *y, int N) {
    const moe_backend *be = m->be;
    int n = tl->ne;
    size_t TH = (size_t)N * m->cfg->hidden_size;
    if (n == 0) {
        be->zero(y, TH * sizeof(float));
        return 0;
    }
    float *kw = moe_malloc(sizeof(float) * (size_t)n);
    be->download(kw, tl->kwt.w, sizeof(float) * (size_t)n);
    int32_t *idx = moe_malloc(sizeof(int32_t) * (size_t)N * n);
    float *wt = moe_malloc(sizeof(float) * (size_t)N * n);
    for (size_t t = 0; t < (size_t)N; t++)
        for (int i = 0; i < n; i++) {
            idx[t * n + i] = i;
            wt[t * n + i] = kw[i];
        }
    s->K = n;
    s->wt = tbuf(m, (size_t)N * n);
    be->upload(s->wt, wt, sizeof(float) * (size_t)N * n);
    experts_combine(m, tl, s, y, idx, wt, N, m->cfg->moe_intermediate_size);
    free(kw);
    free(idx);
    free(wt);
    return moe_backend_status(be);
}

int mdl_mlp_train(moe_model *m, const train_layer *tl, layer_save *s, float *x,
                  const train_rows *r) {
    const moe_config *c = m->cfg;
    const moe_backend *be = m->be;
    int H = c->hidden_size, N = (int)r->N;
    size_t TH = (size_t)N * H;
    s->xm = tbuf_out(m, TH);
    be->copy(s->xm, x, TH * sizeof(float));
    s->xn = tbuf_out(m, TH);
    be->rmsnorm(s->xn, x, tl->post_norm.w, (float)c->rms_norm_eps, N, H);
    float *y = tbuf(m, TH);
    int rc = 0;
    if (tl->kind == MOE_MLP_DENSE)
        swiglu_train(m, y, s->xn, &tl->gu, &tl->down, N, tl->I, 0, &s->gu);
    else if (tl->kind == MOE_MLP_MOE)
        rc = routed_train(m, tl, s, y, N);
    else
        rc = condensed_train(m, tl, s, y, N);
    if (rc == 0 && tl->kind != MOE_MLP_DENSE) shared_train(m, tl, s, y, N);
    if (rc == 0) be->axpy(x, y, 1.0f, TH);
    tfree(m, y);
    return rc == 0 ? moe_backend_status(be) : rc;
}

/* one expert's backward: its weight gradients added, d loss / d its gathered
 * inputs into *dxe (a new buffer) when dxe */
static void expert_backward(moe_model *m, const train_layer *tl, const layer_save *s, int e,
                            float **dxe, const float *dout) {
    const moe_backend *be = m->be;
    int H = m->cfg->hidden_size, Im = m->cfg->moe_intermediate_size;
    int r0 = s->off[e], n = s->off[e + 1] - r0;
    if (n == 0 || (!dxe && !tl->e_gu[e].g && !tl->e_down[e].g)) return;
    float *xe = tbuf_out(m, (size_t)n * H);
    if (dxe) *dxe = tbuf(m, (size_t)n * H);
    be->gather_rows(xe, s->xn, s->rows + r0, n, H);
    swiglu_backward_rows(m, dxe ? *dxe : NULL, &tl->e_gu[e], &tl->e_down[e],
                         dout + (size_t)r0 * H, xe, s->egu ? s->egu + (size_t)r0 * 2 * Im : NULL,
                         n, Im);
    tfree(m, xe);
}

/* the grouped experts' backward: the gate|up activations kept by
 * experts_keep_gu, or recomputed from the gathered inputs (the grouped op
 * keeps none: one GEMM more per expert, no [N·K, 2·Im] buffer).  On the CPU
 * the experts run concurrently, one per thread (their products are a few
 * hundred rows: split into the backward's fixed tiles they made one or two
 * tasks, and one core idled); the ops are thread-count invariant, every
 * expert has its own gradients, and the inputs' gradients are added in
 * expert order after, so the bits are those of one expert after another. */
static void experts_backward(moe_model *m, const train_layer *tl, const layer_save *s, float *dxn,
                             const float *dout) {
    const moe_backend *be = m->be;
    int H = m->cfg->hidden_size;
    float **dxe = moe_calloc((size_t)tl->ne + 1, sizeof *dxe);
#pragma omp parallel for schedule(dynamic, 1) if (be->host_memory && tl->ne > 1)
    for (int e = 0; e < tl->ne; e++) expert_backward(m, tl, s, e, dxn ? &dxe[e] : NULL, dout);
    for (int e = 0; e < tl->ne; e++) {
        if (!dxe[e]) continue;
        int r0 = s->off[e];
        be->scatter_add_rows(dxn, dxe[e], s->rows + r0, NULL, s->off[e + 1] - r0, H);
        tfree(m, dxe[e]);
    }
    free(dxe);
}

/* d fixed weight_i = Σ_t dwt_ti, summed on the host in token order (n·N values) */
static void condensed_weights_backward(moe_model *m, const train_layer *tl, const float *dwt,
                                       int N) {
    const moe_backend *be = m->be;
    int n = tl->ne;
    float *h = moe_malloc(sizeof(float) * (size_t)N * n + 4);
    float *g = moe_malloc(sizeof(float) * (size_t)n + 4);
    be->download(h, dwt, sizeof(float) * (size_t)N * n);
    be->download(g, tl->kwt.g, sizeof(float) * (size_t)n);
    for (int i = 0; i < n; i++) {
        double acc = 0;
        for (size_t t = 0; t < (size_t)N; t++) acc += h[t * n + i];
        g[i] += (float)acc;
    }
    be->upload(tl->kwt.g, g, sizeof(float) * (size_t)n);
    free(h);
    free(g);
}

/* routed or condensed experts (+ router): dxn += (when dxn), gradients added */
static void expert_mlp_backward(moe_model *m, const train_layer *tl, const layer_save *s,
                                float *dxn, const float *dy, const float *dprobs, int N) {
    const moe_config *c = m->cfg;
    const moe_backend *be = m->be;
    int H = c->hidden_size, K = s->K, E = c->n_routed_experts;
    if (tl->ne == 0 || !s->out) return;
    int routed = tl->kind == MOE_MLP_MOE;
    int want_dwt = routed ? (dxn || tl->router.g) : tl->kwt.g != NULL;
    float *dout = tbuf(m, (size_t)N * K * H), *dwt = want_dwt ? tbuf(m, (size_t)N * K) : NULL;
    be->combine_backward(dout, dwt, dy, s->out, s->slot, s->wt, N, K, H);
    experts_backward(m, tl, s, dxn, dout);
    if (routed && want_dwt) {
        int mode, renorm;
        mdl_route_mode(m, &mode, &renorm);
        float *dlg = tbuf(m, (size_t)N * E);
        be->router_backward(dlg, dwt, dprobs, s->idx, s->wt, s->probs, mode, renorm, N, E, K);
        be->matmul_backward(dxn, tl->router.g, NULL, dlg, s->xn, tl->router.w, N, H, E);
        tfree(m, dlg);
    } else if (want_dwt) {
        condensed_weights_backward(m, tl, dwt, N);
    }
    tfree(m, dout);
    tfree(m, dwt);
}

int mdl_mlp_backward(moe_model *m, const train_layer *tl, const layer_save *s, float *dx,
                     const float *dprobs, int need_dx, const train_rows *r) {
    const moe_config *c = m->cfg;
    const moe_backend *be = m->be;
    int H = c->hidden_size, N = (int)r->N;
    size_t TH = (size_t)N * H;
    float *dxn = need_dx || tl->post_norm.g ? tbuf(m, TH) : NULL;
    if (tl->kind == MOE_MLP_DENSE)
        swiglu_backward_rows(m, dxn, &tl->gu, &tl->down, dx, s->xn, s->gu, N, tl->I);
    else
        expert_mlp_backward(m, tl, s, dxn, dx, dprobs, N);
    if (tl->kind != MOE_MLP_DENSE) shared_backward(m, tl, s, dxn, dx, N);
    if (dxn) { /* x_out = x_mid + MLP(RMSNorm(x_mid)): dx += the norm's backward */
        float *dxo = need_dx ? dx : tbuf(m, TH);
        be->rmsnorm_backward(dxo, tl->post_norm.g, dxn, s->xm, tl->post_norm.w,
                             (float)c->rms_norm_eps, N, H);
        if (dxo != dx) tfree(m, dxo);
        tfree(m, dxn);
    }
    return moe_backend_status(be);
}

void mdl_save_free(moe_model *m, layer_save *s, int keep_input) {
    void *ps[] = {s->xa, s->ql, s->kl, s->q, s->k, s->v, s->att, s->xm, s->xn, s->gu, s->sgu,
                  s->so, s->z, s->out, s->egu, s->rows, s->slot, s->wt, s->idx, s->probs};
    for (size_t i = 0; i < sizeof ps / sizeof *ps; i++) tfree(m, ps[i]);
    free(s->off);
    free(s->idx_h);
    free(s->probs_h);
    layer_save keep = {0};
    if (keep_input) /* recompute: the layer input alone */
        keep.x = s->x;
    else
        tfree(m, s->x);
    *s = keep;
}

/* ---- final norm, lm_head and the cross-entropy ---------------------------------- */

/* loss[t] = CE(RMSNorm_final(x_t)·W_lmᵀ, tg_t) for N rows (host); with dx:
 * the backward too, dx = d (dscale·Σ loss) / d x (written), the gradients
 * of the final norm and lm_head added.  Rows in chunks of logits of at most
 * 64 MiB (fixed: results do not depend on the thread count). */
int mdl_head_loss(moe_model *m, const tparam *fn, const tparam *lm, const float *x,
                  const int32_t *tg, int N, float dscale, float *loss, float *dx) {
    const moe_config *c = m->cfg;
    const moe_backend *be = m->be;
    int H = c->hidden_size, V = c->vocab_size;
    float eps = (float)c->rms_norm_eps;
    int chunk = (int)(((size_t)16 << 20) / (size_t)V);
    if (chunk < 1) chunk = 1;
    if (chunk > N) chunk = N;
    float *xf = tbuf_out(m, (size_t)N * H), *lg = tbuf_out(m, (size_t)chunk * V);
    float *lrow = tbuf_out(m, (size_t)N);
    float *dxf = dx ? tbuf(m, (size_t)N * H) : NULL;
    be->rmsnorm(xf, x, fn->w, eps, N, H);
    for (int r0 = 0; r0 < N; r0 += chunk) {
        int nr = N - r0 < chunk ? N - r0 : chunk;
        const float *xr = xf + (size_t)r0 * H;
        be->matmul(lg, xr, lm->w, NULL, nr, H, V, 0);
        be->cross_entropy(lrow + r0, dx ? lg : NULL, lg, tg + r0, dscale, nr, V);
        if (dx) be->matmul_backward(dxf + (size_t)r0 * H, lm->g, NULL, lg, xr, lm->w, nr, H, V);
    }
    if (dx) {
        be->zero(dx, sizeof(float) * (size_t)N * H);
        be->rmsnorm_backward(dx, fn->g, dxf, x, fn->w, eps, N, H);
    }
    be->download(loss, lrow, sizeof(float) * (size_t)N);
    tfree(m, xf);
    tfree(m, lg);
    tfree(m, lrow);
    tfree(m, dxf);
    return moe_backend_status(be);
}

/* logits of N rows into host memory (the trainer's weights; tests) */
int mdl_head_logits(moe_model *m, const tparam *fn, const tparam *lm, const float *x, int N,
                    float *logits) {
    const moe_config *c = m->cfg;
    int H = c->hidden_size, V = c->vocab_size;
    float *xf = tbuf_out(m, (size_t)N * H), *lg = tbuf_out(m, (size_t)N * V);
    m->be->rmsnorm(xf, x, fn->w, (float)c->rms_norm_eps, N, H);
    m->be->matmul(lg, xf, lm->w, NULL, N, H, V, 0);
    m->be->download(logits, lg, sizeof(float) * (size_t)N * V);
    tfree(m, xf);
    tfree(m, lg);
    return moe_backend_status(m->be);
}
