"""pq.matmul_4bit against dequantize-then-matmul in float64."""
import io
import os

import numpy as np
import pytest

import pyqlora as pq
from pyqlora import _dtypes

SHAPES = [  # (N, K, blocksize): K a multiple of 16 and of the blocksize, or not
    (64, 128, 64), (33, 4096, 64), (100, 96, 32), (17, 200, 64), (40, 70, 32), (1, 16, 32), (24, 4096, 4096)]


def reference(x, q, transpose):
    w = pq.dequantize(q).astype(np.float64)
    return x.astype(np.float64) @ (w.T if transpose else w)


def rel_err(got, want):
    return float(np.abs(got.astype(np.float64) - want).max() / max(np.abs(want).max(), 1e-30))


@pytest.mark.parametrize("n, k, blocksize", SHAPES)
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 9, 37])
@pytest.mark.parametrize("dtype", [np.float32, _dtypes.bfloat16])
@pytest.mark.parametrize("transpose", [True, False])
def test_matches_float64_reference(rng, n, k, blocksize, m, dtype, transpose):
    q = pq.quantize(rng.standard_normal((n, k)).astype(np.float32), blocksize=blocksize,
                    codebook=rng.choice(["nf4", "fp4"]), double_quant=bool(rng.integers(2)))
    x = rng.standard_normal((m, k if transpose else n)).astype(dtype)
    y = pq.matmul_4bit(x, q, transpose=transpose)
    assert y.dtype == np.dtype(dtype) and y.shape == (m, n if transpose else k)
    # float32 sums of `inner` products; bfloat16 output adds one rounding of 2^-9
    tol = 2e-6 * np.sqrt(k if transpose else n) + (8e-3 if dtype != np.float32 else 0)
    assert rel_err(y, reference(x, q, transpose)) < tol


@pytest.mark.parametrize("isa", [i for i in ("avx512", "avx2", "scalar") if i in pq.available_isas()])
def test_every_isa_both_orientations(rng, isa):
    # odd N (tails of the 8/4/2-row groups of W), M over the 1..8 row blocks
    q = pq.quantize(rng.standard_normal((75, 320)).astype(np.float32), blocksize=32, double_quant=True)
    with _forced_isa(isa):
        for m in (1, 4, 7, 8, 13):
            for transpose in (True, False):
                x = rng.standard_normal((m, 320 if transpose else 75)).astype(np.float32)
                assert rel_err(pq.matmul_4bit(x, q, transpose=transpose), reference(x, q, transpose)) < 5e-5


class _forced_isa:
    def __init__(self, name):
        self.name = name

    def __enter__(self):
        self.old = pq.get_isa()
        pq.set_isa(self.name)

    def __exit__(self, *exc):
        pq.set_isa(self.old)


def test_large_m_leading_dims_threads_and_out(rng):
    q = pq.quantize(rng.standard_normal((48, 256)).astype(np.float32))
    x = rng.standard_normal((4, 256, 256)).astype(np.float32)  # 1024 rows
    want = reference(x.reshape(-1, 256), q, True).reshape(4, 256, 48)
    for threads in (1, 2, 3):
        with pq.num_threads(threads):
            out = np.empty((4, 256, 48), np.float32)
            assert pq.matmul_4bit(x, q, out=out) is out
            assert rel_err(out, want) < 1e-5


def test_reference_kernel_agrees(rng):
    from pyqlora import _nf4core as E
    from pyqlora._codebooks import lookup_table

    q = pq.quantize(rng.standard_normal((96, 512)).astype(np.float32))
    x = rng.standard_normal((5, 512)).astype(np.float32)
    y_ref = np.empty((5, 96), np.float32)
    E.matmul_4bit(x.view(np.uint8).reshape(-1), 0, 5, 96, 512, q.packed, q.scales(), 64, lookup_table("nf4", 16),
                  True, y_ref.view(np.uint8).reshape(-1), True)
    assert rel_err(pq.matmul_4bit(x, q), y_ref.astype(np.float64)) < 1e-5
    assert rel_err(y_ref, reference(x, q, True)) < 1e-5


def test_bad_arguments(rng):
    q = pq.quantize(rng.standard_normal((8, 32)).astype(np.float32))
    with pytest.raises(ValueError, match="last dimension must be 32"):
        pq.matmul_4bit(np.ones((2, 8), np.float32), q)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        pq.matmul_4bit(np.ones((2, 32), np.float16), q)
    with pytest.raises(ValueError, match="2-D"):
        pq.matmul_4bit(np.ones((2, 32), np.float32), pq.quantize(np.ones(32, np.float32)))
    with pytest.raises(ValueError, match="out must be"):
        pq.matmul_4bit(np.ones((2, 32), np.float32), q, out=np.empty((2, 9), np.float32))
    with pytest.raises(TypeError, match="QuantizedArray"):
        pq.matmul_4bit(np.ones((2, 32), np.float32), np.ones((8, 32)))


TILE_SHAPES = [(48, 4096, 64), (75, 200, 32), (130, 96, 64), (33, 1000, 128)]  # (N, K, blocksize)


@pytest.mark.parametrize("n, k, blocksize", TILE_SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, _dtypes.bfloat16])
def test_decode_tile_equals_dequantize(rng, n, k, blocksize, dtype):
    from pyqlora._matmul import decode_tile

    q = pq.quantize(rng.standard_normal((n, k)).astype(np.float32), blocksize=blocksize,
                    codebook=rng.choice(["nf4", "fp4"]), double_quant=bool(rng.integers(2)))
    full = pq.dequantize(q, dtype=dtype)
    for _ in range(6):  # random tiles, unaligned starts and widths included
        n0, k0 = int(rng.integers(n)), int(rng.integers(k))
        n1, k1 = int(rng.integers(n0 + 1, n + 1)), int(rng.integers(k0 + 1, k + 1))
        out = np.empty((n1 - n0, k1 - k0), dtype)
        decode_tile(q, slice(n0, n1), slice(k0, k1), out)
        np.testing.assert_array_equal(out.view(np.uint16 if dtype != np.float32 else np.uint32),
                                      np.ascontiguousarray(full[n0:n1, k0:k1]).view(out.view(
                                          np.uint16 if dtype != np.float32 else np.uint32).dtype))
    with pytest.raises(ValueError, match="out must be"):
        decode_tile(q, slice(0, 2), slice(0, 3), np.empty((2, 4), dtype))
    with pytest.raises(ValueError, match="outside|empty"):
        decode_tile(q, slice(2, 2), slice(0, 3), np.empty((0, 3), dtype))


@pytest.mark.parametrize("outer", [1, 31, 100, 1024, 4096, 11008])
@pytest.mark.parametrize("inner", [64, 4096, 11008])
@pytest.mark.parametrize("threads", [1, 2, 16])
def test_tile_width_rule(outer, inner, threads):
    """Tiles cover the output, are multiples of 32 (or the whole output), at least the per-thread
    width where the output has it, balanced (the last within 32 columns of the others), and within
    TILE_MAX_BYTES unless one 32-column tile already exceeds it (the measured rule: docs/performance.md)."""
    import pyqlora._glue.products as PM

    per = PM._tile_width(outer, inner, 2, threads)
    tiles = -(-outer // per)
    last = outer - (tiles - 1) * per
    assert 1 <= per <= outer and (per == outer or per % 32 == 0)
    least = min(outer, PM.TILE_MIN_COLS_PER_THREAD * threads, max(32, PM.TILE_MAX_BYTES // 2 // inner))
    # where the memory bound forces an extra tile, balancing may halve the width; not at <= 2 threads here
    assert per >= (least if threads <= 2 else least // 2)
    assert per * inner * 2 <= max(PM.TILE_MAX_BYTES, 32 * inner * 2) or per == outer
    assert tiles == 1 or per - last < 32 * tiles


@pytest.mark.parametrize("m", [9, 64, 1024])
@pytest.mark.parametrize("transpose", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiled_product_torch(rng, m, transpose, dtype, monkeypatch):
    torch = pytest.importorskip("torch")
    import pyqlora._glue.products as PM

    monkeypatch.setattr(PM, "TILE_BYTES", 4096)  # several tiles
    monkeypatch.setattr(PM, "TILE_MIN_COLS_PER_THREAD", 8)
    n, k = 200, 96
    q = pq.quantize(rng.standard_normal((n, k)).astype(np.float32), blocksize=32, double_quant=True)
    tdtype = getattr(torch, dtype)
    x = torch.from_numpy(rng.standard_normal((m, k if transpose else n)).astype(np.float32)).to(tdtype)
    y = PM.tiled_product_torch(x.view(m, 1, -1), q, transpose)
    assert y.shape == (m, 1, n if transpose else k) and y.dtype == tdtype
    # the oracle: the dequantized weight in x's dtype (what the tiles hold), products in float64
    w = torch.from_numpy(pq.dequantize(q)).to(tdtype).double()
    want = x.double() @ (w.T if transpose else w)
    tol = 1e-5 if dtype == "float32" else 1e-2
    assert rel_err(y.reshape(m, -1).double().numpy(), want.numpy()) < tol


def test_fused_large_m_matches(rng):
    # the fused kernel itself at training sizes (pyqlora.nn uses tiles there, the array API does not)
    q = pq.quantize(rng.standard_normal((40, 128)).astype(np.float32), blocksize=64)
    for transpose in (True, False):
        x = rng.standard_normal((1024, 128 if transpose else 40)).astype(_dtypes.bfloat16)
        assert rel_err(pq.matmul_4bit(x, q, transpose=transpose), reference(x, q, transpose)) < 8e-3


# ---------------------------------------------------------------------------
# Every ISA path (issue 7, AVX2 and NEON kernels): the fused products and the
# tile decode run the kernels of the active ISA (pq.set_isa), so each one
# available on this machine is checked against the float64 oracle / the
# reference dequantize. The NEON kernels are also checked by the C++ test
# nf4core/tests/test_matmul_isa.cpp in the aarch64 cross build under qemu.

ALL_ISAS = [i for i in ("avx512", "avx2", "neon", "scalar") if i in pq.available_isas()]
ISA_SHAPES = [  # (N, K, blocksize): odd N; K a multiple of 16 and of the blocksize (fast kernels) or not
    (37, 256, 64), (5, 96, 32), (19, 4096, 4096), (11, 384, 128), (9, 200, 64), (7, 48, 32), (3, 4100, 4096)]


def _raw_product(x, q, transpose, reference):
    """nf4_matmul_4bit (the active ISA) or nf4_matmul_4bit_ref (scalar, one thread) on float32 x."""
    from pyqlora import _nf4core as E
    from pyqlora._codebooks import lookup_table
    from pyqlora._array import block_scales
    from pyqlora._runtime import sync_threads

    n, k = q.shape
    y = np.empty((x.shape[0], n if transpose else k), np.float32)
    sync_threads()
    E.matmul_4bit(x.view(np.uint8).reshape(-1), 0, x.shape[0], n, k, q.packed, block_scales(q), q.blocksize,
                  lookup_table(q.codebook, 16), transpose, y.view(np.uint8).reshape(-1), reference)
    return y


@pytest.mark.parametrize("isa", ALL_ISAS)
@pytest.mark.parametrize("n, k, blocksize", ISA_SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, _dtypes.bfloat16])
def test_isa_products_match_float64(rng, isa, n, k, blocksize, dtype):
    q = pq.quantize(rng.standard_normal((n, k)).astype(np.float32), blocksize=blocksize,
                    codebook=rng.choice(["nf4", "fp4"]), double_quant=bool(rng.integers(2)))
    with _forced_isa(isa):
        for m in (1, 2, 3, 4, 5, 6, 7, 8, 9, 33):
            for transpose in (True, False):
                inner = k if transpose else n
                x = rng.standard_normal((m, inner)).astype(dtype)
                y = pq.matmul_4bit(x, q, transpose=transpose)
                assert y.dtype == np.dtype(dtype) and y.shape == (m, n if transpose else k)
                tol = 2e-6 * np.sqrt(inner) + (8e-3 if dtype != np.float32 else 0)
                assert rel_err(y, reference(x, q, transpose)) < tol, (m, transpose)


@pytest.mark.parametrize("isa", ALL_ISAS)
def test_isa_partial_blocks_fall_back_to_reference(rng, isa):
    # K not a multiple of the blocksize (or of 16): rows of W are not made of
    # whole blocks and every ISA must run the reference, bit for bit
    for n, k, blocksize in [(9, 200, 64), (3, 4100, 4096), (6, 72, 32)]:
        q = pq.quantize(rng.standard_normal((n, k)).astype(np.float32), blocksize=blocksize)
        with _forced_isa(isa), pq.num_threads(2):
            for m, transpose in [(1, True), (5, False), (12, True)]:
                x = rng.standard_normal((m, k if transpose else n)).astype(np.float32)
                np.testing.assert_array_equal(_raw_product(x, q, transpose, False),
                                              _raw_product(x, q, transpose, True))


PANEL_SHAPES = [  # (N, K, blocksize): several 128-column panels, N % 16 != 0, K with a short last inner chunk
    # (of 256 elements; the chunk is 256-1024 by the L2 size: 1100 rows make a short last chunk of x W at 1024)
    (300, 384, 64), (130, 512, 128), (64, 4096, 4096), (17, 288, 32), (1100, 192, 64)]


@pytest.mark.parametrize("isa", [i for i in ("avx512", "avx2") if i in pq.available_isas()])
@pytest.mark.parametrize("n, k, blocksize", PANEL_SHAPES)
def test_isa_panel_products_match_float64(rng, isa, n, k, blocksize):
    # float32 x of many rows: the panel kernels (nf4core/src/matmul_panel.hpp), on both sides of each
    # path's crossover from the row kernels (AVX2 16 / 8 rows, AVX-512 32 / 32, on AMD 64 / 48), against the float64
    # oracle; each output is summed in one task in a fixed order, so the thread count changes no bit
    q = pq.quantize(rng.standard_normal((n, k)).astype(np.float32), blocksize=blocksize,
                    codebook=rng.choice(["nf4", "fp4"]), double_quant=bool(rng.integers(2)))
    with _forced_isa(isa):
        for m in (7, 8, 16, 47, 48, 63, 64, 97, 200):
            for transpose in (True, False):
                inner = k if transpose else n
                x = rng.standard_normal((m, inner)).astype(np.float32)
                with pq.num_threads(1):
                    y = pq.matmul_4bit(x, q, transpose=transpose)
                assert rel_err(y, reference(x, q, transpose)) < 2e-6 * np.sqrt(inner), (m, transpose)
                for threads in (2, 3):
                    with pq.num_threads(threads):
                        np.testing.assert_array_equal(pq.matmul_4bit(x, q, transpose=transpose), y)


@pytest.mark.skipif("avx512" not in pq.available_isas(), reason="the CPU has no AVX-512")
def test_avx512_panels_8_and_16_lanes_give_the_same_bits(tmp_path):
    # The AVX-512 path runs its panels with 16-lane FMAs (4 strips x 6 rows of x per call);
    # NF4CORE_PANEL_LANES=8 selects the 8-lane kernel of the AVX2 path. Each output is summed over
    # the inner index in the same order with the same FMAs in both, so every bit must agree: on every
    # PANEL_SHAPE (the last strip of a panel partial, 1-3 strips left after groups of 4), rows that
    # leave 1-5 after groups of 6, both directions, 1 and 2 threads; with this CPU's inner chunk and
    # with chunks of 256 (NF4CORE_PANEL_INNER: many chunks, short last ones). The chunk changes the
    # order of the sums, so two chunk lengths give results that agree to rounding only.
    import subprocess
    import sys

    code = (
        "import sys, numpy as np, pyqlora as pq\n"
        "pq.set_isa('avx512')\n"
        "rng = np.random.default_rng(11)\n"
        "out = []\n"
        f"for n, k, bs in {PANEL_SHAPES!r}:\n"
        "    q = pq.quantize(rng.standard_normal((n, k)).astype(np.float32), blocksize=bs, double_quant=True)\n"
        "    for m in (1, 5, 6, 11, 64, 97, 200):\n"
        "        for t in (True, False):\n"
        "            x = rng.standard_normal((m, k if t else n)).astype(np.float32)\n"
        "            for threads in (1, 2):\n"
        "                with pq.num_threads(threads):\n"
        "                    out.append(pq.matmul_4bit(x, q, transpose=t))\n"
        "np.save(sys.argv[1], np.concatenate([o.ravel() for o in out]))\n"
    )
    results = {}
    for inner in ("", "256", "1024"):
        for lanes in ("8", "16") if inner != "1024" else ("16",):
            path = tmp_path / f"lanes{lanes}_{inner}.npy"
            # NF4CORE_PANEL_ROWS=1: the panels at every row count (the crossover from the row kernels is 32-64)
            env = {**os.environ, "NF4CORE_PANEL_LANES": lanes, "NF4CORE_PANEL_ROWS": "1",
                   "NF4CORE_PANEL_INNER": inner}
            proc = subprocess.run([sys.executable, "-c", code, str(path)], env=env, cwd=tmp_path,
                                  capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr
            results[lanes, inner] = np.load(path)
        if inner != "1024":
            assert results["8", inner].size > 100_000 and np.isfinite(results["8", inner]).all()
            np.testing.assert_array_equal(results["8", inner].view(np.uint32), results["16", inner].view(np.uint32))
    np.testing.assert_allclose(results["16", "256"], results["16", ""], rtol=1e-4, atol=1e-3)
    # the override is honoured: 4096 inner elements in chunks of 256 or 1024 are summed in another order
    assert not np.array_equal(results["16", "256"], results["16", "1024"])


@pytest.mark.parametrize("isa", ALL_ISAS)
@pytest.mark.parametrize("dtype", [np.float32, _dtypes.bfloat16])
def test_isa_decode_tile_bit_identical(rng, isa, dtype):
    from pyqlora._matmul import decode_tile

    bits = np.uint16 if dtype != np.float32 else np.uint32
    for n, k, blocksize in [(13, 4096, 64), (21, 200, 32), (9, 1000, 128), (3, 4100, 4096)]:
        q = pq.quantize(rng.standard_normal((n, k)).astype(np.float32), blocksize=blocksize,
                        codebook=rng.choice(["nf4", "fp4"]), double_quant=bool(rng.integers(2)))
        full = np.ascontiguousarray(pq.dequantize(q, dtype=dtype))
        with _forced_isa(isa):
            tiles = [(0, n, 0, k)]  # the whole matrix, then random tiles (unaligned starts and widths)
            for _ in range(5):
                n0, k0 = int(rng.integers(n)), int(rng.integers(k))
                tiles.append((n0, int(rng.integers(n0 + 1, n + 1)), k0, int(rng.integers(k0 + 1, k + 1))))
            for n0, n1, k0, k1 in tiles:
                out = np.empty((n1 - n0, k1 - k0), dtype)
                decode_tile(q, slice(n0, n1), slice(k0, k1), out)
                np.testing.assert_array_equal(out.view(bits), np.ascontiguousarray(full[n0:n1, k0:k1]).view(bits))


def test_isa_avx2_is_available_where_the_cpu_has_it():
    # a build that lost the AVX2 kernels would leave the AVX2 tests above running nothing
    import pathlib
    import platform

    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if platform.machine().lower() not in ("x86_64", "amd64") or not cpuinfo.exists():
        pytest.skip("x86-64 Linux only")
    flags = cpuinfo.read_text()
    if not {"avx2", "fma", "f16c"} <= set(flags.split()):
        pytest.skip("the CPU has no AVX2+FMA+F16C")
    assert "avx2" in pq.available_isas()
def _pool_stress(q, xs, threads, callers):
    """Products of every x in `xs` from `callers` Python threads at once, on `threads` kernel threads."""
    import threading

    results = [[None] * len(xs) for _ in range(callers)]
    errors = []

    def run(c):
        try:
            for _ in range(3):  # back-to-back jobs: helpers still spinning, sleeping or late
                for i, x in enumerate(xs):
                    results[c][i] = pq.matmul_4bit(x, q, transpose=i % 2 == 0).tobytes()
        except (ValueError, RuntimeError, MemoryError) as exc:  # reported below
            errors.append(exc)

    with pq.num_threads(threads):
        workers = [threading.Thread(target=run, args=(c,)) for c in range(callers)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    assert not errors
    return results


@pytest.mark.parametrize("threading_kind", ["pool", "openmp"])
@pytest.mark.parametrize("threads", [2, 3])
def test_thread_pool_jobs_back_to_back_and_concurrent(rng, threads, threading_kind):
    # Every output column is one task's, so the bytes must not depend on how the
    # helpers (the pool's, or the OpenMP team's: tests/test_threading.py) claimed
    # the tasks, nor on other callers (who then run inline).
    pytest.importorskip("torch")  # loads an OpenMP runtime (libgomp)
    q = pq.quantize(rng.standard_normal((1000, 512)).astype(np.float32), blocksize=64)
    xs = [rng.standard_normal((m, 512 if i % 2 == 0 else 1000)).astype(np.float32)
          for i, m in enumerate((1, 1, 3, 8, 1, 2))]
    with pq.num_threads(1):
        want = [pq.matmul_4bit(x, q, transpose=i % 2 == 0).tobytes() for i, x in enumerate(xs)]
    pq.set_threading(threading_kind)
    try:
        for callers in (1, 3):
            for got in _pool_stress(q, xs, threads, callers):
                assert got == want
    finally:
        pq.set_threading("auto")


def test_thread_pool_without_spinning(tmp_path):
    # NF4CORE_SPIN_US=0: helpers sleep at once and the caller waits on the
    # condition variable, the path a busy machine takes; results as with 1 thread.
    import subprocess
    import sys

    script = tmp_path / "pool.py"
    script.write_text(
        "import numpy as np, pyqlora as pq\n"
        "rng = np.random.default_rng(0)\n"
        "q = pq.quantize(rng.standard_normal((700, 256)).astype(np.float32))\n"
        "x = rng.standard_normal((2, 256)).astype(np.float32)\n"
        "with pq.num_threads(1):\n"
        "    want = pq.matmul_4bit(x, q).tobytes()\n"
        "with pq.num_threads(3):\n"
        "    assert all(pq.matmul_4bit(x, q).tobytes() == want for _ in range(200))\n"
        "print('ok')\n")
    env = dict(os.environ, NF4CORE_SPIN_US="0")
    done = subprocess.run([sys.executable, str(script)], check=False, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


# ---------------------------------------------------------------------------
# AMX tiles: bfloat16 x with 5 or more rows (pq.get_amx()). The weight enters as
# bfloat16 (the values of dequantize(q, "bfloat16")), so the oracle is float64
# x times those values; float32 sums over `inner` plus the bfloat16 output.

needs_amx = pytest.mark.skipif(not pq.amx_available(), reason="no AMX-BF16 on this CPU/OS/build")


@pytest.fixture
def amx_on():
    """AMX in use for the test whatever NF4CORE_ISA / NF4CORE_AMX chose (a forced AVX2 run of the suite on
    an AMX machine), and the ISA and the AMX switch as they were afterwards."""
    isa = pq.get_isa()
    pq.set_isa("avx512")
    allowed = pq.get_amx()  # available, and the avx512 path active: the switch's own state
    pq.set_amx(True)
    yield
    pq.set_amx(allowed)
    pq.set_isa(isa)


def reference_bf16_weight(x, q, transpose):
    w = pq.dequantize(q, dtype=_dtypes.bfloat16).astype(np.float64)
    return x.astype(np.float64) @ (w.T if transpose else w)


def _cpu_flags():
    import pathlib
    import platform

    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64") or not cpuinfo.exists():
        return None
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def test_amx_is_in_use_where_the_cpu_has_it():
    # a build or dispatch that lost AMX would leave the tests below skipped or running the vector kernel
    flags = _cpu_flags()
    if flags is None:
        pytest.skip("x86-64 Linux only")
    has = {"amx_bf16", "amx_tile"} <= flags
    assert pq.amx_available() == has
    assert pq.get_amx() == (has and pq.get_isa() == "avx512")
    assert pq.show_config(file=io.StringIO())["amx"] == ("in use" if pq.get_amx() else
                                                                  "not available" if not has else
                                                                  "available, not in use")


AMX_SHAPES = [  # (M, N, K, blocksize): tails of every tile, panel and chunk; K % blocksize != 0 included
    (5, 1, 32, 32), (16, 48, 64, 64), (31, 17, 96, 64), (33, 100, 160, 128), (100, 300, 4096, 4096),
    (47, 33, 4128, 64), (1025, 40, 256, 256), (64, 1000, 2080, 32), (20, 2100, 96, 32)]


@needs_amx
@pytest.mark.usefixtures("amx_on")
@pytest.mark.parametrize("m, n, k, blocksize", AMX_SHAPES)
@pytest.mark.parametrize("transpose", [True, False])
def test_amx_matches_float64(rng, m, n, k, blocksize, transpose):
    q = pq.quantize(rng.standard_normal((n, k)).astype(np.float32), blocksize=blocksize,
                    codebook=rng.choice(["nf4", "fp4"]), double_quant=bool(rng.integers(2)))
    inner = k if transpose else n
    x = rng.standard_normal((m, inner)).astype(_dtypes.bfloat16)
    for threads in (1, 3):
        with pq.num_threads(threads):
            y = pq.matmul_4bit(x, q, transpose=transpose)
        assert y.dtype == _dtypes.bfloat16 and y.shape == (m, n if transpose else k)
        want = reference_bf16_weight(x, q, transpose)
        err = np.abs(y.astype(np.float64) - want)
        # per element: the bfloat16 rounding of y (2^-9 relative) plus float32 sums (2^-23 x inner x |x||w|)
        bound = np.abs(want) * 2.0 ** -8 + 1e-6 * inner * (np.abs(x.astype(np.float64)) @ np.abs(
            pq.dequantize(q).astype(np.float64).T if transpose else pq.dequantize(q).astype(np.float64)))
        assert (err <= bound).all(), (threads, float((err / np.maximum(bound, 1e-30)).max()))


@needs_amx
@pytest.mark.usefixtures("amx_on")
def test_amx_and_vector_kernel_agree_and_switch(rng):
    q = pq.quantize(rng.standard_normal((70, 512)).astype(np.float32), blocksize=64)
    x = rng.standard_normal((40, 512)).astype(_dtypes.bfloat16)
    assert pq.get_amx()
    y_amx = pq.matmul_4bit(x, q).astype(np.float64)
    pq.set_amx(False)
    try:
        assert not pq.get_amx() and pq.show_config(file=io.StringIO())["amx"] == "available, not in use"
        y_vec = pq.matmul_4bit(x, q).astype(np.float64)
    finally:
        pq.set_amx(True)
    # the vector kernel multiplies by float32 weights, AMX by their bfloat16 roundings
    assert rel_err(y_vec, reference(x, q, True)) < 8e-3
    assert rel_err(y_amx, reference_bf16_weight(x, q, True)) < 8e-3
    assert not np.array_equal(y_amx, y_vec)  # two different kernels ran
    with _forced_isa("avx2"):
        assert not pq.get_amx()  # AMX only with the avx512 path


@needs_amx
@pytest.mark.usefixtures("amx_on")
def test_amx_non_finite_inputs(rng):
    q = pq.quantize(rng.standard_normal((40, 64)).astype(np.float32))
    x = rng.standard_normal((8, 64)).astype(np.float32)
    x[2, 5] = np.nan
    x[5, 7] = np.inf
    y = pq.matmul_4bit(x.astype(_dtypes.bfloat16), q).astype(np.float32)
    assert np.isnan(y[2]).all()  # NaN stays NaN through the bfloat16 rounding (not Inf)
    w = pq.dequantize(q)
    assert (np.isinf(y[5]) | np.isnan(y[5])).all() and np.isinf(y[5][w[:, 7] != 0]).all()
    finite = [0, 1, 3, 4, 6, 7]
    assert np.isfinite(y[finite]).all()


def test_amx_switch_errors_and_environment(tmp_path):
    import subprocess
    import sys

    if not pq.amx_available():
        with pytest.raises(ValueError, match="AMX is not available"):
            pq.set_amx(True)
    code = "import pyqlora as pq; print(pq.get_amx(), pq.amx_available())"
    # outside the source tree, so that the installed package is imported
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "NF4CORE_AMX": "0"}, cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", str(pq.amx_available())]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("m", [1, 5, 64])
def test_out_may_be_x_itself(rng, dtype, m):
    """Issue 18: pq.matmul_4bit(x, q, out=x) is np.matmul(x, W.T, out=x), not garbage."""
    q = pq.quantize(rng.standard_normal((96, 96)).astype(np.float32))
    x = rng.standard_normal((m, 96)).astype(_dtypes.normalize_dtype(dtype))
    ref = pq.matmul_4bit(x.copy(), q)
    assert pq.matmul_4bit(x, q, out=x) is x
    np.testing.assert_array_equal(x, ref)
    x = rng.standard_normal((m, 96)).astype(_dtypes.normalize_dtype(dtype))
    ref = pq.matmul_4bit(x.copy(), q, transpose=False)
    pq.matmul_4bit(x, q, transpose=False, out=x)
    np.testing.assert_array_equal(x, ref)


def test_the_c_kernel_refuses_y_over_x(rng):
    """Under pq.matmul_4bit's copy through a temporary, nf4core itself rejects y overlapping x or the
    weight (its kernels cannot run in place: common.h) instead of writing garbage."""
    from pyqlora import _nf4core as E
    from pyqlora._codebooks import lookup_table

    q = pq.quantize(rng.standard_normal((32, 64)).astype(np.float32), double_quant=False)
    table = lookup_table(q.codebook, 16)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    before = x.copy()
    raw = x.reshape(-1).view(np.uint8)
    with pytest.raises(ValueError, match="output 'y' overlaps input 'x'"):
        E.matmul_4bit(raw, 0, 2, 32, 64, q.packed, q.absmax, q.blocksize, table, True, raw)
    np.testing.assert_array_equal(x, before)  # nothing written
    y = np.zeros(q.packed.nbytes, np.uint8)
    y[:] = q.packed
    with pytest.raises(ValueError, match="output 'y' overlaps input 'packed'"):
        E.matmul_4bit(raw, 0, 2, 32, 64, y, q.absmax, q.blocksize, table, True, y[:2 * 32 * 4])
