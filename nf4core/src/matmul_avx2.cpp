// AVX2 (+ FMA) products with a 4-bit matrix (see nf4core/matmul.h): the
// design of matmul_avx512.cpp on 8-lane vectors.
//
// Decoding: the 4 packed bytes of 8 weights are broadcast to every 32-bit lane
// and shifted per lane, so lane t holds element t in its low 4 bits (natural
// order: no permutation of x or of the result is needed). The 16-entry
// codebook is held in two 8-lane halves; two vpermps read the low 3 bits and a
// blend on bit 3 picks the half. The table is the codebook times the block
// scale (rounded as decode_value does, once per block and row of W), so the
// weights are those of pq.dequantize and only the order of the float32 sums
// differs from the reference.
//
// The row groups, the passes over P rows of W and decode_tile's loops are
// matmul_rows.hpp's; the AVX2 steps are the struct Avx2 below.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "matmul_panel.hpp"
#include "matmul_rows.hpp"
#include "simd_avx2.hpp"

namespace nf4core {
namespace {

// Element t of 8 lies in byte t/2 of the 32-bit word, in the high nibble for
// even t (bitsandbytes' order).
inline __m256i nibble_shifts() { return _mm256_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24); }

// codes of the 8 weights packed in p4[0..3], in the low 4 bits of each lane
inline __m256i codes8(const uint8_t *p4, __m256i shifts) {
    int32_t w;
    std::memcpy(&w, p4, 4);
    return _mm256_srlv_epi32(_mm256_set1_epi32(w), shifts);
}

// A 16-entry table as two 8-lane halves (avx2::lookup16)
struct Halves {
    __m256 lo, hi;  // entries 0..7 and 8..15
};

inline Halves scaled(const Halves &t, float s) {
    const __m256 v = _mm256_set1_ps(s);
    return {_mm256_mul_ps(t.lo, v), _mm256_mul_ps(t.hi, v)};
}

// The codebook times a block scale (as decode_value), stored for lookup_mem.
inline void store_scaled(float *dst, const Halves &t, float s) {
    const Halves v = scaled(t, s);
    _mm256_store_ps(dst, v.lo);
    _mm256_store_ps(dst + 8, v.hi);
}

// lookup16 with the table in L1 (16 floats, 32-byte aligned; vpermps takes it
// from memory). In the products this replaced a multiply per decoded vector by
// the block scale: 5-9% faster GEMV, measured in one process against it.
inline __m256 lookup_mem(const float *t, __m256i idx) {
    return avx2::lookup16(_mm256_load_ps(t), _mm256_load_ps(t + 8), idx);
}

// The ops of matmul_rows.hpp: 8 weights per step.
struct Avx2 : XAsIs {
    using Vec = __m256;
    // P: what the 16 vector registers hold with R rows of x
    static constexpr PassPlan kPlan{{0, 4, 2, 2, 1, 1, 1, 1, 1}, false, false};

    static Halves load_table(const float *codebook) {
        return {_mm256_loadu_ps(codebook), _mm256_loadu_ps(codebook + 8)};
    }

    template <int P>
    struct Weights {
        const Halves table;
        alignas(32) float tab[P][16];  // per row of W, the block's codebook times its scale

        explicit Weights(const Halves &t) : table(t) {}
        void scale(const WRows<P> &wr, int64_t b) {
            for (int p = 0; p < P; ++p) store_scaled(tab[p], table, wr.scales[p][b]);
        }
        __m256 decode(int p, const uint8_t *packed) const {
            return lookup_mem(tab[p], codes8(packed, nibble_shifts()));
        }
    };

    template <int R, typename T>
    static __m256 load_x(const T *p) {
        return avx2::load(p);
    }

    static __m256 broadcast(float v) { return _mm256_set1_ps(v); }
    static float sum(__m256 v) {
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
    }
    static __m256 fma(__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); }

    template <typename T>
    static void put(T *y, const float *sums) {
        avx2::store(y, _mm256_loadu_ps(sums));
    }

    // 16 weights per step; for bfloat16 the block's table is rounded once, so
    // its lanes hold bfloat16 bits.
    template <typename T>
    struct TileStep {
        static constexpr int kWidth = 16;
        using Table = Halves;
        Table codebook;
        __m256i shifts;

        explicit TileStep(const float *cb) : codebook(load_table(cb)), shifts(nibble_shifts()) {}

        Table table(float scale, bool may_be_nan) const {
            const Table t = scaled(codebook, scale);
            if constexpr (sizeof(T) == 2)
                return {_mm256_castsi256_ps(avx2::bf16_bits(t.lo, may_be_nan)),
                        _mm256_castsi256_ps(avx2::bf16_bits(t.hi, may_be_nan))};
            return t;
        }

        void decode(T *dst, const uint8_t *p8, const Table &tab) const {
            const __m256 w0 = avx2::lookup16(tab.lo, tab.hi, codes8(p8, shifts));
            const __m256 w1 = avx2::lookup16(tab.lo, tab.hi, codes8(p8 + 4, shifts));
            if constexpr (sizeof(T) == 2) {
                // packus interleaves 128-bit halves: [w0 0..3, w1 0..3, w0 4..7, w1 4..7] -> natural order
                const __m256i h = _mm256_packus_epi32(_mm256_castps_si256(w0), _mm256_castps_si256(w1));
                _mm256_storeu_si256(reinterpret_cast<__m256i *>(dst), _mm256_permute4x64_epi64(h, 0xD8));
            } else {
                avx2::store(dst, w0);
                avx2::store(dst + 8, w1);
            }
        }
    };
};

}  // namespace

// From 16 rows forward and 8 backward the panels beat these row kernels (AMD EPYC
// Zen 4, 2 threads, W 4096 x 4096, 11008 x 4096, 4096 x 11008: the row kernels
// win forward up to 8-12 rows, tie at 16; backward their sums in memory lose
// from 8 rows on; docs/performance.md, "Panels").
const MatmulKernels *avx2_matmul_kernels() { return matmul_kernels_with_panels<Avx2>(16, 8); }

}  // namespace nf4core
