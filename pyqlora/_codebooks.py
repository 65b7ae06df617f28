"""Codebooks: the value tables that 4-bit and 8-bit codes index."""
import functools

import numpy as np

from . import _nf4core as _codebook
from ._formats import CODEBOOKS_4BIT

__all__ = ["codebook", "dynamic_codebook", "lookup_table"]

_ALL = ("nf2", "nf3", "nf4", "nf5", "nf6", "nf7", "nf8", "fp4", "int4", "dynamic", "dynamic_unsigned")


@functools.lru_cache(maxsize=None)
def _table(name):
    t = _codebook.codebook_by_name(name)
    t.flags.writeable = False
    return t


def codebook(name):
    """Return the float32 value table of a codebook; the index is the code.

    Parameters
    ----------
    name : {"nf4", "fp4", "int4", "nf2", ..., "nf8"}
        ``"nfK"`` is NormalFloat-K (QLoRA): quantiles of N(0, 1) with one exact
        zero, normalized to [-1, 1], sorted (2**K values). ``"fp4"`` is E2M1
        and ``"int4"`` symmetric integers, both in bitsandbytes' bit-pattern
        order (bit 3 is the sign).

    Returns
    -------
    numpy.ndarray
        A new float32 array.

    Examples
    --------
    >>> import pyqlora as pq
    >>> t = pq.codebook("nf4")
    >>> t.shape, float(t[0]), float(t[7]), float(t[15])
    ((16,), -1.0, 0.0, 1.0)
    >>> float(pq.codebook("fp4")[3])
    1.0
    """
    if not isinstance(name, str):
        raise TypeError(f"codebook name must be a string, got {type(name).__name__}")
    key = name.lower()
    if key not in _ALL:
        raise ValueError(f"unknown codebook {name!r}; expected one of {', '.join(_ALL[:-2])}")
    return _table(key).copy()


def dynamic_codebook(signed=True):
    """Return bitsandbytes' 256-entry 8-bit dynamic map (``create_dynamic_map``).

    The signed map quantizes double-quantized block scales and the first Adam
    moment; the unsigned map the second moment.

    Examples
    --------
    >>> import pyqlora as pq
    >>> d = pq.dynamic_codebook()
    >>> d.shape, float(d[127]), float(d[255])
    ((256,), 0.0, 1.0)
    >>> float(pq.dynamic_codebook(signed=False)[0])
    0.0
    """
    return _table("dynamic" if signed else "dynamic_unsigned").copy()


def lookup_table(name, size):
    """Read-only table of `name` padded to `size` entries (internal).

    Tables shorter than the code space (nf2, nf3 in 4-bit storage) are padded
    with copies of their last value, which the nearest-code rule never selects.
    """
    t = _table(name)
    if len(t) > size:
        raise ValueError(
            f"codebook {name!r} has {len(t)} values and needs {int(np.log2(len(t)))} bits; "
            f"4-bit quantization supports {', '.join(CODEBOOKS_4BIT)}"
        )
    if len(t) < size:
        t = np.concatenate([t, np.full(size - len(t), t[-1], dtype=np.float32)])
        t.flags.writeable = False
    return t
