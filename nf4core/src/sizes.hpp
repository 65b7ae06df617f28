// Checked sizes, dtypes and buffer ranges for the C entry points: one place
// where an element count becomes a byte count, so that no entry point computes a size
// that wraps around (n = INT64_MAX used to give a negative block count and a
// call that did nothing and returned NF4_OK), and where output buffers are
// checked against the inputs they must not overlap (common.h states the rule).
// Host only: the CUDA launchers call it too, on device pointers (an address
// comparison, no device access).
#ifndef NF4CORE_SRC_SIZES_HPP
#define NF4CORE_SRC_SIZES_HPP

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <string>
#include <type_traits>

#include "error.hpp"

namespace nf4core {

// The largest byte count of one buffer: an object of more than PTRDIFF_MAX
// bytes cannot exist in C or C++ (pointer differences would overflow), and it
// is below both INT64_MAX and SIZE_MAX on every platform.
constexpr int64_t kMaxBytes = int64_t(PTRDIFF_MAX) < INT64_MAX ? int64_t(PTRDIFF_MAX) : INT64_MAX;

// count * size, or NF4_ERROR_INVALID_ARGUMENT naming `what` when the product
// exceeds kMaxBytes (count and size are >= 0; callers check signs first).
inline int64_t checked_mul(int64_t count, int64_t size, const char *what) {
    if (count < 0 || size < 0 || (size != 0 && count > kMaxBytes / size))
        fail(NF4_ERROR_INVALID_ARGUMENT, std::string(what) + ": " + std::to_string(count) + " x " +
                                             std::to_string(size) + " overflows the largest buffer size (" +
                                             std::to_string(kMaxBytes) + " bytes)");
    return count * size;
}

// The dtype a caller passed, checked: float32 and bfloat16 always, float16
// where `half_ok`. A C caller can pass any integer, and reading one that is
// none of nf4_dtype's values as the enum is undefined behaviour (UBSan's enum
// check), so the bytes are read as an integer; the result is a valid value.
inline nf4_dtype checked_dtype(const nf4_dtype &dtype, bool half_ok, const char *what) {
    std::underlying_type_t<nf4_dtype> code;
    std::memcpy(&code, &dtype, sizeof code);
    if (code == NF4_FLOAT32 || code == NF4_BFLOAT16 || (half_ok && code == NF4_FLOAT16))
        return static_cast<nf4_dtype>(code);
    if (code == NF4_FLOAT16) fail(NF4_ERROR_INVALID_ARGUMENT, std::string(what) + " must be float32 or bfloat16");
    fail(NF4_ERROR_INVALID_ARGUMENT, std::string(what) + ": unknown dtype code " + std::to_string(code));
}

// ceil(count / per), count >= 0, per >= 1, without the overflow of (count + per - 1) / per.
inline int64_t ceil_div(int64_t count, int64_t per) { return count / per + (count % per != 0 ? 1 : 0); }

// One pointer argument as a byte range [begin, end), named for messages.
struct Buffer {
    const char *name;
    uintptr_t begin;
    uintptr_t end;
};

// The range of `count` elements of `elem_size` bytes at p; fails when the byte
// count overflows or the range would wrap around the address space.
inline Buffer buffer(const char *name, const void *p, int64_t count, int64_t elem_size) {
    const int64_t bytes = checked_mul(count, elem_size, name);
    const uintptr_t begin = reinterpret_cast<uintptr_t>(p);
    if (uintptr_t(bytes) > UINTPTR_MAX - begin)
        fail(NF4_ERROR_INVALID_ARGUMENT, std::string(name) + ": " + std::to_string(bytes) +
                                             " bytes from its address run past the end of the address space");
    return Buffer{name, begin, begin + uintptr_t(bytes)};
}

inline bool overlaps(const Buffer &a, const Buffer &b) {
    return a.begin < a.end && b.begin < b.end && a.begin < b.end && b.begin < a.end;
}

// The aliasing rule of the C API (common.h): no output may share a byte with
// an input or with another output, the exact same pointer included. In-place
// arguments (IN/OUT) are listed once, as outputs.
inline void require_disjoint(std::initializer_list<Buffer> outputs, std::initializer_list<Buffer> inputs) {
    auto fail_overlap = [](const Buffer &out, const Buffer &other, const char *kind) {
        char where[96];
        std::snprintf(where, sizeof where, " (bytes %#llx..%#llx and %#llx..%#llx)",
                      static_cast<unsigned long long>(out.begin), static_cast<unsigned long long>(out.end),
                      static_cast<unsigned long long>(other.begin), static_cast<unsigned long long>(other.end));
        fail(NF4_ERROR_INVALID_ARGUMENT, std::string("output '") + out.name + "' overlaps " + kind + " '" +
                                             other.name + "'" + where +
                                             ": outputs must not share memory with inputs or other outputs");
    };
    for (auto o = outputs.begin(); o != outputs.end(); ++o) {
        for (auto p = outputs.begin(); p != o; ++p)
            if (overlaps(*o, *p)) fail_overlap(*p, *o, "output");
        for (const Buffer &in : inputs)
            if (overlaps(*o, in)) fail_overlap(*o, in, "input");
    }
}

}  // namespace nf4core

#endif  // NF4CORE_SRC_SIZES_HPP
