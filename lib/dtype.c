/* dtype.c - element types and float conversions (see dtype.h). */
#include "dtype.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

/* ---- names and sizes --------------------------------------------------------- */

static const struct {
    const char *st_name, *stream_name; /* stream_name NULL: not a stream dtype */
    int bits;
} dtypes[MOE_DT_COUNT] = {
    [MOE_DT_BOOL] = {"BOOL", NULL, 8},
    [MOE_DT_F4] = {"F4", NULL, 4},
    [MOE_DT_F6_E2M3] = {"F6_E2M3", NULL, 6},
    [MOE_DT_F6_E3M2] = {"F6_E3M2", NULL, 6},
    [MOE_DT_U8] = {"U8", "u8", 8},
    [MOE_DT_I8] = {"I8", "i8", 8},
    [MOE_DT_F8_E5M2] = {"F8_E5M2", NULL, 8},
    [MOE_DT_F8_E4M3] = {"F8_E4M3", NULL, 8},
    [MOE_DT_F8_E8M0] = {"F8_E8M0", NULL, 8},
    [MOE_DT_F8_E4M3FNUZ] = {"F8_E4M3FNUZ", NULL, 8},
    [MOE_DT_F8_E5M2FNUZ] = {"F8_E5M2FNUZ", NULL, 8},
    [MOE_DT_I16] = {"I16", NULL, 16},
    [MOE_DT_U16] = {"U16", NULL, 16},
    [MOE_DT_F16] = {"F16", "f16", 16},
    [MOE_DT_BF16] = {"BF16", "bf16", 16},
    [MOE_DT_I32] = {"I32", "i32", 32},
    [MOE_DT_U32] = {"U32", "u32", 32},
    [MOE_DT_F32] = {"F32", "f32", 32},
    [MOE_DT_C64] = {"C64", NULL, 64},
    [MOE_DT_F64] = {"F64", "f64", 64},
    [MOE_DT_I64] = {"I64", "i64", 64},
    [MOE_DT_U64] = {"U64", NULL, 64},
};

static int known(moe_dtype dt) { return (unsigned)dt < MOE_DT_COUNT; }

const char *moe_dtype_name(moe_dtype dt) {
    return known(dt) && dtypes[dt].stream_name ? dtypes[dt].stream_name : "?";
}

int moe_dtype_from_name(const char *s, size_t len) {
    for (int i = 0; i < MOE_DT_COUNT; i++) {
        const char *n = dtypes[i].stream_name;
        if (n && strlen(n) == len && memcmp(n, s, len) == 0) return i;
    }
    return -1;
}

const char *moe_dtype_st_name(moe_dtype dt) { return known(dt) ? dtypes[dt].st_name : "?"; }

int moe_dtype_from_st_name(const char *s) {
    for (int i = 0; i < MOE_DT_COUNT; i++)
        if (!strcmp(s, dtypes[i].st_name)) return i;
    return -1;
}

int moe_dtype_bits(moe_dtype dt) { return known(dt) ? dtypes[dt].bits : 0; }
size_t moe_dtype_size(moe_dtype dt) { return (size_t)moe_dtype_bits(dt) / 8; }

int moe_dtype_is_float(moe_dtype dt) {
    return dt == MOE_DT_F32 || dt == MOE_DT_F16 || dt == MOE_DT_BF16 || dt == MOE_DT_F64;
}

/* ---- float16 ---------------------------------------------------------------- */

float moe_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
    if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else { /* subnormal: normalise */
            int e = -1;
            do {
                e++;
                man <<= 1;
            } while (!(man & 0x400));
            u = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        u = sign | 0x7f800000u | (man << 13);
    } else {
        u = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

uint16_t moe_f32_to_f16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000, ax = u & 0x7fffffffu;
    if (ax > 0x7f800000u) return (uint16_t)(sign | 0x7e00);
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00); /* rounds to >= 65520: inf */
    if (ax < 0x38800000u) { /* below the smallest normal half */
        /* subnormal half: value = ax_float / 2^-24, rounded to nearest even */
        float a;
        memcpy(&a, &ax, 4);
        float q = a * 16777216.0f; /* 2^24, exact */
        uint32_t m = (uint32_t)q;
        float r = q - (float)m;
        if (r > 0.5f || (r == 0.5f && (m & 1))) m++;
        return (uint16_t)(sign | m);
    }
    uint32_t e = (ax >> 23) - 127 + 15, man = ax & 0x7fffff;
    uint32_t hv = (e << 10) | (man >> 13), rest = man & 0x1fff;
    if (rest > 0x1000 || (rest == 0x1000 && (hv & 1))) hv++;
    return (uint16_t)(sign | hv);
}

/* ---- arrays ------------------------------------------------------------------- */

/* Big conversions (a layer's weights, far larger than the caches) write with
 * non-temporal stores where SSE2 exists: the destination lines are not read
 * first, which halves the time of a bf16 -> f32 conversion of a layer. */
#define STREAM_MIN ((size_t)1 << 18)
#define STREAM_CHUNK ((size_t)1 << 16)

static void bf16_stream(const unsigned char *s, float *dst, size_t n) {
    size_t i = 0;
#if defined(__SSE2__)
    for (; i < n && ((uintptr_t)(dst + i) & 15); i++) {
        uint16_t h;
        memcpy(&h, s + 2 * i, 2);
        dst[i] = moe_bf16_to_f32(h);
    }
    const __m128i z = _mm_setzero_si128();
    for (; i + 8 <= n; i += 8) { /* 8 bf16 -> 8 f32: each in the high half of its word */
        __m128i v = _mm_loadu_si128((const __m128i *)(s + 2 * i));
        _mm_stream_si128((__m128i *)(dst + i), _mm_unpacklo_epi16(z, v));
        _mm_stream_si128((__m128i *)(dst + i + 4), _mm_unpackhi_epi16(z, v));
    }
#endif
    for (; i < n; i++) {
        uint16_t h;
        memcpy(&h, s + 2 * i, 2);
        dst[i] = moe_bf16_to_f32(h);
    }
#if defined(__SSE2__)
    _mm_sfence(); /* order the streamed stores before anyone reads them */
#endif
}

static void bf16_to_f32_array(const unsigned char *s, float *dst, size_t n) {
    if (n >= STREAM_MIN) {
        size_t nc = (n + STREAM_CHUNK - 1) / STREAM_CHUNK;
#pragma omp parallel for schedule(static) if (n > (1u << 20))
        for (size_t c = 0; c < nc; c++) {
            size_t i0 = c * STREAM_CHUNK, m = n - i0 < STREAM_CHUNK ? n - i0 : STREAM_CHUNK;
            bf16_stream(s + 2 * i0, dst + i0, m);
        }
        return;
    }
    for (size_t i = 0; i < n; i++) {
        uint16_t h;
        memcpy(&h, s + 2 * i, 2);
        dst[i] = moe_bf16_to_f32(h);
    }
}

int moe_dtype_to_f32(moe_dtype dt, const void *src, float *dst, size_t n) {
    const unsigned char *s = src;
    switch (dt) {
    case MOE_DT_F32: memcpy(dst, src, n * 4); return 0;
    case MOE_DT_BF16: bf16_to_f32_array(s, dst, n); return 0;
    case MOE_DT_F16:
#pragma omp parallel for schedule(static) if (n > (1u << 20))
        for (size_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, s + 2 * i, 2);
            dst[i] = moe_f16_to_f32(h);
        }
        return 0;
    case MOE_DT_F64:
        for (size_t i = 0; i < n; i++) {
            double d;
            memcpy(&d, s + 8 * i, 8);
            dst[i] = (float)d;
        }
        return 0;
    default: return -1;
    }
}

int moe_dtype_from_f32(moe_dtype dt, const float *src, void *dst, size_t n) {
    uint16_t *d = dst;
    switch (dt) {
    case MOE_DT_F32:
        if (dst != (const void *)src) memmove(dst, src, n * sizeof(float));
        return 0;
    case MOE_DT_BF16:
        for (size_t i = 0; i < n; i++) d[i] = moe_f32_to_bf16(src[i]);
        return 0;
    case MOE_DT_F16:
        for (size_t i = 0; i < n; i++) d[i] = moe_f32_to_f16(src[i]);
        return 0;
    default: return -1;
    }
}
