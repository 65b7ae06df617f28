// Residency bookkeeping of both pager backends, apart from how bytes move:
// which pages of which allocations are in the fast tier, least recently used
// first, and which contiguous runs of pages must move when a range is
// prefetched under a budget or evicted. Pages are `page_bytes` long unless an
// allocation is added with its own unit (the host backend's slabs of small
// allocations, SlabHeap below, are paged in smaller units). The mover is a callback, so the policy
// compiles and is tested on the host (tests/test_pager_lru.cpp): cuda/pager.cu
// gives it cudaMemPrefetchAsync, pager_host.cpp madvise/msync on its spill file.
//
// A backend that can see where its pages really are (the host: mincore) also
// passes a probe. Pages then count as in the fast tier when the probe says so,
// not only when the pager put them there: a prefetch pages in, and counts,
// whatever is not wholly there (the kernel may have reclaimed it); an eviction
// moves, and counts, every page with bytes there (touched without a prefetch),
// and skips the others; refresh() takes in what was faulted in (as the least
// recently used) and drops what was reclaimed. Without a probe (CUDA) the
// bookkeeping is the truth, and an eviction moves the whole range.
// Not thread-safe: the backend's mutex guards it.
#ifndef NF4CORE_SRC_PAGER_LRU_HPP
#define NF4CORE_SRC_PAGER_LRU_HPP

#include <algorithm>
#include <cstdint>
#include <functional>
#include <iterator>
#include <list>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "error.hpp"
#include "pager.hpp"

namespace nf4core {

class PageLru {
public:
    // Moves [p, p + len) to the fast tier (to_fast) or back to the slow one.
    using Move = std::function<void(char *p, int64_t len, bool to_fast)>;
    // The bytes of [p, p + len) that are in the fast tier now.
    using Probe = std::function<int64_t(char *p, int64_t len)>;

    PageLru(int64_t budget, int64_t page_bytes, Move move, Probe probe = nullptr)
        : budget_(budget), page_bytes_(page_bytes), move_(std::move(move)), probe_(std::move(probe)) {}

    // A new allocation [base, base + len), all in the slow tier, paged in
    // units of `unit` bytes (0: page_bytes).
    void add(char *base, int64_t len, int64_t unit = 0) {
        auto a = std::make_unique<Allocation>();
        a->base = base;
        a->len = len;
        a->unit = unit > 0 ? unit : page_bytes_;
        a->chunks.resize(size_t((len + a->unit - 1) / a->unit));
        allocated_ += len;
        allocs_.emplace(reinterpret_cast<uintptr_t>(base), std::move(a));
    }

    // With a probe: takes the pages of the allocation starting at base that
    // are in the fast tier already (a mapped file's pages in the page cache)
    // in as the least recently used, as refresh() does for every allocation.
    void adopt(const void *base) {
        auto it = allocs_.find(reinterpret_cast<uintptr_t>(base));
        require(it != allocs_.end(), "pointer was not allocated by this pager");
        if (!probe_) return;
        Allocation &a = *it->second;
        for (int64_t i = 0; i < int64_t(a.chunks.size()); ++i) {
            Chunk &c = a.chunks[size_t(i)];
            if (!c.resident && probe_(a.base + i * a.unit, chunk_len(a, i)) > 0) {
                c.resident = true;
                c.pos = lru_.insert(lru_.begin(), ChunkRef{&a, i});
                resident_ += chunk_len(a, i);
            }
        }
    }

    // Forgets the allocation starting at base (nothing moves); throws for a
    // pointer that is not one.
    void remove(const void *base) {
        auto it = allocs_.find(reinterpret_cast<uintptr_t>(base));
        require(base != nullptr && it != allocs_.end(), "pointer was not allocated by this pager");
        for (Chunk &c : it->second->chunks)
            if (c.resident) lru_remove(c);
        allocated_ -= it->second->len;
        allocs_.erase(it);
    }

    // Makes the pages covering [ptr, ptr + nbytes) fast-tier resident and most
    // recently used. Room is made first: least recently used pages of other
    // ranges move out until resident + range <= budget (a range larger than
    // the budget stays whole), then the missing pages move in, one call per
    // contiguous run.
    void prefetch(const void *ptr, int64_t nbytes) {
        Allocation &a = find(ptr, nbytes);
        if (nbytes == 0) return;
        // A full probe costs ~1 ms per GiB (mincore): done once per sweep over
        // the allocated bytes, not on every prefetch.
        if (probe_ && budget_ >= 0 && prefetched_since_refresh_ >= allocated_) refresh();
        const int64_t start = static_cast<const char *>(ptr) - a.base;
        const int64_t c0 = start / a.unit, c1 = (start + nbytes - 1) / a.unit;
        std::vector<char> was(size_t(c1 - c0 + 1), 0), missing(size_t(c1 - c0 + 1), 0);
        int64_t need = 0;
        for (int64_t i = c0; i <= c1; ++i) {
            Chunk &c = a.chunks[size_t(i)];
            if (c.resident) {
                was[size_t(i - c0)] = 1;
                lru_remove(c);
            }
            need += chunk_len(a, i);
        }
        prefetched_since_refresh_ += (c1 - c0 + 1) * a.unit;
        try {
            if (budget_ >= 0)
                while (resident_ + need > budget_ && !lru_.empty()) {
                    const ChunkRef victim = lru_.front();
                    evict_range(*victim.alloc, victim.index, victim.index + 1);
                }
            // probed after making room: mappings of one file may share an OS
            // page, which the eviction of a neighbour can drop
            for (int64_t i = c0; i <= c1; ++i) {
                const int64_t len = chunk_len(a, i);
                missing[size_t(i - c0)] = probe_ ? probe_(a.base + i * a.unit, len) < len : !was[size_t(i - c0)];
            }
            int64_t run = -1;
            for (int64_t i = c0; i <= c1 + 1; ++i) {
                const bool is_missing = i <= c1 && missing[size_t(i - c0)];
                if (is_missing && run < 0) run = i;
                if (!is_missing && run >= 0) {
                    move(a, run, i, true);
                    page_ins_ += i - run;
                    for (int64_t j = run; j < i; ++j) page_in_bytes_ += chunk_len(a, j);
                    run = -1;
                }
            }
        } catch (...) {
            // a failed move: the pages that were resident stay so (most recent)
            for (int64_t i = c0; i <= c1; ++i)
                if (was[size_t(i - c0)]) mark_resident(a, i);
            throw;
        }
        for (int64_t i = c0; i <= c1; ++i) mark_resident(a, i);
    }

    // Moves the pages covering [ptr, ptr + nbytes) to the slow tier. Without a
    // probe all of them (pages may have gone to the fast tier without the
    // pager, by faults), and page_outs counts those the pager had there; with
    // one, those with bytes there (see above).
    void evict(const void *ptr, int64_t nbytes) {
        Allocation &a = find(ptr, nbytes);
        if (nbytes == 0) return;
        const int64_t start = static_cast<const char *>(ptr) - a.base;
        evict_range(a, start / a.unit, (start + nbytes - 1) / a.unit + 1);
    }

    void evict_all() {
        for (auto &kv : allocs_) evict_range(*kv.second, 0, int64_t(kv.second->chunks.size()));
    }

    // With a probe: brings the bookkeeping in line with where the pages are
    // (pages touched without a prefetch are taken in as the least recently
    // used, so they go first; pages the kernel reclaimed are dropped) and
    // returns the bytes in the fast tier.
    int64_t refresh() {
        int64_t fast = 0;
        for (auto &kv : allocs_) {
            Allocation &a = *kv.second;
            for (int64_t i = 0; i < int64_t(a.chunks.size()); ++i) {
                Chunk &c = a.chunks[size_t(i)];
                const int64_t bytes = probe_(a.base + i * a.unit, chunk_len(a, i));
                fast += bytes;
                if (bytes > 0 && !c.resident) {
                    c.resident = true;
                    c.pos = lru_.insert(lru_.begin(), ChunkRef{&a, i});
                    resident_ += chunk_len(a, i);
                } else if (bytes == 0 && c.resident) {
                    lru_remove(c);
                }
            }
        }
        prefetched_since_refresh_ = 0;
        return fast;
    }

    // The pager's statistics, with `resident` bytes in the fast tier.
    nf4_pager_stats stats(int64_t resident) const {
        nf4_pager_stats s;
        s.budget_bytes = budget_;
        s.page_bytes = page_bytes_;
        s.allocated_bytes = allocated_;
        s.resident_bytes = resident;
        s.spilled_bytes = allocated_ - resident;
        s.page_ins = page_ins_;
        s.page_outs = page_outs_;
        s.num_allocations = int64_t(allocs_.size());
        s.page_in_bytes = page_in_bytes_;
        s.page_out_bytes = page_out_bytes_;
        return s;
    }

    int64_t budget() const { return budget_; }
    int64_t page_bytes() const { return page_bytes_; }
    int64_t resident_bytes() const { return resident_; }
    int64_t allocated_bytes() const { return allocated_; }
    int64_t page_ins() const { return page_ins_; }
    int64_t page_outs() const { return page_outs_; }
    int64_t num_allocations() const { return int64_t(allocs_.size()); }

    std::vector<char *> bases() const {
        std::vector<char *> v;
        for (const auto &kv : allocs_) v.push_back(kv.second->base);
        return v;
    }

private:
    struct Allocation;
    struct ChunkRef {
        Allocation *alloc;
        int64_t index;
    };
    using Lru = std::list<ChunkRef>;  // front = least recently used; resident chunks only
    struct Chunk {
        bool resident = false;
        Lru::iterator pos;
    };
    struct Allocation {
        char *base = nullptr;
        int64_t len = 0;
        int64_t unit = 0;  // paging unit: page_bytes_, or the allocation's own
        std::vector<Chunk> chunks;
    };

    // The allocation that holds [ptr, ptr + nbytes); throws for a pointer
    // outside every allocation and for a range that runs past the end of its own.
    Allocation &find(const void *ptr, int64_t nbytes) {
        const auto p = reinterpret_cast<uintptr_t>(ptr);
        auto it = allocs_.upper_bound(p);
        if (ptr != nullptr && it != allocs_.begin()) {
            Allocation &a = *std::prev(it)->second;
            const auto base = reinterpret_cast<uintptr_t>(a.base), end = base + uintptr_t(a.len);
            if (p < end && nbytes <= int64_t(end - p)) return a;
            require(p >= end,
                    "range of " + std::to_string(nbytes) + " bytes runs past the end of its pager allocation");
        }
        fail(NF4_ERROR_INVALID_ARGUMENT, "pointer does not lie in memory allocated by this pager");
    }

    static int64_t chunk_len(const Allocation &a, int64_t i) { return std::min(a.unit, a.len - i * a.unit); }

    void move(const Allocation &a, int64_t i0, int64_t i1, bool to_fast) {
        const int64_t off = i0 * a.unit;
        const int64_t end = std::min(a.len, i1 * a.unit);
        if (end > off) move_(a.base + off, end - off, to_fast);
    }

    void evict_range(Allocation &a, int64_t i0, int64_t i1) {
        if (!probe_) {
            move(a, i0, i1, false);
            for (int64_t i = i0; i < i1; ++i) {
                Chunk &c = a.chunks[size_t(i)];
                if (!c.resident) continue;
                lru_remove(c);
                ++page_outs_;
                page_out_bytes_ += chunk_len(a, i);
            }
            return;
        }
        // runs of pages with bytes in the fast tier; a page without costs one probe
        int64_t run = -1;
        for (int64_t i = i0; i <= i1; ++i) {
            const bool there = i < i1 && (a.chunks[size_t(i)].resident ||
                                          probe_(a.base + i * a.unit, chunk_len(a, i)) > 0);
            if (there && run < 0) run = i;
            if (!there && run >= 0) {
                move(a, run, i, false);
                for (int64_t j = run; j < i; ++j) {
                    Chunk &c = a.chunks[size_t(j)];
                    if (c.resident) lru_remove(c);
                    ++page_outs_;
                    page_out_bytes_ += chunk_len(a, j);
                }
                run = -1;
            }
        }
    }

    void mark_resident(Allocation &a, int64_t i) {
        Chunk &c = a.chunks[size_t(i)];
        c.resident = true;
        c.pos = lru_.insert(lru_.end(), ChunkRef{&a, i});
        resident_ += chunk_len(a, i);
    }

    void lru_remove(Chunk &c) {
        resident_ -= chunk_len(*c.pos->alloc, c.pos->index);
        lru_.erase(c.pos);
        c.resident = false;
    }

    const int64_t budget_, page_bytes_;
    Move move_;
    Probe probe_;
    std::map<uintptr_t, std::unique_ptr<Allocation>> allocs_;
    Lru lru_;
    int64_t resident_ = 0;  // bytes of the pages in lru_
    int64_t allocated_ = 0, page_ins_ = 0, page_outs_ = 0, page_in_bytes_ = 0, page_out_bytes_ = 0;
    int64_t prefetched_since_refresh_ = 0;  // with a probe
};

// Small allocations packed into shared slabs: the host backend's sub-page
// allocator (pager_host.cpp says why small arrays must share pages). A slab is
// one region of `slab_bytes` that the caller maps and registers; blocks are
// carved from the slabs best fit (the smallest free extent that holds them,
// the lowest address among equals), so that a run of same-sized blocks fills
// one slab before the next; a freed block merges with its free neighbours in
// its own slab, never across slabs (two mappings may happen to touch), and a
// slab with no block left is reported so the caller can release it. Every
// operation is O(log n) in the number of blocks and free extents. No I/O here:
// the tests drive it alone (tests/test_pager_lru.cpp).
// Not thread-safe: the backend's mutex guards it.
class SlabHeap {
public:
    struct Block {
        char *base;
        int64_t len;
    };

    explicit SlabHeap(int64_t slab_bytes) : slab_bytes_(slab_bytes) {}

    int64_t slab_bytes() const { return slab_bytes_; }

    // A block of len bytes (1 <= len <= slab_bytes) in a slab that has room,
    // or nullptr if none has (the caller then adds a slab).
    char *take(int64_t len) {
        auto it = by_size_.lower_bound({len, 0});
        if (it == by_size_.end()) return nullptr;
        const int64_t flen = it->first;
        const uintptr_t addr = it->second;
        by_size_.erase(it);
        auto sit = std::prev(slabs_.upper_bound(addr));
        Slab &slab = sit->second;
        const int64_t off = int64_t(addr - sit->first);
        slab.free.erase(off);
        if (flen > len) {
            slab.free.emplace(off + len, flen - len);
            by_size_.insert({flen - len, addr + uintptr_t(len)});
        }
        slab.live += len;
        live_.emplace(addr, len);
        live_bytes_ += len;
        return reinterpret_cast<char *>(addr);
    }

    // A new, empty slab [base, base + slab_bytes).
    void add_slab(char *base) {
        const auto b = reinterpret_cast<uintptr_t>(base);
        Slab slab;
        slab.free.emplace(0, slab_bytes_);
        slabs_.emplace(b, std::move(slab));
        by_size_.insert({slab_bytes_, b});
    }

    // Returns the block that starts at p; throws if none does. True if its
    // slab holds no block now.
    bool give(const void *p) {
        const auto addr = reinterpret_cast<uintptr_t>(p);
        auto lit = live_.find(addr);
        require(lit != live_.end(), "pointer was not allocated by this pager");
        int64_t len = lit->second;
        live_.erase(lit);
        live_bytes_ -= len;
        auto sit = std::prev(slabs_.upper_bound(addr));
        Slab &slab = sit->second;
        slab.live -= len;
        int64_t off = int64_t(addr - sit->first);
        auto next = slab.free.lower_bound(off);
        if (next != slab.free.end() && off + len == next->first) {
            by_size_.erase({next->second, sit->first + uintptr_t(next->first)});
            len += next->second;
            next = slab.free.erase(next);
        }
        if (next != slab.free.begin()) {
            auto prev = std::prev(next);
            if (prev->first + prev->second == off) {
                by_size_.erase({prev->second, sit->first + uintptr_t(prev->first)});
                off = prev->first;
                len += prev->second;
                slab.free.erase(prev);
            }
        }
        slab.free.emplace(off, len);
        by_size_.insert({len, sit->first + uintptr_t(off)});
        return slab.live == 0;
    }

    // Forgets an empty slab (give() returned true for its last block).
    void remove_slab(const void *base) {
        auto sit = slabs_.find(reinterpret_cast<uintptr_t>(base));
        require(sit != slabs_.end() && sit->second.live == 0, "slab is not empty");
        by_size_.erase({slab_bytes_, sit->first});
        slabs_.erase(sit);
    }

    // The live block that contains p, or {nullptr, 0}.
    Block block_at(const void *p) const {
        const auto addr = reinterpret_cast<uintptr_t>(p);
        auto it = live_.upper_bound(addr);
        if (it == live_.begin()) return {nullptr, 0};
        --it;
        if (addr >= it->first + uintptr_t(it->second)) return {nullptr, 0};
        return {reinterpret_cast<char *>(it->first), it->second};
    }

    // The start of the slab that contains p, or nullptr.
    char *slab_of(const void *p) const {
        const auto addr = reinterpret_cast<uintptr_t>(p);
        auto it = slabs_.upper_bound(addr);
        if (it == slabs_.begin()) return nullptr;
        --it;
        return addr < it->first + uintptr_t(slab_bytes_) ? reinterpret_cast<char *>(it->first) : nullptr;
    }

    // f(p, len) for every free extent of every slab.
    template <class F>
    void for_each_free(F &&f) const {
        for (const auto &kv : slabs_)
            for (const auto &e : kv.second.free) f(reinterpret_cast<char *>(kv.first + uintptr_t(e.first)), e.second);
    }

    int64_t live_bytes() const { return live_bytes_; }
    int64_t live_blocks() const { return int64_t(live_.size()); }
    int64_t num_slabs() const { return int64_t(slabs_.size()); }
    std::vector<char *> slabs() const {
        std::vector<char *> v;
        for (const auto &kv : slabs_) v.push_back(reinterpret_cast<char *>(kv.first));
        return v;
    }

private:
    struct Slab {
        std::map<int64_t, int64_t> free;  // offset in the slab -> length of a free extent
        int64_t live = 0;                 // bytes of its blocks
    };
    const int64_t slab_bytes_;
    std::map<uintptr_t, Slab> slabs_;                   // by start address
    std::set<std::pair<int64_t, uintptr_t>> by_size_;  // every free extent: (length, address)
    std::map<uintptr_t, int64_t> live_;                 // block address -> length
    int64_t live_bytes_ = 0;
};

}  // namespace nf4core

#endif  // NF4CORE_SRC_PAGER_LRU_HPP
