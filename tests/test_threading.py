"""Helper threads: the team of the OpenMP runtime already loaded into the process
(torch's libgomp; the default, "auto"), or nf4core's own pool; and the thread
count of a ``with pq.num_threads(n)`` block, which belongs to its thread.

The oracle for "is a runtime loaded" is the process's memory map, not
nf4core's own lookup; results are compared byte for byte with one thread; the
helpers a call used are counted in /proc/self/task (a pool or an OpenMP team
starts its threads when a job asks for them).
"""
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import pyqlora as pq
from pyqlora import _dtypes
from pyqlora import _nf4core as _rt

try:
    import torch  # loads its OpenMP runtime (libgomp): the "openmp" threading
except ImportError:
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="needs torch (its OpenMP runtime)")
linux_only = pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self")

OPENMP_LIBS = ("libgomp", "libiomp5", "libomp.")


def _openmp_in_maps():
    with open("/proc/self/maps") as f:
        maps = f.read()
    return any(name in maps for name in OPENMP_LIBS)


@pytest.fixture
def restore_threading():
    before = pq.get_threading()
    yield
    pq.set_threading(before)


def _run(script, cwd, env=None, timeout=300):
    # cwd outside the source tree, whose unbuilt package would shadow the installed one
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, **(env or {})), cwd=cwd, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@needs_torch
@linux_only
def test_settings(restore_threading):
    assert _openmp_in_maps()  # torch's CPU build brought its OpenMP runtime
    pq.set_threading("pool")
    assert pq.get_threading() == "pool"
    pq.set_threading("auto")
    assert pq.get_threading() == "openmp"
    with open(os.devnull, "w") as devnull:
        assert pq.show_config(file=devnull)["threading"] == "openmp"
    pq.set_threading("pool")
    pq.set_threading("openmp")
    assert pq.get_threading() == "openmp"
    with pytest.raises(ValueError, match="expected auto, pool or openmp"):
        pq.set_threading("tbb")
    assert pq.get_threading() == "openmp"  # a refused setting changes nothing


def _products(rng):
    """Quantizations and products that split into many tasks, every kernel family."""
    w = rng.standard_normal((1000, 512)).astype(np.float32)
    q = pq.quantize(w, blocksize=64, double_quant=True)
    out = [q.packed.tobytes(), q.absmax.tobytes(), q.nested_absmax.tobytes(), pq.dequantize(q).tobytes()]
    for m in (1, 3, 40):  # GEMV, few rows, and (bfloat16, AMX where available) many rows
        for dtype in (np.float32, _dtypes.bfloat16):
            x = rng.standard_normal((m, 512)).astype(dtype)
            g = rng.standard_normal((m, 1000)).astype(dtype)
            out += [pq.matmul_4bit(x, q).tobytes(), pq.matmul_4bit(g, q, transpose=False).tobytes()]
    c8, a8 = pq.quantize_blockwise(rng.standard_normal(300_007).astype(np.float32), blocksize=256)
    return out + [c8.tobytes(), a8.tobytes()]


@needs_torch
@pytest.mark.parametrize("threads", [2, 3])
def test_same_bytes_on_pool_and_openmp(threads, restore_threading):
    with pq.num_threads(1):
        want = _products(np.random.default_rng(5))
    for kind in ("openmp", "pool", "openmp"):
        pq.set_threading(kind)
        with pq.num_threads(threads):
            got = _products(np.random.default_rng(5))
        assert [a == b for a, b in zip(got, want)] == [True] * len(want), kind


@needs_torch
@linux_only
def test_openmp_runs_on_torchs_threads_and_starts_none(tmp_path):
    # By default the work runs on the team torch already has: the process gains no
    # thread. With the pool, nf4core's helper is one more thread.
    before, on_openmp, on_pool = map(int, _run("""
        import os, numpy as np, torch, pyqlora as pq
        torch.set_num_threads(2)
        torch.ones(1 << 22).sum()  # torch's OpenMP team exists now
        assert pq.get_threading() == "openmp", pq.get_threading()
        pq.set_num_threads(2)
        rng = np.random.default_rng(0)
        q = pq.quantize(rng.standard_normal((2048, 1024)).astype(np.float32))
        x = rng.standard_normal((2, 1024)).astype(np.float32)
        threads = lambda: len(os.listdir("/proc/self/task"))
        before = threads()
        for _ in range(20):
            pq.matmul_4bit(x, q)
        on_openmp = threads()
        pq.set_threading("pool")
        for _ in range(20):
            pq.matmul_4bit(x, q)
        print(before, on_openmp, threads())
    """, tmp_path, env={"NF4CORE_THREADING": "auto"}))
    assert on_openmp == before
    assert on_pool == before + 1


@needs_torch
@linux_only
def test_openmp_from_the_moment_torch_is_imported(tmp_path):
    # The pool until torch loads libgomp, then its team, with the same results;
    # without a runtime, asking for "openmp" is an error.
    out = _run(f"""
        import time, numpy as np, pyqlora as pq
        maps = lambda: any(n in open("/proc/self/maps").read() for n in {OPENMP_LIBS!r})
        print(maps(), pq.get_threading())
        try:
            pq.set_threading("openmp")
        except ValueError as e:
            print("refused" if "no OpenMP runtime" in str(e) else e)
        pq.set_num_threads(2)
        rng = np.random.default_rng(1)
        q = pq.quantize(rng.standard_normal((1500, 512)).astype(np.float32))
        x = rng.standard_normal((1, 512)).astype(np.float32)
        a = pq.matmul_4bit(x, q).tobytes()
        import torch
        time.sleep(0.15)  # the lookup is repeated at most every 100 ms
        print(maps(), pq.get_threading(), pq.matmul_4bit(x, q).tobytes() == a)
    """, tmp_path, env={"NF4CORE_THREADING": "auto"})
    assert out == ["False", "pool", "refused", "True", "openmp", "True"]


@needs_torch
def test_environment_selects_the_pool(tmp_path):
    out = _run("""
        import torch, pyqlora as pq
        print(pq.get_threading())
        pq.set_threading("auto")
        print(pq.get_threading())
    """, tmp_path, env={"NF4CORE_THREADING": "pool"})
    assert out == ["pool", "openmp"]


# -- `with pq.num_threads(n)`: a per-thread setting ----------------------------------------

def _in_threads(*targets):
    """Runs each target in its own thread; re-raises the first failure."""
    errors = []

    def guard(fn):
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            errors.append(e)

    threads = [threading.Thread(target=guard, args=(fn,)) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]


def test_blocks_in_two_threads_overlap_without_leaking():
    # A enters (2), B enters (3), A leaves while B is still inside, then B: the
    # interleaving that left the whole process pinned to one block's count when
    # the block saved and restored the process-wide setting. A barrier forces it.
    default = pq.get_num_threads()
    process = _rt.get_num_threads()
    x = np.random.default_rng(3).standard_normal(1 << 18).astype(np.float32)
    want = pq.quantize(x).packed.tobytes()
    step = threading.Barrier(2, timeout=30)
    seen = {}

    def a():
        with pq.num_threads(2):
            step.wait()  # 1: A is inside
            step.wait()  # 2: B is inside too
            seen["a inside"] = pq.get_num_threads(), _rt.get_thread_num_threads()
            seen["a bytes"] = pq.quantize(x).packed.tobytes() == want
        step.wait()  # 3: A has left, B has not
        seen["a after"] = pq.get_num_threads(), _rt.get_thread_num_threads()
        step.wait()  # 4

    def b():
        step.wait()  # 1
        seen["b before"] = pq.get_num_threads()  # A's block does not reach here
        with pq.num_threads(3):
            step.wait()  # 2
            step.wait()  # 3
            seen["b inside"] = pq.get_num_threads(), _rt.get_thread_num_threads()
            seen["b bytes"] = pq.quantize(x).packed.tobytes() == want
            step.wait()  # 4
        seen["b after"] = pq.get_num_threads(), _rt.get_thread_num_threads()

    _in_threads(a, b)
    assert seen == {
        "a inside": (2, 2), "a bytes": True, "a after": (default, 0),
        "b before": default, "b inside": (3, 3), "b bytes": True, "b after": (default, 0),
    }
    assert pq.get_num_threads() == default  # the process default is intact
    assert _rt.get_num_threads() == process and _rt.get_thread_num_threads() == 0


def test_blocks_nest_and_restore_on_exceptions():
    default = pq.get_num_threads()
    with pq.num_threads(3):
        assert pq.get_num_threads() == 3
        with pq.num_threads(1):
            assert pq.get_num_threads() == 1
            with pytest.raises(RuntimeError, match="inside"):
                with pq.num_threads(2):
                    assert pq.get_num_threads() == 2 and _rt.get_thread_num_threads() == 2
                    raise RuntimeError("inside")
            assert pq.get_num_threads() == 1 and _rt.get_thread_num_threads() == 1
        assert pq.get_num_threads() == 3 and _rt.get_thread_num_threads() == 3
        pq.set_num_threads(1)  # the process-wide setting keeps its meaning beside a block
        try:
            assert pq.get_num_threads() == 3
            assert _rt.get_num_threads() == 1
        finally:
            pq.set_num_threads(None)
    assert pq.get_num_threads() == default and _rt.get_thread_num_threads() == 0


def test_asyncio_tasks_on_one_thread_keep_their_own_blocks():
    # One OS thread, two tasks whose blocks interleave at awaits: the count is a
    # context variable, re-applied to nf4core's per-thread setting before each
    # kernel call (get_num_threads does the same sync).
    import asyncio

    default = pq.get_num_threads()
    seen = []

    async def task(n, mine, theirs):
        with pq.num_threads(n):
            mine.set()
            await theirs.wait()  # the other task is inside its block now
            seen.append((n, pq.get_num_threads(), _rt.get_thread_num_threads()))
            await asyncio.sleep(0)
            seen.append((n, pq.get_num_threads(), _rt.get_thread_num_threads()))

    async def main():
        a, b = asyncio.Event(), asyncio.Event()
        await asyncio.gather(task(2, a, b), task(3, b, a))

    asyncio.run(main())
    assert sorted(seen) == [(2, 2, 2), (2, 2, 2), (3, 3, 3), (3, 3, 3)]
    assert pq.get_num_threads() == default and _rt.get_thread_num_threads() == 0


def test_none_means_the_automatic_count_in_a_block():
    default = pq.get_num_threads()
    with pq.num_threads(1):
        with pq.num_threads(None):
            assert pq.get_num_threads() == default
        assert pq.get_num_threads() == 1


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2", 1025])
def test_bad_counts_raise_and_change_nothing(bad):
    default = pq.get_num_threads()
    with pytest.raises(ValueError, match="number of threads"):
        with pq.num_threads(bad):
            pass
    assert pq.get_num_threads() == default and _rt.get_thread_num_threads() == 0


@linux_only
@pytest.mark.parametrize("threading_kind", ["pool", pytest.param("openmp", marks=needs_torch)])
def test_a_blocks_count_reaches_the_kernels(threading_kind, tmp_path):
    # The process runs on 1 thread; a thread inside `with pq.num_threads(4)`
    # quantizes: its call asks for 4 threads, so the pool (or that thread's
    # OpenMP team, sized 1 by OMP_NUM_THREADS) starts 3 helpers. A thread
    # without a block starts none. Same bytes both ways.
    plain, scoped, after, same = _run(f"""
        import os, threading, time, numpy as np
        if {threading_kind!r} == "openmp":
            import torch
        import pyqlora as pq
        assert pq.get_threading() == {threading_kind!r}, pq.get_threading()
        pq.set_num_threads(1)
        x = np.random.default_rng(0).standard_normal(1 << 22).astype(np.float32)
        want = pq.quantize(x).packed.tobytes()
        count = lambda: len(os.listdir("/proc/self/task"))
        alone = count()  # the main thread (no helper has started yet)
        def settle():
            # a joined thread can linger in /proc/self/task for a moment: wait
            # until only the main thread and this one are left
            for _ in range(1000):
                if count() == alone + 1:
                    break
                time.sleep(0.005)
            return count()
        out = {{}}
        def plain():
            before = settle()
            out["same plain"] = pq.quantize(x).packed.tobytes() == want
            out["plain"] = count() - before
        def scoped():
            with pq.num_threads(4):
                before = settle()
                out["same scoped"] = pq.quantize(x).packed.tobytes() == want
                out["scoped"] = count() - before
        for f in (plain, scoped):
            t = threading.Thread(target=f)
            t.start()
            t.join()
        print(out["plain"], out["scoped"], pq.get_num_threads(), out["same plain"] and out["same scoped"])
    """, tmp_path, env={"NF4CORE_THREADING": "auto" if threading_kind == "openmp" else "pool", "OMP_NUM_THREADS": "1"})
    assert (int(plain), int(scoped), int(after), same) == (0, 3, 1, "True")
