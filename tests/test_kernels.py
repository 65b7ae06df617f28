"""Kernel paths and threads: every ISA path and thread count gives the scalar
reference's bytes; threads are settable, capped by torch's, and the GIL is
released while kernels run."""
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pytest

import pyqlora as pq
from pyqlora import _dtypes
from pyqlora import _nf4core as _ext

DTYPES = [np.float32, np.float16, _dtypes.bfloat16]


@pytest.fixture(autouse=True)
def restore_runtime():
    yield
    pq.set_isa("auto")
    pq.set_num_threads(None)


def reference(bits, x, blocksize, table):
    """The scalar reference kernel's output (codes, absmax) for raw input x."""
    n = x.size
    codes = np.empty((n + 1) // 2 if bits == 4 else n, np.uint8)
    absmax = np.empty(-(-n // blocksize), np.float32)
    _ext.quantize(bits, x.reshape(-1).view(np.uint8), _dtypes.KERNEL_DTYPES[x.dtype], n, blocksize, table, codes,
                  absmax, True)
    return codes, absmax


def reference_dequantize(bits, codes, absmax, n, blocksize, table, dtype):
    out = np.empty(n, dtype)
    _ext.dequantize(bits, codes, absmax, n, blocksize, table, out.view(np.uint8), _dtypes.KERNEL_DTYPES[np.dtype(dtype)],
                    True)
    return out


@pytest.mark.parametrize("isa", pq.available_isas())
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_every_path_matches_the_reference(rng, isa, threads):
    pq.set_isa(isa)
    pq.set_num_threads(threads)
    assert pq.get_isa() == isa
    for dtype in DTYPES:
        for n in (5, 1000, 300_007):  # the last one is split over threads
            x = (rng.standard_normal(n) * rng.choice([1e-3, 1.0, 1e3])).astype(dtype)
            for codebook in ("nf4", "fp4"):
                q = pq.quantize(x, codebook=codebook, blocksize=64, double_quant=False)
                codes, absmax = reference(4, x, 64, pq.codebook(codebook))
                assert q.packed.tobytes() == codes.tobytes() and q.absmax.tobytes() == absmax.tobytes()
                for out_dtype in DTYPES:
                    ref = reference_dequantize(4, codes, absmax, n, 64, pq.codebook(codebook), out_dtype)
                    assert pq.dequantize(q, dtype=out_dtype).tobytes() == ref.tobytes()
            c8, a8 = pq.quantize_blockwise(x, blocksize=256)
            rc, ra = reference(8, x, 256, pq.dynamic_codebook())
            assert c8.tobytes() == rc.tobytes() and a8.tobytes() == ra.tobytes()
            ref8 = reference_dequantize(8, rc, ra, n, 256, pq.dynamic_codebook(), np.float32)
            assert pq.dequantize_blockwise(c8, a8, blocksize=256).tobytes() == ref8.tobytes()


def test_large_streamed_output_matches(rng):
    # >= 32 MiB outputs take the non-temporal store path; offset views are misaligned
    n = 9 * 2**20 + 3
    x = rng.standard_normal(n).astype(np.float32)
    q = pq.quantize(x, double_quant=False)
    codes, absmax = reference(4, x, 64, pq.codebook("nf4"))
    ref = reference_dequantize(4, codes, absmax, n, 64, pq.codebook("nf4"), np.float32)
    buf = np.empty(n + 16, np.float32)
    for shift in (0, 1, 7):
        out = buf[shift : shift + n]
        pq.dequantize(q, out=out)
        assert out.tobytes() == ref.tobytes()


def test_results_do_not_depend_on_thread_count(rng):
    x = rng.standard_normal((700, 1001)).astype(np.float32)
    results = []
    for threads in (1, 2, 4, 7):
        with pq.num_threads(threads):
            q = pq.quantize(x)
            results.append((q.packed.tobytes(), q.absmax.tobytes(), q.nested_absmax.tobytes(), q.nested_offset,
                            pq.dequantize(q, dtype="bfloat16").tobytes()))
    assert all(r == results[0] for r in results)


def test_nonfinite_index_does_not_depend_on_threads():
    x = np.ones(1_000_000, np.float32)
    x[777_777] = np.inf
    x[123_456] = np.nan
    for threads in (1, 2, 3):
        with pq.num_threads(threads):
            with pytest.raises(pq.NonFiniteError) as info:
                pq.quantize(x)
            assert info.value.index == (123_456,)


def _longest_stall_while_kernels_run(q, out):
    """Longest pause of this thread while another thread runs six dequantize calls."""
    done = threading.Event()

    def work():
        for _ in range(6):
            pq.dequantize(q, out=out)
        done.set()

    worker = threading.Thread(target=work)
    old = sys.getswitchinterval()
    sys.setswitchinterval(0.001)
    try:
        worker.start()
        last, worst = time.perf_counter(), 0.0
        while not done.is_set():
            now = time.perf_counter()
            worst = max(worst, now - last)
            last = now
        worker.join()
    finally:
        sys.setswitchinterval(old)
    return worst


def test_gil_is_released_during_kernels():
    x = np.random.default_rng(0).standard_normal(2**25).astype(np.float32)
    q = pq.quantize(x, double_quant=False)
    out = np.empty_like(x)
    pq.set_num_threads(1)
    t0 = time.perf_counter()
    pq.dequantize(q, out=out)
    one_call = time.perf_counter() - t0
    # With the GIL held, this thread would stall for a whole kernel call every
    # time; the VM can also pause it now and then, so one of three tries must pass.
    stalls = []
    for _ in range(3):
        stalls.append(_longest_stall_while_kernels_run(q, out))
        if stalls[-1] < max(0.5 * one_call, 0.005):
            return
    pytest.fail(f"this thread stalled {min(stalls) * 1e3:.1f} ms while a kernel call takes {one_call * 1e3:.1f} ms")


def test_thread_settings_and_torch_cap():
    pq.set_num_threads(3)
    assert pq.get_num_threads() == 3
    with pq.num_threads(1):
        assert pq.get_num_threads() == 1
    assert pq.get_num_threads() == 3
    for bad in (-1, 1.5, "2", True):
        with pytest.raises(ValueError):
            pq.set_num_threads(bad)
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        pq.set_num_threads(None)  # automatic: never more than torch uses
        assert pq.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_isa_selection():
    assert "scalar" in pq.available_isas()
    assert pq.get_isa() == pq.available_isas()[0]  # auto = the best available
    with pytest.raises(ValueError, match="unknown ISA"):
        pq.set_isa("sse9")
    for isa in ("avx512", "avx2", "neon"):
        if isa not in pq.available_isas():
            with pytest.raises(ValueError, match="not available"):
                pq.set_isa(isa)


def _run(code, **env):
    with tempfile.TemporaryDirectory() as cwd:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd,
                              env={**os.environ, **env}, timeout=120)


def test_environment_variables():
    p = _run("import pyqlora as pq; print(pq.get_num_threads(), pq.get_isa())", PYQLORA_NUM_THREADS="1",
             NF4CORE_ISA="scalar")
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["1", "scalar"]
    p = _run("import pyqlora as pq; print(pq.get_num_threads())", NF4CORE_NUM_THREADS="3")
    assert p.stdout.split() == ["3"]
    p = _run("import pyqlora", PYQLORA_NUM_THREADS="zero")
    assert p.returncode != 0 and "PYQLORA_NUM_THREADS" in p.stderr
