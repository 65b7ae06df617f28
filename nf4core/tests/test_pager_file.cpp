// File-backed pages of the host pager (nf4_pager_map_file): ranges of an
// existing file mapped read-only and paged from the file itself. Checked
// against the file as pread() sees it (the oracle), the kernel's own view of
// residency (mincore, the test's own call), the disk the spill files take
// (st_blocks, through nf4_pager_file_stats and /proc/self/fd), and real
// faults: a file truncated, touched or replaced while mapped, in this process
// and in children (SIGBUS must be an error from the pager, and a signal
// that is not the pager's must still reach whoever handled it before).
#include <algorithm>
#include <cerrno>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.hpp"
#include "nf4core/nf4core.h"
#include "pager_sigbus.hpp"

namespace {

constexpr int64_t KiB = 1024, MiB = 1024 * 1024;

std::string scratch_dir() {
    const char *t = std::getenv("TMPDIR");
    std::string base = (t && t[0]) ? t : "/var/tmp";
    std::string tmpl = base + "/nf4pager-file-test-XXXXXX";
    std::vector<char> buf(tmpl.begin(), tmpl.end());
    buf.push_back('\0');
    if (!mkdtemp(buf.data())) return base;
    return buf.data();
}

// A file of n random bytes; its contents are returned (the oracle is pread, below).
std::string write_file(const std::string &dir, const char *name, int64_t n, uint64_t seed) {
    const std::string path = dir + "/" + name;
    std::vector<uint8_t> data(static_cast<size_t>(n));
    std::mt19937_64 rng(seed);
    for (auto &b : data) b = uint8_t(rng());
    FILE *f = std::fopen(path.c_str(), "wb");
    CHECK(f != nullptr);
    if (f) {
        CHECK(std::fwrite(data.data(), 1, data.size(), f) == data.size());
        CHECK(std::fflush(f) == 0 && fsync(fileno(f)) == 0);  // clean pages: the tests can drop them
        std::fclose(f);
    }
    return path;
}

std::vector<uint8_t> pread_range(const std::string &path, int64_t off, int64_t n) {
    std::vector<uint8_t> out(static_cast<size_t>(n));
    int fd = open(path.c_str(), O_RDONLY);
    CHECK(fd >= 0);
    CHECK(pread(fd, out.data(), size_t(n), off_t(off)) == ssize_t(n));
    close(fd);
    return out;
}

int64_t incore_bytes(const void *p, int64_t len) {
    const int64_t page = nf4_pager_os_page_size();
    const auto a = reinterpret_cast<uintptr_t>(p) / uintptr_t(page) * uintptr_t(page);
    const int64_t span = int64_t(reinterpret_cast<uintptr_t>(p) + uintptr_t(len) - a);
#ifdef __APPLE__
    std::vector<char> v(size_t((span + page - 1) / page));
#else
    std::vector<unsigned char> v(size_t((span + page - 1) / page));
#endif
    if (mincore(reinterpret_cast<void *>(a), size_t(span), v.data()) != 0) return -1;
    int64_t n = 0;
    for (auto c : v) n += c & 1;
    return n * page;
}

nf4_pager_stats stats_of(nf4_pager *p) {
    nf4_pager_stats s{};
    CHECK(nf4_pager_stats_get(p, &s) == NF4_OK);
    return s;
}

nf4_pager_file_stats file_stats_of(nf4_pager *p) {
    nf4_pager_file_stats s{};
    CHECK(nf4_pager_file_stats_get(p, &s) == NF4_OK);
    return s;
}

void drop_file_cache(const std::string &path) {
    int fd = open(path.c_str(), O_RDONLY);
    if (fd >= 0) {
        posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
        close(fd);
    }
}

}  // namespace

TEST_CASE(mapped_ranges_read_the_file_under_a_budget) {
    const std::string dir = scratch_dir();
    const int64_t size = 12 * MiB + 777;
    const std::string path = write_file(dir, "ckpt.bin", size, 1);
    drop_file_cache(path);
    // odd offsets and lengths, as tensors lie in a safetensors file; neighbours share OS pages
    const int64_t ranges[][2] = {{123, 3 * MiB + 5}, {3 * MiB + 128, 4 * MiB}, {7 * MiB + 128, 5 * MiB + 649},
                                 {8, 100}, {size - 1, 1}};
    const int64_t budget = 2 * MiB;
    nf4_pager *p = nullptr;
    CHECK(nf4_pager_create(budget, dir.c_str(), 256 * KiB, &p) == NF4_OK);
    if (!p) return;
    std::vector<const uint8_t *> maps;
    for (const auto &r : ranges) {
        const void *m = nullptr;
        CHECK(nf4_pager_map_file(p, path.c_str(), r[0], r[1], &m) == NF4_OK);
        CHECK(m != nullptr && reinterpret_cast<uintptr_t>(m) % uintptr_t(nf4_pager_os_page_size()) ==
                                  uintptr_t(r[0] % nf4_pager_os_page_size()));
        maps.push_back(static_cast<const uint8_t *>(m));
    }
    const nf4_pager_file_stats fs = file_stats_of(p);
    CHECK(fs.num_files == 1 && fs.num_mappings == 5);  // one descriptor for the file
    CHECK(stats_of(p).num_allocations == 5);
    std::mt19937_64 rng(2);
    for (int round = 0; round < 30; ++round) {
        const size_t i = size_t(rng() % maps.size());
        const int64_t off = ranges[i][0], n = ranges[i][1];
        // a sub-range of the mapping, or all of it
        const int64_t a = round % 3 == 0 ? 0 : int64_t(rng() % uint64_t(n));
        const int64_t len = round % 3 == 0 ? n : 1 + int64_t(rng() % uint64_t(std::min<int64_t>(n - a, MiB)));
        CHECK(nf4_pager_prefetch(p, maps[i] + a, len) == NF4_OK);
        CHECK(incore_bytes(maps[i] + a, len) >= len);  // the range is in RAM (the page cache)
        const std::vector<uint8_t> want = pread_range(path, off + a, len);
        CHECK(std::memcmp(maps[i] + a, want.data(), size_t(len)) == 0);
        const nf4_pager_stats s = stats_of(p);  // resident measured by mincore, over all mappings
        // + an OS page per neighbour: mappings of neighbouring ranges share the OS page between them
        CHECK_MSG(s.resident_bytes <= std::max(budget, len + 2 * 256 * KiB) + 10 * nf4_pager_os_page_size(),
                  "round %d: resident %lld over budget %lld (range %lld)", round, (long long)s.resident_bytes,
                  (long long)budget, (long long)len);
    }
    const nf4_pager_stats s = stats_of(p);
    CHECK(s.page_ins > 0 && s.page_outs > 0);
    // nothing of the mapped bytes goes to a spill file
    CHECK(file_stats_of(p).spill_bytes == 0);
    CHECK(nf4_pager_evict_all(p) == NF4_OK);
    CHECK(file_stats_of(p).resident_bytes == 0 && stats_of(p).resident_bytes == 0);
    for (size_t i = 0; i < maps.size(); ++i) {  // still readable: faulted back in from the file
        const std::vector<uint8_t> want = pread_range(path, ranges[i][0], ranges[i][1]);
        CHECK(std::memcmp(maps[i], want.data(), size_t(ranges[i][1])) == 0);
    }
    for (const uint8_t *m : maps) CHECK(nf4_pager_free(p, const_cast<uint8_t *>(m)) == NF4_OK);
    const nf4_pager_file_stats after = file_stats_of(p);
    CHECK(after.num_files == 0 && after.num_mappings == 0 && after.mapped_bytes == 0);
    CHECK(stats_of(p).num_allocations == 0 && stats_of(p).allocated_bytes == 0);
    nf4_pager_destroy(p);
    unlink(path.c_str());
    rmdir(dir.c_str());
}

TEST_CASE(mapped_and_allocated_pages_share_one_budget) {
    const std::string dir = scratch_dir();
    const std::string path = write_file(dir, "w.bin", 4 * MiB, 3);
    drop_file_cache(path);
    nf4_pager *p = nullptr;
    CHECK(nf4_pager_create(3 * MiB, dir.c_str(), MiB, &p) == NF4_OK);
    if (!p) return;
    const void *m = nullptr;
    void *a = nullptr;
    CHECK(nf4_pager_map_file(p, path.c_str(), 0, 4 * MiB, &m) == NF4_OK);
    CHECK(nf4_pager_alloc(p, 2 * MiB, &a) == NF4_OK);
    std::memset(a, 7, size_t(2 * MiB));
    CHECK(nf4_pager_prefetch(p, a, 2 * MiB) == NF4_OK);
    CHECK(nf4_pager_prefetch(p, m, 2 * MiB) == NF4_OK);  // 4 MiB resident: the allocation's first page goes
    CHECK(incore_bytes(a, 2 * MiB) <= MiB);
    CHECK(nf4_pager_prefetch(p, a, 2 * MiB) == NF4_OK);  // the mapping's older page goes (dropped, not written)
    CHECK(incore_bytes(m, 2 * MiB) <= MiB);
    CHECK(static_cast<uint8_t *>(a)[2 * MiB - 1] == 7);
    const nf4_pager_file_stats fs = file_stats_of(p);
    CHECK(fs.spill_bytes >= 2 * MiB && fs.spill_bytes < 3 * MiB);  // the allocation's reserved disk only
    CHECK(fs.mapped_bytes == 4 * MiB);
    CHECK(stats_of(p).allocated_bytes == 6 * MiB);
    // the file itself never changes
    const std::vector<uint8_t> want = pread_range(path, 0, 4 * MiB);
    CHECK(std::memcmp(m, want.data(), size_t(4 * MiB)) == 0);
    nf4_pager_destroy(p);  // unmaps and closes everything, mappings included
    unlink(path.c_str());
    rmdir(dir.c_str());
}

TEST_CASE(a_file_in_the_page_cache_counts_and_goes_first) {
    // A checkpoint written moments ago: its pages are in RAM, dirty, in the
    // writer's large folios. A pager with a budget drops them when it maps the
    // file (written back first), and reads them back itself; one without a
    // budget counts them as resident from the start, and its eviction frees them.
    const std::string dir = scratch_dir();
    const std::string path = dir + "/hot.bin";
    std::vector<uint8_t> data(static_cast<size_t>(6 * MiB));
    std::mt19937_64 rng(11);
    for (auto &b : data) b = uint8_t(rng());
    int fd = open(path.c_str(), O_CREAT | O_WRONLY | O_TRUNC, 0644);
    CHECK(fd >= 0 && write(fd, data.data(), data.size()) == ssize_t(data.size()));
    close(fd);
    nf4_pager *p = nullptr;
    CHECK(nf4_pager_create(-1, dir.c_str(), MiB, &p) == NF4_OK);  // no budget: the cached pages stay
    if (!p) return;
    const void *m = nullptr, *small = nullptr;
    CHECK(nf4_pager_map_file(p, path.c_str(), 0, 6 * MiB, &m) == NF4_OK);
    CHECK(incore_bytes(m, 6 * MiB) == 6 * MiB && stats_of(p).resident_bytes == 6 * MiB);
    CHECK(nf4_pager_evict_all(p) == NF4_OK);  // written back, dropped (whole folios)
    CHECK(file_stats_of(p).resident_bytes == 0);
    CHECK(nf4_pager_prefetch(p, m, 6 * MiB) == NF4_OK && incore_bytes(m, 6 * MiB) == 6 * MiB);
    nf4_pager_destroy(p);
    fd = open(path.c_str(), O_WRONLY | O_TRUNC);  // hot and dirty again
    CHECK(fd >= 0 && write(fd, data.data(), data.size()) == ssize_t(data.size()));
    close(fd);
    CHECK(nf4_pager_create(2 * MiB, dir.c_str(), MiB, &p) == NF4_OK);  // a budget: dropped when mapped
    if (!p) return;
    CHECK(nf4_pager_map_file(p, path.c_str(), 0, 6 * MiB, &m) == NF4_OK);
    CHECK(nf4_pager_map_file(p, path.c_str(), 5, 1000, &small) == NF4_OK);
    CHECK_MSG(incore_bytes(m, 6 * MiB) == 0, "cached %lld", (long long)incore_bytes(m, 6 * MiB));
    CHECK(nf4_pager_prefetch(p, small, 1000) == NF4_OK);
    CHECK(nf4_pager_prefetch(p, m, 2 * MiB) == NF4_OK);
    CHECK(nf4_pager_prefetch(p, static_cast<const uint8_t *>(m) + 4 * MiB, 2 * MiB) == NF4_OK);
    CHECK_MSG(stats_of(p).resident_bytes <= 2 * MiB + 8192, "resident %lld", (long long)stats_of(p).resident_bytes);
    CHECK(incore_bytes(m, 4 * MiB) <= 4096);  // evicted, the small range's page aside
    CHECK(std::memcmp(m, data.data(), data.size()) == 0);
    CHECK(nf4_pager_evict_all(p) == NF4_OK);
    CHECK(file_stats_of(p).resident_bytes == 0);
    nf4_pager_destroy(p);
    unlink(path.c_str());
    rmdir(dir.c_str());
}

TEST_CASE(bad_file_ranges_and_paths_are_rejected) {
    const std::string dir = scratch_dir();
    const int64_t size = 10000;
    const std::string path = write_file(dir, "small.bin", size, 4);
    nf4_pager *p = nullptr;
    CHECK(nf4_pager_create(-1, dir.c_str(), 0, &p) == NF4_OK);
    if (!p) return;
    const void *m = &p;
    CHECK(nf4_pager_map_file(p, path.c_str(), 0, size + 1, &m) == NF4_ERROR_INVALID_ARGUMENT && m == nullptr);
    CHECK(std::strstr(nf4_last_error(), "beyond the end") != nullptr &&
          std::strstr(nf4_last_error(), path.c_str()) != nullptr);
    CHECK(nf4_pager_map_file(p, path.c_str(), size, 1, &m) == NF4_ERROR_INVALID_ARGUMENT);
    CHECK(nf4_pager_map_file(p, path.c_str(), INT64_MAX, 1, &m) == NF4_ERROR_INVALID_ARGUMENT);
    CHECK(nf4_pager_map_file(p, path.c_str(), 1, INT64_MAX, &m) == NF4_ERROR_INVALID_ARGUMENT);
    CHECK(nf4_pager_map_file(p, path.c_str(), -1, 10, &m) == NF4_ERROR_INVALID_ARGUMENT);
    CHECK(nf4_pager_map_file(p, path.c_str(), 0, 0, &m) == NF4_ERROR_INVALID_ARGUMENT);
    CHECK(nf4_pager_map_file(p, nullptr, 0, 1, &m) == NF4_ERROR_INVALID_ARGUMENT);
    CHECK(nf4_pager_map_file(p, "", 0, 1, &m) == NF4_ERROR_INVALID_ARGUMENT);
    CHECK(nf4_pager_map_file(p, path.c_str(), 0, 1, nullptr) == NF4_ERROR_INVALID_ARGUMENT);
    CHECK(nf4_pager_map_file(p, (dir + "/missing").c_str(), 0, 1, &m) == NF4_ERROR_INVALID_ARGUMENT);
    CHECK(nf4_pager_last_os_error() == ENOENT && std::strstr(nf4_last_error(), "missing") != nullptr);
    CHECK(nf4_pager_map_file(p, dir.c_str(), 0, 1, &m) == NF4_ERROR_INVALID_ARGUMENT);  // a directory
    CHECK(std::strstr(nf4_last_error(), "regular file") != nullptr);
    CHECK(nf4_pager_map_file(nullptr, path.c_str(), 0, 1, &m) == NF4_ERROR_INVALID_ARGUMENT);
    CHECK(nf4_pager_file_stats_get(p, nullptr) == NF4_ERROR_INVALID_ARGUMENT);
    CHECK(nf4_pager_file_stats_get(nullptr, nullptr) == NF4_ERROR_INVALID_ARGUMENT);
    CHECK(file_stats_of(p).num_files == 0);  // failures left no descriptor behind
    // a whole file, the last byte, and ranges inside a mapping only
    CHECK(nf4_pager_map_file(p, path.c_str(), 0, size, &m) == NF4_OK);
    const uint8_t *b = static_cast<const uint8_t *>(m);
    CHECK(nf4_pager_prefetch(p, b + size - 1, 1) == NF4_OK);
    CHECK(nf4_pager_prefetch(p, b + 100, 2 * MiB) == NF4_ERROR_INVALID_ARGUMENT);
    CHECK(nf4_pager_free(p, const_cast<uint8_t *>(b) + 1) == NF4_ERROR_INVALID_ARGUMENT);  // not its pointer
    CHECK(nf4_pager_free(p, const_cast<uint8_t *>(b)) == NF4_OK);
    CHECK(nf4_pager_free(p, const_cast<uint8_t *>(b)) == NF4_ERROR_INVALID_ARGUMENT);  // twice
    nf4_pager_destroy(p);
    // the CUDA backend cannot map files (in a build without CUDA it cannot be created at all)
    if (nf4_pager_create_cuda(-1, 0, 0, 0, &p) == NF4_OK) {
        CHECK(nf4_pager_map_file(p, path.c_str(), 0, 1, &m) == NF4_ERROR_INVALID_ARGUMENT);
        nf4_pager_destroy(p);
    }
    unlink(path.c_str());
    rmdir(dir.c_str());
}

namespace {

// Maps `path` whole, then lets `change` alter the file, then checks that a
// prefetch fails with ESTALE naming the file, without touching it, and that
// evict and free still work.
template <class Change>
void check_change_is_detected(const char *what, Change change) {
    const std::string dir = scratch_dir();
    const std::string path = write_file(dir, "ckpt.safetensors", 3 * MiB + 10, 5);
    nf4_pager *p = nullptr;
    CHECK(nf4_pager_create(MiB, dir.c_str(), 256 * KiB, &p) == NF4_OK);
    if (!p) return;
    const void *m = nullptr, *m2 = nullptr;
    CHECK(nf4_pager_map_file(p, path.c_str(), 10, 3 * MiB, &m) == NF4_OK);
    CHECK(nf4_pager_prefetch(p, m, 3 * MiB) == NF4_OK);
    CHECK(nf4_pager_evict_all(p) == NF4_OK);
    change(path);
    CHECK_MSG(nf4_pager_prefetch(p, m, 3 * MiB) == NF4_ERROR_INVALID_ARGUMENT, "%s: prefetch did not fail", what);
    CHECK_MSG(nf4_pager_last_os_error() == ESTALE, "%s: errno %d", what, nf4_pager_last_os_error());
    CHECK_MSG(std::strstr(nf4_last_error(), path.c_str()) != nullptr &&
                  std::strstr(nf4_last_error(), "changed on disk") != nullptr,
              "%s: message '%s'", what, nf4_last_error());
    CHECK(nf4_pager_map_file(p, path.c_str(), 0, 1, &m2) != NF4_OK || what[0] == 'r');  // replaced: a new file
    if (m2 != nullptr) CHECK(nf4_pager_free(p, const_cast<void *>(m2)) == NF4_OK);
    CHECK(nf4_pager_evict(p, m, 3 * MiB) == NF4_OK);
    nf4_pager_stats s{};
    CHECK(nf4_pager_stats_get(p, &s) == NF4_OK);
    CHECK(nf4_pager_free(p, const_cast<void *>(m)) == NF4_OK);
    nf4_pager_destroy(p);
    unlink(path.c_str());
    rmdir(dir.c_str());
}

}  // namespace

TEST_CASE(a_truncated_file_is_an_error_not_a_sigbus) {
    check_change_is_detected("truncated", [](const std::string &path) { CHECK(truncate(path.c_str(), MiB) == 0); });
}

TEST_CASE(a_touched_file_is_an_error) {
    check_change_is_detected("mtime", [](const std::string &path) {
        struct timespec t[2] = {{0, UTIME_OMIT}, {1000000000, 0}};
        CHECK(utimensat(AT_FDCWD, path.c_str(), t, 0) == 0);
    });
}

TEST_CASE(a_file_rewritten_in_place_is_an_error) {
    check_change_is_detected("written", [](const std::string &path) {
        usleep(20000);  // let the clock move past the file's mtime (coarse on some file systems)
        int fd = open(path.c_str(), O_WRONLY);
        CHECK(fd >= 0 && pwrite(fd, "x", 1, 100) == 1);
        close(fd);
    });
}

TEST_CASE(a_replaced_path_is_an_error) {
    check_change_is_detected("replaced", [](const std::string &path) {
        const std::string other = write_file(path.substr(0, path.rfind('/')), "new.bin", 3 * MiB + 10, 6);
        CHECK(rename(other.c_str(), path.c_str()) == 0);
    });
}

TEST_CASE(the_sigbus_guard_turns_a_fault_into_false) {
    const std::string dir = scratch_dir();
    const std::string path = write_file(dir, "t.bin", 64 * KiB, 7);
    const int64_t page = nf4_pager_os_page_size();
    int fd = open(path.c_str(), O_RDONLY);
    CHECK(fd >= 0);
    void *m = mmap(nullptr, size_t(64 * KiB), PROT_READ, MAP_SHARED, fd, 0);
    CHECK(m != MAP_FAILED);
    const char *c = static_cast<const char *>(m);
    CHECK(nf4core::read_pages_guarded(c, 64 * KiB, page));
    CHECK(truncate(path.c_str(), 16 * KiB) == 0);
    drop_file_cache(path);
    // pages past the new end fault: the guard jumps back, here and on another thread
    CHECK(!nf4core::read_pages_guarded(c, 64 * KiB, page));
    CHECK(nf4core::read_pages_guarded(c, 16 * KiB, page));
    bool other = true;
    std::thread t([&] { other = nf4core::read_pages_guarded(c + 32 * KiB, page, page); });
    t.join();
    CHECK(!other);
    CHECK(!nf4core::read_pages_guarded(c, 64 * KiB, page));  // again: the signal is not left blocked

    munmap(m, size_t(64 * KiB));
    close(fd);
    unlink(path.c_str());
    rmdir(dir.c_str());
}

namespace {
void previous_handler(int) { _exit(42); }

// Runs `body` in a child; returns its wait status.
template <class F>
int in_child(F body) {
    const pid_t pid = fork();
    if (pid == 0) {
        body();
        _exit(0);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    return status;
}
}  // namespace

TEST_CASE(a_sigbus_outside_the_guard_keeps_its_old_meaning) {
    // In children: the guard's handler is installed on first use and chains to
    // what was there before (a handler, or the default action: death by SIGBUS).
    const std::string dir = scratch_dir();
    const std::string path = write_file(dir, "u.bin", 64 * KiB, 8);
    const int64_t page = nf4_pager_os_page_size();
    auto fault_after_guard = [&] {
        int fd = open(path.c_str(), O_RDONLY);
        void *m = mmap(nullptr, size_t(64 * KiB), PROT_READ, MAP_SHARED, fd, 0);
        if (m == MAP_FAILED) _exit(10);
        const volatile char *c = static_cast<const volatile char *>(m);
        if (!nf4core::read_pages_guarded(const_cast<const char *>(c), 16 * KiB, page)) _exit(11);
        if (ftruncate(open(path.c_str(), O_RDWR), 16 * KiB) != 0) _exit(12);
        if (nf4core::read_pages_guarded(const_cast<const char *>(c), 64 * KiB, page)) _exit(13);
        (void)c[48 * KiB];  // not guarded
        _exit(14);
    };
    // only a child may truncate: each gets its own copy of the file
    auto fresh = [&] { write_file(dir, "u.bin", 64 * KiB, 8); };
    fresh();
    int status = in_child([&] {
        struct sigaction sa = {};
        sa.sa_handler = previous_handler;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGBUS, &sa, nullptr);
        fault_after_guard();
    });
    CHECK_MSG(WIFEXITED(status) && WEXITSTATUS(status) == 42, "with a previous handler: status %d", status);
    fresh();
    status = in_child([&] {
        struct sigaction sa = {};
        sa.sa_handler = SIG_DFL;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGBUS, &sa, nullptr);
        fault_after_guard();
    });
    CHECK_MSG(WIFSIGNALED(status) && WTERMSIG(status) == SIGBUS, "with the default action: status %d", status);
    unlink(path.c_str());
    rmdir(dir.c_str());
}

TEST_CASE(mapped_memory_is_read_only) {
    const std::string dir = scratch_dir();
    const std::string path = write_file(dir, "ro.bin", 8 * KiB, 9);
    const int status = in_child([&] {
        nf4_pager *p = nullptr;
        const void *m = nullptr;
        if (nf4_pager_create(-1, dir.c_str(), 0, &p) != NF4_OK) _exit(10);
        if (nf4_pager_map_file(p, path.c_str(), 0, 8 * KiB, &m) != NF4_OK) _exit(11);
        std::signal(SIGSEGV, SIG_DFL);
        *static_cast<volatile char *>(const_cast<void *>(m)) = 1;
        _exit(12);
    });
    CHECK_MSG(WIFSIGNALED(status) && WTERMSIG(status) == SIGSEGV, "status %d", status);
    const std::vector<uint8_t> after = pread_range(path, 0, 1);
    std::mt19937_64 rng(9);
    CHECK(after[0] == uint8_t(rng()));  // the file is untouched
    unlink(path.c_str());
    rmdir(dir.c_str());
}

TEST_CASE(threads_prefetch_mapped_ranges) {
    const std::string dir = scratch_dir();
    const std::string path = write_file(dir, "th.bin", 8 * MiB, 10);
    nf4_pager *p = nullptr;
    CHECK(nf4_pager_create(2 * MiB, dir.c_str(), 256 * KiB, &p) == NF4_OK);
    if (!p) return;
    std::vector<const uint8_t *> maps(8);
    for (int i = 0; i < 8; ++i) {
        const void *m = nullptr;
        CHECK(nf4_pager_map_file(p, path.c_str(), i * MiB, MiB, &m) == NF4_OK);
        maps[size_t(i)] = static_cast<const uint8_t *>(m);
    }
    const std::vector<uint8_t> want = pread_range(path, 0, 8 * MiB);
    std::vector<int> bad(4, 0);
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t)
        threads.emplace_back([&, t] {
            for (int k = 0; k < 40; ++k) {
                const int i = (t * 3 + k) % 8;
                if (nf4_pager_prefetch(p, maps[size_t(i)], MiB) != NF4_OK) ++bad[size_t(t)];
                if (std::memcmp(maps[size_t(i)], want.data() + i * MiB, size_t(MiB)) != 0) ++bad[size_t(t)];
                if (k % 7 == 0 && nf4_pager_evict(p, maps[size_t(i)], MiB) != NF4_OK) ++bad[size_t(t)];
            }
        });
    for (auto &t : threads) t.join();
    for (int b : bad) CHECK(b == 0);
    nf4_pager_destroy(p);
    unlink(path.c_str());
    rmdir(dir.c_str());
}

int main() { return check::run_all(); }
