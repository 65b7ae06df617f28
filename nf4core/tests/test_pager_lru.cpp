// The residency policy of the pager's CUDA backend (src/pager_lru.hpp), on
// the host: the moves it asks for are recorded and replayed onto a map of
// which bytes are in the fast tier, and compared with (1) its own counters,
// (2) an independent model of the documented policy (a plain vector in
// recency order), (3) hand-worked small cases. Budget, LRU order, coalesced
// runs, a range larger than the budget, explicit eviction, removal, argument
// errors, and a mover that fails part-way. No GPU needed: cudaMemPrefetchAsync
// is what cuda/pager.cu plugs in as the mover.
#include <algorithm>
#include <cstdint>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "check.hpp"
#include "pager_lru.hpp"

using nf4core::PageLru;

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
        int64_t off, len;
    };
    std::vector<Alloc> allocs;
    std::vector<std::pair<int, int64_t>> order;  // resident chunks, least recently used first
    int64_t budget;

    int64_t clen(int a, int64_t i) const { return std::min(kPage, allocs[size_t(a)].len - i * kPage); }
    int64_t resident() const {
        int64_t r = 0;
        for (auto &c : order) r += clen(c.first, c.second);
        return r;
    }
    void drop(int a, int64_t i) {
        order.erase(std::remove(order.begin(), order.end(), std::make_pair(a, i)), order.end());
    }
    void prefetch(int a, int64_t start, int64_t n) {
        const int64_t c0 = start / kPage, c1 = (start + n - 1) / kPage;
        int64_t need = 0;
        for (int64_t i = c0; i <= c1; ++i) {
            drop(a, i);
            need += clen(a, i);
        }
        while (budget >= 0 && resident() + need > budget && !order.empty()) order.erase(order.begin());
        for (int64_t i = c0; i <= c1; ++i) order.emplace_back(a, i);
    }
    void evict(int a, int64_t start, int64_t n) {
        for (int64_t i = start / kPage; i <= (start + n - 1) / kPage; ++i) drop(a, i);
    }
    // bytes of the model's resident chunks must be exactly the fast bytes
    bool matches(const Harness &h) const {
        std::vector<char> f(h.fast.size(), 0);
        for (auto &c : order) {
            const int64_t off = allocs[size_t(c.first)].off + c.second * kPage;
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
            m.allocs.push_back({next, len});
            lru.add(h.mem.data() + next, len);
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
                const int64_t c0 = start / kPage, c1 = (start + n - 1) / kPage;
                int64_t range = 0;
                for (int64_t i = c0; i <= c1; ++i) range += m.clen(a, i);
                over_budget += budget >= 0 && lru.resident_bytes() > std::max(budget, range);
                mismatches += !h.all_fast(m.allocs[size_t(a)].off + c0 * kPage, range);
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

int main() { return check::run_all(); }
