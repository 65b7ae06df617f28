"""pyqlora in the Hugging Face QLoRA recipe: a transformers quantizer, PEFT layers, Trainer and TRL.

``import pyqlora.hf`` registers with transformers and PEFT (``import pyqlora`` alone
registers nothing); the standard script then runs on pyqlora's layers by changing
one line::

    import pyqlora.hf
    from pyqlora.hf import PyqloraConfig
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=PyqloraConfig())
    model = peft.prepare_model_for_kbit_training(model)
    model = peft.get_peft_model(model, peft.LoraConfig(target_modules="all-linear", task_type="CAUSAL_LM"))
    trainer = Trainer(model, args, train_dataset=..., optimizers=(pyqlora.hf.paged_adamw(model), None))

- :class:`PyqloraConfig` / :class:`PyqloraHfQuantizer`: ``from_pretrained`` builds
  :class:`pyqlora.nn.Linear4bit` layers, quantizing each weight as it is read, or reading
  a bitsandbytes 4-bit checkpoint byte for byte; ``save_pretrained`` writes
  bitsandbytes' format, which stock transformers + bitsandbytes load.
- :class:`PeftLinear4bit`: PEFT's LoRA layer on a ``Linear4bit`` (``get_peft_model``,
  ``PeftModel.from_pretrained``, several adapters, merging into a dense layer).
- :func:`paged_adamw`: pyqlora's paged AdamW for ``Trainer(optimizers=...)``.

See ``docs/huggingface.md``. Needs ``pip install "pyqlora[hf]"`` (transformers 5.x, peft).
"""
from . import _compat

_compat.check_versions()

from .config import PyqloraConfig, resolve_compute_dtype  # noqa: E402
from .peft_layer import PeftLinear4bit, dispatch_linear4bit  # noqa: E402
from .quantizer import PyqloraHfQuantizer  # noqa: E402
from .training import paged_adamw  # noqa: E402

_compat.install(PyqloraConfig, PyqloraHfQuantizer)

__all__ = ["PeftLinear4bit", "PyqloraConfig", "PyqloraHfQuantizer", "dispatch_linear4bit", "paged_adamw",
           "resolve_compute_dtype"]
