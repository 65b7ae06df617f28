// Fused 8-bit AdamW update (nf4core/optim.h): decode a block of both moments
// into registers-sized buffers, update in float32, requantize with the active
// 8-bit quantization kernel. Blocks are independent, so threads split them.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <string>

#include "adam_math.hpp"
#include "error.hpp"
#include "kernels.hpp"
#include "kernels_ref.hpp"
#include "nf4core/optim.h"
#include "nf4core/quantize.h"
#include "sizes.hpp"

namespace nf4core {
namespace {

template <typename T>
void adam8bit_blocks(T *param, const T *grad, int64_t n, uint8_t *state1, uint8_t *state2, float *absmax1,
                     float *absmax2, const float *qmap1, const float *qmap2, const SearchTable &t1,
                     const SearchTable &t2, int64_t blocksize, const AdamScalarsF32 &s, int64_t b0, int64_t b1,
                     std::atomic<int64_t> &skipped) {
    const KernelSet &k = active_kernels();
    const QuantizeKernel q8 = k.quantize8[int(NF4_FLOAT32)];
    float m[NF4_MAX_BLOCKSIZE];
    float v[NF4_MAX_BLOCKSIZE];
    int64_t local_skipped = 0;
    for (int64_t b = b0; b < b1; ++b) {
        const int64_t begin = b * blocksize;
        const int64_t len = std::min(blocksize, n - begin);
        const float a1 = absmax1[b], a2 = absmax2[b];
        const uint8_t *c1 = state1 + begin;
        const uint8_t *c2 = state2 + begin;
        T *p = param + begin;
        const T *g = grad + begin;
        for (int64_t i = 0; i < len; ++i) {
            // the element's arithmetic lives in adam_math.hpp, shared with the GPU kernel
            if (!adam_update(p[i], to_float(g[i]), qmap1[c1[i]], a1, qmap2[c2[i]], a2, s, m[i], v[i]))
                ++local_skipped;
        }
        // Requantize both moments as one block each (a short last block is
        // the tensor's tail block, as in nf4_quantize_8bit). Every m and v is
        // finite here (adam_update skips what is not), so this cannot fail and
        // a call never stops halfway.
        const QuantizeArgs qa1{m, len, blocksize, &t1, state1 + begin, absmax1 + b};
        q8(qa1, 0, 1);
        const QuantizeArgs qa2{v, len, blocksize, &t2, state2 + begin, absmax2 + b};
        q8(qa2, 0, 1);
    }
    if (local_skipped) skipped.fetch_add(local_skipped, std::memory_order_relaxed);
}

}  // namespace
}  // namespace nf4core

using namespace nf4core;

extern "C" nf4_status nf4_adam8bit_update(void *param, const void *grad, nf4_dtype dtype, int64_t n,
                                          uint8_t *state1, uint8_t *state2, float *absmax1, float *absmax2,
                                          const float *qmap1, const float *qmap2, int64_t blocksize,
                                          const nf4_adam_hparams *hp, int64_t *skipped) {
    return guarded([&] {
        require(n >= 1, "number of elements must be at least 1, got " + std::to_string(n));
        require(nf4_blocksize_is_valid(blocksize) != 0,
                "blocksize must be a power of two between " + std::to_string(NF4_MIN_BLOCKSIZE) + " and " +
                    std::to_string(NF4_MAX_BLOCKSIZE) + ", got " + std::to_string(blocksize));
        const nf4_dtype dt = checked_dtype(dtype, true, "dtype");
        require(param && grad && state1 && state2 && absmax1 && absmax2 && qmap1 && qmap2 && hp,
                "a pointer argument is NULL");
        require(hp->step >= 1, "step must be >= 1, got " + std::to_string(hp->step));
        require(std::isfinite(hp->lr) && hp->lr >= 0.0, "lr must be finite and >= 0");
        require(hp->beta1 >= 0.0 && hp->beta1 < 1.0, "beta1 must be in [0, 1)");
        require(hp->beta2 >= 0.0 && hp->beta2 < 1.0, "beta2 must be in [0, 1)");
        require(std::isfinite(hp->eps) && hp->eps >= 0.0, "eps must be finite and >= 0");
        require(std::isfinite(hp->weight_decay) && hp->weight_decay >= 0.0, "weight_decay must be finite and >= 0");
        const SearchTable t1 = make_search_table(qmap1, 256);
        const SearchTable t2 = make_search_table(qmap2, 256);
        const int64_t esize = nf4_dtype_size(dt), nblocks = ceil_div(n, blocksize);
        // param, state1, state2, absmax1, absmax2 are updated in place (IN/OUT), grad and the maps only read
        require_disjoint({buffer("param", param, n, esize), buffer("state1", state1, n, 1),
                          buffer("state2", state2, n, 1), buffer("absmax1", absmax1, nblocks, 4),
                          buffer("absmax2", absmax2, nblocks, 4), buffer("skipped", skipped, skipped ? 1 : 0, 8)},
                         {buffer("grad", grad, n, esize), buffer("qmap1", qmap1, 256, 4),
                          buffer("qmap2", qmap2, 256, 4), buffer("hp", hp, 1, int64_t(sizeof *hp))});
        const AdamScalarsF32 s = make_adam_scalars(*hp);
        std::atomic<int64_t> count{0};
        auto run = [&](auto *p, const auto *g) {
            parallel_for(nblocks, std::max<int64_t>(1, (int64_t(1) << 15) / blocksize), [&](int64_t b0, int64_t b1) {
                adam8bit_blocks(p, g, n, state1, state2, absmax1, absmax2, qmap1, qmap2, t1, t2, blocksize, s, b0,
                                b1, count);
            });
        };
        if (dt == NF4_FLOAT32)
            run(static_cast<float *>(param), static_cast<const float *>(grad));
        else if (dt == NF4_FLOAT16)
            run(static_cast<half_t *>(param), static_cast<const half_t *>(grad));
        else
            run(static_cast<bfloat16_t *>(param), static_cast<const bfloat16_t *>(grad));
        if (skipped) *skipped = count.load();
    });
}
