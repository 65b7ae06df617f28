"""Paged memory: numpy arrays whose bytes move between a fast and a slow tier.

Host backend: RAM and a spill file. CUDA backend (``device="cuda"``): one
GPU's memory and host RAM, through CUDA managed memory (compiled, not yet run
on GPU hardware). The pager itself is nf4core's
(``nf4core/include/nf4core/pager.h``); this module validates arguments and
ties the lifetime of each allocation to the arrays that view it. See
``docs/pager.md`` for the design.
"""
import operator
import os
import warnings

import numpy as np

from . import _nf4core as _c  # bindings/pager.pxi
from ._dtypes import bfloat16

__all__ = ["Pager"]


class _Allocation:
    """One pager allocation; the ``base`` of every array on it.

    numpy keeps it alive through ``ndarray.base``, so the region is freed when
    the last array viewing it is garbage collected. It holds the C pager
    handle, so the pager outlives its arrays even after ``Pager.close()``.
    """

    __slots__ = ("__weakref__", "_handle", "_nbytes", "_ptr")

    def __init__(self, handle, nbytes):
        self._handle = handle
        self._ptr = 0
        self._ptr = handle.alloc(max(nbytes, 1))
        self._nbytes = nbytes

    @property
    def __array_interface__(self):
        return {"data": (self._ptr, False), "shape": (self._nbytes,), "typestr": "|u1", "version": 3}

    def __del__(self):
        if self._ptr:
            ptr, self._ptr = self._ptr, 0
            self._handle.free(ptr)


class _FileMapping(_Allocation):
    """A read-only mapping of a file range in a pager; the ``base`` of the arrays on it (see _Allocation)."""

    __slots__ = ("path", "offset")

    def __init__(self, handle, path, offset, nbytes):
        self._handle = handle
        self._ptr = 0
        self._ptr = handle.map_file(path, offset, nbytes)
        self._nbytes = nbytes
        self.path, self.offset = os.fsdecode(path), offset

    @property
    def __array_interface__(self):
        return dict(super().__array_interface__, data=(self._ptr, True))  # read-only


def _check_size(value, name, allow_none=True):
    if value is None and allow_none:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer or None, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer or None, got {type(value).__name__}") from None


def _normalize_shape(shape):
    if isinstance(shape, bool):
        raise TypeError(f"shape must be an int or a tuple of ints, got {shape!r}")
    try:
        dims = (operator.index(shape),)
    except TypeError:
        try:
            dims = tuple(shape)
        except TypeError:
            raise TypeError(f"shape must be an int or a tuple of ints, got {type(shape).__name__}") from None
        for d in dims:
            if isinstance(d, bool):
                raise TypeError(f"shape must be an int or a tuple of ints, got {shape!r}")
            try:
                operator.index(d)
            except TypeError:
                raise TypeError(f"shape must be an int or a tuple of ints, got {shape!r}") from None
        dims = tuple(operator.index(d) for d in dims)
    if any(d < 0 for d in dims):
        raise ValueError(f"shape must not have negative dimensions, got {dims}")
    return dims


def _normalize_dtype(dtype):
    if isinstance(dtype, str) and dtype == "bfloat16" and bfloat16 is not None:
        return bfloat16
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"dtype: {dtype!r} is not a numpy dtype") from exc
    if dt.hasobject:
        raise TypeError(f"dtype {dt} holds Python objects, which cannot live in pager memory")
    if dt.itemsize == 0:
        raise TypeError(f"dtype {dt} has no fixed size; give its length (e.g. 'S8')")
    return dt


def _parse_device(device):
    """None/"cpu" -> -1 (host backend); "cuda", "cuda:N", N >= 0 or a torch.device -> N."""
    if device is None:
        return -1
    if isinstance(device, bool):
        raise TypeError(f"device must be None, 'cpu', 'cuda', 'cuda:N' or a device index, got {device!r}")
    if isinstance(device, int):
        if device < 0:
            raise ValueError(f"device must be a CUDA device index >= 0, got {device}")
        return device
    kind = getattr(device, "type", None)  # torch.device
    if kind is not None:
        index = getattr(device, "index", None)
        device = kind if index is None else f"{kind}:{index}"
    if not isinstance(device, str):
        raise TypeError(f"device must be None, 'cpu', 'cuda', 'cuda:N' or a device index, got {type(device).__name__}")
    if device == "cpu":
        return -1
    if device == "cuda":
        return 0
    if device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    raise ValueError(f"device must be None, 'cpu', 'cuda' or 'cuda:N', got {device!r}")


class _CudaView:
    """``__cuda_array_interface__`` of a CUDA-pager array (keeps the array alive)."""

    __slots__ = ("__cuda_array_interface__", "_array")

    def __init__(self, array, typestr):
        self._array = array
        self.__cuda_array_interface__ = {
            "shape": array.shape,
            "typestr": typestr,
            "data": (array.__array_interface__["data"][0], False),
            "strides": array.strides,
            "version": 3,
        }


def _byte_range(a, cuda=False):
    """(address, nbytes) of the memory spanned by an array or a tensor, without copying.

    With ``cuda`` (a CUDA pager), CUDA tensors and ``__cuda_array_interface__``
    objects are accepted too: managed memory has one address on both sides.
    """
    if cuda and hasattr(a, "__cuda_array_interface__") and not hasattr(a, "data_ptr"):
        iface = a.__cuda_array_interface__
        ptr, shape = iface["data"][0], tuple(iface["shape"])
        itemsize = np.dtype(iface["typestr"]).itemsize
        strides = iface.get("strides")
        if strides is None:
            strides, step = [], itemsize
            for d in reversed(shape):
                strides.append(step)
                step *= d
            strides = tuple(reversed(strides))
    elif isinstance(a, np.ndarray) or hasattr(a, "__array_interface__"):
        arr = np.asarray(a)
        ptr = arr.__array_interface__["data"][0]
        shape, strides, itemsize = arr.shape, arr.strides, arr.itemsize
    elif callable(getattr(a, "data_ptr", None)) and callable(getattr(a, "stride", None)):
        device = getattr(a, "device", None)
        kind = getattr(device, "type", "cpu") if device is not None else "cpu"
        if kind != "cpu" and not (cuda and kind == "cuda"):
            where = "CUDA pager" if cuda else "host pager"
            raise ValueError(f"a: a tensor on {device} cannot be in {where} memory")
        ptr, itemsize = a.data_ptr(), a.element_size()
        shape = tuple(a.shape)
        strides = tuple(s * itemsize for s in a.stride())
    else:
        raise TypeError(f"a must be a numpy array or a torch tensor on pager memory, got {type(a).__name__}")
    if 0 in shape:
        return ptr, 0
    lo = ptr + sum((n - 1) * s for n, s in zip(shape, strides) if s < 0)
    hi = ptr + sum((n - 1) * s for n, s in zip(shape, strides) if s > 0) + itemsize
    return lo, hi - lo


class Pager:
    """Memory with a fast-tier budget: host RAM over a spill file, or GPU memory over RAM.

    Arrays from :meth:`zeros` and :meth:`empty` are ordinary numpy arrays (and
    ``torch.from_numpy`` shares them without a copy) whose memory nf4core pages
    in units of ``page_bytes``: :meth:`prefetch` makes an array resident and
    most recently used, then writes the least recently used pages of other
    arrays back to the spill file until the resident bytes fit
    ``budget_bytes``; :meth:`evict` does so on demand. Touching a spilled
    array without prefetching it is still correct (the OS faults it in).
    Host backend: small arrays (up to 256 KiB) share pages, packed into
    slabs paged in units of ``min(page_bytes, 64 KiB)``, so thousands of
    them cost what their bytes cost; prefetching or evicting one acts on the
    units that hold it, neighbours included (``docs/pager.md``).

    Parameters
    ----------
    budget_bytes : int or None
        Bytes of RAM the pager's arrays may hold after a prefetch; ``None``
        means unlimited (pages leave RAM only through :meth:`evict`). One
        prefetched range larger than the budget stays resident whole.
    spill_dir : str or os.PathLike or None
        Directory of the spill file (created unlinked: nothing is left behind).
        ``None``: ``$TMPDIR``, ``/var/tmp`` or ``/tmp``, preferring one that is
        not a tmpfs. On a tmpfs eviction cannot free RAM; a warning says so.
    page_bytes : int or None
        Paging unit, a positive multiple of the OS page size; ``None`` means
        2 MiB.
    device : None, "cpu", "cuda", "cuda:N", int or torch.device
        ``None``/``"cpu"``: the host backend above. A CUDA device: the CUDA
        backend, where ``budget_bytes`` limits *device* memory. Arrays are
        CUDA managed memory (one address on the host and the device): the
        numpy arrays from :meth:`zeros` read and write them on the host and
        :meth:`as_tensor` gives a torch CUDA tensor on the same bytes;
        :meth:`prefetch` moves pages to the device (``cudaMemPrefetchAsync``
        on the pager's stream, :meth:`set_stream`), evicting least recently
        used pages to host RAM; ``resident_bytes`` counts the pages the
        pager moved to the device. ``spill_dir`` must be ``None``. On a device
        without concurrent managed access (Windows, WSL, old GPUs) the pager
        cannot move pages: it keeps its counters, moves nothing, and
        :meth:`evict` / :meth:`synchronize` synchronize the device so that the
        host may touch the arrays afterwards (a ``RuntimeWarning`` says so).
        Status: compiled, not yet run on GPU hardware.
    managed_prefetch : bool
        CUDA backend only: ``False`` forces the mode of devices without
        concurrent managed access (for tests and comparisons).

    Notes
    -----
    Each allocation is freed when the last array viewing it is garbage
    collected. :meth:`close` makes the pager unusable at once but defers
    unmapping until its arrays are gone, so no array ever dangles. Methods are
    thread-safe and release the GIL. Errors of the spill file (directory not
    usable, disk full, file-size limit) raise ``OSError`` with the errno;
    existing arrays stay intact.

    Examples
    --------
    >>> import numpy as np, pyqlora as pq
    >>> with pq.Pager(budget_bytes=4 << 20) as pager:
    ...     m = pager.zeros((1024, 1024), dtype=np.float32)    # 4 MiB, all spilled
    ...     v = pager.zeros((1024, 1024), dtype=np.float32)
    ...     pager.prefetch(m); m += 1.0
    ...     pager.prefetch(v)                               # m goes back to the file
    ...     s = pager.stats()
    >>> s["resident_bytes"] <= 4 << 20, float(m.sum())
    (True, 1048576.0)
    """

    def __init__(self, budget_bytes=None, spill_dir=None, page_bytes=None, device=None, managed_prefetch=True):
        budget = _check_size(budget_bytes, "budget_bytes")
        if budget is not None and budget < 0:
            raise ValueError(f"budget_bytes must be >= 0 or None (unlimited), got {budget}")
        page = _check_size(page_bytes, "page_bytes")
        os_page = _c.pager_os_page_size()
        if page is not None and (page <= 0 or page % os_page):
            raise ValueError(f"page_bytes must be a positive multiple of the OS page size ({os_page}), got {page}")
        if spill_dir is not None and not isinstance(spill_dir, (str, bytes, os.PathLike)):
            raise TypeError(f"spill_dir must be a path or None, got {type(spill_dir).__name__}")
        dev = _parse_device(device)
        if dev >= 0 and spill_dir is not None:
            raise ValueError("spill_dir applies to the host pager only; a CUDA pager spills to host RAM")
        if not isinstance(managed_prefetch, bool):
            raise TypeError(f"managed_prefetch must be a bool, got {type(managed_prefetch).__name__}")
        cdir = None if spill_dir is None else os.fsencode(spill_dir)
        if cdir is not None and b"\0" in cdir:  # C would stop at the NUL and spill elsewhere
            raise ValueError(f"spill_dir contains a NUL character: {spill_dir!r}")
        self._handle = _c.PagerHandle(-1 if budget is None else budget, cdir, 0 if page is None else page, dev,
                                      not managed_prefetch)
        self._budget = budget
        if dev >= 0 and managed_prefetch and not self._handle.concurrent_managed:
            warnings.warn(
                f"CUDA device {dev} has no concurrent managed access: the pager cannot move pages (the budget is "
                "bookkeeping only); call evict() or synchronize() before touching its arrays on the host",
                RuntimeWarning,
                stacklevel=2,
            )
        if self._handle.spill_is_tmpfs:
            warnings.warn(
                f"pager spill directory {self._handle.spill_dir!r} is a tmpfs: eviction cannot return memory "
                "to the OS there; pass spill_dir= on a disk",
                RuntimeWarning,
                stacklevel=2,
            )

    # -- state -------------------------------------------------------------------------------
    def _h(self):
        h = self._handle
        if h is None:
            raise ValueError("the pager is closed")
        return h

    @property
    def closed(self):
        """True after :meth:`close`."""
        return self._handle is None

    @property
    def spill_dir(self):
        """Directory of the spill file."""
        return self._h().spill_dir

    @property
    def spill_is_tmpfs(self):
        """True if the spill file is on a tmpfs, where eviction cannot free RAM."""
        return self._h().spill_is_tmpfs

    @property
    def budget_bytes(self):
        """The fast-tier budget (RAM, or device memory for a CUDA pager), or None for unlimited."""
        return self._budget

    @property
    def device(self):
        """``"cpu"`` for the host backend, ``"cuda:N"`` for the CUDA backend."""
        d = self._h().device
        return "cpu" if d < 0 else f"cuda:{d}"

    @property
    def concurrent_managed(self):
        """CUDA pager: True if prefetch and eviction move pages (False in the fallback mode); host: False."""
        return self._h().concurrent_managed

    @property
    def page_bytes(self):
        """The paging unit in bytes."""
        return self._h().stats()["page_bytes"]

    # -- allocation --------------------------------------------------------------------------
    def empty(self, shape, dtype=np.float32):
        """A new C-contiguous array on pager memory (its contents happen to be zeros).

        Parameters
        ----------
        shape : int or tuple of int
        dtype : data-type, default float32
            Any fixed-size numpy dtype (``"bfloat16"`` too), not ``object``.

        Returns
        -------
        numpy.ndarray
            Writable; its ``base`` owns the allocation.
        """
        shape = _normalize_shape(shape)
        dt = _normalize_dtype(dtype)
        count = 1
        for d in shape:
            count *= d
        nbytes = count * dt.itemsize
        if nbytes >= 1 << 62:
            raise ValueError(f"shape {shape} of {dt} needs {nbytes} bytes, more than the pager can map")
        owner = _Allocation(self._h(), nbytes)
        return np.asarray(owner).view(dt).reshape(shape)

    def zeros(self, shape, dtype=np.float32):
        """A new zero-filled C-contiguous array on pager memory (see :meth:`empty`)."""
        return self.empty(shape, dtype)  # pager memory is always zero-filled when allocated

    def map_file(self, path, offset, shape, dtype=np.uint8):
        """A read-only array viewing bytes of a file, paged from the file itself (host pager).

        The bytes ``[offset, offset + nbytes)`` of `path` are mapped read-only
        (no copy, nothing written to the spill file): :meth:`prefetch` reads
        them into RAM, the budget evicts them like any pager memory (they are
        clean, so eviction only drops them) and :meth:`stats` counts them
        (``mapped_bytes``, ``mapped_resident_bytes``). Mappings of one file
        share one descriptor. This is how a 4-bit checkpoint is paged without
        writing its bytes a second time (``docs/pager.md``, *File-backed pages*).

        The file must not change while mapped. Its size, modification time and
        identity are recorded now and checked on every :meth:`prefetch` of the
        array: a changed file raises ``OSError`` (errno ``ESTALE``) naming it,
        before any of its pages is touched. Reading the array yourself after
        the file was truncated, without a prefetch, is a ``SIGBUS`` as with
        any memory-mapped file (``numpy.memmap`` too).

        Parameters
        ----------
        path : str or os.PathLike
            A regular file.
        offset : int
            Byte offset of the first element in the file, >= 0; any alignment
            (an offset that is not a multiple of the dtype's size gives an
            unaligned array, which numpy handles and torch copies).
        shape : int or tuple of int
            At least one element.
        dtype : data-type, default uint8
            Fixed-size numpy dtype (``"bfloat16"`` too); the file's bytes are
            read in native byte order.

        Returns
        -------
        numpy.ndarray
            C-contiguous, ``writeable=False``; its ``base`` owns the mapping,
            unmapped when the last view is collected.

        Raises
        ------
        ValueError
            A closed pager, a CUDA pager, an empty shape, a negative offset, a
            range that runs past the end of the file, a path that is not a
            regular file.
        OSError
            The file cannot be opened (``FileNotFoundError``, ``PermissionError``...).

        Examples
        --------
        >>> import os, tempfile, numpy as np, pyqlora as pq
        >>> path = os.path.join(tempfile.mkdtemp(), "w.bin")
        >>> np.arange(1000, dtype=np.float32).tofile(path)
        >>> with pq.Pager(budget_bytes=1 << 20) as pager:
        ...     w = pager.map_file(path, offset=400, shape=(10, 10), dtype=np.float32)
        ...     pager.prefetch(w)
        ...     print(float(w[0, 0]), w.flags.writeable, pager.stats()["spill_file_bytes"])
        100.0 False 0
        """
        h = self._h()
        if h.device >= 0:
            raise ValueError("map_file: a CUDA pager cannot map files (managed memory is not file-backed); "
                             "use a host pager")
        if not isinstance(path, (str, bytes, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
        cpath = os.fsencode(path)
        if not cpath or b"\0" in cpath:
            raise ValueError(f"path must be a non-empty path without NUL characters, got {path!r}")
        offset = _check_size(offset, "offset", allow_none=False)
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        shape = _normalize_shape(shape)
        dt = _normalize_dtype(dtype)
        count = 1
        for d in shape:
            count *= d
        nbytes = count * dt.itemsize
        if nbytes == 0:
            raise ValueError(f"map_file: shape {shape} has no elements; there is nothing to map")
        if nbytes >= 1 << 62 or offset >= 1 << 62:
            raise ValueError(f"map_file: {nbytes} bytes at offset {offset} is more than the pager can map")
        owner = _FileMapping(h, cpath, offset, nbytes)
        a = np.asarray(owner).view(dt).reshape(shape)
        a.flags.writeable = False
        return a

    # -- paging ------------------------------------------------------------------------------
    def prefetch(self, a):
        """Make `a` resident and most recently used, then evict to fit the budget.

        Parameters
        ----------
        a : numpy.ndarray or torch.Tensor
            An array from this pager, a view into one, or a CPU tensor sharing
            its memory (``torch.from_numpy``).

        Raises
        ------
        ValueError
            If `a` does not lie in memory of this pager.
        """
        h = self._h()
        ptr, nbytes = _byte_range(a, cuda=h.device >= 0)
        h.prefetch(ptr, nbytes)

    def evict(self, a=None):
        """Write pages back to the spill file and return their RAM to the OS.

        Parameters
        ----------
        a : numpy.ndarray or torch.Tensor or None
            What to evict (whole pages covering it); ``None`` evicts everything.
            The data stays readable: it is faulted back in on use.
        """
        h = self._h()
        if a is None:
            h.evict_all()
        else:
            ptr, nbytes = _byte_range(a, cuda=h.device >= 0)
            h.evict(ptr, nbytes)

    def synchronize(self):
        """Wait until every page move enqueued so far has finished.

        CUDA pager: waits for the pager's stream (in the fallback mode for the
        whole device, after which the host may touch the arrays). Host pager:
        nothing to wait for.
        """
        self._h().synchronize()

    def set_stream(self, stream):
        """CUDA pager: enqueue prefetches and evictions on `stream` from now on.

        Parameters
        ----------
        stream : torch.cuda.Stream or int or None
            A stream object with a ``cuda_stream`` handle, a raw
            ``cudaStream_t`` as an int, or ``None``/0 for the legacy default
            stream (the default). It must stay alive while the pager uses it.
        """
        h = self._h()
        handle = 0 if stream is None else getattr(stream, "cuda_stream", stream)
        if isinstance(handle, bool) or not isinstance(handle, int):
            raise TypeError(f"stream must be a CUDA stream, an int handle or None, got {type(stream).__name__}")
        if h.device < 0 and handle != 0:
            raise ValueError("stream: the host pager has no stream (only None is accepted)")
        h.set_stream(handle)

    def as_tensor(self, a):
        """A torch tensor on the same bytes as pager array `a` (no copy).

        A CUDA pager gives a tensor on its device (through
        ``__cuda_array_interface__``); a host pager gives ``torch.from_numpy(a)``.
        The tensor keeps `a` alive.

        Parameters
        ----------
        a : numpy.ndarray
            An array from this pager (or a view into one).
        """
        import torch

        h = self._h()
        if not isinstance(a, np.ndarray):
            raise TypeError(f"a must be a numpy array from this pager, got {type(a).__name__}")
        ptr, nbytes = _byte_range(a)
        if nbytes:
            h.prefetch(ptr, 0)  # moves nothing; raises ValueError unless `a` lies in this pager's memory
        if h.device < 0:
            return torch.from_numpy(a)
        is_bf16 = bfloat16 is not None and a.dtype == bfloat16
        typestr = "<i2" if is_bf16 else a.dtype.str
        t = torch.as_tensor(_CudaView(a, typestr), device=f"cuda:{h.device}")
        return t.view(torch.bfloat16) if is_bf16 else t

    def stats(self):
        """Counters of the pager.

        Returns
        -------
        dict
            ``budget_bytes`` (-1 = unlimited), ``page_bytes``, ``allocated_bytes``,
            ``resident_bytes`` of live arrays (host: measured with ``mincore``;
            CUDA: the bytes the pager moved to the device and not back),
            ``spilled_bytes``, ``page_ins`` and ``page_outs`` (paging units moved:
            pages, or slab units for small arrays), ``page_in_bytes`` and
            ``page_out_bytes`` (the bytes of those units) and ``num_allocations``; these
            include the ranges of files mapped by :meth:`map_file`, also counted
            apart: ``mapped_files`` (descriptors), ``mapped_allocations``,
            ``mapped_bytes`` (rounded out to OS pages), ``mapped_resident_bytes``;
            and ``spill_file_bytes``, the disk the spill files take now (mapped
            files never add to it).
        """
        h = self._h()
        s = h.stats()
        s.update(h.file_stats())
        return s

    # -- lifetime ----------------------------------------------------------------------------
    def close(self):
        """Stop using the pager; memory is released once no array views it.

        Every later method call raises ``ValueError``; arrays already made stay
        valid (the spill file and mappings live until the last one is
        collected). Closing twice is allowed.
        """
        self._handle = None

    def __enter__(self):
        self._h()
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        h = self._handle
        if h is None:
            return "Pager(closed)"
        s = h.stats()
        budget = "None" if s["budget_bytes"] < 0 else str(s["budget_bytes"])
        where = f"spill_dir={h.spill_dir!r}" if h.device < 0 else f"device='cuda:{h.device}'"
        return (
            f"Pager(budget_bytes={budget}, page_bytes={s['page_bytes']}, {where}, "
            f"allocated_bytes={s['allocated_bytes']}, resident_bytes={s['resident_bytes']}, "
            f"num_allocations={s['num_allocations']})"
        )
