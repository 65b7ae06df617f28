"""Checkpoints of a run (``--save-every N``, Ctrl-C) and resuming from one (``--resume DIR``).

A checkpoint is a folder ``OUTPUT/checkpoint-STEP`` written whole (a temporary folder
renamed into place, :func:`pyqlora.app.outputs.replace_folder`); only the latest one is
kept. It holds

- ``adapter_config.json`` + ``adapter_model.safetensors``: the adapter after STEP steps, in
  PEFT's format (a checkpoint is also an adapter that loads as one);
- ``state.pt`` (``torch.save``, read back with ``weights_only=True``): the trainable
  tensors by parameter name (exact values), the optimizer's ``state_dict()``, torch's
  CPU random state and the batch order's generator state;
- ``trainer_state.json``: the step, the settings (:class:`FinetuneConfig`, paths
  absolute, the compute dtype resolved), the batch order (permutation and position), the
  numpy and Python random states, the training log so far and the evaluation before
  training (so that the resumed run reports the whole run).

A resumed run loads the model and data as the first run did, puts these values back and
continues at step STEP + 1; with the same settings, threads and machine it ends with the
same adapter, bit for bit, as a run that was never interrupted.
"""
import dataclasses
import json
import os
import random
import shutil

import numpy as np
import torch

from ..outputs import replace_folder
from .adapters import save_adapter
from .config import FinetuneConfig
from .training import TrainLog

__all__ = ["CHECKPOINT_PREFIX", "FREE_SETTINGS", "is_checkpoint_name", "load_checkpoint", "resume_config",
           "save_checkpoint"]

CHECKPOINT_PREFIX = "checkpoint-"
FORMAT = "pyqlora-finetune-checkpoint"
VERSION = 1
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "state.pt"
# settings a resumed run may change: they do not change what is computed (the seed, data,
# model, hyperparameters and the evaluation must stay those of the run that wrote the checkpoint)
# settings that change neither the numbers nor the data: memory placement, threads, where things go
FREE_SETTINGS = ("output", "steps", "threads", "progress", "save_every", "overwrite", "resume", "base_budget",
                 "spill_dir")
_PATHS = ("model", "data", "eval_text", "output")


def is_checkpoint_name(name):
    """Whether `name` is a folder name :func:`save_checkpoint` writes (``checkpoint-`` and a number)."""
    return name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX):].isdigit()


def _absolute(cfg):
    """`cfg` with its file arguments as absolute paths (a resumed run may start in another folder)."""
    changes = {}
    for k in _PATHS:
        v = getattr(cfg, k)
        if v and not (k == "eval_text" and v == "none"):
            changes[k] = os.path.abspath(v)
    return dataclasses.replace(cfg, **changes)


def _rng_json():
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, state, gauss = random.getstate()
    return {"numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "python": [version, list(state), gauss]}


def _set_rng(rng):
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, state, gauss = rng["python"]
    random.setstate((version, tuple(state), gauss))


def save_checkpoint(output, step, model, cfg, optimizer, order, log, before, compute_dtype=None):
    """Write ``output/checkpoint-STEP`` whole and remove the earlier checkpoints of `output`; returns the folder.

    `order` is the :class:`~.training.BatchOrder`, `log` the :class:`~.training.TrainLog` so far,
    `before` the evaluation before training (held-out loss, perplexities, sample, times),
    `compute_dtype` the report's entry (the dtype and why it was chosen).
    """
    output = os.path.abspath(output)
    folder = os.path.join(output, f"{CHECKPOINT_PREFIX}{step}")
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    order_state = order.state_dict()
    state = {"trainable": trainable, "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
             "batch_generator": order_state.pop("generator")}
    meta = {"format": FORMAT, "version": VERSION, "step": step, "config": dataclasses.asdict(_absolute(cfg)),
            "batch_order": order_state, "rng": _rng_json(), "log": dataclasses.asdict(log), "before": before,
            "compute_dtype": compute_dtype, "torch": torch.__version__}

    def write(tmp):
        save_adapter(model, cfg, tmp)
        torch.save(state, os.path.join(tmp, STATE_TENSORS))
        with open(os.path.join(tmp, STATE_JSON), "w") as f:
            json.dump(meta, f, indent=1)

    replace_folder(folder, write)
    for name in os.listdir(output):  # keep the latest only
        old = os.path.join(output, name)
        if (is_checkpoint_name(name) and old != folder and os.path.isfile(os.path.join(old, STATE_JSON))):
            shutil.rmtree(old, ignore_errors=True)
    return folder


def _read_meta(folder):
    path = os.path.join(folder, STATE_JSON)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--resume {folder}: no such checkpoint folder")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"--resume {folder}: not a checkpoint of pyqlora finetune (no {STATE_JSON}; "
                                f"checkpoints are the {CHECKPOINT_PREFIX}N folders in --output)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a pyqlora finetune checkpoint")
    if meta.get("version") != VERSION:
        raise ValueError(f"{path}: checkpoint format version {meta.get('version')!r}; this pyqlora reads {VERSION}")
    return meta


def load_checkpoint(folder):
    """The checkpoint in `folder` as a dict: ``step``, ``config`` (a :class:`FinetuneConfig`), ``batch_order``
    (with its ``generator`` state), ``rng``, ``log`` (a :class:`~.training.TrainLog`), ``before``,
    ``trainable``, ``optimizer``, ``torch_rng``. Raises ValueError / OSError naming the file."""
    meta = _read_meta(folder)
    path = os.path.join(folder, STATE_TENSORS)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing from the checkpoint") from None
    except (RuntimeError, EOFError, ValueError, KeyError) as exc:  # torch's errors for a damaged file
        raise ValueError(f"{path}: cannot read the checkpoint's tensors ({exc})") from None
    try:
        fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
        cfg = FinetuneConfig(**{k: v for k, v in meta["config"].items() if k in fields})
        out = dict(step=int(meta["step"]), config=cfg, rng=meta["rng"], log=TrainLog(**meta["log"]),
                   before=meta["before"], compute_dtype=meta.get("compute_dtype"),
                   batch_order={**meta["batch_order"], "generator": state["batch_generator"]},
                   trainable=state["trainable"], optimizer=state["optimizer"], torch_rng=state["torch_rng"])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{folder}: incomplete checkpoint ({type(exc).__name__}: {exc})") from None
    return out


def resume_config(folder, **changes):
    """The settings to continue the run checkpointed in `folder`: the checkpoint's own, with `changes`.

    Only :data:`FREE_SETTINGS` may differ from the checkpoint's (``steps`` at least the step
    reached); another setting that differs raises ValueError (a resumed run that computes
    something else would not be that run). ``dtype="auto"`` keeps the checkpoint's dtype.
    """
    meta = _read_meta(folder)
    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    saved = FinetuneConfig(**{k: v for k, v in meta["config"].items() if k in fields})
    unknown = set(changes) - fields
    if unknown:
        raise TypeError(f"resume_config got unknown settings {sorted(unknown)}")
    if changes.get("dtype") == "auto":
        changes.pop("dtype")
    given = _absolute(dataclasses.replace(saved, **changes))
    for f in dataclasses.fields(FinetuneConfig):
        if f.name in changes and f.name not in FREE_SETTINGS and getattr(given, f.name) != getattr(saved, f.name):
            raise ValueError(f"--{f.name.replace('_', '-')} {getattr(given, f.name)!r} differs from the "
                             f"checkpoint's {getattr(saved, f.name)!r} ({folder}): a resumed run keeps the "
                             "settings it started with (it may change only "
                             f"{', '.join('--' + s.replace('_', '-') for s in FREE_SETTINGS if s != 'resume')})")
    cfg = dataclasses.replace(saved, **{k: v for k, v in changes.items() if k in FREE_SETTINGS})
    cfg.resume = folder
    if cfg.steps < int(meta["step"]):
        raise ValueError(f"--steps {cfg.steps} is less than the {meta['step']} steps the checkpoint {folder} "
                         "has done already")
    return cfg


def check_resumable(cfg, checkpoint):
    """ValueError unless `cfg` (given to run) continues the checkpoint's run: same fixed settings."""
    saved, given = checkpoint["config"], _absolute(cfg)
    differ = [f.name for f in dataclasses.fields(FinetuneConfig)
              if f.name not in FREE_SETTINGS and getattr(given, f.name) != getattr(saved, f.name)]
    if differ:
        raise ValueError(f"the settings {differ} differ from those of the checkpoint {cfg.resume}; build them with "
                         "pyqlora.app.finetune.resume_config(folder, ...) (the command line does)")
    if cfg.steps < checkpoint["step"]:
        raise ValueError(f"--steps {cfg.steps} is less than the {checkpoint['step']} steps of {cfg.resume}")


def restore(checkpoint, model, optimizer, order):
    """Put the checkpoint's adapter, optimizer state, batch order and random states back."""
    params = dict(model.named_parameters())
    trainable = checkpoint["trainable"]
    mine = {n for n, p in params.items() if p.requires_grad}
    if set(trainable) != mine:
        raise ValueError(f"{checkpoint['config'].resume}: the checkpoint's adapter tensors do not match this model's "
                         f"({len(trainable)} against {len(mine)} trainable tensors)")
    with torch.no_grad():
        for n, t in trainable.items():
            if params[n].shape != t.shape:
                raise ValueError(f"{checkpoint['config'].resume}: {n} has shape {tuple(t.shape)}, the model's "
                                 f"{tuple(params[n].shape)}")
            params[n].copy_(t)
    optimizer.load_state_dict(checkpoint["optimizer"])
    order.load_state_dict(checkpoint["batch_order"])
    torch.set_rng_state(checkpoint["torch_rng"])
    _set_rng(checkpoint["rng"])
