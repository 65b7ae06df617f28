// Errors inside nf4core are C++ exceptions of type nf4core::Error; every
// extern "C" entry point runs its body through guarded(), which turns them
// into a status code plus a per-thread message (the faiss c_api pattern).
#ifndef NF4CORE_SRC_ERROR_HPP
#define NF4CORE_SRC_ERROR_HPP

#include <exception>
#include <new>
#include <string>
#include <utility>

#include "nf4core/common.h"

namespace nf4core {

class Error : public std::exception {
public:
    Error(nf4_status status, std::string message) : status_(status), message_(std::move(message)) {}
    nf4_status status() const noexcept { return status_; }
    const char *what() const noexcept override { return message_.c_str(); }

private:
    nf4_status status_;
    std::string message_;
};

[[noreturn]] inline void fail(nf4_status status, std::string message) { throw Error(status, std::move(message)); }

inline void require(bool ok, const std::string &message) {
    if (!ok) fail(NF4_ERROR_INVALID_ARGUMENT, message);
}

void set_last_error(const char *message) noexcept;

template <class F>
nf4_status guarded(F &&body) noexcept {
    set_last_error("");
    try {
        body();
        return NF4_OK;
    } catch (const Error &e) {
        set_last_error(e.what());
        return e.status();
    } catch (const std::bad_alloc &) {
        set_last_error("out of memory");
        return NF4_ERROR_OUT_OF_MEMORY;
    } catch (const std::exception &e) {
        set_last_error(e.what());
        return NF4_ERROR_INTERNAL;
    } catch (...) {
        set_last_error("unknown internal error");
        return NF4_ERROR_INTERNAL;
    }
}

}  // namespace nf4core

#endif  // NF4CORE_SRC_ERROR_HPP
