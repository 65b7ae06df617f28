// NEON kernels (aarch64, where NEON is baseline): 4 float32 lanes per vector.
//
// 4-bit quantize counts the midpoints below each scaled value (15 compares,
// branch-free) and maps sorted positions to codes with a byte table lookup;
// 4-bit dequantize looks values up with vqtbl4q_u8 on the table's bytes. The
// 8-bit search keeps the reference's scalar binary search after vector scaling.
// Byte-identical to the reference; tested under qemu-aarch64 (see README).
#include <arm_neon.h>

#include <cstring>

#include "kernels_blocks.hpp"
#include "simd_neon.hpp"

namespace nf4core {
namespace {

// number of midpoints below s: sum of (s > mid[k]) for k = 0..14
inline uint32x4_t count_below(float32x4_t s, const float *mid) {
    uint32x4_t pos = vdupq_n_u32(0);
    for (int k = 0; k < 15; ++k) pos = vsubq_u32(pos, vcgtq_f32(s, vdupq_n_f32(mid[k])));  // true is all ones
    return pos;
}

// The vector passes of the block loops in kernels_blocks.hpp: 16 elements per
// step of the codes (4 vectors), so vector_end leaves the last partial 16 of a
// tail block to the reference's scalar steps.
struct Neon {
    static int64_t vector_end(int64_t begin, int64_t end) { return begin + ((end - begin) & ~int64_t(15)); }

    template <int BITS, typename T>
    struct Quantize {
        const SearchTable &tab;
        uint8x16_t order;  // sorted position -> code, as bytes

        explicit Quantize(const SearchTable &t) : tab(t) {
            uint8_t order_bytes[16];
            for (int i = 0; i < 16; ++i) order_bytes[i] = uint8_t(t.order[i]);
            order = vld1q_u8(order_bytes);
        }

        static int64_t vector_end(int64_t begin, int64_t end) { return Neon::vector_end(begin, end); }

        void absmax(const T *x, int64_t i0, int64_t i1, uint32_t &amax_bits, bool &nonfinite) const {
            uint32x4_t vmax = vdupq_n_u32(0), bad = vdupq_n_u32(0);
            for (int64_t i = i0; i < i1; i += 4) {
                const uint32x4_t v = vandq_u32(vreinterpretq_u32_f32(neon::load(x + i)), vdupq_n_u32(0x7FFFFFFF));
                bad = vorrq_u32(bad, vcgtq_u32(v, vdupq_n_u32(0x7F7FFFFF)));
                vmax = vmaxq_u32(vmax, v);
            }
            amax_bits = vmaxvq_u32(vmax);
            nonfinite = vmaxvq_u32(bad) != 0;
        }

        void encode(const T *x, int64_t i0, int64_t i1, const BlockScale &bs, uint8_t *out) const {
            const float32x4_t lo = vdupq_n_f32(-1.0f), hi = vdupq_n_f32(1.0f);
            const float32x4_t vscale = vdupq_n_f32(bs.scale), vrecip = vdupq_n_f32(bs.recip);
            for (int64_t i = i0; i < i1; i += 16) {
                uint32x4_t pos[4];
                float s_lanes[16];
                for (int j = 0; j < 4; ++j) {
                    const float32x4_t v = neon::load(x + i + 4 * j);
                    float32x4_t s = bs.tail ? vdivq_f32(v, vscale) : vmulq_f32(v, vrecip);
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
                    vst1_u8(out + i / 2, packed);
                } else {
                    for (int j = 0; j < 16; ++j) out[i + j] = nearest_code<256>(tab, s_lanes[j]);
                }
            }
        }
    };

    template <int BITS, typename T>
    struct Dequantize : DirectStores {
        const DequantizeArgs &a;
        uint8x16x4_t table;  // 4-bit: the 16 float32 values as 64 bytes

        Dequantize(const DequantizeArgs &args, int64_t) : a(args), table() {
            if (BITS == 4) std::memcpy(&table, args.codebook, 64);
        }

        // 8-bit: 4 elements per step
        static int64_t vector_end(int64_t begin, int64_t end) {
            return BITS == 4 ? Neon::vector_end(begin, end) : begin + ((end - begin) & ~int64_t(3));
        }

        void decode(T *out, int64_t i0, int64_t i1, float scale) const {
            const float32x4_t vscale = vdupq_n_f32(scale);
            if (BITS == 8) {
                for (int64_t i = i0; i < i1; i += 4) {
                    const float v[4] = {a.codebook[a.in[i]], a.codebook[a.in[i + 1]], a.codebook[a.in[i + 2]],
                                        a.codebook[a.in[i + 3]]};
                    neon::store(out + i, vmulq_f32(vld1q_f32(v), vscale), false);
                }
                return;
            }
            // byte k of lane j of a 4-lane vector comes from table byte 4 * code_j + k
            const uint8x16_t spread = {0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3};
            const uint8x16_t within = {0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3};
            for (int64_t i = i0; i < i1; i += 16) {
                const uint8x8_t bytes = vld1_u8(a.in + i / 2);
                const uint8x8_t high = vshr_n_u8(bytes, 4), low = vand_u8(bytes, vdup_n_u8(0x0F));
                const uint8x16_t codes = vcombine_u8(vzip1_u8(high, low), vzip2_u8(high, low));
                for (int j = 0; j < 4; ++j) {
                    const uint8x16_t lane_codes = vqtbl1q_u8(codes, vaddq_u8(spread, vdupq_n_u8(uint8_t(4 * j))));
                    const uint8x16_t idx = vaddq_u8(vshlq_n_u8(lane_codes, 2), within);
                    const float32x4_t v = vreinterpretq_f32_u8(vqtbl4q_u8(table, idx));
                    neon::store(out + i + 4 * j, vmulq_f32(v, vscale), false);
                }
            }
        }
    };
};

}  // namespace

const KernelSet *neon_kernels() {
    static const KernelSet k = kernel_set<VectorKernels<Neon>>("neon");
    return &k;
}

}  // namespace nf4core
