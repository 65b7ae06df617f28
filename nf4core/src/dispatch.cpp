// Chooses the instruction-set path at run time from what the CPU supports
// (never from compile flags, so one binary runs on any x86-64), or as forced by
// NF4CORE_ISA / nf4_set_isa (runtime.cpp). A path is its quantization kernels
// and its matmul kernels, chosen together.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#include "kernels.hpp"
#include "matmul.hpp"

namespace nf4core {
namespace {

// (unused in builds without the x86 paths)
[[maybe_unused]] bool cpu_has_avx2() {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
    return false;
#endif
}

[[maybe_unused]] bool cpu_has_avx512() {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
    __builtin_cpu_init();
    // libgcc checks XCR0, so the OS saving the ZMM state is included
    return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
    return false;
#endif
}

bool always() { return true; }  // NEON is baseline on aarch64; the scalar reference runs anywhere

const KernelSet *scalar() { return &scalar_kernels(); }
const MatmulKernels *no_matmul_kernels() { return nullptr; }  // matmul.cpp runs its reference

struct Path {
    const char *name;
    bool (*cpu_has)();
    const KernelSet *(*kernels)();
    const MatmulKernels *(*matmul)();
};

// The paths compiled into this build (each optimized one is its own
// translation unit built with that ISA's flags, see meson.build), best first;
// the scalar reference last.
const Path kPaths[] = {
#if defined(NF4CORE_HAVE_AVX512)
    {"avx512", cpu_has_avx512, avx512_kernels, avx512_matmul_kernels},
#endif
#if defined(NF4CORE_HAVE_AVX2)
    {"avx2", cpu_has_avx2, avx2_kernels, avx2_matmul_kernels},
#endif
#if defined(NF4CORE_HAVE_NEON)
    {"neon", always, neon_kernels, neon_matmul_kernels},
#endif
    {"scalar", always, scalar, no_matmul_kernels},
};

// The path called `name` if this build has it and this CPU runs it, else nullptr.
const Path *usable(const std::string &name) {
    for (const Path &p : kPaths)
        if (name == p.name) return p.cpu_has() ? &p : nullptr;
    return nullptr;
}

const Path *best() {
    for (const Path &p : kPaths)
        if (p.cpu_has()) return &p;
    return nullptr;  // not reached: the scalar path runs anywhere
}

const Path *initial() {
    const char *env = std::getenv("NF4CORE_ISA");
    if (env != nullptr && *env != '\0' && std::strcmp(env, "auto") != 0) {
        if (const Path *p = usable(env)) return p;
        // an unusable request falls back to the best path; nf4_get_isa() tells
    }
    return best();
}

std::atomic<const Path *> &current() {
    static std::atomic<const Path *> p{initial()};
    return p;
}

}  // namespace

const KernelSet &active_kernels() { return *current().load(std::memory_order_relaxed)->kernels(); }

// The path was checked against the CPU when it was made active, so its matmul
// kernels can run.
const MatmulKernels *active_matmul_kernels() { return current().load(std::memory_order_relaxed)->matmul(); }

bool isa_available(const std::string &name) { return usable(name) != nullptr; }

bool use_isa(const std::string &name) {
    const Path *p = name == "auto" ? best() : usable(name);
    if (p != nullptr) current().store(p);
    return p != nullptr;
}

}  // namespace nf4core
