// emu.cpp - a small CUDA emulator: the CUDA runtime, device execution and the
// cuBLAS calls that kernels/cuda/*.cu use, on the CPU, so that the UNMODIFIED
// backend source can be compiled by g++ (after tests/cudaemu/translate.pl) into
// build/emu/libcdmoe_cuda_emu.so and checked against the CPU backend by the GPU
// tests (`make test-cuda-emu`; part of `make test`) on machines without a GPU.
//
// What it emulates
//  - Execution: each block's threads are fibers (own small stacks, a 6-register
//    context switch on x86-64, ucontext elsewhere) run on the calling OS thread.
//    Thread 0 runs until it finishes or reaches a barrier; a finished thread's
//    fiber goes straight on with the next thread, so barrier-free kernels cost
//    one switch per block.  __syncthreads waits for the whole block, warp
//    collectives (__shfl_*_sync, __syncwarp, __ballot_sync) for the lanes of
//    their warp only (block_sum's second round runs in warp 0 alone).  Blocks
//    run one after the other in order: results are deterministic.
//    MOE_CUDA_EMU_ORDER=reverse runs each block's threads last to first
//    instead, so that a missing barrier often changes the result.
//    __shared__ is per block; dynamic shared memory ends at a guard page and
//    starts each block filled with NaN bytes.  A barrier that can never be
//    reached by all (divergent __syncthreads or shuffles, a shuffle from an
//    exited lane) aborts with the kernel's name.  A memory fault in a kernel
//    names the kernel, block and thread.
//  - Launch checks: block/grid limits, dynamic shared memory above 48 KiB
//    without cudaFuncSetAttribute (cudaErrorInvalidValue, as on sm_90), pointer
//    arguments that are neither device nor pinned memory (sticky
//    cudaErrorIllegalAddress, the error a GPU would report at the next sync).
//  - Memory: device allocations are mmap'd, end at a guard page (overruns past
//    the 256-byte rounding fault), start filled with NaN bytes (reads of
//    uninitialised memory show), and are tracked: cudaMemcpy*/cudaMemset* are
//    range-checked against the allocation map (cudaErrorInvalidValue), frees of
//    unknown pointers fail, cudaPointerGetAttributes tells device, pinned and
//    plain host memory apart, cudaMemGetInfo reports total = MOE_CUDA_EMU_MEM_GB
//    (default 80) GiB and free = total - live, and allocations beyond it fail
//    with cudaErrorMemoryAllocation.  Pinned host memory (cudaHostAlloc,
//    cudaMallocHost, cudaHostRegister) is device-accessible, as under UVA.
//  - Streams and events: work on a created stream is queued and runs only
//    when something waits for it (cudaStreamSynchronize, cudaEventSynchronize,
//    cudaDeviceSynchronize, cudaFree, a device-to-pageable copy, a legacy
//    stream operation for blocking streams, a queued cudaStreamWaitEvent that
//    runs), so a missing event wait shows as stale (NaN) data; copies from or
//    to pinned host memory touch it when they run (a staging buffer reused too
//    early shows), pageable ones behave as the real API (host-to-device data
//    taken at issue, device-to-host complete on return); queries report
//    cudaErrorNotReady once for pending work.  Handles are checked (destroyed
//    or unknown -> cudaErrorInvalidResourceHandle); event times are host
//    clock times.  MOE_CUDA_EMU_SYNC=1 runs all work at issue instead.
//    Memory pools: accepted, not modelled (freed memory is returned at once).
//  - cuBLAS: cublasGemmEx, cublasGemmStridedBatchedEx, cublasSgemm and
//    cublasGemmGroupedBatchedEx, column-major with lda/ldb/ldc and the argument
//    checks cuBLAS makes (CUBLAS_STATUS_INVALID_VALUE, NOT_SUPPORTED for type
//    combinations it lacks; FP16 is not implemented here).  Inputs are read
//    exactly (BF16 operands are exact in FP32), products are summed in FP32 in
//    a fixed order (8 interleaved partial sums, then a fixed tree), alpha/beta
//    applied in FP32, results rounded to the output type.  TF32 (math mode or
//    compute type) rounds FP32 inputs to TF32.  Matrix extents are checked
//    against the allocations.  MOE_CUDA_EMU_GROUPED_BF16_F32=0 makes the
//    grouped GEMM refuse BF16 -> F32 (as some cuBLAS versions may), to test
//    the backend's fallback.
//  - MOE_CUDA_EMU_NOCOMPUTE=1: GEMMs and kernel launches of more than 65536
//    threads are checked but not run (small ones, like the router, still run:
//    the host needs valid expert indices), copies under 1 MiB are done (larger
//    ones, weights, only checked), allocations are not poisoned (untouched
//    memory costs no RAM): for measuring device memory at real model shapes
//    on a CPU (results are meaningless).
//
// What it cannot catch
//  - Races: threads of a block run one at a time, blocks in order, so a
//    missing __syncthreads shows only when the order matters (the suite runs
//    gpu_kernels in both orders); inter-block races and warp-synchronous code
//    without __syncwarp go unnoticed.
//  - Out-of-bounds accesses inside an allocation's 256-byte rounding or into
//    another live allocation; shared-memory overruns of static __shared__.
//  - Real timing, occupancy, register limits, the real memory size and
//    fragmentation (pools' reserved memory is not modelled), asynchrony bugs
//    that the lazy queues happen to hide (work runs at the first wait, not
//    concurrently), cuBLAS kernel selection and its summation order, GPU
//    libm's ulp errors (expf etc. here are glibc's).
//  - Only one device; not thread-safe (the backend is used from one thread).
#include "cudaemu.h"

#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

// A stream: the operations issued and not yet run, in order.
struct CUstream_st {
    unsigned flags;
    bool live; // destroyed streams stay allocated: a queued wait may name one
    std::deque<std::function<void()>> q;
    uint64_t issued, done; // operations issued / run so far
};
struct CUevent_st {
    unsigned flags;
    bool recorded, told_busy;
    CUstream_st *s; // stream of the last record; NULL: complete
    uint64_t seq;   // complete once s->done >= seq
    double t;       // host time when the record ran
};

namespace {

// ---- settings -------------------------------------------------------------------
int env_int(const char *name, int dflt) {
    const char *e = getenv(name);
    return e && *e ? atoi(e) : dflt;
}
// MOE_CUDA_EMU_ORDER=reverse: a block's threads start, and resume after each
// barrier, last to first (a race on shared data often gives another result)
bool reverse_order() {
    static int v = -1;
    if (v < 0) {
        const char *e = getenv("MOE_CUDA_EMU_ORDER");
        v = e && !strcmp(e, "reverse");
    }
    return v;
}
bool nocompute() {
    static int v = -1;
    if (v < 0) v = env_int("MOE_CUDA_EMU_NOCOMPUTE", 0) != 0;
    return v;
}
size_t total_mem() {
    static size_t v = 0;
    if (!v) {
        const char *e = getenv("MOE_CUDA_EMU_MEM_GB");
        double gb = e && *e ? atof(e) : 80.0;
        if (gb <= 0) gb = 80.0;
        v = (size_t)(gb * 1073741824.0);
    }
    return v;
}

void emu_warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void emu_warn(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("cudaemu: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}
[[noreturn]] void emu_die(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
[[noreturn]] void emu_die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("cudaemu: fatal: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    abort();
}

// ---- errors ---------------------------------------------------------------------
cudaError_t g_last = cudaSuccess;   // cudaGetLastError
cudaError_t g_sticky = cudaSuccess; // a "kernel fault": every later call returns it

cudaError_t ret(cudaError_t e) {
    if (e != cudaSuccess && g_last == cudaSuccess) g_last = e;
    return e;
}
// the sticky error, if any, else e
cudaError_t chk(cudaError_t e = cudaSuccess) { return ret(g_sticky != cudaSuccess ? g_sticky : e); }
void set_sticky(cudaError_t e) {
    if (g_sticky == cudaSuccess) g_sticky = e;
    ret(e);
}

// ---- the allocation map -------------------------------------------------------------
enum { K_DEVICE = 1, K_PINNED = 2, K_REGISTERED = 3 };
struct alloc_t {
    size_t size;    // bytes asked for
    char *map;      // mmap'd region (device), or NULL (host kinds)
    size_t map_len; // incl. the guard page
    int kind;
    bool freeing; // cudaFreeAsync issued, not yet run
};
std::map<uintptr_t, alloc_t> g_allocs;
size_t g_live; // device bytes
const size_t PAGE = 4096;

// the allocation containing [p, p+n) (n = 0: p itself, its end included)
const std::pair<const uintptr_t, alloc_t> *find_alloc(const void *p, size_t n = 0) {
    uintptr_t a = (uintptr_t)p;
    auto it = g_allocs.upper_bound(a);
    if (it == g_allocs.begin()) return NULL;
    --it;
    uintptr_t end = it->first + it->second.size;
    if (a < it->first || a > end) return NULL;
    if (n && (a == end || n > end - a)) return NULL;
    return &*it;
}
bool is_device(const void *p, size_t n) {
    auto *a = find_alloc(p, n);
    return a && a->second.kind == K_DEVICE;
}
bool device_accessible(const void *p, size_t n) { return find_alloc(p, n) != NULL; }

cudaError_t dev_alloc(void **out, size_t n) {
    if (!out) return ret(cudaErrorInvalidValue);
    *out = NULL;
    if (g_sticky) return chk();
    if (n == 0) return cudaSuccess; // cudaMalloc(0) gives NULL
    if (n > total_mem() - g_live) return ret(cudaErrorMemoryAllocation);
    size_t body = (n + 255) & ~(size_t)255; // 256-byte aligned start, as cudaMalloc
    size_t pages = (body + PAGE - 1) & ~(PAGE - 1);
    size_t len = pages + PAGE;
    char *m = (char *)mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) return ret(cudaErrorMemoryAllocation);
    mprotect(m + pages, PAGE, PROT_NONE); // guard page right after the data
    char *p = m + pages - body;
    if (!nocompute()) memset(p, 0xff, body); // NaN bytes: uninitialised reads show
    g_allocs[(uintptr_t)p] = alloc_t{n, m, len, K_DEVICE, false};
    g_live += n;
    *out = p;
    return cudaSuccess;
}
// checks a free; the allocation, or NULL (error recorded)
alloc_t *free_check(void *p, const char *who) {
    auto it = g_allocs.find((uintptr_t)p);
    if (it == g_allocs.end() || it->second.kind != K_DEVICE || it->second.freeing) {
        emu_warn("%s(%p): not a live device allocation (never allocated, freed, or interior)", who, p);
        ret(cudaErrorInvalidValue);
        return NULL;
    }
    return &it->second;
}
void free_now(void *p) {
    auto it = g_allocs.find((uintptr_t)p);
    g_live -= it->second.size;
    munmap(it->second.map, it->second.map_len); // later use faults
    g_allocs.erase(it);
}

// ---- streams, events, handles ---------------------------------------------------------
// Work issued on a created stream is queued and runs only when something
// waits for it (stream/event/device synchronisation, a blocking copy, a
// legacy-stream operation for blocking streams, a queued cudaStreamWaitEvent
// that runs): a missing wait or event shows as stale data, a pinned host
// buffer reused before its copy ran shows as wrong data.  The legacy default
// stream (0) runs its work at once, after the blocking streams' queues.
// MOE_CUDA_EMU_SYNC=1 runs everything at issue.
std::vector<CUstream_st *> &g_all_streams = *new std::vector<CUstream_st *>();
std::set<const void *> &g_events = *new std::set<const void *>();
bool sync_mode() {
    static int v = -1;
    if (v < 0) v = env_int("MOE_CUDA_EMU_SYNC", 0) != 0;
    return v;
}
CUstream_st *sobj(cudaStream_t s) {
    return s == 0 || s == cudaStreamLegacy || s == cudaStreamPerThread ? NULL : s;
}
bool stream_ok(cudaStream_t s) {
    CUstream_st *o = sobj(s);
    if (!o) return true;
    for (CUstream_st *x : g_all_streams)
        if (x == o) return x->live;
    return false;
}
void flush(CUstream_st *s, uint64_t upto) {
    while (s->done < upto && !s->q.empty()) {
        std::function<void()> f = std::move(s->q.front());
        s->q.pop_front();
        s->done++;
        f();
    }
}
void flush_stream(CUstream_st *s) { flush(s, s->issued); }
void flush_all() {
    for (CUstream_st *s : g_all_streams) flush_stream(s);
}
void flush_blocking() {
    for (CUstream_st *s : g_all_streams)
        if (!(s->flags & cudaStreamNonBlocking)) flush_stream(s);
}
// sync(stream): what a host wait on the stream runs
void sync_stream(cudaStream_t h) {
    CUstream_st *s = sobj(h);
    if (s) flush_stream(s);
    else flush_blocking();
}
void enqueue(cudaStream_t h, std::function<void()> f) {
    CUstream_st *s = sobj(h);
    if (!s) { // legacy stream: after the blocking streams' work, at once
        flush_blocking();
        f();
        return;
    }
    s->issued++;
    if (sync_mode()) {
        s->done++;
        f();
        return;
    }
    s->q.push_back(std::move(f));
}
double now_ms() {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}
int g_pool_token; // the one memory pool
uint64_t g_pool_threshold;

std::map<const void *, int> g_func_smem; // cudaFuncAttributeMaxDynamicSharedMemorySize

const size_t SMEM_DEFAULT = 48 * 1024, SMEM_OPTIN = 232448; // sm_90

// ---- fibers -------------------------------------------------------------------------
struct fiber {
    void *sp; // saved stack pointer (x86-64)
#if !defined(__x86_64__)
    ucontext_t uc;
#endif
    char *mem;
    size_t len;
};
const size_t FIBER_STACK = 256 * 1024;
void *g_sched_sp; // the scheduler's saved stack pointer
#if !defined(__x86_64__)
ucontext_t g_sched_uc;
#endif
fiber *g_cur;     // the running fiber
// (containers of owned pointers are never destroyed: at exit the emulator's
// objects stay reachable, for LeakSanitizer in SAN=1 builds)
std::vector<fiber *> &g_pool = *new std::vector<fiber *>();   // idle fibers
std::vector<fiber *> &g_fibers = *new std::vector<fiber *>(); // all fibers, reused until exit

} // namespace

#if defined(__x86_64__)
// void cudaemu_switch(void **save_sp, void *load_sp): saves the callee-saved
// registers on the current stack, stores its pointer, loads the other one.
extern "C" void cudaemu_switch(void **save, void *load);
asm(".text\n"
    ".p2align 4\n"
    ".hidden cudaemu_switch\n"
    ".globl cudaemu_switch\n"
    ".type cudaemu_switch,@function\n"
    "cudaemu_switch:\n"
    "    pushq %rbp\n    pushq %rbx\n    pushq %r12\n    pushq %r13\n    pushq %r14\n    pushq %r15\n"
    "    movq %rsp, (%rdi)\n"
    "    movq %rsi, %rsp\n"
    "    popq %r15\n    popq %r14\n    popq %r13\n    popq %r12\n    popq %rbx\n    popq %rbp\n"
    "    ret\n"
    ".size cudaemu_switch, .-cudaemu_switch\n");
#endif

namespace {

void fiber_main();
#if defined(__x86_64__)
extern "C" void cudaemu_fiber_entry() {
    fiber_main();
    abort();
}
#else
void fiber_entry_uc() { fiber_main(); }
#endif

fiber *fiber_get() {
    if (!g_pool.empty()) {
        fiber *f = g_pool.back();
        g_pool.pop_back();
        return f;
    }
    fiber *f = new fiber();
    g_fibers.push_back(f);
    f->len = FIBER_STACK + PAGE;
    f->mem = (char *)mmap(NULL, f->len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (f->mem == MAP_FAILED) emu_die("cannot map a fiber stack: %s", strerror(errno));
    mprotect(f->mem, PAGE, PROT_NONE); // stack overflow faults
#if defined(__x86_64__)
    uintptr_t top = ((uintptr_t)f->mem + f->len) & ~(uintptr_t)15;
    void **sp = (void **)top;
    *--sp = NULL;                        // fake return address of the entry
    *--sp = (void *)cudaemu_fiber_entry; // popped by cudaemu_switch's ret
    for (int i = 0; i < 6; i++) *--sp = NULL; // rbp rbx r12-r15
    f->sp = sp;
#else
    getcontext(&f->uc);
    f->uc.uc_stack.ss_sp = f->mem + PAGE;
    f->uc.uc_stack.ss_size = FIBER_STACK;
    f->uc.uc_link = NULL;
    makecontext(&f->uc, fiber_entry_uc, 0);
#endif
    return f;
}

// scheduler -> fiber f
void to_fiber(fiber *f) {
    g_cur = f;
#if defined(__x86_64__)
    cudaemu_switch(&g_sched_sp, f->sp);
#else
    swapcontext(&g_sched_uc, &f->uc);
#endif
}
// fiber self -> fiber f (NULL: the scheduler)
void fiber_to(fiber *self, fiber *f) {
    g_cur = f;
#if defined(__x86_64__)
    cudaemu_switch(&self->sp, f ? f->sp : g_sched_sp);
#else
    swapcontext(&self->uc, f ? &f->uc : &g_sched_uc);
#endif
}

// ---- the block scheduler ----------------------------------------------------------------
enum { T_UNSTARTED, T_READY, T_RUNNING, T_WAIT_BLOCK, T_WAIT_WARP, T_DONE };
struct block_state {
    const cudaemu::launch_cfg *cfg;
    void (*thunk)(void *);
    void *ctx;
    int n, next, ndone, nwait_block;
    int cur;
    std::vector<uint8_t> st, parity;
    std::vector<fiber *> fib;
    std::vector<int> wsize, wwait, wdone; // per warp
    std::vector<unsigned> wmask;          // the mask of the collective in progress
    std::vector<uint64_t> wbuf;           // [warp][2][32] exchange slots
    std::vector<int> ready; // released threads, resumed in this order
    size_t rhead;
    char *smem;
} B;
bool g_in_kernel;

void set_thread(int t) {
    B.cur = t;
    unsigned bx = blockDim.x, by = blockDim.y;
    if (bx == (unsigned)B.n) { // 1-D blocks
        threadIdx.x = (unsigned)t;
        return;
    }
    threadIdx.x = t % bx;
    threadIdx.y = (t / bx) % by;
    threadIdx.z = t / (bx * by);
}

void release_warp(int w) {
    int lo = w * 32, hi = lo + B.wsize[w];
    for (int i = lo; i < hi; i++) {
        int t = reverse_order() ? lo + hi - 1 - i : i;
        if (B.st[t] == T_WAIT_WARP) B.st[t] = T_READY, B.ready.push_back(t);
    }
    B.wwait[w] = 0;
    B.wmask[w] = 0;
}
void release_block() {
    for (int i = 0; i < B.n; i++) {
        int t = reverse_order() ? B.n - 1 - i : i;
        if (B.st[t] == T_WAIT_BLOCK) B.st[t] = T_READY, B.ready.push_back(t);
    }
    B.nwait_block = 0;
}
void check_release(int w) {
    if (B.wwait[w] && B.wwait[w] + B.wdone[w] == B.wsize[w]) release_warp(w);
    if (B.nwait_block && B.nwait_block + B.ndone == B.n) release_block();
}

// The fiber of the next thread to run: a released one (its own fiber), else a
// fresh fiber for the next unstarted thread; NULL when there is neither.
fiber *pick() {
    if (B.rhead < B.ready.size()) {
        int t = B.ready[B.rhead++];
        if (B.rhead == B.ready.size()) B.ready.clear(), B.rhead = 0;
        B.st[t] = T_RUNNING;
        set_thread(t);
        return B.fib[t];
    }
    if (B.next < B.n) return fiber_get();
    return NULL;
}

// Each fiber: run unstarted threads to completion one after the other.  When
// a thread blocks its fiber switches straight to the next runnable one (see
// wait_here); when nothing is left to start the fiber goes back to the pool.
void fiber_main() {
    for (;;) {
        while (B.next < B.n) {
            int t = B.next++;
            if (reverse_order()) t = B.n - 1 - t;
            B.fib[t] = g_cur;
            B.st[t] = T_RUNNING;
            set_thread(t);
            B.thunk(B.ctx);
            t = B.cur; // (unchanged: a thread's fiber is resumed only for it)
            B.st[t] = T_DONE;
            B.ndone++;
            B.wdone[t / 32]++;
            check_release(t / 32);
        }
        fiber *self = g_cur;
        g_pool.push_back(self); // free again: nothing is left to start
        fiber_to(self, pick()); // (pick cannot return self: its threads are done)
    }
}

void wait_here(int state) {
    int t = B.cur;
    B.st[t] = (uint8_t)state;
    if (state == T_WAIT_BLOCK) B.nwait_block++;
    else B.wwait[t / 32]++;
    check_release(t / 32);
    fiber *self = g_cur, *nx = pick();
    if (nx != self) fiber_to(self, nx); // (self: t was the last to arrive and is first again)
    // resumed: pick() set threadIdx and B.cur back to t
}

[[noreturn]] void deadlock() {
    int counts[6] = {0};
    for (int t = 0; t < B.n; t++) counts[B.st[t]]++;
    emu_die("kernel %s, block (%u,%u,%u): deadlock: %d threads wait at __syncthreads, %d at a "
            "warp collective, %d exited (divergent barrier or shuffle?)",
            B.cfg->name, blockIdx.x, blockIdx.y, blockIdx.z, counts[T_WAIT_BLOCK],
            counts[T_WAIT_WARP], counts[T_DONE]);
}

void run_block() {
    B.next = B.ndone = B.nwait_block = 0;
    std::fill(B.st.begin(), B.st.end(), (uint8_t)T_UNSTARTED);
    std::fill(B.parity.begin(), B.parity.end(), (uint8_t)0);
    std::fill(B.wwait.begin(), B.wwait.end(), 0);
    std::fill(B.wdone.begin(), B.wdone.end(), 0);
    std::fill(B.wmask.begin(), B.wmask.end(), 0u);
    B.ready.clear();
    B.rhead = 0;
    if (B.smem) memset(B.smem, 0xff, B.cfg->smem);
    // fibers switch among themselves; back here when none is runnable
    while (B.ndone < B.n) {
        fiber *f = pick();
        if (!f) deadlock();
        to_fiber(f);
    }
}

// ---- fault reporting ----------------------------------------------------------------------
char g_altstack[64 * 1024];
struct sigaction g_old_segv, g_old_bus;
void on_fault(int sig, siginfo_t *si, void *) {
    if (g_in_kernel) {
        char buf[512];
        int n = snprintf(buf, sizeof buf,
                         "cudaemu: invalid memory access at %p in kernel %s, block (%u,%u,%u), "
                         "thread (%u,%u,%u) (out of bounds, freed or host memory; or a local array "
                         "overflowing the 256 KiB fiber stack)\n",
                         si->si_addr, B.cfg->name, blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x,
                         threadIdx.y, threadIdx.z);
        if (n > 0) (void)!write(2, buf, (size_t)n);
    }
    sigaction(sig, sig == SIGSEGV ? &g_old_segv : &g_old_bus, NULL); // re-fault: default action
}
void install_fault_handler() {
    static bool done;
    if (done) return;
    done = true;
    stack_t ss;
    ss.ss_sp = g_altstack;
    ss.ss_size = sizeof g_altstack;
    ss.ss_flags = 0;
    sigaltstack(&ss, NULL);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_old_segv);
    sigaction(SIGBUS, &sa, &g_old_bus);
}

} // namespace

// ---- device-side entry points ---------------------------------------------------------------
void __syncthreads(void) {
    if (!g_in_kernel) emu_die("__syncthreads outside a kernel");
    wait_here(T_WAIT_BLOCK);
}

uint64_t cudaemu::warp_exchange(unsigned mask, uint64_t bits, int mode, int arg, int width,
                                unsigned *ballot) {
    if (!g_in_kernel) emu_die("warp collective outside a kernel");
    int t = B.cur, w = t / 32, lane = t % 32;
    const char *name = B.cfg->name;
    if (!(mask >> lane & 1u))
        emu_die("kernel %s: thread %d calls a warp collective with mask %#x that excludes it", name, t, mask);
    if (width <= 0 || width > 32 || (width & (width - 1)))
        emu_die("kernel %s: shuffle width %d", name, width);
    unsigned lanes = B.wsize[w] == 32 ? 0xffffffffu : (1u << B.wsize[w]) - 1u;
    if (mask & ~lanes)
        emu_die("kernel %s: warp collective mask %#x names lanes beyond the block (%#x)", name, mask, lanes);
    if (mask != lanes)
        emu_die("kernel %s: partial-warp collectives (mask %#x) are not emulated", name, mask);
    if (B.wmask[w] && B.wmask[w] != mask)
        emu_die("kernel %s: lanes of warp %d disagree on the collective's mask", name, w);
    B.wmask[w] = mask;
    int par = B.parity[t];
    uint64_t *buf = &B.wbuf[((size_t)w * 2 + par) * 32];
    buf[lane] = bits;
    wait_here(T_WAIT_WARP);
    B.parity[t] = (uint8_t)(par ^ 1);
    if (ballot) {
        unsigned b = 0;
        for (int l = 0; l < B.wsize[w]; l++)
            if (B.st[w * 32 + l] != T_DONE && buf[l]) b |= 1u << l;
        *ballot = b;
    }
    if (mode == VOTE) return 0;
    int base = lane & ~(width - 1), rel = lane - base, src = lane;
    switch (mode) {
    case SHFL_IDX: src = base + (arg % width + width) % width; break;
    case SHFL_UP: src = rel >= arg ? lane - arg : lane; break;
    case SHFL_DOWN: src = rel + arg < width ? lane + arg : lane; break;
    case SHFL_XOR: src = lane ^ arg; if ((src & ~(width - 1)) > base) src = lane; break;
    }
    if (src < 0 || src >= B.wsize[w])
        emu_die("kernel %s: thread %d shuffles from lane %d outside the block", name, t, src);
    if (B.st[w * 32 + src] == T_DONE)
        emu_die("kernel %s: thread %d shuffles from lane %d, which has exited", name, t, src);
    return buf[src];
}

void *cudaemu::dyn_smem(void) { return B.smem; }

void cudaemu::launch_enqueue(const launch_cfg &c, std::function<void(const launch_cfg &)> run) {
    launch_cfg cc = c;
    enqueue(c.stream, [cc, run]() { run(cc); });
}

bool cudaemu::launch_begin(const launch_cfg &c) {
    if (g_sticky) return false;
    const dim3 &g = c.grid, &b = c.block;
    const char *why = NULL;
    cudaError_t e = cudaSuccess;
    if (!stream_ok(c.stream)) why = "unknown stream", e = cudaErrorInvalidResourceHandle;
    else if (!g.x || !g.y || !g.z || !b.x || !b.y || !b.z) why = "empty grid or block", e = cudaErrorInvalidConfiguration;
    else if ((size_t)b.x * b.y * b.z > 1024 || b.z > 64) why = "block too large", e = cudaErrorInvalidConfiguration;
    else if (g.x > 2147483647u || g.y > 65535 || g.z > 65535) why = "grid too large", e = cudaErrorInvalidConfiguration;
    else if (c.smem > SMEM_DEFAULT) {
        auto it = g_func_smem.find(c.fn);
        if (it == g_func_smem.end() || c.smem > (size_t)it->second)
            why = "dynamic shared memory above 48 KiB without cudaFuncSetAttribute(MaxDynamicSharedMemorySize)",
            e = cudaErrorInvalidValue;
    }
    if (why) {
        emu_warn("launch of %s<<<(%u,%u,%u), (%u,%u,%u), %zu>>>: %s", c.name, g.x, g.y, g.z, b.x,
                 b.y, b.z, c.smem, why);
        ret(e);
        return false;
    }
    return true;
}

void cudaemu::launch_check_ptr(const launch_cfg &c, int arg, const void *p) {
    if (!p || g_sticky) return;
    if (!device_accessible(p, 0)) {
        emu_warn("kernel %s: argument %d (%p) is not device memory (a host pointer, or freed)", c.name,
                 arg + 1, p);
        set_sticky(cudaErrorIllegalAddress);
    }
}

void cudaemu::launch_run(const launch_cfg &c, void (*thunk)(void *), void *ctx) {
    if (g_sticky) return;
    // no-compute mode still runs small launches (the router: the host needs
    // valid expert indices to go on)
    if (nocompute() && (double)c.grid.x * c.grid.y * c.grid.z * c.block.x * c.block.y * c.block.z > 65536)
        return;
    if (g_in_kernel) emu_die("kernel launch from device code is not emulated");
    install_fault_handler();
    B.cfg = &c;
    B.thunk = thunk;
    B.ctx = ctx;
    B.n = (int)(c.block.x * c.block.y * c.block.z);
    int nw = (B.n + 31) / 32;
    B.st.assign(B.n, 0);
    B.parity.assign(B.n, 0);
    B.fib.assign(B.n, NULL);
    B.wsize.assign(nw, 32);
    if (B.n % 32) B.wsize[nw - 1] = B.n % 32;
    B.wwait.assign(nw, 0);
    B.wdone.assign(nw, 0);
    B.wmask.assign(nw, 0);
    B.wbuf.assign((size_t)nw * 64, 0);
    // dynamic shared memory ends at a guard page
    char *smap = NULL;
    size_t slen = 0;
    B.smem = NULL;
    if (c.smem) {
        size_t body = (c.smem + 15) & ~(size_t)15;
        size_t pages = (body + PAGE - 1) & ~(PAGE - 1);
        slen = pages + PAGE;
        smap = (char *)mmap(NULL, slen, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (smap == MAP_FAILED) emu_die("cannot map shared memory");
        mprotect(smap + pages, PAGE, PROT_NONE);
        B.smem = smap + pages - body;
    }
    gridDim = c.grid;
    blockDim = c.block;
    threadIdx = uint3{0, 0, 0};
    g_in_kernel = true;
    for (unsigned z = 0; z < c.grid.z; z++)
        for (unsigned y = 0; y < c.grid.y; y++)
            for (unsigned x = 0; x < c.grid.x; x++) {
                blockIdx.x = x, blockIdx.y = y, blockIdx.z = z;
                run_block();
            }
    g_in_kernel = false;
    if (smap) munmap(smap, slen);
}

// ---- runtime API ---------------------------------------------------------------------------

#define ERRS(X)                                                                                   \
    X(cudaSuccess, "no error")                                                                    \
    X(cudaErrorInvalidValue, "invalid argument")                                                  \
    X(cudaErrorMemoryAllocation, "out of memory")                                                 \
    X(cudaErrorInitializationError, "initialization error")                                       \
    X(cudaErrorInvalidConfiguration, "invalid configuration argument")                            \
    X(cudaErrorInvalidSymbol, "invalid device symbol")                                            \
    X(cudaErrorInvalidHostPointer, "invalid host pointer")                                        \
    X(cudaErrorInvalidDevicePointer, "invalid device pointer")                                    \
    X(cudaErrorInvalidMemcpyDirection, "invalid copy direction for memcpy")                       \
    X(cudaErrorInvalidDeviceFunction, "invalid device function")                                  \
    X(cudaErrorNoDevice, "no CUDA-capable device is detected")                                    \
    X(cudaErrorInvalidDevice, "invalid device ordinal")                                           \
    X(cudaErrorInvalidResourceHandle, "invalid resource handle")                                  \
    X(cudaErrorNotReady, "device not ready")                                                      \
    X(cudaErrorIllegalAddress, "an illegal memory access was encountered")                        \
    X(cudaErrorLaunchOutOfResources, "too many resources requested for launch")                   \
    X(cudaErrorHostMemoryAlreadyRegistered, "part or all of the requested memory range is already mapped") \
    X(cudaErrorHostMemoryNotRegistered, "pointer does not correspond to a registered memory region") \
    X(cudaErrorLaunchFailure, "unspecified launch failure")                                       \
    X(cudaErrorNotSupported, "operation not supported")                                           \
    X(cudaErrorUnknown, "unknown error")

const char *cudaGetErrorName(cudaError_t e) {
#define X(c, s) \
    if (e == c) return #c;
    ERRS(X)
#undef X
    return "cudaErrorUnknown";
}
const char *cudaGetErrorString(cudaError_t e) {
#define X(c, s) \
    if (e == c) return s;
    ERRS(X)
#undef X
    return "unrecognized error code";
}
cudaError_t cudaGetLastError(void) {
    cudaError_t e = g_sticky ? g_sticky : g_last;
    g_last = cudaSuccess;
    return e;
}
cudaError_t cudaPeekAtLastError(void) { return g_sticky ? g_sticky : g_last; }

cudaError_t cudaGetDeviceCount(int *n) {
    if (!n) return ret(cudaErrorInvalidValue);
    *n = 1;
    return cudaSuccess;
}
cudaError_t cudaSetDevice(int d) { return d == 0 ? chk() : ret(cudaErrorInvalidDevice); }
cudaError_t cudaGetDevice(int *d) {
    if (!d) return ret(cudaErrorInvalidValue);
    *d = 0;
    return chk();
}
cudaError_t cudaGetDeviceProperties(cudaDeviceProp *p, int d) {
    if (!p) return ret(cudaErrorInvalidValue);
    if (d != 0) return ret(cudaErrorInvalidDevice);
    memset(p, 0, sizeof *p);
    snprintf(p->name, sizeof p->name, "cdmoe CUDA emulator (CPU)");
    p->totalGlobalMem = total_mem();
    p->sharedMemPerBlock = SMEM_DEFAULT;
    p->sharedMemPerBlockOptin = SMEM_OPTIN;
    p->sharedMemPerMultiprocessor = 233472;
    p->regsPerBlock = 65536;
    p->warpSize = 32;
    p->maxThreadsPerBlock = 1024;
    p->maxThreadsDim[0] = 1024, p->maxThreadsDim[1] = 1024, p->maxThreadsDim[2] = 64;
    p->maxGridSize[0] = 2147483647, p->maxGridSize[1] = 65535, p->maxGridSize[2] = 65535;
    p->totalConstMem = 65536;
    p->major = 9, p->minor = 0;
    p->multiProcessorCount = 132;
    p->l2CacheSize = 50 * 1024 * 1024;
    p->memoryBusWidth = 5120;
    p->unifiedAddressing = 1, p->managedMemory = 0, p->concurrentKernels = 1;
    p->asyncEngineCount = 2, p->canMapHostMemory = 1;
    p->maxThreadsPerMultiProcessor = 2048;
    p->memoryPoolsSupported = 1;
    return chk();
}
cudaError_t cudaDeviceGetAttribute(int *v, enum cudaDeviceAttr a, int d) {
    if (!v) return ret(cudaErrorInvalidValue);
    if (d != 0) return ret(cudaErrorInvalidDevice);
    switch (a) {
    case cudaDevAttrMaxThreadsPerBlock: *v = 1024; break;
    case cudaDevAttrMaxBlockDimX: *v = 1024; break;
    case cudaDevAttrMaxGridDimX: *v = 2147483647; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *v = (int)SMEM_DEFAULT; break;
    case cudaDevAttrTotalConstantMemory: *v = 65536; break;
    case cudaDevAttrWarpSize: *v = 32; break;
    case cudaDevAttrMultiProcessorCount: *v = 132; break;
    case cudaDevAttrL2CacheSize: *v = 50 * 1024 * 1024; break;
    case cudaDevAttrUnifiedAddressing: *v = 1; break;
    case cudaDevAttrComputeCapabilityMajor: *v = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *v = 0; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *v = 233472; break;
    case cudaDevAttrManagedMemory: *v = 0; break;
    case cudaDevAttrConcurrentManagedAccess: *v = 0; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = (int)SMEM_OPTIN; break;
    case cudaDevAttrMemoryPoolsSupported: *v = 1; break;
    default: emu_warn("cudaDeviceGetAttribute(%d): attribute not emulated", (int)a); return ret(cudaErrorInvalidValue);
    }
    return chk();
}
cudaError_t cudaDeviceSynchronize(void) {
    flush_all();
    return chk();
}
cudaError_t cudaMemGetInfo(size_t *fr, size_t *tot) {
    if (!fr || !tot) return ret(cudaErrorInvalidValue);
    *tot = total_mem();
    *fr = total_mem() - g_live;
    return chk();
}

cudaError_t cudaMalloc(void **p, size_t n) { return dev_alloc(p, n); }
cudaError_t cudaFree(void *p) { // synchronises the device, as the real one
    if (!p) return chk();
    flush_all();
    if (!free_check(p, "cudaFree")) return cudaErrorInvalidValue;
    free_now(p);
    return chk();
}
cudaError_t cudaMallocAsync(void **p, size_t n, cudaStream_t s) {
    if (!stream_ok(s)) return ret(cudaErrorInvalidResourceHandle);
    return dev_alloc(p, n);
}
cudaError_t cudaFreeAsync(void *p, cudaStream_t s) { // in stream order
    if (!stream_ok(s)) return ret(cudaErrorInvalidResourceHandle);
    if (!p) return chk();
    alloc_t *a = free_check(p, "cudaFreeAsync");
    if (!a) return cudaErrorInvalidValue;
    a->freeing = true;
    enqueue(s, [p]() { free_now(p); });
    return chk();
}

cudaError_t cudaHostAlloc(void **p, size_t n, unsigned flags) {
    if (!p || (flags & ~0xfu)) return ret(cudaErrorInvalidValue);
    *p = NULL;
    if (g_sticky) return chk();
    void *m = NULL;
    if (posix_memalign(&m, PAGE, n ? n : 1)) return ret(cudaErrorMemoryAllocation);
    g_allocs[(uintptr_t)m] = alloc_t{n ? n : 1, NULL, 0, K_PINNED, false};
    *p = m;
    return cudaSuccess;
}
cudaError_t cudaMallocHost(void **p, size_t n) { return cudaHostAlloc(p, n, 0); }
cudaError_t cudaFreeHost(void *p) {
    if (!p) return chk();
    auto it = g_allocs.find((uintptr_t)p);
    if (it == g_allocs.end() || it->second.kind != K_PINNED) {
        emu_warn("cudaFreeHost(%p): not from cudaHostAlloc/cudaMallocHost", p);
        return ret(cudaErrorInvalidValue);
    }
    flush_all(); // queued copies may still read it
    g_allocs.erase(it);
    free(p);
    return chk();
}
cudaError_t cudaHostRegister(void *p, size_t n, unsigned flags) {
    if (!p || !n || (flags & ~0xfu)) return ret(cudaErrorInvalidValue);
    if (find_alloc(p, 0) || find_alloc((char *)p + n - 1, 1)) return ret(cudaErrorHostMemoryAlreadyRegistered);
    g_allocs[(uintptr_t)p] = alloc_t{n, NULL, 0, K_REGISTERED, false};
    return chk();
}
cudaError_t cudaHostUnregister(void *p) {
    auto it = g_allocs.find((uintptr_t)p);
    if (!p || it == g_allocs.end() || it->second.kind != K_REGISTERED)
        return ret(cudaErrorHostMemoryNotRegistered);
    flush_all();
    g_allocs.erase(it);
    return chk();
}
cudaError_t cudaHostGetDevicePointer(void **d, void *h, unsigned flags) {
    if (!d || flags) return ret(cudaErrorInvalidValue);
    auto *a = find_alloc(h, 0);
    if (!a || a->second.kind == K_DEVICE) return ret(cudaErrorInvalidValue);
    *d = h;
    return chk();
}
cudaError_t cudaPointerGetAttributes(cudaPointerAttributes *at, const void *p) {
    if (!at) return ret(cudaErrorInvalidValue);
    memset(at, 0, sizeof *at);
    at->device = -2;
    at->type = cudaMemoryTypeUnregistered;
    auto *a = find_alloc(p, 0);
    if (a && (uintptr_t)p < a->first + a->second.size) {
        at->device = 0;
        at->type = a->second.kind == K_DEVICE ? cudaMemoryTypeDevice : cudaMemoryTypeHost;
        at->devicePointer = (void *)p;
        at->hostPointer = a->second.kind == K_DEVICE ? NULL : (void *)p;
    }
    return chk();
}

namespace {
const char *kind_name(int k) {
    static const char *n[] = {"HostToHost", "HostToDevice", "DeviceToHost", "DeviceToDevice", "Default"};
    return k >= 0 && k <= 4 ? n[k] : "?";
}
// the checks of a copy's ranges; false (error recorded, warning printed) when invalid
cudaError_t copy_check(void *dst, const void *src, size_t n, int kind, bool *dev_dst, bool *dev_src) {
    if (kind < 0 || kind > 4) return ret(cudaErrorInvalidMemcpyDirection);
    if (n == 0) return cudaSuccess;
    if (!dst || !src) return ret(cudaErrorInvalidValue);
    bool dd = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
    bool sd = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
    if (kind == cudaMemcpyDefault) { // UVA: the pointers say
        auto *a = find_alloc(dst, 0), *b = find_alloc(src, 0);
        dd = a && a->second.kind == K_DEVICE;
        sd = b && b->second.kind == K_DEVICE;
    }
    const char *bad = NULL;
    if (dd && !is_device(dst, n)) bad = "destination";
    else if (sd && !is_device(src, n)) bad = "source";
    else if (!dd && find_alloc(dst, 0) && find_alloc(dst, 0)->second.kind == K_DEVICE) bad = "destination (device memory given as host)";
    else if (!sd && find_alloc(src, 0) && find_alloc(src, 0)->second.kind == K_DEVICE) bad = "source (device memory given as host)";
    if (bad) {
        emu_warn("cudaMemcpy%s(dst %p, src %p, %zu bytes): the %s is not inside one device allocation",
                 kind_name(kind), dst, src, n, bad);
        return ret(cudaErrorInvalidValue);
    }
    *dev_dst = dd, *dev_src = sd;
    return cudaSuccess;
}
} // namespace

cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t n, enum cudaMemcpyKind k, cudaStream_t s) {
    if (!stream_ok(s)) return ret(cudaErrorInvalidResourceHandle);
    if (g_sticky) return chk();
    bool dd = false, sd = false;
    cudaError_t e = copy_check(dst, src, n, k, &dd, &sd);
    if (e || !n) return e;
    if (nocompute() && n >= (1u << 20) && (dd || sd)) return chk(); // weights: checked, not copied
    // pinned (page-locked) host memory is read/written when the copy runs;
    // pageable host memory as the real API does: a host-to-device copy takes
    // the data at issue, a device-to-host copy waits and returns complete
    auto pinned = [](const void *p) { auto *a = find_alloc(p, 0); return a && a->second.kind != K_DEVICE; };
    if ((dd && sd) || (dd && pinned(src)) || (sd && pinned(dst))) {
        enqueue(s, [=]() { memmove(dst, src, n); });
    } else if (dd) {
        auto buf = std::make_shared<std::vector<char>>((const char *)src, (const char *)src + n);
        enqueue(s, [=]() { memmove(dst, buf->data(), n); });
    } else {
        sync_stream(s);
        memmove(dst, src, n);
    }
    return chk();
}
cudaError_t cudaMemcpy(void *dst, const void *src, size_t n, enum cudaMemcpyKind k) {
    return cudaMemcpyAsync(dst, src, n, k, 0); // legacy stream: at once
}
cudaError_t cudaMemsetAsync(void *p, int v, size_t n, cudaStream_t s) {
    if (!stream_ok(s)) return ret(cudaErrorInvalidResourceHandle);
    if (g_sticky) return chk();
    if (!n) return cudaSuccess;
    if (!is_device(p, n)) {
        emu_warn("cudaMemset(%p, %d, %zu bytes): not inside one device allocation", p, v, n);
        return ret(cudaErrorInvalidValue);
    }
    enqueue(s, [=]() { memset(p, v, n); });
    return chk();
}
cudaError_t cudaMemset(void *p, int v, size_t n) { return cudaMemsetAsync(p, v, n, 0); }

cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned flags) {
    if (!s || flags > 1) return ret(cudaErrorInvalidValue);
    CUstream_st *o = new CUstream_st();
    o->flags = flags;
    o->live = true;
    g_all_streams.push_back(o);
    *s = o;
    return chk();
}
cudaError_t cudaStreamCreate(cudaStream_t *s) { return cudaStreamCreateWithFlags(s, 0); }
cudaError_t cudaStreamDestroy(cudaStream_t s) {
    if (!sobj(s) || !stream_ok(s)) return ret(cudaErrorInvalidResourceHandle);
    flush_stream(s); // its work completes; the handle is dead from now on
    s->live = false;
    return chk();
}
cudaError_t cudaStreamSynchronize(cudaStream_t s) {
    if (!stream_ok(s)) return ret(cudaErrorInvalidResourceHandle);
    sync_stream(s);
    return chk();
}
cudaError_t cudaStreamQuery(cudaStream_t s) {
    if (!stream_ok(s)) return ret(cudaErrorInvalidResourceHandle);
    CUstream_st *o = sobj(s);
    if (o && o->done < o->issued) { // busy: say so, and let the work run
        flush_stream(o);
        return g_sticky ? chk() : cudaErrorNotReady;
    }
    return chk();
}
namespace {
bool event_ok(cudaEvent_t e) { return e && g_events.count(e); }
bool event_done(cudaEvent_t e) { return !e->s || e->s->done >= e->seq; }
} // namespace
cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned flags) {
    if (!stream_ok(s) || !event_ok(e)) return ret(cudaErrorInvalidResourceHandle);
    if (flags > 1) return ret(cudaErrorInvalidValue);
    if (!e->recorded || event_done(e)) return chk(); // nothing to wait for
    CUstream_st *es = e->s;
    uint64_t seq = e->seq; // the record as of now: a later record does not count
    if (sobj(s) == es) return chk();
    enqueue(s, [es, seq]() { flush(es, seq); });
    return chk();
}
cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned flags) {
    if (!e || (flags & ~0x7u)) return ret(cudaErrorInvalidValue);
    CUevent_st *o = new CUevent_st();
    o->flags = flags;
    g_events.insert(o);
    *e = o;
    return chk();
}
cudaError_t cudaEventCreate(cudaEvent_t *e) { return cudaEventCreateWithFlags(e, 0); }
cudaError_t cudaEventDestroy(cudaEvent_t e) {
    if (!event_ok(e)) return ret(cudaErrorInvalidResourceHandle);
    if (e->s) flush(e->s, e->seq); // its queued record refers to it
    g_events.erase(e);
    delete e;
    return chk();
}
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s) {
    if (!event_ok(e) || !stream_ok(s)) return ret(cudaErrorInvalidResourceHandle);
    e->recorded = true;
    e->told_busy = false;
    CUstream_st *o = sobj(s);
    if (!o) flush_blocking();
    e->s = o;
    enqueue(s, [e]() { e->t = now_ms(); });
    if (o) e->seq = o->issued;
    return chk();
}
cudaError_t cudaEventQuery(cudaEvent_t e) {
    if (!event_ok(e)) return ret(cudaErrorInvalidResourceHandle);
    if (!event_done(e)) {
        if (!e->told_busy) { // say "not ready" once, then let the work run
            e->told_busy = true;
            return g_sticky ? chk() : cudaErrorNotReady;
        }
        flush(e->s, e->seq);
    }
    return chk();
}
cudaError_t cudaEventSynchronize(cudaEvent_t e) {
    if (!event_ok(e)) return ret(cudaErrorInvalidResourceHandle);
    if (e->s) flush(e->s, e->seq);
    return chk();
}
cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t a, cudaEvent_t b) {
    if (!ms) return ret(cudaErrorInvalidValue);
    if (!event_ok(a) || !event_ok(b)) return ret(cudaErrorInvalidResourceHandle);
    if ((a->flags | b->flags) & cudaEventDisableTiming) return ret(cudaErrorInvalidResourceHandle);
    if (!a->recorded || !b->recorded) return ret(cudaErrorInvalidResourceHandle);
    if (!event_done(a) || !event_done(b)) return ret(cudaErrorNotReady);
    *ms = (float)(b->t - a->t);
    return chk();
}

cudaError_t cudaDeviceGetDefaultMemPool(cudaMemPool_t *pool, int d) {
    if (!pool) return ret(cudaErrorInvalidValue);
    if (d != 0) return ret(cudaErrorInvalidDevice);
    *pool = (cudaMemPool_t)&g_pool_token;
    return chk();
}
cudaError_t cudaDeviceGetMemPool(cudaMemPool_t *pool, int d) { return cudaDeviceGetDefaultMemPool(pool, d); }
cudaError_t cudaMemPoolSetAttribute(cudaMemPool_t pool, enum cudaMemPoolAttr a, void *v) {
    if (pool != (cudaMemPool_t)&g_pool_token) return ret(cudaErrorInvalidResourceHandle);
    if (!v) return ret(cudaErrorInvalidValue);
    switch (a) {
    case cudaMemPoolAttrReleaseThreshold: g_pool_threshold = *(uint64_t *)v; break;
    case cudaMemPoolReuseFollowEventDependencies:
    case cudaMemPoolReuseAllowOpportunistic:
    case cudaMemPoolReuseAllowInternalDependencies: break;
    case cudaMemPoolAttrReservedMemHigh:
    case cudaMemPoolAttrUsedMemHigh:
        if (*(uint64_t *)v != 0) return ret(cudaErrorInvalidValue); // only resets to 0
        break;
    default: return ret(cudaErrorInvalidValue);
    }
    return chk();
}
cudaError_t cudaMemPoolGetAttribute(cudaMemPool_t pool, enum cudaMemPoolAttr a, void *v) {
    if (pool != (cudaMemPool_t)&g_pool_token) return ret(cudaErrorInvalidResourceHandle);
    if (!v) return ret(cudaErrorInvalidValue);
    switch (a) {
    case cudaMemPoolAttrReleaseThreshold: *(uint64_t *)v = g_pool_threshold; break;
    case cudaMemPoolReuseFollowEventDependencies:
    case cudaMemPoolReuseAllowOpportunistic:
    case cudaMemPoolReuseAllowInternalDependencies: *(int *)v = 1; break;
    default: *(uint64_t *)v = g_live; break; // reserved/used, current/high: live bytes
    }
    return chk();
}
cudaError_t cudaMemPoolTrimTo(cudaMemPool_t pool, size_t) {
    return pool == (cudaMemPool_t)&g_pool_token ? chk() : ret(cudaErrorInvalidResourceHandle);
}
cudaError_t cudaFuncSetAttribute(const void *fn, enum cudaFuncAttribute a, int v) {
    if (!fn) return ret(cudaErrorInvalidDeviceFunction);
    if (a == cudaFuncAttributeMaxDynamicSharedMemorySize) {
        if (v < 0 || (size_t)v > SMEM_OPTIN) return ret(cudaErrorInvalidValue);
        g_func_smem[fn] = v;
    } else if (a == cudaFuncAttributePreferredSharedMemoryCarveout) {
        if (v < -1 || v > 100) return ret(cudaErrorInvalidValue);
    } else {
        return ret(cudaErrorInvalidValue);
    }
    return chk();
}

// ---- cuBLAS ----------------------------------------------------------------------------------
struct cublasContext {
    cudaStream_t stream;
    cublasMath_t math;
};
namespace {
std::set<const void *> &g_handles = *new std::set<const void *>();
bool handle_ok(cublasHandle_t h) { return h && g_handles.count(h); }

size_t type_size(cudaDataType t) {
    switch (t) {
    case CUDA_R_32F: return 4;
    case CUDA_R_16BF: return 2;
    case CUDA_R_16F: return 2;
    case CUDA_R_64F: return 8;
    default: return 0;
    }
}
float load(const void *p, cudaDataType t, size_t i) {
    if (t == CUDA_R_16BF) return cudaemu_bf2f(((const unsigned short *)p)[i]);
    return ((const float *)p)[i];
}
float tf32_round(float f) { // round to nearest even at 10 mantissa bits
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) >= 0x7f800000u) return f;
    u += 0xfffu + ((u >> 13) & 1u);
    u &= ~0x1fffu;
    memcpy(&f, &u, 4);
    return f;
}

// the type combinations implemented (all that cuBLAS also supports)
bool types_ok(cudaDataType at, cudaDataType bt, cudaDataType ct, cublasComputeType_t comp, bool grouped) {
    if (at != bt) return false;
    if (comp == CUBLAS_COMPUTE_32F || comp == CUBLAS_COMPUTE_32F_PEDANTIC) {
        if (at == CUDA_R_32F) return ct == CUDA_R_32F;
        if (at == CUDA_R_16BF) {
            if (ct == CUDA_R_16BF) return true;
            if (ct == CUDA_R_32F) return !grouped || env_int("MOE_CUDA_EMU_GROUPED_BF16_F32", 1) != 0;
        }
        return false;
    }
    if (comp == CUBLAS_COMPUTE_32F_FAST_TF32 || comp == CUBLAS_COMPUTE_32F_FAST_16BF)
        return at == CUDA_R_32F && ct == CUDA_R_32F;
    return false;
}

// the bytes spanned by a column-major rows x cols matrix with leading dimension ld
size_t extent(int rows, int cols, int ld, size_t es) {
    if (rows <= 0 || cols <= 0) return 0;
    return ((size_t)(cols - 1) * (size_t)ld + (size_t)rows) * es;
}

cublasStatus_t gemm_check(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, int lda,
                          int ldb, int ldc) {
    if ((unsigned)ta > 2 || (unsigned)tb > 2) return CUBLAS_STATUS_INVALID_VALUE;
    if (m < 0 || n < 0 || k < 0) return CUBLAS_STATUS_INVALID_VALUE;
    int ra = ta == CUBLAS_OP_N ? m : k, rb = tb == CUBLAS_OP_N ? k : n;
    if (lda < (ra > 1 ? ra : 1) || ldb < (rb > 1 ? rb : 1) || ldc < (m > 1 ? m : 1))
        return CUBLAS_STATUS_INVALID_VALUE;
    return CUBLAS_STATUS_SUCCESS;
}

// C = alpha·op(A)·op(B) + beta·C, arguments already validated
cublasStatus_t gemm_run(const char *who, bool tf32, cublasOperation_t ta, cublasOperation_t tb,
                        int m, int n, int k, float alpha, const void *A, cudaDataType at, int lda,
                        const void *B, cudaDataType bt, int ldb, float beta, void *C,
                        cudaDataType ct, int ldc, bool check_only) {
    if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
    int ra = ta == CUBLAS_OP_N ? m : k, ca = ta == CUBLAS_OP_N ? k : m;
    int rb = tb == CUBLAS_OP_N ? k : n, cb = tb == CUBLAS_OP_N ? n : k;
    size_t ea = extent(ra, ca, lda, type_size(at)), eb = extent(rb, cb, ldb, type_size(bt));
    size_t ec = extent(m, n, ldc, type_size(ct));
    const char *bad = NULL;
    if (ea && !is_device(A, ea)) bad = "A";
    else if (eb && !is_device(B, eb)) bad = "B";
    else if (!is_device(C, ec)) bad = "C";
    if (bad) {
        emu_warn("%s: matrix %s (m=%d n=%d k=%d lda=%d ldb=%d ldc=%d) is not inside one device "
                 "allocation",
                 who, bad, m, n, k, lda, ldb, ldc);
        set_sticky(cudaErrorIllegalAddress);
        return CUBLAS_STATUS_EXECUTION_FAILED;
    }
    if (nocompute() || check_only || g_sticky) return CUBLAS_STATUS_SUCCESS;
    // op(A) as m rows of k, op(B)ᵀ as n rows of k: contiguous dot products
    std::vector<float> Ap((size_t)m * k), Bp((size_t)n * k);
    for (int i = 0; i < m; i++)
        for (int p = 0; p < k; p++) {
            float v = load(A, at, ta == CUBLAS_OP_N ? (size_t)p * lda + i : (size_t)i * lda + p);
            Ap[(size_t)i * k + p] = tf32 ? tf32_round(v) : v;
        }
    for (int j = 0; j < n; j++)
        for (int p = 0; p < k; p++) {
            float v = load(B, bt, tb == CUBLAS_OP_N ? (size_t)j * ldb + p : (size_t)p * ldb + j);
            Bp[(size_t)j * k + p] = tf32 ? tf32_round(v) : v;
        }
    const float *ap = Ap.data(), *bp = Bp.data();
    double work = (double)m * n * k;
#pragma omp parallel for schedule(static) if (work > 1e6)
    for (int j = 0; j < n; j++) {
        for (int i = 0; i < m; i++) {
            const float *x = ap + (size_t)i * k, *y = bp + (size_t)j * k;
            float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            int p = 0;
            for (; p + 8 <= k; p += 8)
                for (int l = 0; l < 8; l++) s[l] += x[p + l] * y[p + l];
            for (int l = 0; p < k; p++, l++) s[l] += x[p] * y[p];
            float acc = ((s[0] + s[4]) + (s[2] + s[6])) + ((s[1] + s[5]) + (s[3] + s[7]));
            size_t ci = (size_t)j * ldc + i;
            float r = alpha * acc;
            if (beta != 0.0f) r += beta * load(C, ct, ci); // beta == 0: C is not read
            if (ct == CUDA_R_16BF)
                ((unsigned short *)C)[ci] = cudaemu_f2bf_rn(r);
            else
                ((float *)C)[ci] = r;
        }
    }
    return CUBLAS_STATUS_SUCCESS;
}

bool tf32_mode(cublasHandle_t h, cudaDataType at, cublasComputeType_t comp) {
    if (at != CUDA_R_32F) return false;
    if (comp == CUBLAS_COMPUTE_32F_FAST_TF32) return true;
    return comp == CUBLAS_COMPUTE_32F && (h->math & 0xf) == CUBLAS_TF32_TENSOR_OP_MATH;
}
} // namespace

cublasStatus_t cublasCreate(cublasHandle_t *h) {
    if (!h) return CUBLAS_STATUS_INVALID_VALUE;
    if (g_sticky) return CUBLAS_STATUS_NOT_INITIALIZED;
    *h = new cublasContext{0, CUBLAS_DEFAULT_MATH};
    g_handles.insert(*h);
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasDestroy(cublasHandle_t h) {
    if (!handle_ok(h)) return CUBLAS_STATUS_NOT_INITIALIZED;
    g_handles.erase(h);
    delete h;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetStream(cublasHandle_t h, cudaStream_t s) {
    if (!handle_ok(h)) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!stream_ok(s)) return CUBLAS_STATUS_INVALID_VALUE;
    h->stream = s;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasGetStream(cublasHandle_t h, cudaStream_t *s) {
    if (!handle_ok(h)) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!s) return CUBLAS_STATUS_INVALID_VALUE;
    *s = h->stream;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetMathMode(cublasHandle_t h, cublasMath_t m) {
    if (!handle_ok(h)) return CUBLAS_STATUS_NOT_INITIALIZED;
    unsigned base = (unsigned)m & 0xfu;
    if (base > 3 || ((unsigned)m & ~0x1fu)) return CUBLAS_STATUS_INVALID_VALUE;
    h->math = m;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasGetMathMode(cublasHandle_t h, cublasMath_t *m) {
    if (!handle_ok(h)) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!m) return CUBLAS_STATUS_INVALID_VALUE;
    *m = h->math;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetPointerMode(cublasHandle_t h, cublasPointerMode_t m) {
    if (!handle_ok(h)) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (m != CUBLAS_POINTER_MODE_HOST) {
        emu_warn("cublasSetPointerMode: only CUBLAS_POINTER_MODE_HOST is emulated");
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetWorkspace(cublasHandle_t h, void *w, size_t n) {
    if (!handle_ok(h)) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (n && !is_device(w, n)) return CUBLAS_STATUS_INVALID_VALUE;
    return CUBLAS_STATUS_SUCCESS;
}

#define STATUSES(X)                                                                      \
    X(CUBLAS_STATUS_SUCCESS, "success")                                                  \
    X(CUBLAS_STATUS_NOT_INITIALIZED, "the library was not initialized")                  \
    X(CUBLAS_STATUS_ALLOC_FAILED, "the resource allocation failed")                      \
    X(CUBLAS_STATUS_INVALID_VALUE, "an invalid numeric value was used as an argument")   \
    X(CUBLAS_STATUS_ARCH_MISMATCH, "an absent device architectural feature is required") \
    X(CUBLAS_STATUS_MAPPING_ERROR, "an access to GPU memory space failed")               \
    X(CUBLAS_STATUS_EXECUTION_FAILED, "the GPU program failed to execute")               \
    X(CUBLAS_STATUS_INTERNAL_ERROR, "an internal operation failed")                      \
    X(CUBLAS_STATUS_NOT_SUPPORTED, "the functionality requested is not supported")       \
    X(CUBLAS_STATUS_LICENSE_ERROR, "error detected trying to check the license")
const char *cublasGetStatusName(cublasStatus_t s) {
#define X(c, t) \
    if (s == c) return #c;
    STATUSES(X)
#undef X
    return "CUBLAS_STATUS_UNKNOWN";
}
const char *cublasGetStatusString(cublasStatus_t s) {
#define X(c, t) \
    if (s == c) return t;
    STATUSES(X)
#undef X
    return "unknown status";
}

cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m,
                            int n, int k, const void *alpha, const void *A, cudaDataType at, int lda,
                            const void *B, cudaDataType bt, int ldb, const void *beta, void *C,
                            cudaDataType ct, int ldc, cublasComputeType_t compute,
                            cublasGemmAlgo_t algo) {
    if (!handle_ok(h)) return CUBLAS_STATUS_NOT_INITIALIZED;
    cublasStatus_t st = gemm_check(ta, tb, m, n, k, lda, ldb, ldc);
    if (st) return st;
    if (!alpha || !beta) return CUBLAS_STATUS_INVALID_VALUE;
    if (algo != CUBLAS_GEMM_DEFAULT && !(algo >= 0 && algo <= 23) &&
        !(algo >= CUBLAS_GEMM_DEFAULT_TENSOR_OP && algo <= 115))
        return CUBLAS_STATUS_INVALID_VALUE;
    if (!types_ok(at, bt, ct, compute, false)) {
        emu_warn("cublasGemmEx: types A %d B %d C %d compute %d not supported", (int)at, (int)bt,
                 (int)ct, (int)compute);
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    if (g_sticky) return CUBLAS_STATUS_EXECUTION_FAILED;
    // the arguments are checked now, the product runs in stream order
    bool tf = tf32_mode(h, at, compute);
    float al = *(const float *)alpha, be = *(const float *)beta;
    cublasStatus_t st2 = gemm_run("cublasGemmEx", tf, ta, tb, m, n, k, al, A, at, lda, B, bt, ldb,
                                  be, C, ct, ldc, true);
    if (st2) return st2;
    enqueue(h->stream, [=]() {
        gemm_run("cublasGemmEx", tf, ta, tb, m, n, k, al, A, at, lda, B, bt, ldb, be, C, ct, ldc, false);
    });
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSgemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m,
                           int n, int k, const float *alpha, const float *A, int lda, const float *B,
                           int ldb, const float *beta, float *C, int ldc) {
    return cublasGemmEx(h, ta, tb, m, n, k, alpha, A, CUDA_R_32F, lda, B, CUDA_R_32F, ldb, beta, C,
                        CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
}

cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb,
                                          int m, int n, int k, const void *alpha, const void *A,
                                          cudaDataType at, int lda, long long sa, const void *B,
                                          cudaDataType bt, int ldb, long long sb, const void *beta,
                                          void *C, cudaDataType ct, int ldc, long long sc, int batch,
                                          cublasComputeType_t compute, cublasGemmAlgo_t algo) {
    if (!handle_ok(h)) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (batch < 0) return CUBLAS_STATUS_INVALID_VALUE;
    cublasStatus_t st = gemm_check(ta, tb, m, n, k, lda, ldb, ldc);
    if (st) return st;
    if (!types_ok(at, bt, ct, compute, false)) return CUBLAS_STATUS_NOT_SUPPORTED;
    (void)algo;
    if (g_sticky) return CUBLAS_STATUS_EXECUTION_FAILED;
    bool tf = tf32_mode(h, at, compute);
    float al = *(const float *)alpha, be = *(const float *)beta;
    for (int pass = 0; pass < 2; pass++) // check all now, run in stream order
        for (int b = 0; b < batch; b++) {
            const char *Ab = (const char *)A + b * sa * (long long)type_size(at);
            const char *Bb = (const char *)B + b * sb * (long long)type_size(bt);
            char *Cb = (char *)C + b * sc * (long long)type_size(ct);
            if (pass == 0) {
                st = gemm_run("cublasGemmStridedBatchedEx", tf, ta, tb, m, n, k, al, Ab, at, lda, Bb,
                              bt, ldb, be, Cb, ct, ldc, true);
                if (st) return st;
            } else {
                enqueue(h->stream, [=]() {
                    gemm_run("cublasGemmStridedBatchedEx", tf, ta, tb, m, n, k, al, Ab, at, lda, Bb,
                             bt, ldb, be, Cb, ct, ldc, false);
                });
            }
        }
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGemmGroupedBatchedEx(cublasHandle_t h, const cublasOperation_t ta[],
                                          const cublasOperation_t tb[], const int m[], const int n[],
                                          const int k[], const void *alpha, const void *const A[],
                                          cudaDataType at, const int lda[], const void *const B[],
                                          cudaDataType bt, const int ldb[], const void *beta,
                                          void *const C[], cudaDataType ct, const int ldc[],
                                          int group_count, const int group_size[],
                                          cublasComputeType_t compute) {
    if (!handle_ok(h)) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (group_count < 0) return CUBLAS_STATUS_INVALID_VALUE;
    if (group_count == 0) return CUBLAS_STATUS_SUCCESS;
    if (!ta || !tb || !m || !n || !k || !alpha || !lda || !ldb || !beta || !ldc || !group_size)
        return CUBLAS_STATUS_INVALID_VALUE;
    size_t total = 0;
    for (int g = 0; g < group_count; g++) {
        if (group_size[g] < 0) return CUBLAS_STATUS_INVALID_VALUE;
        cublasStatus_t st = gemm_check(ta[g], tb[g], m[g], n[g], k[g], lda[g], ldb[g], ldc[g]);
        if (st) return st;
        total += (size_t)group_size[g];
    }
    if (!types_ok(at, bt, ct, compute, true)) return CUBLAS_STATUS_NOT_SUPPORTED;
    if (g_sticky) return CUBLAS_STATUS_EXECUTION_FAILED;
    if (!total) return CUBLAS_STATUS_SUCCESS;
    // the pointer arrays are read by the device: they must be device memory
    const char *bad = !is_device(A, total * sizeof(void *)) ? "Aarray"
                      : !is_device(B, total * sizeof(void *)) ? "Barray"
                      : !is_device(C, total * sizeof(void *)) ? "Carray"
                                                              : NULL;
    if (bad) {
        emu_warn("cublasGemmGroupedBatchedEx: %s (%p, %zu pointers) is not inside one device allocation",
                 bad, bad[0] == 'A' ? (const void *)A : bad[0] == 'B' ? (const void *)B : (const void *)C,
                 total);
        set_sticky(cudaErrorIllegalAddress);
        return CUBLAS_STATUS_EXECUTION_FAILED;
    }
    // the per-group values are host arrays, read now; the pointer arrays are
    // device memory, read when the product runs (in stream order)
    const float *al = (const float *)alpha, *be = (const float *)beta;
    bool tf = tf32_mode(h, at, compute);
    struct problem {
        cublasOperation_t ta, tb;
        int m, n, k, lda, ldb, ldc;
        float alpha, beta;
    };
    auto probs = std::make_shared<std::vector<problem>>();
    for (int g = 0; g < group_count; g++)
        for (int i = 0; i < group_size[g]; i++)
            probs->push_back(problem{ta[g], tb[g], m[g], n[g], k[g], lda[g], ldb[g], ldc[g], al[g], be[g]});
    // cuBLAS may read the host arrays when the product runs: a caller that
    // changes them before then gets an error (the snapshot is used)
    enqueue(h->stream, [=]() {
        size_t i = 0;
        bool changed = false;
        for (int g = 0; g < group_count && !changed; g++)
            for (int j = 0; j < group_size[g] && !changed && i < probs->size(); j++, i++) {
                const problem &q = (*probs)[i];
                changed = q.ta != ta[g] || q.tb != tb[g] || q.m != m[g] || q.n != n[g] ||
                          q.k != k[g] || q.lda != lda[g] || q.ldb != ldb[g] || q.ldc != ldc[g] ||
                          q.alpha != al[g] || q.beta != be[g];
            }
        if (changed) {
            emu_warn("cublasGemmGroupedBatchedEx: the host parameter arrays changed before the "
                     "queued call ran (keep them unchanged until it completes)");
            set_sticky(cudaErrorIllegalAddress);
        }
        for (size_t i = 0; i < probs->size() && !g_sticky; i++) {
            const problem &q = (*probs)[i];
            gemm_run("cublasGemmGroupedBatchedEx", tf, q.ta, q.tb, q.m, q.n, q.k, q.alpha, A[i], at,
                     q.lda, B[i], bt, q.ldb, q.beta, C[i], ct, q.ldc, false);
        }
    });
    return CUBLAS_STATUS_SUCCESS;
}
