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

Non-finite gradients: :class:`PagedAdamW` behaves like ``torch.optim.AdamW``
(a NaN or Inf gradient propagates into the moments and the parameter).
:class:`PagedAdamW8bit` skips the elements whose gradient is NaN or Inf (their
parameter is unchanged and both moments are reset to zero, like bitsandbytes'
CUDA kernel) instead of turning a whole quantization block into NaN; the number
of skipped elements is counted in :attr:`PagedAdamW8bit.skipped_elements`.
To skip whole steps instead, check the gradient norm that
``clip_grad_norm_`` returns and do not call ``step()``.

Needs torch (``pip install "pyqlora[torch]"``). CPU tensors only for now.
"""
import math

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
        lr, (beta1, beta2), eps, wd = defaults["lr"], defaults["betas"], defaults["eps"], defaults["weight_decay"]
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0.0):
            raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
        for name, b in (("betas[0]", beta1), ("betas[1]", beta2)):
            if not (isinstance(b, (int, float)) and 0.0 <= b < 1.0):
                raise ValueError(f"{name} must be in [0, 1), got {b!r}")
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0.0):
            raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
        if not (isinstance(wd, (int, float)) and math.isfinite(wd) and wd >= 0.0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {wd!r}")
        if pager is not None and (budget_bytes is not None or spill_dir is not None):
            raise ValueError("give either pager= or budget_bytes=/spill_dir=, not both")
        super().__init__(params, defaults)
        self.pager = pager if pager is not None else Pager(budget_bytes=budget_bytes, spill_dir=spill_dir)
        self._slots = {}  # param -> dict of paged state tensors (allocated with its group)

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

    def _slot(self, p, group):
        if p not in self._slots:
            self._allocate_group(group)
        return self._slots[p]

    # -- the update loop ----------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient (its state prefetched first)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                slot = self._slot(p, group)
                self.pager.prefetch(slot["_range"])
                state = self.state[p]  # keyed by the parameter; the update works on its local shard
                local = dtensor.local(p)
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    for key, t in slot.items():
                        if not key.startswith("_"):
                            state[key] = t.view_as(local) if key in ("exp_avg", "exp_avg_sq") else t
                state["step"] += 1
                self._update(local, dtensor.local(p.grad), state, group)
        return loss

    def _update(self, p, grad, state, group):
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

        The saved tensors are copied into paged memory with their saved dtypes.
        """
        saved = {k: dict(v) for k, v in state_dict["state"].items()}
        # the keys of the saved state are what its param_groups list (indices, or
        # parameter names from torch.distributed.checkpoint), in the order of ours
        key_to_param = {key: p for saved_group, group in zip(state_dict["param_groups"], self.param_groups)
                        for key, p in zip(saved_group["params"], group["params"])}
        super().load_state_dict(state_dict)
        for g in self.param_groups:
            self._allocate_group(g)
        self.state.clear()
        for idx, values in saved.items():
            if idx not in key_to_param:
                raise ValueError(f"state for parameter {idx!r} given, but no parameter group lists it")
            p = key_to_param[idx]
            if p not in self._slots:
                raise ValueError(f"state for parameter {idx} given, but that parameter does not require grad")
            self._load_param_state(p, values)

    def _load_param_state(self, p, values):
        slot = self._slots[p]
        state = self.state[p]
        for key, value in values.items():
            if key == "step":
                state["step"] = torch.as_tensor(value, dtype=torch.float32).clone()
                continue
            if key not in slot:
                raise ValueError(f"unexpected optimizer state {key!r} for a parameter of shape {tuple(p.shape)}")
            target = slot[key]
            value = torch.as_tensor(dtensor.local(value))
            if value.numel() != target.numel():
                raise ValueError(f"optimizer state {key!r} has {value.numel()} elements, expected {target.numel()} "
                                 f"for a parameter of shape {tuple(p.shape)}")
            target.copy_(value.reshape(target.shape).to(target.dtype))
            state[key] = target
        missing = [k for k in slot if not k.startswith("_") and k not in state]
        if missing:
            raise ValueError(f"optimizer state for a parameter of shape {tuple(p.shape)} lacks {missing}")

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_slots", {})


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

    def _update(self, p, grad, state, group):
        _adamw_32bit(p, grad, state["exp_avg"], state["exp_avg_sq"], group, state["step"].item())


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
        self.min_8bit_size = min_8bit_size
        self.blocksize = blocksize
        self._qmap1 = dynamic_codebook(signed=True)
        self._qmap2 = dynamic_codebook(signed=False)
        self._zero1 = int(np.flatnonzero(self._qmap1 == 0.0)[0])  # code of 0 in the signed map
        self._zero2 = int(np.flatnonzero(self._qmap2 == 0.0)[0])
        self.skipped_elements = 0
        #: Blocks whose decoded moments could not be restored bit for bit by load_state_dict
        #: (0 unless a checkpoint of decoded moments was resharded to other blocks).
        self.inexact_blocks_loaded = 0

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

    def _load_param_state(self, p, values):
        slot = self._slots[p]
        if "state1" not in slot or "state1" in values:
            return super()._load_param_state(p, values)
        # decoded moments (an FSDP checkpoint, or 32-bit state): requantize into this rank's blocks
        converted = {k: v for k, v in values.items() if k not in ("exp_avg", "exp_avg_sq")}
        for key, codes, absmax, qmap in (("exp_avg", "state1", "absmax1", self._qmap1),
                                         ("exp_avg_sq", "state2", "absmax2", self._qmap2)):
            if key not in values:
                raise ValueError(f"optimizer state for a parameter of shape {tuple(p.shape)} lacks {key!r} "
                                 f"(or {codes!r}/{absmax!r})")
            value = torch.as_tensor(dtensor.local(values[key])).detach().to(torch.float32)
            if not torch.isfinite(value).all():
                raise ValueError(f"optimizer state {key!r} for a parameter of shape {tuple(p.shape)} is not finite")
            if value.numel() == 0:
                converted[codes], converted[absmax] = torch.zeros(0, dtype=torch.uint8), torch.zeros(0)
                continue
            c, a, inexact = _requantize_exact(value.numpy(), qmap, self.blocksize)
            self.inexact_blocks_loaded += inexact
            converted[codes], converted[absmax] = torch.from_numpy(c), torch.from_numpy(a)
        return super()._load_param_state(p, converted)

    def _update(self, p, grad, state, group):
        step = state["step"].item()
        if "state1" not in state:  # a small parameter: 32-bit state
            _adamw_32bit(p, grad, state["exp_avg"], state["exp_avg_sq"], group, step)
            return
        if p.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"PagedAdamW8bit: parameter dtype {p.dtype} is not supported (float32, float16, bfloat16)")
        if p.numel() == 0:  # nothing to update (an empty parameter or shard); the kernel takes n >= 1
            return
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        target = p if p.is_contiguous() else p.contiguous()
        grad = grad.to(p.dtype).contiguous()
        self.skipped_elements += adam8bit_update(
            as_numpy(target), as_numpy(grad), state["state1"].numpy(), state["state2"].numpy(),
            state["absmax1"].numpy(), state["absmax2"].numpy(), self._qmap1, self._qmap2, self.blocksize,
            lr, beta1, beta2, eps, wd, step)
        if target is not p:
            p.copy_(target)
