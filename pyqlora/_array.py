"""QuantizedArray: a blockwise 4-bit array and its bitsandbytes checkpoint form."""
import json
import math

import numpy as np

from . import _dtypes
from ._codebooks import lookup_table

__all__ = ["QuantizedArray"]

# bitsandbytes QuantState.valid_qs_type_keys / valid_qs_keys (functional.py)
_BNB_QUANT_TYPES = ("nf4", "fp4")
_BNB_KEYS = (
    "absmax",
    "quant_map",
    "nested_absmax",
    "nested_quant_map",
    "quant_state",
    "quant_type",
    "blocksize",
    "dtype",
    "shape",
    "nested_blocksize",
    "nested_dtype",
    "nested_offset",
)
_DQ_BLOCKSIZE = 256


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
        self.shape = tuple(int(s) for s in shape)
        self.dtype = _dtypes.normalize_dtype(dtype)
        self.codebook = codebook
        self.blocksize = int(blocksize)
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
        from ._quantize import _block_scales

        return _block_scales(self).copy()

    def __getstate__(self):
        return {k: getattr(self, k) for k in self.__slots__ if k != "_scales"}

    def __setstate__(self, state):
        for k, v in state.items():
            setattr(self, k, v)
        self._scales = None

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
            _expect_array(self.nested_absmax, "nested_absmax", np.float32, -(-nblocks // _DQ_BLOCKSIZE))
            if self.nested_offset is None or not math.isfinite(self.nested_offset):
                raise ValueError(f"nested_offset must be a finite float, got {self.nested_offset!r}")
            if not np.all(np.isfinite(self.nested_absmax)) or np.any(self.nested_absmax < 0):
                raise ValueError("nested_absmax must be finite and non-negative")
        else:
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
        if self.codebook not in _BNB_QUANT_TYPES:
            raise ValueError(
                f"bitsandbytes checkpoints hold only nf4 and fp4; this array uses {self.codebook!r}"
            )
        if not isinstance(prefix, str):
            raise TypeError("prefix must be a string")
        # insertion order matches bitsandbytes' state dict
        d = {prefix: self.packed.reshape(-1, 1).copy(), f"{prefix}.absmax": self.absmax.copy()}
        # bitsandbytes' quant_map has +0.0 where FP4's code 8 decodes to -0.0
        # (its Python table is built from the int -0); adding +0.0 maps -0 to +0
        d[f"{prefix}.quant_map"] = self.code + np.float32(0.0)
        meta = {
            "quant_type": self.codebook,
            "blocksize": self.blocksize,
            "dtype": _dtypes.dtype_name(self.dtype),
            "shape": list(self.shape),
        }
        if self.double_quant:
            d[f"{prefix}.nested_absmax"] = self.nested_absmax.copy()
            d[f"{prefix}.nested_quant_map"] = lookup_table("dynamic", 256).copy()
            meta.update(nested_blocksize=_DQ_BLOCKSIZE, nested_dtype="float32", nested_offset=self.nested_offset)
        blob = json.dumps(meta).encode("utf-8")  # bitsandbytes.utils.pack_dict_to_tensor
        d[f"{prefix}.quant_state.bitsandbytes__{self.codebook}"] = np.frombuffer(blob, dtype=np.uint8).copy()
        return d

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
        if not isinstance(prefix, str):
            raise TypeError("prefix must be a string")
        dot = prefix + "."
        entries = {k[len(dot):]: v for k, v in d.items() if isinstance(k, str) and k.startswith(dot)}
        if prefix not in d:
            raise ValueError(f"missing packed weight {prefix!r}")
        qs_keys = [k for k in entries if k.startswith("quant_state.")]
        if len(qs_keys) != 1 or qs_keys[0].split(".", 1)[1] not in ("bitsandbytes__nf4", "bitsandbytes__fp4"):
            raise ValueError(
                f"expected exactly one '{dot}quant_state.bitsandbytes__nf4' or '...__fp4' entry, "
                f"found {[dot + k for k in qs_keys]}"
            )
        key_type = qs_keys[0].rsplit("__", 1)[1]
        unknown = [k for k in entries if k.split(".")[0] not in _BNB_KEYS]
        if unknown:
            raise ValueError(f"unexpected quant-state entries: {[dot + k for k in unknown]}")

        meta = _parse_blob(_to_numpy(entries[qs_keys[0]]), dot + qs_keys[0])
        quant_type = _field(meta, "quant_type", str)
        if quant_type != key_type:
            raise ValueError(f"quant_type {quant_type!r} in the JSON disagrees with the key suffix {key_type!r}")
        blocksize = _field(meta, "blocksize", int)
        from ._quantize import _check_blocksize

        _check_blocksize(blocksize)
        dtype_s = _field(meta, "dtype", str)
        if dtype_s not in _dtypes.SUPPORTED:
            raise ValueError(f"unsupported dtype {dtype_s!r} in quant_state")
        shape = _field(meta, "shape", list)
        if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise ValueError(f"shape must be a list of non-negative integers, got {shape!r}")
        n = math.prod(shape)
        if n < 1:
            raise ValueError(f"shape {shape} has no elements")

        packed = _packed_bytes(_to_numpy(d[prefix]), (n + 1) // 2, prefix)
        if "quant_map" not in entries:
            raise ValueError(f"missing entry {dot + 'quant_map'!r}")
        qmap = _to_numpy(entries["quant_map"])
        if qmap.dtype != np.float32 or qmap.shape != (16,) or not np.array_equal(qmap, lookup_table(quant_type, 16)):
            raise ValueError(f"{dot}quant_map is not bitsandbytes' {quant_type} table")
        if "absmax" not in entries:
            raise ValueError(f"missing entry {dot + 'absmax'!r}")
        absmax = _to_numpy(entries["absmax"])
        nested = "nested_absmax" in entries
        if nested:
            if "nested_quant_map" not in entries:
                raise ValueError(f"missing entry {dot + 'nested_quant_map'!r}")
            nb = _field(meta, "nested_blocksize", int)
            if nb != _DQ_BLOCKSIZE:
                raise ValueError(f"nested_blocksize must be {_DQ_BLOCKSIZE} (as bitsandbytes requires), got {nb}")
            if _field(meta, "nested_dtype", str) != "float32":
                raise ValueError("nested_dtype must be 'float32'")
            offset = meta.get("nested_offset")
            if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset):
                raise ValueError(f"nested_offset must be a finite number, got {offset!r}")
            nqm = _to_numpy(entries["nested_quant_map"])
            if nqm.dtype != np.float32 or nqm.shape != (256,) or not np.array_equal(nqm, lookup_table("dynamic", 256)):
                raise ValueError(f"{dot}nested_quant_map is not bitsandbytes' signed dynamic map")
            nested_absmax = _to_numpy(entries["nested_absmax"])
        else:
            stray = ["nested_quant_map"] * ("nested_quant_map" in entries) + [
                k for k in ("nested_blocksize", "nested_dtype", "nested_offset") if k in meta
            ]
            if stray:
                raise ValueError(f"quant_state has nested fields {stray} but no nested_absmax entry")
            offset, nested_absmax = None, None
        try:
            return cls(
                shape=shape,
                dtype=dtype_s,
                codebook=quant_type,
                blocksize=blocksize,
                packed=packed,
                absmax=np.ascontiguousarray(absmax),
                nested_absmax=None if nested_absmax is None else np.ascontiguousarray(nested_absmax),
                nested_offset=offset,
            )
        except ValueError as exc:
            raise ValueError(f"inconsistent bitsandbytes entries for {prefix!r}: {exc}") from None


def _expect_array(a, name, dtype, length):
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(a).__name__}")
    if a.dtype != dtype:
        raise ValueError(f"{name} must have dtype {np.dtype(dtype)}, got {a.dtype}")
    if a.ndim != 1 or a.shape[0] != length:
        raise ValueError(f"{name} must have shape ({length},), got {a.shape}")


def _to_numpy(v):
    """numpy view of a numpy array or a torch tensor (torch is never imported here)."""
    if hasattr(v, "detach") and hasattr(v, "cpu"):
        v = v.detach().cpu().contiguous()
        if str(v.dtype) == "torch.bfloat16":  # numpy has no bfloat16; the bytes are what matter
            import torch

            v = v.view(torch.int16)
        return v.numpy()
    return np.asarray(v)


def _parse_blob(blob, key):
    if blob.dtype != np.uint8 or blob.ndim != 1:
        raise ValueError(f"{key} must be a 1-D uint8 array of JSON bytes, got {blob.dtype} {blob.shape}")
    try:
        meta = json.loads(blob.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{key} does not hold valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{key} must hold a JSON object, got {type(meta).__name__}")
    return meta


def _field(meta, name, kind):
    if name not in meta:
        raise ValueError(f"quant_state JSON lacks {name!r}")
    v = meta[name]
    if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
        raise ValueError(f"quant_state {name!r} must be an integer, got {v!r}")
    if not isinstance(v, kind):
        raise ValueError(f"quant_state {name!r} must be a {kind.__name__}, got {v!r}")
    return v


def _packed_bytes(w, nbytes, key):
    """The packed codes as uint8[nbytes]; any storage dtype is reinterpreted as bytes."""
    w = np.ascontiguousarray(w)
    raw = w.reshape(-1).view(np.uint8)
    if raw.size < nbytes:
        raise ValueError(f"{key} is truncated: {raw.size} bytes of codes, the shape needs {nbytes}")
    if raw.size - nbytes >= w.itemsize:
        raise ValueError(f"{key} has {raw.size} bytes of codes, the shape needs {nbytes}")
    return raw[:nbytes].copy()
