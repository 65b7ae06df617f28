// Products with a 4-bit matrix: arguments shared by the reference and the
// optimized kernels (matmul.cpp, matmul_avx512.cpp, matmul_avx2.cpp,
// matmul_neon.cpp).
#ifndef NF4CORE_SRC_MATMUL_HPP
#define NF4CORE_SRC_MATMUL_HPP

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "numeric.hpp"

namespace nf4core {

struct MatmulArgs {
    const void *x;
    int64_t M, N, K;  // W is N x K
    const uint8_t *packed;
    const float *scales;
    int64_t blocksize;
    const float *codebook;
    bool transpose;   // y = x W^T (M x N), else y = x W (M x K)
    void *y;
};

// Computes output columns [c0, c1) (of N when transposed, of K otherwise).
using MatmulKernel = void (*)(const MatmulArgs &, int64_t c0, int64_t c1);

// A tile W[n0:n1, k0:k1] of the N x K matrix, decoded into a dense row-major
// buffer (row length k1 - k0) of float32 or bfloat16.
struct TileArgs {
    int64_t K;
    const uint8_t *packed;
    const float *scales;
    int64_t blocksize;
    const float *codebook;
    int64_t n0, n1, k0, k1;
    void *out;
};

// Decodes rows [r0, r1) of the tile (n0 <= r0 <= r1 <= n1).
using TileKernel = void (*)(const TileArgs &, int64_t r0, int64_t r1);

struct MatmulKernels {
    MatmulKernel f32;   // x and y float32
    MatmulKernel bf16;  // x and y bfloat16
    // the matmul kernels need K % 16 == 0 and K % blocksize == 0 (rows made of whole blocks)
    TileKernel tile_f32;   // any tile
    TileKernel tile_bf16;
};

// Internal linkage: these are compiled into files built with different ISA
// flags, and one merged inline copy could carry instructions another CPU lacks.
namespace {

// Shared by the per-ISA kernels (matmul_<isa>.cpp): x is taken in groups of up
// to 8 rows, and f(std::integral_constant<int, R>{}, m0) runs on rows m0 ..
// m0+R-1, so that each kernel is instantiated for R = 1..8 rows.
template <class F>
inline void for_row_groups(int64_t M, F &&f) {
    for (int64_t m0 = 0; m0 < M; m0 += 8) {
        switch (std::min<int64_t>(8, M - m0)) {
            case 1: f(std::integral_constant<int, 1>{}, m0); break;
            case 2: f(std::integral_constant<int, 2>{}, m0); break;
            case 3: f(std::integral_constant<int, 3>{}, m0); break;
            case 4: f(std::integral_constant<int, 4>{}, m0); break;
            case 5: f(std::integral_constant<int, 5>{}, m0); break;
            case 6: f(std::integral_constant<int, 6>{}, m0); break;
            case 7: f(std::integral_constant<int, 7>{}, m0); break;
            default: f(std::integral_constant<int, 8>{}, m0); break;
        }
    }
}

// n zeroed floats in a buffer owned by the calling thread, reused across calls:
// the partial sums of the y = x W kernels (rows of W streamed).
inline float *zeroed_partial_sums(size_t n) {
    thread_local std::vector<float> buf;
    if (buf.size() < n) buf.resize(n);
    std::fill(buf.data(), buf.data() + n, 0.0f);
    return buf.data();
}

}  // namespace

// Defined only where the path is compiled in, as the quantization kernels
// (kernels.hpp).
const MatmulKernels *avx512_matmul_kernels();
const MatmulKernels *avx2_matmul_kernels();
const MatmulKernels *neon_matmul_kernels();

// AMX-BF16 (matmul_amx.cpp): whether this CPU and OS can run tile instructions,
// and the product for bfloat16 x with many rows; false (nothing done) when AMX
// is unavailable or K % 32 != 0. The weight is rounded to bfloat16, as
// dequantize(q, bfloat16); sums are float32.
bool amx_available();
bool amx_matmul_bf16(const MatmulArgs &a);
// Whether products use AMX now: available, allowed (allow_amx; NF4CORE_AMX=0
// forbids it from the start) and the AVX-512 path active.
bool amx_in_use();
void allow_amx(bool allowed);
// Rows of x from which the AMX product is used (fewer go to the vector kernels;
// measured crossover 4-8 rows, benchmarks/bench_matmul.py).
constexpr int64_t kAmxMinRows = 5;

// The kernels of the active ISA (dispatch.cpp), nullptr for scalar.
const MatmulKernels *active_matmul_kernels();

}  // namespace nf4core

#endif  // NF4CORE_SRC_MATMUL_HPP
