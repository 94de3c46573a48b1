/* condense.h - write a condensed checkpoint (CD-MoE step 4).
 *
 * The new directory holds, under their original names, every tensor the
 * condensed config implies: all tensors of uncondensed layers, and for a
 * condensed layer its attention, norms, shared experts and the kept routed
 * experts; routers and dropped experts are left out.  Tensors are copied
 * byte for byte (same dtype).  config.json is the original's text with
 * "condensed_layers" (see config.h) and "cdmoe" (provenance) added; every
 * other file of the source directory (tokenizer, generation config, remote
 * code) is copied, and hf/modeling_cdmoe.py with "auto_map" in config.json
 * (transformers loads the result with trust_remote_code=True).  With fold,
 * each condensed layer is one dense MLP instead (fold.h), marked "folded": true
 * in its condensed_layers entry.  The directory is written under a temporary
 * name and renamed at the end. */
#ifndef MOE_CONDENSE_H
#define MOE_CONDENSE_H

#include "checkpoint.h"

typedef struct {
    int n_layers, k;          /* layers to condense, experts kept per layer */
    const int *layers;        /* [n_layers] decoder indices */
    const int *experts;       /* [n_layers * k] kept expert ids */
    const float *weights;     /* [n_layers * k] their fixed weights */
    int argc;                 /* command line, for the provenance entry */
    char **argv;
    uint64_t shard_bytes;     /* 0: one file */
    int force;                /* replace an existing output directory */
    int fold;                 /* write each condensed layer as one dense MLP (fold.h) */
    moe_drop_kind drop;       /* baselines: the layers are dropped so (k = 0) instead of
                                 condensed: "dropped_layers" in config.json (config.h) */
    int prune_n;              /* expert pruning: routed experts kept per MoE layer (0: none;
                                 then n_layers must be 0): n_routed_experts becomes prune_n,
                                 each layer's kept experts renumbered 0.., router rows kept */
    const int *prune_kept;    /* [MoE layers * prune_n] original ids, increasing, the MoE
                                 layers in layer order (moe_cplan_prune) */
} moe_condense_opts;

typedef struct {
    uint64_t params_before, params_after;  /* parameters the configs imply */
    uint64_t bytes_before, bytes_after;    /* tensor payload bytes on disk */
} moe_condense_report;

int moe_condense_write(const moe_ckpt *ck, const char *out_dir, const moe_condense_opts *o,
                       moe_condense_report *rep);

/* Shared with moe-tune, which writes a checkpoint the same way: */
#include <jansson.h>
/* Copy every regular file of src_dir except config.json and the tensor
 * files (tokenizer, generation config, remote code ...) into dst_dir. */
int moe_condense_copy_side_files(const char *src_dir, const char *dst_dir);
/* DIR/config.json parsed, key order kept (path receives its name); NULL with an error. */
json_t *moe_config_json_load(const char *dir, char *path, size_t size);
/* Append {"tool","version","args","source_model"} to root's "cdmoe_provenance" list. */
void moe_config_json_provenance(json_t *root, const char *tool, int argc, char **argv, const char *source);
/* root as config.json text (2-space indent, key order kept, newline at the
 * end), malloc'd; root is released.  NULL with an error naming path. */
char *moe_config_json_text(json_t *root, const char *path);

#endif
