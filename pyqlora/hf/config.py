"""``PyqloraConfig``: the ``quantization_config`` that makes transformers build pyqlora's 4-bit layers."""
import torch
from transformers import BitsAndBytesConfig
from transformers.utils.quantization_config import QuantizationConfigMixin

import pyqlora as pq
from pyqlora._formats import check_blocksize

__all__ = ["PyqloraConfig", "resolve_compute_dtype"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# bitsandbytes' checkpoint keys exist for these two codebooks only (docs/format.md, section 5)
_CODEBOOKS = ("nf4", "fp4")


def _dtype_name(value, what):
    if value is None or value == "auto":
        return None
    if isinstance(value, torch.dtype):
        name = str(value).replace("torch.", "")
    elif isinstance(value, str):
        name = value.replace("torch.", "")
    else:
        raise TypeError(f"{what} must be None, 'auto', a torch dtype or its name, got {type(value).__name__}")
    if name not in _DTYPES:
        raise ValueError(f"{what} must be one of {sorted(_DTYPES)} (or None/'auto'), got {value!r}")
    return name


def resolve_compute_dtype(config, device=None):
    """The torch dtype the 4-bit layers compute in: ``config.compute_dtype``, or the hardware rule
    (:func:`pyqlora.default_compute_dtype`: bfloat16 only where the CPU or the CUDA device computes it)."""
    name = _dtype_name(config.compute_dtype, "compute_dtype")
    if name is None:
        cuda_bf16 = (device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available()
                     and torch.cuda.is_bf16_supported())
        name = pq.default_compute_dtype(cuda_bf16=cuda_bf16)[0]
    return _DTYPES[name]


class PyqloraConfig(QuantizationConfigMixin):
    """Quantize a transformers model into :class:`pyqlora.nn.Linear4bit` layers while it loads.

    ``AutoModelForCausalLM.from_pretrained(path, quantization_config=PyqloraConfig())``
    is bitsandbytes' ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True)`` recipe with pyqlora's layers (``import pyqlora.hf``
    registers it). Checkpoints are saved in bitsandbytes' format, which stock
    transformers + bitsandbytes load: :meth:`to_dict` (what ``config.json`` receives)
    is the ``quantization_config`` bitsandbytes writes.

    Parameters
    ----------
    codebook : {"nf4", "fp4"}
        The 4-bit data type (bitsandbytes' ``bnb_4bit_quant_type``).
    blocksize : int
        Values per absmax scale (64 is QLoRA's and bitsandbytes' choice).
    double_quant : bool
        Quantize the scales too (``bnb_4bit_use_double_quant``).
    compute_dtype : None, "auto", "float32", "bfloat16", "float16" or a torch dtype
        The dtype the 4-bit layers multiply in. None (or "auto"): bfloat16 where the
        hardware computes it natively (:func:`pyqlora.default_compute_dtype`), float32
        elsewhere. Each layer's output has this dtype.
    skip_modules : list of str, optional
        Linear layers to keep dense besides the output head (names or name suffixes,
        as bitsandbytes' ``llm_int8_skip_modules``).

    Examples
    --------
    >>> from pyqlora.hf import PyqloraConfig
    >>> PyqloraConfig(compute_dtype="float32")
    PyqloraConfig(codebook='nf4', blocksize=64, double_quant=True, compute_dtype='float32', skip_modules=None)
    >>> d = PyqloraConfig(compute_dtype="float32").to_dict()
    >>> d["quant_method"] == "bitsandbytes", d["bnb_4bit_quant_type"], d["bnb_4bit_use_double_quant"]
    (True, 'nf4', True)
    """

    def __init__(self, codebook="nf4", blocksize=64, double_quant=True, compute_dtype=None, skip_modules=None,
                 **kwargs):
        kwargs.pop("quant_method", None)
        if kwargs:
            raise TypeError(f"PyqloraConfig got unexpected arguments {sorted(kwargs)}")
        self.quant_method = "pyqlora"
        if not isinstance(codebook, str) or codebook.lower() not in _CODEBOOKS:
            raise ValueError(f"codebook must be one of {_CODEBOOKS} (the 4-bit types bitsandbytes checkpoints hold), "
                             f"got {codebook!r}")
        self.codebook = codebook.lower()
        self.blocksize = check_blocksize(blocksize)
        if not isinstance(double_quant, bool):
            raise TypeError(f"double_quant must be True or False, got {double_quant!r}")
        self.double_quant = double_quant
        self.compute_dtype = _dtype_name(compute_dtype, "compute_dtype")
        if skip_modules is not None:
            if isinstance(skip_modules, str) or not all(isinstance(m, str) for m in skip_modules):
                raise TypeError(f"skip_modules must be a list of module names, got {skip_modules!r}")
            skip_modules = list(skip_modules)
        self.skip_modules = skip_modules
        # set by the quantizer once a model is loaded: the linear layers it left dense, and the
        # compute dtype it chose (written into config.json as bitsandbytes' fields)
        self.modules_not_converted = None
        self.resolved_compute_dtype = None

    def __repr__(self):
        return (f"PyqloraConfig(codebook={self.codebook!r}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, compute_dtype={self.compute_dtype!r}, "
                f"skip_modules={self.skip_modules!r})")

    @classmethod
    def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
        """From our own fields, or from a bitsandbytes 4-bit ``quantization_config`` (what :meth:`to_dict` writes)."""
        d = dict(config_dict)
        if d.get("quant_method") == "bitsandbytes" or "bnb_4bit_quant_type" in d:
            if d.get("load_in_8bit") or d.get("_load_in_8bit"):
                raise ValueError("a bitsandbytes 8-bit quantization_config cannot be loaded into pyqlora's 4-bit "
                                 "layers")
            d = {"codebook": d.get("bnb_4bit_quant_type", "fp4"),  # bitsandbytes' default type
                 "double_quant": bool(d.get("bnb_4bit_use_double_quant", False)),
                 "compute_dtype": d.get("bnb_4bit_compute_dtype"),
                 "skip_modules": d.get("llm_int8_skip_modules")}
        else:
            if d.get("load_in_8bit") or d.get("_load_in_8bit"):
                raise ValueError("quant_method 'pyqlora' is 4-bit; load_in_8bit cannot be honoured")
            d = {k: v for k, v in d.items() if k not in ("modules_not_converted", "resolved_compute_dtype",
                                                         "load_in_4bit", "_load_in_4bit", "load_in_8bit",
                                                         "_load_in_8bit")}
        return super().from_dict(d, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def to_bitsandbytes(self):
        """The equivalent ``transformers.BitsAndBytesConfig`` (what a checkpoint saved with this config declares)."""
        skip = self.modules_not_converted if self.modules_not_converted is not None else self.skip_modules
        compute = self.resolved_compute_dtype or self.compute_dtype or "float32"
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.codebook,
                                  bnb_4bit_use_double_quant=self.double_quant,
                                  bnb_4bit_compute_dtype=_DTYPES[compute],
                                  llm_int8_skip_modules=None if skip is None else sorted(skip))

    def to_dict(self):
        """bitsandbytes' ``quantization_config`` for this setting: saved checkpoints declare the format they hold,
        so stock transformers + bitsandbytes load them (the block size is stored with each tensor)."""
        return self.to_bitsandbytes().to_dict()

    def to_diff_dict(self):
        return self.to_dict()

    def __iter__(self):
        yield from self.to_dict().items()

    def get_loading_attributes(self):
        return {}
