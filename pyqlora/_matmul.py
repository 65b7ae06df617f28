"""Products with a 4-bit quantized matrix, without materializing it."""
import math
import threading

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
    m = math.prod(lead)  # not np.prod: a ufunc reduction costs a fifth of a small GEMV call
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


def decode_tile(q, rows, cols, out):
    """Dequantize the tile ``W[rows, cols]`` of the 2-D QuantizedArray `q` into `out`.

    `rows` and `cols` are slices with step 1; `out` is a C-contiguous float32 or
    bfloat16 array of the tile's shape. Values are those of
    :func:`pyqlora.dequantize` (``codebook[code] * scale`` rounded to `out`'s
    dtype). The building block of tiled products: only a tile is ever dense.
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
    sync_threads()
    _ext.matmul_4bit_decode_tile(q.packed, _block_scales(q), q.blocksize, lookup_table(q.codebook, 16), n, k, n0, n1,
                                 k0, k1, _dtypes.KERNEL_DTYPES[dtype], out.reshape(-1).view(np.uint8))
    return out


# Bytes of the dense tile that tiled products decode at a time (per thread that calls them),
# and the least tile width along the output per torch thread: measured on a 2-core AMX machine
# (bf16, M = 1024, inner 4096 or 11008), torch's GEMM (oneDNN) runs about 2x slower when a tile
# has fewer than ~1024 output columns at 2 threads, and shows no such penalty down to 256 at
# 1 thread (benchmarks/bench_matmul.py --train; docs/performance.md). A tile never exceeds
# TILE_MAX_BYTES, so with many threads the width rule gives way to the memory bound.
TILE_BYTES = 8 << 20
TILE_MAX_BYTES = 64 << 20
TILE_MIN_COLS_PER_THREAD = 512
_workspace = threading.local()


def _tile_buffer(torch, dtype, numel):
    """A reused flat tensor of at least `numel` elements (fresh pages would cost more than decoding)."""
    bufs = getattr(_workspace, "bufs", None)
    if bufs is None:
        bufs = _workspace.bufs = {}
    buf = bufs.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = bufs[dtype] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def _tile_width(outer, inner, itemsize, threads):
    """Output columns per tile: TILE_BYTES' worth, at least TILE_MIN_COLS_PER_THREAD per thread,
    at most TILE_MAX_BYTES, multiples of 32, and the tiles balanced
    (no narrow tail tile)."""
    per = max(TILE_BYTES // itemsize // inner, TILE_MIN_COLS_PER_THREAD * max(1, threads))
    per = max(32, min(per, TILE_MAX_BYTES // itemsize // inner))
    tiles = max(1, outer // per)  # floor: every tile at least `per` wide, up to twice that
    if -(-outer // tiles) * inner * itemsize > TILE_MAX_BYTES:
        tiles = -(-outer // per)  # ceil: the memory bound wins
    return min(outer, (-(-outer // tiles) + 31) // 32 * 32)


def tiled_product_torch(x, q, transpose=True):
    """``x @ W.T`` or ``x @ W`` for a torch tensor x, by tiles of W handed to torch's matmul.

    Only a tile of W is dense at any time, in a reused buffer: about
    :data:`TILE_BYTES`, or :data:`TILE_MIN_COLS_PER_THREAD` output columns per torch
    thread when the inner dimension is so large that fewer would fit (narrower tiles
    halve torch's GEMM speed), never more than :data:`TILE_MAX_BYTES`. ``x @ W.T`` decodes row tiles ``W[n0:n1, :]`` and writes
    ``y[:, n0:n1]``; ``x @ W`` decodes column tiles ``W[:, k0:k1]`` and writes
    ``y[:, k0:k1]``, so every output element is one matmul over the whole inner
    dimension (no accumulation across tiles in x's precision). x is a CPU
    float32 or bfloat16 tensor; the tile has its dtype, as with
    dequantize-then-matmul. Used by ``pyqlora.nn`` for many rows (training),
    where torch's GEMM (AMX/AVX-512 BF16 through oneDNN) beats the fused kernel.
    """
    import torch

    from .nn import _np_view

    n_out, k_in = q.shape
    inner, outer = (k_in, n_out) if transpose else (n_out, k_in)
    x2 = x.reshape(-1, inner)
    y = torch.empty(x2.shape[0], outer, dtype=x.dtype)
    per = _tile_width(outer, inner, x.element_size(), torch.get_num_threads())
    buf = _tile_buffer(torch, x.dtype, min(per, outer) * inner)
    for c0 in range(0, outer, per):
        c1 = min(outer, c0 + per)
        if transpose:
            tile = buf[:(c1 - c0) * inner].view(c1 - c0, inner)
            decode_tile(q, slice(c0, c1), slice(0, k_in), _np_view(tile))
            torch.mm(x2, tile.t(), out=y[:, c0:c1])
        else:
            tile = buf[:(c1 - c0) * inner].view(inner, c1 - c0)
            decode_tile(q, slice(0, n_out), slice(c0, c1), _np_view(tile))
            torch.mm(x2, tile, out=y[:, c0:c1])
    return y.view(*x.shape[:-1], outer)
