/* checkpoint.c - model directories: open + validate, read, release, fingerprint, write. */
#define _GNU_SOURCE 1
#include "checkpoint.h"
#include "common.h"
#include "sha256.h"

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* name -> tensor, open addressing */
typedef struct {
    const char *name;
    const moe_st_tensor *t;
    int used; /* implied by the config */
} slot;

struct moe_ckpt {
    char *dir;
    moe_config *cfg;
    int nfiles;
    moe_st_file **files;
    slot *tab;
    size_t tabcap, ntab;
    moe_tensor_ref *refs;
    const moe_st_tensor **ref_t; /* per ref */
    int nrefs;
    int *layer_lo, *layer_hi;    /* refs of layer l are [lo[l], hi[l]) (contiguous) */
    int nextra;
    const char **extra;
    uint64_t bytes;
    int dtype;
    char fp[65];
};

static uint64_t hash_str(const char *s)
{
    uint64_t h = 1469598103934665603ULL;
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211ULL;
    return h;
}

static slot *tab_find(const moe_ckpt *m, const char *name)
{
    if (!m->tabcap) return NULL;
    size_t i = hash_str(name) & (m->tabcap - 1);
    while (m->tab[i].name) {
        if (!strcmp(m->tab[i].name, name)) return &m->tab[i];
        i = (i + 1) & (m->tabcap - 1);
    }
    return NULL;
}

/* Insert; returns the existing slot if present (not replaced). */
static slot *tab_put(moe_ckpt *m, const char *name, const moe_st_tensor *t, int *existed)
{
    size_t i = hash_str(name) & (m->tabcap - 1);
    while (m->tab[i].name) {
        if (!strcmp(m->tab[i].name, name)) {
            *existed = 1;
            return &m->tab[i];
        }
        i = (i + 1) & (m->tabcap - 1);
    }
    *existed = 0;
    m->tab[i].name = t->name;
    m->tab[i].t = t;
    m->ntab++;
    return &m->tab[i];
}

static char *path_join(const char *dir, const char *name)
{
    char *p = moe_malloc(strlen(dir) + strlen(name) + 2);
    sprintf(p, "%s/%s", dir, name);
    return p;
}

static int file_exists(const char *p)
{
    struct stat st;
    return stat(p, &st) == 0 && S_ISREG(st.st_mode);
}


static moe_st_file *open_file(moe_ckpt *m, const char *fname)
{
    for (int i = 0; i < m->nfiles; i++) {
        const char *p = moe_st_path(m->files[i]);
        const char *b = strrchr(p, '/');
        if (!strcmp(b ? b + 1 : p, fname)) return m->files[i];
    }
    char *p = path_join(m->dir, fname);
    moe_st_file *f = moe_st_open(p);
    free(p);
    if (!f) return NULL;
    m->files = moe_realloc(m->files, (size_t)(m->nfiles + 1) * sizeof *m->files);
    m->files[m->nfiles++] = f;
    return f;
}

static void tab_alloc(moe_ckpt *m, size_t n)
{
    m->tabcap = 16;
    while (m->tabcap < 2 * n + 16) m->tabcap *= 2;
    m->tab = moe_calloc(m->tabcap, sizeof *m->tab);
}

static int load_index(moe_ckpt *m, const char *ipath)
{
    size_t len;
    char *text = moe_read_file(ipath, &len);
    if (!text) return -1;
    json_error_t je;
    json_t *root = json_loadb(text, len, JSON_REJECT_DUPLICATES, &je);
    free(text);
    if (!root) {
        moe_error_set(MOE_ERR_DATA, "%s: not valid JSON (line %d: %s)", ipath, je.line, je.text);
        return -1;
    }
    int rc = -1;
    json_t *wm = json_object_get(root, "weight_map");
    if (!json_is_object(root) || !json_is_object(wm)) {
        moe_error_set(MOE_ERR_DATA, "%s: no \"weight_map\" object", ipath);
        goto out;
    }
    const char *name;
    json_t *v;
    /* open the shards first (each once) */
    json_object_foreach(wm, name, v) {
        if (!json_is_string(v)) {
            moe_error_set(MOE_ERR_DATA, "%s: weight_map entry for %s is not a file name", ipath, name);
            goto out;
        }
        const char *f = json_string_value(v);
        if (!*f || strchr(f, '/') || !strcmp(f, "..") || !strcmp(f, ".")) {
            moe_error_set(MOE_ERR_DATA, "%s: weight_map entry for %s: bad shard name '%s'", ipath, name, f);
            goto out;
        }
        if (!open_file(m, f)) goto out;
    }
    size_t total = 0;
    for (int i = 0; i < m->nfiles; i++) total += (size_t)moe_st_count(m->files[i]);
    tab_alloc(m, total);
    json_object_foreach(wm, name, v) {
        moe_st_file *f = open_file(m, json_string_value(v));
        const moe_st_tensor *t = moe_st_find(f, name);
        if (!t) {
            moe_error_set(MOE_ERR_DATA, "%s: tensor %s is listed in %s but not in this file",
                          moe_st_path(f), name, ipath);
            goto out;
        }
        int ex;
        tab_put(m, t->name, t, &ex);
    }
    /* tensors in shards but not in the map: visible as extras (first one wins) */
    for (int i = 0; i < m->nfiles; i++)
        for (int j = 0; j < moe_st_count(m->files[i]); j++) {
            const moe_st_tensor *t = moe_st_tensor_at(m->files[i], j);
            int ex;
            tab_put(m, t->name, t, &ex);
        }
    rc = 0;
out:
    json_decref(root);
    return rc;
}

void moe_ckpt_close(moe_ckpt *m)
{
    if (!m) return;
    for (int i = 0; i < m->nfiles; i++) moe_st_close(m->files[i]);
    free(m->files);
    free(m->tab);
    free(m->refs);
    free(m->ref_t);
    free(m->layer_lo);
    free(m->layer_hi);
    free(m->extra);
    moe_config_free(m->cfg);
    free(m->dir);
    free(m);
}

static int cmp_cstr(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static int fingerprint(moe_ckpt *m, const char *cfg_path)
{
    size_t len;
    char *text = moe_read_file(cfg_path, &len);
    if (!text) return -1;
    json_t *root = json_loadb(text, len, 0, NULL);
    free(text);
    if (!root) {
        moe_error_set(MOE_ERR_DATA, "%s: not valid JSON", cfg_path);
        return -1;
    }
    char *canon = json_dumps(root, JSON_SORT_KEYS | JSON_COMPACT | JSON_REAL_PRECISION(17));
    json_decref(root);
    moe_sha256 s;
    moe_sha256_init(&s);
    moe_sha256_update(&s, "cdmoe-fingerprint-1\n", 20);
    moe_sha256_update(&s, canon, strlen(canon) + 1);
    free(canon);
    const char **names = moe_malloc((m->ntab ? m->ntab : 1) * sizeof *names);
    size_t n = 0;
    for (size_t i = 0; i < m->tabcap; i++)
        if (m->tab[i].name) names[n++] = m->tab[i].name;
    qsort(names, n, sizeof *names, cmp_cstr);
    for (size_t i = 0; i < n; i++) {
        const moe_st_tensor *t = tab_find(m, names[i])->t;
        char line[512];
        int k = snprintf(line, sizeof line, "\n%s\n", moe_dtype_st_name(t->dtype));
        moe_sha256_update(&s, t->name, strlen(t->name));
        moe_sha256_update(&s, line, (size_t)k);
        for (int d = 0; d < t->ndim; d++) {
            k = snprintf(line, sizeof line, "%lld,", (long long)t->shape[d]);
            moe_sha256_update(&s, line, (size_t)k);
        }
        moe_sha256_update(&s, "\n", 1);
    }
    free(names);
    moe_sha256_hex(&s, m->fp);
    return 0;
}

/* The safetensors headers of dir (one file or a sharded index) into the
 * name table: read before config.json, whose sizes are checked against the
 * tensors they hold before the config allocates anything per layer. */
static int open_tensors(moe_ckpt *m, const char *dir) {
    char *single = path_join(dir, "model.safetensors"), *index = path_join(dir, "model.safetensors.index.json");
    int rc = 0;
    if (file_exists(index)) {
        rc = load_index(m, index);
    } else if (file_exists(single)) {
        moe_st_file *f = open_file(m, "model.safetensors");
        if (!f) {
            rc = -1;
        } else {
            tab_alloc(m, (size_t)moe_st_count(f));
            for (int j = 0; j < moe_st_count(f); j++) {
                int ex;
                tab_put(m, moe_st_tensor_at(f, j)->name, moe_st_tensor_at(f, j), &ex);
            }
        }
    } else {
        char *bin = path_join(dir, "pytorch_model.bin"), *bini = path_join(dir, "pytorch_model.bin.index.json");
        if (file_exists(bin) || file_exists(bini))
            moe_error_set(MOE_ERR_DATA, "%s: only PyTorch pickle weights (pytorch_model*.bin); convert them "
                          "to safetensors first", dir);
        else
            moe_error_set(MOE_ERR_IO, "%s: no model.safetensors or model.safetensors.index.json", dir);
        free(bin);
        free(bini);
        rc = -1;
    }
    free(single);
    free(index);
    return rc;
}

/* One tensor config.json implies, found in the table: present (with a hint
 * for the fused-experts layout we do not read), of the implied shape, a float
 * dtype.  Returns the tensor or NULL with the error set. */
static const moe_st_tensor *bind_tensor(moe_ckpt *m, const moe_tensor_ref *r) {
    const moe_config *c = m->cfg;
    slot *s = tab_find(m, r->name);
    if (!s) {
        char fused[160];
        const char *hint = "";
        if (r->kind >= MOE_T_EXPERT_GATE && r->kind <= MOE_T_EXPERT_DOWN) {
            snprintf(fused, sizeof fused, "model.layers.%d.%s.experts.gate_up_proj", r->layer,
                     c->arch->mlp_prefix);
            if (tab_find(m, fused))
                hint = " (this checkpoint stores fused experts.gate_up_proj/down_proj tensors, "
                       "a layout not supported: save per-expert tensors)";
        }
        moe_error_set(MOE_ERR_DATA, "%s: tensor %s missing (config.json implies %s %s)%s", m->dir, r->name,
                      c->arch->model_type, moe_tensor_kind_name(r->kind), hint);
        return NULL;
    }
    s->used = 1;
    const moe_st_tensor *t = s->t;
    if (moe_st_check_shape(t, r->ndim, r->shape) < 0) {
        char msg[1024];
        snprintf(msg, sizeof msg, "%s (from config.json: hidden_size %d, heads %d x head_dim %d, "
                 "kv heads %d, experts %d)", moe_error(), c->hidden_size, c->num_heads, c->head_dim,
                 c->num_kv_heads, c->n_routed_experts);
        moe_error_set(MOE_ERR_DATA, "%s", msg);
        return NULL;
    }
    if (!moe_dtype_is_float(t->dtype)) {
        moe_error_set(MOE_ERR_DATA, "%s: tensor %s: dtype %s, expected F32, F16 or BF16", moe_st_path(t->file),
                      t->name, moe_dtype_st_name(t->dtype));
        return NULL;
    }
    return t;
}

/* Every tensor config.json implies, bound in config order (with each
 * layer's range of them); the checkpoint's dtype when they share one. */
static int bind_tensors(moe_ckpt *m) {
    const moe_config *c = m->cfg;
    m->nrefs = moe_config_tensor_list(c, &m->refs);
    if (m->nrefs < 0) return -1;
    m->ref_t = moe_calloc((size_t)m->nrefs + 1, sizeof *m->ref_t);
    m->layer_lo = moe_calloc((size_t)c->num_layers + 1, sizeof(int));
    m->layer_hi = moe_calloc((size_t)c->num_layers + 1, sizeof(int));
    for (int i = m->nrefs - 1; i >= 0; i--)
        if (m->refs[i].layer >= 0) m->layer_lo[m->refs[i].layer] = i;
    for (int i = 0; i < m->nrefs; i++)
        if (m->refs[i].layer >= 0) m->layer_hi[m->refs[i].layer] = i + 1;
    int dt = -2;
    for (int i = 0; i < m->nrefs; i++) {
        const moe_st_tensor *t = bind_tensor(m, &m->refs[i]);
        if (!t) return -1;
        if (dt == -2) dt = t->dtype;
        else if (dt != (int)t->dtype) dt = -1;
        m->ref_t[i] = t;
    }
    m->dtype = dt < 0 ? -1 : dt;
    /* a tied lm_head saved anyway is not an extra worth reporting, but keep it listed */
    m->extra = moe_malloc((m->ntab ? m->ntab : 1) * sizeof *m->extra);
    for (size_t i = 0; i < m->tabcap; i++)
        if (m->tab[i].name && !m->tab[i].used) m->extra[m->nextra++] = m->tab[i].name;
    qsort(m->extra, (size_t)m->nextra, sizeof *m->extra, cmp_cstr);
    return 0;
}

moe_ckpt *moe_ckpt_open(const char *dir)
{
    moe_ckpt *m = moe_calloc(1, sizeof *m);
    m->dir = moe_strdup(dir);
    m->dtype = -1;
    char *cfg_path = NULL;
    struct stat st;
    if (stat(dir, &st) < 0) {
        moe_error_set(MOE_ERR_IO, "%s: cannot open model directory: %s", dir, strerror(errno));
        goto fail;
    }
    if (!S_ISDIR(st.st_mode)) {
        moe_error_set(MOE_ERR_IO, "%s: not a directory (a model is a directory with config.json and "
                      "*.safetensors)", dir);
        goto fail;
    }
    if (open_tensors(m, dir) < 0) goto fail;
    size_t n_tensors = 0;
    for (int i = 0; i < m->nfiles; i++)
        for (int j = 0; j < moe_st_count(m->files[i]); j++) {
            m->bytes += moe_st_tensor_at(m->files[i], j)->nbytes;
            n_tensors++;
        }
    cfg_path = path_join(dir, "config.json");
    m->cfg = moe_config_load_bounded(cfg_path, n_tensors);
    if (!m->cfg || bind_tensors(m) < 0 || fingerprint(m, cfg_path) < 0) goto fail;
    free(cfg_path);
    return m;
fail:
    free(cfg_path);
    moe_ckpt_close(m);
    return NULL;
}

const moe_config *moe_ckpt_config(const moe_ckpt *m) { return m->cfg; }
const char *moe_ckpt_dir(const moe_ckpt *m) { return m->dir; }
const char *moe_ckpt_fingerprint(const moe_ckpt *m) { return m->fp; }
uint64_t moe_ckpt_bytes(const moe_ckpt *m) { return m->bytes; }
int moe_ckpt_dtype(const moe_ckpt *m) { return m->dtype; }
int moe_ckpt_n_extra(const moe_ckpt *m) { return m->nextra; }
const char *moe_ckpt_extra(const moe_ckpt *m, int i) { return i >= 0 && i < m->nextra ? m->extra[i] : NULL; }

const moe_st_tensor *moe_ckpt_find(const moe_ckpt *m, const char *name)
{
    slot *s = tab_find(m, name);
    return s ? s->t : NULL;
}

const moe_st_tensor *moe_ckpt_get(const moe_ckpt *m, int layer, moe_tensor_kind k, int expert)
{
    char name[MOE_TENSOR_NAME_MAX];
    if (moe_config_tensor_name(m->cfg, layer, k, expert, name, sizeof name) < 0) return NULL;
    if ((k == MOE_T_EXPERT_GATE || k == MOE_T_EXPERT_UP || k == MOE_T_EXPERT_DOWN) &&
        !moe_config_has_expert(m->cfg, layer, expert)) {
        moe_error_set(MOE_ERR_DATA, "%s: layer %d does not use expert %d (condensed)", m->dir, layer, expert);
        return NULL;
    }
    slot *s = tab_find(m, name);
    if (!s) { /* cannot happen after validation */
        moe_error_set(MOE_ERR_DATA, "%s: tensor %s missing", m->dir, name);
        return NULL;
    }
    return s->t;
}

int moe_ckpt_read_f32(const moe_ckpt *m, int layer, moe_tensor_kind k, int expert, float *dst)
{
    const moe_st_tensor *t = moe_ckpt_get(m, layer, k, expert);
    if (!t) return -1;
    return moe_st_read_f32(t, dst);
}

int moe_ckpt_read_named_f32(const moe_ckpt *m, const char *name, int ndim, const int64_t *shape, float *dst)
{
    const moe_st_tensor *t = moe_ckpt_find(m, name);
    if (!t) {
        moe_error_set(MOE_ERR_DATA, "%s: tensor %s missing", m->dir, name);
        return -1;
    }
    if (moe_st_check_shape(t, ndim, shape) < 0) return -1;
    return moe_st_read_f32(t, dst);
}

static void advise_layer(const moe_ckpt *m, int layer, int release)
{
    for (int i = 0; i < m->nrefs; i++) {
        if (m->refs[i].layer != layer) continue;
        if (release) moe_st_release(m->ref_t[i]);
        else moe_st_prefetch(m->ref_t[i]);
    }
}

void moe_ckpt_prefetch_layer(const moe_ckpt *m, int layer)
{
    if (layer >= 0 && layer < m->cfg->num_layers) {
        for (int i = m->layer_lo[layer]; i < m->layer_hi[layer]; i++) moe_st_prefetch(m->ref_t[i]);
        return;
    }
    advise_layer(m, layer, 0);
}

void moe_ckpt_release_layer(const moe_ckpt *m, int layer)
{
    if (layer >= 0 && layer < m->cfg->num_layers) {
        for (int i = m->layer_lo[layer]; i < m->layer_hi[layer]; i++) moe_st_release(m->ref_t[i]);
        return;
    }
    advise_layer(m, layer, 1);
}

void moe_ckpt_release_all(const moe_ckpt *m)
{
    for (int i = 0; i < m->nfiles; i++)
        for (int j = 0; j < moe_st_count(m->files[i]); j++) moe_st_release(moe_st_tensor_at(m->files[i], j));
}

/* ---- writer ------------------------------------------------------------------------ */

typedef struct {
    char *name;
    moe_dtype dt;
    int ndim;
    int64_t shape[MOE_ST_MAX_DIMS];
    uint64_t nbytes;
    const void *data;
    moe_st_fill_fn fill;
    void *ctx;
} decl;

struct moe_ckpt_writer {
    char *dir, *tmp;
    uint64_t shard_bytes;
    int force;
    decl *d;
    int n, cap;
};

static int rm_cb(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb, (void)flag, (void)ftw;
    return remove(p);
}

static int rm_rf(const char *p) { return nftw(p, rm_cb, 16, FTW_DEPTH | FTW_PHYS); }

moe_ckpt_writer *moe_ckpt_writer_open(const char *dir, uint64_t shard_bytes, int force)
{
    /* -o a symlink: the link stays, the directory it names is replaced.
     * "out/" names "out" (its temporary goes beside it, not inside). */
    char *given = moe_strdup(dir);
    for (size_t n = strlen(given); n > 1 && given[n - 1] == '/'; n--) given[n - 1] = 0;
    int special;
    char *target = moe_output_target(given, &special);
    free(given);
    if (!target) return NULL;
    struct stat st;
    if (stat(target, &st) == 0) {
        if (!force) {
            moe_error_set(MOE_ERR_IO, "%s: exists (use --force to replace it)", dir);
            free(target);
            return NULL;
        }
        if (!S_ISDIR(st.st_mode)) {
            moe_error_set(MOE_ERR_IO, "%s: exists and is not a directory", dir);
            free(target);
            return NULL;
        }
    }
    moe_ckpt_writer *w = moe_calloc(1, sizeof *w);
    w->dir = target;
    w->shard_bytes = shard_bytes;
    w->force = force;
    w->tmp = moe_tmp_path(w->dir);
    /* registered before it exists: a signal between mkdir and the
     * registration would otherwise leave the directory behind */
    moe_tmp_register(w->tmp);
    if (mkdir(w->tmp, 0777) < 0) {
        moe_error_set(MOE_ERR_IO, "%s: cannot create directory: %s", w->tmp, strerror(errno));
        moe_tmp_discard(w->tmp);
        free(w->tmp);
        free(w->dir);
        free(w);
        return NULL;
    }
    return w;
}

const char *moe_ckpt_writer_tmpdir(const moe_ckpt_writer *w) { return w->tmp; }

int moe_ckpt_writer_text(moe_ckpt_writer *w, const char *filename, const char *text)
{
    char *p = path_join(w->tmp, filename);
    FILE *fp = fopen(p, "wb");
    int rc = -1;
    if (!fp) {
        moe_error_set(MOE_ERR_IO, "%s: cannot create: %s", p, strerror(errno));
    } else {
        size_t n = strlen(text);
        int bad = fwrite(text, 1, n, fp) != n;
        bad |= fclose(fp) != 0;
        if (bad) moe_error_set(MOE_ERR_IO, "%s: write failed: %s", p, strerror(errno));
        else rc = 0;
    }
    free(p);
    return rc;
}

int moe_ckpt_writer_add(moe_ckpt_writer *w, const char *name, moe_dtype dt, int ndim, const int64_t *shape,
                        const void *data, moe_st_fill_fn fill, void *ctx)
{
    if (ndim < 0 || ndim > MOE_ST_MAX_DIMS || (unsigned)dt >= MOE_DT_COUNT) {
        moe_error_set(MOE_ERR_DATA, "%s: tensor %s: bad declaration", w->dir, name);
        return -1;
    }
    if (w->n == w->cap) {
        w->cap = w->cap ? 2 * w->cap : 256;
        w->d = moe_realloc(w->d, (size_t)w->cap * sizeof *w->d);
    }
    decl *d = &w->d[w->n++];
    memset(d, 0, sizeof *d);
    d->name = moe_strdup(name);
    d->dt = dt;
    d->ndim = ndim;
    uint64_t bits = (uint64_t)moe_dtype_bits(dt);
    for (int i = 0; i < ndim; i++) {
        d->shape[i] = shape[i];
        bits *= (uint64_t)shape[i];
    }
    d->nbytes = bits / 8;
    d->data = data;
    d->fill = fill;
    d->ctx = ctx;
    return 0;
}

static void writer_free(moe_ckpt_writer *w)
{
    for (int i = 0; i < w->n; i++) free(w->d[i].name);
    free(w->d);
    free(w->tmp);
    free(w->dir);
    free(w);
}

void moe_ckpt_writer_abort(moe_ckpt_writer *w)
{
    if (!w) return;
    moe_tmp_discard(w->tmp);
    writer_free(w);
}

static int cmp_decl_name(const void *a, const void *b)
{
    return strcmp((*(const decl *const *)a)->name, (*(const decl *const *)b)->name);
}

/* Replace an existing checkpoint so that its name always holds a whole one:
 * swap the new directory and the old one in one step (RENAME_EXCHANGE), then
 * remove the old one from the temporary name.  A signal at any point leaves
 * the old or the new checkpoint under the name, never neither.  Where the
 * file system cannot exchange, the old one is first moved to
 * ".NAME.old.PID", a name no sweep of stale temporaries ever deletes, and
 * moved back if the new one cannot take its place. */
static int move_into_place(moe_ckpt_writer *w)
{
    struct stat st;
    if (lstat(w->dir, &st) != 0) return moe_tmp_commit(w->tmp, w->dir);
    if (!w->force) {
        moe_error_set(MOE_ERR_IO, "%s: exists (use --force to replace it)", w->dir);
        return -1;
    }
    if (renameat2(AT_FDCWD, w->tmp, AT_FDCWD, w->dir, RENAME_EXCHANGE) == 0) {
        rm_rf(w->tmp); /* the old checkpoint, now under the temporary name */
        moe_tmp_discard(w->tmp);
        return 0;
    }
    if (errno != EINVAL && errno != ENOSYS && errno != ENOTSUP) {
        moe_error_set(MOE_ERR_IO, "%s: cannot replace: %s", w->dir, strerror(errno));
        return -1;
    }
    const char *slash = strrchr(w->dir, '/');
    size_t dirlen = slash ? (size_t)(slash - w->dir + 1) : 0;
    size_t n = strlen(w->dir) + 48;
    char *old = moe_malloc(n);
    snprintf(old, n, "%.*s.%s.old.%ld", (int)dirlen, w->dir, w->dir + dirlen, (long)getpid());
    int rc = -1;
    if (rename(w->dir, old) < 0) {
        moe_error_set(MOE_ERR_IO, "%s: cannot move the old directory aside: %s", w->dir, strerror(errno));
    } else if (moe_tmp_commit(w->tmp, w->dir) < 0) {
        if (rename(old, w->dir) < 0) { /* leave it where it is; the message says so */
            char msg[1024];
            snprintf(msg, sizeof msg, "%s (old directory left at %s)", moe_error(), old);
            moe_error_set(MOE_ERR_IO, "%s", msg);
        }
    } else {
        rm_rf(old);
        rc = 0;
    }
    free(old);
    return rc;
}

int moe_ckpt_writer_close(moe_ckpt_writer *w)
{
    /* shard assignment in declaration order */
    int *shard = moe_malloc((size_t)(w->n ? w->n : 1) * sizeof(int));
    int nshards = 1;
    uint64_t cur = 0, total = 0;
    for (int i = 0; i < w->n; i++) {
        if (w->shard_bytes && cur > 0 && cur + w->d[i].nbytes > w->shard_bytes) {
            nshards++;
            cur = 0;
        }
        shard[i] = nshards - 1;
        cur += w->d[i].nbytes;
        total += w->d[i].nbytes;
    }
    char **fnames = moe_calloc((size_t)nshards, sizeof *fnames);
    for (int s = 0; s < nshards; s++) {
        fnames[s] = moe_malloc(64);
        if (nshards == 1) snprintf(fnames[s], 64, "model.safetensors");
        else snprintf(fnames[s], 64, "model-%05d-of-%05d.safetensors", s + 1, nshards);
    }
    int rc = -1;
    for (int s = 0; s < nshards; s++) {
        char *p = path_join(w->tmp, fnames[s]);
        moe_st_writer *sw = moe_st_writer_open(p);
        free(p);
        for (int i = 0; i < w->n; i++) {
            if (shard[i] != s) continue;
            decl *d = &w->d[i];
            if (moe_st_writer_add(sw, d->name, d->dt, d->ndim, d->shape, d->data, d->fill, d->ctx) < 0) {
                moe_st_writer_abort(sw);
                goto out;
            }
        }
        if (moe_st_writer_close(sw) < 0) goto out;
    }
    if (nshards > 1) {
        json_t *root = json_object(), *wm = json_object();
        json_object_set_new(root, "metadata", json_pack("{s:I}", "total_size", (json_int_t)total));
        const decl **sorted = moe_malloc((size_t)w->n * sizeof *sorted);
        for (int i = 0; i < w->n; i++) sorted[i] = &w->d[i];
        qsort(sorted, (size_t)w->n, sizeof *sorted, cmp_decl_name);
        for (int i = 0; i < w->n; i++)
            json_object_set_new(wm, sorted[i]->name, json_string(fnames[shard[sorted[i] - w->d]]));
        free(sorted);
        json_object_set_new(root, "weight_map", wm);
        char *s = json_dumps(root, JSON_SORT_KEYS | JSON_INDENT(2));
        json_decref(root);
        size_t n = strlen(s);
        s = moe_realloc(s, n + 2);
        s[n] = '\n';
        s[n + 1] = 0;
        int r = moe_ckpt_writer_text(w, "model.safetensors.index.json", s);
        free(s);
        if (r < 0) goto out;
    }
    if (move_into_place(w) < 0) goto out;
    rc = 0;
out:
    for (int s = 0; s < nshards; s++) free(fnames[s]);
    free(fnames);
    free(shard);
    if (rc < 0) moe_ckpt_writer_abort(w);
    else writer_free(w);
    return rc;
}
