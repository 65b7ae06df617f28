/* Compiled as C99: the public header must be plain C. */
#include <stdio.h>
#include <string.h>

#include "nf4core/nf4core.h"

int main(void) {
    float table[16], x[6] = {-1.0f, 1.0f, 0.0f, 0.5f, 0.25f, -0.125f}, y[6], absmax[1];
    uint8_t packed[3];
    int i, failures = 0;
    if (nf4_codebook_normal(4, table) != NF4_OK) failures++;
    if (nf4_quantize_4bit(x, NF4_FLOAT32, 6, 64, table, packed, absmax) != NF4_OK) failures++;
    if (packed[0] != 0x0F || packed[1] != 0x7C) failures++;
    if (nf4_dequantize_4bit(packed, absmax, 6, 64, table, y, NF4_FLOAT32) != NF4_OK) failures++;
    for (i = 0; i < 6; i++)
        if (y[i] < x[i] - 0.1f || y[i] > x[i] + 0.1f) failures++;
    if (nf4_quantize_4bit(x, NF4_FLOAT32, 6, 100, table, packed, absmax) != NF4_ERROR_INVALID_ARGUMENT) failures++;
    if (strlen(nf4_last_error()) == 0) failures++;
    if (strcmp(nf4_status_string(NF4_ERROR_NON_FINITE), "NF4_ERROR_NON_FINITE") != 0) failures++;
    /* no OpenMP runtime in this program: nf4core's own pool */
    if (strcmp(nf4_get_threading(), "pool") != 0) failures++;
    if (nf4_set_threading("openmp") != NF4_ERROR_INVALID_ARGUMENT || !strstr(nf4_last_error(), "no OpenMP")) failures++;
    if (nf4_set_threading("auto") != NF4_OK || strcmp(nf4_get_threading(), "pool") != 0) failures++;
    printf("nf4core %s: %d failures\n", nf4_version(), failures);
    return failures != 0;
}
