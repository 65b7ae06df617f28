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

#include "kernels.hpp"
#include "kernels_ref.hpp"

namespace nf4core {
namespace {

// ---- element access -----------------------------------------------------------
// load: 16 elements as float32 (masked-off lanes read 0). pack: 16 float32 to the
// stored form W (a whole __m512 for float32, a __m256i of 16-bit values), then
// stored unaligned, masked, or streamed (non-temporal, aligned address).
template <typename T>
struct Lanes;

template <>
struct Lanes<float> {
    using W = __m512;
    static __m512 load(const float *p) { return _mm512_loadu_ps(p); }
    static __m512 load(const float *p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
    static W pack(__m512 v) { return v; }
    static void store(float *p, W w) { _mm512_storeu_ps(p, w); }
    static void store(float *p, W w, __mmask16 m) { _mm512_mask_storeu_ps(p, m, w); }
    static void stream(float *p, W w) { _mm512_stream_ps(p, w); }
    static W join(W prev, int offset, W cur) {  // lanes [16 - offset, 16) of prev, then [0, 16 - offset) of cur
        const __m512i idx = _mm512_add_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                             _mm512_set1_epi32(16 - offset));
        return _mm512_permutex2var_ps(prev, idx, cur);
    }
};

template <typename T>
struct Lanes16 {  // float16 and bfloat16: 16 lanes of 16 bits
    using W = __m256i;
    static void store(T *p, W w) { _mm256_storeu_si256(reinterpret_cast<__m256i *>(p), w); }
    static void store(T *p, W w, __mmask16 m) { _mm256_mask_storeu_epi16(p, m, w); }
    static void stream(T *p, W w) { _mm256_stream_si256(reinterpret_cast<__m256i *>(p), w); }
    // offset in elements; an even offset joins whole 32-bit pairs (vpermt2d is
    // one cheap instruction, vpermt2w is not), which covers any 4-byte-aligned output
    static W join(W prev, int offset, W cur) {
        if ((offset & 1) == 0) {
            const __m256i idx = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(8 - offset / 2));
            return _mm256_permutex2var_epi32(prev, idx, cur);
        }
        const __m256i idx = _mm256_add_epi16(
            _mm256_setr_epi16(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm256_set1_epi16(short(16 - offset)));
        return _mm256_permutex2var_epi16(prev, idx, cur);
    }
};

template <>
struct Lanes<bfloat16_t> : Lanes16<bfloat16_t> {
    static __m512 widen(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
    static __m512 load(const bfloat16_t *p) { return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(p))); }
    static __m512 load(const bfloat16_t *p, __mmask16 m) { return widen(_mm256_maskz_loadu_epi16(m, p)); }
    // round to nearest even, as to_bfloat16 (outputs here are never NaN)
    static W pack(__m512 v) {
        const __m512i u = _mm512_castps_si512(v);
        const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb));
        return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
    }
};

template <>
struct Lanes<half_t> : Lanes16<half_t> {
    static __m512 load(const half_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(p))); }
    static __m512 load(const half_t *p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }
    static W pack(__m512 v) { return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
};

inline __mmask16 lanes_mask(int64_t remaining) {
    return remaining >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << remaining) - 1u);
}

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

// Writes a run of consecutive 16-lane vectors starting at `first`. When
// streaming, each vector is joined with the previous one so that every store
// lands on an aligned 16-lane boundary, whatever the alignment of the output;
// the unaligned head and tail go out as masked stores.
template <typename T>
class Writer {
    using L = Lanes<T>;
    using W = typename L::W;

public:
    Writer(T *out, int64_t first, bool stream) : out_(out), stream_(stream) {
        constexpr uintptr_t align = 16 * sizeof(T);
        offset_ = int((reinterpret_cast<uintptr_t>(out + first) % align) / sizeof(T));
    }

    void put(int64_t i, __m512 v) {  // elements [i, i + 16), consecutive calls
        const W w = L::pack(v);
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
        L::store(out_ + i, L::pack(v), m);
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

// ---- quantize ----------------------------------------------------------------
// Software prefetch distance for the input of quantize: the hardware
// prefetchers alone left a core waiting on memory for a third of its time
// (measured 0.85 -> 0.53 ns per element, AVX-512, one thread).
constexpr int kPrefetchBytes = 2048;

template <int BITS, typename T>
void quantize(const QuantizeArgs &a, int64_t b0, int64_t b1) {
    using L = Lanes<T>;
    const T *x = static_cast<const T *>(a.x);
    const SearchTable &tab = *a.table;
    const __m512 mid16 = _mm512_load_ps(tab.mid);
    const Segments segments(tab);
    const __m512i order16 = _mm512_load_si512(tab.order);
    const __m512i abs_bits = _mm512_set1_epi32(0x7FFFFFFF);
    const __m512i max_finite = _mm512_set1_epi32(0x7F7FFFFF);
    const __m512 lo = _mm512_set1_ps(-1.0f), hi = _mm512_set1_ps(1.0f);

    for (int64_t b = b0; b < b1; ++b) {
        const int64_t begin = b * a.blocksize;
        const int64_t end = begin + a.blocksize < a.n ? begin + a.blocksize : a.n;
        // pass 1: absmax and a finiteness check (|x| bits above the largest finite float)
        __m512i vmax = _mm512_setzero_si512();
        __mmask16 bad = 0;
        for (int64_t i = begin; i < end; i += 16) {
            _mm_prefetch(reinterpret_cast<const char *>(x + i) + kPrefetchBytes, _MM_HINT_T0);
            const __m512i v = _mm512_and_si512(_mm512_castps_si512(L::load(x + i, lanes_mask(end - i))), abs_bits);
            bad |= _mm512_cmpgt_epi32_mask(v, max_finite);
            vmax = _mm512_max_epi32(vmax, v);  // non-negative floats order like their bits
        }
        if (bad) {  // the reference kernel names the first non-finite element
            ref::quantize_blocks<BITS, T>(x, a.n, a.blocksize, tab, a.out, a.absmax, b, b + 1);
            continue;
        }
        const ref::BlockScale bs =
            ref::block_scale(bits_float(uint32_t(_mm512_reduce_max_epi32(vmax))), end - begin, a.blocksize);
        const bool tail = bs.tail;
        a.absmax[b] = bs.stored;
        const __m512 vscale = _mm512_set1_ps(bs.scale), vrecip = _mm512_set1_ps(bs.recip);

        // pass 2: codes
        for (int64_t i = begin; i < end; i += 16) {
            const __mmask16 m = lanes_mask(end - i);
            const __m512 v = L::load(x + i, m);  // masked-off lanes read 0 and encode the code of 0.0
            __m512 s = tail ? _mm512_div_ps(v, vscale) : _mm512_mul_ps(v, vrecip);
            s = _mm512_min_ps(_mm512_max_ps(s, lo), hi);
            __m512i code;
            if (BITS == 4) {
                code = _mm512_permutexvar_epi32(search16(s, mid16), order16);
                // pairs of 32-bit codes -> one byte per 64-bit lane: even << 4 | odd
                const __m512i pair = _mm512_or_si512(_mm512_slli_epi64(code, 4), _mm512_srli_epi64(code, 32));
                const __m128i bytes = _mm512_cvtepi64_epi8(pair);
                const int64_t nbytes = (end - i + 1) / 2;  // an odd tail keeps the pad code of 0.0
                if (nbytes >= 8)
                    _mm_storel_epi64(reinterpret_cast<__m128i *>(a.out + i / 2), bytes);
                else
                    _mm_mask_storeu_epi8(a.out + i / 2, __mmask16((1u << nbytes) - 1u), bytes);
            } else {
                const __m512i pos = search256(s, segments);
                code = tab.identity_order ? pos : _mm512_i32gather_epi32(pos, tab.order, 4);
                _mm_mask_storeu_epi8(a.out + i, m, _mm512_cvtepi32_epi8(code));
            }
        }
    }
}

// ---- dequantize ----------------------------------------------------------------
template <typename T>
void dequantize4(const DequantizeArgs &a, int64_t b0, int64_t b1) {
    T *out = static_cast<T *>(a.out);
    const __m512 table = _mm512_loadu_ps(a.codebook);
    const __m128i low4 = _mm_set1_epi8(0x0F);
    Writer<T> w(out, b0 * a.blocksize, a.n * int64_t(sizeof(T)) >= kStreamBytes);
    for (int64_t b = b0; b < b1; ++b) {
        const int64_t begin = b * a.blocksize;
        const int64_t end = begin + a.blocksize < a.n ? begin + a.blocksize : a.n;
        const __m512 scale = _mm512_set1_ps(a.absmax[b]);
        _mm_prefetch(reinterpret_cast<const char *>(a.in + begin / 2) + kPrefetchBytes, _MM_HINT_T0);
        for (int64_t i = begin; i < end; i += 16) {
            const int64_t rem = end - i;
            const __m128i bytes = rem >= 16 ? _mm_loadl_epi64(reinterpret_cast<const __m128i *>(a.in + i / 2))
                                            : _mm_maskz_loadu_epi8(__mmask16((1u << ((rem + 1) / 2)) - 1u), a.in + i / 2);
            const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low4);
            const __m128i codes = _mm_unpacklo_epi8(hi, _mm_and_si128(bytes, low4));  // element order
            const __m512 v = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(codes), table), scale);
            if (rem >= 16)
                w.put(i, v);
            else
                w.put_partial(i, v, lanes_mask(rem));
        }
    }
}

template <typename T>
void dequantize8(const DequantizeArgs &a, int64_t b0, int64_t b1) {
    T *out = static_cast<T *>(a.out);
    Writer<T> w(out, b0 * a.blocksize, a.n * int64_t(sizeof(T)) >= kStreamBytes);
    for (int64_t b = b0; b < b1; ++b) {
        const int64_t begin = b * a.blocksize;
        const int64_t end = begin + a.blocksize < a.n ? begin + a.blocksize : a.n;
        const __m512 scale = _mm512_set1_ps(a.absmax[b]);
        for (int64_t i = begin; i < end; i += 16) {
            if ((i & 63) == 0) _mm_prefetch(reinterpret_cast<const char *>(a.in + i) + kPrefetchBytes, _MM_HINT_T0);
            const __mmask16 m = lanes_mask(end - i);
            const __m512i idx = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, a.in + i));
            const __m512 v = _mm512_mul_ps(_mm512_i32gather_ps(idx, a.codebook, 4), scale);
            if (m == 0xFFFF)
                w.put(i, v);
            else
                w.put_partial(i, v, m);
        }
    }
}

}  // namespace

const KernelSet *avx512_kernels() {
    static const KernelSet k = NF4_KERNEL_SET("avx512", quantize, dequantize4, dequantize8);
    return &k;
}

}  // namespace nf4core
