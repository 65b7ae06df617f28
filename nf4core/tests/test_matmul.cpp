// 4-bit products against a double-precision dequantize-then-multiply, on every
// available ISA path and thread count.
#include <cmath>
#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

#include "check.hpp"
#include "nf4core/nf4core.h"

TEST_CASE(matmul_matches_double_reference) {
    std::mt19937_64 rng(9);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    float cb[16];
    nf4_codebook_normal(4, cb);
    struct Shape { int64_t M, N, K, bs; };
    for (const Shape s : {Shape{1, 64, 128, 64}, Shape{3, 33, 4096, 64}, Shape{9, 17, 200, 64}, Shape{8, 40, 96, 32}}) {
        std::vector<float> w(size_t(s.N * s.K)), x(size_t(s.M * std::max(s.N, s.K)));
        for (float &v : w) v = normal(rng);
        for (float &v : x) v = normal(rng);
        std::vector<uint8_t> packed(size_t(nf4_packed_size_4bit(s.N * s.K)));
        std::vector<float> scales(size_t(nf4_num_blocks(s.N * s.K, s.bs)));
        CHECK(nf4_quantize_4bit(w.data(), NF4_FLOAT32, s.N * s.K, s.bs, cb, packed.data(), scales.data()) == NF4_OK);
        std::vector<float> wd(w.size());
        nf4_dequantize_4bit(packed.data(), scales.data(), s.N * s.K, s.bs, cb, wd.data(), NF4_FLOAT32);
        for (int transpose : {1, 0}) {
            const int64_t inner = transpose ? s.K : s.N, outer = transpose ? s.N : s.K;
            std::vector<double> want(size_t(s.M * outer), 0.0);
            double scale = 0;
            for (int64_t m = 0; m < s.M; ++m)
                for (int64_t o = 0; o < outer; ++o) {
                    double acc = 0;
                    for (int64_t i = 0; i < inner; ++i)
                        acc += double(x[size_t(m * inner + i)]) *
                               double(transpose ? wd[size_t(o * s.K + i)] : wd[size_t(i * s.K + o)]);
                    want[size_t(m * outer + o)] = acc;
                    scale = std::max(scale, std::fabs(acc));
                }
            for (const char *isa : {"scalar", "avx2", "avx512", "neon"}) {
                if (!nf4_isa_available(isa)) continue;
                nf4_set_isa(isa);
                for (int threads : {1, 2}) {
                    nf4_set_num_threads(threads);
                    std::vector<float> y(size_t(s.M * outer), NAN);
                    CHECK(nf4_matmul_4bit(x.data(), NF4_FLOAT32, s.M, s.N, s.K, packed.data(), scales.data(), s.bs, cb,
                                          transpose, y.data()) == NF4_OK);
                    double err = 0;
                    for (size_t i = 0; i < y.size(); ++i) err = std::max(err, std::fabs(double(y[i]) - want[i]));
                    CHECK_MSG(err <= 1e-5 * scale, "%s M=%lld N=%lld K=%lld transpose=%d: error %g of %g", isa,
                              (long long)s.M, (long long)s.N, (long long)s.K, transpose, err, scale);
                }
            }
        }
    }
    nf4_set_isa("auto");
    nf4_set_num_threads(0);
    float cbx[16], y[4];
    uint8_t p[8];
    float sc[1] = {1.0f}, xx[16] = {0};
    nf4_codebook_normal(4, cbx);
    CHECK(nf4_matmul_4bit(xx, NF4_FLOAT16, 1, 1, 16, p, sc, 32, cbx, 1, y) == NF4_ERROR_INVALID_ARGUMENT);
    CHECK(nf4_matmul_4bit(xx, NF4_FLOAT32, 0, 1, 16, p, sc, 32, cbx, 1, y) == NF4_ERROR_INVALID_ARGUMENT);
}

int main() { return check::run_all(); }
