// float16 / bfloat16 conversions: exhaustive round trips and the compiler's
// own _Float16 conversion as an oracle where it exists.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>

#include "check.hpp"
#include "numeric.hpp"

using namespace nf4core;

TEST_CASE(half_roundtrip_exhaustive) {
    for (uint32_t h = 0; h < 65536; ++h) {
        const float f = to_float(half_t{uint16_t(h)});
        const bool nan = ((h >> 10) & 0x1F) == 0x1F && (h & 0x3FF);
        if (nan) {
            CHECK(std::isnan(f));
            continue;
        }
        CHECK_MSG(to_half(f).bits == h, "half 0x%04x -> %g -> 0x%04x", h, f, to_half(f).bits);
    }
}

TEST_CASE(bfloat16_roundtrip_exhaustive) {
    for (uint32_t h = 0; h < 65536; ++h) {
        const float f = to_float(bfloat16_t{uint16_t(h)});
        if (std::isnan(f)) continue;
        CHECK(to_bfloat16(f).bits == h);
    }
}

TEST_CASE(rounding_to_nearest_even) {
    // 1 + 2^-8 is exactly halfway between two bfloat16 values: ties to even (1.0)
    CHECK(to_bfloat16(1.00390625f).bits == 0x3F80);
    CHECK(to_bfloat16(1.01171875f).bits == 0x3F82);  // 1 + 3*2^-8 -> up to even
    CHECK(to_half(65519.0f).bits == 0x7BFF);
    CHECK(to_half(65520.0f).bits == 0x7C00);  // rounds to inf, as IEEE says
    CHECK(to_half(-1e-8f).bits == 0x8000);
#if defined(__aarch64__)
    using compiler_half = __fp16;  // ARM's storage half type, IEEE round to nearest even
#define HAVE_COMPILER_HALF 1
#elif defined(__FLT16_MAX__)
    using compiler_half = _Float16;
#define HAVE_COMPILER_HALF 1
#endif
#if defined(HAVE_COMPILER_HALF)
    std::mt19937 rng(1);
    std::uniform_int_distribution<uint32_t> bits;
    int bad = 0;
    for (int i = 0; i < 2000000; ++i) {
        const float f = bits_float(bits(rng));
        if (std::isnan(f)) continue;
        const compiler_half ref = static_cast<compiler_half>(f);
        uint16_t rb;
        std::memcpy(&rb, &ref, 2);
        bad += to_half(f).bits != rb;
    }
    CHECK_MSG(bad == 0, "%d float->half conversions differ from the compiler's half type", bad);
#endif
}

int main() { return check::run_all(); }
