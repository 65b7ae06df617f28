"""Tensors and NumPy arrays over the same bytes, and the torch <-> NumPy dtype maps."""
import numpy as np
import torch

from .. import _dtypes
from .._dtypes import as_numpy
from .._quantize import dequantize

__all__ = ["as_numpy", "byte_view", "dequantize_weight", "numpy_dtype", "torch_dtype"]

_TO_TORCH = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16,
             np.dtype(np.float64): torch.float64, _dtypes.bfloat16: torch.bfloat16}
_TO_NUMPY = {v: k for k, v in _TO_TORCH.items()}


def torch_dtype(np_dtype):
    """The torch dtype of a NumPy float dtype (bfloat16 from ml_dtypes included)."""
    return _TO_TORCH[np.dtype(np_dtype)]


def numpy_dtype(dtype):
    """The NumPy dtype of a torch float dtype (bfloat16 as ml_dtypes')."""
    if dtype not in _TO_NUMPY:
        raise TypeError(f"no NumPy float dtype for {dtype}")
    return _TO_NUMPY[dtype]


def byte_view(t):
    """1-D uint8 NumPy view of a contiguous CPU tensor's bytes; the storage stays resizable (FSDP2)."""
    t = t.detach()
    if not t.is_contiguous():
        raise ValueError("4-bit storage must be contiguous")
    return as_numpy(t.reshape(-1), resizable=True).view(np.uint8)


def dequantize_weight(q, dtype=torch.float32):
    """A new dense torch tensor holding the dequantized weight (shape ``q.shape``)."""
    out = torch.empty(q.shape, dtype=dtype)
    dequantize(q, out=as_numpy(out))
    return out
