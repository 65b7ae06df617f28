// Blockwise quantization tests against closed forms and a brute-force oracle.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "check.hpp"
#include "nf4core/nf4core.h"
#include "numeric.hpp"

static std::vector<float> table(const char *name) {
    int64_t n = 0;
    nf4_codebook_by_name(name, nullptr, 0, &n);
    std::vector<float> t(static_cast<size_t>(n));
    nf4_codebook_by_name(name, t.data(), n, &n);
    return t;
}

// Independent oracle, by brute force over all codes: find the largest table
// value a <= s and the smallest value b > s; s goes to b if s > (a + b) / 2
// (midpoint rounded to float32, as the format specifies), else to a. When
// several codes share the chosen value (FP4 and INT4 have +0 and -0),
// bitsandbytes' bucketize gives the first such code for s <= value and the
// last one for s > value.
static int brute_nearest(const std::vector<float> &t, float s) {
    bool has_a = false, has_b = false;
    float a = 0, b = 0;
    for (float v : t) {
        if (v <= s && (!has_a || v > a)) a = v, has_a = true;
        if (v > s && (!has_b || v < b)) b = v, has_b = true;
    }
    float value;
    if (!has_a) value = b;
    else if (!has_b) value = a;
    else value = (s > (a + b) / 2.0f) ? b : a;
    int first = -1, last = -1;
    for (int c = 0; c < int(t.size()); ++c)
        if (t[c] == value) {
            if (first < 0) first = c;
            last = c;
        }
    return s > value ? last : first;
}

struct Q4 {
    std::vector<uint8_t> packed;
    std::vector<float> absmax;
};

static Q4 q4(const std::vector<float> &x, int64_t bs, const std::vector<float> &t) {
    const int64_t n = int64_t(x.size());
    Q4 q{std::vector<uint8_t>(size_t(nf4_packed_size_4bit(n))), std::vector<float>(size_t(nf4_num_blocks(n, bs)))};
    const nf4_status st = nf4_quantize_4bit(x.data(), NF4_FLOAT32, n, bs, t.data(), q.packed.data(), q.absmax.data());
    CHECK_MSG(st == NF4_OK, "%s", nf4_last_error());
    return q;
}

static int code_at(const Q4 &q, int64_t i) { return (i & 1) ? (q.packed[i >> 1] & 15) : (q.packed[i >> 1] >> 4); }

TEST_CASE(packing_order_high_nibble_first) {
    // bitsandbytes packs [-1, 1, 0, 0.5] (NF4, one block) to bytes 0x0F, 0x7C.
    const Q4 q = q4({-1.0f, 1.0f, 0.0f, 0.5f}, 64, table("nf4"));
    CHECK(q.packed[0] == 0x0F && q.packed[1] == 0x7C);
    CHECK(q.absmax[0] == 1.0f);
}

TEST_CASE(odd_length_pads_with_zero_code) {
    const std::vector<float> x = {0.1f, -0.2f, 0.3f, -0.4f, 0.5f, -0.6f, 0.7f};
    const Q4 nf = q4(x, 64, table("nf4"));
    CHECK(nf.packed.size() == 4 && (nf.packed[3] & 15) == 7);
    const Q4 fp = q4(x, 64, table("fp4"));
    CHECK((fp.packed[3] & 15) == 0);
}

TEST_CASE(tail_block_has_own_absmax) {
    std::vector<float> x(100);
    for (int i = 0; i < 100; ++i) x[size_t(i)] = float(i % 7) - 3.0f + (i >= 64 ? 0.25f : 0.0f);
    const Q4 q = q4(x, 64, table("nf4"));
    CHECK(q.absmax.size() == 2);
    float m0 = 0, m1 = 0;
    for (int i = 0; i < 64; ++i) m0 = std::max(m0, std::fabs(x[size_t(i)]));
    for (int i = 64; i < 100; ++i) m1 = std::max(m1, std::fabs(x[size_t(i)]));
    CHECK(q.absmax[0] == m0 && q.absmax[1] == m1);
}

TEST_CASE(ties_go_to_lower_code) {
    const std::vector<float> t = table("nf4");
    for (int c = 0; c < 15; ++c) {
        const float mid = (t[size_t(c)] + t[size_t(c) + 1]) / 2.0f;
        // absmax 1 (element 0), so the scaled value of element 1 is exactly mid
        const Q4 q = q4({1.0f, mid}, 64, t);
        CHECK_MSG(code_at(q, 1) == c, "mid(%d,%d) -> %d", c, c + 1, code_at(q, 1));
        const Q4 q2 = q4({1.0f, std::nextafter(mid, 2.0f)}, 64, t);
        CHECK(code_at(q2, 1) == c + 1);
    }
}

TEST_CASE(all_zero_block_decodes_to_exact_zeros) {
    std::vector<float> x(128, 0.0f);
    for (int i = 64; i < 128; ++i) x[size_t(i)] = float(i);
    for (const char *cb : {"nf4", "fp4", "int4"}) {
        const std::vector<float> t = table(cb);
        const Q4 q = q4(x, 64, t);
        CHECK(q.absmax[0] == 0.0f);
        std::vector<float> y(128, 1.0f);
        CHECK(nf4_dequantize_4bit(q.packed.data(), q.absmax.data(), 128, 64, t.data(), y.data(), NF4_FLOAT32) ==
              NF4_OK);
        for (int i = 0; i < 64; ++i) CHECK(y[size_t(i)] == 0.0f);
        if (std::string(cb) == "nf4") CHECK(q.packed[0] == 0x77);  // bitsandbytes CPU/default bytes
    }
}

TEST_CASE(matches_brute_force_oracle_all_dtypes) {
    std::mt19937_64 rng(42);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (const char *cb : {"nf4", "fp4", "int4", "nf3", "nf2"}) {
        std::vector<float> t = table(cb);
        t.resize(16, t.back());  // nf2/nf3: pad the table to 16 codes with duplicates (lower code wins)
        for (int64_t bs : {32, 64, 256, 4096}) {
            for (int64_t n : {int64_t(1), int64_t(31), int64_t(bs + 3), int64_t(3 * bs - 1)}) {
                std::vector<float> x(static_cast<size_t>(n));
                for (float &v : x) v = normal(rng);
                for (nf4_dtype dt : {NF4_FLOAT32, NF4_FLOAT16, NF4_BFLOAT16}) {
                    // cast the input to the dtype; the oracle works on the cast values
                    std::vector<uint16_t> h(static_cast<size_t>(n));
                    std::vector<float> xv(static_cast<size_t>(n));
                    for (int64_t i = 0; i < n; ++i) {
                        if (dt == NF4_FLOAT16) h[size_t(i)] = nf4core::to_half(x[size_t(i)]).bits;
                        if (dt == NF4_BFLOAT16) h[size_t(i)] = nf4core::to_bfloat16(x[size_t(i)]).bits;
                        xv[size_t(i)] = dt == NF4_FLOAT16   ? nf4core::to_float(nf4core::half_t{h[size_t(i)]})
                                        : dt == NF4_BFLOAT16 ? nf4core::to_float(nf4core::bfloat16_t{h[size_t(i)]})
                                                             : x[size_t(i)];
                    }
                    const void *src = dt == NF4_FLOAT32 ? static_cast<const void *>(x.data()) : h.data();
                    Q4 q{std::vector<uint8_t>(size_t(nf4_packed_size_4bit(n))),
                         std::vector<float>(size_t(nf4_num_blocks(n, bs)))};
                    CHECK(nf4_quantize_4bit(src, dt, n, bs, t.data(), q.packed.data(), q.absmax.data()) == NF4_OK);
                    int bad = 0;
                    for (int64_t i = 0; i < n; ++i) {
                        const int64_t b = i / bs;
                        const bool tail = (b + 1) * bs > n;
                        const float am = std::max(q.absmax[size_t(b)], 1e-38f);
                        float s = tail ? xv[size_t(i)] / am : xv[size_t(i)] * (1.0f / am);
                        s = std::min(1.0f, std::max(-1.0f, s));
                        bad += code_at(q, i) != brute_nearest(t, s);
                    }
                    CHECK_MSG(bad == 0, "%s bs=%lld n=%lld dtype=%d: %d codes differ", cb, (long long)bs,
                              (long long)n, int(dt), bad);
                    // round-trip error bounded by half the largest code gap times absmax
                    std::vector<float> y(static_cast<size_t>(n));
                    CHECK(nf4_dequantize_4bit(q.packed.data(), q.absmax.data(), n, bs, t.data(), y.data(),
                                              NF4_FLOAT32) == NF4_OK);
                    std::vector<float> sorted = t;
                    std::sort(sorted.begin(), sorted.end());
                    float gap = 0;
                    for (size_t i = 0; i + 1 < sorted.size(); ++i) gap = std::max(gap, sorted[i + 1] - sorted[i]);
                    for (int64_t i = 0; i < n; ++i) {
                        const float am = q.absmax[size_t(i / bs)];
                        CHECK(std::fabs(y[size_t(i)] - xv[size_t(i)]) <= 0.5f * gap * am * (1 + 1e-6f) + 1e-30f);
                    }
                }
            }
        }
    }
}

TEST_CASE(eight_bit_roundtrip_and_oracle) {
    std::mt19937_64 rng(7);
    std::normal_distribution<float> normal(0.0f, 3.0f);
    const std::vector<float> t = table("dynamic");
    const int64_t n = 5000, bs = 256;
    std::vector<float> x(static_cast<size_t>(n));
    for (float &v : x) v = normal(rng);
    std::vector<uint8_t> codes(static_cast<size_t>(n));
    std::vector<float> absmax(size_t(nf4_num_blocks(n, bs)));
    CHECK(nf4_quantize_8bit(x.data(), NF4_FLOAT32, n, bs, t.data(), codes.data(), absmax.data()) == NF4_OK);
    int bad = 0;
    for (int64_t i = 0; i < n; ++i) {
        const int64_t b = i / bs;
        const bool tail = (b + 1) * bs > n;
        const float am = absmax[size_t(b)];
        const float s = std::min(1.0f, std::max(-1.0f, tail ? x[size_t(i)] / am : x[size_t(i)] * (1.0f / am)));
        bad += codes[size_t(i)] != brute_nearest(t, s);
    }
    CHECK_MSG(bad == 0, "%d 8-bit codes differ from the oracle", bad);
    std::vector<float> y(static_cast<size_t>(n));
    CHECK(nf4_dequantize_8bit(codes.data(), absmax.data(), n, bs, t.data(), y.data(), NF4_FLOAT32) == NF4_OK);
    for (int64_t i = 0; i < n; ++i) CHECK(y[size_t(i)] == t[codes[size_t(i)]] * absmax[size_t(i / bs)]);
}

TEST_CASE(double_quantization) {
    std::mt19937_64 rng(3);
    std::uniform_real_distribution<float> u(0.5f, 4.0f);
    const int64_t nb = 1000;  // 4 nested blocks, the last one short
    std::vector<float> absmax(static_cast<size_t>(nb));
    for (float &v : absmax) v = u(rng);
    const std::vector<float> dyn = table("dynamic");
    std::vector<uint8_t> q(static_cast<size_t>(nb));
    std::vector<float> nested(size_t(nf4_num_blocks(nb, NF4_DQ_BLOCKSIZE)));
    float offset = 0;
    CHECK(nf4_double_quantize(absmax.data(), nb, dyn.data(), q.data(), nested.data(), &offset) == NF4_OK);
    CHECK(nested.size() == 4);
    double mean = 0;
    for (float v : absmax) mean += v;
    const float expect = float(mean / double(nb));  // the double-precision mean, rounded once (to 1 ulp)
    CHECK(std::fabs(offset - expect) <= std::nextafter(expect, 1e30f) - expect);
    std::vector<float> back(static_cast<size_t>(nb));
    CHECK(nf4_double_dequantize(q.data(), nested.data(), offset, nb, dyn.data(), back.data()) == NF4_OK);
    // The error on each scale is at most half the widest gap of the dynamic map
    // (near +-1: 1/64 of the range) times the nested absmax.
    for (int64_t i = 0; i < nb; ++i) {
        const float bound = 0.5f * (1.0f / 64 * 0.9f + 1e-6f) * nested[size_t(i / 256)] + 1e-6f;
        CHECK_MSG(std::fabs(back[size_t(i)] - absmax[size_t(i)]) <= bound, "scale %lld: %g vs %g", (long long)i,
                  back[size_t(i)], absmax[size_t(i)]);
    }
    // bits per parameter at blocksize 64: 4 + 8/64 + 32/(64*256)
    CHECK(std::fabs(4.0 + 8.0 / 64 + 32.0 / (64 * 256) - 4.127) < 1e-3);
}

TEST_CASE(bad_arguments_are_rejected_with_messages) {
    const std::vector<float> t = table("nf4");
    float x[4] = {1, 2, 3, 4};
    uint8_t p[4];  // 4 codes for the 8-bit call below (2 packed bytes for 4-bit)
    float am[1];
    CHECK(nf4_quantize_4bit(x, NF4_FLOAT32, 4, 48, t.data(), p, am) == NF4_ERROR_INVALID_ARGUMENT);
    CHECK(std::strstr(nf4_last_error(), "power of two") != nullptr);
    CHECK(nf4_quantize_4bit(x, NF4_FLOAT32, 4, 8192, t.data(), p, am) == NF4_ERROR_INVALID_ARGUMENT);
    CHECK(nf4_quantize_4bit(x, NF4_FLOAT32, 0, 64, t.data(), p, am) == NF4_ERROR_INVALID_ARGUMENT);
    CHECK(nf4_quantize_4bit(x, nf4_dtype(7), 4, 64, t.data(), p, am) == NF4_ERROR_INVALID_ARGUMENT);
    CHECK(nf4_quantize_4bit(nullptr, NF4_FLOAT32, 4, 64, t.data(), p, am) == NF4_ERROR_INVALID_ARGUMENT);
    float bad_table[16];
    std::memcpy(bad_table, t.data(), sizeof bad_table);
    bad_table[3] = NAN;
    CHECK(nf4_quantize_4bit(x, NF4_FLOAT32, 4, 64, bad_table, p, am) == NF4_ERROR_INVALID_ARGUMENT);
    x[2] = NAN;
    CHECK(nf4_quantize_4bit(x, NF4_FLOAT32, 4, 64, t.data(), p, am) == NF4_ERROR_NON_FINITE);
    CHECK(std::strstr(nf4_last_error(), "nan") != nullptr);
    CHECK(std::strstr(nf4_last_error(), "flat index 2") != nullptr);
    x[2] = -INFINITY;
    CHECK(nf4_quantize_8bit(x, NF4_FLOAT32, 4, 64, table("dynamic").data(), p, am) == NF4_ERROR_NON_FINITE);
    CHECK(std::strstr(nf4_last_error(), "-inf") != nullptr);
    // success clears the message
    x[2] = 0;
    CHECK(nf4_quantize_4bit(x, NF4_FLOAT32, 4, 64, t.data(), p, am) == NF4_OK);
    CHECK(nf4_last_error()[0] == '\0');
}

TEST_CASE(sixty_four_bit_size_arithmetic) {
    const int64_t big = (int64_t(1) << 33) + 5;
    CHECK(nf4_num_blocks(big, 64) == (big + 63) / 64);
    CHECK(nf4_packed_size_4bit(big) == (big + 1) / 2);
    CHECK(nf4_num_blocks(-1, 64) == -1);
}

int main() { return check::run_all(); }
