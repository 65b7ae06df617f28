// The per-thread thread count (nf4_set_thread_num_threads, runtime.h) on
// nf4core's own pool (this program loads no OpenMP runtime; test_openmp.cpp
// checks the OpenMP team). A thread's override must be seen by that thread
// only, whatever other threads set at the same time; the process's count must
// stay as it was; and the jobs a thread starts must use its count. The last is
// read from the kernel's side: the pool starts its helper threads only when a
// job asks for them, so the threads this process gains (/proc/self/task) are
// the helpers a call used, and the bytes must equal a one-thread run.
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <dirent.h>
#endif

#include "check.hpp"
#include "nf4core/nf4core.h"

namespace {

// Threads of this process now (-1 where /proc is missing).
int process_threads() {
#if defined(__linux__)
    DIR *d = opendir("/proc/self/task");
    if (!d) return -1;
    int n = 0;
    while (dirent *e = readdir(d))
        if (e->d_name[0] != '.') ++n;
    closedir(d);
    return n;
#else
    return -1;
#endif
}

// std::barrier is C++20: a reusable one for `parties` threads.
class Barrier {
public:
    explicit Barrier(int parties) : parties_(parties) {}
    void wait() {
        std::unique_lock<std::mutex> lock(m_);
        const int gen = gen_;
        if (++waiting_ == parties_) {
            waiting_ = 0;
            ++gen_;
            cv_.notify_all();
        } else {
            cv_.wait(lock, [&] { return gen_ != gen; });
        }
    }

private:
    std::mutex m_;
    std::condition_variable cv_;
    const int parties_;
    int waiting_ = 0, gen_ = 0;
};

// A quantization large enough to split into many tasks (4 Mi elements).
struct Job {
    int64_t n = int64_t(1) << 22, bs = 64;
    float cb[16];
    std::vector<float> x;
    Job() {
        nf4_codebook_normal(4, cb);
        std::mt19937_64 rng(7);
        std::normal_distribution<float> normal(0.0f, 1.0f);
        x.resize(size_t(n));
        for (float &v : x) v = normal(rng);
    }
    std::vector<uint8_t> run() const {
        std::vector<uint8_t> packed(size_t(nf4_packed_size_4bit(n)));
        std::vector<float> scales(size_t(nf4_num_blocks(n, bs)));
        if (nf4_quantize_4bit(x.data(), NF4_FLOAT32, n, bs, cb, packed.data(), scales.data()) != NF4_OK) return {};
        const uint8_t *s = reinterpret_cast<const uint8_t *>(scales.data());
        packed.insert(packed.end(), s, s + scales.size() * sizeof(float));
        return packed;
    }
};

// Waits (up to a second) until the process has `n` threads: a joined thread
// can linger in /proc/self/task for a moment after pthread_join returns.
int settle(int n) {
    for (int i = 0; i < 200 && process_threads() != n; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    return process_threads();
}

}  // namespace

TEST_CASE(settings_and_bad_values) {
    CHECK(nf4_get_thread_num_threads() == 0);  // no override until one is set
    CHECK(nf4_set_num_threads(3) == NF4_OK);
    CHECK(nf4_set_thread_num_threads(5) == NF4_OK);
    CHECK(nf4_get_thread_num_threads() == 5);
    CHECK(nf4_get_num_threads() == 3);  // the process's count is not the override
    CHECK(nf4_set_thread_num_threads(-1) == NF4_ERROR_INVALID_ARGUMENT);
    CHECK(std::strstr(nf4_last_error(), "got -1") != nullptr);
    CHECK(nf4_set_thread_num_threads(1025) == NF4_ERROR_INVALID_ARGUMENT);
    CHECK(nf4_get_thread_num_threads() == 5);  // a refused value changes nothing
    CHECK(nf4_set_thread_num_threads(0) == NF4_OK);
    CHECK(nf4_get_thread_num_threads() == 0);
    CHECK(nf4_get_num_threads() == 3);
    CHECK(nf4_set_num_threads(0) == NF4_OK);
}

TEST_CASE(overlapping_overrides_in_two_threads) {
    // A sets 2, B sets 3, A drops its override while B still has one, then B:
    // the interleaving that left a process-wide save/restore pinned to the
    // wrong count. Each thread sees only its own value at every step.
    CHECK(nf4_set_num_threads(4) == NF4_OK);
    Barrier step(2);
    int a_seen[3] = {-1, -1, -1}, b_seen[3] = {-1, -1, -1};
    std::thread a([&] {
        nf4_set_thread_num_threads(2);
        step.wait();  // 1: A has its override
        step.wait();  // 2: B has its own
        a_seen[0] = nf4_get_thread_num_threads();
        a_seen[1] = nf4_get_num_threads();
        nf4_set_thread_num_threads(0);
        step.wait();  // 3: A dropped its override, B still has one
        a_seen[2] = nf4_get_thread_num_threads();
        step.wait();  // 4
    });
    std::thread b([&] {
        step.wait();  // 1
        b_seen[0] = nf4_get_thread_num_threads();  // A's does not leak here
        nf4_set_thread_num_threads(3);
        step.wait();  // 2
        step.wait();  // 3
        b_seen[1] = nf4_get_thread_num_threads();
        nf4_set_thread_num_threads(0);
        b_seen[2] = nf4_get_thread_num_threads();
        step.wait();  // 4
    });
    a.join();
    b.join();
    CHECK(a_seen[0] == 2 && a_seen[1] == 4 && a_seen[2] == 0);
    CHECK(b_seen[0] == 0 && b_seen[1] == 3 && b_seen[2] == 0);
    CHECK(nf4_get_num_threads() == 4);  // the process's count is intact
    CHECK(nf4_get_thread_num_threads() == 0);
    CHECK(nf4_set_num_threads(0) == NF4_OK);
}

TEST_CASE(jobs_use_the_calling_threads_count) {
    CHECK(std::string(nf4_get_threading()) == "pool");  // no OpenMP runtime in this program
    const Job job;
    CHECK(nf4_set_num_threads(1) == NF4_OK);
    const std::vector<uint8_t> want = job.run();  // one thread, no helper started
    CHECK(!want.empty());
    const int start = process_threads();  // the main thread alone: no helper yet
    int gained_plain = -1, gained_override = -1, gained_other = -1;
    bool same_plain = false, same_override = false;
    // a thread without an override: the process's count (1), no helper
    std::thread plain([&] {
        const int before = settle(start + 1);
        same_plain = job.run() == want;
        gained_plain = process_threads() - before;
    });
    plain.join();
    // a thread with an override of 4 while the process's count stays 1: the pool
    // starts the three helpers the job asks for
    std::thread scoped([&] {
        CHECK(nf4_set_thread_num_threads(4) == NF4_OK);
        const int before = settle(start + 1);
        same_override = job.run() == want;
        gained_override = process_threads() - before;
    });
    scoped.join();
    // the override went with its thread: the main thread still runs alone, and
    // a count of 6 here starts two more helpers (the pool keeps the first three)
    CHECK(job.run() == want);
    CHECK(nf4_get_thread_num_threads() == 0);
    CHECK(nf4_set_thread_num_threads(6) == NF4_OK);
    const int before = settle(start + 3);  // the main thread and the three helpers
    CHECK(job.run() == want);
    gained_other = process_threads() - before;
    CHECK(nf4_set_thread_num_threads(0) == NF4_OK);
    CHECK(same_plain && same_override);
    if (start > 0) {
        CHECK_MSG(gained_plain == 0, "a thread without an override started %d helpers", gained_plain);
        CHECK_MSG(gained_override == 3, "a thread with an override of 4 started %d helpers", gained_override);
        CHECK_MSG(gained_other == 2, "an override of 6 after 4 started %d more helpers", gained_other);
    } else {
        std::printf("  no /proc/self/task: helper counts not checked (bytes are)\n");
    }
    CHECK(nf4_get_num_threads() == 1);
    CHECK(nf4_set_num_threads(0) == NF4_OK);
}

int main() { return check::run_all(); }
