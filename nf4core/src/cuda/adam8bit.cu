// The fused 8-bit AdamW update on the GPU (nf4_cuda_adam8bit_update), the
// twin of nf4_adam8bit_update (src/optim.cpp): per quantization block, decode
// both moments, update in float32, write the parameter, requantize both
// moments with the block-scale and nearest-code rules of numeric.hpp.
//
// One warp per quantization block. A warp cannot hold a block of up to 4096
// moments in registers, so it makes two passes over the block: pass 1
// computes every element's update without writing anything and finds the new
// absmax of m and v (a warp max: exact, order free); pass 2 recomputes the
// update from the same old parameter, codes and gradient (the same operations,
// so the same bits and the same skip decisions: adam_update skips an element
// whose gradient or update is not finite), writes the parameter and encodes
// the moments. Each lane reads its elements' old values before it overwrites
// those same bytes, and the old block absmax is read before lane 0 writes the
// new one (after the warp-synchronous max), so the passes never see new
// state. Every new moment is finite, so every block is requantized and a call
// never stops halfway. The price is a second read of the parameter, the
// gradient and the codes.
//
// The element arithmetic is adam_math.hpp, which a CPU test compares with
// optim.cpp byte for byte. Status: compiled, NOT yet run on GPU hardware.
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <string>

#include "../error.hpp"
#include "../kernels.hpp"
#include "../numeric.hpp"
#include "../adam_math.hpp"
#include "common.cuh"
#include "nf4core/cuda.h"
#include "nf4core/optim.h"

namespace nf4core {
namespace cuda {
namespace {

constexpr int kThreads = 256;

struct AdamFlags {
    unsigned long long skipped;  // elements skipped (NaN/Inf gradient or non-finite update)
};

// Everything the kernel reads from tables: ~6.3 KiB of launch arguments
// (CUDA 12.1+ allows 32 KiB), copied to shared memory once per thread block.
struct AdamTables {
    Table256 qmap1, qmap2;  // decode
    SearchTable t1, t2;     // encode
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    adam8bit_kernel(T *__restrict__ param, const T *__restrict__ grad, int64_t n, uint8_t *__restrict__ state1,
                    uint8_t *__restrict__ state2, float *__restrict__ absmax1, float *__restrict__ absmax2,
                    const __grid_constant__ AdamTables tab_arg, int64_t blocksize, const AdamScalarsF32 s,
                    AdamFlags *flags) {
    __shared__ AdamTables tab;
    copy_words(&tab, &tab_arg, int(sizeof(AdamTables)));
    __syncthreads();
    const int lane = int(threadIdx.x & 31u);
    const int64_t nwarps = (int64_t(gridDim.x) * blockDim.x) >> 5;
    const int64_t nblocks = (n + blocksize - 1) / blocksize;
    unsigned long long skipped = 0;
    for (int64_t b = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; b < nblocks; b += nwarps) {
        const int64_t begin = b * blocksize;
        const int64_t end = begin + blocksize < n ? begin + blocksize : n;
        const float a1 = absmax1[b], a2 = absmax2[b];
        // pass 1: the absmax of the new moments (as float bits); nothing is written
        uint32_t amax1 = 0, amax2 = 0;
        for (int64_t i = begin + lane; i < end; i += 32) {
            T p = param[i];
            float m, v;
            adam_update(p, to_float(grad[i]), tab.qmap1.v[state1[i]], a1, tab.qmap2.v[state2[i]], a2, s, m, v);
            // float bits of |m|, |v| order like the values (all finite: adam_update skips the rest)
            const uint32_t um = float_bits(m) & 0x7FFFFFFFu, uv = float_bits(v) & 0x7FFFFFFFu;
            amax1 = um > amax1 ? um : amax1;
            amax2 = uv > amax2 ? uv : amax2;
        }
        amax1 = warp_max(amax1);
        amax2 = warp_max(amax2);
        const BlockScale s1 = block_scale(bits_float(amax1), end - begin, blocksize);
        const BlockScale s2 = block_scale(bits_float(amax2), end - begin, blocksize);
        // pass 2: the same update again (same inputs, same operations), written and encoded
        for (int64_t i = begin + lane; i < end; i += 32) {
            T p = param[i];
            float m, v;
            if (adam_update(p, to_float(grad[i]), tab.qmap1.v[state1[i]], a1, tab.qmap2.v[state2[i]], a2, s, m, v))
                param[i] = p;
            else
                ++skipped;
            state1[i] = encode_value<256>(tab.t1, m, s1);
            state2[i] = encode_value<256>(tab.t2, v, s2);
        }
        __syncwarp();
        if (lane == 0) {
            absmax1[b] = s1.stored;
            absmax2[b] = s2.stored;
        }
    }
    // lane sums to one atomic per warp
    for (int o = 16; o > 0; o >>= 1) skipped += __shfl_xor_sync(0xFFFFFFFFu, skipped, o);
    if (lane == 0 && skipped != 0) atomicAdd(&flags->skipped, skipped);
}

void check_hparams(const nf4_adam_hparams &hp) {
    require(hp.step >= 1, "step must be >= 1, got " + std::to_string(hp.step));
    require(std::isfinite(hp.lr) && hp.lr >= 0.0, "lr must be finite and >= 0");
    require(hp.beta1 >= 0.0 && hp.beta1 < 1.0, "beta1 must be in [0, 1)");
    require(hp.beta2 >= 0.0 && hp.beta2 < 1.0, "beta2 must be in [0, 1)");
    require(std::isfinite(hp.eps) && hp.eps >= 0.0, "eps must be finite and >= 0");
    require(std::isfinite(hp.weight_decay) && hp.weight_decay >= 0.0, "weight_decay must be finite and >= 0");
}

}  // namespace
}  // namespace cuda
}  // namespace nf4core

using namespace nf4core;
using namespace nf4core::cuda;

extern "C" nf4_status nf4_cuda_adam8bit_update(void *param, const void *grad, nf4_dtype dtype, int64_t n,
                                               uint8_t *state1, uint8_t *state2, float *absmax1, float *absmax2,
                                               const float *qmap1, const float *qmap2, int64_t blocksize,
                                               const nf4_adam_hparams *hp, int64_t *skipped, void *stream) {
    return guarded([&] {
        check_sizes(n, blocksize);
        check_dtype(dtype);
        require(param && grad && state1 && state2 && absmax1 && absmax2 && qmap1 && qmap2 && hp,
                "a pointer argument is NULL");
        check_hparams(*hp);
        check_table(qmap1, 256, "qmap1");
        check_table(qmap2, 256, "qmap2");
        const int64_t esize = nf4_dtype_size(dtype), nblocks = ceil_div(n, blocksize);
        // the device buffers (the maps, hp and skipped are host memory, read before the launch)
        require_disjoint({buffer("param", param, n, esize), buffer("state1", state1, n, 1),
                          buffer("state2", state2, n, 1), buffer("absmax1", absmax1, nblocks, 4),
                          buffer("absmax2", absmax2, nblocks, 4)},
                         {buffer("grad", grad, n, esize)});
        AdamTables tab;
        for (int i = 0; i < 256; ++i) {
            tab.qmap1.v[i] = qmap1[i];
            tab.qmap2.v[i] = qmap2[i];
        }
        tab.t1 = make_search_table(qmap1, 256);
        tab.t2 = make_search_table(qmap2, 256);
        const AdamScalarsF32 sc = make_adam_scalars(*hp);
        require_device();
        const cudaStream_t s = as_stream(stream);
        AdamFlags *flags = nullptr;
        check(cudaMallocAsync(reinterpret_cast<void **>(&flags), sizeof(AdamFlags), s), "cudaMallocAsync");
        struct Free {
            AdamFlags *p;
            cudaStream_t s;
            ~Free() { (void)cudaFreeAsync(p, s); }
        } free_flags{flags, s};
        const AdamFlags init{0};
        check(cudaMemcpyAsync(flags, &init, sizeof init, cudaMemcpyHostToDevice, s), "cudaMemcpyAsync");
        dispatch_dtype(dtype, [&](auto tag) {
            using T = decltype(tag);
            adam8bit_kernel<T><<<grid_for(nblocks, kThreads / 32), kThreads, 0, s>>>(
                static_cast<T *>(param), static_cast<const T *>(grad), n, state1, state2, absmax1, absmax2, tab,
                blocksize, sc, flags);
        });
        check_launch("8-bit Adam kernel launch");
        AdamFlags out;
        check(cudaMemcpyAsync(&out, flags, sizeof out, cudaMemcpyDeviceToHost, s), "cudaMemcpyAsync");
        check(cudaStreamSynchronize(s), "cudaStreamSynchronize");
        if (skipped) *skipped = int64_t(out.skipped);
    });
}
