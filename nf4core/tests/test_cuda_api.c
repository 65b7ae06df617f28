/* The CUDA part of the C API in every build, compiled as C99: the build
 * reports CUDA as Meson configured it (NF4_EXPECT_CUDA), and every entry point
 * fails with NF4_ERROR_CUDA and a message, never a crash, when CUDA is not
 * built or no device is present. (test_cuda.cpp checks the kernels on a GPU.) */
#include <stdio.h>
#include <string.h>

#include "nf4core/nf4core.h"

#ifndef NF4_EXPECT_CUDA
#error "NF4_EXPECT_CUDA must be defined by the build"
#endif

static int failures = 0;

static void expect_cuda_error(nf4_status st, const char *what) {
    if (st != NF4_ERROR_CUDA || strlen(nf4_last_error()) == 0) {
        printf("FAIL %s: status %s, message '%s'\n", what, nf4_status_string(st), nf4_last_error());
        failures++;
    } else {
        printf("ok   %s: %s\n", what, nf4_last_error());
    }
}

int main(void) {
    int32_t built = -1, count = -1;
    float cb[16], dyn[256], x[64], absmax[1], y[8], off = 0.0f;
    uint8_t packed[32], q[1];
    int i;
    if (nf4_cuda_available(&built, &count) != NF4_OK) failures++;
    if (nf4_cuda_available(NULL, NULL) != NF4_OK) failures++;
    printf("built=%d device_count=%d runtime=%d\n", (int)built, (int)count, (int)nf4_cuda_runtime_version());
    if (built != NF4_EXPECT_CUDA) failures++;
    if (count < 0 || (built == 0 && count != 0)) failures++;
    if ((nf4_cuda_runtime_version() != 0) != (built != 0)) failures++;
    if (strcmp(nf4_status_string(NF4_ERROR_CUDA), "NF4_ERROR_CUDA") != 0) failures++;
    if (count == 0) {
        /* host pointers: no kernel may run, the device check comes first */
        nf4_codebook_normal(4, cb);
        nf4_codebook_dynamic(1, dyn);
        for (i = 0; i < 64; i++) x[i] = (float)i - 31.5f;
        absmax[0] = 1.0f;
        q[0] = 0;
        expect_cuda_error(nf4_cuda_quantize_4bit(x, NF4_FLOAT32, 64, 64, cb, packed, absmax, NULL), "quantize_4bit");
        expect_cuda_error(nf4_cuda_dequantize_4bit(packed, absmax, 64, 64, cb, x, NF4_FLOAT32, NULL), "dequantize_4bit");
        expect_cuda_error(nf4_cuda_dequantize_4bit_dq(packed, q, absmax, 0.0f, 64, 64, cb, dyn, x, NF4_FLOAT32, NULL),
                          "dequantize_4bit_dq");
        expect_cuda_error(nf4_cuda_quantize_8bit(x, NF4_FLOAT32, 32, 32, dyn, packed, absmax, NULL), "quantize_8bit");
        expect_cuda_error(nf4_cuda_dequantize_8bit(packed, absmax, 32, 32, dyn, x, NF4_FLOAT32, NULL), "dequantize_8bit");
        expect_cuda_error(nf4_cuda_double_quantize(absmax, 1, dyn, q, y, &off, NULL), "double_quantize");
        expect_cuda_error(nf4_cuda_double_dequantize(q, y, 0.0f, 1, dyn, absmax, NULL), "double_dequantize");
        expect_cuda_error(nf4_cuda_gemv_4bit(x, NF4_FLOAT32, 1, 1, 64, packed, absmax, 64, cb, y, NULL), "gemv_4bit");
        expect_cuda_error(nf4_cuda_gemv_4bit_dq(x, NF4_FLOAT32, 1, 1, 64, packed, q, absmax, 0.0f, 64, cb, dyn, y, NULL),
                          "gemv_4bit_dq");
        {
            nf4_adam_hparams hp = {1e-3, 0.9, 0.999, 1e-8, 0.0, 1};
            nf4_pager *pg = NULL;
            float dyn2[256];
            uint8_t st1[32], st2[32];
            nf4_codebook_dynamic(0, dyn2);
            /* distinct buffers: overlapping ones are an argument error, found before the device check */
            expect_cuda_error(nf4_cuda_adam8bit_update(x, x + 32, NF4_FLOAT32, 32, st1, st2, absmax, y, dyn, dyn2, 32,
                                                       &hp, NULL, NULL),
                              "adam8bit_update");
            expect_cuda_error(nf4_pager_create_cuda(-1, 0, 0, 0, &pg), "pager_create_cuda");
            if (pg != NULL) failures++;
        }
        if (built && strstr(nf4_last_error(), "CUDA") == NULL) failures++;
        if (!built && strstr(nf4_last_error(), "without CUDA") == NULL) failures++;
    }
    /* argument errors come before any CUDA call in every build */
    {
        nf4_pager *pg = NULL;
        if (nf4_pager_create_cuda(-1, -1, 0, 0, &pg) != NF4_ERROR_INVALID_ARGUMENT || pg != NULL) failures++;
    }
    if (built && nf4_cuda_dequantize_4bit(NULL, absmax, 64, 64, cb, x, NF4_FLOAT32, NULL) != NF4_ERROR_INVALID_ARGUMENT)
        failures++;
    printf("%d failures\n", failures);
    return failures != 0;
}
