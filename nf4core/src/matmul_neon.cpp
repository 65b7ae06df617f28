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
// The row groups, the passes over P rows of W and decode_tile's loops are
// matmul_rows.hpp's; the NEON steps are the struct Neon below.
// Correctness is tested under qemu-aarch64 (nf4core/tests/test_matmul_isa.cpp);
// speed has not been measured on ARM hardware.
#include <arm_neon.h>

#include "matmul_rows.hpp"
#include "simd_neon.hpp"

namespace nf4core {
namespace {

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

inline Planes scaled_planes(const float *t, float s) {
    return planes_of(vmulq_n_f32(vld1q_f32(t), s), vmulq_n_f32(vld1q_f32(t + 4), s),
                     vmulq_n_f32(vld1q_f32(t + 8), s), vmulq_n_f32(vld1q_f32(t + 12), s));
}

// The scaled table rounded to bfloat16 (as to_bfloat16), as two byte planes in
// p[0] (low bytes) and p[1] (high bytes).
inline Planes bf16_planes(const float *t, float s, bool may_be_nan) {
    const uint16x8_t e0 = vcombine_u16(neon::bf16_bits(vmulq_n_f32(vld1q_f32(t), s), may_be_nan),
                                       neon::bf16_bits(vmulq_n_f32(vld1q_f32(t + 4), s), may_be_nan));
    const uint16x8_t e1 = vcombine_u16(neon::bf16_bits(vmulq_n_f32(vld1q_f32(t + 8), s), may_be_nan),
                                       neon::bf16_bits(vmulq_n_f32(vld1q_f32(t + 12), s), may_be_nan));
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

// 16 consecutive float32 values as 4 vectors (elements 0..3, 4..7, 8..11, 12..15)
struct Quad {
    float32x4_t q[4];
};

// The ops of matmul_rows.hpp: 16 weights per step, as a Quad; an accumulator of
// x W^T is one vector that the 4 parts of a step add into in turn.
struct Neon : XAsIs {
    using Vec = Quad;
    static constexpr PassPlan kPlan{{0, 4, 2, 2, 2, 1, 1, 1, 1}, false, false};

    static Planes load_table(const float *t) {
        return planes_of(vld1q_f32(t), vld1q_f32(t + 4), vld1q_f32(t + 8), vld1q_f32(t + 12));
    }

    // A code value is looked up, then multiplied by its block scale (as decode_value)
    template <int P>
    struct Weights {
        const Planes table;
        float scales[P];

        explicit Weights(const Planes &t) : table(t) {}
        void scale(const WRows<P> &wr, int64_t b) {
            for (int p = 0; p < P; ++p) scales[p] = wr.scales[p][b];
        }
        Quad decode(int p, const uint8_t *packed) const {
            Quad w;
            lookup16(table, codes16(packed), w.q);
            for (int j = 0; j < 4; ++j) w.q[j] = vmulq_n_f32(w.q[j], scales[p]);
            return w;
        }
    };

    template <int R, typename T>
    static Quad load_x(const T *p) {
        return {{neon::load(p), neon::load(p + 4), neon::load(p + 8), neon::load(p + 12)}};
    }

    static float32x4_t broadcast(float v) { return vdupq_n_f32(v); }
    static float sum(float32x4_t v) { return vaddvq_f32(v); }
    static float32x4_t fma(const Quad &x, const Quad &w, float32x4_t acc) {
        for (int j = 0; j < 4; ++j) acc = vfmaq_f32(acc, x.q[j], w.q[j]);
        return acc;
    }
    static Quad fma(float32x4_t g, const Quad &w, Quad s) {
        for (int j = 0; j < 4; ++j) s.q[j] = vfmaq_f32(s.q[j], w.q[j], g);
        return s;
    }

    template <typename T>
    static void put(T *y, const float *sums) {
        for (int j = 0; j < 4; ++j) neon::store(y + 4 * j, vld1q_f32(sums + 4 * j));
    }

    // 16 weights per step, looked up in the block's scaled codebook (for
    // bfloat16 already rounded: two byte planes give 16 bfloat16 values).
    template <typename T>
    struct TileStep {
        static constexpr int kWidth = 16;
        using Table = Planes;
        const float *codebook;

        explicit TileStep(const float *cb) : codebook(cb) {}

        Table table(float scale, bool may_be_nan) const {
            if constexpr (sizeof(T) == 2)
                return bf16_planes(codebook, scale, may_be_nan);
            else
                return scaled_planes(codebook, scale);
        }

        void decode(T *dst, const uint8_t *packed, const Table &tab) const {
            const uint8x16_t codes = codes16(packed);
            if constexpr (sizeof(T) == 2) {
                const uint8x16_t lo = vqtbl1q_u8(tab.p[0], codes), hi = vqtbl1q_u8(tab.p[1], codes);
                vst1q_u8(reinterpret_cast<uint8_t *>(dst), vzip1q_u8(lo, hi));
                vst1q_u8(reinterpret_cast<uint8_t *>(dst + 8), vzip2q_u8(lo, hi));
            } else {
                float32x4_t w[4];
                lookup16(tab, codes, w);
                for (int j = 0; j < 4; ++j) neon::store(dst + 4 * j, w[j]);
            }
        }
    };
};

}  // namespace

const MatmulKernels *neon_matmul_kernels() { return matmul_kernels<Neon>(); }

}  // namespace nf4core
