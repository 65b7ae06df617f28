// Products with a 4-bit matrix: argument checks, the scalar reference and
// dispatch to the optimized kernel of the active ISA.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#include "error.hpp"
#include "kernels.hpp"
#include "matmul.hpp"
#include "nf4core/matmul.h"
#include "nf4core/quantize.h"
#include "parallel.hpp"
#include "sizes.hpp"

namespace nf4core {
namespace {

// The byte ranges of W: its N x K packed codes and float32 block scales (the
// element count N * K checked first, so a wrapped product is never used).
Buffer packed_buffer(const uint8_t *packed, int64_t N, int64_t K) {
    return buffer("packed", packed, ceil_div(checked_mul(N, K, "N x K (weight elements)"), 2), 1);
}
Buffer scales_buffer(const float *scales, int64_t N, int64_t K, int64_t blocksize) {
    return buffer("scales", scales, ceil_div(N * K, blocksize), 4);
}

std::atomic<bool> amx_allowed{[] {
    const char *env = std::getenv("NF4CORE_AMX");
    return !(env && std::string(env) == "0");
}()};

template <typename T>
inline float weight(const MatmulArgs &a, int64_t n, int64_t k) {
    const int64_t i = n * a.K + k;
    return decode_value(a.codebook[nibble_at(a.packed, i)], a.scales[i / a.blocksize]);
}

// The readable definition: float32 products summed in index order.
template <typename T>
void matmul_ref(const MatmulArgs &a, int64_t c0, int64_t c1) {
    const T *x = static_cast<const T *>(a.x);
    T *y = static_cast<T *>(a.y);
    for (int64_t m = 0; m < a.M; ++m) {
        for (int64_t c = c0; c < c1; ++c) {
            float acc = 0.0f;
            if (a.transpose) {  // y[m, n] = sum_k x[m, k] W[n, k]
                for (int64_t k = 0; k < a.K; ++k) acc += to_float(x[m * a.K + k]) * weight<T>(a, c, k);
                y[m * a.N + c] = from_float<T>(acc);
            } else {  // y[m, k] = sum_n x[m, n] W[n, k]
                for (int64_t n = 0; n < a.N; ++n) acc += to_float(x[m * a.N + n]) * weight<T>(a, n, c);
                y[m * a.K + c] = from_float<T>(acc);
            }
        }
    }
}

nf4_status matmul_impl(const void *x, nf4_dtype dtype, int64_t M, int64_t N, int64_t K, const uint8_t *packed,
                       const float *scales, int64_t blocksize, const float *codebook, int32_t transpose_w, void *y,
                       bool reference) {
    return guarded([&] {
        require(M >= 1 && N >= 1 && K >= 1, "matrix sizes must be positive, got M=" + std::to_string(M) +
                                                 " N=" + std::to_string(N) + " K=" + std::to_string(K));
        require(nf4_blocksize_is_valid(blocksize), "invalid blocksize " + std::to_string(blocksize));
        const nf4_dtype dt = checked_dtype(dtype, false, "x");
        require(x && packed && scales && codebook && y, "input or output pointer is NULL");
        const int64_t esize = nf4_dtype_size(dt);
        const Buffer w = packed_buffer(packed, N, K);
        const int64_t cols_x = transpose_w ? K : N, cols_y = transpose_w ? N : K;
        require_disjoint({buffer("y", y, checked_mul(M, cols_y, "y (M rows)"), esize)},
                         {buffer("x", x, checked_mul(M, cols_x, "x (M rows)"), esize), w,
                          scales_buffer(scales, N, K, blocksize), buffer("codebook", codebook, 16, 4)});
        for (int i = 0; i < 16; ++i) require(is_finite(codebook[i]), "codebook entry is not finite");
        const MatmulArgs args{x, M, N, K, packed, scales, blocksize, codebook, transpose_w != 0, y};
        const int64_t cols = args.transpose ? N : K;
        MatmulKernel kernel = dt == NF4_FLOAT32 ? matmul_ref<float> : matmul_ref<bfloat16_t>;
        const MatmulKernels *fast = active_matmul_kernels();
        const bool whole_blocks = K % 16 == 0 && K % blocksize == 0;
        if (!reference && fast && whole_blocks)
            kernel = dt == NF4_FLOAT32 ? fast->f32 : fast->bf16;
        if (reference) {
            kernel(args, 0, cols);
            return;
        }
        if (dt == NF4_BFLOAT16 && M >= kAmxMinRows && amx_in_use() && amx_matmul_bf16(args)) return;
        if (dt == NF4_FLOAT32 && fast && whole_blocks && fast->panel_f32 &&
            M >= panel_min_rows(*fast, args.transpose)) {
            // Tasks of whole panels (matmul_panel.hpp: 128 output columns). A narrow
            // product (a model's small projections: N = 192 is two panels, one of
            // them half) would leave threads idle, so its rows are split too, in
            // blocks of at least 96 rows (each block decodes its panels again).
            const int64_t panels = (cols + 127) / 128;
            const int64_t want = 4 * int64_t(num_threads());
            const int64_t row_blocks =
                panels >= want ? 1 : std::max<int64_t>(1, std::min((want + panels - 1) / panels, M / 96));
            const int64_t rows_per = (M + row_blocks - 1) / row_blocks;
            const int64_t x_row = args.transpose ? K : N;
            parallel_for(panels * row_blocks, 1, [&](int64_t t0, int64_t t1) {
                for (int64_t t = t0; t < t1; ++t) {
                    const int64_t p = t % panels, m0 = (t / panels) * rows_per, m1 = std::min(M, m0 + rows_per);
                    if (m0 >= m1) continue;
                    MatmulArgs part = args;
                    part.x = static_cast<const float *>(args.x) + m0 * x_row;
                    part.y = static_cast<float *>(args.y) + m0 * cols;
                    part.M = m1 - m0;
                    fast->panel_f32(part, p * 128, std::min(cols, (p + 1) * 128));
                }
            });
            return;
        }
        // columns in multiples of 16 per task; about 64 Ki weights per task at least.
        // For x W a task reads a piece of every row of W, and each pass over a few
        // rows of W has a fixed cost (the x values broadcast, scaled codebooks):
        // pieces of 1024 / min(M, 8) columns or more keep it small. With 16-column
        // pieces, 2 threads took longer than 1 (M = 1, W 4096 x 4096: 1.3 against
        // 0.8 ms; docs/performance.md).
        const int64_t per_col = args.transpose ? K : N;
        int64_t min_cols = std::max<int64_t>(16, ((1 << 16) / std::max<int64_t>(1, per_col) + 15) / 16 * 16);
        if (!args.transpose) min_cols = std::max<int64_t>(min_cols, 1024 / std::min<int64_t>(M, 8));
        const int64_t groups = (cols + 15) / 16;
        parallel_for(groups, std::max<int64_t>(1, min_cols / 16), [&](int64_t g0, int64_t g1) {
            kernel(args, g0 * 16, std::min(cols, g1 * 16));
        });
    });
}

template <typename T>
void decode_tile_ref(const TileArgs &t, int64_t r0, int64_t r1) {
    T *out = static_cast<T *>(t.out);
    const int64_t width = t.k1 - t.k0;
    for (int64_t n = r0; n < r1; ++n)
        for (int64_t k = t.k0; k < t.k1; ++k) {
            const int64_t i = n * t.K + k;
            out[(n - t.n0) * width + (k - t.k0)] =
                from_float<T>(decode_value(t.codebook[nibble_at(t.packed, i)], t.scales[i / t.blocksize]));
        }
}

nf4_status decode_tile_impl(const uint8_t *packed, const float *scales, int64_t blocksize, const float *codebook,
                            int64_t N, int64_t K, int64_t n0, int64_t n1, int64_t k0, int64_t k1, nf4_dtype dtype,
                            void *out) {
    return guarded([&] {
        require(N >= 1 && K >= 1, "matrix sizes must be positive, got N=" + std::to_string(N) +
                                      " K=" + std::to_string(K));
        require(0 <= n0 && n0 < n1 && n1 <= N && 0 <= k0 && k0 < k1 && k1 <= K,
                "tile [" + std::to_string(n0) + ":" + std::to_string(n1) + ", " + std::to_string(k0) + ":" +
                    std::to_string(k1) + "] is empty or outside the " + std::to_string(N) + " x " +
                    std::to_string(K) + " matrix");
        require(nf4_blocksize_is_valid(blocksize), "invalid blocksize " + std::to_string(blocksize));
        const nf4_dtype dt = checked_dtype(dtype, false, "the tile");
        require(packed && scales && codebook && out, "input or output pointer is NULL");
        const Buffer w = packed_buffer(packed, N, K);
        require_disjoint({buffer("out", out, checked_mul(n1 - n0, k1 - k0, "tile elements"), nf4_dtype_size(dt))},
                         {w, scales_buffer(scales, N, K, blocksize), buffer("codebook", codebook, 16, 4)});
        const TileArgs args{K, packed, scales, blocksize, codebook, n0, n1, k0, k1, out};
        TileKernel kernel = dt == NF4_FLOAT32 ? decode_tile_ref<float> : decode_tile_ref<bfloat16_t>;
        if (const MatmulKernels *fast = active_matmul_kernels())
            kernel = dt == NF4_FLOAT32 ? fast->tile_f32 : fast->tile_bf16;
        const int64_t min_rows = std::max<int64_t>(1, (1 << 15) / (k1 - k0));
        parallel_for(n1 - n0, min_rows, [&](int64_t r0, int64_t r1) { kernel(args, n0 + r0, n0 + r1); });
    });
}

}  // namespace

int64_t panel_min_rows(const MatmulKernels &k, bool transpose) {
    static const int64_t forced = [] {
        const char *env = std::getenv("NF4CORE_PANEL_ROWS");
        return env && *env ? std::max<int64_t>(0, std::atoll(env)) : int64_t(0);
    }();
    if (forced > 0) return forced;
    return transpose ? k.panel_rows_transposed : k.panel_rows_plain;
}

bool amx_in_use() {
    return amx_allowed.load(std::memory_order_relaxed) && amx_available() &&
           std::strcmp(active_kernels().name, "avx512") == 0;
}

void allow_amx(bool allowed) { amx_allowed.store(allowed); }

#if !defined(NF4CORE_HAVE_AMX)
bool amx_available() { return false; }
bool amx_matmul_bf16(const MatmulArgs &) { return false; }
#endif

}  // namespace nf4core

extern "C" {

nf4_status nf4_matmul_4bit(const void *x, nf4_dtype dtype, int64_t M, int64_t N, int64_t K, const uint8_t *packed,
                           const float *scales, int64_t blocksize, const float *codebook, int32_t transpose_w,
                           void *y) {
    return nf4core::matmul_impl(x, dtype, M, N, K, packed, scales, blocksize, codebook, transpose_w, y, false);
}

nf4_status nf4_matmul_4bit_ref(const void *x, nf4_dtype dtype, int64_t M, int64_t N, int64_t K,
                               const uint8_t *packed, const float *scales, int64_t blocksize, const float *codebook,
                               int32_t transpose_w, void *y) {
    return nf4core::matmul_impl(x, dtype, M, N, K, packed, scales, blocksize, codebook, transpose_w, y, true);
}

nf4_status nf4_matmul_4bit_decode_tile(const uint8_t *packed, const float *scales, int64_t blocksize,
                                       const float *codebook, int64_t N, int64_t K, int64_t n0, int64_t n1,
                                       int64_t k0, int64_t k1, nf4_dtype dtype, void *out) {
    return nf4core::decode_tile_impl(packed, scales, blocksize, codebook, N, K, n0, n1, k0, k1, dtype, out);
}

}  // extern "C"
