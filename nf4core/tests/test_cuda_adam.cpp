// nf4_cuda_adam8bit_update against nf4_adam8bit_update (the CPU kernel) byte
// for byte: parameters, both code arrays, both absmax arrays and the skip
// count over several steps, float32/float16/bfloat16, blocksizes 64/256/2048,
// tails, weight decay, NaN/Inf gradients; an overflowing update; argument errors;
// a state held in the CUDA pager's managed memory under a small budget.
// Skipped (exit 77) without a CUDA device. Written without GPU access:
// compiled here, run by benchmarks/gpu_check.sh on a GPU machine.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
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
    size_t n = 0;
    explicit Dev(const std::vector<T> &h) : n(h.size()) {
        if (cudaMalloc(reinterpret_cast<void **>(&p), n * sizeof(T) + 16) != cudaSuccess) p = nullptr;
        if (p) cudaMemcpy(p, h.data(), n * sizeof(T), cudaMemcpyHostToDevice);
    }
    ~Dev() { cudaFree(p); }
    std::vector<T> get() const {
        std::vector<T> h(n);
        cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost);
        return h;
    }
};

// float -> raw 16-bit (bf16 by truncation, f16 via a crude but valid encoding:
// any bit pattern is a legal input, and both kernels see the same bytes)
std::vector<uint8_t> raw_of(nf4_dtype dt, const std::vector<float> &f) {
    const size_t es = size_t(nf4_dtype_size(dt));
    std::vector<uint8_t> raw(f.size() * es);
    for (size_t i = 0; i < f.size(); ++i) {
        uint32_t u;
        std::memcpy(&u, &f[i], 4);
        if (dt == NF4_FLOAT32) {
            std::memcpy(&raw[4 * i], &u, 4);
        } else {
            uint16_t h = dt == NF4_BFLOAT16 ? uint16_t(u >> 16) : uint16_t(((u >> 16) & 0x8000u) | (0x3C00u ^ ((u >> 13) & 0x3FFu)));
            if (std::isnan(f[i])) h = dt == NF4_BFLOAT16 ? 0x7FC0 : 0x7E00;
            if (std::isinf(f[i])) h = uint16_t((f[i] < 0 ? 0x8000 : 0) | (dt == NF4_BFLOAT16 ? 0x7F80 : 0x7C00));
            std::memcpy(&raw[2 * i], &h, 2);
        }
    }
    return raw;
}

void compare(nf4_dtype dt, int64_t n, int64_t bs, double wd, bool bad, uint64_t seed) {
    check::AdamCase c(n, bs, seed);
    const std::vector<float> &q1 = c.maps.q1, &q2 = c.maps.q2;
    const int64_t nb = c.nb;
    std::vector<float> pf(static_cast<size_t>(n));
    for (float &v : pf) v = c.normal(c.rng);
    std::vector<uint8_t> p = raw_of(dt, pf);
    std::vector<uint8_t> s1(size_t(n), 127), s2(size_t(n), 0);
    std::vector<float> a1(size_t(nb), 0.0f), a2(size_t(nb), 0.0f);
    Dev<uint8_t> dp(p), ds1(s1), ds2(s2);
    Dev<float> da1(a1), da2(a2);
    int mismatches = 0;
    for (int64_t step = 1; step <= 3; ++step) {
        std::vector<float> gf(static_cast<size_t>(n));
        for (float &v : gf) v = c.normal(c.rng) * 0.1f;
        if (bad) {
            gf[size_t(n / 2)] = NAN;
            gf[size_t(n - 1)] = -INFINITY;
        }
        const std::vector<uint8_t> g = raw_of(dt, gf);
        Dev<uint8_t> dg(g);
        const nf4_adam_hparams hp{2e-3, 0.9, 0.999, 1e-8, wd, step};
        int64_t sk_cpu = -1, sk_gpu = -2;
        CHECK(nf4_adam8bit_update(p.data(), g.data(), dt, n, s1.data(), s2.data(), a1.data(), a2.data(), q1.data(),
                                  q2.data(), bs, &hp, &sk_cpu) == NF4_OK);
        const nf4_status st = nf4_cuda_adam8bit_update(dp.p, dg.p, dt, n, ds1.p, ds2.p, da1.p, da2.p, q1.data(),
                                                       q2.data(), bs, &hp, &sk_gpu, nullptr);
        CHECK_MSG(st == NF4_OK, "status %s: %s", nf4_status_string(st), nf4_last_error());
        CHECK(sk_cpu == sk_gpu);
        mismatches += dp.get() != p;
        mismatches += ds1.get() != s1;
        mismatches += ds2.get() != s2;
        mismatches += std::memcmp(da1.get().data(), a1.data(), a1.size() * 4) != 0;
        mismatches += std::memcmp(da2.get().data(), a2.data(), a2.size() * 4) != 0;
    }
    CHECK_MSG(mismatches == 0, "dtype %d n=%lld bs=%lld wd=%g bad=%d: %d arrays differ from the CPU's", int(dt),
              (long long)n, (long long)bs, wd, int(bad), mismatches);
}

}  // namespace

TEST_CASE(adam8bit_byte_identical_to_cpu) {
    uint64_t seed = 11;
    for (int64_t bs : {int64_t(64), int64_t(256), int64_t(2048)})
        for (int64_t n : {int64_t(3), bs * 5, bs * 7 + 33, int64_t(100003)})
            for (double wd : {0.0, 0.01})
                for (nf4_dtype dt : {NF4_FLOAT32, NF4_FLOAT16, NF4_BFLOAT16}) compare(dt, n, bs, wd, wd > 0, seed++);
}

// A finite gradient whose update overflows float32 is skipped like a NaN one
// (optim.h): both kernels finish the call, skip that element only and agree
// byte for byte.
TEST_CASE(adam8bit_overflowing_update_is_skipped_like_cpu) {
    const int64_t n = 300, bs = 256;
    const check::AdamMaps maps;
    const std::vector<float> &q1 = maps.q1, &q2 = maps.q2;
    std::vector<float> p(size_t(n), 1.0f), g(size_t(n), 0.5f);
    g[7] = 3e30f;  // v = (1 - beta2) g^2 overflows float32
    std::vector<uint8_t> s1(size_t(n), 127), s2(size_t(n), 0);
    std::vector<float> a(2, 0.0f), b(2, 0.0f);
    const nf4_adam_hparams hp{1e-3, 0.9, 0.999, 1e-8, 0.0, 1};
    int64_t sk_cpu = -1, sk_gpu = -2;
    const nf4_status cpu = nf4_adam8bit_update(p.data(), g.data(), NF4_FLOAT32, n, s1.data(), s2.data(), a.data(),
                                               b.data(), q1.data(), q2.data(), bs, &hp, &sk_cpu);
    std::vector<uint8_t> z1(size_t(n), 127), z2(size_t(n), 0);
    Dev<float> dp(std::vector<float>(size_t(n), 1.0f)), dg(g), da(std::vector<float>(2, 0.0f)),
        db(std::vector<float>(2, 0.0f));
    Dev<uint8_t> d1(z1), d2(z2);
    const nf4_status gpu = nf4_cuda_adam8bit_update(dp.p, dg.p, NF4_FLOAT32, n, d1.p, d2.p, da.p, db.p, q1.data(),
                                                    q2.data(), bs, &hp, &sk_gpu, nullptr);
    CHECK(cpu == NF4_OK && sk_cpu == 1);
    CHECK_MSG(gpu == NF4_OK, "status %s: %s", nf4_status_string(gpu), nf4_last_error());
    CHECK(sk_gpu == 1);
    CHECK(p[7] == 1.0f && p[6] != 1.0f && s1[7] == 127 && s2[7] == 0);
    CHECK(dp.get() == p && d1.get() == s1 && d2.get() == s2 && da.get() == a && db.get() == b);
}

TEST_CASE(adam8bit_argument_errors) {
    std::vector<float> q(256, 0.0f);
    const nf4_adam_hparams hp{1e-3, 0.9, 0.999, 1e-8, 0.0, 0};  // step 0
    float x = 0;
    uint8_t c = 0;
    CHECK(nf4_cuda_adam8bit_update(&x, &x, NF4_FLOAT32, 1, &c, &c, &x, &x, q.data(), q.data(), 64, &hp, nullptr,
                                   nullptr) == NF4_ERROR_INVALID_ARGUMENT);
    CHECK(std::strstr(nf4_last_error(), "step") != nullptr);
    const nf4_adam_hparams ok{1e-3, 0.9, 0.999, 1e-8, 0.0, 1};
    CHECK(nf4_cuda_adam8bit_update(&x, &x, NF4_FLOAT32, 1, &c, &c, &x, &x, q.data(), q.data(), 48, &ok, nullptr,
                                   nullptr) == NF4_ERROR_INVALID_ARGUMENT);
    q[3] = NAN;
    CHECK(nf4_cuda_adam8bit_update(&x, &x, NF4_FLOAT32, 1, &c, &c, &x, &x, q.data(), q.data(), 64, &ok, nullptr,
                                   nullptr) == NF4_ERROR_INVALID_ARGUMENT);
}

// The optimizer's intended use: 8-bit state in the CUDA pager (managed
// memory) with a budget of a quarter of it, prefetched tensor by tensor.
TEST_CASE(adam8bit_on_cuda_pager_state) {
    const int64_t n = int64_t(3) << 20, bs = 256, nb = n / bs;  // 3 MiB of codes per moment
    nf4_pager *pg = nullptr;
    CHECK(nf4_pager_create_cuda((n * 2 + nb * 8) / 4, 0, 1 << 20, 0, &pg) == NF4_OK);
    if (!pg) return;
    const check::AdamMaps maps;
    const std::vector<float> &q1 = maps.q1, &q2 = maps.q2;
    void *s1 = nullptr, *s2 = nullptr, *a1 = nullptr, *a2 = nullptr;
    CHECK(nf4_pager_alloc(pg, n, &s1) == NF4_OK && nf4_pager_alloc(pg, n, &s2) == NF4_OK);
    CHECK(nf4_pager_alloc(pg, nb * 4, &a1) == NF4_OK && nf4_pager_alloc(pg, nb * 4, &a2) == NF4_OK);
    std::memset(s1, 127, size_t(n));  // host writes: fine after alloc (alloc synchronizes in the fallback mode)
    std::vector<uint8_t> h1(size_t(n), 127), h2(size_t(n), 0);
    std::vector<float> ha1(size_t(nb), 0.0f), ha2(size_t(nb), 0.0f);
    std::mt19937_64 rng(5);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> p(static_cast<size_t>(n)), g(static_cast<size_t>(n));
    for (float &v : p) v = normal(rng);
    Dev<float> dp(p);
    for (int64_t step = 1; step <= 2; ++step) {
        for (float &v : g) v = normal(rng);
        Dev<float> dg(g);
        const nf4_adam_hparams hp{1e-3, 0.9, 0.999, 1e-8, 0.0, step};
        CHECK(nf4_adam8bit_update(p.data(), g.data(), NF4_FLOAT32, n, h1.data(), h2.data(), ha1.data(), ha2.data(),
                                  q1.data(), q2.data(), bs, &hp, nullptr) == NF4_OK);
        for (void *ptr : {s1, s2}) CHECK(nf4_pager_prefetch(pg, ptr, n) == NF4_OK);
        for (void *ptr : {a1, a2}) CHECK(nf4_pager_prefetch(pg, ptr, nb * 4) == NF4_OK);
        CHECK(nf4_cuda_adam8bit_update(dp.p, dg.p, NF4_FLOAT32, n, static_cast<uint8_t *>(s1),
                                       static_cast<uint8_t *>(s2), static_cast<float *>(a1), static_cast<float *>(a2),
                                       q1.data(), q2.data(), bs, &hp, nullptr, nullptr) == NF4_OK);
    }
    CHECK(nf4_pager_evict_all(pg) == NF4_OK && nf4_pager_synchronize(pg) == NF4_OK);
    CHECK(std::memcmp(s1, h1.data(), size_t(n)) == 0);
    CHECK(std::memcmp(s2, h2.data(), size_t(n)) == 0);
    CHECK(std::memcmp(a1, ha1.data(), size_t(nb) * 4) == 0);
    CHECK(std::memcmp(a2, ha2.data(), size_t(nb) * 4) == 0);
    CHECK(dp.get() == p);
    nf4_pager_stats st;
    CHECK(nf4_pager_stats_get(pg, &st) == NF4_OK);
    CHECK(st.page_outs > 0 && st.resident_bytes == 0);
    nf4_pager_destroy(pg);
}

int main() { return check::run_all_on_cuda_device(); }
