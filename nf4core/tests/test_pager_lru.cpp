// The residency policy of the pager's CUDA backend (src/pager_lru.hpp), on
// the host: the moves it asks for are recorded and replayed onto a map of
// which bytes are in the fast tier, and compared with (1) its own counters,
// (2) an independent model of the documented policy (a plain vector in
// recency order), (3) hand-worked small cases. Budget, LRU order, coalesced
// runs, a range larger than the budget, explicit eviction, removal, argument
// errors, allocations paged in their own unit, and a mover that fails
// part-way. No GPU needed: cudaMemPrefetchAsync is what cuda/pager.cu plugs in
// as the mover. Also the host backend's SlabHeap (small allocations packed into
// slabs) against a map of which granules of which slab are taken.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "check.hpp"
#include "pager_lru.hpp"

using nf4core::PageLru;
using nf4core::SlabHeap;

namespace {

constexpr int64_t kGranule = 512;  // lengths below are multiples of this
constexpr int64_t kPage = 2048;    // page_bytes of the LRU under test

struct Move {
    int64_t off, len;
    bool to_fast;
};

struct Harness {
    std::vector<char> mem = std::vector<char>(size_t(1) << 20);
    std::vector<Move> log;
    std::vector<char> fast = std::vector<char>(mem.size() / kGranule, 0);  // replay of the moves
    int redundant_ins = 0;
    int fail_at = -1;  // the mover throws on this call (counting from 0)
    int calls = 0;

    PageLru::Move mover() {
        return [this](char *p, int64_t len, bool to_fast) {
            if (calls++ == fail_at) throw std::runtime_error("injected move failure");
            const int64_t off = p - mem.data();
            log.push_back({off, len, to_fast});
            for (int64_t g = off / kGranule; g < (off + len + kGranule - 1) / kGranule; ++g) {
                if (to_fast && fast[size_t(g)]) ++redundant_ins;
                fast[size_t(g)] = to_fast;
            }
        };
    }
    int64_t fast_bytes() const {
        int64_t n = 0;
        for (char f : fast) n += f;
        return n * kGranule;
    }
    bool all_fast(int64_t off, int64_t len) const {
        for (int64_t g = off / kGranule; g < (off + len + kGranule - 1) / kGranule; ++g)
            if (!fast[size_t(g)]) return false;
        return true;
    }
    bool none_fast(int64_t off, int64_t len) const {
        for (int64_t g = off / kGranule; g < (off + len + kGranule - 1) / kGranule; ++g)
            if (fast[size_t(g)]) return false;
        return true;
    }
};

// The documented policy, written plainly: chunks are (allocation, index).
struct Model {
    struct Alloc {
        int64_t off, len, unit = kPage;
    };
    std::vector<Alloc> allocs;
    std::vector<std::pair<int, int64_t>> order;  // resident chunks, least recently used first
    int64_t budget;

    int64_t unit(int a) const { return allocs[size_t(a)].unit; }
    int64_t clen(int a, int64_t i) const { return std::min(unit(a), allocs[size_t(a)].len - i * unit(a)); }
    int64_t resident() const {
        int64_t r = 0;
        for (auto &c : order) r += clen(c.first, c.second);
        return r;
    }
    void drop(int a, int64_t i) {
        order.erase(std::remove(order.begin(), order.end(), std::make_pair(a, i)), order.end());
    }
    void prefetch(int a, int64_t start, int64_t n) {
        const int64_t c0 = start / unit(a), c1 = (start + n - 1) / unit(a);
        int64_t need = 0;
        for (int64_t i = c0; i <= c1; ++i) {
            drop(a, i);
            need += clen(a, i);
        }
        while (budget >= 0 && resident() + need > budget && !order.empty()) order.erase(order.begin());
        for (int64_t i = c0; i <= c1; ++i) order.emplace_back(a, i);
    }
    void evict(int a, int64_t start, int64_t n) {
        for (int64_t i = start / unit(a); i <= (start + n - 1) / unit(a); ++i) drop(a, i);
    }
    // bytes of the model's resident chunks must be exactly the fast bytes
    bool matches(const Harness &h) const {
        std::vector<char> f(h.fast.size(), 0);
        for (auto &c : order) {
            const int64_t off = allocs[size_t(c.first)].off + c.second * unit(c.first);
            for (int64_t g = off / kGranule; g < (off + clen(c.first, c.second)) / kGranule; ++g) f[size_t(g)] = 1;
        }
        return f == h.fast;
    }
};

}  // namespace

TEST_CASE(hand_worked_sweep_under_budget) {
    // three allocations of 3 pages through a budget of 4 pages (the sweep of
    // test_cuda_pager.cpp and docs/pager.md)
    Harness h;
    PageLru lru(4 * kPage, kPage, h.mover());
    char *a[3];
    for (int k = 0; k < 3; ++k) {
        a[k] = h.mem.data() + k * 4 * kPage;  // gaps between allocations
        lru.add(a[k], 3 * kPage);
    }
    CHECK(lru.allocated_bytes() == 9 * kPage && lru.resident_bytes() == 0 && lru.num_allocations() == 3);
    lru.prefetch(a[0], 3 * kPage);
    CHECK(h.log.size() == 1 && h.log[0].to_fast && h.log[0].len == 3 * kPage);  // one coalesced move
    lru.prefetch(a[1], 3 * kPage);  // evicts a0's pages 0 and 1 (least recent first), keeps its page 2
    CHECK(h.none_fast(0, 2 * kPage) && h.all_fast(2 * kPage, kPage));
    CHECK(lru.resident_bytes() == 4 * kPage && h.fast_bytes() == 4 * kPage);
    lru.prefetch(a[2], 3 * kPage);  // evicts a0 page 2, a1 pages 0 and 1
    CHECK(h.none_fast(0, 3 * kPage) && h.none_fast(4 * kPage, 2 * kPage) && h.all_fast(6 * kPage, kPage));
    CHECK(lru.page_ins() == 9 && lru.page_outs() == 5);
    // re-prefetching a resident range moves nothing and makes it most recent
    const size_t before = h.log.size();
    lru.prefetch(a[2] + 10, 100);
    CHECK(h.log.size() == before);
    lru.prefetch(a[0], kPage);  // evicts a1 page 2 (least recent), not a2 page 0
    CHECK(h.none_fast(6 * kPage, kPage) && h.all_fast(8 * kPage, 3 * kPage) && h.all_fast(0, kPage));
    CHECK(h.redundant_ins == 0);
}

TEST_CASE(range_larger_than_budget_stays_whole) {
    Harness h;
    PageLru lru(2 * kPage, kPage, h.mover());
    char *small = h.mem.data(), *big = h.mem.data() + 8 * kPage;
    lru.add(small, kPage);
    lru.add(big, 5 * kPage + kGranule);  // a short last page
    lru.prefetch(small, 1);
    lru.prefetch(big, 5 * kPage + kGranule);
    CHECK(lru.resident_bytes() == 5 * kPage + kGranule && h.fast_bytes() == lru.resident_bytes());
    CHECK(h.none_fast(0, kPage));  // everything else went
    CHECK(h.log.back().len == 5 * kPage + kGranule);  // one move, ending at the allocation's end
    // unlimited budget: nothing is ever evicted by a prefetch
    Harness u;
    PageLru un(-1, kPage, u.mover());
    un.add(u.mem.data(), 64 * kPage);
    for (int64_t i = 0; i < 64; ++i) un.prefetch(u.mem.data() + i * kPage, kPage);
    CHECK(un.resident_bytes() == 64 * kPage && un.page_outs() == 0);
}

TEST_CASE(explicit_evict_moves_whole_range_and_counts_resident_pages) {
    Harness h;
    PageLru lru(-1, kPage, h.mover());
    char *a = h.mem.data();
    lru.add(a, 6 * kPage);
    lru.prefetch(a + kPage, 2 * kPage);  // pages 1, 2
    lru.evict(a + 10, 4 * kPage);        // pages 0..4: one move of all five
    CHECK(h.log.back().off == 0 && h.log.back().len == 5 * kPage && !h.log.back().to_fast);
    CHECK(lru.page_outs() == 2 && lru.resident_bytes() == 0);
    lru.prefetch(a, 6 * kPage);
    lru.evict_all();
    CHECK(lru.resident_bytes() == 0 && h.fast_bytes() == 0 && lru.page_outs() == 8);
    lru.evict(a, 0);  // no-op
    lru.prefetch(a, 0);
    CHECK(lru.resident_bytes() == 0);
}

TEST_CASE(argument_errors) {
    Harness h;
    PageLru lru(-1, kPage, h.mover());
    char *a = h.mem.data() + kPage;
    lru.add(a, 2 * kPage);
    auto status_of = [](auto &&f) {
        try {
            f();
        } catch (const nf4core::Error &e) {
            return std::make_pair(e.status(), std::string(e.what()));
        }
        return std::make_pair(NF4_OK, std::string());
    };
    auto r = status_of([&] { lru.prefetch(a + kPage, 2 * kPage); });
    CHECK(r.first == NF4_ERROR_INVALID_ARGUMENT && r.second.find("runs past the end") != std::string::npos);
    r = status_of([&] { lru.prefetch(h.mem.data(), 4); });  // before the allocation
    CHECK(r.first == NF4_ERROR_INVALID_ARGUMENT && r.second.find("not lie in memory") != std::string::npos);
    r = status_of([&] { lru.prefetch(a + 2 * kPage, 4); });  // just after it
    CHECK(r.first == NF4_ERROR_INVALID_ARGUMENT);
    r = status_of([&] { lru.evict(nullptr, 4); });
    CHECK(r.first == NF4_ERROR_INVALID_ARGUMENT);
    r = status_of([&] { lru.remove(a + 8); });
    CHECK(r.first == NF4_ERROR_INVALID_ARGUMENT && r.second.find("not allocated by this pager") != std::string::npos);
    CHECK(h.log.empty());
    lru.remove(a);
    CHECK(lru.num_allocations() == 0 && lru.allocated_bytes() == 0);
}

TEST_CASE(failed_move_keeps_bookkeeping_true) {
    Harness h;
    PageLru lru(3 * kPage, kPage, h.mover());
    char *a = h.mem.data(), *b = h.mem.data() + 8 * kPage;
    lru.add(a, 3 * kPage);
    lru.add(b, 3 * kPage);
    lru.prefetch(a, 3 * kPage);
    lru.prefetch(b, kPage);  // evicts a page 0
    h.fail_at = h.calls + 2;  // both evictions go through, the move in fails
    bool threw = false;
    try {
        lru.prefetch(b, 3 * kPage);  // b page 0 resident; evicts a pages 1, 2; moving in b 1..2 fails
    } catch (const std::runtime_error &) {
        threw = true;
    }
    CHECK(threw);
    CHECK(lru.resident_bytes() == h.fast_bytes());
    CHECK(h.all_fast(8 * kPage, kPage));  // b page 0 was resident and still is
    CHECK(lru.resident_bytes() == kPage && lru.page_outs() == 3);
    h.fail_at = -1;
    lru.prefetch(b, 3 * kPage);
    CHECK(lru.resident_bytes() == 3 * kPage && h.all_fast(8 * kPage, 3 * kPage) && h.fast_bytes() == 3 * kPage);
}

TEST_CASE(random_operations_match_the_model) {
    std::mt19937_64 rng(7);
    for (int64_t budget : {int64_t(-1), int64_t(0), kPage, 5 * kPage, 5 * kPage + kGranule, 17 * kPage}) {
        Harness h;
        PageLru lru(budget, kPage, h.mover());
        Model m;
        m.budget = budget;
        int64_t next = 0;
        for (int k = 0; k < 6; ++k) {
            const int64_t len = kGranule * int64_t(1 + rng() % 40);  // up to 10 pages, odd tails
            const int64_t unit = k % 3 == 0 ? kGranule : kPage;        // two paged in their own, smaller unit
            m.allocs.push_back({next, len, unit});
            lru.add(h.mem.data() + next, len, unit == kPage ? 0 : unit);
            next += len + kGranule * int64_t(rng() % 3);
        }
        int mismatches = 0, over_budget = 0;
        for (int op = 0; op < 3000; ++op) {
            const int a = int(rng() % m.allocs.size());
            const int64_t len = m.allocs[size_t(a)].len;
            const int64_t start = int64_t(rng() % uint64_t(len));
            const int64_t n = 1 + int64_t(rng() % uint64_t(len - start));
            char *p = h.mem.data() + m.allocs[size_t(a)].off + start;
            const int kind = int(rng() % 10);
            if (kind < 8) {
                lru.prefetch(p, n);
                m.prefetch(a, start, n);
                const int64_t c0 = start / m.unit(a), c1 = (start + n - 1) / m.unit(a);
                int64_t range = 0;
                for (int64_t i = c0; i <= c1; ++i) range += m.clen(a, i);
                over_budget += budget >= 0 && lru.resident_bytes() > std::max(budget, range);
                mismatches += !h.all_fast(m.allocs[size_t(a)].off + c0 * m.unit(a), range);
            } else if (kind == 8) {
                lru.evict(p, n);
                m.evict(a, start, n);
            } else {
                lru.evict_all();
                m.order.clear();
            }
            mismatches += lru.resident_bytes() != h.fast_bytes();
            mismatches += lru.resident_bytes() != m.resident();
            mismatches += !m.matches(h);
        }
        CHECK_MSG(mismatches == 0 && over_budget == 0, "budget %lld: %d mismatches, %d over budget",
                  (long long)budget, mismatches, over_budget);
        CHECK(h.redundant_ins == 0);
        CHECK(lru.page_ins() > 0 && (budget < 0 || budget > 30 * kPage || lru.page_outs() > 0));
    }
}

TEST_CASE(an_allocation_paged_in_its_own_unit) {
    // a slab of small allocations is paged in units of kGranule, beside an
    // allocation paged in kPage: a one-byte prefetch moves one unit, the budget
    // counts units, and page-ins count units
    Harness h;
    PageLru lru(2 * kGranule, kPage, h.mover());
    char *slab = h.mem.data(), *big = h.mem.data() + 16 * kPage;
    lru.add(slab, 8 * kGranule, kGranule);
    lru.add(big, 2 * kPage);
    lru.prefetch(slab + 3 * kGranule + 5, 1);
    CHECK(h.log.size() == 1 && h.log[0].off == 3 * kGranule && h.log[0].len == kGranule);
    lru.prefetch(slab + kGranule, 2 * kGranule);  // units 1 and 2, over a budget of 2 units: unit 3 goes
    CHECK(h.all_fast(kGranule, 2 * kGranule) && h.none_fast(3 * kGranule, kGranule));
    CHECK(lru.page_ins() == 3 && lru.page_outs() == 1 && lru.resident_bytes() == 2 * kGranule);
    lru.prefetch(big, 1);  // a whole kPage: more than the budget, kept; the slab's units go
    CHECK(h.fast_bytes() == kPage && lru.resident_bytes() == kPage && lru.page_outs() == 3);
    lru.evict(slab + 7 * kGranule, kGranule);  // nothing resident there: moved, not counted
    CHECK(lru.page_outs() == 3 && h.log.back().off == 7 * kGranule && h.log.back().len == kGranule);
    CHECK(lru.allocated_bytes() == 8 * kGranule + 2 * kPage);
}

namespace {

// The SlabHeap's contract, written plainly: which granules of each slab are
// taken. Free extents are the maximal runs of free granules within a slab.
struct SlabModel {
    int64_t granules;  // per slab
    std::vector<int64_t> bases;                   // offsets into the harness memory, by address
    std::vector<std::vector<int>> owner;          // per slab, per granule: block id + 1, 0 = free
    struct Run {
        int64_t off, len;  // in bytes from mem
    };
    std::vector<Run> runs() const {
        std::vector<Run> r;
        for (size_t s = 0; s < bases.size(); ++s)
            for (int64_t g = 0; g < granules;) {
                if (owner[s][size_t(g)]) {
                    ++g;
                    continue;
                }
                int64_t e = g;
                while (e < granules && !owner[s][size_t(e)]) ++e;
                r.push_back({bases[s] + g * kGranule, (e - g) * kGranule});
                g = e;
            }
        return r;
    }
};

}  // namespace

TEST_CASE(slab_heap_matches_a_model) {
    // Random takes and gives of 1 to 6 granules in slabs of 16, some slabs
    // adjacent in memory (free extents must not merge across them). After each
    // step: best fit among the maximal free runs (smallest that fits, lowest
    // address), the free extents are exactly those runs, lookups agree, and a
    // slab is reported empty exactly when its last block goes.
    constexpr int64_t kSlabGranules = 16, kSlabBytes = kSlabGranules * kGranule;
    std::mt19937_64 rng(11);
    Harness h;
    SlabHeap heap(kSlabBytes);
    SlabModel m{kSlabGranules, {}, {}};
    std::vector<std::pair<int64_t, int64_t>> live;  // (offset from mem, length)
    int64_t next_slab = 0;
    int next_id = 1, bad = 0, slabs_added = 0, slabs_emptied = 0;
    auto slab_index = [&](int64_t off) {
        for (size_t s = 0; s < m.bases.size(); ++s)
            if (off >= m.bases[s] && off < m.bases[s] + kSlabBytes) return int(s);
        return -1;
    };
    for (int step = 0; step < 4000; ++step) {
        if (live.empty() || rng() % 100 < 55) {
            const int64_t len = kGranule * int64_t(1 + rng() % 6);
            const auto runs = m.runs();
            const SlabModel::Run *best = nullptr;
            for (const auto &r : runs)
                if (r.len >= len && (!best || r.len < best->len || (r.len == best->len && r.off < best->off)))
                    best = &r;
            char *p = heap.take(len);
            if (!best) {
                bad += p != nullptr;
                // a new slab: every third one right after the previous (touching), else after a gap
                const int64_t base = next_slab;
                next_slab += kSlabBytes + (slabs_added % 3 == 2 ? 0 : kGranule * int64_t(1 + rng() % 3));
                ++slabs_added;
                heap.add_slab(h.mem.data() + base);
                const auto pos = std::lower_bound(m.bases.begin(), m.bases.end(), base) - m.bases.begin();
                m.bases.insert(m.bases.begin() + pos, base);
                m.owner.insert(m.owner.begin() + pos, std::vector<int>(size_t(kSlabGranules), 0));
                p = heap.take(len);
                bad += p != h.mem.data() + base;  // the only run that fits
            } else {
                bad += p != h.mem.data() + best->off;
            }
            if (!p) continue;
            const int64_t off = p - h.mem.data();
            const int s = slab_index(off);
            if (s < 0 || off + len > m.bases[size_t(s)] + kSlabBytes) {
                ++bad;
                continue;
            }
            for (int64_t g = (off - m.bases[size_t(s)]) / kGranule; g < (off + len - m.bases[size_t(s)]) / kGranule; ++g) {
                bad += m.owner[size_t(s)][size_t(g)] != 0;
                m.owner[size_t(s)][size_t(g)] = next_id;
            }
            ++next_id;
            live.emplace_back(off, len);
        } else {
            const size_t k = size_t(rng() % live.size());
            const auto [off, len] = live[k];
            live.erase(live.begin() + std::ptrdiff_t(k));
            const int s = slab_index(off);
            for (int64_t g = (off - m.bases[size_t(s)]) / kGranule; g < (off + len - m.bases[size_t(s)]) / kGranule; ++g)
                m.owner[size_t(s)][size_t(g)] = 0;
            const bool empty = std::all_of(m.owner[size_t(s)].begin(), m.owner[size_t(s)].end(), [](int o) { return !o; });
            bad += heap.give(h.mem.data() + off) != empty;
            if (empty && rng() % 2) {  // the backend releases it; an empty slab may also stay
                heap.remove_slab(h.mem.data() + m.bases[size_t(s)]);
                m.bases.erase(m.bases.begin() + s);
                m.owner.erase(m.owner.begin() + s);
                ++slabs_emptied;
            }
        }
        // the free extents are the model's maximal runs, and everything adds up
        std::vector<std::pair<int64_t, int64_t>> extents, want;
        heap.for_each_free([&](char *p, int64_t len) { extents.emplace_back(p - h.mem.data(), len); });
        for (const auto &r : m.runs()) want.emplace_back(r.off, r.len);
        std::sort(extents.begin(), extents.end());
        bad += extents != want;
        int64_t live_bytes = 0;
        for (const auto &b : live) live_bytes += b.second;
        bad += heap.live_bytes() != live_bytes || heap.live_blocks() != int64_t(live.size());
        bad += heap.num_slabs() != int64_t(m.bases.size());
        // lookups at random addresses
        for (int q = 0; q < 4; ++q) {
            const int64_t off = int64_t(rng() % uint64_t(next_slab + kSlabBytes));
            const int s = slab_index(off);
            bad += heap.slab_of(h.mem.data() + off) != (s < 0 ? nullptr : h.mem.data() + m.bases[size_t(s)]);
            const SlabHeap::Block b = heap.block_at(h.mem.data() + off);
            const auto it = std::find_if(live.begin(), live.end(),
                                         [&](const auto &x) { return off >= x.first && off < x.first + x.second; });
            if (it == live.end())
                bad += b.base != nullptr;
            else
                bad += b.base != h.mem.data() + it->first || b.len != it->second;
        }
    }
    CHECK_MSG(bad == 0, "%d disagreements with the model", bad);
    CHECK(slabs_added > 3 && slabs_emptied > 0);  // the walk did exercise growth and release
    // giving back what is not a block's start is refused
    if (!live.empty()) {
        bool threw = false;
        try {
            heap.give(h.mem.data() + live[0].first + 1);
        } catch (const nf4core::Error &e) {
            threw = e.status() == NF4_ERROR_INVALID_ARGUMENT;
        }
        CHECK(threw);
    }
}

int main() { return check::run_all(); }
