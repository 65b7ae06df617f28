/*
 * nf4core — run-time settings: threads and the instruction-set path.
 *
 * Threads: kernels split their blocks into tasks that the calling thread and
 * helper threads claim one by one. The default count is the number of CPUs this
 * process may run on, or the NF4CORE_NUM_THREADS environment variable. Inputs
 * below about 64 Ki elements per thread stay on the calling thread. Results are
 * identical for every thread count and either kind of helper thread.
 *
 * Per-thread override (nf4_set_thread_num_threads): a thread may set its own
 * count, which then applies to every call made *from that thread* and to
 * nothing else: other threads keep the process's count (nf4_set_num_threads)
 * or their own override, and the process's count is not changed. Scoped
 * settings ("use 2 threads in this block") belong here, not in
 * nf4_set_num_threads: two threads that each set the process's count and put
 * the old one back can interleave and leave the process with the wrong one.
 * Jobs started from the thread honour it on either kind of helper thread
 * (an OpenMP team of at least that many threads, or that many of the pool's).
 *
 * Which threads help (nf4_set_threading, or NF4CORE_THREADING=pool): by default
 * ("auto"), where an OpenMP runtime is already loaded into the process (torch's
 * CPU build loads libgomp), the tasks run as a parallel region on its threads,
 * the ones torch's own ops use. Right after a torch op they still spin on the
 * cores, so they start at once, and no second set of threads has to compete
 * with them for the cores. nf4core neither links nor loads OpenMP; with none
 * loaded, or with "pool", it uses its own pool of threads, which never waits
 * for a helper that starts late: on a machine where other processes compete
 * for the cores, an OpenMP call can wait a scheduler time slice for its last
 * thread, as torch's own ops do (docs/performance.md). Idle pool threads spin
 * for NF4CORE_SPIN_US microseconds (default 50, 0 to 10000) before they sleep,
 * so that back-to-back calls do not pay a wake-up each; 0 makes them sleep at
 * once.
 *
 * Instruction sets: "avx512" (AVX-512 F/BW/VL/DQ), "avx2" (AVX2 + FMA + F16C),
 * "neon" (aarch64) or "scalar" (the reference kernels). The default ("auto")
 * is the best one the CPU supports, detected at run time; the environment
 * variable NF4CORE_ISA or nf4_set_isa() forces one. Every path gives
 * byte-identical results for quantization; products with a 4-bit matrix
 * (matmul.h) sum in a different order on each path. On x86, float32 x with many
 * rows (32 or more; 64 forward and 48 backward on AMD CPUs) runs on panels of W
 * decoded once for all rows, whose sums are kept per chunk of 256-1024 inner
 * elements chosen by the L2 cache size (NF4CORE_PANEL_INNER overrides): two CPUs
 * with different L2 sizes may differ in the last bits there. One machine gives
 * the same bits on every run and at every thread count.
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

/* The process's thread count: n >= 1 threads, or 0 for the default. Calls
 * from threads without an override (below) use it. */
NF4_API nf4_status nf4_set_num_threads(int32_t n);
/* The process's thread count (not the calling thread's override). */
NF4_API int32_t nf4_get_num_threads(void);

/* The calling thread's override: n >= 1 threads for the calls this thread
 * makes from now on, or 0 to drop the override (the process's count applies
 * again); 1 to 1024. It affects only calls made from the calling thread. To
 * scope it, save nf4_get_thread_num_threads() first and set it back after. */
NF4_API nf4_status nf4_set_thread_num_threads(int32_t n);
/* The calling thread's override, 0 if it has none. The count the calling
 * thread's next call uses is this, or nf4_get_num_threads() where it is 0. */
NF4_API int32_t nf4_get_thread_num_threads(void);

/* "auto" (the default: the loaded OpenMP runtime's team where there is one,
 * else the pool), "pool", or "openmp" (as "auto", but fails where no OpenMP
 * runtime is loaded). */
NF4_API nf4_status nf4_set_threading(const char *name);

/* The helper threads the next call uses: "openmp" (the loaded runtime's team)
 * or "pool" (nf4core's own). */
NF4_API const char *nf4_get_threading(void);

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
