"""The frozen 4-bit base in a :class:`pyqlora.Pager`: RAM bounds the working set, not the model.

:func:`place_in_pager` moves one ``Linear4bit``'s bytes (codes, block scales, nested
scales) into pager memory; :class:`BasePaging` then watches the layers run. On the first
forward it records the order in which they run; from then on, before a layer computes,
its own bytes are prefetched (the time spent there is the *disk wait*) and a background
thread prefetches the bytes of the next ``lookahead`` layers in that order (in reverse
order during backward), so the reads overlap the computation. The pager's budget evicts
least recently used pages beyond it; for the cyclic scan of a forward pass that is the
layers run longest ago (an order-aware policy, which would keep the layers the reversed
backward needs first, is not written yet). The decoded float32 block scales of a layer are
dropped when the next one runs (``Linear4bit.drop_caches``): only the running layer holds them.

Everything stays bit-identical to the resident base: paging moves bytes, never values.
"""
import threading
import time

import numpy as np
import torch

from .. import _pager
from .._array import QuantizedArray

__all__ = ["BasePaging", "RunningLayerScales", "place_in_pager"]


class RunningLayerScales:
    """Decoded block scales for the running 4-bit layer only, while training a resident base.

    A ``Linear4bit`` keeps the float32 block scales it decodes from its double-quantized
    8-bit scales (an eighth of its codes' bytes: 1.9 GiB for a 33B base) for as long as it
    lives, which suits generation (every layer runs once per token). In training each layer
    runs three times per step (forward, recomputed forward, backward) and decoding costs a
    millisecond or two per layer, so hooks drop the previous layer's decoded scales when the
    next one runs, in forward and in backward, as :class:`BasePaging` does for a paged base.
    In eval mode the hooks do nothing. Values are unchanged: the scales are decoded again,
    bit for bit, when a layer next runs. Layers under ``min_weights`` weights keep theirs: their
    scales are small (SmolLM2-135M's all together: 8 MiB) and a small model's step is the one
    that would notice the decoding.
    """

    min_weights = 1 << 22  # 4 Mi weights: 256 KiB of decoded scales

    def __init__(self, model):
        self._last = None
        self._handles = []
        for _, m in model.named_modules():
            if (callable(getattr(m, "quant_parameters", None))  # a Linear4bit (the glue imports no public module)
                    and m.in_features * m.out_features >= self.min_weights):
                self._handles.append(m.register_forward_pre_hook(self._before_forward))
                self._handles.append(m.register_forward_hook(self._after_forward))

    def _running(self, layer):
        last = self._last
        if last is not None and last is not layer:
            last.drop_caches()
        self._last = layer

    def _before_forward(self, module, args):
        if module.training:
            self._running(module)

    def _after_forward(self, module, args, output):
        if module.training and isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(lambda grad: self._running(module))

    # neither keeps nor changes the output (the gradient hook fires for the base's own output even when
    # LoraLinear4bit then sums the adapters into it in place), so that sum stays in place: pyqlora.nn
    _after_forward.output_untouched = True

    def remove(self):
        """Remove the hooks (the layers keep their decoded scales again)."""
        for h in self._handles:
            h.remove()
        self._handles = []


def _paged_copy(pager, a):
    """`a`'s bytes in a new pager array of the same shape and dtype (None stays None)."""
    if a is None:
        return None
    out = pager.empty(a.shape, a.dtype)
    out[...] = a
    return out


class PagedArena:
    """Consecutive layers' 4-bit arrays laid end to end in large allocations of a pager.

    Each array in its own allocation rounds every one up to whole pages (2 MiB) or
    packs the small ones into slabs: a layer's codes, scales and nested scales then
    cover more pages than their bytes, the budget holds fewer layers and every miss
    reads the padding too. Measured with ``benchmarks/eviction_sim.py`` and
    ``bench_scale.py`` (docs/scale.md): 12 % more bytes read per step at the 7B shape,
    29 % at a 6-block 1B, 2 % at 65B. End to end, in the order the layers are loaded
    (the order a forward reads them), only the pages at layer boundaries are shared.

    Parameters
    ----------
    pager : pyqlora.Pager
    chunk_bytes : int
        Size of each allocation (a larger array gets one of its own size). The unused
        tail of a chunk is never touched, so it takes neither RAM nor disk.
    """

    ALIGN = 64
    MIN_PAGES = 16

    @classmethod
    def for_pager(cls, pager):
        """An arena for `pager`, or None where separate allocations page better: a CUDA pager, or a
        budget of fewer than MIN_PAGES pages. Laid end to end, several small layers share one page,
        which a budget below a page can never evict; separate small arrays go to slabs paged in
        64 KiB units."""
        s = pager.stats()
        budget = s["budget_bytes"]
        if pager.device != "cpu" or (budget >= 0 and budget < cls.MIN_PAGES * s["page_bytes"]):
            return None
        return cls(pager)

    def __init__(self, pager, chunk_bytes=256 << 20):
        self.pager, self.chunk_bytes = pager, int(chunk_bytes)
        self._chunk, self._offset = None, 0

    def copy(self, a):
        """`a`'s bytes in the arena, as an array of the same shape and dtype (None stays None)."""
        if a is None:
            return None
        n = a.nbytes
        if self._chunk is None or self._offset + n > self._chunk.size:
            self._chunk, self._offset = self.pager.empty(max(self.chunk_bytes, n), np.uint8), 0
        out = self._chunk[self._offset:self._offset + n].view(a.dtype).reshape(a.shape)
        out[...] = a
        self._offset = -(-(self._offset + n) // self.ALIGN) * self.ALIGN
        return out


def place_in_pager(layer, pager, arena=None):
    """Move the 4-bit bytes of the ``Linear4bit`` `layer` into `pager` (a no-op if they are there).

    The layer's parameters then view pager memory (``torch.from_numpy``, no copy); the
    ordinary memory they held is released when nothing else refers to it. The copies are
    prefetched once, so that the pager's budget evicts older pages as the model is loaded.
    With a :class:`PagedArena` of `pager` the arrays go into it, end to end with the
    layers placed before; without, each gets an allocation of its own.

    Returns
    -------
    int
        Bytes placed (0 if nothing moved).
    """

    q = layer.quantized
    if _in_pager(pager, q.packed):  # (bytes mapped from a checkpoint file are pager memory already)
        return 0
    if arena is not None and arena.pager is not pager:
        raise ValueError("the arena belongs to another pager")
    copy = arena.copy if arena is not None else (lambda a: _paged_copy(pager, a))
    packed = copy(q.packed)
    absmax = copy(q.absmax)
    nested = copy(q.nested_absmax)
    layer.quantized = QuantizedArray(shape=q.shape, dtype=q.dtype, codebook=q.codebook, blocksize=q.blocksize,
                                     packed=packed, absmax=absmax, nested_absmax=nested,
                                     nested_offset=q.nested_offset)
    placed = [a for a in (packed, absmax, nested) if a is not None]
    for a in placed:
        if a.nbytes:
            pager.prefetch(a)  # most recently used: the budget evicts the layers loaded before
    return sum(a.nbytes for a in placed)


def _in_pager(pager, a):
    try:
        pager.prefetch(a[:0] if a.ndim else a)  # zero bytes: raises ValueError outside this pager's memory
    except ValueError:
        return False
    return True


def _layer_arrays(layer):
    t = layer._parameters
    return [x for x in (t["weight"], t["weight_absmax"], t.get("weight_nested_absmax")) if x is not None]


class BasePaging:
    """Prefetch hooks on every paged ``Linear4bit`` of a model (made by ``prepare_model(pager=...)``).

    Parameters
    ----------
    model : torch.nn.Module
    pager : pyqlora.Pager
    lookahead : int
        Layers prefetched ahead of the one computing (0: none, only the synchronous
        prefetch of each layer before it runs).

    Attributes
    ----------
    layers : list of (name, Linear4bit)
    """

    def __init__(self, model, pager, lookahead=2):
        if not isinstance(pager, _pager.Pager):
            raise TypeError(f"pager must be a pyqlora.Pager, got {type(pager).__name__}")
        if isinstance(lookahead, bool) or not isinstance(lookahead, int) or lookahead < 0:
            raise ValueError(f"lookahead must be a non-negative int, got {lookahead!r}")
        self.pager, self.lookahead = pager, lookahead
        # the 4-bit layers, known by their storage (the glue imports no public module: docs/architecture.md)
        self.layers = [(n, m) for n, m in model.named_modules() if callable(getattr(m, "quant_parameters", None))]
        self._index = {id(m): i for i, (_, m) in enumerate(self.layers)}
        self._order = []           # layer indices in the order the first forward ran them
        self._position = {}        # layer index -> position in _order
        self._recording = True
        self.wait_seconds = 0.0    # time spent making a layer's own bytes resident before it ran
        self.calls = 0
        self._last = None          # the layer that ran last (its decoded scales are dropped when the next runs)
        self._queue, self._cv, self._stop = [], threading.Condition(), False
        self._thread = threading.Thread(target=self._prefetcher, name="pyqlora-base-prefetch", daemon=True)
        self._thread.start()
        self._handles = []
        for _, m in self.layers:
            self._handles.append(m.register_forward_pre_hook(self._before_forward))
            self._handles.append(m.register_forward_hook(self._after_forward))

    # -- hooks ---------------------------------------------------------------------------------
    def _before_forward(self, module, args):
        i = self._index[id(module)]
        if self._recording:
            if i in self._position:  # the order repeats: the first pass is over
                self._recording = False
            else:
                self._position[i] = len(self._order)
                self._order.append(i)
        self._make_resident(module)
        if not self._recording:
            self._ahead(i, +1)

    def _after_forward(self, module, args, output):
        # Backward: a hook on the output's gradient, which arrives just before the layer's backward
        # reads the weight. Not a module backward hook: those insert identity nodes into the graph,
        # which changes the order in which autograd sums gradients (and so their last bits).
        if isinstance(output, torch.Tensor) and output.requires_grad:
            i = self._index[id(module)]

            def before_backward(grad):
                self._make_resident(module)
                self._ahead(i, -1)

            output.register_hook(before_backward)

    _after_forward.output_untouched = True  # as RunningLayerScales._after_forward

    def _make_resident(self, layer):
        # The decoded float32 block scales (an eighth of the codes' bytes) are ordinary memory, rebuilt
        # from the paged 8-bit scales when a layer runs: only the layer running holds them, never the base.
        last = self._last
        if last is not None and last is not layer:
            last.drop_caches()
        self._last = layer
        t0 = time.perf_counter()
        for t in _layer_arrays(layer):
            self.pager.prefetch(t)
        self.wait_seconds += time.perf_counter() - t0
        self.calls += 1

    def _ahead(self, i, direction):
        if not self.lookahead or i not in self._position:
            return
        # not past either end: after the last layer the recomputed forward or the backward uses it again,
        # after the first the next step starts with it (both resident); wrapping around read layers
        # that were evicted before their turn came (docs/scale.md, "Bytes read per step")
        n, p = len(self._order), self._position[i]
        nxt = [self.layers[self._order[p + direction * k]][1] for k in range(1, self.lookahead + 1)
               if 0 <= p + direction * k < n]
        if not nxt:
            return
        with self._cv:
            self._queue[:] = nxt  # only the newest request matters
            self._cv.notify()

    def _prefetcher(self):
        while True:
            with self._cv:
                while not self._queue and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                layers, self._queue[:] = list(self._queue), []
            for layer in layers:
                try:
                    for t in _layer_arrays(layer):
                        self.pager.prefetch(t)
                except ValueError:  # the pager was closed
                    return
                except OSError:  # a mapped checkpoint file changed: the layer's own prefetch raises it
                    break

    # -- report ----------------------------------------------------------------------------------
    def stats(self):
        """The pager's counters plus ``base_bytes`` (the paged layers' bytes), ``wait_seconds``
        and ``layer_calls`` (synchronous prefetches before a layer ran)."""
        s = dict(self.pager.stats())
        s["base_bytes"] = int(sum(sum(t.nbytes for t in _layer_arrays(m)) for _, m in self.layers))
        s["wait_seconds"], s["layer_calls"] = self.wait_seconds, self.calls
        return s

    def remove(self):
        """Remove the hooks and stop the prefetch thread (the bytes stay in the pager)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join()

    def __del__(self):
        try:
            with self._cv:
                self._stop = True
                self._cv.notify()
        except Exception:  # interpreter shutdown
            pass

