/* config.h - Hugging Face config.json -> struct moe_config, the per-architecture
 * table, the per-layer MLP descriptor and the tensor-name table.
 *
 * Architectures are data: one moe_arch row per supported model_type says how
 * config.json spells its fields, which optional parts exist (q/k biases, q/k
 * norm, shared experts and their gate), how the router turns logits into
 * weights, which layers are MoE and how tensors are named.  The engine,
 * moe-init and moe-condense all use this one table.
 *
 * Supported model_type values: "deepseek" (DeepSeekMoE v1, remote code),
 * "qwen2_moe", "qwen3_moe", "olmoe", "mixtral".  Anything else:
 *   "DIR/config.json: model_type 'llama' is not supported (supported: ...)".
 *
 * Field spellings read (first found wins), so configs written by transformers
 * 4.x and 5.x both load:
 *   routed experts  n_routed_experts (deepseek) | num_experts | num_local_experts
 *   rope theta      rope_theta | rope_parameters.rope_theta
 *   rope scaling    rope_scaling | rope_parameters: absent, null, or type /
 *                   rope_type "default" are accepted; anything else (yarn,
 *                   linear, dynamic, llama3...) is rejected with an error.
 *   dtype           torch_dtype | dtype  (informational only)
 *   head_dim        head_dim if present and not null, else hidden/heads.
 *
 * ---- Per-layer MLP kinds ------------------------------------------------
 * Every decoder layer has one MLP descriptor (moe_config.layers[l]):
 *   MOE_MLP_DENSE      SwiGLU MLP of intermediate_size (mlp.{gate,up,down}_proj).
 *   MOE_MLP_MOE        router + n_routed_experts experts (+ shared experts).
 *   MOE_MLP_CONDENSED  a fixed list of routed experts with fixed scalar
 *                      weights, plus the shared experts (with their sigmoid
 *                      gate for qwen2_moe); no router.
 * Which layers are MoE in the base model:
 *   deepseek   l >= first_k_dense_replace && l % moe_layer_freq == 0
 *              (and n_routed_experts not null)
 *   qwen2_moe, qwen3_moe
 *              l not in mlp_only_layers && num_experts > 0 &&
 *              (l + 1) % decoder_sparse_step == 0
 *   olmoe, mixtral  every layer.
 *
 * ---- "condensed_layers" (our extension of config.json) -------------------
 *   "condensed_layers": {
 *     "<decoder layer index>": {"experts": [id, ...], "weights": [w, ...]},
 *     ...
 *   }
 * Keys are decoder layer indices (0-based, counting dense layers too; NOT the
 * MoE-layer ordinals CD-MoE's JSON files use).  "experts" are routed expert
 * ids in the ORIGINAL numbering of the base model (0 <= id <
 * n_routed_experts, no duplicates); "weights" are the fixed floats, same
 * length.  The layer must be a MoE layer of the base model.  An empty list is
 * allowed (only the shared experts remain).  The condensed MLP computes
 *   y = sum_i weights[i] * Expert_{experts[i]}(x)   (in list order)
 *       + Shared(x)   (qwen2_moe: * sigmoid(x . shared_expert_gate))
 * The checkpoint of a condensed layer must hold the kept experts (under their
 * original names, e.g. mlp.experts.37.gate_proj.weight) and the shared
 * experts; the router and the other experts may be absent, and are ignored
 * if present (so condensing an existing checkpoint can be just an edit of
 * its config.json).
 * An entry with "folded": true (moe-condense --fold) is a dense layer instead:
 * mlp.{gate,up,down}_proj of width len(experts) * moe_intermediate_size +
 * shared width, the weights already in the down projection (the lists stay
 * for the record).  Refused when the shared expert is gated, and for now when
 * that width is not intermediate_size.
 *
 * ---- "dropped_layers" (our extension, the paper's baselines) -------------
 *   "dropped_layers": {"<decoder layer index>": "mlp" | "block", ...}
 * "mlp" (LayerDrop): the layer's MLP block is removed, the residual passes:
 *   h = h + Attn(RMSNorm_in(h)); no post_attention_layernorm, no MLP tensors.
 * "block" (BlockDrop): the whole decoder layer is removed, h passes
 *   unchanged; the layer has no tensors at all.
 * Either kind is MOE_MLP_NONE in layers[] (drop says which); any layer may
 * be dropped (moe-layer-search only proposes MoE layers).  A layer is in
 * at most one of condensed_layers and dropped_layers.
 *
 * Expert pruning (moe-condense --method prune-freq|prune-reap) needs no
 * extension: the pruned checkpoint is a plain model of the same
 * architecture with n_routed_experts = N, each MoE layer's kept experts
 * renumbered 0..N-1 in their original order and the router keeping their
 * rows; "pruned_experts": {"<layer>": [original ids]} records the choice
 * (informational, not read back).
 *
 * ---- Router ------------------------------------------------------------
 * MOE_ROUTER_SOFTMAX_TOPK: p = softmax(logits over all experts), take the
 *   top_k largest p; if norm_topk_prob, divide by their sum (+ norm_topk_eps).
 * MOE_ROUTER_TOPK_SOFTMAX (mixtral): softmax over the top_k logits only; this
 *   equals SOFTMAX_TOPK with the renormalisation always on (HF's Mixtral code
 *   does softmax -> topk -> renorm), so cfg->norm_topk_prob is 1 for it.
 * Ties among equal scores: the lower expert id wins (documented choice).
 *
 * Library rules apply: no printing, errors through moe_error_set(). */
#ifndef MOE_CONFIG_H
#define MOE_CONFIG_H

#include <stddef.h>
#include <stdint.h>

typedef enum {
    MOE_ARCH_DEEPSEEK, MOE_ARCH_QWEN2_MOE, MOE_ARCH_QWEN3_MOE, MOE_ARCH_OLMOE, MOE_ARCH_MIXTRAL,
    MOE_ARCH_COUNT
} moe_arch_id;

typedef enum {
    MOE_QK_NORM_NONE,
    MOE_QK_NORM_HEAD, /* qwen3_moe: RMSNorm of each head vector, weight [head_dim],
                         after the head reshape, before RoPE */
    MOE_QK_NORM_FULL, /* olmoe: RMSNorm of the whole q_proj / k_proj output,
                         weights [heads*head_dim] / [kv_heads*head_dim], before
                         the head reshape and RoPE */
} moe_qk_norm;

typedef enum { MOE_ROUTER_SOFTMAX_TOPK, MOE_ROUTER_TOPK_SOFTMAX } moe_router_kind;

typedef enum { MOE_LAYERS_DEEPSEEK, MOE_LAYERS_QWEN, MOE_LAYERS_ALL } moe_layer_rule;

typedef enum {
    MOE_SHARED_NONE,
    MOE_SHARED_COUNT, /* deepseek: n_shared_experts fused into one MLP of
                         n_shared_experts * moe_intermediate_size, ungated */
    MOE_SHARED_SIZE,  /* qwen2_moe: one MLP of shared_expert_intermediate_size,
                         scaled by sigmoid(x . shared_expert_gate) */
} moe_shared_kind;

/* One row of the architecture table. */
typedef struct moe_arch {
    moe_arch_id id;
    const char *model_type;     /* "qwen2_moe" */
    const char *hf_class;       /* "Qwen2MoeForCausalLM" (architectures[0]) */
    int remote_code;            /* 1: not in transformers (deepseek v1) */
    /* config.json spellings */
    const char *key_experts;    /* "n_routed_experts" / "num_experts" / "num_local_experts" */
    const char *key_moe_inter;  /* "moe_intermediate_size", or NULL: experts use
                                   intermediate_size (olmoe, mixtral) */
    moe_layer_rule layer_rule;
    moe_shared_kind shared;
    moe_qk_norm qk_norm;
    int qkv_bias_default;       /* qwen2_moe: 1 ("qkv_bias", 4.42: always on) */
    moe_router_kind router;
    int router_softmax_fp32;    /* 0: deepseek computes softmax in the activation
                                   dtype (bf16); 1: fp32.  Irrelevant in f32. */
    int norm_topk_default;      /* value of norm_topk_prob when absent */
    double norm_topk_eps;       /* deepseek: 1e-20 added to the sum; others 0 */
    double rms_norm_eps_default;
    double rope_theta_default;
    /* tensor names: model.layers.{l}.<mlp_prefix>.experts.{j}.<expert_proj[k]>.weight */
    const char *mlp_prefix;      /* "mlp" / "block_sparse_moe" */
    const char *expert_proj[3];  /* gate, up, down: {"gate_proj","up_proj","down_proj"}
                                    or mixtral {"w1","w3","w2"} */
    const char *shared_prefix;   /* "shared_experts" / "shared_expert" / NULL */
    const char *shared_gate;     /* "shared_expert_gate" / NULL */
} moe_arch;

const moe_arch *moe_arch_get(moe_arch_id id);
const moe_arch *moe_arch_find(const char *model_type); /* NULL if unknown, no error */
/* "deepseek, qwen2_moe, qwen3_moe, olmoe, mixtral" */
const char *moe_arch_list(void);

typedef enum { MOE_MLP_DENSE, MOE_MLP_MOE, MOE_MLP_CONDENSED, MOE_MLP_NONE } moe_mlp_kind;

/* How a layer of kind MOE_MLP_NONE was dropped (see "dropped_layers"). */
typedef enum { MOE_DROP_NONE, MOE_DROP_MLP, MOE_DROP_BLOCK } moe_drop_kind;

/* Per-layer MLP descriptor. */
typedef struct moe_layer_mlp {
    moe_mlp_kind kind;
    int has_shared;   /* MOE/CONDENSED: shared experts present (arch has them and
                         their size > 0) */
    int n_kept;       /* CONDENSED: number of kept experts (may be 0) */
    int *experts;     /* CONDENSED: kept routed expert ids, original numbering */
    float *weights;   /* CONDENSED: their fixed weights */
    int dense_width;  /* DENSE from a folded condensed layer: its MLP width
                         (0: intermediate_size); see moe_config_dense_width */
    moe_drop_kind drop; /* NONE: MOE_DROP_MLP (LayerDrop) or MOE_DROP_BLOCK (BlockDrop) */
} moe_layer_mlp;

typedef struct moe_config {
    char *path;                  /* file it came from, for messages ("" if built) */
    const moe_arch *arch;
    char *dtype;                 /* torch_dtype / dtype string, or NULL */

    int hidden_size;             /* H */
    int intermediate_size;       /* dense MLP width (olmoe/mixtral: also the experts') */
    int moe_intermediate_size;   /* routed expert width */
    int shared_intermediate_size;/* fused shared MLP width, 0 if none:
                                    deepseek n_shared_experts*moe_intermediate_size,
                                    qwen2_moe shared_expert_intermediate_size */
    int num_layers;
    int num_heads, num_kv_heads, head_dim;
    int vocab_size;
    int max_position_embeddings;
    double rms_norm_eps;
    double rope_theta;

    int n_routed_experts;        /* E (0 if the model has none) */
    int n_shared_experts;        /* deepseek: count; qwen2_moe: 1 if size > 0; else 0 */
    int top_k;                   /* num_experts_per_tok */
    int norm_topk_prob;          /* effective (mixtral: 1) */
    double norm_topk_eps;
    moe_router_kind router;

    int qkv_bias;                /* q/k/v projections have biases */
    moe_qk_norm qk_norm;
    int shared_gate;             /* shared MLP scaled by a sigmoid gate */
    int tie_word_embeddings;
    double clip_qkv;             /* olmoe: clamp q,k,v to [-c, c] after the norm; 0 = none */
    int sliding_window;          /* mixtral sliding_window if set (0 = none); the
                                    engine must refuse sequences longer than it */
    int bos_token_id, eos_token_id, pad_token_id; /* -1 when null/absent */

    /* raw layer-rule fields (kept for writers) */
    int first_k_dense_replace, moe_layer_freq;   /* deepseek */
    int decoder_sparse_step;                      /* qwen */
    int n_mlp_only_layers;
    int *mlp_only_layers;

    moe_layer_mlp *layers;       /* [num_layers] */
    int n_condensed;             /* number of CONDENSED layers */
    int n_dropped;               /* number of NONE layers (dropped_layers) */
    int n_layers_alloc;          /* entries allocated in layers[] (bookkeeping) */
} moe_config;

/* Load `path`: a config.json file, or a directory containing one.  Every
 * error names the file: missing/ill-typed keys, unknown model_type,
 * unsupported rope scaling or hidden_act, inconsistent sizes (heads not
 * dividing, kv heads not dividing heads, top_k > experts, bad
 * condensed_layers entries...). */
moe_config *moe_config_load(const char *path);
/* Width of dense layer `layer`'s MLP: intermediate_size, or a folded
 * condensed layer's own width (mlp.{gate,up,down}_proj shapes). */
int moe_config_dense_width(const moe_config *c, int layer);
/* Same from JSON text; `name` is used in messages. */
moe_config *moe_config_parse(const char *json, size_t len, const char *name);
/* The same for the config of a checkpoint whose safetensors hold max_tensors
 * tensors: sizes that imply far more tensors than that (over 4 * max_tensors
 * + 64, e.g. num_hidden_layers 2^30, or 2^30 experts) are refused before
 * anything is allocated per layer or expert, so a hostile config.json costs
 * no more memory than a few times the checkpoint's own headers (a config a
 * few tensors off is left to the checkpoint's check, which names the first
 * missing tensor).  SIZE_MAX: no bound (a config on its own). */
moe_config *moe_config_parse_bounded(const char *json, size_t len, const char *name, size_t max_tensors);
moe_config *moe_config_load_bounded(const char *path, size_t max_tensors);
void moe_config_free(moe_config *c);

/* Build a config in code (moe-init): moe_config_new() fills the arch's
 * defaults for a tiny model; set fields, then moe_config_finish() validates
 * and computes shared sizes and layers[].  Returns 0 or -1. */
moe_config *moe_config_new(const moe_arch *arch);
int moe_config_finish(moe_config *c);
/* Mark layer l condensed (copies the arrays).  0 or -1 (layer not MoE,
 * bad ids). */
int moe_config_condense(moe_config *c, int layer, int n, const int *experts,
                        const float *weights);

/* Drop layer l (LayerDrop: its MLP block; BlockDrop: the whole decoder
 * layer).  Any layer may be dropped, once.  0 or -1. */
int moe_config_drop(moe_config *c, int layer, moe_drop_kind d);
/* "mlp" / "block" (and back: -1 when unknown). */
const char *moe_drop_name(moe_drop_kind d);
int moe_drop_from_name(const char *s);
/* Is layer l a routed MoE layer of the base model (whatever it became)? */
int moe_config_base_is_moe(const moe_config *c, int layer);

/* Sizes and flags to change in a config (moe-init's options); a field of
 * MOE_CONFIG_KEEP keeps the config's value.  moe_config_overrides_init()
 * sets every field so. */
#define MOE_CONFIG_KEEP (-1)
typedef struct {
    int hidden_size, num_layers, num_heads, num_kv_heads, head_dim;
    int n_routed_experts, top_k, moe_intermediate_size, intermediate_size;
    int shared_experts;           /* deepseek: n_shared_experts; qwen2_moe: the shared MLP is
                                     this many times moe_intermediate_size wide */
    int shared_intermediate_size; /* qwen2_moe */
    int first_k_dense_replace;    /* deepseek */
    int decoder_sparse_step;      /* qwen2_moe, qwen3_moe */
    int norm_topk_prob, vocab_size, max_position_embeddings;
} moe_config_overrides;
void moe_config_overrides_init(moe_config_overrides *o);
/* Apply the overrides to a finished config, with what follows from them:
 * num_key_value_heads capped at a smaller num_attention_heads, head_dim
 * hidden/heads where it was that before, the experts' width for olmoe and
 * mixtral that of the dense MLP; then moe_config_finish(), and the config's
 * condensed layers condensed again where they still exist.  An override the
 * architecture has no field for (shared experts for olmoe, first_k_dense_
 * replace for qwen...) is ignored: the caller refuses it.  0, or -1 with an
 * error (MOE_CONFIG_BAD_SIZES: hidden_size not a multiple of the heads where
 * head_dim follows from them; else moe_config_finish's). */
#define MOE_CONFIG_BAD_SIZES (-2)
int moe_config_override(moe_config *c, const moe_config_overrides *o);
/* config.json text as Hugging Face writes it for this architecture (all the
 * fields transformers, or deepseek's remote code, needs to build the model),
 * plus "condensed_layers" when any.  `dtype` is "bfloat16" / "float32".
 * Keys sorted, 2-space indent, trailing newline.  malloc'd. */
char *moe_config_to_json(const moe_config *c, const char *dtype);

/* ---- tensors ------------------------------------------------------------ */

typedef enum {
    /* global (layer = -1) */
    MOE_T_EMBED,        /* model.embed_tokens.weight        [vocab, H] */
    MOE_T_FINAL_NORM,   /* model.norm.weight                [H] */
    MOE_T_LM_HEAD,      /* lm_head.weight                   [vocab, H]
                           (tied: the name of the embedding) */
    /* per layer: model.layers.{l}. + */
    MOE_T_INPUT_NORM,   /* input_layernorm.weight           [H] */
    MOE_T_POST_NORM,    /* post_attention_layernorm.weight  [H] */
    MOE_T_Q_PROJ,       /* self_attn.q_proj.weight          [heads*D, H] */
    MOE_T_K_PROJ,       /* self_attn.k_proj.weight          [kv*D, H] */
    MOE_T_V_PROJ,       /* self_attn.v_proj.weight          [kv*D, H] */
    MOE_T_O_PROJ,       /* self_attn.o_proj.weight          [H, heads*D] */
    MOE_T_Q_BIAS,       /* self_attn.q_proj.bias            [heads*D]   (qkv_bias) */
    MOE_T_K_BIAS,       /* self_attn.k_proj.bias            [kv*D] */
    MOE_T_V_BIAS,       /* self_attn.v_proj.bias            [kv*D] */
    MOE_T_Q_NORM,       /* self_attn.q_norm.weight  [D] (HEAD) / [heads*D] (FULL) */
    MOE_T_K_NORM,       /* self_attn.k_norm.weight  [D] (HEAD) / [kv*D] (FULL) */
    MOE_T_MLP_GATE,     /* dense: mlp.gate_proj.weight      [I, H] */
    MOE_T_MLP_UP,       /* dense: mlp.up_proj.weight        [I, H] */
    MOE_T_MLP_DOWN,     /* dense: mlp.down_proj.weight      [H, I] */
    MOE_T_ROUTER,       /* MoE: <mlp>.gate.weight           [E, H] */
    MOE_T_EXPERT_GATE,  /* <mlp>.experts.{j}.gate_proj|w1.weight [Im, H] */
    MOE_T_EXPERT_UP,    /* <mlp>.experts.{j}.up_proj|w3.weight   [Im, H] */
    MOE_T_EXPERT_DOWN,  /* <mlp>.experts.{j}.down_proj|w2.weight [H, Im] */
    MOE_T_SHARED_GATE,  /* mlp.shared_expert(s).gate_proj.weight [Is, H] */
    MOE_T_SHARED_UP,    /* mlp.shared_expert(s).up_proj.weight   [Is, H] */
    MOE_T_SHARED_DOWN,  /* mlp.shared_expert(s).down_proj.weight [H, Is] */
    MOE_T_SHARED_EXPERT_GATE, /* qwen2_moe mlp.shared_expert_gate.weight [1, H] */
    MOE_T_COUNT
} moe_tensor_kind;

const char *moe_tensor_kind_name(moe_tensor_kind k); /* "q_proj", "expert_gate", ... */

/* Does layer `layer` (-1 for globals) of this config have tensor kind k?
 * (For experts: whether the layer has routed experts; for a condensed layer
 * MOE_T_ROUTER is absent.)  LM_HEAD is present even when tied (it then names
 * the embedding). */
int moe_config_has_tensor(const moe_config *c, int layer, moe_tensor_kind k);
/* Is expert j of this layer needed (MOE: 0 <= j < E; CONDENSED: j kept)? */
int moe_config_has_expert(const moe_config *c, int layer, int expert);
/* Tensor name into buf.  `expert` is used by MOE_T_EXPERT_*, ignored
 * otherwise.  Returns 0, or -1 with an error if the tensor does not exist for
 * this layer/arch or buf is too small. */
int moe_config_tensor_name(const moe_config *c, int layer, moe_tensor_kind k, int expert,
                           char *buf, size_t size);
/* Expected shape; returns ndim (1 or 2), or -1 with an error if absent. */
int moe_config_tensor_shape(const moe_config *c, int layer, moe_tensor_kind k, int64_t shape[2]);

#define MOE_TENSOR_NAME_MAX 128

/* One tensor a config implies. */
typedef struct moe_tensor_ref {
    moe_tensor_kind kind;
    int layer;          /* -1 for globals */
    int expert;         /* -1 unless MOE_T_EXPERT_* */
    int ndim;
    int64_t shape[2];
    char name[MOE_TENSOR_NAME_MAX];
} moe_tensor_ref;

/* Every tensor the config implies, each once, in Hugging Face module order:
 * embed, then per layer (input norm, attention q,k,v,o (+biases, norms),
 * post norm, MLP: dense gate/up/down | router, experts in id order
 * (gate, up, down each), shared gate/up/down, shared_expert_gate), final
 * norm, lm_head (omitted when tied).  Returns the count and a malloc'd
 * array in *out, or -1. */
int moe_config_tensor_list(const moe_config *c, moe_tensor_ref **out);

#endif
