/* Every public C function of nf4core (the headers in include/nf4core) at the edges of its
 * arguments: NULL pointers, negative, zero and overflowing sizes, bad enums,
 * overlapping buffers, non-finite values where they matter. Each call must
 * return the status its header documents, with a message for every failure,
 * and never crash; a failed call writes nothing (outputs keep a sentinel).
 * Compiled as C99 against the installed headers only. Buffers are on the heap
 * so that a sanitizer build (-Db_sanitize=address,undefined) catches any access
 * a missing check lets through. The CUDA entry points are called with argument
 * errors only: NF4_ERROR_INVALID_ARGUMENT where CUDA is built (checked before
 * any device access), NF4_ERROR_CUDA in a build without it. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nf4core/nf4core.h"

static int failures = 0, checks = 0;

static void expect(nf4_status got, nf4_status want, const char *needle, const char *call, int line) {
    const char *msg = nf4_last_error();
    checks++;
    if (got != want) {
        printf("FAIL line %d: %s\n  got %s, want %s (message: '%s')\n", line, call, nf4_status_string(got),
               nf4_status_string(want), msg);
        failures++;
    } else if (want != NF4_OK && msg[0] == '\0') {
        printf("FAIL line %d: %s\n  %s without a message\n", line, call, nf4_status_string(got));
        failures++;
    } else if (want == NF4_OK && msg[0] != '\0') {
        printf("FAIL line %d: %s\n  NF4_OK left the message '%s'\n", line, call, msg);
        failures++;
    } else if (needle != NULL && strstr(msg, needle) == NULL) {
        printf("FAIL line %d: %s\n  message '%s' lacks '%s'\n", line, call, msg, needle);
        failures++;
    }
}

static void truth(int ok, const char *what, int line) {
    checks++;
    if (!ok) {
        printf("FAIL line %d: %s\n", line, what);
        failures++;
    }
}

#define EXPECT(call, want) expect((call), (want), NULL, #call, __LINE__)
#define EXPECT_MSG(call, want, needle) expect((call), (want), (needle), #call, __LINE__)
#define TRUE(cond) truth((cond) != 0, #cond, __LINE__)

#define BIG INT64_MAX
#define INVALID NF4_ERROR_INVALID_ARGUMENT

static const nf4_dtype BAD_DTYPE_HI = (nf4_dtype)7;
static const nf4_dtype BAD_DTYPE_LO = (nf4_dtype)-1;

/* heap buffers with a known fill, to see that failed calls write nothing */
static void *filled(size_t bytes, int byte) {
    void *p = malloc(bytes);
    if (p == NULL) {
        printf("malloc failed\n");
        exit(2);
    }
    memset(p, byte, bytes);
    return p;
}

static int all_bytes(const void *p, size_t bytes, int byte) {
    const unsigned char *c = (const unsigned char *)p;
    size_t i;
    for (i = 0; i < bytes; i++)
        if (c[i] != (unsigned char)byte) return 0;
    return 1;
}

/* --------------------------------------------------------------------- common.h */
static void test_common(void) {
    TRUE(strcmp(nf4_status_string(NF4_OK), "NF4_OK") == 0);
    TRUE(strcmp(nf4_status_string(NF4_ERROR_CUDA), "NF4_ERROR_CUDA") == 0);
    TRUE(strcmp(nf4_status_string((nf4_status)99), "NF4_UNKNOWN_STATUS") == 0);
    TRUE(strcmp(nf4_status_string((nf4_status)-1), "NF4_UNKNOWN_STATUS") == 0);
    TRUE(nf4_version() != NULL && nf4_version()[0] != '\0');
    TRUE(nf4_dtype_size(NF4_FLOAT32) == 4 && nf4_dtype_size(NF4_FLOAT16) == 2 && nf4_dtype_size(NF4_BFLOAT16) == 2);
    TRUE(nf4_dtype_size(BAD_DTYPE_HI) == 0 && nf4_dtype_size(BAD_DTYPE_LO) == 0);
    TRUE(nf4_last_error() != NULL);
}

/* ------------------------------------------------------------------- codebook.h */
static void test_codebook(void) {
    float *out = (float *)filled(256 * sizeof(float), 0x5A);
    int64_t n = -7;
    EXPECT(nf4_codebook_normal(4, out), NF4_OK);
    EXPECT(nf4_codebook_normal(4, NULL), INVALID);
    EXPECT(nf4_codebook_normal(1, out), INVALID);
    EXPECT(nf4_codebook_normal(9, out), INVALID);
    EXPECT(nf4_codebook_normal(0, out), INVALID);
    EXPECT(nf4_codebook_normal(-1, out), INVALID);
    EXPECT(nf4_codebook_normal(INT32_MIN, out), INVALID);
    EXPECT(nf4_codebook_normal(INT32_MAX, out), INVALID);
    TRUE(fabs(nf4_normal_offset(4) - 0.9677083) < 1e-7);
    TRUE(isnan(nf4_normal_offset(1)) && isnan(nf4_normal_offset(-5)) && isnan(nf4_normal_offset(INT32_MAX)));
    EXPECT(nf4_codebook_fp4(NULL), INVALID);
    EXPECT(nf4_codebook_fp4(out), NF4_OK);
    EXPECT(nf4_codebook_int4(NULL), INVALID);
    EXPECT(nf4_codebook_int4(out), NF4_OK);
    EXPECT(nf4_codebook_dynamic(1, NULL), INVALID);
    EXPECT(nf4_codebook_dynamic(0, NULL), INVALID);
    EXPECT(nf4_codebook_dynamic(-3, out), NF4_OK); /* any non-zero is signed */
    EXPECT(nf4_codebook_by_name(NULL, out, 256, &n), INVALID);
    EXPECT(nf4_codebook_by_name("nf4", out, 256, NULL), INVALID);
    EXPECT_MSG(nf4_codebook_by_name("bogus", out, 256, &n), INVALID, "bogus");
    EXPECT(nf4_codebook_by_name("", out, 256, &n), INVALID);
    EXPECT(nf4_codebook_by_name("nf4", NULL, -1, &n), NF4_OK); /* a size query ignores capacity */
    TRUE(n == 16);
    EXPECT(nf4_codebook_by_name("nf4", out, 15, &n), INVALID);
    EXPECT(nf4_codebook_by_name("nf4", out, 0, &n), INVALID);
    EXPECT(nf4_codebook_by_name("nf4", out, -1, &n), INVALID);
    EXPECT(nf4_codebook_by_name("nf4", out, INT64_MIN, &n), INVALID);
    EXPECT(nf4_codebook_by_name("dynamic", out, BIG, &n), NF4_OK);
    TRUE(n == 256);
    {   /* the length output overlapping the table output */
        float *both = (float *)filled(300 * sizeof(float), 0);
        EXPECT_MSG(nf4_codebook_by_name("nf4", both, 16, (int64_t *)(void *)(both + 4)), INVALID, "overlaps");
        free(both);
    }
    TRUE(nf4_norm_ppf(0.5) == 0.0);
    TRUE(nf4_norm_ppf(0.975) > 1.95 && nf4_norm_ppf(0.975) < 1.97);
    (void)nf4_norm_ppf(0.0); /* outside (0, 1): any value, no crash */
    (void)nf4_norm_ppf(1.0);
    (void)nf4_norm_ppf(-1.0);
    (void)nf4_norm_ppf(NAN);
    free(out);
}

/* ------------------------------------------------------------------- quantize.h */
typedef nf4_status (*quant_fn)(const void *, nf4_dtype, int64_t, int64_t, const float *, uint8_t *, float *);
typedef nf4_status (*dequant_fn)(const uint8_t *, const float *, int64_t, int64_t, const float *, void *, nf4_dtype);

static void test_size_queries(void) {
    TRUE(nf4_num_blocks(0, 64) == 0);
    TRUE(nf4_num_blocks(65, 64) == 2);
    TRUE(nf4_num_blocks(-1, 64) == -1 && nf4_num_blocks(INT64_MIN, 64) == -1);
    TRUE(nf4_num_blocks(10, 0) == -1 && nf4_num_blocks(10, -64) == -1);
    TRUE(nf4_num_blocks(BIG, 1) == BIG);
    TRUE(nf4_num_blocks(BIG, 64) == BIG / 64 + 1);  /* no overflow in the rounding up */
    TRUE(nf4_num_blocks(BIG, BIG) == 1);
    TRUE(nf4_packed_size_4bit(0) == 0 && nf4_packed_size_4bit(3) == 2);
    TRUE(nf4_packed_size_4bit(-1) == -1 && nf4_packed_size_4bit(INT64_MIN) == -1);
    TRUE(nf4_packed_size_4bit(BIG) == BIG / 2 + 1);
    TRUE(nf4_blocksize_is_valid(64) == 1 && nf4_blocksize_is_valid(32) == 1 && nf4_blocksize_is_valid(4096) == 1);
    TRUE(nf4_blocksize_is_valid(0) == 0 && nf4_blocksize_is_valid(-64) == 0 && nf4_blocksize_is_valid(48) == 0);
    TRUE(nf4_blocksize_is_valid(16) == 0 && nf4_blocksize_is_valid(8192) == 0);
    TRUE(nf4_blocksize_is_valid(BIG) == 0 && nf4_blocksize_is_valid(INT64_MIN) == 0);
}

/* bits 4 or 8; fn/dfn the dispatched or the _ref entry points */
static void test_quantize_pair(int bits, quant_fn fn, dequant_fn dfn) {
    const int64_t n = 200, bs = 64, nb = 4;
    const int64_t ncodes = bits == 4 ? 100 : 200;
    const int tsize = 1 << bits;
    float *table = (float *)filled((size_t)tsize * sizeof(float), 0);
    float *x = (float *)filled((size_t)n * sizeof(float), 0);
    uint8_t *codes = (uint8_t *)filled((size_t)ncodes, 0xEE);
    float *absmax = (float *)filled((size_t)nb * sizeof(float), 0xEE);
    float *y = (float *)filled((size_t)n * sizeof(float), 0xEE);
    int64_t i;
    if (bits == 4)
        nf4_codebook_normal(4, table);
    else
        nf4_codebook_dynamic(1, table);
    for (i = 0; i < n; i++) x[i] = (float)(i % 13) - 6.0f;

    /* every failure below comes before any write */
    EXPECT(fn(NULL, NF4_FLOAT32, n, bs, table, codes, absmax), INVALID);
    EXPECT(fn(x, NF4_FLOAT32, n, bs, NULL, codes, absmax), INVALID);
    EXPECT(fn(x, NF4_FLOAT32, n, bs, table, NULL, absmax), INVALID);
    EXPECT(fn(x, NF4_FLOAT32, n, bs, table, codes, NULL), INVALID);
    EXPECT(fn(x, NF4_FLOAT32, 0, bs, table, codes, absmax), INVALID);
    EXPECT(fn(x, NF4_FLOAT32, -1, bs, table, codes, absmax), INVALID);
    EXPECT(fn(x, NF4_FLOAT32, INT64_MIN, bs, table, codes, absmax), INVALID);
    EXPECT_MSG(fn(x, NF4_FLOAT32, BIG, bs, table, codes, absmax), INVALID, "overflow");
    EXPECT_MSG(fn(x, NF4_FLOAT16, BIG / 2 + 1, bs, table, codes, absmax), INVALID, "overflow");
    EXPECT_MSG(fn(x, NF4_FLOAT32, BIG / 4 + 1, bs, table, codes, absmax), INVALID, "overflow");
    EXPECT(fn(x, NF4_FLOAT32, n, 0, table, codes, absmax), INVALID);
    EXPECT(fn(x, NF4_FLOAT32, n, -64, table, codes, absmax), INVALID);
    EXPECT(fn(x, NF4_FLOAT32, n, 48, table, codes, absmax), INVALID);
    EXPECT(fn(x, NF4_FLOAT32, n, 8192, table, codes, absmax), INVALID);
    EXPECT(fn(x, NF4_FLOAT32, n, BIG, table, codes, absmax), INVALID);
    EXPECT(fn(x, BAD_DTYPE_HI, n, bs, table, codes, absmax), INVALID);
    EXPECT(fn(x, BAD_DTYPE_LO, n, bs, table, codes, absmax), INVALID);
    /* outputs overlapping inputs or each other: rejected, naming both */
    EXPECT_MSG(fn(x, NF4_FLOAT32, n, bs, table, (uint8_t *)x, absmax), INVALID, "overlaps input 'x'");
    EXPECT_MSG(fn(x, NF4_FLOAT32, n, bs, table, codes, x + n - 1), INVALID, "'absmax' overlaps input 'x'");
    EXPECT_MSG(fn(x, NF4_FLOAT32, n, bs, table, codes, (float *)(void *)(codes + ncodes - 4)), INVALID,
               "overlaps output");
    EXPECT_MSG(fn(x, NF4_FLOAT32, n, bs, table, codes, table), INVALID, "'codebook'");
    TRUE(all_bytes(codes, (size_t)ncodes, 0xEE) && all_bytes(absmax, (size_t)nb * 4, 0xEE));
    /* a non-finite codebook entry is a bad argument, a non-finite input NON_FINITE */
    table[3] = NAN;
    EXPECT(fn(x, NF4_FLOAT32, n, bs, table, codes, absmax), INVALID);
    if (bits == 4)
        nf4_codebook_normal(4, table);
    else
        nf4_codebook_dynamic(1, table);
    x[77] = INFINITY;
    EXPECT_MSG(fn(x, NF4_FLOAT32, n, bs, table, codes, absmax), NF4_ERROR_NON_FINITE, "flat index 77");
    x[77] = 1.0f;
    EXPECT(fn(x, NF4_FLOAT32, n, bs, table, codes, absmax), NF4_OK);
    EXPECT(fn(x, NF4_FLOAT32, 1, bs, table, codes, absmax), NF4_OK); /* the smallest tensor */

    EXPECT(dfn(NULL, absmax, n, bs, table, y, NF4_FLOAT32), INVALID);
    EXPECT(dfn(codes, NULL, n, bs, table, y, NF4_FLOAT32), INVALID);
    EXPECT(dfn(codes, absmax, n, bs, NULL, y, NF4_FLOAT32), INVALID);
    EXPECT(dfn(codes, absmax, n, bs, table, NULL, NF4_FLOAT32), INVALID);
    EXPECT(dfn(codes, absmax, 0, bs, table, y, NF4_FLOAT32), INVALID);
    EXPECT(dfn(codes, absmax, -5, bs, table, y, NF4_FLOAT32), INVALID);
    EXPECT_MSG(dfn(codes, absmax, BIG, bs, table, y, NF4_FLOAT32), INVALID, "overflow");
    EXPECT_MSG(dfn(codes, absmax, BIG / 2 + 1, bs, table, y, NF4_BFLOAT16), INVALID, "overflow");
    EXPECT(dfn(codes, absmax, n, 100, table, y, NF4_FLOAT32), INVALID);
    EXPECT(dfn(codes, absmax, n, BIG, table, y, NF4_FLOAT32), INVALID);
    EXPECT(dfn(codes, absmax, n, bs, table, y, BAD_DTYPE_HI), INVALID);
    EXPECT(dfn(codes, absmax, n, bs, table, y, BAD_DTYPE_LO), INVALID);
    {   /* out over the codes (in place is impossible: out is wider), or over absmax */
        /* every range a call declares stays inside this one allocation, so that the overlap it
           reports is the intended one and never a neighbouring allocation */
        uint8_t *shared = (uint8_t *)filled((size_t)(4 * tsize + 4 * n), 0);
        memcpy(shared, codes, (size_t)ncodes);
        EXPECT_MSG(dfn(shared, absmax, n, bs, table, shared, NF4_FLOAT32), INVALID, "'out' overlaps input");
        EXPECT_MSG(dfn(codes, (const float *)(void *)shared, n, bs, table, shared + 8, NF4_FLOAT32), INVALID,
                   "input 'absmax'");
        EXPECT_MSG(dfn(codes, absmax, n, bs, (const float *)(void *)shared, shared + 4 * tsize - 4, NF4_FLOAT32),
                   INVALID, "input 'codebook'");
        free(shared);
    }
    TRUE(all_bytes(y, (size_t)n * 4, 0xEE));
    EXPECT(dfn(codes, absmax, n, bs, table, y, NF4_FLOAT32), NF4_OK);
    EXPECT(dfn(codes, absmax, n, bs, table, y, NF4_FLOAT16), NF4_OK);
    free(table);
    free(x);
    free(codes);
    free(absmax);
    free(y);
}

static void test_double_quantization(void) {
    const int64_t nb = 300, nested_n = 2;
    float *dyn = (float *)filled(256 * sizeof(float), 0);
    float *absmax = (float *)filled((size_t)nb * sizeof(float), 0);
    uint8_t *q = (uint8_t *)filled((size_t)nb, 0xEE);
    float *nested = (float *)filled((size_t)nested_n * sizeof(float), 0xEE);
    float *back = (float *)filled((size_t)nb * sizeof(float), 0xEE);
    float offset = -1.0f;
    int64_t i;
    nf4_codebook_dynamic(1, dyn);
    for (i = 0; i < nb; i++) absmax[i] = 0.5f + (float)(i % 7);

    EXPECT(nf4_double_quantize(NULL, nb, dyn, q, nested, &offset), INVALID);
    EXPECT(nf4_double_quantize(absmax, nb, NULL, q, nested, &offset), INVALID);
    EXPECT(nf4_double_quantize(absmax, nb, dyn, NULL, nested, &offset), INVALID);
    EXPECT(nf4_double_quantize(absmax, nb, dyn, q, NULL, &offset), INVALID);
    EXPECT(nf4_double_quantize(absmax, nb, dyn, q, nested, NULL), INVALID);
    EXPECT(nf4_double_quantize(absmax, 0, dyn, q, nested, &offset), INVALID);
    EXPECT(nf4_double_quantize(absmax, -1, dyn, q, nested, &offset), INVALID);
    EXPECT_MSG(nf4_double_quantize(absmax, BIG, dyn, q, nested, &offset), INVALID, "overflow");
    EXPECT_MSG(nf4_double_quantize(absmax, BIG / 4 + 1, dyn, q, nested, &offset), INVALID, "overflow");
    EXPECT_MSG(nf4_double_quantize(absmax, nb, dyn, (uint8_t *)absmax, nested, &offset), INVALID, "overlaps");
    EXPECT_MSG(nf4_double_quantize(absmax, nb, dyn, q, nested, nested + 1), INVALID, "'offset'");
    TRUE(offset == -1.0f && all_bytes(q, (size_t)nb, 0xEE) && all_bytes(nested, 8, 0xEE));
    /* non-finite scales are NON_FINITE, negative ones a bad argument; the message names the index */
    absmax[123] = NAN;
    EXPECT_MSG(nf4_double_quantize(absmax, nb, dyn, q, nested, &offset), NF4_ERROR_NON_FINITE, "block scale 123");
    absmax[123] = INFINITY;
    EXPECT_MSG(nf4_double_quantize(absmax, nb, dyn, q, nested, &offset), NF4_ERROR_NON_FINITE, "block scale 123");
    absmax[123] = -INFINITY;
    EXPECT_MSG(nf4_double_quantize(absmax, nb, dyn, q, nested, &offset), NF4_ERROR_NON_FINITE, "block scale 123");
    absmax[123] = -0.5f;
    EXPECT_MSG(nf4_double_quantize(absmax, nb, dyn, q, nested, &offset), INVALID, "block scale 123 is negative");
    TRUE(offset == -1.0f);
    absmax[123] = 0.5f;
    dyn[10] = NAN;
    EXPECT(nf4_double_quantize(absmax, nb, dyn, q, nested, &offset), INVALID);
    nf4_codebook_dynamic(1, dyn);
    EXPECT(nf4_double_quantize(absmax, nb, dyn, q, nested, &offset), NF4_OK);
    EXPECT(nf4_double_quantize(absmax, 1, dyn, q, nested, &offset), NF4_OK);
    EXPECT(nf4_double_quantize(absmax, nb, dyn, q, nested, &offset), NF4_OK);

    EXPECT(nf4_double_dequantize(NULL, nested, offset, nb, dyn, back), INVALID);
    EXPECT(nf4_double_dequantize(q, NULL, offset, nb, dyn, back), INVALID);
    EXPECT(nf4_double_dequantize(q, nested, offset, nb, NULL, back), INVALID);
    EXPECT(nf4_double_dequantize(q, nested, offset, nb, dyn, NULL), INVALID);
    EXPECT(nf4_double_dequantize(q, nested, offset, 0, dyn, back), INVALID);
    EXPECT(nf4_double_dequantize(q, nested, offset, INT64_MIN, dyn, back), INVALID);
    EXPECT_MSG(nf4_double_dequantize(q, nested, offset, BIG, dyn, back), INVALID, "overflow");
    EXPECT_MSG(nf4_double_dequantize(q, nested, NAN, nb, dyn, back), NF4_ERROR_NON_FINITE, "offset");
    EXPECT_MSG(nf4_double_dequantize(q, nested, INFINITY, nb, dyn, back), NF4_ERROR_NON_FINITE, "offset");
    {   /* absmax over nested_absmax or dyn_code, inside one allocation (see test_quantize_pair) */
        float *big = (float *)filled((size_t)(256 + nb) * sizeof(float), 0);
        memcpy(big, nested, (size_t)nested_n * sizeof(float));
        EXPECT_MSG(nf4_double_dequantize(q, big, offset, nb, dyn, big), INVALID, "input 'nested_absmax'");
        memcpy(big, dyn, 256 * sizeof(float));
        EXPECT_MSG(nf4_double_dequantize(q, nested, offset, nb, big, big + 200), INVALID, "input 'dyn_code'");
        free(big);
    }
    TRUE(all_bytes(back, (size_t)nb * 4, 0xEE));
    EXPECT(nf4_double_dequantize(q, nested, offset, nb, dyn, back), NF4_OK);
    free(dyn);
    free(absmax);
    free(q);
    free(nested);
    free(back);
}

/* --------------------------------------------------------------------- matmul.h */
typedef nf4_status (*matmul_fn)(const void *, nf4_dtype, int64_t, int64_t, int64_t, const uint8_t *, const float *,
                                int64_t, const float *, int32_t, void *);

static void test_matmul_fn(matmul_fn fn) {
    const int64_t M = 3, N = 32, K = 64, bs = 64;
    float *table = (float *)filled(16 * sizeof(float), 0);
    float *x = (float *)filled((size_t)(M * K) * sizeof(float), 0);
    float *w = (float *)filled((size_t)(N * K) * sizeof(float), 0);
    uint8_t *packed = (uint8_t *)filled((size_t)(N * K / 2), 0);
    float *scales = (float *)filled((size_t)(N * K / bs) * sizeof(float), 0);
    float *y = (float *)filled((size_t)(M * K) * sizeof(float), 0xEE);
    int64_t i;
    nf4_codebook_normal(4, table);
    for (i = 0; i < M * K; i++) x[i] = (float)(i % 5) - 2.0f;
    for (i = 0; i < N * K; i++) w[i] = (float)(i % 9) - 4.0f;
    EXPECT(nf4_quantize_4bit(w, NF4_FLOAT32, N * K, bs, table, packed, scales), NF4_OK);

    EXPECT(fn(NULL, NF4_FLOAT32, M, N, K, packed, scales, bs, table, 1, y), INVALID);
    EXPECT(fn(x, NF4_FLOAT32, M, N, K, NULL, scales, bs, table, 1, y), INVALID);
    EXPECT(fn(x, NF4_FLOAT32, M, N, K, packed, NULL, bs, table, 1, y), INVALID);
    EXPECT(fn(x, NF4_FLOAT32, M, N, K, packed, scales, bs, NULL, 1, y), INVALID);
    EXPECT(fn(x, NF4_FLOAT32, M, N, K, packed, scales, bs, table, 1, NULL), INVALID);
    EXPECT(fn(x, NF4_FLOAT32, 0, N, K, packed, scales, bs, table, 1, y), INVALID);
    EXPECT(fn(x, NF4_FLOAT32, M, 0, K, packed, scales, bs, table, 1, y), INVALID);
    EXPECT(fn(x, NF4_FLOAT32, M, N, 0, packed, scales, bs, table, 1, y), INVALID);
    EXPECT(fn(x, NF4_FLOAT32, -1, N, K, packed, scales, bs, table, 1, y), INVALID);
    EXPECT(fn(x, NF4_FLOAT32, M, INT64_MIN, K, packed, scales, bs, table, 1, y), INVALID);
    EXPECT_MSG(fn(x, NF4_FLOAT32, M, BIG, BIG, packed, scales, bs, table, 1, y), INVALID, "overflow");
    EXPECT_MSG(fn(x, NF4_FLOAT32, M, BIG, BIG, packed, scales, bs, table, 0, y), INVALID, "overflow");
    EXPECT_MSG(fn(x, NF4_FLOAT32, BIG, N, K, packed, scales, bs, table, 1, y), INVALID, "overflow");
    EXPECT_MSG(fn(x, NF4_BFLOAT16, M, BIG / 2 + 1, 1, packed, scales, 32, table, 0, y), INVALID, "overflow");
    EXPECT_MSG(fn(x, NF4_FLOAT32, (int64_t)1 << 40, (int64_t)1 << 30, K, packed, scales, bs, table, 1, y), INVALID,
               "overflow");
    EXPECT(fn(x, NF4_FLOAT32, M, N, K, packed, scales, 0, table, 1, y), INVALID);
    EXPECT(fn(x, NF4_FLOAT32, M, N, K, packed, scales, 63, table, 1, y), INVALID);
    EXPECT(fn(x, NF4_FLOAT32, M, N, K, packed, scales, BIG, table, 1, y), INVALID);
    EXPECT(fn(x, NF4_FLOAT16, M, N, K, packed, scales, bs, table, 1, y), INVALID); /* float32 or bfloat16 */
    EXPECT(fn(x, BAD_DTYPE_HI, M, N, K, packed, scales, bs, table, 1, y), INVALID);
    EXPECT(fn(x, BAD_DTYPE_LO, M, N, K, packed, scales, bs, table, 1, y), INVALID);
    /* y over x (np.matmul's out=x), over the weight or its scales */
    EXPECT_MSG(fn(x, NF4_FLOAT32, M, N, K, packed, scales, bs, table, 0, x), INVALID, "output 'y' overlaps input 'x'");
    EXPECT_MSG(fn(x, NF4_FLOAT32, 1, N, K, packed, scales, bs, table, 1, x + K - 1), INVALID, "input 'x'");
    EXPECT_MSG(fn(x, NF4_FLOAT32, 1, N, K, packed, scales, bs, table, 1, packed + 4), INVALID, "input 'packed'");
    EXPECT_MSG(fn(x, NF4_FLOAT32, 1, N, K, packed, scales, bs, table, 1, scales), INVALID, "input 'scales'");
    TRUE(all_bytes(y, (size_t)(M * K) * 4, 0xEE));
    table[15] = INFINITY;
    EXPECT(fn(x, NF4_FLOAT32, M, N, K, packed, scales, bs, table, 1, y), INVALID);
    nf4_codebook_normal(4, table);
    EXPECT(fn(x, NF4_FLOAT32, M, N, K, packed, scales, bs, table, 1, y), NF4_OK);
    EXPECT(fn(x, NF4_FLOAT32, M, N, K, packed, scales, bs, table, 0, y), NF4_OK);
    EXPECT(fn(x, NF4_FLOAT32, M, N, K, packed, scales, bs, table, -7, y), NF4_OK); /* non-zero: transposed */
    free(table);
    free(x);
    free(w);
    free(packed);
    free(scales);
    free(y);
}

static void test_decode_tile(void) {
    const int64_t N = 8, K = 64, bs = 32;
    float *table = (float *)filled(16 * sizeof(float), 0);
    uint8_t *packed = (uint8_t *)filled((size_t)(N * K / 2), 0x37);
    float *scales = (float *)filled((size_t)(N * K / bs) * sizeof(float), 0);
    float *out = (float *)filled((size_t)(N * K) * sizeof(float), 0xEE);
    int64_t i;
    nf4_codebook_normal(4, table);
    for (i = 0; i < N * K / bs; i++) scales[i] = 1.0f;
#define TILE(pk, sc, b, tb, n_, k_, a0, a1, c0, c1, dt, o) nf4_matmul_4bit_decode_tile(pk, sc, b, tb, n_, k_, a0, a1, c0, c1, dt, o)
    EXPECT(TILE(NULL, scales, bs, table, N, K, 0, N, 0, K, NF4_FLOAT32, out), INVALID);
    EXPECT(TILE(packed, NULL, bs, table, N, K, 0, N, 0, K, NF4_FLOAT32, out), INVALID);
    EXPECT(TILE(packed, scales, bs, NULL, N, K, 0, N, 0, K, NF4_FLOAT32, out), INVALID);
    EXPECT(TILE(packed, scales, bs, table, N, K, 0, N, 0, K, NF4_FLOAT32, NULL), INVALID);
    EXPECT(TILE(packed, scales, bs, table, 0, K, 0, 0, 0, K, NF4_FLOAT32, out), INVALID);
    EXPECT(TILE(packed, scales, bs, table, N, -K, 0, N, 0, 1, NF4_FLOAT32, out), INVALID);
    EXPECT(TILE(packed, scales, bs, table, N, K, -1, N, 0, K, NF4_FLOAT32, out), INVALID);
    EXPECT(TILE(packed, scales, bs, table, N, K, 0, N + 1, 0, K, NF4_FLOAT32, out), INVALID);
    EXPECT(TILE(packed, scales, bs, table, N, K, 3, 3, 0, K, NF4_FLOAT32, out), INVALID); /* empty */
    EXPECT(TILE(packed, scales, bs, table, N, K, 4, 2, 0, K, NF4_FLOAT32, out), INVALID);
    EXPECT(TILE(packed, scales, bs, table, N, K, 0, N, 0, K + 1, NF4_FLOAT32, out), INVALID);
    EXPECT(TILE(packed, scales, bs, table, N, K, 0, N, INT64_MIN, 1, NF4_FLOAT32, out), INVALID);
    EXPECT_MSG(TILE(packed, scales, bs, table, BIG, BIG, 0, 1, 0, 1, NF4_FLOAT32, out), INVALID, "overflow");
    EXPECT_MSG(TILE(packed, scales, bs, table, BIG, 2, 0, BIG / 2 + 1, 0, 2, NF4_FLOAT32, out), INVALID, "overflow");
    EXPECT(TILE(packed, scales, 0, table, N, K, 0, N, 0, K, NF4_FLOAT32, out), INVALID);
    EXPECT(TILE(packed, scales, BIG, table, N, K, 0, N, 0, K, NF4_FLOAT32, out), INVALID);
    EXPECT(TILE(packed, scales, bs, table, N, K, 0, N, 0, K, NF4_FLOAT16, out), INVALID);
    EXPECT(TILE(packed, scales, bs, table, N, K, 0, N, 0, K, BAD_DTYPE_HI, out), INVALID);
    EXPECT(TILE(packed, scales, bs, table, N, K, 0, N, 0, K, BAD_DTYPE_LO, out), INVALID);
    EXPECT_MSG(TILE(packed, scales, bs, table, N, K, 0, 1, 0, 2, NF4_FLOAT32, (void *)(packed + 10)), INVALID,
               "input 'packed'");
    EXPECT_MSG(TILE(packed, scales, bs, table, N, K, 0, 1, 0, 2, NF4_BFLOAT16, (void *)scales), INVALID,
               "input 'scales'");
    TRUE(all_bytes(out, (size_t)(N * K) * 4, 0xEE));
    EXPECT(TILE(packed, scales, bs, table, N, K, 0, N, 0, K, NF4_FLOAT32, out), NF4_OK);
    EXPECT(TILE(packed, scales, bs, table, N, K, N - 1, N, K - 1, K, NF4_BFLOAT16, out), NF4_OK);
#undef TILE
    free(table);
    free(packed);
    free(scales);
    free(out);
}

/* ---------------------------------------------------------------------- optim.h */
static void test_adam(void) {
    const int64_t n = 300, bs = 256, nb = 2;
    float *q1 = (float *)filled(256 * sizeof(float), 0), *q2 = (float *)filled(256 * sizeof(float), 0);
    float *p = (float *)filled((size_t)n * 4, 0), *g = (float *)filled((size_t)n * 4, 0);
    uint8_t *s1 = (uint8_t *)filled((size_t)n, 127), *s2 = (uint8_t *)filled((size_t)n, 0);
    float *a1 = (float *)filled((size_t)nb * 4, 0), *a2 = (float *)filled((size_t)nb * 4, 0);
    nf4_adam_hparams hp = {1e-3, 0.9, 0.999, 1e-8, 0.01, 1}, bad;
    int64_t skipped = -1, i;
    nf4_codebook_dynamic(1, q1);
    nf4_codebook_dynamic(0, q2);
    for (i = 0; i < n; i++) {
        p[i] = (float)(i % 7) - 3.0f;
        g[i] = 0.01f * (float)(i % 5) - 0.02f;
    }
#define ADAM(pp, gg, dt, nn, t1, t2, b1, b2, m1, m2, blk, h, sk) nf4_adam8bit_update(pp, gg, dt, nn, t1, t2, b1, b2, m1, m2, blk, h, sk)
    EXPECT(ADAM(NULL, g, NF4_FLOAT32, n, s1, s2, a1, a2, q1, q2, bs, &hp, &skipped), INVALID);
    EXPECT(ADAM(p, NULL, NF4_FLOAT32, n, s1, s2, a1, a2, q1, q2, bs, &hp, &skipped), INVALID);
    EXPECT(ADAM(p, g, NF4_FLOAT32, n, NULL, s2, a1, a2, q1, q2, bs, &hp, &skipped), INVALID);
    EXPECT(ADAM(p, g, NF4_FLOAT32, n, s1, NULL, a1, a2, q1, q2, bs, &hp, &skipped), INVALID);
    EXPECT(ADAM(p, g, NF4_FLOAT32, n, s1, s2, NULL, a2, q1, q2, bs, &hp, &skipped), INVALID);
    EXPECT(ADAM(p, g, NF4_FLOAT32, n, s1, s2, a1, NULL, q1, q2, bs, &hp, &skipped), INVALID);
    EXPECT(ADAM(p, g, NF4_FLOAT32, n, s1, s2, a1, a2, NULL, q2, bs, &hp, &skipped), INVALID);
    EXPECT(ADAM(p, g, NF4_FLOAT32, n, s1, s2, a1, a2, q1, NULL, bs, &hp, &skipped), INVALID);
    EXPECT(ADAM(p, g, NF4_FLOAT32, n, s1, s2, a1, a2, q1, q2, bs, NULL, &skipped), INVALID);
    EXPECT(ADAM(p, g, NF4_FLOAT32, 0, s1, s2, a1, a2, q1, q2, bs, &hp, &skipped), INVALID);
    EXPECT(ADAM(p, g, NF4_FLOAT32, -1, s1, s2, a1, a2, q1, q2, bs, &hp, &skipped), INVALID);
    EXPECT(ADAM(p, g, NF4_FLOAT32, INT64_MIN, s1, s2, a1, a2, q1, q2, bs, &hp, &skipped), INVALID);
    EXPECT_MSG(ADAM(p, g, NF4_FLOAT32, BIG, s1, s2, a1, a2, q1, q2, bs, &hp, &skipped), INVALID, "overflow");
    EXPECT_MSG(ADAM(p, g, NF4_FLOAT16, BIG / 2 + 1, s1, s2, a1, a2, q1, q2, bs, &hp, &skipped), INVALID, "overflow");
    EXPECT(ADAM(p, g, NF4_FLOAT32, n, s1, s2, a1, a2, q1, q2, 0, &hp, &skipped), INVALID);
    EXPECT(ADAM(p, g, NF4_FLOAT32, n, s1, s2, a1, a2, q1, q2, 100, &hp, &skipped), INVALID);
    EXPECT(ADAM(p, g, NF4_FLOAT32, n, s1, s2, a1, a2, q1, q2, BIG, &hp, &skipped), INVALID);
    EXPECT(ADAM(p, g, BAD_DTYPE_HI, n, s1, s2, a1, a2, q1, q2, bs, &hp, &skipped), INVALID);
    EXPECT(ADAM(p, g, BAD_DTYPE_LO, n, s1, s2, a1, a2, q1, q2, bs, &hp, &skipped), INVALID);
    bad = hp;
    bad.step = 0;
    EXPECT_MSG(ADAM(p, g, NF4_FLOAT32, n, s1, s2, a1, a2, q1, q2, bs, &bad, &skipped), INVALID, "step");
    bad.step = INT64_MIN;
    EXPECT(ADAM(p, g, NF4_FLOAT32, n, s1, s2, a1, a2, q1, q2, bs, &bad, &skipped), INVALID);
    bad = hp;
    bad.lr = NAN;
    EXPECT_MSG(ADAM(p, g, NF4_FLOAT32, n, s1, s2, a1, a2, q1, q2, bs, &bad, &skipped), INVALID, "lr");
    bad = hp;
    bad.beta1 = 1.0;
    EXPECT_MSG(ADAM(p, g, NF4_FLOAT32, n, s1, s2, a1, a2, q1, q2, bs, &bad, &skipped), INVALID, "beta1");
    bad = hp;
    bad.beta2 = NAN;
    EXPECT_MSG(ADAM(p, g, NF4_FLOAT32, n, s1, s2, a1, a2, q1, q2, bs, &bad, &skipped), INVALID, "beta2");
    bad = hp;
    bad.eps = INFINITY;
    EXPECT_MSG(ADAM(p, g, NF4_FLOAT32, n, s1, s2, a1, a2, q1, q2, bs, &bad, &skipped), INVALID, "eps");
    bad = hp;
    bad.weight_decay = -1.0;
    EXPECT_MSG(ADAM(p, g, NF4_FLOAT32, n, s1, s2, a1, a2, q1, q2, bs, &bad, &skipped), INVALID, "weight_decay");
    q2[9] = NAN;
    EXPECT(ADAM(p, g, NF4_FLOAT32, n, s1, s2, a1, a2, q1, q2, bs, &hp, &skipped), INVALID);
    nf4_codebook_dynamic(0, q2);
    /* aliasing: grad == param, the states over each other, a scale over the codes */
    EXPECT_MSG(ADAM(p, p, NF4_FLOAT32, n, s1, s2, a1, a2, q1, q2, bs, &hp, &skipped), INVALID,
               "output 'param' overlaps input 'grad'");
    EXPECT_MSG(ADAM(p, g, NF4_FLOAT32, n, s1, s1, a1, a2, q1, q2, bs, &hp, &skipped), INVALID,
               "output 'state1' overlaps output 'state2'");
    EXPECT_MSG(ADAM(p, g, NF4_FLOAT32, n, s1, s2, (float *)(void *)(s2 + 8), a2, q1, q2, bs, &hp, &skipped), INVALID,
               "'absmax1'");
    EXPECT_MSG(ADAM(p, g, NF4_FLOAT32, n, s1, s2, a1, a2, q1, q2, bs, &hp, (int64_t *)(void *)p), INVALID, "'skipped'");
    {   /* the hyperparameters stored where absmax1 lies (valid values, so only the overlap is wrong) */
        float *both = (float *)filled(sizeof(nf4_adam_hparams) + 64, 0);
        memcpy(both, &hp, sizeof hp);
        EXPECT_MSG(ADAM(p, g, NF4_FLOAT32, n, s1, s2, both, a2, q1, q2, bs, (const nf4_adam_hparams *)(void *)both,
                        &skipped),
                   INVALID, "output 'absmax1' overlaps input 'hp'");
        free(both);
    }
    TRUE(skipped == -1 && all_bytes(s1, (size_t)n, 127) && all_bytes(s2, (size_t)n, 0) && p[0] == -3.0f);
    /* non-finite values never fail: those elements are skipped */
    g[3] = NAN;
    g[250] = 1e30f;
    EXPECT(ADAM(p, g, NF4_FLOAT32, n, s1, s2, a1, a2, q1, q2, bs, &hp, &skipped), NF4_OK);
    TRUE(skipped == 2 && p[3] == 0.0f && p[250] == 2.0f && s1[250] == 127 && s2[250] == 0);
    TRUE(isfinite(a1[0]) && isfinite(a2[0]) && isfinite(a1[1]) && isfinite(a2[1]));
    EXPECT(ADAM(p, g, NF4_BFLOAT16, n / 2, s1, s2, a1, a2, q1, q2, bs, &hp, NULL), NF4_OK); /* skipped may be NULL */
#undef ADAM
    free(q1);
    free(q2);
    free(p);
    free(g);
    free(s1);
    free(s2);
    free(a1);
    free(a2);
}

/* -------------------------------------------------------------------- runtime.h */
static void test_runtime(void) {
    const int32_t threads = nf4_get_num_threads();
    char isa[32];
    TRUE(threads >= 1);
    EXPECT(nf4_set_num_threads(-1), INVALID);
    EXPECT(nf4_set_num_threads(INT32_MIN), INVALID);
    EXPECT(nf4_set_num_threads(INT32_MAX), INVALID);
    TRUE(nf4_get_num_threads() == threads);
    TRUE(nf4_get_thread_num_threads() == 0);
    EXPECT(nf4_set_thread_num_threads(-1), INVALID);
    EXPECT(nf4_set_thread_num_threads(1025), INVALID);
    EXPECT(nf4_set_thread_num_threads(INT32_MIN), INVALID);
    EXPECT(nf4_set_thread_num_threads(INT32_MAX), INVALID);
    TRUE(nf4_get_thread_num_threads() == 0);
    TRUE(nf4_set_thread_num_threads(1024) == NF4_OK && nf4_get_thread_num_threads() == 1024);
    TRUE(nf4_set_thread_num_threads(0) == NF4_OK && nf4_get_thread_num_threads() == 0);
    TRUE(nf4_get_num_threads() == threads);
    EXPECT(nf4_set_threading(NULL), INVALID);
    EXPECT(nf4_set_threading(""), INVALID);
    EXPECT(nf4_set_threading("bogus"), INVALID);
    TRUE(nf4_get_threading() != NULL);
    strncpy(isa, nf4_get_isa(), sizeof isa - 1);
    isa[sizeof isa - 1] = '\0';
    EXPECT(nf4_set_isa(NULL), INVALID);
    EXPECT(nf4_set_isa(""), INVALID);
    EXPECT(nf4_set_isa("avx1024"), INVALID);
    TRUE(strcmp(nf4_get_isa(), isa) == 0);
    TRUE(nf4_isa_available(NULL) == 0 && nf4_isa_available("") == 0 && nf4_isa_available("bogus") == 0);
    TRUE(nf4_isa_available("scalar") == 1);
    EXPECT(nf4_set_isa("scalar"), NF4_OK);
    EXPECT(nf4_set_isa("auto"), NF4_OK);
    TRUE(strcmp(nf4_get_isa(), isa) == 0);
    TRUE(nf4_amx_available() == 0 || nf4_amx_available() == 1);
    if (!nf4_amx_available()) {
        EXPECT(nf4_set_amx(1), INVALID);
        EXPECT(nf4_set_amx(-1), INVALID); /* any non-zero asks for AMX */
        TRUE(nf4_get_amx() == 0);
    }
    EXPECT(nf4_set_amx(0), NF4_OK);
    TRUE(nf4_get_amx() == 0);
    if (nf4_amx_available()) EXPECT(nf4_set_amx(1), NF4_OK);
}

/* ---------------------------------------------------------------------- pager.h */
static void test_pager(void) {
    nf4_pager *pg = (nf4_pager *)(void *)&failures; /* must be reset to NULL on failure */
    nf4_pager_stats st;
    void *mem = (void *)&checks, *other;
    const int64_t page = nf4_pager_os_page_size();
    char local[64];
    TRUE(page >= 4096 && (page & (page - 1)) == 0);
    TRUE(nf4_pager_last_os_error() >= 0);
    /* NULL pagers */
    nf4_pager_destroy(NULL);
    EXPECT(nf4_pager_alloc(NULL, 100, &mem), INVALID);
    TRUE(mem == NULL);
    EXPECT(nf4_pager_free(NULL, local), INVALID);
    EXPECT(nf4_pager_prefetch(NULL, local, 1), INVALID);
    EXPECT(nf4_pager_evict(NULL, local, 1), INVALID);
    EXPECT(nf4_pager_evict_all(NULL), INVALID);
    EXPECT(nf4_pager_stats_get(NULL, &st), INVALID);
    EXPECT(nf4_pager_set_stream(NULL, NULL), INVALID);
    EXPECT(nf4_pager_synchronize(NULL), INVALID);
    {
        const void *cmem = local;
        nf4_pager_file_stats fst;
        EXPECT(nf4_pager_map_file(NULL, "/dev/null", 0, 1, &cmem), INVALID);
        TRUE(cmem == NULL);
        EXPECT(nf4_pager_file_stats_get(NULL, &fst), INVALID);
    }
    TRUE(nf4_pager_get_backend(NULL) == NF4_PAGER_HOST);
    TRUE(nf4_pager_spill_dir(NULL) != NULL);
    TRUE(nf4_pager_spill_is_tmpfs(NULL) == 0);
    TRUE(nf4_pager_device(NULL) == -1);
    TRUE(nf4_pager_cuda_concurrent_managed(NULL) == 0);
    /* creation */
    EXPECT(nf4_pager_create(-1, NULL, 0, NULL), INVALID);
    EXPECT(nf4_pager_create(-1, NULL, -4096, &pg), INVALID);
    TRUE(pg == NULL);
    EXPECT(nf4_pager_create(-1, NULL, page + 1, &pg), INVALID);
    EXPECT(nf4_pager_create(-1, NULL, BIG, &pg), INVALID);
    EXPECT(nf4_pager_create(-1, NULL, INT64_MIN, &pg), INVALID);
    EXPECT(nf4_pager_create(-1, "/nonexistent-nf4core-dir/x", 0, &pg), INVALID);
    TRUE(pg == NULL);
    EXPECT(nf4_pager_create_cuda(-1, -1, 0, 0, &pg), INVALID);
    EXPECT(nf4_pager_create_cuda(-1, 0, 0, 0, NULL), INVALID);
    EXPECT(nf4_pager_create_cuda(-1, 0, 0, 0x80u, &pg), INVALID);
    EXPECT(nf4_pager_create_cuda(-1, 0, page + 1, 0, &pg), INVALID);
    TRUE(pg == NULL);
    EXPECT(nf4_pager_create(1 << 20, NULL, 0, &pg), NF4_OK);
    if (pg == NULL) return;
    TRUE(nf4_pager_get_backend(pg) == NF4_PAGER_HOST && nf4_pager_device(pg) == -1);
    /* sizes */
    EXPECT(nf4_pager_alloc(pg, 100, NULL), INVALID);
    EXPECT(nf4_pager_alloc(pg, 0, &mem), INVALID);
    TRUE(mem == NULL);
    EXPECT(nf4_pager_alloc(pg, -1, &mem), INVALID);
    EXPECT(nf4_pager_alloc(pg, INT64_MIN, &mem), INVALID);
    TRUE(nf4_pager_alloc(pg, BIG, &mem) != NF4_OK && mem == NULL && nf4_last_error()[0] != '\0');
    TRUE(nf4_pager_alloc(pg, BIG - page + 2, &mem) != NF4_OK && mem == NULL);
    EXPECT(nf4_pager_alloc(pg, 3 * page, &mem), NF4_OK);
    EXPECT(nf4_pager_prefetch(pg, mem, -1), INVALID);
    EXPECT(nf4_pager_prefetch(pg, mem, INT64_MIN), INVALID);
    EXPECT(nf4_pager_prefetch(pg, mem, 0), NF4_OK);
    EXPECT(nf4_pager_prefetch(pg, mem, 3 * page), NF4_OK);
    EXPECT(nf4_pager_prefetch(pg, mem, 3 * page + 1), INVALID); /* past the allocation */
    EXPECT(nf4_pager_prefetch(pg, mem, BIG), INVALID);
    EXPECT(nf4_pager_prefetch(pg, (char *)mem + page, BIG), INVALID); /* ptr + nbytes would wrap */
    EXPECT(nf4_pager_prefetch(pg, local, 8), INVALID);               /* not the pager's memory */
    EXPECT(nf4_pager_prefetch(pg, NULL, 8), INVALID);
    EXPECT(nf4_pager_evict(pg, mem, -1), INVALID);
    EXPECT(nf4_pager_evict(pg, mem, BIG), INVALID);
    EXPECT(nf4_pager_evict(pg, local, 8), INVALID);
    EXPECT(nf4_pager_evict(pg, mem, 0), NF4_OK);
    EXPECT(nf4_pager_evict(pg, mem, page), NF4_OK);
    EXPECT(nf4_pager_evict_all(pg), NF4_OK);
    EXPECT(nf4_pager_stats_get(pg, NULL), INVALID);
    EXPECT(nf4_pager_stats_get(pg, &st), NF4_OK);
    TRUE(st.num_allocations == 1 && st.allocated_bytes == 3 * page && st.budget_bytes == 1 << 20);
    EXPECT(nf4_pager_set_stream(pg, local), INVALID); /* host backend: only NULL */
    EXPECT(nf4_pager_set_stream(pg, NULL), NF4_OK);
    EXPECT(nf4_pager_synchronize(pg), NF4_OK);
    EXPECT(nf4_pager_free(pg, local), INVALID);
    EXPECT(nf4_pager_free(pg, NULL), INVALID);
    EXPECT(nf4_pager_free(pg, (char *)mem + 1), INVALID); /* inside, not the start */
    EXPECT(nf4_pager_alloc(pg, 1, &other), NF4_OK);
    EXPECT(nf4_pager_free(pg, mem), NF4_OK);
    EXPECT(nf4_pager_free(pg, mem), INVALID); /* twice */
    EXPECT(nf4_pager_prefetch(pg, mem, 8), INVALID); /* freed */
    EXPECT(nf4_pager_free(pg, other), NF4_OK);
    nf4_pager_destroy(pg);
}

/* ----------------------------------------------------------------------- cuda.h */
static void test_cuda(void) {
    int32_t built = -1, count = -1;
    nf4_status want;
    float cb[16], dyn[256], f[64], off = 0.0f;
    uint8_t u[64];
    nf4_adam_hparams hp = {1e-3, 0.9, 0.999, 1e-8, 0.0, 1};
    EXPECT(nf4_cuda_available(NULL, NULL), NF4_OK);
    EXPECT(nf4_cuda_available(&built, NULL), NF4_OK);
    EXPECT(nf4_cuda_available(NULL, &count), NF4_OK);
    EXPECT(nf4_cuda_available(&built, &count), NF4_OK);
    TRUE((built == 0 || built == 1) && count >= 0 && (built || count == 0));
    TRUE((nf4_cuda_runtime_version() > 0) == (built == 1));
    nf4_codebook_normal(4, cb);
    nf4_codebook_dynamic(1, dyn);
    /* argument errors: found before any device access where CUDA is built; NF4_ERROR_CUDA where it is not */
    want = built ? INVALID : NF4_ERROR_CUDA;
    EXPECT(nf4_cuda_quantize_4bit(NULL, NF4_FLOAT32, 64, 64, cb, u, f, NULL), want);
    EXPECT(nf4_cuda_quantize_4bit(f, NF4_FLOAT32, 0, 64, cb, u, f, NULL), want);
    EXPECT(nf4_cuda_quantize_4bit(f, NF4_FLOAT32, BIG, 64, cb, u, f + 32, NULL), want);
    EXPECT(nf4_cuda_quantize_4bit(f, NF4_FLOAT32, 64, 48, cb, u, f + 32, NULL), want);
    EXPECT(nf4_cuda_quantize_4bit(f, BAD_DTYPE_HI, 64, 64, cb, u, f + 32, NULL), want);
    EXPECT(nf4_cuda_quantize_4bit(f, NF4_FLOAT32, 16, 64, cb, (uint8_t *)f, f + 32, NULL), want);
    EXPECT(nf4_cuda_quantize_8bit(f, NF4_FLOAT32, 64, 64, NULL, u, f + 32, NULL), want);
    EXPECT(nf4_cuda_quantize_8bit(f, NF4_FLOAT32, -1, 64, dyn, u, f + 32, NULL), want);
    EXPECT(nf4_cuda_quantize_8bit(f, NF4_FLOAT16, BIG / 2 + 1, 64, dyn, u, f + 32, NULL), want);
    EXPECT(nf4_cuda_dequantize_4bit(u, NULL, 64, 64, cb, f, NF4_FLOAT32, NULL), want);
    EXPECT(nf4_cuda_dequantize_4bit(u, f, BIG, 64, cb, f + 1, NF4_FLOAT32, NULL), want);
    EXPECT(nf4_cuda_dequantize_4bit(u, f, 8, 64, cb, u, NF4_FLOAT32, NULL), want);
    EXPECT(nf4_cuda_dequantize_8bit(u, f, 64, 64, NULL, f + 1, NF4_FLOAT32, NULL), want);
    EXPECT(nf4_cuda_dequantize_8bit(u, f, 0, 64, dyn, f + 1, NF4_FLOAT32, NULL), want);
    EXPECT(nf4_cuda_dequantize_4bit_dq(u, NULL, f, 0.0f, 64, 64, cb, dyn, f + 8, NF4_FLOAT32, NULL), want);
    EXPECT(nf4_cuda_dequantize_4bit_dq(u, u + 40, f, NAN, 64, 64, cb, dyn, f + 8, NF4_FLOAT32, NULL),
           built ? NF4_ERROR_NON_FINITE : NF4_ERROR_CUDA);
    EXPECT(nf4_cuda_dequantize_4bit_dq(u, u + 40, f, 0.0f, BIG, 64, cb, dyn, f + 8, NF4_FLOAT32, NULL), want);
    EXPECT(nf4_cuda_double_quantize(NULL, 4, dyn, u, f, &off, NULL), want);
    EXPECT(nf4_cuda_double_quantize(f, 0, dyn, u, f + 8, &off, NULL), want);
    EXPECT(nf4_cuda_double_quantize(f, BIG, dyn, u, f + 8, &off, NULL), want);
    EXPECT(nf4_cuda_double_quantize(f, 4, dyn, (uint8_t *)f, f + 8, &off, NULL), want);
    EXPECT(nf4_cuda_double_dequantize(u, f, 0.0f, -4, dyn, f + 8, NULL), want);
    EXPECT(nf4_cuda_double_dequantize(u, f, INFINITY, 4, dyn, f + 8, NULL),
           built ? NF4_ERROR_NON_FINITE : NF4_ERROR_CUDA);
    EXPECT(nf4_cuda_double_dequantize(u, f, 0.0f, BIG, dyn, f + 8, NULL), want);
    EXPECT(nf4_cuda_gemv_4bit(f, NF4_FLOAT32, 0, 4, 64, u, f, 64, cb, f + 32, NULL), want);
    EXPECT(nf4_cuda_gemv_4bit(f, NF4_FLOAT32, 9, 4, 64, u, f, 64, cb, f + 32, NULL), want); /* M 1..8 */
    EXPECT(nf4_cuda_gemv_4bit(f, NF4_FLOAT32, 1, BIG, BIG, u, f, 64, cb, f + 32, NULL), want);
    EXPECT(nf4_cuda_gemv_4bit(f, NF4_FLOAT32, 1, 4, 64, u, NULL, 64, cb, f + 32, NULL), want);
    EXPECT(nf4_cuda_gemv_4bit(f, NF4_FLOAT32, 1, 4, 16, u, f + 40, 64, cb, f, NULL), want);
    EXPECT(nf4_cuda_gemv_4bit_dq(f, NF4_FLOAT32, 1, 4, 64, u, NULL, f, 0.0f, 64, cb, dyn, f + 32, NULL), want);
    EXPECT(nf4_cuda_gemv_4bit_dq(f, NF4_FLOAT32, 1, -4, 64, u, u + 40, f, 0.0f, 64, cb, dyn, f + 32, NULL), want);
    EXPECT(nf4_cuda_adam8bit_update(NULL, f, NF4_FLOAT32, 8, u, u + 8, f + 8, f + 9, dyn, dyn, 64, &hp, NULL, NULL),
           want);
    EXPECT(nf4_cuda_adam8bit_update(f, f + 8, NF4_FLOAT32, BIG, u, u + 8, f + 16, f + 17, dyn, dyn, 64, &hp, NULL,
                                    NULL),
           want);
    EXPECT(nf4_cuda_adam8bit_update(f, f, NF4_FLOAT32, 8, u, u + 8, f + 16, f + 17, dyn, dyn, 64, &hp, NULL, NULL),
           want);
    EXPECT(nf4_cuda_adam8bit_update(f, f + 8, NF4_FLOAT32, 8, u, u, f + 16, f + 17, dyn, dyn, 64, &hp, NULL, NULL),
           want);
    EXPECT(nf4_cuda_adam8bit_update(f, f + 8, NF4_FLOAT32, 8, u, u + 8, f + 16, f + 17, dyn, dyn, 64, NULL, NULL,
                                    NULL),
           want);
}

int main(void) {
    test_common();
    test_codebook();
    test_size_queries();
    test_quantize_pair(4, nf4_quantize_4bit, nf4_dequantize_4bit);
    test_quantize_pair(4, nf4_quantize_4bit_ref, nf4_dequantize_4bit_ref);
    test_quantize_pair(8, nf4_quantize_8bit, nf4_dequantize_8bit);
    test_quantize_pair(8, nf4_quantize_8bit_ref, nf4_dequantize_8bit_ref);
    test_double_quantization();
    test_matmul_fn(nf4_matmul_4bit);
    test_matmul_fn(nf4_matmul_4bit_ref);
    test_decode_tile();
    test_adam();
    test_runtime();
    test_pager();
    test_cuda();
    printf("%d checks, %d failed\n", checks, failures);
    return failures != 0;
}
