# Codebook tables from nf4core (thin bindings; see pyqlora._codebooks).
from libc.stdint cimport int64_t

import numpy as np

from cnf4core cimport nf4_codebook_by_name, nf4_norm_ppf, nf4_normal_offset, nf4_version


def codebook_by_name(str name):
    """Return the float32 table of the built-in codebook `name` (index = code)."""
    cdef bytes bname = name.encode("ascii")
    cdef const char *cname = bname
    cdef int64_t n = 0
    check(nf4_codebook_by_name(cname, NULL, 0, &n))
    out = np.empty(n, dtype=np.float32)
    cdef float[::1] view = out
    check(nf4_codebook_by_name(cname, &view[0], n, &n))
    return out


def norm_ppf(double p):
    """Inverse standard normal CDF as implemented in nf4core."""
    return nf4_norm_ppf(p)


def normal_offset(int bits):
    """The outermost quantile nf4core uses for NF-`bits`."""
    return nf4_normal_offset(bits)


def core_version():
    return nf4_version().decode("ascii")
