#include "parallel.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <dlfcn.h>
#define NF4CORE_HAVE_DLSYM 1
#endif


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

// Microseconds a helper spins for the next job before it sleeps
// (NF4CORE_SPIN_US, 0 to 10000; default 50; the caller waits up to four times
// as long for the helpers' last tasks before it sleeps). Spinning saves the futex wake-up
// of back-to-back calls, but a spinning helper takes a core from whatever runs
// next (torch's own threads), so it is kept short.
int spin_microseconds() {
    if (const char *env = std::getenv("NF4CORE_SPIN_US")) {
        char *end = nullptr;
        const long v = std::strtol(env, &end, 10);
        if (end != env && *end == '\0' && v >= 0 && v <= 10000) return int(v);
    }
    return 50;
}

// Where helpers come from (nf4_set_threading): the team of an OpenMP runtime
// already loaded into the process where there is one (the default, "auto"), or
// nf4core's own pool ("pool", NF4CORE_THREADING=pool).
std::atomic<bool> &pool_only() {
    static std::atomic<bool> only{[] {
        const char *env = std::getenv("NF4CORE_THREADING");
        return env && std::string(env) == "pool";
    }()};
    return only;
}

// GOMP_parallel(fn, data, num_threads, flags): the entry point GCC emits for
// `#pragma omp parallel`, exported by GNU libgomp and, for compatibility, by
// LLVM's libomp and Intel's libiomp5. Where the process already runs OpenMP
// (torch's CPU ops do, on libgomp), nf4core's work runs on that runtime's
// threads. After every torch op they spin on the cores for a while, waiting for
// the next one; a pool thread of ours, woken next to such a spinner, often did
// not get a core during the call at all, and 2-thread products ran at 1-thread
// speed (benchmarks/bench_matmul.py, pool against openmp; docs/performance.md).
// On the team they start at once and no second set of threads competes with
// torch's. The price is OpenMP's closing barrier, which waits for every team
// thread to have run: where other processes compete for the cores, a call can
// wait a scheduler time slice, as torch's own ops do; "pool" never waits for a
// late helper. nf4core neither links nor loads OpenMP.
struct OpenMP {
    void (*parallel)(void (*)(void *), void *, unsigned, unsigned) = nullptr;  // GOMP_parallel
    int (*thread_num)() = nullptr;                                             // omp_get_thread_num
    int (*max_threads)() = nullptr;                                            // omp_get_max_threads
};

#if defined(NF4CORE_HAVE_DLSYM)
bool resolve(void *handle, OpenMP &omp) {
    omp.parallel = reinterpret_cast<decltype(omp.parallel)>(dlsym(handle, "GOMP_parallel"));
    omp.thread_num = reinterpret_cast<decltype(omp.thread_num)>(dlsym(handle, "omp_get_thread_num"));
    omp.max_threads = reinterpret_cast<decltype(omp.max_threads)>(dlsym(handle, "omp_get_max_threads"));
    return omp.parallel && omp.thread_num && omp.max_threads;
}
#endif

const OpenMP *lookup_openmp() {
#if defined(NF4CORE_HAVE_DLSYM)
    static OpenMP omp;  // written once, before `found` publishes it
    if (resolve(RTLD_DEFAULT, omp)) return &omp;
    // a runtime loaded with RTLD_LOCAL (by a Python extension module, say) is not in the global scope
    for (const char *name : {"libgomp.so.1", "libomp.so", "libiomp5.so", "libgomp.1.dylib", "libomp.dylib"}) {
        if (void *h = dlopen(name, RTLD_LAZY | RTLD_NOLOAD)) {
            const bool ok = resolve(h, omp);
            dlclose(h);  // drops only the reference NOLOAD took
            if (ok) return &omp;
        }
    }
#endif
    return nullptr;
}

// The loaded runtime, or nullptr. Once found it is kept (a runtime is never
// unloaded while a process uses it); until then the lookup is repeated at most
// every 100 ms, so a runtime loaded later (torch imported after pyqlora) is
// picked up.
const OpenMP *loaded_openmp(bool look_now = false) {
    static std::atomic<const OpenMP *> found{nullptr};
    static std::atomic<int64_t> next_lookup_ns{0};
    static std::mutex lookup;
    if (const OpenMP *f = found.load(std::memory_order_acquire)) return f;
    const int64_t now = std::chrono::duration_cast<std::chrono::nanoseconds>(
                            std::chrono::steady_clock::now().time_since_epoch())
                            .count();
    if (!look_now && now < next_lookup_ns.load(std::memory_order_relaxed)) return nullptr;
    std::lock_guard<std::mutex> one_at_a_time(lookup);  // lookup_openmp writes its static
    if (const OpenMP *f = found.load(std::memory_order_acquire)) return f;
    next_lookup_ns.store(now + 100000000, std::memory_order_relaxed);
    const OpenMP *f = lookup_openmp();
    if (f) found.store(f, std::memory_order_release);
    return f;
}

// The OpenMP runtime the next job uses, or nullptr for the pool.
const OpenMP *openmp_for_jobs() { return pool_only().load(std::memory_order_relaxed) ? nullptr : loaded_openmp(); }

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
}

// Spins until done() or `us` microseconds have passed; returns done().
template <class Done>
bool spin_until(Done done, int us) {
    if (done()) return true;
    if (us <= 0) return false;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::microseconds(us);
    for (;;) {
        for (int i = 0; i < 64; ++i) {
            cpu_relax();
            if (done()) return true;
        }
        if (std::chrono::steady_clock::now() >= deadline) return done();
    }
}

// Jobs are handed out as tasks claimed from one atomic counter tagged with the
// job's number, and the caller waits only for helpers that are running a task
// of its job: a helper that wakes late (its core busy with another process or
// a spinning OpenMP worker of torch) finds nothing left to claim and costs the
// caller nothing.
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

    bool run(int64_t ntasks, TaskRef task) {
        if (in_worker_) return false;  // nested call from one of our workers
        std::unique_lock<std::mutex> busy(run_mutex_, std::try_to_lock);
        if (!busy.owns_lock()) return false;  // another caller owns the pool
        if (ntasks >= (int64_t(1) << 31)) return false;  // the counter's low 32 bits
        // the calling thread's count: its override where it has one (read here,
        // on that thread; helpers never consult their own)
        const int helpers = int(std::min<int64_t>(num_threads(), ntasks)) - 1;
        if (const OpenMP *omp = openmp_for_jobs()) {
            run_openmp(*omp, ntasks, task, helpers + 1);
            return true;
        }
        start_workers(helpers);
        const uint64_t job = ++jobs_;
        // Close the counter before the job's fields change: a late helper of the
        // previous job, which may read the new task count, then fails its claim.
        claim_.store((job << 32) | kClosed);
        task_.store(&task);
        ntasks_.store(uint32_t(ntasks));
        wanted_.store(helpers);
        claim_.store(job << 32);  // open
        bool wake;
        {
            std::lock_guard<std::mutex> lock(mutex_);  // a helper about to sleep sees the job or is woken
            job_.store(job);
            wake = sleepers_ > 0;
        }
        if (wake) wake_.notify_all();
        for (;;) {  // the calling thread takes part
            const uint64_t t = claim_.fetch_add(1) & 0xffffffffu;
            if (t >= uint64_t(ntasks)) break;
            task(int64_t(t));
        }
        // Every task is claimed; wait for the helpers still running one (spin
        // first: they are at most one small task behind).
        if (!spin_until([&] { return running_.load() == 0; }, 4 * spin_us_)) {
            std::unique_lock<std::mutex> lock(mutex_);
            done_.wait(lock, [&] { return running_.load() == 0; });
        }
        task_.store(nullptr);
        return true;
    }

private:
    Pool() : threads_(default_threads()), spin_us_(spin_microseconds()) {}

    // The job as one parallel region of the OpenMP runtime (the caller is its
    // master); the team's first `team` threads claim tasks until none is left,
    // and GOMP_parallel returns when all have finished. The region asks for the
    // runtime's own team size (torch's thread count, set with
    // omp_set_num_threads) unless `team` is larger: a smaller team would make
    // libgomp retire threads that torch's next op then starts again. Called
    // inside another parallel region, OpenMP gives a team of one (nested
    // parallelism is off by default): the caller then runs every task itself.
    static void run_openmp(const OpenMP &omp, int64_t ntasks, TaskRef task, int team) {
        struct Job {
            std::atomic<int64_t> next{0};
            int64_t ntasks;
            int team;
            int (*thread_num)();
            const TaskRef *task;
        } job;
        job.ntasks = ntasks;
        job.team = team;
        job.thread_num = omp.thread_num;
        job.task = &task;
        omp.parallel(
            [](void *p) {
                Job &j = *static_cast<Job *>(p);
                if (j.thread_num() >= j.team) return;
                for (int64_t t; (t = j.next.fetch_add(1, std::memory_order_relaxed)) < j.ntasks;) (*j.task)(t);
            },
            &job, team > omp.max_threads() ? unsigned(team) : 0u, 0u);
    }

    void start_workers(int n) {
        while (int(workers_.size()) < n) {
            const int id = int(workers_.size());
            const uint64_t seen = job_.load();  // the job about to start is new to it
            workers_.emplace_back([this, id, seen] { loop(id, seen); });
            workers_.back().detach();
        }
    }

    // Claims and runs tasks of job `job` until none is left. running_ is
    // raised before each claim, so a caller that has seen every task claimed
    // and running_ == 0 knows no task of its job is still running or about to.
    void help(uint64_t job) {
        for (;;) {
            running_.fetch_add(1);
            uint64_t v = claim_.load();
            bool got = false;
            while ((v >> 32) == (job & 0xffffffffu) && (v & 0xffffffffu) < ntasks_.load()) {
                if (claim_.compare_exchange_weak(v, v + 1)) {
                    got = true;
                    break;
                }
            }
            if (got) (*task_.load())(int64_t(v & 0xffffffffu));
            if (running_.fetch_sub(1) == 1) {
                std::lock_guard<std::mutex> lock(mutex_);  // the caller may be waiting on done_
                done_.notify_all();
            }
            if (!got) return;
        }
    }

    void loop(int id, uint64_t seen) {
        in_worker_ = true;
        for (;;) {
            auto fresh = [&] { return job_.load(std::memory_order_acquire) != seen; };
            if (!spin_until(fresh, spin_us_)) {
                std::unique_lock<std::mutex> lock(mutex_);
                ++sleepers_;
                wake_.wait(lock, fresh);
                --sleepers_;
            }
            seen = job_.load();
            if (id < wanted_.load()) help(seen);
        }
    }

    std::atomic<int> threads_;
    const int spin_us_;
    std::mutex run_mutex_;  // one job at a time
    std::mutex mutex_;      // guards sleeping and waking
    std::condition_variable wake_, done_;
    std::vector<std::thread> workers_;
    static constexpr uint64_t kClosed = 0xffffffffu;  // a task index no job reaches
    uint64_t jobs_ = 0;                  // under run_mutex_
    std::atomic<uint64_t> job_{0};       // the latest job's number (helpers wait for a change)
    std::atomic<uint64_t> claim_{0};     // job number << 32 | next task to claim
    std::atomic<const TaskRef *> task_{nullptr};
    std::atomic<uint32_t> ntasks_{0};
    std::atomic<int> wanted_{0};         // helpers with id < wanted_ take part
    std::atomic<int> running_{0};        // helpers between a claim attempt and the end of its task
    int sleepers_ = 0;                   // under mutex_
    static thread_local bool in_worker_;
};

thread_local bool Pool::in_worker_ = false;

// The calling thread's override (0: none). A plain thread_local int: reading it
// costs nothing, and two threads that set it never see each other's value, so
// overlapping `with pq.num_threads(n)` blocks in two Python threads cannot
// leave the process with the wrong count (the process's count is untouched).
thread_local int thread_threads = 0;

}  // namespace

int num_threads() { return thread_threads > 0 ? thread_threads : Pool::instance().threads(); }

int process_num_threads() { return Pool::instance().threads(); }

void set_thread_num_threads(int n) { thread_threads = n; }

int thread_num_threads() { return thread_threads; }

void set_num_threads(int n) { Pool::instance().set_threads(n == 0 ? default_threads() : n); }

bool openmp_loaded() { return loaded_openmp(true) != nullptr; }

void set_pool_only(bool only) { pool_only().store(only); }

bool jobs_use_openmp() { return openmp_for_jobs() != nullptr; }

bool pool_run(int64_t ntasks, TaskRef task) { return Pool::instance().run(ntasks, task); }

}  // namespace nf4core
