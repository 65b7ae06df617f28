// The skeleton of the vector products with a 4-bit matrix, written once for
// matmul_avx2.cpp, matmul_avx512.cpp and matmul_neon.cpp; each ISA file
// instantiates it with an ops struct holding its vector type and inner blocks.
//
// x is taken in groups of up to 8 rows. For each group, P = kPlan.rows_of_w[R]
// rows of W are decoded together per pass and each decoded vector is used for all R
// rows of x, so the weight is streamed once and each x vector serves P rows of W:
//   y = x W^T: pass_transposed<K, R, P, T> (y[m0 + r, n .. n+P-1]);
//   y = x W:   pass_plain<K, R, P, T> adds sum_p x[m0 + r, n + p] W[n + p, c0:c1]
//              into per-thread float32 sums, stored to y at the end.
// The weights of a step are the codebook times the block scale (as
// decode_value rounds it), so only the order of the float32 sums differs from
// the reference.
// decode_tile writes a tile of W (float32 or bfloat16, bit-identical to the
// reference, NaN as to_bfloat16) with the ISA's TileStep over whole steps and
// numeric.hpp's scalar decode for the ends of each row.
//
// An ops struct K provides (V = K::Vec, the weights of one step, kStep of them;
// A, an accumulator, what broadcast returns: V itself except on NEON):
//   static constexpr PassPlan kPlan;  // P for R rows of x, prefetching
//   static Table load_table(const float *codebook);
//   template <int P> struct Weights {     // per pass: the block's scaled codebooks of P rows
//       explicit Weights(Table); void scale(const WRows<P> &, int64_t block);
//       V decode(int p, const uint8_t *packed) const;  // the step's weights of row p
//   };
//   template <int R, typename T> static X x_rows(const MatmulArgs &, int64_t m0);  // (XAsIs)
//   template <int R> static V load_x(const X *p);  // a step of x as x_rows laid it out, R rows
//   static A broadcast(float); static float sum(A);
//   static A fma(V x, V w, A acc); static V fma(A g, V w, V s);  // acc + x w, s + g w
//   template <typename T> static void put(T *y, const float *sums);  // kStep x W sums to y
//   template <typename T> struct TileStep {
//       static constexpr int kWidth; using Table;
//       explicit TileStep(const float *codebook);
//       Table table(float scale, bool may_be_nan) const;  // the codebook times a block scale
//                                                         // as the step reads it (simd.hpp)
//       void decode(T *dst, const uint8_t *packed, const Table &) const;  // kWidth weights of one block
//   };
// The sums of x W are a V in memory (kStep floats).
// The matmul kernels need K % 16 == 0 and K % blocksize == 0 (rows made of whole
// blocks; matmul.cpp falls back to the reference otherwise).
//
// Included only by the ISA translation units: internal linkage (numeric.hpp).
#ifndef NF4CORE_SRC_MATMUL_ROWS_HPP
#define NF4CORE_SRC_MATMUL_ROWS_HPP

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "matmul.hpp"
#include "numeric.hpp"

namespace nf4core {
namespace {

// f(std::integral_constant<int, R>{}, m0) on rows m0 .. m0+R-1 of x, R <= 8, so
// that each kernel is instantiated for R = 1..8 rows.
template <class F>
inline void for_row_groups(int64_t M, F &&f) {
    for (int64_t m0 = 0; m0 < M; m0 += 8) {
        switch (std::min<int64_t>(8, M - m0)) {
            case 1: f(std::integral_constant<int, 1>{}, m0); break;
            case 2: f(std::integral_constant<int, 2>{}, m0); break;
            case 3: f(std::integral_constant<int, 3>{}, m0); break;
            case 4: f(std::integral_constant<int, 4>{}, m0); break;
            case 5: f(std::integral_constant<int, 5>{}, m0); break;
            case 6: f(std::integral_constant<int, 6>{}, m0); break;
            case 7: f(std::integral_constant<int, 7>{}, m0); break;
            default: f(std::integral_constant<int, 8>{}, m0); break;
        }
    }
}

// n zeroed floats in a buffer owned by the calling thread, reused across calls:
// the partial sums of the y = x W kernels (rows of W streamed).
inline float *zeroed_partial_sums(size_t n) {
    thread_local std::vector<float> buf;
    if (buf.size() < n) buf.resize(n);
    std::fill(buf.data(), buf.data() + n, 0.0f);
    return buf.data();
}

// Where rows n .. n+P-1 of W keep their packed codes and block scales; for the
// pass kernels.
template <int P>
struct WRows {
    const uint8_t *packed[P];
    const float *scales[P];
    WRows(const MatmulArgs &a, int64_t n, int shift) {
        for (int p = 0; p < P; ++p) {
            packed[p] = a.packed + (n + p) * a.K / 2;
            scales[p] = a.scales + (((n + p) * a.K) >> shift);
        }
    }
};

// For ops structs whose passes read x as it is: rows m0 .. of x.
struct XAsIs {
    template <int R, typename T>
    static const T *x_rows(const MatmulArgs &a, int64_t m0) {
        return static_cast<const T *>(a.x) + m0 * a.K;
    }
};

// How an ISA runs the passes (from measurements on it).
struct PassPlan {
    int rows_of_w[9];      // P for R = 1..8 rows of x: what the vector registers hold
    bool prefetch_rows;    // pass_transposed, one row of x: the next P rows of W (below)
    bool prefetch_pieces;  // rows_plain: short row pieces of W a few passes ahead (below)
};

// The types of an ops struct K, from its functions.
template <class K>
struct Ops {
    using Vec = typename K::Vec;                          // the weights of one step
    using Acc = decltype(K::broadcast(0.0f));             // an accumulator
    using Table = decltype(K::load_table(nullptr));       // the codebook as the passes take it
    static constexpr int kStep = int(sizeof(Vec) / sizeof(float));  // weights per step
};

// The pass kernels stay functions of their own: whether GCC inlined one into its
// caller changed with unrelated edits, and moved its speed by up to 15 % (same
// source, other register allocation; measured on AVX-512).
#if defined(__GNUC__)
#define NF4_PASS __attribute__((noinline))
#else
#define NF4_PASS inline
#endif

// y[m0 + r, n .. n+P-1] for r < R: P rows of W in one pass, each decoded vector
// used for all R rows of x (x as K::x_rows gives it).
template <class K, int R, int P, typename T, typename X>
NF4_PASS void pass_transposed(const MatmulArgs &a, const X *x, typename Ops<K>::Table table, int shift, int64_t m0,
                              int64_t n) {
    constexpr int kStep = Ops<K>::kStep;
    typename Ops<K>::Acc acc[R][P] = {};
    const WRows<P> wr(a, n, shift);
    typename K::template Weights<P> wt(table);
    // With prefetch_rows, one row of x (P > 1: not the last rows of W, one at a
    // time): the next P rows of W (contiguous after these) are prefetched into L1
    // at the rate this pass reads its own, a line per step. W comes from L3 or
    // memory when other work ran in between (a model's other layers), and the P
    // row streams of 2 KiB or so are too short for the hardware prefetchers
    // (AVX-512, benchmarks/bench_matmul.py --gemv-pairs: about 10 % less time in
    // the two-way race for one row of x; with more rows, measured no gain).
    const char *next = reinterpret_cast<const char *>(a.packed + (n + P) * a.K / 2);
    const char *next_end = reinterpret_cast<const char *>(a.packed + std::min<int64_t>(a.N, n + 2 * P) * a.K / 2);
    const int64_t nblocks = a.K >> shift;
    for (int64_t b = 0; b < nblocks; ++b) {
        wt.scale(wr, b);
        const int64_t k0 = b << shift, k1 = k0 + a.blocksize;
        for (int64_t k = k0; k < k1; k += kStep) {
            if (K::kPlan.prefetch_rows && R == 1 && P > 1 && next < next_end) {
                __builtin_prefetch(next, 0, 3);
                next += kStep / 2 * P;  // the bytes of a step's weights in each of P rows
            }
            typename K::Vec w[P];
            for (int p = 0; p < P; ++p) w[p] = wt.decode(p, wr.packed[p] + (k >> 1));
            for (int r = 0; r < R; ++r) {
                const typename K::Vec xv = K::template load_x<R>(x + r * a.K + k);
                for (int p = 0; p < P; ++p) acc[r][p] = K::fma(xv, w[p], acc[r][p]);
            }
        }
    }
    T *y = static_cast<T *>(a.y);
    for (int r = 0; r < R; ++r)
        for (int p = 0; p < P; ++p) y[(m0 + r) * a.N + n + p] = from_float<T>(K::sum(acc[r][p]));
}

// sums[r, k - c0] += sum_p x[m0 + r, n + p] W[n + p, k] for k in [c0, c1) (in
// the ISA's decode order within each step): P rows of W streamed once, each
// decoded vector used for all R rows.
template <class K, int R, int P, typename T>
NF4_PASS void pass_plain(const MatmulArgs &a, float *sums, int64_t len, typename Ops<K>::Table table, int shift,
                         int64_t m0, int64_t n, int64_t c0, int64_t c1) {
    const T *x = static_cast<const T *>(a.x);
    typename Ops<K>::Acc g[R][P];
    for (int r = 0; r < R; ++r)
        for (int p = 0; p < P; ++p) g[r][p] = K::broadcast(to_float(x[(m0 + r) * a.N + n + p]));
    const WRows<P> wr(a, n, shift);
    typename K::template Weights<P> wt(table);
    for (int64_t k0 = c0; k0 < c1;) {  // block by block (c0, c1 are multiples of 16 only)
        const int64_t b = k0 >> shift, k1 = std::min(c1, (b + 1) << shift);
        wt.scale(wr, b);
        for (int64_t k = k0; k < k1; k += Ops<K>::kStep) {
            typename K::Vec w[P];
            for (int p = 0; p < P; ++p) w[p] = wt.decode(p, wr.packed[p] + (k >> 1));
            for (int r = 0; r < R; ++r) {
                float *dst = sums + r * len + (k - c0);
                typename K::Vec s;
                std::memcpy(&s, dst, sizeof s);
                for (int p = 0; p < P; ++p) s = K::fma(g[r][p], w[p], s);
                std::memcpy(dst, &s, sizeof s);
            }
        }
        k0 = k1;
    }
}

// y[m0 + r, c0:c1] = x[m0 + r, :] W[c0:c1, :]^T for r < R.
template <class K, int R, typename T>
void rows_transposed(const MatmulArgs &a, const typename Ops<K>::Table &table, int shift, int64_t m0, int64_t c0,
                     int64_t c1) {
    constexpr int P = K::kPlan.rows_of_w[R];
    const auto x = K::template x_rows<R, T>(a, m0);
    int64_t n = c0;
    for (; n + P <= c1; n += P) pass_transposed<K, R, P, T>(a, x, table, shift, m0, n);
    for (; n < c1; ++n) pass_transposed<K, R, 1, T>(a, x, table, shift, m0, n);
}

// y[m0 + r, c0:c1] = x[m0 + r, :] W[:, c0:c1] for r < R: rows of W streamed,
// partial sums in a per-thread float32 buffer (R x (c1 - c0)).
template <class K, int R, typename T>
void rows_plain(const MatmulArgs &a, const typename Ops<K>::Table &table, int shift, int64_t m0, int64_t c0,
                int64_t c1) {
    constexpr int P = K::kPlan.rows_of_w[R];
    const int64_t len = c1 - c0;
    float *sums = zeroed_partial_sums(size_t(R * len));
    // A task of a few hundred columns reads a short piece of every row of W, pieces
    // 2 KiB apart for K = 4096: too short and too far apart for the hardware
    // prefetchers. With prefetch_pieces, prefetch the pieces of the rows kAhead
    // passes on (pieces under 512 bytes: 0.78-0.89x the time for 2-8 rows of x on
    // AVX-512; docs/performance.md).
    const int64_t piece = len / 2;  // bytes of one row of W in [c0, c1)
    constexpr int64_t kAhead = 4;
    int64_t n = 0;
    for (; n + P <= a.N; n += P) {
        if (K::kPlan.prefetch_pieces && piece < 512)
            for (int64_t row = n + kAhead * P; row < std::min(a.N, n + (kAhead + 1) * P); ++row) {
                const char *p = reinterpret_cast<const char *>(a.packed + row * a.K / 2 + c0 / 2);
                for (int64_t off = 0; off < piece; off += 64) __builtin_prefetch(p + off, 0, 3);
                __builtin_prefetch(p + piece - 1, 0, 3);
            }
        pass_plain<K, R, P, T>(a, sums, len, table, shift, m0, n, c0, c1);
    }
    for (; n < a.N; ++n) pass_plain<K, R, 1, T>(a, sums, len, table, shift, m0, n, c0, c1);
    T *y = static_cast<T *>(a.y);
    for (int r = 0; r < R; ++r)
        for (int64_t k = c0; k < c1; k += Ops<K>::kStep) K::put(y + (m0 + r) * a.K + k, sums + r * len + k - c0);
}

// Output columns [c0, c1) (of N when transposed, of K otherwise), every row of x.
template <class K, typename T>
void matmul(const MatmulArgs &a, int64_t c0, int64_t c1) {
    const typename Ops<K>::Table table = K::load_table(a.codebook);
    const int shift = __builtin_ctzll(uint64_t(a.blocksize));
    for_row_groups(a.M, [&](auto rows, int64_t m0) {
        constexpr int R = decltype(rows)::value;
        if (a.transpose)
            rows_transposed<K, R, T>(a, table, shift, m0, c0, c1);
        else
            rows_plain<K, R, T>(a, table, shift, m0, c0, c1);
    });
}

// W[n, k0:k1] for n in [r0, r1) into out (row-major, row length k1 - k0). A
// step starts at a flat index that is a multiple of its width (16 or 32), so
// its weights lie in one block (blocksize >= 32); the block's table is made
// once per block.
template <class K, typename T>
void decode_tile(const TileArgs &t, int64_t r0, int64_t r1) {
    using Step = typename K::template TileStep<T>;
    constexpr int64_t W = Step::kWidth;
    const Step step(t.codebook);
    // Tables of finite values round to bfloat16 without the NaN rule (cheaper);
    // the caller's codebook and scales need not be finite.
    bool finite_codebook = true;
    for (int i = 0; i < 16; ++i) finite_codebook = finite_codebook && is_finite(t.codebook[i]);
    const int shift = __builtin_ctzll(uint64_t(t.blocksize));
    const uint8_t *packed = t.packed;
    const float *scales = t.scales;
    const int64_t k1 = t.k1, width = k1 - t.k0;
    T *out = static_cast<T *>(t.out);
    auto scalar = [&](T *dst, int64_t i) {
        *dst = from_float<T>(decode_value(t.codebook[nibble_at(packed, i)], scales[i >> shift]));
    };
    for (int64_t n = r0; n < r1; ++n) {
        T *dst = out + (n - t.n0) * width - t.k0;
        const int64_t row = n * t.K;
        int64_t k = t.k0;
        for (; k < k1 && (row + k) % W != 0; ++k) scalar(dst + k, row + k);
        int64_t block = -1;
        typename Step::Table tab{};
        for (; k + W <= k1; k += W) {
            const int64_t i = row + k;
            if ((i >> shift) != block) {
                block = i >> shift;
                const float scale = scales[block];
                tab = step.table(scale, !(finite_codebook && is_finite(scale)));
            }
            step.decode(dst + k, packed + (i >> 1), tab);
        }
        for (; k < k1; ++k) scalar(dst + k, row + k);
    }
}

template <class K>
const MatmulKernels *matmul_kernels() {
    static const MatmulKernels k{matmul<K, float>, matmul<K, bfloat16_t>, decode_tile<K, float>,
                                 decode_tile<K, bfloat16_t>, nullptr, 0, 0};
    return &k;
}

}  // namespace
}  // namespace nf4core

#endif  // NF4CORE_SRC_MATMUL_ROWS_HPP
