"""The transformers quantizer that builds :class:`pyqlora.nn.Linear4bit` layers while a model loads.

transformers (5.x) builds the model on the meta device, lets the quantizer swap its
``nn.Linear`` layers (:meth:`PyqloraHfQuantizer._process_model_before_weight_loading`),
then streams the checkpoint in one tensor at a time through conversion operations:

- a dense checkpoint: each linear weight is quantized as it is read
  (:class:`PyqloraQuantize`), so peak memory stays near the 4-bit model plus one dense layer;
- a checkpoint in bitsandbytes' 4-bit format (``pre_quantized``): the codes, scales and
  quant state of each weight are collected and become the layer's storage byte for byte
  (:class:`PyqloraDeserialize`).

Saving writes the layers' state dicts, which use bitsandbytes' keys, and
``PyqloraConfig.to_dict()``, bitsandbytes' ``quantization_config``: stock transformers +
bitsandbytes load the folder without pyqlora.
"""
import torch
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.base import HfQuantizer

import pyqlora as pq

from .._glue.tensors import as_numpy
from ..nn import Linear4bit, dequantize_weight
from .config import resolve_compute_dtype

__all__ = ["PyqloraDeserialize", "PyqloraHfQuantizer", "PyqloraQuantize", "SERIALIZED_SUFFIXES"]

# the entries of one 4-bit weight in a bitsandbytes checkpoint, after the weight's own key
SERIALIZED_SUFFIXES = ("", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
                       ".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4")


def _device_type(place):
    """'cpu', 'cuda', 'disk', ... for a device_map value (an int is a CUDA device index)."""
    if isinstance(place, int):
        return "cuda"
    if place == "disk":
        return "disk"
    try:
        return torch.device(place).type
    except (RuntimeError, TypeError):
        return str(place)


def _module(model, param_name):
    return model.get_submodule(param_name.rpartition(".")[0])


def _loaded(layer, key, missing_keys):
    """Mark `layer` (whose weight has key `key`) as loaded: its checkpoint entries are no longer missing."""
    layer._pyqlora_loaded = True
    layer._is_hf_initialized = True
    if missing_keys is not None:
        for suffix in SERIALIZED_SUFFIXES:
            missing_keys.discard(key + suffix)


def _quantize_into(layer, key, value, config):
    if tuple(value.shape) != (layer.out_features, layer.in_features):
        raise ValueError(f"{key}: checkpoint shape {tuple(value.shape)} does not match the layer's "
                         f"({layer.out_features}, {layer.in_features})")
    if not value.is_floating_point():
        raise ValueError(f"{key}: a {value.dtype} weight cannot be quantized")
    if value.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        value = value.float()
    try:
        q = pq.quantize(as_numpy(value.detach().cpu().contiguous()), codebook=config.codebook,
                        blocksize=config.blocksize, double_quant=config.double_quant)
    except pq.NonFiniteError as exc:
        raise ValueError(f"{key} holds {exc.value} at index {exc.index}: a weight with NaN or Inf cannot be "
                         "quantized") from exc
    layer.quantized = q


class PyqloraQuantize(ConversionOps):
    """Quantize a dense linear weight into its Linear4bit as it is read from the checkpoint."""

    def __init__(self, hf_quantizer):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, model=None, missing_keys=None, **kwargs):
        result = {}
        for key, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            layer = _module(model, key)
            _quantize_into(layer, key, value, self.hf_quantizer.quantization_config)
            _loaded(layer, key, missing_keys)
            result[key] = layer.weight
        return result


class PyqloraDeserialize(ConversionOps):
    """bitsandbytes' entries of one 4-bit weight (codes, absmax, quant_map, nested scales, quant state)
    become the Linear4bit's storage byte for byte (``QuantizedArray.from_bnb_dict`` checks them)."""

    def __init__(self, hf_quantizer):
        self.hf_quantizer = hf_quantizer

    @property
    def reverse_op(self):  # saving writes the layers' own bitsandbytes entries unchanged
        return _Identity()

    def convert(self, input_dict, model=None, full_layer_name=None, missing_keys=None, **kwargs):
        entries = {k: (v[0] if isinstance(v, list) else v) for k, v in input_dict.items()}
        layer = _module(model, full_layer_name)
        if not isinstance(layer, Linear4bit):
            return entries  # "weight" matched a parameter that is not 4-bit (a norm's weight, a dense layer)
        if set(entries) == {"weight"}:  # a dense weight in a partly quantized checkpoint: quantize it now
            _quantize_into(layer, full_layer_name, entries["weight"], self.hf_quantizer.quantization_config)
        else:
            try:
                q = pq.QuantizedArray.from_bnb_dict(entries, prefix="weight")
            except ValueError as exc:
                raise ValueError(f"{full_layer_name}: not a valid bitsandbytes 4-bit entry: {exc}") from exc
            if q.shape != (layer.out_features, layer.in_features):
                raise ValueError(f"{full_layer_name}: checkpoint shape {q.shape} does not match the layer's "
                                 f"({layer.out_features}, {layer.in_features})")
            layer.quantized = q
        _loaded(layer, full_layer_name, missing_keys)
        return {"weight": layer.weight}


class _Identity(ConversionOps):
    def convert(self, input_dict, **kwargs):
        return input_dict

    @property
    def reverse_op(self):
        return self


class PyqloraHfQuantizer(HfQuantizer):
    """transformers' quantizer for ``quant_method="pyqlora"`` (:class:`pyqlora.hf.PyqloraConfig`)."""

    requires_calibration = False
    serialized_names = {"weight": ["weight" + s for s in SERIALIZED_SUFFIXES]}

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.modules_to_not_convert = []
        self.compute_dtype = None

    @property
    def quantized_element_size(self):
        return 0.5

    def validate_environment(self, device_map=None, **kwargs):
        places = device_map.values() if isinstance(device_map, dict) else [device_map]
        other = sorted({str(p) for p in places if p not in (None, "auto", "cpu") and _device_type(p) != "cpu"})
        if other:
            raise ValueError(f"pyqlora's 4-bit layers run on the CPU only for now; device_map places modules on "
                             f"{other}")

    def update_device_map(self, device_map):
        return {"": "cpu"} if device_map in (None, "auto") else device_map

    def param_needs_quantization(self, model, param_name, **kwargs):
        module_name, _, name = param_name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            return False
        return isinstance(module, Linear4bit) and name == "weight"

    def _process_model_before_weight_loading(self, model, device_map=None, keep_in_fp32_modules=None, **kwargs):
        from transformers.quantizers.quantizers_utils import should_convert_module

        config = self.quantization_config
        self.modules_to_not_convert = self.get_modules_to_not_convert(
            model, config.skip_modules, getattr(model, "_keep_in_fp32_modules", None),
            add_default_skips=not self.pre_quantized or config.skip_modules is None)
        self.compute_dtype = resolve_compute_dtype(config)
        converted, kept = [], []
        for name, module in list(model.named_modules()):
            if type(module) is not nn.Linear:
                continue
            if not should_convert_module(name, self.modules_to_not_convert):
                kept.append(name)
                continue
            dtype = module.weight.dtype if module.weight.is_floating_point() else torch.float32
            layer = Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                               codebook=config.codebook, blocksize=config.blocksize,
                               double_quant=config.double_quant, compute_dtype=self.compute_dtype, dtype=dtype,
                               device="meta")
            layer._pyqlora_loaded = False
            model.set_submodule(name, layer)
            converted.append(name)
        if not converted:
            raise ValueError("PyqloraConfig found no torch.nn.Linear layer to quantize in "
                             f"{type(model).__name__} (skipped: {kept})")
        self._kept_dense = kept

    def _process_model_after_weight_loading(self, model, **kwargs):
        from . import _compat

        unloaded = [n for n, m in model.named_modules() if isinstance(m, Linear4bit)
                    and not getattr(m, "_pyqlora_loaded", True)]
        if unloaded:
            raise ValueError(f"{len(unloaded)} 4-bit layers received no weight from the checkpoint (missing, or it "
                             f"could not be converted: see the loading report above): {unloaded[:5]}"
                             f"{' ...' if len(unloaded) > 5 else ''}")
        config = self.quantization_config
        config.resolved_compute_dtype = str(self.compute_dtype).replace("torch.", "")
        config.modules_not_converted = sorted(self._kept_dense)
        model.is_loaded_in_4bit = True
        _compat.count_parameters_of_4bit_layers(model)
        return model

    def get_quantize_ops(self):
        return PyqloraQuantize(self)

    def get_load_operations(self):
        return {"deserialize": PyqloraDeserialize}

    def get_state_dict_and_metadata(self, model):
        """Before saving: the 4-bit layers write bitsandbytes' keys themselves. Layers that became dense (an
        adapter merged into them) are named in ``llm_int8_skip_modules`` so that loaders keep them dense; a
        model with no 4-bit layer left is saved as a plain dense model."""
        linears = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, Linear4bit))}
        dense = sorted(n for n, m in linears.items() if not isinstance(m, Linear4bit))
        if len(dense) == len(linears):
            self.remove_quantization_config(model)
            model.is_loaded_in_4bit = False
        else:
            self.quantization_config.modules_not_converted = dense
        return None, {}

    def is_serializable(self):
        return True

    @property
    def is_trainable(self):
        return True

    def _dequantize(self, model, dtype=None):
        """``model.dequantize()``: every Linear4bit becomes an nn.Linear holding its decoded weight."""
        for name, module in list(model.named_modules()):
            if isinstance(module, Linear4bit):
                target = dtype or module.weight_dtype
                dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                  dtype=target)
                with torch.no_grad():
                    dense.weight.copy_(dequantize_weight(module.quantized, target))
                    if module.bias is not None:
                        dense.bias.copy_(module.bias)
                dense.requires_grad_(False)
                model.set_submodule(name, dense)
        model.is_loaded_in_4bit = False
        return model
