/* weights.c - weight residency of the model: a pool of backend blocks,
 * weights borrowed from the checkpoint mapping (cpu-bf16), staging in the
 * weight dtype through the backend's stager, loading / unloading /
 * prefetching a layer, the routed experts' cache, run-time condensing, and
 * open / close.  See model.h for the memory model, internal.h for the
 * layout of lib/model/. */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

/* ---- backend memory with reuse ------------------------------------------------
 * Layers are loaded and unloaded one after another with the same shapes;
 * fresh allocations of that size cost a page fault per 4 KiB (a third of a
 * layer's load time on the CPU) or a cudaMalloc.  Freed blocks of >= 1 MiB
 * are kept (up to half the expert cache budget in total, at most 4 GiB on
 * device backends) and handed out again for the same size. */

static void blk_push(blk **a, size_t *n, size_t *cap, void *p, size_t sz) {
    if (*n == *cap) {
        *cap = *cap ? 2 * *cap : 256;
        *a = moe_realloc(*a, sizeof **a * *cap);
    }
    (*a)[(*n)++] = (blk){p, sz};
}

/* Frees the blocks freed longest ago until n more bytes fit the pool: a full
 * pool of sizes that never come back (a trainer's loaded weights, a step's
 * per-expert sizes) would otherwise send every later block back to the
 * system -- on the CPU a fresh 2 MiB page zeroed by the kernel per fault,
 * 5% of a training step.  Called inside the critical section. */
static void pool_make_room(moe_model *m, size_t n) {
    size_t drop = 0;
    while (drop < m->npool && m->pool_bytes + n > m->pool_cap) {
        m->be->free(m->pool[drop].p);
        m->pool_bytes -= m->pool[drop].n;
        drop++;
    }
    if (drop == 0) return; /* (memmove of an empty pool: NULL pointers, UBSan) */
    memmove(m->pool, m->pool + drop, sizeof *m->pool * (m->npool - drop));
    m->npool -= drop;
}

void *mdl_alloc(moe_model *m, size_t n) {
    void *p = NULL;
#pragma omp critical(moe_model_blk)
    {
    for (size_t i = m->npool; i-- > 0;)
        if (m->pool[i].n == n) {
            p = m->pool[i].p; /* the pool stays in the order blocks were freed */
            memmove(m->pool + i, m->pool + i + 1, sizeof *m->pool * (--m->npool - i));
            m->pool_bytes -= n;
            break;
        }
    if (!p) p = m->be->alloc(n);
    blk_push(&m->live, &m->nlive, &m->caplive, p, n);
    }
    return p;
}

/* Zero copy (cpu-bf16): a BF16 weight is used where it lies in the checkpoint
 * mapping (the kernels widen it tile by tile, from any 2-byte address).  Its
 * pages stay mapped until the weight is freed (bfree releases them) or its
 * layer is unloaded, so a layer's weights cost no copy and no extra memory. */
static int borrow_ok(const moe_model *m, const moe_st_tensor *t) {
    return m->borrow && t && t->dtype == MOE_DT_BF16;
}

static void *borrow(moe_model *m, const void *p, const moe_st_tensor *t0, const moe_st_tensor *t1) {
    if (m->borrow > 1) { /* map the pages now: cheaper than a fault per page in the ops */
        moe_st_populate(t0);
        if (t1) moe_st_populate(t1);
    }
#pragma omp critical(moe_model_blk)
    {
        if (m->nbrw == m->capbrw) {
            m->capbrw = m->capbrw ? 2 * m->capbrw : 256;
            m->brw = moe_realloc(m->brw, sizeof *m->brw * m->capbrw);
        }
        m->brw[m->nbrw++] = (brw){p, {t0, t1}};
    }
    return (void *)p;
}

static int is_borrowed(moe_model *m, const void *p) {
    int r = 0;
    if (!p || !m->nbrw) return 0;
#pragma omp critical(moe_model_blk)
    for (size_t i = 0; i < m->nbrw && !r; i++) r = m->brw[i].p == p;
    return r;
}

void mdl_free(moe_model *m, void *p) {
    if (!p) return;
    int found = 0, keep = 0;
    brw b = {0};
#pragma omp critical(moe_model_blk)
    {
    for (size_t i = m->nbrw; i-- > 0;)
        if (m->brw[i].p == p) { /* borrowed: nothing to free, pages to release */
            b = m->brw[i];
            m->brw[i] = m->brw[--m->nbrw];
            found = keep = 1;
            break;
        }
    for (size_t i = m->nlive; !found && i-- > 0;)
        if (m->live[i].p == p) {
            size_t n = m->live[i].n;
            m->live[i] = m->live[--m->nlive];
            found = 1;
            if (n >= ((size_t)1 << 20) && n <= m->pool_cap) {
                pool_make_room(m, n);
                blk_push(&m->pool, &m->npool, &m->cappool, p, n);
                m->pool_bytes += n;
                keep = 1;
            }
            break;
        }
    }
    if (b.p) {
        moe_st_release(b.t[0]);
        if (b.t[1]) moe_st_release(b.t[1]);
    }
    if (!keep) m->be->free(p); /* not pooled, or not from balloc */
    (void)found;
}

/* ---- small helpers ------------------------------------------------------- */

void *mdl_scratch(moe_model *m, int slot, size_t nbytes) {
    if (m->scr_n[slot] < nbytes) {
        m->be->free(m->scr[slot]);
        m->scr[slot] = m->be->alloc(nbytes);
        m->scr_n[slot] = nbytes;
    }
    return m->scr[slot];
}

/* give the model's and the backend's scratch back (between phases, not per op) */
void mdl_trim_scratch(moe_model *m) {
    if (m->be->host_memory) return; /* CPU: kept (host memory, cheap to keep) */
    for (int i = 0; i < S_COUNT; i++) {
        m->be->free(m->scr[i]);
        m->scr[i] = NULL;
        m->scr_n[i] = 0;
    }
    if (m->be->trim) m->be->trim();
}

float *moe_model_alloc(moe_model *m, size_t nfloats) {
    float *p = mdl_alloc(m, nfloats * sizeof(float) + 4);
    m->be->zero(p, nfloats * sizeof(float));
    return p;
}

void moe_model_free(moe_model *m, void *p) { mdl_free(m, p); }

size_t mdl_wsz(const moe_model *m) { return moe_dtype_size(m->be->weight_dtype); }

/* Host f32 -> backend buffer of weight dtype (takes ownership of host). */
static void *to_backend_w(moe_model *m, float *host, size_t n) {
    const moe_backend *be = m->be;
    if (be->host_memory && be->weight_dtype == MOE_DT_F32) return host; /* alloc'd by be */
    void *tmp = host;
    if (be->weight_dtype != MOE_DT_F32) {
        tmp = moe_malloc(n * mdl_wsz(m) + 1);
        moe_dtype_from_f32(be->weight_dtype, host, tmp, n);
    }
    void *d = mdl_alloc(m, n * mdl_wsz(m) + 4);
    be->upload(d, tmp, n * mdl_wsz(m));
    if (tmp != host) free(tmp);
    if (be->host_memory)
        mdl_free(m, host);
    else
        free(host);
    return d;
}

/* Host f32 (from host_f32) -> backend buffer of float32 whatever the weight
 * dtype (takes ownership of host): weights for matmul_f32. */
static float *to_backend_f32(moe_model *m, float *host, size_t n) {
    if (m->be->host_memory) return host;
    float *d = mdl_alloc(m, n * sizeof(float) + 4);
    m->be->upload(d, host, n * sizeof(float));
    free(host);
    return d;
}

/* ---- device path: staging in the weight dtype -------------------------------------
 * A weight goes from the checkpoint mapping to the backend through its
 * staging ring (kernels.h, moe_stager: pinned host buffers and asynchronous
 * copies on CUDA), piece by piece.  BF16 checkpoint -> BF16 weights is a
 * plain copy of the bytes; other dtypes are converted through a small f32
 * block per thread, with the same roundings as moe_ckpt_read_f32 +
 * moe_dtype_from_f32 (so results do not change).  Pieces of more than 1 MiB
 * are filled by all threads.  The ops may read the weights only after
 * mdl_weights_ready() (upload_fence), which the model issues before the
 * first op of a layer or of a temporary weight. */

static int use_direct(const moe_model *m) { return m->direct; }

/* the checkpoint stores t in the backend's weight dtype: its bytes are the weight's */
static int stored_as_weight(const moe_model *m, const moe_st_tensor *t) {
    int wdt = m->be->weight_dtype;
    return (wdt == MOE_DT_BF16 && t->dtype == MOE_DT_BF16) ||
           (wdt == MOE_DT_F32 && t->dtype == MOE_DT_F32);
}

#define CONV_BLOCK 8192 /* elements converted through the f32 block on the stack */

/* n elements [e0, e0+n) of checkpoint tensor t into host memory dst (weight dtype) */
static void fill_piece(const moe_model *m, void *dst, const moe_st_tensor *t, size_t e0, size_t n) {
    int wdt = m->be->weight_dtype;
    size_t es = (size_t)moe_dtype_bits(t->dtype) / 8, ws = mdl_wsz(m);
    const unsigned char *src = (const unsigned char *)t->data + e0 * es;
    int same = stored_as_weight(m, t);
    size_t blk_el = ((size_t)1 << 20) / ws; /* 1 MiB of output per task */
    long nb = (long)((n + blk_el - 1) / blk_el);
#pragma omp parallel for schedule(static) if (nb > 1)
    for (long b = 0; b < nb; b++) {
        size_t i0 = (size_t)b * blk_el, i1 = i0 + blk_el < n ? i0 + blk_el : n;
        if (same) {
            memcpy((unsigned char *)dst + i0 * ws, src + i0 * es, (i1 - i0) * ws);
            continue;
        }
        float tmp[CONV_BLOCK];
        for (size_t i = i0; i < i1; i += CONV_BLOCK) {
            size_t k = i1 - i < CONV_BLOCK ? i1 - i : CONV_BLOCK;
            moe_dtype_to_f32(t->dtype, src + i * es, tmp, k);
            moe_dtype_from_f32(wdt, tmp, (unsigned char *)dst + i * ws, k);
        }
    }
}

/* the stager's fill callback: elements of a tensor from e0 on */
typedef struct {
    const moe_model *m;
    const moe_st_tensor *t;
    size_t e0;
} piece_src;

static void fill_cb(void *ctx, void *dst, size_t i, size_t k) {
    const piece_src *p = ctx;
    fill_piece(p->m, dst, p->t, p->e0 + i, k);
}

/* elements [e0, e0+n) of checkpoint tensor t -> backend memory dst (weight dtype) */
static void stage_put(moe_model *m, void *dst, const moe_st_tensor *t, size_t e0, size_t n) {
    size_t ws = mdl_wsz(m);
    const void *raw = stored_as_weight(m, t) ? (const unsigned char *)t->data + e0 * ws : NULL;
    piece_src p = {m, t, e0};
    moe_stager_put(m->stg, dst, n, ws, raw, fill_cb, &p);
}

void mdl_weights_ready(moe_model *m) { moe_stager_ready(m->stg); }

/* matrix (or rows [r0, r0+nr) of a matrix) of checkpoint tensor t -> new backend block */
static void *direct_mat(moe_model *m, const moe_st_tensor *t, size_t e0, size_t n) {
    void *d = mdl_alloc(m, n * mdl_wsz(m) + 4);
    stage_put(m, d, t, e0, n);
    return d;
}

static float *host_f32(moe_model *m, size_t n) {
    /* host staging: backend memory when it is host memory (no copy later) */
    if (m->be->host_memory) return mdl_alloc(m, n * sizeof(float) + 4);
    return moe_malloc(n * sizeof(float) + 4);
}

static void free_host_f32(moe_model *m, float *p) {
    if (m->be->host_memory)
        mdl_free(m, p);
    else
        free(p);
}

static size_t tensor_numel(const moe_model *m, int l, moe_tensor_kind k) {
    int64_t sh[2];
    int nd = moe_config_tensor_shape(m->cfg, l, k, sh);
    if (nd < 0) return 0;
    return nd == 1 ? (size_t)sh[0] : (size_t)sh[0] * (size_t)sh[1];
}

/* f32 vector (norm weight, bias) in backend memory */
float *mdl_load_vec(moe_model *m, int l, moe_tensor_kind k) {
    size_t n = tensor_numel(m, l, k);
    float *h = host_f32(m, n);
    if (moe_ckpt_read_f32(m->ck, l, k, -1, h) < 0) {
        free_host_f32(m, h);
        return NULL;
    }
    if (m->be->host_memory) return h;
    float *d = mdl_alloc(m, n * sizeof(float) + 4);
    m->be->upload(d, h, n * sizeof(float));
    free(h);
    return d;
}

/* matrix weight in backend weight dtype */
void *mdl_load_mat(moe_model *m, int l, moe_tensor_kind k, int expert) {
    size_t n = tensor_numel(m, l, k);
    if (use_direct(m)) {
        const moe_st_tensor *t = moe_ckpt_get(m->ck, l, k, expert);
        if (borrow_ok(m, t)) return borrow(m, t->data, t, NULL);
        return t ? direct_mat(m, t, 0, n) : NULL;
    }
    float *h = host_f32(m, n);
    if (moe_ckpt_read_f32(m->ck, l, k, expert, h) < 0) {
        free_host_f32(m, h);
        return NULL;
    }
    return to_backend_w(m, h, n);
}

/* gate [I,H] and up [I,H] stacked into [2I,H] (gate rows first) */
void *mdl_load_gate_up(moe_model *m, int l, moe_tensor_kind kg, moe_tensor_kind ku, int expert,
                          size_t IH) {
    if (use_direct(m)) { /* two copies into the two halves */
        const moe_st_tensor *tg = moe_ckpt_get(m->ck, l, kg, expert);
        const moe_st_tensor *tu = tg ? moe_ckpt_get(m->ck, l, ku, expert) : NULL;
        if (!tu) return NULL;
        /* gate then up, adjacent in the file (as the writers order them): [2I, H] */
        if (borrow_ok(m, tg) && borrow_ok(m, tu) &&
            (const unsigned char *)tu->data == (const unsigned char *)tg->data + 2 * IH)
            return borrow(m, tg->data, tg, tu);
        void *d = mdl_alloc(m, 2 * IH * mdl_wsz(m) + 4);
        stage_put(m, d, tg, 0, IH);
        stage_put(m, (unsigned char *)d + IH * mdl_wsz(m), tu, 0, IH);
        return d;
    }
    float *h = host_f32(m, 2 * IH);
    if (moe_ckpt_read_f32(m->ck, l, kg, expert, h) < 0 ||
        moe_ckpt_read_f32(m->ck, l, ku, expert, h + IH) < 0) {
        free_host_f32(m, h);
        return NULL;
    }
    return to_backend_w(m, h, 2 * IH);
}

static void release_expert_pages(moe_model *m, int l, int e) {
    static const moe_tensor_kind ks[3] = {MOE_T_EXPERT_GATE, MOE_T_EXPERT_UP, MOE_T_EXPERT_DOWN};
    for (int i = 0; i < 3; i++) {
        const moe_st_tensor *t = moe_ckpt_get(m->ck, l, ks[i], e);
        if (t) moe_st_release(t);
    }
    moe_error_clear();
}

int mdl_check_layer(const moe_model *m, int l) {
    if (l < 0 || l >= m->cfg->num_layers) {
        moe_error_set(MOE_ERR_DATA, "%s: layer %d out of range (model has %d layers)",
                      moe_ckpt_dir(m->ck), l, m->cfg->num_layers);
        return -1;
    }
    return 0;
}

/* ---- open / close ------------------------------------------------------ */

void moe_model_set_threads(int n) { moe_kernels_set_threads(n); }

/* Expert cache and block pool sizes for the backend at hand. */
static void size_caches(moe_model *m, const moe_model_opts *opts) {
    const moe_backend *be = m->be;
    /* device backends: room for a whole layer's experts (the grouped GEMM wants
     * them on the device anyway; DeepSeekMoE-16B: 1.1 GB in BF16): 8 GiB, or a
     * quarter of the free device memory when that is less (at least 1 GiB) */
    m->cache_bytes = opts && opts->expert_cache_bytes ? opts->expert_cache_bytes
                     : be->host_memory                ? (size_t)1 << 30
                                                      : (size_t)8 << 30;
    if (!(opts && opts->expert_cache_bytes) && !be->host_memory && be->mem_info) {
        size_t fr = 0, tot = 0;
        be->mem_info(&fr, &tot);
        if (fr && fr / 4 < m->cache_bytes)
            m->cache_bytes = fr / 4 > ((size_t)1 << 30) ? fr / 4 : (size_t)1 << 30;
    }
    /* device memory is scarce: blocks of sizes that never come back (a dense
     * layer's, condensed candidates' fused weights) must not pile up */
    m->pool_cap = m->cache_bytes / 2;
    if (!be->host_memory && m->pool_cap > ((size_t)4 << 30)) m->pool_cap = (size_t)4 << 30;
}

/* How weights reach the backend (see model.h and moe_model_opts). */
static void weight_path(moe_model *m, const moe_model_opts *opts) {
    const moe_backend *be = m->be;
    int stage_f32 = opts && opts->stage_f32;
    m->direct = !be->host_memory ? !stage_f32 : be->weight_dtype != MOE_DT_F32; /* cpu-bf16 */
    m->borrow = be->host_memory && be->weight_dtype == MOE_DT_BF16 && !(opts && opts->cpu_copy_bf16);
    if (m->borrow && !(opts && opts->cpu_no_populate)) m->borrow = 2; /* populate borrowed pages */
    m->stg = moe_stager_new(be, opts ? opts->staging_bytes : 0);
}

/* The CPU table for opts->precision BF16 (model.h): the one computing in BF16
 * (the weights held as cpu-bf16 holds them); NULL + error where the device
 * has no BF16 compute (cpu-ref). */
static const moe_backend *bf16_compute_backend(const moe_backend *be) {
    if (be != moe_backend_cpu() && be != moe_backend_cpu_bf16()) {
        moe_error_set(MOE_ERR_DEVICE, "precision bf16 is not available on device %s", be->name);
        return NULL;
    }
    static int warned;
    if (!moe_cpu_bf16_native() && !warned++)
        moe_warn("precision bf16: this CPU has no AVX512-BF16; computing the BF16 products in "
                 "portable C (the same results, several times slower than float32)");
    return moe_backend_cpu_bf16_compute();
}

/* The backend of opts: a table given, else the device's, with its precision
 * (F32 on a GPU: float32 GEMMs, set before the backend starts). */
static const moe_backend *open_backend(const moe_model_opts *opts) {
    if (opts && opts->backend) return opts->backend;
    if (opts) {
        moe_device_opts d = opts->dev;
        if (opts->precision == MOE_PRECISION_F32) d.f32_compute = 1;
        moe_backend_configure(&d);
    }
    const moe_backend *be = moe_backend_select(opts ? opts->device : NULL);
    if (be && opts && opts->precision == MOE_PRECISION_BF16 && be->host_memory)
        be = bf16_compute_backend(be);
    return be;
}

moe_model *moe_model_open(const char *dir, const moe_model_opts *opts) {
    const moe_backend *be = open_backend(opts);
    if (!be) return NULL;
    moe_ckpt *ck = moe_ckpt_open(dir);
    if (!ck) return NULL;
    const moe_config *c = moe_ckpt_config(ck);
    /* the default CPU backend on a BF16 checkpoint: the table that computes
     * from BF16 weights (same results, no f32 copy of the weights; kernels.h) */
    if (!(opts && opts->backend) && be == moe_backend_cpu() && moe_ckpt_dtype(ck) == MOE_DT_BF16 &&
        !(opts && opts->cpu_f32_weights))
        be = moe_backend_cpu_bf16();
    if (c->clip_qkv > 0) {
        moe_error_set(MOE_ERR_DATA, "%s: clip_qkv %g is not supported", c->path, c->clip_qkv);
        moe_ckpt_close(ck);
        return NULL;
    }
    moe_model *m = moe_calloc(1, sizeof *m);
    m->ck = ck;
    m->cfg = c;
    m->be = be;
    /* the router's logits in float32 (model.h): same weights, f32 products */
    m->router_be = be == moe_backend_cpu_bf16_compute() ? moe_backend_cpu_bf16() : be;
    size_caches(m, opts);
    weight_path(m, opts);
    m->lw = moe_calloc((size_t)c->num_layers, sizeof *m->lw);
    m->ov = moe_calloc((size_t)c->num_layers, sizeof *m->ov);
    m->final_norm = mdl_load_vec(m, -1, MOE_T_FINAL_NORM);
    if (!m->final_norm) {
        moe_model_close(m);
        return NULL;
    }
    moe_ckpt_release_layer(ck, -1);
    return m;
}

void moe_model_close(moe_model *m) {
    if (!m) return;
    for (int l = 0; l < m->cfg->num_layers; l++) {
        moe_layer_unload(m, l);
        free(m->ov[l].experts);
        free(m->ov[l].weights);
    }
    for (int i = 0; i < S_COUNT; i++) m->be->free(m->scr[i]);
    moe_stager_free(m->stg); /* waits for its copies */
    if (m->be->trim) m->be->trim();
    mdl_free(m, m->final_norm);
    for (size_t i = 0; i < m->npool; i++) m->be->free(m->pool[i].p);
    for (size_t i = 0; i < m->nlive; i++) m->be->free(m->live[i].p); /* leaked by the caller */
    free(m->pool);
    free(m->live);
    free(m->brw);
    free(m->lw);
    free(m->ov);
    moe_ckpt_close(m->ck);
    free(m);
}

const moe_config *moe_model_config(const moe_model *m) { return m->cfg; }
const moe_ckpt *moe_model_ckpt(const moe_model *m) { return m->ck; }
const moe_backend *moe_model_backend(const moe_model *m) { return m->be; }
const char *moe_model_fingerprint(const moe_model *m) { return moe_ckpt_fingerprint(m->ck); }

/* ---- layer kinds ---------------------------------------------------------- */

moe_mlp_kind moe_model_layer_kind(const moe_model *m, int l) {
    if (m->ov[l].drop) return MOE_MLP_NONE;
    if (m->ov[l].active) return MOE_MLP_CONDENSED;
    return m->cfg->layers[l].kind;
}

moe_drop_kind moe_model_layer_drop(const moe_model *m, int l) {
    if (l < 0 || l >= m->cfg->num_layers) return MOE_DROP_NONE;
    if (m->ov[l].drop) return m->ov[l].drop;
    if (m->ov[l].active) return MOE_DROP_NONE;
    return m->cfg->layers[l].kind == MOE_MLP_NONE ? m->cfg->layers[l].drop : MOE_DROP_NONE;
}

int moe_model_drop_layer(moe_model *m, int l, moe_drop_kind d) {
    if (mdl_check_layer(m, l) < 0) return -1;
    if (m->cfg->layers[l].kind == MOE_MLP_NONE || (d != MOE_DROP_MLP && d != MOE_DROP_BLOCK)) {
        moe_error_set(MOE_ERR_DATA, "%s: layer %d: %s", moe_ckpt_dir(m->ck), l,
                      m->cfg->layers[l].kind == MOE_MLP_NONE ? "already dropped in the checkpoint"
                                                             : "unknown drop kind");
        return -1;
    }
    moe_layer_unload(m, l);
    m->ov[l].active = 0;
    m->ov[l].drop = d;
    return 0;
}

void mdl_condensed_list(const moe_model *m, int l, int *n, const int **ex, const float **w) {
    if (m->ov[l].active) {
        *n = m->ov[l].n;
        *ex = m->ov[l].experts;
        *w = m->ov[l].weights;
    } else {
        *n = m->cfg->layers[l].n_kept;
        *ex = m->cfg->layers[l].experts;
        *w = m->cfg->layers[l].weights;
    }
}

int moe_model_condense_layer(moe_model *m, int l, int n, const int *experts,
                             const float *weights) {
    if (mdl_check_layer(m, l) < 0) return -1;
    if (m->cfg->layers[l].kind != MOE_MLP_MOE) {
        moe_error_set(MOE_ERR_DATA, "%s: layer %d is not a routed MoE layer; cannot condense it",
                      moe_ckpt_dir(m->ck), l);
        return -1;
    }
    for (int i = 0; i < n; i++) {
        if (experts[i] < 0 || experts[i] >= m->cfg->n_routed_experts) {
            moe_error_set(MOE_ERR_DATA, "%s: layer %d: expert %d out of range (0..%d)",
                          moe_ckpt_dir(m->ck), l, experts[i], m->cfg->n_routed_experts - 1);
            return -1;
        }
        for (int j = 0; j < i; j++)
            if (experts[j] == experts[i]) {
                moe_error_set(MOE_ERR_DATA, "%s: layer %d: expert %d listed twice",
                              moe_ckpt_dir(m->ck), l, experts[i]);
                return -1;
            }
    }
    moe_layer_unload(m, l);
    layer_override *o = &m->ov[l];
    o->drop = MOE_DROP_NONE;
    free(o->experts);
    free(o->weights);
    o->experts = moe_malloc(sizeof(int) * (size_t)(n + 1));
    o->weights = moe_malloc(sizeof(float) * (size_t)(n + 1));
    if (n) {
        memcpy(o->experts, experts, sizeof(int) * (size_t)n);
        memcpy(o->weights, weights, sizeof(float) * (size_t)n);
    }
    o->n = n;
    o->active = 1;
    return 0;
}

void moe_model_restore_layer(moe_model *m, int l) {
    if (l < 0 || l >= m->cfg->num_layers || (!m->ov[l].active && !m->ov[l].drop)) return;
    moe_layer_unload(m, l);
    m->ov[l].active = 0;
    m->ov[l].drop = MOE_DROP_NONE;
}

/* ---- load / unload --------------------------------------------------------- */

void moe_layer_unload(moe_model *m, int l) {
    if (l < 0 || l >= m->cfg->num_layers) return;
    layer_w *w = &m->lw[l];
    if (!w->loaded) return;
    if (w->prefetched) mdl_weights_ready(m); /* frees are ordered after its copies */
    void *ps[] = {w->wq, w->wk, w->wv, w->wo, w->bq, w->bk, w->bv, w->qn, w->kn,
                  w->in_norm, w->post_norm, w->gu, w->down, w->router, w->s_gu, w->s_down,
                  w->s_gate};
    for (size_t i = 0; i < sizeof ps / sizeof *ps; i++) mdl_free(m, ps[i]);
    if (w->e_gu) {
        for (int e = 0; e < m->cfg->n_routed_experts; e++) {
            mdl_free(m, w->e_gu[e]);
            mdl_free(m, w->e_down[e]);
        }
    }
    free(w->e_gu);
    free(w->e_down);
    memset(w, 0, sizeof *w);
    if (m->borrow) moe_ckpt_release_layer(m->ck, l);
}

/* Fused condensed SwiGLU: kept experts (+ the shared MLP when ungated):
 * gate rows stacked, then up rows; down columns scaled by each expert's weight. */
static int load_condensed(moe_model *m, int l, layer_w *w, int fuse_shared) {
    const moe_config *c = m->cfg;
    int n;
    const int *ex;
    const float *wt;
    mdl_condensed_list(m, l, &n, &ex, &wt);
    size_t H = (size_t)c->hidden_size, Im = (size_t)c->moe_intermediate_size;
    size_t Is = fuse_shared ? (size_t)c->shared_intermediate_size : 0;
    size_t I = n * Im + Is;
    w->I = (int)I;
    if (I == 0) return 0;
    float *gu = host_f32(m, 2 * I * H);
    float *down = host_f32(m, H * I);
    float *tmp = moe_malloc(sizeof(float) * (Im > Is ? Im : Is) * H + 1);
    int rc = 0;
    for (int i = 0; i <= n && rc == 0; i++) {
        int shared = (i == n);
        if (shared && !Is) break;
        size_t Ii = shared ? Is : Im, off = shared ? n * Im : i * Im;
        int e = shared ? -1 : ex[i];
        moe_tensor_kind kg = shared ? MOE_T_SHARED_GATE : MOE_T_EXPERT_GATE;
        moe_tensor_kind ku = shared ? MOE_T_SHARED_UP : MOE_T_EXPERT_UP;
        moe_tensor_kind kd = shared ? MOE_T_SHARED_DOWN : MOE_T_EXPERT_DOWN;
        if (moe_ckpt_read_f32(m->ck, l, kg, e, gu + off * H) < 0 ||
            moe_ckpt_read_f32(m->ck, l, ku, e, gu + (I + off) * H) < 0 ||
            moe_ckpt_read_f32(m->ck, l, kd, e, tmp) < 0) {
            rc = -1;
            break;
        }
        float s = shared ? 1.0f : wt[i];
        for (size_t h = 0; h < H; h++)
            for (size_t j = 0; j < Ii; j++) down[h * I + off + j] = s * tmp[h * Ii + j];
        if (!shared) release_expert_pages(m, l, e);
    }
    free(tmp);
    if (rc < 0) {
        free_host_f32(m, gu);
        free_host_f32(m, down);
        return -1;
    }
    w->gu = to_backend_w(m, gu, 2 * I * H);
    /* the scaled down projection is not representable in a narrower weight
     * dtype: kept f32 when the backend takes f32 weights too (cpu-bf16: same
     * results as cpu); else rounded (a GPU) */
    if (m->be->weight_dtype != MOE_DT_F32 && m->be->matmul_f32) {
        w->down = to_backend_f32(m, down, H * I);
        w->down_f32 = 1;
    } else {
        w->down = to_backend_w(m, down, H * I);
    }
    return 0;
}

/* Convert routed experts e0 <= e < e1 of layer l whose gu[e] is non-NULL
 * (a marker on input) into gu[e], down[e]; in parallel on host-memory
 * backends (the bf16 -> f32 conversion dominates a layer's load time).
 * Errors are thread-local, so a worker's message is carried back.  On error
 * everything converted is freed and gu/down are NULL. */
int mdl_convert_experts(moe_model *m, int l, int e0, int e1, void **gu, void **down) {
    size_t IH = (size_t)m->cfg->moe_intermediate_size * m->cfg->hidden_size;
    int failed = 0, kind = 0;
    char msg[512] = "";
#pragma omp parallel for schedule(dynamic, 1) if (m->be->host_memory)
    for (int e = e0; e < e1; e++) {
        int f;
#pragma omp atomic read
        f = failed;
        if (!gu[e]) continue;
        gu[e] = down[e] = NULL;
        if (f) continue;
        gu[e] = mdl_load_gate_up(m, l, MOE_T_EXPERT_GATE, MOE_T_EXPERT_UP, e, IH);
        down[e] = gu[e] ? mdl_load_mat(m, l, MOE_T_EXPERT_DOWN, e) : NULL;
        if (!down[e]) {
#pragma omp critical(moe_model_load_err)
            if (!failed) {
#pragma omp atomic write
                failed = 1;
                snprintf(msg, sizeof msg, "%s", moe_error());
                kind = moe_error_kind();
            }
        } else if (!is_borrowed(m, gu[e]) && !is_borrowed(m, down[e])) {
            release_expert_pages(m, l, e); /* borrowed ones: when freed */
        }
    }
    if (failed) {
        for (int e = e0; e < e1; e++) {
            mdl_free(m, gu[e]);
            mdl_free(m, down[e]);
            gu[e] = down[e] = NULL;
        }
        moe_error_set(kind ? kind : MOE_ERR_DATA, "%s", msg);
        return -1;
    }
    return 0;
}

static int layer_load(moe_model *m, int l, int prefetch) {
    if (mdl_check_layer(m, l) < 0) return -1;
    layer_w *w = &m->lw[l];
    if (w->loaded) {
        if (!prefetch && w->prefetched) {
            mdl_weights_ready(m);
            w->prefetched = 0;
        }
        return 0;
    }
    const moe_config *c = m->cfg;
    size_t H = (size_t)c->hidden_size;
    memset(w, 0, sizeof *w);
    w->loaded = 1; /* so that unload frees partial work on error */
#define REQ(x)                                                                                     \
    do {                                                                                           \
        if (!(x)) goto fail;                                                                       \
    } while (0)
    moe_mlp_kind kind = moe_model_layer_kind(m, l);
    if (moe_model_layer_drop(m, l) == MOE_DROP_BLOCK) goto done; /* nothing to load */
    REQ(w->in_norm = mdl_load_vec(m, l, MOE_T_INPUT_NORM));
    if (kind != MOE_MLP_NONE) REQ(w->post_norm = mdl_load_vec(m, l, MOE_T_POST_NORM));
    REQ(w->wq = mdl_load_mat(m, l, MOE_T_Q_PROJ, -1));
    REQ(w->wk = mdl_load_mat(m, l, MOE_T_K_PROJ, -1));
    REQ(w->wv = mdl_load_mat(m, l, MOE_T_V_PROJ, -1));
    REQ(w->wo = mdl_load_mat(m, l, MOE_T_O_PROJ, -1));
    if (c->qkv_bias) {
        REQ(w->bq = mdl_load_vec(m, l, MOE_T_Q_BIAS));
        REQ(w->bk = mdl_load_vec(m, l, MOE_T_K_BIAS));
        REQ(w->bv = mdl_load_vec(m, l, MOE_T_V_BIAS));
    }
    if (c->qk_norm != MOE_QK_NORM_NONE) {
        REQ(w->qn = mdl_load_vec(m, l, MOE_T_Q_NORM));
        REQ(w->kn = mdl_load_vec(m, l, MOE_T_K_NORM));
    }
    const moe_layer_mlp *d = &c->layers[l];
    if (kind == MOE_MLP_NONE) {
        /* LayerDrop: the attention only */
    } else if (kind == MOE_MLP_DENSE) {
        w->I = moe_config_dense_width(c, l); /* a folded condensed layer has its own */
        REQ(w->gu = mdl_load_gate_up(m, l, MOE_T_MLP_GATE, MOE_T_MLP_UP, -1, (size_t)w->I * H));
        REQ(w->down = mdl_load_mat(m, l, MOE_T_MLP_DOWN, -1));
    } else {
        int has_shared = d->has_shared && c->shared_intermediate_size > 0;
        int gated = has_shared && c->shared_gate;
        if (has_shared && (kind == MOE_MLP_MOE || gated)) {
            w->Is = c->shared_intermediate_size;
            REQ(w->s_gu = mdl_load_gate_up(m, l, MOE_T_SHARED_GATE, MOE_T_SHARED_UP, -1,
                                       (size_t)w->Is * H));
            REQ(w->s_down = mdl_load_mat(m, l, MOE_T_SHARED_DOWN, -1));
            if (gated) REQ(w->s_gate = mdl_load_mat(m, l, MOE_T_SHARED_EXPERT_GATE, -1));
        }
        if (kind == MOE_MLP_MOE) {
            int E = c->n_routed_experts;
            REQ(w->router = mdl_load_mat(m, l, MOE_T_ROUTER, -1));
            w->e_gu = moe_calloc((size_t)E, sizeof(void *));
            w->e_down = moe_calloc((size_t)E, sizeof(void *));
            size_t Im = (size_t)c->moe_intermediate_size;
            size_t bytes = (size_t)E * 3 * Im * H * mdl_wsz(m);
            if (bytes <= m->cache_bytes) {
                for (int e = 0; e < E; e++) w->e_gu[e] = (void *)1; /* all */
                if (mdl_convert_experts(m, l, 0, E, w->e_gu, w->e_down) < 0) goto fail;
            }
        } else if (load_condensed(m, l, w, has_shared && !gated) < 0) {
            goto fail;
        }
    }
#undef REQ
done:
    if (!m->borrow) moe_ckpt_release_layer(m->ck, l); /* borrow: at unload */
    /* layer-major callers load l+1 next: let the kernel read it ahead */
    if (l + 1 < c->num_layers) moe_ckpt_prefetch_layer(m->ck, l + 1);
    if (prefetch)
        w->prefetched = moe_stager_pending(m->stg);
    else
        mdl_weights_ready(m);
    return 0;
fail:
    moe_layer_unload(m, l);
    return -1;
}

/* expert e's weights: cached, or converted now (*tmp = 1: caller frees) */
int mdl_expert_weights(moe_model *m, int l, int e, void **gu, void **down, int *tmp) {
    layer_w *w = &m->lw[l];
    size_t H = (size_t)m->cfg->hidden_size, Im = (size_t)m->cfg->moe_intermediate_size;
    if (w->e_gu && w->e_gu[e]) {
        *gu = w->e_gu[e];
        *down = w->e_down[e];
        *tmp = 0;
        return 0;
    }
    *gu = mdl_load_gate_up(m, l, MOE_T_EXPERT_GATE, MOE_T_EXPERT_UP, e, Im * H);
    *down = *gu ? mdl_load_mat(m, l, MOE_T_EXPERT_DOWN, e) : NULL;
    if (!*down) {
        mdl_free(m, *gu);
        return -1;
    }
    if (!is_borrowed(m, *gu) && !is_borrowed(m, *down)) release_expert_pages(m, l, e);
    mdl_weights_ready(m);
    *tmp = 1;
    return 0;
}

/* rows [r0, r0+nr) of lm_head (tensor t) as a weight of the backend */
void *mdl_lm_head_rows(moe_model *m, const moe_st_tensor *t, size_t r0, size_t nr, int *borrowed) {
    size_t H = (size_t)m->cfg->hidden_size, es = (size_t)moe_dtype_bits(t->dtype) / 8;
    const unsigned char *src = (const unsigned char *)t->data + r0 * H * es;
    *borrowed = 0;
    if (use_direct(m) && borrow_ok(m, t)) {
        *borrowed = 1;
        return (void *)src; /* the mapping itself (the caller releases its pages) */
    }
    if (use_direct(m)) {
        void *wb = direct_mat(m, t, r0 * H, nr * H);
        mdl_weights_ready(m);
        return wb;
    }
    float *h = host_f32(m, nr * H);
    moe_dtype_to_f32(t->dtype, src, h, nr * H);
    return to_backend_w(m, h, nr * H);
}

int moe_layer_load(moe_model *m, int l) { return layer_load(m, l, 0); }

int moe_layer_prefetch(moe_model *m, int l) {
    if (m->be->host_memory || l < 0 || l >= m->cfg->num_layers) return 0; /* a hint */
    return layer_load(m, l, 1);
}

int mdl_ensure_loaded(moe_model *m, int l) {
    if (mdl_check_layer(m, l) < 0) return -1;
    return m->lw[l].loaded && !m->lw[l].prefetched ? 0 : moe_layer_load(m, l);
}

