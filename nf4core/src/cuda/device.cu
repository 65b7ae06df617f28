// Whether CUDA is usable: compiled in (always, in this file) and how many
// devices the driver reports. Runs without a driver (cudart is linked
// statically and loads libcuda.so lazily), reporting 0 devices.
#include <cuda_runtime.h>

#include "../error.hpp"
#include "nf4core/cuda.h"

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
