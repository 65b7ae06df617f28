"""Fused optimizer updates on blockwise 8-bit state, for NumPy arrays (internal).

The array-API side of :class:`pyqlora.optim.PagedAdamW8bit`: it checks the
arrays once and calls nf4core's fused update (decode a block of both moments,
update in float32, requantize; ``nf4core/include/nf4core/optim.h``) with the
GIL released. The torch optimizer hands it NumPy views of its tensors.
"""
import numpy as np

from . import _dtypes
from . import _nf4core as _ext  # bindings/optim.pxi
from ._formats import check_blocksize
from ._runtime import sync_threads

__all__ = ["adam8bit_update"]


def adam8bit_update(param, grad, state1, state2, absmax1, absmax2, qmap1, qmap2, blocksize, lr, beta1, beta2, eps,
                    weight_decay, step):
    """One AdamW step of `param` in place, with both moments as blockwise 8-bit codes.

    Parameters
    ----------
    param, grad : numpy.ndarray
        C-contiguous, the same float32, float16 or bfloat16 dtype and size; `param` is updated.
    state1, state2 : numpy.ndarray of uint8
        Codes of the first moment (in `qmap1`) and second moment (in `qmap2`), one per element.
    absmax1, absmax2 : numpy.ndarray of float32
        Scale of each block of `blocksize` codes.
    qmap1, qmap2 : numpy.ndarray of float32
        The 256-entry value tables (bitsandbytes: signed and unsigned dynamic maps).
    blocksize : int
    lr, beta1, beta2, eps, weight_decay : float
    step : int
        The step number, from 1 (bias correction).

    Returns
    -------
    int
        Elements skipped because their gradient is NaN or infinite, or their
        update is not finite (a moment or the new parameter overflows, a stored
        block scale is not finite): parameter unchanged, both moments reset to
        zero. Every other element is updated; non-finite values never raise.
    """
    blocksize = check_blocksize(blocksize)
    if param.dtype != grad.dtype or param.size != grad.size:
        raise ValueError(f"param ({param.dtype}, {param.size}) and grad ({grad.dtype}, {grad.size}) must match")
    if param.dtype not in _dtypes.KERNEL_DTYPES:
        raise TypeError(f"parameter dtype {param.dtype} is not supported (float32, float16, bfloat16)")
    for name, a in (("param", param), ("grad", grad)):
        if not a.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous")
    sync_threads()
    return _ext.adam8bit_update(
        param.reshape(-1).view(np.uint8), grad.reshape(-1).view(np.uint8), _dtypes.KERNEL_DTYPES[param.dtype],
        param.size, state1.reshape(-1), state2.reshape(-1), absmax1, absmax2, qmap1, qmap2, blocksize, float(lr),
        float(beta1), float(beta2), float(eps), float(weight_decay), int(step))
