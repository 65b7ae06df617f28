// The pager's host backend, checked against the real thing: a shadow copy of
// every byte (data must survive any sequence of evictions and prefetches),
// the kernel's own accounting of resident memory (/proc/self/status RssFile,
// mincore) and real faults (a file-size limit, unusable spill directories).
#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <csignal>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.hpp"
#include "nf4core/nf4core.h"

namespace {

constexpr int64_t MiB = 1024 * 1024;

std::string scratch_dir() {
    const char *t = std::getenv("TMPDIR");
    std::string base = (t && t[0]) ? t : "/tmp";
    std::string tmpl = base + "/nf4pager-test-XXXXXX";
    std::vector<char> buf(tmpl.begin(), tmpl.end());
    buf.push_back('\0');
    if (!mkdtemp(buf.data())) return base;
    return buf.data();
}

// Bytes of file-backed memory mapped into this process (Linux), -1 elsewhere.
int64_t rss_file_bytes() {
    std::ifstream f("/proc/self/status");
    std::string key;
    while (f >> key) {
        if (key == "RssFile:") {
            int64_t kb = 0;
            f >> kb;
            return kb * 1024;
        }
        f.ignore(1 << 20, '\n');
    }
    return -1;
}

nf4_pager_stats stats_of(nf4_pager *p) {
    nf4_pager_stats s{};
    CHECK(nf4_pager_stats_get(p, &s) == NF4_OK);
    return s;
}

void fill(std::mt19937_64 &rng, uint8_t *dst, std::vector<uint8_t> &shadow, int64_t n) {
    shadow.resize(size_t(n));
    for (int64_t i = 0; i < n; i += 8) {
        const uint64_t r = rng();
        std::memcpy(&shadow[size_t(i)], &r, size_t(std::min<int64_t>(8, n - i)));
    }
    std::memcpy(dst, shadow.data(), size_t(n));
}

}  // namespace

TEST_CASE(data_survives_evict_prefetch_cycles_under_budget) {
    const int64_t sizes[] = {3 * MiB + 123, 5 * MiB, 1 * MiB, 7 * 1024, 2 * MiB - 1};
    int64_t total = 0;
    for (int64_t s : sizes) total += s;
    const int64_t budget = total / 4;
    nf4_pager *p = nullptr;
    CHECK(nf4_pager_create(budget, nullptr, 1 * MiB, &p) == NF4_OK);
    if (!p) return;
    std::mt19937_64 rng(5);
    std::vector<uint8_t *> bufs;
    std::vector<std::vector<uint8_t>> shadow(std::size(sizes));
    for (size_t k = 0; k < std::size(sizes); ++k) {
        void *ptr = nullptr;
        CHECK(nf4_pager_alloc(p, sizes[k], &ptr) == NF4_OK);
        CHECK(reinterpret_cast<uintptr_t>(ptr) % uintptr_t(nf4_pager_os_page_size()) == 0);
        bufs.push_back(static_cast<uint8_t *>(ptr));
        CHECK(std::all_of(bufs[k], bufs[k] + sizes[k], [](uint8_t b) { return b == 0; }));  // zero-filled
        CHECK(nf4_pager_prefetch(p, ptr, sizes[k]) == NF4_OK);
        fill(rng, bufs[k], shadow[k], sizes[k]);
    }
    int64_t max_resident = 0;
    bool all_ok = true;
    for (int round = 0; round < 12; ++round) {
        for (size_t k = 0; k < std::size(sizes); ++k) {
            // a random sub-range, like an optimizer step touching one tensor
            const int64_t a = int64_t(rng() % uint64_t(sizes[k])), b = a + int64_t(rng() % uint64_t(sizes[k] - a)) + 1;
            CHECK(nf4_pager_prefetch(p, bufs[k] + a, b - a) == NF4_OK);
            all_ok &= std::memcmp(bufs[k] + a, shadow[k].data() + a, size_t(b - a)) == 0;
            for (int64_t i = a; i < b; i += 4093) shadow[k][size_t(i)] = bufs[k][i] = uint8_t(rng());
            const nf4_pager_stats s = stats_of(p);
            // one range may be up to 5 MiB (> budget) and stays resident; readahead
            // may add a little of the next page
            max_resident = std::max(max_resident, s.resident_bytes);
            CHECK_MSG(s.resident_bytes <= std::max(budget, b - a + 2 * MiB) + 2 * MiB, "resident %lld budget %lld",
                      (long long)s.resident_bytes, (long long)budget);
        }
        if (round % 4 == 3) CHECK(nf4_pager_evict_all(p) == NF4_OK);
    }
    CHECK(all_ok);
    for (size_t k = 0; k < std::size(sizes); ++k)
        CHECK(std::memcmp(bufs[k], shadow[k].data(), size_t(sizes[k])) == 0);  // faults back in without prefetch
    const nf4_pager_stats s = stats_of(p);
    CHECK(s.page_ins > 0 && s.page_outs > 0);
    CHECK(s.num_allocations == int64_t(std::size(sizes)));
    CHECK(s.budget_bytes == budget && s.page_bytes == 1 * MiB);
    CHECK(s.spilled_bytes == s.allocated_bytes - s.resident_bytes);
    std::printf("  budget %lld of %lld bytes, max resident %lld, page_ins %lld, page_outs %lld\n", (long long)budget,
                (long long)total, (long long)max_resident, (long long)s.page_ins, (long long)s.page_outs);
    for (uint8_t *b : bufs) CHECK(nf4_pager_free(p, b) == NF4_OK);
    CHECK(stats_of(p).allocated_bytes == 0);
    nf4_pager_destroy(p);
}

TEST_CASE(stats_count_pages_in_and_out) {
    nf4_pager *p = nullptr;
    CHECK(nf4_pager_create(-1, nullptr, 1 * MiB, &p) == NF4_OK);
    if (!p) return;
    void *ptr = nullptr;
    CHECK(nf4_pager_alloc(p, 4 * MiB, &ptr) == NF4_OK);
    auto *b = static_cast<uint8_t *>(ptr);
    nf4_pager_stats s = stats_of(p);
    CHECK(s.allocated_bytes == 4 * MiB && s.resident_bytes == 0 && s.spilled_bytes == 4 * MiB);
    CHECK(s.page_ins == 0 && s.page_outs == 0 && s.num_allocations == 1 && s.budget_bytes == -1);
    CHECK(nf4_pager_prefetch(p, b + MiB + 10, 1) == NF4_OK);  // one byte: its whole 1 MiB page
    s = stats_of(p);
    CHECK(s.page_ins == 1);
    CHECK_MSG(s.resident_bytes >= MiB, "resident %lld", (long long)s.resident_bytes);
    CHECK(nf4_pager_prefetch(p, b + MiB, MiB) == NF4_OK);  // already resident: no page-in
    CHECK(stats_of(p).page_ins == 1);
    CHECK(nf4_pager_prefetch(p, b + MiB - 1, 2) == NF4_OK);  // straddles pages 0 and 1
    CHECK(stats_of(p).page_ins == 2);
    CHECK(stats_of(p).page_in_bytes == 2 * MiB);
    std::memset(b, 7, size_t(4 * MiB));  // touched without prefetch: resident, honestly reported
    CHECK(stats_of(p).resident_bytes == 4 * MiB);
    CHECK(nf4_pager_evict(p, b, 2 * MiB) == NF4_OK);
    s = stats_of(p);
    CHECK(s.page_outs == 2);
    CHECK(s.resident_bytes == 2 * MiB && s.spilled_bytes == 2 * MiB);
    CHECK(nf4_pager_evict_all(p) == NF4_OK);
    s = stats_of(p);
    CHECK(s.page_outs == 4 && s.resident_bytes == 0);
    CHECK(s.page_out_bytes == 4 * MiB);
    CHECK(nf4_pager_evict_all(p) == NF4_OK);  // nothing resident: nothing counted
    CHECK(stats_of(p).page_outs == 4);
    CHECK(std::all_of(b, b + 4 * MiB, [](uint8_t v) { return v == 7; }));
    // an allocation's last page is short: its bytes, not page_bytes, are counted
    void *ptr2 = nullptr;
    const int64_t os_page = nf4_pager_os_page_size(), odd = MiB + 3 * os_page;
    CHECK(nf4_pager_alloc(p, odd, &ptr2) == NF4_OK);
    std::memset(ptr2, 1, size_t(odd));
    CHECK(nf4_pager_evict(p, ptr2, odd) == NF4_OK);
    s = stats_of(p);
    CHECK_MSG(s.page_outs == 6 && s.page_out_bytes == 4 * MiB + odd, "page_outs %lld, %lld bytes",
              (long long)s.page_outs, (long long)s.page_out_bytes);
    const int64_t in0 = s.page_in_bytes;
    CHECK(nf4_pager_prefetch(p, ptr2, odd) == NF4_OK);
    s = stats_of(p);
    CHECK_MSG(s.page_in_bytes - in0 == odd, "page-in bytes %lld, expected %lld", (long long)(s.page_in_bytes - in0),
              (long long)odd);
    CHECK(nf4_pager_free(p, ptr2) == NF4_OK);
    nf4_pager_destroy(p);
}

TEST_CASE(budget_evicts_least_recently_used_first) {
    nf4_pager *p = nullptr;
    CHECK(nf4_pager_create(2 * MiB, nullptr, 1 * MiB, &p) == NF4_OK);
    if (!p) return;
    void *ptr = nullptr;
    CHECK(nf4_pager_alloc(p, 4 * MiB, &ptr) == NF4_OK);
    auto *b = static_cast<uint8_t *>(ptr);
    auto page_resident = [&](int64_t i) {
#ifdef __APPLE__
        std::vector<char> v(size_t(MiB / nf4_pager_os_page_size()));
#else
        std::vector<unsigned char> v(size_t(MiB / nf4_pager_os_page_size()));
#endif
        mincore(reinterpret_cast<char *>(b + i * MiB), size_t(MiB), v.data());
        return std::any_of(v.begin(), v.end(), [](unsigned char c) { return c & 1; });
    };
    for (int64_t i : {0, 1, 0, 2}) CHECK(nf4_pager_prefetch(p, b + i * MiB, MiB) == NF4_OK);
    // after 0,1,0 the order is 1,0 (LRU first); prefetching 2 over a 2 MiB budget evicts 1
    CHECK(page_resident(0) && !page_resident(1) && page_resident(2));
    CHECK(nf4_pager_prefetch(p, b, 3 * MiB) == NF4_OK);  // larger than the budget: kept whole
    CHECK(page_resident(0) && page_resident(1) && page_resident(2));
    nf4_pager_destroy(p);
}

TEST_CASE(eviction_returns_memory_to_the_os) {
    if (rss_file_bytes() < 0) {
        std::printf("  no /proc/self/status: RSS part skipped (mincore is checked elsewhere)\n");
        return;
    }
    nf4_pager *p = nullptr;
    CHECK(nf4_pager_create(-1, nullptr, 0, &p) == NF4_OK);
    if (!p) return;
    if (nf4_pager_spill_is_tmpfs(p)) {
        std::printf("  spill dir %s is a tmpfs: eviction cannot free memory there, skipped\n", nf4_pager_spill_dir(p));
        nf4_pager_destroy(p);
        return;
    }
    const int64_t n = 64 * MiB;
    void *ptr = nullptr;
    CHECK(nf4_pager_alloc(p, n, &ptr) == NF4_OK);
    auto *b = static_cast<uint8_t *>(ptr);
    std::mt19937_64 rng(1);
    std::vector<uint8_t> shadow;
    const int64_t before = rss_file_bytes();
    fill(rng, b, shadow, n);
    const int64_t filled = rss_file_bytes();
    CHECK(nf4_pager_evict_all(p) == NF4_OK);
    const int64_t evicted = rss_file_bytes();
    std::printf("  RssFile: before %lld MiB, filled %lld MiB, after evict %lld MiB\n", (long long)(before / MiB),
                (long long)(filled / MiB), (long long)(evicted / MiB));
    CHECK(filled - before >= n * 9 / 10);
    CHECK(filled - evicted >= n * 9 / 10);
    CHECK(stats_of(p).resident_bytes == 0);
    CHECK(std::memcmp(b, shadow.data(), size_t(n)) == 0);
    nf4_pager_destroy(p);
}

TEST_CASE(freed_regions_are_reused_and_zero) {
    nf4_pager *p = nullptr;
    CHECK(nf4_pager_create(-1, nullptr, 0, &p) == NF4_OK);
    if (!p) return;
    void *a = nullptr, *b = nullptr, *c = nullptr;
    CHECK(nf4_pager_alloc(p, 3 * MiB, &a) == NF4_OK);
    CHECK(nf4_pager_alloc(p, 1 * MiB, &b) == NF4_OK);
    std::memset(a, 0xAB, size_t(3 * MiB));
    std::memset(b, 0xCD, size_t(MiB));
    CHECK(nf4_pager_free(p, a) == NF4_OK);
    CHECK(nf4_pager_free(p, a) == NF4_ERROR_INVALID_ARGUMENT);  // twice
    CHECK(nf4_pager_alloc(p, 2 * MiB, &c) == NF4_OK);           // fits in a's old region
    auto *cb = static_cast<uint8_t *>(c);
    CHECK(std::all_of(cb, cb + 2 * MiB, [](uint8_t v) { return v == 0; }));
    auto *bb = static_cast<uint8_t *>(b);
    CHECK(std::all_of(bb, bb + MiB, [](uint8_t v) { return v == 0xCD; }));
    nf4_pager_stats s = stats_of(p);
    CHECK(s.num_allocations == 2 && s.allocated_bytes == 3 * MiB);
    nf4_pager_destroy(p);
}

TEST_CASE(threads_hammer_prefetch_and_evict) {
    nf4_pager *p = nullptr;
    CHECK(nf4_pager_create(4 * MiB, nullptr, 256 * 1024, &p) == NF4_OK);
    if (!p) return;
    constexpr int T = 4;
    const int64_t n = 3 * MiB + 4096 * 3;
    std::vector<uint8_t *> bufs(T);
    for (auto &b : bufs) {
        void *ptr = nullptr;
        CHECK(nf4_pager_alloc(p, n, &ptr) == NF4_OK);
        b = static_cast<uint8_t *>(ptr);
    }
    std::atomic<int> errors{0}, mismatches{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < T; ++t)
        threads.emplace_back([&, t] {
            std::mt19937_64 rng(uint64_t(t) + 100);
            std::vector<uint8_t> shadow(size_t(n), 0);
            uint8_t *b = bufs[size_t(t)];
            for (int it = 0; it < 60; ++it) {
                const int64_t a = int64_t(rng() % uint64_t(n)), len = int64_t(rng() % uint64_t(n - a)) + 1;
                const int op = int(rng() % 4);
                nf4_status st = NF4_OK;
                if (op == 0) st = nf4_pager_evict(p, b + a, len);
                else if (op == 1 && t == 0) st = nf4_pager_evict_all(p);
                else st = nf4_pager_prefetch(p, b + a, len);
                if (st != NF4_OK) ++errors;
                if (std::memcmp(b + a, shadow.data() + a, size_t(len)) != 0) ++mismatches;
                for (int64_t i = a; i < a + len; i += 997) shadow[size_t(i)] = b[i] = uint8_t(rng());
                nf4_pager_stats s{};
                if (nf4_pager_stats_get(p, &s) != NF4_OK) ++errors;
            }
            if (std::memcmp(b, shadow.data(), size_t(n)) != 0) ++mismatches;
        });
    for (auto &th : threads) th.join();
    CHECK(errors == 0);
    CHECK(mismatches == 0);
    nf4_pager_destroy(p);
}

TEST_CASE(bad_arguments_are_rejected) {
    nf4_pager *p = nullptr;
    CHECK(nf4_pager_create(-1, nullptr, 1000, &p) == NF4_ERROR_INVALID_ARGUMENT && p == nullptr);
    CHECK(std::strstr(nf4_last_error(), "page_bytes") != nullptr);
    CHECK(nf4_pager_create(-1, nullptr, -4096, &p) == NF4_ERROR_INVALID_ARGUMENT);
    CHECK(nf4_pager_create(-1, nullptr, 0, nullptr) == NF4_ERROR_INVALID_ARGUMENT);
    CHECK(nf4_pager_create(-1, nullptr, 0, &p) == NF4_OK);
    if (!p) return;
    CHECK(nf4_pager_get_backend(p) == NF4_PAGER_HOST);
    void *ptr = nullptr;
    CHECK(nf4_pager_alloc(p, 0, &ptr) == NF4_ERROR_INVALID_ARGUMENT);
    CHECK(nf4_pager_alloc(p, -5, &ptr) == NF4_ERROR_INVALID_ARGUMENT);
    CHECK(nf4_pager_alloc(p, 10000, &ptr) == NF4_OK);
    int local = 0;
    CHECK(nf4_pager_prefetch(p, &local, 4) == NF4_ERROR_INVALID_ARGUMENT);
    CHECK(std::strstr(nf4_last_error(), "not lie in memory allocated by this pager") != nullptr);
    CHECK(nf4_pager_evict(p, &local, 4) == NF4_ERROR_INVALID_ARGUMENT);
    CHECK(nf4_pager_free(p, &local) == NF4_ERROR_INVALID_ARGUMENT);
    CHECK(nf4_pager_prefetch(p, static_cast<char *>(ptr) + 8000, 100000) == NF4_ERROR_INVALID_ARGUMENT);
    CHECK(std::strstr(nf4_last_error(), "past the end") != nullptr);
    CHECK(nf4_pager_prefetch(p, ptr, -1) == NF4_ERROR_INVALID_ARGUMENT);
    CHECK(nf4_pager_prefetch(p, ptr, 0) == NF4_OK);
    CHECK(nf4_pager_prefetch(nullptr, ptr, 1) == NF4_ERROR_INVALID_ARGUMENT);
    CHECK(nf4_pager_last_os_error() == 0);
    nf4_pager_destroy(p);
    nf4_pager_destroy(nullptr);
}

TEST_CASE(unusable_spill_directories_fail_clearly) {
    const std::string dir = scratch_dir();
    nf4_pager *p = nullptr;
    const std::string missing = dir + "/does-not-exist";
    CHECK(nf4_pager_create(-1, missing.c_str(), 0, &p) == NF4_ERROR_INVALID_ARGUMENT && p == nullptr);
    CHECK(std::strstr(nf4_last_error(), missing.c_str()) != nullptr);
    CHECK(std::strstr(nf4_last_error(), std::strerror(ENOENT)) != nullptr);
    CHECK(nf4_pager_last_os_error() == ENOENT);

    const std::string file = dir + "/a-file";
    std::fclose(std::fopen(file.c_str(), "w"));
    CHECK(nf4_pager_create(-1, file.c_str(), 0, &p) == NF4_ERROR_INVALID_ARGUMENT);
    CHECK(nf4_pager_last_os_error() == ENOTDIR);

    chmod(dir.c_str(), 0755);  // traversable by anyone: only the write bit below is missing
    const std::string ro = dir + "/read-only";
    mkdir(ro.c_str(), 0555);
    chmod(ro.c_str(), 0555);
    if (access(ro.c_str(), W_OK) == 0 && geteuid() == 0) {
        // root ignores permission bits: check the same fault as an unprivileged
        // user (nobody), in a child so that this process keeps its rights
        const pid_t pid = fork();
        if (pid == 0) {
            if (setgid(65534) != 0 || setuid(65534) != 0) _exit(10);
            struct stat st;
            if (stat(ro.c_str(), &st) != 0 || access(ro.c_str(), W_OK) == 0) _exit(11);
            nf4_pager *q = nullptr;
            if (nf4_pager_create(-1, ro.c_str(), 0, &q) != NF4_ERROR_INVALID_ARGUMENT || q != nullptr) _exit(12);
            if (nf4_pager_last_os_error() != EACCES) _exit(13);
            if (std::strstr(nf4_last_error(), ro.c_str()) == nullptr) _exit(14);
            _exit(0);
        }
        int status = 0;
        waitpid(pid, &status, 0);
        CHECK_MSG(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child as nobody: exit %d",
                  WIFEXITED(status) ? WEXITSTATUS(status) : -1);
    } else if (access(ro.c_str(), W_OK) == 0) {
        std::printf("  permission bits do not stop this user: read-only case skipped\n");
    } else {
        CHECK(nf4_pager_create(-1, ro.c_str(), 0, &p) == NF4_ERROR_INVALID_ARGUMENT);
        CHECK(std::strstr(nf4_last_error(), ro.c_str()) != nullptr);
        CHECK(nf4_pager_last_os_error() == EACCES);
    }
    CHECK(nf4_pager_create(-1, dir.c_str(), 0, &p) == NF4_OK);  // the scratch dir itself works
    if (p) CHECK(std::string(nf4_pager_spill_dir(p)) == dir);
    nf4_pager_destroy(p);
    rmdir(ro.c_str());
    unlink(file.c_str());
    rmdir(dir.c_str());
}

TEST_CASE(file_size_limit_fails_at_alloc_and_keeps_data) {
    // A real fault: the child process may not grow files beyond 8 MiB, so
    // posix_fallocate fails with EFBIG (SIGXFSZ ignored, as a server would).
    const std::string dir = scratch_dir();
    const pid_t pid = fork();
    if (pid == 0) {
        std::signal(SIGXFSZ, SIG_IGN);
        struct rlimit rl = {rlim_t(8 * MiB), rlim_t(8 * MiB)};
        if (setrlimit(RLIMIT_FSIZE, &rl) != 0) _exit(10);
        nf4_pager *p = nullptr;
        if (nf4_pager_create(MiB, dir.c_str(), MiB, &p) != NF4_OK) _exit(11);
        void *a = nullptr, *b = nullptr, *c = nullptr;
        if (nf4_pager_alloc(p, 5 * MiB, &a) != NF4_OK) _exit(12);
        std::mt19937_64 rng(3);
        std::vector<uint8_t> shadow;
        fill(rng, static_cast<uint8_t *>(a), shadow, 5 * MiB);
        if (nf4_pager_alloc(p, 4 * MiB, &b) != NF4_ERROR_OUT_OF_MEMORY || b != nullptr) _exit(13);
        if (nf4_pager_last_os_error() != EFBIG) _exit(14);
        if (std::strstr(nf4_last_error(), dir.c_str()) == nullptr) _exit(15);
        if (nf4_pager_evict_all(p) != NF4_OK) _exit(16);
        if (nf4_pager_prefetch(p, a, 5 * MiB) != NF4_OK) _exit(17);
        if (std::memcmp(a, shadow.data(), size_t(5 * MiB)) != 0) _exit(18);
        if (nf4_pager_alloc(p, 3 * MiB, &c) != NF4_OK) _exit(19);  // 5 + 3 still fits
        nf4_pager_stats s{};
        nf4_pager_stats_get(p, &s);
        if (s.num_allocations != 2 || s.allocated_bytes != 8 * MiB) _exit(20);
        nf4_pager_destroy(p);
        _exit(0);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    CHECK_MSG(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child status %d (exit %d)", status,
              WIFEXITED(status) ? WEXITSTATUS(status) : -1);
    rmdir(dir.c_str());
}

namespace {

// Bytes of [p, p + len) in RAM or the page cache, by mincore: the test's own
// count, independent of the pager's.
int64_t incore_bytes(const void *p, int64_t len) {
    const int64_t page = nf4_pager_os_page_size();
#ifdef __APPLE__
    std::vector<char> v(size_t((len + page - 1) / page));
#else
    std::vector<unsigned char> v(size_t((len + page - 1) / page));
#endif
    if (mincore(const_cast<void *>(p), size_t(len), v.data()) != 0) return -1;
    int64_t n = 0;
    for (auto c : v) n += c & 1;
    return n * page;
}

}  // namespace

TEST_CASE(many_small_allocations_share_pages_under_a_budget) {
    // 4,000 arrays of 4 KiB under a 1 MiB budget (issue 18). Each used to be its
    // own mapping and paging unit: written without a prefetch, the kernel's
    // read-around filled the page cache around them in large folios that an
    // eviction of 4 KiB could not drop, so 7.6 MiB stayed in RAM after evict
    // and every further evict "paged out" the same pages again, seconds each.
    // Packed into shared pages: nothing left after an evict, a second evict
    // moves nothing, resident within the budget after every prefetch, units
    // shared by many arrays, every byte intact. The resident bytes are also
    // counted by this test with mincore, independently of the pager.
    constexpr int kN = 4000;
    constexpr int64_t kBytes = 4096, kBudget = MiB;
    nf4_pager *p = nullptr;
    CHECK(nf4_pager_create(kBudget, nullptr, 0, &p) == NF4_OK);
    if (!p) return;
    std::vector<uint8_t *> blocks(kN);
    for (auto &b : blocks) {
        void *ptr = nullptr;
        CHECK(nf4_pager_alloc(p, kBytes, &ptr) == NF4_OK);
        b = static_cast<uint8_t *>(ptr);
    }
    if (std::find(blocks.begin(), blocks.end(), nullptr) != blocks.end()) return nf4_pager_destroy(p);
    auto incore_all = [&] {
        int64_t n = 0;
        for (uint8_t *b : blocks) n += incore_bytes(b, kBytes);
        return n;
    };
    auto pattern = [](int i, int64_t j, int round) { return uint8_t(i * 31 + j * 7 + round); };
    nf4_pager_stats s = stats_of(p);
    CHECK(s.allocated_bytes == kN * kBytes && s.num_allocations == kN && s.resident_bytes == 0);
    // 1. written without a prefetch (as the reproducer did), then evicted twice
    bool zeros = true;
    for (int i = 0; i < kN; ++i) {
        zeros &= std::all_of(blocks[size_t(i)], blocks[size_t(i)] + kBytes, [](uint8_t v) { return v == 0; });
        for (int64_t j = 0; j < kBytes; ++j) blocks[size_t(i)][j] = pattern(i, j, 0);
    }
    CHECK(zeros);
    CHECK(nf4_pager_evict_all(p) == NF4_OK);
    s = stats_of(p);
    const int64_t after_evict = incore_all();
    CHECK_MSG(s.resident_bytes == 0 && after_evict == 0, "after evict: stats %lld, mincore %lld",
              (long long)s.resident_bytes, (long long)after_evict);
    CHECK(nf4_pager_evict_all(p) == NF4_OK);
    nf4_pager_stats s2 = stats_of(p);
    CHECK_MSG(s2.page_outs == s.page_outs && s2.resident_bytes == 0, "a second evict: %lld more page-outs",
              (long long)(s2.page_outs - s.page_outs));
    // 2. a sweep that prefetches each array before updating it
    int64_t max_resident = 0, max_incore = 0;
    bool intact = true;
    for (int i = 0; i < kN; ++i) {
        CHECK(nf4_pager_prefetch(p, blocks[size_t(i)], kBytes) == NF4_OK);
        for (int64_t j = 0; j < kBytes; ++j) {
            intact &= blocks[size_t(i)][j] == pattern(i, j, 0);
            blocks[size_t(i)][j] = pattern(i, j, 1);
        }
        if (i % 97 == 0) {
            max_resident = std::max(max_resident, stats_of(p).resident_bytes);
            max_incore = std::max(max_incore, incore_all());
        }
    }
    CHECK(intact);
    CHECK_MSG(max_resident <= kBudget && max_incore <= kBudget, "resident %lld (mincore %lld), budget %lld",
              (long long)max_resident, (long long)max_incore, (long long)kBudget);
    s = stats_of(p);
    CHECK_MSG(s.resident_bytes == incore_all(), "stats %lld, mincore %lld", (long long)s.resident_bytes,
              (long long)incore_all());
    // arrays share paging units: far fewer page-ins than arrays
    CHECK_MSG(s.page_ins < kN / 4, "%lld page-ins for %d arrays", (long long)s.page_ins, kN);
    CHECK(nf4_pager_evict_all(p) == NF4_OK);
    s = stats_of(p);
    CHECK(s.resident_bytes == 0 && incore_all() == 0);
    CHECK(nf4_pager_evict_all(p) == NF4_OK);
    CHECK(nf4_pager_evict(p, blocks[17], kBytes) == NF4_OK);
    s2 = stats_of(p);
    CHECK(s2.page_outs == s.page_outs && s2.resident_bytes == 0);
    for (int i = 0; i < kN; ++i)
        for (int64_t j = 0; j < kBytes; ++j) intact &= blocks[size_t(i)][j] == pattern(i, j, 1);
    CHECK(intact);
    std::printf("  %d x %lld B: max resident %lld (budget %lld), page_ins %lld, page_outs %lld\n", kN,
                (long long)kBytes, (long long)max_resident, (long long)kBudget, (long long)s2.page_ins,
                (long long)s2.page_outs);
    for (uint8_t *b : blocks) CHECK(nf4_pager_free(p, b) == NF4_OK);
    s = stats_of(p);
    CHECK(s.allocated_bytes == 0 && s.num_allocations == 0 && s.resident_bytes == 0);
    nf4_pager_destroy(p);
}

TEST_CASE(small_blocks_are_zero_when_reused_and_checked_like_allocations) {
    nf4_pager *p = nullptr;
    CHECK(nf4_pager_create(-1, nullptr, 0, &p) == NF4_OK);
    if (!p) return;
    const int64_t page = nf4_pager_os_page_size();
    void *a = nullptr, *b = nullptr, *c = nullptr, *big = nullptr;
    CHECK(nf4_pager_alloc(p, 3 * page, &a) == NF4_OK);
    CHECK(nf4_pager_alloc(p, 100, &b) == NF4_OK);  // rounded up to one OS page, aligned to it
    CHECK(nf4_pager_alloc(p, 8 * MiB, &big) == NF4_OK);
    if (!a || !b || !big) return nf4_pager_destroy(p);
    CHECK(reinterpret_cast<uintptr_t>(b) % uintptr_t(page) == 0);
    auto *ab = static_cast<uint8_t *>(a), *bb = static_cast<uint8_t *>(b);
    std::memset(a, 0xAB, size_t(3 * page));
    std::memset(b, 0xCD, size_t(page));
    std::memset(big, 0xEF, size_t(8 * MiB));
    // ranges are checked against the block, not the slab it lives in
    CHECK(nf4_pager_prefetch(p, ab + page, 2 * page) == NF4_OK);
    CHECK(nf4_pager_prefetch(p, ab + page, 2 * page + 1) == NF4_ERROR_INVALID_ARGUMENT);
    CHECK(std::strstr(nf4_last_error(), "past the end") != nullptr);
    CHECK(nf4_pager_evict(p, bb + 10, page) == NF4_ERROR_INVALID_ARGUMENT);
    CHECK(nf4_pager_free(p, ab + page) == NF4_ERROR_INVALID_ARGUMENT);  // inside a block, not its start
    CHECK(nf4_pager_free(p, a) == NF4_OK);
    CHECK(nf4_pager_free(p, a) == NF4_ERROR_INVALID_ARGUMENT);  // twice
    CHECK(nf4_pager_prefetch(p, a, 1) == NF4_ERROR_INVALID_ARGUMENT);  // freed: in a slab, in no block
    CHECK(std::strstr(nf4_last_error(), "not lie in memory allocated by this pager") != nullptr);
    // its pages are handed out again, as zeros
    CHECK(nf4_pager_alloc(p, 2 * page, &c) == NF4_OK);
    auto *cb = static_cast<uint8_t *>(c);
    CHECK(c == a);  // best fit: a's place
    CHECK(std::all_of(cb, cb + 2 * page, [](uint8_t v) { return v == 0; }));
    CHECK(std::all_of(bb, bb + page, [](uint8_t v) { return v == 0xCD; }));  // the neighbour untouched
    CHECK(nf4_pager_evict_all(p) == NF4_OK);  // the freed third page is dropped, not written back
    nf4_pager_stats s = stats_of(p);
    CHECK(s.num_allocations == 3 && s.allocated_bytes == 3 * page + 8 * MiB && s.resident_bytes == 0);
    CHECK(std::all_of(bb, bb + page, [](uint8_t v) { return v == 0xCD; }));
    CHECK(std::all_of(cb, cb + 2 * page, [](uint8_t v) { return v == 0; }));
    void *d = nullptr;
    CHECK(nf4_pager_alloc(p, page, &d) == NF4_OK);  // the third page of a's old place, zero too
    CHECK(d == static_cast<uint8_t *>(a) + 2 * page);
    auto *db = static_cast<uint8_t *>(d);
    CHECK(std::all_of(db, db + page, [](uint8_t v) { return v == 0; }));
    CHECK(nf4_pager_free(p, b) == NF4_OK);
    CHECK(nf4_pager_free(p, c) == NF4_OK);
    CHECK(nf4_pager_free(p, d) == NF4_OK);  // the slab's last block: the slab goes back
    s = stats_of(p);
    CHECK(s.num_allocations == 1 && s.allocated_bytes == 8 * MiB);
    CHECK(nf4_pager_prefetch(p, b, 1) == NF4_ERROR_INVALID_ARGUMENT);
    const auto *bigb = static_cast<uint8_t *>(big);
    CHECK(std::all_of(bigb, bigb + 8 * MiB, [](uint8_t v) { return v == 0xEF; }));
    nf4_pager_destroy(p);
}

TEST_CASE(large_allocations_evict_idempotently_after_touches_without_prefetch) {
    // Arrays written without a prefetch, in the default 2 MiB pages and in
    // 1 MiB ones: whatever the kernel read around them must go with an evict,
    // and a second evict must find nothing (before, folios straddling two
    // allocations stayed in RAM and were "paged out" on every call).
    struct Case {
        int64_t page_bytes, len;
        int n;
    };
    for (const Case c : {Case{0, MiB + 4096, 32}, Case{MiB, 3 * MiB, 16}, Case{0, 5 * MiB + 12345, 6}}) {
        const int64_t page_bytes = c.page_bytes;
        nf4_pager *p = nullptr;
        CHECK(nf4_pager_create(-1, nullptr, page_bytes, &p) == NF4_OK);
        if (!p) return;
        for (int i = 0; i < c.n; ++i) {
            void *ptr = nullptr;
            CHECK(nf4_pager_alloc(p, c.len, &ptr) == NF4_OK);
            if (ptr) std::memset(ptr, i + 1, size_t(c.len));
        }
        CHECK(nf4_pager_evict_all(p) == NF4_OK);
        const nf4_pager_stats s = stats_of(p);
        CHECK(nf4_pager_evict_all(p) == NF4_OK);
        const nf4_pager_stats s2 = stats_of(p);
        CHECK_MSG(s.resident_bytes == 0 && s2.page_outs == s.page_outs, "page_bytes %lld: resident %lld, %lld more "
                  "page-outs", (long long)page_bytes, (long long)s.resident_bytes,
                  (long long)(s2.page_outs - s.page_outs));
        nf4_pager_destroy(p);
    }
}

int main() { return check::run_all(); }
