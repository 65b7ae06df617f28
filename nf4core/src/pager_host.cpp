// Host backend of the pager: RAM is the fast tier, an unlinked spill file the
// slow one. Every allocation is a region of that file mapped MAP_SHARED, so
// the kernel moves the bytes (faults pages in, writes them back) and callers
// see plain memory; this file decides *when*: an LRU over fixed-size pages (the
// PageLru of pager_lru.hpp, shown where the pages are by mincore), eviction
// with msync + madvise/posix_fadvise(DONTNEED) so that RAM really goes back to
// the OS, and disk reserved up front (posix_fallocate) so a full disk is an
// error at allocation time instead of a SIGBUS on first touch.
#include "pager.hpp"
#include "pager_lru.hpp"

#if defined(__linux__) || defined(__APPLE__)
#define NF4_PAGER_POSIX 1
#endif

#ifdef NF4_PAGER_POSIX

#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1  // O_TMPFILE, fallocate
#endif

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <list>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

#ifdef __linux__
#include <linux/falloc.h>
#include <sys/vfs.h>
#else
#include <sys/mount.h>
#include <sys/param.h>
#endif

namespace nf4core {

namespace {

constexpr const char *kFilePrefix = "nf4pager-";

bool dir_is_tmpfs(int fd) {
#ifdef __linux__
    struct statfs s;
    if (fstatfs(fd, &s) != 0) return false;
    // tmpfs and ramfs keep file pages in RAM: there is nothing to evict to.
    return s.f_type == 0x01021994 /* TMPFS_MAGIC */ || s.f_type == 0x858458f6 /* RAMFS_MAGIC */;
#else
    struct statfs s;
    if (fstatfs(fd, &s) != 0) return false;
    return std::strcmp(s.f_fstypename, "tmpfs") == 0;
#endif
}

// An unnamed file in `dir` (O_TMPFILE), or a named one unlinked at once:
// either way nothing is left behind when the process dies.
int create_spill_file(const std::string &dir) {
    struct stat st;
    if (::stat(dir.c_str(), &st) != 0)
        fail_os(NF4_ERROR_INVALID_ARGUMENT, errno, "spill directory '" + dir + "' is not usable");
    if (!S_ISDIR(st.st_mode))
        fail_os(NF4_ERROR_INVALID_ARGUMENT, ENOTDIR, "spill directory '" + dir + "' is not usable");
    int fd = -1;
#if defined(O_TMPFILE)
    fd = ::open(dir.c_str(), O_TMPFILE | O_RDWR | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0 && errno != EOPNOTSUPP && errno != EISDIR && errno != EINVAL && errno != ENOENT)
        fail_os(NF4_ERROR_INVALID_ARGUMENT, errno, "cannot create the spill file in '" + dir + "'");
#endif
    if (fd < 0) {
        std::string name = dir + "/" + kFilePrefix + "XXXXXX";
        std::vector<char> buf(name.begin(), name.end());
        buf.push_back('\0');
        fd = ::mkstemp(buf.data());
        if (fd < 0) fail_os(NF4_ERROR_INVALID_ARGUMENT, errno, "cannot create the spill file in '" + dir + "'");
        ::unlink(buf.data());
        ::fcntl(fd, F_SETFD, FD_CLOEXEC);
    }
    return fd;
}

// Reserves [off, off + len) of the file on disk (and extends the file).
// Returns 0 or an errno value (EFBIG for a file-size limit, ENOSPC for a full disk).
int reserve(int fd, int64_t off, int64_t len) {
#ifdef __APPLE__
    fstore_t store = {F_ALLOCATEALL, F_PEOFPOSMODE, 0, off_t(off + len), 0};
    struct stat st;
    if (::fstat(fd, &st) != 0) return errno;
    if (off + len > st.st_size) {
        store.fst_length = off_t(off + len - st.st_size);
        if (::fcntl(fd, F_PREALLOCATE, &store) == -1) return errno;
        if (::ftruncate(fd, off_t(off + len)) != 0) return errno;
    }
    return 0;
#else
    return ::posix_fallocate(fd, off_t(off), off_t(len));  // returns the error, does not set errno
#endif
}

// Where an allocation lies in the spill file.
struct Region {
    int64_t mapped = 0;    // bytes mapped, a multiple of the OS page size
    int64_t file_off = 0;  // where the region starts in the spill file
};

// The pages, their LRU and the counters are a PageLru; this class moves the
// bytes (the kernel does, on faults and write-back: madvise, msync) and shows
// the LRU where they are (mincore), and manages the spill file.
class HostPager final : public PagerBackend {
public:
    HostPager(int64_t budget, const char *spill_dir, int64_t page_bytes)
        : os_page_(os_page_size()),
          lru_(budget, page_bytes, [this](char *p, int64_t len, bool in) { move(p, len, in); },
               [this](char *p, int64_t len) { return resident_pages(p, len) * os_page_; }) {
        if (spill_dir != nullptr && spill_dir[0] != '\0') {
            dir_ = spill_dir;
            fd_ = create_spill_file(dir_);
            tmpfs_ = dir_is_tmpfs(fd_);
        } else {
            open_default_dir();
        }
    }

    ~HostPager() override {
        for (auto &kv : regions_) ::munmap(reinterpret_cast<void *>(kv.first), size_t(kv.second.mapped));
        if (fd_ >= 0) ::close(fd_);
    }

    nf4_pager_backend kind() const override { return NF4_PAGER_HOST; }
    const std::string &spill_dir() const override { return dir_; }
    bool spill_is_tmpfs() const override { return tmpfs_; }

    void *alloc(int64_t nbytes) override {
        require(nbytes <= INT64_MAX - os_page_, "nbytes too large: " + std::to_string(nbytes));
        const int64_t len = (nbytes + os_page_ - 1) / os_page_ * os_page_;
        std::lock_guard<std::mutex> lock(mu_);
        const int64_t off = take_region(len);
        if (int err = reserve(fd_, off, len)) {
            give_back_region(off, len);
            fail_os(NF4_ERROR_OUT_OF_MEMORY, err,
                    "cannot reserve " + std::to_string(len) + " bytes in the spill file in '" + dir_ + "'");
        }
        void *p = ::mmap(nullptr, size_t(len), PROT_READ | PROT_WRITE, MAP_SHARED, fd_, off_t(off));
        if (p == MAP_FAILED) {
            const int err = errno;
            give_back_region(off, len);
            fail_os(NF4_ERROR_OUT_OF_MEMORY, err, "cannot map " + std::to_string(len) + " bytes of the spill file");
        }
        lru_.add(static_cast<char *>(p), len);
        regions_[reinterpret_cast<uintptr_t>(p)] = Region{len, off};
        return p;
    }

    void free(void *ptr) override {
        std::lock_guard<std::mutex> lock(mu_);
        lru_.remove(ptr);  // throws for a foreign pointer
        auto it = regions_.find(reinterpret_cast<uintptr_t>(ptr));
        const Region r = it->second;
        regions_.erase(it);
        char *base = static_cast<char *>(ptr);
        const bool punched = punch_hole(r.file_off, r.mapped);
        if (!punched) {
            // No hole punching (macOS, some file systems): zero the region so the
            // next allocation that reuses it reads zeros, then drop it from RAM.
            std::memset(base, 0, size_t(r.mapped));
            ::msync(base, size_t(r.mapped), MS_SYNC);
        }
        ::munmap(base, size_t(r.mapped));
        drop_cache(r.file_off, r.mapped);
        give_back_region(r.file_off, r.mapped);
    }

    void prefetch(const void *ptr, int64_t nbytes) override {
        std::lock_guard<std::mutex> lock(mu_);
        lru_.prefetch(ptr, nbytes);
    }

    void evict(const void *ptr, int64_t nbytes) override {
        std::lock_guard<std::mutex> lock(mu_);
        lru_.evict(ptr, nbytes);
    }

    void evict_all() override {
        std::lock_guard<std::mutex> lock(mu_);
        lru_.evict_all();
    }

    nf4_pager_stats stats() override {
        std::lock_guard<std::mutex> lock(mu_);
        return lru_.stats(lru_.refresh());  // what is really in RAM, exactly
    }

private:
    void open_default_dir() {
        std::vector<std::string> candidates;
        if (const char *t = std::getenv("TMPDIR"); t != nullptr && t[0] != '\0') candidates.emplace_back(t);
        candidates.emplace_back("/var/tmp");
        candidates.emplace_back("/tmp");
        std::string tried;
        for (const std::string &dir : candidates) {
            int fd = -1;
            try {
                fd = create_spill_file(dir);
            } catch (const Error &e) {
                tried += std::string(tried.empty() ? "" : "; ") + e.what();
                continue;
            }
            const bool tmpfs = dir_is_tmpfs(fd);
            if (fd_ < 0 || (tmpfs_ && !tmpfs)) {  // keep the first usable, prefer one on disk
                if (fd_ >= 0) ::close(fd_);
                fd_ = fd;
                dir_ = dir;
                tmpfs_ = tmpfs;
            } else {
                ::close(fd);
            }
            if (!tmpfs_) break;
        }
        if (fd_ < 0) fail(NF4_ERROR_INVALID_ARGUMENT, "no usable spill directory (" + tried + "); pass spill_dir");
    }

    // First fit in the free list, else the end of the file.
    int64_t take_region(int64_t len) {
        for (auto it = free_.begin(); it != free_.end(); ++it) {
            if (it->second < len) continue;
            const int64_t off = it->first, rest = it->second - len;
            free_.erase(it);
            if (rest > 0) free_.emplace(off + len, rest);
            return off;
        }
        const int64_t off = file_end_;
        file_end_ += len;
        return off;
    }

    // Back to the free list, merged with its neighbours; a free tail shrinks the file.
    void give_back_region(int64_t off, int64_t len) {
        auto next = free_.lower_bound(off);
        if (next != free_.end() && off + len == next->first) {
            len += next->second;
            next = free_.erase(next);
        }
        if (next != free_.begin()) {
            auto prev = std::prev(next);
            if (prev->first + prev->second == off) {
                off = prev->first;
                len += prev->second;
                free_.erase(prev);
            }
        }
        if (off + len == file_end_) {
            file_end_ = off;
            (void)!::ftruncate(fd_, off_t(file_end_));
        } else {
            free_.emplace(off, len);
        }
    }

    bool punch_hole(int64_t off, int64_t len) {
#if defined(__linux__) && defined(FALLOC_FL_PUNCH_HOLE)
        return ::fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off_t(off), off_t(len)) == 0;
#else
        (void)off;
        (void)len;
        return false;
#endif
    }

    void drop_cache(int64_t off, int64_t len) {
#ifdef __linux__
        ::posix_fadvise(fd_, off_t(off), off_t(len), POSIX_FADV_DONTNEED);
#else
        (void)off;
        (void)len;
#endif
    }

    // Where p lies in the spill file (p inside an allocation).
    int64_t file_offset(const char *p) const {
        const auto it = std::prev(regions_.upper_bound(reinterpret_cast<uintptr_t>(p)));
        return it->second.file_off + (reinterpret_cast<uintptr_t>(p) - it->first);
    }

    // Number of OS pages of [p, p + len) in RAM (page cache included).
    int64_t resident_pages(char *p, int64_t len) {
        const size_t n = size_t(len / os_page_);
        vec_.resize(n);
        if (::mincore(p, size_t(len), vec_.data()) != 0) return 0;
        int64_t count = 0;
        for (size_t i = 0; i < n; ++i) count += vec_[i] & 1;
        return count;
    }

    // The LRU's mover: RAM is the fast tier, the spill file the slow one.
    void move(char *p, int64_t len, bool in) {
        if (in)
            make_resident(p, len);
        else
            write_back(p, len);
    }

    void make_resident(char *p, int64_t len) {
        ::madvise(p, size_t(len), MADV_WILLNEED);
#ifdef __linux__
        // Reads exactly this range into the page cache, so the faults below hit
        // it and do not read around it (other pages, past the budget).
        ::posix_fadvise(fd_, off_t(file_offset(p)), off_t(len), POSIX_FADV_WILLNEED);
#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22  // Linux 5.14
#endif
        // Success is not proof: emulators (qemu-user) accept and ignore madvise.
        if (::madvise(p, size_t(len), MADV_POPULATE_READ) == 0 && resident_pages(p, len) == len / os_page_) return;
#endif
        volatile char sink = 0;
        for (int64_t off = 0; off < len; off += os_page_) sink = sink + p[off];
        (void)sink;
    }

    // Writes the pages back and returns their RAM. On a write-back failure
    // they stay resident (the LRU keeps them).
    void write_back(char *p, int64_t len) {
        if (::msync(p, size_t(len), MS_SYNC) != 0)
            fail_os(NF4_ERROR_OUT_OF_MEMORY, errno,
                    "cannot write pager memory back to the spill file in '" + dir_ + "'");
#ifdef __APPLE__
        ::msync(p, size_t(len), MS_INVALIDATE);
#endif
        ::madvise(p, size_t(len), MADV_DONTNEED);
        drop_cache(file_offset(p), len);
    }

    const int64_t os_page_;
    std::string dir_;
    int fd_ = -1;
    bool tmpfs_ = false;

    std::mutex mu_;
    PageLru lru_;                               // guarded by mu_
    std::map<uintptr_t, Region> regions_;       // base address -> its region of the file
    std::map<int64_t, int64_t> free_;           // offset -> length of free file regions
    int64_t file_end_ = 0;
#ifdef __APPLE__
    std::vector<char> vec_;
#else
    std::vector<unsigned char> vec_;
#endif
};

}  // namespace

std::unique_ptr<PagerBackend> make_host_pager(int64_t budget_bytes, const char *spill_dir, int64_t page_bytes) {
    return std::make_unique<HostPager>(budget_bytes, spill_dir, page_bytes);
}

}  // namespace nf4core

#else  // no POSIX mmap

namespace nf4core {
std::unique_ptr<PagerBackend> make_host_pager(int64_t, const char *, int64_t) {
    fail(NF4_ERROR_INVALID_ARGUMENT, "the pager's host backend is not supported on this platform (needs POSIX mmap)");
}
}  // namespace nf4core

#endif
