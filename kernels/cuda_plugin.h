/* cuda_plugin.h - the interface between the library and the CUDA backend
 * when the latter is a shared object (build/libcdmoe_cuda.so).
 *
 * Why a plugin: loading cuBLAS (libcublasLt) costs ~210 MB of resident
 * memory at process start, whether or not a GPU is used.  The tools link
 * none of CUDA; kernels/select.c dlopen()s the plugin only when the CUDA
 * backend is actually asked for (--device cuda, or the default with a GPU
 * visible to the driver), so CPU runs pay nothing.
 *
 * The plugin exports one symbol, moe_cuda_plugin_open; everything else in it
 * is hidden.  The library hands it a callback for errors (the plugin has no
 * copy of lib/common.c: the error state is the tool's).  The plugin refuses
 * to load when its view of the structures differs (abi, sizes): a stale .so
 * from an older kernels.h gives an error instead of NULL op pointers.
 *
 * Where the library looks for it (first found wins):
 *   $MOE_CUDA_PLUGIN (a path), then, with D the directory of the running
 *   executable (/proc/self/exe): D/libcdmoe_cuda.so (in-tree: bin/, beside
 *   the tools), D/../lib/cdmoe/libcdmoe_cuda.so (make install),
 *   D/../libcdmoe_cuda.so (build/tests, build/bench), then plain
 *   "libcdmoe_cuda.so" through the dynamic loader's path (LD_LIBRARY_PATH). */
#ifndef MOE_CUDA_PLUGIN_H
#define MOE_CUDA_PLUGIN_H

#include <stddef.h>
#include <stdint.h>

#include "backend_cuda.h"
#include "kernels.h"

#ifdef __cplusplus
extern "C" {
#endif

#define MOE_CUDA_PLUGIN_ABI 5 /* 2: kernels.h's asynchronous upload ops and trim; 3: mem_info;
                               * 4: matmul_f32; 5: mem_used, status, configure */
#define MOE_CUDA_PLUGIN_NAME "libcdmoe_cuda.so"
#define MOE_CUDA_PLUGIN_SYMBOL "moe_cuda_plugin_open"

typedef struct {
    int abi;             /* MOE_CUDA_PLUGIN_ABI */
    size_t size;         /* sizeof(moe_cuda_plugin) */
    size_t backend_size; /* sizeof(moe_backend) */
    size_t mem_size;     /* sizeof(moe_cuda_mem) */
    /* number of usable devices, or 0 with the reason in msg (moe_device_cuda_count) */
    int (*probe)(char *msg, size_t msglen);
    /* the op table, every entry set, without touching the device (checks only) */
    const moe_backend *(*table)(void);
    /* the rest: as the moe_* functions of backend_cuda.h */
    const moe_backend *(*backend)(void);
    int (*status)(void);
    void (*set_precision)(int prec);
    void (*set_grouped)(int on);
    void (*matmul_grouped)(float *y, const float *x, const void *const *w, const int32_t *off,
                           int G, int K, int N, int accumulate);
    void (*mem_stats)(moe_cuda_mem *m);
    void (*mem_reset_peak)(void);
    double (*gemm_tflops)(int M, int N, int K, int f32_out, int iters);
    void (*fill_random)(void *d, int dtype, size_t n, uint64_t seed, float scale);
    const char *(*device_name)(void);
    /* moe_backend_configure (kernels.h); called once at load and on each call */
    void (*configure)(const moe_device_opts *o);
} moe_cuda_plugin;

/* error callback: kind MOE_ERR_*, one line */
typedef void (*moe_cuda_error_fn)(int kind, const char *msg);
typedef const moe_cuda_plugin *(*moe_cuda_plugin_open_fn)(int abi, moe_cuda_error_fn err);

#ifdef __cplusplus
}
#endif

#endif
