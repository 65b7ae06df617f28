"""The training loop of a run: batches in a seeded order, gradient accumulation, clipping and warm-up;
checkpoints every ``--save-every`` steps and on Ctrl-C."""
import dataclasses
import math
import signal
import sys
import threading
import time

import torch

from ..._glue.memory import memory_status
from .examples import IGNORE, collate
from .loss import batch_loss

__all__ = ["BatchOrder", "Interrupted", "TrainLog", "length_groups", "train"]


@dataclasses.dataclass
class TrainLog:
    """What :func:`train` measured, one entry per optimizer step (of the whole run when it was resumed)."""

    losses: list
    step_seconds: list
    step_cpu_seconds: list
    step_tokens: list
    peak_rss_bytes: int  # the largest resident memory seen after a step
    seconds: float       # training time, all sessions of a resumed run together

    @classmethod
    def empty(cls):
        return cls([], [], [], [], 0, 0.0)


class Interrupted(KeyboardInterrupt):
    """Training stopped on Ctrl-C (SIGINT) after a whole step; ``checkpoint`` is the folder saved then.

    A KeyboardInterrupt: the command line ends with exit status 130, as a shell does for Ctrl-C.
    """

    def __init__(self, step, checkpoint):
        super().__init__(f"interrupted after step {step}; saved {checkpoint}; continue with: "
                         f"pyqlora finetune --resume {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


class BatchOrder:
    """Batches of `batch_size` example indices drawn without replacement, a new permutation of
    `n` per pass from a generator seeded with `seed`; its whole state is :meth:`state_dict`."""

    def __init__(self, n, batch_size, seed):
        self.n, self.batch_size = n, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.order, self.pos = [], 0

    def next(self):
        if self.pos + self.batch_size > len(self.order):
            self.order, self.pos = torch.randperm(self.n, generator=self.gen).tolist(), 0
        batch = self.order[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return batch

    def state_dict(self):
        """``{"generator": uint8 tensor, "order": [...], "pos": int}``."""
        return {"generator": self.gen.get_state(), "order": list(self.order), "pos": self.pos}

    def load_state_dict(self, state):
        if sorted(state["order"]) not in ([], list(range(self.n))) or not 0 <= state["pos"] <= len(state["order"]):
            raise ValueError(f"the checkpoint's batch order does not fit {self.n} training examples: "
                             "the data or --seq-len differ from the run that wrote it")
        self.gen.set_state(state["generator"])
        self.order, self.pos = list(state["order"]), int(state["pos"])


class _StopOnSigint:
    """While active, a first SIGINT (Ctrl-C) only asks the loop to stop after the current step (so that
    the checkpoint holds a whole step, never half an optimizer update); a second one interrupts at once."""

    def __init__(self, enabled, say):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested = False
        self.say = say
        self._previous = None

    def _handler(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)  # the next Ctrl-C acts as usual
        self.say("\npyqlora: Ctrl-C: stopping after this step to save a checkpoint (Ctrl-C again to stop now)")

    def __enter__(self):
        if self.enabled:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self.enabled and self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _rss():
    return memory_status()["rss"] or 0


def length_groups(examples, saving=0.15):
    """The examples of a micro-batch as one group, or as two groups of similar length (sorted by length,
    cut in half) when that computes at least `saving` fewer padded positions.

    The loss of a micro-batch is a sum over its label tokens, so the groups give the same loss and
    gradient (up to float rounding) for less work. On the default run the padding is a third of
    the real tokens; 16 of its 30 batches are split, which computes 12 % fewer positions and took
    5 % less training CPU time (float32, AVX2 profile, one thread), with the same losses bit for
    bit as without the split there. Each group decodes the 4-bit weights once more, which is what
    a finer split would cost.
    """
    if len(examples) < 2:
        return [examples]
    ordered = sorted(examples, key=lambda ex: len(ex[0]))
    half = len(ordered) // 2
    groups = [ordered[:half], ordered[half:]]
    whole = len(examples) * len(ordered[-1][0])
    split = sum(len(g) * len(g[-1][0]) for g in groups)
    return groups if split <= (1 - saving) * whole else [examples]


def train(model, optimizer, trainable, train_ex, cfg, pad_id, ctx, qdist, rows=None, autocast=False,
          order=None, log=None, start=0, save=None, say=None):
    """Run optimizer steps ``start`` .. ``cfg.steps - 1`` on `train_ex` and return a :class:`TrainLog`.

    Batches of ``cfg.batch_size`` examples come from `order` (a :class:`BatchOrder`; a new one
    seeded by ``cfg.seed`` when None); ``cfg.grad_accum`` of them make a step, whose loss is the
    mean over the label tokens of the global batch (in one process a batch goes through the model
    in :func:`length_groups`). The learning rate warms up linearly over
    ``cfg.warmup`` steps, then stays; the gradient norm is clipped at ``cfg.max_grad_norm``.
    Under ``--distributed``, `rows` is this rank's slice of every batch and `qdist` averages the loss.

    Resuming: `order`, `log` (the steps done so far) and `start` come from a checkpoint.
    ``save(steps_done, log)`` writes a checkpoint and returns its folder; it is called every
    ``cfg.save_every`` steps and when Ctrl-C stops the loop, which then raises :class:`Interrupted`.
    """
    order = order or BatchOrder(len(train_ex), cfg.batch_size, cfg.seed)
    log = log or TrainLog.empty()
    say = say or (lambda *a: print(*a, file=sys.stderr, flush=True))
    model.train()
    bar = None
    if cfg.progress and ctx.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="fine-tune", unit="step", file=sys.stderr,
                   dynamic_ncols=True)
    t_train0, seconds0 = time.perf_counter(), log.seconds
    stop = _StopOnSigint(save is not None and ctx.kind == "none", say)
    try:
        with stop:
            for step in range(start, cfg.steps):
                t0, c0 = time.perf_counter(), time.process_time()
                lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else cfg.lr
                for g in optimizer.param_groups:
                    g["lr"] = lr
                batches = [[train_ex[i] for i in order.next()] for _ in range(cfg.grad_accum)]
                if rows is None:  # one process: no padding computed for nothing
                    micro = [collate(g, pad_id) for b in batches for g in length_groups(b)]
                else:  # each rank takes its rows of the global micro-batch
                    micro = [collate(b, pad_id) for b in batches]
                n_labels = sum(int((lab[:, 1:] != IGNORE).sum()) for _, lab, _ in micro)  # of the global batch
                total = 0.0
                for input_ids, labels, mask in micro:
                    if rows is not None:  # this rank's rows; DDP/FSDP average the ranks' gradients, hence * world
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
                log.losses.append(loss)
                log.step_seconds.append(dt)
                log.step_cpu_seconds.append(time.process_time() - c0)
                log.step_tokens.append(tokens)
                log.peak_rss_bytes = max(log.peak_rss_bytes, _rss())
                log.seconds = seconds0 + time.perf_counter() - t_train0
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens / dt:.0f}", gnorm=f"{float(grad_norm):.2f}")
                    bar.update(1)
                done = step + 1
                if save is not None and (stop.requested or (cfg.save_every and done % cfg.save_every == 0)):
                    if bar is not None:
                        bar.clear()
                    folder = save(done, log)
                    if stop.requested:
                        raise Interrupted(done, folder)
    finally:
        if bar is not None:
            bar.close()
    log.seconds = seconds0 + time.perf_counter() - t_train0
    return log
