"""QLoRA layers for PyTorch: a frozen 4-bit linear layer and LoRA adapters on it.

The base weight is a :class:`pyqlora.QuantizedArray` (NF4 + double quantization
by default); the forward and backward passes read it with nf4core (a fused 4-bit
product for a few rows; for many rows of bfloat16 the AMX tile product where the CPU
has AMX, else tiles decoded for torch's matmul), so no dense
copy of the whole weight exists and autograd saves nothing but the input of the
adapters. State dicts use the
bitsandbytes/transformers 4-bit keys.

The packed codes and block scales are frozen ``uint8`` parameters of the
layer (``weight``, ``weight_absmax``, ``weight_nested_absmax``; float32 scales
are stored as their bytes) and the format's metadata lives on the module, so
``torch.distributed.fsdp.fully_shard`` can shard and all-gather them as bytes:
FSDP2 never casts a non-floating parameter under a ``MixedPrecisionPolicy``
(see ``docs/distributed.md``).

Requires ``pip install "pyqlora[torch]"``.
"""
import math

import numpy as np
import torch
from torch import nn

from ._array import QuantizedArray
from ._formats import DQ_BLOCKSIZE, check_blocksize, check_codebook
from ._glue.dtensor import is_dtensor
from ._glue.products import choose_path, fused_linear, fused_product, tiled_product_torch
from ._glue.tensors import as_numpy, byte_view, dequantize_weight, numpy_dtype, torch_dtype
from ._matmul import fused_matrix
from ._quantize import quantize

__all__ = ["Linear4bit", "LoraLinear4bit", "dequantize_weight"]


_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _same_device(x, q):
    """A clear error where the input and the 4-bit weight live on different devices."""
    if isinstance(q, QuantizedArray):
        if x.device.type == "cpu":
            return
        qdev = "cpu"
    else:
        qdev = q.device
    if x.device != torch.device(qdev):
        raise ValueError(f"the input is on {x.device} but the 4-bit weight is on {qdev}; move the layer to the "
                         f"input's device first (layer.to({str(x.device)!r}))")


def _cuda_dense(q, dtype):
    """The dequantized weight of a CudaQuantizedArray on its device, in `dtype`."""
    from . import _cuda

    if dtype in _CUDA_DTYPES:
        return _cuda.dequantize(q, dtype=dtype)
    return _cuda.dequantize(q, dtype=torch.float32).to(dtype)  # float64: the kernels compute in float32


def _cuda_product(x, q, bias):
    """x W^T + b on a CUDA device: the 4-bit GEMV for up to 8 rows (token-by-token
    generation), else W dequantized once into x's dtype for torch's matmul."""
    from . import _cuda

    rows = x.numel() // max(x.shape[-1], 1)
    if 1 <= rows <= 8 and x.dtype in _CUDA_DTYPES:
        y = _cuda.gemv(x.detach().reshape(rows, x.shape[-1]), q).reshape(*x.shape[:-1], q.shape[0])
        return y if bias is None else y + bias.to(x.dtype)
    return torch.nn.functional.linear(x.detach(), _cuda_dense(q, x.dtype), None if bias is None else bias.to(x.dtype))


def _product(x, q, bias):
    """x W^T + b, W the QuantizedArray `q`: fused (few rows), tiled (many) or a temporary dense W."""
    _same_device(x, q)
    if not isinstance(q, QuantizedArray):
        return _cuda_product(x, q, bias)
    path = choose_path(x, q)
    if path != "dense":
        x = x.detach().contiguous()
        y = fused_product(x, q, transpose=True) if path == "fused" else tiled_product_torch(x, q, True)
        return y if bias is None else y + bias.to(x.dtype)
    w = dequantize_weight(q, x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


class _Linear4bitFunction(torch.autograd.Function):
    """y = x W^T + b with W 4-bit. Saves no tensor: backward reads the 4-bit weight
    again (fused product for a few rows or on AMX, else tiles decoded for torch's matmul;
    ``pyqlora._glue.products`` chooses).

    The layer, not its QuantizedArray, is kept for backward: under FSDP2 the
    gathered weight is freed after forward and gathered again (maybe at another
    address) before backward, so backward must look the storage up anew."""

    @staticmethod
    def forward(ctx, x, layer, bias):
        ctx.layer = layer
        ctx.bias_requires_grad = bias is not None and bias.requires_grad
        return _product(x, layer.quantized, bias)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:  # grad_input = grad_output . W
            q = ctx.layer.quantized
            path = choose_path(grad_out, q, transpose=False) if isinstance(q, QuantizedArray) else "cuda"
            if path == "cuda":
                grad_x = grad_out @ _cuda_dense(q, grad_out.dtype)
            elif path == "fused":
                grad_x = fused_product(grad_out, q, transpose=False)
            elif path == "tiled":
                grad_x = tiled_product_torch(grad_out.contiguous(), q, False)
            else:
                grad_x = grad_out @ dequantize_weight(q, grad_out.dtype)
        if ctx.bias_requires_grad:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, grad_bias


def _meta_param(rows, width):
    """A frozen uint8 parameter of shape (rows, width) on the meta device (no storage)."""
    return nn.Parameter(torch.empty(rows, width, dtype=torch.uint8, device="meta"), requires_grad=False)


def _byte_param(a, width):
    """A frozen uint8 parameter of shape (len(a), width) over the bytes of numpy array `a` (no copy)."""
    t = torch.from_numpy(np.ascontiguousarray(a).reshape(-1).view(np.uint8)).view(-1, width)
    return nn.Parameter(t, requires_grad=False)


_STORAGE = ("weight", "weight_absmax", "weight_nested_absmax")


def _aligned(a):
    """`a` if its data is 4-byte aligned (for a float32 view), else an aligned copy."""
    return a if a.ctypes.data % 4 == 0 else a.copy()


class Linear4bit(nn.Module):
    """A frozen linear layer whose weight is stored in 4 bits.

    Parameters
    ----------
    in_features, out_features : int
    bias : bool
    codebook : {"nf4", "fp4", "int4", "nf2", "nf3"}
    blocksize : int
    double_quant : bool
        NF4 + double quantization + blocksize 64 is QLoRA's recipe and the default.
    compute_dtype : torch.dtype, optional
        The dtype of the matmul; by default the input's (or the CPU autocast dtype).
    dtype : torch.dtype
        The dtype of the bias and of the weight before quantization.
    device : "meta", optional
        ``"meta"`` builds the layer without storage (no memory): its state dict then
        holds ``weight`` (and ``bias``) as meta tensors, and the weight is set later by
        assigning :attr:`quantized` (``pyqlora.hf`` loads checkpoints this way).

    Build one from an existing layer with :meth:`from_linear`; a layer built
    with the constructor holds a zero weight until a state dict is loaded.
    State dicts use bitsandbytes' keys, which exist for NF4 and FP4 only:
    ``state_dict()`` of an INT4 or NF2/NF3 layer raises ValueError.

    Examples
    --------
    >>> import torch, pyqlora.nn as qnn
    >>> dense = torch.nn.Linear(128, 64)
    >>> layer = qnn.Linear4bit.from_linear(dense)
    >>> layer(torch.randn(2, 128)).shape
    torch.Size([2, 64])
    >>> sorted(layer.state_dict())[:3]
    ['bias', 'weight', 'weight.absmax']
    """

    def __init__(self, in_features, out_features, bias=True, codebook="nf4", blocksize=64, double_quant=True,
                 compute_dtype=None, dtype=torch.float32, device=None):
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features and out_features must be positive, got {in_features}, {out_features}")
        meta = device is not None and torch.device(device).type == "meta"
        if device is not None and not meta and torch.device(device).type != "cpu":
            raise ValueError(f"device must be None, 'cpu' or 'meta', got {device!r}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.codebook, self.blocksize, self.double_quant = codebook, blocksize, double_quant
        self.compute_dtype = compute_dtype
        # an all-zero weight, built in its quantized form (no dense allocation)
        n, nb = self.out_features * self.in_features, -(-self.out_features * self.in_features // blocksize)
        self._q_cache = None
        if meta:
            check_codebook(codebook)
            check_blocksize(blocksize)
            self.weight = _meta_param((n + 1) // 2, 1)
            self.weight_absmax = _meta_param(nb, 1 if double_quant else 4)
            self.weight_nested_absmax = _meta_param(-(-nb // DQ_BLOCKSIZE), 4) if double_quant else None
            self._q_meta = {"shape": (self.out_features, self.in_features), "dtype": numpy_dtype(dtype),
                            "codebook": codebook, "blocksize": blocksize, "double_quant": bool(double_quant),
                            "nested_offset": 0.0 if double_quant else None}
            self.bias = nn.Parameter(torch.zeros(self.out_features, dtype=dtype, device="meta"),
                                     requires_grad=False) if bias else None
            return
        self.quantized = QuantizedArray(
            shape=(self.out_features, self.in_features), dtype=numpy_dtype(dtype), codebook=codebook,
            blocksize=blocksize,
            packed=np.zeros((n + 1) // 2, np.uint8),
            absmax=np.zeros(nb, np.uint8 if double_quant else np.float32),
            nested_absmax=np.zeros(-(-nb // DQ_BLOCKSIZE), np.float32) if double_quant else None,
            nested_offset=0.0 if double_quant else None)
        self.bias = nn.Parameter(torch.zeros(self.out_features, dtype=dtype), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear, codebook="nf4", blocksize=64, double_quant=True, compute_dtype=None):
        """Quantize an ``nn.Linear`` (its weight is read in place; no dense copy is kept)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected torch.nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        if w.device.type not in ("cpu", "cuda"):
            raise TypeError(f"the weight is on {w.device}; CPU and CUDA tensors are supported")
        if w.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise TypeError(f"cannot quantize a {w.dtype} weight")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.codebook, layer.blocksize, layer.double_quant = codebook, blocksize, double_quant
        layer.compute_dtype = compute_dtype
        layer._q_cache = None
        if w.device.type == "cuda":
            # quantized by the CUDA kernels (the CPU's bytes), stored on the weight's device
            q = quantize(w if w.dtype != torch.float64 else w.float(), codebook=codebook, blocksize=blocksize,
                         double_quant=double_quant)
            layer.quantized = q.cpu()
            layer._q_meta["dtype"] = numpy_dtype(w.dtype)
            layer._move_storage(w.device)
        else:
            layer.quantized = quantize(as_numpy(w.contiguous()), codebook=codebook, blocksize=blocksize,
                                       double_quant=double_quant)
        layer.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    # -- storage: uint8 parameters + metadata, viewed as a QuantizedArray -------
    @property
    def quantized(self):
        """The weight as a :class:`pyqlora.QuantizedArray` viewing this layer's parameters (no copy).

        Raises RuntimeError while FSDP2 holds the parameters sharded (outside
        forward/backward); gather them first (``model.unshard()``).
        """
        params = self._parameters  # not self.weight: Module.__getattr__ costs a microsecond per name
        tensors = (params["weight"], params["weight_absmax"], params.get("weight_nested_absmax"))
        key = tuple(None if t is None else (id(t), t.data_ptr(), t._version) for t in tensors)
        cache = self._q_cache
        if cache is not None and cache[0] == key:
            return cache[1]
        if any(is_dtensor(t) for t in tensors):
            raise RuntimeError("the 4-bit weight of this Linear4bit is sharded by FSDP; it can be read only "
                               "inside forward/backward or after model.unshard()")
        if self.weight.device.type == "meta":
            raise RuntimeError("this Linear4bit was built on the meta device and holds no weight yet: assign "
                               "`quantized` or load a state dict")
        devices = {t.device for t in tensors if t is not None}
        if len(devices) > 1:
            raise RuntimeError(f"the 4-bit weight's parameters are on different devices ({sorted(map(str, devices))}); "
                               "move the layer with .to(device)")
        meta = self._q_meta
        if self.weight.device.type == "cuda":
            q = self._cuda_view(tensors, meta)
            self._q_cache = [key, q, None]
            return q
        if self.weight.device.type != "cpu":
            raise TypeError(f"the 4-bit weight is on {self.weight.device}; CPU and CUDA storage are supported")
        absmax = byte_view(self.weight_absmax)
        nested = None
        if meta["double_quant"]:
            nested = _aligned(byte_view(self.weight_nested_absmax)).view(np.float32)
        else:
            absmax = _aligned(absmax).view(np.float32)
        q = QuantizedArray(shape=meta["shape"], dtype=meta["dtype"], codebook=meta["codebook"],
                           blocksize=meta["blocksize"], packed=byte_view(self.weight),
                           absmax=absmax, nested_absmax=nested, nested_offset=meta["nested_offset"])
        self._q_cache = [key, q, None]  # [2]: its fused_matrix, made on the first inference product
        return q

    @staticmethod
    def _cuda_view(tensors, meta):
        """The parameters on a CUDA device as a CudaQuantizedArray (views, no copy)."""
        from ._cuda import CudaQuantizedArray

        packed, absmax, nested = (None if t is None else t.detach().reshape(-1) for t in tensors)
        if meta["double_quant"]:
            nested = nested.view(torch.float32)
        else:
            absmax = absmax.view(torch.float32)
        return CudaQuantizedArray(shape=meta["shape"], dtype=torch_dtype(meta["dtype"]), codebook=meta["codebook"],
                                  blocksize=meta["blocksize"], packed=packed, absmax=absmax, nested_absmax=nested,
                                  nested_offset=meta["nested_offset"])

    @quantized.setter
    def quantized(self, q):
        if not isinstance(q, QuantizedArray):
            raise TypeError(f"quantized must be a QuantizedArray, got {type(q).__name__}")
        # bitsandbytes' Params4bit shape for the codes: (ceil(n / 2), 1) bytes
        self.weight = _byte_param(q.packed, 1)
        self.weight_absmax = _byte_param(q.absmax, q.absmax.itemsize)
        self.weight_nested_absmax = _byte_param(q.nested_absmax, 4) if q.double_quant else None
        self._q_meta = {"shape": q.shape, "dtype": q.dtype, "codebook": q.codebook, "blocksize": q.blocksize,
                        "double_quant": q.double_quant, "nested_offset": q.nested_offset}
        self.codebook, self.blocksize, self.double_quant = q.codebook, q.blocksize, q.double_quant
        self._q_cache = None

    def __getstate__(self):  # pickle / deepcopy: the cached view would duplicate the bytes
        state = self.__dict__.copy()
        state["_q_cache"] = None
        return state

    def drop_caches(self):
        """Forget the cached QuantizedArray view, its decoded float32 block scales and the fused kernel's
        arguments; they are rebuilt from the parameters on the next use (microseconds, plus decoding
        the scales of a double-quantized weight). A paged base (``prepare_model(pager=)``) calls it
        when the next layer runs, so that the decoded scales, an eighth of the codes' bytes, are held
        for the running layer only."""
        self._q_cache = None

    def quant_parameters(self):
        """The frozen uint8 parameters holding the 4-bit weight (codes, scales, nested scales)."""
        return [t for t in (self.weight, self.weight_absmax, self.weight_nested_absmax) if t is not None]

    @property
    def weight_dtype(self):
        """The dtype the weight had before quantization (what dequantize_weight() gives by default)."""
        return torch_dtype(self._q_meta["dtype"])

    def dequantized_weight(self, dtype=None):
        q = self.quantized
        if not isinstance(q, QuantizedArray):
            return _cuda_dense(q, dtype or self.weight_dtype)
        return dequantize_weight(q, dtype or self.weight_dtype)

    def input_dtype(self, x):
        """The dtype this layer computes input `x` in: ``compute_dtype`` if set, else autocast's, else x's."""
        dtype = self.compute_dtype
        if dtype is None and x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        return dtype or x.dtype

    def forward(self, x):
        dtype = self.input_dtype(x)
        if x.dtype != dtype:
            x = x.to(dtype)
        if x.device.type not in ("cpu", "cuda"):
            raise TypeError(f"Linear4bit runs on CPU and CUDA tensors; got one on {x.device}")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input with last dimension {self.in_features}, got shape {tuple(x.shape)}")
        bias = self.bias
        if not torch.is_grad_enabled() or not (x.requires_grad or (bias is not None and bias.requires_grad)):
            # nothing to differentiate: skip autograd's bookkeeping
            q = self.quantized
            if x.device.type != "cpu" or not isinstance(q, QuantizedArray):
                return _product(x, q, bias)
            if q.size and choose_path(x, q) == "fused":  # decode: the kernel with arguments checked once
                cache = self._q_cache
                if cache[2] is None:
                    cache[2] = fused_matrix(q)
                y = fused_linear(x, cache[2])
                return y if bias is None else y + bias.to(x.dtype)
            return _product(x, q, bias)
        return _Linear4bitFunction.apply(x, self, bias)

    def extra_repr(self):
        dq = ", double_quant" if self.double_quant else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"codebook={self.codebook!r}, blocksize={self.blocksize}{dq}")

    # -- bitsandbytes / transformers state-dict keys -----------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        if self.weight.device.type == "meta":
            # not loaded yet (built with device="meta"): the packed weight only, as bitsandbytes' layer
            # lists it before loading; its quant-state entries are read with it (pyqlora.hf)
            destination[prefix + "weight"] = self.weight if keep_vars else self.weight.detach()
            return
        if any(is_dtensor(t) for t in self.quant_parameters()):
            # Sharded by FSDP2: give the byte shards under their own names, as DTensors, so that
            # torch.distributed.checkpoint can gather or reshard them; _load_from_state_dict reads both.
            for name in _STORAGE:
                t = getattr(self, name)
                if t is not None:
                    destination[prefix + name] = t if keep_vars else t.detach()
            return
        q = self.quantized
        if not isinstance(q, QuantizedArray):  # on a CUDA device: the state dict is written from a host copy
            q = q.cpu()
        for k, v in q.to_bnb_dict(prefix + "weight").items():
            destination[k] = torch.from_numpy(v)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        wkey = prefix + "weight"
        native = prefix + "weight_absmax" in state_dict  # the byte layout written while sharded
        if native:
            ours = {prefix + n: state_dict[prefix + n] for n in _STORAGE if prefix + n in state_dict}
            self._load_storage(ours, prefix, missing_keys, error_msgs)
        else:
            ours = {k: v for k, v in state_dict.items() if k == wkey or k.startswith(wkey + ".")}
        if native:
            pass
        elif wkey not in state_dict:
            missing_keys.append(wkey)
        else:
            try:
                q = QuantizedArray.from_bnb_dict(ours, prefix=wkey)
            except ValueError as exc:
                error_msgs.append(f"{wkey}: {exc}")
                q = None
            if q is not None:
                if q.shape != (self.out_features, self.in_features):
                    error_msgs.append(f"{wkey}: shape {q.shape} does not match ({self.out_features}, "
                                      f"{self.in_features})")
                else:
                    device = self.weight.device
                    self.quantized = q
                    self.codebook, self.blocksize, self.double_quant = q.codebook, q.blocksize, q.double_quant
                    if device.type == "cuda":  # a layer on a GPU stays there
                        self._move_storage(device)
        bkey = prefix + "bias"
        if self.bias is not None:
            if bkey in state_dict and tuple(state_dict[bkey].shape) != tuple(self.bias.shape):
                error_msgs.append(f"{bkey}: shape {tuple(state_dict[bkey].shape)} does not match "
                                  f"{tuple(self.bias.shape)}")
            elif bkey in state_dict:
                with torch.no_grad():
                    self.bias.copy_(state_dict[bkey])
            else:
                missing_keys.append(bkey)
        elif bkey in state_dict:
            unexpected_keys.append(bkey)
        for k in state_dict:
            if k.startswith(prefix) and k not in ours and k != bkey and "." not in k[len(prefix):]:
                unexpected_keys.append(k)

    def _move_storage(self, device):
        """The 4-bit parameters (codes, scales, nested scales) copied to `device`."""
        for name in _STORAGE:
            t = self._parameters.get(name)
            if t is not None:
                self._parameters[name] = nn.Parameter(t.detach().to(device), requires_grad=False)
        self._q_cache = None

    def _load_storage(self, entries, prefix, missing_keys, error_msgs):
        """Copy the byte layout written while sharded (weight, weight_absmax, ...) into the parameters."""
        for name in _STORAGE:
            t, key = getattr(self, name), prefix + name
            if t is None:
                continue
            if key not in entries:
                missing_keys.append(key)
            elif tuple(entries[key].shape) != tuple(t.shape) or entries[key].dtype != t.dtype:
                error_msgs.append(f"{key}: {entries[key].dtype} {tuple(entries[key].shape)} does not match the "
                                  f"layer's {t.dtype} {tuple(t.shape)} (same codebook/blocksize/double_quant needed)")
            else:
                with torch.no_grad():
                    t.copy_(entries[key])
        self._q_cache = None


class LoraLinear4bit(nn.Module):
    """A :class:`Linear4bit` base plus LoRA adapters, laid out like PEFT's LoRA layer.

    ``y = base(x) + sum over active adapters of B(A(dropout(x))) * scaling`` with
    ``scaling = lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` with ``use_rslora``);
    A is Kaiming-uniform and B zero at creation, as in PEFT, so a new adapter
    leaves the output unchanged. Attribute names (``base_layer``, ``lora_A``,
    ``lora_B``, ``lora_dropout``) match PEFT so adapter keys map one to one.
    """

    def __init__(self, base_layer, r=8, lora_alpha=8, lora_dropout=0.0, use_rslora=False, adapter_name="default",
                 lora_dtype=torch.float32):
        super().__init__()
        if not isinstance(base_layer, Linear4bit):
            raise TypeError(f"base_layer must be a Linear4bit, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.lora_A, self.lora_B, self.lora_dropout = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        self.scaling, self.r, self.lora_alpha = {}, {}, {}
        self.active_adapters = []
        self.add_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora, lora_dtype)

    @property
    def in_features(self):
        return self.base_layer.in_features

    @property
    def out_features(self):
        return self.base_layer.out_features

    def add_adapter(self, name, r=8, lora_alpha=8, lora_dropout=0.0, use_rslora=False, lora_dtype=torch.float32):
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be a positive integer, got {r!r}")
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} exists already")
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, dtype=lora_dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, dtype=lora_dtype)
        self.lora_dropout[name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        # PEFT's init: A ~ kaiming_uniform(a=sqrt(5)), B = 0
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)
        self.r[name], self.lora_alpha[name] = r, lora_alpha
        self.scaling[name] = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.active_adapters.append(name)

    def set_adapter(self, names):
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in self.lora_A]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; this layer has {list(self.lora_A)}")
        self.active_adapters = names

    def forward(self, x):
        lead = x.shape[:-1]
        if x.dim() > 2:  # rows flattened: the base's 2-D output can take the adapters' sum in place
            x = x.reshape(-1, x.shape[-1])
        result = self.base_layer(x)
        # The base's output is a fresh tensor that its backward does not read, so each
        # adapter's s (h A^T) B^T is added into it by one addmm_: no product, scaled copy
        # and sum as three more output-sized tensors in forward, nor a scaled gradient in
        # backward (docs/scale.md, "The heap at 1 x 512"). Autocast, other dtypes, and a
        # base with forward hooks (which may keep its output; pyqlora's own paging hooks, marked
        # output_untouched, do not) take PEFT's expression, and so does a view (autograd forbids
        # modifying a custom Function's view output in place).
        in_place = (type(result) is torch.Tensor and result.dim() == 2 and result.is_contiguous()
                    and result._base is None and not torch.is_autocast_enabled(result.device.type)
                    and all(getattr(h, "output_untouched", False) for h in self.base_layer._forward_hooks.values()))
        for name in self.active_adapters:
            a, b = self.lora_A[name], self.lora_B[name]
            h = self.lora_dropout[name](x.to(a.weight.dtype))
            t = a(h)
            if in_place and b.bias is None and t.dtype == b.weight.dtype == result.dtype:
                result = result.addmm_(t, b.weight.t(), alpha=self.scaling[name])
            else:
                result = result + (b(t) * self.scaling[name]).to(result.dtype)
        return result.reshape(*lead, result.shape[-1]) if len(lead) > 1 else result

    def delta_weight(self, name="default"):
        """B A * scaling, the adapter's contribution to the weight (out, in)."""
        return (self.lora_B[name].weight @ self.lora_A[name].weight) * self.scaling[name]

    def extra_repr(self):
        return f"adapters={list(self.lora_A)}, active={self.active_adapters}"
