#include "parallel.hpp"

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif

#include "error.hpp"
#include "nf4core/runtime.h"

namespace nf4core {
namespace {

int cpus_available() {
#if defined(__linux__)
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) {
        const int n = CPU_COUNT(&set);
        if (n > 0) return n;
    }
#endif
    const unsigned n = std::thread::hardware_concurrency();
    return n > 0 ? int(n) : 1;
}

int default_threads() {
    if (const char *env = std::getenv("NF4CORE_NUM_THREADS")) {
        char *end = nullptr;
        const long v = std::strtol(env, &end, 10);
        if (end != env && *end == '\0' && v >= 1 && v <= 1024) return int(v);
    }
    return cpus_available();
}

class Pool {
public:
    static Pool &instance() {
        static Pool *pool = new Pool();  // never destroyed: workers may outlive static destructors
        return *pool;
    }

    int threads() const { return threads_.load(std::memory_order_relaxed); }

    void set_threads(int n) {
        std::lock_guard<std::mutex> busy(run_mutex_);  // not while a job runs
        threads_.store(n);
    }

    bool run(int64_t ntasks, const std::function<void(int64_t)> &task) {
        if (in_worker_) return false;  // nested call from one of our workers
        std::unique_lock<std::mutex> busy(run_mutex_, std::try_to_lock);
        if (!busy.owns_lock()) return false;  // another caller owns the pool
        const int helpers = std::min<int64_t>(threads(), ntasks) - 1;
        start_workers(helpers);
        {
            std::lock_guard<std::mutex> lock(mutex_);
            task_ = &task;
            ntasks_ = ntasks;
            next_.store(0);
            active_ = helpers;
            wanted_ = helpers;
            ++generation_;
        }
        wake_.notify_all();
        work();  // the calling thread takes part
        std::unique_lock<std::mutex> lock(mutex_);
        done_.wait(lock, [&] { return active_ == 0; });
        task_ = nullptr;
        return true;
    }

private:
    Pool() : threads_(default_threads()) {}

    void start_workers(int n) {
        while (int(workers_.size()) < n) {
            const int id = int(workers_.size());
            workers_.emplace_back([this, id] { loop(id); });
            workers_.back().detach();
        }
    }

    void work() {
        for (;;) {
            const int64_t t = next_.fetch_add(1);
            if (t >= ntasks_) return;
            (*task_)(t);
        }
    }

    void loop(int id) {
        in_worker_ = true;
        uint64_t seen = 0;
        for (;;) {
            {
                std::unique_lock<std::mutex> lock(mutex_);
                wake_.wait(lock, [&] { return generation_ != seen; });
                seen = generation_;
                if (id >= wanted_) continue;  // not needed for this job
            }
            work();
            std::lock_guard<std::mutex> lock(mutex_);
            if (--active_ == 0) done_.notify_all();
        }
    }

    std::atomic<int> threads_;
    std::mutex run_mutex_;  // one job at a time
    std::mutex mutex_;
    std::condition_variable wake_, done_;
    std::vector<std::thread> workers_;
    const std::function<void(int64_t)> *task_ = nullptr;
    int64_t ntasks_ = 0;
    std::atomic<int64_t> next_{0};
    int active_ = 0, wanted_ = 0;
    uint64_t generation_ = 0;
    static thread_local bool in_worker_;
};

thread_local bool Pool::in_worker_ = false;

}  // namespace

int num_threads() { return Pool::instance().threads(); }

bool pool_run(int64_t ntasks, const std::function<void(int64_t)> &task) { return Pool::instance().run(ntasks, task); }

}  // namespace nf4core

extern "C" {

nf4_status nf4_set_num_threads(int32_t n) {
    return nf4core::guarded([&] {
        nf4core::require(n >= 0 && n <= 1024, "thread count must be between 1 and 1024 (0: the default), got " +
                                                  std::to_string(n));
        nf4core::Pool::instance().set_threads(n == 0 ? nf4core::default_threads() : n);
    });
}

int32_t nf4_get_num_threads(void) { return nf4core::num_threads(); }

}  // extern "C"
