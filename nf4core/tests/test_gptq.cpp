// Calibrated 4-bit rounding (gptq.h) through the C API: a diagonal factor is
// round-to-nearest byte for byte; the float32 kernel gives the same bytes on
// every ISA path and thread count, agrees with the float64 _ref twin on almost
// every code and lowers the output error on correlated inputs; bad arguments
// get the documented status. (The exact NumPy transcriptions of both kernels
// are in tests/test_gptq.py.)
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "check.hpp"
#include "nf4core/nf4core.h"

namespace {

std::vector<float> nf4_table() {
    int64_t n = 0;
    nf4_codebook_by_name("nf4", nullptr, 0, &n);
    std::vector<float> t(static_cast<size_t>(n));
    nf4_codebook_by_name("nf4", t.data(), n, &n);
    return t;
}

struct Out {
    std::vector<uint8_t> packed;
    std::vector<float> absmax;
    Out(int64_t n, int64_t bs) : packed(size_t((n + 1) / 2)), absmax(size_t((n + bs - 1) / bs)) {}
    bool operator==(const Out &o) const { return packed == o.packed && absmax == o.absmax; }
};

// Inputs X (tokens x k) with correlated columns, and the upper Cholesky factor U
// of (X^T X + 1% mean diag I)^-1 in float64 (Gauss-Jordan inverse, then Cholesky).
std::vector<double> factor_of_correlated_inputs(int64_t k, int64_t tokens, std::mt19937 &gen,
                                                std::vector<double> &x) {
    std::normal_distribution<double> nd;
    std::vector<double> mix(static_cast<size_t>(k * k));
    for (auto &v : mix) v = nd(gen) / std::sqrt(double(k));
    x.assign(size_t(tokens * k), 0.0);
    for (int64_t t = 0; t < tokens; ++t) {
        std::vector<double> z(static_cast<size_t>(k));
        for (auto &v : z) v = nd(gen);
        for (int64_t i = 0; i < k; ++i) {
            double s = 0.1 * z[size_t(i)];
            for (int64_t j = 0; j < k; ++j) s += 0.9 * z[size_t(j)] * mix[size_t(j * k + i)];
            x[size_t(t * k + i)] = s;
        }
    }
    std::vector<double> h(static_cast<size_t>(k * k), 0.0);
    for (int64_t t = 0; t < tokens; ++t)
        for (int64_t i = 0; i < k; ++i)
            for (int64_t j = 0; j < k; ++j) h[size_t(i * k + j)] += x[size_t(t * k + i)] * x[size_t(t * k + j)];
    double mean = 0;
    for (int64_t i = 0; i < k; ++i) mean += h[size_t(i * k + i)] / double(k);
    for (int64_t i = 0; i < k; ++i) h[size_t(i * k + i)] += 0.01 * mean;
    // inverse (symmetric positive definite: no pivoting needed)
    std::vector<double> a = h, inv(static_cast<size_t>(k * k), 0.0);
    for (int64_t i = 0; i < k; ++i) inv[size_t(i * k + i)] = 1.0;
    for (int64_t c = 0; c < k; ++c) {
        const double p = a[size_t(c * k + c)];
        for (int64_t j = 0; j < k; ++j) a[size_t(c * k + j)] /= p, inv[size_t(c * k + j)] /= p;
        for (int64_t r = 0; r < k; ++r) {
            if (r == c) continue;
            const double f = a[size_t(r * k + c)];
            for (int64_t j = 0; j < k; ++j) {
                a[size_t(r * k + j)] -= f * a[size_t(c * k + j)];
                inv[size_t(r * k + j)] -= f * inv[size_t(c * k + j)];
            }
        }
    }
    // upper U with U^T U = inv: U[i][j] = (inv[i][j] - sum_{m<i} U[m][i] U[m][j]) / U[i][i]
    std::vector<double> u(static_cast<size_t>(k * k), 0.0);
    for (int64_t i = 0; i < k; ++i)
        for (int64_t j = i; j < k; ++j) {
            double s = inv[size_t(i * k + j)];
            for (int64_t m = 0; m < i; ++m) s -= u[size_t(m * k + i)] * u[size_t(m * k + j)];
            u[size_t(i * k + j)] = i == j ? std::sqrt(s) : s / u[size_t(i * k + i)];
        }
    return u;
}

double output_error(const std::vector<double> &x, int64_t tokens, const std::vector<float> &w, int64_t rows,
                    int64_t k, const Out &q, int64_t bs) {
    std::vector<float> deq(static_cast<size_t>(rows * k));
    nf4_dequantize_4bit(q.packed.data(), q.absmax.data(), rows * k, bs, nf4_table().data(), deq.data(),
                        NF4_FLOAT32);
    double total = 0;
    for (int64_t t = 0; t < tokens; ++t)
        for (int64_t r = 0; r < rows; ++r) {
            double s = 0;
            for (int64_t i = 0; i < k; ++i)
                s += x[size_t(t * k + i)] * (double(w[size_t(r * k + i)]) - double(deq[size_t(r * k + i)]));
            total += s * s;
        }
    return std::sqrt(total);
}

const char *kIsas[] = {"scalar", "avx2", "avx512", "neon"};

}  // namespace

TEST_CASE(diagonal_factor_is_round_to_nearest) {
    const auto nf4 = nf4_table();
    std::mt19937 gen(1);
    std::normal_distribution<float> nd;
    for (int64_t bs : {32, 64, 128}) {
        const int64_t rows = 37, k = 200, n = rows * k;  // blocks span rows; a short tail block
        std::vector<float> w(static_cast<size_t>(n)), u(size_t(k * k), 0.0f);
        std::vector<double> w64(static_cast<size_t>(n)), u64(size_t(k * k), 0.0);
        for (int64_t i = 0; i < n; ++i) w64[size_t(i)] = w[size_t(i)] = nd(gen);
        for (int64_t i = 0; i < k; ++i) u64[size_t(i * k + i)] = u[size_t(i * k + i)] = 0.5f + float(i % 7);
        Out rtn(n, bs), q(n, bs), r(n, bs);
        CHECK(nf4_quantize_4bit(w.data(), NF4_FLOAT32, n, bs, nf4.data(), rtn.packed.data(), rtn.absmax.data()) ==
              NF4_OK);
        for (const char *isa : kIsas) {
            if (!nf4_isa_available(isa)) continue;
            nf4_set_isa(isa);
            CHECK(nf4_gptq_quantize_4bit(w.data(), rows, k, u.data(), nullptr, bs, nf4.data(), q.packed.data(),
                                         q.absmax.data()) == NF4_OK);
            CHECK_MSG(q == rtn, "isa %s blocksize %lld", isa, (long long)bs);
        }
        nf4_set_isa("auto");
        CHECK(nf4_gptq_quantize_4bit_ref(w64.data(), rows, k, u64.data(), nullptr, bs, nf4.data(), r.packed.data(),
                                         r.absmax.data()) == NF4_OK);
        CHECK(r == rtn);
    }
}

TEST_CASE(every_path_and_thread_count_gives_the_same_bytes_and_lowers_the_output_error) {
    const auto nf4 = nf4_table();
    std::mt19937 gen(2);
    const int64_t k = 300, rows = 70, tokens = 600, bs = 64, n = rows * k;  // k > NF4_GPTQ_BATCH: lazy updates
    std::vector<double> x;
    const auto u64 = factor_of_correlated_inputs(k, tokens, gen, x);
    std::vector<float> u(u64.begin(), u64.end()), w(static_cast<size_t>(n));
    std::vector<double> w64(static_cast<size_t>(n));
    std::normal_distribution<float> nd(0.0f, 0.02f);
    for (int64_t i = 0; i < n; ++i) w64[size_t(i)] = w[size_t(i)] = nd(gen);
    std::vector<int64_t> order(static_cast<size_t>(k));
    for (int64_t i = 0; i < k; ++i) order[size_t(i)] = (i * 7) % k;  // a permutation (gcd(7, 300) = 1)
    for (const int64_t *ord : {static_cast<const int64_t *>(nullptr), static_cast<const int64_t *>(order.data())}) {
        Out first(n, bs);
        bool have_first = false;
        for (const char *isa : kIsas) {
            if (!nf4_isa_available(isa)) continue;
            nf4_set_isa(isa);
            for (int threads : {1, 2, 3}) {
                nf4_set_num_threads(threads);
                Out q(n, bs);
                CHECK(nf4_gptq_quantize_4bit(w.data(), rows, k, u.data(), ord, bs, nf4.data(), q.packed.data(),
                                             q.absmax.data()) == NF4_OK);
                if (!have_first) first = q, have_first = true;
                CHECK_MSG(q == first, "isa %s, %d threads", isa, threads);
            }
        }
        nf4_set_isa("auto");
        nf4_set_num_threads(0);
        if (ord != nullptr) continue;  // the factor is for the natural order: only the bytes are compared then
        Out r(n, bs), rtn(n, bs);
        CHECK(nf4_gptq_quantize_4bit_ref(w64.data(), rows, k, u64.data(), nullptr, bs, nf4.data(), r.packed.data(),
                                         r.absmax.data()) == NF4_OK);
        int64_t same = 0;
        for (int64_t i = 0; i < n; ++i) {
            const int shift = (i & 1) ? 0 : 4;
            same += ((first.packed[size_t(i / 2)] >> shift) & 15) == ((r.packed[size_t(i / 2)] >> shift) & 15);
        }
        CHECK_MSG(same > n * 97 / 100, "%lld of %lld codes agree with float64", (long long)same, (long long)n);
        nf4_quantize_4bit(w.data(), NF4_FLOAT32, n, bs, nf4.data(), rtn.packed.data(), rtn.absmax.data());
        const double e_rtn = output_error(x, tokens, w, rows, k, rtn, bs);
        const double e_cal = output_error(x, tokens, w, rows, k, first, bs);
        CHECK_MSG(e_cal < 0.85 * e_rtn, "output error %g vs round-to-nearest %g", e_cal, e_rtn);
    }
}

TEST_CASE(bad_arguments_get_the_documented_status) {
    const auto nf4 = nf4_table();
    const int64_t rows = 2, k = 32, n = rows * k;
    std::vector<float> w(static_cast<size_t>(n), 0.5f), u(size_t(k * k), 0.0f);
    for (int64_t i = 0; i < k; ++i) u[size_t(i * k + i)] = 1.0f;
    Out q(n, 32);
    auto call = [&](const float *pw, const float *pu, const int64_t *ord, int64_t bs) {
        return nf4_gptq_quantize_4bit(pw, rows, k, pu, ord, bs, nf4.data(), q.packed.data(), q.absmax.data());
    };
    CHECK(call(w.data(), u.data(), nullptr, 32) == NF4_OK);
    CHECK(call(nullptr, u.data(), nullptr, 32) == NF4_ERROR_INVALID_ARGUMENT);
    CHECK(call(w.data(), nullptr, nullptr, 32) == NF4_ERROR_INVALID_ARGUMENT);
    CHECK(call(w.data(), u.data(), nullptr, 48) == NF4_ERROR_INVALID_ARGUMENT);
    CHECK(nf4_gptq_quantize_4bit(w.data(), 0, k, u.data(), nullptr, 32, nf4.data(), q.packed.data(),
                                 q.absmax.data()) == NF4_ERROR_INVALID_ARGUMENT);
    std::vector<int64_t> order(static_cast<size_t>(k));
    for (int64_t i = 0; i < k; ++i) order[size_t(i)] = i;
    order[5] = 4;  // not a permutation
    CHECK(call(w.data(), u.data(), order.data(), 32) == NF4_ERROR_INVALID_ARGUMENT);
    order[5] = k;  // out of range
    CHECK(call(w.data(), u.data(), order.data(), 32) == NF4_ERROR_INVALID_ARGUMENT);
    auto bad_u = u;
    bad_u[size_t(3 * k + 3)] = 0.0f;  // not a Cholesky factor
    CHECK(call(w.data(), bad_u.data(), nullptr, 32) == NF4_ERROR_INVALID_ARGUMENT);
    bad_u = u;
    bad_u[size_t(3 * k + 9)] = NAN;  // upper triangle must be finite
    CHECK(call(w.data(), bad_u.data(), nullptr, 32) == NF4_ERROR_NON_FINITE);
    bad_u[size_t(3 * k + 9)] = 0.0f;
    bad_u[size_t(9 * k + 3)] = NAN;  // the lower triangle is not read
    CHECK(call(w.data(), bad_u.data(), nullptr, 32) == NF4_OK);
    auto bad_w = w;
    bad_w[7] = INFINITY;
    CHECK(call(bad_w.data(), u.data(), nullptr, 32) == NF4_ERROR_NON_FINITE);
    // an OUT buffer overlapping an input
    CHECK(nf4_gptq_quantize_4bit(w.data(), rows, k, u.data(), nullptr, 32, nf4.data(),
                                 reinterpret_cast<uint8_t *>(u.data()), q.absmax.data()) ==
          NF4_ERROR_INVALID_ARGUMENT);
}

int main() { return check::run_all(); }
