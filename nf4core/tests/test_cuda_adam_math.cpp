// The CUDA 8-bit Adam kernel's arithmetic, run on the host: src/adam_math.hpp
// (the per-element update the kernel calls) and the kernel's
// two-pass block algorithm (update + absmax of the new moments as float bits,
// then recompute and encode with numeric.hpp's block_scale/encode_value),
// written out here in plain C++, against nf4_adam8bit_update (the CPU kernel)
// byte for byte: parameters, both code arrays, both absmax arrays, the skip
// count, over several steps, three dtypes, three blocksizes, tails, weight
// decay on and off, NaN/Inf gradients, updates that overflow. Runs on every machine (no GPU needed);
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

// The GPU kernel's algorithm for one call (adam8bit.cu), serially: pass 1
// computes every update without writing, for the new absmax; pass 2 repeats it
// from the same old values, writes the parameter and encodes the moments.
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
            T pi = p[i];
            float m, v;
            adam_update(pi, to_float(g[i]), q1[st.s1[size_t(i)]], a1, q2[st.s2[size_t(i)]], a2, s, m, v);
            amax1 = std::max(amax1, float_bits(m) & 0x7FFFFFFFu);
            amax2 = std::max(amax2, float_bits(v) & 0x7FFFFFFFu);
        }
        const BlockScale s1 = block_scale(bits_float(amax1), end - begin, bs);
        const BlockScale s2 = block_scale(bits_float(amax2), end - begin, bs);
        for (int64_t i = begin; i < end; ++i) {
            T pi = p[i];
            float m, v;
            if (adam_update(pi, to_float(g[i]), q1[st.s1[size_t(i)]], a1, q2[st.s2[size_t(i)]], a2, s, m, v))
                p[i] = pi;
            else
                ++skipped;
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

// Kinds of bad input per case: none, NaN/Inf gradients, or updates that
// overflow (finite gradients of 1e30 and -4e25, a stored block absmax of +Inf).
enum Bad { kClean, kNonFiniteGrads, kOverflow };

template <typename T>
void run_case(nf4_dtype dt, int64_t n, int64_t bs, double wd, Bad bad, uint64_t seed) {
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
        if (bad == kNonFiniteGrads) {
            g[size_t(n / 3)] = make<T>(NAN);
            g[size_t(n - 1)] = make<T>(step % 2 ? INFINITY : -INFINITY);
        }
        if (bad == kOverflow) {
            g[size_t(n / 3)] = make<T>(1e30f);  // inf in float16: a non-finite gradient there
            g[size_t(n - 1)] = make<T>(-4e25f);
            if (step == 3) cpu.a1[0] = emu.a1[0] = INFINITY;  // a corrupt stored scale: its block is skipped
        }
        const nf4_adam_hparams hp{1e-3 * double(step), 0.9, 0.999, 1e-8, wd, step};
        int64_t skipped_cpu = -1;
        CHECK(nf4_adam8bit_update(p_cpu.data(), g.data(), dt, n, cpu.s1.data(), cpu.s2.data(), cpu.a1.data(),
                                  cpu.a2.data(), q1.data(), q2.data(), bs, &hp, &skipped_cpu) == NF4_OK);
        const int64_t skipped_emu = emulate(p_emu.data(), g.data(), n, emu, q1.data(), q2.data(), bs, hp);
        CHECK_MSG(skipped_cpu == skipped_emu, "skipped %lld vs %lld", (long long)skipped_cpu, (long long)skipped_emu);
        CHECK(bad != kClean || skipped_cpu == 0);
        CHECK(bad != kOverflow || skipped_cpu >= (step == 3 ? std::min<int64_t>(n, bs) : 2));
        for (int64_t b = 0; b < nb; ++b) CHECK(std::isfinite(cpu.a1[size_t(b)]) && std::isfinite(cpu.a2[size_t(b)]));
        mismatches += std::memcmp(p_cpu.data(), p_emu.data(), size_t(n) * sizeof(T)) != 0;
        mismatches += cpu.s1 != emu.s1;
        mismatches += cpu.s2 != emu.s2;
        mismatches += std::memcmp(cpu.a1.data(), emu.a1.data(), size_t(nb) * 4) != 0;
        mismatches += std::memcmp(cpu.a2.data(), emu.a2.data(), size_t(nb) * 4) != 0;
    }
    CHECK_MSG(mismatches == 0, "dtype %d n=%lld bs=%lld wd=%g bad=%d: %d arrays differ", int(dt), (long long)n,
              (long long)bs, wd, int(bad), mismatches);
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
                for (Bad bad : {kClean, kNonFiniteGrads, kOverflow}) {
                    if (bad != kClean && n < 3) continue;
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

// The skip rule beyond NaN/Inf gradients (adam_math.hpp): a finite gradient
// whose update overflows float32, or a parameter that overflows its dtype,
// leaves the parameter unchanged and resets both moments; the element beside
// it is updated exactly as alone.
TEST_CASE(adam_update_skips_updates_that_overflow) {
    const nf4_adam_hparams hp{1e-3, 0.9, 0.999, 1e-8, 0.0, 1};
    const AdamScalarsF32 s = make_adam_scalars(hp);
    float p = 2.0f, m = 1.0f, v = 1.0f;
    CHECK(!adam_update(p, 1e30f, 0.0f, 0.0f, 0.0f, 0.0f, s, m, v));  // v = 1e-3 * 1e60 overflows
    CHECK(p == 2.0f && m == 0.0f && v == 0.0f);
    CHECK(!adam_update(p, 0.5f, 0.5f, INFINITY, 0.5f, 1.0f, s, m, v));  // a stored absmax of +Inf
    CHECK(p == 2.0f && m == 0.0f && v == 0.0f);
    CHECK(adam_update(p, 1e19f, 0.0f, 0.0f, 0.0f, 0.0f, s, m, v));  // v = 1e35: still finite, updated
    CHECK(p < 2.0f && std::isfinite(m) && std::isfinite(v));
    // float16: 65504 + 100 is finite in float32 but rounds to +Inf in float16
    const nf4_adam_hparams big{100.0, 0.9, 0.999, 1e-8, 0.0, 1};
    const AdamScalarsF32 sb = make_adam_scalars(big);
    half_t h = from_float<half_t>(65504.0f);
    CHECK(!adam_update(h, -1.0f, 0.0f, 0.0f, 0.0f, 0.0f, sb, m, v));
    CHECK(to_float(h) == 65504.0f && m == 0.0f && v == 0.0f);
    float f = 65504.0f;  // the same update in float32 is kept
    CHECK(adam_update(f, -1.0f, 0.0f, 0.0f, 0.0f, 0.0f, sb, m, v));
    CHECK(f > 65504.0f);
    // the whole kernel: one huge gradient in a block, the others as in a call without it
    const int64_t n = 300, bs = 64;
    check::AdamMaps maps;
    std::vector<float> p1(static_cast<size_t>(n)), p2, g(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
        p1[size_t(i)] = 0.01f * float(i % 17) - 0.05f;
        g[size_t(i)] = 0.003f * float(i % 11) - 0.015f;
    }
    p2 = p1;
    std::vector<float> g2 = g;
    g2[70] = 1e30f;
    std::vector<uint8_t> s1a(size_t(n), 127), s2a(size_t(n), 0), s1b = s1a, s2b = s2a;
    std::vector<float> a1a(5, 0.0f), a2a(5, 0.0f), a1b = a1a, a2b = a2a;
    int64_t skipped = -1;
    CHECK(nf4_adam8bit_update(p1.data(), g.data(), NF4_FLOAT32, n, s1a.data(), s2a.data(), a1a.data(), a2a.data(),
                              maps.q1.data(), maps.q2.data(), bs, &hp, &skipped) == NF4_OK && skipped == 0);
    CHECK(nf4_adam8bit_update(p2.data(), g2.data(), NF4_FLOAT32, n, s1b.data(), s2b.data(), a1b.data(),
                              a2b.data(), maps.q1.data(), maps.q2.data(), bs, &hp, &skipped) == NF4_OK);
    CHECK(skipped == 1 && nf4_last_error()[0] == '\0');
    CHECK(p2[70] == 0.01f * float(70 % 17) - 0.05f && s1b[70] == 127 && s2b[70] == 0);
    int differ = 0;
    for (int64_t i = 0; i < n; ++i)
        if (i != 70) differ += p1[size_t(i)] != p2[size_t(i)];
    CHECK(differ == 0);  // the block of element 70 has the same largest moments without it here
    CHECK(a1a == a1b && a2a == a2b);
}

int main() { return check::run_all(); }
