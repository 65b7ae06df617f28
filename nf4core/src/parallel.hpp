// A small persistent thread pool: nf4core does not use OpenMP, so that it never
// fights torch's OpenMP runtime for the same cores, and so that the thread
// count is ours to set (nf4_set_num_threads, NF4CORE_NUM_THREADS).
#ifndef NF4CORE_SRC_PARALLEL_HPP
#define NF4CORE_SRC_PARALLEL_HPP

#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>

namespace nf4core {

int num_threads();

// Runs task(i) for i in [0, ntasks) on up to num_threads() threads. Returns
// false without running anything if the pool is busy (another caller, or a
// nested call from a worker): the caller then runs the tasks itself.
bool pool_run(int64_t ntasks, const std::function<void(int64_t)> &task);

template <class F>
void parallel_for(int64_t n_items, int64_t min_items, F &&fn) {
    if (n_items <= 0) return;
    if (min_items < 1) min_items = 1;
    const int threads = num_threads();
    int64_t ntasks = n_items / min_items;
    if (ntasks > int64_t(threads) * 4) ntasks = int64_t(threads) * 4;  // some slack for uneven speed
    if (threads <= 1 || ntasks <= 1) {
        fn(int64_t(0), n_items);
        return;
    }
    const int64_t per = n_items / ntasks, extra = n_items % ntasks;
    auto range = [&](int64_t t, int64_t &b0, int64_t &b1) {
        b0 = t * per + (t < extra ? t : extra);
        b1 = b0 + per + (t < extra ? 1 : 0);
    };
    std::exception_ptr first_error;
    int64_t first_task = ntasks;
    std::mutex error_mutex;
    auto task = [&](int64_t t) {
        int64_t b0, b1;
        range(t, b0, b1);
        try {
            fn(b0, b1);
        } catch (...) {
            std::lock_guard<std::mutex> lock(error_mutex);
            if (t < first_task) {
                first_task = t;
                first_error = std::current_exception();
            }
        }
    };
    if (!pool_run(ntasks, task)) {
        for (int64_t t = 0; t < ntasks; ++t) task(t);
    }
    if (first_error) std::rethrow_exception(first_error);
}

}  // namespace nf4core

#endif  // NF4CORE_SRC_PARALLEL_HPP
