// The pager's CUDA backend (nf4_pager_create_cuda) on a device: allocations
// larger than the device budget, prefetched in turn, stay within the budget
// (the pager's count) and really move (CUDA's own record of the last prefetch
// location, cudaMemRangeAttributeLastPrefetchLocation, an independent check);
// the device reads the right bytes (an 8-bit quantize on the device against
// the CPU's) and the host reads them back intact after eviction; the fallback
// mode (NF4_PAGER_CUDA_NO_PREFETCH) gives the same data with no moves;
// argument errors name the argument. Skipped (exit 77) without a CUDA device.
// Written without GPU access: compiled here, run by benchmarks/gpu_check.sh.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "check.hpp"
#include "nf4_check.hpp"
#include "nf4core/nf4core.h"

namespace {

constexpr int64_t kPage = 1 << 20;

int last_prefetch_location(const void *p, size_t len) {
    int loc = -99;
    if (cudaMemRangeGetAttribute(&loc, sizeof loc, cudaMemRangeAttributeLastPrefetchLocation, p, len) != cudaSuccess)
        return -99;
    return loc;
}

void fill(void *p, int64_t nbytes, uint32_t seed) {
    float *f = static_cast<float *>(p);
    for (int64_t i = 0; i < nbytes / 4; ++i) f[i] = float((i * 2654435761u + seed) % 1000003) / 1000003.0f - 0.5f;
}

// The device reads `p` (an 8-bit blockwise quantize) and must agree with the CPU.
bool device_reads_same(const float *p, int64_t n) {
    std::vector<float> dyn(256);
    nf4_codebook_dynamic(1, dyn.data());
    const int64_t nb = nf4_num_blocks(n, 256);
    std::vector<uint8_t> c_cpu(static_cast<size_t>(n)), c_gpu(static_cast<size_t>(n));
    std::vector<float> a_cpu(static_cast<size_t>(nb)), a_gpu(static_cast<size_t>(nb));
    uint8_t *dc = nullptr;
    float *da = nullptr;
    if (cudaMalloc(reinterpret_cast<void **>(&dc), size_t(n)) != cudaSuccess) return false;
    if (cudaMalloc(reinterpret_cast<void **>(&da), size_t(nb) * 4) != cudaSuccess) return false;
    const bool ok = nf4_cuda_quantize_8bit(p, NF4_FLOAT32, n, 256, dyn.data(), dc, da, nullptr) == NF4_OK;
    cudaMemcpy(c_gpu.data(), dc, size_t(n), cudaMemcpyDeviceToHost);
    cudaMemcpy(a_gpu.data(), da, size_t(nb) * 4, cudaMemcpyDeviceToHost);
    cudaFree(dc);
    cudaFree(da);
    // the host reads after the device (the pages may migrate back for it)
    if (nf4_quantize_8bit(p, NF4_FLOAT32, n, 256, dyn.data(), c_cpu.data(), a_cpu.data()) != NF4_OK) return false;
    return ok && c_cpu == c_gpu && std::memcmp(a_cpu.data(), a_gpu.data(), size_t(nb) * 4) == 0;
}

void budget_run(uint32_t flags) {
    const int64_t budget = 4 * kPage, size = 3 * kPage;  // three arrays of 3 pages, 4 pages of budget
    nf4_pager *pg = nullptr;
    const nf4_status st = nf4_pager_create_cuda(budget, 0, kPage, flags, &pg);
    CHECK_MSG(st == NF4_OK, "create: %s", nf4_last_error());
    if (!pg) return;
    CHECK(nf4_pager_get_backend(pg) == NF4_PAGER_CUDA);
    CHECK(nf4_pager_device(pg) == 0);
    CHECK(std::strcmp(nf4_pager_spill_dir(pg), "") == 0);
    int attr = 0;
    cudaDeviceGetAttribute(&attr, cudaDevAttrConcurrentManagedAccess, 0);
    const bool moves = attr != 0 && flags == 0;
    CHECK(nf4_pager_cuda_concurrent_managed(pg) == (moves ? 1 : 0));
    void *a[3] = {nullptr, nullptr, nullptr};
    for (int k = 0; k < 3; ++k) {
        CHECK(nf4_pager_alloc(pg, size, &a[k]) == NF4_OK);
        if (!a[k]) return;
        const float *f = static_cast<const float *>(a[k]);
        CHECK(f[0] == 0.0f && f[size / 4 - 1] == 0.0f);  // zero-filled
        fill(a[k], size, uint32_t(k));
    }
    nf4_pager_stats s;
    CHECK(nf4_pager_stats_get(pg, &s) == NF4_OK);
    CHECK(s.allocated_bytes == 3 * size && s.resident_bytes == 0 && s.num_allocations == 3);
    for (int round = 0; round < 2; ++round) {
        for (int k = 0; k < 3; ++k) {
            CHECK(nf4_pager_prefetch(pg, a[k], size) == NF4_OK);
            CHECK(nf4_pager_synchronize(pg) == NF4_OK);
            CHECK(nf4_pager_stats_get(pg, &s) == NF4_OK);
            CHECK_MSG(s.resident_bytes <= budget, "resident %lld > budget", (long long)s.resident_bytes);
            CHECK(s.resident_bytes >= size);
            CHECK(device_reads_same(static_cast<const float *>(a[k]), size / 4));
            if (moves) {
                CHECK_MSG(last_prefetch_location(a[k], size_t(size)) == 0, "array %d not prefetched to device 0", k);
                // the array before it lost at least its first page to the budget
                const void *prev = a[(k + 2) % 3];
                if (round > 0 || k > 0)
                    CHECK(last_prefetch_location(prev, size_t(kPage)) == cudaCpuDeviceId);
            }
        }
    }
    CHECK(nf4_pager_stats_get(pg, &s) == NF4_OK);
    CHECK_MSG(s.page_outs > 0 && s.page_ins >= 9, "page_ins %lld page_outs %lld", (long long)s.page_ins,
              (long long)s.page_outs);
    CHECK(s.spilled_bytes == s.allocated_bytes - s.resident_bytes);
    // evict everything; the host reads every byte back intact
    CHECK(nf4_pager_evict_all(pg) == NF4_OK && nf4_pager_synchronize(pg) == NF4_OK);
    CHECK(nf4_pager_stats_get(pg, &s) == NF4_OK);
    CHECK(s.resident_bytes == 0);
    std::vector<float> want(size_t(size / 4));
    for (int k = 0; k < 3; ++k) {
        fill(want.data(), size, uint32_t(k));
        CHECK_MSG(std::memcmp(a[k], want.data(), size_t(size)) == 0, "array %d changed", k);
        if (moves) CHECK(last_prefetch_location(a[k], size_t(size)) == cudaCpuDeviceId);
    }
    // a range evict of part of an array
    CHECK(nf4_pager_prefetch(pg, a[0], size) == NF4_OK);
    CHECK(nf4_pager_evict(pg, static_cast<char *>(a[0]) + kPage, kPage) == NF4_OK);
    CHECK(nf4_pager_stats_get(pg, &s) == NF4_OK);
    CHECK(s.resident_bytes == size - kPage);
    // a stream of the caller's
    cudaStream_t stream = nullptr;
    CHECK(cudaStreamCreate(&stream) == cudaSuccess);
    CHECK(nf4_pager_set_stream(pg, stream) == NF4_OK);
    CHECK(nf4_pager_prefetch(pg, a[1], size) == NF4_OK);
    CHECK(cudaStreamSynchronize(stream) == cudaSuccess);
    CHECK(nf4_pager_set_stream(pg, nullptr) == NF4_OK);
    cudaStreamDestroy(stream);
    for (int k = 0; k < 3; ++k) CHECK(nf4_pager_free(pg, a[k]) == NF4_OK);
    CHECK(nf4_pager_stats_get(pg, &s) == NF4_OK);
    CHECK(s.allocated_bytes == 0 && s.resident_bytes == 0 && s.num_allocations == 0);
    nf4_pager_destroy(pg);
}

}  // namespace

TEST_CASE(cuda_pager_under_budget) { budget_run(0); }

TEST_CASE(cuda_pager_fallback_without_prefetch) { budget_run(NF4_PAGER_CUDA_NO_PREFETCH); }

TEST_CASE(cuda_pager_errors) {
    nf4_pager *pg = nullptr;
    int count = 0;
    cudaGetDeviceCount(&count);
    CHECK(nf4_pager_create_cuda(-1, count, 0, 0, &pg) == NF4_ERROR_INVALID_ARGUMENT && pg == nullptr);
    CHECK(std::strstr(nf4_last_error(), "does not exist") != nullptr);
    CHECK(nf4_pager_create_cuda(-1, -1, 0, 0, &pg) == NF4_ERROR_INVALID_ARGUMENT);
    CHECK(nf4_pager_create_cuda(-1, 0, 1000, 0, &pg) == NF4_ERROR_INVALID_ARGUMENT);
    CHECK(nf4_pager_create_cuda(-1, 0, 0, 8, &pg) == NF4_ERROR_INVALID_ARGUMENT);
    CHECK(nf4_pager_create_cuda(-1, 0, 0, 0, &pg) == NF4_OK);
    if (!pg) return;
    int x = 0;
    void *p = nullptr;
    CHECK(nf4_pager_free(pg, &x) == NF4_ERROR_INVALID_ARGUMENT);
    CHECK(nf4_pager_prefetch(pg, &x, 4) == NF4_ERROR_INVALID_ARGUMENT);
    CHECK(nf4_pager_alloc(pg, 4096, &p) == NF4_OK);
    CHECK(nf4_pager_prefetch(pg, p, 8192) == NF4_ERROR_INVALID_ARGUMENT);
    CHECK(std::strstr(nf4_last_error(), "runs past the end") != nullptr);
    nf4_pager_destroy(pg);
}

int main() { return check::run_all_on_cuda_device(); }
