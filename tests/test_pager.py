"""pq.Pager: paged host memory, checked against shadow copies, the kernel's RSS and real faults."""
import ctypes
import errno
import gc
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading

import numpy as np
import pytest
from support import run_doctests

import pyqlora as pq
from pyqlora import _pager

MiB = 1 << 20
STATS_KEYS = {"budget_bytes", "page_bytes", "allocated_bytes", "resident_bytes", "spilled_bytes", "page_ins",
              "page_in_bytes", "page_out_bytes",
              "page_outs", "num_allocations", "mapped_files", "mapped_allocations", "mapped_bytes",
              "mapped_resident_bytes", "spill_file_bytes"}

linux_only = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc/self/status (Linux)")


def proc_status_bytes(key):
    """A memory figure of this process from /proc/self/status (VmRSS, RssFile, ...) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def spill_fds(spill_dir):
    """File descriptors of this process that point into spill_dir (the unlinked spill files)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(spill_dir) + "/"):
            found.append(target)
    return found


def test_data_intact_over_evict_prefetch_cycles_under_quarter_budget(rng):
    shapes = [(300, 1024), (1000,), (512, 512, 3), (7, 5), (2048, 256), (65536 + 3,)]
    total = sum(int(np.prod(s)) * 4 for s in shapes)
    budget = total // 4
    with pq.Pager(budget_bytes=budget, page_bytes=256 * 1024) as p:
        arrays = [p.zeros(s, dtype=np.float32) for s in shapes]
        shadows = []
        for a in arrays:
            assert not a.any()
            p.prefetch(a)
            a[...] = rng.standard_normal(a.shape, dtype=np.float32)
            shadows.append(a.copy())
        largest = max(a.nbytes for a in arrays)
        max_resident = 0
        for cycle in range(30):
            for k in rng.permutation(len(arrays)):
                a, s = arrays[k], shadows[k]
                p.prefetch(a)
                np.testing.assert_array_equal(a, s)
                noise = rng.standard_normal(a.shape, dtype=np.float32)
                for x in (a, s):  # the same float ops on both: bit-identical results expected
                    x *= np.float32(0.9)
                    x += noise
                st = p.stats()
                max_resident = max(max_resident, st["resident_bytes"])
                # after a prefetch: the budget, or more only for the one range just asked for
                assert st["resident_bytes"] <= max(budget, a.nbytes + p.page_bytes) + p.page_bytes
            if cycle % 7 == 6:
                p.evict()
        for a, s in zip(arrays, shadows):
            np.testing.assert_array_equal(a, s)
        st = p.stats()
        assert st["page_ins"] > 0 and st["page_outs"] > 0
        assert st["spilled_bytes"] == st["allocated_bytes"] - st["resident_bytes"]
        assert max_resident <= largest + 2 * p.page_bytes < total


@linux_only
def test_evict_returns_memory_to_the_os(rng):
    p = pq.Pager()
    if p.spill_is_tmpfs:
        pytest.skip(f"spill dir {p.spill_dir} is a tmpfs: eviction cannot free memory there")
    rss0 = proc_status_bytes("VmRSS")
    a = p.zeros(64 * MiB, dtype=np.uint8)
    a[...] = rng.integers(0, 256, a.shape, dtype=np.uint8)
    ref = a.copy()  # also 64 MiB, but anonymous memory: RssFile does not count it
    rss_filled, file_filled = proc_status_bytes("VmRSS"), proc_status_bytes("RssFile")
    p.evict(a)
    rss_evicted, file_evicted = proc_status_bytes("VmRSS"), proc_status_bytes("RssFile")
    print(f"VmRSS {rss0 / MiB:.0f} -> filled {rss_filled / MiB:.0f} -> evicted {rss_evicted / MiB:.0f} MiB")
    # the pager array is resident now (its anonymous copy may reuse memory the allocator already held)
    assert rss_filled - rss0 >= 60 * MiB
    assert rss_filled - rss_evicted >= 60 * MiB
    assert file_filled - file_evicted >= 60 * MiB
    assert p.stats()["resident_bytes"] == 0  # the page cache is dropped too (mincore)
    np.testing.assert_array_equal(a, ref)  # faults back in, byte-exact


def test_stats_count_allocations_pages_and_frees():
    p = pq.Pager(page_bytes=MiB)
    st = p.stats()
    assert set(st) == STATS_KEYS
    assert st["budget_bytes"] == -1 and st["page_bytes"] == MiB and st["num_allocations"] == 0
    a = p.zeros((4 * MiB,), dtype=np.uint8)
    b = p.empty((3, 5), dtype=np.float64)
    st = p.stats()
    assert st["num_allocations"] == 2
    assert st["allocated_bytes"] == 4 * MiB + os.sysconf("SC_PAGESIZE")
    assert st["resident_bytes"] == 0 and st["page_ins"] == 0
    p.prefetch(a[MiB:2 * MiB])
    assert p.stats()["page_ins"] == 1
    p.prefetch(a[MiB + 5:MiB + 9])  # same page, already resident
    assert p.stats()["page_ins"] == 1
    a[...] = 1  # touched without prefetch: resident all the same, and reported
    assert p.stats()["resident_bytes"] >= 4 * MiB
    p.evict(a[:2 * MiB])
    st = p.stats()
    assert st["page_outs"] == 2 and st["resident_bytes"] >= 2 * MiB
    p.evict()
    # b was never touched: nothing of it in RAM to page out (the faults on a no
    # longer read around into the pages after it)
    assert p.stats()["resident_bytes"] == 0 and p.stats()["page_outs"] == 4
    del a, b
    gc.collect()
    st = p.stats()
    assert st["num_allocations"] == 0 and st["allocated_bytes"] == 0


def test_allocation_lives_while_any_view_does():
    p = pq.Pager()
    a = p.zeros((100, 100), dtype=np.float32)
    a[10:20] = 5.0
    v = a[10:20, ::3]
    t = a.T
    del a
    gc.collect()
    assert p.stats()["num_allocations"] == 1
    assert (v == 5.0).all() and t.shape == (100, 100)
    p.prefetch(v)  # a strided view into pager memory
    p.evict(t)
    del v
    gc.collect()
    assert p.stats()["num_allocations"] == 1
    del t
    gc.collect()
    assert p.stats()["num_allocations"] == 0


@linux_only
def test_close_with_live_arrays_defers_unmapping(tmp_path):
    with pq.Pager(budget_bytes=MiB, spill_dir=tmp_path) as p:
        a = p.zeros((1000, 1000), dtype=np.float32)
        a[...] = 3.0
        assert p.spill_dir == str(tmp_path)
        assert len(spill_fds(tmp_path)) == 1
    assert p.closed and repr(p) == "Pager(closed)"
    for method, args in ((p.stats, ()), (p.evict, ()), (p.prefetch, (a,)), (p.zeros, (3,))):
        with pytest.raises(ValueError, match="closed"):
            method(*args)
    p.close()  # twice is fine
    assert (a == 3.0).all()  # still mapped: no dangling memory
    assert len(spill_fds(tmp_path)) == 1
    del a
    gc.collect()
    assert spill_fds(tmp_path) == []  # last array gone: pager destroyed, spill file closed
    assert os.listdir(tmp_path) == []  # and nothing left on disk


def test_dtypes_and_shapes():
    p = pq.Pager()
    for dt in [np.float32, np.float16, np.int8, np.complex128, "bfloat16", np.dtype([("x", "<f4"), ("y", "u1")])]:
        a = p.zeros((3, 4), dtype=dt)
        assert a.shape == (3, 4) and a.flags.c_contiguous and a.flags.writeable
        assert a.dtype == (_pager.bfloat16 if dt == "bfloat16" else np.dtype(dt))
        assert not a.view(np.uint8).any()
    assert p.zeros(7).shape == (7,) and p.zeros(()).shape == ()
    e = p.zeros((0, 5))
    assert e.size == 0
    p.prefetch(e)
    p.evict(e)


def test_zero_copy_with_numpy():
    p = pq.Pager()
    a = p.zeros((8, 8), dtype=np.float32)
    b = np.asarray(a)
    assert b is a or np.shares_memory(a, b)
    addr = a.__array_interface__["data"][0]
    assert addr % os.sysconf("SC_PAGESIZE") == 0
    assert a.base.base.__array_interface__["data"][0] == addr  # the owner of the allocation


def test_zero_copy_with_torch():
    torch = pytest.importorskip("torch")
    p = pq.Pager(budget_bytes=0)
    a = p.zeros((64, 1024), dtype=np.float32)
    t = torch.from_numpy(a)
    assert t.data_ptr() == a.__array_interface__["data"][0]
    t[1, 2] = 7.0
    assert a[1, 2] == 7.0
    p.prefetch(t)
    p.evict(t)
    p.prefetch(t[:, 3])  # a strided tensor view
    t.mul_(2)
    assert a[1, 2] == 14.0
    p.evict(t[5:])
    p.prefetch(t.T)
    assert float(t.sum()) == 14.0
    with pytest.raises(ValueError, match="not lie in memory allocated by this pager"):
        p.prefetch(torch.zeros(3))


def test_prefetch_rejects_memory_from_elsewhere():
    p, q = pq.Pager(), pq.Pager()
    a = q.zeros(1000)
    for foreign in (np.zeros(1000, np.float32), a):
        with pytest.raises(ValueError, match="not lie in memory allocated by this pager"):
            p.prefetch(foreign)
        with pytest.raises(ValueError, match="not lie in memory allocated by this pager"):
            p.evict(foreign)
    with pytest.raises(TypeError, match="numpy array or a torch tensor"):
        p.prefetch([1.0, 2.0])


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"budget_bytes": -1}, ValueError, "budget_bytes"),
        ({"budget_bytes": "1G"}, TypeError, "budget_bytes"),
        ({"budget_bytes": True}, TypeError, "budget_bytes"),
        ({"budget_bytes": 1.5}, TypeError, "budget_bytes"),
        ({"page_bytes": 1000}, ValueError, "page_bytes"),
        ({"page_bytes": 0}, ValueError, "page_bytes"),
        ({"page_bytes": -4096}, ValueError, "page_bytes"),
        ({"spill_dir": 3}, TypeError, "spill_dir"),
    ],
)
def test_constructor_validation(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        pq.Pager(**kwargs)


@pytest.mark.parametrize(
    "shape, dtype, exc, match",
    [
        ((-1, 3), np.float32, ValueError, "shape"),
        ("ab", np.float32, TypeError, "shape"),
        ((2.5,), np.float32, TypeError, "shape"),
        (True, np.float32, TypeError, "shape"),
        ((3,), object, TypeError, "dtype"),
        ((3,), "U", TypeError, "dtype"),
        ((3,), "not-a-dtype", TypeError, "dtype"),
        ((1 << 40, 1 << 30), np.float32, ValueError, "shape"),
    ],
)
def test_allocation_validation(shape, dtype, exc, match):
    p = pq.Pager()
    with pytest.raises(exc, match=match):
        p.zeros(shape, dtype=dtype)


def test_spill_dir_missing_or_not_a_directory(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=str(missing)) as info:
        pq.Pager(spill_dir=missing)
    assert info.value.errno == errno.ENOENT
    regular = tmp_path / "file"
    regular.write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match=str(regular)) as info:
        pq.Pager(spill_dir=regular)
    assert info.value.errno == errno.ENOTDIR


def test_spill_dir_with_a_nul_character_is_refused():
    """Issue 18: C would read "/tmp\0/x" as "/tmp" and spill there without a word."""
    with pytest.raises(ValueError, match="NUL"):
        pq.Pager(spill_dir="/tmp\x00/x")
    with pytest.raises(ValueError, match="NUL"):
        pq.Pager(spill_dir=b"/tmp\x00/x")


def test_spill_dir_not_writable():
    base = pathlib.Path(tempfile.mkdtemp())  # not tmp_path: its parent is private (0700) to the owner
    base.chmod(0o755)
    ro = base / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if not os.access(ro, os.W_OK):
            with pytest.raises(PermissionError, match=str(ro)) as info:
                pq.Pager(spill_dir=ro)
            assert info.value.errno == errno.EACCES
        elif hasattr(os, "fork") and os.geteuid() == 0:
            # root ignores permission bits: try as nobody, in a forked child
            pid = os.fork()
            if pid == 0:  # pragma: no cover - child
                code = 1
                try:
                    os.setgid(65534)
                    os.setuid(65534)
                    if not ro.is_dir() or os.access(ro, os.W_OK):
                        os._exit(4)  # the fault must be the missing write permission, nothing else
                    pq.Pager(spill_dir=ro)
                except PermissionError as e:
                    code = 0 if e.errno == errno.EACCES and str(ro) in str(e) else 2
                except Exception:  # noqa: BLE001 - any other outcome fails the test
                    code = 3
                os._exit(code)
            _, status = os.waitpid(pid, 0)
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
        else:
            pytest.skip("permission bits do not stop this user")
    finally:
        ro.chmod(0o755)
        shutil.rmtree(base)


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm")
def test_tmpfs_spill_dir_warns():
    if os.statvfs("/dev/shm").f_bsize == 0:  # pragma: no cover
        pytest.skip("odd /dev/shm")
    with open("/proc/mounts") if os.path.exists("/proc/mounts") else open(os.devnull) as f:
        tmpfs = any(line.split()[1] == "/dev/shm" and line.split()[2] == "tmpfs" for line in f)
    if not tmpfs:
        pytest.skip("/dev/shm is not a tmpfs here")
    with pytest.warns(RuntimeWarning, match="tmpfs"):
        p = pq.Pager(spill_dir="/dev/shm")
    assert p.spill_is_tmpfs
    a = p.zeros(1000)
    a[:] = 2
    p.evict(a)  # cannot free RAM, but must keep the data
    assert (a == 2).all()


FSIZE_CHILD = textwrap.dedent(
    """
    import errno, resource, signal, sys
    import numpy as np
    import pyqlora as pq
    MiB = 1 << 20
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (8 * MiB, 8 * MiB))
    p = pq.Pager(budget_bytes=MiB, spill_dir=sys.argv[1], page_bytes=MiB)
    a = p.zeros(5 * MiB, dtype=np.uint8)
    a[...] = np.random.default_rng(0).integers(0, 256, a.shape, dtype=np.uint8)
    ref = a.copy()
    try:
        p.zeros(4 * MiB, dtype=np.uint8)
    except OSError as e:
        assert e.errno == errno.EFBIG, e
        assert sys.argv[1] in str(e), e
        print("alloc failed:", e)
    else:
        raise SystemExit("allocation beyond RLIMIT_FSIZE succeeded")
    p.evict()
    p.prefetch(a)
    assert np.array_equal(a, ref), "data changed after the failed allocation"
    b = p.zeros(3 * MiB, dtype=np.uint8)  # 5 + 3 MiB still fits the limit
    b[...] = 1
    p.evict()
    assert np.array_equal(a, ref) and (b == 1).all()
    assert p.stats()["num_allocations"] == 2
    print("OK")
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX rlimits")
def test_file_size_limit_is_an_error_at_allocation_and_data_survives(tmp_path):
    # cwd: not the repository root, whose source tree would shadow the installed package
    r = subprocess.run([sys.executable, "-c", FSIZE_CHILD, str(tmp_path)], check=False, cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "alloc failed:" in r.stdout and "File too large" in r.stdout
    assert r.stdout.strip().endswith("OK")


def test_threads_prefetch_evict_concurrently(rng):
    p = pq.Pager(budget_bytes=2 * MiB, page_bytes=256 * 1024)
    n_threads, n = 4, 300_000
    arrays = [p.zeros(n, dtype=np.float32) for _ in range(n_threads)]
    errors = []
    seeds = rng.integers(0, 2**31, n_threads)

    def work(k):
        try:
            r = np.random.default_rng(seeds[k])
            a, shadow = arrays[k], np.zeros(n, np.float32)
            for it in range(40):
                lo = int(r.integers(0, n - 1))
                hi = int(r.integers(lo + 1, n + 1))
                op = r.integers(0, 4)
                if op == 0:
                    p.evict(a[lo:hi])
                elif op == 1 and k == 0:
                    p.evict()
                else:
                    p.prefetch(a[lo:hi])
                if not np.array_equal(a[lo:hi], shadow[lo:hi]):
                    errors.append(f"thread {k} iteration {it}: data changed")
                v = r.standard_normal(hi - lo, dtype=np.float32)
                a[lo:hi] = v
                shadow[lo:hi] = v
                p.stats()
            if not np.array_equal(a, shadow):
                errors.append(f"thread {k}: final data changed")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def _incore_bytes(a):
    """Bytes of array a in RAM or the page cache, by the kernel's mincore (not the pager's count)."""
    libc = ctypes.CDLL(None, use_errno=True)
    page = os.sysconf("SC_PAGESIZE")
    ptr, nbytes = a.__array_interface__["data"][0], a.nbytes
    n = (nbytes + page - 1) // page
    vec = (ctypes.c_ubyte * n)()
    if libc.mincore(ctypes.c_void_p(ptr), ctypes.c_size_t(nbytes), vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore")
    return sum(v & 1 for v in vec) * page


@linux_only
def test_many_small_arrays_share_pages_under_a_budget(rng):
    # Issue 18: 4,000 arrays of 4 KiB under a 1 MiB budget. Each was its own
    # mapping: written without a prefetch, the kernel read around them into the
    # page cache in large folios that evicting one 4 KiB array could not drop,
    # so 7.6 MiB stayed resident after evict() and every further evict() paged
    # the same pages out again. Small arrays now share pages (slabs). Checked:
    # resident within the budget after evict() and after each prefetch, by the
    # pager and by mincore; a second evict() pages nothing out; every array
    # round-trips bit-exact. (What it costs is for benchmarks/bench_pager.py.)
    n, size, budget = 4000, 4096, MiB
    p = pq.Pager(budget_bytes=budget)
    if p.spill_is_tmpfs:
        pytest.skip(f"spill dir {p.spill_dir} is a tmpfs: eviction cannot free memory there")
    arrays = [p.zeros(size, dtype=np.uint8) for _ in range(n)]
    data = rng.integers(0, 256, (n, size), dtype=np.uint8)
    for a, d in zip(arrays, data):
        a[...] = d  # touched without a prefetch, as the reproducer did
    st = p.stats()
    assert st["num_allocations"] == n and st["allocated_bytes"] == n * size

    def evict_twice():
        p.evict()
        first = p.stats()
        assert first["resident_bytes"] == 0 <= budget
        assert sum(_incore_bytes(a) for a in arrays) == 0
        p.evict()
        p.evict(arrays[123])
        second = p.stats()
        assert second["page_outs"] == first["page_outs"]  # idempotent: nothing left to page out
        assert second["resident_bytes"] == 0

    evict_twice()
    for k, (a, d) in enumerate(zip(arrays, data)):  # an optimizer-like sweep: prefetch, check, update
        p.prefetch(a)
        assert np.array_equal(a, d), k
        a += np.uint8(k % 251)
        d += np.uint8(k % 251)
        if k % 250 == 0:
            st = p.stats()
            assert st["resident_bytes"] <= budget
            assert st["resident_bytes"] == sum(_incore_bytes(x) for x in arrays)
    evict_twice()
    assert all(np.array_equal(a, d) for a, d in zip(arrays, data))  # faulted back in, bit-exact


def test_small_arrays_freed_and_made_again_are_zero(rng):
    p = pq.Pager()
    arrays = [p.zeros(int(rng.integers(1, 40_000)), dtype=np.uint8) for _ in range(300)]
    for a in arrays:
        a[...] = 0xA5
    keep = arrays[::7]
    del arrays, a
    gc.collect()
    assert p.stats()["num_allocations"] == len(keep)
    fresh = [p.zeros(int(rng.integers(1, 40_000)), dtype=np.uint8) for _ in range(300)]
    assert all(not f.any() for f in fresh)  # the freed arrays' pages, handed out again as zeros
    assert all((k == 0xA5).all() for k in keep)
    p.evict()
    assert all(not f.any() for f in fresh) and all((k == 0xA5).all() for k in keep)


def test_repr_and_properties():
    p = pq.Pager(budget_bytes=3 * MiB, page_bytes=MiB)
    r = repr(p)
    assert r.startswith("Pager(budget_bytes=3145728, page_bytes=1048576, spill_dir=")
    assert p.budget_bytes == 3 * MiB and p.page_bytes == MiB and isinstance(p.spill_dir, str)
    assert "budget_bytes=None" in repr(pq.Pager())


def test_docstring_examples():
    result = run_doctests(_pager)
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------- the device argument (CUDA backend)
# The CUDA backend itself is tested on a GPU in tests/test_cuda.py (marker gpu).


def test_host_pager_reports_its_backend_and_has_no_stream():
    with pq.Pager(budget_bytes=MiB) as p:
        assert p.device == "cpu" and p.concurrent_managed is False
        assert p._h().backend == "host"
        p.synchronize()  # nothing to wait for
        p.set_stream(None)
        with pytest.raises(ValueError, match="stream"):
            p.set_stream(1234)
        with pytest.raises(TypeError, match="stream"):
            p.set_stream("fast")


def test_host_pager_as_tensor_shares_memory():
    pytest.importorskip("torch")
    with pq.Pager(budget_bytes=MiB) as p:
        a = p.zeros(10)
        t = p.as_tensor(a)
        t += 2  # the same bytes, no copy
        assert a.sum() == 20
        with pytest.raises(ValueError, match="this pager"):
            p.as_tensor(np.zeros(3))
        with pytest.raises(TypeError, match="numpy array"):
            p.as_tensor([1.0])


def _has_torch():
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize(
    "device, exc, match",
    [
        ("tpu", ValueError, "device must be"),
        ("cuda:x", ValueError, "device must be"),
        (-1, ValueError, "device must be"),
        (True, TypeError, "device must be"),
        (1.5, TypeError, "device must be"),
    ],
)
def test_bad_device_argument_names_it(device, exc, match):
    with pytest.raises(exc, match=match):
        pq.Pager(device=device)


def test_cuda_pager_refuses_a_spill_dir(tmp_path):
    with pytest.raises(ValueError, match="spill_dir"):
        pq.Pager(device="cuda", spill_dir=tmp_path)
    with pytest.raises(TypeError, match="managed_prefetch"):
        pq.Pager(device="cuda", managed_prefetch=1)


def test_parse_device_accepts_the_usual_spellings():
    assert _pager._parse_device(None) == -1
    assert _pager._parse_device("cpu") == -1
    assert _pager._parse_device("cuda") == 0
    assert _pager._parse_device("cuda:3") == 3
    assert _pager._parse_device(2) == 2
    if _has_torch():
        import torch

        assert _pager._parse_device(torch.device("cuda", 1)) == 1
        assert _pager._parse_device(torch.device("cpu")) == -1


@pytest.mark.skipif(pq._nf4core.cuda_available()[1] > 0, reason="a CUDA device is present")
def test_cuda_pager_without_a_device_fails_cleanly():
    built = pq._nf4core.cuda_available()[0]
    with pytest.raises(RuntimeError, match="CUDA error in cudaGetDeviceCount" if built else "built without CUDA"):
        pq.Pager(budget_bytes=MiB, device="cuda")
