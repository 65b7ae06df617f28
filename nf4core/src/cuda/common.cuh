// Host-side plumbing shared by the CUDA launchers: CUDA errors as nf4core
// errors, argument checks, launch geometry, and the device-side helpers
// (warp reductions, tables in shared memory). The arithmetic itself is the
// shared scalar math in ../numeric.hpp.
#ifndef NF4CORE_SRC_CUDA_COMMON_CUH
#define NF4CORE_SRC_CUDA_COMMON_CUH

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "../error.hpp"
#include "../numeric.hpp"
#include "../sizes.hpp"
#include "nf4core/common.h"
#include "nf4core/quantize.h"

namespace nf4core {
namespace cuda {

// Throws an nf4core::Error for a failed CUDA call; `what` names the call.
inline void check(cudaError_t err, const char *what) {
    if (err == cudaSuccess) return;
    (void)cudaGetLastError();  // clear a non-sticky error so later calls start clean
    const nf4_status st = err == cudaErrorMemoryAllocation ? NF4_ERROR_OUT_OF_MEMORY : NF4_ERROR_CUDA;
    fail(st, std::string("CUDA error in ") + what + ": " + cudaGetErrorName(err) + " (" +
                 cudaGetErrorString(err) + ")");
}

// Every launcher starts here: fails cleanly (no device, no driver) before any
// kernel is enqueued, and clears errors left by earlier foreign calls.
inline void require_device() {
    int dev = 0;
    check(cudaGetDevice(&dev), "cudaGetDevice (is a CUDA device and driver present?)");
}

inline cudaStream_t as_stream(void *s) { return static_cast<cudaStream_t>(s); }

inline void check_launch(const char *kernel) { check(cudaGetLastError(), kernel); }

inline void check_sizes(int64_t n, int64_t blocksize) {
    require(n >= 1, "number of elements must be at least 1, got " + std::to_string(n));
    require(nf4_blocksize_is_valid(blocksize) != 0,
            "blocksize must be a power of two between " + std::to_string(NF4_MIN_BLOCKSIZE) + " and " +
                std::to_string(NF4_MAX_BLOCKSIZE) + ", got " + std::to_string(blocksize));
}

inline void check_dtype(const nf4_dtype &dtype) { (void)checked_dtype(dtype, true, "dtype"); }

inline void check_table(const float *table, int size, const char *what) {
    require(table != nullptr, std::string(what) + " pointer is NULL");
    for (int i = 0; i < size; ++i)  // the message only on failure: building it 256 times cost 25 us a call
        if (!is_finite(table[i]))
            fail(NF4_ERROR_INVALID_ARGUMENT, std::string(what) + " entry " + std::to_string(i) + " is not finite");
}

// No element index (the flags of the kernels that report one start here).
constexpr unsigned long long kNone = ULLONG_MAX;

// Grids never exceed this many blocks; kernels stride over the rest (64-bit
// loop counters), so 2^31 elements and more need no special case.
constexpr int64_t kMaxGrid = int64_t(1) << 20;

inline unsigned grid_for(int64_t items, int64_t per_block) {
    int64_t g = (items + per_block - 1) / per_block;
    if (g < 1) g = 1;
    if (g > kMaxGrid) g = kMaxGrid;
    return unsigned(g);
}

// log2 of a power of two (the block sizes): kernels shift instead of
// dividing, since a 64-bit division is a long instruction sequence on the GPU.
inline int log2_exact(int64_t v) {
    int k = 0;
    while ((int64_t(1) << k) < v) ++k;
    require((int64_t(1) << k) == v, "blocksize must be a power of two, got " + std::to_string(v));
    return k;
}

// A grid that fills the current device once with blocks of `threads`
// (2048 resident threads per SM on every GPU from Volta on), for kernels that
// stride over their work.
inline unsigned resident_grid(int threads) {
    int dev = 0, sms = 0;
    check(cudaGetDevice(&dev), "cudaGetDevice");
    check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
    const int64_t g = int64_t(sms) * (2048 / threads);
    return unsigned(g < 1 ? 1 : g > kMaxGrid ? kMaxGrid : g);
}

// A device copy of a host lookup table (the DQ dynamic map), made on first use
// per device and content and kept for the process (device.cu), so that a
// launch passes a pointer instead of a kilobyte of kernel parameters. The
// first call with a new table allocates and copies synchronously (not allowed
// inside CUDA graph capture; later calls are).
constexpr size_t kMaxDeviceTables = 256;
const float *device_table(const float *host, int n);

// NF4CORE_CUDA_KERNELS=v1: the launchers pick the first (untuned) GEMV and
// dequantize kernels, so that a benchmark can compare them in one run.
inline bool first_kernels_forced() {
    const char *e = std::getenv("NF4CORE_CUDA_KERNELS");
    return e != nullptr && std::strcmp(e, "v1") == 0;
}

// Calls f(T{}) with T the element type of `dtype` (float, half_t, bfloat16_t).
template <class F>
void dispatch_dtype(nf4_dtype dtype, F &&f) {
    switch (dtype) {
        case NF4_FLOAT32: f(float{}); return;
        case NF4_FLOAT16: f(half_t{}); return;
        case NF4_BFLOAT16: f(bfloat16_t{}); return;
    }
    fail(NF4_ERROR_INVALID_ARGUMENT, "unknown dtype code " + std::to_string(int(dtype)));
}

// Plain tables passed by value as kernel arguments (they live in the
// constant bank; kernels copy them to shared memory for indexed access).
struct Table16 {
    float v[16];
};
struct Table256 {
    float v[256];
};

// Where a kernel gets the float32 scale of block b: a float32 array, or the
// double-quantization triple (decoded with the shared dq_scale formula, the
// 256-entry dynamic map in shared memory).
struct Scales {
    const float *absmax;   // nullptr when double-quantized
    const uint8_t *qabsmax;
    const float *nested;
    float offset;
};

#if defined(__CUDACC__)
__device__ __forceinline__ float block_scale_at(const Scales &s, const float *dyn_smem, int64_t b) {
    // __ldg: the scales are read-only for every kernel that reads them here
    if (s.absmax != nullptr) return __ldg(s.absmax + b);
    return dq_scale(dyn_smem[__ldg(s.qabsmax + b)], __ldg(s.nested + b / NF4_DQ_BLOCKSIZE), s.offset);
}

// Copies a table passed as a kernel argument into shared memory, the thread
// block's threads striding over its 32-bit words (bytes % 4 == 0); the caller
// then __syncthreads() before reading it.
__device__ __forceinline__ void copy_words(void *dst, const void *src, int bytes) {
    const int32_t *s = static_cast<const int32_t *>(src);
    int32_t *d = static_cast<int32_t *>(dst);
    for (int i = threadIdx.x; i < bytes / 4; i += blockDim.x) d[i] = s[i];
}

__device__ __forceinline__ uint32_t warp_max(uint32_t v) {
    for (int o = 16; o > 0; o >>= 1) {
        const uint32_t w = __shfl_xor_sync(0xFFFFFFFFu, v, o);
        v = w > v ? w : v;
    }
    return v;
}

__device__ __forceinline__ unsigned long long warp_min(unsigned long long v) {
    for (int o = 16; o > 0; o >>= 1) {
        const unsigned long long w = __shfl_xor_sync(0xFFFFFFFFu, v, o);
        v = w < v ? w : v;
    }
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
    return v;
}

// After a warp's pass over one quantization block in which each lane kept the
// lowest index of a non-finite value it met (kNone if none): true if there was
// none; else lane 0 records the block's lowest in *first (atomicMin, so the
// lowest over all blocks wins, as the CPU reports it) and every lane gets false.
__device__ __forceinline__ bool warp_all_finite(unsigned long long first_bad, unsigned long long *first) {
    first_bad = warp_min(first_bad);
    if (first_bad == kNone) return true;
    if ((threadIdx.x & 31u) == 0) atomicMin(first, first_bad);
    return false;
}
#endif

}  // namespace cuda
}  // namespace nf4core

#endif  // NF4CORE_SRC_CUDA_COMMON_CUH
