// Parallel loops. nf4core does not link OpenMP, and the thread count is ours to
// set (nf4_set_num_threads, NF4CORE_NUM_THREADS; a thread may override it for
// its own calls, nf4_set_thread_num_threads). Where the process already
// runs an OpenMP runtime (torch's libgomp), a job is one parallel region on its
// threads, so that nf4core's helpers are torch's and the two never fight for
// the cores (parallel.cpp says why); otherwise, and with NF4CORE_THREADING=pool,
// a small persistent pool of our own threads.
//
// Work is split into more tasks than threads and handed out dynamically, with
// the calling thread taking part: a helper that starts late or is preempted
// delays the call by one small task, not by a fixed share of the work (on the
// pool it does not delay it at all; OpenMP's closing barrier waits for it).
// Pool helpers spin briefly after a job before they sleep, so back-to-back calls
// do not pay a futex wake-up each (NF4CORE_SPIN_US).
#ifndef NF4CORE_SRC_PARALLEL_HPP
#define NF4CORE_SRC_PARALLEL_HPP

#include <cstdint>
#include <exception>
#include <mutex>
#include <type_traits>
#include <utility>

namespace nf4core {

// The settings behind runtime.h (runtime.cpp checks the arguments).
// The threads a job started from the calling thread uses: that thread's
// override (set_thread_num_threads) where it has one, else the process's count.
int num_threads();
// The process's count, which threads without an override use.
int process_num_threads();
// n >= 1 threads, or 0 for the default (NF4CORE_NUM_THREADS, else the CPUs
// this process may run on); waits for a running job to finish.
void set_num_threads(int n);
// The calling thread's override: n >= 1 threads for the jobs it starts, or 0
// for none (the process's count). A thread_local: other threads, and the jobs
// they start, never see it.
void set_thread_num_threads(int n);
int thread_num_threads();
// Whether an OpenMP runtime is loaded into the process (looked up now).
bool openmp_loaded();
// true: helpers always come from nf4core's pool ("pool"); false: from the
// loaded OpenMP runtime's team where there is one ("auto").
void set_pool_only(bool only);
// Whether the next job runs on an OpenMP team (else on the pool).
bool jobs_use_openmp();

// A non-owning reference to a callable void(int64_t): no allocation per call.
class TaskRef {
public:
    template <class F, class = std::enable_if_t<!std::is_same<std::decay_t<F>, TaskRef>::value>>
    TaskRef(F &f) : obj_(static_cast<void *>(&f)), call_([](void *o, int64_t t) { (*static_cast<F *>(o))(t); }) {}
    void operator()(int64_t t) const { call_(obj_, t); }

private:
    void *obj_;
    void (*call_)(void *, int64_t);
};

// Runs task(i) for i in [0, ntasks) on up to num_threads() threads (the
// calling thread's count, override included). Returns
// false without running anything if the pool is busy (another caller, or a
// nested call from a worker): the caller then runs the tasks itself.
bool pool_run(int64_t ntasks, TaskRef task);

// Tasks per thread at most: enough that a late helper costs little, few
// enough that the per-task cost (an atomic increment) does not matter.
constexpr int64_t kTasksPerThread = 16;

template <class F>
void parallel_for(int64_t n_items, int64_t min_items, F &&fn) {
    if (n_items <= 0) return;
    if (min_items < 1) min_items = 1;
    const int threads = num_threads();
    int64_t ntasks = n_items / min_items;
    if (ntasks > int64_t(threads) * kTasksPerThread) ntasks = int64_t(threads) * kTasksPerThread;
    if (threads <= 1 || ntasks <= 1) {
        fn(int64_t(0), n_items);
        return;
    }
    const int64_t per = n_items / ntasks, extra = n_items % ntasks;
    std::exception_ptr first_error;
    int64_t first_task = ntasks;
    std::mutex error_mutex;
    auto task = [&](int64_t t) {
        const int64_t b0 = t * per + (t < extra ? t : extra);
        const int64_t b1 = b0 + per + (t < extra ? 1 : 0);
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
    if (!pool_run(ntasks, TaskRef(task))) {
        for (int64_t t = 0; t < ntasks; ++t) task(t);
    }
    if (first_error) std::rethrow_exception(first_error);
}

}  // namespace nf4core

#endif  // NF4CORE_SRC_PARALLEL_HPP
