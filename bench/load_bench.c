/* load_bench.c - timing driver for bench/load.sh (not installed).
 *
 *   load_bench MODEL LAYER [REPS]
 *
 * Time of moe_layer_load(LAYER) + moe_layer_unload on a device-like backend
 * run on the CPU: the CPU op table with host_memory 0 and BF16 weights, so
 * the model takes its device load path (host staging, then `upload`, here a
 * memcpy into separate memory, standing in for the host -> GPU copy).  The
 * whole layer's experts are staged (expert cache unlimited).  Two models open
 * in the same process, loading alternately, best of REPS each:
 *   old: MOE_STAGE_F32=1 (checkpoint -> f32 host buffer -> BF16 host buffer ->
 *        synchronous upload; experts one after another);
 *   new: BF16 bytes staged as they are through the staging ring,
 *        upload_async (the CPU table's: a memcpy).
 * Prints key=value lines: old_s, new_s, ratio (old / new), the same for the
 * host staging alone (old_stage_s, new_stage_s, stage_ratio: the stand-in
 * copies not done, as a GPU's copy engine does them in parallel), layer_bytes. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "kernels.h"
#include "model.h"

static moe_backend dev, dev_nocopy;

/* the "device" of the staging-only figures: copies are not done (on a GPU
 * the copy engine does them while the host stages the next piece) */
static void nocopy(void *d, const void *s, size_t n) { (void)d, (void)s, (void)n; }
static uint64_t nocopy_ticket;
static uint64_t nocopy_async(void *d, const void *s, size_t n) {
    (void)d, (void)s, (void)n;
    return ++nocopy_ticket;
}

static moe_model *open_variant(const char *dir, int old_path, moe_backend *be) {
    if (old_path)
        setenv("MOE_STAGE_F32", "1", 1);
    else
        unsetenv("MOE_STAGE_F32");
    moe_model_opts o = {.backend = be, .expert_cache_bytes = (size_t)-1};
    moe_model_opts_from_env(&o); /* MOE_STAGE_F32=1 (bench/load.sh) */
    moe_model *m = moe_model_open(dir, &o);
    unsetenv("MOE_STAGE_F32");
    if (!m) {
        fprintf(stderr, "load_bench: %s\n", moe_error());
        exit(1);
    }
    return m;
}

/* one load of the layer (weights staged, uploaded, ready for ops) */
static double time_load(moe_model *m, int layer) {
    double t = moe_now();
    if (moe_layer_load(m, layer) < 0) {
        fprintf(stderr, "load_bench: %s\n", moe_error());
        exit(1);
    }
    dev.sync();
    t = moe_now() - t;
    moe_layer_unload(m, layer);
    return t;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: load_bench MODEL LAYER [REPS]\n");
        return 2;
    }
    int layer = atoi(argv[2]), reps = argc > 3 ? atoi(argv[3]) : 3;
    moe_model_set_threads(0);
    dev = *moe_backend_cpu();
    dev.name = "cpu-as-device";
    dev.host_memory = 0;
    dev.weight_dtype = MOE_DT_BF16;
    /* Both models stay open: as in a layer-major pass, the blocks freed by an
     * unload are reused by the next load (the model's pool) and the staging
     * ring is allocated once; the first load of each (page faults of fresh
     * memory) is not timed. */
    dev_nocopy = dev;
    dev_nocopy.upload = nocopy;
    dev_nocopy.upload_async = nocopy_async;
    moe_model *mv[4] = {open_variant(argv[1], 1, &dev), open_variant(argv[1], 0, &dev),
                        open_variant(argv[1], 1, &dev_nocopy), open_variant(argv[1], 0, &dev_nocopy)};
    const moe_config *c = moe_model_config(mv[1]);
    size_t bytes = (size_t)c->n_routed_experts * 3 * c->moe_intermediate_size * c->hidden_size * 2;
    double best[4] = {1e30, 1e30, 1e30, 1e30};
    for (int v = 0; v < 4; v++) time_load(mv[v], layer);
    for (int r = 0; r < reps; r++)
        for (int v = 0; v < 4; v++) {
            double t = time_load(mv[v], layer);
            if (t < best[v]) best[v] = t;
        }
    printf("old_s=%.3f\nnew_s=%.3f\nratio=%.2f\nold_stage_s=%.3f\nnew_stage_s=%.3f\n"
           "stage_ratio=%.2f\nlayer_bytes=%zu\n",
           best[0], best[1], best[0] / best[1], best[2], best[3], best[2] / best[3], bytes);
    for (int v = 0; v < 4; v++) moe_model_close(mv[v]);
    return 0;
}
