/* internal.h - what the model's files share (lib/model/): the model's state,
 * the weights of a layer, and the functions of weights.c that the compute
 * (forward.c) and the layer-major runner (run.c) call.  Not installed; the
 * API is lib/model.h.
 *
 *   weights.c  residency: memory pool, borrowed checkpoint pages, staging,
 *              load / unload / prefetch of a layer, the expert cache,
 *              run-time condensing, open / close, the options
 *   forward.c  the computation of one layer's pieces, named for what they
 *              compute (embedding, attention, MLP kinds, final norm,
 *              lm_head): the place of their future _backward twins
 *   run.c      the batch of sequences, the layer-major runner, the
 *              residency policy, moe_model_forward
 *   train.c    the trainer (lib/train.h): its weights (train_layer), the
 *              training forward and backward over a batch, the losses;
 *              forward.c computes each piece (mdl_*_train, mdl_*_backward) */
#ifndef MOE_MODEL_INTERNAL_H
#define MOE_MODEL_INTERNAL_H

#include "model.h"

/* one layer's weights (weight dtype of the backend; norms and biases f32) */
typedef struct {
    int loaded;
    int prefetched; /* loaded by moe_layer_prefetch: its copies may still be in flight */
    /* attention */
    void *wq, *wk, *wv, *wo;
    float *bq, *bk, *bv, *qn, *kn;
    float *in_norm, *post_norm;
    /* dense MLP, or the fused wide SwiGLU of a condensed layer */
    void *gu, *down;
    int I;
    int down_f32; /* down is float32 whatever the weight dtype (condensed, see load_condensed) */
    /* routed MoE */
    void *router;
    void **e_gu, **e_down; /* [E], NULL entries when not cached */
    /* shared experts (MoE; condensed with a gated shared expert) */
    void *s_gu, *s_down, *s_gate;
    int Is;
} layer_w;

/* run-time override of a layer's MLP kind */
typedef struct {
    int active;     /* condensed */
    moe_drop_kind drop; /* or dropped (MOE_DROP_MLP / MOE_DROP_BLOCK) */
    int n;
    int *experts;
    float *weights;
} layer_override;

/* scratch slots of the compute (forward.c) */
enum { S_XN, S_Q, S_K, S_V, S_ATT, S_LOGITS, S_IDX, S_WT, S_PROBS, S_XE, S_GU, S_H, S_O,
       S_Z, S_TOK, S_TWT, S_Y, S_COUNT };

/* a block of backend memory */
typedef struct {
    void *p;
    size_t n;
} blk;

/* a weight borrowed from the checkpoint mapping (cpu-bf16): the tensor(s) it spans */
typedef struct {
    const void *p;
    const moe_st_tensor *t[2];
} brw;

struct moe_model {
    blk *live, *pool;   /* blocks handed out by mdl_alloc; freed blocks kept for reuse */
    size_t nlive, caplive, npool, cappool, pool_bytes;
    brw *brw;           /* weights that point into the checkpoint mapping */
    size_t nbrw, capbrw;
    int borrow;         /* host-memory backend with BF16 weights: borrow BF16 tensors
                           (2: and populate their pages) */
    moe_ckpt *ck;
    const moe_config *cfg;
    const moe_backend *be;
    const moe_backend *router_be; /* computes the router's logits: be, or with BF16
                                     compute on the CPU the same weights in f32 */
    size_t cache_bytes;
    size_t pool_cap;    /* bytes of freed blocks kept for reuse */
    layer_w *lw;
    layer_override *ov;
    float *final_norm;
    void *scr[S_COUNT];
    size_t scr_n[S_COUNT];
    int direct;         /* weights staged in the weight dtype (0: the f32 round trip) */
    moe_stager *stg;    /* the backend's staging ring (kernels.h) */
};

/* ---- training (train.c holds the weights; forward.c computes) -----------------
 * A weight of the trainer: the copy the ops compute with (weight dtype for
 * matrices, float32 for norms and biases), and, when trained, its float32
 * master and gradient (backend memory; NULL when frozen).  For the CPU with
 * f32 weights, and for every vector, w is the master itself. */
typedef struct {
    void *w;
    float *m, *g;
    size_t n;
} tparam;

/* One layer's weights for training.  Unlike the inference path, a condensed
 * layer keeps its kept experts (and its shared MLP) unfused, one gate|up and
 * one down per expert, with the fixed weights as a vector: every parameter is
 * then a Hugging Face tensor (gate and up are the two halves of one gate|up
 * block), the gradients of the fixed weights come out of the combine's
 * backward, and the same grouped expert op serves routed and condensed
 * layers.  The fused wide SwiGLU would make the weights' gradients views of
 * strided columns. */
typedef struct {
    moe_mlp_kind kind;
    moe_drop_kind drop; /* MOE_DROP_MLP: attention only (no post norm, no MLP);
                           MOE_DROP_BLOCK: no tensors, x passes */
    tparam in_norm, post_norm, wq, wk, wv, wo, bq, bk, bv, qn, kn;
    tparam gu, down; /* dense: gate|up [2I, H], down [H, I] */
    int I;
    tparam router;   /* routed: [E, H] */
    int ne;          /* routed: E; condensed: the kept experts */
    const int *kept; /* condensed: their ids */
    tparam *e_gu, *e_down; /* [ne] */
    tparam kwt;      /* condensed: the fixed weights [ne] (float32) */
    tparam s_gu, s_down, s_gate; /* shared MLP [2Is, H], [H, Is]; qwen2_moe gate [1, H] */
    int Is;
    int need_dx;     /* the backward computes d loss / d input of this layer */
} train_layer;

/* What a layer's training forward keeps for its backward (backend memory,
 * NULL where the layer has no such piece); x alone with recompute. */
typedef struct {
    float *x;            /* [N, H] layer input */
    float *xa;           /* [N, H] RMSNorm_in(x) */
    float *ql, *kl;      /* [N, nh·D], [N, nkv·D] q, k projections before the qk-norm */
    float *q, *k, *v;    /* post-RoPE q, k; v */
    float *att;          /* [N, nh·D] attention output */
    float *xm;           /* [N, H] x after the attention block */
    float *xn;           /* [N, H] MLP input */
    float *gu;           /* dense: [N, 2I] */
    float *sgu, *so, *z; /* shared: [N, 2Is], its output [N, H], gate logits [N] */
    int K;               /* expert slots per token (routed: top_k; condensed: ne) */
    float *out;          /* [N·K, H] expert outputs, rows grouped per expert */
    int want_egu;        /* in: the backward will run on this save (keep egu) */
    float *egu;          /* [N·K, 2Im] the experts' gate|up, rows as out (host-memory
                            backends with want_egu; else recomputed by the backward) */
    int32_t *rows;       /* [N·K] token of each row (backend) */
    int32_t *off;        /* [ne + 1] rows of each expert (host) */
    int32_t *slot;       /* [N, K] row of each (token, slot), slots in router order */
    float *wt;           /* [N, K] weights of the slots */
    int32_t *idx;        /* routed: [N, K] router's ids (backend) */
    float *probs;        /* routed: [N, E] softmax (backend) */
    int32_t *idx_h;      /* routed: [N, K] the same on the host (aux loss statistics,
                            read right after the layer's forward) */
    float *probs_h;      /* routed: [N, E] the same on the host (idem) */
} layer_save;

/* the sequences of a training batch, concatenated (row offsets, lengths) */
typedef struct {
    int n;
    const int *T;
    const size_t *off;
    size_t N;
} train_rows;

/* x += Attn(RMSNorm_in(x)) / x += MLP(RMSNorm_post(x)) on every sequence,
 * keeping in s what the backward needs; 0 or -1 */
int mdl_attention_train(moe_model *m, const train_layer *tl, layer_save *s, float *x,
                        const train_rows *r);
int mdl_mlp_train(moe_model *m, const train_layer *tl, layer_save *s, float *x, const train_rows *r);
/* dx: d loss / d output of the block in, d loss / d input out; parameter
 * gradients added; dprobs: d loss / d router softmax (aux loss) or NULL */
int mdl_mlp_backward(moe_model *m, const train_layer *tl, const layer_save *s, float *dx,
                     const float *dprobs, int need_dx, const train_rows *r);
int mdl_attention_backward(moe_model *m, const train_layer *tl, const layer_save *s, float *dx,
                           int need_dx, const train_rows *r);
void mdl_save_free(moe_model *m, layer_save *s, int keep_input);
/* 1 when a weight of the attention block (or its input norm) is trained */
int mdl_attention_trained(const train_layer *tl);
/* the router's mode and top-k renormalisation for this model (as route()) */
void mdl_route_mode(const moe_model *m, int *mode, int *renorm);
int mdl_head_loss(moe_model *m, const tparam *fn, const tparam *lm, const float *x,
                  const int32_t *tg, int N, float dscale, float *loss, float *dx);
int mdl_head_logits(moe_model *m, const tparam *fn, const tparam *lm, const float *x, int N,
                    float *logits);
/* float32 vector of the checkpoint in backend memory (norms, biases) */
float *mdl_load_vec(moe_model *m, int l, moe_tensor_kind k);

/* ---- weights.c, for the compute ---------------------------------------------- */

int mdl_check_layer(const moe_model *m, int l);
/* layer l loaded and its copies visible to the ops (loads it if needed) */
int mdl_ensure_loaded(moe_model *m, int l);
/* backend scratch of a slot, grown on demand; trimmed between phases */
void *mdl_scratch(moe_model *m, int slot, size_t nbytes);
void mdl_trim_scratch(moe_model *m);
/* backend block from the model's pool / back to it (borrowed weights too) */
void *mdl_alloc(moe_model *m, size_t nbytes);
void mdl_free(moe_model *m, void *p);
/* ops issued from now on see every weight staged so far */
void mdl_weights_ready(moe_model *m);
/* a matrix / stacked gate|up weight loaded now (caller frees with mdl_free) */
void *mdl_load_mat(moe_model *m, int l, moe_tensor_kind k, int expert);
void *mdl_load_gate_up(moe_model *m, int l, moe_tensor_kind kg, moe_tensor_kind ku, int expert,
                       size_t IH);
/* Convert routed experts e0 <= e < e1 of layer l whose gu[e] is non-NULL (a
 * marker on input) into gu[e], down[e]; 0 or -1 (then all NULL). */
int mdl_convert_experts(moe_model *m, int l, int e0, int e1, void **gu, void **down);
/* expert e's weights: cached, or converted now (*tmp = 1: caller frees) */
int mdl_expert_weights(moe_model *m, int l, int e, void **gu, void **down, int *tmp);
/* rows [r0, r0+nr) of lm_head in the weight dtype; *borrowed = 1: points
 * into the mapping (not to be freed) */
void *mdl_lm_head_rows(moe_model *m, const moe_st_tensor *t, size_t r0, size_t nr, int *borrowed);
size_t mdl_wsz(const moe_model *m); /* bytes per weight element */
/* kept experts of a condensed layer and their fixed weights (run-time override or config) */
void mdl_condensed_list(const moe_model *m, int l, int *n, const int **ex, const float **w);

/* ---- forward.c, for the runner ------------------------------------------------ */

/* logits of T tokens, row t written to rowdst[t] (V floats; host memory when
 * dst_host, else backend memory); lm_head converted once per chunk of rows */
int mdl_lm_head_to_rows(moe_model *m, const float *x, int T, float *const *rowdst, int dst_host);

#endif
