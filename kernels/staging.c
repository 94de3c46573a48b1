/* staging.c - weight uploads through a ring of host staging buffers, on top
 * of a backend's asynchronous upload ops (kernels.h, moe_stager).
 *
 * A weight is written piece by piece into a ring of MOE_STAGE_SLOTS host
 * buffers of slot_bytes (backend host_alloc: pinned memory on CUDA), each
 * piece queued with upload_async as soon as it is written; a slot is written
 * again only after upload_wait on its last ticket.  The ops may read the
 * weights only after moe_stager_ready (upload_fence).  Without the
 * asynchronous ops: one malloc'd host buffer and the synchronous upload
 * (bytes already in the weight dtype go straight from their source). */
#include <stdlib.h>

#include "common.h"
#include "kernels.h"

#define MOE_STAGE_SLOTS 4

struct moe_stager {
    const moe_backend *be;
    int async;      /* the backend has host_alloc .. upload_fence */
    int fence_due;  /* copies queued since the last upload_fence */
    size_t slot_bytes;
    struct {
        unsigned char *p;
        size_t used;
        uint64_t ticket; /* last copy queued from this slot */
    } slot[MOE_STAGE_SLOTS];
    int cur;
};

moe_stager *moe_stager_new(const moe_backend *be, size_t slot_bytes) {
    moe_stager *s = moe_calloc(1, sizeof *s);
    s->be = be;
    s->async = !be->host_memory && be->host_alloc && be->host_free && be->upload_async &&
               be->upload_wait && be->upload_fence;
    s->slot_bytes = slot_bytes ? slot_bytes : (size_t)64 << 20;
    if (s->slot_bytes < 256) s->slot_bytes = 256;
    s->slot_bytes &= ~(size_t)63;
    return s;
}

void moe_stager_free(moe_stager *s) {
    if (!s) return;
    if (s->async) {
        s->be->upload_wait(0); /* before the ring goes */
        for (int i = 0; i < MOE_STAGE_SLOTS; i++) s->be->host_free(s->slot[i].p);
    }
    free(s);
}

/* a slot with room for `bytes` (<= slot_bytes), waiting for its copies if reused */
static unsigned char *stage_slot(moe_stager *s, size_t bytes) {
    size_t cap = s->slot_bytes;
    if (s->slot[s->cur].p && s->slot[s->cur].used + bytes <= cap)
        return s->slot[s->cur].p + s->slot[s->cur].used;
    if (s->slot[s->cur].p) s->cur = (s->cur + 1) % MOE_STAGE_SLOTS;
    if (!s->slot[s->cur].p) s->slot[s->cur].p = s->be->host_alloc(cap);
    if (s->slot[s->cur].ticket) s->be->upload_wait(s->slot[s->cur].ticket);
    s->slot[s->cur].ticket = 0;
    s->slot[s->cur].used = 0;
    return s->slot[s->cur].p;
}

/* synchronous path: raw bytes straight, host memory filled in place, else
 * through one host buffer */
static void put_sync(moe_stager *s, void *dst, size_t n, size_t es, const void *raw,
                     moe_stage_fill fill, void *ctx) {
    const moe_backend *be = s->be;
    if (raw) {
        be->upload(dst, raw, n * es);
        return;
    }
    if (be->host_memory) {
        fill(ctx, dst, 0, n);
        return;
    }
    size_t chunk = s->slot_bytes / es;
    void *h = moe_malloc((n < chunk ? n : chunk) * es + 1);
    for (size_t i = 0; i < n; i += chunk) {
        size_t k = n - i < chunk ? n - i : chunk;
        fill(ctx, h, i, k);
        be->upload((unsigned char *)dst + i * es, h, k * es);
    }
    free(h);
}

void moe_stager_put(moe_stager *s, void *dst, size_t n, size_t es, const void *raw,
                    moe_stage_fill fill, void *ctx) {
    if (!s->async) {
        put_sync(s, dst, n, es, raw, fill, ctx);
        return;
    }
    size_t cap = s->slot_bytes, per = cap / es;
    for (size_t i = 0; i < n;) {
        size_t k = n - i < per ? n - i : per;
        size_t used = s->slot[s->cur].used;
        /* a piece that does not fit the current slot's rest: split it there
         * when the rest is big (whole-slot copies), else take the next slot */
        if (s->slot[s->cur].p && used + k * es > cap && used + cap / 4 <= cap)
            k = (cap - used) / es;
        unsigned char *h = stage_slot(s, k * es);
        fill(ctx, h, i, k);
        s->slot[s->cur].ticket = s->be->upload_async((unsigned char *)dst + i * es, h, k * es);
        s->slot[s->cur].used += (k * es + 63) & ~(size_t)63;
        s->fence_due = 1;
        i += k;
    }
}

int moe_stager_pending(const moe_stager *s) { return s->fence_due; }

void moe_stager_ready(moe_stager *s) {
    if (s->fence_due) {
        s->be->upload_fence();
        s->fence_due = 0;
    }
}
