// AMX-BF16 products with a 4-bit matrix, for many rows of bfloat16 x (training).
//
// Both products are tile GEMMs (TDPBF16PS: bfloat16 pairs, float32 sums) in
// which one operand is a *panel* of W: up to 64 steps of 32 values of the inner
// dimension for a range of outputs, decoded into bfloat16 tiles in a per-thread
// buffer of about 1 MiB (L2) and used for every row of x (up to kMaxRows) before
// the next. Only a panel of W is ever dense; its values are those of
// dequantize(q, bfloat16), codebook x block scale rounded to nearest even, as the
// tiled path that hands decoded tiles to torch's GEMM multiplies by. The next
// panel is decoded on the vector units between the tile steps of the current
// one (two buffers), so the decode overlaps the tile unit's work.
//
//   y = x W^T (M x N): C'[n, m] = sum_k W[n, k] x[m, k]. The A tiles are
//       16 rows of W x 32 k, in W's own row order (so the decode is the plain
//       one); the B tiles are x in AMX's pair layout (k pairs as rows, 16 rows
//       of x as 32-bit columns), a 16 x 16 transpose of 32-bit pairs done once
//       per call; each C tile is transposed back into y.
//   y = x W (M x K):   C[m, k] = sum_n x[m, n] W[n, k]. The A tiles are x as it
//       is (16 rows x 32 n); the B tiles are pairs of rows of W interleaved
//       word by word (row 2r and 2r + 1 of a 32-row step give tile row r).
//
// Each thread computes 2 x 2 C tiles at a time (8 tile registers: 2 A, 2 B,
// 4 C) over a panel's steps; float32 sums carry over between panels of the same
// outputs in a per-thread buffer. Needs K % 32 == 0 (every 32-value chunk of a
// row then lies inside one block, blocksize >= 32); x is packed kMaxRows rows
// at a time, padded to whole tiles with zeros. Measured on a 2-core Xeon with
// AMX (docs/performance.md): within a few percent of torch's bf16 GEMM (oneDNN)
// on the dense weight, forward + grad_input at M = 1024.
#include <cpuid.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "matmul.hpp"
#include "parallel.hpp"
#include "simd_avx512.hpp"

namespace nf4core {
namespace {

constexpr int64_t kRows = 16;             // rows of every tile
constexpr int64_t kCols = 32;             // bfloat16 values per tile row (64 bytes)
constexpr int64_t kTile = kRows * kCols;  // bfloat16 values per tile
constexpr int64_t kPanelBytes = 1 << 20;  // decoded W per panel chunk (per thread, L2-resident)
constexpr int64_t kMaxRows = 1024;        // rows of x packed at a time
constexpr int64_t kChunkSteps = 64;       // 32-value steps of the inner dimension per chunk

struct alignas(64) TileConfig {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

// Eight 16 x 64-byte tiles: 0-3 accumulate, 4-5 hold A, 6-7 hold B.
void configure_tiles() {
    TileConfig cfg{};
    cfg.palette = 1;
    for (int t = 0; t < 8; ++t) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = kRows;
    }
    _tile_loadconfig(&cfg);
}

// A 64-byte aligned, reused buffer of uint16 (bfloat16 bits).
struct Buffer {
    std::unique_ptr<uint16_t, decltype(&std::free)> data{nullptr, &std::free};
    size_t size = 0;
    uint16_t *get(size_t n) {
        if (n > size) {
            const size_t bytes = (n * sizeof(uint16_t) + 63) / 64 * 64;
            data.reset(static_cast<uint16_t *>(std::aligned_alloc(64, bytes)));
            if (!data) throw std::bad_alloc();
            size = n;
        }
        return data.get();
    }
};

// Stores the first `count` of 16 floats as bfloat16.
inline void store_bf16(uint16_t *dst, __m512 v, int count) {
    using L = avx512::Lanes<bfloat16_t>;
    bfloat16_t *p = reinterpret_cast<bfloat16_t *>(dst);
    if (count >= 16)
        L::store(p, L::pack(v));
    else
        L::store(p, L::pack(v), avx512::lanes_mask(count));
}

// The 16 codebook values times `scale`, as bfloat16, twice (32 words): vpermw
// reads 5 index bits.
inline __m512i scaled_table(__m512 codebook, float scale) {
    const __m256i h = avx512::Lanes<bfloat16_t>::pack(_mm512_mul_ps(codebook, _mm512_set1_ps(scale)));
    return _mm512_inserti64x4(_mm512_castsi256_si512(h), h, 1);
}

// Decodes 32-value chunks of one row of W, keeping the current block's table.
struct RowDecoder {
    const MatmulArgs *a = nullptr;
    __m512 codebook = _mm512_setzero_ps();
    int shift = 0;
    int64_t block = -1;
    __m512i table = _mm512_setzero_si512();

    static RowDecoder of(const MatmulArgs &args) {
        return {&args, _mm512_loadu_ps(args.codebook), __builtin_ctzll(uint64_t(args.blocksize))};
    }

    // W[n, k .. k + 32) as bfloat16 bits; (n K + k) % 32 == 0
    __m512i operator()(int64_t n, int64_t k) {
        const int64_t i = n * a->K + k;
        if ((i >> shift) != block) {
            block = i >> shift;
            table = scaled_table(codebook, a->scales[block]);
        }
        // 16 bytes -> words, each duplicated; the even element is the high nibble
        const __m512i dup = _mm512_set_epi16(15, 15, 14, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8, 7, 7, 6,
                                             6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i *>(a->packed + i / 2));
        const __m512i words = _mm512_permutexvar_epi16(dup, _mm512_castsi256_si512(_mm256_cvtepu8_epi16(bytes)));
        return _mm512_permutexvar_epi16(_mm512_srlv_epi16(words, _mm512_set1_epi32(4)), table);
    }
};

// In-place transpose of a 16 x 16 matrix of 32-bit values (one row per
// register): four rounds of interleaving row i with row i + 8.
inline void transpose16(__m512i r[16]) {
    const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    for (int round = 0; round < 4; ++round) {
        __m512i t[16];
        for (int i = 0; i < 8; ++i) {
            t[2 * i] = _mm512_permutex2var_epi32(r[i], lo, r[i + 8]);
            t[2 * i + 1] = _mm512_permutex2var_epi32(r[i], hi, r[i + 8]);
        }
        for (int i = 0; i < 16; ++i) r[i] = t[i];
    }
}

// c[0..3] (+)= A_i B_j over `steps` tile pairs: c[0] = A0 B0, c[1] = A1 B0,
// c[2] = A0 B1, c[3] = A1 B1 (16 x 16 float32 each, consecutive); the tiles of
// each operand are consecutive. Starts from c's values if `accumulate`, else 0.
template <class F>
inline void tiles_2x2(const uint16_t *a0, const uint16_t *a1, const uint16_t *b0, const uint16_t *b1,
                      int64_t steps, float *c, bool accumulate, F &&between) {
    if (accumulate) {
        _tile_loadd(0, c, 64);
        _tile_loadd(1, c + 256, 64);
        _tile_loadd(2, c + 512, 64);
        _tile_loadd(3, c + 768, 64);
    } else {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
    }
    for (int64_t s = 0; s < steps; ++s) {
        _tile_loadd(4, a0 + s * kTile, 64);
        _tile_loadd(6, b0 + s * kTile, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_loadd(5, a1 + s * kTile, 64);
        _tile_dpbf16ps(1, 5, 6);
        _tile_loadd(7, b1 + s * kTile, 64);
        _tile_dpbf16ps(2, 4, 7);
        _tile_dpbf16ps(3, 5, 7);
        between();  // vector work that overlaps the tile unit's
    }
    _tile_stored(0, c, 64);
    _tile_stored(1, c + 256, 64);
    _tile_stored(2, c + 512, 64);
    _tile_stored(3, c + 768, 64);
}

// Rows [m0, m0 + rows) of x (M x inner bfloat16) as tiles of 16 rows x 32
// values, row-major (the A operand of y = x W): out[(t S + s) 512 + r 32 + e] =
// x[m0 + 16 t + r, 32 s + e], zero outside x. `tiles` is even.
void pack_rows(const uint16_t *x, int64_t inner, int64_t m0, int64_t rows, int64_t tiles, uint16_t *out) {
    const int64_t S = (inner + kCols - 1) / kCols;
    parallel_for(tiles, 2, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t)
            for (int64_t s = 0; s < S; ++s)
                for (int64_t r = 0; r < kRows; ++r) {
                    uint16_t *dst = out + (t * S + s) * kTile + r * kCols;
                    const int64_t m = t * kRows + r, c = s * kCols, n = std::min<int64_t>(kCols, inner - c);
                    if (m >= rows) {
                        _mm512_store_si512(dst, _mm512_setzero_si512());
                    } else {
                        const __mmask32 mask = n >= 32 ? ~__mmask32(0) : __mmask32((1u << n) - 1);
                        _mm512_store_si512(dst, _mm512_maskz_loadu_epi16(mask, x + (m0 + m) * inner + c));
                    }
                }
    });
}

// Rows [m0, m0 + rows) of x (M x K bfloat16, K % 32 == 0) in AMX's pair layout
// (the B operand of y = x W^T): out[(t S + s) 512 + r 32 + 2 j + e] =
// x[m0 + 16 t + j, 32 s + 2 r + e], zero outside x. `tiles` is even.
void pack_pairs(const uint16_t *x, int64_t K, int64_t m0, int64_t rows, int64_t tiles, uint16_t *out) {
    const int64_t S = K / kCols;
    parallel_for(tiles, 2, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t)
            for (int64_t s = 0; s < S; ++s) {
                __m512i r[16];
                for (int j = 0; j < 16; ++j) {
                    const int64_t m = t * kRows + j;
                    r[j] = m < rows ? _mm512_loadu_si512(x + (m0 + m) * K + s * kCols) : _mm512_setzero_si512();
                }
                transpose16(r);
                uint16_t *dst = out + (t * S + s) * kTile;
                for (int j = 0; j < 16; ++j) _mm512_store_si512(dst + j * kCols, r[j]);
            }
    });
}

// The tile GEMM shared by both products. The inner dimension (S steps of 32)
// is cut into chunks of at most kChunkSteps; the outputs into panels of `width`
// (a multiple of 32: rows of W for x W^T, columns for x W), each decoded chunk
// of a panel (about kPanelBytes) used for all rows of x before the next. Sums
// are kept in float32 between chunks in a per-thread buffer. P provides
//   decode(wp, lo, hi, s0, s1): panel outputs [lo, hi), steps [s0, s1) into wp
//       as tiles of (s1 - s0) steps, tile u at wp + u (s1 - s0) 512;
//   x_is_a: x is the A operand (x W) or B (x W^T);
//   store(c, t, u, lo): writes C tile c of x tile t and panel tile u (panel at lo).
template <class P>
void tile_product(const P &policy, int64_t outputs, int64_t S, const uint16_t *xp, int64_t mt) {
    const int64_t chunks = (S + kChunkSteps - 1) / kChunkSteps;
    const int64_t steps = (S + chunks - 1) / chunks;
    int64_t width = std::max<int64_t>(32, kPanelBytes / (steps * kCols * 2) / 32 * 32);
    const int64_t want = int64_t(num_threads()) * 2;  // at least two panels per thread
    if ((outputs + width - 1) / width < want) width = std::max<int64_t>(32, ((outputs + want - 1) / want + 31) / 32 * 32);
    const int64_t panels = (outputs + width - 1) / width;
    parallel_for(panels, 1, [&](int64_t p0, int64_t p1) {
        thread_local Buffer panel_buf[2], sums_buf;
        uint16_t *wp[2] = {panel_buf[0].get(size_t(width * steps * kCols)),
                           panel_buf[1].get(size_t(width * steps * kCols))};
        float *sums = reinterpret_cast<float *>(sums_buf.get(size_t(mt * kRows * width * 2)));
        // jobs j = (panel, chunk) in order; the decode of job j + 1 runs between the tile steps of job j
        const int64_t per_panel = (S + steps - 1) / steps, jobs = (p1 - p0) * per_panel;
        auto cursor = [&](int64_t j) {
            const int64_t p = p0 + j / per_panel, s0 = (j % per_panel) * steps;
            const int64_t lo = p * width, hi = std::min(outputs, lo + width);
            return typename P::Cursor(policy, wp[j & 1], lo, hi, s0, std::min(S, s0 + steps));
        };
        configure_tiles();
        auto cur = cursor(0);
        cur.run(cur.total);
        for (int64_t j = 0; j < jobs; ++j) {
            const int64_t lo = cur.lo, hi = cur.hi, s0 = cur.s0, s1 = cur.s1, n = s1 - s0;
            const uint16_t *w = wp[j & 1];
            const int64_t wt = (hi - lo + 31) / 32 * 2;  // panel tiles, even
            auto next = j + 1 < jobs ? cursor(j + 1) : typename P::Cursor();
            const int64_t tile_steps = (mt / 2) * (wt / 2) * n;
            const int64_t per_step = (next.total + tile_steps - 1) / tile_steps;
            auto between = [&] { next.run(per_step); };
            for (int64_t t = 0; t < mt; t += 2)
                for (int64_t u = 0; u < wt; u += 2) {
                    float *c = sums + ((t / 2) * (wt / 2) + u / 2) * 4 * 256;
                    const uint16_t *x0 = xp + (t * S + s0) * kTile, *x1 = x0 + S * kTile;
                    const uint16_t *w0 = w + u * n * kTile, *w1 = w0 + n * kTile;
                    if (P::x_is_a)
                        tiles_2x2(x0, x1, w0, w1, n, c, s0 > 0, between);
                    else
                        tiles_2x2(w0, w1, x0, x1, n, c, s0 > 0, between);
                    if (s1 == S)
                        for (int q = 0; q < 4; ++q)
                            P::x_is_a ? policy.store(c + q * 256, t + q % 2, u + q / 2, lo)
                                      : policy.store(c + q * 256, t + q / 2, u + q % 2, lo);
                }
            next.run(next.total);  // what the steps left
            cur = next;
        }
        _tile_release();
    });
}

// Where a panel decode stands: panel outputs [lo, hi), inner steps [s0, s1) into
// wp; `total` units of work, `done` of them done (the policies' Cursor::run).
struct PanelCursor {
    uint16_t *wp = nullptr;
    int64_t lo = 0, hi = 0, s0 = 0, s1 = 0, total = 0, done = 0;
};

// y = x W^T: panels of rows of W as A tiles (16 rows x 32 k, W's own layout),
// x as B tiles (pack_pairs). C tiles are [n][m]: transposed into y.
struct Transposed {
    static constexpr bool x_is_a = false;
    const MatmulArgs &a;
    int64_t m0, rows;
    // Decodes panel rows [lo, hi) (padded to 32 with zeros), steps [s0, s1) of W into
    // wp[(tile n + s) 512 + r 32 + e] = W[lo + 16 tile + r, 32 (s0 + s) + e], a
    // 32-value chunk per unit, in pieces (run).
    struct Cursor : PanelCursor {
        int64_t i = 0, s = 0;
        RowDecoder dec{};
        Cursor() = default;
        Cursor(const Transposed &pol, uint16_t *w, int64_t l, int64_t h, int64_t a0, int64_t a1)
            : PanelCursor{w, l, h, a0, a1, (h - l + 31) / 32 * 32 * (a1 - a0), 0}, dec(RowDecoder::of(pol.a)) {}
        void run(int64_t count) {
            const int64_t n = s1 - s0, end = std::min(total, done + count);
            for (; done < end; ++done) {
                uint16_t *dst = wp + ((i / kRows) * n + s) * kTile + (i % kRows) * kCols;
                _mm512_store_si512(dst, lo + i < hi ? dec(lo + i, (s0 + s) * kCols) : _mm512_setzero_si512());
                if (++s == n) s = 0, ++i;
            }
        }
    };
    void store(const float *c, int64_t t, int64_t u, int64_t lo) const {
        const int64_t nbase = lo + u * kRows, mbase = t * kRows;
        const int count = int(std::min<int64_t>(16, a.N - nbase));
        if (count <= 0 || mbase >= rows) return;
        __m512i r[16];
        for (int i = 0; i < 16; ++i) r[i] = _mm512_load_si512(c + i * 16);
        transpose16(r);
        uint16_t *y = static_cast<uint16_t *>(a.y);
        for (int j = 0; j < 16 && mbase + j < rows; ++j)
            store_bf16(y + (m0 + mbase + j) * a.N + nbase, _mm512_castsi512_ps(r[j]), count);
    }
};

// y = x W: x as A tiles (pack_rows), panels of columns of W as B tiles: rows
// 2r and 2r + 1 of W's 32-row step interleaved word by word form tile row r.
struct Plain {
    static constexpr bool x_is_a = true;
    const MatmulArgs &a;
    int64_t m0, rows;
    // Decodes panel columns [lo, hi) (a multiple of 32 wide: K % 32 == 0), steps
    // [s0, s1) of W into wp[(tile n + s) 512 + r 32 + 2 j + e] =
    // W[32 (s0 + s) + 2 r + e, lo + 16 tile + j], two tile rows per unit, in pieces (run).
    struct Cursor : PanelCursor {
        int64_t N = 0, s = 0, r = 0, t = 0;
        RowDecoder even{}, odd{};
        Cursor() = default;
        Cursor(const Plain &pol, uint16_t *w, int64_t l, int64_t h, int64_t a0, int64_t a1)
            : PanelCursor{w, l, h, a0, a1, (a1 - a0) * kRows * ((h - l) / 32), 0}, N(pol.a.N),
              even(RowDecoder::of(pol.a)), odd(even) {}
        void run(int64_t count) {
            const __m512i even_lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                                     39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
            const __m512i even_hi = _mm512_set_epi16(63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57, 25, 56,
                                                     24, 55, 23, 54, 22, 53, 21, 52, 20, 51, 19, 50, 18, 49, 17, 48,
                                                     16);
            if (done >= total) return;
            const int64_t n = s1 - s0, tiles = (hi - lo) / kRows;
            const int64_t end = std::min(total, done + count);
            for (; done < end; ++done) {
                const int64_t row = (s0 + s) * kCols + 2 * r, k = lo + t * kRows;
                const __m512i e = row < N ? even(row, k) : _mm512_setzero_si512();
                const __m512i o = row + 1 < N ? odd(row + 1, k) : _mm512_setzero_si512();
                uint16_t *dst = wp + (t * n + s) * kTile + r * kCols;
                _mm512_store_si512(dst, _mm512_permutex2var_epi16(e, even_lo, o));
                _mm512_store_si512(dst + n * kTile, _mm512_permutex2var_epi16(e, even_hi, o));
                if ((t += 2) == tiles) {
                    t = 0;
                    if (++r == kRows) r = 0, ++s;
                }
            }
        }
    };
    void store(const float *c, int64_t t, int64_t u, int64_t lo) const {
        const int64_t mbase = t * kRows, kbase = lo + u * kRows;
        uint16_t *y = static_cast<uint16_t *>(a.y);
        for (int i = 0; i < 16 && mbase + i < rows; ++i)
            store_bf16(y + (m0 + mbase + i) * a.K + kbase, _mm512_load_ps(c + i * 16), 16);
    }
};

bool amx_supported() {
    unsigned eax, ebx, ecx, edx;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    if (!((edx >> 22) & 1) || !((edx >> 24) & 1)) return false;  // AMX-BF16, AMX-TILE
#if defined(__linux__) && defined(SYS_arch_prctl)
    constexpr int kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;  // asm/prctl.h
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
#else
    return false;
#endif
}

}  // namespace

bool amx_available() {
    static const bool ok = amx_supported();
    return ok;
}

bool amx_matmul_bf16(const MatmulArgs &a) {
    if (!amx_available() || a.K % kCols != 0) return false;
    const int64_t inner = a.transpose ? a.K : a.N;
    const uint16_t *x = static_cast<const uint16_t *>(a.x);
    thread_local Buffer packed_buf;
    for (int64_t m0 = 0; m0 < a.M; m0 += kMaxRows) {
        const int64_t rows = std::min(kMaxRows, a.M - m0);
        const int64_t mt = (rows + 31) / 32 * 2;  // tiles of 16 rows, even
        const int64_t S = (inner + kCols - 1) / kCols;
        uint16_t *xp = packed_buf.get(size_t(mt * S * kTile));
        if (a.transpose) {
            pack_pairs(x, a.K, m0, rows, mt, xp);
            tile_product(Transposed{a, m0, rows}, a.N, S, xp, mt);
        } else {
            pack_rows(x, a.N, m0, rows, mt, xp);
            tile_product(Plain{a, m0, rows}, a.K, S, xp, mt);
        }
    }
    return true;
}

}  // namespace nf4core
