// Chooses the kernel set at run time from what the CPU supports (never from
// compile flags, so one binary runs on any x86-64), or as forced by
// NF4CORE_ISA / nf4_set_isa.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#include "error.hpp"
#include "kernels.hpp"
#include "nf4core/runtime.h"

namespace nf4core {
namespace {

bool cpu_has_avx2() {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
    return false;
#endif
}

bool cpu_has_avx512() {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
    __builtin_cpu_init();
    // libgcc checks XCR0, so the OS saving the ZMM state is included
    return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
    return false;
#endif
}

const KernelSet *by_name(const std::string &name) {
    if (name == "scalar") return &scalar_kernels();
    if (name == "avx2") return (avx2_kernels() && cpu_has_avx2()) ? avx2_kernels() : nullptr;
    if (name == "avx512") return (avx512_kernels() && cpu_has_avx512()) ? avx512_kernels() : nullptr;
    if (name == "neon") return neon_kernels();  // NEON is baseline on aarch64
    return nullptr;
}

const KernelSet *best() {
    for (const char *name : {"avx512", "avx2", "neon"})
        if (const KernelSet *k = by_name(name)) return k;
    return &scalar_kernels();
}

const KernelSet *initial() {
    const char *env = std::getenv("NF4CORE_ISA");
    if (env != nullptr && *env != '\0' && std::strcmp(env, "auto") != 0) {
        if (const KernelSet *k = by_name(env)) return k;
        // an unusable request falls back to the best path; nf4_get_isa() tells
    }
    return best();
}

std::atomic<const KernelSet *> &current() {
    static std::atomic<const KernelSet *> k{initial()};
    return k;
}

}  // namespace

const KernelSet &active_kernels() { return *current().load(std::memory_order_relaxed); }

}  // namespace nf4core

using namespace nf4core;

extern "C" {

nf4_status nf4_set_isa(const char *name) {
    return guarded([&] {
        require(name != nullptr, "ISA name is NULL");
        const std::string n(name);
        if (n == "auto") {
            current().store(best());
            return;
        }
        require(n == "scalar" || n == "avx2" || n == "avx512" || n == "neon",
                "unknown ISA '" + n + "': expected auto, avx512, avx2, neon or scalar");
        const KernelSet *k = by_name(n);
        require(k != nullptr, "the " + n + " kernels are not available: not compiled into this build or not "
                                           "supported by this CPU");
        current().store(k);
    });
}

const char *nf4_get_isa(void) { return active_kernels().name; }

int32_t nf4_isa_available(const char *name) { return (name != nullptr && by_name(name) != nullptr) ? 1 : 0; }

}  // extern "C"

// Stubs for paths not compiled into this build; the ISA translation
// units define the real ones.
namespace nf4core {
#if !defined(NF4CORE_HAVE_AVX2)
const KernelSet *avx2_kernels() { return nullptr; }
#endif
#if !defined(NF4CORE_HAVE_AVX512)
const KernelSet *avx512_kernels() { return nullptr; }
#endif
#if !defined(NF4CORE_HAVE_NEON)
const KernelSet *neon_kernels() { return nullptr; }
#endif
}  // namespace nf4core
