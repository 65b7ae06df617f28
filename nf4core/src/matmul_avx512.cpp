// AVX-512 products with a 4-bit matrix (see nf4core/matmul.h).
//
// Decoding: the 8 packed bytes of 16 weights are broadcast to every 64-bit lane
// and shifted per 32-bit lane, so lane 2t holds element t and lane 2t+1 element
// 8+t in its low 4 bits; one vpermps on the codebook then yields 16 weights (it
// reads only those 4 bits). The codebook is multiplied by the block scale once
// per block and weight row, so the permute yields scaled weights directly.
//
// The row groups, the passes over P rows of W and decode_tile's loops are
// matmul_rows.hpp's; the AVX-512 steps are the struct Avx512 below. For one
// row of x the next 8 rows of W are prefetched as the current ones are read.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "matmul_panel.hpp"
#include "matmul_rows.hpp"
#include "simd_avx512.hpp"

namespace nf4core {
namespace {

// Element order after decode: lane j holds element lane_from[j] of the 16.
inline __m512i lane_from() { return _mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15); }
// The inverse: element e sits at lane to_lane[e].
inline __m512i to_lane() { return _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15); }
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

// What decode_tile's steps look up in: float32 values, or bfloat16 words.
template <typename T>
struct TileTable {
    using type = __m512;
};
template <>
struct TileTable<bfloat16_t> {
    using type = __m512i;
};

// The ops of matmul_rows.hpp: 16 weights per step, in decode lane order (x is
// permuted to match, the x W sums are put back in natural order).
struct Avx512 {
    using Vec = __m512;
    // P: as many as the 32 vector registers allow with R rows of x
    static constexpr PassPlan kPlan{{0, 8, 4, 4, 4, 3, 3, 3, 3}, true, true};

    static __m512 load_table(const float *codebook) { return _mm512_loadu_ps(codebook); }

    template <int P>
    struct Weights {
        const __m512 table;
        __m512 tab[P];  // per row of W, the block's codebook times its scale

        explicit Weights(__m512 t) : table(t) {}
        void scale(const WRows<P> &wr, int64_t b) {
            for (int p = 0; p < P; ++p) tab[p] = _mm512_mul_ps(table, _mm512_set1_ps(wr.scales[p][b]));
        }
        __m512 decode(int p, const uint8_t *packed) const { return decode_perm(packed, lane_shifts(), tab[p]); }
    };

    // x rows m0 .. m0+R-1 as float32 in decode lane order, into a per-thread buffer
    template <int R, typename T>
    static const float *x_rows(const MatmulArgs &a, int64_t m0) {
        const T *x = static_cast<const T *>(a.x);
        const int64_t K = a.K;
        thread_local std::vector<float> buf;
        if (buf.size() < size_t(R * K)) buf.resize(size_t(R * K));
        float *xp = buf.data();
        const __m512i from = lane_from();
        for (int r = 0; r < R; ++r)
            for (int64_t k = 0; k < K; k += 16)
                _mm512_storeu_ps(xp + r * K + k, _mm512_permutexvar_ps(from, avx512::load(x + (m0 + r) * K + k)));
        return xp;
    }

    template <int R>
    static __m512 load_x(const float *p) {
        return R > 4 ? load_once(p) : _mm512_loadu_ps(p);
    }

    static __m512 broadcast(float v) { return _mm512_set1_ps(v); }
    static float sum(__m512 v) { return _mm512_reduce_add_ps(v); }
    static __m512 fma(__m512 a, __m512 b, __m512 c) { return _mm512_fmadd_ps(a, b, c); }

    template <typename T>
    static void put(T *y, const float *sums) {  // back to natural order
        avx512::store(y, _mm512_permutexvar_ps(to_lane(), _mm512_loadu_ps(sums)));
    }

    // float32: 16 weights per step, decoded as in the products and put back in
    // natural order. bfloat16: 32 weights per step. The 16 packed bytes are
    // zero-extended to words, each word duplicated (vpermw), shifted by 4 or 0
    // (high nibble = even element), and looked up in the block's scaled codebook
    // rounded to bfloat16 (vpermw reads 5 index bits: the table is stored twice).
    template <typename T>
    struct TileStep {
        static constexpr bool kBf16 = sizeof(T) == 2;
        static constexpr int kWidth = kBf16 ? 32 : 16;
        using Table = typename TileTable<T>::type;
        __m512 codebook;

        explicit TileStep(const float *cb) : codebook(_mm512_loadu_ps(cb)) {}

        Table table(float scale, bool may_be_nan) const {
            const __m512 t = _mm512_mul_ps(codebook, _mm512_set1_ps(scale));
            if constexpr (kBf16) {
                const __m256i h = avx512::Lanes<bfloat16_t>::pack(t, may_be_nan);
                return _mm512_inserti64x4(_mm512_castsi256_si512(h), h, 1);
            } else {
                return t;
            }
        }

        void decode(T *dst, const uint8_t *packed, const Table &tab) const {
            if constexpr (kBf16) {
                const __m512i dup = _mm512_set_epi16(15, 15, 14, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8, 7,
                                                     7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);  // word j <- j / 2
                const __m512i nib_shift = _mm512_set1_epi32(4);  // words: 4 (even element), 0 (odd)
                const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i *>(packed));
                const __m512i words =
                    _mm512_permutexvar_epi16(dup, _mm512_castsi256_si512(_mm256_cvtepu8_epi16(bytes)));
                const __m512i codes = _mm512_srlv_epi16(words, nib_shift);
                _mm512_storeu_si512(dst, _mm512_permutexvar_epi16(codes, tab));
            } else {
                avx512::store(dst, _mm512_permutexvar_ps(to_lane(), decode_perm(packed, lane_shifts(), tab)));
            }
        }
    };
};

}  // namespace

// Where the panels (16-lane FMAs, matmul_panel.hpp) take over from the row
// kernels, time / torch's dense float32 GEMM, 2 threads, W 4096 x 4096,
// 11008 x 4096 and 4096 x 11008 (docs/performance.md):
// - Intel Xeon (two full-width FMA units): at 32 rows the two are level both
//   ways, at 64 the panels are 0.85-0.90 forward against 1.08-1.15 and
//   1.10-1.18 backward against 1.49-1.71: from 32 rows.
// - AMD EPYC Zen 4, whose 512-bit FMAs run at the 256-bit rate, measured with
//   8-lane panels: the row kernels hold up to 64 rows forward, 48 backward.
//   Zen 5 (full width) is not measured and keeps Zen 4's crossover.
const MatmulKernels *avx512_matmul_kernels() {
    static const bool amd = [] {
        __builtin_cpu_init();
        return __builtin_cpu_is("amd") != 0;
    }();
    return matmul_kernels_with_panels<Avx512>(amd ? 64 : 32, amd ? 48 : 32);
}

}  // namespace nf4core
