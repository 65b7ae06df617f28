"""Helper threads: the team of the OpenMP runtime already loaded into the process
(torch's libgomp; the default, "auto"), or nf4core's own pool.

The oracle for "is a runtime loaded" is the process's memory map, not
nf4core's own lookup; results are compared byte for byte with one thread.
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import pyqlora as pq
from pyqlora import _dtypes

torch = pytest.importorskip("torch")
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


@pytest.mark.parametrize("threads", [2, 3])
def test_same_bytes_on_pool_and_openmp(threads, restore_threading):
    with pq.num_threads(1):
        want = _products(np.random.default_rng(5))
    for kind in ("openmp", "pool", "openmp"):
        pq.set_threading(kind)
        with pq.num_threads(threads):
            got = _products(np.random.default_rng(5))
        assert [a == b for a, b in zip(got, want)] == [True] * len(want), kind


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


def test_environment_selects_the_pool(tmp_path):
    out = _run("""
        import torch, pyqlora as pq
        print(pq.get_threading())
        pq.set_threading("auto")
        print(pq.get_threading())
    """, tmp_path, env={"NF4CORE_THREADING": "pool"})
    assert out == ["pool", "openmp"]
