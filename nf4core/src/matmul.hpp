// Products with a 4-bit matrix: arguments shared by the reference and the
// optimized kernels (matmul.cpp; matmul_<isa>.cpp on the skeleton of
// matmul_rows.hpp; matmul_amx.cpp).
#ifndef NF4CORE_SRC_MATMUL_HPP
#define NF4CORE_SRC_MATMUL_HPP

#include <cstdint>

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
    // float32 x with many rows: panels of W decoded once for every row of x, then a
    // register-blocked FMA micro-kernel (matmul_panel.hpp; x86 only, nullptr elsewhere),
    // used from these rows of x on (y = x W^T, y = x W; fewer go to f32)
    MatmulKernel panel_f32;
    int64_t panel_rows_transposed, panel_rows_plain;
};

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
// Rows of float32 x from which the panel product is used where the path has one:
// the kernels' own crossover (MatmulKernels), or NF4CORE_PANEL_ROWS for both
// directions when set (for measuring; 0 or unset: the kernels').
int64_t panel_min_rows(const MatmulKernels &k, bool transpose);

// The kernels of the active ISA (dispatch.cpp), nullptr for scalar.
const MatmulKernels *active_matmul_kernels();

}  // namespace nf4core

#endif  // NF4CORE_SRC_MATMUL_HPP
