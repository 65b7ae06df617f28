# Declarations mirroring nf4core/include/nf4core/*.h (keep in sync): the C API as Cython sees it.
from libc.stdint cimport int32_t, int64_t, uint8_t

cdef extern from "nf4core/nf4core.h" nogil:
    ctypedef enum nf4_status:
        NF4_OK
        NF4_ERROR_INVALID_ARGUMENT
        NF4_ERROR_NON_FINITE
        NF4_ERROR_OUT_OF_MEMORY
        NF4_ERROR_INTERNAL
        NF4_ERROR_CUDA

    ctypedef enum nf4_dtype:
        NF4_FLOAT32
        NF4_FLOAT16
        NF4_BFLOAT16

    const char *nf4_last_error()
    const char *nf4_status_string(nf4_status status)
    const char *nf4_version()
    int64_t nf4_dtype_size(nf4_dtype dtype)

    # codebook.h
    nf4_status nf4_codebook_normal(int32_t bits, float *out)
    double nf4_normal_offset(int32_t bits)
    nf4_status nf4_codebook_fp4(float *out)
    nf4_status nf4_codebook_int4(float *out)
    nf4_status nf4_codebook_dynamic(int32_t is_signed, float *out)
    nf4_status nf4_codebook_by_name(const char *name, float *out, int64_t capacity, int64_t *n)
    double nf4_norm_ppf(double p)

    # quantize.h
    int NF4_MIN_BLOCKSIZE
    int NF4_MAX_BLOCKSIZE
    int NF4_DQ_BLOCKSIZE
    int64_t nf4_num_blocks(int64_t n, int64_t blocksize)
    int64_t nf4_packed_size_4bit(int64_t n)
    int32_t nf4_blocksize_is_valid(int64_t blocksize)
    nf4_status nf4_quantize_4bit(const void *x, nf4_dtype dtype, int64_t n, int64_t blocksize,
                                 const float *codebook, uint8_t *packed, float *absmax)
    nf4_status nf4_dequantize_4bit(const uint8_t *packed, const float *absmax, int64_t n,
                                   int64_t blocksize, const float *codebook, void *out, nf4_dtype out_dtype)
    nf4_status nf4_quantize_8bit(const void *x, nf4_dtype dtype, int64_t n, int64_t blocksize,
                                 const float *codebook, uint8_t *codes, float *absmax)
    nf4_status nf4_dequantize_8bit(const uint8_t *codes, const float *absmax, int64_t n,
                                   int64_t blocksize, const float *codebook, void *out, nf4_dtype out_dtype)
    nf4_status nf4_double_quantize(const float *absmax, int64_t nblocks, const float *dyn_code,
                                   uint8_t *qabsmax, float *nested_absmax, float *offset)
    nf4_status nf4_double_dequantize(const uint8_t *qabsmax, const float *nested_absmax, float offset,
                                     int64_t nblocks, const float *dyn_code, float *absmax)
    nf4_status nf4_quantize_4bit_ref(const void *x, nf4_dtype dtype, int64_t n, int64_t blocksize,
                                     const float *codebook, uint8_t *packed, float *absmax)
    nf4_status nf4_dequantize_4bit_ref(const uint8_t *packed, const float *absmax, int64_t n,
                                       int64_t blocksize, const float *codebook, void *out, nf4_dtype out_dtype)
    nf4_status nf4_quantize_8bit_ref(const void *x, nf4_dtype dtype, int64_t n, int64_t blocksize,
                                     const float *codebook, uint8_t *codes, float *absmax)
    nf4_status nf4_dequantize_8bit_ref(const uint8_t *codes, const float *absmax, int64_t n,
                                       int64_t blocksize, const float *codebook, void *out, nf4_dtype out_dtype)

    # runtime.h
    nf4_status nf4_set_num_threads(int32_t n)
    int32_t nf4_get_num_threads()
    nf4_status nf4_set_thread_num_threads(int32_t n)
    int32_t nf4_get_thread_num_threads()
    nf4_status nf4_set_threading(const char *name)
    const char *nf4_get_threading()
    nf4_status nf4_set_isa(const char *name)
    const char *nf4_get_isa()
    int32_t nf4_isa_available(const char *name)
    int32_t nf4_amx_available()
    nf4_status nf4_set_amx(int32_t enabled)
    int32_t nf4_get_amx()

    # matmul.h
    nf4_status nf4_matmul_4bit(const void *x, nf4_dtype dtype, int64_t M, int64_t N, int64_t K,
                               const uint8_t *packed, const float *scales, int64_t blocksize,
                               const float *codebook, int32_t transpose_w, void *y)
    nf4_status nf4_matmul_4bit_ref(const void *x, nf4_dtype dtype, int64_t M, int64_t N, int64_t K,
                                   const uint8_t *packed, const float *scales, int64_t blocksize,
                                   const float *codebook, int32_t transpose_w, void *y)
    nf4_status nf4_matmul_4bit_decode_tile(const uint8_t *packed, const float *scales, int64_t blocksize,
                                           const float *codebook, int64_t N, int64_t K, int64_t n0,
                                           int64_t n1, int64_t k0, int64_t k1, nf4_dtype dtype, void *out)

    # optim.h
    ctypedef struct nf4_adam_hparams:
        double lr
        double beta1
        double beta2
        double eps
        double weight_decay
        int64_t step
    nf4_status nf4_adam8bit_update(void *param, const void *grad, nf4_dtype dtype, int64_t n,
                                   uint8_t *state1, uint8_t *state2, float *absmax1, float *absmax2,
                                   const float *qmap1, const float *qmap2, int64_t blocksize,
                                   const nf4_adam_hparams *hp, int64_t *skipped)
    # pager.h
    ctypedef struct nf4_pager:
        pass

    ctypedef enum nf4_pager_backend:
        NF4_PAGER_HOST
        NF4_PAGER_CUDA

    ctypedef struct nf4_pager_stats:
        int64_t budget_bytes
        int64_t page_bytes
        int64_t allocated_bytes
        int64_t resident_bytes
        int64_t spilled_bytes
        int64_t page_ins
        int64_t page_outs
        int64_t num_allocations
        int64_t page_in_bytes
        int64_t page_out_bytes

    nf4_status nf4_pager_create(int64_t budget_bytes, const char *spill_dir, int64_t page_bytes, nf4_pager **out)
    void nf4_pager_destroy(nf4_pager *pager)
    nf4_status nf4_pager_alloc(nf4_pager *pager, int64_t nbytes, void **out)
    nf4_status nf4_pager_free(nf4_pager *pager, void *ptr)
    nf4_status nf4_pager_prefetch(nf4_pager *pager, const void *ptr, int64_t nbytes)
    nf4_status nf4_pager_evict(nf4_pager *pager, const void *ptr, int64_t nbytes)
    nf4_status nf4_pager_evict_all(nf4_pager *pager)
    nf4_status nf4_pager_stats_get(nf4_pager *pager, nf4_pager_stats *out)
    nf4_pager_backend nf4_pager_get_backend(const nf4_pager *pager)
    const char *nf4_pager_spill_dir(const nf4_pager *pager)
    int32_t nf4_pager_spill_is_tmpfs(const nf4_pager *pager)
    int32_t nf4_pager_last_os_error()
    int64_t nf4_pager_os_page_size()

    ctypedef struct nf4_pager_file_stats:
        int64_t num_files
        int64_t num_mappings
        int64_t mapped_bytes
        int64_t resident_bytes
        int64_t spill_bytes

    nf4_status nf4_pager_map_file(nf4_pager *pager, const char *path, int64_t offset, int64_t nbytes,
                                  const void **out)
    nf4_status nf4_pager_file_stats_get(nf4_pager *pager, nf4_pager_file_stats *out)
cdef extern from "nf4core/nf4core.h" nogil:
    # cuda.h (data pointers are device pointers; codebook/dyn_code host; stream = cudaStream_t)
    nf4_status nf4_cuda_available(int32_t *built, int32_t *device_count)
    int32_t nf4_cuda_runtime_version()
    nf4_status nf4_cuda_quantize_4bit(const void *x, nf4_dtype dtype, int64_t n, int64_t blocksize,
                                      const float *codebook, uint8_t *packed, float *absmax, void *stream)
    nf4_status nf4_cuda_dequantize_4bit(const uint8_t *packed, const float *absmax, int64_t n, int64_t blocksize,
                                        const float *codebook, void *out, nf4_dtype out_dtype, void *stream)
    nf4_status nf4_cuda_dequantize_4bit_dq(const uint8_t *packed, const uint8_t *qabsmax,
                                           const float *nested_absmax, float offset, int64_t n, int64_t blocksize,
                                           const float *codebook, const float *dyn_code, void *out,
                                           nf4_dtype out_dtype, void *stream)
    nf4_status nf4_cuda_quantize_8bit(const void *x, nf4_dtype dtype, int64_t n, int64_t blocksize,
                                      const float *codebook, uint8_t *codes, float *absmax, void *stream)
    nf4_status nf4_cuda_dequantize_8bit(const uint8_t *codes, const float *absmax, int64_t n, int64_t blocksize,
                                        const float *codebook, void *out, nf4_dtype out_dtype, void *stream)
    nf4_status nf4_cuda_double_quantize(const float *absmax, int64_t nblocks, const float *dyn_code,
                                        uint8_t *qabsmax, float *nested_absmax, float *offset, void *stream)
    nf4_status nf4_cuda_double_dequantize(const uint8_t *qabsmax, const float *nested_absmax, float offset,
                                          int64_t nblocks, const float *dyn_code, float *absmax, void *stream)
    nf4_status nf4_cuda_gemv_4bit(const void *x, nf4_dtype dtype, int64_t M, int64_t N, int64_t K,
                                  const uint8_t *packed, const float *scales, int64_t blocksize,
                                  const float *codebook, void *y, void *stream)
    nf4_status nf4_cuda_gemv_4bit_dq(const void *x, nf4_dtype dtype, int64_t M, int64_t N, int64_t K,
                                     const uint8_t *packed, const uint8_t *qabsmax, const float *nested_absmax,
                                     float offset, int64_t blocksize, const float *codebook,
                                     const float *dyn_code, void *y, void *stream)

cdef extern from "nf4core/nf4core.h" nogil:
    # pager.h, CUDA backend (fails cleanly in builds without CUDA)
    unsigned int NF4_PAGER_CUDA_NO_PREFETCH
    nf4_status nf4_pager_create_cuda(int64_t budget_bytes, int32_t device, int64_t page_bytes, unsigned int flags,
                                     nf4_pager **out)
    int32_t nf4_pager_device(const nf4_pager *pager)
    int32_t nf4_pager_cuda_concurrent_managed(const nf4_pager *pager)
    nf4_status nf4_pager_set_stream(nf4_pager *pager, void *stream)
    nf4_status nf4_pager_synchronize(nf4_pager *pager)
    # cuda.h: 8-bit AdamW on the device (qmap1, qmap2, hp, skipped are host pointers)
    nf4_status nf4_cuda_adam8bit_update(void *param, const void *grad, nf4_dtype dtype, int64_t n,
                                        uint8_t *state1, uint8_t *state2, float *absmax1, float *absmax2,
                                        const float *qmap1, const float *qmap2, int64_t blocksize,
                                        const nf4_adam_hparams *hp, int64_t *skipped, void *stream)

cdef extern from "nf4core/nf4core.h" nogil:
    # gptq.h: calibrated 4-bit rounding (error feedback)
    int64_t NF4_GPTQ_BATCH
    nf4_status nf4_gptq_quantize_4bit(const float *w, int64_t rows, int64_t cols, const float *hinv_chol,
                                      const int64_t *order, int64_t blocksize, const float *codebook,
                                      uint8_t *packed, float *absmax)
    nf4_status nf4_gptq_quantize_4bit_ref(const double *w, int64_t rows, int64_t cols, const double *hinv_chol,
                                          const int64_t *order, int64_t blocksize, const float *codebook,
                                          uint8_t *packed, float *absmax)
