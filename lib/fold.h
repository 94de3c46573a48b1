/* fold.h - a condensed layer written as one dense SwiGLU MLP (moe-condense --fold).
 *
 * A condensed layer without a gate on its shared experts computes
 *   y = sum_i w_i * down_i(silu(gate_i x) * up_i x) + down_s(silu(gate_s x) * up_s x),
 * which is one SwiGLU MLP of width W = K * moe_intermediate_size + shared width:
 * gate and up rows stacked (kept experts in plan order, then the shared MLP),
 * down columns side by side, expert i's scaled by w_i.  It is written under the
 * dense-layer names model.layers.L.mlp.{gate,up,down}_proj.weight; gate and up
 * keep the source dtype (a byte copy), down is float32 (the scaled values are
 * exactly the engine's fused matrix, which bf16 could not hold). */
#ifndef MOE_FOLD_H
#define MOE_FOLD_H

#include "checkpoint.h"

typedef struct moe_fold_ctx moe_fold_ctx;

/* Width of layer `layer`'s folded MLP in the condensed config `cfg`; -1 with
 * an error when the layer cannot be folded: not condensed, nothing kept, or
 * its shared expert gated (qwen2_moe: sigmoid(x.g) depends on the input, so
 * no fixed MLP equals it). */
int64_t moe_fold_width(const moe_config *cfg, int layer);

/* Declare the three folded tensors of `layer` in w, read from the source
 * checkpoint ck at write time; *ctxs collects what moe_fold_free releases
 * (after moe_ckpt_writer_close).  0 or -1. */
int moe_fold_add_layer(moe_ckpt_writer *w, const moe_ckpt *ck, const moe_config *cfg, int layer,
                       moe_fold_ctx **ctxs);
void moe_fold_free(moe_fold_ctx *ctxs);
/* Payload bytes of layer's folded tensors (0 if it cannot be folded). */
uint64_t moe_fold_bytes(const moe_config *cfg, int layer, const moe_ckpt *ck);

#endif
