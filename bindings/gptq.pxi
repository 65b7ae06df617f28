# Calibrated 4-bit rounding (nf4core/include/nf4core/gptq.h).
#
# pyqlora._quantize checks H, dampens it, factors its inverse (NumPy's LAPACK)
# and normalizes every array; here only the lengths are re-checked and the GIL
# released around the C call.
from libc.stdint cimport int64_t, uint8_t

from cnf4core cimport *


def gptq_quantize(w, int64_t rows, int64_t cols, hinv_chol, const int64_t[::1] order, int64_t blocksize,
                  const float[::1] codebook, uint8_t[::1] packed, float[::1] absmax, bint ref=False):
    """Error-feedback 4-bit quantization of a rows x cols weight.

    # IN: w (rows*cols float32, or float64 with ref), hinv_chol (cols*cols, same dtype),
    #     order (cols int64, or empty for the natural order), codebook (16 floats)
    # OUT: packed, absmax
    """
    cdef const float[::1] w32
    cdef const float[::1] u32
    cdef const double[::1] w64
    cdef const double[::1] u64
    cdef const int64_t *po = NULL
    cdef int64_t n = rows * cols
    _need(codebook.shape[0], 16, "codebook")
    _need(packed.shape[0], nf4_packed_size_4bit(n), "packed")
    _need(absmax.shape[0], nf4_num_blocks(n, blocksize), "absmax")
    if order.shape[0] != 0:
        _need(order.shape[0], cols, "order")
        po = &order[0]
    cdef nf4_status st
    if ref:
        w64 = w
        u64 = hinv_chol
        _need(w64.shape[0], n, "w")
        _need(u64.shape[0], cols * cols, "hinv_chol")
        with nogil:
            st = nf4_gptq_quantize_4bit_ref(&w64[0], rows, cols, &u64[0], po, blocksize, &codebook[0],
                                            &packed[0], &absmax[0])
    else:
        w32 = w
        u32 = hinv_chol
        _need(w32.shape[0], n, "w")
        _need(u32.shape[0], cols * cols, "hinv_chol")
        with nogil:
            st = nf4_gptq_quantize_4bit(&w32[0], rows, cols, &u32[0], po, blocksize, &codebook[0],
                                        &packed[0], &absmax[0])
    check(st)


GPTQ_BATCH = NF4_GPTQ_BATCH
