/*
 * nf4core — the pager: memory that moves between a fast tier and a slow tier
 * under a budget, for optimizer state that must survive memory spikes (the
 * third idea of QLoRA, Dettmers et al. 2023, "paged optimizers").
 *
 * Host backend (every POSIX machine): the fast tier is RAM, the slow tier a
 * spill file. Each allocation is a page-aligned region of that file mapped
 * shared, so callers see ordinary memory; touching a spilled page brings it
 * back transparently (the OS faults it in). The file is unlinked as soon as it
 * is created, so nothing is left behind if the process dies.
 *
 *   - Disk for an allocation is reserved when it is made: a full disk or a
 *     file-size limit is an error from nf4_pager_alloc (NF4_ERROR_OUT_OF_MEMORY,
 *     the slow tier is out of space), never a crash later; existing
 *     allocations stay intact.
 *   - Residency is tracked in pages of `page_bytes` (default 2 MiB; the last
 *     page of an allocation may be shorter), least recently used first.
 *     Small allocations (up to 256 KiB) share pages: they are packed into
 *     2 MiB slabs tracked in units of min(page_bytes, 64 KiB), so that many
 *     small arrays cost what their bytes cost, not what their number does;
 *     prefetch and evict act on the units that cover a range, neighbours
 *     included (docs/pager.md, "Small arrays").
 *     nf4_pager_prefetch makes a range resident and most recently used, then
 *     evicts least recently used pages of other ranges until the resident
 *     bytes fit the budget (a single range larger than the budget stays
 *     resident: the caller asked for it).
 *   - Eviction writes dirty pages back to the spill file and returns the RAM to
 *     the OS (madvise DONTNEED, sync_file_range, posix_fadvise DONTNEED; msync
 *     on macOS); evicting what is not in RAM moves and counts nothing. Where the spill
 *     directory is a tmpfs, the "file" is RAM itself and eviction cannot free
 *     memory: nf4_pager_spill_is_tmpfs() says so. The default spill directory
 *     avoids tmpfs when it can: $TMPDIR, then /var/tmp, then /tmp, the first
 *     writable one that is not a tmpfs (else the first writable one).
 *   - Every function is thread-safe. Freeing memory that another thread still
 *     uses is, as with free(), the caller's bug.
 *
 * File-backed pages (nf4_pager_map_file, host backend): a byte range of an
 * existing file (a 4-bit checkpoint) mapped read-only, so that the file itself
 * is the slow tier and nothing is copied into a spill file. Its pages count
 * against the budget, are prefetched, evicted (clean: dropped, never written)
 * and counted like those of allocations, and nf4_pager_free unmaps it. The
 * file must not change while it is mapped: its size, modification time and
 * identity are recorded when it is mapped and checked before the pager touches
 * its pages (every nf4_pager_prefetch of the range); a changed file gives an
 * error naming it (see nf4_pager_map_file), and the pager's own page touches
 * are guarded against SIGBUS. A caller's own reads of the memory after the
 * file was truncated still raise SIGBUS, as for any file mapping.
 *
 * Errors specific to the pager: a spill directory that cannot hold the spill
 * file gives NF4_ERROR_INVALID_ARGUMENT naming the directory and the OS error;
 * a slow tier that cannot store the bytes (disk full, file-size limit, I/O
 * error while writing back) gives NF4_ERROR_OUT_OF_MEMORY. In both cases
 * nf4_pager_last_os_error() gives the errno of the failing system call.
 *
 * Platforms: Linux and macOS. Elsewhere nf4_pager_create fails with
 * NF4_ERROR_INVALID_ARGUMENT ("not supported on this platform").
 *
 * CUDA backend (nf4_pager_create_cuda, builds with CUDA): the fast tier is the
 * memory of one GPU, the slow tier host RAM. Allocations are CUDA managed
 * memory (cudaMallocManaged), so one pointer is valid on the device and on the
 * host. The same functions apply, with these differences:
 *   - nf4_pager_prefetch enqueues cudaMemPrefetchAsync to the device on the
 *     pager's stream (nf4_pager_set_stream; NULL, the legacy default stream,
 *     by default), then evicts least recently used pages of other ranges by
 *     prefetching them to the host (cudaCpuDeviceId), the same LRU over pages
 *     as the host backend. Moves are asynchronous and ordered on that stream;
 *     nf4_pager_synchronize waits for them.
 *   - resident_bytes counts the pages the pager has moved to the device and
 *     not moved back (there is no mincore for device memory): pages a kernel
 *     pulls over by page faults without a prefetch, or pages the driver itself
 *     evicts under oversubscription, are not seen. page_ins / page_outs count
 *     the pager's moves to and from the device.
 *   - On a device without concurrent managed access
 *     (cudaDevAttrConcurrentManagedAccess == 0: Windows, WSL, pre-Pascal GPUs,
 *     some virtualised GPUs; or flag NF4_PAGER_CUDA_NO_PREFETCH) the driver
 *     cannot migrate pages on demand and the host must not touch managed
 *     memory while a kernel runs. There no prefetch is issued (the driver
 *     moves the memory at kernel launch), the LRU and counters are kept (the
 *     budget is bookkeeping only, not enforced), and nf4_pager_alloc,
 *     nf4_pager_evict, nf4_pager_evict_all and nf4_pager_synchronize call
 *     cudaDeviceSynchronize, so the host may touch the memory after them.
 *     nf4_pager_cuda_concurrent_managed() tells which mode a pager is in.
 *   - No spill file: nf4_pager_spill_dir() is "" and nf4_pager_spill_is_tmpfs() 0.
 *   - A failed CUDA call gives NF4_ERROR_CUDA (NF4_ERROR_OUT_OF_MEMORY when an
 *     allocation fails) and nf4_last_error() names the call.
 *   - Status: compiled and linked, NOT yet run on GPU hardware.
 */
#ifndef NF4CORE_PAGER_H
#define NF4CORE_PAGER_H

#include "nf4core/common.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct nf4_pager nf4_pager;

/* Where a pager keeps its fast tier. */
typedef enum nf4_pager_backend {
    NF4_PAGER_HOST = 0, /* RAM + spill file */
    NF4_PAGER_CUDA = 1  /* GPU memory + host RAM, CUDA managed memory (nf4_pager_create_cuda) */
} nf4_pager_backend;

/* Flags of nf4_pager_create_cuda. */
#define NF4_PAGER_CUDA_NO_PREFETCH 1u /* behave as on a device without concurrent managed access */

typedef struct nf4_pager_stats {
    int64_t budget_bytes;    /* fast-tier budget, -1 = unlimited */
    int64_t page_bytes;      /* size of a paging unit */
    int64_t allocated_bytes; /* sum of live allocations, rounded up to OS pages */
    int64_t resident_bytes;  /* bytes of live allocations in the fast tier now (mincore) */
    int64_t spilled_bytes;   /* allocated_bytes - resident_bytes */
    int64_t page_ins;        /* pages (paging units) brought back by nf4_pager_prefetch */
    int64_t page_outs;       /* resident pages (paging units) written back and released */
    int64_t num_allocations; /* live allocations */
    /* Bytes of those page-ins and page-outs: units differ in size (small
     * arrays share slabs paged in 64 KiB units, an allocation's last page is
     * short), so page_ins x page_bytes is not the bytes read. Added in 0.1 after
     * the fields above (callers must be compiled with this header). */
    int64_t page_in_bytes;
    int64_t page_out_bytes;
} nf4_pager_stats;

/* Counters of the file-backed pages (nf4_pager_map_file) and of the spill files. */
typedef struct nf4_pager_file_stats {
    int64_t num_files;      /* distinct files with a live mapping (one descriptor each) */
    int64_t num_mappings;   /* live mappings */
    int64_t mapped_bytes;   /* bytes they map, rounded out to OS pages */
    int64_t resident_bytes; /* of those, in RAM now (mincore) */
    int64_t spill_bytes;    /* disk the spill files take now (their allocated blocks): mapped files never add to it */
} nf4_pager_file_stats;

/* Default paging unit: 2 MiB, a huge page on x86-64 and the granularity at
 * which bitsandbytes' paged optimizers prefetch. */
#define NF4_PAGER_DEFAULT_PAGE_BYTES (2 * 1024 * 1024)

/* budget_bytes < 0: unlimited (nothing is evicted except on request).
 * spill_dir NULL or "": the default directory (see above).
 * page_bytes 0: NF4_PAGER_DEFAULT_PAGE_BYTES; else a positive multiple of the
 * OS page size. */
NF4_API nf4_status nf4_pager_create(int64_t budget_bytes, const char *spill_dir, int64_t page_bytes,
                                    nf4_pager **out);

/* A pager on CUDA device `device` (an ordinal, >= 0) with a device-memory
 * budget; budget_bytes and page_bytes as nf4_pager_create; flags 0 or
 * NF4_PAGER_CUDA_NO_PREFETCH. In a build without CUDA, or without a device,
 * it fails with NF4_ERROR_CUDA; a device without managed memory support gives
 * NF4_ERROR_CUDA too; a device ordinal out of range NF4_ERROR_INVALID_ARGUMENT. */
NF4_API nf4_status nf4_pager_create_cuda(int64_t budget_bytes, int32_t device, int64_t page_bytes, uint32_t flags,
                                         nf4_pager **out);

/* Unmaps (or cudaFree's) every allocation and closes the spill file. NULL is ignored. */
NF4_API void nf4_pager_destroy(nf4_pager *pager);

/* nbytes >= 1. The memory is zero-filled, aligned to the OS page size and
 * counts as spilled until it is touched or prefetched. An allocation of up to
 * 256 KiB is a block of a shared slab (see above): the OS pages after it may
 * belong to another allocation. */
NF4_API nf4_status nf4_pager_alloc(nf4_pager *pager, int64_t nbytes, void **out);

/* ptr must be a pointer returned by nf4_pager_alloc or nf4_pager_map_file on this pager. */
NF4_API nf4_status nf4_pager_free(nf4_pager *pager, void *ptr);

/* [ptr, ptr + nbytes) must lie inside one allocation; nbytes 0 is a no-op.
 * Makes the pages covering it resident and most recently used, then evicts
 * least recently used pages outside it while resident bytes exceed the budget. */
NF4_API nf4_status nf4_pager_prefetch(nf4_pager *pager, const void *ptr, int64_t nbytes);

/* Host backend: maps bytes [offset, offset + nbytes) of the regular file at
 * `path` read-only (PROT_READ, MAP_SHARED; nbytes >= 1, offset >= 0 and any
 * alignment: the OS pages around the range are mapped and *out points at
 * byte `offset`). The mapping is an allocation of the pager: nf4_pager_prefetch,
 * nf4_pager_evict and nf4_pager_free take *out (or a range inside
 * [*out, *out + nbytes)), its pages count in the budget and in the stats
 * (allocated_bytes rounded out to OS pages, num_allocations), and eviction
 * only drops them (madvise/posix_fadvise DONTNEED: they are clean). Mappings
 * of one file share one descriptor. Writing to the memory is a fault (SIGSEGV).
 *
 * Errors: a range outside the file (offset + nbytes > its size), a path that
 * is not a regular file, a CUDA pager: NF4_ERROR_INVALID_ARGUMENT; a file that
 * cannot be opened: NF4_ERROR_INVALID_ARGUMENT with nf4_pager_last_os_error()
 * its errno (ENOENT, EACCES...). A mapped file whose size or modification time
 * changed, or whose path names another file now, makes nf4_pager_prefetch of
 * its mappings (and nf4_pager_map_file of the same file) fail with
 * NF4_ERROR_INVALID_ARGUMENT, last OS error ESTALE, and a message naming the
 * file; nothing of it is touched. Evict and free still work. */
NF4_API nf4_status nf4_pager_map_file(nf4_pager *pager, const char *path, int64_t offset, int64_t nbytes,
                                      const void **out);

/* Counters of the file-backed pages and of the spill files (CUDA backend: all 0). */
NF4_API nf4_status nf4_pager_file_stats_get(nf4_pager *pager, nf4_pager_file_stats *out);

/* Writes the pages covering [ptr, ptr + nbytes) back to the spill file and
 * returns their RAM to the OS; the data stays readable (it faults back in). */
NF4_API nf4_status nf4_pager_evict(nf4_pager *pager, const void *ptr, int64_t nbytes);
NF4_API nf4_status nf4_pager_evict_all(nf4_pager *pager);

NF4_API nf4_status nf4_pager_stats_get(nf4_pager *pager, nf4_pager_stats *out);

/* The backend, spill directory (valid while the pager lives) and whether that
 * directory is a tmpfs (1: eviction cannot return memory to the OS). */
NF4_API nf4_pager_backend nf4_pager_get_backend(const nf4_pager *pager);
NF4_API const char *nf4_pager_spill_dir(const nf4_pager *pager);
NF4_API int32_t nf4_pager_spill_is_tmpfs(const nf4_pager *pager);

/* CUDA backend: the device ordinal; host backend (or NULL): -1. */
NF4_API int32_t nf4_pager_device(const nf4_pager *pager);

/* CUDA backend: 1 if prefetch and eviction migrate pages (the device has
 * concurrent managed access and NF4_PAGER_CUDA_NO_PREFETCH was not given), 0 in
 * the fallback mode described above; host backend (or NULL): 0. */
NF4_API int32_t nf4_pager_cuda_concurrent_managed(const nf4_pager *pager);

/* CUDA backend: the cudaStream_t (as void*) on which prefetch and eviction
 * are enqueued; NULL is the legacy default stream. The stream must stay valid
 * while the pager uses it. Host backend: only NULL is accepted. */
NF4_API nf4_status nf4_pager_set_stream(nf4_pager *pager, void *stream);

/* CUDA backend: waits until every move enqueued so far has finished (and, in
 * the fallback mode, for the whole device). Host backend: returns NF4_OK. */
NF4_API nf4_status nf4_pager_synchronize(nf4_pager *pager);

/* errno of the system call behind this thread's last pager failure, 0 if that
 * failure was not an OS error (or there was none). */
NF4_API int32_t nf4_pager_last_os_error(void);

/* The OS page size (alignment of allocations; page_bytes must be a multiple). */
NF4_API int64_t nf4_pager_os_page_size(void);

#ifdef __cplusplus
}
#endif

#endif /* NF4CORE_PAGER_H */
