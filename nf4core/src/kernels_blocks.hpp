// The block loops of the vector quantization kernels (kernels_<isa>.cpp),
// written once: what each ISA file supplies is its vector passes over the
// elements [begin, vend) of one block; the elements after vend (the last
// partial vector of a tail block, on ISAs without masked 16-bit loads) take
// the reference's scalar steps (kernels_ref.hpp), which follow the same rules.
//
// Quantize, per block: the absmax and a finiteness check; a block holding a
// NaN or Inf is handed to the reference kernel, which names the first such
// element; the block scale (numeric.hpp's block_scale); the codes.
// Dequantize, per block: codebook[code] * scale, rounded to the output type; a
// block whose scale is NaN or infinite (the caller's absmax; its outputs may be
// NaN) is left to the reference, so the vector passes store values that are
// not NaN (the cheaper bfloat16 rounding, simd.hpp).
//
// An ISA is a struct V with
//   template <int BITS, typename T> struct Quantize {
//       explicit Quantize(const SearchTable &);        // per-call constants
//       static int64_t vector_end(int64_t begin, int64_t end);
//       void absmax(const T *x, int64_t i0, int64_t i1, uint32_t &amax_bits, bool &nonfinite) const;
//       void encode(const T *x, int64_t i0, int64_t i1, const BlockScale &, uint8_t *out) const;
//   };
//   template <int BITS, typename T> struct Dequantize {
//       Dequantize(const DequantizeArgs &, int64_t b0);  // per-call constants and state
//       static int64_t vector_end(int64_t begin, int64_t end);
//       void decode(T *out, int64_t i0, int64_t i1, float scale);  // blocks in order
//       void gap();  // the reference writes the next block (DirectStores: nothing to do)
//   };
// amax_bits collects max |x| as float bits (non-negative floats order like their
// bits), nonfinite whether any |x| bits lie above the largest finite float.
// Included only by the ISA translation units; internal linkage (numeric.hpp).
#ifndef NF4CORE_SRC_KERNELS_BLOCKS_HPP
#define NF4CORE_SRC_KERNELS_BLOCKS_HPP

#include <cstdint>

#include "kernels.hpp"
#include "kernels_ref.hpp"

namespace nf4core {
namespace {

// For Dequantize passes that store each vector as it comes.
struct DirectStores {
    void gap() {}
};

template <class V>
struct VectorKernels {
    template <int BITS, typename T>
    static void quantize(const QuantizeArgs &a, int64_t b0, int64_t b1) {
        using Q = typename V::template Quantize<BITS, T>;
        const T *x = static_cast<const T *>(a.x);
        const SearchTable &tab = *a.table;
        const Q q(tab);
        for (int64_t b = b0; b < b1; ++b) {
            const int64_t begin = b * a.blocksize;
            const int64_t end = begin + a.blocksize < a.n ? begin + a.blocksize : a.n;
            const int64_t vend = Q::vector_end(begin, end);
            uint32_t amax_bits = 0;
            bool nonfinite = false;
            q.absmax(x, begin, vend, amax_bits, nonfinite);
            ref::fold_absmax(x, vend, end, amax_bits, nonfinite);
            if (nonfinite) {  // the reference kernel names the first non-finite element
                ref::quantize_blocks<BITS, T>(x, a.n, a.blocksize, tab, a.out, a.absmax, b, b + 1);
                continue;
            }
            const BlockScale s = block_scale(bits_float(amax_bits), end - begin, a.blocksize);
            a.absmax[b] = s.stored;
            q.encode(x, begin, vend, s, a.out);
            ref::encode_range<BITS, T>(x, vend, end, s.scale, s.recip, s.tail, tab, a.out);
            if (BITS == 4 && end == a.n) ref::pad_odd_end(a.n, tab, a.out);
        }
    }

    template <int BITS, typename T>
    static void dequantize(const DequantizeArgs &a, int64_t b0, int64_t b1) {
        using D = typename V::template Dequantize<BITS, T>;
        T *out = static_cast<T *>(a.out);
        D d(a, b0);
        for (int64_t b = b0; b < b1; ++b) {
            const int64_t begin = b * a.blocksize;
            const int64_t end = begin + a.blocksize < a.n ? begin + a.blocksize : a.n;
            const int64_t vend = D::vector_end(begin, end);
            const float scale = a.absmax[b];
            if (!is_finite(scale)) {  // NaN outputs: the reference rounds them as to_bfloat16 does
                d.gap();
                ref::decode_range<BITS, T>(a.in, a.codebook, scale, out, begin, end);
                continue;
            }
            d.decode(out, begin, vend, scale);
            ref::decode_range<BITS, T>(a.in, a.codebook, scale, out, vend, end);
        }
    }
};

}  // namespace
}  // namespace nf4core

#endif  // NF4CORE_SRC_KERNELS_BLOCKS_HPP
