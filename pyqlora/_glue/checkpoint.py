"""A 4-bit checkpoint folder on disk, for :func:`pyqlora.lora.load_4bit` (internal).

- :func:`safetensors_files`, :func:`meta_model`: a Hugging Face folder's weight files, and the model its
  configuration describes, built on the meta device;
- :func:`safetensors_layout`, :func:`read_for_pager`: where each tensor lies in its file (from the
  header alone), so that a :class:`pyqlora.Pager` maps the 4-bit layers' bytes from the file itself
  (``Pager.map_file``) while everything else is read into memory.
"""
import glob
import json
import os
import sys

from .files import check_layer_count, config_errors, error_text, read_json, safetensors_tensor

__all__ = ["PREAD_MAX", "SAFETENSORS_NUMPY", "mappable", "meta_model", "quant_storage_keys", "read_for_pager",
           "read_small", "safetensors_files", "safetensors_layout"]


def meta_model(config, config_name="config.json", tensor_names=None):
    """The transformers causal LM `config` describes, built on the meta device (no memory, no weights read).

    A configuration whose values cannot build a model (a hidden size that is not a multiple of the
    heads, a negative size, a string for a number, ...) raises ValueError naming `config_name`; so
    does one whose layer count is not the layers `tensor_names` (a checkpoint's) hold.
    """
    import torch
    import transformers

    if tensor_names is not None:
        check_layer_count(getattr(config, "num_hidden_layers", None), tensor_names, config_name)
    try:
        with torch.device("meta"):
            return transformers.AutoModelForCausalLM.from_config(config)
    except (*config_errors(), RuntimeError) as exc:
        raise ValueError(f"{config_name}: cannot build the model it describes ({error_text(exc)})") from exc


def safetensors_files(folder):
    """The weight files of a Hugging Face folder (through its index when sharded), adapters left out.

    A damaged index raises ValueError and a shard it names that is missing FileNotFoundError, naming the index.
    """
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        data = read_json(index, "model.safetensors.index.json")
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index}: expected a JSON object with a \"weight_map\" of tensor name -> file name")
        files = sorted({os.path.join(folder, v) for v in weight_map.values()})
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(f"{index} names {os.path.basename(missing[0])}, which is not in {folder}")
        return files
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    return [f for f in files if not os.path.basename(f).startswith("adapter_")]


# safetensors dtypes whose bytes a pager maps as they are (little-endian, as the format stores them)
SAFETENSORS_NUMPY = {"U8": "u1", "I8": "i1", "U16": "<u2", "I16": "<i2", "F16": "<f2", "U32": "<u4", "I32": "<i4",
                      "F32": "<f4", "U64": "<u8", "I64": "<i8", "F64": "<f8", "BF16": "<u2"}


def safetensors_layout(path):
    """``{name: (dtype, shape, offset, nbytes)}`` of a safetensors file, offsets absolute in the file.

    Read from the header alone (8 bytes of header length, then JSON): no tensor data is read.
    ValueError names the file for a header that is not safetensors or whose ranges leave the file.
    """
    import struct

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise ValueError(f"{path}: not a safetensors file (header length {n}, file of {size} bytes)")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not a safetensors file (its header is not JSON: {exc})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (its header is not a JSON object)")
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in e["data_offsets"])
            dtype, shape = e["dtype"], tuple(int(d) for d in e["shape"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: tensor {name!r} has a malformed header entry {e!r}") from None
        if not 0 <= begin <= end or 8 + n + end > size:
            raise ValueError(f"{path}: tensor {name!r} lies outside the file (bytes {begin}..{end} of data)")
        out[name] = (dtype, shape, 8 + n + begin, end - begin)
    return out


def mappable(dtype, offset, nbytes, shape):
    """The numpy dtype a pager maps a safetensors tensor with as it is, or None (it needs a copy)."""
    import numpy as np

    code = SAFETENSORS_NUMPY.get(dtype)
    if code is None or sys.byteorder != "little" or nbytes == 0:
        return None
    dt = np.dtype(code)
    count = 1
    for d in shape:
        count *= d
    if count * dt.itemsize != nbytes or offset % dt.itemsize:  # unaligned: torch and the kernels want aligned data
        return None
    return dt


def quant_storage_keys(names):
    """The 4-bit layers' big entries (packed codes, absmax, nested absmax) among checkpoint tensor `names`."""
    keys = set()
    for k in names:
        for cb in ("nf4", "fp4"):
            suffix = f".quant_state.bitsandbytes__{cb}"
            if k.endswith(suffix):
                w = k[:-len(suffix)]
                keys.update(x for x in (w, w + ".absmax", w + ".nested_absmax") if x in names)
    return keys


PREAD_MAX = 1 << 20  # tensors up to this size are read with pread (see read_small)


def read_small(path, entries):
    """``{key: tensor}`` of the small tensors `entries` (``{key: (dtype, shape, offset, nbytes)}``) of one file.

    Read with ``pread`` on a descriptor whose read-ahead is off (``POSIX_FADV_RANDOM``), into
    memory of their own: safetensors maps the whole file and its tensors view that mapping, so
    reading a quant map beside a layer's codes faults the codes into the page cache too (the
    kernel reads around a fault) and keeps them mapped while the tensor lives, out of the pager's
    reach. A dtype torch does not know is left to safetensors.
    """
    import torch

    dtypes = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "F16": torch.float16,
              "BF16": torch.bfloat16, "I32": torch.int32, "F32": torch.float32, "F64": torch.float64,
              "I64": torch.int64}
    out = {}
    fd = os.open(path, os.O_RDONLY)
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for key, (dtype, shape, off, nbytes) in entries.items():
            dt = dtypes.get(dtype)
            if dt is None or sys.byteorder != "little":
                out[key] = safetensors_tensor(path, key)
                continue
            buf = bytearray(nbytes)
            got = os.preadv(fd, [buf], off) if nbytes else 0
            if got != nbytes:
                raise ValueError(f"{path}: tensor {key!r} is cut short ({got} of {nbytes} bytes)")
            t = torch.frombuffer(buf, dtype=dt) if nbytes else torch.empty(0, dtype=dt)
            out[key] = t.reshape(shape)
    finally:
        os.close(fd)
    return out


def read_for_pager(files):
    """(state, layout): the checkpoint's tensors but the 4-bit layers' big entries, read into memory, and
    ``{key: (path, dtype, shape, offset, nbytes)}`` of those entries, which a pager maps instead."""
    layout, state = {}, {}
    for f in files:
        entries = safetensors_layout(f)
        for k, (dtype, shape, off, nbytes) in entries.items():
            layout[k] = (f, dtype, shape, off, nbytes)
        big = quant_storage_keys(entries)
        small = {k: e for k, e in entries.items() if k not in big and e[3] <= PREAD_MAX}
        state.update(read_small(f, small))
        # large ones (embeddings, the output head): safetensors' reads, as without a pager
        state.update({k: safetensors_tensor(f, k) for k, e in entries.items() if k not in big and k not in small})
    big = quant_storage_keys(layout)
    return state, {k: layout[k] for k in big}
