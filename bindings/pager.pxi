# The pager (thin bindings; policy and validation live in pyqlora._pager).
from libc.stdint cimport int32_t, int64_t, uintptr_t

from cnf4core cimport (nf4_pager, nf4_pager_alloc, nf4_pager_create, nf4_pager_destroy, nf4_pager_evict,
                       nf4_pager_evict_all, nf4_pager_free, nf4_pager_get_backend, nf4_pager_last_os_error,
                       nf4_pager_os_page_size, nf4_pager_prefetch, nf4_pager_spill_dir, nf4_pager_spill_is_tmpfs,
                       nf4_pager_stats, nf4_pager_stats_get, nf4_status, NF4_OK, nf4_last_error, NF4_PAGER_HOST,
                       nf4_pager_create_cuda, nf4_pager_device, nf4_pager_cuda_concurrent_managed,
                       nf4_pager_set_stream, nf4_pager_synchronize, NF4_PAGER_CUDA_NO_PREFETCH,
                       nf4_pager_map_file, nf4_pager_file_stats, nf4_pager_file_stats_get)


cdef int pager_check(nf4_status status) except -1:
    """check(), but an OS failure (errno set by the pager) becomes OSError(errno, message)."""
    if status == NF4_OK:
        return 0
    cdef int err = nf4_pager_last_os_error()
    if err != 0:
        raise OSError(err, nf4_last_error().decode("utf-8", "replace"))
    return check(status)


def pager_os_page_size():
    return nf4_pager_os_page_size()


cdef class PagerHandle:
    """Owns one nf4_pager; destroyed (every mapping released) when the last reference goes.

    device < 0: the host backend (spill file in spill_dir); device >= 0: the
    CUDA backend on that device (spill_dir ignored; no_prefetch forces the
    fallback mode of devices without concurrent managed access).
    """
    cdef nf4_pager *p

    def __cinit__(self, int64_t budget_bytes, spill_dir, int64_t page_bytes, int32_t device=-1,
                  bint no_prefetch=False):
        cdef bytes bdir = b"" if spill_dir is None else spill_dir
        cdef const char *cdir = bdir
        cdef unsigned int flags = NF4_PAGER_CUDA_NO_PREFETCH if no_prefetch else 0
        cdef nf4_status st
        if device < 0:
            with nogil:
                st = nf4_pager_create(budget_bytes, cdir, page_bytes, &self.p)
        else:
            with nogil:
                st = nf4_pager_create_cuda(budget_bytes, device, page_bytes, flags, &self.p)
        pager_check(st)

    def __dealloc__(self):
        if self.p is not NULL:
            nf4_pager_destroy(self.p)
            self.p = NULL

    def alloc(self, int64_t nbytes):
        cdef void *out = NULL
        cdef nf4_status st
        with nogil:
            st = nf4_pager_alloc(self.p, nbytes, &out)
        pager_check(st)
        return <uintptr_t>out

    def map_file(self, bytes path, int64_t offset, int64_t nbytes):
        """Address of bytes [offset, offset + nbytes) of file `path`, mapped read-only (free() unmaps it)."""
        cdef const char *cpath = path
        cdef const void *out = NULL
        cdef nf4_status st
        with nogil:
            st = nf4_pager_map_file(self.p, cpath, offset, nbytes, &out)
        pager_check(st)
        return <uintptr_t>out

    def file_stats(self):
        cdef nf4_pager_file_stats s
        cdef nf4_status st
        with nogil:
            st = nf4_pager_file_stats_get(self.p, &s)
        pager_check(st)
        return {
            "mapped_files": s.num_files,
            "mapped_allocations": s.num_mappings,
            "mapped_bytes": s.mapped_bytes,
            "mapped_resident_bytes": s.resident_bytes,
            "spill_file_bytes": s.spill_bytes,
        }

    def free(self, uintptr_t ptr):
        cdef nf4_status st
        with nogil:
            st = nf4_pager_free(self.p, <void *>ptr)
        pager_check(st)

    def prefetch(self, uintptr_t ptr, int64_t nbytes):
        cdef nf4_status st
        with nogil:
            st = nf4_pager_prefetch(self.p, <const void *>ptr, nbytes)
        pager_check(st)

    def evict(self, uintptr_t ptr, int64_t nbytes):
        cdef nf4_status st
        with nogil:
            st = nf4_pager_evict(self.p, <const void *>ptr, nbytes)
        pager_check(st)

    def evict_all(self):
        cdef nf4_status st
        with nogil:
            st = nf4_pager_evict_all(self.p)
        pager_check(st)

    def stats(self):
        cdef nf4_pager_stats s
        cdef nf4_status st
        with nogil:
            st = nf4_pager_stats_get(self.p, &s)
        pager_check(st)
        return {
            "budget_bytes": s.budget_bytes,
            "page_bytes": s.page_bytes,
            "allocated_bytes": s.allocated_bytes,
            "resident_bytes": s.resident_bytes,
            "spilled_bytes": s.spilled_bytes,
            "page_ins": s.page_ins,
            "page_outs": s.page_outs,
            "num_allocations": s.num_allocations,
            "page_in_bytes": s.page_in_bytes,
            "page_out_bytes": s.page_out_bytes,
        }

    @property
    def spill_dir(self):
        return (<bytes>nf4_pager_spill_dir(self.p)).decode("utf-8", "surrogateescape")

    @property
    def spill_is_tmpfs(self):
        return bool(nf4_pager_spill_is_tmpfs(self.p))

    @property
    def backend(self):
        return "host" if nf4_pager_get_backend(self.p) == NF4_PAGER_HOST else "cuda"

    @property
    def device(self):
        return nf4_pager_device(self.p)

    @property
    def concurrent_managed(self):
        return bool(nf4_pager_cuda_concurrent_managed(self.p))

    def set_stream(self, uintptr_t stream):
        pager_check(nf4_pager_set_stream(self.p, <void *>stream))

    def synchronize(self):
        cdef nf4_status st
        with nogil:
            st = nf4_pager_synchronize(self.p)
        pager_check(st)
