/* dtype.h - element types, one enum for the whole toolkit: safetensors
 * tensors, moe-stream typed arrays and the weights a backend computes with;
 * their names in both spellings, their sizes, and the exact conversions
 * between float32 and bfloat16 / float16.
 *
 * Header-safe for C and C++ (the CUDA backend includes it via kernels.h). */
#ifndef MOE_DTYPE_H
#define MOE_DTYPE_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* In the safetensors reference enum order: its writer lays tensors out by
 * this order, descending (lib/safetensors.c does the same). */
typedef enum {
    MOE_DT_BOOL, MOE_DT_F4, MOE_DT_F6_E2M3, MOE_DT_F6_E3M2,
    MOE_DT_U8, MOE_DT_I8, MOE_DT_F8_E5M2, MOE_DT_F8_E4M3, MOE_DT_F8_E8M0,
    MOE_DT_F8_E4M3FNUZ, MOE_DT_F8_E5M2FNUZ,
    MOE_DT_I16, MOE_DT_U16, MOE_DT_F16, MOE_DT_BF16,
    MOE_DT_I32, MOE_DT_U32, MOE_DT_F32,
    MOE_DT_C64, MOE_DT_F64, MOE_DT_I64, MOE_DT_U64,
    MOE_DT_COUNT
} moe_dtype;

/* moe-stream spelling ("f32", "bf16"; the typed arrays of moe-stream(5)),
 * "?" for a dtype streams do not carry. */
const char *moe_dtype_name(moe_dtype dt);
int moe_dtype_from_name(const char *s, size_t len); /* stream dtypes only; -1 if unknown */
/* safetensors spelling ("F32", "BF16"). */
const char *moe_dtype_st_name(moe_dtype dt);
int moe_dtype_from_st_name(const char *s);          /* -1 if unknown */
int moe_dtype_bits(moe_dtype dt);                   /* 4, 6, 8, ... 64; 0 if unknown */
size_t moe_dtype_size(moe_dtype dt);                /* bytes; 0 below a byte or unknown */
/* 1 for F32, F16, BF16, F64: the dtypes moe_dtype_to_f32 converts. */
int moe_dtype_is_float(moe_dtype dt);

/* ---- conversions (exact; round to nearest even; NaN stays NaN) ------------ */

static inline float moe_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t moe_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

float moe_f16_to_f32(uint16_t h);
uint16_t moe_f32_to_f16(float f);

/* n elements of dtype dt at src (maybe unaligned) to float32: F32, F16,
 * BF16, F64; -1 (no error set) for another dtype. */
int moe_dtype_to_f32(moe_dtype dt, const void *src, float *dst, size_t n);
/* n float32 to dtype dt at dst: F32, BF16, F16; -1 for another dtype.
 * dst may be src for F32. */
int moe_dtype_from_f32(moe_dtype dt, const float *src, void *dst, size_t n);

#endif
