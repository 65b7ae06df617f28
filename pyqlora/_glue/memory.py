"""Bytes held and resident memory: each quantity defined once, for every report that shows it.

``pyqlora finetune``'s report, ``pyqlora.distributed`` and the benchmarks all
count with these functions, so a figure means the same everywhere.
"""
import ctypes
import os
import resource
import threading
import time

import torch

from .dtensor import local

__all__ = ["bound_heap", "heap_bound_stats", "limit_heap_retention", "memory_status", "optimizer_state_bytes",
           "parameter_bytes", "peak_rss_bytes", "reset_peak_memory", "tensor_bytes", "trim_heap"]


def tensor_bytes(model):
    """Bytes of a module's parameters and buffers, each tensor counted once (tied weights share one)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def parameter_bytes(model):
    """Bytes of parameters and buffers this rank holds (the local shard of each DTensor).

    Returns
    -------
    dict
        ``{"frozen": ..., "trainable": ..., "buffers": ..., "total": ...}``.
    """
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    out = {"frozen": 0, "trainable": 0, "buffers": 0}
    for p in model.parameters():
        out["trainable" if p.requires_grad else "frozen"] += local(p).numel() * p.element_size()
    for b in model.buffers():
        out["buffers"] += local(b).numel() * b.element_size()
    out["total"] = sum(out.values())
    return out


def optimizer_state_bytes(optimizer, own_count=False):
    """Bytes of optimizer state this rank holds.

    Every tensor in ``optimizer.state`` (moments, 8-bit codes and scales, step
    counters) is counted by its local part under FSDP2, whole under DDP. With
    ``own_count``, an optimizer that counts its own state (``state_bytes()``:
    pyqlora's paged optimizers, which give the bytes of their moments in paged
    memory, resident or spilled, without the step counters) is asked instead.
    """
    if own_count and callable(getattr(optimizer, "state_bytes", None)):
        return int(optimizer.state_bytes())
    n = 0
    for st in optimizer.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                n += local(v).numel() * v.element_size()
    return n


def memory_status():
    """This process's resident memory now and at its peak, from ``/proc/self/status`` (bytes; Linux).

    Returns
    -------
    dict
        ``{"rss": VmRSS, "peak_rss": VmHWM, "rss_anon": RssAnon, "rss_file": RssFile}``
        (RssFile: pages of mapped files, e.g. a memory-mapped checkpoint, which the
        kernel can drop under pressure); values are None where unavailable.
        ``peak_rss`` restarts from the current RSS after :func:`reset_peak_memory`.
    """
    names = {"VmRSS": "rss", "VmHWM": "peak_rss", "RssAnon": "rss_anon", "RssFile": "rss_file"}
    out = dict.fromkeys(names.values())
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in names:
                    out[names[key]] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def reset_peak_memory():
    """Reset this process's peak resident memory (VmHWM) to its current RSS; False if Linux refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes():
    """The process's peak resident memory as ``getrusage`` reports it (``ru_maxrss``).

    The kernel's high-water mark, as ``memory_status()["peak_rss"]``, except that it
    also covers what a forking parent held before ``exec`` (so a child of a large
    process reports the parent's peak); :func:`reset_peak_memory` lowers both.
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 (glibc only: musl and others lack them)
        return libc
    except (OSError, AttributeError):
        return None


def limit_heap_retention(mmap_threshold=1 << 20):
    """Have glibc give every allocation of `mmap_threshold` bytes or more its own mapping, returned on free.

    glibc raises its mmap threshold each time a mapped block is freed (up to 32 MiB), so
    after a few steps the activations, logits and gradients of training (megabytes each)
    come from the heap, which it keeps after they are freed, fragmented: about 0.4 GiB
    above the live tensors for a 6-layer 1B-shape Llama at 512 tokens, and more with more
    layers (``benchmarks/bench_scale.py``; ``docs/scale.md``). A fixed threshold also stops
    that adjustment. The same as ``MALLOC_MMAP_THRESHOLD_=1048576`` in the environment.
    Process-wide; returns False where the C library is not glibc.
    """
    if not isinstance(mmap_threshold, int) or isinstance(mmap_threshold, bool) or mmap_threshold < 0:
        raise ValueError(f"mmap_threshold must be a non-negative int, got {mmap_threshold!r}")
    libc = _libc()
    return bool(libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold))


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                       "fsmblks", "uordblks", "fordblks", "keepcost")]


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_bound = {"thread": None, "stop": None, "stats": None}
_bound_lock = threading.Lock()


def _anon_rss():
    """Resident bytes not backed by a file (``/proc/self/statm``: resident - shared)."""
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    return (int(fields[1]) - int(fields[2])) * _PAGE


def _watch_heap(libc, retain, interval, stop, stats):
    info = libc.mallinfo2
    libc.malloc_trim(0)

    def held():  # resident anonymous memory that malloc does not count as in use: its free heap, and the rest
        m = info()
        return _anon_rss() - m.uordblks - m.hblkhd

    floor = held()
    while not stop.wait(interval):
        now = held()
        if now < floor:  # memory outside malloc was released: follow it down
            floor = now
        elif now > floor + retain:
            t0 = time.perf_counter()
            libc.malloc_trim(0)
            stats["trims"] += 1
            stats["trim_seconds"] += time.perf_counter() - t0
            after = held()
            stats["returned_bytes"] += max(0, now - after)
            # what a trim cannot return is not heap (a pager's pages, a mapped file): the new floor
            floor = max(floor, after)


def bound_heap(retain_bytes=1 << 30, interval=0.01):
    """Keep glibc's heap for reuse, but return its free memory to the kernel whenever more than `retain_bytes` of it
    is resident.

    glibc serves training's activations (megabytes each, up to its 32 MiB mmap
    threshold) from its heap and reuses them without new page faults, but the heap
    fragments: at 7B, 1 x 512 tokens (AMD EPYC Zen 4, 2 threads), it held 9.94 GiB at its
    peak where 5.15 were live (``docs/scale.md``). :func:`limit_heap_retention` avoids that by mapping every
    large block afresh, which costs a page fault per 4 KiB of every activation
    (84-88 % of dense there, against 99 % with glibc's heap). This keeps the heap and
    watches it instead (94-102 % in 5.8 GiB on that Zen 4, with the adapters summed in
    place; 81-87 % on an Intel Xeon, whose dense GEMM is 1.7x faster): a daemon
    thread reads, every `interval` seconds, the resident anonymous memory that malloc
    does not count as in use, and calls ``malloc_trim(0)`` (which also returns free
    pages inside the heap) when it grew more than `retain_bytes` above its level
    after the last trim. Memory outside malloc (a pager's pages) raises that level
    rather than causing repeated trims.

    Process-wide; calling it again changes the bound. Returns False where the C
    library is not glibc 2.33 or later (no ``mallinfo2``) or ``/proc`` is missing, and
    then does nothing. :func:`heap_bound_stats` counts the trims;
    ``bound_heap(None)`` stops the thread.
    """
    if retain_bytes is not None and (not isinstance(retain_bytes, int) or isinstance(retain_bytes, bool)
                                     or retain_bytes < 0):
        raise ValueError(f"retain_bytes must be a non-negative int or None, got {retain_bytes!r}")
    if not isinstance(interval, (int, float)) or isinstance(interval, bool) or not 0 < interval <= 10:
        raise ValueError(f"interval must be a number of seconds in (0, 10], got {interval!r}")
    with _bound_lock:
        if _bound["thread"] is not None:
            _bound["stop"].set()
            _bound["thread"].join()
            _bound["thread"] = None
        if retain_bytes is None:
            return True
        libc = _libc()
        if libc is None or not hasattr(libc, "mallinfo2"):
            return False
        try:
            _anon_rss()
        except (OSError, ValueError, IndexError):
            return False
        libc.mallinfo2.restype = _Mallinfo2
        stop, stats = threading.Event(), {"trims": 0, "trim_seconds": 0.0, "returned_bytes": 0,
                                          "retain_bytes": retain_bytes}
        thread = threading.Thread(target=_watch_heap, args=(libc, retain_bytes, float(interval), stop, stats),
                                  name="pyqlora-heap-bound", daemon=True)
        thread.start()
        _bound.update(thread=thread, stop=stop, stats=stats)
        return True


def heap_bound_stats():
    """What :func:`bound_heap`'s thread did: ``{"trims", "trim_seconds", "returned_bytes", "retain_bytes"}``
    (a copy), or None when it is not running."""
    stats = _bound["stats"] if _bound["thread"] is not None else None
    return dict(stats) if stats is not None else None


def trim_heap():
    """Return the free memory at the top of glibc's heaps to the kernel (``malloc_trim(0)``); False if not glibc."""
    libc = _libc()
    return bool(libc is not None and libc.malloc_trim(0))
