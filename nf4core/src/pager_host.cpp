// Host backend of the pager: RAM is the fast tier, unlinked spill files the
// slow one. Every allocation is a region of a spill file mapped MAP_SHARED
// (small ones share a region, a slab: see HostPager), so the kernel moves the
// bytes (faults pages in, writes them back) and callers see plain memory; this
// file decides *when*: an LRU over fixed-size pages (the PageLru of
// pager_lru.hpp, shown where the pages are by mincore), eviction with
// sync_file_range (msync off Linux) + madvise/posix_fadvise(DONTNEED) so that
// RAM really goes back to the OS, and disk reserved up front (posix_fallocate)
// so a full disk is an error at allocation time instead of a SIGBUS on first touch.
// Besides its spill files, a pager maps ranges of existing files read-only
// (nf4_pager_map_file: a 4-bit checkpoint paged from the file itself, the
// slow tier then being that file; see MappedFile below).
#include "pager.hpp"
#include "pager_lru.hpp"
#include "pager_sigbus.hpp"

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

// One spill file and its free regions: first fit at an aligned offset, freed
// regions merged with their neighbours, a free tail shrinks the file.
struct SpillFile {
    int fd = -1;
    std::map<int64_t, int64_t> free;  // offset -> length of free regions
    int64_t end = 0;                  // end of the last region in use

    int64_t take(int64_t len, int64_t align) {
        for (auto it = free.begin(); it != free.end(); ++it) {
            const int64_t off = it->first, flen = it->second;
            const int64_t at = (off + align - 1) / align * align;
            if (at + len > off + flen) continue;
            free.erase(it);
            if (at > off) free.emplace(off, at - off);
            if (off + flen > at + len) free.emplace(at + len, off + flen - (at + len));
            return at;
        }
        const int64_t at = (end + align - 1) / align * align;
        if (at > end) free.emplace(end, at - end);
        end = at + len;
        return at;
    }

    void give_back(int64_t off, int64_t len) {
        auto next = free.lower_bound(off);
        if (next != free.end() && off + len == next->first) {
            len += next->second;
            next = free.erase(next);
        }
        if (next != free.begin()) {
            auto prev = std::prev(next);
            if (prev->first + prev->second == off) {
                off = prev->first;
                len += prev->second;
                free.erase(prev);
            }
        }
        if (off + len == end) {
            end = off;
            (void)!::ftruncate(fd, off_t(end));
        } else {
            free.emplace(off, len);
        }
    }
};

// A file mapped read-only by nf4_pager_map_file (a checkpoint): one descriptor
// for all its mappings, and what it was when first mapped. The pager reads it
// through the page cache and never writes it; eviction drops its pages (they
// are clean). It must not change while mapped: a page past a shortened end
// raises SIGBUS when touched, and changed bytes would silently change the
// model. So size and modification time (fstat) and identity (stat of the path:
// the same device and inode) are checked before the pager touches its pages,
// and a change is an error naming the file.
struct MappedFile {
    int fd = -1;
    std::string path;
    dev_t dev = 0;
    ino_t ino = 0;
    off_t size = 0;
    struct timespec mtime = {0, 0};
    int64_t maps = 0;  // live mappings
};

struct timespec mtime_of(const struct stat &st) {
#ifdef __APPLE__
    return st.st_mtimespec;
#else
    return st.st_mtim;
#endif
}

// A mapping: of a spill file (a large allocation, or a slab of small ones), or
// read-only of a mapped file (mf set, file null).
struct Region {
    int64_t mapped = 0;    // bytes mapped, a multiple of the OS page size
    int64_t file_off = 0;  // where the region starts in its file
    int64_t reserved = 0;  // file bytes that belong to it (>= mapped: the alignment of large allocations)
    SpillFile *file = nullptr;
    MappedFile *mf = nullptr;
    int fd() const { return mf != nullptr ? mf->fd : file->fd; }
};

// Why small allocations share pages. The pager moves bytes with a few system
// calls per contiguous run of pages (write back, unmap, drop from the page
// cache), and every allocation used to be its own mapping: 4,000 arrays of
// 4 KiB cost 4,000 runs and took seconds to evict where 16 MiB in 1 MiB arrays
// took milliseconds. Worse, the kernel's read-around on a fault (up to
// read_ahead_kb, megabytes on some disks) filled the page cache around a
// touched 4 KiB array in large folios (up to 2 MiB) spanning many neighbours;
// the page cache drops a folio only whole, so evicting one small array freed
// nothing, resident bytes stayed over the budget and every evict() "paged
// out" the same pages again. So:
//   - Allocations of at most kSlab / 8 bytes are blocks of slabs: 2 MiB mappings
//     of a second spill file, paged in units of min(page_bytes, 64 KiB), so a
//     run of small arrays moves with one set of calls and costs what its bytes
//     cost. 64 KiB: a prefetch of one 4 KiB array brings at most 15 neighbours
//     along and budgets down to 64 KiB hold, while a unit is still one useful
//     disk write. Blocks keep OS-page alignment (pager.h promises it), so an
//     array of a few bytes still takes 4 KiB of the slab.
//   - Slab mappings are MADV_RANDOM (no read-around: a fault reads its own OS
//     page, in a folio of one page), in their own file, so the read-around of
//     large allocations cannot reach them either.
//   - Large allocations keep read-around (a sequential touch of a spilled
//     array without a prefetch is 25x faster with it) where its folios cannot
//     straddle two paging units: Linux with 4 KiB pages (largest page-cache
//     folio 2 MiB, naturally aligned) and page_bytes a multiple of 2 MiB, with
//     each allocation's file region aligned to 2 MiB. Otherwise they are
//     MADV_RANDOM too.
constexpr int64_t kSlab = int64_t(2) << 20;
constexpr int64_t kSlabUnit = int64_t(64) << 10;
constexpr int64_t kFolioMax = int64_t(2) << 20;
// Largest range given to one posix_fadvise(WILLNEED) (see make_resident).
constexpr int64_t kAdviseChunk = int64_t(512) << 10;

// The pages, their LRU and the counters are a PageLru; this class moves the
// bytes (the kernel does, on faults and write-back: madvise, sync_file_range)
// and shows the LRU where they are (mincore), packs small allocations into
// slabs (a SlabHeap) and manages the spill files.
class HostPager final : public PagerBackend {
public:
    HostPager(int64_t budget, const char *spill_dir, int64_t page_bytes)
        : os_page_(os_page_size()),
          unit_(std::min(page_bytes, (kSlabUnit + os_page_ - 1) / os_page_ * os_page_)),
          slabs_((kSlab + unit_ - 1) / unit_ * unit_),
          small_max_(slabs_.slab_bytes() / 8),
#ifdef __linux__
          readaround_(os_page_ == 4096 && page_bytes % kFolioMax == 0),
#else
          readaround_(true),
#endif
          lru_(budget, page_bytes, [this](char *p, int64_t len, bool in) { move(p, len, in); },
               [this](char *p, int64_t len) { return resident_pages(p, len) * os_page_; }) {
        if (spill_dir != nullptr && spill_dir[0] != '\0') {
            dir_ = spill_dir;
            big_.fd = create_spill_file(dir_);
            tmpfs_ = dir_is_tmpfs(big_.fd);
        } else {
            open_default_dir();
        }
    }

    ~HostPager() override {
        for (auto &kv : regions_) ::munmap(reinterpret_cast<void *>(kv.first), size_t(kv.second.mapped));
        if (big_.fd >= 0) ::close(big_.fd);
        if (small_.fd >= 0) ::close(small_.fd);
        for (auto &kv : files_) ::close(kv.second->fd);
    }

    nf4_pager_backend kind() const override { return NF4_PAGER_HOST; }
    const std::string &spill_dir() const override { return dir_; }
    bool spill_is_tmpfs() const override { return tmpfs_; }

    void *alloc(int64_t nbytes) override {
        require(nbytes <= INT64_MAX - 2 * kFolioMax, "nbytes too large: " + std::to_string(nbytes));
        const int64_t len = (nbytes + os_page_ - 1) / os_page_ * os_page_;
        std::lock_guard<std::mutex> lock(mu_);
        if (len <= small_max_) return alloc_small(len);
        const int64_t align = readaround_ ? kFolioMax : os_page_;
        const int64_t reserved = (len + align - 1) / align * align;
        const int64_t off = big_.take(reserved, align);
        if (int err = reserve(big_.fd, off, len)) {
            big_.give_back(off, reserved);
            fail_os(NF4_ERROR_OUT_OF_MEMORY, err,
                    "cannot reserve " + std::to_string(len) + " bytes in the spill file in '" + dir_ + "'");
        }
        void *p = ::mmap(nullptr, size_t(len), PROT_READ | PROT_WRITE, MAP_SHARED, big_.fd, off_t(off));
        if (p == MAP_FAILED) {
            const int err = errno;
            big_.give_back(off, reserved);
            fail_os(NF4_ERROR_OUT_OF_MEMORY, err, "cannot map " + std::to_string(len) + " bytes of the spill file");
        }
        if (!readaround_) ::madvise(p, size_t(len), MADV_RANDOM);
        lru_.add(static_cast<char *>(p), len);
        regions_[reinterpret_cast<uintptr_t>(p)] = Region{len, off, reserved, &big_};
        return p;
    }

    void free(void *ptr) override {
        std::lock_guard<std::mutex> lock(mu_);
        if (auto fm = file_maps_.find(reinterpret_cast<uintptr_t>(ptr)); fm != file_maps_.end()) {
            unmap_file(fm);
            return;
        }
        if (char *slab = slabs_.slab_of(ptr)) {
            const SlabHeap::Block b = slabs_.block_at(ptr);
            require(b.base != nullptr && b.base == ptr, "pointer was not allocated by this pager");
            free_small(slab, b);
            return;
        }
        lru_.remove(ptr);  // throws for a foreign pointer
        auto it = regions_.find(reinterpret_cast<uintptr_t>(ptr));
        const Region r = it->second;
        regions_.erase(it);
        char *base = static_cast<char *>(ptr);
        zero_file_range(base, r.file_off, r.mapped, big_);
        ::munmap(base, size_t(r.mapped));
        drop_cache(big_, r.file_off, r.reserved);
        big_.give_back(r.file_off, r.reserved);
    }

    void prefetch(const void *ptr, int64_t nbytes) override {
        std::lock_guard<std::mutex> lock(mu_);
        check_small_range(ptr, nbytes);
        // a mapped file is checked before its pages are touched (nothing else is
        // touched: eviction of other pages only unmaps and drops them)
        if (const Region *r = region_holding(ptr); r != nullptr && r->mf != nullptr && nbytes > 0) check_file(*r->mf);
        lru_.prefetch(ptr, nbytes);
    }

    const void *map_file(const char *path, int64_t offset, int64_t nbytes) override {
        require(nbytes <= INT64_MAX - offset - os_page_, "offset + nbytes too large");
        std::lock_guard<std::mutex> lock(mu_);
        const std::string name(path);
        int fd = ::open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) fail_os(NF4_ERROR_INVALID_ARGUMENT, errno, "cannot open '" + name + "' to map it");
        struct stat st;
        if (::fstat(fd, &st) != 0) {
            const int err = errno;
            ::close(fd);
            fail_os(NF4_ERROR_INVALID_ARGUMENT, err, "cannot stat '" + name + "'");
        }
        if (!S_ISREG(st.st_mode)) {
            ::close(fd);
            fail(NF4_ERROR_INVALID_ARGUMENT, "'" + name + "' is not a regular file: only files can be mapped");
        }
        if (offset > int64_t(st.st_size) || nbytes > int64_t(st.st_size) - offset) {
            ::close(fd);
            fail(NF4_ERROR_INVALID_ARGUMENT, "bytes [" + std::to_string(offset) + ", " +
                                                 std::to_string(offset + nbytes) + ") lie beyond the end of '" + name +
                                                 "' (" + std::to_string(int64_t(st.st_size)) + " bytes)");
        }
        const auto key = std::make_pair(uint64_t(st.st_dev), uint64_t(st.st_ino));
        auto it = files_.find(key);
        MappedFile *mf;
        if (it != files_.end()) {  // one descriptor per file
            ::close(fd);
            mf = it->second.get();
            check_file(*mf);
        } else {
            auto f = std::make_unique<MappedFile>();
            f->fd = fd;
            f->path = name;
            f->dev = st.st_dev;
            f->ino = st.st_ino;
            f->size = st.st_size;
            f->mtime = mtime_of(st);
            mf = f.get();
            files_.emplace(key, std::move(f));
        }
        const int64_t start = offset / os_page_ * os_page_;
        const int64_t len = (offset + nbytes - start + os_page_ - 1) / os_page_ * os_page_;
        void *p = ::mmap(nullptr, size_t(len), PROT_READ, MAP_SHARED, mf->fd, off_t(start));
        if (p == MAP_FAILED) {
            const int err = errno;
            if (mf->maps == 0) forget_file(*mf);
            fail_os(NF4_ERROR_OUT_OF_MEMORY, err, "cannot map " + std::to_string(len) + " bytes of '" + name + "'");
        }
        // No read-around: a page's neighbours in the file belong to other tensors
        // (other mappings) and are paged with them; prefetch reads exactly its range.
        ::madvise(p, size_t(len), MADV_RANDOM);
        char *base = static_cast<char *>(p);
        lru_.add(base, len);
        regions_[reinterpret_cast<uintptr_t>(p)] = Region{len, start, len, nullptr, mf};
        // Under a budget, the file's pages already in the page cache (a checkpoint
        // written or read moments ago) go at once: they sit in the writer's large
        // folios, which cannot be dropped while any page of them is mapped, so a
        // budget smaller than a folio could never be met; the pager reads them
        // back itself in one-page folios it can drop. Without a budget they stay.
        if (lru_.budget() >= 0) write_back(base, len);
        // what is still there (mapped by someone else) is in RAM: the budget
        // sees it at once, as the first to go
        lru_.adopt(base);
        char *inner = base + (offset - start);
        file_maps_[reinterpret_cast<uintptr_t>(inner)] = base;
        ++mf->maps;
        return inner;
    }

    nf4_pager_file_stats file_stats() override {
        std::lock_guard<std::mutex> lock(mu_);
        nf4_pager_file_stats s{0, 0, 0, 0, 0};
        s.num_files = int64_t(files_.size());
        s.num_mappings = int64_t(file_maps_.size());
        for (const auto &kv : file_maps_) {
            const Region &r = regions_.at(reinterpret_cast<uintptr_t>(kv.second));
            s.mapped_bytes += r.mapped;
            s.resident_bytes += resident_pages(kv.second, r.mapped) * os_page_;
        }
        for (const SpillFile *f : {&big_, &small_}) {
            struct stat st;
            if (f->fd >= 0 && ::fstat(f->fd, &st) == 0) s.spill_bytes += int64_t(st.st_blocks) * 512;
        }
        return s;
    }

    void evict(const void *ptr, int64_t nbytes) override {
        std::lock_guard<std::mutex> lock(mu_);
        check_small_range(ptr, nbytes);
        lru_.evict(ptr, nbytes);
    }

    void evict_all() override {
        std::lock_guard<std::mutex> lock(mu_);
        flush_stale();  // freed blocks leave RAM without being written back
        lru_.evict_all();
    }

    nf4_pager_stats stats() override {
        std::lock_guard<std::mutex> lock(mu_);
        int64_t resident = lru_.refresh();  // what is really in RAM, exactly
        // ... of live allocations: not the free parts of slabs (a prefetch reads
        // a slab a unit at a time, free extents included, as zeros)
        slabs_.for_each_free([&](char *p, int64_t len) { resident -= resident_pages(p, len) * os_page_; });
        nf4_pager_stats s = lru_.stats(resident);
        const int64_t slab_bytes = slabs_.num_slabs() * slabs_.slab_bytes();
        s.allocated_bytes = lru_.allocated_bytes() - slab_bytes + slabs_.live_bytes();
        s.num_allocations = lru_.num_allocations() - slabs_.num_slabs() + slabs_.live_blocks();
        s.spilled_bytes = s.allocated_bytes - resident;
        return s;
    }

private:
    // The region that holds p, or nullptr.
    const Region *region_holding(const void *ptr) const {
        const auto a = reinterpret_cast<uintptr_t>(ptr);
        auto it = regions_.upper_bound(a);
        if (it == regions_.begin()) return nullptr;
        --it;
        return a < it->first + uintptr_t(it->second.mapped) ? &it->second : nullptr;
    }

    // Throws (ESTALE, naming the file) unless the file is still what was mapped.
    void check_file(const MappedFile &f) const {
        struct stat st;
        if (::fstat(f.fd, &st) != 0) fail_os(NF4_ERROR_INVALID_ARGUMENT, errno, "cannot stat '" + f.path + "'");
        const struct timespec m = mtime_of(st);
        std::string what;
        if (st.st_size != f.size)
            what = "its size changed from " + std::to_string(int64_t(f.size)) + " to " +
                   std::to_string(int64_t(st.st_size)) + " bytes";
        else if (m.tv_sec != f.mtime.tv_sec || m.tv_nsec != f.mtime.tv_nsec)
            what = "its modification time changed";
        else if (::stat(f.path.c_str(), &st) == 0 && (st.st_dev != f.dev || st.st_ino != f.ino))
            what = "its path names another file now";
        // (a path that names nothing now is fine: the descriptor keeps the file and its bytes)
        if (!what.empty())
            throw OsError(NF4_ERROR_INVALID_ARGUMENT, ESTALE,
                          "file '" + f.path + "' changed on disk while mapped by the pager (" + what +
                              "): its pages cannot be read safely; free its mappings and map it again");
    }

    void forget_file(const MappedFile &f) {
        ::close(f.fd);
        files_.erase(std::make_pair(uint64_t(f.dev), uint64_t(f.ino)));
    }

    void unmap_file(std::map<uintptr_t, char *>::iterator fm) {
        char *base = fm->second;
        file_maps_.erase(fm);
        lru_.remove(base);
        auto it = regions_.find(reinterpret_cast<uintptr_t>(base));
        const Region r = it->second;
        regions_.erase(it);
        ::munmap(base, size_t(r.mapped));
        if (--r.mf->maps == 0) forget_file(*r.mf);
    }

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
            if (big_.fd < 0 || (tmpfs_ && !tmpfs)) {  // keep the first usable, prefer one on disk
                if (big_.fd >= 0) ::close(big_.fd);
                big_.fd = fd;
                dir_ = dir;
                tmpfs_ = tmpfs;
            } else {
                ::close(fd);
            }
            if (!tmpfs_) break;
        }
        if (big_.fd < 0) fail(NF4_ERROR_INVALID_ARGUMENT, "no usable spill directory (" + tried + "); pass spill_dir");
    }

    // A block of a slab (a new slab where none has room), its disk reserved.
    void *alloc_small(int64_t len) {
        char *p = slabs_.take(len);
        if (p == nullptr) {
            add_slab();
            p = slabs_.take(len);
        }
        const int64_t off = file_offset(p);
        clear_stale(p, len);
        if (int err = reserve(small_.fd, off, len)) {
            if (slabs_.give(p)) release_slab(slabs_.slab_of(p));
            fail_os(NF4_ERROR_OUT_OF_MEMORY, err,
                    "cannot reserve " + std::to_string(len) + " bytes in the spill file in '" + dir_ + "'");
        }
        return p;
    }

    void add_slab() {
        if (small_.fd < 0) small_.fd = create_spill_file(dir_);  // the first small allocation
        const int64_t size = slabs_.slab_bytes();
        const int64_t off = small_.take(size, os_page_);
        // The file covers the whole slab, so that every page of it can be read
        // (as zeros where no block is): a prefetch reads whole units.
        if (off + size == small_.end && ::ftruncate(small_.fd, off_t(small_.end)) != 0) {
            const int err = errno;
            small_.give_back(off, size);
            fail_os(NF4_ERROR_OUT_OF_MEMORY, err, "cannot grow the spill file in '" + dir_ + "'");
        }
        void *p = ::mmap(nullptr, size_t(size), PROT_READ | PROT_WRITE, MAP_SHARED, small_.fd, off_t(off));
        if (p == MAP_FAILED) {
            const int err = errno;
            small_.give_back(off, size);
            fail_os(NF4_ERROR_OUT_OF_MEMORY, err, "cannot map " + std::to_string(size) + " bytes of the spill file");
        }
        ::madvise(p, size_t(size), MADV_RANDOM);
        lru_.add(static_cast<char *>(p), size, unit_);
        regions_[reinterpret_cast<uintptr_t>(p)] = Region{size, off, size, &small_};
        slabs_.add_slab(static_cast<char *>(p));
    }

    // A freed block keeps its bytes until its range is allocated again, its
    // slab goes back, or evict_all: zeroing it (a hole punched) is a file-system
    // transaction, 0.1 to 4 ms each on ext4 here, so freeing 4,000 small arrays
    // one punch each took seconds; deferred, they merge into a few punches.
    void free_small(char *slab, const SlabHeap::Block &b) {
        add_stale(slab, b.base, b.len);
        if (slabs_.give(b.base)) release_slab(slab);
    }

    // An empty slab goes back: its pages leave the LRU, its file region is
    // zeroed (one punch for the slab) and freed.
    void release_slab(char *slab) {
        lru_.remove(slab);
        slabs_.remove_slab(slab);
        auto it = regions_.find(reinterpret_cast<uintptr_t>(slab));
        const Region r = it->second;
        regions_.erase(it);
        const auto b = reinterpret_cast<uintptr_t>(slab);
        stale_.erase(stale_.lower_bound(b), stale_.lower_bound(b + uintptr_t(r.mapped)));
        zero_file_range(slab, r.file_off, r.mapped, small_);
        ::munmap(slab, size_t(r.mapped));
        drop_cache(small_, r.file_off, r.reserved);
        small_.give_back(r.file_off, r.reserved);
    }

    // [p, p + len) of `slab` holds the bytes of a freed block (merged with
    // stale neighbours of the same slab: two slabs' addresses may touch).
    void add_stale(char *slab, char *p, int64_t len) {
        auto a = reinterpret_cast<uintptr_t>(p);
        const auto lo = reinterpret_cast<uintptr_t>(slab), hi = lo + uintptr_t(slabs_.slab_bytes());
        auto next = stale_.lower_bound(a);
        if (next != stale_.end() && next->first == a + uintptr_t(len) && next->first < hi) {
            len += next->second;
            next = stale_.erase(next);
        }
        if (next != stale_.begin()) {
            auto prev = std::prev(next);
            if (prev->first >= lo && prev->first + uintptr_t(prev->second) == a) {
                a = prev->first;
                len += prev->second;
                stale_.erase(prev);
            }
        }
        stale_.emplace(a, len);
    }

    // Zeroes the block [p, p + len) about to be handed out where any of it is stale.
    void clear_stale(char *p, int64_t len) {
        const auto a = reinterpret_cast<uintptr_t>(p), e = a + uintptr_t(len);
        auto it = stale_.upper_bound(a);
        if (it != stale_.begin() && std::prev(it)->first + uintptr_t(std::prev(it)->second) > a) --it;
        if (it == stale_.end() || it->first >= e) return;
        zero_file_range(p, file_offset(p), len, small_);
        while (it != stale_.end() && it->first < e) {  // keep the parts outside the block
            const uintptr_t s0 = it->first, s1 = s0 + uintptr_t(it->second);
            it = stale_.erase(it);
            if (s0 < a) stale_.emplace(s0, int64_t(a - s0));
            if (s1 > e) it = stale_.emplace(e, int64_t(s1 - e)).first;
        }
    }

    void flush_stale() {
        for (const auto &kv : stale_) {
            char *p = reinterpret_cast<char *>(kv.first);
            zero_file_range(p, file_offset(p), kv.second, small_);
        }
        stale_.clear();
    }

    // A range in a slab must lie in one live block (PageLru sees only the slab,
    // and checks large allocations itself).
    void check_small_range(const void *ptr, int64_t nbytes) const {
        if (slabs_.slab_of(ptr) == nullptr) return;
        const SlabHeap::Block b = slabs_.block_at(ptr);
        if (b.base == nullptr) fail(NF4_ERROR_INVALID_ARGUMENT, "pointer does not lie in memory allocated by this pager");
        require(nbytes <= b.base + b.len - static_cast<const char *>(ptr),
                "range of " + std::to_string(nbytes) + " bytes runs past the end of its pager allocation");
    }

    // Freed memory reads as zeros when reused: the file range becomes a hole
    // (its disk blocks and cached pages go), or, without hole punching (macOS,
    // some file systems), is zeroed and written back.
    void zero_file_range(char *p, int64_t off, int64_t len, SpillFile &f) {
        if (punch_hole(f, off, len)) return;
        std::memset(p, 0, size_t(len));
        ::msync(p, size_t(len), MS_SYNC);
        ::madvise(p, size_t(len), MADV_DONTNEED);
        drop_cache(f, off, len);
    }

    bool punch_hole(SpillFile &f, int64_t off, int64_t len) {
#if defined(__linux__) && defined(FALLOC_FL_PUNCH_HOLE)
        return ::fallocate(f.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off_t(off), off_t(len)) == 0;
#else
        (void)f;
        (void)off;
        (void)len;
        return false;
#endif
    }

    void drop_cache(SpillFile &f, int64_t off, int64_t len) {
#ifdef __linux__
        ::posix_fadvise(f.fd, off_t(off), off_t(len), POSIX_FADV_DONTNEED);
#else
        (void)f;
        (void)off;
        (void)len;
#endif
    }

    // The region (large allocation or slab) that holds p.
    const std::pair<const uintptr_t, Region> &region_of(const char *p) const {
        return *std::prev(regions_.upper_bound(reinterpret_cast<uintptr_t>(p)));
    }

    // Where p lies in its spill file.
    int64_t file_offset(const char *p) const {
        const auto &r = region_of(p);
        return r.second.file_off + int64_t(reinterpret_cast<uintptr_t>(p) - r.first);
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
        // it and do not read around it (other pages, past the budget). In pieces:
        // the kernel reads at most max(read_ahead_kb, max_sectors_kb) of one
        // WILLNEED (force_page_cache_ra), 8 MiB on a virtio disk, 128 KiB where
        // nothing was tuned, and the rest of a larger range was faulted in 4 KiB
        // at a time (MADV_RANDOM): a 65B checkpoint paged at 70 MB/s from a disk
        // that reads 1.1 GB/s. Pieces of kAdviseChunk are under every such limit
        // we know of and cost one system call per 512 KiB.
        const Region &r = region_of(p).second;
        const int64_t off0 = file_offset(p);
        for (int64_t o = 0; o < len; o += kAdviseChunk)
            ::posix_fadvise(r.fd(), off_t(off0 + o), off_t(std::min(kAdviseChunk, len - o)), POSIX_FADV_WILLNEED);
#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22  // Linux 5.14
#endif
        // Success is not proof: emulators (qemu-user) accept and ignore madvise.
        const int populated = ::madvise(p, size_t(len), MADV_POPULATE_READ) == 0 ? 0 : errno;
        if (populated == 0 && resident_pages(p, len) == len / os_page_) return;
        // EFAULT: a page past the end of its file (a mapped file shortened after its check)
        if (populated == EFAULT && r.mf != nullptr) {
            check_file(*r.mf);
            throw OsError(NF4_ERROR_INVALID_ARGUMENT, EFAULT, "cannot read pages of '" + r.mf->path + "'");
        }
#endif
        // A mapped file's pages are read under a SIGBUS guard (pager_sigbus.hpp);
        // spill files cannot shrink under us (their disk is reserved).
        if (region_of(p).second.mf == nullptr) {
            volatile char sink = 0;
            for (int64_t off = 0; off < len; off += os_page_) sink = sink + p[off];
            (void)sink;
        } else if (!read_pages_guarded(p, len, os_page_)) {
            const MappedFile &f = *region_of(p).second.mf;
            check_file(f);
            throw OsError(NF4_ERROR_INVALID_ARGUMENT, ESTALE,
                          "file '" + f.path + "' ended before a mapped page (SIGBUS): it changed on disk");
        }
    }

    // Writes the pages back and returns their RAM. On a write-back failure
    // they stay resident (the LRU keeps them).
    void write_back(char *p, int64_t len) {
        const auto &reg = region_of(p);
        const Region &r = reg.second;
        const int64_t off = r.file_off + int64_t(reinterpret_cast<uintptr_t>(p) - reg.first);
        if (r.mf != nullptr) {  // read-only: unmap and drop from the page cache, nothing of ours to write
            ::madvise(p, size_t(len), MADV_DONTNEED);
#ifdef __linux__
            // A file written moments ago (a checkpoint just quantized) still has
            // dirty pages in the page cache, which POSIX_FADV_DONTNEED skips: let
            // them reach the disk first (a no-op for clean pages). Best effort:
            // the data is the file's writer's, and an error leaves them cached.
            (void)::sync_file_range(r.mf->fd, off_t(off), off_t(len),
                                    SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER);
            // The page cache drops a folio only whole, and the writer's folios
            // (up to 2 MiB, naturally aligned) straddle our pages: drop the
            // aligned 2 MiB around them. Pages mapped by anyone (our other
            // resident mappings of the file included) are never dropped; those
            // of neighbours that go are read again by their next prefetch.
            const int64_t lo = off / kFolioMax * kFolioMax;
            const int64_t hi = std::min<int64_t>((off + len + kFolioMax - 1) / kFolioMax * kFolioMax, r.mf->size);
            ::posix_fadvise(r.mf->fd, off_t(lo), off_t(std::max<int64_t>(hi - lo, len)), POSIX_FADV_DONTNEED);
#else
            ::msync(p, size_t(len), MS_INVALIDATE);
#endif
            return;
        }
#ifdef __linux__
        // Unmap first (the page-table dirty bits go to the page cache), then
        // write the range and wait for it: sync_file_range, not msync, whose
        // fsync also commits the file system's journal and flushes the disk's
        // cache, milliseconds per call. The spill file needs no durability: it
        // has no name and dies with the process.
        ::madvise(p, size_t(len), MADV_DONTNEED);
        if (::sync_file_range(r.file->fd, off_t(off), off_t(len),
                              SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER) != 0)
            fail_os(NF4_ERROR_OUT_OF_MEMORY, errno,
                    "cannot write pager memory back to the spill file in '" + dir_ + "'");
#else
        if (::msync(p, size_t(len), MS_SYNC) != 0)
            fail_os(NF4_ERROR_OUT_OF_MEMORY, errno,
                    "cannot write pager memory back to the spill file in '" + dir_ + "'");
        ::msync(p, size_t(len), MS_INVALIDATE);
        ::madvise(p, size_t(len), MADV_DONTNEED);
#endif
        // The last page of a large allocation may share a folio with the
        // alignment gap after it (read-around fills it): drop the region's tail too.
        const bool to_end = p + len == reinterpret_cast<char *>(reg.first) + r.mapped;
        drop_cache(*r.file, off, to_end ? r.file_off + r.reserved - off : len);
    }

    const int64_t os_page_;
    const int64_t unit_;  // paging unit of slabs
    std::string dir_;
    bool tmpfs_ = false;

    std::mutex mu_;
    SlabHeap slabs_;         // guarded by mu_, as everything below
    const int64_t small_max_;  // allocations up to this many bytes are slab blocks
    const bool readaround_;    // large allocations keep the kernel's read-around
    PageLru lru_;
    SpillFile big_, small_;                 // large allocations; slabs (opened with the first)
    std::map<uintptr_t, Region> regions_;  // base address -> its region of a spill file
    std::map<uintptr_t, int64_t> stale_;   // freed slab blocks not zeroed yet: address -> length
    std::map<std::pair<uint64_t, uint64_t>, std::unique_ptr<MappedFile>> files_;  // (device, inode) -> file
    std::map<uintptr_t, char *> file_maps_;  // pointer given out by map_file -> base of its mapping
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
