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
