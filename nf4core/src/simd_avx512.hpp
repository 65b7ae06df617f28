// AVX-512 (F, BW, VL, DQ) element access, written once for kernels_avx512.cpp,
// matmul_avx512.cpp and matmul_amx.cpp: 16 float32 lanes per vector, loaded
// from and stored to float32, float16 and bfloat16 arrays, whole or masked.
// Stores round as numeric.hpp does lane by lane: bfloat16 to nearest even with
// NaN kept quiet (simd.hpp), float16 to nearest even (vcvtps2ph).
//
// Include only in translation units compiled with the AVX-512 flags
// (meson.build). Internal linkage, as numeric.hpp: an inline function with
// external linkage could be merged with a copy built for another instruction
// set (matmul_amx.cpp has flags of its own).
#ifndef NF4CORE_SRC_SIMD_AVX512_HPP
#define NF4CORE_SRC_SIMD_AVX512_HPP

#include <immintrin.h>

#include <cstdint>

#include "numeric.hpp"
#include "simd.hpp"

namespace nf4core {
namespace {
namespace avx512 {

// Lanes<T>, T = float, half_t or bfloat16_t. load: 16 elements as float32
// (masked-off lanes read 0). pack: 16 float32 to the stored form W (a whole
// __m512 for float32, a __m256i of 16-bit values; bfloat16 as bf16_bits), then
// stored unaligned, masked, or streamed (non-temporal, aligned address).
template <typename T>
struct Lanes;

template <>
struct Lanes<float> {
    using W = __m512;
    static __m512 load(const float *p) { return _mm512_loadu_ps(p); }
    static __m512 load(const float *p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
    static W pack(__m512 v, bool = true) { return v; }
    static void store(float *p, W w) { _mm512_storeu_ps(p, w); }
    static void store(float *p, W w, __mmask16 m) { _mm512_mask_storeu_ps(p, m, w); }
    static void stream(float *p, W w) { _mm512_stream_ps(p, w); }
    static W join(W prev, int offset, W cur) {  // lanes [16 - offset, 16) of prev, then [0, 16 - offset) of cur
        const __m512i idx = _mm512_add_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                             _mm512_set1_epi32(16 - offset));
        return _mm512_permutex2var_ps(prev, idx, cur);
    }
};

template <typename T>
struct Lanes16 {  // float16 and bfloat16: 16 lanes of 16 bits
    using W = __m256i;
    static void store(T *p, W w) { _mm256_storeu_si256(reinterpret_cast<__m256i *>(p), w); }
    static void store(T *p, W w, __mmask16 m) { _mm256_mask_storeu_epi16(p, m, w); }
    static void stream(T *p, W w) { _mm256_stream_si256(reinterpret_cast<__m256i *>(p), w); }
    // offset in elements; an even offset joins whole 32-bit pairs (vpermt2d is
    // one cheap instruction, vpermt2w is not), which covers any 4-byte-aligned output
    static W join(W prev, int offset, W cur) {
        if ((offset & 1) == 0) {
            const __m256i idx = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(8 - offset / 2));
            return _mm256_permutex2var_epi32(prev, idx, cur);
        }
        const __m256i idx = _mm256_add_epi16(
            _mm256_setr_epi16(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm256_set1_epi16(short(16 - offset)));
        return _mm256_permutex2var_epi16(prev, idx, cur);
    }
};

// The bfloat16 bits of 16 floats (simd::bf16_bits), in the low half of each lane.
inline __m512i bf16_bits(__m512 v, bool may_be_nan = true) { return (__m512i)simd::bf16_bits(v, may_be_nan); }

template <>
struct Lanes<bfloat16_t> : Lanes16<bfloat16_t> {
    static __m512 widen(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
    static __m512 load(const bfloat16_t *p) { return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(p))); }
    static __m512 load(const bfloat16_t *p, __mmask16 m) { return widen(_mm256_maskz_loadu_epi16(m, p)); }
    static W pack(__m512 v, bool may_be_nan = true) { return _mm512_cvtepi32_epi16(bf16_bits(v, may_be_nan)); }
};

template <>
struct Lanes<half_t> : Lanes16<half_t> {
    static __m512 load(const half_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(p))); }
    static __m512 load(const half_t *p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }
    static W pack(__m512 v, bool = true) { return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
};

// The first `remaining` of 16 lanes (all 16 for 16 or more).
inline __mmask16 lanes_mask(int64_t remaining) {
    return remaining >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << remaining) - 1u);
}

template <typename T>
inline __m512 load(const T *p) {
    return Lanes<T>::load(p);
}

template <typename T>
inline void store(T *p, __m512 v, bool may_be_nan = true) {
    Lanes<T>::store(p, Lanes<T>::pack(v, may_be_nan));
}

}  // namespace avx512
}  // namespace
}  // namespace nf4core

#endif  // NF4CORE_SRC_SIMD_AVX512_HPP
