// AVX-512 products with a 4-bit matrix (see nf4core/matmul.h).
//
// Decoding: the 8 packed bytes of 16 weights are broadcast to every 64-bit lane
// and shifted per 32-bit lane, so lane 2t holds element t and lane 2t+1 element
// 8+t in its low 4 bits; one vpermps on the codebook then yields 16 weights (it
// reads only those 4 bits). The codebook is multiplied by the block scale once
// per block and weight row, so the permute yields scaled weights directly.
//
// With M <= 8 rows of x, P rows of W are decoded together and each decoded
// vector is used for all M rows, so the weight is streamed once and each x
// vector loaded from L1 serves P rows of W; for one row of x the next 8 rows of
// W are prefetched as the current ones are read. Needs K % 16 == 0 and
// K % blocksize == 0 (matmul.cpp falls back to the reference otherwise).
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "matmul.hpp"

namespace nf4core {
namespace {

// The pass kernels stay functions of their own: whether GCC inlined one into its
// caller changed with unrelated edits to this file, and moved its speed by up to
// 15 % (same source, other register allocation).
#if defined(__GNUC__)
#define NF4_KERNEL __attribute__((noinline))
#else
#define NF4_KERNEL inline
#endif

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

// Element order after decode: lane j holds element lane_from[j] of the 16.
inline __m512i lane_from() { return _mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15); }
// Element t of 16 lies in the high nibble of byte t/2 for even t, else the low one (bitsandbytes' order).
inline __m512i lane_shifts() { return _mm512_setr_epi32(4, 4, 0, 0, 12, 12, 8, 8, 20, 20, 16, 16, 28, 28, 24, 24); }

// 16 floats into a register that the compiler may not fold into the FMAs as a
// memory operand: with P rows of W it would load the same vector P times, and
// 512-bit loads issue two per cycle at most. With 5-8 rows of x, loading each
// once made the kernel 15-45 % faster; with 2-4 rows (4 rows of W) it was up to
// 8 % slower, so those keep the folded loads (docs/performance.md).
inline __m512 load_once(const float *p) {
    __m512 v = _mm512_loadu_ps(p);
#if defined(__GNUC__)
    __asm__("" : "+v"(v));
#endif
    return v;
}

// 16 weights (permuted lane order) from their 8 packed bytes, with a scaled codebook
inline __m512 decode_perm(const uint8_t *p8, __m512i shifts, __m512 scaled_table) {
    long long packed8;
    std::memcpy(&packed8, p8, 8);
    return _mm512_permutexvar_ps(_mm512_srlv_epi32(_mm512_set1_epi64(packed8), shifts), scaled_table);
}

// 16 weights in natural order starting at flat index i (i % 16 == 0)
inline __m512 decode16(const MatmulArgs &a, __m512 table, int shift, int64_t i) {
    const __m512 w = decode_perm(a.packed + i / 2, lane_shifts(), table);
    // lane j holds element lane_from[j]; invert: element e sits at lane to_lane[e]
    const __m512i to_lane = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    return _mm512_mul_ps(_mm512_permutexvar_ps(to_lane, w), _mm512_set1_ps(a.scales[i >> shift]));
}

// x rows m0 .. m0+R-1 as float32 in decode lane order, into a per-thread buffer
template <int R, typename T>
const float *permuted_rows(const T *x, int64_t m0, int64_t K) {
    thread_local std::vector<float> buf;
    if (buf.size() < size_t(R * K)) buf.resize(size_t(R * K));
    float *xp = buf.data();
    const __m512i from = lane_from();
    for (int r = 0; r < R; ++r)
        for (int64_t k = 0; k < K; k += 16)
            _mm512_storeu_ps(xp + r * K + k, _mm512_permutexvar_ps(from, load16(x + (m0 + r) * K + k)));
    return xp;
}

// y[m0 + r, n .. n+P-1] for r < R: P rows of W in one pass, each decoded chunk
// used for all R rows of x (xp, permuted as the decode).
template <int R, int P, typename T>
NF4_KERNEL void block_transposed(const MatmulArgs &a, const float *xp, __m512 table, int shift, int64_t m0, int64_t n) {
    const __m512i shifts = lane_shifts();
    __m512 acc[R][P];
    for (int r = 0; r < R; ++r)
        for (int p = 0; p < P; ++p) acc[r][p] = _mm512_setzero_ps();
    const uint8_t *wrow[P];
    const float *srow[P];
    for (int p = 0; p < P; ++p) {
        wrow[p] = a.packed + (n + p) * a.K / 2;
        srow[p] = a.scales + (((n + p) * a.K) >> shift);
    }
    const int64_t nblocks = a.K >> shift;
    // The next P rows of W (contiguous after these) are prefetched into L1 at the rate
    // this pass reads its own, a line per step: W comes from L3 or memory when other
    // work ran in between (a model's other layers), and the P row streams of 2 KiB or
    // so are too short for the hardware prefetchers (benchmarks/bench_matmul.py
    // --gemv-pairs: about 10 % less time in the two-way race for one row of x).
    const char *next = reinterpret_cast<const char *>(a.packed + (n + P) * a.K / 2);
    const char *next_end = reinterpret_cast<const char *>(a.packed + std::min<int64_t>(a.N, n + 2 * P) * a.K / 2);
    for (int64_t b = 0; b < nblocks; ++b) {
        __m512 tab[P];
        for (int p = 0; p < P; ++p) tab[p] = _mm512_mul_ps(table, _mm512_set1_ps(srow[p][b]));
        const int64_t k0 = b << shift, k1 = k0 + a.blocksize;
        for (int64_t k = k0; k < k1; k += 16) {
            if (P == 8 && next < next_end) {  // one row of x (with more, measured no gain)
                _mm_prefetch(next, _MM_HINT_T0);
                next += 8 * P;  // the bytes of 16 weights in each of P rows: a cache line
            }
            __m512 w[P];
            for (int p = 0; p < P; ++p) w[p] = decode_perm(wrow[p] + k / 2, shifts, tab[p]);
            for (int r = 0; r < R; ++r) {
                const __m512 xv = R > 4 ? load_once(xp + r * a.K + k) : _mm512_loadu_ps(xp + r * a.K + k);
                for (int p = 0; p < P; ++p) acc[r][p] = _mm512_fmadd_ps(xv, w[p], acc[r][p]);
            }
        }
    }
    T *y = static_cast<T *>(a.y);
    for (int r = 0; r < R; ++r)
        for (int p = 0; p < P; ++p) y[(m0 + r) * a.N + n + p] = from_float<T>(_mm512_reduce_add_ps(acc[r][p]));
}

// Rows of W per pass: as many as the 32 vector registers allow with R x rows.
template <int R>
constexpr int rows_of_w() { return R == 1 ? 8 : R <= 4 ? 4 : 3; }

template <int R, typename T>
void rows_transposed(const MatmulArgs &a, __m512 table, int shift, int64_t m0, int64_t c0, int64_t c1) {
    constexpr int P = rows_of_w<R>();
    const float *xp = permuted_rows<R>(static_cast<const T *>(a.x), m0, a.K);
    int64_t n = c0;
    for (; n + P <= c1; n += P) block_transposed<R, P, T>(a, xp, table, shift, m0, n);
    for (; n < c1; ++n) block_transposed<R, 1, T>(a, xp, table, shift, m0, n);
}

// acc[r, k - c0] += sum_p x[m0 + r, n + p] W[n + p, k] for k in [c0, c1): P rows of W
// streamed once, each decoded chunk used for all R rows.
template <int R, int P, typename T>
NF4_KERNEL void block_plain(const MatmulArgs &a, float *acc, int64_t len, __m512 table, int shift, int64_t m0,
                        int64_t n, int64_t c0, int64_t c1) {
    const T *x = static_cast<const T *>(a.x);
    const __m512i shifts = lane_shifts();
    __m512 g[R][P];
    for (int r = 0; r < R; ++r)
        for (int p = 0; p < P; ++p) g[r][p] = _mm512_set1_ps(to_float(x[(m0 + r) * a.N + n + p]));
    const uint8_t *wrow[P];
    const float *srow[P];
    for (int p = 0; p < P; ++p) {
        wrow[p] = a.packed + (n + p) * a.K / 2;
        srow[p] = a.scales + (((n + p) * a.K) >> shift);
    }
    for (int64_t k0 = c0; k0 < c1;) {  // block by block (c0, c1 are multiples of 16 only)
        const int64_t b = k0 >> shift, k1 = std::min(c1, (b + 1) << shift);
        __m512 tab[P];
        for (int p = 0; p < P; ++p) tab[p] = _mm512_mul_ps(table, _mm512_set1_ps(srow[p][b]));
        for (int64_t k = k0; k < k1; k += 16) {
            __m512 w[P];
            for (int p = 0; p < P; ++p) w[p] = decode_perm(wrow[p] + k / 2, shifts, tab[p]);
            for (int r = 0; r < R; ++r) {
                float *dst = acc + r * len + (k - c0);
                __m512 s = _mm512_loadu_ps(dst);
                for (int p = 0; p < P; ++p) s = _mm512_fmadd_ps(g[r][p], w[p], s);
                _mm512_storeu_ps(dst, s);
            }
        }
        k0 = k1;
    }
}

// y[m0 + r, c0:c1] = x[m0 + r, :] W[:, c0:c1]: rows of W streamed, partial sums
// in a per-thread float32 buffer (R x (c1 - c0), in decode lane order per chunk).
template <int R, typename T>
void rows_plain(const MatmulArgs &a, __m512 table, int shift, int64_t m0, int64_t c0, int64_t c1) {
    constexpr int P = rows_of_w<R>();
    const int64_t len = c1 - c0;
    float *acc = zeroed_partial_sums(size_t(R * len));
    // A task of a few hundred columns reads a short piece of every row of W, pieces
    // 2 KiB apart for K = 4096: too short and too far apart for the hardware
    // prefetchers. Prefetch the pieces of the rows kAhead passes on (pieces under
    // 512 bytes: 0.78-0.89x the time for 2-8 rows of x; docs/performance.md).
    const int64_t piece = len / 2;  // bytes of one row of W in [c0, c1)
    constexpr int64_t kAhead = 4;
    int64_t n = 0;
    for (; n + P <= a.N; n += P) {
        if (piece < 512)
            for (int64_t row = n + kAhead * P; row < std::min(a.N, n + (kAhead + 1) * P); ++row) {
                const char *p = reinterpret_cast<const char *>(a.packed + row * a.K / 2 + c0 / 2);
                for (int64_t off = 0; off < piece; off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
                _mm_prefetch(p + piece - 1, _MM_HINT_T0);
            }
        block_plain<R, P, T>(a, acc, len, table, shift, m0, n, c0, c1);
    }
    for (; n < a.N; ++n) block_plain<R, 1, T>(a, acc, len, table, shift, m0, n, c0, c1);
    const __m512i to_lane = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    T *y = static_cast<T *>(a.y);
    for (int r = 0; r < R; ++r)
        for (int64_t k = c0; k < c1; k += 16)
            store16(y + (m0 + r) * a.K + k, _mm512_permutexvar_ps(to_lane, _mm512_loadu_ps(acc + r * len + k - c0)));
}

template <typename T>
void matmul(const MatmulArgs &a, int64_t c0, int64_t c1) {
    const __m512 table = _mm512_loadu_ps(a.codebook);
    const int shift = __builtin_ctzll(uint64_t(a.blocksize));
    for_row_groups(a.M, [&](auto rows, int64_t m0) {
        constexpr int R = decltype(rows)::value;
        if (a.transpose)
            rows_transposed<R, T>(a, table, shift, m0, c0, c1);
        else
            rows_plain<R, T>(a, table, shift, m0, c0, c1);
    });
}

// W[n, k0:k1] for n in [r0, r1) into out (row-major, row length k1 - k0)
template <typename T>
void decode_tile(const TileArgs &t, int64_t r0, int64_t r1) {
    const MatmulArgs a{nullptr, 0, 0, t.K, t.packed, t.scales, t.blocksize, t.codebook, false, nullptr};
    const __m512 table = _mm512_loadu_ps(t.codebook);
    const int shift = __builtin_ctzll(uint64_t(t.blocksize));
    const int64_t width = t.k1 - t.k0;
    T *out = static_cast<T *>(t.out);
    // bfloat16: 32 weights per step. The 16 packed bytes are zero-extended to
    // words, each word duplicated (vpermw), shifted by 4 or 0 (high nibble =
    // even element), and looked up in the block's scaled codebook rounded to
    // bfloat16 (vpermw reads 5 index bits: the table is stored twice).
    const __m512i dup = _mm512_set_epi16(15, 15, 14, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8, 7, 7, 6, 6,
                                         5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);  // word j <- word j / 2
    const __m512i nib_shift = _mm512_set1_epi32(4);  // words: 4 (even element), 0 (odd)
    auto scalar = [&](T *dst, int64_t i) {
        *dst = from_float<T>(decode_value(t.codebook[nibble_at(t.packed, i)], t.scales[i >> shift]));
    };
    for (int64_t n = r0; n < r1; ++n) {
        T *dst = out + (n - t.n0) * width - t.k0;
        const int64_t row = n * t.K;
        int64_t k = t.k0;
        for (; k < t.k1 && (row + k) % 32 != 0; ++k) scalar(dst + k, row + k);
        if constexpr (sizeof(T) == 2) {
            int64_t block = -1;
            __m512i tab16 = _mm512_setzero_si512();
            for (; k + 32 <= t.k1; k += 32) {
                const int64_t i = row + k;  // i % 32 == 0: the 32 weights lie in one block (blocksize >= 32)
                if ((i >> shift) != block) {
                    block = i >> shift;
                    const __m512i u = _mm512_castps_si512(_mm512_mul_ps(table, _mm512_set1_ps(t.scales[block])));
                    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
                    const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb));
                    const __m256i h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
                    tab16 = _mm512_inserti64x4(_mm512_castsi256_si512(h), h, 1);
                }
                const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i *>(t.packed + i / 2));
                const __m512i words = _mm512_permutexvar_epi16(dup, _mm512_castsi256_si512(_mm256_cvtepu8_epi16(bytes)));
                const __m512i codes = _mm512_srlv_epi16(words, nib_shift);
                _mm512_storeu_si512(dst + k, _mm512_permutexvar_epi16(codes, tab16));
            }
        } else {
            for (; k + 16 <= t.k1; k += 16) store16(dst + k, decode16(a, table, shift, row + k));
        }
        for (; k < t.k1; ++k) scalar(dst + k, row + k);
    }
}

}  // namespace

const MatmulKernels *avx512_matmul_kernels() {
    static const MatmulKernels k{matmul<float>, matmul<bfloat16_t>, decode_tile<float>, decode_tile<bfloat16_t>};
    return &k;
}

}  // namespace nf4core
