"""Products with a 4-bit quantized matrix, without materializing it."""
import math

import numpy as np

from . import _dtypes
from . import _nf4core as _ext  # bindings/matmul.pxi
from ._array import QuantizedArray, block_scales
from ._codebooks import lookup_table
from ._runtime import sync_threads

__all__ = ["decode_tile", "fused_matrix", "matmul_4bit"]


def matmul_4bit(x, q, transpose=True, out=None):
    """``x @ W.T`` (default) or ``x @ W`` with a 4-bit quantized matrix W.

    W is the 2-D :class:`QuantizedArray` `q` (shape ``(N, K)``, as an
    ``nn.Linear`` weight: out_features x in_features). With ``transpose=True``
    this is ``torch.nn.functional.linear``: x is ``(..., K)`` and the result
    ``(..., N)``; with ``transpose=False`` x is ``(..., N)`` and the result
    ``(..., K)`` (the input gradient of a linear layer). The weight is decoded
    block by block inside the kernel, never as a whole. x is float32 or
    bfloat16 and the result has its dtype; products and sums are float32.
    Where AMX is in use (:func:`pyqlora.get_amx`), bfloat16 x with 5 or more
    rows (and in_features a multiple of 32) is multiplied on AMX tiles by the
    weight's values rounded to bfloat16, those of
    ``dequantize(q, dtype="bfloat16")``; elsewhere the weight enters as float32.

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
    x = _dtypes.as_numpy(x)
    dtype = _dtypes.normalize_dtype(x.dtype, what="x dtype")
    if dtype not in (_dtypes.float32, _dtypes.bfloat16):
        raise TypeError(f"x must be float32 or bfloat16, got {x.dtype}")
    n_out, k_in = q.shape
    inner, outer = (k_in, n_out) if transpose else (n_out, k_in)
    if x.ndim < 1 or x.shape[-1] != inner:
        raise ValueError(f"x has shape {x.shape}; its last dimension must be {inner} "
                         f"({'in' if transpose else 'out'}_features of the {q.shape} matrix)")
    lead = x.shape[:-1]
    m = math.prod(lead)  # not np.prod: a ufunc reduction costs a fifth of a small GEMV call
    x2 = np.ascontiguousarray(x).reshape(m, inner)
    shape = lead + (outer,)
    given = out is not None
    if not given:
        out = np.empty(shape, dtype)
    elif not isinstance(out, np.ndarray) or out.shape != shape or out.dtype != dtype or not out.flags.c_contiguous \
            or not out.flags.writeable:
        raise ValueError(f"out must be a writable C-contiguous {dtype} array of shape {shape}")
    if m == 0:
        return out
    scales = block_scales(q)
    # like np.matmul, out may be x itself (or overlap q): then the kernel writes a temporary
    target = np.empty(shape, dtype) if given and _overlaps(out, x2, q.packed, scales) else out
    sync_threads()
    _ext.matmul_4bit(x2.reshape(-1).view(np.uint8), _dtypes.KERNEL_DTYPES[dtype], m, n_out, k_in, q.packed, scales,
                     q.blocksize, lookup_table(q.codebook, 16), bool(transpose), target.reshape(-1).view(np.uint8))
    if target is not out:
        out[...] = target
    return out


def fused_matrix(q):
    """The kernel arguments of the 2-D QuantizedArray `q`, checked once (internal).

    ``fm.matmul(x_address, kernel_dtype, rows, transpose, out_address)`` then runs
    :func:`matmul_4bit` on raw buffers without re-checking them: the caller (the
    inference path of ``pyqlora.nn.Linear4bit``) owns their shapes and contiguity.
    Call :func:`pyqlora._runtime.sync_threads` before it, as every kernel call does.
    """
    if not isinstance(q, QuantizedArray) or q.ndim != 2:
        raise ValueError("q must be a 2-D QuantizedArray")
    return _ext.FusedMatrix(q.packed, block_scales(q), q.blocksize, lookup_table(q.codebook, 16), q.shape[0],
                            q.shape[1])


def _overlaps(out, *inputs):
    """Whether `out` may share memory with any of `inputs` (bounds only: cheap, never a false negative)."""
    return any(np.may_share_memory(out, a) for a in inputs)


def decode_tile(q, rows, cols, out):
    """Dequantize the tile ``W[rows, cols]`` of the 2-D QuantizedArray `q` into `out`.

    `rows` and `cols` are slices with step 1; `out` is a C-contiguous float32 or
    bfloat16 array of the tile's shape. Values are those of
    :func:`pyqlora.dequantize` (``codebook[code] * scale`` rounded to `out`'s
    dtype). The building block of the tiled products of ``pyqlora._glue.products``:
    only a tile is ever dense.
    """
    if not isinstance(q, QuantizedArray) or q.ndim != 2:
        raise ValueError("q must be a 2-D QuantizedArray")
    n, k = q.shape
    n0, n1, _ = rows.indices(n)
    k0, k1, _ = cols.indices(k)
    dtype = _dtypes.normalize_dtype(out.dtype, what="out dtype")
    if dtype not in (_dtypes.float32, _dtypes.bfloat16):
        raise TypeError(f"out must be float32 or bfloat16, got {out.dtype}")
    if out.shape != (n1 - n0, k1 - k0) or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"out must be a writable C-contiguous array of shape {(n1 - n0, k1 - k0)}, got {out.shape}")
    scales = block_scales(q)
    target = np.empty(out.shape, dtype) if _overlaps(out, q.packed, scales) else out
    sync_threads()
    _ext.matmul_4bit_decode_tile(q.packed, scales, q.blocksize, lookup_table(q.codebook, 16), n, k, n0, n1,
                                 k0, k1, _dtypes.KERNEL_DTYPES[dtype], target.reshape(-1).view(np.uint8))
    if target is not out:
        out[...] = target
    return out
