// Reads of file-backed pages that survive a file truncated under them.
//
// A page of a MAP_SHARED file mapping past the file's end raises SIGBUS when it
// is touched: a checkpoint file mapped by nf4_pager_map_file and truncated (or
// rewritten shorter) by another process would kill ours on the pager's own
// page touches. The pager checks the file (fstat: size, mtime) before it
// touches its pages, and MADV_POPULATE_READ reports such a page as EFAULT
// instead of a signal; the one remaining touch, the read-one-byte-per-page
// fallback for kernels without MADV_POPULATE_READ (before 5.14, or emulators
// that accept and ignore it), runs under this guard so that a truncation racing
// with the check is an error, not a crash.
//
// How: a process-wide SIGBUS handler, installed once (on first use) with
// sigaction, and a jump buffer set around the guarded reads (one at a time). A
// SIGBUS of a guarded thread at an address inside its guarded range jumps back
// (siglongjmp) and read_pages_guarded() returns false; any other SIGBUS goes to
// the handler that was installed before ours (Python's faulthandler, a
// debugger's, a user's), or, where there was none, kills the process as
// SIGBUS always does. A handler installed *after* ours (faulthandler.enable()
// called later) sees a guarded fault first; it cannot be helped without
// re-installing ours on every guarded read.
//
// Header-only (inline) so that the C++ tests exercise this very code (the
// library's symbols are hidden); each binary gets one copy.
#ifndef NF4CORE_SRC_PAGER_SIGBUS_HPP
#define NF4CORE_SRC_PAGER_SIGBUS_HPP

#include <atomic>
#include <csetjmp>
#include <csignal>
#include <cstdint>
#include <mutex>

#if defined(__linux__) || defined(__APPLE__)
#include <pthread.h>
#include <signal.h>
#define NF4_PAGER_SIGBUS_GUARD 1
#endif

namespace nf4core {

#ifdef NF4_PAGER_SIGBUS_GUARD

namespace sigbus_detail {

// The one guarded read in progress: guarded reads are serialized process-wide
// (they are a fallback, rare and short), so the handler reads plain globals,
// never thread-local storage (whose lazy allocation is not signal-safe, and
// whose static model cannot be used by a library loaded with dlopen).
struct Guard {
    std::atomic<bool> active{false};
    pthread_t owner;
    sigjmp_buf *jump = nullptr;
    const char *lo = nullptr, *hi = nullptr;
};

inline Guard guard;
inline std::mutex guard_mu;
inline struct sigaction previous;  // what was installed before ours
inline std::once_flag installed;

inline void handler(int sig, siginfo_t *info, void *ctx) {
    if (guard.active.load(std::memory_order_acquire) && info != nullptr &&
        pthread_equal(guard.owner, pthread_self())) {
        const char *addr = static_cast<const char *>(info->si_addr);
        if (addr >= guard.lo && addr < guard.hi) siglongjmp(*guard.jump, 1);
    }
    // Not ours: what would have happened without us.
    if ((previous.sa_flags & SA_SIGINFO) && previous.sa_sigaction != nullptr) {
        previous.sa_sigaction(sig, info, ctx);
        return;
    }
    if (!(previous.sa_flags & SA_SIGINFO) && previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) {
        previous.sa_handler(sig);
        return;
    }
    // Default action (an ignored SIGBUS from a fault is fatal as well): restore
    // it; returning re-runs the faulting access, which now kills the process. A
    // SIGBUS sent by kill() is not re-raised by returning: raise it.
    struct sigaction dfl = {};
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(sig, &dfl, nullptr);
    if (info == nullptr || info->si_code <= 0) raise(sig);
}

inline void install() {
    std::call_once(installed, [] {
        struct sigaction sa = {};
        sa.sa_sigaction = handler;
        sa.sa_flags = SA_SIGINFO | SA_NODEFER;  // NODEFER: a chained handler may fault again
        sigemptyset(&sa.sa_mask);
        sigaction(SIGBUS, &sa, &previous);
    });
}

}  // namespace sigbus_detail

// Reads one byte of every `step` bytes of [p, p + len) (p and step page
// aligned), faulting the pages in. False if a SIGBUS interrupted it (a page
// beyond the end of its file); the pages before stay resident.
inline bool read_pages_guarded(const char *p, int64_t len, int64_t step) {
    using namespace sigbus_detail;
    install();
    std::lock_guard<std::mutex> lock(guard_mu);
    sigjmp_buf jump;
    guard.owner = pthread_self();
    guard.jump = &jump;
    guard.lo = p;
    guard.hi = p + len;
    if (sigsetjmp(jump, 1) != 0) {  // 1: the signal mask is restored too
        guard.active.store(false, std::memory_order_release);
        return false;
    }
    guard.active.store(true, std::memory_order_release);
    std::atomic_signal_fence(std::memory_order_seq_cst);
    volatile char sink = 0;
    for (int64_t off = 0; off < len; off += step) sink = sink + static_cast<const volatile char *>(p)[off];
    (void)sink;
    std::atomic_signal_fence(std::memory_order_seq_cst);
    guard.active.store(false, std::memory_order_release);
    return true;
}

#else

inline bool read_pages_guarded(const char *p, int64_t len, int64_t step) {
    volatile char sink = 0;
    for (int64_t off = 0; off < len; off += step) sink = sink + static_cast<const volatile char *>(p)[off];
    (void)sink;
    return true;
}

#endif

}  // namespace nf4core

#endif  // NF4CORE_SRC_PAGER_SIGBUS_HPP
