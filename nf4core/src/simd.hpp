// What the per-ISA element access headers (simd_avx2.hpp, simd_avx512.hpp,
// simd_neon.hpp) share, written once with GCC/Clang vector extensions: the
// compiler turns the operators into each ISA's lane-wise instructions, so
// there is one definition of a rule for every vector path, beside the scalar
// one in numeric.hpp that the tests compare it with.
//
// Included only through the ISA headers; internal linkage (numeric.hpp says why).
#ifndef NF4CORE_SRC_SIMD_HPP
#define NF4CORE_SRC_SIMD_HPP

#include <cstdint>

namespace nf4core {
namespace {
namespace simd {

// The vector of uint32 lanes as wide as a vector of `Bytes` bytes.
template <int Bytes>
struct Lanes32;
template <>
struct Lanes32<16> {
    typedef uint32_t type __attribute__((vector_size(16)));
};
template <>
struct Lanes32<32> {
    typedef uint32_t type __attribute__((vector_size(32)));
};
template <>
struct Lanes32<64> {
    typedef uint32_t type __attribute__((vector_size(64)));
};

// to_bfloat16 (numeric.hpp) lane by lane: the bits of the nearest bfloat16,
// ties to even, in the low half of each 32-bit lane; a NaN stays a quiet NaN.
// With may_be_nan false the caller knows no lane is NaN (finite or infinite
// values): the same bits without the NaN rule, a few instructions fewer (a
// constant after inlining). The vector ?: is a compare into a mask and one
// masked or/blend.
template <class F, class U = typename Lanes32<sizeof(F)>::type>
inline U bf16_bits(F v, bool may_be_nan) {
    const U u = (U)v;
    const U rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return may_be_nan ? (v != v ? ((u >> 16) | 0x40u) : rounded) : rounded;
}

}  // namespace simd
}  // namespace
}  // namespace nf4core

#endif  // NF4CORE_SRC_SIMD_HPP
