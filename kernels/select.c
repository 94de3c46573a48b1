/* select.c - run-time choice of the compute backend (--device), the sticky
 * device-error check, and the CUDA extras of backend_cuda.h.  In builds with
 * CUDA these forward to the plugin build/libcdmoe_cuda.so, loaded on first
 * use (see cuda_plugin.h); without CUDA they say so. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend_cuda.h"
#include "common.h"
#include "cuda_plugin.h"
#include "device.h"
#include "kernels.h"

#ifdef MOE_HAVE_CUDA
#include <dlfcn.h>
#include <limits.h>
#include <unistd.h>

static const moe_cuda_plugin *g_pl;
static moe_device_opts g_dev_opts; /* moe_backend_configure's, for a plugin loaded later */
static int g_pl_tried;
static char g_pl_msg[1024];

static void plugin_error(int kind, const char *msg) { moe_error_set(kind, "%s", msg); }

/* dlopen one candidate; 1 loaded, 0 not there, -1 there but unusable (msg set) */
static int plugin_try(const char *path, int must_exist) {
    if (must_exist && access(path, F_OK) != 0) return 0;
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        const char *e = dlerror();
        if (!must_exist && e && strstr(e, "cannot open shared object file") &&
            strstr(e, MOE_CUDA_PLUGIN_NAME))
            return 0; /* not on the loader's path */
        if (e && strstr(e, path)) /* dlerror names the file already */
            snprintf(g_pl_msg, sizeof g_pl_msg, "cuda: %s", e);
        else
            snprintf(g_pl_msg, sizeof g_pl_msg, "cuda: %s: %s", path, e ? e : "dlopen failed");
        return -1;
    }
    moe_cuda_plugin_open_fn open_fn;
    *(void **)&open_fn = dlsym(h, MOE_CUDA_PLUGIN_SYMBOL);
    const moe_cuda_plugin *p = open_fn ? open_fn(MOE_CUDA_PLUGIN_ABI, plugin_error) : NULL;
    if (!p || p->abi != MOE_CUDA_PLUGIN_ABI || p->size != sizeof(moe_cuda_plugin) ||
        p->backend_size != sizeof(moe_backend) || p->mem_size != sizeof(moe_cuda_mem)) {
        snprintf(g_pl_msg, sizeof g_pl_msg,
                 "cuda: %s: not a CUDA backend plugin of this build (stale? rebuild with make)",
                 path);
        dlclose(h);
        return -1;
    }
    g_pl = p;
    g_pl->configure(&g_dev_opts);
    return 1;
}

/* The plugin, loaded once; NULL with MOE_ERR_DEVICE set when unavailable. */
static const moe_cuda_plugin *plugin(void) {
    if (!g_pl_tried) {
        g_pl_tried = 1;
        int rc = 0;
        const char *env = getenv("MOE_CUDA_PLUGIN");
        if (env && *env) {
            rc = plugin_try(env, 0);
            if (rc == 0)
                snprintf(g_pl_msg, sizeof g_pl_msg, "cuda: MOE_CUDA_PLUGIN=%s: no such file", env);
        } else {
            char exe[PATH_MAX], tried[3][PATH_MAX + 40];
            ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
            int nt = 0;
            if (n > 0) {
                exe[n] = 0;
                char *slash = strrchr(exe, '/');
                if (slash) *slash = 0;
                snprintf(tried[nt++], sizeof tried[0], "%s/%s", exe, MOE_CUDA_PLUGIN_NAME);
                snprintf(tried[nt++], sizeof tried[0], "%s/../lib/cdmoe/%s", exe, MOE_CUDA_PLUGIN_NAME);
                snprintf(tried[nt++], sizeof tried[0], "%s/../%s", exe, MOE_CUDA_PLUGIN_NAME);
            }
            for (int i = 0; i < nt && rc == 0; i++) rc = plugin_try(tried[i], 1);
            if (rc == 0) rc = plugin_try(MOE_CUDA_PLUGIN_NAME, 0);
            if (rc == 0)
                snprintf(g_pl_msg, sizeof g_pl_msg,
                         "cuda: the CUDA backend %s was not found beside the executable%s%.600s, "
                         "in ../lib/cdmoe or on LD_LIBRARY_PATH (set MOE_CUDA_PLUGIN=PATH)",
                         MOE_CUDA_PLUGIN_NAME, nt ? " " : "", nt ? exe : "");
        }
    }
    if (!g_pl) moe_error_set(MOE_ERR_DEVICE, "%s", g_pl_msg);
    return g_pl;
}

/* Cheap check before loading the plugin (which maps cuBLAS): is there a
 * driver with at least one device?  -1: cannot tell (let the plugin probe).
 * MOE_CUDA_EMU=1 (tests: MOE_CUDA_PLUGIN is the CUDA emulator of
 * tests/cudaemu, which needs no driver) skips the check. */
typedef int (*cu_init_fn)(unsigned);
typedef int (*cu_count_fn)(int *);
static int driver_devices(char *msg, size_t msglen) {
    const char *emu = getenv("MOE_CUDA_EMU");
    if (emu && *emu && strcmp(emu, "0") != 0) return -1;
    void *h = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_LOCAL);
    if (!h) {
        const char *e = dlerror();
        if (msg && msglen)
            snprintf(msg, msglen, "no CUDA driver (%s)", e ? e : "libcuda.so.1 not found");
        return 0;
    }
    cu_init_fn init;
    cu_count_fn count;
    *(void **)&init = dlsym(h, "cuInit");
    *(void **)&count = dlsym(h, "cuDeviceGetCount");
    int n = -1;
    if (init && count) {
        int rc = init(0);
        if (rc != 0) {
            if (msg && msglen) snprintf(msg, msglen, "cuInit failed (CUresult %d)", rc);
            n = 0;
        } else if (count(&n) != 0) {
            n = -1;
        } else if (n == 0 && msg && msglen) {
            snprintf(msg, msglen, "the CUDA driver sees no device");
        }
    }
    /* the driver stays loaded: the CUDA runtime will want it again */
    return n;
}

int moe_device_cuda_count(char *msg, size_t msglen) {
    int n = driver_devices(msg, msglen);
    if (n == 0) return 0;
    const moe_cuda_plugin *p = plugin();
    if (!p) {
        if (msg && msglen) snprintf(msg, msglen, "%s", g_pl_msg);
        moe_error_clear();
        return 0;
    }
    return p->probe(msg, msglen);
}

const moe_backend *moe_backend_cuda(void) {
    const moe_cuda_plugin *p = plugin();
    return p ? p->backend() : NULL;
}
const moe_backend *moe_cuda_backend_table(void) {
    const moe_cuda_plugin *p = plugin();
    return p ? p->table() : NULL;
}
int moe_cuda_status(void) { return g_pl ? g_pl->status() : 0; }
void moe_backend_configure(const moe_device_opts *o) {
    if (o->device_index) g_dev_opts.device_index = o->device_index;
    if (o->sync_each_op) g_dev_opts.sync_each_op = o->sync_each_op;
    if (o->f32_compute) g_dev_opts.f32_compute = o->f32_compute;
    if (g_pl) g_pl->configure(o);
}
void moe_cuda_set_precision(int prec) {
    if (plugin()) g_pl->set_precision(prec);
}
void moe_cuda_set_grouped(int on) {
    if (plugin()) g_pl->set_grouped(on);
}
void moe_cuda_matmul_grouped(float *y, const float *x, const void *const *w, const int32_t *off,
                             int G, int K, int N, int accumulate) {
    if (plugin()) g_pl->matmul_grouped(y, x, w, off, G, K, N, accumulate);
}
void moe_cuda_mem_stats(moe_cuda_mem *m) {
    if (g_pl)
        g_pl->mem_stats(m);
    else
        memset(m, 0, sizeof *m);
}
void moe_cuda_mem_reset_peak(void) {
    if (g_pl) g_pl->mem_reset_peak();
}
const char *moe_cuda_device_name(void) { return g_pl ? g_pl->device_name() : "none"; }
void moe_cuda_fill_random(void *d, int dtype, size_t n, uint64_t seed, float scale) {
    if (plugin()) g_pl->fill_random(d, dtype, n, seed, scale);
}
double moe_cuda_gemm_tflops(int M, int N, int K, int f32_out, int iters) {
    return plugin() ? g_pl->gemm_tflops(M, N, K, f32_out, iters) : -1;
}

#else /* builds without CUDA: the extras exist and say so */

int moe_device_cuda_count(char *msg, size_t msglen) {
    if (msg && msglen) snprintf(msg, msglen, "this build has no CUDA backend (nvcc was not found; CUDA=0)");
    return 0;
}
const moe_backend *moe_backend_cuda(void) {
    moe_error_set(MOE_ERR_DEVICE, "cuda: this build has no CUDA backend (nvcc was not found; CUDA=0)");
    return NULL;
}
const moe_backend *moe_cuda_backend_table(void) { return NULL; }
int moe_cuda_status(void) { return 0; }
void moe_backend_configure(const moe_device_opts *o) { (void)o; }
void moe_cuda_set_precision(int prec) { (void)prec; }
void moe_cuda_set_grouped(int on) { (void)on; }
void moe_cuda_matmul_grouped(float *y, const float *x, const void *const *w, const int32_t *off,
                             int G, int K, int N, int accumulate) {
    (void)y, (void)x, (void)w, (void)off, (void)G, (void)K, (void)N, (void)accumulate;
    moe_error_set(MOE_ERR_DEVICE, "cuda: this build has no CUDA backend");
}
void moe_cuda_mem_stats(moe_cuda_mem *m) { memset(m, 0, sizeof *m); }
void moe_cuda_mem_reset_peak(void) {}
const char *moe_cuda_device_name(void) { return "none"; }
void moe_cuda_fill_random(void *d, int dtype, size_t n, uint64_t seed, float scale) {
    (void)d, (void)dtype, (void)n, (void)seed, (void)scale;
}
double moe_cuda_gemm_tflops(int M, int N, int K, int f32_out, int iters) {
    (void)M, (void)N, (void)K, (void)f32_out, (void)iters;
    return -1;
}
#endif

int moe_device_cuda_built(void) {
#ifdef MOE_HAVE_CUDA
    return 1;
#else
    return 0;
#endif
}

const moe_backend *moe_backend_select(const char *device) {
    if (!device || !*device) device = getenv("MOE_DEVICE"); /* the default's override */
    if (device && *device && strcmp(device, "cuda") != 0) return moe_backend_get(device);
    if (device && *device) { /* explicitly "cuda": no fallback */
        if (!moe_device_cuda_built()) {
            moe_error_set(MOE_ERR_DEVICE,
                          "--device cuda: this build has no CUDA backend (rebuild with nvcc "
                          "installed, or use --device cpu)");
            return NULL;
        }
        char why[1024] = "";
        if (moe_device_cuda_count(why, sizeof why) <= 0) {
            moe_error_set(MOE_ERR_DEVICE, "--device cuda: no usable CUDA device (%s)",
                          why[0] ? why : "none visible");
            return NULL;
        }
        return moe_backend_cuda(); /* NULL + MOE_ERR_DEVICE if initialisation fails */
    }
    /* default: cuda when built and a device is visible, else cpu */
    if (!moe_device_cuda_built()) return moe_backend_cpu();
#ifdef MOE_HAVE_CUDA
    if (driver_devices(NULL, 0) == 0) return moe_backend_cpu(); /* no plugin loaded */
    if (!plugin()) { /* a GPU is there but the installation lacks the backend */
        char msg[1100];
        snprintf(msg, sizeof msg, "%s", moe_error());
        moe_error_set(MOE_ERR_DEVICE, "%s (a GPU is visible; --device cpu runs on the CPU)", msg);
        return NULL;
    }
    if (g_pl->probe(NULL, 0) <= 0) return moe_backend_cpu();
    const moe_backend *b = moe_backend_cuda();
    if (!b) {
        char msg[1100];
        snprintf(msg, sizeof msg, "%s", moe_error());
        moe_error_set(MOE_ERR_DEVICE, "%s (a GPU is visible but unusable; --device cpu runs "
                                      "on the CPU)", msg);
    }
    return b;
#else
    return moe_backend_cpu();
#endif
}

int moe_backend_status(const moe_backend *b) { return b && b->status ? b->status() : 0; }

void moe_backend_matmul_grouped(const moe_backend *b, float *y, const float *x,
                                const void *const *w, const int32_t *off, int G, int K, int N,
                                int accumulate) {
#ifdef MOE_HAVE_CUDA
    if (b->name && !strcmp(b->name, "cuda")) {
        moe_cuda_matmul_grouped(y, x, w, off, G, K, N, accumulate);
        return;
    }
#endif
    for (int g = 0; g < G; g++) {
        int n = off[g + 1] - off[g];
        if (n <= 0) continue;
        size_t r0 = (size_t)(off[g] - off[0]);
        b->matmul(y + r0 * N, x + r0 * K, w[g], NULL, n, K, N, accumulate);
    }
}
