// Host time per call of the CUDA launch path, to find where the host time of
// nf4_cuda_gemv_4bit_dq goes at batch 1 (a ~10 us kernel): cudaGetDevice, an
// empty kernel launched with 16 bytes and with 1088 bytes of parameters (the
// GEMV's codebook and DQ map by value), and nf4_cuda_gemv_4bit_dq on a tiny
// problem. Every launch is queued behind a spinning kernel, so that the host
// never waits for the GPU. Built and run by benchmarks/gpu_check.sh:
//   nvcc -O2 -arch=sm_90 cuda_launch_cost.cu -I nf4core/include -L BUILD -lnf4core
#include <cuda_runtime.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "nf4core/nf4core.h"

namespace {

struct Small {
    float v[4];
};
struct Big {
    float v[272];
};

__global__ void k_small(Small s, float *o) {
    if (threadIdx.x == 1000) o[0] = s.v[0];
}
__global__ void k_big(const __grid_constant__ Big s, float *o) {
    if (threadIdx.x == 1000) o[0] = s.v[0];
}
__global__ void spin(long long cycles) {
    const long long t0 = clock64();
    while (clock64() - t0 < cycles) {
    }
}

template <class F>
double us_per_call(F f, int n) {
    f();
    cudaDeviceSynchronize();
    spin<<<1, 1>>>(400000000LL);  // ~0.2 s: the launches below queue behind it
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < n; ++i) f();
    const auto t1 = std::chrono::steady_clock::now();
    cudaDeviceSynchronize();
    return std::chrono::duration<double, std::micro>(t1 - t0).count() / n;
}

}  // namespace

int main() {
    float *o = nullptr;
    if (cudaMalloc(&o, 4) != cudaSuccess) {
        std::printf("no device\n");
        return 2;
    }
    Small s{};
    Big b{};
    int dev = 0;
    const int64_t N = 64, K = 128;
    uint8_t *packed = nullptr, *qabsmax = nullptr;
    float *x = nullptr, *y = nullptr, *nested = nullptr, *w = nullptr;
    cudaMalloc(&packed, N * K / 2);
    cudaMalloc(&qabsmax, N * K / 64);
    cudaMalloc(&nested, 4);
    cudaMalloc(&x, K * 4);
    cudaMalloc(&y, N * 4);
    cudaMalloc(&w, N * K * 4);
    cudaMemset(packed, 0, N * K / 2);
    cudaMemset(qabsmax, 0, N * K / 64);
    cudaMemset(nested, 0, 4);
    cudaMemset(x, 0, K * 4);
    std::vector<float> cb(16), dyn(256);
    int64_t len = 0;
    nf4_codebook_by_name("nf4", cb.data(), 16, &len);
    nf4_codebook_dynamic(1, dyn.data());
    const int n = 400;
    std::printf("cudaGetDevice %.2f us\n", us_per_call([&] { cudaGetDevice(&dev); }, n));
    std::printf("launch, 16 B of parameters %.2f us\n", us_per_call([&] { k_small<<<1, 32>>>(s, o); }, n));
    std::printf("launch, 1088 B of parameters %.2f us\n", us_per_call([&] { k_big<<<1, 32>>>(b, o); }, n));
    int bad = 0;
    std::printf("nf4_cuda_gemv_4bit_dq %.2f us\n", us_per_call([&] {
                    bad |= nf4_cuda_gemv_4bit_dq(x, NF4_FLOAT32, 1, N, K, packed, qabsmax, nested, 0.0f, 64,
                                                 cb.data(), dyn.data(), y, nullptr);
                }, n));
    std::printf("nf4_cuda_dequantize_4bit_dq %.2f us\n", us_per_call([&] {
                    bad |= nf4_cuda_dequantize_4bit_dq(packed, qabsmax, nested, 0.0f, N * K, 64, cb.data(),
                                                       dyn.data(), w, NF4_FLOAT32, nullptr);
                }, n));
    std::printf("status %s\n", bad ? nf4_last_error() : "ok");
    return bad ? 1 : 0;
}
