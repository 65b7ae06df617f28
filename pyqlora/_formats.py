"""Facts of the blockwise formats: block sizes and 4-bit codebook names (a leaf module).

Every check of a block size or a 4-bit codebook name in pyqlora goes through
:func:`check_blocksize` and :func:`check_codebook`, so the accepted values and
the error messages are the same everywhere (the array API, ``QuantizedArray``,
the torch layers and the optimizers).
"""
import numbers

from ._nf4core import DQ_BLOCKSIZE  # nf4core/include/nf4core/quantize.h: bitsandbytes' nested blocksize

__all__ = ["BLOCKSIZES", "CODEBOOKS_4BIT", "DQ_BLOCKSIZE", "check_blocksize", "check_codebook"]

#: Valid blocksizes for 4-bit and 8-bit blockwise quantization (bitsandbytes' CPU and CUDA set).
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)

#: Codebook names usable with :func:`pyqlora.quantize` (16 codes or fewer).
CODEBOOKS_4BIT = ("nf4", "fp4", "int4", "nf2", "nf3")

# NormalFloat tables with more than 16 values: named here so that the error says why they do not fit
_WIDE_NF = {"nf5": 5, "nf6": 6, "nf7": 7, "nf8": 8}


def check_blocksize(blocksize):
    """`blocksize` as an int if it is one of :data:`BLOCKSIZES`; TypeError or ValueError otherwise."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, numbers.Integral):
        raise TypeError(f"blocksize must be an integer, got {type(blocksize).__name__}")
    if int(blocksize) not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {', '.join(map(str, BLOCKSIZES))}; got {blocksize}")
    return int(blocksize)


def check_codebook(codebook):
    """The lower-case name of a 4-bit codebook (one of :data:`CODEBOOKS_4BIT`); TypeError or ValueError otherwise."""
    if not isinstance(codebook, str):
        raise TypeError(f"codebook must be a name, got {type(codebook).__name__}")
    name = codebook.lower()
    if name in _WIDE_NF:
        bits = _WIDE_NF[name]
        raise ValueError(f"codebook {name!r} has {2 ** bits} values and needs {bits} bits; "
                         f"4-bit quantization supports {', '.join(CODEBOOKS_4BIT)}")
    if name not in CODEBOOKS_4BIT:
        raise ValueError(f"unknown 4-bit codebook {codebook!r}; expected one of {', '.join(CODEBOOKS_4BIT)}")
    return name
