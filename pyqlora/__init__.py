"""pyqlora: QLoRA's memory-saving machinery for NumPy and PyTorch.

The array API (this module) quantizes float arrays to blockwise 4-bit codes
(NF4, FP4, INT4, NF2/NF3) with optional double quantization, and to blockwise
8-bit codes, bit-compatible with bitsandbytes. The numerical work is done by
the C++ library nf4core. Torch is never imported here.

>>> import numpy as np, pyqlora as pq
>>> q = pq.quantize(np.ones((64, 64), np.float32))
>>> q.shape, q.codebook, q.blocksize, q.double_quant
((64, 64), 'nf4', 64, True)
"""
try:
    from . import _nf4core  # noqa: F401  (the compiled nf4core bindings)
except ImportError as _exc:  # pragma: no cover - only in a source checkout
    import os as _os

    raise ImportError(
        "pyqlora's compiled extension modules were not found: this looks like the source tree at "
        f"{_os.path.dirname(_os.path.dirname(__file__))}. Install the package (pip install .) and run from "
        "another directory, or run tests with `pytest` (not `python -m pytest`, which puts the source first)."
    ) from _exc

from ._array import QuantizedArray
from ._codebooks import codebook, dynamic_codebook
from ._config import cpu_features, default_compute_dtype, show_config
from ._errors import NonFiniteError
from ._formats import BLOCKSIZES, CODEBOOKS_4BIT
from ._matmul import matmul_4bit
from ._pager import Pager
from ._quantize import dequantize, dequantize_blockwise, quantize, quantize_blockwise
from ._runtime import (amx_available, available_isas, get_amx, get_isa, get_num_threads, get_threading, num_threads,
                       set_amx, set_isa, set_num_threads, set_threading)
from ._version import __version__

__all__ = [
    "BLOCKSIZES",
    "CODEBOOKS_4BIT",
    "NonFiniteError",
    "Pager",
    "QuantizedArray",
    "__version__",
    "amx_available",
    "available_isas",
    "codebook",
    "cpu_features",
    "default_compute_dtype",
    "dequantize",
    "dequantize_blockwise",
    "dynamic_codebook",
    "get_amx",
    "get_isa",
    "get_num_threads",
    "get_threading",
    "matmul_4bit",
    "num_threads",
    "quantize",
    "quantize_blockwise",
    "set_amx",
    "set_isa",
    "set_num_threads",
    "set_threading",
    "show_config",
]
