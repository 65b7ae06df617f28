// AVX2 (+ FMA) products with a 4-bit matrix (see nf4core/matmul.h): the
// design of matmul_avx512.cpp on 8-lane vectors.
//
// Decoding: the 4 packed bytes of 8 weights are broadcast to every 32-bit lane
// and shifted per lane, so lane t holds element t in its low 4 bits (natural
// order: no permutation of x or of the result is needed). The 16-entry
// codebook is held in two 8-lane halves; two vpermps read the low 3 bits and a
// blend on bit 3 picks the half. The table is the codebook times the block
// scale (rounded as decode_value does, once per block and row of W), so the
// weights are those of pq.dequantize and only the order of the float32 sums
// differs from the reference.
//
// With M <= 8 rows of x, P rows of W are decoded together and each decoded
// vector is used for all M rows, so the weight is streamed once. Needs
// K % 16 == 0 and K % blocksize == 0 (matmul.cpp falls back to the reference
// otherwise). decode_tile works on any tile and is bit-identical to the
// reference (the bfloat16 rounding included, NaN as to_bfloat16).
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "matmul.hpp"

namespace nf4core {
namespace {

inline __m256 load8(const float *p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bfloat16_t *p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i *>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// The bfloat16 bits of 8 floats in the low half of each 32-bit lane: round to
// nearest even, NaN kept quiet (to_bfloat16 lane by lane).
inline __m256i bf16_bits(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i hi = _mm256_srli_epi32(u, 16);
    const __m256i lsb = _mm256_and_si256(hi, _mm256_set1_epi32(1));
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb)), 16);
    const __m256i quiet = _mm256_or_si256(hi, _mm256_set1_epi32(0x40));
    return _mm256_blendv_epi8(r, quiet, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
}

inline void store8(float *p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(bfloat16_t *p, __m256 v) {
    const __m256i r = bf16_bits(v);
    _mm_storeu_si128(reinterpret_cast<__m128i *>(p),
                     _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}

// Element t of 8 lies in byte t/2 of the 32-bit word, in the high nibble for
// even t (bitsandbytes' order).
inline __m256i nibble_shifts() { return _mm256_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24); }

// codes of the 8 weights packed in p4[0..3], in the low 4 bits of each lane
inline __m256i codes8(const uint8_t *p4, __m256i shifts) {
    int32_t w;
    std::memcpy(&w, p4, 4);
    return _mm256_srlv_epi32(_mm256_set1_epi32(w), shifts);
}

struct Table {
    __m256 lo, hi;  // entries 0..7 and 8..15
};

inline Table load_table(const float *codebook) { return {_mm256_loadu_ps(codebook), _mm256_loadu_ps(codebook + 8)}; }

inline Table scaled(const Table &t, float s) {
    const __m256 v = _mm256_set1_ps(s);
    return {_mm256_mul_ps(t.lo, v), _mm256_mul_ps(t.hi, v)};
}

// t[idx & 15] lane by lane (vpermps reads bits 0..2; bit 3, moved to the sign, picks the half)
inline __m256 lookup(const Table &t, __m256i idx) {
    const __m256 a = _mm256_permutevar8x32_ps(t.lo, idx), b = _mm256_permutevar8x32_ps(t.hi, idx);
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

// The codebook times a block scale (as decode_value), stored for lookup_mem.
inline void store_scaled(float *dst, const Table &t, float s) {
    const Table v = scaled(t, s);
    _mm256_store_ps(dst, v.lo);
    _mm256_store_ps(dst + 8, v.hi);
}

// lookup() with the table in L1 (16 floats, 32-byte aligned; vpermps takes it
// from memory). In the products this replaced a multiply per decoded vector by
// the block scale: 5-9% faster GEMV, measured in one process against it.
inline __m256 lookup_mem(const float *t, __m256i idx) {
    const __m256 a = _mm256_permutevar8x32_ps(_mm256_load_ps(t), idx);
    const __m256 b = _mm256_permutevar8x32_ps(_mm256_load_ps(t + 8), idx);
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// Rows of W per pass: what the 16 vector registers hold with R rows of x.
template <int R>
constexpr int rows_of_w() { return R == 1 ? 4 : R <= 3 ? 2 : 1; }

// y[m0 + r, n .. n+P-1] for r < R: P rows of W in one pass, each decoded
// vector used for all R rows of x.
template <int R, int P, typename T>
inline void block_transposed(const MatmulArgs &a, const Table &table, int shift, int64_t m0, int64_t n) {
    const T *x = static_cast<const T *>(a.x) + m0 * a.K;
    const __m256i shifts = nibble_shifts();
    __m256 acc[R][P];
    for (int r = 0; r < R; ++r)
        for (int p = 0; p < P; ++p) acc[r][p] = _mm256_setzero_ps();
    const uint8_t *wrow[P];
    const float *srow[P];
    for (int p = 0; p < P; ++p) {
        wrow[p] = a.packed + (n + p) * a.K / 2;
        srow[p] = a.scales + (((n + p) * a.K) >> shift);
    }
    alignas(32) float tab[P][16];  // per row of W, the block's codebook times its scale
    const int64_t nblocks = a.K >> shift;
    for (int64_t b = 0; b < nblocks; ++b) {
        for (int p = 0; p < P; ++p) store_scaled(tab[p], table, srow[p][b]);
        const int64_t k0 = b << shift, k1 = k0 + a.blocksize;
        for (int64_t k = k0; k < k1; k += 8) {
            __m256 w[P];
            for (int p = 0; p < P; ++p) w[p] = lookup_mem(tab[p], codes8(wrow[p] + (k >> 1), shifts));
            for (int r = 0; r < R; ++r) {
                const __m256 xv = load8(x + r * a.K + k);
                for (int p = 0; p < P; ++p) acc[r][p] = _mm256_fmadd_ps(xv, w[p], acc[r][p]);
            }
        }
    }
    T *y = static_cast<T *>(a.y);
    for (int r = 0; r < R; ++r)
        for (int p = 0; p < P; ++p) y[(m0 + r) * a.N + n + p] = from_float<T>(hsum(acc[r][p]));
}

template <int R, typename T>
void rows_transposed(const MatmulArgs &a, const Table &table, int shift, int64_t m0, int64_t c0, int64_t c1) {
    constexpr int P = rows_of_w<R>();
    int64_t n = c0;
    for (; n + P <= c1; n += P) block_transposed<R, P, T>(a, table, shift, m0, n);
    for (; n < c1; ++n) block_transposed<R, 1, T>(a, table, shift, m0, n);
}

// acc[r, k - c0] += sum_p x[m0 + r, n + p] W[n + p, k] for k in [c0, c1): P rows
// of W streamed once, each decoded vector used for all R rows.
template <int R, int P, typename T>
inline void block_plain(const MatmulArgs &a, float *acc, int64_t len, const Table &table, int shift, int64_t m0,
                        int64_t n, int64_t c0, int64_t c1) {
    const T *x = static_cast<const T *>(a.x);
    const __m256i shifts = nibble_shifts();
    __m256 g[R][P];
    for (int r = 0; r < R; ++r)
        for (int p = 0; p < P; ++p) g[r][p] = _mm256_set1_ps(to_float(x[(m0 + r) * a.N + n + p]));
    const uint8_t *wrow[P];
    const float *srow[P];
    for (int p = 0; p < P; ++p) {
        wrow[p] = a.packed + (n + p) * a.K / 2;
        srow[p] = a.scales + (((n + p) * a.K) >> shift);
    }
    alignas(32) float tab[P][16];  // per row of W, the block's codebook times its scale
    for (int64_t k0 = c0; k0 < c1;) {  // block by block (c0, c1 are multiples of 16 only)
        const int64_t b = k0 >> shift, k1 = std::min(c1, (b + 1) << shift);
        for (int p = 0; p < P; ++p) store_scaled(tab[p], table, srow[p][b]);
        for (int64_t k = k0; k < k1; k += 8) {
            __m256 w[P];
            for (int p = 0; p < P; ++p) w[p] = lookup_mem(tab[p], codes8(wrow[p] + (k >> 1), shifts));
            for (int r = 0; r < R; ++r) {
                float *dst = acc + r * len + (k - c0);
                __m256 sum = _mm256_loadu_ps(dst);
                for (int p = 0; p < P; ++p) sum = _mm256_fmadd_ps(g[r][p], w[p], sum);
                _mm256_storeu_ps(dst, sum);
            }
        }
        k0 = k1;
    }
}

// y[m0 + r, c0:c1] = x[m0 + r, :] W[:, c0:c1]: rows of W streamed, partial sums
// in a per-thread float32 buffer (R x (c1 - c0)).
template <int R, typename T>
void rows_plain(const MatmulArgs &a, const Table &table, int shift, int64_t m0, int64_t c0, int64_t c1) {
    constexpr int P = rows_of_w<R>();
    const int64_t len = c1 - c0;
    float *acc = zeroed_partial_sums(size_t(R * len));
    int64_t n = 0;
    for (; n + P <= a.N; n += P) block_plain<R, P, T>(a, acc, len, table, shift, m0, n, c0, c1);
    for (; n < a.N; ++n) block_plain<R, 1, T>(a, acc, len, table, shift, m0, n, c0, c1);
    T *y = static_cast<T *>(a.y);
    for (int r = 0; r < R; ++r)
        for (int64_t k = c0; k < c1; k += 8) store8(y + (m0 + r) * a.K + k, _mm256_loadu_ps(acc + r * len + k - c0));
}

template <typename T>
void matmul(const MatmulArgs &a, int64_t c0, int64_t c1) {
    const Table table = load_table(a.codebook);
    const int shift = __builtin_ctzll(uint64_t(a.blocksize));
    for_row_groups(a.M, [&](auto rows, int64_t m0) {
        constexpr int R = decltype(rows)::value;
        if (a.transpose)
            rows_transposed<R, T>(a, table, shift, m0, c0, c1);
        else
            rows_plain<R, T>(a, table, shift, m0, c0, c1);
    });
}

// W[n, k0:k1] for n in [r0, r1) into out (row-major, row length k1 - k0).
// 16 weights per step from a flat index that is a multiple of 16, so they lie
// in one block (blocksize >= 32); the block's scaled codebook (for bfloat16
// already rounded) is looked up.
template <typename T>
void decode_tile(const TileArgs &t, int64_t r0, int64_t r1) {
    const Table table = load_table(t.codebook);
    const __m256i shifts = nibble_shifts();
    const int shift = __builtin_ctzll(uint64_t(t.blocksize));
    const int64_t width = t.k1 - t.k0;
    T *out = static_cast<T *>(t.out);
    auto scalar = [&](T *dst, int64_t i) {
        *dst = from_float<T>(decode_value(t.codebook[nibble_at(t.packed, i)], t.scales[i >> shift]));
    };
    for (int64_t n = r0; n < r1; ++n) {
        T *dst = out + (n - t.n0) * width - t.k0;
        const int64_t row = n * t.K;
        int64_t k = t.k0;
        for (; k < t.k1 && (row + k) % 16 != 0; ++k) scalar(dst + k, row + k);
        int64_t block = -1;
        Table tab = table;
        for (; k + 16 <= t.k1; k += 16) {
            const int64_t i = row + k;
            if ((i >> shift) != block) {
                block = i >> shift;
                tab = scaled(table, t.scales[block]);
                if constexpr (sizeof(T) == 2)  // the table rounded once per block: lanes hold bfloat16 bits
                    tab = {_mm256_castsi256_ps(bf16_bits(tab.lo)), _mm256_castsi256_ps(bf16_bits(tab.hi))};
            }
            const __m256 w0 = lookup(tab, codes8(t.packed + (i >> 1), shifts));
            const __m256 w1 = lookup(tab, codes8(t.packed + (i >> 1) + 4, shifts));
            if constexpr (sizeof(T) == 2) {
                // packus interleaves 128-bit halves: [w0 0..3, w1 0..3, w0 4..7, w1 4..7] -> natural order
                const __m256i h = _mm256_packus_epi32(_mm256_castps_si256(w0), _mm256_castps_si256(w1));
                _mm256_storeu_si256(reinterpret_cast<__m256i *>(dst + k), _mm256_permute4x64_epi64(h, 0xD8));
            } else {
                store8(dst + k, w0);
                store8(dst + k + 8, w1);
            }
        }
        for (; k < t.k1; ++k) scalar(dst + k, row + k);
    }
}

}  // namespace

const MatmulKernels *avx2_matmul_kernels() {
    static const MatmulKernels k{matmul<float>, matmul<bfloat16_t>, decode_tile<float>, decode_tile<bfloat16_t>};
    return &k;
}

}  // namespace nf4core
