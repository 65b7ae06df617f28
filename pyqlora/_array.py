"""QuantizedArray: a blockwise 4-bit array and its bitsandbytes checkpoint form."""
import math
import operator

import numpy as np

from . import _bnb, _dtypes
from . import _nf4core as _ext  # bindings/quantize.pxi (double_dequantize)
from ._codebooks import lookup_table
from ._formats import DQ_BLOCKSIZE, check_blocksize, check_codebook

__all__ = ["QuantizedArray", "block_scales"]


class QuantizedArray:
    """A float array stored as blockwise 4-bit codes plus per-block scales.

    Made by :func:`pyqlora.quantize`; turned back into floats by
    :func:`pyqlora.dequantize`. The layout is bitsandbytes' (see
    ``docs/format.md``), so :meth:`to_bnb_dict` and :meth:`from_bnb_dict` move
    it to and from bitsandbytes/transformers 4-bit checkpoints unchanged.

    Attributes
    ----------
    shape : tuple of int
        Shape of the original array.
    dtype : numpy.dtype
        Dtype of the original array; :func:`pyqlora.dequantize` returns it by default.
    codebook : str
        Name of the codebook ("nf4", "fp4", "int4", "nf2", "nf3").
    blocksize : int
        Elements per block (the flattened array is cut into blocks).
    double_quant : bool
        Whether the block scales are themselves 8-bit quantized (QLoRA's DQ).
    packed : numpy.ndarray
        uint8 codes, two per byte, first element in the high nibble; ``ceil(size/2)`` bytes.
    absmax : numpy.ndarray
        Per-block scales: float32, or uint8 codes when ``double_quant``.
    nested_absmax : numpy.ndarray or None
        float32 scale per 256 block scales (``double_quant`` only).
    nested_offset : float or None
        Mean of the block scales, subtracted before DQ (``double_quant`` only).
    """

    __slots__ = ("shape", "dtype", "codebook", "blocksize", "packed", "absmax", "nested_absmax", "nested_offset",
                 "_scales")

    def __init__(self, *, shape, dtype, codebook, blocksize, packed, absmax, nested_absmax=None, nested_offset=None):
        self.shape = _check_shape(shape)
        self.dtype = _dtypes.normalize_dtype(dtype)
        self.codebook = check_codebook(codebook)
        self.blocksize = check_blocksize(blocksize)
        self.packed = packed
        self.absmax = absmax
        self.nested_absmax = nested_absmax
        self.nested_offset = None if nested_offset is None else float(np.float32(nested_offset))
        self._scales = None  # decoded block scales, cached (the arrays are not meant to change)
        self._check()

    # ------------------------------------------------------------------ basics
    @property
    def size(self):
        """Number of elements of the original array."""
        return math.prod(self.shape)

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def double_quant(self):
        return self.nested_absmax is not None

    @property
    def num_blocks(self):
        return -(-self.size // self.blocksize)

    @property
    def code(self):
        """The 16-entry float32 value table (index = code)."""
        return lookup_table(self.codebook, 16).copy()

    @property
    def nbytes(self):
        """Bytes of quantized data: codes, scales and, with DQ, nested scales and offset.

        The constant-size tables (16- and 256-entry codebooks) are not counted.
        """
        n = self.packed.nbytes + self.absmax.nbytes
        if self.double_quant:
            n += self.nested_absmax.nbytes + 4
        return n

    @property
    def bits_per_param(self):
        """Storage cost per element, e.g. about 4.127 for NF4 + DQ at blocksize 64."""
        return 8.0 * self.nbytes / self.size

    def scales(self):
        """Float32 scale (absmax) of every block, undoing double quantization if used."""
        return block_scales(self).copy()

    def __getstate__(self):
        return {k: getattr(self, k) for k in self.__slots__ if k != "_scales"}

    def __setstate__(self, state):
        # a pickle is input like any other: checked as the constructor checks its arguments
        fields = set(self.__slots__) - {"_scales"}
        if not isinstance(state, dict) or set(state) != fields:
            raise ValueError(f"not the state of a QuantizedArray: expected the fields {sorted(fields)}")
        self.__init__(**state)

    def __repr__(self):
        dq = ", double_quant" if self.double_quant else ""
        return (
            f"QuantizedArray(shape={self.shape}, dtype={_dtypes.dtype_name(self.dtype)}, "
            f"codebook={self.codebook!r}, blocksize={self.blocksize}{dq}, "
            f"bits_per_param={self.bits_per_param:.3f})"
        )

    def _check(self):
        """Internal consistency; raises ValueError naming the first problem."""
        if self.size < 1:
            raise ValueError(f"shape {self.shape} has no elements")
        nblocks = self.num_blocks
        _expect_array(self.packed, "packed", np.uint8, (self.size + 1) // 2)
        if self.double_quant:
            _expect_array(self.absmax, "absmax", np.uint8, nblocks)
            _expect_array(self.nested_absmax, "nested_absmax", np.float32, -(-nblocks // DQ_BLOCKSIZE))
            if self.nested_offset is None or not math.isfinite(self.nested_offset):
                raise ValueError(f"nested_offset must be a finite float, got {self.nested_offset!r}")
            if not np.all(np.isfinite(self.nested_absmax)) or np.any(self.nested_absmax < 0):
                raise ValueError("nested_absmax must be finite and non-negative")
        else:
            if self.nested_offset is not None:
                raise ValueError("nested_offset is given without nested_absmax (no double quantization)")
            _expect_array(self.absmax, "absmax", np.float32, nblocks)
            if not np.all(np.isfinite(self.absmax)) or np.any(self.absmax < 0):
                raise ValueError("absmax must be finite and non-negative")

    # ------------------------------------------------------- bitsandbytes I/O
    def to_bnb_dict(self, prefix="weight"):
        """Checkpoint entries in bitsandbytes' ``Linear4bit`` state-dict layout.

        The same keys, dtypes, shapes and JSON bytes as bitsandbytes 0.50
        ``{prefix: packed_weight, **{prefix + "." + k: v for k, v in
        QuantState.as_dict(packed=True).items()}}``, as numpy arrays (save them
        with safetensors or convert with ``torch.from_numpy``).

        Parameters
        ----------
        prefix : str
            Key of the packed weight, e.g. ``"model.layers.0.mlp.up_proj.weight"``.

        Examples
        --------
        >>> import numpy as np, pyqlora as pq
        >>> q = pq.quantize(np.ones((4, 64), np.float32), codebook="nf4", blocksize=64)
        >>> sorted(q.to_bnb_dict("w"))  # doctest: +NORMALIZE_WHITESPACE
        ['w', 'w.absmax', 'w.nested_absmax', 'w.nested_quant_map', 'w.quant_map',
         'w.quant_state.bitsandbytes__nf4']
        >>> bytes(q.to_bnb_dict("w")["w.quant_state.bitsandbytes__nf4"])[:57]
        b'{"quant_type": "nf4", "blocksize": 64, "dtype": "float32"'
        """
        return _bnb.entries(self, prefix)

    @classmethod
    def from_bnb_dict(cls, d, prefix="weight"):
        """Build a QuantizedArray from bitsandbytes/transformers 4-bit checkpoint entries.

        Parameters
        ----------
        d : mapping
            State-dict entries (numpy arrays or torch tensors); other keys are ignored.
            The packed weight may use any storage dtype (``quant_storage``).
        prefix : str
            Key of the packed weight.

        Raises
        ------
        ValueError
            If an entry is missing, truncated, of the wrong dtype or shape, or the
            JSON blob is corrupt or disagrees with the arrays.

        Examples
        --------
        >>> import numpy as np, pyqlora as pq
        >>> q = pq.quantize(np.linspace(-1, 1, 300, dtype=np.float32), codebook="fp4")
        >>> q2 = pq.QuantizedArray.from_bnb_dict(q.to_bnb_dict("w"), "w")
        >>> bool(np.array_equal(pq.dequantize(q), pq.dequantize(q2)))
        True
        """
        fields = _bnb.parse(d, prefix)
        try:
            return cls(**fields)
        except ValueError as exc:
            raise ValueError(f"inconsistent bitsandbytes entries for {prefix!r}: {exc}") from None


def block_scales(q):
    """The float32 block scales of `q` (read-only; decoded once and cached on `q` when double-quantized)."""
    if not q.double_quant:
        return q.absmax
    if q._scales is None:
        out = np.empty(q.absmax.size, dtype=np.float32)
        _ext.double_dequantize(q.absmax, q.nested_absmax, q.nested_offset, lookup_table("dynamic", 256), out)
        out.flags.writeable = False
        q._scales = out
    return q._scales


def _check_shape(shape):
    """`shape` as a tuple of non-negative ints; TypeError for anything else."""
    try:
        dims = tuple(shape)
    except TypeError:
        raise TypeError(f"shape must be a sequence of integers, got {type(shape).__name__}") from None
    out = []
    for d in dims:
        if isinstance(d, (bool, np.bool_)):
            raise TypeError(f"shape must be a sequence of integers, got {shape!r}")
        try:
            d = operator.index(d)
        except TypeError:
            raise TypeError(f"shape must be a sequence of integers, got {shape!r}") from None
        if d < 0:
            raise ValueError(f"shape must not have negative dimensions, got {dims}")
        out.append(d)
    return tuple(out)


def _expect_array(a, name, dtype, length):
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(a).__name__}")
    if a.dtype != dtype:
        raise ValueError(f"{name} must have dtype {np.dtype(dtype)}, got {a.dtype}")
    if a.ndim != 1 or a.shape[0] != length:
        raise ValueError(f"{name} must have shape ({length},), got {a.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be contiguous")
