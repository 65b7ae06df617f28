"""Bytes held and resident memory: each quantity defined once, for every report that shows it.

``pyqlora finetune``'s report, ``pyqlora.distributed`` and the benchmarks all
count with these functions, so a figure means the same everywhere.
"""
import ctypes
import resource

import torch

from .dtensor import local

__all__ = ["limit_heap_retention", "memory_status", "optimizer_state_bytes", "parameter_bytes", "peak_rss_bytes",
           "reset_peak_memory", "tensor_bytes", "trim_heap"]


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


def trim_heap():
    """Return the free memory at the top of glibc's heaps to the kernel (``malloc_trim(0)``); False if not glibc."""
    libc = _libc()
    return bool(libc is not None and libc.malloc_trim(0))
