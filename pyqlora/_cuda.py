"""GPU arrays: quantize, dequantize and the 4-bit GEMV on the device (internal).

.. warning::
   Compiled and linked, but NOT yet verified on GPU hardware: no GPU was
   available when this was written. ``tests/test_cuda.py`` (marker ``gpu``) and
   ``benchmarks/gpu_check.sh`` check it on a machine that has one.

Inputs are torch CUDA tensors or any object with ``__cuda_array_interface__``
(CuPy, Numba, ...), which ``torch.as_tensor`` wraps without a copy; outputs
are torch CUDA tensors on the input's device, written by nf4core's CUDA
kernels on torch's current stream of that device. torch is needed (it
allocates the outputs and names the stream); a torch-free path through
cuda-python is not written yet.

:func:`pyqlora.quantize` and :func:`pyqlora.dequantize` send GPU arrays here;
the result of quantizing one is a :class:`CudaQuantizedArray`, whose arrays
stay on the device and whose :meth:`~CudaQuantizedArray.cpu` gives the
ordinary :class:`pyqlora.QuantizedArray` with the same bytes.
"""
import contextlib

import numpy as np

from . import _dtypes
from . import _nf4core as _ext  # bindings/cuda.pxi
from ._array import QuantizedArray
from ._codebooks import lookup_table
from ._formats import DQ_BLOCKSIZE, check_blocksize, check_codebook

__all__ = ["CudaQuantizedArray", "cuda_available", "dequantize", "gemv", "is_cuda_array", "quantize"]


def cuda_available():
    """``(built, device_count)``: nf4core's CUDA kernels compiled in, devices visible now."""
    return _ext.cuda_available()


def is_cuda_array(x):
    """True for a torch CUDA tensor or an object exposing ``__cuda_array_interface__``."""
    if hasattr(x, "__cuda_array_interface__"):
        return True
    device = getattr(x, "device", None)
    return getattr(device, "type", None) == "cuda" and hasattr(x, "data_ptr")


def _torch():
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "GPU arrays need torch (it allocates the outputs and names the CUDA stream); "
            "pip install 'pyqlora[torch]' with a CUDA build of torch"
        ) from exc
    return torch


_KERNEL = {"float32": _dtypes.NF4_FLOAT32, "float16": _dtypes.NF4_FLOAT16, "bfloat16": _dtypes.NF4_BFLOAT16}


def _kernel_dtype(torch_dtype):
    name = str(torch_dtype).replace("torch.", "")
    if name not in _KERNEL:
        raise TypeError(f"GPU arrays must be float32, float16 or bfloat16 (float64 is converted); got {name}")
    return _KERNEL[name]


def _as_tensor(x, what="x"):
    torch = _torch()
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x, device="cuda")  # __cuda_array_interface__: no copy
    if x.device.type != "cuda":
        raise TypeError(f"{what} must be on a CUDA device, got {x.device}")
    x = x.detach()
    if x.dtype == torch.float64:
        x = x.to(torch.float32)  # as on the CPU: the kernels compute in float32
    if not x.is_contiguous():
        x = x.contiguous()
    _kernel_dtype(x.dtype)
    if x.numel() == 0:
        raise ValueError(f"{what} is empty (shape {tuple(x.shape)}); there is nothing to quantize")
    return x


def _stream(torch, device):
    return torch.cuda.current_stream(device).cuda_stream


def _on_device(torch, device):
    """``torch.cuda.device(device)``, or nothing when it is already current: the
    context manager costs microseconds a batch-1 GEMV cannot spare."""
    if device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


class CudaQuantizedArray:
    """A blockwise 4-bit array whose codes and scales live on a CUDA device.

    Attributes mirror :class:`pyqlora.QuantizedArray` (``shape``, ``dtype``
    as a torch dtype, ``codebook``, ``blocksize``, ``packed``, ``absmax``,
    ``nested_absmax``, ``nested_offset``); the arrays are torch CUDA tensors.
    """

    def __init__(self, *, shape, dtype, codebook, blocksize, packed, absmax, nested_absmax=None, nested_offset=None):
        self.shape = tuple(shape)
        self.dtype = dtype
        self.codebook = codebook
        self.blocksize = blocksize
        self.packed = packed
        self.absmax = absmax
        self.nested_absmax = nested_absmax
        self.nested_offset = nested_offset

    @property
    def double_quant(self):
        return self.nested_absmax is not None

    @property
    def size(self):
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def device(self):
        return self.packed.device

    def cpu(self):
        """The same codes and scales as a host :class:`pyqlora.QuantizedArray`."""
        names = {"float32": _dtypes.float32, "float16": _dtypes.float16, "bfloat16": _dtypes.bfloat16}
        return QuantizedArray(
            shape=self.shape,
            dtype=names[str(self.dtype).replace("torch.", "")],
            codebook=self.codebook,
            blocksize=self.blocksize,
            packed=self.packed.cpu().numpy(),
            absmax=self.absmax.cpu().numpy(),
            nested_absmax=None if self.nested_absmax is None else self.nested_absmax.cpu().numpy(),
            nested_offset=self.nested_offset,
        )

    def __repr__(self):
        dq = ", double_quant" if self.double_quant else ""
        return (f"CudaQuantizedArray(shape={self.shape}, dtype={self.dtype}, codebook={self.codebook!r}, "
                f"blocksize={self.blocksize}{dq}, device={self.device})")


def quantize(x, codebook="nf4", blocksize=64, double_quant=True):
    """:func:`pyqlora.quantize` for a GPU array (arguments already checked by it)."""
    torch = _torch()
    x = _as_tensor(x)
    codebook, blocksize = check_codebook(codebook), check_blocksize(blocksize)
    n = x.numel()
    nblocks = -(-n // blocksize)
    dev = x.device
    with _on_device(torch, dev):
        packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=dev)
        absmax = torch.empty(nblocks, dtype=torch.float32, device=dev)
        s = _stream(torch, dev)
        _ext.cuda_quantize(4, x.data_ptr(), _kernel_dtype(x.dtype), n, blocksize, lookup_table(codebook, 16),
                           packed.data_ptr(), absmax.data_ptr(), s)
        nested = offset = None
        if double_quant:
            q = torch.empty(nblocks, dtype=torch.uint8, device=dev)
            nested = torch.empty(-(-nblocks // DQ_BLOCKSIZE), dtype=torch.float32, device=dev)
            offset = _ext.cuda_double_quantize(absmax.data_ptr(), nblocks, lookup_table("dynamic", 256), q.data_ptr(),
                                               nested.data_ptr(), s)
            absmax = q
    return CudaQuantizedArray(shape=x.shape, dtype=x.dtype, codebook=codebook, blocksize=blocksize, packed=packed,
                              absmax=absmax, nested_absmax=nested, nested_offset=offset)


def dequantize(q, dtype=None, out=None):
    """:func:`pyqlora.dequantize` for a :class:`CudaQuantizedArray`: a torch CUDA tensor (DQ fused)."""
    torch = _torch()
    if dtype is None:
        dtype = out.dtype if out is not None else q.dtype
    elif not isinstance(dtype, torch.dtype):  # "bfloat16", np.float32, ...
        name = "bfloat16" if str(dtype) == "bfloat16" else str(np.dtype(dtype))
        if name not in _KERNEL:
            raise TypeError(f"dtype must be float32, float16 or bfloat16 for a GPU result, got {dtype}")
        dtype = getattr(torch, name)
    kdt = _kernel_dtype(dtype)
    dev = q.device
    if out is None:
        out = torch.empty(q.shape, dtype=dtype, device=dev)
    elif (tuple(out.shape) != q.shape or out.dtype != dtype or out.device != dev or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {q.shape} on {dev}")
    table = lookup_table(q.codebook, 16)
    with _on_device(torch, dev):
        s = _stream(torch, dev)
        if q.double_quant:
            _ext.cuda_dequantize_4bit_dq(q.packed.data_ptr(), q.absmax.data_ptr(), q.nested_absmax.data_ptr(),
                                         q.nested_offset, q.size, q.blocksize, table, lookup_table("dynamic", 256),
                                         out.data_ptr(), kdt, s)
        else:
            _ext.cuda_dequantize(4, q.packed.data_ptr(), q.absmax.data_ptr(), q.size, q.blocksize, table,
                                 out.data_ptr(), kdt, s)
    return out


def gemv(x, q):
    """``x @ W.T`` for a 2-D :class:`CudaQuantizedArray` W (N x K) and x (M x K), M = 1..8."""
    torch = _torch()
    x = _as_tensor(x)
    if len(q.shape) != 2:
        raise ValueError(f"the weight must be 2-D (out_features, in_features), got shape {q.shape}")
    N, K = q.shape
    if x.ndim != 2 or x.shape[1] != K:
        raise ValueError(f"x must have shape (M, {K}), got {tuple(x.shape)}")
    M = x.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    table = lookup_table(q.codebook, 16)
    with _on_device(torch, x.device):
        s = _stream(torch, x.device)
        if q.double_quant:
            _ext.cuda_gemv_dq(x.data_ptr(), _kernel_dtype(x.dtype), M, N, K, q.packed.data_ptr(), q.absmax.data_ptr(),
                              q.nested_absmax.data_ptr(), q.nested_offset, q.blocksize, table,
                              lookup_table("dynamic", 256), y.data_ptr(), s)
        else:
            _ext.cuda_gemv(x.data_ptr(), _kernel_dtype(x.dtype), M, N, K, q.packed.data_ptr(), q.absmax.data_ptr(),
                           q.blocksize, table, y.data_ptr(), s)
    return y
