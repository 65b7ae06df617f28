/*
 * nf4core — the CUDA kernels: blockwise 4-bit and 8-bit quantization,
 * double quantization and the 4-bit GEMV on NVIDIA GPUs.
 *
 * Every function here exists in every build. In a build without CUDA (Meson
 * option -Dcuda=disabled, or nvcc not found) nf4_cuda_available() reports
 * built = 0 and every other function returns NF4_ERROR_CUDA.
 *
 * Conventions (in addition to common.h):
 *   - data pointers (x, packed, absmax, out, ...) are device pointers (or
 *     managed memory) on the calling thread's current device;
 *   - codebook (16 or 256 floats) and dyn_code (256 floats) are HOST pointers:
 *     the tables travel to the kernel as launch arguments, so no device copy of
 *     them is needed;
 *   - `stream` is a cudaStream_t passed as void* (NULL: the legacy default
 *     stream). Functions marked [async] only enqueue work on it; those marked
 *     [sync] wait for it, because they must report a NaN/Inf found on the
 *     device (as the CPU functions do);
 *   - a CUDA failure (no driver, no device, bad pointer, launch failure) gives
 *     NF4_ERROR_CUDA (NF4_ERROR_OUT_OF_MEMORY for a failed allocation) and
 *     nf4_last_error() names the call and CUDA's message. Errors of earlier
 *     asynchronous work on the stream may surface in a later call.
 *   - results are byte-identical to the CPU functions of quantize.h (and
 *     optim.h for nf4_cuda_adam8bit_update) for the
 *     same input (the same scalar math, src/numeric.hpp, runs on both); the
 *     GEMV sums in a different order than nf4_matmul_4bit and agrees with it
 *     to float32 rounding only.
 *   - sizes are 64-bit throughout: tensors of 2^31 elements and more work.
 *     Sizes whose byte counts overflow give NF4_ERROR_INVALID_ARGUMENT, as on
 *     the CPU (common.h).
 *   - aliasing: the rule of common.h holds for the device buffers (no output
 *     may overlap an input or another output, in place only where IN/OUT) and
 *     is checked on the host by comparing the address ranges (cheap, no device
 *     access, before any work is enqueued); overlap is judged in the unified
 *     address space, so device memory that a second mapping aliases is not
 *     seen. The host tables (codebook, dyn_code, qmap1/2) and *hp are copied
 *     before the launch and may be anywhere; the host outputs (*offset,
 *     *skipped) are written after the device work has finished.
 *
 * Status: compiled and linked in CI, but NOT yet verified on GPU hardware (see
 * docs/performance.md and benchmarks/gpu_check.sh).
 */
#ifndef NF4CORE_CUDA_H
#define NF4CORE_CUDA_H

#include "nf4core/common.h"
#include "nf4core/optim.h"

#ifdef __cplusplus
extern "C" {
#endif

/*
 * *built = 1 if nf4core was compiled with CUDA, else 0; *device_count = the
 * number of CUDA devices visible (0 without a driver or a device, and always 0
 * when built = 0). Never fails for lack of a GPU: returns NF4_OK then.
 * Either pointer may be NULL.
 */
NF4_API nf4_status nf4_cuda_available(int32_t *built, int32_t *device_count);

/* The CUDA runtime version nf4core was built with (e.g. 13000), or 0 without CUDA. */
NF4_API int32_t nf4_cuda_runtime_version(void);

/* [sync] As nf4_quantize_4bit: x n elements of dtype; packed OUT ceil(n/2) bytes;
 * absmax OUT nf4_num_blocks(n, blocksize) floats; codebook 16 host floats. */
NF4_API nf4_status nf4_cuda_quantize_4bit(const void *x, nf4_dtype dtype, int64_t n, int64_t blocksize,
                                          const float *codebook, uint8_t *packed, float *absmax,
                                          void *stream);

/* [async] As nf4_dequantize_4bit. */
NF4_API nf4_status nf4_cuda_dequantize_4bit(const uint8_t *packed, const float *absmax, int64_t n,
                                            int64_t blocksize, const float *codebook, void *out,
                                            nf4_dtype out_dtype, void *stream);

/* [async] Dequantize with double-quantized scales in one pass: the scale of
 * block b is dyn_code[qabsmax[b]] * nested_absmax[b / 256] + offset (exactly
 * nf4_double_dequantize), then as nf4_dequantize_4bit. dyn_code: 256 host floats. */
NF4_API nf4_status nf4_cuda_dequantize_4bit_dq(const uint8_t *packed, const uint8_t *qabsmax,
                                               const float *nested_absmax, float offset, int64_t n,
                                               int64_t blocksize, const float *codebook,
                                               const float *dyn_code, void *out, nf4_dtype out_dtype,
                                               void *stream);

/* [sync] As nf4_quantize_8bit (codes OUT n bytes; codebook 256 host floats). */
NF4_API nf4_status nf4_cuda_quantize_8bit(const void *x, nf4_dtype dtype, int64_t n, int64_t blocksize,
                                          const float *codebook, uint8_t *codes, float *absmax,
                                          void *stream);

/* [async] As nf4_dequantize_8bit. */
NF4_API nf4_status nf4_cuda_dequantize_8bit(const uint8_t *codes, const float *absmax, int64_t n,
                                            int64_t blocksize, const float *codebook, void *out,
                                            nf4_dtype out_dtype, void *stream);

/* [sync] As nf4_double_quantize: absmax, qabsmax and nested_absmax on the
 * device; *offset is written to HOST memory. Same offset (the double sum in
 * the CPU's order), same codes. */
NF4_API nf4_status nf4_cuda_double_quantize(const float *absmax, int64_t nblocks, const float *dyn_code,
                                            uint8_t *qabsmax, float *nested_absmax, float *offset,
                                            void *stream);

/* [async] As nf4_double_dequantize. */
NF4_API nf4_status nf4_cuda_double_dequantize(const uint8_t *qabsmax, const float *nested_absmax,
                                              float offset, int64_t nblocks, const float *dyn_code,
                                              float *absmax, void *stream);

/*
 * [async] y (M x N) = x (M x K) . W^T for a 4-bit W (N x K, row-major, as
 * nf4_quantize_4bit packs it), M = 1..8 (generation); x and y of the same
 * dtype (float32, float16 or bfloat16), float32 accumulation. scales: float32
 * block scales (decode DQ scales first, or use the _dq variant).
 */
NF4_API nf4_status nf4_cuda_gemv_4bit(const void *x, nf4_dtype dtype, int64_t M, int64_t N, int64_t K,
                                      const uint8_t *packed, const float *scales, int64_t blocksize,
                                      const float *codebook, void *y, void *stream);

/* [async] The same with double-quantized scales decoded on the fly. */
NF4_API nf4_status nf4_cuda_gemv_4bit_dq(const void *x, nf4_dtype dtype, int64_t M, int64_t N, int64_t K,
                                         const uint8_t *packed, const uint8_t *qabsmax,
                                         const float *nested_absmax, float offset, int64_t blocksize,
                                         const float *codebook, const float *dyn_code, void *y, void *stream);

/*
 * [sync] The fused 8-bit AdamW update of nf4_adam8bit_update (optim.h) on the
 * device: param, grad, state1, state2, absmax1, absmax2 are device (or
 * managed) pointers; qmap1, qmap2 (256 floats each), hp and skipped are HOST
 * pointers (skipped may be NULL). Same operation order, same NaN/Inf rule
 * (an element whose gradient or update is not finite is skipped: parameter
 * unchanged, both moments reset to 0, counted in *skipped; never
 * NF4_ERROR_NON_FINITE), same per-block requantization, so param, states and
 * absmax are byte-identical to the CPU's for the same input.
 * Waits for the stream (it reads back the skip count).
 * Status: compiled, not yet run on GPU hardware.
 */
NF4_API nf4_status nf4_cuda_adam8bit_update(void *param, const void *grad, nf4_dtype dtype, int64_t n,
                                            uint8_t *state1, uint8_t *state2, float *absmax1, float *absmax2,
                                            const float *qmap1, const float *qmap2, int64_t blocksize,
                                            const nf4_adam_hparams *hp, int64_t *skipped, void *stream);

#ifdef __cplusplus
}
#endif

#endif /* NF4CORE_CUDA_H */
