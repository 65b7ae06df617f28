// The scalar math of the format, shared by every CPU kernel and by the CUDA
// kernels (src/cuda/): float16/bfloat16 conversions, the block-scale rule,
// scaling, the nearest-code lookup, nibble packing, decoding and the
// double-quantization formula. Every function is NF4_HOST_DEVICE, so the CPU
// tests exercise the code the GPU runs.
//
// Everything here must give bit-identical results on every path, so it uses
// plain IEEE float32 operations only; nf4core is compiled with
// -ffp-contract=off (host) and --fmad=false (nvcc), and the two-rounding
// formulas below spell out their roundings with __fmul_rn/__fadd_rn on the
// device, so that a*b+c is never fused where bitsandbytes rounds twice.
#ifndef NF4CORE_SRC_NUMERIC_HPP
#define NF4CORE_SRC_NUMERIC_HPP

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define NF4_HOST_DEVICE __host__ __device__
#else
#define NF4_HOST_DEVICE
#endif

namespace nf4core {

// Nearest-code search data for a codebook of `size` (16 or 256) entries in any
// order. The values are sorted ascending by a stable sort (equal values, such
// as FP4's +0 and -0, keep code order) and the midpoints between neighbours are
// computed in float32 as (a + b) / 2. The sorted position of x is the number of
// midpoints strictly below x (torch.bucketize with right=False), so a value
// exactly on a midpoint goes to the lower value; order[position] is the code.
// This is bitsandbytes' rule (CUDA `x > mid` trees; CPU bucketize over sorted
// midpoints, remapped by argsort). Plain data, shared by every kernel path.
struct SearchTable {
    alignas(64) float mid[256];      // size - 1 midpoints, then +inf
    alignas(64) int32_t order[256];  // sorted position -> code
    alignas(64) float coarse[16];    // size 256: coarse[k] = mid[16k + 15]
    int32_t size;
    bool identity_order;             // order[i] == i (sorted tables)
};

// Internal linkage: this header is compiled into translation units built for
// different instruction sets (AVX2, AVX-512), and an inline function with
// external linkage could be merged across them by the linker, putting AVX-512
// code into the generic path.
namespace {

struct half_t {
    uint16_t bits;
};
struct bfloat16_t {
    uint16_t bits;
};
static_assert(sizeof(half_t) == 2, "half_t must be 2 bytes");
static_assert(sizeof(bfloat16_t) == 2, "bfloat16_t must be 2 bytes");

// The bits of a float and back, and a * b, a + b each rounded once to float32
// (never contracted to an FMA): the device's intrinsics, plain operations on
// the host (compiled with -ffp-contract=off).
#if defined(__CUDA_ARCH__)
NF4_HOST_DEVICE inline uint32_t float_bits(float f) { return __float_as_uint(f); }
NF4_HOST_DEVICE inline float bits_float(uint32_t u) { return __uint_as_float(u); }
NF4_HOST_DEVICE inline float mul_rn(float a, float b) { return __fmul_rn(a, b); }
NF4_HOST_DEVICE inline float add_rn(float a, float b) { return __fadd_rn(a, b); }
#else
NF4_HOST_DEVICE inline uint32_t float_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}
NF4_HOST_DEVICE inline float bits_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}
NF4_HOST_DEVICE inline float mul_rn(float a, float b) { return a * b; }
NF4_HOST_DEVICE inline float add_rn(float a, float b) { return a + b; }
#endif

NF4_HOST_DEVICE inline float to_float(float x) { return x; }

NF4_HOST_DEVICE inline float to_float(bfloat16_t x) { return bits_float(uint32_t(x.bits) << 16); }

NF4_HOST_DEVICE inline float to_float(half_t x) {
    const uint32_t h = x.bits;
    const uint32_t sign = (h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1Fu;
    const uint32_t mant = h & 0x3FFu;
    if (exp == 0x1Fu) return bits_float(sign | 0x7F800000u | (mant << 13));  // inf / nan
    if (exp != 0) return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
    // zero or subnormal: mant * 2^-24 is exact in float32
    const float v = float(mant) * 5.9604644775390625e-08f;
    return bits_float(sign | float_bits(v));
}

// float32 -> bfloat16, round to nearest even (as torch's .to(torch.bfloat16)).
NF4_HOST_DEVICE inline bfloat16_t to_bfloat16(float f) {
    uint32_t u = float_bits(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return bfloat16_t{uint16_t((u >> 16) | 0x40u)};  // quiet NaN
    u += 0x7FFFu + ((u >> 16) & 1u);
    return bfloat16_t{uint16_t(u >> 16)};
}

// float32 -> float16, round to nearest even, overflow to inf (as torch/numpy).
// Method: F. Giesen, "float->half variants" (public domain), rtne version.
NF4_HOST_DEVICE inline half_t to_half(float f) {
    const uint32_t f32_inf = 255u << 23;
    const uint32_t f16_max = (127u + 16u) << 23;                       // 65536.0f
    const uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;  // 0.5f
    uint32_t x = float_bits(f);
    const uint32_t sign = x & 0x80000000u;
    x ^= sign;
    uint16_t o;
    if (x >= f16_max) {
        o = (x > f32_inf) ? 0x7E00u : 0x7C00u;
    } else if (x < (113u << 23)) {
        // below the smallest normal half: let the FPU round the mantissa
        const float fx = bits_float(x) + bits_float(denorm_magic);
        o = uint16_t(float_bits(fx) - denorm_magic);
    } else {
        const uint32_t mant_odd = (x >> 13) & 1u;
        x += (uint32_t(15 - 127) << 23) + 0xFFFu;
        x += mant_odd;
        o = uint16_t(x >> 13);
    }
    return half_t{uint16_t(o | (sign >> 16))};
}

template <typename T>
NF4_HOST_DEVICE inline T from_float(float v);
template <>
NF4_HOST_DEVICE inline float from_float<float>(float v) { return v; }
template <>
NF4_HOST_DEVICE inline half_t from_float<half_t>(float v) { return to_half(v); }
template <>
NF4_HOST_DEVICE inline bfloat16_t from_float<bfloat16_t>(float v) { return to_bfloat16(v); }

// |x| > every float, or NaN
NF4_HOST_DEVICE inline bool is_finite(float x) { return (float_bits(x) & 0x7F800000u) != 0x7F800000u; }

// bitsandbytes clamps the block scale with absmax.clamp(min=1e-38) before
// taking 1/absmax, so an all-zero block scales by 1e38 and encodes the code
// of 0.0 (backends/default/ops.py). Note 1e-38f is subnormal.
constexpr float kMinScale = 1e-38f;

// Scales one element of a block to [-1, 1] the way bitsandbytes' CPU/default
// backend does: full blocks multiply by the float32 reciprocal of the scale,
// the shorter tail block divides by it. Then clamp to [-1, 1].
NF4_HOST_DEVICE inline float scale_value(float x, float scale, float recip, bool tail) {
    float s = tail ? x / scale : x * recip;
    if (s < -1.0f) s = -1.0f;
    if (s > 1.0f) s = 1.0f;
    return s;
}

// Nearest code for a scaled value, given the SearchTable of the codebook
// (see kernels.hpp for the rule). N is 16 or 256.
template <int N>
NF4_HOST_DEVICE inline uint8_t nearest_code(const SearchTable &t, float x) {
    int pos;
    if (N <= 16) {
        pos = 0;
        for (int i = 0; i < N - 1; ++i) pos += (x > t.mid[i]) ? 1 : 0;
    } else {
        int lo = 0, hi = N - 1;  // number of midpoints below x, in [0, N-1]
        while (lo < hi) {
            const int m = (lo + hi) >> 1;
            if (t.mid[m] < x)
                lo = m + 1;
            else
                hi = m;
        }
        pos = lo;
    }
    return uint8_t(t.order[pos]);
}

// The scale of a block as every path derives it from the block's absmax.
struct BlockScale {
    float scale;   // max(absmax, 1e-38)
    float recip;   // its float32 reciprocal (full blocks multiply by it)
    bool tail;     // the short last block divides by scale instead
    float stored;  // what absmax[b] holds: the raw absmax, or the clamped scale for the tail
};

NF4_HOST_DEVICE inline BlockScale block_scale(float amax, int64_t len, int64_t blocksize) {
    BlockScale s;
    s.scale = amax > kMinScale ? amax : kMinScale;
    s.recip = 1.0f / s.scale;
    s.tail = len < blocksize;
    // bitsandbytes stores the raw absmax of full blocks but the clamped one
    // (>= 1e-38) of the short tail block; both decode zeros to zeros.
    s.stored = s.tail ? s.scale : amax;
    return s;
}

// The code of one element of a block with scale s (scale, clamp, look up).
template <int N>
NF4_HOST_DEVICE inline uint8_t encode_value(const SearchTable &t, float x, const BlockScale &s) {
    return nearest_code<N>(t, scale_value(x, s.scale, s.recip, s.tail));
}

// The 4-bit code of element i of a packed array: the even element sits in the
// high nibble (bitsandbytes' order).
NF4_HOST_DEVICE inline unsigned nibble_at(const uint8_t *packed, int64_t i) {
    const unsigned byte = packed[i >> 1];
    return (i & 1) ? (byte & 0x0Fu) : (byte >> 4);
}

// Two 4-bit codes as one packed byte (first element high).
NF4_HOST_DEVICE inline uint8_t pack_pair(unsigned hi, unsigned lo) { return uint8_t((hi << 4) | lo); }

// Decoded value before rounding to the output type: codebook[code] * scale,
// one float32 rounding.
NF4_HOST_DEVICE inline float decode_value(float code_value, float scale) { return mul_rn(code_value, scale); }

// Double quantization (QLoRA Sec. 3, bitsandbytes compress_statistics): the
// float32 block scale from its 8-bit code, the scale of its group of 256 and
// the mean offset, as dyn_code[q] * nested + offset with two roundings.
NF4_HOST_DEVICE inline float dq_scale(float dyn_value, float nested_absmax, float offset) {
    return add_rn(mul_rn(dyn_value, nested_absmax), offset);
}

}  // namespace
}  // namespace nf4core

#endif  // NF4CORE_SRC_NUMERIC_HPP
