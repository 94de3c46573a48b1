/* cpu_bf16.h - the BF16-compute weight GEMMs of cpu_bf16.c, for the
 * "cpu-bf16-compute" table that cpu.c assembles (kernels.h: matmul and
 * experts with BF16 weights, arguments as there). */
#ifndef MOE_CPU_BF16_H
#define MOE_CPU_BF16_H

#include <stdint.h>

void moe_cpu_bf16_matmul(float *y, const float *x, const void *w, const float *bias, int T, int K,
                         int N, int accumulate);
void moe_cpu_bf16_experts(float *out, const float *x, const int32_t *rows, const int32_t *off,
                          const void *const *w_gu, const void *const *w_down, int E, int H, int Im);

/* (cpu.c) the experts with rows and weights, largest row count first (then
 * ascending id) into task; returns their number; *maxr, *macs grow by their
 * largest row count and their multiply-adds */
int moe_cpu_expert_tasks(int *task, const int32_t *off, const void *const *w_gu, int E, int H,
                         int Im, int *maxr, double *macs);

#endif
