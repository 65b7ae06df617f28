#include "error.hpp"

#include <cstring>
#include <string>
#include <type_traits>

#ifndef NF4CORE_VERSION
#define NF4CORE_VERSION "unknown"
#endif

namespace nf4core {

namespace {
thread_local std::string last_error;
}

void set_last_error(const char *message) noexcept {
    try {
        last_error = message;
    } catch (...) {
        last_error.clear();  // keeping no message beats throwing across the C boundary
    }
}

}  // namespace nf4core

extern "C" {

const char *nf4_last_error(void) { return nf4core::last_error.c_str(); }

const char *nf4_status_string(nf4_status status) {
    std::underlying_type_t<nf4_status> code;
    std::memcpy(&code, &status, sizeof code);
    switch (code) {
        case NF4_OK: return "NF4_OK";
        case NF4_ERROR_INVALID_ARGUMENT: return "NF4_ERROR_INVALID_ARGUMENT";
        case NF4_ERROR_NON_FINITE: return "NF4_ERROR_NON_FINITE";
        case NF4_ERROR_OUT_OF_MEMORY: return "NF4_ERROR_OUT_OF_MEMORY";
        case NF4_ERROR_INTERNAL: return "NF4_ERROR_INTERNAL";
        case NF4_ERROR_CUDA: return "NF4_ERROR_CUDA";
    }
    return "NF4_UNKNOWN_STATUS";
}

const char *nf4_version(void) { return NF4CORE_VERSION; }

// Both switch on the bytes read as an integer: a C caller can pass any value,
// and reading one that is none of the enum's as the enum is undefined (UBSan).
int64_t nf4_dtype_size(nf4_dtype dtype) {
    std::underlying_type_t<nf4_dtype> code;
    std::memcpy(&code, &dtype, sizeof code);
    switch (code) {
        case NF4_FLOAT32: return 4;
        case NF4_FLOAT16: return 2;
        case NF4_BFLOAT16: return 2;
        default: return 0;
    }
}

}  // extern "C"
