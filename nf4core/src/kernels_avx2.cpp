// AVX2 (+ FMA, F16C) kernels: 8 elements per vector.
//
// The same steps as the AVX-512 kernels (see kernels_avx512.cpp), in the block
// loops of kernels_blocks.hpp. AVX2 has no masked loads for 16-bit types, so
// the last partial vector of a tail block is done with the scalar helpers of
// the reference, which follow the same rules.
#include <immintrin.h>

#include <cstring>

#include "kernels_blocks.hpp"
#include "simd_avx2.hpp"

namespace nf4core {
namespace {

inline __m256i search16(__m256 s, __m256 mid_lo, __m256 mid_hi) {
    __m256i pos = _mm256_setzero_si256();
    for (int step = 8; step >= 1; step >>= 1) {
        const __m256i probe = _mm256_add_epi32(pos, _mm256_set1_epi32(step - 1));
        const __m256 above = _mm256_cmp_ps(s, avx2::lookup16(mid_lo, mid_hi, probe), _CMP_GT_OQ);
        pos = _mm256_add_epi32(pos, _mm256_and_si256(_mm256_castps_si256(above), _mm256_set1_epi32(step)));
    }
    return pos;
}

inline __m256i search256(__m256 s, __m256 coarse_lo, __m256 coarse_hi, const float *mid) {
    __m256i pos = _mm256_slli_epi32(search16(s, coarse_lo, coarse_hi), 4);
    for (int step = 8; step >= 1; step >>= 1) {
        const __m256i probe = _mm256_add_epi32(pos, _mm256_set1_epi32(step - 1));
        const __m256 above = _mm256_cmp_ps(s, _mm256_i32gather_ps(mid, probe, 4), _CMP_GT_OQ);
        pos = _mm256_add_epi32(pos, _mm256_and_si256(_mm256_castps_si256(above), _mm256_set1_epi32(step)));
    }
    return pos;
}

// Software prefetch distance for the input of quantize: the hardware
// prefetchers alone left a core waiting on memory for a third of its time
// (measured 0.85 -> 0.53 ns per element, AVX-512, one thread).
constexpr int kPrefetchBytes = 2048;

// The vector passes of the block loops in kernels_blocks.hpp.
struct Avx2 {
    template <int BITS, typename T>
    struct Quantize {
        const SearchTable &tab;
        __m256 mid_lo, mid_hi, order_lo, order_hi;  // BITS == 8: mid_* hold the coarse midpoints

        explicit Quantize(const SearchTable &t)
            : tab(t), mid_lo(_mm256_load_ps(BITS == 4 ? t.mid : t.coarse)),
              mid_hi(_mm256_load_ps((BITS == 4 ? t.mid : t.coarse) + 8)),
              order_lo(_mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i *>(t.order)))),
              order_hi(_mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i *>(t.order + 8)))) {}

        static int64_t vector_end(int64_t begin, int64_t end) { return begin + ((end - begin) & ~int64_t(7)); }

        void absmax(const T *x, int64_t i0, int64_t i1, uint32_t &amax_bits, bool &nonfinite) const {
            const __m256i abs_bits = _mm256_set1_epi32(0x7FFFFFFF), max_finite = _mm256_set1_epi32(0x7F7FFFFF);
            __m256i vmax = _mm256_setzero_si256(), bad = _mm256_setzero_si256();
            for (int64_t i = i0; i < i1; i += 8) {
                _mm_prefetch(reinterpret_cast<const char *>(x + i) + kPrefetchBytes, _MM_HINT_T0);
                const __m256i v = _mm256_and_si256(_mm256_castps_si256(avx2::load(x + i)), abs_bits);
                bad = _mm256_or_si256(bad, _mm256_cmpgt_epi32(v, max_finite));
                vmax = _mm256_max_epi32(vmax, v);
            }
            alignas(32) int32_t lanes[8];
            _mm256_store_si256(reinterpret_cast<__m256i *>(lanes), vmax);
            for (int j = 0; j < 8; ++j) amax_bits = amax_bits > uint32_t(lanes[j]) ? amax_bits : uint32_t(lanes[j]);
            nonfinite = !_mm256_testz_si256(bad, bad);
        }

        void encode(const T *x, int64_t i0, int64_t i1, const BlockScale &bs, uint8_t *out) const {
            const __m256 lo = _mm256_set1_ps(-1.0f), hi = _mm256_set1_ps(1.0f);
            const __m256 vscale = _mm256_set1_ps(bs.scale), vrecip = _mm256_set1_ps(bs.recip);
            // per 128-bit lane: byte 0 of each 64-bit half (4-bit pairs) / of each 32-bit lane (8-bit)
            const __m256i pick64 = _mm256_setr_epi8(0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,  //
                                                    0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
            const __m256i pick32 = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,  //
                                                    0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
            for (int64_t i = i0; i < i1; i += 8) {
                const __m256 v = avx2::load(x + i);
                __m256 s = bs.tail ? _mm256_div_ps(v, vscale) : _mm256_mul_ps(v, vrecip);
                s = _mm256_min_ps(_mm256_max_ps(s, lo), hi);
                if (BITS == 4) {
                    const __m256i pos = search16(s, mid_lo, mid_hi);
                    const __m256i code = _mm256_castps_si256(avx2::lookup16(order_lo, order_hi, pos));
                    const __m256i pair = _mm256_or_si256(_mm256_slli_epi64(code, 4), _mm256_srli_epi64(code, 32));
                    const __m256i sel = _mm256_shuffle_epi8(pair, pick64);
                    const uint16_t w0 = uint16_t(_mm_extract_epi16(_mm256_castsi256_si128(sel), 0));
                    const uint16_t w1 = uint16_t(_mm_extract_epi16(_mm256_extracti128_si256(sel, 1), 0));
                    const uint32_t four = uint32_t(w0) | (uint32_t(w1) << 16);
                    std::memcpy(out + i / 2, &four, 4);
                } else {
                    const __m256i pos = search256(s, mid_lo, mid_hi, tab.mid);
                    const __m256i code = tab.identity_order ? pos : _mm256_i32gather_epi32(tab.order, pos, 4);
                    const __m256i sel = _mm256_shuffle_epi8(code, pick32);
                    const uint32_t w0 = uint32_t(_mm_cvtsi128_si32(_mm256_castsi256_si128(sel)));
                    const uint32_t w1 = uint32_t(_mm_cvtsi128_si32(_mm256_extracti128_si256(sel, 1)));
                    std::memcpy(out + i, &w0, 4);
                    std::memcpy(out + i + 4, &w1, 4);
                }
            }
        }
    };

    template <int BITS, typename T>
    struct Dequantize : DirectStores {
        const DequantizeArgs &a;
        __m256 tab_lo, tab_hi;  // 4-bit: the codebook in two halves

        Dequantize(const DequantizeArgs &args, int64_t)
            : a(args), tab_lo(BITS == 4 ? _mm256_loadu_ps(args.codebook) : _mm256_setzero_ps()),
              tab_hi(BITS == 4 ? _mm256_loadu_ps(args.codebook + 8) : _mm256_setzero_ps()) {}

        static int64_t vector_end(int64_t begin, int64_t end) { return begin + ((end - begin) & ~int64_t(7)); }

        void decode(T *out, int64_t i0, int64_t i1, float scale) const {
            const __m256 vscale = _mm256_set1_ps(scale);
            const __m128i low4 = _mm_set1_epi8(0x0F);
            for (int64_t i = i0; i < i1; i += 8) {
                __m256 v;
                if (BITS == 4) {
                    uint32_t four;
                    std::memcpy(&four, a.in + i / 2, 4);
                    const __m128i bytes = _mm_cvtsi32_si128(int(four));
                    const __m128i codes =
                        _mm_unpacklo_epi8(_mm_and_si128(_mm_srli_epi16(bytes, 4), low4), _mm_and_si128(bytes, low4));
                    v = avx2::lookup16(tab_lo, tab_hi, _mm256_cvtepu8_epi32(codes));
                } else {
                    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i *>(a.in + i));
                    v = _mm256_i32gather_ps(a.codebook, _mm256_cvtepu8_epi32(bytes), 4);
                }
                avx2::store(out + i, _mm256_mul_ps(v, vscale), false);
            }
        }
    };
};

}  // namespace

const KernelSet *avx2_kernels() {
    static const KernelSet k = kernel_set<VectorKernels<Avx2>>("avx2");
    return &k;
}

}  // namespace nf4core
