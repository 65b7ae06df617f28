/*
 * nf4core — status codes, element types and error reporting shared by every
 * part of the public C API.
 *
 * Conventions for the whole API:
 *   - every function that can fail returns an nf4_status; NF4_OK is 0;
 *   - on failure, nf4_last_error() returns a message for the calling thread,
 *     valid until that thread's next nf4core call;
 *   - sizes and indices are int64_t; no function aborts, prints or throws;
 *   - callers allocate every output; size-query functions say how big;
 *   - sizes that do not fit: a count whose byte count (elements times element
 *     size, packed bytes, block scales, M x K, N x K, ...) exceeds PTRDIFF_MAX,
 *     or whose buffer would run past the end of the address space, gives
 *     NF4_ERROR_INVALID_ARGUMENT before anything is read or written;
 *   - aliasing: no output may overlap an input or another output, in any byte
 *     (the exact same pointer included): a call whose buffers overlap so,
 *     judged by the address ranges the documented sizes give, fails with
 *     NF4_ERROR_INVALID_ARGUMENT naming both arguments, before anything is
 *     written. None of the kernels can run in place (outputs differ from their
 *     inputs in type or size, or every output element reads many inputs), so
 *     copy an input first to reuse its memory. Arguments marked IN/OUT (the
 *     optimizer's parameter and state) are updated in place and count as
 *     outputs. Inputs may overlap each other.
 */
#ifndef NF4CORE_COMMON_H
#define NF4CORE_COMMON_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32) && defined(NF4CORE_BUILDING_SHARED)
#define NF4_API __declspec(dllexport)
#elif defined(_WIN32) && defined(NF4CORE_USING_SHARED)
#define NF4_API __declspec(dllimport)
#elif defined(__GNUC__)
#define NF4_API __attribute__((visibility("default")))
#else
#define NF4_API
#endif

typedef enum nf4_status {
    NF4_OK = 0,
    NF4_ERROR_INVALID_ARGUMENT = 1, /* bad size, blocksize, pointer or codebook */
    NF4_ERROR_NON_FINITE = 2,       /* NaN or +-Inf in an input that must be finite */
    NF4_ERROR_OUT_OF_MEMORY = 3,    /* an internal allocation failed */
    NF4_ERROR_INTERNAL = 4,         /* a bug in nf4core: please report it */
    NF4_ERROR_CUDA = 5              /* a CUDA call failed, no device, or built without CUDA */
} nf4_status;

/* Element types of dense inputs and outputs. */
typedef enum nf4_dtype {
    NF4_FLOAT32 = 0,
    NF4_FLOAT16 = 1,  /* IEEE 754 binary16 */
    NF4_BFLOAT16 = 2  /* the upper 16 bits of a binary32 */
} nf4_dtype;

/* Message describing the last failure on this thread ("" if none). */
NF4_API const char *nf4_last_error(void);

/* Static name of a status code, e.g. "NF4_ERROR_NON_FINITE". */
NF4_API const char *nf4_status_string(nf4_status status);

/* Library version, e.g. "0.1.0". */
NF4_API const char *nf4_version(void);

/* Size in bytes of one element of `dtype`, or 0 for an unknown dtype. */
NF4_API int64_t nf4_dtype_size(nf4_dtype dtype);

#ifdef __cplusplus
}
#endif

#endif /* NF4CORE_COMMON_H */
