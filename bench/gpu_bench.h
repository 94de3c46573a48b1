/* gpu_bench.h - what the GPU benchmark drivers (bench/gpu_*.c) share: random
 * token ids (splitmix64, deterministic in the seed) and the check that a
 * CUDA device is there.  Header only: each driver is one .c file. */
#ifndef MOE_GPU_BENCH_H
#define MOE_GPU_BENCH_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "device.h"

static uint64_t rng_state = 1;
static inline uint32_t next_u32(void) {
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return (uint32_t)((z ^ (z >> 31)) >> 32);
}

/* n sequences of T random ids below V (each malloc'd) */
static inline int32_t **random_ids(int n, int T, int V) {
    int32_t **ids = malloc(sizeof *ids * (size_t)n);
    for (int s = 0; s < n; s++) {
        ids[s] = malloc(sizeof(int32_t) * (size_t)T);
        for (int t = 0; t < T; t++) ids[s][t] = (int32_t)(next_u32() % (uint32_t)V);
    }
    return ids;
}

/* 1 when no CUDA device is visible, after printing the SKIP line (exit 77) */
static inline int no_cuda_device(void) {
    char why[256] = "";
    if (moe_device_cuda_count(why, sizeof why) > 0) return 0;
    printf("SKIP: no CUDA device (%s)\n", why[0] ? why : "none visible");
    return 1;
}

#endif
