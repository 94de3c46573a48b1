/* model.h - the forward pass of a Hugging Face MoE causal LM, built from the
 * kernel interface (kernels/kernels.h) on top of lib/checkpoint.h.
 *
 *   x_0 = embed(ids)
 *   for l: x = x + Attn_l(RMSNorm_in(x))                  moe_layer_attention
 *          xn = RMSNorm_post(x)                            moe_layer_mlp_input
 *          x = x + MLP_l(xn)                               moe_layer_mlp_run
 *   out = RMSNorm_final(x_L); logits = out·W_lmᵀ           moe_model_final_norm, moe_model_lm_head
 *
 * Files (lib/model/, see internal.h): forward.c computes those pieces,
 * weights.c holds the weights (residency), run.c runs a batch of sequences
 * layer-major (moe_run_layers) under one residency rule, options.c reads
 * the environment for the tools.
 *
 * MLP_l is the layer's kind: dense SwiGLU, routed MoE (router + experts +
 * shared experts, qwen2_moe's sigmoid-gated shared expert), or condensed (a
 * fixed list of routed experts with fixed weights + shared experts, no
 * router; the kept experts and any ungated shared expert are fused at load
 * time into one wide SwiGLU so it runs as two dense GEMMs), or none (the
 * baselines: LayerDrop runs x = x + Attn(...) only, BlockDrop skips the
 * layer; moe_run_layer and moe_layer_forward do both).  The kind comes
 * from the checkpoint's config (condensed_layers, dropped_layers) and can be
 * overridden at run time (moe_model_condense_layer, moe_model_drop_layer)
 * without touching the checkpoint.
 *
 * Weight streaming.  Nothing is converted at open except the final norm.
 * moe_layer_load(l) converts layer l's weights to the backend's compute
 * dtype, releases the mapped pages and asks the kernel to read layer l+1
 * ahead; moe_layer_unload(l) frees them.  A layer's routed experts are
 * converted with it when all of them fit in opts.expert_cache_bytes (default
 * 1 GiB; 8 GiB on device backends); otherwise they are converted when used, in groups of at most a
 * quarter of that budget, and freed after each group (a DeepSeekMoE-16B
 * layer, 2.2 GB of experts in f32, never sits in memory whole).  The
 * embedding is read row by row, lm_head in chunks of rows.  Routed MLPs run
 * in chunks of tokens whose buffers stay near 1 GiB.  Peak memory is about
 * one layer's non-expert weights + the expert cache or group + activations.
 * Token-level results never depend on chunking, grouping or thread count.
 *
 * CPU, BF16 checkpoints.  The default CPU backend becomes "cpu-bf16"
 * (kernels.h): weights stay BF16 and are not even copied -- a layer's
 * matrices point into the checkpoint mapping (gate|up fused when up follows
 * gate in the file, as the writers order them; else a BF16 copy), the
 * kernels widen them to f32 tile by tile in per-thread buffers, and the
 * mapped pages are released when the weight is freed or its layer unloaded
 * (so "converts" above costs nothing there).  Results are byte-identical to
 * f32 weights; a condensed layer's fused down projection (scaled in f32)
 * stays f32.  For benchmarks: opts.cpu_f32_weights converts to f32 as before
 * ("cpu"); opts.cpu_copy_bf16 copies the BF16 bytes instead.
 *
 * Device backends (host_memory 0; kernels/cuda/).  Weights are staged in the
 * backend's weight dtype, BF16 checkpoint bytes as they are (no f32 round
 * trip; opts.stage_f32 restores the old f32 staging, for benchmarks),
 * through the backend's staging ring of 4 x 64 MiB pinned host buffers and
 * copies that run asynchronously (kernels.h, moe_stager); the condensed layers'
 * fused weights (columns scaled in f32) keep the f32 path.  The default
 * expert cache is 8 GiB there, so a whole layer's experts are uploaded once
 * per layer, not per token chunk.  The layer-major runner (moe_run_layers:
 * the forward, the searches, the evaluation) prefetches layer l+1 while
 * layer l runs, after unloading l.
 * Peak device memory, DeepSeekMoE-16B shapes (H 2048, 64 experts x 1408,
 * 2 shared, top-6, 16 heads, vocab 102400), 25 600 tokens, streaming:
 *   weights: one MoE layer in BF16 1.18 GB (experts 64 x 3 x 1408 x 2048 x 2 B
 *     = 1.11 GB, attention 4 x 2048^2 x 2 B = 34 MB, shared 3 x 2816 x 2048 x 2 B
 *     = 35 MB); layer l is unloaded before l+1 is prefetched, so l+1 reuses
 *     l's blocks from the model's pool (<= 4 GiB kept): ~1.2 GB, and at
 *     most 2.4 GB for a caller that prefetches before unloading; layer 0
 *     (dense, 10944) 134 MB, kept in the pool;
 *   activations: x, xn, y of moe_model_forward 3 x 25600 x 2048 x 4 B = 0.63 GB
 *     (a search tool's per-layer caches of 210 MB each are its own);
 *   attention scratch per sequence of T tokens: 5 x T x 2048 x 4 B (T = 2048: 84 MB);
 *   routed chunks of 4066 tokens (24 396 rows): expert outputs 200 MB + CUDA
 *     scratch (gathered rows BF16 100 MB, gate|up f32 275 MB, SwiGLU BF16 69 MB);
 *   shared experts on all tokens: gate|up 25600 x 5632 x 4 B = 577 MB, SwiGLU
 *     288 MB, output 210 MB; dense layer 0: gate|up 2.24 GB + 1.12 GB, BF16
 *     copy of the activations 0.56 GB (scratch grows to the largest and stays
 *     until the end of the layers, then is trimmed);
 *   lm_head: logits chunk 25600 x 8192 x 4 B = 0.84 GB + a 34 MB weight chunk.
 * Sum of the worst phase (layer 1 after the dense layer 0, scratch not yet
 * trimmed): 2.4 + 0.63 + 0.08 + 3.9 + 0.65 + 1.1 ~ 8.8 GB, well under 24 GB.
 *
 * Speed notes for callers: with experts uncached, every moe_layer_mlp_run
 * or moe_layer_expert call converts the experts it needs again; raise
 * expert_cache_bytes ((size_t)-1 = always cache) when memory allows, and
 * pass many tokens per call.
 *
 * Not thread-safe: one model, one caller thread (the ops use all threads).
 *
 * Activations live in backend memory (moe_model_alloc).  For the CPU backend
 * these are plain host pointers.  All per-token functions (everything except
 * attention) accept any number of tokens, so the search tools can
 * concatenate the tokens of many sequences (layer-major processing);
 * attention works on one sequence at a time (positions start at 0).
 *
 * Errors: -1 / NULL with moe_error_set(); nothing is printed. */
#ifndef MOE_MODEL_H
#define MOE_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "checkpoint.h"
#include "config.h"
#include "kernels.h"

typedef struct moe_model moe_model;

/* Compute precision (moe_model_opts.precision; the tools' --precision,
 * $MOE_PRECISION).  F32: every product in float32 (the CPU's default; on
 * CUDA the GEMMs in float32 without TF32, as MOE_CUDA_PRECISION=f32).  BF16:
 * each weight GEMM (attention projections, MLPs and experts, lm_head) takes
 * its activation input rounded to BF16 and the weights as BF16 (a float32
 * checkpoint's rounded at load), summing the products in float32; norms,
 * attention scores, softmax, the router's logits and the residual stream stay
 * float32 (CPU: "cpu-bf16-compute", kernels.h; CUDA's default, where the
 * router's GEMM takes BF16 inputs too).  DEFAULT: F32 on the CPU, BF16 on
 * CUDA. */
enum { MOE_PRECISION_DEFAULT = 0, MOE_PRECISION_F32 = 1, MOE_PRECISION_BF16 = 2 };
/* "f32" / "bf16" -> MOE_PRECISION_*; -1 for anything else */
int moe_precision_parse(const char *s);

typedef struct {
    const char *device;        /* backend name ("cpu", "cpu-ref", "cuda"); NULL = the default
                                  of moe_backend_select (cuda when built and a GPU is
                                  visible, else cpu; $MOE_DEVICE overrides it) */
    const moe_backend *backend; /* or a backend table directly (tests); overrides device */
    size_t expert_cache_bytes; /* keep a layer's routed experts converted while it is
                                  loaded if they fit; 0 = default (1 GiB on the CPU,
                                  8 GiB on device backends); (size_t)-1 = always */
    size_t staging_bytes;      /* device backends: bytes of each of the 4 host staging
                                  buffers of the weight uploads; 0 = 64 MiB */
    /* How weights are held, for benchmarks and tests (0 = the default; results
     * are the same bytes either way).  Set from the environment by
     * moe_model_opts_from_env() only. */
    int cpu_f32_weights;       /* CPU, BF16 checkpoint: convert weights to f32 ("cpu")
                                  instead of computing from BF16 ("cpu-bf16") */
    int cpu_copy_bf16;         /* cpu-bf16: copy the BF16 bytes instead of pointing into
                                  the checkpoint mapping */
    int cpu_no_populate;       /* cpu-bf16: fault the borrowed pages in as the ops read
                                  them instead of mapping them at load */
    int stage_f32;             /* device backends: stage weights through f32 (the old
                                  round trip) instead of in the weight dtype */
    moe_device_opts dev;       /* device backend settings (kernels.h), applied before the
                                  backend is selected; zeros leave them as they are */
    int precision;             /* MOE_PRECISION_* (above); 0 = the device's default */
} moe_model_opts;

/* The one place the library reads the environment for model options (the
 * tools call it; README.md, "Environment", documents the variables):
 * MOE_CPU_WEIGHTS=f32 sets cpu_f32_weights, MOE_CPU_BORROW=0 cpu_copy_bf16,
 * MOE_CPU_POPULATE=0 cpu_no_populate, MOE_STAGE_F32=1 stage_f32,
 * MOE_CUDA_DEVICE=N dev.device_index, MOE_CUDA_SYNC=1 dev.sync_each_op,
 * MOE_CUDA_PRECISION=f32 dev.f32_compute, MOE_PRECISION=f32|bf16 precision
 * (another value: ignored with a warning).  Fields already set are kept.
 * ($MOE_DEVICE, the default --device, is moe_backend_select's.) */
void moe_model_opts_from_env(moe_model_opts *o);

/* Router observer: called by moe_layer_mlp for routed-MoE layers, with the
 * top-k expert ids and weights exactly as the model uses them (after any
 * renormalisation), host memory, tokens in the order given (concatenated
 * sequences stay concatenated).  probs = full softmax over the E experts. */
typedef void (*moe_router_fn)(void *ctx, int layer, int T, int K, int E,
                              const int32_t *idx,  /* [T, K] */
                              const float *wt,     /* [T, K] */
                              const float *probs); /* [T, E] */

/* Worker threads for every backend op (0 = all cores); results never depend on it. */
void moe_model_set_threads(int n);

moe_model *moe_model_open(const char *dir, const moe_model_opts *opts);
void moe_model_close(moe_model *m);
const moe_config *moe_model_config(const moe_model *m);
const moe_ckpt *moe_model_ckpt(const moe_model *m);
const moe_backend *moe_model_backend(const moe_model *m);
const char *moe_model_fingerprint(const moe_model *m);

/* Backend memory for activations (floats), zero-filled; free with moe_model_free. */
float *moe_model_alloc(moe_model *m, size_t nfloats);
void moe_model_free(moe_model *m, void *p);

/* ---- layer kinds ---------------------------------------------------------- */

/* Effective MLP kind of layer l (config, or run-time override). */
moe_mlp_kind moe_model_layer_kind(const moe_model *m, int l);
/* Condense layer l at run time: y = Σ_i weights[i]·Expert_{experts[i]}(xn)
 * + Shared(xn) (qwen2_moe: × sigmoid gate).  The layer must be routed MoE in
 * the checkpoint; expert ids distinct, in range.  Unloads the layer if it was
 * loaded (the next load builds the fused weights).  0 or -1. */
int moe_model_condense_layer(moe_model *m, int l, int n, const int *experts,
                             const float *weights);
/* Drop layer l at run time (the baselines' search): MOE_DROP_MLP (LayerDrop,
 * kind MOE_MLP_NONE: x = x + Attn(RMSNorm_in(x)), no MLP) or MOE_DROP_BLOCK
 * (BlockDrop: the layer is skipped, x passes unchanged).  Any layer the
 * checkpoint has not dropped already; replaces a run-time condensation.
 * Unloads the layer.  0 or -1. */
int moe_model_drop_layer(moe_model *m, int l, moe_drop_kind d);
/* How layer l is dropped now (config or run-time), MOE_DROP_NONE if not. */
moe_drop_kind moe_model_layer_drop(const moe_model *m, int l);
/* Undo moe_model_condense_layer / moe_model_drop_layer (back to the
 * checkpoint's kind). */
void moe_model_restore_layer(moe_model *m, int l);

/* ---- per-layer, layer-major API (the search tools) ------------------------- */

int moe_layer_load(moe_model *m, int l);   /* no-op if loaded; 0 or -1 */
void moe_layer_unload(moe_model *m, int l);
/* Load layer l ahead of its use, for layer-major loops: call it for l+1 once
 * layer l's ops are issued (and l unloaded when streaming).  On a device
 * backend the weights are staged and their copies queued now and overlap
 * the ops still running; the first use of layer l (any moe_layer_* call on
 * it, or moe_layer_load) makes the ops wait for those copies.  A hint: a
 * no-op on host-memory backends (the CPU loads at first use, so that only
 * one layer is ever resident).  0 or -1. */
int moe_layer_prefetch(moe_model *m, int l);

/* x_0: embedding rows of ids (checked against the vocabulary). */
int moe_model_embed(moe_model *m,
                    float *x,            /* [T, H] backend */
                    const int32_t *ids,  /* [T] host */
                    int T);
/* x += Attn_l(RMSNorm_in(x)) for ONE sequence of T tokens (nothing for a
 * dropped block, here and in moe_layer_attention_kv; a dropped MLP's
 * moe_layer_mlp_input and moe_layer_mlp_run give zeros). */
int moe_layer_attention(moe_model *m, int l, float *x /* [T, H] in/out */, int T);
/* Prefix sharing (KV cache), one layer at a time.  kc and vc are backend
 * buffers of moe_model_kv_floats(m, n) floats each, holding row by row the
 * post-RoPE keys and values (after any q/k norm) of positions 0..n-1.
 * moe_layer_attention_kv runs x += Attn_l(RMSNorm_in(x)) for T tokens at
 * positions pos0..pos0+T-1 that continue the pos0 tokens whose K/V are in
 * rows 0..pos0-1: it writes its own K/V to rows pos0..pos0+T-1 (later rows
 * untouched) and attends over rows 0..pos0+T-1.  Layer-major use, for a
 * context of P tokens and continuations c:
 *     for l:  moe_layer_attention_kv(m, l, x_ctx, P, 0, kc, vc);
 *             for c: moe_layer_attention_kv(m, l, x_c, T_c, P, kc, vc);
 *             then the MLP on every row (context and continuations)
 * (each continuation overwrites the previous one's rows; the cache needs
 * P + max T_c rows and only lives for one layer).  On the CPU backends the
 * result rows are bit-identical to moe_layer_attention on the concatenated
 * sequence (kernels.h, attention_kv); on a device, equal within rounding.
 * 0 or -1. */
size_t moe_model_kv_floats(const moe_model *m, int n); /* n·num_kv_heads·head_dim */
int moe_layer_attention_kv(moe_model *m, int l, float *x /* [T, H] in/out */, int T, int pos0,
                           float *kc /* [>= pos0+T, nkv·D] */, float *vc /* same */);
/* xn = RMSNorm_post_l(x) (the MLP input). */
int moe_layer_mlp_input(moe_model *m, int l, float *xn /* [T, H] */, const float *x /* [T, H] */,
                        int T);
/* y = MLP_l(xn), any number of tokens; cb (may be NULL) sees the routing of
 * routed-MoE layers. */
int moe_layer_mlp_run(moe_model *m, int l, float *y /* [T, H] */, const float *xn /* [T, H] */, int T,
                  moe_router_fn cb, void *ctx);
/* Whole decoder layer on one sequence: attention, then x += MLP(RMSNorm(x)). */
int moe_layer_forward(moe_model *m, int l, float *x /* [T, H] in/out */, int T, moe_router_fn cb,
                      void *ctx);

/* Routing of a routed-MoE layer l (valid for an overridden layer too, as
 * long as the checkpoint holds its router).  Outputs in host memory. */
int moe_layer_route(moe_model *m, int l, const float *xn /* [T, H] backend */, int T,
                    int32_t *idx /* [T, K] */, float *wt /* [T, K] */,
                    float *probs /* [T, E] or NULL */);
/* y = Expert_e(xn) of layer l, unweighted (works for MoE and condensed
 * layers, any expert the checkpoint holds). */
int moe_layer_expert(moe_model *m, int l, int e, float *y /* [T, H] */,
                     const float *xn /* [T, H] */, int T);
/* y = shared part of layer l: Shared(xn), × sigmoid(xn·g) for qwen2_moe;
 * zeros when the architecture has no shared expert. */
int moe_layer_shared(moe_model *m, int l, float *y /* [T, H] */, const float *xn /* [T, H] */,
                     int T);

/* y = RMSNorm_final(x) (y may alias x). */
int moe_model_final_norm(moe_model *m, float *y /* [T, H] */, const float *x /* [T, H] */, int T);
/* logits = x·W_lmᵀ, x already final-normed. */
int moe_model_lm_head(moe_model *m, float *logits /* [T, V] backend */,
                      const float *x /* [T, H] */, int T);

/* ---- layer-major runs over a batch of sequences (lib/model/run.c) ------------ */

/* Sequences of a layer-major run, their tokens concatenated: sequence s
 * has T[s] tokens at rows off[s] .. off[s] + T[s] - 1 of a [tot, H]
 * activation buffer.  Per-token ops run on all tot rows at once;
 * attention runs per sequence. */
typedef struct {
    int n;
    const int32_t **ids; /* [n] token ids (host) */
    int *T;              /* [n] */
    size_t *off;         /* [n + 1] */
    size_t tot;
    int *seq;            /* [tot] sequence of each row */
} moe_batch;
/* ids[i][0 .. T[i]-1], truncated to max_len tokens when max_len > 0. */
void moe_batch_init(moe_batch *b, int n, const int32_t *const *ids, const int *T, int max_len);
void moe_batch_free(moe_batch *b);
/* x_0 of every sequence (x: [b->tot, H] backend). */
int moe_batch_embed(moe_model *m, const moe_batch *b, float *x);

/* Residency of the layers over layer-major passes, one rule for all
 * callers: a pass loads each layer it runs (its current kind) unless it is
 * loaded, and after use unloads the layers it loaded itself unless keep is
 * set; layers loaded before are left as they are (a caller that preloads
 * every layer keeps them).  keep = moe_model_fits(m): the whole model stays
 * in memory when it fits (see there).  loads counts the layers the passes
 * loaded (a prefetch included). */
typedef struct {
    moe_model *m;
    int keep;
    char *ours;     /* [L] loaded by these passes */
    uint64_t loads;
} moe_residency;
void moe_residency_init(moe_residency *r, moe_model *m, int keep);
/* unloads the layers it loaded unless keep */
void moe_residency_free(moe_residency *r);
/* layer l ready for use: loaded (and counted) if needed; 0 or -1 */
int moe_residency_use(moe_residency *r, int l);
/* done with layer l for this pass: unloaded if ours and not keep */
void moe_residency_done(moe_residency *r, int l);
/* layer l wanted next: prefetched (device backends) if not loaded */
int moe_residency_prefetch(moe_residency *r, int l);
/* The residency policy: 1 when every layer of the model fits in memory
 * with room to spare.  Host backends: when the checkpoint's weights in f32
 * stay under 2 GiB.  Device backends: when the checkpoint's bytes (an upper
 * bound of its BF16 weights) take at most a third of the free device memory,
 * leaving the rest for activations, caches and budgets (an H200 keeps a
 * whole DeepSeekMoE-16B resident, a 24 GB card streams it). */
int moe_model_fits(moe_model *m);
/* 1 when layer l's weights are loaded (or being prefetched). */
int moe_layer_loaded(const moe_model *m, int l);

/* What a layer-major run does around each layer's computation; every
 * member may be NULL. */
typedef struct {
    void *ctx;
    /* before layer l (x: its input) */
    int (*before)(void *ctx, int l, float *x);
    /* replaces the attention of each sequence (eval's shared contexts) */
    int (*attention)(void *ctx, int l, float *x);
    /* after the MLP, before x += y (xn: its input, y: its output) */
    int (*mlp_out)(void *ctx, int l, const float *x, const float *xn, const float *y);
    /* after layer l (x: its output) */
    int (*after)(void *ctx, int l, float *x);
    moe_router_fn router; /* sees the routing of routed-MoE layers */
    void *router_ctx;
} moe_run_hooks;

/* Decoder layers [from, to) of batch b on x ([b->tot, H] backend, in
 * place), layer-major: each layer loaded once (r), its attention per
 * sequence, its MLP on every row; layer l+1 is prefetched while l runs.
 * xn, y: [b->tot, H] scratch of the caller, or NULL (allocated here).
 * h may be NULL.  0 or -1. */
int moe_run_layers(moe_model *m, const moe_batch *b, int from, int to, float *x, float *xn,
                   float *y, moe_residency *r, const moe_run_hooks *h);
/* One decoder layer l of it (loaded by the caller), every sequence: the
 * body of moe_run_layers, for callers that run several batches through a
 * layer while it is loaded (the layer search's candidate streams). */
int moe_run_layer(moe_model *m, const moe_batch *b, int l, float *x, float *xn, float *y,
                  const moe_run_hooks *h);

/* ---- whole-model convenience ----------------------------------------------- */

/* One sequence of a forward call; host memory. */
typedef struct {
    const int32_t *ids; /* [T]; unused when start_layer > 0 */
    int T;
    float *hidden;      /* [L+1, T, H] or NULL: Hugging Face output_hidden_states:
                           [0] embeddings, [i] output of layer i-1 (1 <= i < L),
                           [L] output of the last layer AFTER the final norm.
                           With start_layer > 0, entry [start_layer] is read as
                           the input (required then). */
    float *logits;      /* [T, V] or NULL */
} moe_seq;

/* A batch (moe_batch_init) of n sequences of a forward call: their ids and T. */
void moe_batch_of_seqs(moe_batch *b, const moe_seq *seqs, int n);

/* Run n sequences layer-major (each layer loaded once for all of them):
 * from the embeddings (start_layer 0) or restarting from the cached hidden
 * state hidden[start_layer] (1 <= start_layer <= L; at L only lm_head runs).
 * Layers loaded before the call stay loaded; the others are unloaded after
 * use.  0 or -1. */
int moe_model_forward(moe_model *m, moe_seq *seqs, int n, int start_layer, moe_router_fn cb,
                      void *ctx);

#endif
