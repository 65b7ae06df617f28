"""Turn a torch model into a QLoRA model, and move adapters to and from PEFT.

``prepare_model`` replaces the target ``nn.Linear`` layers by
:class:`pyqlora.nn.LoraLinear4bit` (a frozen 4-bit base plus LoRA adapters),
quantizing one layer at a time, and freezes everything else. It takes pyqlora's
:class:`LoraConfig` or a ``peft.LoraConfig``; target layers that are
:class:`pyqlora.nn.Linear4bit` already (a model loaded from a 4-bit checkpoint) get
adapters without a second quantization, and modules inside LoRA layers are never
targeted (no LoRA inside LoRA).
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
import types
from typing import Dict, List, Optional, Union

import torch
from torch import nn

from ._array import QuantizedArray
from ._glue.modules import enable_activation_checkpointing, set_submodule
from ._glue.paging import BasePaging, PagedArena, RunningLayerScales, place_in_pager
from ._glue.tensors import as_numpy
from ._pager import Pager
from ._quantize import dequantize, quantize
from .nn import Linear4bit, LoraLinear4bit, dequantize_weight

__all__ = ["LoraConfig", "PrepareReport", "check_adapter", "empty_weights", "load_4bit", "load_adapter", "lora_layers",
           "merge_adapters", "prepare_model", "save_adapter"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclasses.dataclass
class LoraConfig:
    """LoRA and quantization settings (PEFT's names and defaults where PEFT has them).

    target_modules : "all-linear" (every ``nn.Linear`` and :class:`pyqlora.nn.Linear4bit`
        except the output head), a list of module names (a name matches a module whose
        full name is that name or ends with ``"." + name``, as in PEFT), or a regular
        expression matched against full names. A ``Linear4bit`` (a model loaded from a
        4-bit checkpoint) gets adapters without being quantized again; the modules inside
        LoRA layers are never targeted (no LoRA inside LoRA).
    exclude_modules : the same forms, for modules to leave out (PEFT's field).
    rank_pattern, alpha_pattern : PEFT's per-module ``r`` and ``lora_alpha``: a key (a
        regular expression) matches a module whose full name ends with it (after a dot).
    task_type, base_model_name_or_path, revision : what :func:`save_adapter` writes into
        ``adapter_config.json`` for ``AutoPeftModel*`` (by default it finds them on the model).
    norms_in_fp32 : keep the parameters of normalization layers (LayerNorm, RMSNorm and
        the like) in float32 and nothing else; each norm's output is cast back to its
        input's dtype, so the activations of a bfloat16 model stay bfloat16. PEFT's
        ``prepare_model_for_kbit_training`` upcasts *every* non-quantized parameter,
        embeddings included, a common cause of running out of memory.
    embeddings_dtype : ``"bfloat16"``, ``"float16"`` or None
        Store the frozen input embedding and output head in this dtype while the model
        computes in the dtype they had: the embedding's rows are cast as they are looked
        up, and the head's weight is cast a slice of at most 16 Mi elements at a time in
        forward and backward, so no full copy of either exists in the compute dtype. For
        a bfloat16 checkpoint trained in float32 the float32 copies hold the same values
        in twice the memory: this saves 2 x vocab x hidden x 2 bytes (0.61 GiB for a 13B
        Llama, 1 GiB for 65B). Embeddings are then exact; logits and the head's input
        gradient agree with a float32 head to float32 rounding (slice-wise sums). None
        (the default) leaves them as loaded.
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
    embeddings_dtype: Optional[str] = None
    adapter_name: str = "default"
    init_lora_weights: Union[bool, str] = True
    loftq_iter: int = 1
    exclude_modules: Union[None, str, List[str]] = None
    rank_pattern: Dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Dict[str, Union[int, float]] = dataclasses.field(default_factory=dict)
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        for field, check in (("rank_pattern", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
                             ("alpha_pattern", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                              and math.isfinite(v) and v > 0)):
            pattern = getattr(self, field)
            if not isinstance(pattern, dict):
                raise TypeError(f"{field} must be a dict of module-name pattern -> value, got "
                                f"{type(pattern).__name__}")
            bad = {k: v for k, v in pattern.items() if not isinstance(k, str) or not check(v)}
            if bad:
                raise ValueError(f"{field} has invalid entries {bad} (keys: module-name patterns; values: "
                                 f"{'positive integers' if field == 'rank_pattern' else 'positive numbers'})")
        if self.embeddings_dtype is not None and _dtype_name(self.embeddings_dtype) not in ("bfloat16", "float16"):
            raise ValueError(f"embeddings_dtype must be 'bfloat16', 'float16' or None, got {self.embeddings_dtype!r}")
        if self.init_lora_weights not in (True, "loftq"):
            raise ValueError(f"init_lora_weights must be True or 'loftq', got {self.init_lora_weights!r}")
        if not isinstance(self.loftq_iter, int) or self.loftq_iter < 1:
            raise ValueError(f"loftq_iter must be a positive integer, got {self.loftq_iter!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")

    def rank_and_alpha(self, module_name):
        """(r, lora_alpha) of one module, with rank_pattern / alpha_pattern applied as PEFT applies them."""
        return (_pattern_value(self.rank_pattern, module_name, self.r),
                _pattern_value(self.alpha_pattern, module_name, self.lora_alpha))

    @classmethod
    def from_peft(cls, peft_config, **overrides):
        """This config from a ``peft.LoraConfig`` (what :func:`prepare_model` does with one).

        PEFT's fields are translated (``r``, ``lora_alpha``, ``lora_dropout``,
        ``target_modules``, ``exclude_modules``, ``use_rslora``, ``rank_pattern``,
        ``alpha_pattern``, ``init_lora_weights`` True or ``"loftq"``, ``task_type``,
        ``base_model_name_or_path``, ``revision``); `overrides` set pyqlora's own fields
        (``codebook``, ``blocksize``, ``double_quant``, ``gradient_checkpointing``, ...).
        Options that prepare_model cannot honour (DoRA, a LoRA bias, ``modules_to_save``,
        ``layers_to_transform``, another initialization, ...) raise ValueError naming them.
        """
        if not (hasattr(peft_config, "peft_type") and hasattr(peft_config, "target_modules")):
            raise TypeError(f"expected a peft.LoraConfig, got {type(peft_config).__name__}")
        peft_type = getattr(peft_config.peft_type, "value", peft_config.peft_type)
        if str(peft_type) != "LORA":
            raise ValueError(f"only LoRA configs can be translated, got peft_type={peft_type!r}")
        refused = []
        for field, (neutral, what) in _PREPARE_REFUSES.items():
            value = getattr(peft_config, field, None)
            if not (value is None or value is False or value == neutral or
                    (isinstance(value, (list, dict, tuple, set)) and not value)):
                refused.append(f"{field}={_short(value)} ({what})")
        init = getattr(peft_config, "init_lora_weights", True)
        loftq_iter = 1
        if init == "loftq":
            loftq = dict(getattr(peft_config, "loftq_config", None) or {})
            if loftq.get("loftq_bits", 4) != 4:
                refused.append(f"loftq_config.loftq_bits={loftq['loftq_bits']!r} (pyqlora's LoftQ quantizes to 4 bits)")
            loftq_iter = int(loftq.get("loftq_iter", 1))
        elif init is not True:
            refused.append(f"init_lora_weights={init!r} (pyqlora initializes adapters as PEFT's default, True, "
                           "or with 'loftq')")
        if refused:
            raise ValueError("pyqlora.lora.prepare_model cannot honour these peft.LoraConfig options: "
                             + "; ".join(refused) + " (peft.get_peft_model on a model loaded with "
                             "pyqlora.hf.PyqloraConfig supports modules_to_save)")
        targets = peft_config.target_modules
        if targets is None:
            raise ValueError("peft.LoraConfig(target_modules=None) means PEFT's per-architecture default; give "
                             "target_modules (e.g. 'all-linear' or a list of names)")
        if not isinstance(targets, str):
            targets = sorted(targets)
        exclude = peft_config.exclude_modules
        if exclude is not None and not isinstance(exclude, str):
            exclude = sorted(exclude)
        task = getattr(peft_config, "task_type", None)
        fields = dict(r=peft_config.r, lora_alpha=peft_config.lora_alpha, lora_dropout=peft_config.lora_dropout,
                      target_modules=targets, exclude_modules=exclude, use_rslora=peft_config.use_rslora,
                      rank_pattern=dict(peft_config.rank_pattern or {}),
                      alpha_pattern=dict(peft_config.alpha_pattern or {}),
                      init_lora_weights=init if init == "loftq" else True, loftq_iter=loftq_iter,
                      task_type=None if task is None else str(getattr(task, "value", task)),
                      base_model_name_or_path=peft_config.base_model_name_or_path, revision=peft_config.revision)
        fields.update(overrides)
        return cls(**fields)

    def to_peft_dict(self, target_modules):
        """The adapter_config.json PEFT writes for this adapter (fields PEFT reads)."""
        return {
            "peft_type": "LORA",
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": sorted(target_modules),
            "exclude_modules": None,
            "use_rslora": self.use_rslora,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": True,  # a trained adapter's init is history (PEFT wants a loftq_config with "loftq")
            "inference_mode": True,
            "modules_to_save": None,
            "task_type": self.task_type,
            "base_model_name_or_path": self.base_model_name_or_path,
            "revision": self.revision,
            "use_dora": False,
            "lora_bias": False,
        }


@dataclasses.dataclass
class PrepareReport:
    replaced: List[str]
    trainable_params: int
    total_params: int
    dense_weight_bytes: int   # the replaced weights dense (in the dtype they had before quantization)
    quantized_weight_bytes: int  # the same weights in 4 bits (codes + scales)
    already_4bit: List[str] = dataclasses.field(default_factory=list)  # targets that were Linear4bit already
    paging: object = None  # pyqlora._glue.paging.BasePaging with prepare_model(pager=...)
    calibration: Optional[dict] = None  # prepare_model(calibration=...): tokens, seconds, peak RSS

    def __str__(self):
        quantized = len(self.replaced) - len(self.already_4bit)
        what = (f"{quantized} linear layers quantized" +
                (f", {len(self.already_4bit)} already 4-bit," if self.already_4bit else "") + " and adapted")
        return (f"{what}; trainable parameters "
                f"{self.trainable_params:,} of {self.total_params:,} "
                f"({100 * self.trainable_params / max(1, self.total_params):.2f}%); replaced weights "
                f"{self.dense_weight_bytes / 2**20:.1f} MiB dense -> {self.quantized_weight_bytes / 2**20:.1f} MiB")


def _pattern_value(pattern, module_name, default):
    """PEFT's per-module lookup (peft.utils.other.get_pattern_key): the first key that matches the end of
    `module_name` after a dot, then an exact key, else `default`."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return pattern.get(module_name, default)


def _is_adapter_layer(module):
    """pyqlora's LoRA layer, or a PEFT tuner layer (it has a base layer and adapters)."""
    return isinstance(module, LoraLinear4bit) or (hasattr(module, "base_layer") and hasattr(module, "lora_A"))


def _inside_adapter_layers(model):
    """Names of the modules that belong to LoRA layers (their base layers and adapters): never targets."""
    inside = set()
    for prefix, module in model.named_modules():
        if _is_adapter_layer(module):
            inside.update(f"{prefix}.{suffix}" if prefix else suffix for suffix, _ in module.named_modules() if suffix)
    return inside


def _matches(name, spec):
    """PEFT's matching: a string is a regular expression matched against the full name, a list holds
    names that match the full name or its end after a dot."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def _select(model, target_modules, exclude_modules=None):
    inside = _inside_adapter_layers(model)
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, Linear4bit)) and name]
    candidates = [(n, m) for n, m in layers if n not in inside]
    if isinstance(target_modules, str) and target_modules.lower() == "all-linear":
        get_head = getattr(model, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        picked = [(n, m) for n, m in candidates if m is not head]
    else:
        if not isinstance(target_modules, str):
            target_modules = list(target_modules)
        nested = [n for n, _ in layers if n in inside and _matches(n, target_modules)]
        if nested:
            raise ValueError(f"target_modules={_short(target_modules)} selects modules inside LoRA layers "
                             f"({nested[:3]}): LoRA inside LoRA is not supported; target the layers themselves")
        picked = [(n, m) for n, m in candidates if _matches(n, target_modules)]
        if not isinstance(target_modules, str):
            unmatched = [t for t in target_modules if not any(_matches(n, [t]) for n, _ in picked)]
            if unmatched:
                raise ValueError(f"target_modules {unmatched} match no nn.Linear or Linear4bit in the model" +
                                 (" (it has LoRA layers already: prepare_model was called on it)" if inside else ""))
    if exclude_modules:
        picked = [(n, m) for n, m in picked if not _matches(n, exclude_modules)]
    return picked


def _is_norm(module):
    name = type(module).__name__
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or name.endswith("Norm") or "RMSNorm" in name


def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


# The head's weight is cast this many elements at a time: 16 MiB of float32, under glibc's 32 MiB
# ceiling for mapping a block afresh, so the slices reuse heap memory. With 64 MiB slices each cast
# paid its fresh pages: bf16 -> fp32 of 4096 x 4096 took 26.4 ms, four 1024-row slices 3.5 ms. The
# 7B head (32000 x 4096, 512 tokens) forward + backward: 1077-1094 ms -> 910-930 ms (Intel Xeon,
# 2 threads, best of 5, alternated).
_HEAD_SLICE_ELEMENTS = 1 << 22


class _HeadInComputeDtype(torch.autograd.Function):
    """``x @ W^T (+ b)`` for a frozen W stored in a narrower dtype than x: W is cast one slice of
    rows at a time, in forward and in backward (the input gradient, summed slice by slice)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        rows = max(1, _HEAD_SLICE_ELEMENTS // max(1, weight.shape[1]))
        out = x.new_empty(*x.shape[:-1], weight.shape[0])
        for n0 in range(0, weight.shape[0], rows):
            out[..., n0:n0 + rows] = x @ weight[n0:n0 + rows].to(x.dtype).t()
        if bias is not None:
            out += bias.to(x.dtype)
        ctx.save_for_backward(weight)
        ctx.rows = rows
        return out

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        gx = None
        if ctx.needs_input_grad[0]:
            g = grad.reshape(-1, weight.shape[0])
            gx = g.new_empty(g.shape[0], weight.shape[1])
            for n0 in range(0, weight.shape[0], ctx.rows):  # summed into gx: no product-sized temporary
                w = weight[n0:n0 + ctx.rows].to(grad.dtype)
                if n0 == 0:
                    torch.mm(g[:, :ctx.rows], w, out=gx)
                else:
                    gx.addmm_(g[:, n0:n0 + ctx.rows], w)
            gx = gx.reshape(*grad.shape[:-1], weight.shape[1])
        return gx, None, None


def _head_forward(head, compute_dtype, x):
    if x.dtype != compute_dtype:
        x = x.to(compute_dtype)
    return _HeadInComputeDtype.apply(x, head.weight, head.bias)


def _store_embeddings_in(model, dtype):
    """LoraConfig.embeddings_dtype: the input embedding and output head stored in `dtype`, computed in
    the dtype they had (a no-op for those already in `dtype`)."""
    dtype = getattr(torch, _dtype_name(dtype))
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    emb = get_in() if callable(get_in) else None
    head = get_out() if callable(get_out) else None
    if emb is None and head is None:
        raise ValueError("embeddings_dtype: the model has no get_input_embeddings / get_output_embeddings")
    todo = []
    for module, kind in ((emb, nn.Embedding), (head, nn.Linear)):
        if module is None:
            continue
        if not isinstance(module, kind):
            what = "input embedding" if kind is nn.Embedding else "output head"
            raise ValueError(f"embeddings_dtype: expected the model's {what} to be an nn.{kind.__name__}, "
                             f"got {type(module).__name__}")
        if module.weight.requires_grad:
            raise ValueError("embeddings_dtype needs a frozen embedding and head (they are trained here)")
        # before any cast: a tied head shares the embedding's weight
        compute = getattr(module, "_pyqlora_compute_dtype", module.weight.dtype)
        if compute != dtype:
            todo.append((module, kind, compute))
    for module, kind, compute in todo:
        if module.weight.dtype != dtype:  # tied: cast once
            module.weight.data = module.weight.data.to(dtype)
        if not hasattr(module, "_pyqlora_compute_dtype"):
            module._pyqlora_compute_dtype = compute
            if kind is nn.Embedding:
                module.register_forward_hook(lambda m, i, out, c=compute: out.to(c))
            else:
                module.forward = types.MethodType(lambda m, x, c=compute: _head_forward(m, c, x), module)


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


class _StopForward(Exception):
    """Raised by the hook that captures the first decoder layer's inputs."""


def _decoder_layers(model, names):
    """(prefix, ModuleList) of the repeated blocks holding most of the target layers `names`."""
    best, best_count = None, 0
    for prefix, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            count = sum(1 for n in names if n.startswith(prefix + "."))
            if count > best_count:
                best, best_count = (prefix, module), count
    return best


def _batch_inputs(batch, what):
    """A calibration batch as model keyword arguments (input_ids [batch, tokens] ...)."""
    if isinstance(batch, dict):
        if "input_ids" not in batch:
            raise ValueError(f"{what} is a dict without 'input_ids'")
        kwargs = dict(batch)
    else:
        kwargs = {"input_ids": batch}
    ids = torch.as_tensor(kwargs["input_ids"])
    if ids.dtype not in (torch.int64, torch.int32) or ids.dim() not in (1, 2) or ids.numel() == 0:
        raise ValueError(f"{what}: input_ids must be a non-empty 1-D or 2-D integer tensor of token ids, got "
                         f"dtype {ids.dtype}, shape {tuple(ids.shape)}")
    kwargs["input_ids"] = ids.long().reshape(1, -1) if ids.dim() == 1 else ids.long()
    return kwargs


# X^T X of inputs this wide or wider is computed by panels of rows of its upper triangle (below: one product)
_MOMENT_PANEL_MIN = 256


def _input_moment(x2):
    """X^T X (float32) of the rows x2 (tokens x K): for K >= _MOMENT_PANEL_MIN only its upper triangle (and the
    diagonal panels) is computed, by row panels ``X[:, a:b]^T X[:, a:]``, the rest left zero; read it with
    :func:`_symmetric_from_upper`. Some 0.55-0.6 of the full product's multiply-adds: 1.2x faster for K = 576,
    1.5x for K = 1536 at 2048 rows on a 2-core AMD EPYC Zen 4 (torch's BLAS), each element the same dot product."""
    k = x2.shape[1]
    if k < _MOMENT_PANEL_MIN:
        return x2.T @ x2
    width = 128 if k < 1024 else 192
    out = torch.zeros(k, k, dtype=x2.dtype)
    for a in range(0, k, width):
        b = min(k, a + width)
        out[a:b, a:] = x2[:, a:b].T @ x2[:, a:]
    return out


def _symmetric_from_upper(s):
    """The symmetric matrix whose upper triangle is that of `s` (s itself below _MOMENT_PANEL_MIN)."""
    if s.shape[0] < _MOMENT_PANEL_MIN:
        return s
    upper = torch.triu(s)
    return upper + torch.triu(s, 1).T


class _dequantized_forwards:
    """Within this context, every ``Linear4bit`` of `module` (and every ``LoraLinear4bit`` whose adapters are all
    zero, as they start) computes ``x W^T + b`` with its weight dequantized once, in the dtype the layer
    computes in (``Linear4bit.input_dtype``), by torch's GEMM, instead of decoding tiles at every call: the same
    weight values, the outputs equal to float32 rounding (Linear4bit's own route, the fused kernel for few
    rows or decoded tiles, sums in another order), 13 % less time for a SmolLM2-135M block on 2048 rows in
    float32 (2-core AMD EPYC Zen 4). For many passes over one block's layers without gradients
    (calibration); the weights are held only inside the context."""

    def __init__(self, module):
        self.patched = []
        for m in module.modules():
            if isinstance(m, LoraLinear4bit):
                if all(not b.weight.any() for b in m.lora_B.values()):
                    self._patch(m, m.base_layer)
            elif isinstance(m, Linear4bit) and not any(m is base for _, base in self.patched):
                self._patch(m, m)  # alone, or under adapters that are not zero

    def _patch(self, module, base):
        if not isinstance(base.quantized, QuantizedArray):  # a CUDA weight: its own products
            return
        weights = {}

        def forward(x):
            dtype = base.input_dtype(x)
            w = weights.get(dtype)
            if w is None:
                w = weights[dtype] = dequantize_weight(base.quantized, dtype)
            y = x.to(dtype) @ w.T
            return y if base.bias is None else y + base.bias.to(dtype)

        self.patched.append((module, base))
        module.forward = forward

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for module, _ in self.patched:
            del module.forward  # the class's forward again
        self.patched = []
        return False


class _Calibration:
    """Sequential calibration for ``prepare_model(calibration=...)`` (issue 22).

    The inputs of the first decoder layer are captured for every batch; then,
    layer after layer, a forward pass of the (still dense) layer with hooks on its
    target linears sums each one's ``X^T X`` (float32 products per batch, of the
    upper triangle only for wide inputs (:func:`_input_moment`), summed in float64;
    layers that read the same input tensor, such as q/k/v, share one product; the
    pass stops once every target has read its input), the caller quantizes the
    layer's linears with them (:func:`pyqlora.quantize` with ``hessian=``) and replaces them, and a second
    pass of the now 4-bit layer gives the next layer's inputs. So each layer is
    calibrated on what the quantized layers before it produce, and only one
    layer's statistics are held at a time (besides the hidden states of the
    calibration tokens). Target layers outside the repeated blocks (rare) are
    rounded to nearest; they are listed in ``info["round_to_nearest"]``.
    """

    def __init__(self, model, names, batches, damp, order, progress):
        import time

        self.t0 = time.perf_counter()
        self.damp, self.order, self.progress = damp, order, progress
        found = _decoder_layers(model, names)
        if found is None:
            raise ValueError("calibration needs a model whose target layers sit in a list of repeated blocks "
                             "(nn.ModuleList, such as the decoder layers of a transformers model)")
        self.prefix, self.blocks = found
        self.layer_of = {}
        for n in names:
            if n.startswith(self.prefix + "."):
                self.layer_of[n] = int(n[len(self.prefix) + 1:].split(".")[0])
        self.names = names
        self.inputs = []  # per batch: [args, kwargs] of the block at self.pos
        self.tokens = 0
        captured = []

        def grab(module, args, kwargs):
            captured.append([list(args), dict(kwargs)])
            raise _StopForward

        hook = self.blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad():
                for i, batch in enumerate(batches):
                    kwargs = _batch_inputs(batch, f"calibration batch {i}")
                    self.tokens += int(kwargs["input_ids"].numel())
                    try:
                        model(**kwargs, use_cache=False)
                    except _StopForward:
                        pass
        finally:
            hook.remove()
        if not captured:
            raise ValueError("calibration holds no batch")
        self.inputs = captured
        self.pos = 0        # the block whose inputs self.inputs are
        self.current = -1   # the block whose statistics are held
        self.hessians = {}
        self.factors = {}
        self.round_to_nearest = [n for n in names if n not in self.layer_of]

    def _show(self, i):
        if self.progress:
            import sys
            import time

            n = len(self.blocks)
            done = int(30 * i / n)
            print(f"\rcalibrating [{'#' * done}{'.' * (30 - done)}] block {i}/{n} "
                  f"{time.perf_counter() - self.t0:.0f} s", end="" if i < n else "\n", file=sys.stderr, flush=True)

    def _run_block(self, k):
        """Run block k on the stored inputs (they become block k + 1's).

        Its 4-bit layers compute with their dequantized weights for the pass (:func:`_dequantized_forwards`):
        the same weight values, with torch's GEMM on the whole weight rather than decoded tiles."""
        block = self.blocks[k]
        with torch.no_grad(), _dequantized_forwards(block):
            for entry in self.inputs:
                out = block(*entry[0], **entry[1])
                hidden = out[0] if isinstance(out, (tuple, list)) else out
                if entry[0]:
                    entry[0] = [hidden] + entry[0][1:]
                else:
                    entry[1]["hidden_states"] = hidden

    def _collect(self, i):
        block = self.blocks[i]
        targets = {n: n[len(f"{self.prefix}.{i}."):] for n, k in self.layer_of.items() if k == i}
        sums, seen, hooks, calls = {}, {}, [], {}
        group = {}  # name -> the first name that read the same input tensor (q/k/v, gate/up share X^T X)
        # After the first batch, where every target ran once, a forward stops as soon as every target has
        # read its input: the rest of the block (in a transformer, down_proj's product and the residual) is not
        # needed. A block whose targets run more than once or not at all (weight sharing, routed experts) is
        # always run in full.
        stop_early = [False]

        def make_hook(name):
            def hook(module, args):
                calls[name] = calls.get(name, 0) + 1
                x = args[0]
                key = id(x)
                if key not in seen:
                    seen[key] = (x, _input_moment(x.detach().reshape(-1, x.shape[-1]).float()), name)
                first = group.setdefault(name, seen[key][2])
                if first == name:  # else summed once, under `first`
                    xtx = seen[key][1]
                    if name in sums:
                        sums[name].add_(xtx)
                    else:
                        sums[name] = xtx.double()
                if stop_early[0] and len(calls) == len(targets):
                    raise _StopForward
            return hook

        for name, rel in targets.items():
            hooks.append(block.get_submodule(rel).register_forward_pre_hook(make_hook(name)))
        try:
            with torch.no_grad():
                for b, entry in enumerate(self.inputs):
                    seen.clear()
                    calls.clear()
                    try:
                        block(*entry[0], **entry[1])
                    except _StopForward:
                        pass
                    if b == 0:
                        stop_early[0] = len(calls) == len(targets) and all(c == 1 for c in calls.values())
        finally:
            for h in hooks:
                h.remove()
            seen.clear()
        for n in sums:
            sums[n] = _symmetric_from_upper(sums[n])
        arrays = {n: sums[n].numpy() for n in sums}
        self.hessians = {n: arrays[group[n]] for n in targets if n in group and group[n] in arrays}
        self.factors = {}  # one factorization per distinct X^T X (pyqlora._quantize.quantize_calibrated)
        self.current = i

    def quantize(self, name, linear, codebook, blocksize, double_quant):
        """The calibrated QuantizedArray of target `name`, or None (round to nearest)."""
        i = self.layer_of.get(name)
        if i is None:
            return None
        if i != self.current:
            while self.pos < i:  # the blocks before are quantized by now
                self._run_block(self.pos)
                self.pos += 1
            self._show(i)
            self._collect(i)
        h = self.hessians.pop(name, None)
        if h is None:  # the layer did not run in the block's forward pass
            self.round_to_nearest.append(name)
            return None
        from ._quantize import quantize_calibrated, check_blocksize, check_codebook

        return quantize_calibrated(as_numpy(linear.weight.detach().contiguous()), check_codebook(codebook),
                                    check_blocksize(blocksize), bool(double_quant), h, self.damp, self.order,
                                    factors=self.factors)

    def finish(self):
        import resource
        import sys
        import time

        self.hessians, self.inputs, self.factors = {}, [], {}
        self._show(len(self.blocks))
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        return {"tokens": self.tokens, "blocks": len(self.blocks), "seconds": time.perf_counter() - self.t0,
                "peak_rss_bytes": int(rss), "damp": self.damp, "order": self.order,
                "round_to_nearest": list(self.round_to_nearest)}


def prepare_model(model, config=None, weights=None, pager=None, lookahead=2, calibration=None,
                  calibration_damp=0.1, calibration_order="act", progress=False):
    """Quantize the target linear layers of `model` in place and add LoRA adapters.

    Layers are quantized one at a time and their dense weights released at once,
    so peak memory stays near the dense model plus one layer. Every other
    parameter is frozen; the adapters are trainable (float32). With
    ``config.gradient_checkpointing`` a Hugging Face model gets
    activation checkpointing and input gradients enabled, and its
    ``save_pretrained`` (what ``Trainer.save_model`` calls) writes the adapter in PEFT's
    format, as PEFT's models do (transformers' own would write the 4-bit base under keys
    it cannot read back). Target layers that are ``Linear4bit`` already are adapted as
    they are (listed in ``PrepareReport.already_4bit``).

    Parameters
    ----------
    model : torch.nn.Module
    config : LoraConfig or peft.LoraConfig, optional
        A PEFT config is translated by :meth:`LoraConfig.from_peft` (options prepare_model
        cannot honour raise ValueError).
    weights : mapping, optional
        For a model built under :class:`empty_weights` (parameters on the meta
        device): parameter name -> tensor or array, read one entry at a time
        (a lazy mapping, such as a safetensors file or
        :func:`pyqlora.app.models.gguf_weights`, never holds the dense model). Each
        target layer is quantized as soon as its weight is read, so peak memory
        stays near the 4-bit model plus one dense layer. Tied parameters are
        re-tied with ``model.tie_weights()``.
    pager : pyqlora.Pager, optional
        Place the 4-bit bytes (codes, scales, nested scales) of every target layer in this
        pager, layer by layer as they are quantized, so that its ``budget_bytes`` bounds the
        resident base (the rest is in its spill file). Hooks then prefetch each layer's bytes
        before it runs and the next `lookahead` layers' in a background thread (the order is
        learnt from the first forward; reversed in backward); ``PrepareReport.paging``
        (a :class:`pyqlora._glue.paging.BasePaging`) reports the disk wait and the pager's
        counters. Results are bit-identical to the resident base.
    lookahead : int
        Layers prefetched ahead with `pager` (0: each layer only when it runs).

    calibration : iterable, optional
        Calibrated rounding (issue 22, ``docs/quality.md``): batches of token ids
        (``LongTensor`` of shape (batch, tokens) or (tokens,), or dicts of model inputs
        with ``input_ids``). The target layers are quantized block after block of the
        model's repeated layers, each with the second moment ``X^T X`` of its inputs
        as the already-quantized layers before it produce them
        (:func:`pyqlora.quantize` with ``hessian=``). Same format, same size; only
        the codes and scales differ. Not with `weights` or LoftQ.
    calibration_damp, calibration_order
        ``damp`` and ``order`` of :func:`pyqlora.quantize` for the calibrated layers. The
        defaults (0.1, ``"act"``) are not that function's (GPTQ's 0.01, ``"natural"``): on
        SmolLM2-135M they halved the perplexity loss of round to nearest where GPTQ's
        settings recovered a quarter of it (``docs/quality.md`` section 4).
    progress : bool
        A progress line on stderr while calibrating.

    Returns
    -------
    PrepareReport
        With `calibration`, ``report.calibration`` holds the tokens, seconds and the
        process's peak resident memory of the calibration.
    """
    config = config or LoraConfig()
    if not isinstance(config, LoraConfig):
        config = LoraConfig.from_peft(config)
    if pager is not None and not isinstance(pager, Pager):
        raise TypeError(f"pager must be a pyqlora.Pager, got {type(pager).__name__}")
    arena = PagedArena.for_pager(pager) if pager is not None else None
    if isinstance(lookahead, bool) or not isinstance(lookahead, int) or lookahead < 0:
        raise ValueError(f"lookahead must be a non-negative int, got {lookahead!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    chosen = _select(model, config.target_modules, config.exclude_modules)
    if not chosen:
        already = " (the model has LoRA layers already: prepare_model was called on it)" if lora_layers(model) else ""
        raise ValueError(f"target_modules={config.target_modules!r} selects no nn.Linear or Linear4bit layer{already}")
    if weights is None:
        meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
        if meta:
            raise ValueError(f"parameters {meta[:3]} are on the meta device: pass weights= to load them")
    for p in model.parameters():
        p.requires_grad_(False)
    already_4bit = [name for name, m in chosen if isinstance(m, Linear4bit)]
    if already_4bit and config.init_lora_weights == "loftq":
        raise ValueError(f"LoftQ needs the dense weights, and modules {already_4bit[:3]} are 4-bit already")
    calib = None
    if calibration is not None:
        if weights is not None:
            raise ValueError("calibration needs the model's weights in place (it runs the model): not with weights=")
        if already_4bit:
            raise ValueError(f"calibration needs dense target layers; modules {already_4bit[:3]} are 4-bit already")
        if config.init_lora_weights == "loftq":
            raise ValueError("calibration and LoftQ each choose the base's codes: use one of them")
        calib = _Calibration(model, [name for name, _ in chosen], calibration, calibration_damp, calibration_order,
                             progress)
    dense_bytes = quant_bytes = 0
    chosen = [name for name, _ in chosen]  # hold names only: each old layer dies when it is replaced
    for name in chosen:
        r, alpha = config.rank_and_alpha(name)
        linear = model.get_submodule(name)
        loftq = None
        if isinstance(linear, Linear4bit):  # loaded 4-bit already: adapters only, no second quantization
            base = linear
            dense_bytes += base.out_features * base.in_features * base.weight_dtype.itemsize
        else:
            if weights is not None:
                _materialize(name, linear, weights, cast=False, strict=True)
            if config.init_lora_weights == "loftq":
                if min(linear.in_features, linear.out_features) < r:
                    raise ValueError(f"LoftQ needs r <= min(in, out) features; module {name!r} is "
                                     f"{linear.out_features} x {linear.in_features}, r={r}")
                config_r = dataclasses.replace(config, r=r, lora_alpha=alpha)
                loftq = _loftq(linear, config_r, alpha / (r ** 0.5 if config.use_rslora else r))
            try:
                calibrated = None if calib is None else calib.quantize(
                    name, linear, config.codebook, config.blocksize, config.double_quant)
                base = Linear4bit.from_linear(linear, codebook=config.codebook, blocksize=config.blocksize,
                                              double_quant=config.double_quant)
                if calibrated is not None:
                    base.quantized = calibrated
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"cannot quantize module {name!r}: {exc}") from None
            dense_bytes += linear.weight.numel() * linear.weight.element_size()
        quant_bytes += base.quantized.nbytes
        if pager is not None:
            place_in_pager(base, pager, arena)  # now, so that loading too stays within the budget
        lora = LoraLinear4bit(base, r=r, lora_alpha=alpha, lora_dropout=config.lora_dropout,
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
    if config.embeddings_dtype is not None:
        _store_embeddings_in(model, config.embeddings_dtype)
    if config.gradient_checkpointing and enable_activation_checkpointing(model):
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    model._pyqlora_config = config
    model._pyqlora_targets = sorted({n.rpartition(".")[2] for n in chosen})
    _guard_save_pretrained(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # the 4-bit weights are uint8 parameters (codes + scales); count their elements, not their bytes
    storage = {id(p) for _, m in lora_layers(model) for p in m.base_layer.quant_parameters()}
    total = (sum(p.numel() for p in model.parameters() if id(p) not in storage)
             + sum(m.base_layer.quantized.size for _, m in lora_layers(model)))
    paging = BasePaging(model, pager, lookahead=lookahead) if pager is not None else None
    if pager is None and not hasattr(model, "_pyqlora_running_scales"):
        # in training only the running layer holds decoded block scales (a paged base does this itself)
        model._pyqlora_running_scales = RunningLayerScales(model)
    report = PrepareReport(list(chosen), trainable, total, dense_bytes, quant_bytes, already_4bit, paging)
    if calib is not None:
        report.calibration = calib.finish()
    return report


def load_4bit(folder, dtype=None, pager=None):
    """A transformers model from a 4-bit checkpoint folder in bitsandbytes' layout, its linear layers ``Linear4bit``.

    The folder is what ``pyqlora quantize``, :meth:`save_pretrained` of a transformers +
    bitsandbytes model, or ``pyqlora finetune`` (``OUT/base``) write: ``config.json`` with a
    bitsandbytes ``quantization_config`` (4-bit) and ``*.safetensors`` (sharded through
    ``model.safetensors.index.json`` or not). Neither bitsandbytes nor a GPU is needed.

    Parameters
    ----------
    folder : str or os.PathLike
    dtype : torch.dtype, default float32
        dtype of the dense parameters (embeddings, norms, the output head) and of the
        4-bit layers' computation.
    pager : pyqlora.Pager, optional
        A host pager: the 4-bit layers' packed codes, absmax and nested absmax are not read.
        Each is a read-only ``pager.map_file`` view of its bytes in the safetensors file (at
        the offsets its header gives), paged from the file itself under the pager's
        ``budget_bytes``, never copied into a spill file. Then call
        ``prepare_model(model, config, pager=pager)``, which prefetches each layer's bytes before
        it runs (``docs/pager.md``; ``pyqlora finetune --base-budget`` does both). An entry the
        kernels cannot use as stored (another dtype, an unaligned offset) is copied into pager
        memory instead, with a RuntimeWarning. The other tensors are read into ordinary memory.

    Returns
    -------
    transformers.PreTrainedModel, in eval mode

    Raises
    ------
    ValueError
        A folder without a 4-bit bitsandbytes ``quantization_config``, or whose files do not
        fit its configuration (the message names the file). FileNotFoundError: no weights.

    Examples
    --------
    >>> import pyqlora as pq
    >>> from pyqlora.lora import LoraConfig, load_4bit, prepare_model
    >>> pager = pq.Pager(budget_bytes=8 << 30, spill_dir="/var/tmp")       # doctest: +SKIP
    >>> model = load_4bit("llama-65b-nf4", pager=pager)                     # doctest: +SKIP
    >>> report = prepare_model(model, LoraConfig(r=16), pager=pager)        # doctest: +SKIP
    """
    import transformers

    from ._glue import checkpoint as _ckpt
    from ._glue.files import config_errors, error_text, read_config, read_safetensors

    folder = os.fspath(folder)
    dtype = dtype or torch.float32
    if pager is not None and not isinstance(pager, Pager):
        raise TypeError(f"pager must be a pyqlora.Pager or None, got {type(pager).__name__}")
    if pager is not None and pager.device != "cpu":
        raise ValueError(f"pager must be a host pager to page a checkpoint from its file, got one on {pager.device}")

    config_name = os.path.join(folder, "config.json")
    cfg = read_config(folder)
    quant = cfg.get("quantization_config")
    if not quant:
        raise ValueError(f"{config_name} has no quantization_config: {folder} holds a dense model (quantize it "
                         "with prepare_model, or write a 4-bit checkpoint with pyqlora quantize)")
    if quant.get("quant_method") != "bitsandbytes" or not quant.get("load_in_4bit", quant.get("_load_in_4bit")):
        raise ValueError(f"only bitsandbytes 4-bit checkpoints are supported, got quantization_config {quant}")
    plain = {k: v for k, v in cfg.items() if k != "quantization_config"}
    try:
        config = transformers.AutoConfig.for_model(**plain)
    except config_errors() as exc:
        raise ValueError(f"{config_name}: not a configuration transformers can read ({error_text(exc)})") from exc
    files = _ckpt.safetensors_files(folder)
    if not files:
        raise FileNotFoundError(f"{folder} holds no .safetensors weights")
    state, layout = {}, {}
    if pager is None:
        for f in files:
            state.update(read_safetensors(f))
    else:
        state, layout = _ckpt.read_for_pager(files)
    model = _ckpt.meta_model(config, config_name, [*state, *layout])
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
    model.eval()
    return model


def _place_from_file(model, layout, state, pager):
    """Give every Linear4bit of `model` its bytes as read-only `pager.map_file` views of the checkpoint.

    The entries are used as they are in the file; one that cannot be (a dtype or an alignment the
    kernels cannot use as it is) is read and copied into pager memory (``pager.empty``), and a
    RuntimeWarning names those. Returns ``{"mapped_bytes", "copied_bytes", "copied": [keys]}``.
    """
    import warnings

    import numpy as np

    from ._glue import checkpoint as _ckpt
    from ._glue.files import safetensors_tensor

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
            dt = _ckpt.mappable(dtype, off, nbytes, shape)
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


_TASK_TYPES = (("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
               ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"))


def _most_common(values, preferred):
    counts = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    top = max(counts.values())
    best = [v for v, c in counts.items() if c == top]
    return preferred if preferred in best else min(best)


def _model_origin(model):
    """(base_model_name_or_path, task_type) that a Hugging Face model tells about itself (None where it does not)."""
    name = getattr(getattr(model, "config", None), "name_or_path", None) or None
    task = next((t for suffix, t in _TASK_TYPES if type(model).__name__.endswith(suffix)), None)
    return (name if isinstance(name, str) else None), task


def save_adapter(model, directory, adapter_name="default", base_model_name_or_path=None, task_type=None,
                 revision=None):
    """Write the adapter in PEFT's format: adapter_config.json + adapter_model.safetensors.

    The config is complete for PEFT and ``AutoPeftModelForCausalLM``: ``peft_type``,
    ``r`` / ``lora_alpha`` (the most common values) with ``rank_pattern`` /
    ``alpha_pattern`` for the modules that differ, ``lora_dropout``, ``use_rslora``,
    ``target_modules``, ``task_type`` and ``base_model_name_or_path`` (the arguments, else
    the prepare config's, else what a Hugging Face model tells: its
    ``config.name_or_path`` and, from its class, e.g. ``CAUSAL_LM``), ``revision``.
    """
    from safetensors.torch import save_file

    _check_adapter_name(adapter_name)
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers: call prepare_model first")
    config = getattr(model, "_pyqlora_config", None) or LoraConfig()
    tensors, ranks, alphas, rslora = {}, {}, {}, set()
    for name, layer in layers:
        if adapter_name not in layer.lora_A:
            raise ValueError(f"module {name!r} has no adapter {adapter_name!r}")
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A[adapter_name].weight.detach().contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B[adapter_name].weight.detach().contiguous()
        r, alpha, scaling = layer.r[adapter_name], layer.lora_alpha[adapter_name], layer.scaling[adapter_name]
        ranks[name], alphas[name] = r, alpha
        kinds = {k for k, denom in (("plain", r), ("rslora", math.sqrt(r)))
                 if math.isclose(scaling, alpha / denom, rel_tol=1e-6)}
        if not kinds:
            raise ValueError(f"module {name!r}: scaling {scaling} is neither lora_alpha / r nor lora_alpha / sqrt(r) "
                             f"(r={r}, lora_alpha={alpha}); PEFT's config cannot express it")
        rslora.add(frozenset(kinds))
    use_rslora = config.use_rslora
    if not all(("rslora" if use_rslora else "plain") in k for k in rslora):
        use_rslora = not use_rslora
        if not all(("rslora" if use_rslora else "plain") in k for k in rslora):
            raise ValueError("some adapters scale by lora_alpha / r and others by lora_alpha / sqrt(r) (use_rslora); "
                             "PEFT's config has one use_rslora for all")
    r = _most_common(ranks.values(), config.r)
    alpha = _most_common(alphas.values(), config.lora_alpha)
    origin_name, origin_task = _model_origin(model)
    cfg = dataclasses.replace(
        config, r=r, lora_alpha=alpha, use_rslora=use_rslora,
        rank_pattern={n: v for n, v in ranks.items() if v != r},
        alpha_pattern={n: v for n, v in alphas.items() if v != alpha},
        base_model_name_or_path=base_model_name_or_path or config.base_model_name_or_path or origin_name,
        task_type=task_type or config.task_type or origin_task, revision=revision or config.revision)
    os.makedirs(directory, exist_ok=True)
    targets = getattr(model, "_pyqlora_targets", None) or sorted({n.rpartition(".")[2] for n, _ in layers})
    with open(os.path.join(directory, ADAPTER_CONFIG), "w") as f:
        json.dump(cfg.to_peft_dict(targets), f, indent=2, sort_keys=True)
    save_file(tensors, os.path.join(directory, ADAPTER_WEIGHTS), metadata={"format": "pt"})


def _save_pretrained_adapter(self, save_directory, *args, is_main_process=True, **kwargs):
    """``save_pretrained`` of a Hugging Face model prepared by :func:`prepare_model`: writes the LoRA adapter in
    PEFT's format (as ``PeftModel.save_pretrained`` does), which ``AutoPeftModelForCausalLM`` and
    ``from_pretrained`` (through ``base_model_name_or_path``) load. transformers' own method would write the
    4-bit base under keys (``...base_layer.weight``) and a config without ``quantization_config``: a folder that
    loads with every linear weight missing and freshly initialized."""
    if is_main_process:
        save_adapter(self, save_directory)


def _guard_save_pretrained(model):
    """Make ``model.save_pretrained`` (``Trainer.save_model`` calls it) write the adapter, for a transformers model."""
    if callable(getattr(model, "save_pretrained", None)) and not isinstance(
            model.__dict__.get("save_pretrained"), types.MethodType):
        model.save_pretrained = types.MethodType(_save_pretrained_adapter, model)


# PEFT's LoraConfig fields that change what an adapter computes (LoRA variants, a bias on
# lora_B, replicated layers). Ignoring one would load an adapter that computes something
# else, so only their neutral values (absent, null, false, empty) are accepted.
_UNSUPPORTED_FIELDS = {
    "use_dora": "DoRA", "lora_bias": "a bias on lora_B", "use_qalora": "QALoRA",
    "alora_invocation_tokens": "Activated LoRA", "velora_config": "VeLoRA", "monteclora_config": "MonteCLoRA",
    "use_bdlora": "BD-LoRA", "arrow_config": "Arrow routing", "kasa_config": "KaSA",
    "layer_replication": "layer replication",
}


# peft.LoraConfig fields that prepare_model cannot honour: (neutral value, what it is)
_PREPARE_REFUSES = {
    **{field: (False, what) for field, what in _UNSUPPORTED_FIELDS.items()},
    "bias": ("none", "trained biases"),
    "fan_in_fan_out": (False, "Conv1D-style weights"),
    "modules_to_save": (None, "fully trained extra modules: prepare_model trains the adapters only"),
    "layers_to_transform": (None, "a subset of layers"),
    "layers_pattern": (None, "a subset of layers"),
    "trainable_token_indices": (None, "trainable tokens"),
    "target_parameters": (None, "LoRA on parameters"),
    "megatron_config": (None, "Megatron layers"),
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
    layers = dict(lora_layers(model))
    cfg, plan = _checked_adapter(layers, directory, adapter_name)
    _apply_adapter(layers, plan, cfg, adapter_name)
    return model


def check_adapter(model, directory, adapter_name="default"):
    """Read the PEFT LoRA adapter in `directory` and check it against `model` as :func:`load_adapter`
    does, changing nothing.

    Returns
    -------
    dict
        ``{module name: (lora_A, lora_B, r, lora_alpha, scaling)}`` for every LoRA layer of the
        model: the tensors converted to the dtype and device they would be copied to, and the
        layer's r, alpha and scaling from the adapter's config.

    Raises
    ------
    FileNotFoundError, ValueError
        As :func:`load_adapter`.
    """
    cfg, plan = _checked_adapter(dict(lora_layers(model)), directory, adapter_name)
    return {name: (a, b, r, alpha, alpha / (math.sqrt(r) if cfg.use_rslora else r))
            for name, (a, b, r, alpha) in plan.items()}


def _checked_adapter(layers, directory, adapter_name):
    _check_adapter_name(adapter_name)
    cfg_path, w_path = os.path.join(directory, ADAPTER_CONFIG), os.path.join(directory, ADAPTER_WEIGHTS)
    for path in (cfg_path, w_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"adapter file not found: {path}" +
                                    (" (not a regular file)" if os.path.exists(path) else ""))
    cfg = _read_adapter_config(cfg_path)
    tensors = _read_adapter_tensors(w_path)
    if not layers:
        raise ValueError("the model has no LoRA layers: call prepare_model first")
    return cfg, _plan_adapter(layers, tensors, cfg, w_path, adapter_name)


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
