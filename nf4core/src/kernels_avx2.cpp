// AVX2 (+ FMA, F16C) kernels: 8 elements per vector.
//
// The same steps as the AVX-512 kernels (see kernels_avx512.cpp), in the block
// loops of kernels_blocks.hpp. AVX2 has no masked loads for 16-bit types, so
// the last partial vector of a tail block is done with the scalar helpers of
// the reference, which follow the same rules.
#include <immintrin.h>

#include <cstring>
#include <type_traits>

#include "kernels_blocks.hpp"
#include "simd_avx2.hpp"

namespace nf4core {
namespace {

// The number of sorted midpoints strictly below s (mid[15] = +inf is never
// compared) by a branch-free binary search: each step appends one bit to the
// position, p = 2p + (s > probe), and the probe of the next step is one of 2, 4,
// 8 midpoints picked by p with one vpermps (the first step compares with a
// constant). 14 operations and 3 permutes per 8 values; the decisions, and so
// the position, are those of the reference's count.
struct Search16 {
    __m256 m7, t2, t3, t4;  // mid[7]; mid[3], mid[11]; mid[1, 5, 9, 13]; mid[0, 2, .., 14]

    explicit Search16(const float *mid)
        : m7(_mm256_set1_ps(mid[7])),
          t2(_mm256_setr_ps(mid[3], mid[11], mid[3], mid[11], mid[3], mid[11], mid[3], mid[11])),
          t3(_mm256_setr_ps(mid[1], mid[5], mid[9], mid[13], mid[1], mid[5], mid[9], mid[13])),
          t4(_mm256_setr_ps(mid[0], mid[2], mid[4], mid[6], mid[8], mid[10], mid[12], mid[14])) {}

    __m256i operator()(__m256 s) const {
        // a true compare is -1: its top bit is the first bit, then p - mask appends one
        __m256i p = _mm256_srli_epi32(_mm256_castps_si256(_mm256_cmp_ps(s, m7, _CMP_GT_OQ)), 31);
        p = step(s, t2, p);
        p = step(s, t3, p);
        return step(s, t4, p);
    }

    static __m256i step(__m256 s, __m256 table, __m256i p) {
        const __m256 above = _mm256_cmp_ps(s, _mm256_permutevar8x32_ps(table, p), _CMP_GT_OQ);
        return _mm256_sub_epi32(_mm256_add_epi32(p, p), _mm256_castps_si256(above));
    }
};

// 256-entry tables: Search16 over every 16th midpoint (coarse) finds the
// segment, then 4 gathered steps within it.
inline __m256i search256(__m256 s, const Search16 &coarse, const float *mid) {
    __m256i pos = _mm256_slli_epi32(coarse(s), 4);
    for (int step = 8; step >= 1; step >>= 1) {
        const __m256i probe = _mm256_add_epi32(pos, _mm256_set1_epi32(step - 1));
        const __m256 above = _mm256_cmp_ps(s, _mm256_i32gather_ps(mid, probe, 4), _CMP_GT_OQ);
        pos = _mm256_add_epi32(pos, _mm256_and_si256(_mm256_castps_si256(above), _mm256_set1_epi32(step)));
    }
    return pos;
}

// 4-bit codes of 32 elements (4 vectors of one code per 32-bit lane) as 16
// packed bytes, even element in the high nibble: two packs to bytes, one
// multiply-add joins each pair (16 * even + odd), a last pack and an unpack put
// the 128-bit halves back in element order. The vectors hold elements 0-7, ..,
// 24-31 in order, or (Widened, as widen_bf16 leaves them) 0-3 8-11, 4-7 12-15,
// 16-19 24-27, 20-23 28-31.
template <bool Widened>
inline __m128i pack_nibbles(__m256i a, __m256i b, __m256i c, __m256i d) {
    const __m256i bytes = _mm256_packus_epi16(_mm256_packus_epi32(a, b), _mm256_packus_epi32(c, d));
    const __m256i pairs = _mm256_maddubs_epi16(bytes, _mm256_set1_epi16(0x0110));  // 16 * byte 2j + byte 2j+1
    const __m256i packed = _mm256_packus_epi16(pairs, pairs);  // per 128-bit half: its 8 pair bytes, twice
    const __m128i lo = _mm256_castsi256_si128(packed), hi = _mm256_extracti128_si256(packed, 1);
    // in order: half 0 holds the pairs of elements 0-3 of each vector, half 1 those of 4-7 (2 bytes a
    // vector); widened: half 0 holds elements 0-7 and 16-23, half 1 8-15 and 24-31 (4 bytes each)
    return Widened ? _mm_unpacklo_epi32(lo, hi) : _mm_unpacklo_epi16(lo, hi);
}

// 16 bfloat16 as float32 (exact: the bits shifted up 16) in two vectors with
// one unpack each, in the order pack_nibbles<true> takes: elements 0-3 8-11 and 4-7 12-15.
inline void widen_bf16(const bfloat16_t *p, __m256 &a, __m256 &b) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(p));
    a = _mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), v));
    b = _mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), v));
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
        Search16 search;  // BITS == 8: over the coarse midpoints
        __m256 order_lo, order_hi;
        bool fast;  // code4's FAST

        explicit Quantize(const SearchTable &t)
            : tab(t), search(BITS == 4 ? t.mid : t.coarse),
              order_lo(_mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i *>(t.order)))),
              order_hi(_mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i *>(t.order + 8)))),
              fast(t.identity_order) {
            for (int i = 0; i + 1 < t.size; ++i) fast = fast && t.mid[i] >= -1.0f && t.mid[i] < 1.0f;
        }

        static int64_t vector_end(int64_t begin, int64_t end) { return begin + ((end - begin) & ~int64_t(7)); }

        // The largest |x| bits; a NaN or Inf is the only thing above the largest
        // finite float's, so nonfinite needs no pass of its own.
        void absmax(const T *x, int64_t i0, int64_t i1, uint32_t &amax_bits, bool &nonfinite) const {
            __m256i vmax;
            int64_t i = i0;
            if constexpr (sizeof(T) == 2) {
                // 16 elements per load: the largest |x| as 16-bit words (float16 and
                // bfloat16 order by their bits too), widened once per block
                const __m256i abs_bits = _mm256_set1_epi16(0x7FFF);
                __m256i wmax = _mm256_setzero_si256();
                for (; i + 16 <= i1; i += 16) {
                    _mm_prefetch(reinterpret_cast<const char *>(x + i) + kPrefetchBytes, _MM_HINT_T0);
                    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(x + i));
                    wmax = _mm256_max_epu16(wmax, _mm256_and_si256(v, abs_bits));
                }
                // the largest of the 16 words: phminposuw on the complements
                const __m128i m8 = _mm_max_epu16(_mm256_castsi256_si128(wmax), _mm256_extracti128_si256(wmax, 1));
                const uint32_t m =
                    ~uint32_t(_mm_cvtsi128_si32(_mm_minpos_epu16(_mm_xor_si128(m8, _mm_set1_epi32(-1))))) & 0xFFFFu;
                T h;
                h.bits = uint16_t(m);
                const uint32_t bits = float_bits(to_float(h)) & 0x7FFFFFFFu;
                if (i >= i1) {  // a whole block (a multiple of 16): no 8-lane pass and no second reduction
                    amax_bits = amax_bits > bits ? amax_bits : bits;
                    nonfinite = nonfinite || amax_bits > 0x7F7FFFFFu;
                    return;
                }
                vmax = _mm256_set1_epi32(int(bits));
            } else {
                vmax = _mm256_setzero_si256();
            }
            const __m256i abs_bits = _mm256_set1_epi32(0x7FFFFFFF);
            for (; i < i1; i += 8) {
                if constexpr (sizeof(T) == 4)
                    _mm_prefetch(reinterpret_cast<const char *>(x + i) + kPrefetchBytes, _MM_HINT_T0);
                vmax = _mm256_max_epi32(vmax, _mm256_and_si256(_mm256_castps_si256(avx2::load(x + i)), abs_bits));
            }
            __m128i m = _mm_max_epi32(_mm256_castsi256_si128(vmax), _mm256_extracti128_si256(vmax, 1));
            m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0x4E));
            m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0xB1));
            const uint32_t v = uint32_t(_mm_cvtsi128_si32(m));
            amax_bits = amax_bits > v ? amax_bits : v;
            nonfinite = nonfinite || amax_bits > 0x7F7FFFFFu;
        }

        // The 4-bit codes of 8 values, one per 32-bit lane.
        // FAST: the codebook is sorted (the position is the code) and its midpoints
        // lie in [-1, 1), so that clamping to [-1, 1] changes no comparison with them.
        template <bool TAIL, bool FAST>
        __m256i code4(__m256 v, __m256 vscale, __m256 vrecip) const {
            __m256 s = TAIL ? _mm256_div_ps(v, vscale) : _mm256_mul_ps(v, vrecip);
            if (!FAST) s = _mm256_min_ps(_mm256_max_ps(s, _mm256_set1_ps(-1.0f)), _mm256_set1_ps(1.0f));
            const __m256i pos = search(s);
            return FAST ? pos : _mm256_castps_si256(avx2::lookup16(order_lo, order_hi, pos));
        }

        // 32 elements per step (full blocks are whole steps), then the 1 to 3
        // vectors left in a tail block
        template <bool TAIL, bool FAST>
        void encode4(const T *x, int64_t i0, int64_t i1, const BlockScale &bs, uint8_t *out) const {
            const __m256 vscale = _mm256_set1_ps(bs.scale), vrecip = _mm256_set1_ps(bs.recip);
            auto code = [&](__m256 v) { return code4<TAIL, FAST>(v, vscale, vrecip); };
            int64_t i = i0;
            for (; i + 32 <= i1; i += 32) {
                __m128i bytes;
                if constexpr (std::is_same<T, bfloat16_t>::value) {
                    __m256 a, b, c, d;
                    widen_bf16(x + i, a, b);
                    widen_bf16(x + i + 16, c, d);
                    bytes = pack_nibbles<true>(code(a), code(b), code(c), code(d));
                } else {
                    bytes = pack_nibbles<false>(code(avx2::load(x + i)), code(avx2::load(x + i + 8)),
                                                code(avx2::load(x + i + 16)), code(avx2::load(x + i + 24)));
                }
                _mm_storeu_si128(reinterpret_cast<__m128i *>(out + (i >> 1)), bytes);
            }
            if (i < i1) {
                __m256i c[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                                _mm256_setzero_si256()};
                for (int j = 0; i + 8 * j < i1; ++j) c[j] = code(avx2::load(x + i + 8 * j));
                alignas(16) uint8_t bytes[16];
                _mm_store_si128(reinterpret_cast<__m128i *>(bytes), pack_nibbles<false>(c[0], c[1], c[2], c[3]));
                std::memcpy(out + (i >> 1), bytes, size_t((i1 - i) >> 1));
            }
        }

        void encode(const T *x, int64_t i0, int64_t i1, const BlockScale &bs, uint8_t *out) const {
            if (BITS == 4) {
                if (bs.tail)
                    encode4<true, false>(x, i0, i1, bs, out);  // the last block: one instance will do
                else if (fast)
                    encode4<false, true>(x, i0, i1, bs, out);
                else
                    encode4<false, false>(x, i0, i1, bs, out);
                return;
            }
            const __m256 vscale = _mm256_set1_ps(bs.scale), vrecip = _mm256_set1_ps(bs.recip);
            const __m256 lo = _mm256_set1_ps(-1.0f), hi = _mm256_set1_ps(1.0f);
            // per 128-bit lane: byte 0 of each 32-bit lane
            const __m256i pick32 = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,  //
                                                    0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
            for (int64_t i = i0; i < i1; i += 8) {
                const __m256 v = avx2::load(x + i);
                __m256 s = bs.tail ? _mm256_div_ps(v, vscale) : _mm256_mul_ps(v, vrecip);
                s = _mm256_min_ps(_mm256_max_ps(s, lo), hi);
                const __m256i pos = search256(s, search, tab.mid);
                const __m256i code = tab.identity_order ? pos : _mm256_i32gather_epi32(tab.order, pos, 4);
                const __m256i sel = _mm256_shuffle_epi8(code, pick32);
                const uint32_t w0 = uint32_t(_mm_cvtsi128_si32(_mm256_castsi256_si128(sel)));
                const uint32_t w1 = uint32_t(_mm_cvtsi128_si32(_mm256_extracti128_si256(sel, 1)));
                std::memcpy(out + i, &w0, 4);
                std::memcpy(out + i + 4, &w1, 4);
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
