"""The adapters of a run: prepare the base (4-bit with pyqlora, or bf16 with PEFT), seed and save them.

Adapters start from the same random values for both bases (drawn from ``--seed``
in module order), so runs that differ only in the base are comparable step by step.
"""
import math

import torch

from ..._glue.modules import enable_activation_checkpointing
from .config import SetupError

__all__ = ["lora_a_weights", "prepare", "save_adapter", "seed_adapters"]


def lora_a_weights(model):
    """The lora_A weights of every adapted layer, in module order (ours and PEFT's have the same names)."""
    return [m.weight for name, m in model.named_modules() if name.endswith(".lora_A.default")]


def seed_adapters(model, seed):
    """Draw every adapter's A from `seed` in module order (B stays zero), the same for both bases."""
    gen = torch.Generator().manual_seed(seed)
    weights = lora_a_weights(model)
    if not weights:
        raise RuntimeError("no LoRA adapters found after preparing the model")
    for w in weights:
        # PEFT's and pyqlora's init: kaiming_uniform_(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        bound = 1.0 / math.sqrt(w.shape[1])
        with torch.no_grad():
            w.copy_(torch.rand(w.shape, generator=gen, dtype=torch.float32) * (2 * bound) - bound)


def prepare(model, cfg, weights=None, pager=None, tokenizer=None, train_examples=None):
    """Quantize + adapt (4bit) or adapt the dense bf16 base with PEFT (bf16); returns (model, info).

    `weights`: a lazy mapping for a model built under ``empty_weights`` (4bit only; see prepare_model).
    `pager`: a pq.Pager for the 4-bit base (``--base-budget``); ``info["paging"]`` then watches it.
    With ``cfg.calibration`` the 4-bit base is calibrated on that text (`tokenizer` encodes it; issue 22),
    or, for ``"train"``, on `train_examples` ((input_ids, labels) pairs).
    """
    from pyqlora.nn import Linear4bit

    head = model.get_output_embeddings()
    sizes, four_bit, storage, dense, fmt = [], 0, 0, 0, None
    for m in model.modules():
        if isinstance(m, Linear4bit):  # a 4-bit checkpoint (pyqlora quantize, transformers + bitsandbytes)
            fmt = fmt or (m.codebook, m.blocksize, m.double_quant)
            sizes.append(m.in_features * m.out_features)
            four_bit += 1
            storage += sum(p.numel() for p in m.quant_parameters())
        elif isinstance(m, torch.nn.Linear) and m is not head:
            sizes.append(m.weight.numel())
            dense += m.weight.numel()
    others = sum(p.numel() for p in model.parameters()) - storage - dense  # 4-bit storage is no parameter count
    info = {"linear_params": sum(sizes), "other_params": others, "linear_sizes": sizes, "base_4bit_layers": four_bit,
            "base_4bit_format": fmt}
    del head  # hold no layer: each dense weight must die as soon as prepare_model quantizes it
    if four_bit and cfg.base != "4bit":
        raise SetupError(f"the model's {four_bit} linear layers are 4-bit already (a quantized checkpoint): "
                         "--base bf16 needs a dense checkpoint")
    if four_bit and cfg.init_lora == "loftq":
        raise SetupError("--init-lora loftq fits the adapters to the dense weights, which a 4-bit checkpoint "
                         "does not have: use a dense checkpoint or --init-lora default")
    if cfg.base == "4bit":
        from pyqlora.lora import LoraConfig, prepare_model

        calibration = None
        if getattr(cfg, "calibration", None) == "train":
            from ..calibration import training_batches

            calibration, _ = training_batches(train_examples or [], cfg.calibration_tokens)
        elif getattr(cfg, "calibration", None):
            from ..calibration import calibration_batches

            calibration, _ = calibration_batches(tokenizer, cfg.calibration, cfg.calibration_tokens)
        report = prepare_model(model, LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                                 codebook=cfg.codebook, blocksize=cfg.blocksize,
                                                 double_quant=cfg.double_quant,
                                                 gradient_checkpointing=cfg.gradient_checkpointing,
                                                 init_lora_weights="loftq" if cfg.init_lora == "loftq" else True,
                                                 loftq_iter=cfg.loftq_iter),
                               weights=weights, pager=pager, calibration=calibration, progress=cfg.progress)
        info.update(adapted_layers=len(report.replaced), quantized_linear_bytes=report.quantized_weight_bytes,
                    paging=report.paging)
        if report.calibration is not None:
            info["calibration"] = dict(report.calibration, file=cfg.calibration)
    else:
        try:
            import peft
        except ImportError:
            raise SetupError("--base bf16 (16-bit LoRA) uses PEFT's LoRA layers: pip install peft") from None
        pcfg = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                               target_modules="all-linear")
        if cfg.gradient_checkpointing:  # as prepare_model does for the 4-bit base
            enable_activation_checkpointing(model)
            model.enable_input_require_grads()
        model = peft.get_peft_model(model, pcfg)  # adapters in float32 (autocast_adapter_dtype)
        info.update(adapted_layers=len(lora_a_weights(model)), quantized_linear_bytes=None)
    if cfg.init_lora == "default":  # LoftQ's adapters are fitted, not drawn
        seed_adapters(model, cfg.seed)
    return model, info


def save_adapter(model, cfg, directory):
    """Write the adapter in PEFT's format: pyqlora's writer for the 4-bit base, PEFT's for bf16."""
    if cfg.base == "4bit":
        from pyqlora.lora import save_adapter as save_lora

        save_lora(model, directory)
    else:
        model.save_pretrained(directory)
