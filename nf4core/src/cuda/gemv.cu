// The 4-bit GEMV on CUDA: y (M x N) = x (M x K) . W^T for M = 1..8
// (token-by-token generation), W given by its packed NF4/FP4 codes and block
// scales (float32, or double-quantized and decoded on the fly).
//
// Two kernels:
//  - gemv_rows_kernel (K % 32 == 0, 16-byte aligned packed and x: every
//    layer of a transformer): one thread block of up to 128 threads owns R
//    rows of W and its threads stride along K over 32-weight chunks (16 bytes
//    of codes, one block scale), two chunks per step with all their loads
//    issued first; each load of x serves the R rows. Within a chunk the
//    products codebook[code] * x are summed first and the scale applied once
//    (as the CPU AVX-512 kernel does); the threads' partial sums are combined
//    by warp shuffles, then across warps in shared memory, in a fixed order.
//    R (1, 2, 4, 8) is chosen from M and N; NF4CORE_CUDA_GEMV_ROWS forces it
//    (for benchmarks and tests).
//  - gemv_kernel: any K and alignment, one weight per lane step (the first
//    kernel; NF4CORE_CUDA_KERNELS=v1 selects it for every shape, so that a
//    benchmark can compare the two in one run).
// The summation order differs from nf4_matmul_4bit_ref, so results agree with
// the CPU to float32 rounding, not bit for bit. The codebook sits in shared
// memory: 16 floats in 16 different banks, so the lanes' lookups never
// conflict.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "../error.hpp"
#include "../numeric.hpp"
#include "common.cuh"
#include "nf4core/cuda.h"

namespace nf4core {
namespace cuda {
namespace {

constexpr int kThreads = 256;  // 8 warps
constexpr int kRows = 2;       // rows of W per warp
constexpr int kMaxM = 8;

// 8 consecutive elements of x as float (one 16-byte load; two for float32).
template <typename T>
__device__ __forceinline__ void load8(const T *p, float (&v)[8]) {
    const uint4 a = __ldg(reinterpret_cast<const uint4 *>(p));
    const uint32_t w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        T lo, hi;  // little-endian: the first element in the low half
        lo.bits = uint16_t(w[j] & 0xFFFFu);
        hi.bits = uint16_t(w[j] >> 16);
        v[2 * j] = to_float(lo);
        v[2 * j + 1] = to_float(hi);
    }
}

// float16: the hardware's conversion, exact for every value (two per instruction)
template <>
__device__ __forceinline__ void load8<half_t>(const half_t *p, float (&v)[8]) {
    const uint4 a = __ldg(reinterpret_cast<const uint4 *>(p));
    const uint32_t w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const float2 f = __half22float2(*reinterpret_cast<const __half2 *>(&w[j]));  // .x: the low half
        v[2 * j] = f.x;
        v[2 * j + 1] = f.y;
    }
}

template <>
__device__ __forceinline__ void load8<float>(const float *p, float (&v)[8]) {
    const float4 a = __ldg(reinterpret_cast<const float4 *>(p));
    const float4 b = __ldg(reinterpret_cast<const float4 *>(p) + 1);
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}

// VEC: K % 32 == 0 and 16-byte aligned packed and x, so each lane reads whole
// 32-weight chunks that lie in one block. Otherwise one weight per lane step.
template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads)
    gemv_kernel(const T *__restrict__ x, int M, int64_t N, int64_t K, const uint8_t *__restrict__ packed,
                const Scales sc, int64_t blocksize, const __grid_constant__ Table16 cb_arg,
                const __grid_constant__ Table256 dyn_arg, T *__restrict__ y) {
    __shared__ float cb[16];
    __shared__ float dyn[256];
    for (int i = threadIdx.x; i < 16; i += blockDim.x) cb[i] = cb_arg.v[i];
    if (sc.absmax == nullptr)
        for (int i = threadIdx.x; i < 256; i += blockDim.x) dyn[i] = dyn_arg.v[i];
    __syncthreads();
    const int lane = int(threadIdx.x & 31u);
    const int64_t nwarps = (int64_t(gridDim.x) * blockDim.x) >> 5;
    for (int64_t n0 = ((int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5) * kRows; n0 < N;
         n0 += nwarps * kRows) {
        float acc[kRows][kMaxM];
#pragma unroll
        for (int r = 0; r < kRows; ++r)
#pragma unroll
            for (int m = 0; m < kMaxM; ++m) acc[r][m] = 0.0f;
        if (VEC) {
            const int64_t chunks = K >> 5;
            for (int64_t j = lane; j < chunks; j += 32) {
                uint32_t w[kRows][4];
                float s[kRows];
#pragma unroll
                for (int r = 0; r < kRows; ++r) {
                    if (n0 + r < N) {
                        const int64_t e0 = (n0 + r) * K + 32 * j;
                        const uint4 q = __ldg(reinterpret_cast<const uint4 *>(packed + (e0 >> 1)));
                        w[r][0] = q.x, w[r][1] = q.y, w[r][2] = q.z, w[r][3] = q.w;
                        s[r] = block_scale_at(sc, dyn, e0 / blocksize);
                    } else {
                        w[r][0] = w[r][1] = w[r][2] = w[r][3] = 0u;
                        s[r] = 0.0f;
                    }
                }
#pragma unroll
                for (int m = 0; m < kMaxM; ++m) {
                    if (m >= M) break;
                    const T *xm = x + int64_t(m) * K + 32 * j;
                    float part[kRows];
#pragma unroll
                    for (int r = 0; r < kRows; ++r) part[r] = 0.0f;
#pragma unroll
                    for (int q = 0; q < 4; ++q) {
                        float xv[8];
                        load8<T>(xm + 8 * q, xv);
#pragma unroll
                        for (int r = 0; r < kRows; ++r) {
#pragma unroll
                            for (int e = 0; e < 8; ++e) {
                                // byte e/2 of the word; the even element in its high nibble
                                const unsigned code = (w[r][q] >> (8 * (e >> 1) + ((e & 1) ? 0 : 4))) & 0x0Fu;
                                part[r] = fmaf(cb[code], xv[e], part[r]);
                            }
                        }
                    }
#pragma unroll
                    for (int r = 0; r < kRows; ++r) acc[r][m] = fmaf(part[r], s[r], acc[r][m]);
                }
            }
        } else {
            for (int64_t k = lane; k < K; k += 32) {
#pragma unroll
                for (int r = 0; r < kRows; ++r) {
                    if (n0 + r >= N) break;
                    const int64_t i = (n0 + r) * K + k;
                    const float wv = decode_value(cb[nibble_at(packed, i)], block_scale_at(sc, dyn, i / blocksize));
#pragma unroll
                    for (int m = 0; m < kMaxM; ++m) {
                        if (m >= M) break;
                        acc[r][m] = fmaf(to_float(x[int64_t(m) * K + k]), wv, acc[r][m]);
                    }
                }
            }
        }
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
#pragma unroll
            for (int m = 0; m < kMaxM; ++m) {
                if (m >= M) break;
                const float v = warp_sum(acc[r][m]);
                if (lane == 0 && n0 + r < N) y[int64_t(m) * N + n0 + r] = from_float<T>(v);
            }
        }
    }
}

constexpr int kRowsThreads = 128;  // threads of gemv_rows_kernel (at most)

template <int R>
__device__ __forceinline__ void load_rows(const uint8_t *__restrict__ packed, const Scales &sc, const float *dyn,
                                          int64_t n0, int64_t N, int64_t K, int64_t c, int bshift,
                                          bool valid, uint4 (&w)[R], float (&s)[R]) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
        if (valid && n0 + r < N) {
            const int64_t e0 = (n0 + r) * K + 32 * c;
            w[r] = __ldg(reinterpret_cast<const uint4 *>(packed + (e0 >> 1)));
            s[r] = block_scale_at(sc, dyn, e0 >> bshift);
        } else {
            w[r] = make_uint4(0u, 0u, 0u, 0u);
            s[r] = 0.0f;
        }
    }
}

// acc[r][m] += scale_r * sum_e codebook[code_r,e] * x[m, 32c + e] over one
// chunk; each weight is looked up once for all MT rows of x.
template <typename T, int R, int MT>
__device__ __forceinline__ void chunk_dot(const T *__restrict__ x, int M, int64_t K, int64_t c, uint32_t cb_base,
                                          const uint4 (&w)[R], const float (&s)[R], float (&acc)[R][MT]) {
    float part[R][MT];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int m = 0; m < MT; ++m) part[r][m] = 0.0f;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        float xv[MT][8];
#pragma unroll
        for (int m = 0; m < MT; ++m) {
            if (m < M) {
                load8<T>(x + int64_t(m) * K + 32 * c + 8 * q, xv[m]);
            } else {
#pragma unroll
                for (int e = 0; e < 8; ++e) xv[m][e] = 0.0f;
            }
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const uint32_t word = q == 0 ? w[r].x : q == 1 ? w[r].y : q == 2 ? w[r].z : w[r].w;
            // byte offsets (code * 4) into cb, one per byte: of the even
            // elements (high nibbles) and of the odd ones (low nibbles)
            const uint32_t even4 = (word >> 2) & 0x3C3C3C3Cu, odd4 = (word << 2) & 0x3C3C3C3Cu;
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                // the shared-memory address of cb[code] in one byte permute:
                // byte 0 the offset, bytes 1-3 those of cb's address (256-aligned)
                const uint32_t addr = __byte_perm((e & 1) ? odd4 : even4, cb_base, 0x7650u | unsigned(e >> 1));
                float wv;
                asm("ld.shared.f32 %0, [%1];" : "=f"(wv) : "r"(addr));
#pragma unroll
                for (int m = 0; m < MT; ++m) part[r][m] = fmaf(wv, xv[m][e], part[r][m]);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int m = 0; m < MT; ++m) acc[r][m] = fmaf(part[r][m], s[r], acc[r][m]);
}

// MT: rows of x the kernel is compiled for (M <= MT; the rows past M are zeros
// and not written).
template <typename T, int R, int MT>
__global__ void __launch_bounds__(kRowsThreads)
    gemv_rows_kernel(const T *__restrict__ x, int M, int64_t N, int64_t K, const uint8_t *__restrict__ packed,
                     const Scales sc, int bshift, const __grid_constant__ Table16 cb_arg,
                     const float *__restrict__ dyn_dev, T *__restrict__ y) {
    __shared__ __align__(256) float cb[16];
    __shared__ float dyn[256];
    __shared__ float red[kRowsThreads / 32][R * MT];
    for (int i = threadIdx.x; i < 16; i += blockDim.x) cb[i] = cb_arg.v[i];
    if (sc.absmax == nullptr)
        for (int i = threadIdx.x; i < 256; i += blockDim.x) dyn[i] = __ldg(dyn_dev + i);
    __syncthreads();
    const int lane = int(threadIdx.x & 31u), warp = int(threadIdx.x >> 5), nwarps = int(blockDim.x >> 5);
    const int64_t chunks = K >> 5, nt = blockDim.x;
    const uint32_t cb_base = uint32_t(__cvta_generic_to_shared(cb));
    for (int64_t n0 = int64_t(blockIdx.x) * R; n0 < N; n0 += int64_t(gridDim.x) * R) {
        float acc[R][MT];
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
            for (int m = 0; m < MT; ++m) acc[r][m] = 0.0f;
        for (int64_t c = threadIdx.x; c < chunks; c += 2 * nt) {
            uint4 w0[R], w1[R];
            float s0[R], s1[R];
            const bool second = c + nt < chunks;
            load_rows<R>(packed, sc, dyn, n0, N, K, c, bshift, true, w0, s0);
            load_rows<R>(packed, sc, dyn, n0, N, K, c + nt, bshift, second, w1, s1);
            chunk_dot<T, R, MT>(x, M, K, c, cb_base, w0, s0, acc);
            if (second) chunk_dot<T, R, MT>(x, M, K, c + nt, cb_base, w1, s1, acc);
        }
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
            for (int m = 0; m < MT; ++m) {
                const float v = warp_sum(acc[r][m]);
                if (lane == 0) red[warp][r * MT + m] = v;
            }
        __syncthreads();
        for (int i = int(threadIdx.x); i < R * MT; i += int(blockDim.x)) {
            const int r = i / MT, m = i % MT;
            if (m < M && n0 + r < N) {
                float v = red[0][i];
                for (int j = 1; j < nwarps; ++j) v += red[j][i];
                y[int64_t(m) * N + n0 + r] = from_float<T>(v);
            }
        }
        __syncthreads();  // red is reused by the next group of rows
    }
}

template <typename T, int R, int MT>
void launch_rows(unsigned grid, unsigned threads, cudaStream_t s, const T *x, int M, int64_t N, int64_t K,
                 const uint8_t *packed, const Scales &sc, int64_t blocksize, const Table16 &cb, const float *dyn,
                 T *y) {
    gemv_rows_kernel<T, R, MT><<<grid, threads, 0, s>>>(x, M, N, K, packed, sc, log2_exact(blocksize), cb, dyn, y);
}

// Rows of W per thread block: enough that each load of x serves several rows,
// few enough that the accumulators (R x MT <= 8) stay in registers and that a
// layer's rows still fill the GPU. NF4CORE_CUDA_GEMV_ROWS=1|2|4|8 overrides
// (clamped to R x MT <= 8).
int rows_per_block(int MT, int64_t N) {
    int r = MT <= 2 ? 4 : 8 / MT;
    while (r > 1 && N / r < 1024) r /= 2;  // keep >= 1024 blocks when N allows
    if (const char *e = std::getenv("NF4CORE_CUDA_GEMV_ROWS")) {
        const int f = std::atoi(e);
        if (f == 1 || f == 2 || f == 4 || f == 8) r = f;
    }
    while (r * MT > 8) r /= 2;
    return r;
}

bool aligned16(const void *p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

nf4_status gemv(const void *x, nf4_dtype dtype, int64_t M, int64_t N, int64_t K, const uint8_t *packed,
                const Scales &sc, int64_t blocksize, const float *codebook, const float *dyn_code, void *y,
                void *stream) {
    return guarded([&] {
        require(M >= 1 && M <= kMaxM, "the CUDA GEMV takes 1 to 8 rows of x (M), got " + std::to_string(M));
        require(N >= 1 && K >= 1,
                "matrix sizes must be positive, got N=" + std::to_string(N) + " K=" + std::to_string(K));
        require(nf4_blocksize_is_valid(blocksize) != 0, "invalid blocksize " + std::to_string(blocksize));
        check_dtype(dtype);
        require(x && packed && y, "input or output pointer is NULL");
        require(sc.absmax != nullptr || (sc.qabsmax != nullptr && sc.nested != nullptr),
                "block scale pointer is NULL");
        check_table(codebook, 16, "codebook");
        const int64_t esize = nf4_dtype_size(dtype);
        const int64_t weights = checked_mul(N, K, "N x K (weight elements)"), nblocks = ceil_div(weights, blocksize);
        const Buffer w = buffer("packed", packed, ceil_div(weights, 2), 1);
        const Buffer bx = buffer("x", x, checked_mul(M, K, "x (M rows)"), esize);
        const Buffer by = buffer("y", y, checked_mul(M, N, "y (M rows)"), esize);
        if (sc.absmax != nullptr)
            require_disjoint({by}, {bx, w, buffer("scales", sc.absmax, nblocks, 4)});
        else
            require_disjoint({by}, {bx, w, buffer("qabsmax", sc.qabsmax, nblocks, 1),
                                    buffer("nested_absmax", sc.nested, ceil_div(nblocks, NF4_DQ_BLOCKSIZE), 4)});
        Table16 cb;
        Table256 dyn{};
        for (int i = 0; i < 16; ++i) cb.v[i] = codebook[i];
        if (sc.absmax == nullptr) {
            check_table(dyn_code, 256, "dyn_code");
            if (!is_finite(sc.offset)) fail(NF4_ERROR_NON_FINITE, "double-quantization offset is not finite");
            for (int i = 0; i < 256; ++i) dyn.v[i] = dyn_code[i];
        }
        require_device();
        const cudaStream_t s = as_stream(stream);
        const bool vec = K % 32 == 0 && aligned16(packed) && aligned16(x);
        const bool rows = vec && !first_kernels_forced();
        const int MT = M == 1 ? 1 : M == 2 ? 2 : M <= 4 ? 4 : 8;
        const int R = rows ? rows_per_block(MT, N) : 0;
        // one warp per 2 x 32 chunks of a row, at most kRowsThreads threads
        const int64_t warps = ceil_div(K >> 5, 64);
        const unsigned threads = unsigned(32 * (warps < kRowsThreads / 32 ? warps : kRowsThreads / 32));
        const unsigned grid = rows ? grid_for(N, R) : grid_for(N, int64_t(kThreads / 32) * kRows);
        dispatch_dtype(dtype, [&](auto tag) {
            using T = decltype(tag);
            const T *xt = static_cast<const T *>(x);
            T *yt = static_cast<T *>(y);
            const int m = int(M);
            if (rows) {
                const float *dyn_dev = sc.absmax == nullptr ? device_table(dyn.v, 256) : nullptr;
                const auto go = [&](auto r_tag, auto mt_tag) {
                    launch_rows<T, decltype(r_tag)::value, decltype(mt_tag)::value>(grid, threads, s, xt, m, N, K,
                                                                                     packed, sc, blocksize, cb, dyn_dev,
                                                                                     yt);
                };
                using I1 = std::integral_constant<int, 1>;
                using I2 = std::integral_constant<int, 2>;
                using I4 = std::integral_constant<int, 4>;
                using I8 = std::integral_constant<int, 8>;
                if (MT == 1) {
                    if (R == 1) go(I1{}, I1{}); else if (R == 2) go(I2{}, I1{}); else if (R == 4) go(I4{}, I1{}); else go(I8{}, I1{});
                } else if (MT == 2) {
                    if (R == 1) go(I1{}, I2{}); else if (R == 2) go(I2{}, I2{}); else go(I4{}, I2{});
                } else if (MT == 4) {
                    if (R == 1) go(I1{}, I4{}); else go(I2{}, I4{});
                } else {
                    go(I1{}, I8{});
                }
            } else if (vec) {
                gemv_kernel<T, true><<<grid, kThreads, 0, s>>>(xt, m, N, K, packed, sc, blocksize, cb, dyn, yt);
            } else {
                gemv_kernel<T, false><<<grid, kThreads, 0, s>>>(xt, m, N, K, packed, sc, blocksize, cb, dyn, yt);
            }
        });
        check_launch("gemv kernel launch");
    });
}

}  // namespace
}  // namespace cuda
}  // namespace nf4core

extern "C" {

nf4_status nf4_cuda_gemv_4bit(const void *x, nf4_dtype dtype, int64_t M, int64_t N, int64_t K, const uint8_t *packed,
                              const float *scales, int64_t blocksize, const float *codebook, void *y, void *stream) {
    const nf4core::cuda::Scales sc{scales, nullptr, nullptr, 0.0f};
    if (scales == nullptr)
        return nf4core::guarded([] { nf4core::fail(NF4_ERROR_INVALID_ARGUMENT, "scales pointer is NULL"); });
    return nf4core::cuda::gemv(x, dtype, M, N, K, packed, sc, blocksize, codebook, nullptr, y, stream);
}

nf4_status nf4_cuda_gemv_4bit_dq(const void *x, nf4_dtype dtype, int64_t M, int64_t N, int64_t K,
                                 const uint8_t *packed, const uint8_t *qabsmax, const float *nested_absmax,
                                 float offset, int64_t blocksize, const float *codebook, const float *dyn_code,
                                 void *y, void *stream) {
    const nf4core::cuda::Scales sc{nullptr, qabsmax, nested_absmax, offset};
    return nf4core::cuda::gemv(x, dtype, M, N, K, packed, sc, blocksize, codebook, dyn_code, y, stream);
}

}  // extern "C"
