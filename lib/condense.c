/* condense.c - write a condensed checkpoint. */
#define _GNU_SOURCE
#include "condense.h"
#include "common.h"
#include "fold.h"
#include "hf_modeling.h"

#include <dirent.h>
#include <errno.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* Copy tensor bytes chunk by chunk from the source mapping, then let the
 * kernel drop the pages: memory stays flat however large the model. */
static int copy_fill(void *ctx, const char *name, uint64_t start, uint64_t n, void *out) {
    (void)name;
    const moe_st_tensor *t = ctx;
    size_t esize = (size_t)moe_dtype_bits(t->dtype) / 8;
    memcpy(out, (const char *)t->data + start * esize, n * esize);
    if ((start + n) * esize == t->nbytes) moe_st_release(t);
    return 0;
}

static uint64_t count_params(const moe_config *c) {
    moe_tensor_ref *refs;
    int n = moe_config_tensor_list(c, &refs);
    uint64_t total = 0;
    for (int i = 0; i < n; i++) total += (uint64_t)refs[i].shape[0] * (uint64_t)(refs[i].ndim > 1 ? refs[i].shape[1] : 1);
    free(refs);
    return n < 0 ? 0 : total;
}

/* transformers class of each architecture in hf/modeling_cdmoe.py */
static const char *hf_class(const char *model_type) {
    static const char *table[][2] = {
        {"deepseek", "CdmoeDeepseekForCausalLM"}, {"qwen2_moe", "CdmoeQwen2MoeForCausalLM"},
        {"qwen3_moe", "CdmoeQwen3MoeForCausalLM"}, {"olmoe", "CdmoeOlmoeForCausalLM"},
        {"mixtral", "CdmoeMixtralForCausalLM"}};
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++)
        if (strcmp(table[i][0], model_type) == 0) return table[i][1];
    return NULL;
}

/* auto_map: transformers loads our modeling file (trust_remote_code); it
 * replaces any remote code the source named (DeepSeek's own modeling file
 * knows nothing of condensed layers).  deepseek also needs our config class:
 * transformers has none for that model_type. */
static void set_auto_map(json_t *root, const char *model_type) {
    const char *cls = hf_class(model_type);
    if (!cls) return;
    char ref[128];
    json_t *map = json_object();
    snprintf(ref, sizeof ref, "modeling_cdmoe.%s", cls);
    json_object_set_new(map, "AutoModelForCausalLM", json_string(ref));
    if (strcmp(model_type, "deepseek") == 0)
        json_object_set_new(map, "AutoConfig", json_string("modeling_cdmoe.DeepseekConfig"));
    json_object_set_new(root, "auto_map", map);
}

/* Expert pruning: the new expert count, and the kept experts' original ids. */
static void prune_config_json(json_t *root, const moe_config *src, const moe_condense_opts *o) {
    json_object_set_new(root, src->arch->key_experts, json_integer(o->prune_n));
    json_t *pe = json_object();
    for (int l = 0, i = 0; l < src->num_layers; l++) {
        if (src->layers[l].kind != MOE_MLP_MOE) continue;
        json_t *ids = json_array();
        for (int j = 0; j < o->prune_n; j++)
            json_array_append_new(ids, json_integer(o->prune_kept[(size_t)i * o->prune_n + j]));
        char key[16];
        snprintf(key, sizeof key, "%d", l);
        json_object_set_new(pe, key, ids);
        i++;
    }
    json_object_set_new(root, "pruned_experts", pe);
}

/* config.json: the original text plus condensed_layers, auto_map and provenance. */
json_t *moe_config_json_load(const char *dir, char *path, size_t size) {
    snprintf(path, size, "%s/config.json", dir);
    json_error_t err;
    json_t *root = json_load_file(path, JSON_PRESERVE_ORDER, &err);
    if (!root) moe_error_set(MOE_ERR_DATA, "%s:%d: %s", path, err.line, err.text);
    return root;
}

static char *condensed_config_json(const moe_ckpt *ck, const moe_condense_opts *o) {
    char path[4096];
    json_t *root = moe_config_json_load(moe_ckpt_dir(ck), path, sizeof path);
    if (!root) return NULL;
    json_t *cl = json_object_get(root, "condensed_layers");
    if (!json_is_object(cl)) {
        cl = json_object();
        json_object_set_new(root, "condensed_layers", cl);
    }
    /* condensed layers in increasing layer order, for readers' sake */
    int *idx = moe_malloc((size_t)(o->n_layers ? o->n_layers : 1) * sizeof *idx);
    for (int i = 0; i < o->n_layers; i++) {
        int j = i;
        while (j > 0 && o->layers[idx[j - 1]] > o->layers[i]) { idx[j] = idx[j - 1]; j--; }
        idx[j] = i;
    }
    json_t *dl = o->drop ? json_object_get(root, "dropped_layers") : NULL;
    if (o->drop && !json_is_object(dl)) {
        dl = json_object();
        json_object_set_new(root, "dropped_layers", dl);
    }
    for (int ii = 0; ii < o->n_layers && o->drop; ii++) {
        char key[16];
        snprintf(key, sizeof key, "%d", o->layers[idx[ii]]);
        json_object_set_new(dl, key, json_string(moe_drop_name(o->drop)));
    }
    for (int ii = 0; ii < o->n_layers && !o->drop; ii++) {
        int i = idx[ii];
        json_t *ex = json_array(), *wt = json_array(), *entry = json_object();
        for (int j = 0; j < o->k; j++) {
            json_array_append_new(ex, json_integer(o->experts[i * o->k + j]));
            json_array_append_new(wt, json_real(o->weights[i * o->k + j]));
        }
        json_object_set_new(entry, "experts", ex);
        json_object_set_new(entry, "weights", wt);
        char key[16];
        snprintf(key, sizeof key, "%d", o->layers[i]);
        json_object_set_new(cl, key, entry);
    }
    free(idx);
    if (o->fold) { /* every condensed layer, those of the source too */
        const char *key;
        json_t *entry;
        json_object_foreach(cl, key, entry) json_object_set_new(entry, "folded", json_true());
    }
    if (o->prune_n > 0) prune_config_json(root, moe_ckpt_config(ck), o);
    set_auto_map(root, moe_ckpt_config(ck)->arch->model_type);
    moe_config_json_provenance(root, "moe-condense", o->argc, o->argv, moe_ckpt_fingerprint(ck));
    return moe_config_json_text(root, path);
}

void moe_config_json_provenance(json_t *root, const char *tool, int argc, char **argv, const char *source) {
    json_t *prov = json_object(), *args = json_array();
    for (int i = 1; i < argc; i++) json_array_append_new(args, json_string(argv[i]));
    json_object_set_new(prov, "tool", json_string(tool));
    json_object_set_new(prov, "version", json_string(MOE_VERSION));
    json_object_set_new(prov, "args", args);
    json_object_set_new(prov, "source_model", json_string(source));
    json_t *history = json_object_get(root, "cdmoe_provenance");
    if (!json_is_array(history)) {
        history = json_array();
        json_object_set_new(root, "cdmoe_provenance", history);
    }
    json_array_append_new(history, prov);
}

char *moe_config_json_text(json_t *root, const char *path) {
    char *text = json_dumps(root, JSON_INDENT(2) | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(9));
    json_decref(root);
    if (!text) {
        moe_error_set(MOE_ERR_DATA, "%s: cannot write JSON", path);
        return NULL;
    }
    size_t n = strlen(text);
    char *with_nl = moe_malloc(n + 2);
    memcpy(with_nl, text, n);
    with_nl[n] = '\n';
    with_nl[n + 1] = 0;
    free(text);
    return with_nl;
}

static int ends_with(const char *s, const char *suffix) {
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && strcmp(s + a - b, suffix) == 0;
}

/* Copy one regular file (tokenizer files, remote code...). */
static int copy_file(const char *src, const char *dst) {
    FILE *in = fopen(src, "rb"), *out = in ? fopen(dst, "wb") : NULL;
    int rc = 0;
    if (!in || !out) {
        moe_error_set(MOE_ERR_IO, "%s: %s", in ? dst : src, strerror(errno));
        rc = -1;
    } else {
        char buf[1 << 16];
        size_t n;
        while ((n = fread(buf, 1, sizeof buf, in)) > 0)
            if (fwrite(buf, 1, n, out) != n) {
                moe_error_set(MOE_ERR_IO, "%s: write error: %s", dst, strerror(errno));
                rc = -1;
                break;
            }
        if (rc == 0 && ferror(in)) {
            moe_error_set(MOE_ERR_IO, "%s: read error", src);
            rc = -1;
        }
    }
    if (in) fclose(in);
    if (out && fclose(out) != 0 && rc == 0) {
        moe_error_set(MOE_ERR_IO, "%s: write error: %s", dst, strerror(errno));
        rc = -1;
    }
    return rc;
}

int moe_condense_copy_side_files(const char *src_dir, const char *dst_dir) {
    DIR *d = opendir(src_dir);
    if (!d) {
        moe_error_set(MOE_ERR_IO, "%s: %s", src_dir, strerror(errno));
        return -1;
    }
    struct dirent *e;
    int rc = 0;
    while (rc == 0 && (e = readdir(d))) {
        const char *n = e->d_name;
        if (n[0] == '.' || strcmp(n, "config.json") == 0 || ends_with(n, ".safetensors") ||
            strcmp(n, "model.safetensors.index.json") == 0 || ends_with(n, ".bin"))
            continue;
        char src[4096], dst[4096];
        snprintf(src, sizeof src, "%s/%s", src_dir, n);
        snprintf(dst, sizeof dst, "%s/%s", dst_dir, n);
        struct stat st;
        if (stat(src, &st) != 0 || !S_ISREG(st.st_mode)) continue;
        rc = copy_file(src, dst);
    }
    closedir(d);
    return rc;
}

/* With --fold, a condensed layer's experts and shared MLP become its folded MLP. */
static int is_folded_away(const moe_config *cfg, const moe_tensor_ref *r) {
    return r->layer >= 0 && cfg->layers[r->layer].kind == MOE_MLP_CONDENSED &&
           r->kind >= MOE_T_EXPERT_GATE && r->kind <= MOE_T_SHARED_DOWN;
}

/* ---- expert pruning: the kept experts renumbered, the router's rows kept ------------------ */

typedef struct {
    const moe_ckpt *ck;
    const moe_config *src;   /* the source's config (original numbering) */
    const moe_condense_opts *o;
    int *ordinal;            /* [L] MoE ordinal of each layer */
    void **routers;          /* [L] sliced router bytes, freed after the write */
} prune_map;

static void prune_map_init(prune_map *pm, const moe_ckpt *ck, const moe_condense_opts *o) {
    pm->ck = ck;
    pm->src = moe_ckpt_config(ck);
    pm->o = o;
    pm->ordinal = moe_calloc((size_t)pm->src->num_layers + 1, sizeof(int));
    pm->routers = moe_calloc((size_t)pm->src->num_layers + 1, sizeof(void *));
    for (int l = 0, i = 0; l < pm->src->num_layers; l++)
        pm->ordinal[l] = pm->src->layers[l].kind == MOE_MLP_MOE ? i++ : -1;
}

static void prune_map_free(prune_map *pm) {
    for (int l = 0; pm->routers && l < pm->src->num_layers; l++) free(pm->routers[l]);
    free(pm->routers);
    free(pm->ordinal);
}

/* The source tensor of a pruned checkpoint's tensor r: expert j of layer l is
 * the j-th kept expert; every other tensor keeps its name. */
static const moe_st_tensor *prune_source(prune_map *pm, const moe_tensor_ref *r) {
    if (r->kind < MOE_T_EXPERT_GATE || r->kind > MOE_T_EXPERT_DOWN || pm->ordinal[r->layer] < 0)
        return moe_ckpt_find(pm->ck, r->name);
    int e = pm->o->prune_kept[(size_t)pm->ordinal[r->layer] * pm->o->prune_n + r->expert];
    char name[MOE_TENSOR_NAME_MAX];
    if (moe_config_tensor_name(pm->src, r->layer, r->kind, e, name, sizeof name) < 0) return NULL;
    return moe_ckpt_find(pm->ck, name);
}

/* The router of a pruned layer: the kept experts' rows, in their new order. */
static int add_pruned_router(moe_ckpt_writer *w, prune_map *pm, const moe_tensor_ref *r,
                             const moe_st_tensor *t, uint64_t *bytes) {
    size_t row = (size_t)t->shape[1] * (size_t)moe_dtype_bits(t->dtype) / 8;
    int n = pm->o->prune_n;
    unsigned char *buf = moe_malloc(row * (size_t)n + 1);
    for (int j = 0; j < n; j++) {
        int e = pm->o->prune_kept[(size_t)pm->ordinal[r->layer] * n + j];
        memcpy(buf + (size_t)j * row, (const unsigned char *)t->data + (size_t)e * row, row);
    }
    pm->routers[r->layer] = buf;
    int64_t shape[2] = {n, t->shape[1]};
    *bytes += row * (size_t)n;
    return moe_ckpt_writer_add(w, r->name, t->dtype, 2, shape, buf, NULL, NULL);
}

/* The config of what is written: condensed, dropped or pruned. */
static int apply_method(moe_config *cfg, const moe_condense_opts *o) {
    for (int i = 0; i < o->n_layers; i++) {
        int rc = o->drop ? moe_config_drop(cfg, o->layers[i], o->drop)
                         : moe_config_condense(cfg, o->layers[i], o->k, o->experts + (size_t)i * o->k,
                                               o->weights + (size_t)i * o->k);
        if (rc < 0) return -1;
    }
    if (o->prune_n > 0) {
        if (cfg->n_condensed || cfg->n_layers_alloc != cfg->num_layers) {
            moe_error_set(MOE_ERR_DATA, "%s: expert pruning of a model with condensed layers is not supported",
                          cfg->path);
            return -1;
        }
        if (o->prune_n > cfg->n_routed_experts || o->prune_n < cfg->top_k) {
            moe_error_set(MOE_ERR_DATA, "%s: cannot keep %d routed experts of %d with top-k %d", cfg->path,
                          o->prune_n, cfg->n_routed_experts, cfg->top_k);
            return -1;
        }
        cfg->n_routed_experts = o->prune_n; /* names and shapes of the pruned model */
    }
    return 0;
}

int moe_condense_write(const moe_ckpt *ck, const char *out_dir, const moe_condense_opts *o,
                       moe_condense_report *rep) {
    moe_config *cfg = moe_config_load(moe_ckpt_dir(ck));
    if (!cfg) return -1;
    memset(rep, 0, sizeof *rep);
    rep->params_before = count_params(cfg);
    rep->bytes_before = moe_ckpt_bytes(ck);
    if (apply_method(cfg, o) < 0) {
        moe_config_free(cfg);
        return -1;
    }
    prune_map pm = {0};
    if (o->prune_n > 0) prune_map_init(&pm, ck, o);
    rep->params_after = count_params(cfg);
    for (int l = 0; o->fold && l < cfg->num_layers; l++) /* refuse before writing anything */
        if (cfg->layers[l].kind == MOE_MLP_CONDENSED && moe_fold_width(cfg, l) < 0) {
            moe_config_free(cfg);
            return -1;
        }

    moe_tensor_ref *refs;
    int n = moe_config_tensor_list(cfg, &refs);
    char *config_text = n < 0 ? NULL : condensed_config_json(ck, o);
    moe_ckpt_writer *w = config_text ? moe_ckpt_writer_open(out_dir, o->shard_bytes, o->force) : NULL;
    int rc = w ? 0 : -1;
    moe_fold_ctx *folds = NULL;
    for (int i = 0; rc == 0 && i < n; i++) {
        if (o->fold && is_folded_away(cfg, &refs[i])) {
            /* the layer's first expert tensor: its folded MLP goes here */
            if (i == 0 || refs[i - 1].layer != refs[i].layer || !is_folded_away(cfg, &refs[i - 1])) {
                rc = moe_fold_add_layer(w, ck, cfg, refs[i].layer, &folds);
                rep->bytes_after += moe_fold_bytes(cfg, refs[i].layer, ck);
            }
            continue;
        }
        const moe_st_tensor *t = o->prune_n > 0 ? prune_source(&pm, &refs[i]) : moe_ckpt_find(ck, refs[i].name);
        if (!t) {
            moe_error_set(MOE_ERR_DATA, "%s: tensor %s missing", moe_ckpt_dir(ck), refs[i].name);
            rc = -1;
            break;
        }
        if (o->prune_n > 0 && refs[i].kind == MOE_T_ROUTER) {
            rc = add_pruned_router(w, &pm, &refs[i], t, &rep->bytes_after);
            continue;
        }
        rc = moe_ckpt_writer_add(w, refs[i].name, t->dtype, t->ndim, t->shape, NULL, copy_fill, (void *)t);
        rep->bytes_after += t->nbytes;
    }
    if (rc == 0) rc = moe_ckpt_writer_text(w, "config.json", config_text);
    if (rc == 0) rc = moe_condense_copy_side_files(moe_ckpt_dir(ck), moe_ckpt_writer_tmpdir(w));
    if (rc == 0) rc = moe_ckpt_writer_text(w, MOE_HF_MODELING_FILE, moe_hf_modeling_py);
    if (rc == 0) rc = moe_ckpt_writer_close(w);
    else if (w) moe_ckpt_writer_abort(w);
    moe_fold_free(folds);
    if (o->prune_n > 0) prune_map_free(&pm);
    free(config_text);
    if (n >= 0) free(refs);
    moe_config_free(cfg);
    return rc;
}
