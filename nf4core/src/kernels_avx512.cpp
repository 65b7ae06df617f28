// AVX-512 (F, BW, VL, DQ) kernels: 16 elements per vector.
//
// Same arithmetic as the scalar reference (kernels_ref.hpp), one vector at a
// time: block absmax, scale by the float32 reciprocal (full blocks) or divide
// (tail block), clamp, then a branch-free binary search over the sorted
// midpoints with vpermps (16-entry tables) and gathers (the fine steps of
// 256-entry tables). Partial vectors in the tail block use masked loads and
// stores. A block holding a NaN or Inf is handed to the reference kernel,
// which reports the element.
#include <immintrin.h>

#include "kernels_blocks.hpp"
#include "simd_avx512.hpp"

namespace nf4core {
namespace {

// ---- nearest code: the sorted position is the number of midpoints below s --
// 16-entry tables: 4 steps over mid[0..15] (mid[15] = +inf is never compared).
inline __m512i search16(__m512 s, __m512 mid) {
    // step 8 needs no permute: every lane compares with mid[7]
    const __mmask16 a8 = _mm512_cmp_ps_mask(s, _mm512_permutexvar_ps(_mm512_set1_epi32(7), mid), _CMP_GT_OQ);
    __m512i pos = _mm512_maskz_mov_epi32(a8, _mm512_set1_epi32(8));
#pragma GCC unroll 3
    for (int step = 4; step >= 1; step >>= 1) {
        const __m512i probe = _mm512_add_epi32(pos, _mm512_set1_epi32(step - 1));
        const __mmask16 above = _mm512_cmp_ps_mask(s, _mm512_permutexvar_ps(probe, mid), _CMP_GT_OQ);
        pos = _mm512_mask_add_epi32(pos, above, pos, _mm512_set1_epi32(step));
    }
    return pos;
}

// 256-entry tables: 4 coarse steps over every 16th midpoint find the segment
// of 16 (pos16); within it, count the midpoints below s. seg[k] holds the k-th
// midpoint of every segment, so permuting it by pos16 gives each lane its own
// segment's value: 15 permutes, no gathers.
struct Segments {
    __m512 coarse;
    __m512 seg[15];
    explicit Segments(const SearchTable &t) {
        coarse = _mm512_load_ps(t.coarse);
        const __m512i stride = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                                  _mm512_set1_epi32(16));
        for (int k = 0; k < 15; ++k)
            seg[k] = _mm512_i32gather_ps(_mm512_add_epi32(stride, _mm512_set1_epi32(k)), t.mid, 4);
    }
};

inline __m512i search256(__m512 s, const Segments &g) {
    const __m512i pos16 = search16(s, g.coarse);
    __m512i pos = _mm512_slli_epi32(pos16, 4);
    const __m512i one = _mm512_set1_epi32(1);
    for (int k = 0; k < 15; ++k) {
        const __mmask16 above = _mm512_cmp_ps_mask(s, _mm512_permutexvar_ps(pos16, g.seg[k]), _CMP_GT_OQ);
        pos = _mm512_mask_add_epi32(pos, above, pos, one);
    }
    return pos;
}

// Outputs larger than this are written with non-temporal stores: they would
// not stay in cache anyway, and streaming skips reading each line before
// writing it (a third of a dequantize's memory traffic, measured 2-3x faster).
constexpr int64_t kStreamBytes = int64_t(32) << 20;

// Writes a run of consecutive 16-lane vectors starting at `first` (values that
// are not NaN: dequantize's). When streaming, each vector is joined with the
// previous one so that every store lands on an aligned 16-lane boundary,
// whatever the alignment of the output; the unaligned head and tail go out as
// masked stores. After a flush the run may go on further on, 16 lanes apart.
template <typename T>
class Writer {
    using L = avx512::Lanes<T>;
    using W = typename L::W;

public:
    Writer(T *out, int64_t first, bool stream) : out_(out), stream_(stream) {
        constexpr uintptr_t align = 16 * sizeof(T);
        offset_ = int((reinterpret_cast<uintptr_t>(out + first) % align) / sizeof(T));
    }

    void put(int64_t i, __m512 v) {  // elements [i, i + 16), consecutive calls
        const W w = L::pack(v, false);
        if (!stream_) {
            L::store(out_ + i, w);
        } else if (offset_ == 0) {
            L::stream(out_ + i, w);
        } else {
            if (have_prev_)
                L::stream(out_ + i - offset_, L::join(prev_, offset_, w));
            else
                L::store(out_ + i, w, __mmask16((1u << (16 - offset_)) - 1u));
            prev_ = w;
            prev_i_ = i;
            have_prev_ = true;
        }
    }

    void put_partial(int64_t i, __m512 v, __mmask16 m) {  // the last, partial vector
        flush();
        L::store(out_ + i, L::pack(v, false), m);
    }

    void flush() {
        if (have_prev_) L::store(out_ + prev_i_, prev_, __mmask16(~((1u << (16 - offset_)) - 1u)));
        have_prev_ = false;
    }

    ~Writer() {
        flush();
        if (stream_) _mm_sfence();
    }

private:
    T *out_;
    bool stream_;
    int offset_ = 0;
    W prev_{};
    int64_t prev_i_ = 0;
    bool have_prev_ = false;
};

// Software prefetch distance for the input of quantize: the hardware
// prefetchers alone left a core waiting on memory for a third of its time
// (measured 0.85 -> 0.53 ns per element, AVX-512, one thread).
constexpr int kPrefetchBytes = 2048;

// ---- the vector passes of the block loops in kernels_blocks.hpp ---------------
// Masked loads and stores take every element of a block, so vector_end is the
// block's end and the reference's scalar steps have nothing left to do.
struct Avx512 {
    template <int BITS, typename T>
    struct Quantize {
        const SearchTable &tab;
        __m512 mid16;
        Segments segments;
        __m512i order16;

        explicit Quantize(const SearchTable &t)
            : tab(t), mid16(_mm512_load_ps(t.mid)), segments(t), order16(_mm512_load_si512(t.order)) {}

        static int64_t vector_end(int64_t, int64_t end) { return end; }

        // |x| bits above the largest finite float mark a NaN or Inf
        void absmax(const T *x, int64_t i0, int64_t i1, uint32_t &amax_bits, bool &nonfinite) const {
            const __m512i abs_bits = _mm512_set1_epi32(0x7FFFFFFF);
            const __m512i max_finite = _mm512_set1_epi32(0x7F7FFFFF);
            __m512i vmax = _mm512_setzero_si512();
            __mmask16 bad = 0;
            for (int64_t i = i0; i < i1; i += 16) {
                _mm_prefetch(reinterpret_cast<const char *>(x + i) + kPrefetchBytes, _MM_HINT_T0);
                const __m512i v =
                    _mm512_and_si512(_mm512_castps_si512(avx512::Lanes<T>::load(x + i, avx512::lanes_mask(i1 - i))),
                                     abs_bits);
                bad |= _mm512_cmpgt_epi32_mask(v, max_finite);
                vmax = _mm512_max_epi32(vmax, v);  // non-negative floats order like their bits
            }
            amax_bits = uint32_t(_mm512_reduce_max_epi32(vmax));
            nonfinite = bad != 0;
        }

        void encode(const T *x, int64_t i0, int64_t i1, const BlockScale &bs, uint8_t *out) const {
            const __m512 lo = _mm512_set1_ps(-1.0f), hi = _mm512_set1_ps(1.0f);
            const __m512 vscale = _mm512_set1_ps(bs.scale), vrecip = _mm512_set1_ps(bs.recip);
            for (int64_t i = i0; i < i1; i += 16) {
                const __mmask16 m = avx512::lanes_mask(i1 - i);
                // masked-off lanes read 0 and encode the code of 0.0
                const __m512 v = avx512::Lanes<T>::load(x + i, m);
                __m512 s = bs.tail ? _mm512_div_ps(v, vscale) : _mm512_mul_ps(v, vrecip);
                s = _mm512_min_ps(_mm512_max_ps(s, lo), hi);
                if (BITS == 4) {
                    const __m512i code = _mm512_permutexvar_epi32(search16(s, mid16), order16);
                    // pairs of 32-bit codes -> one byte per 64-bit lane: even << 4 | odd
                    const __m512i pair = _mm512_or_si512(_mm512_slli_epi64(code, 4), _mm512_srli_epi64(code, 32));
                    const __m128i bytes = _mm512_cvtepi64_epi8(pair);
                    const int64_t nbytes = (i1 - i + 1) / 2;  // an odd tail keeps the pad code of 0.0
                    if (nbytes >= 8)
                        _mm_storel_epi64(reinterpret_cast<__m128i *>(out + i / 2), bytes);
                    else
                        _mm_mask_storeu_epi8(out + i / 2, __mmask16((1u << nbytes) - 1u), bytes);
                } else {
                    const __m512i pos = search256(s, segments);
                    const __m512i code = tab.identity_order ? pos : _mm512_i32gather_epi32(pos, tab.order, 4);
                    _mm_mask_storeu_epi8(out + i, m, _mm512_cvtepi32_epi8(code));
                }
            }
        }
    };

    template <int BITS, typename T>
    struct Dequantize {
        const DequantizeArgs &a;
        __m512 table;  // 4-bit: the codebook
        Writer<T> w;

        Dequantize(const DequantizeArgs &args, int64_t b0)
            : a(args), table(BITS == 4 ? _mm512_loadu_ps(args.codebook) : _mm512_setzero_ps()),
              w(static_cast<T *>(args.out), b0 * args.blocksize, args.n * int64_t(sizeof(T)) >= kStreamBytes) {}

        static int64_t vector_end(int64_t, int64_t end) { return end; }

        void gap() { w.flush(); }  // the run of vectors goes on after the reference's block

        void decode(T *, int64_t i0, int64_t i1, float scale) {
            const __m512 vscale = _mm512_set1_ps(scale);
            if (BITS == 4) _mm_prefetch(reinterpret_cast<const char *>(a.in + i0 / 2) + kPrefetchBytes, _MM_HINT_T0);
            for (int64_t i = i0; i < i1; i += 16) {
                const int64_t rem = i1 - i;
                __m512 v;
                if (BITS == 4) {
                    const __m128i low4 = _mm_set1_epi8(0x0F);
                    const __m128i bytes =
                        rem >= 16 ? _mm_loadl_epi64(reinterpret_cast<const __m128i *>(a.in + i / 2))
                                  : _mm_maskz_loadu_epi8(__mmask16((1u << ((rem + 1) / 2)) - 1u), a.in + i / 2);
                    const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low4);
                    const __m128i codes = _mm_unpacklo_epi8(hi, _mm_and_si128(bytes, low4));  // element order
                    v = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(codes), table);
                } else {
                    if ((i & 63) == 0)
                        _mm_prefetch(reinterpret_cast<const char *>(a.in + i) + kPrefetchBytes, _MM_HINT_T0);
                    const __m128i bytes = _mm_maskz_loadu_epi8(avx512::lanes_mask(rem), a.in + i);
                    v = _mm512_i32gather_ps(_mm512_cvtepu8_epi32(bytes), a.codebook, 4);
                }
                v = _mm512_mul_ps(v, vscale);
                if (rem >= 16)
                    w.put(i, v);
                else
                    w.put_partial(i, v, avx512::lanes_mask(rem));
            }
        }
    };
};

}  // namespace

const KernelSet *avx512_kernels() {
    static const KernelSet k = kernel_set<VectorKernels<Avx512>>("avx512");
    return &k;
}

}  // namespace nf4core
