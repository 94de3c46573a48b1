/* cpu_bf16.c - BF16 compute on the CPU ("--precision bf16"): the weight
 * GEMMs (matmul, experts) of the "cpu-bf16-compute" table.
 *
 * Semantics: weights are BF16 as stored; each GEMM's activation input is
 * rounded to BF16 (nearest even; a denormal becomes zero, as the AVX512-BF16
 * conversion does); products are summed in float32, one accumulator per
 * output, over k in ascending pairs.  Everything else (norms, attention,
 * softmax, router, SwiGLU, residual stream) stays float32 in the other ops.
 *
 * Why our own kernel: Debian's OpenBLAS (0.3.21) is built without sbgemm,
 * the CPUs at hand (AMD Zen 4) have AVX512-BF16 but no AMX, and oneDNN
 * would be a new dependency whose blocking we could not make row- and
 * thread-invariant.  The kernel is the one instruction VDPBF16PS (16 lanes,
 * each adds two BF16 products to a float32) in a register-blocked loop:
 * MR weight rows x up to 3 x 16 tokens of accumulators, the weight pair
 * broadcast straight from W (so W, a [N, K] matrix read in place from the
 * checkpoint mapping, is never packed) and the tokens' pairs packed, once
 * per call, into panels of 16 tokens.  Since every output element is one
 * accumulator that sees k in the same order whatever the tiling, results
 * are independent of the number of rows, of their batching and of the
 * thread count by construction.
 *
 * Without AVX512-BF16 (detected at run time) the same loops run in portable
 * C, computing each VDPBF16PS exactly as the hardware does (the odd product
 * added first, then the even one; checked by test_kernels.c), so the two
 * paths give the same bits on normal numbers -- only much slower.
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__)
#include <immintrin.h>
#define HAVE_X86 1
#endif

#include "common.h"
#include "cpu_bf16.h"
#include "kernels.h"

#define MR 8     /* weight rows (output features) per micro-tile */
#define PANEL 16 /* tokens per packed panel (one 512-bit vector of float32) */
#define NV 3     /* panels per micro-tile: 48 tokens */
#define TASK_PANELS 12 /* tokens per parallel task: 192 (their packed pairs stay in L2) */
#define TASK_ROWS 128  /* weight rows per parallel task */

/* ---- ISA selection ------------------------------------------------------- */

static int g_native = -1; /* -1: not yet detected */

static int detect_native(void) {
#ifdef HAVE_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") ? 1 : 0;
#else
    return 0;
#endif
}

int moe_cpu_bf16_native(void) {
    if (g_native < 0) g_native = detect_native();
    return g_native;
}

void moe_cpu_bf16_force_portable(int portable) { g_native = portable ? 0 : detect_native(); }

/* ---- BF16 rounding ------------------------------------------------------- */

/* f32 -> bf16 bits as VCVTNE2PS2BF16: nearest even, a denormal becomes a
 * signed zero, NaN stays NaN */
static inline uint32_t round_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7f800000u) == 0) return (u >> 16) & 0x8000u;
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u;
    u += 0x7fffu + ((u >> 16) & 1u);
    return u >> 16;
}

/* bf16 bits -> f32 as VDPBF16PS reads its inputs: a denormal is zero */
static inline float widen_daz(uint32_t h) {
    uint32_t u = (h & 0x7f80u) ? h << 16 : (h & 0x8000u) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* ---- packing of the activations ------------------------------------------
 * A panel holds 16 tokens' BF16 pairs k-pair-major: p[kp·16 + j] = token j's
 * (x[2kp], x[2kp+1]) as one 32-bit word, low half first (the order VDPBF16PS
 * pairs them); K odd: the last pair's high half is 0.  Missing tokens of the
 * last panel are zero. */

/* one token's row as K2 pairs (portable) */
static void pairs_portable(uint32_t *dst, const float *x, int K) {
    int K2 = K / 2;
    for (int kp = 0; kp < K2; kp++) dst[kp] = round_bf16(x[2 * kp]) | round_bf16(x[2 * kp + 1]) << 16;
    if (K & 1) dst[K2] = round_bf16(x[K - 1]);
}

#ifdef HAVE_X86
__attribute__((target("avx512f,avx512bf16"))) static void pairs_native(uint32_t *dst, const float *x,
                                                                     int K) {
    int k = 0;
    for (; k + 32 <= K; k += 32) {
        __m512bh b = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + k + 16), _mm512_loadu_ps(x + k));
        _mm512_storeu_si512(dst + k / 2, (__m512i)b);
    }
    pairs_portable(dst + k / 2, x + k, K - k);
}
#endif

/* the panel of tokens t0..t0+nt-1 (nt <= 16) of x (row stride ldx), token t
 * read from row rows[t] when rows is given; tmp: K2 words */
static void pack_panel(uint32_t *p, uint32_t *tmp, const float *x, size_t ldx,
                       const int32_t *rows, int t0, int nt, int K) {
    int K2 = (K + 1) / 2;
    for (int j = 0; j < PANEL; j++) {
        if (j >= nt) {
            for (int kp = 0; kp < K2; kp++) p[(size_t)kp * PANEL + j] = 0;
            continue;
        }
        size_t r = rows ? (size_t)rows[t0 + j] : (size_t)(t0 + j);
#ifdef HAVE_X86
        if (g_native > 0)
            pairs_native(tmp, x + r * ldx, K);
        else
#endif
            pairs_portable(tmp, x + r * ldx, K);
        for (int kp = 0; kp < K2; kp++) p[(size_t)kp * PANEL + j] = tmp[kp];
    }
}

/* per-thread grow-only buffers (they stay in cache call after call) */
enum { BUF_PACK, BUF_PAIRS, BUF_GU, BUF_H, BUF_COUNT };
static __thread void *tls_buf[BUF_COUNT];
static __thread size_t tls_cap[BUF_COUNT];
static void *tbuf(int i, size_t bytes) {
    if (tls_cap[i] < bytes) {
        free(tls_buf[i]);
        tls_buf[i] = NULL;
        if (posix_memalign(&tls_buf[i], 64, bytes) != 0) tls_buf[i] = moe_malloc(bytes); /* aborts */
        tls_cap[i] = bytes;
    }
    return tls_buf[i];
}

/* ---- micro-kernels --------------------------------------------------------
 * y[t, n0+i] (+)= Σ_kp dot(W[n0+i] pair kp, token t pair kp) for i < mr and
 * the nt (<= 48) tokens of nv consecutive panels. */

typedef struct {
    float *y;
    size_t ldy;
    const uint32_t *xp; /* first panel */
    size_t pstride;     /* words between panels: K2·16 */
    const uint16_t *w;  /* row n0 of W */
    int K, nt, accumulate;
} utile;

/* write an accumulator (16 tokens of one output feature) to y */
static inline void store_lanes(const utile *u, const float *acc, int i, int v) {
    for (int j = 0; j < PANEL; j++) {
        int t = v * PANEL + j;
        if (t >= u->nt) break;
        float *o = u->y + (size_t)t * u->ldy + i;
        *o = u->accumulate ? *o + acc[j] : acc[j];
    }
}

/* the weight pair kp of row i, as VDPBF16PS takes it (K odd: 0 beyond K) */
static inline uint32_t wpair(const uint16_t *w, int K, int i, int kp) {
    const uint16_t *r = w + (size_t)i * K + 2 * kp;
    if (2 * kp + 1 < K) {
        uint32_t v;
        memcpy(&v, r, 4);
        return v;
    }
    return r[0];
}

/* portable: the same arithmetic, lane by lane */
static void tile_portable(const utile *u, int mr, int nv) {
    int K2 = (u->K + 1) / 2;
    float acc[MR][NV * PANEL];
    memset(acc, 0, sizeof acc);
    for (int kp = 0; kp < K2; kp++) {
        for (int i = 0; i < mr; i++) {
            uint32_t a = wpair(u->w, u->K, i, kp);
            float alo = widen_daz(a & 0xffffu), ahi = widen_daz(a >> 16);
            for (int v = 0; v < nv; v++) {
                const uint32_t *b = u->xp + v * u->pstride + (size_t)kp * PANEL;
                float *s = acc[i] + v * PANEL;
                for (int j = 0; j < PANEL; j++) {
                    s[j] += ahi * widen_daz(b[j] >> 16); /* products of BF16 are exact */
                    s[j] += alo * widen_daz(b[j] & 0xffffu);
                }
            }
        }
    }
    for (int i = 0; i < mr; i++)
        for (int v = 0; v < nv; v++) store_lanes(u, acc[i] + v * PANEL, i, v);
}

#ifdef HAVE_X86
/* AVX512-BF16: MR_ x NV_ accumulators in registers (constants after inlining) */
__attribute__((target("avx512f,avx512bf16"), always_inline)) static inline void
tile_avx(const utile *u, const int MR_, const int NV_) {
    int K2 = u->K / 2; /* whole pairs; an odd K's last element below */
    __m512 acc[MR][NV];
#pragma GCC unroll 8
    for (int i = 0; i < MR_; i++)
#pragma GCC unroll 3
        for (int v = 0; v < NV_; v++) acc[i][v] = _mm512_setzero_ps();
    const uint16_t *w = u->w;
    size_t K = (size_t)u->K;
    for (int kp = 0; kp < K2; kp++) {
        __m512bh b[NV];
#pragma GCC unroll 3
        for (int v = 0; v < NV_; v++)
            b[v] = (__m512bh)_mm512_loadu_si512(u->xp + v * u->pstride + (size_t)kp * PANEL);
#pragma GCC unroll 8
        for (int i = 0; i < MR_; i++) {
            uint32_t a;
            memcpy(&a, w + i * K + 2 * (size_t)kp, 4);
            __m512bh av = (__m512bh)_mm512_set1_epi32((int)a);
#pragma GCC unroll 3
            for (int v = 0; v < NV_; v++) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], av, b[v]);
        }
    }
    if (u->K & 1) {
        __m512bh b[NV];
        for (int v = 0; v < NV_; v++)
            b[v] = (__m512bh)_mm512_loadu_si512(u->xp + v * u->pstride + (size_t)K2 * PANEL);
        for (int i = 0; i < MR_; i++) {
            __m512bh av = (__m512bh)_mm512_set1_epi32((int)w[i * K + K - 1]);
            for (int v = 0; v < NV_; v++) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], av, b[v]);
        }
    }
    float lanes[PANEL];
    for (int i = 0; i < MR_; i++)
        for (int v = 0; v < NV_; v++) {
            _mm512_storeu_ps(lanes, acc[i][v]);
            store_lanes(u, lanes, i, v);
        }
}

#define TILE_NV(m)                                                                    \
    __attribute__((target("avx512f,avx512bf16"))) static void tile_avx_##m(const utile *u, \
                                                                         int nv) {    \
        if (nv == 3)                                                                  \
            tile_avx(u, m, 3);                                                        \
        else if (nv == 2)                                                             \
            tile_avx(u, m, 2);                                                        \
        else                                                                          \
            tile_avx(u, m, 1);                                                        \
    }
TILE_NV(1)
TILE_NV(2)
TILE_NV(4)
TILE_NV(8)

/* mr rows as tiles of 8, 4, 2, 1 (a row's arithmetic is the same in each) */
static void tile_native(utile u, int mr, int nv) {
    static void (*const fn[4])(const utile *, int) = {tile_avx_1, tile_avx_2, tile_avx_4,
                                                      tile_avx_8};
    while (mr > 0) {
        int lg = mr >= 8 ? 3 : mr >= 4 ? 2 : mr >= 2 ? 1 : 0, m = 1 << lg;
        fn[lg](&u, nv);
        u.y += m;
        u.w += (size_t)m * u.K;
        mr -= m;
    }
}
#endif

/* ---- blocks ------------------------------------------------------------- */

/* y[t0.., n0..n1) for tokens [t0, t0 + nt) whose panels start at xp (panel
 * of token t0); W rows n0..n1-1 */
static void gemm_block(float *y, size_t ldy, const uint32_t *xp, int nt, const uint16_t *w, int K,
                       int n0, int n1, int accumulate) {
    size_t pstride = (size_t)(K + 1) / 2 * PANEL;
    for (int n = n0; n < n1; n += MR) {
        int mr = n1 - n < MR ? n1 - n : MR;
        for (int t = 0; t < nt; t += NV * PANEL) {
            int tc = nt - t < NV * PANEL ? nt - t : NV * PANEL;
            utile u = {y + (size_t)t * ldy + n, ldy, xp + (size_t)(t / PANEL) * pstride, pstride,
                       w + (size_t)n * K, K, tc, accumulate};
            int nv = (tc + PANEL - 1) / PANEL;
#ifdef HAVE_X86
            if (g_native > 0) {
                tile_native(u, mr, nv);
                continue;
            }
#endif
            tile_portable(&u, mr, nv);
        }
    }
}

/* pack the T tokens of x (rows[] or consecutive) into panels at xp */
static void pack_all(uint32_t *xp, const float *x, size_t ldx, const int32_t *rows, int T, int K,
                     int parallel) {
    int np = (T + PANEL - 1) / PANEL;
    size_t pstride = (size_t)(K + 1) / 2 * PANEL;
#pragma omp parallel for schedule(static) if (parallel && np > 1)
    for (int p = 0; p < np; p++) {
        uint32_t *tmp = tbuf(BUF_PAIRS, sizeof(uint32_t) * ((size_t)K / 2 + 1));
        int nt = T - p * PANEL < PANEL ? T - p * PANEL : PANEL;
        pack_panel(xp + (size_t)p * pstride, tmp, x, ldx, rows, p * PANEL, nt, K);
    }
}

/* ---- the ops ----------------------------------------------------------- */

void moe_cpu_bf16_matmul(float *y, const float *x, const void *wv, const float *bias, int T, int K,
                         int N, int accumulate) {
    if (T <= 0 || N <= 0) return;
    moe_cpu_bf16_native();
    if (K <= 0) {
        if (!accumulate) memset(y, 0, sizeof(float) * (size_t)T * N);
    } else {
        int np = (T + PANEL - 1) / PANEL;
        size_t pstride = (size_t)(K + 1) / 2 * PANEL;
        uint32_t *xp = tbuf(BUF_PACK, sizeof(uint32_t) * pstride * np);
        int big = (double)T * N * K > 2e6;
        pack_all(xp, x, (size_t)K, NULL, T, K, big);
        int ntg = (np + TASK_PANELS - 1) / TASK_PANELS, nnb = (N + TASK_ROWS - 1) / TASK_ROWS;
        /* tasks: token groups outermost, so that consecutive tasks of a thread
         * share the packed tokens; every task computes whole outputs */
#pragma omp parallel for schedule(dynamic, 1) if (big && ntg * nnb > 1)
        for (int i = 0; i < ntg * nnb; i++) {
            int g = i / nnb, b = i % nnb;
            int t0 = g * TASK_PANELS * PANEL, nt = T - t0 < TASK_PANELS * PANEL ? T - t0 : TASK_PANELS * PANEL;
            int n0 = b * TASK_ROWS, n1 = N - n0 < TASK_ROWS ? N : n0 + TASK_ROWS;
            gemm_block(y + (size_t)t0 * N, (size_t)N, xp + (size_t)(t0 / PANEL) * pstride, nt, wv, K,
                       n0, n1, accumulate);
        }
    }
    if (bias) {
#pragma omp parallel for schedule(static) if ((size_t)T * N > 65536)
        for (int t = 0; t < T; t++)
            for (int n = 0; n < N; n++) y[(size_t)t * N + n] += bias[n];
    }
}

/* One expert: its rows gathered and packed, [g | u] = W_gu·x (BF16 inputs),
 * h = silu(g)·u in float32, out = W_down·h (h rounded to BF16 by its packing). */
static void expert_bf16(float *out, const float *x, const int32_t *rows, int nr, const void *w_gu,
                        const void *w_down, int H, int Im) {
    size_t np = (size_t)(nr + PANEL - 1) / PANEL, kmax = (size_t)(H > Im ? H : Im);
    uint32_t *xp = tbuf(BUF_PACK, sizeof(uint32_t) * np * ((kmax + 1) / 2) * PANEL);
    float *g = tbuf(BUF_GU, sizeof(float) * (size_t)nr * 2 * Im);
    float *h = tbuf(BUF_H, sizeof(float) * (size_t)nr * Im);
    pack_all(xp, x, (size_t)H, rows, nr, H, 0);
    gemm_block(g, 2 * (size_t)Im, xp, nr, w_gu, H, 0, 2 * Im, 0);
    moe_backend_cpu()->swiglu(h, g, nr, Im); /* one thread here (nested region) */
    pack_all(xp, h, (size_t)Im, NULL, nr, Im, 0);
    gemm_block(out, (size_t)H, xp, nr, w_down, Im, 0, H, 0);
}

/* Experts: one task per expert, largest first, spread over the threads
 * (an expert's result does not depend on the thread that runs it). */
void moe_cpu_bf16_experts(float *out, const float *x, const int32_t *rows, const int32_t *off,
                          const void *const *w_gu, const void *const *w_down, int E, int H, int Im) {
    if (off[E] <= 0) return;
    moe_cpu_bf16_native();
    int *task = moe_malloc(sizeof(int) * ((size_t)E + 1)), maxr = 0;
    double macs = 0;
    int nt = moe_cpu_expert_tasks(task, off, w_gu, E, H, Im, &maxr, &macs);
#pragma omp parallel for schedule(dynamic, 1) if (nt > 1 && macs > 2e6)
    for (int j = 0; j < nt; j++) {
        int e = task[j], r0 = off[e];
        expert_bf16(out + (size_t)r0 * H, x, rows + r0, off[e + 1] - r0, w_gu[e], w_down[e], H, Im);
    }
    free(task);
}
