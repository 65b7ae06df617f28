/*
 * nf4core — the numerical core of pyqlora: NF4/FP4/NFk codebooks, blockwise
 * 4-bit and 8-bit quantization and double quantization, bit-compatible with
 * bitsandbytes. Plain C API; link with `pkg-config --cflags --libs nf4core`.
 */
#ifndef NF4CORE_NF4CORE_H
#define NF4CORE_NF4CORE_H

#include "nf4core/common.h"
#include "nf4core/codebook.h"
#include "nf4core/quantize.h"
#include "nf4core/runtime.h"
#include "nf4core/matmul.h"
#include "nf4core/optim.h"
#include "nf4core/pager.h"
#include "nf4core/cuda.h"
#include "nf4core/gptq.h"

#endif /* NF4CORE_NF4CORE_H */
