// CUDA backend of the pager: the fast tier is one GPU's memory, the slow tier
// host RAM. Allocations are managed memory (cudaMallocManaged), so callers
// hold one pointer that is valid on both sides; this file decides *where* the
// pages should live: the same LRU over fixed-size pages as the host backend
// (pager_host.cpp), with cudaMemPrefetchAsync to the device as "page in" and
// to the host (cudaCpuDeviceId) as "page out", on one stream.
//
// Without concurrent managed access (Windows, WSL, pre-Pascal, some vGPUs, or
// NF4_PAGER_CUDA_NO_PREFETCH) prefetching is not available: the driver moves
// managed memory at kernel launch and the host must not touch it while a
// kernel runs. There the pager keeps its bookkeeping (stats, LRU) but moves
// nothing, and synchronizes the device where the host is about to touch the
// memory (alloc's zero fill) or was told it may (evict, synchronize).
//
// Status: compiled and linked, NOT yet run on GPU hardware.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "cuda/common.cuh"
#include "pager.hpp"

namespace nf4core {

namespace {

using cuda::check;

// Makes `device` current for the duration of a call and restores the caller's.
class DeviceGuard {
public:
    explicit DeviceGuard(int device) {
        check(cudaGetDevice(&prev_), "cudaGetDevice (is a CUDA device and driver present?)");
        if (prev_ != device) check(cudaSetDevice(device), "cudaSetDevice");
    }
    ~DeviceGuard() {
        int cur = -1;
        if (cudaGetDevice(&cur) == cudaSuccess && cur != prev_) (void)cudaSetDevice(prev_);
    }
    DeviceGuard(const DeviceGuard &) = delete;
    DeviceGuard &operator=(const DeviceGuard &) = delete;

private:
    int prev_ = 0;
};

// cudaMemPrefetchAsync changed in CUDA 13: a cudaMemLocation and flags
// replace the device ordinal (cudaCpuDeviceId for the host).
cudaError_t prefetch_to(const void *p, size_t len, int device, cudaStream_t stream) {
#if CUDART_VERSION >= 13000
    cudaMemLocation loc{};
    if (device == cudaCpuDeviceId) {
        loc.type = cudaMemLocationTypeHost;
        loc.id = 0;
    } else {
        loc.type = cudaMemLocationTypeDevice;
        loc.id = device;
    }
    return cudaMemPrefetchAsync(p, len, loc, 0, stream);
#else
    return cudaMemPrefetchAsync(p, len, device, stream);
#endif
}

struct Allocation;

struct ChunkRef {
    Allocation *alloc;
    int64_t index;
};

using Lru = std::list<ChunkRef>;  // front = least recently used; device-resident chunks only

struct Chunk {
    bool resident = false;  // on the device, as far as the pager moved it
    Lru::iterator pos;
};

struct Allocation {
    char *base = nullptr;
    int64_t len = 0;  // bytes allocated, a multiple of the OS page size
    std::vector<Chunk> chunks;
};

class CudaPager final : public PagerBackend {
public:
    CudaPager(int64_t budget, int device, int64_t page_bytes, uint32_t flags)
        : budget_(budget), page_bytes_(page_bytes), os_page_(os_page_size()), device_(device) {
        int count = 0;
        check(cudaGetDeviceCount(&count), "cudaGetDeviceCount (is a CUDA device and driver present?)");
        if (count == 0) fail(NF4_ERROR_CUDA, "no CUDA device is visible");
        require(device < count, "CUDA device " + std::to_string(device) + " does not exist (" +
                                    std::to_string(count) + " device(s) visible)");
        int managed = 0, concurrent = 0;
        check(cudaDeviceGetAttribute(&managed, cudaDevAttrManagedMemory, device),
              "cudaDeviceGetAttribute(cudaDevAttrManagedMemory)");
        if (!managed)
            fail(NF4_ERROR_CUDA, "CUDA device " + std::to_string(device) + " does not support managed memory");
        check(cudaDeviceGetAttribute(&concurrent, cudaDevAttrConcurrentManagedAccess, device),
              "cudaDeviceGetAttribute(cudaDevAttrConcurrentManagedAccess)");
        concurrent_ = concurrent != 0 && (flags & NF4_PAGER_CUDA_NO_PREFETCH) == 0;
    }

    ~CudaPager() override {
        int prev = -1;
        const bool restore = cudaGetDevice(&prev) == cudaSuccess && prev != device_;
        if (restore) (void)cudaSetDevice(device_);
        for (auto &kv : allocs_) (void)cudaFree(kv.second->base);  // errors at teardown cannot be reported
        if (restore) (void)cudaSetDevice(prev);
    }

    nf4_pager_backend kind() const override { return NF4_PAGER_CUDA; }
    const std::string &spill_dir() const override { return no_dir_; }
    bool spill_is_tmpfs() const override { return false; }
    int device() const override { return device_; }
    bool concurrent_managed() const override { return concurrent_; }

    void set_stream(void *stream) override {
        std::lock_guard<std::mutex> lock(mu_);
        stream_ = static_cast<cudaStream_t>(stream);
    }

    void synchronize() override {
        std::lock_guard<std::mutex> lock(mu_);
        DeviceGuard g(device_);
        sync_locked();
    }

    void *alloc(int64_t nbytes) override {
        require(nbytes <= INT64_MAX - os_page_, "nbytes too large: " + std::to_string(nbytes));
        const int64_t len = (nbytes + os_page_ - 1) / os_page_ * os_page_;
        std::lock_guard<std::mutex> lock(mu_);
        DeviceGuard g(device_);
        void *p = nullptr;
        check(cudaMallocManaged(&p, size_t(len), cudaMemAttachGlobal),
              ("cudaMallocManaged(" + std::to_string(len) + " bytes)").c_str());
        // Managed memory is not cleared. Zero it from the host: the pages are
        // created in RAM (the slow tier), as spilled as the host backend's.
        if (!concurrent_) {
            const cudaError_t err = cudaDeviceSynchronize();
            if (err != cudaSuccess) {
                (void)cudaFree(p);
                check(err, "cudaDeviceSynchronize");
            }
        }
        std::memset(p, 0, size_t(len));
        auto a = std::make_unique<Allocation>();
        a->base = static_cast<char *>(p);
        a->len = len;
        a->chunks.resize(size_t((len + page_bytes_ - 1) / page_bytes_));
        allocated_ += len;
        allocs_.emplace(reinterpret_cast<uintptr_t>(p), std::move(a));
        return p;
    }

    void free(void *ptr) override {
        std::lock_guard<std::mutex> lock(mu_);
        auto it = allocs_.find(reinterpret_cast<uintptr_t>(ptr));
        require(ptr != nullptr && it != allocs_.end(), "pointer was not allocated by this pager");
        DeviceGuard g(device_);
        Allocation &a = *it->second;
        for (Chunk &c : a.chunks)
            if (c.resident) lru_remove(c);
        allocated_ -= a.len;
        std::unique_ptr<Allocation> owned = std::move(it->second);
        allocs_.erase(it);
        check(cudaFree(owned->base), "cudaFree");  // waits for the device; the bookkeeping is gone either way
    }

    void prefetch(const void *ptr, int64_t nbytes) override {
        std::lock_guard<std::mutex> lock(mu_);
        Allocation &a = find(ptr, nbytes);
        if (nbytes == 0) return;
        DeviceGuard g(device_);
        const int64_t start = static_cast<const char *>(ptr) - a.base;
        const int64_t c0 = start / page_bytes_, c1 = (start + nbytes - 1) / page_bytes_;
        // Take the range out of the LRU, make room for all of it first (so the
        // device never holds more than the budget plus the range, even while
        // the moves are in flight), then bring over what is not there yet.
        std::vector<char> was(size_t(c1 - c0 + 1), 0);
        int64_t need = 0;
        for (int64_t i = c0; i <= c1; ++i) {
            Chunk &c = a.chunks[size_t(i)];
            if (c.resident) {
                was[size_t(i - c0)] = 1;
                lru_remove(c);
            }
            need += chunk_len(a, i);
        }
        if (budget_ >= 0)
            while (tracked_ + need > budget_ && !lru_.empty()) {
                const ChunkRef victim = lru_.front();
                evict_chunk(*victim.alloc, victim.index);
            }
        // Contiguous runs of chunks not yet on the device move in one call each.
        int64_t run = -1;
        for (int64_t i = c0; i <= c1 + 1; ++i) {
            const bool in = i <= c1 && !was[size_t(i - c0)];
            if (in && run < 0) run = i;
            if (!in && run >= 0) {
                move(a, run, i, device_, "cudaMemPrefetchAsync (to the device)");
                page_ins_ += i - run;
                run = -1;
            }
        }
        for (int64_t i = c0; i <= c1; ++i) {
            Chunk &c = a.chunks[size_t(i)];
            c.resident = true;
            c.pos = lru_.insert(lru_.end(), ChunkRef{&a, i});
            tracked_ += chunk_len(a, i);
        }
    }

    void evict(const void *ptr, int64_t nbytes) override {
        std::lock_guard<std::mutex> lock(mu_);
        Allocation &a = find(ptr, nbytes);
        if (nbytes == 0) return;
        DeviceGuard g(device_);
        const int64_t start = static_cast<const char *>(ptr) - a.base;
        const int64_t c0 = start / page_bytes_, c1 = (start + nbytes - 1) / page_bytes_;
        evict_range(a, c0, c1 + 1);
        if (!concurrent_) sync_locked();
    }

    void evict_all() override {
        std::lock_guard<std::mutex> lock(mu_);
        DeviceGuard g(device_);
        for (auto &kv : allocs_) evict_range(*kv.second, 0, int64_t(kv.second->chunks.size()));
        if (!concurrent_) sync_locked();
    }

    nf4_pager_stats stats() override {
        std::lock_guard<std::mutex> lock(mu_);
        nf4_pager_stats s;
        s.budget_bytes = budget_;
        s.page_bytes = page_bytes_;
        s.allocated_bytes = allocated_;
        s.resident_bytes = tracked_;
        s.spilled_bytes = allocated_ - tracked_;
        s.page_ins = page_ins_;
        s.page_outs = page_outs_;
        s.num_allocations = int64_t(allocs_.size());
        return s;
    }

private:
    void sync_locked() {
        if (concurrent_)
            check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
        else
            check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    }

    // Moves chunks [i0, i1) of `a` to `device` (a device ordinal or
    // cudaCpuDeviceId) in one call; nothing to do in the fallback mode.
    void move(const Allocation &a, int64_t i0, int64_t i1, int device, const char *what) {
        if (!concurrent_ || i0 >= i1) return;
        const int64_t off = i0 * page_bytes_;
        const int64_t end = std::min(a.len, i1 * page_bytes_);
        check(prefetch_to(a.base + off, size_t(end - off), device, stream_), what);
    }

    // Explicit eviction moves the whole range to the host even where the
    // pager did not put it on the device (a kernel may have faulted it over);
    // page_outs counts the chunks the pager had on the device.
    void evict_range(Allocation &a, int64_t i0, int64_t i1) {
        move(a, i0, i1, cudaCpuDeviceId, "cudaMemPrefetchAsync (to the host)");
        for (int64_t i = i0; i < i1; ++i) {
            Chunk &c = a.chunks[size_t(i)];
            if (!c.resident) continue;
            lru_remove(c);
            ++page_outs_;
        }
    }

    void evict_chunk(Allocation &a, int64_t i) {
        if (!a.chunks[size_t(i)].resident) return;
        evict_range(a, i, i + 1);
    }

    Allocation &find(const void *ptr, int64_t nbytes) {
        const auto p = reinterpret_cast<uintptr_t>(ptr);
        auto it = allocs_.upper_bound(p);
        if (ptr != nullptr && it != allocs_.begin()) {
            Allocation &a = *std::prev(it)->second;
            const auto base = reinterpret_cast<uintptr_t>(a.base);
            if (p < base + uintptr_t(a.len) && nbytes <= int64_t(base + uintptr_t(a.len) - p)) return a;
            require(p >= base + uintptr_t(a.len),
                    "range of " + std::to_string(nbytes) + " bytes runs past the end of its pager allocation");
        }
        fail(NF4_ERROR_INVALID_ARGUMENT, "pointer does not lie in memory allocated by this pager");
    }

    int64_t chunk_len(const Allocation &a, int64_t i) const { return std::min(page_bytes_, a.len - i * page_bytes_); }

    void lru_remove(Chunk &c) {
        tracked_ -= chunk_len(*c.pos->alloc, c.pos->index);
        lru_.erase(c.pos);
        c.resident = false;
    }

    const int64_t budget_, page_bytes_, os_page_;
    const int device_;
    bool concurrent_ = false;
    const std::string no_dir_;

    std::mutex mu_;
    cudaStream_t stream_ = nullptr;
    std::map<uintptr_t, std::unique_ptr<Allocation>> allocs_;
    Lru lru_;
    int64_t tracked_ = 0;  // bytes of the chunks in lru_ (device-resident by the pager's moves)
    int64_t allocated_ = 0;
    int64_t page_ins_ = 0, page_outs_ = 0;
};

}  // namespace

std::unique_ptr<PagerBackend> make_cuda_pager(int64_t budget_bytes, int device, int64_t page_bytes, uint32_t flags) {
    return std::make_unique<CudaPager>(budget_bytes, device, page_bytes, flags);
}

}  // namespace nf4core
