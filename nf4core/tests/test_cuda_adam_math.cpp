// The CUDA 8-bit Adam kernel's arithmetic, run on the host: src/adam_math.hpp
// (the per-element update the kernel calls) and the kernel's
// two-pass block algorithm (update + absmax of the new moments as float bits,
// then recompute and encode with numeric.hpp's block_scale/encode_value),
// written out here in plain C++, against nf4_adam8bit_update (the CPU kernel)
// byte for byte: parameters, both code arrays, both absmax arrays, the skip
// count, over several steps, three dtypes, three blocksizes, tails, weight
// decay on and off, NaN/Inf gradients. Runs on every machine (no GPU needed);
// on a GPU test_cuda_adam.cpp compares the real kernel with the CPU.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "adam_math.hpp"
#include "check.hpp"
#include "nf4_check.hpp"
#include "nf4core/nf4core.h"
#include "numeric.hpp"

using namespace nf4core;

namespace {

struct State {
    std::vector<uint8_t> s1, s2;
    std::vector<float> a1, a2;
};

// The GPU kernel's algorithm for one call (adam8bit.cu), serially.
template <typename T>
int64_t emulate(T *p, const T *g, int64_t n, State &st, const float *q1, const float *q2, int64_t bs,
                const nf4_adam_hparams &hp) {
    const SearchTable t1 = check::table_of(q1, 256), t2 = check::table_of(q2, 256);
    const AdamScalarsF32 s = make_adam_scalars(hp);
    int64_t skipped = 0;
    for (int64_t b = 0; b * bs < n; ++b) {
        const int64_t begin = b * bs, end = std::min(n, begin + bs);
        const float a1 = st.a1[size_t(b)], a2 = st.a2[size_t(b)];
        uint32_t amax1 = 0, amax2 = 0;
        for (int64_t i = begin; i < end; ++i) {
            float pi = to_float(p[i]), m, v;
            if (adam_element(to_float(g[i]), q1[st.s1[size_t(i)]], a1, q2[st.s2[size_t(i)]], a2, pi, s, m, v))
                p[i] = from_float<T>(pi);
            else
                ++skipped;
            amax1 = std::max(amax1, float_bits(m) & 0x7FFFFFFFu);
            amax2 = std::max(amax2, float_bits(v) & 0x7FFFFFFFu);
        }
        const BlockScale s1 = block_scale(bits_float(amax1), end - begin, bs);
        const BlockScale s2 = block_scale(bits_float(amax2), end - begin, bs);
        for (int64_t i = begin; i < end; ++i) {
            float pi = 0.0f, m, v;
            adam_element(to_float(g[i]), q1[st.s1[size_t(i)]], a1, q2[st.s2[size_t(i)]], a2, pi, s, m, v);
            st.s1[size_t(i)] = encode_value<256>(t1, m, s1);
            st.s2[size_t(i)] = encode_value<256>(t2, v, s2);
        }
        st.a1[size_t(b)] = s1.stored;
        st.a2[size_t(b)] = s2.stored;
    }
    return skipped;
}

template <typename T>
T make(float v) {
    return from_float<T>(v);
}

template <typename T>
void run_case(nf4_dtype dt, int64_t n, int64_t bs, double wd, bool bad_grads, uint64_t seed) {
    check::AdamCase c(n, bs, seed);
    const std::vector<float> &q1 = c.maps.q1, &q2 = c.maps.q2;
    const int64_t nb = c.nb;
    std::vector<T> p_cpu(static_cast<size_t>(n)), p_emu(static_cast<size_t>(n)), g(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) p_cpu[size_t(i)] = p_emu[size_t(i)] = make<T>(c.normal(c.rng));
    State cpu{std::vector<uint8_t>(size_t(n), 127), std::vector<uint8_t>(size_t(n), 0),
              std::vector<float>(size_t(nb), 0.0f), std::vector<float>(size_t(nb), 0.0f)};
    State emu = cpu;
    int mismatches = 0;
    for (int64_t step = 1; step <= 4; ++step) {
        for (int64_t i = 0; i < n; ++i) g[size_t(i)] = make<T>(c.normal(c.rng) * (step == 2 ? 1e-3f : 0.1f));
        if (step == 1) g[0] = make<T>(0.0f);  // an all-zero-ish start is in the data anyway
        if (bad_grads) {
            g[size_t(n / 3)] = make<T>(NAN);
            g[size_t(n - 1)] = make<T>(step % 2 ? INFINITY : -INFINITY);
        }
        const nf4_adam_hparams hp{1e-3 * double(step), 0.9, 0.999, 1e-8, wd, step};
        int64_t skipped_cpu = -1;
        CHECK(nf4_adam8bit_update(p_cpu.data(), g.data(), dt, n, cpu.s1.data(), cpu.s2.data(), cpu.a1.data(),
                                  cpu.a2.data(), q1.data(), q2.data(), bs, &hp, &skipped_cpu) == NF4_OK);
        const int64_t skipped_emu = emulate(p_emu.data(), g.data(), n, emu, q1.data(), q2.data(), bs, hp);
        CHECK_MSG(skipped_cpu == skipped_emu, "skipped %lld vs %lld", (long long)skipped_cpu, (long long)skipped_emu);
        mismatches += std::memcmp(p_cpu.data(), p_emu.data(), size_t(n) * sizeof(T)) != 0;
        mismatches += cpu.s1 != emu.s1;
        mismatches += cpu.s2 != emu.s2;
        mismatches += std::memcmp(cpu.a1.data(), emu.a1.data(), size_t(nb) * 4) != 0;
        mismatches += std::memcmp(cpu.a2.data(), emu.a2.data(), size_t(nb) * 4) != 0;
    }
    CHECK_MSG(mismatches == 0, "dtype %d n=%lld bs=%lld wd=%g bad=%d: %d arrays differ", int(dt), (long long)n,
              (long long)bs, wd, int(bad_grads), mismatches);
    // the test can fail: the update moved the parameters and filled the state
    int64_t codes = 0;
    for (uint8_t c : cpu.s2) codes += c != 0;
    CHECK(codes > n / 2);
}

}  // namespace

TEST_CASE(adam_math_matches_cpu_kernel_byte_for_byte) {
    uint64_t seed = 1;
    for (int64_t bs : {int64_t(64), int64_t(256), int64_t(2048)}) {
        for (int64_t n : {int64_t(1), bs * 3, bs * 3 + 17}) {
            for (double wd : {0.0, 0.01}) {
                for (bool bad : {false, true}) {
                    if (bad && n < 3) continue;
                    run_case<float>(NF4_FLOAT32, n, bs, wd, bad, seed++);
                    run_case<half_t>(NF4_FLOAT16, n, bs, wd, bad, seed++);
                    run_case<bfloat16_t>(NF4_BFLOAT16, n, bs, wd, bad, seed++);
                }
            }
        }
    }
}

// An oracle independent of both kernels for one element of the first step
// (fresh state decodes to exactly 0): m = (1-b1) g, v = (1-b2) g^2 in double,
// p - lr/(1-b1) m / (sqrt(v)/sqrt(1-b2) + eps) = p - lr * sign(g) (for |g| >> eps).
TEST_CASE(adam_element_first_step_closed_form) {
    const nf4_adam_hparams hp{0.01, 0.9, 0.999, 1e-8, 0.0, 1};
    const AdamScalarsF32 s = make_adam_scalars(hp);
    for (float gv : {0.5f, -2.0f, 1e-3f, 37.0f}) {
        float p = 1.0f, m, v;
        CHECK(adam_element(gv, 0.0f, 0.0f, 0.0f, 0.0f, p, s, m, v));
        CHECK(std::fabs(m - 0.1 * gv) <= 1e-6 * std::fabs(gv));
        CHECK(std::fabs(v - 0.001 * double(gv) * gv) <= 1e-6 * double(gv) * gv);
        CHECK_MSG(std::fabs(p - (1.0 - 0.01 * (gv > 0 ? 1 : -1))) <= 1e-5, "g=%g p=%g", gv, p);
    }
    float p = 3.0f, m = 1.0f, v = 1.0f;
    CHECK(!adam_element(NAN, 0.5f, 1.0f, 0.5f, 1.0f, p, s, m, v));
    CHECK(p == 3.0f && m == 0.0f && v == 0.0f);
}

int main() { return check::run_all(); }
