// The per-element arithmetic of the fused 8-bit AdamW update, shared by host
// and device like numeric.hpp beside it: written once for the CPU kernel
// (optim.cpp) and the CUDA kernel (cuda/adam8bit.cu), so that a CPU test
// (tests/test_cuda_adam_math.cpp) checks the GPU's arithmetic byte for byte
// against nf4_adam8bit_update on machines without a GPU.
//
// It follows optim.cpp's operation order exactly: every product, quotient,
// square root and fused multiply-add is one IEEE float32 operation rounded to
// nearest (on the device spelled with the _rn intrinsics, so neither
// --fmad nor --use_fast_math can change it). The scalars are optim.cpp's
// make_scalars: doubles combined in double, rounded once to float32.
// The CPU kernel (optim.cpp) calls the same functions, so there is one copy;
// tests/test_cuda_adam_math.cpp also replays the GPU kernel's two-pass order.
#ifndef NF4CORE_SRC_ADAM_MATH_HPP
#define NF4CORE_SRC_ADAM_MATH_HPP

#include <cmath>

#include "numeric.hpp"
#include "nf4core/optim.h"

namespace nf4core {
namespace {  // internal linkage, see numeric.hpp

struct AdamScalarsF32 {
    float beta1, one_minus_beta1, beta2, one_minus_beta2;
    float correction2;    // sqrt(1 - beta2^step)
    float neg_step_size;  // -lr / (1 - beta1^step)
    float eps;
    float decay;          // 1 - lr * weight_decay
    bool apply_decay;
};

// Host only (double pow/sqrt from the host libm, as optim.cpp).
inline AdamScalarsF32 make_adam_scalars(const nf4_adam_hparams &hp) {
    AdamScalarsF32 s{};
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

NF4_HOST_DEVICE inline float fma_rn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
    return __fmaf_rn(a, b, c);
#else
    return std::fma(a, b, c);
#endif
}

NF4_HOST_DEVICE inline float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fdiv_rn(a, b);
#else
    return a / b;
#endif
}

NF4_HOST_DEVICE inline float sqrt_rn(float a) {
#if defined(__CUDA_ARCH__)
    return __fsqrt_rn(a);
#else
    return std::sqrt(a);
#endif
}

// One element: g the gradient, m_code/v_code the decoded dynamic-map values
// (qmap[code], not yet scaled), a1/a2 the block absmax, p the parameter.
// Returns false and skips the element (p unchanged, m = v = 0) when the
// gradient is NaN/Inf or when the update is not finite: a new moment or the
// new parameter overflows float32 (with beta2 = 0.999, |g| above about 5.8e20 makes
// (1 - beta2) g^2 overflow) or is NaN (a stored block absmax that is not
// finite). Skipping keeps every other element of the block, and its
// requantization, finite.
NF4_HOST_DEVICE inline bool adam_element(float g, float m_code, float a1, float v_code, float a2, float &p,
                                         const AdamScalarsF32 &s, float &m, float &v) {
    if (is_finite(g)) {
        // state1.mul_(beta1).add_(grad, alpha=1 - beta1), the add fused (torch's CPU kernel)
        const float m1 = fma_rn(s.one_minus_beta1, g, mul_rn(mul_rn(m_code, a1), s.beta1));
        // state2.mul_(beta2).addcmul_(grad, grad, value=1 - beta2), also one FMA
        const float v1 = fma_rn(mul_rn(s.one_minus_beta2, g), g, mul_rn(mul_rn(v_code, a2), s.beta2));
        // denom = (state2.sqrt() / correction2).add_(eps)
        const float denom = add_rn(div_rn(sqrt_rn(v1), s.correction2), s.eps);
        float pi = p;
        if (s.apply_decay) pi = mul_rn(pi, s.decay);
        // p.addcdiv_(state1, denom, value=-lr / correction1)
        pi = add_rn(pi, div_rn(mul_rn(s.neg_step_size, m1), denom));
        if (is_finite(m1) && is_finite(v1) && is_finite(pi)) {
            m = m1;
            v = v1;
            p = pi;
            return true;
        }
    }
    m = 0.0f;
    v = 0.0f;
    return false;
}

// adam_element on a parameter of type T, as both kernels apply it: the new
// parameter is stored rounded to T, and an element whose rounded parameter
// overflows T (float16 above 65504) is skipped like any other non-finite
// update. Returns false for a skipped element (p untouched, m = v = 0).
template <typename T>
NF4_HOST_DEVICE inline bool adam_update(T &p, float g, float m_code, float a1, float v_code, float a2,
                                        const AdamScalarsF32 &s, float &m, float &v) {
    float pf = to_float(p);
    if (!adam_element(g, m_code, a1, v_code, a2, pf, s, m, v)) return false;
    const T q = from_float<T>(pf);
    if (!is_finite(to_float(q))) {
        m = 0.0f;
        v = 0.0f;
        return false;
    }
    p = q;
    return true;
}

}  // namespace
}  // namespace nf4core

#endif  // NF4CORE_SRC_ADAM_MATH_HPP
