// NEON products with a 4-bit matrix (aarch64, where NEON is baseline; see
// nf4core/matmul.h): the design of matmul_avx512.cpp on 4-lane vectors.
//
// Decoding: 8 packed bytes give 16 codes as bytes (high nibble first, as
// bitsandbytes packs them). The 16-entry float32 table is held as four byte
// planes (plane b = byte b of every entry), so four vqtbl1q_u8 look up all 16
// weights and two rounds of zips reassemble them as 4 float32 vectors in
// natural order. A decoded code value is multiplied by its block scale exactly
// as decode_value does, so the weights are those of pq.dequantize and only the
// order of the float32 sums differs from the reference.
//
// With M <= 8 rows of x, P rows of W are decoded together and each decoded
// vector is used for all M rows, so the weight is streamed once. Needs
// K % 16 == 0 and K % blocksize == 0 (matmul.cpp falls back to the reference
// otherwise). decode_tile works on any tile and is bit-identical to the
// reference (the bfloat16 rounding included, NaN as to_bfloat16).
// Correctness is tested under qemu-aarch64 (nf4core/tests/test_matmul_isa.cpp);
// speed has not been measured on ARM hardware.
#include <arm_neon.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "matmul.hpp"

namespace nf4core {
namespace {

inline float32x4_t load4(const float *p) { return vld1q_f32(p); }
inline float32x4_t load4(const bfloat16_t *p) {
    uint16x4_t h;
    std::memcpy(&h, p, 8);
    return vreinterpretq_f32_u32(vshll_n_u16(h, 16));
}

// float32 -> bfloat16 bits: round to nearest even, NaN kept quiet (as to_bfloat16)
inline uint16x4_t bf16_bits(float32x4_t v) {
    const uint32x4_t u = vreinterpretq_u32_f32(v);
    const uint32x4_t hi = vshrq_n_u32(u, 16);
    const uint32x4_t lsb = vandq_u32(hi, vdupq_n_u32(1));
    const uint32x4_t r = vshrq_n_u32(vaddq_u32(u, vaddq_u32(vdupq_n_u32(0x7FFF), lsb)), 16);
    const uint32x4_t quiet = vorrq_u32(hi, vdupq_n_u32(0x40));
    const uint32x4_t is_num = vceqq_f32(v, v);
    return vmovn_u32(vbslq_u32(is_num, r, quiet));
}

inline void store4(float *p, float32x4_t v) { vst1q_f32(p, v); }
inline void store4(bfloat16_t *p, float32x4_t v) {
    const uint16x4_t h = bf16_bits(v);
    std::memcpy(p, &h, 8);
}

// 16 floats as byte planes: plane[b] lane j = byte b of entry j (little endian)
struct Planes {
    uint8x16_t p[4];
};

inline Planes planes_of(float32x4_t q0, float32x4_t q1, float32x4_t q2, float32x4_t q3) {
    const uint8x16_t b0 = vreinterpretq_u8_f32(q0), b1 = vreinterpretq_u8_f32(q1);
    const uint8x16_t b2 = vreinterpretq_u8_f32(q2), b3 = vreinterpretq_u8_f32(q3);
    const uint8x16_t e01 = vuzp1q_u8(b0, b1), o01 = vuzp2q_u8(b0, b1);  // bytes {0,2}, {1,3} of entries 0..7
    const uint8x16_t e23 = vuzp1q_u8(b2, b3), o23 = vuzp2q_u8(b2, b3);  // of entries 8..15
    return {{vuzp1q_u8(e01, e23), vuzp1q_u8(o01, o23), vuzp2q_u8(e01, e23), vuzp2q_u8(o01, o23)}};
}

inline Planes table_planes(const float *t) {
    return planes_of(vld1q_f32(t), vld1q_f32(t + 4), vld1q_f32(t + 8), vld1q_f32(t + 12));
}

inline Planes scaled_planes(const float *t, float s) {
    return planes_of(vmulq_n_f32(vld1q_f32(t), s), vmulq_n_f32(vld1q_f32(t + 4), s),
                     vmulq_n_f32(vld1q_f32(t + 8), s), vmulq_n_f32(vld1q_f32(t + 12), s));
}

// The scaled table rounded to bfloat16 (as to_bfloat16), as two byte planes in
// p[0] (low bytes) and p[1] (high bytes).
inline Planes bf16_planes(const float *t, float s) {
    const uint16x8_t e0 =
        vcombine_u16(bf16_bits(vmulq_n_f32(vld1q_f32(t), s)), bf16_bits(vmulq_n_f32(vld1q_f32(t + 4), s)));
    const uint16x8_t e1 =
        vcombine_u16(bf16_bits(vmulq_n_f32(vld1q_f32(t + 8), s)), bf16_bits(vmulq_n_f32(vld1q_f32(t + 12), s)));
    const uint8x16_t b0 = vreinterpretq_u8_u16(e0), b1 = vreinterpretq_u8_u16(e1);
    return {{vuzp1q_u8(b0, b1), vuzp2q_u8(b0, b1), vdupq_n_u8(0), vdupq_n_u8(0)}};
}

// the 16 codes packed in p8[0..7], natural order (element 2j: high nibble of byte j)
inline uint8x16_t codes16(const uint8_t *p8) {
    const uint8x8_t b = vld1_u8(p8);
    const uint8x8x2_t z = vzip_u8(vshr_n_u8(b, 4), vand_u8(b, vdup_n_u8(0x0F)));
    return vcombine_u8(z.val[0], z.val[1]);
}

// table[codes] as 4 vectors of 4 floats (elements 0..3, 4..7, 8..11, 12..15)
inline void lookup16(const Planes &t, uint8x16_t codes, float32x4_t w[4]) {
    const uint8x16_t b0 = vqtbl1q_u8(t.p[0], codes), b1 = vqtbl1q_u8(t.p[1], codes);
    const uint8x16_t b2 = vqtbl1q_u8(t.p[2], codes), b3 = vqtbl1q_u8(t.p[3], codes);
    const uint16x8_t l01 = vreinterpretq_u16_u8(vzip1q_u8(b0, b1)), h01 = vreinterpretq_u16_u8(vzip2q_u8(b0, b1));
    const uint16x8_t l23 = vreinterpretq_u16_u8(vzip1q_u8(b2, b3)), h23 = vreinterpretq_u16_u8(vzip2q_u8(b2, b3));
    w[0] = vreinterpretq_f32_u16(vzip1q_u16(l01, l23));
    w[1] = vreinterpretq_f32_u16(vzip2q_u16(l01, l23));
    w[2] = vreinterpretq_f32_u16(vzip1q_u16(h01, h23));
    w[3] = vreinterpretq_f32_u16(vzip2q_u16(h01, h23));
}

// 16 weights of one block row from flat index i (i % 16 == 0): codes looked up, times the scale
inline void decode16(const Planes &table, const uint8_t *packed, int64_t i, float scale, float32x4_t w[4]) {
    lookup16(table, codes16(packed + (i >> 1)), w);
    for (int j = 0; j < 4; ++j) w[j] = vmulq_n_f32(w[j], scale);
}

template <int R>
constexpr int rows_of_w() { return R == 1 ? 4 : R <= 4 ? 2 : 1; }

// y[m0 + r, n .. n+P-1] for r < R: P rows of W in one pass.
template <int R, int P, typename T>
inline void block_transposed(const MatmulArgs &a, const Planes &table, int shift, int64_t m0, int64_t n) {
    const T *x = static_cast<const T *>(a.x) + m0 * a.K;
    float32x4_t acc[R][P];
    for (int r = 0; r < R; ++r)
        for (int p = 0; p < P; ++p) acc[r][p] = vdupq_n_f32(0.0f);
    const uint8_t *wrow[P];
    const float *srow[P];
    for (int p = 0; p < P; ++p) {
        wrow[p] = a.packed + (n + p) * a.K / 2;
        srow[p] = a.scales + (((n + p) * a.K) >> shift);
    }
    const int64_t nblocks = a.K >> shift;
    for (int64_t b = 0; b < nblocks; ++b) {
        const int64_t k0 = b << shift, k1 = k0 + a.blocksize;
        for (int64_t k = k0; k < k1; k += 16) {
            float32x4_t w[P][4];
            for (int p = 0; p < P; ++p) decode16(table, wrow[p], k, srow[p][b], w[p]);
            for (int r = 0; r < R; ++r)
                for (int j = 0; j < 4; ++j) {
                    const float32x4_t xv = load4(x + r * a.K + k + 4 * j);
                    for (int p = 0; p < P; ++p) acc[r][p] = vfmaq_f32(acc[r][p], xv, w[p][j]);
                }
        }
    }
    T *y = static_cast<T *>(a.y);
    for (int r = 0; r < R; ++r)
        for (int p = 0; p < P; ++p) y[(m0 + r) * a.N + n + p] = from_float<T>(vaddvq_f32(acc[r][p]));
}

template <int R, typename T>
void rows_transposed(const MatmulArgs &a, const Planes &table, int shift, int64_t m0, int64_t c0, int64_t c1) {
    constexpr int P = rows_of_w<R>();
    int64_t n = c0;
    for (; n + P <= c1; n += P) block_transposed<R, P, T>(a, table, shift, m0, n);
    for (; n < c1; ++n) block_transposed<R, 1, T>(a, table, shift, m0, n);
}

// acc[r, k - c0] += sum_p x[m0 + r, n + p] W[n + p, k] for k in [c0, c1)
template <int R, int P, typename T>
inline void block_plain(const MatmulArgs &a, float *acc, int64_t len, const Planes &table, int shift, int64_t m0,
                        int64_t n, int64_t c0, int64_t c1) {
    const T *x = static_cast<const T *>(a.x);
    float g[R][P];
    for (int r = 0; r < R; ++r)
        for (int p = 0; p < P; ++p) g[r][p] = to_float(x[(m0 + r) * a.N + n + p]);
    const uint8_t *wrow[P];
    const float *srow[P];
    for (int p = 0; p < P; ++p) {
        wrow[p] = a.packed + (n + p) * a.K / 2;
        srow[p] = a.scales + (((n + p) * a.K) >> shift);
    }
    for (int64_t k = c0; k < c1; k += 16) {  // c0, c1 multiples of 16: 16 weights lie in one block
        const int64_t b = k >> shift;
        float32x4_t w[P][4];
        for (int p = 0; p < P; ++p) decode16(table, wrow[p], k, srow[p][b], w[p]);
        for (int r = 0; r < R; ++r)
            for (int j = 0; j < 4; ++j) {
                float *dst = acc + r * len + (k - c0) + 4 * j;
                float32x4_t sum = vld1q_f32(dst);
                for (int p = 0; p < P; ++p) sum = vfmaq_n_f32(sum, w[p][j], g[r][p]);
                vst1q_f32(dst, sum);
            }
    }
}

template <int R, typename T>
void rows_plain(const MatmulArgs &a, const Planes &table, int shift, int64_t m0, int64_t c0, int64_t c1) {
    constexpr int P = rows_of_w<R>();
    const int64_t len = c1 - c0;
    float *acc = zeroed_partial_sums(size_t(R * len));
    int64_t n = 0;
    for (; n + P <= a.N; n += P) block_plain<R, P, T>(a, acc, len, table, shift, m0, n, c0, c1);
    for (; n < a.N; ++n) block_plain<R, 1, T>(a, acc, len, table, shift, m0, n, c0, c1);
    T *y = static_cast<T *>(a.y);
    for (int r = 0; r < R; ++r)
        for (int64_t k = c0; k < c1; k += 4) store4(y + (m0 + r) * a.K + k, vld1q_f32(acc + r * len + k - c0));
}

template <typename T>
void matmul(const MatmulArgs &a, int64_t c0, int64_t c1) {
    const Planes table = table_planes(a.codebook);
    const int shift = __builtin_ctzll(uint64_t(a.blocksize));
    for_row_groups(a.M, [&](auto rows, int64_t m0) {
        constexpr int R = decltype(rows)::value;
        if (a.transpose)
            rows_transposed<R, T>(a, table, shift, m0, c0, c1);
        else
            rows_plain<R, T>(a, table, shift, m0, c0, c1);
    });
}

// W[n, k0:k1] for n in [r0, r1) into out (row-major, row length k1 - k0): 16
// weights per step from a flat index that is a multiple of 16 (one block, as
// blocksize >= 32), looked up in the block's scaled codebook (for bfloat16
// already rounded).
template <typename T>
void decode_tile(const TileArgs &t, int64_t r0, int64_t r1) {
    const int shift = __builtin_ctzll(uint64_t(t.blocksize));
    const int64_t width = t.k1 - t.k0;
    T *out = static_cast<T *>(t.out);
    auto scalar = [&](T *dst, int64_t i) {
        *dst = from_float<T>(decode_value(t.codebook[nibble_at(t.packed, i)], t.scales[i >> shift]));
    };
    for (int64_t n = r0; n < r1; ++n) {
        T *dst = out + (n - t.n0) * width - t.k0;
        const int64_t row = n * t.K;
        int64_t k = t.k0;
        for (; k < t.k1 && (row + k) % 16 != 0; ++k) scalar(dst + k, row + k);
        int64_t block = -1;
        Planes tab{};
        for (; k + 16 <= t.k1; k += 16) {
            const int64_t i = row + k;
            if ((i >> shift) != block) {
                block = i >> shift;
                if constexpr (sizeof(T) == 2)
                    tab = bf16_planes(t.codebook, t.scales[block]);
                else
                    tab = scaled_planes(t.codebook, t.scales[block]);
            }
            const uint8x16_t codes = codes16(t.packed + (i >> 1));
            if constexpr (sizeof(T) == 2) {  // two byte planes of the rounded table: 16 bfloat16 values
                const uint8x16_t lo = vqtbl1q_u8(tab.p[0], codes), hi = vqtbl1q_u8(tab.p[1], codes);
                vst1q_u8(reinterpret_cast<uint8_t *>(dst + k), vzip1q_u8(lo, hi));
                vst1q_u8(reinterpret_cast<uint8_t *>(dst + k + 8), vzip2q_u8(lo, hi));
            } else {
                float32x4_t w[4];
                lookup16(tab, codes, w);
                for (int j = 0; j < 4; ++j) store4(dst + k + 4 * j, w[j]);
            }
        }
        for (; k < t.k1; ++k) scalar(dst + k, row + k);
    }
}

}  // namespace

const MatmulKernels *neon_matmul_kernels() {
    static const MatmulKernels k{matmul<float>, matmul<bfloat16_t>, decode_tile<float>, decode_tile<bfloat16_t>};
    return &k;
}

}  // namespace nf4core
