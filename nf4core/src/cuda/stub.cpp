// The CUDA entry points of a build without CUDA (Meson option cuda disabled or
// nvcc not found), compiled as C++ in place of the .cu files beside it:
// nf4_cuda_available reports built = 0, everything else fails with
// NF4_ERROR_CUDA, so the C API is the same in every build.
#include "../error.hpp"
#include "../pager.hpp"
#include "nf4core/cuda.h"

namespace {

nf4_status not_built() {
    return nf4core::guarded([] {
        nf4core::fail(NF4_ERROR_CUDA,
                      "nf4core was built without CUDA (Meson option -Dcuda=disabled, or nvcc was not found)");
    });
}

}  // namespace

namespace nf4core {
std::unique_ptr<PagerBackend> make_cuda_pager(int64_t, int, int64_t, uint32_t) {
    fail(NF4_ERROR_CUDA,
         "the pager's CUDA backend is not available: nf4core was built without CUDA (Meson option "
         "-Dcuda=disabled, or nvcc was not found)");
}
}  // namespace nf4core

extern "C" {

nf4_status nf4_cuda_available(int32_t *built, int32_t *device_count) {
    if (built != nullptr) *built = 0;
    if (device_count != nullptr) *device_count = 0;
    return nf4core::guarded([] {});
}

int32_t nf4_cuda_runtime_version(void) { return 0; }

nf4_status nf4_cuda_quantize_4bit(const void *, nf4_dtype, int64_t, int64_t, const float *, uint8_t *, float *,
                                  void *) {
    return not_built();
}

nf4_status nf4_cuda_quantize_8bit(const void *, nf4_dtype, int64_t, int64_t, const float *, uint8_t *, float *,
                                  void *) {
    return not_built();
}

nf4_status nf4_cuda_double_quantize(const float *, int64_t, const float *, uint8_t *, float *, float *, void *) {
    return not_built();
}

nf4_status nf4_cuda_dequantize_4bit(const uint8_t *, const float *, int64_t, int64_t, const float *, void *,
                                    nf4_dtype, void *) {
    return not_built();
}

nf4_status nf4_cuda_dequantize_4bit_dq(const uint8_t *, const uint8_t *, const float *, float, int64_t, int64_t,
                                       const float *, const float *, void *, nf4_dtype, void *) {
    return not_built();
}

nf4_status nf4_cuda_dequantize_8bit(const uint8_t *, const float *, int64_t, int64_t, const float *, void *,
                                    nf4_dtype, void *) {
    return not_built();
}

nf4_status nf4_cuda_double_dequantize(const uint8_t *, const float *, float, int64_t, const float *, float *,
                                      void *) {
    return not_built();
}

nf4_status nf4_cuda_gemv_4bit(const void *, nf4_dtype, int64_t, int64_t, int64_t, const uint8_t *, const float *,
                              int64_t, const float *, void *, void *) {
    return not_built();
}

nf4_status nf4_cuda_gemv_4bit_dq(const void *, nf4_dtype, int64_t, int64_t, int64_t, const uint8_t *,
                                 const uint8_t *, const float *, float, int64_t, const float *, const float *, void *,
                                 void *) {
    return not_built();
}

nf4_status nf4_cuda_adam8bit_update(void *, const void *, nf4_dtype, int64_t, uint8_t *, uint8_t *, float *, float *,
                                    const float *, const float *, int64_t, const nf4_adam_hparams *, int64_t *,
                                    void *) {
    return not_built();
}

}  // extern "C"
