// Fused 8-bit AdamW update (nf4core/optim.h): decode a block of both moments
// into registers-sized buffers, update in float32, requantize with the active
// 8-bit quantization kernel. Blocks are independent, so threads split them.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <string>

#include "error.hpp"
#include "kernels.hpp"
#include "kernels_ref.hpp"
#include "nf4core/optim.h"
#include "nf4core/quantize.h"

namespace nf4core {
namespace {

struct AdamScalars {
    // Each is a Python-double expression rounded once to float32, as torch
    // rounds a Python scalar for a float32 tensor op.
    float beta1, one_minus_beta1, beta2, one_minus_beta2;
    float correction2;      // sqrt(1 - beta2^step)
    float neg_step_size;    // -lr / (1 - beta1^step)
    float eps;
    float decay;            // 1 - lr * weight_decay
    bool apply_decay;
};

AdamScalars make_scalars(const nf4_adam_hparams &hp) {
    AdamScalars s{};
    s.beta1 = float(hp.beta1);
    s.one_minus_beta1 = float(1.0 - hp.beta1);
    s.beta2 = float(hp.beta2);
    s.one_minus_beta2 = float(1.0 - hp.beta2);
    const double c1 = 1.0 - std::pow(hp.beta1, double(hp.step));
    const double c2 = std::sqrt(1.0 - std::pow(hp.beta2, double(hp.step)));
    s.correction2 = float(c2);
    s.neg_step_size = float(-hp.lr / c1);
    s.eps = float(hp.eps);
    s.decay = float(1.0 - hp.lr * hp.weight_decay);
    s.apply_decay = hp.weight_decay > 0.0;
    return s;
}

template <typename T>
void adam8bit_blocks(T *param, const T *grad, int64_t n, uint8_t *state1, uint8_t *state2, float *absmax1,
                     float *absmax2, const float *qmap1, const float *qmap2, const SearchTable &t1,
                     const SearchTable &t2, int64_t blocksize, const AdamScalars &s, int64_t b0, int64_t b1,
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
            const float gi = to_float(g[i]);
            if (!is_finite(gi)) {
                m[i] = 0.0f;
                v[i] = 0.0f;
                ++local_skipped;
                continue;
            }
            // state1.mul_(beta1).add_(grad, alpha=1 - beta1): torch's CPU
            // kernel fuses alpha * grad + state1 into one FMA
            const float mi = std::fma(s.one_minus_beta1, gi, qmap1[c1[i]] * a1 * s.beta1);
            // state2.mul_(beta2).addcmul_(grad, grad, value=1 - beta2): also
            // (value * grad) * grad + state2 as one FMA
            const float vi = std::fma(s.one_minus_beta2 * gi, gi, qmap2[c2[i]] * a2 * s.beta2);
            m[i] = mi;
            v[i] = vi;
            // denom = (state2.sqrt() / correction2).add_(eps)
            const float denom = std::sqrt(vi) / s.correction2 + s.eps;
            float pi = to_float(p[i]);
            if (s.apply_decay) pi = pi * s.decay;
            // p.addcdiv_(state1, denom, value=-lr / correction1): (value * m) / denom, then add
            pi = pi + (s.neg_step_size * mi) / denom;
            p[i] = from_float<T>(pi);
        }
        // Requantize both moments as one block each (a short last block is
        // the tensor's tail block, as in nf4_quantize_8bit).
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
        require(dtype == NF4_FLOAT32 || dtype == NF4_FLOAT16 || dtype == NF4_BFLOAT16,
                "unknown dtype code " + std::to_string(int(dtype)));
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
        const AdamScalars s = make_scalars(*hp);
        const int64_t nblocks = (n + blocksize - 1) / blocksize;
        std::atomic<int64_t> count{0};
        auto run = [&](auto *p, const auto *g) {
            parallel_for(nblocks, std::max<int64_t>(1, (int64_t(1) << 15) / blocksize), [&](int64_t b0, int64_t b1) {
                adam8bit_blocks(p, g, n, state1, state2, absmax1, absmax2, qmap1, qmap2, t1, t2, blocksize, s, b0,
                                b1, count);
            });
        };
        if (dtype == NF4_FLOAT32)
            run(static_cast<float *>(param), static_cast<const float *>(grad));
        else if (dtype == NF4_FLOAT16)
            run(static_cast<half_t *>(param), static_cast<const half_t *>(grad));
        else
            run(static_cast<bfloat16_t *>(param), static_cast<const bfloat16_t *>(grad));
        if (skipped) *skipped = count.load();
    });
}
