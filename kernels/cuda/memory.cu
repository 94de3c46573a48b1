// memory.cu - device memory: the allocator with its accounting, copies, the
// asynchronous weight uploads (host_alloc .. upload_fence), growable scratch
// buffers, memory info and trimming.
// Part of the CUDA backend: see backend.cu and common.cuh.
#include "cuda/common.cuh"

// ---- memory -----------------------------------------------------------------

void *raw_alloc(size_t n) {
    if (g.failed) return g_dummy;
    if (n == 0) n = 1;
    void *p = NULL;
    cudaError_t e = g.pools ? cudaMallocAsync(&p, n, g.stream) : cudaMalloc(&p, n);
    if (e != cudaSuccess || !p) {
        (void)cudaGetLastError(); // clear the (non-sticky) allocation error
        size_t fr = 0, tot = 0;
        cudaMemGetInfo(&fr, &tot);
        if (e == cudaErrorMemoryAllocation)
            fail("out of device memory allocating %.1f MiB (free %.0f of %.0f MiB; "
                 "this backend holds %.0f MiB)",
                 n / 1048576.0, fr / 1048576.0, tot / 1048576.0, g.live / 1048576.0);
        else
            cuda_ok(e, g.pools ? "cudaMallocAsync(&p, n, stream)" : "cudaMalloc(&p, n)", __FILE__,
                    __LINE__);
        return g_dummy;
    }
    (*g_sizes)[p] = n;
    g.live += n;
    if (g.live > g.peak) g.peak = g.live;
    size_t fr = 0, tot = 0;
    if (cudaMemGetInfo(&fr, &tot) == cudaSuccess && tot - fr > g.used_peak) g.used_peak = tot - fr;
    return p;
}

static int up_unfenced; // upload_async copies queued since the last upload_fence

void raw_free(void *p) {
    if (!p || p == (void *)g_dummy) return;
    auto it = g_sizes->find(p);
    if (it != g_sizes->end()) {
        g.live -= it->second;
        g_sizes->erase(it);
    }
    if (g.failed) return; // the context may be unusable; leak rather than cascade
    if (up_unfenced) cu_upload_fence(); // a queued copy may still write into p
    if (g.pools)
        CK(cudaFreeAsync(p, g.stream));
    else
        CK(cudaFree(p));
}

void *cu_alloc(size_t n) { return raw_alloc(n); }
void cu_free(void *p) { raw_free(p); }

void cu_upload(void *dst, const void *src, size_t n) {
    LIVE();
    if (n) CK(cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, g.stream));
    if (g.sync_each) CK(cudaStreamSynchronize(g.stream));
}
void cu_download(void *dst, const void *src, size_t n) {
    if (g.failed) {
        if (n) memset(dst, 0, n);
        return;
    }
    if (!n) return;
    if (CK(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToHost, g.stream)))
        CK(cudaStreamSynchronize(g.stream));
    if (g.failed) memset(dst, 0, n);
}
void cu_copy(void *dst, const void *src, size_t n) {
    LIVE();
    if (n && dst != src) CK(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToDevice, g.stream));
}
void cu_zero(void *dst, size_t n) {
    LIVE();
    if (n) CK(cudaMemsetAsync(dst, 0, n, g.stream));
}
void cu_sync(void) {
    LIVE();
    CK(cudaStreamSynchronize(g.stream));
    if (g.cstream && !g.failed) CK(cudaStreamSynchronize(g.cstream));
}

// ---- asynchronous uploads (kernels.h: host_alloc .. upload_fence) ----------------------
//
// Ticket t's completion is event up_ev[t % UP_EVENTS]; before that event is
// recorded again (ticket t + UP_EVENTS), the host waits for it, so any ticket
// older than the ring is complete.  up_done: every ticket <= it is complete.
// Each upload first makes the copy stream wait for an event recorded on the
// compute stream: dst may come from a block that ops issued earlier still
// use (the model's pool, or cudaMallocAsync reusing a cudaFreeAsync'd block).
cudaEvent_t up_ev[UP_EVENTS], up_order, up_fence_ev;
static uint64_t up_issued, up_done;
std::unordered_map<void *, size_t> *g_pinned; // host_alloc blocks that are pinned

void *cu_host_alloc(size_t n) {
    if (n == 0) n = 1;
    void *p = NULL;
    if (g.init == 1 && !g.failed) {
        cudaError_t e = cudaHostAlloc(&p, n, cudaHostAllocDefault);
        if (e == cudaSuccess && p) {
            (*g_pinned)[p] = n;
            return p;
        }
        (void)cudaGetLastError(); // not sticky: pageable memory works too (slower copies)
        p = NULL;
    }
    p = malloc(n);
    if (!p) {
        fprintf(stderr, "cuda: out of host memory allocating %zu bytes\n", n);
        abort(); // kernels.h: never NULL
    }
    return p;
}

void cu_upload_wait(uint64_t t) {
    if (g.failed) return;
    if (t == 0 || t > up_issued) t = up_issued;
    if (t <= up_done) return;
    if (t == up_issued) {
        if (CK(cudaStreamSynchronize(g.cstream))) up_done = up_issued;
        return;
    }
    if (up_issued - t < UP_EVENTS && !CK(cudaEventSynchronize(up_ev[t % UP_EVENTS]))) return;
    up_done = t; // copies on one stream complete in order
}

void cu_host_free(void *p) {
    if (!p) return;
    if (g_pinned) {
        auto it = g_pinned->find(p);
        if (it != g_pinned->end()) {
            g_pinned->erase(it);
            if (!g.failed) {
                cu_upload_wait(0); // no copy may still read it (kernels.h already asks this)
                CK(cudaFreeHost(p));
            }
            return; // after a device error: leak rather than cascade
        }
    }
    free(p);
}

uint64_t cu_upload_async(void *dst, const void *src, size_t n) {
    uint64_t t = ++up_issued;
    if (g.failed) {
        up_done = t;
        return t;
    }
    up_unfenced = 1;
    int slot = (int)(t % UP_EVENTS);
    if (t > UP_EVENTS && up_done < t - UP_EVENTS) { // the slot's previous ticket
        if (!CK(cudaEventSynchronize(up_ev[slot]))) return t;
        up_done = t - UP_EVENTS;
    }
    if (!CK(cudaEventRecord(up_order, g.stream)) || !CK(cudaStreamWaitEvent(g.cstream, up_order, 0)))
        return t;
    if (n && !CK(cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, g.cstream))) return t;
    CK(cudaEventRecord(up_ev[slot], g.cstream));
    if (g.sync_each && !g.failed && CK(cudaStreamSynchronize(g.cstream))) up_done = t;
    return t;
}

void cu_upload_fence(void) {
    LIVE();
    if (!up_unfenced) return;
    if (CK(cudaEventRecord(up_fence_ev, g.cstream)) &&
        CK(cudaStreamWaitEvent(g.stream, up_fence_ev, 0)))
        up_unfenced = 0;
}

scratch s_xb, s_wf, s_probs, s_ptrs, s_rope, s_div;
void *scratch_get(scratch &s, size_t n) {
    if (n > s.n) {
        raw_free(s.p);
        size_t want = n + n / 4;
        s.p = raw_alloc(want);
        s.n = s.p == (void *)g_dummy ? 0 : want;
    }
    return s.p;
}

// Give the big scratch buffers back (the experts' ~450 MB at 25 600 tokens
// of DeepSeekMoE-16B, the activations' BF16 copy, the f32 weight copy of
// MOE_CUDA_PRECISION=f32).  The model calls it between phases (after the
// layers, at close), not per op, so the buffers are not reallocated per call;
// freed pool memory goes back to the device too.
void cu_mem_info(size_t *free_bytes, size_t *total_bytes) {
    *free_bytes = *total_bytes = 0;
    if (g.failed) return;
    CK(cudaMemGetInfo(free_bytes, total_bytes));
}

scratch s_exg, s_egu, s_eh;
void cu_trim(void) {
    LIVE();
    scratch *big[] = {&s_xb, &s_wf, &s_probs, &s_div, &s_exg, &s_egu, &s_eh,
                      &s_gb, &s_colsum, &s_rowr, &s_att, &s_sumsq};
    for (scratch *b : big) {
        raw_free(b->p);
        b->p = NULL;
        b->n = 0;
    }
    if (g.pools && !g.failed) {
        cudaMemPool_t pool;
        if (CK(cudaStreamSynchronize(g.stream)) && CK(cudaDeviceGetDefaultMemPool(&pool, g.device)))
            CK(cudaMemPoolTrimTo(pool, 0));
    }
}

