/*
 * nf4core — fused optimizer updates on blockwise 8-bit state.
 *
 * 8-bit AdamW (Dettmers et al., "8-bit Optimizers via Block-wise
 * Quantization", 2022), with bitsandbytes' state layout: the first moment m is
 * stored as signed dynamic-map codes (nf4_codebook_dynamic(signed=1)), the
 * second moment v as unsigned dynamic-map codes (signed=0), each with one
 * float32 absmax per block of `blocksize` elements (bitsandbytes uses 256).
 * Per block, in one pass and without a float32 copy of the whole state:
 *
 *   m, v   = decode(state1, absmax1), decode(state2, absmax2)
 *   m      = m * beta1 + (1 - beta1) * g
 *   v      = v * beta2 + (1 - beta2) * g * g
 *   p      = p * (1 - lr * weight_decay)                      (if weight_decay > 0)
 *   p      = p - lr / (1 - beta1^step) * m / (sqrt(v) / sqrt(1 - beta2^step) + eps)
 *   state1, absmax1 = quantize_8bit(m);  state2, absmax2 = quantize_8bit(v)
 *
 * in float32, with the same operation order and roundings as bitsandbytes' CPU
 * 8-bit blockwise Adam (hyperparameters are doubles, combined in double and
 * rounded to float32 once, as torch does with Python scalars), and the same
 * requantization rule as nf4_quantize_8bit. Elements whose gradient is NaN or
 * Inf are skipped: their parameter is unchanged and both moments are reset to
 * zero (bitsandbytes' CUDA kernel does the same for the gradient). So are
 * elements whose update is not finite although the gradient is: a new moment
 * that overflows float32 (with beta2 = 0.999, a gradient above about 5.8e20 makes
 * (1 - beta2) * g * g overflow), a NaN from a stored block absmax that is not
 * finite, or a new parameter that overflows float32 or the parameter dtype
 * (float16 above 65504). Every other element of the block is updated and the
 * block is requantized from finite moments, so a call never stops halfway:
 * non-finite values never make it fail (NF4_ERROR_NON_FINITE is not
 * returned), and an argument error is reported before anything is written.
 * The count of skipped elements is returned in *skipped (may be NULL).
 */
#ifndef NF4CORE_OPTIM_H
#define NF4CORE_OPTIM_H

#include "nf4core/common.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct nf4_adam_hparams {
    double lr;
    double beta1;
    double beta2;
    double eps;
    double weight_decay; /* decoupled (AdamW); 0 gives Adam without weight decay */
    int64_t step;        /* 1 for the first update */
} nf4_adam_hparams;

/*
 * param, grad: n elements of `dtype` (float32, float16 or bfloat16; both the
 * same dtype); state1, state2: n bytes; absmax1, absmax2:
 * nf4_num_blocks(n, blocksize) floats; qmap1, qmap2: 256 finite floats each.
 * A fresh state is all-zero codes of value 0 with absmax 0 (code 127 for the
 * signed map, 0 for the unsigned one).
 * Aliasing (common.h): param, state1, state2, absmax1, absmax2 are IN/OUT,
 * updated in place, and must not overlap each other; grad, qmap1, qmap2, *hp
 * and *skipped must not overlap any of them (grad == param is rejected) nor
 * *skipped the inputs. Violations give NF4_ERROR_INVALID_ARGUMENT.
 */
NF4_API nf4_status nf4_adam8bit_update(void *param, const void *grad, nf4_dtype dtype, int64_t n,
                                       uint8_t *state1, uint8_t *state2, float *absmax1, float *absmax2,
                                       const float *qmap1, const float *qmap2, int64_t blocksize,
                                       const nf4_adam_hparams *hp, int64_t *skipped);

#ifdef __cplusplus
}
#endif

#endif /* NF4CORE_OPTIM_H */
