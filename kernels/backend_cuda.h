/* backend_cuda.h - the CUDA backend (kernels/cuda/), run-time device
 * selection (kernels/select.c) and the CUDA-only extras around the common
 * interface of kernels.h.  The backend itself is a plugin,
 * libcdmoe_cuda.so, loaded on first use (kernels/cuda_plugin.h); these
 * functions are always linked and forward to it.
 *
 * Device errors.  kernels.h says an op never fails, so a CUDA or cuBLAS error
 * inside an op cannot be returned.  Instead the backend is *sticky*: the
 * first failing call records one line with moe_error_set(MOE_ERR_DEVICE,
 * "cuda: FILE:LINE: EXPRESSION: ERROR (text)"), every later op becomes a
 * no-op (download fills its destination with zeros, alloc hands out a dummy
 * pointer), and moe_backend_status() / moe_cuda_status() return -1 and set
 * the error again.  Callers check it after `sync` (at least once per layer
 * and before writing any output), and a tool then exits with code 4 through
 * moe_cli_fail().  Out of GPU memory in `alloc` is such an error too
 * ("cuda: out of device memory allocating N MiB (free F of T MiB)").
 * Kernel launches are asynchronous, so an illegal access is reported by the
 * next checked call; moe_device_opts.sync_each_op (MOE_CUDA_SYNC=1)
 * synchronises after every op so that the message names the op that failed.
 *
 * Precision.  Weights are BF16 on the device (weight_dtype MOE_DT_BF16).
 * matmul rounds the f32 activations to BF16 (one small kernel) and runs
 * cublasGemmEx with BF16 A/B, FP32 C and CUBLAS_COMPUTE_32F: full tensor-core
 * rate, FP32 accumulation, and the activation rounding is the same as a BF16
 * PyTorch model's.  moe_cuda_set_precision(MOE_CUDA_PREC_F32) instead widens
 * the weight to f32 and runs an FP32 GEMM without TF32 (slow; for parity
 * checks against the CPU backend).  `experts` likewise rounds the gathered
 * rows and SwiGLU's output (the inputs of its two grouped GEMMs) to BF16;
 * `matmul_backward` rounds dy and x likewise (dx = dy·W with the BF16 W,
 * dW = dyᵀ·x, FP32 accumulation into the float32 gradients);
 * `combine` rounds as the CPU op does (same bytes).  Every other op computes
 * in fp32 with the CPU op's formulas (double where the CPU op uses double).
 *
 * Memory: cudaMallocAsync on the backend's one stream (a pool that keeps
 * freed blocks for the next layer); upload/copy/zero are stream-ordered,
 * download waits.  divergence also accepts a host output array (it then
 * copies back and waits), since per-token results are read on the host.
 * Weights: upload_async copies from pinned host memory (host_alloc) on a
 * second stream, each copy ordered after the compute stream's work issued
 * before it; upload_fence makes the compute stream wait for them (events,
 * the host does not wait); upload_wait waits for a ticket's event.  The
 * grouped GEMM keeps its host arguments in event-guarded pinned sets (no
 * synchronisation per call); trim frees the big scratch buffers (experts,
 * BF16 activation copies) and trims the memory pool.
 * Ops are not thread-safe (one stream, shared scratch): call from one thread.
 * Per-row results may depend on how many rows share a GEMM (cuBLAS picks
 * kernels by shape), unlike the padded CPU GEMM.
 *
 * Settings: moe_backend_configure (kernels.h: which device, sync after
 * every op as above, f32 GEMMs as moe_cuda_set_precision); the tools take
 * them from MOE_CUDA_DEVICE, MOE_CUDA_SYNC and MOE_CUDA_PRECISION through
 * moe_model_opts_from_env (README.md, "Environment"). */
#ifndef MOE_BACKEND_CUDA_H
#define MOE_BACKEND_CUDA_H

#include <stddef.h>
#include <stdint.h>

#include "kernels.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The CUDA backend, initialised on first call (device, stream, cuBLAS).
 * NULL + MOE_ERR_DEVICE error when the build has no CUDA or no device is
 * usable. */
const moe_backend *moe_backend_cuda(void);

/* The CUDA backend's op table without initialising any device (NULL when
 * the build has no CUDA or the plugin cannot be loaded): for checks that
 * every op is set.  Do not call its ops before moe_backend_cuda(). */
const moe_backend *moe_cuda_backend_table(void);

/* moe_backend_select() and moe_backend_status() are declared in kernels.h
 * (the library asks the table, not this header).  Backend for --device NAME:
 * "cpu", "cpu-ref", "cuda", or NULL/"" for the default:
 * $MOE_DEVICE when set (tests/run.sh sets cpu, so that the suite's
 * golden outputs hold on GPU machines too), else cuda when built with CUDA
 * and a device is visible, else cpu.  The default probes the CUDA driver
 * (libcuda.so.1) first and loads the CUDA plugin only when it sees a device.
 * An explicit "cuda" that is unavailable gives NULL + MOE_ERR_DEVICE (exit
 * code 4); an unknown name NULL + MOE_ERR_DATA.  Never falls back silently. */

/* The CUDA backend's status (the table's `status` op). */
int moe_cuda_status(void);

enum { MOE_CUDA_PREC_BF16 = 0, MOE_CUDA_PREC_F32 = 1 };
void moe_cuda_set_precision(int prec);

/* Grouped GEMM for routed experts (tokens sorted by expert): for each group
 * g with off[g] < off[g+1], rows off[g]..off[g+1]-1 of y get
 *   y = x·W_gᵀ  (or y += ... when accumulate)
 * in one cublasGemmGroupedBatchedEx call (a loop of cublasGemmEx when the
 * library refuses the types).  x [off[G], K], y [off[G], N] device; w and
 * off are HOST arrays ([G] device weight pointers in BF16, [G+1] offsets).
 * The model does not call it: it uses the `experts` op of kernels.h, which
 * runs the same grouped call for gate/up and for down.  Kept for tests and
 * bench/gpu_moe_layer.c. */
void moe_cuda_matmul_grouped(float *y, const float *x, const void *const *w, const int32_t *off,
                             int G, int K, int N, int accumulate);

/* The same for any backend, usable by the model (lib/model/) without a change to
 * kernels.h: the CUDA backend's grouped GEMM, else a loop of b->matmul over
 * the non-empty groups (same results as calling matmul per expert). */
void moe_backend_matmul_grouped(const moe_backend *b, float *y, const float *x,
                                const void *const *w, const int32_t *off, int G, int K, int N,
                                int accumulate);

/* 0: always use the loop of cublasGemmEx in moe_cuda_matmul_grouped (tests
 * compare both paths); 1: try the grouped call again (default). */
void moe_cuda_set_grouped(int on);

/* Device memory: live and peak bytes allocated through this backend's
 * alloc (scratch included), and cudaMemGetInfo's view (free/total, all
 * users).  moe_cuda_mem_reset_peak() sets peak = live. */
typedef struct {
    size_t live, peak;  /* this backend */
    size_t free, total; /* the device */
    size_t used_peak;   /* max (total - free) seen at alloc time */
} moe_cuda_mem;
void moe_cuda_mem_stats(moe_cuda_mem *m);
void moe_cuda_mem_reset_peak(void);

/* Benchmark helper: TFLOP/s of cuBLAS BF16 GEMMs (M×K)·(K×N) on random data,
 * FP32 accumulation, output BF16 (f32_out 0) or FP32 (1), mean of iters
 * after 3 warm-ups (CUDA events).  -1 on error.  No-CUDA builds: -1. */
double moe_cuda_gemm_tflops(int M, int N, int K, int f32_out, int iters);

/* Benchmark helper: uniform random values in [-scale, scale) (dtype
 * MOE_DT_F32 or MOE_DT_BF16), device memory, deterministic in seed. */
void moe_cuda_fill_random(void *d, int dtype, size_t n, uint64_t seed, float scale);

/* Name of the device in use ("NVIDIA H200, sm_90, 132 SMs, 139.8 GiB"). */
const char *moe_cuda_device_name(void);

#ifdef __cplusplus
}
#endif

#endif
