"""Turn a torch model into a QLoRA model, and move adapters to and from PEFT.

``prepare_model`` replaces the target ``nn.Linear`` layers by
:class:`pyqlora.nn.LoraLinear4bit` (a frozen 4-bit base plus LoRA adapters),
quantizing one layer at a time, and freezes everything else.
``save_adapter`` / ``load_adapter`` use PEFT's files (``adapter_config.json`` and
``adapter_model.safetensors`` with PEFT's key names), so an adapter trained here
loads in ``peft.PeftModel`` and the other way round. ``merge_adapters`` gives a
dense model with the adapters folded into the dequantized weights.

Names and defaults follow PEFT (``r``, ``lora_alpha``, ``lora_dropout``,
``target_modules="all-linear"``, ``use_rslora``).

Example
-------
>>> import torch
>>> from pyqlora.lora import LoraConfig, prepare_model
>>> model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64))
>>> report = prepare_model(model, LoraConfig(r=4, lora_alpha=8))
>>> report.trainable_params, report.replaced
(1536, ['0', '2'])
"""
import dataclasses
import json
import math
import os
import re
from typing import List, Union

import torch
from torch import nn

from ._glue.modules import output_head, set_submodule
from ._glue.tensors import as_numpy
from ._quantize import dequantize, quantize
from .nn import Linear4bit, LoraLinear4bit, dequantize_weight

__all__ = ["LoraConfig", "PrepareReport", "empty_weights", "load_adapter", "lora_layers", "merge_adapters",
           "prepare_model", "save_adapter"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclasses.dataclass
class LoraConfig:
    """LoRA and quantization settings (PEFT's names and defaults where PEFT has them).

    target_modules : "all-linear" (every ``nn.Linear`` except the output head), a list
        of module names (a name matches a module whose full name is that name or ends
        with ``"." + name``, as in PEFT), or a regular expression matched against full names.
    norms_in_fp32 : keep the parameters of normalization layers (LayerNorm, RMSNorm and
        the like) in float32 and nothing else; each norm's output is cast back to its
        input's dtype, so the activations of a bfloat16 model stay bfloat16. PEFT's
        ``prepare_model_for_kbit_training`` upcasts *every* non-quantized parameter,
        embeddings included, a common cause of running out of memory.
    init_lora_weights : True (PEFT's default: A random, B = 0, so the adapted model
        starts as the quantized one) or ``"loftq"`` (LoftQ, Li et al. 2023, PEFT's name):
        for ``loftq_iter`` rounds, quantize ``W - scaling * B A`` and set ``B A`` to
        the best rank-r approximation (truncated SVD) of what quantization lost, so
        the model starts closer to the dense one. The base weights then differ from a
        plain quantization of W: keep them with the adapter (``pyqlora finetune``
        saves them; see :func:`pyqlora.app.checkpoint.save_4bit_base`).
    loftq_iter : int
        Rounds of LoftQ (1 = quantize W once, then fit the adapter to the residual).
    """

    r: int = 8
    lora_alpha: int = 8
    lora_dropout: float = 0.0
    target_modules: Union[str, List[str]] = "all-linear"
    use_rslora: bool = False
    codebook: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    gradient_checkpointing: bool = False
    norms_in_fp32: bool = True
    adapter_name: str = "default"
    init_lora_weights: Union[bool, str] = True
    loftq_iter: int = 1

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if self.init_lora_weights not in (True, "loftq"):
            raise ValueError(f"init_lora_weights must be True or 'loftq', got {self.init_lora_weights!r}")
        if not isinstance(self.loftq_iter, int) or self.loftq_iter < 1:
            raise ValueError(f"loftq_iter must be a positive integer, got {self.loftq_iter!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")

    def to_peft_dict(self, target_modules):
        """The adapter_config.json PEFT writes for this adapter (fields PEFT reads)."""
        return {
            "peft_type": "LORA",
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": sorted(target_modules),
            "use_rslora": self.use_rslora,
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": True,  # a trained adapter's init is history (PEFT wants a loftq_config with "loftq")
            "inference_mode": True,
            "modules_to_save": None,
            "task_type": None,
            "base_model_name_or_path": None,
            "use_dora": False,
            "lora_bias": False,
        }


@dataclasses.dataclass
class PrepareReport:
    replaced: List[str]
    trainable_params: int
    total_params: int
    dense_weight_bytes: int   # the replaced weights as they were
    quantized_weight_bytes: int  # the same weights in 4 bits (codes + scales)

    def __str__(self):
        return (f"{len(self.replaced)} linear layers quantized and adapted; trainable parameters "
                f"{self.trainable_params:,} of {self.total_params:,} "
                f"({100 * self.trainable_params / max(1, self.total_params):.2f}%); replaced weights "
                f"{self.dense_weight_bytes / 2**20:.1f} MiB dense -> {self.quantized_weight_bytes / 2**20:.1f} MiB")


def _select(model, target_modules):
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and name]
    if target_modules == "all-linear":
        head = output_head(model)
        return [(n, m) for n, m in linears if m is not head]
    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        return [(n, m) for n, m in linears if pattern.fullmatch(n)]
    targets = list(target_modules)
    picked = [(n, m) for n, m in linears if any(n == t or n.endswith("." + t) for t in targets)]
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n, _ in picked)]
    if unmatched:
        raise ValueError(f"target_modules {unmatched} match no nn.Linear in the model")
    return picked


def _is_norm(module):
    name = type(module).__name__
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or name.endswith("Norm") or "RMSNorm" in name


def _output_in_input_dtype(module, inputs, output):
    if inputs and torch.is_tensor(inputs[0]) and torch.is_tensor(output) and output.dtype != inputs[0].dtype:
        return output.to(inputs[0].dtype)
    return output


def lora_layers(model):
    """(name, LoraLinear4bit) pairs of a prepared model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear4bit)]


class empty_weights:  # a context manager, named like torch.no_grad
    """Build a model whose parameters are on the meta device (no memory), buffers real.

    For :func:`prepare_model` with ``weights=``: the parameters are then read one
    at a time and the target linear layers quantized as they arrive, so the dense
    model never exists. Buffers computed at construction (rotary frequencies)
    stay ordinary tensors.

    Examples
    --------
    >>> import torch
    >>> from pyqlora.lora import empty_weights
    >>> with empty_weights():
    ...     layer = torch.nn.Linear(4096, 4096)
    >>> layer.weight.device
    device(type='meta')
    """

    def __enter__(self):
        self._saved = nn.Module.register_parameter

        def register_parameter(module, name, param):
            self._saved(module, name, param)
            if param is not None and param.device.type != "meta":
                p = module._parameters[name]
                module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

        nn.Module.register_parameter = register_parameter
        return self

    def __exit__(self, *exc):
        nn.Module.register_parameter = self._saved
        return False


def _materialize(module_name, module, weights, cast=True, strict=False):
    """Fill the meta-device parameters of one module (not its children) from `weights`.

    cast=False keeps the source dtype (a weight about to be quantized is read at
    its full precision, whatever dtype the model was built in)."""
    for pname, p in list(module._parameters.items()):
        if p is None or p.device.type != "meta":
            continue
        key = f"{module_name}.{pname}" if module_name else pname
        if key not in weights:
            if strict:
                raise ValueError(f"weights has no entry for {key!r} (module {module_name!r})")
            continue  # tied or missing: checked once everything is loaded
        value = weights[key]
        value = torch.from_numpy(value) if not torch.is_tensor(value) else value
        if tuple(value.shape) != tuple(p.shape):
            raise ValueError(f"weights[{key!r}] has shape {tuple(value.shape)}, module {module_name!r} expects "
                             f"{tuple(p.shape)}")
        module._parameters[pname] = nn.Parameter(value.to(p.dtype) if cast else value, requires_grad=False)


def _loftq(linear, config, scaling):
    """LoftQ: rewrite `linear`'s weight to the matrix to quantize and return (A, B) with
    ``quant(weight) + scaling * B A`` close to the original weight (Li et al. 2023, alg. 1)."""
    w = linear.weight.detach().float()
    low_rank = torch.zeros_like(w)
    for _ in range(config.loftq_iter):
        target = (w - low_rank).to(linear.weight.dtype)  # what the layer will store, in its dtype
        q = quantize(as_numpy(target.contiguous()), codebook=config.codebook, blocksize=config.blocksize,
                     double_quant=config.double_quant)
        back = torch.empty(w.shape, dtype=target.dtype)
        dequantize(q, out=as_numpy(back))
        u, sv, vh = torch.linalg.svd(w - back.float(), full_matrices=False)
        root = torch.sqrt(sv[:config.r] / scaling)
        b, a = u[:, :config.r] * root, root[:, None] * vh[:config.r]
        low_rank = scaling * (b @ a)
    linear.weight.data = target  # the last matrix quantized; from_linear quantizes it again, identically
    return a, b


def prepare_model(model, config=None, weights=None):
    """Quantize the target linear layers of `model` in place and add LoRA adapters.

    Layers are quantized one at a time and their dense weights released at once,
    so peak memory stays near the dense model plus one layer. Every other
    parameter is frozen; the adapters are trainable (float32). With
    ``config.gradient_checkpointing`` a Hugging Face model gets
    ``gradient_checkpointing_enable()`` and input gradients enabled.

    Parameters
    ----------
    model : torch.nn.Module
    config : LoraConfig, optional
    weights : mapping, optional
        For a model built under :class:`empty_weights` (parameters on the meta
        device): parameter name -> tensor or array, read one entry at a time
        (a lazy mapping, such as a safetensors file or
        :func:`pyqlora.app.models.gguf_weights`, never holds the dense model). Each
        target layer is quantized as soon as its weight is read, so peak memory
        stays near the 4-bit model plus one dense layer. Tied parameters are
        re-tied with ``model.tie_weights()``.

    Returns
    -------
    PrepareReport
    """
    config = config or LoraConfig()
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    chosen = _select(model, config.target_modules)
    if not chosen:
        raise ValueError(f"target_modules={config.target_modules!r} selects no nn.Linear layer")
    if weights is None:
        meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
        if meta:
            raise ValueError(f"parameters {meta[:3]} are on the meta device: pass weights= to load them")
    for p in model.parameters():
        p.requires_grad_(False)
    dense_bytes = quant_bytes = 0
    chosen = [name for name, _ in chosen]  # hold names only: each old layer dies when it is replaced
    for name in chosen:
        linear = model.get_submodule(name)
        if weights is not None:
            _materialize(name, linear, weights, cast=False, strict=True)
        loftq = None
        if config.init_lora_weights == "loftq":
            if min(linear.in_features, linear.out_features) < config.r:
                raise ValueError(f"LoftQ needs r <= min(in, out) features; module {name!r} is "
                                 f"{linear.out_features} x {linear.in_features}, r={config.r}")
            loftq = _loftq(linear, config, config.lora_alpha / (config.r ** 0.5 if config.use_rslora else config.r))
        try:
            base = Linear4bit.from_linear(linear, codebook=config.codebook, blocksize=config.blocksize,
                                          double_quant=config.double_quant)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"cannot quantize module {name!r}: {exc}") from None
        dense_bytes += linear.weight.numel() * linear.weight.element_size()
        quant_bytes += base.quantized.nbytes
        lora = LoraLinear4bit(base, r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                              use_rslora=config.use_rslora, adapter_name=config.adapter_name)
        if loftq is not None:
            with torch.no_grad():
                lora.lora_A[config.adapter_name].weight.copy_(loftq[0])
                lora.lora_B[config.adapter_name].weight.copy_(loftq[1])
        set_submodule(model, name, lora)
        del linear, base, lora  # the dense weight is released with the old module
    if weights is not None:
        for mname, module in model.named_modules():
            _materialize(mname, module, weights)
        if hasattr(model, "tie_weights"):
            model.tie_weights()
        missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
        if missing:
            raise ValueError(f"weights has no entry for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if config.norms_in_fp32:
        for module in model.modules():
            params = [p for p in module.parameters(recurse=False) if p.is_floating_point()]
            if _is_norm(module) and any(p.dtype != torch.float32 for p in params):
                for p in params:
                    p.data = p.data.float()
                module.register_forward_hook(_output_in_input_dtype)
    if config.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    model._pyqlora_config = config
    model._pyqlora_targets = sorted({n.rpartition(".")[2] for n in chosen})
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # the 4-bit weights are uint8 parameters (codes + scales); count their elements, not their bytes
    storage = {id(p) for _, m in lora_layers(model) for p in m.base_layer.quant_parameters()}
    total = (sum(p.numel() for p in model.parameters() if id(p) not in storage)
             + sum(m.base_layer.quantized.size for _, m in lora_layers(model)))
    return PrepareReport(list(chosen), trainable, total, dense_bytes, quant_bytes)


def save_adapter(model, directory, adapter_name="default"):
    """Write the adapter in PEFT's format: adapter_config.json + adapter_model.safetensors."""
    from safetensors.torch import save_file

    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers: call prepare_model first")
    config = getattr(model, "_pyqlora_config", None) or LoraConfig()
    tensors = {}
    for name, layer in layers:
        if adapter_name not in layer.lora_A:
            raise ValueError(f"module {name!r} has no adapter {adapter_name!r}")
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A[adapter_name].weight.detach().contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B[adapter_name].weight.detach().contiguous()
    r = {layer.r[adapter_name] for _, layer in layers}
    alpha = {layer.lora_alpha[adapter_name] for _, layer in layers}
    cfg = dataclasses.replace(config, r=r.pop() if len(r) == 1 else config.r,
                              lora_alpha=alpha.pop() if len(alpha) == 1 else config.lora_alpha)
    os.makedirs(directory, exist_ok=True)
    targets = getattr(model, "_pyqlora_targets", None) or sorted({n.rpartition(".")[2] for n, _ in layers})
    with open(os.path.join(directory, ADAPTER_CONFIG), "w") as f:
        json.dump(cfg.to_peft_dict(targets), f, indent=2, sort_keys=True)
    save_file(tensors, os.path.join(directory, ADAPTER_WEIGHTS), metadata={"format": "pt"})


# PEFT's LoraConfig fields that change what an adapter computes (LoRA variants, a bias on
# lora_B, replicated layers). Ignoring one would load an adapter that computes something
# else, so only their neutral values (absent, null, false, empty) are accepted.
_UNSUPPORTED_FIELDS = {
    "use_dora": "DoRA", "lora_bias": "a bias on lora_B", "use_qalora": "QALoRA",
    "alora_invocation_tokens": "Activated LoRA", "velora_config": "VeLoRA", "monteclora_config": "MonteCLoRA",
    "use_bdlora": "BD-LoRA", "arrow_config": "Arrow routing", "kasa_config": "KaSA",
    "layer_replication": "layer replication",
}


def _short(value, limit=80):
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


@dataclasses.dataclass(frozen=True)
class _AdapterFile:
    """What load_adapter takes from adapter_config.json, checked (PEFT's defaults for absent fields)."""

    path: str
    r: int
    r_given: bool
    lora_alpha: Union[int, float]
    lora_dropout: float
    use_rslora: bool
    rank_pattern: dict
    alpha_pattern: dict

    def rank_and_alpha(self, module_name):
        """(r, lora_alpha, where r comes from) for one module, with rank_pattern / alpha_pattern applied
        as PEFT applies them (peft.utils.other.get_pattern_key: the first key matching the name's end)."""
        def lookup(pattern, default):
            for key, value in pattern.items():
                if re.match(rf"(.*\.)?({key})$", module_name):
                    return value, key
            return (pattern[module_name], module_name) if module_name in pattern else (default, None)

        r, key = lookup(self.rank_pattern, self.r)
        if key is not None:
            source = f"rank_pattern[{key!r}]"
        else:
            source = "r" if self.r_given else "r (absent: PEFT's default)"
        return r, lookup(self.alpha_pattern, self.lora_alpha)[0], source


def _config_error(path, field, message, value):
    return ValueError(f"{ADAPTER_CONFIG}: {field} {message}, got {_short(value)} ({path})")


def _positive_int(path, field, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _config_error(path, field, "must be a positive integer", value)
    return value


def _positive_number(path, field, value):
    """A finite number > 0, int or float (PEFT allows a float lora_alpha); returned unchanged."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    try:
        ok = ok and math.isfinite(float(value)) and value > 0
    except OverflowError:  # an int too large for a float
        ok = False
    if not ok:
        raise _config_error(path, field, "must be a finite positive number", value)
    return value


def _pattern(path, field, value, check):
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _config_error(path, field, "must be an object mapping module-name patterns to values", value)
    for key, v in value.items():
        try:
            re.compile(rf"(.*\.)?({key})$")
        except (re.error, RecursionError, OverflowError) as exc:
            raise ValueError(f"{ADAPTER_CONFIG}: {field} key {_short(key)} is not a valid regular expression "
                             f"({exc}) ({path})") from None
        check(path, f"{field}[{key!r}]", v)
    return dict(value)


def _read_adapter_config(path):
    """Parse and check adapter_config.json; raises ValueError naming the file, the field and the value."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text: {exc}") from None
    try:
        cfg = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, an int of over 4300 digits, deep nesting
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
        raise ValueError(f"{path} must hold a JSON object (PEFT's adapter config), got {kind.get(type(cfg), 'null')}")
    peft_type = cfg.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise _config_error(path, "peft_type", "must be 'LORA' (only LoRA adapters are supported)", peft_type)
    for field, what in _UNSUPPORTED_FIELDS.items():
        value = cfg.get(field)
        if not (value is None or value is False or (isinstance(value, (list, dict)) and not value)):
            raise _config_error(path, field, f"must be absent, null or false ({what} is not supported)", value)
    r = _positive_int(path, "r", cfg.get("r", 8))  # PEFT's defaults for absent fields
    alpha = _positive_number(path, "lora_alpha", cfg.get("lora_alpha", 8))
    dropout = cfg.get("lora_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise _config_error(path, "lora_dropout", "must be a number in [0, 1)", dropout)
    rslora = cfg.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise _config_error(path, "use_rslora", "must be true or false", rslora)
    return _AdapterFile(path=path, r=r, r_given="r" in cfg, lora_alpha=alpha, lora_dropout=float(dropout),
                        use_rslora=rslora,
                        rank_pattern=_pattern(path, "rank_pattern", cfg.get("rank_pattern"), _positive_int),
                        alpha_pattern=_pattern(path, "alpha_pattern", cfg.get("alpha_pattern"), _positive_number))


def _read_adapter_tensors(path):
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except MemoryError:
        raise
    except Exception as exc:  # SafetensorError, OSError, and whatever a corrupt header provokes
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from exc


def _check_adapter_name(adapter_name):
    if not isinstance(adapter_name, str):
        raise TypeError(f"adapter_name must be a string, got {type(adapter_name).__name__}")
    if not adapter_name or "." in adapter_name or hasattr(nn.ModuleDict(), adapter_name):
        raise ValueError(f"adapter_name {adapter_name!r} cannot name a module: it must be non-empty, without '.', "
                         "and not an attribute of torch.nn.ModuleDict")


def _plan_adapter(layers, tensors, cfg, w_path, adapter_name):
    """Check every tensor against the model and the config; return {module: (A, B, r, alpha)} with A and B
    already converted to the dtype and device they will be copied to. Changes nothing."""
    found = {}
    for key in sorted(tensors):
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.(lora_[AB])(?:\.[^.]+)?\.weight", key)
        if not m:
            raise ValueError(f"{w_path}: unexpected tensor {key!r} (only lora_A / lora_B weights are supported)")
        name, which = m.group(1), m.group(2)
        if name not in layers:
            raise ValueError(f"{w_path}: tensor {key!r} names module {name!r}, which is not a LoRA layer of the model")
        if (name, which) in found:
            raise ValueError(f"{w_path}: tensors {found[name, which]!r} and {key!r} are both {which} of module "
                             f"{name!r}")
        found[name, which] = key
    missing = [f"{n}.{w}" for n in layers for w in ("lora_A", "lora_B") if (n, w) not in found]
    if missing:
        raise ValueError(f"{w_path}: no weights for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    plan = {}
    for name, layer in layers.items():
        r, alpha, source = cfg.rank_and_alpha(name)
        expected = {"lora_A": (r, layer.in_features), "lora_B": (layer.out_features, r)}
        for which, expect in expected.items():
            key = found[name, which]
            value = tensors[key]
            if not value.is_floating_point():
                raise ValueError(f"{w_path}: tensor {key!r} has dtype {value.dtype}; LoRA weights must be floating "
                                 "point")
            shape = tuple(value.shape)
            if shape == expect:
                continue
            if len(shape) != 2:
                why = "LoRA weights are 2-D"
            elif which == "lora_A" and shape[1] != layer.in_features:
                why = f"module {name!r} has in_features={layer.in_features}"
            elif which == "lora_B" and shape[0] != layer.out_features:
                why = f"module {name!r} has out_features={layer.out_features}"
            else:
                why = (f"the tensor has r={shape[0] if which == 'lora_A' else shape[1]}, "
                       f"{ADAPTER_CONFIG} gives {source} = {r}")
            raise ValueError(f"{w_path}: tensor {key!r} of module {name!r} has shape {shape}, expected {expect}: "
                             f"{why}")
        existing = adapter_name in layer.lora_A
        if existing and (layer.r.get(adapter_name) != r or any(
                tuple(getattr(layer, w)[adapter_name].weight.shape) != expected[w] for w in expected)):
            raise ValueError(f"module {name!r} has an adapter {adapter_name!r} with r={layer.r.get(adapter_name)}, "
                             f"the adapter in {os.path.dirname(w_path) or '.'} has r={r}: load it under another "
                             "adapter_name")
        ready = []
        for which in expected:
            key = found[name, which]
            if existing:
                target = getattr(layer, which)[adapter_name].weight
                value = tensors[key].to(device=target.device, dtype=target.dtype)
            else:
                value = tensors[key].to(torch.float32)  # add_adapter's dtype
            exact = value.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16)
            if not bool(torch.isfinite(value if exact else value.float()).all()):
                raise ValueError(f"{w_path}: tensor {key!r} holds NaN or Inf" +
                                 ("" if value.dtype == tensors[key].dtype else f" (once converted to {value.dtype})"))
            ready.append(value)
        plan[name] = (ready[0], ready[1], r, alpha)
    return plan


def _apply_adapter(layers, plan, cfg, adapter_name):
    """Copy a checked plan into the layers; should anything still fail, undo what was done and re-raise."""
    undo = []
    try:
        for name, (a, b, r, alpha) in plan.items():
            layer = layers[name]
            if adapter_name in layer.lora_A:
                wa, wb = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
                saved = (wa.detach().clone(), wb.detach().clone(), layer.r[adapter_name],
                         layer.lora_alpha[adapter_name], layer.scaling[adapter_name])
                undo.append((layer, saved))
            else:
                undo.append((layer, list(layer.active_adapters)))
                layer.add_adapter(adapter_name, r=r, lora_alpha=alpha, use_rslora=cfg.use_rslora,
                                  lora_dropout=cfg.lora_dropout)
                wa, wb = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            with torch.no_grad():
                wa.copy_(a)
                wb.copy_(b)
            layer.r[adapter_name], layer.lora_alpha[adapter_name] = r, alpha
            layer.scaling[adapter_name] = alpha / (math.sqrt(r) if cfg.use_rslora else r)
    except BaseException:
        for layer, saved in reversed(undo):
            if isinstance(saved, tuple):
                with torch.no_grad():
                    layer.lora_A[adapter_name].weight.copy_(saved[0])
                    layer.lora_B[adapter_name].weight.copy_(saved[1])
                layer.r[adapter_name], layer.lora_alpha[adapter_name], layer.scaling[adapter_name] = saved[2:]
            else:
                for store in (layer.lora_A, layer.lora_B, layer.lora_dropout):
                    if adapter_name in store:
                        del store[adapter_name]
                for store in (layer.r, layer.lora_alpha, layer.scaling):
                    store.pop(adapter_name, None)
                layer.active_adapters[:] = saved
        raise


def load_adapter(model, directory, adapter_name="default"):
    """Load a PEFT LoRA adapter (ours or PEFT's) into a model prepared by prepare_model.

    The adapter's r, lora_alpha, lora_dropout and use_rslora come from its
    adapter_config.json (PEFT's defaults where a field is absent: r=8, lora_alpha=8,
    lora_dropout=0, use_rslora=false), with PEFT's per-module ``rank_pattern`` and
    ``alpha_pattern`` applied. Every field read is checked (type, range, finite);
    LoRA variants that change the math (DoRA, a bias on lora_B, ...) are refused;
    other fields are ignored. Every tensor must be a floating-point, finite lora_A
    (r, in_features) or lora_B (out_features, r) of a LoRA layer of the model, with
    the r the config gives that module, and every LoRA layer must get both.

    A layer that has an adapter named `adapter_name` already gets the weights copied
    into it (its parameters stay the same objects, so an optimizer holding them keeps
    working; its r must be the adapter's; its dropout stays); other layers get a new
    adapter, which is also made active.

    Everything is checked before anything is changed: when this raises (ValueError
    for bad files, FileNotFoundError for missing ones), the model is as it was.
    """
    _check_adapter_name(adapter_name)
    cfg_path, w_path = os.path.join(directory, ADAPTER_CONFIG), os.path.join(directory, ADAPTER_WEIGHTS)
    for path in (cfg_path, w_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"adapter file not found: {path}" +
                                    (" (not a regular file)" if os.path.exists(path) else ""))
    cfg = _read_adapter_config(cfg_path)
    tensors = _read_adapter_tensors(w_path)
    layers = dict(lora_layers(model))
    if not layers:
        raise ValueError("the model has no LoRA layers: call prepare_model first")
    plan = _plan_adapter(layers, tensors, cfg, w_path, adapter_name)
    _apply_adapter(layers, plan, cfg, adapter_name)
    return model


def merge_adapters(model, dtype=torch.float32, requantize=False):
    """Fold the active adapters into the dequantized base weights, in place.

    Each LoraLinear4bit becomes an ``nn.Linear`` with ``W = dequant(W4) + B A scaling``
    in `dtype` (or, with ``requantize=True``, a new Linear4bit of that sum). Returns
    ``(model, report)``; ``report[name]`` gives, with ``requantize``, the relative
    error the re-quantization added to the merged weight (PEFT warns about it; here
    it is measured).
    """
    report = {}
    for name, layer in lora_layers(model):
        with torch.no_grad():
            w = dequantize_weight(layer.base_layer.quantized, torch.float32)
            for adapter in layer.active_adapters:
                w += layer.delta_weight(adapter).float()
            bias = layer.base_layer.bias
            dense = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, dtype=dtype)
            dense.weight.copy_(w.to(dtype))
            if bias is not None:
                dense.bias.copy_(bias.to(dtype))
        entry = {"shape": (layer.out_features, layer.in_features)}
        if requantize:
            base = layer.base_layer
            new = Linear4bit.from_linear(dense, codebook=base.codebook, blocksize=base.blocksize,
                                         double_quant=base.double_quant)
            back = dequantize_weight(new.quantized, torch.float32)
            entry["requantize_rel_error"] = float(torch.linalg.norm(back - w) / torch.linalg.norm(w).clamp_min(1e-30))
            dense = new
        dense.requires_grad_(False)
        set_submodule(model, name, dense)
        report[name] = entry
    return model, report
