/*
 * nf4core — products with a 4-bit quantized matrix, without materializing it.
 *
 * W is an N x K matrix (N = out_features, K = in_features, row-major, as
 * quantized by nf4_quantize_4bit) given by its packed codes, its float32 block
 * scales (decode double-quantized scales first with nf4_double_dequantize) and
 * its 16-entry codebook.
 *
 *   transpose_w = 1:  y (M x N) = x (M x K) . W^T     (torch.nn.functional.linear)
 *   transpose_w = 0:  y (M x K) = x (M x N) . W       (grad_input = grad_output . W)
 *
 * x and y are row-major, both float32 or both bfloat16; products and sums are
 * float32. Up to 4 rows of bfloat16 x (and any number of float32 rows, or where
 * AMX is off), the weight is decoded block by block into registers and
 * streamed once per group of 8 rows of x, so small M (generation) is bound by
 * reading the 4-bit weight; threads split the output columns.
 *
 * With 5 or more rows of bfloat16 x and AMX in use (runtime.h: nf4_get_amx),
 * the product runs on AMX tiles: panels of W of about 1 MiB are decoded into
 * bfloat16, the values of nf4_dequantize_4bit to bfloat16 (so the weight is
 * rounded to bfloat16 as in dequantize-then-bf16-GEMM), and used for up to
 * 1024 rows of x each; sums are float32 (the tile unit treats bfloat16
 * subnormals, in x or in the rounded weights, as zero). Needs K % 32 == 0,
 * else the vector kernel runs.
 * Threads split the panels; x is copied once per call into the tile layout
 * (up to 1024 rows at a time). Each thread keeps its buffers for the next call:
 * two panels and float32 partial sums (a few MiB), and the caller x packed.
 *
 * The vector kernels need every row of W to hold whole blocks: K a multiple
 * of 16 and of blocksize. Other shapes (blocks that straddle rows, K = 1376
 * with blocksize 64, say) run the scalar reference, but for bfloat16 x on AMX
 * as above: 120-230x the time of decoding tiles for a dense GEMM at 64-512
 * rows, 5-13x at one row. For them decode tiles (nf4_matmul_4bit_decode_tile,
 * which takes any shape at vector speed) and hand them to a GEMM, as pyqlora
 * does.
 *
 * Sizes: packed holds ceil(N * K / 2) bytes, scales ceil(N * K / blocksize)
 * floats, codebook 16 floats; x and y as above. Products M x K, M x N, N x K
 * that overflow (common.h) give NF4_ERROR_INVALID_ARGUMENT.
 * Aliasing (common.h): y must not overlap x, packed, scales or codebook in
 * any byte; y == x, which np.matmul(x, w, out=x) allows, is rejected
 * (NF4_ERROR_INVALID_ARGUMENT): every y element reads a whole row of x, so
 * write into a temporary and copy. The same holds for decode_tile's out.
 */
#ifndef NF4CORE_MATMUL_H
#define NF4CORE_MATMUL_H

#include "nf4core/common.h"

#ifdef __cplusplus
extern "C" {
#endif

NF4_API nf4_status nf4_matmul_4bit(const void *x, nf4_dtype dtype, int64_t M, int64_t N, int64_t K,
                                   const uint8_t *packed, const float *scales, int64_t blocksize,
                                   const float *codebook, int32_t transpose_w, void *y);

/* The scalar reference of the same product, for tests. */
NF4_API nf4_status nf4_matmul_4bit_ref(const void *x, nf4_dtype dtype, int64_t M, int64_t N, int64_t K,
                                       const uint8_t *packed, const float *scales, int64_t blocksize,
                                       const float *codebook, int32_t transpose_w, void *y);

/* The tile W[n0:n1, k0:k1] of the N x K matrix, dequantized (codebook value
 * times block scale, rounded to dtype as nf4_dequantize_4bit does) into `out`,
 * dense row-major with rows of k1 - k0 values; dtype float32 or bfloat16. The
 * building block of tiled products at large M: decode a cache-sized tile, hand
 * it to a GEMM, never hold the whole dense matrix. */
NF4_API nf4_status nf4_matmul_4bit_decode_tile(const uint8_t *packed, const float *scales, int64_t blocksize,
                                               const float *codebook, int64_t N, int64_t K, int64_t n0,
                                               int64_t n1, int64_t k0, int64_t k1, nf4_dtype dtype, void *out);

#ifdef __cplusplus
}
#endif

#endif /* NF4CORE_MATMUL_H */
