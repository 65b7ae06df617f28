"""PEFT's LoRA layer for :class:`pyqlora.nn.Linear4bit`: ``peft.get_peft_model`` on pyqlora's 4-bit layers.

:class:`PeftLinear4bit` is a ``peft.tuners.lora.LoraLayer`` (PEFT's adapters, names,
state-dict keys, ``set_adapter``, ``disable_adapter``, several adapters) whose base is a
pyqlora ``Linear4bit``: the base product is pyqlora's fused 4-bit kernel (forward and
backward read the 4-bit weight; no dense copy is kept). ``import pyqlora.hf`` makes PEFT
build it for every targeted ``Linear4bit`` (:func:`dispatch_linear4bit`).

Merging differs from bitsandbytes': a merged layer's base becomes a dense ``nn.Linear``
holding ``dequant(W) + B A scaling`` (bitsandbytes re-quantizes the sum, which moves the
outputs); ``unmerge`` gives back the original 4-bit layer exactly, and
``merge_and_unload()`` leaves dense layers.
"""
import warnings

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from ..nn import Linear4bit, LoraLinear4bit, dequantize_weight

__all__ = ["PeftLinear4bit", "dispatch_linear4bit", "unsupported_lora_options"]

# PEFT LoraConfig options that PeftLinear4bit cannot honour, with the neutral value that is accepted
_UNSUPPORTED = {
    "use_dora": (False, "DoRA"),
    "lora_bias": (False, "a bias on lora_B"),
    "use_qalora": (False, "QALoRA"),
    "alora_invocation_tokens": (None, "Activated LoRA"),
    "velora_config": (None, "VeLoRA"),
    "arrow_config": (None, "Arrow routing"),
    "fan_in_fan_out": (False, "fan_in_fan_out (Conv1D-style weights)"),
}
# initializations that need the dense base weight (PiSSA, OLoRA, LoftQ, ...) are refused: True, False and
# "gaussian" only touch the adapter
_INITS = (True, False, "gaussian")


def unsupported_lora_options(config):
    """The options of a ``peft.LoraConfig`` that pyqlora's 4-bit LoRA layer cannot honour, as messages."""
    found = []
    for field, (neutral, what) in _UNSUPPORTED.items():
        value = getattr(config, field, neutral)
        if value is not None and value is not neutral and value != neutral:
            found.append(f"{field}={value!r} ({what})")
    init = getattr(config, "init_lora_weights", True)
    if init not in _INITS:
        found.append(f"init_lora_weights={init!r} (an initialization from the dense weight; pyqlora supports "
                     f"{list(_INITS)})")
    return found


class PeftLinear4bit(nn.Module, LoraLayer):
    """LoRA adapters (PEFT's ``LoraLayer``) on a frozen :class:`pyqlora.nn.Linear4bit`.

    Built by PEFT (``get_peft_model``, ``PeftModel.from_pretrained``, ``add_adapter``)
    for each targeted ``Linear4bit``; the signature is PEFT's custom-module one, so
    ``LoraConfig._register_custom_module({Linear4bit: PeftLinear4bit})`` also works.
    """

    def __init__(self, base_layer, adapter_name, config, r=0, lora_alpha=1, **kwargs):
        problems = unsupported_lora_options(config)
        if problems:
            raise ValueError(f"pyqlora's 4-bit LoRA layer does not support {', '.join(problems)}")
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self._quantized_base = None  # the Linear4bit while merged adapters made the base dense
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config,
                          target_name=kwargs.get("target_name", ""))

    def _get_in_out_features(self, module):
        return module.in_features, module.out_features

    def resolve_lora_variant(self, *, config, **kwargs):
        return None  # vanilla LoRA only (the others are refused in __init__)

    def update_layer(self, adapter_name, r, lora_alpha, config, **kwargs):
        problems = unsupported_lora_options(config)
        if problems:
            raise ValueError(f"pyqlora's 4-bit LoRA layer does not support {', '.join(problems)}")
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    # -- merging: dequantize into a dense layer, never re-quantize ---------------------------------------
    def get_delta_weight(self, adapter):
        return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]

    def merge(self, safe_merge=False, adapter_names=None):
        """Fold adapters into the weight: the base becomes a dense ``nn.Linear`` (in the dtype the 4-bit weight
        had before quantization) holding ``dequant(W) + B A scaling``; nothing is re-quantized."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        adapter_names = [a for a in adapter_names if a in self.lora_A]
        if not adapter_names:
            return
        base = self.get_base_layer()
        if isinstance(base, Linear4bit):
            warnings.warn("pyqlora: merging a LoRA adapter de-quantizes the 4-bit weight into a dense "
                          f"{base.weight_dtype} nn.Linear (not re-quantized, so the merged model computes what the "
                          "adapted one did); unmerge() restores the 4-bit layer", UserWarning, stacklevel=2)
            weight = dequantize_weight(base.quantized, torch.float32)
            dtype = base.weight_dtype
        else:
            weight = base.weight.detach().float()
            dtype = base.weight.dtype
        for name in adapter_names:
            weight += self.get_delta_weight(name).detach().float()
            if safe_merge and not torch.isfinite(weight).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
        if isinstance(base, Linear4bit):
            dense = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, dtype=dtype)
            with torch.no_grad():
                dense.weight.copy_(weight.to(dtype))
                if base.bias is not None:
                    dense.bias.copy_(base.bias)
            dense.requires_grad_(False)
            object.__setattr__(self, "_quantized_base", base)  # kept out of the module tree and the state dict
            self.base_layer = dense
        else:
            with torch.no_grad():
                base.weight.copy_(weight.to(dtype))
        self.merged_adapters.extend(adapter_names)

    def unmerge(self):
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        if self._quantized_base is not None and all(a in self.lora_A for a in self.merged_adapters):
            # every merged adapter is still here: the 4-bit layer comes back exactly as it was
            self.base_layer = self._quantized_base
            object.__setattr__(self, "_quantized_base", None)
            self.merged_adapters.clear()
            return
        base = self.get_base_layer()
        with torch.no_grad():
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                if name in self.lora_A:
                    base.weight -= self.get_delta_weight(name).to(base.weight.dtype)

    # -- forward: the 4-bit base (pyqlora's fused products) plus the active adapters ----------------------
    def _adapter_output(self, name, x, result_dtype):
        lora_A, lora_B = self.lora_A[name], self.lora_B[name]
        h = self.lora_dropout[name](self._cast_input_dtype(x, lora_A.weight.dtype))
        return (lora_B(lora_A(h)) * self.scaling[name]).to(result_dtype)

    def forward(self, x, *args, **kwargs):
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:  # a different adapter per sample ("__base__": none)
            result = result.clone()
            for name in set(adapter_names):
                if name == "__base__" or name not in self.lora_A:
                    continue
                rows = [i for i, a in enumerate(adapter_names) if a == name]
                result[rows] += self._adapter_output(name, x[rows], result.dtype)
            return result
        for name in self.active_adapters:
            if name in self.lora_A:
                result = result + self._adapter_output(name, x, result.dtype)
        return result

    def __repr__(self):
        return "lora." + super().__repr__()


def dispatch_linear4bit(target, adapter_name, config, **kwargs):
    """PEFT dispatcher: a :class:`PeftLinear4bit` for a ``Linear4bit`` target, None for anything else.

    A layer that already carries pyqlora's own adapters (:class:`pyqlora.nn.LoraLinear4bit`,
    from :func:`pyqlora.lora.prepare_model`) is refused: LoRA is never nested in LoRA.
    """
    if isinstance(target, LoraLinear4bit):
        raise ValueError("this layer already has pyqlora's LoRA adapters (pyqlora.lora.prepare_model): use either "
                         "pyqlora.lora.prepare_model or peft.get_peft_model on a model loaded with "
                         "quantization_config=PyqloraConfig(), not both")
    base = target.get_base_layer() if hasattr(target, "get_base_layer") else target
    if not isinstance(base, Linear4bit):
        return None
    return PeftLinear4bit(target, adapter_name, config=config, **kwargs)
