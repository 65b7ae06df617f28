/*
 * nf4core — codebooks (the value tables that k-bit codes index).
 *
 * A codebook is a float32 array whose index is the code: table[code] is the
 * normalized value in [-1, 1] that the code stands for. Tables need not be
 * sorted (FP4 and INT4 are in bitsandbytes' bit-pattern order); quantization
 * picks the nearest value, ties going to the lower value (see quantize.h).
 */
#ifndef NF4CORE_CODEBOOK_H
#define NF4CORE_CODEBOOK_H

#include "nf4core/common.h"

#ifdef __cplusplus
extern "C" {
#endif

/*
 * NormalFloat-k (QLoRA, Dettmers et al. 2023, Sec. 3): 2^(k-1) positive and
 * 2^(k-1)-1 negative quantiles of N(0, 1) plus one exact zero, normalized to
 * [-1, 1] and sorted ascending, built exactly like bitsandbytes'
 * create_normal_map (float32 linspace, float32 normalization).
 * bits: 2..8; out: 2^bits floats. bits == 4 equals bitsandbytes' NF4 table.
 */
NF4_API nf4_status nf4_codebook_normal(int32_t bits, float *out);

/* The outermost quantile used for NF-k: the paper's 0.9677083 for k = 4. */
NF4_API double nf4_normal_offset(int32_t bits);

/* FP4 (E2M1) in bitsandbytes' bit-pattern order: bit 3 is the sign (code 8 is -0.0,
 * as bitsandbytes' kernels decode it). out: 16 floats. */
NF4_API nf4_status nf4_codebook_fp4(float *out);

/* Symmetric INT4, bitsandbytes' get_4bit_type("int4"): sign-magnitude order,
 * codes 0..7 = 7/7..0/7, codes 8..15 = -0/7..-7/7. out: 16 floats. */
NF4_API nf4_status nf4_codebook_int4(float *out);

/* bitsandbytes' 8-bit dynamic map (create_dynamic_map with its defaults):
 * 256 sorted floats; signed: zero at index 127, max 1.0; unsigned: zero at
 * index 0. Used for double quantization and 8-bit optimizer states. */
NF4_API nf4_status nf4_codebook_dynamic(int32_t is_signed, float *out);

/*
 * Any built-in codebook by name: "nf2".."nf8", "nf4", "fp4", "int4",
 * "dynamic" (signed) or "dynamic_unsigned". Writes at most `capacity`
 * floats into out (out may be NULL to query) and the table length into *n.
 */
NF4_API nf4_status nf4_codebook_by_name(const char *name, float *out, int64_t capacity, int64_t *n);

/* Inverse of the standard normal CDF in double precision (p in (0, 1)). */
NF4_API double nf4_norm_ppf(double p);

#ifdef __cplusplus
}
#endif

#endif /* NF4CORE_CODEBOOK_H */
