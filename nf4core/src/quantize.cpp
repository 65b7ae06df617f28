// The C entry points for blockwise quantization: argument checks, codebook
// lookup tables, dtype dispatch and double quantization. The arithmetic lives
// in kernels_ref.hpp.
#include <algorithm>
#include <type_traits>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "error.hpp"
#include "kernels_ref.hpp"
#include "nf4core/quantize.h"

namespace nf4core {

void fail_non_finite(int64_t index, float value) {
    char buf[160];
    std::snprintf(buf, sizeof buf, "input contains a non-finite value (%s) at flat index %lld",
                  std::isnan(value) ? "nan" : (value > 0 ? "inf" : "-inf"), static_cast<long long>(index));
    fail(NF4_ERROR_NON_FINITE, buf);
}

namespace {

bool valid_blocksize(int64_t bs) {
    return bs >= NF4_MIN_BLOCKSIZE && bs <= NF4_MAX_BLOCKSIZE && (bs & (bs - 1)) == 0;
}

void check_sizes(int64_t n, int64_t blocksize) {
    require(n >= 1, "number of elements must be at least 1, got " + std::to_string(n));
    require(valid_blocksize(blocksize), "blocksize must be a power of two between " +
                                            std::to_string(NF4_MIN_BLOCKSIZE) + " and " +
                                            std::to_string(NF4_MAX_BLOCKSIZE) + ", got " +
                                            std::to_string(blocksize));
}

void check_dtype(nf4_dtype dtype) {
    require(dtype == NF4_FLOAT32 || dtype == NF4_FLOAT16 || dtype == NF4_BFLOAT16,
            "unknown dtype code " + std::to_string(int(dtype)));
}

template <int N>
CodeLookup<N> make_lookup(const float *codebook) {
    require(codebook != nullptr, "codebook pointer is NULL");
    CodeLookup<N> lut;
    int idx[N];
    for (int i = 0; i < N; ++i) {
        require(is_finite(codebook[i]), "codebook entry " + std::to_string(i) + " is not finite");
        idx[i] = i;
    }
    std::stable_sort(idx, idx + N, [&](int a, int b) { return codebook[a] < codebook[b]; });
    for (int i = 0; i < N; ++i) lut.order[i] = uint8_t(idx[i]);
    for (int i = 0; i + 1 < N; ++i) lut.mid[i] = (codebook[idx[i]] + codebook[idx[i + 1]]) / 2.0f;
    return lut;
}

template <class F>
void dispatch_dtype(nf4_dtype dtype, F &&f) {
    switch (dtype) {
        case NF4_FLOAT32: f(static_cast<float *>(nullptr)); return;
        case NF4_FLOAT16: f(static_cast<half_t *>(nullptr)); return;
        case NF4_BFLOAT16: f(static_cast<bfloat16_t *>(nullptr)); return;
    }
    fail(NF4_ERROR_INVALID_ARGUMENT, "unknown dtype code " + std::to_string(int(dtype)));
}

template <int BITS>
nf4_status quantize_impl(const void *x, nf4_dtype dtype, int64_t n, int64_t blocksize, const float *codebook,
                         uint8_t *out, float *absmax) {
    return guarded([&] {
        check_sizes(n, blocksize);
        check_dtype(dtype);
        require(x != nullptr && out != nullptr && absmax != nullptr, "input or output pointer is NULL");
        const CodeLookup<(1 << BITS)> lut = make_lookup<(1 << BITS)>(codebook);
        const int64_t nblocks = (n + blocksize - 1) / blocksize;
        dispatch_dtype(dtype, [&](auto *tag) {
            using T = std::remove_pointer_t<decltype(tag)>;
            ref::quantize_blocks<BITS, T>(static_cast<const T *>(x), n, blocksize, lut, out, absmax, 0, nblocks);
        });
    });
}

template <int BITS>
nf4_status dequantize_impl(const uint8_t *in, const float *absmax, int64_t n, int64_t blocksize,
                           const float *codebook, void *out, nf4_dtype dtype) {
    return guarded([&] {
        check_sizes(n, blocksize);
        check_dtype(dtype);
        require(in != nullptr && absmax != nullptr && codebook != nullptr && out != nullptr,
                "input or output pointer is NULL");
        const int64_t nblocks = (n + blocksize - 1) / blocksize;
        dispatch_dtype(dtype, [&](auto *tag) {
            using T = std::remove_pointer_t<decltype(tag)>;
            ref::dequantize_blocks<BITS, T>(in, absmax, n, blocksize, codebook, static_cast<T *>(out), 0, nblocks);
        });
    });
}

}  // namespace
}  // namespace nf4core

using namespace nf4core;

extern "C" {

int64_t nf4_num_blocks(int64_t n, int64_t blocksize) {
    if (n < 0 || blocksize < 1) return -1;
    return n / blocksize + (n % blocksize != 0 ? 1 : 0);
}

int64_t nf4_packed_size_4bit(int64_t n) { return n < 0 ? -1 : n / 2 + (n & 1); }

int32_t nf4_blocksize_is_valid(int64_t blocksize) { return valid_blocksize(blocksize) ? 1 : 0; }

// The optimized kernels slot in behind these four entry points (next issue);
// today they run the reference kernels.
nf4_status nf4_quantize_4bit(const void *x, nf4_dtype dtype, int64_t n, int64_t blocksize, const float *codebook,
                             uint8_t *packed, float *absmax) {
    return quantize_impl<4>(x, dtype, n, blocksize, codebook, packed, absmax);
}

nf4_status nf4_dequantize_4bit(const uint8_t *packed, const float *absmax, int64_t n, int64_t blocksize,
                               const float *codebook, void *out, nf4_dtype out_dtype) {
    return dequantize_impl<4>(packed, absmax, n, blocksize, codebook, out, out_dtype);
}

nf4_status nf4_quantize_8bit(const void *x, nf4_dtype dtype, int64_t n, int64_t blocksize, const float *codebook,
                             uint8_t *codes, float *absmax) {
    return quantize_impl<8>(x, dtype, n, blocksize, codebook, codes, absmax);
}

nf4_status nf4_dequantize_8bit(const uint8_t *codes, const float *absmax, int64_t n, int64_t blocksize,
                               const float *codebook, void *out, nf4_dtype out_dtype) {
    return dequantize_impl<8>(codes, absmax, n, blocksize, codebook, out, out_dtype);
}

nf4_status nf4_quantize_4bit_ref(const void *x, nf4_dtype dtype, int64_t n, int64_t blocksize,
                                 const float *codebook, uint8_t *packed, float *absmax) {
    return quantize_impl<4>(x, dtype, n, blocksize, codebook, packed, absmax);
}

nf4_status nf4_dequantize_4bit_ref(const uint8_t *packed, const float *absmax, int64_t n, int64_t blocksize,
                                   const float *codebook, void *out, nf4_dtype out_dtype) {
    return dequantize_impl<4>(packed, absmax, n, blocksize, codebook, out, out_dtype);
}

nf4_status nf4_quantize_8bit_ref(const void *x, nf4_dtype dtype, int64_t n, int64_t blocksize,
                                 const float *codebook, uint8_t *codes, float *absmax) {
    return quantize_impl<8>(x, dtype, n, blocksize, codebook, codes, absmax);
}

nf4_status nf4_dequantize_8bit_ref(const uint8_t *codes, const float *absmax, int64_t n, int64_t blocksize,
                                   const float *codebook, void *out, nf4_dtype out_dtype) {
    return dequantize_impl<8>(codes, absmax, n, blocksize, codebook, out, out_dtype);
}

nf4_status nf4_double_quantize(const float *absmax, int64_t nblocks, const float *dyn_code, uint8_t *qabsmax,
                               float *nested_absmax, float *offset) {
    std::vector<float> centered;
    nf4_status st = guarded([&] {
        require(nblocks >= 1, "number of block scales must be at least 1, got " + std::to_string(nblocks));
        require(absmax != nullptr && qabsmax != nullptr && nested_absmax != nullptr && offset != nullptr,
                "input or output pointer is NULL");
        // bitsandbytes: offset = absmax.mean() in float32. We sum in double and
        // round once, which is the correctly rounded mean; torch's float32
        // cascade sum can differ from it in the last bit (documented in format.md).
        double sum = 0.0;
        for (int64_t i = 0; i < nblocks; ++i) {
            if (!is_finite(absmax[i]) || absmax[i] < 0.0f)
                fail(NF4_ERROR_INVALID_ARGUMENT, "block scale " + std::to_string(i) + " is negative or not finite");
            sum += double(absmax[i]);
        }
        const float mean = float(sum / double(nblocks));
        centered.resize(size_t(nblocks));
        for (int64_t i = 0; i < nblocks; ++i) centered[size_t(i)] = absmax[i] - mean;
        *offset = mean;
    });
    if (st != NF4_OK) return st;
    return nf4_quantize_8bit(centered.data(), NF4_FLOAT32, nblocks, NF4_DQ_BLOCKSIZE, dyn_code, qabsmax,
                             nested_absmax);
}

nf4_status nf4_double_dequantize(const uint8_t *qabsmax, const float *nested_absmax, float offset, int64_t nblocks,
                                 const float *dyn_code, float *absmax) {
    return guarded([&] {
        require(nblocks >= 1, "number of block scales must be at least 1, got " + std::to_string(nblocks));
        require(qabsmax != nullptr && nested_absmax != nullptr && dyn_code != nullptr && absmax != nullptr,
                "input or output pointer is NULL");
        require(is_finite(offset), "double-quantization offset is not finite");
        for (int64_t i = 0; i < nblocks; ++i) {
            const float scaled = dyn_code[qabsmax[i]] * nested_absmax[i / NF4_DQ_BLOCKSIZE];
            absmax[i] = scaled + offset;  // two roundings, never fused (-ffp-contract=off)
        }
    });
}

}  // extern "C"
