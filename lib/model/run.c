/* run.c - layer-major runs over a batch of sequences: the batch, the
 * residency rule, the runner (moe_run_layers) and moe_model_forward on top
 * of it.  Every layer-major loop of the library (the forward, the searches,
 * the evaluation) goes through moe_run_layers or, for the layer search's
 * candidate streams, through its residency calls.  See model.h. */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

#include "common.h"

/* ---- the batch ------------------------------------------------------------------ */

void moe_batch_init(moe_batch *b, int n, const int32_t *const *ids, const int *T, int max_len) {
    b->n = n;
    b->ids = moe_calloc((size_t)n + 1, sizeof *b->ids);
    b->T = moe_calloc((size_t)n + 1, sizeof *b->T);
    b->off = moe_malloc(sizeof(size_t) * (size_t)(n + 1));
    b->tot = 0;
    for (int i = 0; i < n; i++) {
        b->ids[i] = ids[i];
        b->T[i] = max_len > 0 && T[i] > max_len ? max_len : T[i];
        b->off[i] = b->tot;
        b->tot += (size_t)b->T[i];
    }
    b->off[n] = b->tot;
    b->seq = moe_malloc(sizeof(int) * (b->tot + 1));
    for (int i = 0; i < n; i++)
        for (size_t t = b->off[i]; t < b->off[i + 1]; t++) b->seq[t] = i;
}

void moe_batch_of_seqs(moe_batch *b, const moe_seq *seqs, int n) {
    const int32_t **ids = moe_malloc(sizeof *ids * (size_t)(n + 1));
    int *T = moe_malloc(sizeof(int) * (size_t)(n + 1));
    for (int s = 0; s < n; s++) {
        ids[s] = seqs[s].ids;
        T[s] = seqs[s].T;
    }
    moe_batch_init(b, n, ids, T, 0);
    free(ids);
    free(T);
}

void moe_batch_free(moe_batch *b) {
    free(b->ids);
    free(b->T);
    free(b->off);
    free(b->seq);
    memset(b, 0, sizeof *b);
}

int moe_batch_embed(moe_model *m, const moe_batch *b, float *x) {
    size_t H = (size_t)m->cfg->hidden_size;
    for (int s = 0; s < b->n; s++)
        if (moe_model_embed(m, x + b->off[s] * H, b->ids[s], b->T[s]) < 0) return -1;
    return 0;
}

/* ---- residency ------------------------------------------------------------------ */

int moe_layer_loaded(const moe_model *m, int l) {
    return l >= 0 && l < m->cfg->num_layers && m->lw[l].loaded;
}

int moe_model_fits(moe_model *m) {
    const moe_backend *be = m->be;
    uint64_t bytes = moe_ckpt_bytes(m->ck);
    size_t fr = 0, tot = 0;
    if (!be->host_memory && be->mem_info) be->mem_info(&fr, &tot);
    if (fr) return bytes <= fr / 3;
    return bytes * 2 <= ((uint64_t)2 << 30);
}

void moe_residency_init(moe_residency *r, moe_model *m, int keep) {
    r->m = m;
    r->keep = keep;
    r->ours = moe_calloc((size_t)m->cfg->num_layers + 1, 1);
    r->loads = 0;
}

void moe_residency_free(moe_residency *r) {
    if (!r->ours) return;
    if (!r->keep)
        for (int l = 0; l < r->m->cfg->num_layers; l++)
            if (r->ours[l]) moe_layer_unload(r->m, l);
    free(r->ours);
    r->ours = NULL;
}

int moe_residency_use(moe_residency *r, int l) {
    if (mdl_check_layer(r->m, l) < 0) return -1;
    if (!moe_layer_loaded(r->m, l)) {
        r->ours[l] = 1;
        r->loads++;
    }
    return moe_layer_load(r->m, l);
}

void moe_residency_done(moe_residency *r, int l) {
    if (r->keep || l < 0 || l >= r->m->cfg->num_layers || !r->ours[l]) return;
    moe_layer_unload(r->m, l);
    r->ours[l] = 0;
}

int moe_residency_prefetch(moe_residency *r, int l) {
    if (l < 0 || l >= r->m->cfg->num_layers || moe_layer_loaded(r->m, l)) return 0;
    int rc = moe_layer_prefetch(r->m, l);
    if (moe_layer_loaded(r->m, l)) { /* device backends load ahead; the CPU at use */
        r->ours[l] = 1;
        r->loads++;
    }
    return rc;
}

/* ---- the runner ----------------------------------------------------------------- */

int moe_run_layer(moe_model *m, const moe_batch *b, int l, float *x, float *xn, float *y,
                     const moe_run_hooks *h) {
    size_t H = (size_t)m->cfg->hidden_size;
    moe_drop_kind drop = moe_model_layer_drop(m, l);
    if (drop == MOE_DROP_BLOCK) return 0; /* BlockDrop: x passes unchanged */
    int rc = 0;
    if (h && h->attention)
        rc = h->attention(h->ctx, l, x);
    else
        for (int s = 0; s < b->n && rc == 0; s++)
            rc = moe_layer_attention(m, l, x + b->off[s] * H, b->T[s]);
    if (drop == MOE_DROP_MLP) return rc; /* LayerDrop: x = x + Attn(...) only */
    if (rc == 0) rc = moe_layer_mlp_input(m, l, xn, x, (int)b->tot);
    if (rc == 0)
        rc = moe_layer_mlp_run(m, l, y, xn, (int)b->tot, h ? h->router : NULL,
                               h ? h->router_ctx : NULL);
    if (rc == 0 && h && h->mlp_out) rc = h->mlp_out(h->ctx, l, x, xn, y);
    if (rc == 0) m->be->axpy(x, y, 1.0f, b->tot * H);
    return rc;
}

int moe_run_layers(moe_model *m, const moe_batch *b, int from, int to, float *x, float *xn,
                   float *y, moe_residency *r, const moe_run_hooks *h) {
    size_t TH = b->tot * (size_t)m->cfg->hidden_size;
    float *xn_own = xn ? NULL : moe_model_alloc(m, TH), *y_own = y ? NULL : moe_model_alloc(m, TH);
    if (!xn) xn = xn_own;
    if (!y) y = y_own;
    int rc = 0;
    for (int l = from; l < to && rc == 0; l++) {
        if (h && h->before) rc = h->before(h->ctx, l, x);
        if (rc == 0) rc = moe_residency_use(r, l);
        if (rc == 0) rc = moe_run_layer(m, b, l, x, xn, y, h);
        moe_residency_done(r, l);
        /* device: stage layer l+1 and queue its copies while the device still
         * runs layer l's experts (before anything waits for the device) */
        if (rc == 0 && l + 1 < to) rc = moe_residency_prefetch(r, l + 1);
        if (rc == 0) rc = moe_backend_status(m->be); /* a device error ends the pass here */
        if (rc == 0 && h && h->after) rc = h->after(h->ctx, l, x);
    }
    if (xn_own) moe_model_free(m, xn_own);
    if (y_own) moe_model_free(m, y_own);
    return rc;
}

/* ---- the whole model ------------------------------------------------------------ */

typedef struct {
    moe_model *m;
    moe_seq *seqs;
    const moe_batch *b;
} hidden_out;

/* hidden_states[i] of sequence s */
static float *hidden_of(const hidden_out *o, int s, int i) {
    return o->seqs[s].hidden + (size_t)i * o->seqs[s].T * o->m->cfg->hidden_size;
}

/* the hidden states the caller asked for: x after layer l is entry l + 1
 * (the last layer's goes out after the final norm, below) */
static int download_hidden(void *ctx, int l, float *x) {
    const hidden_out *o = ctx;
    size_t H = (size_t)o->m->cfg->hidden_size;
    if (l + 1 >= o->m->cfg->num_layers) return 0;
    for (int s = 0; s < o->b->n; s++)
        if (o->seqs[s].hidden)
            o->m->be->download(hidden_of(o, s, l + 1), x + o->b->off[s] * H,
                               sizeof(float) * (size_t)o->seqs[s].T * H);
    return 0;
}

/* x_0 from the ids (hidden[0] out), or hidden[start] in (a restart) */
static int forward_input(const hidden_out *o, int start, float *x) {
    size_t H = (size_t)o->m->cfg->hidden_size;
    int rc = 0;
    for (int s = 0; s < o->b->n && rc == 0; s++) {
        float *xs = x + o->b->off[s] * H;
        size_t nb = sizeof(float) * (size_t)o->seqs[s].T * H;
        if (start == 0) {
            rc = moe_model_embed(o->m, xs, o->seqs[s].ids, o->seqs[s].T);
            if (rc == 0 && o->seqs[s].hidden) o->m->be->download(hidden_of(o, s, 0), xs, nb);
        } else {
            o->m->be->upload(xs, hidden_of(o, s, start), nb);
        }
    }
    return rc;
}

/* logits of all sequences that want them, lm_head converted once */
static int forward_logits(const hidden_out *o, float *x) {
    moe_model *m = o->m;
    const moe_batch *b = o->b;
    size_t H = (size_t)m->cfg->hidden_size, nl = 0;
    for (int s = 0; s < b->n; s++)
        if (o->seqs[s].logits) nl += (size_t)b->T[s];
    if (nl == 0) return 0;
    float *xl = x;
    if (nl != b->tot) { /* gather the rows of those sequences */
        xl = moe_model_alloc(m, nl * H);
        size_t r = 0;
        for (int s = 0; s < b->n; s++)
            if (o->seqs[s].logits) {
                m->be->copy(xl + r * H, x + b->off[s] * H, sizeof(float) * (size_t)b->T[s] * H);
                r += (size_t)b->T[s];
            }
    }
    float **rows = moe_malloc(sizeof(float *) * (b->tot + 1));
    size_t r = 0;
    for (int s = 0; s < b->n; s++)
        if (o->seqs[s].logits)
            for (int i = 0; i < b->T[s]; i++)
                rows[r++] = o->seqs[s].logits + (size_t)i * m->cfg->vocab_size;
    int rc = mdl_lm_head_to_rows(m, xl, (int)nl, rows, 1);
    if (xl != x) moe_model_free(m, xl);
    free(rows);
    return rc;
}

static int check_seqs(const moe_model *m, const moe_seq *seqs, int n, int start_layer) {
    int L = m->cfg->num_layers;
    if (start_layer < 0 || start_layer > L) {
        moe_error_set(MOE_ERR_DATA, "%s: start layer %d out of range (0..%d)", moe_ckpt_dir(m->ck),
                      start_layer, L);
        return -1;
    }
    for (int s = 0; s < n; s++)
        if (seqs[s].T <= 0 || (start_layer > 0 && !seqs[s].hidden)) {
            moe_error_set(MOE_ERR_DATA, "%s: sequence %d: %s", moe_ckpt_dir(m->ck), s,
                          seqs[s].T <= 0 ? "empty" : "restart needs its cached hidden state");
            return -1;
        }
    return 0;
}

int moe_model_forward(moe_model *m, moe_seq *seqs, int n, int start_layer, moe_router_fn cb,
                      void *ctx) {
    int L = m->cfg->num_layers;
    size_t H = (size_t)m->cfg->hidden_size;
    if (check_seqs(m, seqs, n, start_layer) < 0) return -1;
    moe_batch b;
    moe_batch_of_seqs(&b, seqs, n);
    hidden_out o = {m, seqs, &b};
    float *x = moe_model_alloc(m, b.tot * H);
    int rc = forward_input(&o, start_layer, x);
    moe_residency r; /* layers loaded before the call stay loaded */
    moe_residency_init(&r, m, 0);
    moe_run_hooks h = {.ctx = &o, .after = download_hidden, .router = cb, .router_ctx = ctx};
    if (rc == 0) rc = moe_run_layers(m, &b, start_layer, L, x, NULL, NULL, &r, &h);
    moe_residency_free(&r);
    mdl_trim_scratch(m); /* the layers' scratch is not needed by lm_head */
    if (rc == 0 && start_layer < L) {
        moe_model_final_norm(m, x, x, (int)b.tot);
        for (int s = 0; s < n; s++)
            if (seqs[s].hidden)
                m->be->download(hidden_of(&o, s, L), x + b.off[s] * H,
                                sizeof(float) * (size_t)b.T[s] * H);
    }
    if (rc == 0) rc = forward_logits(&o, x);
    if (rc == 0) rc = moe_backend_status(m->be); /* before the caller reads any output */
    moe_model_free(m, x);
    moe_batch_free(&b);
    return rc;
}
