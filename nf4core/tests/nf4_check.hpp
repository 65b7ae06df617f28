// Helpers that several of nf4core's C++ tests share, beside the harness in
// check.hpp. The library's internals are hidden, so what a test needs of them
// is built here from the public C API and the shared header numeric.hpp.
#ifndef NF4CORE_TESTS_NF4_CHECK_HPP
#define NF4CORE_TESTS_NF4_CHECK_HPP

#include <cmath>
#include <cstdio>
#include <random>
#include <utility>
#include <vector>

#include "check.hpp"
#include "nf4core/nf4core.h"
#include "numeric.hpp"

namespace check {

// Whether this build has CUDA and a device is visible.
inline bool have_cuda_device() {
    int32_t built = 0, count = 0;
    return nf4_cuda_available(&built, &count) == NF4_OK && built && count > 0;
}

// main() of a test that needs a CUDA device: exit 77 (meson's "skipped") without one.
inline int run_all_on_cuda_device() {
    if (!have_cuda_device()) {
        std::printf("no CUDA device: skipped\n");
        return 77;
    }
    return run_all();
}

// The nearest-code search table of a codebook of `size` (16 or 256) values as
// quantize.cpp's make_search_table builds it (stable sort, float32 midpoints).
inline nf4core::SearchTable table_of(const float *cb, int size) {
    nf4core::SearchTable t{};
    std::vector<int> idx(static_cast<size_t>(size));
    for (int i = 0; i < size; ++i) idx[size_t(i)] = i;
    for (int i = 1; i < size; ++i)  // insertion sort: stable
        for (int j = i; j > 0 && cb[idx[size_t(j)]] < cb[idx[size_t(j - 1)]]; --j)
            std::swap(idx[size_t(j)], idx[size_t(j - 1)]);
    t.size = size;
    t.identity_order = true;
    for (int i = 0; i < 256; ++i) {
        t.order[i] = i < size ? idx[size_t(i)] : idx[size_t(size - 1)];
        t.identity_order = t.identity_order && (i >= size || idx[size_t(i)] == i);
        t.mid[i] = i + 1 < size ? (cb[idx[size_t(i)]] + cb[idx[size_t(i + 1)]]) / 2.0f : HUGE_VALF;
    }
    for (int k = 0; k < 16; ++k) t.coarse[k] = t.mid[16 * k + 15];
    return t;
}

// The 8-bit maps of 8-bit Adam's moments, as pyqlora.optim passes them: the
// signed dynamic map for m (q1), the unsigned one for v (q2).
struct AdamMaps {
    std::vector<float> q1 = dynamic_map(1), q2 = dynamic_map(0);

    static std::vector<float> dynamic_map(int32_t is_signed) {
        std::vector<float> q(256);
        nf4_codebook_dynamic(is_signed, q.data());
        return q;
    }
};

// What a randomized 8-bit Adam case starts from: the maps, the number of
// blocks of n values, and a seeded normal generator for parameters and gradients.
struct AdamCase {
    AdamMaps maps;
    int64_t nb;
    std::mt19937_64 rng;
    std::normal_distribution<float> normal{0.0f, 1.0f};
    AdamCase(int64_t n, int64_t bs, uint64_t seed) : nb(nf4_num_blocks(n, bs)), rng(seed) {}
};

}  // namespace check

#endif  // NF4CORE_TESTS_NF4_CHECK_HPP
