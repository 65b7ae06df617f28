// Whether CUDA is usable: compiled in (always, in this file) and how many
// devices the driver reports. Runs without a driver (cudart is linked
// statically and loads libcuda.so lazily), reporting 0 devices.
#include <cuda_runtime.h>

#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "../error.hpp"
#include "common.cuh"
#include "nf4core/cuda.h"

namespace nf4core {
namespace cuda {
namespace {

struct DeviceTable {
    int device;
    std::vector<float> values;
    const float *ptr;
};

std::mutex table_mutex;
std::vector<DeviceTable> tables;  // never freed: kernels in flight may read them

}  // namespace

const float *device_table(const float *host, int n) {
    int dev = 0;
    check(cudaGetDevice(&dev), "cudaGetDevice");
    const size_t bytes = size_t(n) * sizeof(float);
    std::lock_guard<std::mutex> lock(table_mutex);
    for (const DeviceTable &t : tables)
        if (t.device == dev && t.values.size() == size_t(n) && std::memcmp(t.values.data(), host, bytes) == 0)
            return t.ptr;
    require(tables.size() < kMaxDeviceTables,
            "more than " + std::to_string(kMaxDeviceTables) + " distinct lookup tables were sent to the GPU");
    void *p = nullptr;
    check(cudaMalloc(&p, bytes), "cudaMalloc (a lookup table)");
    const cudaError_t err = cudaMemcpy(p, host, bytes, cudaMemcpyHostToDevice);
    if (err != cudaSuccess) {
        (void)cudaFree(p);
        check(err, "cudaMemcpy (a lookup table)");
    }
    tables.push_back(DeviceTable{dev, std::vector<float>(host, host + n), static_cast<const float *>(p)});
    return tables.back().ptr;
}

}  // namespace cuda
}  // namespace nf4core

extern "C" {

nf4_status nf4_cuda_available(int32_t *built, int32_t *device_count) {
    return nf4core::guarded([&] {
        if (built != nullptr) *built = 1;
        int count = 0;
        if (cudaGetDeviceCount(&count) != cudaSuccess) {
            (void)cudaGetLastError();  // no driver or no device: not an error here
            count = 0;
        }
        if (device_count != nullptr) *device_count = int32_t(count);
    });
}

int32_t nf4_cuda_runtime_version(void) { return CUDART_VERSION; }

}  // extern "C"
