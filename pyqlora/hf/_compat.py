"""Every place where pyqlora.hf reaches into transformers' or PEFT's internals, with the version check.

transformers and PEFT have public hooks for most of what pyqlora needs
(``register_quantization_config`` / ``register_quantizer``, ``HfQuantizer``, PEFT's
``LoraLayer``). Four things have none, and are done here, once, when ``pyqlora.hf``
is imported:

1. **PEFT dispatch.** PEFT picks the LoRA layer for a module from a fixed list of
   dispatchers (``LoraModel._create_new_module``); custom modules exist only per config
   object. pyqlora's dispatcher is put in front of that list.
2. **``target_modules="all-linear"``.** PEFT expands it from a fixed tuple of classes
   (``_maybe_include_all_linear_layers``); pyqlora's ``Linear4bit`` layers are added, and
   the adapters inside pyqlora's own LoRA layers are left out (no LoRA inside LoRA).
   ``LoraModel._create_and_replace`` refuses targets inside adapter layers for the same reason.
3. **A bitsandbytes checkpoint with ``quantization_config=PyqloraConfig()``.** transformers
   refuses a config class other than the checkpoint's (``merge_quantization_configs``);
   for pyqlora's config it reads the checkpoint's bitsandbytes settings instead. And a
   dict ``{"quant_method": "pyqlora", "load_in_4bit": True}`` would become a
   bitsandbytes config (``AutoQuantizationConfig.from_dict`` checks ``load_in_4bit``
   first); ``quant_method="pyqlora"`` wins.
4. **``num_parameters()``** of a model flagged ``is_loaded_in_4bit`` imports bitsandbytes;
   a model loaded by pyqlora counts each 4-bit weight by its elements instead.

Supported: the versions in :data:`TESTED` and others of the same major version that
have the same internals (each patch checks its target exists; otherwise importing
``pyqlora.hf`` raises ImportError naming the versions).
"""
import functools

import peft
import transformers
from torch import nn

from ..nn import Linear4bit, LoraLinear4bit

__all__ = ["TESTED", "check_versions", "count_parameters_of_4bit_layers", "install"]

TESTED = {"transformers": "5.25.0", "peft": "0.21.2", "trl": "1.16.0"}
_MAJOR = {"transformers": 5, "peft": 0}
_MINOR_PEFT = (0, 18)  # PEFT's LoraLayer.update_layer(config=...) signature


def _version(text):
    parts = []
    for p in text.split(".")[:2]:
        digits = "".join(c for c in p if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def check_versions():
    """ImportError unless transformers 5.x and PEFT >= 0.18 with the internals pyqlora.hf relies on are installed."""
    tv, pv = _version(transformers.__version__), _version(peft.__version__)
    problems = []
    if tv[0] != _MAJOR["transformers"]:
        problems.append(f"transformers {transformers.__version__} (pyqlora.hf needs transformers 5.x)")
    if pv < _MINOR_PEFT or pv[0] != _MAJOR["peft"]:
        problems.append(f"peft {peft.__version__} (pyqlora.hf needs peft >= 0.18, < 1)")
    if not problems:
        try:
            from peft.tuners import tuners_utils
            from peft.tuners.lora.model import LoraModel
            from transformers.core_model_loading import ConversionOps  # noqa: F401
            from transformers.quantizers import auto
            from transformers.quantizers.base import HfQuantizer
        except ImportError as exc:
            problems.append(f"a module pyqlora.hf uses is missing ({exc})")
        else:
            needed = [(auto, "register_quantizer"), (auto, "register_quantization_config"),
                      (auto.AutoHfQuantizer, "merge_quantization_configs"), (auto.AutoQuantizationConfig, "from_dict"),
                      (HfQuantizer, "get_load_operations"),
                      (LoraModel, "_create_new_module"), (LoraModel, "_create_and_replace"),
                      (tuners_utils, "_maybe_include_all_linear_layers")]
            problems += [f"{getattr(o, '__name__', o)}.{name} is missing" for o, name in needed if not hasattr(o, name)]
    if problems:
        raise ImportError("pyqlora.hf cannot work with the installed versions: " + "; ".join(problems) +
                          f". It is tested with {', '.join(f'{k} {v}' for k, v in TESTED.items())}.")


def _inside_adapter_layer(model):
    """Names of the modules that belong to an adapter layer (PEFT's or pyqlora's): its adapters' submodules."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    inside = set()
    for prefix, module in model.named_modules():
        if isinstance(module, (BaseTunerLayer, LoraLinear4bit)):
            for suffix, _ in module.named_modules():
                if suffix and not suffix.startswith("base_layer"):
                    inside.add(f"{prefix}.{suffix}" if prefix else suffix)
    return inside


def _patch_all_linear(module):
    original = module._maybe_include_all_linear_layers
    if getattr(original, "_pyqlora", False):
        return

    @functools.wraps(original)
    def include_all_linear_layers(peft_config, model):
        target = getattr(peft_config, "target_modules", None)
        all_linear = isinstance(target, str) and target.lower() == "all-linear"
        peft_config = original(peft_config, model)
        if not all_linear:
            return peft_config
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        inside = _inside_adapter_layer(model)
        names = set(peft_config.target_modules) - inside
        for name, m in model.named_modules():
            if isinstance(m, (Linear4bit, LoraLinear4bit)) and m is not head and name not in inside:
                names.add(name)
        peft_config.target_modules = names
        return peft_config

    include_all_linear_layers._pyqlora = True
    module._maybe_include_all_linear_layers = include_all_linear_layers


def _patch_peft():
    from peft.tuners import tuners_utils
    from peft.tuners.lora.model import LoraModel

    from .peft_layer import dispatch_linear4bit

    _patch_all_linear(tuners_utils)
    try:
        from peft.utils import transformers_weight_conversion
    except ImportError:
        pass
    else:
        if hasattr(transformers_weight_conversion, "_maybe_include_all_linear_layers"):
            _patch_all_linear(transformers_weight_conversion)

    create = LoraModel.__dict__["_create_new_module"].__func__
    if not getattr(create, "_pyqlora", False):
        @functools.wraps(create)
        def _create_new_module(lora_config, adapter_name, target, **kwargs):
            base = target.get_base_layer() if hasattr(target, "get_base_layer") else target
            custom = getattr(lora_config, "_custom_modules", None) or {}
            if not any(isinstance(base, cls) for cls in custom):
                new = dispatch_linear4bit(target, adapter_name, lora_config, **kwargs)
                if new is not None:
                    return new
            return create(lora_config, adapter_name, target, **kwargs)

        _create_new_module._pyqlora = True
        LoraModel._create_new_module = staticmethod(_create_new_module)

    replace = LoraModel._create_and_replace
    if not getattr(replace, "_pyqlora", False):
        @functools.wraps(replace)
        def _create_and_replace(self, lora_config, adapter_name, target, target_name, parent, current_key, **kw):
            parts = (current_key or "").split(".")
            for i in range(1, len(parts)):
                try:
                    owner = self.model.get_submodule(".".join(parts[:i]))
                except AttributeError:
                    break
                if isinstance(owner, LoraLinear4bit) or (
                        hasattr(owner, "lora_A") and hasattr(owner, "base_layer") and parts[i] != "base_layer"):
                    raise ValueError(f"target module {current_key!r} is part of the LoRA layer "
                                     f"{'.'.join(parts[:i])!r}: LoRA inside LoRA is not supported (target the layer "
                                     "itself, not its adapters)")
            return replace(self, lora_config, adapter_name, target, target_name, parent, current_key, **kw)

        _create_and_replace._pyqlora = True
        LoraModel._create_and_replace = _create_and_replace


def _patch_merge_configs():
    from transformers.quantizers.auto import AutoHfQuantizer

    from .config import PyqloraConfig

    original = AutoHfQuantizer.__dict__["merge_quantization_configs"].__func__
    if getattr(original, "_pyqlora", False):
        return

    @functools.wraps(original)
    def merge_quantization_configs(cls, quantization_config, quantization_config_from_args):
        if not isinstance(quantization_config_from_args, PyqloraConfig):
            return original(cls, quantization_config, quantization_config_from_args)
        saved = quantization_config if isinstance(quantization_config, dict) else quantization_config.to_dict()
        method = saved.get("quant_method")
        is_4bit = saved.get("load_in_4bit") or saved.get("_load_in_4bit")
        if method == "pyqlora" or (method == "bitsandbytes" and is_4bit):
            merged = PyqloraConfig.from_dict(saved)
            merged.compute_dtype = quantization_config_from_args.compute_dtype  # how to run: the caller's choice
            return merged
        raise ValueError(f"the checkpoint is quantized with {method!r}"
                         f"{' (8-bit)' if method == 'bitsandbytes' else ''}; PyqloraConfig loads dense checkpoints "
                         "and bitsandbytes 4-bit ones")

    merge_quantization_configs._pyqlora = True
    AutoHfQuantizer.merge_quantization_configs = classmethod(merge_quantization_configs)

    from transformers.quantizers.auto import AutoQuantizationConfig

    from_dict = AutoQuantizationConfig.__dict__["from_dict"].__func__
    if not getattr(from_dict, "_pyqlora", False):
        @functools.wraps(from_dict)
        def pyqlora_first(cls, quantization_config_dict):
            if isinstance(quantization_config_dict, dict) and quantization_config_dict.get("quant_method") == "pyqlora":
                return PyqloraConfig.from_dict(quantization_config_dict)
            return from_dict(cls, quantization_config_dict)

        pyqlora_first._pyqlora = True
        AutoQuantizationConfig.from_dict = classmethod(pyqlora_first)


def count_parameters_of_4bit_layers(model):
    """Give `model` a ``num_parameters()`` that counts each 4-bit weight by its elements (transformers' imports
    bitsandbytes for a model flagged ``is_loaded_in_4bit`` and counts bitsandbytes' parameters only)."""

    def num_parameters(only_trainable=False, exclude_embeddings=False):
        storage, weights = set(), 0
        for m in model.modules():
            if isinstance(m, Linear4bit):
                storage.update(id(p) for p in m.quant_parameters())
                weights += m.out_features * m.in_features
        embeddings = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
        total = 0
        for name, p in model.named_parameters():
            if id(p) in storage or (exclude_embeddings and name in embeddings):
                continue
            if p.requires_grad or not only_trainable:
                total += p.numel()
        return total if only_trainable else total + weights

    model.num_parameters = num_parameters


def install(config_class, quantizer_class):
    """Register pyqlora's config and quantizer classes with transformers, patch PEFT (idempotent)."""
    from transformers.quantizers import auto

    PyqloraConfig, PyqloraHfQuantizer = config_class, quantizer_class
    if auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get("pyqlora") is not PyqloraConfig:
        auto.AUTO_QUANTIZATION_CONFIG_MAPPING.pop("pyqlora", None)
        auto.register_quantization_config("pyqlora")(PyqloraConfig)
    if auto.AUTO_QUANTIZER_MAPPING.get("pyqlora") is not PyqloraHfQuantizer:
        auto.AUTO_QUANTIZER_MAPPING.pop("pyqlora", None)
        auto.register_quantizer("pyqlora")(PyqloraHfQuantizer)
    _patch_merge_configs()
    _patch_peft()
