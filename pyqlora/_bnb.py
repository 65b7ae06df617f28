"""bitsandbytes' 4-bit checkpoint entries: the dictionary form of a QuantizedArray.

bitsandbytes 0.50 (``Linear4bit`` / ``QuantState.as_dict(packed=True)``) stores a
4-bit weight as the packed codes under the weight's key plus ``absmax``,
``quant_map``, DQ's ``nested_absmax`` / ``nested_quant_map`` and a JSON blob
``quant_state.bitsandbytes__<type>``. :func:`entries` writes exactly those
(same keys, dtypes, shapes and JSON bytes); :func:`parse` reads them back
into the fields of a :class:`pyqlora.QuantizedArray`, rejecting anything
missing, truncated or inconsistent. ``docs/format.md`` has the layout.
"""
import json
import math

import numpy as np

from . import _dtypes
from ._codebooks import lookup_table
from ._formats import DQ_BLOCKSIZE, check_blocksize

__all__ = ["QUANT_TYPES", "entries", "parse"]

#: bitsandbytes QuantState.valid_qs_type_keys (functional.py): the codebooks its checkpoints hold
QUANT_TYPES = ("nf4", "fp4")
# bitsandbytes QuantState.valid_qs_keys (functional.py)
_KEYS = (
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


def entries(q, prefix):
    """The checkpoint entries of QuantizedArray `q` under `prefix` (see ``QuantizedArray.to_bnb_dict``)."""
    if q.codebook not in QUANT_TYPES:
        raise ValueError(f"bitsandbytes checkpoints hold only nf4 and fp4; this array uses {q.codebook!r}")
    if not isinstance(prefix, str):
        raise TypeError("prefix must be a string")
    # insertion order matches bitsandbytes' state dict
    d = {prefix: q.packed.reshape(-1, 1).copy(), f"{prefix}.absmax": q.absmax.copy()}
    # bitsandbytes' quant_map has +0.0 where FP4's code 8 decodes to -0.0
    # (its Python table is built from the int -0); adding +0.0 maps -0 to +0
    d[f"{prefix}.quant_map"] = q.code + np.float32(0.0)
    meta = {
        "quant_type": q.codebook,
        "blocksize": q.blocksize,
        "dtype": _dtypes.dtype_name(q.dtype),
        "shape": list(q.shape),
    }
    if q.double_quant:
        d[f"{prefix}.nested_absmax"] = q.nested_absmax.copy()
        d[f"{prefix}.nested_quant_map"] = lookup_table("dynamic", 256).copy()
        meta.update(nested_blocksize=DQ_BLOCKSIZE, nested_dtype="float32", nested_offset=q.nested_offset)
    blob = json.dumps(meta).encode("utf-8")  # bitsandbytes.utils.pack_dict_to_tensor
    d[f"{prefix}.quant_state.bitsandbytes__{q.codebook}"] = np.frombuffer(blob, dtype=np.uint8).copy()
    return d


def parse(d, prefix):
    """The QuantizedArray fields (keyword arguments) stored under `prefix` in the entries `d`.

    Raises ValueError naming the first problem: a missing, truncated or mistyped
    entry, a corrupt JSON blob, or one that disagrees with the arrays.
    """
    if not isinstance(prefix, str):
        raise TypeError("prefix must be a string")
    dot = prefix + "."
    found = {k[len(dot):]: v for k, v in d.items() if isinstance(k, str) and k.startswith(dot)}
    if prefix not in d:
        raise ValueError(f"missing packed weight {prefix!r}")
    qs_keys = [k for k in found if k.startswith("quant_state.")]
    if len(qs_keys) != 1 or qs_keys[0].split(".", 1)[1] not in ("bitsandbytes__nf4", "bitsandbytes__fp4"):
        raise ValueError(
            f"expected exactly one '{dot}quant_state.bitsandbytes__nf4' or '...__fp4' entry, "
            f"found {[dot + k for k in qs_keys]}"
        )
    key_type = qs_keys[0].rsplit("__", 1)[1]
    unknown = [k for k in found if k.split(".")[0] not in _KEYS]
    if unknown:
        raise ValueError(f"unexpected quant-state entries: {[dot + k for k in unknown]}")

    meta = _parse_blob(_host_array(found[qs_keys[0]]), dot + qs_keys[0])
    quant_type = _field(meta, "quant_type", str)
    if quant_type != key_type:
        raise ValueError(f"quant_type {quant_type!r} in the JSON disagrees with the key suffix {key_type!r}")
    blocksize = check_blocksize(_field(meta, "blocksize", int))
    dtype_s = _field(meta, "dtype", str)
    if dtype_s not in _dtypes.SUPPORTED:
        raise ValueError(f"unsupported dtype {dtype_s!r} in quant_state")
    shape = _field(meta, "shape", list)
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise ValueError(f"shape must be a list of non-negative integers, got {shape!r}")
    n = math.prod(shape)
    if n < 1:
        raise ValueError(f"shape {shape} has no elements")

    packed = _packed_bytes(_host_array(d[prefix]), (n + 1) // 2, prefix)
    if "quant_map" not in found:
        raise ValueError(f"missing entry {dot + 'quant_map'!r}")
    qmap = _host_array(found["quant_map"])
    if qmap.dtype != np.float32 or qmap.shape != (16,) or not np.array_equal(qmap, lookup_table(quant_type, 16)):
        raise ValueError(f"{dot}quant_map is not bitsandbytes' {quant_type} table")
    if "absmax" not in found:
        raise ValueError(f"missing entry {dot + 'absmax'!r}")
    absmax = _host_array(found["absmax"])
    if "nested_absmax" in found:
        if "nested_quant_map" not in found:
            raise ValueError(f"missing entry {dot + 'nested_quant_map'!r}")
        nb = _field(meta, "nested_blocksize", int)
        if nb != DQ_BLOCKSIZE:
            raise ValueError(f"nested_blocksize must be {DQ_BLOCKSIZE} (as bitsandbytes requires), got {nb}")
        if _field(meta, "nested_dtype", str) != "float32":
            raise ValueError("nested_dtype must be 'float32'")
        offset = meta.get("nested_offset")
        if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset):
            raise ValueError(f"nested_offset must be a finite number, got {offset!r}")
        nqm = _host_array(found["nested_quant_map"])
        if nqm.dtype != np.float32 or nqm.shape != (256,) or not np.array_equal(nqm, lookup_table("dynamic", 256)):
            raise ValueError(f"{dot}nested_quant_map is not bitsandbytes' signed dynamic map")
        nested_absmax = np.ascontiguousarray(_host_array(found["nested_absmax"]))
    else:
        stray = ["nested_quant_map"] * ("nested_quant_map" in found) + [
            k for k in ("nested_blocksize", "nested_dtype", "nested_offset") if k in meta
        ]
        if stray:
            raise ValueError(f"quant_state has nested fields {stray} but no nested_absmax entry")
        offset, nested_absmax = None, None
    return {"shape": shape, "dtype": dtype_s, "codebook": quant_type, "blocksize": blocksize, "packed": packed,
            "absmax": np.ascontiguousarray(absmax), "nested_absmax": nested_absmax, "nested_offset": offset}


def _host_array(v):
    """A host numpy array of a checkpoint entry (a numpy array, or a torch tensor on any device)."""
    if _dtypes.is_tensor(v):
        v = v.detach().cpu().contiguous()
    return _dtypes.as_numpy(v)


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
