// The CUDA kernels against the CPU path, byte for byte: every 4-bit codebook
// (NF4, FP4, INT4, NF2/NF3 padded as pyqlora pads them), every blocksize, all
// three dtypes, odd lengths and tails; 8-bit blockwise; double quantization
// (offset bits, codes, nested scales); the fused DQ dequantize; the GEMV
// against the CPU reference (float32 rounding). Skipped (exit 77) without a
// CUDA device. Compiled everywhere CUDA is built; run by
// benchmarks/gpu_check.sh on a GPU machine (passed on an H200, 2026-12-04).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "check.hpp"
#include "nf4_check.hpp"
#include "nf4core/nf4core.h"

namespace {

template <typename T>
struct Dev {
    T *p = nullptr;
    explicit Dev(size_t n) {
        if (cudaMalloc(reinterpret_cast<void **>(&p), n * sizeof(T) + 16) != cudaSuccess) p = nullptr;
    }
    ~Dev() { cudaFree(p); }
    void put(const std::vector<T> &h) { cudaMemcpy(p, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice); }
    std::vector<T> get(size_t n) const {
        std::vector<T> h(n);
        cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost);
        return h;
    }
};

// Sets (or, for "", unsets) an environment variable for one scope: the
// launchers read NF4CORE_CUDA_GEMV_ROWS / NF4CORE_CUDA_KERNELS on every call.
struct Env {
    const char *name;
    Env(const char *n, const char *value) : name(n) {
        if (value[0] != '\0')
            setenv(n, value, 1);
        else
            unsetenv(n);
    }
    ~Env() { unsetenv(name); }
    Env(const Env &) = delete;
    Env &operator=(const Env &) = delete;
};

std::vector<float> table(const char *name) {
    std::vector<float> t(256);
    int64_t n = 0;
    nf4_codebook_by_name(name, t.data(), 256, &n);
    t.resize(static_cast<size_t>(n));
    while (t.size() < 16) t.push_back(t.back());  // nf2/nf3 in 4-bit storage (pyqlora's padding)
    return t;
}

// n values of dtype as raw bytes: normal data with exact zeros, ties and an all-zero block
std::vector<uint8_t> make_input(nf4_dtype dt, int64_t n, std::mt19937_64 &rng) {
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> f(static_cast<size_t>(n));
    for (float &v : f) v = normal(rng);
    for (int64_t i = 0; i < n && i < 64; ++i) f[static_cast<size_t>(i)] = 0.0f;
    for (int64_t i = 64; i < n; i += 97) f[static_cast<size_t>(i)] = 0.5f;
    std::vector<uint8_t> raw(static_cast<size_t>(n * nf4_dtype_size(dt)));
    for (int64_t i = 0; i < n; ++i) {
        if (dt == NF4_FLOAT32) {
            std::memcpy(&raw[static_cast<size_t>(4 * i)], &f[static_cast<size_t>(i)], 4);
        } else {
            uint32_t u;
            std::memcpy(&u, &f[static_cast<size_t>(i)], 4);
            const uint16_t h = dt == NF4_BFLOAT16 ? uint16_t(u >> 16) : uint16_t(0x3C00u ^ (u & 0x83FFu));
            std::memcpy(&raw[static_cast<size_t>(2 * i)], &h, 2);
        }
    }
    return raw;
}

}  // namespace

TEST_CASE(quantize_dequantize_4bit_byte_identical) {
    std::mt19937_64 rng(1);
    for (const char *name : {"nf4", "fp4", "int4", "nf2", "nf3"}) {
        const std::vector<float> cb = table(name);
        for (int64_t bs = 32; bs <= 4096; bs *= 2) {
            for (nf4_dtype dt : {NF4_FLOAT32, NF4_FLOAT16, NF4_BFLOAT16}) {
                for (int64_t n : {int64_t(1), int64_t(31), bs * 3 + 17, bs * 5}) {
                    const std::vector<uint8_t> x = make_input(dt, n, rng);
                    const int64_t nb = nf4_num_blocks(n, bs), np = nf4_packed_size_4bit(n);
                    std::vector<uint8_t> pc(static_cast<size_t>(np));
                    std::vector<float> ac(static_cast<size_t>(nb));
                    CHECK(nf4_quantize_4bit(x.data(), dt, n, bs, cb.data(), pc.data(), ac.data()) == NF4_OK);
                    Dev<uint8_t> dx(x.size()), dp(static_cast<size_t>(np));
                    Dev<float> da(static_cast<size_t>(nb));
                    dx.put(x);
                    CHECK(nf4_cuda_quantize_4bit(dx.p, dt, n, bs, cb.data(), dp.p, da.p, nullptr) == NF4_OK);
                    CHECK_MSG(dp.get(static_cast<size_t>(np)) == pc, "%s bs=%lld dt=%d n=%lld: packed codes differ", name,
                              (long long)bs, int(dt), (long long)n);
                    const std::vector<float> ag = da.get(static_cast<size_t>(nb));
                    CHECK(std::memcmp(ag.data(), ac.data(), static_cast<size_t>(nb) * 4) == 0);
                    // dequantize to every dtype, from the CPU's codes
                    for (nf4_dtype od : {NF4_FLOAT32, NF4_FLOAT16, NF4_BFLOAT16}) {
                        const size_t bytes = static_cast<size_t>(n * nf4_dtype_size(od));
                        std::vector<uint8_t> yc(bytes);
                        nf4_dequantize_4bit(pc.data(), ac.data(), n, bs, cb.data(), yc.data(), od);
                        Dev<uint8_t> dy(bytes);
                        for (const char *kernels : {"", "v1"}) {  // the tiled kernel and the first one
                            Env env("NF4CORE_CUDA_KERNELS", kernels);
                            CHECK(nf4_cuda_dequantize_4bit(dp.p, da.p, n, bs, cb.data(), dy.p, od, nullptr) == NF4_OK);
                            CHECK_MSG(dy.get(bytes) == yc, "%s bs=%lld n=%lld out dtype %d kernels '%s'", name,
                                      (long long)bs, (long long)n, int(od), kernels);
                        }
                    }
                }
            }
        }
    }
}

TEST_CASE(eight_bit_and_double_quantization_byte_identical) {
    std::mt19937_64 rng(2);
    std::vector<float> dyn(256);
    nf4_codebook_dynamic(1, dyn.data());
    for (int64_t bs : {int64_t(32), int64_t(256), int64_t(4096)}) {
        for (int64_t n : {int64_t(5), bs * 7 + 3}) {
            const std::vector<uint8_t> x = make_input(NF4_BFLOAT16, n, rng);
            const int64_t nb = nf4_num_blocks(n, bs);
            std::vector<uint8_t> cc(static_cast<size_t>(n));
            std::vector<float> ac(static_cast<size_t>(nb));
            CHECK(nf4_quantize_8bit(x.data(), NF4_BFLOAT16, n, bs, dyn.data(), cc.data(), ac.data()) == NF4_OK);
            Dev<uint8_t> dx(x.size()), dc(static_cast<size_t>(n));
            Dev<float> da(static_cast<size_t>(nb)), dy(static_cast<size_t>(n));
            dx.put(x);
            CHECK(nf4_cuda_quantize_8bit(dx.p, NF4_BFLOAT16, n, bs, dyn.data(), dc.p, da.p, nullptr) == NF4_OK);
            CHECK(dc.get(static_cast<size_t>(n)) == cc);
            CHECK(da.get(static_cast<size_t>(nb)) == ac);
            for (nf4_dtype od : {NF4_FLOAT32, NF4_BFLOAT16}) {
                for (const char *kernels : {"", "v1"}) {  // the tiled kernel and the first one
                    Env env("NF4CORE_CUDA_KERNELS", kernels);
                    const size_t bytes = static_cast<size_t>(n * nf4_dtype_size(od));
                    std::vector<uint8_t> yc(bytes);
                    nf4_dequantize_8bit(cc.data(), ac.data(), n, bs, dyn.data(), yc.data(), od);
                    CHECK(nf4_cuda_dequantize_8bit(dc.p, da.p, n, bs, dyn.data(), dy.p, od, nullptr) == NF4_OK);
                    std::vector<uint8_t> yg(bytes);
                    cudaMemcpy(yg.data(), dy.p, bytes, cudaMemcpyDeviceToHost);
                    CHECK_MSG(yg == yc, "8-bit bs=%lld n=%lld out dtype %d kernels '%s'", (long long)bs, (long long)n,
                              int(od), kernels);
                }
            }
        }
    }
    // double quantization of many block scales (several nested groups, a tail)
    std::uniform_real_distribution<float> u(0.0f, 3.0f);
    for (int64_t nb : {int64_t(1), int64_t(1000), int64_t(256 * 40 + 7)}) {
        std::vector<float> am(static_cast<size_t>(nb));
        for (float &v : am) v = u(rng);
        const int64_t nn = nf4_num_blocks(nb, 256);
        std::vector<uint8_t> qc(static_cast<size_t>(nb));
        std::vector<float> nc(static_cast<size_t>(nn)), back(static_cast<size_t>(nb));
        float oc = 0, og = 0;
        CHECK(nf4_double_quantize(am.data(), nb, dyn.data(), qc.data(), nc.data(), &oc) == NF4_OK);
        Dev<float> dam(static_cast<size_t>(nb)), dn(static_cast<size_t>(nn)), db(static_cast<size_t>(nb));
        Dev<uint8_t> dq(static_cast<size_t>(nb));
        dam.put(am);
        CHECK(nf4_cuda_double_quantize(dam.p, nb, dyn.data(), dq.p, dn.p, &og, nullptr) == NF4_OK);
        CHECK(std::memcmp(&oc, &og, 4) == 0);
        CHECK(dq.get(static_cast<size_t>(nb)) == qc);
        CHECK(dn.get(static_cast<size_t>(nn)) == nc);
        nf4_double_dequantize(qc.data(), nc.data(), oc, nb, dyn.data(), back.data());
        CHECK(nf4_cuda_double_dequantize(dq.p, dn.p, og, nb, dyn.data(), db.p, nullptr) == NF4_OK);
        CHECK(db.get(static_cast<size_t>(nb)) == back);
        // the fused DQ dequantize equals double_dequantize then dequantize
        const int64_t n = nb * 64;
        std::vector<uint8_t> packed(static_cast<size_t>(n / 2));
        for (uint8_t &b : packed) b = uint8_t(rng());
        const std::vector<float> cb = table("nf4");
        std::vector<uint16_t> want(static_cast<size_t>(n));
        nf4_dequantize_4bit(packed.data(), back.data(), n, 64, cb.data(), want.data(), NF4_BFLOAT16);
        Dev<uint8_t> dp(packed.size());
        Dev<uint16_t> dy(static_cast<size_t>(n));
        dp.put(packed);
        CHECK(nf4_cuda_dequantize_4bit_dq(dp.p, dq.p, dn.p, og, n, 64, cb.data(), dyn.data(), dy.p, NF4_BFLOAT16,
                                          nullptr) == NF4_OK);
        CHECK(dy.get(static_cast<size_t>(n)) == want);
    }
    // a negative scale is rejected with the CPU's message
    std::vector<float> badv = {1.0f, -1.0f, 2.0f};
    Dev<float> dbad(3), dn(1);
    Dev<uint8_t> dq(3);
    dbad.put(badv);
    float off = 0;
    CHECK(nf4_cuda_double_quantize(dbad.p, 3, dyn.data(), dq.p, dn.p, &off, nullptr) == NF4_ERROR_INVALID_ARGUMENT);
    CHECK(std::strstr(nf4_last_error(), "block scale 1") != nullptr);
    // a NaN scale is non-finite input, as on the CPU
    badv[1] = NAN;
    dbad.put(badv);
    CHECK(nf4_cuda_double_quantize(dbad.p, 3, dyn.data(), dq.p, dn.p, &off, nullptr) == NF4_ERROR_NON_FINITE);
    CHECK(std::strstr(nf4_last_error(), "block scale 1 is not finite") != nullptr);
}

TEST_CASE(non_finite_input_names_the_lowest_index) {
    std::vector<float> x(5000, 1.0f), cb = table("nf4");
    x[4000] = INFINITY;
    x[1234] = NAN;
    Dev<float> dx(x.size()), da(static_cast<size_t>(nf4_num_blocks(5000, 64)));
    Dev<uint8_t> dp(2500);
    dx.put(x);
    CHECK(nf4_cuda_quantize_4bit(dx.p, NF4_FLOAT32, 5000, 64, cb.data(), dp.p, da.p, nullptr) == NF4_ERROR_NON_FINITE);
    CHECK_MSG(std::strstr(nf4_last_error(), "(nan) at flat index 1234") != nullptr, "message: %s", nf4_last_error());
}

TEST_CASE(dequantize_non_finite_scales_byte_identical) {
    // scales of inf and NaN (a corrupt or hand-made tensor): infinities keep
    // their bytes and NaNs stay NaN through the tiled kernel's fast conversion.
    // (A NaN's own bits are the hardware's: 0 * inf is 0xFFC00000 on x86 and
    // 0x7FFFFFFF on NVIDIA GPUs, so NaNs are compared as NaNs.)
    std::mt19937_64 rng(5);
    const std::vector<float> cb = table("nf4");
    const int64_t bs = 64, n = bs * 64;
    std::vector<uint8_t> packed(static_cast<size_t>(n / 2));
    for (uint8_t &b : packed) b = uint8_t(rng());
    std::vector<float> scales(static_cast<size_t>(n / bs), 1.5f);
    scales[3] = INFINITY, scales[7] = -INFINITY, scales[11] = NAN, scales[20] = 3.0e38f;
    Dev<uint8_t> dp(packed.size());
    Dev<float> ds(scales.size());
    dp.put(packed), ds.put(scales);
    for (nf4_dtype od : {NF4_FLOAT32, NF4_FLOAT16, NF4_BFLOAT16}) {
        const size_t bytes = static_cast<size_t>(n * nf4_dtype_size(od));
        std::vector<uint8_t> want(bytes), got(bytes);
        CHECK(nf4_dequantize_4bit(packed.data(), scales.data(), n, bs, cb.data(), want.data(), od) == NF4_OK);
        Dev<uint8_t> dy(bytes);
        CHECK(nf4_cuda_dequantize_4bit(dp.p, ds.p, n, bs, cb.data(), dy.p, od, nullptr) == NF4_OK);
        cudaMemcpy(got.data(), dy.p, bytes, cudaMemcpyDeviceToHost);
        const size_t es = static_cast<size_t>(nf4_dtype_size(od));
        const auto is_nan = [&](const uint8_t *p) {
            if (od == NF4_FLOAT32) {
                float f;
                std::memcpy(&f, p, 4);
                return std::isnan(f);
            }
            uint16_t h;
            std::memcpy(&h, p, 2);
            return (h & 0x7FFFu) > (od == NF4_FLOAT16 ? 0x7C00u : 0x7F80u);
        };
        int64_t bad = 0, nans = 0;
        for (size_t i = 0; i < bytes; i += es) {
            const bool nw = is_nan(&want[i]), ng = is_nan(&got[i]);
            nans += nw;
            bad += nw ? !ng : std::memcmp(&want[i], &got[i], es) != 0;
        }
        CHECK_MSG(bad == 0 && nans > 0, "out dtype %d: %lld elements differ (%lld NaNs expected)", int(od),
                  (long long)bad, (long long)nans);
    }
}

TEST_CASE(gemv_matches_cpu_reference) {
    std::mt19937_64 rng(4);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    const std::vector<float> cb = table("nf4");
    std::vector<float> dyn(256);
    nf4_codebook_dynamic(1, dyn.data());
    struct Shape { int64_t M, N, K, bs; };
    for (const Shape s : {Shape{1, 64, 128, 64}, Shape{3, 33, 4096, 64}, Shape{8, 17, 200, 32}, Shape{5, 130, 1024, 256},
                          Shape{2, 9, 96, 32}, Shape{1, 1027, 8192, 64}, Shape{4, 1030, 2048, 128}}) {
        std::vector<float> w(static_cast<size_t>(s.N * s.K)), x(static_cast<size_t>(s.M * s.K));
        for (float &v : w) v = normal(rng);
        for (float &v : x) v = normal(rng);
        const int64_t nb = nf4_num_blocks(s.N * s.K, s.bs), np = nf4_packed_size_4bit(s.N * s.K);
        (void)np;
        std::vector<uint8_t> packed(static_cast<size_t>(np)), q(static_cast<size_t>(nb));
        std::vector<float> scales(static_cast<size_t>(nb)), nested(static_cast<size_t>(nf4_num_blocks(nb, 256))), dqs(static_cast<size_t>(nb));
        float off = 0;
        nf4_quantize_4bit(w.data(), NF4_FLOAT32, s.N * s.K, s.bs, cb.data(), packed.data(), scales.data());
        nf4_double_quantize(scales.data(), nb, dyn.data(), q.data(), nested.data(), &off);
        nf4_double_dequantize(q.data(), nested.data(), off, nb, dyn.data(), dqs.data());
        std::vector<float> want(static_cast<size_t>(s.M * s.N)), want_dq(static_cast<size_t>(s.M * s.N));
        nf4_matmul_4bit_ref(x.data(), NF4_FLOAT32, s.M, s.N, s.K, packed.data(), scales.data(), s.bs, cb.data(), 1,
                            want.data());
        nf4_matmul_4bit_ref(x.data(), NF4_FLOAT32, s.M, s.N, s.K, packed.data(), dqs.data(), s.bs, cb.data(), 1,
                            want_dq.data());
        Dev<float> dx(x.size()), ds(scales.size()), dn(nested.size()), dy(want.size());
        Dev<uint8_t> dp(packed.size()), dq(q.size());
        dx.put(x), ds.put(scales), dn.put(nested), dp.put(packed), dq.put(q);
        // tolerance: float32 rounding of a K-term sum, relative to sum |x| |w|
        const auto close = [&](const std::vector<float> &got, const std::vector<float> &ref) {
            int bad = 0;
            for (int64_t m = 0; m < s.M; ++m)
                for (int64_t n = 0; n < s.N; ++n) {
                    double mag = 0;
                    for (int64_t k = 0; k < s.K; ++k) mag += std::fabs(x[static_cast<size_t>(m * s.K + k)] * w[static_cast<size_t>(n * s.K + k)]);
                    const float g = got[static_cast<size_t>(m * s.N + n)], r = ref[static_cast<size_t>(m * s.N + n)];
                    bad += !(std::fabs(double(g) - r) <= 1e-5 * mag + 1e-6);
                }
            return bad;
        };
        // every kernel variant: the default choice, each forced row count, the first kernel
        for (const char *variant : {"", "1", "2", "4", "8", "v1"}) {
            Env rows("NF4CORE_CUDA_GEMV_ROWS", variant[0] == 'v' ? "" : variant);
            Env kernels("NF4CORE_CUDA_KERNELS", variant[0] == 'v' ? variant : "");
            CHECK(nf4_cuda_gemv_4bit(dx.p, NF4_FLOAT32, s.M, s.N, s.K, dp.p, ds.p, s.bs, cb.data(), dy.p, nullptr) ==
                  NF4_OK);
            CHECK_MSG(close(dy.get(want.size()), want) == 0, "gemv M=%lld N=%lld K=%lld variant '%s'", (long long)s.M,
                      (long long)s.N, (long long)s.K, variant);
            CHECK(nf4_cuda_gemv_4bit_dq(dx.p, NF4_FLOAT32, s.M, s.N, s.K, dp.p, dq.p, dn.p, off, s.bs, cb.data(),
                                        dyn.data(), dy.p, nullptr) == NF4_OK);
            CHECK_MSG(close(dy.get(want.size()), want_dq) == 0, "gemv dq M=%lld N=%lld K=%lld variant '%s'",
                      (long long)s.M, (long long)s.N, (long long)s.K, variant);
        }
    }
}

int main() { return check::run_all_on_cuda_device(); }
