# Blockwise quantization kernels from nf4core.
#
# Thin layer: pyqlora._quantize validates and normalizes every argument (dtype,
# contiguity, sizes) before calling these; here we only re-check buffer lengths,
# so that a wrong call raises instead of corrupting memory, and release the GIL
# around each C call. Inputs of any element type arrive as raw bytes (`x`) plus
# an nf4_dtype code.
from libc.stdint cimport int64_t, uint8_t

from cnf4core cimport *


cdef inline int _need(Py_ssize_t have, int64_t want, str what) except -1:
    if have < want:
        raise ValueError(f"{what}: buffer holds {have} items, needs {want}")
    return 0


ctypedef nf4_status (*quantize_fn)(const void *, nf4_dtype, int64_t, int64_t, const float *, uint8_t *,
                                   float *) noexcept nogil
ctypedef nf4_status (*dequantize_fn)(const uint8_t *, const float *, int64_t, int64_t, const float *, void *,
                                     nf4_dtype) noexcept nogil


def quantize(int bits, const uint8_t[::1] x, int dtype, int64_t n, int64_t blocksize,
             const float[::1] codebook, uint8_t[::1] codes, float[::1] absmax, bint ref=False):
    """Blockwise `bits`-bit quantization (4: packed nibbles, 8: one byte per element).

    # IN: x (raw bytes of n elements of dtype), codebook (2**bits values)
    # OUT: codes, absmax
    """
    cdef quantize_fn fn
    if bits == 4:
        fn = nf4_quantize_4bit_ref if ref else nf4_quantize_4bit
    elif bits == 8:
        fn = nf4_quantize_8bit_ref if ref else nf4_quantize_8bit
    else:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    _need(x.shape[0], n * nf4_dtype_size(<nf4_dtype>dtype), "x")
    _need(codebook.shape[0], 1 << bits, "codebook")
    _need(codes.shape[0], nf4_packed_size_4bit(n) if bits == 4 else n, "codes")
    _need(absmax.shape[0], nf4_num_blocks(n, blocksize), "absmax")
    cdef nf4_status st
    with nogil:
        st = fn(&x[0], <nf4_dtype>dtype, n, blocksize, &codebook[0], &codes[0], &absmax[0])
    check(st)


def dequantize(int bits, const uint8_t[::1] codes, const float[::1] absmax, int64_t n, int64_t blocksize,
               const float[::1] codebook, uint8_t[::1] out, int dtype, bint ref=False):
    """Inverse of quantize.

    # IN: codes, absmax, codebook   OUT: out (raw bytes of n elements of dtype)
    """
    cdef dequantize_fn fn
    if bits == 4:
        fn = nf4_dequantize_4bit_ref if ref else nf4_dequantize_4bit
    elif bits == 8:
        fn = nf4_dequantize_8bit_ref if ref else nf4_dequantize_8bit
    else:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    _need(codes.shape[0], nf4_packed_size_4bit(n) if bits == 4 else n, "codes")
    _need(absmax.shape[0], nf4_num_blocks(n, blocksize), "absmax")
    _need(codebook.shape[0], 1 << bits, "codebook")
    _need(out.shape[0], n * nf4_dtype_size(<nf4_dtype>dtype), "out")
    cdef nf4_status st
    with nogil:
        st = fn(&codes[0], &absmax[0], n, blocksize, &codebook[0], &out[0], <nf4_dtype>dtype)
    check(st)


def double_quantize(const float[::1] absmax, const float[::1] dyn_code, uint8_t[::1] qabsmax,
                    float[::1] nested_absmax):
    # IN: absmax, dyn_code   OUT: qabsmax, nested_absmax; returns the offset
    cdef int64_t nblocks = absmax.shape[0]
    _need(dyn_code.shape[0], 256, "dyn_code")
    _need(qabsmax.shape[0], nblocks, "qabsmax")
    _need(nested_absmax.shape[0], nf4_num_blocks(nblocks, NF4_DQ_BLOCKSIZE), "nested_absmax")
    cdef float offset = 0
    cdef nf4_status st
    with nogil:
        st = nf4_double_quantize(&absmax[0], nblocks, &dyn_code[0], &qabsmax[0], &nested_absmax[0], &offset)
    check(st)
    return offset


def double_dequantize(const uint8_t[::1] qabsmax, const float[::1] nested_absmax, float offset,
                      const float[::1] dyn_code, float[::1] absmax):
    # IN: qabsmax, nested_absmax, offset, dyn_code   OUT: absmax
    cdef int64_t nblocks = qabsmax.shape[0]
    _need(nested_absmax.shape[0], nf4_num_blocks(nblocks, NF4_DQ_BLOCKSIZE), "nested_absmax")
    _need(dyn_code.shape[0], 256, "dyn_code")
    _need(absmax.shape[0], nblocks, "absmax")
    cdef nf4_status st
    with nogil:
        st = nf4_double_dequantize(&qabsmax[0], &nested_absmax[0], offset, nblocks, &dyn_code[0], &absmax[0])
    check(st)


def num_blocks(int64_t n, int64_t blocksize):
    return nf4_num_blocks(n, blocksize)


def blocksize_is_valid(int64_t blocksize):
    return bool(nf4_blocksize_is_valid(blocksize))


MIN_BLOCKSIZE = NF4_MIN_BLOCKSIZE
MAX_BLOCKSIZE = NF4_MAX_BLOCKSIZE
DQ_BLOCKSIZE = NF4_DQ_BLOCKSIZE
