// AVX2 (+ FMA, F16C) element access, written once for kernels_avx2.cpp and
// matmul_avx2.cpp: 8 float32 lanes per vector, loaded from and stored to
// float32, float16 and bfloat16 arrays, and the 16-entry table lookup. Stores
// round as numeric.hpp does lane by lane: bfloat16 to nearest even with NaN
// kept quiet (simd.hpp), float16 to nearest even (F16C).
//
// Include only in translation units compiled with the AVX2 flags (meson.build).
// Internal linkage, as numeric.hpp: an inline function with external linkage
// could be merged with a copy built for another instruction set.
#ifndef NF4CORE_SRC_SIMD_AVX2_HPP
#define NF4CORE_SRC_SIMD_AVX2_HPP

#include <immintrin.h>

#include "numeric.hpp"
#include "simd.hpp"

namespace nf4core {
namespace {
namespace avx2 {

// The bfloat16 bits of 8 floats (simd::bf16_bits), in the low half of each lane.
inline __m256i bf16_bits(__m256 v, bool may_be_nan = true) { return (__m256i)simd::bf16_bits(v, may_be_nan); }

inline __m256 load(const float *p) { return _mm256_loadu_ps(p); }

inline __m256 load(const bfloat16_t *p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i *>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline __m256 load(const half_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p))); }

// Stores 8 floats as float32, bfloat16 (as bf16_bits) or float16.
inline void store(float *p, __m256 v, bool = true) { _mm256_storeu_ps(p, v); }

inline void store(bfloat16_t *p, __m256 v, bool may_be_nan = true) {
    const __m256i r = bf16_bits(v, may_be_nan);
    _mm_storeu_si128(reinterpret_cast<__m128i *>(p),
                     _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}

inline void store(half_t *p, __m256 v, bool = true) {
    _mm_storeu_si128(reinterpret_cast<__m128i *>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// table[idx & 15] lane by lane, for a 16-entry float32 table held in two 8-lane
// halves: vpermps reads bits 0..2 of each index, bit 3 (moved to the sign)
// picks the half; higher index bits are ignored.
inline __m256 lookup16(__m256 lo, __m256 hi, __m256i idx) {
    const __m256 a = _mm256_permutevar8x32_ps(lo, idx), b = _mm256_permutevar8x32_ps(hi, idx);
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

}  // namespace avx2
}  // namespace
}  // namespace nf4core

#endif  // NF4CORE_SRC_SIMD_AVX2_HPP
