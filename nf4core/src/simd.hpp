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

// to_bfloat16 (numeric.hpp) lane by lane for values that are not NaN (finite
// or infinite): the bits of the nearest bfloat16, ties to even, in the low half
// of each 32-bit lane. U is the vector of as many uint32 lanes as v has floats.
template <class U, class F>
inline U bf16_bits_not_nan(F v) {
    const U u = (U)v;
    return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
}

// to_bfloat16 lane by lane for any value: NaN stays a quiet NaN. (The vector
// ?: compiles to a compare into a mask and one masked or/blend.)
template <class U, class F>
inline U bf16_bits(F v) {
    return v != v ? (((U)v >> 16) | 0x40u) : bf16_bits_not_nan<U>(v);
}

}  // namespace simd
}  // namespace
}  // namespace nf4core

#endif  // NF4CORE_SRC_SIMD_HPP
