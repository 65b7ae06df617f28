// The host/device math of numeric.hpp (block_scale, encode_value, nibble_at,
// pack_pair, decode_value, dq_scale), which the CPU reference kernels and the
// CUDA kernels share, against independent oracles: the rules of docs/format.md
// written out directly (double-precision distances, the formulas as the CPU
// code spelled them before they moved into the shared header).
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "check.hpp"
#include "nf4_check.hpp"
#include "nf4core/nf4core.h"
#include "numeric.hpp"

using namespace nf4core;

namespace {

// Oracle: the code whose value is nearest to y in exact (double) arithmetic,
// ties to the lower value and, among equal values, the lower code.
int brute_nearest(const float *cb, int size, float y) {
    int best = 0;
    for (int c = 1; c < size; ++c) {
        const double d = std::fabs(double(y) - cb[c]), db = std::fabs(double(y) - cb[best]);
        if (d < db || (d == db && (cb[c] < cb[best] || (cb[c] == cb[best] && c < best)))) best = c;
    }
    return best;
}

// Draws `samples` x from u and counts those whose code disagrees with the
// brute-force nearest value (agree(code, want) false), skipping the x whose
// clamped value lies within near(y) of a midpoint, where float32 midpoints decide.
template <int N, class Near, class Agree>
int brute_force_disagreements(std::mt19937 &rng, std::uniform_real_distribution<float> &u, int samples,
                              const float *cb, const SearchTable &t, const BlockScale &s, Near near, Agree agree) {
    int bad = 0;
    for (int i = 0; i < samples; ++i) {
        const float x = u(rng);
        const float y = x < -1.0f ? -1.0f : (x > 1.0f ? 1.0f : x);
        bool near_mid = false;
        for (int k = 0; k < N - 1; ++k) near_mid |= std::fabs(y - t.mid[k]) <= near(y);
        if (near_mid) continue;
        bad += !agree(encode_value<N>(t, x, s), brute_nearest(cb, N, y));
    }
    return bad;
}

}  // namespace

TEST_CASE(block_scale_rule_of_the_format) {
    // full blocks: scale = absmax (clamped >= 1e-38), stored raw; tail: stored clamped
    const BlockScale full = block_scale(2.5f, 64, 64);
    CHECK(full.scale == 2.5f && full.recip == 1.0f / 2.5f && !full.tail && full.stored == 2.5f);
    const BlockScale zero_full = block_scale(0.0f, 64, 64);
    CHECK(zero_full.scale == 1e-38f && zero_full.stored == 0.0f && !zero_full.tail);
    const BlockScale zero_tail = block_scale(0.0f, 10, 64);
    CHECK(zero_tail.scale == 1e-38f && zero_tail.stored == 1e-38f && zero_tail.tail);
    const BlockScale tail = block_scale(3.0f, 63, 64);
    CHECK(tail.tail && tail.stored == 3.0f);
    // 1e-38 is the subnormal float32 0x006CE3EE (docs/format.md)
    CHECK(float_bits(kMinScale) == 0x006CE3EEu);
}

TEST_CASE(encode_value_matches_brute_force_nearest) {
    std::mt19937 rng(3);
    std::uniform_real_distribution<float> u(-1.2f, 1.2f);
    float cbs[3][16];
    nf4_codebook_normal(4, cbs[0]);
    nf4_codebook_fp4(cbs[1]);
    nf4_codebook_int4(cbs[2]);
    for (const auto &cb : cbs) {
        const SearchTable t = check::table_of(cb, 16);
        const BlockScale s = block_scale(1.0f, 64, 64);
        // values within an ulp of a midpoint are skipped; FP4's +0 and -0 agree by value
        const int bad = brute_force_disagreements<16>(
            rng, u, 200000, cb, t, s, [](float) { return 2e-7f; }, [&](int c, int want) { return cb[c] == cb[want]; });
        CHECK_MSG(bad == 0, "%d codes differ from the brute-force nearest value", bad);
        // exactly on a float32 midpoint: the lower value
        for (int k = 0; k < 15; ++k) {
            const uint8_t c = encode_value<16>(t, t.mid[k], s);
            CHECK(cb[c] == cb[t.order[k]]);
        }
    }
    // 8-bit dynamic map: binary search against brute force
    float dyn[256];
    nf4_codebook_dynamic(1, dyn);
    const SearchTable t = check::table_of(dyn, 256);
    const BlockScale s = block_scale(1.0f, 256, 256);
    const int bad = brute_force_disagreements<256>(
        rng, u, 50000, dyn, t, s, [](float y) { return 1e-7f * (1.0f + std::fabs(y)); },
        [](int c, int want) { return c == want; });
    CHECK_MSG(bad == 0, "%d dynamic-map codes differ from brute force", bad);
}

TEST_CASE(tail_blocks_divide_full_blocks_multiply) {
    // scale_value: x * (1/s) for full blocks, x / s for the tail (they differ for some x)
    const float s = 3.0f;
    int differ = 0;
    for (int i = 1; i < 1000; ++i) {
        const float x = float(i) / 997.0f;
        CHECK(scale_value(x, s, 1.0f / s, false) == x * (1.0f / s));
        CHECK(scale_value(x, s, 1.0f / s, true) == x / s);
        differ += (x * (1.0f / s)) != (x / s);
    }
    CHECK(differ > 0);  // otherwise this test could not tell the two rules apart
    CHECK(scale_value(5.0f, 1.0f, 1.0f, false) == 1.0f && scale_value(-5.0f, 1.0f, 1.0f, true) == -1.0f);
}

TEST_CASE(nibble_packing_and_decoding_as_before) {
    // every byte: the even element in the high nibble, as bitsandbytes packs
    for (unsigned b = 0; b < 256; ++b) {
        const uint8_t packed[1] = {uint8_t(b)};
        CHECK(nibble_at(packed, 0) == (b >> 4) && nibble_at(packed, 1) == (b & 15u));
        CHECK(pack_pair(b >> 4, b & 15u) == b);
    }
    // decode_value and dq_scale are the single products/sums the CPU code
    // wrote inline before (one rounding each, never fused)
    std::mt19937 rng(5);
    std::uniform_real_distribution<float> u(-2.0f, 2.0f);
    for (int i = 0; i < 100000; ++i) {
        const float a = u(rng), b = u(rng), c = u(rng);
        volatile float prod = a * b;  // volatile: rounded to float32 here
        volatile float sum = prod + c;
        CHECK(decode_value(a, b) == prod);
        CHECK(dq_scale(a, b, c) == sum);
        CHECK(float(double(a) * double(b)) == prod);  // float32 products are exact in double
    }
}

int main() { return check::run_all(); }
