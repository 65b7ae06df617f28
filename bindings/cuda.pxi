# The CUDA kernels of nf4core (thin bindings; see pyqlora._cuda).
#
# Device arrays arrive as integer addresses (torch's data_ptr(), or the
# `data` pointer of __cuda_array_interface__) and the stream as an integer
# cudaStream_t (0: the legacy default stream); pyqlora._cuda validates shapes,
# dtypes, devices and contiguity first. Codebooks are host float32 arrays.
# In a build without CUDA every call raises RuntimeError ("built without CUDA").
from libc.stdint cimport int32_t, int64_t, uint8_t, uintptr_t

from cnf4core cimport *


def cuda_available():
    """(built, device_count): whether nf4core has CUDA kernels and how many devices it sees."""
    cdef int32_t built = 0
    cdef int32_t count = 0
    check(nf4_cuda_available(&built, &count))
    return bool(built), int(count)


def cuda_runtime_version():
    """The CUDA runtime version nf4core was built with (e.g. 13000), 0 without CUDA."""
    return nf4_cuda_runtime_version()


def cuda_quantize(int bits, uintptr_t x, int dtype, int64_t n, int64_t blocksize, const float[::1] codebook,
                  uintptr_t codes, uintptr_t absmax, uintptr_t stream=0):
    # IN: x (device), codebook (host, 2**bits)   OUT: codes, absmax (device). Waits for the stream.
    _need(codebook.shape[0], 1 << bits, "codebook")
    cdef nf4_status st
    if bits == 4:
        with nogil:
            st = nf4_cuda_quantize_4bit(<const void *>x, <nf4_dtype>dtype, n, blocksize, &codebook[0],
                                        <uint8_t *>codes, <float *>absmax, <void *>stream)
    elif bits == 8:
        with nogil:
            st = nf4_cuda_quantize_8bit(<const void *>x, <nf4_dtype>dtype, n, blocksize, &codebook[0],
                                        <uint8_t *>codes, <float *>absmax, <void *>stream)
    else:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    check(st)


def cuda_dequantize(int bits, uintptr_t codes, uintptr_t absmax, int64_t n, int64_t blocksize,
                    const float[::1] codebook, uintptr_t out, int dtype, uintptr_t stream=0):
    # IN: codes, absmax (device), codebook (host)   OUT: out (device). Asynchronous.
    _need(codebook.shape[0], 1 << bits, "codebook")
    cdef nf4_status st
    if bits == 4:
        with nogil:
            st = nf4_cuda_dequantize_4bit(<const uint8_t *>codes, <const float *>absmax, n, blocksize,
                                          &codebook[0], <void *>out, <nf4_dtype>dtype, <void *>stream)
    elif bits == 8:
        with nogil:
            st = nf4_cuda_dequantize_8bit(<const uint8_t *>codes, <const float *>absmax, n, blocksize,
                                          &codebook[0], <void *>out, <nf4_dtype>dtype, <void *>stream)
    else:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    check(st)


def cuda_dequantize_4bit_dq(uintptr_t packed, uintptr_t qabsmax, uintptr_t nested_absmax, float offset, int64_t n,
                            int64_t blocksize, const float[::1] codebook, const float[::1] dyn_code, uintptr_t out,
                            int dtype, uintptr_t stream=0):
    # IN: packed, qabsmax, nested_absmax (device), offset, codebook, dyn_code (host)   OUT: out (device)
    _need(codebook.shape[0], 16, "codebook")
    _need(dyn_code.shape[0], 256, "dyn_code")
    cdef nf4_status st
    with nogil:
        st = nf4_cuda_dequantize_4bit_dq(<const uint8_t *>packed, <const uint8_t *>qabsmax,
                                         <const float *>nested_absmax, offset, n, blocksize, &codebook[0],
                                         &dyn_code[0], <void *>out, <nf4_dtype>dtype, <void *>stream)
    check(st)


def cuda_double_quantize(uintptr_t absmax, int64_t nblocks, const float[::1] dyn_code, uintptr_t qabsmax,
                         uintptr_t nested_absmax, uintptr_t stream=0):
    # IN: absmax (device), dyn_code (host)   OUT: qabsmax, nested_absmax (device); returns the offset
    _need(dyn_code.shape[0], 256, "dyn_code")
    cdef float offset = 0
    cdef nf4_status st
    with nogil:
        st = nf4_cuda_double_quantize(<const float *>absmax, nblocks, &dyn_code[0], <uint8_t *>qabsmax,
                                      <float *>nested_absmax, &offset, <void *>stream)
    check(st)
    return offset


def cuda_double_dequantize(uintptr_t qabsmax, uintptr_t nested_absmax, float offset, int64_t nblocks,
                           const float[::1] dyn_code, uintptr_t absmax, uintptr_t stream=0):
    # IN: qabsmax, nested_absmax (device), offset, dyn_code (host)   OUT: absmax (device)
    _need(dyn_code.shape[0], 256, "dyn_code")
    cdef nf4_status st
    with nogil:
        st = nf4_cuda_double_dequantize(<const uint8_t *>qabsmax, <const float *>nested_absmax, offset, nblocks,
                                        &dyn_code[0], <float *>absmax, <void *>stream)
    check(st)


def cuda_gemv(uintptr_t x, int dtype, int64_t M, int64_t N, int64_t K, uintptr_t packed, uintptr_t scales,
              int64_t blocksize, const float[::1] codebook, uintptr_t y, uintptr_t stream=0):
    # IN: x, packed, scales (device), codebook (host)   OUT: y (device), y = x W^T
    _need(codebook.shape[0], 16, "codebook")
    cdef nf4_status st
    with nogil:
        st = nf4_cuda_gemv_4bit(<const void *>x, <nf4_dtype>dtype, M, N, K, <const uint8_t *>packed,
                                <const float *>scales, blocksize, &codebook[0], <void *>y, <void *>stream)
    check(st)


def cuda_gemv_dq(uintptr_t x, int dtype, int64_t M, int64_t N, int64_t K, uintptr_t packed, uintptr_t qabsmax,
                 uintptr_t nested_absmax, float offset, int64_t blocksize, const float[::1] codebook,
                 const float[::1] dyn_code, uintptr_t y, uintptr_t stream=0):
    # IN: x, packed, qabsmax, nested_absmax (device), offset, codebook, dyn_code (host)   OUT: y (device)
    _need(codebook.shape[0], 16, "codebook")
    _need(dyn_code.shape[0], 256, "dyn_code")
    cdef nf4_status st
    with nogil:
        st = nf4_cuda_gemv_4bit_dq(<const void *>x, <nf4_dtype>dtype, M, N, K, <const uint8_t *>packed,
                                   <const uint8_t *>qabsmax, <const float *>nested_absmax, offset, blocksize,
                                   &codebook[0], &dyn_code[0], <void *>y, <void *>stream)
    check(st)


def cuda_adam8bit_update(uintptr_t param, uintptr_t grad, int dtype, int64_t n, uintptr_t state1, uintptr_t state2,
                         uintptr_t absmax1, uintptr_t absmax2, const float[::1] qmap1, const float[::1] qmap2,
                         int64_t blocksize, double lr, double beta1, double beta2, double eps, double weight_decay,
                         int64_t step, uintptr_t stream=0):
    # IN/OUT: param, state1, state2, absmax1, absmax2 (device)   IN: grad (device), qmap1, qmap2 (host)
    # Waits for the stream; returns the number of elements skipped for a non-finite gradient.
    _need(qmap1.shape[0], 256, "qmap1")
    _need(qmap2.shape[0], 256, "qmap2")
    cdef nf4_adam_hparams hp
    hp.lr = lr
    hp.beta1 = beta1
    hp.beta2 = beta2
    hp.eps = eps
    hp.weight_decay = weight_decay
    hp.step = step
    cdef int64_t skipped = 0
    cdef nf4_status st
    with nogil:
        st = nf4_cuda_adam8bit_update(<void *>param, <const void *>grad, <nf4_dtype>dtype, n, <uint8_t *>state1,
                                      <uint8_t *>state2, <float *>absmax1, <float *>absmax2, &qmap1[0], &qmap2[0],
                                      blocksize, &hp, &skipped, <void *>stream)
    check(st)
    return skipped
