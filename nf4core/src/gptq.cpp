// Calibrated 4-bit rounding (GPTQ / OBQ error feedback over a 16-value
// codebook with bitsandbytes' block scales); the contract is in
// include/nf4core/gptq.h.
//
// The optimized kernel works on a task's rows in solve order (a float32 copy
// with the columns permuted), visits NF4_GPTQ_BATCH columns at a time with
// rank-1 updates inside the batch and one GEMM-like update of the rest of the
// row after it (GPTQ's "lazy batch" updates). Every update of an element is one
// fused multiply-add w = fma(-err_j, U[j][t], w), applied in the order of the
// steps j whether it happens inside the batch or in the GEMM, so the result is
// that of the unbatched algorithm in float32 with FMAs, on every path. The
// vector paths (AVX-512, AVX2) are functions compiled for their ISA in this
// file and chosen from the active kernel path (dispatch.cpp, nf4_set_isa).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>
#include <string>
#include <type_traits>
#include <vector>

#include "error.hpp"
#include "kernels.hpp"
#include "kernels_ref.hpp"
#include "nf4core/gptq.h"
#include "nf4core/quantize.h"
#include "sizes.hpp"

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#include <immintrin.h>
#define NF4_GPTQ_X86 1
#endif

namespace nf4core {
namespace {

constexpr int64_t kBatch = NF4_GPTQ_BATCH;
// Rows solved together (see gptq_impl).
constexpr int64_t kChunkRows = 64;

// The three loops that carry the flops, per instruction set. All compute each
// element as a chain of single-rounding FMAs in the same order.
struct GptqOps {
    // The batch columns, transposed (T[t][r], rows contiguous):
    // T[t][r] = fma(-e[r], u[t], T[t][r]) for t < len, r < rows
    void (*rank1)(float *T, int64_t rows, const float *e, const float *u, int64_t len);
    // W[r][c] = fma(-E[k][r], U[k][c], W[r][c]) for k = 0..kb-1 in order, r < rows, c < ncols
    void (*update)(float *W, int64_t ldw, int64_t rows, const float *E, int64_t lde, int64_t kb, const float *U,
                   int64_t ldu, int64_t ncols);
    // One column's pending lazy updates, for all rows at once (a block scale needs the value before the GEMM):
    // v[r] = fma(-E[k][r], u[k * ldu], v[r]) for k = 0..kb-1 in order, r < rows
    void (*chain)(float *v, int64_t rows, const float *E, int64_t lde, const float *u, int64_t ldu, int64_t kb);
    // One step's codes and scaled errors for rows r < rows of a column whose (full) blocks have the float32
    // reciprocal recip[r] and the stored absmax stored[r], as encode_value / decode_value compute them:
    // code[r] = order[#{i : mid[i] < clamp(x[r] * recip[r], -1, 1)}],
    // err[r] = (x[r] - codebook[code[r]] * stored[r]) * inv, each operation rounded once
    void (*encode)(const float *x, int64_t rows, const float *recip, const float *stored, const SearchTable &t,
                   const float *codebook, float inv, uint8_t *code, float *err);
};

// ---- generic (any CPU): std::fma, one element at a time ----
void rank1_generic(float *T, int64_t rows, const float *e, const float *u, int64_t len) {
    for (int64_t t = 0; t < len; ++t)
        for (int64_t r = 0; r < rows; ++r) T[t * rows + r] = std::fma(-e[r], u[t], T[t * rows + r]);
}

void update_generic(float *W, int64_t ldw, int64_t rows, const float *E, int64_t lde, int64_t kb, const float *U,
                    int64_t ldu, int64_t ncols) {
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t k = 0; k < kb; ++k) {
            const float e = E[k * lde + r];
            const float *u = U + k * ldu;
            float *w = W + r * ldw;
            for (int64_t c = 0; c < ncols; ++c) w[c] = std::fma(-e, u[c], w[c]);
        }
}

void chain_generic(float *v, int64_t rows, const float *E, int64_t lde, const float *u, int64_t ldu, int64_t kb) {
    for (int64_t k = 0; k < kb; ++k)
        for (int64_t r = 0; r < rows; ++r) v[r] = std::fma(-E[k * lde + r], u[k * ldu], v[r]);
}

void encode_generic(const float *x, int64_t rows, const float *recip, const float *stored, const SearchTable &t,
                    const float *codebook, float inv, uint8_t *code, float *err) {
    for (int64_t r = 0; r < rows; ++r) {
        const uint8_t c = nearest_code<16>(t, scale_value(x[r], 1.0f, recip[r], false));
        code[r] = c;
        err[r] = (x[r] - decode_value(codebook[c], stored[r])) * inv;
    }
}

#if defined(NF4_GPTQ_X86)
// ---- AVX-512: 8 rows x 32 columns of accumulators, masked column tails ----
__attribute__((target("avx512f,fma"))) void rank1_avx512(float *T, int64_t rows, const float *e, const float *u,
                                                        int64_t len) {
    for (int64_t r = 0; r < rows; r += 16) {
        const __mmask16 m = rows - r >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (rows - r)) - 1u);
        const __m512 ve = _mm512_maskz_loadu_ps(m, e + r);
        for (int64_t t = 0; t < len; ++t) {
            float *w = T + t * rows + r;
            _mm512_mask_storeu_ps(w, m, _mm512_fnmadd_ps(ve, _mm512_set1_ps(u[t]), _mm512_maskz_loadu_ps(m, w)));
        }
    }
}

template <int MR>
__attribute__((target("avx512f,fma"), always_inline)) inline void tile_avx512(float *W, int64_t ldw, const float *E,
                                                                                int64_t lde, int64_t kb,
                                                                                const float *U, int64_t ldu,
                                                                                __mmask16 m0, __mmask16 m1) {
    __m512 a0[MR], a1[MR];
    for (int r = 0; r < MR; ++r) {
        a0[r] = _mm512_maskz_loadu_ps(m0, W + r * ldw);
        a1[r] = _mm512_maskz_loadu_ps(m1, W + r * ldw + 16);
    }
    for (int64_t k = 0; k < kb; ++k) {
        const __m512 u0 = _mm512_maskz_loadu_ps(m0, U + k * ldu);
        const __m512 u1 = _mm512_maskz_loadu_ps(m1, U + k * ldu + 16);
        for (int r = 0; r < MR; ++r) {
            const __m512 e = _mm512_set1_ps(E[k * lde + r]);
            a0[r] = _mm512_fnmadd_ps(e, u0, a0[r]);
            a1[r] = _mm512_fnmadd_ps(e, u1, a1[r]);
        }
    }
    for (int r = 0; r < MR; ++r) {
        _mm512_mask_storeu_ps(W + r * ldw, m0, a0[r]);
        _mm512_mask_storeu_ps(W + r * ldw + 16, m1, a1[r]);
    }
}

__attribute__((target("avx512f,fma"))) void update_avx512(float *W, int64_t ldw, int64_t rows, const float *E,
                                                         int64_t lde, int64_t kb, const float *U, int64_t ldu,
                                                         int64_t ncols) {
    constexpr int MR = 8;
    for (int64_t c = 0; c < ncols; c += 32) {
        const int64_t left = ncols - c;
        const __mmask16 m0 = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1u);
        const __mmask16 m1 = left >= 32 ? __mmask16(0xFFFF) : left <= 16 ? __mmask16(0)
                                                                         : __mmask16((1u << (left - 16)) - 1u);
        int64_t r = 0;
        for (; r + MR <= rows; r += MR) tile_avx512<MR>(W + r * ldw + c, ldw, E + r, lde, kb, U + c, ldu, m0, m1);
        switch (rows - r) {
            case 7: tile_avx512<7>(W + r * ldw + c, ldw, E + r, lde, kb, U + c, ldu, m0, m1); break;
            case 6: tile_avx512<6>(W + r * ldw + c, ldw, E + r, lde, kb, U + c, ldu, m0, m1); break;
            case 5: tile_avx512<5>(W + r * ldw + c, ldw, E + r, lde, kb, U + c, ldu, m0, m1); break;
            case 4: tile_avx512<4>(W + r * ldw + c, ldw, E + r, lde, kb, U + c, ldu, m0, m1); break;
            case 3: tile_avx512<3>(W + r * ldw + c, ldw, E + r, lde, kb, U + c, ldu, m0, m1); break;
            case 2: tile_avx512<2>(W + r * ldw + c, ldw, E + r, lde, kb, U + c, ldu, m0, m1); break;
            case 1: tile_avx512<1>(W + r * ldw + c, ldw, E + r, lde, kb, U + c, ldu, m0, m1); break;
            default: break;
        }
    }
}

// 64 rows at a time in four accumulators (independent chains), masked row tails
__attribute__((target("avx512f,fma"))) void chain_avx512(float *v, int64_t rows, const float *E, int64_t lde,
                                                        const float *u, int64_t ldu, int64_t kb) {
    for (int64_t r = 0; r < rows; r += 64) {
        __mmask16 m[4];
        __m512 a[4];
        for (int q = 0; q < 4; ++q) {
            const int64_t left = rows - r - 16 * q;
            m[q] = left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1u);
            a[q] = _mm512_maskz_loadu_ps(m[q], v + r + 16 * q);
        }
        for (int64_t k = 0; k < kb; ++k) {
            const __m512 b = _mm512_set1_ps(u[k * ldu]);
            for (int q = 0; q < 4; ++q)
                a[q] = _mm512_fnmadd_ps(_mm512_maskz_loadu_ps(m[q], E + k * lde + r + 16 * q), b, a[q]);
        }
        for (int q = 0; q < 4; ++q) _mm512_mask_storeu_ps(v + r + 16 * q, m[q], a[q]);
    }
}

// 16 rows at a time: 15 compares count the midpoints below each scaled value, two permutes look up the code
// and its value; masked row tails
__attribute__((target("avx512f"))) void encode_avx512(const float *x, int64_t rows, const float *recip,
                                                      const float *stored, const SearchTable &t,
                                                      const float *codebook, float inv, uint8_t *code, float *err) {
    __m512 mid[15];
    for (int i = 0; i < 15; ++i) mid[i] = _mm512_set1_ps(t.mid[i]);
    const __m512i order = _mm512_loadu_si512(t.order);
    const __m512 values = _mm512_loadu_ps(codebook);
    const __m512 lo = _mm512_set1_ps(-1.0f), hi = _mm512_set1_ps(1.0f), vinv = _mm512_set1_ps(inv);
    const __m512i one = _mm512_set1_epi32(1);
    for (int64_t r = 0; r < rows; r += 16) {
        const __mmask16 m = rows - r >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (rows - r)) - 1u);
        const __m512 xv = _mm512_maskz_loadu_ps(m, x + r);
        // the maskz forms throughout: GCC 12's unmasked max/min/permutexvar pass an undefined vector through
        // (-Wmaybe-uninitialized, which this file, unlike the kernels_<isa>.cpp files, keeps on)
        __m512 sv = _mm512_mul_ps(xv, _mm512_maskz_loadu_ps(m, recip + r));
        sv = _mm512_maskz_min_ps(m, _mm512_maskz_max_ps(m, sv, lo), hi);  // finite: the scalar clamp
        __m512i pos = _mm512_setzero_si512();
        for (int i = 0; i < 15; ++i)
            pos = _mm512_mask_add_epi32(pos, _mm512_cmp_ps_mask(sv, mid[i], _CMP_GT_OQ), pos, one);
        const __m512i c = _mm512_maskz_permutexvar_epi32(m, pos, order);
        const __m512 v = _mm512_mul_ps(_mm512_maskz_permutexvar_ps(m, c, values),
                                       _mm512_maskz_loadu_ps(m, stored + r));
        _mm512_mask_storeu_ps(err + r, m, _mm512_mul_ps(_mm512_sub_ps(xv, v), vinv));
        _mm512_mask_cvtepi32_storeu_epi8(code + r, m, c);
    }
}

// ---- AVX2: 6 rows x 16 columns of accumulators, scalar FMAs for the column tail ----
__attribute__((target("avx2,fma"))) void rank1_avx2(float *T, int64_t rows, const float *e, const float *u,
                                                    int64_t len) {
    const int64_t vrows = rows - rows % 8;
    for (int64_t r = 0; r < vrows; r += 8) {
        const __m256 ve = _mm256_loadu_ps(e + r);
        for (int64_t t = 0; t < len; ++t) {
            float *w = T + t * rows + r;
            _mm256_storeu_ps(w, _mm256_fnmadd_ps(ve, _mm256_set1_ps(u[t]), _mm256_loadu_ps(w)));
        }
    }
    for (int64_t t = 0; t < len; ++t)
        for (int64_t r = vrows; r < rows; ++r) T[t * rows + r] = __builtin_fmaf(-e[r], u[t], T[t * rows + r]);
}

template <int MR>
__attribute__((target("avx2,fma"), always_inline)) inline void tile_avx2(float *W, int64_t ldw, const float *E,
                                                                           int64_t lde, int64_t kb, const float *U,
                                                                           int64_t ldu) {
    __m256 a0[MR], a1[MR];
    for (int r = 0; r < MR; ++r) {
        a0[r] = _mm256_loadu_ps(W + r * ldw);
        a1[r] = _mm256_loadu_ps(W + r * ldw + 8);
    }
    for (int64_t k = 0; k < kb; ++k) {
        const __m256 u0 = _mm256_loadu_ps(U + k * ldu);
        const __m256 u1 = _mm256_loadu_ps(U + k * ldu + 8);
        for (int r = 0; r < MR; ++r) {
            const __m256 e = _mm256_set1_ps(E[k * lde + r]);
            a0[r] = _mm256_fnmadd_ps(e, u0, a0[r]);
            a1[r] = _mm256_fnmadd_ps(e, u1, a1[r]);
        }
    }
    for (int r = 0; r < MR; ++r) {
        _mm256_storeu_ps(W + r * ldw, a0[r]);
        _mm256_storeu_ps(W + r * ldw + 8, a1[r]);
    }
}

__attribute__((target("avx2,fma"))) void update_avx2(float *W, int64_t ldw, int64_t rows, const float *E,
                                                     int64_t lde, int64_t kb, const float *U, int64_t ldu,
                                                     int64_t ncols) {
    constexpr int MR = 6;
    const int64_t vcols = ncols - ncols % 16;
    for (int64_t c = 0; c < vcols; c += 16) {
        int64_t r = 0;
        for (; r + MR <= rows; r += MR) tile_avx2<MR>(W + r * ldw + c, ldw, E + r, lde, kb, U + c, ldu);
        switch (rows - r) {
            case 5: tile_avx2<5>(W + r * ldw + c, ldw, E + r, lde, kb, U + c, ldu); break;
            case 4: tile_avx2<4>(W + r * ldw + c, ldw, E + r, lde, kb, U + c, ldu); break;
            case 3: tile_avx2<3>(W + r * ldw + c, ldw, E + r, lde, kb, U + c, ldu); break;
            case 2: tile_avx2<2>(W + r * ldw + c, ldw, E + r, lde, kb, U + c, ldu); break;
            case 1: tile_avx2<1>(W + r * ldw + c, ldw, E + r, lde, kb, U + c, ldu); break;
            default: break;
        }
    }
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t k = 0; k < kb; ++k) {
            const float e = E[k * lde + r];
            for (int64_t c = vcols; c < ncols; ++c)
                W[r * ldw + c] = __builtin_fmaf(-e, U[k * ldu + c], W[r * ldw + c]);
        }
}

// 32 rows at a time in four accumulators, scalar FMAs for the row tail
__attribute__((target("avx2,fma"))) void chain_avx2(float *v, int64_t rows, const float *E, int64_t lde,
                                                    const float *u, int64_t ldu, int64_t kb) {
    const int64_t vrows = rows - rows % 8;
    int64_t r = 0;
    for (; r + 32 <= vrows; r += 32) {
        __m256 a[4];
        for (int q = 0; q < 4; ++q) a[q] = _mm256_loadu_ps(v + r + 8 * q);
        for (int64_t k = 0; k < kb; ++k) {
            const __m256 b = _mm256_set1_ps(u[k * ldu]);
            for (int q = 0; q < 4; ++q) a[q] = _mm256_fnmadd_ps(_mm256_loadu_ps(E + k * lde + r + 8 * q), b, a[q]);
        }
        for (int q = 0; q < 4; ++q) _mm256_storeu_ps(v + r + 8 * q, a[q]);
    }
    for (; r < vrows; r += 8) {
        __m256 a = _mm256_loadu_ps(v + r);
        for (int64_t k = 0; k < kb; ++k)
            a = _mm256_fnmadd_ps(_mm256_loadu_ps(E + k * lde + r), _mm256_set1_ps(u[k * ldu]), a);
        _mm256_storeu_ps(v + r, a);
    }
    for (int64_t k = 0; k < kb; ++k)
        for (int64_t rr = vrows; rr < rows; ++rr) v[rr] = __builtin_fmaf(-E[k * lde + rr], u[k * ldu], v[rr]);
}

// 8 rows at a time; the 16-entry lookups are two 8-entry permutes and a blend; scalar row tail
__attribute__((target("avx2,fma"))) void encode_avx2(const float *x, int64_t rows, const float *recip,
                                                     const float *stored, const SearchTable &t,
                                                     const float *codebook, float inv, uint8_t *code, float *err) {
    __m256 mid[15];
    for (int i = 0; i < 15; ++i) mid[i] = _mm256_set1_ps(t.mid[i]);
    const __m256i order_lo = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(t.order));
    const __m256i order_hi = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(t.order + 8));
    const __m256 values_lo = _mm256_loadu_ps(codebook), values_hi = _mm256_loadu_ps(codebook + 8);
    const __m256 lo = _mm256_set1_ps(-1.0f), hi = _mm256_set1_ps(1.0f), vinv = _mm256_set1_ps(inv);
    const __m256i seven = _mm256_set1_epi32(7);
    const int64_t vrows = rows - rows % 8;
    alignas(32) int32_t c32[8];
    for (int64_t r = 0; r < vrows; r += 8) {
        const __m256 xv = _mm256_loadu_ps(x + r);
        __m256 sv = _mm256_mul_ps(xv, _mm256_loadu_ps(recip + r));
        sv = _mm256_min_ps(_mm256_max_ps(sv, lo), hi);  // finite: the scalar clamp
        __m256i pos = _mm256_setzero_si256();
        for (int i = 0; i < 15; ++i)  // a true compare is all ones: -1
            pos = _mm256_sub_epi32(pos, _mm256_castps_si256(_mm256_cmp_ps(sv, mid[i], _CMP_GT_OQ)));
        const __m256i c = _mm256_blendv_epi8(_mm256_permutevar8x32_epi32(order_lo, pos),
                                             _mm256_permutevar8x32_epi32(order_hi, pos),
                                             _mm256_cmpgt_epi32(pos, seven));
        const __m256 val = _mm256_blendv_ps(_mm256_permutevar8x32_ps(values_lo, c),
                                            _mm256_permutevar8x32_ps(values_hi, c),
                                            _mm256_castsi256_ps(_mm256_cmpgt_epi32(c, seven)));
        const __m256 v = _mm256_mul_ps(val, _mm256_loadu_ps(stored + r));
        _mm256_storeu_ps(err + r, _mm256_mul_ps(_mm256_sub_ps(xv, v), vinv));
        _mm256_store_si256(reinterpret_cast<__m256i *>(c32), c);
        for (int q = 0; q < 8; ++q) code[r + q] = uint8_t(c32[q]);
    }
    encode_generic(x + vrows, rows - vrows, recip + vrows, stored + vrows, t, codebook, inv, code + vrows,
                   err + vrows);
}
#endif

GptqOps active_ops() {
#if defined(NF4_GPTQ_X86)
    const char *isa = active_kernels().name;
    if (std::strcmp(isa, "avx512") == 0) return {rank1_avx512, update_avx512, chain_avx512, encode_avx512};
    if (std::strcmp(isa, "avx2") == 0) return {rank1_avx2, update_avx2, chain_avx2, encode_avx2};
#endif
    return {rank1_generic, update_generic, chain_generic, encode_generic};
}

template <typename T>
struct AlignedFree {
    void operator()(T *p) const { std::free(p); }
};

template <typename T>
std::unique_ptr<T[], AlignedFree<T>> aligned_array(int64_t count) {
    const size_t bytes = (size_t(count) * sizeof(T) + 63) / 64 * 64;
    void *p = std::aligned_alloc(64, bytes ? bytes : 64);
    if (!p) throw std::bad_alloc();
    return std::unique_ptr<T[], AlignedFree<T>>(static_cast<T *>(p));
}

struct Problem {
    int64_t rows, cols, n, blocksize;
    const int64_t *order;     // solve position -> column
    const int64_t *position;  // column -> solve position
    const float *codebook;
    const SearchTable *table;
    uint8_t *packed;
    float *absmax;
};

// Packs the codes of flat elements [f0, f1) (f0 even) into `packed`; pads an odd end.
void pack_codes(const uint8_t *codes, int64_t f0, int64_t f1, const Problem &p) {
    for (int64_t f = f0; f < f1; f += 2) {
        const unsigned hi = codes[f - f0];
        const unsigned lo = f + 1 < f1 ? codes[f + 1 - f0] : 0u;
        p.packed[f >> 1] = uint8_t((hi << 4) | lo);
    }
    if (f1 == p.n && (p.n & 1)) ref::pad_odd_end(p.n, *p.table, p.packed);
}

// Rows [r0, r1) in float32; blocks of these rows hold no element of other rows.
// Wp: the rows in solve order (R x K); the columns of the current batch are
// moved into T (transposed, kBatch x R, rows contiguous) so that a step's
// codes and updates run along contiguous memory; E (kBatch x R) keeps the
// batch's scaled errors for the lazy update of the columns after the batch.
void solve_rows(const float *w, const float *U, const Problem &p, const GptqOps &ops, int64_t r0, int64_t r1) {
    const int64_t K = p.cols, R = r1 - r0, bs = p.blocksize;
    int shift = 0;
    while ((int64_t(1) << shift) < bs) ++shift;  // blocksize is a power of two
    const int64_t f0 = r0 * K, f1 = r1 * K;
    const int64_t blk0 = f0 >> shift, nblk = ceil_div(f1, bs) - blk0;
    auto Wp = aligned_array<float>(R * K);
    auto T = aligned_array<float>(kBatch * R);
    auto E = aligned_array<float>(kBatch * R);
    std::vector<uint8_t> codes(static_cast<size_t>(R * K));
    std::vector<BlockScale> scale(static_cast<size_t>(nblk));
    std::vector<uint8_t> started(static_cast<size_t>(nblk), 0);
    std::vector<int64_t> blk_of(static_cast<size_t>(R));
    // K a multiple of the blocksize: every block lies in one row, and a column group's blocks start together,
    // so their scales are computed for all rows at once, the pending updates by ops.chain along the rows
    const bool aligned = K % bs == 0;
    const int64_t bpr = K >> shift;  // blocks per row, when aligned
    auto gmax = aligned_array<float>(R);
    auto col = aligned_array<float>(R);
    // aligned: each column group's reciprocal and stored scale per row, contiguous along the rows (ops.encode)
    auto grecip = aligned_array<float>(aligned ? bpr * R : 1);
    auto gstored = aligned_array<float>(aligned ? bpr * R : 1);
    auto ctmp = aligned_array<uint8_t>(R);
    for (int64_t r = 0; r < R; ++r)
        for (int64_t t = 0; t < K; ++t) Wp[r * K + t] = w[(r0 + r) * K + p.order[t]];

    for (int64_t i1 = 0; i1 < K; i1 += kBatch) {
        const int64_t i2 = std::min(K, i1 + kBatch);
        for (int64_t r = 0; r < R; ++r)
            for (int64_t t = i1; t < i2; ++t) T[(t - i1) * R + r] = Wp[r * K + t];
        for (int64_t j = i1; j < i2; ++j) {
            const int64_t jj = j - i1, c = p.order[j];
            // 1. scales of the blocks this step enters, from the values after steps < j
            if (aligned) {
                // blocks are bs consecutive columns of one row: column group g starts in every row at once
                const int64_t g = c >> shift;  // (ops.encode reads the group's scales: no blk_of here)
                if (!started[static_cast<size_t>(g)]) {
                    std::fill(gmax.get(), gmax.get() + R, 0.0f);
                    for (int64_t e = 0; e < bs; ++e) {
                        const int64_t t = p.position[g * bs + e];  // >= j: the group's first step is j
                        const float *v;
                        if (t < i2) {
                            v = T.get() + (t - i1) * R;  // in this batch: up to date
                        } else {  // after the batch: apply the pending lazy updates of steps i1..j-1
                            for (int64_t r = 0; r < R; ++r) col[r] = Wp[r * K + t];
                            ops.chain(col.get(), R, E.get(), R, U + i1 * K + t, K, j - i1);
                            v = col.get();
                        }
                        for (int64_t r = 0; r < R; ++r) gmax[r] = std::max(gmax[r], std::fabs(v[r]));
                    }
                    for (int64_t r = 0; r < R; ++r) {
                        const BlockScale bsr = block_scale(gmax[r], bs, bs);
                        scale[static_cast<size_t>(r * bpr + g)] = bsr;
                        started[static_cast<size_t>(r * bpr + g)] = 1;
                        grecip[g * R + r] = bsr.recip;
                        gstored[g * R + r] = bsr.stored;
                    }
                }
            } else {
                for (int64_t r = 0; r < R; ++r) {
                    const int64_t b = (((r0 + r) * K + c) >> shift) - blk0;
                    blk_of[static_cast<size_t>(r)] = b;
                    if (started[static_cast<size_t>(b)]) continue;
                    const int64_t e0 = (blk0 + b) * bs, e1 = std::min(e0 + bs, p.n);
                    float amax = 0.0f;
                    for (int64_t f = e0; f < e1; ++f) {
                        const int64_t rr = f / K - r0, t = p.position[f % K];
                        float v;
                        if (t < i2) {
                            v = T[(t - i1) * R + rr];  // t >= j: in this batch, up to date
                        } else {  // after the batch: the lazy updates of steps i1..j-1 are still pending
                            v = Wp[rr * K + t];
                            for (int64_t k = i1; k < j; ++k) v = std::fma(-E[(k - i1) * R + rr], U[k * K + t], v);
                        }
                        const float a = std::fabs(v);
                        if (a > amax) amax = a;
                    }
                    scale[static_cast<size_t>(b)] = block_scale(amax, e1 - e0, bs);
                    started[static_cast<size_t>(b)] = 1;
                }
            }
            // 2. codes and scaled errors
            const float inv_ujj = 1.0f / U[j * K + j];
            const float *x = T.get() + jj * R;
            float *err = E.get() + jj * R;
            if (aligned) {
                const int64_t g = c >> shift;
                ops.encode(x, R, grecip.get() + g * R, gstored.get() + g * R, *p.table, p.codebook, inv_ujj,
                           ctmp.get(), err);
                for (int64_t r = 0; r < R; ++r) codes[static_cast<size_t>(r * K + c)] = ctmp[r];
            } else {
                for (int64_t r = 0; r < R; ++r) {
                    const BlockScale &s = scale[static_cast<size_t>(blk_of[static_cast<size_t>(r)])];
                    const uint8_t code = encode_value<16>(*p.table, x[r], s);
                    codes[static_cast<size_t>(r * K + c)] = code;
                    err[r] = (x[r] - decode_value(p.codebook[code], s.stored)) * inv_ujj;
                }
            }
            // 3. error feedback within the batch
            if (j + 1 < i2) ops.rank1(T.get() + (jj + 1) * R, R, err, U + j * K + j + 1, i2 - j - 1);
        }
        if (i2 < K) ops.update(Wp.get() + i2, K, R, E.get(), R, i2 - i1, U + i1 * K + i2, K, K - i2);
    }
    for (int64_t b = 0; b < nblk; ++b) p.absmax[blk0 + b] = scale[static_cast<size_t>(b)].stored;
    pack_codes(codes.data(), f0, f1, p);
}

// The float64 definition: every step updates the rest of the row at once.
void solve_ref(const double *w, const double *U, const Problem &p) {
    const int64_t K = p.cols, N = p.rows, bs = p.blocksize, n = p.n;
    // codebook sorted ascending (stable: equal values keep code order), midpoints in float64
    int idx[16];
    for (int i = 0; i < 16; ++i) idx[i] = i;
    std::stable_sort(idx, idx + 16, [&](int a, int b) { return p.codebook[a] < p.codebook[b]; });
    double mid[15];
    for (int i = 0; i < 15; ++i) mid[i] = (double(p.codebook[idx[i]]) + double(p.codebook[idx[i + 1]])) / 2.0;
    std::vector<double> W(size_t(N * K));
    for (int64_t r = 0; r < N; ++r)
        for (int64_t t = 0; t < K; ++t) W[size_t(r * K + t)] = w[r * K + p.order[t]];
    const int64_t nblocks = ceil_div(n, bs);
    std::vector<double> scale(static_cast<size_t>(nblocks), -1.0);
    std::vector<uint8_t> codes(static_cast<size_t>(n));
    for (int64_t j = 0; j < K; ++j) {
        const int64_t c = p.order[j];
        for (int64_t r = 0; r < N; ++r) {
            const int64_t b = (r * K + c) / bs;
            if (scale[size_t(b)] >= 0.0) continue;
            const int64_t e0 = b * bs, e1 = std::min(e0 + bs, n);
            double amax = 0.0;
            for (int64_t f = e0; f < e1; ++f) amax = std::max(amax, std::fabs(W[size_t((f / K) * K + p.position[f % K])]));
            scale[size_t(b)] = amax;
        }
        for (int64_t r = 0; r < N; ++r) {
            const int64_t b = (r * K + c) / bs;
            const double s = std::max(scale[size_t(b)], 1e-38);
            double* row = W.data() + r * K;
            const double x = std::min(1.0, std::max(-1.0, row[j] / s));
            int pos = 0;
            for (int i = 0; i < 15; ++i) pos += x > mid[i] ? 1 : 0;
            const int code = idx[pos];
            codes[size_t(r * K + c)] = uint8_t(code);
            const double err = (row[j] - double(p.codebook[code]) * s) / U[j * K + j];
            for (int64_t t = j + 1; t < K; ++t) row[t] -= err * U[j * K + t];
        }
    }
    for (int64_t b = 0; b < nblocks; ++b) {
        const bool tail = std::min(b * bs + bs, n) - b * bs < bs;
        const float amax = float(scale[size_t(b)]);
        p.absmax[b] = tail ? std::max(amax, 1e-38f) : amax;
    }
    pack_codes(codes.data(), 0, n, p);
}

template <typename T>
nf4_status gptq_impl(const T *w, int64_t rows, int64_t cols, const T *U, const int64_t *order, int64_t blocksize,
                     const float *codebook, uint8_t *packed, float *absmax) {
    return guarded([&] {
        require(rows >= 1 && cols >= 1, "rows and cols must be at least 1, got " + std::to_string(rows) + " x " +
                                            std::to_string(cols));
        require(nf4_blocksize_is_valid(blocksize), "blocksize must be a power of two between " +
                                                       std::to_string(NF4_MIN_BLOCKSIZE) + " and " +
                                                       std::to_string(NF4_MAX_BLOCKSIZE) + ", got " +
                                                       std::to_string(blocksize));
        require(w != nullptr && U != nullptr && codebook != nullptr && packed != nullptr && absmax != nullptr,
                "input or output pointer is NULL");
        const int64_t n = checked_mul(rows, cols, "rows x cols");
        const int64_t cc = checked_mul(cols, cols, "cols x cols");
        checked_mul(cc, int64_t(sizeof(T)), "hinv_chol");
        const int64_t nblocks = ceil_div(n, blocksize);
        require_disjoint({buffer("packed", packed, ceil_div(n, 2), 1), buffer("absmax", absmax, nblocks, 4)},
                         {buffer("w", w, n, sizeof(T)), buffer("hinv_chol", U, cc, sizeof(T)),
                          buffer("order", order, order ? cols : 0, 8), buffer("codebook", codebook, 16, 4)});
        const SearchTable table = make_search_table(codebook, 16);
        std::vector<int64_t> ord(static_cast<size_t>(cols)), pos(static_cast<size_t>(cols), -1);
        for (int64_t j = 0; j < cols; ++j) {
            const int64_t c = order ? order[j] : j;
            if (!(c >= 0 && c < cols && pos[size_t(c)] < 0))  // messages are built only on failure in these loops
                fail(NF4_ERROR_INVALID_ARGUMENT, "order is not a permutation of 0.." + std::to_string(cols - 1) +
                                                     ": entry " + std::to_string(j) + " is " + std::to_string(c) +
                                                     (c >= 0 && c < cols ? ", seen before" : ", out of range"));
            ord[size_t(j)] = c;
            pos[size_t(c)] = j;
        }
        for (int64_t i = 0; i < n; ++i)
            if (!std::isfinite(double(w[i]))) fail_non_finite(i, float(w[i]));
        for (int64_t j = 0; j < cols; ++j) {
            if (!std::isfinite(double(U[j * cols + j])))
                fail(NF4_ERROR_NON_FINITE, "hinv_chol[" + std::to_string(j) + "][" + std::to_string(j) + "] is not finite");
            if (!(U[j * cols + j] > 0))
                fail(NF4_ERROR_INVALID_ARGUMENT, "hinv_chol[" + std::to_string(j) + "][" + std::to_string(j) +
                                                     "] is not positive (" + std::to_string(double(U[j * cols + j])) +
                                                     "): not the Cholesky factor of a positive definite matrix");
            for (int64_t t = j; t < cols; ++t)
                if (!std::isfinite(double(U[j * cols + t])))
                    fail(NF4_ERROR_NON_FINITE, "hinv_chol[" + std::to_string(j) + "][" + std::to_string(t) +
                                                   "] is not finite");
        }
        const Problem p{rows, cols, n, blocksize, ord.data(), pos.data(), codebook, &table, packed, absmax};
        if constexpr (std::is_same<T, double>::value) {
            solve_ref(w, U, p);
        } else {
            // a group of `unit` rows holds whole blocks: unit * cols is a multiple of blocksize
            const int64_t g = std::gcd(cols, blocksize), unit = blocksize / g;
            const int64_t units = ceil_div(rows, unit);
            const GptqOps ops = active_ops();
            // Each solve_rows call takes about kChunkRows rows, so that the batch columns of its rows stay in
            // the L2 cache while the steps of a batch sweep down them (all rows at once would go to L3).
            const int64_t chunk = std::max<int64_t>(1, kChunkRows / unit);
            parallel_for(units, chunk, [&](int64_t u0, int64_t u1) {
                for (int64_t c0 = u0; c0 < u1; c0 += chunk)
                    solve_rows(w, U, p, ops, c0 * unit, std::min(rows, std::min(u1, c0 + chunk) * unit));
            });
        }
    });
}

}  // namespace
}  // namespace nf4core

using namespace nf4core;

extern "C" {

nf4_status nf4_gptq_quantize_4bit(const float *w, int64_t rows, int64_t cols, const float *hinv_chol,
                                  const int64_t *order, int64_t blocksize, const float *codebook, uint8_t *packed,
                                  float *absmax) {
    return gptq_impl<float>(w, rows, cols, hinv_chol, order, blocksize, codebook, packed, absmax);
}

nf4_status nf4_gptq_quantize_4bit_ref(const double *w, int64_t rows, int64_t cols, const double *hinv_chol,
                                      const int64_t *order, int64_t blocksize, const float *codebook,
                                      uint8_t *packed, float *absmax) {
    return gptq_impl<double>(w, rows, cols, hinv_chol, order, blocksize, codebook, packed, absmax);
}

}  // extern "C"
