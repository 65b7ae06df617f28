"""Threads and instruction-set path of the nf4core kernels."""
import contextlib
import contextvars
import os
import sys

from . import _nf4core as _rt  # bindings/runtime.pxi

__all__ = [
    "ISAS",
    "amx_available",
    "get_amx",
    "get_isa",
    "get_num_threads",
    "get_threading",
    "num_threads",
    "set_amx",
    "set_isa",
    "set_num_threads",
    "set_threading",
]

#: Kernel paths, best first; "auto" picks the best one this CPU supports.
ISAS = ("avx512", "avx2", "neon", "scalar")

_state = {"user": None}  # threads chosen by the user (set_num_threads / PYQLORA_NUM_THREADS), else None
_default = _rt.get_num_threads()  # CPUs this process may use, or NF4CORE_NUM_THREADS
# The count of the innermost `with num_threads(n)` block of the running context
# (0: none). A context variable, so that each thread (and each asyncio task) has
# its own; nf4core keeps the same value per OS thread (nf4_set_thread_num_threads),
# set on entering and leaving a block and re-synced before every kernel call.
_override = contextvars.ContextVar("pyqlora_num_threads", default=0)


def _env_threads():
    v = os.environ.get("PYQLORA_NUM_THREADS")
    if v is None:
        return None
    try:
        n = int(v)
    except ValueError:
        raise ValueError(f"PYQLORA_NUM_THREADS must be a positive integer, got {v!r}") from None
    if n < 1:
        raise ValueError(f"PYQLORA_NUM_THREADS must be a positive integer, got {v!r}")
    return n


def set_num_threads(n):
    """Set the number of threads the kernels use (``None`` or 0: automatic).

    Automatic means: the CPUs this process may run on (or the
    ``NF4CORE_NUM_THREADS`` environment variable), but never more than torch's
    own thread count when torch is imported, so that pyqlora and torch do not
    oversubscribe the cores (inside a DataLoader worker torch uses 1 thread,
    and so does pyqlora). ``PYQLORA_NUM_THREADS`` sets it at import. Results
    are identical for every thread count; inputs below about 64 Ki elements
    per thread run on the calling thread.

    Examples
    --------
    >>> import pyqlora as pq
    >>> pq.set_num_threads(1); pq.get_num_threads()
    1
    >>> pq.set_num_threads(None)
    """
    n = _check_threads(n)
    if n == 0:
        _state["user"] = None
        _rt.set_num_threads(_default)
        return
    _rt.set_num_threads(n)
    _state["user"] = n


def _check_threads(n):
    """n as an int (0 for None), or ValueError naming the value."""
    if n is None:
        return 0
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"number of threads must be a positive integer or None, got {n!r}")
    if n > 1024:
        raise ValueError(f"number of threads must be at most 1024, got {n}")
    return n


def _automatic():
    n = _default
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "get_num_threads"):
        n = max(1, min(n, torch.get_num_threads()))
    return n


def sync_threads():
    """Before a kernel call (internal, cheap): tell nf4core this context's
    ``num_threads`` block, and apply the automatic process-wide count."""
    o = _override.get()
    if o != _rt.get_thread_num_threads():
        _rt.set_thread_num_threads(o)
    if _state["user"] is None:
        n = _automatic()
        if n != _rt.get_num_threads():
            _rt.set_num_threads(n)


def get_num_threads():
    """Number of threads the next kernel call from this thread will use.

    Inside a :func:`num_threads` block, that block's count; otherwise the
    process-wide count (:func:`set_num_threads`).
    """
    sync_threads()
    return _override.get() or _rt.get_num_threads()


@contextlib.contextmanager
def num_threads(n):
    """Context manager: kernels called from this thread use `n` threads inside the block.

    The setting belongs to the calling thread (and asyncio task) only: other
    threads keep theirs, and the process-wide count of
    :func:`set_num_threads` is not changed, so blocks in several threads may
    overlap freely. Blocks nest; leaving one, normally or by an exception,
    restores the count of the enclosing one. ``None`` (or 0) means the
    automatic count (see :func:`set_num_threads`), taken on entering.

    Examples
    --------
    >>> import numpy as np, pyqlora as pq
    >>> with pq.num_threads(1):
    ...     q = pq.quantize(np.ones(1 << 20, np.float32))
    ...     pq.get_num_threads()
    1
    """
    n = _check_threads(n) or _automatic()
    _rt.set_thread_num_threads(n)  # raises (more than 1024) before anything changed
    token = _override.set(n)
    try:
        yield
    finally:
        _override.reset(token)
        _rt.set_thread_num_threads(_override.get())


def set_threading(name="auto"):
    """Choose the threads that help the calling thread: "auto", "pool" or "openmp".

    "auto" (the default): where an OpenMP runtime is loaded into the process
    (torch's CPU build loads libgomp), the kernels' tasks run on its threads,
    the ones torch's own ops use; otherwise on nf4core's own pool. "pool": always
    the pool. "openmp": as "auto", but raises ValueError where no OpenMP runtime
    is loaded.

    Why: after every torch op, OpenMP's threads spin on the cores for a while.
    Work handed to them starts at once; a pool thread woken next to such a
    spinner often got no core during the call, so that two threads ran at one
    thread's speed (a 4096 x 4096 GEMV between torch ops: 0.86 against 0.44-0.48
    ms; docs/performance.md). The pool's advantage: it never waits for a late
    helper, where an OpenMP call ends only when every team thread has run. On a
    machine where other processes take the cores, that can cost a scheduler
    time slice (milliseconds), as it does for torch's own ops; there "pool" may
    be better. Results are identical either way. ``NF4CORE_THREADING=pool`` in
    the environment selects the pool at start-up.

    Examples
    --------
    >>> import pyqlora as pq
    >>> pq.set_threading("pool"); pq.get_threading()
    'pool'
    >>> import torch  # loads libgomp (torch's CPU build)
    >>> pq.set_threading("auto"); pq.get_threading()
    'openmp'
    """
    _rt.set_threading(name)


def get_threading():
    """The threads the next kernel call uses: "pool" or "openmp" (see :func:`set_threading`)."""
    return _rt.get_threading()


def set_isa(name="auto"):
    """Force a kernel path: "auto", "avx512", "avx2", "neon" or "scalar".

    Every path gives byte-identical results; forcing one is for testing and
    benchmarking. The environment variable ``NF4CORE_ISA`` does the same at
    start-up. Raises ValueError for a path this build or CPU lacks.
    """
    _rt.set_isa(name)


def get_isa():
    """The kernel path in use, e.g. "avx512"."""
    return _rt.get_isa()


def available_isas():
    """Kernel paths usable on this machine, best first."""
    return [name for name in ISAS if _rt.isa_available(name)]


def amx_available():
    """Whether this build, CPU and OS can run AMX-BF16 tile instructions.

    True on Intel Xeon 4th generation (Sapphire Rapids) and later under Linux.
    """
    return _rt.amx_available()


def set_amx(enabled):
    """Allow (the default) or forbid AMX tiles in :func:`pyqlora.matmul_4bit`.

    With AMX in use, bfloat16 x with 5 or more rows is multiplied on AMX tiles
    by panels of W decoded to bfloat16 (the values of
    ``dequantize(q, dtype="bfloat16")``), float32 sums. Forbidding it selects
    the vector kernel, which multiplies by the float32 weight values (slower at
    many rows). ``NF4CORE_AMX=0`` in the environment forbids it at start-up.
    Raises ValueError when allowing it where :func:`amx_available` is False.

    Examples
    --------
    >>> import pyqlora as pq
    >>> pq.set_amx(False); pq.get_amx()
    False
    >>> pq.set_amx(pq.amx_available())
    """
    _rt.set_amx(bool(enabled))


def get_amx():
    """Whether :func:`pyqlora.matmul_4bit` uses AMX tiles now (available, allowed,
    and the "avx512" kernel path active)."""
    return _rt.get_amx()


_env = _env_threads()
if _env is not None:
    set_num_threads(_env)
