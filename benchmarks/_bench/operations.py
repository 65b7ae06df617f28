"""What bench_kernels.py times: the six operations, the bytes each is charged, one result.

Byte model: every library is charged the bytes the bitsandbytes format must move, the
input read once and the output written once, nothing for temporaries (the docstring of
bench_kernels.py and benchmarks/README.md give the figures).
"""
import math
from dataclasses import dataclass, field

import numpy as np

BLOCK_4BIT = 64  # QLoRA's blocksize
BLOCK_8BIT = 256  # QLoRA's DQ blocksize, also bitsandbytes' quantize_blockwise default


@dataclass(frozen=True)
class Op:
    key: str
    label: str
    bits: int
    quantize: bool  # False: dequantize the output of the same library's quantize
    into: bool = False  # dequantize into a preallocated output (out=), where the library has it

    @property
    def method(self):
        """The adapter method that runs it: an out= variant calls its dequantize with out=."""
        return f"{'' if self.quantize else 'de'}quantize{self.bits}"


# Dequantize is measured twice: allocating its output, as a default call does (a fresh
# 256 MiB array costs the OS page faults and zeroing, the same for every library), and
# into a preallocated output (out=), which is what the kernel itself costs.
OPS = (
    Op("quantize4", "NF4+DQ quantize", 4, True),
    Op("dequantize4", "NF4+DQ dequantize", 4, False),
    Op("dequantize4_out", "NF4+DQ dequantize out=", 4, False, True),
    Op("quantize8", "8-bit quantize", 8, True),
    Op("dequantize8", "8-bit dequantize", 8, False),
    Op("dequantize8_out", "8-bit dequantize out=", 8, False, True),
)


def stored_bytes(bits, n):
    """Bytes of the quantized form of n parameters (the bitsandbytes layout)."""
    if bits == 4:
        nb = -(-n // BLOCK_4BIT)
        return -(-n // 2) + nb + 4 * -(-nb // BLOCK_8BIT) + 4
    return n + 4 * -(-n // BLOCK_8BIT)


def bytes_moved(op, n, itemsize):
    """Input read once + output written once (see the module docstring)."""
    return n * itemsize + stored_bytes(op.bits, n)


def itemsize(dtype):
    return 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize


@dataclass
class Result:
    op: Op
    dtype: str
    shape: tuple
    library: str
    status: str = "ok"  # or "missing (...)", "failed: ...", "n/a: ..."
    times: list = field(default_factory=list)
    note: str = ""

    @property
    def n(self):
        return math.prod(self.shape)

    @property
    def best(self):
        return min(self.times) if self.times else None

    def gparam_s(self):
        return self.n / self.best / 1e9

    def gb_s(self):
        return bytes_moved(self.op, self.n, itemsize(self.dtype)) / self.best / 1e9
