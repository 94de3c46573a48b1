/* fold.c - a condensed layer as one dense SwiGLU MLP (see fold.h). */
#include "fold.h"
#include "common.h"

#include <stdlib.h>
#include <string.h>

enum { FOLD_GATE, FOLD_UP, FOLD_DOWN };

struct moe_fold_ctx {
    const moe_ckpt *ck;
    const moe_config *cfg; /* the condensed config: kept experts and weights */
    int layer, part;
    moe_dtype dtype;
    size_t esize, total;   /* element size, elements */
    char *buf;             /* the whole tensor, built at the first chunk */
    moe_fold_ctx *next;
};

int64_t moe_fold_width(const moe_config *cfg, int layer) {
    const moe_layer_mlp *m = &cfg->layers[layer];
    if (m->kind != MOE_MLP_CONDENSED) {
        moe_error_set(MOE_ERR_DATA, "--fold: layer %d is not condensed", layer);
        return -1;
    }
    int shared = m->has_shared && cfg->shared_intermediate_size > 0;
    if (shared && cfg->shared_gate) {
        moe_error_set(MOE_ERR_DATA,
                      "--fold: layer %d: %s's shared expert is gated by sigmoid(x.g), which no fixed "
                      "MLP reproduces; condense without --fold", layer, cfg->arch->model_type);
        return -1;
    }
    int64_t width = (int64_t)m->n_kept * cfg->moe_intermediate_size + (shared ? cfg->shared_intermediate_size : 0);
    if (width == 0) {
        moe_error_set(MOE_ERR_DATA, "--fold: layer %d keeps no expert: nothing to fold", layer);
        return -1;
    }
    return width;
}

/* Gate or up rows: each kept expert's matrix, then the shared one, byte for byte. */
static int build_rows(moe_fold_ctx *f) {
    const moe_layer_mlp *m = &f->cfg->layers[f->layer];
    size_t off = 0;
    for (int i = 0; i <= m->n_kept; i++) {
        int shared = i == m->n_kept;
        if (shared && f->cfg->shared_intermediate_size == 0) break;
        if (shared && !m->has_shared) break;
        moe_tensor_kind k = shared ? (f->part == FOLD_GATE ? MOE_T_SHARED_GATE : MOE_T_SHARED_UP)
                                   : (f->part == FOLD_GATE ? MOE_T_EXPERT_GATE : MOE_T_EXPERT_UP);
        const moe_st_tensor *t = moe_ckpt_get(f->ck, f->layer, k, shared ? -1 : m->experts[i]);
        if (!t) return -1;
        if ((int)t->dtype != (int)f->dtype || off + t->nbytes > f->total * f->esize) {
            moe_error_set(MOE_ERR_DATA, "%s: layer %d: --fold needs the experts in one dtype and shape",
                          moe_ckpt_dir(f->ck), f->layer);
            return -1;
        }
        memcpy(f->buf + off, t->data, t->nbytes);
        off += t->nbytes;
    }
    return 0;
}

/* Down columns: kept expert i's scaled by its weight, then the shared one's. */
static int build_down(moe_fold_ctx *f) {
    const moe_config *c = f->cfg;
    const moe_layer_mlp *m = &c->layers[f->layer];
    size_t H = (size_t)c->hidden_size, Im = (size_t)c->moe_intermediate_size;
    size_t W = f->total / H, Is = W - m->n_kept * Im;
    float *down = (float *)f->buf, *tmp = moe_malloc(sizeof(float) * H * (Im > Is ? Im : Is) + 1);
    int rc = 0;
    for (int i = 0; i <= m->n_kept && rc == 0; i++) {
        int shared = i == m->n_kept;
        if (shared && Is == 0) break;
        size_t width = shared ? Is : Im, off = (size_t)i * Im;
        rc = shared ? moe_ckpt_read_f32(f->ck, f->layer, MOE_T_SHARED_DOWN, -1, tmp)
                    : moe_ckpt_read_f32(f->ck, f->layer, MOE_T_EXPERT_DOWN, m->experts[i], tmp);
        float s = shared ? 1.0f : m->weights[i];
        for (size_t h = 0; rc == 0 && h < H; h++)
            for (size_t j = 0; j < width; j++) down[h * W + off + j] = s * tmp[h * width + j];
    }
    free(tmp);
    return rc;
}

/* The writer asks for chunks in order: build the tensor at the first, free it
 * after the last, so one folded tensor at a time is in memory. */
static int fold_fill(void *ctx, const char *name, uint64_t start, uint64_t n, void *out) {
    (void)name;
    moe_fold_ctx *f = ctx;
    if (!f->buf) {
        f->buf = moe_malloc(f->total * f->esize + 1);
        if ((f->part == FOLD_DOWN ? build_down(f) : build_rows(f)) < 0) {
            free(f->buf);
            f->buf = NULL;
            return -1;
        }
    }
    memcpy(out, f->buf + start * f->esize, n * f->esize);
    if (start + n == f->total) {
        free(f->buf);
        f->buf = NULL;
    }
    return 0;
}

/* gate and up take the dtype of the first matrix folded in */
static const moe_st_tensor *first_gate(const moe_ckpt *ck, const moe_config *cfg, int layer) {
    const moe_layer_mlp *m = &cfg->layers[layer];
    return m->n_kept ? moe_ckpt_get(ck, layer, MOE_T_EXPERT_GATE, m->experts[0])
                     : moe_ckpt_get(ck, layer, MOE_T_SHARED_GATE, -1);
}

uint64_t moe_fold_bytes(const moe_config *cfg, int layer, const moe_ckpt *ck) {
    int64_t W = moe_fold_width(cfg, layer);
    const moe_st_tensor *g = W < 0 ? NULL : first_gate(ck, cfg, layer);
    if (!g) return 0;
    return (uint64_t)W * (uint64_t)cfg->hidden_size * (2 * (uint64_t)moe_dtype_bits(g->dtype) / 8 + 4);
}

int moe_fold_add_layer(moe_ckpt_writer *w, const moe_ckpt *ck, const moe_config *cfg, int layer,
                       moe_fold_ctx **ctxs) {
    int64_t W = moe_fold_width(cfg, layer), H = cfg->hidden_size;
    if (W < 0) return -1;
    const moe_st_tensor *first = first_gate(ck, cfg, layer);
    if (!first) return -1;
    static const char *names[] = {"gate_proj", "up_proj", "down_proj"};
    for (int part = FOLD_GATE; part <= FOLD_DOWN; part++) {
        moe_fold_ctx *f = moe_calloc(1, sizeof *f);
        *f = (moe_fold_ctx){.ck = ck, .cfg = cfg, .layer = layer, .part = part,
                            .dtype = part == FOLD_DOWN ? MOE_DT_F32 : first->dtype,
                            .total = (size_t)W * (size_t)H, .next = *ctxs};
        f->esize = (size_t)moe_dtype_bits(f->dtype) / 8;
        *ctxs = f;
        char name[256];
        snprintf(name, sizeof name, "model.layers.%d.mlp.%s.weight", layer, names[part]);
        int64_t shape[2] = {part == FOLD_DOWN ? H : W, part == FOLD_DOWN ? W : H};
        if (moe_ckpt_writer_add(w, name, f->dtype, 2, shape, NULL, fold_fill, f) < 0) return -1;
    }
    return 0;
}

void moe_fold_free(moe_fold_ctx *ctxs) {
    while (ctxs) {
        moe_fold_ctx *next = ctxs->next;
        free(ctxs->buf);
        free(ctxs);
        ctxs = next;
    }
}
