/*
 * nf4core — run-time settings: threads and the instruction-set path.
 *
 * Threads: kernels split their blocks over a pool of nf4core's own threads
 * (no OpenMP). The default is the number of CPUs this process may run on, or
 * the NF4CORE_NUM_THREADS environment variable. Inputs below about 64 Ki
 * elements per thread stay on the calling thread. Results are identical for
 * every thread count. Idle pool threads spin for NF4CORE_SPIN_US microseconds
 * (default 50, 0 to 10000) before they sleep, so that back-to-back calls do not
 * pay a wake-up each; 0 makes them sleep at once (docs/performance.md).
 *
 * Instruction sets: "avx512" (AVX-512 F/BW/VL/DQ), "avx2" (AVX2 + FMA + F16C),
 * "neon" (aarch64) or "scalar" (the reference kernels). The default ("auto")
 * is the best one the CPU supports, detected at run time; the environment
 * variable NF4CORE_ISA or nf4_set_isa() forces one. Every path gives
 * byte-identical results for quantization; products with a 4-bit matrix
 * (matmul.h) sum in a different order on each path.
 *
 * AMX: on CPUs with AMX-BF16 (Intel Sapphire Rapids and later, Linux), with the
 * "avx512" path active, nf4_matmul_4bit multiplies bfloat16 x with 5 or more
 * rows on AMX tiles (matmul.h says how that rounds). The environment variable
 * NF4CORE_AMX=0 or nf4_set_amx(0) turns this off.
 */
#ifndef NF4CORE_RUNTIME_H
#define NF4CORE_RUNTIME_H

#include "nf4core/common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* n >= 1 threads, or 0 for the default. */
NF4_API nf4_status nf4_set_num_threads(int32_t n);
NF4_API int32_t nf4_get_num_threads(void);

/* "auto", "avx512", "avx2", "neon" or "scalar"; fails for a path this build or
 * this CPU lacks. */
NF4_API nf4_status nf4_set_isa(const char *name);

/* The path in use ("avx512", "avx2", "neon" or "scalar"). */
NF4_API const char *nf4_get_isa(void);

/* 1 if `name` is compiled in and supported by this CPU, else 0. */
NF4_API int32_t nf4_isa_available(const char *name);

/* 1 if this build, CPU and OS can run AMX-BF16 tile instructions, else 0. */
NF4_API int32_t nf4_amx_available(void);

/* Allow (1, the default) or forbid (0) AMX products; allowing fails where
 * nf4_amx_available() is 0. */
NF4_API nf4_status nf4_set_amx(int32_t enabled);

/* 1 if products use AMX now: available, allowed and the "avx512" path active. */
NF4_API int32_t nf4_get_amx(void);

#ifdef __cplusplus
}
#endif

#endif /* NF4CORE_RUNTIME_H */
