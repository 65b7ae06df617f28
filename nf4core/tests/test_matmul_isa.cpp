// The matmul and tile-decode kernels of every ISA path in this build (AVX2,
// AVX-512, NEON: the cross build runs this under qemu-aarch64) against the
// scalar reference: products against a float64 dequantize-then-multiply for
// M = 1..8 (the streaming kernels) and more (the panels), both orientations, float32 and
// bfloat16, K that is and is not a multiple of the blocksize (the fallback);
// tiles bit-identical to the reference dequantize, non-finite scales included.
// bfloat16 x with 5+ rows runs on AMX where it is in use; its oracle multiplies
// by the weights rounded to bfloat16, as the AMX product does (matmul.h).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "check.hpp"
#include "nf4core/nf4core.h"
#include "numeric.hpp"

namespace {

const char *const kIsas[] = {"scalar", "avx2", "avx512", "neon"};

struct Quantized {
    int64_t N, K, bs;
    std::vector<uint8_t> packed;
    std::vector<float> scales;
    std::vector<float> w;   // dequantized (reference kernel), float32
    std::vector<float> wb;  // the same rounded to bfloat16: what AMX products multiply by
};

Quantized make(std::mt19937_64 &rng, int64_t N, int64_t K, int64_t bs, const float *cb) {
    std::normal_distribution<float> normal(0.0f, 1.0f);
    Quantized q{N, K, bs, {}, {}, {}, {}};
    std::vector<float> w(size_t(N * K));
    for (float &v : w) v = normal(rng);
    q.packed.resize(size_t(nf4_packed_size_4bit(N * K)));
    q.scales.resize(size_t(nf4_num_blocks(N * K, bs)));
    CHECK(nf4_quantize_4bit_ref(w.data(), NF4_FLOAT32, N * K, bs, cb, q.packed.data(), q.scales.data()) == NF4_OK);
    q.w.resize(w.size());
    CHECK(nf4_dequantize_4bit_ref(q.packed.data(), q.scales.data(), N * K, bs, cb, q.w.data(), NF4_FLOAT32) ==
          NF4_OK);
    std::vector<uint16_t> b(w.size());
    CHECK(nf4_dequantize_4bit_ref(q.packed.data(), q.scales.data(), N * K, bs, cb, b.data(), NF4_BFLOAT16) ==
          NF4_OK);
    q.wb.resize(w.size());
    for (size_t i = 0; i < b.size(); ++i) q.wb[i] = nf4core::to_float(nf4core::bfloat16_t{b[i]});
    return q;
}

}  // namespace

TEST_CASE(every_isa_matmul_matches_double_reference) {
    std::mt19937_64 rng(17);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    float nf4[16], fp4[16];
    nf4_codebook_normal(4, nf4);
    nf4_codebook_fp4(fp4);
    struct Shape { int64_t N, K, bs; };
    // odd N (tails of the P-row groups of W); K a multiple of 16 and of the
    // blocksize (fast kernels) or not (the reference runs); 300 x 288: several
    // panels of 128 columns, a short last strip and a short last inner chunk
    const Shape shapes[] = {{37, 256, 64}, {5, 96, 32},  {19, 4096, 4096}, {11, 384, 128},
                            {9, 200, 64},  {7, 48, 32}, {300, 288, 32}};
    int tested = 0;
    for (const Shape s : shapes) {
        const Quantized q = make(rng, s.N, s.K, s.bs, (s.N & 2) ? fp4 : nf4);
        // 16, 50, 70: float32 x on the panel kernels (x86: AVX2 from 16 / 8 rows, AVX-512 from 32 / 32, on AMD 64 / 48)
        for (int64_t M : {1, 2, 3, 4, 5, 6, 7, 8, 11, 16, 50, 70}) {
            for (int transpose : {1, 0}) {
                const int64_t inner = transpose ? s.K : s.N, outer = transpose ? s.N : s.K;
                std::vector<float> x(size_t(M * inner));
                for (float &v : x) v = normal(rng);
                std::vector<uint16_t> xb(x.size());  // bfloat16 x, and x rounded to it for the oracle
                std::vector<float> xr(x.size());
                for (size_t i = 0; i < x.size(); ++i) {
                    xb[i] = nf4core::to_bfloat16(x[i]).bits;
                    xr[i] = nf4core::to_float(nf4core::bfloat16_t{xb[i]});
                }
                for (int variant : {0, 1, 2}) {  // float32 x; bfloat16 x; bfloat16 x, weights rounded (AMX)
                    const int bf16 = variant > 0;
                    const std::vector<float> &xv = bf16 ? xr : x;
                    const std::vector<float> &wq = variant == 2 ? q.wb : q.w;
                    std::vector<double> want(size_t(M * outer)), bound(size_t(M * outer));
                    double scale = 0;
                    for (int64_t m = 0; m < M; ++m)
                        for (int64_t o = 0; o < outer; ++o) {
                            double acc = 0, mag = 0;
                            for (int64_t i = 0; i < inner; ++i) {
                                const double wv = transpose ? wq[size_t(o * s.K + i)] : wq[size_t(i * s.K + o)];
                                const double p = double(xv[size_t(m * inner + i)]) * wv;
                                acc += p;
                                mag += std::fabs(p);
                            }
                            want[size_t(m * outer + o)] = acc;
                            // worst case of float32 sums of `inner` terms (any order), plus the output rounding
                            bound[size_t(m * outer + o)] =
                                double(inner + 1) * 0x1p-24 * mag + std::fabs(acc) * (bf16 ? 0x1p-8 : 0x1p-24);
                            scale = std::max(scale, std::fabs(acc));
                        }
                    for (const char *isa : kIsas) {
                        if (!nf4_isa_available(isa)) continue;
                        CHECK(nf4_set_isa(isa) == NF4_OK);
                        // bfloat16 x with 5+ rows and K % 32 == 0 runs on AMX where it is in use (matmul.h)
                        const bool amx = bf16 && M >= 5 && s.K % 32 == 0 && nf4_get_amx();
                        if ((variant == 2) != amx) continue;
                        for (int threads : {1, 2}) {
                            nf4_set_num_threads(threads);
                            std::vector<double> got(want.size());
                            if (bf16) {
                                std::vector<uint16_t> y(want.size(), 0xFFFF);
                                CHECK(nf4_matmul_4bit(xb.data(), NF4_BFLOAT16, M, s.N, s.K, q.packed.data(),
                                                      q.scales.data(), s.bs, (s.N & 2) ? fp4 : nf4, transpose,
                                                      y.data()) == NF4_OK);
                                for (size_t i = 0; i < y.size(); ++i)
                                    got[i] = nf4core::to_float(nf4core::bfloat16_t{y[i]});
                            } else {
                                std::vector<float> y(want.size(), NAN);
                                CHECK(nf4_matmul_4bit(x.data(), NF4_FLOAT32, M, s.N, s.K, q.packed.data(),
                                                      q.scales.data(), s.bs, (s.N & 2) ? fp4 : nf4, transpose,
                                                      y.data()) == NF4_OK);
                                for (size_t i = 0; i < y.size(); ++i) got[i] = y[i];
                            }
                            double err = 0;
                            bool within = true;
                            for (size_t i = 0; i < got.size(); ++i) {
                                const double e = std::fabs(got[i] - want[i]);  // NaN fails both checks
                                within = within && e <= bound[i];
                                err = std::max(err, e);
                                if (!(e == e)) err = INFINITY;
                            }
                            CHECK_MSG(within && err <= (bf16 ? 8e-3 : 2e-6 * std::sqrt(double(inner))) * scale,
                                      "%s threads=%d M=%lld N=%lld K=%lld bs=%lld transpose=%d bf16=%d amx=%d: "
                                      "error %g of %g", isa, threads, (long long)M, (long long)s.N, (long long)s.K,
                                      (long long)s.bs, transpose, bf16, int(amx), err, scale);
                            ++tested;
                        }
                    }
                }
            }
        }
    }
    CHECK(tested > 0);
    nf4_set_isa("auto");
    nf4_set_num_threads(0);
}

TEST_CASE(every_isa_decode_tile_bit_identical) {
    std::mt19937_64 rng(23);
    float nf4[16], fp4[16];
    nf4_codebook_normal(4, nf4);
    nf4_codebook_fp4(fp4);
    struct Shape { int64_t N, K, bs; };
    const Shape shapes[] = {{13, 4096, 64}, {21, 200, 32}, {30, 96, 64}, {9, 1000, 128}, {3, 4100, 4096}};
    for (const Shape s : shapes) {
        const float *cb = (s.K & 8) ? fp4 : nf4;
        Quantized q = make(rng, s.N, s.K, s.bs, cb);
        // non-finite block scales (data with inf/NaN): the tile must still equal the reference bit for bit
        if (q.scales.size() > 2) {
            q.scales[1] = NAN;
            q.scales[2] = INFINITY;
        }
        std::vector<float> full32(size_t(s.N * s.K));
        std::vector<uint16_t> full16(full32.size());
        CHECK(nf4_dequantize_4bit_ref(q.packed.data(), q.scales.data(), s.N * s.K, s.bs, cb, full32.data(),
                                      NF4_FLOAT32) == NF4_OK);
        CHECK(nf4_dequantize_4bit_ref(q.packed.data(), q.scales.data(), s.N * s.K, s.bs, cb, full16.data(),
                                      NF4_BFLOAT16) == NF4_OK);
        for (int rep = 0; rep < 8; ++rep) {
            int64_t n0 = int64_t(rng() % uint64_t(s.N)), k0 = int64_t(rng() % uint64_t(s.K));
            int64_t n1 = n0 + 1 + int64_t(rng() % uint64_t(s.N - n0));
            int64_t k1 = k0 + 1 + int64_t(rng() % uint64_t(s.K - k0));
            if (rep == 0) n0 = 0, k0 = 0, n1 = s.N, k1 = s.K;  // the whole matrix
            const int64_t h = n1 - n0, wd = k1 - k0;
            for (const char *isa : kIsas) {
                if (!nf4_isa_available(isa)) continue;
                CHECK(nf4_set_isa(isa) == NF4_OK);
                std::vector<uint32_t> t32(size_t(h * wd), 0xDEADBEEFu);
                std::vector<uint16_t> t16(size_t(h * wd), 0xDEADu);
                CHECK(nf4_matmul_4bit_decode_tile(q.packed.data(), q.scales.data(), s.bs, cb, s.N, s.K, n0, n1, k0,
                                                  k1, NF4_FLOAT32, t32.data()) == NF4_OK);
                CHECK(nf4_matmul_4bit_decode_tile(q.packed.data(), q.scales.data(), s.bs, cb, s.N, s.K, n0, n1, k0,
                                                  k1, NF4_BFLOAT16, t16.data()) == NF4_OK);
                int64_t bad32 = 0, bad16 = 0;
                for (int64_t n = n0; n < n1; ++n)
                    for (int64_t k = k0; k < k1; ++k) {
                        const size_t i = size_t((n - n0) * wd + (k - k0)), j = size_t(n * s.K + k);
                        uint32_t ref32;
                        std::memcpy(&ref32, &full32[j], 4);
                        bad32 += t32[i] != ref32;
                        bad16 += t16[i] != full16[j];
                    }
                CHECK_MSG(bad32 == 0 && bad16 == 0,
                          "%s N=%lld K=%lld bs=%lld tile [%lld:%lld, %lld:%lld]: %lld float32 and %lld bfloat16 "
                          "values differ", isa, (long long)s.N, (long long)s.K, (long long)s.bs, (long long)n0,
                          (long long)n1, (long long)k0, (long long)k1, (long long)bad32, (long long)bad16);
            }
        }
    }
    nf4_set_isa("auto");
}

// AMX products over every tail: M across tile (16), pair (32) and packing
// (1024) boundaries, N and K across panel and chunk (64 steps of 32) ones, K
// not a multiple of the blocksize; against float64 with the bfloat16-rounded
// weights. (Also the case to run under -Db_sanitize=address.)
TEST_CASE(amx_products_every_tail) {
    if (!nf4_get_amx()) return;  // amx_where_the_cpu_has_it checks that this is right
    std::mt19937_64 rng(29);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    float nf4[16];
    nf4_codebook_normal(4, nf4);
    struct Shape { int64_t M, N, K, bs; };
    const Shape shapes[] = {{5, 1, 32, 32}, {17, 33, 96, 64}, {33, 100, 160, 128}, {1025, 40, 256, 256},
                            {47, 70, 4128, 64}, {20, 2100, 96, 32}, {64, 300, 2080, 32}};
    for (const Shape s : shapes) {
        const Quantized q = make(rng, s.N, s.K, s.bs, nf4);
        for (int transpose : {1, 0}) {
            const int64_t inner = transpose ? s.K : s.N, outer = transpose ? s.N : s.K;
            std::vector<uint16_t> xb(size_t(s.M * inner));
            for (uint16_t &v : xb) v = nf4core::to_bfloat16(normal(rng)).bits;
            std::vector<uint16_t> y(size_t(s.M * outer), 0xFFFF);
            nf4_set_num_threads(3);
            CHECK(nf4_matmul_4bit(xb.data(), NF4_BFLOAT16, s.M, s.N, s.K, q.packed.data(), q.scales.data(), s.bs,
                                  nf4, transpose, y.data()) == NF4_OK);
            int64_t bad = 0;
            for (int64_t m = 0; m < s.M; ++m)
                for (int64_t o = 0; o < outer; ++o) {
                    double acc = 0, mag = 0;
                    for (int64_t i = 0; i < inner; ++i) {
                        const double wv = transpose ? q.wb[size_t(o * s.K + i)] : q.wb[size_t(i * s.K + o)];
                        const double p = double(nf4core::to_float(nf4core::bfloat16_t{xb[size_t(m * inner + i)]})) * wv;
                        acc += p;
                        mag += std::fabs(p);
                    }
                    const double got = nf4core::to_float(nf4core::bfloat16_t{y[size_t(m * outer + o)]});
                    const double bound = double(inner + 1) * 0x1p-24 * mag + std::fabs(acc) * 0x1p-8;
                    bad += !(std::fabs(got - acc) <= bound);
                }
            CHECK_MSG(bad == 0, "M=%lld N=%lld K=%lld bs=%lld transpose=%d: %lld outputs outside the bound",
                      (long long)s.M, (long long)s.N, (long long)s.K, (long long)s.bs, transpose, (long long)bad);
        }
    }
    nf4_set_num_threads(0);
}

// AMX: available exactly where the CPU has AMX-BF16 and AMX-TILE (Linux lets a
// process use them on request); in use only with the avx512 path; nf4_set_amx
// switches it, and cannot switch it on where it is unavailable.
TEST_CASE(amx_where_the_cpu_has_it) {
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
    unsigned a = 0, b = 0, c = 0, d = 0;
    __asm__("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
    const bool cpu = ((d >> 22) & 1) && ((d >> 24) & 1);
    CHECK(nf4_amx_available() == (cpu ? 1 : 0));
#endif
    if (!nf4_amx_available()) {
        CHECK(nf4_set_amx(1) == NF4_ERROR_INVALID_ARGUMENT);
        CHECK(nf4_get_amx() == 0);
        return;
    }
    CHECK(nf4_set_isa("avx512") == NF4_OK);
    CHECK(nf4_get_amx() == 1);
    CHECK(nf4_set_amx(0) == NF4_OK);
    CHECK(nf4_get_amx() == 0);
    CHECK(nf4_set_amx(1) == NF4_OK);
    if (nf4_isa_available("avx2")) {
        CHECK(nf4_set_isa("avx2") == NF4_OK);
        CHECK(nf4_get_amx() == 0);
    }
    nf4_set_isa("auto");
}

// The ISA a build should have: the optimized path must be compiled in and
// chosen where the CPU has it (a broken meson.build would silently test only
// the reference).
TEST_CASE(optimized_path_is_available) {
#if defined(__aarch64__)
    CHECK(nf4_isa_available("neon"));
#endif
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        CHECK(nf4_isa_available("avx2"));
#endif
}

int main() { return check::run_all(); }
