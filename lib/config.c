/* config.c - config.json parsing, the architecture table, tensor names (see config.h). */
#include "config.h"
#include "common.h"

#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* ---- the architecture table ------------------------------------------------ */

static const moe_arch arches[MOE_ARCH_COUNT] = {
    [MOE_ARCH_DEEPSEEK] = {
        .id = MOE_ARCH_DEEPSEEK, .model_type = "deepseek", .hf_class = "DeepseekForCausalLM",
        .remote_code = 1, .key_experts = "n_routed_experts", .key_moe_inter = "moe_intermediate_size",
        .layer_rule = MOE_LAYERS_DEEPSEEK, .shared = MOE_SHARED_COUNT, .qk_norm = MOE_QK_NORM_NONE,
        .qkv_bias_default = 0, .router = MOE_ROUTER_SOFTMAX_TOPK, .router_softmax_fp32 = 0,
        .norm_topk_default = 0, .norm_topk_eps = 1e-20, .rms_norm_eps_default = 1e-6,
        .rope_theta_default = 10000.0, .mlp_prefix = "mlp",
        .expert_proj = {"gate_proj", "up_proj", "down_proj"},
        .shared_prefix = "shared_experts", .shared_gate = NULL},
    [MOE_ARCH_QWEN2_MOE] = {
        .id = MOE_ARCH_QWEN2_MOE, .model_type = "qwen2_moe", .hf_class = "Qwen2MoeForCausalLM",
        .remote_code = 0, .key_experts = "num_experts", .key_moe_inter = "moe_intermediate_size",
        .layer_rule = MOE_LAYERS_QWEN, .shared = MOE_SHARED_SIZE, .qk_norm = MOE_QK_NORM_NONE,
        .qkv_bias_default = 1, .router = MOE_ROUTER_SOFTMAX_TOPK, .router_softmax_fp32 = 1,
        .norm_topk_default = 0, .norm_topk_eps = 0, .rms_norm_eps_default = 1e-6,
        .rope_theta_default = 10000.0, .mlp_prefix = "mlp",
        .expert_proj = {"gate_proj", "up_proj", "down_proj"},
        .shared_prefix = "shared_expert", .shared_gate = "shared_expert_gate"},
    [MOE_ARCH_QWEN3_MOE] = {
        .id = MOE_ARCH_QWEN3_MOE, .model_type = "qwen3_moe", .hf_class = "Qwen3MoeForCausalLM",
        .remote_code = 0, .key_experts = "num_experts", .key_moe_inter = "moe_intermediate_size",
        .layer_rule = MOE_LAYERS_QWEN, .shared = MOE_SHARED_NONE, .qk_norm = MOE_QK_NORM_HEAD,
        .qkv_bias_default = 0, .router = MOE_ROUTER_SOFTMAX_TOPK, .router_softmax_fp32 = 1,
        .norm_topk_default = 0, .norm_topk_eps = 0, .rms_norm_eps_default = 1e-6,
        .rope_theta_default = 10000.0, .mlp_prefix = "mlp",
        .expert_proj = {"gate_proj", "up_proj", "down_proj"},
        .shared_prefix = NULL, .shared_gate = NULL},
    [MOE_ARCH_OLMOE] = {
        .id = MOE_ARCH_OLMOE, .model_type = "olmoe", .hf_class = "OlmoeForCausalLM",
        .remote_code = 0, .key_experts = "num_experts", .key_moe_inter = NULL,
        .layer_rule = MOE_LAYERS_ALL, .shared = MOE_SHARED_NONE, .qk_norm = MOE_QK_NORM_FULL,
        .qkv_bias_default = 0, .router = MOE_ROUTER_SOFTMAX_TOPK, .router_softmax_fp32 = 1,
        .norm_topk_default = 0, .norm_topk_eps = 0, .rms_norm_eps_default = 1e-5,
        .rope_theta_default = 10000.0, .mlp_prefix = "mlp",
        .expert_proj = {"gate_proj", "up_proj", "down_proj"},
        .shared_prefix = NULL, .shared_gate = NULL},
    [MOE_ARCH_MIXTRAL] = {
        .id = MOE_ARCH_MIXTRAL, .model_type = "mixtral", .hf_class = "MixtralForCausalLM",
        .remote_code = 0, .key_experts = "num_local_experts", .key_moe_inter = NULL,
        .layer_rule = MOE_LAYERS_ALL, .shared = MOE_SHARED_NONE, .qk_norm = MOE_QK_NORM_NONE,
        .qkv_bias_default = 0, .router = MOE_ROUTER_TOPK_SOFTMAX, .router_softmax_fp32 = 1,
        .norm_topk_default = 1, .norm_topk_eps = 0, .rms_norm_eps_default = 1e-5,
        .rope_theta_default = 1000000.0, .mlp_prefix = "block_sparse_moe",
        .expert_proj = {"w1", "w3", "w2"},
        .shared_prefix = NULL, .shared_gate = NULL},
};

const moe_arch *moe_arch_get(moe_arch_id id)
{
    return (unsigned)id < MOE_ARCH_COUNT ? &arches[id] : NULL;
}

const moe_arch *moe_arch_find(const char *model_type)
{
    for (int i = 0; i < MOE_ARCH_COUNT; i++)
        if (!strcmp(arches[i].model_type, model_type)) return &arches[i];
    return NULL;
}

const char *moe_arch_list(void) { return "deepseek, qwen2_moe, qwen3_moe, olmoe, mixtral"; }

/* ---- JSON helpers ---------------------------------------------------------- */

/* Look up a key; JSON null counts as absent. */
static json_t *jget(json_t *o, const char *key)
{
    json_t *v = json_object_get(o, key);
    return json_is_null(v) ? NULL : v;
}

/* Integer key: required (dflt unused) or optional (dflt).  Accepts integral reals. */
static int jint(json_t *o, const char *key, int required, long long dflt, long long lo,
                long long hi, long long *out, const char *P)
{
    json_t *v = jget(o, key);
    if (!v) {
        if (required) {
            moe_error_set(MOE_ERR_DATA, "%s: key '%s' missing", P, key);
            return -1;
        }
        *out = dflt;
        return 0;
    }
    long long x;
    if (json_is_integer(v)) {
        x = json_integer_value(v);
    } else if (json_is_real(v) && json_real_value(v) == floor(json_real_value(v)) &&
               fabs(json_real_value(v)) < 9e15) {
        x = (long long)json_real_value(v);
    } else {
        moe_error_set(MOE_ERR_DATA, "%s: key '%s' is not an integer", P, key);
        return -1;
    }
    if (x < lo || x > hi) {
        moe_error_set(MOE_ERR_DATA, "%s: key '%s' = %lld out of range [%lld, %lld]", P, key, x, lo, hi);
        return -1;
    }
    *out = x;
    return 0;
}

static int jint32(json_t *o, const char *key, int required, int dflt, int lo, int *out, const char *P)
{
    long long x;
    if (jint(o, key, required, dflt, lo, 1LL << 30, &x, P) < 0) return -1;
    *out = (int)x;
    return 0;
}

static int jnum(json_t *o, const char *key, double dflt, double *out, const char *P)
{
    json_t *v = jget(o, key);
    if (!v) {
        *out = dflt;
        return 0;
    }
    if (!json_is_number(v)) {
        moe_error_set(MOE_ERR_DATA, "%s: key '%s' is not a number", P, key);
        return -1;
    }
    *out = json_number_value(v);
    return 0;
}

static int jbool(json_t *o, const char *key, int dflt, int *out, const char *P)
{
    json_t *v = jget(o, key);
    if (!v) {
        *out = dflt;
        return 0;
    }
    if (!json_is_boolean(v)) {
        moe_error_set(MOE_ERR_DATA, "%s: key '%s' is not true/false", P, key);
        return -1;
    }
    *out = json_is_true(v);
    return 0;
}

/* token id: integer, null/absent (-1), or a list (first element) */
static int jtoken(json_t *o, const char *key, int *out, const char *P)
{
    json_t *v = jget(o, key);
    if (v && json_is_array(v)) v = json_array_size(v) ? json_array_get(v, 0) : NULL;
    if (!v) {
        *out = -1;
        return 0;
    }
    if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > (1 << 30)) {
        moe_error_set(MOE_ERR_DATA, "%s: key '%s' is not a token id", P, key);
        return -1;
    }
    *out = (int)json_integer_value(v);
    return 0;
}

/* rope scaling object: only absent/null/"default" accepted */
static int check_rope_type(json_t *rs, const char *key, const char *P)
{
    if (!rs) return 0;
    if (!json_is_object(rs)) {
        moe_error_set(MOE_ERR_DATA, "%s: key '%s' is not an object", P, key);
        return -1;
    }
    json_t *t = jget(rs, "rope_type");
    if (!t) t = jget(rs, "type");
    if (!t) {
        if (!strcmp(key, "rope_scaling")) {
            moe_error_set(MOE_ERR_DATA, "%s: rope_scaling without a type is not supported", P);
            return -1;
        }
        return 0;
    }
    if (!json_is_string(t) || strcmp(json_string_value(t), "default")) {
        moe_error_set(MOE_ERR_DATA,
                      "%s: %s type '%s' is not supported (only plain RoPE: null or \"default\")", P,
                      key, json_is_string(t) ? json_string_value(t) : "?");
        return -1;
    }
    return 0;
}

/* ---- config building -------------------------------------------------------- */

static void layers_free(moe_config *c)
{
    if (c->layers)
        for (int l = 0; l < c->n_layers_alloc; l++) {
            free(c->layers[l].experts);
            free(c->layers[l].weights);
        }
    free(c->layers);
    c->layers = NULL;
    c->n_condensed = 0;
    c->n_dropped = 0;
}

void moe_config_free(moe_config *c)
{
    if (!c) return;
    layers_free(c);
    free(c->mlp_only_layers);
    free(c->path);
    free(c->dtype);
    free(c);
}

moe_config *moe_config_new(const moe_arch *a)
{
    moe_config *c = moe_calloc(1, sizeof *c);
    c->path = moe_strdup("");
    c->arch = a;
    c->hidden_size = 64;
    c->intermediate_size = 128;
    c->moe_intermediate_size = a->key_moe_inter ? 32 : 128;
    c->num_layers = 2;
    c->num_heads = 4;
    c->num_kv_heads = 2;
    c->head_dim = 16;
    c->vocab_size = 512;
    c->max_position_embeddings = 4096;
    c->rms_norm_eps = a->rms_norm_eps_default;
    c->rope_theta = a->rope_theta_default;
    c->n_routed_experts = 8;
    c->n_shared_experts = a->shared == MOE_SHARED_COUNT ? 2 : a->shared == MOE_SHARED_SIZE ? 1 : 0;
    c->shared_intermediate_size = a->shared == MOE_SHARED_SIZE ? 64 : 0;
    c->top_k = 2;
    c->norm_topk_prob = a->norm_topk_default;
    c->norm_topk_eps = a->norm_topk_eps;
    c->router = a->router;
    c->qkv_bias = a->qkv_bias_default;
    c->qk_norm = a->qk_norm;
    c->shared_gate = a->shared_gate != NULL;
    c->bos_token_id = c->eos_token_id = c->pad_token_id = -1;
    c->first_k_dense_replace = a->layer_rule == MOE_LAYERS_DEEPSEEK ? 1 : 0;
    c->moe_layer_freq = 1;
    c->decoder_sparse_step = 1;
    return c;
}

static int base_is_moe(const moe_config *c, int l)
{
    if (c->n_routed_experts <= 0) return 0;
    switch (c->arch->layer_rule) {
    case MOE_LAYERS_DEEPSEEK:
        return l >= c->first_k_dense_replace && c->moe_layer_freq > 0 && l % c->moe_layer_freq == 0;
    case MOE_LAYERS_QWEN:
        for (int i = 0; i < c->n_mlp_only_layers; i++)
            if (c->mlp_only_layers[i] == l) return 0;
        return c->decoder_sparse_step > 0 && (l + 1) % c->decoder_sparse_step == 0;
    case MOE_LAYERS_ALL:
        return 1;
    }
    return 0;
}

int moe_config_finish(moe_config *c)
{
    const char *P = c->path[0] ? c->path : "config";
    const moe_arch *a = c->arch;
    if (c->hidden_size <= 0 || c->num_layers <= 0 || c->num_heads <= 0 || c->num_kv_heads <= 0 ||
        c->vocab_size <= 0 || c->head_dim <= 0) {
        moe_error_set(MOE_ERR_DATA, "%s: sizes must be positive (hidden_size %d, layers %d, heads %d, "
                      "kv heads %d, head_dim %d, vocab %d)", P, c->hidden_size, c->num_layers,
                      c->num_heads, c->num_kv_heads, c->head_dim, c->vocab_size);
        return -1;
    }
    if (c->num_heads % c->num_kv_heads) {
        moe_error_set(MOE_ERR_DATA, "%s: num_attention_heads %d is not a multiple of num_key_value_heads %d",
                      P, c->num_heads, c->num_kv_heads);
        return -1;
    }
    if (c->head_dim % 2) {
        moe_error_set(MOE_ERR_DATA, "%s: head_dim %d is odd (RoPE needs an even head_dim)", P, c->head_dim);
        return -1;
    }
    if (!a->key_moe_inter) c->moe_intermediate_size = c->intermediate_size;
    if (a->router == MOE_ROUTER_TOPK_SOFTMAX) c->norm_topk_prob = 1;
    if (c->n_routed_experts < 0) c->n_routed_experts = 0;
    /* shared experts */
    if (a->shared == MOE_SHARED_COUNT) {
        if (c->n_shared_experts < 0) c->n_shared_experts = 0;
        c->shared_intermediate_size = c->n_shared_experts * c->moe_intermediate_size;
    } else if (a->shared == MOE_SHARED_SIZE) {
        if (c->shared_intermediate_size < 0) c->shared_intermediate_size = 0;
        c->n_shared_experts = c->shared_intermediate_size > 0;
    } else {
        c->n_shared_experts = 0;
        c->shared_intermediate_size = 0;
    }
    c->shared_gate = a->shared_gate != NULL && c->n_shared_experts > 0;
    /* per-layer descriptors */
    layers_free(c);
    /* calloc, not moe_calloc: a config.json of 2^30 layers read without its
     * checkpoint (moe-init --config) is bad data, not a reason to abort */
    c->layers = calloc((size_t)c->num_layers, sizeof *c->layers);
    if (!c->layers) {
        moe_error_set(MOE_ERR_DATA, "%s: %d layers: out of memory for the layer table", P, c->num_layers);
        return -1;
    }
    c->n_layers_alloc = c->num_layers;
    int n_moe = 0, n_dense = 0;
    for (int l = 0; l < c->num_layers; l++) {
        moe_layer_mlp *m = &c->layers[l];
        if (base_is_moe(c, l)) {
            m->kind = MOE_MLP_MOE;
            m->has_shared = c->n_shared_experts > 0;
            n_moe++;
        } else {
            m->kind = MOE_MLP_DENSE;
            n_dense++;
        }
    }
    if (n_dense && c->intermediate_size <= 0) {
        moe_error_set(MOE_ERR_DATA, "%s: intermediate_size must be positive (%d dense layers)", P, n_dense);
        return -1;
    }
    if (n_moe) {
        if (c->moe_intermediate_size <= 0) {
            moe_error_set(MOE_ERR_DATA, "%s: %s must be positive", P,
                          a->key_moe_inter ? a->key_moe_inter : "intermediate_size");
            return -1;
        }
        if (c->top_k < 1 || c->top_k > c->n_routed_experts) {
            moe_error_set(MOE_ERR_DATA, "%s: num_experts_per_tok %d not in [1, %d experts]", P,
                          c->top_k, c->n_routed_experts);
            return -1;
        }
    }
    return 0;
}

int moe_config_condense(moe_config *c, int layer, int n, const int *experts, const float *weights)
{
    const char *P = c->path[0] ? c->path : "config";
    if (layer < 0 || layer >= c->num_layers) {
        moe_error_set(MOE_ERR_DATA, "%s: condensed_layers: layer %d out of range [0, %d)", P, layer,
                      c->num_layers);
        return -1;
    }
    moe_layer_mlp *m = &c->layers[layer];
    if (m->kind == MOE_MLP_DENSE || m->kind == MOE_MLP_NONE) {
        moe_error_set(MOE_ERR_DATA, "%s: condensed_layers: layer %d is a %s layer, not MoE", P, layer,
                      m->kind == MOE_MLP_NONE ? "dropped" : "dense");
        return -1;
    }
    for (int i = 0; i < n; i++) {
        if (experts[i] < 0 || experts[i] >= c->n_routed_experts) {
            moe_error_set(MOE_ERR_DATA, "%s: condensed_layers: layer %d: expert %d out of range [0, %d)",
                          P, layer, experts[i], c->n_routed_experts);
            return -1;
        }
        for (int j = 0; j < i; j++)
            if (experts[j] == experts[i]) {
                moe_error_set(MOE_ERR_DATA, "%s: condensed_layers: layer %d: expert %d listed twice", P,
                              layer, experts[i]);
                return -1;
            }
        if (!isfinite(weights[i])) {
            moe_error_set(MOE_ERR_DATA, "%s: condensed_layers: layer %d: weight %d is not finite", P,
                          layer, i);
            return -1;
        }
    }
    if (m->kind != MOE_MLP_CONDENSED) c->n_condensed++;
    free(m->experts);
    free(m->weights);
    m->kind = MOE_MLP_CONDENSED;
    m->n_kept = n;
    m->experts = moe_malloc((size_t)(n ? n : 1) * sizeof(int));
    m->weights = moe_malloc((size_t)(n ? n : 1) * sizeof(float));
    if (n) {
        memcpy(m->experts, experts, (size_t)n * sizeof(int));
        memcpy(m->weights, weights, (size_t)n * sizeof(float));
    }
    return 0;
}

/* A folded condensed layer (moe-condense --fold) is a dense MLP of width
 * kept * moe_intermediate_size + shared width (moe_config_dense_width), which
 * the engine loads and runs at that width. */
static int folded_to_dense(moe_config *c, int layer, const char *P)
{
    moe_layer_mlp *m = &c->layers[layer];
    int shared = m->has_shared && c->shared_intermediate_size > 0;
    if (shared && c->shared_gate) {
        moe_error_set(MOE_ERR_DATA, "%s: condensed_layers: layer %d: folded, but the shared expert is gated",
                      P, layer);
        return -1;
    }
    long width = (long)m->n_kept * c->moe_intermediate_size + (shared ? c->shared_intermediate_size : 0);
    m->kind = MOE_MLP_DENSE;
    m->dense_width = (int)width;
    c->n_condensed--;
    return 0;
}

static const char *drop_names[] = {"none", "mlp", "block"};

const char *moe_drop_name(moe_drop_kind d)
{
    return (unsigned)d <= MOE_DROP_BLOCK ? drop_names[d] : "?";
}

int moe_drop_from_name(const char *s)
{
    for (int d = MOE_DROP_MLP; d <= MOE_DROP_BLOCK; d++)
        if (strcmp(s, drop_names[d]) == 0) return d;
    return -1;
}

int moe_config_base_is_moe(const moe_config *c, int layer)
{
    return layer >= 0 && layer < c->num_layers && base_is_moe(c, layer);
}

int moe_config_drop(moe_config *c, int layer, moe_drop_kind d)
{
    const char *P = c->path[0] ? c->path : "config";
    if (layer < 0 || layer >= c->num_layers) {
        moe_error_set(MOE_ERR_DATA, "%s: dropped_layers: layer %d out of range [0, %d)", P, layer,
                      c->num_layers);
        return -1;
    }
    if (d != MOE_DROP_MLP && d != MOE_DROP_BLOCK) {
        moe_error_set(MOE_ERR_DATA, "%s: dropped_layers: layer %d: unknown drop kind", P, layer);
        return -1;
    }
    moe_layer_mlp *m = &c->layers[layer];
    if (m->kind == MOE_MLP_NONE || m->kind == MOE_MLP_CONDENSED) {
        moe_error_set(MOE_ERR_DATA, "%s: dropped_layers: layer %d is already %s", P, layer,
                      m->kind == MOE_MLP_NONE ? "dropped" : "condensed");
        return -1;
    }
    m->kind = MOE_MLP_NONE;
    m->drop = d;
    m->has_shared = 0;
    c->n_dropped++;
    return 0;
}

/* A key of condensed_layers / dropped_layers: a decoder layer index. */
static int layer_key(const moe_config *c, const char *key, const char *table, const char *P, long *l)
{
    char *end;
    errno = 0;
    *l = strtol(key, &end, 10);
    if (!*key || *end || errno || *l < 0 || *l >= c->num_layers) {
        moe_error_set(MOE_ERR_DATA, "%s: %s: key '%s' is not a layer index in [0, %d)", P, table, key,
                      c->num_layers);
        return -1;
    }
    return 0;
}

/* "dropped_layers": {"<layer>": "mlp" | "block"} */
static int parse_dropped(moe_config *c, json_t *dl, const char *P)
{
    if (!json_is_object(dl)) {
        moe_error_set(MOE_ERR_DATA, "%s: dropped_layers is not an object", P);
        return -1;
    }
    const char *key;
    json_t *v;
    json_object_foreach(dl, key, v) {
        long l;
        if (layer_key(c, key, "dropped_layers", P, &l) < 0) return -1;
        int d = json_is_string(v) ? moe_drop_from_name(json_string_value(v)) : -1;
        if (d < 0) {
            moe_error_set(MOE_ERR_DATA, "%s: dropped_layers: layer %ld: expected \"mlp\" or \"block\"",
                          P, l);
            return -1;
        }
        if (moe_config_drop(c, (int)l, (moe_drop_kind)d) < 0) return -1;
    }
    return 0;
}

int moe_config_dense_width(const moe_config *c, int layer)
{
    int w = layer >= 0 && layer < c->num_layers ? c->layers[layer].dense_width : 0;
    return w > 0 ? w : c->intermediate_size;
}

static int parse_condensed(moe_config *c, json_t *cl, const char *P)
{
    if (!json_is_object(cl)) {
        moe_error_set(MOE_ERR_DATA, "%s: condensed_layers is not an object", P);
        return -1;
    }
    const char *key;
    json_t *v;
    json_object_foreach(cl, key, v) {
        long l;
        if (layer_key(c, key, "condensed_layers", P, &l) < 0) return -1;
        json_t *je = json_is_object(v) ? json_object_get(v, "experts") : NULL;
        json_t *jw = json_is_object(v) ? json_object_get(v, "weights") : NULL;
        if (!json_is_array(je) || !json_is_array(jw) || json_array_size(je) != json_array_size(jw)) {
            moe_error_set(MOE_ERR_DATA,
                          "%s: condensed_layers: layer %ld: needs \"experts\" and \"weights\" arrays of "
                          "the same length", P, l);
            return -1;
        }
        int n = (int)json_array_size(je);
        int *ids = moe_malloc((size_t)(n ? n : 1) * sizeof(int));
        float *w = moe_malloc((size_t)(n ? n : 1) * sizeof(float));
        for (int i = 0; i < n; i++) {
            json_t *x = json_array_get(je, i), *y = json_array_get(jw, i);
            if (!json_is_integer(x) || !json_is_number(y) || json_integer_value(x) < -1 ||
                json_integer_value(x) > (1 << 30)) {
                free(ids);
                free(w);
                moe_error_set(MOE_ERR_DATA,
                              "%s: condensed_layers: layer %ld: entry %d is not (integer id, number)", P, l, i);
                return -1;
            }
            ids[i] = (int)json_integer_value(x);
            w[i] = (float)json_number_value(y);
        }
        int rc = moe_config_condense(c, (int)l, n, ids, w);
        free(ids);
        free(w);
        if (rc == 0 && json_is_true(json_object_get(v, "folded"))) rc = folded_to_dense(c, (int)l, P);
        if (rc < 0) return -1;
    }
    return 0;
}

/* The fewest tensors any layer implies: input and post-attention norms and
 * q, k, v, o; plus the embedding and the final norm. */
#define MIN_TENSORS_PER_LAYER 6
#define MIN_GLOBAL_TENSORS 2

/* How many implied tensors a checkpoint of max_tensors tensors may be asked
 * for before the config is refused on its sizes alone.  Generous: a config
 * a few tensors off gets the checkpoint's precise message naming the first
 * missing tensor; this bound is only there to keep absurd sizes (2^30
 * layers or experts) from allocating more than a few times what the
 * checkpoint's headers already take. */
static uint64_t tensor_allowance(size_t max_tensors)
{
    return max_tensors >= (SIZE_MAX - 64) / 4 ? UINT64_MAX : 4 * (uint64_t)max_tensors + 64;
}

/* Before a layer table is allocated: could a checkpoint of max_tensors
 * tensors hold num_hidden_layers layers at all? */
static int check_layer_budget(const moe_config *c, size_t max_tensors, const char *P)
{
    uint64_t need = (uint64_t)c->num_layers * MIN_TENSORS_PER_LAYER + MIN_GLOBAL_TENSORS;
    if (need <= tensor_allowance(max_tensors)) return 0;
    moe_error_set(MOE_ERR_DATA, "%s: num_hidden_layers %d implies at least %llu tensors, but the "
                  "checkpoint's safetensors hold only %zu", P, c->num_layers, (unsigned long long)need,
                  max_tensors);
    return -1;
}

static int64_t tensor_walk(const moe_config *c, moe_tensor_ref **out, int64_t limit);

/* Once the layers are known: every tensor the config implies must be in the
 * checkpoint, so more than it holds is an error (counted, nothing allocated:
 * 2^30 experts would otherwise make a tensor list of gigabytes). */
static int check_tensor_budget(const moe_config *c, size_t max_tensors, const char *P)
{
    uint64_t allowed = tensor_allowance(max_tensors);
    int64_t need = tensor_walk(c, NULL, allowed < INT64_MAX ? (int64_t)allowed : INT64_MAX);
    if (need < 0) return -1;
    if ((uint64_t)need <= allowed) return 0;
    moe_error_set(MOE_ERR_DATA, "%s: its sizes (num_hidden_layers %d, %d routed experts) imply %lld "
                  "tensors, but the checkpoint's safetensors hold only %zu", P, c->num_layers,
                  c->n_routed_experts, (long long)need, max_tensors);
    return -1;
}

moe_config *moe_config_parse(const char *text, size_t len, const char *name)
{
    return moe_config_parse_bounded(text, len, name, SIZE_MAX);
}

/* The sizes every architecture has, and the activation (only silu). */
static int parse_sizes(json_t *root, moe_config *c, const moe_arch *a, const char *P) {
    (void)a;
    json_t *act = jget(root, "hidden_act");
    if (act && (!json_is_string(act) || strcmp(json_string_value(act), "silu"))) {
        moe_error_set(MOE_ERR_DATA, "%s: hidden_act '%s' is not supported (only silu)", P,
                      json_is_string(act) ? json_string_value(act) : "?");
        return -1;
    }
    if (jint32(root, "hidden_size", 1, 0, 1, &c->hidden_size, P) ||
        jint32(root, "num_hidden_layers", 1, 0, 1, &c->num_layers, P) ||
        jint32(root, "num_attention_heads", 1, 0, 1, &c->num_heads, P) ||
        jint32(root, "vocab_size", 1, 0, 1, &c->vocab_size, P) ||
        jint32(root, "intermediate_size", 1, 0, 0, &c->intermediate_size, P) ||
        jint32(root, "num_key_value_heads", 0, c->num_heads, 1, &c->num_kv_heads, P) ||
        jint32(root, "max_position_embeddings", 0, 4096, 1, &c->max_position_embeddings, P))
        return -1;
    if (jget(root, "head_dim")) {
        if (jint32(root, "head_dim", 1, 0, 1, &c->head_dim, P)) return -1;
    } else {
        if (c->hidden_size % c->num_heads) {
            moe_error_set(MOE_ERR_DATA, "%s: hidden_size %d is not a multiple of num_attention_heads %d",
                          P, c->hidden_size, c->num_heads);
            return -1;
        }
        c->head_dim = c->hidden_size / c->num_heads;
    }
    return 0;
}

/* Routed and shared experts (each architecture spells them its own way). */
static int parse_experts(json_t *root, moe_config *c, const moe_arch *a, const char *P) {
    /* experts: the arch's spelling first, then the others */
    const char *ekeys[4] = {a->key_experts, "num_experts", "num_local_experts", "n_routed_experts"};
    c->n_routed_experts = 0;
    for (int i = 0; i < 4; i++)
        if (jget(root, ekeys[i])) {
            if (jint32(root, ekeys[i], 1, 0, 0, &c->n_routed_experts, P)) return -1;
            break;
        }
    if (jint32(root, "num_experts_per_tok", c->n_routed_experts > 0, 0, 0, &c->top_k, P)) return -1;
    if (a->key_moe_inter) {
        if (jint32(root, a->key_moe_inter, c->n_routed_experts > 0, 0, 0, &c->moe_intermediate_size, P))
            return -1;
    }
    if (a->shared == MOE_SHARED_COUNT) {
        if (jint32(root, "n_shared_experts", 0, 0, 0, &c->n_shared_experts, P)) return -1;
    } else if (a->shared == MOE_SHARED_SIZE) {
        if (jint32(root, "shared_expert_intermediate_size", 0, 0, 0, &c->shared_intermediate_size, P))
            return -1;
    }
    return 0;
}

/* Routing normalisation, tied embeddings, RMSNorm epsilon, special tokens and RoPE. */
static int parse_norm_rope(json_t *root, moe_config *c, const moe_arch *a, const char *P) {
    if (jbool(root, "norm_topk_prob", a->norm_topk_default, &c->norm_topk_prob, P) ||
        jbool(root, "tie_word_embeddings", 0, &c->tie_word_embeddings, P) ||
        jnum(root, "rms_norm_eps", a->rms_norm_eps_default, &c->rms_norm_eps, P) ||
        jtoken(root, "bos_token_id", &c->bos_token_id, P) ||
        jtoken(root, "eos_token_id", &c->eos_token_id, P) ||
        jtoken(root, "pad_token_id", &c->pad_token_id, P))
        return -1;
    if (!(c->rms_norm_eps > 0)) {
        moe_error_set(MOE_ERR_DATA, "%s: rms_norm_eps must be positive", P);
        return -1;
    }
    /* rope */
    json_t *rp = jget(root, "rope_parameters");
    if (check_rope_type(jget(root, "rope_scaling"), "rope_scaling", P) ||
        check_rope_type(rp, "rope_parameters", P))
        return -1;
    if (jget(root, "rope_theta")) {
        if (jnum(root, "rope_theta", 0, &c->rope_theta, P)) return -1;
    } else if (rp && jget(rp, "rope_theta")) {
        if (jnum(rp, "rope_theta", 0, &c->rope_theta, P)) return -1;
    }
    if (!(c->rope_theta > 0)) {
        moe_error_set(MOE_ERR_DATA, "%s: rope_theta must be positive", P);
        return -1;
    }
    return 0;
}

/* Attention extras: biases, sliding window, OLMoE's clip_qkv. */
static int parse_attention(json_t *root, moe_config *c, const moe_arch *a, const char *P) {
    /* attention extras */
    int attn_bias = 0;
    if (jbool(root, "attention_bias", 0, &attn_bias, P)) return -1;
    if (attn_bias) {
        moe_error_set(MOE_ERR_DATA, "%s: attention_bias true is not supported for %s", P, a->model_type);
        return -1;
    }
    if (a->id == MOE_ARCH_QWEN2_MOE && jbool(root, "qkv_bias", 1, &c->qkv_bias, P)) return -1;
    int sw = 0;
    if (jbool(root, "use_sliding_window", 0, &sw, P)) return -1;
    if (sw) {
        moe_error_set(MOE_ERR_DATA, "%s: use_sliding_window true is not supported", P);
        return -1;
    }
    if (a->id == MOE_ARCH_MIXTRAL && jint32(root, "sliding_window", 0, 0, 0, &c->sliding_window, P))
        return -1;
    if (a->id == MOE_ARCH_OLMOE) {
        if (jnum(root, "clip_qkv", 0, &c->clip_qkv, P)) return -1;
        if (c->clip_qkv < 0) {
            moe_error_set(MOE_ERR_DATA, "%s: clip_qkv must be positive", P);
            return -1;
        }
    }
    return 0;
}

/* Which layers are MoE: DeepSeek's first_k_dense_replace / moe_layer_freq, Qwen's decoder_sparse_step / mlp_only_layers. */
static int parse_layer_rule(json_t *root, moe_config *c, const moe_arch *a, const char *P) {
    if (a->id == MOE_ARCH_DEEPSEEK) {
        json_t *sf = jget(root, "scoring_func");
        if (sf && (!json_is_string(sf) || strcmp(json_string_value(sf), "softmax"))) {
            moe_error_set(MOE_ERR_DATA, "%s: scoring_func '%s' is not supported (only softmax)", P,
                          json_is_string(sf) ? json_string_value(sf) : "?");
            return -1;
        }
        if (jint32(root, "first_k_dense_replace", 0, 0, 0, &c->first_k_dense_replace, P) ||
            jint32(root, "moe_layer_freq", 0, 1, 1, &c->moe_layer_freq, P))
            return -1;
    }
    if (a->layer_rule == MOE_LAYERS_QWEN) {
        if (jint32(root, "decoder_sparse_step", 0, 1, 1, &c->decoder_sparse_step, P)) return -1;
        json_t *mo = jget(root, "mlp_only_layers");
        if (mo) {
            if (!json_is_array(mo)) {
                moe_error_set(MOE_ERR_DATA, "%s: mlp_only_layers is not an array", P);
                return -1;
            }
            c->n_mlp_only_layers = (int)json_array_size(mo);
            c->mlp_only_layers = moe_malloc((size_t)(c->n_mlp_only_layers + 1) * sizeof(int));
            for (int i = 0; i < c->n_mlp_only_layers; i++) {
                json_t *x = json_array_get(mo, i);
                if (!json_is_integer(x)) {
                    moe_error_set(MOE_ERR_DATA, "%s: mlp_only_layers[%d] is not an integer", P, i);
                    return -1;
                }
                c->mlp_only_layers[i] = (int)json_integer_value(x);
            }
        }
    }
    return 0;
}

moe_config *moe_config_parse_bounded(const char *text, size_t len, const char *name, size_t max_tensors)
{
    const char *P = name;
    json_error_t je;
    json_t *root = json_loadb(text, len, JSON_REJECT_DUPLICATES, &je);
    if (!root) {
        moe_error_set(MOE_ERR_DATA, "%s: not valid JSON (line %d: %s)", P, je.line, je.text);
        return NULL;
    }
    moe_config *c = NULL;
    if (!json_is_object(root)) {
        moe_error_set(MOE_ERR_DATA, "%s: not a JSON object", P);
        goto fail;
    }
    json_t *mt = jget(root, "model_type");
    if (!json_is_string(mt)) {
        moe_error_set(MOE_ERR_DATA, "%s: key 'model_type' missing or not a string", P);
        goto fail;
    }
    const moe_arch *a = moe_arch_find(json_string_value(mt));
    if (!a) {
        moe_error_set(MOE_ERR_DATA, "%s: model_type '%s' is not supported (supported: %s)", P,
                      json_string_value(mt), moe_arch_list());
        goto fail;
    }
    c = moe_config_new(a);
    free(c->path);
    c->path = moe_strdup(name);
    json_t *dt = jget(root, "torch_dtype");
    if (!dt) dt = jget(root, "dtype");
    if (json_is_string(dt)) c->dtype = moe_strdup(json_string_value(dt));

    if (parse_sizes(root, c, a, P) < 0 || parse_experts(root, c, a, P) < 0 ||
        parse_norm_rope(root, c, a, P) < 0 || parse_attention(root, c, a, P) < 0 ||
        parse_layer_rule(root, c, a, P) < 0)
        goto fail;
    if (check_layer_budget(c, max_tensors, P) < 0 || moe_config_finish(c) < 0) goto fail;
    json_t *cl = jget(root, "condensed_layers");
    if (cl && parse_condensed(c, cl, P) < 0) goto fail;
    json_t *dl = jget(root, "dropped_layers");
    if (dl && parse_dropped(c, dl, P) < 0) goto fail;
    if (max_tensors != SIZE_MAX && check_tensor_budget(c, max_tensors, P) < 0) goto fail;
    json_decref(root);
    return c;
fail:
    moe_config_free(c);
    json_decref(root);
    return NULL;
}

moe_config *moe_config_load(const char *path)
{
    return moe_config_load_bounded(path, SIZE_MAX);
}

moe_config *moe_config_load_bounded(const char *path, size_t max_tensors)
{
    struct stat st;
    char *file;
    if (stat(path, &st) == 0 && S_ISDIR(st.st_mode)) {
        file = moe_malloc(strlen(path) + 16);
        sprintf(file, "%s/config.json", path);
    } else {
        file = moe_strdup(path);
    }
    FILE *fp = fopen(file, "rb");
    if (!fp) {
        moe_error_set(MOE_ERR_IO, "%s: cannot open: %s", file, strerror(errno));
        free(file);
        return NULL;
    }
    size_t cap = 1 << 16, n = 0;
    char *buf = moe_malloc(cap);
    size_t k;
    while ((k = fread(buf + n, 1, cap - n, fp)) > 0) {
        n += k;
        if (n == cap) {
            if (cap >= (64u << 20)) {
                moe_error_set(MOE_ERR_DATA, "%s: larger than 64 MB, not a config.json", file);
                fclose(fp);
                free(buf);
                free(file);
                return NULL;
            }
            cap *= 2;
            buf = moe_realloc(buf, cap);
        }
    }
    int err = ferror(fp);
    fclose(fp);
    if (err) {
        moe_error_set(MOE_ERR_IO, "%s: read error", file);
        free(buf);
        free(file);
        return NULL;
    }
    moe_config *c = moe_config_parse_bounded(buf, n, file, max_tensors);
    free(buf);
    free(file);
    return c;
}

/* ---- writing config.json ------------------------------------------------------ */

static json_t *jtok(int id) { return id >= 0 ? json_integer(id) : json_null(); }

char *moe_config_to_json(const moe_config *c, const char *dtype)
{
    const moe_arch *a = c->arch;
    json_t *o = json_object();
    json_object_set_new(o, "architectures", json_pack("[s]", a->hf_class));
    json_object_set_new(o, "model_type", json_string(a->model_type));
    json_object_set_new(o, "hidden_size", json_integer(c->hidden_size));
    json_object_set_new(o, "intermediate_size", json_integer(c->intermediate_size));
    json_object_set_new(o, "num_hidden_layers", json_integer(c->num_layers));
    json_object_set_new(o, "num_attention_heads", json_integer(c->num_heads));
    json_object_set_new(o, "num_key_value_heads", json_integer(c->num_kv_heads));
    json_object_set_new(o, "vocab_size", json_integer(c->vocab_size));
    json_object_set_new(o, "max_position_embeddings", json_integer(c->max_position_embeddings));
    json_object_set_new(o, "rms_norm_eps", json_real(c->rms_norm_eps));
    json_object_set_new(o, "rope_theta", json_real(c->rope_theta));
    json_object_set_new(o, "rope_scaling", json_null());
    json_object_set_new(o, "hidden_act", json_string("silu"));
    json_object_set_new(o, "tie_word_embeddings", json_boolean(c->tie_word_embeddings));
    json_object_set_new(o, "torch_dtype", json_string(dtype));
    json_object_set_new(o, "bos_token_id", jtok(c->bos_token_id));
    json_object_set_new(o, "eos_token_id", jtok(c->eos_token_id));
    json_object_set_new(o, "pad_token_id", jtok(c->pad_token_id));
    json_object_set_new(o, "initializer_range", json_real(0.02));
    json_object_set_new(o, "use_cache", json_true());
    json_object_set_new(o, "attention_bias", json_false());
    json_object_set_new(o, "attention_dropout", json_real(0.0));
    json_object_set_new(o, "num_experts_per_tok", json_integer(c->top_k));
    if (a->id != MOE_ARCH_MIXTRAL) json_object_set_new(o, "norm_topk_prob", json_boolean(c->norm_topk_prob));
    if (a->key_moe_inter) json_object_set_new(o, a->key_moe_inter, json_integer(c->moe_intermediate_size));
    json_object_set_new(o, a->key_experts, json_integer(c->n_routed_experts));
    switch (a->id) {
    case MOE_ARCH_DEEPSEEK:
        json_object_set_new(o, "n_shared_experts", json_integer(c->n_shared_experts));
        json_object_set_new(o, "first_k_dense_replace", json_integer(c->first_k_dense_replace));
        json_object_set_new(o, "moe_layer_freq", json_integer(c->moe_layer_freq));
        json_object_set_new(o, "scoring_func", json_string("softmax"));
        json_object_set_new(o, "aux_loss_alpha", json_real(0.001));
        json_object_set_new(o, "seq_aux", json_true());
        json_object_set_new(o, "pretraining_tp", json_integer(1));
        json_object_set_new(o, "auto_map",
                            json_pack("{s:s,s:s,s:s}", "AutoConfig", "configuration_deepseek.DeepseekConfig",
                                      "AutoModel", "modeling_deepseek.DeepseekModel",
                                      "AutoModelForCausalLM", "modeling_deepseek.DeepseekForCausalLM"));
        break;
    case MOE_ARCH_QWEN2_MOE:
    case MOE_ARCH_QWEN3_MOE: {
        if (a->id == MOE_ARCH_QWEN2_MOE) {
            json_object_set_new(o, "shared_expert_intermediate_size",
                                json_integer(c->shared_intermediate_size));
            json_object_set_new(o, "qkv_bias", json_boolean(c->qkv_bias));
        } else {
            json_object_set_new(o, "head_dim", json_integer(c->head_dim));
        }
        json_object_set_new(o, "decoder_sparse_step", json_integer(c->decoder_sparse_step));
        json_t *mo = json_array();
        for (int i = 0; i < c->n_mlp_only_layers; i++) json_array_append_new(mo, json_integer(c->mlp_only_layers[i]));
        json_object_set_new(o, "mlp_only_layers", mo);
        json_object_set_new(o, "use_sliding_window", json_false());
        json_object_set_new(o, "sliding_window", json_null());
        json_object_set_new(o, "max_window_layers", json_integer(c->num_layers));
        json_object_set_new(o, "router_aux_loss_coef", json_real(0.001));
        json_object_set_new(o, "output_router_logits", json_false());
        break;
    }
    case MOE_ARCH_OLMOE:
        json_object_set_new(o, "clip_qkv", c->clip_qkv > 0 ? json_real(c->clip_qkv) : json_null());
        json_object_set_new(o, "router_aux_loss_coef", json_real(0.01));
        json_object_set_new(o, "output_router_logits", json_false());
        break;
    case MOE_ARCH_MIXTRAL:
        json_object_set_new(o, "head_dim", json_integer(c->head_dim));
        json_object_set_new(o, "sliding_window", c->sliding_window > 0 ? json_integer(c->sliding_window) : json_null());
        json_object_set_new(o, "router_aux_loss_coef", json_real(0.02));
        json_object_set_new(o, "router_jitter_noise", json_real(0.0));
        json_object_set_new(o, "output_router_logits", json_false());
        break;
    default:
        break;
    }
    if (c->head_dim * c->num_heads != c->hidden_size && !json_object_get(o, "head_dim"))
        json_object_set_new(o, "head_dim", json_integer(c->head_dim));
    if (c->n_condensed) {
        json_t *cl = json_object();
        for (int l = 0; l < c->num_layers; l++) {
            const moe_layer_mlp *m = &c->layers[l];
            if (m->kind != MOE_MLP_CONDENSED) continue;
            json_t *e = json_array(), *w = json_array();
            for (int i = 0; i < m->n_kept; i++) {
                json_array_append_new(e, json_integer(m->experts[i]));
                json_array_append_new(w, json_real(m->weights[i]));
            }
            char k[16];
            snprintf(k, sizeof k, "%d", l);
            json_object_set_new(cl, k, json_pack("{s:o,s:o}", "experts", e, "weights", w));
        }
        json_object_set_new(o, "condensed_layers", cl);
    }
    if (c->n_dropped) {
        json_t *dl = json_object();
        for (int l = 0; l < c->num_layers; l++) {
            if (c->layers[l].kind != MOE_MLP_NONE) continue;
            char k[16];
            snprintf(k, sizeof k, "%d", l);
            json_object_set_new(dl, k, json_string(moe_drop_name(c->layers[l].drop)));
        }
        json_object_set_new(o, "dropped_layers", dl);
    }
    char *s = json_dumps(o, JSON_SORT_KEYS | JSON_INDENT(2) | JSON_REAL_PRECISION(9));
    json_decref(o);
    size_t n = strlen(s);
    char *r = moe_malloc(n + 2);
    memcpy(r, s, n);
    r[n] = '\n';
    r[n + 1] = 0;
    free(s);
    return r;
}

/* ---- tensor names -------------------------------------------------------------- */

static const char *kind_names[MOE_T_COUNT] = {
    "embed", "final_norm", "lm_head", "input_norm", "post_norm", "q_proj", "k_proj", "v_proj",
    "o_proj", "q_bias", "k_bias", "v_bias", "q_norm", "k_norm", "mlp_gate", "mlp_up", "mlp_down",
    "router", "expert_gate", "expert_up", "expert_down", "shared_gate", "shared_up", "shared_down",
    "shared_expert_gate",
};

const char *moe_tensor_kind_name(moe_tensor_kind k)
{
    return (unsigned)k < MOE_T_COUNT ? kind_names[k] : "?";
}

static int is_global(moe_tensor_kind k) { return k <= MOE_T_LM_HEAD; }

/* the attention block's tensors, input norm included */
static int has_attention_tensor(const moe_config *c, moe_tensor_kind k)
{
    switch (k) {
    case MOE_T_INPUT_NORM: case MOE_T_Q_PROJ: case MOE_T_K_PROJ: case MOE_T_V_PROJ: case MOE_T_O_PROJ:
        return 1;
    case MOE_T_Q_BIAS: case MOE_T_K_BIAS: case MOE_T_V_BIAS:
        return c->qkv_bias;
    case MOE_T_Q_NORM: case MOE_T_K_NORM:
        return c->qk_norm != MOE_QK_NORM_NONE;
    default:
        return 0;
    }
}

/* routed experts present (MoE, or condensed: the kept ones) */
static int has_routed(const moe_layer_mlp *m)
{
    return m->kind == MOE_MLP_MOE || m->kind == MOE_MLP_CONDENSED;
}

int moe_config_has_tensor(const moe_config *c, int layer, moe_tensor_kind k)
{
    if ((unsigned)k >= MOE_T_COUNT) return 0;
    if (is_global(k)) return layer == -1;
    if (layer < 0 || layer >= c->num_layers) return 0;
    const moe_layer_mlp *m = &c->layers[layer];
    /* a dropped MLP leaves the attention (not the post norm); a dropped block nothing */
    if (m->kind == MOE_MLP_NONE) return m->drop == MOE_DROP_MLP && has_attention_tensor(c, k);
    switch (k) {
    case MOE_T_INPUT_NORM: case MOE_T_Q_PROJ: case MOE_T_K_PROJ: case MOE_T_V_PROJ: case MOE_T_O_PROJ:
    case MOE_T_Q_BIAS: case MOE_T_K_BIAS: case MOE_T_V_BIAS: case MOE_T_Q_NORM: case MOE_T_K_NORM:
        return has_attention_tensor(c, k);
    case MOE_T_POST_NORM:
        return 1;
    case MOE_T_MLP_GATE: case MOE_T_MLP_UP: case MOE_T_MLP_DOWN:
        return m->kind == MOE_MLP_DENSE;
    case MOE_T_ROUTER:
        return m->kind == MOE_MLP_MOE;
    case MOE_T_EXPERT_GATE: case MOE_T_EXPERT_UP: case MOE_T_EXPERT_DOWN:
        return has_routed(m);
    case MOE_T_SHARED_GATE: case MOE_T_SHARED_UP: case MOE_T_SHARED_DOWN:
        return has_routed(m) && m->has_shared;
    case MOE_T_SHARED_EXPERT_GATE:
        return has_routed(m) && m->has_shared && c->shared_gate;
    default:
        return 0;
    }
}

int moe_config_has_expert(const moe_config *c, int layer, int expert)
{
    if (layer < 0 || layer >= c->num_layers) return 0;
    const moe_layer_mlp *m = &c->layers[layer];
    if (m->kind == MOE_MLP_MOE) return expert >= 0 && expert < c->n_routed_experts;
    if (m->kind == MOE_MLP_CONDENSED)
        for (int i = 0; i < m->n_kept; i++)
            if (m->experts[i] == expert) return 1;
    return 0;
}

static int absent(const moe_config *c, int layer, moe_tensor_kind k)
{
    moe_error_set(MOE_ERR_DATA, "%s: %s has no tensor %s in layer %d", c->path[0] ? c->path : "config",
                  c->arch->model_type, moe_tensor_kind_name(k), layer);
    return -1;
}

int moe_config_tensor_name(const moe_config *c, int layer, moe_tensor_kind k, int expert, char *buf,
                           size_t size)
{
    if (!moe_config_has_tensor(c, layer, k)) return absent(c, layer, k);
    const moe_arch *a = c->arch;
    static const char *attn[] = {
        [MOE_T_Q_PROJ] = "q_proj.weight", [MOE_T_K_PROJ] = "k_proj.weight",
        [MOE_T_V_PROJ] = "v_proj.weight", [MOE_T_O_PROJ] = "o_proj.weight",
        [MOE_T_Q_BIAS] = "q_proj.bias",   [MOE_T_K_BIAS] = "k_proj.bias",
        [MOE_T_V_BIAS] = "v_proj.bias",   [MOE_T_Q_NORM] = "q_norm.weight",
        [MOE_T_K_NORM] = "k_norm.weight",
    };
    static const char *dense[] = {"gate_proj", "up_proj", "down_proj"};
    int n;
    switch (k) {
    case MOE_T_EMBED: n = snprintf(buf, size, "model.embed_tokens.weight"); break;
    case MOE_T_FINAL_NORM: n = snprintf(buf, size, "model.norm.weight"); break;
    case MOE_T_LM_HEAD:
        n = snprintf(buf, size, c->tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight");
        break;
    case MOE_T_INPUT_NORM: n = snprintf(buf, size, "model.layers.%d.input_layernorm.weight", layer); break;
    case MOE_T_POST_NORM:
        n = snprintf(buf, size, "model.layers.%d.post_attention_layernorm.weight", layer);
        break;
    case MOE_T_Q_PROJ: case MOE_T_K_PROJ: case MOE_T_V_PROJ: case MOE_T_O_PROJ:
    case MOE_T_Q_BIAS: case MOE_T_K_BIAS: case MOE_T_V_BIAS: case MOE_T_Q_NORM: case MOE_T_K_NORM:
        n = snprintf(buf, size, "model.layers.%d.self_attn.%s", layer, attn[k]);
        break;
    case MOE_T_MLP_GATE: case MOE_T_MLP_UP: case MOE_T_MLP_DOWN:
        n = snprintf(buf, size, "model.layers.%d.mlp.%s.weight", layer, dense[k - MOE_T_MLP_GATE]);
        break;
    case MOE_T_ROUTER: n = snprintf(buf, size, "model.layers.%d.%s.gate.weight", layer, a->mlp_prefix); break;
    case MOE_T_EXPERT_GATE: case MOE_T_EXPERT_UP: case MOE_T_EXPERT_DOWN:
        if (expert < 0 || expert >= c->n_routed_experts) {
            moe_error_set(MOE_ERR_DATA, "%s: expert %d out of range [0, %d)", c->path[0] ? c->path : "config",
                          expert, c->n_routed_experts);
            return -1;
        }
        n = snprintf(buf, size, "model.layers.%d.%s.experts.%d.%s.weight", layer, a->mlp_prefix, expert,
                     a->expert_proj[k - MOE_T_EXPERT_GATE]);
        break;
    case MOE_T_SHARED_GATE: case MOE_T_SHARED_UP: case MOE_T_SHARED_DOWN:
        n = snprintf(buf, size, "model.layers.%d.mlp.%s.%s.weight", layer, a->shared_prefix,
                     dense[k - MOE_T_SHARED_GATE]);
        break;
    case MOE_T_SHARED_EXPERT_GATE:
        n = snprintf(buf, size, "model.layers.%d.mlp.%s.weight", layer, a->shared_gate);
        break;
    default:
        return absent(c, layer, k);
    }
    if (n < 0 || (size_t)n >= size) {
        moe_error_set(MOE_ERR_DATA, "tensor name buffer too small");
        return -1;
    }
    return 0;
}

int moe_config_tensor_shape(const moe_config *c, int layer, moe_tensor_kind k, int64_t shape[2])
{
    if (!moe_config_has_tensor(c, layer, k)) return absent(c, layer, k);
    int64_t H = c->hidden_size, D = c->head_dim, Q = (int64_t)c->num_heads * D,
            KV = (int64_t)c->num_kv_heads * D, I = moe_config_dense_width(c, layer),
            Im = c->moe_intermediate_size,
            Is = c->shared_intermediate_size, V = c->vocab_size, E = c->n_routed_experts;
#define S2(a, b) do { shape[0] = (a); shape[1] = (b); return 2; } while (0)
#define S1(a) do { shape[0] = (a); shape[1] = 0; return 1; } while (0)
    switch (k) {
    case MOE_T_EMBED: case MOE_T_LM_HEAD: S2(V, H);
    case MOE_T_FINAL_NORM: case MOE_T_INPUT_NORM: case MOE_T_POST_NORM: S1(H);
    case MOE_T_Q_PROJ: S2(Q, H);
    case MOE_T_K_PROJ: case MOE_T_V_PROJ: S2(KV, H);
    case MOE_T_O_PROJ: S2(H, Q);
    case MOE_T_Q_BIAS: S1(Q);
    case MOE_T_K_BIAS: case MOE_T_V_BIAS: S1(KV);
    case MOE_T_Q_NORM: S1(c->qk_norm == MOE_QK_NORM_HEAD ? D : Q);
    case MOE_T_K_NORM: S1(c->qk_norm == MOE_QK_NORM_HEAD ? D : KV);
    case MOE_T_MLP_GATE: case MOE_T_MLP_UP: S2(I, H);
    case MOE_T_MLP_DOWN: S2(H, I);
    case MOE_T_ROUTER: S2(E, H);
    case MOE_T_EXPERT_GATE: case MOE_T_EXPERT_UP: S2(Im, H);
    case MOE_T_EXPERT_DOWN: S2(H, Im);
    case MOE_T_SHARED_GATE: case MOE_T_SHARED_UP: S2(Is, H);
    case MOE_T_SHARED_DOWN: S2(H, Is);
    case MOE_T_SHARED_EXPERT_GATE: S2(1, H);
    default: return absent(c, layer, k);
    }
#undef S1
#undef S2
}

/* Append one implied tensor to *v, or with v NULL only count it. */
static int add_ref(const moe_config *c, moe_tensor_ref **v, int64_t *n, int64_t *cap, int layer,
                   moe_tensor_kind k, int expert)
{
    if (!v) {
        (*n)++;
        return 0;
    }
    if (*n == *cap) {
        *cap = *cap ? 2 * *cap : 256;
        *v = moe_realloc(*v, (size_t)*cap * sizeof **v);
    }
    moe_tensor_ref *r = &(*v)[*n];
    memset(r, 0, sizeof *r);
    r->kind = k;
    r->layer = layer;
    r->expert = expert;
    if (moe_config_tensor_name(c, layer, k, expert < 0 ? 0 : expert, r->name, sizeof r->name) < 0) return -1;
    r->ndim = moe_config_tensor_shape(c, layer, k, r->shape);
    if (r->ndim < 0) return -1;
    (*n)++;
    return 0;
}

static int cmp_int(const void *a, const void *b)
{
    int x = *(const int *)a, y = *(const int *)b;
    return (x > y) - (x < y);
}

/* The routed experts of MoE or condensed layer l, in id order, each with its
 * gate, up and down.  A condensed layer walks its kept ids, not 0..E-1: E
 * may be far larger than the few it keeps. */
static int add_experts(const moe_config *c, moe_tensor_ref **v, int64_t *n, int64_t *cap, int l)
{
    const moe_layer_mlp *m = &c->layers[l];
    int n_ids = m->kind == MOE_MLP_CONDENSED ? m->n_kept : c->n_routed_experts;
    if (!v) { /* counting */
        *n += 3 * (int64_t)n_ids;
        return 0;
    }
    int *ids = NULL;
    if (m->kind == MOE_MLP_CONDENSED) {
        ids = moe_malloc((size_t)(n_ids ? n_ids : 1) * sizeof *ids);
        if (n_ids) memcpy(ids, m->experts, (size_t)n_ids * sizeof *ids);
        qsort(ids, (size_t)n_ids, sizeof *ids, cmp_int);
    }
    int rc = 0;
    for (int i = 0; i < n_ids && rc == 0; i++) {
        int e = ids ? ids[i] : i;
        rc = add_ref(c, v, n, cap, l, MOE_T_EXPERT_GATE, e) < 0 || add_ref(c, v, n, cap, l, MOE_T_EXPERT_UP, e) < 0 ||
                     add_ref(c, v, n, cap, l, MOE_T_EXPERT_DOWN, e) < 0 ? -1 : 0;
    }
    free(ids);
    return rc;
}

int moe_config_tensor_list(const moe_config *c, moe_tensor_ref **out)
{
    int64_t n = tensor_walk(c, NULL, INT_MAX);
    if (n < 0 || n > INT_MAX) {
        if (n > INT_MAX)
            moe_error_set(MOE_ERR_DATA, "%s: implies %lld tensors (more than %d)", c->path, (long long)n, INT_MAX);
        *out = NULL;
        return -1;
    }
    return (int)tensor_walk(c, out, INT_MAX);
}

/* Every implied tensor in order into *out (malloc'd), or with out NULL
 * only their count, which stops early once past `limit` (a count of 2^30
 * experts times the layers would take seconds).  -1 on error. */
static int64_t tensor_walk(const moe_config *c, moe_tensor_ref **out, int64_t limit)
{
    moe_tensor_ref *list = NULL, **v = out ? &list : NULL;
    int64_t n = 0, cap = 0;
#define ADD(l, k, e) do { if (add_ref(c, v, &n, &cap, (l), (k), (e)) < 0) goto fail; \
                           if (!v && n > limit) return n; } while (0)
#define ADD_IF(l, k) do { if (moe_config_has_tensor(c, (l), (k))) ADD((l), (k), -1); } while (0)
    ADD(-1, MOE_T_EMBED, -1);
    for (int l = 0; l < c->num_layers; l++) {
        const moe_layer_mlp *m = &c->layers[l];
        ADD_IF(l, MOE_T_INPUT_NORM);
        ADD_IF(l, MOE_T_Q_PROJ);
        ADD_IF(l, MOE_T_Q_BIAS);
        ADD_IF(l, MOE_T_K_PROJ);
        ADD_IF(l, MOE_T_K_BIAS);
        ADD_IF(l, MOE_T_V_PROJ);
        ADD_IF(l, MOE_T_V_BIAS);
        ADD_IF(l, MOE_T_O_PROJ);
        ADD_IF(l, MOE_T_Q_NORM);
        ADD_IF(l, MOE_T_K_NORM);
        if (m->kind == MOE_MLP_NONE) continue; /* dropped: no post norm, no MLP */
        ADD(l, MOE_T_POST_NORM, -1);
        if (m->kind == MOE_MLP_DENSE) {
            ADD(l, MOE_T_MLP_GATE, -1);
            ADD(l, MOE_T_MLP_UP, -1);
            ADD(l, MOE_T_MLP_DOWN, -1);
            continue;
        }
        ADD_IF(l, MOE_T_ROUTER);
        if (add_experts(c, v, &n, &cap, l) < 0) goto fail;
        if (!v && n > limit) return n;
        ADD_IF(l, MOE_T_SHARED_GATE);
        ADD_IF(l, MOE_T_SHARED_UP);
        ADD_IF(l, MOE_T_SHARED_DOWN);
        ADD_IF(l, MOE_T_SHARED_EXPERT_GATE);
    }
    ADD(-1, MOE_T_FINAL_NORM, -1);
    if (!c->tie_word_embeddings) ADD(-1, MOE_T_LM_HEAD, -1);
#undef ADD
#undef ADD_IF
    if (out) *out = list;
    return n;
fail:
    free(list);
    if (out) *out = NULL;
    return -1;
}

/* ---- overrides (moe-init) -------------------------------------------------- */

void moe_config_overrides_init(moe_config_overrides *o)
{
    int *f = (int *)o;
    for (size_t i = 0; i < sizeof *o / sizeof(int); i++) f[i] = MOE_CONFIG_KEEP;
}

static void keep_or_set(int *field, int value)
{
    if (value != MOE_CONFIG_KEEP) *field = value;
}

/* The overrides of the attention shape, with what follows from them. */
static int override_attention(moe_config *c, const moe_config_overrides *o)
{
    int head_dim_derived = c->head_dim * c->num_heads == c->hidden_size;
    keep_or_set(&c->hidden_size, o->hidden_size);
    keep_or_set(&c->num_heads, o->num_heads);
    if (o->num_kv_heads != MOE_CONFIG_KEEP) c->num_kv_heads = o->num_kv_heads;
    else if (o->num_heads != MOE_CONFIG_KEEP && c->num_kv_heads > c->num_heads) c->num_kv_heads = c->num_heads;
    if (o->head_dim != MOE_CONFIG_KEEP) c->head_dim = o->head_dim;
    else if ((o->hidden_size != MOE_CONFIG_KEEP || o->num_heads != MOE_CONFIG_KEEP) && head_dim_derived) {
        if (c->hidden_size % c->num_heads) {
            moe_error_set(MOE_ERR_DATA, "hidden_size %d is not a multiple of num_attention_heads %d",
                          c->hidden_size, c->num_heads);
            return MOE_CONFIG_BAD_SIZES;
        }
        c->head_dim = c->hidden_size / c->num_heads;
    }
    return 0;
}

/* The overrides of the MLPs (those the architecture has fields for). */
static void override_mlp(moe_config *c, const moe_config_overrides *o)
{
    const moe_arch *a = c->arch;
    keep_or_set(&c->n_routed_experts, o->n_routed_experts);
    keep_or_set(&c->top_k, o->top_k);
    keep_or_set(&c->moe_intermediate_size, o->moe_intermediate_size);
    if (o->intermediate_size != MOE_CONFIG_KEEP) {
        c->intermediate_size = o->intermediate_size;
        if (!a->key_moe_inter) c->moe_intermediate_size = c->intermediate_size;
    }
    if (o->shared_experts != MOE_CONFIG_KEEP) {
        if (a->shared == MOE_SHARED_COUNT) c->n_shared_experts = o->shared_experts;
        if (a->shared == MOE_SHARED_SIZE) c->shared_intermediate_size = o->shared_experts * c->moe_intermediate_size;
    }
    if (a->shared == MOE_SHARED_SIZE) keep_or_set(&c->shared_intermediate_size, o->shared_intermediate_size);
    if (a->layer_rule == MOE_LAYERS_DEEPSEEK) keep_or_set(&c->first_k_dense_replace, o->first_k_dense_replace);
    if (a->layer_rule == MOE_LAYERS_QWEN) keep_or_set(&c->decoder_sparse_step, o->decoder_sparse_step);
    keep_or_set(&c->norm_topk_prob, o->norm_topk_prob);
}

int moe_config_override(moe_config *c, const moe_config_overrides *o)
{
    /* the condensed layers, taken out of c->layers (which finish rebuilds) */
    int n_old = c->num_layers;
    moe_layer_mlp *condensed = moe_calloc((size_t)n_old, sizeof *condensed);
    for (int l = 0; l < n_old; l++) {
        condensed[l] = c->layers[l];
        c->layers[l].experts = NULL;
        c->layers[l].weights = NULL;
    }
    keep_or_set(&c->num_layers, o->num_layers);
    int rc = override_attention(c, o);
    if (rc == 0) {
        override_mlp(c, o);
        keep_or_set(&c->vocab_size, o->vocab_size);
        keep_or_set(&c->max_position_embeddings, o->max_position_embeddings);
        rc = moe_config_finish(c);
    }
    for (int l = 0; l < n_old; l++) {
        const moe_layer_mlp *m = &condensed[l];
        if (rc == 0 && m->kind == MOE_MLP_CONDENSED && l < c->num_layers)
            rc = moe_config_condense(c, l, m->n_kept, m->experts, m->weights);
        if (rc == 0 && m->kind == MOE_MLP_NONE && l < c->num_layers) rc = moe_config_drop(c, l, m->drop);
        free(m->experts);
        free(m->weights);
    }
    free(condensed);
    return rc;
}
