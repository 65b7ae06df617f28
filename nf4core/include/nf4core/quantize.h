/*
 * nf4core — blockwise 4-bit and 8-bit quantization and double quantization,
 * byte-compatible with bitsandbytes (see docs/format.md for the full spec).
 *
 * A tensor of n elements is read flat (C order) and cut into blocks of
 * `blocksize` consecutive elements; the last block may be shorter and has its
 * own scale. Each block stores absmax = max |x| (float32); each element stores
 * the code of the codebook value nearest to x / absmax (ties go to the lower
 * value). 4-bit codes are packed two per byte, the first (even) element in the
 * high nibble; an odd n pads the last low nibble with the code of 0.0.
 * Inputs must be finite: a NaN or Inf gives NF4_ERROR_NON_FINITE and the
 * message names its flat index. An all-zero block has absmax 0 and decodes to
 * exact zeros.
 *
 * Valid blocksizes: powers of two from 32 to 4096 (NF4_MIN/MAX_BLOCKSIZE).
 *
 * Aliasing (common.h): in every function below, no OUT buffer may overlap an
 * input buffer (x, packed/codes, absmax, codebook, dyn_code, ...) or another
 * OUT buffer, not even as the same pointer; such calls return
 * NF4_ERROR_INVALID_ARGUMENT. The sizes the overlap check and the overflow
 * check use are the ones listed for each argument.
 */
#ifndef NF4CORE_QUANTIZE_H
#define NF4CORE_QUANTIZE_H

#include "nf4core/common.h"

#ifdef __cplusplus
extern "C" {
#endif

#define NF4_MIN_BLOCKSIZE 32
#define NF4_MAX_BLOCKSIZE 4096
/* Double quantization: the nested blocksize bitsandbytes uses (and requires). */
#define NF4_DQ_BLOCKSIZE 256

/* Number of blocks for n elements: ceil(n / blocksize). -1 on bad arguments. */
NF4_API int64_t nf4_num_blocks(int64_t n, int64_t blocksize);

/* Bytes of packed 4-bit codes for n elements: ceil(n / 2). -1 on bad arguments. */
NF4_API int64_t nf4_packed_size_4bit(int64_t n);

/* 1 if blocksize is valid for the 4-bit and 8-bit kernels, else 0. */
NF4_API int32_t nf4_blocksize_is_valid(int64_t blocksize);

/*
 * 4-bit blockwise quantization.
 *   x:        n elements of `dtype`
 *   codebook: 16 finite float32 values (index = code)
 *   packed:   OUT, nf4_packed_size_4bit(n) bytes
 *   absmax:   OUT, nf4_num_blocks(n, blocksize) floats
 */
NF4_API nf4_status nf4_quantize_4bit(const void *x, nf4_dtype dtype, int64_t n, int64_t blocksize,
                                     const float *codebook, uint8_t *packed, float *absmax);

/* out[i] = to_dtype(codebook[code_i] * absmax[i / blocksize]), product in float32.
 * packed: nf4_packed_size_4bit(n) bytes; out: OUT, n elements of out_dtype. */
NF4_API nf4_status nf4_dequantize_4bit(const uint8_t *packed, const float *absmax, int64_t n,
                                       int64_t blocksize, const float *codebook, void *out,
                                       nf4_dtype out_dtype);

/*
 * 8-bit blockwise quantization (bitsandbytes' quantize_blockwise): one byte per
 * element, codebook of 256 finite float32 values (e.g. nf4_codebook_dynamic).
 *   codes:  OUT, n bytes;  absmax: OUT, nf4_num_blocks(n, blocksize) floats
 */
NF4_API nf4_status nf4_quantize_8bit(const void *x, nf4_dtype dtype, int64_t n, int64_t blocksize,
                                     const float *codebook, uint8_t *codes, float *absmax);

NF4_API nf4_status nf4_dequantize_8bit(const uint8_t *codes, const float *absmax, int64_t n,
                                       int64_t blocksize, const float *codebook, void *out,
                                       nf4_dtype out_dtype);

/*
 * Double quantization of block scales (QLoRA Sec. 3, bitsandbytes'
 * compress_statistics=True):
 *   offset        = mean(absmax)                        (double sum, rounded to float32)
 *   qabsmax, nested_absmax = quantize_8bit(absmax - offset, blocksize 256, dyn_code)
 *   absmax[i]    ~= dyn_code[qabsmax[i]] * nested_absmax[i / 256] + offset
 * absmax must be >= 0 (negative: NF4_ERROR_INVALID_ARGUMENT) and finite
 * (NaN/Inf: NF4_ERROR_NON_FINITE; the message names the index); dyn_code is
 * the signed dynamic map (256 floats).
 *   qabsmax: OUT, nblocks bytes; nested_absmax: OUT, nf4_num_blocks(nblocks, 256)
 *   floats; offset: OUT, one float.
 */
NF4_API nf4_status nf4_double_quantize(const float *absmax, int64_t nblocks, const float *dyn_code,
                                       uint8_t *qabsmax, float *nested_absmax, float *offset);

/* absmax[i] = dyn_code[qabsmax[i]] * nested_absmax[i / 256] + offset (two float32 roundings).
 * absmax: OUT, nblocks floats. A NaN/Inf offset gives NF4_ERROR_NON_FINITE. */
NF4_API nf4_status nf4_double_dequantize(const uint8_t *qabsmax, const float *nested_absmax,
                                         float offset, int64_t nblocks, const float *dyn_code,
                                         float *absmax);

/*
 * Scalar reference kernels: the readable definition of every kernel above,
 * kept for tests that compare optimized paths against them. Same contracts.
 */
NF4_API nf4_status nf4_quantize_4bit_ref(const void *x, nf4_dtype dtype, int64_t n, int64_t blocksize,
                                         const float *codebook, uint8_t *packed, float *absmax);
NF4_API nf4_status nf4_dequantize_4bit_ref(const uint8_t *packed, const float *absmax, int64_t n,
                                           int64_t blocksize, const float *codebook, void *out,
                                           nf4_dtype out_dtype);
NF4_API nf4_status nf4_quantize_8bit_ref(const void *x, nf4_dtype dtype, int64_t n, int64_t blocksize,
                                         const float *codebook, uint8_t *codes, float *absmax);
NF4_API nf4_status nf4_dequantize_8bit_ref(const uint8_t *codes, const float *absmax, int64_t n,
                                           int64_t blocksize, const float *codebook, void *out,
                                           nf4_dtype out_dtype);

#ifdef __cplusplus
}
#endif

#endif /* NF4CORE_QUANTIZE_H */
