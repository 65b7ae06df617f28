// Quantize a random matrix to NF4 with double quantization using only the
// installed nf4core library:
//   c++ -std=c++17 quantize_example.cpp $(pkg-config --cflags --libs nf4core)
#include <nf4core/nf4core.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

int main() {
    const int64_t rows = 256, cols = 320, n = rows * cols, bs = 64;
    std::vector<float> w(n);
    std::mt19937 rng(0);
    std::normal_distribution<float> normal(0.0f, 0.02f);
    for (float &v : w) v = normal(rng);

    float nf4[16], dyn[256];
    nf4_codebook_normal(4, nf4);
    nf4_codebook_dynamic(1, dyn);

    const int64_t nblocks = nf4_num_blocks(n, bs);
    std::vector<uint8_t> packed(nf4_packed_size_4bit(n));
    std::vector<float> absmax(nblocks);
    if (nf4_quantize_4bit(w.data(), NF4_FLOAT32, n, bs, nf4, packed.data(), absmax.data()) != NF4_OK) {
        std::fprintf(stderr, "quantize failed: %s\n", nf4_last_error());
        return 1;
    }
    // double quantization of the block scales
    std::vector<uint8_t> qabsmax(nblocks);
    std::vector<float> nested(nf4_num_blocks(nblocks, NF4_DQ_BLOCKSIZE)), scales(nblocks);
    float offset = 0;
    if (nf4_double_quantize(absmax.data(), nblocks, dyn, qabsmax.data(), nested.data(), &offset) != NF4_OK ||
        nf4_double_dequantize(qabsmax.data(), nested.data(), offset, nblocks, dyn, scales.data()) != NF4_OK) {
        std::fprintf(stderr, "double quantization failed: %s\n", nf4_last_error());
        return 1;
    }
    std::vector<float> back(n);
    nf4_dequantize_4bit(packed.data(), scales.data(), n, bs, nf4, back.data(), NF4_FLOAT32);

    double err = 0, ref = 0;
    for (int64_t i = 0; i < n; ++i) {
        err += double(back[i] - w[i]) * double(back[i] - w[i]);
        ref += double(w[i]) * double(w[i]);
    }
    const double bits = 8.0 * double(packed.size() + qabsmax.size() + 4 * nested.size() + 4) / double(n);
    const double rel = std::sqrt(err / ref);
    std::printf("nf4core %s: %lldx%lld NF4+DQ, %.3f bits/param, relative error %.4f\n", nf4_version(),
                (long long)rows, (long long)cols, bits, rel);
    return (rel > 0.05 && rel < 0.15 && bits < 4.2) ? 0 : 1;
}
