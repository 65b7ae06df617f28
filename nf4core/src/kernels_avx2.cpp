// AVX2 (+ FMA, F16C) kernels: 8 elements per vector.
//
// The same steps as the AVX-512 kernels (see kernels_avx512.cpp). AVX2 has no
// masked loads for 16-bit types, so the last partial vector of a tail block is
// done with the scalar helpers of the reference, which follow the same rules.
#include <immintrin.h>

#include "kernels.hpp"
#include "kernels_ref.hpp"

namespace nf4core {
namespace {

template <typename T>
struct Lanes;

template <>
struct Lanes<float> {
    static __m256 load(const float *p) { return _mm256_loadu_ps(p); }
    static void store(float *p, __m256 v) { _mm256_storeu_ps(p, v); }
};

template <>
struct Lanes<bfloat16_t> {
    static __m256 load(const bfloat16_t *p) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i *>(p));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    static void store(bfloat16_t *p, __m256 v) {  // round to nearest even (outputs are never NaN)
        const __m256i u = _mm256_castps_si256(v);
        const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb)), 16);
        const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
        _mm_storeu_si128(reinterpret_cast<__m128i *>(p), packed);
    }
};

template <>
struct Lanes<half_t> {
    static __m256 load(const half_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p))); }
    static void store(half_t *p, __m256 v) {
        _mm_storeu_si128(reinterpret_cast<__m128i *>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
};

// table[idx] for a 16-entry table held in two 8-lane halves
inline __m256 lookup16(__m256 lo, __m256 hi, __m256i idx) {
    const __m256 a = _mm256_permutevar8x32_ps(lo, idx), b = _mm256_permutevar8x32_ps(hi, idx);
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));  // bit 3 selects
}

inline __m256i search16(__m256 s, __m256 mid_lo, __m256 mid_hi) {
    __m256i pos = _mm256_setzero_si256();
    for (int step = 8; step >= 1; step >>= 1) {
        const __m256i probe = _mm256_add_epi32(pos, _mm256_set1_epi32(step - 1));
        const __m256 above = _mm256_cmp_ps(s, lookup16(mid_lo, mid_hi, probe), _CMP_GT_OQ);
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

template <int BITS, typename T>
void quantize(const QuantizeArgs &a, int64_t b0, int64_t b1) {
    using L = Lanes<T>;
    const T *x = static_cast<const T *>(a.x);
    const SearchTable &tab = *a.table;
    const float *mids = BITS == 4 ? tab.mid : tab.coarse;
    const __m256 mid_lo = _mm256_load_ps(mids), mid_hi = _mm256_load_ps(mids + 8);
    const __m256 order_lo = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i *>(tab.order)));
    const __m256 order_hi = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i *>(tab.order + 8)));
    const __m256i abs_bits = _mm256_set1_epi32(0x7FFFFFFF), max_finite = _mm256_set1_epi32(0x7F7FFFFF);
    const __m256 lo = _mm256_set1_ps(-1.0f), hi = _mm256_set1_ps(1.0f);
    // per 128-bit lane: byte 0 of each 64-bit half (4-bit pairs) / of each 32-bit lane (8-bit)
    const __m256i pick64 = _mm256_setr_epi8(0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,  //
                                            0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    const __m256i pick32 = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,  //
                                            0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);

    for (int64_t b = b0; b < b1; ++b) {
        const int64_t begin = b * a.blocksize;
        const int64_t end = begin + a.blocksize < a.n ? begin + a.blocksize : a.n;
        const int64_t vend = begin + ((end - begin) & ~int64_t(7));
        __m256i vmax = _mm256_setzero_si256(), bad = _mm256_setzero_si256();
        for (int64_t i = begin; i < vend; i += 8) {
            _mm_prefetch(reinterpret_cast<const char *>(x + i) + kPrefetchBytes, _MM_HINT_T0);
            const __m256i v = _mm256_and_si256(_mm256_castps_si256(L::load(x + i)), abs_bits);
            bad = _mm256_or_si256(bad, _mm256_cmpgt_epi32(v, max_finite));
            vmax = _mm256_max_epi32(vmax, v);
        }
        alignas(32) int32_t lanes[8];
        _mm256_store_si256(reinterpret_cast<__m256i *>(lanes), vmax);
        uint32_t amax_bits = 0;
        for (int j = 0; j < 8; ++j) amax_bits = amax_bits > uint32_t(lanes[j]) ? amax_bits : uint32_t(lanes[j]);
        bool nonfinite = !_mm256_testz_si256(bad, bad);
        ref::fold_absmax(x, vend, end, amax_bits, nonfinite);
        if (nonfinite) {  // the reference kernel names the first non-finite element
            ref::quantize_blocks<BITS, T>(x, a.n, a.blocksize, tab, a.out, a.absmax, b, b + 1);
            continue;
        }
        const ref::BlockScale bs = ref::block_scale(bits_float(amax_bits), end - begin, a.blocksize);
        const float scale = bs.scale, recip = bs.recip;
        const bool tail = bs.tail;
        a.absmax[b] = bs.stored;
        const __m256 vscale = _mm256_set1_ps(scale), vrecip = _mm256_set1_ps(recip);

        for (int64_t i = begin; i < vend; i += 8) {
            const __m256 v = L::load(x + i);
            __m256 s = tail ? _mm256_div_ps(v, vscale) : _mm256_mul_ps(v, vrecip);
            s = _mm256_min_ps(_mm256_max_ps(s, lo), hi);
            if (BITS == 4) {
                const __m256i code = _mm256_castps_si256(lookup16(order_lo, order_hi, search16(s, mid_lo, mid_hi)));
                const __m256i pair = _mm256_or_si256(_mm256_slli_epi64(code, 4), _mm256_srli_epi64(code, 32));
                const __m256i sel = _mm256_shuffle_epi8(pair, pick64);
                const uint16_t w0 = uint16_t(_mm_extract_epi16(_mm256_castsi256_si128(sel), 0));
                const uint16_t w1 = uint16_t(_mm_extract_epi16(_mm256_extracti128_si256(sel, 1), 0));
                const uint32_t four = uint32_t(w0) | (uint32_t(w1) << 16);
                std::memcpy(a.out + i / 2, &four, 4);
            } else {
                const __m256i pos = search256(s, mid_lo, mid_hi, tab.mid);
                const __m256i code = tab.identity_order ? pos : _mm256_i32gather_epi32(tab.order, pos, 4);
                const __m256i sel = _mm256_shuffle_epi8(code, pick32);
                const uint32_t w0 = uint32_t(_mm_cvtsi128_si32(_mm256_castsi256_si128(sel)));
                const uint32_t w1 = uint32_t(_mm_cvtsi128_si32(_mm256_extracti128_si256(sel, 1)));
                std::memcpy(a.out + i, &w0, 4);
                std::memcpy(a.out + i + 4, &w1, 4);
            }
        }
        // the last partial vector of a tail block, with the reference's scalar steps
        ref::encode_range<BITS, T>(x, vend, end, scale, recip, tail, tab, a.out);
        if (BITS == 4 && end == a.n) ref::pad_odd_end(a.n, tab, a.out);
    }
}

template <typename T>
void dequantize4(const DequantizeArgs &a, int64_t b0, int64_t b1) {
    using L = Lanes<T>;
    T *out = static_cast<T *>(a.out);
    const __m256 tab_lo = _mm256_loadu_ps(a.codebook), tab_hi = _mm256_loadu_ps(a.codebook + 8);
    const __m128i low4 = _mm_set1_epi8(0x0F);
    for (int64_t b = b0; b < b1; ++b) {
        const int64_t begin = b * a.blocksize;
        const int64_t end = begin + a.blocksize < a.n ? begin + a.blocksize : a.n;
        const int64_t vend = begin + ((end - begin) & ~int64_t(7));
        const float scale = a.absmax[b];
        const __m256 vscale = _mm256_set1_ps(scale);
        for (int64_t i = begin; i < vend; i += 8) {
            uint32_t four;
            std::memcpy(&four, a.in + i / 2, 4);
            const __m128i bytes = _mm_cvtsi32_si128(int(four));
            const __m128i codes = _mm_unpacklo_epi8(_mm_and_si128(_mm_srli_epi16(bytes, 4), low4), _mm_and_si128(bytes, low4));
            L::store(out + i, _mm256_mul_ps(lookup16(tab_lo, tab_hi, _mm256_cvtepu8_epi32(codes)), vscale));
        }
        ref::decode_range<4, T>(a.in, a.codebook, scale, out, vend, end);
    }
}

template <typename T>
void dequantize8(const DequantizeArgs &a, int64_t b0, int64_t b1) {
    using L = Lanes<T>;
    T *out = static_cast<T *>(a.out);
    for (int64_t b = b0; b < b1; ++b) {
        const int64_t begin = b * a.blocksize;
        const int64_t end = begin + a.blocksize < a.n ? begin + a.blocksize : a.n;
        const int64_t vend = begin + ((end - begin) & ~int64_t(7));
        const float scale = a.absmax[b];
        const __m256 vscale = _mm256_set1_ps(scale);
        for (int64_t i = begin; i < vend; i += 8) {
            const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i *>(a.in + i)));
            L::store(out + i, _mm256_mul_ps(_mm256_i32gather_ps(a.codebook, idx, 4), vscale));
        }
        ref::decode_range<8, T>(a.in, a.codebook, scale, out, vend, end);
    }
}

}  // namespace

const KernelSet *avx2_kernels() {
    static const KernelSet k = NF4_KERNEL_SET("avx2", quantize, dequantize4, dequantize8);
    return &k;
}

}  // namespace nf4core
