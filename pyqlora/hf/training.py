"""Training with transformers' ``Trainer`` and TRL's ``SFTTrainer`` on pyqlora's layers."""
from ..optim import PagedAdamW, PagedAdamW8bit

__all__ = ["paged_adamw"]


def paged_adamw(model, lr=2e-4, bits=32, **kwargs):
    """A pyqlora paged AdamW over the trainable parameters of `model`, for ``Trainer(optimizers=(opt, None))``.

    transformers' ``optim="paged_adamw_32bit"`` / ``"paged_adamw_8bit"`` strings build
    bitsandbytes' optimizers, which page only on CUDA (on a CPU they fall back to plain
    tensors). Pass this one instead; the Trainer still builds the learning-rate schedule
    (the ``None``), and its checkpoints (``optimizer.pt``) resume the run exactly.

    Parameters
    ----------
    model : torch.nn.Module
        Its parameters with ``requires_grad`` are optimized (a PEFT model's adapters).
    lr : float
        The learning rate (a ``Trainer`` schedule scales it from ``args.learning_rate``,
        so give the same value there).
    bits : {32, 8}
        :class:`pyqlora.optim.PagedAdamW` (float32 moments) or
        :class:`pyqlora.optim.PagedAdamW8bit` (blockwise 8-bit moments).
    **kwargs
        The optimizer's other arguments (``betas``, ``eps``, ``weight_decay``,
        ``budget_bytes``, ``spill_dir``, ...).

    Examples
    --------
    >>> import torch
    >>> from pyqlora.hf import paged_adamw
    >>> model = torch.nn.Linear(8, 8)
    >>> type(paged_adamw(model, lr=1e-3)).__name__
    'PagedAdamW'
    """
    if bits not in (32, 8):
        raise ValueError(f"bits must be 32 or 8, got {bits!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: add adapters first (peft.get_peft_model)")
    cls = PagedAdamW if bits == 32 else PagedAdamW8bit
    return cls(params, lr=lr, **kwargs)
