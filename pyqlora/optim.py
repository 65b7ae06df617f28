"""Paged AdamW optimizers: optimizer state in paged memory, 32-bit or blockwise 8-bit.

QLoRA's third idea (Dettmers et al., 2023, Sec. 3): the optimizer state lives in
memory that a pager moves between a fast tier and a slow tier, so that a memory
spike does not end the run. Here the state of every parameter is allocated from
a :class:`pyqlora.Pager`; before a parameter is updated its state is prefetched
into RAM, and when the pager's budget would be exceeded the least recently used
pages are written to the spill file and their memory is returned to the OS.
bitsandbytes pages only on CUDA and silently uses plain tensors on CPU; these
optimizers page on every machine.

- :class:`PagedAdamW` keeps float32 moments (in the parameter's dtype, as
  ``torch.optim.AdamW`` does) and performs exactly the operations of
  ``torch.optim.AdamW`` (single-tensor path), so with the same hyperparameters
  the parameters are bit-identical to ``torch.optim.AdamW``'s.
- :class:`PagedAdamW8bit` keeps both moments as blockwise 8-bit codes (signed
  dynamic map for the first moment, unsigned for the second, blocks of 256 and a
  float32 absmax per block, as bitsandbytes does): about 2 bytes of state per
  parameter instead of 8. The update is fused in nf4core (decode a block,
  update in float32, requantize), so no float32 copy of the state ever exists.
  Parameters with fewer than ``min_8bit_size`` (1024) elements keep 32-bit state.

Both have ``state_dict()`` / ``load_state_dict()`` that resume a run exactly
(the state is copied back into paged memory; under FSDP2 the 8-bit moments are
exported decoded, as float32 ``DTensor`` shards that
``torch.distributed.checkpoint`` can reshard, and requantized bit for bit on
load: see ``docs/distributed.md``), work with gradient clipping
(``torch.nn.utils.clip_grad_norm_`` before ``step()``) and with the LoRA
parameters of :func:`pyqlora.lora.prepare_model`.

``load_state_dict()`` checks the whole dict before it changes anything (the
structure, the parameter groups and their hyperparameters, and per parameter
the keys, element counts, shapes, dtypes, finiteness and the step): a bad
dict raises ``ValueError`` (``TypeError`` for a value of the wrong type or
dtype) naming the parameter and the key, and leaves the optimizer as it was.

``copy.deepcopy(optimizer)`` and pickling the optimizer object itself
(``pickle``, ``torch.save(optimizer)``) work as they do for
``torch.optim.AdamW``: the copy holds its own copy of the state in a new pager
(same ``budget_bytes``, ``spill_dir``, ``page_bytes``; a pager shared between
optimizers is not shared by the copy), and its parameters are the ones in the
deepcopy memo or the pickle: deep-copy or pickle the model together with the
optimizer (``copy.deepcopy((model, opt))``) and the copy optimizes the copied
model; copy the optimizer alone and, as with torch, it optimizes copies of the
parameters (without their gradients) that nothing else refers to.
``state_dict()`` / ``load_state_dict()`` remain the way to checkpoint.

Non-finite gradients: :class:`PagedAdamW` behaves like ``torch.optim.AdamW``
(a NaN or Inf gradient propagates into the moments and the parameter).
:class:`PagedAdamW8bit` skips the elements whose gradient is NaN or Inf (their
parameter is unchanged and both moments are reset to zero, like bitsandbytes'
CUDA kernel) instead of turning a whole quantization block into NaN, and skips
in the same way the elements whose update is not finite although the gradient
is: a moment that overflows float32 (with the default betas a gradient above
about 5.8e20, e.g. 1e30, overflows ``(1 - beta2) * g * g``), a stored block
scale that is not finite, or a new parameter that overflows its dtype. Every
other element is updated as if the skipped ones were not there (the block is
requantized from finite moments), so a step never stops partway on such
values; the number of skipped elements is counted in
:attr:`PagedAdamW8bit.skipped_elements`.
To skip whole steps instead, check the gradient norm that
``clip_grad_norm_`` returns and do not call ``step()``.

Needs torch (``pip install "pyqlora[torch]"``). CPU tensors only for now.
"""
import copy
import math
import numbers
from collections import defaultdict
from collections.abc import Mapping

import numpy as np
import torch

from ._codebooks import dynamic_codebook
from ._formats import check_blocksize
from ._glue import dtensor
from ._glue.tensors import as_numpy
from ._optim import adam8bit_update
from ._pager import Pager
from ._quantize import dequantize_blockwise, quantize_blockwise

__all__ = ["PagedAdamW", "PagedAdamW8bit"]

_ALIGN = 64  # bytes: each state slot starts on a cache line


def _round_up(n, a):
    return (n + a - 1) // a * a


_MAX_STEP = 2**53  # steps are float32 tensors (as torch's); the 8-bit kernel takes an int64
_MAX_FLOAT32 = float(np.finfo(np.float32).max)  # the updates compute in float32 (torch refuses larger scalars)


def _is_real(x):
    """A real number that is not a bool (Python, NumPy)."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_hyperparameters(group, where=""):
    """lr, betas, eps, weight_decay of the defaults or of a parameter group, as the constructor takes them.

    TypeError for a value of the wrong type, ValueError for a missing one or one out of range.
    """
    for name in ("lr", "betas", "eps", "weight_decay"):
        if name not in group:
            raise ValueError(f"{where}lacks the hyperparameter {name!r}")
    for name in ("lr", "eps", "weight_decay"):
        v = group[name]
        if not _is_real(v):
            raise TypeError(f"{where}{name} must be a number, got {type(v).__name__}")
        if not (math.isfinite(v) and 0.0 <= v <= _MAX_FLOAT32):
            raise ValueError(f"{where}{name} must be a finite number >= 0 (within float32), got {v!r}")
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)):
        raise TypeError(f"{where}betas must be a pair of numbers, got {type(betas).__name__}")
    if len(betas) != 2:
        raise ValueError(f"{where}betas must be a pair of numbers, got {len(betas)} values")
    for i, b in enumerate(betas):
        if not _is_real(b):
            raise TypeError(f"{where}betas[{i}] must be a number, got {type(b).__name__}")
        if not 0.0 <= b < 1.0:
            raise ValueError(f"{where}betas[{i}] must be in [0, 1), got {b!r}")
    for name in ("amsgrad", "maximize"):  # torch.optim.AdamW options these optimizers do not implement
        v = group.get(name, False)
        if not (v is None or v is False or (isinstance(v, int) and not isinstance(v, bool) and v == 0)):
            raise ValueError(f"{where}{name}={v!r} is not supported by the paged optimizers")


def _check_step(value, where):
    """The saved step: a finite integral number >= 0, or a 0-d real tensor of one; as a float32 tensor."""
    if torch.is_tensor(value):
        value = dtensor.local(value)
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{where}: 'step' must be a real number, got a {value.dtype} tensor")
        if value.dim() != 0:
            raise ValueError(f"{where}: 'step' must be a number or a 0-d tensor, got shape {tuple(value.shape)}")
        if value.is_meta:
            raise ValueError(f"{where}: 'step' is a meta tensor (no value)")
        s = value.item()
    elif _is_real(value):
        s = value
    else:
        raise TypeError(f"{where}: 'step' must be a number or a 0-d tensor, got {type(value).__name__}")
    s = float(s)
    if not (math.isfinite(s) and 0.0 <= s <= _MAX_STEP and s == int(s)):
        raise ValueError(f"{where}: 'step' must be a whole number in [0, 2**53], got {s!r}")
    return torch.tensor(s, dtype=torch.float32)


def _adamw_32bit(p, grad, exp_avg, exp_avg_sq, group, step):
    """torch.optim.adam._single_tensor_adam with decoupled weight decay, operation for operation."""
    lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    exp_avg, exp_avg_sq = exp_avg.view_as(p), exp_avg_sq.view_as(p)
    if wd != 0:
        p.mul_(1 - lr * wd)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    p.addcdiv_(exp_avg, denom, value=-step_size)


def _requantize_exact(values, qmap, blocksize):
    """Blockwise 8-bit codes and absmax whose decoded values equal `values` wherever possible.

    ``values`` are decoded 8-bit moments (``qmap[code] * absmax`` per block, as
    exported for FSDP checkpoints). Plain requantization is exact for a block
    whose largest magnitude is positive (its code is 1.0, so the block's absmax
    comes back unchanged), but not for one whose largest magnitude is negative:
    the signed dynamic map has 1.0 but no -1.0 (its lowest value is -0.99297),
    so such a block decodes to a maximum of 0.99297 * absmax and requantizing
    shrinks its absmax and moves codes. For those blocks the scale is recovered
    from the codebook (a few float32 neighbours of ``max|v| / 0.99297`` are
    tried) and accepted only if every element then decodes bit for bit to the
    given value. A block with no such scale (values that were not decoded with
    these blocks, e.g. after resharding to another number of ranks) keeps the
    plain requantization: an ordinary 8-bit rounding of the state.

    Returns
    -------
    codes : numpy.ndarray of uint8
    absmax : numpy.ndarray of float32
    inexact : int
        Number of blocks whose decoded values differ from `values`.
    """
    v = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    n = v.size
    codes, absmax = quantize_blockwise(v, blocksize=blocksize, codebook=qmap)
    nb = absmax.size
    padded = np.zeros(nb * blocksize, dtype=np.float32)
    padded[:n] = v
    vb = padded.reshape(nb, blocksize)
    cpad = np.zeros(nb * blocksize, dtype=np.uint8)
    cpad[:n] = codes
    zero = int(np.flatnonzero(qmap == 0.0)[0])
    cpad[n:] = zero  # padding decodes to 0, like the padded values

    ok = np.all(qmap[cpad.reshape(nb, blocksize)] * absmax[:, None] == vb, axis=1)
    rows = np.flatnonzero(~ok)
    if rows.size:
        order = np.argsort(qmap, kind="stable")
        table = qmap[order]
        lowest = float(-table[0]) if table[0] < 0 else 1.0
        blk = vb[rows].astype(np.float64)
        guess = np.maximum(blk.max(axis=1).clip(min=0.0), (-blk).max(axis=1).clip(min=0.0) / lowest)
        guess = guess.astype(np.float32)
        done = np.zeros(rows.size, dtype=bool)
        for k in (0, 1, -1, 2, -2, 3, -3):
            a = guess.copy()
            for _ in range(abs(k)):
                a = np.nextafter(a, np.float32(np.inf if k > 0 else 0.0))
            x = blk / np.where(a > 0, a, 1.0).astype(np.float64)[:, None]
            i = np.clip(np.searchsorted(table, x), 1, table.size - 1)
            lower = np.abs(x - table[i - 1]) <= np.abs(table[i] - x)
            c = order[np.where(lower, i - 1, i)].astype(np.uint8)
            good = ~done & np.all(qmap[c] * a[:, None] == vb[rows], axis=1)
            for j in np.flatnonzero(good):
                b = rows[j]
                cpad[b * blocksize:(b + 1) * blocksize] = c[j]
                absmax[b] = a[j]
            done |= good
            if done.all():
                break
        inexact = int((~done).sum())
    else:
        inexact = 0
    return cpad[:n].copy(), absmax, inexact


class _Arena:
    """One paged allocation cut into aligned slots (one per parameter)."""

    def __init__(self, pager, nbytes):
        self.array = pager.zeros((max(nbytes, _ALIGN),), dtype=np.uint8)
        self.tensor = torch.from_numpy(self.array)

    def view(self, offset, numel, dtype):
        size = numel * torch.empty((), dtype=dtype).element_size()
        return self.tensor[offset:offset + size].view(dtype)


class _PagedOptimizer(torch.optim.Optimizer):
    """Shared machinery: a pager, per-group arenas of state, prefetch before use."""

    def __init__(self, params, defaults, pager, budget_bytes, spill_dir):
        _check_hyperparameters(defaults)
        if pager is not None and (budget_bytes is not None or spill_dir is not None):
            raise ValueError("give either pager= or budget_bytes=/spill_dir=, not both")
        super().__init__(params, defaults)
        if pager is not None:
            device = pager.device
            # what a copy of this optimizer (deepcopy, pickle) creates its own pager with
            self._pager_settings = {"budget_bytes": pager.budget_bytes,
                                    "spill_dir": pager.spill_dir if device == "cpu" else None,
                                    "page_bytes": pager.page_bytes, "device": None if device == "cpu" else device}
        else:
            pager = Pager(budget_bytes=budget_bytes, spill_dir=spill_dir)
            self._pager_settings = {"budget_bytes": budget_bytes, "spill_dir": spill_dir, "page_bytes": None,
                                    "device": None}
        self.pager = pager
        self._slots = {}  # param -> dict of paged state tensors (allocated with its group)

    def add_param_group(self, param_group):
        """As ``torch.optim.Optimizer.add_param_group``; its hyperparameters are checked as the constructor's."""
        if isinstance(param_group, Mapping):
            _check_hyperparameters({**self.defaults, **param_group}, "parameter group: ")
        super().add_param_group(param_group)

    # -- layout ----------------------------------------------------------------------------
    def _slot_layout(self, p):
        """[(key, numel, dtype)] of the paged state of parameter p."""
        raise NotImplementedError

    def _allocate_group(self, group):
        """Allocate one arena for the state of every trainable parameter of a group."""
        plan, total = [], 0
        for p in group["params"]:
            if p in self._slots or not p.requires_grad:
                continue
            if p.device.type != "cpu":
                raise NotImplementedError(
                    f"{type(self).__name__}: parameters on {p.device} are not supported yet (CPU only)")
            entries = []
            for key, numel, dtype in self._slot_layout(dtensor.local(p)):
                entries.append((key, total, numel, dtype))
                total = _round_up(total + numel * torch.empty((), dtype=dtype).element_size(), _ALIGN)
            plan.append((p, entries))
        if not plan:
            return
        arena = _Arena(self.pager, total)
        for p, entries in plan:
            slot = {key: arena.view(off, numel, dtype) for key, off, numel, dtype in entries}
            first, last = entries[0], entries[-1]
            end = last[1] + last[2] * torch.empty((), dtype=last[3]).element_size()
            slot["_range"] = arena.array[first[1]:end]  # what to prefetch before the update
            self._init_slot(slot)
            self._slots[p] = slot

    def _init_slot(self, slot):
        """Values of a fresh state (zeros for every key by default)."""

    def _reset_slot(self, slot):
        for key, t in slot.items():
            if not key.startswith("_"):
                t.zero_()
        self._init_slot(slot)

    def _slot(self, p, group):
        if p not in self._slots:
            self._allocate_group(group)
        return self._slots[p]

    # -- the update loop ----------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient (its state prefetched first).

        A step is all or nothing as far as the arguments go: every parameter
        with a gradient is checked (a sparse gradient, a dtype the update
        cannot take) and the state of its group allocated before the first
        parameter changes, so such an error names the parameter (its index in
        ``state_dict()`` order, and its name where the group has
        ``param_names``) and leaves parameters, state and step counters as
        they were. A parameter's step counter advances together with its
        update. Non-finite values never stop a step (see the module notes).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        todo = []
        index = 0
        for group in self.param_groups:
            names = group.get("param_names")
            for j, p in enumerate(group["params"]):
                where = f"parameter {index}"
                if isinstance(names, (list, tuple)) and j < len(names) and isinstance(names[j], str):
                    where += f" ({names[j]})"
                index += 1
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients ({where})")
                self._check_update(dtensor.local(p), f"{where} of shape {tuple(p.shape)}")
                todo.append((p, group))
        for p, group in todo:
            self._slot(p, group)  # allocates each group's arena (once), before anything changes
        for p, group in todo:
            slot = self._slots[p]
            self.pager.prefetch(slot["_range"])
            state = self.state[p]  # keyed by the parameter; the update works on its local shard
            local = dtensor.local(p)
            if not state:
                # a fresh state (the slot may hold an older one: state cleared, or not in a loaded dict)
                self._reset_slot(slot)
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                for key, t in slot.items():
                    if not key.startswith("_"):
                        state[key] = t.view_as(local) if key in ("exp_avg", "exp_avg_sq") else t
            step = (state["step"] + 1).item()  # float32, as torch.optim.AdamW counts
            self._update(local, dtensor.local(p.grad), state, group, step)
            state["step"] += 1
        return loss

    def _check_update(self, p, where):
        """Raise for a local parameter that ``_update`` cannot take (called before any parameter changes)."""

    def _update(self, p, grad, state, group, step):
        raise NotImplementedError

    # -- public helpers -------------------------------------------------------------------
    def state_bytes(self):
        """Bytes of optimizer state held in paged memory (allocated, whether resident or spilled)."""
        n = 0
        for slot in self._slots.values():
            n += sum(t.numel() * t.element_size() for k, t in slot.items() if not k.startswith("_"))
        return n

    def stats(self):
        """The pager's statistics (see :meth:`pyqlora.Pager.stats`)."""
        return self.pager.stats()

    # -- checkpoints ---------------------------------------------------------------------
    def state_dict(self):
        """The state as ordinary tensors (copies out of paged memory), ready for ``torch.save``.

        The paged tensors are views into one shared allocation; copying them
        keeps a checkpoint to the state itself (``torch.save`` would otherwise
        write the whole allocation) and lets it load anywhere.
        """
        sd = super().state_dict()
        params = [p for g in self.param_groups for p in g["params"]]  # torch numbers them in this order
        sd["state"] = {idx: self._export_param_state(params[idx], st) for idx, st in sd["state"].items()}
        return sd

    def _export_param_state(self, p, st):
        out = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()}
        if dtensor.is_dtensor(p):
            # FSDP2: the state of a sharded parameter is sharded like it, so that
            # torch.distributed.checkpoint can gather and re-shard it
            out = self._export_sharded(out)
            for k in ("exp_avg", "exp_avg_sq"):
                if k in out:
                    out[k] = dtensor.dtensor_class().from_local(out[k].view_as(p.to_local()), p.device_mesh,
                                                                p.placements, shape=p.shape, stride=p.stride())
        return out

    def _export_sharded(self, out):
        """The state of an FSDP-sharded parameter in a form DCP can reshard (as is by default)."""
        return out

    def load_state_dict(self, state_dict):
        """Load a state dict saved by this class (or ``torch.optim.AdamW`` for :class:`PagedAdamW`).

        The saved tensors are copied into paged memory (moments in the
        parameter's dtype). The whole dict is checked first: its structure (a
        mapping with ``"state"`` and ``"param_groups"``, as many groups and
        parameters per group as this optimizer has, state only for listed
        parameters that require grad), each group's hyperparameters (as the
        constructor checks them), and per parameter exactly the state this
        optimizer keeps for it (keys, element counts, shapes, dtypes, finite
        moments, a whole ``step`` >= 0). Nothing changes unless all of it is
        valid.

        Raises
        ------
        ValueError
            A missing, extra or malformed entry; the message names the
            parameter (its id in the dict, its name when the dict has
            ``param_names``) and the key.
        TypeError
            An entry of the wrong type or dtype.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"optimizer state dict must be a mapping, got {type(state_dict).__name__}")
        state_dict = dict(state_dict)  # shallow copy, as torch (the pre-hooks may change it)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        groups, loads, inexact = self._check_state_dict(state_dict)
        # nothing has changed so far; allocation is the last step that can fail (paged memory)
        for g in self.param_groups:
            self._allocate_group(g)
        new_state = defaultdict(dict)
        for p, values in loads.items():
            self._install_state(p, values, new_state)
        self.__setstate__({"state": new_state, "param_groups": groups})
        self._loaded(inexact)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _loaded(self, inexact):
        """Bookkeeping after a load (the number of inexactly requantized blocks)."""

    def _check_state_dict(self, state_dict):
        """Validate a whole state dict; returns (new param_groups, {param: converted state}, inexact blocks)."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"optimizer state dict must be a mapping, got {type(state_dict).__name__}")
        for key in ("state", "param_groups"):
            if key not in state_dict:
                raise ValueError(f"optimizer state dict lacks {key!r}")
        saved_state, saved_groups = state_dict["state"], state_dict["param_groups"]
        if not isinstance(saved_state, Mapping):
            raise TypeError(f"optimizer state dict: 'state' must be a mapping, got {type(saved_state).__name__}")
        if not isinstance(saved_groups, (list, tuple)):
            raise TypeError(f"optimizer state dict: 'param_groups' must be a list, got {type(saved_groups).__name__}")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"optimizer state dict has {len(saved_groups)} parameter groups, this optimizer "
                             f"has {len(self.param_groups)}")
        key_to_param, names = {}, {}
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            where = f"param_groups[{gi}]"
            if not isinstance(saved, Mapping):
                raise TypeError(f"{where} must be a mapping, got {type(saved).__name__}")
            if "params" not in saved:
                raise ValueError(f"{where} lacks 'params'")
            ids = saved["params"]
            if not isinstance(ids, (list, tuple)):
                raise TypeError(f"{where}['params'] must be a list, got {type(ids).__name__}")
            if len(ids) != len(group["params"]):
                raise ValueError(f"{where} lists {len(ids)} parameters, this optimizer's group has "
                                 f"{len(group['params'])}")
            _check_hyperparameters(saved, f"{where}: ")
            group_names = saved.get("param_names", group.get("param_names"))
            if not (isinstance(group_names, (list, tuple)) and len(group_names) == len(ids)):
                group_names = [None] * len(ids)
            for j, (key, p, name) in enumerate(zip(ids, group["params"], group_names)):
                try:
                    hash(key)
                except TypeError:
                    raise TypeError(f"{where}['params'][{j}] must be a parameter id (an int or a name), "
                                    f"got {type(key).__name__}") from None
                if key in key_to_param:
                    raise ValueError(f"{where}['params'][{j}]: parameter id {key!r} is listed twice")
                key_to_param[key] = p
                names[key] = name if isinstance(name, str) else None
        try:
            new_groups = copy.deepcopy(list(saved_groups))
        except Exception as exc:  # an object in a group that cannot be copied
            raise TypeError(f"optimizer state dict: 'param_groups' cannot be copied: {exc}") from exc
        new_groups = [dict(saved) for saved in new_groups]
        for saved, group in zip(new_groups, self.param_groups):  # as torch.optim.Optimizer.load_state_dict
            saved["params"] = group["params"]
            if "param_names" in group and "param_names" not in saved:
                saved["param_names"] = group["param_names"]

        arenas = {t.untyped_storage().data_ptr() for slot in self._slots.values()
                  for k, t in slot.items() if not k.startswith("_")}
        loads, inexact = {}, 0
        for key, values in saved_state.items():
            if key not in key_to_param:
                raise ValueError(f"optimizer state dict has state for parameter {key!r}, but no parameter group "
                                 "lists it")
            p = key_to_param[key]
            local = dtensor.local(p)
            where = f"parameter {key!r}" + (f" ({names[key]})" if names[key] else "") + \
                    f" of shape {tuple(local.shape)}"
            if not p.requires_grad:
                raise ValueError(f"optimizer state dict has state for {where}, which does not require grad")
            if not isinstance(values, Mapping):
                raise TypeError(f"optimizer state of {where} must be a mapping, got {type(values).__name__}")
            converted, n = self._check_param_state(local, values, where)
            for k, t in converted.items():  # a value that is this optimizer's own paged state: copy it first
                if k != "step" and t.untyped_storage().data_ptr() in arenas:
                    converted[k] = t.clone()
            loads[p] = converted
            inexact += n
        return new_groups, loads, inexact

    @staticmethod
    def _check_keys(values, expected, where):
        keys = set(values)
        missing, extra = sorted(expected - keys, key=repr), sorted(keys - expected, key=repr)
        if missing:
            raise ValueError(f"optimizer state of {where} lacks {missing}")
        if extra:
            raise ValueError(f"optimizer state of {where} has unexpected keys {extra} "
                             f"(expected {sorted(expected, key=repr)})")

    def _check_param_state(self, p, values, where):
        """The saved state of local parameter p, checked and converted to its slot's dtypes (flat tensors).

        Returns ({key: tensor, "step": tensor}, number of inexactly requantized blocks).
        """
        layout = self._slot_layout(p)
        self._check_keys(values, {"step"} | {key for key, _, _ in layout}, where)
        out = {"step": _check_step(values["step"], where)}
        for key, numel, dtype in layout:
            out[key] = _check_state_tensor(values[key], key, p, numel, dtype, where)
        return out, 0

    def _install_state(self, p, values, state):
        """Copy checked state (flat tensors of the slot's dtypes) into p's slot; state[p] views it."""
        slot = self._slots[p]
        local = dtensor.local(p)
        self.pager.prefetch(slot["_range"])
        st = {"step": values["step"]}
        for key, t in slot.items():
            if key.startswith("_"):
                continue
            t.copy_(values[key])
            st[key] = t.view_as(local) if key in ("exp_avg", "exp_avg_sq") else t
        state[p] = st

    # -- copies and pickles ---------------------------------------------------------------
    def _settings(self):
        """What a copy needs besides the state and the groups (the pager's settings, counters)."""
        return {"pager": dict(self._pager_settings)}

    def _restore_settings(self, settings):
        self._pager_settings = dict(settings["pager"])
        self.pager = Pager(**self._pager_settings)

    def __getstate__(self):
        """torch's (defaults, state, param_groups) with the state copied out of paged memory, and the settings.

        The paged tensors view one allocation as several dtypes, which pickle
        cannot hold; the copies are ordinary tensors, one storage each.
        """
        state = {p: {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in st.items()}
                 for p, st in self.state.items()}
        return {"defaults": self.defaults, "state": state, "param_groups": self.param_groups,
                "_paged_settings": self._settings()}

    def __setstate__(self, state):
        state = dict(state)
        settings = state.pop("_paged_settings", None)
        if settings is None:  # torch.optim.Optimizer.load_state_dict's form (state and param_groups only)
            super().__setstate__(state)
            self.__dict__.setdefault("_slots", {})
            return
        # a copy (deepcopy, unpickle): a new pager, the state copied into it
        saved = state.pop("state")
        super().__setstate__({**state, "state": defaultdict(dict)})
        self._restore_settings(settings)
        self._slots = {}
        for g in self.param_groups:
            self._allocate_group(g)
        for p, values in saved.items():
            if p in self._slots and values:
                values = {k: (v.reshape(-1) if k != "step" else v) for k, v in values.items()}
                self._install_state(p, values, self.state)
            else:  # no paged state for it (does not require grad now): kept as is
                self.state[p] = values


def _check_state_tensor(value, key, p, numel, dtype, where):
    """One saved state tensor of local parameter p, checked; returned flat, on the CPU, in `dtype`.

    Moments (``exp_avg``, ``exp_avg_sq``): any floating dtype, finite after the
    conversion, ``exp_avg_sq`` >= 0. 8-bit codes (``state1``, ``state2``):
    uint8. Block scales (``absmax1``, ``absmax2``): float32, finite, >= 0.
    Per-element state has p's shape or is flat; scales are flat.
    """
    if not torch.is_tensor(value):
        raise TypeError(f"optimizer state {key!r} of {where} must be a tensor, got {type(value).__name__}")
    value = dtensor.local(value)
    if value.layout != torch.strided:
        raise TypeError(f"optimizer state {key!r} of {where} must be a dense tensor, got {value.layout}")
    if value.is_meta:
        raise ValueError(f"optimizer state {key!r} of {where} is a meta tensor (no values)")
    scales = key.startswith("absmax")
    if value.numel() != numel:
        raise ValueError(f"optimizer state {key!r} of {where} has {value.numel()} elements, expected {numel}")
    shapes = {(numel,)} if scales else {(numel,), tuple(p.shape)}
    if tuple(value.shape) not in shapes:
        raise ValueError(f"optimizer state {key!r} of {where} has shape {tuple(value.shape)}, expected "
                         f"{' or '.join(str(s) for s in sorted(shapes))}")
    if key.startswith("state"):
        if value.dtype != torch.uint8:
            raise TypeError(f"optimizer state {key!r} of {where} must be uint8 codes, got {value.dtype}")
    elif scales:
        if value.dtype != torch.float32:
            raise TypeError(f"optimizer state {key!r} of {where} must be float32 block scales, got {value.dtype}")
    elif not value.is_floating_point():
        raise TypeError(f"optimizer state {key!r} of {where} must be a floating tensor, got {value.dtype}")
    saved_dtype = value.dtype
    value = value.detach().to(device="cpu", dtype=dtype).reshape(-1)
    if value.is_floating_point():
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"optimizer state {key!r} of {where} is not finite"
                             + (f" (in {dtype}, the state's dtype)" if dtype != saved_dtype else ""))
        if (key == "exp_avg_sq" or scales) and bool((value < 0).any()):
            raise ValueError(f"optimizer state {key!r} of {where} has negative values")
    return value


class PagedAdamW(_PagedOptimizer):
    """AdamW whose moments live in paged memory; numerically ``torch.optim.AdamW``.

    Parameters
    ----------
    params : iterable
        Parameters or parameter groups, as for any torch optimizer.
    lr, betas, eps, weight_decay
        As ``torch.optim.AdamW`` (defaults 1e-3, (0.9, 0.999), 1e-8, 1e-2).
    pager : pyqlora.Pager, optional
        Pager to allocate the state from (shared between optimizers if you like).
    budget_bytes : int, optional
        RAM budget of the pager created when ``pager`` is not given; None = no
        limit (the state stays resident, and pages only when evicted by hand).
    spill_dir : str, optional
        Directory of that pager's spill file (a temporary directory by default).

    Examples
    --------
    >>> import torch
    >>> from pyqlora.optim import PagedAdamW
    >>> model = torch.nn.Linear(64, 64)
    >>> opt = PagedAdamW(model.parameters(), lr=1e-3, budget_bytes=1 << 20)
    >>> model(torch.randn(4, 64)).square().mean().backward()
    >>> opt.step()
    >>> opt.state_bytes()     # two float32 moments per parameter
    33280
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *, pager=None,
                 budget_bytes=None, spill_dir=None):
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults, pager, budget_bytes, spill_dir)

    def _slot_layout(self, p):
        return [("exp_avg", p.numel(), p.dtype), ("exp_avg_sq", p.numel(), p.dtype)]

    def _update(self, p, grad, state, group, step):
        _adamw_32bit(p, grad, state["exp_avg"], state["exp_avg_sq"], group, step)


class PagedAdamW8bit(_PagedOptimizer):
    """AdamW with blockwise 8-bit moments in paged memory, the update fused in nf4core.

    Parameters
    ----------
    params, lr, betas, eps, weight_decay, pager, budget_bytes, spill_dir
        As :class:`PagedAdamW`.
    min_8bit_size : int
        Parameters with fewer elements keep 32-bit state. bitsandbytes uses 4096,
        which leaves small LoRA matrices (e.g. r=16 times 192 key/value features)
        in 32 bits; 1024 puts every LoRA matrix of a real model in 8 bits and only
        keeps biases and tiny tensors in 32.
    blocksize : int
        Elements per quantization block of the state (bitsandbytes: 256).

    Notes
    -----
    The per-parameter state is ``state1``/``state2`` (uint8 codes of the first
    and second moment) and ``absmax1``/``absmax2`` (float32 per block), as in
    bitsandbytes; small parameters have ``exp_avg``/``exp_avg_sq`` instead.
    The update follows bitsandbytes' CPU 8-bit blockwise Adam operation by
    operation (see ``nf4core/optim.h``); results can differ from bitsandbytes in
    the last bit where torch's vectorized ``sqrt`` is not correctly rounded.

    Examples
    --------
    >>> import torch
    >>> from pyqlora.optim import PagedAdamW8bit
    >>> model = torch.nn.Linear(256, 256, bias=False)
    >>> opt = PagedAdamW8bit(model.parameters(), lr=1e-3)
    >>> model(torch.randn(4, 256)).square().mean().backward()
    >>> opt.step()
    >>> opt.state_bytes() / model.weight.numel()   # 2 bytes + 2 absmax floats per 256
    2.03125
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *, pager=None,
                 budget_bytes=None, spill_dir=None, min_8bit_size=1024, blocksize=256):
        blocksize = check_blocksize(blocksize)
        if not (isinstance(min_8bit_size, int) and min_8bit_size >= 0):
            raise ValueError(f"min_8bit_size must be an int >= 0, got {min_8bit_size!r}")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults, pager, budget_bytes, spill_dir)
        self._setup_8bit(min_8bit_size, blocksize)
        self.skipped_elements = 0
        #: Blocks whose decoded moments could not be restored bit for bit by load_state_dict
        #: (0 unless a checkpoint of decoded moments was resharded to other blocks).
        self.inexact_blocks_loaded = 0

    def _setup_8bit(self, min_8bit_size, blocksize):
        self.min_8bit_size = min_8bit_size
        self.blocksize = blocksize
        self._qmap1 = dynamic_codebook(signed=True)
        self._qmap2 = dynamic_codebook(signed=False)
        self._zero1 = int(np.flatnonzero(self._qmap1 == 0.0)[0])  # code of 0 in the signed map
        self._zero2 = int(np.flatnonzero(self._qmap2 == 0.0)[0])

    def _settings(self):
        return {**super()._settings(), "min_8bit_size": self.min_8bit_size, "blocksize": self.blocksize,
                "skipped_elements": self.skipped_elements, "inexact_blocks_loaded": self.inexact_blocks_loaded}

    def _restore_settings(self, settings):
        super()._restore_settings(settings)
        self._setup_8bit(settings["min_8bit_size"], settings["blocksize"])
        self.skipped_elements = settings["skipped_elements"]
        self.inexact_blocks_loaded = settings["inexact_blocks_loaded"]

    def _is_8bit(self, p):
        return p.numel() >= self.min_8bit_size

    def _slot_layout(self, p):
        n = p.numel()
        if not self._is_8bit(p):
            return [("exp_avg", n, p.dtype), ("exp_avg_sq", n, p.dtype)]
        nb = -(-n // self.blocksize)
        return [("state1", n, torch.uint8), ("state2", n, torch.uint8),
                ("absmax1", nb, torch.float32), ("absmax2", nb, torch.float32)]

    def _init_slot(self, slot):
        if "state1" in slot:
            slot["state1"].fill_(self._zero1)
            slot["state2"].fill_(self._zero2)

    # -- checkpoints of FSDP-sharded parameters ------------------------------------------
    def _export_sharded(self, out):
        """8-bit moments of an FSDP shard as float32 ``exp_avg`` / ``exp_avg_sq`` (decoded).

        The 8-bit blocks follow each rank's local shard, so codes and absmax
        mean nothing to ``torch.distributed.checkpoint``, which reshards by
        element. The decoded moments are ordinary element-wise tensors: DCP can
        gather, save and reshard them, every rank exports the same keys whether
        its shard is in 8 or 32 bits (``min_8bit_size`` looks at the local
        shard), and the file is also readable by :class:`PagedAdamW` or
        ``torch.optim.AdamW``. Loading requantizes them; with the same sharding
        that gives back the very same decoded values (see
        :func:`_requantize_exact`), so a resumed run is bit-identical.
        """
        if "state1" not in out:
            return out
        new = {k: v for k, v in out.items() if k not in ("state1", "state2", "absmax1", "absmax2")}
        for key, codes, absmax, qmap in (("exp_avg", "state1", "absmax1", self._qmap1),
                                         ("exp_avg_sq", "state2", "absmax2", self._qmap2)):
            if out[codes].numel() == 0:  # an empty shard (min_8bit_size=0)
                new[key] = torch.zeros(0, dtype=torch.float32)
                continue
            decoded = dequantize_blockwise(out[codes].numpy(), out[absmax].numpy(), blocksize=self.blocksize,
                                              codebook=qmap)
            new[key] = torch.from_numpy(decoded)
        return new

    def _check_param_state(self, p, values, where):
        if not self._is_8bit(p):
            return super()._check_param_state(p, values, where)
        coded = {"state1", "state2", "absmax1", "absmax2"}
        if coded & set(values) or not {"exp_avg", "exp_avg_sq"} & set(values):
            return super()._check_param_state(p, values, where)
        # decoded moments (an FSDP checkpoint, or 32-bit state): requantize into this rank's blocks
        self._check_keys(values, {"step", "exp_avg", "exp_avg_sq"}, where)
        out = {"step": _check_step(values["step"], where)}
        n = p.numel()
        nb = -(-n // self.blocksize)
        inexact = 0
        for key, codes, absmax, qmap in (("exp_avg", "state1", "absmax1", self._qmap1),
                                         ("exp_avg_sq", "state2", "absmax2", self._qmap2)):
            value = _check_state_tensor(values[key], key, p, n, torch.float32, where)
            if n == 0:
                out[codes], out[absmax] = torch.zeros(0, dtype=torch.uint8), torch.zeros(nb)
                continue
            c, a, k = _requantize_exact(value.numpy(), qmap, self.blocksize)
            inexact += k
            out[codes], out[absmax] = torch.from_numpy(c), torch.from_numpy(a)
        return out, inexact

    def _loaded(self, inexact):
        self.inexact_blocks_loaded += inexact

    def _check_update(self, p, where):
        if self._is_8bit(p) and p.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"PagedAdamW8bit: {where}: parameter dtype {p.dtype} is not supported for 8-bit state "
                            "(float32, float16, bfloat16)")

    def _update(self, p, grad, state, group, step):
        if "state1" not in state:  # a small parameter: 32-bit state
            _adamw_32bit(p, grad, state["exp_avg"], state["exp_avg_sq"], group, step)
            return
        if p.numel() == 0:  # nothing to update (an empty parameter or shard); the kernel takes n >= 1
            return
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        target = p if p.is_contiguous() else p.contiguous()
        grad = grad.to(p.dtype).contiguous()
        if np.may_share_memory(as_numpy(target), as_numpy(grad)):  # a gradient that views the parameter
            grad = grad.clone()  # the update reads the gradient as it was (the kernel takes no overlap)
        self.skipped_elements += adam8bit_update(
            as_numpy(target), as_numpy(grad), state["state1"].numpy(), state["state2"].numpy(),
            state["absmax1"].numpy(), state["absmax2"].numpy(), self._qmap1, self._qmap2, self.blocksize,
            lr, beta1, beta2, eps, wd, step)
        if target is not p:
            p.copy_(target)
