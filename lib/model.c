/* model.c - forward pass from kernels.h ops; weights streamed per layer.
 * See model.h for the API and the memory model. */
#include "model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend_cuda.h"
#include "common.h"

/* ---- state ------------------------------------------------------------- */

typedef struct {
    int loaded;
    int prefetched; /* loaded by moe_layer_prefetch: its copies may still be in flight */
    /* attention (weights in backend weight dtype; norms/biases f32) */
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

/* host staging ring of the device path (see stage_put) */
#define STG_SLOTS 4
#define STG_SLOT_BYTES m->stg_bytes
typedef struct {
    unsigned char *p;
    size_t used;
    uint64_t ticket; /* last copy queued from this slot */
} stg_slot;

struct moe_model {
    blk *live, *pool;   /* blocks handed out by balloc; freed blocks kept for reuse */
    size_t nlive, caplive, npool, cappool, pool_bytes;
    brw *brw;           /* weights that point into the checkpoint mapping */
    size_t nbrw, capbrw;
    int borrow;         /* host-memory backend with BF16 weights: borrow BF16 tensors */
    moe_ckpt *ck;
    const moe_config *cfg;
    const moe_backend *be;
    size_t cache_bytes;
    size_t pool_cap;    /* bytes of freed blocks kept for reuse */
    layer_w *lw;
    layer_override *ov;
    float *final_norm;
    void *scr[S_COUNT];
    size_t scr_n[S_COUNT];
    /* device path (host_memory 0): weights staged in the weight dtype */
    int direct;         /* 0 with MOE_STAGE_F32=1: the old f32 round trip */
    int async;          /* the backend has host_alloc .. upload_fence */
    int fence_due;      /* copies queued since the last upload_fence */
    stg_slot stg[STG_SLOTS];
    int stg_cur;
    uint64_t stg_last;  /* ticket of the last copy queued */
    size_t stg_bytes;   /* bytes of one slot (opts.staging_bytes, default 64 MiB) */
};

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

static void *balloc(moe_model *m, size_t n) {
    void *p = NULL;
#pragma omp critical(moe_model_blk)
    {
    for (size_t i = m->npool; i-- > 0;)
        if (m->pool[i].n == n) {
            p = m->pool[i].p;
            m->pool[i] = m->pool[--m->npool];
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

static void bfree(moe_model *m, void *p) {
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
            if (n >= ((size_t)1 << 20) && m->pool_bytes + n <= m->pool_cap) {
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

static void *scratch(moe_model *m, int slot, size_t nbytes) {
    if (m->scr_n[slot] < nbytes) {
        m->be->free(m->scr[slot]);
        m->scr[slot] = m->be->alloc(nbytes);
        m->scr_n[slot] = nbytes;
    }
    return m->scr[slot];
}

/* give the model's and the backend's scratch back (between phases, not per op) */
static void trim_scratch(moe_model *m) {
    if (m->be->host_memory) return; /* CPU: kept (host memory, cheap to keep) */
    for (int i = 0; i < S_COUNT; i++) {
        m->be->free(m->scr[i]);
        m->scr[i] = NULL;
        m->scr_n[i] = 0;
    }
    if (m->be->trim) m->be->trim();
}

float *moe_model_alloc(moe_model *m, size_t nfloats) {
    float *p = balloc(m, nfloats * sizeof(float) + 4);
    m->be->zero(p, nfloats * sizeof(float));
    return p;
}

void moe_model_free(moe_model *m, void *p) { bfree(m, p); }

static size_t wsz(const moe_model *m) { return moe_dtype_size(m->be->weight_dtype); }

/* Host f32 -> backend buffer of weight dtype (takes ownership of host). */
static void *to_backend_w(moe_model *m, float *host, size_t n) {
    const moe_backend *be = m->be;
    if (be->host_memory && be->weight_dtype == MOE_DT_F32) return host; /* alloc'd by be */
    void *tmp = host;
    if (be->weight_dtype != MOE_DT_F32) {
        tmp = moe_malloc(n * wsz(m) + 1);
        moe_dtype_from_f32(be->weight_dtype, host, tmp, n);
    }
    void *d = balloc(m, n * wsz(m) + 4);
    be->upload(d, tmp, n * wsz(m));
    if (tmp != host) free(tmp);
    if (be->host_memory)
        bfree(m, host);
    else
        free(host);
    return d;
}

/* Host f32 (from host_f32) -> backend buffer of float32 whatever the weight
 * dtype (takes ownership of host): weights for matmul_f32. */
static float *to_backend_f32(moe_model *m, float *host, size_t n) {
    if (m->be->host_memory) return host;
    float *d = balloc(m, n * sizeof(float) + 4);
    m->be->upload(d, host, n * sizeof(float));
    free(host);
    return d;
}

/* ---- device path: staging in the weight dtype -------------------------------------
 * A weight goes from the checkpoint mapping into a ring of STG_SLOTS host
 * buffers of STG_SLOT_BYTES (backend host_alloc: pinned memory on CUDA),
 * piece by piece, each piece queued with upload_async as soon as it is
 * written; a slot is written again only after upload_wait on its last
 * ticket.  BF16 checkpoint -> BF16 weights is a plain copy of the bytes;
 * other dtypes are converted through a small f32 block per thread, with the
 * same roundings as moe_ckpt_read_f32 + moe_dtype_from_f32 (so results do not
 * change).  Pieces of more than 1 MiB are filled by all threads.  The ops
 * may read the weights only after upload_ready() (upload_fence), which the
 * model issues before the first op of a layer or of a temporary weight.
 * Without the asynchronous ops, one host buffer and the synchronous upload
 * (BF16 -> BF16 straight from the mapping). */

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
    size_t es = (size_t)moe_dtype_bits(t->dtype) / 8, ws = wsz(m);
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

/* a slot with room for `bytes` (<= STG_SLOT_BYTES), waiting for its copies if reused */
static unsigned char *stage_slot(moe_model *m, size_t bytes) {
    stg_slot *s = &m->stg[m->stg_cur];
    if (s->p && s->used + bytes <= STG_SLOT_BYTES) return s->p + s->used;
    if (s->p) {
        m->stg_cur = (m->stg_cur + 1) % STG_SLOTS;
        s = &m->stg[m->stg_cur];
    }
    if (!s->p) s->p = m->be->host_alloc(STG_SLOT_BYTES);
    if (s->ticket) m->be->upload_wait(s->ticket);
    s->ticket = 0;
    s->used = 0;
    return s->p;
}

/* elements [e0, e0+n) of checkpoint tensor t -> backend memory dst (weight dtype) */
static void stage_put(moe_model *m, void *dst, const moe_st_tensor *t, size_t e0, size_t n) {
    const moe_backend *be = m->be;
    size_t ws = wsz(m);
    if (!m->async) {
        if (stored_as_weight(m, t)) {
            be->upload(dst, (const unsigned char *)t->data + e0 * ws, n * ws);
            return;
        }
        if (be->host_memory) { /* converted in place */
            fill_piece(m, dst, t, e0, n);
            return;
        }
        size_t chunk = STG_SLOT_BYTES / ws;
        void *h = moe_malloc((n < chunk ? n : chunk) * ws + 1);
        for (size_t i = 0; i < n; i += chunk) {
            size_t k = n - i < chunk ? n - i : chunk;
            fill_piece(m, h, t, e0 + i, k);
            be->upload((unsigned char *)dst + i * ws, h, k * ws);
        }
        free(h);
        return;
    }
    size_t per = STG_SLOT_BYTES / ws;
    for (size_t i = 0; i < n;) {
        size_t k = n - i < per ? n - i : per;
        stg_slot *s0 = &m->stg[m->stg_cur];
        /* a piece that does not fit the current slot's rest: split it there
         * when the rest is big (whole-slot copies), else take the next slot */
        if (s0->p && s0->used + k * ws > STG_SLOT_BYTES && s0->used + STG_SLOT_BYTES / 4 <= STG_SLOT_BYTES)
            k = (STG_SLOT_BYTES - s0->used) / ws;
        unsigned char *h = stage_slot(m, k * ws);
        fill_piece(m, h, t, e0 + i, k);
        stg_slot *s = &m->stg[m->stg_cur];
        s->ticket = m->stg_last = be->upload_async((unsigned char *)dst + i * ws, h, k * ws);
        s->used += (k * ws + 63) & ~(size_t)63;
        m->fence_due = 1;
        i += k;
    }
}

/* ops issued from now on see every weight staged so far */
static void upload_ready(moe_model *m) {
    if (m->fence_due) {
        m->be->upload_fence();
        m->fence_due = 0;
    }
}

/* matrix (or rows [r0, r0+nr) of a matrix) of checkpoint tensor t -> new backend block */
static void *direct_mat(moe_model *m, const moe_st_tensor *t, size_t e0, size_t n) {
    void *d = balloc(m, n * wsz(m) + 4);
    stage_put(m, d, t, e0, n);
    return d;
}

static float *host_f32(moe_model *m, size_t n) {
    /* host staging: backend memory when it is host memory (no copy later) */
    if (m->be->host_memory) return balloc(m, n * sizeof(float) + 4);
    return moe_malloc(n * sizeof(float) + 4);
}

static void free_host_f32(moe_model *m, float *p) {
    if (m->be->host_memory)
        bfree(m, p);
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
static float *load_vec(moe_model *m, int l, moe_tensor_kind k) {
    size_t n = tensor_numel(m, l, k);
    float *h = host_f32(m, n);
    if (moe_ckpt_read_f32(m->ck, l, k, -1, h) < 0) {
        free_host_f32(m, h);
        return NULL;
    }
    if (m->be->host_memory) return h;
    float *d = balloc(m, n * sizeof(float) + 4);
    m->be->upload(d, h, n * sizeof(float));
    free(h);
    return d;
}

/* matrix weight in backend weight dtype */
static void *load_mat(moe_model *m, int l, moe_tensor_kind k, int expert) {
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
static void *load_gate_up(moe_model *m, int l, moe_tensor_kind kg, moe_tensor_kind ku, int expert,
                          size_t IH) {
    if (use_direct(m)) { /* two copies into the two halves */
        const moe_st_tensor *tg = moe_ckpt_get(m->ck, l, kg, expert);
        const moe_st_tensor *tu = tg ? moe_ckpt_get(m->ck, l, ku, expert) : NULL;
        if (!tu) return NULL;
        /* gate then up, adjacent in the file (as the writers order them): [2I, H] */
        if (borrow_ok(m, tg) && borrow_ok(m, tu) &&
            (const unsigned char *)tu->data == (const unsigned char *)tg->data + 2 * IH)
            return borrow(m, tg->data, tg, tu);
        void *d = balloc(m, 2 * IH * wsz(m) + 4);
        stage_put(m, d, tg, 0, IH);
        stage_put(m, (unsigned char *)d + IH * wsz(m), tu, 0, IH);
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

static int check_layer(const moe_model *m, int l) {
    if (l < 0 || l >= m->cfg->num_layers) {
        moe_error_set(MOE_ERR_DATA, "%s: layer %d out of range (model has %d layers)",
                      moe_ckpt_dir(m->ck), l, m->cfg->num_layers);
        return -1;
    }
    return 0;
}

/* ---- open / close ------------------------------------------------------ */

void moe_model_set_threads(int n) { moe_kernels_set_threads(n); }

moe_model *moe_model_open(const char *dir, const moe_model_opts *opts) {
    const moe_backend *be =
        opts && opts->backend ? opts->backend : moe_backend_select(opts ? opts->device : NULL);
    if (!be) return NULL;
    moe_ckpt *ck = moe_ckpt_open(dir);
    if (!ck) return NULL;
    const moe_config *c = moe_ckpt_config(ck);
    /* the default CPU backend on a BF16 checkpoint: the table that computes
     * from BF16 weights (same results, no f32 copy of the weights; kernels.h) */
    const char *cw = getenv("MOE_CPU_WEIGHTS");
    if (!(opts && opts->backend) && be == moe_backend_cpu() && moe_ckpt_dtype(ck) == MOE_DT_BF16 &&
        !(cw && !strcmp(cw, "f32")))
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
    const char *old_path = getenv("MOE_STAGE_F32"); /* benchmarks: the f32 round trip */
    m->direct = !be->host_memory ? !(old_path && *old_path && strcmp(old_path, "0") != 0)
                                 : be->weight_dtype != MOE_DT_F32; /* cpu-bf16 */
    m->stg_bytes = opts && opts->staging_bytes ? opts->staging_bytes : (size_t)64 << 20;
    if (m->stg_bytes < 256) m->stg_bytes = 256;
    m->stg_bytes &= ~(size_t)63;
    const char *bw = getenv("MOE_CPU_BORROW"); /* benchmarks: 0 = copy the BF16 bytes */
    m->borrow = be->host_memory && be->weight_dtype == MOE_DT_BF16 && !(bw && !strcmp(bw, "0"));
    const char *pp = getenv("MOE_CPU_POPULATE");
    if (m->borrow && !(pp && !strcmp(pp, "0"))) m->borrow = 2; /* populate borrowed pages */
    m->async = m->direct && !be->host_memory && be->host_alloc && be->host_free && be->upload_async &&
               be->upload_wait && be->upload_fence;
    m->lw = moe_calloc((size_t)c->num_layers, sizeof *m->lw);
    m->ov = moe_calloc((size_t)c->num_layers, sizeof *m->ov);
    m->final_norm = load_vec(m, -1, MOE_T_FINAL_NORM);
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
    if (m->async) {
        m->be->upload_wait(0); /* before the staging ring goes */
        for (int i = 0; i < STG_SLOTS; i++) m->be->host_free(m->stg[i].p);
    }
    if (m->be->trim) m->be->trim();
    bfree(m, m->final_norm);
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
    if (m->ov[l].active) return MOE_MLP_CONDENSED;
    return m->cfg->layers[l].kind;
}

/* kept experts of a condensed layer (override or config) */
static void condensed_list(const moe_model *m, int l, int *n, const int **ex, const float **w) {
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
    if (check_layer(m, l) < 0) return -1;
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
    if (l < 0 || l >= m->cfg->num_layers || !m->ov[l].active) return;
    moe_layer_unload(m, l);
    m->ov[l].active = 0;
}

/* ---- load / unload --------------------------------------------------------- */

void moe_layer_unload(moe_model *m, int l) {
    if (l < 0 || l >= m->cfg->num_layers) return;
    layer_w *w = &m->lw[l];
    if (!w->loaded) return;
    if (w->prefetched) upload_ready(m); /* frees are ordered after its copies */
    void *ps[] = {w->wq, w->wk, w->wv, w->wo, w->bq, w->bk, w->bv, w->qn, w->kn,
                  w->in_norm, w->post_norm, w->gu, w->down, w->router, w->s_gu, w->s_down,
                  w->s_gate};
    for (size_t i = 0; i < sizeof ps / sizeof *ps; i++) bfree(m, ps[i]);
    if (w->e_gu) {
        for (int e = 0; e < m->cfg->n_routed_experts; e++) {
            bfree(m, w->e_gu[e]);
            bfree(m, w->e_down[e]);
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
    condensed_list(m, l, &n, &ex, &wt);
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
static int convert_experts(moe_model *m, int l, int e0, int e1, void **gu, void **down) {
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
        gu[e] = load_gate_up(m, l, MOE_T_EXPERT_GATE, MOE_T_EXPERT_UP, e, IH);
        down[e] = gu[e] ? load_mat(m, l, MOE_T_EXPERT_DOWN, e) : NULL;
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
            bfree(m, gu[e]);
            bfree(m, down[e]);
            gu[e] = down[e] = NULL;
        }
        moe_error_set(kind ? kind : MOE_ERR_DATA, "%s", msg);
        return -1;
    }
    return 0;
}

static int layer_load(moe_model *m, int l, int prefetch) {
    if (check_layer(m, l) < 0) return -1;
    layer_w *w = &m->lw[l];
    if (w->loaded) {
        if (!prefetch && w->prefetched) {
            upload_ready(m);
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
    REQ(w->in_norm = load_vec(m, l, MOE_T_INPUT_NORM));
    REQ(w->post_norm = load_vec(m, l, MOE_T_POST_NORM));
    REQ(w->wq = load_mat(m, l, MOE_T_Q_PROJ, -1));
    REQ(w->wk = load_mat(m, l, MOE_T_K_PROJ, -1));
    REQ(w->wv = load_mat(m, l, MOE_T_V_PROJ, -1));
    REQ(w->wo = load_mat(m, l, MOE_T_O_PROJ, -1));
    if (c->qkv_bias) {
        REQ(w->bq = load_vec(m, l, MOE_T_Q_BIAS));
        REQ(w->bk = load_vec(m, l, MOE_T_K_BIAS));
        REQ(w->bv = load_vec(m, l, MOE_T_V_BIAS));
    }
    if (c->qk_norm != MOE_QK_NORM_NONE) {
        REQ(w->qn = load_vec(m, l, MOE_T_Q_NORM));
        REQ(w->kn = load_vec(m, l, MOE_T_K_NORM));
    }
    moe_mlp_kind kind = moe_model_layer_kind(m, l);
    const moe_layer_mlp *d = &c->layers[l];
    if (kind == MOE_MLP_DENSE) {
        w->I = c->intermediate_size;
        REQ(w->gu = load_gate_up(m, l, MOE_T_MLP_GATE, MOE_T_MLP_UP, -1, (size_t)w->I * H));
        REQ(w->down = load_mat(m, l, MOE_T_MLP_DOWN, -1));
    } else {
        int has_shared = d->has_shared && c->shared_intermediate_size > 0;
        int gated = has_shared && c->shared_gate;
        if (has_shared && (kind == MOE_MLP_MOE || gated)) {
            w->Is = c->shared_intermediate_size;
            REQ(w->s_gu = load_gate_up(m, l, MOE_T_SHARED_GATE, MOE_T_SHARED_UP, -1,
                                       (size_t)w->Is * H));
            REQ(w->s_down = load_mat(m, l, MOE_T_SHARED_DOWN, -1));
            if (gated) REQ(w->s_gate = load_mat(m, l, MOE_T_SHARED_EXPERT_GATE, -1));
        }
        if (kind == MOE_MLP_MOE) {
            int E = c->n_routed_experts;
            REQ(w->router = load_mat(m, l, MOE_T_ROUTER, -1));
            w->e_gu = moe_calloc((size_t)E, sizeof(void *));
            w->e_down = moe_calloc((size_t)E, sizeof(void *));
            size_t Im = (size_t)c->moe_intermediate_size;
            size_t bytes = (size_t)E * 3 * Im * H * wsz(m);
            if (bytes <= m->cache_bytes) {
                for (int e = 0; e < E; e++) w->e_gu[e] = (void *)1; /* all */
                if (convert_experts(m, l, 0, E, w->e_gu, w->e_down) < 0) goto fail;
            }
        } else if (load_condensed(m, l, w, has_shared && !gated) < 0) {
            goto fail;
        }
    }
#undef REQ
    if (!m->borrow) moe_ckpt_release_layer(m->ck, l); /* borrow: at unload */
    /* layer-major callers load l+1 next: let the kernel read it ahead */
    if (l + 1 < c->num_layers) moe_ckpt_prefetch_layer(m->ck, l + 1);
    if (prefetch)
        w->prefetched = m->fence_due;
    else
        upload_ready(m);
    return 0;
fail:
    moe_layer_unload(m, l);
    return -1;
}

int moe_layer_load(moe_model *m, int l) { return layer_load(m, l, 0); }

int moe_layer_prefetch(moe_model *m, int l) {
    if (m->be->host_memory || l < 0 || l >= m->cfg->num_layers) return 0; /* a hint */
    return layer_load(m, l, 1);
}

static int ensure_loaded(moe_model *m, int l) {
    if (check_layer(m, l) < 0) return -1;
    return m->lw[l].loaded && !m->lw[l].prefetched ? 0 : moe_layer_load(m, l);
}

/* ---- compute pieces ------------------------------------------------------- */

int moe_model_embed(moe_model *m, float *x, const int32_t *ids, int T) {
    const moe_config *c = m->cfg;
    size_t H = (size_t)c->hidden_size;
    const moe_st_tensor *t = moe_ckpt_get(m->ck, -1, MOE_T_EMBED, -1);
    if (!t) return -1;
    size_t es = (size_t)moe_dtype_bits(t->dtype) / 8;
    float *h = m->be->host_memory ? x : moe_malloc(sizeof(float) * H * (size_t)T + 1);
    int rc = 0;
    for (int i = 0; i < T; i++) {
        if (ids[i] < 0 || ids[i] >= c->vocab_size) {
            moe_error_set(MOE_ERR_DATA, "%s: token id %d at position %d out of range (vocab %d)",
                          moe_ckpt_dir(m->ck), ids[i], i, c->vocab_size);
            rc = -1;
            break;
        }
        moe_dtype_to_f32(t->dtype, (const char *)t->data + (size_t)ids[i] * H * es, h + i * H, H);
    }
    if (!m->be->host_memory) {
        if (rc == 0) m->be->upload(x, h, sizeof(float) * H * (size_t)T);
        free(h);
    }
    moe_st_release(t);
    return rc == 0 ? moe_backend_status(m->be) : rc;
}

/* The attention's input side for T tokens at positions pos0..: xn =
 * RMSNorm_in(x); q, k, v projections (+ biases); qk-norm (whole or per head);
 * RoPE on q and k. */
static void qkv_project(moe_model *m, const layer_w *w, float *q /* [T, nh·D] */,
                        float *k /* [T, nkv·D] */, float *v /* [T, nkv·D] */,
                        float *xn /* [T, H] scratch */, const float *x /* [T, H] */, int T,
                        int pos0) {
    const moe_config *c = m->cfg;
    const moe_backend *be = m->be;
    int H = c->hidden_size, nh = c->num_heads, nkv = c->num_kv_heads, D = c->head_dim;
    float eps = (float)c->rms_norm_eps;
    be->rmsnorm(xn, x, w->in_norm, eps, T, H);
    be->matmul(q, xn, w->wq, w->bq, T, H, nh * D, 0);
    be->matmul(k, xn, w->wk, w->bk, T, H, nkv * D, 0);
    be->matmul(v, xn, w->wv, w->bv, T, H, nkv * D, 0);
    if (c->qk_norm == MOE_QK_NORM_FULL) {
        be->rmsnorm(q, q, w->qn, eps, T, nh * D);
        be->rmsnorm(k, k, w->kn, eps, T, nkv * D);
    } else if (c->qk_norm == MOE_QK_NORM_HEAD) {
        be->rmsnorm(q, q, w->qn, eps, T * nh, D);
        be->rmsnorm(k, k, w->kn, eps, T * nkv, D);
    }
    be->rope(q, (float)c->rope_theta, pos0, T, nh, D);
    be->rope(k, (float)c->rope_theta, pos0, T, nkv, D);
}

int moe_layer_attention(moe_model *m, int l, float *x, int T) {
    if (ensure_loaded(m, l) < 0) return -1;
    const moe_config *c = m->cfg;
    if (c->sliding_window > 0 && T > c->sliding_window) {
        moe_error_set(MOE_ERR_DATA, "%s: sequence of %d tokens is longer than sliding_window %d "
                      "(not supported)", c->path, T, c->sliding_window);
        return -1;
    }
    const moe_backend *be = m->be;
    layer_w *w = &m->lw[l];
    int H = c->hidden_size, nh = c->num_heads, nkv = c->num_kv_heads, D = c->head_dim;
    size_t t = (size_t)T;
    float *xn = scratch(m, S_XN, sizeof(float) * t * H);
    float *q = scratch(m, S_Q, sizeof(float) * t * nh * D);
    float *k = scratch(m, S_K, sizeof(float) * t * nkv * D);
    float *v = scratch(m, S_V, sizeof(float) * t * nkv * D);
    float *att = scratch(m, S_ATT, sizeof(float) * t * nh * D);
    qkv_project(m, w, q, k, v, xn, x, T, 0);
    be->attention(att, q, k, v, (float)(1.0 / sqrt((double)D)), T, nh, nkv, D);
    be->matmul(x, att, w->wo, NULL, T, nh * D, H, 1); /* x += att·Woᵀ */
    return moe_backend_status(be);
}

int moe_layer_mlp_input(moe_model *m, int l, float *xn, const float *x, int T) {
    if (ensure_loaded(m, l) < 0) return -1;
    m->be->rmsnorm(xn, x, m->lw[l].post_norm, (float)m->cfg->rms_norm_eps, T, m->cfg->hidden_size);
    return 0;
}

/* y (+)= SwiGLU MLP with fused gate_up [2I,H] and down [H,I] */
static void swiglu_mlp(moe_model *m, float *y, const float *x, const void *gu_w,
                       const void *down_w, int down_f32, int T, int I, int accumulate) {
    const moe_backend *be = m->be;
    int H = m->cfg->hidden_size;
    float *gu = scratch(m, S_GU, sizeof(float) * (size_t)T * 2 * I);
    float *h = scratch(m, S_H, sizeof(float) * (size_t)T * I);
    be->matmul(gu, x, gu_w, NULL, T, H, 2 * I, 0);
    be->swiglu(h, gu, T, I);
    if (down_f32)
        be->matmul_f32(y, h, down_w, NULL, T, I, H, accumulate);
    else
        be->matmul(y, h, down_w, NULL, T, I, H, accumulate);
}

/* y += shared part (gated for qwen2_moe) */
static void add_shared(moe_model *m, layer_w *w, float *y, const float *xn, int T) {
    if (!w->s_gu) return;
    const moe_backend *be = m->be;
    int H = m->cfg->hidden_size;
    float *o = scratch(m, S_O, sizeof(float) * (size_t)T * H);
    swiglu_mlp(m, o, xn, w->s_gu, w->s_down, 0, T, w->Is, 0);
    if (w->s_gate) {
        float *z = scratch(m, S_Z, sizeof(float) * (size_t)T);
        be->matmul(z, xn, w->s_gate, NULL, T, H, 1, 0);
        be->sigmoid_gate_add(y, o, z, T, H);
    } else {
        be->axpy(y, o, 1.0f, (size_t)T * H);
    }
}

/* routing into host arrays (idx, wt, probs) */
static int route(moe_model *m, int l, const float *xn, int T, int32_t *idx_h, float *wt_h,
                 float *probs_h) {
    const moe_config *c = m->cfg;
    const moe_backend *be = m->be;
    layer_w *w = &m->lw[l];
    int E = c->n_routed_experts, K = c->top_k, H = c->hidden_size;
    void *router = w->router;
    if (!router) { /* overridden layer: router not loaded */
        router = load_mat(m, l, MOE_T_ROUTER, -1);
        if (!router) return -1;
        upload_ready(m);
    }
    float *lg = scratch(m, S_LOGITS, sizeof(float) * (size_t)T * E);
    int32_t *idx = scratch(m, S_IDX, sizeof(int32_t) * (size_t)T * K);
    float *wt = scratch(m, S_WT, sizeof(float) * (size_t)T * K);
    float *probs = probs_h ? scratch(m, S_PROBS, sizeof(float) * (size_t)T * E) : NULL;
    be->matmul(lg, xn, router, NULL, T, H, E, 0);
    int mode = c->router == MOE_ROUTER_TOPK_SOFTMAX ? MOE_ROUTE_TOPK_SOFTMAX : MOE_ROUTE_SOFTMAX_TOPK;
    int renorm = MOE_RENORM_NONE;
    if (c->norm_topk_prob && mode == MOE_ROUTE_SOFTMAX_TOPK)
        renorm = c->norm_topk_eps > 0 ? MOE_RENORM_SUM_EPS : MOE_RENORM_SUM;
    if (K == 1 && c->arch->id == MOE_ARCH_DEEPSEEK) renorm = MOE_RENORM_NONE; /* "top_k > 1 and" */
    be->router(idx, wt, probs, lg, mode, renorm, T, E, K);
    be->download(idx_h, idx, sizeof(int32_t) * (size_t)T * K);
    be->download(wt_h, wt, sizeof(float) * (size_t)T * K);
    if (probs_h) be->download(probs_h, probs, sizeof(float) * (size_t)T * E);
    if (router != w->router) bfree(m, router);
    return moe_backend_status(be); /* the routing went to the host: check it is real */
}

int moe_layer_route(moe_model *m, int l, const float *xn, int T, int32_t *idx, float *wt,
                    float *probs) {
    if (ensure_loaded(m, l) < 0) return -1;
    if (m->cfg->layers[l].kind != MOE_MLP_MOE) {
        moe_error_set(MOE_ERR_DATA, "%s: layer %d has no router", moe_ckpt_dir(m->ck), l);
        return -1;
    }
    return route(m, l, xn, T, idx, wt, probs);
}

/* expert e's weights: cached, or converted now (*tmp = 1: caller frees) */
static int expert_weights(moe_model *m, int l, int e, void **gu, void **down, int *tmp) {
    layer_w *w = &m->lw[l];
    size_t H = (size_t)m->cfg->hidden_size, Im = (size_t)m->cfg->moe_intermediate_size;
    if (w->e_gu && w->e_gu[e]) {
        *gu = w->e_gu[e];
        *down = w->e_down[e];
        *tmp = 0;
        return 0;
    }
    *gu = load_gate_up(m, l, MOE_T_EXPERT_GATE, MOE_T_EXPERT_UP, e, Im * H);
    *down = *gu ? load_mat(m, l, MOE_T_EXPERT_DOWN, e) : NULL;
    if (!*down) {
        bfree(m, *gu);
        return -1;
    }
    if (!is_borrowed(m, *gu) && !is_borrowed(m, *down)) release_expert_pages(m, l, e);
    upload_ready(m);
    *tmp = 1;
    return 0;
}

/* Routed experts of one chunk of tokens: grouped expert op, then the
 * weighted combine in ascending expert id per token. */
static int routed_chunk(moe_model *m, int l, float *y, const float *xn, int T, const int32_t *idx,
                        const float *wt) {
    const moe_config *c = m->cfg;
    const moe_backend *be = m->be;
    int E = c->n_routed_experts, K = c->top_k, H = c->hidden_size, Im = c->moe_intermediate_size;
    moe_dispatch d;
    moe_dispatch_build(&d, idx, wt, T, E, K);
    size_t nk = (size_t)T * K;
    int32_t *rows = scratch(m, S_TOK, sizeof(int32_t) * nk + 4);
    int32_t *slot = scratch(m, S_IDX, sizeof(int32_t) * nk + 4);
    float *swt = scratch(m, S_TWT, sizeof(float) * nk + 4);
    float *out = scratch(m, S_XE, sizeof(float) * nk * H + 4);
    be->upload(rows, d.tokens, sizeof(int32_t) * nk);
    be->upload(slot, d.slot, sizeof(int32_t) * nk);
    be->upload(swt, d.slot_wt, sizeof(float) * nk);
    const void **wg = moe_calloc((size_t)E, sizeof(void *)), **wd = moe_calloc((size_t)E, sizeof(void *));
    void **tg = moe_calloc((size_t)E, sizeof(void *)), **td = moe_calloc((size_t)E, sizeof(void *));
    layer_w *w = &m->lw[l];
    /* experts not cached are converted in groups of at most a quarter of the
     * cache budget (the rest stays free for buffers and mapped pages) */
    size_t ebytes = (size_t)3 * Im * H * wsz(m), budget = m->cache_bytes / 4;
    int rc = 0;
    for (int e0 = 0; e0 < E && rc == 0;) {
        size_t used = 0;
        int e1 = e0;
        for (; e1 < E; e1++) {
            if (d.off[e1 + 1] == d.off[e1]) continue;
            if (w->e_gu && w->e_gu[e1]) {
                wg[e1] = w->e_gu[e1];
                wd[e1] = w->e_down[e1];
                continue;
            }
            if (used > 0 && used + ebytes > budget) break;
            tg[e1] = (void *)1; /* to convert */
            used += ebytes;
        }
        if (used > 0) rc = convert_experts(m, l, e0, e1, tg, td);
        if (used > 0) upload_ready(m);
        for (int e = e0; e < e1 && rc == 0; e++)
            if (tg[e]) {
                wg[e] = tg[e];
                wd[e] = td[e];
            }
        if (rc == 0) be->experts(out, xn, rows, d.off, wg, wd, E, H, Im);
        for (int e = e0; e < e1; e++) {
            if (tg[e] && tg[e] != (void *)1) bfree(m, tg[e]);
            bfree(m, td[e]);
            tg[e] = td[e] = NULL;
            wg[e] = wd[e] = NULL;
        }
        e0 = e1;
    }
    free(tg);
    free(td);
    if (rc == 0) be->combine(y, out, slot, swt, T, K, H);
    free(wg);
    free(wd);
    moe_dispatch_free(&d);
    return rc;
}

static int routed_mlp(moe_model *m, int l, float *y, const float *xn, int T, moe_router_fn cb,
                      void *ctx) {
    const moe_config *c = m->cfg;
    layer_w *w = &m->lw[l];
    int E = c->n_routed_experts, K = c->top_k, H = c->hidden_size, Im = c->moe_intermediate_size;
    int32_t *idx = moe_malloc(sizeof(int32_t) * (size_t)T * K + 1);
    float *wt = moe_malloc(sizeof(float) * (size_t)T * K + 1);
    float *probs = cb ? moe_malloc(sizeof(float) * (size_t)T * E + 1) : NULL;
    int rc = route(m, l, xn, T, idx, wt, probs);
    /* tokens in chunks whose expert buffers (rows x (2H + Im) floats, plus the
     * backend's own of the same order) stay under ~1 GiB; a token's result does
     * not depend on the chunking */
    size_t per_tok = (size_t)K * (2 * (size_t)H + (size_t)Im) * sizeof(float) * 2;
    int chunk = (int)(((size_t)1 << 30) / per_tok);
    if (chunk < 1) chunk = 1;
    for (int t0 = 0; t0 < T && rc == 0; t0 += chunk) {
        int tc = T - t0 < chunk ? T - t0 : chunk;
        rc = routed_chunk(m, l, y + (size_t)t0 * H, xn + (size_t)t0 * H, tc, idx + (size_t)t0 * K,
                          wt + (size_t)t0 * K);
    }
    if (rc == 0) add_shared(m, w, y, xn, T);
    if (rc == 0) rc = moe_backend_status(m->be);
    if (rc == 0 && cb) cb(ctx, l, T, K, E, idx, wt, probs);
    free(idx);
    free(wt);
    free(probs);
    return rc;
}

int moe_layer_mlp_run(moe_model *m, int l, float *y, const float *xn, int T, moe_router_fn cb,
                  void *ctx) {
    if (ensure_loaded(m, l) < 0) return -1;
    layer_w *w = &m->lw[l];
    size_t TH = (size_t)T * m->cfg->hidden_size;
    switch (moe_model_layer_kind(m, l)) {
    case MOE_MLP_DENSE:
        swiglu_mlp(m, y, xn, w->gu, w->down, 0, T, w->I, 0);
        return moe_backend_status(m->be);
    case MOE_MLP_CONDENSED:
        if (w->I > 0)
            swiglu_mlp(m, y, xn, w->gu, w->down, w->down_f32, T, w->I, 0);
        else
            m->be->zero(y, TH * sizeof(float));
        add_shared(m, w, y, xn, T);
        return moe_backend_status(m->be);
    case MOE_MLP_MOE:
        return routed_mlp(m, l, y, xn, T, cb, ctx);
    }
    return -1;
}

int moe_layer_forward(moe_model *m, int l, float *x, int T, moe_router_fn cb, void *ctx) {
    if (moe_layer_attention(m, l, x, T) < 0) return -1;
    size_t TH = (size_t)T * m->cfg->hidden_size;
    float *xn = moe_model_alloc(m, TH), *y = moe_model_alloc(m, TH);
    int rc = moe_layer_mlp_input(m, l, xn, x, T);
    if (rc == 0) rc = moe_layer_mlp_run(m, l, y, xn, T, cb, ctx);
    if (rc == 0) m->be->axpy(x, y, 1.0f, TH);
    moe_model_free(m, xn);
    moe_model_free(m, y);
    return rc;
}

int moe_layer_expert(moe_model *m, int l, int e, float *y, const float *xn, int T) {
    if (ensure_loaded(m, l) < 0) return -1;
    const moe_config *c = m->cfg;
    if (c->layers[l].kind == MOE_MLP_DENSE || e < 0 || e >= c->n_routed_experts ||
        !moe_config_has_expert(c, l, e)) {
        moe_error_set(MOE_ERR_DATA, "%s: layer %d has no routed expert %d", moe_ckpt_dir(m->ck),
                      l, e);
        return -1;
    }
    void *gu, *down;
    int tmp;
    if (expert_weights(m, l, e, &gu, &down, &tmp) < 0) return -1;
    swiglu_mlp(m, y, xn, gu, down, 0, T, c->moe_intermediate_size, 0);
    if (tmp) {
        bfree(m, gu);
        bfree(m, down);
    }
    return moe_backend_status(m->be);
}

int moe_layer_shared(moe_model *m, int l, float *y, const float *xn, int T) {
    if (ensure_loaded(m, l) < 0) return -1;
    const moe_config *c = m->cfg;
    layer_w *w = &m->lw[l];
    size_t TH = (size_t)T * c->hidden_size;
    m->be->zero(y, TH * sizeof(float));
    if (c->layers[l].kind == MOE_MLP_DENSE || !c->layers[l].has_shared ||
        c->shared_intermediate_size == 0)
        return 0;
    if (w->s_gu) {
        add_shared(m, w, y, xn, T);
        return moe_backend_status(m->be);
    }
    /* condensed layer with the ungated shared MLP fused away: load it now */
    size_t H = (size_t)c->hidden_size;
    layer_w tmpw = {0};
    tmpw.Is = c->shared_intermediate_size;
    tmpw.s_gu = load_gate_up(m, l, MOE_T_SHARED_GATE, MOE_T_SHARED_UP, -1, (size_t)tmpw.Is * H);
    tmpw.s_down = tmpw.s_gu ? load_mat(m, l, MOE_T_SHARED_DOWN, -1) : NULL;
    int rc = tmpw.s_down ? 0 : -1;
    upload_ready(m);
    if (rc == 0) add_shared(m, &tmpw, y, xn, T);
    bfree(m, tmpw.s_gu);
    bfree(m, tmpw.s_down);
    return rc == 0 ? moe_backend_status(m->be) : rc;
}

int moe_model_final_norm(moe_model *m, float *y, const float *x, int T) {
    m->be->rmsnorm(y, x, m->final_norm, (float)m->cfg->rms_norm_eps, T, m->cfg->hidden_size);
    return moe_backend_status(m->be);
}

/* logits of T tokens, row t written to rowdst[t] (V floats; host memory when
 * dst_host, else backend memory).  lm_head is converted chunk by chunk of
 * vocabulary rows, each chunk once for all tokens. */
static int lm_head_rows(moe_model *m, const float *x, int T, float *const *rowdst, int dst_host) {
    const moe_config *c = m->cfg;
    const moe_backend *be = m->be;
    const moe_st_tensor *t = moe_ckpt_get(m->ck, -1, MOE_T_LM_HEAD, -1);
    if (!t) return -1;
    size_t H = (size_t)c->hidden_size, V = (size_t)c->vocab_size;
    size_t es = (size_t)moe_dtype_bits(t->dtype) / 8;
    size_t chunk = ((size_t)64 << 20) / (H * sizeof(float));
    if (chunk < 256) chunk = 256;
    if (chunk > V) chunk = V;
    float *yc = scratch(m, S_Y, sizeof(float) * (size_t)T * chunk);
    for (size_t r0 = 0; r0 < V; r0 += chunk) {
        size_t nr = V - r0 < chunk ? V - r0 : chunk;
        void *wb;
        const unsigned char *src = (const unsigned char *)t->data + r0 * H * es;
        int borrowed = 0;
        if (use_direct(m) && borrow_ok(m, t)) {
            wb = (void *)src; /* the mapping itself (released below) */
            borrowed = 1;
        } else if (use_direct(m)) {
            wb = direct_mat(m, t, r0 * H, nr * H);
            upload_ready(m);
        } else {
            float *h = host_f32(m, nr * H);
            moe_dtype_to_f32(t->dtype, (const char *)t->data + r0 * H * es, h, nr * H);
            wb = to_backend_w(m, h, nr * H);
        }
        be->matmul(yc, x, wb, NULL, T, (int)H, (int)nr, 0);
        if (!borrowed) bfree(m, wb);
        if (dst_host && !be->host_memory) {
            /* one transfer per chunk, not one per token: each download waits
             * for the device */
            float *hc = moe_malloc(sizeof(float) * (size_t)T * nr);
            be->download(hc, yc, sizeof(float) * (size_t)T * nr);
            for (int i = 0; i < T; i++) memcpy(rowdst[i] + r0, hc + (size_t)i * nr, nr * sizeof(float));
            free(hc);
        } else {
            for (int i = 0; i < T; i++) be->copy(rowdst[i] + r0, yc + (size_t)i * nr, nr * sizeof(float));
        }
        moe_st_release(t); /* drop the mapped pages read so far */
    }
    return moe_backend_status(be);
}

int moe_model_lm_head(moe_model *m, float *logits, const float *x, int T) {
    float **rows = moe_malloc(sizeof(float *) * ((size_t)T + 1));
    for (int i = 0; i < T; i++) rows[i] = logits + (size_t)i * m->cfg->vocab_size;
    int rc = lm_head_rows(m, x, T, rows, 0);
    free(rows);
    return rc;
}

/* ---- whole model ------------------------------------------------------------ */

int moe_model_forward(moe_model *m, moe_seq *seqs, int n, int start_layer, moe_router_fn cb,
                      void *ctx) {
    const moe_config *c = m->cfg;
    const moe_backend *be = m->be;
    int L = c->num_layers, H = c->hidden_size;
    if (start_layer < 0 || start_layer > L) {
        moe_error_set(MOE_ERR_DATA, "%s: start layer %d out of range (0..%d)", moe_ckpt_dir(m->ck),
                      start_layer, L);
        return -1;
    }
    size_t tot = 0;
    size_t *off = moe_malloc(sizeof(size_t) * (size_t)(n + 1));
    for (int s = 0; s < n; s++) {
        if (seqs[s].T <= 0 || (start_layer > 0 && !seqs[s].hidden)) {
            moe_error_set(MOE_ERR_DATA, "%s: sequence %d: %s", moe_ckpt_dir(m->ck), s,
                          seqs[s].T <= 0 ? "empty" : "restart needs its cached hidden state");
            free(off);
            return -1;
        }
        off[s] = tot;
        tot += (size_t)seqs[s].T;
    }
    off[n] = tot;
    float *x = moe_model_alloc(m, tot * H), *xn = moe_model_alloc(m, tot * H);
    float *y = moe_model_alloc(m, tot * H);
    int rc = 0;
#define HID(s, i) (seqs[s].hidden + (size_t)(i) * seqs[s].T * H)
    for (int s = 0; s < n && rc == 0; s++) {
        float *xs = x + off[s] * H;
        size_t nb = sizeof(float) * (size_t)seqs[s].T * H;
        if (start_layer == 0) {
            rc = moe_model_embed(m, xs, seqs[s].ids, seqs[s].T);
            if (rc == 0 && seqs[s].hidden) be->download(HID(s, 0), xs, nb);
        } else {
            be->upload(xs, HID(s, start_layer), nb);
        }
    }
    /* layers this call loads (and unloads); a prefetched one counts as ours */
    char *ours = moe_calloc((size_t)L + 1, 1);
    for (int l = start_layer; l < L && rc == 0; l++) {
        if (!m->lw[l].loaded) ours[l] = 1;
        rc = moe_layer_load(m, l);
        for (int s = 0; s < n && rc == 0; s++)
            rc = moe_layer_attention(m, l, x + off[s] * H, seqs[s].T);
        if (rc == 0) rc = moe_layer_mlp_input(m, l, xn, x, (int)tot);
        if (rc == 0) rc = moe_layer_mlp_run(m, l, y, xn, (int)tot, cb, ctx);
        if (rc == 0) be->axpy(x, y, 1.0f, tot * H);
        if (ours[l]) moe_layer_unload(m, l);
        /* device: stage layer l+1 and queue its copies while the device still
         * runs layer l's experts (before anything waits for the device) */
        if (rc == 0 && l + 1 < L && !m->lw[l + 1].loaded) {
            ours[l + 1] = 1;
            rc = moe_layer_prefetch(m, l + 1);
        }
        if (rc == 0) rc = moe_backend_status(be); /* a device error ends the pass here */
        if (rc == 0 && l < L - 1)
            for (int s = 0; s < n; s++)
                if (seqs[s].hidden)
                    be->download(HID(s, l + 1), x + off[s] * H,
                                 sizeof(float) * (size_t)seqs[s].T * H);
    }
    for (int l = start_layer; l < L; l++)
        if (ours[l]) moe_layer_unload(m, l); /* after an error */
    free(ours);
    trim_scratch(m); /* the layers' scratch is not needed by lm_head */
    if (rc == 0) {
        if (start_layer < L)
            moe_model_final_norm(m, x, x, (int)tot);
        for (int s = 0; s < n; s++) {
            float *xs = x + off[s] * H;
            size_t nb = sizeof(float) * (size_t)seqs[s].T * H;
            if (start_layer < L) {
                if (seqs[s].hidden) be->download(HID(s, L), xs, nb);
            }
        }
        /* logits of all sequences that want them, lm_head converted once */
        float **rows = moe_malloc(sizeof(float *) * (tot + 1));
        float *xl = NULL;
        size_t nl = 0;
        for (int s = 0; s < n; s++)
            if (seqs[s].logits) nl += (size_t)seqs[s].T;
        if (nl == tot) {
            xl = x;
        } else if (nl > 0) { /* gather the rows of those sequences */
            xl = moe_model_alloc(m, nl * H);
            size_t r = 0;
            for (int s = 0; s < n; s++)
                if (seqs[s].logits) {
                    be->copy(xl + r * H, x + off[s] * H, sizeof(float) * (size_t)seqs[s].T * H);
                    r += (size_t)seqs[s].T;
                }
        }
        size_t r = 0;
        for (int s = 0; s < n; s++)
            if (seqs[s].logits)
                for (int i = 0; i < seqs[s].T; i++)
                    rows[r++] = seqs[s].logits + (size_t)i * c->vocab_size;
        if (nl > 0) rc = lm_head_rows(m, xl, (int)nl, rows, 1);
        if (xl && xl != x) moe_model_free(m, xl);
        free(rows);
    }
#undef HID
    if (rc == 0) rc = moe_backend_status(be); /* before the caller reads any output */
    moe_model_free(m, x);
    moe_model_free(m, xn);
    moe_model_free(m, y);
    free(off);
    return rc;
}

/* ---- attention over a KV cache (prefix sharing) ------------------------------ */

size_t moe_model_kv_floats(const moe_model *m, int T) {
    return (size_t)(T > 0 ? T : 0) * (size_t)m->cfg->num_kv_heads * (size_t)m->cfg->head_dim;
}

int moe_layer_attention_kv(moe_model *m, int l, float *x, int T, int pos0, float *kc, float *vc) {
    if (ensure_loaded(m, l) < 0) return -1;
    const moe_config *c = m->cfg;
    if (T < 1 || pos0 < 0 || !kc || !vc) {
        moe_error_set(MOE_ERR_DATA, "%s: attention over a cache: bad arguments (T %d, pos0 %d)",
                      c->path, T, pos0);
        return -1;
    }
    if (c->sliding_window > 0 && pos0 + T > c->sliding_window) {
        moe_error_set(MOE_ERR_DATA, "%s: sequence of %d tokens is longer than sliding_window %d "
                      "(not supported)", c->path, pos0 + T, c->sliding_window);
        return -1;
    }
    const moe_backend *be = m->be;
    layer_w *w = &m->lw[l];
    int H = c->hidden_size, nh = c->num_heads, nkv = c->num_kv_heads, D = c->head_dim;
    size_t t = (size_t)T, kvd = (size_t)nkv * D;
    float *xn = scratch(m, S_XN, sizeof(float) * t * H);
    float *q = scratch(m, S_Q, sizeof(float) * t * nh * D);
    float *att = scratch(m, S_ATT, sizeof(float) * t * nh * D);
    float *k = kc + (size_t)pos0 * kvd, *v = vc + (size_t)pos0 * kvd; /* this call's rows */
    qkv_project(m, w, q, k, v, xn, x, T, pos0); /* as moe_layer_attention, row for row */
    be->attention_kv(att, q, kc, vc, (float)(1.0 / sqrt((double)D)), pos0, T, nh, nkv, D);
    be->matmul(x, att, w->wo, NULL, T, nh * D, H, 1); /* x += att·Woᵀ */
    return moe_backend_status(be);
}
