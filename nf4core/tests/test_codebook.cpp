// Codebook tests: exact equality with bitsandbytes' published tables and the
// structural properties of every NF-k table.
#include <cmath>
#include <cstring>
#include <vector>

#include "check.hpp"
#include "nf4core/nf4core.h"

// bitsandbytes/functional.py get_4bit_type("nf4"), copied as published.
static const float kBnbNF4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

TEST_CASE(nf4_equals_bitsandbytes_table) {
    float t[16];
    CHECK(nf4_codebook_normal(4, t) == NF4_OK);
    for (int i = 0; i < 16; ++i) CHECK_MSG(t[i] == kBnbNF4[i], "code %d: %.9g vs %.9g", i, t[i], kBnbNF4[i]);
    CHECK(nf4_normal_offset(4) == 0.9677083);
}

TEST_CASE(nf4_thresholds_match_cuda_tree) {
    // csrc/kernels.cu dQuantizeNF4 compares against these midpoints.
    const float mids[15] = {-0.8480964f, -0.6106329f, -0.4599953f, -0.3396794f, -0.2346074f,
                            -0.1379117f, -0.0455250f, 0.0397901f, 0.1202552f, 0.2035213f,
                            0.2920138f, 0.3893125f, 0.5016634f, 0.6427869f, 0.8614784f};
    float t[16];
    nf4_codebook_normal(4, t);
    for (int i = 0; i < 15; ++i) CHECK(std::fabs((t[i] + t[i + 1]) / 2 - mids[i]) < 1e-7f);
}

TEST_CASE(nfk_structure) {
    for (int k = 2; k <= 8; ++k) {
        std::vector<float> t(size_t(1) << k);
        CHECK(nf4_codebook_normal(k, t.data()) == NF4_OK);
        const int n = 1 << k;
        CHECK(t[0] == -1.0f);
        CHECK(t[n - 1] == 1.0f);
        int zeros = 0;
        for (int i = 0; i < n; ++i) zeros += t[i] == 0.0f;
        CHECK_MSG(zeros == 1, "nf%d has %d zeros", k, zeros);
        for (int i = 0; i + 1 < n; ++i) CHECK_MSG(t[i] < t[i + 1], "nf%d not strictly increasing at %d", k, i);
        // 2^(k-1) positives, 2^(k-1)-1 negatives: zero sits at index 2^(k-1)-1
        CHECK(t[(n / 2) - 1] == 0.0f);
    }
    float dummy[512];
    CHECK(nf4_codebook_normal(1, dummy) == NF4_ERROR_INVALID_ARGUMENT);
    CHECK(nf4_codebook_normal(9, dummy) == NF4_ERROR_INVALID_ARGUMENT);
    CHECK(std::strstr(nf4_last_error(), "between 2 and 8") != nullptr);
}

TEST_CASE(fp4_and_int4_tables) {
    const float fp4[16] = {0.0f, 0.0625f / 12, 8.0f / 12, 1.0f, 4.0f / 12, 6.0f / 12, 2.0f / 12, 3.0f / 12,
                           -0.0f, -0.0625f / 12, -8.0f / 12, -1.0f, -4.0f / 12, -6.0f / 12, -2.0f / 12, -3.0f / 12};
    float t[16];
    CHECK(nf4_codebook_fp4(t) == NF4_OK);
    for (int i = 0; i < 16; ++i) CHECK(t[i] == fp4[i]);
    CHECK(t[8] == 0.0f && std::signbit(t[8]));  // sign-magnitude: code 8 is -0
    CHECK(nf4_codebook_int4(t) == NF4_OK);
    for (int i = 0; i < 8; ++i) CHECK(t[i] == float(7 - i) / 7.0f);
    for (int i = 8; i < 16; ++i) CHECK(t[i] == -float(i - 8) / 7.0f);
}

TEST_CASE(dynamic_map_facts) {
    // bitsandbytes create_dynamic_map(): signed min -0.99296874, max 1, zero at
    // index 127, smallest |nonzero| 5.5e-7; unsigned zero at 0, smallest 3.25e-7.
    float s[256], u[256];
    CHECK(nf4_codebook_dynamic(1, s) == NF4_OK);
    CHECK(nf4_codebook_dynamic(0, u) == NF4_OK);
    CHECK(s[127] == 0.0f && s[255] == 1.0f);
    CHECK(std::fabs(s[0] - (-0.99296874f)) < 1e-7f);
    CHECK(std::fabs(s[128] - 5.5e-7f) < 1e-12f && std::fabs(s[126] + 5.5e-7f) < 1e-12f);
    CHECK(u[0] == 0.0f && u[255] == 1.0f);
    CHECK(std::fabs(u[1] - 3.25e-7f) < 1e-12f);
    for (int i = 0; i < 255; ++i) {
        CHECK(s[i] < s[i + 1]);
        CHECK(u[i] < u[i + 1]);
    }
}

TEST_CASE(by_name) {
    int64_t n = 0;
    CHECK(nf4_codebook_by_name("nf4", nullptr, 0, &n) == NF4_OK && n == 16);
    CHECK(nf4_codebook_by_name("nf8", nullptr, 0, &n) == NF4_OK && n == 256);
    CHECK(nf4_codebook_by_name("dynamic_unsigned", nullptr, 0, &n) == NF4_OK && n == 256);
    float t[16];
    CHECK(nf4_codebook_by_name("nf4", t, 16, &n) == NF4_OK && t[15] == 1.0f);
    CHECK(nf4_codebook_by_name("nf8", t, 16, &n) == NF4_ERROR_INVALID_ARGUMENT);
    CHECK(nf4_codebook_by_name("nf9", t, 16, &n) == NF4_ERROR_INVALID_ARGUMENT);
    CHECK(std::strstr(nf4_last_error(), "unknown codebook 'nf9'") != nullptr);
}

TEST_CASE(norm_ppf_accuracy) {
    // closed-form checks: Phi(ppf(p)) == p and a few reference quantiles
    CHECK(nf4_norm_ppf(0.5) == 0.0);
    CHECK(std::fabs(nf4_norm_ppf(0.975) - 1.959963984540054) < 1e-14);
    CHECK(std::fabs(nf4_norm_ppf(0.8413447460685429) - 1.0) < 1e-13);
    CHECK(std::fabs(nf4_norm_ppf(1e-10) - (-6.361340902404056)) < 1e-11);
    for (double p = 0.001; p < 1.0; p += 0.00731) {
        const double x = nf4_norm_ppf(p);
        const double back = 0.5 * std::erfc(-x / std::sqrt(2.0));
        CHECK_MSG(std::fabs(back - p) < 4e-16 + 1e-15 * p, "p=%.17g back=%.17g", p, back);
        CHECK(std::fabs(nf4_norm_ppf(1.0 - p) + x) < 1e-12);
    }
    CHECK(std::isnan(nf4_norm_ppf(-0.1)) && std::isinf(nf4_norm_ppf(1.0)));
}

int main() { return check::run_all(); }
