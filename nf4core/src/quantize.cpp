// The C entry points for blockwise quantization: argument checks, codebook
// lookup tables, dtype dispatch and double quantization. The arithmetic lives
// in kernels_ref.hpp.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "error.hpp"
#include "kernels.hpp"
#include "kernels_ref.hpp"
#include "nf4core/quantize.h"
#include "sizes.hpp"

namespace nf4core {

void fail_non_finite(int64_t index, float value) {
    char buf[160];
    std::snprintf(buf, sizeof buf, "input contains a non-finite value (%s) at flat index %lld",
                  std::isnan(value) ? "nan" : (value > 0 ? "inf" : "-inf"), static_cast<long long>(index));
    fail(NF4_ERROR_NON_FINITE, buf);
}

// Shared with the CUDA double quantization (src/cuda/quantize.cu): a NaN or Inf
// block scale is non-finite input, a negative one a bad argument.
void fail_bad_scale(int64_t index, float value) {
    char buf[160];
    if (is_finite(value)) {
        std::snprintf(buf, sizeof buf, "block scale %lld is negative (%g); block scales are absolute maxima, >= 0",
                      static_cast<long long>(index), double(value));
        fail(NF4_ERROR_INVALID_ARGUMENT, buf);
    }
    std::snprintf(buf, sizeof buf, "block scale %lld is not finite (%s)", static_cast<long long>(index),
                  std::isnan(value) ? "nan" : (value > 0 ? "inf" : "-inf"));
    fail(NF4_ERROR_NON_FINITE, buf);
}

// Shared with the CUDA launchers (src/cuda/), which send the table to the device.
SearchTable make_search_table(const float *codebook, int size) {
    require(codebook != nullptr, "codebook pointer is NULL");
    SearchTable t;
    int idx[256];
    for (int i = 0; i < size; ++i) {
        if (!is_finite(codebook[i]))  // the message only on failure: this runs on every call
            fail(NF4_ERROR_INVALID_ARGUMENT, "codebook entry " + std::to_string(i) + " is not finite");
        idx[i] = i;
    }
    std::stable_sort(idx, idx + size, [&](int a, int b) { return codebook[a] < codebook[b]; });
    t.size = size;
    t.identity_order = true;
    for (int i = 0; i < 256; ++i) {
        t.order[i] = i < size ? idx[i] : idx[size - 1];
        t.identity_order = t.identity_order && (i >= size || idx[i] == i);
        t.mid[i] = i + 1 < size ? (codebook[idx[i]] + codebook[idx[i + 1]]) / 2.0f : HUGE_VALF;
    }
    for (int k = 0; k < 16; ++k) t.coarse[k] = t.mid[16 * k + 15];
    return t;
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

// The scalar reference as a kernel set (the "scalar" ISA).
struct Scalar {
    template <int BITS, typename T>
    static void quantize(const QuantizeArgs &a, int64_t b0, int64_t b1) {
        ref::quantize_blocks<BITS, T>(static_cast<const T *>(a.x), a.n, a.blocksize, *a.table, a.out, a.absmax, b0,
                                      b1);
    }

    template <int BITS, typename T>
    static void dequantize(const DequantizeArgs &a, int64_t b0, int64_t b1) {
        ref::dequantize_blocks<BITS, T>(a.in, a.absmax, a.n, a.blocksize, a.codebook, static_cast<T *>(a.out), b0,
                                        b1);
    }
};

// Work per thread below which splitting does not pay (waking a thread costs a
// few microseconds; 64 Ki elements take tens).
constexpr int64_t kMinElementsPerTask = 1 << 16;

template <int BITS>
nf4_status quantize_impl(const void *x, nf4_dtype dtype, int64_t n, int64_t blocksize, const float *codebook,
                         uint8_t *out, float *absmax, bool reference) {
    return guarded([&] {
        check_sizes(n, blocksize);
        const nf4_dtype dt = checked_dtype(dtype, true, "dtype");
        const int d = int(dt);
        require(x != nullptr && out != nullptr && absmax != nullptr, "input or output pointer is NULL");
        const int64_t nblocks = ceil_div(n, blocksize);
        require(codebook != nullptr, "codebook pointer is NULL");
        require_disjoint({buffer(BITS == 4 ? "packed" : "codes", out, BITS == 4 ? ceil_div(n, 2) : n, 1),
                          buffer("absmax", absmax, nblocks, 4)},
                         {buffer("x", x, n, nf4_dtype_size(dt)), buffer("codebook", codebook, 1 << BITS, 4)});
        const SearchTable table = make_search_table(codebook, 1 << BITS);
        const QuantizeArgs args{x, n, blocksize, &table, out, absmax};
        const KernelSet &k = reference ? scalar_kernels() : active_kernels();
        const QuantizeKernel kernel = (BITS == 4 ? k.quantize4 : k.quantize8)[d];
        if (reference) {
            kernel(args, 0, nblocks);
            return;
        }
        parallel_for(nblocks, std::max<int64_t>(1, kMinElementsPerTask / blocksize),
                     [&](int64_t b0, int64_t b1) { kernel(args, b0, b1); });
    });
}

template <int BITS>
nf4_status dequantize_impl(const uint8_t *in, const float *absmax, int64_t n, int64_t blocksize,
                           const float *codebook, void *out, nf4_dtype dtype, bool reference) {
    return guarded([&] {
        check_sizes(n, blocksize);
        const nf4_dtype dt = checked_dtype(dtype, true, "dtype");
        const int d = int(dt);
        require(in != nullptr && absmax != nullptr && codebook != nullptr && out != nullptr,
                "input or output pointer is NULL");
        const int64_t nblocks = ceil_div(n, blocksize);
        require_disjoint({buffer("out", out, n, nf4_dtype_size(dt))},
                         {buffer(BITS == 4 ? "packed" : "codes", in, BITS == 4 ? ceil_div(n, 2) : n, 1),
                          buffer("absmax", absmax, nblocks, 4), buffer("codebook", codebook, 1 << BITS, 4)});
        const DequantizeArgs args{in, absmax, n, blocksize, codebook, out};
        const KernelSet &k = reference ? scalar_kernels() : active_kernels();
        const DequantizeKernel kernel = (BITS == 4 ? k.dequantize4 : k.dequantize8)[d];
        if (reference) {
            kernel(args, 0, nblocks);
            return;
        }
        parallel_for(nblocks, std::max<int64_t>(1, kMinElementsPerTask / blocksize),
                     [&](int64_t b0, int64_t b1) { kernel(args, b0, b1); });
    });
}

}  // namespace

const KernelSet &scalar_kernels() {
    static const KernelSet k = kernel_set<Scalar>("scalar");
    return k;
}

// Scales per chunk of nf4_double_quantize's centred copy: a whole number of
// 256-scale blocks, 256 KiB, so it stays in L2.
constexpr int64_t kDoubleQuantChunk = 256 * NF4_DQ_BLOCKSIZE;

}  // namespace nf4core

using namespace nf4core;

extern "C" {

int64_t nf4_num_blocks(int64_t n, int64_t blocksize) {
    if (n < 0 || blocksize < 1) return -1;
    return n / blocksize + (n % blocksize != 0 ? 1 : 0);
}

int64_t nf4_packed_size_4bit(int64_t n) { return n < 0 ? -1 : n / 2 + (n & 1); }

int32_t nf4_blocksize_is_valid(int64_t blocksize) { return valid_blocksize(blocksize) ? 1 : 0; }

// The dispatched entry points run the active ISA path on the thread pool; the
// _ref ones run the scalar reference on the calling thread.
nf4_status nf4_quantize_4bit(const void *x, nf4_dtype dtype, int64_t n, int64_t blocksize, const float *codebook,
                             uint8_t *packed, float *absmax) {
    return quantize_impl<4>(x, dtype, n, blocksize, codebook, packed, absmax, false);
}

nf4_status nf4_dequantize_4bit(const uint8_t *packed, const float *absmax, int64_t n, int64_t blocksize,
                               const float *codebook, void *out, nf4_dtype out_dtype) {
    return dequantize_impl<4>(packed, absmax, n, blocksize, codebook, out, out_dtype, false);
}

nf4_status nf4_quantize_8bit(const void *x, nf4_dtype dtype, int64_t n, int64_t blocksize, const float *codebook,
                             uint8_t *codes, float *absmax) {
    return quantize_impl<8>(x, dtype, n, blocksize, codebook, codes, absmax, false);
}

nf4_status nf4_dequantize_8bit(const uint8_t *codes, const float *absmax, int64_t n, int64_t blocksize,
                               const float *codebook, void *out, nf4_dtype out_dtype) {
    return dequantize_impl<8>(codes, absmax, n, blocksize, codebook, out, out_dtype, false);
}

nf4_status nf4_quantize_4bit_ref(const void *x, nf4_dtype dtype, int64_t n, int64_t blocksize,
                                 const float *codebook, uint8_t *packed, float *absmax) {
    return quantize_impl<4>(x, dtype, n, blocksize, codebook, packed, absmax, true);
}

nf4_status nf4_dequantize_4bit_ref(const uint8_t *packed, const float *absmax, int64_t n, int64_t blocksize,
                                   const float *codebook, void *out, nf4_dtype out_dtype) {
    return dequantize_impl<4>(packed, absmax, n, blocksize, codebook, out, out_dtype, true);
}

nf4_status nf4_quantize_8bit_ref(const void *x, nf4_dtype dtype, int64_t n, int64_t blocksize,
                                 const float *codebook, uint8_t *codes, float *absmax) {
    return quantize_impl<8>(x, dtype, n, blocksize, codebook, codes, absmax, true);
}

nf4_status nf4_dequantize_8bit_ref(const uint8_t *codes, const float *absmax, int64_t n, int64_t blocksize,
                                   const float *codebook, void *out, nf4_dtype out_dtype) {
    return dequantize_impl<8>(codes, absmax, n, blocksize, codebook, out, out_dtype, true);
}

nf4_status nf4_double_quantize(const float *absmax, int64_t nblocks, const float *dyn_code, uint8_t *qabsmax,
                               float *nested_absmax, float *offset) {
    float mean = 0.0f;
    nf4_status st = guarded([&] {
        require(nblocks >= 1, "number of block scales must be at least 1, got " + std::to_string(nblocks));
        require(absmax != nullptr && qabsmax != nullptr && nested_absmax != nullptr && offset != nullptr,
                "input or output pointer is NULL");
        require(dyn_code != nullptr, "dyn_code pointer is NULL");
        require_disjoint({buffer("qabsmax", qabsmax, nblocks, 1),
                          buffer("nested_absmax", nested_absmax, ceil_div(nblocks, NF4_DQ_BLOCKSIZE), 4),
                          buffer("offset", offset, 1, 4)},
                         {buffer("absmax", absmax, nblocks, 4), buffer("dyn_code", dyn_code, 256, 4)});
        // bitsandbytes: offset = absmax.mean() in float32. We sum in double and
        // round once, which is the correctly rounded mean; torch's float32
        // cascade sum can differ from it in the last bit (documented in format.md).
        // Eight interleaved accumulators in a fixed order: as deterministic as one
        // (the thread count plays no part) but not one long dependency chain.
        double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        bool ok = true;
        for (int64_t i = 0; i < nblocks; ++i) {
            ok = ok && is_finite(absmax[i]) && absmax[i] >= 0.0f;
            acc[i & 7] += double(absmax[i]);
        }
        if (!ok) {
            for (int64_t i = 0; i < nblocks; ++i)
                if (!is_finite(absmax[i]) || absmax[i] < 0.0f) fail_bad_scale(i, absmax[i]);
        }
        const double sum = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
        mean = float(sum / double(nblocks));
        *offset = mean;
    });
    if (st != NF4_OK) return st;
    // The centred scales, quantized a chunk at a time through one small buffer
    // (blocks are independent, so the bytes are those of one call over all of
    // them). A centred copy of all the scales (4 MiB for a 16384 x 4096 weight)
    // cost its first-touch page faults on every call: pq.quantize of that weight,
    // Intel Xeon, 2 threads, 26.7-27.6 -> 24.0-24.5 ms (the double quantization
    // right after the 4-bit kernel 4.5-5.0 -> 3.0-3.3 ms).
    const int64_t chunk = std::min<int64_t>(nblocks, kDoubleQuantChunk);
    std::unique_ptr<float[]> centered;
    st = guarded([&] { centered.reset(new float[size_t(chunk)]); });
    if (st != NF4_OK) return st;
    for (int64_t c0 = 0; c0 < nblocks; c0 += chunk) {
        const int64_t len = std::min(chunk, nblocks - c0);
        for (int64_t i = 0; i < len; ++i) centered[size_t(i)] = absmax[c0 + i] - mean;
        st = nf4_quantize_8bit(centered.get(), NF4_FLOAT32, len, NF4_DQ_BLOCKSIZE, dyn_code, qabsmax + c0,
                               nested_absmax + c0 / NF4_DQ_BLOCKSIZE);
        if (st != NF4_OK) return st;
    }
    return NF4_OK;
}

nf4_status nf4_double_dequantize(const uint8_t *qabsmax, const float *nested_absmax, float offset, int64_t nblocks,
                                 const float *dyn_code, float *absmax) {
    return guarded([&] {
        require(nblocks >= 1, "number of block scales must be at least 1, got " + std::to_string(nblocks));
        require(qabsmax != nullptr && nested_absmax != nullptr && dyn_code != nullptr && absmax != nullptr,
                "input or output pointer is NULL");
        require_disjoint({buffer("absmax", absmax, nblocks, 4)},
                         {buffer("qabsmax", qabsmax, nblocks, 1),
                          buffer("nested_absmax", nested_absmax, ceil_div(nblocks, NF4_DQ_BLOCKSIZE), 4),
                          buffer("dyn_code", dyn_code, 256, 4)});
        if (!is_finite(offset)) fail(NF4_ERROR_NON_FINITE, "double-quantization offset is not finite");
        for (int64_t i = 0; i < nblocks; ++i) {
            // two roundings, never fused (numeric.hpp, shared with the CUDA kernels)
            absmax[i] = dq_scale(dyn_code[qabsmax[i]], nested_absmax[i / NF4_DQ_BLOCKSIZE], offset);
        }
    });
}

}  // extern "C"
