// Float32 products with many rows of x (x86, AVX2 + FMA): panels of W decoded
// into float32 strips 16 output columns wide, then a register-blocked FMA
// micro-kernel (6 rows of x by 16 columns, 12 accumulators) over each strip;
// compiled for AVX-512, 16-lane FMAs over 4 strips at once (6 rows of x by 64
// columns, 24 accumulators), which a CPU with two full-width FMA units needs.
//
// The row kernels of matmul_rows.hpp decode every weight again for each group
// of up to 8 rows of x, and y = x W keeps its sums in memory (a load and a store
// per FMA): right for a few rows, slow for a training batch (AVX2 backward at
// 64 rows: 1.8-3.0x torch's dense float32 GEMM, docs/performance.md). Here a
// panel is decoded once for all M rows, as the tiled path of pyqlora.nn does
// for torch's GEMM, but small enough for L2 and without a second library:
//   y = x W   (transpose false): strip s of a panel is W[n0:n1, c + 16s : c + 16s + 16]
//             as decode_tile writes it ([n][16], row n of the strip contiguous;
//             on the AVX-512 path the panel's rows, [n][128], see kRowPanels);
//   y = x W^T (transpose true):  strip s is W[c + 16s : c + 16s + 16, k0:k1]^T
//             ([k][16]), decoded by decode_tile and transposed 8 x 8 at a time.
// Both then run C[6 x 16] += A[6 x inner] B[inner x 16], with A the rows of x
// read in place (one broadcast per element) and C the rows of y. The weights are
// decode_tile's, bit-identical to pq.dequantize; only the order of the float32
// sums differs from the reference: each output is summed over the inner chunks
// of panel_inner() elements in order, each chunk's sum kept in a register.
//
// Included only by the x86 ISA translation units (AVX2 flags or more).
#ifndef NF4CORE_SRC_MATMUL_PANEL_HPP
#define NF4CORE_SRC_MATMUL_PANEL_HPP

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>
#if defined(__has_include)
#if __has_include(<unistd.h>)
#include <unistd.h>
#endif
#endif

#include "matmul_rows.hpp"

namespace nf4core {
namespace {

constexpr int kPanelRows = 6;           // rows of x per micro-kernel call
constexpr int64_t kPanelStrip = 16;     // output columns per strip
constexpr int64_t kPanelCols = 128;     // output columns per panel (8 strips)
constexpr int64_t kPanelRowBlock = 96;  // rows of x per pass over the strips: L2-resident
// How y = x W lays out its decoded panel. Strips one after the other ([strip][n][16]:
// decode_tile once per strip, 8 bytes from each row of W) or rows of the whole
// panel ([n][128]: one decode_tile per panel, a row's 64 bytes at once). With
// 16-lane panels the rows are faster at 64 rows of x (time / dense 1.09-1.19 ->
// 0.83-0.97, Intel Xeon) and level from 512; the 8-lane kernel measured level
// either way (forced AVX2 on that Xeon), so the AVX2 path keeps the strips it was
// tuned with on AMD Zen 4. y = x W^T keeps strips on both: its rows layout was
// 5 % slower at 64 rows.
#if defined(__AVX512F__)
constexpr bool kRowPanels = true;
#else
constexpr bool kRowPanels = false;
#endif

// Inner elements per panel: 256, 512 or 1024, the most that keeps a decoded panel
// (128 columns of float32) within a quarter of the L2 cache, whose size sysconf
// gives (1 MiB where it does not say); NF4CORE_PANEL_INNER=N (a multiple of 16)
// overrides, for measuring. 2 threads, W 4096 x 4096 and 11008 x 4096, time /
// torch's dense float32 GEMM at 2048 rows (Intel Xeon, 2 MiB L2, AVX-512 path):
// 256 -> 1.12-1.23, 512 -> 1.05-1.15, 1024 -> 1.00-1.10, 4096 -> 1.11-1.20
// (docs/performance.md). AMD Zen 4 (1 MiB L2) met its targets at 256.
// The sums are kept per chunk of this many inner elements: the chunk length
// changes the order of float32 sums, so results may differ in the last bits
// between CPUs with different L2 sizes (never between runs or thread counts).
inline int64_t panel_inner() {
    static const int64_t inner = [] {
        if (const char *env = std::getenv("NF4CORE_PANEL_INNER"); env && *env) {
            const int64_t n = std::atoll(env) / 16 * 16;
            if (n >= 16) return std::min<int64_t>(n, 1 << 16);
        }
        int64_t l2 = 1 << 20;
#if defined(_SC_LEVEL2_CACHE_SIZE)
        if (const long v = sysconf(_SC_LEVEL2_CACHE_SIZE); v > 0) l2 = v;
#endif
        int64_t n = 256;
        while (n < 1024 && kPanelCols * 2 * n * int64_t(sizeof(float)) <= l2 / 4) n *= 2;
        return n;
    }();
    return inner;
}

// A float buffer of at least n elements owned by the calling thread, reused, at a
// 64-byte boundary (a strip row is one cache line: 16-lane loads never split one).
inline float *panel_scratch(std::vector<float> &buf, size_t n) {
    if (buf.size() < n + 16) buf.resize(n + 16);
    const uintptr_t p = reinterpret_cast<uintptr_t>(buf.data());
    return buf.data() + ((64 - p % 64) % 64) / sizeof(float);
}

// C[r, 0:cols] = (accumulate ? C[r, 0:cols] : 0) + sum_i A[r * lda + i] B[i * 16 + 0:16], r < R.
// The loops over r are unrolled by pragma: where one was not (the stores at the
// end), GCC kept a copy of the accumulators on the stack and stored them at every
// step of the inner loop (half the speed, measured).
template <int R>
inline void panel_micro(const float *A, int64_t lda, const float *B, int64_t ldb, int64_t inner, float *C,
                        int64_t ldc, bool accumulate, int64_t cols) {
    __m256 c0[R], c1[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) c0[r] = c1[r] = _mm256_setzero_ps();
    for (int64_t i = 0; i < inner; ++i) {
        const __m256 b0 = _mm256_loadu_ps(B + i * ldb), b1 = _mm256_loadu_ps(B + i * ldb + 8);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
            const __m256 a = _mm256_broadcast_ss(A + r * lda + i);
            c0[r] = _mm256_fmadd_ps(a, b0, c0[r]);
            c1[r] = _mm256_fmadd_ps(a, b1, c1[r]);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
        float *dst = C + r * ldc;
        if (cols == kPanelStrip) {
            if (accumulate) {
                c0[r] = _mm256_add_ps(_mm256_loadu_ps(dst), c0[r]);
                c1[r] = _mm256_add_ps(_mm256_loadu_ps(dst + 8), c1[r]);
            }
            _mm256_storeu_ps(dst, c0[r]);
            _mm256_storeu_ps(dst + 8, c1[r]);
        } else {  // the last strip of y = x W^T when N % 16 != 0
            alignas(32) float t[kPanelStrip];
            _mm256_store_ps(t, c0[r]);
            _mm256_store_ps(t + 8, c1[r]);
            for (int64_t j = 0; j < cols; ++j) dst[j] = accumulate ? dst[j] + t[j] : t[j];
        }
    }
}

// Every row of x through one strip: groups of kPanelRows rows, then the rest.
inline void panel_rows(int64_t M, const float *A, int64_t lda, const float *B, int64_t ldb, int64_t inner, float *C,
                       int64_t ldc, bool accumulate, int64_t cols) {
    int64_t m = 0;
    for (; m + kPanelRows <= M; m += kPanelRows)
        panel_micro<kPanelRows>(A + m * lda, lda, B, ldb, inner, C + m * ldc, ldc, accumulate, cols);
    const float *a = A + m * lda;
    float *c = C + m * ldc;
    switch (M - m) {
        case 5: panel_micro<5>(a, lda, B, ldb, inner, c, ldc, accumulate, cols); break;
        case 4: panel_micro<4>(a, lda, B, ldb, inner, c, ldc, accumulate, cols); break;
        case 3: panel_micro<3>(a, lda, B, ldb, inner, c, ldc, accumulate, cols); break;
        case 2: panel_micro<2>(a, lda, B, ldb, inner, c, ldc, accumulate, cols); break;
        case 1: panel_micro<1>(a, lda, B, ldb, inner, c, ldc, accumulate, cols); break;
        default: break;
    }
}

#if defined(__AVX512F__)
// The same product with 16-lane FMAs, S adjacent strips at once (C[R x 16S]):
// one 512-bit vector per strip row, R x S accumulators (R = 6, S = 4: 24 of the
// 32 registers), one broadcast of x per S FMAs. Each output is summed over i in
// the same order as panel_micro, with the same FMAs, so both give the same bits.
// last: the columns of strip S-1 that exist (the last strip of y = x W^T when
// N % 16 != 0), as a store mask.
constexpr int kWideRows = 6;
constexpr int kWideStrips = 4;

template <int R, int S>
inline void panel_micro16(const float *A, int64_t lda, const float *B, int64_t ldb, int64_t sstride, int64_t inner,
                          float *C, int64_t ldc, bool accumulate, __mmask16 last) {
    __m512 c[R][S];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int s = 0; s < S; ++s) c[r][s] = _mm512_setzero_ps();
    for (int64_t i = 0; i < inner; ++i) {
        __m512 b[S];
#pragma GCC unroll 4
        for (int s = 0; s < S; ++s) b[s] = _mm512_load_ps(B + s * sstride + i * ldb);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
            const __m512 a = _mm512_set1_ps(A[r * lda + i]);
#pragma GCC unroll 4
            for (int s = 0; s < S; ++s) c[r][s] = _mm512_fmadd_ps(a, b[s], c[r][s]);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int s = 0; s < S; ++s) {
            float *dst = C + r * ldc + s * kPanelStrip;
            const __mmask16 m = s == S - 1 ? last : __mmask16(0xFFFF);
            __m512 v = c[r][s];
            if (accumulate) v = _mm512_add_ps(_mm512_maskz_loadu_ps(m, dst), v);
            _mm512_mask_storeu_ps(dst, m, v);
        }
}

// Every row of x through S strips: groups of kWideRows rows, then the rest.
template <int S>
inline void panel_rows16(int64_t M, const float *A, int64_t lda, const float *B, int64_t ldb, int64_t sstride,
                         int64_t inner, float *C, int64_t ldc, bool accumulate, __mmask16 last) {
    static_assert(kWideRows == 6, "the switch below covers 1 .. kWideRows - 1 rows");
    int64_t m = 0;
    for (; m + kWideRows <= M; m += kWideRows)
        panel_micro16<kWideRows, S>(A + m * lda, lda, B, ldb, sstride, inner, C + m * ldc, ldc, accumulate, last);
    const float *a = A + m * lda;
    float *c = C + m * ldc;
    switch (M - m) {
        case 5: panel_micro16<5, S>(a, lda, B, ldb, sstride, inner, c, ldc, accumulate, last); break;
        case 4: panel_micro16<4, S>(a, lda, B, ldb, sstride, inner, c, ldc, accumulate, last); break;
        case 3: panel_micro16<3, S>(a, lda, B, ldb, sstride, inner, c, ldc, accumulate, last); break;
        case 2: panel_micro16<2, S>(a, lda, B, ldb, sstride, inner, c, ldc, accumulate, last); break;
        case 1: panel_micro16<1, S>(a, lda, B, ldb, sstride, inner, c, ldc, accumulate, last); break;
        default: break;
    }
}

// 16-lane panels unless NF4CORE_PANEL_LANES=8 (the 8-lane kernel, for measuring:
// both give the same bits).
inline bool wide_panels() {
    static const bool wide = [] {
        const char *env = std::getenv("NF4CORE_PANEL_LANES");
        return !(env && std::string(env) == "8");
    }();
    return wide;
}
#endif

// Rows [0, M) of x through every strip of a panel (strips of 16 columns, the last
// one last_cols wide), C the rows of y at the panel's first column.
inline void panel_strips(int64_t M, const float *A, int64_t lda, const float *panel, int64_t ldb, int64_t sstride,
                         int64_t strips, int64_t inner, float *C, int64_t ldc, bool accumulate, int64_t last_cols) {
#if defined(__AVX512F__)
    if (wide_panels()) {
        const __mmask16 last = __mmask16((1u << last_cols) - 1);
        int64_t s = 0;
        for (; s + kWideStrips <= strips; s += kWideStrips)
            panel_rows16<kWideStrips>(M, A, lda, panel + s * sstride, ldb, sstride, inner, C + s * kPanelStrip, ldc,
                                      accumulate, s + kWideStrips == strips ? last : __mmask16(0xFFFF));
        for (; s + 2 <= strips; s += 2)
            panel_rows16<2>(M, A, lda, panel + s * sstride, ldb, sstride, inner, C + s * kPanelStrip, ldc, accumulate,
                            s + 2 == strips ? last : __mmask16(0xFFFF));
        if (s < strips)
            panel_rows16<1>(M, A, lda, panel + s * sstride, ldb, sstride, inner, C + s * kPanelStrip, ldc, accumulate,
                            last);
        return;
    }
#endif
    for (int64_t s = 0; s < strips; ++s)
        panel_rows(M, A, lda, panel + s * sstride, ldb, inner, C + s * kPanelStrip, ldc, accumulate,
                   s + 1 == strips ? last_cols : kPanelStrip);
}

// rows[i] (8 rows of 8 floats, stride ld) transposed into out[j * ldo] (8 rows, stride ldo).
inline void transpose8x8(const float *in, int64_t ld, float *out, int64_t ldo) {
    const __m256 r0 = _mm256_loadu_ps(in), r1 = _mm256_loadu_ps(in + ld), r2 = _mm256_loadu_ps(in + 2 * ld),
                 r3 = _mm256_loadu_ps(in + 3 * ld), r4 = _mm256_loadu_ps(in + 4 * ld),
                 r5 = _mm256_loadu_ps(in + 5 * ld), r6 = _mm256_loadu_ps(in + 6 * ld),
                 r7 = _mm256_loadu_ps(in + 7 * ld);
    const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3),
                 t3 = _mm256_unpackhi_ps(r2, r3), t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
                 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    const __m256 s0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0)),
                 s1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2)),
                 s2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0)),
                 s3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2)),
                 s4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0)),
                 s5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2)),
                 s6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0)),
                 s7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
    _mm256_storeu_ps(out + 0 * ldo, _mm256_permute2f128_ps(s0, s4, 0x20));
    _mm256_storeu_ps(out + 1 * ldo, _mm256_permute2f128_ps(s1, s5, 0x20));
    _mm256_storeu_ps(out + 2 * ldo, _mm256_permute2f128_ps(s2, s6, 0x20));
    _mm256_storeu_ps(out + 3 * ldo, _mm256_permute2f128_ps(s3, s7, 0x20));
    _mm256_storeu_ps(out + 4 * ldo, _mm256_permute2f128_ps(s0, s4, 0x31));
    _mm256_storeu_ps(out + 5 * ldo, _mm256_permute2f128_ps(s1, s5, 0x31));
    _mm256_storeu_ps(out + 6 * ldo, _mm256_permute2f128_ps(s2, s6, 0x31));
    _mm256_storeu_ps(out + 7 * ldo, _mm256_permute2f128_ps(s3, s7, 0x31));
}

// y[:, c0:c1] of y = x W (M x N times N x K); c0, c1 multiples of 16 (K % 16 == 0).
template <class K>
void panel_plain(const MatmulArgs &a, int64_t c0, int64_t c1) {
    thread_local std::vector<float> buf;
    const int64_t chunk = panel_inner();
    float *panel = panel_scratch(buf, size_t(kPanelCols * chunk));
    const float *x = static_cast<const float *>(a.x);
    float *y = static_cast<float *>(a.y);
    for (int64_t p0 = c0; p0 < c1; p0 += kPanelCols) {
        const int64_t strips = (std::min(c1, p0 + kPanelCols) - p0) / kPanelStrip;
        for (int64_t n0 = 0; n0 < a.N; n0 += chunk) {
            const int64_t n1 = std::min(a.N, n0 + chunk);
            if constexpr (kRowPanels) {  // rows of the panel, strips side by side
                const int64_t k1 = p0 + strips * kPanelStrip;
                const TileArgs t{a.K, a.packed, a.scales, a.blocksize, a.codebook, n0, n1, p0, k1, panel};
                decode_tile<K, float>(t, n0, n1);
            } else {
                for (int64_t s = 0; s < strips; ++s) {
                    const int64_t k0 = p0 + s * kPanelStrip;
                    const TileArgs t{a.K, a.packed, a.scales, a.blocksize, a.codebook, n0, n1, k0, k0 + kPanelStrip,
                                     panel + s * chunk * kPanelStrip};
                    decode_tile<K, float>(t, n0, n1);
                }
            }
            const int64_t ldb = kRowPanels ? strips * kPanelStrip : kPanelStrip;
            const int64_t sstride = kRowPanels ? kPanelStrip : chunk * kPanelStrip;
            for (int64_t m0 = 0; m0 < a.M; m0 += kPanelRowBlock)
                panel_strips(std::min(kPanelRowBlock, a.M - m0), x + m0 * a.N + n0, a.N, panel, ldb, sstride, strips,
                             n1 - n0, y + m0 * a.K + p0, a.K, n0 > 0, kPanelStrip);
        }
    }
}

// y[:, c0:c1] of y = x W^T (M x K times K x N); c0 a multiple of 16, K % 16 == 0.
template <class K>
void panel_transposed(const MatmulArgs &a, int64_t c0, int64_t c1) {
    thread_local std::vector<float> buf, rows_buf;
    const int64_t chunk = panel_inner();
    float *panel = panel_scratch(buf, size_t(kPanelCols * chunk));
    float *rows = panel_scratch(rows_buf, size_t(kPanelStrip * chunk));  // W[16 rows, inner chunk]
    const float *x = static_cast<const float *>(a.x);
    float *y = static_cast<float *>(a.y);
    for (int64_t p0 = c0; p0 < c1; p0 += kPanelCols) {
        const int64_t p1 = std::min(c1, p0 + kPanelCols);
        const int64_t strips = (p1 - p0 + kPanelStrip - 1) / kPanelStrip;
        for (int64_t k0 = 0; k0 < a.K; k0 += chunk) {
            const int64_t k1 = std::min(a.K, k0 + chunk), inner = k1 - k0;  // multiple of 16
            const int64_t ldb = kPanelStrip;
            const int64_t sstride = chunk * kPanelStrip;
            for (int64_t s = 0; s < strips; ++s) {
                const int64_t r0 = p0 + s * kPanelStrip, r1 = std::min(p1, r0 + kPanelStrip);
                const TileArgs t{a.K, a.packed, a.scales, a.blocksize, a.codebook, r0, r1, k0, k1, rows};
                decode_tile<K, float>(t, r0, r1);
                if (r1 - r0 < kPanelStrip)  // rows past N: zeros, their sums are not stored
                    std::fill(rows + (r1 - r0) * inner, rows + kPanelStrip * inner, 0.0f);
                float *strip = panel + s * sstride;
                for (int64_t i = 0; i < inner; i += 8) {
                    transpose8x8(rows + i, inner, strip + i * ldb, ldb);
                    transpose8x8(rows + 8 * inner + i, inner, strip + i * ldb + 8, ldb);
                }
            }
            const int64_t last_cols = p1 - (p0 + (strips - 1) * kPanelStrip);
            for (int64_t m0 = 0; m0 < a.M; m0 += kPanelRowBlock)
                panel_strips(std::min(kPanelRowBlock, a.M - m0), x + m0 * a.K + k0, a.K, panel, ldb, sstride, strips,
                             inner, y + m0 * a.N + p0, a.N, k0 > 0, last_cols);
        }
    }
}

template <class K>
void panel_matmul(const MatmulArgs &a, int64_t c0, int64_t c1) {
    if (a.transpose)
        panel_transposed<K>(a, c0, c1);
    else
        panel_plain<K>(a, c0, c1);
}

// matmul_kernels<K>() with the panel product for float32 from these rows of x on.
template <class K>
const MatmulKernels *matmul_kernels_with_panels(int64_t rows_transposed, int64_t rows_plain) {
    static const MatmulKernels k = [&] {
        MatmulKernels with = *matmul_kernels<K>();
        with.panel_f32 = panel_matmul<K>;
        with.panel_rows_transposed = rows_transposed;
        with.panel_rows_plain = rows_plain;
        return with;
    }();
    return &k;
}

}  // namespace
}  // namespace nf4core

#endif  // NF4CORE_SRC_MATMUL_PANEL_HPP
