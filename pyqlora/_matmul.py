"""Products with a 4-bit quantized matrix, without materializing it."""
import numpy as np

from . import _dtypes
from . import _nf4core as _ext  # bindings/matmul.pxi
from ._array import QuantizedArray
from ._codebooks import lookup_table
from ._quantize import _block_scales
from ._runtime import sync_threads

__all__ = ["matmul_4bit"]


def matmul_4bit(x, q, transpose=True, out=None):
    """``x @ W.T`` (default) or ``x @ W`` with a 4-bit quantized matrix W.

    W is the 2-D :class:`QuantizedArray` `q` (shape ``(N, K)``, as an
    ``nn.Linear`` weight: out_features x in_features). With ``transpose=True``
    this is ``torch.nn.functional.linear``: x is ``(..., K)`` and the result
    ``(..., N)``; with ``transpose=False`` x is ``(..., N)`` and the result
    ``(..., K)`` (the input gradient of a linear layer). The weight is decoded
    block by block inside the kernel, never as a whole. x is float32 or
    bfloat16 and the result has its dtype; products and sums are float32.

    Examples
    --------
    >>> import numpy as np, pyqlora as pq
    >>> w = np.random.default_rng(0).standard_normal((64, 128)).astype(np.float32)
    >>> q = pq.quantize(w)
    >>> x = np.ones((2, 128), np.float32)
    >>> y = pq.matmul_4bit(x, q)
    >>> y.shape, bool(np.allclose(y, x @ pq.dequantize(q).T, rtol=1e-4, atol=1e-3))
    ((2, 64), True)
    """
    if not isinstance(q, QuantizedArray):
        raise TypeError(f"q must be a QuantizedArray, got {type(q).__name__}")
    if q.ndim != 2:
        raise ValueError(f"the quantized matrix must be 2-D, got shape {q.shape}")
    if q.codebook not in ("nf4", "fp4", "int4", "nf2", "nf3"):
        raise ValueError(f"unsupported codebook {q.codebook!r}")
    x = np.asarray(x)
    dtype = _dtypes.normalize_dtype(x.dtype, what="x dtype")
    if dtype not in (_dtypes.float32, _dtypes.bfloat16):
        raise TypeError(f"x must be float32 or bfloat16, got {x.dtype}")
    n_out, k_in = q.shape
    inner, outer = (k_in, n_out) if transpose else (n_out, k_in)
    if x.ndim < 1 or x.shape[-1] != inner:
        raise ValueError(f"x has shape {x.shape}; its last dimension must be {inner} "
                         f"({'in' if transpose else 'out'}_features of the {q.shape} matrix)")
    lead = x.shape[:-1]
    m = int(np.prod(lead)) if lead else 1
    x2 = np.ascontiguousarray(x).reshape(m, inner)
    shape = lead + (outer,)
    if out is None:
        out = np.empty(shape, dtype)
    elif not isinstance(out, np.ndarray) or out.shape != shape or out.dtype != dtype or not out.flags.c_contiguous \
            or not out.flags.writeable:
        raise ValueError(f"out must be a writable C-contiguous {dtype} array of shape {shape}")
    if m == 0:
        return out
    sync_threads()
    _ext.matmul_4bit(x2.reshape(-1).view(np.uint8), _dtypes.KERNEL_DTYPES[dtype], m, n_out, k_in, q.packed,
                     _block_scales(q), q.blocksize, lookup_table(q.codebook, 16), bool(transpose),
                     out.reshape(-1).view(np.uint8))
    return out
