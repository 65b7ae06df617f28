/*
 * nf4core — calibrated 4-bit rounding: the error feedback of GPTQ / Optimal
 * Brain Quantization (Frantar et al., 2022) over a 16-value codebook (NF4, FP4,
 * INT4, ...) with bitsandbytes' per-block absmax scales. The output is an
 * ordinary blockwise 4-bit tensor (quantize.h): the same packed nibbles and
 * float32 absmax per block, only the choice of codes (and of the scales, taken
 * from the error-updated weights) differs from round-to-nearest.
 *
 * A weight W of rows x cols (row-major; a layer y = x W^T with cols inputs) is
 * read flat in C order and cut into blocks of `blocksize` elements, exactly as
 * nf4_quantize_4bit does (a block may span two rows when cols is not a multiple
 * of blocksize). Columns are visited in the solve order order[0..cols-1] (a
 * permutation of the columns; NULL = natural order). `hinv_chol` is the
 * cols x cols UPPER Cholesky factor U of the inverse of the dampened input
 * second-moment matrix, in solve order:
 *     U^T U = (P (H + damp I) P^T)^-1,   P the permutation of `order`,
 * row-major, of which only the upper triangle is read (U[j][j] > 0).
 *
 * At solve step j (column c = order[j]), for every row r:
 *   1. a block that holds no visited element yet gets its scale now: absmax =
 *      max |w| over its elements (all rows), with the error feedback of
 *      steps 0..j-1 applied (the block scale "when the block starts", also
 *      under a permuted order); elements visited later may exceed it and are
 *      clamped to the codebook's range like any value outside [-1, 1];
 *   2. q = the code nearest to w[r][c] / absmax (nf4_quantize_4bit's rule:
 *      ties to the lower value, the short tail block divides), its value
 *      dq = codebook[q] * absmax;
 *   3. err = (w[r][c] - dq) / U[j][j]; every not yet visited column t of the
 *      row gets w[r][order[t]] -= err * U[j][t] (the float32 kernel multiplies
 *      by the float32 reciprocal of U[j][j]).
 * With U diagonal (H a multiple of the identity) no update happens and the
 * result is byte for byte nf4_quantize_4bit's.
 *
 * The optimized kernel computes in float32, applies step 3 lazily in batches
 * of 128 columns (a GEMM per batch), each update as one fused multiply-add in
 * the order of the steps, so its result does not depend on the batching, the
 * thread count or the instruction set. Rows are split over the library's
 * threads (a group of rows whose blocks share no element with other rows is
 * never split). The _ref twin is the scalar float64 definition (unbatched,
 * one thread): the codes agree with the optimized kernel's except where float32
 * rounding moves a value across a midpoint.
 *
 *   w:         rows * cols floats (finite; NaN/Inf: NF4_ERROR_NON_FINITE)
 *   hinv_chol: cols * cols floats (the upper triangle finite, diagonal > 0)
 *   order:     cols column indices, a permutation, or NULL
 *   codebook:  16 finite floats
 *   packed:    OUT, nf4_packed_size_4bit(rows * cols) bytes
 *   absmax:    OUT, nf4_num_blocks(rows * cols, blocksize) floats
 * No OUT buffer may overlap an input (common.h).
 */
#ifndef NF4CORE_GPTQ_H
#define NF4CORE_GPTQ_H

#include "nf4core/common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Columns the optimized kernel visits between two lazy (GEMM) updates. */
#define NF4_GPTQ_BATCH 128

NF4_API nf4_status nf4_gptq_quantize_4bit(const float *w, int64_t rows, int64_t cols, const float *hinv_chol,
                                          const int64_t *order, int64_t blocksize, const float *codebook,
                                          uint8_t *packed, float *absmax);

/* The float64 scalar definition: w and hinv_chol as doubles, otherwise the same contract. */
NF4_API nf4_status nf4_gptq_quantize_4bit_ref(const double *w, int64_t rows, int64_t cols, const double *hinv_chol,
                                              const int64_t *order, int64_t blocksize, const float *codebook,
                                              uint8_t *packed, float *absmax);

#ifdef __cplusplus
}
#endif

#endif /* NF4CORE_GPTQ_H */
