/* bench.h - the prefill benchmark of moe-eval --bench: one random prompt
 * scored a few times, the fastest run reported with the peak resident
 * memory.  Library rules: nothing printed, errors through moe_error_set(). */
#ifndef MOE_BENCH_H
#define MOE_BENCH_H

#include "eval.h"

typedef struct {
    int tokens;    /* prompt length */
    int runs;      /* timed runs after one warm-up */
    uint64_t seed; /* the prompt's token ids */
} moe_bench_opts;

typedef struct {
    double seconds;      /* the fastest run: the least disturbed by other load */
    double tok_per_s;
    double peak_rss_mib;
    int resident;        /* 1: every layer kept loaded (it fits in 40% of RAM) */
} moe_bench_result;

/* Benchmark m, whose weights have `params` parameters; eo gives the
 * evaluation options (its progress and batch size are the benchmark's own).
 * Every layer is unloaded afterwards.  0 or -1. */
int moe_bench_prefill(moe_model *m, uint64_t params, const moe_bench_opts *o, const moe_eval_opts *eo,
                      moe_bench_result *r);

#endif
