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
 *              residency policy, moe_model_forward */
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
    int active;
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

/* ---- forward.c, for the runner ------------------------------------------------ */

/* logits of T tokens, row t written to rowdst[t] (V floats; host memory when
 * dst_host, else backend memory); lm_head converted once per chunk of rows */
int mdl_lm_head_to_rows(moe_model *m, const float *x, int T, float *const *rowdst, int dst_host);

#endif
