// What the per-ISA element access headers (simd_avx2.hpp, simd_avx512.hpp,
// simd_neon.hpp) share, written once with GCC/Clang vector extensions: the
// compiler turns the operators into each ISA's lane-wise instructions, so
// there is one definition of a rule for every vector path, beside the scalar
// one in numeric.hpp that the tests compare it with.
//
// Included only through the ISA headers; internal linkage (numeric.hpp says why).
#ifndef NF4CORE_SRC_SIMD_HPP
#define NF4CORE_SRC_SIMD_HPP

namespace nf4core {
namespace {
namespace simd {

// to_bfloat16 (numeric.hpp) lane by lane: the bfloat16 bits of each float of v
// in the low half of its 32-bit lane, rounded to nearest even, NaN kept quiet.
// U is the vector of as many uint32 lanes as v has floats.
template <class U, class F>
inline U bf16_bits(F v) {
    const U u = (U)v;
    const U hi = u >> 16;
    const U nan = (U)(v != v);  // all ones in NaN lanes
    const U rounded = (u + 0x7FFFu + (hi & 1u)) >> 16;
    return (rounded & ~nan) | ((hi | 0x40u) & nan);
}

}  // namespace simd
}  // namespace
}  // namespace nf4core

#endif  // NF4CORE_SRC_SIMD_HPP
