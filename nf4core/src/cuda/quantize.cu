// CUDA kernels for blockwise 4-bit and 8-bit quantization and double
// quantization (the GPU twin of quantize.cpp / kernels_ref.hpp).
//
// Every value is computed by the shared scalar math of numeric.hpp
// (block_scale, encode_value, nearest_code, decode_value, dq_scale), so the
// bytes equal the CPU path's for the same input; only the work split differs.
// Indices are int64_t and grids stride, so 2^31 elements and more work.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <string>
#include <type_traits>

#include "../error.hpp"
#include "../kernels.hpp"
#include "../numeric.hpp"
#include "common.cuh"
#include "nf4core/cuda.h"

namespace nf4core {

[[noreturn]] void fail_non_finite(int64_t index, float value);  // quantize.cpp
[[noreturn]] void fail_bad_scale(int64_t index, float value);   // quantize.cpp

namespace cuda {
namespace {

constexpr int kThreads = 256;

// Written by the kernels of the [sync] entry points, read back once.
struct Flags {
    unsigned long long bad_input;  // lowest flat index of a NaN/Inf input
    unsigned long long bad_scale;  // lowest index of a negative or non-finite scale (DQ)
    float mean;                    // DQ offset
};

template <typename T>
__device__ __forceinline__ float load_value(const T *x, int64_t i, const float *sub, float m) {
    const float v = to_float(x[i]);
    return sub != nullptr ? v - m : v;  // DQ centres the scales: absmax - mean, one rounding
}

// One warp per quantization block: the absmax by a warp reduction (max is
// exact, so the order does not matter), then every lane encodes its elements
// (4-bit: pairs, so each lane writes whole bytes).
template <int BITS, typename T>
__global__ void __launch_bounds__(kThreads)
    quantize_kernel(const T *__restrict__ x, int64_t n, int64_t blocksize, const __grid_constant__ SearchTable table_arg,
                    uint8_t *__restrict__ out, float *__restrict__ absmax, const float *sub, Flags *flags) {
    __shared__ SearchTable table;
    copy_words(&table, &table_arg, int(sizeof(SearchTable)));
    __syncthreads();
    const float m = sub != nullptr ? *sub : 0.0f;
    const int lane = int(threadIdx.x & 31u);
    const int64_t nwarps = (int64_t(gridDim.x) * blockDim.x) >> 5;
    const int64_t nblocks = (n + blocksize - 1) / blocksize;
    for (int64_t b = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; b < nblocks; b += nwarps) {
        const int64_t begin = b * blocksize;
        const int64_t end = begin + blocksize < n ? begin + blocksize : n;
        uint32_t amax_bits = 0;
        unsigned long long first_bad = kNone;
        for (int64_t i = begin + lane; i < end; i += 32) {
            const uint32_t u = float_bits(load_value(x, i, sub, m)) & 0x7FFFFFFFu;
            if (u > 0x7F7FFFFFu && first_bad == kNone) first_bad = (unsigned long long)i;
            amax_bits = u > amax_bits ? u : amax_bits;  // float bits of |x| order like the values
        }
        amax_bits = warp_max(amax_bits);
        if (!warp_all_finite(first_bad, &flags->bad_input)) continue;
        const BlockScale s = block_scale(bits_float(amax_bits), end - begin, blocksize);
        if (lane == 0) absmax[b] = s.stored;
        if (BITS == 8) {
            for (int64_t i = begin + lane; i < end; i += 32)
                out[i] = encode_value<256>(table, load_value(x, i, sub, m), s);
        } else {
            // begin is even (blocksizes are); an odd n pads the last low nibble
            // with the code of 0.0, as kernels_ref.hpp's pad_odd_end does
            for (int64_t p = (begin >> 1) + lane; 2 * p < end; p += 32) {
                const int64_t i = 2 * p;
                const unsigned hi = encode_value<16>(table, load_value(x, i, sub, m), s);
                const unsigned lo = i + 1 < end ? encode_value<16>(table, load_value(x, i + 1, sub, m), s)
                                                : nearest_code<16>(table, 0.0f);
                out[p] = pack_pair(hi, lo);
            }
        }
    }
}

// Element vectors for the dequantize stores.
template <typename T, int E>
struct alignas(16) Vec {
    T v[E];
};

// Each thread decodes chunks of 16 elements (blocksizes are multiples of 32,
// so a chunk has one scale). VEC: whole chunks with 8/16-byte loads and
// 16-byte stores (the launcher checks the alignment); the rest element-wise.
template <int BITS, typename T, bool VEC>
__global__ void __launch_bounds__(kThreads)
    dequantize_kernel(const uint8_t *__restrict__ in, const Scales sc, int64_t n, int64_t blocksize,
                      const __grid_constant__ Table256 cb_arg, const __grid_constant__ Table256 dyn_arg,
                      T *__restrict__ out) {
    constexpr int kCodes = 1 << BITS;
    __shared__ float cb[kCodes];
    __shared__ float dyn[256];
    copy_words(cb, cb_arg.v, kCodes * 4);
    if (sc.absmax == nullptr) copy_words(dyn, dyn_arg.v, 256 * 4);
    __syncthreads();
    constexpr int E = 16;
    const int64_t nchunks = (n + E - 1) / E;
    const int64_t stride = int64_t(gridDim.x) * blockDim.x;
    for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < nchunks; c += stride) {
        const int64_t i0 = c * E;
        const float scale = block_scale_at(sc, dyn, i0 / blocksize);
        if (VEC && i0 + E <= n) {
            uint8_t codes[E];
            if (BITS == 4) {
                const uint2 w = *reinterpret_cast<const uint2 *>(in + (i0 >> 1));
                const uint32_t words[2] = {w.x, w.y};
#pragma unroll
                for (int e = 0; e < E; ++e) {
                    const uint32_t byte = (words[e >> 3] >> (8 * ((e >> 1) & 3))) & 0xFFu;
                    codes[e] = uint8_t((e & 1) ? (byte & 0x0Fu) : (byte >> 4));
                }
            } else {
                const uint4 w = *reinterpret_cast<const uint4 *>(in + i0);
                const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
                for (int e = 0; e < E; ++e) codes[e] = uint8_t((words[e >> 2] >> (8 * (e & 3))) & 0xFFu);
            }
            Vec<T, 16> r;
#pragma unroll
            for (int e = 0; e < E; ++e) r.v[e] = from_float<T>(decode_value(cb[codes[e]], scale));
            *reinterpret_cast<Vec<T, 16> *>(out + i0) = r;
        } else {
            const int64_t i1 = i0 + E < n ? i0 + E : n;
            for (int64_t i = i0; i < i1; ++i) {
                const unsigned code = BITS == 8 ? unsigned(in[i]) : nibble_at(in, i);
                out[i] = from_float<T>(decode_value(cb[code], scale));
            }
        }
    }
}

// 16 bytes of output from 4 (float32) or 8 (16-bit) float values. With a
// finite scale every value is finite or an infinity (codebook entries are
// checked finite), and there the hardware's round-to-nearest-even conversion
// (two values per instruction) gives the bytes of from_float; otherwise a NaN
// may occur and the shared scalar rule (numeric.hpp) decides its bits.
__device__ __forceinline__ uint4 pack16(const float (&v)[4], bool) {
    return make_uint4(float_bits(v[0]), float_bits(v[1]), float_bits(v[2]), float_bits(v[3]));
}

template <typename T>
__device__ __forceinline__ uint32_t pack_pair16(float a, float b, bool fast);

template <>
__device__ __forceinline__ uint32_t pack_pair16<bfloat16_t>(float a, float b, bool fast) {
    if (fast) {
        const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);  // a in the low half
        return *reinterpret_cast<const uint32_t *>(&h);
    }
    return uint32_t(to_bfloat16(a).bits) | (uint32_t(to_bfloat16(b).bits) << 16);
}

template <>
__device__ __forceinline__ uint32_t pack_pair16<half_t>(float a, float b, bool fast) {
    if (fast) {
        const __half2 h = __floats2half2_rn(a, b);
        return *reinterpret_cast<const uint32_t *>(&h);
    }
    return uint32_t(to_half(a).bits) | (uint32_t(to_half(b).bits) << 16);
}

template <typename T>
__device__ __forceinline__ uint4 pack16(const float (&v)[8], bool fast) {
    return make_uint4(pack_pair16<T>(v[0], v[1], fast), pack_pair16<T>(v[2], v[3], fast),
                      pack_pair16<T>(v[4], v[5], fast), pack_pair16<T>(v[6], v[7], fast));
}

template <typename T, int P>
__device__ __forceinline__ uint4 pack16_as(const float (&v)[P], bool fast) {
    if constexpr (P == 4) {
        return pack16(v, fast);
    } else {
        return pack16<T>(v, fast);
    }
}

// The tuned dequantize (the launcher's choice when codes and output are
// aligned): each warp decodes tiles of 4 x 32 pieces of P elements, P * sizeof(T)
// = 16 bytes, lane l taking piece l of each quarter. So every store
// instruction of the warp writes 512 contiguous bytes and every code load
// reads contiguous bytes; a piece lies in one quantization block (P <= 8 <=
// 32 <= blocksize), so its scale is decoded once; the four pieces' loads are
// issued before any is decoded. Same arithmetic as dequantize_kernel, so the
// same bytes.
template <int BITS, typename T>
__global__ void __launch_bounds__(kThreads)
    dequantize_tiles_kernel(const uint8_t *__restrict__ in, const Scales sc, int64_t n, int bshift,
                            const __grid_constant__ Table256 cb_arg, const __grid_constant__ Table256 dyn_arg,
                            T *__restrict__ out) {
    constexpr int kCodes = 1 << BITS;
    constexpr int P = 16 / int(sizeof(T));          // elements per piece: 4 (float32) or 8
    constexpr int kPieceBytes = P * BITS / 8;       // code bytes per piece: 2, 4 or 8
    constexpr int64_t kTile = 4 * 32 * P;           // elements per warp tile
    using CodeWord = typename std::conditional<kPieceBytes == 2, uint16_t,
                     typename std::conditional<kPieceBytes == 4, uint32_t, uint64_t>::type>::type;
    __shared__ float cb[kCodes];
    __shared__ float dyn[256];
    copy_words(cb, cb_arg.v, kCodes * 4);
    if (sc.absmax == nullptr) copy_words(dyn, dyn_arg.v, 256 * 4);
    __syncthreads();
    const int lane = int(threadIdx.x & 31u);
    const int64_t warps = (int64_t(gridDim.x) * blockDim.x) >> 5;
    const int64_t tiles = n / kTile;  // whole tiles; the rest element by element below
    for (int64_t t = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; t < tiles; t += warps) {
        const int64_t base = t * kTile + int64_t(lane) * P;
        CodeWord words[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const int64_t i0 = base + int64_t(k) * 32 * P;
            words[k] = __ldg(reinterpret_cast<const CodeWord *>(in + i0 * BITS / 8));
        }
        // all four scales before the first store: the compiler may not move a
        // scale's loads above a store to `out`, so interleaving them would
        // make each piece wait a memory round trip
        float scales[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) scales[k] = block_scale_at(sc, dyn, (base + int64_t(k) * 32 * P) >> bshift);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const int64_t i0 = base + int64_t(k) * 32 * P;
            const float scale = scales[k];
            const uint64_t wk = uint64_t(words[k]);
            float v[P];
#pragma unroll
            for (int e = 0; e < P; ++e) {
                unsigned code;
                if (BITS == 4) {  // byte e/2; the even element in its high nibble
                    code = unsigned(wk >> (8 * (e >> 1) + ((e & 1) ? 0 : 4))) & 0x0Fu;
                } else {
                    code = unsigned(wk >> (8 * e)) & 0xFFu;
                }
                v[e] = decode_value(cb[code], scale);
            }
            *reinterpret_cast<uint4 *>(out + i0) = pack16_as<T>(v, is_finite(scale));
        }
    }
    // the tail (< one tile), one element per thread of the whole grid
    const int64_t stride = int64_t(gridDim.x) * blockDim.x;
    for (int64_t i = tiles * kTile + int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
        const unsigned code = BITS == 8 ? unsigned(in[i]) : nibble_at(in, i);
        out[i] = from_float<T>(decode_value(cb[code], block_scale_at(sc, dyn, i >> bshift)));
    }
}

// The DQ offset exactly as nf4_double_quantize computes it: eight double
// accumulators over i mod 8 in index order, combined pairwise, divided in
// double, rounded once to float32. Lanes 0..7 each own one accumulator, so the
// sums are the CPU's bit for bit (a serial pass; DQ runs once per weight).
__global__ void dq_mean_kernel(const float *__restrict__ absmax, int64_t nblocks, Flags *flags) {
    const int lane = int(threadIdx.x);
    double acc = 0.0;
    unsigned long long bad = kNone;
    if (lane < 8) {
        for (int64_t i = lane; i < nblocks; i += 8) {
            const float a = absmax[i];
            if (bad == kNone && !(is_finite(a) && a >= 0.0f)) bad = (unsigned long long)i;
            acc += double(a);
        }
    }
    bad = warp_min(bad);
    double a[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) a[j] = __shfl_sync(0xFFFFFFFFu, acc, j);
    if (lane == 0) {
        const double sum = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
        flags->mean = float(sum / double(nblocks));
        flags->bad_scale = bad;
    }
}

__global__ void __launch_bounds__(kThreads)
    double_dequantize_kernel(const uint8_t *__restrict__ q, const float *__restrict__ nested, float offset,
                             int64_t nblocks, const __grid_constant__ Table256 dyn_arg, float *__restrict__ absmax) {
    __shared__ float dyn[256];
    copy_words(dyn, dyn_arg.v, 256 * 4);
    __syncthreads();
    const int64_t stride = int64_t(gridDim.x) * blockDim.x;
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < nblocks; i += stride)
        absmax[i] = dq_scale(dyn[q[i]], nested[i / NF4_DQ_BLOCKSIZE], offset);
}

// A device scratch for Flags, freed on every exit path.
class Scratch {
public:
    explicit Scratch(cudaStream_t s) : stream_(s) {
        check(cudaMallocAsync(reinterpret_cast<void **>(&ptr_), sizeof(Flags), s), "cudaMallocAsync");
        const cudaError_t err = cudaMemsetAsync(ptr_, 0xFF, 2 * sizeof(unsigned long long), s);
        if (err != cudaSuccess) {
            (void)cudaFreeAsync(ptr_, s);  // the destructor does not run when the constructor throws
            check(err, "cudaMemsetAsync");
        }
    }
    ~Scratch() { (void)cudaFreeAsync(ptr_, stream_); }
    Scratch(const Scratch &) = delete;
    Scratch &operator=(const Scratch &) = delete;
    Flags *get() const { return ptr_; }
    Flags read() const {  // waits for the stream
        Flags f;
        check(cudaMemcpyAsync(&f, ptr_, sizeof f, cudaMemcpyDeviceToHost, stream_), "cudaMemcpyAsync");
        check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
        return f;
    }

private:
    cudaStream_t stream_;
    Flags *ptr_ = nullptr;
};

// Raises the CPU's error for a NaN/Inf input at flat index `index` (reads that
// one element back to name it).
void fail_bad_input(const void *x, nf4_dtype dtype, unsigned long long index, cudaStream_t s) {
    const int64_t size = nf4_dtype_size(dtype);
    uint8_t raw[4] = {0, 0, 0, 0};
    check(cudaMemcpyAsync(raw, static_cast<const uint8_t *>(x) + int64_t(index) * size, size_t(size),
                          cudaMemcpyDeviceToHost, s),
          "cudaMemcpyAsync");
    check(cudaStreamSynchronize(s), "cudaStreamSynchronize");
    float v;
    if (dtype == NF4_FLOAT32) {
        uint32_t u = uint32_t(raw[0]) | uint32_t(raw[1]) << 8 | uint32_t(raw[2]) << 16 | uint32_t(raw[3]) << 24;
        v = bits_float(u);
    } else {
        const uint16_t h = uint16_t(raw[0] | raw[1] << 8);
        v = dtype == NF4_FLOAT16 ? to_float(half_t{h}) : to_float(bfloat16_t{h});
    }
    fail_non_finite(int64_t(index), v);
}

template <int BITS>
void launch_quantize(const void *x, nf4_dtype dtype, int64_t n, int64_t blocksize, const SearchTable &table,
                     uint8_t *out, float *absmax, const float *sub, Flags *flags, cudaStream_t s) {
    const int64_t nblocks = (n + blocksize - 1) / blocksize;
    dispatch_dtype(dtype, [&](auto tag) {
        using T = decltype(tag);
        quantize_kernel<BITS, T><<<grid_for(nblocks, kThreads / 32), kThreads, 0, s>>>(
            static_cast<const T *>(x), n, blocksize, table, out, absmax, sub, flags);
    });
    check_launch("quantize kernel launch");
}

template <int BITS>
nf4_status quantize(const void *x, nf4_dtype dtype, int64_t n, int64_t blocksize, const float *codebook,
                    uint8_t *out, float *absmax, void *stream) {
    return guarded([&] {
        check_sizes(n, blocksize);
        check_dtype(dtype);
        require(x != nullptr && out != nullptr && absmax != nullptr, "input or output pointer is NULL");
        require_disjoint({buffer(BITS == 4 ? "packed" : "codes", out, BITS == 4 ? ceil_div(n, 2) : n, 1),
                          buffer("absmax", absmax, ceil_div(n, blocksize), 4)},
                         {buffer("x", x, n, nf4_dtype_size(dtype))});
        const SearchTable table = make_search_table(codebook, 1 << BITS);
        require_device();
        const cudaStream_t s = as_stream(stream);
        Scratch scratch(s);
        launch_quantize<BITS>(x, dtype, n, blocksize, table, out, absmax, nullptr, scratch.get(), s);
        const Flags f = scratch.read();
        if (f.bad_input != kNone) fail_bad_input(x, dtype, f.bad_input, s);
    });
}

bool aligned(const void *p, uintptr_t a) { return (reinterpret_cast<uintptr_t>(p) & (a - 1)) == 0; }

template <int BITS>
nf4_status dequantize(const uint8_t *in, const Scales &sc, int64_t n, int64_t blocksize, const float *codebook,
                      const float *dyn_code, void *out, nf4_dtype dtype, void *stream) {
    return guarded([&] {
        check_sizes(n, blocksize);
        check_dtype(dtype);
        require(in != nullptr && out != nullptr, "input or output pointer is NULL");
        require(sc.absmax != nullptr || (sc.qabsmax != nullptr && sc.nested != nullptr),
                "block scale pointer is NULL");
        require(codebook != nullptr, "codebook pointer is NULL");
        const int64_t nblocks = ceil_div(n, blocksize);
        const Buffer codes = buffer(BITS == 4 ? "packed" : "codes", in, BITS == 4 ? ceil_div(n, 2) : n, 1);
        const Buffer bout = buffer("out", out, n, nf4_dtype_size(dtype));
        if (sc.absmax != nullptr)
            require_disjoint({bout}, {codes, buffer("absmax", sc.absmax, nblocks, 4)});
        else
            require_disjoint({bout}, {codes, buffer("qabsmax", sc.qabsmax, nblocks, 1),
                                      buffer("nested_absmax", sc.nested, ceil_div(nblocks, NF4_DQ_BLOCKSIZE), 4)});
        Table256 cb{}, dyn{};
        for (int i = 0; i < (1 << BITS); ++i) cb.v[i] = codebook[i];
        if (sc.absmax == nullptr) {
            require(dyn_code != nullptr, "dyn_code pointer is NULL");
            if (!is_finite(sc.offset)) fail(NF4_ERROR_NON_FINITE, "double-quantization offset is not finite");
            for (int i = 0; i < 256; ++i) dyn.v[i] = dyn_code[i];
        }
        require_device();
        const cudaStream_t s = as_stream(stream);
        const bool vec = aligned(in, BITS == 4 ? 8 : 16) && aligned(out, 16);
        const bool tiles = vec && !first_kernels_forced();
        // tiles: as many blocks as fit on the GPU at once, fewer for small n
        const int64_t tile = 4 * 32 * (16 / nf4_dtype_size(dtype));
        const unsigned grid = tiles ? std::min(resident_grid(kThreads), grid_for(ceil_div(n, tile), kThreads / 32))
                                    : grid_for((n + 15) / 16, kThreads);
        dispatch_dtype(dtype, [&](auto tag) {
            using T = decltype(tag);
            T *o = static_cast<T *>(out);
            if (tiles)
                dequantize_tiles_kernel<BITS, T><<<grid, kThreads, 0, s>>>(in, sc, n, log2_exact(blocksize), cb, dyn, o);
            else if (vec)
                dequantize_kernel<BITS, T, true><<<grid, kThreads, 0, s>>>(in, sc, n, blocksize, cb, dyn, o);
            else
                dequantize_kernel<BITS, T, false><<<grid, kThreads, 0, s>>>(in, sc, n, blocksize, cb, dyn, o);
        });
        check_launch("dequantize kernel launch");
    });
}

Scales plain_scales(const float *absmax) { return Scales{absmax, nullptr, nullptr, 0.0f}; }

}  // namespace
}  // namespace cuda
}  // namespace nf4core

using namespace nf4core;
using namespace nf4core::cuda;

extern "C" {

nf4_status nf4_cuda_quantize_4bit(const void *x, nf4_dtype dtype, int64_t n, int64_t blocksize,
                                  const float *codebook, uint8_t *packed, float *absmax, void *stream) {
    return cuda::quantize<4>(x, dtype, n, blocksize, codebook, packed, absmax, stream);
}

nf4_status nf4_cuda_quantize_8bit(const void *x, nf4_dtype dtype, int64_t n, int64_t blocksize,
                                  const float *codebook, uint8_t *codes, float *absmax, void *stream) {
    return cuda::quantize<8>(x, dtype, n, blocksize, codebook, codes, absmax, stream);
}

nf4_status nf4_cuda_dequantize_4bit(const uint8_t *packed, const float *absmax, int64_t n, int64_t blocksize,
                                    const float *codebook, void *out, nf4_dtype out_dtype, void *stream) {
    if (absmax == nullptr) {
        return guarded([] { fail(NF4_ERROR_INVALID_ARGUMENT, "absmax pointer is NULL"); });
    }
    return cuda::dequantize<4>(packed, plain_scales(absmax), n, blocksize, codebook, nullptr, out, out_dtype, stream);
}

nf4_status nf4_cuda_dequantize_4bit_dq(const uint8_t *packed, const uint8_t *qabsmax, const float *nested_absmax,
                                       float offset, int64_t n, int64_t blocksize, const float *codebook,
                                       const float *dyn_code, void *out, nf4_dtype out_dtype, void *stream) {
    const Scales sc{nullptr, qabsmax, nested_absmax, offset};
    return cuda::dequantize<4>(packed, sc, n, blocksize, codebook, dyn_code, out, out_dtype, stream);
}

nf4_status nf4_cuda_dequantize_8bit(const uint8_t *codes, const float *absmax, int64_t n, int64_t blocksize,
                                    const float *codebook, void *out, nf4_dtype out_dtype, void *stream) {
    if (absmax == nullptr) {
        return guarded([] { fail(NF4_ERROR_INVALID_ARGUMENT, "absmax pointer is NULL"); });
    }
    return cuda::dequantize<8>(codes, plain_scales(absmax), n, blocksize, codebook, nullptr, out, out_dtype, stream);
}

nf4_status nf4_cuda_double_quantize(const float *absmax, int64_t nblocks, const float *dyn_code, uint8_t *qabsmax,
                                    float *nested_absmax, float *offset, void *stream) {
    return guarded([&] {
        require(nblocks >= 1, "number of block scales must be at least 1, got " + std::to_string(nblocks));
        require(absmax != nullptr && qabsmax != nullptr && nested_absmax != nullptr && offset != nullptr,
                "input or output pointer is NULL");
        // offset is host memory, written after the device work
        require_disjoint({buffer("qabsmax", qabsmax, nblocks, 1),
                          buffer("nested_absmax", nested_absmax, ceil_div(nblocks, NF4_DQ_BLOCKSIZE), 4)},
                         {buffer("absmax", absmax, nblocks, 4)});
        const SearchTable table = make_search_table(dyn_code, 256);
        require_device();
        const cudaStream_t s = as_stream(stream);
        Scratch scratch(s);
        dq_mean_kernel<<<1, 32, 0, s>>>(absmax, nblocks, scratch.get());
        check_launch("double-quantization mean kernel launch");
        launch_quantize<8>(absmax, NF4_FLOAT32, nblocks, NF4_DQ_BLOCKSIZE, table, qabsmax, nested_absmax,
                           &scratch.get()->mean, scratch.get(), s);
        const Flags f = scratch.read();
        if (f.bad_scale != kNone) {  // read the value back: NaN/Inf and negative are different errors (CPU's)
            float v = 0.0f;
            check(cudaMemcpyAsync(&v, absmax + f.bad_scale, sizeof v, cudaMemcpyDeviceToHost, s), "cudaMemcpyAsync");
            check(cudaStreamSynchronize(s), "cudaStreamSynchronize");
            fail_bad_scale(int64_t(f.bad_scale), v);
        }
        require(f.bad_input == kNone, "centred block scale is not finite");
        *offset = f.mean;
    });
}

nf4_status nf4_cuda_double_dequantize(const uint8_t *qabsmax, const float *nested_absmax, float offset,
                                      int64_t nblocks, const float *dyn_code, float *absmax, void *stream) {
    return guarded([&] {
        require(nblocks >= 1, "number of block scales must be at least 1, got " + std::to_string(nblocks));
        require(qabsmax != nullptr && nested_absmax != nullptr && absmax != nullptr,
                "input or output pointer is NULL");
        require(dyn_code != nullptr, "dyn_code pointer is NULL");
        require_disjoint({buffer("absmax", absmax, nblocks, 4)},
                         {buffer("qabsmax", qabsmax, nblocks, 1),
                          buffer("nested_absmax", nested_absmax, ceil_div(nblocks, NF4_DQ_BLOCKSIZE), 4)});
        if (!is_finite(offset)) fail(NF4_ERROR_NON_FINITE, "double-quantization offset is not finite");
        Table256 dyn;
        for (int i = 0; i < 256; ++i) dyn.v[i] = dyn_code[i];
        require_device();
        const cudaStream_t s = as_stream(stream);
        double_dequantize_kernel<<<grid_for(nblocks, kThreads), kThreads, 0, s>>>(qabsmax, nested_absmax, offset,
                                                                                  nblocks, dyn, absmax);
        check_launch("double-dequantization kernel launch");
    });
}

}  // extern "C"
