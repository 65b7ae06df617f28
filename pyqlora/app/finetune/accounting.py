"""The optimizer of a run and what its memory report counts (optimizer state, 4-bit bytes)."""
import torch

from ..._glue import memory
from .config import OPTIMIZERS, SetupError

__all__ = ["make_optimizer", "nf4_dq_bytes", "nf4_dq_model_bytes", "optimizer_state_bytes"]


def make_optimizer(name, params, lr, weight_decay=0.0):
    """AdamW (torch), or pyqlora's PagedAdamW / PagedAdamW8bit; never a silent substitute."""
    params = list(params)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    if name not in OPTIMIZERS:
        raise ValueError(f"--optimizer must be one of {OPTIMIZERS}, got {name!r}")
    try:
        from pyqlora import optim
    except ImportError as exc:
        raise SetupError(f"--optimizer {name} needs pyqlora.optim, which cannot be imported here ({exc}); "
                           "use --optimizer adamw") from None
    cls = optim.PagedAdamW if name == "paged_adamw" else optim.PagedAdamW8bit
    return cls(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)


def optimizer_state_bytes(optimizer):
    """Bytes of the optimizer's state: ``state_bytes()`` when it counts its own (the paged
    optimizers: their moments), else every state tensor (``pyqlora._glue.memory``)."""
    return memory.optimizer_state_bytes(optimizer, own_count=True)


def nf4_dq_bytes(n, blocksize=64):
    """Bytes of `n` weights in NF4 with double quantization (codes, 8-bit scales, nested scales, offset)."""
    nb = -(-n // blocksize)
    return -(-n // 2) + nb + 4 * -(-nb // 256) + 4  # nested scales: one float32 per 256 (bitsandbytes)


def nf4_dq_model_bytes(pinfo, cfg):
    """Base weights with the linear layers in NF4 + DQ (blocksize 64) and the rest in bf16."""
    if cfg.base == "4bit" and cfg.codebook == "nf4" and cfg.double_quant and cfg.blocksize == 64:
        lin = pinfo["quantized_linear_bytes"]
    else:
        lin = sum(nf4_dq_bytes(n, 64) for n in pinfo["linear_sizes"])
    return lin + 2 * pinfo["other_params"]
