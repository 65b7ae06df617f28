// NEON element access (aarch64, where NEON is baseline), written once for
// kernels_neon.cpp and matmul_neon.cpp: 4 float32 lanes per vector, loaded
// from and stored to float32, float16 and bfloat16 arrays. Stores round as
// numeric.hpp does lane by lane: bfloat16 to nearest even with NaN kept quiet
// (simd.hpp), float16 to nearest even (fcvtn).
//
// Internal linkage, as the x86 ISA headers (numeric.hpp says why).
#ifndef NF4CORE_SRC_SIMD_NEON_HPP
#define NF4CORE_SRC_SIMD_NEON_HPP

#include <arm_neon.h>

#include <cstring>

#include "numeric.hpp"
#include "simd.hpp"

namespace nf4core {
namespace {
namespace neon {

inline float32x4_t load(const float *p) { return vld1q_f32(p); }

inline float32x4_t load(const bfloat16_t *p) {
    uint16x4_t h;
    std::memcpy(&h, p, 8);
    return vreinterpretq_f32_u32(vshll_n_u16(h, 16));
}

inline float32x4_t load(const half_t *p) {
    float16x4_t h;
    std::memcpy(&h, p, 8);
    return vcvt_f32_f16(h);
}

// The bfloat16 bits of 4 floats (simd::bf16_bits).
inline uint16x4_t bf16_bits(float32x4_t v, bool may_be_nan = true) {
    return vmovn_u32(simd::bf16_bits(v, may_be_nan));
}

// Stores 4 floats as float32, bfloat16 (as bf16_bits) or float16.
inline void store(float *p, float32x4_t v, bool = true) { vst1q_f32(p, v); }

inline void store(bfloat16_t *p, float32x4_t v, bool may_be_nan = true) {
    const uint16x4_t h = bf16_bits(v, may_be_nan);
    std::memcpy(p, &h, 8);
}

inline void store(half_t *p, float32x4_t v, bool = true) {
    const float16x4_t h = vcvt_f16_f32(v);
    std::memcpy(p, &h, 8);
}

}  // namespace neon
}  // namespace
}  // namespace nf4core

#endif  // NF4CORE_SRC_SIMD_NEON_HPP
