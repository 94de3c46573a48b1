/* train.c - the trainer (lib/train.h): float32 master weights and gradients
 * of the trained tensors, the compute copies the forward uses, the training
 * forward over a batch of sequences keeping what the backward needs, the
 * loss (cross-entropy, and the architecture's load-balancing loss for
 * MOE_TRAIN_ALL), and the backward from the loss down to the lowest trained
 * layer.  The pieces' forward and backward are forward.c's (mdl_*_train,
 * mdl_*_backward); this file holds the weights and runs the layers.
 *
 * Residency: every layer's weights stay in backend memory for the trainer's
 * life (trained ones as master + gradient + compute copy, frozen ones as the
 * inference path loads them); the model's own layer cache is not used. */
#include "train.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "internal.h"

struct moe_trainer {
    moe_model *m;
    const moe_config *c;
    const moe_backend *be;
    moe_train_opts o;
    int *layer_set;     /* [L] MOE_TRAIN_LAYERS: 1 for the listed layers */
    train_layer *tl;    /* [L] */
    tparam emb, fnorm, lm; /* emb.w NULL when frozen (rows come from the checkpoint) */
    int lm_is_emb;      /* tied and trained: lm is emb */
    int lowest;         /* lowest layer with a trained weight; -1: the embedding; L: none */
    moe_param *p;
    int np, capp;
    tparam **trained;   /* the trained tparams (for sync) */
    int ntrained, captrained;
    double aux_coef;
    int seq_aux;        /* deepseek: the balance per sequence */
    float *dx0;         /* input_grad: d loss / d x_0 of the last backward [N, H] */
    size_t *dx0_off;
    int dx0_n;
};

/* ---- which tensors are trained ------------------------------------------------ */

/* the Linears of an MLP: dense, routed experts, shared experts (qwen2_moe's
 * shared_expert_gate included: a Linear of the shared expert's branch, as
 * the PyTorch fixtures, tests/fixtures/train, train it); not the router */
static int is_mlp_linear(moe_tensor_kind k) {
    return k == MOE_T_MLP_GATE || k == MOE_T_MLP_UP || k == MOE_T_MLP_DOWN ||
           k == MOE_T_EXPERT_GATE || k == MOE_T_EXPERT_UP || k == MOE_T_EXPERT_DOWN ||
           k == MOE_T_SHARED_GATE || k == MOE_T_SHARED_UP || k == MOE_T_SHARED_DOWN ||
           k == MOE_T_SHARED_EXPERT_GATE;
}

static int is_trained(const moe_trainer *tr, int l, moe_tensor_kind k) {
    switch (tr->o.set) {
    case MOE_TRAIN_ALL:
        return 1;
    case MOE_TRAIN_CONDENSED:
        return l >= 0 && moe_model_layer_kind(tr->m, l) == MOE_MLP_CONDENSED && is_mlp_linear(k);
    case MOE_TRAIN_LAYERS:
        return l >= 0 && tr->layer_set[l] && is_mlp_linear(k);
    }
    return 0;
}

static int weights_trained(const moe_trainer *tr, int l) {
    return tr->o.train_weights && moe_model_layer_kind(tr->m, l) == MOE_MLP_CONDENSED &&
           (tr->o.set == MOE_TRAIN_ALL || is_trained(tr, l, MOE_T_EXPERT_GATE));
}

static int is_vector(moe_tensor_kind k) {
    return k == MOE_T_INPUT_NORM || k == MOE_T_POST_NORM || k == MOE_T_Q_BIAS ||
           k == MOE_T_K_BIAS || k == MOE_T_V_BIAS || k == MOE_T_Q_NORM || k == MOE_T_K_NORM ||
           k == MOE_T_FINAL_NORM;
}

/* ---- parameters ---------------------------------------------------------------- */

static void add_param(moe_trainer *tr, const char *name, int l, int nd, const int64_t *sh,
                      float *w, float *g) {
    if (tr->np == tr->capp) {
        tr->capp = tr->capp ? 2 * tr->capp : 64;
        tr->p = moe_realloc(tr->p, sizeof *tr->p * (size_t)tr->capp);
    }
    moe_param *p = &tr->p[tr->np++];
    p->name = moe_strdup(name);
    p->layer = l;
    p->ndim = nd;
    p->shape[0] = sh[0];
    p->shape[1] = nd > 1 ? sh[1] : 1;
    p->n = (size_t)p->shape[0] * (size_t)p->shape[1];
    p->w = w;
    p->g = g;
}

static int add_tensor_param(moe_trainer *tr, int l, moe_tensor_kind k, int e, float *w, float *g) {
    char name[MOE_TENSOR_NAME_MAX];
    int64_t sh[2];
    int nd = moe_config_tensor_shape(tr->c, l, k, sh);
    if (nd < 0 || moe_config_tensor_name(tr->c, l, k, e, name, sizeof name) < 0) return -1;
    add_param(tr, name, l, nd, sh, w, g);
    return 0;
}

static void push_trained(moe_trainer *tr, tparam *p) {
    if (tr->ntrained == tr->captrained) {
        tr->captrained = tr->captrained ? 2 * tr->captrained : 64;
        tr->trained = moe_realloc(tr->trained, sizeof *tr->trained * (size_t)tr->captrained);
    }
    tr->trained[tr->ntrained++] = p;
}

/* the master (already in p->m, n floats) gets its gradient and compute copy */
static void make_trained(moe_trainer *tr, tparam *p, size_t n, int vec) {
    moe_model *m = tr->m;
    p->n = n;
    p->g = moe_model_alloc(m, n);
    if (vec || tr->be->weight_dtype == MOE_DT_F32) {
        p->w = p->m;
    } else {
        p->w = mdl_alloc(m, n * mdl_wsz(m) + 4);
        tr->be->to_weight_dtype(p->w, p->m, n);
    }
    push_trained(tr, p);
}

/* Checkpoint tensor k of layer l (expert e), or with ku >= 0 the pair k, ku
 * stacked (gate|up), as a tparam: trained (float32 master, gradient, compute
 * copy; parameters named after the Hugging Face tensors) or frozen (loaded
 * as the inference path loads it).  0 or -1. */
static int tp_load(moe_trainer *tr, tparam *p, int l, moe_tensor_kind k, int ku, int e,
                   int trained) {
    moe_model *m = tr->m;
    int64_t sh[2];
    int nd = moe_config_tensor_shape(tr->c, l, k, sh);
    if (nd < 0) return -1;
    size_t n1 = nd == 1 ? (size_t)sh[0] : (size_t)sh[0] * (size_t)sh[1];
    size_t n = ku >= 0 ? 2 * n1 : n1;
    int vec = is_vector(k);
    p->n = n;
    if (!trained) {
        p->w = vec        ? (void *)mdl_load_vec(m, l, k)
               : ku >= 0 ? mdl_load_gate_up(m, l, k, (moe_tensor_kind)ku, e, n1)
                         : mdl_load_mat(m, l, k, e);
        return p->w ? 0 : -1;
    }
    float *h = moe_malloc(sizeof(float) * n + 4);
    const moe_ckpt *ck = moe_model_ckpt(m);
    if (moe_ckpt_read_f32(ck, l, k, e, h) < 0 ||
        (ku >= 0 && moe_ckpt_read_f32(ck, l, (moe_tensor_kind)ku, e, h + n1) < 0)) {
        free(h);
        return -1;
    }
    p->m = mdl_alloc(m, sizeof(float) * n + 4);
    tr->be->upload(p->m, h, sizeof(float) * n);
    free(h);
    make_trained(tr, p, n, vec);
    if (add_tensor_param(tr, l, k, e, p->m, p->g) < 0) return -1;
    if (ku >= 0 && add_tensor_param(tr, l, (moe_tensor_kind)ku, e, p->m + n1, p->g + n1) < 0)
        return -1;
    return 0;
}

static void tp_free(moe_model *m, tparam *p) {
    if (p->m) {
        if (p->w != p->m) mdl_free(m, p->w);
        mdl_free(m, p->m);
        mdl_free(m, p->g);
    } else {
        mdl_free(m, p->w);
    }
    memset(p, 0, sizeof *p);
}

/* ---- loading the layers ---------------------------------------------------------- */

#define TRY(x)                                                                                     \
    do {                                                                                           \
        if ((x) < 0) return -1;                                                                    \
    } while (0)

static int load_attention(moe_trainer *tr, int l, train_layer *t) {
    const moe_config *c = tr->c;
#define LD(field, kind) TRY(tp_load(tr, &t->field, l, kind, -1, -1, is_trained(tr, l, kind)))
    LD(in_norm, MOE_T_INPUT_NORM);
    LD(wq, MOE_T_Q_PROJ);
    LD(wk, MOE_T_K_PROJ);
    LD(wv, MOE_T_V_PROJ);
    LD(wo, MOE_T_O_PROJ);
    if (c->qkv_bias) {
        LD(bq, MOE_T_Q_BIAS);
        LD(bk, MOE_T_K_BIAS);
        LD(bv, MOE_T_V_BIAS);
    }
    if (c->qk_norm != MOE_QK_NORM_NONE) {
        LD(qn, MOE_T_Q_NORM);
        LD(kn, MOE_T_K_NORM);
    }
    if (t->drop != MOE_DROP_MLP) LD(post_norm, MOE_T_POST_NORM); /* LayerDrop: no MLP, no norm */
#undef LD
    return 0;
}

static int load_gate_up_down(moe_trainer *tr, int l, tparam *gu, tparam *down, moe_tensor_kind kg,
                             moe_tensor_kind ku, moe_tensor_kind kd, int e) {
    TRY(tp_load(tr, gu, l, kg, (int)ku, e, is_trained(tr, l, kg)));
    return tp_load(tr, down, l, kd, -1, e, is_trained(tr, l, kd));
}

/* the fixed weights of condensed layer l as a float32 vector (a parameter
 * "condensed_layers.<l>.weights" with train_weights) */
static int load_kept_weights(moe_trainer *tr, int l, train_layer *t) {
    int nk;
    const int *ex;
    const float *wt;
    mdl_condensed_list(tr->m, l, &nk, &ex, &wt);
    size_t n = (size_t)nk;
    t->kwt.n = n;
    t->kwt.m = mdl_alloc(tr->m, sizeof(float) * n + 4);
    tr->be->upload(t->kwt.m, wt, sizeof(float) * n);
    if (!weights_trained(tr, l)) {
        t->kwt.w = t->kwt.m;
        t->kwt.m = NULL;
        return 0;
    }
    make_trained(tr, &t->kwt, n, 1);
    char name[64];
    snprintf(name, sizeof name, "condensed_layers.%d.weights", l);
    int64_t sh[2] = {(int64_t)n, 1};
    add_param(tr, name, l, 1, sh, t->kwt.m, t->kwt.g);
    return 0;
}

static int load_experts(moe_trainer *tr, int l, train_layer *t) {
    const moe_config *c = tr->c;
    const moe_layer_mlp *d = &c->layers[l];
    int cond = t->kind == MOE_MLP_CONDENSED, nk = 0;
    const float *wt;
    if (cond) mdl_condensed_list(tr->m, l, &nk, &t->kept, &wt);
    t->ne = cond ? nk : c->n_routed_experts;
    t->e_gu = moe_calloc((size_t)t->ne + 1, sizeof(tparam));
    t->e_down = moe_calloc((size_t)t->ne + 1, sizeof(tparam));
    if (!cond) TRY(tp_load(tr, &t->router, l, MOE_T_ROUTER, -1, -1, is_trained(tr, l, MOE_T_ROUTER)));
    for (int i = 0; i < t->ne; i++)
        TRY(load_gate_up_down(tr, l, &t->e_gu[i], &t->e_down[i], MOE_T_EXPERT_GATE, MOE_T_EXPERT_UP,
                              MOE_T_EXPERT_DOWN, cond ? t->kept[i] : i));
    if (cond) TRY(load_kept_weights(tr, l, t));
    if (d->has_shared && c->shared_intermediate_size > 0) {
        t->Is = c->shared_intermediate_size;
        TRY(load_gate_up_down(tr, l, &t->s_gu, &t->s_down, MOE_T_SHARED_GATE, MOE_T_SHARED_UP,
                              MOE_T_SHARED_DOWN, -1));
        if (c->shared_gate)
            TRY(tp_load(tr, &t->s_gate, l, MOE_T_SHARED_EXPERT_GATE, -1, -1,
                        is_trained(tr, l, MOE_T_SHARED_EXPERT_GATE)));
    }
    return 0;
}

static int load_layer(moe_trainer *tr, int l) {
    train_layer *t = &tr->tl[l];
    t->kind = moe_model_layer_kind(tr->m, l); /* a run-time condensed or dropped layer too */
    t->drop = moe_model_layer_drop(tr->m, l);
    if (t->drop == MOE_DROP_BLOCK) return 0; /* BlockDrop: the layer has no tensors */
    TRY(load_attention(tr, l, t));
    if (t->drop == MOE_DROP_MLP) { /* LayerDrop: attention only */
    } else if (t->kind == MOE_MLP_DENSE) {
        t->I = moe_config_dense_width(tr->c, l);
        TRY(load_gate_up_down(tr, l, &t->gu, &t->down, MOE_T_MLP_GATE, MOE_T_MLP_UP,
                              MOE_T_MLP_DOWN, -1));
    } else {
        TRY(load_experts(tr, l, t));
    }
    if (!tr->m->borrow) moe_ckpt_release_layer((moe_ckpt *)moe_model_ckpt(tr->m), l);
    return 0;
}

static void free_layer(moe_model *m, train_layer *t) {
    tparam *ps[] = {&t->in_norm, &t->post_norm, &t->wq, &t->wk, &t->wv, &t->wo, &t->bq, &t->bk,
                    &t->bv, &t->qn, &t->kn, &t->gu, &t->down, &t->router, &t->kwt, &t->s_gu,
                    &t->s_down, &t->s_gate};
    for (size_t i = 0; i < sizeof ps / sizeof *ps; i++) tp_free(m, ps[i]);
    for (int i = 0; t->e_gu && i < t->ne; i++) {
        tp_free(m, &t->e_gu[i]);
        tp_free(m, &t->e_down[i]);
    }
    free(t->e_gu);
    free(t->e_down);
}

/* embedding (trained: its master; frozen: rows read from the checkpoint),
 * final norm, lm_head (tied and trained: the embedding's parameter) */
static int load_globals(moe_trainer *tr) {
    int all = tr->o.set == MOE_TRAIN_ALL;
    if (all) TRY(tp_load(tr, &tr->emb, -1, MOE_T_EMBED, -1, -1, 1));
    TRY(tp_load(tr, &tr->fnorm, -1, MOE_T_FINAL_NORM, -1, -1, all));
    if (all && tr->c->tie_word_embeddings) {
        tr->lm = tr->emb;
        tr->lm_is_emb = 1;
        return 0;
    }
    return tp_load(tr, &tr->lm, -1, MOE_T_LM_HEAD, -1, -1, all);
}
#undef TRY

/* ---- the load-balancing loss's settings (config.json) ------------------------------ */

/* Hugging Face's coefficient (router_aux_loss_coef; deepseek: aux_loss_alpha
 * and seq_aux), with the configuration classes' defaults when absent */
static void read_aux_config(moe_trainer *tr) {
    const moe_config *c = tr->c;
    int ds = c->arch->id == MOE_ARCH_DEEPSEEK;
    tr->aux_coef = c->arch->id == MOE_ARCH_OLMOE ? 0.01 : 0.001;
    tr->seq_aux = ds;
    json_error_t je;
    json_t *root = c->path && *c->path ? json_load_file(c->path, 0, &je) : NULL;
    json_t *v = root ? json_object_get(root, ds ? "aux_loss_alpha" : "router_aux_loss_coef") : NULL;
    if (json_is_number(v)) tr->aux_coef = json_number_value(v);
    v = root && ds ? json_object_get(root, "seq_aux") : NULL;
    if (json_is_boolean(v)) tr->seq_aux = json_is_true(v);
    json_decref(root);
    if (tr->o.aux_coef >= 0) tr->aux_coef = tr->o.aux_coef;
}

/* ---- open / close ------------------------------------------------------------------ */

static int check_opts(moe_trainer *tr) {
    const moe_config *c = tr->c;
    const char *dir = moe_ckpt_dir(moe_model_ckpt(tr->m));
    const moe_backend *be = tr->be;
    if (!be->matmul_backward || !be->rmsnorm_backward || !be->attention_backward ||
        !be->cross_entropy || !be->router_backward || !be->to_weight_dtype) {
        moe_error_set(MOE_ERR_DEVICE, "backend %s has no backward ops (training not supported)",
                      be->name);
        return -1;
    }
    int ncond = 0, ndrop = 0;
    for (int l = 0; l < c->num_layers; l++) {
        ncond += moe_model_layer_kind(tr->m, l) == MOE_MLP_CONDENSED;
        ndrop += moe_model_layer_drop(tr->m, l) != MOE_DROP_NONE;
    }
    if (tr->o.set == MOE_TRAIN_CONDENSED && ncond == 0) {
        moe_error_set(MOE_ERR_DATA, "%s: the model has no condensed layers to train (%s; train all "
                      "or a list of layers)", dir, ndrop ? "its layers are dropped, not condensed"
                                                         : "condense it first");
        return -1;
    }
    tr->layer_set = moe_calloc((size_t)c->num_layers + 1, sizeof(int));
    if (tr->o.set != MOE_TRAIN_LAYERS) return 0;
    for (int i = 0; i < tr->o.nlayers; i++) {
        int l = tr->o.layers[i];
        if (l < 0 || l >= c->num_layers) {
            moe_error_set(MOE_ERR_DATA, "%s: layer %d out of range (model has %d layers)", dir, l,
                          c->num_layers);
            return -1;
        }
        if (moe_model_layer_drop(tr->m, l) != MOE_DROP_NONE) {
            moe_error_set(MOE_ERR_DATA, "%s: layer %d is dropped (%s): it has no MLP to train", dir,
                          l, moe_model_layer_drop(tr->m, l) == MOE_DROP_MLP ? "LayerDrop" : "BlockDrop");
            return -1;
        }
        tr->layer_set[l] = 1;
    }
    if (tr->o.nlayers == 0) {
        moe_error_set(MOE_ERR_DATA, "%s: no layers to train", dir);
        return -1;
    }
    return 0;
}

/* the lowest layer holding a trained weight (-1: the embedding) */
static int lowest_trained(const moe_trainer *tr) {
    if (tr->emb.m) return -1;
    for (int l = 0; l < tr->c->num_layers; l++)
        for (int i = 0; i < tr->np; i++)
            if (tr->p[i].layer == l) return l;
    return tr->c->num_layers;
}

moe_trainer *moe_trainer_new(moe_model *m, const moe_train_opts *o) {
    moe_trainer *tr = moe_calloc(1, sizeof *tr);
    tr->m = m;
    tr->c = moe_model_config(m);
    tr->be = moe_model_backend(m);
    tr->o = *o;
    tr->tl = moe_calloc((size_t)tr->c->num_layers + 1, sizeof *tr->tl);
    int rc = check_opts(tr);
    for (int l = 0; l < tr->c->num_layers && rc == 0; l++) rc = load_layer(tr, l);
    if (rc == 0) rc = load_globals(tr);
    mdl_weights_ready(m);
    if (rc == 0) rc = moe_backend_status(tr->be);
    if (rc < 0) {
        moe_trainer_free(tr);
        return NULL;
    }
    read_aux_config(tr);
    tr->lowest = lowest_trained(tr);
    return tr;
}

void moe_trainer_free(moe_trainer *tr) {
    if (!tr) return;
    for (int l = 0; l < tr->c->num_layers; l++) free_layer(tr->m, &tr->tl[l]);
    if (!tr->lm_is_emb) tp_free(tr->m, &tr->lm);
    tp_free(tr->m, &tr->emb);
    tp_free(tr->m, &tr->fnorm);
    for (int i = 0; i < tr->np; i++) free((char *)tr->p[i].name);
    mdl_free(tr->m, tr->dx0);
    free(tr->dx0_off);
    free(tr->p);
    free(tr->trained);
    free(tr->tl);
    free(tr->layer_set);
    free(tr);
}

int moe_trainer_nparams(const moe_trainer *tr) { return tr->np; }

moe_param *moe_trainer_param(moe_trainer *tr, int i) {
    return i >= 0 && i < tr->np ? &tr->p[i] : NULL;
}

size_t moe_trainer_param_count(const moe_trainer *tr) {
    size_t n = 0;
    for (int i = 0; i < tr->np; i++) n += tr->p[i].n;
    return n;
}

void moe_trainer_zero_grads(moe_trainer *tr) {
    for (int i = 0; i < tr->ntrained; i++)
        tr->be->zero(tr->trained[i]->g, sizeof(float) * tr->trained[i]->n);
}

int moe_trainer_sync_weights(moe_trainer *tr) {
    for (int i = 0; i < tr->ntrained; i++) {
        tparam *p = tr->trained[i];
        if (p->w != p->m) tr->be->to_weight_dtype(p->w, p->m, p->n);
    }
    return moe_backend_status(tr->be);
}

/* ---- a batch ---------------------------------------------------------------------- */

typedef struct {
    train_rows r;
    int *T;
    size_t *off;
    int32_t *ids_h, *tg_h; /* [N] host, sequences concatenated */
    int32_t *ids, *tg;     /* the same in backend memory */
    int nrouted;           /* routed layers seen (aux loss) */
    double *cnt, *psum;    /* [L][nseq][E]: top-k assignments and softmax sums per sequence */
} run_batch;

static void batch_free(moe_trainer *tr, run_batch *rb) {
    free(rb->T);
    free(rb->off);
    free(rb->ids_h);
    free(rb->tg_h);
    mdl_free(tr->m, rb->ids);
    mdl_free(tr->m, rb->tg);
    free(rb->cnt);
    free(rb->psum);
    memset(rb, 0, sizeof *rb);
}

static int check_tokens(const moe_trainer *tr, const moe_train_batch *b, int s) {
    int V = tr->c->vocab_size;
    for (int t = 0; t < b->lens[s]; t++) {
        int id = b->ids[s][t], tg = b->targets[s][t];
        if (id < 0 || id >= V || tg >= V) { /* a negative target: ignored */
            moe_error_set(MOE_ERR_DATA, "%s: sequence %d, position %d: %s %d out of range "
                          "(vocab %d)", moe_ckpt_dir(moe_model_ckpt(tr->m)), s, t,
                          id < 0 || id >= V ? "token id" : "target", id < 0 || id >= V ? id : tg,
                          V);
            return -1;
        }
    }
    return 0;
}

static int batch_init(moe_trainer *tr, const moe_train_batch *b, run_batch *rb) {
    memset(rb, 0, sizeof *rb);
    if (b->nseq < 1) {
        moe_error_set(MOE_ERR_DATA, "training batch without sequences");
        return -1;
    }
    rb->T = moe_calloc((size_t)b->nseq + 1, sizeof(int));
    rb->off = moe_calloc((size_t)b->nseq + 1, sizeof(size_t));
    size_t N = 0;
    for (int s = 0; s < b->nseq; s++) {
        if (b->lens[s] < 1 || check_tokens(tr, b, s) < 0) {
            if (b->lens[s] < 1) moe_error_set(MOE_ERR_DATA, "training sequence %d is empty", s);
            return -1;
        }
        rb->T[s] = b->lens[s];
        rb->off[s] = N;
        N += (size_t)b->lens[s];
    }
    rb->off[b->nseq] = N;
    rb->r = (train_rows){b->nseq, rb->T, rb->off, N};
    rb->ids_h = moe_malloc(sizeof(int32_t) * N);
    rb->tg_h = moe_malloc(sizeof(int32_t) * N);
    for (int s = 0; s < b->nseq; s++) {
        memcpy(rb->ids_h + rb->off[s], b->ids[s], sizeof(int32_t) * (size_t)rb->T[s]);
        memcpy(rb->tg_h + rb->off[s], b->targets[s], sizeof(int32_t) * (size_t)rb->T[s]);
    }
    rb->ids = mdl_alloc(tr->m, sizeof(int32_t) * N);
    rb->tg = mdl_alloc(tr->m, sizeof(int32_t) * N);
    tr->be->upload(rb->ids, rb->ids_h, sizeof(int32_t) * N);
    tr->be->upload(rb->tg, rb->tg_h, sizeof(int32_t) * N);
    size_t E = (size_t)tr->c->n_routed_experts;
    rb->cnt = moe_calloc((size_t)tr->c->num_layers * b->nseq * E + 1, sizeof(double));
    rb->psum = moe_calloc((size_t)tr->c->num_layers * b->nseq * E + 1, sizeof(double));
    return 0;
}

/* ---- the load-balancing loss (MOE_TRAIN_ALL) ---------------------------------------- */

static int aux_on(const moe_trainer *tr) {
    return tr->o.set == MOE_TRAIN_ALL && tr->c->n_routed_experts > 0;
}

/* routing statistics of routed layer l, per sequence (host, token order) */
static void aux_stats(const moe_trainer *tr, run_batch *rb, int l, const layer_save *s) {
    int E = tr->c->n_routed_experts, K = tr->c->top_k;
    rb->nrouted++;
    for (int q = 0; q < rb->r.n; q++) {
        double *cnt = rb->cnt + ((size_t)l * rb->r.n + q) * E;
        double *ps = rb->psum + ((size_t)l * rb->r.n + q) * E;
        for (size_t t = rb->off[q]; t < rb->off[q + 1]; t++) {
            for (int k = 0; k < K; k++) cnt[s->idx_h[t * K + k]] += 1;
            for (int e = 0; e < E; e++) ps[e] += s->probs_h[t * E + e];
        }
    }
}

/* Σ over sequences (and, Hugging Face's form, layers) of the statistics */
static void aux_totals(const moe_trainer *tr, const run_batch *rb, int l, double *C, double *P) {
    int E = tr->c->n_routed_experts;
    for (int e = 0; e < E; e++) C[e] = P[e] = 0;
    for (int ll = l < 0 ? 0 : l; ll < (l < 0 ? tr->c->num_layers : l + 1); ll++)
        for (int q = 0; q < rb->r.n; q++)
            for (int e = 0; e < E; e++) {
                C[e] += rb->cnt[((size_t)ll * rb->r.n + q) * E + e];
                P[e] += rb->psum[((size_t)ll * rb->r.n + q) * E + e];
            }
}

/* d aux / d probs_te of layer l's rows (host [N, E]); the counts are constants.
 * Hugging Face (qwen*, olmoe, mixtral; load_balancing_loss_func over all
 * layers' logits at once): aux = E·Σ_e C_e·P_e / R², R = layers·N.
 * DeepSeek, per layer: seq_aux: aux = (1/B)·Σ_s Σ_e (cnt_se·E/(S·K))·P_se/S;
 * else aux = Σ_e (C_e·E/(N·K))·P_e/N. */
static double aux_grad_row(const moe_trainer *tr, const run_batch *rb, int l, int q, int e,
                           const double *C) {
    int E = tr->c->n_routed_experts, K = tr->c->top_k;
    double N = (double)rb->r.N;
    if (tr->c->arch->id != MOE_ARCH_DEEPSEEK) {
        double R = (double)rb->nrouted * N;
        return E * C[e] / (R * R);
    }
    if (!tr->seq_aux) return C[e] * E / (N * K) / N;
    double S = (double)rb->T[q];
    return rb->cnt[((size_t)l * rb->r.n + q) * E + e] * E / (S * K) / S / rb->r.n;
}

static double aux_value(const moe_trainer *tr, const run_batch *rb) {
    int E = tr->c->n_routed_experts;
    double *C = moe_malloc(sizeof(double) * (size_t)E), *P = moe_malloc(sizeof(double) * (size_t)E);
    double aux = 0;
    int ds = tr->c->arch->id == MOE_ARCH_DEEPSEEK;
    for (int l = ds ? 0 : -1; l < (ds ? tr->c->num_layers : 0); l++) {
        if (l >= 0 && tr->tl[l].kind != MOE_MLP_MOE) continue;
        aux_totals(tr, rb, l, C, P);
        for (int q = 0; q < (ds && tr->seq_aux ? rb->r.n : 1); q++)
            for (int e = 0; e < E; e++) {
                double p = ds && tr->seq_aux ? rb->psum[((size_t)l * rb->r.n + q) * E + e] : P[e];
                aux += aux_grad_row(tr, rb, l, q, e, C) * p; /* linear in the probs */
            }
    }
    free(C);
    free(P);
    return aux;
}

/* scale · d aux / d probs of routed layer l into backend memory [N, E] */
static float *aux_dprobs(moe_trainer *tr, const run_batch *rb, int l, double scale) {
    int E = tr->c->n_routed_experts;
    double *C = moe_malloc(sizeof(double) * (size_t)E), *P = moe_malloc(sizeof(double) * (size_t)E);
    aux_totals(tr, rb, tr->c->arch->id == MOE_ARCH_DEEPSEEK ? l : -1, C, P);
    float *h = moe_malloc(sizeof(float) * rb->r.N * (size_t)E);
    for (int q = 0; q < rb->r.n; q++)
        for (int e = 0; e < E; e++) {
            float g = (float)(scale * aux_grad_row(tr, rb, l, q, e, C));
            for (size_t t = rb->off[q]; t < rb->off[q + 1]; t++) h[t * E + e] = g;
        }
    float *d = moe_model_alloc(tr->m, rb->r.N * (size_t)E);
    tr->be->upload(d, h, sizeof(float) * rb->r.N * (size_t)E);
    free(h);
    free(C);
    free(P);
    return d;
}

/* ---- forward, loss, backward ---------------------------------------------------------- */

static int embed_batch(moe_trainer *tr, const run_batch *rb, float *x) {
    int H = tr->c->hidden_size;
    if (tr->emb.m) { /* trained: rows of the master */
        tr->be->gather_rows(x, tr->emb.m, rb->ids, (int)rb->r.N, H);
        return moe_backend_status(tr->be);
    }
    for (int s = 0; s < rb->r.n; s++)
        if (moe_model_embed(tr->m, x + rb->off[s] * H, rb->ids_h + rb->off[s], rb->T[s]) < 0)
            return -1;
    return 0;
}

/* a BlockDrop layer is the identity (nothing saved); a LayerDrop layer its
 * attention alone */
static int layer_forward(moe_trainer *tr, int l, float *x, const run_batch *rb, layer_save *s) {
    const train_layer *t = &tr->tl[l];
    if (t->drop == MOE_DROP_BLOCK) return 0;
    int rc = mdl_attention_train(tr->m, t, s, x, &rb->r);
    if (rc == 0 && t->drop != MOE_DROP_MLP) rc = mdl_mlp_train(tr->m, t, s, x, &rb->r);
    return rc;
}

/* Layers in order on x (the embeddings in, the last layer's output out).
 * saves NULL: nothing kept; else saves[l] for the layers the backward runs
 * (only their inputs with recompute). */
static int forward_layers(moe_trainer *tr, run_batch *rb, float *x, layer_save *saves) {
    int keep_from = tr->o.input_grad || tr->lowest < 0 ? 0 : tr->lowest;
    for (int l = 0; l < tr->c->num_layers; l++) {
        layer_save s = {0};
        s.want_egu = saves && l >= keep_from && !tr->o.recompute;
        int rc = layer_forward(tr, l, x, rb, &s);
        if (rc == 0 && aux_on(tr) && tr->tl[l].kind == MOE_MLP_MOE) aux_stats(tr, rb, l, &s);
        if (rc < 0 || !saves || l < keep_from) {
            mdl_save_free(tr->m, &s, 0);
        } else {
            if (tr->o.recompute) mdl_save_free(tr->m, &s, 1);
            saves[l] = s;
        }
        if (rc < 0) return -1;
    }
    return 0;
}

static void sum_loss(const run_batch *rb, const float *loss, moe_train_result *res) {
    res->loss_sum = 0;
    res->ntokens = 0;
    for (size_t t = 0; t < rb->r.N; t++)
        if (rb->tg_h[t] >= 0) {
            res->loss_sum += loss[t];
            res->ntokens++;
        }
}

static int layer_backward(moe_trainer *tr, const run_batch *rb, int l, layer_save *sv, float *dx,
                          float aux_scale) {
    moe_model *m = tr->m;
    train_layer *t = &tr->tl[l];
    int need_dx = l > tr->lowest || tr->o.input_grad;
    if (t->drop == MOE_DROP_BLOCK) return 0; /* identity: dx passes unchanged */
    layer_save rs = {0}, *s = sv;
    int rc = 0;
    if (tr->o.recompute) { /* the layer's forward again, from its saved input */
        size_t n = rb->r.N * (size_t)tr->c->hidden_size;
        float *x = moe_model_alloc(m, n);
        tr->be->copy(x, sv->x, sizeof(float) * n);
        rs.want_egu = 1;
        rc = layer_forward(tr, l, x, rb, &rs);
        mdl_free(m, x);
        s = &rs;
    }
    float *dprobs = NULL;
    if (rc == 0 && aux_on(tr) && t->kind == MOE_MLP_MOE)
        dprobs = aux_dprobs(tr, rb, l, (double)aux_scale * tr->aux_coef);
    if (rc == 0 && t->drop != MOE_DROP_MLP)
        rc = mdl_mlp_backward(m, t, s, dx, dprobs, need_dx || mdl_attention_trained(t), &rb->r);
    if (rc == 0) rc = mdl_attention_backward(m, t, s, dx, need_dx, &rb->r);
    mdl_free(m, dprobs);
    mdl_save_free(m, &rs, 0);
    return rc;
}

static int backward_layers(moe_trainer *tr, const run_batch *rb, layer_save *saves, float *dx,
                           float aux_scale) {
    int stop = tr->o.input_grad || tr->lowest < 0 ? 0 : tr->lowest;
    for (int l = tr->c->num_layers - 1; l >= stop; l--) {
        int rc = layer_backward(tr, rb, l, &saves[l], dx, aux_scale);
        mdl_save_free(tr->m, &saves[l], 0);
        if (rc < 0) return -1;
    }
    if (tr->emb.m)
        tr->be->embed_backward(tr->emb.g, dx, rb->ids, (int)rb->r.N, tr->c->hidden_size);
    return moe_backend_status(tr->be);
}

/* keeps d loss / d x_0 of the batch for moe_trainer_input_grad */
static void keep_input_grad(moe_trainer *tr, const run_batch *rb, float *dx) {
    mdl_free(tr->m, tr->dx0);
    free(tr->dx0_off);
    tr->dx0 = dx;
    tr->dx0_n = rb->r.n;
    tr->dx0_off = moe_malloc(sizeof(size_t) * ((size_t)rb->r.n + 1));
    memcpy(tr->dx0_off, rb->off, sizeof(size_t) * ((size_t)rb->r.n + 1));
}

/* forward to the loss (saves: NULL for the loss only); x: [N, H], the last
 * layer's output on return */
static int forward_loss(moe_trainer *tr, run_batch *rb, layer_save *saves, float *x, float dscale,
                        float *dx, moe_train_result *res) {
    int rc = embed_batch(tr, rb, x);
    if (rc == 0) rc = forward_layers(tr, rb, x, saves);
    float *loss = moe_malloc(sizeof(float) * rb->r.N);
    if (rc == 0)
        rc = mdl_head_loss(tr->m, &tr->fnorm, &tr->lm, x, rb->tg, (int)rb->r.N, dscale, loss, dx);
    if (rc == 0 && res) {
        sum_loss(rb, loss, res);
        res->aux_loss = aux_on(tr) ? tr->aux_coef * aux_value(tr, rb) : 0;
    }
    free(loss);
    return rc;
}

int moe_trainer_backward(moe_trainer *tr, const moe_train_batch *b, float dscale, float aux_scale,
                         moe_train_result *res) {
    run_batch rb;
    if (batch_init(tr, b, &rb) < 0) {
        batch_free(tr, &rb);
        return -1;
    }
    int L = tr->c->num_layers;
    size_t n = rb.r.N * (size_t)tr->c->hidden_size;
    layer_save *saves = moe_calloc((size_t)L + 1, sizeof *saves);
    float *x = moe_model_alloc(tr->m, n), *dx = moe_model_alloc(tr->m, n);
    moe_train_result r = {0};
    int rc = forward_loss(tr, &rb, saves, x, dscale, dx, &r);
    mdl_free(tr->m, x);
    if (rc == 0) rc = backward_layers(tr, &rb, saves, dx, aux_scale);
    for (int l = 0; l < L; l++) mdl_save_free(tr->m, &saves[l], 0);
    free(saves);
    if (rc == 0 && tr->o.input_grad)
        keep_input_grad(tr, &rb, dx);
    else
        mdl_free(tr->m, dx);
    if (rc == 0 && res) *res = r;
    batch_free(tr, &rb);
    return rc;
}

/* the forward alone: the loss into res, or with logits the logits */
static int forward_only(moe_trainer *tr, const moe_train_batch *b, moe_train_result *res,
                        float *logits) {
    run_batch rb;
    int rc = batch_init(tr, b, &rb);
    float *x = rc == 0 ? moe_model_alloc(tr->m, rb.r.N * (size_t)tr->c->hidden_size) : NULL;
    moe_train_result r = {0};
    if (rc == 0 && logits) {
        rc = embed_batch(tr, &rb, x);
        if (rc == 0) rc = forward_layers(tr, &rb, x, NULL);
        if (rc == 0) rc = mdl_head_logits(tr->m, &tr->fnorm, &tr->lm, x, (int)rb.r.N, logits);
    } else if (rc == 0) {
        rc = forward_loss(tr, &rb, NULL, x, 1.0f, NULL, &r);
    }
    if (rc == 0 && res) *res = r;
    mdl_free(tr->m, x);
    batch_free(tr, &rb);
    return rc;
}

int moe_trainer_loss(moe_trainer *tr, const moe_train_batch *b, moe_train_result *res) {
    return forward_only(tr, b, res, NULL);
}

int moe_trainer_logits(moe_trainer *tr, const moe_train_batch *b, float *logits) {
    return forward_only(tr, b, NULL, logits);
}

int moe_trainer_input_grad(moe_trainer *tr, int s, float *dx0) {
    if (!tr->dx0 || s < 0 || s >= tr->dx0_n) {
        moe_error_set(MOE_ERR_DATA, "no input gradient of sequence %d (input_grad off, or no "
                      "backward yet)", s);
        return -1;
    }
    size_t H = (size_t)tr->c->hidden_size;
    tr->be->download(dx0, tr->dx0 + tr->dx0_off[s] * H,
                     sizeof(float) * (tr->dx0_off[s + 1] - tr->dx0_off[s]) * H);
    return moe_backend_status(tr->be);
}
