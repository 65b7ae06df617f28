// Codebooks: NF-k from the normal distribution, FP4, INT4 and the 8-bit
// dynamic map, each built the way bitsandbytes builds it so that the float32
// tables are identical (bitsandbytes/functional.py: create_normal_map,
// get_4bit_type, create_dynamic_map).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "error.hpp"
#include "nf4core/codebook.h"
#include "sizes.hpp"

namespace nf4core {
namespace {

// Standard normal CDF via erfc, accurate in both tails.
double norm_cdf(double x) { return 0.5 * std::erfc(-x / std::sqrt(2.0)); }

// Inverse normal CDF. Work in the lower tail q = min(p, 1 - p) (1 - p is exact
// for p > 0.5), start from Abramowitz & Stegun 26.2.23 (|error| < 4.5e-4) and
// polish with Halley steps on norm_cdf, which is accurate in relative terms in
// the lower tail; they converge cubically to full double precision (SciPy's
// ndtri accuracy).
double norm_ppf(double p) {
    if (!(p > 0.0 && p < 1.0)) {
        if (p == 0.0) return -HUGE_VAL;
        if (p == 1.0) return HUGE_VAL;
        return std::nan("");
    }
    if (p == 0.5) return 0.0;
    const bool upper = p > 0.5;
    const double q = upper ? 1.0 - p : p;
    const double t = std::sqrt(-2.0 * std::log(q));
    double x = -(t - (2.515517 + 0.802853 * t + 0.010328 * t * t) /
                         (1.0 + 1.432788 * t + 0.189269 * t * t + 0.001308 * t * t * t));
    const double sqrt_2pi = 2.5066282746310002;
    for (int iter = 0; iter < 8; ++iter) {
        const double e = norm_cdf(x) - q;
        const double u = e * sqrt_2pi * std::exp(0.5 * x * x);
        const double step = u / (1.0 + 0.5 * x * u);
        x -= step;
        if (std::fabs(step) <= 1e-17 * std::fabs(x)) break;
    }
    return upper ? -x : x;
}

// torch.linspace(start, end, steps) in float32, reproduced bit for bit: the step
// is computed in float32, the first half counts up from start and the second
// half down from end, each with one rounding (torch's vectorized kernel).
std::vector<float> linspace_f32(float start, float end, int steps) {
    std::vector<float> out(steps);
    if (steps == 1) {
        out[0] = start;
        return out;
    }
    const float step = (end - start) / float(steps - 1);
    const int halfway = steps / 2;
    for (int i = 0; i < steps; ++i) {
        out[i] = i < halfway ? std::fma(step, float(i), start) : std::fma(-step, float(steps - 1 - i), end);
    }
    return out;
}

// SciPy's norm.ppf on a float32 array evaluates ndtri in double and rounds the
// result to float32 (the 'f->f' loop); bitsandbytes feeds it float32 linspace.
float ppf_f32(float p) { return float(norm_ppf(double(p))); }

}  // namespace

double normal_offset(int bits) {
    // QLoRA's offset 0.9677083 is the mean of 1 - 1/(2*15) and 1 - 1/(2*16),
    // the outermost quantiles of a 15- and a 16-level grid, printed to seven
    // decimals. The same rule, with the same rounding, gives every NF-k.
    const double levels = std::ldexp(1.0, bits);
    const double exact = 1.0 - 0.5 * (1.0 / (2.0 * (levels - 1.0)) + 1.0 / (2.0 * levels));
    return std::round(exact * 1e7) / 1e7;
}

std::vector<float> normal_map(int bits) {
    require(bits >= 2 && bits <= 8, "NormalFloat bits must be between 2 and 8, got " + std::to_string(bits));
    const int half = 1 << (bits - 1);
    const float offset = float(normal_offset(bits));
    std::vector<float> v;
    v.reserve(size_t(1) << bits);
    // 2^(k-1) positive quantiles, 2^(k-1) - 1 negative ones, and one exact zero
    // (create_normal_map(offset, use_extra_value=True)).
    const std::vector<float> pos = linspace_f32(offset, 0.5f, half + 1);
    for (int i = 0; i < half; ++i) v.push_back(ppf_f32(pos[i]));
    const std::vector<float> neg = linspace_f32(offset, 0.5f, half);
    for (int i = 0; i < half - 1; ++i) v.push_back(-ppf_f32(neg[i]));
    v.push_back(0.0f);
    std::sort(v.begin(), v.end());
    const float vmax = v.back();
    for (float &x : v) x = x / vmax;  // float32 division, as `values /= values.max()`
    return v;
}

std::vector<float> fp4_map() {
    // bitsandbytes' get_4bit_type("fp4"): bit 3 sign, bits 2..1 exponent, bit 0
    // mantissa, listed in bit-pattern order and divided by the largest value, 12.
    // Code 8 is -0.0: bitsandbytes' CPU and CUDA kernels decode it as
    // lut[code & 7] * -1 (its Python table holds +0 there, see format.md).
    const float raw[16] = {0.0f,  0.0625f,  8.0f,  12.0f,  4.0f,  6.0f,  2.0f,  3.0f,
                           -0.0f, -0.0625f, -8.0f, -12.0f, -4.0f, -6.0f, -2.0f, -3.0f};
    std::vector<float> v(raw, raw + 16);
    for (float &x : v) x = x / 12.0f;
    return v;
}

std::vector<float> int4_map() {
    // bitsandbytes' get_4bit_type("int4"): sign-magnitude, divided by 7; code
    // 8 is -0.0 as in FP4.
    const float raw[16] = {7, 6, 5, 4, 3, 2, 1, 0, -0.0f, -1, -2, -3, -4, -5, -6, -7};
    std::vector<float> v(raw, raw + 16);
    for (float &x : v) x = x / 7.0f;
    return v;
}

std::vector<float> dynamic_map(bool is_signed) {
    // create_dynamic_map(signed, max_exponent_bits=7, total_bits=8): for each
    // exponent i, the means of linearly spaced bins in [0.1, 1] scaled by
    // 10^(i-6). Python computes 10 ** (i - 6) in double and torch multiplies the
    // float32 means by it in float32; additional_items is 0 for these defaults.
    const int max_exponent_bits = 7, non_sign_bits = 7;
    std::vector<float> v;
    for (int i = 0; i < max_exponent_bits; ++i) {
        const int fraction_items = is_signed ? (1 << (i + non_sign_bits - max_exponent_bits)) + 1
                                             : (1 << (i + non_sign_bits - max_exponent_bits + 1)) + 1;
        const std::vector<float> b = linspace_f32(0.1f, 1.0f, fraction_items);
        const float scale = float(std::pow(10.0, double(-(max_exponent_bits - 1) + i)));
        for (int j = 0; j + 1 < fraction_items; ++j) {
            const float mean = (b[j] + b[j + 1]) / 2.0f;
            v.push_back(scale * mean);
        }
        if (is_signed) {
            for (int j = 0; j + 1 < fraction_items; ++j) {
                const float mean = (b[j] + b[j + 1]) / 2.0f;
                v.push_back(-(scale * mean));
            }
        }
    }
    v.push_back(0.0f);
    v.push_back(1.0f);
    while (v.size() < 256) v.push_back(0.0f);
    std::sort(v.begin(), v.end());
    return v;
}

std::vector<float> codebook_by_name(const std::string &name) {
    if (name.size() == 3 && name[0] == 'n' && name[1] == 'f' && name[2] >= '2' && name[2] <= '8')
        return normal_map(name[2] - '0');
    if (name == "fp4") return fp4_map();
    if (name == "int4") return int4_map();
    if (name == "dynamic") return dynamic_map(true);
    if (name == "dynamic_unsigned") return dynamic_map(false);
    fail(NF4_ERROR_INVALID_ARGUMENT, "unknown codebook '" + name +
                                         "': expected one of nf2..nf8, fp4, int4, dynamic, dynamic_unsigned");
}

}  // namespace nf4core

using namespace nf4core;

namespace {
nf4_status copy_out(const std::vector<float> &v, float *out) {
    return guarded([&] {
        require(out != nullptr, "output pointer is NULL");
        std::memcpy(out, v.data(), v.size() * sizeof(float));
    });
}
}  // namespace

extern "C" {

nf4_status nf4_codebook_normal(int32_t bits, float *out) {
    std::vector<float> v;
    const nf4_status st = guarded([&] { v = normal_map(bits); });
    return st != NF4_OK ? st : copy_out(v, out);
}

double nf4_normal_offset(int32_t bits) { return (bits >= 2 && bits <= 8) ? normal_offset(bits) : std::nan(""); }

nf4_status nf4_codebook_fp4(float *out) { return copy_out(fp4_map(), out); }

nf4_status nf4_codebook_int4(float *out) { return copy_out(int4_map(), out); }

nf4_status nf4_codebook_dynamic(int32_t is_signed, float *out) { return copy_out(dynamic_map(is_signed != 0), out); }

nf4_status nf4_codebook_by_name(const char *name, float *out, int64_t capacity, int64_t *n) {
    return guarded([&] {
        require(name != nullptr, "codebook name is NULL");
        require(n != nullptr, "length pointer is NULL");
        const std::vector<float> v = codebook_by_name(name);
        const Buffer bn = buffer("name", name, int64_t(std::strlen(name)) + 1, 1);
        const Buffer blen = buffer("n", n, 1, int64_t(sizeof *n));
        if (out != nullptr)
            require_disjoint({buffer("out", out, int64_t(v.size()), 4), blen}, {bn});
        else
            require_disjoint({blen}, {bn});
        *n = int64_t(v.size());
        if (out != nullptr) {
            require(capacity >= int64_t(v.size()), "codebook '" + std::string(name) + "' has " +
                                                       std::to_string(v.size()) + " entries, capacity is " +
                                                       std::to_string(capacity));
            std::memcpy(out, v.data(), v.size() * sizeof(float));
        }
    });
}

double nf4_norm_ppf(double p) { return norm_ppf(p); }

}  // extern "C"
