// The C entry points of runtime.h: threads (parallel.cpp), the instruction-set
// path (dispatch.cpp) and AMX (matmul.cpp, matmul_amx.cpp). Arguments are
// checked here, at the boundary; the internals take checked values.
#include <string>

#include "error.hpp"
#include "kernels.hpp"
#include "matmul.hpp"
#include "nf4core/runtime.h"
#include "parallel.hpp"

using namespace nf4core;

extern "C" {

nf4_status nf4_set_num_threads(int32_t n) {
    return guarded([&] {
        require(n >= 0 && n <= 1024,
                "thread count must be between 1 and 1024 (0: the default), got " + std::to_string(n));
        set_num_threads(n);
    });
}

int32_t nf4_get_num_threads(void) { return process_num_threads(); }

nf4_status nf4_set_thread_num_threads(int32_t n) {
    return guarded([&] {
        require(n >= 0 && n <= 1024,
                "thread count must be between 1 and 1024 (0: no override), got " + std::to_string(n));
        set_thread_num_threads(n);
    });
}

int32_t nf4_get_thread_num_threads(void) { return thread_num_threads(); }

nf4_status nf4_set_threading(const char *name) {
    return guarded([&] {
        require(name != nullptr, "threading name is NULL");
        const std::string n(name);
        require(n == "auto" || n == "pool" || n == "openmp",
                "unknown threading '" + n + "': expected auto, pool or openmp");
        require(n != "openmp" || openmp_loaded(), "threading 'openmp': no OpenMP runtime is loaded into this process");
        set_pool_only(n == "pool");
    });
}

const char *nf4_get_threading(void) { return jobs_use_openmp() ? "openmp" : "pool"; }

nf4_status nf4_set_isa(const char *name) {
    return guarded([&] {
        require(name != nullptr, "ISA name is NULL");
        const std::string n(name);
        require(n == "auto" || n == "scalar" || n == "avx2" || n == "avx512" || n == "neon",
                "unknown ISA '" + n + "': expected auto, avx512, avx2, neon or scalar");
        require(use_isa(n), "the " + n + " kernels are not available: not compiled into this build or not "
                                         "supported by this CPU");
    });
}

const char *nf4_get_isa(void) { return active_kernels().name; }

int32_t nf4_isa_available(const char *name) { return (name != nullptr && isa_available(name)) ? 1 : 0; }

int32_t nf4_amx_available(void) { return amx_available() ? 1 : 0; }

nf4_status nf4_set_amx(int32_t enabled) {
    return guarded([&] {
        require(!enabled || amx_available(),
                "AMX is not available (needs an AMX-BF16 CPU, Linux, and a build with AMX)");
        allow_amx(enabled != 0);
    });
}

int32_t nf4_get_amx(void) { return amx_in_use() ? 1 : 0; }

}  // extern "C"
