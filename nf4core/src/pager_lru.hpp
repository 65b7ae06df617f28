// Residency bookkeeping of the pager's CUDA backend, apart from CUDA: which
// pages of which allocations are in the fast tier, least recently used first,
// and which contiguous runs of pages must move when a range is prefetched
// under a budget or evicted. The mover is a callback, so the policy compiles
// and is tested on the host (tests/test_pager_lru.cpp) while cuda/pager.cu
// gives it cudaMemPrefetchAsync. (The host backend keeps its own LRU, which
// also consults mincore.) Not thread-safe: the backend's mutex guards it.
#ifndef NF4CORE_SRC_PAGER_LRU_HPP
#define NF4CORE_SRC_PAGER_LRU_HPP

#include <algorithm>
#include <cstdint>
#include <functional>
#include <list>
#include <map>
#include <memory>
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

    PageLru(int64_t budget, int64_t page_bytes, Move move)
        : budget_(budget), page_bytes_(page_bytes), move_(std::move(move)) {}

    // A new allocation [base, base + len), all in the slow tier.
    void add(char *base, int64_t len) {
        auto a = std::make_unique<Allocation>();
        a->base = base;
        a->len = len;
        a->chunks.resize(size_t((len + page_bytes_ - 1) / page_bytes_));
        allocated_ += len;
        allocs_.emplace(reinterpret_cast<uintptr_t>(base), std::move(a));
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
        const int64_t start = static_cast<const char *>(ptr) - a.base;
        const int64_t c0 = start / page_bytes_, c1 = (start + nbytes - 1) / page_bytes_;
        std::vector<char> was(size_t(c1 - c0 + 1), 0);
        int64_t need = 0;
        for (int64_t i = c0; i <= c1; ++i) {
            Chunk &c = a.chunks[size_t(i)];
            if (c.resident) {
                was[size_t(i - c0)] = 1;
                lru_remove(c);
            }
            need += chunk_len(a, i);
        }
        try {
            if (budget_ >= 0)
                while (resident_ + need > budget_ && !lru_.empty()) {
                    const ChunkRef victim = lru_.front();
                    evict_range(*victim.alloc, victim.index, victim.index + 1);
                }
            int64_t run = -1;
            for (int64_t i = c0; i <= c1 + 1; ++i) {
                const bool missing = i <= c1 && !was[size_t(i - c0)];
                if (missing && run < 0) run = i;
                if (!missing && run >= 0) {
                    move(a, run, i, true);
                    page_ins_ += i - run;
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

    // Moves the pages covering [ptr, ptr + nbytes) to the slow tier, all of
    // them (pages may have gone to the fast tier without the pager, by faults);
    // page_outs counts those the pager had there.
    void evict(const void *ptr, int64_t nbytes) {
        Allocation &a = find(ptr, nbytes);
        if (nbytes == 0) return;
        const int64_t start = static_cast<const char *>(ptr) - a.base;
        evict_range(a, start / page_bytes_, (start + nbytes - 1) / page_bytes_ + 1);
    }

    void evict_all() {
        for (auto &kv : allocs_) evict_range(*kv.second, 0, int64_t(kv.second->chunks.size()));
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
        std::vector<Chunk> chunks;
    };

    Allocation &find(const void *ptr, int64_t nbytes) {
        return find_allocation(allocs_, ptr, nbytes, [](const Allocation &a) { return a.len; });
    }

    int64_t chunk_len(const Allocation &a, int64_t i) const { return std::min(page_bytes_, a.len - i * page_bytes_); }

    void move(const Allocation &a, int64_t i0, int64_t i1, bool to_fast) {
        const int64_t off = i0 * page_bytes_;
        const int64_t end = std::min(a.len, i1 * page_bytes_);
        if (end > off) move_(a.base + off, end - off, to_fast);
    }

    void evict_range(Allocation &a, int64_t i0, int64_t i1) {
        move(a, i0, i1, false);
        for (int64_t i = i0; i < i1; ++i) {
            Chunk &c = a.chunks[size_t(i)];
            if (!c.resident) continue;
            lru_remove(c);
            ++page_outs_;
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
    std::map<uintptr_t, std::unique_ptr<Allocation>> allocs_;
    Lru lru_;
    int64_t resident_ = 0, allocated_ = 0, page_ins_ = 0, page_outs_ = 0;
};

}  // namespace nf4core

#endif  // NF4CORE_SRC_PAGER_LRU_HPP
