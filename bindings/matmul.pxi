# Products with a 4-bit matrix (thin bindings; see pyqlora._matmul).
from cnf4core cimport nf4_matmul_4bit, nf4_matmul_4bit_decode_tile, nf4_matmul_4bit_ref


def matmul_4bit(const uint8_t[::1] x, int dtype, int64_t M, int64_t N, int64_t K, const uint8_t[::1] packed,
                const float[::1] scales, int64_t blocksize, const float[::1] codebook, bint transpose_w,
                uint8_t[::1] y, bint ref=False):
    # IN: x (raw bytes, M x K or M x N), packed, scales, codebook   OUT: y (raw bytes)
    cdef int64_t esize = nf4_dtype_size(<nf4_dtype>dtype)
    _need(x.shape[0], M * (K if transpose_w else N) * esize, "x")
    _need(packed.shape[0], nf4_packed_size_4bit(N * K), "packed")
    _need(scales.shape[0], nf4_num_blocks(N * K, blocksize), "scales")
    _need(codebook.shape[0], 16, "codebook")
    _need(y.shape[0], M * (N if transpose_w else K) * esize, "y")
    cdef nf4_status st
    with nogil:
        if ref:
            st = nf4_matmul_4bit_ref(&x[0], <nf4_dtype>dtype, M, N, K, &packed[0], &scales[0], blocksize,
                                     &codebook[0], transpose_w, &y[0])
        else:
            st = nf4_matmul_4bit(&x[0], <nf4_dtype>dtype, M, N, K, &packed[0], &scales[0], blocksize,
                                 &codebook[0], transpose_w, &y[0])
    check(st)


def matmul_4bit_decode_tile(const uint8_t[::1] packed, const float[::1] scales, int64_t blocksize,
                            const float[::1] codebook, int64_t N, int64_t K, int64_t n0, int64_t n1, int64_t k0,
                            int64_t k1, int dtype, uint8_t[::1] out):
    # IN: packed, scales, codebook   OUT: out (raw bytes, (n1 - n0) x (k1 - k0))
    _need(packed.shape[0], nf4_packed_size_4bit(N * K), "packed")
    _need(scales.shape[0], nf4_num_blocks(N * K, blocksize), "scales")
    _need(codebook.shape[0], 16, "codebook")
    if n1 > n0 and k1 > k0:
        _need(out.shape[0], (n1 - n0) * (k1 - k0) * nf4_dtype_size(<nf4_dtype>dtype), "out")
    cdef nf4_status st
    with nogil:
        st = nf4_matmul_4bit_decode_tile(&packed[0], &scales[0], blocksize, &codebook[0], N, K, n0, n1, k0, k1,
                                         <nf4_dtype>dtype, &out[0])
    check(st)


cdef class FusedMatrix:
    """A 2-D 4-bit matrix's kernel arguments, checked once (internal: pyqlora._matmul.fused_matrix).

    :meth:`matmul` then takes raw addresses and sizes, so a product with one or a few
    rows (a decode step calls 210 of them) costs the kernel and little else. The
    arrays stay alive as long as this object.
    """
    cdef object keep
    cdef const uint8_t *packed
    cdef const float *scales
    cdef const float *codebook
    cdef readonly int64_t N, K, blocksize

    def __cinit__(self, const uint8_t[::1] packed, const float[::1] scales, int64_t blocksize,
                  const float[::1] codebook, int64_t N, int64_t K):
        if N <= 0 or K <= 0:
            raise ValueError(f"matrix shape must be positive, got ({N}, {K})")
        _need(packed.shape[0], nf4_packed_size_4bit(N * K), "packed")
        _need(scales.shape[0], nf4_num_blocks(N * K, blocksize), "scales")
        _need(codebook.shape[0], 16, "codebook")
        self.keep = (packed, scales, codebook)
        self.packed, self.scales, self.codebook = &packed[0], &scales[0], &codebook[0]
        self.N, self.K, self.blocksize = N, K, blocksize

    def matmul(self, size_t x, int dtype, int64_t M, bint transpose_w, size_t y):
        # x: M x K (transpose_w) or M x N contiguous elements of `dtype` at address x; y: the result's
        # M x N or M x K at address y. The caller owns both buffers and their sizes (no check here).
        cdef nf4_status st
        with nogil:
            st = nf4_matmul_4bit(<const void *>x, <nf4_dtype>dtype, M, self.N, self.K, self.packed, self.scales,
                                 self.blocksize, self.codebook, transpose_w, <void *>y)
        check(st)
