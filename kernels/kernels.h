/* kernels.h - the compute interface: one table of function pointers per backend.
 *
 * lib/model/ builds the forward pass only from these operations, so a backend
 * (kernels/cpu.c now, kernels/cuda/ next) is selected at run time by handing
 * the model a different `moe_backend`.  Conventions (llm.c style):
 *
 *   - arguments: outputs first, then inputs, then weights, then dimensions
 *     (T tokens / rows, C channels, N output features, K inner dimension ...);
 *   - every pointer argument carries its shape as a comment; all float
 *     activations are float32, row-major, contiguous, in backend memory
 *     (`alloc`ed by the same backend; for the CPU backend: host memory);
 *   - index arrays (int32) and small per-token tables also live in backend
 *     memory; `upload`/`download` move them from/to the host;
 *   - an op never allocates from the caller's point of view (scratch is the
 *     backend's business) and never fails: shapes are checked by the caller;
 *   - determinism: every op gives byte-identical results whatever the number
 *     of threads (no reduction is split across threads);
 *   - ops run in issue order; `sync` waits for everything issued (CPU: no-op).
 *
 * Weights: `matmul` and `experts` take their weights as `const void *` in the
 * backend's `weight_dtype` (CPU "cpu": MOE_DT_F32; "cpu-bf16" and CUDA:
 * MOE_DT_BF16, accumulated in fp32).  The model converts checkpoint tensors to
 * that dtype with `moe_dtype_from_f32` (lib/dtype.h) before `upload`, or copies their
 * bytes as they are when the dtypes agree.  Biases and norm weights are always
 * float32.  A backend whose weight_dtype is not f32 may also offer
 * `matmul_f32` (float32 weight): the model then keeps weights it builds in
 * f32 (a condensed layer's fused down projection, scaled per expert) in f32.
 *
 * CPU and BF16 checkpoints: when the model picks the default backend (no
 * moe_model_opts.backend) and it is "cpu", a checkpoint whose weights are all
 * BF16 runs on "cpu-bf16" instead (env MOE_CPU_WEIGHTS=f32: stay on "cpu").
 * It widens each weight tile (a GEMM_COLS-row block of W, or one expert's
 * whole matrix) to f32 just before its sgemm, in a per-thread buffer, and
 * makes the same sgemm calls as "cpu", so its results are byte-identical to
 * "cpu"'s on the same checkpoint, at half the weight memory and traffic.
 *
 * For a GPU backend (kernels/cuda/): set host_memory = 0; the model then
 * stages every weight on the host in weight_dtype (checkpoint bytes copied as
 * they are when the dtypes agree, BF16 -> BF16; otherwise converted piece by
 * piece) and uploads it with upload_async (below; synchronous `upload` when
 * the backend has none), moves activations with upload/download, and downloads the
 * router's idx/wt (small) to group tokens per expert on the host; `experts`
 * receives the group offsets in host memory and a host array of device weight
 * pointers (one grouped GEMM per phase is the intended CUDA shape).  Freed
 * weight blocks are reused by the model (same sizes layer after layer), so
 * alloc/free need not be fast.  Tests can hand the model any table through
 * moe_model_opts.backend (test_model.c runs a copying CPU backend that way).
 * Parity with the CPU is by relative tolerance; the CPU's byte-exact
 * invariances (threads, batching) are its own.
 *
 * The CPU backend also keeps a plain reference version of the ops that have
 * an optimised one (`moe_backend_cpu_ref()`): triple-loop GEMM, one-row-at-a-
 * time attention.  (The optimised CPU attention works in fixed blocks of keys
 * so that a row's result depends on neither T nor P: see attention_kv.)  tests/unit/test_kernels.c compares the two.
 */
#ifndef MOE_KERNELS_H
#define MOE_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#include "dtype.h" /* the weight storage dtypes a backend can ask for: MOE_DT_F32, MOE_DT_BF16 */

/* router modes */
enum {
    MOE_ROUTE_SOFTMAX_TOPK = 0, /* p = softmax(logits) over all E; top-k of p (HF: all five) */
    MOE_ROUTE_TOPK_SOFTMAX = 1, /* top-k of logits; softmax over the k selected (Mistral's
                                 * reference; equals SOFTMAX_TOPK + RENORM_SUM) */
};
/* top-k weight renormalisation */
enum {
    MOE_RENORM_NONE = 0,
    MOE_RENORM_SUM = 1,     /* w / sum(w)            (qwen*, olmoe, mixtral) */
    MOE_RENORM_SUM_EPS = 2, /* w / (sum(w) + 1e-20)  (deepseek v1, when norm_topk_prob) */
};
/* per-token divergence metrics over the hidden dimension */
enum {
    MOE_DIV_JS = 0,     /* Jensen-Shannon of softmax(a), softmax(b), CD-MoE style (see cpu.c) */
    MOE_DIV_KL = 1,     /* KL(softmax(a) || softmax(b)) with +1e-10 before the logs */
    MOE_DIV_MSE = 2,    /* mean_c (a_c - b_c)^2 */
    MOE_DIV_COSINE = 3, /* 1 - cos(a, b) */
};

typedef struct moe_backend moe_backend;
struct moe_backend {
    const char *name;  /* "cpu", "cpu-ref", "cpu-bf16", "cpu-bf16-compute", "cuda" */
    int weight_dtype;  /* MOE_DT_F32 or MOE_DT_BF16 (lib/dtype.h), expected by matmul */
    int host_memory;   /* 1: backend pointers are host pointers (CPU); the model
                        * then reads weights straight into backend buffers */

    /* ---- memory -------------------------------------------------------- */
    void *(*alloc)(size_t nbytes);                           /* never NULL (aborts on OOM) */
    void (*free)(void *p);                                   /* NULL ok */
    void (*upload)(void *dst, const void *src, size_t nbytes);   /* host -> backend */
    void (*download)(void *dst, const void *src, size_t nbytes); /* backend -> host */
    void (*copy)(void *dst, const void *src, size_t nbytes);     /* backend -> backend */
    void (*zero)(void *dst, size_t nbytes);
    void (*sync)(void);

    /* ---- linear algebra -------------------------------------------------- */
    /* y = x·Wᵀ (+ bias), or y += x·Wᵀ (+ bias) when accumulate is 1.
     * (nn.Linear: W is [out=N, in=K] row-major.) */
    void (*matmul)(float *y,          /* [T, N] */
                   const float *x,    /* [T, K] */
                   const void *w,     /* [N, K] in weight_dtype */
                   const float *bias, /* [N] or NULL */
                   int T, int K, int N, int accumulate);
    /* optional (NULL: absent): matmul with a float32 weight whatever weight_dtype is */
    void (*matmul_f32)(float *y,          /* [T, N] */
                       const float *x,    /* [T, K] */
                       const float *w,    /* [N, K] float32 */
                       const float *bias, /* [N] or NULL */
                       int T, int K, int N, int accumulate);

    /* ---- normalisation and position ------------------------------------- */
    /* y_t = w ⊙ (x_t / sqrt(mean_c x_tc² + eps)); y may alias x.
     * Per-head q/k norm (qwen3): T·heads rows of C = head_dim. */
    void (*rmsnorm)(float *y,       /* [T, C] */
                    const float *x, /* [T, C] */
                    const float *w, /* [C] */
                    float eps, int T, int C);
    /* Rotary embedding in place, rotate-half (NeoX/HF) layout: for j < D/2,
     * angle a = (pos0 + t)·theta^(-2j/D) (fp32),
     * x_j' = x_j cos a − x_{j+D/2} sin a;  x_{j+D/2}' = x_{j+D/2} cos a + x_j sin a. */
    void (*rope)(float *x, /* [T, nh, D] in/out (a q or k projection, head-major features) */
                 float theta, int pos0, int T, int nh, int D);

    /* ---- attention ------------------------------------------------------- */
    /* Causal self-attention of one sequence with grouped KV heads:
     * query head h reads KV head h / (nh/nkv); S = q·kᵀ·scale, masked for
     * key > query, softmax in fp32, out = P·v; heads concatenated (h·D + d). */
    void (*attention)(float *out,     /* [T, nh·D] */
                      const float *q, /* [T, nh·D] */
                      const float *k, /* [T, nkv·D] */
                      const float *v, /* [T, nkv·D] */
                      float scale, int T, int nh, int nkv, int D);
    /* The same over a KV cache (prefix sharing, moe-eval): T new queries at
     * positions P..P+T-1 read P cached keys/values (rows 0..P-1 of k and v)
     * and their own T (rows P..P+T-1, already roped at their positions):
     * query t sees keys 0..P+t.  attention(...) == attention_kv(..., 0, T, ...).
     * Row invariance (CPU "cpu" and "cpu-ref"): output row t is bit-identical
     * to row P+t of attention over the P+T rows, and the rows of a call with
     * P+T keys equal those of a longer call's first rows, whatever T, P; so a
     * context run once and continued by several continuations gives the
     * same bits as each whole sequence.  A device backend meets it within
     * fp32 rounding.  P = 0 is allowed; T >= 1. */
    void (*attention_kv)(float *out,     /* [T, nh·D] */
                         const float *q, /* [T, nh·D] */
                         const float *k, /* [P+T, nkv·D] */
                         const float *v, /* [P+T, nkv·D] */
                         float scale, int P, int T, int nh, int nkv, int D);

    /* ---- element-wise ---------------------------------------------------- */
    /* h = silu(g)·u where g = gu[:, :Im], u = gu[:, Im:] (gate rows first, as the
     * model fuses gate_proj and up_proj into one [2·Im, H] weight). */
    void (*swiglu)(float *h,        /* [T, Im] */
                   const float *gu, /* [T, 2·Im] */
                   int T, int Im);
    /* y += a·x */
    void (*axpy)(float *y, /* [n] */ const float *x, /* [n] */ float a, size_t n);
    /* y_t += sigmoid(z_t)·x_t  (qwen2_moe shared-expert gate) */
    void (*sigmoid_gate_add)(float *y,       /* [T, C] */
                             const float *x, /* [T, C] */
                             const float *z, /* [T] gate logits (x·g_sᵀ) */
                             int T, int C);

    /* ---- routing and expert dispatch -------------------------------------- */
    /* Top-k routing per token.  Ties go to the lower expert id; the k slots
     * are sorted by weight, descending.  probs (optional) receives the full
     * softmax over E in mode SOFTMAX_TOPK. */
    void (*router)(int32_t *idx,        /* [T, K] expert ids */
                   float *wt,           /* [T, K] routing weights */
                   float *probs,        /* [T, E] or NULL */
                   const float *logits, /* [T, E] */
                   int mode, int renorm, int T, int E, int K);
    /* dst_i = src_{rows_i} */
    void (*gather_rows)(float *dst,           /* [n, C] */
                        const float *src,     /* [T, C] */
                        const int32_t *rows,  /* [n] in 0..T-1 */
                        int n, int C);
    /* dst_{rows_i} += scale_i·src_i, for i = 0..n-1 in that order; rows must be
     * distinct within one call (one expert sees a token at most once). */
    void (*scatter_add_rows)(float *dst,          /* [T, C] */
                             const float *src,    /* [n, C] */
                             const int32_t *rows, /* [n] */
                             const float *scale,  /* [n] or NULL (= 1) */
                             int n, int C);

    /* Routed experts, grouped.  Rows are (token, slot) pairs sorted by expert
     * (moe_dispatch order): expert e owns rows off[e] .. off[e+1]-1, and row i
     * reads token rows[i] of x.  For every expert with w_gu[e] != NULL:
     *   out_i = W_down,e · (silu(g) ⊙ u),  [g; u] = W_gu,e · x_{rows_i}
     * Experts with w_gu[e] == NULL are skipped (their out rows untouched), so
     * the caller can run a layer's experts in groups that fit in memory.
     * Experts are independent: a backend may run them in any order or
     * concurrently (CUDA: one grouped GEMM). */
    void (*experts)(float *out,                /* [off[E], H] */
                    const float *x,            /* [T, H] */
                    const int32_t *rows,       /* [off[E]] backend memory */
                    const int32_t *off,        /* [E + 1] HOST memory */
                    const void *const *w_gu,   /* [E] host array of [2·Im, H] weights (gate rows first) */
                    const void *const *w_down, /* [E] host array of [H, Im] weights */
                    int E, int H, int Im);
    /* y_t = Σ_k wt_tk · out_{slot_tk}, accumulated from 0 in k order (the model
     * passes each token's slots in ascending expert id, Hugging Face's order). */
    void (*combine)(float *y,             /* [T, H] */
                    const float *out,     /* [n, H] expert outputs */
                    const int32_t *slot,  /* [T, K] rows of out */
                    const float *wt,      /* [T, K] */
                    int T, int K, int H);

    /* ---- reductions for the search tools ----------------------------------- */
    /* p_t = softmax(x_t) over C (fp32, max-subtracted) */
    void (*softmax_rows)(float *p,       /* [T, C] */
                         const float *x, /* [T, C] */
                         int T, int C);
    /* d_t = metric(a_t, b_t) over the hidden dimension, in double.  JS/KL
     * take raw vectors and apply softmax over C themselves. */
    void (*divergence)(double *d,      /* [T] */
                       const float *a, /* [T, C] reference */
                       const float *b, /* [T, C] candidate */
                       int metric, int T, int C);

    /* ---- backward (training: moe-tune, lib/train.h) -------------------------
     * One gradient op per forward op, named <op>_backward, llm.c style: the
     * same arguments as the forward plus the saved activations and the
     * gradients.  Convention: a backward op ADDS (+=) into every input and
     * parameter gradient it is given (the caller zeroes them once per step,
     * so residual branches and several uses of one weight compose), except
     * where "written" is said.  A gradient pointer that may be NULL means
     * "not needed" (frozen weight, or nothing below): the op skips that work.
     * Parameter gradients are float32 whatever weight_dtype is.  Reductions
     * over tokens (dW, dbias, dnorm-weight, embedding rows) run in a fixed
     * order so results are byte-identical whatever the thread count (CPU);
     * a device backend meets the CPU within fp32 rounding.
     * A table may leave all of them NULL: moe-tune then refuses the backend. */

    /* y = x·Wᵀ + b:  dx += dy·W;  dw += dyᵀ·x;  dbias += Σ_t dy_t */
    void (*matmul_backward)(float *dx,          /* [T, K] or NULL */
                            float *dw,          /* [N, K] float32, or NULL */
                            float *dbias,       /* [N] or NULL */
                            const float *dy,    /* [T, N] */
                            const float *x,     /* [T, K] (the forward's input) */
                            const void *w,      /* [N, K] in weight_dtype */
                            int T, int K, int N);
    /* y = rmsnorm(x)·w:  dx += ...;  dw += Σ_t dy_t ⊙ x_t/rms_t.
     * x is the forward's INPUT (not y); dx must not alias x or dy. */
    void (*rmsnorm_backward)(float *dx,       /* [T, C] */
                             float *dw,       /* [C] or NULL */
                             const float *dy, /* [T, C] */
                             const float *x,  /* [T, C] */
                             const float *w,  /* [C] */
                             float eps, int T, int C);
    /* rope is a rotation: d ← Rᵀ·d in place (rotation by −angle), written */
    void (*rope_backward)(float *d, /* [T, nh, D] in/out */
                          float theta, int pos0, int T, int nh, int D);
    /* causal GQA attention of one sequence (as `attention`): dq, dk, dv +=.
     * out is the forward's output (for rowsum(dout ⊙ out)); the softmax is
     * recomputed from q and k (nothing of size T² is saved). */
    void (*attention_backward)(float *dq,         /* [T, nh·D] */
                               float *dk,         /* [T, nkv·D] */
                               float *dv,         /* [T, nkv·D] */
                               const float *dout, /* [T, nh·D] */
                               const float *q,    /* [T, nh·D] (post-RoPE) */
                               const float *k,    /* [T, nkv·D] (post-RoPE) */
                               const float *v,    /* [T, nkv·D] */
                               const float *out,  /* [T, nh·D] */
                               float scale, int T, int nh, int nkv, int D);
    /* h = silu(g)·u:  dgu += [dg | du] */
    void (*swiglu_backward)(float *dgu,       /* [T, 2·Im] */
                            const float *dh,  /* [T, Im] */
                            const float *gu,  /* [T, 2·Im] */
                            int T, int Im);
    /* y_t += sigmoid(z_t)·x_t:  dx += sigmoid(z)·dy;  dz += σ'(z)·<dy_t, x_t> */
    void (*sigmoid_gate_add_backward)(float *dx,       /* [T, C] or NULL */
                                      float *dz,       /* [T] or NULL */
                                      const float *dy, /* [T, C] */
                                      const float *x,  /* [T, C] */
                                      const float *z,  /* [T] */
                                      int T, int C);
    /* y_t = Σ_k wt_tk·out_{slot_tk}:  dout_{slot_tk} = wt_tk·dy_t (written:
     * every row of out belongs to exactly one (t, k));
     * dwt_tk = <dy_t, out_{slot_tk}> (written) */
    void (*combine_backward)(float *dout,         /* [n, H] or NULL */
                             float *dwt,          /* [T, K] or NULL */
                             const float *dy,     /* [T, H] */
                             const float *out,    /* [n, H] */
                             const int32_t *slot, /* [T, K] */
                             const float *wt,     /* [T, K] */
                             int T, int K, int H);
    /* The router's gradient to its logits (written), from the gradient of
     * the top-k weights as the model uses them (after renorm) and, when not
     * NULL, of the full softmax probs (auxiliary load-balancing losses).
     * idx, wt, probs as `router` returned them for the same logits (probs:
     * the softmax over all E).  MOE_ROUTE_TOPK_SOFTMAX is differentiated as
     * SOFTMAX_TOPK + RENORM_SUM (the same function). */
    void (*router_backward)(float *dlogits,      /* [T, E] written */
                            const float *dwt,    /* [T, K] */
                            const float *dprobs, /* [T, E] or NULL */
                            const int32_t *idx,  /* [T, K] */
                            const float *wt,     /* [T, K] */
                            const float *probs,  /* [T, E] */
                            int mode, int renorm, int T, int E, int K);
    /* x_t = E[ids_t]:  dE[ids_t] += dx_t, in token order per row */
    void (*embed_backward)(float *dE,           /* [V, H] float32 */
                           const float *dx,     /* [T, H] */
                           const int32_t *ids,  /* [T] backend memory */
                           int T, int H);
    /* Causal-LM cross-entropy, fused with its gradient: for each row t with
     * targets[t] >= 0: loss[t] = logsumexp(logits_t) − logits_t[target]
     * (fp32 max-subtracted, the sum in double), dlogits_t = (softmax − onehot)
     * · dscale (written); rows with targets[t] < 0 (ignored, −100) get
     * loss 0 and dlogits 0.  dlogits may alias logits. */
    void (*cross_entropy)(float *loss,            /* [T] */
                          float *dlogits,         /* [T, V] or NULL (loss only) */
                          const float *logits,    /* [T, V] */
                          const int32_t *targets, /* [T] backend memory */
                          float dscale, int T, int V);
    /* AdamW step on n float32 parameters (PyTorch's AdamW: decoupled decay
     * p −= lr·wd·p, then m, v, bias-corrected update with eps outside the
     * sqrt); g is multiplied by gscale first (clipping, 1/accumulation).
     * step counts from 1. */
    void (*adamw)(float *p, float *m, float *v, /* [n] in/out */
                  const float *g,               /* [n] */
                  size_t n, float lr, float beta1, float beta2, float eps,
                  float weight_decay, float gscale, int step);
    /* Σ x_i² in double, in a fixed order (gradient-norm clipping); waits for
     * the ops before it */
    double (*sumsq)(const float *x, size_t n);
    /* dst (weight_dtype, [n]) = src rounded to it (round to nearest even for
     * BF16): the compute copy of an updated float32 master weight */
    void (*to_weight_dtype)(void *dst, const float *src, size_t n);

    /* ---- asynchronous weight uploads and memory trimming -------------------
     * Device backends (host_memory 0) load weights through these: the model
     * stages checkpoint bytes in a small ring of host_alloc'd buffers (pinned
     * on CUDA: DMA at full rate) and queues each piece with upload_async on a
     * copy queue of its own, so that staging, copies and ops overlap.  Rules
     * (the emulator in tests/unit/test_model_device.c enforces them by
     * delaying every copy until upload_wait / upload_fence):
     *   - a copy is ordered after every op, alloc and free issued before
     *     upload_async (dst may be a block that running ops freed);
     *   - src stays unchanged, and is not host_freed, until upload_wait(t)
     *     with t >= the copy's ticket has returned;
     *   - no op may read dst before an upload_fence issued after the copy;
     *     upload_fence makes the ops issued after it wait for every copy
     *     queued before it, without blocking the host.
     * CPU backends: host_alloc = malloc, upload_async = memcpy, the rest no-ops.
     * A table may leave all five NULL: the model then uploads synchronously. */
    void *(*host_alloc)(size_t nbytes); /* host staging memory; never NULL (aborts on OOM) */
    void (*host_free)(void *p);         /* NULL ok; no queued copy may read from p */
    /* queue a host -> backend copy; returns its ticket (> 0, increasing by 1 per call) */
    uint64_t (*upload_async)(void *dst, const void *src, size_t nbytes);
    /* the host waits for the copies with tickets <= t (0: all queued so far) */
    void (*upload_wait)(uint64_t t);
    /* ops issued from now on wait for all copies queued so far */
    void (*upload_fence)(void);
    /* give back scratch memory the backend keeps between ops (it grows back on
     * demand); the model calls it between phases, not per op */
    void (*trim)(void);

    /* ---- memory available -------------------------------------------------- */
    /* Bytes of backend memory free now and in all (CUDA: cudaMemGetInfo, all
     * users of the device; CPU: MemAvailable and MemTotal of /proc/meminfo).
     * Sizes defaults (expert cache, search budgets, whether a model's layers
     * stay resident) to the device at hand.  0, 0 when unknown; a table may
     * leave it NULL (= unknown). */
    void (*mem_info)(size_t *free_bytes, size_t *total_bytes);
    /* Bytes allocated through this backend's alloc now and at most since
     * the start (scratch included; GPU backends, reported by the search
     * tools).  NULL: not tracked (CPU). */
    void (*mem_used)(size_t *live_bytes, size_t *peak_bytes);

    /* ---- errors ----------------------------------------------------------- */
    /* 0, or -1 with the backend's sticky device error set again (see
     * backend_cuda.h: an op cannot fail, so a device error is recorded and
     * every later op becomes a no-op).  NULL: the backend never fails (CPU).
     * Call moe_backend_status(), which handles NULL. */
    int (*status)(void);
};

/* Backends.  The CPU ones are static tables; they use OpenMP for element-wise
 * and attention work and OpenBLAS for GEMM (see cpu.c on determinism). */
const moe_backend *moe_backend_cpu(void);
const moe_backend *moe_backend_cpu_ref(void); /* plain loops, for tests */
const moe_backend *moe_backend_cpu_bf16(void); /* "cpu" with BF16 weights (see above) */
/* "cpu-bf16" whose matmul and experts compute in BF16 (moe_model_opts.precision
 * MOE_PRECISION_BF16, --precision bf16): the activation input of each weight
 * GEMM rounded to BF16 (nearest even), BF16 products summed in float32
 * (AVX512-BF16 VDPBF16PS when the CPU has it; kernels/cpu_bf16.c) */
const moe_backend *moe_backend_cpu_bf16_compute(void);
/* 1 when this CPU has AVX512-BF16; else "cpu-bf16-compute" computes the same
 * bits in portable C (slow) */
int moe_cpu_bf16_native(void);
/* tests and benchmarks: 1 = use the portable C kernels even where the CPU has
 * AVX512-BF16; 0 = detect again */
void moe_cpu_bf16_force_portable(int portable);
/* "cpu", "cpu-ref", "cpu-bf16", "cpu-bf16-compute" (and "cuda" when built with it);
 * NULL + error if unknown. */
const moe_backend *moe_backend_get(const char *name);
/* Backend for --device NAME (kernels/select.c): "cpu", "cpu-ref", "cuda", or
 * NULL/"" for the default ($MOE_DEVICE when set, else cuda when built with
 * CUDA and a device is visible, else cpu); see backend_cuda.h. */
const moe_backend *moe_backend_select(const char *device);
/* Settings of a device backend (CUDA).  moe_backend_configure applies the
 * non-zero ones: device_index before the backend is first initialised
 * (later: ignored), the others at once.  moe_model_open applies its
 * options' (moe_model_opts.dev); the tools set them from the environment
 * (moe_model_opts_from_env: MOE_CUDA_DEVICE, MOE_CUDA_SYNC,
 * MOE_CUDA_PRECISION). */
typedef struct {
    int device_index; /* which GPU (0: the first) */
    int sync_each_op; /* synchronise after every op, so that a device error names its op */
    int f32_compute;  /* GEMMs in f32 without TF32 instead of BF16 (parity checks; slow) */
} moe_device_opts;
void moe_backend_configure(const moe_device_opts *o);
/* 0, or -1 with the sticky device error set again (b->status; 0 when NULL). */
int moe_backend_status(const moe_backend *b);
/* 1: b computes in device memory (its pointers are not host pointers). */
static inline int moe_backend_is_device(const moe_backend *b) { return !b->host_memory; }

/* Weight staging (kernels/staging.c): uploads of weights through a ring of
 * 4 host buffers of slot_bytes each (0 = 64 MiB; host_alloc'd: pinned on
 * CUDA) and upload_async, so that filling a buffer, its copy and the ops
 * overlap; a backend without the asynchronous ops (or a host-memory one)
 * gets synchronous uploads.  moe_stager_put(s, dst, n, es, raw, fill, ctx)
 * writes n elements of es bytes to backend memory dst: raw, when not NULL,
 * already holds them as they go (a plain copy on the synchronous path);
 * otherwise, and always on the asynchronous path, fill(ctx, h, i, k) writes
 * elements i..i+k-1 into host memory h.  The ops may read dst only after
 * moe_stager_ready(s) (upload_fence); moe_stager_pending(s) says whether
 * copies were queued since.  moe_stager_free waits for every copy. */
typedef struct moe_stager moe_stager;
typedef void (*moe_stage_fill)(void *ctx, void *dst, size_t i, size_t k);
moe_stager *moe_stager_new(const moe_backend *be, size_t slot_bytes);
void moe_stager_free(moe_stager *s);
void moe_stager_put(moe_stager *s, void *dst, size_t n, size_t es, const void *raw,
                    moe_stage_fill fill, void *ctx);
void moe_stager_ready(moe_stager *s);
int moe_stager_pending(const moe_stager *s);

/* Host-side helpers shared by all backends ------------------------------- */

/* Threads used by OpenMP regions and OpenBLAS (0 = all cores). */
void moe_kernels_set_threads(int n);


/* Grouping of routed tokens per expert (host memory).  From idx/wt [T, K]
 * builds, for every expert e, the list of tokens routed to it in ascending
 * token order and their weights: tokens[off[e] .. off[e+1]-1]. */
typedef struct {
    int E, T, K;
    int32_t *off;    /* [E + 1] */
    int32_t *tokens; /* [T·K] token of each sorted row */
    float *weights;  /* [T·K] its routing weight */
    int32_t *slot;   /* [T, K] sorted row of each (token, slot), a token's slots
                        ordered by ascending expert id */
    float *slot_wt;  /* [T, K] the matching weights */
} moe_dispatch;
void moe_dispatch_build(moe_dispatch *d, const int32_t *idx, const float *wt, int T, int E, int K);
void moe_dispatch_free(moe_dispatch *d);

#endif
