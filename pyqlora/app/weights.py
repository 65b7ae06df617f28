"""Weights in files: lazy mappings (parameter name -> tensor, each read only when asked for), safetensors
readers whose errors name the file, and the check that a checkpoint's tensors fit a model.

:func:`pyqlora.lora.prepare_model` takes such a mapping (``weights=``) for a model
built under :class:`pyqlora.lora.empty_weights`, quantizing each layer as its
weight arrives, so the dense model never exists.

Every reader here turns what a damaged or foreign file makes its library raise
(safetensors' ``SafetensorError``, ...) into ValueError, and a file that cannot be
read into OSError, with the file's name in the message.
"""
import re

from .._glue.files import (check_layer_count, config_errors, read_safetensors, safetensors_index,
                           safetensors_tensor)

__all__ = ["LazyWeights", "SafetensorsWeights", "check_layer_count", "check_weight_shapes", "config_errors",
           "read_safetensors", "safetensors_index", "safetensors_tensor"]


def _shape_hint(config, implied, actual):
    sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
             "head_dim", "num_hidden_layers")
    named = [f"{k}={getattr(config, k)}" for k in sizes
             if isinstance(getattr(config, k, None), int) and getattr(config, k) in set(implied) - set(actual)]
    return f" ({', '.join(named)})" if named else ""


def check_weight_shapes(model, tensors, config_name, missing=True, unexpected=True, base_prefix=False,
                        source=None):
    """Raise ValueError unless a checkpoint's tensors fit `model`, which its configuration describes.

    Parameters
    ----------
    model : torch.nn.Module
        Built from the configuration, on the meta device (no memory).
    tensors : dict
        ``{name: (shape, file)}`` of the checkpoint (``file`` is what the message names).
    config_name : str
        What the configuration is called in the message (``folder/config.json``).
    missing : bool
        Refuse a parameter the checkpoint lacks (one of tied parameters is enough, such as an
        output head tied to the embeddings).
    unexpected : bool
        Refuse a tensor that is no parameter of the model (those transformers ignores on loading
        excepted).
    base_prefix : bool
        Accept the names of a checkpoint saved from the base model (without the causal LM's
        ``model.`` prefix), as transformers' ``from_pretrained`` does.
    source : str, optional
        What a message about missing parameters names (default: the files of `tensors`).
    """
    state = model.state_dict(keep_vars=True)
    prefix = getattr(model, "base_model_prefix", "") if base_prefix else ""
    names = {}  # the model's name of each checkpoint tensor
    for name in tensors:
        if name in state:
            names[name] = name
        elif prefix and f"{prefix}.{name}" in state:
            names[name] = f"{prefix}.{name}"
    for name, (shape, file) in tensors.items():
        if name in names and tuple(state[names[name]].shape) != tuple(shape):
            implied = tuple(state[names[name]].shape)
            raise ValueError(f"{file}: tensor {name!r} has shape {tuple(shape)}, but {config_name} implies "
                             f"{implied}{_shape_hint(getattr(model, 'config', None), implied, tuple(shape))}; "
                             "the configuration and the weights disagree")
    if missing:
        present = set(names.values())
        aliases = {}
        for name, t in state.items():
            aliases.setdefault(id(t), []).append(name)
        lacking = [group[0] for group in aliases.values() if not any(n in present for n in group)]
        if lacking:
            where = source or ", ".join(sorted({file for _, file in tensors.values()})) or "the checkpoint"
            raise ValueError(f"{where}: no tensor for {len(lacking)} parameter(s) of "
                             f"the model {config_name} describes, such as {lacking[:3]}; the configuration and the "
                             "weights disagree")
    ignore = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []
    extra = [n for n in tensors if n not in names and not any(re.search(p, n) for p in ignore)]
    if unexpected and extra:
        shape, file = tensors[extra[0]]
        raise ValueError(f"{file}: tensor {extra[0]!r} (shape {tuple(shape)}) is no parameter of the model "
                         f"{config_name} describes ({len(extra)} such tensor(s)); the configuration and the weights "
                         "disagree")


class LazyWeights:
    """A read-only mapping over an index ``name -> where to read it``; subclasses read a value in ``__getitem__``."""

    def __init__(self, index):
        self._index = index

    def __contains__(self, key):
        return key in self._index

    def __iter__(self):
        return iter(self._index)

    def __len__(self):
        return len(self._index)

    def __getitem__(self, key):
        raise NotImplementedError


class SafetensorsWeights(LazyWeights):
    """The tensors of safetensors files, read one at a time.

    safetensors maps the file and may return views of the mapping: a dense weight
    then costs file-backed pages only while it lives (until prepare_model has
    quantized it), and no heap allocation is left behind. (Reading into fresh
    tensors instead left about 140 MiB of freed heap resident with glibc.)
    """

    def __init__(self, files):
        super().__init__({key: path for key, (_, _, path) in safetensors_index(files).items()})

    def __getitem__(self, key):
        return safetensors_tensor(self._index[key], key)
