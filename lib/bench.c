/* bench.c - the prefill benchmark (see bench.h). */
#include "bench.h"

#include "host.h"

#include <stdlib.h>

/* The prompt: xorshift64 from the seed, modulo the vocabulary. */
static int32_t *random_prompt(uint64_t seed, int n, int vocab_size) {
    int32_t *ids = moe_malloc(sizeof(int32_t) * (size_t)n);
    uint64_t x = seed * 0x9E3779B97F4A7C15ull + 0x2545F4914F6CDD1Dull;
    for (int i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        ids[i] = (int32_t)(x % (uint64_t)vocab_size);
    }
    return ids;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int moe_bench_prefill(moe_model *m, uint64_t params, const moe_bench_opts *bo, const moe_eval_opts *eo,
                      moe_bench_result *r) {
    const moe_config *c = moe_model_config(m);
    int T = bo->tokens;
    int32_t *ids = random_prompt(bo->seed, T + 1, c->vocab_size);
    moe_peak_rss_reset();
    /* keep every layer resident when they fit comfortably (the timing is then
     * compute, as on a GPU holding the model); otherwise stream */
    double ram = moe_ram_bytes();
    r->resident = ram == 0 || (double)params * 4.0 < 0.4 * ram;
    moe_eval_opts o = *eo;
    o.progress = NULL;
    o.batch_tokens = (size_t)T + 1;
    int rc = 0;
    if (r->resident)
        for (int l = 0; l < c->num_layers && rc == 0; l++) rc = moe_layer_load(m, l);
    moe_eval_seq q = {.ids = ids, .T = T + 1, .start = T};
    if (rc == 0) rc = moe_eval_score(m, &q, 1, &o); /* warm-up */
    double *t = moe_malloc(sizeof(double) * (size_t)bo->runs);
    for (int i = 0; i < bo->runs && rc == 0; i++) {
        double t0 = moe_now();
        rc = moe_eval_score(m, &q, 1, &o);
        t[i] = moe_now() - t0;
    }
    if (rc == 0) {
        qsort(t, (size_t)bo->runs, sizeof(double), cmp_double);
        r->seconds = t[0];
        r->tok_per_s = T / r->seconds;
        r->peak_rss_mib = moe_peak_rss_mib();
    }
    for (int l = 0; l < c->num_layers; l++) moe_layer_unload(m, l);
    free(t);
    free(ids);
    return rc;
}
