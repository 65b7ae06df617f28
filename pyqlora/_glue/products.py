"""Products of a torch tensor with a 4-bit weight: which path, and the tiled product.

``pyqlora.nn.Linear4bit`` multiplies by its frozen 4-bit weight W in the
forward pass (``x W^T``) and in the backward pass (``grad W``). Three paths:

- ``"fused"``: nf4core's product (:func:`pyqlora.matmul_4bit`), which never holds
  more than a small panel of W dense: for a few rows of bfloat16, for every row
  count of float32 on the x86 paths (:func:`fused_max_rows`; panels of W decoded
  once for all rows and a register-blocked FMA kernel, faster than torch's dense
  float32 GEMM on the CPU measured), and for every row count of bfloat16 where AMX
  is in use (it multiplies on AMX tiles);
- ``"tiled"``: tiles of W decoded into a reused buffer and handed to torch's
  matmul (:func:`tiled_product_torch`), so no dense copy of W ever exists: best
  for many rows of bfloat16 without AMX (torch's bfloat16 GEMM, oneDNN AVX512-BF16),
  and of float32 on the other paths;
- ``"dense"``: other dtypes and codebooks: the whole weight dequantized once.

The thresholds come from ``benchmarks/bench_matmul.py`` (``docs/performance.md``).
"""
import sys
import threading

import torch

from .._dtypes import KERNEL_DTYPES, bfloat16, float32
from .._matmul import decode_tile, matmul_4bit
from .._runtime import get_amx, get_isa, sync_threads
from .tensors import as_numpy

__all__ = ["AMX_MIN_ROWS", "FUSED_ALL_ROWS_FP32", "FUSED_MAX_ROWS", "FUSED_MAX_ROWS_FP32_OTHER", "TILE_BYTES",
           "TILE_MAX_BYTES", "TILE_MIN_COLS_PER_THREAD", "choose_path", "fused_linear", "fused_max_rows",
           "fused_product", "tiled_product_torch", "whole_block_rows"]

# Up to this many rows the fused 4-bit product (pq.matmul_4bit), which streams the
# packed weight once, beats decoding tiles for torch's matmul; above it, tiles of
# the weight are decoded into a reused buffer and handed to torch (its bf16 GEMM
# uses AMX/AVX512-BF16), so no dense copy of the whole weight exists
# (benchmarks/bench_matmul.py measures both). bfloat16 inputs cross over earlier:
# torch's bf16 matmul is much faster than its fp32 one, the fused kernel computes
# in float32 either way.
# With AMX in use (pq.get_amx()), pq.matmul_4bit itself multiplies bfloat16 inputs of
# 5 rows and more on AMX tiles, decoding panels of the weight as it goes: faster than
# handing decoded tiles to torch (docs/performance.md), so it is used for every row count.
FUSED_MAX_ROWS = 4
# float32 x on the x86 kernel paths: nf4core's product at every row count. For a few rows it
# streams the packed weight once (the row kernels), for more it decodes panels of W once for all
# rows into L1/L2 and runs a register-blocked FMA micro-kernel (nf4core/src/matmul_panel.hpp; the
# crossover is nf4core's). Measured on a 2-core AMD EPYC Zen 4 at 2 threads, W 4096 x 4096,
# 11008 x 4096 and 4096 x 11008, M = 4..2048, against torch's dense float32 GEMM (docs/performance.md,
# "Panels"): 0.3-0.95x its time at 16-512 rows, 0.9-1.04x at 2048, both directions, AVX2 and AVX-512
# paths; the tiles handed to torch took 0.84-2.5x. Other paths (NEON, scalar) keep the fused kernel
# up to FUSED_MAX_ROWS_FP32_OTHER rows (forward, backward; measured for issue 7), then tiles.
FUSED_ALL_ROWS_FP32 = ("avx512", "avx2")
FUSED_MAX_ROWS_FP32_OTHER = (8, 8)

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

_FUSED_CODEBOOKS = ("nf4", "fp4", "int4", "nf2", "nf3")


def fused_max_rows(dtype, transpose=True):
    """Rows of x up to which `choose_path` takes the fused kernel for ``x @ W.T`` (`transpose`) or ``x @ W``;
    ``sys.maxsize`` where it takes it for every row count (float32 on the x86 paths)."""
    if dtype == torch.float32:
        if get_isa() in FUSED_ALL_ROWS_FP32:
            return sys.maxsize
        forward, backward = FUSED_MAX_ROWS_FP32_OTHER
        return forward if transpose else backward
    return FUSED_MAX_ROWS


# nf4core's vector product kernels need every row of W to hold whole blocks (in_features a multiple
# of 16 and of the blocksize); for other shapes nf4_matmul_4bit runs its scalar reference, 120-230x
# the time of decoding tiles for torch at 64-512 rows and 5-13x at one row (W 512 x 1376 and others;
# docs/performance.md, "Weights whose rows split quantization blocks"), so such weights take the
# tiled path. Its AMX bfloat16 kernel takes in_features a multiple of 32 from AMX_MIN_ROWS rows
# (nf4core/src/matmul.hpp, kAmxMinRows).
AMX_MIN_ROWS = 5


def whole_block_rows(q):
    """Whether every row of the 4-bit weight `q` holds whole quantization blocks, as nf4core's vector
    product kernels need (else its product is the scalar reference)."""
    k = q.shape[-1]
    return k % 16 == 0 and k % q.blocksize == 0


def choose_path(t, q, transpose=True):
    """'fused' (few rows), 'tiled' (many rows) or 'dense' (other dtypes: whole temporary weight) for
    ``t @ W.T`` (`transpose`, the forward) or ``t @ W`` (the backward's input gradient). Weights whose
    rows do not hold whole blocks (:func:`whole_block_rows`) take 'tiled' wherever nf4core's product
    would run its scalar reference."""
    if t.dtype not in (torch.float32, torch.bfloat16) or q.codebook not in _FUSED_CODEBOOKS:
        return "dense"
    rows = t.numel() // max(1, t.shape[-1])
    whole = whole_block_rows(q)
    if t.dtype == torch.bfloat16 and q.shape[1] % 32 == 0 and get_amx() and (whole or rows >= AMX_MIN_ROWS):
        return "fused"
    return "fused" if whole and rows <= fused_max_rows(t.dtype, transpose) else "tiled"


def fused_product(x, q, transpose):
    """x @ W.T (transpose) or x @ W with nf4core's fused kernel, as a torch tensor."""
    x = x.contiguous()
    lead = x.shape[:-1]
    out = torch.empty(*lead, q.shape[0] if transpose else q.shape[1], dtype=x.dtype)
    matmul_4bit(as_numpy(x), q, transpose=transpose, out=as_numpy(out))
    return out


_KERNEL_DTYPE = {torch.float32: KERNEL_DTYPES[float32], torch.bfloat16: KERNEL_DTYPES.get(bfloat16)}


def fused_linear(x, fm):
    """``x @ W.T`` for a CPU float32/bfloat16 tensor x through ``fm = pyqlora._matmul.fused_matrix(q)``.

    The inference path of ``Linear4bit`` (no autograd): the product of :func:`fused_product`
    without re-checking the weight's arrays at every call (a decode step makes 210 calls
    of a few tens of microseconds each). x's last dimension must be ``fm.K``.
    """
    x = x.detach().contiguous()
    # empty_like where it can (torch.empty costs a few microseconds more, a tenth of a small call)
    out = torch.empty_like(x) if fm.K == fm.N else x.new_empty((*x.shape[:-1], fm.N))
    rows = x.numel() // fm.K
    if rows:
        sync_threads()
        fm.matmul(x.data_ptr(), _KERNEL_DTYPE[x.dtype], rows, True, out.data_ptr())
    return out


def _tile_buffer(dtype, numel):
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
    halve torch's GEMM speed), never more than :data:`TILE_MAX_BYTES`. ``x @ W.T``
    decodes row tiles ``W[n0:n1, :]`` and writes ``y[:, n0:n1]``; ``x @ W`` decodes
    column tiles ``W[:, k0:k1]`` and writes ``y[:, k0:k1]``, so every output element
    is one matmul over the whole inner dimension (no accumulation across tiles in x's
    precision). x is a CPU float32 or bfloat16 tensor; the tile has its dtype, as with
    dequantize-then-matmul. Used by ``pyqlora.nn`` for many rows (training),
    where torch's GEMM (AMX/AVX-512 BF16 through oneDNN) beats the fused kernel.
    """
    n_out, k_in = q.shape
    inner, outer = (k_in, n_out) if transpose else (n_out, k_in)
    x2 = x.reshape(-1, inner)
    y = torch.empty(x2.shape[0], outer, dtype=x.dtype)
    per = _tile_width(outer, inner, x.element_size(), torch.get_num_threads())
    buf = _tile_buffer(x.dtype, min(per, outer) * inner)
    for c0 in range(0, outer, per):
        c1 = min(outer, c0 + per)
        if transpose:
            tile = buf[:(c1 - c0) * inner].view(c1 - c0, inner)
            decode_tile(q, slice(c0, c1), slice(0, k_in), as_numpy(tile))
            torch.mm(x2, tile.t(), out=y[:, c0:c1])
        else:
            tile = buf[:(c1 - c0) * inner].view(inner, c1 - c0)
            decode_tile(q, slice(0, n_out), slice(c0, c1), as_numpy(tile))
            torch.mm(x2, tile, out=y[:, c0:c1])
    return y if x.dim() == 2 else y.view(*x.shape[:-1], outer)  # not a view where none is needed
