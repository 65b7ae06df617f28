// The pager's C API: argument checks, the backend behind the handle, and the
// errno of the last OS failure per thread.
#include "pager.hpp"

#include <cerrno>
#include <cstring>
#include <string>

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif

struct nf4_pager {
    std::unique_ptr<nf4core::PagerBackend> backend;
};

namespace nf4core {

namespace {
thread_local int last_os_error = 0;

// guarded() plus the errno of an OsError, reset on every call like the message.
template <class F>
nf4_status pager_guarded(F &&body) noexcept {
    last_os_error = 0;
    return guarded([&] {
        try {
            body();
        } catch (const OsError &e) {
            last_os_error = e.err();
            throw;
        }
    });
}

PagerBackend &backend_of(nf4_pager *pager) {
    require(pager != nullptr, "pager is NULL");
    return *pager->backend;
}
}  // namespace

void fail_os(nf4_status status, int err, const std::string &what) {
    throw OsError(status, err, what + ": " + std::strerror(err));
}

int64_t os_page_size() {
#if defined(__unix__) || defined(__APPLE__)
    static const int64_t size = int64_t(sysconf(_SC_PAGESIZE));
    return size > 0 ? size : 4096;
#else
    return 4096;
#endif
}

}  // namespace nf4core

extern "C" {

nf4_status nf4_pager_create(int64_t budget_bytes, const char *spill_dir, int64_t page_bytes, nf4_pager **out) {
    using namespace nf4core;
    return pager_guarded([&] {
        require(out != nullptr, "out is NULL");
        *out = nullptr;
        if (page_bytes == 0) page_bytes = NF4_PAGER_DEFAULT_PAGE_BYTES;
        require(page_bytes > 0 && page_bytes % os_page_size() == 0,
                "page_bytes must be a positive multiple of the OS page size (" + std::to_string(os_page_size()) +
                    "), got " + std::to_string(page_bytes));
        auto pager = std::make_unique<nf4_pager>();
        pager->backend = make_host_pager(budget_bytes < 0 ? -1 : budget_bytes, spill_dir, page_bytes);
        *out = pager.release();
    });
}

nf4_status nf4_pager_create_cuda(int64_t budget_bytes, int32_t device, int64_t page_bytes, uint32_t flags,
                                  nf4_pager **out) {
    using namespace nf4core;
    return pager_guarded([&] {
        require(out != nullptr, "out is NULL");
        *out = nullptr;
        require(device >= 0, "device must be a CUDA device ordinal >= 0, got " + std::to_string(device));
        require((flags & ~NF4_PAGER_CUDA_NO_PREFETCH) == 0, "unknown flags " + std::to_string(flags));
        if (page_bytes == 0) page_bytes = NF4_PAGER_DEFAULT_PAGE_BYTES;
        require(page_bytes > 0 && page_bytes % os_page_size() == 0,
                "page_bytes must be a positive multiple of the OS page size (" + std::to_string(os_page_size()) +
                    "), got " + std::to_string(page_bytes));
        auto pager = std::make_unique<nf4_pager>();
        pager->backend = make_cuda_pager(budget_bytes < 0 ? -1 : budget_bytes, device, page_bytes, flags);
        *out = pager.release();
    });
}

void nf4_pager_destroy(nf4_pager *pager) { delete pager; }

nf4_status nf4_pager_alloc(nf4_pager *pager, int64_t nbytes, void **out) {
    using namespace nf4core;
    return pager_guarded([&] {
        require(out != nullptr, "out is NULL");
        *out = nullptr;
        require(nbytes >= 1, "nbytes must be >= 1, got " + std::to_string(nbytes));
        *out = backend_of(pager).alloc(nbytes);
    });
}

nf4_status nf4_pager_free(nf4_pager *pager, void *ptr) {
    return nf4core::pager_guarded([&] { nf4core::backend_of(pager).free(ptr); });
}

nf4_status nf4_pager_prefetch(nf4_pager *pager, const void *ptr, int64_t nbytes) {
    using namespace nf4core;
    return pager_guarded([&] {
        require(nbytes >= 0, "nbytes must be >= 0, got " + std::to_string(nbytes));
        backend_of(pager).prefetch(ptr, nbytes);
    });
}

nf4_status nf4_pager_map_file(nf4_pager *pager, const char *path, int64_t offset, int64_t nbytes,
                              const void **out) {
    using namespace nf4core;
    return pager_guarded([&] {
        require(out != nullptr, "out is NULL");
        *out = nullptr;
        require(path != nullptr && path[0] != '\0', "path is NULL or empty");
        require(offset >= 0, "offset must be >= 0, got " + std::to_string(offset));
        require(nbytes >= 1, "nbytes must be >= 1, got " + std::to_string(nbytes));
        *out = backend_of(pager).map_file(path, offset, nbytes);
    });
}

nf4_status nf4_pager_file_stats_get(nf4_pager *pager, nf4_pager_file_stats *out) {
    using namespace nf4core;
    return pager_guarded([&] {
        require(out != nullptr, "out is NULL");
        *out = backend_of(pager).file_stats();
    });
}

nf4_status nf4_pager_evict(nf4_pager *pager, const void *ptr, int64_t nbytes) {
    using namespace nf4core;
    return pager_guarded([&] {
        require(nbytes >= 0, "nbytes must be >= 0, got " + std::to_string(nbytes));
        backend_of(pager).evict(ptr, nbytes);
    });
}

nf4_status nf4_pager_evict_all(nf4_pager *pager) {
    return nf4core::pager_guarded([&] { nf4core::backend_of(pager).evict_all(); });
}

nf4_status nf4_pager_stats_get(nf4_pager *pager, nf4_pager_stats *out) {
    using namespace nf4core;
    return pager_guarded([&] {
        require(out != nullptr, "out is NULL");
        *out = backend_of(pager).stats();
    });
}

nf4_pager_backend nf4_pager_get_backend(const nf4_pager *pager) {
    return pager ? pager->backend->kind() : NF4_PAGER_HOST;
}

const char *nf4_pager_spill_dir(const nf4_pager *pager) { return pager ? pager->backend->spill_dir().c_str() : ""; }

int32_t nf4_pager_spill_is_tmpfs(const nf4_pager *pager) { return pager && pager->backend->spill_is_tmpfs() ? 1 : 0; }

int32_t nf4_pager_device(const nf4_pager *pager) { return pager ? int32_t(pager->backend->device()) : -1; }

int32_t nf4_pager_cuda_concurrent_managed(const nf4_pager *pager) {
    return pager && pager->backend->concurrent_managed() ? 1 : 0;
}

nf4_status nf4_pager_set_stream(nf4_pager *pager, void *stream) {
    return nf4core::pager_guarded([&] { nf4core::backend_of(pager).set_stream(stream); });
}

nf4_status nf4_pager_synchronize(nf4_pager *pager) {
    return nf4core::pager_guarded([&] { nf4core::backend_of(pager).synchronize(); });
}

int32_t nf4_pager_last_os_error(void) { return nf4core::last_os_error; }

int64_t nf4_pager_os_page_size(void) { return nf4core::os_page_size(); }

}  // extern "C"
