// cudaemu.h - the CUDA emulator's one header (tests/cudaemu/README is emu.cpp's
// top comment).  The shims cuda_runtime.h, cuda_bf16.h and cublas_v2.h include
// it, so that kernels/cuda/*.cu, translated by translate.pl (launch syntax,
// extern __shared__), compile with g++ as host code.
//
// It declares the subset of the CUDA runtime, the device intrinsics and cuBLAS
// that the backend uses, with the real enum values, plus the launch glue
// (namespace cudaemu).  Device code runs on the CPU: one fiber per GPU thread
// of a block, switched at __syncthreads and warp collectives.
#ifndef CUDAEMU_H
#define CUDAEMU_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <functional>
#include <tuple>
#include <type_traits>

#define CUDAEMU_API __attribute__((visibility("hidden")))

// ---- qualifiers -------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __constant__
#define __managed__
#define __align__(n) __attribute__((aligned(n)))
// __shared__ variables belong to a block: a block's threads are fibers, and
// blocks run one after the other (on the launching thread), so a
// function-local static is exactly one copy per running block.
// `extern __shared__` (dynamic shared memory) is rewritten by translate.pl
// into a pointer from cudaemu::dyn_smem().
#define __shared__ static
// __restrict__ is a g++ keyword already.

// ---- built-in variables -------------------------------------------------------
struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};
// Set by the scheduler before each switch into a thread's fiber (plain
// globals: the emulator runs kernels on one host thread at a time).
extern uint3 threadIdx CUDAEMU_API;
extern uint3 blockIdx CUDAEMU_API;
extern dim3 blockDim CUDAEMU_API;
extern dim3 gridDim CUDAEMU_API;
static constexpr int warpSize = 32;

// ---- device intrinsics ----------------------------------------------------------
// The emulated build uses -ffp-contract=off: a*b+c is never fused, so the
// _rn forms are the plain operations (as the CUDA ones are, unfused).
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __frcp_rn(float a) { return 1.0f / a; }
static inline float __fsqrt_rn(float a) { return sqrtf(a); }
static inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
static inline double __dmul_rn(double a, double b) { return a * b; }
static inline double __dadd_rn(double a, double b) { return a + b; }
static inline double __dsub_rn(double a, double b) { return a - b; }
// fast-math forms: the CPU's libm (more exact than the GPU's approximations)
// (glibc declares __expf/__logf itself: macros, after math.h)
#define __expf(x) expf(x)
#define __logf(x) logf(x)
static inline float __fdividef(float a, float b) { return a / b; }
static inline float __saturatef(float x) { return x < 0.0f ? 0.0f : x > 1.0f ? 1.0f : x; }
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
static inline double rsqrt(double x) { return 1.0 / sqrt(x); }
// CUDA's overloaded min/max of device code
#define CUDAEMU_MINMAX(T)                                      \
    static inline T min(T a, T b) { return b < a ? b : a; } \
    static inline T max(T a, T b) { return a < b ? b : a; }
CUDAEMU_MINMAX(int)
CUDAEMU_MINMAX(unsigned)
CUDAEMU_MINMAX(long)
CUDAEMU_MINMAX(unsigned long)
CUDAEMU_MINMAX(long long)
CUDAEMU_MINMAX(unsigned long long)
#undef CUDAEMU_MINMAX
static inline float min(float a, float b) { return fminf(a, b); }
static inline float max(float a, float b) { return fmaxf(a, b); }
static inline double min(double a, double b) { return fmin(a, b); }
static inline double max(double a, double b) { return fmax(a, b); }

// ---- bf16 -------------------------------------------------------------------
// Round to nearest even; NaN -> the canonical 0x7fff, as cuda_bf16.hpp does.
static inline unsigned short cudaemu_f2bf_rn(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}
static inline float cudaemu_bf2f(unsigned short h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
struct __nv_bfloat16 {
    unsigned short __x;
    __nv_bfloat16() = default;
    __nv_bfloat16(float f) : __x(cudaemu_f2bf_rn(f)) {}
    __nv_bfloat16(double f) : __x(cudaemu_f2bf_rn((float)f)) {}
    operator float() const { return cudaemu_bf2f(__x); }
};
typedef __nv_bfloat16 nv_bfloat16;
static inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    __nv_bfloat16 r;
    r.__x = cudaemu_f2bf_rn(f);
    return r;
}
static inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
static inline __nv_bfloat16 __float2bfloat16_rz(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    __nv_bfloat16 r;
    r.__x = (u & 0x7fffffffu) > 0x7f800000u ? 0x7fffu : (unsigned short)(u >> 16);
    return r;
}
static inline float __bfloat162float(__nv_bfloat16 h) { return cudaemu_bf2f(h.__x); }
static inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
static inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) {
    __nv_bfloat16 r;
    r.__x = u;
    return r;
}

// ---- runtime types (real enum values) ------------------------------------------
enum cudaError {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInitializationError = 3,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorInvalidSymbol = 13,
    cudaErrorInvalidHostPointer = 16,
    cudaErrorInvalidDevicePointer = 17,
    cudaErrorInvalidMemcpyDirection = 21,
    cudaErrorInvalidDeviceFunction = 98,
    cudaErrorNoDevice = 100,
    cudaErrorInvalidDevice = 101,
    cudaErrorInvalidResourceHandle = 400,
    cudaErrorNotReady = 600,
    cudaErrorIllegalAddress = 700,
    cudaErrorLaunchOutOfResources = 701,
    cudaErrorHostMemoryAlreadyRegistered = 712,
    cudaErrorHostMemoryNotRegistered = 713,
    cudaErrorLaunchFailure = 719,
    cudaErrorNotSupported = 801,
    cudaErrorUnknown = 999,
};
typedef enum cudaError cudaError_t;

typedef struct CUstream_st *cudaStream_t;
typedef struct CUevent_st *cudaEvent_t;
typedef struct CUmemPoolHandle_st *cudaMemPool_t;
#define cudaStreamLegacy ((cudaStream_t)0x1)
#define cudaStreamPerThread ((cudaStream_t)0x2)

enum cudaMemcpyKind {
    cudaMemcpyHostToHost = 0,
    cudaMemcpyHostToDevice = 1,
    cudaMemcpyDeviceToHost = 2,
    cudaMemcpyDeviceToDevice = 3,
    cudaMemcpyDefault = 4,
};
enum cudaMemoryType {
    cudaMemoryTypeUnregistered = 0,
    cudaMemoryTypeHost = 1,
    cudaMemoryTypeDevice = 2,
    cudaMemoryTypeManaged = 3,
};
struct cudaPointerAttributes {
    enum cudaMemoryType type;
    int device;
    void *devicePointer;
    void *hostPointer;
};
#define cudaStreamDefault 0x0u
#define cudaStreamNonBlocking 0x1u
#define cudaEventDefault 0x0u
#define cudaEventBlockingSync 0x1u
#define cudaEventDisableTiming 0x2u
#define cudaEventInterprocess 0x4u
#define cudaHostAllocDefault 0x0u
#define cudaHostAllocPortable 0x1u
#define cudaHostAllocMapped 0x2u
#define cudaHostAllocWriteCombined 0x4u
#define cudaHostRegisterDefault 0x0u
#define cudaHostRegisterPortable 0x1u
#define cudaHostRegisterMapped 0x2u
#define cudaHostRegisterReadOnly 0x8u

enum cudaDeviceAttr {
    cudaDevAttrMaxThreadsPerBlock = 1,
    cudaDevAttrMaxBlockDimX = 2,
    cudaDevAttrMaxGridDimX = 5,
    cudaDevAttrMaxSharedMemoryPerBlock = 8,
    cudaDevAttrTotalConstantMemory = 9,
    cudaDevAttrWarpSize = 10,
    cudaDevAttrMultiProcessorCount = 16,
    cudaDevAttrL2CacheSize = 38,
    cudaDevAttrUnifiedAddressing = 41,
    cudaDevAttrComputeCapabilityMajor = 75,
    cudaDevAttrComputeCapabilityMinor = 76,
    cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
    cudaDevAttrManagedMemory = 83,
    cudaDevAttrConcurrentManagedAccess = 89,
    cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
    cudaDevAttrMemoryPoolsSupported = 115,
};
enum cudaFuncAttribute {
    cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
    cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};
enum cudaMemPoolAttr {
    cudaMemPoolReuseFollowEventDependencies = 1,
    cudaMemPoolReuseAllowOpportunistic = 2,
    cudaMemPoolReuseAllowInternalDependencies = 3,
    cudaMemPoolAttrReleaseThreshold = 4,
    cudaMemPoolAttrReservedMemCurrent = 5,
    cudaMemPoolAttrReservedMemHigh = 6,
    cudaMemPoolAttrUsedMemCurrent = 7,
    cudaMemPoolAttrUsedMemHigh = 8,
};

// The fields code reads; the real struct has more.
struct cudaDeviceProp {
    char name[256];
    size_t totalGlobalMem;
    size_t sharedMemPerBlock;
    int regsPerBlock;
    int warpSize;
    int maxThreadsPerBlock;
    int maxThreadsDim[3];
    int maxGridSize[3];
    size_t totalConstMem;
    int major;
    int minor;
    int multiProcessorCount;
    int l2CacheSize;
    int memoryBusWidth;
    int unifiedAddressing;
    int managedMemory;
    int concurrentKernels;
    int asyncEngineCount;
    int canMapHostMemory;
    int integrated;
    int pciBusID;
    size_t sharedMemPerMultiprocessor;
    size_t sharedMemPerBlockOptin;
    int maxThreadsPerMultiProcessor;
    int memoryPoolsSupported;
};

enum cudaDataType_t {
    CUDA_R_32F = 0,
    CUDA_R_64F = 1,
    CUDA_R_16F = 2,
    CUDA_R_8I = 3,
    CUDA_R_32I = 10,
    CUDA_R_16BF = 14,
};
typedef enum cudaDataType_t cudaDataType;

// ---- runtime API ------------------------------------------------------------
CUDAEMU_API const char *cudaGetErrorName(cudaError_t e);
CUDAEMU_API const char *cudaGetErrorString(cudaError_t e);
CUDAEMU_API cudaError_t cudaGetLastError(void);
CUDAEMU_API cudaError_t cudaPeekAtLastError(void);
CUDAEMU_API cudaError_t cudaGetDeviceCount(int *n);
CUDAEMU_API cudaError_t cudaSetDevice(int d);
CUDAEMU_API cudaError_t cudaGetDevice(int *d);
CUDAEMU_API cudaError_t cudaGetDeviceProperties(cudaDeviceProp *p, int d);
CUDAEMU_API cudaError_t cudaDeviceGetAttribute(int *v, enum cudaDeviceAttr a, int d);
CUDAEMU_API cudaError_t cudaDeviceSynchronize(void);
CUDAEMU_API cudaError_t cudaMemGetInfo(size_t *free_b, size_t *total_b);
CUDAEMU_API cudaError_t cudaMalloc(void **p, size_t n);
CUDAEMU_API cudaError_t cudaFree(void *p);
CUDAEMU_API cudaError_t cudaMallocAsync(void **p, size_t n, cudaStream_t s);
CUDAEMU_API cudaError_t cudaFreeAsync(void *p, cudaStream_t s);
CUDAEMU_API cudaError_t cudaMallocHost(void **p, size_t n);
CUDAEMU_API cudaError_t cudaHostAlloc(void **p, size_t n, unsigned flags);
CUDAEMU_API cudaError_t cudaFreeHost(void *p);
CUDAEMU_API cudaError_t cudaHostRegister(void *p, size_t n, unsigned flags);
CUDAEMU_API cudaError_t cudaHostUnregister(void *p);
CUDAEMU_API cudaError_t cudaHostGetDevicePointer(void **d, void *h, unsigned flags);
CUDAEMU_API cudaError_t cudaPointerGetAttributes(cudaPointerAttributes *a, const void *p);
CUDAEMU_API cudaError_t cudaMemcpy(void *dst, const void *src, size_t n, enum cudaMemcpyKind k);
CUDAEMU_API cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t n, enum cudaMemcpyKind k,
                                        cudaStream_t s = 0);
CUDAEMU_API cudaError_t cudaMemset(void *p, int v, size_t n);
CUDAEMU_API cudaError_t cudaMemsetAsync(void *p, int v, size_t n, cudaStream_t s = 0);
CUDAEMU_API cudaError_t cudaStreamCreate(cudaStream_t *s);
CUDAEMU_API cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned flags);
CUDAEMU_API cudaError_t cudaStreamDestroy(cudaStream_t s);
CUDAEMU_API cudaError_t cudaStreamSynchronize(cudaStream_t s);
CUDAEMU_API cudaError_t cudaStreamQuery(cudaStream_t s);
CUDAEMU_API cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned flags = 0);
CUDAEMU_API cudaError_t cudaEventCreate(cudaEvent_t *e);
CUDAEMU_API cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned flags);
CUDAEMU_API cudaError_t cudaEventDestroy(cudaEvent_t e);
CUDAEMU_API cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s = 0);
CUDAEMU_API cudaError_t cudaEventQuery(cudaEvent_t e);
CUDAEMU_API cudaError_t cudaEventSynchronize(cudaEvent_t e);
CUDAEMU_API cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t a, cudaEvent_t b);
CUDAEMU_API cudaError_t cudaDeviceGetDefaultMemPool(cudaMemPool_t *pool, int d);
CUDAEMU_API cudaError_t cudaDeviceGetMemPool(cudaMemPool_t *pool, int d);
CUDAEMU_API cudaError_t cudaMemPoolSetAttribute(cudaMemPool_t pool, enum cudaMemPoolAttr a, void *v);
CUDAEMU_API cudaError_t cudaMemPoolGetAttribute(cudaMemPool_t pool, enum cudaMemPoolAttr a, void *v);
CUDAEMU_API cudaError_t cudaMemPoolTrimTo(cudaMemPool_t pool, size_t keep);
CUDAEMU_API cudaError_t cudaFuncSetAttribute(const void *fn, enum cudaFuncAttribute a, int v);
template <class T> static inline cudaError_t cudaFuncSetAttribute(T *fn, enum cudaFuncAttribute a, int v) {
    return cudaFuncSetAttribute((const void *)fn, a, v);
}

// ---- cuBLAS -----------------------------------------------------------------
typedef struct cublasContext *cublasHandle_t;
typedef enum {
    CUBLAS_STATUS_SUCCESS = 0,
    CUBLAS_STATUS_NOT_INITIALIZED = 1,
    CUBLAS_STATUS_ALLOC_FAILED = 3,
    CUBLAS_STATUS_INVALID_VALUE = 7,
    CUBLAS_STATUS_ARCH_MISMATCH = 8,
    CUBLAS_STATUS_MAPPING_ERROR = 11,
    CUBLAS_STATUS_EXECUTION_FAILED = 13,
    CUBLAS_STATUS_INTERNAL_ERROR = 14,
    CUBLAS_STATUS_NOT_SUPPORTED = 15,
    CUBLAS_STATUS_LICENSE_ERROR = 16,
} cublasStatus_t;
typedef enum { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1, CUBLAS_OP_C = 2 } cublasOperation_t;
typedef enum {
    CUBLAS_DEFAULT_MATH = 0,
    CUBLAS_TENSOR_OP_MATH = 1,
    CUBLAS_PEDANTIC_MATH = 2,
    CUBLAS_TF32_TENSOR_OP_MATH = 3,
    CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION = 16,
} cublasMath_t;
typedef enum { CUBLAS_POINTER_MODE_HOST = 0, CUBLAS_POINTER_MODE_DEVICE = 1 } cublasPointerMode_t;
typedef enum {
    CUBLAS_COMPUTE_16F = 64,
    CUBLAS_COMPUTE_16F_PEDANTIC = 65,
    CUBLAS_COMPUTE_32F = 68,
    CUBLAS_COMPUTE_32F_PEDANTIC = 69,
    CUBLAS_COMPUTE_32F_FAST_16F = 74,
    CUBLAS_COMPUTE_32F_FAST_16BF = 75,
    CUBLAS_COMPUTE_32F_FAST_TF32 = 77,
    CUBLAS_COMPUTE_64F = 70,
    CUBLAS_COMPUTE_32I = 72,
} cublasComputeType_t;
typedef enum {
    CUBLAS_GEMM_DEFAULT = -1,
    CUBLAS_GEMM_DEFAULT_TENSOR_OP = 99,
} cublasGemmAlgo_t;

CUDAEMU_API cublasStatus_t cublasCreate(cublasHandle_t *h);
CUDAEMU_API cublasStatus_t cublasDestroy(cublasHandle_t h);
CUDAEMU_API cublasStatus_t cublasSetStream(cublasHandle_t h, cudaStream_t s);
CUDAEMU_API cublasStatus_t cublasGetStream(cublasHandle_t h, cudaStream_t *s);
CUDAEMU_API cublasStatus_t cublasSetMathMode(cublasHandle_t h, cublasMath_t m);
CUDAEMU_API cublasStatus_t cublasGetMathMode(cublasHandle_t h, cublasMath_t *m);
CUDAEMU_API cublasStatus_t cublasSetPointerMode(cublasHandle_t h, cublasPointerMode_t m);
CUDAEMU_API cublasStatus_t cublasSetWorkspace(cublasHandle_t h, void *w, size_t n);
CUDAEMU_API const char *cublasGetStatusName(cublasStatus_t s);
CUDAEMU_API const char *cublasGetStatusString(cublasStatus_t s);
CUDAEMU_API cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb,
                                        int m, int n, int k, const void *alpha, const void *A,
                                        cudaDataType at, int lda, const void *B, cudaDataType bt,
                                        int ldb, const void *beta, void *C, cudaDataType ct, int ldc,
                                        cublasComputeType_t compute, cublasGemmAlgo_t algo);
CUDAEMU_API cublasStatus_t cublasSgemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb,
                                       int m, int n, int k, const float *alpha, const float *A,
                                       int lda, const float *B, int ldb, const float *beta, float *C,
                                       int ldc);
CUDAEMU_API cublasStatus_t cublasGemmStridedBatchedEx(
    cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
    const void *alpha, const void *A, cudaDataType at, int lda, long long sa, const void *B,
    cudaDataType bt, int ldb, long long sb, const void *beta, void *C, cudaDataType ct, int ldc,
    long long sc, int batch, cublasComputeType_t compute, cublasGemmAlgo_t algo);
CUDAEMU_API cublasStatus_t cublasGemmGroupedBatchedEx(
    cublasHandle_t h, const cublasOperation_t ta[], const cublasOperation_t tb[], const int m[],
    const int n[], const int k[], const void *alpha, const void *const A[], cudaDataType at,
    const int lda[], const void *const B[], cudaDataType bt, const int ldb[], const void *beta,
    void *const C[], cudaDataType ct, const int ldc[], int group_count, const int group_size[],
    cublasComputeType_t compute);

// ---- synchronisation and warp collectives (called from device code) -----------
CUDAEMU_API void __syncthreads(void);
namespace cudaemu {
enum { SHFL_IDX, SHFL_UP, SHFL_DOWN, SHFL_XOR, VOTE };
// every lane of the warp named in mask posts bits, waits for the others, and
// gets the value of its source lane (mode/arg/width as __shfl_*_sync)
CUDAEMU_API uint64_t warp_exchange(unsigned mask, uint64_t bits, int mode, int arg, int width,
                                   unsigned *ballot);
template <class T> static inline T shfl(unsigned mask, T v, int mode, int arg, int width) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of this type");
    uint64_t b = 0;
    memcpy(&b, &v, sizeof v);
    b = warp_exchange(mask, b, mode, arg, width, NULL);
    T r;
    memcpy(&r, &b, sizeof r);
    return r;
}
} // namespace cudaemu
template <class T> static inline T __shfl_sync(unsigned mask, T v, int src, int width = warpSize) {
    return cudaemu::shfl(mask, v, cudaemu::SHFL_IDX, src, width);
}
template <class T> static inline T __shfl_up_sync(unsigned mask, T v, unsigned d, int width = warpSize) {
    return cudaemu::shfl(mask, v, cudaemu::SHFL_UP, (int)d, width);
}
template <class T> static inline T __shfl_down_sync(unsigned mask, T v, unsigned d, int width = warpSize) {
    return cudaemu::shfl(mask, v, cudaemu::SHFL_DOWN, (int)d, width);
}
template <class T> static inline T __shfl_xor_sync(unsigned mask, T v, int lm, int width = warpSize) {
    return cudaemu::shfl(mask, v, cudaemu::SHFL_XOR, lm, width);
}
static inline void __syncwarp(unsigned mask = 0xffffffffu) {
    cudaemu::warp_exchange(mask, 0, cudaemu::VOTE, 0, warpSize, NULL);
}
static inline unsigned __ballot_sync(unsigned mask, int pred) {
    unsigned b = 0;
    cudaemu::warp_exchange(mask, pred != 0, cudaemu::VOTE, 0, warpSize, &b);
    return b;
}
static inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
static inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == (__ballot_sync(mask, 1)); }

// Atomics: a block's threads only switch at barriers and blocks run one at a
// time, so a plain read-modify-write is atomic here.
template <class T> static inline T atomicAdd(T *p, T v) { T o = *p; *p = o + v; return o; }
template <class T> static inline T atomicSub(T *p, T v) { T o = *p; *p = o - v; return o; }
template <class T> static inline T atomicExch(T *p, T v) { T o = *p; *p = v; return o; }
template <class T> static inline T atomicMax(T *p, T v) { T o = *p; if (o < v) *p = v; return o; }
template <class T> static inline T atomicMin(T *p, T v) { T o = *p; if (v < o) *p = v; return o; }
template <class T> static inline T atomicCAS(T *p, T c, T v) { T o = *p; if (o == c) *p = v; return o; }

// ---- kernel launch (translate.pl: k<<<g, b, s, st>>>(a...) ->
//      cudaemu::launch(k, "k", g, b, s, st)(a...)) ------------------------------
namespace cudaemu {
struct launch_cfg {
    dim3 grid, block;
    size_t smem;
    cudaStream_t stream;
    const char *name;
    const void *fn;
};
// validates the configuration (records the launch error); false: do not run
CUDAEMU_API bool launch_begin(const launch_cfg &c);
// a pointer argument must be device (or pinned host) memory, or NULL
CUDAEMU_API void launch_check_ptr(const launch_cfg &c, int arg, const void *p);
// runs thunk(ctx) once per GPU thread, block after block
CUDAEMU_API void launch_run(const launch_cfg &c, void (*thunk)(void *), void *ctx);
// queues run on the launch's stream (streams are deferred: see emu.cpp)
CUDAEMU_API void launch_enqueue(const launch_cfg &c, std::function<void(const launch_cfg &)> run);
// the dynamic shared memory of the running block
CUDAEMU_API void *dyn_smem(void);

template <class A> static inline void check_arg(const launch_cfg &c, int i, const A &a) {
    if constexpr (std::is_pointer<A>::value) launch_check_ptr(c, i, (const void *)a);
    (void)c, (void)i, (void)a;
}
template <class F> struct launcher {
    F *fn;
    launch_cfg cfg;
    template <class... A> void operator()(const A &...a) const {
        if (!launch_begin(cfg)) return;
        int i = 0;
        (check_arg(cfg, i++, a), ...);
        (void)i;
        // the arguments are copied at launch, and again by each thread's call
        launch_enqueue(cfg, [f = fn, args = std::make_tuple(a...)](const launch_cfg &c) {
            auto call = [&]() { std::apply(f, args); };
            launch_run(c, [](void *p) { (*(decltype(call) *)p)(); }, &call);
        });
    }
};
template <class F>
static inline launcher<F> launch(F *fn, const char *name, dim3 grid, dim3 block, size_t smem = 0,
                                 cudaStream_t stream = 0) {
    return launcher<F>{fn, launch_cfg{grid, block, smem, stream, name, (const void *)fn}};
}
} // namespace cudaemu

#endif
