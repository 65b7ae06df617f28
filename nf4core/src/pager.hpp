// The pager's internal seam: nf4_pager (the C handle) owns one PagerBackend.
// Two backends implement it: the host one (RAM + spill file, pager_host.cpp)
// and the CUDA one (managed memory, cuda/pager.cu; in builds without CUDA its
// factory, in cuda/stub.cpp, fails). Both keep their residency bookkeeping in
// a PageLru (pager_lru.hpp) and differ in how bytes move.
#ifndef NF4CORE_SRC_PAGER_HPP
#define NF4CORE_SRC_PAGER_HPP

#include <cstdint>
#include <memory>
#include <string>

#include "error.hpp"
#include "nf4core/pager.h"

namespace nf4core {

// A failure of a system call: the status plus the errno behind it, which
// nf4_pager_last_os_error() reports (Python turns it into OSError).
class OsError : public Error {
public:
    OsError(nf4_status status, int err, std::string message) : Error(status, std::move(message)), err_(err) {}
    int err() const noexcept { return err_; }

private:
    int err_;
};

// "<what>: <strerror(err)>" as an OsError.
[[noreturn]] void fail_os(nf4_status status, int err, const std::string &what);

class PagerBackend {
public:
    virtual ~PagerBackend() = default;
    virtual nf4_pager_backend kind() const = 0;
    virtual void *alloc(int64_t nbytes) = 0;
    virtual void free(void *ptr) = 0;
    virtual void prefetch(const void *ptr, int64_t nbytes) = 0;
    virtual void evict(const void *ptr, int64_t nbytes) = 0;
    virtual void evict_all() = 0;
    virtual nf4_pager_stats stats() = 0;
    virtual const std::string &spill_dir() const = 0;
    virtual bool spill_is_tmpfs() const = 0;
    // CUDA only; the host backend keeps these defaults.
    virtual int device() const { return -1; }
    virtual bool concurrent_managed() const { return false; }
    virtual void set_stream(void *stream) {
        require(stream == nullptr, "the host pager has no stream: pass NULL");
    }
    virtual void synchronize() {}
    // Host only: a read-only mapping of [offset, offset + nbytes) of a file
    // (nf4_pager_map_file), paged like an allocation and freed by free().
    virtual const void *map_file(const char *path, int64_t offset, int64_t nbytes) {
        (void)path;
        (void)offset;
        (void)nbytes;
        fail(NF4_ERROR_INVALID_ARGUMENT, "nf4_pager_map_file: this pager's backend cannot map files (CUDA managed "
                                         "memory is not file-backed); use a host pager");
    }
    virtual nf4_pager_file_stats file_stats() { return nf4_pager_file_stats{0, 0, 0, 0, 0}; }
};

int64_t os_page_size();

// Throws Error/OsError when the spill file cannot be created; on platforms
// without mmap it throws "not supported on this platform".
std::unique_ptr<PagerBackend> make_host_pager(int64_t budget_bytes, const char *spill_dir, int64_t page_bytes);

// Throws Error (NF4_ERROR_CUDA naming the failed CUDA call, or "built
// without CUDA" from cuda/stub.cpp) when the device cannot be used.
std::unique_ptr<PagerBackend> make_cuda_pager(int64_t budget_bytes, int device, int64_t page_bytes, uint32_t flags);

}  // namespace nf4core

#endif  // NF4CORE_SRC_PAGER_HPP
