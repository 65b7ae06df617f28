// CUDA backend of the pager: the fast tier is one GPU's memory, the slow tier
// host RAM. Allocations are managed memory (cudaMallocManaged), so callers
// hold one pointer that is valid on both sides; this file decides *where* the
// pages should live: an LRU over fixed-size pages as in the host backend
// (the same PageLru, pager_lru.hpp, tested on the host), with cudaMemPrefetchAsync
// to the device as "page in" and to the host as "page out", on one stream.
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

#include "../pager.hpp"
#include "../pager_lru.hpp"
#include "common.cuh"

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

class CudaPager final : public PagerBackend {
public:
    CudaPager(int64_t budget, int device, int64_t page_bytes, uint32_t flags)
        : device_(device), os_page_(os_page_size()),
          lru_(budget, page_bytes, [this](char *p, int64_t len, bool to_device) { move(p, len, to_device); }) {
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
        for (char *p : lru_.bases()) (void)cudaFree(p);  // errors at teardown cannot be reported
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
        lru_.add(static_cast<char *>(p), len);
        return p;
    }

    void free(void *ptr) override {
        std::lock_guard<std::mutex> lock(mu_);
        DeviceGuard g(device_);
        lru_.remove(ptr);                    // throws for a foreign pointer
        check(cudaFree(ptr), "cudaFree");  // waits for the device; the bookkeeping is gone either way
    }

    void prefetch(const void *ptr, int64_t nbytes) override {
        std::lock_guard<std::mutex> lock(mu_);
        DeviceGuard g(device_);
        lru_.prefetch(ptr, nbytes);
    }

    void evict(const void *ptr, int64_t nbytes) override {
        std::lock_guard<std::mutex> lock(mu_);
        DeviceGuard g(device_);
        lru_.evict(ptr, nbytes);
        if (!concurrent_ && nbytes > 0) sync_locked();
    }

    void evict_all() override {
        std::lock_guard<std::mutex> lock(mu_);
        DeviceGuard g(device_);
        lru_.evict_all();
        if (!concurrent_) sync_locked();
    }

    nf4_pager_stats stats() override {
        std::lock_guard<std::mutex> lock(mu_);
        return lru_.stats(lru_.resident_bytes());  // the bookkeeping is the truth here (no probe)
    }

private:
    void sync_locked() {
        if (concurrent_)
            check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
        else
            check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    }

    // The LRU's mover: one cudaMemPrefetchAsync per contiguous run of pages,
    // to the device or to the host; nothing in the fallback mode (the driver
    // moves managed memory itself there).
    void move(char *p, int64_t len, bool to_device) {
        if (!concurrent_) return;
        check(prefetch_to(p, size_t(len), to_device ? device_ : cudaCpuDeviceId, stream_),
              to_device ? "cudaMemPrefetchAsync (to the device)" : "cudaMemPrefetchAsync (to the host)");
    }

    const int device_;
    const int64_t os_page_;
    bool concurrent_ = false;
    const std::string no_dir_;
    std::mutex mu_;
    cudaStream_t stream_ = nullptr;
    PageLru lru_;  // guarded by mu_
};

}  // namespace

std::unique_ptr<PagerBackend> make_cuda_pager(int64_t budget_bytes, int device, int64_t page_bytes, uint32_t flags) {
    return std::make_unique<CudaPager>(budget_bytes, device, page_bytes, flags);
}

}  // namespace nf4core
