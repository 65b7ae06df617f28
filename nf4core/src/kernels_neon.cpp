// NEON kernels (aarch64, where NEON is baseline): 4 float32 lanes per vector.
//
// 4-bit quantize counts the midpoints below each scaled value (15 compares,
// branch-free) and maps sorted positions to codes with a byte table lookup;
// 4-bit dequantize looks values up with vqtbl4q_u8 on the table's bytes. The
// 8-bit search keeps the reference's scalar binary search after vector scaling.
// Byte-identical to the reference; tested under qemu-aarch64 (see README).
#include <arm_neon.h>

#include <cstring>

#include "kernels.hpp"
#include "kernels_ref.hpp"

namespace nf4core {
namespace {

template <typename T>
struct Lanes;

template <>
struct Lanes<float> {
    static float32x4_t load(const float *p) { return vld1q_f32(p); }
    static void store(float *p, float32x4_t v) { vst1q_f32(p, v); }
};

template <>
struct Lanes<bfloat16_t> {
    static float32x4_t load(const bfloat16_t *p) {
        uint16x4_t h;
        std::memcpy(&h, p, 8);
        return vreinterpretq_f32_u32(vshll_n_u16(h, 16));
    }
    static void store(bfloat16_t *p, float32x4_t v) {  // round to nearest even (outputs are never NaN)
        const uint32x4_t u = vreinterpretq_u32_f32(v);
        const uint32x4_t lsb = vandq_u32(vshrq_n_u32(u, 16), vdupq_n_u32(1));
        const uint16x4_t r = vshrn_n_u32(vaddq_u32(u, vaddq_u32(vdupq_n_u32(0x7FFF), lsb)), 16);
        std::memcpy(p, &r, 8);
    }
};

template <>
struct Lanes<half_t> {
    static float32x4_t load(const half_t *p) {
        float16x4_t h;
        std::memcpy(&h, p, 8);
        return vcvt_f32_f16(h);
    }
    static void store(half_t *p, float32x4_t v) {  // IEEE round to nearest even
        const float16x4_t h = vcvt_f16_f32(v);
        std::memcpy(p, &h, 8);
    }
};

// number of midpoints below s: sum of (s > mid[k]) for k = 0..14
inline uint32x4_t count_below(float32x4_t s, const float *mid) {
    uint32x4_t pos = vdupq_n_u32(0);
    for (int k = 0; k < 15; ++k) pos = vsubq_u32(pos, vcgtq_f32(s, vdupq_n_f32(mid[k])));  // true is all ones
    return pos;
}

template <int BITS, typename T>
void quantize(const QuantizeArgs &a, int64_t b0, int64_t b1) {
    using L = Lanes<T>;
    const T *x = static_cast<const T *>(a.x);
    const SearchTable &tab = *a.table;
    uint8_t order_bytes[16];
    for (int i = 0; i < 16; ++i) order_bytes[i] = uint8_t(tab.order[i]);
    const uint8x16_t order = vld1q_u8(order_bytes);
    const float32x4_t lo = vdupq_n_f32(-1.0f), hi = vdupq_n_f32(1.0f);

    for (int64_t b = b0; b < b1; ++b) {
        const int64_t begin = b * a.blocksize;
        const int64_t end = begin + a.blocksize < a.n ? begin + a.blocksize : a.n;
        const int64_t vend = begin + ((end - begin) & ~int64_t(15));
        uint32x4_t vmax = vdupq_n_u32(0), bad = vdupq_n_u32(0);
        for (int64_t i = begin; i < vend; i += 4) {
            const uint32x4_t v = vandq_u32(vreinterpretq_u32_f32(L::load(x + i)), vdupq_n_u32(0x7FFFFFFF));
            bad = vorrq_u32(bad, vcgtq_u32(v, vdupq_n_u32(0x7F7FFFFF)));
            vmax = vmaxq_u32(vmax, v);
        }
        uint32_t amax_bits = vmaxvq_u32(vmax);
        bool nonfinite = vmaxvq_u32(bad) != 0;
        ref::fold_absmax(x, vend, end, amax_bits, nonfinite);
        if (nonfinite) {  // the reference kernel names the first non-finite element
            ref::quantize_blocks<BITS, T>(x, a.n, a.blocksize, tab, a.out, a.absmax, b, b + 1);
            continue;
        }
        const ref::BlockScale bs = ref::block_scale(bits_float(amax_bits), end - begin, a.blocksize);
        const float scale = bs.scale, recip = bs.recip;
        const bool tail = bs.tail;
        a.absmax[b] = bs.stored;
        const float32x4_t vscale = vdupq_n_f32(scale), vrecip = vdupq_n_f32(recip);

        for (int64_t i = begin; i < vend; i += 16) {
            uint32x4_t pos[4];
            float s_lanes[16];
            for (int j = 0; j < 4; ++j) {
                const float32x4_t v = L::load(x + i + 4 * j);
                float32x4_t s = tail ? vdivq_f32(v, vscale) : vmulq_f32(v, vrecip);
                s = vminq_f32(vmaxq_f32(s, lo), hi);
                if (BITS == 4)
                    pos[j] = count_below(s, tab.mid);
                else
                    vst1q_f32(s_lanes + 4 * j, s);
            }
            if (BITS == 4) {
                const uint16x8_t p01 = vcombine_u16(vmovn_u32(pos[0]), vmovn_u32(pos[1]));
                const uint16x8_t p23 = vcombine_u16(vmovn_u32(pos[2]), vmovn_u32(pos[3]));
                const uint8x16_t codes = vqtbl1q_u8(order, vcombine_u8(vmovn_u16(p01), vmovn_u16(p23)));
                const uint8x16x2_t eo = vuzpq_u8(codes, codes);  // even elements, odd elements
                const uint8x8_t packed = vorr_u8(vshl_n_u8(vget_low_u8(eo.val[0]), 4), vget_low_u8(eo.val[1]));
                vst1_u8(a.out + i / 2, packed);
            } else {
                for (int j = 0; j < 16; ++j) a.out[i + j] = nearest_code<256>(tab, s_lanes[j]);
            }
        }
        // the last partial vector of a tail block, with the reference's scalar steps
        ref::encode_range<BITS, T>(x, vend, end, scale, recip, tail, tab, a.out);
        if (BITS == 4 && end == a.n) ref::pad_odd_end(a.n, tab, a.out);
    }
}

template <typename T>
void dequantize4(const DequantizeArgs &a, int64_t b0, int64_t b1) {
    using L = Lanes<T>;
    T *out = static_cast<T *>(a.out);
    uint8x16x4_t table;  // the 16 float32 values as 64 bytes
    std::memcpy(&table, a.codebook, 64);
    // byte k of lane j of a 4-lane vector comes from table byte 4 * code_j + k
    const uint8x16_t spread = {0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3};
    const uint8x16_t within = {0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3};
    for (int64_t b = b0; b < b1; ++b) {
        const int64_t begin = b * a.blocksize;
        const int64_t end = begin + a.blocksize < a.n ? begin + a.blocksize : a.n;
        const int64_t vend = begin + ((end - begin) & ~int64_t(15));
        const float scale = a.absmax[b];
        const float32x4_t vscale = vdupq_n_f32(scale);
        for (int64_t i = begin; i < vend; i += 16) {
            const uint8x8_t bytes = vld1_u8(a.in + i / 2);
            const uint8x16_t codes = vcombine_u8(vzip1_u8(vshr_n_u8(bytes, 4), vand_u8(bytes, vdup_n_u8(0x0F))),
                                                 vzip2_u8(vshr_n_u8(bytes, 4), vand_u8(bytes, vdup_n_u8(0x0F))));
            for (int j = 0; j < 4; ++j) {
                const uint8x16_t lane_codes = vqtbl1q_u8(codes, vaddq_u8(spread, vdupq_n_u8(uint8_t(4 * j))));
                const uint8x16_t idx = vaddq_u8(vshlq_n_u8(lane_codes, 2), within);
                const float32x4_t v = vreinterpretq_f32_u8(vqtbl4q_u8(table, idx));
                L::store(out + i + 4 * j, vmulq_f32(v, vscale));
            }
        }
        ref::decode_range<4, T>(a.in, a.codebook, scale, out, vend, end);
    }
}

template <typename T>
void dequantize8(const DequantizeArgs &a, int64_t b0, int64_t b1) {
    using L = Lanes<T>;
    T *out = static_cast<T *>(a.out);
    for (int64_t b = b0; b < b1; ++b) {
        const int64_t begin = b * a.blocksize;
        const int64_t end = begin + a.blocksize < a.n ? begin + a.blocksize : a.n;
        const int64_t vend = begin + ((end - begin) & ~int64_t(3));
        const float scale = a.absmax[b];
        const float32x4_t vscale = vdupq_n_f32(scale);
        for (int64_t i = begin; i < vend; i += 4) {
            const float v[4] = {a.codebook[a.in[i]], a.codebook[a.in[i + 1]], a.codebook[a.in[i + 2]],
                                a.codebook[a.in[i + 3]]};
            L::store(out + i, vmulq_f32(vld1q_f32(v), vscale));
        }
        ref::decode_range<8, T>(a.in, a.codebook, scale, out, vend, end);
    }
}

}  // namespace

const KernelSet *neon_kernels() {
    static const KernelSet k = NF4_KERNEL_SET("neon", quantize, dequantize4, dequantize8);
    return &k;
}

}  // namespace nf4core
