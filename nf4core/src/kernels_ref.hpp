// Scalar reference kernels for blockwise k-bit quantization (k = 4 or 8).
//
// These are the readable definition of the format; optimized kernels must give
// byte-identical results and are tested against them. One template serves both
// bit widths and all element types, so the rules live in exactly one place.
#ifndef NF4CORE_SRC_KERNELS_REF_HPP
#define NF4CORE_SRC_KERNELS_REF_HPP

#include <cstdint>
#include <string>

#include "error.hpp"
#include "numeric.hpp"

namespace nf4core {

// Formats a non-finite input error; `index` is the flat element index.
[[noreturn]] void fail_non_finite(int64_t index, float value);
// Formats the error for a bad block scale of double quantization: NaN/Inf
// gives NF4_ERROR_NON_FINITE, a negative value NF4_ERROR_INVALID_ARGUMENT.
[[noreturn]] void fail_bad_scale(int64_t index, float value);

namespace {  // internal linkage, see numeric.hpp
namespace ref {

// Scale (absmax) of elements [begin, end); reports the first non-finite element.
template <typename T>
inline float block_absmax(const T *x, int64_t begin, int64_t end) {
    float amax = 0.0f;
    for (int64_t i = begin; i < end; ++i) {
        const float v = to_float(x[i]);
        if (!is_finite(v)) fail_non_finite(i, v);
        const float a = v < 0.0f ? -v : v;
        if (a > amax) amax = a;
    }
    return amax;
}

// The block-scale rule lives in numeric.hpp (shared with the CUDA kernels);
// the optimized CPU paths name it through ref::.
using ::nf4core::BlockScale;
using ::nf4core::block_scale;

// Folds elements [i0, i1) into a running max of |x| (as float bits, which order
// like the values) and a flag for NaN/Inf; the scalar end of a vector loop.
template <typename T>
inline void fold_absmax(const T *x, int64_t i0, int64_t i1, uint32_t &amax_bits, bool &nonfinite) {
    for (int64_t i = i0; i < i1; ++i) {
        const uint32_t u = float_bits(to_float(x[i])) & 0x7FFFFFFFu;
        nonfinite = nonfinite || u > 0x7F7FFFFFu;
        amax_bits = amax_bits > u ? amax_bits : u;
    }
}

// Encodes elements [i0, i1) of one block, already scaled by (scale, recip,
// tail): BITS = 4 packs two codes per byte (even element in the high nibble),
// BITS = 8 writes one code per byte. i0 is even for 4-bit.
template <int BITS, typename T>
inline void encode_range(const T *x, int64_t i0, int64_t i1, float scale, float recip, bool tail,
                         const SearchTable &lut, uint8_t *out) {
    for (int64_t i = i0; i < i1; ++i) {
        const uint8_t code = nearest_code<(1 << BITS)>(lut, scale_value(to_float(x[i]), scale, recip, tail));
        if (BITS == 8) {
            out[i] = code;
        } else if ((i & 1) == 0) {
            out[i >> 1] = uint8_t(code << 4);
        } else {
            out[i >> 1] = uint8_t(out[i >> 1] | code);
        }
    }
}

// An odd length pads the last low nibble with the code of 0.0, as
// bitsandbytes pads the scaled values with one zero before packing. Call after
// the block holding element n - 1 is encoded.
inline void pad_odd_end(int64_t n, const SearchTable &lut, uint8_t *out) {
    if (n & 1) out[n >> 1] = uint8_t(out[n >> 1] | nearest_code<16>(lut, 0.0f));
}

// Decodes elements [i0, i1) of one block: codebook[code] * scale in float32,
// rounded once to T (numeric.hpp: nibble_at, decode_value).
template <int BITS, typename T>
inline void decode_range(const uint8_t *in, const float *codebook, float scale, T *out, int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
        const unsigned code = BITS == 8 ? unsigned(in[i]) : nibble_at(in, i);
        out[i] = from_float<T>(decode_value(codebook[code], scale));
    }
}

// Quantizes blocks [block_begin, block_end).
template <int BITS, typename T>
void quantize_blocks(const T *x, int64_t n, int64_t blocksize, const SearchTable &lut, uint8_t *out,
                     float *absmax, int64_t block_begin, int64_t block_end) {
    for (int64_t b = block_begin; b < block_end; ++b) {
        const int64_t begin = b * blocksize;
        const int64_t end = begin + blocksize < n ? begin + blocksize : n;
        const BlockScale s = block_scale(block_absmax(x, begin, end), end - begin, blocksize);
        absmax[b] = s.stored;
        encode_range<BITS, T>(x, begin, end, s.scale, s.recip, s.tail, lut, out);
        if (BITS == 4 && end == n) pad_odd_end(n, lut, out);
    }
}

template <int BITS, typename T>
void dequantize_blocks(const uint8_t *in, const float *absmax, int64_t n, int64_t blocksize,
                       const float *codebook, T *out, int64_t block_begin, int64_t block_end) {
    for (int64_t b = block_begin; b < block_end; ++b) {
        const int64_t begin = b * blocksize;
        decode_range<BITS, T>(in, codebook, absmax[b], out, begin, begin + blocksize < n ? begin + blocksize : n);
    }
}

}  // namespace ref
}  // namespace
}  // namespace nf4core

#endif  // NF4CORE_SRC_KERNELS_REF_HPP
