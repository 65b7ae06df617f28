// nf4core inside a program that uses OpenMP (built with -fopenmp, so the
// runtime is loaded): by default the kernels' tasks run on that runtime's
// threads and nf4core starts none of its own; "pool" switches to its own pool.
// Results must be byte-identical to one thread on either kind of thread, from
// the main thread and from inside a parallel region.
#include <omp.h>

#include <chrono>
#include <cstdint>
#include <cstring>
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

struct Problem {
    int64_t M = 3, N = 1000, K = 512, bs = 64;
    float cb[16];
    std::vector<float> w, x;
    std::vector<uint8_t> packed;
    std::vector<float> scales;

    Problem() {
        std::mt19937_64 rng(4);
        std::normal_distribution<float> normal(0.0f, 1.0f);
        nf4_codebook_normal(4, cb);
        w.resize(size_t(N * K));
        x.resize(size_t(M * K));
        for (float &v : w) v = normal(rng);
        for (float &v : x) v = normal(rng);
        packed.resize(size_t(nf4_packed_size_4bit(N * K)));
        scales.resize(size_t(nf4_num_blocks(N * K, bs)));
    }

    // The bytes of a quantization and a product, with the current settings.
    std::vector<uint8_t> run() {
        std::vector<uint8_t> out;
        if (nf4_quantize_4bit(w.data(), NF4_FLOAT32, N * K, bs, cb, packed.data(), scales.data()) != NF4_OK) return out;
        std::vector<float> y(size_t(M * N));
        if (nf4_matmul_4bit(x.data(), NF4_FLOAT32, M, N, K, packed.data(), scales.data(), bs, cb, 1, y.data()) != NF4_OK)
            return out;
        out.assign(packed.begin(), packed.end());
        const uint8_t *s = reinterpret_cast<const uint8_t *>(scales.data());
        out.insert(out.end(), s, s + scales.size() * sizeof(float));
        const uint8_t *b = reinterpret_cast<const uint8_t *>(y.data());
        out.insert(out.end(), b, b + y.size() * sizeof(float));
        return out;
    }
};

}  // namespace

TEST_CASE(threading_settings) {
    CHECK(std::string(nf4_get_threading()) == "openmp");  // the default where OpenMP is loaded
    CHECK(nf4_set_threading("pool") == NF4_OK);
    CHECK(std::string(nf4_get_threading()) == "pool");
    CHECK(nf4_set_threading("openmp") == NF4_OK);
    CHECK(std::string(nf4_get_threading()) == "openmp");
    CHECK(nf4_set_threading("pool") == NF4_OK);
    CHECK(nf4_set_threading("auto") == NF4_OK);
    CHECK(std::string(nf4_get_threading()) == "openmp");
    CHECK(nf4_set_threading("tbb") == NF4_ERROR_INVALID_ARGUMENT);
    CHECK(std::strstr(nf4_last_error(), "expected auto, pool or openmp") != nullptr);
    CHECK(nf4_set_threading(nullptr) == NF4_ERROR_INVALID_ARGUMENT);
    CHECK(std::string(nf4_get_threading()) == "openmp");
}

TEST_CASE(tasks_run_on_the_openmp_team_and_match_one_thread) {
    CHECK(nf4_set_threading("auto") == NF4_OK);
    Problem p;
    nf4_set_num_threads(1);
    const std::vector<uint8_t> want = p.run();
    CHECK(!want.empty());
    omp_set_num_threads(4);  // as torch.set_num_threads does
    int team = 0;
#pragma omp parallel
    {
#pragma omp atomic
        ++team;
    }
    CHECK(team == 4);
    const int before = process_threads();
    // nf4core's jobs run on that team: it starts no thread of its own, and with
    // fewer threads than the team it still asks for the whole team (a smaller
    // one would make libgomp retire threads that the next region starts again)
    for (int threads : {4, 2, 3, 4}) {
        nf4_set_num_threads(threads);
        for (int i = 0; i < 5; ++i) CHECK(p.run() == want);
        if (before > 0)
            CHECK_MSG(process_threads() == before, "%d threads: %d -> %d", threads, before, process_threads());
    }
    // more threads than the team: a larger team, the same bytes
    nf4_set_num_threads(6);
    CHECK(p.run() == want);
    omp_set_num_threads(2);
#pragma omp parallel
    {
    }  // the team back to 2 threads for the cases below
}

TEST_CASE(calls_from_inside_a_parallel_region) {
    // Each team thread calls nf4core; OpenMP gives the nested region one thread
    // (nested parallelism is off), or nf4core runs it inline: same bytes.
    CHECK(nf4_set_threading("openmp") == NF4_OK);
    Problem p;
    nf4_set_num_threads(1);
    const std::vector<uint8_t> want = p.run();
    nf4_set_num_threads(2);
    int bad = 0;
#pragma omp parallel num_threads(3) reduction(+ : bad)
    {
        Problem mine;  // its own buffers
        for (int i = 0; i < 5; ++i) bad += mine.run() != want;
    }
    CHECK(bad == 0);
}

TEST_CASE(pool_threading_uses_its_own_threads) {
    Problem p;
    nf4_set_num_threads(1);
    const std::vector<uint8_t> want = p.run();
    CHECK(nf4_set_threading("pool") == NF4_OK);
    CHECK(std::string(nf4_get_threading()) == "pool");
    const int before = process_threads();
    nf4_set_num_threads(3);
    for (int i = 0; i < 20; ++i) CHECK(p.run() == want);
    // the pool's two helpers exist now, next to OpenMP's
    if (before > 0) CHECK_MSG(process_threads() == before + 2, "threads %d -> %d", before, process_threads());
    CHECK(nf4_set_threading("auto") == NF4_OK);
    CHECK(std::string(nf4_get_threading()) == "openmp");
    CHECK(p.run() == want);
    if (before > 0) CHECK(process_threads() == before + 2);  // the pool's helpers idle, OpenMP's team serves
}

TEST_CASE(a_threads_override_sizes_its_openmp_team) {
    // nf4_set_thread_num_threads on the OpenMP team: a thread whose own OpenMP
    // team size is 1 (omp_set_num_threads is per thread too) and whose override
    // is 4 runs its jobs on a team of 4, which libgomp starts for that thread
    // (three new threads); a thread without an override keeps the process's
    // count, 1 here, and starts none. Same bytes either way.
    CHECK(nf4_set_threading("openmp") == NF4_OK);
    Problem p;
    nf4_set_num_threads(1);
    const std::vector<uint8_t> want = p.run();
    int gained_plain = -1, gained_override = -1, override_seen = -1;
    bool same_plain = false, same_override = false;
    const int start = process_threads();
    // a joined thread (and the OpenMP team it started) can linger in
    // /proc/self/task for a moment after the join: wait for the count to settle
    auto settle = [&](int n) {
        for (int i = 0; i < 200 && process_threads() != n; ++i)
            std::this_thread::sleep_for(std::chrono::milliseconds(5));
        return process_threads();
    };
    std::thread plain([&] {
        omp_set_num_threads(1);
        Problem mine;
        const int before = settle(start + 1);
        same_plain = mine.run() == want;
        gained_plain = process_threads() - before;
    });
    plain.join();
    std::thread scoped([&] {
        omp_set_num_threads(1);
        nf4_set_thread_num_threads(4);
        override_seen = nf4_get_thread_num_threads();
        Problem mine;
        const int before = settle(start + 1);
        same_override = mine.run() == want;
        gained_override = process_threads() - before;  // libgomp keeps the team while the thread lives
    });
    scoped.join();
    CHECK(override_seen == 4 && nf4_get_thread_num_threads() == 0 && nf4_get_num_threads() == 1);
    CHECK(same_plain && same_override);
    if (process_threads() > 0) {
        CHECK_MSG(gained_plain == 0, "no override: %d threads started", gained_plain);
        CHECK_MSG(gained_override == 3, "override 4: %d threads started", gained_override);
    }
    nf4_set_num_threads(0);
    CHECK(nf4_set_threading("auto") == NF4_OK);
}

int main() { return check::run_all(); }
