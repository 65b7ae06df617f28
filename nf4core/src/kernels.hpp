// The kernel table: every optimized path (AVX2, AVX-512, NEON) provides the
// same four block-range kernels per element type as the scalar reference, and
// must produce byte-identical results. The entry points in quantize.cpp pick a
// table at run time (dispatch.cpp) and split the blocks over threads
// (parallel.cpp).
#ifndef NF4CORE_SRC_KERNELS_HPP
#define NF4CORE_SRC_KERNELS_HPP

#include <cstdint>
#include <string>

#include "nf4core/common.h"
#include "numeric.hpp"

namespace nf4core {

struct QuantizeArgs {
    const void *x;            // n elements of the kernel's element type
    int64_t n;
    int64_t blocksize;
    const SearchTable *table;
    uint8_t *out;             // packed nibbles (4-bit) or one code per element (8-bit)
    float *absmax;
};

struct DequantizeArgs {
    const uint8_t *in;
    const float *absmax;
    int64_t n;
    int64_t blocksize;
    const float *codebook;    // 16 or 256 values
    void *out;
};

// Each kernel processes blocks [b0, b1); blocks never share an output byte
// (blocksizes are even), so ranges can run on different threads.
using QuantizeKernel = void (*)(const QuantizeArgs &, int64_t b0, int64_t b1);
using DequantizeKernel = void (*)(const DequantizeArgs &, int64_t b0, int64_t b1);

struct KernelSet {
    const char *name;
    QuantizeKernel quantize4[3];  // indexed by nf4_dtype: float32, float16, bfloat16
    DequantizeKernel dequantize4[3];
    QuantizeKernel quantize8[3];
    DequantizeKernel dequantize8[3];
};

namespace {  // internal linkage: each path's translation unit has its own ISA flags

// The table of a path whose kernels are K::quantize<BITS, T> and
// K::dequantize<BITS, T> (BITS = 4 or 8; T = float, half_t, bfloat16_t).
template <class K>
KernelSet kernel_set(const char *name) {
    return {name,
            {K::template quantize<4, float>, K::template quantize<4, half_t>, K::template quantize<4, bfloat16_t>},
            {K::template dequantize<4, float>, K::template dequantize<4, half_t>,
             K::template dequantize<4, bfloat16_t>},
            {K::template quantize<8, float>, K::template quantize<8, half_t>, K::template quantize<8, bfloat16_t>},
            {K::template dequantize<8, float>, K::template dequantize<8, half_t>,
             K::template dequantize<8, bfloat16_t>}};
}

}  // namespace

// The nearest-code search table of a codebook of `size` (16 or 256) finite
// values; throws (invalid argument) for a NULL or non-finite codebook.
SearchTable make_search_table(const float *codebook, int size);

const KernelSet &scalar_kernels();
// Defined only where the path is compiled into this build (NF4CORE_HAVE_<ISA>,
// meson.build); dispatch.cpp lists the paths.
const KernelSet *avx2_kernels();
const KernelSet *avx512_kernels();
const KernelSet *neon_kernels();

// The kernel set in use (dispatch.cpp; see nf4_set_isa).
const KernelSet &active_kernels();
// Whether this build has the path `name` ("avx512", "avx2", "neon", "scalar")
// and this CPU runs it.
bool isa_available(const std::string &name);
// Makes that path active ("auto": the best one this CPU runs) and returns
// true; false, with nothing changed, where isa_available(name) is false.
bool use_isa(const std::string &name);

// Runs fn(b0, b1) over [0, n_items) split into ranges of at least `min_items`
// on the library's threads (the caller's thread takes part). Small inputs and
// nested calls run inline. If ranges fail, the exception of the lowest range
// is rethrown, so errors name the same element whatever the thread count.
template <class F>
void parallel_for(int64_t n_items, int64_t min_items, F &&fn);

}  // namespace nf4core

#include "parallel.hpp"

#endif  // NF4CORE_SRC_KERNELS_HPP
