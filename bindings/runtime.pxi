# Run-time settings of nf4core: threads and instruction-set path (thin bindings).
from cnf4core cimport (nf4_amx_available, nf4_get_amx, nf4_get_isa, nf4_get_num_threads, nf4_get_threading,
                       nf4_isa_available, nf4_set_amx, nf4_set_isa, nf4_set_num_threads, nf4_set_threading,
                       nf4_get_thread_num_threads, nf4_set_thread_num_threads)


def set_num_threads(int n):
    check(nf4_set_num_threads(n))


def get_num_threads():
    return nf4_get_num_threads()


def set_thread_num_threads(int n):
    """The calling thread's override (0: none); other threads never see it."""
    check(nf4_set_thread_num_threads(n))


def get_thread_num_threads():
    return nf4_get_thread_num_threads()


def set_threading(str name):
    cdef bytes b = name.encode("ascii")
    check(nf4_set_threading(b))


def get_threading():
    return nf4_get_threading().decode("ascii")


def set_isa(str name):
    cdef bytes b = name.encode("ascii")
    check(nf4_set_isa(b))


def get_isa():
    return nf4_get_isa().decode("ascii")


def isa_available(str name):
    cdef bytes b = name.encode("ascii")
    return bool(nf4_isa_available(b))


def amx_available():
    return bool(nf4_amx_available())


def set_amx(bint enabled):
    check(nf4_set_amx(enabled))


def get_amx():
    return bool(nf4_get_amx())
