"""The training loop of a run: batches in a seeded order, gradient accumulation, clipping and warm-up."""
import dataclasses
import math
import sys
import time

import torch

from ..._glue.memory import memory_status
from .examples import IGNORE, collate
from .loss import batch_loss

__all__ = ["TrainLog", "train"]


@dataclasses.dataclass
class TrainLog:
    """What :func:`train` measured, one entry per optimizer step."""

    losses: list
    step_seconds: list
    step_cpu_seconds: list
    step_tokens: list
    peak_rss_bytes: int  # the largest resident memory seen after a step
    seconds: float


def _rss():
    return memory_status()["rss"] or 0


def train(model, optimizer, trainable, train_ex, cfg, pad_id, ctx, qdist, rows=None, autocast=False):
    """Run ``cfg.steps`` optimizer steps on `train_ex` and return a :class:`TrainLog`.

    Batches of ``cfg.batch_size`` examples are drawn without replacement in an order
    seeded by ``cfg.seed`` (a new permutation each pass); ``cfg.grad_accum`` of them
    make a step, whose loss is the mean over the label tokens of the global batch.
    The learning rate warms up linearly over ``cfg.warmup`` steps, then stays; the
    gradient norm is clipped at ``cfg.max_grad_norm``. Under ``--distributed``,
    `rows` is this rank's slice of every batch and `qdist` averages the loss.
    """
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
        micro = [collate(next_batch(), pad_id) for _ in range(cfg.grad_accum)]
        n_labels = sum(int((lab[:, 1:] != IGNORE).sum()) for _, lab, _ in micro)  # of the global batch
        total = 0.0
        for input_ids, labels, mask in micro:
            if rows is not None:  # this rank's rows; DDP/FSDP average the ranks' gradients, hence * world size
                input_ids, labels, mask = input_ids[rows], labels[rows], mask[rows]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                s, _ = batch_loss(model, input_ids, labels, mask, whole=rows is not None)
            (s * ctx.world_size / max(n_labels, 1)).backward()
            total += float(s.detach())
        if rows is not None:
            total = qdist.all_reduce_mean(total) * ctx.world_size
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
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
        rss_train = max(rss_train, _rss())
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens / dt:.0f}", gnorm=f"{float(grad_norm):.2f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    return TrainLog(losses, step_times, step_cpu, step_tokens, rss_train, time.perf_counter() - t_train0)
