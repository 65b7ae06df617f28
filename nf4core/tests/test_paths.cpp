// Every instruction-set path and thread count gives the same bytes as the
// scalar reference, for every dtype, codebook, blocksize and awkward length.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "check.hpp"
#include "nf4core/nf4core.h"
#include "numeric.hpp"

namespace {

std::vector<float> table(const char *name) {
    int64_t n = 0;
    nf4_codebook_by_name(name, nullptr, 0, &n);
    std::vector<float> t(static_cast<size_t>(n));
    nf4_codebook_by_name(name, t.data(), n, &n);
    return t;
}

// raw bytes of n elements of dtype, from normal values with some zeros, ties and big values
std::vector<uint8_t> make_input(nf4_dtype dt, int64_t n, std::mt19937_64 &rng, const std::vector<float> &cb) {
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::uniform_int_distribution<int> pick(0, 9);
    std::vector<float> x(static_cast<size_t>(n));
    for (float &v : x) {
        const int k = pick(rng);
        v = k == 0 ? 0.0f : k == 1 ? cb[size_t(pick(rng)) % cb.size()] : normal(rng) * (k == 2 ? 1e4f : 1.0f);
    }
    std::vector<uint8_t> raw(static_cast<size_t>(n * nf4_dtype_size(dt)));
    for (int64_t i = 0; i < n; ++i) {
        if (dt == NF4_FLOAT32) std::memcpy(&raw[size_t(4 * i)], &x[size_t(i)], 4);
        if (dt == NF4_FLOAT16) {
            const uint16_t h = nf4core::to_half(x[size_t(i)]).bits;
            std::memcpy(&raw[size_t(2 * i)], &h, 2);
        }
        if (dt == NF4_BFLOAT16) {
            const uint16_t h = nf4core::to_bfloat16(x[size_t(i)]).bits;
            std::memcpy(&raw[size_t(2 * i)], &h, 2);
        }
    }
    return raw;
}

const char *kIsas[] = {"scalar", "avx2", "avx512", "neon"};

}  // namespace

TEST_CASE(every_isa_and_thread_count_matches_reference) {
    std::mt19937_64 rng(11);
    int paths = 0;
    for (const char *isa : kIsas) {
        if (!nf4_isa_available(isa)) {
            std::printf("  (%s not available on this machine/build)\n", isa);
            continue;
        }
        ++paths;
        CHECK(nf4_set_isa(isa) == NF4_OK);
        CHECK(std::string(nf4_get_isa()) == isa);
        for (int threads : {1, 2, 3}) {
            CHECK(nf4_set_num_threads(threads) == NF4_OK);
            for (int bits : {4, 8}) {
                for (const char *cbname : bits == 4 ? std::vector<const char *>{"nf4", "fp4", "int4"}
                                                     : std::vector<const char *>{"dynamic", "nf8"}) {
                    const std::vector<float> cb = table(cbname);
                    for (int64_t bs : {32, 64, 256, 4096}) {
                        for (int64_t n : {int64_t(1), int64_t(15), int64_t(bs + 7), int64_t(3 * bs),
                                          int64_t(70000 + bs + 13), int64_t(400000 + bs + 13)}) {
                            if (n > 100000 && std::strcmp(cbname, "nf4") != 0 && std::strcmp(cbname, "dynamic") != 0)
                                continue;  // the big sizes exercise threading; one codebook each is enough
                            for (nf4_dtype dt : {NF4_FLOAT32, NF4_FLOAT16, NF4_BFLOAT16}) {
                                const std::vector<uint8_t> x = make_input(dt, n, rng, cb);
                                const int64_t nb = nf4_num_blocks(n, bs);
                                const size_t nout = size_t(bits == 4 ? nf4_packed_size_4bit(n) : n);
                                std::vector<uint8_t> q(nout, 0xAA), qr(nout, 0x55);
                                std::vector<float> am(static_cast<size_t>(nb)), amr(static_cast<size_t>(nb));
                                nf4_status s1, s2;
                                if (bits == 4) {
                                    s1 = nf4_quantize_4bit(x.data(), dt, n, bs, cb.data(), q.data(), am.data());
                                    s2 = nf4_quantize_4bit_ref(x.data(), dt, n, bs, cb.data(), qr.data(), amr.data());
                                } else {
                                    s1 = nf4_quantize_8bit(x.data(), dt, n, bs, cb.data(), q.data(), am.data());
                                    s2 = nf4_quantize_8bit_ref(x.data(), dt, n, bs, cb.data(), qr.data(), amr.data());
                                }
                                CHECK(s1 == NF4_OK && s2 == NF4_OK);
                                CHECK_MSG(q == qr && std::memcmp(am.data(), amr.data(), am.size() * 4) == 0,
                                          "%s threads=%d %s bs=%lld n=%lld dtype=%d: quantize differs", isa, threads,
                                          cbname, (long long)bs, (long long)n, int(dt));
                                const size_t osz = size_t(n * nf4_dtype_size(dt));
                                std::vector<uint8_t> y(osz, 0xAA), yr(osz, 0x55);
                                if (bits == 4) {
                                    s1 = nf4_dequantize_4bit(q.data(), am.data(), n, bs, cb.data(), y.data(), dt);
                                    s2 = nf4_dequantize_4bit_ref(q.data(), am.data(), n, bs, cb.data(), yr.data(), dt);
                                } else {
                                    s1 = nf4_dequantize_8bit(q.data(), am.data(), n, bs, cb.data(), y.data(), dt);
                                    s2 = nf4_dequantize_8bit_ref(q.data(), am.data(), n, bs, cb.data(), yr.data(), dt);
                                }
                                CHECK(s1 == NF4_OK && s2 == NF4_OK);
                                CHECK_MSG(y == yr, "%s threads=%d %s bs=%lld n=%lld dtype=%d: dequantize differs",
                                          isa, threads, cbname, (long long)bs, (long long)n, int(dt));
                            }
                        }
                    }
                }
            }
        }
    }
    CHECK(paths >= 1);
    nf4_set_isa("auto");
    nf4_set_num_threads(0);
}

TEST_CASE(large_outputs_stream_correctly_at_any_alignment) {
    // outputs of 32 MiB and more are written with non-temporal stores, realigned
    // to 64 bytes whatever the output's own alignment: check every element
    std::mt19937_64 rng(5);
    const int64_t n = (int64_t(36) << 20) / 2 + 77;  // > 32 MiB even as 16-bit values; odd length
    for (int bits : {4, 8}) {
        const std::vector<float> cb = table(bits == 4 ? "nf4" : "dynamic");
        const std::vector<uint8_t> x = make_input(NF4_BFLOAT16, n, rng, cb);
        const int64_t bs = 64, nb = nf4_num_blocks(n, bs);
        std::vector<uint8_t> q(static_cast<size_t>(bits == 4 ? nf4_packed_size_4bit(n) : n));
        std::vector<float> am(static_cast<size_t>(nb));
        CHECK((bits == 4 ? nf4_quantize_4bit : nf4_quantize_8bit)(x.data(), NF4_BFLOAT16, n, bs, cb.data(), q.data(),
                                                                  am.data()) == NF4_OK);
        for (nf4_dtype dt : {NF4_FLOAT32, NF4_BFLOAT16, NF4_FLOAT16}) {
            const int64_t esz = nf4_dtype_size(dt);
            std::vector<uint8_t> ref(static_cast<size_t>(n * esz));
            CHECK((bits == 4 ? nf4_dequantize_4bit_ref : nf4_dequantize_8bit_ref)(q.data(), am.data(), n, bs, cb.data(),
                                                                                  ref.data(), dt) == NF4_OK);
            std::vector<uint8_t> buf(static_cast<size_t>(n * esz + 128));
            const uintptr_t base = reinterpret_cast<uintptr_t>(buf.data());
            const size_t align0 = size_t((64 - base % 64) % 64);  // offset of the first 64-byte boundary
            for (int threads : {1, 2}) {
                nf4_set_num_threads(threads);
                for (int64_t shift : {int64_t(0), int64_t(1), int64_t(5), int64_t(15)}) {
                    uint8_t *out = buf.data() + align0 + size_t(shift * esz);
                    std::memset(out, 0xA5, size_t(n * esz));
                    CHECK((bits == 4 ? nf4_dequantize_4bit : nf4_dequantize_8bit)(q.data(), am.data(), n, bs,
                                                                                  cb.data(), out, dt) == NF4_OK);
                    CHECK_MSG(std::memcmp(out, ref.data(), size_t(n * esz)) == 0,
                              "%d-bit dtype=%d threads=%d shift=%lld: streamed output differs", bits, int(dt),
                              threads, (long long)shift);
                }
            }
        }
    }
    nf4_set_num_threads(0);
}

// The nearest-code search at its edges: scaled values exactly on a midpoint
// (ties go to the lower code), one float either side of it, -0.0, subnormals,
// values that scale a hair above 1, and codebooks that are unsorted, hold equal
// values or reach past [-1, 1] (midpoints that the clamp makes unreachable).
TEST_CASE(midpoints_ties_and_odd_codebooks_match_reference) {
    std::vector<std::vector<float>> books = {table("nf4"), table("fp4"), table("int4")};
    std::mt19937_64 rng(5);
    std::normal_distribution<float> normal(0.0f, 0.6f);
    for (int k = 0; k < 2; ++k) {  // unsorted, with repeats, some values beyond +-1
        std::vector<float> cb(16);
        for (float &v : cb) v = normal(rng) * (k == 0 ? 1.0f : 2.0f);
        cb[3] = cb[9];
        cb[12] = cb[9];
        books.push_back(cb);
    }
    for (const std::vector<float> &cb : books) {
        // the sorted midpoints as make_search_table computes them
        std::vector<float> sorted(cb);
        std::sort(sorted.begin(), sorted.end());
        std::vector<float> x;
        for (int rep = 0; rep < 3; ++rep) {
            // a block of 32 whose absmax is 1 (scale 1, reciprocal 1): x scales to itself
            std::vector<float> block = {1.0f, -0.0f, 0.0f, 1e-40f, -1e-40f, -1.0f};
            for (int i = 0; i + 1 < 16; ++i) {
                const float mid = (sorted[size_t(i)] + sorted[size_t(i) + 1]) / 2.0f;
                const float m = std::fmin(1.0f, std::fmax(-1.0f, mid));
                block.push_back(m);
                block.push_back(std::nextafter(m, 2.0f));
                block.push_back(std::nextafter(m, -2.0f));
            }
            while (block.size() % 32 != 0) block.push_back(normal(rng));
            std::shuffle(block.begin() + 1, block.end(), rng);
            x.insert(x.end(), block.begin(), block.end());
        }
        // a block of 32 scaled by a reciprocal that rounds up: x * (1 / a) can exceed 1
        for (int i = 0; i < 32; ++i) x.push_back(i % 2 ? -3.3333333f : 3.3333333f);
        for (int64_t tail : {int64_t(0), int64_t(1), int64_t(7), int64_t(13), int64_t(29)})
            for (int64_t bs : {int64_t(32), int64_t(64)}) {
                std::vector<float> xs(x.begin(), x.end());
                for (int64_t i = 0; i < tail; ++i) xs.push_back(xs[size_t(i * 5 % int64_t(x.size()))] * 0.7f);
                const int64_t n = int64_t(xs.size());
                for (nf4_dtype dt : {NF4_FLOAT32, NF4_FLOAT16, NF4_BFLOAT16}) {
                    std::vector<uint8_t> raw(size_t(n * nf4_dtype_size(dt)));
                    for (int64_t i = 0; i < n; ++i) {
                        if (dt == NF4_FLOAT32) std::memcpy(&raw[size_t(4 * i)], &xs[size_t(i)], 4);
                        const uint16_t h = dt == NF4_FLOAT16 ? nf4core::to_half(xs[size_t(i)]).bits
                                                             : nf4core::to_bfloat16(xs[size_t(i)]).bits;
                        if (dt != NF4_FLOAT32) std::memcpy(&raw[size_t(2 * i)], &h, 2);
                    }
                    const size_t nout = size_t(nf4_packed_size_4bit(n)), nb = size_t(nf4_num_blocks(n, bs));
                    std::vector<uint8_t> qr(nout, 0x55);
                    std::vector<float> amr(nb);
                    CHECK(nf4_quantize_4bit_ref(raw.data(), dt, n, bs, cb.data(), qr.data(), amr.data()) == NF4_OK);
                    for (const char *isa : kIsas) {
                        if (!nf4_isa_available(isa)) continue;
                        CHECK(nf4_set_isa(isa) == NF4_OK);
                        std::vector<uint8_t> q(nout, 0xAA);
                        std::vector<float> am(nb);
                        CHECK(nf4_quantize_4bit(raw.data(), dt, n, bs, cb.data(), q.data(), am.data()) == NF4_OK);
                        CHECK_MSG(q == qr && std::memcmp(am.data(), amr.data(), nb * 4) == 0,
                                  "%s bs=%lld n=%lld dtype=%d: quantize differs", isa, (long long)bs, (long long)n,
                                  int(dt));
                    }
                }
            }
    }
    nf4_set_isa("auto");
}

TEST_CASE(non_finite_reported_at_first_index_on_every_path) {
    const std::vector<float> cb = table("nf4");
    const int64_t n = 300000;
    std::vector<float> x(static_cast<size_t>(n), 0.5f);
    x[200001] = INFINITY;
    x[123457] = NAN;  // the first one
    std::vector<uint8_t> q(static_cast<size_t>(n));
    std::vector<float> am(static_cast<size_t>(nf4_num_blocks(n, 64)));
    for (const char *isa : kIsas) {
        if (!nf4_isa_available(isa)) continue;
        nf4_set_isa(isa);
        for (int threads : {1, 2, 4}) {
            nf4_set_num_threads(threads);
            CHECK(nf4_quantize_4bit(x.data(), NF4_FLOAT32, n, 64, cb.data(), q.data(), am.data()) ==
                  NF4_ERROR_NON_FINITE);
            CHECK_MSG(std::strstr(nf4_last_error(), "flat index 123457") != nullptr, "%s/%d: %s", isa, threads,
                      nf4_last_error());
        }
    }
    nf4_set_isa("auto");
    nf4_set_num_threads(0);
}

TEST_CASE(bfloat16_rounding_of_any_scale_matches_reference) {
    // Block scales are the caller's: any float bits, NaN payloads included. Every
    // path rounds codebook[code] * scale to bfloat16 as to_bfloat16 does (nearest
    // even, NaN quiet with its payload's top bits), dequantize and decode_tile alike.
    std::mt19937_64 rng(17);
    const uint32_t special[] = {0x7FFFFFFFu, 0xFFFFFFFFu, 0x7F800001u, 0xFFC00000u, 0x7FC0FFFFu, 0x7F808000u,
                                0x7F800000u, 0xFF800000u, 0x80000000u, 0x00000001u, 0x7F7FFFFFu, 0x3F808000u};
    const int64_t bs = 64;
    // small, and over 32 MiB (streamed stores, resumed after the blocks of non-finite scales)
    for (int64_t nb : {int64_t(512), int64_t(300000)}) {
        const int64_t n = bs * nb;
        std::vector<float> am(static_cast<size_t>(nb));
        for (int64_t b = 0; b < nb; ++b) {
            // the specials first, then random bits; in the large case finite scales with
            // a non-finite one every 1000 blocks
            uint32_t u = b < 12 ? special[b] : uint32_t(rng());
            if (nb > 512 && b >= 12) u = b % 1000 == 7 ? special[(b / 1000) % 8] : 0x3E800000u + uint32_t(b % 97);
            std::memcpy(&am[size_t(b)], &u, 4);
        }
        for (int bits : {4, 8}) {
            const std::vector<float> cb = table(bits == 4 ? "nf4" : "dynamic");
            std::vector<uint8_t> q(static_cast<size_t>(bits == 4 ? n / 2 : n));
            for (uint8_t &v : q) v = uint8_t(rng());
            std::vector<uint16_t> ref(static_cast<size_t>(n)), tile_ref(static_cast<size_t>(n));
            CHECK((bits == 4 ? nf4_dequantize_4bit_ref : nf4_dequantize_8bit_ref)(q.data(), am.data(), n, bs,
                                                                                  cb.data(), ref.data(),
                                                                                  NF4_BFLOAT16) == NF4_OK);
            CHECK(nf4_set_isa("scalar") == NF4_OK);
            const int64_t N = 64, K = n / N;  // the 4-bit codes as an N x K matrix for decode_tile
            if (bits == 4)
                CHECK(nf4_matmul_4bit_decode_tile(q.data(), am.data(), bs, cb.data(), N, K, 0, N, 0, K, NF4_BFLOAT16,
                                                  tile_ref.data()) == NF4_OK);
            std::vector<uint16_t> buf(static_cast<size_t>(n + 8));
            for (const char *isa : kIsas) {
                if (!nf4_isa_available(isa)) continue;
                CHECK(nf4_set_isa(isa) == NF4_OK);
                for (int64_t shift : {int64_t(0), int64_t(5)}) {  // output alignment
                    uint16_t *y = buf.data() + shift;
                    CHECK((bits == 4 ? nf4_dequantize_4bit : nf4_dequantize_8bit)(q.data(), am.data(), n, bs,
                                                                                  cb.data(), y,
                                                                                  NF4_BFLOAT16) == NF4_OK);
                    CHECK_MSG(std::memcmp(y, ref.data(), size_t(n) * 2) == 0,
                              "%s: %d-bit dequantize of %lld to bfloat16 (shift %lld) differs", isa, bits,
                              (long long)n, (long long)shift);
                }
                if (bits == 4) {
                    CHECK(nf4_matmul_4bit_decode_tile(q.data(), am.data(), bs, cb.data(), N, K, 0, N, 0, K,
                                                      NF4_BFLOAT16, buf.data()) == NF4_OK);
                    CHECK_MSG(std::memcmp(buf.data(), tile_ref.data(), size_t(n) * 2) == 0,
                              "%s: decode_tile to bfloat16 differs", isa);
                }
            }
        }
    }
    nf4_set_isa("auto");
}

TEST_CASE(runtime_settings) {
    CHECK(nf4_set_isa("sse9") == NF4_ERROR_INVALID_ARGUMENT);
    CHECK(std::strstr(nf4_last_error(), "unknown ISA") != nullptr);
    CHECK(nf4_set_isa("scalar") == NF4_OK && std::string(nf4_get_isa()) == "scalar");
    CHECK(nf4_set_isa("auto") == NF4_OK);
    CHECK(nf4_set_num_threads(-1) == NF4_ERROR_INVALID_ARGUMENT);
    CHECK(nf4_set_num_threads(3) == NF4_OK && nf4_get_num_threads() == 3);
    CHECK(nf4_set_num_threads(0) == NF4_OK && nf4_get_num_threads() >= 1);
    CHECK(nf4_isa_available("scalar") == 1 && nf4_isa_available("bogus") == 0);
    std::printf("  auto path: %s, default threads: %d\n", nf4_get_isa(), nf4_get_num_threads());
}

int main() { return check::run_all(); }
