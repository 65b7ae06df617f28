// AVX-512 products with a 4-bit matrix (see nf4core/matmul.h).
//
// The weight is decoded 16 values at a time (one vpermps on the codebook, one
// multiply by the block scale) and used for up to 8 rows of x at once, so it is
// read from memory once per 8 rows: at generation sizes (M <= 8) the product
// streams the packed weight exactly once. Needs K % 16 == 0 and K % blocksize
// == 0 (matmul.cpp falls back to the reference otherwise).
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "matmul.hpp"

namespace nf4core {
namespace {

inline __m512 load16(const float *p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const bfloat16_t *p) {
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(p))), 16));
}

inline void store16(float *p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(bfloat16_t *p, __m512 v) {  // round to nearest even, as to_bfloat16
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb));
    _mm256_storeu_si256(reinterpret_cast<__m256i *>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
}

// 16 weights starting at flat index i (i % 16 == 0 inside one block); the
// blocksize is a power of two, 2^shift
inline __m512 decode16(const MatmulArgs &a, __m512 table, int shift, int64_t i) {
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i *>(a.packed + i / 2));
    const __m128i low4 = _mm_set1_epi8(0x0F);
    const __m128i codes = _mm_unpacklo_epi8(_mm_and_si128(_mm_srli_epi16(bytes, 4), low4), _mm_and_si128(bytes, low4));
    return _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(codes), table),
                         _mm512_set1_ps(a.scales[i >> shift]));
}

// y[m0 + r, n] for r < R, n in [c0, c1): one pass over each weight row.
//
// Decoding is one vpermps per 16 weights: the 8 packed bytes are broadcast to
// every 64-bit lane and shifted per 32-bit lane, so lane 2t holds element t and
// lane 2t+1 element 8+t in its low 4 bits (vpermps reads only those); x is
// permuted the same way once per call (xp, float32). The block scale multiplies
// the sum of a block's products once. With few rows, U independent
// accumulators per row keep the FMA pipes busy.
template <int R, typename T>
void rows_transposed(const MatmulArgs &a, __m512 table, int shift, int64_t m0, int64_t c0, int64_t c1) {
    constexpr int U = R == 1 ? 4 : R == 2 ? 2 : 1;
    const T *x = static_cast<const T *>(a.x);
    T *y = static_cast<T *>(a.y);
    const __m512i lane_from = _mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
    const __m512i shifts = _mm512_setr_epi32(4, 4, 0, 0, 12, 12, 8, 8, 20, 20, 16, 16, 28, 28, 24, 24);
    thread_local std::vector<float> xp_buf;
    xp_buf.resize(size_t(R * a.K));
    float *xp = xp_buf.data();
    for (int r = 0; r < R; ++r)
        for (int64_t k = 0; k < a.K; k += 16)
            _mm512_storeu_ps(xp + r * a.K + k, _mm512_permutexvar_ps(lane_from, load16(x + (m0 + r) * a.K + k)));
    const int64_t chunks_per_block = a.blocksize / 16;
    for (int64_t n = c0; n < c1; ++n) {
        __m512 acc[R][U];
        for (int r = 0; r < R; ++r)
            for (int u = 0; u < U; ++u) acc[r][u] = _mm512_setzero_ps();
        const int64_t row = n * a.K;
        const uint8_t *wrow = a.packed + row / 2;
        const float *srow = a.scales + (row >> shift);
        for (int64_t k0 = 0; k0 < a.K; k0 += a.blocksize) {
            __m512 part[R][U];
            for (int r = 0; r < R; ++r)
                for (int u = 0; u < U; ++u) part[r][u] = _mm512_setzero_ps();
            for (int64_t c = 0; c < chunks_per_block; c += U) {
                for (int u = 0; u < U; ++u) {  // u is a compile-time index: the accumulators stay in registers
                    if (c + u >= chunks_per_block) break;
                    const int64_t k = k0 + 16 * (c + u);
                    long long packed8;
                    std::memcpy(&packed8, wrow + k / 2, 8);
                    const __m512 w = _mm512_permutexvar_ps(_mm512_srlv_epi32(_mm512_set1_epi64(packed8), shifts), table);
                    for (int r = 0; r < R; ++r)
                        part[r][u] = _mm512_fmadd_ps(_mm512_loadu_ps(xp + r * a.K + k), w, part[r][u]);
                }
            }
            const __m512 scale = _mm512_set1_ps(srow[k0 >> shift]);
            for (int r = 0; r < R; ++r)
                for (int u = 0; u < U; ++u) acc[r][u] = _mm512_fmadd_ps(part[r][u], scale, acc[r][u]);
        }
        for (int r = 0; r < R; ++r) {
            __m512 sum = acc[r][0];
            for (int u = 1; u < U; ++u) sum = _mm512_add_ps(sum, acc[r][u]);
            y[(m0 + r) * a.N + n] = from_float<T>(_mm512_reduce_add_ps(sum));
        }
    }
}

// y[m0 + r, k : k + 16] for r < R, 16-column chunks in [c0, c1): a pass over W's rows
template <int R, typename T>
void rows_plain(const MatmulArgs &a, __m512 table, int shift, int64_t m0, int64_t c0, int64_t c1) {
    const T *x = static_cast<const T *>(a.x);
    T *y = static_cast<T *>(a.y);
    for (int64_t k = c0; k < c1; k += 16) {
        __m512 acc[R];
        for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
        for (int64_t n = 0; n < a.N; ++n) {
            const __m512 w = decode16(a, table, shift, n * a.K + k);
            for (int r = 0; r < R; ++r)
                acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(to_float(x[(m0 + r) * a.N + n])), w, acc[r]);
        }
        for (int r = 0; r < R; ++r) store16(y + (m0 + r) * a.K + k, acc[r]);
    }
}

template <typename T>
void matmul(const MatmulArgs &a, int64_t c0, int64_t c1) {
    const __m512 table = _mm512_loadu_ps(a.codebook);
    const int shift = __builtin_ctzll(uint64_t(a.blocksize));
    for (int64_t m0 = 0; m0 < a.M; m0 += 8) {
        const int64_t rows = std::min<int64_t>(8, a.M - m0);
#define NF4_ROWS_CASE(R)                                      \
    case R:                                                   \
        if (a.transpose)                                      \
            rows_transposed<R, T>(a, table, shift, m0, c0, c1); \
        else                                                  \
            rows_plain<R, T>(a, table, shift, m0, c0, c1);    \
        break;
        switch (rows) {
            NF4_ROWS_CASE(1) NF4_ROWS_CASE(2) NF4_ROWS_CASE(3) NF4_ROWS_CASE(4)
            NF4_ROWS_CASE(5) NF4_ROWS_CASE(6) NF4_ROWS_CASE(7) NF4_ROWS_CASE(8)
        }
#undef NF4_ROWS_CASE
    }
}

}  // namespace

const MatmulKernels *avx512_matmul_kernels() {
    static const MatmulKernels k{matmul<float>, matmul<bfloat16_t>};
    return &k;
}

}  // namespace nf4core
